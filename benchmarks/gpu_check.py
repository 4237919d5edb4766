"""The GPU check's measurements: the paper's DINO step on one device, then the probe's extraction.

1. ``DINO`` as ``configs/fig8/paper_run.yaml`` trains it (DINOv2's recipe: DINO + iBOT + KoLeo):
   ViT-L/14 at 224 px with 4 registers, 2 global 224 px and 8 local 98 px crops, the prototypes of
   paper_run.yaml, bf16-mixed, batch 64, gradient
   clipping; random weights (the GPU machine has no network) on synthetic scenes at 224 px,
   rendered once before the clock starts. Through ``Trainer.fit``: ``--warmup`` untimed steps (the
   first two a head warm-up with the backbone frozen), then ``--steps`` timed steps. Figures:
   images/s, peak GPU memory, and model FLOP utilisation: the FLOPs of one training step counted
   by torch's ``FlopCounterMode`` (attention on its matmul path, so that it is counted; the timed
   steps use fused attention) over the time of a step, against ``--peak_tflops`` (989: the H200
   SXM's dense bf16 peak, NVIDIA H200 datasheet). The achievable matmul rate is measured here too
   (square bf16 matmuls, ``matmul_peak``) and printed beside it; MFU uses the datasheet figure.
2. The probe's extraction of the same backbone against a plain ``forward_features`` loop
   (``benchmarks/probe_extraction.py``).

One line per figure, each starting ``gpu_check:``. ``scripts/gpu_check.sh`` runs this on a GPU
machine; ``--device cpu --tiny`` is the CPU smoke test of the same code (tests/test_probe_gpu_check.py).

    python benchmarks/gpu_check.py [--steps 30] [--warmup 5] [--batch_size 64] [--probe_images 2048]
    python benchmarks/gpu_check.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from lightning import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_extraction import measure

from regablate.data import SyntheticScenes
from regablate.memory import estimate
from regablate.probe import ProbeDevice
from regablate.tasks import DINO

PAPER_RUN = Path(__file__).resolve().parents[1] / "configs" / "fig8" / "paper_run.yaml"
TINY = {
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "out_dim": 64,
    "hidden_dim": 64,
    "bottleneck_dim": 16,
    "num_local_crops": 2,
    "local_crop_size": 16,
    "ibot_out_dim": 64,
    "ibot_hidden_dim": 64,
    "ibot_bottleneck_dim": 16,
}


def line(text: str) -> None:
    print(f"gpu_check: {text}", flush=True)


class RenderedScenes(LightningDataModule):
    """A few batches of synthetic scenes rendered once, served in a loop (the data cost nothing while timed)."""

    def __init__(self, img_size: int, batch_size: int, batches: int, workers: int, pin_memory: bool) -> None:
        super().__init__()
        scenes = SyntheticScenes(img_size=img_size, train_size=batch_size * batches, batch_size=batch_size)
        loader = DataLoader(scenes.dataset("train"), batch_size=batch_size, num_workers=workers)
        self.samples = [{"image": image} for batch in loader for image in batch["image"]]
        self.batch_size, self.pin_memory = batch_size, pin_memory

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size, pin_memory=self.pin_memory, drop_last=True)


class StepClock(Callback):
    """Wall time and peak device memory from the end of step ``warmup`` to the end of step ``last``."""

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last = warmup, last
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (self.warmup, self.last):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            if trainer.global_step == self.warmup:
                if pl_module.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(pl_module.device)
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()


def paper_recipe(tiny: bool) -> dict:
    """The DINO arguments of paper_run.yaml, random weights, a 2-step head warm-up (or the tiny sizes)."""
    recipe = dict(yaml.safe_load(PAPER_RUN.read_text())["model"]["init_args"])
    recipe.update({"pretrained": False, "head_warmup_steps": 2, "img_size": 224})
    recipe.update({"compile": False, "grad_checkpointing": False})  # the eager step, as the check has timed it
    return {**recipe, **TINY} if tiny else recipe


def step_flops(task: DINO, images: torch.Tensor, precision: str) -> float:
    """FLOPs of one training step (forward and backward) on ``images``, attention on its counted matmul path."""
    attention = [m for m in task.modules() if hasattr(m, "fused_attn")]
    fused = [m.fused_attn for m in attention]
    for module in attention:
        module.fused_attn = False
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    try:
        task.train()
        with (
            FlopCounterMode(display=False) as counter,
            torch.autocast(images.device.type, dtype=dtype, enabled=precision != "32-true"),
        ):
            out = task._shared_step(images, 10**6, torch.Generator().manual_seed(0))
            out["loss"].backward()
    finally:
        for module, value in zip(attention, fused):
            module.fused_attn = value
        task.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, size: int, repeats: int) -> float:
    """The achievable dense matmul rate in FLOP/s: ``repeats`` square ``size`` matmuls, bf16 on a GPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


# The training-step variants: name -> the task's switches they set (eager with everything off first).
VARIANTS = {
    "eager": {},
    "eager+ckpt": {"grad_checkpointing": True},
    "compiled": {"compile": True},
    "compiled+ckpt": {"compile": True, "grad_checkpointing": True},
}


