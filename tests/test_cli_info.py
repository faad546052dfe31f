"""``unionseg info`` in-process, one-line errors with exit code 2, and a fast, torch-free ``--help``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_PROJECT_YAML, write_tiny_project
from unionseg.cli import run

UNIONSEG = Path(sys.executable).parent / "unionseg"


def test_info_prints_taxonomy_annotated_classes_and_split_counts(tiny_project: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["info", str(tiny_project)]) == 0
    out = capsys.readouterr().out
    for text in ("tiny", "liver_tumour", "kidney_tumour", "regions", "liver, liver_tumour",
                 "region:liver", "region:kidney", "train 3, val 1", "train 2, val 1", "test 2", "msd", "nnunet",
                 "1->liver", "2->liver_tumour", "[3.0, 3.0, 3.0]"):
        assert text in out, (text, out)
    # the taxonomy lists every leaf with its id and its parent
    assert re.search(r"\b2\W+liver_tumour\W+liver\W", out), out
    assert re.search(r"\b4\W+kidney_tumour\W+kidney\W", out), out
    assert re.search(r"\b0\W+background\W", out), out


def test_info_keeps_the_regions_title_on_one_line_however_short_the_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With one-leaf organs the regions table was narrower than its title, which wrapped ("regions (scored
    as" / "organs)", helper-93)."""

    text = (TINY_PROJECT_YAML.replace("  - {name: liver_tumour, part_of: liver}\n", "")
            .replace("  - {name: kidney_tumour, part_of: kidney}\n", "")
            .replace("{1: liver, 2: liver_tumour}", "{1: liver}").replace("[liver, liver_tumour]", "[liver]")
            .replace("{1: kidney, 2: kidney_tumour}", "{1: kidney}").replace("[kidney, kidney_tumour]", "[kidney]"))
    path = write_tiny_project(tmp_path / "p", text)
    assert run(["info", str(path)]) == 0
    assert "regions (scored as organs)" in capsys.readouterr().out


