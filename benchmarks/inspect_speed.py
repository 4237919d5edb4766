"""The artifact scan of ``regablate inspect`` against one plain forward over the same images, side by side.

The scan (``regablate.artifacts.scan``) runs the backbone once with hooks: every block's pre-norm
residual stream kept, the last block's attention unfused to read its probabilities, the global
feature pooled, then the statistics of every block. The baseline is what any look at a model
costs at least: one ``forward_features`` over the same images under ``torch.inference_mode``.
Both run on the same batch in turns (so load on a shared machine hits both), and the script
prints the median seconds of each, the ratio scan / forward (the median of the per-repeat
ratios; target <= 1.5) and, to show where the rest goes, ``forward_intermediates`` of all blocks
alone against the same forward.

    python benchmarks/inspect_speed.py                       # ViT-S/16 (random weights), 64 images at 224 px
    python benchmarks/inspect_speed.py --model vit_base_patch16_siglip_224 --num_images 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from regablate.artifacts.scan import scan
from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD
from regablate.data.images import synthetic_images
from regablate.models import build_backbone


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--model_kwargs", type=json.loads, default={})
    parser.add_argument("--registers", type=int, default=0)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_backbone(args.model, args.registers, img_size=args.img_size, **args.model_kwargs).eval()
    size = (args.img_size, args.img_size)
    images, segmentation = synthetic_images(0, args.num_images, size, IMAGENET_MEAN, IMAGENET_STD)
    depth = len(model.blocks)

    def forward() -> None:
        with torch.inference_mode():
            model.forward_features(images)

    def intermediates() -> None:
        with torch.inference_mode():
            model.forward_intermediates(images, indices=list(range(depth)), norm=False, output_fmt="NLC")

    variants = {
        "forward": forward,
        "scan": lambda: scan(model, images, segmentation=segmentation),
        "intermediates": intermediates,
    }
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name in sorted(variants, reverse=repeat % 2 == 1):
            times[name].append(seconds(variants[name]))
    scan_ratio = statistics.median(s / f for s, f in zip(times["scan"], times["forward"]))
    capture_ratio = statistics.median(s / f for s, f in zip(times["intermediates"], times["forward"]))
    print(
        f"{args.model} ({args.registers} registers), {args.num_images} images at {args.img_size} px, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    for name, values in times.items():
        print(f"  {name:<13} median {statistics.median(values):.3f} s  ({', '.join(f'{v:.3f}' for v in values)})")
    print(f"scan / forward: {scan_ratio:.3f} (target <= 1.5)")
    print(f"forward_intermediates of all {depth} blocks / forward: {capture_ratio:.3f}")


if __name__ == "__main__":
    main()
