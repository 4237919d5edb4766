"""Inference throughput with a test-time register against without, side by side in one run.

The register adds one token to the sequence and, in each hooked block, a gather, a max and two
small in-place writes on the MLP hidden activations. Two copies of the same backbone (one with
the register) run the same batch under ``torch.inference_mode``, forward by forward in turns,
and the script prints median images/s, the ratio (with / without: the median over repeats and
that of the medians; target >= 0.97) and the ratio that the extra token's FLOPs alone predict.
The register neurons are ``--units`` per block in the first ``--hooked`` blocks (random weights
have no outliers to find them by, and the cost depends only on how many there are).

    python benchmarks/ttr_inference.py [--model vit_tiny_patch16_224] [--img_size 224] [--batch 16]
    python benchmarks/ttr_inference.py --model vit_tiny_patch16_224 --img_size 32 --batch 64 \\
        --model_kwargs '{"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}'
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from regablate.artifacts.register_neurons import (
    NeuronSearch,
    RegisterNeurons,
    add_test_time_register,
    blocks_fingerprint,
)
from regablate.models import build_backbone


def forward_seconds(model: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model.forward_features(images)
        return time.perf_counter() - start


def flops_per_image(model: torch.nn.Module, tokens: int) -> float:
    """Per block 24*T*D^2 (qkv, proj, MLP with ratio 4) + 4*T^2*D (attention)."""
    dim = model.embed_dim
    return len(model.blocks) * (24 * tokens * dim**2 + 4 * tokens**2 * dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--model_kwargs", type=json.loads, default={})
    parser.add_argument("--registers", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hooked", type=int, default=6, help="blocks holding register neurons")
    parser.add_argument("--units", type=int, default=2, help="register neurons per hooked block")
    args = parser.parse_args()

    torch.manual_seed(0)
    plain = build_backbone(args.model, args.registers, img_size=args.img_size, **args.model_kwargs).eval()
    hidden = plain.blocks[0].mlp.fc2.in_features
    units = tuple((block, (97 * block + 31 * i) % hidden) for block in range(args.hooked) for i in range(args.units))
    neurons = RegisterNeurons(
        units, (1.0,) * len(units), blocks_fingerprint(plain), NeuronSearch(top_k=len(units)), 0.0
    )
    with_register = add_test_time_register(copy.deepcopy(plain), neurons)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)

    variants = {"without": plain, "with": with_register}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for model in variants.values():  # warm-up
        forward_seconds(model, images)
    for _ in range(args.repeats):
        seconds = dict.fromkeys(variants, 0.0)
        for step in range(args.iters):  # forward by forward, in turns, so that load on a shared machine hits both
            for name in sorted(variants, reverse=step % 2 == 1):
                seconds[name] += forward_seconds(variants[name], images)
        for name in variants:
            rates[name].append(args.iters * len(images) / seconds[name])

    tokens = plain.num_prefix_tokens + plain.patch_embed.num_patches
    predicted = flops_per_image(plain, tokens) / flops_per_image(plain, tokens + 1)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"{args.model} img {args.img_size}, {tokens} tokens, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"{len(units)} register neurons in {args.hooked} blocks"
    )
    for name, values in rates.items():
        print(
            f"  {name:>7} test-time register: {median[name]:8.1f} img/s "
            f"(repeats: {', '.join(f'{v:.1f}' for v in values)})"
        )
    # Each repeat times both back to back, so the median of the per-repeat ratios resists a shared machine's drift.
    paired = statistics.median(w / wo for w, wo in zip(rates["with"], rates["without"]))
    print(
        f"  ratio with/without: {paired:.3f} median of repeats, {median['with'] / median['without']:.3f} of medians "
        f"(target >= 0.97; the extra token's FLOPs predict {predicted:.3f})"
    )


if __name__ == "__main__":
    main()
