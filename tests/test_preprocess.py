"""Prepare: resampling convention, round trips, label remapping, validation, the incremental cache."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from unionseg.config import PreprocessSpec, load_project, split_cases
from unionseg.data.io import Geometry, read_image, write_image
from unionseg.data.preprocess import (
    IntensityWarning,
    PreparedIndex,
    linear_map,
    nearest_map,
    prepare_project,
    preprocess_image,
    preprocess_label,
    remap_labels,
    restore_to_source,
)
from unionseg.errors import ConfigError, DataError

LPS = np.diag([-1.5, -1.5, 2.5, 1.0])


# ---------------------------------------------------------------------- synthetic data
def _phantom(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A body (40 HU) in air with an organ (label 1) holding a tumour (label 2)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = (x / 0.6) ** 2 + (y / 0.5) ** 2 < 1
    image = np.where(body, 40, -1000).astype(np.int16) + rng.integers(-5, 5, shape).astype(np.int16)
    image[body & (x > 0.4)] = 700  # bone-like: CT-looking range
    organ = ((x + 0.15) ** 2 + y**2 + (z * 0.5) ** 2) < 0.1
    tumour = ((x + 0.15) ** 2 + y**2 + (z * 0.5) ** 2) < 0.02
    label = organ.astype(np.uint8) + tumour.astype(np.uint8)
    return image, label


def _save(path: Path, array: np.ndarray, affine: np.ndarray = LPS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _write_msd(root: Path, n_cases: int, seed: int, labels: dict[int, str], oracle: bool = False,
               shape: tuple[int, int, int] = (20, 18, 10)) -> None:
    training = []
    for i in range(n_cases):
        image, label = _phantom(shape, seed + i)
        name = f"case_{i:03d}.nii.gz"
        _save(root / "imagesTr" / name, image)
        _save(root / "labelsTr" / name, label)
        if oracle:
            full = label.copy()
            full[(label == 0) & (image > 0) & (image < 100)] = 3  # an organ the dataset does not annotate
            _save(root / "fullTr" / name, full)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": root.name, "labels": {str(k): v for k, v in {0: "background", **labels}.items()},
            "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))


def _project_dict() -> dict:
    return {
        "name": "tiny",
        "classes": ["liver", {"name": "liver_tumour", "part_of": "liver"},
                    "kidney", {"name": "kidney_tumour", "part_of": "kidney"}],
        "datasets": [
            {"name": "liver", "root": "liver", "labels": {1: "liver", 2: "liver_tumour"},
             "annotated": ["liver", "liver_tumour"], "split": {"val_fraction": 0.34, "seed": 0},
             "oracle_labels": "fullTr"},
            {"name": "kidney", "root": "kidney", "labels": {1: "kidney", 2: "kidney_tumour"},
             "annotated": ["kidney", "kidney_tumour"]},
            {"name": "test", "root": "test", "role": "test",
             "labels": {1: "liver", 2: "liver_tumour"},
             "annotated": ["liver", "liver_tumour", "kidney", "kidney_tumour"]},
        ],
        "preprocessing": {"spacing": [2.0, 2.0, 3.0], "window": [-325, 325]},
    }


def _write_project(tmp: Path, data: dict | None = None) -> Path:
    path = tmp / "project.yaml"
    path.write_text(yaml.safe_dump(data or _project_dict(), sort_keys=False))
    return path


@pytest.fixture()
def project_dir(tmp_path: Path) -> Path:
    _write_msd(tmp_path / "liver", 3, 0, {1: "liver", 2: "tumour"}, oracle=True)
    _write_msd(tmp_path / "kidney", 2, 10, {1: "kidney", 2: "tumour"})
    _write_msd(tmp_path / "test", 1, 20, {1: "liver", 2: "tumour"})
    _write_project(tmp_path)
    return tmp_path


def _cache_files(project_dir: Path) -> dict[str, float]:
    cache = project_dir / "prepared"
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------- resampling convention
def test_resampling_matches_torch_align_corners_false() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    array = rng.uniform(-300, 300, (13, 17, 9)).astype(np.float32)
    spec = PreprocessSpec(spacing=(1.7, 0.6, 2.3), window=(-1000.0, 1000.0), crop_to_body=False)
    out, record = preprocess_image(array, Geometry.identity(array.shape), spec)
    ref = torch.nn.functional.interpolate(torch.from_numpy(array)[None, None], size=record.resampled_shape,
                                          mode="trilinear", align_corners=False)[0, 0].numpy() / 1000.0
    assert out.shape == record.resampled_shape == (8, 28, 4)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert record.spacing == pytest.approx((13 / 8, 17 / 28, 9 / 4))
    labels = rng.integers(0, 4, array.shape).astype(np.uint8)
    near = torch.nn.functional.interpolate(torch.from_numpy(labels)[None, None].float(),
                                           size=record.resampled_shape, mode="nearest-exact")[0, 0].numpy()
    np.testing.assert_array_equal(preprocess_label(labels, Geometry.identity(array.shape), record), near)


def test_index_maps_edges() -> None:
    i0, i1, w = linear_map(4, 8)
    assert i0[0] == 0 and w[0] == 0  # clamped below
    assert i0[-1] == 3 and i1[-1] == 3  # clamped above
    np.testing.assert_array_equal(nearest_map(4, 4), np.arange(4))
    np.testing.assert_array_equal(nearest_map(6, 3), [1, 3, 5])


# ---------------------------------------------------------------------- geometry round trips
def test_prepared_geometry_is_exact_and_round_trip_restores_the_source_grid() -> None:
    image, label = _phantom((24, 20, 12), 1)
    geom = Geometry((24, 20, 12), LPS @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    geom = Geometry(geom.shape, geom.affine + np.array([[0, 0, 0, 11.0], [0, 0, 0, -7.0], [0, 0, 0, 3.0], [0] * 4]))
    spec = PreprocessSpec(spacing=(2.0, 2.0, 3.0))
    prepared, rec = preprocess_image(image, geom, spec)
    assert prepared.dtype == np.float32 and prepared.shape == rec.prepared.shape
    assert float(prepared.min()) >= -1.0 and float(prepared.max()) <= 1.0
    assert rec.prepared.orientation() == "RAS"
    # the body crop shrank the grid, and the crop box lies inside the resampled grid
    assert np.all(np.array(rec.crop_start) >= 0) and np.all(np.array(rec.crop_stop) <= rec.resampled_shape)
    # world position of a prepared voxel centre == world position of the sampled source location
    ras_res = rec.resampled
    for idx in [(0, 0, 0), (3, 2, 1), tuple(s - 1 for s in rec.prepared.shape)]:
        world = rec.prepared.affine @ np.array([*idx, 1.0])
        res_idx = np.array(idx) + np.array(rec.crop_start)
        np.testing.assert_allclose(world, ras_res.affine @ np.array([*res_idx, 1.0]), atol=1e-9)
        cont = (res_idx + 0.5) * np.array(rec.ras.shape) / np.array(rec.resampled_shape) - 0.5
        np.testing.assert_allclose(world, rec.ras.affine @ np.array([*cont, 1.0]), atol=1e-9)
    restored = restore_to_source(preprocess_label(label, geom, rec), rec, order=0)
    assert restored.shape == label.shape
    agree = (restored == label).mean()
    assert agree > 0.95  # nearest down- and up-sampling only moves boundaries
    # twin: restoring a label map of a DIFFERENT case does not agree as well (the test can fail)
    assert (restored == _phantom((24, 20, 12), 1)[1][::-1]).mean() < agree


def test_round_trip_is_exact_at_the_source_spacing() -> None:
    image, label = _phantom((16, 14, 8), 2)
    geom = Geometry(image.shape, LPS)
    spec = PreprocessSpec(spacing=(1.5, 1.5, 2.5), window=(-1000.0, 1000.0))
    prepared, rec = preprocess_image(image, geom, spec)
    assert rec.resampled_shape == rec.ras.shape
    assert prepared.shape != image.shape  # the body crop is active
    back = restore_to_source(preprocess_label(label, geom, rec), rec, order=0)
    np.testing.assert_array_equal(back, label * (back > 0))  # outside the crop: filled with 0
    np.testing.assert_array_equal(back, label)  # the crop keeps every labelled voxel
    hu = restore_to_source(prepared * 1000.0, rec, order=1, fill=-1000.0)
    inside = restore_to_source(np.ones(prepared.shape, dtype=np.uint8), rec, order=0).astype(bool)
    assert 0 < inside.mean() < 1
    expected = np.where(inside, np.clip(image, -1000, 1000), -1000).astype(np.float32)
    np.testing.assert_allclose(hu, expected, atol=0.05)
    probs = np.stack([1 - prepared * 0, prepared * 0])
    back2 = restore_to_source(probs, rec, order=1, fill=[1.0, 0.0])
    assert back2.shape == (2, *image.shape) and np.allclose(back2[0], 1.0)


def test_preprocess_never_modifies_the_callers_array() -> None:
    image = np.full((6, 6, 6), 100.0, dtype=np.float32)
    spec = PreprocessSpec(spacing=(1.0, 1.0, 1.0), crop_to_body=False)
    preprocess_image(image, Geometry.identity(image.shape), spec)
    assert np.all(image == 100.0)


def test_a_target_grid_too_large_to_hold_is_refused_before_resampling() -> None:
    """A spacing typed in the wrong unit (0.015 mm: a CT of 30 cm would hold 2 x 10^4 voxels per axis): it
    wrote 1.6 GB for four tiny cases; refused, naming the image and the shape."""
    image = np.full((100, 100, 100), 100.0, dtype=np.float32)
    spec = PreprocessSpec(spacing=(0.015, 0.015, 0.015), crop_to_body=False)
    with pytest.raises(DataError, match=r"resampled to the spacing \[0.015, 0.015, 0.015\] mm this image would "
                                        r"have shape \(6667, 6667, 6667\)") as info:
        preprocess_image(image, Geometry.identity(image.shape), spec, Path("scan.nii.gz"))
    assert info.value.path == Path("scan.nii.gz")


# ---------------------------------------------------------------------- labels
def test_label_remap_with_colliding_local_values(space) -> None:
    local = np.array([[[0, 1, 2, 1]]], dtype=np.int16)
    liver = remap_labels(local, space.local_lookup("liver"), Path("liver.nii.gz"))
    kidney = remap_labels(local, space.local_lookup("kidney"), Path("kidney.nii.gz"))
    assert liver.dtype == np.uint8
    np.testing.assert_array_equal(liver[0, 0], [0, space.leaf_id("liver"), space.leaf_id("liver_tumour"), 1])
    np.testing.assert_array_equal(kidney[0, 0], [0, space.leaf_id("kidney"), space.leaf_id("kidney_tumour"),
                                                 space.leaf_id("kidney")])
    assert not np.array_equal(liver, kidney)


def test_label_remap_to_region_codes_and_unmapped_values(space) -> None:
    from unionseg.labels import DatasetLabels

    space.add_dataset(DatasetLabels("btcv", {1: "region:liver", 3: "kidney", 4: "kidney"},
                                    ("region:liver", "kidney")))
    codes = remap_labels(np.array([0, 1, 3, 4]), space.local_lookup("btcv"), Path("b.nii.gz"))
    assert codes.tolist() == [0, space.code("region:liver"), space.leaf_id("kidney"), space.leaf_id("kidney")]
    assert codes[1] >= space.n_leaves
    with pytest.raises(DataError, match=r"values \[2, 7\].*b\.nii\.gz|b\.nii\.gz.*values \[2, 7\]"):
        remap_labels(np.array([0, 1, 2, 7]), space.local_lookup("btcv"), Path("b.nii.gz"))
    # a structure no class stands for (BTCV's gallbladder, value 4 there) is mapped to background, not refused
    space.add_dataset(DatasetLabels("btcv_gb", {1: "region:liver", 3: "kidney", 4: "background"},
                                    ("region:liver", "kidney")))
    codes = remap_labels(np.array([0, 1, 3, 4]), space.local_lookup("btcv_gb"), Path("b.nii.gz"))
    assert codes.tolist() == [0, space.code("region:liver"), space.leaf_id("kidney"), 0]
    # a 0/255 mask: 255 is the organ, and the hint says so (it advised '255: background')
    with pytest.raises(DataError, match=r"holds 0 and 255 only, none of the mapped values \[1, 3, 4\]: a mask "
                                        r"saved as 0/255\? Map 255 to its class"):
        remap_labels(np.array([0, 255, 255]), space.local_lookup("btcv_gb"), Path("b.nii.gz"))


def test_a_value_dataset_json_does_not_declare_is_called_a_stray_value(space) -> None:
    """A label value the dataset's own dataset.json does not declare is most likely a stray voxel value of
    that file: the message says so first. It advised mapping it in the project, which the next check then
    refused ("dataset.json declares only [0, 1]"; helper-80)."""
    local = np.array([0, 1, 7])
    with pytest.raises(DataError, match=r"values \[7\] that its dataset\.json does not declare \(it declares "
                                        r"\[0, 1, 2\]\): stray values in this file\?"):
        remap_labels(local, space.local_lookup("liver"), Path("l.nii.gz"), declared=[0, 1, 2])
    # declared but unmapped (or no dataset.json): the project's map is what lacks it
    for declared in ([0, 1, 2, 7], None):
        with pytest.raises(DataError, match=r"values \[7\] that are not in the project's label map"):
            remap_labels(local, space.local_lookup("liver"), Path("l.nii.gz"), declared=declared)


def test_float_labels_integer_valued_accepted_fractional_refused(space) -> None:
    ok = remap_labels(np.array([0.0, 1.0, 2.0]), space.local_lookup("liver"), Path("l.nii.gz"))
    assert ok.tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="non-integer"):
        remap_labels(np.array([0.0, 0.5, 2.0]), space.local_lookup("liver"), Path("l.nii.gz"))


# ---------------------------------------------------------------------- prepare: the cache
def test_prepare_caches_every_case_then_skips(project_dir: Path, capsys) -> None:
    project = load_project(project_dir / "project.yaml")
    index = prepare_project(project, workers=0, progress=True)
    assert len(index) == 6 and len(index.summary.prepared) == 6 and not index.summary.skipped
    assert index.splits["liver"] == split_cases(["case_000", "case_001", "case_002"], project.dataset("liver").split)
    assert {c.split for c in index.cases(dataset="test")} == {"test"}
    case = index.cases(dataset="liver")[0]
    image, label = case.image(), case.label()
    assert image.dtype == np.float32 and isinstance(image, np.memmap) and image.shape == case.record.prepared.shape
    assert label.dtype == np.uint8 and label.shape == image.shape
    assert set(np.unique(label)) == {0, 1, 2}  # liver and tumour kept (a subset passed all-background maps)
    oracle = case.oracle()
    assert oracle is not None and 3 in np.unique(oracle)  # kidney (leaf 3) where the liver set has 0
    assert index.cases(dataset="kidney")[0].oracle() is None
    assert case.annotated.tolist() == [True, True, True, False, False]
    assert index.cases(dataset="test")[0].annotated.all()
    kidney = index.cases(dataset="kidney")[0]
    assert set(np.unique(kidney.label())) == {0, 3, 4}  # colliding local 1/2 -> kidney codes
    assert case.extra_path("pseudo").name == f"{case.case_id}.pseudo.npy"
    with pytest.raises(ValueError, match="invalid extra name 'label'"):
        case.extra_path("label")
    before = _cache_files(project_dir)
    capsys.readouterr()
    again = prepare_project(project, workers=0, progress=True)
    assert len(again.summary.skipped) == 6 and not again.summary.prepared and not again.summary.relabelled
    assert "skipped 6 up-to-date" in capsys.readouterr().err
    assert _cache_files(project_dir) == before | {"index.json": _cache_files(project_dir)["index.json"]}
    assert again.fingerprint == index.fingerprint
    loaded = PreparedIndex.load(project)
    assert [c.key for c in loaded.cases()] == [c.key for c in index.cases()]
    assert len(loaded.cases(split="train")) + len(loaded.cases(split="val")) == 5


def test_changed_label_map_redoes_only_that_dataset(project_dir: Path) -> None:
    prepare_project(load_project(project_dir / "project.yaml"), workers=0, progress=False)
    before = _cache_files(project_dir)
    data = _project_dict()
    data["datasets"][1]["labels"] = {1: "region:kidney", 2: "kidney_tumour"}
    _write_project(project_dir, data)
    project = load_project(project_dir / "project.yaml")
    with pytest.raises(DataError, match="stale: dataset 'kidney': label map changed since prepare"):
        PreparedIndex.load(project)
    index = prepare_project(project, workers=0, progress=False)
    assert sorted(index.summary.relabelled) == ["kidney/case_000", "kidney/case_001"]
    assert not index.summary.prepared and len(index.summary.skipped) == 4
    after = _cache_files(project_dir)
    assert after["kidney/case_000.image.npy"] == before["kidney/case_000.image.npy"]  # image kept
    assert after["kidney/case_000.label.npy"] != before["kidney/case_000.label.npy"]
    assert after["liver/case_000.label.npy"] == before["liver/case_000.label.npy"]
    region = project.label_space.code("region:kidney")
    assert region in np.unique(index.cases(dataset="kidney")[0].label())
    PreparedIndex.load(project)


def test_a_second_project_file_never_replaces_the_first_ones_cases(project_dir: Path) -> None:
    """Two project files of one folder share prepared/ by default. A second file that would replace the
    first's prepared cases (other settings, or other data under the same dataset names) is refused and
    changes no file; one that reuses them (a subset of the datasets) goes through without redoing a case;
    --force replaces; the cache's own file, changed, re-prepares as usual."""
    prepare_project(load_project(project_dir / "project.yaml"), workers=0, progress=False)
    before = _cache_files(project_dir)

    def other_file(name: str, data: dict) -> Path:
        path = project_dir / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    coarse = _project_dict()
    coarse["preprocessing"] = {**coarse.get("preprocessing", {}), "spacing": [5.0, 5.0, 5.0]}
    with pytest.raises(DataError, match=r"this cache holds the cases project\.yaml prepared; preparing coarse\.yaml "
                                        r"here would replace liver/case_000 and 5 more \(preprocessing changed"):
        prepare_project(load_project(other_file("coarse.yaml", coarse)), workers=0, progress=False)
    site2 = project_dir / "site2"
    _write_msd(site2 / "kidney", 2, 99, {1: "kidney", 2: "tumour"})  # other scans under the same dataset name
    moved = _project_dict()
    moved["datasets"][1]["root"] = "site2/kidney"
    with pytest.raises(DataError, match=r"would replace kidney/case_000 and 1 more \(the same settings, other "
                                        r"source files\)"):
        prepare_project(load_project(other_file("site2.yaml", moved)), workers=0, progress=False)
    assert _cache_files(project_dir) == before
    PreparedIndex.load(load_project(project_dir / "project.yaml"))  # still the first's, still valid
    subset = _project_dict()
    subset["datasets"] = [d for d in subset["datasets"] if d["name"] != "kidney"]
    index = prepare_project(load_project(other_file("liver_only.yaml", subset)), workers=0, progress=False)
    assert not index.summary.prepared and not index.summary.relabelled  # the first's cases, reused
    assert {k: v for k, v in _cache_files(project_dir).items() if k != "index.json"} == \
        {k: v for k, v in before.items() if k != "index.json"}
    prepare_project(load_project(project_dir / "coarse.yaml"), workers=0, progress=False, force=True)
    PreparedIndex.load(load_project(project_dir / "coarse.yaml"))
    coarse["preprocessing"]["spacing"] = [4.0, 4.0, 4.0]  # the cache's own file, changed: re-prepared as usual
    prepare_project(load_project(other_file("coarse.yaml", coarse)), workers=0, progress=False)
    assert PreparedIndex.load(load_project(project_dir / "coarse.yaml")).data["settings"]["preprocessing"][
        "spacing"] == [4.0, 4.0, 4.0]


