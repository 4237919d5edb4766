"""``regablate inspect``: does a model have artifacts? Norm histograms, attention maps and a verdict.

    regablate inspect --model vit_large_patch14_dinov2 --images photos/ --output runs/inspect/dinov2_l
    regablate inspect --model vit_base_patch16_siglip_224 --images photos/ --masks masks/   # with object masks
    regablate inspect runs/quickstart/r4_s0             # a run folder (or --checkpoint RUN or a regablate .ckpt)
    regablate inspect --model vit_tiny_patch16_224 --pretrained false --patch_size 4 --img_size 32

The model arguments are those of ``regablate probe`` (``regablate.models.resolve``): a timm ViT name
(timm's pretrained weights unless ``--pretrained false`` or ``--checkpoint``), local weights
(``--checkpoint file.safetensors``, with or without a class token: the weights decide), or a run
folder / regablate ``.ckpt`` (built as it was trained). Images come from a folder, or are
synthetic scenes; masks (the scenes' own, or ``--masks`` for an image folder) add the background
test. The output folder gets ``stats.json`` (the monitor's ``artifacts/...`` keys, per block and
for the last block, and the ``verdict`` with the votes behind it, ``regablate.artifacts.verdict``),
``norms/block_NN.png``, ``attention.png``, ``outlier_positions.png`` and ``outliers.png`` (each
image with its outlier patches, background dimmed where masks are known); it is written next to
its final place and renamed into it, so a failure leaves nothing half-written.

Test-time registers (``regablate.artifacts.register_neurons``): ``--find_register_neurons true``
also finds the MLP units that write the outliers, on the same images, writes them to
``register_neurons.json`` and prints them with the outlier fraction that one test-time register
holding them leaves; ``--test_time_registers FILE`` inspects the model with such a register added.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor
from torchvision.utils import save_image

from regablate.artifacts.pictures import attention_grid, norm_histogram, outlier_grid, position_grid, unnormalize
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
from regablate.artifacts.stats import Threshold
from regablate.artifacts.verdict import decide, summary_lines
from regablate.commands import (
    BACKBONE_ARGUMENTS,
    Renamed,
    add_backbone_arguments,
    backbone_source,
    function_arguments,
    modernise,
    tool_parser,
)
from regablate.data.images import fit_masks, image_files, load_images, read_masks, synthetic_images
from regablate.errors import RegablateError
from regablate.models.resolve import BackboneSource, resolve_backbone
from regablate.runs import write_folder_atomic, write_json_atomic

RENAMED = (Renamed("--out", "--output"),)
# Neuron-search settings that inspect takes from its own flags.
SHARED_WITH_SEARCH = {"threshold", "threshold_value", "num_images"}


def inspect(
    run: str | None = None,
    source: BackboneSource | None = None,
    images: str | None = None,
    masks: str | None = None,
    num_images: PositiveInt = 16,
    seed: NonNegativeInt = 0,
    threshold: str = "relative",
    threshold_value: PositiveFloat | None = None,
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
        masks: object masks of --images: a folder of PNGs (same relative path and stem, 0 = background) or one .npz.
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
    if masks is not None and images is None:
        raise RegablateError("--masks needs --images: synthetic scenes bring their own masks")
    if find_register_neurons and test_time_registers:
        raise RegablateError(
            "give --find_register_neurons or --test_time_registers, not both: find them on the model without one"
        )
    # Images and masks are checked before the model is loaded (which can take minutes).
    files = image_files(Path(images), num_images) if images else []
    object_masks = read_masks(Path(masks), Path(images), files) if masks is not None and images else None
    resolved = resolve_backbone(source or BackboneSource(), run)
    model = resolved.model
    if test_time_registers is not None:
        add_test_time_register(model, test_time_registers)
    out = Path(output) if output else Path("runs") / "inspect" / resolved.name
    check_output_folder(out)
    mean, std = resolved.normalisation
    size = tuple(model.patch_embed.img_size)
    if images:
        batch = load_images(files, size, mean, std)
        segmentation = None if object_masks is None else fit_masks(object_masks, size)
    else:
        batch, segmentation = synthetic_images(seed, num_images, size, mean, std)
    result = scan(model, batch, threshold=rule, blocks=blocks, segmentation=segmentation)
    stats: dict[str, Any] = {
        **result.stats,
        "model": resolved.name,
        "num_registers": model.num_reg_tokens,
        "num_images": len(batch),
        "images": images or "synthetic",
        "masks": masks if images else "synthetic",
        "class_token": model.cls_token is not None,
        "threshold": rule.mode,
        "threshold_value": rule.value,
    }
    judged = decide(result.stats)
    stats["verdict"] = judged.to_json()
    if (attached := attached_neurons(model)) is not None:
        stats.update(summary_labels(attached))
    neurons = None
    if find_register_neurons:
        shared: dict[str, Any] = {"threshold": rule.mode, "threshold_value": rule.value, "num_images": len(batch)}
        search = replace(register_neurons or NeuronSearch(), **shared)
        neurons = find_neurons(model, batch, search, model_name=resolved.name)
        add_test_time_register(model, neurons)
        moved = scan(model, batch, threshold=rule, blocks=blocks, segmentation=segmentation)
        stats["test_time_registers/outlier_frac"] = moved.stats["artifacts/outlier_frac"]
    pictures = unnormalize(batch, mean, std)
    write_folder_atomic(out, lambda folder: write_outputs(folder, result, pictures, stats, neurons, segmentation))
    print("\n".join(summary_lines(result.stats, judged, rule, len(model.blocks))))
    if neurons is not None:
        print("\n".join(neuron_lines(neurons, stats["test_time_registers/outlier_frac"])))
    written = ", ".join(
        [
            "stats.json",
            *([NEURONS_FILE] if neurons else []),
            "attention.png",
            "outlier_positions.png",
            "outliers.png",
            "norms/",
        ]
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


def parse(argv: list[str]) -> Namespace:
    """``regablate inspect``'s command line, parsed (errors surface as ArgumentError)."""
    return build_parser().parse_args(modernise(argv, "inspect", RENAMED))


