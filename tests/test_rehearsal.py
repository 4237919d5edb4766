"""configs/fig8/rehearsal.yaml: the paper grid with its sizes, paths and device changed, and nothing else.

The fast tests hold the rehearsal to paper.yaml (every resolved config key and every stage flag
that differs must be a size, a path or the device); the slow test runs it end to end here:
``scripts/prepare_rehearsal.py`` writes ImageNet/ADE20k/NYUd files in their real formats and an
R = 0 backbone, then ``regablate sweep configs/fig8/rehearsal.yaml`` runs every stage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors import safe_open

from regablate.sweep.grid import Grid, load_grid
from regablate.sweep.resolve import resolve_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "fig8" / "paper.yaml"
REHEARSAL = ROOT / "configs" / "fig8" / "rehearsal.yaml"
DINOV3 = ROOT / "configs" / "fig8" / "dinov3.yaml"
DINOV3_REHEARSAL = ROOT / "configs" / "fig8" / "dinov3_rehearsal.yaml"
# Each rehearsal, the grid it rehearses, and the runs of its to compare.
REHEARSALS = [(REHEARSAL, PAPER, ("r0_s0", "r4_s0")), (DINOV3_REHEARSAL, DINOV3, ("r8_s0",))]

# Every run-config key the rehearsal may change, and why it may.
SIZES = {
    "data.init_args.batch_size",
    "data.init_args.img_size",
    "data.init_args.num_workers",
    "model.init_args.bottleneck_dim",
    "model.init_args.freeze_last_layer_steps",
    "model.init_args.head_warmup_steps",
    "model.init_args.hidden_dim",
    "model.init_args.ibot_bottleneck_dim",
    "model.init_args.ibot_hidden_dim",
    "model.init_args.ibot_out_dim",
    "model.init_args.local_crop_size",
    "model.init_args.model_kwargs",  # embed_dim / depth / num_heads of the shrunk ViT-L/14
    "model.init_args.num_local_crops",
    "model.init_args.out_dim",
    "model.init_args.warmup_steps",
    "model.init_args.warmup_teacher_temp_steps",
    "trainer.limit_val_batches",
    "trainer.log_every_n_steps",
    "trainer.max_steps",
    "trainer.val_check_interval",
}
PATHS = {
    "data.init_args.path",  # local files in the source's format instead of the Hub's ImageNet
    "model.init_args.checkpoint",  # a local register-free backbone instead of ...
    "model.init_args.pretrained",  # ... DINOv2's hub weights
}
DEVICE = {"trainer.accelerator", "trainer.precision"}  # CPU ranks in float32 instead of GPUs in bf16
# Every probe flag the rehearsal may set or change: the protocol's iterations and batch sizes, and dataset paths.
STAGE_FLAGS = {
    *(f"--probe.dinov2.{probe}_{size}" for probe in ("cls", "seg", "depth") for size in ("iterations", "batch_size")),
    "--data.init_args.path",
}


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: tree}
    return {key: value for name, sub in tree.items() for key, value in flat(sub, f"{prefix}{name}.").items()}


def run_config(grid: Grid, name: str) -> dict[str, Any]:
    run = next(run for run in grid.runs if run.name == name)
    return yaml.safe_load(resolve_config(grid.base, run.overrides))


def differing(paper: dict[str, Any], rehearsal: dict[str, Any]) -> set[str]:
    a, b = flat(paper), flat(rehearsal)
    keys = {key for key in a.keys() | b.keys() if a.get(key, "<absent>") != b.get(key, "<absent>")}
    return {next((g for g in SIZES if key == g or key.startswith(g + ".")), key) for key in keys}


@pytest.mark.parametrize(("rehearsed", "grid", "names"), REHEARSALS, ids=["paper", "dinov3"])
def test_rehearsal_run_configs_differ_from_their_grid_only_in_sizes_paths_and_device(rehearsed, grid, names):
    paper, rehearsal = load_grid(grid), load_grid(rehearsed)
    for name in names:
        a, b = run_config(paper, name), run_config(rehearsal, name)
        assert differing(a, b) <= SIZES | PATHS | DEVICE, sorted(differing(a, b) - SIZES - PATHS - DEVICE)
        # What the rehearsal exists to exercise, on both sides:
        for config in (a, b):
            model = config["model"]["init_args"]
            assert config["model"]["class_path"] == "regablate.tasks.DINO"
            assert model["head_warmup_steps"] > 0 and model["num_local_crops"] > 0
            # DINOv2's whole recipe: iBOT with its own head, KoLeo, Sinkhorn-Knopp, the photometric views.
            assert model["ibot_loss_weight"] > 0 and model["ibot_separate_head"] and model["koleo_loss_weight"] > 0
            assert model["centering"] == "sinkhorn_knopp" and model["photometric_views"]
            assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["gradient_clip_val"] > 0
            assert config["data"]["class_path"] == "regablate.data.HFDataModule"
        assert b["model"]["init_args"]["checkpoint"] and not b["model"]["init_args"]["pretrained"]
        assert a["model"]["init_args"]["model_name"] == b["model"]["init_args"]["model_name"]
    assert [run.axes for run in rehearsal.runs] == [
        run.axes for run in paper.runs if run.name in {r.name for r in rehearsal.runs}
    ]


@pytest.mark.parametrize(("rehearsed", "grid", "names"), REHEARSALS, ids=["paper", "dinov3"])
def test_rehearsal_stages_and_probe_flags_are_their_grids(rehearsed, grid, names):
    paper, rehearsal = load_grid(grid), load_grid(rehearsed)
    assert [(s.name, s.command) for s in rehearsal.stages] == [(s.name, s.command) for s in paper.stages]
    for ours, theirs in zip(rehearsal.stages, paper.stages):
        a, b = theirs.args, ours.args
        assert list(b)[: len(a)] == list(a), ours.name  # the paper's flags, in its order, then sizes added
        changed = {flag for flag in b if a.get(flag) != b[flag]}
        assert changed <= STAGE_FLAGS, (ours.name, changed - STAGE_FLAGS)
        assert b.get("--probe.protocol") == "dinov2" or ours.command != "probe"
    assert rehearsal.report.paper is paper.report.paper  # DINOv3's grid overlays no paper numbers
    assert [s.name for s in paper.stages] == [s.name for s in load_grid(PAPER).stages]  # the paper's stages
    if rehearsed == REHEARSAL:
        assert rehearsal.launcher.devices_per_run == 2  # 2 DDP ranks, as paper.yaml's 8 GPUs are 8 ranks


@pytest.mark.slow
def test_rehearsal_runs_every_stage_of_the_paper_grid(tmp_path):
    def regablate(*args: str, tool: list[str] | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, *(tool or ["-m", "regablate"]), *args]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    regablate("--output", "data/rehearsal", tool=[str(ROOT / "scripts" / "prepare_rehearsal.py")])
    data = tmp_path / "data" / "rehearsal"
    assert (data / "sources" / "ADEChallengeData2016.zip").is_file()
    assert (data / "sources" / "nyu" / "nyu_train.txt").is_file()
    assert sorted(p.name for p in (data / "imagenet" / "data").iterdir()) == [
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    with safe_open(str(data / "vit_r0.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "reg_token" not in names and "pos_embed" in names  # trained without registers

    done = regablate("sweep", str(REHEARSAL))
    assert "all 2 runs complete" in done.stdout
    experiment = tmp_path / "runs" / "fig8_rehearsal"
    for name, registers in (("r0_s0", 0), ("r4_s0", 4)):
        summary = json.loads((experiment / name / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["num_registers"] == registers
        assert [summary[f"stages/{s}"] for s in ("fit", "probe_cls", "probe_seg", "probe_depth")] == ["complete"] * 4
        assert summary["task"] == "DINO" and summary["global_step"] == 6
        assert 0 <= summary["probe/cls_top1"] <= 1 and 0 <= summary["probe/seg_miou"] <= 1
        assert summary["probe/depth_rmse"] > 0
        log = (experiment / name / "sweep.log").read_text()
        assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log  # fit is a 2-rank DDP world
    for report in ("results.csv", "results.md", "figure8.png"):
        assert (experiment / report).is_file(), report


@pytest.mark.slow
def test_dinov3_rehearsal_runs_every_stage_and_the_full_grid_passes_its_dry_run(tmp_path, monkeypatch, capsys):
    """configs/fig8/dinov3_rehearsal.yaml end to end (one run: R = 8 from a DINOv3 with 4), then the plan of
    dinov3.yaml with its probes' data folders present (only the Hub's ImageNet stays unchecked offline)."""
    from regablate.cli import main
    from regablate.data.rehearsal import prepare_rehearsal

    monkeypatch.chdir(tmp_path)
    sizes = {"imagenet_train": 16, "imagenet_val": 8, "ade_train": 4, "ade_val": 2, "nyu_train": 4, "nyu_test": 2}
    prepare_rehearsal("data/rehearsal", **sizes)
    command = [sys.executable, "-m", "regablate", "sweep", str(ROOT / "configs" / "fig8" / "dinov3_rehearsal.yaml")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    experiment = tmp_path / "runs" / "fig8_dinov3_rehearsal"
    summary = json.loads((experiment / "r8_s0" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["num_registers"] == 8 and summary["global_step"] == 2
    assert [summary[f"stages/{s}"] for s in ("fit", "probe_cls", "probe_seg", "probe_depth")] == ["complete"] * 4
    assert (
        0 <= summary["probe/cls_top1"] <= 1 and 0 <= summary["probe/seg_miou"] <= 1 and summary["probe/depth_rmse"] > 0
    )
    assert (experiment / "figure8.png").is_file()

    for name in ("ade20k", "nyud"):  # where dinov3.yaml (as paper.yaml) reads them
        (tmp_path / "data" / name).symlink_to(tmp_path / "data" / "rehearsal" / name)
    main(["sweep", str(ROOT / "configs" / "fig8" / "dinov3.yaml"), "--dry_run", "true"])
    printed = capsys.readouterr().out
    assert "r16_s2: new, fit -> probe_cls -> probe_seg -> probe_depth" in printed
    assert "ERROR" not in printed and "fit: not checked: ILSVRC/imagenet-1k" in printed
    assert not (tmp_path / "runs" / "fig8_dinov3").exists()
