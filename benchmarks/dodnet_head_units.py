"""Diagnosis of a DoDNet run: how many hidden units of its dynamic heads are alive, per task.

A hidden unit of task t's generated head is "dead" on a patch when its input is positive for fewer than 1%
of the patch's voxels (it then passes no signal and gets no gradient there). Patches are drawn from the
validation cases (fully labelled), centred on foreground, without augmentation. Also printed: each
task's first (region) channel, mean probability inside and outside its organ region.

Run: ``.venv/bin/python benchmarks/dodnet_head_units.py RUN_DIR PROJECT_YAML [--checkpoint last.pt]
[--patches 4]``. With ``--init`` the network is freshly initialised from the run's network spec instead
(the state at step 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from unionseg.config import load_project
    from unionseg.data.preprocess import PreparedIndex
    from unionseg.data.sampling import AugmentSpec, PatchSampler, SamplerCase
    from unionseg.modelfile import load_model
    from unionseg.networks import build_network
    from unionseg.training.checkpoint import safe_torch_load

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("project", type=Path)
    ap.add_argument("--checkpoint", default="last.pt")
    ap.add_argument("--patches", type=int, default=4)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--init", action="store_true", help="a fresh initialisation of the same network")
    args = ap.parse_args()

    spec = load_model(args.run / "model.pt")["network"]["network"]
    torch.manual_seed(0)
    net = build_network(spec)
    if spec["head"]["name"] != "dynamic":
        raise SystemExit(f"{args.run} is not a DoDNet run (head {spec['head']['name']!r})")
    if not args.init:
        net.load_state_dict(safe_torch_load(args.run / args.checkpoint, "unionseg-checkpoint")["models"]["net"])
    net.eval()
    head = net.head
    project = load_project(args.project)
    space = project.label_space
    val_set = project.eval_dataset("val")
    val = [SamplerCase(0, space.full_mask(), c.image(), c.label(), {}, c.case_id)
           for c in PreparedIndex.load(project).cases() if val_set is not None and c.dataset == val_set.name]
    if not val:
        raise SystemExit(f"{args.project}: no prepared cases of a fully labelled validation set")
    sampler = PatchSampler(val, (args.patch,) * 3, 1, len(space.names), seed=5, fg_prob=1.0, augment=AugmentSpec.off())
    n_hidden = len(head.layer_dims) - 1
    dead = np.zeros((head.n_tasks, n_hidden), dtype=int)
    inside = np.zeros(head.n_tasks)
    outside = np.zeros(head.n_tasks)
    with torch.no_grad():
        for i in range(args.patches):
            batch = sampler[i]
            logits, features = net(batch["image"], None, return_features=True)  # one backbone pass
            probs = torch.sigmoid(logits)[0]
            head_input = head.feature(features.last)[0].reshape(head.feature_channels, -1)
            params = head.controller_params(features.bottleneck, None)[0]  # (T, n_params)
            dead += dead_units(head, head_input, params)
            labels = batch["label"][0]
            for t, dataset in enumerate(_task_datasets(net, project)):
                region = np.isin(labels.numpy(), region_leaves(space, dataset))
                p = probs[t * head.out_channels].numpy()
                inside[t] += p[region].mean() if region.any() else np.nan
                outside[t] += p[~region].mean()
    names = _task_datasets(net, project)
    print(f"dead hidden units per task (of {head.head_widths} per layer, summed over {args.patches} patches):")
    for t, name in enumerate(names):
        print(f"  {name:>10}: dead {dead[t].tolist()}  region p inside {inside[t] / args.patches:.3f}  "
              f"outside {outside[t] / args.patches:.4f}")
    total = sum(head.head_widths) * head.n_tasks * args.patches
    print(f"total dead: {int(dead.sum())} / {total}")


def _task_datasets(net: torch.nn.Module, project: object) -> list[str]:
    """Task t = the project's t-th training dataset (the order DoDNet trains with)."""
    return [d.name for d in project.train_datasets][: net.head.n_tasks]  # type: ignore[attr-defined]


def dead_units(head: torch.nn.Module, head_input: torch.Tensor, params: torch.Tensor) -> np.ndarray:
    """(T, hidden layers) counts of dead hidden units of every task's generated head on one patch.

    Args:
        head: a :class:`~unionseg.networks.heads.DynamicHead`.
        head_input: (F, voxels) its input features of the patch.
        params: (T, n_params) generated parameters of the patch, one row per task.
    """
    dead = np.zeros((params.shape[0], len(head.layer_dims) - 1), dtype=int)  # type: ignore[arg-type]
    for t in range(params.shape[0]):
        h = head_input
        for k, (w, b) in enumerate(head.split_params(params[t:t + 1])[:-1]):  # type: ignore[operator]
            h = head.activation(w[0] @ h + b[0][:, None])  # type: ignore[operator]
            dead[t, k] = int(((h > 0).float().mean(1) < 0.01).sum())
    return dead


def region_leaves(space: object, dataset: str) -> list[int]:
    """Leaves of the organ region that ``dataset`` annotates fully (its task's region channel)."""
    mask = space.annotated_leaf_mask(dataset)  # type: ignore[attr-defined]
    for group in space.groups:  # type: ignore[attr-defined]
        if all(mask[i] for i in group.leaf_ids):
            return list(group.leaf_ids)
    return []


if __name__ == "__main__":
    main()
