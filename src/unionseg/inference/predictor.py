"""The predictor: one image in, one label map out on the input's exact grid.

Pipeline: read -> :func:`~unionseg.data.preprocess.preprocess_image` (exactly the model file's
preprocessing) -> sliding-window inference (MONAI's window grid, Gaussian blending and window batches)
stitched in SLABS -> probabilities -> back onto the input grid -> the merge function -> uint8 labels.

Memory: MONAI's ``sliding_window_inference`` allocates the whole (C, X, Y, Z) output and count map; we
never do. Windows are visited in MONAI's order, whose slowest axis is the FIRST spatial axis, so the
volume is finalised slab by slab along that axis: a slab buffer of depth about ``roi + stride`` holds the
weighted logit sums (float32 when it fits ``slab_budget_mib``, else float16), and every finished slab goes
straight to the restore-and-decide stage. Per voxel the windows are summed in MONAI's order with the same
float32 operations, so with float32 accumulation the averaged logits are bit-identical to MONAI's (a test
checks the argmax). Nothing full-size is ever float64 or int64: the only full-size arrays are the
prepared input (float32) and the uint8 label maps.

Resampling back (our choice, as nnU-Net does): the decision is made on the INPUT grid, not on the model
grid. Each finished slab's probabilities are mapped back with the inverse of the preparation (uncrop with
background outside the crop box -> linear resampling with the same ``align_corners=False`` convention ->
reorientation) and only then merged. Deciding on the coarse model grid and copying labels back with
nearest neighbour would be cheaper but gives staircase boundaries whenever the model spacing is coarser
than the image's; linear probability resampling gives boundaries at the input's resolution. When the
model grid equals the input grid (same spacing), the map back is an exact uncrop/reorientation and both
choices coincide. The back-mapping is streamed along the same axis, so it costs only per-slab memory.

Test-time augmentation (``tta=True``): per window, the logits of the 8 mirror images (every subset of the
three axes flipped; nnU-Net's mirroring) are averaged before blending. Outside the image MONAI pads with
0; we pad volumes smaller than the window with -1, which is air after CT normalisation.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unionseg.config import PreprocessSpec, from_dict, resolve_device
from unionseg.data.io import (
    IMAGE_SUFFIXES,
    KIND_WORDS,
    NIFTI_SUFFIXES,
    PREDICTION_DESCRIPTION,
    Geometry,
    fsync_file,
    holds_dicom_files,
    place_file,
    predict_kind,
    prediction_description,
    read_image,
    reorient_like,
    reorient_view,
    set_nifti_transforms,
    strip_suffix,
    suffix_of,
    warn_about_placement,
    write_image,
)
from unionseg.data.preprocess import (
    IntensityWarning,
    PreprocessRecord,
    check_finite,
    check_spacing,
    intensity_warning,
    preprocess_image,
    restore_axis_map,
)
from unionseg.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    OutputExistsError,
    UnionsegError,
    UnionsegWarning,
)
from unionseg.labels import LabelSpace, merge, merge_softmax
from unionseg.modelfile import check_channels, check_inference
from unionseg.networks.layout import set_layout
from unionseg.outputs import sigmoid_to_groups

ProgressFn = Callable[[int, int], None]
DECISIONS = ("merge", "argmax")
ACCUMULATE = ("auto", "float32", "float16")
PAD_VALUE = -1.0  # air after CT normalisation


@contextmanager
def cudnn_autotune(device: torch.device) -> Iterator[None]:
    """cuDNN's autotuner on for a prediction on CUDA (every window has one shape, so the fastest convolution
    algorithm is chosen once), the caller's setting back afterwards; only training turned it on (helper-111)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def scan_interval(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's window step per axis: ``int(roi * (1 - overlap))`` (at least 1; the roi when it fills the axis)."""
    out = []
    for n, r in zip(image_size, roi, strict=True):
        out.append(int(r) if r == n else max(1, int(r * (1 - overlap))))
    return tuple(out)


class _Decider:
    """Model outputs -> decision-form probabilities -> labels, for one output form.

    softmax: decision channels are the L leaf probabilities (fill outside the body: background = 1).
    sigmoid: decision channels are the G region and P part probabilities (fill 0); a region takes the
    max over the channels of its region key, its organ leaf and its parts (a part lies inside its
    organ), a part the max over its own channels (repeated keys, e.g. one per task).

    :meth:`labels` calls the one merge function, :func:`unionseg.labels.merge` (or
    :func:`~unionseg.labels.merge_softmax`), or takes the argmax where the model file asks for it.
    """

    def __init__(self, space: LabelSpace, output_form: str, channels: Sequence[str], decision: str,
                 threshold: float | None) -> None:
        self.space = space
        self.output_form = output_form
        self.decision = decision
        self.threshold = threshold
        self.n_outputs = len(channels)
        if output_form == "softmax":
            self.names = list(space.names)
            fill = np.zeros(space.n_leaves, dtype=np.float32)
            fill[0] = 1.0
        else:
            self.channels = list(channels)
            self.names = space.region_keys() + space.part_keys()
            fill = np.zeros(len(self.names), dtype=np.float32)
        self.fill = fill
        self._part_row = {leaf: k for k, leaf in enumerate(space.part_ids)}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(C_out, *S) logits -> (C_dec, *S) float32 probabilities."""
        logits = logits.float()
        if self.output_form == "softmax":
            return torch.softmax(logits, dim=0)
        regions, parts = sigmoid_to_groups(torch.sigmoid(logits), self.channels, self.space)
        return torch.cat([regions, parts])

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """(C_dec, *S) probabilities -> (*S) uint8 leaf ids, through the ONE merge function."""
        if self.output_form == "softmax":
            if self.decision == "argmax":
                return probs.argmax(dim=0).to(torch.uint8)
            return merge_softmax(probs, self.space, threshold=self.threshold)
        g = self.space.n_groups
        return merge(probs[:g], probs[g:], self.space, organ_leaf_probs=None,
                     threshold=0.5 if self.threshold is None else self.threshold)


