"""Frozen-feature evaluation: classification, segmentation, depth and LOST probes on cached features.

The command, ``regablate probe``, is ``regablate.probe.command``.
"""

from regablate.probe.features import BatchFeatures, FeatureSet, ViTExtractor, extract_split
from regablate.probe.protocol import LinearProbe, ProbeReport
from regablate.probe.run import run_probe

__all__ = ["BatchFeatures", "FeatureSet", "LinearProbe", "ProbeReport", "ViTExtractor", "extract_split", "run_probe"]
