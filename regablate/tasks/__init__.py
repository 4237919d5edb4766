"""LightningModules, one per training objective, all built on ``BackboneTask`` (``regablate.tasks.base``)."""

from regablate.tasks.base import BackboneTask
from regablate.tasks.classification import Classification
from regablate.tasks.dino import DINO
from regablate.tasks.distillation import Distillation

__all__ = ["DINO", "BackboneTask", "Classification", "Distillation"]
