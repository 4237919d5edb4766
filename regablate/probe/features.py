"""Frozen features of one data split, extracted in a single backbone pass on the probe's device.

What a split keeps is chosen per probe (``regablate.probe.settings.LinearProbe.fields``), out of these fields:

* ``cls`` (D,) and ``mean_patch`` (D,), float32: the classification probe's inputs, pooled on the
  device, so they cost 8 bytes per channel and image whatever the number of patches;
* ``patches`` (h, w, D), float16: the patch tokens on their grid, for the dense probes only;
* ``keys`` (h, w, Dk), float16: the last block's attention keys of the patches, where LOST runs;
* the targets ``label``, ``mask``, ``depth``, ``box`` that the probes which run need.

Registers are dropped at the source: no field carries a register token, so no patch-level head
can see one. Patch tensors are float16 (half the memory and cache size; the heads compute in
float32). :func:`extract_split` moves each batch to the device (pinned, non-blocking), runs the
backbone under the device's autocast, and brings the kept fields back to host memory batch by
batch while the next batch computes, straight into the feature store's files.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor, nn

from regablate.errors import RegablateError
from regablate.models.backbone import extract_features
from regablate.models.layout import Backbone
from regablate.probe.cache import FieldSpec, RowWriter
from regablate.probe.device import ProbeDevice
from regablate.progress import Progress

# Feature fields (computed by the backbone) and their stored dtypes; target fields come from the batches.
FEATURE_DTYPES = {"cls": torch.float32, "mean_patch": torch.float32, "patches": torch.float16, "keys": torch.float16}
TARGET_KEYS = ("label", "mask", "depth", "box")


@dataclass
class BatchFeatures:
    """What an extractor returns for one batch of images."""

    cls: Tensor  # (B, D)
    patches: Tensor  # (B, h, w, D) patch tokens on their grid, after the final norm
    keys: Tensor  # (B, h, w, Dk) last-block attention keys of the patch tokens

    def field(self, name: str) -> Tensor:
        """Feature field ``name`` of the batch, in its stored dtype, computed where the batch is."""
        if name == "mean_patch":
            return self.patches.float().mean(dim=(1, 2))
        return getattr(self, name).to(FEATURE_DTYPES[name])


class Extractor(Protocol):
    """Anything that maps normalised images (B, 3, H, W) to :class:`BatchFeatures`."""

    def __call__(self, images: Tensor) -> BatchFeatures: ...


class ViTExtractor(nn.Module):
    """Frozen features of a timm ViT: final CLS and patch tokens, and last-block keys.

    The keys come from a forward hook on the last block's ``attn.k_norm``, which both timm
    families apply to the keys ``(B, heads, N, head_dim)`` however they project them (one fused
    ``qkv`` or separate ``k_proj``, biases included), during the same pass that yields the tokens:
    the keys as attention compares them, before RoPE (an Eva rotates them after ``k_norm``, and
    rotated keys would compare positions, not content). Register tokens are sliced off both.
    """

    def __init__(self, model: Backbone) -> None:
        super().__init__()
        k_norm = getattr(getattr(model.blocks[-1], "attn", None), "k_norm", None)
        if not isinstance(k_norm, nn.Module):
            raise RegablateError(
                f"{type(model).__name__}'s last block has no timm attention with k_norm, which LOST reads the keys from"
            )
        self.model = model.eval().requires_grad_(False)
        self._keys: Tensor | None = None
        k_norm.register_forward_hook(self._keep_keys)

    def _keep_keys(self, module: nn.Module, inputs: tuple[Tensor], output: Tensor) -> None:
        keys = output.transpose(1, 2).flatten(2)  # (B, heads, N, head_dim) -> (B, N, heads * head_dim)
        self._keys = keys[:, self.model.num_prefix_tokens :]

    @torch.inference_mode()
    def forward(self, images: Tensor) -> BatchFeatures:
        tokens = extract_features(self.model, images)
        keys, self._keys = self._keys, None
        assert keys is not None, "the attn.k_norm hook did not run"
        grid = tuple(self.model.patch_embed.dynamic_feat_size((images.shape[-2], images.shape[-1])))
        return BatchFeatures(cls=tokens.pooled, patches=_on_grid(tokens.patches, grid), keys=_on_grid(keys, grid))


def _on_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])


@dataclass
class FeatureSet:
    """The kept fields of one split, each (N, ...) or ``None`` where the probes that run need none.

    ``mask`` holds integer class ids (uint8 where the classes fit), ``depth`` (N, H, W),
    ``box`` (N, 4) xyxy pixels. Tensors read from the feature store are memory-mapped.
    """

    cls: Tensor | None = None
    mean_patch: Tensor | None = None
    patches: Tensor | None = None
    keys: Tensor | None = None
    label: Tensor | None = None
    mask: Tensor | None = None
    depth: Tensor | None = None
    box: Tensor | None = None

    def need(self, name: str) -> Tensor:
        """Field ``name``, which the probe plan keeps for every probe that reads it; an error naming it otherwise."""
        value = getattr(self, name)
        if value is None:
            raise RegablateError(f"the features hold no '{name}': the probe plan did not keep it for this split")
        return value

    def to_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        present = self.to_dict()
        return len(next(iter(present.values()))) if present else 0


def feature_specs(extractor: Extractor, image: Tensor, where: ProbeDevice | None = None) -> dict[str, FieldSpec]:
    """The stored shape and dtype of every feature field, from one forward of ``image`` (3, H, W)."""
    with _autocast(where):
        out = extractor(image[None].to(where.device if where is not None else "cpu"))
    return {name: FieldSpec(tuple(out.field(name).shape[1:]), dtype) for name, dtype in FEATURE_DTYPES.items()}


def extract_split(
    extractor: Extractor,
    batches: Iterable[dict[str, Tensor]],
    writers: dict[str, RowWriter],
    first_row: int = 0,
    where: ProbeDevice | None = None,
    progress: Progress | None = None,
) -> int:
    """Run ``extractor`` once over ``batches``; store each batch's fields from row ``first_row`` on.

    Only the fields ``writers`` name are kept (the backbone does not run when they are all
    targets). On a GPU, a batch's fields are copied back into pinned host memory without blocking
    and written while the next batch computes. Returns the number of samples stored.
    """
    device = where.device if where is not None else torch.device("cpu")
    computed = [name for name in writers if name in FEATURE_DTYPES]
    row, pending = first_row, None
    for batch in batches:
        size = len(batch["image"])
        host = {name: batch[name] for name in writers if name not in FEATURE_DTYPES}
        if computed:
            with _autocast(where):
                out = extractor(batch["image"].to(device, non_blocking=True))
            host.update({name: _to_host(out.field(name)) for name in computed})
        ready = torch.cuda.Event() if device.type == "cuda" else None
        if ready is not None:
            ready.record()
        if pending is not None:
            _write(writers, *pending)
        pending = (row, host, ready)
        row += size
        if progress is not None:
            progress.update(size)
    if pending is not None:
        _write(writers, *pending)
    return row - first_row


def _autocast(where: ProbeDevice | None) -> AbstractContextManager:
    return where.autocast() if where is not None else nullcontext()


def _to_host(tensor: Tensor) -> Tensor:
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _write(writers: dict[str, RowWriter], row: int, host: dict[str, Tensor], ready: torch.cuda.Event | None) -> None:
    if ready is not None:
        ready.synchronize()
    for name, values in host.items():
        writers[name].write(row, torch.as_tensor(values))
