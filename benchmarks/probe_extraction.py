"""The probe's feature extraction against a plain ``forward_features`` loop on the same device.

Both sides run the same backbone on the same pre-rendered batches of synthetic scenes (pinned
in host memory on a GPU, so neither side waits on rendering), under the same autocast:

* ``plain``: ``model.forward_features(images.to(device, non_blocking=True))`` for every batch;
* ``extract (cls)``: ``extract_split`` keeping what a classification probe keeps (CLS, mean
  patch, label), into real feature-store files;
* ``extract (all)``: keeping what every probe keeps (patch tokens, keys, masks, depth, boxes too).

Repeats alternate the sides; the ratios are of median throughputs (target: extraction / plain
>= 0.95). ``scripts/gpu_check.sh`` runs it on a GPU with ViT-L/14.

    python benchmarks/probe_extraction.py [--model vit_small_patch14_dinov2] [--img_size 224] [--images 256]
        [--batch_size 64] [--repeats 5] [--accelerator cpu|gpu] [--precision auto] [--model_kwargs JSON]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from regablate.data import SyntheticScenes
from regablate.models import build_backbone
from regablate.probe import LinearProbe, ProbeDevice, ViTExtractor, plan_probe
from regablate.probe.cache import FeatureCache
from regablate.probe.features import extract_split

KEEPS = {"cls": ["cls"], "all": ["cls", "seg", "depth", "lost"]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model_name: str,
    img_size: int,
    images: int,
    batch_size: int,
    repeats: int,
    where: ProbeDevice,
    model_kwargs: dict | None = None,
    workers: int = 0,
    report: Callable[[str], None] = print,
) -> dict[str, float]:
    """Median images/s of the plain loop and of both extractions, and the ratios; printed as it goes."""
    torch.manual_seed(0)
    model = build_backbone(model_name, 4, img_size=img_size, **(model_kwargs or {})).eval().to(where.device)
    extractor = ViTExtractor(model)
    data = SyntheticScenes(img_size=img_size, train_size=images, val_size=1, test_size=images, batch_size=batch_size)
    loader = DataLoader(data.dataset("test"), batch_size=batch_size, num_workers=workers, pin_memory=where.pin_memory)
    batches = list(loader)

    def plain() -> None:
        with torch.inference_mode(), where.autocast():
            for batch in batches:
                model.forward_features(batch["image"].to(where.device, non_blocking=True))
        synchronize(where.device)

    def extraction(keep: str) -> Callable[[], None]:
        with tempfile.TemporaryDirectory() as folder:  # the fields the probe keeps (planned once, untimed)
            cache = FeatureCache(folder, "bench", {}, where.resolved_precision)
            fields = (
                plan_probe(extractor, data, LinearProbe(probes=KEEPS[keep]), cache, where=where).splits["test"].specs
            )

        def run() -> None:
            with tempfile.TemporaryDirectory() as folder:
                cache = FeatureCache(folder, "bench", {}, where.resolved_precision)
                cache.allocate("test", images, fields)
                writers = cache.writers("test", images, fields)
                extract_split(extractor, batches, writers, 0, where)
                synchronize(where.device)

        return run

    sides = {"plain": plain, "extract (cls)": extraction("cls"), "extract (all)": extraction("all")}
    for side in sides.values():  # warm-up: kernels, allocator, page cache
        side()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            start = time.perf_counter()
            side()
            rates[name].append(images / (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        report(f"{name:<14}: {medians[name]:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in values)})")
    ratios = {f"{name} / plain": medians[name] / medians["plain"] for name in ("extract (cls)", "extract (all)")}
    for name, ratio in ratios.items():
        paired = statistics.median(e / p for e, p in zip(rates[name.split(" / ")[0]], rates["plain"]))
        report(f"{name}: {ratio:.3f}  (target >= 0.95; median of the repeats' own ratios {paired:.3f})")
    return {**medians, **ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--model_kwargs", type=json.loads, default={}, help="timm sizes as JSON")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="loader workers that render the batches once")
    args = parser.parse_args()
    where = ProbeDevice(accelerator=args.accelerator, devices=1, precision=args.precision)
    print(
        f"{args.model} {args.model_kwargs} at {args.img_size} px, 4 registers, random weights; {args.images} images "
        f"in batches of {args.batch_size}; {where.describe()}; threads: {torch.get_num_threads()}"
    )
    measure(
        args.model, args.img_size, args.images, args.batch_size, args.repeats, where, args.model_kwargs, args.workers
    )


if __name__ == "__main__":
    main()
