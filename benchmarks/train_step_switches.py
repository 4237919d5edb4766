"""What the tasks' ``compile`` and ``grad_checkpointing`` switches cost and save in a training step.

A step is what ``regablate fit`` runs: forward, loss, backward, AdamW. The machine this runs on is
shared, so step times are compared *interleaved*: one process builds both variants and alternates
their steps after ``--warmup`` steps each, so that load hits both alike; medians and their ratio,
of wall time and of the process's CPU time (with one thread, what an idle machine's wall time would be).
Each part runs in a fresh process of its own (``--child``), the compile from an empty inductor
cache (a cold compile, as on a new machine).

* ``compile``: the quickstart's model and batch (configs/quickstart.yaml: ViT with 4 registers,
  width 96, 4 blocks, 32 px, batch 64), eager against compiled. Printed: the median steps and
  their ratio, the compile time (the compiled first step less its median step; wall time, and CPU
  time with the compiler processes', which load on a shared machine does not inflate), and the graphs
  and graph breaks dynamo counted (``torch._dynamo.utils.counters``).
* ``grad_checkpointing``: ViT-S/16 with 4 registers at 224 px, batch 32 (``--ckpt_model`` and
  ``--ckpt_batch`` change them), without and with. Memory: each variant alone in a fresh process,
  the peak resident memory of its first step (``ru_maxrss``) above the memory before it (model,
  AdamW, batch), and their ratio (target <= 0.6). Time: interleaved medians and their ratio
  (about 1.3x expected: one more forward of the backbone).
* ``recompiles``: a DINO fit of tests/configs/tiny_dino.yaml with both switches on, validating every
  2 steps, with the outlier monitor (a fixed-image scan and a reading of the training forward)
  and the attention maps at every step. Printed: the graphs dynamo has compiled after each step
  and each validation, and its graph breaks; a capture that recompiled would add graphs at every
  step.

    python benchmarks/train_step_switches.py [--threads 1] [--steps 5] [--warmup 2]
        [--only compile|grad_checkpointing|recompiles]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_throughput import load_config

from regablate.tasks import Classification

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def quickstart(switches: dict[str, Any]) -> tuple[Classification, int, int]:
    """The quickstart's model with ``switches``, its image side and batch size."""
    config = load_config(REPO / "configs" / "quickstart.yaml")
    data = config["data"]["init_args"]
    model = Classification(img_size=data["img_size"], **config["model"]["init_args"], **switches)
    return model, data["img_size"], data["batch_size"]


