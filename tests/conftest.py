"""Shared fixtures. Keep every fixture tiny: the whole suite must stay within minutes on 2 CPU cores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unionseg.labels import DatasetLabels, LabelSpace, Leaf

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(autouse=True)
def _progress_starts_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the progress lines' silence clock of a fresh process. It is process-wide (a
    chain of progress objects is never silent past an interval), so in one test session a command run 30 s
    after the last progress line printed one at its first step, above the one line a test expected."""
    import time

    monkeypatch.setattr("unionseg.progress._LAST_LINE", [time.monotonic()])
    monkeypatch.setattr("unionseg.progress._LAST_ACTIVITY", [float("-inf")])


@pytest.fixture(autouse=True, scope="session")
def _sigint_delivered() -> None:
    """A suite started in the background of a script (`make test &`, `nohup ... &`) inherits SIGINT ignored,
    and the trainer leaves an ignored SIGINT ignored, as it should; the Ctrl-C tests then saw no stop. The
    suite runs with SIGINT delivered, as in a terminal (children started by the tests inherit that too)."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real CT files; the test is skipped when the folder is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip("../shared/data/real is absent")
    return REAL_DATA


def make_space() -> LabelSpace:
    """Liver/kidney/pancreas/spleen with tumours; four single-organ datasets whose local values collide."""
    leaves = [
        Leaf("liver"), Leaf("liver_tumour", "liver"),
        Leaf("kidney"), Leaf("kidney_tumour", "kidney"),
        Leaf("pancreas"), Leaf("pancreas_tumour", "pancreas"),
        Leaf("spleen"),
    ]
    datasets = [
        DatasetLabels("liver", {1: "liver", 2: "liver_tumour"}, ("liver", "liver_tumour")),
        DatasetLabels("kidney", {1: "kidney", 2: "kidney_tumour"}, ("kidney", "kidney_tumour")),
        DatasetLabels("pancreas", {1: "pancreas", 2: "pancreas_tumour"}, ("pancreas", "pancreas_tumour")),
        DatasetLabels("spleen", {1: "spleen"}, ("spleen",)),
    ]
    return LabelSpace(leaves, datasets)


@pytest.fixture()
def space() -> LabelSpace:
    return make_space()


# ---------------------------------------------------------------------- tiny dataset folders (Foundation I)
def write_tiny_case(image_path: Path, label_path: Path | None, seed: int = 0, values: tuple[int, ...] = (1, 2),
                    shape: tuple[int, int, int] = (6, 5, 4)) -> None:
    """Write a tiny CT-like image (int16 HU) and a label map holding ``values`` (uint8)."""
    import numpy as np

    from unionseg.data.io import Geometry, write_image

    rng = np.random.default_rng(seed)
    geom = Geometry.identity(shape, (2.0, 2.0, 3.0))
    write_image(image_path, rng.integers(-1000, 400, shape).astype(np.int16), geom, replace=True)
    if label_path is not None:
        label = np.zeros(shape, dtype=np.uint8)
        for k, value in enumerate(values):
            label[1 + k, 1:3, 1:3] = value
        write_image(label_path, label, geom, replace=True)


def _case_seed(prefix: str, i: int) -> int:
    """Case ``i`` of a dataset whose ids start with ``prefix``: datasets of other prefixes get other images
    (the same seed gave liver_000 and kidney_000 the same bytes, which prepare warns about as a shared image)."""
    import zlib

    return i if prefix == "case" else i + 1000 * (zlib.crc32(prefix.encode()) % 997 + 1)


def write_msd_dataset(root: Path, n_cases: int = 3, labels: dict[int, str] | None = None,
                      prefix: str = "case", values: tuple[int, ...] = (1, 2)) -> Path:
    """A Medical Segmentation Decathlon folder: ``dataset.json`` + ``imagesTr/`` + ``labelsTr/``."""
    import json

    labels = labels if labels is not None else {0: "background", 1: "organ", 2: "tumour"}
    training = []
    for i in range(n_cases):
        name = f"{prefix}_{i:03d}.nii.gz"
        write_tiny_case(root / "imagesTr" / name, root / "labelsTr" / name, seed=_case_seed(prefix, i), values=values)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    data = {"name": root.name, "labels": {str(k): v for k, v in labels.items()}, "numTraining": n_cases,
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(data, indent=1))
    return root


def write_nnunet_dataset(root: Path, n_cases: int = 3, labels: dict[str, int] | None = None,
                         prefix: str = "case", values: tuple[int, ...] = (1, 2)) -> Path:
    """An nnU-Net v2 raw folder: ``imagesTr/<case>_0000.nii.gz`` and ``labelsTr/<case>.nii.gz``."""
    import json

    labels = labels if labels is not None else {"background": 0, "organ": 1, "tumour": 2}
    for i in range(n_cases):
        case = f"{prefix}_{i:03d}"
        write_tiny_case(root / "imagesTr" / f"{case}_0000.nii.gz", root / "labelsTr" / f"{case}.nii.gz",
                        seed=_case_seed(prefix, i), values=values)
    data = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": n_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(data, indent=1))
    return root


TINY_PROJECT_YAML = """\
name: tiny
classes:
  - liver
  - {name: liver_tumour, part_of: liver}
  - kidney
  - {name: kidney_tumour, part_of: kidney}
