"""Continued-pretraining tasks: Lightning step throughput against a plain loop, and the cost of registers.

Part 1: Distillation and DINO trained through ``Trainer.fit`` (logging on, checkpoints and
validation off) against a hand-written loop calling the same loss, backward, AdamW and
schedule (and the EMA update for DINO) on the same batches. Repeats alternate the two sides.

Part 2: fwd+bwd throughput of the quickstart Classification model for R in {0,1,2,4,8,16}
registers against the FLOPs prediction: per block 24*T*D^2 (qkv, proj, MLP) + 4*T^2*D
(attention) for T = 1 + R + N tokens, plus the patch embedding. Registers should cost their
tokens and nothing more, so time(R)/time(0) should equal flops(R)/flops(0).

    python benchmarks/task_throughput.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning import LightningModule, Trainer
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_throughput import StepTimer

from regablate.data import SyntheticScenes
from regablate.models import build_backbone
from regablate.tasks import DINO, Classification, Distillation
from regablate.tasks.dino import ema_update

SIZES = {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}  # the quickstart model
BATCH = 64


def make_task(name: str, source: Path) -> LightningModule:
    common = {"model_name": "vit_tiny_patch16_224", "num_registers": 4, "img_size": 32, "model_kwargs": SIZES}
    if name == "distillation":
        return Distillation(**common, checkpoint=str(source), num_views=4, trainable="all")
    return DINO(**common, out_dim=1024, hidden_dim=256, bottleneck_dim=64, num_local_crops=4, local_crop_size=16)


def data() -> SyntheticScenes:
    return SyntheticScenes(img_size=32, train_size=20000, val_size=64, batch_size=BATCH)


def plain_loop(name: str, source: Path, steps: int, warmup: int) -> float:
    """Images per second of a hand-written loop doing the task's computation."""
    torch.manual_seed(0)
    task = make_task(name, source)
    dm = data()
    dm.setup("fit")
    task.train()
    trainable = (
        task.backbone
        if name == "distillation"
        else torch.nn.ModuleDict({"student": task.student, "head": task.student_head})
    )
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loader = iter(dm.train_dataloader())
    start = 0.0
    for step in range(steps):
        images = next(loader)["image"]
        optimizer.zero_grad(set_to_none=True)
        if name == "distillation":
            loss = task._losses(images)["loss"]
        else:
            out = task._shared_step(images, step, task.crop_generator(step))
            loss = out["loss"]
            task.update_centers(out)
        loss.backward()
        optimizer.step()
        schedule.step()
        if name == "dino":
            ema_update(task.backbone, task.student, 0.996)
            ema_update(task.teacher_head, task.student_head, 0.996)
        if step + 1 == warmup:
            start = time.perf_counter()
    return (steps - warmup) * BATCH / (time.perf_counter() - start)


def lightning_fit(name: str, source: Path, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    timer = StepTimer(warmup)
    trainer = Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(make_task(name, source), data())
    return (steps - warmup) * BATCH / (timer.end - timer.start)


def predicted_flops(registers: int, num_patches: int = 64, dim: int = 96, depth: int = 4) -> float:
    tokens = 1 + registers + num_patches
    per_block = 24 * tokens * dim**2 + 4 * tokens**2 * dim
    patch_embed = 2 * num_patches * (3 * SIZES["patch_size"] ** 2) * dim
    return depth * per_block + patch_embed


def register_cost(repeats: int, steps: int) -> None:
    images = torch.randn(BATCH, 3, 32, 32)
    labels = torch.randint(0, 10, (BATCH,))
    counts = (0, 1, 2, 4, 8, 16)
    models = {
        r: Classification(model_name="vit_tiny_patch16_224", num_registers=r, img_size=32, model_kwargs=SIZES)
        for r in counts
    }
    times: dict[int, list[float]] = {r: [] for r in counts}
    for _ in range(repeats):
        for r in counts:  # interleaved, so noise hits every R alike
            model = models[r]
            for i in range(steps + 3):
                if i == 3:
                    start = time.perf_counter()
                model.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(images), labels).backward()
            times[r].append((time.perf_counter() - start) / steps)
    base = statistics.median(times[0])
    print("\nregisters  ms/step  time ratio  FLOPs ratio  measured/predicted")
    for r in counts:
        t = statistics.median(times[r])
        predicted = predicted_flops(r) / predicted_flops(0)
        print(f"{r:9d}  {1000 * t:7.1f}  {t / base:10.3f}  {predicted:11.3f}  {t / base / predicted:18.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = Path(tempfile.mkdtemp()) / "source.safetensors"
    save_file(build_backbone("vit_tiny_patch16_224", 0, img_size=32, **SIZES).state_dict(), source)
    print(f"threads: {torch.get_num_threads()}  batch: {BATCH}  steps: {args.steps} (first {args.warmup} untimed)")
    for name in ("distillation", "dino"):
        plain, fit = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(name, source, args.steps, args.warmup))
            fit.append(lightning_fit(name, source, args.steps, args.warmup))
        p, f = statistics.median(plain), statistics.median(fit)
        print(f"{name:13s} plain {p:7.1f} img/s  fit {f:7.1f} img/s  fit/plain {f / p:.3f}  (target >= 0.95)")
    register_cost(args.repeats, steps=10)


if __name__ == "__main__":
    main()
