"""Progress off a terminal: timed plain lines with the count, the elapsed time and the ETA."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from unionseg.errors import ConfigError
from unionseg.progress import LineProgress, Rate, line_interval, make_progress, track


@pytest.fixture(autouse=True)
def _no_earlier_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a process that has printed no line yet (the record is process-wide)."""
    monkeypatch.setattr("unionseg.progress._LAST_LINE", [float("inf")])
    monkeypatch.setattr("unionseg.progress._LAST_ACTIVITY", [float("-inf")])


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_lines_give_the_count_the_eta_and_a_last_line(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("unionseg.progress.time.monotonic", lambda: now[0])
    console, out = _console()
    bar = LineProgress(console, label="prepare", interval=30)
    task = bar.add_task("liver", total=10, terms="loss=0.5")
    now[0] += 10
    bar.update(task, advance=2)  # 10 s after the start: under the interval, no line yet
    assert out.getvalue() == ""
    now[0] += 30
    bar.update(task, advance=2, terms="loss=0.4")  # 2 more in 30 s since the first move: 6 to go, 90 s
    assert out.getvalue().splitlines() == ["prepare liver: 4/10 (40%), 0:00:40 elapsed, ETA 0:01:30, loss=0.4"]
    now[0] += 5
    bar.update(task, completed=10)  # the last line comes at once, without an ETA
    assert out.getvalue().splitlines()[-1] == "prepare liver: 10/10 (100%), 0:00:45 elapsed, loss=0.4"
    bar.stop()
    assert len(out.getvalue().splitlines()) == 2


def test_an_interrupted_task_says_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("unionseg.progress.time.monotonic", lambda: now[0])
    console, out = _console()
    with LineProgress(console, interval=30) as bar:
        task = bar.add_task("dodnet", total=2000, completed=500)  # a resumed run starts at 500
        now[0] += 60
        bar.update(task, completed=800)  # 300 steps a minute since the start: 4 minutes to go
        now[0] += 10
        bar.update(task, completed=850)  # within the interval: no line, until the stop (Ctrl-C) says where
    assert out.getvalue().splitlines() == ["dodnet: 800/2000 (40%), 0:01:00 elapsed, ETA 0:04:00",
                                           "dodnet: 850/2000 (42%), 0:01:10 elapsed, ETA 0:03:50"]
    # work that ends within one interval prints nothing, finished or not (a transient bar leaves no trace)
    console, out = _console()
    with LineProgress(console, interval=30) as bar:
        done, cut = bar.add_task("quick", total=5), bar.add_task("cut", total=5)
        bar.update(done, completed=5)
        bar.update(cut, completed=2)
    assert out.getvalue() == ""


def test_a_chain_of_short_tasks_is_never_silent_for_more_than_an_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Co-training's stages on a small project: experts, probability maps and pseudo labels, each under 30 s,
    printed nothing for minutes off a terminal. Once the process has been quiet for an interval, the task
    that moves prints its line, however young it is; a task that does not move stays quiet."""
    now = [0.0]
    monkeypatch.setattr("unionseg.progress.time.monotonic", lambda: now[0])
    monkeypatch.setattr("unionseg.progress._LAST_LINE", [0.0])
    console, out = _console()
    with LineProgress(console, interval=30) as bar:
        liver = bar.add_task("expert liver", total=4)
        for _ in range(4):  # 20 s, quiet
            now[0] += 5
            bar.update(liver, advance=1)
        kidney = bar.add_task("expert kidney", total=4)
        now[0] += 5
        bar.update(kidney, advance=1)  # 25 s of silence: still quiet
        assert out.getvalue() == ""
        probs = bar.add_task("probabilities", total=4)
        now[0] += 5
        bar.update(probs, completed=0)  # 30 s of silence, but this task has not moved: quiet
        assert out.getvalue() == ""
        bar.update(kidney, advance=1)  # 30 s of silence and the 10-second-old task moved: it speaks
        assert out.getvalue().splitlines() == ["expert kidney: 2/4 (50%), 0:00:10 elapsed, ETA 0:00:10"]
        now[0] += 5
        bar.update(kidney, advance=1)  # the process spoke 5 s ago: quiet again
        assert len(out.getvalue().splitlines()) == 1


def test_a_progress_after_a_quiet_spell_waits_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """The silence clock is shared by a chain of progress objects, not by every one a process ever makes:
    a prepare started minutes after the process's last line (a notebook, a test session) printed a line at
    its first case, and its one-line error came with two progress lines above it."""
    now = [1000.0]
    monkeypatch.setattr("unionseg.progress.time.monotonic", lambda: now[0])
    monkeypatch.setattr("unionseg.progress._LAST_LINE", [0.0])  # the last line, long ago
    monkeypatch.setattr("unionseg.progress._LAST_ACTIVITY", [0.0])
    console, out = _console()
    with LineProgress(console, interval=30) as bar:
        task = bar.add_task("case", total=9)
        now[0] += 1
        bar.update(task, advance=1)
        assert out.getvalue() == ""  # 1 s into this progress: quiet
        now[0] += 30
        bar.update(task, advance=1)
        assert out.getvalue().splitlines() == ["case: 2/9 (22%), 0:00:31 elapsed, ETA 0:03:30"]  # 30 s a case


def test_the_eta_leaves_the_warm_up_of_the_first_step_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step of a run carries the loader's start and the first allocations: taking the rate from the
    start made a 44-second run announce 2:26 (helper-67, off a terminal). Once the task has moved twice, the
    rate runs from its first move; with one move only, from its start."""
    now = [0.0]
    monkeypatch.setattr("unionseg.progress.time.monotonic", lambda: now[0])
    console, out = _console()
    with LineProgress(console, interval=30) as bar:
        task = bar.add_task("naive", total=1000)
        now[0] += 20
        bar.update(task, advance=1)  # step 1 ends after 20 s of warm-up: under the interval, no line
        now[0] += 20
        bar.update(task, advance=200)  # then 0.1 s a step: 799 steps to go, 80 s (not 799 x 40 / 201 = 159 s)
        assert out.getvalue().splitlines() == ["naive: 201/1000 (20%), 0:00:40 elapsed, ETA 0:01:20"]
    console, out = _console()
    with LineProgress(console, interval=0) as bar:
        task = bar.add_task("case", total=4)
        now[0] += 40
        bar.update(task, advance=1)  # one move: the rate from the start (40 s a case)
        assert out.getvalue().splitlines() == ["case: 1/4 (25%), 0:00:40 elapsed, ETA 0:02:00"]


def test_a_rate_runs_from_the_first_move_once_there_is_a_second() -> None:
    """predict's batch ETA (one case a move) and the progress lines share it."""
    rate = Rate(count=0, now=0.0)
    assert rate.eta(0, 10, now=5.0) is None  # nothing moved
    rate.moved(1, now=60.0)  # the first case: 60 s, the model's warm-up in it
    assert rate.eta(1, 10, now=60.0) == 540.0  # one move: the rate from the start
    rate.moved(2, now=70.0)
    rate.moved(3, now=80.0)  # 10 s a case since
    assert rate.eta(3, 10, now=80.0) == 70.0
    assert rate.eta(10, 10, now=150.0) is None  # done
    resumed = Rate(count=500, now=0.0)  # a resumed run: its count starts at 500
    resumed.moved(500, now=30.0)  # no move
    assert resumed.first is None and resumed.eta(500, 1000, now=30.0) is None


def test_make_progress_draws_a_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.progress import Progress

    assert isinstance(make_progress(console=_console()[0]), LineProgress)
    assert isinstance(make_progress(console=Console(file=io.StringIO(), force_terminal=True)), Progress)
    monkeypatch.setenv("UNIONSEG_PROGRESS_SECONDS", "0")
    console, out = _console()
    assert list(track(["a", "b", "c"], "cases", console=console)) == ["a", "b", "c"]
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == ["cases: 1/3 (33%)", "cases: 2/3 (67%)",
                                                                             "cases: 3/3 (100%)"]


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("UNIONSEG_PROGRESS_SECONDS", value)
    with pytest.raises(ConfigError, match=f"UNIONSEG_PROGRESS_SECONDS: expected seconds >= 0, got '{value}'"):
        line_interval()
    monkeypatch.setenv("UNIONSEG_PROGRESS_SECONDS", "2.5")
    assert line_interval() == 2.5


def test_big_counts_stay_whole_and_rich_keywords_are_not_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("unionseg.progress.time.monotonic", lambda: 0.0)
    console, out = _console()
    bar = LineProgress(console, interval=0)
    task = bar.add_task("voxels", total=2_000_000, visible=True)
    bar.update(task, completed=1_234_567, refresh=True)
    assert out.getvalue().splitlines() == ["voxels: 1234567/2000000 (62%), 0:00:00 elapsed, ETA 0:00:00"]


def test_the_cli_names_a_bad_interval_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from unionseg.cli import run

    monkeypatch.setenv("UNIONSEG_PROGRESS_SECONDS", "soon")
    assert run(["methods"]) == 2
    assert capsys.readouterr().err.strip() == ("error: environment variable UNIONSEG_PROGRESS_SECONDS: expected "
                                               "seconds >= 0, got 'soon'")


def test_quiet_prepare_and_evaluate_print_no_progress(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """With a line at every update, prepare and evaluate print them, and print none under ``--quiet``."""
    import shutil

    from conftest import write_tiny_project
    from unionseg.cli import run

    monkeypatch.setenv("UNIONSEG_PROGRESS_SECONDS", "0")
    project = write_tiny_project(tmp_path / "loud")
    assert run(["prepare", str(project), "--workers", "0"]) == 0
    loud = capsys.readouterr()
    assert "prepare liver/liver_000: 1/9 (11%)" in loud.err and "prepared 9 case(s)" in loud.err
    quiet = write_tiny_project(tmp_path / "quiet")
    assert run(["prepare", str(quiet), "--workers", "0", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.splitlines()[-1].startswith("cases: train ")
    assert len(out.out.splitlines()) == 1

    truth = quiet.parent / "datasets" / "test" / "labelsTr"
    pred = tmp_path / "pred"
    shutil.copytree(truth, pred)  # the truth scored against itself
    for flags, lines in (([], True), (["--quiet"], False)):
        assert run(["evaluate", str(pred), str(truth), "--project", str(quiet), "-o", str(tmp_path / "eval"),
                    "--no-figures", "--overwrite", *flags]) == 0
        err = capsys.readouterr().err
        assert ("evaluate test_000: 1/2 (50%)" in err) is lines, err


def test_the_phantom_shows_its_cases_unless_quiet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`unionseg phantom` made its cases in silence (a minute for `standard`, minutes for `large`); it now
    counts them on stderr like prepare, and `--quiet` turns that off."""
    from unionseg.cli import run

    monkeypatch.setenv("UNIONSEG_PROGRESS_SECONDS", "0")
    for flags, lines in (([], True), (["--quiet"], False)):
        assert run(["phantom", str(tmp_path / f"ph{len(flags)}"), "-j", "1", *flags]) == 0
        out = capsys.readouterr()
        assert ("phantom cases: 1/20 (5%)" in out.err and "phantom cases: 20/20 (100%)" in out.err) is lines, out.err
        assert "project file:" in out.out


def test_results_are_printed_wide_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate's table, piped to a file or a job log, wrapped its "mean ± sd" cells at rich's 80 columns;
    off a terminal the results console is 200 wide, unless COLUMNS says otherwise."""
    from unionseg.progress import results_console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert results_console().width == 200  # pytest captures stdout: not a terminal
    monkeypatch.setenv("COLUMNS", "100")
    assert results_console().width == 100


def test_an_hd95_cell_with_its_median_stays_on_one_line() -> None:
    """evaluate's table wrapped an HD95 cell ("484.25 ± 0.66 (median" / "484.25)") on a 100-column console;
    a table is printed as wide as its rows need, as the benchmark's table was."""
    from unionseg.evaluation.evaluate import markdown_table
    from unionseg.progress import print_markdown_table

    stat = {"mean": 484.25, "std": 0.66, "median": 484.25, "n": 3}
    classes = {"region:kidney": {"dice": {**stat, "mean": 0.812, "std": 0.05}, "hd95": stat,
                                 "nsd": {**stat, "mean": 0.7, "std": 0.1}, "n_cases": 3,
                                 "empty_rule_cases": {"both_empty": 0, "pred_empty": 1, "gt_empty": 0}}}
    table = markdown_table(classes, ["dice", "hd95", "nsd"], 2.0)
    out = io.StringIO()
    print_markdown_table(table, Console(file=out, width=100, color_system=None))
    rows = [line for line in out.getvalue().splitlines() if "kidney" in line]
    assert len(rows) == 1 and "484.25 ± 0.66 (median 484.25)" in rows[0], out.getvalue()
    marked = io.StringIO()  # cells are text as written, not rich markup
    print_markdown_table("| case | note |\n|---|---|\n| [bold]a[/bold] | [red] |\n", Console(file=marked, width=100))
    assert "[bold]a[/bold]" in marked.getvalue() and "[red]" in marked.getvalue()
    edge = io.StringIO()  # a row of dashes is a row, an escaped bar stays in its cell, no table is the text
    print_markdown_table("| a | b |\n|---|---|\n| - | x \\| y |\n", Console(file=edge, width=60))
    assert [line.split() for line in edge.getvalue().splitlines() if line.strip()][-1] == ["-", "x", "|", "y"]
    plain = io.StringIO()
    print_markdown_table("no rows", Console(file=plain, width=60))
    assert plain.getvalue() == "no rows\n"
    narrow = io.StringIO()  # a table that fits is printed at the console's own width
    assert print_markdown_table("| a |\n|---|\n| 1 |\n", Console(file=narrow, width=100)).width == 100


def test_a_bar_labels_its_times_as_the_lines_do() -> None:
    """On a terminal the bars showed one or two unlabelled times (train: the time left; predict: elapsed and
    left) where the lines off a terminal say "elapsed" and "ETA" (helper-93); every bar now says both."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from unionseg.progress import time_columns

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    bar = make_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *time_columns(),
                        console=console)
    with bar:
        task = bar.add_task("work", total=4)
        bar.update(task, advance=1)
        bar.refresh()
    assert "work" in out.getvalue() and "elapsed, ETA" in out.getvalue()
