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

``--protocol dinov2`` measures DINOv2's classification protocol (``regablate.probe.dinov2``), whose
backbone runs in the loop on fresh views, against the frozen-backbone passes it needs, in one run:

* paired iterations, alternately: a bare backbone pass (last ``n`` blocks) over a batch of fresh
  random resized crops, data loading included (the floor of any such protocol), then one protocol
  iteration over the next batch (that pass feeding all 52 heads, one batched linear layer, SGD).
  Alternating step by step lets the load of a shared machine hit both alike. Target: iteration /
  pass <= 1.2, the heads adding at most 20 % to the ``iterations x batch`` passes;
* the whole classification probe of each protocol on the same backbone and splits: dinov2
  (training, every head scored on val, the best on test) and fast (one extraction pass, heads on
  cached features), for the wall time of one against the other; and what dinov2's defaults
  (12,500 iterations x 1024 views) would take on this backbone here.

The heads' cost grows with the classes, so the data have ``--classes`` (default 1000, ImageNet's).

    python benchmarks/probe_speed.py --protocol dinov2 [--model vit_small_patch16_224] [--img_size 224]
                                     [--iterations 8] [--batch 32] [--classes 1000] [--repeats 3]
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
from regablate.probe.dinov2.backbone import FrozenBackbone
from regablate.probe.dinov2.classification import ClassifierGrid, classify
from regablate.probe.dinov2.data import Views, normalisation, raw_dataset, training_batches
from regablate.probe.dinov2.settings import DINOv2Settings, scaled
from regablate.probe.dinov2.views import ClassificationTrainView
from regablate.probe.features import extract_split
from regablate.probe.plan import ProbePlan
from regablate.probe.run import extract_missing, feature_store, run_probe
from regablate.probe.settings import LinearProbe


def timed(fn) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--protocol", choices=("fast", "dinov2"), default="fast")
    parser.add_argument("--model", default=None, help="default: vit_tiny_patch16_224 (fast), vit_small_patch16_224")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--model_kwargs", type=json.loads, default={}, help="timm sizes as JSON")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=250)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=8, help="dinov2: classification iterations")
    parser.add_argument("--batch", type=int, default=32, help="dinov2: images per iteration")
    parser.add_argument("--classes", type=int, default=1000, help="dinov2: classes of the data")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.protocol == "dinov2":
        dinov2_benchmark(args)
        return
    args.model = args.model or "vit_tiny_patch16_224"
    backbone = build_backbone(args.model, 4, img_size=args.img_size, **args.model_kwargs)
    extractor = ViTExtractor(backbone)
    patch_size = tuple(backbone.patch_embed.patch_size)
    data = SyntheticScenes(
        img_size=args.img_size, train_size=args.train, val_size=args.val, test_size=args.test, batch_size=128
    )
    probe = LinearProbe()
    fast = probe.fast_settings
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
        head: math.ceil(steps * fast.batch_size / args.train)
        for head, steps in (("cls", fast.cls_steps), ("seg", fast.seg_steps), ("depth", fast.depth_steps))
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


def dinov2_benchmark(args: argparse.Namespace) -> None:
    model_name = args.model or "vit_small_patch16_224"
    backbone = FrozenBackbone(build_backbone(model_name, 4, img_size=args.img_size, **args.model_kwargs))
    data = SyntheticScenes(
        img_size=args.img_size,
        num_classes=args.classes,
        train_size=args.train,
        val_size=args.val,
        test_size=args.test,
        batch_size=args.batch,
    )
    settings = DINOv2Settings(
        cls_iterations=args.iterations,
        cls_batch_size=args.batch,
        eval_batch_size=args.batch,
        cls_n_last_blocks=[n for n in (1, 4) if n <= backbone.depth],
    )
    scale = settings.scale_for(args.img_size)
    crop = scaled(settings.cls_crop_size, scale)
    mean, std = normalisation(data)
    raw = {split: raw_dataset(data, split) for split in ("train", "val", "test")}
    views = Views(raw["train"], ClassificationTrainView(crop, mean, std))
    blocks = max(settings.cls_n_last_blocks)

    pass_times, step_times = paired_times(backbone, views, settings, args, blocks)

    def protocol() -> None:
        classify(
            backbone,
            raw,
            settings,
            num_classes=args.classes,
            scale=scale,
            normalisation=(mean, std),
            seed=0,
            num_workers=0,
        )

    def fast() -> None:
        with tempfile.TemporaryDirectory() as out:
            run_probe(
                ViTExtractor(backbone.model),
                data,
                LinearProbe(probes=["cls"]),
                output_dir=out,
                patch_size=backbone.patch,
                data_config={},
                use_cache=False,
            )

    whole = {"dinov2": [], "fast": []}
    for _ in range(args.repeats):
        whole["dinov2"].append(timed(protocol))
        whole["fast"].append(timed(fast))
    per_pass, per_step = statistics.median(pass_times), statistics.median(step_times)
    ratios = [step / bare for step, bare in zip(step_times, pass_times)]
    heads = len(settings.cls_lrs) * 2 * len(settings.cls_n_last_blocks)
    print(f"{model_name} {args.model_kwargs} at {args.img_size} px, random weights; threads: {torch.get_num_threads()}")
    print(
        f"dinov2 classification: {heads} heads over {args.classes} classes on the last {blocks} blocks, "
        f"batches of {args.batch} fresh {crop} px views; {len(pass_times)} paired iterations"
    )
    print(f"backbone pass (data included) : {per_pass:6.3f} s median (IQR {_iqr(pass_times)})")
    print(f"protocol iteration            : {per_step:6.3f} s median (IQR {_iqr(step_times)})")
    print(
        f"iteration / backbone pass     : {per_step / per_pass:.3f}x of medians, {statistics.median(ratios):.3f}x "
        "median of paired ratios  (target <= 1.2)"
    )
    for name, values in whole.items():
        print(
            f"whole {name:6s} cls probe      : {statistics.median(values):7.2f} s  (runs: "
            f"{', '.join(f'{x:.1f}' for x in values)})"
        )
    print(
        f"  dinov2: {args.iterations} iterations x {args.batch} + val/test {args.val}/{args.test}; "
        f"fast: one extraction of {args.train}/{args.val}/{args.test} + {fast.cls_steps} head steps; "
        f"dinov2 / fast: {statistics.median(whole['dinov2']) / statistics.median(whole['fast']):.2f}x"
    )
    full = DINOv2Settings().cls_iterations * DINOv2Settings().cls_batch_size
    print(f"dinov2's defaults ({full:,} passes) on this backbone here: ~{full * per_step / args.batch / 3600:.0f} h")


def paired_times(
    backbone: FrozenBackbone, views: Views, settings: DINOv2Settings, args: argparse.Namespace, blocks: int
) -> tuple[list[float], list[float]]:
    """Step by step, alternately: a bare backbone pass over fresh views, then one protocol iteration over
    the next fresh views, so the load on a shared machine hits both alike."""
    grid = ClassifierGrid(backbone, settings, args.classes)
    optimizer = grid.optimizer()
    batches = training_batches(views, args.batch, 0, 0, False)
    grid.step(next(batches), optimizer)  # warm-up: first touch of the head tensors
    pass_times, step_times = [], []
    for _ in range(args.iterations * args.repeats):
        pass_times.append(timed(lambda: backbone.last_blocks(next(batches)["image"], blocks, norm=True)))
        step_times.append(timed(lambda: grid.step(next(batches), optimizer)))
    return pass_times, step_times


def _iqr(values: list[float]) -> str:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.3f}-{q3:.3f}"


if __name__ == "__main__":
    main()
