"""Image IO with geometry: exact round trips (real files), reorientation, label/image alignment, errors."""

from __future__ import annotations

import gzip
import itertools
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unionseg.data.io import (
    Geometry,
    align_label_to_image,
    read_header,
    read_image,
    reorient_like,
    reorient_to_ras,
    reoriented_geometry,
    strip_suffix,
    suffix_of,
    warn_about_placement,
    write_image,
)
from unionseg.errors import DataError, OutputExistsError, UnionsegWarning

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
TOTALSEG = REAL / "totalsegmentator"
DCMQI = REAL / "dcmqi"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def _assert_affine(a: Geometry, b: Geometry, nifti: bool) -> None:
    """Affines equal to 1e-6: absolute for NRRD/MHA (float64 on disk); relative for NIfTI, whose header
    stores the affine in float32 (235.2 mm is then exact only to about 1.5e-5 mm)."""
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-6, rtol=1e-6 if nifti else 0.0)


def _round_trip(array: np.ndarray, geom: Geometry, out: Path) -> None:
    write_image(out, array, geom)
    back, back_geom = read_image(out)
    assert back.shape == array.shape
    assert back.dtype == array.dtype
    assert np.array_equal(back, array)
    assert back_geom.shape == geom.shape
    _assert_affine(geom, back_geom, nifti=suffix_of(out) in (".nii", ".nii.gz"))


# ---------------------------------------------------------------------- real files
@pytest.mark.real
@pytest.mark.parametrize("name", ["example_ct_sm.nii.gz", "example_seg.nii.gz", "example_ct.nii.gz",
                                  "example_seg_fast_force_split.nii.gz"])
def test_totalsegmentator_nifti_round_trip(name: str, tmp_path: Path) -> None:
    array, geom = read_image(_need(TOTALSEG / name))
    assert geom.orientation() == "RAS" and np.allclose(geom.spacing, 3.0)
    _round_trip(array, geom, tmp_path / name)
    # the source affine is float32-representable: the NIfTI round trip is exact
    assert np.array_equal(read_image(tmp_path / name)[1].affine, geom.affine)
    _round_trip(array, geom, tmp_path / (strip_suffix(name) + ".nrrd"))


