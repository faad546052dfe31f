"""Concurrency: processes that share an output folder, a prepared cache, or the shared artefact cache.

Real processes throughout: lock holders are plain ``python -c`` children; ``unionseg`` commands are forked
from one server process that imported torch, MONAI and unionseg once (as in ``test_faults.py``), so that
two of them can run at the same time without paying the imports twice. Orderings are forced, not hoped for:
the test holds a lock itself, or freezes a holder with SIGSTOP, until the other process is seen waiting.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import write_tiny_case, write_tiny_project
from unionseg.cli import run
from unionseg.data.io import read_image
from unionseg.errors import DataError, UnionsegError
from unionseg.locking import FileLock, hold_lock

UNIONSEG = Path(sys.executable).with_name("unionseg")

# A child that takes a lock, says so, holds it for argv[2] seconds (or until killed), then exits.
_HOLDER = r"""
import sys, time
from unionseg.locking import FileLock
lock = FileLock(sys.argv[1], "a test resource")
assert lock.try_acquire(), "the lock was busy"
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""

# The fork server: imports once, then forks one child per "start" request and answers with its pid at once
# (so that two commands run side by side); "wait" reaps one child. The parent never runs a torch operation.
_SERVER = r"""
import json, os, sys, traceback
os.environ["OMP_NUM_THREADS"] = "1"
import torch, torch._dynamo, torch._inductor.config, torch.utils.tensorboard
import monai.inferers, monai.data.utils
import unionseg.cli, unionseg.training.trainer, unionseg.inference.predictor, unionseg.methods.cotraining
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            if "python" in req:  # a python -c script with its arguments
                sys.argv = ["-c", *req["argv"]]
                exec(req["python"], {"__name__": "__main__"})
                code = 0
            else:
                code = unionseg.cli.run(req["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
"""


