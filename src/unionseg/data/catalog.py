"""Find the cases of a dataset folder: MSD, nnU-Net v2 raw, KiTS and "images + labels folders" layouts.

Layouts (``layout:`` of a dataset in the project file; ``auto`` detects them in this order):

* ``msd`` / ``nnunet``: a ``dataset.json``. MSD: ``labels`` (value -> name) and a ``training`` list of
  ``{image, label}`` paths relative to the root (``./imagesTr/liver_0.nii.gz``). nnU-Net v2 raw:
  ``channel_names``, ``labels`` (name -> value) and ``file_ending``; images ``imagesTr/<case>_0000<ending>``
  and labels ``labelsTr/<case><ending>``. Any folder holding a ``dataset.json`` must be one of these two.
* ``kits``: KiTS19/21/23, one folder per case ``case_XXXXX/imaging.nii.gz`` with ``segmentation.nii.gz``
  (KiTS19, KiTS23) or ``aggregated_MAJ_seg.nii.gz`` (KiTS21, the majority vote of the annotators), in the
  root or in its ``data/`` (KiTS19/21) or ``dataset/`` (KiTS23) folder. Case folders without a
  segmentation (the KiTS19 test cases 00210-00299) are skipped and listed in :attr:`DatasetInfo.skipped`.
* ``folders``: an images folder and a labels folder whose files match by name (BTCV ``img/img0001.nii.gz``
  with ``label/label0001.nii.gz``, or AMOS/WORD ``imagesTr`` + ``labelsTr`` without a ``dataset.json``).
  ``folders`` alone looks for the pairs in :data:`FOLDER_PAIRS`; ``folders:IMAGES,LABELS`` names the two
  sub-folders explicitly (relative to the root). Files match on the name without its image suffix (and
  without an nnU-Net ``_0000`` channel suffix); names that differ only in their prefix match on their
  numbers (``img0001`` <-> ``label0001``, ``volume-7`` <-> ``segmentation-7``) when that is unambiguous.

Declared labels: MSD and nnU-Net datasets declare their label values in ``dataset.json`` and
:func:`check_label_map` checks the project's map against them. The KiTS and folders layouts declare none
(``declared_labels is None``): the check is then a no-op, and ``prepare`` checks every label file's voxel
values against the project's map instead (an unmapped value is an error naming the file).

Every path must stay inside the dataset root; hidden files (``.`` prefix, e.g. macOS ``._liver_0.nii.gz``
copies in the MSD archives) and non-image files are ignored.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from unionseg.config import LAYOUTS
from unionseg.data.io import IMAGE_SUFFIXES, strip_suffix, suffix_of
from unionseg.errors import DataError, UnionsegWarning, listing

FOLDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("imagesTr", "labelsTr"),
    ("images", "labels"),
    ("img", "label"),
    ("image", "label"),
    ("images", "masks"),
    ("volumes", "segmentations"),
    ("imagesTs", "labelsTs"),  # nnU-Net's test-set folders, for a test root without the training pair
)
"""(images, labels) sub-folder names the ``folders`` layout looks for, in this order."""

KITS_IMAGE = "imaging.nii.gz"
KITS_LABELS = ("segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz")
"""Label file names of a KiTS case folder, in order of preference (KiTS19/23, then KiTS21)."""

_KITS_CASE = re.compile(r"^case_\d{5}$")
_CHANNEL_SUFFIX = "_0000"
_ANY_CHANNEL = re.compile(r"_\d{4}$")  # nnU-Net's channel tags: _0000 for the first (CT), _0001 ...


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
    """A scanned dataset folder.

    Attributes:
        layout: the layout that was used (``msd``, ``nnunet``, ``kits`` or ``folders``).
        declared_labels: value -> name from ``dataset.json``; None for layouts that declare no labels.
        cases: every labelled case, sorted as the layout lists them.
        skipped: case ids left out because they have no label file (KiTS test cases).
    """

    layout: str
    declared_labels: dict[int, str] | None
    cases: tuple[CaseFiles, ...]
    skipped: tuple[str, ...] = ()


class _JsonObject(dict):  # type: ignore[type-arg]
    """A JSON object that remembers the keys it was given more than once (the last value wins, as in
    ``json.loads``): ``"1": "liver", "1": "spleen"`` in a ``labels`` object is a mistake to name."""

    repeated: list[str]

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _JsonObject:
        out = cls(pairs)
        keys = [k for k, _ in pairs]
        out.repeated = [k for i, k in enumerate(keys) if k in keys[:i]]
        return out


def _refuse_repeated_keys(labels: Mapping[str, Any], json_path: Path) -> None:
    repeated = getattr(labels, "repeated", [])
    if repeated:
        raise DataError(f"labels: key {repeated[0]!r} is given twice; give each label one entry", json_path)


def read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    if not path.is_file():
        raise DataError("no dataset.json (MSD and nnU-Net v2 raw layouts need one)", root)
    try:  # a BOM, as Windows editors write, is no error
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_JsonObject.of)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"invalid JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise DataError("expected a JSON object at the top level", path)
    return data


def detect_layout(root: Path, data: Mapping[str, Any]) -> str:
    """The layout a ``dataset.json`` describes (``msd`` or ``nnunet``).

    Raises:
        DataError: the file matches neither layout.
    """
    if "channel_names" in data or "file_ending" in data:  # nnU-Net v2 (which ignores a 'training' list)
        return "nnunet"
    if "training" in data:
        return "msd"
    raise DataError("dataset.json matches no known layout: MSD needs 'training'; nnU-Net v2 needs "
                    "'channel_names' and 'file_ending' (set the dataset's layout to 'folders' to ignore "
                    "this file)", root / "dataset.json")


def declared_labels_of(label_file: Path) -> tuple[Path, dict[int, str]] | None:
    """The value names the ``dataset.json`` of a label file's dataset declares (``ROOT/labelsTr/case.nii.gz``
    in the MSD and nnU-Net v2 layouts), with that file; None where there is none or it cannot be read (what
    ``unionseg info IMAGE`` shows beside each value, so it never fails on it)."""
    json_path = label_file.parent.parent / "dataset.json"
    if not json_path.is_file():
        return None
    try:
        data = read_dataset_json(json_path.parent)
        layout = detect_layout(json_path.parent, data)
        declared = _declared_msd(data, json_path) if layout == "msd" else _declared_nnunet(data, json_path)
    except DataError:
        return None
    return json_path, declared


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and suffix_of(path) in IMAGE_SUFFIXES


def _kits_case_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and _KITS_CASE.match(p.name)]


def kits_data_dir(root: Path) -> Path | None:
    """The folder holding KiTS ``case_XXXXX`` folders: ``root``, ``root/data``, ``root/dataset`` or
    ``root/kits21/data`` (a KiTS21 clone keeps its cases inside its package folder), or None."""
    for folder in (root, root / "data", root / "dataset", root / "kits21" / "data"):
        if any((d / KITS_IMAGE).exists() for d in _kits_case_dirs(folder)):
            return folder
    return None


def find_folder_pair(root: Path) -> tuple[Path, Path] | None:
    """The first (images, labels) pair of :data:`FOLDER_PAIRS` present in ``root`` (both folders), or None."""
    for images, labels in FOLDER_PAIRS:
        if (root / images).is_dir() and (root / labels).is_dir():
            return root / images, root / labels
    return None


def _no_layout_message() -> str:
    pairs = ", ".join(f"{i}/+{lab}/" for i, lab in FOLDER_PAIRS)
    return ("matches no known layout; looked for: no dataset.json (MSD, nnU-Net v2 raw); no "
            f"case_XXXXX/{KITS_IMAGE} here or in data/, dataset/ or kits21/data/ (KiTS19/21/23); no images + "
            f"labels folder pair ({pairs}). Point the root at the folder that holds them, or set the dataset's layout "
            "(e.g. 'folders:IMAGES,LABELS')")


def resolve_layout(root: Path) -> str:
    """Detect a folder's layout: ``dataset.json`` (MSD / nnU-Net v2), KiTS case folders, or a folder pair.

    Raises:
        DataError: naming the folder and listing what was looked for, when nothing matches; or a
            ``dataset.json`` that describes neither MSD nor nnU-Net v2.
    """
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    if (root / "dataset.json").is_file():
        return detect_layout(root, read_dataset_json(root))
    if kits_data_dir(root) is not None:
        return "kits"
    if find_folder_pair(root) is not None:
        return "folders"
    raise DataError(_no_layout_message(), root)


def _inside(root: Path, rel: Any, where: str, json_path: Path) -> Path:
    """``root / rel`` after checking that ``rel`` is relative and stays inside ``root``.

    The check is lexical (``..`` components are resolved against the path itself, symbolic links are not
    followed), so a dataset whose ``imagesTr`` is a link to another disk is accepted while
    ``../x.nii.gz`` is not. A NUL, an unencodable character or a name over 255 bytes is refused too.
    """
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{where}: expected a relative path string, got {rel!r}", json_path)
    try:
        encoded: list[bytes] | None = [os.fsencode(part) for part in Path(rel).parts]
    except UnicodeEncodeError:
        encoded = None
    if encoded is None or any(b"\0" in part for part in encoded):
        raise DataError(f"{where}: {rel!r} is not a valid path (NUL or unencodable characters)", json_path)
    if any(len(part) > 255 for part in encoded):
        raise DataError(f"{where}: path {rel[:40]!r}... has a file name longer than 255 bytes", json_path)
    if Path(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or rel.startswith("~"):
        raise DataError(f"{where}: absolute path {rel!r} is not allowed; paths are relative to the dataset root",
                        json_path)
    base = Path(os.path.normpath(root.absolute()))
    path = Path(os.path.normpath(base / rel))
    if not path.is_relative_to(base) or path == base:
        raise DataError(f"{where}: path {rel!r} escapes the dataset root", json_path)
    return path


def _exists(path: Path) -> bool:
    """``path.exists()``; a path that cannot be checked (permission denied, too long) is a DataError naming it,
    and so is a link whose target is gone (an unmounted disk, a moved store), which is not a missing file."""
    try:
        if path.exists():
            return True
        if path.is_symlink():
            raise DataError(f"broken link: its target {os.readlink(path)} does not exist", path)
        return False
    except OSError as exc:
        raise DataError(f"cannot access this path ({exc.strerror or exc})", path) from None


def _declared_msd(data: Mapping[str, Any], json_path: Path) -> dict[int, str]:
    if "labels" not in data:
        raise DataError("missing key 'labels' (an object value -> name)", json_path)
    labels = data.get("labels")
    if not isinstance(labels, Mapping):
        raise DataError("'labels' must be an object value -> name", json_path)
    _refuse_repeated_keys(labels, json_path)
    out = {}
    for k, v in labels.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            # an nnU-Net v2 file (name -> value, no 'training' list) read as MSD: say so (helper-133)
            v2 = isinstance(v, (int, list)) and not isinstance(v, bool) and "training" not in data
            hint = (" (this is nnU-Net v2's form, name -> value, with no MSD 'training' list: set the dataset's "
                    "layout to nnunet, or leave it out to have it detected)") if v2 else ""
            raise DataError(f"labels: key {k!r} is not an integer value (MSD maps value -> name){hint}",
                            json_path) from None
    return out


def _declared_nnunet(data: Mapping[str, Any], json_path: Path) -> dict[int, str]:
    if "labels" not in data:
        raise DataError("missing key 'labels' (an object name -> value)", json_path)
    labels = data.get("labels")
    if not isinstance(labels, Mapping):
        raise DataError("'labels' must be an object name -> value", json_path)
    _refuse_repeated_keys(labels, json_path)
    out: dict[int, str] = {}
    single: dict[int, str] = {}  # values given alone (a region-based file lists values under several names)
    for name, v in labels.items():
        values = v if isinstance(v, list) else [v]
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                # value -> name is MSD's form; nnU-Net v2 maps name -> value. Only a file with MSD's 'training'
                # list is an MSD dataset: the layout hint alone led to "missing key 'training'" (helper-78)
                msd = "" if not str(name).strip().isdigit() else (
                    " (an MSD 'labels' object, value -> name: set the dataset's layout to msd)" if "training" in data
                    else f" (this is MSD's form, value -> name; nnU-Net v2's maps name -> value: "
                         f"{{\"{name}\": \"{value}\"}} becomes {{\"{value}\": {int(name)}}})")
                raise DataError(f"labels.{name}: expected an integer value, got {value!r}{msd}", json_path)
            if not isinstance(v, list):
                if value in single:
                    raise DataError(f"labels: value {value} is named both {single[value]!r} and {name!r}; give "
                                    "each value one name", json_path)
                single[value] = str(name)
            out[int(value)] = str(name)
    # a value given alone keeps that name: a region listing it too ("liver": [1, 2] after "liver_tumour": 2)
    # named value 2 "liver", and the roots check then warned on every run that the project's liver_tumour
    # disagreed (helper-102)
    return {**out, **{int(value): name for value, name in single.items()}}


_RawCases = list[tuple[str, Path, Path | None]]


def _cases_msd(name: str, root: Path, data: Mapping[str, Any], json_path: Path) -> _RawCases:
    if "training" not in data:
        raise DataError("missing key 'training' (a list of {image, label})", json_path)
    training = data.get("training")
    if not isinstance(training, list):
        raise DataError("'training' must be a list of {image, label}", json_path)
    out: _RawCases = []
    for i, item in enumerate(training):
        if not isinstance(item, Mapping) or "image" not in item:
            raise DataError(f"training[{i}]: expected an object with 'image' and 'label'", json_path)
        image = _inside(root, item["image"], f"training[{i}].image", json_path)
        label = _inside(root, item["label"], f"training[{i}].label", json_path) if item.get("label") else None
        out.append((strip_suffix(image), image, label))
    _warn_msd_leftovers(root, data, out, json_path)
    return out


def _listed(files: Sequence[Path]) -> str:
    return listing([f.name for f in files])


def _warn_msd_leftovers(root: Path, data: Mapping[str, Any], cases: _RawCases, json_path: Path) -> None:
    """Warn about images in ``imagesTr`` that the ``training`` list leaves out, and a ``numTraining`` that
    disagrees with the list: a half-updated dataset.json is not trained on quietly."""
    images_dir = root / "imagesTr"
    if images_dir.is_dir():
        listed = {os.path.normcase(str(image)) for _, image, _ in cases}
        unlisted = [p for p in sorted(images_dir.iterdir())
                    if _is_image_file(p) and os.path.normcase(str(p)) not in listed]
        if unlisted:
            warnings.warn(f"{images_dir}: {len(unlisted)} image(s) are not in dataset.json's 'training' list and "
                          f"are left out: {_listed(unlisted)}", UnionsegWarning, stacklevel=4)
    stated = data.get("numTraining")
    if isinstance(stated, int) and not isinstance(stated, bool) and stated != len(cases):
        warnings.warn(f"{json_path}: numTraining is {stated} but 'training' lists {len(cases)} case(s)",
                      UnionsegWarning, stacklevel=4)


def _cases_nnunet(name: str, root: Path, data: Mapping[str, Any], json_path: Path) -> _RawCases:
    for key in ("file_ending", "channel_names"):
        if key not in data:
            raise DataError(f"missing key {key!r} (nnU-Net v2 raw layout)", json_path)
    ending = data.get("file_ending")
    if not isinstance(ending, str) or ending not in IMAGE_SUFFIXES:
        raise DataError(f"file_ending: expected one of {list(IMAGE_SUFFIXES)}, got {ending!r}", json_path)
    channels = data.get("channel_names")
    if not isinstance(channels, Mapping) or len(channels) != 1:
        listed = f" ({len(channels)} given: {dict(channels)})" if isinstance(channels, Mapping) else ""
        raise DataError(f"channel_names: exactly one channel (CT) is supported{listed}; unionseg reads the CT images "
                        "as channel 0, the _0000 files: declare {\"0\": \"CT\"} and move the other channels' files "
                        "out of the images folder (CT stored as another channel: rename its files to _0000)", json_path)
    (channel,) = channels.values()
    if not (isinstance(channel, str) and channel.strip().lower() == "ct"):
        # nnU-Net picks its normalisation by this name; unionseg windows every image in Hounsfield units
        warnings.warn(f"{json_path}: channel_names declares {channel!r}, not CT (nnU-Net normalises by this name): "
                      "unionseg reads every image as CT and normalises it with the project's Hounsfield window "
                      "(preprocessing); if these images are not CT, they are normalised wrongly", UnionsegWarning,
                      stacklevel=4)
    images_dir, labels_dir = _nnunet_folders(root)
    out: _RawCases = []
    for image in sorted(images_dir.iterdir()):
        if not image.name.endswith(ending) or image.name.startswith("."):
            continue
        stem = image.name[: -len(ending)]
        if not stem.endswith(_CHANNEL_SUFFIX):
            if _ANY_CHANNEL.search(stem) and (images_dir / f"{stem[:-5]}{_CHANNEL_SUFFIX}{ending}").exists():
                # _0001 beside the case's _0000: a second channel, which one CT channel rules out
                raise DataError(f"image {image.name!r} is channel {stem[-4:]} of case {stem[:-5]!r}: unionseg reads "
                                "one CT channel (channel_names has one), the _0000 file; move the other channels "
                                f"out of {images_dir.name}/", image)
            images = [p.name[: -len(ending)] for p in images_dir.iterdir()
                      if p.name.endswith(ending) and not p.name.startswith(".")]
            bare = [n for n in images if not _ANY_CHANNEL.search(n)]  # a case's other channel is not counted
            every = len(bare) == len(images)  # the folders layout reads untagged names only when all are
            raise DataError(f"image name {image.name!r} lacks the channel suffix _0000"
                            + (f" ({len(bare)} images of {images_dir.name}/ lack it)" if len(bare) > 1 else "")
                            + f": nnU-Net v2 names a case's CT image CASE_0000{ending} (rename it "
                            f"{stem}{_CHANNEL_SUFFIX}{ending}; its label keeps {stem}{ending})"
                            + (f", or read the folder with the dataset's layout 'folders:{images_dir.name},"
                               f"{labels_dir.name}', which takes images named as their labels" if every else ""),
                            image)
        case = stem[:-5]
        out.append((case, image, labels_dir / f"{case}{ending}"))
    others = _other_endings(images_dir, ending) if not out else []
    if others:
        raise DataError(f"file_ending is {ending!r}, but the images in {images_dir.name} end otherwise "
                        f"({_listed(others)}); "
                        "set file_ending to their ending", json_path)
    _warn_nnunet_leftovers(images_dir, labels_dir, data, ending, out, json_path)
    return out


def _nnunet_folders(root: Path) -> tuple[Path, Path]:
    """The (images, labels) folders of an nnU-Net v2 dataset: ``imagesTr`` + ``labelsTr``; in a folder with
    no ``imagesTr`` but ``imagesTs`` + ``labelsTs`` (a test set with its labels, as users keep one), those,
    read by the same naming rules and checked against the same ``dataset.json`` labels."""
    if (root / "imagesTr").is_dir():
        return root / "imagesTr", root / "labelsTr"
    if (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir():
        return root / "imagesTs", root / "labelsTs"
    found = " (imagesTs/ is here, but no labelsTs/ beside it holds its labels)" if (root / "imagesTs").is_dir() else ""
    raise DataError(f"no imagesTr folder, nor imagesTs + labelsTs (nnU-Net v2 layout: its dataset.json has "
                    f"'channel_names'/'file_ending'){found}; point the root at the dataset folder, or set the "
                    "dataset's layout to 'folders:IMAGES,LABELS'", root)


def _other_endings(images_dir: Path, ending: str) -> list[Path]:
    """The images of an nnU-Net imagesTr folder that do not end in its ``file_ending``."""
    return [p for p in sorted(images_dir.iterdir()) if _is_image_file(p) and not p.name.endswith(ending)]


def _warn_nnunet_leftovers(images_dir: Path, labels_dir: Path, data: Mapping[str, Any], ending: str,
                           cases: _RawCases, json_path: Path) -> None:
    """Warn about what an nnU-Net folder holds that the scan leaves out, so that a half-converted dataset
    is not trained on quietly: images of another ending, label files without an image, and a
    ``numTraining`` that disagrees with the cases found."""

    def tell(message: str) -> None:
        warnings.warn(message, UnionsegWarning, stacklevel=4)

    others = _other_endings(images_dir, ending)
    if others:
        tell(f"{images_dir}: {len(others)} image(s) do not end in file_ending {ending!r} and are left out: "
             f"{_listed(others)}")
    if labels_dir.is_dir():
        wanted = {label.name for _, _, label in cases if label is not None}
        orphans = [p for p in sorted(labels_dir.iterdir())
                   if _is_image_file(p) and p.name not in wanted]
        if orphans:
            tell(f"{labels_dir}: {len(orphans)} label file(s) have no image in {images_dir.name} and are left out: "
                 f"{_listed(orphans)}")
    stated = data.get("numTraining")
    if isinstance(stated, int) and not isinstance(stated, bool) and stated != len(cases):
        if images_dir.name == "imagesTr":  # numTraining counts the training cases, not a test set's
            tell(f"{json_path}: numTraining is {stated} but imagesTr holds {len(cases)} case(s) ending in {ending!r}")


def _cases_kits(root: Path) -> tuple[_RawCases, list[str]]:
    """Labelled KiTS cases and the ids of case folders without a segmentation."""
    folder = kits_data_dir(root)
    if folder is None:
        raise DataError(f"no case_XXXXX/{KITS_IMAGE} folders here or in data/, dataset/ or kits21/data/ (KiTS layout)",
                        root)
    out: _RawCases = []
    skipped: list[str] = []
    for case_dir in _kits_case_dirs(folder):
        image = case_dir / KITS_IMAGE
        label = next((case_dir / n for n in KITS_LABELS if (case_dir / n).exists()), None)
        if label is None:
            if image.exists():
                skipped.append(case_dir.name)  # an unlabelled (test) case
                continue
            raise DataError(f"case folder has neither {KITS_IMAGE} nor a segmentation", case_dir)
        out.append((case_dir.name, image, label))
    return out, skipped


def parse_folders_layout(layout: str, root: Path) -> tuple[Path, Path] | None:
    """The explicit (images, labels) folders of ``folders:IMAGES,LABELS``; None for plain ``folders``.

    Raises:
        DataError: a malformed value, or a sub-folder that is absolute or escapes the root.
    """
    if layout == "folders":
        return None
    spec = layout[len("folders:"):]
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise DataError(f"layout {layout!r}: expected 'folders:IMAGES,LABELS' (two sub-folders of the root)", root)
    where = f"layout {layout!r}"
    return _inside(root, parts[0], where, root), _inside(root, parts[1], where, root)


def image_key(path: Path) -> str:
    """A file's matching key: its name without the image suffix and without an nnU-Net ``_0000``."""
    stem = strip_suffix(path)
    return stem[: -len(_CHANNEL_SUFFIX)] if stem.endswith(_CHANNEL_SUFFIX) else stem


