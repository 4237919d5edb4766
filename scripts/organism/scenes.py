"""Scene variants of the organism search (issue 18; docs/organism.md): a study script, not part of the package.

Background as in regablate's synthetic scenes; n objects (min..max) of distinct classes, radii a
fraction of the side, placed without overlap (rejection), so counts and presence are exact.
Labels: largest (class of the largest visible object), count (n - min_objects), presence (multi-hot K).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from regablate.data.synthetic import (
    _REACH,
    _SHAPES,
    _pixel_centres,
    _render,
    _rgb,
    _rng,
    _texture,
    background,
    class_identity,
)


def render(seed, split, index, size, K, min_objects, max_objects, rmin, rmax, hue_jitter=0.03):
    rng = _rng(seed, split, index)
    centres = _pixel_centres(size)
    xs, ys = centres[None, :], centres[:, None]
    image = background(rng, xs, ys, size)
    n = int(rng.integers(min_objects, max_objects + 1))
    classes = rng.permutation(K)[:n]
    placed = []  # (x, y, r)
    ids = np.zeros((size, size), dtype=np.int64)
    for _ in range(n):
        for _ in range(50):
            r = size * rng.uniform(rmin, rmax)
            x, y = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all(math.hypot(x - a, y - b) > 1.3 * (r + c) for a, b, c in placed):
                break
        else:
            break  # no room: fewer objects
        placed.append((x, y, r))
    n = len(placed)
    classes = classes[:n]
    period = max(4.0, size / 8)
    for j, (x, y, r) in enumerate(placed):
        c = int(classes[j])
        shape, texture, class_hue = class_identity(c, K)
        u = rng.random(4)
        colour = _rgb(class_hue + hue_jitter * (2 * u[0] - 1), 0.7 + 0.3 * u[1], 0.8 + 0.2 * u[2])
        a = 0.7 * (u[3] - 0.5)
        x0, x1 = max(0, int(x - _REACH * r)), min(size, math.ceil(x + _REACH * r))
        y0, y1 = max(0, int(y - _REACH * r)), min(size, math.ceil(y + _REACH * r))
        dx, dy = xs[:, x0:x1] - x, ys[y0:y1] - y
        along, across = math.cos(a) * dx + math.sin(a) * dy, math.cos(a) * dy - math.sin(a) * dx
        inside = _SHAPES[shape](along / r, across / r)
        paint = colour[:, None, None] * _texture(texture, along, across, period)
        window = image[:, y0:y1, x0:x1]
        window[...] = np.where(inside, paint, window)
        ids[y0:y1, x0:x1][inside] = j + 1
    visible = np.bincount(ids.ravel(), minlength=n + 1)[1:]
    main = int(np.argmax(visible))
    mask = np.concatenate(([0], classes + 1))[ids]
    rows = np.flatnonzero((ids == main + 1).any(axis=1))
    cols = np.flatnonzero((ids == main + 1).any(axis=0))
    box = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1] if len(rows) else [0, 0, size, size]
    presence = np.zeros(K, dtype=np.uint8)
    presence[classes] = 1
    return {
        "image": np.clip(image, 0.0, 1.0),
        "mask": mask,
        "box": np.array(box, np.float32),
        "largest": int(classes[main]),
        "count": n - min_objects,
        "presence": presence,
    }


def build(
    kind: str,
    split: str,
    count: int,
    size: int,
    K: int,
    seed: int = 0,
    cache: str = "runs/organism_scripts/scene_cache",
    **scene,
) -> dict[str, np.ndarray]:
    """Pre-render ``count`` scenes to uint8 arrays, cached as .npz files in ``cache``."""
    key = f"{kind}_{split}_{count}_{size}_{K}_{seed}_" + "_".join(f"{k}{v}" for k, v in sorted(scene.items()))
    path = os.path.join(cache, f"{key}.npz")
    if os.path.exists(path):
        return dict(np.load(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    start = time.time()
    images = np.empty((count, 3, size, size), np.uint8)
    masks = np.empty((count, size, size), np.uint8)
    boxes = np.empty((count, 4), np.float32)
    largest = np.empty(count, np.int64)
    counts = np.empty(count, np.int64)
    presence = np.empty((count, K), np.uint8)
    for i in range(count):
        if kind == "regablate":  # regablate's own scenes (1..max_objects, first object largest)
            s = _render(seed, split, i, size, K, scene.get("max_objects", 3), 0.03)
            s["largest"], s["count"] = int(s["label"]), int((np.unique(s["mask"]) > 0).sum()) - 1
            s["presence"] = np.zeros(K, np.uint8)
            s["presence"][np.unique(s["mask"])[np.unique(s["mask"]) > 0] - 1] = 1
        else:
            s = render(seed, split, i, size, K, **scene)
        images[i] = np.round(s["image"] * 255).astype(np.uint8)
        masks[i], boxes[i] = s["mask"], s["box"]
        largest[i], counts[i], presence[i] = s["largest"], s["count"], s["presence"]
    out = {"images": images, "masks": masks, "boxes": boxes, "largest": largest, "count": counts, "presence": presence}
    np.savez(path, **out)
    print(f"rendered {count} {kind} {split} scenes in {time.time() - start:.1f}s", flush=True)
    return out
