"""What the tasks' ``compile`` and ``grad_checkpointing`` switches cost and save in a training step.

Every variant runs in a fresh process of its own (``--child``): the compile starts from an empty
inductor cache (a cold compile, as on a new machine) and the peak resident memory (``ru_maxrss``)
is that variant's alone. A step is what ``regablate fit`` runs: forward, loss, backward, AdamW.

* ``compile``: the quickstart's model and batch (configs/quickstart.yaml: ViT with 4 registers,
  width 96, 4 blocks, 32 px, batch 64), eager against compiled. Printed: the median step after
  ``--warmup`` steps, their ratio, the compile time (the compiled first step less its median
  step), and the graphs and graph breaks dynamo counted (``torch._dynamo.utils.counters``).
* ``grad_checkpointing``: ViT-S/16 with 4 registers at 224 px, batch 32 (``--ckpt_model`` and
  ``--ckpt_batch`` change them), without and with. Printed: the peak resident memory of the
  first step above the memory before it (model, AdamW, batch), their ratio (target <= 0.6), and
  the median step time and its ratio (about 1.3x expected: one more forward of the backbone).

    python benchmarks/train_step_switches.py [--threads 1] [--steps 5] [--warmup 2] [--only compile|grad_checkpointing]
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


def child(spec: dict[str, Any]) -> None:
    """Build one variant, time its steps, and print one JSON line with what it measured."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    switches = spec["switches"]
    if spec["part"] == "compile":
        model, side, batch = quickstart(switches)
    else:
        model, side, batch = vit_s(spec["model"], switches), 224, spec["batch"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = torch.randn(batch, 3, side, side), torch.randint(0, model.hparams.num_classes, (batch,))
    model.train()
    before, peak_before = resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.loss(model(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - start

    times = [step()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times += [step() for _ in range(spec["warmup"] + spec["steps"] - 1)]
    result = {
        "first": times[0],
        "median": statistics.median(times[spec["warmup"] :]),
        "step_peak": peak - before,
        "peak_before_step": peak_before - before,
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }
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
    eager = run_child({**base, "part": "compile", "switches": {}})
    compiled = run_child({**base, "part": "compile", "switches": {"compile": True}})
    print(
        f"compile (quickstart model, batch 64, 32 px): median step eager {eager['median'] * 1e3:.1f} ms, "
        f"compiled {compiled['median'] * 1e3:.1f} ms: compiled/eager {compiled['median'] / eager['median']:.2f}x"
    )
    print(
        f"compile time (first compiled step less its median): {compiled['first'] - compiled['median']:.1f} s; "
        f"graphs compiled {compiled['graphs']}, graph breaks {compiled['graph_breaks']}"
    )


def compare_checkpointing(base: dict[str, Any], model: str, batch: int) -> None:
    spec = {**base, "part": "grad_checkpointing", "model": model, "batch": batch}
    off = run_child({**spec, "switches": {}})
    on = run_child({**spec, "switches": {"grad_checkpointing": True}})
    for name, result in (("off", off), ("on", on)):
        if result["peak_before_step"] > result["step_peak"]:
            print(
                f"warning: building the model ({name}) peaked above its first step: the memory ratio is not the step's"
            )
    ratio = on["step_peak"] / off["step_peak"]
    print(
        f"grad_checkpointing ({model}, 224 px, batch {batch}): step peak over the model "
        f"{off['step_peak'] / 1e6:.0f} MB off, {on['step_peak'] / 1e6:.0f} MB on: on/off {ratio:.2f} (target <= 0.6)"
    )
    print(
        f"grad_checkpointing step time: median {off['median']:.2f} s off, {on['median']:.2f} s on: "
        f"on/off {on['median'] / off['median']:.2f}x (about 1.3x expected)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile is in the first)")
    parser.add_argument("--only", choices=["compile", "grad_checkpointing"], default=None)
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


if __name__ == "__main__":
    main()
