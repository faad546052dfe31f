"""Benchmark aggregation and the report: ``results.json``, ``report.md`` and its figures.

Numbers come only from the runs' ``result.json`` files, which come from the public evaluation of saved
predictions. Gap closure per organ region is ``(method - naive) / (oracle - naive)`` on seed means, each
row set against the oracle and naive over the seeds all three share (``gap_closure["seeds"]``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unionseg.evaluation.metrics import GT_EMPTY, PRED_EMPTY
from unionseg.jsonfile import write_json, write_text
from unionseg.labels import REGION_PREFIX, display_key


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    # one value has no sample spread: NaN (null in results.json), not a 0 that reads as a measured one
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def class_order(key_lists: Iterable[Iterable[str]]) -> list[str]:
    """Class keys in the order the runs list them (first seen first), the organ regions before the rest.

    Evaluation writes its classes in the label space's order (organs as the project lists them, then the
    tumours), and every run of a suite scores the same classes, so every table and figure of the report
    keeps that order: sorting them put the kidney before the liver in the benchmark and after it in
    ``unionseg evaluate``'s own tables. (A class only a later run scored comes after the others of its kind.)
    """
    seen: dict[str, None] = {}
    for keys in key_lists:
        for key in keys:
            seen.setdefault(key, None)
    return sorted(seen, key=lambda k: not k.startswith(REGION_PREFIX))  # stable: the order within each kind stays


def _region_means(runs: list[dict[str, Any]], seeds: set[int]) -> dict[str, Any]:
    """Seed means of one row's organ-region Dice over ``seeds``: per region, and the mean and sample spread of
    the per-seed mean over regions (the table's "mean region Dice"; a run read back holds null where a value
    was NaN)."""
    chosen = [r for r in runs if r["seed"] in seeds]
    regions = [k for k in class_order(r["per_class"] for r in chosen) if k.startswith(REGION_PREFIX)]
    per_region = {k: _mean_std([r["per_class"].get(k, {}).get("dice") for r in chosen])[0] for k in regions}
    per_seed = [float(np.mean([_number(r["per_class"].get(k, {}).get("dice")) for k in regions])) for r in chosen] \
        if regions else []
    mean, std = _mean_std(per_seed)
    return {"per_region": per_region, "mean": mean, "std": std}


def aggregate(results: list[dict[str, Any]], suite: Any) -> dict[str, Any]:
    """Seed means and spreads per method and class, gap closure, compute, provenance."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    methods: dict[str, Any] = {}
    for name, runs in by_name.items():
        keys = class_order(r["per_class"] for r in runs)
        classes = {}
        for key in keys:
            entry: dict[str, Any] = {}
            for metric in ("dice", "hd95", "nsd"):
                mean, std = _mean_std([r["per_class"].get(key, {}).get(metric) for r in runs])
                entry[metric] = {"mean": mean, "std": std}
            # (rows of earlier releases hold no counts, or null)
            scored = [r["per_class"][key] for r in runs
                      if isinstance(r["per_class"].get(key, {}).get("empty_rule_cases"), dict)]
            if scored:  # over all seeds: how many test cases an HD95 penalty (the grid's diagonal) decided
                entry["penalty_cases"] = sum(int(c["empty_rule_cases"].get(PRED_EMPTY, 0))
                                             + int(c["empty_rule_cases"].get(GT_EMPTY, 0)) for c in scored)
            classes[key] = entry
        region = _region_means(runs, {r["seed"] for r in runs})
        methods[name] = {
            "method": runs[0]["method"], "options": runs[0].get("options", {}), "seeds": [r["seed"] for r in runs],
            "classes": classes, "mean_region_dice": {"mean": region["mean"], "std": region["std"]},
            "train_seconds": _mean_std([r["train_seconds"] for r in runs])[0],
            "expert_seconds": _mean_std([r.get("expert_seconds", 0.0) for r in runs])[0],
            "predict_seconds_per_case": _mean_std([r["predict_seconds_per_case"] for r in runs])[0],
            # the largest over the seeds (the first seed's alone before); None where nothing was measured
            "parameters": max((r["parameters"] for r in runs if r.get("parameters") is not None), default=None),
            "peak_rss_mb": max((r["peak_rss_mb"] for r in runs if r.get("peak_rss_mb") is not None), default=None),
            "peak_gpu_mb": max((r["peak_gpu_mb"] for r in runs if r.get("peak_gpu_mb") is not None), default=None),
        }
    oracle, naive = methods.get("oracle"), methods.get("naive")
    if oracle and naive:
        for name, entry in methods.items():
            # on the seeds the row shares with both references: a row with fewer seeds (or others) set against
            # references averaged over more would mix seed sets, which the seed spread shows is not small
            common = set(entry["seeds"]) & set(oracle["seeds"]) & set(naive["seeds"])
            if not common:
                entry["gap_closure"] = {"mean_region": float("nan"), "per_region": {}, "seeds": []}
                entry["vs_oracle"] = {}
                continue
            row, hi_ref, lo_ref = (_region_means(by_name[n], common) for n in (name, "oracle", "naive"))
            gaps = {}
            for key, value in row["per_region"].items():
                if key not in hi_ref["per_region"] or key not in lo_ref["per_region"]:
                    continue
                lo, hi = lo_ref["per_region"][key], hi_ref["per_region"][key]
                gaps[key] = (value - lo) / (hi - lo) if hi - lo >= MIN_GAP else float("nan")
            lo, hi = lo_ref["mean"], hi_ref["mean"]
            gap_mean = (row["mean"] - lo) / (hi - lo) if hi - lo >= MIN_GAP else float("nan")
            ratio = {k: v / hi_ref["per_region"][k] for k, v in row["per_region"].items()
                     if k in hi_ref["per_region"] and hi_ref["per_region"][k] > 0}
            entry["gap_closure"] = {"mean_region": gap_mean, "per_region": gaps, "seeds": sorted(common)}
            entry["vs_oracle"] = ratio
    return {"suite": getattr(suite, "name", str(suite)), "about": getattr(suite, "about", ""),
            "budget": getattr(suite, "budget", {}), "isolate": bool(getattr(suite, "isolate", False)), "units": UNITS,
            "methods": methods, "runs": results}


