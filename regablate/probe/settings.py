"""The probe's settings: one typed group per protocol, ``--probe.fast.*`` or ``--probe.dinov2.*``.

``--probe.protocol`` picks the protocol; only that protocol's group may be given. A setting of the
other protocol would do nothing, so it is refused, naming the setting that does apply
(``--probe.protocol dinov2 --probe.fast.cls_steps 20``: use ``--probe.dinov2.cls_iterations``).
``probes``, ``ignore_index``, ``lost_k`` and ``seed`` apply to both.

This module is light (no torch): the command's parser is built from it, and
``regablate.probe.protocol`` runs the fast protocol's heads with it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from jsonargparse.typing import PositiveFloat, PositiveInt

from regablate.errors import RegablateError
from regablate.probe.dinov2.settings import DINOv2Settings

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
PROBES = ("cls", "seg", "depth", "lost")
# Opt-in, run by the probe command on the backbone itself (regablate.artifacts.token_probes), not on cached features.
TOKEN_PROBE = "token"
# The targets each probe needs in the data.
NEEDS = {"cls": "label", "seg": "mask", "depth": "depth", "lost": "box"}
# The fields each probe reads, by the role of the split: "train" fits its head, "select" picks the
# classifier's learning rate (val), "score" gives the reported numbers (test, else val).
READS: dict[str, dict[str, tuple[str, ...]]] = {
    "cls": dict.fromkeys(("train", "select", "score"), ("cls", "mean_patch", "label")),
    "seg": dict.fromkeys(("train", "score"), ("patches", "mask")),
    "depth": dict.fromkeys(("train", "score"), ("patches", "cls", "depth")),
    "lost": {"score": ("keys", "box")},
}
Protocol = Literal["fast", "dinov2"]
Accelerator = Literal["auto", "cpu", "gpu"]
Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed"]
# A setting of one protocol -> the settings of the other protocol that do its job.
FAST_TO_DINOV2: dict[str, tuple[str, ...]] = {
    "lrs": ("cls_lrs",),
    "cls_steps": ("cls_iterations",),
    "seg_steps": ("seg_iterations",),
    "seg_lr": ("seg_lr",),
    "depth_steps": ("depth_iterations",),
    "depth_lr": ("depth_lr",),
    "depth_bins": ("depth_bins",),
    "batch_size": ("cls_batch_size", "seg_batch_size", "depth_batch_size"),
}
DINOV2_TO_FAST: dict[str, tuple[str, ...]] = {
    dinov2: (fast,) for fast, names in FAST_TO_DINOV2.items() for dinov2 in names
}


def role_splits(scored_on: str) -> dict[str, str]:
    """Which split plays each role: train, select (val) and score (``scored_on``: test, or val without one)."""
    return {"train": "train", "select": "val", "score": scored_on}


@dataclass
class DeviceSettings:
    """Where a probe runs (``regablate.probe.device.ProbeDevice`` checks them against the machine).

    Args:
        accelerator: cpu, gpu, or auto (a GPU when torch sees one, else the CPU).
        devices: devices that split the feature extraction, one process each (auto: every
            visible GPU, or 1 on the CPU; 1 under --probe.protocol dinov2); the results do not depend on it.
        precision: autocast of the backbone: auto (bf16-mixed on a GPU with bf16, else 32-true),
            32-true, bf16-mixed or 16-mixed (GPU only).
    """

    accelerator: Accelerator = "auto"
    devices: PositiveInt | Literal["auto"] = "auto"
    precision: Precision = "auto"


@dataclass
class FastSettings:
    """The fast protocol: linear heads trained on cached features (``regablate.probe.protocol``).

    Args:
        lrs: learning-rate grid of the classification heads (SGD, momentum 0.9, cosine).
        cls_steps: steps of the classification heads.
        seg_steps: steps of the segmentation head (AdamW, cosine).
        seg_lr: AdamW learning rate of the segmentation head.
        depth_steps: steps of the depth head (AdamW, cosine).
        depth_lr: AdamW learning rate of the depth head.
        depth_bins: number of linear depth bins, spanning the train split's depth range.
        batch_size: images per mini-batch of every head.
        pixels_per_image: random pixels per image on which the segmentation and depth losses
            are computed each step (an unbiased estimate of the loss on the upsampled map).
    """

    lrs: Sequence[PositiveFloat] = DEFAULT_LRS
    cls_steps: PositiveInt = 300
    seg_steps: PositiveInt = 400
    seg_lr: PositiveFloat = 2e-2
    depth_steps: PositiveInt = 200
    depth_lr: PositiveFloat = 1e-2
    depth_bins: PositiveInt = 256
    batch_size: PositiveInt = 64
    pixels_per_image: PositiveInt = 64

    def __post_init__(self) -> None:
        if len(self.lrs) < 1 or any(lr <= 0 for lr in self.lrs):
            raise RegablateError(f"lrs must be positive learning rates, got {list(self.lrs)}")
        for name in ("cls_steps", "seg_steps", "depth_steps", "batch_size", "pixels_per_image", "depth_bins"):
            if getattr(self, name) < 1:
                raise RegablateError(f"{name} must be at least 1, got {getattr(self, name)}")


GROUPS: dict[str, type[Any]] = {"fast": FastSettings, "dinov2": DINOv2Settings}
EQUIVALENTS: dict[str, dict[str, tuple[str, ...]]] = {"fast": FAST_TO_DINOV2, "dinov2": DINOV2_TO_FAST}


def other_protocol_problem(protocol: str, given: Mapping[str, Mapping[str, Any] | None]) -> str | None:
    """Why the settings ``given`` per protocol group (None: not given) do not fit ``protocol``, or None.

    A group of the other protocol is refused, naming its first setting that differs from the
    default (the one the user gave) and the setting of ``protocol`` that does its job.
    """
    for group, values in given.items():
        if group == protocol or values is None:
            continue
        defaults = asdict(GROUPS[group]())
        changed = [name for name, value in values.items() if _plain(value) != _plain(defaults.get(name))]
        flag = f"--probe.{group}.{changed[0]}" if changed else f"--probe.{group}.*"
        instead = EQUIVALENTS[group].get(changed[0], ()) if changed else ()
        use = f"; use {' / '.join(f'--probe.{protocol}.{name}' for name in instead)}" if instead else ""
        return (
            f"{flag} is a setting of --probe.protocol {group} and does nothing under --probe.protocol {protocol}"
            f"{use} (the {protocol} protocol's settings are --probe.{protocol}.*)"
        )
    return None


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass
class LinearProbe:
    """Frozen-feature probes: ``fast`` (heads on cached features) or ``dinov2`` (DINOv2's protocols).

    ``protocol: dinov2`` runs ``regablate.probe.dinov2`` with the ``dinov2`` settings for the
    classification, segmentation and depth probes (the backbone in the loop, nothing cached); LOST
    trains nothing and has one protocol, the fast one's, under both. ``probes``, ``ignore_index``,
    ``seed`` and ``lost_k`` apply to both protocols; ``fast`` and ``dinov2`` to theirs only.

    Args:
        protocol: fast (cached features, the CPU grid's default) or dinov2 (DINOv2's protocols, the paper's).
        fast: settings of the fast protocol, --probe.fast.* (--probe.fast.help lists them); with
            --probe.protocol fast only.
        dinov2: settings of the dinov2 protocol, --probe.dinov2.* (--probe.dinov2.help lists them; defaults:
            DINOv2's); with --probe.protocol dinov2 only.
        ignore_index: mask value that marks unlabelled pixels (VOC/ADE20k use 255).
        lost_k: LOST's number of lowest-degree patches to expand the seed among.
        probes: which probes to run (cls, seg, depth, lost; and token, not by default: --token_probe.*).
        seed: seed of head initialisation, mini-batch order and the sampled pixels.
    """

    protocol: Protocol = "fast"
    fast: FastSettings | None = None
    dinov2: DINOv2Settings | None = None
    ignore_index: int | None = 255
    lost_k: PositiveInt = 100
    probes: Sequence[str] = PROBES
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.probes) - {*PROBES, TOKEN_PROBE}
        if unknown:
            raise RegablateError(f"unknown probe(s) {sorted(unknown)}; choose from {', '.join(PROBES)}, {TOKEN_PROBE}")
        if self.lost_k < 1:
            raise RegablateError(f"lost_k must be at least 1, got {self.lost_k}")
        groups = {name: getattr(self, name) for name in GROUPS}
        problem = other_protocol_problem(
            self.protocol, {name: None if value is None else asdict(value) for name, value in groups.items()}
        )
        if problem is not None:
            raise RegablateError(problem)
        if self.protocol == "fast" and self.fast is None:
            self.fast = FastSettings()
        if self.protocol == "dinov2" and self.dinov2 is None:
            self.dinov2 = DINOv2Settings()

    @property
    def fast_settings(self) -> FastSettings:
        """The fast protocol's settings (``protocol: fast`` only)."""
        if self.fast is None:
            raise RegablateError(f"the {self.protocol} protocol has no fast settings")
        return self.fast

    @property
    def dinov2_settings(self) -> DINOv2Settings:
        """The dinov2 protocol's settings (``protocol: dinov2`` only)."""
        if self.dinov2 is None:
            raise RegablateError(f"the {self.protocol} protocol has no dinov2 settings")
        return self.dinov2

    @property
    def cached_probes(self) -> list[str]:
        """The probes that run on cached features: all under ``fast``, LOST only under ``dinov2``."""
        return [probe for probe in self.probes if probe != TOKEN_PROBE and (self.protocol == "fast" or probe == "lost")]

    def fields(self, split: str, scored_on: str, skipped: Collection[str] = ()) -> set[str]:
        """The fields ``split`` must hold for the cached probes that run (all but ``skipped``)."""
        return {
            name
            for probe in self.cached_probes
            if probe not in skipped
            for role, names in READS[probe].items()
            if role_splits(scored_on)[role] == split
            for name in names
        }

    def missing_targets(self, targets: dict[str, set[str]], scored_on: str) -> dict[str, str]:
        """Probes that cannot run -> why, given the targets each split carries (``targets``)."""
        skipped = {}
        for probe in self.cached_probes:
            needed = sorted({role_splits(scored_on)[role] for role in READS[probe]}, key=["train", "val", "test"].index)
            lacking = [split for split in needed if NEEDS[probe] not in targets.get(split, set())]
            if lacking:
                skipped[probe] = f"the data have no '{NEEDS[probe]}' in {', '.join(lacking)}"
        return skipped

    @classmethod
    def parsed(cls, values: Mapping[str, Any]) -> LinearProbe:
        """The settings a parsed ``--probe`` group holds (its protocol groups as their dataclasses), checked."""
        groups = {name: None if values.get(name) is None else GROUPS[name](**values[name]) for name in GROUPS}
        return cls(**{**values, **groups})

    def recorded(self) -> dict[str, Any]:
        """The settings ``probe.json`` records: the shared ones and the fast protocol's (dinov2 records its own)."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in GROUPS}
        settings = {**shared, **(asdict(self.fast) if self.fast is not None else {})}
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in settings.items()}
