"""Checkpoint conversion between register counts and position-embedding layouts.

A checkpoint trained with any register count and either position-embedding layout is converted
into the DINOv2 layout regablate builds (``[CLS, REG_1 .. REG_R, PATCHES]``, or
``[REG_1 .. REG_R, PATCHES]`` for a ViT without a class token; only the patches carry a position
embedding):

* an embedding row that belonged to CLS (or to a register) is folded into that token, which
  is exact because the row was only ever added to it;
* registers present on both sides are copied; new ones start as a small random normal, since
  registers that start identical and have no position embedding never separate;
* the patch rows are resampled by timm when the patch grid differs.

So a model without registers converted to ``num_registers=0`` computes exactly what it
computed before, with or without a class token. What the weights say about the architecture
(a class token, an attention pool, where the final norm sits) is read by :func:`architecture_of`,
so that the model is built to match them. Weights are read with safetensors or ``torch.load(weights_only=True)``:
nothing is unpickled.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from regablate.errors import RegablateError
from regablate.models.layout import Backbone, num_registers_of
from regablate.runs import first_line

# Prefixes under which a backbone's weights are found in training checkpoints, most specific first.
_PREFERRED_PREFIXES = ("backbone.", "student.backbone.", "model.backbone.", "model.", "module.", "")
# Source keys that a headless backbone may ignore (a test-time register is added after loading).
_IGNORED_SOURCE_KEYS = ("head.", "head_drop.", "fc_norm.", "attn_pool.", "test_time_register.")


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
        raise RegablateError(
            f"cannot read checkpoint {path}: it is corrupt or holds objects other than tensors "
            f"({first_line(err)}); save weights with safetensors or torch.save(state_dict)"
        ) from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise RegablateError(
            f"cannot read checkpoint {path}: corrupt or not a checkpoint ({first_line(err)})"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise RegablateError(f"checkpoint {path} holds no tensors")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def architecture_of(source: dict[str, Tensor]) -> dict[str, bool]:
    """What a ViT state dict fixes about the model: ``class_token``, ``attn_pool`` (``map`` pooling),
    ``fc_norm`` (a norm after pooling instead of a final per-token norm) and ``final_norm`` (either)."""
    src = _strip_prefix(source)
    fc_norm = "fc_norm.weight" in src
    return {
        "class_token": "cls_token" in src,
        "attn_pool": any(key.startswith("attn_pool.") for key in src),
        "fc_norm": fc_norm,
        "final_norm": fc_norm or "norm.weight" in src,
    }


def convert_state_dict(
    source: dict[str, Tensor], model: Backbone, *, register_init_std: float = 0.02
) -> dict[str, Tensor]:
    """Convert a ViT state dict (any register count and layout) into one that fits ``model``.

    ``model`` is a timm ``VisionTransformer`` or ``Eva`` (DINOv3, RoPE ViTs, EVA-02, PE); an Eva
    with rotary embedding only has no ``pos_embed`` to convert.
    """
    src = _strip_prefix(source)
    target = model.state_dict()
    learned_pos = getattr(model, "pos_embed", None) is not None  # Eva RoPE models (DINOv3, *_rope_*) have none
    if learned_pos and "pos_embed" not in src:
        raise RegablateError("checkpoint has no pos_embed: it is not a ViT with a learned position embedding")
    has_cls = "cls_token" in src
    if has_cls != (model.cls_token is not None):
        weights, built = ("a", "without") if has_cls else ("no", "with")
        raise RegablateError(
            f"the checkpoint has {weights} class token (cls_token) but the model is built {built} one; "
            "leave class_token out and the weights decide it"
        )
    dim = src["patch_embed.proj.weight"].shape[0]
    src_regs = src.get("reg_token", torch.zeros(1, 0, dim))
    num_src_prefix = int(has_cls) + src_regs.shape[1]
    target_grid = tuple(model.patch_embed.grid_size)

    patch_pos, prefix_pos = (
        _split_pos_embed(src["pos_embed"], num_src_prefix, target_grid) if learned_pos else (None, None)
    )
    tokens = {"reg_token": src_regs.clone()}
    if has_cls:
        tokens["cls_token"] = src["cls_token"].clone()
    if prefix_pos is not None:  # rows of the prefix tokens, in their order [CLS, REG..]: fold them in
        if has_cls:
            tokens["cls_token"] = tokens["cls_token"] + prefix_pos[:, :1]
        tokens["reg_token"] = tokens["reg_token"] + prefix_pos[:, int(has_cls) :]
    if patch_pos is not None:
        src_grid = _grid_of(patch_pos.shape[1], target_grid)
        if src_grid != target_grid:
            patch_pos = resample_abs_pos_embed(
                patch_pos, new_size=list(target_grid), old_size=list(src_grid), num_prefix_tokens=0
            )

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
    if has_cls:
        out["cls_token"] = tokens["cls_token"]
    if patch_pos is not None:
        out["pos_embed"] = patch_pos
    num_registers = num_registers_of(model)
    if num_registers:
        regs = tokens["reg_token"]
        new = torch.randn(1, num_registers, dim, dtype=regs.dtype) * register_init_std
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
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


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
