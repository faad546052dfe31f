"""Training-step cost of every method relative to the naive step, measured in ONE run on the same batch.

Floors (from the method issues), measured in the same run:
* co-training   <= 1.1 x (two naive steps + two no-grad forwards)
* DoDNet        <= 1.15 x the naive step (same backbone)
* MS-KD logit   <= 1.2 x the naive step (teacher probabilities come from the cache)
* MS-KD feature <= 1.1 x (naive step + the teachers' partial forwards up to the feature stage)
The loader's batch rate (real sampler on prepared phantom cases, augmentation on) is compared with the CPU
config's step rate: it must be >= 4 x. It is measured three times: without extras (what naive and the other
single-network methods load), with a pseudo-label volume per case (co-training) and with the four teachers'
probability volumes per case (MS-KD; synthetic float16 maps of the cached maps' shapes); the target is read
on the slowest. Each row also gives the share of a synchronous step (loader in the training process, 0
workers) spent making its batch with the extras its method loads: ``t_batch / (t_batch + t_step)``; with
workers the batch is made during the step and the trainer's logged wait share is lower still.

Run: ``.venv/bin/python benchmarks/bench_step.py [--preset cpu] [--patch 48] [--repeats 8] [--docs docs/benchmarks.md]``
Shared artefacts are replaced by freshly initialised experts and random cached probabilities: only the
cost is measured here, not the accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


class _StubArtifacts:
    """Experts with random weights (cost only) and no cache on disk."""

    def __init__(self, ctx: Any) -> None:
        from unionseg.methods.expert import expert_subspace
        from unionseg.networks import build_network, set_layout

        self.ctx = ctx
        self.experts = {}
        for name in ctx.train_datasets:
            sub, _, leaves = expert_subspace(ctx.space, name)
            net = build_network({"backbone": ctx.cfg.network.backbone_spec(),
                                 "head": {"name": "softmax", "out_channels": sub.n_leaves}}).eval()
            set_layout(net, "cpu")  # as ``Artifacts.load_expert`` does
            for p in net.parameters():
                p.requires_grad_(False)
            self.experts[name] = (net, leaves, {})

    def load_expert(self, name: str) -> Any:
        return self.experts[name]


def _teacher_channels(ctx: Any) -> list[int]:
    """Each training dataset's teacher's channel count: background plus the leaves its expert knows."""
    from unionseg.methods.expert import expert_subspace

    return [1 + len(expert_subspace(ctx.space, name)[2]) for name in ctx.train_datasets]


def _sampler_cases(ctx: Any, extras: Any = lambda image: {}) -> list[Any]:
    """The training cases as the sampler takes them; ``extras(image)`` gives a case's extra volumes."""
    from unionseg.data.sampling import SamplerCase

    names = ctx.train_datasets
    cases = []
    for c in ctx.index.cases(split="train"):
        image = c.image()
        cases.append(SamplerCase(names.index(c.dataset), c.annotated, image, c.label(), extras(image), c.case_id))
    return cases


