"""The label space (leaves, regions, dataset maps), admissible() and the ONE merge function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unionseg.errors import ConfigError
from unionseg.labels import (
    DatasetLabels,
    LabelSpace,
    Leaf,
    admissible,
    merge,
    merge_softmax,
    softmax_to_groups,
)


def colon_space() -> LabelSpace:
    """A tumour-only set (MSD colon-like) beside a liver set."""
    leaves = [Leaf("liver"), Leaf("liver_tumour", "liver"), Leaf("colon"), Leaf("colon_tumour", "colon")]
    return LabelSpace(leaves, [
        DatasetLabels("liver", {1: "liver", 2: "liver_tumour"}, ("liver", "liver_tumour")),
        DatasetLabels("colon", {1: "colon_tumour"}, ("colon_tumour",)),
    ])


# ---------------------------------------------------------------------- structure and dataset maps
def test_leaves_groups_and_codes(space: LabelSpace) -> None:
    assert space.names[0] == "background"
    assert space.n_leaves == 8 and space.n_groups == 4 and space.n_codes == 12
    liver = space.group("liver")
    assert liver.leaf_ids == (space.leaf_id("liver"), space.leaf_id("liver_tumour"))
    assert space.group("spleen").part_ids == ()
    assert space.code("region:liver") == space.n_leaves + liver.index
    assert space.group_of_leaf(0) == -1
    assert space.group_of_leaf(space.leaf_id("kidney_tumour")) == space.group("kidney").index
    assert space.evaluation_keys() == ["region:liver", "region:kidney", "region:pancreas", "region:spleen",
                                       "liver_tumour", "kidney_tumour", "pancreas_tumour"]


def test_label_collisions_map_to_different_leaves(space: LabelSpace) -> None:
    """Local 2 is the liver tumour in one set and the kidney tumour in another."""
    liver, kidney = space.local_lookup("liver"), space.local_lookup("kidney")
    assert liver.shape == (256,)
    assert liver[2] == space.leaf_id("liver_tumour")
    assert kidney[2] == space.leaf_id("kidney_tumour")
    assert liver[2] != kidney[2]
    assert liver[1] != kidney[1]
    assert liver[0] == kidney[0] == 0
    # the spleen set has no local 2: unmapped values are -1, mapped ones are not
    assert space.local_lookup("spleen")[2] == -1
    assert space.local_lookup("spleen")[1] == space.leaf_id("spleen")


def test_many_to_one_map() -> None:
    """BTCV-like: left kidney 2 and right kidney 3 both become the kidney leaf."""
    leaves = [Leaf("spleen"), Leaf("kidney"), Leaf("liver")]
    space = LabelSpace(leaves, [DatasetLabels("btcv", {1: "spleen", 2: "kidney", 3: "kidney", 6: "liver"},
                                              ("spleen", "kidney", "liver"))])
    table = space.local_lookup("btcv")
    assert table[2] == table[3] == space.leaf_id("kidney")
    assert table[1] == space.leaf_id("spleen") and table[6] == space.leaf_id("liver")
    assert table[4] == -1 and table[5] == -1
    assert space.annotated_leaf_mask("btcv").all()


def test_tumour_only_set_annotates_the_tumour_not_the_organ() -> None:
    space = colon_space()
    mask = space.annotated_leaf_mask("colon")
    assert mask.tolist() == [True, False, False, False, True]  # background, colon_tumour
    codes = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    codes[0, 0, 0, 0] = space.leaf_id("colon_tumour")
    adm = admissible(codes, torch.as_tensor(mask)[None], space)
    colon, tumour = space.leaf_id("colon"), space.leaf_id("colon_tumour")
    # a 0 may be background or any unannotated leaf: colon and the liver classes, never the colon tumour
    assert adm[0, :, 1, 1, 1].tolist() == [True, True, True, True, False]
    assert adm[0, 0, 1, 1, 1] and adm[0, colon, 1, 1, 1] and not adm[0, tumour, 1, 1, 1]
    # twin: the tumour voxel admits only the tumour
    assert adm[0, :, 0, 0, 0].tolist() == [False, False, False, False, True]
    # the organ region cannot be scored on this set, the tumour can
    assert space.scorable_keys(mask) == ["colon_tumour"]
    assert space.scorable_keys(space.annotated_leaf_mask("liver")) == ["region:liver", "liver_tumour"]


def test_region_codes() -> None:
    """A set that does not separate tumour from organ maps its value to the region."""
    leaves = [Leaf("liver"), Leaf("liver_tumour", "liver"), Leaf("spleen")]
    space = LabelSpace(leaves, [DatasetLabels("ct_org", {1: "region:liver", 2: "spleen"},
                                              ("region:liver", "spleen"))])
    table = space.local_lookup("ct_org")
    assert table[1] == space.code("region:liver") == space.n_leaves
    assert table[2] == space.leaf_id("spleen")
    assert space.annotated_leaf_mask("ct_org").all()
    mat = space.code_leaf_matrix()
    assert mat.shape == (space.n_codes, space.n_leaves)
    assert mat[space.n_leaves].tolist() == [False, True, True, False]
    codes = np.array([0, 1, 2, 3, 4])
    assert space.codes_to_leaf_masks(codes, "region:liver").tolist() == [False, True, True, False, True]
    assert space.codes_to_leaf_masks(codes, "liver").tolist() == [False, True, False, False, False]


def test_dataset_map_errors_and_the_accepted_twins() -> None:
    leaves = [Leaf("liver"), Leaf("liver_tumour", "liver")]
    # mapped to the region, annotated only the organ leaf: the tumour leaf is not covered
    with pytest.raises(ConfigError, match=r"datasets.a.labels.1: maps to 'region:liver'"):
        LabelSpace(leaves, [DatasetLabels("a", {1: "region:liver"}, ("liver",))])
    LabelSpace(leaves, [DatasetLabels("a", {1: "region:liver"}, ("region:liver",))])
    with pytest.raises(ConfigError, match="names no organ group"):
        LabelSpace(leaves, [DatasetLabels("a", {1: "region:liver_tumour"}, ("region:liver_tumour",))])
    with pytest.raises(ConfigError, match=r"datasets.a.labels.1: unknown class 'livr'"):
        LabelSpace(leaves, [DatasetLabels("a", {1: "livr"}, ("liver",))])
    with pytest.raises(ConfigError, match="background is implicit"):
        LabelSpace(leaves, [DatasetLabels("a", {1: "liver"}, ("background", "liver"))])
    with pytest.raises(ConfigError, match="1..255"):
        LabelSpace(leaves, [DatasetLabels("a", {256: "liver"}, ("liver",))])
    LabelSpace(leaves, [DatasetLabels("a", {255: "liver"}, ("liver",))])
    with pytest.raises(ConfigError, match="duplicate dataset name"):
        LabelSpace(leaves, [DatasetLabels("a", {1: "liver"}, ("liver",))] * 2)


def test_class_errors_and_the_accepted_twin() -> None:
    with pytest.raises(ConfigError, match="duplicate class names"):
        LabelSpace([Leaf("liver"), Leaf("liver")])
    with pytest.raises(ConfigError, match="'liver_tumour' is part_of 'liver', which is not a class"):
        LabelSpace([Leaf("liver_tumour", "liver")])
    with pytest.raises(ConfigError, match="itself a part"):
        LabelSpace([Leaf("liver"), Leaf("tumour", "liver"), Leaf("core", "tumour")])
    with pytest.raises(ConfigError, match="invalid class name"):
        LabelSpace([Leaf("region:liver")])
    # the parent may come after its part
    ok = LabelSpace([Leaf("liver_tumour", "liver"), Leaf("liver")])
    assert ok.group("liver").part_ids == (ok.leaf_id("liver_tumour"),)


def test_to_dict_round_trip(space: LabelSpace) -> None:
    again = LabelSpace.from_dict(space.to_dict())
    assert again.names == space.names
    assert again.leaves == space.leaves
    for name in space.datasets:
        assert (again.local_lookup(name) == space.local_lookup(name)).all()
        assert (again.annotated_leaf_mask(name) == space.annotated_leaf_mask(name)).all()


# ---------------------------------------------------------------------- admissible()
@pytest.mark.parametrize("spatial", [(3, 4, 5), (4, 4)])
def test_admissible_shapes_and_values(space: LabelSpace, spatial: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    codes = torch.randint(0, space.n_codes, (2, *spatial))
    annotated = torch.as_tensor(np.stack([space.annotated_leaf_mask("liver"), space.full_mask()]))
    adm = admissible(codes, annotated, space)
    assert adm.shape == (2, space.n_leaves, *spatial) and adm.dtype == torch.bool
    mat = torch.as_tensor(space.code_leaf_matrix())
    for b in range(2):
        flat_codes = codes[b].reshape(-1)
        flat = adm[b].reshape(space.n_leaves, -1).T  # (N, L)
        for code, row in zip(flat_codes.tolist(), flat, strict=True):
            if code == 0:
                expected = ~annotated[b]
                expected[0] = True
            else:
                expected = mat[code]
            assert torch.equal(row, expected), (b, code)


def test_admissible_leaf_region_and_zero_codes(space: LabelSpace) -> None:
    liver, tumour = space.leaf_id("liver"), space.leaf_id("liver_tumour")
    codes = torch.tensor([[tumour, space.code("region:liver"), 0]])
    annotated = torch.as_tensor(space.annotated_leaf_mask("liver"))[None]
    adm = admissible(codes, annotated, space)[0].T  # (3, L)
    one_hot = torch.zeros(space.n_leaves, dtype=torch.bool)
    one_hot[tumour] = True
    assert torch.equal(adm[0], one_hot)  # leaf code -> one-hot
    assert set(torch.nonzero(adm[1]).flatten().tolist()) == {liver, tumour}  # region -> group leaves
    # 0 -> background + the leaves the liver set does not annotate
    assert set(torch.nonzero(adm[2]).flatten().tolist()) == {0} | (set(range(space.n_leaves)) - {0, liver, tumour})
    # twin: a fully labelled sample's 0 is background only
    full = admissible(codes, torch.as_tensor(space.full_mask())[None], space)[0].T
    assert torch.nonzero(full[2]).flatten().tolist() == [0]
    assert torch.equal(full[:2], adm[:2])


# ---------------------------------------------------------------------- merge()
def _groups(space: LabelSpace, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(space.n_groups, n), torch.zeros(len(space.part_ids), n)


def test_merge_ties_between_groups_go_to_the_first_group(space: LabelSpace) -> None:
    regions, parts = _groups(space, 2)
    liver, kidney = space.group("liver").index, space.group("kidney").index
    regions[liver] = 0.8
    regions[kidney] = 0.8
    regions[kidney, 1] = 0.81  # twin: a strictly higher kidney region wins
    out = merge(regions, parts, space)
    assert out.tolist() == [space.leaf_id("liver"), space.leaf_id("kidney")]
    assert out.dtype == torch.uint8


def test_merge_threshold_just_below_and_above(space: LabelSpace) -> None:
    regions, parts = _groups(space, 3)
    regions[space.group("spleen").index] = torch.tensor([0.4999, 0.5, 0.5001])
    out = merge(regions, parts, space, threshold=0.5)
    assert out.tolist() == [0, 0, space.leaf_id("spleen")]
    out = merge(regions, parts, space, threshold=0.3)
    assert out.tolist() == [space.leaf_id("spleen")] * 3


def test_merge_part_never_outside_its_group(space: LabelSpace) -> None:
    regions, parts = _groups(space, 2)
    liver, kidney = space.group("liver").index, space.group("kidney").index
    k_tumour = space.part_ids.index(space.leaf_id("kidney_tumour"))
    regions[liver] = torch.tensor([0.9, 0.3])
    regions[kidney] = torch.tensor([0.3, 0.9])
    parts[k_tumour] = 0.99  # the kidney tumour is confident everywhere
    organs = torch.full((space.n_groups, 2), 0.01)
    out = merge(regions, parts, space, organ_leaf_probs=organs)
    # voxel 0 belongs to the liver group: the kidney tumour cannot appear there; voxel 1 (twin): it does
    assert out.tolist() == [space.leaf_id("liver"), space.leaf_id("kidney_tumour")]


def test_merge_sigmoid_mode_without_organ_leaf_probs(space: LabelSpace) -> None:
    regions, parts = _groups(space, 3)
    regions[space.group("liver").index] = 0.9
    parts[space.part_ids.index(space.leaf_id("liver_tumour"))] = torch.tensor([0.4, 0.5, 0.6])
    out = merge(regions, parts, space, organ_leaf_probs=None)
    liver, tumour = space.leaf_id("liver"), space.leaf_id("liver_tumour")
    assert out.tolist() == [liver, liver, tumour]


def test_merge_softmax_threshold_none_is_group_argmax_against_background(space: LabelSpace) -> None:
    torch.manual_seed(0)
    leaf_probs = torch.softmax(2.0 * torch.randn(space.n_leaves, 4, 5, 6), dim=0)
    out = merge_softmax(leaf_probs, space, threshold=None)
    regions, _, _ = softmax_to_groups(leaf_probs, space)
    # a region is the sum of its group's leaves, computed here, not taken on trust from softmax_to_groups
    # (a region of the organ leaf alone passed every test here; helper-124)
    assert torch.allclose(regions, torch.stack([leaf_probs[list(g.leaf_ids)].sum(0) for g in space.groups]))
    assert any(len(g.leaf_ids) > 1 for g in space.groups)
    winner = torch.argmax(torch.cat([leaf_probs[:1], regions]), dim=0)  # 0 = background, g + 1 = group g
    expected = torch.zeros_like(out)
    for grp in space.groups:
        inside = winner == grp.index + 1
        ids = torch.as_tensor(grp.leaf_ids)
        best = ids[torch.argmax(leaf_probs[list(grp.leaf_ids)], dim=0)]
        expected[inside] = best[inside].to(torch.uint8)
    assert torch.equal(out, expected)
    assert (out == 0).any() and (out != 0).any()
    # by hand: the liver leaf (0.25) and its tumour (0.35) each below background (0.4), their region (0.6)
    # above it: the voxel is the liver group's, and the tumour beats the organ inside it
    hand = torch.zeros(space.n_leaves, 1, 1, 1)
    hand[0], hand[space.leaf_id("liver")], hand[space.leaf_id("liver_tumour")] = 0.4, 0.25, 0.35
    assert merge_softmax(hand, space, threshold=None).item() == space.leaf_id("liver_tumour")
    assert merge_softmax(hand, space, threshold=0.5).item() == space.leaf_id("liver_tumour")
    assert merge_softmax(hand, space, threshold=0.7).item() == 0  # the region below the threshold: background
    # twin: threshold 0.5 refuses a winning group whose region sum is not above 0.5
    out_05 = merge_softmax(leaf_probs, space, threshold=0.5)
    best_r = regions.max(0).values
    assert torch.equal(out_05 == 0, (winner == 0) | (best_r <= 0.5))


def test_merge_rejects_wrong_channel_counts(space: LabelSpace) -> None:
    regions, parts = _groups(space, 2)
    with pytest.raises(ValueError, match="region_probs"):
        merge(regions[:2], parts, space)
    with pytest.raises(ValueError, match="part_probs"):
        merge(regions, parts[:1], space)
    with pytest.raises(ValueError, match="background_probs"):
        merge(regions, parts, space, threshold=None)
    assert merge(regions, parts, space).shape == (2,)