@pytest.mark.real
@pytest.mark.parametrize("image,label,dtype", [("example_ct_sm.nii.gz", "example_seg.nii.gz", np.int16),
                                               ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", np.int32)])
def test_totalsegmentator_pair_shares_a_grid(image: str, label: str, dtype: type) -> None:
    ct, ct_geom = read_image(_need(TOTALSEG / image))
    seg, seg_geom = read_image(_need(TOTALSEG / label))
    assert ct.dtype == dtype and seg.dtype == np.uint8
    assert ct_geom.same_grid(seg_geom)
    out = align_label_to_image(seg, seg_geom, ct_geom, TOTALSEG / label, TOTALSEG / image)
    assert out is seg
    assert read_header(TOTALSEG / image).same_grid(ct_geom)
    # liver (5) and spleen (1) are present in the real labels
    assert {1, 5} <= set(np.unique(seg).tolist())


@pytest.mark.real
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_dicom_series_round_trip(suffix: str, tmp_path: Path) -> None:
    folder = _need(DCMQI / "ct-3slice")
    array, geom = read_image(folder)
    assert array.shape == (512, 512, 3)
    assert geom.orientation() == "LPS"
    np.testing.assert_allclose(geom.spacing, (0.810547, 0.810547, 1.0), atol=1e-5)
    assert array.min() == -3024  # the outside-field padding value
    # a single .dcm file reads its series
    assert np.array_equal(read_image(folder / "01.dcm")[0], array)
    _round_trip(array, geom, tmp_path / f"ct{suffix}")


@pytest.mark.real
@pytest.mark.parametrize("organ,value", [("liver", 1), ("spine", 2), ("heart", 3)])
def test_dcmqi_nrrd_masks_round_trip_and_land_on_the_dicom_grid(organ: str, value: int, tmp_path: Path) -> None:
    mask_path = _need(DCMQI / f"{organ}_seg.nrrd")
    mask, mask_geom = read_image(mask_path)
    assert set(np.unique(mask).tolist()) == {0, value}
    _, ct_geom = read_image(_need(DCMQI / "ct-3slice"))
    aligned = align_label_to_image(mask, mask_geom, ct_geom, mask_path, DCMQI / "ct-3slice")
    assert aligned.shape == ct_geom.shape and np.array_equal(aligned, mask)
    for suffix in (".nrrd", ".nii.gz"):
        _round_trip(mask, mask_geom, tmp_path / f"{organ}{suffix}")
        # the written copy still lands on the DICOM grid
        back, back_geom = read_image(tmp_path / f"{organ}{suffix}")
        assert np.array_equal(align_label_to_image(back, back_geom, ct_geom, tmp_path / organ, DCMQI), mask)


# ---------------------------------------------------------------------- reorientation
def _lps_affine() -> np.ndarray:
    aff = np.diag([-1.5, -0.8, 2.0, 1.0])
    aff[:3, 3] = [10.0, 20.0, -5.0]
    return aff


def _pir_affine() -> np.ndarray:
    """i -> posterior, j -> inferior, k -> right."""
    aff = np.zeros((4, 4))
    aff[1, 0], aff[2, 1], aff[0, 2], aff[3, 3] = -0.7, -2.0, 1.1, 1.0
    aff[:3, 3] = [3.0, 4.0, 5.0]
    return aff


@pytest.mark.parametrize("affine,code", [(_lps_affine(), "LPS"), (_pir_affine(), "PIR"),
                                         (np.diag([1.0, 2.0, 3.0, 1.0]), "RAS")])
def test_reorient_to_ras_then_back_is_exact(affine: np.ndarray, code: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 200, (4, 5, 6)).astype(np.int16)
    geom = Geometry(array.shape, affine)
    assert geom.orientation() == code
    ras, ras_geom = reorient_to_ras(array, geom)
    assert ras_geom.orientation() == "RAS"
    assert sorted(ras.shape) == sorted(array.shape)
    np.testing.assert_allclose(sorted(ras_geom.spacing), sorted(geom.spacing))
    # the same voxel sits at the same world point
    for ijk in [(0, 0, 0), (1, 2, 3), (3, 4, 5)]:
        world = affine @ np.array([*ijk, 1.0])
        new = np.rint(np.linalg.inv(ras_geom.affine) @ world)[:3].astype(int)
        assert ras[tuple(new)] == array[ijk]
    back = reorient_like(ras, ras_geom, geom)
    assert back.shape == array.shape and np.array_equal(back, array)
    # the grid the voxels land on, without moving them (what evaluate compares when it refuses a grid)
    for source, target in ((ras_geom, geom), (geom, ras_geom)):
        landed = reoriented_geometry(source, target)
        assert landed.shape == target.shape and np.allclose(landed.affine, target.affine)


def _turn(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    out = np.eye(3)
    i, j = (k for k in range(3) if k != axis)
    out[i, i], out[i, j], out[j, i], out[j, j] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
    return out


@pytest.mark.parametrize("turn", [(0, 2), (1, 2), (0, 1)])
@pytest.mark.parametrize("storage", [np.float64, np.float32])
def test_reorient_round_trip_at_45_degrees(turn: tuple[int, int], storage: type) -> None:
    """A scan tilted by exactly 45 degrees about two axes puts a voxel axis half-way between two world axes:
    the nearest orientation is a tie, broken one way for the scan's affine and maybe another for the
    reoriented one (float32 storage, as in NIfTI, rounds them apart). The way back must still be the
    exact inverse of the way in, for every axis order and flip."""
    array = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    tilt = _turn(turn[0], 45) @ _turn(turn[1], 45)
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([1.0, -1.0], repeat=3):
            affine = np.eye(4)
            affine[:3, :3] = tilt @ (np.eye(3)[:, perm] * np.array(flips)) @ np.diag([0.7, 1.0, 3.0])
            geom = Geometry(array.shape, affine.astype(storage).astype(np.float64))
            ras, ras_geom = reorient_to_ras(array, geom)
            assert np.array_equal(reorient_like(ras, ras_geom, geom), array), (perm, flips)


# ---------------------------------------------------------------------- label stored in another orientation
def _image() -> tuple[np.ndarray, Geometry]:
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, (4, 5, 6)).astype(np.uint8)
    aff = np.diag([1.5, 0.8, 2.0, 1.0])
    aff[:3, 3] = [10.0, 20.0, -5.0]
    return label, Geometry(label.shape, aff)


def _flip_transpose(array: np.ndarray, geom: Geometry) -> tuple[np.ndarray, Geometry]:
    """The same physical grid stored with axis 0 flipped and the axes permuted (2, 0, 1)."""
    transform = np.array([[1, -1], [2, 1], [0, 1]])
    moved = nib.orientations.apply_orientation(array, transform)
    aff = geom.affine @ nib.orientations.inv_ornt_aff(transform, geom.shape)
    return moved, Geometry(moved.shape, aff)


def test_label_in_another_orientation_is_reoriented_onto_the_image_grid(tmp_path: Path) -> None:
    label, geom = _image()
    stored, stored_geom = _flip_transpose(label, geom)
    assert stored.shape == (6, 4, 5) and stored_geom.orientation() != geom.orientation()
    write_image(tmp_path / "image.nii.gz", np.zeros(geom.shape, np.int16), geom)
    write_image(tmp_path / "label.nii.gz", stored, stored_geom)
    lab, lab_geom = read_image(tmp_path / "label.nii.gz")
    _, img_geom = read_image(tmp_path / "image.nii.gz")
    out = align_label_to_image(lab, lab_geom, img_geom, tmp_path / "label.nii.gz", tmp_path / "image.nii.gz")
    assert np.array_equal(out, label)


@pytest.mark.parametrize("shift,transpose", [(1.0, True), (1.0, False), (0.0, "crop")])
def test_label_on_another_grid_is_refused_naming_both_files(tmp_path: Path, shift: float,
                                                            transpose: bool | str) -> None:
    label, geom = _image()
    if transpose == "crop":
        stored, stored_geom = label[:3], Geometry(label[:3].shape, geom.affine)
    else:
        stored, stored_geom = _flip_transpose(label, geom) if transpose else (label, geom)
        aff = stored_geom.affine.copy()
        aff[:3, 3] += shift
        stored_geom = Geometry(stored.shape, aff)
    with pytest.raises(DataError) as info:
        align_label_to_image(stored, stored_geom, geom, tmp_path / "case_7_label.nii.gz",
                             tmp_path / "case_7_image.nii.gz")
    message = str(info.value)
    assert "case_7_label.nii.gz" in message and "case_7_image.nii.gz" in message
    assert "\n" not in message
    if transpose != "crop":  # how far apart, against what tolerance, and the usual fix
        # a shift of 1 mm on each axis: 1.7 mm, and 1.2 voxels along the axis of 0.8 mm voxels
        assert "place a voxel up to 1.7 mm (1.2 voxels along an axis) apart (tolerance 0.001 on the affines' " \
            "entries and 0.1 voxel at the grid's corners)" in message, message
        assert message.endswith("give it the image's header (SimpleITK's CopyInformation, or nibabel with the "
                                "image's affine)")
    else:  # the crop: a shape that differs, both shapes named
        assert "label shape (3, 5, 6) differs from image shape (4, 5, 6) (the image: " in message, message
        assert message.endswith("was it cropped or resampled, or paired with another case's image?")  # what to check
    # twin: the unshifted grid is accepted
    if transpose != "crop":
        ok, ok_geom = _flip_transpose(label, geom) if transpose else (label, geom)
        assert np.array_equal(align_label_to_image(ok, ok_geom, geom, Path("l"), Path("i")), label)


# ---------------------------------------------------------------------- dtypes and errors
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64])
def test_dtype_is_kept(tmp_path: Path, suffix: str, dtype: type) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if np.dtype(dtype).kind != "u" else \
        np.arange(24, dtype=dtype).reshape(2, 3, 4)
    _round_trip(array, Geometry(array.shape, _pir_affine()), tmp_path / f"a{suffix}")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_are_written_in_lps_as_itk_reads_them(tmp_path: Path, suffix: str) -> None:
    """NRRD and MHA hold LPS coordinates (ITK's), the project's affines RAS: the file SimpleITK reads has x
    and y negated, origin and direction. A round trip through our own reader and writer cannot see a sign
    lost both ways (a mirrored image would pass; helper-124), so the file is read here by SimpleITK itself,
    and a file SimpleITK wrote by our reader."""
    sitk = pytest.importorskip("SimpleITK")
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    write_image(tmp_path / f"ours{suffix}", array, Geometry(array.shape, _pir_affine()))
    itk = sitk.ReadImage(str(tmp_path / f"ours{suffix}"))
    lps = np.diag([-1.0, -1.0, 1.0])
    direction = _pir_affine()[:3, :3] / np.linalg.norm(_pir_affine()[:3, :3], axis=0)
    np.testing.assert_allclose(itk.GetOrigin(), lps @ _pir_affine()[:3, 3], atol=1e-6)  # (-3, -4, 5)
    np.testing.assert_allclose(np.reshape(itk.GetDirection(), (3, 3)), lps @ direction, atol=1e-6)
    np.testing.assert_allclose(itk.GetSpacing(), (0.7, 2.0, 1.1), atol=1e-6)
    assert sitk.GetArrayFromImage(itk)[4, 3, 2] == array[2, 3, 4]  # ITK's arrays are (z, y, x)
    theirs = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))
    theirs.SetOrigin((10.0, 20.0, 30.0))
    theirs.SetSpacing((1.5, 2.0, 2.5))
    sitk.WriteImage(theirs, str(tmp_path / f"theirs{suffix}"))
    back, geom = read_image(tmp_path / f"theirs{suffix}")
    assert np.array_equal(back, array) and geom.orientation() == "LPS"
    np.testing.assert_allclose(geom.affine, [[-1.5, 0, 0, -10.0], [0, -2.0, 0, -20.0], [0, 0, 2.5, 30.0],
                                             [0, 0, 0, 1]], atol=1e-9)


