"""Dataset folders: MSD and nnU-Net v2 raw layouts, and every structural error naming its file."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

from conftest import write_msd_dataset, write_nnunet_dataset, write_tiny_case
from unionseg.data.catalog import check_label_map, list_image_files, scan_dataset
from unionseg.errors import DataError, UnionsegWarning


def _edit_json(root: Path, **changes: Any) -> Path:
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------- both layouts
def test_msd_layout(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "Task03_Liver", 3, {0: "background", 1: "liver", 2: "cancer"})
    info = scan_dataset("liver", root)
    assert info.layout == "msd"
    assert info.declared_labels == {0: "background", 1: "liver", 2: "cancer"}
    assert [c.case_id for c in info.cases] == ["case_000", "case_001", "case_002"]
    case = info.cases[1]
    assert case.dataset == "liver"
    assert case.image == (root / "imagesTr" / "case_001.nii.gz").absolute()
    assert case.label == (root / "labelsTr" / "case_001.nii.gz").absolute()
    assert case.image.is_file() and case.label is not None and case.label.is_file()
    assert case.oracle_label is None
    assert scan_dataset("liver", root, layout="msd").cases == info.cases


def test_nnunet_v2_raw_layout(tmp_path: Path) -> None:
    root = write_nnunet_dataset(tmp_path / "Dataset002_Kidney", 2, {"background": 0, "kidney": 1, "tumor": 2})
    # a stray file and a hidden file in imagesTr are ignored
    (root / "imagesTr" / "notes.txt").write_text("x")
    (root / "imagesTr" / ".hidden_0000.nii.gz").write_text("x")
    info = scan_dataset("kidney", root)
    assert info.layout == "nnunet"
    assert info.declared_labels == {0: "background", 1: "kidney", 2: "tumor"}
    assert [c.case_id for c in info.cases] == ["case_000", "case_001"]
    assert info.cases[0].image.name == "case_000_0000.nii.gz"
    assert info.cases[0].label == root / "labelsTr" / "case_000.nii.gz"


def test_nnunet_leftovers_are_warned_about_not_trained_on_quietly(tmp_path: Path) -> None:
    """A half-converted nnU-Net folder (images of another ending, label files without an image, a
    numTraining that disagrees) scans, but says what it leaves out; a clean one says nothing."""
    import shutil
    import warnings

    from unionseg.errors import UnionsegWarning

    root = write_nnunet_dataset(tmp_path / "clean", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(scan_dataset("kidney", root).cases) == 2  # twin: nothing to say
    (root / "imagesTr" / "case_001_0000.nii.gz").rename(root / "imagesTr" / "case_001_0000.nii")
    shutil.copy(root / "labelsTr" / "case_000.nii.gz", root / "labelsTr" / "case_009.nii.gz")
    with pytest.warns(UnionsegWarning) as caught:
        info = scan_dataset("kidney", root)
    assert [c.case_id for c in info.cases] == ["case_000"]
    told = "\n".join(str(w.message) for w in caught)
    assert "1 image(s) do not end in file_ending '.nii.gz' and are left out: case_001_0000.nii" in told
    assert "label file(s) have no image in imagesTr and are left out: case_001.nii.gz, case_009.nii.gz" in told
    assert "numTraining is 2 but imagesTr holds 1 case(s)" in told


def test_nnunet_region_labels_and_oracle_folder(tmp_path: Path) -> None:
    root = write_nnunet_dataset(tmp_path / "d", 1, {"background": 0, "organ": [1, 2]})
    assert scan_dataset("d", root).declared_labels == {0: "background", 1: "organ", 2: "organ"}
    # a value given alone keeps its own name, whichever comes first (the region's name gave a false warning)
    for labels in ({"background": 0, "tumour": 2, "organ": [1, 2]}, {"background": 0, "organ": [1, 2], "tumour": 2}):
        again = write_nnunet_dataset(tmp_path / f"d{len(str(labels))}{list(labels)[1]}", 1, labels)
        assert scan_dataset("d", again).declared_labels == {0: "background", 1: "organ", 2: "tumour"}
    oracle = tmp_path / "oracle"
    with pytest.raises(DataError, match="oracle label for case 'case_000' is missing"):
        scan_dataset("d", root, oracle_dir=oracle)
    write_tiny_case(tmp_path / "img.nii.gz", oracle / "case_000.nii.gz")
    assert scan_dataset("d", root, oracle_dir=oracle).cases[0].oracle_label == oracle / "case_000.nii.gz"


# ---------------------------------------------------------------------- path escapes
@pytest.mark.parametrize("bad,good", [
    ("../x.nii.gz", "./imagesTr/x.nii.gz"),
    ("./imagesTr/../../x.nii.gz", "./imagesTr/../imagesTr/x.nii.gz"),
    ("/abs/x.nii.gz", "imagesTr/x.nii.gz"),
    ("C:\\data\\x.nii.gz", "imagesTr/x.nii.gz"),
])
def test_path_escapes_are_rejected_and_the_twin_accepted(tmp_path: Path, bad: str, good: str) -> None:
    root = tmp_path / "ds"
    write_tiny_case(root / "imagesTr" / "x.nii.gz", root / "labelsTr" / "x.nii.gz")
    write_tiny_case(tmp_path / "x.nii.gz", None)  # the file outside the root exists
    training = [{"image": bad, "label": "./labelsTr/x.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a"}, "training": training}))
    with pytest.raises(DataError, match=r"training\[0\].image: .*(escapes the dataset root|absolute path)") as info:
        scan_dataset("ds", root)
    assert info.value.path == root / "dataset.json"
    training[0]["image"] = good
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a"}, "training": training}))
    assert scan_dataset("ds", root).cases[0].image == (root / "imagesTr" / "x.nii.gz").absolute()


def test_label_path_escape_is_rejected(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "ds", 1)
    _edit_json(root, training=[{"image": "./imagesTr/case_000.nii.gz", "label": "../labelsTr/case_000.nii.gz"}])
    with pytest.raises(DataError, match=r"training\[0\].label: path '../labelsTr/case_000.nii.gz' escapes"):
        scan_dataset("ds", root)


def test_symlinked_image_folder_is_accepted(tmp_path: Path) -> None:
    """The containment check is lexical: data reached through a link inside the root is fine."""
    elsewhere = write_msd_dataset(tmp_path / "disk2", 1)
    root = tmp_path / "ds"
    root.mkdir()
    os.symlink(elsewhere / "imagesTr", root / "imagesTr")
    os.symlink(elsewhere / "labelsTr", root / "labelsTr")
    shutil.copy(elsewhere / "dataset.json", root / "dataset.json")
    info = scan_dataset("ds", root)
    assert info.cases[0].image == root.absolute() / "imagesTr" / "case_000.nii.gz"


def test_msd_leftovers_are_warned_about(tmp_path: Path) -> None:
    """Images the 'training' list leaves out, and a numTraining that disagrees with it, are told (the
    nnU-Net layout already said so); a clean folder says nothing."""
    import warnings

    from unionseg.errors import UnionsegWarning

    root = write_msd_dataset(tmp_path / "ds", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(scan_dataset("ds", root).cases) == 3
    data = json.loads((root / "dataset.json").read_text())
    _edit_json(root, training=data["training"][:2], numTraining=3)
    with pytest.warns(UnionsegWarning) as caught:
        assert len(scan_dataset("ds", root).cases) == 2
    told = "\n".join(str(w.message) for w in caught)
    assert "1 image(s) are not in dataset.json's 'training' list and are left out: case_002.nii.gz" in told
    assert "numTraining is 3 but 'training' lists 2 case(s)" in told


def test_dataset_json_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "ds", 2)
    path = root / "dataset.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # Notepad's UTF-8 with BOM
    assert len(scan_dataset("ds", root).cases) == 2


def test_nnunet_json_with_a_training_list_is_nnunet(tmp_path: Path) -> None:
    """nnU-Net ignores a 'training' list; its keys decide (it was read as MSD and its labels refused)."""
    root = write_nnunet_dataset(tmp_path / "ds", 2)
    _edit_json(root, training=[{"image": "./imagesTr/case_000_0000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}])
    info = scan_dataset("ds", root)
    assert info.layout == "nnunet" and len(info.cases) == 2


def test_nnunet_v1_task_folder_is_named_as_such(tmp_path: Path) -> None:
    """An MSD-style list naming case.nii.gz where the file is case_0000.nii.gz (nnU-Net v1) says what it is."""
    root = write_msd_dataset(tmp_path / "ds", 2)
    for image in sorted((root / "imagesTr").iterdir()):
        image.rename(image.with_name(image.name.replace(".nii.gz", "_0000.nii.gz")))
    with pytest.raises(DataError, match="case_000_0000.nii.gz is there: an nnU-Net v1 task folder, which layout "
                                        "'folders' reads"):
        scan_dataset("ds", root)
    assert len(scan_dataset("ds", root, layout="folders").cases) == 2  # twin: the layout it names reads it


def test_folders_layout_keys(tmp_path: Path) -> None:
    """A labels folder's names are never channel-tagged: case_0000 keeps its name (its label was reported
    missing); an images folder drops _0000 only when every image has it."""
    root = write_nnunet_dataset(tmp_path / "tagged", 2, prefix="case_0000x")  # case_0000x_000_0000.nii.gz
    (root / "dataset.json").unlink()
    assert [c.case_id for c in scan_dataset("ds", root).cases] == ["case_0000x_000", "case_0000x_001"]
    for folder, names, tag, ids in (("plain", ["case_0000", "case_0001"], "_0000", ["case_0000", "case_0001"]),
                                    ("untagged", ["x_0000", "y"], "", ["x_0000", "y"])):
        root = tmp_path / folder
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        for i, name in enumerate(names):
            write_tiny_case(root / "imagesTr" / f"{name}{tag}.nii.gz", root / "labelsTr" / f"{name}.nii.gz", seed=i)
        assert [c.case_id for c in scan_dataset("ds", root).cases] == ids


def test_an_image_without_the_channel_tag_among_tagged_ones_is_named(tmp_path: Path) -> None:
    """One image of a folders dataset saved without _0000 kept the tag in every case id, and the error blamed
    the first TAGGED image for a missing label; the untagged file is the one to name (helper-80)."""
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, name in enumerate(("a", "b", "c", "d")):
        tag = "" if name == "c" else "_0000"
        write_tiny_case(root / "imagesTr" / f"{name}{tag}.nii.gz", root / "labelsTr" / f"{name}.nii.gz", seed=i)
    with pytest.raises(DataError, match="image name lacks the channel suffix _0000 that 3 other image") as info:
        scan_dataset("ds", root)
    assert info.value.path is not None and info.value.path.name == "c.nii.gz"
    assert "rename it c_0000.nii.gz" in str(info.value)
    (root / "imagesTr" / "c.nii.gz").rename(root / "imagesTr" / "c_0000.nii.gz")
    assert [c.case_id for c in scan_dataset("ds", root).cases] == ["a", "b", "c", "d"]
    # two channels per case (_0000, _0001): no advice to rename a_0001 to a_0001_0000 (helper-82)
    two = tmp_path / "two"
    (two / "imagesTr").mkdir(parents=True)
    (two / "labelsTr").mkdir()
    for i, name in enumerate(("a", "b")):
        write_tiny_case(two / "imagesTr" / f"{name}_0000.nii.gz", two / "labelsTr" / f"{name}.nii.gz", seed=i)
        shutil.copy(two / "imagesTr" / f"{name}_0000.nii.gz", two / "imagesTr" / f"{name}_0001.nii.gz")
    with pytest.raises(DataError, match="is channel 0001 of a case whose _0000 image is here") as info:
        scan_dataset("ds", two)
    assert "rename it" not in str(info.value) and "lacks the channel suffix" not in str(info.value)


def test_a_missing_file_that_is_there_with_another_ending_is_pointed_at(tmp_path: Path) -> None:
    """dataset.json lists case_000.nii.gz and the disk holds case_000.nii: the error names both."""
    import nibabel as nib

    root = write_msd_dataset(tmp_path / "ds", 2)
    for sub in ("imagesTr", "labelsTr"):
        gz = root / sub / "case_000.nii.gz"
        nib.save(nib.load(str(gz)), str(gz.with_name("case_000.nii")))
        gz.unlink()
        with pytest.raises(DataError, match="is missing; case_000.nii is there: dataset.json must name the file "
                                            "as it is on disk"):
            scan_dataset("ds", root)
        gz.with_name("case_000.nii").rename(gz.with_name("keep.nii"))
        nib.save(nib.load(str(gz.with_name("keep.nii"))), str(gz))
        gz.with_name("keep.nii").unlink()


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_a_broken_link_is_an_error_not_a_case_left_out(tmp_path: Path) -> None:
    store = write_nnunet_dataset(tmp_path / "store", 3)
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((store / sub).iterdir()):
            os.symlink(f, root / sub / f.name)
    assert len(scan_dataset("ds", root).cases) == 3  # twin: links that resolve are read
    (store / "imagesTr" / "case_002_0000.nii.gz").unlink()
    with pytest.raises(DataError, match="broken link: its target .*case_002_0000.nii.gz does not exist"):
        scan_dataset("ds", root)


# ---------------------------------------------------------------------- structural errors
def test_duplicate_case_ids(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "ds", 2)
    data = json.loads((root / "dataset.json").read_text())
    _edit_json(root, training=[data["training"][0], data["training"][0]])
    with pytest.raises(DataError, match="duplicate case id 'case_000'") as info:
        scan_dataset("ds", root)
    assert info.value.path is not None and info.value.path.name == "case_000.nii.gz"
    _edit_json(root, training=data["training"])
    assert len(scan_dataset("ds", root).cases) == 2


@pytest.mark.parametrize("layout", ["msd", "nnunet"])
def test_missing_label_file(tmp_path: Path, layout: str) -> None:
    writer = write_msd_dataset if layout == "msd" else write_nnunet_dataset
    root = writer(tmp_path / "ds", 2)
    assert len(scan_dataset("ds", root).cases) == 2
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    remedy = ("the dataset and its entry out of dataset.json's 'training' list" if layout == "msd"
              else "the dataset (its image out of imagesTr/)")
    with pytest.raises(DataError, match=re.escape(f"label file for case 'case_001' is missing: a case is trained on "
                                                  f"or scored with its label file; add it, or take the case out of "
                                                  f"{remedy}")) as info:
        scan_dataset("ds", root)
    assert str(info.value).startswith(str(root / "labelsTr"))
    (root / "labelsTr" / "case_000.nii.gz").unlink()  # how many lack theirs: not one error per attempt
    with pytest.raises(DataError, match=r"label file for case 'case_000' is missing \(2 cases of the dataset lack "
                                        r"theirs\): a case"):
        scan_dataset("ds", root)
    if layout == "msd":  # an entry that names no label: the file may well be there, dataset.json is at fault
        json_path = _edit_json(root, training=[{"image": "./imagesTr/case_000.nii.gz"}])
        with pytest.raises(DataError, match=re.escape(f"{json_path}: dataset.json's 'training' entry of case "
                                                      "'case_000' gives no 'label'; add it (\"label\": "
                                                      "\"./labelsTr/case_000.nii.gz\", say) or take the entry out")):
            scan_dataset("ds", root)


def test_missing_image_file(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "ds", 2)
    (root / "imagesTr" / "case_000.nii.gz").unlink()
    with pytest.raises(DataError, match="image file listed in dataset.json is missing") as info:
        scan_dataset("ds", root)
    assert "case_000.nii.gz" in str(info.value)


def test_empty_and_missing_dataset_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset.json") as info:
        scan_dataset("ds", tmp_path / "empty")
    assert info.value.path == tmp_path / "empty"
    with pytest.raises(DataError, match=r"folder of dataset 'ds' not found \(check the dataset's root"):
        scan_dataset("ds", tmp_path / "nowhere")
    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match="folder of dataset 'ds' a file, not a folder"):
        scan_dataset("ds", tmp_path / "afile")
    # an MSD file with no cases, an nnU-Net folder with an empty imagesTr
    root = write_msd_dataset(tmp_path / "msd", 1)
    _edit_json(root, training=[])
    with pytest.raises(DataError, match="no training cases"):
        scan_dataset("ds", root)
    root = write_nnunet_dataset(tmp_path / "nn", 1)
    (root / "imagesTr" / "case_000_0000.nii.gz").unlink()
    with pytest.raises(DataError, match="no training cases"):
        scan_dataset("ds", root)
    shutil.rmtree(root / "imagesTr")
    with pytest.raises(DataError, match="no imagesTr folder, nor imagesTs"):
        scan_dataset("ds", root)


def test_an_nnunet_test_set_with_its_labels_is_read_from_imagests_and_labelsts(tmp_path: Path) -> None:
    """A fully labelled test set kept as nnU-Net keeps one (imagesTs + labelsTs beside its dataset.json) failed
    with "no imagesTr folder", naming no way out; it is read with the same naming rules, and its dataset.json
    still checks the recipe's label values."""
    root = write_nnunet_dataset(tmp_path / "nn", 2)
    (root / "imagesTr").rename(root / "imagesTs")
    with pytest.raises(DataError, match=r"imagesTs/ is here, but no labelsTs/ beside it") as refused:
        scan_dataset("ds", root)
    assert "'folders:IMAGES,LABELS'" in str(refused.value)
    (root / "labelsTr").rename(root / "labelsTs")
    info = scan_dataset("ds", root)
    assert (info.layout, info.declared_labels) == ("nnunet", {0: "background", 1: "organ", 2: "tumour"})
    assert [(c.case_id, c.image.parent.name, c.label.parent.name if c.label else None) for c in info.cases] == [
        ("case_000", "imagesTs", "labelsTs"), ("case_001", "imagesTs", "labelsTs")]


