"""Fault injection for the reliability tests: kill this process at a named point, as the OOM killer would.

``UNIONSEG_FAULT_POINT=<point>[@<n>]`` sends SIGKILL to the current process (no cleanup, no ``finally``)
the n-th time (default: the first) it reaches ``<point>``. Unset, every point costs one dictionary lookup.

Points (see ``docs/reliability.md`` for what each leaves behind and what the next run does):

* ``mid_write``, ``before_rename``: inside :func:`unionseg.training.checkpoint.atomic_torch_save`
  (``last.pt``): after ``torch.save`` into the temporary file, before its fsync (the data may still sit in
  the page cache); after the fsync, before the rename.
* ``prepare_before_commit``, ``prepare_mid_commit``: inside one ``prepare`` case: all temporary files
  written, nothing renamed; arrays renamed into place, the case's ``.json`` (written last) not yet.
* ``write_image_before_rename``: :func:`unionseg.data.io.write_image` (predictions, phantom files) after
  the temporary image is written, before the rename.

``UNIONSEG_KILL_AT_STEP=k`` (read by the trainer) kills a training run right after step k.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "UNIONSEG_FAULT_POINT"
_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if ``UNIONSEG_FAULT_POINT`` names ``name`` (and this is the n-th hit).

    Raises:
        ValueError: a malformed ``@n`` count.
    """
    env = os.environ.get(FAULT_ENV)
    if not env:
        return
    point, _, nth = env.partition("@")
    if point != name:
        return
    try:
        target = int(nth) if nth else 1
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={env!r}: expected POINT or POINT@N") from None
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] >= target:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
