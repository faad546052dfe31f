"""Find the cases of a dataset folder: Medical Segmentation Decathlon and nnU-Net v2 raw layouts.

MSD: ``dataset.json`` with ``labels`` (value -> name) and a ``training`` list of ``{image, label}`` paths
relative to the root (``./imagesTr/liver_0.nii.gz``). nnU-Net v2 raw: ``dataset.json`` with
``channel_names``, ``labels`` (name -> value) and ``file_ending``; images ``imagesTr/<case>_0000<ending>``
and labels ``labelsTr/<case><ending>``. Every path must stay inside the dataset root.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from unionseg.data.io import IMAGE_SUFFIXES, strip_suffix, suffix_of
from unionseg.errors import DataError

LAYOUTS = ("msd", "nnunet")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case. ``oracle_label`` is the full truth (phantom only)."""

    dataset: str
    case_id: str
    image: Path
    label: Path | None
    oracle_label: Path | None = None


@dataclass(frozen=True)
class DatasetInfo:
    layout: str
    declared_labels: dict[int, str]
    cases: tuple[CaseFiles, ...]


def read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    if not path.is_file():
        raise DataError("no dataset.json (MSD and nnU-Net v2 raw layouts need one)", root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"invalid JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise DataError("expected a JSON object at the top level", path)
    return data


def detect_layout(root: Path, data: Mapping[str, Any]) -> str:
    if "training" in data:
        return "msd"
    if "channel_names" in data or "file_ending" in data:
        return "nnunet"
    raise DataError("dataset.json matches no known layout: MSD needs 'training'; nnU-Net v2 needs "
                    "'channel_names' and 'file_ending'", root / "dataset.json")


def _inside(root: Path, rel: Any, where: str, json_path: Path) -> Path:
    """``root / rel`` after checking that ``rel`` is relative and stays inside ``root``.

    The check is lexical (``..`` components are resolved against the path itself, symbolic links are not
    followed), so a dataset whose ``imagesTr`` is a link to another disk is accepted while
    ``../x.nii.gz`` is not.
    """
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{where}: expected a relative path string, got {rel!r}", json_path)
    if Path(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or rel.startswith("~"):
        raise DataError(f"{where}: absolute path {rel!r} is not allowed; paths are relative to the dataset root",
                        json_path)
    base = Path(os.path.normpath(root.absolute()))
    path = Path(os.path.normpath(base / rel))
    if not path.is_relative_to(base) or path == base:
        raise DataError(f"{where}: path {rel!r} escapes the dataset root", json_path)
    return path


def _declared_msd(data: Mapping[str, Any], json_path: Path) -> dict[int, str]:
    if "labels" not in data:
        raise DataError("missing key 'labels' (an object value -> name)", json_path)
    labels = data.get("labels")
    if not isinstance(labels, Mapping):
        raise DataError("'labels' must be an object value -> name", json_path)
    out = {}
    for k, v in labels.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise DataError(f"labels: key {k!r} is not an integer value (MSD maps value -> name)", json_path) from None
    return out


def _declared_nnunet(data: Mapping[str, Any], json_path: Path) -> dict[int, str]:
    if "labels" not in data:
        raise DataError("missing key 'labels' (an object name -> value)", json_path)
    labels = data.get("labels")
    if not isinstance(labels, Mapping):
        raise DataError("'labels' must be an object name -> value", json_path)
    out = {}
    for name, v in labels.items():
        values = v if isinstance(v, list) else [v]
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"labels.{name}: expected an integer value, got {value!r}", json_path)
            out[int(value)] = str(name)
    return out


def _cases_msd(name: str, root: Path, data: Mapping[str, Any], json_path: Path) -> list[tuple[str, Path, Path | None]]:
    if "training" not in data:
        raise DataError("missing key 'training' (a list of {image, label})", json_path)
    training = data.get("training")
    if not isinstance(training, list):
        raise DataError("'training' must be a list of {image, label}", json_path)
    out: list[tuple[str, Path, Path | None]] = []
    for i, item in enumerate(training):
        if not isinstance(item, Mapping) or "image" not in item:
            raise DataError(f"training[{i}]: expected an object with 'image' and 'label'", json_path)
        image = _inside(root, item["image"], f"training[{i}].image", json_path)
        label = _inside(root, item["label"], f"training[{i}].label", json_path) if item.get("label") else None
        out.append((strip_suffix(image), image, label))
    return out


def _cases_nnunet(name: str, root: Path, data: Mapping[str, Any], json_path: Path) -> list[tuple[str, Path, Path | None]]:
    for key in ("file_ending", "channel_names"):
        if key not in data:
            raise DataError(f"missing key {key!r} (nnU-Net v2 raw layout)", json_path)
    ending = data.get("file_ending")
    if not isinstance(ending, str) or ending not in IMAGE_SUFFIXES:
        raise DataError(f"file_ending: expected one of {list(IMAGE_SUFFIXES)}, got {ending!r}", json_path)
    channels = data.get("channel_names")
    if not isinstance(channels, Mapping) or len(channels) != 1:
        raise DataError("channel_names: exactly one channel (CT) is supported", json_path)
    images_dir = root / "imagesTr"
    labels_dir = root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError("no imagesTr folder", root)
    out: list[tuple[str, Path, Path | None]] = []
    for image in sorted(images_dir.iterdir()):
        if not image.name.endswith(ending) or image.name.startswith("."):
            continue
        stem = image.name[: -len(ending)]
        if not stem.endswith("_0000"):
            raise DataError(f"image name {image.name!r} lacks the channel suffix _0000", image)
        case = stem[:-5]
        out.append((case, image, labels_dir / f"{case}{ending}"))
    return out


def scan_dataset(name: str, root: Path, layout: str = "auto", oracle_dir: Path | None = None) -> DatasetInfo:
    """List a dataset's cases and validate the folder structure (not the voxels).

    Args:
        name: the dataset's name in the project (recorded in every :class:`CaseFiles`).
        root: the dataset folder; case paths come back absolute.
        layout: ``auto`` (from ``dataset.json``), ``msd`` or ``nnunet``.
        oracle_dir: optional folder of full label maps named like the label files (phantom only).

    Raises:
        DataError: no dataset.json, unknown layout, a path escaping the root, a missing image or label
            file, duplicate case ids, or no cases at all. Each names the file at fault.
    """
    root = Path(os.path.normpath(Path(root).absolute()))  # case paths come out absolute and normalised
    data = read_dataset_json(root)
    json_path = root / "dataset.json"
    if layout == "auto":
        layout = detect_layout(root, data)
    if layout == "msd":
        declared = _declared_msd(data, json_path)
        raw = _cases_msd(name, root, data, json_path)
    elif layout == "nnunet":
        declared = _declared_nnunet(data, json_path)
        raw = _cases_nnunet(name, root, data, json_path)
    else:
        raise DataError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}", root)
    if not raw:
        raise DataError("dataset has no training cases", root)
    seen: dict[str, Path] = {}
    cases = []
    for case_id, image, label in raw:
        if case_id in seen:
            raise DataError(f"duplicate case id {case_id!r} (also {seen[case_id].name})", image)
        seen[case_id] = image
        if not image.exists():
            raise DataError("image file listed in dataset.json is missing", image)
        if label is None or not label.exists():
            raise DataError(f"label file for case {case_id!r} is missing", label or image)
        oracle = None
        if oracle_dir is not None:
            oracle = oracle_dir / label.name
            if not oracle.exists():
                raise DataError(f"oracle label for case {case_id!r} is missing", oracle)
        cases.append(CaseFiles(name, case_id, image, label, oracle))
    return DatasetInfo(layout, declared, tuple(cases))


def check_label_map(dataset: str, declared: Mapping[int, str], mapped: Mapping[int, str], json_path: Path) -> None:
    """Every value the project maps must be declared by the dataset's own dataset.json."""
    missing = sorted(set(mapped) - set(declared))
    if missing:
        raise DataError(f"project maps label value {missing[0]} for dataset {dataset!r}, but dataset.json declares "
                        f"only {sorted(declared)}", json_path)


def list_image_files(folder: Path) -> list[Path]:
    """Images in a folder (for ``predict`` on folders); a folder of DICOM files counts as one image."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and suffix_of(p) in IMAGE_SUFFIXES
             and not p.name.startswith(".")]
    if not files and any(p.suffix.lower() == ".dcm" for p in folder.iterdir()):
        return [folder]
    return files
