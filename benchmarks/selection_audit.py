"""Which checkpoint each selection rule picks, read from finished runs' validation histories.

For every run folder (one holding ``summary.json``), the script replays the trainer's rule over the recorded
validations: the last (step, candidate) whose score is at least that of every earlier one (a tie keeps the
later step; runs trained before that rule, commit ff0de03, kept the earlier one), scored with the mean Dice
over every class (``all``) and with the mean over the organ regions (``regions``,
:func:`unionseg.training.validation.selection_score`). It prints the pick of each rule with the region mean
of the picked validation, and flags the runs where the two rules disagree. Nothing is retrained: it says
which runs a change of ``select_on`` would change, and by how much on validation.

Run: ``.venv/bin/python benchmarks/selection_audit.py RUN_DIR [RUN_DIR ...]`` (e.g. ``bench_out/std7/runs/*/seed*``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _results(entry: dict, candidate: str) -> dict:
    """One validation of one candidate, in the shape selection_score reads (the region mean recomputed, as
    histories written before session 15 lack it)."""
    from unionseg.training.validation import region_mean

    prefix = f"{candidate}/"
    per_class = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix)}
    return {"mean_dice": entry[f"{candidate}/mean_dice"], "region_mean": region_mean(per_class)}


def pick(history: list[dict], rule: str) -> tuple[int, str, float | None] | None:
    """(step, candidate, region mean) of the model the trainer keeps under ``rule``; candidates in the order
    the history lists them, a later validation replacing the kept one when at least as good (a tie keeps
    the later step, as the trainer does)."""
    from unionseg.training.validation import selection_score

    best, kept = -np.inf, None
    for entry in history:
        candidates = [k[: -len("/mean_dice")] for k in entry if k.endswith("/mean_dice")]
        scored = {c: selection_score(_results(entry, c), rule) for c in candidates}
        if not scored:
            continue
        name = max(scored, key=lambda c: scored[c])
        if scored[name] >= best:
            best, kept = scored[name], (int(entry["step"]), name, _results(entry, name)["region_mean"])
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run folders (each with summary.json)")
    args = ap.parse_args()
    print("| run | `all`: step, candidate (region mean) | `regions`: step, candidate (region mean) |")
    print("|---|---|---|")
    for run in args.runs:
        summary = run / "summary.json"
        if not summary.is_file():
            continue
        history = json.loads(summary.read_text())["history"]
        cells = []
        picks = [pick(history, rule) for rule in ("all", "regions")]
        for kept in picks:
            region = "-" if kept is None or kept[2] is None else f"{kept[2]:.3f}"
            cells.append("-" if kept is None else f"{kept[0]}, {kept[1]} ({region})")
        flag = " **differs**" if picks[0] != picks[1] else ""
        print(f"| {run}{flag} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
