"""Evaluation: metrics against independent computations, empty-mask rules, partial-label scoring, folder
evaluation end to end, and the ``evaluate`` command."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from unionseg.errors import ConfigError, DataError, OutputExistsError
from unionseg.evaluation.evaluate import evaluate_case, evaluate_folder, markdown_table, validation_dice
from unionseg.evaluation.metrics import (
    BOTH_EMPTY,
    GT_EMPTY,
    PRED_EMPTY,
    dice,
    hd95,
    hd95_penalty,
    nsd,
    score_masks,
    surface_distances,
)
from unionseg.labels import LabelSpace

SPACING = (0.8, 1.3, 2.5)


def _blob(shape: tuple[int, ...], seed: int, level: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
    return field > level * field.std()


def _brute_force(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Surface points by explicit 6-neighbour test on a zero-padded copy; nearest neighbours with cKDTree."""

    def surface(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        interior = padded.copy()
        for axis in range(3):
            interior &= np.roll(padded, 1, axis) & np.roll(padded, -1, axis)
        return np.argwhere(mask & ~interior[1:-1, 1:-1, 1:-1]) * np.asarray(spacing)

    sp, sg = surface(pred), surface(gt)
    return cKDTree(sg).query(sp)[0], cKDTree(sp).query(sg)[0]


# ---------------------------------------------------------------------- metrics vs independent computations
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_and_nsd_match_brute_force_and_monai(seed: int) -> None:
    shape = (22, 18, 12)
    pred, gt = _blob(shape, seed), _blob(shape, seed + 100)
    assert pred.any() and gt.any() and pred[0].any()  # touches the image border too
    d_pg, d_gp = _brute_force(pred, gt, SPACING)
    ref_hd = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    tol = 1.73
    ref_nsd = (np.sum(d_pg <= tol) + np.sum(d_gp <= tol)) / (d_pg.size + d_gp.size)
    ours_pg, ours_gp = surface_distances(pred, gt, SPACING)
    np.testing.assert_allclose(np.sort(ours_pg), np.sort(d_pg), atol=1e-9)
    np.testing.assert_allclose(np.sort(ours_gp), np.sort(d_gp), atol=1e-9)
    assert hd95(pred, gt, SPACING).value == pytest.approx(ref_hd, abs=1e-9)
    assert nsd(pred, gt, SPACING, tol).value == pytest.approx(ref_nsd, abs=1e-12)
    assert dice(pred, gt).value == pytest.approx(2 * np.sum(pred & gt) / (pred.sum() + gt.sum()))

    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    y_pred = torch.as_tensor(pred[None, None])
    y = torch.as_tensor(gt[None, None])
    monai_hd = metrics.compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                  spacing=list(SPACING))
    monai_nsd = metrics.compute_surface_dice(y_pred, y, class_thresholds=[tol], include_background=True,
                                             spacing=list(SPACING))
    assert hd95(pred, gt, SPACING).value == pytest.approx(float(monai_hd), rel=1e-5)
    assert nsd(pred, gt, SPACING, tol).value == pytest.approx(float(monai_nsd), rel=1e-5)


def test_spacing_matters_and_crop_is_exact() -> None:
    """Anisotropic spacing changes HD95 the physical way; a mask in a huge empty volume scores the same."""
    gt = np.zeros((30, 30, 30), bool)
    gt[10:15, 10:15, 10:15] = True
    pred = np.roll(gt, 3, axis=2)  # shifted 3 voxels along z
    assert hd95(pred, gt, (1.0, 1.0, 1.0)).value == pytest.approx(3.0)
    assert hd95(pred, gt, (1.0, 1.0, 2.5)).value == pytest.approx(7.5)
    big_p, big_g = np.zeros((90, 80, 70), bool), np.zeros((90, 80, 70), bool)
    big_p[40:70, 30:60, 20:50], big_g[40:70, 30:60, 20:50] = pred, gt
    assert hd95(big_p, big_g, SPACING).value == pytest.approx(hd95(pred, gt, SPACING).value)
    assert nsd(big_p, big_g, SPACING, 2.0).value == pytest.approx(nsd(pred, gt, SPACING, 2.0).value)


def test_a_distance_equal_to_the_tolerance_counts_as_within_it() -> None:
    """Three 0.8 mm voxels are 2.4000000000000004 mm in floating point: at tau = 2.4 the shifted surfaces
    scored 0.88 where MONAI, and the definition, give 1."""
    gt = np.zeros((20, 20, 20), bool)
    gt[5:12, 5:12, 5:12] = True
    pred = np.roll(gt, 3, axis=0)
    assert nsd(pred, gt, (0.8, 0.8, 0.8), 2.4).value == 1.0
    assert nsd(pred, gt, (0.8, 0.8, 0.8), 2.39).value < 1.0


# ---------------------------------------------------------------------- empty-mask rules, both ways
def test_empty_rules() -> None:
    shape = (10, 12, 8)
    empty = np.zeros(shape, bool)
    full = np.zeros(shape, bool)
    full[2:6, 3:7, 2:5] = True
    penalty = hd95_penalty(shape, SPACING)
    assert penalty == pytest.approx(np.sqrt((10 * 0.8) ** 2 + (12 * 1.3) ** 2 + (8 * 2.5) ** 2))

    both = score_masks(empty, empty, SPACING)
    assert both.values == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0} and both.empty == BOTH_EMPTY
    missed = score_masks(empty, full, SPACING)
    assert missed.values == {"dice": 0.0, "hd95": penalty, "nsd": 0.0} and missed.empty == PRED_EMPTY
    hallucinated = score_masks(full, empty, SPACING)
    assert hallucinated.values == {"dice": 0.0, "hd95": penalty, "nsd": 0.0} and hallucinated.empty == GT_EMPTY
    assert hd95(empty, full, SPACING).empty == PRED_EMPTY and nsd(full, empty, SPACING).empty == GT_EMPTY
    assert dice(empty, empty) .empty == BOTH_EMPTY

    # twins: non-empty masks are not decided by a rule, and give the measured values
    perfect = score_masks(full, full, SPACING)
    assert perfect.values == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0} and perfect.empty is None
    apart = np.zeros(shape, bool)
    apart[7:9, 8:11, 5:7] = True
    far = score_masks(apart, full, SPACING)
    assert far.empty is None and far.values["dice"] == 0.0 and far.values["nsd"] == 0.0
    assert 0 < far.values["hd95"] < penalty
    assert all(np.isfinite(v) for s in (both, missed, hallucinated, far) for v in s.values.values())


