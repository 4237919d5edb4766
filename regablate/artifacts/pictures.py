"""Pictures of artifacts: attention-map grids, outlier-position maps, outliers on each image, norm histograms.

Grids are ``(3, H, W)`` float tensors in [0, 1] (TensorBoard's ``add_image`` and
``torchvision.utils.save_image`` take them as they are); histograms are matplotlib figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only, never a window

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from regablate.models.layout import TokenLayout

_COLORMAP = colormaps["inferno"]


def unnormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo ``Normalize(mean, std)``: ``(B, 3, H, W)`` back to [0, 1]."""
    mean_t = images.new_tensor(mean).view(1, -1, 1, 1)
    std_t = images.new_tensor(std).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0.0, 1.0)


def colorize(maps: Tensor, size: tuple[int, int], *, per_map_scale: bool = True) -> Tensor:
    """``(M, h, w)`` maps -> ``(M, 3, H, W)`` colour images, upsampled (nearest) to ``size``.

    ``per_map_scale`` stretches each map to its own min..max (attention); otherwise values are
    read as already in [0, 1] (frequencies), so maps stay comparable.
    """
    maps = maps.float()
    if per_map_scale:
        low = maps.amin(dim=(-2, -1), keepdim=True)
        high = maps.amax(dim=(-2, -1), keepdim=True)
        maps = (maps - low) / (high - low).clamp_min(1e-12)
    rgb = torch.from_numpy(_COLORMAP(maps.clamp(0, 1).numpy())[..., :3]).permute(0, 3, 1, 2).float()
    return F.interpolate(rgb, size=size, mode="nearest")


def attention_grid(images: Tensor, *maps: Tensor) -> Tensor:
    """One row per image: the image, its global query's attention map, then one map per register.

    ``images``: ``(B, 3, H, W)`` in [0, 1]; ``maps``: ``(B, 1 + R, h, w)`` from ``stats.query_attention_maps``;
    several ``maps`` (before and after an intervention) follow each other in the row.
    """
    b = images.shape[0]
    height, width = images.shape[-2:]
    tiles = [colorize(group.flatten(0, 1), (height, width)).view(b, group.shape[1], 3, height, width) for group in maps]
    rows = torch.cat([images.cpu().float().unsqueeze(1), *tiles], dim=1)
    return make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=2, pad_value=1.0)


def attention_labels(layout: TokenLayout, query: str, group: str = "") -> list[str]:
    """The column titles of one ``query_attention_maps`` group: the global ``query``, each register, the test-time one.

    ``group`` (``before``, ``after``) is added on a second line.
    """
    names = [query, *(f"reg {i + 1}" for i in range(layout.num_registers))]
    names += ["test-time reg"] * layout.test_time_registers
    return [f"{name}\n{group}" if group else name for name in names]


def attention_figure(images: Tensor, maps: Sequence[Tensor], labels: Sequence[str], title: str = "") -> Figure:
    """:func:`attention_grid` with every column titled: ``image``, then ``labels``, one per map column.

    The tiles keep their pixels (nearest neighbour, at least 64 screen pixels each), so the maps read as the grid does.
    """
    grid = attention_grid(images, *maps)
    columns = 1 + sum(group.shape[1] for group in maps)
    if len(labels) != columns - 1:
        raise ValueError(f"{columns - 1} map columns but {len(labels)} labels")
    tile_width = images.shape[-1]
    scale = max(1.0, 64 / tile_width)
    height, width = grid.shape[-2] * scale, grid.shape[-1] * scale
    header = 48 if not title else 66  # pixels above the grid for two-line column titles (and the title)
    figure = Figure(figsize=(width / 100, (height + header) / 100), dpi=100)
    axes = figure.add_axes((0.0, 0.0, 1.0, height / (height + header)))
    axes.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes.set_xticks([2 + (tile_width + 2) * i + tile_width / 2 for i in range(columns)], ["image", *labels])
    axes.set_yticks([])
    axes.xaxis.tick_top()
    axes.tick_params(length=0, labelsize=7)
    for spine in axes.spines.values():
        spine.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=8, y=1.0, va="top")
    return figure


def position_grid(positions: dict[int, Tensor], tile: int = 64) -> Tensor:
    """Outlier frequency per patch position, one tile per block (in block order), on one colour scale."""
    maps = torch.stack([positions[block] for block in sorted(positions)])
    return make_grid(
        colorize(maps, (tile, tile), per_map_scale=False), nrow=min(8, len(maps)), padding=2, pad_value=1.0
    )


def outlier_grid(
    images: Tensor, outliers: Tensor, grid: tuple[int, int], segmentation: Tensor | None = None, per_row: int = 8
) -> Tensor:
    """Each image with its outlier patches in red and, when its mask is known, its background dimmed.

    ``images``: ``(B, 3, H, W)`` in [0, 1]; ``outliers``: ``(B, N)`` bool; ``segmentation``: ``(B, H, W)``
    with 0 for background. Shows, image by image, whether the outliers sit on objects or around them.
    """
    b, _, height, width = images.shape
    tiles = images.detach().cpu().float()
    if segmentation is not None:
        tiles = torch.where((segmentation.cpu() == 0)[:, None], tiles * 0.35, tiles)
    marked = F.interpolate(outliers.cpu().view(b, 1, *grid).float(), size=(height, width), mode="nearest") > 0
    red = torch.tensor([1.0, 0.1, 0.1]).view(1, 3, 1, 1)
    tiles = torch.where(marked, 0.4 * tiles + 0.6 * red, tiles)
    return make_grid(tiles, nrow=min(per_row, b), padding=2, pad_value=1.0)


def norm_histogram(norms: Tensor, cutoff: float, block: int, threshold: str) -> Figure:
    """Histogram of one block's patch-token norms (log counts) with the outlier cutoff marked."""
    figure = Figure(figsize=(5, 3.2), dpi=100)
    axes = figure.subplots()
    values = norms.flatten().float().numpy()
    axes.hist(values, bins=60, color="#4c72b0", log=True)
    axes.axvline(cutoff, color="#c44e52", linestyle="--", label=f"cutoff {cutoff:.3g} ({threshold})")
    share = float((values > cutoff).mean())
    axes.set_title(f"block {block}: patch-token norms ({share:.2%} outliers)")
    axes.set_xlabel("L2 norm (pre-norm residual stream)")
    axes.set_ylabel("tokens")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure
