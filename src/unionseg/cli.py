"""The ``unionseg`` command line (typer).

Heavy imports (torch, MONAI, nibabel) live inside the commands so that ``unionseg --help`` answers at once
and ``info``/``prepare``/``evaluate`` never import torch. Every :class:`UnionsegError` becomes one line on
stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from unionseg.errors import (
    CheckpointError,
    ConfigError,
    OutputExistsError,
    RankZeroRefusedError,
    UnionsegError,
    UnionsegWarning,
)
from unionseg.stopping import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    exit_code,
    interruption,
    sigterm_as_interrupt,
    terminated,
)


class _PlainHelp:
    """``--help`` without a value type (typer 0.29 lists it as ``--help <bool>``)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Command(_PlainHelp, typer.core.TyperCommand):
    """A command whose arguments read as NAMES in the usage line and the help table (typer 0.29 shows
    ``{project}`` and a Python type such as ``<list[Path]>``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, typer.core.TyperArgument) and param.name:
                name = param.metavar or param.name.upper()
                # typer adds "..." to an argument of several values only when it has no metavar
                param.metavar = name + ("..." if param.nargs != 1 and not name.endswith("...") else "")
                param._usage_display_name = _usage_name.__get__(param)  # type: ignore[method-assign]
                param.display_type_rich = _element_type.__get__(param)  # type: ignore[method-assign]


def _usage_name(param: Any) -> str:
    """``MODEL INPUTS...``, ``[OVERRIDES...]``: typer wraps a required argument in braces."""
    return param.metavar if param.required else f"[{param.metavar}]"


def _element_type(param: Any, ctx: Any) -> str | None:
    """``<path>`` for a list of paths too (typer shows ``<list[Path]>``)."""
    shown = typer.core.TyperArgument.display_type_rich(param, ctx)
    if shown and shown.startswith("<list[") and shown.endswith("]>"):
        return f"<{shown[6:-2].lower()}>"
    return shown


class _Group(_PlainHelp, typer.core.TyperGroup):
    pass


class _App(typer.Typer):
    """The application: every command it registers is a :class:`_Command`."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(
    cls=_Group,
    name="unionseg",
    help="Train ONE multi-organ CT segmenter from several partially labelled datasets.",
    epilog="Exit status: 0 done; 2 an error (one line naming the file and the problem) or a usage error; 130 "
           "stopped by Ctrl-C, 143 by SIGTERM (a training's checkpoint is written first: --resume goes on).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"debug": False}

# typer >= 0.29 vendors click; older releases raise click's own exceptions
try:  # pragma: no cover - depends on the installed typer
    from click.exceptions import Abort as _ClickAbort
    from click.exceptions import ClickException as _ClickUsage
    from click.exceptions import Exit as _ClickExit

    _EXIT: tuple[type[BaseException], ...] = (typer.Exit, _ClickExit)
    _ABORT: tuple[type[BaseException], ...] = (typer.Abort, _ClickAbort)
    _USAGE: tuple[type[BaseException], ...] = (_ClickUsage,)
except ImportError:  # pragma: no cover
    _EXIT = (typer.Exit,)
    _ABORT = (typer.Abort,)
    _USAGE = (typer.exceptions.TyperException,)


def _print_version(value: bool) -> None:
    if value:
        from unionseg import __version__

        typer.echo(f"unionseg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors (exit "
                                                             "status 1 instead of 2).", metavar="")] = False,
          version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.", metavar="",
                                                callback=_print_version, is_eager=True)] = False) -> None:
    _STATE["debug"] = debug


def one_out(positional: Path | None, option: Path | None, default: Path | None = None) -> Path:
    """The output folder of a command that takes it as its argument OUT (``phantom``, ``demo``), given that way
    or as ``-o OUT`` like every other command's (``unionseg phantom -o data`` was "No such option: -o").

    Raises:
        typer.BadParameter: neither (without ``default``), or two different folders (a usage error: exit 2).
    """
    if positional is not None and option is not None and positional != option:
        raise typer.BadParameter(f"two output folders, {positional} and -o {option}: give one", param_hint="'OUT'")
    chosen = positional if positional is not None else option if option is not None else default
    if chosen is None:
        raise typer.BadParameter("no output folder: give it as OUT or -o OUT", param_hint="'OUT'")
    return chosen