def test_invalid_inputs_rejected() -> None:
    a = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.ones((4, 4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        nsd(a, a, (1.0, 1.0, 1.0), -1.0)
    with pytest.raises(ValueError, match="unknown metric"):
        score_masks(a, a, (1.0, 1.0, 1.0), metrics=("dice", "iou"))
    assert score_masks(a, a, (1.0, 1.0, 1.0), metrics=("dice",)).values == {"dice": 1.0}


# ---------------------------------------------------------------------- case evaluation
def _case(space: LabelSpace) -> tuple[np.ndarray, np.ndarray]:
    """GT (global codes) with liver + tumour; prediction with liver, tumour and a kidney."""
    gt = np.zeros((16, 14, 10), np.uint8)
    gt[2:10, 2:10, 2:8] = space.leaf_id("liver")
    gt[4:6, 4:6, 4:6] = space.leaf_id("liver_tumour")
    pred = gt.copy()
    pred[9, 2:10, 2:8] = 0  # one slab missed
    pred[11:15, 10:13, 3:7] = space.leaf_id("kidney")
    return pred, gt


def test_partially_labelled_truth_scored_only_on_annotated_classes(space: LabelSpace) -> None:
    pred, gt = _case(space)
    scores = evaluate_case(pred, gt, space.annotated_leaf_mask("liver"), space, SPACING)
    assert list(scores) == ["region:liver", "liver_tumour"]
    assert 0.8 < scores["region:liver"]["dice"] < 1.0
    assert scores["liver_tumour"]["dice"] == 1.0
    assert validation_dice(pred, gt, space.annotated_leaf_mask("liver"), space).keys() == scores.keys()

    # twin: the same truth declared fully labelled scores the kidney (hallucinated: gt_empty rule) too
    full = evaluate_case(pred, gt, space.full_mask(), space, SPACING)
    assert set(full) == set(space.evaluation_keys())
    assert full["region:kidney"]["dice"] == 0.0 and full["region:kidney"]["gt_voxels"] == 0
    assert full["region:kidney"]["hd95"] == pytest.approx(hd95_penalty(gt.shape, SPACING))
    assert full["region:spleen"] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "pred_voxels": 0.0, "gt_voxels": 0.0}


def test_evaluate_case_takes_a_geometry_and_names_a_bad_spacing_or_mask(space: LabelSpace) -> None:
    """From Python, spacing=geometry failed inside float(), and annotated="liver" read as a shape () mask
    (helper-70): a Geometry gives its spacing, the rest is named."""
    from unionseg.data.io import Geometry

    pred, gt = _case(space)
    by_numbers = evaluate_case(pred, gt, space.full_mask(), space, SPACING)
    geometry = Geometry(gt.shape, np.diag([*SPACING, 1.0]))
    assert evaluate_case(pred, gt, space.full_mask(), space, geometry) == by_numbers
    for bad in ((1.0, 1.0), (1.0, 0.0, 2.0), "1mm", None):
        with pytest.raises(ValueError, match="spacing: expected the voxel size in mm along X, Y, Z"):
            evaluate_case(pred, gt, space.full_mask(), space, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"annotated: the truth's annotated-leaf mask, not a name "
                                         r"\(space.annotated_leaf_mask\('liver'\)"):
        evaluate_case(pred, gt, "liver", space, SPACING)  # type: ignore[arg-type]


def test_region_masks_include_parts_and_region_codes(space: LabelSpace) -> None:
    kidney, tumour = space.leaf_id("kidney"), space.leaf_id("kidney_tumour")
    region_code = space.code("region:kidney")
    assert region_code >= space.n_leaves
    gt = np.zeros((12, 12, 8), np.uint8)
    gt[2:10, 2:10, 2:6] = region_code  # a set that does not separate the tumour
    pred = np.zeros_like(gt)
    pred[2:10, 2:10, 2:6] = kidney
    pred[4:6, 4:6, 3:5] = tumour
    annotated = space.annotated_leaf_mask("kidney")
    scores = evaluate_case(pred, gt, annotated, space, SPACING)
    # region = organ leaf + tumour leaf in the prediction, organ + tumour + region code in the truth
    assert scores["region:kidney"]["dice"] == 1.0 and scores["region:kidney"]["hd95"] == 0.0
    assert "kidney_tumour" not in scores  # the truth cannot say where the tumour is
    assert validation_dice(pred, gt, annotated, space) == {"region:kidney": 1.0}

    # twin: the same volume with separated leaves scores the tumour, and the region still counts both leaves
    gt_leaves = pred.copy()
    gt_leaves[4:6, 4:6, 3:5] = kidney  # the truth says: no tumour there
    scores = evaluate_case(pred, gt_leaves, annotated, space, SPACING)
    assert scores["region:kidney"]["dice"] == 1.0
    assert scores["kidney_tumour"]["dice"] == 0.0 and scores["kidney_tumour"]["gt_voxels"] == 0


def test_validation_dice_matches_evaluate_case(space: LabelSpace) -> None:
    rng = np.random.default_rng(3)
    gt = rng.integers(0, space.n_codes, size=(9, 8, 7)).astype(np.uint8)
    gt[gt == space.code("region:liver")] = 0  # keep liver_tumour scorable
    pred = rng.integers(0, space.n_leaves, size=(9, 8, 7)).astype(np.uint8)
    full = evaluate_case(pred, gt, space.full_mask(), space, SPACING, metrics=("dice",))
    fast = validation_dice(pred, gt, space.full_mask(), space)
    assert fast.keys() == full.keys() and "liver_tumour" in fast and "kidney_tumour" not in fast
    for key in fast:
        assert fast[key] == pytest.approx(full[key]["dice"])
    with pytest.raises(ValueError, match="leaf ids"):
        validation_dice(np.full_like(pred, space.n_leaves), gt, space.full_mask(), space)


# ---------------------------------------------------------------------- folders, files, CLI
PROJECT = """\
name: tiny
classes:
  - liver
  - {name: liver_tumour, part_of: liver}
  - kidney
datasets:
  - name: liver
    root: datasets/liver
    labels: {1: liver, 2: liver_tumour}
    annotated: [liver, liver_tumour]
  - name: test
    root: datasets/test
    role: test
    labels: {1: liver, 2: liver_tumour, 3: kidney}
    annotated: [liver, liver_tumour, kidney]
preprocessing: {spacing: [2.0, 2.0, 2.0]}
"""
AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.2, 0, 5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
SHAPE = (16, 14, 10)


def _write_dataset(root: Path, labels: dict[str, np.ndarray], names: dict[str, str]) -> None:
    from unionseg.data.io import Geometry, write_image

    geom = Geometry(SHAPE, AFFINE)
    training = []
    for case, lab in labels.items():
        image = np.where(lab > 0, 60.0, -100.0).astype(np.float32)
        write_image(root / "imagesTr" / f"{case}.nii.gz", image, geom)
        write_image(root / "labelsTr" / f"{case}.nii.gz", lab.astype(np.uint8), geom)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", **names}, "training": training}))


@pytest.fixture()
def tiny_project(tmp_path: Path) -> Path:
    """Project with a partial liver set and a fully labelled test set (local 1 liver, 2 tumour, 3 kidney);
    predictions (global ids: 1 liver, 2 liver_tumour, 3 kidney) in tmp_path/preds."""
    from unionseg.data.io import Geometry, write_image

    (tmp_path / "project.yaml").write_text(PROJECT)
    truths, preds = {}, {}
    for i in range(3):
        lab = np.zeros(SHAPE, np.uint8)
        lab[2 + i:10, 2:10, 2:8] = 1
        lab[4:6, 4:6, 4:6] = 2
        lab[11:15, 9:13, 3:7] = 3
        truths[f"case_{i}"] = lab
        pred = lab.copy()
        if i == 1:
            pred[2, 2:10, 2:8] = 1  # one extra liver slab
        if i == 2:
            pred[pred == 3] = 0  # kidney missed: pred_empty rule
        preds[f"case_{i}"] = pred
    _write_dataset(tmp_path / "datasets" / "test", truths, {"1": "liver", "2": "tumour", "3": "kidney"})
    _write_dataset(tmp_path / "datasets" / "liver", {"liver_0": np.where(truths["case_0"] == 3, 0, truths["case_0"])},
                   {"1": "liver", "2": "tumour"})
    geom = Geometry(SHAPE, AFFINE)
    for case, pred in preds.items():
        write_image(tmp_path / "preds" / f"{case}.nii.gz", pred, geom)
    write_image(tmp_path / "preds" / "liver_0.nii.gz", preds["case_0"], geom)
    return tmp_path


def test_the_summary_names_its_files_by_absolute_paths(tiny_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """summary.json gave "predictions" and "ground_truth" as absolute paths but its own files relative to the
    folder evaluate ran in, which a reader elsewhere could not open."""
    monkeypatch.chdir(tiny_project)
    summary = evaluate_folder(Path("preds"), Path("datasets/test/labelsTr"), Path("project.yaml"), None,
                              Path("eval"), figures=False)
    saved = json.loads((tiny_project / "eval" / "summary.json").read_text())
    for files in (summary["files"], saved["files"]):
        assert files and all(Path(f).is_absolute() and Path(f).is_file() for f in files.values()), files


def test_evaluate_folder_end_to_end(tiny_project: Path) -> None:
    import nibabel as nib

    root = tiny_project
    out = root / "eval"
    # predict --probabilities writes case_0_probs (4D) beside case_0: not an unmatched prediction
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 2), np.float32), AFFINE), str(root / "preds" / "case_0_probs.nii.gz"))
    summary = evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml",
                              None, out, tolerance_mm=2.0, workers=2, progress=True)
    assert summary["dataset"] == "test" and summary["n_cases"] == 3
    for name in ("metrics.csv", "summary.json", "summary.md", "figures/dice_boxplot.png", "figures/hd95_boxplot.png",
                 "figures/nsd_boxplot.png", "figures/overlay_best.png", "figures/overlay_worst.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 3 * 3  # cases x (region:liver, region:kidney, liver_tumour)
    missed = [r for r in rows if r["case"] == "case_2" and r["class"] == "region:kidney"]
    assert missed[0]["empty_rule"] == PRED_EMPTY and float(missed[0]["dice"]) == 0.0
    saved = json.loads((out / "summary.json").read_text())
    kidney = saved["classes"]["region:kidney"]
    assert kidney["empty_rule_cases"][PRED_EMPTY] == 1 and kidney["dice"]["n"] == 3
    assert kidney["dice"]["mean"] == pytest.approx(2 / 3)
    assert saved["cases"]["case_0"]["region:liver"]["dice"] == 1.0
    counts = [row[k] for case in saved["cases"].values() for row in case.values() for k in ("pred_voxels", "gt_voxels")]
    assert counts and all(type(n) is int for n in counts)  # voxel counts, not 384.0
    assert saved["best_case"] == "case_0" and saved["worst_case"] == "case_2"
    assert saved["case_quality_measure"] == "mean dice over the case's classes (higher is better)"
    assert saved["case_quality"]["case_0"] > saved["case_quality"]["case_2"]
    assert saved["unmatched_predictions"] == ["liver_0"]
    md = (out / "summary.md").read_text()
    assert "| class | Dice | HD95 (mm) | NSD (2 mm) |" in md and "| kidney | 0.667 ± 0.471 |" in md
    # HD95 with its median: a missed organ's penalty (the image diagonal) rules the mean (helper-71)
    hd = saved["classes"]["region:kidney"]["hd95"]
    assert f"| {hd['mean']:.2f} ± {hd['std']:.2f} (median {hd['median']:.2f}) |" in md

    # serial run gives the same numbers (parallel path, with the progress bar, above)
    serial = evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml",
                             None, root / "eval_serial", figures=False)
    assert serial["cases"] == summary["cases"]
    assert not (root / "eval_serial" / "figures").exists()
    # an earlier evaluation's reports are replaced only with overwrite (they were replaced silently), and
    # the refusal comes before any case is scored
    before = (out / "summary.json").read_bytes()
    with pytest.raises(OutputExistsError, match="earlier evaluation .*--overwrite"):
        evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml", None, out,
                        figures=False)
    assert (out / "summary.json").read_bytes() == before
    # --no-figures into the first run's folder removes its figures, which would show the old predictions
    # beside the new tables; a file of the user's in figures/ stays
    (out / "figures" / "mine.txt").write_text("keep")
    evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml", None, out,
                    figures=False, overwrite=True)
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["mine.txt"]
    # no folder: nothing written, the summary returned (it wrote ./evaluation)
    unwritten = evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml")
    assert unwritten["cases"] == summary["cases"] and unwritten["files"] == {}


