"""``unionseg benchmark``: every method on the same data and budget, evaluated once on the test set.

A suite (``configs/suites/<name>.yaml``) names the phantom, the methods, the seeds and ONE budget
(backbone, patch, batch, steps, optimiser) shared by every method and by the shared experts. For each
method and seed the runner trains (checkpoint selection on validation only), predicts the fully labelled
test set with the public predictor, evaluates it with the public evaluation, and records timings and
provenance. A finished method/seed is never retrained (``result.json`` marks it done); experts and pseudo
labels come from the artefact cache. ``results.json`` and ``report.md`` (with figures) are rewritten
from all finished runs after each one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from unionseg.config import from_dict, load_yaml
from unionseg.errors import ConfigError, UnionsegError, UnionsegWarning
from unionseg.jsonfile import write_json
from unionseg.progress import SUITE_AFTER_ENV
from unionseg.stopping import Terminated, exit_code, sigterm_as_interrupt


def uses_experts(method: str) -> bool:
    """Whether a method builds on the shared experts (any shared stage of its: ``experts``, or the pseudo labels
    and teacher probabilities they make): individual, co-training, MS-KD, and any plugin that declares such a
    stage (a list of the three built-in names left a plugin's expert time out of the report and the ETA,
    helper-83; so did a plugin declaring ``pseudo_labels`` alone, helper-122)."""
    from unionseg.artifacts import needs_experts
    from unionseg.methods.base import get_method

    return needs_experts(get_method(method).stages)


@dataclass(frozen=True)
class RunSpec:
    """One row of a suite: a name, the method, and its options (ablations share a method)."""

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteConfig:
    name: str
    phantom_size: str = "tiny"
    phantom_seed: int = 0
    phantom_suite: str = "default"
    phantom_cases: tuple[int, int, int] | None = None  # (train per set, val, test); None: the size's default
    methods: tuple[str, ...] = ("oracle", "naive", "individual", "marginal", "multihead", "conditional",
                                "cotraining", "dodnet", "mskd")
    ablations: tuple[RunSpec, ...] = ()
    seeds: int = 1
    budget: dict[str, Any] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    isolate: bool = False  # each run in its own process (clean peak-memory figures)
    prepare_workers: int = 2
    about: str = ""  # what the suite's figures mean: printed under its table and at the top of its report

    def validate(self) -> None:
        from unionseg.data.phantom import SIZES, SUITES

        if self.seeds < 1:
            raise ValueError(f"seeds: must be >= 1, got {self.seeds}")
        if self.phantom_size not in SIZES:
            raise ValueError(f"phantom_size: {self.phantom_size!r} is not a phantom size ({', '.join(SIZES)})")
        if self.phantom_suite not in SUITES:
            raise ValueError(f"phantom_suite: {self.phantom_suite!r} is not a phantom suite ({', '.join(SUITES)})")
        if self.phantom_cases is not None and min(self.phantom_cases) < 1:
            raise ValueError(f"phantom_cases: (train per set, val, test) must each be >= 1, got "
                             f"{list(self.phantom_cases)}")
        names = [*self.methods, *(r.name for r in self.ablations)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"methods/ablations: the row name {twice[0]!r} is given twice")

    def phantom(self) -> dict[str, Any]:
        """What decides the suite's data: a benchmark folder holds one phantom, and reuses rows only on it."""
        cases = list(self.phantom_cases) if self.phantom_cases is not None else None
        return {"size": self.phantom_size, "seed": self.phantom_seed, "suite": self.phantom_suite, "cases": cases}

    def runs(self, methods: list[str] | None = None) -> list[RunSpec]:
        rows = [RunSpec(m, m, dict(self.options.get(m, {}))) for m in self.methods]
        rows += list(self.ablations)
        if methods:
            unknown = sorted(set(methods) - {r.name for r in rows})
            if unknown:
                raise ConfigError(f"--methods: {unknown[0]!r} is not in suite {self.name!r} "
                                  f"({', '.join(r.name for r in rows)})")
            rows = [r for r in rows if r.name in methods]
        return rows


def suite_path(name: str) -> Path:
    from unionseg.training.recipes import recipe_dir

    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError("suite file not found", path)
        return path
    path = recipe_dir() / "suites" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (recipe_dir() / "suites").glob("*.yaml"))
        raise ConfigError(f"unknown suite {name!r}; known: {', '.join(known)}")
    return path


def load_suite(name: str, _seen: tuple[str, ...] = ()) -> SuiteConfig:
    """A suite from its name or YAML path. ``budget_from: OTHER`` starts from suite OTHER's budget (so an
    ablation suite cannot drift from the comparison it ablates); the suite's own ``budget`` keys override."""
    path = suite_path(name)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping", path)
    known = {f.name for f in fields(SuiteConfig)} | {"budget_from"}
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:  # here, so that the list names budget_from too (from_dict knows the dataclass's fields alone)
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(known))})", path)
    base = raw.pop("budget_from", None)
    if base is not None:
        if not isinstance(base, str) or str(base) in _seen:
            raise ConfigError(f"budget_from: {base!r} must name another suite, without cycles", path)
        try:
            inherited = load_suite(base, (*_seen, name)).budget
        except ConfigError as exc:
            if exc.path is not None:  # the error lies in that suite's own file, which it names
                raise
            raise ConfigError(f"budget_from: {exc.message}", path) from None
        raw["budget"] = {**inherited, **(raw.get("budget") or {})}
    return from_dict(SuiteConfig, raw, source=str(path))


