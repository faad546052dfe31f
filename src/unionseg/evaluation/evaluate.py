"""Case and folder evaluation: which classes a ground truth can be scored on, and the reports.

* :func:`evaluate_case` scores one label map against one ground truth, on the classes the ground truth
  annotates (``LabelSpace.scorable_keys``): an organ REGION (organ leaf + its parts, plus the region code
  in the truth) when all its leaves are annotated, a part (tumour) leaf when it is annotated. A part leaf
  is also skipped when the truth holds its group's region code (``region:kidney`` from a set that does
  not separate tumours): such a truth cannot say where the tumour is.
* :func:`validation_dice` is the Dice-only fast path the trainer's validation calls (one joint histogram
  pass, no per-class masks).
* :func:`evaluate_folder` pairs ``<case>.nii.gz`` predictions with ground-truth label files, maps the
  truth's local values to global codes through the project, scores every case (optionally in parallel
  processes) and writes ``metrics.csv``, ``summary.json``, ``summary.md`` and PNG figures.

Empty-mask rules are those of :mod:`unionseg.evaluation.metrics`; no value is ever NaN, and the summary
counts per class how many values came from a rule. No torch here.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unionseg.errors import (
    ConfigError,
    DataError,
    OutputExistsError,
    UnionsegError,
    and_more,
    listing,
    mapped_values,
    refuse_in_starting_worker,
    worker_died,
    worker_report,
)
from unionseg.evaluation.metrics import (
    BOTH_EMPTY,
    EMPTY_RULES,
    GT_EMPTY,
    METRIC_TITLES,
    METRICS,
    PRED_EMPTY,
    empty_rule,
    score_masks,
)
from unionseg.jsonfile import write_json, write_text
from unionseg.labels import REGION_PREFIX, LabelSpace, display_key

if TYPE_CHECKING:
    from unionseg.config import DatasetSpec, Project
    from unionseg.data.io import Geometry

CaseScores = dict[str, dict[str, float]]
"""class key -> {metric: value, "pred_voxels": n, "gt_voxels": n}"""

EMPTY_RULE_TEXT = {
    BOTH_EMPTY: "prediction and truth empty: Dice 1, HD95 0, NSD 1",
    PRED_EMPTY: "prediction empty, truth not: Dice 0, NSD 0, HD95 = image diagonal (mm)",
    GT_EMPTY: "truth empty, prediction not: Dice 0, NSD 0, HD95 = image diagonal (mm)",
}
GRID_ATOL_MM = 1e-3


# ---------------------------------------------------------------------- one case
def check_workers(workers: int, caller: str) -> None:
    """Refuse a worker count that is not an integer >= 0 (0 or 1: in this process), and workers started from
    a script without its ``__main__`` guard.

    Raises:
        ConfigError: naming the option and the argument.
    """
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 0:  # "2": a TypeError
        raise ConfigError(f"--workers (workers=) must be an integer >= 0 (0 or 1: in this process), got {workers!r}")
    if workers > 1:
        refuse_in_starting_worker(f"{caller} with workers > 1")


def check_tolerance(tolerance_mm: float) -> None:
    """Refuse an NSD tolerance that is not a number >= 0 mm (a string was a bare TypeError; helper-106).

    Raises:
        ConfigError: naming the option and the argument.
    """
    if isinstance(tolerance_mm, bool) or not isinstance(tolerance_mm, numbers.Real) \
            or not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ConfigError(f"--tolerance (tolerance_mm=) must be a number >= 0 mm, got {tolerance_mm!r}")


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metric names as a tuple (one name alone is one metric); ValueError for an unknown one or none."""
    if isinstance(metrics, str):  # "dice" was read one character at a time ("unknown metric 'd'")
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric {unknown[0] if unknown else None!r}; known: {', '.join(METRICS)}")
    return tuple(metrics)


def _check_inputs(pred: np.ndarray, gt: np.ndarray, annotated: np.ndarray | Sequence[bool],
                  space: LabelSpace) -> np.ndarray:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if isinstance(annotated, str):  # a dataset's name: np.asarray made it one True
        raise ValueError(f"annotated: the truth's annotated-leaf mask, not a name (space.annotated_leaf_mask"
                         f"({annotated!r}), or space.full_mask() for a fully labelled set)")
    mask = np.asarray(annotated, dtype=bool)
    if mask.shape != (space.n_leaves,):
        raise ValueError(f"annotated must be ({space.n_leaves},) bool, got shape {mask.shape}")
    if pred.size and (int(pred.min()) < 0 or int(pred.max()) >= space.n_leaves):
        raise ValueError(f"prediction values must be leaf ids 0..{space.n_leaves - 1}, "
                         f"got {int(pred.min())}..{int(pred.max())}")
    if gt.size and (int(gt.min()) < 0 or int(gt.max()) >= space.n_codes):
        raise ValueError(f"ground-truth values must be codes 0..{space.n_codes - 1}, "
                         f"got {int(gt.min())}..{int(gt.max())}")
    return mask


def _voxel_size(spacing: Any) -> tuple[float, float, float]:
    """``spacing`` as three positive mm; a :class:`Geometry` gives its own (``spacing=geometry`` failed inside
    float()).

    Raises:
        ValueError: anything but three positive finite numbers.
    """
    from unionseg.data.io import Geometry

    if isinstance(spacing, Geometry):
        spacing = spacing.spacing
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing: expected the voxel size in mm along X, Y, Z (three positive numbers, such as "
                         f"geometry.spacing), got {spacing!r}")
    return values  # type: ignore[return-value]


def _scored_keys(space: LabelSpace, annotated: np.ndarray, gt_code_counts: np.ndarray) -> list[str]:
    """Scorable keys, minus part leaves whose group's region code occurs in the truth."""
    keys = []
    for key in space.scorable_keys(annotated):
        if not key.startswith(REGION_PREFIX):
            group = space.groups[space.group_of_leaf(space.leaf_id(key))]
            if gt_code_counts[space.n_leaves + group.index] > 0:
                continue
        keys.append(key)
    return keys


def _key_codes(space: LabelSpace, key: str) -> list[int]:
    codes = set(space.leaves_of(key))
    if key.startswith(REGION_PREFIX):
        codes.add(space.code(key))
    return sorted(codes)


