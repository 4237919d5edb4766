"""The work of ``regablate probe`` once its command line is parsed (``regablate.probe.command``).

It builds the data, the backbone and the protocol from the parsed flags, plans the probe, launches
one process per device and writes the results. Kept apart from the command's parser so that the
parser (``--help``, parse-time refusals) loads without torch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace
from lightning import LightningDataModule

from regablate.artifacts import stats
from regablate.artifacts.register_neurons import (
    NEURONS_FILE,
    NeuronSearch,
    RegisterNeurons,
    add_test_time_register,
    find_register_neurons,
    summary_labels,
)
from regablate.artifacts.scan import scan
from regablate.artifacts.settings import TokenProbes
from regablate.artifacts.stats import Threshold
from regablate.artifacts.token_probes import probe_dataset_tokens
from regablate.artifacts.token_tables import summary_keys as token_summary_keys
from regablate.artifacts.token_tables import text_table
from regablate.commands import backbone_source, register_intervention
from regablate.data.common import num_samples
from regablate.errors import RegablateError
from regablate.models.interventions import Intervention
from regablate.models.layout import Backbone, num_registers_of
from regablate.models.resolve import ResolvedBackbone, resolve_backbone
from regablate.probe.device import ProbeDevice
from regablate.probe.features import ViTExtractor
from regablate.probe.intervened import IntervenedExtractor, reference_size, reference_statistics
from regablate.probe.plan import ProbePlan, frozen_dataset, plan_probe
from regablate.probe.run import check_protocol_devices, extraction_batch_size, feature_store, run_probe
from regablate.probe.settings import TOKEN_PROBE
from regablate.runs import RunRecord

# --test_time_registers value that finds the register neurons on the probed backbone itself.
AUTO = "auto"


def run_command(parser: ArgumentParser, cfg: Namespace) -> None:
    """Probe what ``cfg`` (parsed by ``parser``) names, on every rank; rank 0 prints and writes the results."""
    init = parser.instantiate(cfg)
    datamodule, probe = init.data, init.probe
    # dinov2 trains with the backbone in the loop on one device: there, auto means one (the paper grid's GPU nodes)
    devices = 1 if probe.protocol == "dinov2" and cfg.devices == "auto" else cfg.devices
    where = ProbeDevice(accelerator=cfg.accelerator, devices=devices, precision=cfg.precision)
    check_protocol_devices(probe, where)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # random weights and new registers: the same on every rank and in every run
        resolved = resolve_backbone(backbone_source(cfg), cfg.run, getattr(datamodule, "img_size", None))
    model, source = resolved.model, resolved.description
    _check_sizes(model, datamodule)
    tokens = init.token_probe if TOKEN_PROBE in probe.probes else None
    if tokens is not None:
        tokens.block_of(model)  # a block outside the model fails before anything is extracted
    output_dir = _output_dir(cfg, resolved)
    intervention = Intervention.of(register_intervention(cfg))
    intervention.check(model)
    if cfg.test_time_registers is not None:
        intervention.check_test_time_register(model)
    if intervention.needs_statistics and reference_size(datamodule) == 0:
        raise RegablateError(
            f"register_intervention {intervention.kind} needs reference images; the training split is empty"
        )
    # mean/noise statistics are taken on the probe's devices after launch; until then (the plan needs
    # only the features' shapes) the registers are zeroed, and the statistics then re-key the store
    planned = replace(intervention, kind="zero") if intervention.needs_statistics else intervention
    extractor = ViTExtractor(model) if intervention.is_plain else IntervenedExtractor(model, planned)
    data_config = cfg.data.as_dict()
    store = feature_store(extractor, output_dir, data_config, where.resolved_precision, cfg.cache)
    plan = plan_probe(extractor, datamodule, probe, store, reuse=cfg.cache)
    _check_shuffle_batches(intervention, datamodule, plan)
    if cfg.dry_run:
        print(f"probe plan of {resolved.name} (r{num_registers_of(model)}) into {output_dir}; nothing is extracted")
        print(plan.describe(where, cache_known=cfg.test_time_registers is None))
        if tokens is not None:
            print(
                f"token probes: {tokens.train_images} train and {tokens.test_images} {plan.scored_on} images, "
                f"block {tokens.block_of(model)}, read by the backbone, not stored"
            )
        return
    plan.check_disk_space()
    where.launch()  # from here on, every rank runs
    with where.stops_the_others_on_error():
        model.to(where.device)
        summary = _identity(output_dir, resolved)
        neurons = None
        if cfg.test_time_registers is not None:
            neurons, labels = _add_test_time_register(cfg, model, datamodule, source, where)
            summary.update(labels)
        if not intervention.is_plain:
            summary.update(intervention.key())
            source = {**source, **intervention.key()}
            if intervention.needs_statistics:
                statistics = reference_statistics(model, intervention, datamodule, cfg.intervention_images, where)
                extractor = IntervenedExtractor(model, intervention, statistics)
        report = None
        if any(name != TOKEN_PROBE for name in probe.probes):
            report = run_probe(
                extractor,
                datamodule,
                probe,
                output_dir=output_dir,
                patch_size=tuple(model.patch_embed.patch_size),
                data_config=data_config,
                use_cache=cfg.cache,
                source=source,
                where=where,
                plan=plan,
                summary=summary,
                dataset=cfg.dataset,
            )
        if tokens is not None and where.is_main:
            _token_probes(model, datamodule, tokens, plan.scored_on, where, output_dir, summary)
    if not where.is_main:  # another rank than 0: its share is extracted
        return
    if neurons is not None:
        neurons.save(output_dir / NEURONS_FILE)
    if neurons is not None or not intervention.is_plain:  # a finished row of its own in a grid's report
        RunRecord(output_dir).update({"status": "complete"})
    if report is None:
        return
    for name, value in report.metrics.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    for probe_name, reason in report.skipped.items():
        print(f"skipped {probe_name}: {reason}")
    print(f"results: {output_dir / 'summary.json'}, {output_dir / 'probe.json'}")


def _output_dir(cfg: Namespace, resolved: ResolvedBackbone) -> Path:
    """--output, else the run folder, else ``runs/probe/<model>_r<R>``; ``_ttr`` appended with a test-time register."""
    if cfg.output is not None:
        return Path(cfg.output)
    suffix = ("_ttr" if cfg.test_time_registers is not None else "") + register_intervention(cfg).folder_suffix
    run_dir = resolved.run_dir
    if run_dir is not None:
        return run_dir.with_name(run_dir.name + suffix) if suffix else run_dir
    return Path("runs") / "probe" / f"{resolved.name}_r{num_registers_of(resolved.model)}{suffix}"


def _add_test_time_register(
    cfg: Namespace,
    model: Backbone,
    datamodule: LightningDataModule,
    source: dict[str, Any],
    where: ProbeDevice,
) -> tuple[RegisterNeurons, dict[str, Any]]:
    """Add the test-time register ``cfg`` asks for; return its neurons and the summary keys that label the results.

    Rank 0 finds the register neurons (``auto``) on the first training images, on its device in
    float32, and measures the model with them; every rank gets the same neurons.
    """
    neurons, labels = None, {}
    if where.is_main:
        search = NeuronSearch(**cfg.register_neurons.as_dict())
        dataset = frozen_dataset(datamodule, "train")
        count = min(search.num_images, num_samples(dataset))
        images = torch.stack([dataset[i]["image"] for i in range(count)]).to(where.device)
        if cfg.test_time_registers == AUTO:
            name = str(source.get("checkpoint") or source.get("model_name"))
            neurons = find_register_neurons(model, images, search, model_name=name)
        else:
            neurons = RegisterNeurons.load(cfg.test_time_registers)
    neurons = where.broadcast(neurons)
    add_test_time_register(model, neurons)
    if where.is_main:
        threshold = Threshold(neurons.search.threshold, neurons.search.threshold_value)
        moved = scan(model, images, threshold=threshold)
        print(
            f"test-time register: {len(neurons.units)} register neurons; "
            f"{moved.stats['artifacts/outlier_frac']:.2%} outliers left"
        )
        labels = {**summary_labels(neurons), **stats.summary_keys(moved.stats)}
    return neurons, labels


def _check_sizes(model: Backbone, datamodule: LightningDataModule) -> None:
    data_size = getattr(datamodule, "img_size", None)
    model_size = tuple(model.patch_embed.img_size)
    if data_size is not None and not model.dynamic_img_size and (data_size, data_size) != model_size:
        raise RegablateError(
            f"the data's img_size {data_size} differs from the backbone's {model_size[0]}; "
            f"set --data.img_size {model_size[0]} or --img_size {data_size}"
        )


def _check_shuffle_batches(intervention: Intervention, datamodule: LightningDataModule, plan: ProbePlan) -> None:
    """``shuffle`` needs a second image in every extraction batch, the last of each split included."""
    batch_size = extraction_batch_size(datamodule)
    for name, split in plan.splits.items():
        last = split.num_samples % batch_size or batch_size
        intervention.check_batch(
            last,
            f"the {name} split's {split.num_samples} images in batches of {batch_size} leave one alone in a batch; "
            "change --data.batch_size",
        )


def _token_probes(
    model: Backbone,
    datamodule: LightningDataModule,
    settings: TokenProbes,
    scored_on: str,
    where: ProbeDevice,
    output_dir: Path,
    summary: dict[str, Any],
) -> None:
    """The token probe, on rank 0: ``token_probes.json``, ``outlier_map.png`` and its numbers in ``summary.json``."""
    result = probe_dataset_tokens(
        model,
        frozen_dataset(datamodule, "train"),
        frozen_dataset(datamodule, scored_on),
        settings=settings,
        scored_on=scored_on,
        device=where.device,
        autocast=where.autocast,
    )
    result.save(output_dir)
    RunRecord(output_dir).update({**summary, **token_summary_keys(result.table, "probe/token_")})
    print("\n".join(text_table(result.table)))
    print(f"token probes: {output_dir / 'token_probes.json'}")


def _identity(output_dir: Path, resolved: ResolvedBackbone) -> dict[str, Any]:
    """The summary keys that say which model the results are of (those the folder does not hold yet)."""
    source = resolved.description
    known = RunRecord(output_dir).read()
    identity = {"model_name": source.get("model_name"), "num_registers": source["num_registers"]}
    if resolved.run_dir is not None and output_dir != resolved.run_dir:  # results kept elsewhere still name its seed
        identity["seed"] = RunRecord(resolved.run_dir).read().get("seed")
    return {k: v for k, v in identity.items() if k not in known and v is not None}