# ---------------------------------------------------------------------- provenance
def code_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info(device: str = "auto") -> dict[str, Any]:
    """What ran a benchmark row, so that its timings can be set against another machine's: the CPU, the
    cores this process may use, torch's threads and version, and the GPU of ``device`` (the run's
    ``device`` setting) when it is one."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the model; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if device != "cpu" and torch.cuda.is_available():
        try:  # the device the run used ("auto" and "cuda" take the current one)
            gpu = torch.cuda.get_device_name(torch.device(device) if device.startswith("cuda:") else None)
        except (RuntimeError, AssertionError, ValueError):  # a record, not a reason to lose the run's result
            gpu = None
    try:
        cores = len(os.sched_getaffinity(0))  # the CPUs this process may use, not the host's
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return {"cpu": cpu, "cpu_count": cores, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": gpu, "platform": platform.platform()}


# ---------------------------------------------------------------------- one run
def resolved_options(spec: RunSpec) -> dict[str, Any]:
    """The options a row's method runs with today: the row's own, defaults filled in."""
    from unionseg.config import from_dict, to_dict
    from unionseg.methods.base import get_method

    return to_dict(from_dict(get_method(spec.method).Options, spec.options or {},
                             source=f"options of {spec.name!r}"))


def option_defaults(spec: RunSpec) -> dict[str, Any]:
    """The defaults of a row's method options."""
    from unionseg.config import to_dict
    from unionseg.methods.base import get_method

    return to_dict(get_method(spec.method).Options())


def _run_config(suite: SuiteConfig, spec: RunSpec, seed: int) -> Any:
    from unionseg.training.config import load_train_config

    return load_train_config(None, [], **{**suite.budget, "method": spec.method, "seed": seed, "options": spec.options})


def finished_result(suite: SuiteConfig, spec: RunSpec, seed: int, out: Path) -> dict[str, Any]:
    """A finished run's ``result.json``, refused when it ran under another budget, other options or other
    method defaults than the suite gives today (its results are kept, never replaced).

    Raises:
        ConfigError: naming the run's ``result.json``.
    """
    from unionseg.config import config_hash, option_changes
    from unionseg.training.trainer import config_changes, read_run_record, same_but_run_settings

    done = out / "runs" / spec.name / f"seed{seed}" / "result.json"
    cfg = _run_config(suite, spec, seed)
    finished: dict[str, Any] = json.loads(done.read_text())
    recorded = finished.get("provenance", {}).get("config_hash")
    if recorded is not None and recorded != config_hash(cfg):
        # the run's own record says what changed; settings that leave the weights alone (the checkpoint
        # interval, the logging, the loader workers) keep the row, as they let a resume go on
        ran, lacks = read_run_record(done.parent / "config.yaml")
        if lacks or not same_but_run_settings(cfg, ran, recorded):
            changed = (config_changes(cfg, ran) if not lacks else "") or \
                f"config hash {recorded}, the suite now gives {config_hash(cfg)}"
            raise ConfigError(f"{spec.name} seed {seed} was run under another budget or options ({changed}); its "
                              "results are kept: benchmark into a new output folder, or move that run folder "
                              "away to redo it", done)
    ran = finished.get("resolved_options")  # absent in results written before options were recorded
    changed = "" if ran is None else option_changes(ran, resolved_options(spec), option_defaults(spec))
    if changed:
        raise ConfigError(f"{spec.name} seed {seed} ran with other method defaults ({changed}); its results "
                          "are kept: benchmark into a new output folder, or move that run folder away to "
                          "redo it", done)
    return finished


def run_one(project_path: Path, suite: SuiteConfig, spec: RunSpec, seed: int, out: Path, progress: bool) -> dict[str, Any]:
    """Train, predict the test set, evaluate; write and return ``result.json`` (skipped when present)."""
    from unionseg.config import config_hash, load_project
    from unionseg.training.trainer import held_run_files, train

    run_dir = out / "runs" / spec.name / f"seed{seed}"
    done = run_dir / "result.json"
    if done.exists():
        return finished_result(suite, spec, seed, out)
    cfg = _run_config(suite, spec, seed)
    commit = code_commit()  # the code at the run's start, not the tree's state when it ends
    t0 = time.perf_counter()
    # a run folder with anything of a run in it (a checkpoint, or only its stages' record) goes on from there
    summary = train(project_path, cfg, run_dir, resume=bool(held_run_files(run_dir)),
                    progress=progress)
    # the shared artefacts (experts, their probabilities, pseudo labels) built inside this run are reported
    # once, as expert_seconds; train_seconds is the method's own wall time, so no row counts them twice
    # (this process's stage time: a resumed run's summary also counts the stages of the process it resumes)
    stage_seconds = float(summary.get("stage_seconds_this_process", summary.get("stage_seconds", 0.0)))
    # a run resumed from an earlier (interrupted) process adds that process's time up to its last checkpoint
    train_seconds = time.perf_counter() - t0 - stage_seconds + float(summary.get("run_seconds_earlier", 0.0))
    project = load_project(project_path)
    test = project.eval_dataset("test")
    if test is None:
        raise ConfigError("the benchmark needs a fully labelled test set (a dataset with role: test)", project_path)
    pred_dir = run_dir / "test_pred"
    predict_seconds, n_params = predict_test_set(run_dir / "model.pt", test, pred_dir, progress, cfg.device)
    from unionseg.data.catalog import LabelMapWarning
    from unionseg.evaluation.evaluate import evaluate_folder

    # what the scans of the test set and its label map say, prepare said once before the first row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnionsegWarning)
        labels = _labels_dir(test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelMapWarning)
        evaluation = evaluate_folder(pred_dir, labels, project, dataset=test.name,
                                     out_dir=run_dir / "evaluation", figures=False,
                                     overwrite=True)  # the run's own folder: a re-run after a crash redoes it
    from unionseg.data.preprocess import PreparedIndex

    result = {
        "name": spec.name, "method": spec.method, "seed": seed, "options": spec.options,
        "resolved_options": summary.get("options", {}),  # defaults filled in: what the method ran
        # each metric's mean over the test cases, how many cases score the class and how many values an
        # empty-mask rule decided (it read the rules' counts as a metric, writing null)
        "per_class": {k: {**{m: stats[m]["mean"] for m in evaluation["metrics"] if m in stats},
                          "n_cases": stats["n_cases"], "empty_rule_cases": stats["empty_rule_cases"]}
                      for k, stats in evaluation["classes"].items()},
        "best_val_mean_dice": summary["best_val_mean_dice"],
        "selected_on": summary.get("selected_on", "all"),
        "train_seconds": train_seconds,
        "stage_seconds": stage_seconds,  # wall time spent building shared artefacts in this run
        "expert_seconds": summary.get("expert_seconds", 0.0) if uses_experts(spec.method) else 0.0,
        "predict_seconds_per_case": predict_seconds,
        "parameters": n_params,
        "data_wait_share": summary.get("data_wait_share"),
        "peak_rss_mb": _peak_rss_mb() if suite.isolate else None,
        "peak_gpu_mb": _peak_gpu_mb() if suite.isolate else None,
        "provenance": {"code_commit": commit, "config_hash": config_hash(cfg), "seed": seed,
                       "machine": machine_info(cfg.device),
                       "data_fingerprint": PreparedIndex.load(project).fingerprint,
                       "generator_version": project.raw.get("generator_version")},
        "pred_dir": str(pred_dir.relative_to(out)),
    }
    write_json(done, result)
    return result


