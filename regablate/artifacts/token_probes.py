"""Token probes: what each kind of token holds (Darcet et al., Sec. 2.1: Fig. 5b and Table 1).

At one block, every kind of token (the class token, each register, a test-time register, the
normal patches and the outlier patches by the inspect threshold) gets three linear probes, each
trained on the tokens of that kind in one split of images and scored on the same kind in another:

* **position**: the patch index, top-1 (patches only: the class token and registers have none);
* **pixels**: the patch's own pixels (the model's normalised input), as the normalised L2 error
  ``sum |x_hat - x|^2 / sum |x - mean_train|^2`` (0: exact, 1: no better than the mean patch);
* **class**: the image's class, top-1 (where the images have labels).

The paper finds outlier tokens hold little local information (they localise and reconstruct worse
than normal patches, Fig. 5b) and much global information (they classify the image better than
normal patches, below the class token, Table 1). A kind with no tokens in a split gets no number,
only the reason; every number comes with the token counts behind it and, for the top-1 probes, the
chance level of that kind (always answering the most frequent training target).

Tokens are read from the block's output (the pre-norm residual stream, as ``scan`` reads it: the
outlier cutoff comes from the training images' patch norms there), then passed through the model's
final norm (as DINOv2's intermediate layers are) and standardised with the training tokens'
statistics. The top-1 probes are linear classifiers trained with AdamW (``probe.heads.train_head``);
the pixel probe is a ridge regression solved in closed form.

``regablate inspect --token_probes true`` and the ``token`` probe of ``regablate probe`` run them
(:class:`TokenProbes` holds the settings of both: ``--token_probe.*``) and write ``token_probes.json``;
``regablate.artifacts.token_tables`` shows it (printed, in ``regablate report``, as summary keys).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from regablate.artifacts.settings import TokenProbes
from regablate.artifacts.stats import Threshold, token_norms
from regablate.artifacts.token_tables import NOT_A_PATCH, OUTLIER_MAP_FILE, PROBE_NAMES, TOKEN_PROBES_FILE, outlier_map
from regablate.data.common import num_samples
from regablate.data.images import image_files, load_images
from regablate.data.synthetic import SyntheticScenesDataset
from regablate.errors import RegablateError
from regablate.minibatch import Schedule, train_head
from regablate.models.backbone import eval_mode, extract_features
from regablate.models.layout import Backbone, TokenLayout
from regablate.progress import Progress
from regablate.runs import atomic_path, write_json_atomic

DESCRIPTIONS = {
    "position": "linear classifier of the patch index, top-1 on the scored images",
    "pixels": "ridge regression of the patch's normalised input pixels; "
    "error sum|x_hat - x|^2 / sum|x - train mean|^2 on the scored images (0 exact, 1 the mean patch)",
    "class": "linear classifier of the image's label from the single token, top-1 on the scored images",
}
EXTRACT_BATCH = 64


@dataclass
class TokenSplit:
    """One split's tokens at the probed block: ``tokens`` ``(B, T, D)`` normed, ``norms`` ``(B, N)`` of the
    patches before the norm, ``pixels`` ``(B, N, 3 p p)``, ``labels`` ``(B,)`` or ``None``, the patch ``grid``."""

    tokens: Tensor
    norms: Tensor
    pixels: Tensor
    labels: Tensor | None
    grid: tuple[int, int]


def patch_pixels(images: Tensor, patch_size: Sequence[int]) -> Tensor:
    """``(B, 3, H, W)`` -> ``(B, N, 3 * ph * pw)``: each patch's pixels, patches in the ViT's row-major order."""
    return F.unfold(images, kernel_size=tuple(patch_size), stride=tuple(patch_size)).transpose(1, 2)


@torch.no_grad()
def read_tokens(
    model: Backbone,
    images: Tensor,
    block: int,
    labels: Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> TokenSplit:
    """The tokens of ``images`` (normalised, on the host) at ``block`` (``0..depth-1``), batch by batch."""
    layout = TokenLayout.of(model)
    tokens, norms = [], []
    with eval_mode(model):
        for batch in images.split(EXTRACT_BATCH):
            out = extract_features(model, batch.to(device), blocks=[block]).blocks[block].float()
            norms.append(token_norms(out[:, layout.patches]).cpu())
            tokens.append(model.norm(out).float().cpu())
            if progress is not None:
                progress.update(len(batch))
    return TokenSplit(
        tokens=torch.cat(tokens),
        norms=torch.cat(norms),
        pixels=patch_pixels(images.float(), model.patch_embed.patch_size),
        labels=labels,
        grid=tuple(model.patch_embed.dynamic_feat_size((images.shape[-2], images.shape[-1]))),
    )


@dataclass
class KindTokens:
    """The tokens of one kind in one split: ``features`` ``(M, D)``, ``positions`` ``(M,)`` patch indices
    (``None`` off the patches), ``pixels`` ``(M, P)`` (``None`` off the patches), ``labels`` ``(M,)``."""

    features: Tensor
    positions: Tensor | None
    pixels: Tensor | None
    labels: Tensor | None


def token_kinds(layout: TokenLayout) -> list[str]:
    """The kinds probed on a model with ``layout``, in table order."""
    kinds = ["cls"] if layout.has_cls else []
    kinds += [f"register_{i + 1}" for i in range(layout.num_registers)]
    kinds += ["test_time_register"] * layout.test_time_registers
    return [*kinds, "normal", "outlier"]


def split_kinds(split: TokenSplit, layout: TokenLayout, outliers: Tensor) -> dict[str, KindTokens]:
    """``split``'s tokens by kind; ``outliers`` ``(B, N)`` marks the outlier patches."""
    kinds: dict[str, KindTokens] = {}
    prefix = [k for k in token_kinds(layout) if k not in ("normal", "outlier")]
    for index, kind in enumerate(prefix):
        kinds[kind] = KindTokens(split.tokens[:, index], None, None, split.labels)
    patches = split.tokens[:, layout.patches]
    b, n = split.norms.shape
    positions = torch.arange(n).expand(b, n)
    labels = None if split.labels is None else split.labels[:, None].expand(b, n)
    for kind, mask in (("normal", ~outliers), ("outlier", outliers)):
        kinds[kind] = KindTokens(
            patches[mask], positions[mask], split.pixels[mask], None if labels is None else labels[mask]
        )
    return kinds


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the heads on one intra-op thread: a step of a linear head on a few hundred tokens is too small to
    share, and on a loaded machine the threads' hand-offs cost nearly 60x the step (10.3 s against 0.18 s for 300
    steps of a 32 -> 64 head on 15360 tokens, measured here on 2 busy cores, 2026-12-05)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _standardiser(features: Tensor) -> tuple[Tensor, Tensor]:
    return features.mean(dim=0), features.std(dim=0, unbiased=False).clamp_min(1e-6)


