"""Where a probe runs: ``--accelerator``, ``--devices`` and ``--precision`` turned into a Fabric.

:class:`ProbeDevice` is what every frozen-feature protocol uses to run a backbone: its
``device`` (move the model and the batches there), ``autocast()`` (bf16 autocast on GPUs by
default), and, for more than one device, one process per device through Lightning's ``Fabric``
(``launch()`` re-executes the command line for ranks 1..N-1, as the Trainer's ``ddp`` does;
``shard`` gives each rank its contiguous share of the work). Settings that cannot work here (a
GPU that is not there, more devices than there are) are refused when it is built, before any
work starts::

    where = ProbeDevice(accelerator="auto", devices=1, precision="auto")
    model.to(where.device)
    with torch.inference_mode(), where.autocast():
        tokens = model.forward_features(images.to(where.device, non_blocking=True))
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from lightning.fabric import Fabric

from regablate.errors import RegablateError
from regablate.probe.settings import DeviceSettings


def available_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class ProbeDevice(DeviceSettings):
    """The device, precision and processes of a probe (:class:`DeviceSettings`, checked here against the machine)."""

    def __post_init__(self) -> None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.accelerator == "gpu" and gpus == 0:
            raise RegablateError(
                "--accelerator gpu: torch sees no GPU here (torch.cuda.is_available() is False); "
                "use --accelerator cpu or auto"
            )
        kind = "gpu" if self.accelerator == "gpu" or (self.accelerator == "auto" and gpus) else "cpu"
        available = gpus if kind == "gpu" else available_cpus()
        count = (gpus if kind == "gpu" else 1) if self.devices == "auto" else int(self.devices)
        if count > available:
            where = (
                f"{gpus} GPU(s) visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
                if kind == "gpu"
                else f"{available} CPU core(s) here (one process per device)"
            )
            raise RegablateError(f"--devices {count}: only {where}; ask for at most {available}")
        precision = self.precision
        if precision == "auto":
            precision = "bf16-mixed" if kind == "gpu" and torch.cuda.is_bf16_supported() else "32-true"
        if precision == "16-mixed" and kind == "cpu":
            raise RegablateError("--precision 16-mixed needs a GPU; use 32-true or bf16-mixed on the CPU")
        self.kind, self.count, self.resolved_precision = kind, count, precision

    @cached_property
    def fabric(self) -> Fabric:
        """Lightning's Fabric for these settings (DDP with one process per device when there are several)."""
        return Fabric(
            accelerator="cuda" if self.kind == "gpu" else "cpu",
            devices=self.count,
            strategy="ddp" if self.count > 1 else "auto",
            precision=self.resolved_precision,
        )

    @property
    def device(self) -> torch.device:
        """This process's device."""
        return self.fabric.device

    @property
    def world_size(self) -> int:
        return self.count

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pin_memory(self) -> bool:
        """Whether loaders should pin their batches (host-to-GPU copies that do not block)."""
        return self.device.type == "cuda"

    def autocast(self) -> AbstractContextManager:
        """The precision's autocast context (a no-op for 32-true)."""
        return self.fabric.autocast()

    def describe(self) -> str:
        return f"{self.kind} x{self.count}, {self.resolved_precision}"

    def launch(self) -> None:
        """Start the other ranks' processes (they re-run the command line) and join the process group.

        Everything before this call runs in every process; checks that can fail belong there, so a
        bad input fails once, before any process starts. A no-op for one device.
        """
        self.fabric.launch()

    def barrier(self) -> None:
        if self.count > 1:
            self.fabric.barrier()

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of rank 0, on every rank."""
        return self.fabric.broadcast(obj, src=0) if self.count > 1 else obj

    def shard(self, num_items: int) -> range:
        """This rank's contiguous share of ``num_items`` (rank 0 first; shares differ by at most one item)."""
        return range(self.rank * num_items // self.count, (self.rank + 1) * num_items // self.count)

    @contextmanager
    def stops_the_others_on_error(self) -> Iterator[None]:
        """On rank 0, an error inside the block kills the other ranks, which would otherwise wait for it at
        their next collective. (Lightning's launcher already stops every rank when another rank fails.)"""
        try:
            yield
        except BaseException:
            launcher = getattr(self.fabric.strategy, "launcher", None) if self.count > 1 else None
            processes = getattr(launcher, "procs", [])
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
            for process in processes:
                process.wait()
            processes.clear()  # Lightning's observer watches this list; emptied, it leaves rank 0 to report the error
            raise
