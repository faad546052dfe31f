"""The MS-KD logit term alone: regions, loss, backward, at the standard budget's patch (CPU).

Times :func:`unionseg.losses.kd_regions` + :func:`unionseg.losses.ms_kd_logit_loss` + ``backward`` on random
student logits (channels-last, as the ResUNet returns them) and float32 teacher probabilities (as the sampler
hands the float16 caches to the loss) of the phantom's
four single-organ teachers (leaves 1-2, 3-4, 5-6, 7). Two rows, timed alternately in one process (median
of ``--repeats`` after warm-ups): ``tau = 1``, which renormalises the teachers' floored probabilities, and
``tau = 1 + 1e-6``, which takes the general ``log_softmax(log p / tau)`` path, the one every other tau
takes (the recipe's tau = 2 included; since session 17 that path is itself faster than what ran before the
``tau = 1`` shortcut). It isolates the term that MS-KD's step spends beyond its floor
(docs/benchmarks.md, "Training step"), where whole-step ratios are noisier than the change.

Run: ``.venv/bin/python benchmarks/bench_kd_logit.py [--patch 32] [--batch 2] [--repeats 40] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch

    from unionseg.losses import kd_regions, ms_kd_logit_loss

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    leaves = [[1, 2], [3, 4], [5, 6], [7]]
    shape = (args.batch, 8, args.patch, args.patch, args.patch)
    logits = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last_3d).requires_grad_()

    def teacher(k: int) -> torch.Tensor:
        p = torch.rand((args.batch, 1 + k, *shape[2:]), generator=gen)
        p[:, 0] += 3.0  # mostly background, as a single-organ teacher says
        # float32, as the sampler hands the cached float16 maps to the loss (helper-125: float16 here timed
        # a conversion the training step never makes)
        return p / p.sum(1, keepdim=True)

    teachers = [teacher(len(ls)) for ls in leaves]

    def once(tau: float) -> float:
        t0 = time.perf_counter()
        regions = kd_regions(teachers)
        ms_kd_logit_loss(logits, teachers, leaves, tau, False, precomputed=regions).backward()
        logits.grad = None
        return time.perf_counter() - t0

    taus = {"tau = 1 (renormalise)": 1.0, "tau = 1 + 1e-6 (log_softmax path)": 1.0 + 1e-6}
    for tau in taus.values():
        for _ in range(3):
            once(tau)
    times: dict[str, list[float]] = {name: [] for name in taus}
    for _ in range(args.repeats):
        for name, tau in taus.items():
            times[name].append(once(tau))
    print(f"MS-KD logit term, batch {args.batch}, {args.patch}^3, 8 leaves, 4 teachers, "
          f"{args.threads} threads (median of {args.repeats}):\n")
    print("| path | forward + backward (ms) |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {1000 * statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()
