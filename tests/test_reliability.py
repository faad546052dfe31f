"""The bad-input corpus: every broken input a user can feed unionseg, generated here (no committed binaries).

Each kind asserts, through the command line (``unionseg.cli.run`` in-process; a few as real processes):
exit code 2, exactly one line ``error: <file>: <problem>`` on stderr naming the file at fault and the
problem, and no partial output (no cache entry for the failing case, no ``index.json``, no prediction
file; every file of the project folder unchanged). Two kinds are not errors: a model trained at another spacing predicts on the input's exact grid,
and an image whose intensities are not CT produces a warning with a fixed text.

Set ``UNIONSEG_CORPUS_TABLE=<file>`` to write the messages users see as a Markdown table (used for
``docs/reliability.md``).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import TINY_PROJECT_YAML, write_dicom_series, write_tiny_case, write_tiny_project
from unionseg.cli import run
from unionseg.data.io import Geometry, read_image, write_image

UNIONSEG = Path(sys.executable).with_name("unionseg")
LIVER_IMAGE = "datasets/liver/imagesTr/liver_000.nii.gz"
LIVER_LABEL = "datasets/liver/labelsTr/liver_000.nii.gz"
LIVER_JSON = "datasets/liver/dataset.json"


# ---------------------------------------------------------------------- the corpus
@dataclass
class Bad:
    """One broken input: the command to run, the file the message must name, and the problem.

    Attributes:
        argv: the command line (paths absolute).
        path: the file or folder the message must name (printed first).
        problem: a substring of the problem text.
        absent: files or glob patterns (relative to the project folder) that must not exist afterwards.
        command: the command's name for the docs table.
    """

    argv: list[str]
    path: Path
    problem: str
    absent: list[str] = field(default_factory=list)
    command: str = "prepare"


CORPUS: dict[str, Callable[[Path], Bad]] = {}
DESCRIPTIONS: dict[str, str] = {}
_SEEN: dict[str, tuple[str, str, int, str]] = {}  # kind -> (description, command, exit code, stderr)


def bad_input(description: str) -> Callable[[Callable[[Path], Bad]], Callable[[Path], Bad]]:
    def wrap(build: Callable[[Path], Bad]) -> Callable[[Path], Bad]:
        name = build.__name__.removeprefix("bad_")
        CORPUS[name] = build
        DESCRIPTIONS[name] = description
        return build

    return wrap


def _prepare(folder: Path, path: Path, problem: str, case: str = "liver/liver_000") -> Bad:
    """A ``prepare`` run that must fail on ``path``, leaving no entry for ``case`` and no index."""
    dataset, case_id = case.split("/")
    return Bad(["prepare", str(folder / "project.yaml"), "--workers", "0"], path, problem,
               absent=["prepared/index.json", f"prepared/{dataset}/{case_id}.*", f"prepared/{dataset}/.{case_id}.*"])


def _geom(shape: tuple[int, ...] = (6, 5, 4)) -> Geometry:
    return Geometry.identity(shape, (2.0, 2.0, 3.0))


def _nifti(path: Path, array: np.ndarray) -> None:
    """Write any array (2D, 4D, NaN, float labels) as NIfTI, bypassing our writer's checks."""
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))


