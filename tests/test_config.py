"""The project file, split_cases, and the generic dataclass <-> YAML helpers."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import TINY_PROJECT_YAML, write_tiny_project
from unionseg.config import (
    PreprocessSpec,
    SplitSpec,
    apply_overrides,
    config_hash,
    dump_yaml,
    from_dict,
    load_project,
    load_yaml,
    split_cases,
    to_dict,
)
from unionseg.errors import ConfigError
from unionseg.reports import project_summary


# ---------------------------------------------------------------------- loading a project
def test_load_project(tiny_project: Path) -> None:
    project = load_project(tiny_project)
    assert project.name == "tiny"
    assert project.path == tiny_project.resolve()
    space = project.label_space
    assert space.names == ("background", "liver", "liver_tumour", "kidney", "kidney_tumour")
    assert [d.name for d in project.train_datasets] == ["liver", "kidney"]
    test = project.eval_dataset("test")
    assert test is not None and test.fully_labelled and project.eval_dataset("val") is None
    assert space.datasets["test"].fully_labelled and not space.datasets["liver"].fully_labelled
    liver = project.dataset("liver")
    assert liver.root == tiny_project.parent.resolve() / "datasets" / "liver"
    assert liver.labels == {1: "liver", 2: "liver_tumour"}
    assert liver.split == SplitSpec(val_fraction=0.25, seed=0)
    assert project.dataset("kidney").split == SplitSpec()
    assert project.preprocessing.spacing == (3.0, 3.0, 3.0)
    assert project.preprocessing.window == (-325.0, 325.0)
    assert project.cache_dir == tiny_project.parent.resolve() / "prepared"
    with pytest.raises(ConfigError, match="unknown dataset 'lung'"):
        project.dataset("lung")


def test_project_is_portable(tmp_path: Path) -> None:
    """Copy the project folder elsewhere: relative roots follow the file, nothing points back."""
    original = write_tiny_project(tmp_path / "a" / "project")
    moved_folder = tmp_path / "b" / "elsewhere"
    shutil.copytree(original.parent, moved_folder)
    shutil.rmtree(tmp_path / "a")
    project = load_project(moved_folder / "project.yaml")
    for spec in project.datasets:
        assert spec.root.is_relative_to(moved_folder.resolve())
    assert project.cache_dir == moved_folder.resolve() / "prepared"
    summary = project_summary(moved_folder / "project.yaml")
    assert [d["counts"] for d in summary["datasets"]] == [{"train": 3, "val": 1}, {"train": 2, "val": 1},
                                                          {"test": 2}]


def test_root_overrides(tiny_project: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_disk" / "liver"
    shutil.copytree(tiny_project.parent / "datasets" / "liver", other)
    project = load_project(tiny_project, roots={"liver": other})
    assert project.dataset("liver").root == other.resolve()
    with pytest.raises(ConfigError, match="--root names unknown dataset 'lung'"):
        load_project(tiny_project, roots={"lung": other})
    # `--root liver=$DIR` with DIR unset: the current folder was taken for the root (helper-102)
    with pytest.raises(ConfigError, match=r"--root liver=: expected a folder after '=', got nothing"):
        load_project(tiny_project, roots={"liver": ""})


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b"])
def test_a_dataset_name_that_is_a_path_is_refused(tiny_project: Path, name: str) -> None:
    """The cache keeps a folder per dataset name: ".." wrote cases beside the project file, "." one case's
    meta over the cache's index.json (helper-102)."""
    text = tiny_project.read_text()
    bad = tiny_project.with_name("bad.yaml")
    bad.write_text(text.replace("  - name: liver\n", f"  - name: '{name}'\n", 1))
    with pytest.raises(ConfigError, match=r"\.name: expected a plain name"):
        load_project(bad)


def test_absolute_root_is_refused_and_relative_twin_accepted(tmp_path: Path) -> None:
    path = write_tiny_project(tmp_path / "p", TINY_PROJECT_YAML.replace(
        "root: datasets/liver", f"root: {(tmp_path / 'p' / 'datasets' / 'liver').as_posix()}"))
    with pytest.raises(ConfigError, match="datasets.liver.root: absolute paths are not portable") as info:
        load_project(path)
    assert info.value.path == path.resolve()
    path.write_text(TINY_PROJECT_YAML.replace("root: datasets/liver", "root: ./datasets/../datasets/liver"))
    assert load_project(path).dataset("liver").root.resolve() == (tmp_path / "p" / "datasets" / "liver").resolve()