def _top1(
    train: Tensor, targets: Tensor, test: Tensor, test_targets: Tensor, classes: int, settings: TokenProbes
) -> tuple[float, float]:
    """Top-1 of a linear classifier trained on ``train`` -> ``targets``, and the chance level (the most
    frequent training target), on ``test``."""
    head = nn.Linear(train.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=1e-4)
    train_head(
        optimizer,
        lambda idx: F.cross_entropy(head(train[idx]), targets[idx]),
        len(train),
        Schedule(settings.steps, settings.batch_size, settings.seed),
        "token probe head",
    )
    with torch.no_grad():
        top1 = (head(test).argmax(dim=1) == test_targets).float().mean().item()
    majority = torch.bincount(targets, minlength=classes).argmax()
    return top1, (test_targets == majority).float().mean().item()


def _pixel_error(train: Tensor, pixels: Tensor, test: Tensor, test_pixels: Tensor, ridge: float) -> float:
    """Normalised L2 error of a ridge regression ``train`` -> ``pixels`` on ``test`` (closed form, float64)."""
    x, y = train.double(), pixels.double()
    centre = y.mean(dim=0)
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, x.T @ (y - centre))
    predicted = test.double() @ weight + centre
    target = test_pixels.double()
    residual = (predicted - target).square().sum()
    spread = (target - centre).square().sum().clamp_min(1e-12)
    return float(residual / spread)


