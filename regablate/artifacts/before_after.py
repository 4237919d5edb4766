"""What an intervention on the registers moves, in ``regablate inspect``: its reference images, the measures
before and after, and the lines printed under the verdict.

The model is scanned twice on the same images: as it is (the ``artifacts/...`` keys and the verdict)
and under :func:`~regablate.models.interventions.intervened` (the same keys behind ``intervened/``).
``mean`` and ``noise`` take each register's statistics over reference images that are *not* the
inspected ones, as ``regablate probe`` takes them over its training split and scores on another: a
mean over the inspected images would hold each image's own register (with one image, ``mean`` would
give it back unchanged at the first intervened block). The reference images are synthetic scenes of
the training split (the inspected ones are of the validation split), or the image folder's images
that follow the inspected ones in sorted path order; where none follow, the intervention is refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from regablate.artifacts.scan import ArtifactScan
from regablate.data.images import image_files, load_images
from regablate.data.synthetic import SyntheticScenesDataset
from regablate.errors import RegablateError
from regablate.models.interventions import Intervention, RegisterStatistics, register_statistics
from regablate.models.layout import Backbone
from regablate.runs import intervention_label

AFTER = "intervened/"  # stats.json prefix of the measures taken with the intervention
BATCH = 64  # reference images per forward pass of the statistics


@dataclass(frozen=True)
class ReferenceImages:
    """Where the mean/noise statistics come from (``provenance``, written to stats.json) and how to load them."""

    provenance: dict[str, Any]
    files: Sequence[Path] = ()

    def batches(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Iterator[Tensor]:
        """The reference images, normalised as the model expects, ``BATCH`` at a time."""
        count = self.provenance["num_images"]
        if self.files:
            for start in range(0, count, BATCH):
                yield load_images(self.files[start : start + BATCH], size, mean, std)
            return
        scenes = SyntheticScenesDataset(
            seed=self.provenance["seed"], split="train", size=count, img_size=size[0], mean=tuple(mean), std=tuple(std)
        )
        for start in range(0, count, BATCH):
            yield torch.stack([scenes[i]["image"] for i in range(start, min(start + BATCH, count))])


def reference_images(folder: str | None, inspected: int, count: int, seed: int) -> ReferenceImages:
    """Up to ``count`` reference images: the folder's images after the ``inspected`` ones, else synthetic scenes.

    Refused in one line when the folder has no image beyond the inspected ones (``mean`` without a reference).
    """
    if folder is None:
        return ReferenceImages({"images": "synthetic", "split": "train", "seed": seed, "num_images": count})
    files = image_files(Path(folder), inspected + count)[inspected:]
    if not files:
        raise RegablateError(
            f"register_intervention mean/noise needs reference images other than the inspected ones: {folder} has "
            f"none after its first {inspected}; add images or lower --num_images"
        )
    provenance = {
        "images": folder,
        "files": f"sorted paths {inspected + 1}..{inspected + len(files)}",
        "num_images": len(files),
    }
    return ReferenceImages(provenance, files)


def reference_statistics(
    model: Backbone,
    intervention: Intervention,
    reference: ReferenceImages,
    normalisation: tuple[Sequence[float], Sequence[float]],
) -> RegisterStatistics:
    """The registers' per-block mean and std over the reference images (one extra pass through the model)."""
    size = tuple(model.patch_embed.img_size)
    device = model.patch_embed.proj.weight.device
    batches = (batch.to(device) for batch in reference.batches((size[0], size[1]), *normalisation))
    return register_statistics(model, batches, intervention)


def intervention_keys(
    intervention: Intervention, after: ArtifactScan, reference: ReferenceImages | None
) -> dict[str, Any]:
    """stats.json's keys of an intervened inspection: the intervention, its reference and the measures after it."""
    keys: dict[str, Any] = {**intervention.key(), **{AFTER + key: value for key, value in after.stats.items()}}
    if reference is not None:
        keys["intervention_reference"] = reference.provenance
    return keys


# The last block's measures printed before -> after: (stats key, printed name, format).
MOVED = (
    ("artifacts/outlier_frac", "outlier frac.", "{:.2%}"),
    ("artifacts/norm_max_over_median", "max/median norm", "{:.1f}x"),
    ("artifacts/patch_norm_median", "patch norm med.", "{:.3g}"),
    ("artifacts/register_norm_mean", "register norm", "{:.3g}"),
    ("artifacts/register_norm_max", "register max", "{:.3g}"),
)


def moved_lines(stats: dict[str, Any]) -> list[str]:
    """The printed lines of what the intervention moved in the last block: each measure before -> after."""
    label = intervention_label(stats)
    lines = [f"{'intervention':<17}: {label}; last block before -> after"]
    for key, name, form in MOVED:
        before, after = stats.get(key), stats.get(AFTER + key)
        if before is None and after is None:
            continue
        shown = [form.format(value) if value is not None else "none" for value in (before, after)]
        lines.append(f"  {name:<15}: {shown[0]} -> {shown[1]}")
    return lines
