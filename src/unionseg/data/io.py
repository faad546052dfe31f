"""Image IO with geometry: NIfTI via nibabel; NRRD, MHA/MHD and DICOM series via SimpleITK.

Arrays are indexed (i, j, k) like NIfTI voxel indices; the :class:`Geometry` record carries the 4 x 4
voxel-to-world affine in RAS+ millimetres (the NIfTI convention). SimpleITK images (LPS) are converted on
reading and back on writing, so a file written with a source's geometry reproduces that geometry exactly.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unionseg.errors import DataError, OutputExistsError, UnionsegWarning
from unionseg.faults import fault_point

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
_LPS = np.diag([-1.0, -1.0, 1.0])
#: the NIfTI header description (``descrip``) of every file ``unionseg predict`` writes: how
#: ``predict --skip-existing`` tells its own finished outputs from other files of the same names (a label
#: map's adds the CRC-32 of its voxels, :func:`prediction_description`)
PREDICTION_DESCRIPTION = "unionseg predict"


def prediction_description(labels: np.ndarray, model: str | None = None) -> str:
    """The description ``predict`` gives a label map: its mark and the CRC-32 of its voxels (C order), so
    that a map edited and re-saved by a viewer, which keeps the description, is told from the original;
    then the model's id (:func:`unionseg.modelfile.model_id`), so that ``--skip-existing`` never takes
    another model's map for a finished case."""
    text = f"{PREDICTION_DESCRIPTION} crc32={labels_crc32(labels)}"
    return f"{text} model={model}" if model else text


def labels_crc32(labels: np.ndarray) -> str:
    """The CRC-32 of a label map's voxels (C order) as predict's mark writes it (8 hex digits)."""
    return f"{zlib.crc32(np.ascontiguousarray(labels).tobytes()):08x}"


def parse_prediction_description(description: str) -> dict[str, str] | None:
    """``{"crc32": ..., "model": ...}`` (``model`` when recorded) of a label map's mark; None for no mark."""
    head = f"{PREDICTION_DESCRIPTION} "
    if not description.startswith(head):
        return None
    fields = dict(part.split("=", 1) for part in description[len(head):].split() if "=" in part)
    return fields if "crc32" in fields else None


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return Path(path).suffix.lower()


def strip_suffix(path: str | Path) -> str:
    """File name without its image suffix (``case_001.nii.gz`` -> ``case_001``)."""
    name = Path(path).name
    suf = suffix_of(name)
    return name[: len(name) - len(suf)] if suf and name.lower().endswith(suf) else name


