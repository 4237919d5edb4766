"""Data modules: the embedded synthetic scenes and Hugging Face ``datasets``."""

from regablate.data.huggingface import HFDataModule
from regablate.data.synthetic import SyntheticScenes, SyntheticScenesDataset, render_scene

__all__ = ["HFDataModule", "SyntheticScenes", "SyntheticScenesDataset", "render_scene"]
