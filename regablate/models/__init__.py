"""Backbones: timm ViTs with R registers, checkpoint conversion, weight fingerprints, and resolving names to models."""

from regablate.models.backbone import TokenFeatures, block_index, build_backbone, eval_mode, extract_features
from regablate.models.convert import convert_state_dict, load_state_dict_file
from regablate.models.fingerprint import weights_fingerprint
from regablate.models.resolve import BackboneSource, ResolvedBackbone, load_backbone, resolve_backbone

__all__ = [
    "BackboneSource",
    "ResolvedBackbone",
    "TokenFeatures",
    "block_index",
    "build_backbone",
    "convert_state_dict",
    "eval_mode",
    "extract_features",
    "load_backbone",
    "load_state_dict_file",
    "resolve_backbone",
    "weights_fingerprint",
]