def test_a_dicom_series_reads_in_ras(tmp_path: Path) -> None:
    """A series whose slices lie at (0, 0, 3k) mm in the patient's LPS frame, rows along +x: in RAS the
    columns and rows run toward -x and -y. The series tests compared our reader with itself (helper-124)."""
    pytest.importorskip("SimpleITK")
    from conftest import write_dicom_series

    write_dicom_series(tmp_path / "series", shape=(16, 16, 6))
    array, geom = read_image(tmp_path / "series")
    assert array.shape == (16, 16, 6) and geom.orientation() == "LPS"
    np.testing.assert_allclose(geom.affine, np.diag([-2.0, -2.0, 3.0, 1.0]), atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scaled_integer_ct_reads_as_float32(tmp_path: Path, suffix: str) -> None:
    """int16 voxels with scl_slope/scl_inter (a common CT store) read as float32 with nibabel's values: they
    came as float64, twice the memory of every full-size volume; unscaled voxels keep their dtype."""
    raw = np.arange(-600, 600, dtype=np.int16).reshape(10, 12, 10)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, -1024.0)
    nib.save(img, str(tmp_path / f"scaled{suffix}"))
    array, _ = read_image(tmp_path / f"scaled{suffix}")
    assert array.dtype == np.float32
    assert np.array_equal(array, nib.load(str(tmp_path / f"scaled{suffix}")).get_fdata())
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(tmp_path / f"plain{suffix}"))
    assert read_image(tmp_path / f"plain{suffix}")[0].dtype == np.int16


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_one_volume_4d_nrrd_and_mha_read_as_3d(tmp_path: Path, suffix: str) -> None:
    """A 4D NRRD/MHA holding one volume (X, Y, Z, 1) reads as its volume, on its 3D geometry, as the same
    NIfTI does (it was refused as a 4D image); two volumes are still refused."""
    sitk = pytest.importorskip("SimpleITK")
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    write_image(tmp_path / f"three{suffix}", array, Geometry(array.shape, _pir_affine()))
    volume = sitk.ReadImage(str(tmp_path / f"three{suffix}"))
    sitk.WriteImage(sitk.JoinSeries([volume]), str(tmp_path / f"four{suffix}"))
    back, geom = read_image(tmp_path / f"four{suffix}")
    assert np.array_equal(back, array)
    np.testing.assert_allclose(geom.affine, _pir_affine(), atol=1e-6)
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(tmp_path / f"two{suffix}"))
    with pytest.raises(DataError, match=r"4D image of size \(3, 4, 5, 2\)"):
        read_image(tmp_path / f"two{suffix}")


