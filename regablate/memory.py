"""The memory model: the estimated peak GPU memory of one device of a training run, before it runs.

``estimate(config)`` reads a run's resolved config (the dict LightningCLI resolves: the task,
its backbone sizes, crops, the batch per device, the precision, the strategy and the switches
``model.init_args.compile`` and ``model.init_args.grad_checkpointing``) and adds up what the
allocator holds at the peak of a training step:

- parameters, gradients and AdamW's two moments of the model the optimiser trains (fp32 master
  weights under mixed precision), DDP's gradient buckets on more than one device;
- the frozen parts: DINO's EMA teacher (and its outputs, which the loss keeps), or a frozen backbone;
- autocast's low-precision copies of the weights, which it caches for the step;
- the activations autograd saves for the backward pass, counted from the ViT's shapes: per block
  and token, what each op saves (the LayerNorm inputs in fp32, the qkv, attention and MLP inputs
  in the compute dtype, the N x N attention probabilities when attention is not fused; a block's
  input alone under gradient checkpointing, plus one block recomputed during the backward pass),
  for every crop the student sees; and the heads' activations and logits of DINO and iBOT.

The figure is of tensors (what ``torch.cuda.max_memory_allocated`` reports), not of the CUDA
context or allocator fragmentation. ``compile`` is estimated as eager: inductor's fusions save
fewer intermediates, so the eager figure is an upper bound. The activation part is checked
against the allocator's measured peak on CPU (tests/test_memory.py; ``benchmarks/memory_model.py``).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from regablate.errors import RegablateError
from regablate.models.layout import Backbone

GIB = 2**30
# Lightning precision -> (bytes of a weight, bytes of an autocast compute tensor, bytes of the residual stream).
PRECISIONS: dict[str, tuple[int, int, int]] = {
    "32-true": (4, 4, 4),
    "32": (4, 4, 4),
    "bf16-mixed": (4, 2, 4),
    "16-mixed": (4, 2, 4),
    "bf16-true": (2, 2, 2),
    "16-true": (2, 2, 2),
}
# Adam's exp_avg and exp_avg_sq, each the size of its parameter.
ADAM_MOMENTS = 2
# The task switches that change no shape, left out of the shape-only build.
SWITCHES = ("compile", "grad_checkpointing")
# The sizes ``activation_check`` is run at (model, img_size, batch, model_kwargs): a tiny and a small ViT.
CHECK_SIZES: dict[str, tuple[str, int, int, dict[str, Any]]] = {
    "tiny": ("vit_tiny_patch16_224", 64, 8, {"depth": 4}),
    "small": ("vit_small_patch14_dinov2", 112, 4, {"depth": 6}),
}


@dataclass(frozen=True)
class VitShape:
    """What the activation estimate needs of a ViT: its sizes, read off a built model."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    patch_size: int
    prefix_tokens: int  # CLS and registers
    fused_attn: bool
    layer_scale: bool

    @classmethod
    def of(cls, model: Backbone) -> VitShape:
        block: Any = model.blocks[0]
        mlp = block.mlp
        hidden = mlp.fc1.out_features if hasattr(mlp, "fc1") else 4 * model.embed_dim
        return cls(
            embed_dim=model.embed_dim,
            depth=len(cast(nn.Sequential, model.blocks)),
            num_heads=block.attn.num_heads,
            mlp_hidden=hidden,
            patch_size=cast(Any, model.patch_embed).patch_size[0],
            prefix_tokens=model.num_prefix_tokens,
            fused_attn=bool(getattr(block.attn, "fused_attn", False)),
            layer_scale=not isinstance(block.ls1, nn.Identity),
        )

    def tokens(self, img_size: int) -> int:
        """Tokens of one image of side ``img_size``: its patches, the CLS token and the registers."""
        return (img_size // self.patch_size) ** 2 + self.prefix_tokens

    def block_bytes(self, tokens: int, compute: int, residual: int) -> int:
        """Bytes one block saves for the backward pass, per image of ``tokens`` tokens."""
        width, hidden, heads = self.embed_dim, self.mlp_hidden, self.num_heads
        per_token = 2 * residual * width  # the two LayerNorms' inputs (the residual stream)
        per_token += compute * width  # qkv's input (the first norm's output in the compute dtype)
        per_token += 3 * compute * width  # q, k, v (saved by the attention)
        per_token += 2 * compute * width  # the attention's output, and proj's input (its reshaped copy)
        per_token += compute * width  # fc1's input
        per_token += 2 * compute * hidden  # GELU's input, fc2's input
        if self.layer_scale:
            per_token += 2 * compute * width  # the LayerScales' inputs
        per_token_attention = 4 * heads  # fused: the log-sum-exp per head
        if not self.fused_attn:
            # the scaled q, then softmax's fp32 output (N per head) and its compute-dtype copy for attn @ v
            per_token_attention = compute * width + (4 + (compute if compute != 4 else 0)) * heads * tokens
        return tokens * (per_token + per_token_attention)

    def forward_bytes(self, tokens: int, compute: int, residual: int, checkpointing: bool) -> int:
        """Bytes saved by one forward pass of the whole ViT on one image (the final norm included)."""
        block = self.block_bytes(tokens, compute, residual)
        final_norm = 2 * residual * self.embed_dim * tokens  # its input, and the features it returns
        patch_embed = compute * 3 * self.patch_size**2 * (tokens - self.prefix_tokens)
        in_flight = compute * self.mlp_hidden * tokens  # the backward pass's widest gradient, beside what is saved
        if checkpointing:  # each block keeps its input; one block is recomputed at a time
            blocks = self.depth * residual * self.embed_dim * tokens + block
        else:
            blocks = self.depth * block
        return blocks + final_norm + patch_embed + in_flight


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of the peak, in bytes, and what they are of."""

    title: str
    parts: dict[str, int]  # name -> bytes, in print order
    activations_other: tuple[str, int]  # (name of the other checkpointing mode, its activation bytes)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        width = max(len(name) for name in self.parts)
        rows = [f"memory: {self.title}"]
        rows += [f"memory:   {name:<{width}}  {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        rows.append(f"memory:   {'total':<{width}}  {self.total / GIB:8.2f} GiB per device")
        other, value = self.activations_other
        rows.append(f"memory:   (activations {other}: {value / GIB:.2f} GiB)")
        return rows


def estimate(config: dict[str, Any]) -> MemoryEstimate:
    """The peak training memory of one device for the resolved run ``config`` (see the module docstring)."""
    model = config.get("model") or {}
    init = dict(model.get("init_args") or {})
    class_path = model.get("class_path", "")
    data = (config.get("data") or {}).get("init_args") or {}
    trainer = config.get("trainer") or {}
    precision = str(trainer.get("precision") or "32-true")
    if precision not in PRECISIONS:
        raise RegablateError(f"the memory model knows precisions {', '.join(PRECISIONS)}, not {precision!r}")
    weight, compute, residual = PRECISIONS[precision]
    batch = int(data.get("batch_size") or 1)
    checkpointing = bool(init.get("grad_checkpointing", False))
    compiled = bool(init.get("compile", False))
    shape, trainable, frozen = task_sizes(class_path, json.dumps(init, sort_keys=True, default=str))
    img_size = int(init.get("img_size") or data.get("img_size") or 224)
    crops = [(img_size, batch)]
    dino = class_path.endswith(".DINO")
    if dino:  # the student sees 2 global crops and the local ones of each image
        crops = [
            (img_size, 2 * batch),
            (int(init.get("local_crop_size", 96)), int(init.get("num_local_crops", 8)) * batch),
        ]
    crops = [(size, count) for size, count in crops if count > 0]

    def activations(checkpoint: bool) -> int:
        return sum(
            count * shape.forward_bytes(shape.tokens(size), compute, residual, checkpoint) for size, count in crops
        )

    parts = {
        "parameters (trained)": trainable * weight,
        "gradients": trainable * weight,
        "AdamW state": ADAM_MOMENTS * trainable * 4,
    }
    world = _world_size(trainer)
    if world > 1 and "ddp" in str(trainer.get("strategy") or ""):
        parts["DDP gradient buckets"] = trainable * weight
    teacher = frozen * weight
    if dino:
        teacher += dino_teacher_outputs(init, shape, batch, compute)
        parts["teacher (EMA, and its outputs)"] = teacher
    elif frozen:
        parts["frozen parameters"] = teacher
    if compute < weight:  # autocast caches the casts of the weights that train (the frozen ones are cast per use)
        parts["autocast weight copies"] = trainable * compute
    mode = "with" if checkpointing else "without"
    parts[f"activations ({mode} grad checkpointing)"] = activations(checkpointing)
    if dino:
        parts["activations of the heads and losses"] = dino_head_activations(init, shape, batch, compute)
    other = "without" if checkpointing else "with"
    sizes = ", ".join(f"{count} x {size} px" for size, count in crops)
    title = (
        f"{class_path.rsplit('.', 1)[-1]} {init.get('model_name')} (width {shape.embed_dim}, depth {shape.depth}, "
        f"{shape.num_heads} heads, {'fused' if shape.fused_attn else 'unfused'} attention), {sizes} per device, "
        f"{precision}, grad_checkpointing {str(checkpointing).lower()}, compile {str(compiled).lower()}"
        + (" (estimated as eager: an upper bound)" if compiled else "")
    )
    return MemoryEstimate(title, parts, (f"{other} grad checkpointing", activations(not checkpointing)))


def masked_patches(init: dict[str, Any], patches: int, batch: int) -> int:
    """The expected masked patches of a device's ``2 * batch`` global crops (``regablate.tasks.masking``)."""
    if float(init.get("ibot_loss_weight", 1.0)) <= 0:
        return 0
    low, high = init.get("mask_ratio_min_max", (0.1, 0.5))
    return int(2 * batch * float(init.get("mask_sample_probability", 0.5)) * (low + high) / 2 * patches)


def _head_dims(init: dict[str, Any]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    dino = (int(init.get("out_dim", 65536)), int(init.get("hidden_dim", 2048)), int(init.get("bottleneck_dim", 256)))
    if not init.get("ibot_separate_head", False):
        return dino, dino
    ibot = (
        int(init.get("ibot_out_dim", 65536)),
        int(init.get("ibot_hidden_dim", 2048)),
        int(init.get("ibot_bottleneck_dim", 256)),
    )
    return dino, ibot


def dino_teacher_outputs(init: dict[str, Any], shape: VitShape, batch: int, compute: int) -> int:
    """The teacher's logits (compute dtype) and target probabilities (fp32) that the step keeps for the loss."""
    (out_dim, _, _), (ibot_dim, _, _) = _head_dims(init)
    img_size = int(init.get("img_size") or 224)
    patches = masked_patches(init, (img_size // shape.patch_size) ** 2, batch)
    return 2 * batch * out_dim * (compute + 4) + patches * ibot_dim * (compute + 4)


def dino_head_activations(init: dict[str, Any], shape: VitShape, batch: int, compute: int) -> int:
    """What the student's heads save: the MLP's inputs per row, and per prototype its logit, the fp32
    copy and the log-softmax the loss keeps (one row per crop's CLS token, one per masked patch)."""
    (out_dim, hidden, bottleneck), (ibot_dim, ibot_hidden, ibot_bottleneck) = _head_dims(init)
    img_size = int(init.get("img_size") or 224)
    cls_rows = (2 + int(init.get("num_local_crops", 8))) * batch
    patch_rows = masked_patches(init, (img_size // shape.patch_size) ** 2, batch)

    def per_row(width: int, bottle: int, prototypes: int) -> int:
        return compute * (shape.embed_dim + 4 * width + 2 * bottle) + (compute + 8) * prototypes

    return cls_rows * per_row(hidden, bottleneck, out_dim) + patch_rows * per_row(
        ibot_hidden, ibot_bottleneck, ibot_dim
    )


def _world_size(trainer: dict[str, Any]) -> int:
    devices = trainer.get("devices", 1)
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices) if str(devices).isdigit() else 1
    return count * int(trainer.get("num_nodes") or 1)


@functools.cache
def task_sizes(class_path: str, init_json: str) -> tuple[VitShape, int, int]:
    """(the student's shape, trained parameters, frozen parameters) of a task (cached: a grid's runs share them)."""
    task = build_on_meta(class_path, json.loads(init_json))
    shape = VitShape.of(cast(Backbone, getattr(task, "student", None) or task.backbone))
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return shape, trainable, sum(p.numel() for p in task.parameters() if not p.requires_grad)


def build_on_meta(class_path: str, init: dict[str, Any]) -> nn.Module:
    """The task of ``class_path`` built on the meta device: its shapes, no memory, every backbone without weights."""
    from regablate.tasks.base import BackboneTask

    module_name, _, name = class_path.rpartition(".")
    try:
        task_class = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise RegablateError(f"the memory model cannot import the task {class_path!r}") from None
    if not (isinstance(task_class, type) and issubclass(task_class, BackboneTask)):
        raise RegablateError(f"the memory model knows regablate's tasks (a BackboneTask), not {class_path}")

    class ShapeOnly(task_class):  # type: ignore[valid-type,misc]
        def make_backbone(self, num_registers: int | None = None, *, weights: bool = True, **extra: Any) -> Backbone:
            return super().make_backbone(num_registers, weights=False, **extra)

    with torch.device("meta"):
        return ShapeOnly(**{key: value for key, value in init.items() if key not in SWITCHES})


def measured_peak(step: Callable[[], object]) -> int:
    """The CPU allocator's peak over ``step()``, in bytes above what was allocated before it.

    Read off ``torch.profiler``'s allocation events (``profile_memory=True``), summed in time order.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    sizes: list[tuple[int, int]] = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        nodes.extend(node.children)
    current = peak = 0
    for _, size in sorted(sizes):
        current += size
        peak = max(peak, current)
    return peak


def activation_check(
    model_name: str,
    img_size: int,
    batch: int,
    precision: str = "32-true",
    checkpointing: bool = False,
    fused_attn: bool = True,
    **model_kwargs: Any,
) -> tuple[int, int]:
    """(estimated, measured) bytes of a training step's activations for a random ViT on the CPU.

    The step is a forward pass of ``batch`` images, a loss on the features and the backward pass,
    after one step so that the gradients exist (as in every step after the first). Measured: the
    allocator's peak over a step above what it held before (``measured_peak``), the second of two,
    on one thread.
    Estimated: ``VitShape.forward_bytes``, plus autocast's weight copies under bf16-mixed (the
    measurement holds them too).
    """
    from regablate.models.backbone import build_backbone

    weight, compute, residual = PRECISIONS[precision]
    torch.manual_seed(0)
    model = build_backbone(model_name, 4, img_size=img_size, **model_kwargs).train()
    for block in cast(Any, model.blocks):
        block.attn.fused_attn = fused_attn
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(batch, 3, img_size, img_size)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute < weight):
            features = model.forward_features(images)
        features.float().pow(2).mean().backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU attention kernel's scratch grows with its threads; a GPU has none of it
    try:
        step()
        measured_peak(step)  # the first profiled step also holds one-time allocations
        measured = measured_peak(step)
    finally:
        torch.set_num_threads(threads)
    shape = VitShape.of(model)
    estimated = batch * shape.forward_bytes(shape.tokens(img_size), compute, residual, checkpointing)
    if compute < weight:
        estimated += compute * sum(p.numel() for p in model.parameters())
    return estimated, measured