def test_evaluate_never_replaces_a_run_summary_and_names_a_file_given_as_folder(
        tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``-o`` naming a training run replaced the run's summary.json (``info`` then read the run as
    unfinished), even without any flag; now refused, with --overwrite too. ``-o`` naming a file was found
    only after every case was scored."""
    from unionseg.cli import run

    root = tiny_project
    run_dir = root / "runs" / "dodnet"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"method": "dodnet", "steps": 10}')
    args = ["evaluate", str(root / "preds"), str(root / "datasets" / "test" / "labelsTr"), "-p",
            str(root / "project.yaml"), "--no-figures", "--quiet"]
    for extra in ([], ["--overwrite"]):
        assert run([*args, "-o", str(run_dir), *extra]) == 2
        assert "not an evaluation's summary" in capsys.readouterr().err
    assert (run_dir / "summary.json").read_text() == '{"method": "dodnet", "steps": 10}'
    # an unfinished run (no summary.json yet): its folder would have gained an evaluation's summary.json,
    # which `info` and `--resume` read as the run's own ("finished")
    running = root / "runs" / "naive"
    running.mkdir()
    (running / "config.yaml").write_text("method: naive\n")
    (running / "last.pt").write_bytes(b"checkpoint")
    for extra in ([], ["--overwrite"]):
        assert run([*args, "-o", str(running), *extra]) == 2
        assert "is a training run folder (last.pt); write the evaluation into a folder of its own" \
            in capsys.readouterr().err
    assert sorted(p.name for p in running.iterdir()) == ["config.yaml", "last.pt"]
    (root / "afile").write_text("x")
    assert run([*args, "-o", str(root / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert run([*args, "-o", str(root / "ev")]) == 0
    assert run([*args, "-o", str(root / "ev")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run([*args, "-o", str(root / "ev"), "--overwrite"]) == 0


def test_evaluate_refuses_a_dataset_it_cannot_score_and_writes_strict_json(tiny_project: Path) -> None:
    """A dataset annotating an organ without its tumour has no class to score: evaluate exited 0 with an
    empty table and ``NaN`` in summary.json, which is not JSON. Now an error names the dataset and why; and
    a value without a number is written null."""
    import yaml

    from unionseg.jsonfile import dumps

    root = tiny_project
    raw = yaml.safe_load((root / "project.yaml").read_text())
    for entry in raw["datasets"]:
        if entry["name"] == "liver":
            entry["annotated"], entry["labels"] = ["liver"], {1: "liver"}
    (root / "noscore.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match=r"no class of dataset 'liver' can be scored: .*annotated lists 'liver'"):
        evaluate_folder(root / "preds", root / "datasets" / "liver" / "labelsTr", root / "noscore.yaml",
                        "liver", root / "never")
    assert not (root / "never").exists()
    assert json.loads(dumps({"a": float("nan"), "b": [np.float32(0.5), float("inf")]})) == {"a": None, "b": [0.5, None]}


@pytest.mark.parametrize("fails", ["write", "rename"])
def test_reports_are_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 fails: str) -> None:
    """metrics.csv and the summaries go through jsonfile.write_text: a failed write (a full disk, which names
    no file) names the report, a failed rename keeps the earlier file, and neither leaves a temporary."""
    import errno
    import io

    from unionseg.jsonfile import write_text

    target = tmp_path / "summary.md"
    target.write_text("earlier")
    broken = "open" if fails == "write" else "replace"
    real = getattr(Path, broken)

    class Full(io.FileIO):
        def write(self, data: Any) -> int:
            super().write(b"half")  # a part written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    def fail(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name.startswith(".summary.md."):
            if fails == "write":
                return Full(str(self), "wb")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, broken, fail)
    with pytest.raises(OSError) as failed:
        write_text(target, "new")
    assert failed.value.errno == errno.ENOSPC
    assert failed.value.filename == (str(target) if fails == "write" else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"] and target.read_text() == "earlier"


def test_an_external_test_set_is_scored_from_a_project_without_training_data(tiny_project: Path) -> None:
    """Scoring a hospital's test set needs its label map and the classes, not a training dataset: a project
    holding only a ``role: test`` dataset was refused ("at least one dataset needs role: train"); prepare and
    train still refuse it."""
    import yaml

    from unionseg.config import load_project

    root = tiny_project
    raw = yaml.safe_load((root / "project.yaml").read_text())
    raw["datasets"] = [d for d in raw["datasets"] if d.get("role") == "test"]
    (root / "external.yaml").write_text(yaml.safe_dump(raw))
    summary = evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "external.yaml")
    reference = evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml")
    assert summary["cases"] == reference["cases"] and summary["n_cases"] == 3
    with pytest.raises(ConfigError, match="at least one dataset needs role: train"):
        load_project(root / "external.yaml")


def test_evaluate_folder_partial_truth_scores_annotated_only(tiny_project: Path) -> None:
    root = tiny_project
    summary = evaluate_folder(root / "preds", root / "datasets" / "liver" / "labelsTr", root / "project.yaml",
                              None, root / "eval_liver", figures=False)
    assert summary["dataset"] == "liver"
    assert list(summary["cases"]["liver_0"]) == ["region:liver", "liver_tumour"]  # the predicted kidney is ignored
    # twin: declaring the truth as the fully labelled test set would score the kidney (and punish it)
    from unionseg.errors import UnionsegWarning

    with pytest.warns(UnionsegWarning, match="they are case files of dataset 'liver': pass --dataset liver"):
        forced = evaluate_folder(root / "preds", root / "datasets" / "liver" / "labelsTr", root / "project.yaml",
                                 "test", root / "eval_forced", figures=False)
    assert forced["cases"]["liver_0"]["region:kidney"]["empty_rule"] == GT_EMPTY


def test_evaluate_folder_accepts_a_prediction_stored_in_another_orientation(tiny_project: Path) -> None:
    """The same world grid stored LPS (first two axes flipped, affine to match) scores exactly as stored
    like its ground truth: the prediction is reoriented, not refused."""
    import nibabel as nib

    from unionseg.data.io import Geometry, read_image, write_image

    root = tiny_project
    gt_dir = root / "datasets" / "test" / "labelsTr"
    reference = evaluate_folder(root / "preds", gt_dir, root / "project.yaml", None, root / "e0", figures=False)
    pred, geom = read_image(root / "preds" / "case_1.nii.gz")
    flip = nib.orientations.axcodes2ornt(("L", "P", "S"))
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(geom.affine), flip)
    lps = nib.orientations.apply_orientation(pred, ornt)
    affine = geom.affine @ nib.orientations.inv_ornt_aff(ornt, geom.shape)
    write_image(root / "preds" / "case_1.nii.gz", np.ascontiguousarray(lps), Geometry(lps.shape, affine), replace=True)
    assert "".join(nib.aff2axcodes(nib.load(str(root / "preds" / "case_1.nii.gz")).affine)) == "LPS"
    moved = evaluate_folder(root / "preds", gt_dir, root / "project.yaml", None, root / "e1", figures=False)
    assert moved["cases"] == reference["cases"]
    # stored LPS AND shifted by 2 mm: refused, and the message names the shift of the reoriented grid, not
    # the shape and axes that differ only in how the file stores them
    shifted = affine.copy()
    shifted[2, 3] += 2.0
    write_image(root / "preds" / "case_1.nii.gz", np.ascontiguousarray(lps), Geometry(lps.shape, shifted), replace=True)
    with pytest.raises(DataError, match="grid differs") as refused:
        evaluate_folder(root / "preds", gt_dir, root / "project.yaml", None, root / "e2", figures=False)
    said = str(refused.value)
    assert f"stored LPS, and once reoriented to {geom.orientation()}: origin" in said, said
    assert "(2 mm apart)" in said and "shape" not in said and "axis directions" not in said, said


def test_evaluate_folder_errors(tiny_project: Path) -> None:
    from unionseg.data.io import Geometry, write_image

    root = tiny_project
    gt_dir = root / "datasets" / "test" / "labelsTr"
    (root / "preds" / "case_1.nii.gz").unlink()
    with pytest.raises(DataError, match="no prediction for case 'case_1'"):
        evaluate_folder(root / "preds", gt_dir, root / "project.yaml", None, root / "e1", figures=False)
    write_image(root / "preds" / "case_1.nii.gz", np.zeros(SHAPE, np.uint8), Geometry(SHAPE, AFFINE * 1.01))
    with pytest.raises(DataError, match="grid differs") as info:
        evaluate_folder(root / "preds", gt_dir, root / "project.yaml", None, root / "e2", figures=False)
    assert "preds/case_1.nii.gz" in str(info.value) and "labelsTr/case_1.nii.gz" in str(info.value)
    # the message says what differs: it printed both grids at 4 digits, two identical lines for a turn of
    # 5 degrees or a shift of 0.02 mm
    from unionseg.evaluation.evaluate import grid_difference

    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(np.radians(5)), -np.sin(np.radians(5))], [np.sin(np.radians(5)), np.cos(np.radians(5))]]
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.02
    said = grid_difference(Geometry(SHAPE, turn @ AFFINE), Geometry(SHAPE, AFFINE))
    assert "an axis turned by 5 deg" in said and "shape" not in said and "spacing" not in said
    said = grid_difference(Geometry(SHAPE, shifted), Geometry(SHAPE, AFFINE))
    assert said == "origin (-9.98, 5, 30) vs (-10, 5, 30) mm (0.02 mm apart)"
    # a spacing within the tolerance that adds up to 0.66 voxel over 512 voxels: refused (it was scored as if
    # on the truth's grid, a prediction one voxel off at the far end scoring Dice 1; helper-107)
    from unionseg.evaluation.evaluate import on_truth_grid

    long_gt, long_pred = Geometry.identity((512, 4, 3), (0.7, 0.7, 5.0)), Geometry.identity((512, 4, 3), (0.7009, 0.7, 5.0))
    with pytest.raises(DataError, match=r"spacing \(0.7009, 0.7, 5\) vs \(0.7, 0.7, 5\) mm; a voxel placed up to 0.46 mm "
                                        r"\(0.66 voxels\) apart at the grid's corners \(at most 0.1 voxel passes\)"):
        on_truth_grid(np.zeros((512, 4, 3), np.uint8), long_pred, long_gt, Path("p.nii.gz"), Path("g.nii.gz"))
    # a value outside the leaf ids is named, not the largest valid one (it said "holds value 3" for a -1)
    bad = np.zeros(SHAPE, np.int16)
    bad[0, 0, 0], bad[1, 1, 1] = -1, 3
    write_image(root / "preds" / "case_1.nii.gz", bad, Geometry(SHAPE, AFFINE), replace=True)
    with pytest.raises(DataError, match=r"prediction holds value\(s\) -1 outside the leaf ids of this project "
                                        r"\(0\.\.3\)"):
        evaluate_folder(root / "preds", gt_dir, root / "project.yaml", None, root / "e2", figures=False)
    outside = root / "elsewhere"
    outside.mkdir()
    with pytest.raises(ConfigError, match="--dataset"):
        evaluate_folder(root / "preds", outside, root / "project.yaml", None, root / "e3", figures=False)
    # CT images given as the truth: their values are named, with what they look like (helper-71)
    from unionseg.evaluation.evaluate import label_range_problem

    assert label_range_problem(0, 255) is None
    assert label_range_problem(-1024, 1500) == ("label value -1024 is outside 0..255; negative values are a CT "
                                                "image's: is this the image folder, not the labels?")
    assert label_range_problem(0, 300) == "label value 300 is outside 0..255"


def test_the_ground_truth_given_as_predictions_is_refused_not_scored_perfect(tiny_project: Path) -> None:
    """The truth folder given twice, a link to it, or predictions that are links to the truth files would
    all score 1.0; each is refused naming the case. A missing folder is named as such, not taken for
    one outside every dataset root."""
    import os

    root = tiny_project
    gt_dir = root / "datasets" / "test" / "labelsTr"
    with pytest.raises(DataError, match="prediction of case 'case_0' is the ground-truth file"):
        evaluate_folder(gt_dir, gt_dir, root / "project.yaml", None, root / "e0", figures=False)
    (root / "link").symlink_to(gt_dir, target_is_directory=True)
    with pytest.raises(DataError, match="is the ground-truth file"):
        evaluate_folder(root / "link", gt_dir, root / "project.yaml", None, root / "e1", figures=False)
    linked = root / "linked_preds"
    linked.mkdir()
    for case in ("case_0", "case_1", "case_2"):
        os.link(gt_dir / f"{case}.nii.gz", linked / f"{case}.nii.gz")  # hard links: the same files
    with pytest.raises(DataError, match="is the ground-truth file"):
        evaluate_folder(linked, gt_dir, root / "project.yaml", None, root / "e2", figures=False)
    with pytest.raises(DataError, match="ground-truth folder not found") as info:
        evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTs", root / "project.yaml", None,
                        root / "e3", figures=False)
    assert "labelsTs" in str(info.value)
    with pytest.raises(DataError, match="predictions folder not found"):
        evaluate_folder(root / "predz", gt_dir, root / "project.yaml", None, root / "e4", figures=False)
    assert not any((root / f"e{i}").exists() for i in range(5))
    # case_0.nii beside case_0.nii.gz: which one is the prediction is a guess, so neither is taken
    (root / "preds" / "case_0.nii").write_bytes(gzip.decompress((root / "preds" / "case_0.nii.gz").read_bytes()))
    with pytest.raises(DataError, match="two files for case 'case_0': case_0.nii and case_0.nii.gz"):
        evaluate_folder(root / "preds", gt_dir, root / "project.yaml", None, root / "e6", figures=False)
    (root / "preds" / "case_0.nii").unlink()
    # twin: copies of the truth are other files (a user's own reference check), scored as given
    copies = root / "copies"
    copies.mkdir()
    for case in ("case_0", "case_1", "case_2"):
        (copies / f"{case}.nii.gz").write_bytes((gt_dir / f"{case}.nii.gz").read_bytes())
    summary = evaluate_folder(copies, gt_dir, root / "project.yaml", None, root / "e5", figures=False)
    assert summary["cases"]["case_0"]["region:liver"]["dice"] == 1.0


def test_cli_evaluate(tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unionseg.cli import run
    from unionseg.data.io import Geometry, write_image

    root = tiny_project
    args = ["evaluate", str(root / "preds"), str(root / "datasets" / "test" / "labelsTr"),
            "--project", str(root / "project.yaml"), "--tolerance", "1.5", "--no-figures"]
    assert run([*args, "-o", str(root / "cli_out")]) == 0
    printed = capsys.readouterr().out
    assert "liver_tumour" in printed and "Dice" in printed
    assert json.loads((root / "cli_out" / "summary.json").read_text())["tolerance_mm"] == 1.5

    write_image(root / "preds" / "case_0.nii.gz", np.zeros((16, 14, 9), np.uint8), Geometry((16, 14, 9), AFFINE), replace=True)
    assert run([*args, "-o", str(root / "cli_bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case_0.nii.gz" in err[0] and "labelsTr" in err[0] and "grid differs" in err[0]


def test_markdown_table_reports_empty_rule_counts() -> None:
    """Each rule counted on its own: a both-empty case adds a perfect score to the mean, a missed one the
    worst, and one total could not tell them apart (helper-81)."""
    classes = {"region:liver": {"n_cases": 4, "empty_rule_cases": {BOTH_EMPTY: 2, PRED_EMPTY: 1, GT_EMPTY: 0},
                                "dice": {"mean": 0.5, "std": 0.5, "n": 4}}}
    table = markdown_table(classes, ["dice"], 2.0)
    assert "| cases | rule cases: both empty / missed / spurious |" in table
    assert "| liver | 0.500 ± 0.500 | 4 | 2 / 1 / 0 |" in table


def test_evaluation_never_imports_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from unionseg.evaluation import evaluate, figures, cli, metrics\n"
            "m = np.zeros((6, 6, 6), bool); m[1:4, 1:4, 1:4] = True\n"
            "metrics.score_masks(m, np.roll(m, 1, 0), (1.0, 1.0, 2.0))\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_selection_dice_leaves_out_classes_absent_from_truth_and_prediction(space: LabelSpace) -> None:
    from unionseg.training.validation import dice_scores

    pred, gt = _case(space)
    pred[pred == space.leaf_id("kidney")] = 0
    full = space.full_mask()
    report = validation_dice(pred, gt, full, space)
    assert report["region:spleen"] == 1.0 and report["kidney_tumour"] == 1.0  # the evaluation's empty rule
    chosen = dice_scores(pred, gt, full, space)
    assert "region:spleen" not in chosen and "kidney_tumour" not in chosen
    assert chosen["region:liver"] == report["region:liver"]
    # twin: a false positive and a miss still count, as 0
    pred[11:15, 10:13, 3:7] = space.leaf_id("spleen")
    pred[pred == space.leaf_id("liver_tumour")] = space.leaf_id("liver")
    chosen = dice_scores(pred, gt, full, space)
    assert chosen["region:spleen"] == 0.0 and chosen["liver_tumour"] == 0.0


@pytest.mark.parametrize("stored", ["RAS", "LPS", "PIL"])
def test_axial_view_is_radiological_whatever_the_files_orientation(stored: str) -> None:
    """A structure on the patient's right and front shows on the left and at the top of the figures' axial
    view, for a volume stored RAS, LPS or with permuted axes (the phantom's and the scanners' orientations)."""
    import nibabel as nib

    from unionseg.data.io import Geometry
    from unionseg.evaluation.figures import axial_view, to_ras

    ras = np.zeros((10, 8, 6), dtype=np.uint8)
    ras[8:, 5:, 3] = 1  # large x: the patient's right (RAS+ x points right); large y: anterior
    ras_affine = np.diag([2.0, 2.0, 3.0, 1.0])
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(tuple(stored)))
    volume = nib.orientations.apply_orientation(ras, transform)
    affine = ras_affine @ nib.orientations.inv_ornt_aff(transform, ras.shape)
    geometry = Geometry(volume.shape, affine)
    assert "".join(nib.aff2axcodes(affine)) == stored
    view = axial_view(to_ras(volume, geometry), 3)
    rows, cols = np.nonzero(view)
    assert view.shape == (8, 10)
    assert rows.max() < 4 and cols.max() < 5  # top (anterior) and left (the patient's right)


def test_a_wrong_dataset_for_a_copied_ground_truth_folder_is_warned_about(tmp_path: Path) -> None:
    """Ground truth copied out of every dataset root needs --dataset; naming the wrong one read the kidney
    labels through the liver's map and scored them (Dice 0) without a word. A folder holding none of the named
    dataset's case files is said, with the dataset whose files they are."""
    import shutil
    import warnings

    from conftest import write_tiny_project
    from unionseg.errors import UnionsegWarning

    project = write_tiny_project(tmp_path / "p")
    gt = tmp_path / "gtcopy"
    shutil.copytree(tmp_path / "p" / "datasets" / "kidney" / "labelsTr", gt)
    preds = tmp_path / "preds"
    shutil.copytree(gt, preds)  # copies, not the truth files themselves
    with pytest.warns(UnionsegWarning, match=r"gtcopy: none of its 3 label file\(s\) is a case of dataset 'liver' "
                                             r"\(whose map \{1: 'liver', 2: 'liver_tumour'\} reads their values\); "
                                             r"they are case files of dataset 'kidney': pass --dataset kidney"):
        evaluate_folder(preds, gt, project, "liver", tmp_path / "e1", figures=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnionsegWarning)
        evaluate_folder(preds, gt, project, "kidney", tmp_path / "e2", figures=False)


