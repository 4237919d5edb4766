"""Test-time registers (Jiang et al., 2025): move the "register neurons" into one extra, untrained token.

A few MLP hidden units ("register neurons") write the high-norm outliers of a ViT. Finding them
takes one model and a few images, no training:

1. mark the outlier patch tokens at ``outlier_block`` (the thresholds of ``regablate.artifacts.stats``);
2. score every hidden unit of every block up to ``max_block`` (the input of ``mlp.fc2``, which is
   ``mlp.act``'s output for timm's plain MLP) by its mean absolute activation at those tokens;
3. keep the ``top_k`` units, as ``(block, unit)`` pairs.

Applying them appends one token to the sequence, zero and without position embedding, after the
trained registers: ``[CLS, REG_1..REG_R, TTR, PATCHES]`` (``[REG_1..REG_R, TTR, PATCHES]`` without a
class token). ``num_prefix_tokens`` grows by one (an Eva's attention layers' too, so RoPE never
rotates the extra token), so
everything that slices the prefix off (timm, ``extract_features``, the probes, the artifact scan)
treats the extra token as one more register and no patch-level head ever sees it, while
``num_reg_tokens`` still counts the trained registers. In each hooked block, per image, each
register neuron's maximum over the patch tokens goes to the extra token and the patch tokens get
zero. These are per-sample operations, so any batch size and DDP give the same result as one
image at a time (the authors' reference code edits only the first image of a batch).

The neurons are saved as JSON with the fingerprint of the blocks they were found in, so they are
never applied to another model by mistake.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from regablate.artifacts import stats
from regablate.artifacts.settings import NeuronSearch
from regablate.artifacts.stats import Threshold
from regablate.errors import RegablateError
from regablate.models.backbone import eval_mode, extract_features
from regablate.models.fingerprint import weights_fingerprint
from regablate.models.layout import Backbone, TokenLayout, set_num_prefix_tokens
from regablate.runs import write_json_atomic

FORMAT = 1
NEURONS_FILE = "register_neurons.json"
# The submodule a model with a test-time register carries (its unit list is part of the state dict,
# so feature caches keyed by the weights tell the two models apart).
ATTRIBUTE = "test_time_register"


@dataclass(frozen=True)
class RegisterNeurons:
    """Register neurons found on one model: ``units`` are ``(block, unit)`` pairs, best first.

    ``weights`` fingerprints the model's blocks (not its position embedding or registers, so the
    same model at another image size or converted to another register count still matches).
    ``outlier_fraction`` is the share of patch tokens that were outliers during the search.
    """

    units: tuple[tuple[int, int], ...]
    scores: tuple[float, ...]
    weights: str
    search: NeuronSearch
    outlier_fraction: float
    model: str | None = None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"format": FORMAT, **asdict(self), "units": [list(u) for u in self.units], "scores": list(self.scores)}
        write_json_atomic(path, data)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RegisterNeurons:
        path = Path(path).expanduser()
        if not path.is_file():
            raise RegablateError(
                f"register neurons file not found: {path}; make one with regablate inspect --find_register_neurons"
            )
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            return cls(
                units=tuple((int(b), int(u)) for b, u in data["units"]),
                scores=tuple(float(s) for s in data["scores"]),
                weights=str(data["weights"]),
                search=NeuronSearch(**data["search"]),
                outlier_fraction=float(data["outlier_fraction"]),
                model=data.get("model"),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise RegablateError(f"{path} is not a register neurons file ({type(err).__name__}: {err})") from None

    def check(self, model: Backbone, source: str = "the register neurons") -> None:
        """Refuse units that do not exist in ``model`` or were found on other weights."""
        depth = len(model.blocks)
        for block, unit in self.units:
            if not 0 <= block < depth:
                raise RegablateError(f"{source}: block {block} is out of range for a ViT with {depth} blocks")
            width = _fc2(model, block).in_features
            if not 0 <= unit < width:
                raise RegablateError(
                    f"{source}: unit {unit} of block {block} is out of range (its MLP has {width} units)"
                )
        if blocks_fingerprint(model) != self.weights:
            raise RegablateError(
                f"{source} were found on other weights ({self.model or 'unknown model'}, blocks {self.weights[:12]}) "
                f"than this model's (blocks {blocks_fingerprint(model)[:12]}); find them on this model"
            )


def blocks_fingerprint(model: Backbone) -> str:
    """Fingerprint of the transformer blocks, the weights that register neurons belong to."""
    return weights_fingerprint(model.blocks)


def _fc2(model: Backbone, block: int) -> nn.Linear:
    fc2 = getattr(getattr(model.blocks[block], "mlp", None), "fc2", None)
    if not isinstance(fc2, nn.Linear):
        raise RegablateError(f"block {block} of {type(model).__name__} has no mlp.fc2 layer to read hidden units from")
    return fc2


def find_register_neurons(
    model: Backbone, images: Tensor, search: NeuronSearch = NeuronSearch(), *, model_name: str | None = None
) -> RegisterNeurons:
    """Score every MLP unit of blocks ``0..max_block`` at the outlier patch tokens of ``images``.

    Two passes in eval mode without gradients: one marks the outliers at ``outlier_block``, one
    averages each unit's absolute activation over them. A model without outliers gets no units.
    """
    if hasattr(model, ATTRIBUTE):
        raise RegablateError(
            "the model already has a test-time register; find register neurons on the model without one"
        )
    depth = len(model.blocks)
    outlier_block, max_block = search.blocks(depth)
    threshold = Threshold(search.threshold, search.threshold_value)
    patches = TokenLayout.of(model).patches
    with torch.no_grad(), eval_mode(model):
        tokens = extract_features(model, images, blocks=[outlier_block]).blocks[outlier_block]
        mask = stats.outlier_mask(stats.token_norms(tokens[:, patches]), threshold)
        scores: dict[int, Tensor] = {}
        handles = [
            _fc2(model, b).register_forward_pre_hook(_scorer(scores, b, mask, patches)) for b in range(max_block + 1)
        ]
        try:
            if mask.any():
                model.forward_features(images)
        finally:
            for handle in handles:
                handle.remove()
    units: list[tuple[int, int]] = []
    values: list[float] = []
    if scores:
        table = torch.stack([scores[b] for b in range(max_block + 1)])  # (blocks, units)
        best = table.flatten().topk(min(search.top_k, table.numel()))
        width = table.shape[1]
        units = [(i // width, i % width) for i in best.indices.tolist()]
        values = best.values.tolist()
    return RegisterNeurons(
        units=tuple(units),
        scores=tuple(values),
        weights=blocks_fingerprint(model),
        search=search,
        outlier_fraction=stats.outlier_fraction(mask),
        model=model_name,
    )


def _scorer(scores: dict[int, Tensor], block: int, mask: Tensor, patches: slice) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        hidden = inputs[0][:, patches]  # (B, N, units) of the patch tokens
        scores[block] = hidden[mask].abs().float().mean(dim=0).cpu()

    return hook


class RegisterNeuronHooks(nn.Module):
    """The hooks that add the extra token and move the register neurons into it.

    ``units`` (a persistent buffer) makes the model's state dict, and so its weights fingerprint,
    differ from the model without the extra token. Create it with :func:`add_test_time_register`.
    """

    def __init__(self, neurons: RegisterNeurons, position: int) -> None:
        super().__init__()
        self.neurons = neurons
        self.position = position  # index of the extra token; the patches follow it
        self.register_buffer("units", torch.tensor(neurons.units, dtype=torch.long).reshape(-1, 2))
        self.blocks = sorted({block for block, _ in neurons.units})
        for block in self.blocks:
            index = [unit for b, unit in neurons.units if b == block]
            self.register_buffer(f"units_{block}", torch.tensor(index, dtype=torch.long), persistent=False)
        self.handles: list[RemovableHandle] = []

    def insert_token(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Pre-hook of ``norm_pre``: after the position embedding and patch dropout, before the blocks."""
        x = inputs[0]
        zero = x.new_zeros(x.shape[0], 1, x.shape[2])
        return (torch.cat([x[:, : self.position], zero, x[:, self.position :]], dim=1), *inputs[1:])

    def mover(self, block: int) -> Callable[..., None]:
        name, patches = f"units_{block}", self.position + 1

        def move(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            # In place on the fc2 input, which the activation function does not keep for its backward
            # (autograd would refuse loudly if it did).
            hidden, units = inputs[0], self.get_buffer(name)  # looked up per call: .to(device) replaces it
            peak = hidden[:, patches:].index_select(2, units).amax(dim=1)  # (B, units): per image
            hidden[:, patches:].index_fill_(2, units, 0.0)
            hidden[:, self.position].index_copy_(1, units, peak)

        return move


def add_test_time_register(model: Backbone, neurons: RegisterNeurons | str | Path) -> Backbone:
    """Give ``model`` a test-time register holding ``neurons`` (a :class:`RegisterNeurons` or its JSON path)."""
    source = f"register neurons {neurons}" if not isinstance(neurons, RegisterNeurons) else "the register neurons"
    if not isinstance(neurons, RegisterNeurons):
        neurons = RegisterNeurons.load(neurons)
    if hasattr(model, ATTRIBUTE):
        raise RegablateError("the model already has a test-time register")
    neurons.check(model, source)
    position = TokenLayout.of(model).num_prefix  # after the class token and the trained registers
    register = RegisterNeuronHooks(neurons, position=position).to(model.patch_embed.proj.weight.device)
    register.handles = [
        model.norm_pre.register_forward_pre_hook(register.insert_token),
        *(_fc2(model, block).register_forward_pre_hook(register.mover(block)) for block in register.blocks),
    ]
    model.add_module(ATTRIBUTE, register)
    set_num_prefix_tokens(model, model.num_prefix_tokens + 1)
    return model


def remove_test_time_register(model: Backbone) -> Backbone:
    """Undo :func:`add_test_time_register`."""
    register = getattr(model, ATTRIBUTE, None)
    if register is None:
        raise RegablateError("the model has no test-time register to remove")
    for handle in register.handles:
        handle.remove()
    delattr(model, ATTRIBUTE)
    set_num_prefix_tokens(model, model.num_prefix_tokens - 1)
    return model


def attached_neurons(model: nn.Module) -> RegisterNeurons | None:
    """The register neurons a model's test-time register holds, or ``None`` without one."""
    register = getattr(model, ATTRIBUTE, None)
    return register.neurons if register is not None else None


def summary_labels(neurons: RegisterNeurons) -> dict[str, Any]:
    """How results measured with a test-time register are labelled in ``summary.json``."""
    return {"test_time_registers": 1, "test_time_registers/num_units": len(neurons.units)}
