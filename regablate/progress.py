"""Progress of long work, one implementation for every long loop: feature extraction, probe heads,
dataset preparation and sweeps.

On a terminal it is a tqdm bar; elsewhere (a batch job's log, a pipe, a sweep's stage log) tqdm's
carriage returns would pile up into one unreadable line, so it prints a plain line every
``every_seconds`` instead, with the same figures::

    probe: extracting train: 12800/160146 (8%), 2104 images/s, ETA 1 min 15 s

Both end with one closing line (``... 160146 images in 1 min 16 s (2104 images/s)``). Durations
everywhere in regablate are written by :func:`duration`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def duration(seconds: float) -> str:
    """``seconds`` for people: 42 s, 3 min 5 s, 2 h 10 min."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class _Bar(tqdm):
    """tqdm with regablate's duration format for the ETA (``{eta_text}`` in the bar format)."""

    @property
    def format_dict(self) -> dict[str, Any]:
        figures = super().format_dict
        rate, total, done = figures.get("rate"), figures.get("total"), figures.get("n", 0)
        figures["eta_text"] = duration((total - done) / rate) if rate and total else "?"
        return figures


class Progress:
    """Counts done items of ``total`` (``initial`` of them done before it started) with a rate and an ETA.

    ``enabled=False`` prints nothing (ranks other than the first). The rate, and so the ETA, counts
    only the items done since the start, not ``initial``.
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "images",
        every_seconds: float = 30.0,
        stream: TextIO | None = None,
        enabled: bool = True,
        initial: int = 0,
    ) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every_seconds
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.initial = self.done = initial
        self.started = self._last = time.perf_counter()
        self._bar: tqdm | None = None
        if enabled and _is_terminal(self.stream):
            self._bar = _Bar(
                total=total,
                initial=initial,
                desc=label,
                unit=f" {unit}",
                file=self.stream,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}, {rate_fmt}, ETA {eta_text}]",
                leave=False,
                dynamic_ncols=True,
            )

    def wrap(self, items: Iterable[T], size: int = 1) -> Iterator[T]:
        """Yield ``items``, counting ``size`` per item; the closing line when they run out."""
        for item in items:
            yield item
            self.update(size)
        self.finish()

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.perf_counter()
        if now - self._last >= self.every and self.done < self.total:
            self._last = now
            share = self.done / max(self.total, 1)
            self._print(f"{self.label}: {self.done}/{self.total} ({share:.0%}), {self.rate_text()}{self.eta_text()}")

    def rate(self) -> float:
        """Items per second since the start."""
        return (self.done - self.initial) / max(time.perf_counter() - self.started, 1e-9)

    def rate_text(self) -> str:
        rate = self.rate()
        return f"{rate:.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2g} {self.unit}/s"

    def eta_text(self) -> str:
        """``, ETA 3 min 5 s`` from the rate so far, or nothing when there is no rate yet or nothing is left."""
        left, rate = self.total - self.done, self.rate()
        return f", ETA {duration(left / rate)}" if left > 0 and rate > 0 else ""

    def finish(self) -> float:
        """Close the bar and print the closing line; return the seconds it took."""
        seconds = time.perf_counter() - self.started
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        done = self.done - self.initial
        self._print(f"{self.label}: {done} {self.unit} in {duration(seconds)} ({self.rate_text()})")
        return seconds

    def _print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
