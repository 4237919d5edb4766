"""Stages forked from a preloaded parent: a local sweep imports torch, Lightning, timm and regablate once.

A stage run as ``python -m regablate ...`` spends seconds importing before it does any work, and a
grid runs dozens of stages. ``Preloaded`` keeps one parent process, multiprocessing's forkserver
with ``PRELOAD`` imported (and nothing else done: no CUDA, no threads), and forks each stage
from it. The forked stage is the process ``python -m regablate ARGS`` would have been:

* ``regablate/__main__.py`` run as ``python -m regablate ARGS`` runs it (``runpy``): ``sys.argv`` and
  ``__main__`` as there, so Lightning's DDP launcher, which re-executes the command line for ranks
  1..N-1, starts ``python -m regablate.__main__ ARGS`` (new processes);
* its own environment (``CUDA_VISIBLE_DEVICES`` per slot; CUDA was never initialised in the parent),
  working folder, and stdout/stderr appended to the stage's log;
* fresh random states: Python's and numpy's reseeded from the OS, torch's back to its start value;
* its exit code as a process's: a ``SystemExit``'s code, 1 and the traceback for an exception,
  death by SIGINT after Ctrl-C, the signal of a crash (a segfault is ``-11`` to the sweep);
* no orphans after ``kill -9`` of the sweep, of its process group or of the fork server (Linux): the
  server gets SIGKILL when the sweep dies (``regablate.sweep.forkserver_guard``, the first module it
  imports), and the stage when the server dies.

The sweep starts the server from its main thread (Linux sends the signal when the thread that started
a process ends).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import runpy
import signal
import sys
import traceback
from multiprocessing.context import ForkServerContext
from typing import TextIO

from regablate.sweep import forkserver_guard
from regablate.sweep.deathsig import die_with_parent

# Modules the fork server imports once: everything a stage imports before its own work starts.
PRELOAD = (
    "torch",
    "lightning",
    "timm",
    "regablate.cli",
    "regablate.lightning_cli",
    "regablate.tasks",
    "regablate.data",
    "regablate.probe.command",
    "regablate.probe.job",
    "regablate.artifacts.inspect",
)


class ForkedStage:
    """A stage running in a process forked from the fork server: ``poll``/``wait``/``kill`` as a ``Popen``'s."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self) -> int:
        self.process.join()
        assert self.process.exitcode is not None
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()


class Preloaded:
    """The fork server of this sweep; ``start`` forks a stage from it (the server starts on first use)."""

    def __init__(self, modules: tuple[str, ...] = PRELOAD) -> None:
        self.context: ForkServerContext = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload([forkserver_guard.__name__, *modules])

    def warm_up(self) -> None:
        """Start the fork server (if it is not running), so that its imports overlap with the sweep's planning.

        The server learns this process's pid from its environment, to die with it.
        """
        from multiprocessing import forkserver

        os.environ[forkserver_guard.SWEEP_PID_VARIABLE] = str(os.getpid())
        try:
            forkserver.ensure_running()
        finally:
            del os.environ[forkserver_guard.SWEEP_PID_VARIABLE]

    def start(self, command: list[str], log: TextIO, env: dict[str, str]) -> ForkedStage:
        """Run ``command`` (``python -m regablate ARGS``) as a forked stage writing to ``log``'s file."""
        log.flush()
        self.warm_up()  # a server that died is started again, guarded as the first
        process = self.context.Process(
            target=run_stage, args=(command[3:], env, os.getcwd(), log.name), name=f"regablate {command[3]}"
        )
        process.start()
        return ForkedStage(process)


def run_stage(args: list[str], env: dict[str, str], cwd: str, log_path: str) -> None:
    """The forked stage: become ``python -m regablate ARGS`` with ``env`` in ``cwd``, run it, exit as it would."""
    die_with_parent(forkserver_guard.SERVER_PID)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    _redirect_output(log_path)
    _fresh_random_states()
    sys.argv = ["-m", *args]  # runpy puts regablate/__main__.py first, as python -m does
    code = 0
    try:
        runpy.run_module("regablate", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = _exit_status(exit_.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        _exit_handlers()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # as Python ends after an unhandled Ctrl-C
    except BaseException:
        traceback.print_exc()
        code = 1
    _exit_handlers()
    raise SystemExit(code)


def _redirect_output(log_path: str) -> None:
    """stdout and stderr (the file descriptors, so child processes inherit them) appended to the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _fresh_random_states() -> None:
    """The random states a new process starts with: the fork server's copies would be shared by every stage."""
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(torch.initial_seed())


def _exit_status(code: object) -> int:
    """The exit status Python gives ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _exit_handlers() -> None:
    """What a Python process does on its way out: ``atexit`` handlers (log flushes, ...), then its streams flushed."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
