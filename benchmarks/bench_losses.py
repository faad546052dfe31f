"""The softmax family's per-step losses, forward + backward, at the standard budget's patch (CPU).

Rows: the naive / oracle loss (``marginal_loss`` with every leaf annotated), the marginal baseline's loss
(marginal CE + Dice + 0.1 x exclusion on a partially labelled batch), MS-KD's ground-truth term (marginal CE +
Dice alone), MS-KD's logit term (four single-organ teachers, tau = 2) and one co-training network's terms
(focal + Dice on pseudo labels, soft CE on a partner's probabilities in a region; twice per step). Inputs are
synthetic: 8 leaves,
channels-last logits as the ResUNet returns them, float32 teacher probabilities as the sampler hands the
cache's float16 maps to the loss (float16 before session 40: a conversion the step never makes).

``--against OTHER/src`` loads ``unionseg/losses/partial.py``, ``distillation.py`` and ``cotraining.py`` from
another checkout as well (one without ``cotraining_terms`` composes the co-training row from ``focal_loss``,
``soft_dice_loss`` and its ``soft_ce``, as the step did before session 40) and times the two versions alternately in one process (the rest of ``unionseg`` is
this checkout's), so that a change to these losses is measured the same minutes on the same caches; the two
must first agree in value and gradient on every row. Median of ``--repeats`` after warm-ups.

Run: ``.venv/bin/python benchmarks/bench_losses.py [--patch 32] [--batch 2] [--repeats 40] [--against DIR]``
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import torch

    from unionseg.labels import LabelSpace, Leaf
    from unionseg.losses import cotraining, distillation, partial

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--against", type=Path, default=None, help="another checkout's src folder, timed alternately")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    versions: dict[str, tuple[Any, Any, Any]] = {"this checkout": (partial, distillation, cotraining)}
    if args.against is not None:
        losses = args.against / "unionseg" / "losses"
        versions[str(args.against)] = (_load("other_partial", losses / "partial.py"),
                                       _load("other_distillation", losses / "distillation.py"),
                                       _load("other_cotraining", losses / "cotraining.py"))

    # four organs, two with a tumour: 7 leaves plus background, as the standard phantom
    space = LabelSpace([Leaf("liver"), Leaf("liver_tumour", part_of="liver"), Leaf("kidney"),
                        Leaf("kidney_tumour", part_of="kidney"), Leaf("pancreas"),
                        Leaf("pancreas_tumour", part_of="pancreas"), Leaf("spleen")])
    gen = torch.Generator().manual_seed(0)
    size = (args.patch,) * 3
    n = space.n_leaves
    logits = torch.randn((args.batch, n, *size), generator=gen).contiguous(
        memory_format=torch.channels_last_3d).requires_grad_()
    # each sample from one single-organ dataset: its organ and tumour labelled, 0 elsewhere
    codes = torch.zeros((args.batch, *size), dtype=torch.long)
    annotated = torch.zeros((args.batch, n), dtype=torch.bool)
    annotated[:, 0] = True
    for b in range(args.batch):
        organ = 1 + 2 * (b % 3)
        annotated[b, organ:organ + 2] = True
        blob = torch.rand(size, generator=gen)
        codes[b][blob > 0.8] = organ
        codes[b][blob > 0.95] = organ + 1
    full_codes = torch.randint(0, n, (args.batch, *size), generator=gen)
    everything = torch.ones_like(annotated)
    teacher_leaves = [[1, 2], [3, 4], [5, 6], [7]]

    def teacher(k: int) -> torch.Tensor:
        p = torch.rand((args.batch, 1 + k, *size), generator=gen)
        p[:, 0] += 1.0  # mostly background, as a single-organ teacher says
        # float32, as the sampler hands the cached float16 maps to the loss (helper-125: float16 here timed
        # a conversion the training step never makes)
        return p / p.sum(1, keepdim=True)

    teachers = [teacher(len(ls)) for ls in teacher_leaves]
    regions = distillation.kd_regions(teachers)

    def timed(fn: Any) -> Any:
        def run() -> float:
            t0 = time.perf_counter()
            fn().backward()
            logits.grad = None
            return time.perf_counter() - t0
        return run

    jobs: dict[tuple[str, str], Any] = {}
    losses_of: dict[tuple[str, str], Any] = {}
    pseudo = torch.randint(0, n, (args.batch, *size), generator=gen)
    partner = torch.softmax(torch.randn((args.batch, n, *size), generator=gen), 1).contiguous(
        memory_format=torch.channels_last_3d)
    region = torch.rand((args.batch, *size), generator=gen) > 0.3
    onehot = torch.nn.functional.one_hot(pseudo, n).movedim(-1, 1).float()

    for version, (part, dist, cot) in versions.items():
        def naive(p: Any = part) -> Any:
            t = p.marginal_loss(logits, full_codes, everything, space)
            return t["ce"] + t["dice"]

        def marginal(p: Any = part) -> Any:
            if "exclusion_weight" in inspect.signature(p.marginal_loss).parameters:  # one softmax for both
                t = p.marginal_loss(logits, codes, annotated, space, exclusion_weight=0.1)
                return t["ce"] + t["dice"] + t["exclusion"]
            t = p.marginal_loss(logits, codes, annotated, space)  # code before session 38
            return t["ce"] + t["dice"] + 0.1 * p.exclusion_loss(logits, codes, annotated, space)

        def gt_term(p: Any = part) -> Any:
            t = p.marginal_loss(logits, codes, annotated, space)
            return t["ce"] + t["dice"]

        def logit_term(d: Any = dist) -> Any:
            return d.ms_kd_logit_loss(logits, teachers, teacher_leaves, 2.0, False, precomputed=regions)

        def cotraining_net(c: Any = cot) -> Any:  # one network's terms, weighted 1, 1, 1 (after the ramp)
            if hasattr(c, "cotraining_terms"):  # one softmax, written-out gradient (session 40)
                t = c.cotraining_terms(logits, pseudo, partner, region, gamma=2.0)
                return t["focal"] + t["dice"] + t["soft"]
            from unionseg.losses import focal_loss, soft_dice_loss  # composed, as the step did before

            # (the step made the one-hot once for both networks: made outside, it is not timed here; helper-127)
            return (focal_loss(logits, pseudo, gamma=2.0) + soft_dice_loss(torch.softmax(logits.float(), 1), onehot)
                    + c.soft_ce(logits, partner, region))

        for row, fn in (("naive / oracle loss", naive), ("marginal + 0.1 exclusion", marginal),
                        ("MS-KD ground-truth term", gt_term), ("MS-KD logit term, tau = 2", logit_term),
                        ("co-training, one network (focal + Dice + soft CE)", cotraining_net)):
            jobs[(row, version)] = timed(fn)
            losses_of[(row, version)] = fn
    if len(versions) > 1:  # a comparison of speed only means something between versions that agree
        for row in dict.fromkeys(row for row, _ in jobs):
            results = []
            for version in versions:
                loss = losses_of[(row, version)]()
                (grad,) = torch.autograd.grad(loss, logits)
                results.append((loss.detach(), grad))
            (value, grad), (other_value, other_grad) = results[0], results[1]
            torch.testing.assert_close(value, other_value, rtol=1e-5, atol=1e-6, msg=f"{row}: values differ")
            torch.testing.assert_close(grad, other_grad, rtol=1e-4, atol=1e-7, msg=f"{row}: gradients differ")
    times: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    for r in range(args.repeats + 3):
        for key, job in jobs.items():
            value = job()
            if r >= 3:
                times[key].append(value)
    names = list(versions)
    print(f"Losses, batch {args.batch}, {args.patch}^3, {n} leaves, {args.threads} threads (median of "
          f"{args.repeats}, forward + backward, ms):\n")
    print("| loss | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for row in dict.fromkeys(row for row, _ in jobs):
        cells = " | ".join(f"{1000 * statistics.median(times[(row, v)]):.1f}" for v in names)
        print(f"| {row} | {cells} |")


if __name__ == "__main__":
    main()
