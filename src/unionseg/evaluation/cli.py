"""``unionseg evaluate``: score a folder of predictions against a folder of ground-truth label maps.

Only typer is imported at module level (``unionseg --help`` must stay instant); numpy, SciPy, nibabel and
matplotlib load when the command runs. Torch is never imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def evaluate_command(
    pred: Annotated[Path, typer.Argument(help="Folder of predicted label maps <case>.nii.gz (global leaf ids), one "
                                                  "for every case in GT (other files are ignored).")],
    gt: Annotated[Path, typer.Argument(help="Folder of ground-truth label files, e.g. datasets/test/labelsTr.")],
    project: Annotated[Path, typer.Option("--project", "-p", help="Project file (YAML).")],
    out: Annotated[Path, typer.Option("--out", "-o", "--output", help="Output folder for metrics.csv, summary.*, figures/.")],
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Dataset the ground truth belongs to (default: the one whose root contains GT).")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="NSD tolerance in mm.")] = 2.0,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes scoring cases (0 or 1: in this process).")] = 1,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Write PNG figures.", metavar="")] = True,
    root: Annotated[Optional[list[str]], typer.Option(
        "--root", help="Dataset root override NAME=DIR (repeatable).", metavar="NAME=DIR")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.", metavar="")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the reports of an earlier evaluation in -o.", metavar="")] = False,
) -> None:
    """Dice, HD95 (mm) and NSD per class on the classes the ground truth annotates; writes reports."""
    from unionseg.cli import _parse_roots as parse_roots
    from unionseg.errors import listing
    from unionseg.evaluation.evaluate import evaluate_folder
    from unionseg.progress import print_markdown_table, results_console

    summary = evaluate_folder(pred, gt, project, dataset=dataset, out_dir=out, tolerance_mm=tolerance,
                              workers=workers, figures=figures, roots=parse_roots(root), progress=not quiet,
                              overwrite=overwrite)
    console = results_console()
    n = summary["n_cases"]
    console.print(f"[bold]{summary['dataset']}[/bold]: {n} case{'' if n == 1 else 's'} -> {out}")
    console = print_markdown_table(summary["markdown"], console)  # an HD95 cell with its median stays on one line
    if summary["unmatched_predictions"]:
        console.print(f"note: {len(summary['unmatched_predictions'])} predictions have no ground truth "
                      f"and were ignored ({listing(summary['unmatched_predictions'], 5)})")


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to the unionseg app."""
    app.command("evaluate")(evaluate_command)
