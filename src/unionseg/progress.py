"""Progress of long work: a rich bar on a terminal, plain timed lines in a log.

Under ``nohup``, a batch scheduler (SLURM) or CI, output goes to a file. A rich bar does not draw there
and shows nothing until the work ends, so a user who tails the log cannot tell a slow run from a hung one.
:func:`make_progress` then returns a :class:`LineProgress`. It has the part of
``rich.progress.Progress``'s interface that unionseg uses, and prints one line per task:
- at most every ``UNIONSEG_PROGRESS_SECONDS`` seconds (default 30), with the count, the elapsed time and the
  ETA;
- and, if it printed any, a last line when the task completes or stops. Work that ends within one interval
  prints nothing, as a transient bar leaves nothing behind;
- the ETA comes from a :class:`Rate`, which leaves the first move's warm-up out once there is a second;
- but the process is never silent for longer than one interval while work moves: a chain of short tasks
  (co-training's experts, probability maps and pseudo labels on a small project, each under 30 s) printed
  nothing for minutes; the task that moves when the process has been quiet for an interval prints its line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from rich.console import Console

from unionseg.errors import ConfigError

T = TypeVar("T")
INTERVAL_VARIABLE = "UNIONSEG_PROGRESS_SECONDS"
# when this process last printed a progress line (any task, any LineProgress)
_LAST_LINE = [time.monotonic()]
# when a LineProgress of this process last had news (an update, a stop): a chain of short progress objects
# (co-training's stages) shares one silence clock; a progress object starting after a quiet spell (a new
# command in a notebook or a test session, or the first of the process) starts it anew
_LAST_ACTIVITY = [float("-inf")]


def line_interval() -> float:
    """Seconds between two progress lines of one task (``UNIONSEG_PROGRESS_SECONDS``, default 30).

    Raises:
        ConfigError: the variable is not a number >= 0.
    """
    raw = os.environ.get(INTERVAL_VARIABLE, "30")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise ConfigError(f"environment variable {INTERVAL_VARIABLE}: expected seconds >= 0, got {raw!r}")
    return value


#: set by ``unionseg benchmark`` while a row runs: the suite's estimated seconds after that row, which the
#: row's training bar adds to its own ETA ("suite ETA 1:02:03")
SUITE_AFTER_ENV = "UNIONSEG_SUITE_AFTER_S"


def suite_after() -> float | None:
    """The seconds :data:`SUITE_AFTER_ENV` holds, or None (not in a benchmark, or a value that is no number)."""
    try:
        value = float(os.environ[SUITE_AFTER_ENV])
    except (KeyError, ValueError):
        return None
    return value if value >= 0 else None


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _count(value: float) -> str:
    """``1234567`` for whole counts (``:g`` would give ``1.23457e+06``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class Rate:
    """Seconds per unit of work, the warm-up left out.

    The first step of a training run or the first case of a prediction carries the warm-up (loader
    workers, threads, the first allocations): a rate taken from the start made the first ETA of a
    44-second run read 2:26. Once the work has moved twice, the rate runs from the end of its first move;
    until then, from the start.

    Args:
        count: the count at the start (a resumed run starts above 0).
        now: the start time (default: ``time.monotonic()``; pass the caller's clock otherwise).
    """

    def __init__(self, count: float = 0.0, now: float | None = None) -> None:
        self.start = (count, time.monotonic() if now is None else now)
        self.first: tuple[float, float] | None = None

    def moved(self, count: float, now: float | None = None) -> None:
        """The count reached ``count`` (call after each move; only the first is kept)."""
        if self.first is None and count != self.start[0]:
            self.first = (count, time.monotonic() if now is None else now)

    def eta(self, count: float, total: float, now: float | None = None) -> float | None:
        """Seconds left to ``total``; None before the first move or once done."""
        now = time.monotonic() if now is None else now
        since = self.first if self.first is not None and count > self.first[0] else self.start
        if count >= total or count <= since[0]:
            return None
        return (now - since[1]) / (count - since[0]) * (total - count)


#: rich's own keywords of add_task / update, which are not fields to print
_RICH_KEYWORDS = frozenset({"visible", "refresh", "start"})


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float
    printed_at: float
    printed_count: float
    rate: Rate
    lines: int = 0
    finished: bool = False


class LineProgress:
    """The subset of ``rich.progress.Progress`` unionseg uses, as timed plain lines (see the module doc).

    Args:
        console: where the lines go.
        label: put before each line's task description (``prepare``, ``evaluate``).
        interval: seconds between two lines of a task (default: :func:`line_interval`).
    """

    def __init__(self, console: Console, label: str = "", interval: float | None = None) -> None:
        self.console = console
        self.label = label
        self.interval = line_interval() if interval is None else interval
        self.tasks: dict[int, _Task] = {}
        self._next_id = 0
        now = time.monotonic()
        if now - _LAST_ACTIVITY[0] > self.interval:  # no progress moved lately: its silence is not this one's
            _LAST_LINE[0] = now
        _LAST_ACTIVITY[0] = now

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Nothing to draw (rich's interface)."""

    def stop(self) -> None:
        """A last line for each task that moved since its last line and did not complete (an interruption)."""
        _LAST_ACTIVITY[0] = time.monotonic()
        for task in self.tasks.values():
            if not task.finished and task.lines and task.completed != task.printed_count:
                self._print(task)
        self.tasks.clear()

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        task_id, self._next_id = self._next_id, self._next_id + 1
        now = time.monotonic()
        fields = {k: v for k, v in fields.items() if k not in _RICH_KEYWORDS}
        self.tasks[task_id] = _Task(description, total, completed, fields, started=now,
                                    printed_at=now, printed_count=completed,
                                    rate=Rate(completed, now))
        return task_id

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        _LAST_ACTIVITY[0] = time.monotonic()
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        task.fields.update({k: v for k, v in fields.items() if k not in _RICH_KEYWORDS})
        task.rate.moved(task.completed, _LAST_ACTIVITY[0])
        done = task.total is not None and task.completed >= task.total
        if done and not task.finished:
            task.finished = True
            if task.lines:  # work done within one interval stays quiet, as a transient bar leaves no trace
                self._print(task)
        elif (not done or fields) and self._due(task):
            # a finished count still prints news of its fields (training's last validation, after its last step)
            self._print(task)

    def _due(self, task: _Task) -> bool:
        """One interval since the task's last line, or since the process's last line with the task moved."""
        now = time.monotonic()
        if now - task.printed_at >= self.interval:
            return True
        return now - _LAST_LINE[0] >= self.interval and task.completed != task.printed_count

    def line(self, task: _Task) -> str:
        """``label description: 40/2000 (2%), 0:00:20 elapsed, ETA 0:16:20, fields``."""
        elapsed = time.monotonic() - task.started
        head = " ".join(part for part in (self.label, task.description) if part)
        if task.total:
            count = f"{_count(task.completed)}/{_count(task.total)} ({100 * task.completed / task.total:.0f}%)"
        else:
            count = _count(task.completed)
        parts = [count, f"{clock(elapsed)} elapsed"]
        left = task.rate.eta(task.completed, task.total) if task.total else None
        if left is not None:
            parts.append(f"ETA {clock(left)}")
        parts += [str(v) for v in task.fields.values() if str(v)]
        return f"{head}: {', '.join(parts)}" if head else ", ".join(parts)

    def _print(self, task: _Task) -> None:
        self.console.print(self.line(task), markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()
        task.printed_at = _LAST_LINE[0] = time.monotonic()
        task.printed_count = task.completed
        task.lines += 1


def results_console() -> Console:
    """The console a command prints its results on (stdout). Off a terminal, where rich assumes 80 columns,
    it is 200 wide unless ``COLUMNS`` says otherwise: a table piped to a file or a job log keeps each row on
    one line instead of wrapping its cells."""
    console = Console()
    if console.is_terminal or console.is_jupyter or "COLUMNS" in os.environ:
        return console
    return Console(width=200)


def print_markdown_table(table: str, console: Console | None = None) -> Console:
    """A Markdown table (plain cells) on the results console, its value cells never wrapped: a console
    narrower than the table cut them ("orac…") or wrapped them (an HD95 cell "484.25 ± 0.66 (median" over
    "484.25)"), which reads worse than a line the terminal wraps. Where the table is wider than the console,
    a header longer than its column's values is wrapped at word breaks, and the console is widened to what
    the rest needs. Returns the console it printed on, for the lines after the table."""
    import re
    import textwrap

    from rich import box
    from rich.table import Table
    from rich.text import Text

    lines = [line.strip() for line in table.splitlines() if line.lstrip().startswith("|")]
    if len(lines) > 1 and set(lines[1]) <= set("|-: "):  # the separator row, and only it
        del lines[1]
    # cells split at unescaped bars; "\|" is a bar inside a cell
    rows = [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line[1:-1] if line.endswith("|")
                                                                        else line[1:])] for line in lines]
    console = console or results_console()
    if not rows:  # no table: the text as it is
        console.print(table, markup=False, highlight=False)
        return console
    header, body = rows[0], rows[1:]
    values = [max((len(row[i]) for row in body if i < len(row)), default=0) for i in range(len(header))]
    # the narrowest a column can be without breaking a value or a word of its header
    narrow = [max(value, *(len(word) for word in title.split())) for title, value in zip(header, values, strict=True)]
    padding = 2 * len(header) + 2
    if sum(max(len(title), value) for title, value in zip(header, values, strict=True)) + padding > console.width:
        spare = console.width - padding - sum(narrow)  # given to the wrapped headers, left to right
        widths = []
        for title, width in zip(header, narrow, strict=True):
            more = min(max(spare, 0), len(title) - width) if len(title) > width else 0
            widths.append(width + more)
            spare -= more
        header = [textwrap.fill(title, width) for title, width in zip(header, widths, strict=True)]
        if sum(narrow) + padding > console.width:
            console = Console(file=console.file, width=sum(narrow) + padding)
    grid = Table(box=box.SIMPLE_HEAVY, pad_edge=False, collapse_padding=True)
    for title in header:
        grid.add_column(Text(title), no_wrap=True)
    for row in body:
        grid.add_row(*(Text(cell) for cell in row))  # as written: "[x]" in a name is no rich markup
    console.print(grid)
    return console


def make_progress(*columns: Any, console: Console | None = None, transient: bool = False,
                  label: str = "") -> Any:
    """A ``rich.progress.Progress`` on a terminal (or in Jupyter), else a :class:`LineProgress`; on stderr
    unless ``console`` says otherwise (stdout holds a command's results)."""
    console = console or Console(stderr=True)
    if console.is_terminal or console.is_jupyter:
        from rich.progress import Progress

        return Progress(*columns, console=console, transient=transient)
    return LineProgress(console, label)


def time_columns() -> tuple[Any, ...]:
    """Elapsed and remaining time on a bar, labelled as the timed lines off a terminal say them:
    ``0:00:30 elapsed, ETA 0:10:09`` (unlabelled, one time or two read as a riddle; helper-93)."""
    from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TimeElapsedColumn(), TextColumn("elapsed, ETA"), TimeRemainingColumn())


def track(items: Iterable[T], description: str, total: int | None = None,
          console: Console | None = None) -> Iterator[T]:
    """``rich.progress.track`` that becomes timed lines off a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    items = list(items) if total is None else items
    count = len(items) if total is None else total  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *time_columns())
    with make_progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=count)
        for item in items:
            yield item
            bar.update(task, advance=1)
