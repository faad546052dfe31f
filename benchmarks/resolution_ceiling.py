"""The Dice a perfect network could reach when it works on a coarser grid than the ground truth.

Every method trains and predicts on the prepared grid (the project's ``preprocessing.spacing``); the predictor
maps its probabilities back onto the source grid with linear interpolation, and the evaluation scores them
there. A network that is exactly right on the prepared grid therefore still loses the organ boundaries that
the coarse grid cannot hold. This script measures that ceiling: for each case of an evaluation set, the ground
truth is put on the prepared grid of a given spacing (the same nearest-neighbour mapping as ``prepare``), its
one-hot encoding is mapped back with ``restore_to_source`` (linear, as the predictor does), the arg-max is
taken and the result is scored against the original truth with the public evaluation.

Run: ``.venv/bin/python benchmarks/resolution_ceiling.py PROJECT.yaml [--set test] [--spacing 4 5 6]``
(Used for the choice of the standard budget's 6 mm grid, ``docs/benchmarks.md``.)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import numpy as np

from unionseg.config import Project, load_project
from unionseg.data.catalog import scan_dataset
from unionseg.data.io import read_image
from unionseg.data.preprocess import preprocess_image, preprocess_label, restore_to_source
from unionseg.evaluation.evaluate import evaluate_case, map_ground_truth


def ceiling_of_case(image_path: Path, label_path: Path, project: Project, dataset: str, spacing: float
                    ) -> dict[str, float]:
    """Region and part Dice of the truth after a round trip through the prepared grid at ``spacing`` mm."""
    space = project.label_space
    image, geom = read_image(image_path)
    raw, label_geom = read_image(label_path)
    truth = map_ground_truth(raw, space.local_lookup(dataset), label_path, dataset)
    spec = dataclasses.replace(project.preprocessing, spacing=(spacing,) * 3)
    _, record = preprocess_image(np.asarray(image), geom, spec)
    coarse = preprocess_label(truth, label_geom, record)
    one_hot = (coarse[None] == np.arange(space.n_leaves)[:, None, None, None]).astype(np.float32)
    fill = np.zeros(space.n_leaves, dtype=np.float32)
    fill[0] = 1.0  # outside the body crop: background
    back = restore_to_source(one_hot, record, order=1, fill=fill).argmax(0).astype(np.uint8)
    scores = evaluate_case(back, truth, space.full_mask(), space, label_geom.spacing, metrics=("dice",))
    return {key: value["dice"] for key, value in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--set", default="test", help="evaluation set role (val or test)")
    parser.add_argument("--spacing", type=float, nargs="+", default=[4.0, 5.0, 6.0])
    args = parser.parse_args()
    project = load_project(args.project)
    spec = project.eval_dataset(args.set)
    if spec is None or not spec.fully_labelled:
        raise SystemExit(f"{args.project}: no fully labelled {args.set!r} set")
    cases = [c for c in scan_dataset(spec.name, spec.root, spec.layout).cases if c.label is not None]
    regions = project.label_space.region_keys()
    print(f"{len(cases)} {args.set} cases of {args.project}")
    print("| spacing (mm) | " + " | ".join(r.split(":")[-1] for r in regions) + " | mean |")
    print("|---" * (len(regions) + 2) + "|")
    for spacing in args.spacing:
        per_key: dict[str, list[float]] = {r: [] for r in regions}
        for case in cases:
            assert case.label is not None
            scores = ceiling_of_case(case.image, case.label, project, spec.name, spacing)
            for r in regions:
                if r in scores:
                    per_key[r].append(scores[r])
        means = [statistics.fmean(per_key[r]) for r in regions]
        print(f"| {spacing:g} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {statistics.fmean(means):.3f} |")


if __name__ == "__main__":
    main()