@pytest.mark.parametrize("suffix,voxels", [(".mhd", "a.zraw"), (".nhdr", "a.raw.gz")])
def test_two_file_formats_name_their_voxel_file(tmp_path: Path, suffix: str, voxels: str) -> None:
    """A header that names its voxel file: the voxels were left under the hidden temporary name the header
    pointed at, so the image broke once temporary files were cleaned up."""
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    _round_trip(array, Geometry(array.shape, _pir_affine()), tmp_path / f"a{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"a{suffix}", voxels])
    assert voxels in (tmp_path / f"a{suffix}").read_text(errors="replace")
    # replace=False guards the voxel file too: another image's voxels under that name are left alone
    (tmp_path / f"a{suffix}").unlink()
    (tmp_path / voxels).write_bytes(b"another image's voxels")
    with pytest.raises(OutputExistsError, match=voxels):
        write_image(tmp_path / f"a{suffix}", array, Geometry(array.shape, _pir_affine()), replace=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [voxels]
    assert (tmp_path / voxels).read_bytes() == b"another image's voxels"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_bool_and_float16_are_stored_in_a_supported_dtype(tmp_path: Path, suffix: str) -> None:
    geom = Geometry.identity((2, 3, 4))
    mask = np.zeros(geom.shape, dtype=bool)
    mask[1, 1, 1] = True
    write_image(tmp_path / f"m{suffix}", mask, geom)
    back, _ = read_image(tmp_path / f"m{suffix}")
    assert back.dtype == np.uint8 and np.array_equal(back, mask)
    half = np.full(geom.shape, 0.25, dtype=np.float16)
    write_image(tmp_path / f"h{suffix}", half, geom)
    back, _ = read_image(tmp_path / f"h{suffix}")
    assert back.dtype == np.float32 and np.array_equal(back, half.astype(np.float32))


def test_write_is_atomic_and_checks_the_shape(tmp_path: Path) -> None:
    geom = Geometry.identity((2, 3, 4))
    with pytest.raises(DataError, match=r"array shape \(2, 3, 5\) differs"):
        write_image(tmp_path / "a.nii.gz", np.zeros((2, 3, 5)), geom)
    assert not (tmp_path / "a.nii.gz").exists()
    write_image(tmp_path / "a.nii.gz", np.zeros((2, 3, 4), np.uint8), geom)
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]  # no temporary file left behind
    with pytest.raises(DataError, match="unsupported output type"):
        write_image(tmp_path / "a.png", np.zeros((2, 3, 4)), geom)
    # an existing file (a ground truth the user saves a prediction over, by a slip) is refused unless asked
    # for: write_image replaced any file, where predict_file refuses one (helper-70)
    with pytest.raises(OutputExistsError, match=r"a\.nii\.gz: already exists; nothing was written over it "
                                                 r"\(replace=True writes over it\)"):
        write_image(tmp_path / "a.nii.gz", np.ones((2, 3, 4), np.uint8), geom)
    assert read_image(tmp_path / "a.nii.gz")[0].max() == 0
    write_image(tmp_path / "a.nii.gz", np.ones((2, 3, 4), np.uint8), geom, replace=True)
    assert read_image(tmp_path / "a.nii.gz")[0].max() == 1


def test_read_errors_name_the_file_and_twins_read(tmp_path: Path) -> None:
    geom = Geometry.identity((4, 4, 4))
    good = write_image(tmp_path / "good.nii.gz", np.ones(geom.shape, np.int16), geom)
    assert read_image(good)[0].shape == (4, 4, 4)
    with pytest.raises(DataError, match="file not found") as info:
        read_image(tmp_path / "missing.nii.gz")
    assert "missing.nii.gz" in str(info.value)
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        read_image(tmp_path / "empty.nii.gz")
    blob = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cut.nii.gz"):
        read_image(tmp_path / "cut.nii.gz")
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"not an image at all" * 30))
    with pytest.raises(DataError, match="text.nii.gz"):
        read_image(tmp_path / "text.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(DataError, match="2D image"):
        read_image(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), str(tmp_path / "time.nii.gz"))
    with pytest.raises(DataError, match="4D image"):
        read_image(tmp_path / "time.nii.gz")
    # twin: a 4D file with one volume is a 3D image
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 1), np.int16), np.eye(4)), str(tmp_path / "one.nii.gz"))
    assert read_image(tmp_path / "one.nii.gz")[0].shape == (4, 4, 4)
    assert read_header(tmp_path / "one.nii.gz").shape == (4, 4, 4)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 1, 1), np.int16), np.eye(4)), str(tmp_path / "five.nii.gz"))
    assert read_image(tmp_path / "five.nii.gz")[0].shape == read_header(tmp_path / "five.nii.gz").shape == (4, 4, 4)
    singular = np.eye(4)
    singular[2, 2] = 0.0
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None)
    img.set_sform(singular, code=1)  # the sform is stored as given; no qform
    nib.save(img, str(tmp_path / "singular.nii.gz"))
    with pytest.raises(DataError, match="invalid geometry"):
        read_image(tmp_path / "singular.nii.gz")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(DataError, match="unsupported file type"):
        read_image(tmp_path / "x.png")
    (tmp_path / "dicomless").mkdir()
    with pytest.raises(DataError, match="no DICOM series"):
        read_image(tmp_path / "dicomless")