class Command:
    """One running ``unionseg`` command: its pid and the files its stdout and stderr go to."""

    def __init__(self, pid: int, out: Path, err: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.pid, self.out, self.err, self.proc = pid, out, err, proc
        self.returncode: int | None = None

    def stderr(self) -> str:
        return self.err.read_text() if self.err.exists() else ""

    def stdout(self) -> str:
        return self.out.read_text() if self.out.exists() else ""


class Commands:
    """Start ``unionseg ARGV`` in new processes that may overlap; see ``_SERVER``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.server: subprocess.Popen[str] | None = None
        self.ready = False
        if hasattr(os, "fork"):
            env = {k: v for k, v in os.environ.items() if not k.startswith("UNIONSEG_")}
            self.server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, request: dict) -> dict:
        assert self.server is not None and self.server.stdin is not None and self.server.stdout is not None
        if not self.ready:
            assert self.server.stdout.readline().strip() == "ready", "the fork server did not start"
            self.ready = True
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def start(self, argv: list[str], light: bool = False, python: str | None = None) -> Command:
        """Start ``unionseg ARGV`` (or ``python -c PYTHON ARGV``); ``light`` (commands that import no torch):
        a plain new process."""
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        if self.server is None or light:
            exe = [str(UNIONSEG)] if UNIONSEG.exists() else [sys.executable, "-m", "unionseg.cli"]
            if python is not None:
                exe = [sys.executable, "-c", python]
            env = {k: v for k, v in os.environ.items() if not k.startswith("UNIONSEG_")}
            proc = subprocess.Popen([*exe, *argv], stdout=out.open("wb"), stderr=err.open("wb"),
                                    env={**env, "OMP_NUM_THREADS": "1"})
            return Command(proc.pid, out, err, proc)
        request = {"op": "start", "argv": argv, "stdout": str(out), "stderr": str(err)}
        reply = self._ask({**request, **({"python": python} if python is not None else {})})
        return Command(int(reply["pid"]), out, err)

    def wait(self, command: Command) -> Command:
        if command.returncode is None:
            if command.proc is not None:
                command.returncode = command.proc.wait(timeout=300)
            else:
                command.returncode = int(self._ask({"op": "wait", "pid": command.pid})["rc"])
        return command

    def run(self, argv: list[str]) -> Command:
        return self.wait(self.start(argv))

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait(timeout=60)


@pytest.fixture(scope="module", autouse=True)
def commands(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Commands]:
    runner = Commands(tmp_path_factory.mktemp("commands"))  # started first: it imports while the lock tests run
    yield runner
    runner.close()


def _until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` every 20 ms; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Holder:
    """A child process holding a lock (see ``_HOLDER``)."""

    def __init__(self, path: Path, seconds: float = 60.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(seconds)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------- the lock itself
def test_lock_of_another_process_refuses_at_once_naming_it_and_frees_when_it_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "cache" / ".lock"
    holder = Holder(path)
    try:
        lock = FileLock(path, "the test cache")
        assert not lock.try_acquire()
        with pytest.raises(UnionsegError) as info:
            lock.acquire(timeout=0)
        assert info.value.path == path
        assert info.value.message.startswith(f"the test cache is in use by pid {holder.pid} (")
        assert "not waiting" in info.value.message and "released when that process ends" in info.value.message
    finally:
        holder.kill()  # SIGKILL: no cleanup, the kernel releases the lock
    lock.acquire(timeout=0)  # twin: free at once, never stale
    assert lock.held
    lock.release()
    assert path.read_bytes() == b""  # the lock file is never written


def test_lock_waits_for_its_holder_then_takes_it_or_gives_up_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    holder = Holder(path, seconds=3)  # held long enough that a stall under load cannot let the first try through
    messages: list[str] = []
    try:
        with pytest.raises(UnionsegError, match=r"in use by pid \d+ .*; gave up after waiting \d+\.\d s"):
            FileLock(path, "the test cache").acquire(timeout=0.3, notify=messages.append)
        assert len(messages) == 1 and messages[0].startswith(f"{path}: the test cache is in use by pid {holder.pid}")
        assert messages[0].endswith("waiting for it to finish (at most 0.3 s)")
        start = time.monotonic()
        with hold_lock(path, "the test cache", timeout=30, notify=messages.append) as lock:  # twin: long enough
            # it got the lock once the holder had ended: the kernel lets the lock go as the holder's files
            # close, a moment before the process can be reaped, so wait for that, not poll (helper-126)
            assert lock.held and holder.proc.wait(timeout=10) is not None
        assert time.monotonic() - start < 20
        assert len(messages) == 2  # the second call waited (and said so)
    finally:
        holder.kill()


def test_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    probe = [sys.executable, "-c", "import sys; from unionseg.locking import FileLock; "
             "print(FileLock(sys.argv[1], 'x').try_acquire())", str(path)]

    def free_for_another_process() -> bool:
        return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "True"

    assert free_for_another_process()
    with hold_lock(path, "outer"):
        with hold_lock(path, "inner", timeout=0):  # nested in the same process: no self-deadlock
            assert not free_for_another_process()
        assert not free_for_another_process()  # the inner release keeps the outer hold
    assert free_for_another_process()
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        FileLock(path, "x").acquire(timeout=-1)


# ---------------------------------------------------------------------- prepare
def _cache_arrays(cache: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(cache)): np.load(p) for p in sorted(cache.glob("*/*.npy"))}


def _assert_same_cache(cache: Path, reference: Path) -> None:
    ours, theirs = _cache_arrays(cache), _cache_arrays(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 18  # 9 cases: image + label
    for key, array in ours.items():
        assert np.array_equal(array, theirs[key]), key
    assert [p.name for p in cache.rglob(".*") if p.name != ".lock"] == []  # no temporaries left


def test_two_prepares_of_one_cache_wait_and_never_interleave(commands: Commands, tmp_path: Path) -> None:
    from unionseg.config import load_project
    from unionseg.data.preprocess import PreparedIndex, prepare_project

    project = write_tiny_project(tmp_path / "project")
    clean = tmp_path / "clean"
    shutil.copytree(project.parent, clean)
    prepare_project(load_project(clean / "project.yaml"), workers=0, progress=False)
    cache = project.parent / "prepared"
    argv = ["prepare", str(project), "--workers", "0"]
    with hold_lock(cache / ".lock", "the prepared cache"):  # both start while the cache is busy
        first, second = commands.start(argv, light=True), commands.start(argv, light=True)
        _until(lambda: "waiting:" in first.stderr() and "waiting:" in second.stderr(), "both prepares wait")
        assert not (cache / "index.json").exists() and not list(cache.glob("*/*"))  # nothing written yet
    for cmd in (first, second):
        assert commands.wait(cmd).returncode == 0, cmd.stderr()
        text = _one_line(cmd.stderr())
        assert text.startswith(f"waiting: {cache / '.lock'}: the prepared cache is in use by pid {os.getpid()} (")
        assert text.count("waiting:") == 1
    summaries = sorted(re.search(r"tiny: (prepared \d+ case\(s\).*?up-to-date case\(s\))", _one_line(c.stderr()))[1]
                       for c in (first, second))
    # one did the work; the other started only when it had finished, and found every case done
    assert summaries == ["prepared 0 case(s), re-did labels of 0, skipped 9 up-to-date case(s)",
                         "prepared 9 case(s), re-did labels of 0, skipped 0 up-to-date case(s)"]
    assert len(PreparedIndex.load(load_project(project))) == 9
    _assert_same_cache(cache, clean / "prepared")


def test_prepare_with_wait_0_refuses_a_busy_cache_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = write_tiny_project(tmp_path / "project")
    cache = project.parent / "prepared"
    holder = Holder(cache / ".lock")
    try:
        assert run(["prepare", str(project), "--workers", "0", "--wait", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(f"error: {cache / '.lock'}: the prepared cache is in use by pid {holder.pid} (")
        assert err[0].endswith("not waiting (the lock is released when that process ends); run prepare again "
                               "once it has finished, or wait longer with --wait SECONDS")
        assert sorted(p.name for p in cache.rglob("*")) == [".lock"]
    finally:
        holder.kill()
    assert run(["prepare", str(project), "--workers", "0", "--wait", "0"]) == 0  # twin: a free cache is prepared
    assert (cache / "index.json").is_file()


# ---------------------------------------------------------------------- predict
def _tiny_model(path: Path) -> Path:
    """An untrained tiny ResUNet model file (3 mm; liver, liver tumour, kidney)."""
    import torch

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


def _complete_and_equal(path: Path, reference: Path) -> bool:
    """The output reads back completely, on the reference's grid, with the reference's labels."""
    labels, geom = read_image(path)
    ref_labels, ref_geom = read_image(reference)
    return geom.same_grid(ref_geom) and np.array_equal(labels, ref_labels)


def test_reader_check_catches_a_partially_written_output(tmp_path: Path) -> None:
    """The twin of the check below: a file written in place (not atomically) and read half-way is caught."""
    image = tmp_path / "a.nii.gz"
    write_tiny_case(image, None, shape=(12, 10, 8))
    half = tmp_path / "half.nii.gz"
    half.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated"):
        _complete_and_equal(half, image)
    assert _complete_and_equal(image, image)


def test_two_predicts_into_one_folder_write_complete_identical_files(commands: Commands, tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "model.pt")
    images = [tmp_path / "in" / f"case_{i}.nii.gz" for i in range(6)]
    for i, image in enumerate(images):
        write_tiny_case(image, None, seed=i, shape=(14, 12, 10))
    predict = ["predict", str(model), *map(str, images), "--device", "cpu", "--overwrite"]  # both write the same
    reference = tmp_path / "reference"
    assert commands.run([*predict, "-o", str(reference)]).returncode == 0
    out = tmp_path / "out"
    both = [commands.start([*predict, "-o", str(out)]) for _ in range(2)]
    checked = 0
    deadline = time.monotonic() + 120
    while any(_one_line(cmd.stderr()).count(": wrote ") < 6 for cmd in both):  # read while they write
        assert time.monotonic() < deadline, [cmd.stderr() for cmd in both]
        for image in images:
            target = out / image.name
            if target.exists():
                assert _complete_and_equal(target, reference / image.name), target
                checked += 1
        time.sleep(0.01)
    for cmd in both:
        assert commands.wait(cmd).returncode == 0, cmd.stderr()
        assert _one_line(cmd.stderr()).count(": wrote ") == 6  # each process wrote every file
    tables = ["unionseg_labels.ctbl", "unionseg_labels.itksnap.txt"]  # the viewers' label tables
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in images), *tables])  # no temporaries
    for image in images:
        assert _complete_and_equal(out / image.name, reference / image.name)
    assert checked > 0


# ---------------------------------------------------------------------- shared artefacts (experts)
TRAIN = ["steps=2", "expert_steps=3", "network.preset=tiny", "data.patch_size=[16,16,16]", "data.batch_size=1",
         "inference.roi_size=[64,64,48]", "inference.overlap=0", "val_every=100", "val_max_cases=1",
         "ckpt_every=100", "log_every=1", "device=cpu", "--quiet"]


@pytest.fixture(scope="module")
def pair_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared phantom with two training sets (liver + tumour, spleen): two experts."""
    from unionseg.config import load_project
    from unionseg.data.phantom import PhantomSpec, TrainingSetSpec, generate_phantom
    from unionseg.data.preprocess import prepare_project

    spec = PhantomSpec("pair", (("liver", None), ("liver_tumour", "liver"), ("spleen", None)), (
        TrainingSetSpec("liver", ((1, "liver"), (2, "liver_tumour")), ("liver", "liver_tumour")),
        TrainingSetSpec("spleen", ((1, "spleen"),), ("spleen",))))
    project = generate_phantom(tmp_path_factory.mktemp("pair") / "phantom", size="tiny", suite=spec,
                               cases=(2, 1, 1), workers=1)
    prepare_project(load_project(project), workers=0, progress=False)
    return project


def _trainers(expert_dir: Path) -> list[int]:
    """Pids of the processes that trained in this run folder (one TensorBoard event file per training)."""
    return sorted(int(p.name.split(".")[-2]) for p in (expert_dir / "tb").glob("events.out.tfevents.*"))


def test_two_trainings_of_different_methods_train_each_expert_once_and_share_it(
    commands: Commands, pair_phantom: Path
) -> None:
    from unionseg.locking import FileLock

    runs = pair_phantom.parent
    individual = commands.start(["train", str(pair_phantom), *TRAIN, "--method", "individual",
                                 "-o", str(runs / "individual")])
    locks = pair_phantom.parent / "prepared" / "artifacts"

    def holds_liver_expert() -> bool:
        found = list(locks.glob("*/locks/expert-liver.lock"))
        return bool(found) and FileLock(found[0], "x").holder().startswith(f"pid {individual.pid} ")

    _until(holds_liver_expert, "the first run trains the liver expert")
    os.kill(individual.pid, signal.SIGSTOP)  # frozen while it holds the lock: the second run must find it busy
    try:
        # a stall between the poll and the stop could let it finish the 3-step expert first: say so, not later
        assert holds_liver_expert(), "the first run left the liver expert before it was stopped (a stall)"
        cotraining = commands.start(["train", str(pair_phantom), *TRAIN, "--method", "cotraining",
                                     "-o", str(runs / "cotraining")])
        _until(lambda: "waiting:" in cotraining.stderr(), "the second run waits for the liver expert")
    finally:
        os.kill(individual.pid, signal.SIGCONT)
    for cmd in (individual, cotraining):
        assert commands.wait(cmd).returncode == 0, cmd.stderr()
    waited = _one_line(cotraining.stderr())
    assert re.search(rf"waiting: \S+/locks/expert-liver\.lock: shared artefact 'expert-liver' is in use by "
                     rf"pid {individual.pid} \(", waited), waited
    assert "waiting:" not in individual.stderr()  # twin: the first run never waited
    (root,) = list(locks.iterdir())  # one artefact folder: both runs used the same experts
    assert _trainers(root / "experts" / "liver") == [individual.pid]  # trained once, by the first run only
    assert len(_trainers(root / "experts" / "spleen")) == 1  # by whichever came first; the other reused it
    for name in ("liver", "spleen"):
        rows = (root / "experts" / name / "log.csv").read_text().splitlines()[1:]
        assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3]  # one training, never interleaved
    assert set(json.loads((root / "compute.json").read_text())) == {
        "expert:liver", "expert:spleen", "probs:liver", "probs:spleen", "pseudo_labels"}
    stages = json.loads((runs / "cotraining" / "stages.json").read_text())
    assert stages["pseudo_labels"]["pseudo_labels"] == 4  # the second run went on with the shared experts
    assert (runs / "individual" / "model.pt").is_file() and (runs / "cotraining" / "model.pt").is_file()


