"""Peak memory of ``regablate probe`` per 1000 training images: a cls-only probe against an all-probes run.

Each configuration runs as its own ``regablate probe`` process (random weights of a ViT-S/14 shape:
width 384, 14 px patches, with ``--depth`` blocks, 2 by default, since what a probe keeps does not
depend on the depth; synthetic scenes) at two training-set sizes; the process reports its peak resident memory
(``ru_maxrss``: anonymous memory plus the feature-store pages it touched). The growth between the
two sizes, per 1000 training images, is what a split costs in memory:

* ``cls`` at 224 px (16x16 = 256 patches) and at 112 px (8x8 = 64 patches): it keeps CLS, the mean
  patch and the label only, so its figure must not grow with the number of patches;
* ``all`` at 224 px: patch tokens, masks and depth maps of the train split as well.

Printed side by side, with the bytes the feature store holds per training image (from probe.json).
Before this store, a cls-only probe of ``vit_tiny_patch16_224`` at 224 px peaked at 1.9 GB with 500
training images and 5.0 GB with 2500 (~1.5 MB per image; FACTS.md, 2026-12-01).

    python benchmarks/probe_memory.py [--sizes 512 2048] [--model vit_small_patch14_dinov2] [--depth 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {"cls @224 (256 patches)": (224, "[cls]"), "cls @112 (64 patches)": (112, "[cls]"), "all @224": (224, None)}


def child(args: list[str]) -> None:
    """Run one probe in this process and print its peak resident memory."""
    from regablate.cli import main as regablate

    regablate(["probe", *args])
    print(f"PEAK_RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")


def probe_peak(model: str, depth: int, img_size: int, probes: str | None, train: int, out: Path) -> tuple[int, int]:
    """Peak RSS (bytes) of one probe process, and the bytes its feature store holds per train image."""
    args = [
        "--model", model, "--depth", str(depth), "--pretrained", "false", "--num_registers", "4", "--output", str(out),
        "--data.img_size", str(img_size), "--data.train_size", str(train), "--data.val_size", "64",
        "--data.test_size", "64", "--data.batch_size", "64",
        "--probe.fast.cls_steps", "50", "--probe.fast.seg_steps", "50", "--probe.fast.depth_steps", "50",
    ]  # fmt: skip
    if probes is not None:
        args += ["--probe.probes", probes]
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"probe failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("PEAK_RSS")))
    train_split = json.loads((out / "probe.json").read_text())["features"]["train"]
    return peak, train_split["bytes"] // train_split["samples"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--depth", type=int, default=2, help="blocks (12 for ViT-S itself)")
    parser.add_argument("--sizes", type=int, nargs=2, default=[512, 2048], help="two training-set sizes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    small, large = args.sizes
    print(
        f"{args.model} with {args.depth} blocks, random weights, 4 registers; "
        f"train {small} and {large} images, val/test 64"
    )
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (img_size, probes) in CONFIGS.items():
            peaks = []
            for size in (small, large):
                out = Path(folder) / f"{name[:3]}{img_size}_{size}"
                peak, per_image = probe_peak(args.model, args.depth, img_size, probes, size, out)
                peaks.append(peak)
            rows[name] = (peaks, (peaks[1] - peaks[0]) / (large - small) * 1000, per_image)
    for name, (peaks, per_1000, per_image) in rows.items():
        print(
            f"{name:<22}: peak {peaks[0] / 1e6:7.0f} MB ({small} images), {peaks[1] / 1e6:7.0f} MB ({large}); "
            f"{per_1000 / 1e6:7.1f} MB per 1000 train images; store {per_image / 1e3:7.1f} kB per image"
        )
    cls_224, cls_112, everything = (rows[name][1] for name in CONFIGS)
    print(f"cls @224 / cls @112 per 1000 images: {cls_224 / 1e6:.1f} MB vs {cls_112 / 1e6:.1f} MB (must not grow)")
    print(f"all @224 / cls @224 per 1000 images: {everything / max(cls_224, 1e6):.0f}x (cls taken as >= 1 MB)")


if __name__ == "__main__":
    main()
