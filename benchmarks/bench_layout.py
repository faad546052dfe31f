"""Training step and no-grad forward of a backbone with 3-D kernels contiguous vs channels-last (CPU).

What :func:`unionseg.networks.set_layout` buys on this machine, for each backbone: the same network, the
same batch, timed alternately (median of ``--repeats`` after two warm-ups), in one process.

Run: ``.venv/bin/python benchmarks/bench_layout.py [--preset cpu] [--patch 48] [--batch 2] [--threads 2]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any


def _step(net: Any, opt: Any, x: Any, y: Any) -> float:
    import torch.nn.functional as F

    t0 = time.perf_counter()
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def _forward(net: Any, x: Any) -> float:
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        net(x)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    import torch

    from unionseg.networks import build_network, set_layout
    from unionseg.networks.layout import ENV

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = (args.patch,) * 3
    x = torch.randn(args.batch, 1, *size)
    y = torch.randint(0, 8, (args.batch, *size))
    print(f"preset {args.preset}, batch {args.batch} x {args.patch}^3, {args.threads} thread(s), "
          f"median of {args.repeats}\n")
    print("| backbone | layout | train step (s) | no-grad forward (s) |")
    print("|---|---|---|---|")
    for backbone in ("resunet", "dynunet"):
        nets, opts = {}, {}
        for layout, forced in (("contiguous", "0"), ("channels-last", "1")):
            os.environ[ENV] = forced
            torch.manual_seed(0)
            net = build_network({"backbone": {"name": backbone, "preset": args.preset},
                                 "head": {"name": "softmax", "out_channels": 8}})
            nets[layout] = set_layout(net, "cpu")
            opts[layout] = torch.optim.AdamW(net.parameters(), lr=1e-4)
        os.environ.pop(ENV, None)

        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.repeats + 2):
            for layout in nets:
                for kind in ("step", "forward"):
                    t = _step(nets[layout], opts[layout], x, y) if kind == "step" else _forward(nets[layout], x)
                    if r >= 2:
                        times.setdefault((layout, kind), []).append(t)
        for layout in nets:
            print(f"| {backbone} | {layout} | {statistics.median(times[(layout, 'step')]):.3f} | "
                  f"{statistics.median(times[(layout, 'forward')]):.3f} |")


if __name__ == "__main__":
    main()
