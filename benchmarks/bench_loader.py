"""Patch loader throughput: patches/s of PatchSampler + make_loader on memmapped synthetic volumes.

Synthetic cases (``--volume``^3 float32 image, uint8 label with three organs, optionally a uint8 pseudo-label
extra and a 3-channel float16 teacher-probability extra) are written as ``.npy`` files and opened with
``np.load(mmap_mode="r")``, as the trainer does with prepared data. For each patch size and worker count
the script draws ``--warmup`` batches after ``precompute()`` (worker start-up, lazy location scans), then times ``--steps``
batches of ``--batch`` patches with the default augmentation (``AugmentSpec()``) and ``fg_prob`` 0.67.

Usage:
    .venv/bin/python benchmarks/bench_loader.py                      # print the table
    .venv/bin/python benchmarks/bench_loader.py --docs docs/benchmarks.md   # also write section "Loader"
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unionseg.data.sampling import AugmentSpec, PatchSampler, SamplerCase, make_loader

N_LEAVES = 4


def write_cases(folder: Path, n_cases: int, size: int, seed: int = 0) -> list[SamplerCase]:
    """Synthetic memmapped cases: a noisy image, three ellipsoid organs, a pseudo label, a teacher."""
    rng = np.random.default_rng(seed)
    axis = np.arange(size, dtype=np.float32)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij", sparse=True)
    cases = []
    for i in range(n_cases):
        label = np.zeros((size,) * 3, dtype=np.uint8)
        for code in (1, 2, 3):
            centre = rng.uniform(0.25 * size, 0.75 * size, 3)
            radii = rng.uniform(0.05 * size, 0.15 * size, 3)
            inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
                ((z - centre[2]) / radii[2]) ** 2 < 1
            label[inside] = code
        image = (label * 0.3 + rng.normal(0, 0.1, label.shape)).astype(np.float32)
        teacher = np.zeros((3, *label.shape), dtype=np.float16)
        teacher[0] = label == 0
        teacher[1] = label == 1
        teacher[2] = label >= 2
        arrays = {"image": image, "label": label, "pseudo": label, "teacher": teacher}
        for name, arr in arrays.items():
            np.save(folder / f"case{i}_{name}.npy", arr)
        mm = {name: np.load(folder / f"case{i}_{name}.npy", mmap_mode="r") for name in arrays}
        annotated = np.zeros(N_LEAVES, dtype=bool)
        annotated[[0, 1 + i % 3]] = True
        cases.append(SamplerCase(i % 2, annotated, mm["image"], mm["label"],
                                 {"pseudo": mm["pseudo"], "teacher": mm["teacher"]}, f"case{i}"))
    return cases


def measure(cases: list[SamplerCase], patch: int, workers: int, extras: bool, batch: int, steps: int,
            warmup: int) -> float:
    """Patches per second in steady state."""
    kinds = {"pseudo": "label", "teacher": "prob"} if extras else {}
    sampler = PatchSampler(cases, patch, batch, N_LEAVES, seed=0, augment=AugmentSpec(), extra_kinds=kinds)
    sampler.precompute()  # one-time scans (timed separately), inherited by the forked workers
    loader = make_loader(sampler, 0, warmup + steps, num_workers=workers, pin_memory=False)
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    count = 0
    for batch_dict in loader:
        count += batch_dict["image"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", type=int, default=128, help="edge of the synthetic cubic volumes")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--patches", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file whose 'Loader' section to write")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = write_cases(Path(tmp), args.cases, args.volume)
        probe = PatchSampler(cases, args.patches[0], args.batch, N_LEAVES)
        start = time.perf_counter()
        probe.precompute()
        scan_ms = 1000 * (time.perf_counter() - start) / len(cases)
        print(f"precompute (location scan + image minimum): {scan_ms:.0f} ms per case", flush=True)
        for patch in args.patches:
            for extras in (False, True):
                for workers in args.workers:
                    rate = max(measure(cases, patch, workers, extras, args.batch, args.steps, args.warmup)
                               for _ in range(args.repeats))
                    rows.append((f"{patch}^3", "pseudo + teacher(3ch fp16)" if extras else "none", workers, rate))
                    print(f"patch {patch}^3  extras {rows[-1][1]:<27} workers {workers}: {rate:7.1f} patches/s",
                          flush=True)

    table = ["| patch | extras | workers | patches/s |", "|---|---|---|---|"]
    table += [f"| {p} | {e} | {w} | {r:.1f} |" for p, e, w, r in rows]
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_loader.py", *sys.argv[1:]])
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
               f"load average at the end {load} (other jobs share the cores: treat the figures as +-50 %)")
    body = "\n".join([
        f"`PatchSampler` + `make_loader` on {args.cases} memmapped synthetic {args.volume}^3 cases "
        f"(float32 image, uint8 label; extras: uint8 pseudo labels and 3-channel float16 teacher "
        f"probabilities), batch {args.batch}, default augmentation (`AugmentSpec()`), fg_prob 0.67; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps (worker start-up excluded), "
        f"after `sampler.precompute()`; best of {args.repeats} runs. The loader runs alone here (the "
        "main process only consumes batches), so workers add inter-process transfer without freeing "
        "the main process; in training they overlap loading with the network step.",
        "",
        f"One-time `precompute()` (foreground-location scan + image minimum): {scan_ms:.0f} ms per "
        f"{args.volume}^3 case.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}.",
        "",
        *table,
    ])
    print()
    print("\n".join(table))
    if args.docs is not None:
        # the section's generated block only: the hand-written notes after it stay (the whole section was
        # replaced; helper-125)
        from docs_update import update_generated  # benchmarks/ is on the path when run as a script

        print(f"{args.docs}: {update_generated(args.docs, 'Loader', body)}")


if __name__ == "__main__":
    main()
