"""Hugging Face model folders of DINOv2 and DINOv3 (``Dinov2Model``, ``Dinov2WithRegistersModel``,
``DINOv3ViTModel``) as the matching timm models.

The timm model (a name and its arguments) is chosen from ``config.json`` alone, read as JSON data
(no ``trust_remote_code``), and the ``model.safetensors`` weights are renamed:

* DINOv2 into timm's ``VisionTransformer`` names. Hugging Face adds the class position row to the
  class token before inserting registers, so the row is folded into ``cls_token`` and ``pos_embed``
  keeps the patch rows only, as timm's own DINOv2 checkpoints do.
* DINOv3 into the upstream facebookresearch/dinov3 names, which ``regablate.models.upstream``
  hands to timm's Eva filter. Hugging Face's RoPE (periods ``rope_theta ** (4k / head_dim)`` over
  patch centres normalised to [-1, 1] per side, halves rotated) is timm's ``dinov3`` RoPE with
  ``rope_temperature = rope_theta``; a config timm cannot compute exactly (a key bias, another
  norm epsilon or activation) is refused.

The model is then built by ``build_backbone`` like any other, so a register count or image size
other than the folder's is converted as for any checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor

from regablate.errors import RegablateError
from regablate.models.backbone import build_backbone
from regablate.models.layout import Backbone

SUPPORTED = ("Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel")
# timm's size word of each DINOv2 / DINOv3 width (other widths keep the small name with their own sizes).
_DINOV2_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
_DINOV3_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge_plus", 4096: "7b"}


@dataclass(frozen=True)
class HubModel:
    """What a Hugging Face folder holds, in timm's terms: ``timm.create_model(model_name, **model_kwargs)``
    with ``num_registers`` registers, and its weights in a layout ``build_backbone`` converts."""

    model_name: str
    model_kwargs: dict[str, Any]
    num_registers: int
    weights: dict[str, Tensor]

    def build(self, num_registers: int | None = None, img_size: int | None = None) -> Backbone:
        """The backbone, converted to ``num_registers`` registers and ``img_size`` where given."""
        registers = self.num_registers if num_registers is None else num_registers
        kwargs = {**self.model_kwargs, **({"img_size": img_size} if img_size else {})}
        return build_backbone(self.model_name, registers, checkpoint=self.weights, **kwargs).eval()


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


def read_hf_folder(folder: str | Path) -> HubModel:
    """The timm model a Hugging Face folder of a supported class holds, and its weights."""
    folder = Path(folder)
    config, kind = _config(folder)
    weights = load_safetensors(str(folder / "model.safetensors"))
    try:
        if kind == "DINOv3ViTModel":
            return _dinov3(config, weights)
        return _dinov2(config, weights)
    except KeyError as error:
        raise RegablateError(f"{folder}/model.safetensors lacks {error} that its config.json implies") from None
    except ValueError as error:  # a config field timm cannot compute exactly
        raise RegablateError(f"{folder}: {error}") from None


def _config(folder: Path) -> tuple[dict[str, Any], str]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise RegablateError(f"{folder / 'config.json'}: not readable JSON ({error})") from None
    kinds = config.get("architectures") or [config.get("model_type", "unknown")]
    if kinds[0] not in SUPPORTED:
        raise RegablateError(f"{folder} holds a {kinds[0]}; supported Hugging Face classes: {', '.join(SUPPORTED)}")
    return dict(config), kinds[0]


def _require(config: dict[str, Any], field: str, default: Any, supported: Any) -> None:
    value = config.get(field, default)
    if value != supported:
        raise ValueError(f"config.json {field}={value!r} has no exact timm equivalent (timm computes {supported!r})")


def _dinov2(config: dict[str, Any], source: dict[str, Tensor]) -> HubModel:
    if config.get("use_swiglu_ffn"):
        raise ValueError("SwiGLU DINOv2 folders (ViT-g) are not supported")
    _require(config, "layer_norm_eps", 1e-6, 1e-6)
    _require(config, "hidden_act", "gelu", "gelu")
    registers = config.get("num_register_tokens", 0)
    pattern = "vit_{size}_patch14_reg4_dinov2" if registers else "vit_{size}_patch14_dinov2"
    kwargs = {
        "img_size": config["image_size"],
        "patch_size": config["patch_size"],
        "in_chans": config.get("num_channels", 3),
        "embed_dim": config["hidden_size"],
        "depth": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "mlp_ratio": config.get("mlp_ratio", 4),
        "qkv_bias": config.get("qkv_bias", True),
        "init_values": config.get("layerscale_value", 1.0),
    }
    name = pattern.format(size=_DINOV2_SIZES.get(config["hidden_size"], "small"))
    return HubModel(name, kwargs, registers, _dinov2_weights(source, config["num_hidden_layers"]))


def _dinov2_weights(source: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
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
    for index in range(depth):
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


def _dinov3(config: dict[str, Any], source: dict[str, Tensor]) -> HubModel:
    gated = bool(config.get("use_gated_mlp", False))
    _require(config, "key_bias", False, False)  # RoPE rotates a key bias per patch: no timm Eva has one
    _require(config, "layer_norm_eps", 1e-5, 1e-5)
    _require(config, "hidden_act", "gelu", "silu" if gated else "gelu")
    dim, heads = config.get("hidden_size", 384), config.get("num_attention_heads", 6)
    if (dim // heads) % 4:
        raise ValueError(f"head size {dim // heads} is not a multiple of 4, which 2-D RoPE needs")
    hidden = config.get("intermediate_size", 1536)
    if int(dim * (hidden / dim)) != hidden:
        raise ValueError(f"intermediate_size {hidden} cannot be written as timm's int(hidden_size * mlp_ratio)")
    qkv_bias = bool(config.get("query_bias", True) or config.get("value_bias", True))
    kwargs: dict[str, Any] = {
        "img_size": config.get("image_size", 224),
        "patch_size": config.get("patch_size", 16),
        "in_chans": config.get("num_channels", 3),
        "embed_dim": dim,
        "depth": config.get("num_hidden_layers", 12),
        "num_heads": heads,
        "mlp_ratio": hidden / dim,
        "qkv_bias": qkv_bias,
        "swiglu_mlp": gated,
        "init_values": config.get("layerscale_value", 1.0),
        "rope_temperature": config.get("rope_theta", 100.0),
        "global_pool": "token",  # DINOv3ViTModel's pooler_output is the class token
    }
    if gated:
        kwargs["swiglu_align_to"] = 1  # intermediate_size as it is (timm's names round it up to a multiple of 8)
    for augmentation, default in (("shift", None), ("jitter", None), ("rescale", 2.0)):
        value = config.get(f"pos_embed_{augmentation}", default)
        if value is not None:  # training-time RoPE coordinate augmentation, as Hugging Face applies it
            kwargs[f"rope_{augmentation}_coords"] = value
    fallback = "small_plus" if gated else "small"
    pattern = "vit_{size}_patch16_dinov3" + ("_qkvb" if qkv_bias else "")
    name = pattern.format(size=fallback if dim == 384 else _DINOV3_SIZES.get(dim, fallback))
    if not timm.is_model(name):  # 7b has no _qkvb variant, tiny no plain one
        name = pattern.format(size=fallback)
    return HubModel(name, kwargs, config.get("num_register_tokens", 0), _dinov3_weights(source, config, qkv_bias))


_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.")
# Hugging Face DINOv3 names -> facebookresearch/dinov3 names, inside one block.
_DINOV3_BLOCK = {
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attention.o_proj.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_DINOV3_MLP = {"mlp.up_proj.": "mlp.fc1.", "mlp.down_proj.": "mlp.fc2."}
_DINOV3_GATED_MLP = {"mlp.gate_proj.": "mlp.w1.", "mlp.up_proj.": "mlp.w2.", "mlp.down_proj.": "mlp.w3."}
# Linear layers timm builds with a bias where Hugging Face's proj_bias / mlp_bias may leave it out.
_BIASED = re.compile(r"^blocks\.\d+\.(?:attn\.proj|mlp\.(?:fc1|fc2|w1|w2|w3))\.weight$")


def _dinov3_weights(source: dict[str, Tensor], config: dict[str, Any], qkv_bias: bool) -> dict[str, Tensor]:
    """Hugging Face ``DINOv3ViTModel`` tensors in facebookresearch/dinov3's names (older hub folders keep
    the blocks under ``layer.``, newer ones under ``model.layer.``)."""
    dim = source["embeddings.cls_token"].shape[-1]
    target = {
        "cls_token": source["embeddings.cls_token"],
        "storage_tokens": source.get("embeddings.register_tokens", torch.zeros(1, 0, dim)),
        "patch_embed.proj.weight": source["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": source["embeddings.patch_embeddings.bias"],
        "norm.weight": source["norm.weight"],
        "norm.bias": source["norm.bias"],
    }
    renames = {**_DINOV3_BLOCK, **(_DINOV3_GATED_MLP if config.get("use_gated_mlp") else _DINOV3_MLP)}
    blocks: dict[int, str] = {}
    for key, value in source.items():
        if (match := _HF_LAYER.match(key)) is None:
            continue
        blocks[int(match[1])] = match[0]
        rest = key[match.end() :]
        for hf, upstream in renames.items():
            if rest.startswith(hf):
                target[f"blocks.{match[1]}.{upstream}{rest[len(hf) :]}"] = value
    for index, layer in blocks.items():
        attention, block = layer + "attention.", f"blocks.{index}."
        target[block + "attn.qkv.weight"] = torch.cat([source[f"{attention}{name}_proj.weight"] for name in "qkv"])
        if qkv_bias:  # the key bias stays 0, as upstream masks it
            query, value = (source.get(f"{attention}{name}_proj.bias", torch.zeros(dim)) for name in "qv")
            target[block + "attn.qkv.bias"] = torch.cat([query, torch.zeros(dim), value])
    for key in [k for k in target if _BIASED.match(k)]:
        target.setdefault(key.removesuffix("weight") + "bias", torch.zeros(target[key].shape[0]))
    return target