#: the least lead of the oracle over naive (Dice) for a gap closure to be computed: below it (or with the
#: oracle behind) the ratio divides by noise (helper-97: 1.00 for a row scoring 0, the oracle 0.000 behind naive)
MIN_GAP = 0.01
#: what results.json's numbers are measured in (its keys name most units; this says them all)
UNITS = {"dice": "fraction in [0, 1]", "nsd": "fraction in [0, 1], tolerance 2 mm", "hd95": "mm",
         "gap_closure": "fraction (naive 0, oracle 1)", "train_seconds": "s (wall time)",
         "expert_seconds": "s (wall time)", "stage_seconds": "s (wall time)",
         "predict_seconds_per_case": "s (wall time)", "peak_rss_mb": "MiB (peak resident memory of the run's process)",
         "peak_gpu_mb": "MiB (peak GPU memory held by the run process's tensors; null without a GPU)",
         "parameters": "count of the deployed model's weights"}


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def markdown_table(agg: dict[str, Any]) -> str:
    methods = agg["methods"]
    keys = class_order(m["classes"] for m in methods.values())
    head = ["method", "mean region Dice", "gap closure"] + [display_key(k) for k in keys] + \
        ["train s (+shared experts)", "predict s/case"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    most = max((len(m["seeds"]) for m in methods.values()), default=0)
    for name, m in methods.items():
        mr = m["mean_region_dice"]
        spread = f" ± {mr['std']:.3f}" if len(m["seeds"]) > 1 else ""
        n = len(m["seeds"])  # a row with fewer seeds than the others says so: its mean is not like theirs
        label = name if n == most else f"{name} ({n} seed{'s' if n != 1 else ''})"
        cells = [label, _fmt(mr["mean"]) + spread, _fmt(m.get("gap_closure", {}).get("mean_region"), 2)]
        for k in keys:
            d = m["classes"].get(k, {}).get("dice", {})
            cells.append(_fmt(d.get("mean")))
        extra = f" (+{m['expert_seconds']:.0f})" if m.get("expert_seconds") else ""
        cells += [f"{m['train_seconds']:.0f}{extra}", _fmt(m["predict_seconds_per_case"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compute_section(agg: dict[str, Any]) -> list[str]:
    """Report lines: what each method costs, per seed (the main table gives the seed means alone), with the
    model's size and the peak memory, and the machine the runs were measured on."""
    methods = agg["methods"]
    if not methods:
        return []
    gpu = any(m.get("peak_gpu_mb") is not None for m in methods.values())  # a column only where a GPU was used
    lines = ["## Compute per method", "",
             "Wall-clock seconds per seed (training without the shared experts; prediction per test case), the "
             "deployed model's parameters (for `individual`, its experts together) and the peak resident memory "
             "of the run's process" + (" (and its peak GPU memory)" if gpu else "") + ".", "",
             "| method | parameters | train s per seed | predict s/case per seed | peak memory (MiB) |"
             + (" peak GPU memory (MiB) |" if gpu else ""),
             "|---|---|---|---|---|" + ("---|" if gpu else "")]
    for name, m in methods.items():
        runs = sorted((r for r in agg.get("runs", []) if r.get("name") == name), key=lambda r: r.get("seed", 0))
        train = ", ".join(f"{float(r['train_seconds']):.0f}" for r in runs if r.get("train_seconds") is not None)
        predict = ", ".join(f"{float(r['predict_seconds_per_case']):.2f}" for r in runs
                            if r.get("predict_seconds_per_case") is not None)
        params = f"{m['parameters']:,}" if m.get("parameters") is not None else "n/a"
        memory = _fmt(m.get("peak_rss_mb"), 0)
        lines.append(f"| {name} | {params} | {train} | {predict} | {memory} |"
                     + (f" {_fmt(m.get('peak_gpu_mb'), 0)} |" if gpu else ""))
    lines.append("")
    if any(m.get("peak_rss_mb") is None for m in methods.values()):
        lines += [("Peak memory is measured where each run has a process of its own; rows without it were run "
                   "before it was recorded." if agg.get("isolate") else
                   "Peak memory is measured only where each run has a process of its own (a suite with `isolate: "
                   "true`, as `standard`, `ablations` and `large`); this suite trains its rows in one process, "
                   "whose peak would be the largest row's."), ""]
    machines = {json.dumps(r.get("provenance", {}).get("machine"), sort_keys=True) for r in agg.get("runs", [])
                if r.get("provenance", {}).get("machine")}
    for machine in sorted(machines):
        info = json.loads(machine)
        lines.append(f"Measured on: {info.get('cpu')} ({info.get('cpu_count')} cores, torch {info.get('torch')} "
                     f"with {info.get('torch_threads')} threads"
                     + (f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU") + f"; {info.get('platform')}).")
    return [*lines, ""] if machines else lines


def surface_table(agg: dict[str, Any]) -> list[str]:
    """Report lines: HD95 (mm) and NSD per organ region, mean over seeds, for every method (the table above
    is Dice only; both are in ``results.json``)."""
    methods = agg["methods"]
    regions = [k for k in class_order(m["classes"] for m in methods.values()) if k.startswith(REGION_PREFIX)]
    if not regions:
        return []
    names = [display_key(k) for k in regions]
    lines = ["## Surface distances per organ region", "",
             "HD95 in mm (lower is better) and NSD at 2 mm (higher is better), test-set means over seeds; a case "
             "whose prediction misses an organ (or has one the truth lacks) scores the grid's diagonal as its HD95 "
             "(docs/evaluation.md), and one such case rules a mean: \"(k penalties)\" counts them, all seeds "
             "together.", "",
             "| method | " + " | ".join(f"{n} HD95" for n in names) + " | " + " | ".join(f"{n} NSD" for n in names) + " |",
             "|---|" + "---|" * (2 * len(regions))]
    for name, m in methods.items():
        hd = [_fmt(m["classes"].get(k, {}).get("hd95", {}).get("mean"), 1) + _penalties(m["classes"].get(k, {}))
              for k in regions]
        nsd = [_fmt(m["classes"].get(k, {}).get("nsd", {}).get("mean")) for k in regions]
        lines.append(f"| {name} | " + " | ".join(hd + nsd) + " |")
    return [*lines, ""]


def _penalties(entry: dict[str, Any]) -> str:
    """`` (k penalties)`` for a class whose HD95 mean holds k penalty cases, else ``""``."""
    count = entry.get("penalty_cases") or 0
    return f" ({count} penalt{'y' if count == 1 else 'ies'})" if count else ""


def print_table(agg: dict[str, Any]) -> None:
    """The comparison table on the terminal, then what the suite's figures mean (its ``about``)."""
    from unionseg.progress import print_markdown_table

    console = print_markdown_table(markdown_table(agg))
    if agg.get("about"):
        console.print(agg["about"], markup=False, highlight=False, soft_wrap=True)  # one line, as written


def write_results(agg: dict[str, Any], out: Path) -> None:
    """``results.json``, atomically."""
    write_json(Path(out) / "results.json", agg)


def _benchmarked_project(out: Path) -> str | None:
    """The project file a benchmark of the user's own data was run on (its marker), else None."""
    from unionseg.benchmark import read_marker
    from unionseg.errors import UnionsegError

    try:
        mark = read_marker(out)
    except UnionsegError:
        return None
    project = (mark or {}).get("project")
    return project if isinstance(project, str) else None


def write_report(agg: dict[str, Any], out: Path) -> None:
    """``results.json``, ``report.md`` and the PNG figures in ``figures/``."""
    out = Path(out)
    write_results(agg, out)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    made = _figures(agg, out, figures)
    lines = [f"# Benchmark report: suite `{agg['suite']}`", ""]
    if agg.get("about"):  # (a benchmark of one's own project: whose data these are)
        lines += [agg["about"], ""]
    own = _benchmarked_project(out) is not None
    lines += ["Test-set Dice per organ region and tumour (mean over seeds; ± sample std when several seeds). "
             "Gap closure = (method − naive) / (oracle − naive) on the mean region Dice. Checkpoints were selected "
             "on validation only; the test set was evaluated once per run.", "",
             "Tumour columns average over every test case, and a case without that tumour where the method "
             "predicts none scores 1 (the empty-mask rule): a method that never predicts a tumour still scores "
             "the share of such cases. The tumour section below scores only the cases that contain one, with "
             "detections. \"train s\" is the run's own training; \"(+N)\" the shared experts it reused (with, "
             "for co-training and MS-KD, their probability maps and pseudo labels), computed once per seed.",
             "", markdown_table(agg), "",
             *_gap_note(agg),
             *surface_table(agg),
             *compute_section(agg),
             *rows_section(agg),
             "## Budget (identical for every method and the shared experts)", "", "```json",
             json.dumps(agg.get("budget", {}), indent=2), "```", ""]
    lines += tumour_section(agg, out)
    lines += site_section(agg, out)
    lines += missing_runs_note(agg, out)
    for title, rel in made:
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    lines += ["## Provenance", "", "| run | seed | code commit | data fingerprint | config hash | phantom |",
              "|---|---|---|---|---|---|"]
    for r in agg["runs"]:
        p = r["provenance"]
        commit = str(p["code_commit"])
        commit = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")  # code not committed: said so
        lines.append(f"| {r['name']} | {r['seed']} | `{commit}` | `{p['data_fingerprint']}` | "
                     f"`{p['config_hash']}` | {'- (a project of your own)' if own else p.get('generator_version')} |")
    commits = {str(r["provenance"]["code_commit"]) for r in agg["runs"]}
    dirty = sum(str(r["provenance"]["code_commit"]).endswith("-dirty") for r in agg["runs"])
    # the runs are counted apart from the states ("3 code states, 11 of them with uncommitted changes")
    unsaved = (f"{dirty} of the {len(agg['runs'])} runs had uncommitted changes (`-dirty`, which records no hash of "
               "them), which their commit alone does not reproduce.")
    if len(commits) > 1:
        lines += ["", f"The runs come from {len(commits)} code states: rows trained by different code may differ by "
                  "more than the method." + (f" {unsaved}" if dirty else "")]
    elif dirty:
        lines += ["", unsaved]
    write_text(out / "report.md", "\n".join(lines) + "\n")


def _gap_note(agg: dict[str, Any]) -> list[str]:
    """Report lines saying why the gap closure column reads n/a, when it does, and which rows it compares on
    fewer seeds than the row or the references have."""
    methods = agg["methods"]
    oracle, naive = methods.get("oracle"), methods.get("naive")
    if not (oracle and naive):
        return ["Gap closure needs the `oracle` and `naive` rows; without both it reads n/a.", ""]
    lines = []
    references = set(oracle.get("seeds", ())) & set(naive.get("seeds", ()))
    # rows in the same case (the same shared seeds, the same seeds of their own) share one line: after
    # `--seeds 2` on a few rows, every other row of seed 0 alone would repeat the same sentence
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for name, m in methods.items():
        shared = m.get("gap_closure", {}).get("seeds")
        # the table shows every row's mean over its own seeds: a gap taken on fewer seeds than any of the three
        # rows has (the row's, the oracle's or naive's) cannot be recomputed from it, and is said
        every = (set(m.get("seeds", ())), set(oracle.get("seeds", ())), set(naive.get("seeds", ())))
        if shared is None or name in ("oracle", "naive") or all(set(shared) == seeds for seeds in every):
            continue
        groups.setdefault((tuple(sorted(shared)), tuple(sorted(m["seeds"]))), []).append(name)
    for (shared, own), names in groups.items():
        several = len(names) > 1
        rows = _name_list(names)
        if not shared:
            lines.append(f"Gap closure of {rows} reads n/a: {'they share' if several else 'it shares'} no seed with "
                         f"both the oracle and naive ({'their' if several else 'its'} seeds {_seed_list(own)}; "
                         f"theirs {_seed_list(references)}).")
        else:
            lines.append(f"Gap closure of {rows} sets {'them' if several else 'it'} against the oracle and naive on "
                         f"seed{'s' if len(shared) > 1 else ''} {_seed_list(shared)} only, the seeds all three have "
                         f"({rows} {'have' if several else 'has'} {_seed_list(own)}, the oracle "
                         f"{_seed_list(oracle['seeds'])}, naive {_seed_list(naive['seeds'])}).")
    if lines:
        lines.append("")
    lo, hi = naive["mean_region_dice"]["mean"], oracle["mean_region_dice"]["mean"]
    if not (lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)):
        return [*lines, "Gap closure reads n/a: the oracle's or naive's mean region Dice is missing (a run without a "
                "score for an organ).", ""]
    if hi - lo >= MIN_GAP:
        return lines
    return [*lines, f"Gap closure reads n/a: the oracle's mean region Dice ({_fmt(hi)}) does not beat naive's "
            f"({_fmt(lo)}) by {MIN_GAP}, so there is no gap to close (a budget too small for either to learn an "
            "organ, as the `ci` suite's).", ""]


def _name_list(names: list[str]) -> str:
    quoted = [f"`{name}`" for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _seed_list(seeds: Any) -> str:
    return ", ".join(str(s) for s in sorted(seeds))


def missing_runs_note(agg: dict[str, Any], out: Path) -> list[str]:
    """Report lines saying which sections are left out because run folders are not beside ``results.json``
    (a report rendered again from a copied ``results.json`` lost them without a word)."""
    missing = [f"{r['name']} seed {r['seed']}" for r in agg["runs"]
               if not (Path(out) / Path(r["pred_dir"]).parent).is_dir()]
    if not missing:
        return []
    return ["## Left out", "",
            f"The run folders of {len(missing)} of {len(agg['runs'])} runs are not beside this report "
            f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}), so the sections and figures "
            "that read them (per-case tumour and site tables, loss curves, pseudo-label quality, the overlay "
            "montage) leave those runs out, or are missing. Render the report in the benchmark folder itself "
            "(running the same `unionseg benchmark` command again re-renders it in seconds) to have them.", ""]


def rows_section(agg: dict[str, Any]) -> list[str]:
    """What each row of the table ran: its method, the options it set on top of the method's defaults, and
    its seeds (an ablation row's name alone does not say what it changes)."""
    lines = ["## Rows", "", "| row | method | options set by the suite | seeds |", "|---|---|---|---|"]
    for name, m in agg["methods"].items():
        options = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in sorted((m.get("options") or {}).items()))
        seeds = ", ".join(str(s) for s in sorted(m["seeds"]))
        options = options or "none (the method's defaults)"
        lines.append(f"| {name} | `{m['method']}` | {options} | {seeds} |")
    return [*lines, ""]


def _case_rows(agg: dict[str, Any], out: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(method name, per-case row) from every run's ``evaluation/metrics.csv`` that exists."""
    for r in agg["runs"]:
        path = Path(out) / Path(r["pred_dir"]).parent / "evaluation" / "metrics.csv"
        if path.is_file():
            with path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    yield r["name"], row


def tumour_section(agg: dict[str, Any], out: Path) -> list[str]:
    """Report lines: tumour Dice over the test cases that HAVE the tumour, and how many of them got any.

    The table above averages over every case, and a case without the tumour where the method also predicts
    none scores 1 (empty-mask rule), so a method that never predicts a tumour still shows 0.2-0.4 there.
    This section reads each run's per-case ``evaluation/metrics.csv`` (written by ``unionseg evaluate``).
    """
    rows: dict[str, dict[str, list[tuple[float, bool]]]] = {}
    for name, row in _case_rows(agg, out):
        if row["class"].startswith(REGION_PREFIX) or int(row["gt_voxels"]) == 0:
            continue
        rows.setdefault(name, {}).setdefault(row["class"], []).append(
            (float(row["dice"]), int(row["pred_voxels"]) > 0))
    if not rows:
        return []
    classes = class_order(rows.values())
    lines = ["## Tumours, on the test cases that contain one", "",
             "Dice averaged over the cases whose ground truth has the tumour (all seeds pooled), and detected / "
             "cases: how many of them got any predicted voxel of it.", "",
             "| method | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for name in agg["methods"]:
        cells = []
        for c in classes:
            vals = rows.get(name, {}).get(c, [])
            cells.append(f"{np.mean([d for d, _ in vals]):.3f} ({sum(hit for _, hit in vals)}/{len(vals)})"
                         if vals else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def site_section(agg: dict[str, Any], out: Path) -> list[str]:
    """Report lines: organ-region Dice split by the acquisition site of the test case (phantom only).

    Each phantom training set comes from its own site (contrast phase, calibration, noise), so a partially
    labelled method sees each organ's labels under ONE protocol; test cases borrow the sites in turn. The
    table shows how well each organ transfers to the other sites, which the mean hides. Needs the
    generator's ``data/generator.json`` (absent for real data: no section). The phantom names each training
    site after the organ its set labels, which is how the organ's own site is marked.
    """
    facts = Path(out) / "data" / "generator.json"
    if not facts.is_file():
        return []
    site_of = {c["case"]: c["site"] for c in json.loads(facts.read_text()).get("cases", [])}
    cells: dict[tuple[str, str, str], list[float]] = {}
    for name, row in _case_rows(agg, out):
        if row["class"].startswith(REGION_PREFIX) and row["case"] in site_of:
            organ = row["class"][len(REGION_PREFIX):]
            cells.setdefault((name, organ, site_of[row["case"]]), []).append(float(row["dice"]))
    if not cells:
        return []
    organs = list(dict.fromkeys(o for _, o, _ in cells))  # metrics.csv's order: the label space's
    found = {s for _, _, s in cells}  # sites are named after the organ their training set labels
    sites = [o for o in organs if o in found] + sorted(found - set(organs))
    lines = ["## Organ Dice by the test case's acquisition site (phantom)", "",
             "Each training set comes from its own site, so every organ's labels are seen under one protocol. "
             "A cell is the region Dice over the test cases acquired at that site (all seeds pooled); **bold** "
             "marks the site whose training set labels the organ.", "",
             "| method | organ | " + " | ".join(f"site: {s}" for s in sites) + " |",
             "|---|---|" + "---|" * len(sites)]
    for name in agg["methods"]:
        for organ in organs:
            row_cells = []
            for site in sites:
                vals = cells.get((name, organ, site))
                text = f"{np.mean(vals):.2f}" if vals else "n/a"
                row_cells.append(f"**{text}**" if site == organ and vals else text)
            if any(c != "n/a" for c in row_cells):
                lines.append(f"| {name} | {organ} | " + " | ".join(row_cells) + " |")
    return lines + [""]


def _figures(agg: dict[str, Any], out: Path, figures: Path) -> list[tuple[str, str]]:
    from matplotlib.lines import Line2D

    from unionseg.evaluation.figures import AggPlots

    plt = AggPlots()  # pyplot's calls without pyplot: the caller's backend stays as it is
    made: list[tuple[str, str]] = []
    methods = agg["methods"]
    regions = [k for k in class_order(m["classes"] for m in methods.values()) if k.startswith(REGION_PREFIX)]
    names = list(methods)
    if regions and names:
        # at most 12 inches: 9 methods x 4 organs made a 21.6-inch figure, unreadable at a page's width
        fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 1.2 * len(names) * len(regions) / 2)), 4))
        width = 0.8 / max(1, len(names))
        colours = method_colours(agg)
        for i, name in enumerate(names):
            vals = np.array([methods[name]["classes"].get(k, {}).get("dice", {}).get("mean", np.nan)
                             for k in regions], dtype=float)
            errs = np.nan_to_num(np.array([methods[name]["classes"].get(k, {}).get("dice", {}).get("std", np.nan)
                                           for k in regions], dtype=float))  # no bar where one seed gives no spread
            x = np.arange(len(regions)) + i * width
            ax.bar(x, vals, width, yerr=errs, label=name, color=colours[name])
            for xi in x[~np.isfinite(vals)]:  # a class the row did not score is not a Dice of 0
                ax.text(xi, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=6)
        handles, _ = ax.get_legend_handles_labels()
        refs: tuple[tuple[str, Any], ...] = (("oracle", "--"), ("naive", ":"))
        for ref, style in refs:
            if ref in methods:
                for j, k in enumerate(regions):
                    v = methods[ref]["classes"].get(k, {}).get("dice", {}).get("mean")
                    if v is not None:
                        # over the organ's own bars only (from j - 0.1 to j + 0.9 the organs' lines joined)
                        ax.hlines(v, j - width / 2, j + 0.8 - width / 2, colors="k", linestyles=style)
                handles.append(Line2D([], [], color="k", linestyle=style, label=f"{ref}'s level"))
        ax.set_xticks(np.arange(len(regions)) + 0.4 - width / 2)
        ax.set_xticklabels([display_key(k) for k in regions])
        ax.set_ylabel("test Dice, mean over seeds")
        ax.set_ylim(0, 1)
        most = max(len(m["seeds"]) for m in methods.values())
        ax.set_title("error bars: sample standard deviation over seeds" if most > 1 else
                     "one seed: no error bars", fontsize=8)
        # outside the axes, to the right: inside, it covers the bars that reach the top
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        fig.savefig(figures / "region_dice.png", dpi=100)
        plt.close(fig)
        made.append(("Region Dice per method", "figures/region_dice.png"))
    # the table's column order: organ regions first, then the tumours
    keys = class_order(m["classes"] for m in methods.values())
    if keys and names:
        grid = np.array([[methods[n]["classes"].get(k, {}).get("dice", {}).get("mean", np.nan) for k in keys]
                         for n in names], dtype=float)
        # at least 2.6 inches high: one row (a subset run) squeezed its tick labels and colour bar
        fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(keys), max(2.6, 1.4 + 0.45 * len(names))))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([display_key(k) for k in keys], rotation=45, ha="right")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label="Dice")
        fig.tight_layout()
        fig.savefig(figures / "class_dice_heatmap.png", dpi=100, bbox_inches="tight")  # rotated labels kept whole
        plt.close(fig)
        made.append(("Per-class Dice heat map", "figures/class_dice_heatmap.png"))
    curves = _loss_curves(agg, out, figures, plt)
    if curves:
        made.append(("Training loss", curves))
    pseudo = _pseudo_quality(agg, out, figures, plt)
    if pseudo:
        made.append(("Pseudo-label quality (Dice vs hidden truth, unannotated classes only; seed 0)", pseudo))
    montage = _montage(agg, out, figures, plt)
    if montage:
        made.append((f"One test case, every method (seed 0): {montage[1]}", montage[0]))
    return made


