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

Register interventions (``regablate.artifacts.before_after``): ``--register_intervention``,
``--intervention_from_block`` and ``--test_registers`` (the flags of ``regablate probe``) scan the
model a second time with its registers replaced or fewer of them; stats.json gets the intervention,
the measures after it (``intervened/...``) and, for ``mean``/``noise``, where the statistics come from
(``intervention_reference``); the printed lines and ``attention.png`` show before and after side by side.

``--token_probes true`` adds the token probes (``regablate.artifacts.token_probes``, ``--token_probe.*``):
``token_probes.json``, their table under the verdict, and ``outlier_map.png`` at the probed block.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from regablate.artifacts import settings
from regablate.artifacts.settings import NeuronSearch, TokenProbes
from regablate.commands import (
    BACKBONE_ARGUMENTS,
    INTERVENTION_ARGUMENTS,
    BackboneSource,
    RegisterIntervention,
    Renamed,
    add_backbone_arguments,
    add_intervention_arguments,
    backbone_source,
    function_arguments,
    modernise,
    register_intervention,
    tool_parser,
)
from regablate.errors import RegablateError

RENAMED = (Renamed("--out", "--output"),)
# Neuron-search settings that inspect takes from its own flags.
SHARED_WITH_SEARCH = {"threshold", "threshold_value", "num_images"}
SHARED_WITH_TOKEN_PROBES = {"threshold", "threshold_value"}


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
    token_probes: bool = False,
    token_probe: TokenProbes | None = None,
    test_time_registers: str | None = None,
    intervention: RegisterIntervention | None = None,
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
        output: output folder (default runs/inspect/<model>, + _k<K>/_<intervention> with an intervention).
        find_register_neurons: find register neurons, write register_neurons.json.
        register_neurons: how register neurons are found.
        test_time_registers: inspect with a test-time register (a register_neurons.json).
        token_probes: probe what each kind of token holds (position, pixels, class), write token_probes.json.
        token_probe: the token probes' settings.
        intervention: what is done to the registers for the second scan (``--register_intervention``, ...).
    """
    if masks is not None and images is None:
        raise RegablateError("--masks needs --images: synthetic scenes bring their own masks")
    if find_register_neurons and test_time_registers:
        raise RegablateError(
            "give --find_register_neurons or --test_time_registers, not both: find them on the model without one"
        )
    settings.threshold_value(threshold, threshold_value)
    flags = intervention or RegisterIntervention()
    # The model, the measures and the pictures: imported here, so that the parser (this signature) needs no torch.
    from regablate.artifacts.before_after import (
        intervention_keys,
        moved_lines,
        reference_images,
        reference_statistics,
    )
    from regablate.artifacts.inspect_outputs import attention_columns, neuron_lines, write_outputs
    from regablate.artifacts.pictures import unnormalize
    from regablate.artifacts.register_neurons import (
        NEURONS_FILE,
        add_test_time_register,
        attached_neurons,
        summary_labels,
    )
    from regablate.artifacts.register_neurons import find_register_neurons as find_neurons  # the flag has its name
    from regablate.artifacts.scan import scan
    from regablate.artifacts.stats import Threshold
    from regablate.artifacts.token_probes import folder_splits, run_token_probes, scene_splits
    from regablate.artifacts.token_tables import TOKEN_PROBES_FILE, text_table
    from regablate.artifacts.token_tables import summary_keys as token_summary_keys
    from regablate.artifacts.verdict import decide, summary_lines
    from regablate.data.images import fit_masks, image_files, load_images, read_masks, synthetic_images
    from regablate.models.interventions import Intervention, intervened
    from regablate.models.layout import num_registers_of
    from regablate.models.resolve import resolve_backbone
    from regablate.runs import write_folder_atomic

    rule = Threshold(threshold, threshold_value)
    # Images and masks are checked before the model is loaded (which can take minutes).
    files = image_files(Path(images), num_images) if images else []
    object_masks = read_masks(Path(masks), Path(images), files) if masks is not None and images else None
    tampering = Intervention.of(flags)
    count = len(files) if images else num_images
    tampering.check_batch(count, f"inspect measures {count} image; give --num_images 2 or more (or more --images)")
    reference = None
    if tampering.needs_statistics:
        reference = reference_images(images, count, flags.intervention_images, seed)
    resolved = resolve_backbone(source or BackboneSource(), run)
    model = resolved.model
    tampering.check(model)  # K, the block, a model without registers: refused before any image is read
    if find_register_neurons or test_time_registers:
        tampering.check_test_time_register(model)
    token_settings = replace(token_probe or TokenProbes(), threshold=rule.mode, threshold_value=rule.value)
    if token_probes:
        token_settings.block_of(model)  # a block outside the model fails before any image is read
    if test_time_registers is not None:
        add_test_time_register(model, test_time_registers)
    out = Path(output) if output else Path("runs") / "inspect" / (resolved.name + flags.folder_suffix)
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
        "num_registers": num_registers_of(model),
        "num_images": len(batch),
        "images": images or "synthetic",
        "masks": masks if images else "synthetic",
        "class_token": model.cls_token is not None,
        "threshold": rule.mode,
        "threshold_value": rule.value,
    }
    judged = decide(result.stats)
    stats["verdict"] = judged.to_json()
    after = None
    if not tampering.is_plain:
        statistics = None
        if reference is not None:
            statistics = reference_statistics(model, tampering, reference, (mean, std))
        with intervened(model, tampering, statistics):
            after = scan(model, batch, threshold=rule, blocks=blocks, segmentation=segmentation)
        stats.update(intervention_keys(tampering, after, reference))
    columns = attention_columns(model, tampering.test_registers, intervened=after is not None)  # as scanned
    if (attached := attached_neurons(model)) is not None:
        stats.update(summary_labels(attached))
    tokens = None
    if token_probes:  # of the model the verdict is of, before --find_register_neurons adds a register
        if images:
            splits = folder_splits(Path(images), token_settings, size, mean, std)
        else:
            splits = list(scene_splits(seed, token_settings, size, mean, std))
        tokens = run_token_probes(model, splits, settings=token_settings)
        stats.update(token_summary_keys(tokens.table, "token_probes/"))
    neurons = None
    if find_register_neurons:
        shared: dict[str, Any] = {"threshold": rule.mode, "threshold_value": rule.value, "num_images": len(batch)}
        search = replace(register_neurons or NeuronSearch(), **shared)
        neurons = find_neurons(model, batch, search, model_name=resolved.name)
        add_test_time_register(model, neurons)
        moved = scan(model, batch, threshold=rule, blocks=blocks, segmentation=segmentation)
        stats["test_time_registers/outlier_frac"] = moved.stats["artifacts/outlier_frac"]
    pictures = unnormalize(batch, mean, std)
    write_folder_atomic(
        out,
        lambda folder: write_outputs(folder, result, pictures, stats, columns, neurons, segmentation, tokens, after),
    )
    print("\n".join(summary_lines(result.stats, judged, rule, len(model.blocks))))
    if after is not None:
        print("\n".join(moved_lines(stats)))
    if tokens is not None:
        print("\n".join(text_table(tokens.table)))
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
            *([TOKEN_PROBES_FILE, "outlier_map.png"] if tokens else []),
        ]
    )
    print(f"wrote {out}/: {written}")
    return stats


def build_parser() -> ArgumentParser:
    parser = tool_parser(
        "inspect", "Does a ViT have artifacts? Writes norm histograms, attention maps and stats.json, prints a verdict."
    )
    add_backbone_arguments(parser)
    parser.add_function_arguments(inspect, skip={"run", "source", "register_neurons", "token_probe", "intervention"})
    add_intervention_arguments(parser)
    parser.add_class_arguments(NeuronSearch, "register_neurons", skip=SHARED_WITH_SEARCH)
    parser.add_class_arguments(TokenProbes, "token_probe", skip=SHARED_WITH_TOKEN_PROBES)
    return parser


def parse(argv: list[str]) -> Namespace:
    """``regablate inspect``'s command line, parsed (errors surface as ArgumentError)."""
    return build_parser().parse_args(modernise(argv, "inspect", RENAMED))


def main(argv: list[str]) -> None:
    """Run ``regablate inspect`` with ``argv`` (the arguments after ``inspect``)."""
    cfg = parse(argv)
    skip = (*BACKBONE_ARGUMENTS, *INTERVENTION_ARGUMENTS, "register_neurons", "token_probe")
    options = function_arguments(cfg, skip=skip)
    search = NeuronSearch(**function_arguments(cfg.register_neurons))
    tokens = TokenProbes(**function_arguments(cfg.token_probe))
    flags = register_intervention(cfg)
    inspect(cfg.run, backbone_source(cfg), register_neurons=search, token_probe=tokens, intervention=flags, **options)


def check_output_folder(out: Path) -> None:
    """Refuse to replace anything but an earlier inspect output (or an empty folder)."""
    if out.exists() and not (out.is_dir() and ((out / "stats.json").is_file() or not any(out.iterdir()))):
        raise RegablateError(f"--output {out} exists and is not an inspect output folder; choose another --output")
