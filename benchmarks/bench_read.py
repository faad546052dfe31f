"""Reading a ``.nii.gz``: unionseg's ``read_image`` (one pass to the end of the gzip stream, so its CRC is
checked) against ``nib.load`` + ``dataobj`` (stops at the last voxel byte, never sees the CRC).

The check must cost neither time nor memory: both decompress the stream once into one array.

Run: ``.venv/bin/python benchmarks/bench_read.py [--shape 256 256 200] [--repeats 15]`` (an unscaled and
a scaled int16 file; the readers' arrays are checked equal first)
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


def _time(read: Callable[[], object]) -> float:
    start = time.perf_counter()
    read()
    return time.perf_counter() - start


def _peak_mb(read: Callable[[], object]) -> float:
    tracemalloc.start()
    read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1e6


def _compare(path: Path, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds of each reader over ``repeats`` reads, taken in turn (ABAB...: this machine's speed
    drifts within minutes, and reads all of one reader first would give it the other half of the drift),
    and the peak traced memory (MB) of one more read each. The two arrays are checked equal first."""
    rows: dict[str, Callable[[], object]] = {
        "nib.load + dataobj": lambda: np.asanyarray(nib.load(str(path)).dataobj),
        "read_image (CRC checked)": lambda: read_image(path),
    }
    theirs, ours = np.asanyarray(nib.load(str(path)).dataobj), read_image(path)[0]
    if not np.array_equal(theirs, ours):  # values (a scaled file: nibabel's float64, our float32)
        raise SystemExit(f"{path.name}: the readers disagree ({theirs.dtype} / {ours.dtype})")
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, read in rows.items():
            times[name].append(_time(read))
    return {name: (statistics.median(times[name]), _peak_mb(read)) for name, read in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 200))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 200.0, tuple(args.shape)).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        for label, scaled in (("int16", False), ("int16 with scl_slope (read as float32)", True)):
            path = Path(tmp) / f"ct_{int(scaled)}.nii.gz"
            image = nib.Nifti1Image(volume, np.eye(4))
            if scaled:  # a common CT store: voxels = 0.5 x stored - 1024
                image.header.set_slope_inter(0.5, -1024.0)
            nib.save(image, str(path))
            print(f"{label}: volume {tuple(args.shape)} ({volume.nbytes / 1e6:.1f} MB stored), file "
                  f"{path.stat().st_size / 1e6:.1f} MB, median of {args.repeats} reads each, in turn")
            results = _compare(path, args.repeats)
            for name, (seconds, peak) in results.items():
                print(f"  {name:26s} {seconds:6.3f} s   peak {peak:6.1f} MB")
            base = results["nib.load + dataobj"][0]
            print(f"  read_image / nib.load: {results['read_image (CRC checked)'][0] / base:.2f} x")


if __name__ == "__main__":
    main()