def test_check_label_map_warns_of_a_declared_value_the_project_leaves_unmapped(tmp_path: Path) -> None:
    """`labels: {1: liver}` on the MSD liver set passed `info` without a word although its dataset.json
    declares 2 "cancer": prepare then failed every case, suggesting '2: background', which teaches that a
    lesion inside the liver is not liver. Now info names it by its dataset.json name and the right fixes."""
    json_path = tmp_path / "dataset.json"
    with pytest.warns(UnionsegWarning, match=r"declares 2 \('cancer'\), which the project does not map for "
                                             r"dataset 'liver': prepare fails every case that holds it") as caught:
        check_label_map("liver", {0: "background", 1: "liver", 2: "cancer"}, {1: "liver"}, json_path)
    assert "'2: liver'" in str(caught[0].message)  # an example from the dataset's own classes
    with pytest.warns(UnionsegWarning, match=r"part of it: '3: pancreas_tumour' or '3: pancreas', say\)"):
        check_label_map("pancreas", {0: "background", 1: "pancreas", 2: "cancer", 3: "cyst"},
                        {1: "pancreas", 2: "pancreas_tumour"}, json_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every value mapped (background, 0, needs no entry)
        check_label_map("liver", {0: "background", 1: "liver", 2: "cancer"}, {1: "liver", 2: "liver"}, json_path)


@pytest.mark.parametrize("change,message", [
    ({"training": None}, "matches no known layout"),
    ({"labels": None}, "missing key 'labels'"),
    ({"labels": ["liver"]}, "'labels' must be an object"),
    ({"labels": {"one": "liver"}}, "key 'one' is not an integer"),
    ({"training": {"image": "x"}}, "'training' must be a list"),
    ({"training": ["./imagesTr/case_000.nii.gz"]}, r"training\[0\]: expected an object"),
    ({"training": [{"image": 3, "label": "x"}]}, r"training\[0\].image: expected a relative path string"),
])
def test_msd_json_errors_name_the_file(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    root = write_msd_dataset(tmp_path / "ds", 1)
    assert len(scan_dataset("ds", root).cases) == 1  # twin: the untouched file is accepted
    json_path = _edit_json(root, **change)
    with pytest.raises(DataError, match=message) as info:
        scan_dataset("ds", root)
    assert info.value.path == json_path


def test_dataset_json_naming_one_value_twice_is_refused(tmp_path: Path) -> None:
    """One value under two names (nnU-Net), or one key given twice (MSD; JSON keeps the last): the last name
    silently won. Refused, naming dataset.json and the value; a region-based nnU-Net file, which lists
    values under several names, still reads."""
    root = write_nnunet_dataset(tmp_path / "nn", 1, {"background": 0, "spleen": 1, "spleen_hilum": 1})
    with pytest.raises(DataError, match="value 1 is named both 'spleen' and 'spleen_hilum'") as info:
        scan_dataset("spleen", root)
    assert str(root / "dataset.json") in str(info.value)
    root = write_msd_dataset(tmp_path / "msd", 1)
    text = (root / "dataset.json").read_text().replace('"1": "organ"', '"1": "liver", "1": "spleen"')
    (root / "dataset.json").write_text(text)
    with pytest.raises(DataError, match="labels: key '1' is given twice"):
        scan_dataset("liver", root)
    regions = write_nnunet_dataset(tmp_path / "regions", 1, {"background": 0, "whole": [1, 2], "core": [2]})
    assert scan_dataset("kidney", regions).declared_labels == {0: "background", 1: "whole", 2: "core"}


def test_nnunet_file_ending_that_matches_no_image_is_named(tmp_path: Path) -> None:
    """file_ending '.nii' beside .nii.gz files: the error said only 'no training cases'."""
    root = write_nnunet_dataset(tmp_path / "nn", 2)
    data = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**data, "file_ending": ".nii"}))
    with pytest.raises(DataError, match=r"file_ending is '.nii', but the images in imagesTr end otherwise "
                                        r"\(case_000_0000.nii.gz, case_001_0000.nii.gz\); set file_ending"):
        scan_dataset("organ", root)