_ERRORS = [
    # (what to replace, replacement, the key the message names, the problem)
    ("labels: {1: liver, 2: liver_tumour}", "labels: {1: livr, 2: liver_tumour}", "datasets.liver.labels.1",
     "unknown class 'livr'"),
    ("annotated: [kidney, kidney_tumour]", "annotated: [kidney, kidney_tumor]", "datasets.kidney.annotated",
     "unknown class 'kidney_tumor'"),
    ("{name: kidney_tumour, part_of: kidney}", "{name: kidney_tumour, part_of: kidneys}", "classes",
     "'kidney_tumour' is part_of 'kidneys', which is not a class"),
    ("name: tiny", "name: tiny\nepochs: 3", "epochs", "unknown key"),
    ("    role: test", "    role: test\n    colour: red", "datasets.test.colour", "unknown key"),
    ("{name: liver_tumour, part_of: liver}", "{name: liver_tumour, inside: liver}", "classes[1]",
     "unknown key 'inside'"),
    ("spacing: [3.0, 3.0, 3.0]", "spacing: fine", "preprocessing.spacing", "expected a list"),
    ("spacing: [3.0, 3.0, 3.0]", "spacing: [3.0, 3.0]", "preprocessing.spacing", "expected 3 values"),
    ("spacing: [3.0, 3.0, 3.0]", "spacing: [3.0, x, 3.0]", "preprocessing.spacing[1]", "expected a number"),
    ("spacing: [3.0, 3.0, 3.0]", "spacing: [3.0, 0, 3.0]", "preprocessing.spacing", "must be positive"),
    ("spacing: [3.0, 3.0, 3.0]", "spacing: [0.006, 6, 6]", "preprocessing.spacing",
     "[0.006, 6.0, 6.0] mm is outside 0.01-100 mm"),
    ("window: [-325, 325]", "window: [325, -325]", "preprocessing.window", "low < high"),
    ("split: {val_fraction: 0.25, seed: 0}", "split: {val_fraction: 1.5, seed: 0}",
     "datasets.liver.split.val_fraction", "must be in [0, 1)"),
    ("split: {val_fraction: 0.25, seed: 0}", "split: {val_fraction: 0.25, seed: zero}",
     "datasets.liver.split.seed", "expected an integer"),
    ("split: {val_fraction: 0.25, seed: 0}", "split: [0.25]", "datasets.liver.split", "expected a mapping"),
    ("    role: test", "    role: holdout", "datasets.test.role", "is not one of"),
    ("labels: {1: liver, 2: liver_tumour}", "labels: [liver, liver_tumour]", "datasets.liver.labels",
     "expected a mapping"),
    ("labels: {1: liver, 2: liver_tumour}", "labels: {one: liver, 2: liver_tumour}", "datasets.liver.labels",
     "local value 'one' is not an integer"),
    # nnU-Net v2's dataset.json order (name: value) copied into the project: the message shows the map's order
    ("labels: {1: liver, 2: liver_tumour}", "labels: {background: 0, liver: 1}", "datasets.liver.labels",
     "local value 'background' is not an integer (nnU-Net v2's order, NAME: VALUE; the map goes from the value "
     "the dataset's label files hold to a class of the project, VALUE: CLASS, as in '0: background', and value 0 "
     "needs no entry: it is background)"),
    ("labels: {1: liver, 2: liver_tumour}", "labels: {liver: 1, liver_tumour: 2}", "datasets.liver.labels",
     "local value 'liver' is not an integer (nnU-Net v2's order, NAME: VALUE; the map goes from the value the "
     "dataset's label files hold to a class of the project, VALUE: CLASS, as in '1: liver')"),
    ("labels: {1: liver, 2: liver_tumour}", "labels: {1: liver, Others: background}", "datasets.liver.labels",
     "local value 'Others' is not an integer (every value the map does not list: 'other: background')"),
    ("labels: {1: liver, 2: liver_tumour}", "labels: {liver: liver, 2: liver_tumour}", "datasets.liver.labels",
     "local value 'liver' is not an integer (the map goes from the value the dataset's label files hold to a "
     "class of the project, VALUE: CLASS, as in '1: liver')"),
    # int() would truncate 2.7 to 2, take true for 1, and raise OverflowError on .inf
    ("labels: {1: liver, 2: liver_tumour}", "labels: {1: liver, 2.7: liver_tumour}", "datasets.liver.labels",
     "local value 2.7 is not an integer"),
    ("labels: {1: liver, 2: liver_tumour}", "labels: {true: liver, 2: liver_tumour}", "datasets.liver.labels",
     "local value True is not an integer"),
    ("labels: {1: liver, 2: liver_tumour}", "labels: {.inf: liver, 2: liver_tumour}", "datasets.liver.labels",
     "local value inf is not an integer"),
    ("labels: {1: liver, 2: liver_tumour}", "labels: {1: liver, '1': liver_tumour}", "datasets.liver.labels",
     "local value 1 is given twice ('liver' and 'liver_tumour')"),
    ("annotated: [kidney, kidney_tumour]", "annotated: kidney", "datasets.kidney.annotated",
     "expected a non-empty list"),
    ("  - name: kidney\n    root: datasets/kidney", "  - name: liver\n    root: datasets/kidney", "datasets.liver",
     "duplicate dataset name"),
    ("  - name: kidney\n    root: datasets/kidney\n", "  - name: kidney\n", "datasets.kidney.root", "missing"),
    ("name: tiny", "name: tiny\ncache_dir: /tmp/cache", "cache_dir", "relative to the project file"),
]


