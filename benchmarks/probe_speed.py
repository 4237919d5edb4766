"""The whole frozen-feature probe against one feature-extraction pass, and against a naive probe.

On a backbone (default: timm's ViT-Ti/16 at 224 px, random weights) and SyntheticScenes splits,
measured in one run:

* ``extract``: one extraction pass over train, val and test (what any probe must pay once);
* ``probe``: ``run_probe`` without a cache: that pass plus every head (classification grid,
  segmentation, depth) and LOST. Target: at most 1.5x ``extract``;
* ``naive``: a probe that reruns the backbone for every head and every epoch of its training
  (no cache). Its heads and scores are the ones above (the features are deterministic), so its
  time is the probe's head time plus, per head, epochs x one measured train extraction pass.
  Target: the cached probe at least 10x faster.

Both targets are about heads that are cheap next to the backbone. On the 32 px quickstart model
(``--img_size 32 --model_kwargs '{"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}'``)
one extraction costs ~0.9 ms per image, 25x less than ViT-Ti/16 at 224 px, and the heads' fixed
step budget weighs accordingly more.

    python benchmarks/probe_speed.py [--model vit_tiny_patch16_224] [--img_size 224] [--model_kwargs JSON]
                                     [--train 1000] [--val 250] [--test 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from regablate.data import SyntheticScenes
from regablate.models import build_backbone
from regablate.probe import ProbeDevice, ViTExtractor, plan_probe
from regablate.probe.features import extract_split
from regablate.probe.plan import ProbePlan
from regablate.probe.protocol import LinearProbe
from regablate.probe.run import extract_missing, feature_store, run_probe


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def extraction_pass(extractor: ViTExtractor, data: SyntheticScenes, probe: LinearProbe, where: ProbeDevice) -> None:
    """Every split's fields extracted into a fresh feature store (what the probe pays once)."""
    with tempfile.TemporaryDirectory() as out:
        store = feature_store(extractor, out, {}, where.resolved_precision, use_cache=True)
        extract_missing(extractor, data, plan_probe(extractor, data, probe, store, where=where), where)


def train_pass(extractor: ViTExtractor, plan: ProbePlan, where: ProbeDevice) -> None:
    """The train split's fields extracted once (what a naive probe pays per head and epoch)."""
    train = plan.splits["train"]
    with tempfile.TemporaryDirectory() as out:
        store = feature_store(extractor, out, {}, where.resolved_precision, use_cache=True)
        store.allocate("train", train.num_samples, train.specs)
        writers = store.writers("train", train.num_samples, train.specs)
        extract_split(extractor, DataLoader(train.dataset, batch_size=128), writers, 0, where)
        for writer in writers.values():
            writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--model_kwargs", type=json.loads, default={}, help="timm sizes as JSON")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=250)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = build_backbone(args.model, 4, img_size=args.img_size, **args.model_kwargs)
    extractor = ViTExtractor(backbone)
    patch_size = tuple(backbone.patch_embed.patch_size)
    data = SyntheticScenes(
        img_size=args.img_size, train_size=args.train, val_size=args.val, test_size=args.test, batch_size=128
    )
    probe = LinearProbe()
    where = ProbeDevice(accelerator="cpu", devices=1, precision="32-true")
    with tempfile.TemporaryDirectory() as out:
        plan = plan_probe(extractor, data, probe, feature_store(extractor, out, {}, "32-true", True), where=where)

    extract, whole, train_passes = [], [], []
    report = None
    for _ in range(args.repeats):
        extract.append(timed(lambda: extraction_pass(extractor, data, probe, where)))
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            report = run_probe(
                extractor, data, probe, output_dir=out, patch_size=patch_size, data_config={}, use_cache=False
            )
            whole.append(time.perf_counter() - start)
        train_passes.append(timed(lambda: train_pass(extractor, plan, where)))
    e, p, t = statistics.median(extract), statistics.median(whole), statistics.median(train_passes)
    heads = p - e
    epochs = {
        head: math.ceil(steps * probe.batch_size / args.train)
        for head, steps in (("cls", probe.cls_steps), ("seg", probe.seg_steps), ("depth", probe.depth_steps))
    }
    naive = heads + sum(epochs.values()) * t + (e - t)  # + val/test extraction once
    scores = {
        k: round(v, 4)
        for k, v in report.metrics.items()
        if k in ("probe/cls_top1", "probe/seg_miou", "probe/depth_rmse", "probe/lost_corloc")
    }
    print(f"{args.model} {args.model_kwargs} at {args.img_size} px, random weights; threads: {torch.get_num_threads()}")
    print(f"splits: {args.train}/{args.val}/{args.test}  repeats: {args.repeats}  protocol: {probe}")
    print(f"extraction pass (all splits): {e:6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in extract)})")
    print(f"whole probe, no cache       : {p:6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in whole)})")
    print(f"  of which heads and LOST   : {heads:6.2f} s")
    print(f"train extraction pass       : {t:6.2f} s; epochs per head {epochs}")
    print(f"naive probe (reruns the backbone per head and epoch): {naive:7.1f} s")
    print(f"probe / extraction : {p / e:.2f}x  (target <= 1.5)")
    print(f"naive / probe      : {naive / p:.1f}x  (target >= 10)")
    print(f"scores: {scores}")


if __name__ == "__main__":
    main()
