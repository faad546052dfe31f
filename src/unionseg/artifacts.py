"""The project-level cache of shared artefacts (contract 6).

Beside the prepared data, keyed by a fingerprint of (prepared data, expert recipe, seed)::

    <cache_dir>/artifacts/<fingerprint>/
        experts/<dataset>/model.pt, last.pt, log.csv, summary.json   one expert per training dataset
        probs/<dataset>/<dataset>/<case>.npy                          expert probabilities, fp16 (1+K, X, Y, Z)
        pseudo/<dataset>/<case>.npy                                   pseudo labels, uint8 leaf ids
        compute.json                                                  seconds spent per artefact
        locks/<artefact>.lock                                         held while one artefact is made

Every artefact is produced on first need and reused by every later method and run; writes are atomic, so
an interrupted expert resumes from its ``last.pt`` and a half-written probability file never exists.
Concurrent runs on the same project (two methods started at once) make each artefact once: the run that
takes ``locks/<artefact>.lock`` (:mod:`unionseg.locking`) makes it, the other waits, then finds and reuses it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unionseg.config import config_hash, to_dict
from unionseg.errors import UnionsegError
from unionseg.jsonfile import write_text
from unionseg.locking import print_waiting

if TYPE_CHECKING:
    import torch

    from unionseg.data.preprocess import PreparedCase
    from unionseg.methods.base import RunContext
    from unionseg.training.config import TrainConfig


class _Writes:
    """A file seen by ``np.save`` as a plain writer. Given the file itself numpy writes with ``tofile``, whose
    short write on a full disk raises an OSError without an errno ("342432 requested and 104384 written"),
    which the CLI cannot tell from a bug; through ``write`` a full disk is ENOSPC, named and one line."""

    def __init__(self, fh: Any) -> None:
        self.write = fh.write


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary and a rename (:func:`written_atomically`): never half a file, and no
    temporary left when the write fails or is interrupted; temporaries of the same file left by a killed
    writer in the same folder are removed first (probability maps are hundreds of MB each on real CT)."""
    from unionseg.jsonfile import written_atomically
    from unionseg.locking import remove_dead_temporaries_in

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _SWEPT:  # once per folder and process: a listing per file is N^2 for N files
        # idle for a while too: under multi-node DDP another node's live writer has a pid unknown here
        remove_dead_temporaries_in(path.parent, min_idle_s=_STALE_AFTER_S)
        _SWEPT.add(path.parent)
    with written_atomically(path) as fh:
        np.save(_Writes(fh), array)


#: the artefact folders whose dead temporaries this process removed (:func:`_atomic_save_npy`)
_SWEPT: set[Path] = set()
#: how long a temporary must have been left unchanged before a sweep takes its writer for dead
_STALE_AFTER_S = 600.0


def needs_experts(stages: Collection[str]) -> bool:
    """Whether a method with these stages builds on the shared experts: every shared stage does (pseudo labels
    and teacher probabilities are made by the experts, trained first when missing). The benchmark counted
    expert time only for a method naming ``experts`` itself, so a plugin declaring ``pseudo_labels`` alone hid
    minutes of expert training in its row (helper-122)."""
    return any(stage in ArtifactCache.STAGES for stage in stages)


