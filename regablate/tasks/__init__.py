"""LightningModules, one per training objective, all built on `regablate.backbone`."""

from regablate.tasks.classification import Classification

__all__ = ["Classification"]