def _nifti_affine(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@bad_input("prepare: a second project file would replace the cases another one prepared in the same cache")
def bad_second_project_file_shares_the_cache(folder: Path) -> Bad:
    assert run(["prepare", str(folder / "project.yaml"), "--workers", "0"]) == 0
    other = folder / "coarse.yaml"
    other.write_text((folder / "project.yaml").read_text().replace("spacing: [3.0, 3.0, 3.0]", "spacing: [4.0, 4.0, 4.0]"))
    return Bad(["prepare", str(other), "--workers", "0"], folder / "prepared",
               "this cache holds the cases project.yaml prepared; preparing coarse.yaml here would replace")


@bad_input("label map shape differs from its image")
def bad_shape_mismatch(folder: Path) -> Bad:
    write_image(folder / LIVER_LABEL, np.zeros((6, 5, 5), np.uint8), _geom((6, 5, 5)), replace=True)
    return _prepare(folder, folder / LIVER_LABEL, "label shape (6, 5, 5) differs from image shape (6, 5, 4)")


@bad_input("label map has the image's shape but another affine (origin moved 10 mm)")
def bad_affine_mismatch(folder: Path) -> Bad:
    geom = _geom()
    moved = geom.affine.copy()
    moved[0, 3] += 10.0
    write_image(folder / LIVER_LABEL, np.zeros((6, 5, 4), np.uint8), Geometry((6, 5, 4), moved), replace=True)
    return _prepare(folder, folder / LIVER_LABEL, "label grid does not match image liver_000.nii.gz")


@bad_input("label values its dataset.json does not declare")
def bad_unmapped_label_values(folder: Path) -> Bad:
    write_tiny_case(folder / LIVER_IMAGE, folder / LIVER_LABEL, values=(1, 2, 7))
    return _prepare(folder, folder / LIVER_LABEL, "holds values [7] that its dataset.json does not declare")


@bad_input("float label map with non-integer values")
def bad_float_labels(folder: Path) -> Bad:
    label = np.zeros((6, 5, 4), np.float32)
    label[1, 1:3, 1:3] = 0.5
    _nifti(folder / LIVER_LABEL, label)
    return _prepare(folder, folder / LIVER_LABEL, "non-integer values (e.g. [0.5]); labels must be integers")


@bad_input("NaN voxels in the image")
def bad_nan_voxels(folder: Path) -> Bad:
    image = np.full((6, 5, 4), -500.0, np.float32)
    image[2, 2, 2] = np.nan
    _nifti(folder / LIVER_IMAGE, image)
    return _prepare(folder, folder / LIVER_IMAGE, "image holds 1 non-finite (NaN/inf) voxels")


@bad_input("infinite voxels in the image")
def bad_inf_voxels(folder: Path) -> Bad:
    image = np.full((6, 5, 4), -500.0, np.float32)
    image[0, 0, :2] = np.inf
    _nifti(folder / LIVER_IMAGE, image)
    return _prepare(folder, folder / LIVER_IMAGE, "image holds 2 non-finite (NaN/inf) voxels")


@bad_input("NaN in a float label map")
def bad_nan_labels(folder: Path) -> Bad:
    label = np.zeros((6, 5, 4), np.float32)
    label[1, 1, 1] = np.nan
    _nifti(folder / LIVER_LABEL, label)
    return _prepare(folder, folder / LIVER_LABEL, "label map holds non-finite values")


@bad_input("2D image")
def bad_image_2d(folder: Path) -> Bad:
    _nifti(folder / LIVER_IMAGE, np.zeros((6, 5), np.int16))
    return _prepare(folder, folder / LIVER_IMAGE, "2D image of shape (6, 5); a 3D volume is required")


@bad_input("4D image (two channels)")
def bad_image_4d(folder: Path) -> Bad:
    _nifti(folder / LIVER_IMAGE, np.zeros((6, 5, 4, 2), np.int16))
    return _prepare(folder, folder / LIVER_IMAGE, "4D image of shape (6, 5, 4, 2); a 3D volume is required")


@bad_input("empty image file (0 bytes)")
def bad_empty_file(folder: Path) -> Bad:
    (folder / LIVER_IMAGE).write_bytes(b"")
    return _prepare(folder, folder / LIVER_IMAGE, "empty file (0 bytes)")


@bad_input("truncated gzip (first half of a .nii.gz)")
def bad_truncated_gzip(folder: Path) -> Bad:
    path = folder / LIVER_IMAGE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return _prepare(folder, path, "truncated or corrupt compressed file")


@bad_input("not an image: a text file named .nii.gz")
def bad_text_named_nii_gz(folder: Path) -> Bad:
    (folder / LIVER_LABEL).write_text("this is not an image\n")
    return _prepare(folder, folder / LIVER_LABEL, "not a gzip-compressed file")


@bad_input("an uncompressed NIfTI file named .nii.gz")
def bad_uncompressed_nifti_named_gz(folder: Path) -> Bad:
    path = folder / LIVER_LABEL
    array, geom = read_image(path)
    write_image(folder / "plain.nii", array, geom)
    path.write_bytes((folder / "plain.nii").read_bytes())
    return _prepare(folder, path, "an uncompressed NIfTI file named .gz; rename it liver_000.nii")


@bad_input("not an image: gzip-compressed text named .nii.gz")
def bad_gzip_of_text(folder: Path) -> Bad:
    (folder / LIVER_LABEL).write_bytes(gzip.compress(b"this is not an image\n" * 20))
    return _prepare(folder, folder / LIVER_LABEL, "not a NIfTI image (no valid NIfTI-1/NIfTI-2 header)")


@bad_input("corrupted .nii.gz that still inflates (its gzip CRC does not match)")
def bad_gzip_crc_mismatch(folder: Path) -> Bad:
    path = folder / LIVER_IMAGE
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # the stored CRC-32; nib.load alone never reads it
    path.write_bytes(bytes(data))
    return _prepare(folder, path, "truncated or corrupt compressed file (CRC check failed")


@bad_input("header with a voxel size of 0 and no sform (nibabel would assume 1 mm)")
def bad_zero_voxel_size(folder: Path) -> Bad:
    path = folder / LIVER_IMAGE
    img = nib.Nifti1Image(read_image(path)[0], None)  # no sform, no qform: placed by its voxel sizes
    raw = bytearray(img.header.binaryblock + b"\0" * 4 + img.get_fdata(dtype=np.float32).astype(
        img.get_data_dtype()).tobytes(order="F"))
    raw[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1:4], which nibabel's writer would fill in again
    path.write_bytes(gzip.compress(bytes(raw)))
    return _prepare(folder, path, "the header gives a voxel size of 0 (pixdim 0, 0, 0) and no sform")


@bad_input("voxel spacing no CT has (a header in metres that does not say so: 0.002 mm voxels)")
def bad_spacing_in_metres(folder: Path) -> Bad:
    image, _ = read_image(folder / LIVER_IMAGE)
    _nifti_affine(folder / LIVER_IMAGE, image, np.diag([0.002, 0.002, 0.003, 1.0]))
    return _prepare(folder, folder / LIVER_IMAGE, "voxel spacing (0.002, 0.002, 0.003) mm is outside 0.01-100 mm")


@bad_input("nnU-Net dataset.json declares an 'ignore' label (voxels of unknown class)")
def bad_nnunet_ignore_label(folder: Path) -> Bad:
    path = folder / "datasets/kidney/dataset.json"
    _edit_json(path, lambda d: d["labels"].update(ignore=3))
    return _prepare(folder, path, "dataset.json declares nnU-Net's 'ignore' label (value 3) for dataset 'kidney'",
                    case="kidney/kidney_000")


@bad_input("nnU-Net dataset.json gives one value two names")
def bad_nnunet_value_named_twice(folder: Path) -> Bad:
    path = folder / "datasets/kidney/dataset.json"
    _edit_json(path, lambda d: d["labels"].update(renal_cortex=1))
    return _prepare(folder, path, "labels: value 1 is named both 'kidney' and 'renal_cortex'", case="kidney/kidney_000")


@bad_input("MSD dataset.json gives a label key twice (JSON keeps the last)")
def bad_msd_label_key_twice(folder: Path) -> Bad:
    path = folder / LIVER_JSON
    path.write_text(path.read_text().replace('"1": "liver"', '"1": "liver", "1": "spleen"'))
    return _prepare(folder, path, "labels: key '1' is given twice")


@bad_input("nnU-Net file_ending matches none of the images")
def bad_nnunet_file_ending(folder: Path) -> Bad:
    path = folder / "datasets/kidney/dataset.json"
    _edit_json(path, lambda d: d.update(file_ending=".nii"))
    return _prepare(folder, path, "file_ending is '.nii', but the images in imagesTr end otherwise",
                    case="kidney/kidney_000")


@bad_input("label file listed in dataset.json is missing")
def bad_missing_label_file(folder: Path) -> Bad:
    (folder / LIVER_LABEL).unlink()
    return _prepare(folder, folder / LIVER_LABEL, "label file for case 'liver_000' is missing")


@bad_input("image file listed in dataset.json is missing")
def bad_missing_image_file(folder: Path) -> Bad:
    (folder / LIVER_IMAGE).unlink()
    return _prepare(folder, folder / LIVER_IMAGE, "image file listed in dataset.json is missing")


@bad_input("image listed in dataset.json is a broken link (its target on a disk that is not mounted)")
def bad_image_is_a_broken_link(folder: Path) -> Bad:
    (folder / LIVER_IMAGE).unlink()
    os.symlink(folder / "unmounted" / "liver_000.nii.gz", folder / LIVER_IMAGE)
    return _prepare(folder, folder / LIVER_IMAGE, "broken link: its target")


@bad_input("an nnU-Net v1 task folder (images named case_0000) read as MSD")
def bad_nnunet_v1_task_folder(folder: Path) -> Bad:
    images = (folder / LIVER_IMAGE).parent
    for image in sorted(images.iterdir()):
        image.rename(image.with_name(image.name.replace(".nii.gz", "_0000.nii.gz")))
    return _prepare(folder, folder / LIVER_IMAGE, "liver_000_0000.nii.gz is there: an nnU-Net v1 task folder")


@bad_input("duplicate case ids in dataset.json")
def bad_duplicate_case_ids(folder: Path) -> Bad:
    _edit_json(folder / LIVER_JSON, lambda d: d["training"].append(dict(d["training"][0])))
    return _prepare(folder, folder / LIVER_IMAGE, "duplicate case id 'liver_000'")


@bad_input("empty dataset folder")
def bad_empty_dataset_folder(folder: Path) -> Bad:
    root = folder / "datasets/liver"
    shutil.rmtree(root)
    root.mkdir()
    return _prepare(folder, root, "dataset folder is empty")


@bad_input("dataset folder does not exist")
def bad_missing_dataset_folder(folder: Path) -> Bad:
    shutil.rmtree(folder / "datasets/liver")
    return _prepare(folder, folder / "datasets/liver", "folder of dataset 'liver' not found")


@bad_input("dataset.json is not valid JSON")
def bad_json_syntax(folder: Path) -> Bad:
    (folder / LIVER_JSON).write_text('{"labels": {"0": "background",')
    return _prepare(folder, folder / LIVER_JSON, "invalid JSON")


@bad_input("dataset.json misses a key ('labels')")
def bad_json_missing_key(folder: Path) -> Bad:
    _edit_json(folder / LIVER_JSON, lambda d: d.pop("labels"))
    return _prepare(folder, folder / LIVER_JSON, "missing key 'labels'")


@bad_input("dataset.json has a wrong type ('training' is a string)")
def bad_json_wrong_type(folder: Path) -> Bad:
    _edit_json(folder / LIVER_JSON, lambda d: d.update(training="./imagesTr"))
    return _prepare(folder, folder / LIVER_JSON, "'training' must be a list of {image, label}")


@bad_input("dataset.json label value is not an integer")
def bad_json_label_key_type(folder: Path) -> Bad:
    _edit_json(folder / LIVER_JSON, lambda d: d.update(labels={"0": "background", "one": "liver"}))
    return _prepare(folder, folder / LIVER_JSON, "labels: key 'one' is not an integer value")


@bad_input("dataset.json path escapes the dataset root")
def bad_json_path_escapes_root(folder: Path) -> Bad:
    _edit_json(folder / LIVER_JSON, lambda d: d["training"][0].update(image="../kidney/imagesTr/kidney_000_0000.nii.gz"))
    return _prepare(folder, folder / LIVER_JSON, "training[0].image: path '../kidney/imagesTr/kidney_000_0000.nii.gz' "
                                                 "escapes the dataset root")


@bad_input("dataset.json holds an absolute path")
def bad_json_absolute_path(folder: Path) -> Bad:
    _edit_json(folder / LIVER_JSON, lambda d: d["training"][0].update(label="/etc/passwd"))
    return _prepare(folder, folder / LIVER_JSON, "training[0].label: absolute path '/etc/passwd' is not allowed")


@bad_input("project maps a label to an unknown global class")
def bad_unknown_global_class(folder: Path) -> Bad:
    (folder / "project.yaml").write_text(TINY_PROJECT_YAML.replace("{1: liver, 2: liver_tumour}",
                                                                   "{1: liver, 2: lung_tumour}"))
    return _prepare(folder, folder / "project.yaml", "unknown class 'lung_tumour'")


@bad_input("a class is part_of a class that does not exist")
def bad_region_parent_missing(folder: Path) -> Bad:
    (folder / "project.yaml").write_text(TINY_PROJECT_YAML.replace("{name: kidney_tumour, part_of: kidney}",
                                                                   "{name: kidney_tumour, part_of: kidneys}"))
    return _prepare(folder, folder / "project.yaml", "'kidney_tumour' is part_of 'kidneys', which is not a class")


@bad_input("benchmark --project: the project has no test set to score the methods on")
def bad_benchmark_project_without_a_test_set(folder: Path) -> Bad:
    text = TINY_PROJECT_YAML[: TINY_PROJECT_YAML.index("  - name: test")] + "preprocessing: {spacing: [3.0, 3.0, 3.0]}\n"
    (folder / "no_test.yaml").write_text(text)
    return Bad(["benchmark", "--suite", "ci", "--project", str(folder / "no_test.yaml"), "--methods", "naive", "-o",
                str(folder / "bench"), "--quiet"], folder / "no_test.yaml",
               "the benchmark scores every method on the project's test set: declare one", absent=["bench"],
               command="benchmark")


@bad_input("benchmark --project: the oracle row on training sets without full labels")
def bad_benchmark_project_oracle_without_full_labels(folder: Path) -> Bad:
    return Bad(["benchmark", "--suite", "ci", "--project", str(folder / "project.yaml"), "-o", str(folder / "bench"),
                "--quiet"], folder / "project.yaml",
               "row 'oracle' trains on full labels of every training set (oracle_labels), which datasets liver, "
               "kidney do not have", absent=["bench"], command="benchmark")


@bad_input("project maps a value its dataset.json does not declare")
def bad_undeclared_label_value(folder: Path) -> Bad:
    (folder / "project.yaml").write_text(TINY_PROJECT_YAML.replace("{1: liver, 2: liver_tumour}",
                                                                   "{1: liver, 3: liver_tumour}"))
    return _prepare(folder, folder / LIVER_JSON, "project maps label value 3 for dataset 'liver' (datasets.liver.labels "
                    f"in {folder / 'project.yaml'}), but dataset.json declares only [0, 1, 2] (0 'background', 1 "
                    "'liver', 2 'liver tumour'): map the values it declares")


@bad_input("train on a project that was never prepared")
def bad_train_unprepared(folder: Path) -> Bad:
    return Bad(["train", str(folder / "project.yaml"), "-o", str(folder / "run"), "--quiet", "steps=2"],
               folder / "prepared", "project is not prepared; run `unionseg prepare", absent=["run/*.pt"],
               command="train")


# ---------------------------------------------------------------------- predict: a tiny model file
def _save_tiny_model(path: Path, spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)) -> Path:
    """A deployable model file (untrained tiny ResUNet) of the tiny project's label space."""
    import torch

    from unionseg.config import PreprocessSpec, load_project
    from unionseg.modelfile import make_payload, save_model
    from unionseg.networks import build_network

    project_dir = path.parent / "model_project"
    if not (project_dir / "project.yaml").exists():
        project_dir.mkdir(parents=True, exist_ok=True)
        (project_dir / "project.yaml").write_text(TINY_PROJECT_YAML)
    space = load_project(project_dir / "project.yaml").label_space
    torch.manual_seed(0)
    net = build_network({"backbone": {"name": "resunet", "preset": "tiny"},
                         "head": {"name": "softmax", "out_channels": space.n_leaves}})
    payload = make_payload(method="naive", network=net.spec, state_dict=net.state_dict(), output_form="softmax",
                           channels=list(space.names), label_space=space,
                           preprocessing=PreprocessSpec(spacing=spacing), inference={"roi_size": [16, 16, 16]})
    return save_model(path, payload)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


