"""Prepare: reorient, resample, normalise, crop, validate, remap labels, and cache every case once.

The grid convention (used forward here and backward by :func:`restore_to_source` and the predictor) is
the ``align_corners=False`` one of ``torch.nn.functional.interpolate``: along an axis of ``n_in`` voxels
resampled to ``n_out``, output voxel ``j`` samples the input at the continuous index
``c_j = (j + 0.5) * n_in / n_out - 0.5`` (clamped to ``[0, n_in - 1]``); both grids cover the same physical
extent, so the new spacing is ``old_spacing * n_in / n_out`` (recorded; it can differ slightly from the
target spacing because ``n_out`` is an integer). Linear interpolation is separable (exactly trilinear);
nearest picks ``floor((j + 0.5) * n_in / n_out)``.

Steps of :func:`preprocess_image`: reorient to RAS (exact axis permutation/flip), body crop box from
``HU > body_threshold`` on the RAS grid (mapped onto the resampled grid plus a margin), resample only the
crop box (linear), clip to the CT window and scale to [-1, 1]. Arrays are (X, Y, Z) float32.

:func:`prepare_project` validates and caches every case of a project under ``project.cache_dir``; it is
incremental (fingerprints of sources and settings), parallel over cases, atomic per case, and one process
at a time (``<cache_dir>/.lock``; a second one waits). This module
never imports torch: ``unionseg prepare`` stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import numpy as np
import typer

from unionseg.data.io import (
    Geometry,
    align_label_to_image,
    read_header,
    read_image,
    reorient_like,
    reorient_to_ras,
)
from unionseg.errors import (
    DataError,
    UnionsegError,
    UnionsegWarning,
    and_more,
    mapped_values,
    refuse_in_starting_worker,
    refused_call,
    unguarded,
    worker_report,
)
from unionseg.faults import fault_point
from unionseg.jsonfile import write_text

if TYPE_CHECKING:
    from unionseg.config import PreprocessSpec, Project

log = logging.getLogger(__name__)

#: bump when the preprocessing arithmetic changes: every cached case is then redone
PREPROCESS_VERSION = 1
#: voxels of the prepared grid kept around the body's bounding box
CROP_MARGIN_VOXELS = 2
INDEX_FORMAT = "unionseg-prepared"
INDEX_VERSION = 2  # 2: source paths relative to their dataset root
_RESERVED_EXTRAS = ("image", "label", "oracle")
#: the lock file of a prepared cache (``<cache_dir>/.lock``), held by the process preparing it
CACHE_LOCK = ".lock"
#: how long a second ``prepare`` of the same cache waits for the first by default (seconds)
PREPARE_WAIT_S = 3600.0


class IntensityWarning(UnionsegWarning):
    """An image whose intensities do not look like CT Hounsfield units."""


# ---------------------------------------------------------------------- index maps (shared with the predictor)
def linear_map(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear resampling ``n_in -> n_out`` (align_corners=False).

    Returns:
        ``(i0, i1, w)``: (n_out,) int64, int64, float32; output ``j`` is ``a[i0] * (1 - w) + a[i1] * w``.
    """
    c = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    c = np.clip(c, 0.0, n_in - 1)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (c - i0).astype(np.float32)


