"""timm Vision Transformers with R register tokens, and checkpoint conversion between register counts.

Every backbone regablate builds uses the DINOv2 layout: the token sequence is
``[CLS, REG_1 .. REG_R, PATCH_1 .. PATCH_N]`` and only the patches carry a position
embedding (timm's ``no_embed_class=True``). A checkpoint trained with any register count
and either position-embedding layout is converted on load:

* an embedding row that belonged to CLS (or to a register) is folded into that token, which
  is exact because the row was only ever added to it;
* registers present on both sides are copied; new ones start as a small random normal, since
  registers that start identical and have no position embedding never separate;
* the patch rows are resampled by timm when the patch grid differs.

So a model without registers converted to ``num_registers=0`` computes exactly what it
computed before.
"""

from __future__ import annotations

import difflib
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from regablate.errors import RegablateError

# Modules whose registered models are plain timm VisionTransformers.
_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")
# timm arguments regablate sets itself: the layout is not negotiable.
_LAYOUT_KWARGS = {"reg_tokens": "num_registers", "no_embed_class": None, "class_token": None}
# Prefixes under which a backbone's weights are found in training checkpoints, most specific first.
_PREFERRED_PREFIXES = ("backbone.", "student.backbone.", "model.backbone.", "model.", "module.", "")
# Source keys that a headless backbone may ignore (a test-time register is added after loading).
_IGNORED_SOURCE_KEYS = ("head.", "head_drop.", "fc_norm.", "attn_pool.", "test_time_register.")


