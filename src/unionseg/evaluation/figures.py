"""Evaluation figures (matplotlib, Agg canvas; pyplot and its global state are never touched).

* :func:`score_boxplot`: one metric (Dice, HD95, NSD) per class over cases, box plot with the individual
  cases as points, values decided by an empty-mask rule marked as such.
* :func:`overlay`: one axial slice (the one with the most ground-truth foreground) of a case, truth and
  prediction side by side, one colour per class over the CT (or over black when no image is found).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unionseg.evaluation.metrics import BOTH_EMPTY, GT_EMPTY, METRIC_TITLES, PRED_EMPTY
from unionseg.labels import LabelSpace, display_key

if TYPE_CHECKING:
    from unionseg.data.io import Geometry


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


class AggPlots:
    """pyplot's ``subplots`` and ``close``, on Agg canvases of their own: drawing a report never switches the
    caller's matplotlib backend (a notebook's inline plots) nor touches pyplot's figure list."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = True,
                 **kwargs: Any) -> tuple[Any, Any]:
        fig = _figure(*figsize)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze, **kwargs)

    @staticmethod
    def close(fig: Any) -> None:
        """Nothing to release: the figure is not registered with pyplot and goes with its last reference."""


def _save(fig: Any, path: Path) -> Path:
    """Write the PNG through a temporary of this process's own, removed if the write fails (a fixed name was
    shared by two processes, and left behind by a failed write; helper-109)."""
    from unionseg.jsonfile import written_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(path) as fh:
        fig.savefig(fh, format="png", bbox_inches="tight")
    return path


def leaf_colours(space: LabelSpace) -> np.ndarray:
    """(L, 3) RGB in [0, 1]: one colour per leaf (background black), from matplotlib's tab10 (tab20 beyond
    ten leaves) in leaf order."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if space.n_leaves <= 11 else colormaps["tab20"]
    colours = np.zeros((space.n_leaves, 3))
    for leaf_id in range(1, space.n_leaves):
        colours[leaf_id] = cmap((leaf_id - 1) % cmap.N)[:3]
    return colours


#: how each empty-mask rule's points are drawn in :func:`score_boxplot`: (marker, colour, legend text)
RULE_MARKERS = {
    BOTH_EMPTY: ("o", "tab:green", "both empty (rule value)"),
    PRED_EMPTY: ("v", "tab:red", "missed: prediction empty (rule value)"),
    GT_EMPTY: ("^", "tab:purple", "spurious: truth empty (rule value)"),  # not orange: the median line is
}


def score_boxplot(cases: Mapping[str, Mapping[str, Mapping[str, float]]], keys: Sequence[str], metric: str,
                  path: Path, tolerance_mm: float | None = None) -> Path:
    """Box plot of one metric per class over cases (those of ``keys`` scored in at least one case).

    The boxes summarise every value the tables average; each case is a point, and a value decided by an
    empty-mask rule (no organ in the prediction, in the truth, or in either) is drawn with its own marker and
    colour, not as a measurement. HD95 is drawn on a symmetric-log axis (linear below 1 mm), so that the
    penalty of a missed organ (the image diagonal, hundreds of mm) and real distances of a few mm both stay
    readable. Each tick label carries the class's case count.

    Args:
        cases: case -> class key -> {metric: value, "pred_voxels": n, "gt_voxels": n}.
        keys: class keys in the order to draw them.
        metric: ``"dice"``, ``"hd95"`` or ``"nsd"``.
        path: PNG to write.
        tolerance_mm: the NSD tolerance, for its axis label.
    """
    from matplotlib.lines import Line2D

    from unionseg.evaluation.metrics import empty_rule

    if metric not in METRIC_TITLES:
        raise ValueError(f"unknown metric {metric!r} (one of {', '.join(METRIC_TITLES)})")
    keys = [k for k in keys if any(k in scores for scores in cases.values())]
    fig = _figure(max(4.5, 1.1 * len(keys) + 2.0), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    rows = [[scores[k] for scores in cases.values() if k in scores] for k in keys]
    data = [[float(row[metric]) for row in class_rows] for class_rows in rows]
    labels = [f"{display_key(k)}\nn={len(values)}" for k, values in zip(keys, data, strict=True)]
    used: set[str] = set()
    if data:
        ax.boxplot(data, showfliers=False)
        rng = np.random.default_rng(0)
        for i, (class_rows, values) in enumerate(zip(rows, data, strict=True), start=1):
            xs = i + rng.uniform(-0.12, 0.12, len(values))
            ys = np.asarray(values)
            rules = np.array([empty_rule(row["pred_voxels"], row["gt_voxels"]) for row in class_rows], dtype=object)
            # one scatter call per kind of point (one per case made a figure of many cases slow to draw)
            measured = np.array([r is None for r in rules], dtype=bool)
            if measured.any():
                ax.scatter(xs[measured], ys[measured], s=12, color="black", alpha=0.6, zorder=3)
            for rule, (marker, colour, _) in RULE_MARKERS.items():
                mine = rules == rule
                if mine.any():
                    ax.scatter(xs[mine], ys[mine], s=30, marker=marker, facecolors="none", edgecolors=colour,
                               linewidths=1.2, zorder=4)
                    used.add(rule)
        if len(keys) <= 6:
            ax.set_xticks(range(1, len(keys) + 1), labels)
        else:
            ax.set_xticks(range(1, len(keys) + 1), labels, rotation=30, ha="right")
    title = METRIC_TITLES[metric]
    if metric == "hd95":
        ax.set_yscale("symlog", linthresh=1.0)
        top = max((v for values in data for v in values), default=1.0)
        ax.set_ylim(0, max(top, 1.0) * 1.6)  # room above the largest value (a penalty marker is not cut)
        ax.set_ylabel("HD95 (mm, log scale above 1 mm; lower is better)")
    else:
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(title if metric == "dice" or tolerance_mm is None else f"NSD at {tolerance_mm:g} mm")
    n = len(cases)
    ax.set_title(f"{title} per class over {n} case{'' if n == 1 else 's'}")
    ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], linestyle="none", marker="o", color="black", alpha=0.6, markersize=4,
                      label="a case (measured)")]
    handles += [Line2D([], [], linestyle="none", marker=RULE_MARKERS[r][0], markerfacecolor="none",
                       markeredgecolor=RULE_MARKERS[r][1], markersize=6, label=RULE_MARKERS[r][2])
                for r in RULE_MARKERS if r in used]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def to_ras(volume: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``volume`` with its axes permuted and flipped to the nearest RAS+ order (exact, no resampling), so that
    slices drawn with :func:`axial_view` look the same whatever orientation the file was stored in. A view, not
    a copy: a figure draws a slice of it (a CT's reoriented float copy cost 315 MB for one picture)."""
    from unionseg.data.io import reorient_to_ras

    return reorient_to_ras(volume, geometry, contiguous=False)[0]


