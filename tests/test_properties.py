"""Property tests (hypothesis): the label space, the merge function, dataset.json parsing, and the image
readers on mutated files.

Each property is checked on random inputs: random leaves, parts and datasets; random (often tied)
probabilities; random JSON; valid NIfTI / NRRD / MHA files with random byte flips, overwrites, insertions,
deletions and truncations. Readers and parsers must answer with our ``DataError`` (one clear line in the
CLI) or a valid result, never with another exception. ``UNIONSEG_PROPERTY_SCALE=20`` multiplies every
example count for a soak run; the default keeps the file well under 30 s. The examples are the same every
run (hypothesis's ``derandomize``) unless ``UNIONSEG_PROPERTY_RANDOM=1``: new ones with the soak run.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from unionseg.data.catalog import read_dataset_json, scan_dataset
from unionseg.data.io import IMAGE_SUFFIXES, Geometry, read_image, write_image
from unionseg.errors import ConfigError, DataError
from unionseg.labels import (
    DatasetLabels,
    LabelSpace,
    Leaf,
    admissible,
    merge,
    merge_softmax,
    region_name,
    softmax_to_groups,
)

SCALE = int(os.environ.get("UNIONSEG_PROPERTY_SCALE", "1"))
RANDOM = os.environ.get("UNIONSEG_PROPERTY_RANDOM", "") not in ("", "0")


def bounded(examples: int) -> Any:
    """Settings of every property here: a fixed example budget, no deadline, no example database, and the
    same examples every run unless ``UNIONSEG_PROPERTY_RANDOM=1`` (a fuzzer's rare find must not arrive as a
    one-off failure of an unrelated CI run: search with the variable and a larger scale; helper-126)."""
    return settings(max_examples=examples * SCALE, deadline=None, database=None, derandomize=not RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------- random label spaces
def _covered(key: str, organs: dict[str, list[str]]) -> set[str]:
    """Leaf names a class key covers, computed without LabelSpace (the oracle for its answers)."""
    if key.startswith("region:"):
        organ = key[len("region:"):]
        return {organ, *organs[organ]}
    return {key}


@st.composite
def label_spaces(draw: st.DrawFn, max_datasets: int = 3) -> tuple[LabelSpace, dict[str, list[str]]]:
    """A valid random label space: 1-4 organs with 0-2 parts each, leaves in random order, 0-3 datasets
    annotating random leaves/regions and mapping random local values onto what they annotate.

    Returns:
        ``(space, organs)`` with ``organs``: organ name -> its part names.
    """
    organs: dict[str, list[str]] = {}
    leaves = []
    for o in range(draw(st.integers(1, 4))):
        organ = f"organ{o}"
        organs[organ] = [f"{organ}_part{p}" for p in range(draw(st.integers(0, 2)))]
        leaves += [Leaf(organ)] + [Leaf(part, organ) for part in organs[organ]]
    leaves = draw(st.permutations(leaves))
    keys = [leaf.name for leaf in leaves] + [region_name(o) for o in organs]
    datasets = []
    for d in range(draw(st.integers(0, max_datasets))):
        annotated = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True))
        covered = set().union(*(_covered(k, organs) for k in annotated))
        mappable = sorted(k for k in keys if _covered(k, organs) <= covered)
        values = draw(st.lists(st.integers(1, 255), max_size=5, unique=True))
        local = {v: draw(st.sampled_from(mappable)) for v in values}
        datasets.append(DatasetLabels(f"set{d}", local, tuple(annotated)))
    return LabelSpace(leaves, datasets), organs


@bounded(150)
@given(label_spaces())
def test_local_lookup_and_annotated_mask_agree_with_the_maps(drawn: tuple[LabelSpace, dict[str, list[str]]]) -> None:
    space, organs = drawn
    for name, ds in space.datasets.items():
        table = space.local_lookup(name)
        assert table.shape == (256,) and table[0] == 0
        for value in range(1, 256):
            key = ds.local_to_global.get(value)
            if key is None:
                assert table[value] == -1
                continue
            code = int(table[value])
            assert 0 < code < space.n_codes
            if key.startswith("region:"):  # a region code names the group of that organ
                assert code >= space.n_leaves and space.groups[code - space.n_leaves].name == key[len("region:"):]
            else:
                assert space.names[code] == key
        mask = space.annotated_leaf_mask(name)
        covered = set().union(*(_covered(k, organs) for k in ds.annotated))
        assert mask[0] and [bool(m) for m in mask[1:]] == [n in covered for n in space.names[1:]]
        for key in ds.local_to_global.values():  # every mapped value lies inside what the set annotates
            assert mask[list(space.leaves_of(key))].all()
        scorable = space.scorable_keys(mask)
        for grp in space.groups:
            assert (region_name(grp.name) in scorable) == ({grp.name, *organs[grp.name]} <= covered)
        assert set(scorable) - {region_name(o) for o in organs} == {n for n in covered if n not in organs}


@bounded(100)
@given(label_spaces(), st.data())
def test_admissible_leaves_follow_codes_and_annotation(drawn: tuple[LabelSpace, dict[str, list[str]]],
                                                       data: st.DataObject) -> None:
    space, _ = drawn
    assume(space.datasets)
    names = list(space.datasets)
    batch = len(names)
    codes = data.draw(hnp.arrays(np.int64, (batch, 3, 4), elements=st.integers(0, space.n_codes - 1)))
    annotated = np.stack([space.annotated_leaf_mask(n) for n in names])
    adm = admissible(torch.from_numpy(codes), torch.from_numpy(annotated), space).numpy()
    assert adm.shape == (batch, space.n_leaves, 3, 4) and adm.dtype == np.bool_
    assert adm.any(axis=1).all()  # every voxel may belong to some leaf
    matrix = space.code_leaf_matrix()
    for b in range(batch):
        for idx in np.ndindex(3, 4):
            code = int(codes[(b, *idx)])
            allowed = set(np.flatnonzero(adm[(b, slice(None), *idx)]).tolist())
            if code == 0:  # background, or a leaf this sample's dataset does not annotate
                assert allowed == {0} | set(np.flatnonzero(~annotated[b]).tolist())
            else:
                assert allowed == set(np.flatnonzero(matrix[code]).tolist())
        # a voxel labelled through the dataset's own map only admits leaves the dataset annotates
        table = space.local_lookup(names[b])
        for value in space.datasets[names[b]].local_to_global:
            code_adm = admissible(torch.tensor([[int(table[value])]]), torch.from_numpy(annotated[b:b + 1]), space)
            assert not (code_adm[0, :, 0].numpy() & ~annotated[b]).any()


@bounded(100)
@given(label_spaces())
def test_label_space_round_trips_through_its_dict(drawn: tuple[LabelSpace, dict[str, list[str]]]) -> None:
    space, _ = drawn
    again = LabelSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again.names == space.names and again.groups == space.groups and again.part_ids == space.part_ids
    for name in space.datasets:
        assert np.array_equal(again.local_lookup(name), space.local_lookup(name))
        assert np.array_equal(again.annotated_leaf_mask(name), space.annotated_leaf_mask(name))


@bounded(100)
@given(label_spaces(max_datasets=0), st.data())
def test_a_map_onto_an_unannotated_class_is_refused(drawn: tuple[LabelSpace, dict[str, list[str]]],
                                                    data: st.DataObject) -> None:
    space, organs = drawn
    keys = list(space.names[1:]) + [region_name(o) for o in organs]
    annotated = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
    covered = set().union(*(_covered(k, organs) for k in annotated))
    outside = [k for k in keys if not _covered(k, organs) <= covered]
    inside = [k for k in keys if _covered(k, organs) <= covered]
    space.add_dataset(DatasetLabels("ok", {1: data.draw(st.sampled_from(inside))}, tuple(annotated)))  # twin
    assume(outside)
    with pytest.raises(ConfigError, match="not in the dataset's annotated classes"):
        space.add_dataset(DatasetLabels("bad", {1: data.draw(st.sampled_from(outside))}, tuple(annotated)))


# ---------------------------------------------------------------------- merge
def _first_argmax(rows: np.ndarray) -> np.ndarray:
    return np.argmax(rows, axis=0)  # numpy's argmax returns the first maximum


def _reference_merge(region: np.ndarray, parts: np.ndarray, organ: np.ndarray | None, space: LabelSpace,
                     accept: np.ndarray) -> np.ndarray:
    """The documented rule, voxel by voxel: the first group with the highest region probability where
    ``accept``; inside it the first part with the highest probability if it beats the organ leaf (for
    sigmoid heads the organ leaf counts as 1 - that part's probability), else the organ."""
    part_row = {leaf: k for k, leaf in enumerate(space.part_ids)}
    out = np.zeros(region.shape[1:], dtype=np.uint8)
    best_group = _first_argmax(region)
    for idx in np.ndindex(*region.shape[1:]):
        if not accept[idx]:
            continue
        grp = space.groups[int(best_group[idx])]
        label = grp.organ_id
        if grp.part_ids:
            probs = [parts[(part_row[p], *idx)] for p in grp.part_ids]
            k = int(np.argmax(probs))
            organ_p = organ[(grp.index, *idx)] if organ is not None else 1.0 - probs[k]
            if probs[k] > organ_p:
                label = grp.part_ids[k]
        out[idx] = label
    return out


def _probabilities(n: int, shape: tuple[int, ...]) -> Any:
    """(n, *shape) float32 probabilities in multiples of 1/8: exact arithmetic and frequent ties."""
    return hnp.arrays(np.float32, (n, *shape), elements=st.integers(0, 8).map(lambda k: k / 8))


@bounded(150)
@given(label_spaces(max_datasets=0), st.data(), st.sampled_from([0.5, 0.25, 0.75, 0.0]))
def test_merge_keeps_parts_in_their_group_and_background_below_the_threshold(
    drawn: tuple[LabelSpace, dict[str, list[str]]], data: st.DataObject, threshold: float
) -> None:
    space, _ = drawn
    shape = (2, 5)
    region = data.draw(_probabilities(space.n_groups, shape))
    parts = data.draw(_probabilities(len(space.part_ids), shape))
    organ = data.draw(st.none() | _probabilities(space.n_groups, shape))
    out = merge(torch.from_numpy(region), torch.from_numpy(parts), space,
                None if organ is None else torch.from_numpy(organ), threshold=threshold).numpy()
    assert out.shape == shape and out.dtype == np.uint8
    best = region.max(axis=0)
    assert np.array_equal(out == 0, best <= threshold)  # background exactly where no region beats it
    winner = _first_argmax(region)
    for idx in zip(*np.nonzero(out), strict=True):
        leaf = int(out[idx])
        assert space.group_of_leaf(leaf) == winner[idx]  # a leaf (part or organ) only inside the winning group
        if leaf in space.part_ids and organ is not None:
            assert parts[(space.part_ids.index(leaf), *idx)] > organ[(space.group_of_leaf(leaf), *idx)]
        if leaf in space.part_ids and organ is None:  # sigmoid form: a part needs more than 0.5
            assert parts[(space.part_ids.index(leaf), *idx)] > 0.5
    assert np.array_equal(out, _reference_merge(region, parts, organ, space, best > threshold))


@bounded(150)
@given(label_spaces(max_datasets=0), st.data())
def test_merge_does_not_depend_on_the_order_of_groups_where_nothing_ties(
    drawn: tuple[LabelSpace, dict[str, list[str]]], data: st.DataObject
) -> None:
    space, organs = drawn
    order = data.draw(st.permutations(list(organs)))
    own_parts = {g.name: [space.names[p] for p in g.part_ids] for g in space.groups}  # order inside a group kept
    permuted = LabelSpace([leaf for o in order for leaf in (Leaf(o), *(Leaf(p, o) for p in own_parts[o]))])
    shape = (12,)
    region = data.draw(_probabilities(space.n_groups, shape))
    parts = data.draw(_probabilities(len(space.part_ids), shape))
    organ = data.draw(_probabilities(space.n_groups, shape))
    group_of = {g.name: g.index for g in space.groups}
    part_of = {space.names[p]: k for k, p in enumerate(space.part_ids)}
    rows = [group_of[g.name] for g in permuted.groups]
    part_rows = [part_of[permuted.names[p]] for p in permuted.part_ids]
    out = merge(torch.from_numpy(region), torch.from_numpy(parts), space, torch.from_numpy(organ))
    again = merge(torch.from_numpy(region[rows]), torch.from_numpy(parts[part_rows]), permuted,
                  torch.from_numpy(organ[rows]))
    top = np.sort(region, axis=0)
    no_tie = top[-1] > top[-2] if space.n_groups > 1 else np.ones(shape, dtype=bool)
    names = np.asarray(space.names)[out.numpy()]
    names_again = np.asarray(permuted.names)[again.numpy()]
    assert np.array_equal(names[no_tie], names_again[no_tie])
    if space.n_groups > 1:  # twin: the ties are real, and there the first group listed wins
        tied = (top[-1] == top[-2]) & (top[-1] > 0.5)
        for idx in zip(*np.nonzero(tied), strict=True):
            assert space.group_of_leaf(int(out[idx])) == int(np.argmax(region[(slice(None), *idx)]))


@st.composite
def leaf_probabilities(draw: st.DrawFn, n_leaves: int, voxels: int) -> np.ndarray:
    """(L, voxels) softmax-like probabilities: 16 votes per voxel over the leaves (exact sums, many ties)."""
    votes = draw(hnp.arrays(np.int64, (voxels, 16), elements=st.integers(0, n_leaves - 1)))
    counts = np.stack([np.bincount(v, minlength=n_leaves) for v in votes], axis=1)
    return (counts / 16).astype(np.float32)


@bounded(150)
@given(label_spaces(max_datasets=0), st.data())
def test_softmax_merge_without_threshold_is_group_argmax_against_background(
    drawn: tuple[LabelSpace, dict[str, list[str]]], data: st.DataObject
) -> None:
    space, _ = drawn
    probs = data.draw(leaf_probabilities(space.n_leaves, 10))
    region, parts, organ = (t.numpy() for t in softmax_to_groups(torch.from_numpy(probs), space))
    for grp in space.groups:  # regions are the sums of the group's leaves
        assert np.array_equal(region[grp.index], probs[list(grp.leaf_ids)].sum(axis=0))
    out = merge_softmax(torch.from_numpy(probs), space, threshold=None).numpy()
    accept = region.max(axis=0) > probs[0]  # the winning region must beat background; a tie is background
    assert np.array_equal(out, _reference_merge(region, parts, organ, space, accept))
    with_threshold = merge_softmax(torch.from_numpy(probs), space, threshold=0.5).numpy()
    assert np.array_equal(with_threshold, _reference_merge(region, parts, organ, space, region.max(axis=0) > 0.5))


# ---------------------------------------------------------------------- dataset.json
@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder with real image files in MSD and nnU-Net names; each example writes its dataset.json."""
    from conftest import write_tiny_case

    root = tmp_path_factory.mktemp("json") / "set"
    write_tiny_case(root / "imagesTr" / "a.nii.gz", root / "labelsTr" / "a.nii.gz")
    write_tiny_case(root / "imagesTr" / "b_0000.nii.gz", root / "labelsTr" / "b.nii.gz")
    return root


_json_scalar = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
_json = st.recursive(_json_scalar, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_paths = st.sampled_from([
    "./imagesTr/a.nii.gz", "imagesTr/a.nii.gz", "./labelsTr/a.nii.gz", "labelsTr/b.nii.gz", "./imagesTr/b_0000.nii.gz",
    "../set/imagesTr/a.nii.gz", "../../etc/passwd", "/etc/passwd", "C:\\data\\a.nii.gz", "~/a.nii.gz", "", ".",
    "imagesTr", "imagesTr/", "./imagesTr/missing.nii.gz", "a\x00b.nii.gz", "x" * 300 + ".nii.gz", "\ud800.nii.gz",
    "imagesTr/../imagesTr/a.nii.gz", "imagesTr/a.nii", "imagesTr/a.mha",
]) | st.text(max_size=20)
_labels = st.dictionaries(st.sampled_from(["0", "1", "2", "-1", "256", "x", " 1", "1.0", "background", "organ"]),
                          st.sampled_from(["background", "organ", "tumour"]) | st.integers(-3, 300) | _json,
                          max_size=4) | _json
_training = st.lists(st.fixed_dictionaries({}, optional={"image": _paths | _json, "label": _paths | _json})
                     | _json, max_size=4) | _json
_msd_like = st.fixed_dictionaries({  # close to valid: the parser's deeper checks run
    "labels": st.dictionaries(st.sampled_from(["0", "1", "2"]), st.sampled_from(["background", "organ"]), min_size=1)
    | _labels,
    "training": st.lists(st.fixed_dictionaries({"image": _paths, "label": _paths}), min_size=1, max_size=3) | _training,
}, optional={"name": _json, "numTraining": _json, "test": _json})
_nnunet_like = st.fixed_dictionaries({
    "labels": st.dictionaries(st.sampled_from(["background", "organ", "tumour"]),
                              st.integers(-1, 300) | st.lists(st.integers(-1, 5), max_size=2), min_size=1) | _labels,
    "channel_names": st.sampled_from([{"0": "CT"}, {}, {"0": "CT", "1": "MR"}, [], "CT"]) | _json,
    "file_ending": st.sampled_from([*IMAGE_SUFFIXES, ".png", "", "nii.gz"]) | _json,
}, optional={"name": _json, "numTraining": _json})
_dataset_json = _msd_like | _nnunet_like | st.fixed_dictionaries({}, optional={
    "labels": _labels, "training": _training, "name": _json, "numTraining": _json, "test": _json,
    "channel_names": _json, "file_ending": _json}) | _json


def _msd_case(path: str) -> dict[str, Any]:
    return {"labels": {"0": "background"}, "training": [{"image": path, "label": "./labelsTr/a.nii.gz"}]}


@bounded(300)
@given(_dataset_json, st.sampled_from(["auto", "msd", "nnunet"]))
@example(_msd_case("x" * 300 + ".nii.gz"), "msd")  # found by this property: OSError (file name too long)
@example(_msd_case("imagesTr/" + "y/" * 2100 + "a.nii.gz"), "msd")  # path longer than PATH_MAX: OSError
@example(_msd_case("a\x00b.nii.gz"), "msd")
@example(_msd_case("\ud800.nii.gz"), "msd")  # a lone surrogate cannot become a file name
def test_dataset_json_of_any_content_gives_a_dataset_or_a_data_error(dataset_root: Path, data: Any,
                                                                     layout: str) -> None:
    (dataset_root / "dataset.json").write_text(json.dumps(data), encoding="utf-8")
    try:
        info = scan_dataset("set", dataset_root, layout)
    except DataError as exc:
        assert exc.path is not None and exc.message
        str(exc).encode("utf-8", "backslashreplace")  # printable as the CLI prints it
        return
    assert info.cases and info.layout in ("msd", "nnunet")  # accepted: real files inside the root
    for case in info.cases:
        assert case.image.exists() and case.label is not None and case.label.exists()
        assert case.image.is_relative_to(dataset_root) and case.label.is_relative_to(dataset_root)


def test_a_valid_dataset_json_is_accepted(dataset_root: Path) -> None:
    """The twin of the property above: the generator's valid corner really is accepted."""
    data = {"labels": {"0": "background", "1": "organ"}, "training": [{"image": "./imagesTr/a.nii.gz",
                                                                        "label": "./labelsTr/a.nii.gz"}]}
    (dataset_root / "dataset.json").write_text(json.dumps(data))
    assert [c.case_id for c in scan_dataset("set", dataset_root).cases] == ["a"]


@bounded(100)
@given(st.binary(max_size=64) | st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_dataset_json_of_any_bytes_gives_a_data_error_or_an_object(dataset_root: Path, raw: bytes) -> None:
    (dataset_root / "dataset.json").write_bytes(raw)
    try:
        data = read_dataset_json(dataset_root)
    except DataError as exc:
        assert exc.path == dataset_root / "dataset.json"
        return
    assert isinstance(data, dict)


# ---------------------------------------------------------------------- mutated image files
@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Valid small images (int16 CT-like, uint8 labels, float32) in every format: name -> file bytes."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    affine = np.array([[-0.8, 0.0, 0.0, 10.0], [0.0, 0.9, 0.0, -5.0], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1]])
    arrays = {"ct": rng.integers(-1000, 1000, (7, 6, 5)).astype(np.int16),
              "label": rng.integers(0, 3, (7, 6, 5)).astype(np.uint8),
              "float": rng.normal(size=(7, 6, 5)).astype(np.float32)}
    out = {}
    for kind, array in arrays.items():
        for suffix in (".nii", ".nii.gz", ".nrrd", ".mha"):
            path = write_image(folder / f"{kind}{suffix}", array, Geometry(array.shape, affine))
            out[path.name] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="unionseg-mutated-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("header"), st.integers(0, 400), st.integers(0, 255)),  # most of the damage: the header
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def _mutate(raw: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    data = bytearray(raw)
    for kind, where, arg in mutations:
        if not data:
            break
        pos = where % len(data)
        if kind == "flip":
            data[pos] ^= 1 << arg
        elif kind in ("set", "header"):
            data[min(where, len(data) - 1) if kind == "header" else pos] = arg
        elif kind == "insert":
            data[pos:pos] = arg
        elif kind == "delete":
            del data[pos:pos + arg]
        else:
            del data[pos:]
    return bytes(data)


def _assert_valid_or_data_error(path: Path) -> None:
    try:
        array, geometry = read_image(path)
    except DataError as exc:
        assert exc.path == path and exc.message
        return
    assert array.ndim == 3 and tuple(array.shape) == geometry.shape and array.size > 0
    assert array.dtype.kind in "biuf"  # a plain numeric voxel type (not RGB records, not complex)
    assert np.isfinite(geometry.affine).all() and abs(np.linalg.det(geometry.affine[:3, :3])) > 0


IMAGE_NAMES = [f"{kind}{suffix}" for kind in ("ct", "label", "float") for suffix in (".nii", ".nii.gz", ".nrrd", ".mha")]


@bounded(400)
@given(st.sampled_from(IMAGE_NAMES), st.lists(_MUTATION, min_size=1, max_size=4), st.booleans())
@example("label.nii", [("header", 70, 3)], False)  # found by this property: datatype code 3, nibabel HeaderDataError
def test_mutated_image_files_give_an_image_or_a_data_error(image_files: dict[str, bytes], scratch: Path, name: str,
                                                           mutations: list, inside_gzip: bool) -> None:
    raw = image_files[name]
    if name.endswith(".gz") and inside_gzip:  # damage the NIfTI inside a valid gzip stream, not only the stream
        mutated = gzip.compress(_mutate(gzip.decompress(raw), mutations), mtime=0)
    else:
        mutated = _mutate(raw, mutations)
    path = scratch / name
    path.write_bytes(mutated)
    _assert_valid_or_data_error(path)


def test_unmutated_image_files_read_back(image_files: dict[str, bytes], scratch: Path) -> None:
    """The twin of the property above: every original file reads as the 3D image it holds."""
    for name, raw in image_files.items():
        path = scratch / name
        path.write_bytes(raw)
        array, geometry = read_image(path)
        assert array.shape == (7, 6, 5) and geometry.spacing == pytest.approx((0.8, 0.9, 2.5))


@pytest.mark.parametrize(("dtype", "shape", "message"), [
    (np.complex64, (4, 3, 2), r"unsupported voxel type complex64; a scalar \(integer or float\) 3D volume"),
    (np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), (4, 3, 2), r"unsupported voxel type \[\('R'"),
    (np.int16, (4, 0, 2), r"image of shape \(4, 0, 2\) holds no voxels"),
])
def test_nifti_with_complex_rgb_or_no_voxels_is_refused(tmp_path: Path, dtype: Any, shape: tuple[int, ...],
                                                        message: str) -> None:
    """Valid NIfTI files that the property above must not accept: nibabel reads them as record, complex or
    empty arrays, which prepare and predict cannot use."""
    import nibabel as nib

    path = tmp_path / "odd.nii"
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=dtype), np.eye(4)), str(path))
    with pytest.raises(DataError, match=message):
        read_image(path)
    nib.save(nib.Nifti1Image(np.zeros((4, 3, 2), dtype=np.float64), np.eye(4)), str(path))  # twin
    assert read_image(path)[0].dtype == np.float64