def test_info_describes_an_evaluation_only_project(tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A project of one test set, which `evaluate -p` takes (docs/evaluation.md), was refused by `info` ("at
    least one dataset needs role: train"): the up-front check docs/datasets.md recommends could not run."""
    text = tiny_project.read_text()
    only_test = text[:text.index("  - name: liver")] + text[text.index("  - name: test"):]
    path = tiny_project.with_name("eval.yaml")
    path.write_text(only_test)
    assert run(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "test 2" in out and "can score predictions (`unionseg evaluate -p`) but not train" in out, out
    assert run(["prepare", str(path)]) == 2  # training's own commands still need a training set
    assert "at least one dataset needs role: train" in capsys.readouterr().err
    assert run(["info", str(tiny_project)]) == 0
    assert "but not train" not in capsys.readouterr().out


def test_a_training_set_read_from_an_nnunet_test_folder_is_said(tiny_project: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """imagesTs + labelsTs are read when imagesTr is missing (a labelled test set); for a training dataset that
    more likely means a partial download, and it is said."""
    kidney = tiny_project.parent / "datasets" / "kidney"
    (kidney / "imagesTr").rename(kidney / "imagesTs")
    (kidney / "labelsTr").rename(kidney / "labelsTs")
    assert run(["info", str(tiny_project)]) == 0
    err = capsys.readouterr().err
    assert "training dataset 'kidney' has no imagesTr/, so its 3 case(s) are read from imagesTs/ + labelsTs/" in err


def test_info_with_root_override(tiny_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = write_tiny_project(tmp_path / "copy").parent / "datasets" / "liver"
    assert run(["info", str(tiny_project), "--root", f"liver={other}"]) == 0
    out = capsys.readouterr().out
    assert "train 3, val 1" in out
    # where each dataset was read: the override, and the project's own root for the others
    roots = next(line for line in out.splitlines() if line.startswith("roots (NAME=DIR, as --root takes them): "))
    assert f"liver={other}" in roots and f"kidney={tiny_project.parent / 'datasets' / 'kidney'}" in roots
    assert run(["info", str(tiny_project), "--root", "liver"]) == 2
    assert capsys.readouterr().err.strip() == "error: --root 'liver' must look like NAME=DIR"


@pytest.mark.parametrize("old,new,problem", [
    ("labels: {1: liver, 2: liver_tumour}", "labels: {1: livr, 2: liver_tumour}",
     "datasets.liver.labels.1: unknown class 'livr'"),
    ("name: tiny", "name: tiny\nepochs: 3", "epochs: unknown key"),
    ("split: {val_fraction: 0.25, seed: 0}", "split: {val_cases: [nope]}",
     "datasets.liver.split.val_cases: unknown case 'nope'"),
])
def test_bad_project_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str,
                                           new: str, problem: str) -> None:
    path = write_tiny_project(tmp_path / "p", TINY_PROJECT_YAML.replace(old, new, 1))
    assert run(["info", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {path.resolve()}: ")
    assert problem in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_bad_dataset_folder_names_the_file(tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    label = tiny_project.parent / "datasets" / "kidney" / "labelsTr" / "kidney_001.nii.gz"
    label.unlink()
    assert run(["info", str(tiny_project)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {label}: label file for case 'kidney_001' is missing: a case is trained on or scored with "
                   "its label file; add it, or take the case out of the dataset (its image out of imagesTr/)")


def test_project_maps_a_value_the_dataset_does_not_declare(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tiny_project(tmp_path / "p", TINY_PROJECT_YAML.replace(
        "labels: {1: kidney, 2: kidney_tumour}", "labels: {1: kidney, 3: kidney_tumour}"))
    assert run(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path.parent.resolve() / 'datasets' / 'kidney' / 'dataset.json'}: ")
    assert "maps label value 3" in err


def test_a_test_set_on_a_training_root_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A test set whose root is a training dataset's: every test case was trained on, and info and prepare
    said nothing. Both warn, naming the two datasets; the tiny project's own test set passes quietly."""
    project = write_tiny_project(tmp_path, TINY_PROJECT_YAML.replace("root: datasets/test", "root: datasets/liver"))
    for command in (["info", str(project)], ["prepare", str(project), "--workers", "0"]):
        assert run(command) == 0
        err = capsys.readouterr().err
        assert f"warning: {project}: test dataset 'test' shares 4 of its 4 image(s) with training dataset " \
               "'liver'" in err, err
    clean = write_tiny_project(tmp_path / "clean")
    assert run(["info", str(clean)]) == 0
    assert "shares" not in capsys.readouterr().err


def test_a_dataset_of_empty_label_maps_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every kidney label map all zeros (an export that wrote empty masks): prepare went on in silence, and a
    model would learn 'no kidney anywhere'. The warning names the dataset; a run that only reuses the cache
    says it again, and one label map with a kidney ends it."""
    import numpy as np

    from unionseg.data.io import read_image, write_image

    project = write_tiny_project(tmp_path)
    labels = sorted((tmp_path / "datasets" / "kidney" / "labelsTr").iterdir())
    for path in labels:
        array, geom = read_image(path)
        write_image(path, np.zeros_like(array), geom, replace=True)
    message = (f"warning: {project}: dataset 'kidney': none of its 3 label map(s) holds a value the project maps "
               "to a class")
    for workers in (["--workers", "0"], ["-j", "0"]):  # -j as evaluate's (helper-90: prepare -j was an error)
        assert run(["prepare", str(project), *workers]) == 0
        assert message in capsys.readouterr().err
    array, geom = read_image(labels[0])
    array[2, 2, 2] = 1
    write_image(labels[0], array, geom, replace=True)
    assert run(["prepare", str(project), "--workers", "0"]) == 0
    assert "none of its" not in capsys.readouterr().err


def test_missing_project_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["info", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {(tmp_path / 'nope.yaml').resolve()}: file not found"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path: Path, where: str) -> None:
    from unionseg.errors import UnionsegError

    args = ["info", str(tmp_path / "nope.yaml")]
    with pytest.raises(UnionsegError, match="file not found"):
        run(["--debug", *args] if where == "before" else [*args, "--debug"])


def test_console_script_help() -> None:
    """The installed entry point answers --help. Its speed rests on the import test below (no torch at
    import); a wall-clock limit here failed on a loaded machine, and timings belong to benchmarks/."""
    if not UNIONSEG.exists():
        pytest.skip(f"console script {UNIONSEG} is not installed")
    result = subprocess.run([str(UNIONSEG), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "info" in result.stdout and "train" in result.stdout


def test_importing_the_cli_does_not_import_torch() -> None:
    code = ("import sys, unionseg.cli, unionseg.reports, unionseg.config, unionseg.labels, unionseg.data.catalog; "
            "heavy = [m for m in ('torch', 'monai', 'nibabel', 'SimpleITK', 'scipy', 'matplotlib') "
            "if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_package_names_the_workflow_and_imports_each_part_when_used() -> None:
    """`import unionseg` gives the workflow's functions (unionseg.train, unionseg.Predictor, ...) without
    importing torch until one of them is used; each is the function its module defines, and a misspelt name
    is an AttributeError naming it."""
    code = ("import sys, unionseg; light = 'torch' not in sys.modules; "
            "names = [n for n in unionseg.__all__ if n not in ('UnionsegError', '__version__')]; "
            "import importlib; same = all(getattr(unionseg, n) is getattr(importlib.import_module("
            "unionseg._PUBLIC[n]), n) for n in names); "
            "print(light, same, sorted(names) == sorted(unionseg._PUBLIC), set(names) <= set(dir(unionseg)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True", "True"]
    import unionseg

    with pytest.raises(AttributeError, match="'Predicter'"):
        unionseg.Predicter  # noqa: B018
    assert {"train", "Predictor", "prepare_project", "evaluate_folder", "predict_folder"} <= set(unionseg.__all__)
    # `unionseg methods` and `info`'s summaries from Python (helper-119 found them only in the source)
    assert {"naive", "dodnet", "cotraining", "mskd"} <= set(unionseg.available_methods())


def test_methods_lists_every_method_with_what_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    """`unionseg methods` gives each method's line: `expert` says what it is for instead of standing bare."""
    from unionseg.methods.base import available_methods

    assert run(["methods"]) == 0
    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert sorted(lines) == available_methods()
    assert lines["dodnet"].startswith("Zhang et al., CVPR 2021")
    assert "options.dataset=NAME" in lines["expert"]
    assert all(text.strip() for text in lines.values())


def test_methods_name_lists_the_options_with_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """helper-122 found a plugin's options only through the error of a misspelt one: `unionseg methods NAME`
    gives every option, its default and what the built-in recipe sets, the stages and the recipe file."""
    import dataclasses

    from unionseg.methods.mskd import MSKDOptions
    from unionseg.training.recipes import default_recipe

    assert run(["methods", "mskd"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["mskd: Feng et al. 2021: the experts distil into one student (logits and features)",
                       "stages before training: experts, teacher_probabilities", f"recipe: {default_recipe('mskd')}"]
    assert [line.split()[0] for line in out[4:]] == [f.name for f in dataclasses.fields(MSKDOptions)]
    assert "  tau = 2.0  (float)" in out and "  feature_regions = 'nearest'  (str)" in out
    assert run(["methods", "naive"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["stages before training: none",
                                                        f"recipe: {default_recipe('naive')}", "options: none"]
    assert run(["methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_methods_name_tells_a_recipes_option_values_from_their_defaults(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe's value is named where it differs from the default, and a list equal to a tuple default is the
    default (the YAML list [8, 8] read as differing from the default (8, 8))."""
    from unionseg.training import recipes

    recipe = tmp_path / "dodnet.yaml"
    recipe.write_text("method: dodnet\noptions: {head_widths: [8, 8], bce_weight: 0.5}\n")
    monkeypatch.setattr(recipes, "default_recipe", lambda name: recipe)
    assert run(["methods", "dodnet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  head_widths = [8, 8]  (tuple[int, ...])" in out
    assert "  bce_weight = 1.0  (float; the recipe sets 0.5)" in out
    assert sum("the recipe sets" in line for line in out) == 1


def test_an_organ_annotated_without_its_tumour_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A test set that maps its liver label to the leaf 'liver' and annotates [liver] can never be scored on
    region:liver (the liver tumour might hide in its 0s): info says so and how to map it instead, and the
    recipe that annotates the regions gets no such warning."""
    path = write_tiny_project(tmp_path / "p", TINY_PROJECT_YAML.replace(
        "annotated: [region:liver, region:kidney]", "annotated: [liver, region:kidney]"))
    assert run(["info", str(path)]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ")]
    assert len(lines) == 1, lines
    for text in (str(path.resolve()), "datasets.test.annotated lists 'liver' but not 'liver_tumour'",
                 "no case of 'test' is scored on 'region:liver'", "map that value to 'region:liver'"):
        assert text in lines[0], (text, lines[0])
    assert run(["info", str(write_tiny_project(tmp_path / "q"))]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_training_set_annotating_a_class_it_never_labels_is_named(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A kidney set given the test set's annotations ([region:liver, region:kidney]) was accepted silently: its
    label maps would teach "no liver" on every image, undoing partial-label training (helper-78)."""
    path = write_tiny_project(tmp_path / "p", TINY_PROJECT_YAML.replace(
        "annotated: [kidney, kidney_tumour]", "annotated: [region:liver, kidney, kidney_tumour]"))
    assert run(["info", str(path)]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ")]
    assert len(lines) == 1, lines
    for text in (str(path.resolve()), "datasets.kidney.annotated lists 'region:liver', but no label value of "
                 "'kidney' maps to it", "remove 'region:liver' from annotated"):
        assert text in lines[0], (text, lines[0])


@pytest.mark.parametrize("command", [[], ["train"], ["predict"], ["prepare"], ["evaluate"], ["evaluate-cross"],
                                     ["benchmark"], ["phantom"], ["info"], ["demo"]])
def test_help_shows_flags_without_a_value(command: list[str]) -> None:
    """typer 0.29 printed ``--resume <bool>``, as if the flag took a value (``--resume true`` then read
    ``true`` as an override), and ``--help <bool>`` on every screen; flags show no value type, and
    ``--root`` shows the NAME=DIR it takes."""
    from typer.testing import CliRunner

    from unionseg.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    options = [line for line in result.output.splitlines() if "--" in line]
    assert any("--help" in line for line in options)
    assert all("<bool>" not in line for line in options), [line for line in options if "<bool>" in line]
    assert all("<list[str]>" not in line for line in result.output.splitlines() if "--root" in line)


def test_version_short_help_and_usage_lines_read_as_names(capsys: pytest.CaptureFixture[str]) -> None:
    """No --version (needed for bug reports), no -h, and usage lines such as `info [OPTIONS] {project}` and
    `inputs... <list[Path]>`, typer's own rendering (helper-75)."""
    from typer.testing import CliRunner

    from unionseg import __version__
    from unionseg.cli import app

    runner = CliRunner()
    for flag in ("--version", "-V"):
        result = runner.invoke(app, [flag])
        assert (result.exit_code, result.output) == (0, f"unionseg {__version__}\n")
    usage = {cmd: runner.invoke(app, [cmd, "-h"], env={"COLUMNS": "160"}).output for cmd in ("predict", "train", "info")}
    assert "Usage: unionseg predict [OPTIONS] MODEL INPUTS..." in usage["predict"]
    assert "Usage: unionseg train [OPTIONS] PROJECT [OVERRIDES...]" in usage["train"]
    assert "Usage: unionseg info [OPTIONS] PROJECT|MODEL|RUN" in usage["info"]
    assert "<list[" not in usage["predict"] + usage["train"] and "{" not in usage["predict"]
    assert re.search(r"INPUTS\.\.\.\s+<path>", usage["predict"])  # the table says it takes several too
    assert "--out,--output" in usage["predict"].replace(" ", "") and "--out,--output" in usage["train"].replace(" ", "")
    # train --device is the override device=...: refused the same way, before anything is made
    assert run(["train", "nowhere.yaml", "--device", "gpu", "--quiet"]) == 2
    assert "device: 'gpu' is not one of auto, cpu, cuda, cuda:N" in capsys.readouterr().err


def test_every_command_help_paragraph_is_one_line() -> None:
    """The help keeps a docstring's line breaks: `info`'s three-line first paragraph broke mid-sentence in
    the command list and on its own screen ("for a model file, what" / "it segments, ...")."""
    import typer

    from unionseg.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name, command in commands.items():
        for paragraph in (command.help or "").strip().split("\n\n"):
            assert "\n" not in paragraph.strip(), (name, paragraph)


def test_under_torchrun_an_error_every_rank_raises_is_printed_once(tiny_project: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank parses the same arguments and reads the same checkpoint, so each printed the same
    refusal: two interleaved `error:` lines for one mistake. Ranks above 0 now leave those to rank 0 (the
    exit code stays 2), after a grace that lets rank 0 print before torchrun's agent stops it (rank 1 leaving
    first had rank 0 stopped mid-way once, in CI); their other errors say which rank they come from."""
    import unionseg.cli
    from unionseg.errors import UnionsegError

    left = unionseg.cli._leave_to_rank_zero
    waits: list[str] = []
    monkeypatch.setattr(unionseg.cli, "QUIET_RANK_GRACE_S", 0.0)
    monkeypatch.setattr(unionseg.cli, "_leave_to_rank_zero", lambda: waits.append(os.environ["RANK"]) or left())
    args = ["train", str(tiny_project), "--method", "naive", "-o", str(tmp_path / "run"), "steps=abc"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert run(args) == 2
        err = capsys.readouterr().err
        assert ("error: <overrides>: steps: expected an integer, got 'abc'" in err) is printed, err
    assert not (tmp_path / "run").exists()
    for rank, printed in (("0", True), ("1", False)):  # a usage error (an unknown flag) too
        monkeypatch.setenv("RANK", rank)
        assert run(["train", str(tiny_project), "--methd", "naive"]) == 2
        err = capsys.readouterr().err
        assert ("No such option: --methd" in err) is printed, err

    def other(*args: object, **kwargs: object) -> None:
        raise UnionsegError("a problem of this rank alone")

    monkeypatch.setattr("unionseg.training.trainer.train", other)
    assert run(["train", str(tiny_project), "--method", "naive", "-o", str(tmp_path / "run")]) == 2
    assert "error (rank 1): a problem of this rank alone" in capsys.readouterr().err
    assert waits == ["1", "1"]  # the two refusals of rank 1 waited; its own error, as rank 0, did not


def test_info_says_how_many_processes_trained_a_run() -> None:
    """A run trained under torchrun has data.batch_size times the processes as its batch, which its config
    (and hash) does not show: info says so from the summary's record (helper-79); one process says nothing."""
    from unionseg.reports import _processes_words

    assert _processes_words([{"from_step": 0, "world_size": 1}]) == "" == _processes_words(None)
    assert _processes_words([{"from_step": 0, "world_size": 2}]) == \
        "trained on 2 processes (torchrun): an effective batch of 2 x data.batch_size"
    assert _processes_words([{"from_step": 0, "world_size": 2}, {"from_step": 500, "world_size": 1}]) == \
        "trained on a number of processes that changed on resume: 2 from step 0, 1 from step 500 (torchrun " \
        "where more than one); the effective batch is data.batch_size times their number"  # it lacked a word
    assert _processes_words([{"world_size": 2}]) == ""  # a record it cannot read: nothing claimed


def test_info_on_an_unfinished_torchrun_run_says_its_processes(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An unfinished run's processes are in last.pt alone, which info read for the step only: a torchrun run
    cut at step 5 read like a one-process run, whose plain --resume would halve the batch (helper-96)."""
    import torch

    from unionseg.cli import run

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("method: naive\n")
    torch.save({"step": 5, "world_sizes": [[0, 2]]}, folder / "last.pt")
    assert run(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "a checkpoint (last.pt, step 5) to resume from" in out
    assert ("trained on 2 processes (torchrun): an effective batch of 2 x data.batch_size; go on with the same "
            "torchrun command (2 processes) and --resume") in out
    torch.save({"step": 5, "world_sizes": [[0, 1]]}, folder / "last.pt")  # one process: nothing more is said
    assert run(["info", str(folder)]) == 0
    assert "processes" not in capsys.readouterr().out


def test_a_usage_error_is_one_error_line_naming_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    """typer's usage errors were a four-line block (Usage, Try, a blank line, Error) that a log filter on
    `^error:` missed, beside every other error's one line (helper-112). No arguments still shows the help."""
    for argv, said in ((["train", "--methd", "x"], "error: No such option: --methd (Possible options: --method) "
                                                    "(see 'unionseg train -h')"),
                       (["evalute"], "error: No such command 'evalute'. Did you mean 'evaluate'"),
                       (["benchmark", "--seeds", "0"], "error: Invalid value for '--seeds'")):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(said) and len(err.strip().splitlines()) == 1, err
    run([])
    captured = capsys.readouterr()
    assert "Usage: unionseg" in captured.out + captured.err and "error:" not in captured.out + captured.err


def test_info_on_an_image_or_label_map_gives_its_grid_and_values(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`unionseg info scan.nii.gz` read the image as a project file ("not a text (UTF-8) YAML file"); a user
    writing a project file's label map needs the values a label file holds, and their names."""
    import json

    import numpy as np

    from unionseg.data.io import Geometry, prediction_description, write_image
    from unionseg.reports import image_summary

    geometry = Geometry.identity((10, 8, 6), (2.0, 2.0, 5.0))
    ct = np.full((10, 8, 6), -1000, np.int16)
    ct[2:5] = 40
    write_image(tmp_path / "ct.nii.gz", ct, geometry)
    labels = np.zeros((10, 8, 6), np.uint8)
    labels[:2] = 1
    labels[0, 0, :3] = 3
    root = tmp_path / "Task03_Liver"
    write_image(root / "labelsTr" / "liver_1.nii.gz", labels, geometry)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "cancer",
                                                              "3": "vessel"}, "training": []}))
    assert run(["info", str(tmp_path / "ct.nii.gz")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{tmp_path / 'ct.nii.gz'}: an image, 10 x 8 x 6 voxels of 2 x 2 x 5 mm (int16), RAS, 20 x 16 x 30 "
                   "mm, origin (0.0, 0.0, 0.0) mm", "intensities -1000 to 40, mean -688.0"]
    assert run(["info", str(root / "labelsTr" / "liver_1.nii.gz")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [f"3 value(s) (names from {root / 'dataset.json'}):",
                       "  0 background: 384 voxels, 7.68 mL", "  1 liver: 93 voxels, 1.86 mL",
                       "  3 vessel: 3 voxels, 0.06 mL", "declared by dataset.json but not in this file: 2 cancer"]
    # a map predict wrote: its own class names and its model; a float map of whole numbers is a label map too
    write_image(tmp_path / "pred.nii.gz", labels, geometry, description=prediction_description(labels, "ab12cd34"),
                label_names=["background", "liver", "liver_tumour", "vessel"])
    summary = image_summary(tmp_path / "pred.nii.gz")
    assert summary["label_map"]["model"] == "ab12cd34" and summary["label_map"]["written_by_predict"]
    assert {v: f.get("name") for v, f in summary["label_map"]["values"].items()} == {
        0: "background", 1: "liver", 3: "vessel"}
    write_image(tmp_path / "float.nii.gz", labels.astype(np.float32), geometry)
    assert set(image_summary(tmp_path / "float.nii.gz")["label_map"]["values"]) == {0, 1, 3}
    # counted a chunk at a time (a large map is never copied whole as int64): the same counts
    from unionseg import reports

    whole = image_summary(tmp_path / "float.nii.gz")["label_map"]["values"]
    monkeypatch.setattr(reports, "_CHUNK", 7)
    assert image_summary(tmp_path / "float.nii.gz")["label_map"]["values"] == whole
    assert {v: f["voxels"] for v, f in whole.items()} == {0: 384, 1: 93, 3: 3}
    write_image(tmp_path / "soft.nii.gz", labels.astype(np.float32) / 2, geometry)
    assert "label_map" not in image_summary(tmp_path / "soft.nii.gz")
    # predict's probability map (4D) and its channel list: what each channel holds, from the header and the list
    from unionseg.inference.predictor import write_probabilities

    with pytest.raises(ValueError, match=r"probs must be \(C, X, Y, Z\) = \(2, 10, 8, 6\)"):
        write_probabilities(tmp_path / "c_probs.nii.gz", np.zeros((10, 8, 6, 2), np.float32), geometry,
                            ["region:liver", "liver_tumour"])  # channels last: refused, nothing written
    assert not (tmp_path / "c_probs.nii.gz").exists()
    probs = np.zeros((2, 10, 8, 6), np.float32)
    write_probabilities(tmp_path / "c_probs.nii.gz", probs, geometry, ["region:liver", "liver_tumour"],
                        {"region:liver": "probability of the liver region", "liver_tumour": "of the tumour"},
                        model="ab12cd34")
    for given in ("c_probs.nii.gz", "c_probs.json"):
        assert run(["info", str(tmp_path / given)]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"{tmp_path / given}: a probability map of unionseg predict (model ab12cd34), 10 x 8 x 6 x 2 at 2 x 2 x "
            "5 mm", "  channel 0: region:liver (probability of the liver region)",
            "  channel 1: liver_tumour (of the tumour)"]
    # an unreadable image is the usual one-line error, naming the file
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    assert run(["info", str(tmp_path / "broken.nii.gz")]) == 2
    assert "broken.nii.gz" in capsys.readouterr().err
