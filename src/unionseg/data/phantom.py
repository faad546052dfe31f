"""Synthetic abdominal CT: partially labelled training sets, fully labelled val/test sets, a project file.

``unionseg phantom OUT --size tiny|standard|large --seed N`` writes (DESIGN section 6)::

    OUT/project.yaml                  ready project file (relative paths, loadable by config.load_project)
    OUT/generator.json                version, seed, size, suite, per-site protocol, per-case facts
    OUT/datasets/<set>/dataset.json   MSD layout; imagesTr/ (int16 HU), labelsTr/ (LOCAL values),
                                      fullTr/ (hidden full truth in GLOBAL leaf ids, same file names)
    OUT/datasets/val/, OUT/datasets/test/   fully labelled, labels in global leaf ids

**Anatomy.** Every case is drawn in an anatomical frame (mm; +x patient right, +y anterior, +z superior,
origin at the centre of the abdominal cavity): body outline with subcutaneous fat and a muscle wall,
vertebrae (cortex, marrow, discs, canal, posterior elements), ribs, lung bases, liver (right upper, with a
left lobe across the midline, gallbladder, hepatic and portal branches), spleen (left posterior,
crescent-shaped), kidneys (cortex, medulla, pelvis, hilum notch) beside the spine, a thin pancreas across
the midline, stomach with an air-fluid level, duodenal C-loop, small-bowel loops and colon with gas and
stool, aorta, IVC, portal/splenic/mesenteric veins, renal vessels, psoas, the scanner table. Shapes are
ellipsoids and tubes deformed by random low-frequency displacement fields (separable trigonometric
modes), so no two cases are alike. Structures are painted in a fixed priority order into ONE tissue map,
so organs touch but never overlap; tumours are painted last, only inside their organ (kidney and
pancreas tumours may also grow into the surrounding fat, as real ones do), and some cases have none.

**CT.** Hounsfield values per tissue and contrast phase (native, late arterial, portal venous) with
per-case enhancement and per-organ variation (liver and spleen stay within about 10 HU of each other),
low-frequency organ texture, partial-volume blur of the image (labels stay crisp), correlated noise,
and a per-site protocol: in-plane spacing, slice thickness, field of view, orientation on disk (RAS or
LPS), intensity shift, noise level, oral contrast, padding outside the reconstruction circle.

**Determinism.** Every case draws from its own ``SeedSequence(seed, dataset, index)``; the same seed and
:data:`GENERATOR_VERSION` give byte-identical files (nibabel writes gzip with ``mtime=0``).

numpy + scipy only (no torch); nibabel through :mod:`unionseg.data.io`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from unionseg.errors import (
    ConfigError,
    UnionsegError,
    listing,
    refuse_in_starting_worker,
    worker_died,
    worker_report,
)

GENERATOR_VERSION = "phantom-1.0"
"""Bump whenever the generated voxels can change: it is recorded in every file the phantom writes."""


# ====================================================================== specs
@dataclass(frozen=True)
class TrainingSetSpec:
    """One partially labelled training set.

    Args:
        name: dataset (and site) name.
        labels: ``(local value, class key)`` pairs; a key is a leaf name or ``region:<organ>``.
        annotated: leaves/regions whose ground truth the set can be trusted for.
    """

    name: str
    labels: tuple[tuple[int, str], ...]
    annotated: tuple[str, ...]


@dataclass(frozen=True)
class PhantomSpec:
    """Which classes exist and which training sets annotate what.

    Args:
        name: suite name.
        classes: ``(leaf name, part_of)`` in global leaf-id order (ids start at 1). Every organ leaf must be
            a structure the phantom draws (:data:`STRUCTURES`); a tumour leaf (:data:`TUMOURS`) must be
            ``part_of`` its host organ.
        training_sets: the partially labelled sets, each from its own site.
    """

    name: str
    classes: tuple[tuple[str, Optional[str]], ...]
    training_sets: tuple[TrainingSetSpec, ...]

    def validate(self) -> None:
        """Raises:
            ConfigError: unknown structure, tumour without its host, invalid label map."""
        from unionseg.labels import DatasetLabels, LabelSpace, Leaf

        names = [c for c, _ in self.classes]
        for leaf, parent in self.classes:
            if leaf in TUMOURS:
                if parent != TUMOURS[leaf]:
                    raise ConfigError(f"phantom suite {self.name!r}: {leaf!r} must be part_of {TUMOURS[leaf]!r}")
            elif leaf not in STRUCTURES:
                raise ConfigError(f"phantom suite {self.name!r}: the phantom draws no {leaf!r} "
                                  f"(known: {', '.join(sorted(STRUCTURES | set(TUMOURS)))})")
            elif parent is not None:
                raise ConfigError(f"phantom suite {self.name!r}: only tumours can be part_of an organ")
        if len(set(names)) != len(names):
            raise ConfigError(f"phantom suite {self.name!r}: duplicate classes")
        reserved = {"val", "test"}
        LabelSpace([Leaf(n, p) for n, p in self.classes],
                   [DatasetLabels(t.name, dict(t.labels), t.annotated) for t in self.training_sets],
                   source=f"phantom suite {self.name!r}")
        for t in self.training_sets:
            if t.name in reserved:
                raise ConfigError(f"phantom suite {self.name!r}: training set name {t.name!r} is reserved")


@dataclass(frozen=True)
class SizeSpec:
    """Case counts and acquisition ranges of one phantom size.

    Spacings are drawn per site from the ranges; ``matrix`` fixes the in-plane matrix (spacing = FOV /
    matrix) as scanners do; ``voxel_volume_min`` bounds the work per case (a site with fine in-plane
    spacing gets thicker slices).
    """

    name: str
    n_train: int
    n_val: int
    n_test: int
    inplane_mm: tuple[float, float]
    slice_choices_mm: tuple[float, ...]
    fov_mm: tuple[float, float]
    z_extra_mm: tuple[float, float]
    noise_sd: tuple[float, float]
    preprocess_spacing: tuple[float, float, float]
    matrix: Optional[int] = None
    voxel_volume_min: float = 0.0
    workers: int = 1


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec("tiny", 4, 2, 2, inplane_mm=(7.0, 8.0), slice_choices_mm=(6.0, 7.0, 8.0),
                     fov_mm=(350.0, 390.0), z_extra_mm=(0.0, 10.0), noise_sd=(6.0, 12.0),
                     preprocess_spacing=(6.0, 6.0, 6.0)),
    "standard": SizeSpec("standard", 12, 6, 10, inplane_mm=(1.6, 2.4), slice_choices_mm=(2.5, 3.0, 3.75, 5.0),
                         fov_mm=(350.0, 390.0), z_extra_mm=(0.0, 15.0), noise_sd=(10.0, 20.0),
                         # 6 mm (was 4 mm until session 9): a 32^3 patch then sees what 48^3 saw at 4 mm, for
                         # 0.4 x the step cost, so the CPU budget converges (docs/benchmarks.md, "Convergence")
                         preprocess_spacing=(6.0, 6.0, 6.0), voxel_volume_min=14.0, workers=2),
    "large": SizeSpec("large", 5, 2, 3, inplane_mm=(0.7, 0.9), slice_choices_mm=(1.5, 2.0, 2.5, 3.0, 5.0),
                      fov_mm=(360.0, 460.0), z_extra_mm=(40.0, 70.0), noise_sd=(15.0, 28.0),
                      preprocess_spacing=(0.8, 0.8, 1.5), matrix=512, workers=4),
}

_DEFAULT_CLASSES: tuple[tuple[str, Optional[str]], ...] = (
    ("liver", None), ("liver_tumour", "liver"), ("kidney", None), ("kidney_tumour", "kidney"),
    ("pancreas", None), ("pancreas_tumour", "pancreas"), ("spleen", None),
)
_LIVER = TrainingSetSpec("liver", ((1, "liver"), (2, "liver_tumour")), ("liver", "liver_tumour"))
_KIDNEY = TrainingSetSpec("kidney", ((1, "kidney"), (2, "kidney_tumour")), ("kidney", "kidney_tumour"))
_PANCREAS = TrainingSetSpec("pancreas", ((1, "pancreas"), (2, "pancreas_tumour")), ("pancreas", "pancreas_tumour"))
_SPLEEN = TrainingSetSpec("spleen", ((1, "spleen"),), ("spleen",))

SUITES: dict[str, PhantomSpec] = {
    # four single-organ sets whose local values collide (1 = organ, 2 = tumour), like the MSD tasks
    "default": PhantomSpec("default", _DEFAULT_CLASSES, (_LIVER, _KIDNEY, _PANCREAS, _SPLEEN)),
    # + a colon whose only training set annotates the tumour and not the organ (MSD colon)
    "tumour_only": PhantomSpec(
        "tumour_only", _DEFAULT_CLASSES + (("colon", None), ("colon_tumour", "colon")),
        (_LIVER, _KIDNEY, _PANCREAS, _SPLEEN,
         TrainingSetSpec("colon", ((1, "colon_tumour"),), ("colon_tumour",)))),
    # the spleen set replaced by one annotating liver (as a region, tumours included) and spleen together
    "two_organ": PhantomSpec(
        "two_organ", _DEFAULT_CLASSES,
        (_LIVER, _KIDNEY, _PANCREAS,
         TrainingSetSpec("liver_spleen", ((1, "region:liver"), (2, "spleen")), ("region:liver", "spleen")))),
}


@dataclass(frozen=True)
class SiteParams:
    """The acquisition protocol of one site (one training set; val/test cases borrow them in turn)."""

    name: str
    orientation: str            # on-disk axis codes: "RAS" or "LPS"
    spacing: tuple[float, float, float]
    fov_mm: float
    phase: str                  # native | arterial | portal
    enhancement: float          # multiplies every contrast enhancement
    hu_shift: float             # calibration offset added to the whole image
    noise_sd: float             # HU, for an average-sized patient
    noise_grain: float          # in-plane correlation of the noise (voxels)
    blur: tuple[float, float]   # partial-volume / kernel blur (voxels): in-plane, through-plane
    oral_contrast: bool
    pad_value: int              # value outside the reconstruction circle (-1024 or -2048)


# ====================================================================== tissues
# (tissue, labelled structure or None, HU native, late arterial, portal venous, texture sd)
_TISSUE_TABLE: tuple[tuple[str, Optional[str], float, float, float, float], ...] = (
    ("air", None, -1000, -1000, -1000, 0),
    ("fat", None, -104, -104, -100, 6),
    ("visceral_fat", None, -96, -93, -90, 10),
    ("muscle", None, 46, 52, 58, 4),
    ("lung", None, -860, -860, -860, 30),
    ("bone", "vertebrae", 650, 650, 650, 60),
    ("marrow", "vertebrae", 220, 235, 240, 25),
    ("disc", None, 80, 85, 90, 5),
    ("csf", None, 10, 10, 12, 3),
    ("rib", "ribs", 420, 420, 420, 50),
    ("aorta", "aorta", 42, 290, 165, 4),
    ("ivc", "inferior_vena_cava", 40, 80, 140, 6),
    ("portal_vein", "portal_vein", 40, 110, 172, 4),
    ("artery", None, 42, 270, 160, 4),
    ("vein", None, 40, 95, 158, 5),
    ("liver", "liver", 56, 76, 104, 4),
    ("hepatic_vessel", "liver", 42, 95, 150, 6),
    ("liver_tumour", "liver_tumour", 36, 70, 70, 8),          # overwritten relative to the liver
    ("liver_tumour_core", "liver_tumour", 18, 20, 22, 5),
    ("gallbladder", "gallbladder", 8, 8, 10, 3),
    ("spleen", "spleen", 48, 88, 108, 4),
    ("pancreas", "pancreas", 42, 110, 92, 7),
    ("pancreas_tumour", "pancreas_tumour", 34, 65, 62, 8),    # overwritten relative to the pancreas
    ("kidney_cortex", "kidney", 33, 185, 165, 6),
    ("kidney_medulla", "kidney", 30, 80, 150, 6),
    ("kidney_pelvis", "kidney", 8, 8, 10, 3),
    ("kidney_tumour", "kidney_tumour", 35, 125, 100, 12),     # drawn per case
    ("kidney_tumour_core", "kidney_tumour", 20, 25, 30, 6),
    ("stomach_wall", "stomach", 40, 90, 85, 5),
    ("stomach_content", "stomach", 22, 22, 22, 14),
    ("stomach_gas", "stomach", -990, -990, -990, 5),
    ("bowel_wall", "small_bowel", 40, 95, 90, 5),
    ("bowel_content", "small_bowel", 15, 15, 15, 10),
    ("bowel_gas", "small_bowel", -985, -985, -985, 8),
    ("duodenum_wall", "duodenum", 40, 95, 90, 5),
    ("duodenum_content", "duodenum", 15, 15, 15, 8),
    ("colon_wall", "colon", 40, 85, 85, 5),
    ("colon_content", "colon", 5, 5, 5, 35),
    ("colon_gas", "colon", -990, -990, -990, 8),
    ("colon_tumour", "colon_tumour", 42, 80, 90, 8),
    ("table", None, 120, 120, 120, 10),
)
_T: dict[str, int] = {name: i for i, (name, *_rest) in enumerate(_TISSUE_TABLE)}
_PHASES = ("native", "arterial", "portal")
STRUCTURES: frozenset[str] = frozenset(s for _, s, *_r in _TISSUE_TABLE if s is not None and s not in
                                       ("liver_tumour", "kidney_tumour", "pancreas_tumour", "colon_tumour"))
"""Organ/structure names a suite may use as classes."""
TUMOURS: dict[str, str] = {"liver_tumour": "liver", "kidney_tumour": "kidney",
                           "pancreas_tumour": "pancreas", "colon_tumour": "colon"}
"""Tumour leaves the phantom draws and the organ each lives in."""

_HOSTS: dict[str, tuple[str, ...]] = {
    "liver": ("liver", "hepatic_vessel"),
    "kidney": ("kidney_cortex", "kidney_medulla", "kidney_pelvis"),
    "pancreas": ("pancreas",),
    "colon": ("colon_wall", "colon_content", "colon_gas"),
}
# tissues a tumour may also grow into (exophytic kidney tumours, pancreatic masses widening the gland)
_GROW_INTO: dict[str, tuple[str, ...]] = {"kidney": ("visceral_fat",), "pancreas": ("visceral_fat",)}
_TUMOUR_RADIUS_MM: dict[str, tuple[float, float]] = {
    "liver": (8.0, 28.0), "kidney": (10.0, 28.0), "pancreas": (9.0, 17.0), "colon": (12.0, 20.0)}
_TUMOUR_COUNT_P: dict[str, tuple[float, ...]] = {   # P(0), P(1), P(2), ... lesions per case
    "liver": (0.25, 0.4, 0.2, 0.15), "kidney": (0.3, 0.7), "pancreas": (0.3, 0.7), "colon": (0.3, 0.7)}


def _stable_int(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


# ====================================================================== geometry helpers
def _rotation(rz: float = 0.0, ry: float = 0.0, rx: float = 0.0) -> np.ndarray:
    """3 x 3 rotation (radians) about z, then y, then x; rows are the local axes in the anatomy frame."""
    cz, sz, cy, sy, cx, sx = math.cos(rz), math.sin(rz), math.cos(ry), math.sin(ry), math.cos(rx), math.sin(rx)
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return (rot_z @ rot_y @ rot_x).T


class _Warp:
    """A smooth random displacement field: a sum of separable trigonometric modes.

    ``d_c(p) = sum_m A_mc sin(k_mx x + f_mx) sin(k_my y + f_my) sin(k_mz z + f_mz)``; wavelengths of
    several centimetres keep it low-frequency, and it is defined in mm, so any grid samples the same shape.
    """

    def __init__(self, rng: np.random.Generator, amplitude: float, wavelength: tuple[float, float] = (60, 160),
                 n_modes: int = 3) -> None:
        self.k = (2 * np.pi / rng.uniform(*wavelength, size=(n_modes, 3))).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=(n_modes, 3)).astype(np.float32)
        self.amp = rng.normal(0.0, amplitude / math.sqrt(n_modes), size=(n_modes, 3)).astype(np.float32)
        self.bound = float(np.abs(self.amp).sum(axis=0).max())

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out: list[Any] = [0.0, 0.0, 0.0]
        for m in range(self.k.shape[0]):
            prod = (np.sin(self.k[m, 0] * x + self.phase[m, 0]) * np.sin(self.k[m, 1] * y + self.phase[m, 1])
                    * np.sin(self.k[m, 2] * z + self.phase[m, 2]))
            for c in range(3):
                out[c] = out[c] + self.amp[m, c] * prod
        return out[0], out[1], out[2]


@dataclass
class _Ellipsoid:
    """A (warped) ellipsoid; :meth:`level` is < 1 inside (squared normalised radius)."""

    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    warp: Optional[_Warp] = None

    def bounds(self, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        r = float(np.max(self.radii)) * scale + (self.warp.bound if self.warp else 0.0) + 1.0
        return self.center - r, self.center + r

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        if self.warp is not None:
            dx, dy, dz = self.warp(x, y, z)
            x, y, z = x + dx, y + dy, z + dz
        px, py, pz = (x - np.float32(self.center[0]), y - np.float32(self.center[1]), z - np.float32(self.center[2]))
        total: Any = 0.0
        for i in range(3):
            r = self.rot[i]
            q = np.float32(r[0]) * px + np.float32(r[1]) * py + np.float32(r[2]) * pz
            total = total + (q * np.float32(1.0 / self.radii[i])) ** 2
        return np.asarray(total, dtype=np.float32)


class _Canvas:
    """The tissue map of one case on its voxel grid (canonical RAS axes, anatomy-frame coordinates)."""

    def __init__(self, lo: np.ndarray, spacing: Sequence[float], shape: Sequence[int]) -> None:
        self.lo = np.asarray(lo, dtype=np.float64)
        self.spacing = tuple(float(s) for s in spacing)
        self.shape = tuple(int(n) for n in shape)
        self.tissue = np.zeros(self.shape, dtype=np.uint8)
        self.axes = [(self.lo[i] + self.spacing[i] * np.arange(self.shape[i])).astype(np.float32) for i in range(3)]

    def box(self, lo: Sequence[float] | np.ndarray, hi: Sequence[float] | np.ndarray
            ) -> Optional[tuple[slice, slice, slice]]:
        """Voxel slices of the axis-aligned box [lo, hi] (mm), or None when it misses the grid."""
        out = []
        for i in range(3):
            i0 = max(0, math.ceil((lo[i] - self.lo[i]) / self.spacing[i] - 1e-6))
            i1 = min(self.shape[i], math.floor((hi[i] - self.lo[i]) / self.spacing[i] + 1e-6) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    @property
    def curve_step(self) -> float:
        """Polyline resolution for tubes: finer than the voxels, never finer than 4 mm."""
        return max(4.0, 1.2 * max(self.spacing))

    def grid(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinates (n,1,1), (1,m,1), (1,1,k) of a box."""
        return (self.axes[0][box[0]][:, None, None], self.axes[1][box[1]][None, :, None],
                self.axes[2][box[2]][None, None, :])

    def paint(self, box: tuple[slice, slice, slice], mask: np.ndarray, tissue: str,
              only: Optional[Sequence[str]] = None) -> None:
        """Set ``tissue`` where ``mask`` (box-shaped) holds, optionally only over the listed tissues."""
        view = self.tissue[box]
        mask = np.broadcast_to(mask, view.shape)
        if only is not None:
            mask = mask & np.isin(view, [_T[t] for t in only])
        view[mask] = _T[tissue]

    def ellipsoid(self, shape: _Ellipsoid, tissue: str, only: Optional[Sequence[str]] = None,
                  inner: Optional[tuple[float, str]] = None) -> None:
        """Paint an ellipsoid; ``inner=(scale, tissue2)`` paints its core (level < scale**2) as tissue2."""
        box = self.box(*shape.bounds())
        if box is None:
            return
        level = shape.level(*self.grid(box))
        self.paint(box, level < 1.0, tissue, only)
        if inner is not None:
            self.paint(box, level < inner[0] ** 2, inner[1], only=[tissue])

    def tube_level(self, points: np.ndarray, radii: np.ndarray
                   ) -> Optional[tuple[tuple[slice, slice, slice], np.ndarray]]:
        """Normalised distance (distance / local radius, < 1 inside) to a polyline, over its bounding box.

        Args:
            points: (N, 3) polyline vertices (mm); radii: (N,) radius at each vertex (mm).
        """
        rmax = float(radii.max()) + 1.0
        box = self.box(points.min(0) - rmax, points.max(0) + rmax)
        if box is None:
            return None
        level = np.full([s.stop - s.start for s in box], np.inf, dtype=np.float32)
        seg_a, seg_b = points[:-1], points[1:]
        pad = (np.maximum(radii[:-1], radii[1:]) + 1.0)[:, None]
        spacing, origin = np.asarray(self.spacing), self.lo
        start = np.array([s.start for s in box])
        stop = np.array([s.stop for s in box])
        i0 = np.maximum(np.ceil((np.minimum(seg_a, seg_b) - pad - origin) / spacing - 1e-6).astype(int), start)
        i1 = np.minimum(np.floor((np.maximum(seg_a, seg_b) + pad - origin) / spacing + 1e-6).astype(int) + 1, stop)
        ab_all = (seg_b - seg_a).astype(np.float32)
        for n in np.nonzero(np.all(i1 > i0, axis=1))[0]:
            sub = (slice(i0[n, 0], i1[n, 0]), slice(i0[n, 1], i1[n, 1]), slice(i0[n, 2], i1[n, 2]))
            a, ab = seg_a[n].astype(np.float32), ab_all[n]
            px = self.axes[0][sub[0]][:, None, None] - a[0]
            py = self.axes[1][sub[1]][None, :, None] - a[1]
            pz = self.axes[2][sub[2]][None, None, :] - a[2]
            inv_len2 = np.float32(1.0 / max(float(ab @ ab), 1e-6))
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) * inv_len2, 0.0, 1.0)
            d2 = (px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2
            ratio = np.sqrt(d2) / (np.float32(radii[n]) + t * np.float32(radii[n + 1] - radii[n]))
            rel = tuple(slice(sl.start - o, sl.stop - o) for sl, o in zip(sub, start, strict=True))
            np.minimum(level[rel], ratio, out=level[rel])
        return box, level

    def tube(self, points: np.ndarray, radii: np.ndarray, tissue: str, only: Optional[Sequence[str]] = None,
             wall: Optional[tuple[float, str]] = None) -> Optional[tuple[tuple[slice, slice, slice], np.ndarray]]:
        """Paint a tube; ``wall=(mm, tissue2)`` paints its outer shell of that thickness as tissue2."""
        found = self.tube_level(points, radii)
        if found is None:
            return None
        box, level = found
        self.paint(box, level < 1.0, tissue, only)
        if wall is not None:
            frac = 1.0 - wall[0] / float(np.mean(radii))
            self.paint(box, (level < 1.0) & (level >= frac), wall[1], only=[tissue])
        return found


def _curve(control: np.ndarray, step_mm: float = 6.0) -> np.ndarray:
    """A smooth curve through control points (centripetal-free uniform Catmull-Rom), about ``step_mm`` apart.

    Args:
        control: (K, 3) control points (mm), K >= 2.

    Returns:
        (N, 3) points; the first and last equal the first and last control points.
    """
    control = np.asarray(control, dtype=np.float64)
    if len(control) == 2:
        n = max(2, int(np.linalg.norm(control[1] - control[0]) / step_mm) + 1)
        return control[0] + np.linspace(0.0, 1.0, n)[:, None] * (control[1] - control[0])
    ext = np.concatenate([2 * control[:1] - control[1:2], control, 2 * control[-1:] - control[-2:-1]])
    pieces = []
    for i in range(len(control) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        n = max(2, int(np.linalg.norm(p2 - p1) / step_mm) + 1)
        t = np.linspace(0.0, 1.0, n, endpoint=(i == len(control) - 2))[:, None]
        pieces.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                             + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    return np.concatenate(pieces)


def _smooth_field(shape: Sequence[int], spacing: Sequence[float], cell_mm: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Unit-variance smooth random field (float32): cubic B-spline through random knots ``cell_mm`` apart.

    Separable 4-tap interpolation along each axis, so the cost is a few passes over the output.
    """
    coarse = [int(math.ceil(n * s / cell_mm)) + 4 for n, s in zip(shape, spacing, strict=True)]
    out = rng.standard_normal(coarse).astype(np.float32)
    for axis, (n, s) in enumerate(zip(shape, spacing, strict=True)):
        pos = np.arange(n) * (s / cell_mm) + 1.0
        i0 = np.floor(pos).astype(np.int64)
        t = (pos - i0).astype(np.float32)
        weights = [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6]
        acc = None
        for tap, w in zip(range(-1, 3), weights, strict=True):
            taken = np.take(out, i0 + tap, axis=axis)
            shape_w = [1, 1, 1]
            shape_w[axis] = n
            term = taken * w.reshape(shape_w)
            acc = term if acc is None else acc + term
        out = acc  # type: ignore[assignment]
    # a cubic B-spline of unit-variance knots has variance (151/315)**3 in 3D
    out *= np.float32((315.0 / 151.0) ** 1.5)
    return out


# ====================================================================== anatomy
@dataclass(frozen=True)
class _Body:
    """Per-case body habitus (mm, anatomy frame)."""

    a_cav: float      # cavity half-width (left-right)
    b_cav: float      # cavity half-depth (antero-posterior)
    t_fat: float      # subcutaneous fat thickness (anterior/lateral)
    t_fat_back: float
    t_muscle: float   # abdominal wall muscle thickness
    t_back: float     # posterior wall (paraspinal muscles) thickness

    @property
    def body_half_width(self) -> float:
        return self.a_cav + self.t_muscle + self.t_fat

    @property
    def body_back(self) -> float:
        return self.b_cav + self.t_back + self.t_fat_back

    @property
    def body_front(self) -> float:
        return self.b_cav + self.t_muscle + self.t_fat


def _sample_body(rng: np.random.Generator) -> _Body:
    t_fat = float(rng.uniform(8, 38))
    return _Body(a_cav=float(rng.uniform(112, 134)), b_cav=float(rng.uniform(76, 92)), t_fat=t_fat,
                 t_fat_back=float(t_fat * rng.uniform(0.35, 0.6)), t_muscle=float(rng.uniform(7, 13)),
                 t_back=float(rng.uniform(38, 50)))


def _asym_ellipse(x: np.ndarray, y: np.ndarray, half_width: float, front: float, back: float,
                  back_power: float = 2.0) -> np.ndarray:
    """Normalised radius of an oval whose anterior/posterior half-axes differ (< 1 inside); a
    ``back_power`` above 2 flattens the back, as a patient lying on the table is flattened."""
    ux = (x * np.float32(1.0 / half_width)) ** 2
    uy = np.where(y > 0, (y * np.float32(1.0 / front)) ** 2,
                  np.abs(y * np.float32(1.0 / back)) ** np.float32(back_power))
    return np.asarray(ux + uy, dtype=np.float32)


class _Draw:
    """What every painter of one case shares: the canvas, the random stream, the body, and helpers that
    place points of an average anatomy (cavity 123 x 84 mm half-axes) into this body."""

    def __init__(self, cv: _Canvas, rng: np.random.Generator, body: _Body) -> None:
        self.cv, self.rng, self.body = cv, rng, body
        self.sx, self.sy = body.a_cav / 123.0, body.b_cav / 84.0
        self.zo = float(rng.normal(0.0, 7.0))                    # craniocaudal shift of the upper organs
        self.step = cv.curve_step
        full = (slice(0, cv.shape[0]), slice(0, cv.shape[1]), slice(0, cv.shape[2]))
        self.x, self.y, self.z = cv.grid(full)
        self.spine_y = -body.b_cav + 12.0                        # centre of the vertebral bodies
        self.aorta_y = self.spine_y + 30.0

    def point(self, x: float, y: float, z: float) -> np.ndarray:
        """A point of the average anatomy, scaled to this body and shifted craniocaudally."""
        return np.array([x * self.sx, y * self.sy, z + self.zo], dtype=np.float64)

    def jitter(self, p: np.ndarray, sd: float) -> np.ndarray:
        return p + self.rng.normal(0.0, sd, 3)

    def radii(self, *r: float, sd: float = 0.08) -> np.ndarray:
        return np.asarray(r, dtype=np.float64) * self.rng.uniform(1 - 1.5 * sd, 1 + 1.5 * sd, len(r))

    def curve(self, ctrl: Sequence[Sequence[float]], sd: float) -> np.ndarray:
        """A smooth curve through jittered average-anatomy control points."""
        return _curve(np.array([self.jitter(self.point(*c), sd) for c in ctrl]), self.step)

    def tube_radii(self, points: np.ndarray, r0: float, r1: float, wobble: float = 0.12,
                   haustra_mm: float = 0.0) -> np.ndarray:
        """Radius along a tube: linear r0 -> r1, a slow random wobble, optional haustral pleats."""
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
        t = arc / max(arc[-1], 1e-6)
        r = (r0 + (r1 - r0) * t) * (1 + wobble * np.sin(2 * np.pi * (t * self.rng.uniform(1.5, 3.0)
                                                                     + self.rng.uniform())))
        if haustra_mm:
            r = r * (1 + 0.15 * np.sin(2 * np.pi * arc / haustra_mm))
        return r


def _body_masks(d: _Draw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(body, inside the subcutaneous fat, abdominal cavity) masks over the whole volume."""
    body = d.body
    dx, dy, _ = _Warp(d.rng, 5.0, (120, 260))(d.x, d.y, d.z)
    taper = 1.0 + 0.05 * np.tanh((d.z - np.float32(60.0)) / np.float32(80.0))   # lower chest slightly wider
    bx, by = (d.x + dx) / taper, d.y + dy
    outer = _asym_ellipse(bx, by, body.body_half_width, body.body_front, body.body_back, 3.0) < 1.0
    inner = _asym_ellipse(bx, by, body.a_cav + body.t_muscle, body.b_cav + body.t_muscle,
                          body.b_cav + body.t_back, 3.0) < 1.0
    cavity = _asym_ellipse(bx, by, body.a_cav, body.b_cav, body.b_cav) < 1.0
    return outer, inner, cavity


def _paint_gut(d: _Draw) -> None:
    """Lung bases, small bowel, colon, stomach, duodenum (the lowest priorities)."""
    cv, rng, sx, sy, spacing = d.cv, d.rng, d.sx, d.sy, d.cv.spacing
    # lung bases: organs under the diaphragm overwrite them
    for side in (1, -1):
        cv.ellipsoid(_Ellipsoid(d.jitter(d.point(side * 70, -22, 205), 5), d.radii(58 * sx, 78 * sy, 100),
                                _rotation(rx=-0.25), _Warp(rng, 6.0)), "lung", only=["visceral_fat"])
    # small bowel: a random tubular network (where two smooth fields are both near zero), lower abdomen
    region = _Ellipsoid(d.jitter(d.point(0, 28, -62), 6), d.radii(100 * sx, 68 * sy, 70), warp=_Warp(rng, 8.0))
    box = cv.box(*region.bounds())
    if box is not None:
        bshape = [s.stop - s.start for s in box]
        f1 = _smooth_field(bshape, spacing, 22.0, rng)
        f2 = _smooth_field(bshape, spacing, 22.0, rng)
        f3 = _smooth_field(bshape, spacing, 9.0, rng)
        inside = region.level(*cv.grid(box)) < 1.0
        net = f1 * f1 + f2 * f2
        lumen_r, wall_r = float(rng.uniform(0.9, 1.2)), 0.15
        cv.paint(box, inside & (net < (lumen_r + wall_r) ** 2), "bowel_wall", only=["visceral_fat"])
        cv.paint(box, inside & (net < lumen_r**2), "bowel_content", only=["bowel_wall"])
        cv.paint(box, inside & (net < lumen_r**2) & (f3 > rng.uniform(0.9, 1.6)), "bowel_gas",
                 only=["bowel_content"])
    # colon frame (haustra: radius modulated along the tube), stool with gas pockets
    colon = d.curve(((92, 8, -100), (100, -8, -45), (88, 8, 8), (45, 66, 12), (0, 72, 2), (-50, 62, 22),
                     (-96, 8, 42), (-102, -14, -5), (-96, -6, -62), (-62, 18, -100), (-12, 28, -112)), 6.0)
    colon_r = d.tube_radii(colon, rng.uniform(20, 26), rng.uniform(13, 17), haustra_mm=36.0)
    found = cv.tube(colon, colon_r, "colon_content", only=["visceral_fat", "bowel_wall", "bowel_content",
                                                            "bowel_gas", "lung"], wall=(3.0, "colon_wall"))
    if found is not None:
        cbox, clevel = found
        f3 = _smooth_field([s.stop - s.start for s in cbox], spacing, 8.0, rng)
        gas = (f3 > rng.uniform(-0.2, 0.6)) | (cv.grid(cbox)[1] > np.float32(rng.uniform(20, 60) * sy))
        cv.paint(cbox, (clevel < 0.85) & gas, "colon_gas", only=["colon_content"])
    # stomach: a 4 mm wall, gas above an air-fluid level (anterior: the patient lies supine), antrum, duodenum
    stomach = _Ellipsoid(d.jitter(d.point(-45, 38, 86), 5), d.radii(42 * sx, 33 * sy, 50),
                         _rotation(rz=0.3, ry=0.35), _Warp(rng, 7.0))
    cv.ellipsoid(stomach, "stomach_wall")
    lumen = _Ellipsoid(stomach.center, stomach.radii - 4.0, stomach.rot, stomach.warp)
    cv.ellipsoid(lumen, "stomach_gas", only=["stomach_wall"])
    sbox = cv.box(*stomach.bounds())
    if sbox is not None:
        level_y = stomach.center[1] + rng.uniform(0.1, 0.8) * stomach.radii[1]
        cv.paint(sbox, cv.grid(sbox)[1] < np.float32(level_y), "stomach_content", only=["stomach_gas"])
    antrum = d.curve(((-30, 45, 62), (0, 48, 48), (22, 38, 44)), 4.0)
    cv.tube(antrum, np.full(len(antrum), rng.uniform(13, 17)), "stomach_content", wall=(4.0, "stomach_wall"))
    duodenum = d.curve(((26, 32, 44), (52, 14, 38), (58, -4, 16), (42, -12, -2), (8, -12, -8), (-18, -6, 4)), 4.0)
    cv.tube(duodenum, np.full(len(duodenum), rng.uniform(9, 12)), "duodenum_content",
            wall=(3.0, "duodenum_wall"))


def _paint_organs(d: _Draw) -> None:
    """Psoas, liver, spleen, pancreas, kidneys, gallbladder (each overwrites what came before)."""
    cv, rng, sx, sy = d.cv, d.rng, d.sx, d.sy
    # psoas (grows caudally) beside the spine
    for side in (1, -1):
        pts = np.array([[side * 30 * sx, d.spine_y - 2, 70], [side * 36 * sx, d.spine_y + 2, 0],
                        [side * 46 * sx, d.spine_y + 6, -90], [side * 55 * sx, d.spine_y + 14, -170]])
        pts = pts + rng.normal(0, 2, pts.shape)
        cv.tube(pts, np.array([5.0, 12.0, 19.0, 22.0]) * rng.uniform(0.85, 1.15), "muscle")
    # liver: right lobe + left lobe across the midline (smooth union)
    right = _Ellipsoid(d.jitter(d.point(60, 4, 70), 4), d.radii(70 * sx, 82 * sy, 62), _rotation(rz=0.15, rx=0.1),
                       _Warp(rng, 9.0))
    left = _Ellipsoid(d.jitter(d.point(-18, 42, 86), 5), d.radii(62 * sx, 34 * sy, 36),
                      _rotation(rz=-0.35, ry=0.2), _Warp(rng, 7.0))
    box = cv.box(np.minimum(right.bounds()[0], left.bounds()[0]), np.maximum(right.bounds()[1], left.bounds()[1]))
    if box is not None:
        g = cv.grid(box)
        blend = np.float32(0.18)                                   # a fillet between the lobes
        cv.paint(box, -blend * np.logaddexp(-right.level(*g) / blend, -left.level(*g) / blend) < 1.0, "liver")
    # spleen: a crescent (ellipsoid minus an anteromedial ellipsoid) along the left posterolateral wall
    spleen_c = d.jitter(d.point(-88, -40, 72), 5)
    rot = _rotation(rz=0.75 + rng.normal(0, 0.12), rx=rng.normal(0, 0.1))
    scale = rng.uniform(0.8, 1.25)
    spleen = _Ellipsoid(spleen_c, d.radii(28, 56, 50) * scale ** (1 / 3), rot, _Warp(rng, 5.0))
    notch = _Ellipsoid(spleen_c + rot.T @ np.array([46.0, 0.0, 0.0]), d.radii(26, 50, 60), rot)
    box = cv.box(*spleen.bounds())
    if box is not None:
        g = cv.grid(box)
        cv.paint(box, (spleen.level(*g) < 1.0) & (notch.level(*g) > 1.0), "spleen")
    # pancreas: a thin lobulated tube from the head (right, in the duodenal C) to the tail (splenic hilum)
    pancreas = d.curve(((30, -24, 10), (38, -12, 24), (26, -2, 34), (8, 4, 40), (-24, 0, 44), (-54, -12, 50),
                        (-76, -30, 58)), 3.0)
    cv.tube(pancreas, d.tube_radii(pancreas, rng.uniform(13, 17), rng.uniform(8, 10), wobble=0.15), "pancreas")
    # kidneys: cortex, medulla, pelvis, a medial hilum notch
    for side, zk in ((1, -10.0), (-1, 4.0)):
        kc = d.jitter(np.array([side * 64 * sx, -d.body.b_cav + 40 * sy, zk + d.zo]), 4)
        rot = _rotation(rz=side * rng.uniform(0.45, 0.75), ry=-side * rng.uniform(0.1, 0.25))
        kidney = _Ellipsoid(kc, d.radii(24, 30, 55), rot, _Warp(rng, 3.0, (50, 120)))
        hilum_dir = np.array([-side, 0.6, 0.0]) / math.hypot(1.0, 0.6)
        notch = _Ellipsoid(kc + hilum_dir * 24.0, np.array([11.0, 11.0, 18.0]) * rng.uniform(0.8, 1.2))
        pelvis = _Ellipsoid(kc + hilum_dir * 10.0, np.array([9.0, 8.0, 15.0]) * rng.uniform(0.8, 1.2))
        box = cv.box(*kidney.bounds())
        if box is None:
            continue
        g = cv.grid(box)
        level = kidney.level(*g)
        keep = (level < 1.0) & (notch.level(*g) > 1.0)
        cv.paint(box, keep, "kidney_cortex")
        cv.paint(box, keep & (level < rng.uniform(0.35, 0.5)), "kidney_medulla", only=["kidney_cortex"])
        cv.paint(box, keep & (pelvis.level(*g) < 1.0), "kidney_pelvis", only=["kidney_cortex", "kidney_medulla"])
    # gallbladder under the liver
    cv.ellipsoid(_Ellipsoid(d.jitter(d.point(46, 42, 28), 5), d.radii(14, 14, 32, sd=0.15),
                            _rotation(rx=0.6, rz=0.3), _Warp(rng, 3.0)), "gallbladder")


def _paint_vessels(d: _Draw) -> None:
    """Aorta, IVC (through the back of the liver), portal/splenic/mesenteric veins, SMA, renal vessels, and
    portal and hepatic branches inside the liver (labelled liver)."""
    cv, rng, sx, sy, step, zo = d.cv, d.rng, d.sx, d.sy, d.step, d.zo
    aorta_y = d.aorta_y
    aorta = np.array([[-14 * sx, aorta_y + rng.normal(0, 3), z0] for z0 in (260.0, 120.0, 20.0, -60.0, -140.0)])
    aorta[:, 0] += rng.normal(0, 3, len(aorta))
    aorta = _curve(aorta, step)
    cv.tube(aorta, np.full(len(aorta), rng.uniform(9.5, 12.5)), "aorta")
    ivc_ctrl = np.array([[22 * sx, aorta_y + 4, 260.0], [24 * sx, aorta_y + 10, 110.0],
                         [22 * sx, aorta_y + 4, 20.0], [20 * sx, aorta_y - 2, -140.0]])
    ivc = _curve(ivc_ctrl + rng.normal(0, 2, ivc_ctrl.shape), step)
    cv.tube(ivc, np.full(len(ivc), rng.uniform(9.0, 12.0)), "ivc")
    confluence = d.jitter(d.point(10, -10, 34), 3)
    hilum = d.jitter(d.point(40, 2, 64), 4)
    portal = _curve(np.array([confluence, (confluence + hilum) / 2 + [0, 4, 0], hilum]), step)
    cv.tube(portal, np.full(len(portal), rng.uniform(6.0, 8.0)), "portal_vein")
    splenic = _curve(np.array([confluence, d.point(-24, -8, 40), d.point(-54, -20, 48), d.point(-80, -36, 58)]), step)
    cv.tube(splenic, np.full(len(splenic), rng.uniform(3.5, 5.0)), "vein")
    smv = _curve(np.array([confluence, d.point(14, 2, 0), d.point(16, 12, -60)]), step)
    cv.tube(smv, np.full(len(smv), rng.uniform(4.0, 5.5)), "vein")
    sma = _curve(np.array([[-14 * sx, aorta_y + 8, 40.0 + zo], d.point(-8, 2, 0), d.point(-6, 12, -60)]), step)
    cv.tube(sma, np.full(len(sma), rng.uniform(3.0, 4.0)), "artery")
    for side, zk in ((1, -10.0), (-1, 4.0)):                      # renal veins to the IVC, arteries from the aorta
        start = np.array([side * 40 * sx, -d.body.b_cav + 50 * sy, zk + zo + 8])
        cv.tube(np.array([start, [22 * sx, aorta_y + 6, zk + zo + 10]]), np.array([4.5, 5.5]), "vein",
                only=["visceral_fat", "muscle"])
        cv.tube(np.array([start + [0, -6, -8], [-14 * sx, aorta_y, zk + zo + 2]]), np.array([3.0, 3.5]), "artery",
                only=["visceral_fat", "muscle", "vein"])
    for tip in ((85, 6, 74), (60, 38, 92), (-20, 40, 88), (70, -30, 60)):
        end = d.jitter(d.point(*tip), 6)
        branch = _curve(np.array([hilum, (hilum + d.point(*tip)) / 2 + rng.normal(0, 6, 3), end]), step)
        cv.tube(branch, np.linspace(4.5, 2.0, len(branch)), "hepatic_vessel", only=["liver"])
    ivc_top = np.array([24 * sx, aorta_y + 10, 118 + zo])
    for tip in ((90, 20, 112), (35, 55, 112), (-30, 40, 104)):
        end = d.jitter(d.point(*tip), 6)
        branch = _curve(np.array([ivc_top, (ivc_top + d.point(*tip)) / 2 + rng.normal(0, 6, 3), end]), step)
        cv.tube(branch, np.linspace(5.0, 2.0, len(branch)), "hepatic_vessel", only=["liver"])


def _paint_skeleton(d: _Draw, outer: np.ndarray) -> None:
    """Vertebrae (cortex, marrow, discs, canal, arch, spinous and transverse processes) and ribs."""
    cv, rng, x, y, body = d.cv, d.rng, d.x, d.y, d.body
    zs = cv.axes[2][None, None, :]
    vb_y = np.float32(d.spine_y) + np.float32(6.0) * np.sin(zs / np.float32(140.0))     # lordosis
    period = 32.0                                                                       # vertebra + disc (mm)
    in_vertebra = ((zs + np.float32(rng.uniform(0, period))) % np.float32(period)) < np.float32(25.0)
    vb_r = (19.0 * d.sx, 15.0)
    vb_level = (x / np.float32(vb_r[0])) ** 2 + ((y - vb_y) / np.float32(vb_r[1])) ** 2
    canal_y = vb_y - np.float32(vb_r[1] + 10.0)
    canal = (x / np.float32(8.0)) ** 2 + ((y - canal_y) / np.float32(9.0)) ** 2
    arch = (x / np.float32(15.0)) ** 2 + ((y - canal_y) / np.float32(14.0)) ** 2 < 1.0
    spinous = (x / np.float32(5.0)) ** 2 + ((y - canal_y + np.float32(24.0)) / np.float32(14.0)) ** 2 < 1.0
    transverse = ((np.abs(x) - np.float32(26.0)) / np.float32(13.0)) ** 2 + ((y - canal_y) / np.float32(5.0)) ** 2 < 1.0
    cv.tissue[(arch | spinous | transverse) & in_vertebra & outer] = _T["bone"]
    cv.tissue[(vb_level < 1.0) & outer] = _T["disc"]
    cv.tissue[(vb_level < 1.0) & in_vertebra & outer] = _T["bone"]
    cv.tissue[(vb_level < 0.72) & in_vertebra & outer] = _T["marrow"]
    cv.tissue[(canal < 1.0) & outer] = _T["csf"]
    del vb_level, canal, arch, spinous, transverse
    # ribs: arcs in the wall that descend steeply anteriorly (so an axial slice cuts each one once); the
    # lower (floating) ribs end laterally. Vectorised in elliptic-cylinder coordinates over a band of the wall.
    rib_top = rng.uniform(150, 165) + d.zo
    a_r = body.a_cav + 0.5 * body.t_muscle
    b_r = body.b_cav + 0.5 * body.t_muscle
    taper_z = 1.0 + 0.05 * np.tanh((cv.axes[2] - np.float32(60.0)) / np.float32(80.0))
    ex = np.broadcast_to(x / (np.float32(a_r) * taper_z[None, None, :]), cv.shape)
    ey = np.broadcast_to(y / np.float32(b_r), cv.shape)
    rho = np.sqrt(ex * ex + ey * ey)
    band = np.nonzero(np.abs(rho - 1.0) < 8.0 / min(a_r, b_r))
    ex_b, ey_b, rho_b = ex[band], ey[band], rho[band]
    del ex, ey, rho
    z_b = cv.axes[2][band[2]]
    hosts = np.isin(cv.tissue[band], [_T[t] for t in (
        "muscle", "fat", "visceral_fat", "liver", "spleen", "lung", "colon_wall", "colon_content", "colon_gas",
        "stomach_wall", "stomach_content", "stomach_gas")])
    is_rib = np.zeros(len(z_b), dtype=bool)
    phi_start, span = math.radians(-80), math.radians(140)
    for side in (1, -1):
        phi = np.arctan2(ey_b, side * ex_b)
        radius_local = np.sqrt((a_r * np.cos(phi)) ** 2 + (b_r * np.sin(phi)) ** 2)
        d_radial = (rho_b - 1.0) * radius_local
        for k in range(7):
            end = math.radians(60 - max(0, k - 3) * 35)
            drop = rng.uniform(95, 120)
            r_rib = rng.uniform(4.0, 5.5)
            slope = drop / (span * radius_local)
            dz = (z_b - (rib_top - 26.0 * k - drop * (phi - phi_start) / span)) / np.sqrt(1 + slope * slope)
            is_rib |= (phi >= phi_start) & (phi <= end) & (d_radial * d_radial + dz * dz < r_rib * r_rib)
    sel = is_rib & hosts
    cv.tissue[band[0][sel], band[1][sel], band[2][sel]] = _T["rib"]


def _paint_tumours(d: _Draw, organs: Sequence[str]) -> dict[str, int]:
    """Tumours, painted last and only over their organ's tissues (kidney and pancreas tumours may also grow
    into the surrounding fat); the number per organ is random, zero included. Returns the counts."""
    from scipy.ndimage import distance_transform_edt

    cv, rng, spacing = d.cv, d.rng, d.cv.spacing
    counts: dict[str, int] = {}
    for organ in organs:
        probs = np.asarray(_TUMOUR_COUNT_P[organ])
        n_tumours = int(rng.choice(len(probs), p=probs / probs.sum()))
        tissue = f"{organ}_tumour"
        counts[tissue] = 0
        host = [_T[t] for t in _HOSTS[organ]]
        for _ in range(n_tumours):
            where = np.isin(cv.tissue, host)
            if not where.any():
                break
            idx = np.argwhere(where)
            lo_i, hi_i = idx.min(0), idx.max(0) + 1
            sub = tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i, strict=True))
            stride = tuple(max(1, int(round(3.0 / s))) for s in spacing)          # depth on a ~3 mm grid
            small = where[sub][:: stride[0], :: stride[1], :: stride[2]]
            depth = distance_transform_edt(small, sampling=[s * st for s, st in zip(spacing, stride, strict=True)])
            r_lo, r_hi = _TUMOUR_RADIUS_MM[organ]
            r_lo = max(r_lo, 1.2 * max(spacing))                                 # visible on coarse grids too
            radius = float(rng.uniform(r_lo, max(r_hi, r_lo + 2.0)))
            cand = np.argwhere(depth >= min(0.6 * radius, 0.8 * float(depth.max())))
            pick = cand[int(rng.integers(len(cand)))] * np.asarray(stride) + lo_i
            center = np.array([cv.axes[i][pick[i]] for i in range(3)], dtype=np.float64)
            if organ in ("pancreas", "colon"):                                  # thin organs: keep it local
                radius = min(radius, float(depth.max()) * 1.6 + max(spacing))
            tumour = _Ellipsoid(center, radius * rng.uniform(0.75, 1.2, 3),
                                _rotation(rng.uniform(0, 6.3), rng.uniform(0, 6.3)),
                                _Warp(rng, 0.15 * radius, (20, 60)))
            core = f"{organ}_tumour_core" if f"{organ}_tumour_core" in _T and radius > 15 and rng.uniform() < 0.5 \
                else None                                                       # a necrotic centre
            cv.ellipsoid(tumour, tissue, only=list(_HOSTS[organ]) + list(_GROW_INTO.get(organ, ())),
                         inner=(0.55, core) if core else None)
            counts[tissue] += 1
    return counts


def _paint_anatomy(cv: _Canvas, rng: np.random.Generator, body: _Body, tumour_organs: Sequence[str]
                   ) -> dict[str, Any]:
    """Paint one case into ``cv.tissue`` in priority order (later overwrites earlier, so every voxel holds
    one tissue: organs touch but never overlap); returns facts about the case (tumour counts)."""
    d = _Draw(cv, rng, body)
    outer, inner, cavity = _body_masks(d)
    cv.tissue[outer] = _T["visceral_fat"]
    _paint_gut(d)
    _paint_organs(d)
    _paint_vessels(d)
    # the wall clips every organ to the cavity
    cv.tissue[outer & ~inner] = _T["fat"]
    cv.tissue[inner & ~cavity] = _T["muscle"]
    del inner, cavity
    _paint_skeleton(d, outer)
    # outside the body: air; the scanner table under the back
    cv.tissue[~outer] = _T["air"]
    x, y = d.x, d.y
    table_top = np.float32(-(body.body_back + rng.uniform(1.0, 4.0))) + x * x * np.float32(0.0008)
    table = (y < table_top) & (y > table_top - np.float32(9.0)) & (np.abs(x) < 230) & ~outer
    cv.tissue[np.broadcast_to(table, cv.shape)] = _T["table"]
    del outer, table
    return {"tumours": _paint_tumours(d, tumour_organs)}


# ====================================================================== intensities
def _case_hu(site: SiteParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-tissue HU and texture sd for one case (site phase, per-case enhancement and organ variation)."""
    phase = _PHASES.index(site.phase)
    native = np.array([row[2] for row in _TISSUE_TABLE], dtype=np.float64)
    target = np.array([row[2 + phase] for row in _TISSUE_TABLE], dtype=np.float64)
    texture = np.array([row[5] for row in _TISSUE_TABLE], dtype=np.float64)
    enhance = site.enhancement * rng.uniform(0.8, 1.2)              # bolus timing and cardiac output
    organ_native_sd = {"liver": 5.0, "spleen": 4.0, "pancreas": 6.0, "kidney_cortex": 3.0,
                       "kidney_medulla": 3.0, "muscle": 3.0, "fat": 5.0, "visceral_fat": 5.0}
    hu = native.copy()
    for name, sd in organ_native_sd.items():
        hu[_T[name]] += rng.normal(0.0, sd)
    if rng.uniform() < 0.15:                                         # fatty liver
        hu[_T["liver"]] -= rng.uniform(10, 35)
    gain = enhance * rng.normal(1.0, 0.08, len(hu))                  # organ-specific enhancement
    hu = hu + gain * (target - native)
    hu[_T["hepatic_vessel"]] = min(hu[_T["hepatic_vessel"]], hu[_T["portal_vein"]])
    liver = hu[_T["liver"]]
    if site.phase == "arterial":        # hypervascular (brighter) or hypovascular lesions, never isodense
        delta = rng.uniform(10, 35) * (1 if rng.uniform() < 0.4 else -1)
    else:
        delta = rng.uniform(*{"native": (-22, -6), "portal": (-55, -15)}[site.phase])
    hu[_T["liver_tumour"]] = liver + delta
    pdelta = {"native": (-14, -3), "arterial": (-60, -25), "portal": (-45, -15)}[site.phase]
    hu[_T["pancreas_tumour"]] = hu[_T["pancreas"]] + rng.uniform(*pdelta)
    kidney_tumour = {"native": (25, 45), "arterial": (90, 160), "portal": (70, 130)}[site.phase]
    hu[_T["kidney_tumour"]] = rng.uniform(*kidney_tumour)
    if site.phase == "arterial":
        texture[_T["spleen"]] = 16.0                                 # arciform enhancement
    if site.oral_contrast:
        for name in ("bowel_content", "duodenum_content", "stomach_content"):
            hu[_T[name]] = rng.uniform(150, 320)
    return hu.astype(np.float32), texture.astype(np.float32)


def _render(tissue: np.ndarray, site: SiteParams, body: _Body, rng: np.random.Generator) -> np.ndarray:
    """Tissue map -> int16 HU image: texture, partial-volume blur, correlated noise, site shift, FOV circle."""
    from scipy.ndimage import gaussian_filter

    hu, texture_sd = _case_hu(site, rng)
    texture = _smooth_field(tissue.shape, site.spacing, 14.0, rng)
    image = hu[tissue] + texture_sd[tissue] * texture
    del texture
    image = gaussian_filter(image, sigma=(site.blur[0], site.blur[0], site.blur[1]), truncate=3.0)
    noise = rng.standard_normal(tissue.shape, dtype=np.float32)
    noise = gaussian_filter(noise, sigma=(site.noise_grain, site.noise_grain, 0.3), truncate=3.0)
    noise_scale = float(noise[::3, ::3, ::3].std()) or 1.0
    size_factor = (body.body_half_width / 160.0) ** 1.5               # bigger patients: noisier images
    image += noise * np.float32(site.noise_sd * size_factor / noise_scale)
    del noise
    image += np.float32(site.hu_shift)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    if site.pad_value != -1024:                                      # outside the reconstruction circle
        nx, ny = tissue.shape[:2]
        cx, cy = (nx - 1) / 2, (ny - 1) / 2
        ii, jj = np.ogrid[:nx, :ny]
        outside = ((ii - cx) / (nx / 2)) ** 2 + ((jj - cy) / (ny / 2)) ** 2 > 1.0
        image[outside] = site.pad_value
    return image


# ====================================================================== one case
@dataclass(frozen=True)
class _CaseTask:
    seed: int
    dataset: str
    index: int
    case_id: str
    site: SiteParams
    size: SizeSpec
    leaf_of_tissue: tuple[int, ...]                     # tissue id -> global leaf id (0: unlabelled)
    local_lut: Optional[tuple[int, ...]]                # global leaf id -> local value (training sets)
    tumour_organs: tuple[str, ...]
    folder: str                                         # dataset folder (absolute, in the partial output)


def _case_geometry(task: _CaseTask, rng: np.random.Generator, body: _Body) -> tuple[np.ndarray, tuple[int, ...],
                                                                                   np.ndarray]:
    """(lo in the anatomy frame, shape, world offset) of the canonical RAS grid of one case."""
    site, size = task.site, task.size
    s_xy, s_z = site.spacing[0], site.spacing[2]
    z_top = float(rng.uniform(140.0, 152.0) + rng.uniform(*size.z_extra_mm) * 0.3)
    z_bottom = float(-rng.uniform(92.0, 108.0) - rng.uniform(*size.z_extra_mm))
    n_xy = size.matrix or int(round(site.fov_mm / s_xy))
    n_z = int(round((z_top - z_bottom) / s_z)) + 1
    center_y = (body.body_front - body.body_back) / 2.0 + rng.normal(0.0, 8.0)
    center_x = rng.normal(0.0, 6.0)
    lo = np.array([center_x - (n_xy - 1) * s_xy / 2, center_y - (n_xy - 1) * s_xy / 2, z_bottom])
    world = np.array([rng.uniform(-20, 20), rng.uniform(-180, -120), rng.uniform(-650, -350)])
    return lo, (n_xy, n_xy, n_z), world


def _make_case(task: _CaseTask) -> dict[str, Any]:
    """Generate, render and write one case; returns its record for generator.json."""
    from unionseg.data.io import Geometry, write_image

    rng = np.random.default_rng(np.random.SeedSequence([task.seed, _stable_int(task.dataset), task.index]))
    body = _sample_body(rng)
    lo, shape, world = _case_geometry(task, rng, body)
    canvas = _Canvas(lo, task.site.spacing, shape)
    facts = _paint_anatomy(canvas, rng, body, task.tumour_organs)
    tissue = canvas.tissue
    full = np.asarray(task.leaf_of_tissue, dtype=np.uint8)[tissue]
    image = _render(tissue, task.site, body, rng)
    del tissue, canvas

    spacing = np.asarray(task.site.spacing)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = lo + world
    if task.site.orientation == "LPS":        # stored like many DICOM conversions: x and y reversed
        image, full = image[::-1, ::-1, :], full[::-1, ::-1, :]
        affine[0, 0], affine[1, 1] = -spacing[0], -spacing[1]
        affine[0, 3] += (shape[0] - 1) * spacing[0]
        affine[1, 3] += (shape[1] - 1) * spacing[1]
    geom = Geometry((shape[0], shape[1], shape[2]), affine)
    folder = Path(task.folder)
    name = f"{task.case_id}.nii.gz"
    write_image(folder / "imagesTr" / name, np.ascontiguousarray(image), geom, replace=True)
    if task.local_lut is not None:
        local = np.asarray(task.local_lut, dtype=np.uint8)[full]
        write_image(folder / "labelsTr" / name, np.ascontiguousarray(local), geom, replace=True)
        write_image(folder / "fullTr" / name, np.ascontiguousarray(full), geom, replace=True)
    else:
        write_image(folder / "labelsTr" / name, np.ascontiguousarray(full), geom, replace=True)
    counts = np.bincount(full.ravel(), minlength=max(task.leaf_of_tissue) + 1)
    return {"case": task.case_id, "dataset": task.dataset, "site": task.site.name, "shape": list(shape),
            "orientation": task.site.orientation, "leaf_voxels": [int(c) for c in counts],
            "tumours": facts["tumours"]}


# ====================================================================== sites
_PHASE_CYCLE = ("portal", "arterial", "native", "portal")


def _site_params(name: str, index: int, seed: int, size: SizeSpec) -> SiteParams:
    """The protocol of site ``index``: phases cycle (shifted by the seed), odd sites store LPS."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _stable_int("site:" + name), index]))
    fov = float(rng.uniform(*size.fov_mm))
    if size.matrix:
        inplane = fov / size.matrix
    else:
        inplane = float(rng.uniform(*size.inplane_mm))
    choices = [s for s in size.slice_choices_mm if inplane * inplane * s >= size.voxel_volume_min] or [
        max(size.slice_choices_mm)]
    slice_mm = float(choices[int(rng.integers(len(choices)))])
    inplane = round(inplane, 4)
    return SiteParams(
        name=name, orientation="LPS" if index % 2 == 1 else "RAS", spacing=(inplane, inplane, slice_mm),
        fov_mm=round(inplane * (size.matrix or int(round(fov / inplane))), 2),
        phase=_PHASE_CYCLE[(index + seed) % len(_PHASE_CYCLE)], enhancement=round(float(rng.uniform(0.9, 1.1)), 3),
        hu_shift=round(float(rng.uniform(-12, 12)), 2), noise_sd=round(float(rng.uniform(*size.noise_sd)), 2),
        noise_grain=round(float(rng.uniform(0.5, 1.0)), 3),
        blur=(round(float(rng.uniform(0.45, 0.8)), 3), round(float(rng.uniform(0.3, 0.5)), 3)),
        oral_contrast=bool(rng.uniform() < 0.3), pad_value=-2048 if index % 3 == 2 else -1024)


# ====================================================================== the generator
def _resolve_suite(suite: str | PhantomSpec) -> PhantomSpec:
    if isinstance(suite, PhantomSpec):
        spec = suite
    else:
        if suite not in SUITES:
            raise ConfigError(f"unknown phantom suite {suite!r}; known: {', '.join(SUITES)}")
        spec = SUITES[suite]
    spec.validate()
    return spec


def _leaf_of_tissue(spec: PhantomSpec) -> tuple[int, ...]:
    ids = {name: i + 1 for i, (name, _) in enumerate(spec.classes)}
    return tuple(ids.get(structure or "", 0) for _, structure, *_r in _TISSUE_TABLE)


def _local_lut(spec: PhantomSpec, training: TrainingSetSpec) -> tuple[int, ...]:
    from unionseg.labels import LabelSpace, Leaf

    space = LabelSpace([Leaf(n, p) for n, p in spec.classes])
    lut = [0] * space.n_leaves
    for value, key in training.labels:
        for leaf in space.leaves_of(key):
            lut[leaf] = value
    return tuple(lut)


def _project_dict(spec: PhantomSpec, size: SizeSpec, seed: int) -> dict[str, Any]:
    leaves = [name for name, _ in spec.classes]
    datasets: list[dict[str, Any]] = []
    for t in spec.training_sets:
        datasets.append({"name": t.name, "root": f"datasets/{t.name}", "layout": "msd",
                         "labels": {v: k for v, k in t.labels}, "annotated": list(t.annotated),
                         "split": {"val_fraction": 0.2, "seed": seed}, "oracle_labels": "fullTr"})
    for role in ("val", "test"):
        datasets.append({"name": role, "root": f"datasets/{role}", "layout": "msd", "role": role,
                         "labels": {i + 1: n for i, n in enumerate(leaves)}, "annotated": list(leaves)})
    return {
        "name": f"phantom-{spec.name}-{size.name}",
        "generator_version": GENERATOR_VERSION,
        "notes": f"made by unionseg phantom DIR --size {size.name} --seed {seed} --suite {spec.name} (DIR: this "
                 "file's folder)",
        "classes": [name if parent is None else {"name": name, "part_of": parent} for name, parent in spec.classes],
        "datasets": datasets,
        "preprocessing": {"spacing": list(size.preprocess_spacing), "window": [-325.0, 325.0]},
    }


def _dataset_json(name: str, labels: Mapping[int, str], cases: Sequence[str], site: Optional[str],
                  description: str) -> dict[str, Any]:
    return {
        "name": name, "description": description, "tensorImageSize": "3D", "reference": "unionseg phantom",
        "licence": "CC0", "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(v): k.split(":")[-1] for v, k in sorted(labels.items())}},
        "numTraining": len(cases), "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [], "generator_version": GENERATOR_VERSION, **({"site": site} if site else {}),
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _prepare_out(out: Path) -> None:
    """Refuse a folder the phantom would clobber: a file, an unrelated non-empty folder, or an earlier
    phantom holding user files among the generated ones (a dataset folder it did not write, an edited
    project file)."""
    if out.exists() and not out.is_dir():
        raise UnionsegError("exists and is not a folder", out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "generator.json").is_file():
        raise UnionsegError("folder is not empty and holds no earlier phantom (generator.json); "
                            "choose an empty or new folder", out)
    try:
        old = json.loads((out / "generator.json").read_text(encoding="utf-8"))
        written = {t["name"] for t in old["spec"]["training_sets"]} | {"val", "test"}
    except (OSError, ValueError, KeyError, TypeError):
        raise UnionsegError("unreadable generator.json: not a phantom this version can replace; choose an empty "
                            "or new folder", out) from None
    datasets = out / "datasets"
    foreign = sorted(p.name for p in datasets.iterdir() if p.name not in written) if datasets.is_dir() else []
    if foreign:
        raise UnionsegError(f"datasets/ holds {listing(foreign)}, which the phantom did not write; move "
                            f"{'it' if len(foreign) == 1 else 'them'} out or choose another folder (nothing was "
                            "changed)", datasets)
    recorded = old.get("project_sha256")
    project = out / "project.yaml"
    if recorded and project.is_file() and hashlib.sha256(project.read_bytes()).hexdigest() != recorded:
        raise UnionsegError("project.yaml was edited since the phantom wrote it; move it away (or keep your copy "
                            "elsewhere) before generating again (nothing was changed)", project)


def generate_phantom(out: Path | str, size: str = "tiny", seed: int = 0, suite: str | PhantomSpec = "default",
                     workers: Optional[int] = None, cases: Optional[tuple[int, int, int]] = None,
                     progress: bool = False) -> Path:
    """Write a phantom project (training sets, val, test, hidden full truth, project file) under ``out``.

    Args:
        out: output folder; new, empty, or an earlier phantom (its generated files are replaced).
        size: ``tiny`` (tests, seconds), ``standard`` (CPU benchmark) or ``large`` (512 x 512, GPU).
        seed: everything is a pure function of (seed, size, suite, :data:`GENERATOR_VERSION`).
        suite: a name in :data:`SUITES` or a :class:`PhantomSpec`.
        workers: processes (default: the size's, capped by the CPU count); the output does not depend on it.
        cases: override the size's ``(training cases per set, val cases, test cases)`` (tests use it).
        progress: show a progress bar over the cases (timed lines off a terminal), on stderr.

    Returns:
        The path of ``out/project.yaml``.

    Raises:
        ConfigError: unknown size or suite, invalid spec. UnionsegError: ``out`` is an unrelated folder; a
            worker died; called while a worker process imports the calling script (a script must call it
            under ``if __name__ == "__main__":``).
    """
    from unionseg.config import dump_yaml

    refuse_in_starting_worker("generate_phantom")  # before its folders: a worker would write them again
    if size not in SIZES:
        raise ConfigError(f"unknown phantom size {size!r}; known: {', '.join(SIZES)}")
    size_spec = SIZES[size]
    if cases is not None:
        if len(cases) != 3 or min(cases) < 1:
            raise ConfigError(f"cases must be (train per set, val, test), each >= 1, got {cases!r}")
        size_spec = replace(size_spec, n_train=int(cases[0]), n_val=int(cases[1]), n_test=int(cases[2]))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"--workers must be an integer >= 0 (0 or 1: one process), got {workers!r}")  # -1 ran
    spec = _resolve_suite(suite)
    out = Path(out).resolve()
    _prepare_out(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        leaf_of_tissue = _leaf_of_tissue(spec)
        names = [n for n, _ in spec.classes]
        tumour_organs = tuple(TUMOURS[n] for n in names if n in TUMOURS)
        sites = [_site_params(t.name, i, seed, size_spec) for i, t in enumerate(spec.training_sets)]
        tasks: list[_CaseTask] = []
        for t, site in zip(spec.training_sets, sites, strict=True):
            lut = _local_lut(spec, t)
            for i in range(size_spec.n_train):
                tasks.append(_CaseTask(seed, t.name, i, f"{t.name}_{i:03d}", site, size_spec, leaf_of_tissue, lut,
                                       tumour_organs, str(partial / "datasets" / t.name)))
        for role, n, shift in (("val", size_spec.n_val, 0), ("test", size_spec.n_test, 1)):
            for i in range(n):
                site = sites[(i + shift) % len(sites)]
                tasks.append(_CaseTask(seed, role, i, f"{role}_{i:03d}", site, size_spec, leaf_of_tissue, None,
                                       tumour_organs, str(partial / "datasets" / role)))
        n_workers = workers if workers is not None else min(size_spec.workers, os.cpu_count() or 1)
        records = _run_tasks(tasks, max(1, n_workers), progress)

        by_set: dict[str, list[dict[str, Any]]] = {}
        for rec in records:
            by_set.setdefault(rec["dataset"], []).append(rec)
        for t, site in zip(spec.training_sets, sites, strict=True):
            case_ids = [r["case"] for r in by_set[t.name]]
            _write_json(partial / "datasets" / t.name / "dataset.json",
                        _dataset_json(t.name, dict(t.labels), case_ids, site.name,
                                      f"phantom training set {t.name!r}: annotates {', '.join(t.annotated)}; "
                                      "other organs are present and labelled 0; fullTr/ holds the full truth "
                                      "in global leaf ids"))
        all_labels = {i + 1: n for i, n in enumerate(names)}
        for role in ("val", "test"):
            case_ids = [r["case"] for r in by_set.get(role, [])]
            _write_json(partial / "datasets" / role / "dataset.json",
                        _dataset_json(role, all_labels, case_ids, None,
                                      f"phantom {role} set: fully labelled, global leaf ids"))
        generator = {
            "generator_version": GENERATOR_VERSION, "seed": seed, "size": size, "suite": spec.name,
            "spec": asdict(spec), "size_spec": asdict(size_spec),
            "classes": ["background", *names],
            "sites": {s.name: asdict(s) for s in sites},
            "cases": records,
        }
        dump_yaml(_project_dict(spec, size_spec, seed), partial / "project.yaml")
        # so that a later run can tell an edited project file from its own
        generator["project_sha256"] = hashlib.sha256((partial / "project.yaml").read_bytes()).hexdigest()
        _write_json(partial / "generator.json", generator)
        # move into place: replace only what the generator writes
        out.mkdir(parents=True, exist_ok=True)
        for generated in ("datasets", "certificate.json"):
            target = out / generated
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for path in sorted(partial.iterdir()):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out / "project.yaml"


def _run_tasks(tasks: Sequence[_CaseTask], workers: int, progress: bool = False) -> list[dict[str, Any]]:
    def shown(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        if not progress:
            return list(records)
        from unionseg.progress import track

        return list(track(records, "phantom cases", total=len(tasks)))

    if workers <= 1 or len(tasks) <= 1:
        return shown(_make_case(t) for t in tasks)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: the caller may already run torch/OpenMP threads, which a forked child can inherit locked
    with worker_report():
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                return shown(pool.map(_make_case, tasks, chunksize=1))  # in order, as each case is made
        except BrokenProcessPool as exc:  # its cause, where the pool gives one, stays attached
            raise worker_died("the phantom's cases were being made") from exc


# ====================================================================== difficulty certificate
def _best_interval(liver: np.ndarray, spleen: np.ndarray, lo: float = -200.0, hi: float = 400.0,
                   width: float = 2.0) -> dict[str, Any]:
    """Best single HU interval classifying liver ∪ spleen voxels as liver (inside) or spleen (outside).

    Returns the interval maximising the mean of the liver and spleen Dice (balanced: an interval that
    calls everything liver scores below 0.5 however large the liver is), its two Dice, and the best
    liver-only Dice with the trivial everything-is-liver value for comparison.
    """
    edges = np.arange(lo, hi + width, width)
    bins = len(edges) + 1
    hl = np.bincount(np.searchsorted(edges, liver, "right"), minlength=bins).astype(np.float64)
    hs = np.bincount(np.searchsorted(edges, spleen, "right"), minlength=bins).astype(np.float64)
    cl, cs = np.concatenate([[0], np.cumsum(hl)]), np.concatenate([[0], np.cumsum(hs)])
    n_l, n_s = cl[-1], cs[-1]
    i = np.arange(bins)[:, None]
    j = np.arange(bins)[None, :]
    valid = j >= i
    tp = np.where(valid, cl[j + 1] - cl[i], 0.0)
    fp = np.where(valid, cs[j + 1] - cs[i], 0.0)
    dice_l = 2 * tp / np.maximum(tp + fp + n_l, 1)
    dice_s = 2 * (n_s - fp) / np.maximum((n_s - fp) + (n_l - tp) + n_s, 1)
    mean = np.where(valid, (dice_l + dice_s) / 2, -1.0)
    a, b = np.unravel_index(int(np.argmax(mean)), mean.shape)
    bound = np.concatenate([[-np.inf], edges, [np.inf]])
    return {"interval_hu": [float(bound[a]), float(bound[b + 1])], "mean_dice": round(float(mean[a, b]), 4),
            "dice_liver": round(float(dice_l[a, b]), 4), "dice_spleen": round(float(dice_s[a, b]), 4),
            "best_liver_only_dice": round(float(np.where(valid, dice_l, 0).max()), 4),
            "trivial_liver_dice": round(float(2 * n_l / max(2 * n_l + n_s, 1)), 4)}


CERTIFICATE_LIMIT = 0.7
"""The best single-interval liver/spleen mean Dice of every site must stay below this."""


def difficulty_report(out: Path | str) -> dict[str, Any]:
    """Measure how hard the phantom is; writes ``out/certificate.json`` and returns it.

    Per site (training sets and the val/test cases acquired with that site's protocol) and per leaf: HU
    mean and sd over all voxels, mean volume (ml) over the cases that contain it. Liver vs spleen: the
    best single HU interval (oracle-tuned per site, and per case) separating the two organs' voxels.

    Raises:
        UnionsegError: ``out`` holds no phantom.
    """
    from unionseg.data.io import read_image

    out = Path(out)
    gen_path = out / "generator.json"
    if not gen_path.is_file():
        raise UnionsegError("no generator.json: not a phantom folder", out)
    gen = json.loads(gen_path.read_text(encoding="utf-8"))
    classes: list[str] = gen["classes"]
    train_sets = {t["name"] for t in gen["spec"]["training_sets"]}
    liver_id = classes.index("liver") if "liver" in classes else None
    spleen_id = classes.index("spleen") if "spleen" in classes else None
    sums: dict[str, dict[int, list[float]]] = {}        # site -> leaf -> [n, sum, sumsq, volume_sum, n_cases]
    pooled: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    per_case: list[dict[str, Any]] = []
    for rec in gen["cases"]:
        folder = out / "datasets" / rec["dataset"]
        name = f"{rec['case']}.nii.gz"
        image, geom = read_image(folder / "imagesTr" / name)
        truth, _ = read_image(folder / ("fullTr" if rec["dataset"] in train_sets else "labelsTr") / name)
        voxel_ml = float(np.prod(geom.spacing)) / 1000.0
        site = rec["site"]
        flat_l = truth.ravel()
        flat_i = image.ravel().astype(np.float64)
        order = np.argsort(flat_l, kind="stable")
        bounds = np.searchsorted(flat_l[order], np.arange(len(classes) + 1))
        acc = sums.setdefault(site, {})
        for leaf in range(1, len(classes)):
            vals = flat_i[order[bounds[leaf]:bounds[leaf + 1]]]
            if not len(vals):
                continue
            a = acc.setdefault(leaf, [0.0, 0.0, 0.0, 0.0, 0.0])
            a[0] += len(vals)
            a[1] += float(vals.sum())
            a[2] += float((vals * vals).sum())
            a[3] += len(vals) * voxel_ml
            a[4] += 1
        if liver_id is not None and spleen_id is not None:
            lv = flat_i[order[bounds[liver_id]:bounds[liver_id + 1]]]
            sv = flat_i[order[bounds[spleen_id]:bounds[spleen_id + 1]]]
            if len(lv) and len(sv):
                pl, ps = pooled.setdefault(site, ([], []))
                pl.append(lv)
                ps.append(sv)
                best = _best_interval(lv, sv)
                per_case.append({"case": rec["case"], "site": site, "mean_dice": best["mean_dice"]})
    sites: dict[str, Any] = {}
    for site, acc in sums.items():
        organs = {}
        for leaf, (n, s, ss, vol, n_cases) in sorted(acc.items()):
            mean = s / n
            organs[classes[leaf]] = {"hu_mean": round(mean, 2), "hu_sd": round(math.sqrt(max(ss / n - mean**2, 0)), 2),
                                     "volume_ml": round(vol / n_cases, 2), "cases": int(n_cases)}
        entry: dict[str, Any] = {"protocol": gen["sites"].get(site, {}), "organs": organs}
        if site in pooled:
            entry["liver_vs_spleen"] = _best_interval(np.concatenate(pooled[site][0]),
                                                      np.concatenate(pooled[site][1]))
        sites[site] = entry
    site_values = [s["liver_vs_spleen"]["mean_dice"] for s in sites.values() if "liver_vs_spleen" in s]
    cert: dict[str, Any] = {
        "generator_version": gen["generator_version"], "seed": gen["seed"], "size": gen["size"],
        "suite": gen["suite"], "sites": sites,
        "liver_vs_spleen": {
            "measure": "best single HU interval (inside = liver, outside = spleen) on liver ∪ spleen voxels, "
                       "tuned per site with the truth; mean of liver and spleen Dice",
            "worst_site_mean_dice": round(max(site_values), 4) if site_values else None,
            "per_case_mean_dice": {"mean": round(float(np.mean([c["mean_dice"] for c in per_case])), 4),
                                   "max": round(float(np.max([c["mean_dice"] for c in per_case])), 4)}
            if per_case else None,
            "limit": CERTIFICATE_LIMIT,
            "passes": bool(site_values) and max(site_values) < CERTIFICATE_LIMIT,
        },
    }
    _write_json(out / "certificate.json", cert)
    return cert


def print_certificate(cert: Mapping[str, Any]) -> None:
    """The certificate as rich tables."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    for site, entry in cert["sites"].items():
        proto = entry.get("protocol", {})
        sp = proto.get("spacing", [])
        title = (f"site {site}: {proto.get('phase', '?')} phase, {proto.get('orientation', '?')}, spacing "
                 f"{' x '.join(f'{s:g}' for s in sp)} mm, noise {proto.get('noise_sd', '?')} HU")
        table = Table(title=title)
        for col in ("leaf", "HU mean", "HU sd", "volume (ml)", "cases"):
            table.add_column(col, justify="right" if col != "leaf" else "left")
        for organ, st in entry["organs"].items():
            table.add_row(organ, f"{st['hu_mean']:.1f}", f"{st['hu_sd']:.1f}", f"{st['volume_ml']:.1f}",
                          str(st["cases"]))
        console.print(table)
        ls = entry.get("liver_vs_spleen")
        if ls:
            console.print(f"  liver vs spleen, best HU interval {ls['interval_hu']}: mean Dice {ls['mean_dice']:.3f} "
                          f"(liver {ls['dice_liver']:.3f}, spleen {ls['dice_spleen']:.3f}); liver-only best "
                          f"{ls['best_liver_only_dice']:.3f} vs trivial {ls['trivial_liver_dice']:.3f}")
    summary = cert["liver_vs_spleen"]
    verdict = "[green]passes[/green]" if summary["passes"] else "[red]FAILS[/red]"
    console.print(f"worst-site liver/spleen interval mean Dice {summary['worst_site_mean_dice']} "
                  f"(limit < {summary['limit']}): {verdict}; per case: {summary['per_case_mean_dice']}")


# ====================================================================== montage
def save_montage(out: Path | str, png: Path | str) -> Path:
    """One axial and one coronal slice of the first case of every training site, with label contours.

    Radiological display: patient right on the image left, anterior up. Needs matplotlib; drawn on an Agg
    canvas of its own, so the caller's backend (a notebook's inline plots) is left as it is. ``png``: the
    file (``.png`` added when it has no suffix; relative to the working folder, not to ``out``), or an
    existing folder to hold ``montage.png``; returns the file written.
    """
    from matplotlib.lines import Line2D

    from unionseg.evaluation.figures import AggPlots

    plt = AggPlots()

    from unionseg.data.io import read_image, reorient_to_ras

    out, png = Path(out), Path(png)
    gen = json.loads((out / "generator.json").read_text(encoding="utf-8"))
    classes = gen["classes"]
    sets = [t["name"] for t in gen["spec"]["training_sets"]]
    palette = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#17becf", "#e377c2", "#bcbd22", "#1f77b4", "#8c564b")

    def colours(i: int) -> str:
        return palette[(i - 1) % len(palette)]

    fig, axes = plt.subplots(2, len(sets), figsize=(4.2 * len(sets), 8.4), squeeze=False)
    for col, name in enumerate(sets):
        image, geom = reorient_to_ras(*read_image(out / "datasets" / name / "imagesTr" / f"{name}_000.nii.gz"))
        truth, _ = reorient_to_ras(*read_image(out / "datasets" / name / "fullTr" / f"{name}_000.nii.gz"))
        proto = gen["sites"][name]
        per_slice = [(len(np.unique(truth[:, :, k])), int((truth[:, :, k] > 0).sum())) for k in range(truth.shape[2])]
        k = max(range(truth.shape[2]), key=lambda i: per_slice[i])
        j = int(np.argmax((truth > 0).sum(axis=(0, 2))))
        views = ((image[:, :, k].T[::-1, ::-1], truth[:, :, k].T[::-1, ::-1], geom.spacing[1] / geom.spacing[0]),
                 (image[:, j, :].T[::-1, ::-1], truth[:, j, :].T[::-1, ::-1], geom.spacing[2] / geom.spacing[0]))
        for row, (img, lab, aspect) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(np.clip(img, -1024, 3071), cmap="gray", vmin=-160, vmax=240, aspect=aspect,
                      interpolation="nearest")
            for leaf in range(1, len(classes)):
                if (lab == leaf).any():
                    ax.contour(lab == leaf, levels=[0.5], colors=[colours(leaf)], linewidths=0.9)
            ax.set_axis_off()
        axes[0, col].set_title(f"{name}: {proto['phase']}, {proto['orientation']} on disk\n"
                               f"{proto['spacing'][0]:.2f} x {proto['spacing'][1]:.2f} x "
                               f"{proto['spacing'][2]:.2f} mm", fontsize=9)
    handles = [Line2D([0], [0], color=colours(i), lw=2) for i in range(1, len(classes))]
    fig.legend(handles, classes[1:], loc="lower center", ncol=len(classes) - 1, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    png = png / "montage.png" if png.is_dir() else png if png.suffix else png.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


# ====================================================================== CLI
def register(app: typer.Typer) -> None:
    """Add ``unionseg phantom`` to the CLI."""

    @app.command("phantom")
    def phantom_command(
        out: Annotated[Optional[Path], typer.Argument(help="Output folder (new, empty, or an earlier phantom, whose "
                                                 "generated files are replaced); or -o OUT.", show_default=False)] = None,
        out_option: Annotated[Optional[Path], typer.Option("--out", "-o", "--output", help="The output folder, "
                                                           "as OUT.", metavar="OUT")] = None,
        size: Annotated[str, typer.Option("--size", help=f"One of: {', '.join(SIZES)}.")] = "tiny",
        seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
        suite: Annotated[str, typer.Option("--suite", help=f"Dataset suite: {', '.join(SUITES)}.")] = "default",
        report: Annotated[bool, typer.Option("--report", help="Measure and print the difficulty certificate (also written "
                                                "to OUT/certificate.json).", metavar="")]
        = False,
        workers: Annotated[Optional[int], typer.Option("--workers", "-j", help="Processes (default: by size).")] = None,
        montage: Annotated[Optional[Path], typer.Option("--montage", help="Also save a PNG montage to this file (.png added "
                                                  "when it has none; an existing folder gets montage.png).")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.", metavar="")] = False,
    ) -> None:
        """Write a synthetic abdominal CT project: partially labelled training sets, val, test, project file."""
        from unionseg.cli import one_out

        out = one_out(out, out_option)
        start = time.perf_counter()
        project = generate_phantom(out, size=size, seed=seed, suite=suite, workers=workers, progress=not quiet)
        spec = SIZES[size]
        typer.echo(f"phantom {GENERATOR_VERSION} ({size}, seed {seed}, suite {suite}) written in "
                   f"{time.perf_counter() - start:.1f} s: {spec.n_train} cases per training set, "
                   f"{spec.n_val} val, {spec.n_test} test")
        typer.echo(f"project file: {project}")
        if montage is not None:
            typer.echo(f"montage: {save_montage(out, montage)}")
        if report:
            cert = difficulty_report(out)
            print_certificate(cert)
            typer.echo(f"certificate: {Path(out) / 'certificate.json'}")


__all__: list[str] = [
    "CERTIFICATE_LIMIT", "GENERATOR_VERSION", "PhantomSpec", "SIZES", "STRUCTURES", "SUITES", "SiteParams",
    "SizeSpec", "TUMOURS", "TrainingSetSpec", "difficulty_report", "generate_phantom", "print_certificate",
    "register", "save_montage",
]