def nearest_map(n_in: int, n_out: int) -> np.ndarray:
    """(n_out,) int64 source index of nearest-neighbour resampling ``n_in -> n_out`` (align_corners=False)."""
    idx = np.floor((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def _is_identity(n_in: int, n_out: int) -> bool:
    return n_in == n_out


def _take_linear(a: np.ndarray, axis: int, i0: np.ndarray, i1: np.ndarray, w: np.ndarray,
                 dtype: np.dtype | type | None = None) -> np.ndarray:
    """Separable linear interpolation along ``axis``; exact gathers where ``w == 0``. ``dtype`` (a float type):
    the gathered planes are converted to it, so that an integer volume is gathered as it is and never
    converted whole (a 512 x 512 x 300 scan held a float32 copy of itself: 315 MB; helper-108). Default:
    ``a``'s dtype (a float array)."""
    dtype = np.dtype(dtype if dtype is not None else a.dtype)
    lo = np.take(a, i0, axis=axis).astype(dtype, copy=False)
    if not np.any(w):
        return lo
    hi = np.take(a, i1, axis=axis).astype(dtype, copy=False)
    shape = [1] * a.ndim
    shape[axis] = len(w)
    wb = w.reshape(shape).astype(dtype, copy=False)
    hi -= lo
    hi *= wb
    hi += lo
    return hi


def restore_axis_map(
    n_prepared: int, crop_start: int, n_resampled: int, n_ras: int, order: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index map of one axis from the prepared grid back onto the RAS grid (uncrop + resample).

    Indices point into the prepared axis PADDED with one fill voxel on each side (index 0 and
    ``n_prepared + 1`` hold the fill value), so voxels outside the crop box read the fill.

    Returns:
        ``(i0, i1, w)`` (n_ras,) int64, int64, float32; for ``order=0``, ``i1 == i0`` and ``w == 0``.
    """
    if order == 0:
        src = nearest_map(n_resampled, n_ras)
        idx = np.clip(src - crop_start + 1, 0, n_prepared + 1)
        return idx, idx, np.zeros(n_ras, dtype=np.float32)
    if order != 1:
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    i0, i1, w = linear_map(n_resampled, n_ras)
    return (np.clip(i0 - crop_start + 1, 0, n_prepared + 1), np.clip(i1 - crop_start + 1, 0, n_prepared + 1), w)


# ---------------------------------------------------------------------- the record
@dataclass(frozen=True, eq=False)
class PreprocessRecord:
    """Everything needed to map a prepared array back onto its source grid.

    Attributes:
        source: the input's geometry (any orientation).
        ras: the geometry after reorientation to RAS (same voxels, permuted/flipped).
        resampled_shape: the RAS grid resampled to the target spacing (before the crop).
        crop_start, crop_stop: the body crop box on the resampled grid (stop exclusive).
        prepared: geometry of the prepared (cropped) array; its spacing is the actual spacing.
    """

    source: Geometry
    ras: Geometry
    resampled_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    prepared: Geometry

    @property
    def spacing(self) -> tuple[float, float, float]:
        """The actual spacing of the prepared grid (mm)."""
        return self.prepared.spacing

    @property
    def resampled(self) -> Geometry:
        """Geometry of the resampled, uncropped grid."""
        return Geometry(self.resampled_shape, _resampled_affine(self.ras, self.resampled_shape))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source.to_dict(), "ras": self.ras.to_dict(),
                "resampled_shape": list(self.resampled_shape), "crop_start": list(self.crop_start),
                "crop_stop": list(self.crop_stop), "prepared": self.prepared.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessRecord:
        return cls(Geometry.from_dict(data["source"]), Geometry.from_dict(data["ras"]),
                   _int3(data["resampled_shape"]), _int3(data["crop_start"]), _int3(data["crop_stop"]),
                   Geometry.from_dict(data["prepared"]))


def _int3(values: Sequence[Any]) -> tuple[int, int, int]:
    a, b, c = (int(v) for v in values)
    return a, b, c


def _resampled_affine(ras: Geometry, new_shape: Sequence[int]) -> np.ndarray:
    scale = np.asarray(ras.shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = 0.5 * scale - 0.5  # new voxel 0 sits at old continuous index 0.5 * s - 0.5
    return ras.affine @ step


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    """``max(1, round(n * spacing / target))`` per axis, the ratio first rounded to 4 decimals: NIfTI stores
    spacing as float32, NRRD, MHA and DICOM as float64, and at a ratio of x.5 that difference (25 x 0.6 mm /
    6 mm: 2.5000001 or 2.5) gave the same scan another grid, and other labels, by its file format. (``round``
    takes an exact x.5 to the even neighbour.)"""
    a, b, c = (max(1, int(round(round(n * s / t, 4)))) for n, s, t in zip(shape, spacing, target, strict=True))
    return a, b, c


def _body_box(ras_array: np.ndarray, threshold: float, new_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box of ``ras_array > threshold`` mapped onto the resampled grid, plus the margin.

    A resampled voxel is kept when its footprint overlaps the box of body voxels; no body voxel at all
    keeps the whole grid.
    """
    mask = ras_array > threshold
    start, stop = [], []
    for axis, n_new in enumerate(new_shape):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return (0, 0, 0), tuple(int(n) for n in new_shape)
        n_old = ras_array.shape[axis]
        s = n_old / n_new
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        j0 = int(np.floor(lo / s)) - CROP_MARGIN_VOXELS
        j1 = int(np.ceil(hi / s)) + CROP_MARGIN_VOXELS
        start.append(max(0, j0))
        stop.append(min(int(n_new), j1))
    return tuple(start), tuple(stop)


def _crop_affine(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
    return out


# ---------------------------------------------------------------------- images and labels
#: the most voxels a prepared volume may have before the crop (2^32: 16 GiB as float32, more than any scan at a
#: training spacing); a project's spacing typed in the wrong unit (0.0008 for 0.8 mm) would otherwise fill the
#: memory or the disk
MAX_PREPARED_VOXELS = 1 << 32


def preprocess_image(array: np.ndarray, geometry: Geometry, spec: PreprocessSpec,
                     path: Path | None = None) -> tuple[np.ndarray, PreprocessRecord]:
    """Bring a CT volume onto the training grid.

    Args:
        array: (X, Y, Z) Hounsfield units, any numeric dtype, on ``geometry``'s grid. Not modified.
        geometry: the array's geometry (any orientation).
        spec: target spacing (mm, along the RAS axes X, Y, Z), CT window, body crop settings.

    Returns:
        ``(prepared, record)``: (X', Y', Z') float32 in [-1, 1] on the RAS grid at (about) the target
        spacing, cropped to the body; the record maps it back (:func:`restore_to_source`).

    Raises:
        DataError: not 3D, its shape differs from the geometry, or the target grid would hold more than
            :data:`MAX_PREPARED_VOXELS` voxels (naming ``path``, the image).
    """
    if array.ndim != 3 or tuple(array.shape) != tuple(geometry.shape):
        raise DataError(f"expected a 3D array of shape {geometry.shape}, got {tuple(array.shape)}", path)
    ras_array, ras = reorient_to_ras(array, geometry, contiguous=False)  # read only: no copy of the scan
    new_shape = target_shape(ras.shape, ras.spacing, spec.spacing)
    if int(np.prod(new_shape, dtype=np.int64)) > MAX_PREPARED_VOXELS:
        raise DataError(f"resampled to the spacing {list(spec.spacing)} mm this image would have shape "
                        f"{tuple(new_shape)}, {np.prod(new_shape, dtype=np.float64):.3g} voxels, more than the "
                        f"{MAX_PREPARED_VOXELS:.3g} unionseg resamples to; is the project's spacing in mm?", path)
    if spec.crop_to_body:
        start, stop = _body_box(ras_array, spec.body_threshold, new_shape)
    else:
        start, stop = (0, 0, 0), new_shape
    out = ras_array
    converted = False
    # shrinking axes first keeps the intermediate arrays small
    for axis in sorted(range(3), key=lambda a: new_shape[a] / ras.shape[a]):
        n_in, n_out = ras.shape[axis], new_shape[axis]
        lo, hi = start[axis], stop[axis]
        if _is_identity(n_in, n_out):
            if (lo, hi) != (0, n_in):
                index: list[slice] = [slice(None)] * 3
                index[axis] = slice(lo, hi)
                out = out[tuple(index)]
            continue
        i0, i1, w = linear_map(n_in, n_out)
        out = _take_linear(out, axis, i0[lo:hi], i1[lo:hi], w[lo:hi], np.float32)  # float32 from the first pass
        converted = True
    if not converted:
        out = np.array(out, dtype=np.float32)  # a copy: never write into the caller's array
    np.clip(out, spec.window[0], spec.window[1], out=out)
    out -= np.float32(spec.center)
    out /= np.float32(spec.half_width)
    out = np.ascontiguousarray(out, dtype=np.float32)
    res_affine = _resampled_affine(ras, new_shape)
    prepared = Geometry(out.shape, _crop_affine(res_affine, start))  # type: ignore[arg-type]
    record = PreprocessRecord(geometry, ras, _int3(new_shape), _int3(start), _int3(stop), prepared)
    return out, record


def preprocess_label(label: np.ndarray, geometry: Geometry, record: PreprocessRecord) -> np.ndarray:
    """Put an (already image-aligned) label map on the prepared grid of ``record`` (nearest neighbour).

    Args:
        label: (X, Y, Z) integer codes on ``geometry`` (the image's source grid).
        geometry: the label's geometry; must equal ``record.source``'s grid.

    Returns:
        (X', Y', Z') array of the label's dtype on ``record.prepared``.

    Raises:
        DataError: the label is not on the record's source grid.
    """
    if tuple(label.shape) != tuple(geometry.shape) or not geometry.same_grid(record.source, atol=1e-3):
        raise DataError(f"label grid {geometry} differs from the image grid {record.source}")
    lab_ras, ras = reorient_to_ras(label, geometry)
    index = []
    for axis in range(3):
        idx = nearest_map(ras.shape[axis], record.resampled_shape[axis])
        index.append(idx[record.crop_start[axis]:record.crop_stop[axis]])
    if all(len(ix) == n and np.array_equal(ix, np.arange(n)) for ix, n in zip(index, ras.shape, strict=True)):
        return np.ascontiguousarray(lab_ras)
    return np.ascontiguousarray(lab_ras[np.ix_(*index)])


def restore_to_source(
    prepared_array: np.ndarray, record: PreprocessRecord, order: int = 0, fill: float | Sequence[float] = 0.0
) -> np.ndarray:
    """Map an array on the prepared grid back onto the source grid (uncrop -> resample -> reorient).

    Args:
        prepared_array: (X', Y', Z') or (C, X', Y', Z') on ``record.prepared``.
        order: 0 nearest (labels, dtype kept), 1 linear (probabilities; float32 or float16 kept).
        fill: value outside the crop box; per channel for (C, ...) arrays (e.g. background = 1).

    Returns:
        (*C, X, Y, Z) on ``record.source``'s grid (its shape and axis order).
    """
    arr = np.asarray(prepared_array)
    spatial = arr.shape[-3:]
    if tuple(spatial) != tuple(record.prepared.shape):
        raise ValueError(f"array spatial shape {tuple(spatial)} differs from the prepared grid {record.prepared.shape}")
    channels = arr.ndim == 4
    if order == 1 and not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    fill_arr = np.asarray(fill, dtype=arr.dtype)
    if channels and fill_arr.ndim == 1:
        fill_arr = fill_arr.reshape(-1, 1, 1, 1)
    out = arr
    for axis in range(3):
        ax = axis + (1 if channels else 0)
        n_prep, n_res, n_ras = spatial[axis], record.resampled_shape[axis], record.ras.shape[axis]
        start = record.crop_start[axis]
        if n_res == n_ras and start == 0 and n_prep == n_res:
            continue
        i0, i1, w = restore_axis_map(n_prep, start, n_res, n_ras, order)
        pad_shape = list(out.shape)
        pad_shape[ax] = 1
        pad = np.broadcast_to(fill_arr, pad_shape).astype(out.dtype)
        padded = np.concatenate([pad, out, pad], axis=ax)
        out = _take_linear(padded, ax, i0, i1, w) if order == 1 else np.take(padded, i0, axis=ax)
    if channels:
        moved = np.moveaxis(out, 0, -1)
        back = reorient_like(moved, record.ras, record.source)
        return np.ascontiguousarray(np.moveaxis(back, -1, 0))
    return reorient_like(out, record.ras, record.source)


# ---------------------------------------------------------------------- validation helpers
#: voxel spacings outside this range (mm) are refused: a spacing of 0.001 is a header written in metres
#: without saying so, 1,000 one in microns; resampling either to the training grid would give a volume of
#: one voxel or an array too large for memory
SPACING_RANGE_MM = (0.01, 100.0)


def check_spacing(geometry: Geometry, path: Path | None) -> None:
    """Refuse a voxel spacing no CT scanner produces (see :data:`SPACING_RANGE_MM`), naming the file.

    Raises:
        DataError: a spacing below 0.01 mm or above 100 mm on any axis.
    """
    lo, hi = SPACING_RANGE_MM
    spacing = geometry.spacing
    if all(lo <= s <= hi for s in spacing):
        return
    shown = ", ".join(f"{s:.4g}" for s in spacing)
    raise DataError(f"voxel spacing ({shown}) mm is outside {lo:g}-{hi:g} mm, not a CT scan's; are the header's "
                    "affine and units field (xyzt_units) in the unit they claim?", path)


def check_finite(array: np.ndarray, path: Path | None) -> None:
    """Refuse an image with NaN or infinite voxels, counting them and naming the file."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise DataError(f"image holds {bad} non-finite (NaN/inf) voxels", path)


def intensity_warning(array: np.ndarray, path: Path) -> str | None:
    """A message when the intensity range is not CT-like, else None: max < 100 HU or min > -200 HU (an MRI,
    a scaled image), or a value beyond +-100000, which no scanner's HU reach (an image scaled by 1000, say;
    padding of -32768 or metal near 30000 stays within)."""
    lo, hi = float(np.min(array)), float(np.max(array))
    if hi < 100 or lo > -200 or lo < -1e5 or hi > 1e5:
        return (f"{path}: intensity range [{lo:.4g}, {hi:.4g}] does not look like CT in Hounsfield units "
                "(expected air near -1000 and bone above 100); check the image")
    return None


def _integer_labels(label: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(label.dtype, np.bool_):
        return label.astype(np.uint8)
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise DataError("label map holds non-finite values", path)
        frac = label != np.round(label)
        if frac.any():
            examples = sorted({float(v) for v in label[frac][:1000]})[:5]
            raise DataError(f"label map holds non-integer values (e.g. {examples}); labels must be integers", path)
        return label.astype(np.int64) if (label.min() < 0 or label.max() > 255) else label.astype(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"label map has unsupported dtype {label.dtype}", path)
    return label


def remap_labels(label: np.ndarray, lookup: np.ndarray, path: Path, what: str = "label map",
                 declared: Sequence[int] | None = None) -> np.ndarray:
    """Local label values -> codes through a (256,) table (-1 = unmapped).

    Args:
        declared: the values the dataset's dataset.json declares, if it has one: a value outside them is
            more likely a stray voxel value of this file than a class the project forgot to map, and the
            error says so first.

    Raises:
        DataError: naming the file and the values that are not in the map.
    """
    label = _integer_labels(label, path)
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi > 255:
        values = np.unique(label[(label < 0) | (label > 255)])[:10].tolist()
        raise DataError(f"{what} holds values {values} outside 0..255 that the project does not map", path)
    small = label.astype(np.uint8, copy=False)
    present = np.flatnonzero(np.bincount(small.ravel(), minlength=256))
    unmapped = [int(v) for v in present if lookup[v] < 0]
    if unmapped:
        mapped = [int(v) for v in np.flatnonzero(lookup >= 0) if v > 0]
        # under 'other: background' nearly every value is mapped: name those mapped to a class
        named = mapped if len(mapped) <= 10 else [v for v in mapped if lookup[v] > 0]
        if unmapped == [255] and named and not set(mapped) & set(present.tolist()):
            # a binary mask saved as 0/255 (image editors, many converters): 255 is the organ, not a stray value
            raise DataError(f"{what} holds 0 and 255 only, none of the mapped values {named}: a mask saved as "
                            f"0/255? Map 255 to its class in the dataset's 'labels' in the project file (e.g. "
                            f"'255: ...' in place of '{named[0]}: ...'), and in its dataset.json if it has one", path)
        stray = [v for v in unmapped if declared is not None and v not in declared]
        if stray:
            raise DataError(f"{what} holds values {stray} that its dataset.json does not declare (it declares "
                            f"{sorted(declared or [])}): stray values in this file? Fix the file; or, if they are "
                            f"a class, declare them in dataset.json and map them under the dataset's 'labels' in "
                            f"the project file", path)
        raise DataError(f"{what} holds values {unmapped} that are not in the project's label map "
                        f"(mapped: {mapped_values(mapped)}); map each under the dataset's 'labels' in the project file to the class it "
                        f"belongs to (a lesion inside an organ is part of it: its tumour class, or the organ), or to "
                        f"background only for a structure no class stands for ('{unmapped[0]}: background', or "
                        "'other: background' for every value the map does not list); "
                        "declare them in its dataset.json if it has one: it must name every value the project maps", path)
    table = np.where(lookup >= 0, lookup, 0).astype(np.uint8)
    return table[small]


# ---------------------------------------------------------------------- the cache: one case
def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or absolute where it lies outside."""
    try:
        return Path(os.path.normpath(path)).relative_to(os.path.normpath(root)).as_posix()
    except ValueError:
        return str(path)


def _content_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (hex, 16 characters): what tells a touched or copied file from a changed one."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _source_record(recorded: Any) -> list[Any] | None:
    """A meta's record of one source, checked: ``[path, size, key, sha, seen]``, or the ``[path, size,
    mtime]`` of a release before hashes; None for anything else (a hand-edited or damaged meta)."""
    if not isinstance(recorded, (list, tuple)) or len(recorded) not in (3, 5):
        return None
    try:
        rel, size = str(recorded[0]), int(recorded[1])
        if len(recorded) == 3:
            return [rel, size, int(recorded[2])]
        key = recorded[2] if isinstance(recorded[2], str) else int(recorded[2])
        return [rel, size, key, str(recorded[3]), int(recorded[4])]
    except (TypeError, ValueError):
        return None


def _size_and_date(path: Path) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a file: one ``stat``."""
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def _read_source(path: Path) -> tuple[str, int, int]:
    """``(sha, size, mtime_ns)`` of a file, the date and size taken BEFORE its bytes are read: a file that
    changes while it is read keeps a newer date than the one recorded, so the next prepare reads it again."""
    size, mtime = _size_and_date(path)
    return _content_hash(path), size, mtime


def _unchanged(record: list[Any] | None, rel: str, current: tuple[int, int]) -> bool:
    """Whether a hashed record (``[path, size, key, sha, seen]``) still describes the file at ``rel`` whose
    ``(size, mtime_ns)`` is ``current``: then its bytes need not be read."""
    return record is not None and len(record) == 5 and record[0] == rel and (record[1], record[4]) == current


def _needs_hash(path: Path, root: Path, recorded: Any, current: tuple[int, int], force: bool = False) -> bool:
    """Whether :func:`_source_identity` will read ``path``'s bytes (so that they can be hashed in parallel
    first): under ``force`` always; else a file without a usable hashed record, or whose size or date
    (``current``) is not the one last seen."""
    return force or not _unchanged(_source_record(recorded), _relative(path, root), current)


def _source_identity(path: Path, root: Path, recorded: Any, read: Callable[[Path], tuple[str, int, int]],
                     current: tuple[int, int], force: bool = False) -> tuple[list[Any], list[Any]]:
    """A source file's identity for the fingerprints, and the record a case's meta keeps of it.

    The identity is ``[relative path, size, key]`` with ``key`` the SHA-256 of the file's bytes (16 hex
    characters), so the same bytes keep one identity whatever their file's date: a ``touch``, a ``git
    checkout``, ``cp`` without ``-a``, a restore from a backup, or bytes changed and changed back, leave the
    prepared case, the data fingerprint and the shared experts keyed by it valid. The record, ``[path, size,
    key, sha, seen]``, adds the hash and the modification time last seen: bytes are read (``read``: hash,
    size and date) only when the size or date (``current``, the planning's one ``stat`` of the file) differs
    from it, and always under ``force``, which checks
    every file's bytes against its record. A record from a release before hashes, ``[path, size, mtime]``,
    keeps its mtime as the key while the date is unchanged (a cache prepared then stays valid) and ``force``
    is not given; its hash is taken once.
    """
    rel = _relative(path, root)
    record = _source_record(recorded)
    if not force and record is not None and _unchanged(record, rel, current):  # (None: for the type checker)
        return [rel, record[1], record[2]], list(record)
    sha, size, mtime = read(path)
    if record is not None and record[0] == rel and record[1] == size:
        if len(record) == 3:
            if record[2] == mtime and not force:
                return [rel, size, mtime], [rel, size, mtime, sha, mtime]
        elif sha == record[3]:
            return [rel, size, record[2]], [rel, size, record[2], sha, mtime]
    return [rel, size, sha], [rel, size, sha, sha, mtime]


def _last_seen(recorded: Any) -> int | None:
    """The modification time a meta's source record last saw (None: no usable record)."""
    record = _source_record(recorded)
    return None if record is None else record[2] if len(record) == 3 else record[4]


def _hash_sources(paths: Sequence[Path], workers: int, progress: bool, console: Any
                  ) -> dict[Path, tuple[str, int, int]]:
    """:func:`_read_source` of every path, on ``workers`` threads (hashlib releases the GIL while it
    digests), with a progress bar when there are many: a first prepare of a large collection reads every
    file once here. A failure (an unreadable file, Ctrl-C) cancels the files not started."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    if not paths:
        return {}
    out: dict[Path, tuple[str, int, int]] = {}
    bar = None
    if progress and len(paths) > 1:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from unionseg.progress import make_progress

        bar = make_progress(TextColumn("reading sources (SHA-256)"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                            label="prepare: reading sources (SHA-256)")
        bar.start()
        task = bar.add_task("", total=len(paths))
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        futures = {pool.submit(_read_source, path): path for path in paths}
        for future in as_completed(futures):
            out[futures[future]] = future.result()
            if bar is not None:
                bar.update(task, advance=1)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # the files being read finish; no other starts
        raise
    finally:
        if bar is not None:
            bar.stop()
    pool.shutdown()
    return out


def _stat(path: Path, root: Path) -> list[Any]:
    """A source file's identity: its path relative to the dataset root, size and mtime.

    Relative, so that a project moved or copied with its data (``mv``, ``cp -a``, ``rsync -a``: mtimes kept),
    or pointed to another copy of a dataset by ``--root``, stays prepared, its data fingerprint and shared
    experts included.
    """
    return [_relative(path, root), *_size_and_date(path)]


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _CaseJob:
    """What one worker prepares (plain, picklable data)."""

    dataset: str
    case_id: str
    out_dir: str
    image: str
    label: str | None
    oracle: str | None
    spec: dict[str, Any]
    lookup: list[int]
    n_leaves: int
    fingerprints: dict[str, str]
    do_image: bool
    do_label: bool
    do_oracle: bool
    record: dict[str, Any] | None
    meta: dict[str, Any]
    refresh_only: bool = False  # nothing to compute: the meta's record of its sources alone is renewed
    declared: list[int] | None = None  # the label values the dataset's dataset.json declares (None: no such file)
    redated: bool = False  # a source's modification time changed since the last prepare (its bytes may not)


def _case_files(out_dir: Path, case_id: str) -> dict[str, Path]:
    return {"image": out_dir / f"{case_id}.image.npy", "label": out_dir / f"{case_id}.label.npy",
            "oracle": out_dir / f"{case_id}.oracle.npy", "meta": out_dir / f"{case_id}.json"}


def _remove_entry(files: Mapping[str, Path]) -> None:
    """Delete a case's cache entry, json first (so a half-deleted entry is never read as valid)."""
    for key in ("meta", "image", "label", "oracle"):
        try:
            files[key].unlink()
        except FileNotFoundError:
            pass


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def _run_case(job: _CaseJob) -> dict[str, Any]:
    """Prepare one case in a worker; returns ``{"meta": ..., "warnings": [...]}`` or ``{"error": ...}``."""
    from unionseg.config import PreprocessSpec, from_dict

    out_dir = Path(job.out_dir)
    files = _case_files(out_dir, job.case_id)
    tmp = {k: p.with_name(f".{p.name}.{os.getpid()}.tmp") for k, p in files.items()}
    messages: list[str] = []
    try:
        spec = from_dict(PreprocessSpec, job.spec)
        image_path = Path(job.image)
        record: PreprocessRecord | None = None
        if job.do_image:
            array, geom = read_image(image_path)
            check_spacing(geom, image_path)
            check_finite(array, image_path)
            note = intensity_warning(array, image_path)
            if note:
                messages.append(note)
            prepared, record = preprocess_image(array, geom, spec, image_path)
            del array
            out_dir.mkdir(parents=True, exist_ok=True)
            _save_npy(tmp["image"], prepared)
            del prepared
        else:
            assert job.record is not None
            record = PreprocessRecord.from_dict(job.record)
            geom = read_header(image_path)
            if not geom.same_grid(record.source):
                raise DataError("image geometry changed since it was prepared; run prepare with --force", image_path)
        labels_out: dict[str, np.ndarray] = {}
        if job.do_label and job.label is not None:
            label_path = Path(job.label)
            raw, lgeom = read_image(label_path)
            raw = align_label_to_image(raw, lgeom, geom, label_path, image_path)
            codes = remap_labels(raw, np.asarray(job.lookup, dtype=np.int64), label_path, declared=job.declared)
            labels_out["label"] = preprocess_label(codes, geom, record)
        if job.do_oracle and job.oracle is not None:
            oracle_path = Path(job.oracle)
            raw, ogeom = read_image(oracle_path)
            raw = align_label_to_image(raw, ogeom, geom, oracle_path, image_path)
            table = np.full(256, -1, dtype=np.int64)
            table[: job.n_leaves] = np.arange(job.n_leaves)
            codes = remap_labels(raw, table, oracle_path, what="oracle label map (global leaf ids)")
            labels_out["oracle"] = preprocess_label(codes, geom, record)
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, arr in labels_out.items():
            _save_npy(tmp[key], np.ascontiguousarray(arr, dtype=np.uint8))
        meta = dict(job.meta)
        if "label" in labels_out:  # whether any voxel holds a class (a dataset of empty label maps is warned about)
            meta["labelled"] = bool(labels_out["label"].any())
        meta["record"] = record.to_dict()
        meta["fingerprints"] = job.fingerprints
        meta["has_oracle"] = job.oracle is not None
        with tmp["meta"].open("w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        fault_point("prepare_before_commit")  # fault tests only (UNIONSEG_FAULT_POINT)
        for key in ("image", "label", "oracle"):
            if tmp[key].exists():
                tmp[key].replace(files[key])
        fault_point("prepare_mid_commit")
        if job.oracle is None and files["oracle"].exists():
            files["oracle"].unlink()
        tmp["meta"].replace(files["meta"])  # json last: the entry becomes valid only now
        return {"meta": meta, "warnings": messages}
    except DataError as exc:
        _remove_entry(files)
        return {"error": [exc.message, str(exc.path) if exc.path else None]}
    except MemoryError:
        _remove_entry(files)
        return {"error": ["out of memory while preparing this case", job.image]}
    finally:
        for p in tmp.values():
            if p.exists():
                p.unlink()


# ---------------------------------------------------------------------- the index
@dataclass(frozen=True)
class CasePaths:
    """Files of one cached case (``oracle`` is None when the dataset has no oracle labels)."""

    image: Path
    label: Path
    oracle: Path | None
    meta: Path


@dataclass(frozen=True, eq=False)
class PreparedCase:
    """One prepared case: arrays are memory-mapped on access.

    Attributes:
        split: ``train``, ``val`` or ``test`` (training datasets are split; evaluation sets keep their role).
        role: the dataset's role in the project (``train``, ``val``, ``test``).
        annotated: (L,) bool, the leaves this case's ground truth determines
            (``label_space.annotated_leaf_mask``; an evaluation set that annotates every class is all True).
    """

    dataset: str
    case_id: str
    split: str
    role: str
    paths: CasePaths
    record: PreprocessRecord
    annotated: np.ndarray = field(repr=False)

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.case_id}"

    def image(self) -> np.ndarray:
        """(X, Y, Z) float32 in [-1, 1], memory-mapped read-only."""
        return np.load(self.paths.image, mmap_mode="r")

    def label(self) -> np.ndarray:
        """(X, Y, Z) uint8 codes (leaf ids ``< L``, region codes ``L + g``), memory-mapped."""
        return np.load(self.paths.label, mmap_mode="r")

    def oracle(self) -> np.ndarray | None:
        """(X, Y, Z) uint8 full-truth leaf ids (phantom only), or None."""
        return None if self.paths.oracle is None else np.load(self.paths.oracle, mmap_mode="r")

    def extra_path(self, name: str) -> Path:
        """Where a per-case extra volume ``name`` (e.g. ``pseudo``) is cached: ``<case>.<name>.npy``."""
        if not name or not name.replace("_", "").replace("-", "").isalnum() or name in _RESERVED_EXTRAS:
            raise ValueError(f"invalid extra name {name!r} (letters, digits, _ and -; not {_RESERVED_EXTRAS})")
        return self.paths.meta.with_name(f"{self.case_id}.{name}.npy")


def case_counts(index: PreparedIndex) -> str:
    """``train N, val N, test N``; with a ``role: val`` dataset, validation uses its cases alone, and the
    cases the training datasets' written splits hold out are counted apart (neither trained nor validated
    on)."""
    val = index.cases(split="val")
    own = sum(c.role == "val" for c in val)
    held = len(val) - own
    shown = f"val {len(val)}" if not own or not held else \
        f"val {own} (from the dataset with role: val; {held} more held out by the training datasets' split keys, " \
        "unused: leave split out to train on them)"
    return f"train {len(index.cases(split='train'))}, {shown}, test {len(index.cases(split='test'))}"


@dataclass(frozen=True)
class PrepareSummary:
    """What one ``prepare`` run did (case keys ``dataset/case``)."""

    prepared: tuple[str, ...]
    relabelled: tuple[str, ...]
    skipped: tuple[str, ...]
    warnings: tuple[str, ...]
    # up to date, their source files' times changed but not their bytes (a touch, a copy): among ``skipped``
    renewed: tuple[str, ...] = ()

    def describe(self) -> str:
        renewed = (f" ({len(self.renewed)} of them with source files whose dates changed but not their bytes)"
                   if self.renewed else "")
        return (f"prepared {len(self.prepared)} case(s), re-did labels of {len(self.relabelled)}, "
                f"skipped {len(self.skipped)} up-to-date case(s){renewed}")


def _settings(project: Project) -> dict[str, Any]:
    """The project settings a prepared cache depends on (JSON-able)."""
    from unionseg.config import to_dict

    space = project.label_space
    return {
        "preprocess_version": PREPROCESS_VERSION,
        "preprocessing": to_dict(project.preprocessing),
        "classes": list(space.names),
        "datasets": [
            {"name": d.name, "root": str(d.root), "layout": d.layout, "role": d.role, "split": to_dict(d.split),
             "lookup": space.local_lookup(d.name).tolist(), "annotated": list(d.annotated),
             "oracle_labels": _relative(d.oracle_labels, d.root) if d.oracle_labels else None}
            for d in project.datasets
        ],
    }


def _settings_hash(settings: Mapping[str, Any]) -> str:
    """The settings' fingerprint, where the data are left out: the sources' checks decide about them."""
    return _hash({**settings, "datasets": [{k: v for k, v in d.items() if k != "root"} for d in settings["datasets"]]})


def _settings_change(recorded: Any, current: Mapping[str, Any]) -> str:
    """What differs between the settings a cache was prepared with and the project's now, in words."""
    generic = "the project's preprocessing, label maps or datasets changed since prepare"
    if not isinstance(recorded, Mapping):
        return generic
    old_sets = {d.get("name"): d for d in recorded.get("datasets", []) if isinstance(d, Mapping)}
    names = [d["name"] for d in current["datasets"]]
    if list(old_sets) != names:
        return f"the project's datasets are now {names}, prepared were {list(old_sets)}"
    for key in ("preprocessing", "classes", "preprocess_version"):
        if recorded.get(key) != current[key]:
            return f"{key} changed since prepare ({recorded.get(key)} -> {current[key]})"
    words = {"lookup": "label map", "annotated": "annotated classes", "oracle_labels": "oracle labels"}
    for d in current["datasets"]:
        before = old_sets[d["name"]]
        changed = [words.get(k, k) for k in d if k != "root" and before.get(k) != d[k]]
        if changed:
            return f"dataset {d['name']!r}: {', '.join(changed)} changed since prepare"
    return generic


class PreparedIndex:
    """The prepared cache of a project: splits, cases, and a data fingerprint.

    Build it with :func:`prepare_project`; load it with :meth:`load`.
    """

    def __init__(self, project: Project, data: Mapping[str, Any], summary: PrepareSummary | None = None) -> None:
        self.project = project
        self.data = dict(data)
        self.summary = summary
        self.fingerprint: str = str(data["fingerprint"])
        self.splits: dict[str, dict[str, list[str]]] = {k: dict(v) for k, v in data["splits"].items()}
        space = project.label_space
        cache = project.cache_dir
        cases = []
        for entry in data["cases"]:
            ds, cid = entry["dataset"], entry["case_id"]
            files = _case_files(cache / ds, cid)
            cases.append(PreparedCase(
                dataset=ds, case_id=cid, split=entry["split"], role=entry["role"],
                paths=CasePaths(files["image"], files["label"], files["oracle"] if entry["has_oracle"] else None,
                                files["meta"]),
                record=PreprocessRecord.from_dict(entry["record"]),
                annotated=space.annotated_leaf_mask(ds)))
        self._cases = tuple(cases)

    @classmethod
    def load(cls, project: Project, check_sources: bool = True) -> PreparedIndex:
        """Load the index of a prepared project.

        Args:
            check_sources: also check that no source file changed since prepare (one ``stat`` per file).

        Raises:
            DataError: not prepared, or stale (settings or sources changed): run ``unionseg prepare``.
        """
        path = project.cache_dir / "index.json"
        hint = f"run `unionseg prepare {shlex.quote(str(project.path))}` (prepare_project in Python)"
        if not path.is_file():
            raise DataError(f"project is not prepared; {hint}", project.cache_dir)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise DataError(f"unreadable prepared index ({exc}); {hint}", path) from None
        if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION:
            raise DataError(f"not a prepared index of this unionseg version; {hint}", path)
        current = _settings(project)
        if data.get("settings_fingerprint") != _settings_hash(current):
            raise DataError(f"prepared data is stale: {_settings_change(data.get('settings'), current)}; {hint}",
                            path)
        if check_sources:
            roots = {d.name: d.root for d in project.datasets}
            prepared_from = {d.get("name"): d.get("root") for d in data["settings"].get("datasets", [])}
            for name, rel, size, mtime in data.get("sources", []):
                source = roots[name] / rel  # an absolute rel (outside the root) stays itself
                if _source_unchanged(source, size, mtime):
                    continue
                before = prepared_from.get(name)
                if before is not None and before != str(roots[name]) and _source_unchanged(Path(before) / rel, size,
                                                                                             mtime):
                    # the prepared data are still where they were: a forgotten --root, where re-preparing is
                    # not the fix (a project moved with its data finds its sources through the new root)
                    raise DataError(f"dataset {name!r} was prepared from {before}, and the project now points to "
                                    f"{roots[name]}, where {rel} is missing or differs; to use what was prepared, "
                                    f"pass --root {shlex.quote(f'{name}={before}')} (as prepare was given, "
                                    "perhaps); to use the data "
                                    f"at {roots[name]}, {hint}", path)
                what = "changed" if source.exists() else "is gone"
                raise DataError(f"prepared data is stale: {source} {what} since prepare; {hint}", path)
            for entry in data["cases"]:
                if not (project.cache_dir / entry["dataset"] / f"{entry['case_id']}.json").is_file():
                    raise DataError(f"prepared case {entry['dataset']}/{entry['case_id']} is missing; {hint}", path)
        return cls(project, data)

    def split_fingerprint(self, splits: Sequence[str]) -> str:
        """The fingerprint of the cases of ``splits`` alone: their ids and the identity of their source files
        and preprocessing (a change elsewhere, e.g. in the test set, leaves it alone)."""
        return _hash([[e["dataset"], e["case_id"], e["split"], e.get("fingerprints")] for e in self.data["cases"]
                      if e["split"] in splits])

    def cases(self, split: str | None = None, dataset: str | None = None) -> list[PreparedCase]:
        """Cases filtered by split (``train``/``val``/``test``) and/or dataset, in a stable order."""
        return [c for c in self._cases if (split is None or c.split == split)
                and (dataset is None or c.dataset == dataset)]

    def case(self, dataset: str, case_id: str) -> PreparedCase:
        """The prepared case ``case_id`` of ``dataset``.

        Raises:
            DataError: no such case in the index.
        """
        for c in self._cases:
            if c.dataset == dataset and c.case_id == case_id:
                return c
        raise DataError(f"no prepared case {dataset}/{case_id}", self.project.cache_dir)

    def __len__(self) -> int:
        return len(self._cases)

    def __iter__(self) -> Iterator[PreparedCase]:
        return iter(self._cases)

    def __repr__(self) -> str:
        counts = {s: len(self.cases(split=s)) for s in ("train", "val", "test")}
        return f"PreparedIndex({self.project.name!r}, {counts}, fingerprint={self.fingerprint})"


def _source_unchanged(path: Path, size: int, mtime_ns: int) -> bool:
    try:
        return _size_and_date(path) == (int(size), int(mtime_ns))
    except OSError:
        return False


# ---------------------------------------------------------------------- prepare a project
def _plan(project: Project, force: bool, workers: int = 1, progress: bool = False, console: Any = None,
          ) -> tuple[list[_CaseJob], list[dict[str, Any]], dict[str, Any], list[list[Any]]]:
    """Scan every dataset and decide, per case, what is up to date (the source files whose bytes must be
    read are hashed first, in parallel)."""
    from unionseg.config import split_cases, to_dict
    from unionseg.data.catalog import (
        check_label_map,
        scan_dataset,
        warn_shared_images,
        warn_training_on_test_folders,
    )

    space = project.label_space
    spec_dict = to_dict(project.preprocessing)
    jobs: list[_CaseJob] = []
    entries: list[dict[str, Any]] = []
    splits: dict[str, Any] = {}
    same_bytes: dict[str, list[tuple[str, str, str, str]]] = {}  # image hash -> (dataset, case, role, split)
    sources: list[list[Any]] = []
    scans = []
    planned = []
    declared_of: dict[str, list[int] | None] = {}
    for ds in project.datasets:
        info = scan_dataset(ds.name, ds.root, ds.layout, ds.oracle_labels)
        scans.append((ds.name, ds.role, info))
        declared_of[ds.name] = None if info.declared_labels is None else sorted(info.declared_labels)
        json_path = ds.root / "dataset.json"
        check_label_map(ds.name, info.declared_labels, ds.labels, json_path, space.names[1:], ds.other, project.path)
        warn_training_on_test_folders(ds.name, ds.role, ds.root, info)
        space.warn_annotations(ds.name, project.path)
        if json_path.is_file():  # KiTS and image/label-folder layouts have none
            sources.append([ds.name, *_stat(json_path, ds.root)])
        ids = [c.case_id for c in info.cases]
        if ds.role == "train":
            split = split_cases(ids, ds.split, where=f"datasets.{ds.name}.", source=project.path)
        else:
            split = {ds.role: sorted(ids)}
        splits[ds.name] = split
        split_of = {cid: s for s, members in split.items() for cid in members}
        lookup = space.local_lookup(ds.name, declared_of[ds.name]).tolist()
        out_dir = project.cache_dir / ds.name
        for case in info.cases:
            assert case.label is not None
            files = _case_files(out_dir, case.case_id)
            recorded = _read_meta(files["meta"])  # read under --force too: its sources keep their identities
            kept = (recorded or {}).get("sources")
            planned.append((ds, split_of, lookup, out_dir, case, files, None if force else recorded,
                            kept if isinstance(kept, dict) else {}))
    # one stat per source file, shared by the choice of what to hash and the identities
    current = {path: _size_and_date(path) for *_, case, _, _, _ in planned
               for path in (case.image, case.label, case.oracle_label) if path is not None}
    hashes = _hash_sources(sorted({path for ds, *_, case, _, _, kept in planned
                                   for key, path in (("image", case.image), ("label", case.label),
                                                     ("oracle", case.oracle_label))
                                   if path is not None
                                   and _needs_hash(path, ds.root, kept.get(key), current[path], force)}),
                           workers, progress, console)

    def identity(path: Path, root: Path, recorded: Any) -> tuple[list[Any], list[Any]]:
        return _source_identity(path, root, recorded, lambda p: hashes[p] if p in hashes else _read_source(p),
                                current[path], force)

    for ds, split_of, lookup, out_dir, case, files, old, kept in planned:
        assert case.label is not None
        image_stat, image_rec = identity(case.image, ds.root, kept.get("image"))
        label_stat, label_rec = identity(case.label, ds.root, kept.get("label"))
        oracle_stat, oracle_rec = identity(case.oracle_label, ds.root, kept.get("oracle")) \
            if case.oracle_label is not None else (None, None)
        # the index's staleness check compares the times last seen
        sources.extend([ds.name, r[0], r[1], r[4]] for r in (image_rec, label_rec, oracle_rec) if r is not None)
        fp_image = _hash({"v": PREPROCESS_VERSION, "spec": spec_dict, "file": image_stat})
        fp_label = _hash({"image": fp_image, "file": label_stat, "lookup": lookup})
        fp_oracle = (_hash({"image": fp_image, "file": oracle_stat, "n_leaves": space.n_leaves})
                     if oracle_stat is not None else None)
        fingerprints = {"image": fp_image, "label": fp_label, **({"oracle": fp_oracle} if fp_oracle else {})}
        old_fp = (old or {}).get("fingerprints", {})
        do_image = old is None or old_fp.get("image") != fp_image or not files["image"].is_file()
        do_label = do_image or old_fp.get("label") != fp_label or not files["label"].is_file()
        do_oracle = fp_oracle is not None and (
            do_image or old_fp.get("oracle") != fp_oracle or not files["oracle"].is_file())
        labelled = None if do_label else (old or {}).get("labelled")
        meta = {"dataset": ds.name, "case_id": case.case_id, "role": ds.role,
                "split": split_of[case.case_id], **({"labelled": labelled} if labelled is not None else {}),
                "sources": {"image": image_rec, "label": label_rec,
                            **({"oracle": oracle_rec} if oracle_rec else {})}}
        entry = {"dataset": ds.name, "case_id": case.case_id, "role": ds.role, "split": split_of[case.case_id],
                 "has_oracle": fp_oracle is not None, "fingerprints": fingerprints,
                 "record": (old or {}).get("record"), "labelled": labelled}
        entries.append(entry)
        if len(image_rec) > 3:  # the bytes' hash (a record from before hashes has none until it is read)
            same_bytes.setdefault(image_rec[3], []).append((ds.name, case.case_id, ds.role, split_of[case.case_id]))
        drop_oracle = fp_oracle is None and files["oracle"].exists()
        changed = do_image or do_label or do_oracle or drop_oracle or (old or {}).get("split") != meta["split"]
        # or only the record of its sources renewed (a touched file, or a record from before hashes): the
        # prepared arrays stay, the case's meta is written again
        if changed or kept != meta["sources"]:
            jobs.append(_CaseJob(
                dataset=ds.name, case_id=case.case_id, out_dir=str(out_dir), image=str(case.image),
                label=str(case.label), oracle=str(case.oracle_label) if case.oracle_label else None,
                spec=spec_dict, lookup=lookup, n_leaves=space.n_leaves, fingerprints=fingerprints,
                do_image=do_image, do_label=do_label, do_oracle=do_oracle,
                record=None if do_image else (old or {}).get("record"), meta=meta,
                refresh_only=not changed, declared=declared_of[ds.name],
                redated=any(_last_seen(kept.get(k)) not in (None, r[4]) for k, r in meta["sources"].items())))
    warn_shared_images(scans, project.path)
    _warn_evaluated_training_bytes(same_bytes, project.path)
    _warn_upsampling(jobs, project)
    return jobs, entries, splits, sources


def _warn_evaluated_training_bytes(same_bytes: Mapping[str, list[tuple[str, str, str, str]]],
                                   project_path: Path) -> None:
    """Warn when a case validated or tested on holds the same image bytes as a case trained on, under another
    name or in another dataset. Public releases reuse other sets' scans (AbdomenCT-1K holds LiTS, KiTS and
    MSD cases), and copies were missed: only the same file (a link) was seen, and only between an evaluation
    set and a training set, not across two training sets' splits (helper-102)."""
    pairs = []
    # with a role: val dataset, a training dataset's val split is used for nothing (validation reads that
    # dataset alone): only the evaluation datasets' cases are evaluated then
    role_val = any(c[2] == "val" for cases in same_bytes.values() for c in cases)
    for cases in same_bytes.values():
        trained = [c for c in cases if c[2] == "train" and c[3] == "train"]
        evaluated = [c for c in cases if c[3] in ("val", "test") and not (role_val and c[2] == "train")]
        if trained and evaluated:
            pairs += [(c, trained[0]) for c in evaluated]
    if pairs:
        (ev_ds, ev_case, _, ev_split), (tr_ds, tr_case, _, _) = pairs[0]
        warnings.warn(f"{project_path}: {len(pairs)} case(s) used for validation or test hold the same image bytes "
                      f"as a case trained on (e.g. {ev_ds}/{ev_case}, {ev_split}, and {tr_ds}/{tr_case}, train): "
                      "their scores would come from images the model trained on; give such a case one use "
                      "(`val_cases`, or leave it out of one dataset)", UnionsegWarning, stacklevel=3)


#: a prepared grid with more than this many times a dataset's own voxels is worth a word before prepare
#: writes it (the default spacing on 3 mm data: about 30; one scanner's slices against another's: 2 to 5)
UPSAMPLING_WARNING = 8.0


def _warn_upsampling(jobs: Sequence[_CaseJob], project: Project) -> None:
    """One warning, when the project's spacing resamples the first image to prepare of one dataset or more
    to more than :data:`UPSAMPLING_WARNING` times its voxels: the default spacing (0.8 x 0.8 x 1.5 mm) on
    3 mm data makes a cache some 30 times the inputs' voxels, and every training step and prediction pays
    for it, with no detail to gain. Unreadable headers are left to the case's own error."""
    first: dict[str, str] = {}
    for job in jobs:
        if job.do_image:
            first.setdefault(job.dataset, job.image)
    target = project.preprocessing.spacing
    found = []
    for dataset, image in first.items():
        try:
            spacing = read_header(image).spacing
        except UnionsegError:
            continue
        factor = float(np.prod(spacing)) / float(np.prod(target))
        if factor > UPSAMPLING_WARNING:
            found.append(f"{dataset} ({' x '.join(f'{s:g}' for s in spacing)} mm voxels, {factor:.1f} times as many; "
                         f"e.g. {image})")
    if found:
        warnings.warn(f"{project.path}: the spacing {' x '.join(f'{s:g}' for s in target)} mm resamples the images "
                      f"of {'; '.join(found)}: the cache, the training and the prediction time grow with the voxels, "
                      "the detail does not; set preprocessing.spacing near the data's own if that is not meant",
                      UnionsegWarning, stacklevel=2)


def _warn_empty_datasets(project: Project, entries: Sequence[dict[str, Any]]) -> None:
    """Warn about a dataset none of whose label maps holds a class (every voxel background after the map):
    an export that wrote empty masks, or a label map that sends the organ's value to background. It would
    train "no such organ anywhere". Cases prepared by a release that did not record it are not judged."""
    for ds in project.datasets:
        seen = [e.get("labelled") for e in entries if e["dataset"] == ds.name]
        if seen and all(flag is False for flag in seen):
            warnings.warn(f"{project.path}: dataset {ds.name!r}: none of its {len(seen)} label map(s) holds a value "
                          f"the project maps to a class (mapped: {dict(sorted(ds.labels.items()))}); every voxel is "
                          "background. Are the label files empty, or is a value mapped to background?",
                          UnionsegWarning, stacklevel=3)


#: written into the cache when several cases fail: one line per failing case, file and problem
PREPARE_ERRORS = "prepare_errors.txt"


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "record" in data else None


def _workers_can_start() -> bool:
    """Whether spawned workers can import the main script again, as spawn does; warns when not. A script read
    from stdin (``python - <<EOF``) has ``__file__ == "<stdin>"``, which no worker can read: every worker died,
    and prepare said a worker was killed or out of memory."""
    import sys

    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is None or Path(main_file).is_file():  # python -c, a notebook, or a script file
        return True
    warnings.warn(f"the main script ({main_file}) cannot be imported again by worker processes; the cases are "
                  "prepared in this process alone (run a script file to use workers)", UnionsegWarning,
                  stacklevel=5)  # the caller of prepare_project
    return False


def _execute(jobs: Sequence[_CaseJob], workers: int, on_done: Callable[[_CaseJob, dict[str, Any]], None]) -> None:
    if workers <= 1 or len(jobs) <= 1 or not _workers_can_start():
        for job in jobs:
            on_done(job, _run_case(job))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # spawn: workers start clean (no inherited torch/OpenMP state from the caller)
    with worker_report(), \
            ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_case, job): job for job in jobs}
        try:
            for fut in as_completed(futures):
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    job = futures[fut]
                    call = refused_call()
                    if call is not None:
                        raise unguarded(call) from None
                    raise UnionsegError(
                        f"a prepare worker died (killed, or out of memory) while cases such as {job.dataset}/"
                        f"{job.case_id} were being prepared; run prepare again (finished cases are kept), with "
                        "--workers 1 if memory is short (from a Python script: call prepare_project under "
                        "`if __name__ == \"__main__\":`)", job.out_dir) from None
                on_done(futures[fut], result)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (unionseg.stopping): the cases being prepared finish,
            for fut in futures:    # the queued ones are dropped (the pool's exit waited for every one of them)
                fut.cancel()
            raise