def _draw(kind: KindTokens, limit: int, seed: int) -> KindTokens:
    """At most ``limit`` of ``kind``'s tokens, a seeded draw."""
    if len(kind.features) <= limit:
        return kind
    keep = torch.randperm(len(kind.features), generator=torch.Generator().manual_seed(seed))[:limit]
    pick = [None if v is None else v[keep] for v in (kind.positions, kind.pixels, kind.labels)]
    return KindTokens(kind.features[keep], *pick)


def probe_kind(
    train: KindTokens, test: KindTokens, num_patches: int, num_classes: int | None, settings: TokenProbes
) -> dict[str, Any]:
    """The three probes of one kind: ``tokens`` (all of the kind's tokens per split), then each probe's cell:
    its value with the tokens it was trained and scored on (at most ``max_tokens`` of them trained on), or
    no value and why."""
    counts = {"train": len(train.features), "test": len(test.features)}
    cells: dict[str, Any] = {"tokens": counts}
    empty = [split for split, count in counts.items() if count == 0]
    why_empty = f"no tokens of this kind in the {' and '.join(empty)} images" if empty else None
    train = _draw(train, settings.max_tokens, settings.seed)
    used = {"train": len(train.features), "test": counts["test"]}  # what each number comes from (after the draw)
    mean, std = _standardiser(train.features) if counts["train"] else (0.0, 1.0)
    x_train, x_test = (train.features - mean) / std, (test.features - mean) / std
    for name in PROBE_NAMES:
        if name != "class" and train.positions is None:
            cells[name] = {"value": None, "why": NOT_A_PATCH}
        elif name == "class" and (train.labels is None or num_classes is None):
            cells[name] = {"value": None, "why": "the images have no labels"}
        elif why_empty is not None:
            cells[name] = {"value": None, "why": why_empty}
        elif name == "pixels":
            assert train.pixels is not None and test.pixels is not None
            error = _pixel_error(x_train, train.pixels, x_test, test.pixels, settings.ridge)
            cells[name] = {"value": error, "tokens": used}
        else:
            targets, test_targets, classes = (
                (train.positions, test.positions, num_patches)
                if name == "position"
                else (train.labels, test.labels, num_classes)
            )
            assert targets is not None and test_targets is not None and classes is not None
            top1, chance = _top1(x_train, targets.long(), x_test, test_targets.long(), classes, settings)
            cells[name] = {"value": top1, "chance": chance, "tokens": used}
    return cells


@dataclass
class TokenProbeResult:
    """What :func:`probe_tokens` found: ``table`` (``token_probes.json``'s content) and the probed block's
    outlier frequency per patch position ``(h, w)`` over all its images."""

    table: dict[str, Any]
    outlier_positions: Tensor

    def save(self, folder: Path) -> None:
        """``token_probes.json`` and ``outlier_map.png`` into ``folder``."""
        write_json_atomic(folder / TOKEN_PROBES_FILE, self.table)
        figure = outlier_map(self.outlier_positions, self.table["block"], sum(self.table["images"].values()))
        with atomic_path(folder / OUTLIER_MAP_FILE) as tmp:
            figure.savefig(tmp, format="png")


def probe_tokens(
    model: Backbone,
    train: TokenSplit,
    test: TokenSplit,
    *,
    block: int,
    settings: TokenProbes,
    scored_on: str = "test",
) -> TokenProbeResult:
    """Train and score every kind's probes on ``train`` / ``test`` (read at ``block`` by :func:`read_tokens`)."""
    started = time.perf_counter()
    layout = TokenLayout.of(model)
    threshold = Threshold(settings.threshold, settings.threshold_value)
    cutoff = float(threshold.cutoff(train.norms))
    num_patches = train.norms.shape[1]
    labelled = [s.labels for s in (train, test) if s.labels is not None]
    num_classes = int(max(int(labels.max()) for labels in labelled)) + 1 if len(labelled) == 2 else None
    by_split = [split_kinds(s, layout, s.norms > cutoff) for s in (train, test)]
    kinds = {}
    with torch.random.fork_rng(), one_thread():
        torch.manual_seed(settings.seed)
        for kind in token_kinds(layout):
            kinds[kind] = probe_kind(by_split[0][kind], by_split[1][kind], num_patches, num_classes, settings)
    outliers = torch.cat([train.norms, test.norms]) > cutoff
    table = {
        "block": block,
        "tokens_from": "the block's output through the model's final norm, standardised with the training tokens",
        "threshold": {"mode": threshold.mode, "value": threshold.value, "cutoff": cutoff},
        "images": {"train": len(train.norms), scored_on: len(test.norms)},
        "scored_on": scored_on,
        "probes": DESCRIPTIONS,
        "settings": asdict(settings),
        "kinds": kinds,
        "seconds_heads": round(time.perf_counter() - started, 3),
    }
    return TokenProbeResult(table, outliers.float().mean(dim=0).reshape(train.grid))