def main(argv: list[str]) -> None:
    """Run ``regablate inspect`` with ``argv`` (the arguments after ``inspect``)."""
    cfg = parse(argv)
    options = function_arguments(cfg, skip=(*BACKBONE_ARGUMENTS, "register_neurons"))
    search = NeuronSearch(**function_arguments(cfg.register_neurons))
    inspect(cfg.run, backbone_source(cfg), register_neurons=search, **options)


def check_output_folder(out: Path) -> None:
    """Refuse to replace anything but an earlier inspect output (or an empty folder)."""
    if out.exists() and not (out.is_dir() and ((out / "stats.json").is_file() or not any(out.iterdir()))):
        raise RegablateError(f"--output {out} exists and is not an inspect output folder; choose another --output")


def write_outputs(
    folder: Path,
    result: ArtifactScan,
    images: Tensor,
    stats: dict[str, Any],
    neurons: RegisterNeurons | None = None,
    segmentation: Tensor | None = None,
) -> None:
    write_json_atomic(folder / "stats.json", stats)
    if neurons is not None:
        neurons.save(folder / NEURONS_FILE)
    save_image(attention_grid(images, result.attention_maps), folder / "attention.png")
    save_image(position_grid(result.outlier_positions), folder / "outlier_positions.png")
    save_image(outlier_grid(images, result.outliers, result.grid, segmentation), folder / "outliers.png")
    (folder / "norms").mkdir()
    for block, norms in result.patch_norms.items():
        figure = norm_histogram(norms, result.cutoffs[block], block, stats["threshold"])
        figure.savefig(folder / "norms" / f"block_{block:02d}.png")


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
