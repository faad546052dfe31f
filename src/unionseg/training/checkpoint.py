"""Atomic checkpoint files that load with ``weights_only=True``.

A checkpoint is written to a temporary name in the same folder, flushed to disk, then renamed over the old
one, so a kill at any moment leaves either the previous complete checkpoint or the new complete one, never
a truncated file. Loading refuses anything that is not a complete unionseg checkpoint.
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unionseg.errors import CheckpointError
from unionseg.faults import fault_point
from unionseg.jsonfile import written_atomically
from unionseg.locking import remove_dead_temporaries

CHECKPOINT_FORMAT = "unionseg-checkpoint"

#: test hook: a callable(str) invoked at named points of a write ("before_rename"); fault tests kill there
_FAULT_HOOK: list[Any] = []


def _fault(point: str) -> None:
    for hook in _FAULT_HOOK:
        hook(point)
    fault_point(point)  # UNIONSEG_FAULT_POINT=mid_write[@n] / before_rename[@n]: SIGKILL here


def torch_save(obj: Any, fh: Any, path: Path) -> None:
    """``torch.save(obj, fh)``, raising the file system's own error: torch reports a failed write (a full disk,
    a quota) as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, with the OSError only
    in its context, so the CLI printed a 60-line traceback instead of its one line naming the disk."""
    try:
        torch.save(obj, fh)
    except RuntimeError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from exc
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename); removes temporaries of killed writers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path)  # left by writers that were killed
    with written_atomically(path, at=_fault) as fh:
        torch_save(obj, fh, path)
    return path


def _load_problem(exc: Exception) -> str:
    """One clear line for a failed ``torch.load(weights_only=True)``: unsafe content, or truncated/corrupt."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found or "Unsupported global" in text:
        what = f" ({found.group(1)})" if found else ""
        return (f"refused to load: the file holds Python objects other than tensors and plain data{what} "
                "(unsafe pickle); nothing in it was run")
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        return "refused to load: not a weights-only torch file (unsupported pickle content); nothing in it was run"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"cannot read checkpoint (truncated or corrupt): {first}"


def safe_torch_load(path: str | Path, expected_format: str | None = None) -> dict[str, Any]:
    """Load with ``weights_only=True``; refuse missing, truncated, foreign or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("file not found", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / unsafe files
        raise CheckpointError(_load_problem(exc), path) from None
    if not isinstance(obj, dict) or (expected_format is not None and obj.get("format") != expected_format):
        raise CheckpointError(f"not a {expected_format or 'unionseg'} file", path)
    return obj


def checkpoint_step(path: str | Path) -> int | None:
    """The step a ``last.pt`` holds, read through a memory map (only the bytes it needs), or read whole where
    the file cannot be mapped (a file system without mmap, an old serialisation format); None when the file
    cannot tell."""
    return checkpoint_progress(path)[0]


def checkpoint_progress(path: str | Path) -> tuple[int | None, list[list[int]]]:
    """The step a ``last.pt`` holds and its ``world_sizes`` (``[step, number of processes]`` from each session
    on; empty where the file has none), read as :func:`checkpoint_step` reads it; ``(None, [])`` when the
    file cannot tell."""
    for mmap in (True, False):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # not mappable (then read whole), or truncated or foreign: nothing to report
            continue
        try:
            step = int(obj["step"])
        except Exception:  # read, but holds no step
            return None, []
        try:
            sizes = [[int(a), int(b)] for a, b in obj.get("world_sizes", [])]
        except Exception:  # a damaged record of processes: the step still stands
            sizes = []
        return step, sizes
    return None, []


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/plain data (weights_only-loadable)."""
    py_state = random.getstate()
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: a run resumed with fewer visible GPUs cannot take one state per GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible GPU
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