@pytest.mark.parametrize("old,new,key,problem", _ERRORS, ids=[e[2] + ":" + e[3][:20] for e in _ERRORS])
def test_project_errors_name_the_file_and_the_key(tmp_path: Path, old: str, new: str, key: str,
                                                  problem: str) -> None:
    path = write_tiny_project(tmp_path / "p")
    load_project(path)  # twin: the untouched project loads
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_project(path)
    message = str(info.value)
    assert message.startswith(f"{path.resolve()}: "), message
    assert key in message and problem in message, message
    assert "\n" not in message


@pytest.mark.parametrize("text,problem", [
    ("", "expected a mapping at the top level"),
    ("[1, 2]", "expected a mapping at the top level"),
    ("classes: [liver\n", r"invalid YAML: line 2, column 1: expected ',' or '\]', but got '<stream end>'"),
    ("classes: []\ndatasets: []", "classes: expected a non-empty list"),
    ("classes: [liver]\ndatasets: []", "datasets: expected a non-empty list"),
    ("classes: [liver]\ndatasets: [{root: d, labels: {1: liver}, annotated: [liver]}]",
     "datasets[0]: missing key 'name'"),
    ("classes: [liver]\ndatasets: [3]", "datasets[0]: expected a mapping"),
])
def test_malformed_project_files(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "project.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[")) as info:
        load_project(path)
    assert str(info.value).startswith(str(path.resolve()))
    with pytest.raises(ConfigError, match="file not found"):
        load_project(tmp_path / "missing.yaml")


def test_a_project_without_training_datasets_is_refused(tmp_path: Path) -> None:
    text = TINY_PROJECT_YAML.replace("    split: {val_fraction: 0.25, seed: 0}\n", "    role: val\n")
    text = text.replace("    annotated: [kidney, kidney_tumour]\n", "    annotated: [kidney, kidney_tumour]\n    role: val\n")
    path = write_tiny_project(tmp_path / "p", text)
    with pytest.raises(ConfigError, match="at least one dataset needs role: train"):
        load_project(path)


# ---------------------------------------------------------------------- split_cases
IDS = [f"case_{i:03d}" for i in range(20)]


def test_split_is_seeded_and_deterministic() -> None:
    spec = SplitSpec(val_fraction=0.2, seed=3)
    first = split_cases(IDS, spec)
    assert len(first["val"]) == 4 and len(first["train"]) == 16
    assert sorted(first["train"] + first["val"]) == IDS
    assert split_cases(list(reversed(IDS)), spec) == first  # order of the listing does not matter
    assert split_cases(IDS, SplitSpec(val_fraction=0.2, seed=3)) == first
    others = [split_cases(IDS, SplitSpec(val_fraction=0.2, seed=s))["val"] for s in range(4, 8)]
    assert any(val != first["val"] for val in others)  # the seed matters
    assert first == {"train": sorted(first["train"]), "val": sorted(first["val"])}


