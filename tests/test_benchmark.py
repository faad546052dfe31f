"""The `ci` benchmark suite end to end: every method, one budget, and every number traceable to evaluation."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unionseg.benchmark import load_suite, suite_eta
from unionseg.config import load_project
from unionseg.data.io import read_image
from unionseg.jsonfile import plain
from unionseg.labels import REGION_PREFIX


def test_suites_load_and_share_one_budget() -> None:
    for name in ("ci", "standard", "ablations", "large"):
        suite = load_suite(name)
        assert suite.budget["steps"] > 0
        assert {r.method for r in suite.runs()} >= {"oracle", "naive"}
    ablations = {r.name: r for r in load_suite("ablations").runs()}
    assert ablations["cotraining_selftrain"].options == {"w_s": 0.0}
    assert load_suite("ablations").budget == load_suite("standard").budget  # budget_from: standard
    twice = load_suite("standard_2s")  # the convergence check: the oracle at 2S, all else equal
    assert twice.budget == {**load_suite("standard").budget, "steps": 2 * load_suite("standard").budget["steps"]}
    four = load_suite("standard_4s")  # with standard_2s: the convergence check of a 2S budget
    assert four.budget == {**twice.budget, "steps": 2 * twice.budget["steps"]}
    probe = load_suite("ablations_2s")  # DoDNet and marginal at twice the steps, beside the oracle at 2S
    assert probe.budget == twice.budget
    assert {r.name for r in probe.runs()} == {"oracle", "naive", "marginal", "dodnet_linear_head"}
    assert probe.runs(["dodnet_linear_head"])[0].options == ablations["dodnet_linear_head"].options


def test_budget_from_overrides_and_refuses_cycles(tmp_path: Path) -> None:
    from unionseg.errors import ConfigError

    child = tmp_path / "child.yaml"
    child.write_text("name: child\nbudget_from: standard\nbudget: {steps: 7}\n")
    budget = load_suite(str(child)).budget
    assert budget["steps"] == 7 and budget["data"] == load_suite("standard").budget["data"]
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"name: loop\nbudget_from: {loop}\n")
    with pytest.raises(ConfigError, match="without cycles"):
        load_suite(str(loop))


def test_suite_eta_counts_only_runs_still_to_train() -> None:
    # reused runs take no time: two quick reuses must not make four runs to train look like seconds
    assert suite_eta(4, [], [0.0, 0.0]) == ""
    assert suite_eta(4, [], [200.0, 240.0]) == "~15 min"   # before a run of this call ends: recorded times
    assert suite_eta(2, [30.0, 50.0], [200.0, 240.0]) == "80 s"  # then this call's own wall times
    assert suite_eta(3, [3000.0], []) == "2.5 h"
    assert suite_eta(0, [30.0], []) == "0 s"
    # a seed whose shared experts are still to be built: one build each, measured or as many runs as experts
    assert suite_eta(2, [60.0], [], stages=1, stage_seconds=600.0) == "12 min"
    assert suite_eta(2, [60.0], [], stages=2, stage_runs=4) == "10 min"  # 2 runs + 2 x 4 expert runs
    assert suite_eta(2, [], [60.0], stages=1, stage_runs=4) == "~6 min"


def test_a_rows_training_bar_gives_the_suites_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's ETA was said at each row's start only: a 20-minute row's lines gave its own ETA alone
    (helper-97). The benchmark hands the row the suite's time after it (an environment variable), which its
    training bar adds to its own remaining steps, timed from the first step it shows (a loader's start or a
    pending validation before it would skew the rate; helper-104)."""
    import time

    from unionseg.benchmark import _suite_after, suite_seconds
    from unionseg.progress import SUITE_AFTER_ENV, suite_after
    from unionseg.training import trainer

    assert suite_seconds(3, [60.0], []) == (180.0, True) and suite_seconds(2, [], [60.0]) == (120.0, False)
    assert suite_seconds(4, [], []) is None
    monkeypatch.delenv(SUITE_AFTER_ENV, raising=False)
    with _suite_after(600.0):
        assert suite_after() == 600.0
    assert suite_after() is None and SUITE_AFTER_ENV not in os.environ  # restored
    monkeypatch.setenv(SUITE_AFTER_ENV, "soon")
    assert suite_after() is None  # not a number: nothing claimed
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    bar = trainer._Progress(100, 0, "naive", enabled=True, suite_after=600.0)
    now[0] = 400.0  # a slow start (the loader, a pending validation): not in the rate
    bar.update(1, {"loss": 1.0})
    assert bar.progress.tasks[bar.task].fields["suite"] == ""
    now[0] = 410.0
    bar.update(11, {"loss": 1.0})  # 1 s a step: 89 s left in the row, then 600 s
    assert bar.progress.tasks[bar.task].fields["suite"] == "suite ETA 0:11:29"
    bar.close()
    plain = trainer._Progress(100, 0, "expert", enabled=True)  # outside a benchmark: no such field
    plain.update(10, {"loss": 1.0})
    assert "suite" not in plain.progress.tasks[plain.task].fields
    plain.close()


def test_suite_progress_eta_ignores_reused_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The progress lines of run_benchmark: two reused rows, then two to train. Before the first trained
    row ends, the ETA comes from the reused rows' recorded training time, never from how fast they were
    reused (which made a suite with minutes of training left read "ETA 0 s")."""
    from dataclasses import replace

    import unionseg.benchmark as bench
    import unionseg.report as report

    suite = replace(load_suite("ci"), isolate=False)
    rows = suite.runs(["oracle", "naive", "marginal", "multihead"])
    for row in rows[:2]:
        (tmp_path / "runs" / row.name / "seed0").mkdir(parents=True)
        (tmp_path / "runs" / row.name / "seed0" / "result.json").write_text("{}")
    (tmp_path / "benchmark.json").write_text(json.dumps({"phantom": suite.phantom()}))
    monkeypatch.setattr(bench, "load_suite", lambda name: suite)
    monkeypatch.setattr(bench, "ensure_data", lambda suite, out, progress: out / "project.yaml")
    monkeypatch.setattr(bench, "run_one", lambda project, suite, row, seed, out, progress:
                        {"name": row.name, "train_seconds": 150.0})
    for name in ("aggregate", "write_results", "write_report"):
        monkeypatch.setattr(report, name, lambda *args, **kwargs: {})
    bench.run_benchmark("ci", tmp_path, ["oracle", "naive", "marginal", "multihead"], seeds=1, progress=True)  # the [k/N] lines are progress: --quiet drops them
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(lines) == 4
    assert lines[0] == "[1/4] oracle seed 0 (done, reused)"  # nothing to go on yet
    assert lines[1].endswith("(done, reused), suite ETA ~5 min")  # 2 rows to train x 150 s recorded
    assert lines[2].endswith("marginal seed 0, suite ETA ~5 min")  # still no row trained by this call
    assert lines[3].startswith("[4/4] multihead seed 0, suite ETA ")
    assert "~" not in lines[3]  # now this call's own (here instant) run time
    # --quiet (progress=False): no [k/N] line either (they were printed anyway; helper-74)
    bench.run_benchmark("ci", tmp_path, ["oracle", "naive", "marginal", "multihead"], seeds=1, progress=False)
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]


def test_a_stopped_suite_reports_its_finished_rows_and_every_seed_stays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during a row left results.json but no report.md (it was written only at the end); now the
    report of the finished rows is written on the way out. A folder's finished seed 1, from an earlier
    `--seeds 2`, stays in the report of a later call without --seeds (it was dropped without a word). A row
    with a checkpoint says it resumes, and from which step."""
    from dataclasses import replace

    import unionseg.benchmark as bench
    import unionseg.report as report

    suite = replace(load_suite("ci"), isolate=False)
    (tmp_path / "benchmark.json").write_text(json.dumps({"phantom": suite.phantom()}))
    for seed in (1, 2):  # seed 1: finished, later in this call's plan; seed 2: outside it (an earlier --seeds 3)
        earlier = tmp_path / "runs" / "oracle" / f"seed{seed}" / "result.json"
        earlier.parent.mkdir(parents=True)
        earlier.write_text(json.dumps({"name": "oracle", "seed": seed}))
    half = tmp_path / "runs" / "naive" / "seed0"
    half.mkdir(parents=True)
    (half / "last.pt").write_bytes(b"x")
    import unionseg.training.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "checkpoint_step", lambda path: 3)
    monkeypatch.setattr(bench, "load_suite", lambda name: suite)
    monkeypatch.setattr(bench, "ensure_data", lambda suite, out, progress: out / "project.yaml")
    monkeypatch.setattr(bench, "_count_experts", lambda project: 0)
    monkeypatch.setattr(bench, "finished_result", lambda suite, row, seed, out: {"name": row.name, "seed": seed})

    def run_one(project: Path, suite: object, row: Any, seed: int, out: Path, progress: bool) -> dict[str, Any]:
        if row.name == "naive":
            raise KeyboardInterrupt
        return {"name": row.name, "seed": seed, "train_seconds": 1.0}

    monkeypatch.setattr(bench, "run_one", run_one)
    reported: list[list[tuple[str, int]]] = []
    monkeypatch.setattr(report, "aggregate", lambda results, suite: {"rows": [(r["name"], r["seed"]) for r in results]})
    monkeypatch.setattr(report, "write_results", lambda agg, out: None)
    monkeypatch.setattr(report, "write_report", lambda agg, out: reported.append(agg["rows"]))
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark("ci", tmp_path, ["oracle", "naive"], seeds=2, progress=True)
    assert reported == [[("oracle", 0), ("oracle", 1), ("oracle", 2)]]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert lines[1].startswith("[2/4] naive seed 0 (resuming: step 3)"), lines


