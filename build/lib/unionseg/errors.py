"""The project exception. The CLI turns it into one clear line and exit code 2."""

from __future__ import annotations

from collections.abc import Sequence
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


MAIN_GUARD = "`if __name__ == \"__main__\":`"


def refuse_in_starting_worker(call: str) -> None:
    """Raise when called while a spawned worker process imports the user's script: a script that starts
    worker processes (prepare, the phantom, evaluate with several workers) must make its calls under the
    ``__main__`` guard, or every worker would make them again.

    Raises:
        UnionsegError: naming ``call`` and the guard.
    """
    import multiprocessing as mp

    if getattr(mp.current_process(), "_inheriting", False):
        raise UnionsegError(f"{call} was called while a worker process was starting: the worker imports the "
                            f"script that started it, so a script must call {call} under {MAIN_GUARD}")


def worker_died(what: str, where: str | Path | None = None) -> UnionsegError:
    """The error for a process pool whose worker died: killed, out of memory, or a script without the
    ``__main__`` guard (its workers fail while importing it)."""
    return UnionsegError(f"a worker process died while {what} (killed, or out of memory; from a Python script, "
                         f"also when the call is not under {MAIN_GUARD})", where)