def test_check_label_map_warns_when_dataset_json_names_another_class(tmp_path: Path) -> None:
    """A swapped dataset root: dataset.json calls value 1 "Spleen", the project maps it to liver."""
    import warnings

    from unionseg.errors import UnionsegWarning

    json_path = tmp_path / "dataset.json"
    classes = ["liver", "liver_tumour", "kidney", "kidney_tumour", "spleen"]
    with pytest.warns(UnionsegWarning, match=r"value 1 is 'Spleen' in dataset.json but the project maps it to 'liver'"):
        check_label_map("liver", {0: "background", 1: "Spleen"}, {1: "liver"}, json_path, classes)
    # names swapped with the background: the value the file calls background is trained as an organ
    with pytest.warns(UnionsegWarning, match=r"value 1 is 'background' in dataset.json but the project maps it to"):
        check_label_map("spleen", {0: "spleen", 1: "background"}, {1: "spleen"}, json_path, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MSD's own names: the same class, a region, or no project class at all
        check_label_map("liver", {0: "background", 1: "Liver", 2: "cancer"}, {1: "liver", 2: "liver_tumour"},
                        json_path, classes)
        check_label_map("kidney", {0: "background", 1: "kidney", 2: "Tumor"}, {1: "region:kidney",
                        2: "kidney_tumour"}, json_path, classes)
        # a project class left out on purpose, value by value (a fully labelled file made partial)
        check_label_map("liver", {0: "background", 1: "liver", 2: "spleen"}, {1: "liver", 2: "background"},
                        json_path, classes)


@pytest.mark.parametrize("change,message", [
    ({"file_ending": None, "channel_names": None}, "matches no known layout"),
    ({"file_ending": None}, "missing key 'file_ending'"),
    ({"channel_names": None}, "missing key 'channel_names'"),
    ({"file_ending": ".png"}, "file_ending: expected one of"),
    ({"channel_names": {"0": "CT", "1": "PET"}}, r"exactly one channel \(CT\) is supported \(2 given: \{'0': 'CT', "
                                                 r"'1': 'PET'\}\); unionseg reads the CT images as channel 0, the "
                                                 r"_0000 files: declare \{\"0\": \"CT\"\} and move the other"),
    ({"labels": {"background": 0, "kidney": "1"}}, "labels.kidney: expected an integer value"),
    ({"labels": None}, "missing key 'labels'"),
])
def test_nnunet_json_errors_name_the_file(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    root = write_nnunet_dataset(tmp_path / "ds", 1)
    assert len(scan_dataset("ds", root, layout="nnunet").cases) == 1
    json_path = _edit_json(root, **change)
    with pytest.raises(DataError, match=message) as info:
        scan_dataset("ds", root)
    assert info.value.path == json_path


def test_a_channel_named_other_than_ct_is_warned_about(tmp_path: Path) -> None:
    """nnU-Net picks an image's normalisation by its channel name; unionseg windows every image in Hounsfield
    units, and read an MR channel ("T2") as CT without a word (helper-133)."""
    root = write_nnunet_dataset(tmp_path / "ds", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_dataset("ds", root, layout="nnunet")  # {"0": "CT"}
        _edit_json(root, channel_names={"0": "ct"})
        scan_dataset("ds", root, layout="nnunet")
    json_path = _edit_json(root, channel_names={"0": "T2"})
    with pytest.warns(UnionsegWarning, match=re.escape(f"{json_path}: channel_names declares 'T2', not CT (nnU-Net "
                                                       "normalises by this name): unionseg reads every image as CT and "
                                                       "normalises it with the project's Hounsfield window")):
        assert len(scan_dataset("ds", root, layout="nnunet").cases) == 1


def test_invalid_json_and_layout(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "ds", 1)
    with pytest.raises(DataError, match="unknown layout 'bids'"):
        scan_dataset("ds", root, layout="bids")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON") as info:
        scan_dataset("ds", root)
    assert info.value.path == root / "dataset.json"
    (root / "dataset.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        scan_dataset("ds", root)


def test_nnunet_image_without_channel_suffix(tmp_path: Path) -> None:
    """Named with what to do and how many lack it (helper-133); the layout the message offers reads them."""
    root = write_nnunet_dataset(tmp_path / "ds", 2)
    for i in range(2):
        (root / "imagesTr" / f"case_00{i}_0000.nii.gz").rename(root / "imagesTr" / f"case_00{i}.nii.gz")
    with pytest.raises(DataError, match=re.escape(
            "image name 'case_000.nii.gz' lacks the channel suffix _0000 (2 images of imagesTr/ lack it): nnU-Net v2 "
            "names a case's CT image CASE_0000.nii.gz (rename it case_000_0000.nii.gz; its label keeps "
            "case_000.nii.gz), or read the folder with the dataset's layout 'folders:imagesTr,labelsTr', which takes "
            "images named as their labels")):
        scan_dataset("ds", root)
    assert [c.case_id for c in scan_dataset("ds", root, layout="folders:imagesTr,labelsTr").cases] == [
        "case_000", "case_001"]
    # one bare image among tagged ones (a second channel beside one): counted alone, no folders layout offered
    (root / "imagesTr" / "case_001.nii.gz").rename(root / "imagesTr" / "case_001_0000.nii.gz")
    shutil.copy(root / "imagesTr" / "case_001_0000.nii.gz", root / "imagesTr" / "case_001_0001.nii.gz")
    with pytest.raises(DataError, match=r"image name 'case_000.nii.gz' lacks the channel suffix _0000: nnU-Net v2 "
                                        r"names") as info:
        scan_dataset("ds", root)
    assert str(info.value).endswith("its label keeps case_000.nii.gz)")


def test_check_label_map(tmp_path: Path) -> None:
    json_path = tmp_path / "dataset.json"
    check_label_map("liver", {0: "background", 1: "liver", 2: "tumour"}, {1: "liver", 2: "liver_tumour"}, json_path)
    with pytest.raises(DataError, match="maps label value 3 for dataset 'liver'") as info:
        check_label_map("liver", {0: "background", 1: "liver"}, {1: "liver", 3: "liver_tumour"}, json_path)
    assert info.value.path == json_path


def test_list_image_files(tmp_path: Path) -> None:
    write_tiny_case(tmp_path / "a.nii.gz", tmp_path / "b.nrrd")
    (tmp_path / "c.txt").write_text("x")
    assert [p.name for p in list_image_files(tmp_path)] == ["a.nii.gz", "b.nrrd"]
    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "01.dcm").write_bytes(b"")
    assert list_image_files(dicom) == [dicom]


@pytest.mark.parametrize("layout", ["msd", "nnunet"])
def test_relative_root_gives_absolute_case_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 layout: str) -> None:
    writer = write_msd_dataset if layout == "msd" else write_nnunet_dataset
    writer(tmp_path / "ds", 1)
    monkeypatch.chdir(tmp_path)
    case = scan_dataset("ds", Path("ds"), layout=layout).cases[0]
    assert case.image.is_absolute() and case.label is not None and case.label.is_absolute()
    assert case.image.is_relative_to(tmp_path / "ds") and case.image.is_file()


def test_a_layout_that_does_not_fit_the_folder_points_to_the_layout(tmp_path: Path) -> None:
    """A dataset.json read with the other layout (MSD as nnU-Net v2, nnU-Net v2 as MSD) says which it looks like."""
    root = tmp_path / "Task03_Liver"
    write_msd_dataset(root, 2, {0: "background", 1: "liver"})
    with pytest.raises(DataError, match=r"labels\.0: expected an integer value, got 'background' \(an MSD 'labels' "
                                        r"object, value -> name: set the dataset's layout to msd\)"):
        scan_dataset("liver", root, layout="nnunet")
    assert len(scan_dataset("liver", root, layout="msd").cases) == 2  # twin: the right layout reads it
    # an nnU-Net dataset whose dataset.json was written the MSD way: no 'training' list, so setting the layout
    # to msd only led to "missing key 'training'"; the message shows the nnU-Net form instead (helper-78)
    nnunet = tmp_path / "Dataset005_Kidney"
    write_nnunet_dataset(nnunet, 2, {"background": 0, "kidney": 1})
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "kidney"}, "numTraining": 2,
                                                     "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}))
    with pytest.raises(DataError, match=r"labels\.0: expected an integer value, got 'background' \(this is MSD's "
                                        r"form, value -> name; nnU-Net v2's maps name -> value: \{\"0\": "
                                        r"\"background\"\} becomes \{\"background\": 0\}\)"):
        scan_dataset("kidney", nnunet, layout="nnunet")
    # the other way: an nnU-Net v2 folder read with layout msd named MSD's form only (helper-133)
    v2 = tmp_path / "Dataset006_Spleen"
    write_nnunet_dataset(v2, 2, {"background": 0, "spleen": 1})
    with pytest.raises(DataError, match=r"labels: key 'background' is not an integer value \(MSD maps value -> "
                                        r"name\) \(this is nnU-Net v2's form, name -> value, with no MSD 'training' "
                                        r"list: set the dataset's layout to nnunet, or leave it out"):
        scan_dataset("spleen", v2, layout="msd")
    assert len(scan_dataset("spleen", v2, layout="nnunet").cases) == 2


def test_messages_name_a_few_items_and_count_the_rest() -> None:
    from unionseg.errors import and_more, listing

    assert listing(["a", "b"]) == "a, b"
    assert listing(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"
    assert listing([1, 2, 3, 4, 5, 6], 5) == "1, 2, 3, 4, 5 and 1 more"
    assert and_more(1, 1) == "" and and_more(4, 1) == " and 3 more"


def test_a_stray_second_channel_is_named(tmp_path: Path) -> None:
    """A `_0001` file beside a case's `_0000` image was "lacks the channel suffix _0000" (nnU-Net) or, in a
    folder without dataset.json, a missing label blamed on every case (helper-102). It is named as a second
    channel; scans numbered ct_0000, ct_0001 with labels of those names stay cases."""
    root = write_nnunet_dataset(tmp_path / "nn", 2, {"background": 0, "organ": 1}, prefix="liver")
    write_tiny_case(root / "imagesTr" / "liver_001_0001.nii.gz", None)
    with pytest.raises(DataError, match=r"image 'liver_001_0001.nii.gz' is channel 0001 of case 'liver_001': "
                                        r"unionseg reads one CT channel"):
        scan_dataset("nn", root)
    (root / "dataset.json").unlink()  # the same folder read as a folder pair
    with pytest.raises(DataError, match=r"image 'liver_001_0001.nii.gz' is channel 0001 of a case whose _0000 "
                                        r"image is here"):
        scan_dataset("nn", root)
    untagged = write_nnunet_dataset(tmp_path / "untagged", 1, {"background": 0, "organ": 1}, prefix="ct")
    (untagged / "imagesTr" / "ct_000_0000.nii.gz").rename(untagged / "imagesTr" / "ct_0001.nii.gz")
    with pytest.raises(DataError, match=r"image name 'ct_0001.nii.gz' lacks the channel suffix _0000"):
        scan_dataset("untagged", untagged)  # no ct_0000 beside it: a scan without its tag, not a channel
    numbered = tmp_path / "numbered"
    for n in range(2):
        write_tiny_case(numbered / "imagesTr" / f"ct_{n:04d}.nii.gz", numbered / "labelsTr" / f"ct_{n:04d}.nii.gz")
    assert [c.case_id for c in scan_dataset("numbered", numbered).cases] == ["ct_0000", "ct_0001"]