# Images with labels: the two splits the probes train and score on.


def scene_splits(
    seed: int, settings: TokenProbes, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> Iterator[tuple[Tensor, Tensor]]:
    """Synthetic scenes with their labels: ``train_images`` of the train split, ``test_images`` of val."""
    if size[0] != size[1]:
        raise RegablateError(
            f"synthetic scenes are square but the model takes {size[0]}x{size[1]}; pass --img_size or --images"
        )
    for split, count in (("train", settings.train_images), ("val", settings.test_images)):
        scenes = SyntheticScenesDataset(
            seed=seed, split=split, size=count, img_size=size[0], mean=tuple(mean), std=tuple(std)
        )
        samples = [scenes[i] for i in range(count)]
        yield torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


def folder_splits(
    folder: Path, settings: TokenProbes, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> list[tuple[Tensor, Tensor | None]]:
    """An image folder's images, evenly spread over its sorted paths, drawn into two splits; labels from
    the class subfolders (an image's first folder under ``folder``) where there are two or more."""
    files = image_files(folder, 2**62)
    wanted = settings.train_images + settings.test_images
    if len(files) < 2:
        raise RegablateError(f"token probes need at least 2 images in {folder} (one to train on, one to score)")
    if len(files) > wanted:
        files = [files[i] for i in torch.linspace(0, len(files) - 1, wanted).round().long().tolist()]
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    train_count = min(max(1, round(len(files) * settings.train_images / wanted)), len(files) - 1)
    classes = sorted({f.relative_to(folder).parts[0] for f in files if len(f.relative_to(folder).parts) > 1})
    splits: list[tuple[Tensor, Tensor | None]] = []
    for part in (order[:train_count], order[train_count:]):
        chosen = [files[i] for i in part]
        labels = None
        if len(classes) >= 2:
            labels = torch.tensor([classes.index(f.relative_to(folder).parts[0]) for f in chosen])
        splits.append((load_images(chosen, size, mean, std), labels))
    return splits


def dataset_split(dataset: Dataset, count: int) -> tuple[Tensor, Tensor | None]:
    """The first ``count`` samples of a probe's dataset: images and labels (``None`` without labels)."""
    samples = [dataset[i] for i in range(min(count, num_samples(dataset)))]
    labels = torch.stack([torch.as_tensor(s["label"]) for s in samples]) if "label" in samples[0] else None
    return torch.stack([s["image"] for s in samples]), labels


def probe_dataset_tokens(
    model: Backbone,
    train: Dataset,
    scored: Dataset,
    *,
    settings: TokenProbes,
    scored_on: str,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> TokenProbeResult:
    """The token probes of ``regablate probe``: trained on the first images of ``train``, scored on ``scored``'s."""
    splits = [dataset_split(train, settings.train_images), dataset_split(scored, settings.test_images)]
    return run_token_probes(model, splits, settings=settings, scored_on=scored_on, device=device, autocast=autocast)


def run_token_probes(
    model: Backbone,
    splits: Sequence[tuple[Tensor, Tensor | None]],
    *,
    settings: TokenProbes,
    scored_on: str = "test",
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> TokenProbeResult:
    """Read the tokens of the (train, scored) ``splits`` at ``settings.block`` on ``device`` (under ``autocast``),
    then probe them on the host."""
    block = settings.block_of(model)
    started = time.perf_counter()
    total = sum(len(images) for images, _ in splits)
    progress = Progress(f"token probes: reading block {block}", total)
    with autocast():
        train, test = (read_tokens(model, images, block, labels, device, progress) for images, labels in splits)
    progress.finish()
    seconds_tokens = time.perf_counter() - started
    result = probe_tokens(model, train, test, block=block, settings=settings, scored_on=scored_on)
    result.table["seconds_tokens"] = round(seconds_tokens, 3)
    return result
