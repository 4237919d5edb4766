"""The paper grid's inputs in miniature, in the on-disk formats of the real sources.

``configs/fig8/rehearsal.yaml`` runs every stage of ``configs/fig8/paper.yaml`` on CPU. Its inputs
are written here from synthetic scenes (``render_scene``: images with a class label, a class mask
and a depth map), each in the format a user downloads, and then prepared by the same code a user
runs on the real files:

- ImageNet-1k: ``imagenet/data/{train,validation}-00000-of-00001.parquet``, JPEG bytes and a
  ``ClassLabel`` (the layout of ``ILSVRC/imagenet-1k`` on the Hub), read by ``HFDataModule``;
- ADE20k: ``sources/ADEChallengeData2016.zip`` (``images/{training,validation}/*.jpg``, mode L
  annotation PNGs, 0 = "other"), prepared by ``prepare_ade20k`` into ``ade20k/``;
- NYU Depth v2: the BTS / toolbox layout (480x640 ``scene/rgb_N.jpg``, 16-bit ``sync_depth_N.png``
  in mm, ``nyu_train.txt`` / ``nyu_test.txt``), prepared by ``prepare_nyud`` into ``nyud/``;
- the starting points of continued pretraining: ``vit_r0.safetensors``, a ViT-L/14-family backbone
  shrunk to the rehearsal's size, without registers, in timm's state-dict layout (the layout timm's
  DINOv2 weights have), and ``dinov3_r4.safetensors``, a DINOv3 ViT-S/16-family backbone shrunk the
  same way with its 4 registers (``configs/fig8/dinov3_rehearsal.yaml``). Their weights are random:
  the rehearsals check the path, not the numbers.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from regablate.data.ade20k import prepare_ade20k
from regablate.data.nyud import prepare_nyud
from regablate.data.synthetic import class_identity, render_scene
from regablate.errors import RegablateError
from regablate.models.backbone import build_backbone
from regablate.runs import write_folder_atomic

NUM_CLASSES = 10  # object classes of the scenes: ImageNet labels, ADE ids 1..10
NYU_FRAME = (480, 640)  # the Kinect frame the Eigen crop is defined on
BACKBONE_NAME = "vit_large_patch14_dinov2"  # at the shape below (embed_dim 48, depth 4, 3 heads)
DINOV3_NAME = "vit_small_patch16_dinov3"  # the same shape, with DINOv3's 4 registers
SHRUNK: dict[str, Any] = {"embed_dim": 48, "depth": 4, "num_heads": 3}


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _scene(split: str, index: int, size: int, seed: int) -> dict[str, Any]:
    """One scene as the uint8 RGB image, the class mask (0 background, c + 1) and depth (float32)."""
    scene = render_scene(seed, split, index, img_size=size, num_classes=NUM_CLASSES)
    image = (scene["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return {
        "image": image,
        "label": int(scene["label"]),
        "mask": scene["mask"].numpy(),
        "depth": scene["depth"].numpy(),
    }


def write_imagenet(folder: Path, sizes: dict[str, int], img_size: int, seed: int) -> None:
    names = ["_".join(map(str, class_identity(c, NUM_CLASSES)[:2])) + f"_{c}" for c in range(NUM_CLASSES)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    (folder / "data").mkdir(parents=True)
    for split, count in sizes.items():
        scenes = [_scene(split, i, img_size, seed) for i in range(count)]
        table = {
            "image": [{"bytes": _jpeg(s["image"]), "path": f"{split}_{i:05d}.JPEG"} for i, s in enumerate(scenes)],
            "label": [s["label"] for s in scenes],
        }
        datasets.Dataset.from_dict(table, features=features).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet")
        )


def write_ade_zip(path: Path, sizes: dict[str, int], shape: tuple[int, int], seed: int) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ADEChallengeData2016/objectInfo150.txt", "Idx\tRatio\tTrain\tVal\tName\n")
        for folder, count in sizes.items():
            prefix = "train" if folder == "training" else "val"
            for i in range(count):
                scene = _scene(folder, i, max(shape), seed)
                stem = f"ADE_{prefix}_{i + 1:08d}"
                rows = slice(0, shape[0])
                archive.writestr(f"ADEChallengeData2016/images/{folder}/{stem}.jpg", _jpeg(scene["image"][rows]))
                mask = scene["mask"][rows].astype(np.uint8)  # 0 = "other", objects 1..NUM_CLASSES
                archive.writestr(f"ADEChallengeData2016/annotations/{folder}/{stem}.png", _png(mask))


def write_nyu_lists(root: Path, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    """Frames of a few 'scenes' (one per split here) and the split files; returns the split files."""
    height, width = NYU_FRAME
    top = (width - height) // 2
    lists = {}
    for split, count in sizes.items():
        scene_dir = f"scene_{split}_0001"
        (root / scene_dir).mkdir(parents=True)
        lines = []
        for i in range(count):
            scene = _scene(f"nyu_{split}", i, width, seed)
            rows = slice(top, top + height)
            depth_mm = np.round(scene["depth"][rows] * 800.0).astype(np.uint16)  # 0.8-9.6 m, the room's far wall
            (root / scene_dir / f"rgb_{i:05d}.jpg").write_bytes(_jpeg(scene["image"][rows], quality=95))
            (root / scene_dir / f"sync_depth_{i:05d}.png").write_bytes(_png(depth_mm))
            lines.append(f"/{scene_dir}/rgb_{i:05d}.jpg /{scene_dir}/sync_depth_{i:05d}.png 518.8579\n")
        lists[split] = root / f"nyu_{split}.txt"
        lists[split].write_text("".join(lines))
    return lists


def write_r0_backbone(path: Path, seed: int) -> None:
    """A register-free backbone of the rehearsal's shape in timm's layout (what ``pretrained: true`` converts).

    Its position embedding is for 112 px (8x8 patches), so loading it at the rehearsal's 56 px
    resamples it, as DINOv2's 518 px weights are resampled for the paper's 224 px.
    """
    torch.manual_seed(seed)
    _save(build_backbone(BACKBONE_NAME, 0, img_size=112, **SHRUNK), path)


def write_dinov3_backbone(path: Path, seed: int) -> None:
    """A DINOv3-family backbone of the rehearsal's shape with its own 4 registers, in timm's layout.

    It has no position embedding to resample (RoPE only), so it loads at any image size.
    """
    torch.manual_seed(seed)
    _save(build_backbone(DINOV3_NAME, 4, **SHRUNK), path)


def _save(model: torch.nn.Module, path: Path) -> None:
    save_file({name: t.detach().contiguous() for name, t in model.state_dict().items()}, str(path))


def prepare_rehearsal(
    output: str = "data/rehearsal",
    imagenet_train: int = 256,
    imagenet_val: int = 64,
    ade_train: int = 96,
    ade_val: int = 48,
    nyu_train: int = 96,
    nyu_test: int = 32,
    seed: int = 0,
) -> None:
    """Write the inputs of the rehearsals (ImageNet, ADE20k, NYUd, an R = 0 ViT, an R = 4 DINOv3) in their real formats.

    Args:
        output: folder to write (replaced as a whole, atomically): imagenet/, ade20k/, nyud/,
            vit_r0.safetensors, dinov3_r4.safetensors, and sources/ (the raw ADE20k archive and NYUd frames).
        imagenet_train: ImageNet-format training images (64 px scenes, JPEG in parquet).
        imagenet_val: ImageNet-format validation images.
        ade_train: ADE20k-format training images (96x128).
        ade_val: ADE20k-format validation images.
        nyu_train: NYUd-format training frames (480x640).
        nyu_test: NYUd-format test frames (scored in the Eigen crop).
        seed: seed of the scenes and of the backbone's weights.
    """
    target = Path(output).expanduser()
    if target.exists() and not (target / "vit_r0.safetensors").exists():
        raise RegablateError(f"{target} exists and is not a rehearsal folder: give another --output")

    def write(staging: Path) -> None:
        sources = staging / "sources"
        sources.mkdir(parents=True)
        write_imagenet(staging / "imagenet", {"train": imagenet_train, "validation": imagenet_val}, 64, seed)
        ade_zip = sources / "ADEChallengeData2016.zip"
        write_ade_zip(ade_zip, {"training": ade_train, "validation": ade_val}, (96, 128), seed)
        prepare_ade20k(str(ade_zip), str(staging / "ade20k"))
        lists = write_nyu_lists(sources / "nyu", {"train": nyu_train, "test": nyu_test}, seed)
        prepare_nyud(
            "lists",
            str(staging / "nyud"),
            train_list=str(lists["train"]),
            test_list=str(lists["test"]),
            root=str(sources / "nyu"),
        )
        write_r0_backbone(staging / "vit_r0.safetensors", seed)
        write_dinov3_backbone(staging / "dinov3_r4.safetensors", seed)

    write_folder_atomic(target, write)
    print(f"prepare_rehearsal: wrote {target} (imagenet, ade20k, nyud, vit_r0.safetensors, dinov3_r4.safetensors)")
