"""How a grid's report is drawn: the ``report:`` section of a grid file, and ``regablate report``'s flags."""

from __future__ import annotations

from dataclasses import dataclass

from jsonargparse.typing import PositiveInt


@dataclass
class Report:
    """The report's settings.

    Args:
        enabled: write the report when the sweep ends (a study that compares no register counts turns it off).
        images: image folder for the attention-map rows (default: fixed synthetic scenes); in a grid
            file, relative to the file.
        num_images: images in the attention-map rows.
        paper: overlay the paper's values measured like the grid's (same dataset, dinov2 protocol), with their source.
    """

    enabled: bool = True
    images: str | None = None
    num_images: PositiveInt = 2
    paper: bool = False
