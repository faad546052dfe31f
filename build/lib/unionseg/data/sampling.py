"""Patch sampler: dataset balance, foreground oversampling per annotated class, aligned extras, augmentation.

:class:`PatchSampler` is a map-style torch ``Dataset`` indexed by the training STEP: ``sampler[step]``
returns one whole collated batch. Every random choice of batch slot ``slot`` at step ``step`` comes from
``np.random.default_rng([seed, step, slot])`` and nothing else, so a run resumed at step k draws exactly the
patches it would have drawn, whatever the number of loader workers (DESIGN contract 7 and the checkpoint
contract of STYLE example 6).

One sample is drawn in four steps:

1. **Dataset, then case.** With ``balance_datasets`` the slots cycle over the training datasets (a seeded
   permutation per cycle of ``D`` consecutive slots, counted over ``step * B + slot``), so every dataset
   gets the same share of patches whatever its size; then a case of that dataset is drawn uniformly.
   ``dataset_weights`` (positive integers, default 1, divided by their gcd) put dataset ``d`` ``w_d`` times
   in every cycle of ``sum(w)`` slots, so its share is exactly ``w_d / sum(w)`` of every cycle.
   Without it, a case is drawn uniformly from all cases (datasets weighted by their size).
2. **Centre.** With probability ``fg_prob`` the patch is centred on a random voxel of one of the case's
   ANNOTATED foreground classes present in it (leaf ids ``1..L-1`` whose annotated flag is set, and region
   codes ``>= L``, which a dataset can only store for regions it annotates, see ``labels.LabelSpace``),
   the class drawn uniformly, the voxel uniformly from a cached, seeded subsample of at most
   ``max_locations`` flat indices of that class. Otherwise (and for cases without annotated foreground)
   the centre is a uniform random voxel. Location lists and the image minimum are computed lazily per
   case by chunked scans (memmaps are never loaded whole) and cached per process; call
   :meth:`PatchSampler.precompute` before starting forked workers to share one scan.
3. **Spatial transform**, the SAME for image, label and every extra: crop a box of ``round(patch * s)``
   voxels centred on the centre voxel (``s`` = 1, or the scaling factor), padding outside the volume;
   resample it to the patch size (``torch.nn.functional.interpolate``: ``trilinear`` for the image and
   probability extras, ``nearest-exact`` for the label and label extras; both with ``align_corners=False``,
   so the nearest sample is the voxel closest to the trilinear sample point); then an in-plane ``rot90``
   (axes X, Y; only k = 2 when the patch is not square in-plane) and per-axis flips.
4. **Intensity** (image only): multiplicative scale, additive shift (normalised intensity units), then
   Gaussian noise with a standard deviation drawn from ``U(0, noise_std)``.

Padding outside the volume: the image with ``image_pad_value`` (default: the case's minimum intensity,
i.e. air after CT clipping), the label and label extras with 0 (background / not annotated), probability
extras with a background distribution: channel 0 = 1 and the other channels 0 for extras with >= 2
channels (channel 0 is background, as in teacher softmax outputs), 0 for single-channel extras.

MONAI's random intensity transforms draw from their own ``RandomState``; keeping one generator per
(seed, step, slot) is simpler and exact with three lines of numpy, so the intensity operations are
written out here. Resampling uses ``torch.nn.functional.interpolate`` (one call for all linear channels,
one for all label-like ones); crops, ``rot90`` and flips are numpy views that are copied once, straight
into the preallocated batch tensors (in shared memory inside loader workers, so handing a batch to the
training process copies nothing more). Torch is imported lazily: importing this module (for
:class:`AugmentSpec` in a config, say) stays cheap.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from unionseg.errors import DataError

if TYPE_CHECKING:
    import torch

ExtraKind = Literal["label", "prob"]
"""How an aligned extra is resampled: ``label`` (integer codes, nearest) or ``prob`` (floats, linear)."""

Batch = dict[str, Any]
"""A collated batch: see :class:`PatchSampler` for the keys and shapes."""

RESERVED_KEYS = frozenset({"image", "label", "annotated", "dataset_id", "case_id"})
_EXTRA_KINDS = ("label", "prob")
_SCAN_VOXELS = 1 << 23  # voxels per chunk in the lazy scans of memmapped volumes
_DATASET_CYCLE_TAG = 0x5A3B11CE  # separates the dataset-permutation streams from the (step, slot) ones


@dataclass(eq=False)
class SamplerCase:
    """One training case as the sampler sees it (no dependency on the prepare module).

    Args:
        dataset_index: which training dataset (task id) the case belongs to; becomes ``dataset_id``.
        annotated: (L,) bool annotated-leaf mask of its dataset (``LabelSpace.annotated_leaf_mask``).
        image: (X, Y, Z) float image, e.g. a ``np.load(..., mmap_mode="r")`` memmap.
        label: (X, Y, Z) integer label codes (leaf ids ``0..L-1``, region codes ``>= L``).
        extras: aligned extra volumes, (X, Y, Z) or (C, X, Y, Z), e.g. ``"pseudo"`` (uint8 codes) or
            ``"teacher_0"`` (float16 probabilities); only those named in the sampler's ``extra_kinds``
            are read.
        case_id: a name for batches and error messages.
    """

    dataset_index: int
    annotated: np.ndarray
    image: np.ndarray
    label: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    case_id: str = ""

    def __getstate__(self) -> dict[str, Any]:
        # Memmaps travel to spawned workers as file references, not as copies of the whole volume.
        state = dict(self.__dict__)
        state["image"] = _freeze_array(self.image)
        state["label"] = _freeze_array(self.label)
        state["extras"] = {k: _freeze_array(v) for k, v in self.extras.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["image"] = _thaw_array(state["image"])
        state["label"] = _thaw_array(state["label"])
        state["extras"] = {k: _thaw_array(v) for k, v in state["extras"].items()}
        self.__dict__.update(state)


@dataclass(frozen=True)
class _MemmapRef:
    filename: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    order: str
    mode: str


def _freeze_array(arr: Any) -> Any:
    """A root memmap (not a view of one) -> a reference that reopens the file; anything else unchanged."""
    if isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.filename:
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        mode = "r+" if arr.mode in ("r+", "w+") else arr.mode
        return _MemmapRef(str(arr.filename), arr.dtype.str, tuple(arr.shape), int(arr.offset), order, mode)
    return arr


def _thaw_array(obj: Any) -> Any:
    if isinstance(obj, _MemmapRef):
        return np.memmap(obj.filename, dtype=np.dtype(obj.dtype), mode=obj.mode, offset=obj.offset,
                         shape=obj.shape, order=obj.order)  # type: ignore[call-overload]
    return obj


@dataclass(frozen=True)
class AugmentSpec:
    """Augmentation probabilities and ranges (nnU-Net-like defaults, lighter for small CPU runs).

    Args:
        enabled: master switch; False gives plain crops (no spatial or intensity change).
        flip_prob: per-axis (X, Y, Z) probability of a flip.
        rot90_prob: probability of an in-plane (X-Y) rotation by k * 90 degrees, k uniform in {1, 2, 3}
            (only k = 2 when the patch is not square in-plane).
        scale_prob: probability of isotropic scaling; ``scale_range`` bounds the factor of the CROPPED box
            relative to the patch (1.25 crops 25 % more voxels per axis, so anatomy looks smaller).
        intensity_scale_prob, intensity_scale_range: multiplicative intensity factor.
        intensity_shift_prob, intensity_shift_range: additive offset, in normalised intensity units.
        noise_prob, noise_std: additive Gaussian noise, its standard deviation drawn from U(0, noise_std).
        histogram_shift_prob, histogram_shift_points: a random monotone, piecewise-linear remap of the patch's
            intensity range (MONAI ``RandHistogramShift`` with that many control points; fewer points, larger
            shifts). It changes the contrast between tissues, which a global scale and shift cannot, but keeps
            their order. Off (0) by default.
        structure_shift_prob, structure_shift_range, structure_shift_sigma: label-aware intensity shift: with
            this probability per patch, every labelled structure in the patch (each non-zero label code; the
            unannotated rest of the image is untouched) gets its own additive offset from the range, in
            normalised units, through its mask blurred with a Gaussian of ``sigma`` voxels (no artificial
            edge at the label's border). Meant for partially labelled data from different sites: an organ
            whose labels come from one contrast phase only is shown at other brightnesses. Off by default.

    Raises:
        ValueError: a probability outside [0, 1], an empty or reversed range, a non-positive scale.
    """

    enabled: bool = True
    flip_prob: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rot90_prob: float = 0.5
    scale_prob: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.25)
    intensity_scale_prob: float = 0.15
    intensity_scale_range: tuple[float, float] = (0.75, 1.25)
    intensity_shift_prob: float = 0.15
    intensity_shift_range: tuple[float, float] = (-0.1, 0.1)
    noise_prob: float = 0.1
    noise_std: float = 0.1
    histogram_shift_prob: float = 0.0
    histogram_shift_points: int = 10
    structure_shift_prob: float = 0.0
    structure_shift_range: tuple[float, float] = (-0.5, 0.5)
    structure_shift_sigma: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "flip_prob", tuple(float(p) for p in self.flip_prob))
        if len(self.flip_prob) != 3:
            raise ValueError(f"flip_prob needs one probability per axis (3), got {self.flip_prob}")
        probs = {"rot90_prob": self.rot90_prob, "scale_prob": self.scale_prob,
                 "intensity_scale_prob": self.intensity_scale_prob,
                 "intensity_shift_prob": self.intensity_shift_prob, "noise_prob": self.noise_prob,
                 "histogram_shift_prob": self.histogram_shift_prob,
                 "structure_shift_prob": self.structure_shift_prob}
        probs.update({f"flip_prob[{i}]": p for i, p in enumerate(self.flip_prob)})
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{name} must lie in [0, 1], got {p}")
        for name in ("scale_range", "intensity_scale_range", "intensity_shift_range", "structure_shift_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"augment.{name} must be (low, high) with low <= high, got {(lo, hi)}")
            object.__setattr__(self, name, (float(lo), float(hi)))
        if self.scale_range[0] <= 0:
            raise ValueError(f"augment.scale_range must be positive, got {self.scale_range}")
        if self.noise_std < 0:
            raise ValueError(f"augment.noise_std must be >= 0, got {self.noise_std}")
        if self.structure_shift_sigma < 0:
            raise ValueError(f"augment.structure_shift_sigma must be >= 0, got {self.structure_shift_sigma}")
        if isinstance(self.histogram_shift_points, bool) or not isinstance(self.histogram_shift_points, int) \
                or self.histogram_shift_points < 3:
            raise ValueError(f"augment.histogram_shift_points must be an integer >= 3, got {self.histogram_shift_points}")

    @classmethod
    def off(cls) -> AugmentSpec:
        """No augmentation."""
        return cls(enabled=False)


def cases_per_dataset(cases: Sequence[SamplerCase]) -> dict[int, list[int]]:
    """Dataset index -> indices (into ``cases``) of its cases, datasets in increasing index order."""
    out: dict[int, list[int]] = {}
    for i, case in enumerate(cases):
        out.setdefault(int(case.dataset_index), []).append(i)
    return dict(sorted(out.items()))


class PatchSampler:
    """Map-style dataset of whole batches indexed by training step (see the module docstring).

    It implements the map-style ``torch.utils.data.Dataset`` protocol (``__getitem__``) without
    subclassing it, so that importing this module (e.g. for :class:`AugmentSpec` in a config) does not
    import torch.

    ``sampler[step]`` returns::

        {"image": (B, 1, X, Y, Z) float32, "label": (B, X, Y, Z) int64 codes, "annotated": (B, L) bool,
         "dataset_id": (B,) int64, "<label extra>": (B, X, Y, Z) int64,
         "<prob extra>": (B, C, X, Y, Z) float32 (C = 1 for (X, Y, Z) extras), "case_id": list[str]}

    where (X, Y, Z) is the patch size.

    Args:
        cases: the training cases (all datasets together).
        patch_size: (X, Y, Z) patch size, or one int for a cube.
        batch_size: B, samples per step.
        n_leaves: L, length of every case's annotated mask.
        seed: non-negative seed; with (step, slot) it alone determines every draw.
        fg_prob: probability of centring a patch on an annotated foreground voxel.
        augment: augmentation settings.
        extra_kinds: extras to read from every case and how to resample them (``"label"`` or ``"prob"``).
        balance_datasets: equal share of patches per dataset (else per case).
        dataset_weights: dataset index -> positive integer weight (missing: 1); with ``balance_datasets``
            dataset d gets ``w_d / sum(w)`` of the patches.
        image_pad_value: image value outside the volume; None uses each case's minimum.
        max_locations: foreground voxels cached per (case, class); a seeded subsample beyond that.

    Raises:
        ValueError: invalid sizes or probabilities, unknown extra kinds, reserved extra names.
        DataError: a case whose arrays disagree in shape, lacks a requested extra, or whose annotated
            mask has the wrong length.
    """

    def __init__(
        self,
        cases: Sequence[SamplerCase],
        patch_size: int | Sequence[int],
        batch_size: int,
        n_leaves: int,
        seed: int = 0,
        fg_prob: float = 0.67,
        augment: AugmentSpec = AugmentSpec(),
        extra_kinds: Mapping[str, ExtraKind] | None = None,
        balance_datasets: bool = True,
        image_pad_value: float | None = None,
        max_locations: int = 10_000,
        dataset_weights: Mapping[int, int] | None = None,
    ) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        size = (int(patch_size),) * 3 if isinstance(patch_size, (int, np.integer)) else tuple(
            int(p) for p in patch_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n_leaves < 1:
            raise ValueError(f"n_leaves must be >= 1, got {n_leaves}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= fg_prob <= 1.0:
            raise ValueError(f"fg_prob must lie in [0, 1], got {fg_prob}")
        if max_locations < 1:
            raise ValueError(f"max_locations must be >= 1, got {max_locations}")
        kinds = dict(extra_kinds or {})
        for name, kind in kinds.items():
            if kind not in _EXTRA_KINDS:
                raise ValueError(f"extra {name!r}: kind must be one of {_EXTRA_KINDS}, got {kind!r}")
            if name in RESERVED_KEYS:
                raise ValueError(f"extra name {name!r} is reserved for the batch ({sorted(RESERVED_KEYS)})")
        self.cases: list[SamplerCase] = list(cases)
        self.patch_size: tuple[int, int, int] = size  # type: ignore[assignment]
        self.batch_size = int(batch_size)
        self.n_leaves = int(n_leaves)
        self.seed = int(seed)
        self.fg_prob = float(fg_prob)
        self.augment = augment
        self.extra_kinds: dict[str, ExtraKind] = kinds
        self.balance_datasets = bool(balance_datasets)
        self.image_pad_value = image_pad_value
        self.max_locations = int(max_locations)
        self.extra_channels: dict[str, int] = {}
        for i, case in enumerate(self.cases):
            self._check_case(i, case)
        self.by_dataset = cases_per_dataset(self.cases)
        self.dataset_indices: list[int] = list(self.by_dataset)
        weights = dict(dataset_weights or {})
        unknown = sorted(set(weights) - set(self.dataset_indices))
        if unknown:
            raise ValueError(f"dataset_weights: no training case has dataset index {unknown[0]} "
                             f"(indices present: {self.dataset_indices})")
        bad = [(d, w) for d, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1]
        if bad:
            raise ValueError(f"dataset_weights: dataset {bad[0][0]} has weight {bad[0][1]!r}; weights are integers >= 1")
        if weights and not balance_datasets:
            raise ValueError("dataset_weights needs balance_datasets (without it cases are drawn uniformly)")
        # one cycle of slots: dataset d appears w_d / g times (permuted per cycle in choose_case); dividing by the
        # gcd g makes weights that are all equal draw exactly like no weights
        counts = [int(weights.get(d, 1)) for d in self.dataset_indices]
        g = math.gcd(*counts)
        self._cycle = np.asarray([d for d, c in zip(self.dataset_indices, counts, strict=True) for _ in range(c // g)])
        self._annotated = [np.asarray(c.annotated, dtype=bool).copy() for c in self.cases]
        self._locations: dict[int, dict[int, np.ndarray]] = {}
        self._image_min: dict[int, float] = {}

    # ------------------------------------------------------------------ validation
    def _check_case(self, i: int, case: SamplerCase) -> None:
        where = f"case {case.case_id or i!r}"
        shape = tuple(case.image.shape)
        if len(shape) != 3:
            raise DataError(f"{where}: image must be (X, Y, Z), got shape {shape}")
        if tuple(case.label.shape) != shape:
            raise DataError(f"{where}: label shape {tuple(case.label.shape)} differs from image {shape}")
        if not np.issubdtype(case.label.dtype, np.integer):
            raise DataError(f"{where}: label must hold integer codes, got dtype {case.label.dtype}")
        if np.shape(case.annotated) != (self.n_leaves,):
            raise DataError(f"{where}: annotated mask has shape {np.shape(case.annotated)}, "
                            f"expected ({self.n_leaves},) (n_leaves)")
        for name, kind in self.extra_kinds.items():
            if name not in case.extras:
                raise DataError(f"{where}: extra {name!r} is missing (has {sorted(case.extras)})")
            arr = case.extras[name]
            if tuple(arr.shape[-3:]) != shape or arr.ndim not in ((3,) if kind == "label" else (3, 4)):
                want = "(X, Y, Z)" if kind == "label" else "(X, Y, Z) or (C, X, Y, Z)"
                raise DataError(f"{where}: {kind} extra {name!r} has shape {tuple(arr.shape)}; "
                                f"expected {want} with (X, Y, Z) = {shape}")
            if kind == "label" and not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{where}: label extra {name!r} must hold integers, got {arr.dtype}")
            channels = 1 if arr.ndim == 3 else int(arr.shape[0])
            if self.extra_channels.setdefault(name, channels) != channels:
                raise DataError(f"{where}: extra {name!r} has {channels} channels, other cases "
                                f"{self.extra_channels[name]}")

    # ------------------------------------------------------------------ lazy per-case caches
    def precompute(self, case_indices: Sequence[int] | None = None) -> None:
        """Fill the location and image-minimum caches now (e.g. before forking loader workers)."""
        for i in range(len(self.cases)) if case_indices is None else case_indices:
            self.class_locations(i)
            self.pad_value(i)

    def pad_value(self, case_index: int) -> float:
        """The image value used outside the volume of a case (``image_pad_value`` or its minimum)."""
        if self.image_pad_value is not None:
            return float(self.image_pad_value)
        if case_index not in self._image_min:
            image = self.cases[case_index].image
            step = max(1, _SCAN_VOXELS // max(1, image.shape[1] * image.shape[2]))
            self._image_min[case_index] = float(min(
                np.min(np.asarray(image[x:x + step])) for x in range(0, image.shape[0], step)))
        return self._image_min[case_index]

    def class_locations(self, case_index: int) -> dict[int, np.ndarray]:
        """Code -> sorted int64 flat indices (a seeded subsample of at most ``max_locations``) for every
        non-zero code present in a case, computed by one chunked scan and cached."""
        cached = self._locations.get(case_index)
        if cached is not None:
            return cached
        label = self.cases[case_index].label
        plane = int(label.shape[1]) * int(label.shape[2])
        step = max(1, _SCAN_VOXELS // max(1, plane))
        parts: dict[int, list[np.ndarray]] = {}
        for x in range(0, label.shape[0], step):
            chunk = np.asarray(label[x:x + step]).reshape(-1)
            nonzero = np.flatnonzero(chunk)
            if nonzero.size == 0:
                continue
            values = chunk[nonzero]
            for code in np.unique(values):
                parts.setdefault(int(code), []).append(nonzero[values == code].astype(np.int64) + x * plane)
        locations: dict[int, np.ndarray] = {}
        for code, chunks in sorted(parts.items()):
            flat = np.concatenate(chunks)
            if flat.size > self.max_locations:
                rng = np.random.default_rng([self.seed, case_index, code])
                flat = np.sort(rng.choice(flat, size=self.max_locations, replace=False))
            locations[code] = flat
        self._locations[case_index] = locations
        return locations

    def foreground_codes(self, case_index: int) -> list[int]:
        """Annotated foreground codes present in a case: annotated leaf ids > 0 and region codes >= L."""
        annotated = self._annotated[case_index]
        return [c for c in self.class_locations(case_index)
                if c >= self.n_leaves or (c > 0 and bool(annotated[c]))]

    # ------------------------------------------------------------------ drawing
    def choose_case(self, step: int, slot: int, rng: np.random.Generator) -> int:
        """Index of the case for (step, slot): balanced over datasets or uniform over cases."""
        if not self.balance_datasets:
            return int(rng.integers(len(self.cases)))
        cycle, position = divmod(step * self.batch_size + slot, len(self._cycle))
        order = np.random.default_rng([self.seed, _DATASET_CYCLE_TAG, cycle]).permutation(len(self._cycle))
        members = self.by_dataset[int(self._cycle[order[position]])]
        return members[int(rng.integers(len(members)))]

    def choose_center(self, case_index: int, rng: np.random.Generator) -> tuple[tuple[int, int, int], bool]:
        """(centre voxel, whether it was drawn from annotated foreground)."""
        shape = tuple(int(s) for s in self.cases[case_index].label.shape)
        if rng.random() < self.fg_prob:
            codes = self.foreground_codes(case_index)
            if codes:
                locations = self.class_locations(case_index)[codes[int(rng.integers(len(codes)))]]
                flat = int(locations[int(rng.integers(len(locations)))])
                center = np.unravel_index(flat, shape)
                return (int(center[0]), int(center[1]), int(center[2])), True
        return (int(rng.integers(shape[0])), int(rng.integers(shape[1])), int(rng.integers(shape[2]))), False

    def __getitem__(self, step: int) -> Batch:
        """The collated batch of one training step (shapes in the class docstring)."""
        import torch
        from torch.utils.data import get_worker_info

        step = int(step)
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        shared = get_worker_info() is not None  # in a loader worker: fill shared memory directly
        size = (self.batch_size, *self.patch_size)
        batch: Batch = {
            "image": _empty((self.batch_size, 1, *self.patch_size), torch.float32, shared),
            "label": _empty(size, torch.int64, shared),
            "annotated": torch.empty((self.batch_size, self.n_leaves), dtype=torch.bool),
            "dataset_id": torch.empty(self.batch_size, dtype=torch.int64),
        }
        for name, kind in self.extra_kinds.items():
            batch[name] = _empty(size, torch.int64, shared) if kind == "label" else \
                _empty((self.batch_size, self.extra_channels[name], *self.patch_size), torch.float32, shared)
        batch["case_id"] = [self.fill_slot(batch, step, slot) for slot in range(self.batch_size)]
        return batch

    # ------------------------------------------------------------------ the transform
    def fill_slot(self, batch: Batch, step: int, slot: int) -> str:
        """Draw sample (step, slot) into row ``slot`` of the preallocated ``batch``; returns its case id."""
        rng = np.random.default_rng([self.seed, step, slot])
        case_index = self.choose_case(step, slot, rng)
        center, _ = self.choose_center(case_index, rng)
        case = self.cases[case_index]
        aug = self.augment
        patch = self.patch_size
        scale = 1.0
        if aug.enabled and rng.random() < aug.scale_prob:
            scale = float(rng.uniform(*aug.scale_range))
        box = tuple(max(1, int(round(p * scale))) for p in patch)
        start = tuple(c - b // 2 for c, b in zip(center, box, strict=True))
        rot_k = 0
        flip_axes: tuple[int, ...] = ()
        if aug.enabled:
            if rng.random() < aug.rot90_prob:
                rot_k = int(rng.integers(1, 4)) if patch[0] == patch[1] else 2
            flip_axes = tuple(axis - 3 for axis in range(3) if rng.random() < aug.flip_prob[axis])

        # Linear channels (image, then each prob extra's channels) share one float32 box; label-like
        # volumes (label, then label extras) keep their integer dtype unless they must be resampled.
        prob_names = [n for n, k in self.extra_kinds.items() if k == "prob"]
        label_names = [n for n, k in self.extra_kinds.items() if k == "label"]
        linear = np.empty((1 + sum(self.extra_channels[n] for n in prob_names), *box), dtype=np.float32)
        _crop_into(linear[:1], case.image[None], start, np.float32(self.pad_value(case_index)))
        channel = 1
        for name in prob_names:
            arr, channels = case.extras[name], self.extra_channels[name]
            fill = np.zeros((channels, 1, 1, 1), dtype=np.float32)
            if channels >= 2:
                fill[0] = 1.0
            _crop_into(linear[channel:channel + channels], arr if arr.ndim == 4 else arr[None], start, fill)
            channel += channels
        labels = []
        for arr in [case.label] + [case.extras[n] for n in label_names]:
            out = np.empty(box, dtype=arr.dtype)
            _crop_into(out, arr, start, 0)
            labels.append(out)

        if box != patch:
            import torch
            import torch.nn.functional as F

            linear = F.interpolate(torch.from_numpy(linear)[None], size=patch, mode="trilinear",
                                   align_corners=False)[0].numpy()
            stacked = np.empty((len(labels), *box), dtype=np.float32)
            for k, lab in enumerate(labels):
                stacked[k] = lab  # integer codes < 2**24 are exact in float32
            resampled = F.interpolate(torch.from_numpy(stacked)[None], size=patch, mode="nearest-exact")[0]
            labels = list(resampled.numpy())

        def spatial(arr: np.ndarray) -> np.ndarray:  # views only; the copy into the batch materialises them
            if rot_k:
                arr = np.rot90(arr, rot_k, axes=(-3, -2))
            return np.flip(arr, axis=flip_axes) if flip_axes else arr

        image = batch["image"][slot].numpy()
        np.copyto(image, spatial(linear[:1]))
        np.copyto(batch["label"][slot].numpy(), spatial(labels[0]), casting="unsafe")
        if aug.enabled:
            if aug.structure_shift_prob > 0:  # drawn only when enabled: other configurations keep their streams
                _structure_shift(image[0], batch["label"][slot].numpy(), aug, rng)
            _intensity(image, aug, rng)
        channel = 1
        for name in prob_names:
            channels = self.extra_channels[name]
            np.copyto(batch[name][slot].numpy(), spatial(linear[channel:channel + channels]))
            channel += channels
        for k, name in enumerate(label_names, start=1):
            np.copyto(batch[name][slot].numpy(), spatial(labels[k]), casting="unsafe")
        batch["annotated"][slot].numpy()[:] = self._annotated[case_index]
        batch["dataset_id"][slot] = int(case.dataset_index)
        return case.case_id


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; in shared memory inside loader workers (as torch's default collate does),
    so that handing the batch to the main process copies nothing."""
    import torch

    if shared:
        proto = torch.empty(0, dtype=dtype)
        storage = proto._typed_storage()._new_shared(int(np.prod(shape)), device=proto.device)
        return proto.new(storage).resize_(shape)
    return torch.empty(shape, dtype=dtype)


def _crop_into(out: np.ndarray, arr: np.ndarray, start: Sequence[int], fill: Any) -> None:
    """Write the box of ``arr`` (..., X, Y, Z) that starts at ``start`` (may be negative or reach past
    the end) into ``out`` (..., *box); voxels outside the volume take ``fill`` (a scalar or an array
    broadcastable to (..., 1, 1, 1))."""
    src: list[slice] = []
    dst: list[slice] = []
    inside = True
    for s, n, dim in zip(start, out.shape[-3:], arr.shape[-3:], strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            out[...] = fill
            return
        inside = inside and lo == s and hi == s + n
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    src_index: tuple[Any, ...] = (..., *src)
    if inside:
        out[...] = arr[src_index]
        return
    out[...] = fill
    dst_index: tuple[Any, ...] = (..., *dst)
    out[dst_index] = arr[src_index]


def _structure_shift(image: np.ndarray, label: np.ndarray, aug: AugmentSpec, rng: np.random.Generator) -> None:
    """In place: with ``aug.structure_shift_prob``, add to every labelled structure of the patch (each non-zero
    code of ``label``, same shape as ``image``) its own offset, through its Gaussian-blurred mask."""
    if rng.random() >= aug.structure_shift_prob:
        return
    from scipy.ndimage import gaussian_filter

    for code in np.unique(label):
        if code == 0:
            continue
        offset = np.float32(rng.uniform(*aug.structure_shift_range))
        weight = (label == code).astype(np.float32)
        if aug.structure_shift_sigma > 0:
            weight = gaussian_filter(weight, aug.structure_shift_sigma, mode="nearest")
        image += offset * weight


def _intensity(image: np.ndarray, aug: AugmentSpec, rng: np.random.Generator) -> None:
    """In place: multiplicative scale, additive shift, Gaussian noise, histogram shift; every draw from ``rng``."""
    if rng.random() < aug.intensity_scale_prob:
        image *= np.float32(rng.uniform(*aug.intensity_scale_range))
    if rng.random() < aug.intensity_shift_prob:
        image += np.float32(rng.uniform(*aug.intensity_shift_range))
    if rng.random() < aug.noise_prob:
        std = np.float32(rng.uniform(0.0, aug.noise_std))
        image += rng.standard_normal(image.shape, dtype=np.float32) * std
    # drawn only when enabled, so configurations without it keep their random streams
    if aug.histogram_shift_prob > 0 and rng.random() < aug.histogram_shift_prob:
        from monai.transforms import RandHistogramShift

        shift = RandHistogramShift(num_control_points=aug.histogram_shift_points, prob=1.0)
        shift.set_random_state(seed=int(rng.integers(2**31)))
        from monai.utils import convert_to_numpy

        image[...] = convert_to_numpy(shift(image), dtype=np.float32)


def make_loader(
    sampler: PatchSampler,
    start_step: int,
    total_steps: int,
    num_workers: int = 0,
    pin_memory: bool | None = None,
) -> Iterator[Batch]:
    """Batches for steps ``start_step .. total_steps - 1``, in order.

    ``num_workers=0`` draws in the calling process (clean tracebacks); with workers, each step is drawn
    by one worker (persistent, order kept), and batches are identical to the in-process ones.

    Args:
        sampler: the step-indexed batch dataset.
        start_step: first step (a resumed run passes its checkpoint step).
        total_steps: one past the last step.
        num_workers: loader worker processes.
        pin_memory: pin batches for faster host-to-GPU copies; default: when CUDA is available.

    Raises:
        ValueError: negative steps, ``total_steps < start_step`` or negative ``num_workers``.
    """
    import torch
    from torch.utils.data import DataLoader, Dataset

    if start_step < 0 or total_steps < start_step:
        raise ValueError(f"need 0 <= start_step <= total_steps, got {start_step}, {total_steps}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    loader: DataLoader[Batch] = DataLoader(
        cast("Dataset[Batch]", sampler),
        batch_size=None,
        sampler=range(start_step, total_steps),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_interrupt if num_workers > 0 else None,
    )
    # the iterator draws its workers' base seed from torch's global stream; the batches do not depend on it
    # (each step seeds its own draw), but the network's dropout does: a run resumed from a checkpoint's
    # stream must not see it shifted by a draw a run never stopped made at step 0
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def _ignore_interrupt(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the trainer, which finishes its step and writes a checkpoint first."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