def test_split_edge_sizes() -> None:
    tiny = split_cases(["a", "b"], SplitSpec(val_fraction=0.01))  # rounds to 0, but one case goes to val
    assert len(tiny["val"]) == 1 and len(tiny["train"]) == 1
    assert split_cases(["a"], SplitSpec(val_fraction=0.5)) == {"train": ["a"], "val": []}
    assert split_cases(["a", "b", "c"], SplitSpec(val_fraction=0.0)) == {"train": ["a", "b", "c"], "val": []}
    assert len(split_cases(["a", "b", "c"], SplitSpec(val_fraction=0.99))["train"]) == 1


def test_val_cases_are_pinned() -> None:
    spec = SplitSpec(val_cases=("case_007", "case_002"))
    assert split_cases(IDS, spec)["val"] == ["case_002", "case_007"]
    assert "case_007" not in split_cases(IDS, spec)["train"]
    with pytest.raises(ConfigError, match="datasets.liver.split.val_cases: unknown case 'case_999'") as info:
        split_cases(IDS, SplitSpec(val_cases=("case_999",)), where="datasets.liver.", source="p.yaml")
    assert info.value.path == Path("p.yaml")
    with pytest.raises(ConfigError, match="every case is in val"):
        split_cases(["a", "b"], SplitSpec(val_cases=("a", "b")))


def test_a_role_val_dataset_lets_the_training_sets_without_a_split_train_on_every_case(tmp_path: Path) -> None:
    """Validation uses a role: val dataset alone, so a training dataset that leaves its split out holds
    nothing back; one that writes its split keeps it, and without a role: val dataset the default holds 20 %."""
    path = write_tiny_project(tmp_path / "p")
    assert load_project(path).dataset("kidney").split == SplitSpec()  # no role: val dataset: 20 % held out
    path.write_text(TINY_PROJECT_YAML.replace("role: test", "role: val"))
    project = load_project(path)
    assert project.dataset("kidney").split.val_fraction == 0.0
    assert project.dataset("liver").split == SplitSpec(val_fraction=0.25, seed=0)  # written: kept
    counts = {d["name"]: d.get("counts") for d in project_summary(path)["datasets"]}
    # the liver's held-out case is neither trained nor validated on: said so ("val 1" read as validation)
    assert counts["kidney"] == {"train": 3}
    assert counts["liver"] == {"train": 3, "held out (unused)": 1}


def test_val_cases_in_the_project_file(tmp_path: Path) -> None:
    text = TINY_PROJECT_YAML.replace("split: {val_fraction: 0.25, seed: 0}", "split: {val_cases: [liver_002]}")
    path = write_tiny_project(tmp_path / "p", text)
    project = load_project(path)
    assert project.dataset("liver").split.val_cases == ("liver_002",)
    assert project_summary(path)["datasets"][0]["counts"] == {"train": 3, "val": 1}
    path.write_text(text.replace("liver_002", "liver_099"))
    with pytest.raises(ConfigError, match="unknown case 'liver_099'") as info:
        project_summary(path)
    assert info.value.path == path.resolve()


# ---------------------------------------------------------------------- generic helpers
@dataclass(frozen=True)
class _Inner:
    rate: float = 0.1
    steps: int = 10


@dataclass(frozen=True)
class _Recipe:
    name: str = "naive"
    inner: _Inner = field(default_factory=_Inner)
    widths: tuple[int, ...] = (8, 16)
    output: Path = Path("runs")
    tag: str | None = None
    amp: bool = False