def evaluate_case(
    pred: np.ndarray,
    gt: np.ndarray,
    annotated: np.ndarray | Sequence[bool],
    space: LabelSpace,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
    metrics: Sequence[str] = METRICS,
) -> CaseScores:
    """Score one predicted label map on every class its ground truth annotates.

    Args:
        pred: (X, Y, Z) integer leaf ids (uint8).
        gt: (X, Y, Z) integer GLOBAL codes (leaf ids and region codes, see :mod:`unionseg.labels`).
        annotated: (L,) bool annotated-leaf mask of the truth (``space.annotated_leaf_mask(dataset)``;
            ``space.full_mask()`` for fully labelled sets).
        space: the project's label space.
        spacing: voxel size in mm along X, Y, Z (three positive numbers), or the truth's
            :class:`~unionseg.data.io.Geometry`.
        tolerance_mm: NSD tolerance.
        metrics: any of ``dice``, ``hd95``, ``nsd``.

    Returns:
        class key -> {metric: value, ``pred_voxels``, ``gt_voxels``}; keys in ``space.evaluation_keys()``
        order, only the scorable ones. Values follow the metrics module's empty-mask rules (never NaN).

    Raises:
        ValueError: shape mismatch, values outside the label space, bad annotated mask (a dataset's name
            given instead, say), spacing or metric.
    """
    metrics = check_metrics(metrics)
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    mask = _check_inputs(pred, gt, annotated, space)
    # integer codes for the table lookups below (a float or bool array, as read from another tool's file,
    # would index otherwise; helper-110); the ranges were checked
    pred, gt = (a if a.dtype.kind in "ui" else a.astype(np.uint8) for a in (pred, gt))
    spacing = _voxel_size(spacing)
    counts = value_counts(gt, space.n_codes)
    out: CaseScores = {}
    for key in _scored_keys(space, mask, counts):
        # a table lookup keeps the arrays' memory order: np.isin ravels, a full transposing copy of a
        # (Fortran-ordered) NIfTI array each time, 80 % of a case's time (helper-108)
        table = np.zeros(max(space.n_codes, 256), dtype=bool)
        table[_key_codes(space, key)] = True
        scores = score_masks(table[pred], table[gt], spacing, metrics, tolerance_mm)
        out[key] = scores.as_dict()
    return out


def value_counts(arr: np.ndarray, n: int, chunk: int = 1 << 22) -> np.ndarray:
    """How many voxels hold each value ``0..n-1`` of a non-negative integer array, in chunks of its memory
    order (no copy of a Fortran-ordered array, no int64 copy of the whole: helper-108)."""
    flat = arr.ravel(order="K")
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start:start + chunk].astype(np.intp), minlength=n)[:n]
    return counts


def _joint_histogram(gt: np.ndarray, pred: np.ndarray, n: int, chunk: int = 1 << 22) -> np.ndarray:
    """(n, n) counts of (truth code, predicted code) pairs, in chunks to bound memory."""
    g = gt.reshape(-1)
    p = pred.reshape(-1)
    hist = np.zeros(n * n, dtype=np.int64)
    for start in range(0, g.size, chunk):
        idx = g[start:start + chunk].astype(np.intp) * n + p[start:start + chunk].astype(np.intp)
        hist += np.bincount(idx, minlength=n * n)
    return hist.reshape(n, n)


def validation_dice(
    pred: np.ndarray, gt: np.ndarray, annotated: np.ndarray | Sequence[bool], space: LabelSpace,
    both_empty: float | None = 1.0,
) -> dict[str, float]:
    """Dice per scorable class (same classes and rules as :func:`evaluate_case`), in one pass.

    Args:
        pred: (X, Y, Z) (any shape) integer leaf ids.
        gt: same shape, integer global codes.
        annotated: (L,) bool annotated-leaf mask of the truth.
        space: the label space.
        both_empty: the score of a class absent from truth and prediction (the evaluation's rule: 1.0), or
            None to leave such a class out of the result.

    Returns:
        class key -> Dice.

    Raises:
        ValueError: shape mismatch, values outside the label space, bad annotated mask.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    mask = _check_inputs(pred, gt, annotated, space)
    hist = _joint_histogram(gt, pred, space.n_codes)
    out: dict[str, float] = {}
    for key in _scored_keys(space, mask, hist.sum(axis=1)):
        codes = _key_codes(space, key)
        inter = int(hist[np.ix_(codes, codes)].sum())
        total = int(hist[codes, :].sum()) + int(hist[:, codes].sum())
        if total == 0:
            if both_empty is not None:
                out[key] = both_empty
        else:
            out[key] = 2.0 * inter / total
    return out


# ---------------------------------------------------------------------- reading a pair
def _integer_array(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{what} holds non-integer values (dtype {arr.dtype})", path)
    return arr


def label_range_problem(lo: int, hi: int) -> str | None:
    """What is wrong with a label map whose values run from ``lo`` to ``hi`` (None: within 0..255). Negative
    values are a CT image's, given where its label map belongs (``evaluate PRED imagesTr``)."""
    if 0 <= lo and hi <= 255:
        return None
    hint = "; negative values are a CT image's: is this the image folder, not the labels?" if lo < 0 else ""
    return f"label value {lo if lo < 0 else hi} is outside 0..255{hint}"


def map_ground_truth(arr: np.ndarray, lookup: np.ndarray, path: Path, dataset: str) -> np.ndarray:
    """Local label values -> (X, Y, Z) uint8 global codes through ``lookup`` ((256,) int, -1 = unmapped).

    Raises:
        DataError: non-integer values, values outside 0..255, or values the project does not map.
    """
    arr = _integer_array(np.asarray(arr), path, "label map")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    problem = label_range_problem(lo, hi)
    if problem is not None:
        raise DataError(problem, path)
    values = arr.astype(np.uint8, copy=False)
    present = np.flatnonzero(value_counts(values, 256))
    bad = [int(v) for v in present if lookup[v] < 0]
    if bad:
        mapped = [int(v) for v in np.flatnonzero(lookup >= 0) if v > 0]
        raise DataError(f"label values {bad} are not mapped for dataset {dataset!r} (the project maps "
                        f"{mapped_values(mapped)}); "
                        f"fix datasets.{dataset}.labels (each value to the class it belongs to, a lesion to its organ's "
                        f"tumour or organ; '{bad[0]}: background' only for a structure no class stands for), pass "
                        "the right --dataset, or score a set with a label space of its own with "
                        "`unionseg evaluate-cross`", path)
    return np.where(lookup >= 0, lookup, 0).astype(np.uint8)[values]  # one copy, in the input's memory order


