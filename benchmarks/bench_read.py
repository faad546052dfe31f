"""Reading a ``.nii.gz``: unionseg's ``read_image`` (one pass to the end of the gzip stream, so its CRC is
checked) against ``nib.load`` + ``dataobj`` (stops at the last voxel byte, never sees the CRC).

The check must cost neither time nor memory: both decompress the stream once into one array.

Run: ``.venv/bin/python benchmarks/bench_read.py [--shape 256 256 200] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from unionseg.data.io import read_image


def _measure(read: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds over ``repeats`` reads, and the peak traced memory (MB) of one more."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), peak / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 200))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 200.0, tuple(args.shape)).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
        print(f"volume {tuple(args.shape)} int16 ({volume.nbytes / 1e6:.1f} MB), file {path.stat().st_size / 1e6:.1f} MB")
        rows = {
            "nib.load + dataobj": lambda: np.asanyarray(nib.load(str(path)).dataobj),
            "read_image (CRC checked)": lambda: read_image(path),
        }
        results = {name: _measure(read, args.repeats) for name, read in rows.items()}
    for name, (seconds, peak) in results.items():
        print(f"{name:26s} {seconds:6.3f} s   peak {peak:6.1f} MB")
    base = results["nib.load + dataobj"][0]
    print(f"read_image / nib.load: {results['read_image (CRC checked)'][0] / base:.2f} x")


if __name__ == "__main__":
    main()
