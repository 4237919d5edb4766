"""Hugging Face model folders of DINOv2 (``Dinov2Model``, ``Dinov2WithRegistersModel``) as timm ViTs.

The timm model is built from ``config.json`` alone, read as JSON data (no ``trust_remote_code``),
and the ``model.safetensors`` weights are renamed into timm's layout. Hugging Face adds the class
position row to the class token before inserting registers, so the class row is folded into
``cls_token`` and timm's ``pos_embed`` keeps the patch rows only (``no_embed_class``), as timm's
own DINOv2 checkpoints do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from regablate.errors import RegablateError

SUPPORTED = ("Dinov2Model", "Dinov2WithRegistersModel")


def hf_folder(path: str | Path) -> Path | None:
    """The Hugging Face model folder ``path`` names (the folder, or its ``model.safetensors``); else None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not (folder / "model.safetensors").is_file():
        return None
    if not path.is_dir() and path.name != "model.safetensors":
        return None
    if not (folder / "config.json").is_file():
        if not path.is_dir():
            return None  # a plain safetensors file of a timm model: --model names it
        raise RegablateError(f"{folder} has model.safetensors but no config.json beside it")
    return folder


def load_hf_backbone(folder: str | Path) -> VisionTransformer:
    """The timm ViT a Hugging Face DINOv2 folder holds, with its weights."""
    folder = Path(folder)
    config = _config(folder)
    if config.get("use_swiglu_ffn"):
        raise RegablateError(f"{folder}: SwiGLU DINOv2 folders (ViT-g) are not supported")
    model = VisionTransformer(**_timm_arguments(config))
    model.load_state_dict(_timm_state_dict(load_safetensors(str(folder / "model.safetensors")), config))
    return model.eval()


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise RegablateError(f"{folder / 'config.json'}: not readable JSON ({error})") from None
    kinds = config.get("architectures") or [config.get("model_type", "unknown")]
    if kinds[0] not in SUPPORTED:
        raise RegablateError(f"{folder} holds a {kinds[0]}; supported Hugging Face classes: {', '.join(SUPPORTED)}")
    return dict(config)


def _timm_arguments(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "img_size": config["image_size"],
        "patch_size": config["patch_size"],
        "in_chans": config.get("num_channels", 3),
        "embed_dim": config["hidden_size"],
        "depth": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "mlp_ratio": config.get("mlp_ratio", 4),
        "qkv_bias": config.get("qkv_bias", True),
        "init_values": config.get("layerscale_value", 1.0),
        "reg_tokens": config.get("num_register_tokens", 0),
        "no_embed_class": True,
        "num_classes": 0,
    }


def _timm_state_dict(source: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    source = {key.removeprefix("dinov2_with_registers.").removeprefix("dinov2."): v for key, v in source.items()}
    position = source["embeddings.position_embeddings"]
    target = {
        "cls_token": source["embeddings.cls_token"] + position[:, :1],
        "pos_embed": position[:, 1:],
        "patch_embed.proj.weight": source["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": source["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": source["layernorm.weight"],
        "norm.bias": source["layernorm.bias"],
    }
    if "embeddings.register_tokens" in source:
        target["reg_token"] = source["embeddings.register_tokens"]
    for index in range(config["num_hidden_layers"]):
        hf, timm = f"encoder.layer.{index}.", f"blocks.{index}."
        attention = hf + "attention.attention."
        for part in ("weight", "bias"):
            qkv = [source[f"{attention}{name}.{part}"] for name in ("query", "key", "value")]
            target[f"{timm}attn.qkv.{part}"] = torch.cat(qkv)
            target[f"{timm}attn.proj.{part}"] = source[f"{hf}attention.output.dense.{part}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                target[f"{timm}{name}.{part}"] = source[f"{hf}{name}.{part}"]
        target[f"{timm}ls1.gamma"] = source[f"{hf}layer_scale1.lambda1"]
        target[f"{timm}ls2.gamma"] = source[f"{hf}layer_scale2.lambda1"]
    return target
