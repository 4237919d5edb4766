"""A process that dies when its parent dies (Linux's ``PR_SET_PDEATHSIG``), so a killed sweep leaves no orphans."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int | None = None) -> None:
    """Linux: this process gets SIGKILL when its parent dies, so no orphan keeps writing a run.

    ``parent`` is the pid the parent had: a parent that died before the request took effect (this
    process already adopted by another) kills this process at once, as the signal would have. Other
    systems: nothing (there a killed sweep's process group must be killed whole).
    """
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
