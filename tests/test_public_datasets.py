"""Public datasets without downloads: miniature copies of MSD, KiTS19/21 and BTCV folders (real names,
folders, label values, dataset.json style and oddities), the recipes in configs/projects, and the
cross-label-space evaluation."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from unionseg.cli import run
from unionseg.config import load_project
from unionseg.data.catalog import check_label_map, match_by_name, scan_dataset
from unionseg.data.io import Geometry, write_image
from unionseg.errors import ConfigError, DataError, UnionsegWarning
from unionseg.evaluation.crossmap import (
    CrossMap,
    evaluate_cross,
    evaluate_cross_case,
    evaluate_with_map,
    load_cross_map,
    model_space_from,
)
from unionseg.labels import DatasetLabels, LabelSpace, Leaf

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "projects"
SHAPE = (12, 12, 8)
SPACING = (0.8, 0.8, 1.5)  # the recipes' target spacing: prepare does not have to resample

# (dataset name in the recipes, MSD task folder, file prefix, first case number, dataset.json labels)
MSD_TASKS = {
    "liver": ("Task03_Liver", "liver", 0, {"0": "background", "1": "liver", "2": "cancer"}),
    "hepatic_vessel": ("Task08_HepaticVessel", "hepaticvessel", 1, {"0": "background", "1": "Vessel", "2": "Tumour"}),
    "pancreas": ("Task07_Pancreas", "pancreas", 1, {"0": "background", "1": "pancreas", "2": "cancer"}),
    "colon": ("Task10_Colon", "colon", 1, {"0": "background", "1": "colon cancer primaries"}),
    "lung": ("Task06_Lung", "lung", 1, {"0": "background", "1": "cancer"}),
    "spleen": ("Task09_Spleen", "spleen", 2, {"0": "background", "1": "spleen"}),
}


# ---------------------------------------------------------------------- miniature public folders
def _volumes(seed: int, values: tuple[int, ...], shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 image (air around a soft-tissue body) and a label with an organ (values[0]) holding
    a lesion (values[1], if any)."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, dtype=np.int16)
    image[1:-1, 1:-1, :] = rng.integers(-100, 200, (shape[0] - 2, shape[1] - 2, shape[2])).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    label[3:9, 3:9, 2:6] = values[0]
    if len(values) > 1:
        label[5:7, 5:7, 3:5] = values[1]
    return image, label


def write_msd_task(parent: Path, dataset: str, n_cases: int = 5) -> Path:
    """An MSD task folder as it unpacks from the Decathlon tarball: dataset.json with ``./`` paths, an
    imagesTs folder, and macOS ``._`` resource-fork copies that the JSON does not list."""
    task, prefix, first, labels = MSD_TASKS[dataset]
    root = parent / task
    geom = Geometry.identity(SHAPE, SPACING)
    values = tuple(sorted(int(v) for v in labels if v != "0"))
    training = []
    for i in range(first, first + n_cases):
        name = f"{prefix}_{i}.nii.gz" if dataset == "liver" else f"{prefix}_{i:03d}.nii.gz"
        image, label = _volumes(i, values)
        write_image(root / "imagesTr" / name, image, geom)
        write_image(root / "labelsTr" / name, label, geom)
        (root / "imagesTr" / f"._{name}").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble junk
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    write_image(root / "imagesTs" / f"{prefix}_999.nii.gz", _volumes(99, values)[0], geom)
    data = {"name": task.split("_", 1)[1], "description": "miniature", "reference": "", "licence": "CC-BY-SA 4.0",
            "release": "1.0", "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": labels,
            "numTraining": n_cases, "numTest": 1, "training": training, "test": [f"./imagesTs/{prefix}_999.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(data, indent=4))
    return root


# KiTS19 stores arrays slice-first with a permuted, flipped affine (axis 0 is the 1.5 mm slice axis)
KITS19_AFFINE = np.array([[0.0, 0.0, -0.8, 0.0], [0.0, -0.8, 0.0, 0.0], [-1.5, 0.0, 0.0, 0.0], [0, 0, 0, 1]])


def write_kits19(parent: Path, n_cases: int = 5) -> Path:
    """``kits19/data/case_XXXXX/{imaging,segmentation}.nii.gz`` (1 kidney, 2 tumor), a kits.json of
    clinical data, and a test case (00210) with imaging only."""
    data = parent / "kits19" / "data"
    slice_first = (SHAPE[2], SHAPE[1], SHAPE[0])
    geom = Geometry(slice_first, KITS19_AFFINE)
    for i in range(n_cases):
        image, label = _volumes(10 + i, (1, 2), slice_first)
        write_image(data / f"case_{i:05d}" / "imaging.nii.gz", image, geom)
        write_image(data / f"case_{i:05d}" / "segmentation.nii.gz", label, geom)
    write_image(data / "case_00210" / "imaging.nii.gz", _volumes(5, (1,), slice_first)[0], geom)
    (data / "kits.json").write_text(json.dumps([{"case_id": "case_00000", "age_at_nephrectomy": 50}]))
    return data


def write_kits21(parent: Path, n_cases: int = 3) -> Path:
    """``kits21/data/case_XXXXX/`` with the aggregated segmentations (1 kidney, 2 tumor, 3 cyst) and the
    per-annotator ``segmentations/`` folder."""
    data = parent / "kits21" / "data"
    geom = Geometry.identity(SHAPE, SPACING)
    for i in range(n_cases):
        case = data / f"case_{i:05d}"
        image, label = _volumes(20 + i, (1, 2))
        label[8:9, 8:9, 2:3] = 3  # a cyst
        write_image(case / "imaging.nii.gz", image, geom)
        for kind in ("MAJ", "AND", "OR"):
            write_image(case / f"aggregated_{kind}_seg.nii.gz", label, geom)
        write_image(case / "segmentations" / "kidney_instance-1_annotation-1.nii.gz", (label > 0).astype(np.uint8),
                    geom)
    return data


BTCV_ORGANS = {1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
               7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_veins", 11: "pancreas",
               12: "right_adrenal_gland", 13: "left_adrenal_gland"}
# one slab of voxels per BTCV organ along x (all 13 present in every case)
BTCV_SLAB = {value: (value, value + 1) for value in BTCV_ORGANS}


def btcv_label(shape: tuple[int, int, int] = (16, 8, 6)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    for value, (x0, x1) in BTCV_SLAB.items():
        label[x0:x1, 2:6, 1:5] = value
    return label


def write_btcv(parent: Path, case_numbers: tuple[int, ...] = (1, 2, 21)) -> Path:
    """``RawData/Training/img/img0001.nii.gz`` + ``label/label0001.nii.gz`` (names match by number only)."""
    root = parent / "RawData" / "Training"
    label = btcv_label()
    geom = Geometry.identity(label.shape, (0.7, 0.7, 3.0))
    for n in case_numbers:
        write_image(root / "img" / f"img{n:04d}.nii.gz", np.full(label.shape, 40, dtype=np.int16), geom)
        write_image(root / "label" / f"label{n:04d}.nii.gz", label, geom)
    return root


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every public miniature, written once for the module: dataset name -> root."""
    downloads = tmp_path_factory.mktemp("downloads")
    roots = {name: write_msd_task(downloads, name) for name in MSD_TASKS}
    roots["kidney"] = write_kits19(downloads)
    roots["kits21"] = write_kits21(downloads)
    roots["btcv"] = write_btcv(downloads)
    return roots