@dataclass(frozen=True, eq=False)
class NiftiForms:
    """A NIfTI header's two spatial transforms as read: the qform and sform matrices and their codes.

    NIfTI stores two transforms, and viewers differ in which one they trust (nibabel takes the sform when its
    code is set, ITK-based tools such as ITK-SNAP and 3D Slicer may take the qform). A label map written
    with both copied from its image opens exactly on that image in every viewer, even when the image's
    two transforms disagree.
    """

    qform: np.ndarray
    qform_code: int
    sform: np.ndarray
    sform_code: int
    #: with both codes 0, the affine nibabel derives from the voxel sizes alone (x flipped, centred), which
    #: is the image's; ITK-based viewers place such a file by their own rule, so a label map written with
    #: codes 0 too lands where they place the image
    base: np.ndarray | None = None

    @classmethod
    def of(cls, header: Any) -> NiftiForms | None:
        """The header's transforms; None when they cannot be read back whole (a damaged quaternion, say):
        the image's affine, which nibabel derives on its own terms, is then the only geometry written."""
        try:
            qcode, scode = int(header["qform_code"]), int(header["sform_code"])
            forms = cls(np.asarray(header.get_qform(), dtype=np.float64), qcode,
                        np.asarray(header.get_sform(), dtype=np.float64), scode,
                        np.asarray(header.get_base_affine(), dtype=np.float64) if qcode == scode == 0 else None)
        except Exception:  # nibabel raises several types for damaged headers
            return None
        finite = [m for m in (forms.qform, forms.sform, forms.base) if m is not None]
        return forms if all(np.isfinite(m).all() for m in finite) else None

    def describes(self, affine: np.ndarray, atol: float = 1e-4) -> bool:
        """Whether these are the transforms that give ``affine`` (sform if coded, else a coded qform, else
        the voxel sizes' base affine)."""
        chosen = self.sform if self.sform_code > 0 else self.qform if self.qform_code > 0 else self.base
        return chosen is not None and bool(np.allclose(chosen, affine, atol=atol))


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where an array lives in the world: shape and the voxel -> RAS+ mm affine.

    ``nifti_forms``: the header transforms of the NIfTI file it was read from (None otherwise); writing a
    NIfTI with this geometry copies them when they still give ``affine``.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    nifti_forms: NiftiForms | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64).reshape(4, 4))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along the array's three axes, in mm (the lengths of the affine's columns)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """World (RAS, mm) position of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3 x 3 matrix whose columns are the unit axis directions (RAS)."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    def skew_degrees(self) -> float:
        """How far the voxel axes are from perpendicular: the largest of ``|90 - angle|`` over the pairs of
        axes, in degrees (0 for every grid ITK can store; a tilted-gantry scan kept tilted in its affine)."""
        axes = self.direction
        cosines = [abs(float(axes[:, a] @ axes[:, b])) for a, b in ((0, 1), (0, 2), (1, 2))]
        return float(np.degrees(np.arcsin(min(1.0, max(cosines)))))

    def orientation(self) -> str:
        """Axis codes such as ``RAS`` or ``LPS``."""
        import nibabel as nib

        return "".join(nib.orientations.aff2axcodes(self.affine))

    def same_grid(self, other: Geometry, atol: float = 1e-4) -> bool:
        """Whether ``other`` has the same shape and, within ``atol`` (mm), the same affine."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def with_shape(self, shape: tuple[int, ...]) -> Geometry:
        """The same affine (and NIfTI forms) for an array of ``shape`` (its first three sizes)."""
        return Geometry(tuple(shape)[:3], self.affine, self.nifti_forms)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """``{"shape": [...], "affine": 4 x 4 nested lists}`` (JSON; :meth:`from_dict` reads it back)."""
        return {"shape": list(self.shape), "affine": self.affine.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(tuple(data["shape"]), np.asarray(data["affine"], dtype=np.float64))  # type: ignore[arg-type]

    @classmethod
    def identity(cls, shape: tuple[int, ...], spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Geometry:
        """An axis-aligned RAS grid of ``shape`` with voxel size ``spacing`` (mm) and its origin at 0."""
        aff = np.diag([*map(float, spacing), 1.0])
        return cls(tuple(shape)[:3], aff)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"Geometry(shape={self.shape}, spacing=({sp}), orientation={self.orientation()})"


# ---------------------------------------------------------------------- reading
def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError("file not found", path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError("empty file (0 bytes)", path)


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:  # (X, Y, Z, 1) or NIfTI's (X, Y, Z, 1, 1): one volume
        array = array[..., 0]
    if array.ndim == 2:
        raise DataError(f"2D image of shape {array.shape}; a 3D volume is required", path)
    if array.ndim != 3:
        raise DataError(f"{array.ndim}D image of shape {array.shape}; a 3D volume is required "
                        "(multi-channel and time series are not supported)", path)
    if array.size == 0:
        raise DataError(f"image of shape {array.shape} holds no voxels", path)
    return array


def _gzip_problem(path: Path) -> str | None:
    """Why a ``.gz`` file cannot hold a NIfTI image (not gzip, truncated, shorter than a header), or None."""
    if not path.name.lower().endswith(".gz"):
        return None
    with path.open("rb") as fh:
        head = fh.read(348)
        if head[:2] != b"\x1f\x8b":
            if head[344:348] in (b"n+1\0", b"ni1\0") or head[4:12] == b"n+2\0\r\n\x1a\n":
                return f"an uncompressed NIfTI file named .gz; rename it {path.name[:-3]}"
            return "not a gzip-compressed file, although its name ends in .gz (is it an image at all?)"
    size = 0
    try:  # only called once reading failed, so decompressing the whole stream costs nothing in normal use
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                size += len(chunk)
    except (EOFError, zlib.error, OSError) as exc:
        return f"truncated or corrupt compressed file ({exc})"
    if size < 348:
        return f"truncated or corrupt compressed file (only {size} bytes, shorter than a NIfTI header)"
    return None


#: NIfTI spatial units (``xyzt_units``) other than mm, and the factor that takes them to mm
_UNIT_TO_MM = {"meter": 1000.0, "micron": 0.001}


def nifti_affine_mm(img: Any, path: Path) -> np.ndarray:
    """A nibabel image's affine in millimetres: a header that states metres or microns (rare, but valid
    NIfTI) is scaled, with a :class:`~unionseg.errors.UnionsegWarning`; "unknown" is taken as mm, as every
    CT tool does."""
    affine = np.asarray(img.affine, dtype=np.float64)
    try:
        unit = img.header.get_xyzt_units()[0]
    except Exception:  # an undecodable units byte: mm, as nibabel's affine already assumes
        return affine
    factor = _UNIT_TO_MM.get(unit)
    if factor is None:
        return affine
    warnings.warn(f"{path}: header states spatial units of {unit}s; read as {factor:g} mm per {unit} "
                  "(outputs are written in mm)", UnionsegWarning, stacklevel=3)
    scaled = affine.copy()
    scaled[:3, :] *= factor
    return scaled


def _load_nifti(path: Path) -> tuple[Any, np.ndarray]:
    """The nibabel image and its voxels. A ``.gz`` file is read in one pass through to its end, so that
    gzip checks its CRC and length (reading only the bytes the header asks for, as ``nib.load`` does,
    never reaches the trailer: a flipped bit in the compressed voxels would pass unseen)."""
    import nibabel as nib

    if not path.name.lower().endswith(".gz"):
        img: Any = nib.load(str(path))
        return img, _voxels(img)
    with gzip.open(path, "rb") as fh:
        head = fh.read(348)
        fh.seek(0)
        if head[344:348] in (b"n+1\0", b"ni1\0"):
            cls: Any = nib.Nifti1Image
        elif head[4:12] == b"n+2\0\r\n\x1a\n":
            cls = nib.Nifti2Image
        else:  # the message nib.load gives a file it cannot place
            raise nib.filebasedimages.ImageFileError(f"Cannot work out file type of {path}")
        img = cls.from_stream(fh)
        array = _voxels(img)
        try:
            while fh.read(1 << 20):  # the rest of the stream (usually nothing) and the CRC check at its end
                pass
        except gzip.BadGzipFile as exc:
            # bytes after a complete member (its CRC already checked) that are not another member: ignored,
            # as gzip -t and nib.load do
            if not str(exc).startswith("Not a gzipped file"):
                raise
    return img, array


def _voxels(img: Any) -> np.ndarray:
    """A nibabel image's voxels; integers stored with a scale (``scl_slope``/``scl_inter``, common for CT) are
    scaled in float32, where nibabel gives float64: twice the memory of a volume for digits a CT value
    never has."""
    proxy = img.dataobj
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if (slope, inter) == (1.0, 0.0) or not hasattr(proxy, "get_unscaled"):
        return np.asanyarray(proxy)
    raw = np.asarray(proxy.get_unscaled())
    if raw.dtype.kind not in "iu" or raw.dtype.itemsize > 2:  # 32-bit integers may need float64's digits
        return np.asanyarray(proxy)
    out = raw.astype(np.float32)
    out *= np.float32(slope)
    out += np.float32(inter)
    return out


def _raw_voxel_sizes(path: Path) -> tuple[np.ndarray, int] | None:
    """A NIfTI-1 file's spatial ``pixdim`` entries and its sform code as stored, read from the raw header
    before nibabel repairs them (it takes the absolute value of a negative size, 1 for a zero one); None for
    a file that cannot be read this way (NIfTI-2, damaged: nibabel's own checks apply)."""
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")) as fh:
            head = fh.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) < 348:
        return None
    for order in ("<", ">"):
        if np.frombuffer(head, dtype=f"{order}i4", count=1)[0] == 348:
            break
    else:
        return None
    rank = int(np.frombuffer(head, dtype=f"{order}i2", count=1, offset=40)[0])
    pixdim = np.frombuffer(head, dtype=f"{order}f4", count=8, offset=76)
    sform_code = int(np.frombuffer(head, dtype=f"{order}i2", count=1, offset=254)[0])
    return pixdim[1:1 + min(max(rank, 0), 3)].astype(np.float64), sform_code


def _check_voxel_size(path: Path) -> bool:
    """Refuse a NIfTI-1 header whose voxel size (``pixdim``) is 0 on a spatial axis while no sform places the
    image: nibabel would take 1 mm (printing a note) and the prediction would land on a made-up grid.

    Returns:
        Whether a spatial voxel size is negative (see :func:`warn_about_placement`): the caller then reads
        the file without nibabel's unattributed note about it.
    """
    found = _raw_voxel_sizes(path)
    if found is None:
        return False
    spatial, sform_code = found
    if sform_code == 0 and spatial.size and np.any(spatial == 0):
        shown = ", ".join(f"{v:g}" for v in spatial)
        raise DataError(f"the header gives a voxel size of 0 (pixdim {shown}) and no sform: where the voxels lie "
                        "is unknown (nibabel would assume 1 mm); fix the header's voxel size", path)
    return bool(np.any(spatial < 0))


@contextlib.contextmanager
def _quiet_nibabel(quiet: bool = True) -> Iterator[None]:
    """nibabel's header notes (logged at WARNING and printed to stderr without the file's name) held back
    while ``quiet``: its logger's level is raised for the block and put back after. (nibabel's own
    ``LoggingOutputSuppressor`` restores its handlers from the list it emptied, which leaves the logger
    without one, so Python's last-resort handler prints the note anyway, and every later one too.)"""
    if not quiet:
        yield
        return
    import nibabel as nib

    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    import nibabel as nib

    negative = _check_voxel_size(path)
    try:
        with _quiet_nibabel(negative):
            img, array = _load_nifti(path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        if str(exc).startswith("Not a gzipped file"):
            raise DataError(_gzip_problem(path) or f"not a gzip-compressed file ({exc})", path) from None
        raise DataError(f"truncated or corrupt compressed file ({exc})", path) from None
    except nib.filebasedimages.ImageFileError as exc:
        problem = _gzip_problem(path)
        if problem is not None:
            raise DataError(problem, path) from None
        if "Cannot work out file type" in str(exc):
            raise DataError("not a NIfTI image (no valid NIfTI-1/NIfTI-2 header)", path) from None
        raise DataError(f"not a readable NIfTI image ({exc})", path) from None
    except (OSError, ValueError) as exc:
        raise DataError(_gzip_problem(path) or f"cannot read image ({exc})", path) from None
    except MemoryError:
        raise DataError("not enough memory to read the image (does its header state the right size?)", path) from None
    except Exception as exc:  # a damaged header makes nibabel raise more types (HeaderDataError, struct.error, ...)
        raise DataError(f"not a readable NIfTI image ({type(exc).__name__}: {exc})", path) from None
    array = _as_3d(np.asarray(array), path)
    return array, Geometry(array.shape, nifti_affine_mm(img, path), NiftiForms.of(img.header))


def warn_about_placement(path: Path, geometry: Geometry, stacklevel: int = 2) -> None:
    """Warn when a NIfTI input does not say unambiguously where its voxels lie in the patient (``predict``
    calls it on its inputs: the output is only as well placed as the input):

    - its qform and sform codes are both 0: it is read with nibabel's fallback orientation;
    - a voxel size (``pixdim``) is negative, which NIfTI does not allow: nibabel takes its absolute value,
      ITK-based viewers may mirror the axis instead, so they can show the label map (written with positive
      sizes) mirrored on the image. Left and right are at stake, so it is said; nibabel's own note named
      no file.
    """
    forms = geometry.nifti_forms
    if forms is not None and forms.qform_code == 0 and forms.sform_code == 0:
        warnings.warn(f"{path}: neither its qform nor its sform is set (both codes 0), so the file does not say "
                      "how its axes lie in the patient; it is read with nibabel's fallback (voxel sizes only, axes "
                      "taken as LAS, centred on the volume), which viewers may not share: check the orientation",
                      UnionsegWarning, stacklevel=stacklevel)
    found = _raw_voxel_sizes(path) if suffix_of(path) in NIFTI_SUFFIXES and path.is_file() else None
    if found is not None and np.any(found[0] < 0):
        shown = ", ".join(f"{v:g}" for v in found[0])
        warnings.warn(f"{path}: its header gives a negative voxel size (pixdim {shown}), which NIfTI does not "
                      "allow, and readers disagree on such a file: nibabel, and so unionseg, takes the absolute "
                      "value, while ITK-based viewers (3D Slicer, ITK-SNAP) may mirror that axis, so there the "
                      "label map (written with positive sizes) can show mirrored on the image; fix the header "
                      "(positive voxel sizes, the orientation in the qform/sform) and check the patient's side",
                      UnionsegWarning, stacklevel=stacklevel)


def _sitk_to_geometry(img: Any, shape: tuple[int, ...]) -> Geometry:
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = _LPS @ direction @ np.diag(spacing)
    aff[:3, 3] = _LPS @ origin
    return Geometry(shape, aff)  # type: ignore[arg-type]


def _read_sitk(path: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise DataError("folder holds no DICOM series", path)
            if len(series) > 1:
                raise DataError(f"folder holds {len(series)} DICOM series; give one series per folder", path)
            names = reader.GetGDCMSeriesFileNames(str(path), series[0])
            _check_slice_positions(names, path)
            reader.SetFileNames(names)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise DataError(f"cannot read image ({first})", path) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError("multi-component (vector/RGB) image; a scalar 3D volume is required", path)
    while img.GetDimension() > 3 and img.GetSize()[-1] == 1:  # (X, Y, Z, 1): one volume, as for NIfTI
        img = img[(slice(None),) * (img.GetDimension() - 1) + (0,)]
    if img.GetDimension() != 3:
        raise DataError(f"{img.GetDimension()}D image of size {img.GetSize()}; a 3D volume is required", path)
    array = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    array = _as_3d(array, path)
    return array, _sitk_to_geometry(img, array.shape)


def _check_slice_positions(names: Any, folder: Path) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along their normal (a slice missing from
    the export, two acquisitions in one folder), or whose slices shift within their plane from one to the
    next (a tilted gantry): the series reader would spread them evenly, or stack them straight, and voxels
    would sit at the wrong place in the patient, without an error."""
    import SimpleITK as sitk

    if len(names) < 3:
        return
    points: list[np.ndarray] = []
    normal, pixel = None, 0.5
    for name in names:
        header = sitk.ImageFileReader()
        header.SetFileName(str(name))
        header.ReadImageInformation()
        keys = set(header.GetMetaDataKeys())
        if "0020|0032" not in keys or "0020|0037" not in keys:
            return  # no positions to check (the reader places such slices by their order alone)
        try:
            points.append(np.array([float(v) for v in header.GetMetaData("0020|0032").split("\\")]))
            if normal is None:
                cosines = np.array([float(v) for v in header.GetMetaData("0020|0037").split("\\")])
                normal = np.cross(cosines[:3], cosines[3:6])
        except ValueError:
            return
        if "0028|0030" in keys and name == names[0]:  # apart: a garbled pixel spacing keeps both checks on
            try:
                sizes = [float(v) for v in header.GetMetaData("0028|0030").split("\\")]
                pixel = min(sizes) if sizes and min(sizes) > 0 else pixel
            except ValueError:
                pass
    if normal is None or any(p.shape != (3,) for p in points):
        return
    positions = [float(p @ normal) for p in points]
    order = np.argsort(positions)
    span = points[order[-1]] - points[order[0]]
    drift = float(np.linalg.norm(span - (span @ normal) * normal))
    if drift > max(0.5 * pixel, 1e-3):  # half a pixel over the whole series: rounded positions stay within it
        angle = float(np.degrees(np.arctan2(drift, abs(span @ normal))))
        raise DataError(f"DICOM slices shift {drift:.3g} mm within their plane over the series ({angle:.3g} degrees "
                        "from the slice normal: a tilted gantry?); read as a stack they would sit up to that far "
                        "from their place in the patient. Convert the series with a tool that corrects gantry "
                        "tilt (dcm2niix does) and give the NIfTI", folder)
    steps = np.diff(np.sort(positions))
    step = float(np.median(steps))
    # a fifth of a step: positions stored rounded to 0.1 mm stay within it, a missing slice (twice the step) not
    bad = np.flatnonzero(np.abs(steps - step) > 1e-3 + 0.2 * abs(step))
    if step <= 1e-3 or bad.size:
        where = f"slices {bad[0] + 1} and {bad[0] + 2} (of {len(names)}) lie {steps[bad[0]]:.3g} mm apart" \
            if bad.size else f"{len(names)} slices share {len(set(np.round(positions, 3)))} positions"
        raise DataError(f"DICOM slices are not evenly spaced: {where}, where the series steps {step:.3g} mm "
                        "(a slice missing, or two acquisitions in one folder?); give one complete series per "
                        "folder", folder)


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM file: named ``.dcm``, or under any other name that is not an image format's a Part 10 file,
    with the ``DICM`` mark after the 128-byte preamble (scanners and PACS exports write ``IM0001``,
    ``1.2.840.113619.2.55.3.1000`` after the SOP instance UID, or Siemens' ``.IMA``). A folder is none."""
    suf = suffix_of(path)
    return suf == ".dcm" or (suf not in IMAGE_SUFFIXES and _has_dicom_mark(Path(path)))


def holds_dicom_files(folder: str | Path) -> bool:
    """Whether a folder holds DICOM files (:func:`is_dicom_file`): a series to read as one image."""
    return any(is_dicom_file(p) for p in Path(folder).iterdir() if p.is_file())


def _has_dicom_mark(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image (NIfTI, NRRD, MHA/MHD, or a DICOM series folder).

    Returns:
        ``(array, geometry)``: the array in the file's own dtype, indexed (i, j, k).

    Raises:
        DataError: missing, empty, truncated, not an image, not 3D, not scalar (RGB, complex), or non-finite
            geometry. A damaged file never raises another exception type (tests/test_properties.py).
    """
    path = Path(path)
    _check_readable(path)
    suf = suffix_of(path)
    dicom_file = is_dicom_file(path)
    if path.is_dir() or suf in SITK_SUFFIXES or dicom_file:
        array, geom = _read_sitk(path.parent if dicom_file else path)  # a DICOM file reads its whole series
    elif suf in NIFTI_SUFFIXES:
        array, geom = _read_nifti(path)
    else:
        raise DataError(f"unsupported file type {suf!r} (use {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)", path)
    if array.dtype.kind not in "biuf":  # RGB records, complex numbers: not a CT intensity or a label
        raise DataError(f"unsupported voxel type {array.dtype}; a scalar (integer or float) 3D volume is required",
                        path)
    if not np.all(np.isfinite(geom.affine)) or abs(np.linalg.det(geom.affine[:3, :3])) < 1e-12:
        raise DataError("invalid geometry (non-finite or singular affine)", path)
    return array, geom


def read_header(path: str | Path) -> Geometry:
    """Geometry only, without reading voxel data where the format allows (NIfTI)."""
    path = Path(path)
    _check_readable(path)
    if suffix_of(path) in NIFTI_SUFFIXES:
        import nibabel as nib

        negative = _check_voxel_size(path)
        try:
            with _quiet_nibabel(negative):
                img: Any = nib.load(str(path))
        except Exception as exc:  # nibabel raises several types for bad headers
            raise DataError(f"not a readable NIfTI image ({exc})", path) from None
        shape = tuple(img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise DataError(f"{len(shape)}D image of shape {tuple(shape)}; a 3D volume is required", path)
        return Geometry(tuple(shape), nifti_affine_mm(img, path), NiftiForms.of(img.header))
    return read_image(path)[1]


# ---------------------------------------------------------------------- writing
def _storable(array: np.ndarray) -> np.ndarray:
    """The array in a dtype both NIfTI and SimpleITK can store (bool -> uint8, float16 -> float32)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def set_nifti_transforms(nifti: Any, geometry: Geometry) -> None:
    """Give a nibabel image the qform and sform of ``geometry``'s source file when they still describe its
    affine (matrices and codes as read; both codes 0 when the source had none and the image's voxel sizes
    and shape give the same base affine), else ``geometry.affine`` in both, with the source's codes where it
    set them (a header in metres, read in mm, keeps its aligned sform's code 2) and else code 1 (scanner)."""
    forms = geometry.nifti_forms
    if forms is not None and forms.describes(geometry.affine):
        nifti.set_qform(forms.qform, code=forms.qform_code)
        nifti.set_sform(forms.sform, code=forms.sform_code)
        if forms.base is None or np.allclose(nifti.header.get_base_affine(), geometry.affine, atol=1e-4):
            return
    nifti.set_qform(geometry.affine, code=forms.qform_code if forms is not None and forms.qform_code > 0 else 1)
    nifti.set_sform(geometry.affine, code=forms.sform_code if forms is not None and forms.sform_code > 0 else 1)


def nifti_description(path: str | Path) -> str | None:
    """The ``descrip`` field of a NIfTI file's header (read without its voxels), or None when the file is
    missing, not NIfTI or unreadable."""
    header = _nifti_header(path)
    return None if header is None else _description_of(header)


def _description_of(header: Any) -> str | None:
    """A NIfTI header's ``descrip`` field as text; None for a damaged header."""
    try:
        return bytes(header["descrip"]).split(b"\0", 1)[0].decode("ascii", "replace").strip()
    except Exception:  # a damaged header: not a file predict wrote
        return None


def _nifti_header(path: str | Path) -> Any:
    """A NIfTI file's header, read without its voxels; None when the file is missing, not NIfTI or its header
    cannot be read."""
    import nibabel as nib

    path = Path(path)
    if suffix_of(path) not in NIFTI_SUFFIXES or not path.is_file():
        return None
    try:
        with _quiet_nibabel():  # a glance at the header: the image's own read says what is wrong with it
            return nib.load(str(path)).header
    except Exception:  # a damaged header: nibabel raises several types
        return None


#: a NIfTI header extension of code 6 (a comment, ignored by viewers) whose text is this key's JSON: what each
#: value of a label map ``predict`` wrote means ({"0": "background", "1": "liver", ...}), so that a project
#: that reads the values otherwise (its classes in another order) is refused rather than scored wrong
LABEL_NAMES_KEY = "unionseg_label_values"


def label_names_extension(names: Sequence[str]) -> Any:
    """The NIfTI extension that records a label map's value names (``names[v]`` is value v's class)."""
    import nibabel as nib

    text = json.dumps({LABEL_NAMES_KEY: {str(v): name for v, name in enumerate(names)}}, separators=(",", ":"))
    return nib.nifti1.Nifti1Extension(6, text.encode("utf-8"))


def nifti_label_names(path: str | Path) -> list[str] | None:
    """The value names ``predict`` recorded in a NIfTI label map's header (read without its voxels); None
    when the file holds none (another tool's, an older release's), is not NIfTI or cannot be read."""
    header = _nifti_header(path)
    if header is None:
        return None
    try:
        for ext in header.extensions:
            if ext.get_code() != 6:
                continue
            content = ext.get_content()
            if isinstance(content, bytes) and LABEL_NAMES_KEY.encode() in content:
                values = json.loads(content.decode("utf-8"))[LABEL_NAMES_KEY]
                return [str(values[str(v)]) for v in range(len(values))]
    except Exception:  # a damaged header or extension: as if it held none
        return None
    return None


def place_file(tmp: Path, path: Path, replace: bool = True) -> None:
    """Move a finished temporary file to its name. ``replace=False`` never replaces a file there: the move is
    a hard link, which fails atomically where the name exists (two processes writing one folder cannot
    both succeed), then the temporary's removal; where links are not supported, a check then a rename.

    Raises:
        OutputExistsError: ``replace=False`` and ``path`` exists.
    """
    if replace:
        tmp.replace(path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError("already exists; nothing was written over it", path) from None
    except OSError:  # a file system without hard links (FAT, some network mounts)
        if path.exists() or path.is_symlink():
            raise OutputExistsError("already exists; nothing was written over it", path) from None
        tmp.replace(path)
        return
    tmp.unlink()


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry, description: str | None = None,
                replace: bool = False, label_names: Sequence[str] | None = None) -> Path:
    """Write ``array`` with ``geometry`` atomically (temp name in the same folder, then rename), never over
    an existing file unless ``replace=True`` (:func:`place_file`; the default replaced any file, a ground
    truth too, where ``predict_file`` refuses one).

    The format follows the suffix (.nii.gz/.nii via nibabel; .nrrd/.mha via SimpleITK). The dtype is kept,
    except that bool is stored as uint8 and float16 as float32 (neither format stores them). NIfTI keeps
    the affine in float32 (about 1e-7 relative); NRRD/MHA keep it in float64. ``description`` goes into a
    NIfTI header's ``descrip`` field (80 characters at most); ``label_names`` (the class of each value) into
    a header extension, :func:`nifti_label_names`.

    Raises:
        DataError: when the array's shape does not match the geometry.
        OutputExistsError: ``replace=False`` and the file exists.
    """
    path = Path(path)
    if tuple(array.shape) != tuple(geometry.shape):
        raise DataError(f"array shape {tuple(array.shape)} differs from geometry shape {geometry.shape}", path)
    if not replace and (path.exists() or path.is_symlink()):  # refused before the work; place_file keeps a race out
        raise OutputExistsError("already exists; nothing was written over it (replace=True writes over it)", path)
    array = _storable(np.asarray(array))
    path.parent.mkdir(parents=True, exist_ok=True)
    suf = suffix_of(path)
    if suf in _DETACHED_SUFFIXES:
        return _write_detached(path, array, geometry, replace)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suf}")
    try:
        if suf in NIFTI_SUFFIXES:
            import nibabel as nib

            # an explicit dtype keeps int64 (nibabel refuses it otherwise); the header stores mm
            nifti = nib.Nifti1Image(array, geometry.affine, dtype=array.dtype)
            set_nifti_transforms(nifti, geometry)
            nifti.header.set_xyzt_units("mm")
            if description is not None:
                nifti.header["descrip"] = description.encode("ascii", "replace")[:79]
            if label_names is not None:
                nifti.header.extensions.append(label_names_extension(label_names))
            nib.save(nifti, str(tmp))
        elif suf in SITK_SUFFIXES:
            _write_sitk(tmp, array, geometry)
        else:
            raise DataError(f"unsupported output type {suf!r}", path)
        fsync_file(tmp)
        fault_point("write_image_before_rename")  # fault tests only (UNIONSEG_FAULT_POINT)
        place_file(tmp, path, replace)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk before it is renamed into place, so that after a power cut a file
    under its final name is whole (the rename alone orders nothing on most file systems)."""
    fd = os.open(path, os.O_RDWR)  # Windows flushes only a handle opened for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_sitk(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing(np.asarray(geometry.spacing).tolist())
    image.SetDirection((_LPS @ geometry.direction).reshape(-1).tolist())
    image.SetOrigin((_LPS @ geometry.affine[:3, 3]).tolist())
    sitk.WriteImage(image, str(path), True)


#: formats whose header names a separate voxel file (``.mhd`` + ``.zraw``, ``.nhdr`` + ``.raw.gz``)
_DETACHED_SUFFIXES = (".mhd", ".nhdr")


def _write_detached(path: Path, array: np.ndarray, geometry: Geometry, replace: bool = True) -> Path:
    """Write a two-file image (header + voxels) atomically enough: both are written under their final names
    in a hidden folder beside ``path``, then the voxel file is moved into place before the header, so a
    header is never there without its voxels. (Written under temporary names, the header named the
    temporary voxel file.)"""
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_sitk(staging / path.name, array, geometry)
        parts = sorted(staging.iterdir(), key=lambda p: p.name == path.name)  # the header last
        for part in parts:
            fsync_file(part)
            if not replace and ((path.parent / part.name).exists() or (path.parent / part.name).is_symlink()):
                raise OutputExistsError("already exists; nothing was written over it", path.parent / part.name)
        for part in parts:
            place_file(part, path.parent / part.name, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# ---------------------------------------------------------------------- orientation
def reorient_to_ras(array: np.ndarray, geometry: Geometry, contiguous: bool = True) -> tuple[np.ndarray, Geometry]:
    """Permute/flip axes so that the array is closest to RAS+; exact (no interpolation). ``contiguous=False``
    returns a view where it can (no copy of the whole volume, for a caller that only reads from it)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(geometry.affine)
    target = nib.orientations.axcodes2ornt("RAS")
    transform = nib.orientations.ornt_transform(ornt, target)
    out = nib.orientations.apply_orientation(array, transform)
    aff = geometry.affine @ nib.orientations.inv_ornt_aff(transform, geometry.shape)
    return (np.ascontiguousarray(out) if contiguous else out), Geometry(out.shape, aff)


def reorient_like(array: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray:
    """Put an array on ``geometry``'s axes back onto ``target``'s, when the two grids differ by a permutation
    and flips of their axes (the inverse of :func:`reorient_to_ras`, say); exact (no interpolation).

    The axis map is read from the two affines together (``inv(A_geometry) @ A_target`` is then a signed
    permutation), not from each one's nearest orientation: for a direction at exactly 45 degrees to two world
    axes the nearest orientation is a tie, and two affines broken apart by different rounding would
    disagree about it (a prediction came back transposed). Grids that are no permutation of each other
    get the nearest-orientation map.
    """
    return np.ascontiguousarray(reorient_view(array, geometry, target))


def reorient_view(array: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray:
    """:func:`reorient_like` without the copy: a view of ``array`` (flipped and transposed strides), for
    arrays too large to copy (a probability map of a full-size scan). Extra trailing axes (channels) follow."""
    import nibabel as nib

    transform = _axis_transform(geometry.affine, target.affine)
    return nib.orientations.apply_orientation(array, transform)  # type: ignore[no-any-return]


def reoriented_geometry(geometry: Geometry, target: Geometry) -> Geometry:
    """The geometry of ``geometry``'s voxels once :func:`reorient_like` has put them on ``target``'s axes:
    the same world grid, stored in ``target``'s axis order and directions (itself when they already agree)."""
    import nibabel as nib

    transform = _axis_transform(geometry.affine, target.affine)
    shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(transform):  # input axis -> (output axis, flip)
        shape[int(new_axis)] = int(geometry.shape[axis])
    return Geometry((shape[0], shape[1], shape[2]), geometry.affine @ nib.orientations.inv_ornt_aff(transform, geometry.shape))


def _axis_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform from ``source``'s voxel axes to ``target``'s (see
    :func:`reorient_like`)."""
    import nibabel as nib

    transform = _permutation_ornt(source, target)
    if transform is None:
        transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(source),
                                                    nib.orientations.io_orientation(target))
    return transform


def _permutation_ornt(source: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """The nibabel orientation transform (row i: the target axis of source axis i, and its flip) between
    two affines whose voxel axes are a permutation and flips of each other; None when they are not."""
    try:
        rel = np.linalg.solve(source[:3, :3], target[:3, :3])  # column j: target axis j in source voxel units
    except np.linalg.LinAlgError:
        return None
    mags = np.abs(rel)
    rows = mags.argmax(axis=0)  # the source axis of each target axis
    if len(set(rows.tolist())) != 3:
        return None
    for j, i in enumerate(rows):  # one dominant entry per column, near unit length
        others = np.delete(mags[:, j], i)
        if not (abs(mags[i, j] - 1.0) < 1e-3 and others.max() < 1e-3):
            return None
    ornt = np.zeros((3, 2))
    for j, i in enumerate(rows):
        ornt[i] = (j, 1.0 if rel[i, j] > 0 else -1.0)
    return ornt


#: two grids whose affines agree entry by entry (within ``atol``) may still drift apart along a long axis (a
#: spacing of 0.7009 against 0.7 mm puts voxel 511 0.46 mm, two thirds of a voxel, away): they pass as one
#: grid only when they place every voxel within this many voxels of each other (helper-107)
MAX_GRID_DRIFT_VOXELS = 0.1


def grid_drift(affine: np.ndarray, target: Geometry) -> tuple[float, float]:
    """How far ``affine`` places the voxels of ``target``'s index grid from where ``target`` places them:
    the largest shift over the grid's corners (an affine map's is largest at one of them), in mm and in
    ``target``'s voxels along an axis (on an anisotropic grid a shift along z is fewer voxels)."""
    corners = np.array([[i, j, k, 1.0] for i in (0, target.shape[0] - 1) for j in (0, target.shape[1] - 1)
                        for k in (0, target.shape[2] - 1)]).T
    shift = float(np.linalg.norm(((affine - target.affine) @ corners)[:3], axis=0).max())
    voxels = float(np.abs((np.linalg.inv(target.affine) @ affine @ corners - corners)[:3]).max())
    return shift, voxels


def align_label_to_image(
    label: np.ndarray, label_geom: Geometry, image_geom: Geometry, label_path: Path, image_path: Path,
    atol: float = 1e-3,
) -> np.ndarray:
    """Return the label on the image's voxel grid, or raise.

    Identical grids pass unchanged. A label stored in another axis order/orientation is reoriented onto
    the image grid when the two physical grids coincide; anything else is refused, naming both files.
    Grids coincide when their affines agree within ``atol`` entry by entry and place no voxel more than
    :data:`MAX_GRID_DRIFT_VOXELS` apart.
    """
    if label_geom.same_grid(image_geom, atol=atol) and grid_drift(label_geom.affine, image_geom)[1] <= MAX_GRID_DRIFT_VOXELS:
        return label
    moved = reorient_like(label, label_geom, image_geom)
    on_image = reoriented_geometry(label_geom, image_geom).affine
    if moved.shape == tuple(image_geom.shape) and np.allclose(on_image, image_geom.affine, atol=atol) \
            and grid_drift(on_image, image_geom)[1] <= MAX_GRID_DRIFT_VOXELS:
        return moved
    if tuple(label_geom.shape) != tuple(image_geom.shape) and sorted(label_geom.shape) != sorted(image_geom.shape):
        raise DataError(f"label shape {label_geom.shape} differs from image shape {image_geom.shape} (the "
                        f"image: {image_path}); a label map is drawn on its image's voxel grid: was it cropped or "
                        "resampled, or paired with another case's image?", label_path)
    # how far apart the two grids put the same voxel, in mm and in voxels, against the tolerances
    shift, voxels = grid_drift(on_image if moved.shape == tuple(image_geom.shape) else label_geom.affine, image_geom)
    mm = f"{shift:.3f}" if shift < 1 else f"{shift:.1f}"
    count = f"{voxels:.2g}" if voxels < 10 else f"{voxels:.0f}"
    raise DataError(
        f"label grid does not match image {image_path.name}: the two grids place a voxel up to {mm} mm "
        f"({count} voxels along an axis) apart (tolerance {atol:g} on the affines' entries and "
        f"{MAX_GRID_DRIFT_VOXELS:g} voxel at the grid's corners): label affine\n"
        f"{np.round(label_geom.affine, 4)}\nvs image affine\n{np.round(image_geom.affine, 4)}".replace("\n", " ")
        + "; if the label was drawn on this image, give it the image's header (SimpleITK's CopyInformation, or "
        "nibabel with the image's affine)", label_path)


#: what each of predict's output kinds is, in words
KIND_WORDS = {"labels": "label map", "probabilities": "probability map", "channels": "probability map's channel list"}


def predict_kind(path: Path) -> str | None:
    """Which of predict's outputs ``path`` is by its mark: ``labels`` (a label map: the mark with its CRC-32, or
    the bare mark of an older release on a 3D grid), ``probabilities`` (the bare mark on a 4D grid),
    ``channels`` (a probability map's ``.json`` channel list), or None (no mark: not a file predict wrote)."""
    if path.name.endswith(".json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return "channels" if record.get("written_by") == PREDICTION_DESCRIPTION else None
        except (OSError, ValueError, AttributeError):
            return None
    header = _nifti_header(path)  # read once: the description and the shape are both in it
    description = (_description_of(header) or "") if header is not None else ""
    if parse_prediction_description(description) is not None:
        return "labels"
    if description != PREDICTION_DESCRIPTION:
        return None
    try:
        dims = len(header.get_data_shape())
    except Exception:  # noqa: BLE001 - a shape the header cannot give: not ours
        return None
    return "probabilities" if dims == 4 else "labels"