def _predict(folder: Path, model: Path, inputs: list[Path], out: Path, path: Path, problem: str,
             absent: list[str]) -> Bad:
    return Bad(["predict", str(model), *map(str, inputs), "-o", str(out), "--device", "cpu"], path, problem,
               absent=absent, command="predict")


@bad_input("predict: output folder equal to the input folder")
def bad_predict_output_is_input(folder: Path) -> Bad:
    images = folder / "datasets/liver/imagesTr"
    return _predict(folder, folder / "model.pt", [images], images, images,
                    "output folder is the input folder of", ["datasets/liver/imagesTr/.*.tmp*",
                                                            "datasets/liver/imagesTr/*.ctbl"])


@bad_input("predict: output folder already holds files of the same names (MSD labelsTr: the ground truth)")
def bad_predict_output_holds_same_names(folder: Path) -> Bad:
    labels = folder / "datasets/liver/labelsTr"
    return _predict(folder, folder / "model.pt", [folder / "datasets/liver/imagesTr"], labels, labels,
                    "already holds liver_000.nii.gz", ["datasets/liver/labelsTr/.*.tmp*"])


@bad_input("predict --skip-existing: the folder's finished cases were written by another model")
def bad_predict_skip_existing_another_model(folder: Path) -> Bad:
    out = folder / "preds"
    assert run(["predict", str(folder / "model.pt"), str(folder / LIVER_IMAGE), "-o", str(out), "--device",
                "cpu"]) == 0
    other = _save_tiny_model(folder / "other" / "model.pt", spacing=(4.0, 4.0, 4.0))
    bad = _predict(folder, other, [folder / "datasets/liver/imagesTr"], out, out,
                   "was written by model", ["preds/liver_001.nii.gz", "preds/.*.tmp*"])
    bad.argv.append("--skip-existing")
    return bad


