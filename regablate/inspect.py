"""``regablate inspect``: does a model have artifacts? Norm histograms, attention maps and a verdict.

    regablate inspect --model vit_large_patch14_dinov2 --images photos/ --out runs/inspect/dinov2_l
    regablate inspect --checkpoint runs/quickstart/r4_s0           # a run folder (or a regablate .ckpt)
    regablate inspect --model vit_tiny_patch16_224 --pretrained false --patch_size 4 --img_size 32

The model is a timm ViT name (timm's pretrained weights unless ``--pretrained false`` or
``--checkpoint``), local weights (``--checkpoint file.safetensors``), or a run folder / regablate
``.ckpt`` (built as it was trained). Images come from a folder, or are synthetic scenes, whose
masks add the background test. The output folder gets ``stats.json`` (the monitor's
``artifacts/...`` keys, per block and for the last block), ``norms/block_NN.png``,
``attention.png`` and ``outlier_positions.png``; it is written next to its final place and
renamed into it, so a failure leaves nothing half-written.

Test-time registers (``regablate.test_time_registers``): ``--find_register_neurons`` also finds
the MLP units that write the outliers, on the same images, writes them to ``register_neurons.json``
and prints them with the outlier fraction that one test-time register holding them leaves;
``--test_time_registers FILE`` inspects the model with such a register added.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from jsonargparse import ArgumentParser
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torchvision.transforms import v2
from torchvision.utils import save_image

from regablate.artifact_images import attention_grid, norm_histogram, position_grid, unnormalize
from regablate.artifact_scan import ArtifactScan, scan
from regablate.artifacts import ONSET_MIN_FRACTION, TOP_CHANNEL_SHARE, Threshold
from regablate.backbone import build_backbone
from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD
from regablate.data.synthetic import SyntheticScenesDataset
from regablate.errors import RegablateError
from regablate.runs import checkpoint_hparams, load_backbone
from regablate.summary import write_json_atomic
from regablate.test_time_registers import (
    NEURONS_FILE,
    NeuronSearch,
    RegisterNeurons,
    add_test_time_register,
    attached_neurons,
    find_register_neurons,
    summary_labels,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIZE_ARGUMENTS = ("patch_size", "embed_dim", "depth", "num_heads")
# An outlier set is an attention sink when it draws this many times its uniform share.
SINK_LIFT = 3.0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="regablate inspect",
        description="Does a ViT have artifacts? Writes norm histograms, attention maps and stats.json, prints a verdict.",
        exit_on_error=False,
    )
    parser.add_argument("--model", type=str | None, default=None, help="timm ViT name (optional for a run folder or regablate .ckpt)")
    parser.add_argument("--checkpoint", type=str | None, default=None, help="weights file, regablate .ckpt or run folder")
    parser.add_argument("--pretrained", type=bool, default=True, help="timm's pretrained weights for --model (when no --checkpoint)")
    parser.add_argument("--num_registers", type=int | None, default=None, help="register tokens (default: the model's own)")
    parser.add_argument("--img_size", type=int | None, default=None, help="input side in pixels (default: the model's)")
    parser.add_argument("--model_kwargs", type=dict[str, Any] | None, default=None, help="extra timm arguments, as in configs")
    for name in SIZE_ARGUMENTS:
        parser.add_argument(f"--{name}", type=int | None, default=None, help=f"timm {name} (overrides model_kwargs)")
    parser.add_argument("--images", type=str | None, default=None, help="image folder (default: synthetic scenes)")
    parser.add_argument("--num_images", type=int, default=16, help="images to measure")
    parser.add_argument("--seed", type=int, default=0, help="synthetic scenes seed")
    parser.add_argument("--threshold", type=str, default="relative", help="outlier rule: relative | absolute | percentile")
    parser.add_argument("--threshold_value", type=float | None, default=None, help="the rule's number (default 4 / 150 / 98)")
    parser.add_argument("--blocks", type=list[int] | None, default=None, help="blocks to measure, e.g. [0,5,-1] (default all)")
    parser.add_argument("--out", type=str | None, default=None, help="output folder (default runs/inspect/<model>)")
    parser.add_argument("--find_register_neurons", type=bool, default=False, help=f"find register neurons, write {NEURONS_FILE}")
    parser.add_class_arguments(NeuronSearch, "register_neurons", skip={"threshold", "threshold_value", "num_images"})
    parser.add_argument("--test_time_registers", type=str | None, default=None, help=f"inspect with a test-time register ({NEURONS_FILE})")
    return parser


def main(argv: list[str]) -> None:
    """Run ``regablate inspect`` with ``argv`` (the arguments after ``inspect``)."""
    args = build_parser().parse_args(argv)
    threshold = Threshold(args.threshold, args.threshold_value)
    if args.num_images < 1:
        raise RegablateError(f"--num_images must be at least 1, got {args.num_images}")
    if args.find_register_neurons and args.test_time_registers:
        raise RegablateError("give --find_register_neurons or --test_time_registers, not both: find them on the model without one")
    model, name, pretrained = load_model(args)
    out = Path(args.out) if args.out else Path("runs") / "inspect" / name
    check_output_folder(out)
    # timm's weights expect their own normalisation; regablate's data modules default to ImageNet's.
    config = model.pretrained_cfg if pretrained else {}
    mean, std = tuple(config.get("mean", IMAGENET_MEAN)), tuple(config.get("std", IMAGENET_STD))
    size = tuple(model.patch_embed.img_size)
    if args.images:
        images, segmentation = load_image_folder(Path(args.images), args.num_images, size, mean, std), None
    else:
        images, segmentation = synthetic_images(args.seed, args.num_images, size, mean, std)
    result = scan(model, images, threshold=threshold, blocks=args.blocks, segmentation=segmentation)
    stats = {
        **result.stats,
        "model": name,
        "num_registers": model.num_reg_tokens,
        "num_images": len(images),
        "images": args.images or "synthetic",
        "threshold": threshold.mode,
        "threshold_value": threshold.value,
    }
    if (attached := attached_neurons(model)) is not None:
        stats.update(summary_labels(attached))
    neurons = None
    if args.find_register_neurons:
        search = NeuronSearch(**args.register_neurons.as_dict(), threshold=threshold.mode, threshold_value=threshold.value, num_images=len(images))
        neurons = find_register_neurons(model, images, search, model_name=name)
        add_test_time_register(model, neurons)
        moved = scan(model, images, threshold=threshold, blocks=args.blocks, segmentation=segmentation)
        stats["test_time_registers/outlier_frac"] = moved.stats["artifacts/outlier_frac"]
    write_atomically(out, lambda folder: write_outputs(folder, result, unnormalize(images, mean, std), stats, neurons))
    print("\n".join(verdict(result.stats, threshold, len(model.blocks))))
    if neurons is not None:
        print("\n".join(neuron_lines(neurons, stats["test_time_registers/outlier_frac"])))
    written = ", ".join(["stats.json", *([NEURONS_FILE] if neurons else []), "attention.png", "outlier_positions.png", "norms/"])
    print(f"wrote {out}/: {written}")


def load_model(args: Any) -> tuple[VisionTransformer, str, bool]:
    """The backbone ``args`` ask for, a name for it, and whether it holds timm's pretrained weights."""
    sizes = {**(args.model_kwargs or {}), **{k: getattr(args, k) for k in SIZE_ARGUMENTS if getattr(args, k) is not None}}
    if args.img_size is not None:
        sizes["img_size"] = args.img_size
    checkpoint = Path(args.checkpoint).expanduser() if args.checkpoint else None
    if checkpoint is not None and not checkpoint.exists():
        raise RegablateError(f"checkpoint not found: {checkpoint}")
    if args.test_time_registers is not None:
        sizes["test_time_registers"] = args.test_time_registers
    if checkpoint is not None and _is_training_run(checkpoint):
        overrides = dict(sizes) if args.num_registers is None else {**sizes, "num_registers": args.num_registers}
        model = load_backbone(checkpoint, **overrides)
        stored = checkpoint_hparams(checkpoint) if checkpoint.is_file() else None
        if args.model and stored and stored["model_name"] != args.model:
            raise RegablateError(f"{checkpoint} holds a {stored['model_name']}, not a {args.model}; leave out --model")
        return model, checkpoint.stem if checkpoint.is_file() else checkpoint.name, False
    if not args.model:
        raise RegablateError("give --model NAME (a timm ViT), or --checkpoint with a run folder or regablate .ckpt")
    registers = _native_registers(args.model) if args.num_registers is None else args.num_registers
    pretrained = args.pretrained and checkpoint is None
    try:
        model = build_backbone(args.model, registers, checkpoint=checkpoint, pretrained=pretrained, **sizes)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RegablateError(
            f"cannot load timm's pretrained weights for {args.model} ({first}); needs the network or a filled "
            "Hugging Face cache, or pass --checkpoint PATH or --pretrained false (random weights)"
        ) from None
    return model, args.model if checkpoint is None else checkpoint.stem, pretrained


