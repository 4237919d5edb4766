"""Frozen-feature evaluation: classification, segmentation, depth and LOST probes on cached features.

The command, ``regablate probe``, is ``regablate.probe.command``; where the backbone runs (device,
precision, processes) is ``regablate.probe.device.ProbeDevice``.
"""

from regablate.probe.device import ProbeDevice
from regablate.probe.features import BatchFeatures, FeatureSet, ViTExtractor, extract_split
from regablate.probe.plan import ProbePlan, plan_probe
from regablate.probe.protocol import ProbeReport
from regablate.probe.run import run_probe
from regablate.probe.settings import FastSettings, LinearProbe

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
