"""Short probes of task-conditioned heads on partial labels: which variant learns, judged on VALIDATION patches.

A bare loop (no checkpoints, no whole-volume validation) that trains the standard `cpu` backbone with a
dynamic (DoDNet) or multi-head on the project's training datasets, for a few hundred steps, and prints
every ``--every`` steps each task's region-channel soft Dice on fixed foreground patches of the fully
labelled validation set, plus the number of dead hidden units of the dynamic head (input positive on
fewer than 1% of a patch's voxels). It is a quick screen of head/optimiser variants before a full run.

Run: ``.venv/bin/python benchmarks/dodnet_probe.py PROJECT_YAML "VARIANT;VARIANT;..."`` where a variant
is a comma-separated list of ``key=value`` (empty = the defaults): ``head`` (dynamic | multihead),
``steps`` (300), ``every`` (150), ``lr`` (0.02), ``opt`` (adamw | sgd: momentum 0.99, Nesterov),
``ns`` (negative_slope, 0), ``zb`` (zero_bias_init, 0/1), ``clr`` (controller lr scale, 1).
Example: ``benchmarks/dodnet_probe.py bench_out/std2/data/project.yaml ";ns=0.1;opt=sgd,lr=0.01"``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from dodnet_head_units import dead_units, region_leaves  # benchmarks/ is on the path when run as a script


def main() -> None:
    from unionseg.config import load_project
    from unionseg.data.preprocess import PreparedIndex
    from unionseg.data.sampling import AugmentSpec, PatchSampler, SamplerCase
    from unionseg.losses import masked_sigmoid_dice_bce, task_targets
    from unionseg.methods.dodnet import task_channels
    from unionseg.networks import build_network

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("variants", help="semicolon-separated variants, e.g. ';ns=0.1'")
    args = ap.parse_args()

    project = load_project(args.project)
    space = project.label_space
    names = [d.name for d in project.train_datasets]
    keys = [task_channels(space, d) for d in names]
    index = PreparedIndex.load(project)
    train = [SamplerCase(names.index(c.dataset), space.annotated_leaf_mask(c.dataset), c.image(), c.label(), {},
                         c.case_id) for c in index.cases(split="train") if c.dataset in names]
    val_set = project.eval_dataset("val")
    val = [SamplerCase(0, space.full_mask(), c.image(), c.label(), {}, c.case_id)
           for c in index.cases() if val_set is not None and c.dataset == val_set.name]
    if not val:
        raise SystemExit(f"{args.project}: no prepared cases of a fully labelled validation set")
    held_sampler = PatchSampler(val, (48,) * 3, 2, len(space.names), seed=123, fg_prob=1.0,
                                augment=AugmentSpec.off())
    held = [held_sampler[i] for i in range(8)]
    regions = [region_leaves(space, d) for d in names]

    for variant in args.variants.split(";"):
        kw = dict(item.split("=", 1) for item in variant.split(",")) if variant else {}
        torch.manual_seed(0)
        head: dict[str, object] = {"name": kw.get("head", "dynamic"), "n_tasks": len(names),
                                   "out_channels": max(len(k) for k in keys)}
        if head["name"] == "dynamic":
            head.update(negative_slope=float(kw.get("ns", 0)), zero_bias_init=kw.get("zb", "0") == "1")
        net = build_network({"backbone": {"name": "resunet", "preset": "cpu"}, "head": head})
        lr, steps, every = float(kw.get("lr", 0.02)), int(kw.get("steps", 300)), int(kw.get("every", 150))
        ctrl = [p for n, p in net.named_parameters() if "controller" in n]
        rest = [p for n, p in net.named_parameters() if "controller" not in n]
        groups = [{"params": rest, "lr": lr}, {"params": ctrl, "lr": lr * float(kw.get("clr", 1))}]
        opt: torch.optim.Optimizer
        if kw.get("opt", "adamw") == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=3e-5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k, n=steps: (1 - k / n) ** 0.9)
        sampler = PatchSampler(train, (48,) * 3, 2, len(space.names), seed=0, fg_prob=0.67,
                               augment=AugmentSpec(flip_prob=(0, 0, 0), rot90_prob=0))
        start = time.perf_counter()
        for step in range(steps):
            batch = sampler[step]
            tasks = batch["dataset_id"]
            targets, mask = task_targets(batch["label"], tasks, keys, space)
            terms = masked_sigmoid_dice_bce(net(batch["image"], tasks), targets, mask)
            opt.zero_grad()
            (terms["dice"] + terms["bce"]).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            opt.step()
            sched.step()
            if (step + 1) % every == 0:
                dice, dead = _evaluate(net, held, regions)
                print(f"{variant or 'default'} step {step + 1} ({(time.perf_counter() - start) / (step + 1):.2f} s/step)"
                      f" region soft Dice {dict(zip(names, np.round(dice, 2).tolist(), strict=True))} {dead}",
                      flush=True)


def _evaluate(net: torch.nn.Module, held: list[dict], regions: list[list[int]]) -> tuple[np.ndarray, str]:
    """Region-channel soft Dice of every task on the held patches; dead hidden units on the first patch."""
    net.eval()
    inter, denom = np.zeros(len(regions)), np.zeros(len(regions))
    head = net.head  # type: ignore[attr-defined]
    out_channels = head.out_channels
    with torch.no_grad():
        for batch in held:
            probs = torch.sigmoid(net(batch["image"], None))
            for t, leaves in enumerate(regions):
                truth = torch.isin(batch["label"], torch.as_tensor(leaves))
                p = probs[:, t * out_channels]
                inter[t] += float((p * truth).sum())
                denom[t] += float(p.sum() + truth.sum())
        dead_text = ""
        if hasattr(head, "controller"):
            _, features = net(held[0]["image"], None, return_features=True)
            head_input = head.feature(features.last)[0].reshape(head.feature_channels, -1)
            dead = dead_units(head, head_input, head.controller_params(features.bottleneck, None)[0])
            dead_text = f"dead {int(dead.sum())}/{sum(head.head_widths) * head.n_tasks}"
    net.train()
    return 2 * inter / np.maximum(denom, 1e-6), dead_text


if __name__ == "__main__":
    main()