MOTS_NAMES = ("liver", "kidney", "hepatic_vessel", "pancreas", "colon", "lung", "spleen")


def _root_args(public: dict[str, Path], names: tuple[str, ...]) -> list[str]:
    return [arg for n in names for arg in ("--root", f"{n}={public[n]}")]


# ---------------------------------------------------------------------- the recipes
def test_mots_recipe_maps_dodnets_seven_datasets(public: dict[str, Path]) -> None:
    project = load_project(RECIPES / "mots.yaml", roots={n: public[n] for n in MOTS_NAMES})
    space = project.label_space
    assert [d.name for d in project.datasets] == list(MOTS_NAMES)
    maps = {d.name: dict(d.labels) for d in project.datasets}
    assert maps["liver"] == {1: "liver", 2: "liver_tumour"}
    assert maps["kidney"] == {1: "kidney", 2: "kidney_tumour", 3: "kidney"}  # 3: KiTS21/23 cyst
    assert maps["hepatic_vessel"] == {1: "hepatic_vessel", 2: "liver_tumour"}
    assert maps["pancreas"] == {1: "pancreas", 2: "pancreas_tumour"}
    assert maps["colon"] == {1: "colon_tumour"} and maps["lung"] == {1: "lung_tumour"}
    assert maps["spleen"] == {1: "spleen"}
    # tumour-only sets annotate the tumour, not the organ: their organ region cannot be scored on them
    assert space.scorable_keys(space.annotated_leaf_mask("colon")) == ["colon_tumour"]
    assert space.scorable_keys(space.annotated_leaf_mask("liver")) == ["region:liver", "liver_tumour"]
    for d in project.datasets:
        assert d.role == "train" and d.split.val_fraction == 0.2 and d.split.seed == 0 and d.layout == "auto"
        assert d.root == public[d.name].resolve()
    assert project.preprocessing.spacing == (0.8, 0.8, 1.5)  # RAS (x, y, z): the 1.5 mm slice axis last
    assert project.preprocessing.window == (-325.0, 325.0)


def test_every_recipe_loads_and_has_no_absolute_or_missing_roots(public: dict[str, Path]) -> None:
    import yaml

    for recipe in ("mots.yaml", "abdomen4.yaml"):
        raw = yaml.safe_load((RECIPES / recipe).read_text())
        assert all("root" not in d for d in raw["datasets"]), recipe
        names = [d["name"] for d in raw["datasets"]]
        project = load_project(RECIPES / recipe, roots={n: public[n] for n in names})
        assert all(d.root.is_dir() for d in project.datasets)
    abdomen = load_project(RECIPES / "abdomen4.yaml", roots={n: public[n] for n in ("liver", "kidney", "pancreas",
                                                                                      "spleen")})
    assert abdomen.label_space.region_keys() == ["region:liver", "region:kidney", "region:pancreas", "region:spleen"]
    btcv = load_cross_map(RECIPES / "btcv_eval.yaml")
    assert btcv.labels == BTCV_ORGANS
    # a built-in map by its name (evaluate-cross --map btcv_eval said "file not found"; helper-75)
    named = load_cross_map("btcv_eval")
    assert named.path.samefile(btcv.path) and (named.labels, named.shared) == (btcv.labels, btcv.shared)
    assert load_cross_map("btcv_eval.yaml").labels == btcv.labels  # the file's name, where no such file is here
    with pytest.raises(ConfigError, match=r"btcv: no such file, and no cross map of that name is built in "
                                          r"\(amos_eval, btcv_eval, word_eval\)"):
        load_cross_map("btcv")
    gt_map, dropped = btcv.gt_map(abdomen.label_space)
    assert gt_map == {1: "region:spleen", 2: "region:kidney", 3: "region:kidney", 6: "region:liver",
                      11: "region:pancreas"} and dropped == {}
    for name in ("amos_eval.yaml", "word_eval.yaml"):
        cmap = load_cross_map(RECIPES / name)
        assert set(cmap.gt_map(abdomen.label_space)[0].values()) == {
            "region:liver", "region:kidney", "region:pancreas", "region:spleen"}
    # without roots, the error names the dataset and every way to give its root
    with pytest.raises(ConfigError, match=r"datasets.liver.root: missing .*--root liver=DIR.*roots.yaml"):
        load_project(RECIPES / "mots.yaml")


