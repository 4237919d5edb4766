"""The memory model (regablate.memory): its activation estimate against the CPU allocator's measured peak."""

from __future__ import annotations

import re

import pytest
import yaml

from regablate.cli import main
from regablate.memory import CHECK_SIZES, activation_check, estimate
from tests.conftest import REPO


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_estimate_is_within_a_quarter_of_the_measured_peak(checkpointing):
    """The tiny size here; benchmarks/memory_model.py prints both sizes, both modes, both precisions."""
    model, img_size, batch, kwargs = CHECK_SIZES["tiny"]
    estimated, measured = activation_check(model, img_size, batch, checkpointing=checkpointing, **kwargs)
    assert 0.75 <= estimated / measured <= 1.25, (estimated, measured)


def test_the_estimate_follows_bf16_autocast_and_unfused_attention():
    model, img_size, batch, kwargs = CHECK_SIZES["tiny"]
    estimated, measured = activation_check(model, img_size, batch, "bf16-mixed", fused_attn=False, **kwargs)
    assert 0.75 <= estimated / measured <= 1.25, (estimated, measured)


def test_print_memory_prints_every_part_for_the_paper_run_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paper_run = str(REPO / "configs" / "fig8" / "paper_run.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", paper_run, "--print_memory", "true"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "vit_large_patch14_dinov2 (width 1024, depth 24, 16 heads" in out
    assert "128 x 224 px, 512 x 98 px per device, bf16-mixed, grad_checkpointing true, compile true" in out
    for part in ("parameters", "gradients", "AdamW state", "teacher", "activations (with grad checkpointing)"):
        assert re.search(rf"memory:   {re.escape(part)}.* [\d.]+ GiB", out), out
    total = float(re.search(r"total +([\d.]+) GiB per device", out).group(1))
    parts = sum(float(v) for v in re.findall(r"memory:   (?!total).*? ([\d.]+) GiB$", out, re.M))
    assert total == pytest.approx(parts, abs=0.05)
    assert not list(tmp_path.iterdir()), "printing the estimate writes no run folder"


def test_grad_checkpointing_and_compile_are_read_from_the_task():
    config = yaml.safe_load((REPO / "configs" / "fig8" / "paper_run.yaml").read_text())
    config["model"]["init_args"] |= {"grad_checkpointing": False, "compile": False}
    eager = estimate(config)
    config["model"]["init_args"] |= {"grad_checkpointing": True, "compile": True}
    lean = estimate(config)
    assert "grad_checkpointing true, compile true (estimated as eager: an upper bound)" in lean.title
    saved = eager.total - lean.total
    assert (
        saved
        == eager.parts["activations (without grad checkpointing)"] - lean.parts["activations (with grad checkpointing)"]
    )
    assert lean.activations_other[1] == eager.parts["activations (without grad checkpointing)"]
    assert lean.total < 0.5 * eager.total  # ViT-L/14, 10 crops of 64 images: the activations dominate


def test_a_task_that_needs_its_source_weights_is_estimated_without_reading_them():
    config = yaml.safe_load((REPO / "configs" / "distill.yaml").read_text())
    parts = estimate(config).parts
    assert parts["frozen parameters"] > 0 and parts["activations (without grad checkpointing)"] > 0