def test_another_datasets_files_read_empty_through_other_background_are_refused(tmp_path: Path) -> None:
    """A wrong --dataset whose map ends in ``other: background`` swept every value of the foreign files to
    background: every row scored 0 or by an empty-mask rule, exit 0, behind one warning (helper-131's
    walkthrough, where the message for a test set outside every root had suggested --dataset). Refused now,
    nothing written; the dataset's own files with the same map are scored."""
    import shutil

    from conftest import write_msd_dataset
    from unionseg.errors import DataError, UnionsegWarning

    # a whole-body labelling (as TotalSegmentator's): the dataset declares more structures than the project maps
    write_msd_dataset(tmp_path / "datasets" / "ts", 2, {0: "background", 1: "stomach", 2: "colon", 5: "liver"},
                      prefix="ts", values=(5,))
    write_msd_dataset(tmp_path / "elsewhere", 2, {0: "background", 1: "liver", 2: "spleen"}, prefix="ct")
    (tmp_path / "project.yaml").write_text(
        "name: p\nclasses: [liver, spleen]\ndatasets:\n  - name: ts\n    root: datasets/ts\n"
        "    labels: {5: liver, other: background}\n    annotated: [liver]\n")
    gt, preds = tmp_path / "gtcopy", tmp_path / "preds"
    shutil.copytree(tmp_path / "elsewhere" / "labelsTr", gt)
    shutil.copytree(gt, preds)
    with pytest.raises(ConfigError, match=r"name the dataset whose label values these files use \(--dataset NAME, "
                                          r"dataset=NAME: one of ts\), or declare their own dataset in the project "
                                          r"file \(role: test"):
        evaluate_folder(preds, gt, tmp_path / "project.yaml", out_dir=tmp_path / "e0", figures=False)
    with pytest.warns(UnionsegWarning, match=r"whose map \{5: 'liver', other: 'background'\} reads their values"), \
            pytest.raises(DataError, match=r"every ground-truth file is empty under dataset 'ts''s label map "
                                           r"\{5: 'liver', other: 'background'\}, and none is a case of that dataset"):
        evaluate_folder(preds, gt, tmp_path / "project.yaml", "ts", tmp_path / "e1", figures=False)
    assert not (tmp_path / "e1").exists()
    # twin: the dataset's own files, read through the same map, are scored (predictions in global ids: liver 1)
    from unionseg.data.io import read_image, write_image

    own = tmp_path / "datasets" / "ts" / "labelsTr"
    for path in own.glob("*.nii.gz"):
        label, geometry = read_image(path)
        write_image(tmp_path / "ownpreds" / path.name, (label == 5).astype(np.uint8), geometry)
    summary = evaluate_folder(tmp_path / "ownpreds", own, tmp_path / "project.yaml", "ts", None, figures=False)
    assert summary["n_cases"] == 2 and summary["classes"]["region:liver"]["dice"]["mean"] == pytest.approx(1.0)


