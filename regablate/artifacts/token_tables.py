"""The token probes' table (``regablate.artifacts.token_probes``) as people read it: printed under inspect's
verdict and the probe's results, in ``regablate report``'s results.md, as flat summary keys, and the outlier
map of the probed block (the paper's Fig. 10).

Everything here reads the table as ``token_probes.json`` holds it (a plain mapping), so the report needs
no model and no torch work.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the report reads tables without torch or matplotlib
    from matplotlib.figure import Figure
    from torch import Tensor

TOKEN_PROBES_FILE = "token_probes.json"
OUTLIER_MAP_FILE = "outlier_map.png"
PROBE_NAMES = ("position", "pixels", "class")
# The kinds whose numbers also go into summary.json / stats.json (registers stay in token_probes.json).
SUMMARY_KINDS = ("cls", "normal", "outlier")
NOT_A_PATCH = "not a patch: no position or pixels of its own"


def summary_keys(table: dict[str, Any], prefix: str) -> dict[str, float | int]:
    """Flat numbers of the class token, normal and outlier patches (``<prefix><kind>_<probe>``), and the block."""
    keys: dict[str, float | int] = {f"{prefix}block": table["block"]}
    for kind in SUMMARY_KINDS:
        for name in PROBE_NAMES:
            value = table["kinds"].get(kind, {}).get(name, {}).get("value")
            if value is not None:
                keys[f"{prefix}{kind}_{name}"] = value
    return keys


def table_rows(table: dict[str, Any]) -> list[list[str]]:
    """The table's header and one row per kind: token counts, then each probe's value (chance), or ``-``."""
    scored = table["scored_on"]
    header = ["kind", f"tokens train/{scored}", "position top-1", "pixel error", "class top-1"]
    rows = [header]
    for kind in sorted(table["kinds"], key=_kind_order):  # token_probes.json keeps its keys sorted by name
        cells = table["kinds"][kind]
        row = [kind, f"{cells['tokens']['train']}/{cells['tokens']['test']}"]
        for name in PROBE_NAMES:
            cell = cells[name]
            if cell["value"] is None:
                row.append("-" if cell["why"] == NOT_A_PATCH else "none")
            elif "chance" in cell:
                row.append(f"{cell['value']:.3f} (chance {cell['chance']:.2f})")
            else:
                row.append(f"{cell['value']:.3f}")
        rows.append(row)
    return rows


def _kind_order(kind: str) -> tuple[int, int]:
    """Table order: the class token, the registers by number, a test-time register, normal, outlier patches."""
    if kind.startswith("register_"):
        return 1, int(kind.removeprefix("register_"))
    return ["cls", "", "test_time_register", "normal", "outlier"].index(kind), 0


def text_table(table: dict[str, Any]) -> list[str]:
    """The table as printed lines (``regablate inspect`` and ``regablate probe``)."""
    rows = table_rows(table)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"token probes     : block {table['block']}, trained on {table['images']['train']} images, "
        f"scored on {table['images'][table['scored_on']]} ({TOKEN_PROBES_FILE}; - : not a patch, "
        "none : no tokens or labels)"
    ]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return lines


def markdown_table(table: dict[str, Any]) -> list[str]:
    """The table in markdown (``regablate report``'s results.md)."""
    rows = table_rows(table)
    return [
        "| " + " | ".join(rows[0]) + " |",
        "|---|" + "---:|" * (len(rows[0]) - 1),
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
    ]


def outlier_map(frequency: Tensor, block: int, num_images: int) -> Figure:
    """The paper's Fig. 10: how often each patch position holds an outlier token, over the probed images."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2, 3.6), dpi=100)
    axes = figure.subplots()
    shown = axes.imshow(frequency.numpy(), cmap="inferno", vmin=0.0, vmax=max(float(frequency.max()), 1e-6))
    axes.set_title(f"block {block}: outlier tokens per patch position\n({num_images} images)", fontsize="medium")
    axes.set_xlabel("patch column")
    axes.set_ylabel("patch row")
    figure.colorbar(shown, ax=axes, label="share of images")
    figure.tight_layout()
    return figure


def report_section(experiment: Path, runs: Sequence[str]) -> str:
    """results.md's token-probe tables: one per run folder of ``experiment`` holding a ``token_probes.json``."""
    lines: list[str] = []
    for run in runs:
        path = experiment / run / TOKEN_PROBES_FILE
        if not path.is_file():
            continue
        try:
            table = json.loads(path.read_text())
            rows = markdown_table(table)
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"report: skipped {path}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            continue
        images = table["images"]
        lines += [
            "",
            f"### {run}: token probes at block {table['block']} "
            f"({images['train']} train, {images[table['scored_on']]} {table['scored_on']} images)",
            "",
            *rows,
        ]
    if not lines:
        return ""
    header = [
        "",
        "## Token probes",
        "",
        "What each kind of token holds (`regablate probe --probe.probes [..., token]`): linear probes of the patch "
        "position, the patch's pixels (normalised L2 error, 0 exact, 1 the mean patch) and the image class, each "
        "trained on one kind's tokens and scored on held-out images; `-`: not a patch, `none`: no tokens or labels.",
    ]
    return "\n".join(header + lines) + "\n"
