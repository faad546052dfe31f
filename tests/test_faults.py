"""Fault injection and safe loading.

Training, ``prepare`` and ``predict`` are killed with SIGKILL at named points (``UNIONSEG_FAULT_POINT``,
``UNIONSEG_KILL_AT_STEP``; see :mod:`unionseg.faults`) in real processes; the next run must finish as if
nothing happened: resumed weights equal an uninterrupted deterministic run bit for bit, no checkpoint,
cache entry or prediction is ever left truncated, and loading verifies what it reads. Model files,
checkpoints and YAML files never run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_PROJECT_YAML, write_tiny_case, write_tiny_project
from unionseg.cli import run
from unionseg.data.io import read_image
from unionseg.errors import CheckpointError, ConfigError, DataError
from unionseg.training.checkpoint import atomic_torch_save, safe_torch_load

UNIONSEG = Path(sys.executable).with_name("unionseg")
KILLED = -9  # subprocess return code of a SIGKILLed child
TRAIN_OVERRIDES = ["steps=6", "network.preset=tiny", "data.patch_size=[16,16,16]", "data.batch_size=2",
                   "val_every=100", "val_max_cases=1", "ckpt_every=2", "log_every=1", "deterministic=true",
                   "device=cpu"]


# A fork server: one process imports torch, MONAI and unionseg once; every command runs in a fresh forked
# child (a real process, killed by a real SIGKILL), so the tests pay the imports once, not per run. The
# parent never runs a torch operation, so forking it is safe. Without os.fork, plain subprocesses are used.
_SERVER = r"""
import json, os, sys, traceback
os.environ["OMP_NUM_THREADS"] = "1"
import torch, torch._inductor.config  # the second is what deterministic=true imports
import monai.inferers, monai.data.utils
import unionseg.cli, unionseg.training.trainer, unionseg.inference.predictor
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for key in ("UNIONSEG_FAULT_POINT", "UNIONSEG_KILL_AT_STEP"):
                os.environ.pop(key, None)
            os.environ.update(req["env"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            code = unionseg.cli.run(req["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


class Processes:
    """Run ``unionseg ARGV`` in a new process with fault settings; see ``_SERVER``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.server: subprocess.Popen[str] | None = None
        self.ready = False
        if hasattr(os, "fork"):  # started now, imports while the fixtures build their data
            env = {k: v for k, v in os.environ.items() if not k.startswith("UNIONSEG_")}
            self.server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, env=env)

    def run(self, argv: list[str], **faults: str) -> Result:
        if self.server is None:
            exe = [str(UNIONSEG)] if UNIONSEG.exists() else [sys.executable, "-m", "unionseg.cli"]
            env = {k: v for k, v in os.environ.items() if k not in ("UNIONSEG_FAULT_POINT", "UNIONSEG_KILL_AT_STEP")}
            proc = subprocess.run([*exe, *argv], env={**env, "OMP_NUM_THREADS": "1", **faults}, capture_output=True,
                                  text=True, timeout=300)
            return Result(proc.returncode, proc.stdout, proc.stderr)
        assert self.server.stdin is not None and self.server.stdout is not None
        if not self.ready:
            assert self.server.stdout.readline().strip() == "ready", "the fork server did not start"
            self.ready = True
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        self.server.stdin.write(json.dumps({"argv": argv, "env": faults, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.server.stdin.flush()
        reply = json.loads(self.server.stdout.readline())
        return Result(int(reply["rc"]), out.read_text(), err.read_text())

    def close(self) -> None:
        if self.server is not None:  # idle between commands: nothing to lose
            self.server.kill()
            self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    runner = Processes(tmp_path_factory.mktemp("processes"))
    yield runner
    runner.close()


def _train_argv(project: Path, out: Path, resume: bool) -> list[str]:
    return ["train", str(project), *TRAIN_OVERRIDES, "--method", "naive", "-o", str(out), "--quiet",
            *(["--resume"] if resume else [])]


def _step(path: Path) -> int:
    return int(safe_torch_load(path, "unionseg-checkpoint")["step"])


def _temporaries(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(".last.pt.*.tmp"))


def _logged_steps(run_dir: Path) -> list[int]:
    rows = (run_dir / "log.csv").read_text().splitlines()[1:]
    return [int(row.split(",")[0]) for row in rows]


def _assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold bit-identical weights and optimiser state at the same step."""
    sa, sb = safe_torch_load(a, "unionseg-checkpoint"), safe_torch_load(b, "unionseg-checkpoint")
    assert sa["step"] == sb["step"]
    assert sa["models"].keys() == sb["models"].keys()
    for name, weights in sa["models"].items():
        assert weights.keys() == sb["models"][name].keys()
        for key, tensor in weights.items():
            assert torch.equal(tensor, sb["models"][name][key]), f"{name}.{key} differs"
    for index, state in sa["optimizer"]["state"].items():
        for key, value in state.items():
            other = sb["optimizer"]["state"][index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer {index}.{key} differs"


def _weights_differ(a: Path, b: Path) -> bool:
    sa, sb = safe_torch_load(a)["models"], safe_torch_load(b)["models"]
    return any(not torch.equal(t, sb[n][k]) for n, w in sa.items() for k, t in w.items())


# ---------------------------------------------------------------------- a prepared phantom + the reference run
@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory, procs: Processes) -> Path:
    """A tiny phantom project (2 training cases per set, 1 val, 1 test), prepared."""
    from unionseg.config import load_project
    from unionseg.data.phantom import generate_phantom
    from unionseg.data.preprocess import prepare_project

    project = generate_phantom(tmp_path_factory.mktemp("faults") / "phantom", size="tiny", cases=(2, 1, 1), workers=1)
    prepare_project(load_project(project), workers=0, progress=False)
    return project


@pytest.fixture(scope="module")
def reference(phantom: Path, procs: Processes) -> Path:
    """``last.pt`` of the uninterrupted deterministic run."""
    out = phantom.parent / "reference"
    proc = procs.run(_train_argv(phantom, out, False))
    assert proc.returncode == 0, proc.stderr
    return out / "last.pt"


# ---------------------------------------------------------------------- training: kill, resume, compare
def test_killed_mid_write_and_before_rename_then_resumed_equals_uninterrupted(
    phantom: Path, reference: Path, procs: Processes, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    # 1. killed in the middle of writing the second checkpoint (step 4): last.pt still holds step 2, intact
    proc = procs.run(_train_argv(phantom, run_dir, False), UNIONSEG_FAULT_POINT="mid_write@2")
    assert proc.returncode == KILLED, proc.stderr
    assert _step(run_dir / "last.pt") == 2
    shutil.copy(run_dir / "last.pt", tmp_path / "step2.pt")
    partial = _temporaries(run_dir)
    assert len(partial) == 1  # the unsynced temporary of step 4: never read, never renamed
    # 2. resumed (from step 2), then killed after the fsync, before the rename: complete file, never in place
    proc = procs.run(_train_argv(phantom, run_dir, True), UNIONSEG_FAULT_POINT="before_rename")
    assert proc.returncode == KILLED, proc.stderr
    assert _step(run_dir / "last.pt") == 2
    # the second run resumed after step 2: it dropped the first run's rows 3-4 and logged its own, once each
    assert _logged_steps(run_dir) == [1, 2, 3, 4]
    complete = _temporaries(run_dir)
    assert len(complete) == 1 and complete != partial  # the killed writer's leftover was removed
    assert _step(complete[0]) == 4
    # 3. resumed to the end: bit-identical to the run that was never interrupted
    proc = procs.run(_train_argv(phantom, run_dir, True))
    assert proc.returncode == 0, proc.stderr
    assert _step(run_dir / "last.pt") == 6
    assert _temporaries(run_dir) == []
    ref = reference
    _assert_same_state(run_dir / "last.pt", ref)
    assert _weights_differ(run_dir / "last.pt", tmp_path / "step2.pt")  # twin: training did change the weights
    from unionseg.modelfile import load_model

    resumed_model, ref_model = load_model(run_dir / "model.pt"), load_model(ref.with_name("model.pt"))
    for key, tensor in ref_model["state_dict"].items():
        assert torch.equal(tensor, resumed_model["state_dict"][key]), key


def _random_fault(rng: random.Random) -> dict[str, str]:
    kind = rng.choice(["step", "mid_write", "before_rename"])
    if kind == "step":
        return {"UNIONSEG_KILL_AT_STEP": str(rng.randint(1, 5))}
    return {"UNIONSEG_FAULT_POINT": f"{kind}@{rng.randint(1, 3)}"}


@pytest.mark.slow
def test_random_kill_points_then_resume_equals_uninterrupted(phantom: Path, reference: Path, procs: Processes,
                                                             tmp_path: Path) -> None:
    """Two random kills (a step, or inside a checkpoint write), each followed by ``--resume``; the seed is
    printed on failure (rerun with ``UNIONSEG_FAULT_SEED``)."""
    seed = int(os.environ.get("UNIONSEG_FAULT_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    faults = [_random_fault(rng), _random_fault(rng)]
    for i, fault in enumerate(faults):
        proc = procs.run(_train_argv(phantom, run_dir, i > 0), **fault)
        assert proc.returncode in (0, KILLED), (seed, fault, proc.stderr)
        if (run_dir / "last.pt").exists():
            _step(run_dir / "last.pt")  # never truncated: loads and verifies
    proc = procs.run(_train_argv(phantom, run_dir, True))
    assert proc.returncode == 0, (seed, faults, proc.stderr)
    _assert_same_state(run_dir / "last.pt", reference)
    assert _temporaries(run_dir) == [], (seed, faults)


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f".last.pt.{int(dead.stdout)}.tmp"
        busy = tmp_path / f".last.pt.{live.pid}.tmp"
        for path in (stale, busy):
            path.write_bytes(b"partial")
        atomic_torch_save({"format": "unionseg-checkpoint", "step": 1}, tmp_path / "last.pt")
        assert not stale.exists()
        assert busy.exists()  # twin: a writer that is still running keeps its file
        assert _step(tmp_path / "last.pt") == 1
    finally:
        live.kill()
        live.wait()


def test_truncated_checkpoint_is_refused_at_every_length(tmp_path: Path) -> None:
    path = atomic_torch_save({"format": "unionseg-checkpoint", "step": 3, "w": torch.arange(5000.0)},
                             tmp_path / "last.pt")
    assert _step(path) == 3  # twin: the complete file loads
    data = path.read_bytes()
    for fraction in (0.0, 0.1, 0.5, 0.9, 0.999):
        cut = tmp_path / f"cut_{fraction}.pt"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
            safe_torch_load(cut, "unionseg-checkpoint")
        assert info.value.path == cut


# ---------------------------------------------------------------------- prepare
def _entries(cache: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in cache.glob("*/*.json")}


def _assert_entries_valid(cache: Path) -> None:
    """Every case with a ``.json`` (the commit marker) has complete arrays on its recorded grid."""
    for meta_path in cache.glob("*/*.json"):
        meta = json.loads(meta_path.read_text())
        shape = tuple(meta["record"]["prepared"]["shape"])
        for kind in ("image", "label"):
            array = np.load(meta_path.with_name(f"{meta_path.stem}.{kind}.npy"))
            assert array.shape == shape, meta_path


@pytest.mark.parametrize("point", ["prepare_before_commit@3", "prepare_mid_commit@3"])
def test_prepare_killed_mid_way_leaves_no_corrupt_entry_and_reruns(point: str, procs: Processes,
                                                                   tmp_path: Path) -> None:
    from unionseg.config import load_project
    from unionseg.data.preprocess import PreparedIndex, prepare_project

    project = write_tiny_project(tmp_path / "project")
    clean = tmp_path / "clean"
    shutil.copytree(project.parent, clean)
    prepare_project(load_project(clean / "project.yaml"), workers=0, progress=False)
    proc = procs.run(["prepare", str(project), "--workers", "0"], UNIONSEG_FAULT_POINT=point)
    assert proc.returncode == KILLED, proc.stderr
    cache = project.parent / "prepared"
    assert not (cache / "index.json").exists()
    with pytest.raises(DataError, match="not prepared"):
        PreparedIndex.load(load_project(project))
    assert sorted(_entries(cache)) == ["liver_000", "liver_001"]  # the third case never became an entry
    _assert_entries_valid(cache)
    if point.startswith("prepare_mid_commit"):
        assert (cache / "liver" / "liver_002.image.npy").exists()  # arrays in place, commit marker missing
    assert run(["prepare", str(project), "--workers", "0"]) == 0
    index = PreparedIndex.load(load_project(project))
    assert len(index) == 9
    _assert_entries_valid(cache)
    for case in index:
        reference = clean / "prepared" / case.dataset / f"{case.case_id}.image.npy"
        assert np.array_equal(case.image(), np.load(reference))
        assert np.array_equal(case.label(), np.load(reference.with_name(f"{case.case_id}.label.npy")))


def test_prepare_worker_killed_is_one_clear_error_then_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = write_tiny_project(tmp_path / "project")
    monkeypatch.setenv("UNIONSEG_FAULT_POINT", "prepare_before_commit@2")  # inherited by the spawned workers
    assert run(["prepare", str(project), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a prepare worker died (killed, or out of memory)" in err[0], err
    assert err[0].startswith(f"error: {project.parent / 'prepared'}")
    _assert_entries_valid(project.parent / "prepared")
    monkeypatch.delenv("UNIONSEG_FAULT_POINT")
    assert run(["prepare", str(project), "--workers", "0"]) == 0  # twin: without the fault it completes
    assert (project.parent / "prepared" / "index.json").is_file()


# ---------------------------------------------------------------------- predict
def _tiny_model(path: Path) -> Path:
    """An untrained tiny ResUNet model file of the tiny project's label space (3 mm)."""
    from unionseg.config import PreprocessSpec
    from unionseg.labels import LabelSpace, Leaf
    from unionseg.modelfile import make_payload, save_model
    from unionseg.networks import build_network

    space = LabelSpace([Leaf("liver"), Leaf("liver_tumour", "liver"), Leaf("kidney")])
    torch.manual_seed(0)
    net = build_network({"backbone": {"name": "resunet", "preset": "tiny"},
                         "head": {"name": "softmax", "out_channels": space.n_leaves}})
    payload = make_payload(method="naive", network=net.spec, state_dict=net.state_dict(), output_form="softmax",
                           channels=list(space.names), label_space=space,
                           preprocessing=PreprocessSpec(spacing=(3.0, 3.0, 3.0)), inference={"roi_size": [16] * 3})
    return save_model(path, payload)


def test_predict_killed_while_writing_leaves_no_partial_output(procs: Processes, tmp_path: Path) -> None:
    from unionseg.data.catalog import list_image_files

    model = _tiny_model(tmp_path / "model.pt")
    images = [tmp_path / "in" / f"{name}.nii.gz" for name in ("a", "b")]
    for i, image in enumerate(images):
        write_tiny_case(image, None, seed=i, shape=(12, 10, 8))
    out = tmp_path / "out"
    argv = ["predict", str(model), *map(str, images), "-o", str(out), "--device", "cpu"]
    proc = procs.run(argv, UNIONSEG_FAULT_POINT="write_image_before_rename@2")
    assert proc.returncode == KILLED, proc.stderr
    assert list_image_files(out) == [out / "a.nii.gz"]  # a is complete, b was never written half-way
    assert read_image(out / "a.nii.gz")[0].shape == (12, 10, 8)
    assert not (out / "b.nii.gz").exists()
    assert procs.run(argv).returncode == 2  # the plain rerun refuses to replace a.nii.gz
    a_bytes = (out / "a.nii.gz").read_bytes()
    assert procs.run([*argv, "--skip-existing"]).returncode == 0  # twin: the rerun finishes the interrupted batch
    assert [p.name for p in list_image_files(out)] == ["a.nii.gz", "b.nii.gz"]
    assert (out / "a.nii.gz").read_bytes() == a_bytes  # a was skipped, not redone
    assert read_image(out / "b.nii.gz")[1].same_grid(read_image(images[1])[1])


# ---------------------------------------------------------------------- safe loading
class _CreatesFile:
    """A pickle payload that, if unpickled unsafely, creates ``path`` (as an attacker's code would run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def _crafted(path: Path, marker: Path, fmt: str) -> Path:
    torch.save({"format": fmt, "version": 1, "step": 1, "state_dict": {"w": _CreatesFile(marker)}}, path)
    return path


def test_crafted_pickle_is_live_when_loaded_unsafely(tmp_path: Path) -> None:
    """The twin that proves the payload below is real: ``weights_only=False`` runs it."""
    marker = tmp_path / "created"
    evil = _crafted(tmp_path / "evil.pt", marker, "unionseg-model")
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_crafted_model_file_is_refused_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unionseg.modelfile import load_model

    marker = tmp_path / "created"
    evil = _crafted(tmp_path / "evil.pt", marker, "unionseg-model")
    with pytest.raises(CheckpointError, match="unsafe pickle") as info:
        load_model(evil)
    assert info.value.path == evil
    image = tmp_path / "scan.nii.gz"
    write_tiny_case(image, None)
    capsys.readouterr()
    assert run(["predict", str(evil), str(image), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {evil}: refused") and "unsafe pickle" in err[0], err
    assert not marker.exists()
    assert not (tmp_path / "out" / "scan.nii.gz").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "created"
    evil = _crafted(tmp_path / "last.pt", marker, "unionseg-checkpoint")
    with pytest.raises(CheckpointError, match=r"refused to load: .*\(unsafe pickle\); nothing in it was run") as info:
        safe_torch_load(evil, "unionseg-checkpoint")
    assert info.value.path == evil and "io.open" in info.value.message
    legacy = tmp_path / "legacy.pkl"  # a plain pickle (not a torch zip file) is refused the same way
    import pickle

    legacy.write_bytes(pickle.dumps({"format": "unionseg-checkpoint", "x": _CreatesFile(marker)}))
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_torch_load(legacy, "unionseg-checkpoint")
    assert not marker.exists()


def test_resume_from_a_crafted_checkpoint_is_refused(phantom: Path, procs: Processes, tmp_path: Path) -> None:
    marker = tmp_path / "created"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _crafted(run_dir / "last.pt", marker, "unionseg-checkpoint")
    proc = procs.run(_train_argv(phantom, run_dir, resume=True))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run_dir / 'last.pt'}: refused to load"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


YAML_ATTACK = "!!python/object/apply:builtins.open [{marker!r}, 'w']"


def test_yaml_with_a_python_tag_is_live_when_loaded_unsafely(tmp_path: Path) -> None:
    marker = tmp_path / "created"
    yaml.unsafe_load(f"name: {YAML_ATTACK.format(marker=str(marker))}\n")
    assert marker.exists()


def test_project_yaml_with_a_python_tag_is_refused_and_runs_nothing(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from unionseg.config import load_project

    marker = tmp_path / "created"
    project = write_tiny_project(tmp_path / "project")
    project.write_text(TINY_PROJECT_YAML.replace("name: tiny", f"name: {YAML_ATTACK.format(marker=str(marker))}"))
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_project(project)
    assert info.value.path == project
    capsys.readouterr()
    assert run(["prepare", str(project), "--workers", "0"]) == 2
    assert "error: " + str(project) + ": invalid YAML" in capsys.readouterr().err
    assert not marker.exists()
    assert not (project.parent / "prepared").exists()


def test_recipe_and_override_with_a_python_tag_run_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unionseg.training.config import load_train_config

    marker = tmp_path / "created"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"steps: {YAML_ATTACK.format(marker=str(marker))}\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_train_config(recipe)
    assert info.value.path == recipe
    # an override is parsed with the safe loader: the tag is refused as YAML, then rejected as a value
    with pytest.raises(ConfigError, match="steps"):
        load_train_config(None, [f"steps={YAML_ATTACK.format(marker=str(marker))}"])
    assert not marker.exists()


def test_a_shared_artefact_on_a_full_disk_is_named_and_leaves_no_temporary(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An expert's probability map on a full disk was a traceback (numpy's short write carries no errno) and
    left its temporary, never removed (hundreds of MB on real CT). Now ENOSPC names the file, the temporary
    goes, and a temporary a killed writer left is removed when the file is written again (helper-99)."""
    import errno

    from unionseg.artifacts import _atomic_save_npy

    target = tmp_path / "probs" / "liver" / "case.npy"
    real_open = Path.open

    class Full:  # a file that takes 100 bytes, then finds the disk full
        def __init__(self, fh: object) -> None:
            self.fh, self.left = fh, 100

        def write(self, data: bytes) -> int:
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.fh.write(data)  # type: ignore[attr-defined, no-any-return]

        def __getattr__(self, name: str) -> object:
            return getattr(self.fh, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()  # type: ignore[attr-defined]

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Full(real_open(self, *a, **k)))
    with pytest.raises(OSError) as failed:
        _atomic_save_npy(target, np.zeros((64, 64, 8), np.float16))
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(target)
    assert list(target.parent.iterdir()) == []  # neither the file nor its temporary
    monkeypatch.undo()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = target.parent / f".{target.name}.{int(dead.stdout)}.tmp"  # what a killed writer leaves
    left.write_bytes(b"\0" * 1000)
    os.utime(left, (0, 0))  # long unchanged: a live writer on another node keeps its file changing
    import unionseg.artifacts as artifacts

    monkeypatch.setattr(artifacts, "_SWEPT", set())  # a later process: it has swept no folder yet
    _atomic_save_npy(target, np.ones((4, 4, 4), np.float16))
    assert np.load(target).sum() == 64 and sorted(target.parent.iterdir()) == [target]