def test_from_dict_to_dict_round_trip_and_overrides(tmp_path: Path) -> None:
    recipe = from_dict(_Recipe, {"name": "marginal", "inner": {"rate": 0.5}, "widths": [4, 8, 16],
                                 "output": "runs/a", "amp": True})
    assert recipe == _Recipe("marginal", _Inner(0.5, 10), (4, 8, 16), Path("runs/a"), None, True)
    assert from_dict(_Recipe, to_dict(recipe)) == recipe
    dump_yaml(to_dict(recipe), tmp_path / "r.yaml")
    assert from_dict(_Recipe, load_yaml(tmp_path / "r.yaml")) == recipe
    changed = apply_overrides(recipe, ["inner.steps=20", "tag=best", "output=runs/b", "widths=[2, 4]"])
    assert changed.inner.steps == 20 and changed.tag == "best" and changed.output == Path("runs/b")
    assert changed.widths == (2, 4)
    rebuilt = from_dict(_Recipe, load_yaml(tmp_path / "r.yaml"))  # another object, the same settings
    assert config_hash(changed) != config_hash(recipe) and config_hash(rebuilt) == config_hash(recipe)
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' \(known: rate, steps\)"):
        apply_overrides(recipe, ["inner.stepz=3"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_overrides(recipe, ["inner.steps"])
    with pytest.raises(ConfigError, match="inner.steps: expected an integer"):
        apply_overrides(recipe, ["inner.steps=many"])


def test_from_dict_errors_name_the_source() -> None:
    with pytest.raises(ConfigError, match=r"recipe.yaml: extra: unknown key"):
        from_dict(_Recipe, {"extra": 1}, source="recipe.yaml")
    with pytest.raises(ConfigError, match="amp: expected true/false"):
        from_dict(_Recipe, {"amp": "maybe"})
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict(_Recipe, [1, 2])
    with pytest.raises(ConfigError, match="inner: expected a mapping"):
        from_dict(_Recipe, {"inner": 3})
    with pytest.raises(ConfigError, match="output: expected a path"):
        from_dict(_Recipe, {"output": 3})
    # PreprocessSpec validation names the field once
    with pytest.raises(ConfigError) as info:
        from_dict(PreprocessSpec, {"spacing": [1, -1, 1]}, where="preprocessing")
    assert info.value.message.startswith("preprocessing.spacing: must be positive")
    assert from_dict(PreprocessSpec, {"spacing": [1, 1, 2]}).spacing == (1.0, 1.0, 2.0)
    assert PreprocessSpec().center == 0.0 and PreprocessSpec().half_width == 325.0


def test_option_changes_accept_options_added_later_at_their_default() -> None:
    from unionseg.config import option_changes

    defaults = {"a": 1.0, "b": 0.0}
    assert option_changes({"a": 1.0}, {"a": 1.0, "b": 0.0}, defaults) == ""  # b added later, at its default
    assert option_changes({"a": 1.0}, {"a": 1.0, "b": 0.5}, defaults) == "b: None -> 0.5"
    assert option_changes({"a": 2.0, "b": 0.0}, {"a": 1.0, "b": 0.0}, defaults) == "a: 2.0 -> 1.0"
    assert option_changes({"a": 1.0, "gone": 3}, {"a": 1.0}, defaults) == "gone: 3 -> None"


def test_config_hash_leaves_out_new_fields_at_their_default() -> None:
    """A field marked HASH_OMITS_DEFAULT (data.dataset_weights) does not enter config_hash at its default,
    so runs recorded before it existed keep their hash (benchmark reuse, training resume); set, it does."""
    import hashlib
    import json

    from unionseg.training.config import load_train_config

    cfg = load_train_config(None, [], method="naive")
    before = to_dict(cfg)
    del before["data"]["dataset_weights"]  # the tree as it was before the fields were added
    del before["select_on"]
    del before["init_from"]
    old = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert config_hash(cfg) == old
    weighted = load_train_config(None, ["data.dataset_weights={kidney: 2}"], method="naive")
    assert config_hash(weighted) != old
    assert to_dict(weighted)["data"]["dataset_weights"] == {"kidney": 2}  # the saved config keeps it
    # the configuration keeps what was written (a weight of 1 counts as none only where a resume is compared,
    # so that a misspelt name such as `livr: 1` is still refused as no dataset of the project)
    ones = load_train_config(None, ["data.dataset_weights={livr: 1, kidney: 2}"], method="naive")
    assert ones.data.dataset_weights == {"livr": 1, "kidney": 2}
    from unionseg.config import describe_changes
    from unionseg.training.trainer import _flatten  # a changed map is named whole
    assert describe_changes(_flatten(to_dict(cfg)), _flatten(to_dict(weighted))) == \
        "data.dataset_weights: {} -> {'kidney': 2}"
    regions = load_train_config(None, ["select_on=regions"], method="naive")
    assert config_hash(regions) not in (old, config_hash(weighted))
    assert to_dict(regions)["select_on"] == "regions"
    with pytest.raises(ConfigError, match="select_on"):
        load_train_config(None, ["select_on=tumours"], method="naive")
    started = load_train_config(None, ["init_from=runs/a/model.pt"], method="naive")
    assert config_hash(started) not in (old, config_hash(weighted), config_hash(regions))


def test_label_keys_written_as_strings_or_whole_floats_are_integers(tmp_path: Path) -> None:
    """The twin of the refused keys above: ``'1'`` (JSON-minded YAML) and ``2.0`` are the values 1 and 2."""
    path = write_tiny_project(tmp_path / "p")
    text = path.read_text()
    path.write_text(text.replace("labels: {1: liver, 2: liver_tumour}", "labels: {'1': liver, 2.0: liver_tumour}", 1))
    assert load_project(path).dataset("liver").labels == {1: "liver", 2: "liver_tumour"}


def test_a_folder_given_for_the_project_file_says_so(tmp_path: Path) -> None:
    path = write_tiny_project(tmp_path / "p")
    with pytest.raises(ConfigError, match=r"is a folder; give the YAML file \(project.yaml is here\)") as info:
        load_project(path.parent)
    assert info.value.path == path.parent


def test_a_missing_required_key_and_a_key_where_none_are_taken_read_plainly() -> None:
    """A dataclass's own TypeError ("__init__() missing 1 required positional argument") and "(known: )"
    were what a suite without a name and an option for an option-less method gave."""
    from unionseg.benchmark import SuiteConfig

    @dataclass(frozen=True)
    class _Empty:
        pass

    with pytest.raises(ConfigError, match=r"^x.yaml: name: missing \(a required key\)$"):
        from_dict(SuiteConfig, {"seeds": 1}, source="x.yaml")
    with pytest.raises(ConfigError, match=r"nosuch: unknown key \(it takes no keys\)"):
        from_dict(_Empty, {"nosuch": 1})


def test_every_method_has_a_built_in_recipe_with_the_shared_budget() -> None:
    """`unionseg train -m M` starts from M's recipe; the budget keys (network, data, optim, steps) are the
    same in every recipe, as a comparison needs. `expert` had none, so a standalone expert trained with the
    bare defaults (lr 0.003) instead of the budget its shared copies use."""
    from unionseg.config import to_dict
    from unionseg.methods.base import available_methods
    from unionseg.training.config import load_train_config
    from unionseg.training.recipes import BUDGET_RECIPE, default_recipe, recipe_dir

    budgets = {}
    for method in available_methods():
        recipe = default_recipe(method)
        assert recipe is not None and recipe.name == f"{method}.yaml", method
        cfg = to_dict(load_train_config(recipe, method=method))
        budgets[method] = {k: cfg[k] for k in ("network", "data", "optim", "steps", "val_every")}
    assert "expert" in budgets and budgets["expert"]["optim"]["lr"] == 0.02
    assert all(b == budgets["naive"] for b in budgets.values())
    # what a method without a recipe (a plugin, docs/extending.md) trains with: the same budget
    shared = to_dict(load_train_config(recipe_dir() / BUDGET_RECIPE))
    assert {k: shared[k] for k in budgets["naive"]} == budgets["naive"]


def test_one_override_string_alone_is_one_override() -> None:
    """``load_train_config(recipe, "steps=3")`` was read one character at a time ("override 's' must look
    like key=value"); one string alone is now one override."""
    from unionseg.training.config import load_train_config

    assert load_train_config(None, "steps=3", method="naive").steps == 3
    assert load_train_config(None, ["steps=3", "seed=4"], method="naive").seed == 4


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads `1e-2` as a string: a method option written so stayed a string in the
    run's config, where `optim.lr=1e-3` became a float only through its typed field (helper-94). Files and
    overrides now read it as YAML 1.2 does; words that only look alike stay strings."""
    from unionseg.training.recipes import train_config

    assert train_config("dodnet", overrides=["options.cross_task_weight=1e-2"]).options == {"cross_task_weight": 0.01}
    path = tmp_path / "recipe.yaml"
    path.write_text("a: 1e-3\nb: -2E+2\nc: .5e1\nd: case_1e5\ne: 1e\nf: [1e2, x]\ng: ._e3\n")
    assert load_yaml(path) == {"a": 0.001, "b": -200.0, "c": 5.0, "d": "case_1e5", "e": "1e", "f": [100.0, "x"],
                               "g": "._e3"}
    # a string that reads as such a number is written quoted, so a run's config.yaml gives back its configuration
    data = {"tag": "1e3", "lr": 1e-5, "names": ["2E-1", "x"]}
    dump_yaml(data, path)
    assert load_yaml(path) == data
    # a field that must be a string refuses such a number (str() gave "1000.0" for `1e3`) and says to quote it
    from unionseg.config import SplitSpec as Split

    with pytest.raises(ConfigError, match="val_cases.*expected a string, got the number 1000.0 \\(quote it"):
        from_dict(Split, {"val_cases": [1e3]})
    assert from_dict(Split, {"val_cases": [3, "1e3"]}).val_cases == ("3", "1e3")


def test_a_project_that_is_not_a_path_is_refused_by_name() -> None:
    """load_project(123) raised a bare TypeError from pathlib (helper-94)."""
    with pytest.raises(ConfigError, match="the project must be the path of its YAML file, got int 123"):
        load_project(123)  # type: ignore[arg-type]


def test_a_layout_typo_and_unknown_val_cases_are_named_with_what_would_work(tmp_path: Path) -> None:
    """`layout: msdd` was refused naming the dataset's folder, not the project file and key; of several
    unknown val_cases only the first was named, with no hint that ids carry no file suffix (helper-93)."""
    path = write_tiny_project(tmp_path / "p", TINY_PROJECT_YAML.replace("    split: {val_fraction: 0.25, seed: 0}",
                                                                       "    layout: msdd"))
    with pytest.raises(ConfigError, match="datasets.liver.layout: unknown layout 'msdd'; known: auto, msd, "
                                          "nnunet, kits, folders, folders:IMAGES,LABELS") as info:
        load_project(path)
    assert info.value.path == path.resolve()
    path.write_text(TINY_PROJECT_YAML.replace("split: {val_fraction: 0.25, seed: 0}",
                                              "split: {val_cases: [liver_9, liver_000.nii.gz]}"))
    with pytest.raises(ConfigError, match="split.val_cases: unknown cases 'liver_000.nii.gz', 'liver_9'; a case id "
                                          "has no file suffix \\('liver_000', not 'liver_000.nii.gz'\\); the "
                                          "dataset's cases: liver_000, liver_001, liver_002 and 1 more"):
        project_summary(path)
    path.write_text(TINY_PROJECT_YAML.replace("split: {val_fraction: 0.25, seed: 0}",
                                              "split: {val_cases: [liver_001_0000.nii.gz]}"))
    with pytest.raises(ConfigError, match="a case id has no file suffix \\('liver_001', not 'liver_001_0000.nii.gz'"):
        project_summary(path)
    path.write_text(TINY_PROJECT_YAML.replace("split: {val_fraction: 0.25, seed: 0}",
                                              "split: {val_cases: [other_7.nii.gz]}"))
    with pytest.raises(ConfigError, match="a case id is the file name without its suffix and without nnU-Net's _0000"):
        project_summary(path)


def test_a_key_written_twice_is_refused(tmp_path: Path) -> None:
    """PyYAML let the last of two equal keys win: `labels: {1: liver, 2: tumor, 1: spleen}` scored the liver as
    spleen, exit 0 (helper-103). A key written twice is refused, naming both lines; a merge may override."""
    import yaml

    from unionseg.config import load_yaml, parse_yaml

    bad = tmp_path / "map.yaml"
    bad.write_text("labels:\n  1: liver\n  2: tumor\n  1: spleen\n")
    with pytest.raises(ConfigError, match=r"map.yaml: invalid YAML: found the key 1 twice \(first on line 2, again on "
                                          r"line 4\)"):
        load_yaml(bad)
    with pytest.raises(yaml.YAMLError, match="found the key 'a' twice"):
        parse_yaml("{a: 1, b: 2, a: 3}")
    assert parse_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 5\n")["d"] == {"x": 5, "y": 2}
    # a merged node merged again, deeper in the file than its user: PyYAML merges in place (helper-104)
    nested = "c: &c {steps: 8, v: 8}\nb:\n  e: &s\n    <<: *c\n    steps: 4\nlong:\n  <<: *s\n  v: 16\n"
    assert parse_yaml(nested)["long"] == {"steps": 4, "v": 16}
    assert parse_yaml("{1: x, '1': y}") == {1: "x", "1": "y"}  # two keys (a cross map refuses the pair itself)


def test_a_cross_map_giving_one_value_twice_is_refused(tmp_path: Path) -> None:
    from unionseg.evaluation.crossmap import load_cross_map

    path = tmp_path / "dup.yaml"
    path.write_text("labels: {1: liver, '1': spleen}\nshared: {liver: region:liver}\n")
    with pytest.raises(ConfigError, match=r"labels: value 1 is given twice \('liver' and 'spleen'\)"):
        load_cross_map(path)
