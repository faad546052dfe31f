"""prepare -> train -> predict -> evaluate on real CT (``../shared/data/real``; skipped when absent).

The TotalSegmentator example CT (int32, RAS, 3 mm) is cut into overlapping slabs, each a case with its own
world position, and written as two partially labelled training sets whose label values collide (an MSD
liver set; an nnU-Net spleen + kidney set, whose two kidneys share one value as in KiTS) and a fully
labelled test set in the ``folders`` layout (the 30-slice int16 ``example_ct_sm`` with ``example_seg`` as it
is: its other structures are mapped to background in the project file). The labels come from the TotalSegmentator model, not from hand: this checks the pipeline
on real geometry, real Hounsfield values and real anatomy, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REAL_DATA

pytestmark = [pytest.mark.real, pytest.mark.slow]

TOTALSEG = REAL_DATA / "totalsegmentator"
SPLEEN, RIGHT_KIDNEY, LEFT_KIDNEY, LIVER = 1, 2, 3, 5  # TotalSegmentator's values (../shared/data/real)
SLABS = [(0, 80), (16, 96), (32, 112)]  # slice ranges of example_ct, one case each

PROJECT_YAML = """\
name: realct
classes: [liver, kidney, spleen]
datasets:
  - name: liver
    root: datasets/liver
    labels: {1: liver}
    annotated: [liver]
    split: {val_cases: [liver_002]}
  - name: abdomen
    root: datasets/abdomen
    labels: {1: spleen, 2: kidney}
    annotated: [spleen, kidney]
    split: {val_cases: [abdomen_002]}
  - name: test
    root: datasets/test
    layout: folders
    role: test
    labels: {TEST_LABELS}
    annotated: [liver, kidney, spleen]
preprocessing: {spacing: [6.0, 6.0, 6.0], window: [-325, 325]}
"""
TINY = ["network.preset=tiny", "data.patch_size=[32,32,32]", "data.batch_size=2", "steps=4", "val_every=4",
        "ckpt_every=4", "inference.roi_size=[32,32,32]", "inference.overlap=0.25", "amp=false", "device=cpu"]


def _save(path: Path, array: np.ndarray, like: object, z0: int = 0) -> None:
    """``array`` with the header of ``like`` (qform/sform codes kept), moved ``z0`` slices along its axis."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    affine = like.affine.copy()  # type: ignore[attr-defined]
    affine[:3, 3] += z0 * affine[:3, 2]
    header = like.header.copy()  # type: ignore[attr-defined]
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(array, affine, header)
    image.set_qform(affine, code=int(like.header["qform_code"]))  # type: ignore[attr-defined]
    image.set_sform(affine, code=int(like.header["sform_code"]))  # type: ignore[attr-defined]
    nib.save(image, str(path))


def _write_project(folder: Path) -> Path:
    import nibabel as nib

    ct = nib.load(str(TOTALSEG / "example_ct.nii.gz"))
    seg = np.asarray(nib.load(str(TOTALSEG / "example_seg_fast_force_split.nii.gz")).dataobj)
    image = np.asarray(ct.dataobj)
    liver = folder / "datasets" / "liver"
    abdomen = folder / "datasets" / "abdomen"
    training = []
    for i, (z0, z1) in enumerate(SLABS):
        name = f"liver_{i:03d}.nii.gz"
        _save(liver / "imagesTr" / name, image[..., z0:z1], ct, z0)
        _save(liver / "labelsTr" / name, (seg[..., z0:z1] == LIVER).astype(np.uint8), ct, z0)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        case = f"abdomen_{i:03d}"
        part = seg[..., z0:z1]
        label = np.where(part == SPLEEN, 1, np.where(np.isin(part, (RIGHT_KIDNEY, LEFT_KIDNEY)), 2, 0))
        _save(abdomen / "imagesTr" / f"{case}_0000.nii.gz", image[..., z0:z1], ct, z0)
        _save(abdomen / "labelsTr" / f"{case}.nii.gz", label.astype(np.uint8), ct, z0)
    (liver / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "liver"}, "modality": {"0": "CT"}, "numTraining": len(SLABS),
        "training": training, "test": []}))
    (abdomen / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "spleen": 1, "kidney": 2},
        "numTraining": len(SLABS), "file_ending": ".nii.gz"}))
    small = nib.load(str(TOTALSEG / "example_ct_sm.nii.gz"))
    truth = np.asarray(nib.load(str(TOTALSEG / "example_seg.nii.gz")).dataobj)
    test = folder / "datasets" / "test"
    _save(test / "images" / "ct_sm.nii.gz", np.asarray(small.dataobj), small)
    _save(test / "labels" / "ct_sm.nii.gz", truth.astype(np.uint8), small)  # TotalSegmentator's own values
    # its other structures (stomach, aorta, ...) are no class of this project: mapped to background
    names = {LIVER: "liver", RIGHT_KIDNEY: "kidney", LEFT_KIDNEY: "kidney", SPLEEN: "spleen"}
    test_labels = ", ".join(f"{v}: {names.get(v, 'background')}" for v in np.unique(truth).tolist() if v)
    assert len(test_labels.split(",")) > 20
    (folder / "project.yaml").write_text(PROJECT_YAML.replace("TEST_LABELS", test_labels))
    return folder / "project.yaml"


