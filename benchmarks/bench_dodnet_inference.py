"""DoDNet inference: all tasks at once vs one task, on the same volume, in one run.

DoDNet's heads are tiny (1x1x1 convs, 8-8-C), so with the backbone run ONCE per window and every task's
head in one batched grouped convolution, segmenting all organs should cost little more than segmenting one.
Target (issue 7): all-task inference <= 1.25 x one-task inference.

Run: ``.venv/bin/python benchmarks/bench_dodnet_inference.py [--preset cpu] [--size 128] [--roi 64] [--tasks 7]
[--docs docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import statistics
import time
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

    from unionseg.networks import build_network, set_layout

    torch.manual_seed(0)
    net = build_network({"backbone": {"name": "resunet", "preset": args.preset},
                         "head": {"name": "dynamic", "n_tasks": args.tasks, "out_channels": 2}}).eval()
    set_layout(net, "cpu")  # as the predictor does
    x = torch.randn(1, 1, args.size, args.size, args.size)
    roi = (args.roi,) * 3

    def once(module: object) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            sliding_window_inference(x, roi, 1, module, overlap=0.5, mode="gaussian")  # type: ignore[arg-type]
            return time.perf_counter() - t0

    single, every_task = OneTask(net, 0), (lambda t: net(t, None))
    ones, alls = [], []
    for i in range(args.repeats + 1):  # alternate, so load from other processes hits both alike
        t_one, t_all = once(single), once(every_task)
        if i > 0:
            ones.append(t_one)
            alls.append(t_all)
    one, every = statistics.median(ones), statistics.median(alls)
    ratio = every / one
    text = (f"Measured with `.venv/bin/python benchmarks/bench_dodnet_inference.py --preset {args.preset} --size "
            f"{args.size} --roi {args.roi} --tasks {args.tasks}` (ResUNet `{args.preset}` + dynamic head, "
            f"{args.tasks} tasks, MONAI sliding window over a {args.size}^3 volume, roi {args.roi}^3, overlap 0.5; "
            f"median of {args.repeats}, the two timed alternately; 2 CPU cores).\n\n"
            f"| inference | seconds |\n|---|---|\n| one task | {one:.2f} |\n| all {args.tasks} tasks | {every:.2f} |\n"
            f"| ratio | **{ratio:.2f}** (target <= 1.25: {'met' if ratio <= 1.25 else 'MISSED'}) |")
    print(text)
    if args.docs:
        from docs_update import update_generated  # benchmarks/ is on the path when run as a script

        print(f"{args.docs}: {update_generated(args.docs, 'DoDNet all-task inference', text)}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
