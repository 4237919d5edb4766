"""Backbones: timm ViTs with R registers, checkpoint conversion, weight fingerprints, and resolving names to models."""

from regablate.models.backbone import (
    TokenFeatures,
    block_index,
    build_backbone,
    eval_mode,
    extract_features,
    global_feature,
)
from regablate.models.convert import architecture_of, convert_state_dict, load_state_dict_file
from regablate.models.fingerprint import weights_fingerprint
from regablate.models.layout import TokenLayout, global_feature_name
from regablate.models.resolve import BackboneSource, ResolvedBackbone, load_backbone, resolve_backbone

__all__ = [
    "BackboneSource",
    "ResolvedBackbone",
    "TokenFeatures",
    "TokenLayout",
    "architecture_of",
    "block_index",
    "build_backbone",
    "convert_state_dict",
    "eval_mode",
    "extract_features",
    "global_feature",
    "global_feature_name",
    "load_backbone",
    "load_state_dict_file",
    "resolve_backbone",
    "weights_fingerprint",
]