def estimated_peak(recipe: dict, batch_size: int, precision: str) -> float:
    """The memory model's peak for this step (regablate.memory), in bytes."""
    config = {
        "model": {"class_path": "regablate.tasks.DINO", "init_args": recipe},
        "data": {"init_args": {"batch_size": batch_size}},
        "trainer": {"precision": precision, "devices": 1},
    }
    return float(estimate(config).total)


def dino_variant(
    args: argparse.Namespace, where: ProbeDevice, variant: str, data: RenderedScenes
) -> tuple[DINO, float]:
    """Train ``--warmup`` + ``--steps`` steps of one variant; print its rate and memory; (the task, its images/s)."""
    recipe = {**paper_recipe(args.tiny), **VARIANTS[variant]}
    torch.manual_seed(0)
    task = DINO(**recipe)
    last = args.warmup + args.steps
    clock = StepClock(args.warmup, last)
    trainer = Trainer(
        accelerator="cuda" if where.device.type == "cuda" else "cpu",
        devices=1,
        precision=where.resolved_precision,
        max_steps=last,
        gradient_clip_val=3.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(task, data)
    seconds = clock.end - clock.start
    rate = args.steps * args.batch_size / seconds
    name = f"{recipe['model_name']} r{recipe['num_registers']} {recipe['img_size']} px"
    crops = f"2x{recipe['img_size']} + {recipe['num_local_crops']}x{recipe['local_crop_size']} px crops"
    tag = f"dino[{variant}]"
    line(f"{tag} {name}, {crops}, batch {args.batch_size}, {where.resolved_precision}: {rate:.1f} images/s")
    line(f"{tag} step time: {seconds / args.steps * 1000:.0f} ms ({args.steps} timed steps after {args.warmup})")
    estimated = estimated_peak(recipe, args.batch_size, where.resolved_precision) / 2**30
    if where.device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(where.device) / 2**30
        reserved = torch.cuda.max_memory_reserved(where.device) / 2**30
        line(
            f"{tag} peak GPU memory: {allocated:.1f} GiB allocated, {reserved:.1f} GiB reserved "
            f"(memory model: {estimated:.1f} GiB, {estimated / allocated:.2f}x)"
        )
    else:
        line(f"{tag} peak GPU memory: n/a on cpu (memory model: {estimated:.2f} GiB)")
    return task, rate


def dino_figures(args: argparse.Namespace, where: ProbeDevice) -> None:
    """The step figures of each variant, the FLOPs of one step, both peaks, and each variant's MFU."""
    size = 256 if args.tiny else 8192
    measured = matmul_peak(where.device, size, 3 if args.tiny else 50)
    line(f"matmul peak measured here: {measured / 1e12:.1f} TFLOP/s ({size}x{size} matmuls)")
    line(f"matmul peak from the datasheet: {args.peak_tflops:.0f} TFLOP/s (MFU uses this one)")
    recipe = paper_recipe(args.tiny)
    data = RenderedScenes(recipe["img_size"], args.batch_size, 4, args.workers, where.pin_memory)
    per_image = 0.0
    for variant in args.variants.split(","):
        task, rate = dino_variant(args, where, variant, data)
        if not per_image:  # the model's FLOPs, the same in every variant (a recomputed block is not model work)
            count = min(args.batch_size, 8)  # FLOPs grow linearly with the batch: count a few images, scale
            images = torch.stack([data.samples[i]["image"] for i in range(count)]).to(task.device)
            eager = DINO(**recipe).to(task.device)
            per_image = step_flops(eager, images, where.resolved_precision) / count
            line(f"dino FLOPs per image and step: {per_image / 1e9:.2f} GFLOP (FlopCounterMode, forward + backward)")
            del eager
        achieved = per_image * rate
        line(
            f"dino[{variant}] model FLOP utilisation: {achieved / (args.peak_tflops * 1e12):.1%} "
            f"({achieved / 1e12:.1f} of {args.peak_tflops:.0f} TFLOP/s datasheet peak; "
            f"{achieved / measured:.1%} of the measured matmul peak)"
        )
        del task
        if where.device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU smoke test")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8, help="loader workers that render the scenes once")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (H200 SXM datasheet: 989)")
    parser.add_argument("--probe_images", type=int, default=2048)
    parser.add_argument("--probe_repeats", type=int, default=3)
    parser.add_argument("--skip_dino", action="store_true")
    parser.add_argument("--skip_probe", action="store_true", help="no extraction figures")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated step variants: {', '.join(VARIANTS)}"
    )
    args = parser.parse_args()
    where = ProbeDevice(accelerator=args.device, devices=1, precision="bf16-mixed")
    device = torch.cuda.get_device_name(where.device) if where.device.type == "cuda" else "cpu"
    line(f"device: {device}, torch {torch.__version__}, {where.resolved_precision}")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    if not args.skip_dino:
        dino_figures(args, where)
    if args.skip_probe:
        return
    recipe = paper_recipe(args.tiny)
    model_kwargs = recipe.get("model_kwargs") or {}
    measure(
        recipe["model_name"],
        recipe["img_size"],
        args.probe_images,
        args.batch_size,
        args.probe_repeats,
        where,
        model_kwargs,
        workers=args.workers,
        report=lambda text: line(f"probe {text}"),
    )


if __name__ == "__main__":
    main()
