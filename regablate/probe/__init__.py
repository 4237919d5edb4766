"""Frozen-feature evaluation: classification, segmentation, depth and LOST probes on cached features.

The command, ``regablate probe``, is ``regablate.probe.command``; where the backbone runs (device,
precision, processes) is ``regablate.probe.device.ProbeDevice``. The names below are imported on
first use, so the command's parser (``--help``, parse-time refusals) loads without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regablate.probe.device import ProbeDevice
    from regablate.probe.features import BatchFeatures, FeatureSet, ViTExtractor, extract_split
    from regablate.probe.plan import ProbePlan, plan_probe
    from regablate.probe.protocol import ProbeReport
    from regablate.probe.run import run_probe
    from regablate.probe.settings import FastSettings, LinearProbe

_MODULES = {
    "BatchFeatures": "features",
    "FastSettings": "settings",
    "FeatureSet": "features",
    "LinearProbe": "settings",
    "ProbeDevice": "device",
    "ProbePlan": "plan",
    "ProbeReport": "protocol",
    "ViTExtractor": "features",
    "extract_split": "features",
    "plan_probe": "plan",
    "run_probe": "run",
}
__all__ = [
    "BatchFeatures",
    "FastSettings",
    "FeatureSet",
    "LinearProbe",
    "ProbeDevice",
    "ProbePlan",
    "ProbeReport",
    "ViTExtractor",
    "extract_split",
    "plan_probe",
    "run_probe",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULES[name]}"), name)