def _labels_dir(spec: Any) -> Path:
    """The folder of the test set's label files, one ``<case id>`` file per case (as ``evaluate`` reads it).

    Raises:
        ConfigError: a layout that keeps them otherwise (KiTS: a folder per case).
    """
    from unionseg.data.catalog import scan_dataset
    from unionseg.data.io import suffix_of
    from unionseg.evaluation.evaluate import _label_files

    cases = scan_dataset(spec.name, spec.root, spec.layout).cases
    folders = {c.label.parent for c in cases if c.label is not None}
    named = all(c.label is not None and c.label.name == f"{c.case_id}{suffix_of(c.label)}" for c in cases)
    if len(folders) != 1 or not named:
        raise ConfigError(f"test set {spec.name!r}: the benchmark scores a folder of label files named by case "
                          "(the msd, nnunet and folders layouts), which this layout does not have; score its "
                          "predictions with `unionseg evaluate` per case folder instead", spec.root)
    folder = folders.pop()
    # evaluate scores every label file of the folder: one of no case (not in dataset.json, its image missing)
    # would fail every row after its training, for want of a prediction
    stray = sorted(set(_label_files(folder)) - {c.case_id for c in cases})
    if stray:
        raise ConfigError(f"test set {spec.name!r}: its label folder holds {len(stray)} file(s) of no case of the "
                          f"dataset ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}; a case needs its image "
                          "and, in the msd layout, its entry in dataset.json); evaluate would score them without a "
                          "prediction: move them out", folder)
    return folder


def _own_project(project: Path, rows: Sequence[RunSpec], roots: Mapping[str, str | Path] | None = None) -> Path:
    """``project`` resolved, checked (with the ``--root`` overrides ``roots``) before the benchmark folder is
    touched.

    Raises:
        ConfigError: the project cannot be read; it has no test set (``role: test``) or keeps the test set's
            label files other than one per case in one folder (evaluate reads the layouts ``msd``, ``nnunet``
            and ``folders``); a row it cannot train: the oracle learns from the training sets' full labels
            (``oracle_labels``), which only the phantom gives.
    """
    from unionseg.config import load_project
    from unionseg.reports import project_summary

    path = project.resolve()
    loaded = load_project(path, roots=roots)
    with warnings.catch_warnings():  # said once, by the preparation that follows
        warnings.simplefilter("ignore")
        # what `unionseg info` checks (label maps, dataset folders, splits), naming this file
        project_summary(path, {k: str(v) for k, v in (roots or {}).items()})
    test = loaded.eval_dataset("test")
    if test is None:
        raise ConfigError("the benchmark scores every method on the project's test set: declare one (a fully "
                          "labelled dataset with role: test, docs/datasets.md)", path)
    _labels_dir(test)
    lacking = [d.name for d in loaded.train_datasets if d.oracle_labels is None]
    oracles = [r.name for r in rows if r.method == "oracle"]
    if oracles and lacking:
        raise ConfigError(f"row {oracles[0]!r} trains on full labels of every training set (oracle_labels), which "
                          f"datasets {', '.join(lacking)} do not have: leave it out (--methods naming the others); "
                          "the report then gives no gap closure", path)
    return path


def predict_test_set(model_path: Path, test: Any, pred_dir: Path, progress: bool,
                     device: str = "auto") -> tuple[float, int]:
    """Predict every test image with the public predictor on ``device`` (the budget's: a ``cpu`` budget on a
    GPU machine timed the GPU, and recorded no GPU); returns (seconds per case, parameter count)."""
    from unionseg.data.catalog import scan_dataset
    from unionseg.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(model_path, device=device)
    with warnings.catch_warnings():  # the scan's warnings: said by prepare, before the first row
        warnings.simplefilter("ignore", UnionsegWarning)
        cases = scan_dataset(test.name, test.root, test.layout).cases
    t0 = time.perf_counter()
    for case in cases:
        # the run's own folder: a prediction an interrupted attempt left there is replaced
        predictor.predict_file(case.image, pred_dir / f"{case.case_id}.nii.gz", overwrite=True)
    n_params = sum(p.numel() for p in predictor.model.parameters())
    return (time.perf_counter() - t0) / max(1, len(cases)), int(n_params)