def name_numbers(key: str) -> tuple[int, ...] | None:
    """The numbers in a file key (``volume-7`` -> ``(7,)``), by which :func:`match_by_name` pairs files whose
    names differ; ``None`` for a key without digits."""
    found = re.findall(r"\d+", key)
    return tuple(int(n) for n in found) if found else None


def match_by_name(
    left: Mapping[str, Path], right: Mapping[str, Path]
) -> tuple[dict[str, str], list[str], list[str]]:
    """Pair two sets of keyed files: same key first, then same numbers where the names differ.

    ``img0001`` pairs with ``label0001`` and ``volume-7`` with ``segmentation-7``: the numbers in a name
    (as integers, so zero padding does not matter) decide, but only when they are unique on both sides
    among the files still unpaired.

    Args:
        left: key -> file (e.g. images).
        right: key -> file (e.g. labels).

    Returns:
        ``(pairs left key -> right key, unpaired left keys, unpaired right keys)``.
    """
    pairs = {k: k for k in left if k in right}
    rest_left = [k for k in left if k not in pairs]
    rest_right = [k for k in right if k not in pairs]
    if rest_left and rest_right:
        def by_number(keys: Sequence[str]) -> dict[tuple[int, ...], list[str]]:
            out: dict[tuple[int, ...], list[str]] = {}
            for key in keys:
                nums = name_numbers(key)
                if nums is not None:
                    out.setdefault(nums, []).append(key)
            return out

        numbered_left, numbered_right = by_number(rest_left), by_number(rest_right)
        for nums, keys in numbered_left.items():
            other = numbered_right.get(nums, [])
            if len(keys) == 1 and len(other) == 1:
                pairs[keys[0]] = other[0]
        paired_right = set(pairs.values())
        rest_left = [k for k in left if k not in pairs]
        rest_right = [k for k in right if k not in paired_right]
    return pairs, rest_left, rest_right