def prepare_project(
    project: Project | str | Path, workers: int = 2, force: bool = False, progress: bool = True,
    wait_s: float | None = PREPARE_WAIT_S, roots: Mapping[str, str | Path] | None = None,
) -> PreparedIndex:
    """Validate and cache every case of a project; incremental, parallel, atomic per case.

    With ``workers`` > 1 the cases are prepared in worker processes started by ``spawn``: a script that
    calls this must do so under ``if __name__ == "__main__":``, as any script using multiprocessing (each
    worker imports the script; without the guard it would prepare the project again).

    Writes ``<cache_dir>/<dataset>/<case>.image.npy`` (float32 X, Y, Z), ``.label.npy`` (uint8 codes),
    ``.oracle.npy`` (uint8 leaf ids, when the dataset has oracle labels), ``.json`` (record, sources,
    fingerprints; written last) and ``<cache_dir>/index.json`` (splits, settings, cases, data fingerprint).

    A case is redone only for what changed: its image or the preprocessing settings (everything), its
    label file or its dataset's label map (labels only), its oracle file (oracle only).

    Args:
        project: the project, or its project file (YAML).
        workers: worker processes; 0 or 1 runs in this process.
        force: redo every case.
        progress: show a progress bar and print a summary.
        wait_s: how long to wait for another process preparing the same cache (seconds; 0 refuses at once,
            None waits without limit).
        roots: dataset name -> root folder (``--root NAME=DIR``), for a project file; a loaded project holds
            the roots it was loaded with (``load_project(path, roots=...)``), and ``roots`` is then refused.

    Concurrency: the whole run holds ``<cache_dir>/.lock`` (:mod:`unionseg.locking`), so two ``prepare``
    runs of one cache never interleave: the second waits (one ``waiting: ...`` line on stderr), then finds
    the cases done and skips them.

    Raises:
        DataError: the first failing case (in project order), naming its file and the problem, and the other
            failing cases, all listed in ``<cache_dir>/prepare_errors.txt`` when there are several (the
            other cases still finish; a failing case leaves no cache entry and no index is written).
        UnionsegError: another process still holds the cache after ``wait_s`` seconds; called while a
            worker process imports the calling script (the ``__main__`` guard is missing).
        ConfigError: ``workers`` is not an integer >= 0; ``roots`` with a loaded project.

    Returns:
        The index of the prepared cases (what ``<cache_dir>/index.json`` holds).
    """
    from unionseg.locking import hold_lock

    refuse_in_starting_worker("prepare_project")  # its workers would prepare the project again
    from unionseg.config import Project, load_project
    from unionseg.errors import ConfigError

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:  # -1 ran in-process silently
        raise ConfigError(f"--workers must be an integer >= 0 (0 or 1: in this process), got {workers!r}")

    if not isinstance(project, Project):
        project = load_project(project, roots=roots)
    elif roots:
        raise ConfigError("roots= with a loaded project: give them to load_project(path, roots=...)", project.path)
    with hold_lock(project.cache_dir / CACHE_LOCK, "the prepared cache", timeout=wait_s,
                   hint="run prepare again once it has finished, or wait longer with --wait SECONDS"):
        return _prepare_locked(project, workers, force, progress)