def _read_prediction(path: Path, space: LabelSpace) -> tuple[np.ndarray, Geometry]:
    from unionseg.data.io import read_image

    arr, geom = read_image(path)
    arr = _integer_array(arr, path, "prediction")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= space.n_leaves):
        bad = np.unique(arr[(arr < 0) | (arr >= space.n_leaves)])
        shown = listing([int(v) for v in bad])
        raise DataError(f"prediction holds value(s) {shown} outside the leaf ids of this project "
                        f"(0..{space.n_leaves - 1})", path)
    return arr.astype(np.uint8, copy=False), geom


def grid_difference(pred: Geometry, gt: Geometry, atol: float = GRID_ATOL_MM) -> str:
    """What differs between two grids, with enough digits to see it: shape, spacing, axis directions
    (orientation codes and the largest angle between matching axes), origin (and how far apart). A summary
    of both grids at 4 digits printed two identical lines for a 5 degree rotation or a 0.02 mm shift."""
    def triple(values: Any, digits: int = 6) -> str:
        return "(" + ", ".join(f"{float(v):.{digits}g}" for v in values) + ")"

    found = []
    if pred.shape != gt.shape:
        found.append(f"shape {pred.shape} vs {gt.shape}")
    sp_pred, sp_gt = np.asarray(pred.spacing, float), np.asarray(gt.spacing, float)
    if not np.allclose(sp_pred, sp_gt, atol=atol):
        found.append(f"spacing {triple(sp_pred)} vs {triple(sp_gt)} mm")
    axes_pred = pred.affine[:3, :3] / np.maximum(sp_pred, 1e-12)
    axes_gt = gt.affine[:3, :3] / np.maximum(sp_gt, 1e-12)
    cosines = np.clip(np.sum(axes_pred * axes_gt, axis=0), -1.0, 1.0)
    turned = float(np.degrees(np.arccos(cosines)).max())
    if turned > 1e-3:
        found.append(f"axis directions {pred.orientation()} vs {gt.orientation()} (an axis turned by {turned:.3g} deg)")
    shift = float(np.linalg.norm(np.asarray(pred.origin, float) - np.asarray(gt.origin, float)))
    if shift > atol:
        found.append(f"origin {triple(pred.origin, 8)} vs {triple(gt.origin, 8)} mm ({shift:.3g} mm apart)")
    if not found and pred.shape == gt.shape:
        # within the tolerance entry by entry, a spacing or direction still adds up over a long axis
        from unionseg.data.io import MAX_GRID_DRIFT_VOXELS, grid_drift

        drift_mm, drift_voxels = grid_drift(pred.affine, gt)
        if drift_voxels > MAX_GRID_DRIFT_VOXELS:
            if not np.array_equal(sp_pred, sp_gt):
                found.append(f"spacing {triple(sp_pred, 8)} vs {triple(sp_gt, 8)} mm")
            found.append(f"a voxel placed up to {drift_mm:.3g} mm ({drift_voxels:.2g} voxels) apart at the grid's "
                         f"corners (at most {MAX_GRID_DRIFT_VOXELS:g} voxel passes)")
    if not found:  # the affines differ elsewhere than these (cannot happen for a well-formed affine)
        found.append(f"affine {pred.affine[:3].round(6).tolist()} vs {gt.affine[:3].round(6).tolist()}")
    return "; ".join(found)


