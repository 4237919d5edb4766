"""What ``regablate inspect`` writes into its output folder and prints about register neurons."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor
from torchvision.utils import save_image

from regablate.artifacts.pictures import attention_figure, attention_labels, norm_histogram, outlier_grid, position_grid
from regablate.artifacts.register_neurons import NEURONS_FILE, RegisterNeurons
from regablate.artifacts.scan import ArtifactScan
from regablate.artifacts.token_probes import TokenProbeResult
from regablate.models.layout import Backbone, TokenLayout
from regablate.runs import intervention_label, write_json_atomic


def write_outputs(
    folder: Path,
    result: ArtifactScan,
    images: Tensor,
    stats: dict[str, Any],
    columns: list[str],
    neurons: RegisterNeurons | None = None,
    segmentation: Tensor | None = None,
    tokens: TokenProbeResult | None = None,
    after: ArtifactScan | None = None,
) -> None:
    """Every file of an inspect output into ``folder``; ``after``: the scan with the intervention ``stats`` names.

    ``attention.png`` titles its columns (``columns``, from :func:`attention_columns`) and keeps the titles
    in its PNG text as ``Columns`` (``image | CLS before | reg 1 before | ... | CLS after | ...``).
    """
    write_json_atomic(folder / "stats.json", stats)
    if neurons is not None:
        neurons.save(folder / NEURONS_FILE)
    if tokens is not None:
        tokens.save(folder)
    maps = [result.attention_maps] if after is None else [result.attention_maps, after.attention_maps]
    figure = attention_figure(images, maps, columns, title=intervention_label(stats) or "")
    titles = " | ".join(title.replace("\n", " ") for title in ["image", *columns])
    figure.savefig(folder / "attention.png", metadata={"Columns": titles})
    save_image(position_grid(result.outlier_positions), folder / "outlier_positions.png")
    save_image(outlier_grid(images, result.outliers, result.grid, segmentation), folder / "outliers.png")
    (folder / "norms").mkdir()
    for block, norms in result.patch_norms.items():
        figure = norm_histogram(norms, result.cutoffs[block], block, stats["threshold"])
        figure.savefig(folder / "norms" / f"block_{block:02d}.png")


def attention_columns(model: Backbone, test_registers: int | None = None, intervened: bool = False) -> list[str]:
    """The titles of attention.png's map columns: the global query and each register, before and after an
    intervention that keeps ``test_registers`` of them."""
    layout = TokenLayout.of(model)
    query = "CLS" if layout.has_cls else "attn pool" if model.attn_pool is not None else "patches"
    if not intervened:
        return attention_labels(layout, query)
    kept = layout if test_registers is None else replace(layout, num_registers=test_registers)
    return attention_labels(layout, query, "before") + attention_labels(kept, query, "after")


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