def test_geometry_record() -> None:
    geom = Geometry((4, 5, 6), _lps_affine())
    assert geom.spacing == (1.5, 0.8, 2.0)
    assert geom.origin == (10.0, 20.0, -5.0)
    np.testing.assert_allclose(geom.direction, np.diag([-1.0, -1.0, 1.0]))
    again = Geometry.from_dict(geom.to_dict())
    assert again.same_grid(geom) and again.shape == (4, 5, 6)
    assert not geom.same_grid(geom.with_shape((4, 5, 7)))
    assert strip_suffix("a/case_001.nii.gz") == "case_001" and suffix_of("X.NRRD") == ".nrrd"


@pytest.mark.parametrize("qform_code", [0, 1])
def test_written_nifti_keeps_the_source_qform_and_sform(tmp_path: Path, qform_code: int) -> None:
    """A label map written on an image's geometry carries the image's two header transforms and codes, so
    viewers that trust the qform (ITK-SNAP, Slicer) and those that trust the sform (nibabel) put it on the
    image, even when the image's qform and sform disagree (here by 30 mm)."""
    sitk = pytest.importorskip("SimpleITK")
    sform = np.diag([1.5, 1.5, 3.0, 1.0])
    sform[:3, 3] = [-40.0, 12.0, 7.0]
    qform = sform.copy()
    qform[0, 3] += 30.0
    src = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), sform)
    src.set_sform(sform, code=2)
    src.set_qform(qform, code=qform_code)
    nib.save(src, str(tmp_path / "image.nii.gz"))
    _, geom = read_image(tmp_path / "image.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coded sform: no warning of an uncoded file (below)
        warn_about_placement(tmp_path / "image.nii.gz", geom)
    write_image(tmp_path / "label.nii.gz", np.ones(geom.shape, np.uint8), geom)
    out = nib.load(str(tmp_path / "label.nii.gz")).header
    assert (int(out["qform_code"]), int(out["sform_code"])) == (qform_code, 2)
    assert np.allclose(out.get_sform(), sform) and np.allclose(out.get_qform(), src.header.get_qform())
    assert np.allclose(sitk.ReadImage(str(tmp_path / "label.nii.gz")).GetOrigin(),
                       sitk.ReadImage(str(tmp_path / "image.nii.gz")).GetOrigin())
    # a geometry that no longer matches the source's transforms (resampled, say) gets its own affine in both,
    # with the source's codes where set (the affine still maps into the space they name), else 1
    moved = Geometry(geom.shape, geom.affine @ np.diag([2.0, 2.0, 2.0, 1.0]), geom.nifti_forms)
    write_image(tmp_path / "moved.nii.gz", np.ones(moved.shape, np.uint8), moved)
    out = nib.load(str(tmp_path / "moved.nii.gz")).header
    assert (int(out["qform_code"]), int(out["sform_code"])) == (max(qform_code, 1), 2)
    assert np.allclose(out.get_sform(), moved.affine) and np.allclose(out.get_qform(), moved.affine)


def test_a_negative_voxel_size_is_named_as_a_laterality_risk(tmp_path: Path) -> None:
    """NIfTI requires positive voxel sizes. nibabel takes the absolute value of a negative one (printing a
    note that names no file, at every read), ITK mirrors the axis: a label map written with positive sizes
    showed mirrored on its image in ITK-SNAP and 3D Slicer, silently (helper-71). predict now says so,
    naming the file, and nibabel's note is held back."""
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.diag([0.7, 0.7, 5.0, 1.0])),
             str(tmp_path / "image.nii"))
    raw = bytearray((tmp_path / "image.nii").read_bytes())
    pixdim = np.frombuffer(bytes(raw[76:108]), "<f4").copy()
    pixdim[1] = -pixdim[1]
    raw[76:108] = pixdim.tobytes()
    (tmp_path / "image.nii").write_bytes(bytes(raw))
    # outside pytest (whose capture handlers catch log records), in a process of its own: nibabel's
    # unattributed note came on stderr at every read, and nibabel's own suppressor left its logger without
    # a handler for good (helper-73)
    code = ("import sys, nibabel; from unionseg.data.io import read_image, read_header, predict_kind; "
            "p = sys.argv[1]; read_image(p); read_header(p); predict_kind(__import__('pathlib').Path(p)); "
            "assert nibabel.imageglobals.logger.handlers, 'handler lost'; "
            "assert nibabel.imageglobals.logger.level == 0, 'level left raised'")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "image.nii")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "pixdim" not in proc.stderr, proc.stderr
    _, geom = read_image(tmp_path / "image.nii")
    assert read_header(tmp_path / "image.nii").same_grid(geom)
    assert np.allclose(np.abs(np.diag(geom.affine))[:3], [0.7, 0.7, 5.0])  # read as nibabel reads it
    with pytest.warns(UnionsegWarning, match=r"image\.nii: its header gives a negative voxel size \(pixdim -0\.7, "
                                             r"0\.7, 5\).*ITK-based viewers \(3D Slicer, ITK-SNAP\) may mirror"):
        warn_about_placement(tmp_path / "image.nii", geom)
    _, plain = read_image(write_image(tmp_path / "plain.nii.gz", np.zeros((6, 5, 4), np.int16), geom))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # positive sizes: nothing to say
        warn_about_placement(tmp_path / "plain.nii.gz", plain)