def test_a_dataset_root_other_than_prepared_is_named_not_called_a_change(project_dir: Path) -> None:
    """A forgotten --root (or a moved dataset) is not a change to re-prepare: the message names both roots."""
    import shutil

    shutil.move(project_dir / "liver", project_dir.parent / "liver_elsewhere")
    moved = load_project(project_dir / "project.yaml", roots={"liver": project_dir.parent / "liver_elsewhere"})
    # roots= on the project file, as --root (helper-119 had to load the project first); refused with a loaded one
    with pytest.raises(ConfigError, match=r"roots= with a loaded project: give them to load_project"):
        prepare_project(moved, workers=0, progress=False, roots={"liver": project_dir.parent / "liver_elsewhere"})
    index = prepare_project(project_dir / "project.yaml", workers=0, progress=False,
                            roots={"liver": project_dir.parent / "liver_elsewhere"})
    assert {c.dataset for c in index.cases()} >= {"liver"}
    with pytest.raises(DataError, match=r"dataset 'liver' was prepared from .*liver_elsewhere, and the project "
                                        r"now points to .*/liver, where dataset.json is missing or differs; to use "
                                        r"what was prepared, pass --root liver=.*liver_elsewhere \(as prepare was "
                                        r"given, perhaps\); to use the data at .*/liver, run `unionseg prepare"):
        PreparedIndex.load(load_project(project_dir / "project.yaml"))
    PreparedIndex.load(moved)  # twin: with the same root it loads