datasets:
  - name: liver
    root: datasets/liver
    labels: {1: liver, 2: liver_tumour}
    annotated: [liver, liver_tumour]
    split: {val_fraction: 0.25, seed: 0}
  - name: kidney
    root: datasets/kidney
    labels: {1: kidney, 2: kidney_tumour}
    annotated: [kidney, kidney_tumour]
  - name: test
    root: datasets/test
    role: test
    labels: {1: liver, 2: kidney}
    annotated: [region:liver, region:kidney]
preprocessing: {spacing: [3.0, 3.0, 3.0], window: [-325, 325]}
"""


def write_tiny_project(folder: Path, text: str = TINY_PROJECT_YAML) -> Path:
    """A project folder: ``project.yaml`` + an MSD liver set (4 cases), an nnU-Net kidney set (3 cases) and
    an MSD test set (2 cases). Returns the project file."""
    write_msd_dataset(folder / "datasets" / "liver", 4, {0: "background", 1: "liver", 2: "liver tumour"},
                      prefix="liver")
    write_nnunet_dataset(folder / "datasets" / "kidney", 3, {"background": 0, "kidney": 1, "kidney tumour": 2},
                         prefix="kidney")
    write_msd_dataset(folder / "datasets" / "test", 2, {0: "background", 1: "liver", 2: "kidney"}, prefix="test")
    path = folder / "project.yaml"
    path.write_text(text)
    return path


@pytest.fixture()
def tiny_project(tmp_path: Path) -> Path:
    """Path of a tiny three-dataset project file (MSD + nnU-Net v2 layouts) under ``tmp_path``."""
    return write_tiny_project(tmp_path / "project")


def console_script(name: str) -> Path:
    """The venv's console script ``name`` (unionseg, torchrun); the test is skipped where it is missing."""
    import sys

    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"the {name} console script is not installed")
    return path


def wait_for_log_rows(proc: object, log: Path, rows: int, timeout: float = 180) -> None:
    """Wait until a running training (``proc``, a Popen) has logged ``rows`` steps in ``log``; fails with its
    stderr if it ended first."""
    import subprocess
    import time

    assert isinstance(proc, subprocess.Popen)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) > rows:  # the header and `rows` steps
            return
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    raise AssertionError(f"{log}: fewer than {rows} steps after {timeout} s")


def write_dicom_series(folder: Path, shape: tuple[int, int, int] = (16, 16, 6), name: str = "IM{:04d}",
                        slices: Sequence[int] | None = None, shift: float = 0.0) -> None:
    """A CT series of one file per slice, named as scanners and PACS exports often do (no suffix);
    ``slices``: the slice numbers written (all by default), 3 mm apart; ``shift``: how far (mm) each slice's
    position moves along y from the one before (a tilted gantry)."""
    import locale

    import SimpleITK as sitk

    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the C locale behind (the reader does not)
    try:
        _write_dicom_slices(sitk, folder, shape, name, range(shape[2]) if slices is None else slices, shift)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(sitk: Any, folder: Path, shape: tuple[int, int, int], name: str, slices: Sequence[int],
                        shift: float = 0.0) -> None:
    folder.mkdir(parents=True)
    x, y, _ = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    ct = np.where((x / 0.8) ** 2 + (y / 0.7) ** 2 < 1, 50, -1000).astype(np.int16)
    volume = sitk.GetImageFromArray(np.transpose(ct, (2, 1, 0)))
    volume.SetSpacing((2.0, 2.0, 3.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in slices:
        plane = volume[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.2"), ("0020|0013", str(k + 1)),
                           ("0020|0032", f"0\\{shift * k}\\{3.0 * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0028|0030", "2\\2"), ("0018|0050", "3")):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / "slice.dcm"))  # the writer picks its format by the suffix
        writer.Execute(plane)
        (folder / "slice.dcm").rename(folder / name.format(k))
