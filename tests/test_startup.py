"""Start-up: the CLI answers ``--help`` and its parse-time refusals without importing torch, and the sweep's
preloaded parent imports torch, Lightning, timm and regablate without touching CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from regablate.sweep.preload import PRELOAD, Preloaded
from tests.conftest import REPO

HEAVY = ("torch", "lightning", "timm", "matplotlib", "datasets")
# Each command line with the exit code it ends with: help, then refusals made while parsing.
LIGHT_COMMANDS = [
    (["--help"], 0),
    (["sweep", "--help"], 0),
    (["report", "--help"], 0),
    (["inspect", "--help"], 0),
    (["probe", "--help"], 0),
    ([], 2),
    (["fitt"], 2),
    (["sweep", "missing.yaml"], 2),
    (["sweep", "missing.yaml", "--max_parallel", "0"], 2),
    (["sweep", "missing.yaml", "--launcher", "slurm", "--preload", "false"], 2),
    (["sweep", "missing.yaml", "--max_paralel", "2"], 2),
    (["report", "no_such_experiment"], 2),
    (["report", "no_such_experiment", "--num_images", "0"], 2),
    (["inspect", "--model", "vit_tiny_patch16_224", "--num_images", "0"], 2),
    (["inspect", "--model", "vit_tiny_patch16_224", "--masks", "masks/"], 2),
]
RUN_IN_ORDER = """
import contextlib, io, json, sys
from regablate.cli import main

found = []
for argv, _ in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    found.append([argv, code, [m for m in sys.argv[2].split(",") if m in sys.modules], err.getvalue()])
print(json.dumps(found))
"""


def test_help_and_parse_time_refusals_import_no_torch():
    """One interpreter runs every command line in turn: the first one that imports a heavy library is named."""
    command = [sys.executable, "-c", RUN_IN_ORDER, json.dumps(LIGHT_COMMANDS), ",".join(HEAVY)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    for (argv, code, imported, err), (_, expected) in zip(json.loads(result.stdout), LIGHT_COMMANDS, strict=True):
        assert code == expected, (argv, err)
        assert imported == [], f"regablate {' '.join(argv)} imported {imported}"
        if code == 2:
            assert len(err.splitlines()) == 1 and err.startswith("regablate"), (argv, err)


CUDA_UNTOUCHED = """
import json, sys
import torch

calls = []
def recording(name, function):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)
    return wrapper

# the Python entry points that initialise CUDA or ask the driver
torch.cuda._lazy_init = recording("_lazy_init", torch.cuda._lazy_init)
torch._C._cuda_getDeviceCount = recording("_cuda_getDeviceCount", torch._C._cuda_getDeviceCount)
for name in sys.argv[1].split(","):
    __import__(name)
print(json.dumps({"calls": calls, "initialized": torch.cuda.is_initialized()}))
"""


@pytest.mark.slow
def test_the_preloaded_modules_do_not_touch_cuda():
    """Importing ``PRELOAD`` asks nothing of CUDA: a stage forked from the parent may still use its GPUs."""
    command = [sys.executable, "-c", CUDA_UNTOUCHED, ",".join(PRELOAD)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == {"calls": [], "initialized": False}


def forked_state(path: str) -> None:
    """Run in a process forked from the fork server: what it inherited."""
    preloaded = [name for name in PRELOAD if name in sys.modules]
    import torch

    Path(path).write_text(json.dumps({"preloaded": preloaded, "cuda": torch.cuda.is_initialized()}))


@pytest.mark.slow
def test_a_process_forked_from_the_preloaded_parent_has_the_modules_and_no_cuda(tmp_path):
    process = Preloaded().context.Process(target=forked_state, args=(str(tmp_path / "state.json"),))
    process.start()
    process.join(300)
    assert process.exitcode == 0
    assert json.loads((tmp_path / "state.json").read_text()) == {"preloaded": list(PRELOAD), "cuda": False}