def _is_training_run(path: Path) -> bool:
    """A run folder, or a Lightning ``.ckpt`` that regablate wrote (it knows how to build itself)."""
    if path.is_dir():
        return True
    if path.suffix != ".ckpt":
        return False
    try:
        checkpoint_hparams(path)
    except RegablateError:
        return False
    return True


def _native_registers(model_name: str) -> int:
    """The register count timm builds ``model_name`` with (4 for ``*_reg4_*``); 0 for unknown names."""
    if not timm.is_model(model_name):
        return 0  # build_backbone names the problem
    with torch.device("meta"):
        return int(getattr(timm.create_model(model_name, num_classes=0), "num_reg_tokens", 0))


def load_image_folder(
    folder: Path, num_images: int, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:
    """The first ``num_images`` images under ``folder`` (sorted paths), resized, centre-cropped, normalised."""
    if not folder.is_dir():
        raise RegablateError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:num_images]
    if not files:
        raise RegablateError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; point --images at a folder of pictures")
    transform = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize(min(size), antialias=True), v2.CenterCrop(size), v2.Normalize(mean, std)]
    )
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(transform(image.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise RegablateError(f"cannot read image {file}: {err}") from None
    return torch.stack(images)


def synthetic_images(
    seed: int, num_images: int, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[Tensor, Tensor]:
    """Synthetic validation scenes at the model's input size, with their segmentation masks."""
    if size[0] != size[1]:
        raise RegablateError(f"synthetic scenes are square but the model takes {size[0]}x{size[1]}; pass --img_size or --images")
    scenes = SyntheticScenesDataset(seed=seed, split="val", size=num_images, img_size=size[0], mean=mean, std=std)
    samples = [scenes[i] for i in range(num_images)]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples])


def check_output_folder(out: Path) -> None:
    """Refuse to replace anything but an earlier inspect output (or an empty folder)."""
    if out.exists() and not (out.is_dir() and ((out / "stats.json").is_file() or not any(out.iterdir()))):
        raise RegablateError(f"--out {out} exists and is not an inspect output folder; choose another --out")


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder next to ``out`` with ``write``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = staging.with_suffix(".old")
    try:
        write(staging)
        if out.exists():
            out.rename(old)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_outputs(
    folder: Path, result: ArtifactScan, images: Tensor, stats: dict[str, Any], neurons: RegisterNeurons | None = None
) -> None:
    write_json_atomic(folder / "stats.json", stats)
    if neurons is not None:
        neurons.save(folder / NEURONS_FILE)
    save_image(attention_grid(images, result.attention_maps), folder / "attention.png")
    save_image(position_grid(result.outlier_positions), folder / "outlier_positions.png")
    (folder / "norms").mkdir()
    for block, norms in result.patch_norms.items():
        figure = norm_histogram(norms, result.cutoffs[block], block, stats["threshold"])
        figure.savefig(folder / "norms" / f"block_{block:02d}.png")


def verdict(stats: dict[str, float], threshold: Threshold, depth: int) -> list[str]:
    """The printed verdict: outlier fraction, onset block, max/median norm, evidence, conclusion."""
    frac = stats["artifacts/outlier_frac"]
    onset = stats.get("artifacts/outlier_onset_block")
    lines = [
        f"outlier fraction : {frac:.2%} of the last block's patch tokens ({threshold.describe()})",
        f"outliers start at: block {int(onset)} of 0-{depth - 1}" if onset is not None
        else f"outliers start at: no block (none has >= {ONSET_MIN_FRACTION:.1%} outliers through to the last)",
        f"max/median norm  : {stats['artifacts/norm_max_over_median']:.1f}x in the last block "
        "(~10x with artifacts, 2-3x without)",
    ]
    if frac < ONSET_MIN_FRACTION:
        return [*lines, "verdict          : no artifacts: (almost) no high-norm outlier tokens"]
    evidence, against = _evidence(stats)
    lines.append("evidence         : " + "; ".join(evidence))
    if against:
        lines.append("verdict          : high-norm tokens, but not register-style artifacts: " + ", ".join(against))
    else:
        lines.append("verdict          : register-style artifacts: high-norm tokens on redundant background patches that draw attention")
    return lines


def neuron_lines(neurons: RegisterNeurons, outlier_frac: float, shown: int = 10) -> list[str]:
    """The printed register neurons: the best units with their scores, and what a test-time register leaves."""
    search = neurons.search
    if not neurons.units:
        return [f"register neurons : none (no outlier tokens at block {search.outlier_block})"]
    units = ", ".join(f"{block}:{unit} ({score:.3g})" for (block, unit), score in zip(neurons.units[:shown], neurons.scores))
    more = f" and {len(neurons.units) - shown} more" if len(neurons.units) > shown else ""
    return [
        f"register neurons : block:unit (mean |activation| at outliers) {units}{more}",
        f"test-time reg.   : outlier fraction {outlier_frac:.2%} in the last block with one test-time register holding them",
    ]


def _evidence(stats: dict[str, float]) -> tuple[list[str], list[str]]:
    """What the outliers look like (with the value for ordinary patches), and what speaks against artifacts."""
    get = stats.get
    evidence, against = [], []
    if get("artifacts/outlier_background_share") is not None:
        share, base = stats["artifacts/outlier_background_share"], stats["artifacts/patch_background_share"]
        evidence.append(f"{share:.0%} on background (all patches {base:.0%})")
        if share <= base:
            against.append("they sit on foreground as often as other patches")
    if get("artifacts/outlier_neighbour_cosine") is not None:
        cosine, base = stats["artifacts/outlier_neighbour_cosine"], stats["artifacts/patch_neighbour_cosine"]
        evidence.append(f"input neighbour cosine {cosine:.2f} (all patches {base:.2f})")
        if cosine <= base:
            against.append("their input patches are no more redundant than others")
    if get("artifacts/outlier_channel_concentration") is not None:
        base = get("artifacts/patch_channel_concentration", float("nan"))
        evidence.append(
            f"top {TOP_CHANNEL_SHARE:.0%} of channels hold {stats['artifacts/outlier_channel_concentration']:.0%} "
            f"of their norm (other tokens {base:.0%})"
        )
    if get("artifacts/outlier_attention_share") is not None:
        lift = stats["artifacts/outlier_attention_lift"]
        evidence.append(f"they draw {stats['artifacts/outlier_attention_share']:.0%} of last-block attention ({lift:.1f}x uniform)")
        if lift < SINK_LIFT:
            against.append(f"they draw little attention (under {SINK_LIFT:g}x uniform)")
    else:
        against.append("no outliers enter the last block, so none draws its attention")
    return evidence, against
