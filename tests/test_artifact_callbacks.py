"""OutlierNormMonitor and AttentionMaps: in a real fit (tags, summary), on planted artifacts, on bad input."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regablate.callbacks import AttentionMaps, OutlierNormMonitor
from regablate.cli import main
from regablate.data import SyntheticScenes
from regablate.runs import RunRecord
from regablate.tasks import Classification
from tests.conftest import REPO, quiet_trainer, tiny_fit_args
from tests.planted import MODEL, SIZES, plant_artifacts

MONITOR = str(REPO / "configs" / "monitor.yaml")


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fit")
    main(["fit", *tiny_fit_args(tmp), "--config", MONITOR])
    return tmp / "runs" / "tiny" / "r2_s0"


def test_fit_with_both_callbacks_logs_the_tags_and_the_summary(fitted):
    tags = events(fitted).Tags()
    scalars = set(tags["scalars"])
    for name in ("outlier_frac", "norm_max_over_median", "register_norm_mean", "patch_norm_median"):
        assert {f"artifacts/{name}", f"artifacts/{name}/block_00", f"artifacts/{name}/block_01"} <= scalars, name
    assert {
        "artifacts/patch_neighbour_cosine",
        "artifacts/cls_register_attention",
        "artifacts/patch_background_share",
    } <= scalars
    assert {"artifacts/patch_norms/block_00", "artifacts/patch_norms/block_01"} <= set(tags["histograms"])
    assert {"attention/cls", "artifacts/outlier_positions"} <= set(tags["images"])
    # Train start, the validations at steps 2 and 4 (fit end measures nothing new).
    steps = [event.step for event in events(fitted).Scalars("artifacts/outlier_frac")]
    assert steps == [0, 2, 4]
    attention = events(fitted).Images("attention/cls")[-1]
    assert (attention.width, attention.height) == (4 * 34 + 2, 8 * 34 + 2)  # image, CLS, 2 registers; 8 rows
    summary = RunRecord(fitted).read()
    assert summary["status"] == "complete" and summary["artifacts/step"] == 4
    for key in (
        "artifacts/outlier_frac",
        "artifacts/outlier_frac/block_00",
        "artifacts/outlier_frac/block_01",
        "artifacts/norm_max_over_median",
        "artifacts/register_norm_mean",
    ):
        assert isinstance(summary[key], float), key
    assert "artifacts/patch_norm_median/block_00" not in summary, (
        "per-block values other than outlier_frac stay in TensorBoard"
    )


def test_inspect_on_a_run_folder_writes_the_monitors_keys(fitted, tmp_path, capsys):
    out = tmp_path / "inspect"
    main(["inspect", "--checkpoint", str(fitted), "--num_images", "8", "--output", str(out)])
    stats = (out / "stats.json").read_text()
    logged = {tag for tag in events(fitted).Tags()["scalars"] if tag.startswith("artifacts/")}
    assert logged and all(f'"{tag}"' in stats for tag in logged)
    assert "outliers start at" in capsys.readouterr().out


def test_monitor_fragment_keeps_the_callbacks_of_the_config_before_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--config", MONITOR, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    for name in ("LearningRateMonitor", "regablate.callbacks.OutlierNormMonitor", "regablate.callbacks.AttentionMaps"):
        assert name in printed


LAYOUTS = {
    "cls": {},
    "avg": {"class_token": False, "global_pool": "avg"},
    "map": {"class_token": False, "global_pool": "map"},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_monitor_and_attention_maps_find_planted_artifacts(tmp_path, layout):
    kwargs = {**{k: v for k, v in SIZES.items() if k != "img_size"}, **LAYOUTS[layout]}
    model = Classification(model_name=MODEL, num_registers=2, num_classes=4, img_size=32, model_kwargs=kwargs)
    plant_artifacts(model.backbone, onset=1)
    monitor, maps = OutlierNormMonitor(num_images=8), AttentionMaps(num_images=4)
    logger = TensorBoardLogger(tmp_path, name="planted", version="v")
    trainer = quiet_trainer(1, logger=logger, callbacks=[monitor, maps], limit_val_batches=1)
    data = SyntheticScenes(img_size=32, num_classes=4, val_size=16, batch_size=16)
    trainer.validate(model, datamodule=data, verbose=False)
    stats = monitor.latest
    assert stats["artifacts/outlier_frac/block_00"] == 0.0
    assert all(stats[f"artifacts/outlier_frac/block_{b:02d}"] == pytest.approx(4 / 64) for b in (1, 2, 3))
    assert stats["artifacts/outlier_onset_block"] == 1.0
    assert stats["artifacts/outlier_attention_lift"] > 5
    assert ("artifacts/cls_register_attention" in stats) == (layout == "cls")
    accumulator = events(tmp_path / "planted" / "v")
    assert {"attention/cls", "artifacts/outlier_positions"} <= set(accumulator.Tags()["images"])
    grid = accumulator.Images("attention/cls")[-1]
    assert (grid.width, grid.height) == (4 * 34 + 2, 4 * 34 + 2)  # image, global query, 2 registers; 4 rows
    # The callbacks measured the first validation images, the same in both.
    assert torch.equal(monitor.batch["image"][:4], maps.batch["image"])
    assert model.backbone.blocks[-1].attn.fused_attn, "training keeps the fused attention"


@pytest.mark.parametrize("layout", ["cls", "avg"])
def test_training_batch_readings_find_planted_artifacts_at_every_step(tmp_path, layout):
    kwargs = {**{k: v for k, v in SIZES.items() if k != "img_size"}, **LAYOUTS[layout]}
    model = Classification(model_name=MODEL, num_registers=2, num_classes=4, img_size=32, model_kwargs=kwargs, lr=1e-9)
    plant_artifacts(model.backbone, onset=1)
    monitor = OutlierNormMonitor(every_n_steps=None, train_batch_every_n_steps=1, histograms=False)
    trainer = quiet_trainer(3, logger=TensorBoardLogger(tmp_path, name="planted", version="v"), callbacks=[monitor])
    trainer.fit(
        model, datamodule=SyntheticScenes(img_size=32, num_classes=4, train_size=64, val_size=16, batch_size=16)
    )
    accumulator = events(tmp_path / "planted" / "v")
    prefix = "artifacts/train_batch"
    assert [e.step for e in accumulator.Scalars(f"{prefix}/outlier_frac")] == [0, 1, 2]  # the weights of each step
    for block, expected in ((0, 0.0), (1, 4 / 64), (2, 4 / 64), (3, 4 / 64)):
        values = [e.value for e in accumulator.Scalars(f"{prefix}/outlier_frac/block_{block:02d}")]
        assert values == pytest.approx([expected] * 3), block
    assert [e.value for e in accumulator.Scalars(f"{prefix}/outlier_onset_block")] == [1.0] * 3
    assert f"{prefix}/register_norm_mean/block_03" in accumulator.Tags()["scalars"]
    assert not any(block._forward_hooks for block in model.backbone.blocks), "no hook outlives its step"


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("threshold", "median", "unknown threshold mode 'median'"),
        ("blocks", "[0,9]", "block index 9 is out of range for a ViT with 2 blocks"),
    ],
)
def test_bad_monitor_settings_fail_in_one_line_and_leave_no_run_folder(tmp_path, capsys, option, value, message):
    args = [
        "fit",
        *tiny_fit_args(tmp_path),
        "--trainer.callbacks+",
        "regablate.callbacks.OutlierNormMonitor",
        f"--trainer.callbacks.{option}",
        value,
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("regablate: error: ") and message in error[-1]
    assert not (tmp_path / "runs" / "tiny" / "r2_s0").exists()