def test_a_test_set_whose_dataset_json_swaps_two_classes_is_warned_about_by_evaluate(tmp_path: Path) -> None:
    """prepare and info warned when a dataset.json names a value as another class of the project than the
    project's map gives it (liver and spleen swapped), but evaluate scored such a test set in silence: the
    Dice of the wrong organs (helper-133's walkthrough: liver 0.445 -> 0.022). It warns now, as they do; the
    twin with a matching dataset.json is scored without a warning."""
    import shutil
    import warnings

    from conftest import write_msd_dataset
    from unionseg.errors import UnionsegWarning

    for name, labels in (("swapped", {0: "background", 1: "spleen", 2: "liver"}),
                         ("matching", {0: "background", 1: "liver", 2: "spleen"})):
        root = tmp_path / name
        write_msd_dataset(root / "datasets" / "test", 2, labels, prefix="ct")
        project = root / "project.yaml"
        project.write_text("name: p\nclasses: [liver, spleen]\ndatasets:\n  - name: test\n    root: datasets/test\n"
                           "    role: test\n    labels: {1: liver, 2: spleen}\n    annotated: [liver, spleen]\n")
        gt = root / "datasets" / "test" / "labelsTr"
        shutil.copytree(gt, root / "preds")
        if name == "swapped":
            with pytest.warns(UnionsegWarning) as said:
                evaluate_folder(root / "preds", gt, project, out_dir=None, figures=False)
            assert sorted(re.sub(r".*test/dataset.json: ", "", str(w.message)) for w in said) == [
                f"label value {v} is {a!r} in dataset.json but the project maps it to {b!r} for dataset 'test'; check "
                "that the dataset root and its label map belong together" for v, a, b in ((1, "spleen", "liver"),
                                                                                           (2, "liver", "spleen"))]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UnionsegWarning)
                evaluate_folder(root / "preds", gt, project, out_dir=None, figures=False)