def _valid_range(i0: np.ndarray, i1: np.ndarray, w: np.ndarray, n_prepared: int) -> tuple[int, int]:
    """[lo, hi) of output indices that read at least one voxel inside the crop box (index maps of
    :func:`restore_axis_map`, where 0 and ``n_prepared + 1`` are the fill; ``i1`` counts where ``w > 0``)."""
    fill0 = (i0 == 0) | (i0 == n_prepared + 1)
    fill1 = (i1 == 0) | (i1 == n_prepared + 1) | (w == 0)
    inside = np.flatnonzero(~(fill0 & fill1))
    if inside.size == 0:
        return 0, 0
    return int(inside[0]), int(inside[-1]) + 1


class _RestoreSink:
    """Receives finished slabs of decision-form probabilities on the prepared grid (in order along the
    first axis), maps them back onto the RAS grid (uncrop + linear resampling), decides, and at the end
    reorients the label map (and optionally the probabilities) onto the source grid.

    Slabs are (C, n, Y', Z') tensors for prepared first-axis indices [a, a + n), pushed with increasing a.
    """

    def __init__(self, record: PreprocessRecord, decider: _Decider, device: torch.device,
                 keep_probs: bool = False, group: int = 16) -> None:
        self.record = record
        self.decider = decider
        self.device = device
        self.group = group
        prep, res, ras = record.prepared.shape, record.resampled_shape, record.ras.shape
        self.n_prep0 = prep[0]
        i0, i1, w = restore_axis_map(prep[0], record.crop_start[0], res[0], ras[0], order=1)
        self.i0, self.i1, self.w0 = i0, i1, w
        # output voxels whose both neighbours are fill (outside the crop box) are background by
        # construction: the decision is computed only inside this box
        self.box = [_valid_range(i0, i1, w, prep[0])]
        self.narrow: list[tuple[int, int, int]] = []
        self.inplane: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, bool] | None] = []
        for axis in (1, 2):
            if res[axis] == ras[axis] and record.crop_start[axis] == 0 and prep[axis] == res[axis]:
                self.inplane.append(None)
                self.box.append((0, ras[axis]))
                continue
            a0, a1, aw = restore_axis_map(prep[axis], record.crop_start[axis], res[axis], ras[axis], order=1)
            lo, hi = _valid_range(a0, a1, aw, prep[axis])
            self.box.append((lo, hi))
            a0, a1, aw = a0[lo:hi], a1[lo:hi], aw[lo:hi]
            if not np.any(aw) and np.array_equal(a0, np.arange(a0[0], a0[0] + len(a0))) and a0[0] >= 1 \
                    and a0[-1] <= prep[axis]:
                self.narrow.append((axis, int(a0[0]) - 1, len(a0)))  # same spacing: a plain crop
                self.inplane.append(None)
                continue
            self.inplane.append((axis, torch.as_tensor(a0, device=device), torch.as_tensor(a1, device=device),
                                 torch.as_tensor(aw, device=device), bool(np.any(aw > 0))))
        self.fill = torch.as_tensor(decider.fill, device=device)
        self.labels = np.zeros(ras, dtype=np.uint8)
        self.probs = None
        if keep_probs:
            self.probs = np.empty((len(decider.fill), *ras), dtype=np.float16)
            self.probs[:] = decider.fill.astype(np.float16).reshape(-1, 1, 1, 1)
        # recent planes of the padded prepared axis (index 0 = fill, 1..n = slices, n + 1 = fill)
        self.blocks: list[tuple[int, torch.Tensor]] = [(0, self._fill_plane().unsqueeze(1))]
        self.next_j = 0
        self.available = 0  # prepared indices [0, available) have been pushed

    def _fill_plane(self) -> torch.Tensor:
        (ylo, yhi), (zlo, zhi) = self.box[1], self.box[2]
        return self.fill.view(-1, 1, 1).expand(-1, yhi - ylo, zhi - zlo)

    def _restore_inplane(self, t: torch.Tensor) -> torch.Tensor:
        """(C, n, Y', Z') -> (C, n, box Y, box Z) on the RAS grid: uncrop with the fill, resample linearly."""
        for axis, start, length in self.narrow:
            t = t.narrow(axis + 1, start, length)
        for item in self.inplane:
            if item is None:
                continue
            axis, i0, i1, w, weighted = item
            dim = axis + 1
            pad_shape = list(t.shape)
            pad_shape[dim] = 1
            pad = self.fill.view(-1, 1, 1, 1).to(t.dtype).expand(pad_shape)
            t = torch.cat([pad, t, pad], dim=dim)
            lo = t.index_select(dim, i0)
            if weighted:
                hi = t.index_select(dim, i1)
                shape = [1] * t.dim()
                shape[dim] = -1
                lo = torch.lerp(lo, hi, w.view(shape).to(lo.dtype))
            t = lo
        return t

    def _ready(self, padded_index: int) -> bool:
        return padded_index == 0 or padded_index <= self.available or (
            padded_index == self.n_prep0 + 1 and self.available == self.n_prep0)

    def _planes(self, index: np.ndarray) -> torch.Tensor:
        """(C, len(index), box Y, box Z): planes at padded indices (a view when one block holds them
        consecutively)."""
        first, last = int(index.min()), int(index.max())
        for start, block in self.blocks:
            if start <= first and last < start + block.shape[1]:
                a = int(index[0]) - start
                if np.array_equal(index, np.arange(index[0], index[0] + len(index))):
                    return block[:, a:a + len(index)]
                return block.index_select(1, torch.as_tensor(index - start, device=block.device))
        pieces = [(s, b) for s, b in self.blocks if s <= last and s + b.shape[1] > first]
        joined = torch.cat([b for _, b in pieces], dim=1)
        return joined.index_select(1, torch.as_tensor(index - pieces[0][0], device=joined.device))

    def push(self, start: int, probs: torch.Tensor) -> None:
        """Take prepared first-axis slices [start, start + n) as (C, n, Y', Z') probabilities."""
        if start != self.available:
            raise RuntimeError(f"slabs must arrive in order: expected {self.available}, got {start}")
        restored = self._restore_inplane(probs.to(self.device))
        self.blocks.append((start + 1, restored))
        self.available = start + restored.shape[1]
        if self.available == self.n_prep0:
            self.blocks.append((self.n_prep0 + 1, self._fill_plane().unsqueeze(1).to(restored.dtype)))
        self._emit()

    def _emit(self) -> None:
        n_out = len(self.i0)
        xlo, xhi = self.box[0]
        (ylo, yhi), (zlo, zhi) = self.box[1], self.box[2]
        while self.next_j < n_out:
            j0 = self.next_j
            if j0 < xlo or j0 >= xhi:  # pure fill: background (labels are 0, probs hold the fill)
                self.next_j = xlo if j0 < xlo else n_out
                continue
            j1 = j0
            while j1 < xhi and j1 - j0 < self.group and self._ready(int(self.i1[j1])):
                j1 += 1
            if j1 == j0:
                return
            lo = self._planes(self.i0[j0:j1])
            w = self.w0[j0:j1]
            if np.any(w > 0):
                hi = self._planes(self.i1[j0:j1])
                lo = torch.lerp(lo, hi, torch.as_tensor(w, device=lo.device).view(1, -1, 1, 1).to(lo.dtype))
            self.labels[j0:j1, ylo:yhi, zlo:zhi] = self.decider.labels(lo).cpu().numpy()
            if self.probs is not None:
                self.probs[:, j0:j1, ylo:yhi, zlo:zhi] = lo.to(torch.float16).cpu().numpy()
            self.next_j = j1
            keep_from = int(self.i0[j1]) if j1 < xhi else self.n_prep0 + 2
            self.blocks = [(s, b) for s, b in self.blocks if s + b.shape[1] > keep_from]

    def finish(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The label map (and probabilities, (C, X, Y, Z) float16) on the source grid."""
        if self.available != self.n_prep0 or self.next_j < len(self.i0):
            raise RuntimeError(f"only {self.available} of {self.n_prep0} slices were pushed")
        labels = reorient_like(self.labels, self.record.ras, self.record.source)
        probs = None
        if self.probs is not None:  # a view, not a copy: the map is C x 2 bytes per voxel of the scan
            probs = np.moveaxis(reorient_view(np.moveaxis(self.probs, 0, -1), self.record.ras, self.record.source),
                                -1, 0)
        return labels, probs


class Predictor:
    """Predict label maps with a trained model (any output form) on images of any geometry.

    Args:
        model: ``forward(x: (B, 1, X, Y, Z)) -> (B, C, X, Y, Z)`` logits for every output channel.
        label_space: the model's label space.
        preprocessing: the model's :class:`PreprocessSpec` (or its dict).
        output_form: ``softmax`` (channels = leaves in id order) or ``sigmoid`` (channels = class keys).
        channels: meaning of each output channel; defaults to the leaves (softmax).
        inference: sliding-window settings (``roi_size``, ``overlap``, ``sw_batch_size``, ``blend``,
            ``threshold``); defaults filled in.
        device: where the network runs (``auto``: CUDA if available).
        stitch_device: where windows are blended and the decision is made (default: ``device``; pass
            ``"cpu"`` to keep GPU memory to the network).
        decision: ``merge`` (the merge function, default) or ``argmax`` (softmax models only).
        amp: autocast the network (default: on for CUDA, off for CPU).
        accumulate: slab accumulation dtype; ``auto`` uses float32 when the slab fits ``slab_budget_mib``.
        decision_threads: CPU threads for the restore-and-decide stage (``None``: torch's setting). Its
            many small memory-bound elementwise passes run faster on one thread than with OpenMP barriers,
            which stall for milliseconds per operation on a busy machine (measured: 0.7 s vs 7.7 s per
            5.6 M voxels on 2 loaded cores); the network keeps every thread.

    Raises:
        CheckpointError: channels that do not fit the label space, invalid inference settings.
        ValueError: an unknown decision or accumulation dtype, argmax on a sigmoid model.
    """

    def __init__(
        self,
        model: nn.Module,
        label_space: LabelSpace,
        preprocessing: PreprocessSpec | Mapping[str, Any],
        output_form: str = "softmax",
        channels: Sequence[str] | None = None,
        inference: Mapping[str, Any] | None = None,
        device: str | torch.device = "auto",
        stitch_device: str | torch.device | None = None,
        decision: str = "merge",
        amp: bool | None = None,
        accumulate: str = "auto",
        slab_budget_mib: float = 256.0,
        decision_threads: int | None = 1,
    ) -> None:
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
        if decision == "argmax" and output_form != "softmax":
            raise ValueError("decision='argmax' needs a softmax model (sigmoid outputs are merged)")
        self.space = label_space
        self.spec = preprocessing if isinstance(preprocessing, PreprocessSpec) else \
            from_dict(PreprocessSpec, preprocessing, source="<model>", where="preprocessing")
        self.output_form = output_form
        self.channels = check_channels(output_form, channels if channels is not None else label_space.names,
                                       label_space)
        self.inference = check_inference(inference or {})
        self.device = resolve_device(device)
        self.stitch_device = resolve_device(stitch_device) if stitch_device is not None else self.device
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self.accumulate = accumulate
        self.slab_budget_mib = slab_budget_mib
        self.decision_threads = decision_threads
        self.decision = decision
        self.model = set_layout(model.to(self.device), self.device).eval()
        self.decider = _Decider(label_space, output_form, self.channels, decision, self.inference["threshold"])
        self.conditional_parts = bool(getattr(model, "conditional_parts", False))
        self.last_stats: dict[str, Any] = {}
        self.model_id: str | None = None  # the model file's id (from_checkpoint), recorded in each label map

    # ------------------------------------------------------------------ construction from a model file
    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], device: str | torch.device = "auto",
                     model: nn.Module | None = None, **overrides: Any) -> Predictor:
        """Build from a loaded model payload.

        ``overrides``: the model file's sliding-window settings (``roi_size``, ``overlap``, ``sw_batch_size``,
        ``blend``, ``threshold``; None keeps the file's) and the constructor's options (``stitch_device``,
        ``decision``, ``amp``, ``accumulate``, ``slab_budget_mib``, ``decision_threads``).

        Raises:
            ConfigError: an override this predictor does not have, or a setting out of range.
            CheckpointError: the payload's own settings are invalid.
            ValueError: a constructor option the model cannot take (``decision='argmax'`` on a sigmoid model).
        """
        import inspect

        from unionseg.modelfile import DEFAULT_INFERENCE, build_from_payload

        options = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "label_space",
                                                                      "preprocessing", "output_form", "channels",
                                                                      "inference", "device"}
        unknown = sorted(set(overrides) - options - set(DEFAULT_INFERENCE))
        if unknown:
            raise ConfigError(f"the predictor has no setting {', '.join(map(repr, unknown))} (settings: "
                              f"{', '.join(sorted(DEFAULT_INFERENCE))}; options: {', '.join(sorted(options))})")
        inference = dict(payload["inference"])
        given = {k: overrides.pop(k) for k in list(overrides) if k in DEFAULT_INFERENCE}
        given = {k: v for k, v in given.items() if v is not None}
        try:
            check_inference(given)
        except CheckpointError as exc:  # the caller's value, not the model file's
            raise ConfigError(exc.message) from None
        inference.update(given)
        try:
            space = LabelSpace.from_dict(payload["label_space"], source="<model file>")
        except UnionsegError as exc:
            raise CheckpointError(f"invalid label space in the model file ({exc.message})") from None
        net = model if model is not None else build_from_payload(payload)
        return cls(net, space, payload["preprocessing"], output_form=payload["output_form"],
                   channels=payload["channels"], inference=inference, device=device, **overrides)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", **overrides: Any) -> Predictor:
        """Load a model file (see :mod:`unionseg.modelfile`) and build its predictor (``overrides``: see
        :meth:`from_payload`).

        Raises:
            CheckpointError: the file is missing, corrupt, unsafe or not a unionseg model.
            ConfigError: an unknown override, or a setting out of range.
        """
        from unionseg.modelfile import load_model, model_id

        before = model_id(path) if Path(path).is_file() else ""  # load_model names a missing file
        payload = load_model(path)
        loaded = model_id(path)
        while loaded != before:  # a training replaced model.pt meanwhile: the id must name the weights loaded
            before, payload = loaded, load_model(path)
            loaded = model_id(path)
        try:
            predictor = cls.from_payload(payload, device=device, **overrides)
        except CheckpointError as exc:
            raise CheckpointError(exc.message, path) from None
        predictor.model_id = loaded
        return predictor

    @property
    def label_space(self) -> LabelSpace:
        """The model's label space, the constructor's ``label_space`` (also ``space``): its ``names`` give the
        label map's values their organ names (``label_space.names[v]`` for value ``v``)."""
        return self.space

    def __repr__(self) -> str:  # what a notebook shows for the object
        roi = "x".join(map(str, self.inference["roi_size"]))  # check_inference fills every setting in
        return (f"Predictor(model={self.model_id or '<in memory>'}, output_form={self.output_form!r}, "
                f"classes={list(self.space.names[1:])}, device={str(self.device)!r}, roi={roi}, "
                f"overlap={self.inference['overlap']}, decision={self.decision!r})")

    @property
    def probability_names(self) -> list[str]:
        """Names of the probability channels ``predict(return_probs=True)`` returns."""
        return list(self.decider.names)

    @property
    def probability_meanings(self) -> dict[str, str]:
        """What each probability channel holds, in words (written beside the map, ``_probs.json``)."""
        if self.output_form == "softmax":
            return {n: "probability of this class; the channels sum to 1" for n in self.probability_names}
        part = ("min(P(part | region), P(region)): the part's probability GIVEN its organ region, capped at the "
                "region's probability, a value for the merge rule (above 0.5 inside the organ, the part is "
                "decided); where the cap applies it is not the conditional, so times P(region) it is not P(part)"
                if self.conditional_parts else "probability of this part")
        return {n: "probability of this organ region (the organ and its parts)" if n.startswith("region:")
                else part for n in self.probability_names}

    # ------------------------------------------------------------------ prediction
    @overload
    def predict(self, image: str | Path | np.ndarray, geometry: Geometry | None = None, tta: bool = False,
                return_probs: Literal[False] = False, progress: ProgressFn | bool | None = None,
                ) -> tuple[np.ndarray, Geometry]: ...

    @overload
    def predict(self, image: str | Path | np.ndarray, geometry: Geometry | None = None, tta: bool = False, *,
                return_probs: Literal[True], progress: ProgressFn | bool | None = None,
                ) -> tuple[np.ndarray, Geometry, np.ndarray]: ...

    @overload
    def predict(self, image: str | Path | np.ndarray, geometry: Geometry | None = None, tta: bool = False,
                return_probs: bool = False, progress: ProgressFn | bool | None = None,
                ) -> tuple[np.ndarray, Geometry] | tuple[np.ndarray, Geometry, np.ndarray]: ...

    def predict(
        self,
        image: str | Path | np.ndarray,
        geometry: Geometry | None = None,
        tta: bool = False,
        return_probs: bool = False,
        progress: ProgressFn | bool | None = None,
    ) -> tuple[np.ndarray, Geometry] | tuple[np.ndarray, Geometry, np.ndarray]:
        """Segment one CT volume.

        Args:
            image: a file/DICOM folder, or an (X, Y, Z) array of Hounsfield units.
            geometry: the array's geometry (default: identity, 1 mm voxels); a file brings its own, so
                passing one with a path is refused.
            tta: average the 8 mirror images of every window.
            return_probs: also return the probabilities (C, X, Y, Z) float16 on the input grid, channels
                :attr:`probability_names` (memory: C x 2 bytes per input voxel). The array may be a strided
                view (flipped or transposed axes, no copy); ``np.ascontiguousarray`` it before
                ``torch.from_numpy``.
            progress: ``True`` for a progress bar of the windows (timed lines off a terminal), or a function
                called with ``(windows_done, windows_total)``.

        Returns:
            ``(labels, geometry[, probs])``: (X, Y, Z) uint8 leaf ids on the input grid and that grid.

        Raises:
            DataError: unreadable input, not 3D, empty, non-finite values.
            UnionsegError: ``geometry`` with a path, or not a :class:`Geometry`; a label or probability map
                that ``predict`` wrote given as the image.
        """
        return self._predict(image, geometry, tta, return_probs, progress, stacklevel=3)

    def _predict(self, image: str | Path | np.ndarray, geometry: Geometry | None, tta: bool, return_probs: bool,
                 progress: ProgressFn | bool | None, stacklevel: int) -> Any:
        """:meth:`predict`; its warnings point ``stacklevel`` frames up (the user's call of predict or
        predict_file)."""
        if not (progress is None or isinstance(progress, bool) or callable(progress)):  # before the work
            raise UnionsegError(f"progress= takes True, False or a function of (windows_done, windows_total), got "
                                f"{progress!r}")
        if isinstance(image, (str, Path)):
            path = Path(image)
            if geometry is not None:
                raise UnionsegError("geometry= is for arrays: a file is segmented on its own geometry", path)
            kind = predict_kind(path) if path.is_file() else None
            if kind is not None:  # the CLI refused these before; from Python one was segmented as a scan
                raise UnionsegError(f"a {KIND_WORDS[kind]} that unionseg predict wrote, not a CT image; predict "
                                    "reads the scans themselves", path)
            array, geometry = read_image(path)
            warn_about_placement(path, geometry, stacklevel=stacklevel + 1)
        else:
            path = None
            array = np.asarray(image)
            while array.ndim > 3 and array.shape[-1] == 1:  # (X, Y, Z, 1), as a file of that shape is read
                array = array[..., 0]
            if geometry is None:
                warnings.warn("Predictor.predict got an array without geometry=: taken as 1 mm voxels at the "
                              "origin (pass the scan's Geometry, e.g. from unionseg.data.io.read_image, or a path)",
                              UnionsegWarning, stacklevel=stacklevel)
                geometry = Geometry.identity(array.shape)
            elif not isinstance(geometry, Geometry):
                raise UnionsegError(f"geometry= must be a unionseg.data.io.Geometry (read_image gives one with the "
                                    f"array), got {type(geometry).__name__}")
        if array.ndim != 3:
            raise DataError(f"expected a 3D volume, got shape {array.shape}", path)
        if array.size == 0:
            raise DataError(f"the image holds no voxels (shape {array.shape})", path)
        check_spacing(geometry, path)
        check_finite(array, path)
        where = path if path is not None else Path("<array>")
        if min(array.shape) < 3:  # the network is 3D: a slice or two has nearly no context along that axis
            warnings.warn(f"{where}: only {min(array.shape)} voxel(s) along an axis (shape {array.shape}); the "
                          "network segments volumes, and its output on a slab this thin is unreliable",
                          UnionsegWarning, stacklevel=stacklevel)
        note = intensity_warning(array, where)
        if note is not None:  # e.g. an MRI: predicted anyway, but the user is told
            warnings.warn(note, IntensityWarning, stacklevel=stacklevel)
        prepared, record = preprocess_image(array, geometry, self.spec, path)
        if min(array.shape) >= 3 and min(prepared.shape) < 3:  # thin only on the model's coarser grid
            spacing = " x ".join(f"{s:g}" for s in self.spec.spacing)
            warnings.warn(f"{where}: only {min(prepared.shape)} voxel(s) along an axis on the model's {spacing} mm "
                          f"grid (shape {tuple(prepared.shape)} there, {tuple(array.shape)} as read); the network "
                          "segments volumes, and its output on a slab this thin is unreliable",
                          UnionsegWarning, stacklevel=stacklevel)
        del array
        with _window_progress(progress, where.name) as report:
            labels, probs = self.predict_prepared(prepared, record, tta=tta, return_probs=return_probs,
                                                  progress=report)
        if return_probs:
            assert probs is not None
            return labels, geometry, probs
        return labels, geometry

    def predict_prepared(
        self, prepared: np.ndarray, record: PreprocessRecord, tta: bool = False, return_probs: bool = False,
        progress: ProgressFn | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Sliding window + restore + decision on an already prepared (X', Y', Z') float32 volume."""
        sink = _RestoreSink(record, self.decider, self.stitch_device, keep_probs=return_probs)
        x = torch.from_numpy(np.ascontiguousarray(prepared, dtype=np.float32))
        threads = torch.get_num_threads()
        single = self.decision_threads is not None and self.stitch_device.type == "cpu"
        with torch.inference_mode(), cudnn_autotune(self.device):
            for start, logits in self._stitch(x, tta=tta, progress=progress):
                if single:
                    torch.set_num_threads(self.decision_threads)  # type: ignore[arg-type]
                try:
                    sink.push(start, self.decider.probabilities(logits))
                finally:
                    if single:
                        torch.set_num_threads(threads)
        return sink.finish()

    def sliding_window_logits(self, prepared: np.ndarray | torch.Tensor, tta: bool = False) -> torch.Tensor:
        """The whole averaged-logit volume (C, X', Y', Z') float32 on the stitch device (tests, small volumes)."""
        x = torch.as_tensor(prepared, dtype=torch.float32)
        parts = []
        with torch.inference_mode(), cudnn_autotune(self.device):
            for _, logits in self._stitch(x, tta=tta):
                parts.append(logits.float())
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ slab stitching
    def _forward(self, windows: torch.Tensor, tta: bool) -> torch.Tensor:
        amp = torch.autocast(self.device.type) if self.amp else nullcontext()
        with amp:
            out = self._net(windows).float()
            if tta:
                flips = [d for k in (1, 2, 3) for d in itertools.combinations((2, 3, 4), k)]
                for dims in flips:
                    out += torch.flip(self._net(torch.flip(windows, dims)).float(), dims)
                out /= len(flips) + 1
        return out

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        if out.shape[1] != len(self.channels):
            raise CheckpointError(f"the network returns {out.shape[1]} channels, the model file declares "
                                  f"{len(self.channels)}")
        return out

    def _stitch(self, x: torch.Tensor, tta: bool = False, progress: ProgressFn | None = None):
        """Yield ``(start, logits)``: averaged logits (C, n, Y', Z') float32 for first-axis slices
        [start, start + n) of the (X', Y', Z') input, in order, covering the whole volume."""
        from monai.data.utils import compute_importance_map, dense_patch_slices

        roi = tuple(int(r) for r in self.inference["roi_size"])
        shape = tuple(int(s) for s in x.shape)
        pads = []
        for n, r in zip(shape, roi, strict=True):
            diff = max(r - n, 0)
            pads.append((diff // 2, diff - diff // 2))
        vol = x.to(self.stitch_device)[None, None]
        if any(p for pair in pads for p in pair):
            flat = [p for pair in reversed(pads) for p in pair]
            vol = F.pad(vol, flat, mode="constant", value=PAD_VALUE)
        size = tuple(int(s) for s in vol.shape[2:])
        interval = scan_interval(size, roi, self.inference["overlap"])
        windows = dense_patch_slices(size, roi, interval)
        batch = int(self.inference["sw_batch_size"])
        batches = [windows[i:i + batch] for i in range(0, len(windows), batch)]
        depth = max(roi[0], *(max(s[0].stop for s in b) - b[0][0].start for b in batches))
        weight = compute_importance_map(roi, mode=self.inference["blend"], sigma_scale=0.125,
                                        device=self.device, dtype=torch.float32)
        weight = weight.view(1, 1, *roi)
        weight_stitch = weight[0, 0].to(self.stitch_device)
        lo0 = pads[0][0]
        n0 = shape[0]
        (ylo, _), (zlo, _) = pads[1], pads[2]
        ny, nz = shape[1], shape[2]
        acc: torch.Tensor | None = None
        count = torch.zeros((depth, *size[1:]), dtype=torch.float32, device=self.stitch_device)
        base = 0
        done = 0

        def finished(a: int, b: int) -> Any:
            """Slices [a, b) of the padded volume are final: yield their unpadded part, in pieces."""
            assert acc is not None
            lo, hi = max(a, lo0), min(b, lo0 + n0)
            step = 8
            for s in range(lo, hi, step):
                e = min(s + step, hi)
                # a new tensor: the same float32 division MONAI does (output /= count_map)
                avg = acc[:, s - base:e - base, ylo:ylo + ny, zlo:zlo + nz].to(torch.float32, copy=True)
                avg /= count[s - base:e - base, ylo:ylo + ny, zlo:zlo + nz]
                yield s - lo0, avg

        for b in batches:
            first = b[0][0].start
            if first > base and acc is not None:
                yield from finished(base, first)
                shift = first - base
                keep = depth - shift
                acc[:, :keep] = acc[:, shift:].clone()
                acc[:, keep:] = 0
                count[:keep] = count[shift:].clone()
                count[keep:] = 0
                base = first
            win = torch.cat([vol[(slice(None), slice(None), *s)] for s in b]).to(self.device)
            out = self._forward(win, tta)
            out *= weight
            out = out.to(self.stitch_device)
            if acc is None:
                acc = torch.zeros((out.shape[1], depth, *size[1:]), device=self.stitch_device,
                                  dtype=self._acc_dtype(out.shape[1], depth, size))
            for k, s in enumerate(b):
                local = (slice(None), slice(s[0].start - base, s[0].stop - base), s[1], s[2])
                acc[local] += out[k]
                count[local[1:]] += weight_stitch
            done += len(b)
            if progress is not None:
                progress(done, len(windows))
        assert acc is not None
        yield from finished(base, size[0])
        self.last_stats = {"windows": len(windows), "slab_depth": depth, "accumulate": str(acc.dtype),
                           "padded_size": size}

    def _acc_dtype(self, channels: int, depth: int, size: Sequence[int]) -> torch.dtype:
        if self.accumulate == "float32":
            return torch.float32
        if self.accumulate == "float16":
            return torch.float16
        mib = channels * depth * math.prod(size[1:]) * 4 / 2**20
        return torch.float32 if mib <= self.slab_budget_mib else torch.float16

    # ------------------------------------------------------------------ files
    def predict_file(
        self,
        in_path: str | Path,
        out_path: str | Path,
        tta: bool = False,
        probs_path: str | Path | None = None,
        progress: ProgressFn | bool | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Predict one image file (or DICOM series folder) and write a uint8 label map with its exact geometry.

        For a folder of image files, one per case, ``unionseg predict MODEL FOLDER -o OUT`` predicts them all.

        Args:
            in_path: the image (NIfTI, NRRD, MHA) or a folder holding one DICOM series.
            out_path: the label map's file name (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``).
            tta: average the 8 mirror images of every window (8x slower).
            probs_path: also write the probabilities as a 4D NIfTI (X, Y, Z, C) float32 plus a
                ``.json`` sidecar naming the channels.
            progress: ``True`` for a progress bar of the windows, or a function of
                ``(windows_done, windows_total)``.
            overwrite: replace ``out_path`` (and ``probs_path``) when they exist; by default an existing file
                (ground truth of the same name, an edited map) is refused before anything is computed, and
                a file that appears meanwhile (another process) is never written over.

        Returns:
            ``out_path``.

        Raises:
            OutputExistsError: an existing file without ``overwrite`` (a :class:`UnionsegError`).
            UnionsegError: the output would overwrite the input, or a name that cannot be written (a
                folder); the input is a label or probability map predict wrote.
            DataError: unreadable input, a folder of image files.
        """
        in_path, out_path = Path(in_path), Path(out_path)
        if out_path.resolve() == in_path.resolve() or (in_path.is_dir() and out_path.resolve().is_relative_to(
                in_path.resolve())):
            raise UnionsegError("refusing to write the prediction over or inside its input", out_path)
        if out_path.is_dir() or (suffix_of(out_path) == "" and not out_path.exists()):
            raise UnionsegError("out_path names the label map's file (case.nii.gz, say), not a folder: "
                                "predict_file writes one image's map (unionseg predict ... -o FOLDER writes "
                                "a folder of them)", out_path)
        if in_path.is_dir() and not holds_dicom_files(in_path):
            held = sorted(p.name for p in in_path.iterdir() if suffix_of(p) in IMAGE_SUFFIXES)
            if held:  # a folder of cases, not a series (a series folder may hold a converted copy beside it)
                raise DataError(f"a folder of {len(held)} image file(s) ({', '.join(held[:3])}"
                                f"{', ...' if len(held) > 3 else ''}): predict_file reads one image, a file or a "
                                "DICOM series folder; give each file, or run unionseg predict MODEL FOLDER -o OUT",
                                in_path)
        if suffix_of(out_path) not in IMAGE_SUFFIXES:
            raise UnionsegError(f"unsupported output type {suffix_of(out_path)!r} (use {', '.join(IMAGE_SUFFIXES)})",
                                out_path)
        if probs_path is not None:
            if suffix_of(probs_path) not in NIFTI_SUFFIXES:
                raise UnionsegError("probabilities are written as NIfTI: name the file .nii.gz or .nii", probs_path)
            if Path(probs_path).resolve() == out_path.resolve():
                raise UnionsegError("the probabilities and the label map would share one file", probs_path)
        if not overwrite:
            extra = [] if probs_path is None else [Path(probs_path), probabilities_sidecar(probs_path)]
            for path in (out_path, *extra):
                if path.exists() or path.is_symlink():
                    raise OutputExistsError("already exists; nothing was written: pass overwrite=True to replace "
                                            "it", path)
        if probs_path is None:
            labels, geom = self._predict(in_path, None, tta, False, progress, stacklevel=3)
            write_image(out_path, labels, geom, description=prediction_description(labels, self.model_id),
                    replace=overwrite, label_names=self.space.names)
            return out_path
        labels, geom, probs = self._predict(in_path, None, tta, True, progress, stacklevel=3)
        write_image(out_path, labels, geom, description=prediction_description(labels, self.model_id),
                    replace=overwrite, label_names=self.space.names)
        write_probabilities(probs_path, probs, geom, self.probability_names, self.probability_meanings,
                            replace=overwrite, model=self.model_id)
        return out_path


@contextmanager
def _window_progress(progress: ProgressFn | bool | None, name: str) -> Iterator[ProgressFn | None]:
    """The window callback of ``progress=``: ``True`` draws a bar of the windows (timed lines off a
    terminal), a function is called as it is, ``False``/``None`` reports nothing."""
    if progress is None or progress is False:
        yield None
    elif progress is True:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

        from unionseg.progress import make_progress, time_columns

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *time_columns())
        with make_progress(*columns, transient=True, label="predict") as bar:
            task = bar.add_task(f"{name} (windows)", total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
    else:  # a function (Predictor._predict refused anything else before the work)
        yield progress


def probabilities_sidecar(path: str | Path) -> Path:
    """The ``.json`` that names the channels of the probability map ``path``."""
    path = Path(path)
    return path.with_name(strip_suffix(path) + ".json")


def write_probabilities(path: str | Path, probs: np.ndarray, geometry: Geometry, names: Sequence[str],
                        meanings: Mapping[str, str] | None = None, replace: bool = False,
                        model: str | None = None) -> Path:
    """Write (C, X, Y, Z) probabilities as a 4D NIfTI (X, Y, Z, C) float32 with a ``.json`` channel list
    (and what each channel holds, ``meanings``), atomically, and never over an existing file unless
    ``replace=True`` (:func:`~unionseg.data.io.place_file`; as :func:`~unionseg.data.io.write_image`); both
    carry predict's mark (header description, ``written_by``), and the ``.json`` the id of the ``model``
    that wrote them, when given (``--skip-existing`` checks it).

    The voxels are streamed one channel at a time (NIfTI stores the last axis slowest, so a channel is one
    block of the file): beside ``probs`` only one channel is held as float32. Converting the whole map
    first held C x 4 more bytes per voxel (a 512 x 512 x 600 scan with 9 channels peaked at 9 GB).
    """
    import gzip
    import json
    import os

    import nibabel as nib

    path = Path(path)
    if probs.ndim != 4 or tuple(probs.shape[1:]) != tuple(geometry.shape) or probs.shape[0] != len(names):
        # a (X, Y, Z, C) array was written as a map of the wrong grid, without a word
        raise ValueError(f"probs must be (C, X, Y, Z) = ({len(names)}, {', '.join(map(str, geometry.shape))}) for "
                         f"{len(names)} names on this geometry, got {tuple(probs.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix_of(path) not in NIFTI_SUFFIXES:
        raise UnionsegError("probabilities are written as NIfTI: name the file .nii.gz or .nii", path)
    if not replace and (path.exists() or path.is_symlink()):
        raise OutputExistsError("already exists; nothing was written over it", path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix_of(path)}")
    sidecar = probabilities_sidecar(path)
    try:
        # the header of the whole map, from a stand-in that holds no memory (a broadcast zero)
        stand_in = np.broadcast_to(np.float32(0), (*probs.shape[1:], probs.shape[0]))
        img = nib.Nifti1Image(stand_in, geometry.affine)
        set_nifti_transforms(img, geometry)
        img.update_header()
        header = img.header
        header.set_data_dtype(np.float32)
        header.set_xyzt_units("mm")
        header["descrip"] = PREDICTION_DESCRIPTION.encode("ascii")
        header.set_data_offset(352)  # the 348-byte header and 4 bytes saying "no extensions"
        opener = gzip.open(tmp, "wb", compresslevel=1) if suffix_of(path) == ".nii.gz" else open(tmp, "wb")
        with opener as fh:
            fh.write(header.binaryblock + b"\0\0\0\0")
            on_disk = header.get_data_dtype()  # float32 in the header's byte order
            for channel in probs:
                # the channel in Fortran order, written through its transpose's buffer (no bytes copy)
                fh.write(np.asfortranarray(channel, dtype=on_disk).T.data)
        fsync_file(tmp)
        place_file(tmp, path, replace)
    finally:
        if tmp.exists():
            tmp.unlink()
    tmp_json = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    try:
        record: dict[str, Any] = {"channels": list(names), "written_by": PREDICTION_DESCRIPTION}
        if model:
            record["model"] = model
        if meanings:
            record["meaning"] = {n: meanings[n] for n in names if n in meanings}
        tmp_json.write_text(json.dumps(record, indent=1), encoding="utf-8")
        fsync_file(tmp_json)
        place_file(tmp_json, sidecar, replace)
    finally:
        if tmp_json.exists():
            tmp_json.unlink()
    return path