def image_files(folder: Path, channel_tags: str = "each") -> dict[str, Path]:
    """Key -> image file of a folder's direct children; hidden files are ignored.

    Args:
        channel_tags: where a key drops nnU-Net's channel tag ``_0000``: ``each`` file that has it
            (:func:`image_key`), ``all`` (only when every file of the folder has it: an images folder, so
            that case ``x_0000`` of an untagged folder keeps its name) or ``none`` (a labels folder, whose
            names never carry one).

    Raises:
        DataError: two files with the same key (``a.nii`` and ``a.nii.gz``).
    """
    files = [path for path in sorted(folder.iterdir()) if _is_image_file(path)]
    strip = channel_tags == "each" or (
        channel_tags == "all" and all(strip_suffix(p).endswith(_CHANNEL_SUFFIX) for p in files))
    out: dict[str, Path] = {}
    for path in files:
        key = image_key(path) if strip else strip_suffix(path)
        if key in out:
            raise DataError(f"duplicate case id {key!r} (also {out[key].name})", path)
        out[key] = path
    return out


def _refuse_dangling_links(folder: Path) -> None:
    """A link whose target is gone is an error (:func:`_exists`), not a case left out."""
    for path in sorted(folder.iterdir()):
        if not path.name.startswith(".") and suffix_of(path) in IMAGE_SUFFIXES:
            _exists(path)


