"""Images per second of the synthetic scenes: ``render_scene`` alone and the train loader.

The data must outpace training by a wide margin (a tiny ViT trains at ~460 img/s at 32 px
on this CPU), so both rates are printed, with the loader's overhead as a ratio.

    python benchmarks/synthetic_data_rate.py --img-size 32 --n 3000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from regablate.data import SyntheticScenes, render_scene


def median_rate(work: Callable[[], int], repeats: int) -> float:
    """Median images/s of ``work`` (which returns how many images it made) over ``repeats`` runs."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = work()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--n", type=int, default=3000, help="images per repeat")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    def render() -> int:
        for index in range(args.n):
            render_scene(0, "train", index, img_size=args.img_size)
        return args.n

    dm = SyntheticScenes(img_size=args.img_size, train_size=args.n, batch_size=args.batch_size, num_workers=0)

    def load() -> int:
        return sum(len(batch["label"]) for batch in dm.train_dataloader())

    render_rate = median_rate(render, args.repeats)
    load_rate = median_rate(load, args.repeats)
    print(f"img_size={args.img_size} n={args.n} batch_size={args.batch_size} repeats={args.repeats} (median)")
    print(f"render_scene:                 {render_rate:8.0f} img/s")
    print(f"train dataloader (0 workers): {load_rate:8.0f} img/s  ({load_rate / render_rate:.2f}x render)")


if __name__ == "__main__":
    main()