def load_pair(pred_path: Path, gt_path: Path, lookup: np.ndarray, space: LabelSpace,
              dataset: str) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Read a prediction and its ground truth; check they share one grid; map the truth to global codes.

    Returns:
        ``(pred leaf ids (X, Y, Z) uint8, truth codes (X, Y, Z) uint8, geometry)``.

    Raises:
        DataError: unreadable files, a grid mismatch (naming both files), unmapped or invalid values.
    """
    from unionseg.data.io import read_image

    pred, pred_geom = _read_prediction(pred_path, space)
    gt_raw, gt_geom = read_image(gt_path)
    pred = on_truth_grid(pred, pred_geom, gt_geom, pred_path, gt_path)
    return pred, map_ground_truth(gt_raw, lookup, gt_path, dataset), gt_geom


def on_truth_grid(pred: np.ndarray, pred_geom: Geometry, gt_geom: Geometry, pred_path: Path,
                  gt_path: Path) -> np.ndarray:
    """The prediction on the ground truth's grid: as is, or reoriented when it holds the same voxels stored
    in another axis order or orientation (e.g. LPS written by another tool).

    Raises:
        DataError: any other grid difference, naming both files and both geometries.
    """
    from unionseg.data.io import align_label_to_image, reoriented_geometry

    try:  # the same grid (affines within GRID_ATOL_MM, no voxel drifting apart) passes as it is
        return align_label_to_image(pred, pred_geom, gt_geom, pred_path, gt_path, atol=GRID_ATOL_MM)
    except DataError:
        # a prediction stored in another orientation is compared once reoriented (what would be scored):
        # compared as stored, its shape and axes all differ, which hides a shift of a few millimetres
        turned = reoriented_geometry(pred_geom, gt_geom)
        what = grid_difference(turned, gt_geom)
        if pred_geom.orientation() != turned.orientation():
            what = f"stored {pred_geom.orientation()}, and once reoriented to {turned.orientation()}: {what}"
        raise DataError(f"prediction grid differs from ground truth {gt_path}: {what}; predictions must keep the "
                        "input's exact geometry", pred_path) from None


def _evaluate_pair(job: tuple[str, Path, Path, np.ndarray, np.ndarray, LabelSpace, str, float, tuple[str, ...]]
                   ) -> tuple[str, CaseScores, float]:
    """``(case, scores, the truth grid's skew in degrees)``."""
    case, pred_path, gt_path, lookup, annotated, space, dataset, tolerance_mm, metrics = job
    pred, gt, geom = load_pair(pred_path, gt_path, lookup, space, dataset)
    return case, evaluate_case(pred, gt, annotated, space, geom.spacing, tolerance_mm, metrics), geom.skew_degrees()


#: a truth grid whose voxel axes are further than this from perpendicular gets a warning: surface distances
#: take them as perpendicular (a 20 degree tilt reads the slice spacing 6 % long; helper-107)
MAX_SKEW_DEGREES = 1.0


def warn_skewed(skews: Mapping[str, float], where: Path) -> None:
    """One warning for the cases whose truth grid is skewed (``skews``: case -> degrees)."""
    import warnings

    from unionseg.errors import UnionsegWarning

    skewed = sorted((case for case, angle in skews.items() if angle > MAX_SKEW_DEGREES), key=lambda c: -skews[c])
    if skewed:
        warnings.warn(f"{where}: {len(skewed)} ground-truth grid{'s are' if len(skewed) > 1 else ' is'} sheared "
                      f"({skewed[0]}: voxel axes {skews[skewed[0]]:.1f} deg from perpendicular, a tilted-gantry scan "
                      "kept tilted); HD95 and NSD take the axes as perpendicular and are approximate there "
                      "(docs/evaluation.md, Metrics)", UnionsegWarning, stacklevel=3)


# ---------------------------------------------------------------------- folders
def resolve_dataset(project: Project, gt_dir: Path, dataset: str | None = None) -> tuple[DatasetSpec, bool]:
    """The dataset a ground-truth folder belongs to, and whether it is the dataset's oracle-label folder
    (full truth in global leaf ids, phantom only).

    Raises:
        ConfigError: unknown ``dataset``, or none given and no dataset root contains ``gt_dir``.
    """
    gt = Path(gt_dir).resolve()
    if dataset is not None:
        spec = project.dataset(dataset)
    else:
        matches = [d for d in project.datasets if gt.is_relative_to(Path(d.root).resolve())]
        if not matches:
            names = ", ".join(d.name for d in project.datasets)
            raise ConfigError(f"no dataset root contains the ground truth folder {gt}; name the dataset whose "
                              f"label values these files use (--dataset NAME, dataset=NAME: one of {names}), or "
                              "declare their own dataset in the project file (role: test, docs/datasets.md)",
                              project.path)
        deepest = max(len(Path(d.root).resolve().parts) for d in matches)
        tied = [d for d in matches if len(Path(d.root).resolve().parts) == deepest]
        oracle_of = [d for d in tied if d.oracle_labels is not None and Path(d.oracle_labels).resolve() == gt]
        spec = (oracle_of or tied)[0]
        if not oracle_of and len({(tuple(sorted(d.labels.items())), d.other, tuple(sorted(d.annotated))) for d in tied}) > 1:
            # they read the same label values differently: taking the first listed scored the wrong classes
            names = ", ".join(d.name for d in tied)
            raise ConfigError(f"the ground truth folder {gt} lies in the root of datasets {names} "
                              f"({tied[0].root}), which map or annotate their labels differently; name the "
                              f"dataset (--dataset NAME, dataset=NAME: one of {names})", project.path)
    oracle = spec.oracle_labels is not None and Path(spec.oracle_labels).resolve() == gt
    return spec, oracle


def _label_files(folder: Path) -> dict[str, Path]:
    from unionseg.data.io import IMAGE_SUFFIXES, strip_suffix, suffix_of

    if not folder.is_dir():
        raise DataError("folder not found", folder)
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or suffix_of(p) not in IMAGE_SUFFIXES:
            continue
        case = strip_suffix(p)
        if case in found:  # case.nii beside case.nii.gz: which one to score is a guess
            raise DataError(f"two files for case {case!r}: {found[case].name} and {p.name}; keep one", folder)
        found[case] = p
    return found


def check_not_the_truth(preds: Mapping[str, Path], truths: Mapping[str, Path], pred_dir: Path) -> None:
    """Refuse predictions that are the ground-truth files themselves (one folder given for both, a link
    to it, or predictions that are links to the truth): every score would be a perfect 1.

    Raises:
        DataError: naming the predictions folder and the first such case.
    """
    for case, truth in truths.items():
        pred = preds.get(case)
        try:
            same = pred is not None and os.path.samefile(pred, truth)
        except OSError:
            same = False
        if same:
            raise DataError(f"the prediction of case {case!r} is the ground-truth file {truth} itself (the same "
                            "folder given for both?); give the folder predict wrote", pred_dir)


def unmatched_predictions(preds: Mapping[str, Path], truths: Mapping[str, Path]) -> list[str]:
    """Prediction files no ground truth matches, leaving out the probability maps ``predict --probabilities``
    writes beside a scored case's label map (``<case>_probs``)."""
    return sorted(case for case in set(preds) - set(truths)
                  if not (case.endswith("_probs") and case[: -len("_probs")] in truths))


def _stats(values: list[float]) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan,
                "n": 0, "n_nonfinite": int(arr.size)}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "median": float(np.median(finite)),
            "min": float(finite.min()), "max": float(finite.max()), "n": int(finite.size),
            "n_nonfinite": int(arr.size - finite.size)}


def summarise(cases: Mapping[str, CaseScores], keys: Sequence[str], metrics: Sequence[str]) -> dict[str, Any]:
    """Per class: mean/std (population)/median/min/max/n of every metric over the cases that score the
    class, the number of non-finite values (always 0 with our rules, reported rather than dropped), and
    how many cases each empty-mask rule decided."""
    classes: dict[str, Any] = {}
    for key in keys:
        rows = [scores[key] for scores in cases.values() if key in scores]
        if not rows:
            continue
        rules = {rule: 0 for rule in EMPTY_RULES}
        for row in rows:
            rule = empty_rule(row["pred_voxels"], row["gt_voxels"])
            if rule is not None:
                rules[rule] += 1
        classes[key] = {"n_cases": len(rows), "empty_rule_cases": rules,
                        **{m: _stats([row[m] for row in rows]) for m in metrics}}
    return classes