def test_a_ground_truth_folder_in_the_root_of_two_datasets_that_read_it_differently_needs_dataset(
        tiny_project: Path) -> None:
    """Two datasets may share a root (a liver-only training view and the full test set of one folder).
    Evaluate took the first one listed without a word, and scored the liver alone, dropping the kidney;
    now it asks which one is meant. Where both read the labels the same way, the scores do not depend on
    the choice and it goes on."""
    import yaml

    root = tiny_project
    raw = yaml.safe_load((root / "project.yaml").read_text())
    view = {"name": "liver_view", "root": "datasets/test", "labels": {1: "liver", 2: "liver_tumour"},
            "annotated": ["liver", "liver_tumour"]}
    raw["datasets"].insert(0, view)
    (root / "shared.yaml").write_text(yaml.safe_dump(raw))
    gt = root / "datasets" / "test" / "labelsTr"
    with pytest.raises(ConfigError, match=r"lies in the root of datasets liver_view, test .*map or annotate their "
                                          r"labels differently; name the dataset \(--dataset NAME"):
        evaluate_folder(root / "preds", gt, root / "shared.yaml")
    named = evaluate_folder(root / "preds", gt, root / "shared.yaml", "test")
    assert named["dataset"] == "test" and "region:kidney" in named["cases"]["case_0"]
    # the twin: a view that reads the labels as the test set does is taken without asking
    view.update(labels={1: "liver", 2: "liver_tumour", 3: "kidney"}, annotated=["liver", "liver_tumour", "kidney"])
    (root / "shared.yaml").write_text(yaml.safe_dump(raw))
    same = evaluate_folder(root / "preds", gt, root / "shared.yaml")
    assert same["cases"] == named["cases"]


