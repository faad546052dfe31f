"""Which head claims which organ: the cross-task confusion of a model, read on a fully labelled set.

Written for sigmoid (task-conditioned) models, whose task heads are the columns below. A softmax model
(one output over every leaf: marginal, naive, the oracle, co-training, MS-KD) is read the same way with one
column per organ region, its probability being the sum of the softmax over the region's leaves; "head"
below then means that column, and the table says how much of each organ the one output gives away.

For every case of a fully labelled evaluation set, the model's sliding-window probabilities are read per
region channel, and for every ground-truth organ region the script prints (mean over cases):

* ``p(channel)``: the mean probability of each region channel inside that organ (the diagonal is the
  organ's own head; off-diagonal values above 0.5 are heads that claim an organ they were never shown);
* ``merged``: the share of the organ's voxels the merge function gives to each group (or background).

Then the precision side, pooled over the cases: where each group's merged voxels lie in the ground truth
(the diagonal is the precision), and per organ its Dice as merged, its Dice when only the largest connected
component is kept, and the share of its false positives that lie more than 3 voxels from the organ (stray
blobs, as against a boundary that is a voxel too wide).

A task head trained only on its own dataset's images can fire on organs labelled in other datasets (a site
or contrast shift makes them look unlike the negatives it saw); the merge then hands those voxels to the
most confident head. This is the diagnosis behind ``options.cross_task_weight`` (docs/dodnet_investigation.md).

``--per-case`` adds one row per case: the case's acquisition site (read from the phantom's ``generator.json``
beside the project file, when there is one) and, per organ, its own head's mean probability inside it and
the share the merge gives it. It separates a head that fails everywhere from one that fails on other
sites' protocols (a contrast phase it never saw labelled).

Run: ``.venv/bin/python benchmarks/task_head_confusion.py MODEL_PT PROJECT_YAML [--split val] [--cases N]
[--device cpu] [--per-case]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage


def main() -> None:
    from unionseg.config import load_project
    from unionseg.data.preprocess import PreparedIndex
    from unionseg.evaluation.metrics import dice as dice_score
    from unionseg.inference.predictor import Predictor
    from unionseg.labels import softmax_to_groups

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("project", type=Path)
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--cases", type=int, default=0, help="at most this many cases (0: all)")
    ap.add_argument("--device", default="cpu", help="where the network runs (cpu, cuda, auto)")
    ap.add_argument("--per-case", action="store_true", help="also a row per case: own head p / merged share")
    args = ap.parse_args()

    project = load_project(args.project)
    space = project.label_space
    dataset = project.eval_dataset(args.split)
    if dataset is None:
        raise SystemExit(f"{args.project}: no fully labelled {args.split} set")
    cases = [c for c in PreparedIndex.load(project).cases() if c.dataset == dataset.name]
    if not cases:
        raise SystemExit(f"{args.project}: the {args.split} set {dataset.name!r} is not prepared")
    cases = cases[: args.cases or None]
    predictor = Predictor.from_checkpoint(args.model, device=args.device)
    softmax = predictor.output_form == "softmax"
    groups = [g.name for g in space.groups]
    channel: dict[str, int] = {}
    if softmax:  # one column per organ region: the softmax summed over its leaves
        channel = {name: index for index, name in enumerate(groups)}
    else:  # every region channel is a column; an organ two tasks annotate gets one per task (liver, liver#2)
        for index, key in enumerate(predictor.channels):
            if key.startswith("region:"):
                name, seen = key[len("region:"):], sum(k == key for k in predictor.channels[:index])
                channel[name if not seen else f"{name}#{seen + 1}"] = index
    heads = list(channel)
    prob = {(o, h): [] for o in groups for h in heads}
    generator = args.project.parent / "generator.json"
    sites = ({c["case"]: c.get("site", "") for c in json.loads(generator.read_text()).get("cases", [])}
             if generator.is_file() else {})
    rows: list[str] = []
    merged = {(o, t): [] for o in groups for t in ["background", *groups]}
    # where each group's merged voxels lie in the ground truth (the precision side), pooled over cases
    truth_of = {(g, t): 0 for g in groups for t in ["background", *groups]}
    # per group, pooled: false positives more than 3 voxels from the organ; Dice per case, as merged and with
    # only the largest connected component kept
    far = {g: [0, 0] for g in groups}  # (far false positives, all false positives)
    dice: dict[str, tuple[list[float], list[float]]] = {g: ([], []) for g in groups}
    for case in cases:
        image, label = np.asarray(case.image()), np.asarray(case.label())
        logits = predictor.sliding_window_logits(image)
        decided = predictor.decider.probabilities(logits)  # softmax over leaves, or grouped sigmoids
        labels = predictor.decider.labels(decided).cpu().numpy()
        if softmax:  # the model's own label space (the project's, for a model trained on it)
            probs = softmax_to_groups(decided, predictor.space)[0].cpu().numpy()
        else:
            probs = torch.sigmoid(logits.float()).cpu().numpy()
        owner, truth = _group_map(space, labels), _group_map(space, label)  # the prediction's, the truth's
        case_far: dict[str, int] = {}
        for index, g in enumerate(groups):
            mine, real = owner == index + 1, truth == index + 1
            counts = np.bincount(truth[mine], minlength=len(groups) + 1)
            for t, count in zip(["background", *groups], counts, strict=True):
                truth_of[(g, t)] += int(count)
            if real.any():
                wrong = mine & ~real
                case_far[g] = int((wrong & (ndimage.distance_transform_edt(~real) > 3)).sum())
                far[g][0] += case_far[g]
                far[g][1] += int(wrong.sum())
                dice[g][0].append(dice_score(mine, real).value)
                dice[g][1].append(dice_score(_largest_component(mine), real).value)
        own: list[str] = []
        for index, grp in enumerate(space.groups):
            inside = space.codes_to_leaf_masks(label, f"region:{grp.name}")
            if not inside.any():
                own.append("-")
                continue
            for h in heads:
                prob[(grp.name, h)].append(float(probs[channel[h]][inside].mean()))
            shares = np.bincount(owner[inside], minlength=len(groups) + 1) / inside.sum()
            for t, share in zip(["background", *groups], shares, strict=True):
                merged[(grp.name, t)].append(float(share))
            # the organ's own head and share, from the values just recorded (owner 1 + index is this group)
            own.append(f"{prob[(grp.name, grp.name)][-1]:.2f} / {shares[index + 1]:.2f} / {case_far[grp.name]}"
                       if grp.name in channel else "-")
        rows.append(f"| {case.case_id} | {sites.get(case.case_id, '')} | " + " | ".join(own) + " |")
        print(f"{case.case_id} done", flush=True)

    def mean(values: list[float]) -> str:
        return f"{np.mean(values):.2f}" if values else "-"

    print(f"\n{args.model} on {len(cases)} {args.split} case(s)\n")
    print("| organ (ground truth) | " + " | ".join(f"p({h})" for h in heads) + " | "
          + " | ".join(f"merged: {t}" for t in ["background", *groups]) + " |")
    print("|---" * (1 + len(heads) + len(groups) + 1) + "|")
    for o in groups:
        print(f"| {o} | " + " | ".join(mean(prob[(o, h)]) for h in heads) + " | "
              + " | ".join(mean(merged[(o, t)]) for t in ["background", *groups]) + " |")
    print("\nWhere each organ's predicted voxels lie in the ground truth (share of all its predicted voxels, "
          "pooled over the cases; the diagonal is the precision)\n")
    print("| predicted | " + " | ".join(f"in {t}" for t in ["background", *groups]) + " |")
    print("|---" * (2 + len(groups)) + "|")
    for g in groups:
        total = sum(truth_of[(g, t)] for t in ["background", *groups])
        print(f"| {g} | " + " | ".join(f"{truth_of[(g, t)] / total:.2f}" if total else "-"
                                       for t in ["background", *groups]) + " |")
    print("\nPer organ: Dice as merged, Dice keeping only the largest connected component (mean over the cases "
          "that have the organ), and the share of the false positives lying more than 3 voxels from the organ\n")
    print("| organ | Dice | Dice, largest component | false positives > 3 voxels away |")
    print("|---|---|---|---|")
    for g in groups:
        print(f"| {g} | {mean(dice[g][0])} | {mean(dice[g][1])} | "
              + (f"{far[g][0] / far[g][1]:.2f} of {far[g][1]} |" if far[g][1] else "- |"))
    if args.per_case:
        print("\nPer case: the organ's own head, mean p inside the organ / share of the organ merged to it / "
              "its false-positive voxels more than 3 voxels from the organ\n")
        print("| case | site | " + " | ".join(groups) + " |")
        print("|---" * (2 + len(groups)) + "|")
        print("\n".join(rows))


def _group_map(space: Any, codes: np.ndarray) -> np.ndarray:
    """Codes -> 0 for background, 1 + the group's index inside each organ region."""
    mapped = np.zeros(codes.shape, dtype=np.int64)
    for index, grp in enumerate(space.groups):
        mapped[space.codes_to_leaf_masks(codes, f"region:{grp.name}")] = index + 1
    return mapped


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask
    return labelled == 1 + int(np.argmax(np.bincount(labelled.ravel())[1:]))


if __name__ == "__main__":
    main()