def ras_spacing(geometry: Geometry) -> tuple[float, float, float]:
    """Voxel spacing (mm) along the axes of :func:`to_ras`'s volume (the file's spacing, permuted)."""
    import nibabel as nib

    out = [0.0, 0.0, 0.0]
    for axis, (ras_axis, _) in enumerate(nib.orientations.io_orientation(geometry.affine)):
        out[int(ras_axis)] = geometry.spacing[axis]
    return out[0], out[1], out[2]


def axial_aspect(geometry: Geometry) -> float:
    """The height / width of one pixel of :func:`axial_view` on ``geometry``'s grid (antero-posterior over
    left-right spacing), for ``imshow(aspect=...)``: a grid of 0.7 x 1.4 mm pixels is drawn twice as tall as
    wide, as a viewer shows it, not square."""
    sx, sy, _ = ras_spacing(geometry)
    return sy / sx


def axial_view(ras: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a RAS+ volume as radiologists view it: anterior at the top, the patient's right on
    the left of the image (row 0 at the top, as ``imshow`` draws by default)."""
    return ras[:, :, k].T[::-1, ::-1]


def mark_sides(ax: Any) -> None:
    """Write R and L at the left and right edges of an axial view (the patient's sides)."""
    for x, side, align in ((0.01, "R", "left"), (0.99, "L", "right")):
        ax.text(x, 0.5, side, transform=ax.transAxes, color="yellow", fontsize=8, ha=align, va="center")


def largest_slice(mask: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice with the most foreground (the middle slice if ``mask`` is empty)."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    counts = np.count_nonzero(mask, axis=other)
    return int(np.argmax(counts)) if counts.any() else mask.shape[axis] // 2


def _rgba(codes: np.ndarray, space: LabelSpace, colours: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros((*codes.shape, 4))
    for code in np.unique(codes):
        code = int(code)
        if code == 0:
            continue
        leaf = code if code < space.n_leaves else space.groups[code - space.n_leaves].organ_id
        where = codes == code
        rgba[where, :3] = colours[leaf]
        rgba[where, 3] = alpha
    return rgba


def overlay(
    pred: np.ndarray,
    gt: np.ndarray,
    space: LabelSpace,
    geometry: Geometry,
    path: Path,
    title: str = "",
    image: np.ndarray | None = None,
    window: tuple[float, float] = (-325.0, 325.0),
    alpha: float = 0.45,
) -> Path:
    """Truth and prediction on the axial slice through the largest ground-truth extent, in the radiological
    convention (anterior up, the patient's right on the left), whatever the file's orientation, each pixel
    drawn at its in-plane spacing's proportions.

    Args:
        pred: (X, Y, Z) leaf ids.
        gt: (X, Y, Z) global codes (region codes drawn in their organ's colour).
        space: the label space (class names and colours).
        geometry: the grid, to find the axial axis.
        path: PNG to write.
        title: figure title.
        image: optional (X, Y, Z) CT on the same grid (any numeric dtype), drawn in grey with ``window`` (HU).
        window: display window (low, high).
        alpha: label opacity.
    """
    from matplotlib.patches import Patch

    gt, pred = to_ras(gt, geometry), to_ras(pred, geometry)
    ct = None if image is None else to_ras(image, geometry)
    index = largest_slice(gt > 0, 2) if np.any(gt) else largest_slice(pred > 0, 2)
    aspect = axial_aspect(geometry)
    colours = leaf_colours(space)
    fig = _figure(9.0, 4.8)
    present: set[int] = set()
    for col, (name, labels) in enumerate((("ground truth", gt), ("prediction", pred))):
        ax = fig.add_subplot(1, 2, col + 1)
        sl = axial_view(labels, index)
        if ct is not None:
            ax.imshow(axial_view(ct, index), cmap="gray", vmin=window[0], vmax=window[1],
                      interpolation="nearest", aspect=aspect)
        else:
            ax.imshow(np.zeros(sl.shape), cmap="gray", vmin=0, vmax=1, aspect=aspect)
        ax.imshow(_rgba(sl, space, colours, alpha), interpolation="nearest", aspect=aspect)
        ax.set_title(f"{name} (axial slice {index + 1} of {labels.shape[2]}, from the feet)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        mark_sides(ax)
        for code in np.unique(sl):
            code = int(code)
            if code:
                present.add(code if code < space.n_leaves else space.groups[code - space.n_leaves].organ_id)
    handles = [Patch(color=colours[leaf], label=space.names[leaf]) for leaf in sorted(present)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