def test_a_second_stop_while_the_report_is_written_keeps_the_first_stops_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGTERM stopped the suite (exit 143); a Ctrl-C while it wrote the report of the finished rows replaced
    the SIGTERM, and the command exited 130 as if the user had pressed Ctrl-C first."""
    from dataclasses import replace

    import unionseg.benchmark as bench
    import unionseg.report as report
    from unionseg.stopping import Terminated, exit_code

    suite = replace(load_suite("ci"), isolate=False)
    (tmp_path / "benchmark.json").write_text(json.dumps({"phantom": suite.phantom()}))
    monkeypatch.setattr(bench, "load_suite", lambda name: suite)
    monkeypatch.setattr(bench, "ensure_data", lambda suite, out, progress: out / "project.yaml")
    monkeypatch.setattr(bench, "_count_experts", lambda project: 0)

    def run_one(project: Path, suite: object, row: Any, seed: int, out: Path, progress: bool) -> dict[str, Any]:
        if row.name == "naive":
            raise Terminated
        return {"name": row.name, "seed": seed, "train_seconds": 1.0}

    def write_report(agg: object, out: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_one", run_one)
    monkeypatch.setattr(report, "aggregate", lambda results, suite: {})
    monkeypatch.setattr(report, "write_results", lambda agg, out: None)
    monkeypatch.setattr(report, "write_report", write_report)
    with pytest.raises(Terminated) as stopped:
        bench.run_benchmark("ci", tmp_path, ["oracle", "naive"], seeds=1, progress=False)
    assert exit_code(stopped.value) == 143
    assert "the report was not written (stopped again while writing it)" in capsys.readouterr().err


def test_suite_eta_counts_the_experts_a_later_row_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The first row that needs the shared experts trains them first (one per training dataset, each under
    the run budget): the ETA before it counts them; once they are built, no more."""
    from dataclasses import replace

    import unionseg.benchmark as bench
    import unionseg.report as report

    suite = replace(load_suite("ci"), isolate=False)
    names = ["oracle", "naive", "individual", "mskd"]
    for name in names[:2]:
        (tmp_path / "runs" / name / "seed0").mkdir(parents=True)
        (tmp_path / "runs" / name / "seed0" / "result.json").write_text("{}")
    (tmp_path / "benchmark.json").write_text(json.dumps({"phantom": suite.phantom()}))
    monkeypatch.setattr(bench, "load_suite", lambda name: suite)
    monkeypatch.setattr(bench, "ensure_data", lambda suite, out, progress: out / "project.yaml")
    monkeypatch.setattr(bench, "_count_experts", lambda project_path: 4)
    monkeypatch.setattr(bench, "run_one", lambda project, suite, row, seed, out, progress:
                        {"name": row.name, "train_seconds": 150.0,
                         "stage_seconds": 600.0 if row.name == "individual" else 0.0})
    for name in ("aggregate", "write_results", "write_report"):
        monkeypatch.setattr(report, name, lambda *args, **kwargs: {})
    bench.run_benchmark("ci", tmp_path, names, seeds=1, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert lines[2] == "[3/4] individual seed 0, suite ETA ~15 min"  # 2 runs + 4 experts, 150 s each
    assert lines[3] == "[4/4] mskd seed 0, suite ETA 0 s"  # the experts are built: this call's own run time


def test_unknown_suite_and_method_are_refused() -> None:
    from unionseg.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown suite"):
        load_suite("nope")
    with pytest.raises(ConfigError, match="nope.yaml: suite file not found"):  # a path: named as such
        load_suite("nope.yaml")
    with pytest.raises(ConfigError, match="not in suite"):
        load_suite("ci").runs(["nope"])


def test_finished_run_under_another_budget_is_refused_not_reused(tmp_path: Path) -> None:
    """A finished row is reused only when its recorded config hash matches what the suite gives now; a row
    from another budget raises (naming the file) and stays untouched. Neither path trains anything."""
    from dataclasses import replace

    from unionseg.benchmark import resolved_options, run_one
    from unionseg.config import config_hash
    from unionseg.errors import ConfigError
    from unionseg.training.config import load_train_config

    suite = load_suite("ci")
    spec = suite.runs(["naive"])[0]
    cfg = load_train_config(None, [], **{**suite.budget, "method": spec.method, "seed": 0, "options": spec.options})
    done = tmp_path / "runs" / "naive" / "seed0" / "result.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"name": "naive", "provenance": {"config_hash": config_hash(cfg)}}))
    missing = tmp_path / "no_project.yaml"  # never read: nothing is trained or predicted
    assert run_one(missing, suite, spec, 0, tmp_path, progress=False)["name"] == "naive"
    changed = replace(suite, budget={**suite.budget, "steps": suite.budget["steps"] + 1})
    before = done.read_text()
    with pytest.raises(ConfigError, match="another budget") as err:
        run_one(missing, changed, spec, 0, tmp_path, progress=False)
    assert str(done) in str(err.value)
    assert done.read_text() == before
    # with the run's own record beside it, the refusal names what changed; a change that leaves the weights
    # alone (the checkpoint interval, which a resume may change too) keeps the row
    from unionseg.config import dump_yaml, to_dict

    dump_yaml(to_dict(cfg), done.parent / "config.yaml")
    with pytest.raises(ConfigError, match=f"another budget or options \\(steps: {cfg.steps} -> {cfg.steps + 1}\\)"):
        run_one(missing, changed, spec, 0, tmp_path, progress=False)
    interval = replace(suite, budget={**suite.budget, "ckpt_every": cfg.ckpt_every + 7})
    assert run_one(missing, interval, spec, 0, tmp_path, progress=False)["name"] == "naive"
    assert done.read_text() == before
    # a finished row whose method ran with other defaults (same recipe, so the same hash) is refused too,
    # naming the option; the same row recording today's defaults is reused
    cot = suite.runs(["cotraining"])[0]
    cot_cfg = load_train_config(None, [], **{**suite.budget, "method": "cotraining", "seed": 0,
                                            "options": cot.options})
    cot_done = tmp_path / "runs" / "cotraining" / "seed0" / "result.json"
    cot_done.parent.mkdir(parents=True)
    today = resolved_options(cot)
    assert today["focal_weights"] == "none"
    record = {"name": "cotraining", "provenance": {"config_hash": config_hash(cot_cfg)}, "resolved_options": today}
    cot_done.write_text(json.dumps(record))
    assert run_one(missing, suite, cot, 0, tmp_path, progress=False)["name"] == "cotraining"
    cot_done.write_text(json.dumps({**record, "resolved_options": {**today, "focal_weights": "inverse_frequency"}}))
    with pytest.raises(ConfigError, match="focal_weights: 'inverse_frequency' -> 'none'"):
        run_one(missing, suite, cot, 0, tmp_path, progress=False)


@pytest.mark.slow
def test_ci_suite_end_to_end_and_dice_recomputed(tmp_path: Path) -> None:
    from unionseg.benchmark import run_benchmark

    out = tmp_path / "bench"
    results = run_benchmark("ci", out, progress=False)
    suite = load_suite("ci")
    assert set(results["methods"]) == set(suite.methods)
    saved = json.loads((out / "results.json").read_text())
    project = load_project(out / "data" / "project.yaml")
    space = project.label_space
    test = project.eval_dataset("test")
    assert test is not None
    lookup = space.local_lookup(test.name)
    partial = 0  # Dice values strictly between 0 and 1: overlaps the recomputation had to get right (helper-123:
    # the ci suite's scores are near 0 by design, and empty maps score 0 or 1 under any class mask)
    for run in saved["runs"]:
        prov = run["provenance"]
        for key in ("code_commit", "config_hash", "data_fingerprint", "seed", "generator_version"):
            assert prov.get(key) not in (None, ""), key
        # the machine, so that timings can be set against another one's (helper-74)
        assert prov["machine"]["cpu_count"] >= 1 and prov["machine"]["torch"] and prov["machine"]["cpu"]
        assert isinstance(run["resolved_options"], dict)  # the options as run, defaults filled in
        if run["method"] == "cotraining":
            assert run["resolved_options"]["focal_weights"] == "none"
        # the shared experts are counted once (expert_seconds), not also in the run that happened to build them
        assert run["train_seconds"] > 0 and run["stage_seconds"] >= 0
        if run["name"] == "individual" and run["seed"] == 0:  # the first row that needs the experts builds them
            assert run["stage_seconds"] >= 0.9 * run["expert_seconds"] > 0
        if run["method"] in ("oracle", "naive", "dodnet"):
            assert run["stage_seconds"] < min(5.0, run["train_seconds"])  # no stage but training
        pred_dir = out / run["pred_dir"]
        scores: dict[str, list[float]] = {}
        for truth_path in sorted((test.root / "labelsTr").glob("*.nii.gz")):
            pred, pred_geom = read_image(pred_dir / truth_path.name)
            truth, truth_geom = read_image(truth_path)
            assert pred_geom.same_grid(truth_geom)
            codes = lookup[truth.astype(np.int64)]
            for key in space.evaluation_keys():
                p = space.codes_to_leaf_masks(pred, key)
                g = space.codes_to_leaf_masks(codes, key)
                denom = p.sum() + g.sum()
                scores.setdefault(key, []).append(1.0 if denom == 0 else 2.0 * np.logical_and(p, g).sum() / denom)
        assert set(scores) == set(space.evaluation_keys()) and all(len(v) == len(scores["region:liver"])
                                                                   for v in scores.values())  # cases were read
        partial += sum(0.0 < v < 1.0 for values in scores.values() for v in values)
        for key, values in scores.items():
            assert run["per_class"][key]["dice"] == pytest.approx(float(np.mean(values)), abs=1e-9), (run["name"], key)
            # how many test cases the class was scored on, and how many values the empty-mask rules decided
            # (the counts were read as a metric and written null)
            assert run["per_class"][key]["n_cases"] == len(values)
            assert set(run["per_class"][key]["empty_rule_cases"]) >= {"both_empty", "pred_empty"}
    assert partial >= 3, partial  # 9 in the run that set this bound
    # strict JSON, as jq, pandas and browsers parse it: no bare NaN (the ci suite's gap closures are NaN)
    json.loads((out / "results.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    # the report and its figures exist and are not trivial
    report = (out / "report.md").read_text()
    assert "| oracle |" in report and "Provenance" in report
    assert suite.about and suite.about in report  # says that a smoke test's figures compare nothing
    # the table says how its tumour columns and times are to be read, the figures which seed they show
    assert "the empty-mask rule" in report and '"(+N)" the shared experts' in report
    assert "## Pseudo-label quality (Dice vs hidden truth, unannotated classes only; seed 0)" in report
    assert "## One test case, every method (seed 0)" in report
    # what each method costs, per seed, with its size, the memory note and the machine (helper-74)
    assert "## Compute per method" in report and "Measured on: " in report
    assert f"| individual | {results['methods']['individual']['parameters']:,} |" in report
    assert "Peak memory is measured only where each run has a process of its own" in report  # ci: one process
    assert saved["units"]["hd95"] == "mm" and saved["units"]["train_seconds"] == "s (wall time)"
    assert saved["methods"]["oracle"]["mean_region_dice"]["std"] is None  # one seed: no spread, not a 0.0
    times = ", ".join(f"{r['train_seconds']:.0f}" for r in saved["runs"] if r["name"] == "naive")
    assert f"| naive | {results['methods']['naive']['parameters']:,} | {times} |" in report  # per seed, not the mean
    assert re.search(r"## One test case, every method \(seed 0\): test case test_\d+, axial slice \d+ of \d+", report)
    for png in ("region_dice.png", "class_dice_heatmap.png", "loss_curves.png", "montage.png"):
        assert (out / "figures" / png).stat().st_size > 5000, png
    # resumable: a second call reuses every finished run (no retraining)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed0/result.json")}
    again = run_benchmark("ci", out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed0/result.json")} == stamps
    assert plain(again["methods"]["oracle"]["classes"]) == plain(results["methods"]["oracle"]["classes"])  # NaN: null
    regions = [k for k in results["methods"]["oracle"]["classes"] if k.startswith(REGION_PREFIX)]
    assert regions


def test_tumour_section_scores_only_cases_with_the_tumour(tmp_path: Path) -> None:
    from unionseg.report import tumour_section

    header = "case,class,dice,hd95,nsd,pred_voxels,gt_voxels,empty_rule\n"
    rows = {"a": ["c0,liver_tumour,0.6,1,1,10,12,", "c1,liver_tumour,1.0,0,1,0,0,both_empty",
                  "c2,liver_tumour,0.0,9,0,0,30,pred_empty", "c0,region:liver,0.9,1,1,5,5,"],
            "b": ["c0,liver_tumour,0.0,9,0,0,12,pred_empty", "c1,liver_tumour,1.0,0,1,0,0,both_empty"]}
    runs = []
    for name, lines in rows.items():
        (tmp_path / "runs" / name / "evaluation").mkdir(parents=True)
        (tmp_path / "runs" / name / "evaluation" / "metrics.csv").write_text(header + "\n".join(lines) + "\n")
        runs.append({"name": name, "pred_dir": f"runs/{name}/test_pred"})
    text = "\n".join(tumour_section({"methods": {"a": {}, "b": {}}, "runs": runs}, tmp_path))
    assert "| a | 0.300 (1/2) |" in text      # the both-empty case is left out; region rows too
    assert "| b | 0.000 (0/1) |" in text
    assert tumour_section({"methods": {}, "runs": []}, tmp_path) == []


def test_site_section_splits_region_dice_by_the_case_site(tmp_path: Path) -> None:
    from unionseg.report import site_section

    header = "case,class,dice,hd95,nsd,pred_voxels,gt_voxels,empty_rule\n"
    lines = ["c0,region:kidney,0.8,1,1,10,12,", "c1,region:kidney,0.2,1,1,10,12,", "c2,region:kidney,0.4,1,1,3,12,",
             "c0,kidney_tumour,0.5,1,1,3,3,"]
    (tmp_path / "runs" / "a" / "evaluation").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "evaluation" / "metrics.csv").write_text(header + "\n".join(lines) + "\n")
    agg = {"methods": {"a": {}}, "runs": [{"name": "a", "pred_dir": "runs/a/test_pred"}]}
    assert site_section(agg, tmp_path) == []  # no generator facts (real data): no section
    (tmp_path / "data").mkdir()
    cases = [{"case": "c0", "site": "kidney"}, {"case": "c1", "site": "liver"}, {"case": "c2", "site": "liver"}]
    (tmp_path / "data" / "generator.json").write_text(json.dumps({"cases": cases}))
    text = "\n".join(site_section(agg, tmp_path))
    assert "| method | organ | site: kidney | site: liver |" in text
    assert "| a | kidney | **0.80** | 0.30 |" in text  # own site bold; the liver site averages its two cases
    assert "tumour" not in text.split("|---|")[-1]


def test_benchmark_folder_guards_refuse_before_anything_is_written(tmp_path: Path) -> None:
    """A folder of user files (the report would replace them), another phantom's benchmark (its data and
    rows would be reused for this suite), a file, a bad seed count or an unknown row: each refused with
    nothing written. Twins: a new folder and an earlier benchmark of the same phantom are accepted."""
    from unionseg.benchmark import MARKER, check_out, run_benchmark
    from unionseg.errors import ConfigError, UnionsegError

    ci = load_suite("ci")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    with pytest.raises(UnionsegError, match="holds no benchmark"):
        check_out(mine, ci)
    assert sorted(p.name for p in mine.iterdir()) == ["report.md"]
    fresh = tmp_path / "fresh"
    check_out(fresh, ci)  # twin: a new folder is marked with the suite's phantom
    assert json.loads((fresh / MARKER).read_text())["phantom"] == ci.phantom()
    from dataclasses import replace

    with pytest.raises(UnionsegError, match="another phantom"):
        check_out(fresh, replace(ci, phantom_seed=1))
    legacy = tmp_path / "legacy"  # a benchmark folder from before the marker
    (legacy / "data").mkdir(parents=True)
    (legacy / "data" / "generator.json").write_text(json.dumps({"seed": 1, "size": ci.phantom_size,
                                                                "suite": ci.phantom_suite}))
    with pytest.raises(UnionsegError, match="another phantom"):
        check_out(legacy, ci)
    check_out(legacy, replace(ci, phantom_seed=1))
    assert (legacy / MARKER).is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UnionsegError, match="exists and is not a folder"):
        check_out(tmp_path / "afile", ci)
    empty = tmp_path / "empty"
    with pytest.raises(ConfigError, match="--seeds must be >= 1"):
        run_benchmark("ci", empty, seeds=0, progress=False)
    with pytest.raises(ConfigError, match="--methods: 'nosuch' is not in suite"):
        run_benchmark("ci", empty, methods=["nosuch"], progress=False)
    # one string is row names, as --methods takes them, not letters ("'a' is not in suite"; helper-106)
    with pytest.raises(ConfigError, match="--methods: 'nosuch' is not in suite"):
        run_benchmark("ci", empty, methods="naive, nosuch", progress=False)
    for none in ("", " , ", []):  # an unset variable names no row: refused, as the command line refuses it
        with pytest.raises(ConfigError, match="--methods names no row"):
            run_benchmark("ci", empty, methods=none, progress=False)
    assert not empty.exists()
    typo = tmp_path / "typo.yaml"  # found when its row would start, hours into a suite; now at once
    typo.write_text("name: typo\nbudget_from: ci\nbudget: {stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: budget: stpes: unknown key"):
        run_benchmark(str(typo), empty, progress=False)
    typo.write_text("name: typo\nbudget_from: ci\nmethods: [oracle, naive]\noptions: {naive: {nosuch: 1}}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: row 'naive' \(method 'naive'\): nosuch: unknown key"):
        run_benchmark(str(typo), empty, progress=False)
    typo.write_text("name: typo\nbudget_frm: ci\n")  # the list of keys names budget_from too (helper-97)
    with pytest.raises(ConfigError, match=r"typo.yaml: budget_frm: unknown key \(known: ablations, about, budget, "
                                          r"budget_from, isolate, methods"):
        run_benchmark(str(typo), empty, progress=False)
    typo.write_text("name: typo\nbudget_from: ci\nmethods: [oracle, naive]\noptions: {naiv: {exclusion: 1}}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: options.naiv: no row of this suite is named 'naiv' "
                                          r"\(rows: naive, oracle\)"):
        run_benchmark(str(typo), empty, progress=False)
    assert not empty.exists()
    # phantom keys and budget_from name the key and the suite file, before the folder is made (a bad
    # size failed in the phantom generator, naming neither, after benchmark.json was written)
    for text, message in (("phantom_size: huge", r"typo.yaml: phantom_size: 'huge' is not a phantom size"),
                          ("phantom_suite: other", r"typo.yaml: phantom_suite: 'other' is not a phantom suite"),
                          ("phantom_cases: [0, 1, 1]", r"typo.yaml: phantom_cases: .* must each be >= 1"),
                          ("budget_from: standrad", r"typo.yaml: budget_from: unknown suite 'standrad'")):
        typo.write_text(f"name: typo\nmethods: [naive]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            run_benchmark(str(typo), empty, progress=False)
    assert not empty.exists()
    with pytest.raises(ConfigError, match="row name 'oracle' is given twice"):
        from unionseg.benchmark import SuiteConfig
        from unionseg.config import from_dict

        from_dict(SuiteConfig, {"name": "x", "methods": ["oracle", "oracle"]})


def test_a_subset_run_keeps_every_finished_row_in_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--methods naive`` into a folder with a finished oracle row reports both (it shrank the report to
    the rows of the call)."""
    from dataclasses import replace

    import unionseg.benchmark as bench
    import unionseg.report as report

    suite = replace(load_suite("ci"), isolate=False)
    (tmp_path / "benchmark.json").write_text(json.dumps({"phantom": suite.phantom()}))
    (tmp_path / "runs" / "oracle" / "seed0").mkdir(parents=True)
    (tmp_path / "runs" / "oracle" / "seed0" / "result.json").write_text(json.dumps({"name": "oracle", "seed": 0}))
    seen: list[list[str]] = []
    monkeypatch.setattr(bench, "load_suite", lambda name: suite)
    monkeypatch.setattr(bench, "ensure_data", lambda suite, out, progress: out / "project.yaml")
    monkeypatch.setattr(bench, "run_one", lambda project, suite, row, seed, out, progress:
                        {"name": row.name, "seed": seed})
    monkeypatch.setattr(report, "aggregate", lambda results, suite: seen.append([r["name"] for r in results]) or {})
    for name in ("write_results", "write_report"):
        monkeypatch.setattr(report, name, lambda *args, **kwargs: {})
    bench.run_benchmark("ci", tmp_path, ["naive"], seeds=1, progress=False)
    assert seen[-1] == ["oracle", "naive"]  # the suite's order (this call's rows came first)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a process is POSIX")
def test_ctrl_c_lets_an_isolated_run_write_its_checkpoint(tmp_path: Path) -> None:
    """A run in its own process (the standard suite's isolate) was killed a quarter of a second after
    Ctrl-C; the benchmark now forwards the Ctrl-C and waits: the run stops at a step with its checkpoint,
    and the same command goes on from it."""
    import signal
    import subprocess

    from conftest import console_script, wait_for_log_rows
    from unionseg.training.checkpoint import safe_torch_load

    unionseg = console_script("unionseg")
    suite = tmp_path / "slow.yaml"
    suite.write_text("name: slow\nbudget_from: ci\nphantom_size: tiny\nphantom_cases: [2, 1, 1]\nisolate: true\n"
                     "methods: [naive]\nbudget: {steps: 400, val_every: 400, ckpt_every: 1000, log_every: 1}\n")
    out = tmp_path / "bench"
    # SIGINT at its default, as in a terminal: a shell's background job (`make test &`) hands its children
    # SIGINT ignored, and a Python started so never turns it into KeyboardInterrupt
    proc = subprocess.Popen([str(unionseg), "benchmark", "--suite", str(suite), "-o", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = out / "runs" / "naive" / "seed0" / "log.csv"
    wait_for_log_rows(proc, log, 3, timeout=240)
    os.kill(proc.pid, signal.SIGINT)  # the benchmark's process alone: it forwards the Ctrl-C to the run
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    step = safe_torch_load(log.parent / "last.pt", "unionseg-checkpoint")["step"]
    assert 3 <= step < 400
    assert f"stopped at step {step}; the checkpoint" in err and "Traceback" not in err
    assert "the same `unionseg benchmark` command goes on from there" in err and "--resume" not in err


def test_pseudo_label_figure_shows_seed_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one artefact folder per seed, the figure took the first in name order (any seed); it takes the
    folder whose experts were trained with seed 0, as the loss curves and montage show."""
    from unionseg.report import _artifact_seed

    for name, seed in (("aaa", 1), ("bbb", 0)):
        expert = tmp_path / "data" / "prepared" / "artifacts" / name / "experts" / "liver"
        expert.mkdir(parents=True)
        (expert / "config.yaml").write_text(f"method: expert\nseed: {seed}\n")
        (expert.parents[1] / "pseudo_quality.json").write_text(json.dumps({"region:liver": 0.1 * (seed + 1)}))
    assert _artifact_seed(tmp_path / "data" / "prepared" / "artifacts" / "aaa") == 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unionseg import report

    seen: list[list[float]] = []
    real_bar = plt.Axes.bar

    def bar(self, x, heights, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(list(heights))
        return real_bar(self, x, heights, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "bar", bar)
    (tmp_path / "figures").mkdir()
    assert report._pseudo_quality({}, tmp_path, tmp_path / "figures", plt) == "figures/pseudo_quality.png"
    assert seen == [[pytest.approx(0.1)]]  # seed 0's folder (bbb), not the first by name


def test_report_says_what_each_row_ran_and_marks_fewer_seeds() -> None:
    """An ablation row's options and every row's seeds are in the report; a row with fewer seeds than the
    others is marked in the table, since its mean is not comparable to a mean over more seeds."""
    from unionseg.report import aggregate, markdown_table, rows_section, surface_table

    def result(name: str, method: str, seed: int, dice: float, options: dict | None = None) -> dict:
        return {"name": name, "method": method, "seed": seed, "options": options or {},
                "per_class": {"region:liver": {"dice": dice}}, "train_seconds": 1.0,
                "predict_seconds_per_case": 0.1}

    results = [result("dodnet", "dodnet", 0, 0.5), result("dodnet", "dodnet", 1, 0.7),
               result("dodnet_linear_head", "dodnet", 0, 0.8, {"head_widths": [], "cross_task_weight": 0.25})]
    agg = aggregate(results, "ablations")
    table = markdown_table(agg)
    assert "| dodnet | 0.600 ± 0.141 |" in table and "| dodnet_linear_head (1 seed) | 0.800 |" in table
    rows = "\n".join(rows_section(agg))
    assert "| dodnet | `dodnet` | none (the method's defaults) | 0, 1 |" in rows
    assert "| dodnet_linear_head | `dodnet` | `cross_task_weight: 0.25`, `head_widths: []` | 0 |" in rows
    # every row with the same seeds: no mark
    assert "seed)" not in markdown_table(aggregate(results[:1] + results[2:], "ablations"))
    # HD95 and NSD per region beside the Dice table (results.json held them; the report showed Dice only)
    for r, hd95 in zip(results, (10.0, 20.0, 5.0), strict=True):
        r["per_class"]["region:liver"].update(hd95=hd95, nsd=0.5)
    surface = "\n".join(surface_table(aggregate(results, "ablations")))
    assert "| method | liver HD95 | liver NSD |" in surface
    assert "| dodnet | 15.0 | 0.500 |" in surface and "| dodnet_linear_head | 5.0 | 0.500 |" in surface


def test_report_keeps_the_label_space_order_and_counts_hd95_penalties() -> None:
    """The benchmark's tables listed organs alphabetically (kidney first) while evaluate lists them as the
    project does (liver first); and a mean HD95 ruled by one missed organ's penalty said nothing of it
    (helper-81)."""
    from unionseg.report import aggregate, class_order, markdown_table, surface_table

    def per_class(missed: int) -> dict:
        rules = {"both_empty": 0, "pred_empty": missed, "gt_empty": 0}
        return {"region:liver": {"dice": 0.9, "hd95": 4.0, "nsd": 0.9, "n_cases": 3,
                                 "empty_rule_cases": dict.fromkeys(rules, 0)},
                "region:kidney": {"dice": 0.5, "hd95": 200.0, "nsd": 0.5, "n_cases": 3, "empty_rule_cases": rules},
                "liver_tumour": {"dice": 0.4, "hd95": 9.0, "nsd": 0.4, "n_cases": 3,
                                 "empty_rule_cases": dict.fromkeys(rules, 0)}}

    results = [{"name": "naive", "method": "naive", "seed": seed, "options": {}, "per_class": per_class(seed),
                "train_seconds": 1.0, "predict_seconds_per_case": 0.1} for seed in (0, 1, 2)]
    agg = aggregate(results, "standard")
    assert list(agg["methods"]["naive"]["classes"]) == ["region:liver", "region:kidney", "liver_tumour"]
    assert "| method | mean region Dice | gap closure | liver | kidney | liver_tumour |" in markdown_table(agg)
    surface = "\n".join(surface_table(agg))
    assert "| method | liver HD95 | kidney HD95 | liver NSD | kidney NSD |" in surface
    assert "| naive | 4.0 | 200.0 (3 penalties) | 0.900 | 0.500 |" in surface  # 0 + 1 + 2 over the seeds
    assert class_order([["liver_tumour", "region:spleen"], ["region:liver", "region:spleen"]]) == [
        "region:spleen", "region:liver", "liver_tumour"]


def test_a_report_rendered_without_its_run_folders_says_what_it_leaves_out(tmp_path: Path) -> None:
    """A report written again from a copied results.json dropped the tumour and site tables and the run
    figures without a word; now a section names the runs whose folders are missing."""
    from unionseg.report import missing_runs_note

    agg = {"runs": [{"name": "oracle", "seed": 0, "pred_dir": "runs/oracle/seed0/test_pred"},
                    {"name": "naive", "seed": 0, "pred_dir": "runs/naive/seed0/test_pred"}]}
    (tmp_path / "runs" / "oracle" / "seed0").mkdir(parents=True)
    note = "\n".join(missing_runs_note(agg, tmp_path))
    assert note.startswith("## Left out") and "1 of 2 runs" in note and "(naive seed 0)" in note
    (tmp_path / "runs" / "naive" / "seed0").mkdir(parents=True)
    assert missing_runs_note(agg, tmp_path) == []


def test_the_report_says_why_gap_closure_is_missing() -> None:
    """In the `ci` suite oracle and naive tie (both 0), so every gap closure read n/a and nothing said why. An
    oracle behind naive, or ahead by less than report.MIN_GAP, gives n/a too (it gave 1.00 for a row at 0)."""
    from unionseg.report import _gap_note, aggregate

    def row(dice: float) -> dict[str, Any]:
        return {"mean_region_dice": {"mean": dice}}

    assert "mean region Dice (0.000) does not beat naive's (0.000) by 0.01" in _gap_note(
        {"methods": {"oracle": row(0.0), "naive": row(0.0)}})[0]
    # the oracle a hair behind naive (helper-97: a row scoring 0 read 1.00): n/a too, and said why
    assert "does not beat naive's" in _gap_note({"methods": {"oracle": row(0.0), "naive": row(0.000166)}})[0]
    assert _gap_note({"methods": {"oracle": row(0.9), "naive": row(0.5)}}) == []
    assert "needs the `oracle` and `naive` rows" in _gap_note({"methods": {"naive": row(0.5)}})[0]
    assert "is missing" in _gap_note({"methods": {"oracle": row(float("nan")), "naive": row(0.4)}})[0]

    def result(name: str, dice: float) -> dict[str, Any]:
        return {"name": name, "method": name, "seed": 0, "per_class": {"region:liver": {"dice": dice}},
                "train_seconds": 1.0, "predict_seconds_per_case": 0.1}

    agg = aggregate([result("oracle", 0.0), result("naive", 0.000166), result("marginal", 0.0)], "ci")
    gap = agg["methods"]["marginal"]["gap_closure"]
    assert np.isnan(gap["mean_region"]) and np.isnan(gap["per_region"]["region:liver"])


def test_gap_closure_compares_a_row_with_the_references_on_the_seeds_all_three_have() -> None:
    """Every finished seed stays in the report, so rows may have different seeds. A row of seed 0 alone was set
    against the oracle's and naive's means over seeds 0 and 1: the gap mixed seed sets."""
    from unionseg.report import _gap_note, aggregate

    def result(name: str, seed: int, dice: float) -> dict[str, Any]:
        return {"name": name, "method": name, "seed": seed, "per_class": {"region:liver": {"dice": dice}},
                "train_seconds": 1.0, "predict_seconds_per_case": 0.1}

    results = [result("oracle", 0, 0.9), result("oracle", 1, 0.8), result("naive", 0, 0.5),
               result("naive", 1, 0.3), result("dodnet", 0, 0.7), result("mskd", 0, 0.7), result("mskd", 1, 0.6),
               result("marginal", 2, 0.9)]
    methods = aggregate(results, "standard")["methods"]
    dodnet = methods["dodnet"]["gap_closure"]
    assert dodnet["seeds"] == [0]
    assert dodnet["mean_region"] == pytest.approx((0.7 - 0.5) / (0.9 - 0.5))  # seed 0's references: 0.5
    assert dodnet["per_region"]["region:liver"] == pytest.approx(0.5)  # (mixed, it read (0.7-0.4)/(0.85-0.4))
    assert methods["dodnet"]["vs_oracle"]["region:liver"] == pytest.approx(0.7 / 0.9)
    mskd = methods["mskd"]["gap_closure"]  # the same seeds as the references: their means over both
    assert mskd["seeds"] == [0, 1] and mskd["mean_region"] == pytest.approx((0.65 - 0.4) / (0.85 - 0.4))
    assert methods["marginal"]["gap_closure"]["seeds"] == [] and np.isnan(methods["marginal"]["gap_closure"]["mean_region"])
    note = " ".join(_gap_note({"methods": methods}))
    assert "Gap closure of `dodnet` sets it against the oracle and naive on seed 0 only" in note
    assert "`dodnet` has 0, the oracle 0, 1, naive 0, 1" in note
    # a reference with a seed the others lack: the row's gap is on the shared seed, which the table's means hide
    lopsided = aggregate([result("oracle", 0, 0.9), result("naive", 0, 0.5), result("naive", 1, 0.3),
                          result("mskd", 0, 0.7)], "standard")["methods"]
    assert "Gap closure of `mskd` sets it against the oracle and naive on seed 0 only" in " ".join(
        _gap_note({"methods": lopsided}))
    assert "Gap closure of `marginal` reads n/a: it shares no seed" in note and "`mskd`" not in note
    # rows in the same case share one sentence (after `--seeds 2` on a few rows, one per row repeated it)
    alike = aggregate([*results, result("cotraining", 0, 0.8)], "standard")["methods"]
    lines = _gap_note({"methods": alike})
    assert sum("sets" in line for line in lines) == 1, lines
    assert ("Gap closure of `dodnet` and `cotraining` sets them against the oracle and naive on seed 0 only, the "
            "seeds all three have (`dodnet` and `cotraining` have 0, the oracle 0, 1, naive 0, 1).") in lines


def test_the_test_set_is_predicted_on_the_budgets_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `device: cpu` budget on a GPU machine predicted on the GPU ("auto") and timed it, while the row's
    machine record said no GPU."""
    from unionseg.benchmark import predict_test_set
    from unionseg.inference.predictor import Predictor

    asked: list[str] = []

    def from_checkpoint(path: Path, device: str = "auto", **kwargs: Any) -> Predictor:
        asked.append(device)
        raise RuntimeError("enough")

    monkeypatch.setattr(Predictor, "from_checkpoint", staticmethod(from_checkpoint))
    with pytest.raises(RuntimeError, match="enough"):
        predict_test_set(tmp_path / "model.pt", None, tmp_path / "pred", False, "cpu")
    assert asked == ["cpu"]


def test_the_report_reads_rows_written_before_the_empty_rule_counts() -> None:
    """Rows of earlier releases store ``empty_rule_cases: null`` (docs/results/ holds some): the report, and
    the README's figure script that reads them, crashed on them; such a row counts no HD95 penalty."""
    from unionseg.report import aggregate

    def result(seed: int, rules: dict[str, int] | None) -> dict[str, Any]:
        return {"name": "oracle", "method": "oracle", "seed": seed, "train_seconds": 1.0,
                "predict_seconds_per_case": 0.1,
                "per_class": {"region:liver": {"dice": 0.9, "hd95": 5.0, "empty_rule_cases": rules}}}

    old = aggregate([result(0, None)], "standard")["methods"]["oracle"]["classes"]["region:liver"]
    assert "penalty_cases" not in old and old["dice"]["mean"] == pytest.approx(0.9)
    mixed = aggregate([result(0, None), result(1, {"pred_empty": 1, "gt_empty": 2, "both_empty": 4})], "standard")
    assert mixed["methods"]["oracle"]["classes"]["region:liver"]["penalty_cases"] == 3


def test_a_finished_row_that_cannot_be_reused_stops_the_suite_before_any_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check ran when the loop reached the row: after training every row before it (an hour into a
    standard suite), and after printing "(done, reused)" for it. Now every finished row is checked first,
    those the call does not run too."""
    from dataclasses import replace

    import unionseg.benchmark as bench
    from unionseg.errors import ConfigError

    suite = replace(load_suite("ci"), isolate=False)
    (tmp_path / "benchmark.json").write_text(json.dumps({"phantom": suite.phantom()}))
    done = tmp_path / "runs" / "naive" / "seed0" / "result.json"  # naive runs after oracle
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"name": "naive", "seed": 0, "provenance": {"config_hash": "from-another-budget"}}))
    trained: list[str] = []
    monkeypatch.setattr(bench, "load_suite", lambda name: suite)
    monkeypatch.setattr(bench, "ensure_data", lambda suite, out, progress: out / "project.yaml")
    monkeypatch.setattr(bench, "_count_experts", lambda project: 0)
    monkeypatch.setattr(bench, "run_one", lambda project, suite, row, seed, out, progress: trained.append(row.name))
    with pytest.raises(ConfigError, match="naive seed 0 was run under another budget"):
        bench.run_benchmark("ci", tmp_path, ["naive", "oracle"], seeds=1, progress=False)
    assert trained == []
    # a row outside the call's --methods too: the report would list it under this suite's budget (helper-97)
    with pytest.raises(ConfigError, match="naive seed 0 was run under another budget"):
        bench.run_benchmark("ci", tmp_path, ["oracle"], seeds=1, progress=False)
    assert trained == []


def test_a_method_has_one_colour_in_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss curves skip rows without a training log (individual), which shifted the colour cycle: the
    same method was drawn in another colour than its bars. Both take the row's colour now."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unionseg import report

    names = ["oracle", "individual", "naive"]
    agg = {"methods": {n: {} for n in names}, "runs": [{"name": n, "seed": 0, "method": n} for n in names]}
    for name in ("oracle", "naive"):
        log = tmp_path / "runs" / name / "seed0" / "log.csv"
        log.parent.mkdir(parents=True)
        log.write_text("step,loss\n1,2.0\n2,1.0\n")
    drawn: dict[str, object] = {}
    real_plot = plt.Axes.plot

    def plot(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        drawn[kwargs["label"]] = kwargs.get("color")
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "plot", plot)
    (tmp_path / "figures").mkdir()
    assert report._loss_curves(agg, tmp_path, tmp_path / "figures", plt) == "figures/loss_curves.png"
    colours = report.method_colours(agg)
    assert drawn == {"oracle": colours["oracle"], "naive": colours["naive"]}
    assert len(set(colours.values())) == 3  # the bars' colours, one per row


@pytest.mark.parametrize("losses,minor", [((3.0, 0.02), []), ((0.6, 0.3), ["0.3", "0.4", "0.5", "0.6"])])
def test_loss_curve_labels_stay_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         losses: tuple[float, float], minor: list[str]) -> None:
    """A loss falling over two decades had every minor tick labelled (24 labels drawn over each other);
    minor labels appear only where the axis spans less than a decade, written plainly (0.3, not 3e-01)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unionseg import report

    agg = {"methods": {"naive": {}}, "runs": [{"name": "naive", "seed": 0, "method": "naive"}]}
    log = tmp_path / "runs" / "naive" / "seed0" / "log.csv"
    log.parent.mkdir(parents=True)
    steps = np.arange(1, 101)
    values = np.geomspace(*losses, len(steps))
    log.write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in zip(steps, values, strict=True)))
    seen: list[list[str]] = []
    real_close = plt.close

    def close(fig: object = None) -> None:
        fig.canvas.draw()  # type: ignore[union-attr]
        (ax,) = fig.axes  # type: ignore[union-attr]
        low, high = ax.get_ylim()
        seen.append([t.get_text() for t, loc in zip(ax.yaxis.get_minorticklabels(), ax.yaxis.get_minorticklocs(), strict=True)
                     if t.get_text() and low <= loc <= high])
        real_close(fig)

    monkeypatch.setattr(plt, "close", close)
    (tmp_path / "figures").mkdir()
    assert report._loss_curves(agg, tmp_path, tmp_path / "figures", plt) == "figures/loss_curves.png"
    assert seen == [minor]


@pytest.mark.skipif(os.name != "posix", reason="signals are forwarded on POSIX only")
def test_a_stopped_benchmark_forwards_its_signal_to_the_run_it_waits_for() -> None:
    """SIGTERM to the benchmark (``kill``, a scheduler) used to end it where it stood while its run trained on
    in another process with nobody waiting; now the run gets the same signal as the benchmark did, so it
    checkpoints its step, and the exit status says which signal it was (143 SIGTERM, 130 Ctrl-C)."""
    import signal

    from unionseg import benchmark
    from unionseg.stopping import Terminated, exit_code, interruption

    class Run:
        def __init__(self) -> None:
            self.signals: list[int] = []
            self.killed = False

        def send_signal(self, sig: int) -> None:
            self.signals.append(sig)

        def wait(self) -> int:
            return 0

        def kill(self) -> None:
            self.killed = True

    for terminated, sig in ((True, signal.SIGTERM), (False, signal.SIGINT)):
        proc = Run()
        benchmark._stop_run(proc, terminated=terminated)  # type: ignore[arg-type]
        assert proc.signals == [sig] and not proc.killed
    try:
        try:
            raise Terminated
        except KeyboardInterrupt as exc:
            raise RuntimeError("wrapped, as click wraps it in Abort") from exc
    except RuntimeError as wrapped:
        assert isinstance(interruption(wrapped), Terminated) and exit_code(wrapped) == 143
    assert exit_code(KeyboardInterrupt()) == 130 and exit_code(ValueError()) == 130
    assert interruption(ValueError()) is None


def test_methods_take_a_comma_list_or_the_flag_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--help` showed `--methods <list[str]>`, and `--methods oracle,naive` was refused as one row name."""
    from typer.testing import CliRunner

    import unionseg.benchmark as bench
    import unionseg.report as report
    from unionseg.cli import app

    given: list[object] = []
    projects: list[object] = []
    root_args: list[object] = []
    monkeypatch.setattr(bench, "run_benchmark", lambda suite, out, methods, seeds, progress, project, roots:
                        (given.append(methods), projects.append(project), root_args.append(roots)))
    monkeypatch.setattr(report, "print_table", lambda results: None)
    runner = CliRunner()
    for args in (["--methods", "oracle,naive"], ["--methods", "oracle", "--methods", " naive"], []):
        result = runner.invoke(app, ["benchmark", "--suite", "ci", "-o", "unused", "--quiet", *args])
        assert result.exit_code == 0, result.output
    assert given == [["oracle", "naive"], ["oracle", "naive"], None]
    # an empty --methods reaches run_benchmark as no row, not as None (the whole suite): it refuses that
    # (tested beside its other refusals)
    runner.invoke(app, ["benchmark", "--suite", "ci", "-o", "unused", "--quiet", "--methods", ""])
    assert given[3:] == [[]]
    # --project (-p): a project of one's own in place of the phantom, passed as given
    assert runner.invoke(app, ["benchmark", "-o", "unused", "--quiet", "-p", "mine.yaml"]).exit_code == 0
    assert projects == [None] * 4 + [Path("mine.yaml")]
    # --root NAME=DIR (repeatable), as train takes it
    assert runner.invoke(app, ["benchmark", "-o", "unused", "--quiet", "-p", "mine.yaml", "--root", "liver=/d/l",
                               "--root", "kidney=k"]).exit_code == 0
    assert root_args == [{}] * 5 + [{"liver": "/d/l", "kidney": "k"}]


def test_the_results_table_never_cuts_a_value_on_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """At 80 columns the table printed "orac…" and "0.9…": the console is as wide as the table needs
    (helper-76), and the per-seed compute lines come from the runs themselves."""
    from unionseg.report import compute_section, print_table

    monkeypatch.setenv("COLUMNS", "80")
    classes = {f"region:{organ}": {"dice": {"mean": 0.912345, "std": 0.0}} for organ in
               ("liver", "kidney", "pancreas", "spleen")}
    classes.update({f"{organ}_tumour": {"dice": {"mean": 0.5, "std": 0.0}} for organ in ("liver", "kidney")})
    row = {"method": "cotraining", "seeds": [0, 1], "classes": classes,
           "mean_region_dice": {"mean": 0.912345, "std": 0.01}, "gap_closure": {"mean_region": 0.98},
           "train_seconds": 1234.0, "expert_seconds": 789.0, "predict_seconds_per_case": 1.5, "parameters": 36360,
           "peak_rss_mb": None}
    runs = [{"name": "cotraining_long_row_name", "seed": s, "train_seconds": t, "predict_seconds_per_case": p}
            for s, t, p in ((0, 1200.0, 1.4), (1, 1268.0, 1.6))]
    agg = {"methods": {"cotraining_long_row_name": row}, "runs": runs, "isolate": True}
    print_table(agg)
    out = capsys.readouterr().out
    assert "…" not in out and "cotraining_long_row_name" in out and "0.912" in out and "kidney_tumour" in out
    lines = compute_section(agg)
    assert "| cotraining_long_row_name | 36,360 | 1200, 1268 | 1.40, 1.60 | n/a |" in lines
    assert any("rows without it were run before it was recorded" in line for line in lines)  # an isolated suite
    assert not any("GPU memory" in line for line in lines)  # no GPU column where no run used one
    gpu = {**agg, "methods": {"cotraining_long_row_name": {**row, "peak_rss_mb": 2048.0, "peak_gpu_mb": 5120.4}}}
    lines = compute_section(gpu)
    assert "| cotraining_long_row_name | 36,360 | 1200, 1268 | 1.40, 1.60 | 2048 | 5120 |" in lines
    assert any(line.endswith("peak GPU memory (MiB) |") for line in lines)


def test_an_isolated_suite_refuses_a_method_of_the_calling_script_before_any_row(tmp_path: Path) -> None:
    """A row whose method is defined in the script that runs an isolated suite was refused only when that row
    started, after the phantom, the preparation and every earlier row (helper-94); the suite's rows are now
    checked before anything is made. Twin: the same suite without isolate accepts it."""
    from unionseg.benchmark import check_rows
    from unionseg.errors import ConfigError
    from unionseg.methods import base
    from unionseg.methods.baselines import NaiveMethod

    @base.register_method("in_script_naive")
    class InScript(NaiveMethod):
        pass

    InScript.__module__ = "__main__"  # as a class defined in the running script
    from dataclasses import replace

    from unionseg.benchmark import run_benchmark
    try:
        suite = tmp_path / "mine.yaml"
        suite.write_text("name: mine\nbudget_from: ci\nphantom_size: tiny\nisolate: true\n"
                         "methods: [naive, in_script_naive]\n")
        out = tmp_path / "bench"
        with pytest.raises(ConfigError, match="row 'in_script_naive' \\(method 'in_script_naive'\\): method "
                                              "'in_script_naive' is defined in the script that runs the benchmark"):
            run_benchmark(str(suite), out, progress=False)
        assert not out.exists()
        shared = load_suite(str(suite))
        check_rows(replace(shared, isolate=False), replace(shared, isolate=False).runs(None), suite)
    finally:
        base.METHODS.pop("in_script_naive", None)


def test_an_isolated_row_shows_its_training_progress_unless_quiet(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The suites that train each row in a process of its own (standard, ablations) ran it with progress
    off: nothing for the minutes of a row but its start line. The row's process now gets the flag (and the
    suite's ETA in the environment it inherits)."""
    from unionseg import benchmark

    commands: list[list[str]] = []

    class Done:
        def __init__(self, cmd: list[str], env: dict) -> None:
            commands.append(cmd)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(benchmark.subprocess, "Popen", Done)
    for shown in (True, False):
        benchmark._run_isolated(tmp_path / "project.yaml", "ci", "naive", 0, tmp_path, "naive", shown)
    assert [c[-1] for c in commands] == ["progress", "quiet"]
    calls: list[bool] = []
    monkeypatch.setattr(benchmark, "run_one", lambda *args, progress: calls.append(progress) or {})
    for cmd in commands:
        benchmark._isolated_main(cmd[cmd.index("unionseg.benchmark") + 1:])
    assert calls == [True, False]


@pytest.mark.slow
def test_a_project_of_ones_own_is_benchmarked_in_place_of_the_phantom(tmp_path: Path) -> None:
    """`unionseg benchmark --project`: the suite's budget on a user's project, scored on its test set, its
    datasets read where they are (a copy of the project file, prepared in the benchmark folder; the project's
    own cache untouched), its test labels read through its own map (the montage drew the raw values and crashed
    on values above the classes' numbers; helper-132). Refused before anything is written: the oracle row on
    datasets without full labels, a project without a test set, a test label folder holding a file of no case,
    a folder holding another benchmark; and a finished row scored on data that changed since. `--root` moves
    a dataset as train's does, and only with --project."""
    import shutil

    import yaml

    from unionseg.benchmark import run_benchmark
    from unionseg.data.io import write_image
    from unionseg.data.phantom import generate_phantom
    from unionseg.errors import ConfigError, UnionsegError

    phantom = generate_phantom(tmp_path / "mine", size="tiny", seed=5, cases=(2, 1, 1))
    raw = yaml.safe_load(phantom.read_text())
    for entry in raw["datasets"]:
        entry.pop("oracle_labels", None)  # real partially labelled data: no full truth of the training sets
        if entry["name"] == "test":  # label values of its own, not the classes' numbers (the montage drew them raw)
            entry["labels"] = {10 * v: name for v, name in entry["labels"].items()}
    raw.pop("generator_version")
    test_root = tmp_path / "mine" / "datasets" / "test"
    for path in (test_root / "labelsTr").glob("*.nii.gz"):
        label, geometry = read_image(path)
        write_image(path, (10 * label).astype(np.uint8), geometry, replace=True)
    meta = json.loads((test_root / "dataset.json").read_text())
    meta["labels"] = {str(10 * int(v)): name for v, name in meta["labels"].items()}
    (test_root / "dataset.json").write_text(json.dumps(meta))
    project = tmp_path / "mine" / "real.yaml"
    project.write_text(yaml.safe_dump(raw, sort_keys=False))
    suite = tmp_path / "mini.yaml"
    suite.write_text("name: mini\nbudget_from: ci\nmethods: [oracle, naive, marginal]\n"
                     "budget: {steps: 2, val_every: 2, ckpt_every: 2}\n")
    out = tmp_path / "bench"
    with pytest.raises(ConfigError, match=r"real.yaml: row 'oracle' trains on full labels of every training set "
                                          r"\(oracle_labels\), which datasets liver, kidney, pancreas, spleen do not"):
        run_benchmark(str(suite), out, project=project, progress=False)
    no_test = tmp_path / "mine" / "no_test.yaml"
    no_test.write_text(yaml.safe_dump({**raw, "datasets": [d for d in raw["datasets"] if d.get("role") != "test"]}))
    with pytest.raises(ConfigError, match=r"no_test.yaml: the benchmark scores every method on the project's test "
                                          r"set: declare one"):
        run_benchmark(str(suite), out, methods="naive", project=no_test, progress=False)
    assert not out.exists()

    results = run_benchmark(str(suite), out, methods="naive", project=project, progress=False)
    assert sorted(results["methods"]) == ["naive"]
    copy = yaml.safe_load((out / "data" / "project.yaml").read_text())
    assert [d["root"] for d in copy["datasets"]][0] == "../../mine/datasets/liver"  # read where they are
    assert not (tmp_path / "mine" / "prepared").exists() and (out / "data" / "prepared" / "index.json").is_file()
    # every score comes from evaluating the predictions against the project's own test labels
    saved = json.loads((out / "results.json").read_text())
    truth = sorted((tmp_path / "mine" / "datasets" / "test" / "labelsTr").glob("*.nii.gz"))
    for run in saved["runs"]:
        assert sorted(p.name for p in (out / run["pred_dir"]).glob("*.nii.gz")) == [p.name for p in truth]
        assert run["per_class"]["region:liver"]["n_cases"] == len(truth)
    report = (out / "report.md").read_text()
    assert f"Data: the project {project} (" in report and "- (a project of your own) |" in report
    assert "## One test case, every method (seed 0)" in report and (out / "figures" / "montage.png").is_file()
    assert "standard phantom" not in json.dumps(saved)  # the suite's own about text speaks of the phantom
    # a finished row scored on other data: refused (a test label file changed since)
    first = sorted((test_root / "labelsTr").glob("*.nii.gz"))[0]
    label, geometry = read_image(first)
    write_image(first, np.where(label == 10, 0, label).astype(np.uint8), geometry, replace=True)
    with pytest.raises(ConfigError, match=r"result.json: naive seed 0 was scored on other data \(fingerprint "):
        run_benchmark(str(suite), out, methods="naive", project=project, progress=False)
    # a label file of no case in the test folder: refused before a folder is made
    (test_root / "labelsTr" / "stray_001.nii.gz").write_bytes(first.read_bytes())
    with pytest.raises(ConfigError, match=r"labelsTr: test set 'test': its label folder holds 1 file\(s\) of no case "
                                          r"of the dataset \(stray_001;"):
        run_benchmark(str(suite), tmp_path / "bench2", methods="naive", project=project, progress=False)
    assert not (tmp_path / "bench2").exists()
    (test_root / "labelsTr" / "stray_001.nii.gz").unlink()
    other = tmp_path / "mine" / "other.yaml"  # the same datasets under another project file: not reused
    other.write_text(project.read_text())
    with pytest.raises(UnionsegError, match=r"holds the benchmark of the project .*real.yaml, not of the project "
                                            r".*other.yaml"):
        run_benchmark(str(suite), out, methods="naive", project=other, progress=False)
    with pytest.raises(UnionsegError, match=r"holds the benchmark of the project .*real.yaml, not of the phantom "
                                            r"of suite 'mini'"):
        run_benchmark(str(suite), out, methods="naive", progress=False)
    # --root: a dataset moved since the project file was written, given where it is now (roots); the copy keeps it
    moved = tmp_path / "elsewhere" / "liver"
    shutil.move(tmp_path / "mine" / "datasets" / "liver", moved)
    fresh = tmp_path / "bench3"
    with pytest.raises(ConfigError, match=r"--root liver=\.\.\. moves a dataset of a project of your own"):
        run_benchmark(str(suite), fresh, methods="naive", roots={"liver": moved}, progress=False)
    with pytest.raises(ConfigError, match=r"real.yaml: --root names unknown dataset 'livr'"):
        run_benchmark(str(suite), fresh, methods="naive", project=project, roots={"livr": moved}, progress=False)
    assert not fresh.exists()
    # the project's checks (the moved root's folder, its label map) and its copy both take the override
    assert sorted(run_benchmark(str(suite), fresh, methods="naive", project=project, roots={"liver": moved},
                                progress=False)["methods"]) == ["naive"]
    copy = yaml.safe_load((fresh / "data" / "project.yaml").read_text())
    assert copy["datasets"][0]["root"] == "../../elsewhere/liver"