@bad_input("predict: -o names a file")
def bad_predict_output_is_a_file(folder: Path) -> Bad:
    target = folder / "project.yaml"
    return _predict(folder, folder / "model.pt", [folder / LIVER_IMAGE], target, target,
                    "output exists and is not a folder", [])


@bad_input("predict: two inputs whose names differ only in case (one file on macOS and Windows)")
def bad_predict_names_differ_in_case(folder: Path) -> Bad:
    other = folder / "elsewhere" / "Liver_000.nii.gz"
    other.parent.mkdir()
    shutil.copy(folder / LIVER_IMAGE, other)
    return _predict(folder, folder / "model.pt", [folder / LIVER_IMAGE, other], folder / "out", folder / "out",
                    "would both write liver_000.nii.gz and Liver_000.nii.gz", ["out"])


@bad_input("predict: model file does not exist")
def bad_predict_missing_model(folder: Path) -> Bad:
    return _predict(folder, folder / "nomodel.pt", [folder / LIVER_IMAGE], folder / "out", folder / "nomodel.pt",
                    "model file not found", ["out"])


@bad_input("predict: input file does not exist")
def bad_predict_missing_input(folder: Path) -> Bad:
    return _predict(folder, folder / "model.pt", [folder / "nowhere.nii.gz"], folder / "out",
                    folder / "nowhere.nii.gz", "input not found", ["out"])


