"""Text reports for the terminal (rich tables). No torch here."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unionseg.labels import REGION_PREFIX


def project_summary(project_path: Path, roots: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Taxonomy, annotated classes and case counts per split, as plain data.

    Loads the project, scans every dataset folder (structure only, no voxels) and splits the training
    datasets as training will.

    Args:
        project_path: the project file.
        roots: optional ``dataset name -> folder`` overrides.

    Raises:
        ConfigError: an invalid project file (names the file and the key).
        DataError: an unusable dataset folder (names the file at fault).
    """
    from unionseg.config import load_project, split_cases
    from unionseg.data.catalog import check_label_map, scan_dataset

    project = load_project(project_path, roots=roots)
    space = project.label_space
    datasets = []
    for spec in project.datasets:
        info = scan_dataset(spec.name, spec.root, spec.layout, spec.oracle_labels)
        check_label_map(spec.name, info.declared_labels, spec.labels, spec.root / "dataset.json", space.names[1:])
        space.warn_unscored_organs(spec.name, project.path)
        ids = [c.case_id for c in info.cases]
        if spec.role == "train":
            split = split_cases(ids, spec.split, where=f"datasets.{spec.name}.", source=project.path)
            counts = {"train": len(split["train"]), "val": len(split["val"])}
        else:
            counts = {spec.role: len(ids)}
        datasets.append({"name": spec.name, "role": spec.role, "layout": info.layout,
                         "labels": {int(k): v for k, v in spec.labels.items()},
                         "annotated": list(spec.annotated), "counts": counts})
    classes = [{"id": i, "name": leaf.name, "part_of": leaf.part_of} for i, leaf in enumerate(space.leaves)]
    return {"project": project.name, "path": str(project.path), "classes": classes,
            "regions": {k: [space.names[i] for i in space.leaves_of(k)] for k in space.region_keys()},
            "datasets": datasets,
            "preprocessing": {"spacing": list(project.preprocessing.spacing),
                              "window": list(project.preprocessing.window)}}


def print_project_info(project_path: Path, roots: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Print :func:`project_summary` as tables on stdout and return it (``unionseg info``)."""
    from rich.console import Console
    from rich.table import Table

    summary = project_summary(project_path, roots)
    # piped or captured output gets a wide console so that names are never cut to fit 80 columns
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(f"[bold]{summary['project']}[/bold]  ({summary['path']})")
    taxonomy = Table(title="classes (leaves)")
    for col in ("id", "leaf", "part of"):
        taxonomy.add_column(col)
    for c in summary["classes"]:
        taxonomy.add_row(str(c["id"]), c["name"], c["part_of"] or "")
    console.print(taxonomy)
    regions = Table(title="regions (scored as organs)")
    regions.add_column("region")
    regions.add_column("leaves")
    for key, leaves in summary["regions"].items():
        regions.add_row(key[len(REGION_PREFIX):], ", ".join(leaves))
    console.print(regions)
    table = Table(title="datasets")
    for col in ("dataset", "role", "layout", "local -> global", "annotated", "cases"):
        table.add_column(col)
    for d in summary["datasets"]:
        table.add_row(d["name"], d["role"], d["layout"],
                      ", ".join(f"{k}->{v}" for k, v in d["labels"].items()),
                      ", ".join(d["annotated"]),
                      ", ".join(f"{k} {v}" for k, v in d["counts"].items()))
    console.print(table)
    pre = summary["preprocessing"]
    console.print(f"preprocessing: spacing {pre['spacing']} mm, window {pre['window']} HU")
    return summary