def build_backbone(
    model_name: str,
    num_registers: int,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    register_init_std: float = 0.02,
    test_time_registers: str | Path | None = None,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Build a headless timm ViT with ``num_registers`` registers in the DINOv2 layout.

    Args:
        model_name: any timm ViT name (``vit_small_patch14_dinov2``, ``test_vit``, ...).
        num_registers: number of register tokens R >= 0.
        checkpoint: local ``.safetensors``, ``.pt``, ``.pth`` or Lightning ``.ckpt`` file trained
            with any register count; converted as described in the module docstring.
        pretrained: load timm's pretrained weights for ``model_name`` (through timm's own hub
            loading, so it needs network access or a populated cache) and convert them.
        register_init_std: standard deviation of the normal that new registers start from
            when weights are loaded.
        test_time_registers: a ``register_neurons.json`` found on these weights: adds one untrained
            token after the registers that takes over those MLP units (see ``regablate.test_time_registers``).
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``, ...).
    """
    if isinstance(num_registers, bool) or not isinstance(num_registers, int) or num_registers < 0:
        raise RegablateError(
            f"num_registers must be an integer >= 0 (the paper uses 0/1/2/4/8/16), got {num_registers!r}"
        )
    if checkpoint is not None and pretrained:
        raise RegablateError("give either checkpoint or pretrained=True, not both")
    for key, instead in _LAYOUT_KWARGS.items():
        if key in timm_kwargs:
            hint = f"use num_registers instead" if instead else "regablate always uses the DINOv2 layout"
            raise RegablateError(f"timm argument {key!r} cannot be set: {hint}")
    _check_vit_name(model_name)
    kwargs = {"num_classes": 0, **timm_kwargs}
    try:
        model = timm.create_model(
            model_name,
            pretrained=False,
            reg_tokens=num_registers,
            no_embed_class=True,
            class_token=True,
            **kwargs,
        )
    except TypeError as err:
        raise RegablateError(f"bad timm arguments for {model_name}: {err}") from None
    if type(model) is not VisionTransformer:
        raise RegablateError(
            f"{model_name} builds a {type(model).__name__}, not a plain timm VisionTransformer; "
            "pick a vit_* or deit_* model without a distillation token"
        )
    _check_patch_grid(model, model_name)

    source: dict[str, Tensor] | None = None
    if pretrained:
        source = timm.create_model(model_name, pretrained=True, num_classes=0).state_dict()
    elif checkpoint is not None:
        source = load_state_dict_file(checkpoint)
    if source is not None:
        converted = convert_state_dict(source, model, register_init_std=register_init_std)
        model.load_state_dict(converted, strict=True)
    if test_time_registers is not None:
        from regablate.test_time_registers import add_test_time_register  # it builds on this module

        add_test_time_register(model, test_time_registers)
    return model


def _check_vit_name(model_name: str) -> None:
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
        raise RegablateError(f"unknown timm model {model_name!r}{hint}")
    module = timm.models.model_entrypoint(model_name).__module__
    if module not in _VIT_MODULES:
        raise RegablateError(
            f"{model_name} is not a Vision Transformer (timm builds it in {module}); "
            "registers need a timm VisionTransformer such as vit_small_patch16_224"
        )


def _check_patch_grid(model: VisionTransformer, model_name: str) -> None:
    img_size = model.patch_embed.img_size
    patch_size = model.patch_embed.patch_size
    if img_size is None:
        return
    if any(i % p for i, p in zip(img_size, patch_size)):
        raise RegablateError(
            f"img_size {tuple(img_size)} of {model_name} is not divisible by its patch size "
            f"{tuple(patch_size)}; pick an img_size that is a multiple of the patch size"
        )


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read tensors from a safetensors, PyTorch or Lightning checkpoint without unpickling code.

    Returns the flat ``{name: tensor}`` mapping, unwrapped from the ``state_dict`` / ``model`` /
    ``module`` keys that training checkpoints use.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise RegablateError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_safetensors(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RegablateError(
            f"cannot read checkpoint {path}: it is corrupt or holds objects other than tensors "
            f"({first}); save weights with safetensors or torch.save(state_dict)"
        ) from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RegablateError(f"cannot read checkpoint {path}: corrupt or not a checkpoint ({first})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise RegablateError(f"checkpoint {path} holds no tensors")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def convert_state_dict(
    source: dict[str, Tensor], model: VisionTransformer, *, register_init_std: float = 0.02
) -> dict[str, Tensor]:
    """Convert a ViT state dict (any register count and layout) into one that fits ``model``."""
    src = _strip_prefix(source)
    target = model.state_dict()
    if "cls_token" not in src or "pos_embed" not in src:
        raise RegablateError("checkpoint has no cls_token/pos_embed: it is not a ViT with a class token")
    dim = src["cls_token"].shape[-1]
    src_regs = src.get("reg_token", torch.zeros(1, 0, dim))
    num_src_prefix = 1 + src_regs.shape[1]
    target_grid = tuple(model.patch_embed.grid_size)

    pos = src["pos_embed"]
    patch_pos, prefix_pos = _split_pos_embed(pos, num_src_prefix, target_grid)
    cls = src["cls_token"].clone()
    regs = src_regs.clone()
    if prefix_pos is not None:
        cls = cls + prefix_pos[:, :1]
        regs = regs + prefix_pos[:, 1:]
    src_grid = _grid_of(patch_pos.shape[1], target_grid)
    if src_grid != target_grid:
        patch_pos = resample_abs_pos_embed(patch_pos, new_size=list(target_grid), old_size=list(src_grid), num_prefix_tokens=0)

    out: dict[str, Tensor] = {}
    for key, value in src.items():
        if key in ("cls_token", "pos_embed", "reg_token"):
            continue
        if key not in target:
            if key.startswith(_IGNORED_SOURCE_KEYS):
                continue
            raise RegablateError(
                f"checkpoint tensor {key} {tuple(value.shape)} has no place in the model: "
                "the checkpoint was trained with another architecture (depth, blocks or options)"
            )
        out[key] = value
    out["cls_token"] = cls
    out["pos_embed"] = patch_pos
    num_registers = model.num_reg_tokens
    if num_registers:
        new = torch.randn(1, num_registers, dim, dtype=cls.dtype) * register_init_std
        keep = min(num_registers, regs.shape[1])
        new[:, :keep] = regs[:, :keep]
        out["reg_token"] = new

    missing = [k for k in target if k not in out]
    if missing:
        raise RegablateError(
            f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:3])}: "
            "it was trained with another architecture"
        )
    for key, value in out.items():
        if value.shape != target[key].shape:
            raise RegablateError(
                f"checkpoint tensor {key} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(target[key].shape)}; build the model with the checkpoint's sizes"
            )
    return out


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep the backbone's tensors of a training checkpoint, without their module prefix."""
    prefixes = {k[: -len("patch_embed.proj.weight")] for k in state if k.endswith("patch_embed.proj.weight")}
    if not prefixes:
        raise RegablateError("checkpoint has no patch_embed.proj.weight: it does not hold a ViT backbone")
    prefix = next((p for p in _PREFERRED_PREFIXES if p in prefixes), min(prefixes, key=len))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _split_pos_embed(pos: Tensor, num_prefix: int, target_grid: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """Split a position embedding into (patch rows, prefix rows or None) for either layout."""
    length = pos.shape[1]
    num_target = target_grid[0] * target_grid[1]
    if length == num_target:
        return pos, None
    if length == num_target + num_prefix:
        return pos[:, num_prefix:], pos[:, :num_prefix]
    # Another resolution: the layout is the one that leaves a square patch grid.
    if length > num_prefix and math.isqrt(length - num_prefix) ** 2 == length - num_prefix:
        return pos[:, num_prefix:], pos[:, :num_prefix]
    if math.isqrt(length) ** 2 == length:
        return pos, None
    raise RegablateError(
        f"checkpoint pos_embed has {length} rows, which fits neither the model's {target_grid[0]}x{target_grid[1]} "
        f"patch grid nor a square grid; build the model with the checkpoint's img_size and patch_size"
    )


def _grid_of(num_patches: int, target_grid: tuple[int, int]) -> tuple[int, int]:
    if num_patches == target_grid[0] * target_grid[1]:
        return target_grid
    side = math.isqrt(num_patches)
    return (side, side)


@dataclass
class TokenFeatures:
    """What one backbone pass returns.

    ``cls``, ``registers`` and ``patches`` come after the final LayerNorm (what heads use); with a
    test-time register (``regablate.test_time_registers``), ``registers`` ends with it;
    ``blocks`` maps a block index to that block's output, the whole ``[CLS, REG, PATCH]``
    sequence of the residual stream *before* the final norm, which would hide the high norms.
    """

    cls: Tensor
    registers: Tensor
    patches: Tensor
    blocks: dict[int, Tensor]


def extract_features(model: VisionTransformer, images: Tensor, blocks: Sequence[int] = ()) -> TokenFeatures:
    """Run ``model`` once; return its final tokens split by role, and the chosen blocks pre-norm.

    ``blocks`` takes indices into ``model.blocks``; negative ones count from the end.
    """
    depth = len(model.blocks)
    wanted = sorted({block_index(i, depth) for i in blocks})
    if wanted:
        tokens, inter = model.forward_intermediates(
            images, indices=wanted, return_prefix_tokens=True, norm=False, output_fmt="NLC"
        )
        taken = {i: torch.cat([prefix, patches], dim=1) for i, (patches, prefix) in zip(wanted, inter)}
        by_request = {i: taken[block_index(i, depth)] for i in blocks}
    else:
        tokens = model.forward_features(images)
        by_request = {}
    num_prefix = model.num_prefix_tokens
    return TokenFeatures(
        cls=tokens[:, 0],
        registers=tokens[:, 1:num_prefix],
        patches=tokens[:, num_prefix:],
        blocks=by_request,
    )


def block_index(index: int, depth: int) -> int:
    if not -depth <= index < depth:
        raise RegablateError(f"block index {index} is out of range for a ViT with {depth} blocks")
    return index % depth