def case_quality(scores: CaseScores, metrics: Sequence[str]) -> float:
    """One number per case for picking the best/worst case: mean Dice (else mean NSD, else -mean HD95)."""
    if not scores:
        return math.nan
    for metric, sign in (("dice", 1.0), ("nsd", 1.0), ("hd95", -1.0)):
        if metric in metrics:
            return sign * float(np.mean([row[metric] for row in scores.values()]))
    return math.nan


def rank_cases(cases: Mapping[str, CaseScores], metrics: Sequence[str]
               ) -> tuple[dict[str, float], str | None, str | None]:
    """Each case's :func:`case_quality`, and the best and the worst case (None when no case scored a class).
    A tie keeps the case ids' order, so that tied cases still give two pictures."""
    quality = {case: case_quality(scores, metrics) for case, scores in cases.items()}
    ranked = sorted(((q, case) for case, q in quality.items() if math.isfinite(q)), key=lambda item: (-item[0], item[1]))
    return quality, (ranked[0][1] if ranked else None), (ranked[-1][1] if ranked else None)


def case_quality_measure(metrics: Sequence[str]) -> str:
    """What ``case_quality`` holds, for readers of ``summary.json``."""
    for metric in ("dice", "nsd"):
        if metric in metrics:
            return f"mean {metric} over the case's classes (higher is better)"
    if "hd95" in metrics:
        return "minus the mean hd95 (mm) over the case's classes (higher is better)"
    return "none"


def _fmt(metric: str, stat: Mapping[str, Any]) -> str:
    if stat["n"] == 0:
        return "n/a"
    digits = 2 if metric == "hd95" else 3
    cell = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if metric == "hd95" and stat.get("median") is not None:
        # one missed organ scores the image diagonal (hundreds of mm) and rules the mean: the median says
        # what a typical case scores
        cell += f" (median {stat['median']:.{digits}f})"
    return cell


def markdown_table(classes: Mapping[str, Any], metrics: Sequence[str], tolerance_mm: float) -> str:
    """Rows = classes, columns = metrics (mean ± sd; HD95 with its median), case count, and how many cases
    each empty-mask rule decided (both empty / missed / spurious: a both-empty case adds a perfect score to
    the mean, the other two the worst one)."""
    titles = [METRIC_TITLES[m] if m != "nsd" else f"NSD ({tolerance_mm:g} mm)" for m in metrics]
    lines = ["| class | " + " | ".join(titles) + " | cases | rule cases: both empty / missed / spurious |",
             "|---|" + "---|" * len(metrics) + "---|---|"]
    for key, entry in classes.items():
        cells = [_fmt(m, entry[m]) for m in metrics]
        rules = entry["empty_rule_cases"]
        lines.append(f"| {display_key(key)} | " + " | ".join(cells) + f" | {entry['n_cases']} | "
                     f"{rules[BOTH_EMPTY]} / {rules[PRED_EMPTY]} / {rules[GT_EMPTY]} |")
    return "\n".join(lines) + "\n"


def case_records(cases: Mapping[str, CaseScores]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per case and class, the scores as summary.json holds them: voxel counts as integers, and the
    empty-mask rule that decided the values (None where none did)."""
    return {case: {key: {**row, "pred_voxels": int(row["pred_voxels"]), "gt_voxels": int(row["gt_voxels"]),
                         "empty_rule": empty_rule(row["pred_voxels"], row["gt_voxels"])}
                   for key, row in scores.items()} for case, scores in cases.items()}


def write_metrics_csv(path: Path, cases: Mapping[str, CaseScores], metrics: Sequence[str]) -> None:
    """``metrics.csv``: one row per case and class, each metric at full precision, the voxel counts, and the
    empty-mask rule that decided the row's values (if one did)."""
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "class", *metrics, "pred_voxels", "gt_voxels", "empty_rule"])
    for case, scores in cases.items():
        for key, row in scores.items():
            writer.writerow([case, key, *(repr(float(row[m])) for m in metrics), int(row["pred_voxels"]),
                             int(row["gt_voxels"]), empty_rule(row["pred_voxels"], row["gt_voxels"]) or ""])
    write_text(path, buffer.getvalue())


def _map_text(spec: DatasetSpec) -> str:
    """A dataset's label map as the project file gives it, ``other:`` included."""
    text = repr(dict(sorted(spec.labels.items())))
    return f"{text[:-1]}, other: {spec.other!r}}}" if spec.other else text


def _warn_foreign_cases(project: Project, spec: DatasetSpec, truths: Mapping[str, Path], gt_dir: Path) -> bool:
    """Warn when a ground-truth folder outside the named dataset's root holds none of its cases' label files:
    a wrong ``--dataset`` reads every label value through another dataset's map (kidney labels scored as
    liver, Dice 0) without a word. Said only when the dataset's own folder can be scanned; when another
    dataset of the project holds those files, the warning names it. Returns whether it warned."""
    import warnings

    from unionseg.errors import UnionsegWarning

    with warnings.catch_warnings():  # the scans' own warnings (left-out files, ...) are not this command's
        warnings.simplefilter("ignore", UnionsegWarning)
        own = _image_lookup(spec)
        names = {path.name for path in truths.values()}
        if not own or names & set(own):
            return False
        owner = next((d.name for d in project.datasets if d.name != spec.name and names & set(_image_lookup(d))),
                     None)
    hint = f"; they are case files of dataset {owner!r}: pass --dataset {owner}" if owner else ""
    warnings.warn(f"{gt_dir}: none of its {len(names)} label file(s) is a case of dataset {spec.name!r} (whose map "
                  f"{_map_text(spec)} reads their values){hint}", UnionsegWarning, stacklevel=3)
    return True


