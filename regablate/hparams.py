"""Hyper-parameters as plain Python values.

jsonargparse checks a constrained number (``PositiveInt``, ``ClosedUnitInterval``, ...) by
giving it a subclass of ``int`` or ``float``. Such values must not travel further: Lightning
pickles hyper-parameters into every checkpoint (and ``torch.load(weights_only=True)`` refuses
unknown classes), and numpy treats an ``int`` subclass as a 64-bit array, not a weak Python
scalar, so ``float32_array / size`` silently becomes float64.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from jsonargparse.typing import restricted_number_type
from lightning.pytorch.core.mixins import HyperparametersMixin

# Constrained numbers of init arguments, beside jsonargparse's own (PositiveInt, ClosedUnitInterval, ...).
# A fraction in (0, 1]: a crop's area as a fraction of the image, layer-wise learning-rate decay (1: none).
PositiveFraction = restricted_number_type(
    "PositiveFraction", float, [(">", 0), ("<=", 1)], docstring="a fraction in (0, 1]"
)
# A fraction in [0, 1): iBOT's mask ratios, the student's stochastic depth.
Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)], docstring="a fraction in [0, 1)")
# A hue shift of the synthetic scenes' colours.
HueJitter = restricted_number_type("HueJitter", float, [(">=", 0), ("<=", 0.5)], docstring="a hue shift in [0, 0.5]")


def plain(value: Any) -> Any:
    """``value`` with every bool/int/float/str subclass (recursively in lists, tuples and dicts) made its base type."""
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value) if type(value) in (list, tuple) else [plain(v) for v in value]
    if isinstance(value, dict):
        return {key: plain(v) for key, v in value.items()}
    return value


def make_hyperparameters_plain(module: HyperparametersMixin) -> None:
    """Replace a module's saved hyper-parameters (and their initial copy) with plain values, in place."""
    for attribute in ("_hparams", "_hparams_initial"):
        hparams = getattr(module, attribute, None)
        if hparams is not None:
            for key, value in list(hparams.items()):
                hparams[key] = plain(value)


class Hyperparameters(MutableMapping[str, Any]):
    """How a task or data module reads ``self.hparams``: by attribute, values of any type.

    Lightning types ``hparams`` as a plain ``MutableMapping``; our modules read their init arguments
    from it by attribute (an ``AttributeDict`` at run time). Used only as a type.
    """

    def __getattr__(self, name: str) -> Any: ...
