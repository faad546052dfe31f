"""The project exception. The CLI turns it into one clear line and exit code 2."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path


class UnionsegError(Exception):
    """A user-facing error: bad input, bad configuration, a refused operation.

    Args:
        message: what is wrong and, where possible, how to fix it.
        path: the file or folder concerned; it is printed first so the user sees which input failed.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class ConfigError(UnionsegError):
    """A project file or recipe is invalid (names the file and the key)."""


class DataError(UnionsegError):
    """An image, label map or dataset folder is unusable (names the file and the problem)."""


class OutputExistsError(UnionsegError):
    """A file to be written without replacing anything exists (another process wrote it meanwhile, say)."""


class CheckpointError(UnionsegError):
    """A model or checkpoint file is missing, truncated, or unsafe to load."""


class RankZeroRefusedError(UnionsegError):
    """Under torchrun: the error another rank raises for a refusal rank 0 met and printed (a run folder in
    use, or one it could not clean); the command line exits 2 on that rank without printing it again."""


class UnionsegWarning(UserWarning):
    """A user-facing warning (e.g. an image that does not look like CT): the CLI prints ``warning: <message>``
    on one line and goes on."""


def and_more(count: int, shown: int) -> str:
    """``" and N more"`` for a message that names ``shown`` of ``count`` items (``""`` when it names them all)."""
    return f" and {count - shown} more" if count > shown else ""


def listing(items: Sequence[object], shown: int = 3) -> str:
    """The first ``shown`` items, comma-separated, then how many more: ``a.nii.gz, b.nii.gz and 4 more``."""
    return ", ".join(str(item) for item in items[:shown]) + and_more(len(items), shown)


def mapped_values(values: Sequence[int], shown: int = 10) -> str:
    """Label values for a message: the list itself (``[1, 3, 4]``), or, past ``shown`` of them (a map with
    ``other: background`` maps nearly every value), ``"254 values, 1 to 254"``."""
    return str(list(values)) if len(values) <= shown else f"{len(values)} values, {values[0]} to {values[-1]}"


MAIN_GUARD = "`if __name__ == \"__main__\":`"


#: while a spawn pool runs, the file its workers write a refused call's name to (see :func:`worker_report`)
WORKER_REPORT_ENV = "UNIONSEG_WORKER_REPORT"


def refuse_in_starting_worker(call: str) -> None:
    """Raise when called while a spawned worker process imports the user's script: a script that starts
    worker processes (prepare, the phantom, evaluate with several workers) must make its calls under the
    ``__main__`` guard, or every worker would make them again. Inside :func:`worker_report`, the refusal is
    also written where the calling process reads it back.

    Raises:
        UnionsegError: naming ``call`` and the guard.
    """
    import multiprocessing as mp

    if getattr(mp.current_process(), "_inheriting", False):
        report = os.environ.get(WORKER_REPORT_ENV)
        if report:
            with contextlib.suppress(OSError), open(report, "a", encoding="utf-8") as fh:
                fh.write(call + "\n")
        raise UnionsegError(f"{call} was called while a worker process was starting: the worker imports the "
                            f"script that started it, so a script must call {call} under {MAIN_GUARD}")


_REPORT_LOCK = threading.Lock()
_REPORT_USERS = [0]  # the worker_report contexts open in this process (they share one file)


@contextlib.contextmanager
def worker_report() -> Iterator[None]:
    """Around a spawn process pool and its error handling: the workers it starts inherit the name of a
    file where :func:`refuse_in_starting_worker` writes a refused call, and :func:`worker_died` reads it,
    so the calling process names the missing ``__main__`` guard as the cause instead of guessing.

    The contexts open at once in a process (threads, nesting) share one file, made by the first and removed
    by the last: a missing guard concerns the whole script. Where no temporary file can be made, nothing is
    reported and the pool runs as before.
    """
    with _REPORT_LOCK:
        if _REPORT_USERS[0] == 0:
            try:
                fd, path = tempfile.mkstemp(prefix="unionseg-workers-", suffix=".txt")
                os.close(fd)
                os.environ[WORKER_REPORT_ENV] = path
            except OSError:
                os.environ.pop(WORKER_REPORT_ENV, None)
        _REPORT_USERS[0] += 1
    try:
        yield
    finally:
        with _REPORT_LOCK:
            _REPORT_USERS[0] -= 1
            if _REPORT_USERS[0] == 0:
                path = os.environ.pop(WORKER_REPORT_ENV, "")
                if path:
                    with contextlib.suppress(OSError):
                        os.unlink(path)


def refused_call() -> str | None:
    """The call a worker started inside :func:`worker_report` refused (the guard was missing), if any."""
    report = os.environ.get(WORKER_REPORT_ENV) if _REPORT_USERS[0] else None
    if not report:
        return None
    try:
        calls = [c for c in Path(report).read_text(encoding="utf-8").splitlines() if c]
    except OSError:
        return None
    return calls[0] if calls else None


def unguarded(call: str) -> UnionsegError:
    """The error for a script whose call to ``call`` is not under the ``__main__`` guard, in the calling
    process (its workers refused to run the script's calls again)."""
    return UnionsegError(f"{call} was called outside {MAIN_GUARD} in a script that starts worker processes: "
                         f"each worker imports the script and refused to run {call} again; put the script's "
                         f"calls under the guard (or ask for one worker)")


def worker_died(what: str, where: str | Path | None = None) -> UnionsegError:
    """The error for a process pool whose worker died: a script without the ``__main__`` guard (its
    workers refused, inside :func:`worker_report`), else killed or out of memory, or a guard missing
    outside a report."""
    call = refused_call()
    if call is not None:
        return unguarded(call)
    return UnionsegError(f"a worker process died while {what} (killed, or out of memory; from a Python script, "
                         f"also when the call is not under {MAIN_GUARD})", where)
