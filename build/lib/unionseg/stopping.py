"""SIGTERM as an orderly stop, as Ctrl-C is.

``kill PID``, a batch scheduler's time limit (SLURM sends SIGTERM some time before its SIGKILL) and
``docker stop`` end a process with SIGTERM, whose default action ends it where it stands: no ``finally``
runs, so a half-written temporary file stays beside the outputs and a child process (a benchmark's run)
trains on with nobody waiting for it. Under :func:`sigterm_as_interrupt` the signal raises
:class:`Terminated` instead, a :class:`KeyboardInterrupt`, so every clean-up written for Ctrl-C runs for it
too. The CLI then exits with :data:`EXIT_TERMINATED` (128 + 15, what a shell reports for a process the
signal ended), so a scheduler or a wrapper script still tells a termination from a Ctrl-C (130).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + int(signal.SIGTERM)


# whether a Terminated was raised since the last sigterm_as_interrupt() began: typer turns a KeyboardInterrupt
# into the bare exit code 130 (outside standalone mode), so the CLI cannot read the exception itself
_raised = [False]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stood; handled wherever Ctrl-C is."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        _raised[0] = True


def terminated() -> bool:
    """Whether a :class:`Terminated` was raised since the last :func:`sigterm_as_interrupt` began."""
    return _raised[0]


def interruption(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The :class:`KeyboardInterrupt` behind ``exc`` (itself, or the cause a wrapper such as click's
    ``Abort`` was raised from), or None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def exit_code(exc: BaseException | None) -> int:
    """The exit status for an interruption: 143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(interruption(exc), Terminated) else EXIT_INTERRUPTED


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread; the previous handler comes back
    on exit. Elsewhere than the main thread (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated

    _raised[0] = False
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
