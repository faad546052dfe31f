"""The trainer end to end on the tiny phantom: every method trains and writes a model file; exact resume;
DDP with two gloo processes; the step-time floor of the loader."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import console_script, wait_for_log_rows
from unionseg.errors import ConfigError
from unionseg.training.checkpoint import safe_torch_load
from unionseg.training.config import load_train_config
from unionseg.training.trainer import make_context, train
from unionseg.training.validation import validation_cases

TINY = ["network.preset=tiny", "data.patch_size=[32,32,32]", "inference.overlap=0.25", "log_every=1"]


@pytest.fixture(scope="session")
def phantom_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny phantom (2 training cases per set, 1 val, 1 test), prepared once for the session."""
    from unionseg.config import load_project
    from unionseg.data.phantom import generate_phantom
    from unionseg.data.preprocess import prepare_project

    root = tmp_path_factory.mktemp("phantom")
    project = generate_phantom(root / "data", size="tiny", seed=0, cases=(2, 1, 1))
    prepare_project(load_project(project), workers=0, progress=False)
    return project


def _cfg(method: str, steps: int, *extra: str):  # noqa: ANN202
    return load_train_config(None, [*TINY, f"steps={steps}", f"val_every={steps}", f"ckpt_every={steps}", *extra],
                             method=method)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    return {f"{m}.{k}": v for m, sd in state["models"].items() for k, v in sd.items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_weights(phantom_project: Path, tmp_path: Path, workers: int) -> None:
    cfg = _cfg("naive", 4, "deterministic=true", f"data.num_workers={workers}", "ckpt_every=1")
    straight = tmp_path / "straight"
    train(phantom_project, cfg, straight, progress=False)
    halves = tmp_path / "halves"
    assert train(phantom_project, cfg, halves, progress=False, stop_after=2) == {"stopped_at": 2}
    train(phantom_project, cfg, halves, resume=True, progress=False)
    a, b = _weights(straight), _weights(halves)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # twin: a different seed gives different weights, so the equality above is not vacuous
    other = tmp_path / "other"
    train(phantom_project, _cfg("naive", 4, "deterministic=true", "seed=1"), other, progress=False)
    c = _weights(other)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_training_writes_everything(phantom_project: Path, tmp_path: Path) -> None:
    from unionseg.modelfile import load_model

    run = tmp_path / "naive"
    summary = train(phantom_project, _cfg("naive", 3), run, progress=False)
    for name in ("config.yaml", "last.pt", "model.pt", "log.csv", "summary.json"):
        assert (run / name).is_file(), name
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert {"step", "lr", "data_wait", "loss", "ce", "dice"} <= set(header)
    payload = load_model(run / "model.pt")
    assert payload["method"] == "naive" and payload["output_form"] == "softmax"
    assert 0.0 <= summary["best_val_mean_dice"] <= 1.0
    # the region mean the regions rule ranks on is the mean of the validated organ regions, nothing else
    (entry,) = summary["history"]
    regions = [v for k, v in entry.items() if k.startswith("model/region:")]
    assert len(regions) == 4 and any(k.startswith("model/") and "tumour" in k for k in entry)
    assert entry["model/region_mean"] == pytest.approx(sum(regions) / len(regions))
    # where the model file comes from: its step, the project and data it learnt from, the recipe's hash
    assert summary["selected_at_step"] == 3 == payload["provenance"]["selected_at_step"]
    assert summary["project"] == str(phantom_project)
    assert summary["data_fingerprint"] == payload["provenance"]["data_fingerprint"]
    assert summary["config_hash"] == payload["provenance"]["config_hash"]


def test_tensorboard_shows_the_validation_curve(phantom_project: Path, tmp_path: Path) -> None:
    """The loss terms per step and, under val/, every validation's Dice per class (what validation.json
    holds), so that one TensorBoard page shows both curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(phantom_project, _cfg("naive", 4, "val_every=2"), run, progress=False)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "val/model/region:liver", "val/model/mean_dice", "val/model/region_mean"} <= tags
    history = json.loads((run / "validation.json").read_text())
    curve = [(e.step, e.value) for e in events.Scalars("val/model/region:liver")]
    assert curve == [(h["step"], pytest.approx(h["model/region:liver"])) for h in history]
    assert [h["step"] for h in history] == [2, 4]


def test_training_off_a_terminal_prints_timed_lines(phantom_project: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Under nohup or SLURM (stdout a file) the bar cannot draw: every step gives a line here (interval 0),
    with the count, the ETA and the loss terms, before the run ends."""
    monkeypatch.setenv("UNIONSEG_PROGRESS_SECONDS", "0")
    train(phantom_project, _cfg("naive", 3), tmp_path / "run", progress=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("naive: ")]  # stderr, as all progress
    steps = [x for x in lines if "validating" not in x]
    assert [x.split(",")[0] for x in steps] == ["naive: 1/3 (33%)", "naive: 2/3 (67%)", "naive: 3/3 (100%)"]
    assert "ETA" in steps[0] and "loss=" in steps[0] and "ETA" not in steps[-1]
    # the validation after the last step says how far it got (a long one printed nothing, like a hang)
    cases = len(validation_cases(make_context(phantom_project, _cfg("naive", 3), tmp_path / "ctx")))
    assert [x.rsplit(", ", 1)[-1] for x in lines[lines.index(steps[-1]) + 1:]] == \
        [f"validating: case {k}/{cases}" for k in range(cases + 1)]


def test_resume_refuses_another_config(phantom_project: Path, tmp_path: Path) -> None:
    from unionseg.errors import CheckpointError

    run = tmp_path / "run"
    train(phantom_project, _cfg("naive", 2), run, progress=False)
    with pytest.raises(CheckpointError, match="different configuration") as refused:
        train(phantom_project, _cfg("naive", 3), run, resume=True, progress=False)
    # the message names what changed (steps, and val_every / ckpt_every that _cfg ties to it)
    assert "steps: 2 -> 3" in str(refused.value) and "val_every: 2 -> 3" in str(refused.value)
    with pytest.raises(CheckpointError, match="select_on: 'all' -> 'regions'") as refused:
        train(phantom_project, _cfg("naive", 2, "select_on=regions", "log_every=2", "data.num_workers=1"), run,
              resume=True, progress=False)
    # the settings a resume may change are not listed as the reason: the user undid them for nothing (helper-77)
    assert "log_every" not in str(refused.value) and "num_workers" not in str(refused.value)
    # a longer run alone says how to get one
    with pytest.raises(CheckpointError, match=r"steps: 2 -> 5; to train on, start a new run from this one's "
                                              rf"weights \(init_from={re.escape(str(run / 'model.pt'))}\)"):
        train(phantom_project, _cfg("naive", 2, "steps=5"), run, resume=True, progress=False)
    # where it runs, how often it logs or checkpoints and how many loader workers it has are no change to the
    # run (none changes the weights); nor is a
    # dataset weight of 1 (the default) given or left out; another weight is
    stopped = tmp_path / "stopped"
    train(phantom_project, _cfg("naive", 3, "ckpt_every=1"), stopped, progress=False, stop_after=1)
    # stopped before its first model file: the advice is to finish it first, not an init_from of no file
    assert not (stopped / "model.pt").exists()
    with pytest.raises(CheckpointError, match=r"steps: 3 -> 5; a run's schedule is set by its steps: resume with "
                                              r"steps=3 to finish it, then start a new run from its weights"):
        train(phantom_project, _cfg("naive", 3, "ckpt_every=1", "steps=5"), stopped, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"data.dataset_weights: \{\} -> \{'liver': 2\}"):
        train(phantom_project, _cfg("naive", 3, "ckpt_every=1", "data.dataset_weights={liver: 2}"), stopped,
              resume=True, progress=False)
    train(phantom_project, _cfg("naive", 3, "ckpt_every=1", "data.dataset_weights={liver: 1}"), stopped,
          resume=True, progress=False, stop_after=2)
    summary = train(phantom_project, _cfg("naive", 3, "ckpt_every=2", "device=auto", "log_every=2",
                                          "data.num_workers=1"), stopped, resume=True, progress=False)
    assert summary["steps"] == 3


def test_a_refused_resume_changes_nothing_and_trains_no_stage(phantom_project: Path, tmp_path: Path) -> None:
    """The checkpoint is checked before config.yaml is written and before the method's stages run: a resume
    as another method (cotraining, whose stages train experts) is refused at once, the folder untouched."""
    from unionseg.errors import CheckpointError, UnionsegWarning

    run = tmp_path / "run"
    train(phantom_project, _cfg("naive", 2), run, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="method: 'naive' -> 'cotraining'"):
        train(phantom_project, _cfg("cotraining", 2), run, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # a finished run whose last.pt was removed (to save space): --resume has nothing to continue; it trained
    # again from step 0 over the model file without a word
    (run / "last.pt").unlink()
    with pytest.raises(CheckpointError, match="this run finished, and its checkpoint .* is gone"):
        train(phantom_project, _cfg("naive", 2), run, resume=True, progress=False)
    # cut during the stages (no checkpoint, no model yet): --resume continues only the same method
    for name in ("summary.json", "model.pt", "validation.json"):
        (run / name).unlink()
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="holds a 'naive' run; --resume continues it only as 'naive'"):
        train(phantom_project, _cfg("mskd", 2), run, resume=True, progress=False)
    assert not (run / "stages.json").exists()
    # ... and only with the same configuration: `individual` writes no checkpoint (nothing of its own to
    # train), so this is where a resume with other overrides would build other experts over its model file
    with pytest.raises(CheckpointError, match="another configuration .*steps: 2 -> 3"):
        train(phantom_project, _cfg("naive", 3), run, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept
    train(phantom_project, _cfg("naive", 2, "log_every=2"), run, resume=True, progress=False)  # a run setting
    # killed before its first checkpoint, with a model file: it starts again, and says so
    (run / "last.pt").unlink()
    (run / "summary.json").unlink()
    with pytest.warns(UnionsegWarning, match="no checkpoint .*starts again from step 0.*model.pt will be replaced"):
        train(phantom_project, _cfg("naive", 2), run, resume=True, progress=False)


@pytest.mark.skipif(sys.platform == "win32", reason="advisory locks (fcntl) are POSIX")
def test_a_second_training_into_a_busy_run_folder_is_refused_and_dead_temporaries_go(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--resume`` while another process still trains into the folder (a scheduler's requeue) ran beside
    it, interleaving log.csv and writing over its checkpoints; now it stops at once, naming the holder. With
    the folder to itself, a training removes the temporaries of killed writers (``.model.pt.<pid>.tmp`` were
    never removed); a folder made for a refused run is not left behind."""
    from unionseg.errors import CheckpointError, UnionsegError
    from unionseg.training.trainer import RUN_LOCK

    run = tmp_path / "run"
    train(phantom_project, _cfg("naive", 2), run, progress=False)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom unionseg.locking import FileLock\n"
        f"FileLock({str(run / RUN_LOCK)!r}, 'x').acquire()\nprint('held', flush=True)\ntime.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        with pytest.raises(UnionsegError, match=rf"run folder .* is in use by pid {holder.pid}.*another --out"):
            train(phantom_project, _cfg("naive", 2), run, resume=True, progress=False)
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = run / f".model.pt.{int(gone.stdout)}.tmp"
    dead.write_bytes(b"half a model")
    train(phantom_project, _cfg("naive", 2), run, resume=True, progress=False)
    assert not dead.exists()
    with pytest.raises(CheckpointError, match="model file not found"):  # refused before anything is written: no folder left, nor its parents
        train(phantom_project, _cfg("naive", 2, "init_from=" + str(tmp_path / "missing.pt")),
              tmp_path / "new" / "deeper", progress=False)
    assert not (tmp_path / "new").exists()
    # a failure between taking the lock and training (the ranks' agreement, here) lets the lock go
    import unionseg.training.distributed as distributed

    def broken(flag: bool, device: torch.device) -> bool:
        raise RuntimeError("a rank died")

    monkeypatch.setattr(distributed, "any_rank", broken)
    with pytest.raises(RuntimeError, match="a rank died"):
        train(phantom_project, _cfg("naive", 2), run, resume=True, progress=False)
    taken = subprocess.run([sys.executable, "-c", "from unionseg.locking import FileLock\n"
                            f"FileLock({str(run / RUN_LOCK)!r}, 'x').acquire(timeout=0)"], capture_output=True, text=True)
    assert taken.returncode == 0, taken.stderr


def test_resuming_a_finished_run_says_there_is_nothing_to_train(
        phantom_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--resume of a finished run did no work and said nothing; now it says so, and keeps the model file and
    the summary as the run wrote them (its times grew by each resume's start-up), returning that summary."""
    run = tmp_path / "run"
    first = train(phantom_project, _cfg("naive", 2), run, progress=False)
    model, summary = (run / "model.pt").read_bytes(), (run / "summary.json").read_bytes()
    logs = sorted(p.name for p in run.rglob("*") if p.is_file() and p.parent.name in ("tb", run.name))
    capsys.readouterr()
    again = train(phantom_project, _cfg("naive", 2), run, resume=True, progress=True)
    # no new file either (an empty TensorBoard events file each time; helper-96)
    assert sorted(p.name for p in run.rglob("*") if p.is_file() and p.parent.name in ("tb", run.name)) == logs
    assert f"{run}: the run had finished (step 2 of 2); nothing to train" in capsys.readouterr().err
    assert (run / "model.pt").read_bytes() == model and (run / "summary.json").read_bytes() == summary
    assert again == json.loads(summary) and again["run_seconds"] == first["run_seconds"]
    (run / "summary.json").write_text("not json")  # a broken summary is written anew
    assert train(phantom_project, _cfg("naive", 2), run, resume=True, progress=False)["steps"] == 2
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """torch reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``
    (the OSError only in its context), so a full disk during a checkpoint printed a 60-line traceback; now
    the CLI prints its one line for a full disk, naming the checkpoint (the file's close, flushing its buffer,
    fails again without a file name; that error was the one shown), and no temporary is left."""
    from unionseg.cli import run

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full, a device whose every write fails with ENOSPC")
    real_open = Path.open

    def full_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "wb" and self.name.startswith(".last.pt."):  # the checkpoint's temporary: a full disk
            return real_open(Path("/dev/full"), mode, *args, **kwargs)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_open)
    out = tmp_path / "run"
    code = run(["train", str(phantom_project), "-m", "naive", "-o", str(out), "--quiet", *TINY, "steps=2",
                "val_every=2", "ckpt_every=2", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "enforce fail" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == f"error: {out / 'last.pt'}: No space left on device: free space (or raise the quota) and run " \
                   "the same command with --resume; finished outputs are kept", err  # the same: "already holds a run"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".last.pt.")]


def test_resume_refuses_other_data(phantom_project: Path, tmp_path: Path) -> None:
    """A checkpoint records the label space and the training and validation cases it learnt from; a resume
    whose project differs in either is refused and names the difference; the same cases with changed files
    (edited, re-prepared, copied without their times) go on with a warning."""
    from unionseg.errors import CheckpointError
    from unionseg.training.checkpoint import atomic_torch_save

    cfg = _cfg("naive", 2, "ckpt_every=1")
    run = tmp_path / "run"
    assert train(phantom_project, cfg, run, progress=False, stop_after=1) == {"stopped_at": 1}
    state = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    data = state["data"]
    assert data["project"] == str(phantom_project) and data["cases"]["train"] and data["cases"]["val"]

    def resume_with(**changed: object) -> None:
        atomic_torch_save({**state, "data": {**data, **changed}}, run / "last.pt")
        train(phantom_project, cfg, run, resume=True, progress=False)

    first = data["cases"]["train"][0]
    with pytest.raises(CheckpointError, match=f"train cases changed .*1 new \\({first}\\)"):
        resume_with(cases={**data["cases"], "train": data["cases"]["train"][1:]})
    with pytest.raises(CheckpointError, match="val cases changed .*1 no longer there \\(liver/gone\\)"):
        resume_with(cases={**data["cases"], "val": [*data["cases"]["val"], "liver/gone"]})
    classes = data["label_space"]["classes"]
    with pytest.raises(CheckpointError, match="label space changed .*classes .*'gallbladder'"):
        resume_with(label_space={**data["label_space"], "classes": [*classes, {"name": "gallbladder"}]})
    from unionseg.errors import UnionsegWarning

    with pytest.warns(UnionsegWarning, match="same cases' prepared files changed"):
        resume_with(fingerprint="0" * 16)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    # only what training reads: the test set may change under a run
    assert "test" not in {d["name"] for d in data["label_space"]["datasets"]} and set(data["cases"]) == {"train", "val"}
    # a checkpoint of an earlier version (no best_step) finishes naming the model file's step, not 0
    finished = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    atomic_torch_save({k: v for k, v in finished.items() if k != "best_step"}, run / "last.pt")
    again = train(phantom_project, cfg, run, resume=True, progress=False)
    assert again["selected_at_step"] == summary["selected_at_step"] == 2


def test_resume_after_an_interruption_logs_each_step_once(phantom_project: Path, tmp_path: Path) -> None:
    """Rows logged after the last checkpoint are trained again on resume; log.csv keeps them once."""
    run = tmp_path / "run"
    cfg = _cfg("naive", 4, "ckpt_every=2")
    assert train(phantom_project, cfg, run, progress=False, stop_after=3) == {"stopped_at": 3}
    state = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    state["step"] = 2  # as if killed after step 3 was logged but before its checkpoint
    state["timings"]["stages"] = 100.0  # as if the first process had spent 100 s on shared experts
    from unionseg.training.checkpoint import atomic_torch_save

    atomic_torch_save(state, run / "last.pt")
    trained_before = state["timings"]["total"]
    assert trained_before > 0
    with (run / "log.csv").open("a") as fh:  # and killed while appending a row: log.csv is appended in place
        fh.write("2,0.5")
    summary = train(phantom_project, cfg, run, resume=True, progress=False)
    lines = (run / "log.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 2, 3, 4]
    assert {line.count(",") for line in lines} == {lines[0].count(",")}  # no torn row, none run together
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]  # step 3 once in TensorBoard too
    # the summary times the whole run, the steps before the checkpoint included; resuming a finished run
    # keeps that figure (it read 0.0)
    assert summary["train_seconds"] > trained_before
    # the wall time after the stages, validation and checkpoints included, is kept the same way: the
    # benchmark adds the earlier process's to its own clock (it reported the last process's alone)
    earlier = state["timings"]["run"]
    assert summary["run_seconds_earlier"] == pytest.approx(earlier) and earlier > trained_before
    assert summary["run_seconds"] > earlier
    again = train(phantom_project, cfg, run, resume=True, progress=False)  # finished: the summary as written
    assert again["train_seconds"] == pytest.approx(summary["train_seconds"])
    assert again["run_seconds"] == pytest.approx(summary["run_seconds"])
    assert again["run_seconds_earlier"] == pytest.approx(summary["run_seconds_earlier"])
    # the whole run's stage time is restored; the benchmark subtracts only this process's from its wall time
    # (the earlier processes' 100 s plus this one's, which approx(100.0) missed once it passed 0.1 ms)
    assert summary["stage_seconds"] == pytest.approx(100.0 + summary["stage_seconds_this_process"])
    assert summary["stage_seconds_this_process"] < 5.0  # nothing left to build: no stage time (a bound a stall keeps)


def test_ctrl_c_says_where_resume_goes_on_from(phantom_project: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from unionseg.training.trainer import Trainer

    real = Trainer.train_step

    def step(self: Trainer, batch: dict) -> dict[str, float]:
        if self.step == 3:  # the fourth step: after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        train(phantom_project, _cfg("naive", 6, "ckpt_every=2"), tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "interrupted at step 3; the last checkpoint" in err and "holds step 2: `unionseg train` with" in err
    # the resume, stopped while its loader starts (before the steps), says the same (only "interrupted")
    import unionseg.training.data as data

    monkeypatch.setattr(data, "build_loader", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(phantom_project, _cfg("naive", 6, "ckpt_every=2"), tmp_path / "run", resume=True, progress=False)
    assert f"stopped at step 2; the checkpoint ({tmp_path / 'run' / 'last.pt'}) holds it" in capsys.readouterr().err


def test_ctrl_c_in_the_expert_stage_says_it_stopped_an_expert(phantom_project: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C while co-training trains its shared experts said "stopped at step 2", in the expert's folder,
    as if the user's run were done, and the resume "the run had finished" (helper-131): the messages now say
    whose steps they count and that the run's later stages follow."""
    import shutil as sh

    from unionseg.training.trainer import Trainer

    real = Trainer.train_step

    def step(self: Trainer, batch: dict) -> dict[str, float]:
        if self.cfg.method == "expert" and self.step == 2:  # after the expert's step-2 checkpoint
            raise KeyboardInterrupt
        return real(self, batch)

    project = tmp_path / "data"  # experts of its own: the shared cache's finished ones would not train
    sh.copytree(phantom_project.parent, project, ignore=sh.ignore_patterns("artifacts"))
    monkeypatch.setattr(Trainer, "train_step", step)
    cfg = _cfg("cotraining", 2, "expert_steps=4", "ckpt_every=1")
    with pytest.raises(KeyboardInterrupt):
        train(project / "project.yaml", cfg, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    expert = "the shared expert of dataset 'liver' (stage experts of this run) of 4 steps: "
    assert f"{expert}stopped at step 2; the checkpoint (" in err and "/experts/liver/last.pt) holds it" in err
    assert ("the command that started the run goes on from there when given again (`unionseg train` with --resume, "
            "`unionseg benchmark` as it was), this expert first, then the run's later stages") in err
    import unionseg.training.data as data

    monkeypatch.setattr(data, "build_loader", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(project / "project.yaml", cfg, tmp_path / "run", resume=True, progress=True)
    err = capsys.readouterr().err
    assert "experts/liver: the shared expert of dataset 'liver' (stage experts of this run) resuming at step 2 of 4" \
        in err and f"{expert}stopped at step 2" in err


def test_ctrl_c_finishes_the_step_and_writes_its_checkpoint(phantom_project: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """One Ctrl-C: the running step ends, a checkpoint of it is written (none was due), and --resume from
    it gives the weights of an uninterrupted run; the signal handlers are restored afterwards."""
    import signal

    from unionseg.training.trainer import Trainer, _StopRequest

    cfg = _cfg("naive", 6, "deterministic=true", "ckpt_every=100")
    straight = tmp_path / "straight"
    train(phantom_project, cfg, straight, progress=False)
    real = Trainer.train_step

    def step(self: Trainer, batch: dict) -> dict[str, float]:
        if self.step == 3:  # Ctrl-C during the fourth step, forwarded twice (torchrun sends its own too)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(_StopRequest, "REPEAT_WINDOW", 30.0)  # a stall between the two kills is still one press
    before = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(phantom_project, cfg, run, progress=False)
    assert signal.getsignal(signal.SIGINT) is before
    err = capsys.readouterr().err
    assert "SIGINT: stopping after this step to write a checkpoint" in err
    assert "stopped at step 4; the checkpoint" in err and "--resume" in err and "train(..., resume=True) in Python" in err
    assert "benchmark" not in err  # a plain train was told of the benchmark command too (helper-112)
    assert safe_torch_load(run / "last.pt", "unionseg-checkpoint")["step"] == 4
    monkeypatch.setattr(Trainer, "train_step", real)
    train(phantom_project, cfg, run, resume=True, progress=False)
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(line.split(",")[0]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_run_killed_during_a_validation_keeps_its_step_and_validates_it_on_resume(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A stop waits for a running validation, and torchrun kills the ranks after its shutdown grace: every step
    since the last checkpoint was lost (helper-79). A validation step is checkpointed first, its validation
    marked as to do; --resume runs that validation first, and the run ends as an uninterrupted one."""
    from unionseg.training.trainer import Trainer

    cfg = _cfg("naive", 6, "deterministic=true", "val_every=3", "ckpt_every=100")
    straight = tmp_path / "straight"
    train(phantom_project, cfg, straight, progress=False)
    real = Trainer.validate

    def killed(self: Trainer) -> None:
        if self.step == 3:  # what a SIGKILL mid-validation leaves: nothing after this point runs
            raise SystemExit(137)
        real(self)

    monkeypatch.setattr(Trainer, "validate", killed)
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        train(phantom_project, cfg, run, progress=False)
    state = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    assert state["step"] == 3 and state["validation_pending"] is True and state["history"] == []
    monkeypatch.setattr(Trainer, "validate", real)
    capsys.readouterr()
    train(phantom_project, cfg, run, resume=True, progress=True)
    assert "resuming at step 3 of 6 (first its validation, which the stop interrupted)" in capsys.readouterr().err
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ours, theirs = (json.loads((r / "validation.json").read_text()) for r in (run, straight))
    assert [h["step"] for h in ours] == [h["step"] for h in theirs] == [3, 6]
    assert ours == theirs
    assert safe_torch_load(run / "last.pt", "unionseg-checkpoint")["validation_pending"] is False


@pytest.mark.parametrize("at", [3, 6])
def test_a_stop_asked_at_a_validation_step_does_not_wait_for_the_validation(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], at: int) -> None:
    """Ctrl-C during the step before a validation stops without validating (the checkpoint holds it as to do:
    a stop no longer waits for a validation it can skip); --resume validates first, also after the last step,
    and a further --resume has nothing left to run (helper-82)."""
    import signal

    from unionseg.training.trainer import Trainer

    cfg = _cfg("naive", 6, "deterministic=true", "val_every=3", "ckpt_every=100")
    straight = tmp_path / "straight"
    train(phantom_project, cfg, straight, progress=False)
    real, validated = Trainer.train_step, []
    real_validate = Trainer.validate

    def step(self: Trainer, batch: dict) -> dict[str, float]:
        if self.step == at - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch)

    def validate(self: Trainer) -> None:
        validated.append(self.step)
        real_validate(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(Trainer, "validate", validate)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(phantom_project, cfg, run, progress=False)
    assert validated == ([] if at == 3 else [3])
    state = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    assert state["step"] == at and state["validation_pending"] is True
    monkeypatch.setattr(Trainer, "train_step", real)
    capsys.readouterr()
    train(phantom_project, cfg, run, resume=True, progress=True)
    err = capsys.readouterr().err
    assert validated == [3, 6]
    assert ("resuming at step 3 of 6 (first its validation" in err if at == 3 else
            "its last validation, which the stop interrupted, runs now" in err)
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "validation.json").read_text()) == json.loads((straight / "validation.json").read_text())
    assert safe_torch_load(run / "last.pt", "unionseg-checkpoint")["validation_pending"] is False
    train(phantom_project, cfg, run, resume=True, progress=True)
    assert validated == [3, 6] and "nothing to train" in capsys.readouterr().err


def test_a_second_ctrl_c_stops_at_once(phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import signal
    import time

    from unionseg.training.trainer import Trainer, _StopRequest

    real = Trainer.train_step

    def step(self: Trainer, batch: dict) -> dict[str, float]:
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # a second press, after the repeat window
            os.kill(os.getpid(), signal.SIGINT)  # raises here: the step never finishes
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(_StopRequest, "REPEAT_WINDOW", 0.05)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(phantom_project, _cfg("naive", 6, "ckpt_every=2"), run, progress=False)
    assert "interrupted at step 3; the last checkpoint" in capsys.readouterr().err
    assert safe_torch_load(run / "last.pt", "unionseg-checkpoint")["step"] == 2


def test_the_ranks_agree_on_the_strongest_stop_request(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Under DDP a SIGTERM sent to one worker (``kill`` of rank 1's pid) stopped every rank at one step but
    rank 0, which had not received it, exited 130 ("interrupted") and nobody said why; now every rank takes
    the strongest request of any (SIGTERM over SIGINT), and rank 0 says that another rank received it."""
    from unionseg.stopping import Terminated
    from unionseg.training import distributed
    from unionseg.training.trainer import _StopRequest

    cpu = torch.device("cpu")
    alone = _StopRequest()
    assert not alone.agreed(cpu) and alone.requested is None  # one process, nothing asked
    alone.requested = "SIGINT"
    assert alone.agreed(cpu) and alone.requested == "SIGINT"
    others: list[int] = [2]  # what the other ranks hold: SIGTERM
    monkeypatch.setattr(distributed, "max_rank", lambda value, device: max([value, *others]))
    rank0 = _StopRequest()
    assert rank0.agreed(cpu) and rank0.requested == "SIGTERM"
    assert "SIGTERM (to another rank): stopping at this step" in capsys.readouterr().err
    import signal

    rank0._at -= 60  # its own copy, forwarded late (torchrun signals its ranks one by one; a stall under
    rank0._handle(signal.SIGTERM, None)  # load): the same request, not a second one that stops at once
    assert rank0.requested == "SIGTERM"
    rank0._at -= 60
    with pytest.raises(Terminated):  # a second signal of its own, after the repeat window: at once
        rank0._handle(signal.SIGTERM, None)
    pressed = _StopRequest()
    pressed.requested = "SIGINT"  # Ctrl-C here, SIGTERM there: the ranks exit as terminated, alike
    assert pressed.agreed(cpu) and pressed.requested == "SIGTERM"
    assert capsys.readouterr().err == ""  # rank 0 already said it was stopping
    others[0] = 0
    assert not _StopRequest().agreed(cpu)


def test_a_signal_ignored_by_the_parent_stays_ignored_in_the_steps() -> None:
    """`unionseg train ... &` in a script starts with SIGINT ignored: the stages ignored `kill -INT`, the
    steps stopped on it (helper-99). The steps keep it ignored; SIGTERM is still theirs."""
    import signal

    from unionseg.training.trainer import _StopRequest

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_in_a_terminal_stops_train_with_a_checkpoint(phantom_project: Path, tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole process group, loader workers included: `unionseg train`
    still finishes its step, writes the checkpoint and exits 130 with the resume hint."""
    import signal

    run = tmp_path / "run"
    cmd = [str(console_script("unionseg")), "train", str(phantom_project), "--method", "naive", "-o", str(run),
           "--quiet", *TINY, "steps=400", "val_every=400", "ckpt_every=1000", "data.num_workers=1", "device=cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_log_rows(proc, run / "log.csv", 3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    step = safe_torch_load(run / "last.pt", "unionseg-checkpoint")["step"]
    assert 3 <= step < 400
    assert f"stopped at step {step}; the checkpoint" in err and "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM delivered to oneself is POSIX")
def test_sigterm_stops_train_with_a_checkpoint_and_exit_143(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``kill`` / a scheduler's time limit during training: the step finishes, its checkpoint is written, and
    the CLI says "terminated" and exits 143 (it exited 130, as for Ctrl-C, so a wrapper could not tell them
    apart); the handler of before comes back."""
    import signal

    from unionseg.cli import run
    from unionseg.training import trainer

    def terminate_at_two(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "_test_kill_hook", terminate_at_two)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    code = run(["train", str(phantom_project), "-m", "naive", "-o", str(out), "--quiet", *TINY, "steps=6",
                "val_every=100", "ckpt_every=100", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 143, err
    assert signal.getsignal(signal.SIGTERM) is before
    assert safe_torch_load(out / "last.pt", "unionseg-checkpoint")["step"] == 2
    assert "stopped at step 2; the checkpoint" in err and err.rstrip().endswith("terminated")


def test_cli_train_takes_the_recipe_method_and_guards_the_run_folder(
        phantom_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``-c configs/marginal.yaml`` trains marginal (it trained naive: --method's default overrode the
    recipe); --method against the recipe is refused; a folder holding any run (an ``individual`` run
    writes no last.pt) is never overwritten without --resume."""
    import yaml

    from unionseg.cli import run

    recipe = Path(__file__).resolve().parents[1] / "configs" / "marginal.yaml"
    tiny = [*TINY, "steps=1", "val_every=1", "ckpt_every=1", "expert_steps=1", "--quiet"]
    out = tmp_path / "m"
    assert run(["train", str(phantom_project), "-c", str(recipe), "-o", str(out), *tiny]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == "marginal"
    assert run(["train", str(phantom_project), "-c", str(recipe), "-m", "dodnet", "-o", str(tmp_path / "d"),
                *tiny]) == 2
    assert "the recipe says 'marginal', --method says 'dodnet'" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text("method: 5\n")
    assert run(["train", str(phantom_project), "-c", str(typo), "-o", str(tmp_path / "t"), *tiny]) == 2
    assert "method: expected a method name, got 5" in capsys.readouterr().err
    ind = tmp_path / "ind"
    assert run(["train", str(phantom_project), "-m", "individual", "-o", str(ind), *tiny]) == 0
    assert not (ind / "last.pt").exists()
    model = (ind / "model.pt").read_bytes()
    assert run(["train", str(phantom_project), "-m", "naive", "-o", str(ind), *tiny]) == 2
    assert "run folder already holds a run" in capsys.readouterr().err
    assert (ind / "model.pt").read_bytes() == model
    # the same from Python: train() itself refuses (only the CLI did; a second train() replaced the run),
    # and takes the loaded project as well as its path
    from unionseg.config import load_project
    from unionseg.errors import ConfigError, UnionsegError
    from unionseg.training.config import load_train_config
    from unionseg.training.recipes import default_recipe

    with pytest.raises(UnionsegError, match=r"already holds a run \(model.pt, summary.json, .*nothing was overwritten"):
        train(load_project(phantom_project), _cfg("naive", 1), ind, progress=False)
    with pytest.raises(ConfigError, match=r"roots= with a loaded project: give them to load_project"):
        train(load_project(phantom_project), _cfg("naive", 1), tmp_path / "roots", roots={"liver": "x"},
              progress=False)
    assert (ind / "model.pt").read_bytes() == model
    with pytest.raises(ConfigError, match="the recipe says 'marginal', the call says 'dodnet'"):
        load_train_config(recipe, method="dodnet")
    with pytest.raises(ConfigError, match=r"unknown method 'cotrainig' \(did you mean 'cotraining'\?\); known: "
                                          "conditional, cotraining"):
        default_recipe("cotrainig")
    # the papers' spellings point to the names (walkthrough, helper-131); a name far from all suggests none
    for spelled, name in (("DoDNet", "dodnet"), ("MS-KD", "mskd"), ("co_training", "cotraining")):
        with pytest.raises(ConfigError, match=rf"unknown method '{spelled}' \(did you mean '{name}'\?\)"):
            default_recipe(spelled)
    with pytest.raises(ConfigError, match=r"unknown method 'zebra'; known"):
        default_recipe("zebra")
    (tmp_path / "afile").write_text("keep")
    assert run(["train", str(phantom_project), "-o", str(tmp_path / "afile"), *tiny]) == 2
    assert "the run folder (--out) exists and is not a folder" in capsys.readouterr().err
    # a recipe of a few lines sits on the method's own: the learning rate it leaves out is the marginal
    # recipe's 0.02, not TrainConfig's bare 0.003
    partial = tmp_path / "mine.yaml"
    partial.write_text("method: marginal\nval_every: 1\n")
    capsys.readouterr()
    assert run(["train", str(phantom_project), "-c", str(partial), "-o", str(tmp_path / "mine"), *tiny]) == 0
    assert f"model: {tmp_path / 'mine' / 'model.pt'} (step 1 of 1)" in capsys.readouterr().out
    written = yaml.safe_load((tmp_path / "mine" / "config.yaml").read_text())
    assert written["method"] == "marginal" and written["optim"]["lr"] == 0.02


def test_a_user_recipe_merges_into_the_method_recipe(tmp_path: Path) -> None:
    """Mappings merge key by key: ``optim: {lr: ...}`` keeps the base's optimiser settings, a list or a
    plain value replaces the base's, and overrides still come last."""
    base = tmp_path / "base.yaml"
    base.write_text("method: dodnet\nsteps: 100\noptim: {name: sgd, lr: 0.02, warmup_steps: 5}\n"
                    "data: {patch_size: [48, 48, 48], fg_prob: 0.5}\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("optim: {lr: 0.01}\ndata: {patch_size: [32, 32, 32]}\n")
    cfg = load_train_config(mine, ["data.fg_prob=0.9"], base=base, method="dodnet")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps) == ("sgd", 0.01, 5, 100)
    assert cfg.data.patch_size == (32, 32, 32) and cfg.data.fg_prob == 0.9
    bare = load_train_config(mine, method="dodnet")  # without a base: the dataclass defaults fill the rest
    assert (bare.optim.name, bare.optim.warmup_steps) == ("adamw", 0)
    with pytest.raises(ConfigError, match="the recipe says 'dodnet', the call says 'naive'"):
        load_train_config(mine, base=base, method="naive")  # base's method counts too (it was accepted)


def test_train_config_is_what_the_cli_trains_with(tmp_path: Path) -> None:
    """From Python, load_train_config("mine.yaml") started from TrainConfig's bare defaults (lr 0.003) where
    `train -c mine.yaml` lays the file over the method's built-in recipe (lr 0.02): the same file trained
    another run (helper-70). train_config builds the CLI's configuration."""
    from unionseg.training.recipes import default_recipe, train_config

    mine = tmp_path / "mine.yaml"
    mine.write_text("method: dodnet\nsteps: 40\n")
    cfg = train_config(recipe=mine, overrides="seed=3")  # the method from the recipe
    builtin = load_train_config(default_recipe("dodnet"), method="dodnet")
    assert (cfg.method, cfg.steps, cfg.seed) == ("dodnet", 40, 3)
    assert cfg.optim == builtin.optim and cfg.options == builtin.options and cfg.data == builtin.data
    assert load_train_config(mine).optim.lr != builtin.optim.lr  # the low-level loader: bare defaults
    assert train_config("marginal").optim.lr == load_train_config(default_recipe("marginal")).optim.lr
    assert train_config().method == "naive"
    # overrides from Python: a mapping of Python values (it was "override 'steps' must look like key=value")
    mapped = train_config("dodnet", overrides={"steps": 7, "optim.lr": 0.01, "options.cross_task_weight": 0.25})
    assert (mapped.steps, mapped.optim.lr, mapped.options["cross_task_weight"]) == (7, 0.01, 0.25)
    with pytest.raises(ConfigError, match=r"<overrides>: override 'stepz': unknown key 'stepz'"):
        train_config("dodnet", overrides={"stepz": 7})
    with pytest.raises(ConfigError, match=r"override 3 must look like key=value \(or give a mapping"):
        train_config("dodnet", overrides=[3])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="the recipe says 'dodnet', the call says 'naive'"):
        train_config("naive", mine)
    # the method's options are checked here as well, as its docstring says (only train() refused them; helper-106)
    with pytest.raises(ConfigError, match=r"options of method 'marginal': .*nope"):
        train_config("marginal", overrides=["options.nope=1"])
    # and the network it would build (helper-119 met a misspelt preset only at train())
    with pytest.raises(ConfigError, match=r"network.preset must be one of \['cpu', 'gpu', 'tiny'\] for the "
                                          r"resunet backbone, got 'small'"):
        train_config("marginal", overrides={"network.preset": "small"})
    with pytest.raises(ConfigError, match=r"data.patch_size: \[36, 36, 36\] does not fit the resunet backbone"):
        train_config("naive", overrides=["data.patch_size=[36,36,36]"])


@pytest.mark.parametrize(("override", "problem"), [
    ("data.patch_size=[36,36,36]", "data.patch_size: [36, 36, 36] does not fit the resunet backbone"),
    ("inference.roi_size=[20,32,32]", "inference.roi_size: [20, 32, 32] does not fit"),
    ("device=gpu", "device: 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("device=cuda", "this machine has no CUDA device"),
    ("seed=-1", "seed: must be in [0, 2**32)"),
    ("data.num_workers=-1", "num_workers: must be >= 0"),
    ("inference.overlap=1.0", "overlap: must be in [0, 1)"),
    ("inference.sw_batch_size=0", "sw_batch_size: must be >= 1"),
    ("optim.lr=.nan", "lr: must be a positive number"),
    ("optim.poly_power=-1", "poly_power: must be positive"),
    ("val_max_cases=0", "val_max_cases: must be >= 1"),
    ("ckpt_every=0", "ckpt_every: must be >= 1, got 0"),  # each named: the three were named together
])
def test_cli_train_refuses_bad_overrides_before_any_work(
        phantom_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
        problem: str) -> None:
    """Each was a traceback, some only at the first validation or the last step of the run."""
    from unionseg.cli import run

    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")

    out = tmp_path / "r"
    assert run(["train", str(phantom_project), "-o", str(out), *TINY, "steps=2", override, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0], err
    assert not out.exists()


def test_resume_refuses_changed_option_defaults(phantom_project: Path, tmp_path: Path) -> None:
    """A checkpoint records the options it ran, defaults filled in; a unionseg whose defaults differ refuses
    to continue it (the recipe, and so the config hash, did not change) and names the option. Twin: a
    checkpoint written before an option existed (lr_scale, added later with the old behaviour as its
    default) resumes."""
    from unionseg.errors import CheckpointError
    from unionseg.training.checkpoint import atomic_torch_save

    cfg = _cfg("dodnet", 2, "ckpt_every=1")
    run = tmp_path / "run"
    assert train(phantom_project, cfg, run, progress=False, stop_after=1) == {"stopped_at": 1}
    state = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    assert state["options"]["dice_weight"] == 1.0
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    older = {**state, "options": {k: v for k, v in state["options"].items() if k != "lr_scale"}}
    assert older["options"] != state["options"]
    atomic_torch_save(older, twin / "last.pt")
    state["options"]["dice_weight"] = 2.0  # as if written by a version whose default was 2
    atomic_torch_save(state, run / "last.pt")
    with pytest.raises(CheckpointError, match=r"dice_weight: 2\.0 -> 1\.0"):
        train(phantom_project, cfg, run, resume=True, progress=False)
    train(phantom_project, cfg, twin, resume=True, progress=False)
    assert (twin / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["naive", "oracle", "marginal", "individual", "multihead", "conditional", "dodnet",
                                    "cotraining", "mskd"])
def test_every_method_trains_and_predicts(phantom_project: Path, tmp_path: Path, method: str,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """... and every trainable parameter gets a gradient in every step, as ``Method.unused_parameters``
    (False for all) tells DDP: a parameter left out of a step under DDP stops the run at the next step."""
    from unionseg.inference.predictor import Predictor
    from unionseg.modelfile import load_model
    from unionseg.training.trainer import Trainer

    without_grad: list[str] = []
    real_step = Trainer.train_step

    def checked_step(self: Trainer, batch: dict) -> dict:
        terms = real_step(self, batch)
        if self.method.name == method:  # not the shared experts some methods train first
            without_grad.extend(f"{k}.{n}" for k, m in self.method.raw_models.items()
                                for n, p in m.named_parameters() if p.requires_grad and p.grad is None)
        return terms

    monkeypatch.setattr(Trainer, "train_step", checked_step)
    run = tmp_path / method
    train(phantom_project, _cfg(method, 2), run, progress=False)
    from unionseg.methods.base import get_method

    # every built-in method uses all its parameters (DDP then needs no find_unused_parameters); the check
    # skipped a method that declared otherwise (helper-123)
    assert not get_method(method).unused_parameters and without_grad == [], without_grad
    # `unionseg info MODEL.pt` describes it: method, size, network, what inputs go through, where it comes from
    from unionseg.cli import run as cli

    capsys.readouterr()
    assert cli(["info", str(run / "model.pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    n_params = sum(t.numel() for t in load_model(run / "model.pt")["state_dict"].values())
    article = "an" if method[0] in "aeiou" else "a"
    assert lines[0].endswith(f"{article} {method} model ({load_model(run / 'model.pt')['output_form']} outputs), "
                             f"{n_params:,} parameters")
    network = next(line for line in lines if line.startswith("network: "))
    assert "resunet" in network and "tiny" in network
    # the target spacing; an image's own is within one voxel's rounding of it (a whole number of voxels)
    assert any(line.startswith("inputs are resampled to about [") for line in lines)
    assert any(line.startswith("provenance: taken at step 2,") for line in lines)
    payload = load_model(run / "model.pt")
    assert payload["method"] == method
    image = sorted((phantom_project.parent / "datasets" / "test" / "imagesTr").glob("*.nii.gz"))[0]
    predictor = Predictor.from_checkpoint(run / "model.pt", device="cpu")
    out = predictor.predict_file(image, tmp_path / "pred.nii.gz")
    from unionseg.data.io import read_header

    assert read_header(out).same_grid(read_header(image))


@pytest.mark.parametrize("method", ["dodnet", "conditional"])
def test_merged_loss_trains_and_is_logged(phantom_project: Path, tmp_path: Path, method: str) -> None:
    """options.merged_weight > 0 adds, weighted, the marginal CE + Dice of the merged leaf distribution (every
    task's channels on every sample) and logs both terms, beside the cross-task negatives when both are on."""
    import csv

    from unionseg.errors import ConfigError

    run = tmp_path / "merged"
    train(phantom_project, _cfg(method, 2, "options.merged_weight=0.5", "options.cross_task_weight=0.25",
                                "data.fg_prob=1.0"), run, progress=False)
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert len(rows) == 2
    for r in rows:
        ce, dice, cross = float(r["merged_ce"]), float(r["merged_dice"]), float(r["cross_task"])
        assert ce > 0 and 0 < dice <= 1
        own = float(r["dice"]) + float(r["bce"])
        assert float(r["loss"]) == pytest.approx(own + 0.25 * cross + 0.5 * (ce + dice), rel=1e-4)
    # the merged loss alone, without the cross-task negatives (the paper's setting, without either term, is
    # test_cross_task_negatives_train_and_are_logged's plain run)
    alone = tmp_path / "alone"
    train(phantom_project, _cfg(method, 1, "options.merged_weight=1"), alone, progress=False)
    header = (alone / "log.csv").read_text().splitlines()[0].split(",")
    assert "merged_ce" in header and "cross_task" not in header
    with pytest.raises(ConfigError, match="weights"):
        train(phantom_project, _cfg(method, 1, "options.merged_weight=-1"), tmp_path / "bad", progress=False)


@pytest.mark.parametrize("method", ["dodnet", "multihead"])
def test_cross_task_negatives_train_and_are_logged(phantom_project: Path, tmp_path: Path, method: str) -> None:
    """options.cross_task_weight > 0 trains through the all-tasks forward, logs the term and adds it, weighted,
    to the loss (each sample's own organ is a negative for the other tasks' channels); the paper's setting
    (0) has no such term."""
    import csv

    from unionseg.errors import ConfigError

    run = tmp_path / "cross"
    train(phantom_project, _cfg(method, 2, "options.cross_task_weight=0.5", "data.fg_prob=1.0"), run,
          progress=False)
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert len(rows) == 2
    for r in rows:
        cross, parts = float(r["cross_task"]), float(r["dice"]) + float(r["bce"])
        assert cross > 0 and float(r["loss"]) == pytest.approx(parts + 0.5 * cross, rel=1e-4)
    plain = tmp_path / "plain"
    train(phantom_project, _cfg(method, 1), plain, progress=False)
    plain_header = (plain / "log.csv").read_text().splitlines()[0].split(",")
    assert "cross_task" not in plain_header and "merged_ce" not in plain_header
    with pytest.raises(ConfigError, match="weights"):
        train(phantom_project, _cfg(method, 1, "options.cross_task_weight=-1"), tmp_path / "bad", progress=False)
    with pytest.raises(ConfigError, match="cross_task_wieght"):  # a misspelt option is named, not ignored
        train(phantom_project, _cfg(method, 1, "options.cross_task_wieght=1"), tmp_path / "typo", progress=False)
    # the dynamic head's own options are DoDNet's: multihead has nothing they could change, and took them
    # without a word (its summary listing them as the run's options)
    dynamic = ("options.head_widths=[]", "options.fan_in_init=true", "options.controller_lr_scale=4")
    if method == "multihead":
        for option in dynamic:
            with pytest.raises(ConfigError, match=option.split("=")[0].split(".")[1] + ": unknown key"):
                train(phantom_project, _cfg(method, 1, option), tmp_path / "dyn", progress=False)
            assert not (tmp_path / "dyn").exists()
    else:
        train(phantom_project, _cfg(method, 1, *dynamic), tmp_path / "dyn", progress=False)


def test_dataset_weights_reach_the_sampler_by_name(phantom_project: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """data.dataset_weights names training datasets: the loader's sampler gets them by the method's dataset
    index; an unknown name or a weight < 1 is refused, naming it, before anything trains."""
    import unionseg.data.sampling as sampling
    from unionseg.errors import ConfigError
    from unionseg.methods.base import get_method
    from unionseg.training.data import build_loader
    from unionseg.training.trainer import make_context

    seen: list[dict[int, int]] = []

    class Spy(sampling.PatchSampler):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            seen.append(dict(kwargs.get("dataset_weights") or {}))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sampling, "PatchSampler", Spy)  # build_loader imports it from there at call time
    ctx = make_context(phantom_project, _cfg("naive", 1, "data.dataset_weights={kidney: 3}"), tmp_path / "r",
                       progress=False)
    build_loader(get_method("naive")(ctx), ctx, 0)
    assert ctx.train_datasets.index("kidney") != 0  # so that the expert below tells the two index lists apart
    assert seen[-1] == {ctx.train_datasets.index("kidney"): 3}
    # an expert indexes its one dataset as 0 and leaves the other datasets' weights out (dotted override form)
    ctx = make_context(phantom_project, _cfg("expert", 1, "options.dataset=kidney", "data.dataset_weights.kidney=3",
                                             "data.dataset_weights.liver=2"), tmp_path / "e", progress=False)
    build_loader(get_method("expert")(ctx), ctx, 0)
    assert seen[-1] == {0: 3}
    with pytest.raises(ConfigError, match="'lung' is not a training dataset"):
        train(phantom_project, _cfg("naive", 1, "data.dataset_weights={lung: 2}"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()  # it left config.yaml, which the corrected command took for a run
    with pytest.raises(ConfigError, match="dataset_weights.kidney"):
        train(phantom_project, _cfg("naive", 1, "data.dataset_weights={kidney: 0}"), tmp_path / "zero", progress=False)


def test_batches_are_pinned_for_a_gpu_run_only_and_cuda_n_becomes_the_current_device(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU machine a CPU run (or a gloo rank) pinned every batch, opening a CUDA context on GPU 0; and a
    one-process run on cuda:N left GPU 0 current, so its checkpoint held GPU 0's random state (helper-85)."""
    import unionseg.data.sampling as sampling
    from unionseg.methods.base import get_method
    from unionseg.training import distributed as dist
    from unionseg.training.data import build_loader
    from unionseg.training.trainer import make_context

    pinned: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sampling, "make_loader", lambda *a, **k: pinned.append(k.get("pin_memory")))
    ctx = make_context(phantom_project, _cfg("naive", 1, "device=cpu"), tmp_path / "r", progress=False)
    build_loader(get_method("naive")(ctx), ctx, 0)
    build_loader(get_method("naive")(ctx), dataclasses.replace(ctx, device=torch.device("cuda", 0)), 0)
    assert pinned == [False, True]

    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for device in (torch.device("cuda", 1), torch.device("cuda"), torch.device("cpu")):
        assert dist.setup(device) == device
    assert current == [torch.device("cuda", 1)]


def test_the_oracle_without_full_truth_is_refused_before_the_run_folder(tmp_path: Path) -> None:
    """A project without oracle_labels: -m oracle is refused and writes nothing, so -m naive into the same
    folder then trains (it was refused as 'holds an oracle run', with --resume too)."""
    from conftest import write_tiny_project
    from unionseg.config import load_project
    from unionseg.data.preprocess import prepare_project
    from unionseg.errors import DataError

    project = write_tiny_project(tmp_path / "p")
    prepare_project(load_project(project), workers=0, progress=False)
    run = tmp_path / "run"
    with pytest.raises(DataError, match="has no hidden full truth"):
        train(project, _cfg("oracle", 1), run, progress=False)
    assert not run.exists()
    assert train(project, _cfg("naive", 1), run, progress=False)["steps"] == 1


def test_experts_ignore_dataset_weights(phantom_project: Path, tmp_path: Path) -> None:
    """The shared experts' recipe drops data.dataset_weights (an expert draws from one dataset, so they change
    nothing): a weighted co-training or MS-KD run reuses the experts of an unweighted one."""
    from unionseg.artifacts import ArtifactCache
    from unionseg.config import config_hash

    plain = _cfg("cotraining", 1)
    weighted = _cfg("cotraining", 1, "data.dataset_weights={pancreas: 2}")
    assert config_hash(plain) != config_hash(weighted)
    assert ArtifactCache._expert_config(weighted).data.dataset_weights == {}
    assert config_hash(ArtifactCache._expert_config(weighted)) == config_hash(ArtifactCache._expert_config(plain))
    # the settings a resume may change key the same experts: `--resume log_every=5` (or device=cpu after a GPU
    # ran out of memory) retrained every shared expert in a new cache folder, silently (helper-77)
    first = make_context(phantom_project, plain, tmp_path / "a", progress=False)
    root = first.artifacts.root
    moved = _cfg("cotraining", 1, "log_every=5", "device=cpu", "data.num_workers=1", "ckpt_every=7")
    assert make_context(phantom_project, moved, tmp_path / "b", progress=False).artifacts.root == root
    longer = _cfg("cotraining", 1, "expert_steps=3")  # what an expert learns: other experts
    assert make_context(phantom_project, longer, tmp_path / "c", progress=False).artifacts.root != root
    # a cache made before the key left the checkpoint interval out (session 39) is still found and used
    keyed = ArtifactCache._keyed(ArtifactCache._expert_config(plain), legacy=True)
    legacy = root.parent / config_hash({"data": first.index.fingerprint, "recipe": config_hash(keyed),
                                        "seed": plain.seed})
    assert legacy != root
    legacy.mkdir(parents=True)
    assert make_context(phantom_project, plain, tmp_path / "d", progress=False).artifacts.root == legacy
    root.mkdir(parents=True)  # where both exist, the current key's
    assert make_context(phantom_project, plain, tmp_path / "e", progress=False).artifacts.root == root


def test_task_methods_scale_the_budget_learning_rate(phantom_project: Path, tmp_path: Path) -> None:
    """options.lr_scale multiplies the shared budget's learning rate for every parameter of a task-conditioned
    network (the schedule still applies); a non-positive scale is refused by name."""
    import csv

    from unionseg.errors import ConfigError

    lrs = {}
    for scale in (1.0, 0.25):
        run = tmp_path / f"s{scale}"
        train(phantom_project, _cfg("dodnet", 2, f"options.lr_scale={scale}"), run, progress=False)
        lrs[scale] = [float(r["lr"]) for r in csv.DictReader((run / "log.csv").open())]
    # each row holds the rate its step trained with: the first step the budget's own, the last one above 0
    assert lrs[1.0][0] == pytest.approx(_cfg("dodnet", 2).optim.lr) and len(lrs[1.0]) == 2 and lrs[1.0][1] > 0
    assert lrs[0.25] == pytest.approx([0.25 * x for x in lrs[1.0]], rel=1e-6)
    with pytest.raises(ConfigError, match="lr_scale"):
        train(phantom_project, _cfg("multihead", 1, "options.lr_scale=0"), tmp_path / "bad", progress=False)


def test_cotraining_networks_start_different(phantom_project: Path, tmp_path: Path) -> None:
    """Co-training's A and B share the recipe but not the initial draw: every weight matrix differs (the twin:
    the same seed draws the same A again, so the difference is the draw, not the recipe)."""
    from unionseg.methods.base import get_method
    from unionseg.training.trainer import make_context

    ctx = make_context(phantom_project, _cfg("cotraining", 1), tmp_path / "run", progress=False)
    torch.manual_seed(0)
    nets = get_method("cotraining")(ctx).build()
    a, b = nets["A"].state_dict(), nets["B"].state_dict()
    weights = [k for k, v in a.items() if v.ndim >= 2]
    assert a.keys() == b.keys() and len(weights) >= 5
    assert all(not torch.equal(a[k], b[k]) for k in weights)
    torch.manual_seed(0)
    again = get_method("cotraining")(ctx).build()["A"].state_dict()
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_cotraining_soft_target_is_the_partners_average(phantom_project: Path, tmp_path: Path) -> None:
    """A's soft target is B's weight average (Huang et al.), not A's own average or B's raw network; the
    raw-network ablation runs its teacher in eval mode (no dropout) and leaves it in train mode after.
    Nothing checked it: a swap would have trained on without a sign (helper-100)."""
    from unionseg.methods.base import get_method
    from unionseg.training.trainer import make_context

    ctx = make_context(phantom_project, _cfg("cotraining", 1), tmp_path / "run", progress=False)
    method = get_method("cotraining")(ctx)
    method.raw_models = method.build()
    method.models = dict(method.raw_models)
    averages = method.averages()
    with torch.no_grad():  # every average apart from its network, and from each other
        for k, average in enumerate(averages.values()):
            for p in average.module.parameters():
                p.add_(0.05 * (k + 1))
    x = torch.randn(1, 1, 16, 16, 16)
    expected = {name: torch.softmax(average(x).float(), dim=1) for name, average in averages.items()}
    assert not torch.allclose(expected["avg_A"], expected["avg_B"])
    assert torch.allclose(method._teacher("A", "B", x), expected["avg_B"])
    assert torch.allclose(method._teacher("B", "A", x), expected["avg_A"])
    method.options = dataclasses.replace(method.options, use_average=False)
    method.raw_models["B"].train()
    raw = method._teacher("A", "B", x)
    assert method.raw_models["B"].training  # left as the step had it
    method.raw_models["B"].eval()
    with torch.no_grad():
        assert torch.allclose(raw, torch.softmax(method.raw_models["B"](x).float(), dim=1))


def test_cotraining_resumes_in_stage_two(phantom_project: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A stop in stage 2 resumes there: the stages file is kept and the experts are not retrained. Pseudo
    labels removed since are made again before training, and said (they were made one at a time inside the
    training loop, counted as its time; under torchrun the ranks waited for them and gave up: helper-99)."""
    run = tmp_path / "cot"
    cfg = _cfg("cotraining", 4, "ckpt_every=1")
    train(phantom_project, cfg, run, progress=False, stop_after=2)
    stages = json.loads((run / "stages.json").read_text())
    assert set(stages) == {"_shared_artifacts", "experts", "pseudo_labels"}  # where `info RUN` finds the experts
    assert Path(stages["_shared_artifacts"]).parent == phantom_project.parent / "prepared" / "artifacts"
    expert_models = sorted(Path(phantom_project.parent / "prepared" / "artifacts").glob("*/experts/*/model.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in expert_models}
    pseudo = Path(stages["_shared_artifacts"]) / "pseudo"
    made = sorted(pseudo.rglob("*.npy"))
    assert made
    stages_before = safe_torch_load(run / "last.pt", "unionseg-checkpoint")["timings"]["stages"]
    shutil.rmtree(pseudo)
    capsys.readouterr()
    summary = train(phantom_project, cfg, run, resume=True, progress=False)
    assert "the shared artefacts of the stage pseudo_labels, recorded as done, are no longer all in" in \
        capsys.readouterr().err
    assert sorted(pseudo.rglob("*.npy")) == made
    assert summary["stage_seconds_this_process"] > 0  # made as a stage, not inside the training loop
    assert summary["stage_seconds"] >= stages_before + summary["stage_seconds_this_process"] - 1e-6  # both counted
    assert summary["steps"] == 4
    # a finished run reads them no more: a resume after the cache was cleaned makes nothing again (helper-101)
    shutil.rmtree(pseudo)
    capsys.readouterr()
    train(phantom_project, cfg, run, resume=True, progress=False)
    assert "no longer all in" not in capsys.readouterr().err and not pseudo.exists()
    train(phantom_project, cfg, tmp_path / "again", progress=False)  # the next run makes them (the cache is shared)
    assert sorted(pseudo.rglob("*.npy")) == made
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    state = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    assert set(state["averages"]) == {"avg_A", "avg_B"}


_MEAN_RANK = r"""
import json, os, sys
import torch.distributed as tdist
from unionseg.training import distributed as dist
rank, store = int(sys.argv[1]), sys.argv[2]
tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
mine = {"loss": 1.0, "dice": 0.5} if rank == 0 else {"loss": 3.0, "dice": 0.25, "cross_task": 2.0}
print(json.dumps(dist.mean_over_ranks(mine)))
tdist.barrier()
sys.stdout.flush()
os._exit(0)  # no process-group teardown, where a gloo rank sometimes aborts under load (helper-126)
"""


def _two_gloo_ranks(script: str, tmp_path: Path) -> list[tuple[str, str]]:
    """Run ``script`` (argv: rank, the rendezvous file) as the two ranks of a gloo process group; their (stdout,
    stderr), after checking both exited 0. A rank left waiting in a collective is killed after two minutes.
    The ranks meet through a file, not a free port found by binding and closing it, which another process may
    take in between (helper-126)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store = tmp_path / "rendezvous"
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(r), str(store)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [rank.communicate(timeout=120) for rank in ranks]
    finally:  # a rank left waiting must not outlive the test
        for rank in ranks:
            rank.kill()
    assert all(rank.returncode == 0 for rank in ranks), [err[-2000:] for _, err in outs]
    return outs


def test_the_logged_terms_are_the_mean_over_the_ranks(tmp_path: Path) -> None:
    """log.csv held rank 0's loss alone under torchrun: one process's batch, not the step's. A term one rank
    lacks is the mean over the ranks that have it, and every rank gets the same row."""
    from unionseg.training.distributed import mean_over_ranks

    assert mean_over_ranks({"loss": 2.0}) == {"loss": 2.0}  # one process: its own values
    outs = _two_gloo_ranks(_MEAN_RANK, tmp_path)
    rows = [json.loads(out.splitlines()[-1]) for out, _ in outs]
    assert rows[0] == rows[1] == {"loss": 2.0, "dice": 0.375, "cross_task": 2.0}


def test_on_step_follows_every_step_from_python(phantom_project: Path, tmp_path: Path) -> None:
    """helper-119: a notebook could follow a training only by reading log.csv again; on_step is called after
    every step, a resumed run's from where it goes on."""
    seen: list[tuple[int, int, dict[str, float]]] = []
    cfg = _cfg("naive", 4, "ckpt_every=1")
    train(phantom_project, cfg, tmp_path / "run", progress=False, stop_after=2,
          on_step=lambda step, steps, terms: seen.append((step, steps, terms)))
    train(phantom_project, cfg, tmp_path / "run", resume=True, progress=False,
          on_step=lambda step, steps, terms: seen.append((step, steps, terms)))
    assert [(step, steps) for step, steps, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all("loss" in terms and isinstance(terms["loss"], float) for _, _, terms in seen)
    import csv

    with open(tmp_path / "run" / "log.csv", newline="") as f:  # the terms log.csv records for the same steps
        logged = {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}
    assert logged and all(logged[step] == pytest.approx(seen[step - 1][2]["loss"]) for step in logged)


def test_a_gpu_that_waits_for_its_patches_is_told_how_many_loader_processes_to_give(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With data.num_workers=0 a GPU waits while each batch is cropped and augmented on the CPU; the trainer
    measures the share over steps 10 to 60 and says what to set (helper-118). A CPU run is told nothing."""
    from unionseg.errors import UnionsegWarning
    from unionseg.training import trainer as trainer_module
    from unionseg.training.trainer import loader_hint

    assert loader_hint("cpu", 0, 0.9) is None and loader_hint("cuda", 0, 0.2) is None
    assert loader_hint("cuda", 0, 0.4) == (
        "the GPU waited for its patches 40% of the time, drawn in the training process (data.num_workers=0): give "
        "the loader processes, e.g. data.num_workers=4 (a --resume may change it)")
    assert "with data.num_workers=2: more loader processes" in str(loader_hint("cuda", 2, 0.5))
    # the wiring, on the CPU: the probe's steps shortened, the hint asked once with the share it measured
    asked: list[tuple[str, int, float]] = []

    def hint(device_type: str, num_workers: int, share: float) -> str:
        asked.append((device_type, num_workers, share))
        return "loader hint"

    monkeypatch.setattr(trainer_module, "LOADER_PROBE", (1, 3))
    monkeypatch.setattr(trainer_module, "loader_hint", hint)
    with pytest.warns(UnionsegWarning, match="loader hint"):
        train(phantom_project, _cfg("naive", 4), tmp_path / "run", progress=False)
    assert len(asked) == 1 and asked[0][:2] == ("cpu", 0) and 0.0 < asked[0][2] < 1.0


def test_a_non_finite_loss_or_an_on_step_error_stops_the_run_before_that_steps_checkpoint(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's use of check_finite (helper-121: only the function was tested): the run stops at the step,
    its checkpoint holding the step before; an error of on_step stops it the same way."""
    from unionseg.errors import UnionsegError
    from unionseg.training.trainer import Trainer

    real_step = Trainer.train_step

    def nan_at_step_2(self: Trainer, batch: dict) -> dict[str, float]:
        terms = real_step(self, batch)
        return {**terms, "loss": float("nan")} if self.step == 1 else terms

    cfg = _cfg("naive", 4, "ckpt_every=1")
    with monkeypatch.context() as patched:
        patched.setattr(Trainer, "train_step", nan_at_step_2)
        with pytest.raises(UnionsegError, match=r"non-finite loss at step 2: \{.*'loss': nan"):
            train(phantom_project, cfg, tmp_path / "nan", progress=False)
    assert safe_torch_load(tmp_path / "nan" / "last.pt", "unionseg-checkpoint")["step"] == 1

    def plot(step: int, steps: int, terms: dict[str, float]) -> None:
        if step == 2:
            raise ValueError("the notebook's plot failed")

    with pytest.raises(ValueError, match="the notebook's plot failed"):
        train(phantom_project, cfg, tmp_path / "cb", progress=False, on_step=plot)
    assert safe_torch_load(tmp_path / "cb" / "last.pt", "unionseg-checkpoint")["step"] == 1


_NONFINITE_RANK = r"""
import os, sys
import torch
import torch.distributed as tdist
from unionseg.errors import UnionsegError
from unionseg.training.trainer import check_finite
rank, store = int(sys.argv[1]), sys.argv[2]
tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
check_finite({"loss": 1.0}, 1, torch.device("cpu"))  # finite everywhere: goes on
try:
    check_finite({"loss": float("nan") if rank == 1 else 1.0}, 2, torch.device("cpu"))
except UnionsegError as exc:
    print(exc)
tdist.barrier()  # both ranks reach it: neither was left waiting in a collective the other had left
sys.stdout.flush()
os._exit(0)  # no process-group teardown, where a gloo rank sometimes aborts under load (helper-126)
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """helper-118: the rank whose loss was NaN raised alone; the others waited in the step's next collective
    until torchrun killed them. In one process the check costs no collective."""
    from unionseg.errors import UnionsegError
    from unionseg.training.trainer import check_finite

    check_finite({"loss": 0.5, "dice": 0.25}, 3, torch.device("cpu"))
    with pytest.raises(UnionsegError, match=r"non-finite loss at step 3: \{'loss': inf\}; lower optim.lr"):
        check_finite({"loss": float("inf")}, 3, torch.device("cpu"))
    outs = _two_gloo_ranks(_NONFINITE_RANK, tmp_path)
    assert outs[0][0].strip() == ("non-finite loss at step 2 in another process of this torchrun run; lower "
                                  "optim.lr or check data")
    assert outs[1][0].strip() == "non-finite loss at step 2: {'loss': nan}; lower optim.lr or check data"


def _torchrun_finished(proc: subprocess.CompletedProcess, run: Path, step: int, summary: bool = True) -> None:
    """A torchrun training call ended well: exit 0, or the abort a gloo rank sometimes makes under load while
    its process group is torn down, after every rank passed train()'s closing barrier and rank 0 wrote its
    files (seen in full CI runs, not alone). That abort is let through only where the run's checkpoint is at
    ``step`` (and, with ``summary``, its summary.json is written); any other failure fails the test."""
    if proc.returncode == 0:
        return
    teardown = "terminate called without an active exception" in proc.stderr
    last = run / "last.pt"
    at_step = last.is_file() and safe_torch_load(last, "unionseg-checkpoint")["step"] == step
    assert teardown and at_step and (not summary or (run / "summary.json").is_file()), proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_gloo_processes_stay_in_sync(phantom_project: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    unionseg = Path(sys.executable).parent / "unionseg"
    if not torchrun.exists() or not unionseg.exists():
        pytest.skip("torchrun or the unionseg console script is not installed")
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(unionseg), "train", str(phantom_project),
           "--method", "naive", "-o", str(run), "--quiet", *TINY, "steps=3", "val_every=3", "ckpt_every=3",
           "device=cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    _torchrun_finished(proc, run, 3)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ddp"] == {"world_size": 2, "in_sync": True}
    assert summary["processes"] == [{"from_step": 0, "world_size": 2}]
    assert len(list(run.glob("*.pt"))) == 2  # one last.pt and one model.pt, written by rank 0 only
    from unionseg.modelfile import load_model

    # the model file says it too (its effective batch is 2 x data.batch_size; the config does not show it)
    assert load_model(run / "model.pt")["provenance"]["processes"] == [{"from_step": 0, "world_size": 2}]
    assert len(list(run.glob("log*.csv"))) == 1
    # the 1x1x1 kernels' channels-last strides made DDP warn on every rank on the CPU (same bytes; silenced)
    assert "Grad strides do not match" not in proc.stderr
    shutil.rmtree(run)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="the run folder's lock is fcntl's")
def test_a_busy_run_folder_stops_every_torchrun_rank(phantom_project: Path, tmp_path: Path) -> None:
    """Under torchrun rank 0 takes the run folder's lock; when another process holds it, the training stops
    with rank 0's one message and writes nothing. (Every rank learns of the refusal and raises, rather than
    waiting in its first collective for a rank 0 that has left: torchrun's agent stops it anyway, but a
    launcher without one would not; whether rank 1 prints before the agent's SIGTERM is a race.)"""
    from unionseg.locking import FileLock
    from unionseg.training.trainer import RUN_LOCK

    run = tmp_path / "busy"
    run.mkdir()
    lock = FileLock(run / RUN_LOCK, "the test's hold")
    lock.acquire()
    try:
        # `-m unionseg` (src/unionseg/__main__.py): a job script need not have the venv's bin on its PATH
        cmd = [str(console_script("torchrun")), "--standalone", "--nproc_per_node=2",
               "-m", "unionseg", "train", str(phantom_project), "--method", "naive", "-o", str(run),
               "--quiet", *TINY, "steps=2", "val_every=2", "ckpt_every=2", "device=cpu"]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=180)
    finally:
        lock.release()
    assert proc.returncode != 0
    assert proc.stderr.count(f"is in use by pid {os.getpid()}") == 1, proc.stderr[-3000:]  # rank 0's message
    assert "error (rank 1)" not in proc.stderr  # rank 1 refuses silently (it printed a second message)
    assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK]  # nothing written
    # a folder holding a run: every rank refuses alike, and rank 0 alone says so (each rank did; helper-96)
    (run / "model.pt").write_bytes(b"mine")
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("run folder already holds a run (model.pt)") == 1, proc.stderr[-3000:]
    assert "error (rank 1)" not in proc.stderr and (run / "model.pt").read_bytes() == b"mine"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step(phantom_project: Path, tmp_path: Path) -> None:
    """The terminal's Ctrl-C and torchrun's forwarded one are one request; the ranks agree on the step."""
    import signal

    run = tmp_path / "ddp"
    cmd = [str(console_script("torchrun")), "--standalone", "--nproc_per_node=2", str(console_script("unionseg")),
           "train", str(phantom_project), "--method", "naive", "-o", str(run), "--quiet", *TINY, "steps=400",
           "val_every=400", "ckpt_every=1000", "device=cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_log_rows(proc, run / "log.csv", 3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)  # torchrun itself exits non-zero with its own traceback
    step = safe_torch_load(run / "last.pt", "unionseg-checkpoint")["step"]
    assert 3 <= step < 400
    assert err.count(f"stopped at step {step}; the checkpoint") == 1  # rank 0 speaks
    # ... and names the command that goes on with the same batch (a plain `unionseg train` halves it)
    assert "the same torchrun command (2 processes) with --resume goes on from there" in err
    assert "interrupted at step" not in err
    assert err.count("SIGINT: stopping after this step") == 1 and err.count("\ninterrupted\n") <= 1


@pytest.mark.slow
def test_ddp_shares_the_shared_artefacts_between_ranks(phantom_project: Path, tmp_path: Path) -> None:
    """Under two gloo ranks co-training trains its experts, and each rank predicts and writes its share of
    the probability maps and pseudo labels (rank 1 used to compute them all for nothing, and could read
    pseudo labels rank 0 had not written yet); every file is there, the replicas stay in sync."""
    import shutil as sh

    torchrun, unionseg = console_script("torchrun"), console_script("unionseg")
    project = tmp_path / "data"
    sh.copytree(phantom_project.parent, project, ignore=sh.ignore_patterns("artifacts"))
    run = tmp_path / "ddp"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(unionseg), "train", str(project / "project.yaml"),
           "--method", "cotraining", "-o", str(run), "--quiet", *TINY, "steps=2", "val_every=2", "ckpt_every=2",
           "expert_steps=2", "device=cpu"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    _torchrun_finished(proc, run, 2)
    assert json.loads((run / "summary.json").read_text())["ddp"] == {"world_size": 2, "in_sync": True}
    (root,) = (project / "prepared" / "artifacts").iterdir()
    cases = json.loads((project / "prepared" / "index.json").read_text())["cases"]
    training = [c for c in cases if c["role"] == "train"]
    assert len(list((root / "pseudo").rglob("*.npy"))) == len(training)
    experts = [d.name for d in (root / "experts").iterdir()]
    assert len(list((root / "probs").rglob("*.npy"))) == len(training) * len(experts)
    assert proc.stdout.count("best validation mean Dice") == 1  # rank 0 alone reports


def test_cotraining_focal_weights_option(phantom_project: Path, tmp_path: Path) -> None:
    """options.focal_weights switches the focal term's class weights (the same seed and batch give another
    focal value, the Dice term unchanged); an unknown choice is refused with the key in the message."""
    import csv

    from unionseg.errors import ConfigError
    from unionseg.modelfile import load_model

    firsts = {}
    for choice in ("none", "inverse_frequency"):
        run = tmp_path / choice
        train(phantom_project, _cfg("cotraining", 1, f"options.focal_weights={choice}", "data.fg_prob=1.0"), run,
              progress=False)
        firsts[choice] = next(csv.DictReader((run / "log.csv").open()))
        # the run records the options it ran, defaults filled in (a later change of a default stays visible)
        resolved = json.loads((run / "summary.json").read_text())["options"]
        assert resolved["focal_weights"] == choice and resolved["w_s"] == 1.0
        assert load_model(run / "model.pt")["provenance"]["options"] == resolved
    assert float(firsts["none"]["A/focal"]) != pytest.approx(float(firsts["inverse_frequency"]["A/focal"]), rel=1e-3)
    assert float(firsts["none"]["A/dice"]) == pytest.approx(float(firsts["inverse_frequency"]["A/dice"]), rel=1e-5)
    with pytest.raises(ConfigError, match="focal_weights"):
        train(phantom_project, _cfg("cotraining", 1, "options.focal_weights=median"), tmp_path / "bad",
              progress=False)


@pytest.mark.parametrize(("select_on", "chosen"), [("all", 2), ("regions", 1)])
def test_select_on_names_the_mean_that_picks_the_model(phantom_project: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, select_on: str,
                                                       chosen: int) -> None:
    """Two validations whose class mean and region mean disagree (a tumour fluke at step 2 lifts the mean
    over every class while the organs got worse): ``all`` keeps step 2's model, ``regions`` step 1's."""
    import unionseg.training.trainer as trainer_module
    from unionseg.modelfile import load_model

    scripted = iter([{"per_class": {"region:liver": 0.8, "liver_tumour": 0.0}, "mean_dice": 0.4, "region_mean": 0.8},
                     {"per_class": {"region:liver": 0.7, "liver_tumour": 0.3}, "mean_dice": 0.5, "region_mean": 0.7}])
    monkeypatch.setattr(trainer_module, "validate_deployed", lambda *args, **kwargs: next(scripted))
    run = tmp_path / select_on
    summary = train(phantom_project, _cfg("naive", 2, "val_every=1", f"select_on={select_on}"), run, progress=False)
    assert load_model(run / "model.pt")["provenance"]["selected_at_step"] == chosen
    assert summary["selected_on"] == select_on
    assert summary["best_val_mean_dice"] == {"all": 0.5, "regions": 0.8}[select_on]
    assert [h["model/region_mean"] for h in summary["history"]] == [0.8, 0.7]
    # benchmarks/selection_audit.py replays the rule from the history: it must agree with the trainer
    import importlib.util

    spec = importlib.util.spec_from_file_location("selection_audit",
                                                  Path(__file__).parents[1] / "benchmarks" / "selection_audit.py")
    assert spec is not None and spec.loader is not None
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    for rule, step in (("all", 2), ("regions", 1)):
        assert audit.pick(summary["history"], rule)[:2] == (step, "model")


def test_a_tie_between_validations_keeps_the_later_weights(phantom_project: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Validations that all score the same (every one 0 early in a run) kept the first one's weights, so a
    run of 300 steps deployed its step-150 model (helper-93); a tie now keeps the later step, and the
    selection audit replays the same rule. A better score still wins over a later, worse one."""
    import importlib.util

    import unionseg.training.trainer as trainer_module
    from unionseg.modelfile import load_model

    same = {"per_class": {"region:liver": 0.0}, "mean_dice": 0.0, "region_mean": 0.0}
    better = {"per_class": {"region:liver": 0.5}, "mean_dice": 0.5, "region_mean": 0.5}
    spec = importlib.util.spec_from_file_location("selection_audit",
                                                  Path(__file__).parents[1] / "benchmarks" / "selection_audit.py")
    assert spec is not None and spec.loader is not None
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    for scores, chosen in (([same, same, same], 3), ([same, better, same], 2)):
        scripted = iter(scores)
        monkeypatch.setattr(trainer_module, "validate_deployed", lambda *args, _it=scripted, **kwargs: next(_it))
        run = tmp_path / f"run{chosen}"
        summary = train(phantom_project, _cfg("naive", 3, "val_every=1"), run, progress=False)
        assert load_model(run / "model.pt")["provenance"]["selected_at_step"] == chosen
        assert summary["selected_at_step"] == chosen
        assert audit.pick(summary["history"], "regions")[:2] == (chosen, "model")


def test_resume_refuses_a_config_yaml_no_run_wrote_and_leaves_it(phantom_project: Path, tmp_path: Path) -> None:
    """`train --resume` into a folder holding a config.yaml of the user's (notes, a recipe kept there) replaced
    it with the run's configuration without a word (helper-93); it is refused, the file unchanged, and
    without --resume the refusal no longer says "resume it". The twin: a run cut before its first
    checkpoint, whose config.yaml the run wrote, still resumes."""
    from unionseg.errors import CheckpointError, UnionsegError

    for text, lacks in (("my notes\n", "data, inference, method"), ("a: 1\n", "data, inference, method"),
                        ("method: naive\nsteps: 2\noptim: {lr: 0.003}\n", "data, inference, network")):
        folder = tmp_path / f"mine{len(text)}"
        folder.mkdir()
        (folder / "config.yaml").write_text(text)
        with pytest.raises(CheckpointError, match=f"config.yaml is not the record of a unionseg run \\(it lacks "
                                                  f"{lacks}"):
            train(phantom_project, _cfg("naive", 2), folder, resume=True, progress=False)
        assert (folder / "config.yaml").read_text() == text
        assert sorted(p.name for p in folder.iterdir()) == [".lock", "config.yaml"]  # the run folder's lock file
        with pytest.raises(UnionsegError, match="holds a config.yaml no run wrote \\(notes, a recipe\\?\\): move it"):
            train(phantom_project, _cfg("naive", 2), folder, progress=False)  # without --resume: not "resume it"
    run = tmp_path / "run"
    train(phantom_project, _cfg("naive", 2), run, progress=False)
    for name in ("last.pt", "summary.json", "model.pt", "validation.json"):
        (run / name).unlink()
    assert train(phantom_project, _cfg("naive", 2), run, resume=True, progress=False)["steps"] == 2


def test_a_plain_rerun_starts_anew_over_a_run_that_kept_nothing(phantom_project: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that failed at its first step (out of memory, say) left config.yaml (and stages.json): the
    corrected command was refused ("resume it") and --resume then refused the changed configuration, for a
    folder holding nothing trained (helper-122). A plain rerun now starts a new run there, with a note; a
    folder that kept anything of its own (a validation, a stage of the method's own) is still refused."""
    from unionseg.errors import UnionsegError
    from unionseg.training.trainer import SHARED_KEY

    run = tmp_path / "run"

    def fail(step: int, steps: int, terms: dict[str, float]) -> None:
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        train(phantom_project, _cfg("naive", 2), run, progress=False, on_step=fail)
    assert not (run / "last.pt").exists() and (run / "config.yaml").is_file()
    (run / "stages.json").write_text(json.dumps({SHARED_KEY: "/somewhere", "experts": {}}))  # shared stages only
    with pytest.raises(UnionsegError, match="started with another configuration .*`unionseg train` without "
                                            "--resume, resume=False in Python: that run kept nothing"):
        train(phantom_project, _cfg("naive", 2, "data.batch_size=1"), run, resume=True, progress=False)
    summary = train(phantom_project, _cfg("naive", 2, "data.batch_size=1"), run)  # a changed configuration
    assert summary["steps"] == 2 and f"note: {run}: its run stopped before its first checkpoint (it left " \
                                      "stages.json, config.yaml;" in capsys.readouterr().err
    assert load_train_config(run / "config.yaml").data.batch_size == 1
    assert not (run / "stages.json").exists()  # naive has no stages: the old record went with the old run
    with pytest.raises(UnionsegError, match="already holds a run"):  # this one kept its model: refused
        train(phantom_project, _cfg("naive", 2), run, progress=False)
    for name in ("last.pt", "summary.json", "model.pt"):
        (run / name).unlink()
    for kept, stages in (("validation.json", None), (None, {"my_stage": {}}), (None, "not json")):
        if stages is not None:
            (run / "stages.json").write_text(stages if isinstance(stages, str) else json.dumps(stages))
        assert kept is None or (run / kept).is_file()
        before = (run / "config.yaml").read_bytes()
        with pytest.raises(UnionsegError, match="already holds a run"):
            train(phantom_project, _cfg("naive", 2), run, progress=False)
        assert (run / "config.yaml").read_bytes() == before
        (run / "validation.json").unlink(missing_ok=True)
    # a run that logged steps before it was killed (no checkpoint yet): its log.csv is kept, so refused
    (run / "stages.json").unlink()
    (run / "log.csv").write_text("step,loss\n1,0.5\n")
    with pytest.raises(UnionsegError, match="already holds a run"):
        train(phantom_project, _cfg("naive", 2), run, progress=False)
    assert (run / "log.csv").read_text() == "step,loss\n1,0.5\n"
    # decided before the run folder's lock: a run that trained there meanwhile is not written over (helper-127)
    (run / "log.csv").unlink()
    import unionseg.training.trainer as trainer_module

    real_lock = trainer_module.run_folder_lock

    def meanwhile(run_dir: Path, device: Any = None) -> Any:
        (Path(run_dir) / "model.pt").write_bytes(b"another process's model")
        return real_lock(run_dir, device)

    monkeypatch.setattr(trainer_module, "run_folder_lock", meanwhile)
    with pytest.raises(UnionsegError, match="now holds a run \\(another process trained into it meanwhile\\)"):
        train(phantom_project, _cfg("naive", 2), run, progress=False)
    assert (run / "model.pt").read_bytes() == b"another process's model"


def test_under_ddp_a_rank_waits_for_an_artefact_it_does_not_see_instead_of_making_it_alone(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Making an artefact is a collective every rank enters together (the stages do). A rank that does not
    see a file another rank wrote (a shared file system showing it late) made it alone and waited forever for
    the others at the first collective: now it waits for the file and gives up naming it (helper-89). In one
    process a missing artefact is made, as before."""
    import threading

    from unionseg.artifacts import ArtifactCache
    from unionseg.errors import UnionsegError
    from unionseg.training import distributed as dist
    from unionseg.training.trainer import make_context

    cache = ArtifactCache(make_context(phantom_project, _cfg("cotraining", 1), tmp_path / "r", progress=False))
    made: list[str] = []
    target = tmp_path / "artefact.npy"
    cache._present_or_made(target, lambda: made.append("made") or target.write_bytes(b"x"))
    assert made == ["made"] and target.exists()
    cache._present_or_made(target, lambda: made.append("again"))
    assert made == ["made"]  # present: nothing made

    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(ArtifactCache, "LAG_SECONDS", 10.0)  # the wait ends when the file shows: not slower
    late = tmp_path / "late.npy"
    writer = threading.Timer(0.2, late.write_bytes, (b"x",))
    writer.start()
    cache._present_or_made(late, lambda: made.append("alone"))
    writer.join()
    monkeypatch.setattr(ArtifactCache, "LAG_SECONDS", 0.6)
    never = tmp_path / "never.npy"
    with pytest.raises(UnionsegError, match="not there after 1 s") as info:
        cache._present_or_made(never, lambda: made.append("alone"))
    assert str(never) in str(info.value) and made == ["made"]


def test_validation_shares_the_cases_between_ranks(phantom_project: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP each rank scores every second case; the gathered result equals the one-process result
    exactly (the cases go back in order before the means), and the ranks' shares are disjoint."""
    import unionseg.training.validation as validation
    from unionseg.methods.base import get_method
    from unionseg.training import distributed as dist
    from unionseg.training.trainer import make_context

    ctx = make_context(phantom_project, _cfg("naive", 1), tmp_path / "r", progress=False)
    method = get_method("naive")(ctx)
    torch.manual_seed(0)
    method.raw_models = method.build()
    deployed = method.deploy()
    cases = ctx.index.cases()[:5]  # more cases than the tiny phantom's one validation case, some of each site
    monkeypatch.setattr(validation, "validation_cases", lambda *args: cases)
    alone = validation.validate_deployed(deployed, ctx)
    shares: dict[int, list[tuple[int, dict[str, float]]]] = {}

    def gather(share: list[tuple[int, dict[str, float]]]) -> list[list[tuple[int, dict[str, float]]]]:
        shares[dist.rank()] = share
        return [shares.get(r, []) for r in range(2)]

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "gather_objects", gather)
    for r in (1, 0):  # rank 1's share is in place when rank 0 gathers
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        shared = validation.validate_deployed(deployed, ctx)
    assert [i for i, _ in shares[0]] == [0, 2, 4] and [i for i, _ in shares[1]] == [1, 3]
    assert shared == alone and len(alone["per_class"]) >= 4
    # the twin: a missing share changes the result, so the equality above needs both
    shares[1] = []
    assert validation.validate_deployed(deployed, ctx) != alone


def test_validation_stitches_a_large_volume_off_the_gpu_and_follows_the_runs_amp(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole CT's (C, X, Y, Z) output is stitched on the CPU, not on the GPU that runs the windows (a
    512 x 512 x 600 CT at ~1 mm: over 10 GB beside training's state); a small one stays on the device. The
    windows run under the run's amp: validation and the experts' maps ran float16 on a GPU with amp off."""
    import monai.inferers

    import unionseg.training.validation as validation
    from unionseg.methods.base import get_method
    from unionseg.training.trainer import make_context

    cuda = torch.device("cuda", 1)
    assert validation.stitch_device(cuda, (512, 512, 600)) == torch.device("cpu")
    assert validation.stitch_device(cuda, (160, 160, 160)) == cuda
    assert validation.stitch_device(torch.device("cpu"), (512, 512, 600)) == torch.device("cpu")

    seen: list[dict[str, object]] = []

    def spy(inputs: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append({**kwargs, "amp": torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")})
        channels = kwargs["predictor"](inputs[:, :, :16, :16, :16]).shape[1]  # type: ignore[operator]
        return torch.zeros(1, channels, *inputs.shape[2:])

    monkeypatch.setattr(monai.inferers, "sliding_window_inference", spy)
    for amp in (True, False):
        ctx = make_context(phantom_project, _cfg("naive", 1, f"amp={str(amp).lower()}"), tmp_path / f"r{amp}",
                           progress=False)
        method = get_method("naive")(ctx)
        method.raw_models = method.build()
        calls: list[bool] = []
        kept: list[bool] = []
        real = validation.predict_volume
        monkeypatch.setattr(validation, "predict_volume",
                            lambda *a, calls=calls, kept=kept, real=real, **k: calls.append(k["amp"]) or kept.append(
                                k.get("to_cpu", True)) or real(*a, **k))
        validation.validate_deployed(method.deploy(), ctx)
        monkeypatch.setattr(validation, "predict_volume", real)
        assert calls and set(calls) == {amp}
        # decided where stitched: the probability maps stay there, only the labels go to the host (helper-111)
        assert set(kept) == {False}
    assert seen and all(s["sw_device"] == torch.device("cpu") and s["device"] == torch.device("cpu")
                        and s["amp"] is False for s in seen)  # on the CPU: no autocast, stitched in place

    # the GPU's side without a GPU: the windows named for cuda:0, the volume kept on the CPU (stitched there),
    # and autocast asked for exactly when the run's amp is on (nothing reaches a device: the spy runs no net)
    autocasts: list[tuple[str, bool]] = []

    class Autocast:
        def __init__(self, device_type: str, dtype: torch.dtype | None = None, enabled: bool = True) -> None:
            autocasts.append((device_type, enabled))

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            return None

    seen.clear()
    monkeypatch.setattr(monai.inferers, "sliding_window_inference",
                        lambda inputs, **kwargs: seen.append({**kwargs, "on": inputs.device}) or torch.zeros(
                            1, 2, *inputs.shape[2:]))
    monkeypatch.setattr(torch, "autocast", Autocast)
    monkeypatch.setattr(validation, "DEVICE_STITCH_VOXELS", 0)
    for amp in (True, False):
        probs = validation.predict_volume(torch.nn.Identity(), np.zeros((4, 4, 4), np.float32), (4, 4, 4), 0.5, 1,
                                          torch.device("cuda", 0), "softmax", amp=amp)
        assert probs.shape == (2, 4, 4, 4) and probs.device == torch.device("cpu")
    assert autocasts == [("cuda", True), ("cuda", False)]
    assert all(s["sw_device"] == torch.device("cuda", 0) and s["device"] == torch.device("cpu")
               and s["on"] == torch.device("cpu") for s in seen) and len(seen) == 2


def test_a_steps_terms_come_back_as_floats_in_their_order() -> None:
    """One device-to-host copy for all terms: a Python number or a one-element tensor is taken as well as a
    0-d tensor (co-training's ramp-up was made on the CPU beside terms on the GPU, which a stack refuses:
    each goes to the loss's device first)."""
    from unionseg.training.trainer import term_values

    terms = {"loss": torch.tensor(1.5, requires_grad=True) * 2, "dice": torch.tensor([0.25]), "rampup": 0.5,
             "count": torch.tensor(3)}
    values = term_values(terms)
    assert list(values) == ["loss", "dice", "rampup", "count"]
    assert values == {"loss": 3.0, "dice": 0.25, "rampup": 0.5, "count": 3.0}
    assert all(type(v) is float for v in values.values())


def test_selection_score_reads_the_named_mean() -> None:
    from unionseg.training.validation import selection_score

    result = {"mean_dice": 0.4, "region_mean": 0.8}
    assert selection_score(result, "all") == 0.4 and selection_score(result, "regions") == 0.8
    # no organ region scored (a tumour-only expert): the region rule falls back to every class
    assert selection_score({"mean_dice": 0.3, "region_mean": None}, "regions") == 0.3
    with pytest.raises(ValueError, match="select_on"):
        selection_score(result, "tumours")


def test_mskd_hands_kd_regions_each_teachers_organ_groups(phantom_project: Path, tmp_path: Path) -> None:
    """Each teacher's organ and tumour form one group of its channels (contract 3's merge decides R_j)."""
    from unionseg.methods.base import get_method
    from unionseg.training.trainer import make_context

    ctx = make_context(phantom_project, _cfg("mskd", 1), tmp_path / "r", progress=False)
    method = get_method("mskd")(ctx)
    space = ctx.space
    for leaves, groups in zip(method.teacher_leaves, method.teacher_groups, strict=True):
        channel = {leaf: c + 1 for c, leaf in enumerate(leaves)}
        expected = [sorted(channel[leaf] for leaf in g.leaf_ids if leaf in channel) for g in space.groups
                    if any(leaf in channel for leaf in g.leaf_ids)]
        assert sorted(map(sorted, groups)) == sorted(expected)
    assert any(len(g) == 2 for groups in method.teacher_groups for g in groups)  # an organ with its tumour


def test_init_from_starts_a_run_from_a_model_file(phantom_project: Path, tmp_path: Path) -> None:
    """``init_from`` copies a model file's weights into the new network (fine-tuning, or a longer schedule
    after a finished run); a file of another method, another network or other classes is refused before
    anything is written, naming the difference; co-training and individual cannot start from one."""
    from unionseg.errors import CheckpointError, ConfigError
    from unionseg.modelfile import load_model

    first = tmp_path / "first"
    train(phantom_project, _cfg("dodnet", 2), first, progress=False)
    started = load_model(first / "model.pt")["state_dict"]
    # with a learning rate too small to move anything, the new run's model is the first run's
    again = tmp_path / "again"
    train(phantom_project, _cfg("dodnet", 1, f"init_from={first / 'model.pt'}", "optim.lr=1e-12"), again,
          progress=False)
    after = load_model(again / "model.pt")["state_dict"]
    assert after.keys() == started.keys()
    assert all(torch.allclose(after[k].float(), started[k].float(), atol=1e-6) for k in started)
    fresh = tmp_path / "fresh"  # twin: the same run from a random draw is another network
    train(phantom_project, _cfg("dodnet", 1, "optim.lr=1e-12"), fresh, progress=False)
    other = load_model(fresh / "model.pt")["state_dict"]
    assert any(not torch.allclose(other[k].float(), started[k].float(), atol=1e-6) for k in started)

    refused = tmp_path / "refused"
    cases = [(_cfg("multihead", 1, f"init_from={first / 'model.pt'}"), "holds a 'dodnet' model, and this run "
              "trains 'multihead'"),
             (_cfg("dodnet", 1, f"init_from={first / 'model.pt'}", "network.preset=cpu"), "another network"),
             (_cfg("cotraining", 1, f"init_from={first / 'model.pt'}"), "'cotraining' cannot start from"),
             (_cfg("individual", 1, f"init_from={first / 'model.pt'}"), "'individual' cannot start from a model "
              "file: it trains no network")]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            train(phantom_project, cfg, refused, progress=False)
        assert not refused.exists()  # refused before config.yaml, stages or experts
    with pytest.raises(CheckpointError, match="nope.pt"):
        train(phantom_project, _cfg("dodnet", 1, f"init_from={tmp_path / 'nope.pt'}"), refused, progress=False)
    # a file of an earlier version, whose network spec lacks head keys added since (at their defaults), fits
    from unionseg.modelfile import save_model

    payload = load_model(first / "model.pt")
    head = payload["network"]["network"]["head"]
    older = {**payload, "network": {**payload["network"], "network": {
        **payload["network"]["network"], "head": {k: v for k, v in head.items() if k not in ("fan_in_init", "task_gain")}}}}
    assert older["network"] != payload["network"]
    save_model(tmp_path / "older.pt", older)
    train(phantom_project, _cfg("dodnet", 1, f"init_from={tmp_path / 'older.pt'}"), tmp_path / "from_older",
          progress=False)
    # weights that do not fit the network they claim: the usual one-line error, not a traceback
    broken = {**payload, "state_dict": {f"renamed.{k}": v for k, v in payload["state_dict"].items()}}
    save_model(tmp_path / "broken.pt", broken)
    with pytest.raises(CheckpointError, match="weights do not fit the network"):
        train(phantom_project, _cfg("dodnet", 1, f"init_from={tmp_path / 'broken.pt'}"), refused, progress=False)
    assert not refused.exists()



def test_cli_records_init_from_as_an_absolute_path(phantom_project: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative ``init_from`` is read from the working folder and recorded absolute, so the run's
    config.yaml starts the same run from any folder."""
    import yaml

    from unionseg.cli import run

    tiny = [*TINY, "steps=1", "val_every=1", "ckpt_every=1", "--quiet"]
    assert run(["train", str(phantom_project), "-m", "naive", "-o", str(tmp_path / "a"), *tiny]) == 0
    monkeypatch.chdir(tmp_path)
    assert run(["train", str(phantom_project), "-m", "naive", "-o", "b", "init_from=a/model.pt", *tiny]) == 0
    recorded = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["init_from"]
    assert recorded == str((tmp_path / "a" / "model.pt").resolve())
    train(phantom_project, _cfg("naive", 1, "init_from=a/model.pt"), "c", progress=False)  # and from Python
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["init_from"] == recorded


def test_info_describes_a_run_folder(phantom_project: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``unionseg info RUN``: how far the run got (unfinished, with or without a checkpoint; finished, with
    the step its model file was taken at), then the model file; a folder without a run is refused."""
    from unionseg.cli import run as cli

    run = tmp_path / "run"
    cfg = _cfg("naive", 2, "ckpt_every=1")
    assert train(phantom_project, cfg, run, progress=False, stop_after=1) == {"stopped_at": 1}
    capsys.readouterr()
    assert cli(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: an unfinished run, not validated yet; a checkpoint (last.pt, step 1) to resume from" in out
    assert "no model file yet" in out
    # a run cut while its shared experts train: its own folder has no checkpoint, the experts' have (it said
    # "no checkpoint yet", and a user took the run for lost)
    shared = tmp_path / "artifacts"
    (shared / "experts").mkdir(parents=True)
    shutil.copytree(run, shared / "experts" / "kidney")
    (shared / "experts" / "liver").mkdir()
    (shared / "experts" / "liver" / "summary.json").write_text("{}")
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(run / "config.yaml", cut / "config.yaml")
    (cut / "stages.json").write_text(json.dumps({"_shared_artifacts": str(shared)}))
    assert cli(["info", str(cut)]) == 0
    out = capsys.readouterr().out
    assert f"{cut}: an unfinished run, not validated yet; no checkpoint of its own yet" in out
    assert "shared expert liver: trained" in out
    assert f"shared expert kidney: cut at step 1, resumes from {shared / 'experts' / 'kidney' / 'last.pt'}" in out
    train(phantom_project, cfg, run, resume=True, progress=False)
    assert cli(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: a finished naive run of 2 steps; the model file was taken at step 2," in out
    assert f"{run / 'model.pt'}: a naive model" in out
    assert cli(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a run folder (no config.yaml)" in err
    assert re.search(r"; it holds run folders \([^)]*\brun\b[^)]*\): give one", err), err  # where the runs are
    (tmp_path / "bench" / "runs" / "naive" / "seed0").mkdir(parents=True)  # a benchmark's -o: 3 levels down
    (tmp_path / "bench" / "runs" / "naive" / "seed0" / "config.yaml").write_text("method: naive\n")
    assert cli(["info", str(tmp_path / "bench")]) == 2
    assert "it holds run folders (runs/naive/seed0): give one" in capsys.readouterr().err
    (tmp_path / "bench" / "benchmark.json").write_text("{}")  # a benchmark's folder points to its report
    assert cli(["info", str(tmp_path / "bench")]) == 2
    assert "it is a benchmark's folder, without a report yet" in capsys.readouterr().err
    (tmp_path / "bench" / "report.md").write_text("# report\n")
    assert cli(["info", str(tmp_path / "bench")]) == 2
    assert f"it is a benchmark's folder, whose comparison is {tmp_path / 'bench' / 'report.md'}" in \
        capsys.readouterr().err
    # a truncated checkpoint is said to be unreadable (it was offered "to resume from"); a broken record is
    # one error naming it (a traceback), and a broken model file no longer hides how far the run got
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "summary.json").unlink()
    with (broken / "last.pt").open("r+b") as fh:
        fh.truncate(1000)
    assert cli(["info", str(broken)]) == 0
    assert "its checkpoint (last.pt) cannot be read (truncated or corrupt): --resume refuses it" in \
        capsys.readouterr().out
    (broken / "validation.json").write_text('[{"step": 1, "model/')
    assert cli(["info", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"error: {broken / 'validation.json'}: not a readable record" in err and "Traceback" not in err
    shutil.copy(run / "summary.json", broken / "summary.json")
    (broken / "model.pt").write_bytes(b"PK\x03\x04 cut short")
    assert cli(["info", str(broken)]) == 2
    out, err = capsys.readouterr()
    assert f"{broken}: a finished naive run of 2 steps" in out and f"{broken / 'model.pt'}" in err


def test_the_trainer_logs_the_terms_through_the_mean_over_the_ranks(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """log.csv's terms go through distributed.mean_over_ranks (in one process their own values): the trainer's
    side of the DDP change, which the two-process test of the function alone does not see."""
    import csv

    from unionseg.training import distributed

    seen: list[dict[str, float]] = []

    def marked(values: dict[str, float]) -> dict[str, float]:
        seen.append(dict(values))
        return {k: v + 1000.0 for k, v in values.items()}

    monkeypatch.setattr(distributed, "mean_over_ranks", marked)
    train(phantom_project, _cfg("naive", 2), tmp_path / "run", progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert len(seen) == len(rows) == 2
    assert [float(r["loss"]) for r in rows] == pytest.approx([v["loss"] + 1000.0 for v in seen])


def test_prepare_counts_the_held_out_cases_apart_from_the_validation_set(phantom_project: Path) -> None:
    """prepare printed "val 6" for the phantom, whose validation uses its role: val set alone; the cases held
    out of the training sets are neither trained nor validated on, and the count says so."""
    from unionseg.config import load_project
    from unionseg.data.preprocess import PreparedIndex, case_counts

    index = PreparedIndex.load(load_project(phantom_project))
    own = [c for c in index.cases(split="val") if c.role == "val"]
    held = [c for c in index.cases(split="val") if c.role != "val"]
    assert own and held  # the phantom has both
    assert f"val {len(own)} (from the dataset with role: val; {len(held)} more held out by the training datasets' " \
           "split keys, unused: leave split out to train on them)" in case_counts(index)


def test_checkpoint_step_reads_a_file_that_cannot_be_memory_mapped(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``info RUN`` and the benchmark read a checkpoint's step through a memory map; where mapping fails (a
    file system without mmap, an old serialisation format) the step is read from the whole file instead of
    the run being reported as holding a corrupt checkpoint. A truncated file still gives None."""
    from unionseg.training import checkpoint

    path = tmp_path / "last.pt"
    torch.save({"format": "unionseg-checkpoint", "step": 37}, path)
    real_load = torch.load

    def no_mmap(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("mmap"):
            raise RuntimeError("mmap: operation not supported")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_mmap)
    assert checkpoint.checkpoint_step(path) == 37
    path.write_bytes(path.read_bytes()[:40])
    assert checkpoint.checkpoint_step(path) is None


def test_train_leaves_the_callers_random_streams_and_flags_as_they_were(phantom_project: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """From a notebook: ``train`` reseeded the global NumPy and torch streams and left torch's deterministic
    flag on for every later run of the process (a ``deterministic=false`` run trained deterministically);
    a run that failed left its progress bar and log writer open. Now the streams and flags are put back,
    and a failure closes both."""
    import random

    import numpy as np

    from unionseg.errors import ConfigError
    from unionseg.training import trainer

    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    expected = (np.random.random(), random.random(), torch.rand(1).item())
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    assert was == (False, False)  # each run below sets one of them
    train(phantom_project, _cfg("naive", 1, "deterministic=true"), tmp_path / "det", progress=False)
    assert (np.random.random(), random.random(), torch.rand(1).item()) == expected
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == was
    train(phantom_project, _cfg("naive", 1, "deterministic=false"), tmp_path / "fast", progress=False)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == was  # it sets True

    closed: list[str] = []
    for cls in (trainer._Logger, trainer._Progress):
        original = cls.close

        def recording(self: Any, original: Any = original, name: str = cls.__name__) -> None:
            closed.append(name)
            original(self)

        monkeypatch.setattr(cls, "close", recording)

    def broken(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("validation failed")

    monkeypatch.setattr(trainer.Trainer, "validate", broken)
    with pytest.raises(RuntimeError, match="validation failed"):
        train(phantom_project, _cfg("naive", 2, "val_every=1", "deterministic=true"), tmp_path / "fails",
              progress=True)
    assert {"_Logger", "_Progress"} <= set(closed)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == was
    with pytest.raises(ConfigError, match="expected a TrainConfig, got dict; build one with"):
        train(phantom_project, {"method": "naive"}, tmp_path / "dict", progress=False)  # type: ignore[arg-type]


def test_a_resumed_run_with_dropout_has_the_weights_of_one_never_stopped(phantom_project: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper's network has dropout, whose masks come from torch's global stream. A resumed run restored
    that stream from its checkpoint, then building the loader drew one number from it, which a run never
    stopped had drawn at step 0: every later mask differed (the tests' networks have no dropout, which hid
    it). Now the loader leaves the stream alone."""
    from unionseg.networks import resunet

    monkeypatch.setitem(resunet.RESUNET_PRESETS, "tiny", {**resunet.RESUNET_PRESETS["tiny"], "dropout": 0.5})
    cfg = _cfg("naive", 4, "deterministic=true", "ckpt_every=1")
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(phantom_project, cfg, straight, progress=False)
    assert train(phantom_project, cfg, halves, progress=False, stop_after=2) == {"stopped_at": 2}
    train(phantom_project, cfg, halves, resume=True, progress=False)
    a, b = _weights(straight), _weights(halves)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the twin: dropout is on (another run without it ends elsewhere), so the equality is not vacuous
    monkeypatch.setitem(resunet.RESUNET_PRESETS, "tiny", {**resunet.RESUNET_PRESETS["tiny"], "dropout": 0.0})
    train(phantom_project, cfg, tmp_path / "plain", progress=False)
    c = _weights(tmp_path / "plain")
    assert any(not torch.equal(a[k], c[k]) for k in a)


_DDP_DROPOUT_RESUME = r"""
import sys
from unionseg.networks import resunet
from unionseg.training.config import load_train_config
from unionseg.training.trainer import train
resunet.RESUNET_PRESETS["tiny"] = {**resunet.RESUNET_PRESETS["tiny"], "dropout": 0.5}
project, run, call, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cfg = load_train_config(None, overrides, method="naive")
train(project, cfg, run, progress=False, resume=call == "resume", stop_after=2 if call == "stop" else None)
"""


@pytest.mark.slow
def test_a_resumed_torchrun_run_with_dropout_has_the_weights_of_one_never_stopped(phantom_project: Path,
                                                                                 tmp_path: Path) -> None:
    """Under torchrun a checkpoint holds rank 0's random stream; on resume the other ranks were reseeded
    from the resumed step, where a run never stopped had seeded them once at step 0, so their dropout
    masks (and through the averaged gradients, the weights) differed. Every rank but 0 now seeds its
    stream from (seed, rank, step) before each step."""
    torchrun = console_script("torchrun")
    script = tmp_path / "ddp_resume.py"
    script.write_text(_DDP_DROPOUT_RESUME)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = [*TINY, "steps=4", "val_every=4", "ckpt_every=1", "deterministic=true", "device=cpu"]
    # one torchrun a call: a process group is set up once per process
    for run, call in (("straight", "whole"), ("halves", "stop"), ("halves", "resume")):
        cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(phantom_project),
               str(tmp_path / run), call, *overrides]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        _torchrun_finished(proc, tmp_path / run, 2 if call == "stop" else 4, summary=call != "stop")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "halves")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_experts_time_counts_in_the_compute_record(phantom_project: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """compute.json's expert time held only the process that finished the expert: the time before a Ctrl-C
    was lost, so a resumed benchmark under-reported what the shared experts cost."""
    import time

    from unionseg.training import trainer as trainer_module
    from unionseg.training.trainer import make_context

    calls: list[float] = []

    class FakeTrainer:
        def __init__(self, ctx: Any, resume: bool) -> None:
            self.run_dir = Path(ctx.run_dir)

        def fit(self) -> dict[str, Any]:
            time.sleep(0.3)
            calls.append(0.3)
            if len(calls) == 1:
                raise KeyboardInterrupt
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "summary.json").write_text("{}")
            return {}

    monkeypatch.setattr(trainer_module, "Trainer", FakeTrainer)
    ctx = make_context(phantom_project, _cfg("cotraining", 1, "seed=7301"), tmp_path / "run", progress=False)
    artifacts = ctx.artifacts
    artifacts.root = tmp_path / "artifacts"  # not the project's shared cache: these experts are fakes
    dataset = ctx.train_datasets[0]
    with pytest.raises(KeyboardInterrupt):
        artifacts.ensure_experts([dataset])
    first = artifacts.compute_seconds()[f"expert:{dataset}"]
    assert 0.3 <= first < 5
    artifacts.ensure_experts([dataset])
    assert artifacts.compute_seconds()[f"expert:{dataset}"] >= first + 0.3
    artifacts.ensure_experts([dataset])  # finished: not trained again, nothing added
    assert len(calls) == 2


def test_the_summary_records_the_processes_of_every_session(phantom_project: Path, tmp_path: Path) -> None:
    """summary.json's ddp entry held the last session's world size only: a run begun on two processes and
    finished on one did not say that its effective batch changed. Each session's count is now recorded, and
    a resume that changes it warns."""
    from unionseg.training.checkpoint import atomic_torch_save

    run = tmp_path / "run"
    cfg = _cfg("naive", 3, "ckpt_every=1")
    train(phantom_project, cfg, run, progress=False, stop_after=2)
    state = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    assert state["world_sizes"] == [[0, 1]]
    state["world_sizes"] = [[0, 2]]  # as a torchrun session of two processes writes it
    atomic_torch_save(state, run / "last.pt")
    from unionseg.errors import UnionsegWarning

    with pytest.warns(UnionsegWarning, match=r"resumed at step 2 with 1 process\(es\), where the run's steps so far "
                                         r"had 2: the effective batch changes from 2 x 2 to 1 x 2"):
        train(phantom_project, cfg, run, resume=True, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == [{"from_step": 0, "world_size": 2}, {"from_step": 2, "world_size": 1}]
    assert "ddp" not in summary  # this session ran one process

    whole = tmp_path / "whole"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # twin: no resume, no warning
        train(phantom_project, cfg, whole, progress=False)
    assert json.loads((whole / "summary.json").read_text())["processes"] == [{"from_step": 0, "world_size": 1}]


def test_a_run_without_validation_cases_deploys_its_last_weights_and_claims_no_score(
    phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every validation split empty (val_fraction 0, one-case datasets) the first validation's "Dice 0"
    kept the first checkpoint as model.pt, silently, and the run reported a best validation Dice of 0."""
    from typer.testing import CliRunner

    from unionseg.cli import app
    from unionseg.modelfile import load_model
    from unionseg.training import trainer as trainer_module
    from unionseg.training import validation

    monkeypatch.setattr(validation, "validation_cases", lambda ctx, datasets=None: [])
    monkeypatch.setattr(trainer_module, "validation_cases", lambda ctx, datasets=None: [])
    from unionseg.errors import UnionsegWarning
    from unionseg.training.checkpoint import atomic_torch_save

    run = tmp_path / "run"
    cfg = _cfg("naive", 3, "val_every=1", "ckpt_every=1")
    with pytest.warns(UnionsegWarning, match=r"no validation case for this run .*/model\.pt holds the last step's "
                                             r"weights, not validated"):
        train(phantom_project, cfg, run, progress=False, stop_after=2)
    shown = CliRunner().invoke(app, ["info", str(run)])
    assert "an unfinished run, not validated (no validation case)" in shown.output, shown.output
    state = safe_torch_load(run / "last.pt", "unionseg-checkpoint")
    state["best_metric"] = 0.0  # as an older release stored the "Dice 0" of no case
    atomic_torch_save(state, run / "last.pt")
    with pytest.warns(UnionsegWarning, match="no validation case for this run"):
        summary = train(phantom_project, cfg, run, resume=True, progress=False)
    assert summary["best_val_mean_dice"] is None and summary["selected_on"] == "none"
    assert summary["selected_at_step"] == 3
    assert json.loads((run / "validation.json").read_text()) == [{"step": s, "cases": 0} for s in (1, 2, 3)]
    deployed = load_model(run / "model.pt")
    assert deployed["provenance"]["selected_at_step"] == 3
    last = _weights(run)
    assert all(torch.equal(v, last[f"net.{k}"]) for k, v in deployed["state_dict"].items())
    shown = CliRunner().invoke(app, ["info", str(run)])
    assert "not validated (no validation case): the last step's weights" in shown.output, shown.output


def test_val_max_cases_takes_the_datasets_in_turn() -> None:
    """val_max_cases=N kept the first N cases in dataset order, so a recipe's later datasets were never
    validated nor used to select the model."""
    from types import SimpleNamespace

    from unionseg.training.validation import validation_cases

    cases = [SimpleNamespace(dataset=d, case_id=f"{d}{i}", role="train")
             for d, n in (("liver", 3), ("kidney", 1), ("spleen", 2)) for i in range(n)]

    def ctx(max_cases: int | None, found: list[Any]) -> Any:
        index = SimpleNamespace(cases=lambda split: found)
        return SimpleNamespace(index=index, train_datasets=["liver", "kidney", "spleen"],
                               cfg=SimpleNamespace(val_max_cases=max_cases))

    assert [c.case_id for c in validation_cases(ctx(2, cases))] == ["liver0", "kidney0"]
    assert [c.case_id for c in validation_cases(ctx(6, cases))] == ["liver0", "kidney0", "spleen0", "liver1",
                                                                     "spleen1", "liver2"]
    assert validation_cases(ctx(None, cases)) == cases  # no cap: every case, in their order
    full = [SimpleNamespace(dataset="val", case_id=f"val{i}", role="val") for i in range(3)]
    assert validation_cases(ctx(2, cases + full)) == full[:2]  # one dataset (a role: val set): its own order


def test_info_says_a_run_is_in_progress(phantom_project: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`info RUN` during a run read as a stopped one ("a checkpoint to resume from", "--resume goes on from
    there"): it names the process that holds the run folder, from /proc/locks, without taking the lock
    (helper-77)."""
    from unionseg.cli import run as cli

    run = tmp_path / "run"
    train(phantom_project, _cfg("naive", 3, "ckpt_every=1"), run, progress=False, stop_after=1)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; fh = open(sys.argv[1], 'a'); "
                               "fcntl.flock(fh, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert cli(["info", str(run)]) == 0
        out = capsys.readouterr().out
        assert f"{run}: a run in progress, in pid {holder.pid}" in out, out
    finally:
        holder.kill()
        holder.wait()
    assert cli(["info", str(run)]) == 0
    assert "in progress" not in capsys.readouterr().out  # stopped: nobody holds it


def test_a_shared_expert_of_another_process_count_is_reused_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts' cache key leaves the number of processes out (it may change on resume, as the device), so
    an MS-KD run on one process reused experts a torchrun run trained on two, at twice the batch, without a
    word (helper-79). One warning says so for all of them; the same count, or an expert that records none,
    says nothing."""
    import warnings

    from unionseg.artifacts import _warn_other_processes
    from unionseg.errors import UnionsegWarning
    from unionseg.training import distributed as dist

    experts = tmp_path / "experts"
    for name, record in (("liver", {"processes": [{"from_step": 0, "world_size": 2}]}), ("kidney", {"steps": 4}),
                         ("spleen", {"processes": [{"from_step": 0, "world_size": 1}]})):
        (experts / name).mkdir(parents=True)
        (experts / name / "summary.json").write_text(json.dumps(record))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_other_processes(experts, ["liver", "kidney", "spleen"], 2)
    (said,) = [str(w.message) for w in caught]
    assert "reused as they are, but some were trained on another number of processes than this run's 1 (liver " \
           "on 2): an effective batch of that many x 2 patches a step, where this run's is 1 x 2" in said
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnionsegWarning)
        _warn_other_processes(experts, ["liver", "kidney"], 2)


def test_the_validation_count_says_it_is_this_processs_share_under_torchrun(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Under torchrun rank 0's bar counted its own share of the validation cases, "case 1/1" of a 2-case
    validation (helper-79); it says whose count it is. One process: the count alone."""
    from unionseg.training import distributed as dist
    from unionseg.training.trainer import _Progress

    monkeypatch.setenv("UNIONSEG_PROGRESS_SECONDS", "0")
    for size, tail in ((1, "validating: case 1/1"), (2, "validating: case 1/1 (this process's share; 2 processes)")):
        monkeypatch.setattr(dist, "world_size", lambda size=size: size)
        bar = _Progress(4, 0, "naive", enabled=True)
        bar.validating("")(1, 1)
        bar.update(1, {"loss": 1.0})
        bar.close()
        lines = capsys.readouterr().err.splitlines()
        assert any(line.endswith(tail) for line in lines), lines


EXAMPLE_PLUGINS = Path(__file__).resolve().parents[1] / "examples" / "plugins"


def test_a_plugin_method_lists_trains_and_predicts(phantom_project: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/plugins/marginal_batch_dice.py, named by UNIONSEG_PLUGINS, is a method like the built-in ones
    (docs/extending.md): `unionseg methods` lists it as a plugin, it trains under the run's budget with its
    options, and its model file predicts without the plugin (the file holds the network, not the method)."""
    import numpy as np

    from unionseg.inference.predictor import Predictor
    from unionseg.methods import base
    from unionseg.training.recipes import train_config

    env = {**os.environ, "UNIONSEG_PLUGINS": "marginal_batch_dice",
           "PYTHONPATH": os.pathsep.join([str(EXAMPLE_PLUGINS), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([str(console_script("unionseg")), "methods"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^marginal_batch_dice +example plugin: .* \[plugin: marginal_batch_dice\]$", listed.stdout, re.M)
    bad = subprocess.run([str(console_script("unionseg")), "methods"], env={**env, "UNIONSEG_PLUGINS": "no_such_mod"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith(
        "error: UNIONSEG_PLUGINS: cannot import module 'no_such_mod' (No module named 'no_such_mod')")

    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGINS))
    monkeypatch.setenv("UNIONSEG_PLUGINS", "marginal_batch_dice")
    try:
        cfg = train_config("marginal_batch_dice", overrides=[*TINY, "steps=2", "val_every=2", "ckpt_every=2",
                                                             "options.dice_weight=0.5"])
        run = tmp_path / "run"
        summary = train(phantom_project, cfg, run, progress=False)
        assert summary["method"] == "marginal_batch_dice" and summary["options"] == {"dice_weight": 0.5}
        with pytest.raises(ConfigError, match="options of method 'marginal_batch_dice'.*exclusion_weight"):
            train_config("marginal_batch_dice", overrides=[*TINY, "steps=2", "options.exclusion_weight=1"])
        # a configuration built otherwise is refused by train() too, before its folder is made
        bad = dataclasses.replace(cfg, options={"exclusion_weight": 1})
        with pytest.raises(ConfigError, match="options of method 'marginal_batch_dice'.*exclusion_weight"):
            train(phantom_project, bad, tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad").exists()
    finally:
        base.METHODS.pop("marginal_batch_dice", None)  # other tests list the built-in methods only
        base._plugins_loaded.discard("marginal_batch_dice")
        sys.modules.pop("marginal_batch_dice", None)
    monkeypatch.delenv("UNIONSEG_PLUGINS")
    image = next((phantom_project.parent / "datasets" / "test" / "imagesTr").glob("*.nii.gz"))
    labels, _ = Predictor.from_checkpoint(run / "model.pt", device="cpu").predict(image)
    assert labels.dtype == np.uint8 and labels.ndim == 3


def test_plugin_loading_failures_and_a_plugin_without_a_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin that raises on import (not an ImportError) was a raw traceback, and the next lookup skipped it
    silently; one registering nothing passed without a word; a plugin without a recipe trained with the bare
    defaults (lr 0.003) where the built-in methods share lr 0.02; `uses_experts` knew three names only; and
    the isolated rows of a benchmark did not know a plugin imported by the calling script (helper-83)."""
    from unionseg.benchmark import uses_experts
    from unionseg.methods import base
    from unionseg.training.recipes import BUDGET_RECIPE, default_recipe, recipe_dir, train_config

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_plugin.py").write_text(  # registers a method, then fails: the same error every time
        "from unionseg.methods.base import register_method\n"
        "from unionseg.methods.baselines import NaiveMethod\n\n"
        "@register_method('half_registered')\n"
        "class M(NaiveMethod):\n    pass\n\n"
        "raise RuntimeError('oops')\n")
    (plugins / "asking_plugin.py").write_text(  # looks the methods up while it is imported
        "from unionseg.methods.base import available_methods, register_method\n"
        "from unionseg.methods.baselines import NaiveMethod\n\n"
        "assert 'naive' in available_methods()\n\n"
        "@register_method('asking_method')\n"
        "class M(NaiveMethod):\n    pass\n")
    (plugins / "empty_plugin.py").write_text("X = 1\n")
    (plugins / "expert_plugin.py").write_text(
        "from unionseg.methods.base import register_method\n"
        "from unionseg.methods.baselines import NaiveMethod\n\n"
        "@register_method('expert_plugin_method')\n"
        "class M(NaiveMethod):\n    stages = ('experts', 'train')\n\n"
        "@register_method('pseudo_plugin_method')\n"  # its pseudo labels train the experts first (helper-122)
        "class P(NaiveMethod):\n    stages = ('pseudo_labels', 'train')\n")
    monkeypatch.syspath_prepend(str(plugins))
    try:
        monkeypatch.setenv("UNIONSEG_PLUGINS", "broken_plugin")
        for _ in range(2):  # and again: a failing plugin is not skipped on the next lookup
            with pytest.raises(ConfigError, match="UNIONSEG_PLUGINS: module 'broken_plugin' failed to import: "
                                                  r"RuntimeError: oops \(at .*broken_plugin.py:8\)") as failed:  # the raise line
                base.available_methods()
            assert isinstance(failed.value.__cause__, RuntimeError)  # Python shows the plugin's own traceback
        assert "half_registered" not in base.METHODS
        # a plugin found, importing a package that is not installed: that package is named (the hint was the
        # plugin's own path; helper-122)
        (plugins / "needy_plugin.py").write_text("import not_installed_package_xyz  # noqa\n")
        monkeypatch.setenv("UNIONSEG_PLUGINS", "needy_plugin")
        with pytest.raises(ConfigError, match="module 'needy_plugin' imports 'not_installed_package_xyz', which "
                                              "cannot be imported"):
            base.available_methods()
        monkeypatch.setenv("UNIONSEG_PLUGINS", "empty_plugin")
        with pytest.warns(UserWarning, match="module 'empty_plugin' registers no method"):
            base.available_methods()
        monkeypatch.setenv("UNIONSEG_PLUGINS", "asking_plugin")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert "asking_method" in base.available_methods()
        monkeypatch.setenv("UNIONSEG_PLUGINS", "expert_plugin")
        assert uses_experts("expert_plugin_method") and uses_experts("mskd") and not uses_experts("dodnet")
        assert uses_experts("pseudo_plugin_method")
        assert default_recipe("expert_plugin_method") == recipe_dir() / BUDGET_RECIPE
        assert train_config("expert_plugin_method").optim.lr == train_config("naive").optim.lr == 0.02
        monkeypatch.delenv("UNIONSEG_PLUGINS")  # as a script that imported the plugin itself
        env = base.plugin_env({"PYTHONPATH": "/elsewhere"}, "expert_plugin_method")
        assert env["UNIONSEG_PLUGINS"] == "expert_plugin"
        assert env["PYTHONPATH"] == os.pathsep.join([str(plugins), "/elsewhere"])
        assert base.plugin_env({"A": "1"}, "naive") == {"A": "1"}
        with pytest.raises(ConfigError, match="unknown method 'nope'; known: .*a method of a plugin needs its "
                                              "module named in UNIONSEG_PLUGINS"):
            base.get_method("nope")
    finally:
        for method in ("expert_plugin_method", "asking_method", "half_registered"):
            base.METHODS.pop(method, None)
        for name in ("broken_plugin", "empty_plugin", "expert_plugin", "asking_plugin"):
            base._plugins_loaded.discard(name)
            sys.modules.pop(name, None)


def test_a_deploy_a_model_file_cannot_hold_is_refused_before_training(phantom_project: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A method whose deploy() names a channel the label space lacks trained its whole budget before the
    model file refused it (helper-83); it is refused before the first step, naming the method."""
    from unionseg.methods.base import Deployed
    from unionseg.methods.baselines import NaiveMethod
    from unionseg.training.trainer import Trainer

    def deploy(self: NaiveMethod) -> Deployed:
        return Deployed(self.raw_models["net"], self.network_spec(), "sigmoid", ["background"])

    monkeypatch.setattr(NaiveMethod, "deploy", deploy)
    steps: list[int] = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, batch: steps.append(self.step) or {})
    with pytest.raises(ConfigError, match="method 'naive': its model file could not hold what it deploys \\(model\\): "
                                          "sigmoid channel 'background' is neither a leaf nor a region"):
        train(phantom_project, _cfg("naive", 2), tmp_path / "run", progress=False)
    assert steps == []


def test_a_deploy_whose_network_returns_other_channels_is_refused_before_training(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deploy() whose channels the model file can hold, but whose network returns another number of them,
    trained its whole budget and wrote a model.pt that predict refused (helper-94); it is refused before the
    first step. The twin (the method's own deploy) trains, its network left in training mode."""
    from unionseg.methods.base import Deployed
    from unionseg.methods.baselines import NaiveMethod
    from unionseg.training.trainer import Trainer

    def deploy(self: NaiveMethod) -> Deployed:  # 7 sigmoid leaves from the 8-channel softmax network
        return Deployed(self.raw_models["net"], self.network_spec(), "sigmoid", list(self.space.names)[1:])

    steps: list[int] = []
    modes: list[bool] = []

    def step(self: Trainer, batch: dict) -> dict:
        steps.append(self.step)
        modes.append(self.method.raw_models["net"].training)
        return {}

    monkeypatch.setattr(Trainer, "train_step", step)
    with monkeypatch.context() as patched:
        patched.setattr(NaiveMethod, "deploy", deploy)
        with pytest.raises(ConfigError, match="method 'naive': the network it deploys \\(model\\) returns 8 channels "
                                              "on a window, and deploy\\(\\) declares 7 \\(sigmoid: liver, "):
            train(phantom_project, _cfg("naive", 2), tmp_path / "run", progress=False)
    assert steps == []
    train(phantom_project, _cfg("naive", 1), tmp_path / "twin", progress=False)
    assert steps == [0] and modes == [True]


def test_a_deployed_network_its_spec_does_not_build_is_refused_before_training(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin whose build() makes a network of its own trained its whole budget into a model.pt that
    predict could not load, the reason cut to "Error(s) in loading state_dict" (helper-106). It is refused
    before the first step, naming the weights that differ."""
    from torch import nn

    from unionseg.methods.baselines import NaiveMethod
    from unionseg.training.trainer import Trainer

    class Tiny(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, n, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    steps: list[int] = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, batch: steps.append(self.step) or {})
    monkeypatch.setattr(NaiveMethod, "build", lambda self: {"net": Tiny(self.space.n_leaves)})
    with pytest.raises(ConfigError, match=r"method 'naive': the network it deploys \(model\) is not the one its network "
                                          r"spec builds, so predict could not load its model file: its network lacks "
                                          r"\S+, \S+, \S+ and \d+ more; has weights the spec does not conv.bias, conv.weight"):
        train(phantom_project, _cfg("naive", 2), tmp_path / "run", progress=False)
    assert steps == []


def test_a_plugins_bad_declarations_are_refused_before_the_run_folder_is_written(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage nothing runs, or an extra named like a batch key, was a bare Python exception after config.yaml
    was written, so the corrected command was refused as a second run (helper-106). Both are refused first,
    and nothing is written; a training_step without 'loss' says what it must return (a KeyError before)."""
    from unionseg.methods.base import ExtraSpec
    from unionseg.methods.baselines import NaiveMethod

    with monkeypatch.context() as patched:
        patched.setattr(NaiveMethod, "stages", ("pseudo_label", "train"))
        with pytest.raises(ConfigError, match=r"method 'naive' declares stage 'pseudo_label', which is neither 'train' "
                                              r"nor a shared stage .* did you mean 'pseudo_labels'\?"):
            train(phantom_project, _cfg("naive", 1), tmp_path / "stage", progress=False)
    with monkeypatch.context() as patched:
        patched.setattr(NaiveMethod, "extras", lambda self: {"label": ExtraSpec("label", lambda case: None)})
        with pytest.raises(ConfigError, match=r"method 'naive': extra name 'label' is reserved for the batch"):
            train(phantom_project, _cfg("naive", 1), tmp_path / "extra", progress=False)
    assert not (tmp_path / "stage").exists() and not (tmp_path / "extra").exists()
    step = NaiveMethod.training_step
    monkeypatch.setattr(NaiveMethod, "training_step", lambda self, batch, i: {"total": step(self, batch, i)["loss"]})
    with pytest.raises(ConfigError, match=r"method 'naive': training_step returned total; it must return the total "
                                          r"loss under 'loss'"):
        train(phantom_project, _cfg("naive", 1), tmp_path / "loss", progress=False)


def test_a_method_with_shared_experts_on_a_cache_it_cannot_write_is_refused_before_its_folder(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts live in the prepared cache and lock there even when built: on a read-only shared cache
    `individual` failed at its first stage after writing config.yaml and stages.json, so the same command
    was then refused as a second run (helper-109). naive, which reads the cache only, trains."""
    from unionseg.config import load_project

    cache = load_project(phantom_project).cache_dir
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not Path(path).is_relative_to(cache) and real_access(path, mode))
    with pytest.raises(ConfigError, match="this method's shared experts live in the prepared cache, and this user "
                                          "cannot write there"):
        train(phantom_project, _cfg("individual", 1), tmp_path / "ind", progress=False)
    assert not (tmp_path / "ind").exists()
    train(phantom_project, _cfg("naive", 1), tmp_path / "naive", progress=False)


def test_a_resume_whose_log_it_cannot_append_to_is_refused_before_training(
        phantom_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """log.csv is appended in place: another user's log failed the resume at its first log row (helper-109)."""
    from unionseg.errors import UnionsegError

    run = tmp_path / "run"
    train(phantom_project, _cfg("naive", 4), run, progress=False, stop_after=2)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != run / "log.csv" and real_access(path, mode))
    with pytest.raises(UnionsegError, match="the run's log is not writable by this user") as info:
        train(phantom_project, _cfg("naive", 4), run, resume=True, progress=False)
    assert info.value.path == run / "log.csv"


def test_a_resumed_optimiser_state_takes_its_parameters_memory_layout() -> None:
    """load_state_dict keeps the checkpoint's layout: a run resumed on another device (channels-last kernels
    on the CPU, contiguous on CUDA) kept AdamW's state in the other one (helper-111)."""
    from unionseg.training.trainer import _match_state_layouts

    saved = torch.nn.Parameter(torch.randn(4, 3, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d))
    opt = torch.optim.AdamW([saved], lr=0.1)
    saved.grad = torch.ones_like(saved)
    opt.step()
    resumed = torch.nn.Parameter(saved.detach().contiguous())
    again = torch.optim.AdamW([resumed], lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert again.state[resumed]["exp_avg"].stride() != resumed.stride()  # what load_state_dict leaves
    before = {k: v.clone() for k, v in again.state[resumed].items()}
    _match_state_layouts(again)
    for key in ("exp_avg", "exp_avg_sq"):
        assert again.state[resumed][key].stride() == resumed.stride()
        assert torch.equal(again.state[resumed][key], before[key])


def test_every_backend_waits_the_same_time_for_the_other_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL's watchdog aborted after 10 minutes where gloo waits 30, while the other ranks wait for rank 0
    writing a checkpoint (helper-111): the process group gets one timeout, and CUDA ranks their device."""
    import datetime

    from unionseg.training import distributed as dist_module

    seen: list[dict] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist_module, "is_distributed", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: seen.append(kwargs))
    assert dist_module.setup(torch.device("cpu")) == torch.device("cpu")
    assert seen == [{"backend": "gloo", "timeout": datetime.timedelta(minutes=30), "device_id": None}]