def _parse_roots(roots: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in roots or []:
        if "=" not in item:
            raise UnionsegError(f"--root {item!r} must look like NAME=DIR")
        name, folder = item.split("=", 1)
        out[name] = folder
    return out



@app.command()
def info(
    project: Annotated[Path, typer.Argument(help="Project file (YAML), or a model file (.pt), a run folder, an "
                                                 "image or label map (NIfTI, NRRD, MHA) or a DICOM series folder "
                                                 "to describe.", metavar="PROJECT|MODEL|RUN|IMAGE")],
    root: Annotated[Optional[list[str]], typer.Option("--root", help="Dataset root override NAME=DIR for a project "
                                                      "(repeatable).", metavar="NAME=DIR")] = None,
) -> None:
    """Describe a project, a model file, a run folder or an image.

    A project: the taxonomy, each dataset's annotated classes and case counts per split.

    A model file: what it segments, what its inputs go through and where it comes from.

    A run folder: its model file and how far the run got.

    An image: its grid, and its intensities or, for a label map, each value's voxels, volume and name (what a project file's label map maps).
    """  # noqa: E501 - one line per paragraph: the help keeps a docstring's line breaks
    from unionseg.data.io import IMAGE_SUFFIXES, holds_dicom_files, is_dicom_file, predict_kind, suffix_of
    from unionseg.reports import (
        print_image_info,
        print_model_info,
        print_probability_info,
        print_project_info,
        print_run_info,
    )

    if project.is_dir():
        if not (project / "config.yaml").exists() and holds_dicom_files(project):
            print_image_info(project)  # a DICOM series folder
            return
        print_run_info(project)
        return
    if project.is_file() and predict_kind(project) in ("probabilities", "channels"):
        print_probability_info(project)
        return
    if suffix_of(project) in IMAGE_SUFFIXES or is_dicom_file(project):
        print_image_info(project)
        return
    if project.suffix.lower() in (".pt", ".pth") or _looks_like_a_model_file(project):
        print_model_info(project)
        return
    print_project_info(project, roots=_parse_roots(root))


def _looks_like_a_model_file(path: Path) -> bool:
    """A PyTorch file by its first bytes (a zip archive or a pickle), whatever its name."""
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return head == b"PK" or head[:1] == b"\x80"


# --- commands registered by their modules (keep this list in one place) ---------------------------------
# Each module exposes ``register(app)`` so the command's options live beside its code.
_COMMAND_MODULES = (
    "unionseg.data.phantom",
    "unionseg.data.preprocess",
    "unionseg.training.cli",
    "unionseg.inference.cli",
    "unionseg.evaluation.cli",
    "unionseg.evaluation.crossmap",
    "unionseg.benchmark",
)


def _register_commands() -> None:
    import importlib.util

    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        # modules keep their heavy imports inside functions, so importing them here is cheap
        module = importlib.import_module(name)
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def _warning_printer(previous: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning``: project warnings as one line ``warning: <message>`` on stderr; others
    as before."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, UnionsegWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


_MEMORY_HINTS = {
    "train": "lower data.batch_size or data.patch_size (e.g. data.batch_size=1: a new run, since --resume "
             "takes only the configuration it started with), or go on from the last checkpoint on a machine "
             "with more memory (the same command with --resume)",
    "predict": "lower --sw-batch (windows per network call), or predict with --device cpu (host memory)",
    "benchmark": "the suite's budget does not fit this machine; run it where it does, or lower its "
                 "batch or patch in a suite YAML of your own (finished rows are reused)",
    "prepare": "prepare with fewer worker processes (--workers 1)",
}


def _out_of_memory_message(argv: list[str], exc: BaseException) -> str:
    """One line for an out-of-memory error: where (GPU or host), and what to lower for this command."""
    command = next((a for a in argv if a in _MEMORY_HINTS), None)
    where = "GPU" if type(exc).__name__ == "OutOfMemoryError" else "host"
    hint = _MEMORY_HINTS.get(command or "", "use smaller inputs or a machine with more memory")
    return f"out of {where} memory{f' in {command}' if command else ''}: {hint}"


def _other_rank() -> int | None:
    """This process's rank under torchrun when it is not rank 0 (None in one process and on rank 0)."""
    import os

    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    return rank if world > 1 and rank > 0 else None


# how long a rank other than 0 waits before it leaves on an error rank 0 reports: torchrun's agent stops every
# rank when the first one exits, and a rank 1 that left first had rank 0 stopped before it printed (CI, once)
QUIET_RANK_GRACE_S = 30.0


def _leave_to_rank_zero() -> int:
    """Exit status 2 for a rank other than 0 that refuses what rank 0 refuses too, once rank 0 had the time to
    say why (torchrun ends this wait when rank 0 exits; a launcher without an agent waits it out)."""
    import time

    time.sleep(QUIET_RANK_GRACE_S)
    return 2


def run(argv: list[str]) -> int:
    """Run the CLI in-process on ``argv``; returns the exit code (tests use this).

    Project errors, and file-system errors that name a path, print ``error: <file>: <problem>`` on stderr
    and return 2 (``--debug``, before or after the command, raises them instead); project warnings print
    ``warning: <message>`` (every occurrence) and the command goes on.
    """
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    if debug:  # the flag belongs to the top-level command; accept it after the subcommand too
        argv = ["--debug", *(a for a in argv[:end] if a != "--debug"), *argv[end:]]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UnionsegWarning)
            warnings.showwarning = _warning_printer(warnings.showwarning)
            from unionseg.progress import line_interval

            line_interval()  # a bad UNIONSEG_PROGRESS_SECONDS is named before any work, not hours in
            with sigterm_as_interrupt():  # kill / a scheduler's limit: the clean-up of Ctrl-C, exit 143
                result = app(args=argv, standalone_mode=False, prog_name="unionseg")
    except UnionsegError as exc:
        if debug:
            raise
        rank = _other_rank()
        if rank is not None and isinstance(exc, (ConfigError, CheckpointError, OutputExistsError, RankZeroRefusedError)):
            return _leave_to_rank_zero()  # every rank refuses the same arguments or checkpoint: rank 0 says it once
        typer.echo(f"error{f' (rank {rank})' if rank is not None else ''}: {exc}", err=True)
        return 2
    except OSError as exc:
        # an OSError that names a path (-o naming a file, a folder without write permission): the same
        # one-line error, naming the destination of a failed rename rather than its temporary source. A
        # full disk or quota is one line too (the writers leave no partial file: they write a temporary
        # and rename it); other OSErrors without a path keep their traceback
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if debug or (exc.filename is None and not full):
            raise
        # the same command again is refused where a run or outputs are there: say the flag that goes on
        again = {"train": "the same command with --resume", "predict": "the same command with --skip-existing"}
        command = next((a for a in argv[:end] if not a.startswith("-")), "")
        if "--overwrite" in argv[:end]:  # predict refuses --skip-existing beside it: the same command writes anew
            again.pop("predict")
        hint = (f": free space (or raise the quota) and run {again.get(command, 'the command again')}; finished "
                "outputs are kept") if full else ""
        if exc.filename is None:
            typer.echo(f"error: {exc.strerror or exc}{hint}", err=True)
            return 2
        named = exc.filename2 if exc.filename2 is not None else exc.filename
        typer.echo(f"error: {named}: {exc.strerror or exc}{hint}", err=True)
        return 2
    except (MemoryError, RuntimeError) as exc:
        # out of memory (host, or torch.cuda.OutOfMemoryError, a RuntimeError): one line with what to lower
        # for the command at hand; other RuntimeErrors are bugs and keep their traceback
        if debug or not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"):
            raise
        typer.echo(f"error: {_out_of_memory_message(argv, exc)}", err=True)
        return 2
    except _EXIT as exc:
        code = int(getattr(exc, "exit_code", 0) or 0)
        if code == EXIT_INTERRUPTED:  # typer's answer to Ctrl-C
            return _interrupted(exc)
        return code
    except _ABORT as exc:
        if interruption(exc) is not None:  # click turns KeyboardInterrupt into Abort
            return _interrupted(exc)
        typer.echo("aborted", err=True)
        return EXIT_INTERRUPTED
    except _USAGE as exc:
        if _other_rank() is not None:  # every rank parses the same arguments: rank 0 shows the usage once
            return _leave_to_rank_zero()
        message = getattr(exc, "format_message", None)
        if callable(message) and type(exc).__name__ != "NoArgsIsHelpError":  # that one's message is the help
            # one line, as every other error (a four-line usage block escaped a log filter on `^error:`;
            # helper-112), with where the help is
            ctx = getattr(exc, "ctx", None)
            command = getattr(ctx, "command_path", None) or "unionseg"
            typer.echo(f"error: {message()} (see '{command} -h')", err=True)
            return 2
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    if result == EXIT_INTERRUPTED:  # typer returns Ctrl-C's exit code (outside standalone mode) instead of raising
        return _interrupted(None)
    return int(result) if isinstance(result, int) else 0


def _interrupted(exc: BaseException | None) -> int:
    """One line and the exit status for a stop by Ctrl-C (130) or SIGTERM (143)."""
    code = EXIT_TERMINATED if terminated() else exit_code(exc)
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 alone says it, as it reports the rest
        typer.echo("terminated" if code == EXIT_TERMINATED else "interrupted", err=True)
    return code


def main() -> None:
    """Console entry point."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
