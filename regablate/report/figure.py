"""Figure 8 of a grid: attention maps per register count on top, metrics against the register count below."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import torch
from matplotlib.figure import Figure, SubFigure
from torch import Tensor

from regablate.artifacts.scan import scan
from regablate.data.common import IMAGENET_MEAN, IMAGENET_STD
from regablate.data.images import load_image_folder, synthetic_images
from regablate.errors import RegablateError
from regablate.models.resolve import load_backbone
from regablate.report.paper import PANELS, TTR_SERIES, Overlay

IMAGE_SEED = 0  # the fixed synthetic scenes every register count is shown on


def attention_rows(experiment: Path, rows: list[dict[str, Any]], images: str | None, num_images: int) -> dict[str, Any]:
    """``images`` (B, 3, H, W) in [0, 1] and ``maps``: register count -> (B, h, w) last-block CLS attention.

    Each register count is shown by its lowest-seed run that has a checkpoint; every backbone
    sees the same images (the grid's, or fixed synthetic scenes) with ImageNet normalisation.
    """
    chosen: dict[int, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r.get("seed") or 0, r["run"])):
        registers = row.get("num_registers")
        has_checkpoint = any((experiment / row["run"] / "checkpoints").glob("*.ckpt"))
        if registers is not None and has_checkpoint and int(registers) not in chosen:
            chosen[int(registers)] = row
    maps: dict[int, Tensor] = {}
    shown: Tensor | None = None
    for registers, row in sorted(chosen.items()):
        model = load_backbone(experiment / row["run"], "best")
        size = tuple(model.patch_embed.img_size)
        if images:
            batch = load_image_folder(Path(images), num_images, size, IMAGENET_MEAN, IMAGENET_STD)
        else:
            batch, _ = synthetic_images(IMAGE_SEED, num_images, size, IMAGENET_MEAN, IMAGENET_STD)
        maps[registers] = scan(model, batch).attention_maps[:, 0]
        if shown is None:
            mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            shown = (batch * std + mean).clamp(0, 1)
    return {"images": shown, "maps": maps}


def draw_figure8(
    path: Path,
    title: str,
    table: dict[str, dict[int, dict[str, list[float]]]],
    attention: dict[str, Any],
    overlays: dict[str, Overlay] | None = None,
) -> Figure:
    """Save (and return) the figure: attention rows (one per image) over the four metric panels.

    ``overlays`` (``paper_overlays``) puts the paper's matching values on their panels, in the
    grid's units and axis, each labelled with its source; a panel without any says why.
    """
    maps: dict[int, Tensor] = attention["maps"]
    images: Tensor | None = attention["images"]
    counts = sorted({registers for series in table.values() for registers in series})
    if not counts:
        raise RegablateError("no run has a num_registers in its summary: nothing to plot")
    num_rows = 0 if images is None else len(images)
    figure = Figure(figsize=(13, 3.4 + 1.6 * num_rows), layout="constrained")
    figure.suptitle(f"{title}: attention maps and frozen-feature probes against the register count", fontsize=12)
    bottom: Figure | SubFigure = figure
    if images is not None and num_rows:
        top, bottom = figure.subfigures(2, 1, squeeze=False, height_ratios=[num_rows * 1.6, 3.4])[:, 0]
        _attention_panel(top, images, maps)
    axes = bottom.subplots(1, len(PANELS))
    positions = {registers: i for i, registers in enumerate(counts)}
    for ax, (key, label, higher) in zip(axes, PANELS):
        plotted = False
        for series, cells in sorted(table.items()):
            points = [(positions[r], cells[r][key]) for r in counts if cells.get(r, {}).get(key)]
            if not points:
                continue
            xs = [x for x, _ in points]
            means = [statistics.fmean(v) for _, v in points]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
            marker = "D" if TTR_SERIES in series else "o"
            ax.errorbar(xs, means, yerr=stds, marker=marker, capsize=3, label=series if len(table) > 1 else "this grid")
            plotted = True
        if not plotted:
            ax.text(
                0.5, 0.5, f"no {key}\nin the summaries", ha="center", va="center", transform=ax.transAxes, color="grey"
            )
        overlay = (overlays or {}).get(key)
        if overlay is not None:
            _draw_paper(ax, overlay, positions)
            plotted = plotted or bool(overlay.values)
        ax.set_xticks(range(len(counts)), [str(c) for c in counts])
        ax.set_xlabel("registers")
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if plotted and (len(table) > 1 or (overlay is not None and overlay.values)):
            ax.legend(fontsize=7)
    figure.savefig(path, dpi=90)
    return figure


def _draw_paper(ax: Any, overlay: Overlay, positions: dict[int, int]) -> None:
    """The paper's values on the panel's own axis (Figure 8: a curve; Table 2a: points), or why there are none."""
    for values in overlay.values:
        points = [(positions[r], v) for r, v in sorted(values.points().items()) if r in positions]
        curve = values.source.startswith("Figure")
        if points:
            xs, ys = zip(*points)
            ax.plot(
                xs,
                ys,
                "s--" if curve else "*",
                color="grey",
                alpha=0.8,
                markersize=6 if curve else 10,
                label=values.label,
            )
    if not overlay.values:
        ax.text(0.02, 0.02, f"paper: {overlay.reason}", transform=ax.transAxes, fontsize=7, color="grey")


def _attention_panel(top: Any, images: Tensor, maps: dict[int, Tensor]) -> None:
    """Rows: the image, then the CLS attention of each register count's model."""
    counts = sorted(maps)
    cells = top.subplots(len(images), 1 + len(counts), squeeze=False)
    for row, image in enumerate(images):
        cells[row][0].imshow(image.permute(1, 2, 0).numpy())
        for column, registers in enumerate(counts, start=1):
            cells[row][column].imshow(maps[registers][row].numpy(), cmap="inferno", interpolation="nearest")
            if row == 0:
                cells[row][column].set_title(f"{registers} register{'s' if registers != 1 else ''}", fontsize=9)
        if row == 0:
            cells[row][0].set_title("image", fontsize=9)
        for cell in cells[row]:
            cell.set_xticks([])
            cell.set_yticks([])
