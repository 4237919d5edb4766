"""``torch.compile`` of a backbone's transformer blocks, and the check that it can run here.

What is compiled is each block's ``forward`` (``block.forward = torch.compile(block.forward)``),
not the whole model and not the block's ``__call__``:

- The blocks carry nearly all of a ViT's compute, and a timm block is pure tensor code: it
  compiles to one graph with no graph break (``torch._dynamo.utils.counters["graph_break"]``
  stays empty). All blocks of a model share their code, so they share one compiled graph per
  (train/eval, grad/no-grad, shapes) variant: a DINO step compiles the student's training graph,
  the teacher's no-grad graph, and once a second crop size arrives, one graph with dynamic
  batch and token counts in place of the first static one (``dynamic=None``, PyTorch's automatic
  dynamic shapes). Everything around the blocks (patch embedding, iBOT's mask-token hook, crops,
  heads, losses, the EMA) stays eager.
- Forward hooks registered on a block run in ``nn.Module.__call__``, outside the compiled code:
  the outlier monitor's reading of the training forward adds and removes them at its cadence
  and never changes a guard, so it never recompiles.
- The module tree and ``state_dict`` keys are unchanged (``torch.compile(module)`` would prefix
  every key with ``_orig_mod.``), so checkpoints load with compile on or off.

Captures that change the inside of a block (``regablate.artifacts.scan`` switches the last
block's attention to its unfused path and hooks ``attn_drop``) run under :func:`uncompiled`:
torch's ``force_eager`` stance, so a capture compiles nothing and recompiles nothing.

The mode is torch.compile's default: fusion of the element-wise work around the matmuls, which
is what a training step gains from. ``max-autotune`` benchmarks kernel candidates and compiles
far longer (and every new shape again); ``reduce-overhead`` records CUDA graphs, which need
static shapes and memory per shape, while a DINO step has two crop sizes.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from regablate.errors import RegablateError
from regablate.models.layout import Backbone

TURN_OFF = "turn it off with --model.init_args.compile false"


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot run in this process (``None`` when it can).

    Inductor, torch.compile's default backend, compiles its CPU kernels with a C++ compiler (and
    Triton, on a GPU, builds its launchers with a C compiler), which it looks up itself on first
    use: the same lookup runs here, before any training starts.
    """
    import torch._dynamo
    from torch._inductor import cpp_builder

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {platform.python_version()} on {sys.platform}"
    try:
        cpp_builder.get_cpp_compiler()
    except Exception:
        return "torch.compile found no C++ compiler for inductor (install g++ or set CXX to one)"
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile needs Triton on a GPU and it is not installed (pip install triton)"
    return None


def require_compile() -> None:
    """Refuse in one line when ``torch.compile`` cannot run here, saying how to turn it off."""
    reason = compile_unavailable()
    if reason is not None:
        raise RegablateError(f"model.init_args.compile is true but {reason}; {TURN_OFF}")


def compile_blocks(model: Backbone) -> None:
    """Compile the ``forward`` of each of ``model``'s transformer blocks in place (see the module docstring)."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


@contextmanager
def uncompiled() -> Iterator[None]:
    """Run every compiled function eagerly inside (a capture pass, which changes the blocks it reads)."""
    with torch.compiler.set_stance("force_eager"):
        yield
