"""JSON that every reader can parse: results and summaries a user loads in jq, pandas or a browser.

Python's ``json`` writes a float NaN as the bare word ``NaN`` by default, which is not JSON: JavaScript's
``JSON.parse`` and strict parsers refuse the file, and jq turns it into null silently. A metric without a
value (a class no case holds, a gap closure whose oracle equals the baseline) is written as ``null`` here,
and numpy scalars and arrays as plain numbers and lists.

Every such file, and the other files a run writes whole (checkpoints, model files, reports), goes through
:func:`written_atomically`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO


def plain(value: Any) -> Any:
    """``value`` with NaN and infinities as None and numpy scalars/arrays as Python numbers/lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays (and torch tensors)
    if callable(tolist) and not isinstance(value, (str, bytes)):
        return plain(tolist())
    return value


def dumps(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``value`` (see :func:`plain`); anything else unserialisable is written as str."""
    return json.dumps(plain(value), indent=indent, allow_nan=False, default=str)


def read_record(path: str | Path) -> Any:
    """A JSON file a unionseg command wrote whole (a run's summary, validations, stages); a file that is
    not JSON is one error naming it, not a traceback: only a bad copy or a failing disk breaks one.

    Raises:
        CheckpointError: the file is not JSON.
    """
    from unionseg.errors import CheckpointError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"not a readable record (unionseg writes it whole, so a copy or the disk broke "
                              f"it): {exc}; move it away, or the run folder", path) from None


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """Write :func:`dumps` of ``value`` through a temporary file and a rename: never half a file."""
    write_text(path, dumps(value, indent) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) through :func:`written_atomically`: never half a file, and no temporary left
    behind when the write fails (a full disk) or is interrupted."""
    with written_atomically(Path(path)) as fh:
        fh.write(text.encode("utf-8"))


@contextlib.contextmanager
def written_atomically(path: Path, at: Callable[[str], None] | None = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary ``.<name>.<pid>.tmp`` in the same folder, flushed
    to disk, renamed over ``path`` when the block ends without an error, and removed otherwise (``at``: called
    at the points ``mid_write`` and ``before_rename``, for the checkpoint writer's fault tests).

    A failed write names ``path`` (``OSError.filename``): a full disk shows in the write (inside
    ``torch.save``, say) and again when the file is closed and its buffer flushed, and that second error,
    which names no file, was the one the CLI printed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            with tmp.open("wb") as fh:
                yield fh
                if at is not None:
                    at("mid_write")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            # a full disk names no file; a folder this user cannot write names the hidden temporary: both
            # are said of the file meant (helper-109)
            if exc.errno is not None and exc.filename in (None, str(tmp)):
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
            raise
        if at is not None:
            at("before_rename")
        tmp.replace(path)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:  # no directory fsync here (Windows, some network file systems)
            pass
    finally:
        tmp.unlink(missing_ok=True)


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else the nearest folder above it that does (what a write there would create in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def owner_name(path: Path) -> str | None:
    """The user name owning ``path``; None where it cannot be told (a user id without a name, no such file,
    no user database)."""
    try:
        import pwd

        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (KeyError, OSError, ImportError):
        return None


def check_writable(outdir: Path, replacing: Iterable[Path] = ()) -> None:
    """Refuse an output folder this user cannot write to (or create), before the work: otherwise the refusal
    would come minutes later, at the first write. ``replacing``: files of it the work will replace, refused
    when the folder is sticky (a shared ``/tmp``-like folder) and another user owns them, which no write
    permission allows (an evaluation replaced its figures, then failed on its tables; helper-109).

    Raises:
        UnionsegError: naming the folder, the nearest existing folder above it, or the file.
    """
    import stat

    from unionseg.errors import UnionsegError

    target = nearest_existing(outdir.absolute())
    if target.exists() and not target.is_dir():
        raise UnionsegError(f"cannot create {outdir}: this is a file, not a folder; choose another -o", target)
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        what = "output folder" if target == outdir.absolute() else f"cannot create {outdir} in this folder:"
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(target).f_flag & os.ST_RDONLY)
        why = "on a read-only file system" if read_only else "not writable by this user (permission denied)"
        raise UnionsegError(f"{what} {why}; choose another -o", target)
    if target != outdir.absolute() or not hasattr(os, "geteuid") or os.geteuid() == 0:
        return
    folder = target.stat()
    if not folder.st_mode & stat.S_ISVTX or folder.st_uid == os.geteuid():
        return
    for path in replacing:
        try:
            owner = path.stat().st_uid
        except OSError:  # not there: nothing to replace
            continue
        if owner != os.geteuid():
            raise UnionsegError("another user's file in a shared (sticky) folder, which this user cannot replace; "
                                "choose another -o", path)
