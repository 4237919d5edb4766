"""LightningModules, one per training objective, all built on `regablate.backbone`."""

from regablate.tasks.classification import Classification
from regablate.tasks.dino import DINO
from regablate.tasks.distillation import Distillation

__all__ = ["DINO", "Classification", "Distillation"]