def test_a_moved_or_copied_project_stays_prepared(project_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Source paths are recorded relative to their dataset root: a project moved, or copied with its mtimes
    (cp -a), loads without re-preparing and keeps its data fingerprint (hence its shared experts); a copy
    with other mtimes is stale, as an edited file would be."""
    import shutil

    index = prepare_project(load_project(project_dir / "project.yaml"), workers=0, progress=False)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    moved = elsewhere / "moved"
    shutil.move(project_dir, moved)
    assert PreparedIndex.load(load_project(moved / "project.yaml")).fingerprint == index.fingerprint
    again = prepare_project(load_project(moved / "project.yaml"), workers=0, progress=False)
    assert again.summary.prepared == () and again.fingerprint == index.fingerprint
    copied = elsewhere / "copied"
    shutil.copytree(moved, copied)  # copy2 keeps the mtimes
    assert PreparedIndex.load(load_project(copied / "project.yaml")).fingerprint == index.fingerprint
    # another copy of one dataset, given by --root, is the same data
    shutil.copytree(moved / "kidney", elsewhere / "kidney_copy")
    other_root = load_project(moved / "project.yaml", roots={"kidney": elsewhere / "kidney_copy"})
    assert PreparedIndex.load(other_root).fingerprint == index.fingerprint
    # twins: an image with another mtime is a change, in the copy (whose original still matches) and in the
    # moved project itself
    for folder, message in ((copied, r"prepared from .*moved/kidney, and the project now points to .*copied/kidney, "
                                     r"where imagesTr/{} is missing or differs"),
                            (moved, r"prepared data is stale: .*moved/kidney/imagesTr/{} changed since prepare")):
        image = sorted((folder / "kidney" / "imagesTr").iterdir())[0]
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
        with pytest.raises(DataError, match=message.format(image.name)):
            PreparedIndex.load(load_project(folder / "project.yaml"))
    image.unlink()  # a source deleted since is named as gone, not as changed
    with pytest.raises(DataError, match=rf"prepared data is stale: .*moved/kidney/imagesTr/{image.name} is gone "
                                        r"since prepare"):
        PreparedIndex.load(load_project(moved / "project.yaml"))


def test_a_root_with_dotdot_is_recorded_inside_it(project_dir: Path) -> None:
    """``root: ../liver`` (the project in a subfolder): the sources are recorded relative to the root, so an
    edit in a copy of the tree is seen in the copy (it checked the original's files, and trained on the
    copy's stale labels)."""
    import shutil

    data = _project_dict()
    for d in data["datasets"]:
        d["root"] = f"../{d['root']}"
    (project_dir / "proj").mkdir()
    _write_project(project_dir / "proj", data)
    prepare_project(load_project(project_dir / "proj" / "project.yaml"), workers=0, progress=False)
    sources = json.loads((project_dir / "proj" / "prepared" / "index.json").read_text())["sources"]
    assert sources and not any(Path(rel).is_absolute() or ".." in rel for _, rel, _, _ in sources)
    copy = project_dir.parent / f"{project_dir.name}_copy"
    shutil.copytree(project_dir, copy)
    PreparedIndex.load(load_project(copy / "proj" / "project.yaml"))
    label = sorted((copy / "kidney" / "labelsTr").iterdir())[0]
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=f"where labelsTr/{label.name} is missing or differs"):
        PreparedIndex.load(load_project(copy / "proj" / "project.yaml"))


def test_home_in_roots(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--root liver=~/x`` (zsh passes the ~ on) is the home folder's; ``root: ~/x`` in a project file is
    refused as not portable, like an absolute path."""
    monkeypatch.setenv("HOME", str(project_dir))
    project = load_project(project_dir / "project.yaml", roots={"liver": "~/liver"})
    assert project.datasets[0].root == (project_dir / "liver").resolve()
    data = _project_dict()
    data["datasets"][0]["root"] = "~/liver"
    _write_project(project_dir, data)
    with pytest.raises(ConfigError, match="datasets.liver.root: absolute paths are not portable"):
        load_project(project_dir / "project.yaml")


def test_changed_spacing_redoes_everything_and_force_too(project_dir: Path) -> None:
    prepare_project(load_project(project_dir / "project.yaml"), workers=0, progress=False)
    data = _project_dict()
    data["preprocessing"]["spacing"] = [3.0, 3.0, 3.0]
    _write_project(project_dir, data)
    project = load_project(project_dir / "project.yaml")
    index = prepare_project(project, workers=0, progress=False)
    assert len(index.summary.prepared) == 6
    assert index.cases()[0].record.spacing == pytest.approx((3.0, 3.0, 2.5 * 10 / 8), rel=0.05)
    forced = prepare_project(project, workers=0, force=True, progress=False)
    assert len(forced.summary.prepared) == 6


def test_prepare_in_parallel_workers(project_dir: Path) -> None:
    project = load_project(project_dir / "project.yaml")
    index = prepare_project(project, workers=2, progress=False)
    assert len(index.summary.prepared) == 6
    ref = index.cases(dataset="liver")[1]
    img, rec = preprocess_image(*read_image(project_dir / "liver/imagesTr/case_001.nii.gz"), project.preprocessing)
    np.testing.assert_array_equal(ref.image(), img)
    assert rec.prepared.same_grid(ref.record.prepared)


def test_a_script_without_the_main_guard_fails_at_once(project_dir: Path) -> None:
    """prepare_project from a script without `if __name__ == "__main__":` (its path, not a Project: both are
    taken): each spawned worker imported the script, called prepare_project again and waited on the cache's
    lock, which the script held, for the default hour. Now the workers refuse, naming the guard, and the
    script fails in seconds."""
    script = project_dir / "prepare_no_guard.py"
    script.write_text("from unionseg.data.preprocess import prepare_project\n"
                      "prepare_project('project.yaml', workers=2, progress=False)\n")
    proc = subprocess.run([sys.executable, script.name], cwd=project_dir, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0
    assert 'must call prepare_project under `if __name__ == "__main__":`' in proc.stderr, proc.stderr[-2000:]
    assert "waiting: " not in proc.stderr  # the lock wait's line
    assert 'UnionsegError: prepare_project was called outside `if __name__ == "__main__":` in a script that ' \
           "starts worker processes" in proc.stderr, proc.stderr[-2000:]
    assert "out of memory" not in proc.stderr
    guarded = project_dir / "prepare_guarded.py"
    guarded.write_text("from unionseg.data.preprocess import prepare_project\n"
                       "if __name__ == '__main__':\n"
                       "    print(len(prepare_project('project.yaml', workers=2, progress=False).summary.prepared))\n")
    proc = subprocess.run([sys.executable, guarded.name], cwd=project_dir, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip() == "6", proc.stderr[-2000:]


def test_source_change_makes_the_index_stale(project_dir: Path) -> None:
    """A source whose date changed makes the index stale; prepare then reads its bytes. The same bytes (a
    `touch`, a `git checkout`, `cp` without -a) keep the prepared case and the data fingerprint, and so the
    shared experts keyed by it, which a touch used to throw away; other bytes redo the case."""
    project = load_project(project_dir / "project.yaml")
    first = prepare_project(project, workers=0, progress=False)
    PreparedIndex.load(project)
    label = project_dir / "liver/labelsTr/case_001.nii.gz"
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="case_001.*changed|changed.*case_001"):
        PreparedIndex.load(project)
    index = prepare_project(project, workers=0, progress=False)
    assert (index.summary.prepared, index.summary.relabelled, index.summary.renewed) == ((), (), ("liver/case_001",))
    assert "(1 of them with source files whose dates changed but not their bytes)" in index.summary.describe()
    assert index.fingerprint == first.fingerprint
    assert PreparedIndex.load(project).fingerprint == first.fingerprint  # no longer stale
    again = prepare_project(project, workers=0, progress=False)
    assert again.summary.renewed == () and again.fingerprint == first.fingerprint
    label.write_bytes(read_bytes_changed(label))  # the same size, other bytes
    changed = prepare_project(project, workers=0, progress=False)
    assert changed.summary.relabelled == ("liver/case_001",) and changed.fingerprint != first.fingerprint


def read_bytes_changed(path: Path) -> bytes:
    """The bytes of a NIfTI label map with one label voxel changed, recompressed: other content (the size
    may differ; either way it is a change)."""
    array, geom = read_image(path)
    array = array.copy()
    array.flat[0] = 1 if array.flat[0] != 1 else 0
    out = path.with_name("changed.nii.gz")
    write_image(out, array, geom)
    data = out.read_bytes()
    out.unlink()
    return data


def test_a_record_from_before_hashes_keeps_the_prepared_cases(project_dir: Path) -> None:
    """Caches prepared before the sources' bytes were hashed recorded [path, size, mtime] and fingerprinted
    that: the first prepare now hashes the files once, redoes nothing and keeps those fingerprints (the
    experts of a project prepared by an earlier release stay). A damaged record is taken as none."""
    from unionseg.config import to_dict
    from unionseg.data.preprocess import PREPROCESS_VERSION, _hash

    project = load_project(project_dir / "project.yaml")
    prepare_project(project, workers=0, progress=False)
    spec = to_dict(project.preprocessing)
    legacy = {}
    for meta_path in sorted((project_dir / "prepared").glob("*/*.json")):
        meta = json.loads(meta_path.read_text())
        meta["sources"] = {k: v[:2] + [v[4]] for k, v in meta["sources"].items()}  # [path, size, mtime]
        lookup = project.label_space.local_lookup(meta["dataset"]).tolist()
        image = _hash({"v": PREPROCESS_VERSION, "spec": spec, "file": meta["sources"]["image"]})
        meta["fingerprints"] = {"image": image,
                                "label": _hash({"image": image, "file": meta["sources"]["label"], "lookup": lookup})}
        if "oracle" in meta["sources"]:  # the phantom-style fully labelled truth beside some cases
            meta["fingerprints"]["oracle"] = _hash({"image": image, "file": meta["sources"]["oracle"],
                                                    "n_leaves": project.label_space.n_leaves})
        legacy[meta_path.name, meta["dataset"]] = meta["fingerprints"]
        meta_path.write_text(json.dumps(meta))
    index = prepare_project(project, workers=0, progress=False)
    assert (index.summary.prepared, index.summary.relabelled, index.summary.renewed) == ((), (), ())
    for meta_path in sorted((project_dir / "prepared").glob("*/*.json")):
        meta = json.loads(meta_path.read_text())
        assert meta["fingerprints"] == legacy[meta_path.name, meta["dataset"]]
        assert len(meta["sources"]["image"]) == 5 and isinstance(meta["sources"]["image"][2], int)  # hashed now
    damaged = project_dir / "prepared" / "liver" / "case_001.json"
    meta = json.loads(damaged.read_text())
    meta["sources"] = {"image": ["x", "not a size"], "label": "?"}
    damaged.write_text(json.dumps(meta))
    again = prepare_project(project, workers=0, progress=False)  # it raised ValueError on the record
    assert again.summary.prepared == ("liver/case_001",)


def test_the_same_bytes_keep_their_identity_through_force_and_a_round_trip(project_dir: Path) -> None:
    """The identity is the bytes' hash: --force after a touch, and a file changed and changed back (a git
    checkout of another branch and back, with a prepare between), end at the first fingerprint."""
    project = load_project(project_dir / "project.yaml")
    first = prepare_project(project, workers=2, progress=False).fingerprint
    label = project_dir / "liver/labelsTr/case_001.nii.gz"
    original = label.read_bytes()
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert prepare_project(project, workers=0, force=True, progress=False).fingerprint == first
    label.write_bytes(read_bytes_changed(label))
    assert prepare_project(project, workers=0, progress=False).fingerprint != first
    label.write_bytes(original)
    back = prepare_project(project, workers=0, progress=False)
    assert back.fingerprint == first and back.summary.relabelled == ("liver/case_001",)

def test_not_prepared_says_run_prepare(project_dir: Path) -> None:
    with pytest.raises(DataError, match="unionseg prepare"):
        PreparedIndex.load(load_project(project_dir / "project.yaml"))


def _assert_no_entry(project_dir: Path, dataset: str, case: str) -> None:
    leftovers = [p.name for p in (project_dir / "prepared" / dataset).glob(f"*{case}*")]
    assert leftovers == []


def test_truncated_gzip_is_one_clear_error_and_leaves_no_entry(project_dir: Path) -> None:
    bad = project_dir / "kidney/imagesTr/case_001.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    project = load_project(project_dir / "project.yaml")
    with pytest.raises(DataError) as info:
        prepare_project(project, workers=0, progress=False)
    assert info.value.path == bad and "truncated" in info.value.message
    _assert_no_entry(project_dir, "kidney", "case_001")
    assert (project_dir / "prepared/kidney/case_000.json").is_file()  # the good cases are cached
    assert not (project_dir / "prepared/index.json").exists()
    with pytest.raises(DataError, match="not prepared"):
        PreparedIndex.load(project)
    # twin: once the file is fixed, prepare succeeds and only redoes the failed case
    image, _ = _phantom((20, 18, 10), 11)
    _save(bad, image)
    index = prepare_project(project, workers=0, progress=False)
    assert index.summary.prepared == ("kidney/case_001",)


def test_several_failing_cases_are_all_listed_in_one_run(project_dir: Path) -> None:
    """One run shows every case to fix: the error names the first (in project order, whatever order the
    workers finish in) and the others, and the cache holds a list of all; the next run starts without it,
    so it never names cases fixed since."""
    broken = [project_dir / "liver/labelsTr/case_002.nii.gz", project_dir / "kidney/imagesTr/case_001.nii.gz"]
    project = load_project(project_dir / "project.yaml")
    assert [d.name for d in project.datasets][:2] == ["liver", "kidney"]
    saved = [p.read_bytes() for p in broken]
    for path in broken:
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError) as info:
        prepare_project(project, workers=2, progress=False)
    report = project_dir / "prepared" / "prepare_errors.txt"
    assert info.value.path == broken[0]
    assert f"(1 more case(s) failed: kidney/case_001; every failure is listed in {report})" in info.value.message
    lines = report.read_text().splitlines()
    assert [line.split(": ")[:2] for line in lines] == [["liver/case_002", str(broken[0])],
                                                        ["kidney/case_001", str(broken[1])]]
    broken[0].write_bytes(saved[0])  # one fixed, one still broken: one error, and no stale list
    with pytest.raises(DataError) as info:
        prepare_project(project, workers=0, progress=False)
    assert info.value.path == broken[1] and "more case(s)" not in info.value.message
    assert not report.exists()
    broken[1].write_bytes(saved[1])
    prepare_project(project, workers=0, progress=False)
    assert not report.exists()


def test_shape_mismatch_names_the_label_and_leaves_no_entry(project_dir: Path) -> None:
    bad = project_dir / "liver/labelsTr/case_002.nii.gz"
    _save(bad, np.zeros((20, 18, 9), dtype=np.uint8))
    project = load_project(project_dir / "project.yaml")
    with pytest.raises(DataError, match="shape") as info:
        prepare_project(project, workers=2, progress=False)
    assert info.value.path == bad
    _assert_no_entry(project_dir, "liver", "case_002")


def test_previously_cached_case_that_breaks_is_removed(project_dir: Path) -> None:
    project = load_project(project_dir / "project.yaml")
    prepare_project(project, workers=0, progress=False)
    bad = project_dir / "liver/labelsTr/case_000.nii.gz"
    label = _phantom((20, 18, 10), 0)[1]
    label[0, 0, 0] = 9
    _save(bad, label)
    with pytest.raises(DataError, match=r"values \[9\]") as info:
        prepare_project(project, workers=0, progress=False)
    assert info.value.path == bad
    _assert_no_entry(project_dir, "liver", "case_000")


def test_non_finite_image_refused(project_dir: Path) -> None:
    bad = project_dir / "test/imagesTr/case_000.nii.gz"
    image = _phantom((20, 18, 10), 20)[0].astype(np.float32)
    image[3, 3, 3] = np.nan
    _save(bad, image)
    with pytest.raises(DataError, match="non-finite") as info:
        prepare_project(load_project(project_dir / "project.yaml"), workers=0, progress=False)
    assert info.value.path == bad


def test_intensity_warning_for_non_ct_images(project_dir: Path) -> None:
    project = load_project(project_dir / "project.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntensityWarning)
        prepare_project(project, workers=0, progress=False)  # CT-like: no warning
    mri_like = project_dir / "test/imagesTr/case_000.nii.gz"
    _save(mri_like, np.random.default_rng(0).uniform(0, 80, (20, 18, 10)).astype(np.float32))
    with pytest.warns(IntensityWarning, match="case_000"):
        index = prepare_project(project, workers=0, progress=False)
    assert len(index.summary.warnings) == 1
    # a CT scaled by 1000 has air and bone where they should be, at values no scanner gives (helper-71)
    from unionseg.data.preprocess import intensity_warning

    ct = np.random.default_rng(0).uniform(-1000, 1500, (8, 8, 8))
    assert intensity_warning(ct, Path("ct.nii.gz")) is None
    assert intensity_warning(np.where(ct < 0, -32768, ct), Path("padded.nii.gz")) is None  # padding: CT still
    scaled = intensity_warning(ct * 1000, Path("ct1000.nii.gz")) or ""
    assert "ct1000.nii.gz: intensity range [-9.992e+05, 1.493e+06]" in scaled


def test_a_spacing_that_multiplies_the_voxels_is_warned_once(project_dir: Path) -> None:
    """The default spacing on 3 mm data made a cache some 30 times the inputs' voxels without a word
    (helper-80): prepare says so, in one warning naming each dataset it prepares, a file and the factor; a
    prepared cache is not warned about again, and a spacing near the data's is not warned about at all."""
    from unionseg.errors import UnionsegWarning

    project = load_project(project_dir / "project.yaml")  # 2 x 2 x 3 mm for 1.5 x 1.5 x 2.5 mm data: fewer voxels
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnionsegWarning)
        prepare_project(project, workers=0, progress=False)
    data = _project_dict()
    data["preprocessing"]["spacing"] = [0.5, 0.5, 1.0]  # 22.5 times the voxels
    _write_project(project_dir, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_project(load_project(project_dir / "project.yaml"), workers=0, progress=False)
    said = [str(w.message) for w in caught if "resamples the images" in str(w.message)]
    assert len(said) == 1, said  # one warning for the three datasets
    assert "the spacing 0.5 x 0.5 x 1 mm resamples the images of liver (1.5 x 1.5 x 2.5 mm voxels, 22.5 times " \
           "as many; e.g. " in said[0] and "; kidney (" in said[0] and "; test (" in said[0], said
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnionsegWarning)
        prepare_project(load_project(project_dir / "project.yaml"), workers=0, progress=False)  # nothing to do