def test_nifti_without_transform_codes_gets_none_back(tmp_path: Path) -> None:
    """An image whose qform and sform codes are both 0 (old converters, some research tools): nibabel places
    it by its voxel sizes (x flipped, centred), ITK by its own rule. The label map was written with both
    codes 1 and nibabel's affine, so ITK-SNAP and 3D Slicer showed it mirrored and moved against the image;
    written with codes 0 too, every reader places both alike. A label of another shape, on which the
    voxel-size rule would give another affine, gets the explicit one."""
    sitk = pytest.importorskip("SimpleITK")
    src = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.diag([1.5, 1.2, 3.0, 1.0]))
    src.set_qform(None, code=0)
    src.set_sform(None, code=0)
    nib.save(src, str(tmp_path / "image.nii.gz"))
    _, geom = read_image(tmp_path / "image.nii.gz")
    # predict says the orientation of such an input is a guess (it was read silently)
    with pytest.warns(UnionsegWarning, match=r"image\.nii\.gz: neither its qform nor its sform is set \(both codes "
                                             r"0\).*axes taken as LAS, centred on the volume"):
        warn_about_placement(tmp_path / "image.nii.gz", geom)
    write_image(tmp_path / "label.nii.gz", np.ones(geom.shape, np.uint8), geom)
    out = nib.load(str(tmp_path / "label.nii.gz"))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (0, 0)
    assert np.allclose(out.affine, nib.load(str(tmp_path / "image.nii.gz")).affine)
    image, label = (sitk.ReadImage(str(tmp_path / f"{n}.nii.gz")) for n in ("image", "label"))
    assert np.allclose(label.GetOrigin(), image.GetOrigin())
    assert np.allclose(label.GetDirection(), image.GetDirection())
    bigger = Geometry((7, 5, 4), geom.affine, geom.nifti_forms)
    write_image(tmp_path / "bigger.nii.gz", np.ones(bigger.shape, np.uint8), bigger)
    out = nib.load(str(tmp_path / "bigger.nii.gz"))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 1)
    assert np.allclose(out.affine, geom.affine)