def _other_ending(path: Path, layout: str) -> str:
    """``; x.nii is there ...`` when the missing ``path`` exists with another image ending, else ``""``."""
    for ending in IMAGE_SUFFIXES:
        other = path.with_name(strip_suffix(path) + ending)
        if ending != suffix_of(path) and _exists(other):
            where = ("dataset.json must name the file as it is on disk" if layout == "msd" else
                     f"dataset.json's file_ending is {suffix_of(path)!r}, which every image and label must end in"
                     if layout == "nnunet" else f"rename it {path.name}")
            return f"; {other.name} is there: {where}"
    return ""


def _refuse_mixed_channel_tags(images: Mapping[str, Path], images_dir: Path,
                               labels: Mapping[str, Path] | None = None) -> None:
    """An images folder where most names carry nnU-Net's channel tag and a few do not: the tag is then kept
    in every case id (it is dropped only when all carry it), so every image misses its label and the first
    tagged one was blamed. Name the untagged files instead. A folder with other channels (``_0001``) is not
    judged here: its images miss their labels as they are, and the error says so."""
    stems = {key: strip_suffix(path) for key, path in images.items()}
    # case_001_0001 beside case_001_0000 and a label case_001: a second channel, blamed on every case as a
    # missing label (scans numbered ct_0000, ct_0001 have labels of those names, not a label ct)
    extra = [images[key] for key, stem in stems.items() if _ANY_CHANNEL.search(stem)
             and not stem.endswith(_CHANNEL_SUFFIX) and f"{stem[:-5]}{_CHANNEL_SUFFIX}" in stems.values()
             and stem[:-5] in (labels or {})]
    if extra:
        raise DataError(f"image {extra[0].name!r} is channel {strip_suffix(extra[0])[-4:]} of a case whose "
                        f"{_CHANNEL_SUFFIX} image is here: unionseg reads one CT channel, the {_CHANNEL_SUFFIX} "
                        f"file; move the other channels out of {images_dir.name}/"
                        + (f" (also {listing([p.name for p in extra[1:]])})" if len(extra) > 1 else ""), extra[0])
    if any(_ANY_CHANNEL.search(stem) and not stem.endswith(_CHANNEL_SUFFIX) for stem in stems.values()):
        return
    untagged = [images[key] for key, stem in stems.items() if not stem.endswith(_CHANNEL_SUFFIX)]
    tagged = len(images) - len(untagged)
    if untagged and tagged >= len(untagged):
        first = untagged[0]
        also = f" (also untagged: {listing([p.name for p in untagged[1:]])})" if len(untagged) > 1 else ""
        raise DataError(f"image name lacks the channel suffix {_CHANNEL_SUFFIX} that {tagged} other image(s) in "
                        f"{images_dir.name}/ carry{also}; rename it "
                        f"{strip_suffix(first)}{_CHANNEL_SUFFIX}{suffix_of(first)}", first)