def _checked_declared_labels(spec: DatasetSpec, classes: Sequence[str]) -> list[int] | None:
    """The label values the dataset's dataset.json declares (None without one, or if it cannot be read). A value
    it names as another class of the project than the map gives it warns here as in ``prepare`` and ``info``
    (test labels whose values are swapped: Dice of the wrong organs, with no word from this command;
    helper-133); prepare's other checks of the map, which refuse what training cannot use, are left to it. With
    ``other: background`` only the declared values are swept to background, so that a stray value is refused
    here as in prepare."""
    import warnings

    from unionseg.data.catalog import scan_dataset, warn_crossed_names
    from unionseg.errors import UnionsegWarning

    with warnings.catch_warnings():  # the scan's own warnings (left-out files, ...) are prepare's to give
        warnings.simplefilter("ignore", UnionsegWarning)
        try:
            declared = scan_dataset(spec.name, Path(spec.root), spec.layout, None).declared_labels
        except UnionsegError:
            return None
    if declared is None:
        return None
    warn_crossed_names(spec.name, declared, spec.labels, Path(spec.root) / "dataset.json", classes)
    return sorted(declared)


def _image_lookup(spec: DatasetSpec) -> dict[str, Path]:
    """Label file name -> image path, from a scan of the dataset in its layout (empty if it cannot be read)."""
    from unionseg.data.catalog import scan_dataset

    try:
        info = scan_dataset(spec.name, Path(spec.root), spec.layout, None)
    except UnionsegError:
        return {}
    out: dict[str, Path] = {}
    for case in info.cases:
        if case.label is not None:
            out[case.label.name] = case.image
    return out


@contextlib.contextmanager
def case_progress(total: int, enabled: bool, what: str = "evaluate") -> Iterator[Callable[[str], None]]:
    """A progress bar on stderr over ``total`` cases, with the elapsed time and an ETA; yields the function
    to call after each case (with its name). Disabled: a no-op, nothing printed."""
    if not enabled or total == 0:
        yield lambda case: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from unionseg.progress import make_progress, time_columns

    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), *time_columns(), TextColumn("{task.description}"))
    with make_progress(*columns, console=Console(stderr=True), transient=True, label=what) as bar:
        task = bar.add_task("", total=total)
        yield lambda case: bar.update(task, advance=1, description=case)


