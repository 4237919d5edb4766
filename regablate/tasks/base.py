"""``BackboneTask``: what every regablate task shares, in the way of torchgeo's ``BaseTask``.

A task is a LightningModule around a timm ViT with R registers. The base takes the backbone
arguments (which ViT, how many registers, which weights) and the optimiser arguments (AdamW,
linear warmup then cosine decay), saves them all as hyper-parameters, and calls
``configure_models`` and ``configure_metrics`` (the subclass builds its modules there, from
``self.hparams``). ``configure_optimizers`` is written once: AdamW over the parameter groups of
``param_groups`` (by default every parameter that trains, no weight decay on tokens, position
embedding, biases and norms) at the peak learning rate of ``peak_lr``; a task changes those two
hooks (DINO: DINOv2's groups and its batch-size rule).

Two switches change how the backbones run, not what they compute: ``compile`` compiles the
transformer blocks of every backbone the task holds (``regablate.models.compiled``), and
``grad_checkpointing`` turns on timm's activation checkpointing in those that train (a
backbone with a parameter that requires a gradient: the student, never a frozen teacher), which
keeps each block's input only and recomputes the block in the backward pass.

A subclass declares only its own arguments and passes the rest on with ``**kwargs``;
jsonargparse (and so LightningCLI, ``--print_config`` and ``--help``) follows the ``**kwargs``
into this signature, so every argument stays a plain ``model.init_args.*`` key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from regablate.hparams import Hyperparameters, make_hyperparameters_plain
from regablate.models.backbone import build_backbone
from regablate.models.compiled import compile_blocks, require_compile
from regablate.models.layout import Backbone
from regablate.tasks.optim import adamw_warmup_cosine, weight_decay_groups


class BackboneTask(LightningModule):
    """The base of the tasks: a register ViT backbone and its optimiser."""

    if TYPE_CHECKING:  # Lightning types hparams as a MutableMapping; we read it by attribute

        @property
        def hparams(self) -> Hyperparameters: ...

    def __init__(
        self,
        model_name: str = "vit_small_patch16_224",
        num_registers: NonNegativeInt = 4,
        img_size: PositiveInt = 224,
        model_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        pretrained: bool = False,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.05,
        warmup_steps: NonNegativeInt = 100,
        min_lr_ratio: ClosedUnitInterval = 0.01,
        compile: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            model_name: timm ViT name; sizes in ``model_kwargs`` override its defaults.
            num_registers: register tokens R (0/1/2/4/8/16 in the paper).
            img_size: input side in pixels; linked from ``data.img_size`` by the CLI.
            model_kwargs: extra timm arguments (patch_size, embed_dim, depth, num_heads, drop_path_rate...).
            checkpoint: local weights to start from (.safetensors/.pt/.pth/.ckpt, any register count).
            pretrained: start from timm's pretrained weights (needs the hub or a filled cache).
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay (none on tokens, position embedding, biases, norms).
            warmup_steps: linear warmup steps before the cosine decay.
            min_lr_ratio: final learning rate as a fraction of ``lr``.
            compile: ``torch.compile`` the backbones' transformer blocks (refused where it cannot run).
            grad_checkpointing: recompute each block's activations in the backward pass instead of
                keeping them (less memory, about a third more compute) in the backbones that train.
        """
        super().__init__()
        self.save_hyperparameters()
        make_hyperparameters_plain(self)
        if compile:
            require_compile()
        self.configure_models()
        self.configure_metrics()
        for backbone in self.backbones():
            if grad_checkpointing and any(param.requires_grad for param in backbone.parameters()):
                backbone.set_grad_checkpointing(True)
            if compile:
                compile_blocks(backbone)

    def configure_models(self) -> None:
        """Build the task's modules from ``self.hparams``; ``self.backbone`` is the model the run produces."""
        raise NotImplementedError

    def configure_metrics(self) -> None:
        """Build the task's torchmetrics (none by default)."""

    def backbones(self) -> list[Backbone]:
        """The timm ViTs the task holds (student and teacher alike): its direct submodules of either family."""
        return [module for module in self.children() if isinstance(module, (VisionTransformer, Eva))]

    def make_backbone(self, num_registers: int | None = None, *, weights: bool = True, **extra: Any) -> Backbone:
        """A backbone as the hyper-parameters describe it: ``num_registers`` (default the task's),
        the configured weights unless ``weights=False`` (random), ``extra`` timm arguments on top."""
        hp = self.hparams
        source = {"checkpoint": hp.checkpoint, "pretrained": hp.pretrained} if weights else {}
        registers = hp.num_registers if num_registers is None else num_registers
        sizes = {"img_size": hp.img_size, **(hp.model_kwargs or {}), **extra}
        return build_backbone(hp.model_name, registers, **source, **sizes)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (``regablate.tasks.optim``): by default no weight decay on
        tokens, position embedding, biases and norms."""
        return weight_decay_groups(self)

    def peak_lr(self) -> float:
        """The schedule's peak learning rate: ``lr``, unless the task scales it (called once the data is set up)."""
        return self.hparams.lr

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW over ``param_groups`` (frozen parameters left out), warmup then cosine per step."""
        hp = self.hparams
        total_steps = self.trainer.estimated_stepping_batches  # sets the training data up
        return adamw_warmup_cosine(
            self,
            lr=self.peak_lr(),
            weight_decay=hp.weight_decay,
            weight_decay_end=hp.get("weight_decay_end"),
            warmup_steps=hp.warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=hp.min_lr_ratio,
            groups=self.param_groups(),
        )