def _cases_folders(root: Path, layout: str) -> tuple[_RawCases, Path]:
    explicit = parse_folders_layout(layout, root)
    pair = explicit if explicit is not None else find_folder_pair(root)
    if pair is None:
        names = ", ".join(f"{i}/+{lab}/" for i, lab in FOLDER_PAIRS)
        raise DataError(f"no images + labels folder pair ({names}); name them with layout "
                        "'folders:IMAGES,LABELS'", root)
    images_dir, labels_dir = pair
    for folder, what in ((images_dir, "images"), (labels_dir, "labels")):
        if not folder.is_dir():
            raise DataError(f"{what} folder not found", folder)
    _refuse_dangling_links(images_dir)
    _refuse_dangling_links(labels_dir)
    images, labels = image_files(images_dir, channel_tags="all"), image_files(labels_dir, channel_tags="none")
    pairs, lonely_images, lonely_labels = match_by_name(images, labels)
    if lonely_images:
        _refuse_mixed_channel_tags(images, images_dir, labels)
        key = lonely_images[0]
        more = f" (also {listing([images[k].name for k in lonely_images[1:]])})" if len(lonely_images) > 1 else ""
        # the label files nothing matched: a naming scheme of their own (case names that differ) shows there
        unmatched = f"; unmatched there: {listing([labels[k].name for k in lonely_labels])}" if lonely_labels else ""
        raise DataError(f"label file for case {key!r} is missing: no file in {labels_dir.name}/ matches "
                        f"{images[key].name} by name or number{more}{unmatched}", images[key])
    if lonely_labels:
        key = lonely_labels[0]
        series = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        hint = (f"; {images_dir.name}/ holds folders ({', '.join(series[:3])}{' ...' if len(series) > 3 else ''}), "
                f"which datasets do not read: one image file per case ({', '.join(IMAGE_SUFFIXES)}); convert a "
                f"DICOM series first (predict reads DICOM folders)" if series else "")
        raise DataError(f"label file matches no image in {images_dir.name}/ (by name or number){hint}",
                        labels[key])
    return [(key, images[key], labels[pairs[key]]) for key in images], labels_dir