@bad_input("predict: 4D input image")
def bad_predict_4d_image(folder: Path) -> Bad:
    image = folder / "scan.nii.gz"
    _nifti(image, np.zeros((6, 5, 4, 3), np.int16))
    return _predict(folder, folder / "model.pt", [image], folder / "out", image,
                    "4D image of shape (6, 5, 4, 3); a 3D volume is required", ["out"])  # not even an empty -o


@bad_input("predict: DICOM series with a slice missing (the reader would spread the rest evenly)")
def bad_predict_dicom_slice_missing(folder: Path) -> Bad:
    series = folder / "series"
    write_dicom_series(series, slices=[0, 1, 2, 4, 5])
    return _predict(folder, folder / "model.pt", [series], folder / "out", series,
                    "DICOM slices are not evenly spaced: slices 3 and 4 (of 5) lie 6 mm apart", ["out/series*"])


@bad_input("predict: DICOM series from a tilted gantry (read as a straight stack, its slices would be misplaced)")
def bad_predict_dicom_tilted(folder: Path) -> Bad:
    series = folder / "series"
    write_dicom_series(series, shift=1.5)
    return _predict(folder, folder / "model.pt", [series], folder / "out", series,
                    "DICOM slices shift 7.5 mm within their plane over the series", ["out"])