def test_roots_file_gives_roots_and_cache_and_command_line_wins(public: dict[str, Path], tmp_path: Path) -> None:
    import os

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(RECIPES / "abdomen4.yaml", work / "abdomen4.yaml")
    with pytest.raises(ConfigError, match=r"datasets.liver.root: missing .*under 'roots:' in .*work/roots.yaml"):
        load_project(work / "abdomen4.yaml")
    # relative entries are relative to the roots file; names of other recipes' datasets are ignored
    lines = ["roots:"] + [f"  {n}: {os.path.relpath(public[n], work)}" for n in MOTS_NAMES]
    (work / "roots.yaml").write_text("\n".join([*lines, "cache_dir: ../cache"]) + "\n")
    project = load_project(work / "abdomen4.yaml")
    assert [d.root for d in project.datasets] == [public[n].resolve() for n in ("liver", "kidney", "pancreas",
                                                                                "spleen")]
    assert project.cache_dir == (tmp_path / "cache" / "abdomen4").resolve()
    override = load_project(work / "abdomen4.yaml", roots={"kidney": public["kits21"]})
    assert override.dataset("kidney").root == public["kits21"].resolve()
    (work / "roots.yaml").write_text("roots: {liver: 3}\n")
    with pytest.raises(ConfigError, match=r"roots.yaml: roots.liver: expected a folder"):
        load_project(work / "abdomen4.yaml")
    (work / "roots.yaml").write_text("liver: /data/liver\n")
    with pytest.raises(ConfigError, match=r"roots.yaml: liver: unknown key \(known: cache_dir, roots\)"):
        load_project(work / "abdomen4.yaml")


def test_info_lists_the_seven_mots_datasets(public: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["info", str(RECIPES / "mots.yaml"), *_root_args(public, MOTS_NAMES)]) == 0
    out = capsys.readouterr().out
    rows: dict[str, list[list[str]]] = {}  # a dataset's row, with the lines its cells continue on
    current: list[list[str]] | None = None
    for line in out.splitlines():
        if line.count("│") < 7:
            current = None
            continue
        cells = [c.strip() for c in line.split("│")]
        if cells[1] in MOTS_NAMES:
            current = rows.setdefault(cells[1], [])
        if current is not None:
            current.append(cells)
    assert sorted(rows) == sorted(MOTS_NAMES), out
    expected = {"liver": ("msd", "liver, liver_tumour"), "kidney": ("kits", "kidney, kidney_tumour"),
                "hepatic_vessel": ("msd", "hepatic_vessel, liver_tumour"),
                "pancreas": ("msd", "pancreas, pancreas_tumour"), "colon": ("msd", "colon_tumour"),
                "lung": ("msd", "lung_tumour"), "spleen": ("msd", "spleen")}
    for name, (layout, annotated) in expected.items():
        lines = rows[name]
        assert lines[0][3] == layout, lines
        assert ", ".join(c[5] for c in lines if c[5]) == annotated, lines  # one class per line
        assert lines[0][6] == "train 4, val 1", lines  # 5 cases, 80/20; the KiTS test case 00210 is skipped


# ---------------------------------------------------------------------- layouts
def test_kits19_layout_skips_test_cases_and_declares_no_labels(public: dict[str, Path]) -> None:
    for root in (public["kidney"], public["kidney"].parent):  # kits19/data, or the repository folder
        info = scan_dataset("kidney", root)
        assert info.layout == "kits" and info.declared_labels is None
        assert [c.case_id for c in info.cases] == [f"case_{i:05d}" for i in range(5)]
        assert info.skipped == ("case_00210",)
        assert info.cases[0].image.name == "imaging.nii.gz" and info.cases[0].label is not None
        assert info.cases[0].label.name == "segmentation.nii.gz"
    assert scan_dataset("kidney", public["kidney"], layout="kits").cases == info.cases
    # no dataset.json: the label-map check is a no-op; the twin with a declaration still checks
    check_label_map("kidney", None, {1: "kidney", 7: "kidney_tumour"}, public["kidney"] / "dataset.json")
    with pytest.raises(DataError, match="maps label value 7"):
        check_label_map("kidney", {0: "background", 1: "kidney"}, {1: "kidney", 7: "kidney_tumour"},
                        public["kidney"] / "dataset.json")


def test_kits21_uses_the_majority_vote_and_prefers_segmentation(public: dict[str, Path], tmp_path: Path) -> None:
    info = scan_dataset("kidney", public["kits21"].parent)
    assert info.layout == "kits" and info.skipped == ()
    assert {c.label.name for c in info.cases if c.label} == {"aggregated_MAJ_seg.nii.gz"}
    case = tmp_path / "dataset" / "case_00007"  # KiTS23: dataset/case_XXXXX/segmentation.nii.gz
    shutil.copytree(public["kits21"] / "case_00000", case)
    shutil.copy(case / "aggregated_MAJ_seg.nii.gz", case / "segmentation.nii.gz")
    (info2,) = scan_dataset("kidney", tmp_path).cases
    assert info2.label == case / "segmentation.nii.gz"
    # the KiTS21 clone itself (its cases in kits21/data/ inside the clone) is a root too
    clone = tmp_path / "clone"
    shutil.copytree(public["kits21"], clone / "kits21" / "data")
    assert scan_dataset("kidney", clone).cases == scan_dataset("kidney", clone / "kits21" / "data").cases != []