def method_colours(agg: dict[str, Any]) -> dict[str, Any]:
    """One colour per row of the table, the same in every figure (the loss curves skip rows without a
    training log, which shifted matplotlib's colour cycle against the bars)."""
    import matplotlib

    names = list(agg["methods"])
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _loss_curves(agg: dict[str, Any], out: Path, figures: Path, plt: Any) -> str | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    colours = method_colours(agg)
    for r in agg["runs"]:
        if r["seed"] != 0:
            continue
        log = out / "runs" / r["name"] / "seed0" / "log.csv"  # individual trains nothing: no log
        if not log.exists():
            continue
        with log.open() as fh:
            rows = list(csv.DictReader(fh))
        if rows and "loss" in rows[0]:
            ax.plot([int(x["step"]) for x in rows], [float(x["loss"]) for x in rows], label=r["name"],
                    color=colours[r["name"]])
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    from matplotlib.ticker import FormatStrFormatter, LogFormatter, MaxNLocator

    ax.set_xlabel("step")
    ax.set_ylabel("total loss (each method's own; log scale)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 0.1, not 10^-1
    # minor ticks labelled (as 0.3, not 3x10^-1) only where the axis spans a decade or less: a loss falling
    # from 3 to 0.02 had all 24 labelled, drawn over each other
    class Plain(LogFormatter):  # matplotlib's choice of minor ticks to label, written plainly
        def __call__(self, x: float, pos: Any = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    # the totals are not on one scale: co-training's sums its two networks, marginal's adds exclusion
    missing = sorted({r["name"] for r in agg["runs"] if r["seed"] == 0}
                     - {r["name"] for r in agg["runs"] if (out / "runs" / r["name"] / "seed0" / "log.csv").exists()})
    ax.set_title("Seed 0; a method's own loss, for its convergence, not to compare levels"
                 + (f"\nno curve of its own: {', '.join(missing)} (it trains only the shared experts)"
                    if missing else ""), fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(figures / "loss_curves.png", dpi=100)
    plt.close(fig)
    return "figures/loss_curves.png"


def _pseudo_quality(agg: dict[str, Any], out: Path, figures: Path, plt: Any) -> str | None:
    # one artefact folder per seed (and expert recipe): seed 0's, as the loss curves and the montage show
    files = sorted((out / "data").glob("**/artifacts/*/pseudo_quality.json"))
    seeds = {f: _artifact_seed(f.parent) for f in files}
    chosen = [f for f in files if seeds[f] == 0] or files
    if not chosen:
        return None
    quality = json.loads(chosen[0].read_text())
    if not quality:
        return None
    keys = class_order([quality])
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(keys), 3.5))
    ax.bar(range(len(keys)), [quality[k] for k in keys])
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([display_key(k) for k in keys], rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("pseudo-label Dice")
    seed = seeds[chosen[0]]
    users = sorted({r["name"] for r in agg.get("runs", []) if r.get("method") == "cotraining"})
    title = "the shared experts' pseudo labels" + (f", which {', '.join(users)} trained on" if users else "")
    ax.set_title((f"Seed {seed}: {title}" if seed is not None else title[0].upper() + title[1:]), fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "pseudo_quality.png", dpi=100)
    plt.close(fig)
    return "figures/pseudo_quality.png"


def _artifact_seed(folder: Path) -> int | None:
    """The seed a shared-artefact folder was made for: its experts' recorded recipe says it."""
    from unionseg.config import load_yaml
    from unionseg.errors import ConfigError

    for recipe in sorted(folder.glob("experts/*/config.yaml")):
        try:
            seed = (load_yaml(recipe) or {}).get("seed")
        except (ConfigError, AttributeError):
            continue
        if isinstance(seed, int):
            return seed
    return None


def _montage(agg: dict[str, Any], out: Path, figures: Path, plt: Any) -> tuple[str, str] | None:
    """The montage's path and which case and slice it shows (the figure did not say)."""
    from matplotlib.patches import Patch

    from unionseg.config import load_project
    from unionseg.data.io import read_image
    from unionseg.evaluation.figures import _rgba, axial_aspect, axial_view, leaf_colours, mark_sides, to_ras

    runs = [r for r in agg["runs"] if r["seed"] == 0]
    if not runs:
        return None
    first = sorted((out / runs[0]["pred_dir"]).glob("*.nii.gz"))
    if not first:
        return None
    case = first[0].name
    project = load_project(out / "data" / "project.yaml", require_train=False)
    test = project.eval_dataset("test")
    if test is None:
        return None
    from unionseg.data.catalog import scan_dataset
    from unionseg.errors import UnionsegError
    from unionseg.evaluation.evaluate import map_ground_truth

    try:  # the phantom's layout or a project's own; a figure that cannot be drawn is left out, not the report
        files = next((c for c in scan_dataset(test.name, test.root, test.layout).cases
                      if f"{c.case_id}.nii.gz" == case), None)
    except UnionsegError:
        return None
    if files is None or files.label is None or not files.image.exists() or not files.label.exists():
        return None
    image, geometry = read_image(files.image)
    # the test set's own label values read as evaluate reads them (every row's evaluation read them already):
    # global codes through its label map
    truth = map_ground_truth(read_image(files.label)[0], project.label_space.local_lookup(test.name), files.label,
                             test.name)
    aspect = axial_aspect(geometry)
    image = to_ras(image, geometry)  # the test images are stored in several orientations
    truth = to_ras(truth, geometry)
    z = int(np.argmax((truth > 0).sum(axis=(0, 1))))
    panels = [("truth", truth)] + [(r["name"], to_ras(read_image(out / r["pred_dir"] / case)[0], geometry))
                                   for r in runs if (out / r["pred_dir"] / case).exists()]
    # the colours of `unionseg evaluate`'s overlays, one per class, with a legend
    space = project.label_space
    colours = leaf_colours(space)
    cols = min(5, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    # 0.35 inch a row above each square image for its title (tight_layout cannot shrink images of fixed aspect)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.95 * rows + 0.5), squeeze=False)
    present: set[int] = set()
    for ax, (title, lab) in zip(axes.ravel(), panels, strict=False):
        ax.imshow(np.clip(axial_view(image, z), -200, 300), cmap="gray", aspect=aspect)
        codes = axial_view(lab, z).astype(np.int64)
        ax.imshow(_rgba(codes, space, colours, 0.55), interpolation="nearest", aspect=aspect)
        present.update(int(c) for c in np.unique(codes) if 0 < c < space.n_leaves)
        ax.set_title(title, fontsize=8)
        mark_sides(ax)
    for ax in axes.ravel():
        ax.axis("off")
    handles = [Patch(color=colours[leaf], label=space.names[leaf]) for leaf in sorted(present)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    fig.savefig(figures / "montage.png", dpi=90)
    plt.close(fig)
    return "figures/montage.png", (f"test case {case.removesuffix('.nii.gz')}, axial slice {z + 1} of {truth.shape[2]}, "
                                   "counted in RAS order, the one with the most labelled voxels")