@bad_input("predict: NaN voxels in the input")
def bad_predict_nan_image(folder: Path) -> Bad:
    image = folder / "scan.nii.gz"
    array = np.full((6, 5, 4), -800.0, np.float32)
    array[1, 1, 1] = np.nan
    _nifti(image, array)
    return _predict(folder, folder / "model.pt", [image], folder / "out", image, "non-finite (NaN/inf)",
                    ["out/scan*"])


@bad_input("predict: input with a voxel spacing no CT has (1,000 mm: a header in microns that does not say so)")
def bad_predict_spacing_in_microns(folder: Path) -> Bad:
    image = folder / "scan.nii.gz"
    _nifti_affine(image, np.full((6, 5, 4), -800, np.int16), np.diag([1000.0, 1000.0, 2000.0, 1.0]))
    return _predict(folder, folder / "model.pt", [image], folder / "out", image,
                    "voxel spacing (1000, 1000, 2000) mm is outside", ["out/scan*"])


@bad_input("predict: truncated model file")
def bad_predict_truncated_model(folder: Path) -> Bad:
    model = folder / "model.pt"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 3])
    image = folder / LIVER_IMAGE
    return _predict(folder, model, [image], folder / "out", model, "truncated or corrupt model file", ["out"])


@bad_input("predict: a training checkpoint given as the model")
def bad_predict_checkpoint_as_model(folder: Path) -> Bad:
    import torch

    model = folder / "last.pt"
    torch.save({"format": "unionseg-checkpoint", "step": 3}, model)
    return _predict(folder, model, [folder / LIVER_IMAGE], folder / "out", model,
                    f"a training checkpoint, not a model file: give the run's model file, {folder / 'model.pt'}",
                    ["out"])


@bad_input("predict: the model given as a folder (the training run's output folder)")
def bad_predict_model_is_a_folder(folder: Path) -> Bad:
    run_dir = folder / "runs" / "naive"
    run_dir.mkdir(parents=True)
    shutil.copy(folder / "model.pt", run_dir / "model.pt")
    return _predict(folder, run_dir, [folder / LIVER_IMAGE], folder / "out", run_dir,
                    "is a folder; give the model file (", ["out"])