def vit_s(model_name: str, switches: dict[str, Any]) -> Classification:
    return Classification(model_name=model_name, num_registers=4, num_classes=10, img_size=224, **switches)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (inductor's compiler runs), user and system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Variant:
    """A model, its optimiser and a batch: one training step at a time."""

    def __init__(self, model: Classification, side: int, batch: int) -> None:
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.images = torch.randn(batch, 3, side, side)
        self.labels = torch.randint(0, model.hparams.num_classes, (batch,))

    def step(self) -> tuple[float, float]:
        """One step: (wall seconds, CPU seconds of this process)."""
        start, start_cpu = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.loss(self.model(self.images), self.labels).backward()
        self.optimizer.step()
        return time.perf_counter() - start, time.process_time() - start_cpu


def variant(spec: dict[str, Any], switches: dict[str, Any]) -> Variant:
    torch.manual_seed(0)
    if spec["part"] == "compile":
        model, side, batch = quickstart(switches)
        return Variant(model, side, batch)
    return Variant(vit_s(spec["model"], switches), 224, spec["batch"])


def interleaved(spec: dict[str, Any], off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """Median step times (wall and CPU) of two variants, their steps alternating, and the first step of the second."""
    a, b = variant(spec, off), variant(spec, on)
    for _ in range(spec["warmup"]):
        a.step()
    cpu = cpu_seconds()
    first_b, _ = b.step()
    first_b_cpu = cpu_seconds() - cpu
    for _ in range(spec["warmup"] - 1):
        b.step()
    times_a, times_b = [], []
    for _ in range(spec["steps"]):
        times_a.append(a.step())
        times_b.append(b.step())
    return {
        "off": statistics.median(t[0] for t in times_a),
        "on": statistics.median(t[0] for t in times_b),
        "off_cpu": statistics.median(t[1] for t in times_a),
        "on_cpu": statistics.median(t[1] for t in times_b),
        "first_on": first_b,
        "first_on_cpu": first_b_cpu,
    }


def first_step_memory(spec: dict[str, Any], switches: dict[str, Any]) -> dict[str, Any]:
    """Peak resident memory of one variant's first step above the memory before it (this process alone)."""
    one = variant(spec, switches)
    before, peak_before = resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    one.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_peak": peak - before, "peak_before_step": peak_before - before}


def graphs_per_step(steps: int) -> list[str]:
    """Compile a tiny DINO fit with monitors at every step; the graph count after each step and validation."""
    from lightning import Callback, Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch._dynamo.utils import counters

    from regablate.callbacks import AttentionMaps, OutlierNormMonitor
    from regablate.data import SyntheticScenes
    from regablate.tasks import DINO

    config = load_config(REPO / "tests" / "configs" / "tiny_dino.yaml")
    data = SyntheticScenes(**config["data"]["init_args"])
    model = DINO(img_size=data.img_size, **config["model"]["init_args"], compile=True, grad_checkpointing=True)
    seen: list[str] = []

    class Count(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append(f"step {trainer.global_step}: {counters['stats']['unique_graphs']}")

        def on_validation_end(self, trainer, pl_module) -> None:
            seen.append(f"validation: {counters['stats']['unique_graphs']}")

    monitors = [
        OutlierNormMonitor(every_n_steps=1, num_images=4, histograms=False, train_batch_every_n_steps=1),
        AttentionMaps(num_images=4, every_n_steps=1),
    ]
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(
            default_root_dir=folder,  # the monitor's summary.json goes here, not into the working folder
            max_steps=steps,
            val_check_interval=2,
            check_val_every_n_epoch=None,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            logger=TensorBoardLogger(folder),
            callbacks=[*monitors, Count()],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, data)
    seen.append(f"graph breaks: {sum(counters['graph_break'].values())}")
    return seen


def child(spec: dict[str, Any]) -> None:
    """Measure what ``spec`` asks for in this process and print it as one JSON line."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(spec["threads"])
    if spec["measure"] == "memory":
        result = first_step_memory(spec, spec["switches"])
    elif spec["measure"] == "graphs":
        result = {"graphs": graphs_per_step(spec["steps"])}
    else:
        result = interleaved(spec, {}, spec["switches"])
        result["graphs"] = counters["stats"]["unique_graphs"]
        result["graph_breaks"] = sum(counters["graph_break"].values())
    print("RESULT " + json.dumps(result))


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(spec["threads"])}
        result = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
        )
    if result.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def compare_compile(base: dict[str, Any]) -> None:
    times = run_child({**base, "part": "compile", "measure": "time", "switches": {"compile": True}})
    eager, compiled = times["off"], times["on"]
    eager_cpu, compiled_cpu = times["off_cpu"], times["on_cpu"]
    print(
        f"compile (quickstart model, batch 64, 32 px): median step eager {eager * 1e3:.1f} ms, "
        f"compiled {compiled * 1e3:.1f} ms: compiled/eager {compiled / eager:.2f}x wall; CPU "
        f"{eager_cpu * 1e3:.1f} / {compiled_cpu * 1e3:.1f} ms: {compiled_cpu / eager_cpu:.2f}x"
    )
    print(
        f"compile time (first compiled step less its median): {times['first_on'] - compiled:.1f} s wall, "
        f"{times['first_on_cpu'] - compiled_cpu:.1f} s CPU; "
        f"graphs compiled {times['graphs']}, graph breaks {times['graph_breaks']}"
    )


def compare_checkpointing(base: dict[str, Any], model: str, batch: int) -> None:
    spec = {**base, "part": "grad_checkpointing", "model": model, "batch": batch}
    on_switch = {"grad_checkpointing": True}
    off = run_child({**spec, "measure": "memory", "switches": {}})
    on = run_child({**spec, "measure": "memory", "switches": on_switch})
    for name, result in (("off", off), ("on", on)):
        if result["peak_before_step"] > result["step_peak"]:
            print(
                f"warning: building the model ({name}) peaked above its first step: the memory ratio is not the step's"
            )
    ratio = on["step_peak"] / off["step_peak"]
    print(
        f"grad_checkpointing ({model}, 224 px, batch {batch}): first-step peak over the model "
        f"{off['step_peak'] / 1e6:.0f} MB off, {on['step_peak'] / 1e6:.0f} MB on: on/off {ratio:.2f} (target <= 0.6)"
    )
    times = run_child({**spec, "measure": "time", "switches": on_switch})
    print(
        f"grad_checkpointing step time: median {times['off']:.2f} s off, {times['on']:.2f} s on: "
        f"on/off {times['on'] / times['off']:.2f}x wall, {times['on_cpu'] / times['off_cpu']:.2f}x CPU "
        "(about 1.3x expected)"
    )


def count_recompiles(base: dict[str, Any]) -> None:
    result = run_child({**base, "part": "recompiles", "measure": "graphs", "steps": max(base["steps"], 6)})
    print("recompiles (tiny DINO, both switches, monitor and attention maps at every step): graphs compiled after")
    print("  " + "; ".join(result["graphs"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile is in the first)")
    parser.add_argument("--only", choices=["compile", "grad_checkpointing", "recompiles"], default=None)
    parser.add_argument("--ckpt_model", default="vit_small_patch16_224", help="timm ViT of the checkpointing part")
    parser.add_argument("--ckpt_batch", type=int, default=32, help="batch of the checkpointing part")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    base = {"threads": args.threads, "steps": args.steps, "warmup": args.warmup}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.warmup} untimed + {args.steps} timed steps")
    if args.only in (None, "compile"):
        compare_compile(base)
    if args.only in (None, "grad_checkpointing"):
        compare_checkpointing(base, args.ckpt_model, args.ckpt_batch)
    if args.only in (None, "recompiles"):
        count_recompiles(base)


if __name__ == "__main__":
    main()