def test_evaluate_with_workers_from_a_script_without_the_main_guard_names_the_guard(tiny_project: Path) -> None:
    """evaluate_folder(workers=2) from a script without `if __name__ == "__main__":` failed with a raw
    BrokenProcessPool; now its workers refuse at once, naming the guard, and so does the call itself. One
    worker needs no guard."""
    import subprocess
    import sys

    call = "evaluate_folder('preds', 'datasets/test/labelsTr', 'project.yaml', workers={})\n"
    script = tiny_project / "no_guard.py"
    script.write_text("from unionseg.evaluation.evaluate import evaluate_folder\n" + call.format(2))
    proc = subprocess.run([sys.executable, script.name], cwd=tiny_project, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0
    assert 'must call evaluate_folder with workers > 1 under `if __name__ == "__main__":`' in proc.stderr, \
        proc.stderr[-2000:]
    # the calling process's own error names the cause (helper-94: it led with "killed, or out of memory")
    assert "UnionsegError: evaluate_folder with workers > 1 was called outside `if __name__ == \"__main__\":` " \
           "in a script that starts worker processes" in proc.stderr, proc.stderr[-2000:]
    assert "out of memory" not in proc.stderr
    script.write_text("from unionseg.evaluation.evaluate import evaluate_folder\n"
                      "print(" + call.format(1).strip() + "['n_cases'])\n")
    proc = subprocess.run([sys.executable, script.name], cwd=tiny_project, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr[-2000:]


def test_one_metric_name_alone_is_one_metric(tiny_project: Path) -> None:
    """``metrics="dice"`` was read one character at a time ("unknown metric 'd'"), in evaluate_folder and
    evaluate_cross alike; one name alone now means that metric."""
    root = tiny_project
    summary = evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml",
                              metrics="dice")
    assert summary["metrics"] == ["dice"] and set(summary["cases"]["case_0"]["region:liver"]) >= {"dice"}
    assert "hd95" not in summary["cases"]["case_0"]["region:liver"]
    with pytest.raises(ConfigError, match="unknown metric 'dise'"):
        evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml",
                        metrics="dise")


