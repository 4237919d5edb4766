"""Progress of long work as log lines with a rate and an ETA (batch jobs read logs, not bars)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """``seconds`` for people: 42 s, 3 min 5 s, 2 h 10 min."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Progress:
    """Counts done items of ``total`` and prints a line every ``every_seconds`` (and one at the end)::

    probe: extracting train: 12800/160146 (8%), 2104 images/s, ETA 1 min 15 s
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "images",
        every_seconds: float = 30.0,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every_seconds
        self.stream, self.enabled = stream, enabled
        self.done = 0
        self.started = self._last = time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self._last >= self.every and self.done < self.total:
            self._last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            share = self.done / max(self.total, 1)
            self._print(
                f"{self.label}: {self.done}/{self.total} ({share:.0%}), {rate:.0f} {self.unit}/s, ETA {duration(eta)}"
            )

    def finish(self) -> float:
        """Print the closing line; return the seconds it took."""
        seconds = time.perf_counter() - self.started
        rate = self.done / max(seconds, 1e-9)
        self._print(f"{self.label}: {self.done} {self.unit} in {duration(seconds)} ({rate:.0f} {self.unit}/s)")
        return seconds

    def _print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream or sys.stdout, flush=True)
