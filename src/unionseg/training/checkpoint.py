"""Atomic checkpoint files that load with ``weights_only=True``.

A checkpoint is written to a temporary name in the same folder, flushed to disk, then renamed over the old
one, so a kill at any moment leaves either the previous complete checkpoint or the new complete one, never
a truncated file. Loading refuses anything that is not a complete unionseg checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unionseg.errors import CheckpointError

CHECKPOINT_FORMAT = "unionseg-checkpoint"

#: test hook: a callable(str) invoked at named points of a write ("before_rename"); fault tests kill there
_FAULT_HOOK: list[Any] = []


def _fault(point: str) -> None:
    for hook in _FAULT_HOOK:
        hook(point)
    env = os.environ.get("UNIONSEG_FAULT_POINT")
    if env and env == point:
        os.kill(os.getpid(), 9)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            torch.save(obj, fh)
            _fault("mid_write")
            fh.flush()
            os.fsync(fh.fileno())
        _fault("before_rename")
        tmp.replace(path)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def safe_torch_load(path: str | Path, expected_format: str | None = None) -> dict[str, Any]:
    """Load with ``weights_only=True``; refuse missing, truncated, foreign or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("file not found", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / unsafe files
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise CheckpointError(f"refused to load: the file contains Python objects other than tensors and "
                                  f"plain data (unsafe pickle): {text}", path) from None
        raise CheckpointError(f"cannot read checkpoint (truncated or corrupt?): {text}", path) from None
    if not isinstance(obj, dict) or (expected_format is not None and obj.get("format") != expected_format):
        raise CheckpointError(f"not a {expected_format or 'unionseg'} file", path)
    return obj


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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