def scan_dataset(name: str, root: Path, layout: str = "auto", oracle_dir: Path | None = None) -> DatasetInfo:
    """List a dataset's cases and validate the folder structure (not the voxels).

    Args:
        name: the dataset's name in the project (recorded in every :class:`CaseFiles`).
        root: the dataset folder; case paths come back absolute.
        layout: ``auto`` (detected, see :func:`resolve_layout`), ``msd``, ``nnunet``, ``kits``, ``folders``
            or ``folders:IMAGES,LABELS``.
        oracle_dir: optional folder of full label maps named like the label files (phantom only; for KiTS,
            ``<case_id>.nii.gz``).

    Raises:
        DataError: a missing folder, no recognisable layout (listing what was looked for), no or an
            invalid dataset.json where the layout needs one, a path escaping the root, a missing image or
            label file, duplicate case ids, or no cases at all. Each names the file at fault.
    """
    # what a scan leaves out is told only when the dataset is usable: a folder that fails gets its error
    # alone, not warnings about a half-converted folder before it
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        info = _scan_dataset(name, root, layout, oracle_dir)
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return info


def _scan_dataset(name: str, root: Path, layout: str, oracle_dir: Path | None) -> DatasetInfo:
    root = Path(os.path.normpath(Path(root).absolute()))  # case paths come out absolute and normalised
    if not isinstance(layout, str):
        raise DataError(f"layout must be a string, got {layout!r}", root)
    if layout != "auto" and layout not in LAYOUTS and not layout.startswith("folders:"):
        raise DataError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}, folders:IMAGES,LABELS",
                        root)
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "not found"
        raise DataError(f"folder of dataset {name!r} {what} (check the dataset's root: one in the project file is "
                        "relative to the project file's folder, one in a roots file to the roots file's; --root "
                        "DIR is relative to the working folder)", root)
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise DataError("dataset folder is empty: no dataset.json, no case folders, no images + labels folders; "
                        "point the root at the folder that holds the data", root)
    if layout == "auto":
        layout = resolve_layout(root)
    declared: dict[int, str] | None = None
    skipped: list[str] = []
    if layout in ("msd", "nnunet"):
        data = read_dataset_json(root)
        json_path = root / "dataset.json"
        if layout == "msd":
            declared = _declared_msd(data, json_path)
            raw = _cases_msd(name, root, data, json_path)
        else:
            declared = _declared_nnunet(data, json_path)
            raw = _cases_nnunet(name, root, data, json_path)
    elif layout == "kits":
        raw, skipped = _cases_kits(root)
    else:
        raw, _ = _cases_folders(root, layout)
    if not raw:
        extra = f" ({len(skipped)} case folders have no segmentation)" if skipped else ""
        raise DataError(f"dataset has no training cases{extra}", root)
    seen: dict[str, Path] = {}
    cases = []
    for case_id, image, label in raw:
        if case_id in seen:
            raise DataError(f"duplicate case id {case_id!r} (also {seen[case_id].name})", image)
        seen[case_id] = image
        if not _exists(image):
            tagged = image.with_name(f"{strip_suffix(image)}{_CHANNEL_SUFFIX}{suffix_of(image)}")
            hint = (f"; {tagged.name} is there: an nnU-Net v1 task folder, which layout 'folders' reads"
                    if layout == "msd" and _exists(tagged) else _other_ending(image, layout))
            raise DataError(("image file listed in dataset.json is missing" if declared is not None
                             else "image file is missing") + hint, image)
        if label is None or not _exists(label):
            hint = "" if label is None else _other_ending(label, layout)
            if label is None and layout == "msd":  # the entry names none: the file may well be there
                raise DataError(f"dataset.json's 'training' entry of case {case_id!r} gives no 'label'; add it "
                                f"(\"label\": \"./labelsTr/{image.name}\", say) or take the entry out",
                                root / "dataset.json")
            if not hint:  # what to do, and how many more (one error per attempt was a long loop; helper-133)
                lacking = sum(1 for _, _, other in raw if other is None or not _exists(other))
                hint = ((f" ({lacking} cases of the dataset lack theirs)" if lacking > 1 else "")
                        + ": a case is trained on or scored with its label file; add it, or take the case out of "
                        + ("the dataset and its entry out of dataset.json's 'training' list" if layout == "msd"
                           else f"the dataset (its image out of {image.parent.name}/)"))
            raise DataError(f"label file for case {case_id!r} is missing{hint}", label or image)
        oracle = None
        if oracle_dir is not None:
            oracle = oracle_dir / (f"{case_id}{suffix_of(label)}" if layout == "kits" else label.name)
            if not _exists(oracle):
                raise DataError(f"oracle label for case {case_id!r} is missing", oracle)
        cases.append(CaseFiles(name, case_id, image, label, oracle))
    kind = "folders" if layout.startswith("folders") else layout
    return DatasetInfo(kind, declared, tuple(cases), tuple(skipped))