def test_unreadable_qform_beside_a_valid_sform_still_reads_and_writes(tmp_path: Path) -> None:
    """A damaged qform quaternion (|b, c, d| > 1) next to a coded sform: the image reads on its sform and a
    label written on it gets that affine in both transforms (found by the mutation property test)."""
    src = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    src.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=2)
    src.header["qform_code"] = 1
    src.header["quatern_b"], src.header["quatern_c"], src.header["quatern_d"] = 0.0, 1.0000003, 0.0
    nib.save(src, str(tmp_path / "image.nii"))
    _, geom = read_image(tmp_path / "image.nii")
    assert geom.nifti_forms is None and np.allclose(geom.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    write_image(tmp_path / "label.nii.gz", np.ones(geom.shape, np.uint8), geom)
    assert np.allclose(nib.load(str(tmp_path / "label.nii.gz")).affine, geom.affine)


def test_a_flipped_bit_in_compressed_voxels_is_caught_by_the_gzip_crc(tmp_path: Path) -> None:
    """``nib.load`` reads only the bytes the header asks for and never reaches the gzip trailer, so a
    corrupted stream that still inflates passes unseen; read_image reads to the end and checks the CRC."""
    geom = Geometry.identity((16, 16, 8))
    rng = np.random.default_rng(0)
    good = write_image(tmp_path / "good.nii.gz", rng.integers(-1000, 1000, geom.shape).astype(np.int16), geom)
    blob = bytearray(good.read_bytes())
    blob[-6] ^= 0xFF  # the stored CRC-32 (the last 8 bytes: CRC, then length)
    (tmp_path / "bad.nii.gz").write_bytes(bytes(blob))
    np.asanyarray(nib.load(str(tmp_path / "bad.nii.gz")).dataobj)  # nibabel alone reads it without a word
    with pytest.raises(DataError, match="bad.nii.gz.*CRC check failed"):
        read_image(tmp_path / "bad.nii.gz")
    (tmp_path / "trailing.nii.gz").write_bytes(good.read_bytes() + b"bytes after the gzip member")
    np.testing.assert_array_equal(read_image(tmp_path / "trailing.nii.gz")[0], read_image(good)[0])  # as gzip -t
    twin, _ = read_image(good)  # twin: the intact file reads, NIfTI-2 too
    nib.save(nib.Nifti2Image(twin, np.eye(4)), str(tmp_path / "two.nii.gz"))
    np.testing.assert_array_equal(read_image(tmp_path / "two.nii.gz")[0], twin)


@pytest.mark.parametrize(("unit", "factor"), [("meter", 1000.0), ("micron", 0.001), ("mm", 1.0), ("unknown", 1.0)])
def test_spatial_units_other_than_mm_are_converted_alike_by_read_image_and_read_header(
        tmp_path: Path, unit: str, factor: float) -> None:
    """A header in metres or microns is read in mm, with a warning, by both readers: prepare compares
    read_header's geometry with the one read_image recorded, and a difference would be taken for a
    changed image."""
    from unionseg.errors import UnionsegWarning

    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-100.0, -120.0, 30.0)
    stored = affine.copy()
    stored[:3, :] /= factor
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), stored)
    img.header.set_xyzt_units(unit)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        geom = read_image(tmp_path / "ct.nii.gz")[1]
        header = read_header(tmp_path / "ct.nii.gz")
    told = [str(w.message) for w in caught if issubclass(w.category, UnionsegWarning)]
    assert len(told) == (0 if factor == 1.0 else 2) and all("ct.nii.gz" in m and unit in m for m in told)
    np.testing.assert_allclose(geom.affine, affine, rtol=1e-6, atol=1e-5)
    assert geom.same_grid(header, atol=1e-9)
    # a map written on that grid is in mm, its codes the source's (an aligned sform, code 2, became 1: helper-98)
    img.set_qform(stored, code=1)
    img.set_sform(stored, code=2)
    nib.save(img, str(tmp_path / "aligned.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aligned = read_image(tmp_path / "aligned.nii.gz")[1]
    write_image(tmp_path / "map.nii.gz", np.zeros((6, 5, 4), np.uint8), aligned)
    written = nib.load(str(tmp_path / "map.nii.gz"))
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(written.affine, affine, rtol=1e-6, atol=1e-4)


def test_spacing_no_scanner_gives_is_refused_naming_the_file(tmp_path: Path) -> None:
    from unionseg.data.preprocess import check_spacing

    with pytest.raises(DataError, match=r"ct.nii.gz: voxel spacing \(0.001, 0.001, 0.002\) mm is outside"):
        check_spacing(Geometry.identity((4, 4, 4), (0.001, 0.001, 0.002)), tmp_path / "ct.nii.gz")
    with pytest.raises(DataError, match="outside"):
        check_spacing(Geometry.identity((4, 4, 4), (1.0, 1.0, 500.0)), None)
    check_spacing(Geometry.identity((4, 4, 4), (0.5, 0.5, 5.0)), None)  # twin: a thick-slice CT passes


@pytest.mark.parametrize("transpose", [False, True])
def test_a_label_whose_spacing_drifts_along_a_long_axis_is_refused(tmp_path: Path, transpose: bool) -> None:
    """Affines within 0.001 entry by entry passed as one grid, while a spacing of 0.7009 against 0.7 mm puts
    voxel 511 0.46 mm (two thirds of a voxel) away: the label was read as drawn on the image, and evaluate
    scored a shifted prediction Dice 1 (helper-107). A drift under 0.1 voxel still passes, stored in
    another orientation too."""
    image_geom = Geometry.identity((512, 4, 3), (0.7, 0.7, 5.0))
    label = np.zeros((512, 4, 3), np.uint8)
    label[400:420] = 1
    for spacing, refused in ((0.7009, True), (0.70005, False)):
        geom = Geometry.identity((512, 4, 3), (spacing, 0.7, 5.0))
        stored, stored_geom = _flip_transpose(label, geom) if transpose else (label, geom)
        if refused:
            with pytest.raises(DataError, match=r"place a voxel up to 0.46\d* mm \(0.66 voxels along an axis\)"):
                align_label_to_image(stored, stored_geom, image_geom, tmp_path / "l.nii.gz", tmp_path / "i.nii.gz")
        else:
            out = align_label_to_image(stored, stored_geom, image_geom, tmp_path / "l.nii.gz", tmp_path / "i.nii.gz")
            assert np.array_equal(out, label)


def test_a_write_that_cannot_open_its_temporary_names_the_file_meant(tmp_path: Path) -> None:
    """The error named the hidden temporary (``.benchmark.json.11228.tmp: Permission denied``; helper-109)."""
    from unionseg.jsonfile import write_text

    with pytest.raises(OSError) as info:
        write_text(tmp_path / "gone" / "summary.json", "{}")
    assert info.value.filename == str(tmp_path / "gone" / "summary.json")


def test_another_users_file_in_a_sticky_folder_is_refused_before_the_work(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """In a shared sticky folder no write permission lets a user replace another's file: an evaluation
    replaced its figures and then failed on its tables (helper-109). check_writable names the file first;
    the owner of the folder, or of the file, passes."""
    import os

    from unionseg.errors import UnionsegError
    from unionseg.jsonfile import check_writable

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "metrics.csv").write_text("a colleague's\n")
    shared.chmod(0o1777)
    me = os.stat(shared / "metrics.csv").st_uid + 4242  # someone else than the files' owner
    monkeypatch.setattr(os, "geteuid", lambda: me)
    with pytest.raises(UnionsegError, match="another user's file in a shared \\(sticky\\) folder") as info:
        check_writable(shared, [shared / "metrics.csv", shared / "summary.json"])
    assert info.value.path == shared / "metrics.csv"
    check_writable(shared, [shared / "summary.json"])  # not there: nothing to replace
    shared.chmod(0o777)
    check_writable(shared, [shared / "metrics.csv"])  # not sticky: write permission is enough


def test_a_lock_file_that_cannot_be_opened_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every permission problem read "cannot create the lock file" (helper-109): a lock file another user
    left unwritable and a folder this user cannot write are told apart, each with what to do."""
    import os

    from unionseg.errors import UnionsegError
    from unionseg.locking import FileLock

    def denied(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    lock = tmp_path / "cache" / ".lock"
    with pytest.raises(UnionsegError, match=r"cannot create the lock file for the prepared cache: .* is not writable "
                                            r"by this user \(Permission denied\); work on a copy") as info:
        FileLock(lock, "the prepared cache").try_acquire()
    assert info.value.path == lock
    lock.parent.mkdir(exist_ok=True)
    lock.write_text("")
    with pytest.raises(UnionsegError, match=r"the lock file for the prepared cache exists but cannot be opened for "
                                            r"writing by this user.*Permission denied; .*chmod g\+w"):
        FileLock(lock, "the prepared cache").try_acquire()

    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "open", read_only)  # no owner can make it writable there (helper-110)
    with pytest.raises(UnionsegError, match=r"cannot create the lock file for the prepared cache: it is on a read-only "
                                            r"file system \(Read-only file system\); work on a copy"):
        FileLock(lock, "the prepared cache").try_acquire()


def test_another_users_writable_lock_file_in_a_sticky_folder_is_opened_without_create(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux's protected_regular refuses O_CREAT on another user's file in a sticky folder even when the file
    is writable: the lock opens it without O_CREAT then (helper-110)."""
    import os

    from unionseg.locking import FileLock

    lock = tmp_path / ".lock"
    lock.write_text("")
    real_open = os.open

    def protected(path: object, flags: int, *args: object) -> int:
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", protected)
    held = FileLock(lock, "the prepared cache")
    assert held.try_acquire()
    held.release()
