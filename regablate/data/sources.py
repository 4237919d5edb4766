"""Where a dataset comes from: a saved dataset, a local folder of data files, or a Hub name.

``load_splits`` loads every split (memory-mapped, no image decoded) and turns what ``datasets``
raises into one line that says what to do: a script-based Hub dataset (``datasets`` 4+ refuses
every loading script) names the preparation script to use instead, a gated one says to log in,
an unreachable one says it is not in the cache. ``describe`` answers the preflight's question,
"which splits, with which feature types?", from metadata alone: the JSON files of a saved
dataset, the schema in a parquet footer, the member names of a webdataset shard, the folder
names of an image folder, the Hub's dataset card (or the cache, offline).
"""

from __future__ import annotations

import json
import os
import socket
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import datasets
import huggingface_hub
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.load import infer_module_for_data_files

from regablate.errors import RegablateError

Source = Literal["auto", "hub", "disk", "folder", "imagefolder"]
SAVED_MARKERS = ("dataset_dict.json", "state.json")

# Hub datasets that only a loading script reads, and what to use instead (the paper's probes).
_ADE20K = "python scripts/prepare_ade20k.py ADEChallengeData2016.zip --output data/ade20k, then path: data/ade20k"
_NYUD = (
    "python scripts/prepare_nyud.py labeled --labeled nyu_depth_v2_labeled.mat --splits splits.mat "
    "--output data/nyud, then path: data/nyud"
)
SCRIPT_DATASETS = {
    "scene_parse_150": _ADE20K,
    "zhoubolei/scene_parse_150": _ADE20K,
    "sayakpaul/nyu_depth_v2": _NYUD,
}
SCRIPT_MESSAGE = "Dataset scripts are no longer supported"


def looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else with a separator is a file path."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def resolve_source(path: str, source: Source) -> Literal["hub", "disk", "folder", "imagefolder"]:
    """The kind of ``path``: ``disk`` (``save_to_disk``), ``folder`` (data files), ``imagefolder`` or ``hub``."""
    if source == "hub" or (source == "auto" and not os.path.exists(path) and not looks_local(path)):
        return "hub"
    if not os.path.isdir(path):
        raise RegablateError(
            f"data folder not found: {path} (give a folder written by scripts/prepare_ade20k.py, prepare_nyud.py "
            "or Dataset.save_to_disk, a folder of parquet or webdataset files or of images in class sub-folders, "
            "or a Hub name)"
        )
    if source == "auto":
        saved = any(os.path.exists(os.path.join(path, marker)) for marker in SAVED_MARKERS)
        return "disk" if saved else "folder"
    return source


def script_hint(path: str) -> str:
    """What to use instead of the script-based Hub dataset ``path``."""
    known = SCRIPT_DATASETS.get(path)
    if known:
        return f"prepare it locally: {known}"
    return "use a parquet or webdataset copy of it, or write the original files with Dataset.save_to_disk"


def script_error(path: str) -> RegablateError:
    return RegablateError(
        f"{path} is a script-based Hub dataset, which datasets {datasets.__version__} no longer loads; "
        f"{script_hint(path)}"
    )


@contextmanager
def _hub_errors(path: str) -> Iterator[None]:
    """Turn what ``datasets`` raises for a Hub name into one user-facing line."""
    try:
        yield
    except RuntimeError as err:
        if SCRIPT_MESSAGE in str(err):
            raise script_error(path) from None
        raise
    except datasets.exceptions.DatasetNotFoundError as err:
        if "gated" in str(err):
            raise RegablateError(
                f"{path} is a gated dataset on the Hugging Face Hub: accept its terms on its page, then log in "
                "(hf auth login, or set HF_TOKEN), or give a local copy"
            ) from None
        raise RegablateError(
            f"{path} is not a dataset on the Hugging Face Hub (or is private): check the name"
        ) from None
    except ConnectionError:
        raise RegablateError(
            f"cannot reach the Hugging Face Hub for {path} and it is not in the cache "
            "(no network, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set): load it once with the network, or give a "
            "local copy"
        ) from None


def load_splits(path: str, name: str | None, data_dir: str | None, source: Source) -> datasets.DatasetDict:
    """Every split of ``path`` as a DatasetDict; a single saved Dataset becomes the only split, ``train``."""
    path = os.path.expanduser(path)
    kind = resolve_source(path, source)
    try:
        if kind == "disk":
            loaded = datasets.load_from_disk(path)
        elif kind == "imagefolder":
            loaded = datasets.load_dataset("imagefolder", data_dir=path)
        elif kind == "folder":
            loaded = datasets.load_dataset(path, name, data_dir=data_dir)
        else:
            if path in SCRIPT_DATASETS:
                raise script_error(path)
            with _hub_errors(path):
                loaded = datasets.load_dataset(path, name, data_dir=data_dir)
    except datasets.data_files.EmptyDatasetError as err:
        raise RegablateError(
            f"no data files found in {path} (images in one sub-folder per class, parquet or webdataset files)"
        ) from err
    except FileNotFoundError as err:
        raise RegablateError(f"cannot load dataset {path} ({kind}): {err}") from err
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)