@bad_input("predict: model and image swapped (an image given as the model)")
def bad_predict_image_as_model(folder: Path) -> Bad:
    image = folder / LIVER_IMAGE
    return _predict(folder, image, [folder / "model.pt"], folder / "out", image,
                    "not a model file (neither a PyTorch zip archive nor a pickle) (an image: the model file "
                    "comes first", ["out"])


# ---------------------------------------------------------------------- running the corpus
def _project(tmp_path: Path, tiny_model_path: Path | None) -> Path:
    folder = tmp_path / "project"
    write_tiny_project(folder)
    if tiny_model_path is not None:
        shutil.copy(tiny_model_path, folder / "model.pt")
    return folder


def _leftovers(folder: Path, patterns: list[str]) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        found.extend(str(p.relative_to(folder)) for p in folder.glob(pattern))
    return found


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the tiny project: small files) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _record(kind: str, description: str, command: str, code: int, line: str, folder: Path) -> None:
    _SEEN[kind] = (description, command, code, line.replace(str(folder) + os.sep, ""))


@pytest.fixture(scope="module", autouse=True)
def _write_table() -> Iterator[None]:
    """With ``UNIONSEG_CORPUS_TABLE`` set, write the messages of this run as a Markdown table."""
    yield
    target = os.environ.get("UNIONSEG_CORPUS_TABLE")
    if not target or not _SEEN:
        return
    rows = ["| bad input | command | exit | what the user sees on stderr |", "|---|---|---|---|"]
    for description, command, code, line in _SEEN.values():
        rows.append(f"| {description} | `{command}` | {code} | `` {line} `` |")
    Path(target).write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("kind", list(CORPUS))
