"""MS-KD's terms beyond its step's floor, each alone: the regions, the logit term and the feature term (CPU).

The step's floor (``benchmarks/bench_step.py``) is the naive step plus the teachers' partial forwards; what
MS-KD spends beyond it is these three terms (and its ground-truth term). Each is timed forward + backward on
synthetic inputs of the standard budget's patch: four single-organ teachers' probabilities, float32 as the sampler hands them to the loss (leaves
1-2, 3-4, 5-6, 7), student logits over 8 leaves (channels-last, as the ResUNet returns them), student and
teacher features at the second-finest decoder stage (8 channels, half the patch). Median of ``--repeats``
after warm-ups, the rows timed round-robin. To compare two versions of the code, run it with each on the
path (``PYTHONPATH=OTHER/src``): after the timings it prints each term's value and its gradient's norm, on
the same inputs (seeded), outside the timing, so the two runs show whether the versions compute the same.

Run: ``.venv/bin/python benchmarks/bench_mskd_terms.py [--patch 32] [--batch 2] [--repeats 40] [--tau 2]``
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch

    from unionseg.losses import kd_regions, ms_kd_feature_loss, ms_kd_logit_loss

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    leaves = [[1, 2], [3, 4], [5, 6], [7]]
    size = (args.patch,) * 3
    half = tuple(s // 2 for s in size)

    def teacher(k: int) -> torch.Tensor:
        p = torch.rand((args.batch, 1 + k, *size), generator=gen)
        p[:, 0] += 1.0  # mostly background, as a single-organ teacher says
        # float32, as the sampler hands the cached float16 maps to the loss (helper-125: float16 here timed
        # a conversion the training step never makes)
        return p / p.sum(1, keepdim=True)

    teachers = [teacher(len(ls)) for ls in leaves]
    logits = torch.randn((args.batch, 8, *size), generator=gen).contiguous(
        memory_format=torch.channels_last_3d).requires_grad_()
    student_feat = torch.randn((args.batch, 8, *half), generator=gen).contiguous(
        memory_format=torch.channels_last_3d).requires_grad_()
    teacher_feats = [torch.randn((args.batch, 8, *half), generator=gen).contiguous(
        memory_format=torch.channels_last_3d) for _ in teachers]
    regions, background = kd_regions(teachers)

    def run_regions() -> None:
        kd_regions(teachers)

    def run_logit() -> None:
        ms_kd_logit_loss(logits, teachers, leaves, args.tau, False, precomputed=(regions, background)).backward()
        logits.grad = None

    def run_feature() -> None:
        ms_kd_feature_loss(student_feat, teacher_feats, regions, background).backward()
        student_feat.grad = None

    jobs = {"regions (kd_regions)": run_regions, f"logit term, tau = {args.tau:g}": run_logit,
            "feature term": run_feature}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(args.repeats + 3):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            if r >= 3:
                times[name].append(time.perf_counter() - t0)
    print(f"MS-KD terms, batch {args.batch}, {args.patch}^3, 8 leaves, 4 teachers, {args.threads} threads "
          f"(median of {args.repeats}, forward + backward):\n")
    print("| term | ms |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {1000 * statistics.median(values):.1f} |")
    # outside the timing: what the terms compute, to set two versions of the code side by side
    logit = ms_kd_logit_loss(logits, teachers, leaves, args.tau, False, precomputed=(regions, background))
    logit.backward()
    feature = ms_kd_feature_loss(student_feat, teacher_feats, regions, background)
    feature.backward()
    assert logits.grad is not None and student_feat.grad is not None
    print(f"\nvalues: regions {sum(float(r.double().sum()) for r in regions):.0f} voxels, background "
          f"{float(background.double().sum()):.0f}; logit term {float(logit.detach()):.8g} (gradient norm "
          f"{float(logits.grad.norm()):.8g}); feature term {float(feature.detach()):.8g} (gradient norm "
          f"{float(student_feat.grad.norm()):.8g})")


if __name__ == "__main__":
    main()