class ArtifactCache:
    """Experts, their whole-volume probabilities and pseudo labels, shared by all methods of a project."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.expert_cfg = self._expert_config(ctx.cfg)
        key = {"data": ctx.index.fingerprint, "recipe": config_hash(self._keyed(self.expert_cfg)), "seed": ctx.cfg.seed}
        self.fingerprint = config_hash(key)
        self.root = Path(ctx.project.cache_dir) / "artifacts" / self.fingerprint
        # a cache made before the key left out the checkpoint interval (session 39) is still this recipe's
        legacy = {**key, "recipe": config_hash(self._keyed(self.expert_cfg, legacy=True))}
        before = Path(ctx.project.cache_dir) / "artifacts" / config_hash(legacy)
        if not self.root.exists() and before.is_dir():
            self.fingerprint, self.root = config_hash(legacy), before
        self._experts: dict[str, Any] = {}

    @staticmethod
    def _expert_config(cfg: TrainConfig) -> TrainConfig:
        """The recipe every expert uses: the run's budget (backbone, patch, batch, optimiser, steps).

        Dataset weights are dropped: an expert trains on one dataset, so they change nothing it draws, and
        kept they would change its recipe hash and retrain every expert for nothing. ``select_on`` is kept on
        purpose: it changes which checkpoint an expert keeps, so a new rule retrains the experts.
        """
        return dataclasses.replace(cfg, method="expert", options={}, steps=cfg.expert_steps or cfg.steps,
                                   device=cfg.device, init_from=None, data=dataclasses.replace(cfg.data, dataset_weights={}))

    @staticmethod
    def _keyed(cfg: TrainConfig, legacy: bool = False) -> TrainConfig:
        """The expert recipe as the cache's key sees it: without the settings a run may change on resume (the
        device, the logging and checkpoint intervals, the loader workers), which change nothing an expert
        learns. With them in the key, `--resume device=cpu` after a GPU ran out of memory, or another
        `log_every`, trained every shared expert again in a new cache folder, silently, and an MS-KD run with
        another `log_every` did not share a co-training run's experts (helper-77); another `ckpt_every` did the
        same until session 39 (helper-122). The experts' own resume accepts the same changes. ``legacy``:
        the key before that, with the checkpoint interval in it (a cache made then is still found)."""
        keyed = dataclasses.replace(cfg, device="auto", log_every=1, data=dataclasses.replace(cfg.data, num_workers=0))
        return keyed if legacy else dataclasses.replace(keyed, ckpt_every=0)  # 0: no interval a run can have

    # ------------------------------------------------------------------ bookkeeping
    @contextmanager
    def _exclusive(self, artefact: str) -> Iterator[None]:
        """Hold ``locks/<artefact>.lock`` while an artefact is checked for and made (waits without limit:
        the holder is making it, and its lock dies with it). Under DDP rank 0 locks and every rank waits
        and goes on with it (one broadcast per attempt, one at the end: no rank leaves before rank 0 has
        written); so every rank must enter together (the stages do)."""
        from unionseg.locking import hold_lock

        with hold_lock(self.root / "locks" / f"{artefact}.lock", f"shared artefact {artefact!r}",
                       notify=print_waiting if self.ctx.is_main else None, take=self.ctx.is_main,
                       decide=self._rank0_decides):
            yield
            self._rank0_decides(True)

    def _rank0_decides(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every DDP rank (a broadcast); ``flag`` itself in a single process."""
        from unionseg.training import distributed as dist

        if not dist.is_distributed():
            return flag
        import torch

        value = torch.tensor([int(flag)], device=self.ctx.device)
        torch.distributed.broadcast(value, src=0)
        return bool(value.item())

    def _rank0_todo(self, cases: list[PreparedCase], path: Callable[[PreparedCase], Path]) -> list[PreparedCase]:
        """The ``cases`` whose file (``path``) rank 0 does not find, on every DDP rank (a broadcast of their
        positions): ranks that each looked at the files could disagree on a shared file system (one sees a
        file another does not yet) and one skip a collective the others enter. In one process: those whose
        file is missing."""
        from unionseg.training import distributed as dist

        if not dist.is_distributed():
            return [c for c in cases if not path(c).exists()]
        import torch

        box = [[i for i, c in enumerate(cases) if not path(c).exists()] if dist.is_main() else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return [cases[i] for i in box[0] or []]

    #: how long a DDP rank waits for a shared artefact another rank wrote to show on its file system
    LAG_SECONDS = 120.0

    def _present_or_made(self, path: Path, make: Callable[[], Any]) -> None:
        """``path`` exists after this call. In one process a missing artefact is made (``make``). Under DDP
        making one is a collective every rank must enter together (the stages do, before anything loads), so
        a rank that does not see a file another rank wrote, on a shared file system that shows it late, waits
        for it, and gives up naming it after :attr:`LAG_SECONDS`: made by one rank alone, it would have waited
        forever for the others at the first collective (helper-89)."""
        from unionseg.training import distributed as dist

        if path.exists():
            return
        if not dist.is_distributed():
            make()
            return
        deadline = time.monotonic() + self.LAG_SECONDS
        while not path.exists():
            if time.monotonic() > deadline:
                raise UnionsegError(f"a shared artefact another process of this torchrun job wrote is not there "
                                    f"after {self.LAG_SECONDS:.0f} s (a file system that shows other nodes' "
                                    "files late?); run again with --resume", path)
            time.sleep(0.5)

    def _my_share(self, todo: list[PreparedCase]) -> list[PreparedCase]:
        """This DDP rank's share of ``todo`` (all of it in one process). Every rank lists ``todo`` before
        any writes: a collective here, so the shares are cut from the same list."""
        from unionseg.training import distributed as dist

        self._rank0_decides(True)
        return todo[dist.rank()::dist.world_size()]

    def _record(self, key: str, seconds: float) -> None:
        if not self.ctx.is_main:
            return
        from unionseg.locking import hold_lock

        path = self.root / "compute.json"
        with hold_lock(self.root / "locks" / "compute.lock", "the compute record", notify=None):
            data = json.loads(path.read_text()) if path.exists() else {}
            data[key] = data.get(key, 0.0) + seconds
            self.root.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(data, indent=2))

    @contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        """Add the block's wall time to compute.json's ``key`` however the block ends: an expert stopped by
        Ctrl-C and finished by a later process costs the time of both (only the finishing one's counted)."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            with suppress(Exception):  # the block's own error is the one to see
                self._record(key, time.perf_counter() - started)
            raise
        self._record(key, time.perf_counter() - started)

    def compute_seconds(self) -> dict[str, float]:
        path = self.root / "compute.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # ------------------------------------------------------------------ experts
    def expert_dir(self, dataset: str) -> Path:
        return self.root / "experts" / dataset

    def ensure_experts(self, datasets: list[str] | None = None) -> dict[str, Path]:
        """Train (or resume) every missing expert; returns dataset -> model file."""
        from unionseg.training.trainer import Trainer

        out = {}
        reused = []
        for name in datasets or self.ctx.train_datasets:
            run_dir = self.expert_dir(name)
            model = run_dir / "model.pt"
            with self._exclusive(f"expert-{name}"):  # checked under the lock: a concurrent run's expert is reused
                if self._rank0_decides(not (run_dir / "summary.json").exists()):  # every rank trains, or none
                    cfg = dataclasses.replace(self.expert_cfg, options={"dataset": name})
                    sub = dataclasses.replace(self.ctx, cfg=cfg, run_dir=run_dir, artifacts=self)
                    with self._timed(f"expert:{name}"):
                        Trainer(sub, resume=True).fit()
                else:
                    reused.append(name)
            out[name] = model
        if self.ctx.is_main and reused:
            _warn_other_processes(self.root / "experts", reused, self.expert_cfg.data.batch_size)
        return out

    def load_expert(self, dataset: str) -> tuple[torch.nn.Module, list[int], dict[str, Any]]:
        """The trained expert network (eval mode, on the run device), its global leaf ids, its model payload."""
        if dataset not in self._experts:
            from unionseg.methods.expert import expert_subspace
            from unionseg.modelfile import build_from_payload, load_model
            from unionseg.networks.layout import set_layout

            # no lock when it exists (the experts stage trained them before any validation)
            self._present_or_made(self.expert_dir(dataset) / "summary.json", lambda: self.ensure_experts([dataset]))
            payload = load_model(self.expert_dir(dataset) / "model.pt")
            module = set_layout(build_from_payload(payload).to(self.ctx.device), self.ctx.device).eval()
            for p in module.parameters():
                p.requires_grad_(False)
            _, _, leaf_ids = expert_subspace(self.ctx.space, dataset)
            self._experts[dataset] = (module, leaf_ids, payload)
        return self._experts[dataset]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ probabilities
    def probs_path(self, expert: str, case: PreparedCase) -> Path:
        return self.root / "probs" / expert / case.dataset / f"{case.case_id}.npy"

    def training_cases(self) -> list[PreparedCase]:
        return [c for c in self.ctx.index.cases() if c.dataset in self.ctx.train_datasets]

    def ensure_probs(self, experts: list[str] | None = None) -> None:
        """Whole-volume fp16 probabilities of every expert on every training case (train and val splits)."""
        from unionseg.training.validation import predict_volume

        cfg = self.ctx.cfg
        for name in experts or self.ctx.train_datasets:
            with self._exclusive(f"probs-{name}"):
                todo = self._rank0_todo(self.training_cases(), functools.partial(self.probs_path, name))
                if not todo:
                    continue
                module, _, _ = self.load_expert(name)
                mine = self._my_share(todo)  # each DDP rank predicts and writes its own cases
                with self._timed(f"probs:{name}"):
                    for case in _progress(mine, f"expert {name}: probabilities",
                                          self.ctx.progress and self.ctx.is_main):
                        probs = predict_volume(module, case.image(), cfg.roi_size, cfg.inference.overlap,
                                               cfg.inference.sw_batch_size, self.ctx.device, "softmax",
                                               cfg.inference.blend, amp=cfg.amp)
                        _atomic_save_npy(self.probs_path(name, case), probs.numpy().astype(np.float16))
            # (leaving the lock is a collective: no rank reads the probabilities before every share is written)

    def load_probs(self, expert: str, case: PreparedCase) -> np.ndarray:
        """(1 + K, X, Y, Z) float16, memory-mapped."""
        path = self.probs_path(expert, case)
        # per-sample loads (data loader workers) take no lock once the file exists
        self._present_or_made(path, lambda: self.ensure_probs([expert]))
        return np.load(path, mmap_mode="r")

    # ------------------------------------------------------------------ pseudo labels
    def pseudo_path(self, case: PreparedCase) -> Path:
        return self.root / "pseudo" / case.dataset / f"{case.case_id}.npy"

    def ensure_pseudo_labels(self) -> dict[str, Any]:
        """Pseudo labels for every training case: merge over the OTHER datasets' experts, ground truth wins."""
        self.ensure_probs()
        with self._exclusive("pseudo"):
            todo = self._rank0_todo(self.training_cases(), self.pseudo_path)
            made = len(todo)
            with self._timed("pseudo_labels") if made else nullcontext():
                for case in self._my_share(todo):  # each DDP rank makes and writes its own cases
                    _atomic_save_npy(self.pseudo_path(case), self.make_pseudo_labels(case))
            self._rank0_decides(True)  # every rank's share written before rank 0 reads them all for the score
            quality = self.pseudo_label_quality() if self.ctx.is_main else {}
            if quality and self.ctx.is_main:
                write_text(self.root / "pseudo_quality.json", json.dumps(quality, indent=2))
        return {"pseudo_labels": made, "root": str(self.root), "quality": quality}

    def pseudo_label_quality(self) -> dict[str, float]:
        """Mean Dice of the pseudo labels against the hidden full truth per region and part, over the
        training cases that have one (the phantom); the classes each case's own dataset annotates are
        excluded, since there the ground truth was copied. Empty when no hidden truth exists."""
        from unionseg.training.validation import dice_scores

        space = self.ctx.space
        scores: dict[str, list[float]] = {}
        for case in self.training_cases():
            truth = case.oracle()
            if truth is None:
                continue
            pseudo = np.load(self.pseudo_path(case), mmap_mode="r")
            unannotated = ~case.annotated
            unannotated[0] = True
            for key, value in dice_scores(np.asarray(pseudo), np.asarray(truth), space.full_mask(), space).items():
                if all(unannotated[i] for i in space.leaves_of(key)):
                    scores.setdefault(key, []).append(value)
        return {k: float(np.mean(v)) for k, v in scores.items()}

    def make_pseudo_labels(self, case: PreparedCase) -> np.ndarray:
        import torch

        from unionseg.ensemble import experts_to_groups
        from unionseg.labels import merge
        from unionseg.methods.expert import expert_subspace

        space = self.ctx.space
        others = [d for d in self.ctx.train_datasets if d != case.dataset]
        probs = [torch.from_numpy(np.asarray(self.load_probs(d, case), dtype=np.float32)) for d in others]
        leaf_ids = [expert_subspace(space, d)[2] for d in others]
        codes = np.asarray(case.label())
        if probs:
            region, parts, organ = experts_to_groups(probs, leaf_ids, space)
            pseudo = merge(region, parts, space, organ_leaf_probs=organ, threshold=0.5).numpy()
        else:
            pseudo = np.zeros(codes.shape, dtype=np.uint8)
        return combine_with_ground_truth(pseudo, codes, case.annotated, space)

    def load_pseudo(self, case: PreparedCase) -> np.ndarray:
        path = self.pseudo_path(case)
        self._present_or_made(path, self.ensure_pseudo_labels)
        return np.load(path, mmap_mode="r")

    #: the stages whose files live here, which a resumed run finds recorded as done in its stages.json
    STAGES = ("experts", "teacher_probabilities", "pseudo_labels")

    def incomplete(self, stage: str) -> bool:
        """Whether a shared stage's files are not all here (a cache removed, or a project prepared anew since
        the stage ran); rank 0's answer on every DDP rank, so that all of them make the stage again or none.
        A resumed run that trusted its record made them one file at a time inside the training loop (in one
        process, counted as training time), or, under torchrun, waited for them and gave up (helper-99)."""
        cases = self.training_cases()
        if stage == "experts":
            gone = any(not (self.expert_dir(name) / f).exists() for name in self.ctx.train_datasets
                       for f in ("summary.json", "model.pt"))
        elif stage == "teacher_probabilities":
            gone = any(not self.probs_path(name, case).exists() for name in self.ctx.train_datasets for case in cases)
        elif stage == "pseudo_labels":
            gone = any(not self.pseudo_path(case).exists() for case in cases)
        else:
            return False
        return self._rank0_decides(gone)

    def summary(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "root": str(self.root), "recipe": to_dict(self.expert_cfg),
                "compute_seconds": self.compute_seconds()}


