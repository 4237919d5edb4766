"""The memory model's activation estimate against the CPU allocator's measured peak, both check sizes.

For a tiny and a small random ViT (``regablate.memory.CHECK_SIZES``), with and without gradient
checkpointing, in float32 and bf16 autocast, fused and unfused attention: the estimated bytes of a
training step's activations (``VitShape.forward_bytes``), the peak measured by ``torch.profiler``'s
allocation events over the same step, and their ratio (tests/test_memory.py holds the tiny size
within 25 %).

    python benchmarks/memory_model.py [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from regablate.memory import CHECK_SIZES, activation_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = itertools.product(CHECK_SIZES.items(), ("32-true", "bf16-mixed"), (True, False), (False, True))
    for (size, (model, img_size, batch, kwargs)), precision, fused, checkpointing in modes:
        estimated, measured = activation_check(model, img_size, batch, precision, checkpointing, fused, **kwargs)
        print(
            f"{size:5} {model} {img_size} px batch {batch} {precision:10} "
            f"{'fused' if fused else 'unfused':7} checkpointing {str(checkpointing).lower():5}: "
            f"estimated {estimated / 2**20:6.2f} MiB, measured {measured / 2**20:6.2f} MiB, "
            f"ratio {estimated / measured:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
