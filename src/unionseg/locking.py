"""Advisory file locks: one writer at a time for a folder that several processes share.

``prepare`` holds ``<cache_dir>/.lock`` while it plans and writes the prepared cache; the artefact cache
holds ``<cache_dir>/artifacts/<fingerprint>/locks/<artefact>.lock`` while it checks for and makes one shared
artefact (an expert, its probabilities, the pseudo labels). A second process waits (printing one line) and
then finds the work done, or gives up after a bounded wait with a :class:`~unionseg.errors.UnionsegError`.

How it works: the lock file is locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``, polled every
:data:`POLL_S` seconds. The kernel releases the lock when its holder exits, however it exits (SIGKILL
included), so a lock is never stale. The file is created once and never written nor removed: removing it
while another process waits on it would let two holders in, and its unchanged modification time keeps
cache snapshots stable. Who holds a busy lock is read from ``/proc/locks`` (Linux); elsewhere the messages
say "another process". Locks are re-entrant within a process (a nested request for a lock the process
already holds returns at once) and are not inherited as "held" by forked children. Without ``fcntl``
(Windows) locking is a no-op. On NFS, ``flock`` is emulated with byte-range locks (Linux >= 2.6.12), which
is why the file is opened for writing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from unionseg.errors import UnionsegError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: seconds between two attempts to take a busy lock
POLL_S = 0.2

def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine may still run (its temporary files must then stay). On
    Windows the answer is always yes: there ``os.kill(pid, 0)`` would end the process rather than probe it."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError), or no way to tell: alive
        return True
    return True


def remove_dead_temporaries(path: Path, min_idle_s: float = 0.0) -> int:
    """Delete the temporary files ``.<name>.<pid>.tmp...`` of ``path`` whose writer (``pid``) is gone and which
    have not changed for ``min_idle_s`` seconds (a writer on another machine, whose pid means nothing here,
    keeps its file changing); returns how many were deleted."""
    import glob

    return _remove_dead(path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"), min_idle_s)


def remove_dead_temporaries_in(folder: Path, min_idle_s: float = 0.0) -> int:
    """:func:`remove_dead_temporaries` for every file of ``folder`` at once (``.<name>.<pid>.tmp...``): one
    listing of the folder, where one per file written reads it N times for N files."""
    return _remove_dead(folder.glob(".*.tmp*"), min_idle_s)


def _remove_dead(candidates: Iterable[Path], min_idle_s: float) -> int:
    import re

    removed = 0
    for stale in candidates:
        found = re.findall(r"\.(\d+)\.tmp", stale.name)  # ".<name>.<pid>.tmp...": the last such part
        pid = found[-1] if found else ""
        try:
            idle = time.time() - stale.stat().st_mtime
        except OSError:  # gone meanwhile
            continue
        if pid.isdigit() and int(pid) != os.getpid() and idle >= min_idle_s and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


# "<pid>:<real path>" -> [file descriptor, nesting depth] of the locks this process holds
_HELD: dict[str, list[int]] = {}


def print_waiting(message: str) -> None:
    """The default ``notify``: one line on stderr (``waiting: <lock file>: ...``)."""
    print(f"waiting: {message}", file=sys.stderr, flush=True)


class FileLock:
    """An exclusive advisory lock on ``path``, re-entrant within one process.

    Args:
        path: the lock file; it and its folder are created on first use.
        what: what the lock protects, for messages (``"the prepared cache"``).

    Raises:
        UnionsegError: (on acquiring) the lock file cannot be created or locked, or the wait timed out.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._key: str | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (directly or through an outer hold in this process)."""
        return self._key is not None

    def _registry_key(self) -> str:
        return f"{os.getpid()}:{os.path.realpath(self.path)}"

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or already held by this process); never blocks."""
        if self._key is not None:
            return True
        key = self._registry_key()
        if key in _HELD:  # an outer hold of the same process: nest
            _HELD[key][1] += 1
            self._key = key
            return True
        if fcntl is None:  # pragma: no cover - no advisory locks on this platform
            self._key = key
            _HELD[key] = [-1, 1]
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:
                if not self.path.exists():
                    raise
                # another user's lock file in a sticky folder: Linux's protected_regular refuses O_CREAT on it
                # even where the file itself is writable (helper-110)
                fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise UnionsegError(self._cannot_open(exc), self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise UnionsegError(f"cannot lock {self.what} ({exc.strerror or exc})", self.path) from None
        _HELD[key] = [fd, 1]
        self._key = key
        return True

    def _cannot_open(self, exc: OSError) -> str:
        """Why the lock file could not be opened, in words a user can act on: a lock file another user left
        unwritable, or a folder this user cannot write (all were "cannot create the lock file"; helper-109)."""
        import errno

        why = exc.strerror or str(exc)
        if exc.errno == errno.EROFS:
            return (f"cannot create the lock file for {self.what}: it is on a read-only file system ({why}); work "
                    "on a copy, or in a folder of your own (a prepared cache: cache_dir in a roots file)")
        if exc.errno not in (errno.EACCES, errno.EPERM):
            return f"cannot create the lock file for {self.what} ({why})"
        from unionseg.jsonfile import nearest_existing, owner_name

        if self.path.exists():
            try:
                mode = f"mode {self.path.stat().st_mode & 0o777:o}"
            except OSError:
                mode = ""
            name = owner_name(self.path)
            said = ", ".join(w for w in (f"owner {name}" if name else "", mode) if w)
            owner = f" ({said})" if said else ""
            return (f"the lock file for {self.what} exists but cannot be opened for writing by this user{owner}: "
                    f"{why}; ask its owner to make it group-writable (chmod g+w), or remove it if no one is working "
                    "there")
        folder = nearest_existing(self.path.parent)
        return (f"cannot create the lock file for {self.what}: {folder} is not writable by this user ({why}); "
                "work on a copy, or in a folder of your own (a prepared cache: cache_dir in a roots file)")

    def acquire(
        self,
        timeout: float | None = None,
        poll_s: float = POLL_S,
        notify: Callable[[str], None] | None = print_waiting,
        hint: str = "",
        take: bool = True,
        decide: Callable[[bool], bool] | None = None,
    ) -> None:
        """Take the lock, waiting while another process holds it.

        Args:
            timeout: seconds to wait at most; ``0`` refuses at once, ``None`` waits as long as it takes.
            poll_s: seconds between attempts.
            notify: called once with a message when the lock is busy (default: one line on stderr).
            hint: appended to the timeout message (what the user can do).
            take: False for a process that waits WITH another one instead of locking itself (DDP ranks
                other than 0, see ``decide``).
            decide: combines this process's attempt with its group's (``rank 0's result``, by broadcast);
                every process of the group must call it the same number of times, so ``timeout`` must
                then be ``None``.

        Raises:
            UnionsegError: the lock is still busy after ``timeout`` seconds, naming the lock file and its
                holder.
            ValueError: ``decide`` with a ``timeout``, or a negative ``timeout``.
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
        if decide is not None and timeout is not None:
            raise ValueError("a lock shared by a group (decide=...) waits without a timeout")
        start = time.monotonic()
        told = False
        while True:
            got = self.try_acquire() if take else False
            if decide is not None:
                agreed = decide(got)
                if got and not agreed:  # cannot happen when the decider is the one that locks; stay consistent
                    self.release()
                got = agreed
            if got:
                return
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                holder = self.holder()
                raise UnionsegError(
                    f"{self.what} is in use by {holder}"
                    + (f"; gave up after waiting {waited:.1f} s" if timeout > 0 else "; not waiting")
                    + " (the lock is released when that process ends)" + (f"; {hint}" if hint else ""),
                    self.path)
            if not told and notify is not None:
                limit = "" if timeout is None else f" (at most {timeout:g} s)"
                notify(f"{self.path}: {self.what} is in use by {self.holder()}; waiting for it to finish{limit}")
            told = True
            time.sleep(poll_s if timeout is None else max(0.0, min(poll_s, timeout - waited)))

    def release(self) -> None:
        """Release this hold (the lock itself once the outermost hold of the process ends)."""
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        if entry[0] >= 0 and fcntl is not None:
            try:
                fcntl.flock(entry[0], fcntl.LOCK_UN)
            finally:
                os.close(entry[0])

    def holder(self) -> str:
        """Who holds the lock: ``pid 123 (unionseg prepare project.yaml)``, or ``another process``."""
        try:
            inode = os.stat(self.path).st_ino
            with open("/proc/locks", encoding="ascii", errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            return "another process"
        for line in lines:
            fields = line.split()
            if "->" in fields or len(fields) < 6:  # "->": a waiter, not the holder
                continue
            pid, device = fields[4], fields[5]
            if device.rsplit(":", 1)[-1] == str(inode) and pid.isdigit() and int(pid) != os.getpid():
                return f"pid {pid}{_command_of(int(pid))}"
        return "another process"

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _command_of(pid: int) -> str:
    """`` (the command line)`` of a process, shortened; empty when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    if words and Path(words[0]).name.startswith("python"):
        words = words[1:]
        # the interpreter's own options (torchrun starts `python -u SCRIPT`): the script comes after them
        while words and words[0].startswith("-") and words[0] != "-" and not words[0].startswith(("-m", "-c")):
            words = words[2:] if words[0] in ("-W", "-X") else words[1:]  # those two take a value
        if words and words[0].startswith("-m"):  # `-m MODULE` or `-mMODULE`
            if len(words[0]) > 2:
                words = [f"python -m {words[0][2:]}", *words[1:]]
            elif len(words) > 1:
                words = [f"python -m {words[1]}", *words[2:]]
    text = " ".join(" ".join(Path(w).name if i == 0 else w for i, w in enumerate(words)).split())
    return f" ({text[:120]}{'...' if len(text) > 120 else ''})" if text else ""


@contextmanager
def hold_lock(
    path: str | Path,
    what: str,
    timeout: float | None = None,
    notify: Callable[[str], None] | None = print_waiting,
    hint: str = "",
    take: bool = True,
    decide: Callable[[bool], bool] | None = None,
) -> Iterator[FileLock]:
    """``with hold_lock(path, what):`` hold :class:`FileLock` ``path`` for the block (see :meth:`FileLock.acquire`).

    Raises:
        UnionsegError: still busy after ``timeout`` seconds.
    """
    lock = FileLock(path, what)
    lock.acquire(timeout=timeout, notify=notify, hint=hint, take=take, decide=decide)
    try:
        yield lock
    finally:
        lock.release()