def test_folders_layout_matches_btcv_names_by_number(public: dict[str, Path], tmp_path: Path) -> None:
    info = scan_dataset("btcv", public["btcv"])
    assert info.layout == "folders" and info.declared_labels is None
    assert [(c.case_id, c.label.name if c.label else None) for c in info.cases] == [
        ("img0001", "label0001.nii.gz"), ("img0002", "label0002.nii.gz"), ("img0021", "label0021.nii.gz")]
    # explicit sub-folders, from a parent folder
    explicit = scan_dataset("btcv", public["btcv"].parent, layout="folders:Training/img,Training/label")
    assert [c.case_id for c in explicit.cases] == ["img0001", "img0002", "img0021"]
    with pytest.raises(DataError, match="escapes the dataset root"):
        scan_dataset("btcv", public["btcv"], layout="folders:../x,label")
    with pytest.raises(DataError, match="expected 'folders:IMAGES,LABELS'"):
        scan_dataset("btcv", public["btcv"], layout="folders:img")
    # a missing label and a stray label each name the file
    root = tmp_path / "btcv"
    shutil.copytree(public["btcv"], root)
    (root / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"label file for case 'img0002' is missing") as exc:
        scan_dataset("btcv", root)
    assert exc.value.path == root / "img" / "img0002.nii.gz"
    # a label of another naming scheme, which nothing matched: named, so the mismatch shows
    shutil.copy(root / "label" / "label0001.nii.gz", root / "label" / "liver_mask.nii.gz")
    with pytest.raises(DataError, match=r"is missing: .* by name or number; unmatched there: liver_mask\.nii\.gz$"):
        scan_dataset("btcv", root)
    (root / "label" / "liver_mask.nii.gz").unlink()
    (root / "img" / "img0002.nii.gz").unlink()
    assert len(scan_dataset("btcv", root).cases) == 2
    shutil.copy(root / "label" / "label0001.nii.gz", root / "label" / "label0099.nii.gz")
    with pytest.raises(DataError, match=r"label file matches no image in img/ \(by name or number\)$") as exc:
        scan_dataset("btcv", root)
    assert exc.value.path == root / "label" / "label0099.nii.gz"
    # a DICOM series as a case's image: a folder, which datasets do not read; the message says so
    (root / "img" / "img0099").mkdir()
    with pytest.raises(DataError, match=r"img/ holds folders \(img0099\), which datasets do not read: one image "
                                        r"file per case .*convert a DICOM series first"):
        scan_dataset("btcv", root)


def test_match_by_name_exact_first_then_unambiguous_numbers() -> None:
    left = {k: Path(k) for k in ("liver_1", "img0002", "volume-7", "x1y2")}
    right = {k: Path(k) for k in ("liver_1", "label0002", "segmentation-7", "a1b2", "c1b2")}
    pairs, lonely_left, lonely_right = match_by_name(left, right)
    assert pairs == {"liver_1": "liver_1", "img0002": "label0002", "volume-7": "segmentation-7"}
    assert lonely_left == ["x1y2"] and lonely_right == ["a1b2", "c1b2"]  # (1, 2) twice on the right: ambiguous


