from importlib.metadata import version

__version__ = version("regablate")
DESCRIPTION = "Fine-tune and ablate register tokens in Vision Transformers."