def run_case_jobs(jobs: list[tuple[Any, ...]], workers: int, progress: bool = False,
                  score: Callable[[Any], tuple[Any, ...]] | None = None, what: str = "evaluate") -> list[tuple[Any, ...]]:
    """``score(job)`` for every job (default: ``evaluate``'s pair scoring), in this process or in ``workers``
    spawned processes, in order, with a progress bar of the cases (each result's first item names its case).
    ``score`` must be a module-level function (the workers import it)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    scorer: Callable[[Any], tuple[Any, ...]] = score if score is not None else _evaluate_pair
    out: list[tuple[Any, ...]] = []
    # the report outlives the pool (closed by the stack), so a worker still starting writes to a file that is there
    with worker_report(), case_progress(len(jobs), progress, what) as done, contextlib.ExitStack() as stack:
        results: Iterator[tuple[Any, ...]]
        try:
            if workers <= 1 or len(jobs) <= 1:
                results = map(scorer, jobs)
            else:  # spawn: safe even when the caller (trainer, benchmark) already runs threads
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                                               mp_context=multiprocessing.get_context("spawn")))
                results = pool.map(scorer, jobs)  # in order, each once it and those before are done
            for result in results:
                out.append(result)
                done(result[0])
        except BrokenProcessPool as exc:  # its cause, where the pool gives one, stays attached
            raise worker_died(f"cases were being scored ({len(out)} of {len(jobs)} done)") from exc
        return out


#: the reports an evaluation writes into its output folder (and ``figures/`` beside them)
REPORT_FILES = ("metrics.csv", "summary.json", "summary.md")


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any case is scored, an output folder whose reports would be replaced.

    Earlier results are replaced only with ``overwrite``, and never a ``summary.json`` that no evaluation
    wrote (a training run's: ``-o`` naming a run folder used to replace it, and ``info`` then read the run
    as unfinished). ``evaluate`` used to replace both silently, and learnt of an ``-o`` naming a file only
    after scoring every case.

    Raises:
        DataError: ``out_dir`` is a file.
        OutputExistsError: reports exist and ``overwrite`` is false, a foreign ``summary.json``, or
            ``out_dir`` is a training run folder (even with ``overwrite``).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError("the output folder (-o) is a file; give a folder", out_dir)
    run = [name for name in _RUN_MARKS if (out_dir / name).exists()]
    if run:  # its summary.json, written here, would read as the run's (info; --resume "finished")
        raise OutputExistsError(f"is a training run folder ({', '.join(run)}); write the evaluation into a "
                                "folder of its own, such as RUN/evaluation (-o, out_dir)", out_dir)
    held = [name for name in REPORT_FILES if (out_dir / name).exists()]
    if not held:
        return
    summary = out_dir / "summary.json"
    if summary.exists() and not _is_evaluation_summary(summary):
        raise OutputExistsError("not an evaluation's summary (a training run's?), and evaluate would replace "
                                "it: give another output folder (-o)", summary)
    if not overwrite:
        raise OutputExistsError(f"holds the reports of an earlier evaluation ({', '.join(held)}); give --overwrite "
                                "(overwrite=True) to replace them, or another output folder (-o, out_dir)", out_dir)


#: files only a training run folder holds (its summary.json an evaluation would replace, or stand beside)
_RUN_MARKS = ("last.pt", "model.pt", "stages.json", "log.csv", ".lock")  # not config.yaml: a user's own file


def check_report_folder(out_dir: Path) -> None:
    """Refuse, before any case is scored, an output folder this user cannot write, or whose reports and
    figures another user owns in a shared (sticky) folder: the refusal came after every case was scored, or
    after the figures were replaced and before the tables (helper-109)."""
    from unionseg.jsonfile import check_writable

    check_writable(out_dir, [out_dir / name for name in REPORT_FILES])
    check_writable(out_dir / "figures", [out_dir / "figures" / name for name in FIGURE_FILES])


def _is_evaluation_summary(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"n_cases", "classes", "metrics", "cases"} <= set(data)


def check_label_names(preds: dict[str, Path], space: LabelSpace, project_path: Path | str) -> None:
    """Refuse predictions whose recorded value names (``predict`` writes them in the NIfTI header) the
    project reads otherwise: a project listing its classes in another order than the model's scored the
    kidney as the spleen, silently. Files without the record (other tools, older releases) are not checked.

    Raises:
        ConfigError: naming the prediction, the model's classes and the project's.
    """
    from unionseg.data.io import nifti_label_names

    ours = list(space.names)
    for path in preds.values():
        names = nifti_label_names(path)
        if names is None:
            continue
        shared = min(len(names), len(ours))  # values beyond either list: the value checks of scoring apply
        if ours[:shared] != names[:shared]:
            raise ConfigError(f"{path} was written by a model whose label values mean {_value_list(names)}, "
                              f"but this project reads them as {_value_list(ours)}: evaluate with the project the "
                              f"model was trained on, or list and name the classes as the model does", project_path)


def _value_list(names: list[str]) -> str:
    return "{" + ", ".join(f"{v}: {n}" for v, n in enumerate(names) if v) + "}"


def evaluate_folder(
    pred_dir: str | Path,
    gt_dir: str | Path,
    project: Project | str | Path,
    dataset: str | None = None,
    out_dir: str | Path | None = None,
    tolerance_mm: float = 2.0,
    metrics: Sequence[str] = METRICS,
    workers: int = 1,
    figures: bool = True,
    roots: Mapping[str, str | Path] | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate a folder of predicted label maps against a folder of ground-truth label files.

    Args:
        pred_dir: predictions ``<case>.nii.gz`` (global leaf ids, the input's geometry).
        gt_dir: ground-truth label files ``<case>.nii.gz`` (the dataset's LOCAL values), e.g.
            ``datasets/test/labelsTr``; a dataset's ``oracle_labels`` folder holds global leaf ids instead.
        project: a loaded project or the path of its YAML file.
        dataset: the dataset the truth belongs to; by default the project dataset whose root contains
            ``gt_dir``. Only the classes it annotates are scored.
        out_dir: where ``metrics.csv``, ``summary.json``, ``summary.md`` and ``figures/`` go; None: nothing
            is written (the summary is returned; ``figures`` is ignored).
        tolerance_mm: NSD tolerance in mm.
        metrics: any of ``dice``, ``hd95``, ``nsd``.
        workers: processes scoring cases in parallel (0 or 1: in this process, as ``prepare`` counts them).
        figures: write the PNG figures.
        roots: dataset root overrides when ``project`` is a path.
        progress: show a progress bar with an ETA on stderr (the CLI does).
        overwrite: replace the reports of an earlier evaluation in ``out_dir`` (else they are refused).

    Returns:
        The summary (as written to ``summary.json``; non-finite values are null there) with ``markdown``
        (the table) and ``files`` added.

    Raises:
        DataError: a missing folder or prediction (naming the case), a grid mismatch (naming both files),
            values outside the label space, no class of the dataset that the ground truth can score,
            ``out_dir`` a file.
        OutputExistsError: earlier reports in ``out_dir`` without ``overwrite`` (see
            :func:`check_output_folder`).
        ConfigError: unknown dataset, none inferable, invalid tolerance/workers/metrics.
    """
    from unionseg.config import Project, load_project

    if not isinstance(project, Project):
        project = load_project(project, roots=roots, require_train=False)
    try:
        metrics = check_metrics(metrics)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_tolerance(tolerance_mm)
    check_workers(workers, "evaluate_folder")
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if out_dir is not None:
        out_dir = Path(out_dir)
        check_output_folder(out_dir, overwrite)
        check_report_folder(out_dir)
    if not gt_dir.is_dir():  # before the dataset is inferred from it: "no dataset root contains" misleads
        raise DataError("ground-truth folder not found", gt_dir)
    if not pred_dir.is_dir():
        raise DataError("predictions folder not found", pred_dir)
    space = project.label_space
    spec, oracle = resolve_dataset(project, gt_dir, dataset)
    if oracle:
        lookup = np.full(256, -1, dtype=np.int64)
        lookup[: space.n_leaves] = np.arange(space.n_leaves)
        annotated = space.full_mask()
    else:
        declared = _checked_declared_labels(spec, space.names[1:])
        lookup = space.local_lookup(spec.name, declared if spec.other else None)
        annotated = space.annotated_leaf_mask(spec.name)
        if not space.scorable_keys(annotated):  # it scored nothing, exit 0, and wrote an empty table
            reasons = space.unscored_organs(spec.name)
            raise DataError(f"no class of dataset {spec.name!r} can be scored"
                            + (f": {'; '.join(reasons)}" if reasons else ""), project.path)
        space.warn_annotations(spec.name, project.path)
    truths = _label_files(gt_dir)
    if not truths:
        from unionseg.data.io import IMAGE_SUFFIXES

        raise DataError(f"no label files ({', '.join(IMAGE_SUFFIXES)}) in the ground-truth folder", gt_dir)
    foreign = (dataset is not None and not oracle and not gt_dir.resolve().is_relative_to(Path(spec.root).resolve())
               and _warn_foreign_cases(project, spec, truths, gt_dir))
    preds = _label_files(pred_dir)
    check_not_the_truth(preds, truths, pred_dir)
    missing = [case for case in truths if case not in preds]
    if missing:
        raise DataError(f"no prediction for case {missing[0]!r}{and_more(len(missing), 1)} (expected {missing[0]}.nii.gz for "
                        f"{truths[missing[0]]})", pred_dir)
    check_label_names({case: preds[case] for case in truths}, space, project.path)
    jobs = [(case, preds[case], path, lookup, annotated, space, spec.name, float(tolerance_mm), metrics)
            for case, path in truths.items()]
    scored = run_case_jobs(jobs, workers, progress)
    cases = {case: scores for case, scores, _ in scored}
    warn_skewed({case: skew for case, _, skew in scored}, gt_dir)
    if foreign and not any(row["gt_voxels"] for scores in cases.values() for row in scores.values()):
        # another dataset's files read through this one's map, every value swept to background: Dice 0 or the
        # empty-mask rules on every row, exit 0 (a new user's walkthrough, helper-131); nothing is written
        raise DataError(f"every ground-truth file is empty under dataset {spec.name!r}'s label map "
                        f"{_map_text(spec)}, and none is a case of that dataset: these files use another "
                        "dataset's label values; pass that dataset (--dataset) or declare it in the project file "
                        "(role: test, docs/datasets.md)", gt_dir)
    classes = summarise(cases, space.evaluation_keys(), metrics)
    quality, best, worst = rank_cases(cases, metrics)

    markdown = markdown_table(classes, metrics, tolerance_mm)
    summary: dict[str, Any] = {
        "project": str(project.path), "dataset": spec.name, "ground_truth": str(gt_dir.resolve()),
        "predictions": str(pred_dir.resolve()), "oracle_labels": oracle,
        "annotated_classes": [space.names[i] for i in np.flatnonzero(annotated) if i > 0],
        "metrics": list(metrics), "tolerance_mm": float(tolerance_mm), "hd95_percentile": 95.0,
        "empty_rules": EMPTY_RULE_TEXT, "n_cases": len(cases), "classes": classes,
        "cases": case_records(cases),
        "case_quality": quality, "case_quality_measure": case_quality_measure(metrics),
        "best_case": best, "worst_case": worst,
        "unmatched_predictions": unmatched_predictions(preds, truths),
    }
    if out_dir is None:
        return {**summary, "files": {}, "markdown": markdown}
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics_csv": out_dir / "metrics.csv", "summary_json": out_dir / "summary.json",
             "summary_md": out_dir / "summary.md"}
    if figures and cases:
        files.update(_write_figures(out_dir / "figures", cases, classes, metrics, best, worst, truths, preds,
                                    lookup, space, spec, project, tolerance_mm))
    remove_stale_figures(out_dir / "figures", set(files.values()))
    summary["files"] = {k: str(Path(v).resolve()) for k, v in files.items()}  # as "predictions" and "ground_truth"
    write_metrics_csv(files["metrics_csv"], cases, metrics)
    write_json(files["summary_json"], summary)
    notes = [f"# Evaluation: {spec.name} ({len(cases)} case{'' if len(cases) == 1 else 's'})", "",
             "Organs are scored as regions (organ + its parts); only classes the ground truth annotates are "
             f"scored. Mean ± sd over cases (HD95 with its median: a missed organ scores the image diagonal); NSD "
             f"tolerance {tolerance_mm:g} mm.", "", markdown]
    rule_total = sum(sum(e["empty_rule_cases"].values()) for e in classes.values())
    notes.append(f"Values decided by an empty-mask rule: {rule_total} ("
                 + "; ".join(EMPTY_RULE_TEXT.values()) + ").\n")
    write_text(files["summary_md"], "\n".join(notes))
    return {**summary, "markdown": markdown}