def test_images_folder_with_nnunet_channel_suffix_and_no_dataset_json(tmp_path: Path) -> None:
    geom = Geometry.identity(SHAPE, SPACING)
    for case in ("word_0001", "word_0002"):
        image, label = _volumes(1, (1, 2))
        write_image(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", image, geom)
        write_image(tmp_path / "labelsTr" / f"{case}.nii.gz", label, geom)
    (tmp_path / "labelsTr" / "notes.txt").write_text("not an image")
    info = scan_dataset("word", tmp_path)
    assert info.layout == "folders" and [c.case_id for c in info.cases] == ["word_0001", "word_0002"]
    # nnU-Net's test folders are found too, where the training pair is absent (a test set of its own)
    test_root = tmp_path / "test"
    for case in ("ts_001", "ts_002"):
        image, label = _volumes(1, (1, 2))
        write_image(test_root / "imagesTs" / f"{case}_0000.nii.gz", image, geom)
        write_image(test_root / "labelsTs" / f"{case}.nii.gz", label, geom)
    info = scan_dataset("test", test_root)
    assert info.layout == "folders" and [c.case_id for c in info.cases] == ["ts_001", "ts_002"]
    assert all(c.label is not None and c.label.parent.name == "labelsTs" for c in info.cases)


def test_auto_detection_failure_names_the_folder_and_what_was_looked_for(tmp_path: Path) -> None:
    root = tmp_path / "download"
    (root / "scans").mkdir(parents=True)
    (root / "README.txt").write_text("x")
    with pytest.raises(DataError) as exc:
        scan_dataset("liver", root)
    assert exc.value.path == root
    message = str(exc.value)
    for looked_for in ("matches no known layout", "dataset.json", "case_XXXXX/imaging.nii.gz", "imagesTr/+labelsTr/",
                       "img/+label/", "folders:IMAGES,LABELS"):
        assert looked_for in message, message
    # the twin: a labels folder beside the images makes it a 'folders' dataset
    geom = Geometry.identity(SHAPE, SPACING)
    image, label = _volumes(0, (1,))
    write_image(root / "images" / "a.nii.gz", image, geom)
    write_image(root / "labels" / "a.nii.gz", label, geom)
    assert scan_dataset("liver", root).layout == "folders"


def test_mixed_kits_and_msd_project_prepares_without_code_change(public: dict[str, Path], tmp_path: Path) -> None:
    """One project: MSD liver (dataset.json) and KiTS19 kidney (case folders, slice-first arrays)."""
    from unionseg.data.preprocess import prepare_project

    text = (RECIPES / "abdomen4.yaml").read_text()
    cut = text.index("  # MSD Task07_Pancreas")
    (tmp_path / "two.yaml").write_text(text[:cut] + text[text.index("# as mots.yaml"):])
    project = load_project(tmp_path / "two.yaml", roots={"liver": public["liver"], "kidney": public["kidney"]})
    index = prepare_project(project, workers=0, progress=False)
    space = project.label_space
    assert {(c.dataset, c.split) for c in index} == {("liver", "train"), ("liver", "val"), ("kidney", "train"),
                                                     ("kidney", "val")}
    assert len(index.cases(dataset="kidney")) == 5 and len(index.cases(dataset="liver")) == 5
    kidney = index.case("kidney", "case_00000")
    label = np.asarray(kidney.label())
    # the slice-first KiTS array arrives on the RAS grid, slice axis last, with global codes
    assert label.shape[2] < label.shape[0]
    assert set(np.unique(label).tolist()) == {0, space.leaf_id("kidney"), space.leaf_id("kidney_tumour")}
    liver = np.asarray(index.case("liver", "liver_0").label())
    assert set(np.unique(liver).tolist()) == {0, space.leaf_id("liver"), space.leaf_id("liver_tumour")}


# ---------------------------------------------------------------------- cross-label-space evaluation
def _abdomen4_space() -> LabelSpace:
    """The recipe's label space; no roots are needed to read it."""
    return model_space_from(project=RECIPES / "abdomen4.yaml")


def _perfect_abdomen4_prediction(space: LabelSpace, gt: np.ndarray) -> np.ndarray:
    """Leaf ids an ideal abdomen4 model predicts on a BTCV case (a liver tumour inside the liver)."""
    pred = np.zeros(gt.shape, dtype=np.uint8)
    for value, leaf in ((1, "spleen"), (2, "kidney"), (3, "kidney"), (6, "liver"), (11, "pancreas")):
        pred[gt == value] = space.leaf_id(leaf)
    liver = np.argwhere(gt == 6)
    pred[tuple(liver[0])] = space.leaf_id("liver_tumour")
    return pred


def test_cross_evaluation_scores_the_four_shared_organs_only(public: dict[str, Path], tmp_path: Path) -> None:
    space = _abdomen4_space()
    cmap = load_cross_map(RECIPES / "btcv_eval.yaml")
    gt_map, _ = cmap.gt_map(space)
    gt = btcv_label()
    pred = _perfect_abdomen4_prediction(space, gt)
    scores = evaluate_cross_case(pred, gt, space, gt_map, (0.7, 0.7, 3.0))
    assert list(scores) == ["region:liver", "region:kidney", "region:pancreas", "region:spleen"]
    assert all(row["dice"] == 1.0 and row["hd95"] == 0.0 for row in scores.values())
    # kidney is left + right: predicting only the right kidney halves it
    half = pred.copy()
    half[gt == 3] = 0
    kidney = evaluate_cross_case(half, gt, space, gt_map, (0.7, 0.7, 3.0))["region:kidney"]
    assert kidney["dice"] == pytest.approx(2 * 16 / (16 + 32)) and kidney["gt_voxels"] == 32
    # BTCV is fully labelled for its organs: a liver predicted on the gallbladder is a false positive
    wrong = pred.copy()
    wrong[gt == 4] = space.leaf_id("liver")
    assert evaluate_cross_case(wrong, gt, space, gt_map, (0.7, 0.7, 3.0))["region:liver"]["dice"] < 1.0

    # the folder run: predictions named after the images pair with label files by number
    pred_dir = tmp_path / "pred"
    geom = Geometry.identity(gt.shape, (0.7, 0.7, 3.0))
    for n in (1, 2, 21):
        write_image(pred_dir / f"img{n:04d}.nii.gz", half if n == 21 else pred, geom)
    write_image(pred_dir / "img0001_probs.nii.gz", np.zeros(gt.shape, np.float32), geom)  # ignored
    out = tmp_path / "eval"
    summary = evaluate_with_map(pred_dir, public["btcv"], space, cmap, out_dir=out)
    assert summary["n_cases"] == 3 and summary["scored"] == list(scores)
    assert summary["cases"]["img0021"]["region:kidney"]["dice"] == pytest.approx(2 / 3)
    assert summary["classes"]["region:liver"]["dice"]["mean"] == 1.0
    assert set(summary["classes"]) == set(scores) and summary["not_scored"] == {}
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("case,class,dice,hd95,nsd") and len(rows) == 1 + 3 * 4
    assert not any(re.search(r"gallbladder|tumour|aorta", r) for r in rows)
    assert "Scored on the shared classes only: liver, kidney, pancreas, spleen" in (out / "summary.md").read_text()
    # evaluate's figures and case ranking (they were missing): the half kidney is the worst case, and the
    # pictures show the truth in the model's classes (BTCV's two kidneys as the kidney, its gallbladder not
    # at all) over the CT, which the dataset root gives
    assert summary["best_case"] == "img0001" and summary["worst_case"] == "img0021"
    assert summary["case_quality"]["img0021"] < summary["case_quality"]["img0001"]
    drawn = {"dice_boxplot", "hd95_boxplot", "nsd_boxplot", "overlay_best", "overlay_worst"}
    assert drawn <= set(summary["files"])
    assert all(Path(summary["files"][k]).read_bytes()[:4] == b"\x89PNG" for k in drawn)
    shown: dict[str, tuple[np.ndarray, np.ndarray, object]] = {}

    def capture(pred: np.ndarray, truth: np.ndarray, space: object, geometry: object, path: Path,
                title: str = "", image: object = None, **kwargs: object) -> Path:
        shown[path.stem] = (pred, truth, image)
        return path

    from unittest import mock

    with mock.patch("unionseg.evaluation.figures.overlay", capture):
        evaluate_with_map(pred_dir, public["btcv"], space, cmap, out_dir=out, overwrite=True)
    _, truth, image = shown["overlay_worst"]
    kidney = space.code("region:kidney")
    assert np.array_equal(truth == kidney, np.isin(gt, [2, 3])) and not truth[gt == 4].any()
    assert np.array_equal(truth == space.code("region:liver"), gt == 6) and image is not None
    # without figures, none is left from the run before beside tables they do not show (helper-103)
    evaluate_with_map(pred_dir, public["btcv"], space, cmap, out_dir=out, overwrite=True, figures=False)
    assert not (out / "figures").exists()
    # the label folder itself works as ground truth too; cases scored in worker processes score the same
    # (evaluate-cross had no --workers, on sets of hundreds of cases; helper-112)
    one = evaluate_with_map(pred_dir, public["btcv"] / "label", space, cmap)
    assert one["n_cases"] == 3
    two = evaluate_with_map(pred_dir, public["btcv"] / "label", space, cmap, workers=2)
    assert two["cases"] == one["cases"] and two["best_case"] == one["best_case"]
    # a map whose pancreas value no file holds (another dataset's numbering): said, not silently Dice 0
    # (WORD's map on BTCV read exit 0; helper-103)
    import yaml

    other = tmp_path / "other_numbering.yaml"
    other.write_text(yaml.safe_dump({"labels": {**{k: v for k, v in cmap.labels.items() if k != 11}, 11: "duct",
                                                14: "pancreas"}, "shared": dict(cmap.shared)}))
    with pytest.warns(UnionsegWarning, match=r"none of its 3 label files holds the value 14 that the map reads as "
                                             r"pancreas, so pancreas is scored against an empty truth in every case"):
        evaluate_with_map(pred_dir, public["btcv"], space, load_cross_map(other))
    # a prediction holding the same voxels stored LPS (first two axes flipped, affine to match) is
    # reoriented onto the truth's grid and scores as before, not refused
    flipped = np.ascontiguousarray(half[::-1, ::-1, :])
    lps = geom.affine @ np.array([[-1, 0, 0, gt.shape[0] - 1], [0, -1, 0, gt.shape[1] - 1], [0, 0, 1, 0],
                                  [0, 0, 0, 1]], dtype=float)
    write_image(pred_dir / "img0021.nii.gz", flipped, Geometry(gt.shape, lps), replace=True)
    moved = evaluate_with_map(pred_dir, public["btcv"], space, cmap, out_dir=tmp_path / "eval_lps")
    assert moved["cases"] == summary["cases"]


def test_cross_evaluation_twin_a_class_outside_the_shared_set_is_not_scored(tmp_path: Path) -> None:
    """A model without spleen: BTCV's spleen is dropped and reported; the model's own extra class (a
    tumour) and BTCV's other organs are never scored."""
    leaves = [Leaf("liver"), Leaf("liver_tumour", "liver"), Leaf("kidney"), Leaf("pancreas")]
    space = LabelSpace(leaves, [DatasetLabels("a", {1: "liver"}, ("liver", "liver_tumour", "kidney", "pancreas"))])
    cmap = load_cross_map(RECIPES / "btcv_eval.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class the model lacks is reported, not warned about
        gt_map, dropped = cmap.gt_map(space)
    assert dropped == {"spleen": "the model has no class 'region:spleen'"}
    # a misspelt class is dropped too (a map may serve several models), with a warning and the likely class
    typo = CrossMap("btcv", {6: "liver", 11: "pancreas"}, {"liver": "region:livr", "pancreas": "pancreas"})
    with pytest.warns(UnionsegWarning, match=r"shared.liver: 'region:livr' is not a class of the model, so liver "
                                             r"is not scored; did you mean 'region:liver'\?"):
        assert typo.gt_map(space) == ({11: "pancreas"}, {"liver": "the model has no class 'region:livr'; did you "
                                                                   "mean 'region:liver'?"})
    # a misspelt prefix too (it was compared with the leaf names whole, and got no hint; helper-103)
    prefix = CrossMap("btcv", {6: "liver", 11: "pancreas"}, {"liver": "regoin:liver", "pancreas": "pancreas"})
    with pytest.warns(UnionsegWarning, match=r"did you mean 'region:liver'\?"):
        prefix.gt_map(space)
    assert 1 not in gt_map and gt_map[6] == "region:liver"
    gt = btcv_label()
    pred = np.zeros(gt.shape, dtype=np.uint8)
    pred[gt == 6] = space.leaf_id("liver")
    pred[gt == 1] = space.leaf_id("liver_tumour")  # predicted where BTCV has the spleen: outside the liver
    scores = evaluate_cross_case(pred, gt, space, gt_map, (1.0, 1.0, 1.0))
    assert list(scores) == ["region:liver", "region:kidney", "region:pancreas"]
    assert "region:spleen" not in scores and "liver_tumour" not in scores
    assert scores["region:liver"]["dice"] < 1.0  # the stray tumour counts inside the liver region
    # the twin: with a spleen in the model the same map scores it
    assert "region:spleen" in evaluate_cross_case(pred, gt, _abdomen4_space(), cmap.gt_map(_abdomen4_space())[0],
                                                  (1.0, 1.0, 1.0))
    # a map naming a class the model lacks is refused when given directly
    with pytest.raises(ConfigError, match="'region:spleen' is not a class of the model"):
        evaluate_cross_case(pred, gt, space, {1: "region:spleen"}, (1.0, 1.0, 1.0))


def test_cross_evaluation_scores_the_liver_with_the_vessels_a_mots_model_keeps_apart(tmp_path: Path) -> None:
    """BTCV, AMOS and WORD label the vessels inside the liver as liver; a MOTS model predicts them as
    ``hepatic_vessel``. The shipped maps score the liver as the union of the two, so a perfect MOTS
    prediction scores liver Dice 1 (on ``region:liver`` alone a quarter of the liver predicted as vessel
    scores 2 x 0.75 / 1.75 = 0.857). A model without the vessel class is scored on its liver alone, without a warning."""
    mots = model_space_from(project=RECIPES / "mots.yaml")
    gt = btcv_label()
    pred = np.zeros(gt.shape, dtype=np.uint8)
    for value, leaf in ((1, "spleen"), (2, "kidney"), (3, "kidney"), (6, "liver"), (11, "pancreas")):
        pred[gt == value] = mots.leaf_id(leaf)
    liver = np.argwhere(gt == 6)
    vessel = tuple(liver[: len(liver) // 4].T)
    pred[vessel] = mots.leaf_id("hepatic_vessel")
    for name in ("btcv_eval.yaml", "amos_eval.yaml", "word_eval.yaml"):
        cmap = load_cross_map(RECIPES / name)
        assert cmap.shared["liver"] == "region:liver+hepatic_vessel"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert set(cmap.gt_map(_abdomen4_space())[0].values()) == {
                "region:liver", "region:kidney", "region:pancreas", "region:spleen"}
            gt_map, dropped = cmap.gt_map(mots)
        assert dropped == {} and "region:liver+hepatic_vessel" in gt_map.values()
    gt_map, _ = load_cross_map(RECIPES / "btcv_eval.yaml").gt_map(mots)
    scores = evaluate_cross_case(pred, gt, mots, gt_map, (0.7, 0.7, 3.0))
    assert list(scores) == ["region:liver+hepatic_vessel", "region:kidney", "region:pancreas", "region:spleen"]
    assert all(row["dice"] == 1.0 for row in scores.values()), scores
    only_liver = {v: ("region:liver" if k.startswith("region:liver") else k) for v, k in gt_map.items()}
    n = len(liver)
    assert evaluate_cross_case(pred, gt, mots, only_liver, (0.7, 0.7, 3.0))["region:liver"]["dice"] == \
        pytest.approx(2 * (n - n // 4) / (2 * n - n // 4))
    # the folder report names the union
    geom = Geometry.identity(gt.shape, (0.7, 0.7, 3.0))
    write_image(tmp_path / "pred" / "img0001.nii.gz", pred, geom)
    write_image(tmp_path / "gt" / "label0001.nii.gz", gt, geom)
    summary = evaluate_with_map(tmp_path / "pred", tmp_path / "gt", mots, RECIPES / "btcv_eval.yaml",
                                out_dir=tmp_path / "eval")
    assert summary["classes"]["region:liver+hepatic_vessel"]["dice"]["mean"] == 1.0
    assert "| liver+hepatic_vessel |" in (tmp_path / "eval" / "summary.md").read_text()
    # a misspelt member is left out with a warning; a list of none of the model's classes is dropped
    typo = CrossMap("btcv", {6: "liver"}, {"liver": "region:liver+hepatic_vessl"})
    with pytest.warns(UnionsegWarning, match=r"shared.liver: 'hepatic_vessl' is not a class of the model, so "
                                             r"liver is scored without it; did you mean 'hepatic_vessel'\?"):
        assert typo.gt_map(mots) == ({6: "region:liver"}, {})
    assert CrossMap("b", {6: "liver", 1: "spleen"}, {"liver": "aorta+vein", "spleen": "region:spleen"}).gt_map(
        mots)[1] == {"liver": "the model has no class of 'aorta', 'vein'"}
    # tables leave out "region:" per member; a class name cannot hold the '+' that joins a union
    from unionseg.evaluation.evaluate import display_key

    assert display_key("region:kidney+region:liver") == "kidney+liver"
    assert evaluate_cross_case(pred, gt, mots, {6: "region:liver+hepatic_vessel"}, (1.0, 1.0, 1.0),
                               metrics="dice") == {"region:liver+hepatic_vessel": {
                                   "dice": 1.0, "pred_voxels": len(liver), "gt_voxels": len(liver)}}
    with pytest.raises(ConfigError, match=r"invalid class name 'a\+b' .*no '\+'"):
        LabelSpace([Leaf("a+b"), Leaf("c")])
    # the file: a list or a '+' string; a list entry holding '+', or an empty list, is refused
    for entry, ok in (("[region:liver, hepatic_vessel]", True), ("region:liver + hepatic_vessel", True),
                      ("[region:liver+hepatic_vessel]", False), ("[]", False), ("[region:liver, 3]", False)):
        path = tmp_path / "map.yaml"
        path.write_text(f"labels: {{6: liver}}\nshared: {{liver: {entry}}}\n")
        if ok:
            assert load_cross_map(path).shared == {"liver": "region:liver+hepatic_vessel"}
        else:
            with pytest.raises(ConfigError, match=r"shared.liver: "):
                load_cross_map(path)


def test_cross_evaluation_errors_name_the_file(public: dict[str, Path], tmp_path: Path) -> None:
    space = _abdomen4_space()
    gt_map, _ = load_cross_map(RECIPES / "btcv_eval.yaml").gt_map(space)
    pred_dir = tmp_path / "pred"
    gt = btcv_label()
    geom = Geometry.identity(gt.shape, (0.7, 0.7, 3.0))
    for n in (1, 2):
        write_image(pred_dir / f"img{n:04d}.nii.gz", np.zeros(gt.shape, np.uint8), geom)
    with pytest.raises(DataError, match=r"no prediction for case 'label0021'"):
        evaluate_cross(pred_dir, public["btcv"] / "label", space, gt_map, gt_labels=BTCV_ORGANS)
    # two predictions that carry its number: said, not "no prediction" alone (helper-103)
    for name in ("scan_21", "ct21"):
        write_image(pred_dir / f"{name}.nii.gz", np.zeros(gt.shape, np.uint8), geom)
    with pytest.raises(DataError, match=r"no prediction for case 'label0021' .*: 2 predictions carry its number "
                                        r"\(ct21, scan_21\), so none is paired by number; name the right one "
                                        r"label0021.nii.gz"):
        evaluate_cross(pred_dir, public["btcv"] / "label", space, gt_map)
    for name in ("scan_21", "ct21"):
        (pred_dir / f"{name}.nii.gz").unlink()
    write_image(pred_dir / "img0021.nii.gz", np.zeros((4, 4, 4), np.uint8), geom.with_shape((4, 4, 4)))
    with pytest.raises(DataError, match="prediction grid differs") as exc:
        evaluate_cross(pred_dir, public["btcv"] / "label", space, gt_map)
    assert exc.value.path == pred_dir / "img0021.nii.gz"
    write_image(pred_dir / "img0021.nii.gz", np.zeros(gt.shape, np.uint8), geom, replace=True)
    summary = evaluate_cross(pred_dir, public["btcv"] / "label", space, gt_map, exclude=["label0021"])
    assert summary["n_cases"] == 2 and summary["excluded"] == ["label0021"]
    assert summary["unmatched_predictions"] == []  # the excluded case's prediction is not "unmatched"
    with pytest.warns(UnionsegWarning, match=r"exclude pattern 'img0021' matches no case id of .* \(they look like "
                                             r"'label0001'\)"):
        evaluate_cross(pred_dir, public["btcv"] / "label", space, gt_map, exclude=["img0021", "label0021"])
    # a pattern of the ids' form that matches none of them is not warned about: AMOS's MRI ids are spread
    # over its splits, and one split holds none of some of the map's ranges
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = evaluate_cross(pred_dir, public["btcv"] / "label", space, gt_map,
                                 exclude=["label0021", "label05[1-9][0-9]", "label0600"])
    assert summary["excluded"] == ["label0021"]
    # maps whose recorded value names the model's space reads otherwise (classes in another order): refused;
    # in the model's order they score as the plain maps do
    marked = tmp_path / "marked"
    for n in (1, 2, 21):
        write_image(marked / f"img{n:04d}.nii.gz", np.zeros(gt.shape, np.uint8), geom, label_names=space.names)
    assert evaluate_cross(marked, public["btcv"] / "label", space, gt_map)["classes"] == \
        evaluate_cross(pred_dir, public["btcv"] / "label", space, gt_map)["classes"]
    write_image(marked / "img0002.nii.gz", np.zeros(gt.shape, np.uint8), geom,
                label_names=[space.names[0], *space.names[1:][::-1]], replace=True)
    with pytest.raises(ConfigError, match=r"img0002\.nii\.gz was written by a model whose label values mean"):
        evaluate_cross(marked, public["btcv"] / "label", space, gt_map)
    # the ground truth given as the predictions would score a perfect 1: refused
    with pytest.raises(DataError, match="is the ground-truth file"):
        evaluate_cross(public["btcv"] / "label", public["btcv"] / "label", space, gt_map)
    # a value BTCV does not declare
    labels = tmp_path / "labels"
    shutil.copytree(public["btcv"] / "label", labels)
    odd = gt.copy()
    odd[0, 0, 0] = 14
    write_image(labels / "label0002.nii.gz", odd, geom, replace=True)
    with pytest.raises(DataError, match=r"label values \[14\] are not in the evaluation set's labels") as exc:
        evaluate_cross(pred_dir, labels, space, gt_map, gt_labels=BTCV_ORGANS)
    assert exc.value.path == labels / "label0002.nii.gz"
    bad_map = tmp_path / "bad.yaml"
    bad_map.write_text("labels: {1: spleen}\nshared: {spleeen: region:spleen}\n")
    with pytest.raises(ConfigError, match=r"shared.spleeen: not an organ of 'labels'"):
        load_cross_map(bad_map)


def test_evaluate_cross_command(public: dict[str, Path], tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from unionseg.evaluation import crossmap

    app = typer.Typer()

    @app.callback()
    def _main() -> None:
        """unionseg (test app)."""

    crossmap.register(app)
    space = _abdomen4_space()
    gt = btcv_label()
    geom = Geometry.identity(gt.shape, (0.7, 0.7, 3.0))
    for n in (1, 2, 21):
        write_image(tmp_path / "pred" / f"img{n:04d}.nii.gz", _perfect_abdomen4_prediction(space, gt), geom)
    args = ["evaluate-cross", str(tmp_path / "pred"), str(public["btcv"]), "--map", str(RECIPES / "btcv_eval.yaml"),
            "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--project", str(RECIPES / "abdomen4.yaml")])  # no roots needed
    assert result.exit_code == 0, result.output
    assert "btcv" in result.output and "3 cases" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["scored"] == ["region:liver", "region:kidney", "region:pancreas", "region:spleen"]
    # the label space must come from exactly one of --project / --model
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "exactly one of --project or --model" in str(result.exception)


@pytest.mark.slow
def test_mots_miniature_prepares_and_trains_a_few_dodnet_steps(public: dict[str, Path], tmp_path: Path) -> None:
    """The issue's acceptance run: the MOTS recipe on the miniatures (roots from a user file, cache beside
    it), prepare, then two DoDNet steps with validation, on a tiny network."""
    import os

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(RECIPES / "mots.yaml", work / "mots.yaml")
    lines = ["roots:"] + [f"  {n}: {public[n]}" for n in MOTS_NAMES]
    (work / "roots.yaml").write_text("\n".join([*lines, "cache_dir: cache"]) + "\n")
    assert run(["prepare", str(work / "mots.yaml"), "--workers", "0"]) == 0
    assert (work / "cache" / "mots" / "index.json").is_file()
    out = tmp_path / "runs" / "mots"
    code = run(["train", str(work / "mots.yaml"), "--method", "dodnet", "-o", str(out), "--quiet",
                "steps=2", "val_every=2", "val_max_cases=1", "ckpt_every=2", "network.preset=tiny", "data.patch_size=[8,8,8]",
                "data.batch_size=2", "amp=false", "device=cpu"])
    assert code == 0
    assert (out / "model.pt").is_file(), os.listdir(out)
    # the model file carries its label space: cross-evaluation can take it instead of the project
    space = model_space_from(model=out / "model.pt")
    assert space.names == load_project(work / "mots.yaml").label_space.names
    assert load_cross_map(RECIPES / "btcv_eval.yaml").gt_map(space)[1] == {}


def test_two_cases_that_carry_one_number_are_named_when_no_prediction_pairs(tmp_path: Path) -> None:
    """Cases ``a_1`` and ``b_1`` and one prediction ``x_1``: pairing by number is ambiguous, which the error
    says (it said only "no prediction for case")."""
    from unionseg.evaluation.crossmap import pair_predictions

    geom = Geometry.identity((2, 2, 2), (1.0, 1.0, 1.0))
    write_image(tmp_path / "pred" / "x_1.nii.gz", np.zeros((2, 2, 2), np.uint8), geom)
    cases = {c: (tmp_path / f"{c}.nii.gz", (c,)) for c in ("a_1", "b_1")}
    with pytest.raises(DataError, match=r"no prediction for case 'a_1' and 1 more .*: the cases a_1, b_1 carry the "
                                        r"same number, so no prediction is paired with them by number"):
        pair_predictions(tmp_path / "pred", cases)
