"""Dataset preparation (scripts/prepare_ade20k.py) against the obvious baseline: reading the archive's files.

    python benchmarks/prepare_rate.py --images 400

Writes an ADEChallengeData2016.zip of ``--images`` ADE-sized frames (683x512 JPEG + mode L PNG;
the real archive has 22,210) with tests/formats.py, then times, side by side: reading every
member of the zip (the floor: what any preparation must do), and the whole preparation (header
checks, Arrow shards, save_to_disk, atomic rename). Prints images/s and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from regablate.data.ade20k import prepare_ade20k  # noqa: E402
from tests.formats import write_ade_zip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = write_ade_zip(
            Path(tmp) / "ADE.zip", {"training": args.images * 9 // 10, "validation": args.images // 10}, (512, 683)
        )
        started = time.perf_counter()
        with zipfile.ZipFile(archive) as source:
            read = sum(len(source.read(name)) for name in source.namelist())
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        prepare_ade20k(str(archive), str(Path(tmp) / "ade20k"))
        prepare_s = time.perf_counter() - started
        written = sum(p.stat().st_size for p in (Path(tmp) / "ade20k").rglob("*") if p.is_file())
    print(f"archive: {args.images} images, {read / 2**20:.0f} MiB; prepared folder {written / 2**20:.0f} MiB")
    print(f"read only: {args.images / read_s:.0f} img/s; prepare: {args.images / prepare_s:.0f} img/s")
    print(f"prepare / read time: {prepare_s / read_s:.1f}x")


if __name__ == "__main__":
    main()