#: the figures evaluate writes: one left from an earlier run into the same -o that this run does not write
#: (--no-figures, a metric or case fewer) is removed, so that no picture disagrees with the tables beside it
FIGURE_FILES = ("dice_boxplot.png", "hd95_boxplot.png", "nsd_boxplot.png", "overlay_best.png", "overlay_worst.png")


def remove_stale_figures(folder: Path, written: set[Path]) -> None:
    """Delete the :data:`FIGURE_FILES` in ``folder`` that are not in ``written``, and the folder when that
    leaves it empty (an evaluation without figures passes an empty set)."""
    for name in FIGURE_FILES:
        stale = folder / name
        if stale not in written and stale.is_file():
            stale.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def draw_boxplots(folder: Path, cases: Mapping[str, CaseScores], keys: Sequence[str], metrics: Sequence[str],
                  tolerance_mm: float) -> dict[str, Path]:
    """A box plot per metric in ``folder`` (made), keyed ``<metric>_boxplot``."""
    from unionseg.evaluation import figures as figs

    folder.mkdir(parents=True, exist_ok=True)
    return {f"{metric}_boxplot": figs.score_boxplot(cases, list(keys), metric, folder / f"{metric}_boxplot.png",
                                                    tolerance_mm=tolerance_mm) for metric in metrics}


def overlay_cases(best: str | None, worst: str | None) -> list[tuple[str, str]]:
    """``(tag, case)`` of the overlays to draw: the best and the worst case, one picture when they are one."""
    return [(tag, case) for tag, case in (("best", best), ("worst", worst))
            if case is not None and not (tag == "worst" and case == best)]


def overlay_title(tag: str, case: str, best: str | None, worst: str | None, scores: CaseScores,
                  metrics: Sequence[str], over: str = "classes") -> str:
    """An overlay's title: which case, and its mean of the first of Dice, NSD, HD95 scored ``over`` classes."""
    measure = next((m for m in ("dice", "nsd", "hd95") if m in metrics), "quality")
    which = "the only scored case" if best == worst else f"{tag} case"  # one case scored: one picture
    return f"{which}: {case} (mean {METRIC_TITLES.get(measure, measure)} over {over} " \
           f"{abs(case_quality(scores, metrics)):.3f})"


def ct_under(image_path: Path | None, geometry: Geometry) -> np.ndarray | None:
    """The CT an overlay is drawn over: the image as read (the figure draws one slice of it) when it reads and
    lies on ``geometry``'s grid, else None (no CT under the labels, rather than no figure)."""
    from unionseg.data.io import read_image

    if image_path is None or not image_path.is_file():
        return None
    try:
        arr, image_geometry = read_image(image_path)
    except UnionsegError:
        return None
    return arr if image_geometry.same_grid(geometry, atol=GRID_ATOL_MM) else None


def _write_figures(folder: Path, cases: Mapping[str, CaseScores], classes: Mapping[str, Any],
                   metrics: Sequence[str], best: str | None, worst: str | None, truths: Mapping[str, Path],
                   preds: Mapping[str, Path], lookup: np.ndarray, space: LabelSpace, spec: DatasetSpec,
                   project: Project, tolerance_mm: float) -> dict[str, Path]:
    from unionseg.evaluation import figures as figs

    out = draw_boxplots(folder, cases, list(classes), metrics, tolerance_mm)
    images = _image_lookup(spec)
    for tag, case in overlay_cases(best, worst):
        pred, gt, geom = load_pair(preds[case], truths[case], lookup, space, spec.name)
        title = overlay_title(tag, case, best, worst, cases[case], metrics)
        out[f"overlay_{tag}"] = figs.overlay(pred, gt, space, geom, folder / f"overlay_{tag}.png", title=title,
                                             image=ct_under(images.get(truths[case].name), geom),
                                             window=project.preprocessing.window)
    return out