def test_bad_input_is_one_clear_error_with_no_partial_output(
    kind: str, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _project(tmp_path, tiny_model if CORPUS[kind].__name__.startswith("bad_predict") else None)
    bad = CORPUS[kind](folder)
    before = _snapshot(folder)
    capsys.readouterr()
    code = run(bad.argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {bad.path}: "), (lines[0], bad.path)
    assert bad.problem in lines[0], lines[0]
    assert "Traceback" not in err
    assert _leftovers(folder, bad.absent) == []
    # every file there before (inputs, ground truth, a model) is there after, byte for byte: the patterns
    # above name what must not appear, and some could never match what a command writes (helper-124)
    after = _snapshot(folder)
    assert {k: v for k, v in after.items() if k in before} == before, sorted(set(before) - set(after))
    _record(kind, DESCRIPTIONS[kind], bad.command, code, lines[0], folder)


def test_the_corpus_covers_at_least_twenty_kinds() -> None:
    assert len(CORPUS) >= 20


def test_good_project_twin_prepares_and_a_fixed_case_is_accepted(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Twin of the corpus: the untouched project prepares (exit 0, index written); after a failure, fixing
    the file is enough for the next run to complete."""
    folder = _project(tmp_path, None)
    bad = bad_shape_mismatch(folder)
    assert run(bad.argv) == 2
    write_tiny_case(folder / LIVER_IMAGE, folder / LIVER_LABEL)
    capsys.readouterr()
    assert run(bad.argv) == 0
    assert (folder / "prepared/index.json").is_file()
    assert (folder / "prepared/liver/liver_000.json").is_file()
    assert "error" not in capsys.readouterr().err


# ---------------------------------------------------------------------- real processes
REAL_PROCESS_KINDS = ("truncated_gzip", "unknown_global_class", "predict_output_is_input")


@pytest.mark.parametrize("kind", REAL_PROCESS_KINDS)
def test_real_process_exits_2_without_traceback(kind: str, tmp_path: Path, tiny_model: Path) -> None:
    folder = _project(tmp_path, tiny_model)
    bad = CORPUS[kind](folder)
    exe = [str(UNIONSEG)] if UNIONSEG.exists() else [sys.executable, "-m", "unionseg.cli"]
    proc = subprocess.run([*exe, *bad.argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad.path}: ") and bad.problem in lines[0], proc.stderr
    assert _leftovers(folder, bad.absent) == []


# ---------------------------------------------------------------------- not errors: spacing and intensity
def _oblique_ct(shape: tuple[int, int, int]) -> np.ndarray:
    """(X, Y, Z) HU: air, a soft-tissue ellipsoid (50 HU) off-centre towards +X, a bone block (800 HU) in it."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = ((x - 0.3) / 0.6) ** 2 + (y / 0.7) ** 2 + (z / 0.9) ** 2 < 1
    ct = np.where(body, 50.0, -1000.0)
    ct[body & (x > 0.55) & (y > 0.0)] = 800.0
    return ct.astype(np.float32)


def _lps_geometry(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Geometry:
    """A non-RAS grid (LPS axes, moved origin) at ``spacing``."""
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = (40.0, -25.0, 110.0)
    return Geometry(shape, aff)


def test_model_at_another_spacing_predicts_on_the_input_grid(tmp_path: Path, tiny_model: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The model was trained at 3 mm; the input is 1.5 x 1.2 x 2.5 mm in LPS: the label map comes back on
    the input's exact grid (shape and affine), never on the model's."""
    shape = (30, 26, 14)
    geom = _lps_geometry(shape, (1.5, 1.2, 2.5))
    image = tmp_path / "in" / "scan.nii.gz"
    write_image(image, _oblique_ct(shape).astype(np.int16), geom)
    out = tmp_path / "out"
    assert run(["predict", str(tiny_model), str(image), "-o", str(out), "--device", "cpu"]) == 0, capsys.readouterr()
    labels, got = read_image(out / "scan.nii.gz")
    source = read_image(image)[1]
    assert labels.shape == shape and labels.dtype == np.uint8
    assert got.same_grid(source, atol=1e-4)
    assert not got.same_grid(Geometry(shape, np.diag([3.0, 3.0, 3.0, 1.0])))
    _record("spacing", "model trained at 3 mm, image at 1.5 x 1.2 x 2.5 mm in LPS: resampled, predicted, mapped back",
            "predict", 0, f"(none; scan.nii.gz has the input's shape {shape} and affine)", tmp_path)


def test_another_spacing_is_resampled_correctly_not_just_reshaped() -> None:
    """A voxel-wise model (label from the voxel's own intensity) at 3 mm on a 1.2 x 1.5 x 2 mm LPS image: the
    labels on the input grid match the input's intensities; the same labels flipped along X do not."""
    import torch
    from torch import nn

    from unionseg.config import PreprocessSpec
    from unionseg.inference.predictor import Predictor
    from unionseg.labels import LabelSpace, Leaf

    class VoxelNet(nn.Module):
        """Logits [background, soft tissue, bone] from the normalised intensity alone (window [-325, 325])."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([-8.0 * x - 3.0, 4.0 - 8.0 * (x - 0.15).abs(), 12.0 * (x - 0.93)], dim=1)

    shape = (40, 32, 24)
    geom = _lps_geometry(shape, (1.2, 1.5, 2.0))
    ct = _oblique_ct(shape)
    space = LabelSpace([Leaf("soft"), Leaf("bone")])
    predictor = Predictor(VoxelNet(), space, PreprocessSpec(spacing=(3.0, 3.0, 3.0), crop_to_body=False),
                          inference={"roi_size": [16, 16, 16], "overlap": 0.25}, device="cpu", decision="argmax")
    labels, got = predictor.predict(ct, geom)  # type: ignore[misc]
    expected = np.select([ct > 300, ct > -300], [2, 1], 0)
    assert got.same_grid(geom) and labels.shape == shape
    agree = float(np.mean(labels == expected))
    assert agree > 0.93, agree
    assert float(np.mean(labels[::-1] == expected)) < agree - 0.2  # twin: a wrong grid would show


def test_non_ct_intensities_warn_with_a_clear_text(tmp_path: Path, tiny_model: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An MRI-like image (0..1) is accepted with a warning naming the file; a CT image gets none."""
    folder = _project(tmp_path, None)
    image = folder / LIVER_IMAGE
    capsys.readouterr()
    assert run(["prepare", str(folder / "project.yaml"), "--workers", "0"]) == 0
    assert "does not look like CT" not in capsys.readouterr().err  # twin: CT-like input, no warning
    write_image(image, np.random.default_rng(0).uniform(0, 1, (6, 5, 4)).astype(np.float32), _geom(), replace=True)
    assert run(["prepare", str(folder / "project.yaml"), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    text = "does not look like CT in Hounsfield units (expected air near -1000 and bone above 100); check the image"
    assert f"{image}: intensity range [" in err and text in err, err
    # predict warns too, and still writes its output
    out = tmp_path / "pred"
    assert run(["predict", str(tiny_model), str(image), "-o", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"{image}: intensity range [" in err and text in err, err
    assert (out / "liver_000.nii.gz").is_file()
    warning = next(line for line in err.splitlines() if line.startswith("warning: "))
    _record("non_ct", "image intensities not CT (an MRI-like 0..1 volume): accepted with a warning", "predict", 0,
            warning, tmp_path / "project")
