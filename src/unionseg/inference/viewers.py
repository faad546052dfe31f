"""Label tables for image viewers, written by ``unionseg predict`` beside its label maps.

A NIfTI label map holds numbers; a viewer shows them as "label 3" in an arbitrary colour. These two small
files give every value its class name and the colour the evaluation overlays use:

* ``unionseg_labels.itksnap.txt``: ITK-SNAP's label description file (Segmentation > Import Label
  Descriptions);
* ``unionseg_labels.ctbl``: a 3D Slicer colour table (load it, then pick it as the segmentation's or the
  label map's colour table).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from unionseg.errors import UnionsegWarning
from unionseg.jsonfile import write_text
from unionseg.labels import LabelSpace

ITKSNAP_FILE = "unionseg_labels.itksnap.txt"
SLICER_FILE = "unionseg_labels.ctbl"
MARK = "written by unionseg predict"


def _rgb(space: LabelSpace) -> list[tuple[int, int, int]]:
    from unionseg.evaluation.figures import leaf_colours

    return [(round(r * 255), round(g * 255), round(b * 255)) for r, g, b in leaf_colours(space)]


def _word(name: str) -> str:
    """A class name as one word without quotes (both files split on white space; ITK-SNAP quotes the name)."""
    return re.sub(r"\s+", "_", name.strip()).replace('"', "'")


def itksnap_table(space: LabelSpace) -> str:
    """ITK-SNAP's label description file: ``IDX R G B A VIS MSH "LABEL"`` per value, 0 the clear label."""
    lines = [f"# ITK-SnAP Label Description File, {MARK}", "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL"]
    for value, (name, (r, g, b)) in enumerate(zip(space.names, _rgb(space), strict=True)):
        shown = "Clear Label" if value == 0 else _word(name)
        alpha, visible = (0, 0) if value == 0 else (1, 1)
        lines.append(f"{value:5d} {r:5d} {g:4d} {b:4d} {alpha:8d} {visible:2d} {visible:2d}    \"{shown}\"")
    return "\n".join(lines) + "\n"


def slicer_table(space: LabelSpace) -> str:
    """A 3D Slicer colour table: ``value name R G B A`` per value (0-255), 0 transparent."""
    lines = [f"# Color table file, {MARK}", f"# {space.n_leaves} values"]
    for value, (name, (r, g, b)) in enumerate(zip(space.names, _rgb(space), strict=True)):
        lines.append(f"{value} {_word(name)} {r} {g} {b} {0 if value == 0 else 255}")
    return "\n".join(lines) + "\n"


def write_label_tables(folder: str | Path, space: LabelSpace) -> list[Path]:
    """Write both tables into ``folder`` (atomically); returns the files written. The tables an earlier
    predict wrote are written again (they follow the model of the latest predict; a warning says when their
    classes change, since the earlier label maps in the folder then read differently); a file of that name
    that unionseg did not write is left as it is, with a warning."""
    folder = Path(folder)
    written = []
    changed = False
    for name, text in ((ITKSNAP_FILE, itksnap_table(space)), (SLICER_FILE, slicer_table(space))):
        path = folder / name
        if path.exists():
            try:
                before = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                before = ""
            if MARK not in before.partition("\n")[0]:
                warnings.warn(f"{path}: not written by unionseg predict; left as it is (the label names and "
                              "colours for viewers were not written)", UnionsegWarning, stacklevel=2)
                continue
            changed = changed or before != text
            if before == text:  # the same tables: not rewritten (another user's, in a shared folder, could not be)
                written.append(path)
                continue
        write_text(path, text)
        written.append(path)
    if changed:
        warnings.warn(f"{folder}: its label tables ({ITKSNAP_FILE}, {SLICER_FILE}) are written again for this "
                      "model's classes, which differ from those of the earlier predict into this folder: its "
                      "earlier label maps do not read with them", UnionsegWarning, stacklevel=2)
    return written