def test_a_script_read_from_stdin_prepares_in_one_process(project_dir: Path) -> None:
    """``python - <<EOF`` with prepare_project(workers=2): each spawned worker tried to import "<stdin>" and
    died, and prepare said a worker was killed or out of memory (helper-70). It prepares in the one process,
    saying why."""
    script = ("import sys\nfrom unionseg.data.preprocess import prepare_project\n"
              f"index = prepare_project({str(project_dir / 'project.yaml')!r}, workers=2, progress=False)\n"
              "print('prepared', len(index.summary.prepared))\n")
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "prepared 6" in proc.stdout
    # a negative worker count ran in-process silently (helper-75)
    from unionseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--workers must be an integer >= 0 \(0 or 1: in this process\), got -1"):
        prepare_project(project_dir / "project.yaml", workers=-1, progress=False)
    assert "<stdin>:3: UnionsegWarning: the main script (<stdin>) cannot be imported again by worker processes" in proc.stderr


def test_prepare_cli_does_not_import_torch(project_dir: Path) -> None:
    code = ("import sys; from unionseg.cli import run; rc = run(['prepare', sys.argv[1], '--workers', '0']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(project_dir / "project.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "data fingerprint" in proc.stdout
    bad = project_dir / "kidney/labelsTr/case_000.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti"))
    proc = subprocess.run([sys.executable, "-c", code, str(project_dir / "project.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "case_000" in proc.stderr and "Traceback" not in proc.stderr


def test_a_file_changed_while_it_is_hashed_is_read_again_next_time(project_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The date recorded beside a hash is the one from before the read: a file rewritten during the hash pass
    keeps a newer date, so the next prepare reads it again and sees the change (the date after the read was
    recorded with the older bytes' hash, and the new bytes were never checked)."""
    import unionseg.data.preprocess as pre

    project = load_project(project_dir / "project.yaml")
    first = prepare_project(project, workers=0, progress=False)
    label = project_dir / "liver/labelsTr/case_001.nii.gz"
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # read again by the next prepare
    changed = read_bytes_changed(label)
    real = pre._content_hash

    def rewritten_while_read(path: Path) -> str:
        digest = real(path)
        if path == label and label.read_bytes() != changed:
            label.write_bytes(changed)  # an export finishing while prepare reads the old bytes
            later = label.stat()
            os.utime(label, ns=(later.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
        return digest

    monkeypatch.setattr(pre, "_content_hash", rewritten_while_read)
    prepare_project(project, workers=0, progress=False)
    monkeypatch.setattr(pre, "_content_hash", real)
    again = prepare_project(project, workers=0, progress=False)
    assert again.summary.relabelled == ("liver/case_001",) and again.fingerprint != first.fingerprint


def test_force_checks_every_files_bytes_against_its_record(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--force rebuilt every case but took a file of the recorded size and date for the recorded bytes: a key
    left wrong could not be repaired by the escape hatch. It reads and checks every file."""
    import unionseg.data.preprocess as pre

    project = load_project(project_dir / "project.yaml")
    first = prepare_project(project, workers=0, progress=False).fingerprint
    label = project_dir / "liver/labelsTr/case_001.nii.gz"
    real = pre._content_hash
    monkeypatch.setattr(pre, "_content_hash", lambda path: "0" * 16 if path == label else real(path))
    assert prepare_project(project, workers=0, progress=False).fingerprint == first  # same size and date: trusted
    assert prepare_project(project, workers=0, force=True, progress=False).fingerprint != first  # read: other bytes


def test_a_failure_in_the_hash_pass_cancels_the_files_not_started(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or an unreadable file) during the hash pass waited for every queued file to be read: minutes on
    a large collection, past a scheduler's grace period. The files not started are cancelled."""
    import threading
    import time

    import unionseg.data.preprocess as pre

    paths = []
    for i in range(40):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(b"x")
    read: list[Path] = []
    lock = threading.Lock()

    def slow(path: Path) -> str:
        if path == paths[0]:
            raise KeyboardInterrupt
        time.sleep(0.05)
        with lock:
            read.append(path)
        return "h"

    monkeypatch.setattr(pre, "_content_hash", slow)
    with pytest.raises(KeyboardInterrupt):
        pre._hash_sources(paths, 2, False, None)
    time.sleep(0.2)  # the one file another thread had started finishes
    assert len(read) < 10, len(read)


def test_the_worker_report_is_shared_while_open_and_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """worker_report contexts open at once (threads, nesting) share one file, removed with the last; a refused
    call written there is what worker_died names; no temporary file to be had means no report, not an error
    (helper-95)."""
    import tempfile

    from unionseg import errors

    assert errors.WORKER_REPORT_ENV not in os.environ and errors.refused_call() is None
    with errors.worker_report():
        path = os.environ[errors.WORKER_REPORT_ENV]
        with errors.worker_report():
            assert os.environ[errors.WORKER_REPORT_ENV] == path
            Path(path).write_text("prepare_project\n")
        assert os.environ[errors.WORKER_REPORT_ENV] == path  # the inner exit leaves the outer's report
        assert errors.refused_call() == "prepare_project"
        assert "prepare_project was called outside" in str(errors.worker_died("cases were being made"))
    assert errors.WORKER_REPORT_ENV not in os.environ and not Path(path).exists()

    def no_temp(*args: object, **kwargs: object) -> None:
        raise OSError("read-only")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    with errors.worker_report():
        assert errors.WORKER_REPORT_ENV not in os.environ and errors.refused_call() is None
        assert "a worker process died while cases were being made (killed, or out of memory" in str(
            errors.worker_died("cases were being made"))


def test_the_grid_does_not_depend_on_how_the_file_stores_its_spacing() -> None:
    """NIfTI stores spacing as float32, MHA as float64: at 25 x 0.6 mm / 6 mm the ratio was 2.5000001 for one
    and 2.5 for the other, so the same scan got 3 or 2 slices, and other labels, by its file format."""
    from unionseg.data.preprocess import target_shape

    as_float32 = float(np.float32(0.6))
    assert 25 * as_float32 / 6 != 2.5  # the noise the rule must not see
    assert target_shape((115, 95, 25), (0.6, 0.6, as_float32), (6, 6, 6)) == \
        target_shape((115, 95, 25), (0.6, 0.6, 0.6), (6, 6, 6)) == (12, 10, 2)
    assert target_shape((10, 10, 10), (1.26, 1.0, 0.3), (1.0, 1.0, 1.0)) == (13, 10, 3)  # plain rounding stays


def test_a_test_case_with_a_training_images_bytes_is_warned_about(project_dir: Path) -> None:
    """Releases reuse other sets' scans under other names (AbdomenCT-1K holds LiTS, KiTS and MSD cases): only
    the same file (a link) was seen, so a copy in the test set went unnoticed (helper-102). prepare compares
    the bytes' hashes it takes anyway; the twin: distinct images say nothing."""
    from unionseg.errors import UnionsegWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnionsegWarning)  # distinct images: no such warning
        prepare_project(project_dir / "project.yaml", progress=False)
    index = json.loads((project_dir / "prepared" / "index.json").read_text())
    trained = next(c["case_id"] for c in index["cases"] if c["dataset"] == "liver" and c["split"] == "train")
    for folder in ("imagesTr", "labelsTr"):
        (project_dir / "test" / folder / "case_000.nii.gz").write_bytes(
            (project_dir / "liver" / folder / f"{trained}.nii.gz").read_bytes())
    with pytest.warns(UnionsegWarning, match=rf"1 case\(s\) used for validation or test hold the same image bytes "
                                             rf"as a case trained on \(e.g. test/case_000, test, and liver/{trained}, "
                                             r"train\)"):
        prepare_project(project_dir / "project.yaml", progress=False)


def test_a_renamed_case_leaves_its_cache_files_named(project_dir: Path) -> None:
    """A case renamed (or removed) in its dataset left its prepared files in the cache, never read and never
    named (150-400 MB a case on real CT; helper-102): prepare names them, and leaves them to the user."""
    from unionseg.errors import UnionsegWarning

    prepare_project(project_dir / "project.yaml", progress=False)
    meta = json.loads((project_dir / "kidney" / "dataset.json").read_text())
    for folder in ("imagesTr", "labelsTr"):
        (project_dir / "kidney" / folder / "case_001.nii.gz").rename(project_dir / "kidney" / folder / "case_009.nii.gz")
    meta["training"][1] = {"image": "./imagesTr/case_009.nii.gz", "label": "./labelsTr/case_009.nii.gz"}
    (project_dir / "kidney" / "dataset.json").write_text(json.dumps(meta))
    with pytest.warns(UnionsegWarning, match=r"1 prepared case\(s\) are no case of project.yaml \(renamed or "
                                             r"removed: kidney/case_001\); unless another project file shares this "
                                             r"cache, they are never read: delete their files"):
        prepare_project(project_dir / "project.yaml", progress=False)
    assert (project_dir / "prepared" / "kidney" / "case_001.image.npy").is_file()  # named, not deleted


def test_an_integer_scan_is_resampled_without_a_float_copy_of_itself() -> None:
    """A 512 x 512 x 300 int16 scan held a C-order copy and a float32 copy of itself before its first
    resampling pass (helper-108): the first pass now gathers the integers and converts what it gathered,
    from a view of the reoriented scan. Bit-identical to resampling the float32 volume; the peak of new
    arrays stays near twice the int16 input (it was near eight times)."""
    import tracemalloc

    from unionseg.config import PreprocessSpec
    from unionseg.data.io import Geometry
    from unionseg.data.preprocess import preprocess_image

    scan = np.full((128, 128, 64), -1000, np.int16, order="F")
    scan[20:100, 30:90, :] = 40
    scan[60:70, 60:70, 10:50] = 700
    geometry = Geometry(scan.shape, np.diag([-0.75, -0.75, 2.5, 1.0]))  # LPS, Fortran order: as NIfTI reads it
    spec = PreprocessSpec(spacing=(1.5, 1.5, 2.0))
    tracemalloc.start()
    try:
        prepared, _ = preprocess_image(scan, geometry, spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * scan.nbytes, peak / scan.nbytes
    as_float, _ = preprocess_image(scan.astype(np.float32), geometry, spec)
    assert np.array_equal(prepared, as_float) and prepared.dtype == np.float32 and prepared.flags.c_contiguous


def test_prepare_that_cannot_write_a_cache_folder_changes_nothing(project_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """In a shared cache whose liver folder belongs to another user, `prepare --force` deleted index.json,
    then failed on its first case: the cache was unprepared for everyone (helper-109). The folder is checked
    first, named, and the index stays."""
    project = load_project(project_dir / "project.yaml")
    prepare_project(project, workers=0, progress=False)
    index = project.cache_dir / "index.json"
    before = index.read_bytes()
    real_access = os.access
    liver = project.cache_dir / "liver"
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != liver and real_access(path, mode))
    with pytest.raises(DataError, match=r"cannot write into this folder of the prepared cache.*nothing was changed") as info:
        prepare_project(project, workers=0, force=True, progress=False)
    assert info.value.path == liver
    assert index.read_bytes() == before


# ---------------------------------------------------------------------- labels: {..., other: background}
OTHER_PROJECT = """\
name: other
classes: [liver, {name: liver_tumour, part_of: liver}, spleen]
datasets:
  - name: liver
    root: datasets/liver
    labels: LABELS
    annotated: [liver, liver_tumour]
    split: {val_fraction: 0.25, seed: 0}
preprocessing: {spacing: [3.0, 3.0, 3.0], window: [-325, 325]}
"""


def test_other_background_sends_every_unlisted_value_to_background(tmp_path: Path) -> None:
    """A multi-class label file used for one organ (TotalSegmentator's, say) needed every other value mapped to
    background one by one; `other: background` stands for them all. A swept value that dataset.json names as
    a class of the project is named in one warning; the info table folds the values sent to background."""
    from conftest import write_msd_dataset
    from unionseg.reports import _label_map_lines

    write_msd_dataset(tmp_path / "datasets" / "liver", 4, {0: "background", 1: "liver", 2: "liver tumour",
                                                           3: "spleen", 4: "gallbladder", 5: "stomach"},
                      prefix="liver", values=(1, 2, 3, 4, 5))
    path = tmp_path / "project.yaml"
    path.write_text(OTHER_PROJECT.replace("LABELS", "{1: liver, 2: liver_tumour}"))
    with pytest.warns(UserWarning, match="declares 3 .'spleen'., 4 .'gallbladder'., 5 .'stomach'., which the "
                                         "project does not map"), pytest.raises(DataError, match="other: background"):
        prepare_project(load_project(path), workers=0, progress=False)
    path.write_text(OTHER_PROJECT.replace("LABELS", "{1: liver, 2: liver_tumour, other: background}"))
    project = load_project(path)
    assert project.label_space.local_lookup("liver")[:7].tolist() == [0, 1, 2, 0, 0, 0, 0]
    with pytest.warns(UserWarning, match=r"declares 3 \('spleen'\), a class of this project, which 'other: "
                                         r"background' sends to background for dataset 'liver'; if this dataset "
                                         r"labels it, map it to its class and annotate it") as caught:
        index = prepare_project(project, workers=0, progress=False)
    assert not any("gallbladder" in str(w.message) for w in caught)  # no class of the project: not named
    assert all(set(np.unique(c.label())) <= {0, 1, 2} for c in index.cases())
    source = np.asarray(nib.load(tmp_path / "datasets" / "liver" / "labelsTr" / "liver_000.nii.gz").dataobj)
    assert {3, 4, 5} <= set(np.unique(source).tolist())  # the swept values were there
    again = load_project(path).label_space
    assert again.to_dict()["datasets"][0]["other"] == "background"
    # the guards stay: a value dataset.json does not declare, and 255 where there is no dataset.json (a 0/255
    # mask), are not swept
    assert again.local_lookup("liver", [0, 1, 2, 3])[[3, 4, 9]].tolist() == [0, -1, -1]
    assert again.local_lookup("liver")[[9, 254, 255]].tolist() == [0, 0, -1]
    stray = tmp_path / "datasets" / "liver" / "labelsTr" / "liver_001.nii.gz"
    image = nib.load(stray)
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(data, image.affine, image.header), stray)
    with pytest.raises(DataError, match=r"holds values \[9\] that its dataset.json does not declare"):
        prepare_project(load_project(path), workers=0, progress=False)
    # a val or test set whose map leaves an annotated class to 'other' is told so: it would be scored on nothing
    from unionseg.labels import DatasetLabels, LabelSpace, Leaf

    test_set = LabelSpace([Leaf("liver"), Leaf("kidney")],
                          [DatasetLabels("ts", {5: "liver"}, ("liver", "kidney"), True, "background")])
    mask = LabelSpace([Leaf("liver")], [DatasetLabels("m", {5: "liver"}, ("liver",), False, "background")])
    with pytest.raises(DataError, match=r"holds 0 and 255 only, none of the mapped values \[5\]: a mask saved as"):
        remap_labels(np.array([0, 255, 255], dtype=np.uint8), mask.local_lookup("m"), Path("m.nii.gz"))
    assert test_set.unlabelled_annotations("ts") == [
        "datasets.ts.annotated lists 'kidney', but no label value of 'ts' maps to it, and 'other: background' sends "
        "every unlisted value to background: 'kidney' is scored against an empty truth; map its value(s) to 'kidney'"]
    assert type(again).from_dict(again.to_dict()).local_lookup("liver")[5] == 0  # a model file keeps it
    assert _label_map_lines({1: "liver", 2: "background", 3: "background", 4: "background", 6: "background",
                             7: "background"}, "background").splitlines() == ["1->liver", "2-4, 6, 7->background",
                                                                              "other->background"]
    for bad, message in (("{1: liver, other: spleen}", "only 'background' can stand for every value"),
                         ("{other: background}", "maps no value to a class")):
        path.write_text(OTHER_PROJECT.replace("LABELS", bad))
        with pytest.raises(ConfigError, match=message):
            load_project(path)