def _batch(ctx: Any, patch: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """A real batch from the sampler plus synthetic aligned extras (pseudo labels, teacher probabilities)."""
    from unionseg.data.sampling import PatchSampler

    sampler = PatchSampler(_sampler_cases(ctx), (patch,) * 3, batch_size, ctx.space.n_leaves, seed=seed)
    batch = sampler[0]
    rng = torch.Generator().manual_seed(seed)
    shape = batch["label"].shape
    batch["pseudo"] = torch.randint(0, ctx.space.n_leaves, shape, generator=rng)
    for j, k in enumerate(_teacher_channels(ctx)):
        batch[f"teacher_{j}"] = torch.softmax(torch.randn(shape[0], k, *shape[1:], generator=rng) * 3, dim=1)
    return batch


class _Stepper:
    """One method's models and optimiser; :meth:`step` runs and times one training step."""

    def __init__(self, method: Any) -> None:
        self.method = method
        from unionseg.networks import set_layout

        models = {k: set_layout(m, "cpu") for k, m in method.build().items()}  # as the trainer does
        for average in method.averages().values():
            set_layout(average, "cpu")
        method.raw_models = models
        method.models = models
        params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.count = 0

    def step(self, batch: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        terms = self.method.training_step(batch, self.count)
        terms["loss"].backward()
        self.opt.step()
        self.method.after_step(self.count)
        self.count += 1
        return time.perf_counter() - t0


def _interleaved(jobs: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds per job, timed round-robin (every round runs each job once) so that a burst of load
    from other processes hits all jobs alike; two warm-up rounds are excluded."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(repeats + 2):
        for name, job in jobs.items():
            t = job()
            if r >= 2:
                times[name].append(t)
    return {name: statistics.median(v) for name, v in times.items()}


def _loader_rate(ctx: Any, patch: int, batch_size: int, n: int, extras: str = "") -> float:
    """Batches a second from the sampler; ``extras``: "" (none), "pseudo" (a uint8 pseudo-label volume per
    case, co-training) or "teachers" (each training dataset's teacher probabilities, float16 (k, X, Y, Z),
    MS-KD). The extras are arrays in memory, where training memory-maps the cached files: once those are in
    the page cache the two read alike."""
    from unionseg.data.sampling import PatchSampler

    rng = np.random.default_rng(1)
    channels = _teacher_channels(ctx)
    kinds: dict[str, Any] = {}
    if extras == "pseudo":
        kinds["pseudo"] = "label"
    elif extras == "teachers":
        kinds.update({f"teacher_{j}": "prob" for j in range(len(channels))})

    def volumes(image: np.ndarray) -> dict[str, np.ndarray]:
        shape = image.shape
        if extras == "pseudo":
            return {"pseudo": rng.integers(0, ctx.space.n_leaves, shape, dtype=np.uint8)}
        out = {}
        for j, k in enumerate(channels if extras == "teachers" else []):
            probs = rng.random((k, *shape), dtype=np.float32)
            out[f"teacher_{j}"] = (probs / probs.sum(0, keepdims=True)).astype(np.float16)
        return out

    sampler = PatchSampler(_sampler_cases(ctx, volumes), (patch,) * 3, batch_size, ctx.space.n_leaves, seed=1,
                           extra_kinds=kinds)
    sampler.precompute()
    t0 = time.perf_counter()
    for step in range(n):
        sampler[step]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--docs", type=Path, default=None, help="update the generated table of the 'Training step' section of this file")
    args = parser.parse_args()

    import dataclasses

    from unionseg.config import load_project
    from unionseg.data.phantom import generate_phantom
    from unionseg.data.preprocess import prepare_project
    from unionseg.methods.base import get_method
    from unionseg.training.config import load_train_config
    from unionseg.training.trainer import make_context

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    project = generate_phantom(work / "data", size="tiny", seed=0, cases=(2, 1, 1))
    prepare_project(load_project(project), workers=0, progress=False)
    overrides = [f"network.preset={args.preset}", f"data.patch_size=[{args.patch},{args.patch},{args.patch}]",
                 f"data.batch_size={args.batch}", "device=cpu"]
    base = make_context(project, load_train_config(None, overrides, method="naive"), work / "run", progress=False)
    base.artifacts = _StubArtifacts(base)  # type: ignore[assignment]
    batch = _batch(base, args.patch, args.batch)

    def method(name: str, **options: Any) -> Any:
        cfg = dataclasses.replace(base.cfg, method=name, options=options)
        return get_method(name)(dataclasses.replace(base, cfg=cfg))

    steppers = {name: _Stepper(method(name.split("_")[0], **opts))
                for name, opts in (("naive", {}), ("marginal", {}), ("multihead", {}), ("conditional", {}),
                                   ("dodnet", {}), ("cotraining", {}), ("mskd_logit", {"w_feat": 0.0}), ("mskd", {}))}
    from unionseg.networks import set_layout

    # in the trainer's layout, as co-training's averaged models that this no-grad forward stands for are
    # (a contiguous net ran 20 % slower at 32^3 and inflated co-training's floor; helper-125)
    naive_net = set_layout(method("naive").build()["net"], "cpu").eval()
    x = batch["image"]
    teachers = [m for m, _, _ in base.artifacts.experts.values()]  # type: ignore[attr-defined]

    def timed_no_grad(fn: Any) -> Any:
        def run() -> float:
            with torch.no_grad():
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0
        return run

    jobs: dict[str, Any] = {name: (lambda s=s: s.step(batch)) for name, s in steppers.items()}
    jobs["forward"] = timed_no_grad(lambda: naive_net(x))
    jobs["partial"] = timed_no_grad(lambda: [t.backbone.features_upto(x, -2) for t in teachers])
    rows = _interleaved(jobs, args.repeats)
    forward, partial = rows.pop("forward"), rows.pop("partial")
    floors = {
        "cotraining": ("2 naive steps + 2 no-grad forwards", 2 * rows["naive"] + 2 * forward, 1.1),
        "dodnet": ("naive step", rows["naive"], 1.15),
        "mskd_logit": ("naive step", rows["naive"], 1.2),
        "mskd": ("naive step + teachers' partial forwards", rows["naive"] + partial, 1.1),
    }
    loaders = {extras: _loader_rate(base, args.patch, args.batch, 4 * args.repeats, extras)
               for extras in ("", "pseudo", "teachers")}
    loads = {"cotraining": "pseudo", "mskd_logit": "teachers", "mskd": "teachers"}  # the rest: no extras
    loader = min(loaders.values())
    step_rate = 1.0 / rows["naive"]
    lines = [f"Measured with `.venv/bin/python benchmarks/bench_step.py --preset {args.preset} --patch {args.patch} "
             f"--batch {args.batch} --repeats {args.repeats}` (median step, methods timed round-robin, warm-up excluded; 2 CPU cores, "
             f"torch threads {torch.get_num_threads()}).", "",
             "| method | step (s) | x naive | data wait (sync) | floor | floor (s) | ratio to floor | target |",
             "|---|---|---|---|---|---|---|---|"]
    for name, t in rows.items():
        batch_s = 1.0 / loaders[loads.get(name, "")]
        wait = f"{100 * batch_s / (batch_s + t):.1f}%"
        floor = floors.get(name)
        if floor:
            what, value, target = floor
            ratio = t / value
            lines.append(f"| {name} | {t:.3f} | {t / rows['naive']:.2f} | {wait} | {what} | {value:.3f} | {ratio:.2f} | "
                         f"<= {target} {'met' if ratio <= target else 'MISSED'} |")
        else:
            lines.append(f"| {name} | {t:.3f} | {t / rows['naive']:.2f} | {wait} | | | | |")
    lines += ["", f"no-grad forward {forward:.3f} s; teachers' partial forwards {partial:.3f} s.",
              "Loader (0 workers, augmentation on), batches/s: "
              + ", ".join(f"{rate:.1f} {what} ({1000 / rate:.2f} ms a batch)" for what, rate in
                          zip(("without extras", "with pseudo labels",
                               f"with {len(base.train_datasets)} teachers' probabilities"),
                              loaders.values(), strict=True))
              + f"; the slowest against the naive step rate {step_rate:.2f}/s: {loader / step_rate:.1f} x "
              f"(target >= 4 x: {'met' if loader / step_rate >= 4 else 'MISSED'})."]
    text = "\n".join(lines)
    print(text)
    if args.docs:
        from docs_update import update_generated  # benchmarks/ is on the path when run as a script

        print(f"{args.docs}: {update_generated(args.docs, 'Training step', text)}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
