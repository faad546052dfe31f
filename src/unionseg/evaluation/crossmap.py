"""Evaluation across label spaces: score a model on a dataset that labels other (or more) organs.

A model trained on MSD/KiTS predicts OUR global leaves (liver, liver_tumour, kidney, ...); BTCV, AMOS and
WORD label 13 to 16 organs with their own values. A **cross map** (``configs/projects/btcv_eval.yaml``)
names the evaluation set's label values and sends the organs both sides know to a model class::

    name: btcv
    layout: folders:img,label        # how to read a dataset root given as GT (a label folder also works)
    labels: {1: spleen, 2: right_kidney, 3: left_kidney, 4: gallbladder, 6: liver, 11: pancreas, ...}
    shared:                          # evaluation organ -> model class (a leaf or region:<organ>)
      spleen: region:spleen
      right_kidney: region:kidney    # many-to-one: left + right kidney are scored as one kidney
      left_kidney: region:kidney
      liver: [region:liver, hepatic_vessel]   # a union: what the model keeps apart, the set labels as one
      pancreas: region:pancreas
    exclude: []                      # glob patterns of case ids to leave out (AMOS: its MRI cases)

Only the SHARED classes are scored: for a model class ``k`` the truth is the union of the evaluation
values mapped to ``k`` (or to a class inside ``k``: a region also collects values mapped to its leaves) and
the prediction is every voxel whose leaf lies in ``k``. Organs the model lacks (gallbladder, aorta, ...)
and model classes the evaluation set does not label (tumours) are not scored; their voxels simply count as
"not this class". A shared entry may name several model classes (a list, or their keys joined by ``+``):
it is scored as their union, for a set that labels as one organ what the model keeps apart (BTCV's liver
holds the vessels inside it, which a MOTS model predicts as ``hepatic_vessel``). A shared entry whose model
class this model does not have is dropped and reported, so one map serves several recipes; of a union, the
members the model has are scored (the whole entry is dropped only when it has none). Evaluation sets are
fully labelled for their organs, so a zero is trusted: a predicted liver on the BTCV gallbladder is a false
positive.

Metrics and empty-mask rules are those of :mod:`unionseg.evaluation.metrics` (never NaN). No torch here.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from unionseg.errors import ConfigError, DataError, UnionsegWarning, and_more, listing
from unionseg.evaluation.evaluate import (
    case_quality_measure,
    case_records,
    check_label_names,
    check_metrics,
    check_not_the_truth,
    check_tolerance,
    check_workers,
    display_key,
    label_range_problem,
    on_truth_grid,
    rank_cases,
    remove_stale_figures,
    run_case_jobs,
    warn_skewed,
    write_metrics_csv,
)
from unionseg.evaluation.metrics import METRICS, score_masks
from unionseg.jsonfile import write_json, write_text
from unionseg.labels import REGION_PREFIX, LabelSpace

CaseScores = dict[str, dict[str, float]]
"""class key -> {metric: value, "pred_voxels": n, "gt_voxels": n}"""

_MAP_KEYS = {"name", "notes", "layout", "labels", "shared", "exclude"}


# ---------------------------------------------------------------------- the map file
@dataclass(frozen=True)
class CrossMap:
    """An evaluation set's label values and the organs it shares with unionseg models.

    Attributes:
        name: the evaluation set (``btcv``).
        labels: its label value -> organ name (0 is background and is not listed).
        shared: its organ name -> model class key (a leaf name or ``region:<organ>``, or several joined by
            ``+``: their union).
        layout: catalog layout used when the ground truth is given as a dataset root.
        exclude: glob patterns of case ids left out of the evaluation.
        path: the map file (for error messages).
    """

    name: str
    labels: dict[int, str]
    shared: dict[str, str]
    layout: str = "auto"
    exclude: tuple[str, ...] = ()
    path: Path | None = None

    def gt_map(self, space: LabelSpace) -> tuple[dict[int, str], dict[str, str]]:
        """The value -> model class map for one model's label space, and what was left out.

        Returns:
            ``(value -> model class key for the classes the model has, organ -> reason for each shared entry
            dropped because the model lacks its class)``.
        """
        kept: dict[int, str] = {}
        dropped: dict[str, str] = {}
        value_of: dict[str, list[int]] = {}
        for value, organ in self.labels.items():
            value_of.setdefault(organ, []).append(value)
        for organ, key in self.shared.items():
            members = class_members(key)
            present = [m for m in members if has_class(space, m)]
            for member in members:
                near = None if member in present else nearest_class(space, member)
                if near:  # a map may name classes some models lack, but this one looks like a typo
                    scored = f"so {organ} is not scored" if not present else f"so {organ} is scored without it"
                    warnings.warn(f"{self.path or self.name}: shared.{organ}: {member!r} is not a class of the "
                                  f"model, {scored}; did you mean {near!r}?", UnionsegWarning, stacklevel=2)
            if not present:
                what = f"class {key!r}" if len(members) == 1 else f"class of {', '.join(map(repr, members))}"
                near = nearest_class(space, members[0]) if len(members) == 1 else None
                dropped[organ] = f"the model has no {what}" + (f"; did you mean {near!r}?" if near else "")
                continue
            for value in value_of[organ]:
                kept[value] = UNION.join(present)
        return kept, dropped


UNION = "+"
"""Joins the model classes of a shared entry scored as their union (``region:liver+hepatic_vessel``)."""


def class_members(key: str) -> list[str]:
    """The model classes a class key names: one, or the members of a union joined by ``+``."""
    return [m.strip() for m in key.split(UNION)]


def class_leaves(space: LabelSpace, key: str) -> list[int]:
    """Leaf ids a class key covers: a leaf, a region's leaves, or the union of its members' leaves."""
    return sorted({leaf for member in class_members(key) for leaf in space.leaves_of(member)})


def has_class(space: LabelSpace, key: str) -> bool:
    """Whether ``key`` (a leaf name or ``region:<organ>``, or several joined by ``+``) names classes of
    ``space`` (not background)."""
    if UNION in key:
        return all(has_class(space, member) for member in class_members(key))
    if key.startswith(REGION_PREFIX):
        return key[len(REGION_PREFIX):] in {g.name for g in space.groups}
    return key in space.names[1:]


def nearest_class(space: LabelSpace, key: str) -> str | None:
    """The class of ``space`` whose name is closest to ``key`` (a region to a region, a leaf to a leaf), when
    it is close enough to be the class a misspelt ``key`` meant; else None."""
    import difflib

    head, colon, rest = key.partition(":")
    # a misspelt or recased prefix ("regoin:kidney", "Region:liver") is still a region: compared to the leaf
    # names as a whole it matched nothing, and the hint was lost (helper-103)
    if colon and not key.startswith(REGION_PREFIX) and \
            difflib.SequenceMatcher(None, head.lower(), REGION_PREFIX[:-1]).ratio() >= 0.6:
        key = REGION_PREFIX + rest
    is_region = key.startswith(REGION_PREFIX)
    name = key[len(REGION_PREFIX):] if is_region else key
    names = [g.name for g in space.groups] if is_region else list(space.names[1:])
    hits = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return None if not hits else (REGION_PREFIX + hits[0] if is_region else hits[0])


def builtin_maps() -> dict[str, Path]:
    """The cross maps shipped inside unionseg (``configs/projects/*_eval.yaml``), by name."""
    from unionseg.training.recipes import recipe_dir

    return {p.stem: p for p in sorted((recipe_dir() / "projects").glob("*_eval.yaml"))}


def load_cross_map(path: str | Path) -> CrossMap:
    """Read and validate a cross map file (see the module docstring for its keys), or a map built into
    unionseg named as such (``btcv_eval``, see :func:`builtin_maps`) when no such file exists.

    Raises:
        ConfigError: naming the file and the key: unknown keys, a value outside 1..255, a shared organ the
            ``labels`` do not name, a malformed target, or no shared organ at all.
    """
    from unionseg.config import load_yaml

    path = Path(path)
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if not path.is_file() and path.parent == Path("."):  # a bare name (or NAME.yaml) that is no file here
        shipped = builtin_maps()
        if name in shipped:
            path = shipped[name]
        elif not path.suffix:
            raise ConfigError(f"no such file, and no cross map of that name is built in ({', '.join(shipped)})",
                              path)
    raw = load_yaml(path)
    if not isinstance(raw, Mapping):
        raise ConfigError("expected a mapping with 'labels' and 'shared'", path)
    unknown = set(raw) - _MAP_KEYS
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(_MAP_KEYS))})", path)
    labels_raw = raw.get("labels")
    if not isinstance(labels_raw, Mapping) or not labels_raw:
        raise ConfigError("labels: expected a mapping label value -> organ name", path)
    labels: dict[int, str] = {}
    for k, v in labels_raw.items():
        try:
            value = int(k)
        except (TypeError, ValueError):
            raise ConfigError(f"labels: {k!r} is not an integer label value", path) from None
        if not 1 <= value <= 255:
            raise ConfigError(f"labels.{k}: label values are 1..255 (0 is background)", path)
        if not isinstance(v, str) or not v:
            raise ConfigError(f"labels.{k}: expected an organ name, got {v!r}", path)
        if value in labels:  # 1 and "1": two keys, one value (the YAML loader refuses a key written twice)
            raise ConfigError(f"labels: value {value} is given twice ({labels[value]!r} and {v!r})", path)
        labels[value] = v
    shared_raw = raw.get("shared")
    if not isinstance(shared_raw, Mapping) or not shared_raw:
        raise ConfigError("shared: expected a mapping organ -> model class (a leaf or region:<organ>)", path)
    shared: dict[str, str] = {}
    organs = set(labels.values())
    for organ, key in shared_raw.items():
        if organ not in organs:
            raise ConfigError(f"shared.{organ}: not an organ of 'labels' (known: {', '.join(sorted(organs))})", path)
        members = key if isinstance(key, list) else class_members(key) if isinstance(key, str) else [key]
        if not members or not all(isinstance(m, str) and m.strip() and m.strip() not in ("background", REGION_PREFIX)
                                  for m in members):
            raise ConfigError(f"shared.{organ}: expected a model class (a leaf or region:<organ>) or a list of them, "
                              f"got {key!r}", path)
        members = list(dict.fromkeys(m.strip() for m in members))
        if any(UNION in m for m in members):
            raise ConfigError(f"shared.{organ}: a list's entries are single classes, got {key!r}", path)
        shared[str(organ)] = UNION.join(members)
    layout = raw.get("layout", "auto")
    if not isinstance(layout, str) or not layout:
        raise ConfigError("layout: expected a layout name", path)
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) and p for p in exclude):
        raise ConfigError("exclude: expected a list of case id patterns", path)
    name = raw.get("name", path.stem)
    return CrossMap(str(name), labels, shared, layout, tuple(exclude), path)


# ---------------------------------------------------------------------- one case
def scored_keys(model_space: LabelSpace, gt_map: Mapping[int, str]) -> list[str]:
    """The shared classes, in the model's evaluation order (regions, then parts, then other leaves; a union
    where its first member stands)."""
    order = list(dict.fromkeys(model_space.evaluation_keys() + list(model_space.names[1:])))
    return sorted(set(gt_map.values()), key=lambda k: (order.index(class_members(k)[0]), k))


def _check_gt_map(model_space: LabelSpace, gt_map: Mapping[int, str]) -> None:
    if not gt_map:
        raise ConfigError("no shared class: the evaluation set's map names none of the model's classes")
    for value, key in gt_map.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            raise ConfigError(f"gt_map: label value {value!r} must be an integer in 1..255")
        if not has_class(model_space, key):
            raise ConfigError(f"gt_map.{value}: {key!r} is not a class of the model "
                              f"(known: {', '.join(model_space.names[1:])} and their region:<organ>, or several "
                              "joined by '+')")


def gt_values_of(model_space: LabelSpace, gt_map: Mapping[int, str], key: str) -> list[int]:
    """Evaluation values whose class lies inside ``key`` (a region collects the values of its leaves)."""
    leaves = set(class_leaves(model_space, key))
    return sorted(v for v, k in gt_map.items() if set(class_leaves(model_space, k)) <= leaves)


def evaluate_cross_case(
    pred: np.ndarray,
    gt: np.ndarray,
    model_space: LabelSpace,
    gt_map: Mapping[int, str],
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
    metrics: Sequence[str] = METRICS,
) -> CaseScores:
    """Score one prediction on the classes it shares with a ground truth from another label space.

    Args:
        pred: (X, Y, Z) integer leaf ids of ``model_space``.
        gt: (X, Y, Z) integer label values of the evaluation set (its own space).
        model_space: the model's label space.
        gt_map: evaluation value -> model class key (leaf or ``region:<organ>``, or several joined by ``+``:
            their union); values not listed are organs the model does not know (they count as "not this
            class").
        spacing: voxel size in mm along X, Y, Z.
        tolerance_mm: NSD tolerance.
        metrics: any of ``dice``, ``hd95``, ``nsd``.

    Returns:
        model class key -> {metric: value, ``pred_voxels``, ``gt_voxels``}, for the shared classes only.

    Raises:
        ValueError: shapes differ, or prediction values outside the model's leaf ids.
        ConfigError: an empty map or a target the model does not have.
    """
    _check_gt_map(model_space, gt_map)
    metrics = check_metrics(metrics)
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if pred.size and (int(pred.min()) < 0 or int(pred.max()) >= model_space.n_leaves):
        raise ValueError(f"prediction values must be leaf ids 0..{model_space.n_leaves - 1}, "
                         f"got {int(pred.min())}..{int(pred.max())}")
    out: CaseScores = {}
    for key in scored_keys(model_space, gt_map):
        truth = np.isin(gt, gt_values_of(model_space, gt_map, key))
        predicted = np.isin(pred, class_leaves(model_space, key))
        out[key] = score_masks(predicted, truth, spacing, metrics, tolerance_mm).as_dict()
    return out


# ---------------------------------------------------------------------- folders
def _label_folder_cases(folder: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    from unionseg.data.catalog import image_files

    return {key: (path, (key,)) for key, path in image_files(folder).items()}


def ground_truth_cases(gt: Path, layout: str = "auto") -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Case id -> (label file, names a prediction of that case may carry).

    ``gt`` is either a folder of label files (the case is the file name) or a dataset root in any layout
    the catalog reads (a prediction may then be named after the case, its image or its label file).

    Raises:
        DataError: a missing folder, no label files, or an unreadable dataset root.
    """
    return _ground_truth(Path(gt), layout)[0]


def _ground_truth(gt: Path, layout: str) -> tuple[dict[str, tuple[Path, tuple[str, ...]]], dict[str, Path]]:
    """:func:`ground_truth_cases`, and each case's image where ``gt`` is a dataset root (a folder of label
    files names none): the figures draw the truth over it."""
    from unionseg.data.catalog import image_key, scan_dataset

    if not gt.is_dir():
        raise DataError("ground-truth folder not found", gt)
    direct = _label_folder_cases(gt)
    if direct:
        return direct, {}
    try:
        info = scan_dataset("evaluation", gt, layout)
    except DataError as exc:
        raise DataError(f"no label files here, and not a dataset root either ({exc.message})", gt) from None
    out: dict[str, tuple[Path, tuple[str, ...]]] = {}
    images: dict[str, Path] = {}
    for case in info.cases:
        assert case.label is not None
        names = tuple(dict.fromkeys((case.case_id, image_key(case.image), image_key(case.label))))
        out[case.case_id] = (case.label, names)
        images[case.case_id] = case.image
    return out, images


def pair_predictions(pred_dir: Path, cases: Mapping[str, tuple[Path, tuple[str, ...]]]
                     ) -> tuple[dict[str, Path], list[str]]:
    """Case id -> prediction file, and the predictions that match no case.

    A prediction matches a case by name (the case id, its image or its label name), else by the numbers
    in the names when unambiguous (``img0001.nii.gz`` <-> ``label0001.nii.gz``). ``*_probs`` files written
    by ``predict --probabilities`` are ignored.

    Raises:
        DataError: the folder is missing, or a case has no prediction (naming the case and its label file).
    """
    from unionseg.data.catalog import image_files, match_by_name, name_numbers

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError("prediction folder not found", pred_dir)
    preds = {k: p for k, p in image_files(pred_dir).items() if not k.endswith("_probs")}
    by_name: dict[str, Path] = {}
    rest: dict[str, Path] = {}
    for case, (label, names) in cases.items():
        hit = next((preds[n] for n in names if n in preds), None)
        if hit is not None:
            by_name[case] = hit
        else:
            rest[case] = label
    used = {p.name for p in by_name.values()}
    free = {k: p for k, p in preds.items() if p.name not in used}
    pairs, missing, unmatched = match_by_name(rest, free)
    for case, key in pairs.items():
        by_name[case] = free[key]
    if missing:
        case = missing[0]
        numbers = name_numbers(case)
        # numbers that pair nothing because they are not unique said "no prediction" alone (helper-103)
        rivals = sorted(k for k in free if numbers is not None and name_numbers(k) == numbers)
        twins = [c for c in rest if numbers is not None and name_numbers(c) == numbers]
        if len(rivals) > 1:
            why = (f": {len(rivals)} predictions carry its number ({listing(rivals)}), so none is paired by number; "
                   f"name the right one {case}.nii.gz")
        elif len(twins) > 1:
            why = (f": the cases {listing(twins)} carry the same number, so no prediction is paired with them by "
                   f"number; name each prediction after its case ({case}.nii.gz)")
        else:
            why = "; predictions are matched by name or by the numbers in the name"
        raise DataError(f"no prediction for case {case!r}{and_more(len(missing), 1)} (ground truth {cases[case][0]})"
                        + why, pred_dir)
    return {case: by_name[case] for case in cases}, sorted(unmatched)


def _read_pair(pred_path: Path, gt_path: Path, model_space: LabelSpace, labels: Mapping[int, str] | None
               ) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
    """The prediction on the truth's grid, the truth (uint8), its geometry, and which of the 256 label values
    the truth holds."""
    from unionseg.data.io import read_image

    pred, pred_geom = read_image(pred_path)
    gt, gt_geom = read_image(gt_path)
    for arr, path, what in ((pred, pred_path, "prediction"), (gt, gt_path, "ground truth")):
        if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
            if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
                raise DataError(f"{what} holds non-integer values (dtype {arr.dtype})", path)
    if pred.size and (pred.min() < 0 or pred.max() >= model_space.n_leaves):
        raise DataError(f"prediction holds values outside the model's leaf ids 0..{model_space.n_leaves - 1}",
                        pred_path)
    pred = on_truth_grid(pred, pred_geom, gt_geom, pred_path, gt_path)
    problem = label_range_problem(int(gt.min()), int(gt.max())) if gt.size else None
    if problem is not None:
        raise DataError(problem, gt_path)
    gt = gt.astype(np.uint8)
    present = np.bincount(gt.reshape(-1), minlength=256) > 0
    if labels is not None:
        unknown = [int(v) for v in np.flatnonzero(present) if v != 0 and int(v) not in labels]
        if unknown:
            raise DataError(f"label values {unknown} are not in the evaluation set's labels "
                            f"({sorted(labels)}); check the map file or the folder", gt_path)
    return pred.astype(np.uint8), gt, gt_geom, present


def evaluate_cross(
    pred_dir: str | Path,
    gt_dir: str | Path,
    model_space: LabelSpace,
    gt_map: Mapping[int, str],
    out_dir: str | Path | None = None,
    gt_labels: Mapping[int, str] | None = None,
    layout: str = "auto",
    exclude: Sequence[str] = (),
    tolerance_mm: float = 2.0,
    metrics: Sequence[str] = METRICS,
    dropped: Mapping[str, str] | None = None,
    name: str = "evaluation",
    progress: bool = False,
    overwrite: bool = False,
    figures: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Score a folder of predictions on a dataset labelled in another label space (shared classes only).

    Args:
        pred_dir: predictions ``<case>.nii.gz`` in the model's global leaf ids (the input's geometry).
        gt_dir: a folder of ground-truth label files, or a dataset root (read with ``layout``).
        model_space: the label space the model predicts (its project's).
        gt_map: evaluation value -> model class key (leaf or ``region:<organ>``, or a union joined by ``+``), e.g. from
            :meth:`CrossMap.gt_map`; only the classes named here are scored.
        out_dir: if given, ``metrics.csv``, ``summary.json``, ``summary.md`` and ``figures/`` are written there.
        gt_labels: the evaluation set's declared values; any other value in a truth is an error. None: not
            checked (unmapped values are organs the model does not know).
        layout: catalog layout of ``gt_dir`` when it is a dataset root.
        exclude: glob patterns of case ids to leave out.
        tolerance_mm: NSD tolerance in mm.
        metrics: any of ``dice``, ``hd95``, ``nsd``.
        dropped: organ -> reason, for shared organs the model lacks (reported, not scored).
        name: the evaluation set's name (reports).
        progress: show a progress bar with an ETA on stderr (the CLI does).
        overwrite: replace an earlier evaluation's reports in ``out_dir`` (else they are refused, as by
            :func:`unionseg.evaluation.evaluate.check_output_folder`).
        figures: with ``out_dir``, draw ``evaluate``'s figures: a box plot per metric, and the best and the
            worst case on the shared classes (over the CT when ``gt_dir`` is a dataset root).
        workers: processes scoring cases in parallel (0 or 1: in this process; a script that passes more
            calls this under ``if __name__ == "__main__":``, as for ``evaluate_folder``).

    Returns:
        A summary: ``cases`` (case -> class key -> metrics), ``classes`` (per class mean/sd/...), ``scored``
        (the shared class keys), ``not_scored`` (dropped organs), ``case_quality`` with ``best_case`` and
        ``worst_case`` (as ``evaluate``'s), ``markdown`` (a table) and ``files``.

    Raises:
        DataError: missing folders or predictions, grid mismatches, values outside either label space.
        ConfigError: an empty map, a target the model lacks, bad metrics or tolerance.
        OutputExistsError: earlier reports in ``out_dir`` without ``overwrite``.
    """
    from unionseg.evaluation.evaluate import (
        check_output_folder,
        check_report_folder,
        markdown_table,
        summarise,
    )

    _check_gt_map(model_space, gt_map)
    if out_dir is not None:
        check_output_folder(Path(out_dir), overwrite)
        check_report_folder(Path(out_dir))
    try:
        metrics = check_metrics(metrics)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_tolerance(tolerance_mm)
    check_workers(workers, "evaluate_cross")
    every, images = _ground_truth(Path(gt_dir), layout)
    # a pattern of the ids' form that matches none of them is harmless (AMOS's MRI ids are spread over its
    # splits, so one split holds none of a range); one of another form is most likely a mistake
    unused = [p for p in exclude if not any(fnmatch.fnmatchcase(c, p) for c in every)
              and not any(fnmatch.fnmatchcase(c, _id_form(p)) for c in every)]
    if unused and every:
        warnings.warn(f"exclude pattern {unused[0]!r} matches no case id of {gt_dir} (they look like "
                      f"{next(iter(every))!r})", UnionsegWarning, stacklevel=2)
    cases = {c: v for c, v in every.items() if not any(fnmatch.fnmatchcase(c, p) for p in exclude)}
    if not cases:
        raise DataError("no ground-truth cases left to evaluate", gt_dir)
    preds, unmatched = pair_predictions(Path(pred_dir), cases)
    excluded = sorted(set(every) - set(cases))
    # a prediction of an excluded case (by name, or by the numbers in it, as predictions are paired) is left
    # out, not "matching no ground truth"
    from unionseg.data.catalog import name_numbers

    names_out = {n for c in excluded for n in (c, *every[c][1])}
    kept_numbers = {name_numbers(n) for c in cases for n in (c, *cases[c][1])}
    numbers_out = {name_numbers(n) for n in names_out} - kept_numbers - {None}
    unmatched = [u for u in unmatched if u not in names_out and name_numbers(u) not in numbers_out]
    check_not_the_truth(preds, {case: label for case, (label, _) in cases.items()}, Path(pred_dir))
    check_label_names({case: preds[case] for case in cases}, model_space, model_space.source)
    keys = scored_keys(model_space, gt_map)
    jobs = [(case, preds[case], label_path, model_space, dict(gt_labels) if gt_labels is not None else None,
             dict(gt_map), float(tolerance_mm), tuple(metrics)) for case, (label_path, _) in cases.items()]
    scores: dict[str, CaseScores] = {}
    present = np.zeros(256, dtype=bool)  # the label values some case's truth holds
    skews: dict[str, float] = {}
    for case, case_scores, skew, holds in run_case_jobs(jobs, workers, progress, _score_cross_pair, "evaluate-cross"):
        scores[case], skews[case] = case_scores, skew
        present |= holds
    _warn_absent_organs(present, gt_map, len(scores), Path(gt_dir))
    warn_skewed(skews, Path(gt_dir))
    classes = summarise(scores, keys, metrics)
    quality, best, worst = rank_cases(scores, metrics)
    markdown = markdown_table(classes, metrics, tolerance_mm)
    summary: dict[str, Any] = {
        "evaluation_set": name, "ground_truth": str(Path(gt_dir).resolve()),
        "predictions": str(Path(pred_dir).resolve()), "n_cases": len(scores),
        "gt_map": {int(v): k for v, k in sorted(gt_map.items())}, "scored": keys,
        "not_scored": dict(dropped or {}), "metrics": list(metrics), "tolerance_mm": float(tolerance_mm),
        "classes": classes,
        "cases": case_records(scores),
        "case_quality": quality, "case_quality_measure": case_quality_measure(metrics),
        "best_case": best, "worst_case": worst,
        "unmatched_predictions": unmatched, "excluded": excluded, "files": {},
    }
    if out_dir is not None:
        drawn: dict[str, Path] = {}
        if figures and scores:
            drawn = _write_figures(Path(out_dir) / "figures", scores, keys, metrics, tolerance_mm, best, worst,
                                   {case: (preds[case], cases[case][0], images.get(case)) for case in (best, worst)
                                    if case is not None}, model_space, gt_map, gt_labels)
        summary["files"] = _write_reports(Path(out_dir), summary, scores, metrics, markdown, drawn)
    return {**summary, "markdown": markdown}


def _score_cross_pair(job: tuple[Any, ...]) -> tuple[str, CaseScores, float, np.ndarray]:
    """One case of :func:`evaluate_cross` (module level: worker processes run it): ``(case, scores, the truth
    grid's skew in degrees, which label values the truth holds)``."""
    case, pred_path, label_path, model_space, gt_labels, gt_map, tolerance_mm, metrics = job
    pred, gt, geom, holds = _read_pair(pred_path, label_path, model_space, gt_labels)
    return (case, evaluate_cross_case(pred, gt, model_space, gt_map, geom.spacing, tolerance_mm, metrics),
            geom.skew_degrees(), holds)


def _warn_absent_organs(present: np.ndarray, gt_map: Mapping[int, str], n_cases: int, gt_dir: Path) -> None:
    """Warn for a shared class whose label values no case's truth holds: over several cases that is almost
    always another dataset's map, or another folder (BTCV scored with WORD's map read exit 0, every organ but
    one at Dice 0 against an empty truth; helper-103)."""
    if n_cases < 2:  # one case may lack an organ
        return
    by_key: dict[str, list[int]] = {}
    for value, key in sorted(gt_map.items()):
        by_key.setdefault(key, []).append(int(value))
    for key, values in by_key.items():
        if not present[values].any():
            shown = ", ".join(map(str, values))
            warnings.warn(f"{gt_dir}: none of its {n_cases} label files holds the value{'s' if len(values) > 1 else ''} "
                          f"{shown} that the map reads as {display_key(key)}, so {display_key(key)} is scored "
                          f"against an empty truth in every case: the wrong map, or the wrong folder?",
                          UnionsegWarning, stacklevel=3)


def _id_form(pattern: str) -> str:
    """An exclude pattern with each digit and each bracket expression made a one-character wildcard:
    ``amos_05[1-9][0-9]`` -> ``amos_????``, the form of the case ids it is meant for."""
    import re

    return re.sub(r"\d", "?", re.sub(r"\[[^\]]*\]", "?", pattern))


def _write_figures(folder: Path, scores: Mapping[str, CaseScores], keys: Sequence[str], metrics: Sequence[str],
                   tolerance_mm: float, best: str | None, worst: str | None,
                   files: Mapping[str, tuple[Path, Path, Path | None]], model_space: LabelSpace,
                   gt_map: Mapping[int, str], gt_labels: Mapping[int, str] | None) -> dict[str, Path]:
    """``evaluate``'s figures for the shared classes: a box plot per metric, and truth and prediction of the
    best and the worst case (``files``: case -> (prediction, label file, image or None)). The truth is drawn
    in the model's classes (an evaluation value as the class the map sends it to; a union as its first
    member), the prediction on the shared classes only, so that the two pictures show what was scored."""
    from unionseg.evaluation import figures as figs
    from unionseg.evaluation.evaluate import ct_under, draw_boxplots, overlay_cases, overlay_title

    out = draw_boxplots(folder, scores, keys, metrics, tolerance_mm)
    lookup = np.zeros(256, dtype=np.int64)  # evaluation value -> model code (0: an organ the model lacks)
    for value, key in gt_map.items():
        lookup[int(value)] = model_space.code(class_members(key)[0])
    shown = np.zeros(model_space.n_leaves, dtype=bool)
    shown[[leaf for key in keys for leaf in class_leaves(model_space, key)]] = True
    for tag, case in overlay_cases(best, worst):
        pred_path, label_path, image_path = files[case]
        pred, gt, geom, _ = _read_pair(pred_path, label_path, model_space, gt_labels)
        title = overlay_title(tag, case, best, worst, scores[case], metrics, over="the shared classes")
        out[f"overlay_{tag}"] = figs.overlay(np.where(shown[pred], pred, 0), lookup[gt], model_space, geom,
                                             folder / f"overlay_{tag}.png", title=title,
                                             image=ct_under(image_path, geom))
    return out


def _write_reports(out: Path, summary: Mapping[str, Any], scores: Mapping[str, CaseScores],
                   metrics: Sequence[str], markdown: str, figures: Mapping[str, Path]) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics_csv": out / "metrics.csv", "summary_json": out / "summary.json",
             "summary_md": out / "summary.md", **figures}
    files = {k: v.resolve() for k, v in files.items()}  # absolute, as the summary's other paths
    # figures of an earlier evaluation into this -o (--overwrite) that this one did not draw would sit
    # beside tables they do not show (helper-103)
    remove_stale_figures(out / "figures", set(figures.values()))
    write_metrics_csv(files["metrics_csv"], scores, metrics)
    write_json(files["summary_json"], {**summary, "files": {k: str(v) for k, v in files.items()}})
    shared = ", ".join(display_key(k) for k in summary["scored"])
    lines = [f"# Cross-label-space evaluation: {summary['evaluation_set']} ({summary['n_cases']} cases)", "",
             f"Scored on the shared classes only: {shared}. Organs are regions (organ + its parts).", ""]
    if summary["not_scored"]:
        lines += ["Not scored: " + "; ".join(f"{o} ({r})" for o, r in summary["not_scored"].items()), ""]
    write_text(files["summary_md"], "\n".join(lines) + markdown)
    return {k: str(v) for k, v in files.items()}


def model_space_from(project: str | Path | None = None, model: str | Path | None = None) -> LabelSpace:
    """The label space a model predicts: from its model file, or from the project file it was trained on.

    A project's dataset roots are irrelevant here, so none is needed (``--root`` or a roots file are not).

    Raises:
        ConfigError: neither or both given, or an invalid project file.
        CheckpointError: an unreadable model file.
    """
    from unionseg.config import load_project, load_yaml

    if (project is None) == (model is None):
        raise ConfigError("give the model's label space with exactly one of --project or --model")
    if model is not None:
        from unionseg.modelfile import load_model

        return LabelSpace.from_dict(load_model(model)["label_space"], source=str(model))
    assert project is not None
    raw = load_yaml(project)
    entries = raw.get("datasets") if isinstance(raw, Mapping) else None
    names = [d["name"] for d in entries or [] if isinstance(d, Mapping) and isinstance(d.get("name"), str)]
    placeholder = Path(project).resolve().parent  # roots only locate data, which is not read here
    return load_project(project, roots={n: placeholder for n in names}).label_space


def evaluate_with_map(
    pred_dir: str | Path,
    gt_dir: str | Path,
    model_space: LabelSpace,
    cross_map: str | Path | CrossMap,
    out_dir: str | Path | None = None,
    tolerance_mm: float = 2.0,
    metrics: Sequence[str] = METRICS,
    progress: bool = False,
    overwrite: bool = False,
    figures: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """:func:`evaluate_cross` with the value -> class map built from a cross map file for this model.

    Raises:
        ConfigError: an invalid map file, or no organ of the map shared with the model.
        DataError: as :func:`evaluate_cross`.
    """
    cmap = cross_map if isinstance(cross_map, CrossMap) else load_cross_map(cross_map)
    gt_map, dropped = cmap.gt_map(model_space)
    if not gt_map:
        raise ConfigError(f"no organ of {cmap.name!r} is shared with the model's classes "
                          f"({', '.join(model_space.names[1:])}): {'; '.join(dropped.values())}", cmap.path)
    return evaluate_cross(pred_dir, gt_dir, model_space, gt_map, out_dir=out_dir, gt_labels=cmap.labels,
                          layout=cmap.layout, exclude=cmap.exclude, tolerance_mm=tolerance_mm, metrics=metrics,
                          dropped=dropped, name=cmap.name, progress=progress,
                          overwrite=overwrite, figures=figures, workers=workers)


# ---------------------------------------------------------------------- CLI
def evaluate_cross_command(
    pred: Annotated[Path, typer.Argument(help="Folder of predicted label maps (the model's leaf ids).")],
    gt: Annotated[Path, typer.Argument(help="Folder of ground-truth label files, or the dataset root.")],
    map_file: Annotated[Path, typer.Option("--map", help="Cross map file, or the name of one built into unionseg: "
                                                         "btcv_eval, amos_eval, word_eval.")],
    out: Annotated[Path, typer.Option("--out", "-o", "--output", help="Output folder for metrics.csv, summary.*, figures/.")],
    project: Annotated[Optional[Path], typer.Option(
        "--project", "-p", help="The project file the model was trained on (its classes; roots not needed). Exactly one "
             "of --project or --model is required.")] = None,
    model: Annotated[Optional[Path], typer.Option(
        "--model", help="Or the model file itself (its classes). Exactly one of --project or --model is "
             "required.")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="NSD tolerance in mm.")] = 2.0,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Write PNG figures.", metavar="")] = True,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes scoring cases (0 or 1: in this "
                                                                  "process).")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.", metavar="")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the reports of an earlier evaluation in -o.", metavar="")] = False,
) -> None:
    """Score a model on a dataset with another label space (e.g. BTCV), on the shared classes only."""
    from unionseg.progress import print_markdown_table, results_console

    space = model_space_from(project, model)
    summary = evaluate_with_map(pred, gt, space, map_file, out_dir=out, tolerance_mm=tolerance, progress=not quiet,
                                overwrite=overwrite, figures=figures, workers=workers)
    console = results_console()
    console.print(f"[bold]{summary['evaluation_set']}[/bold]: {summary['n_cases']} case{'' if summary['n_cases'] == 1 else 's'} -> {out}")
    console = print_markdown_table(summary["markdown"], console)
    for organ, reason in summary["not_scored"].items():
        console.print(f"not scored: {organ} ({reason})")
    if summary.get("excluded"):
        console.print(f"excluded by the map: {len(summary['excluded'])} case(s) "
                      f"({listing(summary['excluded'], 5)})")
    if summary["unmatched_predictions"]:
        console.print(f"note: {len(summary['unmatched_predictions'])} predictions match no ground truth "
                      f"and were ignored ({listing(summary['unmatched_predictions'], 5)})")


def register(app: typer.Typer) -> None:
    """Add ``unionseg evaluate-cross`` (no torch import)."""
    app.command("evaluate-cross")(evaluate_cross_command)