def test_overlays_draw_pixels_at_their_in_plane_spacing(space: LabelSpace, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlays drew every pixel square: a grid of 2 mm (left-right) x 0.5 mm (antero-posterior) pixels,
    40 mm wide and 20 mm deep, came out twice as deep as wide. Stored in another axis order (ASL) too."""
    from unionseg.data.io import Geometry
    from unionseg.evaluation import figures

    drawn: list[Any] = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    labels = np.zeros((20, 40, 3), np.int16)
    labels[5:15, 10:30, 1] = 1
    ras = np.diag([2.0, 0.5, 3.0, 1.0])
    # the same world grid stored A, S, L: file axes (y, z, x reversed)
    asl = np.array([[0, 0, -2.0, 0], [0.5, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])
    stored = labels.transpose(1, 2, 0)[:, :, ::-1]
    for volume, affine in ((labels, ras), (stored, asl)):
        geometry = Geometry(volume.shape, affine)
        assert figures.axial_aspect(geometry) == pytest.approx(0.25)
        figures.overlay(volume, volume, space, geometry, tmp_path / "o.png", image=volume.astype(np.float32))
        fig = drawn.pop()
        fig.canvas.draw()
        for ax in fig.axes:
            box = ax.get_window_extent()
            assert box.width / box.height == pytest.approx(2.0, rel=0.02)


def test_predictions_of_a_model_with_other_class_values_are_refused(tiny_project: Path) -> None:
    """A project listing the model's classes in another order read the kidney's value as the spleen's and
    scored both wrong, silently: predict now records its values' classes in the NIfTI header, and evaluate
    refuses a project that reads them otherwise. Files without the record (other tools) are scored as before."""
    import nibabel as nib

    from unionseg.config import load_project
    from unionseg.data.io import nifti_label_names, read_image, write_image

    root = tiny_project
    reference = evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml",
                                figures=False)
    names = list(load_project(root / "project.yaml").label_space.names)
    marked = root / "marked"
    for path in sorted((root / "preds").glob("case_*.nii.gz")):
        labels, geometry = read_image(path)
        write_image(marked / path.name, labels, geometry, label_names=names)
    assert nifti_label_names(marked / "case_0.nii.gz") == names
    same = evaluate_folder(marked, root / "datasets" / "test" / "labelsTr", root / "project.yaml", figures=False)
    assert same["cases"] == reference["cases"]  # the model's own order: scored as before
    for path in sorted(marked.glob("case_*.nii.gz")):  # a model with one more class than the project lists
        labels, geometry = read_image(path)
        write_image(path, labels, geometry, label_names=[*names, "stomach"], replace=True)
    more = evaluate_folder(marked, root / "datasets" / "test" / "labelsTr", root / "project.yaml", figures=False)
    assert more["cases"] == reference["cases"]  # the shared values agree; a stomach value would be refused as unknown

    swapped = names[:1] + names[1:][::-1]
    for path in sorted(marked.glob("case_*.nii.gz")):
        labels, geometry = read_image(path)
        write_image(path, labels, geometry, label_names=swapped, replace=True)
    with pytest.raises(ConfigError, match=r"case_\d\.nii\.gz was written by a model whose label values mean "
                                          r"\{1: kidney, .*but this project reads them as \{1: liver"):
        evaluate_folder(marked, root / "datasets" / "test" / "labelsTr", root / "project.yaml", figures=False)
    assert nib.load(str(marked / "case_0.nii.gz")).header.extensions  # twin of the plain files: no record there
    assert nifti_label_names(root / "preds" / "case_0.nii.gz") is None


def _has_colour(png: Path, rgb: tuple[int, int, int], tol: int = 12) -> bool:
    from matplotlib.image import imread

    pixels = (imread(str(png))[..., :3] * 255).round()
    return bool((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tol).any())


@pytest.mark.parametrize("metric", ["dice", "hd95"])
def test_score_boxplot_marks_the_values_an_empty_mask_rule_decided(tmp_path: Path, metric: str) -> None:
    """A missed organ's Dice 0 or HD95 penalty is drawn as a rule value (red, with a legend entry), not as a
    measurement among the others (helper-81); HD95 gets a box plot too."""
    from unionseg.evaluation.figures import score_boxplot

    measured = {"dice": 0.8, "hd95": 3.0, "nsd": 0.9, "pred_voxels": 50, "gt_voxels": 60}
    missed = {"dice": 0.0, "hd95": 500.0, "nsd": 0.0, "pred_voxels": 0, "gt_voxels": 60}
    spurious = {"dice": 0.0, "hd95": 500.0, "nsd": 0.0, "pred_voxels": 9, "gt_voxels": 0}
    both = {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "pred_voxels": 0, "gt_voxels": 0}
    colours = {"missed": (214, 39, 40), "spurious": (148, 103, 189), "both": (44, 160, 44)}  # tab: red, purple, green
    plain = score_boxplot({"a": {"region:liver": measured}, "b": {"region:liver": measured}}, ["region:liver"],
                          metric, tmp_path / "plain.png")
    assert not any(_has_colour(plain, rgb) for rgb in colours.values())
    for name, row in (("missed", missed), ("spurious", spurious), ("both", both)):
        marked = score_boxplot({"a": {"region:liver": measured}, "b": {"region:tumour": row}},
                               ["region:liver", "region:tumour"], metric, tmp_path / f"{name}.png")
        assert [n for n, rgb in colours.items() if _has_colour(marked, rgb)] == [name]
    with pytest.raises(ValueError, match="unknown metric"):
        score_boxplot({}, [], "volume", tmp_path / "x.png")


def test_one_case_gets_one_overlay(tiny_project: Path) -> None:
    """With one case the best and the worst are the same: one picture, titled as the only case, and the
    summary says "1 case"."""
    import shutil

    root = tiny_project
    gt = root / "one_gt"
    gt.mkdir()
    shutil.copy(root / "datasets" / "test" / "labelsTr" / "case_0.nii.gz", gt / "case_0.nii.gz")
    out = root / "eval_one"
    summary = evaluate_folder(root / "preds", gt, root / "project.yaml", "test", out, progress=False)
    assert summary["best_case"] == summary["worst_case"] == "case_0"
    assert (out / "figures" / "overlay_best.png").is_file()
    assert not (out / "figures" / "overlay_worst.png").exists()
    assert (out / "summary.md").read_text().startswith("# Evaluation: test (1 case)")


def test_a_sheared_truth_grid_is_warned_about(tiny_project: Path) -> None:
    """Surface distances take the voxel axes as perpendicular; on a grid kept tilted (a gantry tilt in the
    affine) HD95 read 5.32 mm where the true distance was 5.0, without a word (helper-107). One warning per
    evaluation names the most skewed case; a perpendicular grid says nothing."""
    import warnings

    from unionseg.data.io import Geometry, read_image, write_image
    from unionseg.errors import UnionsegWarning

    assert Geometry(SHAPE, AFFINE).skew_degrees() == pytest.approx(0.0, abs=1e-9)
    tilt = AFFINE.copy()
    tilt[1, 2] = AFFINE[2, 2] * np.tan(np.radians(20))  # the slice axis leans 20 degrees towards y
    assert Geometry(SHAPE, tilt).skew_degrees() == pytest.approx(20.0)
    root = tiny_project
    gt_dir = root / "datasets" / "test" / "labelsTr"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnionsegWarning)
        evaluate_folder(root / "preds", gt_dir, root / "project.yaml", None, None, figures=False)
    for path in (gt_dir / "case_1.nii.gz", root / "preds" / "case_1.nii.gz"):
        array, _ = read_image(path)
        write_image(path, array, Geometry(SHAPE, tilt), replace=True)
    with pytest.warns(UnionsegWarning, match=r"labelsTr: 1 ground-truth grid is sheared \(case_1: voxel axes 20.0 deg "
                                             r"from perpendicular.*HD95 and NSD take the axes as perpendicular"):
        evaluate_folder(root / "preds", gt_dir, root / "project.yaml", None, None, figures=False)


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"workers": "2"}, r"--workers \(workers=\) must be an integer >= 0 \(0 or 1: in this process\), got '2'"),
    ({"workers": -1}, r"--workers \(workers=\) must be an integer >= 0 \(0 or 1: in this process\), got -1"),
    ({"tolerance_mm": "2"}, r"--tolerance \(tolerance_mm=\) must be a number >= 0 mm, got '2'"),
    ({"tolerance_mm": -1.0}, r"--tolerance \(tolerance_mm=\) must be a number >= 0 mm, got -1.0"),
])
def test_evaluate_folder_refuses_a_bad_worker_count_or_tolerance_by_name(tiny_project: Path, kwargs: dict,
                                                                          said: str) -> None:
    """A string was a bare TypeError from a comparison (helper-106); each is named in both its forms. NumPy
    numbers are numbers (helper-110)."""
    from unionseg.evaluation.evaluate import check_tolerance

    check_tolerance(np.float32(2.0))
    check_tolerance(np.int64(2))
    root = tiny_project
    # 0 is "in this process", as prepare counts its workers (it was refused; helper-112)
    assert evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml", None,
                           None, workers=0)["n_cases"] > 0
    with pytest.raises(ConfigError, match=said):
        evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml", None, None,
                        **kwargs)


def test_surface_distances_with_stray_voxels_far_away_match_a_distance_transform() -> None:
    """Two stray predicted voxels in opposite corners made the distance transforms span the whole volume
    (4.5 GB for one class of a 512 x 512 x 300 scan; helper-108). The k-d tree over surface voxels gives the
    same distances as the transform of the whole volume, organs on the volume's edge included."""
    from unionseg.evaluation.metrics import surface_distances

    zz, yy, xx = np.meshgrid(np.arange(40), np.arange(36), np.arange(20), indexing="ij")
    gt = ((zz - 20) / 9) ** 2 + ((yy - 17) / 8) ** 2 + ((xx - 9) / 5) ** 2 < 1
    gt[39, 10:14, 4:8] = True  # on the volume's edge
    pred = ((zz - 21) / 8) ** 2 + ((yy - 16) / 9) ** 2 + ((xx - 10) / 5) ** 2 < 1
    pred[0, 0, 0] = pred[39, 35, 19] = True
    spacing = (0.75, 0.8, 2.5)
    edge_pred = pred & ~ndimage.binary_erosion(pred, border_value=0)
    edge_gt = gt & ~ndimage.binary_erosion(gt, border_value=0)
    to_gt = ndimage.distance_transform_edt(~edge_gt, sampling=spacing)[edge_pred]
    to_pred = ndimage.distance_transform_edt(~edge_pred, sampling=spacing)[edge_gt]
    got = surface_distances(pred, gt, spacing)
    np.testing.assert_allclose(got[0], to_gt, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[1], to_pred, rtol=0, atol=1e-9)
    assert got[0].max() > 20  # the strays are there, far from the organ


def test_evaluate_case_scores_fortran_ordered_arrays_as_c_ordered_ones(space: LabelSpace) -> None:
    """NIfTI arrays come Fortran-ordered; the class masks are now table lookups that keep that order
    (np.isin copied the whole volume per class; helper-108): the scores do not depend on it."""
    rng = np.random.default_rng(3)
    gt = rng.integers(0, space.n_codes, (12, 10, 8)).astype(np.uint8)
    pred = rng.integers(0, space.n_leaves, (12, 10, 8)).astype(np.uint8)
    full = space.full_mask()
    c_order = evaluate_case(pred, gt, full, space, (1.0, 1.5, 2.0))
    f_order = evaluate_case(np.asfortranarray(pred), np.asfortranarray(gt), full, space, (1.0, 1.5, 2.0))
    assert c_order == f_order and c_order
    # a float or bool array, as another tool's file reads, scores as its integer values (the lookups indexed
    # with it; helper-110)
    assert evaluate_case(pred.astype(np.float64), gt.astype(np.float32), full, space, (1.0, 1.5, 2.0)) == c_order
    one = LabelSpace.from_dict({"classes": [{"name": "liver"}]})
    as_bool = evaluate_case(pred > 3, gt > 3, one.full_mask(), one, (1.0, 1.0, 1.0))
    assert as_bool == evaluate_case((pred > 3).astype(np.uint8), (gt > 3).astype(np.uint8), one.full_mask(), one,
                                    (1.0, 1.0, 1.0))


def test_an_output_folder_evaluate_cannot_write_is_refused_before_any_case(tiny_project: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal came at the first write, after every case was scored (helper-109)."""
    import os

    from unionseg.errors import UnionsegError
    from unionseg.evaluation import evaluate as ev

    root = tiny_project
    out = root / "locked"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out and real_access(path, mode))
    monkeypatch.setattr(ev, "run_case_jobs", lambda *args, **kwargs: pytest.fail("cases scored before the refusal"))
    with pytest.raises(UnionsegError, match="output folder not writable by this user"):
        evaluate_folder(root / "preds", root / "datasets" / "test" / "labelsTr", root / "project.yaml", None, out)
