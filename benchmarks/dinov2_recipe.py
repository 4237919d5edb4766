"""DINOv2's recipe in the DINO task: what iBOT + KoLeo + Sinkhorn-Knopp and the photometric views cost.

1. A training step (crops and views, teacher and student forwards, losses, backward, AdamW step) of
   the full recipe (iBOT with its own head, KoLeo, Sinkhorn-Knopp) against DINO alone (centring, no
   iBOT, no KoLeo) on the same crops, views and model. iBOT shares the two forwards and only the
   masked patches go through its head, so the ratio should stay <= 1.15.
2. The photometric views (``regablate.tasks.views``) on one batch's crops as a share of a training
   step of the full recipe: target <= 5 %.

Both at the size of ``configs/dino.yaml`` (the quickstart ViT: 32 px, patch 4, width 96, 4 blocks,
4 registers; 2 global + 4 local 16 px crops; batch 64). Sides alternate within each repeat; medians.

    python benchmarks/dinov2_recipe.py [--steps 10] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from regablate.tasks import DINO
from regablate.tasks.dino import random_crops

SIZES = {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}  # the quickstart model
BATCH = 64
HEADS = {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64}
FULL = {
    "centering": "sinkhorn_knopp",
    "ibot_separate_head": True,
    "ibot_out_dim": 1024,
    "ibot_hidden_dim": 256,
    "ibot_bottleneck_dim": 64,
}
DINO_ONLY = {"centering": "centering", "ibot_loss_weight": 0.0, "koleo_loss_weight": 0.0}


def make_task(recipe: dict) -> DINO:
    torch.manual_seed(0)
    common = {"model_name": "vit_tiny_patch16_224", "num_registers": 4, "img_size": 32, "model_kwargs": SIZES}
    return DINO(**common, **HEADS, num_local_crops=4, local_crop_size=16, drop_path_rate=0.1, **recipe).train()


def step_time(task: DINO, optimizer: torch.optim.Optimizer, images: torch.Tensor, step: int) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    out = task._shared_step(images, step, task.crop_generator(step))
    out["loss"].backward()
    optimizer.step()
    task.update_centers(out)
    return time.perf_counter() - start


def views_time(task: DINO, images: torch.Tensor, step: int) -> float:
    """The views alone, on the crops a step makes (the crops made before the clock starts)."""
    hp = task.hparams
    generator = task.crop_generator(step)
    global_crops = random_crops(images, 2, hp.img_size, hp.global_crop_scale, generator)
    local_crops = random_crops(images, hp.num_local_crops, hp.local_crop_size, hp.local_crop_scale, generator)
    start = time.perf_counter()
    task.views(global_crops, local_crops, task.mean, task.std, seed=step)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = torch.randn(BATCH, 3, 32, 32)
    tasks = {"full": make_task(FULL), "dino_only": make_task(DINO_ONLY)}
    optimizers = {name: torch.optim.AdamW(task.parameters(), lr=1e-4) for name, task in tasks.items()}
    times: dict[str, list[float]] = {"full": [], "dino_only": [], "views": []}
    for name, task in tasks.items():
        for step in range(args.warmup):
            step_time(task, optimizers[name], images, step)
    for repeat in range(args.repeats):
        for name, task in tasks.items():
            steps = [step_time(task, optimizers[name], images, 100 * repeat + s) for s in range(args.steps)]
            times[name].append(statistics.median(steps))
        views = [views_time(tasks["full"], images, 100 * repeat + s) for s in range(args.steps)]
        times["views"].append(statistics.median(views))
    full, dino_only, views = (statistics.median(times[k]) for k in ("full", "dino_only", "views"))
    print(f"threads: {torch.get_num_threads()}  batch: {BATCH}  steps: {args.steps} x {args.repeats} repeats (medians)")
    print(f"step, DINO alone (centring):                          {1000 * dino_only:7.1f} ms")
    print(f"step, full recipe (iBOT + KoLeo + Sinkhorn-Knopp):    {1000 * full:7.1f} ms")
    print(f"full / DINO alone: {full / dino_only:.3f}  (target <= 1.15)")
    print(f"photometric views of one batch's crops:               {1000 * views:7.1f} ms")
    print(f"views / full step: {views / full:.1%}  (target <= 5 %)")


if __name__ == "__main__":
    main()