def _refuse_to_replace_another_projects_cases(project: Project, index_path: Path, jobs: list[_CaseJob]) -> None:
    """Refuse to prepare cases over those another project file prepared in this cache (two project files of
    one folder share ``prepared/`` by default): with other settings, or other data under the same dataset
    names, their prepared files would be replaced. A file that only reuses the cases (a subset of the
    datasets, another split) is let through, and so is the cache's own file, changed; ``--force`` replaces.

    Raises:
        DataError: naming the cache, the other project file, the first case and what differs.
    """
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
        other = data.get("project_file")
        listed = {(str(c["dataset"]), str(c["case_id"])) for c in data.get("cases", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return  # no index (or an unreadable one): nothing anybody could still use
    if not isinstance(other, str) or other == project.path.name:
        return
    touched = [f"{j.dataset}/{j.case_id}" for j in jobs if (j.dataset, j.case_id) in listed and not j.refresh_only]
    if not touched:
        return
    current = _settings(project)
    why = (_settings_change(data.get("settings"), current) if data.get("settings_fingerprint") !=
           _settings_hash(current) else "the same settings, other source files")
    raise DataError(f"this cache holds the cases {other} prepared; preparing {project.path.name} here would replace "
                    f"{touched[0]}{and_more(len(touched), 1)} ({why}): give it a cache of its own (cache_dir: in the project file), or "
                    "pass --force to replace them", project.cache_dir)


def _check_writable(folders: set[Path]) -> None:
    """Refuse, before anything in the cache changes, a folder of it (or the nearest one that exists) that this
    process cannot write into: another user's dataset folder in a shared cache.

    Raises:
        DataError: naming the folder, its owner where it can be read, and what to do.
    """
    import os

    from unionseg.jsonfile import nearest_existing, owner_name

    for folder in sorted(folders):
        there = nearest_existing(folder)
        if not os.access(there, os.W_OK | os.X_OK):
            name = owner_name(there)
            owner = f", owned by {name}" if name else ""
            raise DataError(f"cannot write into this folder of the prepared cache{owner}: nothing was changed; ask "
                            "its owner to prepare, or give the project a cache of its own (cache_dir: in a roots "
                            "file, docs/datasets.md)", there)


def _prepare_locked(project: Project, workers: int, force: bool, progress: bool) -> PreparedIndex:
    """The body of :func:`prepare_project`, run while this process holds the cache lock."""
    from rich.console import Console

    console = Console(stderr=True)
    cache = project.cache_dir
    index_path = cache / "index.json"
    jobs, entries, splits, sources = _plan(project, force, workers, progress, console)
    if not force:
        _refuse_to_replace_another_projects_cases(project, index_path, jobs)
    if jobs:  # before the index goes: a run that cannot write left a shared cache unprepared for all (helper-109)
        _check_writable({cache, *(Path(job.out_dir) for job in jobs)})
    if jobs and index_path.exists():
        index_path.unlink()  # the index is valid again only once every case is done
    prepared: list[str] = []
    relabelled: list[str] = []
    renewed: list[str] = []
    notes: list[str] = []
    errors: list[tuple[int, str, str, str | None]] = []  # (project order, case, message, file)
    order = {f"{job.dataset}/{job.case_id}": i for i, job in enumerate(jobs)}
    report = cache / PREPARE_ERRORS
    report.unlink(missing_ok=True)  # a list from an earlier run would name cases fixed since
    by_key = {(e["dataset"], e["case_id"]): e for e in entries}

    progress_bar = None
    task = None
    if progress and jobs:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from unionseg.progress import make_progress

        progress_bar = make_progress(TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"), console=console,
                                     transient=True, label="prepare")
        progress_bar.start()
        task = progress_bar.add_task("", total=len(jobs))

    def on_done(job: _CaseJob, result: dict[str, Any]) -> None:
        key = f"{job.dataset}/{job.case_id}"
        if "error" in result:
            errors.append((order[key], key, result["error"][0], result["error"][1]))
        else:
            by_key[(job.dataset, job.case_id)]["record"] = result["meta"]["record"]
            by_key[(job.dataset, job.case_id)]["labelled"] = result["meta"].get("labelled")
            if job.do_image:
                prepared.append(key)
            elif job.do_label or job.do_oracle:
                relabelled.append(key)
            elif job.refresh_only and job.redated:
                renewed.append(key)
            for note in result["warnings"]:
                notes.append(note)
                log.info(note)  # shown once, through the warning (the CLI prints `warning: <note>`)
                warnings.warn(note, IntensityWarning, stacklevel=2)
        if progress_bar is not None and task is not None:
            progress_bar.update(task, advance=1, description=key)

    try:
        _execute(jobs, workers, on_done)
    finally:
        if progress_bar is not None:
            progress_bar.stop()
    if errors:
        errors.sort()  # project order (datasets as listed, cases as scanned), whatever order workers finish in
        _, _, message, path = errors[0]
        more = ""
        if len(errors) > 1:  # every failure at once, so that one run shows all there is to fix
            cache.mkdir(parents=True, exist_ok=True)
            write_text(report, "".join(f"{case}: {f'{file}: ' if file else ''}{text}\n"
                                       for _, case, text, file in errors))
            others = ", ".join(case for _, case, _, _ in errors[1:4]) + (" ..." if len(errors) > 4 else "")
            more = f" ({len(errors) - 1} more case(s) failed: {others}; every failure is listed in {report})"
        raise DataError(message + more, path)
    _warn_empty_datasets(project, entries)
    _warn_orphans(cache, project, entries)
    redone = {k for k in prepared + relabelled}
    skipped = tuple(f"{e['dataset']}/{e['case_id']}" for e in entries if f"{e['dataset']}/{e['case_id']}" not in redone)
    settings = _settings(project)
    # the same wherever the project and its data lie (no absolute path goes into it)
    fingerprint = _hash({"cases": [[e["dataset"], e["case_id"], e["split"], e["fingerprints"]] for e in entries],
                         "settings": _settings_hash(settings)})
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "project": project.name,
             "project_file": project.path.name,
             "settings": settings, "settings_fingerprint": _settings_hash(settings), "splits": splits,
             "fingerprint": fingerprint, "sources": sources, "cases": entries}
    cache.mkdir(parents=True, exist_ok=True)
    write_text(index_path, json.dumps(index, indent=1))
    summary = PrepareSummary(tuple(prepared), tuple(relabelled), skipped, tuple(notes), tuple(renewed))
    if progress:
        console.print(f"{project.name}: {summary.describe()} -> {cache}", soft_wrap=True)  # one line in a log
    log.info("%s: %s", project.name, summary.describe())
    return PreparedIndex(project, index, summary)


def _warn_orphans(cache: Path, project: Project, entries: Sequence[Mapping[str, Any]]) -> None:
    """Say which prepared cases in a dataset's cache folder are no case of the project any more (renamed or
    removed from the dataset): they are never read, and stayed, unnamed, at 150-400 MB each on real CT
    (helper-102). Named, not deleted: the cache is the user's folder."""
    cases = {(e["dataset"], e["case_id"]) for e in entries}
    orphans = [(cache / ds.name, meta.stem) for ds in project.datasets if (cache / ds.name).is_dir()
               for meta in sorted((cache / ds.name).glob("*.json"))
               if not meta.name.startswith(".") and (ds.name, meta.stem) not in cases]
    if orphans:
        files = [f for folder, case in orphans for f in _case_files(folder, case).values() if f.is_file()]
        size = sum(f.stat().st_size for f in files) / 2**20
        shown = ", ".join(f"{folder.name}/{case}" for folder, case in orphans[:4])
        warnings.warn(f"{cache}: {len(orphans)} prepared case(s) are no case of {project.path.name} (renamed or "
                      f"removed: {shown}{' ...' if len(orphans) > 4 else ''}); unless another project file shares "
                      f"this cache, they are never read: delete their files (<case>.json, .image.npy, .label.npy, "
                      f".oracle.npy; {size:.0f} MB) to free the space", UnionsegWarning, stacklevel=3)


# ---------------------------------------------------------------------- CLI
def register(app: typer.Typer) -> None:
    """Add ``unionseg prepare`` (no torch import)."""

    @app.command("prepare")
    def prepare_command(
        project: Annotated[Path, typer.Argument(help="Project file (YAML).")],
        workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes (0 or 1: in-process).")] = 2,
        force: Annotated[bool, typer.Option("--force", help="Redo every case.", metavar="")] = False,
        root: Annotated[Optional[list[str]], typer.Option("--root", help="Dataset root override NAME=DIR (repeatable).", metavar="NAME=DIR")] = None,
        wait: Annotated[float, typer.Option("--wait", min=0.0, metavar="SECONDS", help="Seconds to wait while "
                                            "another prepare holds the same cache (0: refuse at once).")]
        = PREPARE_WAIT_S,
        quiet: Annotated[bool, typer.Option("--quiet", metavar="", help="No progress bar and no 'prepared N case(s)' "
                                            "line on stderr (the result, case counts and data fingerprint, still "
                                            "goes to stdout).")] = False,
    ) -> None:
        """Validate, resample, normalise and cache every case of a project (incremental).

        The cache is prepared/ beside the project file, unless the project or its roots file sets cache_dir."""
        from unionseg.cli import _parse_roots
        from unionseg.config import load_project

        proj = load_project(project, roots=_parse_roots(root))
        index = prepare_project(proj, workers=workers, force=force, progress=not quiet, wait_s=wait)
        typer.echo(f"cases: {case_counts(index)}; data fingerprint {index.fingerprint}")
