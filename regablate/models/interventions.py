"""Tampering with a trained ViT's registers at inference: fewer registers, or registers replaced.

Two knobs, applied for one pass by :func:`intervened`:

- ``test_registers=K`` runs the model with only its first K trained registers: the others are
  removed from the sequence (not zeroed), so ``K = 0`` computes what the same weights converted to
  ``num_registers=0`` compute, and ``K = R`` is the untouched model.
- ``kind`` replaces each kept register, at the input of every block from ``from_block`` on, by
  zeros (``zero``), its mean over a reference set (``mean``), Gaussian noise with that mean and
  per-channel std (``noise``), or the same register of the previous image in the batch (``shuffle``).

Token positions come from :class:`~regablate.models.layout.TokenLayout`; the replacement is a
forward pre-hook on each block, so the extraction code runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from regablate.commands import INTERVENTION_KINDS, InterventionKind, RegisterIntervention
from regablate.errors import RegablateError
from regablate.models.layout import Backbone, TokenLayout, num_registers_of, set_registers


@dataclass(frozen=True)
class Intervention:
    """What to do to the registers; ``test_registers=None`` keeps all of them."""

    kind: InterventionKind = "none"
    from_block: int = 0
    test_registers: int | None = None

    @classmethod
    def of(cls, flags: RegisterIntervention) -> Intervention:
        """The intervention a command line's ``--register_intervention``/``--test_registers`` flags ask for."""
        return cls(flags.register_intervention, flags.intervention_from_block, flags.test_registers)

    @property
    def is_plain(self) -> bool:
        return self.kind == "none" and self.test_registers is None

    @property
    def needs_statistics(self) -> bool:
        return self.kind in ("mean", "noise")

    def key(self) -> dict[str, Any]:
        """The fields a feature store and a run summary are keyed by."""
        return {
            "register_intervention": self.kind,
            "intervention_from_block": self.from_block,
            "test_registers": self.test_registers,
        }

    def check(self, model: Backbone) -> None:
        """Refuse, in one line, what ``model`` cannot do (before any feature is extracted)."""
        if self.kind not in INTERVENTION_KINDS:
            raise RegablateError(
                f"register_intervention must be one of {', '.join(INTERVENTION_KINDS)}, got {self.kind!r}"
            )
        registers = TokenLayout.of(model).num_registers
        if self.test_registers is not None and not 0 <= self.test_registers <= registers:
            raise RegablateError(
                f"test_registers must be between 0 and the model's {registers} registers, got {self.test_registers}"
            )
        if self.kind != "none" and registers == 0:
            raise RegablateError(f"register_intervention {self.kind} needs a model with registers; this one has none")
        depth = len(model.blocks)
        if not 0 <= self.from_block < depth:
            raise RegablateError(
                f"intervention_from_block must be between 0 and {depth - 1} (the model's blocks), got {self.from_block}"
            )

    def check_test_time_register(self, model: Backbone) -> None:
        """Refuse ``test_registers`` below R beside a test-time register: that register is inserted after all R
        trained ones (``regablate.artifacts.register_neurons``), so removing some would misplace it."""
        registers = num_registers_of(model)
        if self.test_registers is not None and self.test_registers < registers:
            raise RegablateError(
                f"test_registers {self.test_registers} (below the model's {registers} registers) cannot go with a "
                "test-time register, which sits after all of them; drop one of the two"
            )

    def check_batch(self, images: int, why: str) -> None:
        """Refuse ``shuffle`` on a batch of one image, which has no other image to take registers from.

        ``why`` says, in the command's terms, where that batch comes from and how to avoid it.
        """
        if self.kind == "shuffle" and images < 2:
            raise RegablateError(
                f"register_intervention shuffle takes registers from another image in the batch; {why}"
            )


@dataclass(frozen=True)
class RegisterStatistics:
    """Per-block mean and per-channel std of each kept register at the block's input.

    ``mean`` and ``std`` are ``(blocks, K, D)`` for blocks ``from_block..depth-1``.
    """

    from_block: int
    mean: Tensor
    std: Tensor


def _register_slice(model: Backbone) -> slice:
    layout = TokenLayout.of(model)
    start = int(layout.has_cls)
    return slice(start, start + layout.num_registers)


@contextmanager
def kept_registers(model: Backbone, count: int | None) -> Iterator[None]:
    """Run ``model`` with only its first ``count`` trained registers in the sequence."""
    total = num_registers_of(model)
    if count is None or count == total:
        yield
        return
    saved = model.reg_token
    assert saved is not None
    set_registers(model, nn.Parameter(saved[:, :count], requires_grad=False) if count else None)
    try:
        yield
    finally:
        set_registers(model, saved)


@torch.no_grad()
def register_statistics(model: Backbone, batches: Iterable[Tensor], intervention: Intervention) -> RegisterStatistics:
    """Mean and std of each kept register at every block input from ``from_block``, over ``batches``.

    One extra pass over the reference images through the model with its kept registers, untouched.
    """
    depth = len(model.blocks)
    sums: list[Tensor] = []
    squares: list[Tensor] = []
    seen = 0

    with kept_registers(model, intervention.test_registers):
        regs = _register_slice(model)

        def record(index: int) -> Any:
            def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
                tokens = args[0][:, regs].double()
                position = index - intervention.from_block
                if position == len(sums):
                    sums.append(tokens.sum(0))
                    squares.append((tokens**2).sum(0))
                else:
                    sums[position] += tokens.sum(0)
                    squares[position] += (tokens**2).sum(0)

            return hook

        handles = [model.blocks[i].register_forward_pre_hook(record(i)) for i in range(intervention.from_block, depth)]
        try:
            for images in batches:
                model.forward_features(images)
                seen += images.shape[0]
        finally:
            for handle in handles:
                handle.remove()
    if not seen:
        raise RegablateError("register_intervention mean/noise needs reference images; the reference split is empty")
    mean = torch.stack(sums) / seen
    var = (torch.stack(squares) / seen - mean**2).clamp_min(0)
    return RegisterStatistics(intervention.from_block, mean.float(), var.sqrt().float())


@contextmanager
def intervened(
    model: Backbone,
    intervention: Intervention,
    statistics: RegisterStatistics | None = None,
    *,
    seed: int = 0,
) -> Iterator[None]:
    """Apply ``intervention`` to every forward pass of ``model`` inside the block."""
    intervention.check(model)
    if intervention.needs_statistics and statistics is None:
        raise RegablateError(
            f"register_intervention {intervention.kind} needs the reference split's register statistics"
        )
    with kept_registers(model, intervention.test_registers):
        if intervention.kind == "none":
            yield
            return
        regs = _register_slice(model)
        generator = torch.Generator().manual_seed(seed)

        def replace(index: int) -> Any:
            def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                tokens = args[0].clone()
                current = tokens[:, regs]
                if intervention.kind == "zero":
                    new = torch.zeros_like(current)
                elif intervention.kind == "shuffle":
                    new = current.roll(1, dims=0)
                else:
                    assert statistics is not None
                    position = index - statistics.from_block
                    mean = statistics.mean[position].to(current)
                    new = mean.expand_as(current)
                    if intervention.kind == "noise":
                        noise = torch.randn(current.shape, generator=generator, dtype=torch.float32)
                        new = new + statistics.std[position].to(current) * noise.to(current)
                tokens[:, regs] = new
                return (tokens, *args[1:])

            return hook

        handles = [
            model.blocks[i].register_forward_pre_hook(replace(i))
            for i in range(intervention.from_block, len(model.blocks))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