def _warn_other_processes(folder: Path, names: list[str], batch: int) -> None:
    """One warning for the reused experts (``folder/<name>``) trained under another number of processes
    (torchrun): another effective batch (``data.batch_size`` is per process), which the cache key leaves out,
    as it leaves out the device, since the number may change on resume too. Reusing them is right, but not
    silent (helper-79). Experts of an older release record no number: nothing to compare."""
    import warnings

    from unionseg.errors import UnionsegWarning
    from unionseg.training import distributed as dist

    here = dist.world_size()
    other: dict[str, list[int]] = {}
    for name in names:
        try:
            summary = json.loads((folder / name / "summary.json").read_text(encoding="utf-8"))
            sizes = sorted({int(p["world_size"]) for p in summary.get("processes") or []})
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if sizes and sizes != [here]:
            other[name] = sizes
    if other:
        shown = ", ".join(f"{name} on {' and '.join(map(str, sizes))}" for name, sizes in other.items())
        warnings.warn(f"{folder}: the shared experts are reused as they are, but some were trained on another number "
                      f"of processes than this run's {here} ({shown}): an effective batch of that many x {batch} "
                      f"patches a step, where this run's is {here} x {batch}", UnionsegWarning, stacklevel=2)


def combine_with_ground_truth(pseudo: np.ndarray, codes: np.ndarray, annotated: np.ndarray, space: Any) -> np.ndarray:
    """Ground truth always wins on annotated classes.

    * a voxel with an annotated leaf code keeps that leaf;
    * a voxel with a region code keeps the pseudo leaf if it lies in that region's group, else the organ leaf;
    * a 0 voxel (no annotated class there) may not carry an annotated leaf: such pseudo labels become 0.
    """
    out = pseudo.astype(np.uint8).copy()
    L = space.n_leaves
    leaf = (codes > 0) & (codes < L)
    out[leaf] = codes[leaf]
    for grp in space.groups:
        in_region = codes == L + grp.index
        if in_region.any():
            keep = np.isin(out, grp.leaf_ids)
            out[in_region & ~keep] = grp.organ_id
    annotated_ids = [i for i in range(1, L) if annotated[i]]
    out[(codes == 0) & np.isin(out, annotated_ids)] = 0
    return out


def _progress(items: list[Any], label: str, enabled: bool) -> Any:
    if not enabled:
        return items
    from unionseg.progress import track

    return track(items, description=label)
