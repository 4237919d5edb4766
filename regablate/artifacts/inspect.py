"""``regablate inspect``: does a model have artifacts? Norm histograms, attention maps and a verdict.

    regablate inspect --model vit_large_patch14_dinov2 --images photos/ --output runs/inspect/dinov2_l
    regablate inspect runs/quickstart/r4_s0             # a run folder (or --checkpoint RUN or a regablate .ckpt)
    regablate inspect --model vit_tiny_patch16_224 --pretrained false --patch_size 4 --img_size 32

The model arguments are those of ``regablate probe`` (``regablate.models.resolve``): a timm ViT name
(timm's pretrained weights unless ``--pretrained false`` or ``--checkpoint``), local weights
(``--checkpoint file.safetensors``), or a run folder / regablate ``.ckpt`` (built as it was
trained). Images come from a folder, or are synthetic scenes, whose masks add the background
test. The output folder gets ``stats.json`` (the monitor's ``artifacts/...`` keys, per block and
for the last block), ``norms/block_NN.png``, ``attention.png`` and ``outlier_positions.png``; it
is written next to its final place and renamed into it, so a failure leaves nothing half-written.

Test-time registers (``regablate.artifacts.register_neurons``): ``--find_register_neurons true``
also finds the MLP units that write the outliers, on the same images, writes them to
``register_neurons.json`` and prints them with the outlier fraction that one test-time register
holding them leaves; ``--test_time_registers FILE`` inspects the model with such a register added.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch import Tensor
from torchvision.utils import save_image

from regablate.artifacts.pictures import attention_grid, norm_histogram, position_grid, unnormalize
from regablate.artifacts.register_neurons import (
    NEURONS_FILE,
    NeuronSearch,
    RegisterNeurons,
    add_test_time_register,
    attached_neurons,
    summary_labels,
)
from regablate.artifacts.register_neurons import find_register_neurons as find_neurons  # the flag has its name
from regablate.artifacts.scan import ArtifactScan, scan
from regablate.artifacts.stats import ONSET_MIN_FRACTION, TOP_CHANNEL_SHARE, Threshold
from regablate.commands import (
    BACKBONE_ARGUMENTS,
    Renamed,
    add_backbone_arguments,
    backbone_source,
    function_arguments,
    modernise,
    tool_parser,
)
from regablate.data.images import load_image_folder, synthetic_images
from regablate.errors import RegablateError
from regablate.models.resolve import BackboneSource, resolve_backbone
from regablate.runs import write_folder_atomic, write_json_atomic

# An outlier set is an attention sink when it draws this many times its uniform share.
SINK_LIFT = 3.0
RENAMED = (Renamed("--out", "--output"),)
# Neuron-search settings that inspect takes from its own flags.
SHARED_WITH_SEARCH = {"threshold", "threshold_value", "num_images"}


def inspect(
    run: str | None = None,
    source: BackboneSource | None = None,
    images: str | None = None,
    num_images: PositiveInt = 16,
    seed: NonNegativeInt = 0,
    threshold: str = "relative",
    threshold_value: float | None = None,
    blocks: list[int] | None = None,
    output: str | None = None,
    find_register_neurons: bool = False,
    register_neurons: NeuronSearch | None = None,
    test_time_registers: str | None = None,
) -> dict[str, Any]:
    """Does a ViT have artifacts? Writes norm histograms, attention maps and stats.json, prints a verdict.

    Args:
        run: a run folder to inspect.
        source: the model (``--model``, ``--checkpoint``, ...).
        images: image folder (default: synthetic scenes).
        num_images: images to measure.
        seed: synthetic scenes seed.
        threshold: outlier rule: relative | absolute | percentile.
        threshold_value: the rule's number (default 4 / 150 / 98).
        blocks: blocks to measure, e.g. [0,5,-1] (default all).
        output: output folder (default runs/inspect/<model>).
        find_register_neurons: find register neurons, write register_neurons.json.
        register_neurons: how register neurons are found.
        test_time_registers: inspect with a test-time register (a register_neurons.json).
    """
    rule = Threshold(threshold, threshold_value)
    if find_register_neurons and test_time_registers:
        raise RegablateError(
            "give --find_register_neurons or --test_time_registers, not both: find them on the model without one"
        )
    resolved = resolve_backbone(source or BackboneSource(), run)
    model = resolved.model
    if test_time_registers is not None:
        add_test_time_register(model, test_time_registers)
    out = Path(output) if output else Path("runs") / "inspect" / resolved.name
    check_output_folder(out)
    mean, std = resolved.normalisation
    size = tuple(model.patch_embed.img_size)
    if images:
        batch, segmentation = load_image_folder(Path(images), num_images, size, mean, std), None
    else:
        batch, segmentation = synthetic_images(seed, num_images, size, mean, std)
    result = scan(model, batch, threshold=rule, blocks=blocks, segmentation=segmentation)
    stats = {
        **result.stats,
        "model": resolved.name,
        "num_registers": model.num_reg_tokens,
        "num_images": len(batch),
        "images": images or "synthetic",
        "threshold": rule.mode,
        "threshold_value": rule.value,
    }
    if (attached := attached_neurons(model)) is not None:
        stats.update(summary_labels(attached))
    neurons = None
    if find_register_neurons:
        shared = {"threshold": rule.mode, "threshold_value": rule.value, "num_images": len(batch)}
        search = replace(register_neurons or NeuronSearch(), **shared)
        neurons = find_neurons(model, batch, search, model_name=resolved.name)
        add_test_time_register(model, neurons)
        moved = scan(model, batch, threshold=rule, blocks=blocks, segmentation=segmentation)
        stats["test_time_registers/outlier_frac"] = moved.stats["artifacts/outlier_frac"]
    write_folder_atomic(
        out, lambda folder: write_outputs(folder, result, unnormalize(batch, mean, std), stats, neurons)
    )
    print("\n".join(verdict(result.stats, rule, len(model.blocks))))
    if neurons is not None:
        print("\n".join(neuron_lines(neurons, stats["test_time_registers/outlier_frac"])))
    written = ", ".join(
        ["stats.json", *([NEURONS_FILE] if neurons else []), "attention.png", "outlier_positions.png", "norms/"]
    )
    print(f"wrote {out}/: {written}")
    return stats


def build_parser() -> ArgumentParser:
    parser = tool_parser(
        "inspect", "Does a ViT have artifacts? Writes norm histograms, attention maps and stats.json, prints a verdict."
    )
    add_backbone_arguments(parser)
    parser.add_function_arguments(inspect, skip={"run", "source", "register_neurons"})
    parser.add_class_arguments(NeuronSearch, "register_neurons", skip=SHARED_WITH_SEARCH)
    return parser


def main(argv: list[str]) -> None:
    """Run ``regablate inspect`` with ``argv`` (the arguments after ``inspect``)."""
    cfg = build_parser().parse_args(modernise(argv, "inspect", RENAMED))
    options = function_arguments(cfg, skip=(*BACKBONE_ARGUMENTS, "register_neurons"))
    search = NeuronSearch(**function_arguments(cfg.register_neurons))
    inspect(cfg.run, backbone_source(cfg), register_neurons=search, **options)


def check_output_folder(out: Path) -> None:
    """Refuse to replace anything but an earlier inspect output (or an empty folder)."""
    if out.exists() and not (out.is_dir() and ((out / "stats.json").is_file() or not any(out.iterdir()))):
        raise RegablateError(f"--output {out} exists and is not an inspect output folder; choose another --output")


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
        f"outliers start at: block {int(onset)} of 0-{depth - 1}"
        if onset is not None
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
        lines.append(
            "verdict          : register-style artifacts: high-norm tokens on redundant background patches "
            "that draw attention"
        )
    return lines


def neuron_lines(neurons: RegisterNeurons, outlier_frac: float, shown: int = 10) -> list[str]:
    """The printed register neurons: the best units with their scores, and what a test-time register leaves."""
    search = neurons.search
    if not neurons.units:
        return [f"register neurons : none (no outlier tokens at block {search.outlier_block})"]
    units = ", ".join(
        f"{block}:{unit} ({score:.3g})" for (block, unit), score in zip(neurons.units[:shown], neurons.scores)
    )
    more = f" and {len(neurons.units) - shown} more" if len(neurons.units) > shown else ""
    return [
        f"register neurons : block:unit (mean |activation| at outliers) {units}{more}",
        f"test-time reg.   : outlier fraction {outlier_frac:.2%} in the last block "
        "with one test-time register holding them",
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
        evidence.append(
            f"they draw {stats['artifacts/outlier_attention_share']:.0%} of last-block attention ({lift:.1f}x uniform)"
        )
        if lift < SINK_LIFT:
            against.append(f"they draw little attention (under {SINK_LIFT:g}x uniform)")
    else:
        against.append("no outliers enter the last block, so none draws its attention")
    return evidence, against
