"""Register interventions against the plain extraction of the same model, on the same batches.

Each side runs ``ViTExtractor`` (final CLS/pooled, patch tokens, last-block keys) over the same
random batches; the intervened sides run it under ``--register_intervention KIND`` from block 0
(``mean``/``noise`` with statistics taken beforehand). Every repeat runs every side once, in a
shuffled order, and gives each intervened side its ratio to that repeat's plain run; the medians of
these paired ratios are printed (target: intervened / plain <= 1.03), by wall time and by the
process's CPU time (which a busy machine disturbs less: time spent waiting for a core is not
counted). The one extra pass ``mean``/``noise`` need, the statistics over the reference images, is
timed on its own against one plain extraction of as many images.

    python benchmarks/interventions.py [--model vit_small_patch16_224] [--img_size 112] [--registers 4]
        [--images 64] [--batch_size 32] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from regablate.models import build_backbone
from regablate.models.interventions import Intervention, register_statistics
from regablate.probe.features import ViTExtractor
from regablate.probe.intervened import IntervenedExtractor


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """Wall and CPU seconds of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img_size", type=int, default=112)
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_backbone(args.model, args.registers, img_size=args.img_size).eval()
    batches = list(torch.randn(args.images, 3, args.img_size, args.img_size).split(args.batch_size))
    stats_seconds = statistics.median(
        timed(lambda: register_statistics(model, batches, Intervention("mean")))[0] for _ in range(args.repeats)
    )
    stats = register_statistics(model, batches, Intervention("mean"))
    sides: dict[str, torch.nn.Module] = {"plain": ViTExtractor(model)}
    for kind in ("zero", "mean", "noise", "shuffle"):
        sides[kind] = IntervenedExtractor(model, Intervention(kind), stats if kind in ("mean", "noise") else None)
    sides["test_registers=R"] = IntervenedExtractor(model, Intervention(test_registers=args.registers))
    order = list(sides)
    shuffler = random.Random(0)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        shuffler.shuffle(order)
        for name in order:
            extractor = sides[name]
            times[name].append(timed(lambda extractor=extractor: [extractor(batch) for batch in batches]))
    plain = times["plain"]
    print(f"{args.model} img {args.img_size}, R={args.registers}, {args.images} images, {args.threads} thread(s)")
    print(
        f"plain extraction: {statistics.median(t[0] for t in plain):.3f} s wall, "
        f"{statistics.median(t[1] for t in plain):.3f} s CPU (medians of {args.repeats})"
    )
    print(f"{'':>18}  wall/plain  CPU/plain  (medians of the {args.repeats} paired ratios)")
    for name, values in times.items():
        if name != "plain":
            wall = statistics.median(v[0] / p[0] for v, p in zip(values, plain, strict=True))
            cpu = statistics.median(v[1] / p[1] for v, p in zip(values, plain, strict=True))
            print(f"{name:>18}: {wall:10.3f}  {cpu:9.3f}")
    median_plain = statistics.median(t[0] for t in plain)
    print(f"mean/noise statistics pass over the same images: {stats_seconds / median_plain:.3f} x one plain extraction")


if __name__ == "__main__":
    main()