@dataclass
class Description:
    """What the preflight learns without reading data: ``splits`` maps each split to its features (or None)."""

    kind: str
    splits: dict[str, datasets.Features | None]
    unchecked: str | None = None  # why nothing could be checked (offline and not cached)


def describe(path: str, name: str | None, data_dir: str | None, source: Source) -> Description:
    """The splits and feature types of ``path`` from metadata only (raises RegablateError for real problems)."""
    path = os.path.expanduser(path)
    kind = resolve_source(path, source)
    if kind == "disk":
        return Description(kind, _saved_features(Path(path)))
    if kind in ("folder", "imagefolder"):
        return Description(kind, _folder_features(Path(path), data_dir, force_images=kind == "imagefolder"))
    if path in SCRIPT_DATASETS:
        raise script_error(path)
    try:
        with _hub_errors(path), _offline(not hub_reachable()):
            builder = datasets.load_dataset_builder(path, name, data_dir=data_dir)
    except RegablateError as err:
        if "cannot reach the Hugging Face Hub" in str(err):
            return Description("hub", {}, unchecked="offline and not in the cache")
        raise
    names = [str(split) for split in (builder.info.splits or builder.config.data_files or {})]
    return Description("hub", dict.fromkeys(names, builder.info.features))


@cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's endpoint takes a connection (one quick try; False in offline mode).

    Without it, a machine with no network but no ``HF_HUB_OFFLINE`` either spends tens of
    seconds in the Hub client's retries for every name.
    """
    if datasets.config.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def _offline(offline: bool) -> Iterator[None]:
    """``datasets`` and the Hub client in offline mode (cache only) for the block, if ``offline``."""
    if not offline:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _saved_features(root: Path) -> dict[str, datasets.Features | None]:
    """Splits and features of a ``save_to_disk`` folder, from its JSON files."""
    if (root / "dataset_dict.json").is_file():
        names = json.loads((root / "dataset_dict.json").read_text())["splits"]
        return {split: _info_features(root / split) for split in names}
    return {"train": _info_features(root)}


def _info_features(folder: Path) -> datasets.Features | None:
    info = folder / "dataset_info.json"
    if not info.is_file():
        raise RegablateError(f"{folder} has no dataset_info.json: an incomplete save_to_disk folder? write it again")
    features = json.loads(info.read_text()).get("features")
    return datasets.Features.from_dict(features) if features else None


def _folder_features(root: Path, data_dir: str | None, force_images: bool) -> dict[str, datasets.Features | None]:
    """Splits of a folder of data files, as ``datasets`` resolves them, with the features their format gives."""
    base = root / data_dir if data_dir else root
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(base)), str(base))
    except datasets.data_files.EmptyDatasetError:
        raise RegablateError(
            f"no data files found in {base} (images in one sub-folder per class, parquet or webdataset files)"
        ) from None
    module = "imagefolder" if force_images else infer_module_for_data_files(files)[0]
    reader = _FORMAT_FEATURES.get(module)
    return {str(split): reader(list(paths)) if reader else None for split, paths in files.items()}


def _parquet_features(paths: list[str]) -> datasets.Features:
    import pyarrow.parquet as pq

    return datasets.Features.from_arrow_schema(pq.read_schema(paths[0]))


def _webdataset_features(paths: list[str]) -> datasets.Features:
    """The fields of the first sample of the first shard, typed as ``datasets``' webdataset builder types them."""
    from datasets.packaged_modules.webdataset.webdataset import IMAGE_EXTENSIONS, base_plus_ext

    fields: dict[str, datasets.features.features.FeatureType] = {}
    first = None
    with tarfile.open(paths[0]) as shard:
        for member in shard:
            key, field = base_plus_ext(member.name)
            if key is None or not member.isfile():
                continue
            if first is not None and key != first:
                break
            first = key
            extension = field.rsplit(".", 1)[-1].lower()
            if extension in IMAGE_EXTENSIONS:
                fields[field] = datasets.Image()
            elif extension in ("cls", "cls2", "index", "inx", "id"):
                fields[field] = datasets.Value("int64")
            elif extension in ("txt", "text", "transcript"):
                fields[field] = datasets.Value("string")
            else:  # json, npy, ...: decoded by content, typed at load time
                fields[field] = datasets.Value("binary")
    return datasets.Features(fields)


def _image_folder_features(paths: list[str]) -> datasets.Features:
    """``image``, and ``label`` as a ClassLabel of the sub-folder names when the images lie in several."""
    folders = sorted({Path(p).parent.name for p in paths})
    features = {"image": datasets.Image()}
    if len(folders) > 1:
        features["label"] = datasets.ClassLabel(names=folders)
    return datasets.Features(features)


_FORMAT_FEATURES: dict[str, Callable[[list[str]], datasets.Features]] = {
    "parquet": _parquet_features,
    "webdataset": _webdataset_features,
    "imagefolder": _image_folder_features,
}