def _peak_gpu_mb() -> float | None:
    """The run process's peak GPU memory held by tensors (PyTorch's allocator; the largest over its GPUs),
    or None where it used no GPU."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20


def _peak_rss_mb() -> float:
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024.0


# ---------------------------------------------------------------------- the suite
def ensure_phantom(suite: SuiteConfig, out: Path, progress: bool = False) -> Path:
    """Generate (or reuse) the suite's phantom in ``out/data``; returns its project file."""
    from unionseg.data.phantom import generate_phantom

    data = out / "data"
    project_path = data / "project.yaml"
    if not project_path.exists():
        generate_phantom(data, size=suite.phantom_size, seed=suite.phantom_seed, suite=suite.phantom_suite,
                         cases=suite.phantom_cases, progress=progress)
    return project_path


def ensure_data(suite: SuiteConfig, out: Path, progress: bool) -> Path:
    """Generate (or reuse) the phantom and prepare it once."""
    from unionseg.config import load_project
    from unionseg.data.preprocess import prepare_project

    project_path = ensure_phantom(suite, out, progress)
    prepare_project(load_project(project_path), workers=suite.prepare_workers, progress=progress)
    return project_path


def ensure_project(project: str | Path, out: Path, progress: bool, workers: int = 2,
                   roots: Mapping[str, str | Path] | None = None) -> Path:
    """A benchmark of a project of your own: ``out/data/project.yaml`` is a copy of ``project`` whose
    dataset roots point at its datasets, relative to the copy (nothing is copied but the file; a ``roots_file``
    and ``cache_dir`` are resolved into it, and so are the ``--root`` overrides ``roots``), prepared into
    ``out/data/prepared`` (the project's own cache, and the shared experts of your own trainings in it, are left
    alone). Rewritten when the project file changed;
    a finished row scored on other data is refused (:func:`check_same_data`).

    The project was checked first (:func:`_own_project`: its datasets, a test set, a layout evaluate reads).
    """
    from unionseg.config import load_project, yaml_text
    from unionseg.data.preprocess import prepare_project
    from unionseg.jsonfile import write_text

    source = load_project(project, roots=roots)
    data = out / "data"
    raw = {k: v for k, v in source.raw.items() if k not in ("roots_file", "cache_dir")}
    raw.setdefault("name", source.name)  # a project without one is named after its file, not after the copy's
    # relative to the copy, as project files give them (an absolute root is refused as not portable)
    relative = {d.name: Path(os.path.relpath(Path(d.root).resolve(), data)).as_posix() for d in source.datasets}
    raw["datasets"] = [{**entry, "root": relative[entry["name"]]} for entry in source.raw["datasets"]]
    raw["notes"] = f"benchmark copy of {source.path} (unionseg benchmark --project); edit that file, not this one"
    path = data / "project.yaml"
    text = yaml_text(raw)  # the project loader's own dumper: a text such as "1e3" stays a text
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        data.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    prepare_project(load_project(path), workers=workers, progress=progress)
    return path


def check_same_data(project_path: Path, out: Path) -> None:
    """Refuse when a finished row of a benchmark of one's own project was scored on other data than the
    project gives now (its files or its preprocessing changed): the report would set rows of two datasets
    side by side.

    Raises:
        ConfigError: naming the row's ``result.json``.
    """
    from unionseg.config import load_project
    from unionseg.data.preprocess import PreparedIndex

    now = PreparedIndex.load(load_project(project_path)).fingerprint
    for done in sorted((out / "runs").glob("*/seed*/result.json")):
        try:
            was = json.loads(done.read_text(encoding="utf-8")).get("provenance", {}).get("data_fingerprint")
        except (OSError, ValueError, AttributeError):
            continue  # finished_result says what is wrong with it
        if was is not None and was != now:
            raise ConfigError(f"{done.parent.parent.name} seed {done.parent.name.removeprefix('seed')} was scored on "
                              f"other data (fingerprint {was}; the project now gives {now}): the project or its "
                              "files changed since; its results are kept: benchmark into a new output folder, or "
                              "move that run folder away to redo it", done)


MARKER = "benchmark.json"


def read_marker(out: Path) -> dict[str, Any] | None:
    """What ``out``'s :data:`MARKER` records (``{"phantom": ...}`` or ``{"project": PATH}``); None without one.

    Raises:
        UnionsegError: an unreadable marker, naming the folder.
    """
    marker = Path(out) / MARKER
    if not marker.is_file():
        return None
    try:
        mark = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        mark = None
    if not isinstance(mark, dict):
        raise UnionsegError(f"unreadable {MARKER}; benchmark into a new folder", out)
    return mark


