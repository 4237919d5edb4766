"""Check a data config before anything runs, from metadata only: no image is read, no network is needed.

``check_data`` takes a data config as it appears in a run config (``class_path`` + ``init_args``)
and answers in one line: ``ok`` (the dataset resolves, its splits and mapped columns exist, and
their feature types fit: an image, a class label or integer, a mask, a depth map, a box),
``unchecked`` (a Hub name that is not in the cache while offline; a data class without a check)
or ``error`` (a script-based or gated Hub dataset, a missing folder, split or column, a wrong type).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import datasets

from regablate.data.huggingface import HFDataModule, find_split
from regablate.data.sources import Description, describe
from regablate.errors import RegablateError

Status = Literal["ok", "unchecked", "error"]
SYNTHETIC = ("SyntheticScenes",)
HF_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(HFDataModule.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}
COLUMN_ROLES = {"image": "image", "label": "label", "mask": "mask", "depth": "depth", "box": "box"}


@dataclass(frozen=True)
class DataCheck:
    """The preflight's verdict on one data config."""

    status: Status
    message: str


def check_data(config: dict[str, Any] | None) -> DataCheck:
    """Check the data config ``{class_path, init_args}`` of a stage (see the module docstring)."""
    if not config or not config.get("class_path"):
        return DataCheck("unchecked", "no data config")
    class_path = str(config["class_path"])
    short = class_path.rsplit(".", 1)[-1]
    if short in SYNTHETIC:
        return DataCheck("ok", f"{short} (rendered, nothing to load)")
    if short != HFDataModule.__name__:
        return DataCheck("unchecked", f"{class_path}: no preflight for this data class")
    args = {**HF_DEFAULTS, **(config.get("init_args") or {})}
    path = str(args["path"])
    try:
        found = describe(path, args["name"], args["data_dir"], args["source"])
        if found.unchecked:
            return DataCheck("unchecked", f"{path} ({found.kind}): could not check ({found.unchecked})")
        return DataCheck("ok", _check_description(path, found, args))
    except RegablateError as err:
        return DataCheck("error", str(err))


def _check_description(path: str, found: Description, args: dict[str, Any]) -> str:
    """The one-line summary of a dataset whose splits and features are known; RegablateError for a problem."""
    available = list(found.splits)
    train = args["train_split"]
    if train not in found.splits:
        raise RegablateError(f"{path}: split '{train}' not found; splits: {', '.join(available)} (set train_split)")
    val = find_split(available, args["val_split"])
    if val is None and args["val_fraction"] is None:
        raise RegablateError(
            f"{path}: no split '{args['val_split']}' (splits: {', '.join(available)}); set val_split to one of them, "
            "or val_fraction to hold out a share of train"
        )
    test = find_split(available, args["test_split"])
    used = [s for s in dict.fromkeys((train, val, test)) if s is not None]
    columns = {role: args[f"{role}_column"] for role in COLUMN_ROLES if args.get(f"{role}_column")}
    checked = []
    for split in used:
        features = found.splits[split]
        if features is None:
            continue
        for role, column in columns.items():
            if column not in features:
                raise RegablateError(
                    f"{path}: column '{column}' not found in split '{split}'; columns: {', '.join(features)} "
                    f"(set {role}_column)"
                )
            problem = _type_problem(role, features[column])
            if problem:
                raise RegablateError(f"{path}: column '{column}' ({role}_column) holds {problem}")
        checked.append(split)
    splits = f"train '{train}', val " + (f"'{val}'" if val else f"{args['val_fraction']:.0%} of train")
    splits += f", test '{test}'" if test else ", no test split"
    if not checked:
        return f"{path} ({found.kind}): {splits}; feature types not in its metadata, columns not checked"
    return f"{path} ({found.kind}): {splits}; columns {', '.join(columns.values())} fit"


def _type_problem(role: str, feature: Any) -> str | None:
    """Why ``feature`` cannot serve as ``role``, or None when it can."""
    if role == "image":
        return None if isinstance(feature, datasets.Image) else f"{_name(feature)}, not images"
    if role == "label":
        if isinstance(feature, datasets.ClassLabel) or _is_integer(feature):
            return None
        return f"{_name(feature)}, not class labels (a ClassLabel or integers)"
    depth, leaf = _nesting(feature)
    if role in ("mask", "depth"):
        if isinstance(feature, datasets.Image):
            return None
        numeric = _is_integer(leaf) if role == "mask" else _is_number(leaf)
        if depth == 2 and numeric:
            return None
        wanted = "images or 2-D arrays of class ids" if role == "mask" else "images or 2-D arrays of depths"
        return f"{_name(feature)}, not {wanted}"
    if depth == 1 and _is_number(leaf):  # box: 4 numbers
        return None
    return f"{_name(feature)}, not a box (a list of 4 numbers)"


def _nesting(feature: Any) -> tuple[int, Any]:
    """(list depth, leaf) of a nested List / Sequence / Array2D feature."""
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)):
        return len(feature.shape), datasets.Value(feature.dtype)
    depth = 0
    while True:
        if isinstance(feature, list) and len(feature) == 1:
            feature = feature[0]
        elif hasattr(feature, "feature") and not isinstance(feature, (datasets.Value, datasets.ClassLabel)):
            feature = feature.feature
        else:
            return depth, feature
        depth += 1


def _is_integer(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))


def _is_number(feature: Any) -> bool:
    return _is_integer(feature) or (isinstance(feature, datasets.Value) and feature.dtype.startswith("float"))


def _name(feature: Any) -> str:
    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    return type(feature).__name__