def _class_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def check_label_map(dataset: str, declared: Mapping[int, str] | None, mapped: Mapping[int, str],
                    json_path: Path, classes: Collection[str] = (), other: str | None = None,
                    project_path: Path | None = None) -> None:
    """Every value the project maps must be declared by the dataset's own dataset.json.

    Declared values the project does not map give a warning (prepare would fail on them), unless ``other``
    (``labels: {..., other: background}``) sends them to background; then only those whose dataset.json name
    is a project class are named, in one warning (the class is then never taught from this dataset).

    With ``classes`` (the project's class names), a value whose dataset.json name is the name of ANOTHER
    project class than the one it is mapped to (``1: spleen`` in dataset.json, ``1: liver`` in the project:
    typically two dataset roots swapped), or that dataset.json calls ``background``, gives a
    :class:`~unionseg.errors.UnionsegWarning`; other names that are no project class ("cancer", "Tumor")
    are not judged, nor is a class mapped to background value by value (a fully labelled file used as a
    partially labelled one, on purpose: the warning came with every command and could not be answered).

    ``declared=None`` (KiTS and folders layouts, which declare no labels) checks nothing here: ``prepare``
    then checks each label file's voxel values against the map (an unmapped value names the file), and a
    mapped value that never occurs is harmless (KiTS recipes map the KiTS21/23 cyst value 3, absent in
    KiTS19).

    Raises:
        DataError: naming ``json_path`` and the first mapped value the dataset does not declare (with
            ``project_path``, the project file's key that maps it, where the mistake usually is), or an
            nnU-Net ``ignore`` label.
    """
    if declared is None:
        return
    ignore = sorted(v for v, n in declared.items() if n.strip().lower() == "ignore")
    if ignore:  # nnU-Net v2's unannotated voxels: no class, and no code of the label space says "unknown"
        raise DataError(f"dataset.json declares nnU-Net's 'ignore' label (value {ignore[0]}) for dataset {dataset!r}: "
                        "voxels of unknown class, which unionseg cannot train on (its label space has no "
                        "'unknown' code; mapping them to a class or to background would teach the wrong one); "
                        "give those voxels their class, or leave the dataset out", json_path)
    missing = sorted(set(mapped) - set(declared))
    if missing:
        key = f" (datasets.{dataset}.labels in {project_path})" if project_path is not None else ""
        values = ", ".join(f"{v} {declared[v]!r}" for v in sorted(declared))
        raise DataError(f"project maps label value {missing[0]} for dataset {dataset!r}{key}, but dataset.json declares "
                        f"only {sorted(declared)} ({values}): map the values it declares", json_path)
    unmapped = [v for v in sorted(declared) if v != 0 and v not in mapped]
    known = {_class_key(c) for c in classes}
    if unmapped and other is not None:
        swept = [v for v in unmapped if _class_key(declared[v]) in known]
        if swept:
            shown = ", ".join(f"{v} ({declared[v]!r})" for v in swept[:4]) + (", ..." if len(swept) > 4 else "")
            one = len(swept) == 1
            warnings.warn(f"{json_path}: dataset.json declares {shown}, {'a class' if one else 'classes'} of this "
                          f"project, which 'other: {other}' sends to {other} for dataset {dataset!r}; if this dataset "
                          f"labels {'it' if one else 'them'}, map {'it' if one else 'each'} to its class and annotate "
                          f"{'it' if one else 'them'}; to leave {'it' if one else 'them'} out on purpose, list "
                          f"'{swept[0]}: background'{'' if one else ' (and the others)'} in the map", UnionsegWarning,
                          stacklevel=2)
    elif unmapped:  # prepare then fails every case that holds one: said up front, by its dataset.json name
        shown = ", ".join(f"{v} ({declared[v]!r})" for v in unmapped[:4]) + (", ..." if len(unmapped) > 4 else "")
        targets = list(dict.fromkeys(t for _, t in sorted(mapped.items())))[::-1][:2]  # parts come last
        example = " or ".join(f"'{unmapped[0]}: {t}'" for t in targets) or f"'{unmapped[0]}: ORGAN'"
        warnings.warn(f"{json_path}: dataset.json declares {shown}, which the project does not map for dataset "
                      f"{dataset!r}: prepare fails every case that holds {'it' if len(unmapped) == 1 else 'one'}. Map "
                      f"each under the dataset's 'labels' to the class it belongs to (a lesion inside an organ is "
                      f"part of it: {example}, say), or to background only for a structure no class stands for "
                      f"('other: background' sends every value the map does not list there)",
                      UnionsegWarning, stacklevel=2)
    warn_crossed_names(dataset, declared, mapped, json_path, classes)


