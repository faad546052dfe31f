"""DoDNet inference: all tasks at once vs one task, on the same volume, in one run.

DoDNet's heads are tiny (1x1x1 convs, 8-8-C), so with the backbone run ONCE per window and every task's
head in one batched grouped convolution, segmenting all organs should cost little more than segmenting one.
Target (issue 7): all-task inference <= 1.25 x one-task inference.

Two paths, each timed for one task (the official code's per-task pass) and for all tasks, the two alternating:

* ``predictor``: what ``unionseg predict`` runs on a prepared volume, :meth:`Predictor.predict_prepared`:
  the slab-stitched sliding window, the restore onto the input grid and the merge into one label map. The
  one-task predictor stitches that task's two channels (its region and its tumour) and merges one organ;
  the all-task one stitches every task's and merges them all. The target is read here.
* ``monai``: MONAI's ``sliding_window_inference`` on the network alone (all T x 2 channels blended for
  all tasks, 2 for one), as a bare script would do it.

Run: ``.venv/bin/python benchmarks/bench_dodnet_inference.py [--preset cpu] [--size 128] [--roi 64] [--tasks 7]
[--docs docs/benchmarks.md]`` (the `standard` suite's models predict with roi 32, their training patch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn


class OneTask(nn.Module):
    """The same network asked for a single task (the official code's per-task pass)."""

    def __init__(self, net: nn.Module, task: int) -> None:
        super().__init__()
        self.net = net
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.full((x.shape[0],), self.task, dtype=torch.long, device=x.device)
        return self.net(x, ids)


def alternate(one: Callable[[], object], every: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``one`` and of ``every`` and the median of their per-pair ratios: a warm-up pair,
    then ``repeats`` pairs, the order alternating between pairs so that load from other processes hits both
    alike."""
    ones, alls, ratios = [], [], []
    for i in range(repeats + 1):
        timed = {}
        for name, fn in ((("every", every), ("one", one)) if i % 2 else (("one", one), ("every", every))):
            t0 = time.perf_counter()
            fn()
            timed[name] = time.perf_counter() - t0
        if i > 0:
            ones.append(timed["one"])
            alls.append(timed["every"])
            ratios.append(timed["every"] / timed["one"])
    return statistics.median(ones), statistics.median(alls), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=Path, default=None)
    args = parser.parse_args()

    from monai.inferers import sliding_window_inference

    from unionseg.config import PreprocessSpec
    from unionseg.data.io import Geometry
    from unionseg.data.preprocess import preprocess_image
    from unionseg.inference.predictor import Predictor
    from unionseg.labels import LabelSpace, Leaf
    from unionseg.networks import build_network, set_layout

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_predict import synthetic_ct

    torch.manual_seed(0)
    net = build_network({"backbone": {"name": "resunet", "preset": args.preset},
                         "head": {"name": "dynamic", "n_tasks": args.tasks, "out_channels": 2}}).eval()
    set_layout(net, "cpu")  # as the predictor does
    single = OneTask(net, 0)
    roi = (args.roi,) * 3

    # the predictor path: one organ with a tumour per task, on a CT-like volume prepared at 1 mm
    organs = [f"organ{t}" for t in range(args.tasks)]
    spec = PreprocessSpec(spacing=(1.0, 1.0, 1.0))
    shape = (args.size,) * 3
    prepared, record = preprocess_image(synthetic_ct(shape), Geometry.identity(shape), spec)
    inference = {"roi_size": list(roi), "overlap": 0.5, "sw_batch_size": 1}

    class Every(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x, None)

    def predictor(module: nn.Module, tasks: int) -> Predictor:
        # the label space of the first ``tasks`` organs: the one-task predictor stitches, restores and merges
        # its own organ alone, as a model of one task would
        names = organs[:tasks]
        space = LabelSpace([leaf for name in names for leaf in (Leaf(name), Leaf(f"{name}_tumour", name))])
        channels = [key for name in names for key in (f"region:{name}", f"{name}_tumour")]
        return Predictor(module, space, spec, output_form="sigmoid", channels=channels, inference=inference,
                         device="cpu")

    every = Every()
    p_one, p_all = predictor(single, 1), predictor(every, args.tasks)
    results = {}
    with torch.inference_mode():
        results["predictor"] = alternate(lambda: p_one.predict_prepared(prepared, record),
                                         lambda: p_all.predict_prepared(prepared, record), args.repeats)
        x = torch.as_tensor(prepared)[None, None]
        results["monai"] = alternate(
            lambda: sliding_window_inference(x, roi, 1, single, overlap=0.5, mode="gaussian"),
            lambda: sliding_window_inference(x, roi, 1, every, overlap=0.5, mode="gaussian"), args.repeats)
        # outside the timing: task 0's logits of the all-task pass are the one-task pass's
        gap = float((p_all.sliding_window_logits(prepared)[:2] - p_one.sliding_window_logits(prepared)).abs().max())
    if gap > 1e-4:
        raise SystemExit(f"the all-task pass's task-0 channels differ from the one-task pass by {gap:.2e}")
    ratio = results["predictor"][2]
    rows = "\n".join(f"| {path} | {one:.2f} | {every:.2f} | {r:.2f} |" for path, (one, every, r) in results.items())
    text = (f"Measured with `.venv/bin/python benchmarks/bench_dodnet_inference.py --preset {args.preset} --size "
            f"{args.size} --roi {args.roi} --tasks {args.tasks} --repeats {args.repeats}` (ResUNet `{args.preset}` + dynamic head, "
            f"{args.tasks} tasks; a CT-like volume prepared to {tuple(prepared.shape)} voxels; roi {args.roi}^3, "
            f"overlap 0.5, one window per call; medians of {args.repeats} pairs, the order alternating between "
            f"pairs, the ratio the median of the pairs' ratios; task 0's stitched logits of the all-task "
            f"predictor match the one-task predictor's, largest difference {gap:.1e}; 2 CPU cores). `predictor` "
            "is `Predictor.predict_prepared` (stitching, restore, merge: what `unionseg predict` runs), `monai` "
            "MONAI's `sliding_window_inference` on the network alone.\n\n"
            f"| path | one task (s), median | all {args.tasks} tasks (s), median | ratio, median of the pairs' |\n"
            f"|---|---|---|---|\n{rows}\n\n"
            f"Target (the predictor's ratio) <= 1.25: **{ratio:.2f}**, {'met' if ratio <= 1.25 else 'MISSED'}.")
    print(text)
    if args.docs:
        from docs_update import update_generated  # benchmarks/ is on the path when run as a script

        print(f"{args.docs}: {update_generated(args.docs, 'DoDNet all-task inference', text)}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