def check_out(out: Path, suite: SuiteConfig, project: Path | None = None) -> None:
    """Refuse a benchmark folder that is a file, holds files that are not a benchmark's (the report would
    replace them), or holds the benchmark of another phantom or project (its data and finished rows would be
    reused for this suite); mark a new or earlier (unmarked) benchmark folder with this suite's phantom, or
    with ``project`` (resolved) for a benchmark of a project of your own.

    Raises:
        UnionsegError: naming the folder and the problem; nothing is written.
    """
    if out.exists() and not out.is_dir():
        raise UnionsegError("exists and is not a folder; give a folder for the benchmark's data, runs and report",
                            out)
    marker = out / MARKER
    mark = read_marker(out)
    if mark is not None:
        recorded, recorded_project = mark.get("phantom"), mark.get("project")
        if recorded_project is not None or project is not None:
            if recorded_project == (None if project is None else str(project)):
                return
            if recorded_project is not None and project is not None and not any((out / "runs").glob("*/*")):
                # no run yet (the first attempt stopped at the project's data): the folder goes to this project
                write_json(marker, {"project": str(project)}, indent=1)
                return
            held = f"project {recorded_project}" if recorded_project else "phantom"
            asked = f"project {project}" if project is not None else f"phantom of suite {suite.name!r}"
            raise UnionsegError(f"holds the benchmark of the {held}, not of the {asked}: its data and finished "
                                "rows are not this benchmark's; benchmark into a new folder", out)
        if recorded != suite.phantom():
            raise UnionsegError(f"holds the benchmark of another phantom ({recorded}; suite {suite.name!r} asks for "
                                f"{suite.phantom()}): its data and finished rows are not this suite's; benchmark "
                                "into a new folder", out)
        return
    if out.is_dir() and any(out.iterdir()):
        if project is not None:
            raise UnionsegError(f"folder is not empty and holds no benchmark ({MARKER}); the report would replace "
                                "its files: choose an empty or new folder", out)
        generator = out / "data" / "generator.json"
        if not generator.is_file():
            raise UnionsegError(f"folder is not empty and holds no benchmark ({MARKER} or data/generator.json); the "
                                "report would replace its files: choose an empty or new folder", out)
        try:  # a benchmark folder from before the marker: its phantom must be this suite's
            gen = json.loads(generator.read_text(encoding="utf-8"))
            same = (gen.get("seed"), gen.get("size"), gen.get("suite")) == (
                suite.phantom_seed, suite.phantom_size, suite.phantom_suite)
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            raise UnionsegError(f"holds the data of another phantom (data/generator.json) than suite {suite.name!r} "
                                "asks for: benchmark into a new folder", out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"phantom": suite.phantom()} if project is None else {"project": str(project)}, indent=1)


def check_rows(suite: SuiteConfig, rows: list[RunSpec], path: Path) -> None:
    """Build every row's training configuration and options now, so that a typo in the suite's budget or a
    row's options is refused at once, naming the suite file, rather than when that row starts (hours into
    a ``standard`` suite).

    Raises:
        ConfigError: naming the suite file, the row and the problem.
    """
    import os

    from unionseg.methods.base import get_method, plugin_env
    from unionseg.training.config import load_train_config
    from unionseg.training.trainer import check_sizes

    try:
        check_sizes(load_train_config(None, [], **suite.budget))
    except ConfigError as exc:
        raise ConfigError(f"budget: {exc.message}", path) from None
    for name in suite.options:  # options of a method the suite does not run would be dropped silently
        if name not in suite.methods:
            raise ConfigError(f"options.{name}: no row of this suite is named {name!r} (rows: "
                              f"{', '.join(sorted(suite.methods))})", path)
    for row in rows:
        try:
            get_method(row.method)
            if suite.isolate:  # a method of the calling script itself is refused here, not when its row starts
                plugin_env(dict(os.environ), row.method)
            resolved_options(row)
            load_train_config(None, [], **{**suite.budget, "method": row.method, "options": row.options})
        except ConfigError as exc:
            raise ConfigError(f"row {row.name!r} (method {row.method!r}): {exc.message}", path) from None


