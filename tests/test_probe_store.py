"""The feature store and the probe's plan: chunked .npy files, what each split keeps, what it costs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regablate.data import SyntheticScenes
from regablate.errors import RegablateError
from regablate.models import build_backbone
from regablate.probe import LinearProbe, ViTExtractor, plan_probe
from regablate.probe.cache import FeatureCache, FieldSpec
from regablate.probe.features import extract_split
from regablate.probe.plan import mask_storage_dtype
from tests.conftest import TINY, TINY_MODEL


def store(tmp_path, fingerprint="w1", data=None, precision="32-true") -> FeatureCache:
    return FeatureCache(tmp_path / "cache", fingerprint, data or {"data": 1}, precision)


def test_rows_written_in_any_order_by_several_writers_read_back_as_one_npy_array(tmp_path):
    cache = store(tmp_path)
    values = torch.randn(10, 3, 2).half()
    spec = FieldSpec((3, 2), torch.float16)
    cache.allocate("train", 10, {"patches": spec})
    assert not cache.path("train", "patches").exists(), "a field is invisible until committed"
    # Two "ranks", each with its own file handle, writing their contiguous rows batch by batch.
    first, second = cache.writers("train", 10, {"patches": spec}), cache.writers("train", 10, {"patches": spec})
    second["patches"].write(7, values[7:])
    first["patches"].write(0, values[:4])
    second["patches"].write(4, values[4:7])
    cache.commit("train", {"patches"})
    assert not cache.partial_path("train", "patches").exists()
    loaded = cache.load("train", {"patches"})["patches"]
    assert torch.equal(loaded, values)
    # A standard .npy file: numpy's own reader agrees, memory-mapped; the key is in the JSON beside it.
    path = cache.path("train", "patches")
    assert np.array_equal(np.load(path), values.numpy())
    assert str(path) in Path("/proc/self/maps").read_text(), "read through a memory map of the file"
    meta = json.loads(cache.provenance_path("train", "patches").read_text())
    assert meta["weights"] == "w1" and meta["split"] == "train" and meta["field"] == "patches"
    assert path.stat().st_size - values.numel() * 2 == 128, "numpy's header; the data start 64-byte aligned"
    loaded += 1  # a stray write stays in the process (copy-on-write), the file is unchanged
    assert torch.equal(cache.load("train", {"patches"})["patches"], values)


def test_only_committed_fields_count_as_cached_and_a_discarded_extraction_leaves_nothing(tmp_path):
    cache = store(tmp_path)
    specs = {"cls": FieldSpec((4,), torch.float32), "label": FieldSpec((), torch.int64)}
    cache.allocate("val", 3, specs)
    assert cache.cached("val", set(specs)) == set()
    cache.discard("val", set(specs))
    assert not any(p.is_file() for p in cache.folder.rglob("*"))


def test_the_store_refuses_another_backbones_or_other_datas_files(tmp_path):
    cache = store(tmp_path)
    spec = {"cls": FieldSpec((2,), torch.float32)}
    cache.allocate("train", 1, spec)
    writers = cache.writers("train", 1, spec)
    writers["cls"].write(0, torch.ones(1, 2))
    cache.commit("train", {"cls"})
    assert cache.cached("train", {"cls", "mean_patch"}) == {"cls"}
    for other in (store(tmp_path, fingerprint="w2"), store(tmp_path, data={"data": 2})):
        (other.folder / "train").mkdir(parents=True, exist_ok=True)
        for path in (cache.path("train", "cls"), cache.provenance_path("train", "cls")):
            (other.folder / "train" / path.name).write_bytes(path.read_bytes())
        with pytest.raises(RegablateError, match="another backbone|other data"):
            other.cached("train", {"cls"})
    cache.provenance_path("train", "cls").unlink()
    with pytest.raises(RegablateError, match="cannot read probe cache .*cls.npy .*delete it to recompute"):
        cache.cached("train", {"cls"})
    assert store(tmp_path, precision="bf16-mixed").folder != cache.folder, "bf16 features are another store"


def test_stores_of_the_older_safetensors_layout_are_removed_and_others_kept(tmp_path):
    cache = store(tmp_path)
    spec = {"cls": FieldSpec((2,), torch.float32)}
    cache.allocate("train", 1, spec)
    cache.writers("train", 1, spec)["cls"].write(0, torch.ones(1, 2))
    cache.commit("train", {"cls"})
    old = cache.root / "0123456789abcdef"
    (old / "train").mkdir(parents=True)
    (old / "train" / "cls.safetensors").write_bytes(b"format 3")
    assert cache.remove_old_stores() == [old]
    assert not old.exists() and cache.cached("train", {"cls"}) == {"cls"}
    assert cache.remove_old_stores() == []


def test_row_writer_refuses_values_that_do_not_fit_and_rows_of_another_shape(tmp_path):
    cache = store(tmp_path)
    spec = {"mask": FieldSpec((2, 2), torch.uint8)}
    cache.allocate("train", 2, spec)
    writer = cache.writers("train", 2, spec)["mask"]
    writer.write(0, torch.tensor([[[0, 255], [3, 4]]]))  # int64 ids that fit uint8
    with pytest.raises(RegablateError, match="values 0..300 do not fit torch.uint8"):
        writer.write(1, torch.tensor([[[0, 300], [3, 4]]]))
    with pytest.raises(RegablateError, match="expected \\(2, 2\\)"):
        writer.write(1, torch.zeros(1, 3, 3, dtype=torch.long))
    assert mask_storage_dtype(151, 255) == torch.uint8
    assert mask_storage_dtype(None, 255) == torch.int32 and mask_storage_dtype(10, -1) == torch.int32


def scenes(**sizes) -> SyntheticScenes:
    return SyntheticScenes(img_size=32, num_classes=4, batch_size=16, **{"train_size": 40, "val_size": 20, **sizes})


def extractor(img_size: int = 32) -> ViTExtractor:
    torch.manual_seed(0)
    return ViTExtractor(build_backbone(TINY_MODEL, 2, **{**TINY, "img_size": img_size}))


def test_a_classification_probe_keeps_cls_and_the_mean_patch_only(tmp_path):
    plan = plan_probe(extractor(), scenes(test_size=30), LinearProbe(probes=["cls"]), store(tmp_path))
    assert set(plan.splits) == {"train", "val", "test"}
    for split in plan.splits.values():
        assert list(split.specs) == ["cls", "mean_patch", "label"]
        assert split.nbytes() == split.num_samples * (32 * 4 + 32 * 4 + 8)
    assert plan.to_write == (40 + 20 + 30) * 264


def test_every_probe_keeps_what_it_reads_and_no_more(tmp_path):
    plan = plan_probe(extractor(), scenes(test_size=30), LinearProbe(), store(tmp_path))
    fields = {name: list(split.specs) for name, split in plan.splits.items()}
    assert fields["train"] == ["cls", "mean_patch", "patches", "label", "mask", "depth"]
    assert fields["val"] == ["cls", "mean_patch", "label"], "val only selects the classifier's lr"
    assert fields["test"] == ["cls", "mean_patch", "patches", "keys", "label", "mask", "depth", "box"]
    specs = plan.splits["test"].specs
    assert specs["patches"] == FieldSpec((8, 8, 32), torch.float16) and specs["keys"] == FieldSpec(
        (8, 8, 32), torch.float16
    )
    assert specs["mask"] == FieldSpec((32, 32), torch.uint8) and specs["box"] == FieldSpec((4,), torch.float32)
    dense = plan_probe(extractor(), scenes(test_size=30), LinearProbe(probes=["seg"]), store(tmp_path))
    assert {name: list(s.specs) for name, s in dense.splits.items()} == {
        "train": ["patches", "mask"],
        "test": ["patches", "mask"],
    }, "no val split at all for a segmentation probe"


def test_what_a_classification_probe_keeps_does_not_grow_with_the_patches(tmp_path):
    small = plan_probe(extractor(32), scenes(), LinearProbe(probes=["cls"]), store(tmp_path))
    large = plan_probe(
        extractor(64),
        SyntheticScenes(img_size=64, train_size=40, val_size=20),
        LinearProbe(probes=["cls"]),
        store(tmp_path),
    )
    assert small.splits["train"].specs == large.splits["train"].specs  # 64 vs 256 patches
    everything = plan_probe(
        extractor(64), SyntheticScenes(img_size=64, train_size=40, val_size=20), LinearProbe(), store(tmp_path)
    )
    assert everything.splits["train"].nbytes() > 50 * large.splits["train"].nbytes()


def test_extract_split_stores_each_batch_at_its_rows(tmp_path):
    data = scenes(test_size=30)
    plan = plan_probe(extractor(), data, LinearProbe(probes=["cls", "lost"]), store(tmp_path))
    test = plan.splits["test"]
    plan.cache.allocate("test", test.num_samples, test.missing)
    writers = plan.cache.writers("test", test.num_samples, test.missing)
    batches = list(torch.utils.data.DataLoader(test.dataset, batch_size=16))
    assert extract_split(extractor(), batches, writers) == 30
    plan.cache.commit("test", set(test.missing))
    stored = plan.cache.load("test", set(test.specs))
    images = torch.stack([test.dataset[i]["image"] for i in range(30)])
    out = extractor()(images)
    torch.testing.assert_close(stored["cls"], out.cls)
    torch.testing.assert_close(stored["mean_patch"], out.patches.mean(dim=(1, 2)))
    assert torch.equal(stored["keys"], out.keys.half())
    assert torch.equal(stored["label"], torch.stack([test.dataset[i]["label"] for i in range(30)]))
    assert "patches" not in stored and "mask" not in stored
