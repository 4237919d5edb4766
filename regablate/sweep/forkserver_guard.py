"""The first module the sweep's fork server imports: it makes the server die with the sweep that started it.

Preloading is multiprocessing's one hook into the fork server, so this module's import is its effect,
and only where the sweep asked for it: ``Preloaded`` starts the server with its own pid in
``REGABLATE_SWEEP_PID``. The server then gets SIGKILL when the sweep dies (``kill -9`` of the sweep
alone included), and each stage forked from it gets SIGKILL when the server dies, so no stage outlives
the sweep. Without this, the server outlives a killed sweep while a stage runs: it waits for every
holder of its "alive" pipe, the stage among them, and the stage waits for the server.
Imported anywhere else (without the variable) it does nothing.
"""

from __future__ import annotations

import os

from regablate.sweep.deathsig import die_with_parent

SWEEP_PID_VARIABLE = "REGABLATE_SWEEP_PID"

_sweep = os.environ.pop(SWEEP_PID_VARIABLE, None)  # popped: the stages forked from here do not inherit it
if _sweep is not None:
    die_with_parent(int(_sweep))

# The fork server's pid, inherited by every stage forked from it (which dies with this process).
SERVER_PID: int | None = os.getpid() if _sweep is not None else None
