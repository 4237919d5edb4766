"""What ``regablate inspect`` writes into its output folder and prints about register neurons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from torchvision.utils import save_image

from regablate.artifacts.pictures import attention_grid, norm_histogram, outlier_grid, position_grid
from regablate.artifacts.register_neurons import NEURONS_FILE, RegisterNeurons
from regablate.artifacts.scan import ArtifactScan
from regablate.artifacts.token_probes import TokenProbeResult
from regablate.runs import write_json_atomic


def write_outputs(
    folder: Path,
    result: ArtifactScan,
    images: Tensor,
    stats: dict[str, Any],
    neurons: RegisterNeurons | None = None,
    segmentation: Tensor | None = None,
    tokens: TokenProbeResult | None = None,
) -> None:
    write_json_atomic(folder / "stats.json", stats)
    if neurons is not None:
        neurons.save(folder / NEURONS_FILE)
    if tokens is not None:
        tokens.save(folder)
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