def run_benchmark(suite_name: str, out: str | Path, methods: Sequence[str] | str | None = None,
                  seeds: int | None = None, progress: bool = True,
                  project: str | Path | None = None,
                  roots: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """Run (or resume) a suite into ``out``; returns the aggregated results (also ``results.json``).

    The report covers every finished row and seed of the suite in ``out``, not only the rows this call ran:
    ``--methods`` and ``--seeds`` add rows and seeds to a report, never shrink it. ``results.json`` is
    rewritten after every finished row; ``report.md`` at the end, and when the suite stops early (Ctrl-C,
    SIGTERM, a failing row) for the rows finished so far.

    Args:
        suite_name: a built-in suite (``unionseg benchmark --help`` lists them: ``ci``, ``standard``,
            ``ablations``, ``large`` and their variants) or the path of a suite YAML file of your own
            (docs/extending.md).
        out: the benchmark folder: made, or an earlier benchmark of the same phantom to resume.
        methods: the rows to train (names of the suite's rows: a list, or one string as ``--methods`` takes
            them, ``"naive,dodnet"``); None: every row.
        seeds: how many seeds (0 .. seeds-1); None: the suite's own number.
        progress: progress bars and the per-row lines with the suite's ETA.
        project: a project file of your own, trained and scored on its test set (``role: test``) in place of
            the suite's phantom, under the suite's budget (:func:`ensure_project`). The ``oracle`` row needs
            full labels of the training sets (``oracle_labels``), which real datasets lack: leave it out
            (``methods``); gap closures are then not computed.
        roots: with ``project``, ``dataset name -> folder`` overrides of its roots (``--root NAME=DIR``), as
            ``unionseg train`` takes them; the benchmark's copy of the project keeps them.

    Returns:
        What ``results.json`` holds: per row and seed the scores, times and provenance, and the means.

    Raises:
        ConfigError: an unknown suite or row, a bad budget or row option (naming the suite file), a seed
            count below 1, a method the calling script defines in a suite with ``isolate: true``; with
            ``project``: a project without a test set (or with a test label folder evaluate cannot score), an
            ``oracle`` row without full labels, a finished row scored on data that changed since; ``roots``
            without ``project`` or naming a dataset the project lacks.
        UnionsegError: ``out`` holds user files or another phantom's or project's benchmark; a row that fails.
    """
    from rich.console import Console

    from unionseg.report import aggregate, write_report, write_results

    console = Console(stderr=True)
    suite = load_suite(suite_name)
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if isinstance(methods, str):  # one name was split into its letters ('a' is not in suite ...; helper-106)
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if methods is not None and not methods:  # as --methods "": an unset variable must not run every row
        raise ConfigError("--methods names no row; leave it out to run every row of the suite")
    rows = suite.runs(list(methods) if methods is not None else None)  # an unknown row is refused before any data
    check_rows(suite, rows, suite_path(suite_name))
    if roots and project is None:
        raise ConfigError(f"--root {next(iter(roots))}=... moves a dataset of a project of your own (--project); "
                          "the suite's phantom is generated in the benchmark folder")
    out = Path(out).resolve()
    own = None if project is None else _own_project(Path(project), rows, roots)
    check_out(out, suite, own)
    project_path = (ensure_data(suite, out, progress) if own is None
                    else ensure_project(own, out, progress, suite.prepare_workers, roots))
    if own is not None:
        check_same_data(project_path, out)
        # the suite's about text speaks of its phantom: the table and the report say whose data these are
        suite = dataclasses.replace(suite, about=(
            f"Data: the project {own} (`unionseg benchmark --project`), trained under the budget of suite "
            f"{suite.name!r} and scored on its test set; data/project.yaml is the copy the runs read, prepared in "
            "data/prepared."))
    n_seeds = seeds if seeds is not None else suite.seeds
    plan = [(row, seed) for seed in range(n_seeds) for row in rows]
    done = [(out / "runs" / row.name / f"seed{seed}" / "result.json").exists() for row, seed in plan]
    # every finished row of the suite is checked before anything trains, those outside this call's plan too:
    # the report lists them under this suite's budget (a row of another budget came in silently; helper-97)
    for row in suite.runs():
        for seed in finished_seeds(out, row.name):
            finished_result(suite, row, seed, out)
    trained: list[float] = []  # wall seconds of the runs trained by this call, shared stages left out
    # seeds whose shared experts a finished row built (or reused); a later row of another seed builds its own
    experts = {row.method: uses_experts(row.method) for row, _ in plan}  # looked up once per method
    built = {seed for (row, seed), d in zip(plan, done, strict=True) if d and experts[row.method]}
    n_experts = _count_experts(project_path)
    aggregated: dict[str, Any] | None = None
    results: list[dict[str, Any]] = []
    try:
        for i, (row, seed) in enumerate(plan):
            recorded = [float(r.get("train_seconds") or 0) for r in results]
            to_build = {s for (r, s), d in zip(plan[i:], done[i:], strict=True)
                        if not d and experts[r.method]} - built
            eta = suite_eta(sum(not d for d in done[i:]), trained, recorded, len(to_build), _stage_seconds(results),
                            n_experts)
            resumed = None if done[i] else _resumed_at(out / "runs" / row.name / f"seed{seed}")
            state = " (done, reused)" if done[i] else "" if resumed is None else f" (resuming: {resumed})"
            if progress:  # --quiet: no progress at all (these lines were printed anyway)
                console.print(f"[bold][{i + 1}/{len(plan)}][/bold] {row.name} seed {seed}{state}"
                              f"{', suite ETA ' + eta if eta else ''}")
            # the rows after this one, for the suite's ETA in this row's training lines
            later = to_build - ({seed} if not done[i] and experts[row.method] else set())
            after = suite_seconds(sum(not d for d in done[i + 1:]), trained, recorded, len(later),
                                  _stage_seconds(results), n_experts)
            started = time.perf_counter()
            with _suite_after(None if done[i] or after is None else after[0]):
                if suite.isolate and not done[i]:
                    _run_isolated(project_path, suite_name, row.name, seed, out, row.method, progress)
                results.append(run_one(project_path, suite, row, seed, out, progress))
            if not done[i] and resumed is None:  # a resumed run's time is part of a run: no mean of whole runs
                trained.append(max(0.0, time.perf_counter() - started - float(results[-1].get("stage_seconds") or 0)))
            if experts[row.method]:
                built.add(seed)
            # after every run: an interrupted suite keeps its numbers
            aggregated = aggregate(_with_finished(results, plan, suite, out), suite)
            write_results(aggregated, out)
    except BaseException:  # Ctrl-C, SIGTERM, a failed row: the report of the rows finished so far
        if aggregated is not None:
            try:
                write_report(aggregated, out)
            except KeyboardInterrupt:  # stopped again while writing: the first stop (its exit status) stands
                console.print(f"note: the report was not written (stopped again while writing it); "
                              f"{out / 'results.json'} holds the finished rows")
            except Exception as exc:  # noqa: BLE001 - the stop (or the row's error) is what the user must see
                console.print(f"note: the report of the finished rows could not be written ({exc})")
        raise
    if aggregated is None:  # nothing in the plan: the report of the rows already finished
        aggregated = aggregate(_with_finished(results, plan, suite, out), suite)
    write_report(aggregated, out)
    return aggregated


def _resumed_at(run_dir: Path) -> str | None:
    """How far an unfinished run folder got (``step N of its checkpoint``, ``its shared stages``), or None
    when it holds no run yet: what the progress line says a row resumes from."""
    from unionseg.training.checkpoint import checkpoint_step

    if (run_dir / "last.pt").is_file():
        step = checkpoint_step(run_dir / "last.pt")
        return "its checkpoint" if step is None else f"step {step}"
    if (run_dir / "stages.json").is_file() or (run_dir / "config.yaml").is_file():
        return "its shared stages"
    return None


def finished_seeds(out: Path, name: str) -> list[int]:
    """The seeds of row ``name`` that have a ``result.json`` in the benchmark folder ``out``, in order."""
    seeds = [done.parent.name[len("seed"):] for done in (out / "runs" / name).glob("seed*/result.json")]
    return sorted(int(s) for s in seeds if s.isdigit())


def _with_finished(results: list[dict[str, Any]], plan: list[tuple[RunSpec, int]], suite: SuiteConfig,
                   out: Path) -> list[dict[str, Any]]:
    """``results`` (of this call's ``plan``) plus the finished rows of the suite outside the plan, every seed
    of them found in ``out`` (a call with fewer ``--seeds`` than an earlier one dropped the others silently)."""
    ran = {(r.get("name"), r.get("seed")) for r in results}  # a stopped call has not reached all of its plan
    extra = []
    for row in suite.runs():
        for seed in finished_seeds(out, row.name):
            if (row.name, seed) not in ran:
                done = out / "runs" / row.name / f"seed{seed}" / "result.json"
                extra.append(json.loads(done.read_text(encoding="utf-8")))
    # in the suite's row order, whichever rows this call ran (they came first: `--methods naive` after a
    # run of the whole suite put naive above the oracle)
    order = {row.name: i for i, row in enumerate(suite.runs())}
    return sorted([*results, *extra], key=lambda r: (order.get(r.get("name"), len(order)), r.get("seed", 0)))


def suite_eta(to_train: int, trained: list[float], recorded: list[float], stages: int = 0,
              stage_seconds: float | None = None, stage_runs: int = 0) -> str:
    """The suite's remaining time, for the progress line; ``""`` when there is nothing to go on.

    Runs already done are reused in seconds, so they must not count as progress: the estimate is the number
    of runs still to train (``to_train``, the current one included) times the mean wall time of the runs this
    call trained (``trained``: training, prediction and evaluation, shared stages left out), or, before the
    first of them ends, the mean recorded training time of the reused runs (``recorded``, marked ``~``: it
    leaves out prediction, and the next rows may be other methods). Then, for each of ``stages`` seeds whose
    shared experts a later row must build first, one build: ``stage_seconds`` as measured on an earlier
    seed, else ``stage_runs`` (the number of experts) run times, since an expert trains under the same budget.
    """
    left = suite_seconds(to_train, trained, recorded, stages, stage_seconds, stage_runs)
    if left is None:
        return ""
    seconds, measured = left
    return ("" if measured else "~") + _duration(seconds)


def suite_seconds(to_train: int, trained: list[float], recorded: list[float], stages: int = 0,
                  stage_seconds: float | None = None, stage_runs: int = 0) -> tuple[float, bool] | None:
    """:func:`suite_eta`'s estimate in seconds, and whether it rests on runs this call trained (else on the
    recorded training times of reused runs); None when there is nothing to go on."""
    if to_train == 0:
        return 0.0, True
    if trained:
        per_run, measured = sum(trained) / len(trained), True
    else:
        recorded = [s for s in recorded if s and s > 0]
        if not recorded:
            return None
        per_run, measured = sum(recorded) / len(recorded), False
    build = stage_seconds if stage_seconds is not None else stage_runs * per_run
    return to_train * per_run + stages * build, measured


@contextlib.contextmanager
def _suite_after(seconds: float | None) -> Iterator[None]:
    """The suite's estimated time after the current row, for the row's training bar and lines to add to
    their own ETA (:data:`SUITE_AFTER_ENV`, read where the bar is made): the suite's ETA was said at each
    row's start only (helper-97). An isolated row's process inherits it with the environment."""
    saved = os.environ.get(SUITE_AFTER_ENV)
    if seconds is not None:
        os.environ[SUITE_AFTER_ENV] = f"{seconds:.0f}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(SUITE_AFTER_ENV, None)
        else:
            os.environ[SUITE_AFTER_ENV] = saved


def _stage_seconds(results: list[dict[str, Any]]) -> float | None:
    """The measured time of one seed's shared stages (experts, their maps, pseudo labels), if a run has one."""
    times = [float(r.get("stage_seconds") or 0) for r in results]
    times = [t for t in times if t > 0] or [float(r.get("expert_seconds") or 0) for r in results
                                            if float(r.get("expert_seconds") or 0) > 0]
    return max(times) if times else None


def _count_experts(project_path: Path) -> int:
    """How many shared experts a seed trains (one per training dataset); 0 when the project cannot be read."""
    from unionseg.config import load_project

    try:
        return len(load_project(project_path).train_datasets)
    except (UnionsegError, OSError):
        return 0


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _run_isolated(project_path: Path, suite_name: str, name: str, seed: int, out: Path, method: str,
                  progress: bool = False) -> None:
    """Train and score one row in a process of its own, with its training bar and lines (and the suite's ETA
    after the row, which it inherits in :data:`SUITE_AFTER_ENV`) when ``progress``: the suites that isolate
    their rows (``standard``, ``ablations``) said nothing for the minutes of each row (helper-97's note)."""
    from unionseg.methods.base import plugin_env

    cmd = [sys.executable, "-m", "unionseg.benchmark", suite_name, str(out), name, str(seed),
           "progress" if progress else "quiet"]
    env = plugin_env(dict(os.environ), method)  # a plugin imported by the calling script: the run imports it too
    proc = subprocess.Popen(cmd, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt as exc:
        _stop_run(proc, terminated=isinstance(exc, Terminated))
        raise
    if code != 0:
        folder = out / "runs" / name / f"seed{seed}"
        raise ConfigError(f"benchmark run {name} seed {seed} failed (exit {code}); its own error is above"
                          + ("; its run folder holds what it wrote" if folder.is_dir() else ""),
                          folder if folder.is_dir() else out)


def _stop_run(proc: subprocess.Popen[bytes], terminated: bool = False) -> None:
    """Ctrl-C (or SIGTERM: ``terminated``) while a run trains in its own process: let it finish its step and
    write its checkpoint (``subprocess.run`` would kill it a quarter of a second later; left alone after a
    SIGTERM to this process, it trained on with nobody waiting). The signal is forwarded, for a signal sent
    to this process alone (from a terminal the run got it too, and takes the two as one request); a second
    one stops the run at once, a third kills it."""
    import signal

    sig = signal.SIGTERM if terminated else signal.SIGINT
    stops = [lambda: proc.send_signal(sig)] * (2 if os.name == "posix" else 0) + [proc.kill]
    for stop in stops:
        stop()
        try:
            proc.wait()
            return
        except KeyboardInterrupt:
            continue
    proc.wait()


def _isolated_main(argv: list[str]) -> None:
    suite_name, out, name, seed, shown = argv
    suite = load_suite(suite_name)
    spec = next(r for r in suite.runs() if r.name == name)
    run_one(Path(out) / "data" / "project.yaml", suite, spec, int(seed), Path(out), progress=shown == "progress")


def _built_in_suites() -> str:
    from unionseg.training.recipes import recipe_dir

    return ", ".join(sorted(p.stem for p in (recipe_dir() / "suites").glob("*.yaml")))


def register(app: typer.Typer) -> None:
    @app.command()
    def benchmark(
        out: Annotated[Path, typer.Option("--out", "-o", "--output", help="Benchmark folder (resumable; one folder per suite's phantom).")] = Path("bench_out"),
        suite: Annotated[str, typer.Option("--suite", help=f"A built-in suite ({_built_in_suites()}) or a suite YAML.")] = "ci",
        methods: Annotated[Optional[list[str]], typer.Option("--methods", metavar="ROW[,ROW...]", help="Train only these rows: `--methods oracle,naive` or the flag repeated (the report still lists every finished row of the suite in -o).")] = None,
        seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Number of seeds (default: the suite's; the report keeps seeds finished earlier).")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.", metavar="")] = False,
        project: Annotated[Optional[Path], typer.Option("--project", "-p", help="A project file of your own (with a role: test set) in place of the suite's phantom, under the suite's budget; leave the oracle row out unless the training sets have full labels (e.g. --methods naive,marginal,cotraining,dodnet,mskd).")] = None,
        root: Annotated[Optional[list[str]], typer.Option("--root", help="With --project: dataset root override NAME=DIR (repeatable).", metavar="NAME=DIR")] = None,
    ) -> None:
        """Train every method of a suite under one budget, evaluate the test set once, write the report.

        Suites: `ci` (every method end to end in about 90 s, scores near 0 by design), `standard` (the methods compared on 2 CPU cores, under 90 minutes a seed), `ablations`, `large` (the GPU recipe). A finished method and seed is reused when the command runs again.
        """  # noqa: E501 - one line per paragraph: the help keeps a docstring's line breaks
        from unionseg.cli import _parse_roots
        from unionseg.report import print_table

        # `--methods "$ROWS"` with ROWS unset names no row: run_benchmark refuses it (not the whole suite)
        rows = None if methods is None else [n.strip() for given in methods for n in given.split(",") if n.strip()]
        results = run_benchmark(suite, out, rows, seeds, progress=not quiet, project=project,
                                roots=_parse_roots(root))
        print_table(results)
        typer.echo(f"report: {Path(out).resolve() / 'report.md'}")

    @app.command()
    def demo(
        out: Annotated[Optional[Path], typer.Argument(help="Folder for the demo's data, runs and report (or -o OUT).",
                                                      show_default="demo_out")] = None,
        out_option: Annotated[Optional[Path], typer.Option("--out", "-o", "--output", help="The folder, as OUT.",
                                                           metavar="OUT")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.", metavar="")] = False,
    ) -> None:
        """Show the whole pipeline on built-in synthetic CT: phantom -> prepare -> every method trained, predicted and evaluated (the `ci` suite) -> table and report.

        It writes into OUT (default ./demo_out) and takes a minute or two on a laptop CPU. Its networks train for 8 steps, so their Dice is near 0 by design: the demo shows that every stage runs; `unionseg benchmark --suite standard` compares the methods.
        """  # noqa: E501 - one line per paragraph: the help keeps a docstring's line breaks
        from unionseg.cli import one_out
        from unionseg.data.phantom import difficulty_report
        from unionseg.report import print_table
        from unionseg.reports import print_project_info

        out = one_out(out, out_option, default=Path("demo_out"))
        suite = load_suite("ci")
        check_out(out.resolve(), suite)
        project_path = ensure_phantom(suite, out.resolve(), not quiet)
        difficulty_report(project_path.parent)
        typer.echo(f"phantom: {project_path} (difficulty certificate: {project_path.parent / 'certificate.json'})")
        print_project_info(project_path)
        results = run_benchmark("ci", out, progress=not quiet)  # prepares the phantom, then trains every row
        print_table(results)
        typer.echo(f"report: {out.resolve() / 'report.md'}")


if __name__ == "__main__":
    try:
        with sigterm_as_interrupt():
            _isolated_main(sys.argv[1:])
    except KeyboardInterrupt as exc:  # the trainer said where the run stopped; the benchmark says "interrupted"
        sys.exit(exit_code(exc))