class LabelMapWarning(UnionsegWarning):
    """A dataset.json names a value as another class of the project than the project's map gives it."""


def warn_crossed_names(dataset: str, declared: Mapping[int, str], mapped: Mapping[int, str], json_path: Path,
                       classes: Collection[str]) -> None:
    """Warn (:class:`LabelMapWarning`) for every mapped value whose dataset.json name is ANOTHER class of the
    project than the one the map gives it, or background (typically two dataset roots, or two classes,
    swapped). Values dataset.json does not declare, and names that are no project class, are not judged; nor is
    a class mapped to background on purpose (a fully labelled file used as a partial one)."""
    known = {_class_key(c) for c in classes}
    for value, target in sorted(mapped.items()):
        if value not in declared:
            continue
        name = _class_key(declared[value])
        own = _class_key(target.removeprefix("region:"))
        if (name in known and name != own and own != "background") or (name == "background" and own != "background"):
            warnings.warn(f"{json_path}: label value {value} is {declared[value]!r} in dataset.json but the project "
                          f"maps it to {target!r} for dataset {dataset!r}; check that the dataset root and its "
                          "label map belong together", LabelMapWarning, stacklevel=3)


def warn_training_on_test_folders(name: str, role: str, root: Path, info: DatasetInfo) -> None:
    """Warn when a training dataset's cases come from an nnU-Net folder's ``imagesTs`` + ``labelsTs`` (its
    ``imagesTr`` missing): read so for a labelled test set, but for training it more likely means a partial
    download or a root pointing at the wrong copy."""
    if role == "train" and info.layout == "nnunet" and info.cases and info.cases[0].image.parent.name == "imagesTs":
        warnings.warn(f"{root}: training dataset {name!r} has no imagesTr/, so its {len(info.cases)} case(s) are read "
                      "from imagesTs/ + labelsTs/, where nnU-Net keeps a test set; check the root (a partial "
                      "download?) if these are not meant for training", UnionsegWarning, stacklevel=2)


def warn_shared_images(datasets: Sequence[tuple[str, str, DatasetInfo]], project_path: Path) -> None:
    """Warn when an evaluation set (``role`` val or test) holds image files that a training dataset holds too
    (two datasets on one root, say): its scores would come from cases the model trained on.

    Args:
        datasets: ``(name, role, scan)`` of each dataset of the project.
        project_path: the project file (named in the warning).
    """
    trained: dict[str, str] = {}
    for name, role, info in datasets:
        if role == "train":
            trained.update((os.path.realpath(c.image), name) for c in info.cases)
    for name, role, info in datasets:
        if role == "train":
            continue
        shared = [c.image for c in info.cases if os.path.realpath(c.image) in trained]
        if shared:
            owner = trained[os.path.realpath(shared[0])]
            warnings.warn(f"{project_path}: {role} dataset {name!r} shares {len(shared)} of its {len(info.cases)} "
                          f"image(s) with training dataset {owner!r} (e.g. {shared[0]}): its scores would come "
                          "from cases the model trained on", UnionsegWarning, stacklevel=2)


def list_image_files(folder: Path, warn: bool = True) -> list[Path]:
    """Images in a folder (for ``predict`` on folders); a folder of DICOM files counts as one image. A folder
    that holds image files and DICOM files gives the image files, and (``warn``) a warning that the DICOM
    files are left out and how to predict their series (they were left out without a word; listing the
    folder as a series too broke on a stray report or a one-slice file, and on a copy named after the
    folder). A caller that only builds a hint passes ``warn=False``: it reads no DICOM header then."""
    import warnings

    from unionseg.data.io import is_dicom_file
    from unionseg.errors import UnionsegWarning

    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and suffix_of(p) in IMAGE_SUFFIXES and not p.name.startswith(".")]
    others = (p for p in entries if p.is_file() and suffix_of(p) not in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:  # often named IM0001, no suffix: the first DICOM file decides
        return [folder] if any(is_dicom_file(p) for p in others) else []
    first = next((p for p in others if is_dicom_file(p)), None) if warn else None
    if first is not None:
        warnings.warn(f"{folder}: its DICOM files are left out (predict reads a folder's image files, here "
                      f"{len(files)}); to predict their series, give one of its files ({first}) or the series in a "
                      "folder of its own", UnionsegWarning, stacklevel=2)
    return files
