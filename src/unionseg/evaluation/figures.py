"""Evaluation figures (matplotlib, Agg canvas; pyplot and its global state are never touched).

* :func:`dice_boxplot`: per-class Dice over cases, box plot with the individual cases as points.
* :func:`overlay`: one axial slice (the one with the most ground-truth foreground) of a case, truth and
  prediction side by side, one colour per class over the CT (or over black when no image is found).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unionseg.labels import REGION_PREFIX, LabelSpace

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    tmp.replace(path)
    return path


def leaf_colours(space: LabelSpace) -> np.ndarray:
    """(L, 3) RGB in [0, 1]: one colour per leaf (background black); a part gets a lighter shade."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if space.n_leaves <= 11 else colormaps["tab20"]
    colours = np.zeros((space.n_leaves, 3))
    for leaf_id in range(1, space.n_leaves):
        colours[leaf_id] = cmap((leaf_id - 1) % cmap.N)[:3]
    return colours


def dice_boxplot(cases: Mapping[str, Mapping[str, Mapping[str, float]]], keys: Sequence[str], path: Path) -> Path:
    """Box plot of per-case Dice for every class in ``keys`` (those scored in at least one case)."""
    keys = [k for k in keys if any(k in scores for scores in cases.values())]
    fig = _figure(max(4.0, 1.1 * len(keys) + 1.5), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    data = [[float(scores[k]["dice"]) for scores in cases.values() if k in scores] for k in keys]
    labels = [k[len(REGION_PREFIX):] if k.startswith(REGION_PREFIX) else k for k in keys]
    if data:
        ax.boxplot(data, showfliers=False)
        rng = np.random.default_rng(0)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=12, color="black", alpha=0.6, zorder=3)
        ax.set_xticks(range(1, len(keys) + 1), labels, rotation=30, ha="right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice per class ({len(cases)} cases)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def to_ras(volume: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``volume`` with its axes permuted and flipped to the nearest RAS+ order (exact, no resampling), so that
    slices drawn with :func:`axial_view` look the same whatever orientation the file was stored in."""
    from unionseg.data.io import reorient_to_ras

    return reorient_to_ras(volume, geometry)[0]


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
        image: optional (X, Y, Z) CT on the same grid, drawn in grey with ``window`` (HU).
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