@pytest.fixture(scope="module")
def real_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (TOTALSEG / "example_ct.nii.gz").is_file():
        pytest.skip("../shared/data/real is absent")
    from unionseg.cli import run

    project = _write_project(tmp_path_factory.mktemp("realct"))
    assert run(["prepare", str(project), "--workers", "0"]) == 0
    return project


def test_real_slabs_prepare_into_one_label_space(real_project: Path) -> None:
    from unionseg.config import load_project
    from unionseg.data.preprocess import PreparedIndex

    project = load_project(real_project)
    index = PreparedIndex.load(project)
    space = project.label_space
    seen = {}
    for dataset in ("liver", "abdomen"):
        cases = index.cases(dataset=dataset)
        assert len(cases) == len(SLABS)
        seen[dataset] = set(np.unique(np.concatenate([np.unique(c.label()) for c in cases])).tolist())
    # the colliding local 1s end up as two different leaves; every code is one this dataset annotates
    assert seen["liver"] == {0, space.leaf_id("liver")}
    assert seen["abdomen"] == {0, space.leaf_id("spleen"), space.leaf_id("kidney")}
    image = index.cases(dataset="liver")[0].image()
    assert -1.01 <= float(image.min()) < float(image.max()) <= 1.01  # the window, normalised


@pytest.mark.parametrize("method", ["dodnet", "mskd", "cotraining", "marginal"])
def test_real_ct_end_to_end(real_project: Path, method: str, tmp_path: Path) -> None:
    """Each method trains on the real slabs, predicts the real int16 test CT on its own grid, and the Dice the
    evaluation reports are the ones the written files give."""
    import nibabel as nib

    from unionseg.cli import run
    from unionseg.config import load_project
    from unionseg.data.io import read_image

    run_dir = tmp_path / method
    assert run(["train", str(real_project), "--method", method, "-o", str(run_dir), "--quiet", *TINY]) == 0
    source = real_project.parent / "datasets" / "test" / "images" / "ct_sm.nii.gz"
    out = tmp_path / "pred"
    assert run(["predict", str(run_dir / "model.pt"), str(source.parent), "-o", str(out), "--device", "cpu"]) == 0
    written, src = nib.load(str(out / "ct_sm.nii.gz")), nib.load(str(source))
    assert written.shape == src.shape == (122, 101, 30)
    np.testing.assert_allclose(written.affine, src.affine, atol=1e-5)
    assert [int(written.header[k]) for k in ("qform_code", "sform_code")] == \
        [int(src.header[k]) for k in ("qform_code", "sform_code")]
    assert written.get_data_dtype() == np.uint8

    truth_dir = real_project.parent / "datasets" / "test" / "labels"
    assert run(["evaluate", str(out), str(truth_dir), "--project", str(real_project), "-o",
                str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    pred = read_image(out / "ct_sm.nii.gz")[0]
    truth = read_image(truth_dir / "ct_sm.nii.gz")[0]
    space = load_project(real_project).label_space
    codes = space.local_lookup("test")[truth.astype(np.int64)]
    keys = space.evaluation_keys()
    assert sorted(summary["classes"]) == sorted(keys) and len(keys) == 3
    for key in keys:
        p, g = space.codes_to_leaf_masks(pred, key), space.codes_to_leaf_masks(codes, key)
        assert g.any(), key  # the test CT shows every organ
        denominator = int(p.sum() + g.sum())
        dice = 2.0 * int(np.logical_and(p, g).sum()) / denominator
        assert summary["classes"][key]["dice"]["mean"] == pytest.approx(dice, abs=1e-9), key