# Two DDP ranks (gloo, CPU) entering one artefact lock together, as the stages do under torchrun.
_RANK = r"""
import json, os, sys, time
from pathlib import Path
from types import SimpleNamespace
import torch, torch.distributed as tdist
rank, store, root = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
from unionseg.artifacts import ArtifactCache
from unionseg.locking import FileLock
cache = ArtifactCache.__new__(ArtifactCache)  # only what the lock needs: the root and the rank
cache.ctx, cache.root = SimpleNamespace(is_main=rank == 0, device=torch.device("cpu")), root
print(json.dumps({"pid": os.getpid()}), flush=True)
with cache._exclusive("expert-x"):
    entered = time.time()
    holder = FileLock(root / "locks" / "expert-x.lock", "x").holder()
    time.sleep(0.3 if rank == 0 else 0.0)  # rank 1 must not leave before rank 0 has finished in here
print(json.dumps({"entered": entered, "left": time.time(), "holder": holder}), flush=True)
tdist.barrier()
os._exit(0)  # no process-group teardown, where a gloo rank sometimes aborts under load (helper-126)
"""


def test_ddp_ranks_wait_for_an_artefact_lock_together_and_rank_0_holds_it(commands: Commands, tmp_path: Path) -> None:
    store = tmp_path / "rendezvous"  # a file, not a port found free and then released (helper-126)
    root = tmp_path / "artifacts"
    holder = Holder(root / "locks" / "expert-x.lock")  # another run is making the artefact
    try:
        ranks = [commands.start([str(r), str(store), str(root)], python=_RANK) for r in range(2)]
        _until(lambda: "waiting:" in ranks[0].stderr(), "rank 0 waits")
        released = time.time()
        holder.kill()
        for rank in ranks:
            assert commands.wait(rank).returncode == 0, rank.stderr()
    finally:
        holder.kill()
    pid0 = json.loads(ranks[0].stdout().splitlines()[0])["pid"]
    results = [json.loads(rank.stdout().splitlines()[-1]) for rank in ranks]
    assert ranks[0].stderr().startswith(f"waiting: {root / 'locks' / 'expert-x.lock'}: shared artefact 'expert-x' is "
                                        f"in use by pid {holder.pid} (")
    assert "waiting:" not in ranks[1].stderr()  # one line in all, from rank 0
    assert all(r["entered"] >= released for r in results)  # both ranks waited for the other run
    assert results[1]["holder"].startswith(f"pid {pid0} ")  # inside, rank 0 holds the lock for both
    assert results[1]["left"] >= results[0]["entered"] + 0.3  # the closing broadcast kept rank 1 inside


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_the_lock_holder_is_named_by_its_script_not_the_interpreters_options(tmp_path: Path) -> None:
    """torchrun starts `python -u SCRIPT ...`: the holder read `(-u /venv/bin/unionseg train ...)`, the
    basename taken of `-u` (helper-79). The interpreter's options go; `-m` keeps its module."""
    import subprocess
    import sys
    import time

    from unionseg.locking import _command_of

    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(30)\n")
    commands = {
        " (sleeper.py train RUN)": [sys.executable, "-u", "-W", "ignore", str(script), "train", "RUN"],
        " (python -m sleeper train RUN)": [sys.executable, "-u", "-m", "sleeper", "train", "RUN"],
        " (python -m sleeper train RUN2)": [sys.executable, "-msleeper", "train", "RUN2"],
    }
    for expected, cmd in commands.items():
        proc = subprocess.Popen(cmd, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 10
            while _command_of(proc.pid) != expected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _command_of(proc.pid) == expected
        finally:
            proc.kill()
            proc.wait()
