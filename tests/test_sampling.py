"""Patch sampler: oversampling rate, annotated masks, aligned extras, resumability, balance, padding."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from unionseg.data.sampling import AugmentSpec, PatchSampler, SamplerCase, cases_per_dataset, make_loader
from unionseg.errors import DataError

N_LEAVES = 4  # background, organ (1), tumour (2), other organ (3); region code 4 = region of group 0
ALL_SPATIAL = AugmentSpec(flip_prob=(0.5, 0.5, 0.5), rot90_prob=0.75, scale_prob=1.0, scale_range=(0.7, 1.3),
                          intensity_scale_prob=0.0, intensity_shift_prob=0.0, noise_prob=0.0)


def mask(*leaves: int) -> np.ndarray:
    out = np.zeros(N_LEAVES, dtype=bool)
    out[[0, *leaves]] = True
    return out


def blob_case(seed: int, shape: tuple[int, int, int] = (20, 18, 16), dataset_index: int = 0,
              case_id: str = "") -> SamplerCase:
    """A smooth random image and a label with three touching organs (codes 1, 2, 3)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    for code in (1, 3, 2):
        centre = rng.uniform(3, np.array(shape) - 3)
        radius = rng.uniform(3, 5)
        label[np.linalg.norm(grid - centre, axis=-1) < radius] = code
    image = (label * 0.3 + grid[..., 0] * 0.05 + rng.normal(0, 0.05, shape)).astype(np.float32)
    return SamplerCase(dataset_index, mask(1, 2, 3), image, label, {}, case_id or f"blob{seed}")


def one_hot(label: np.ndarray, n: int) -> np.ndarray:
    return np.moveaxis(np.eye(n, dtype=np.float16)[label], -1, 0)


def draw(sampler: PatchSampler, steps: range) -> list[dict]:
    return [sampler[s] for s in steps]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


# ---------------------------------------------------------------------- foreground oversampling
def organ_case(dataset_index: int = 0) -> SamplerCase:
    """24^3 volume, a 3^3 annotated organ (code 1) and a large UNannotated organ (code 3)."""
    label = np.zeros((24, 24, 24), dtype=np.uint8)
    label[10:13, 5:8, 15:18] = 1
    label[0:12, 12:24, 0:12] = 3
    image = np.zeros(label.shape, dtype=np.float32)
    return SamplerCase(dataset_index, mask(1, 2), image, label, {}, "organ")


def centre_codes(sampler: PatchSampler, steps: int) -> np.ndarray:
    half = tuple(p // 2 for p in sampler.patch_size)
    return np.concatenate([sampler[s]["label"][(slice(None), *half)].numpy() for s in range(steps)])


@pytest.mark.parametrize("fg_prob", [0.0, 0.67, 1.0])
def test_foreground_oversampling_rate_matches_fg_prob(fg_prob: float) -> None:
    sampler = PatchSampler([organ_case()], 8, 8, N_LEAVES, seed=3, fg_prob=fg_prob, augment=AugmentSpec.off())
    codes = centre_codes(sampler, 60)  # 480 patches; no augmentation: the patch centre is the drawn voxel
    organ_fraction = 27 / 24**3
    expected = fg_prob + (1 - fg_prob) * organ_fraction
    measured = float(np.mean(codes == 1))
    assert abs(measured - expected) < 0.07, (measured, expected)
    if fg_prob == 1.0:
        assert measured == 1.0  # never the unannotated organ (code 3), though it is 256x larger
    if fg_prob == 0.0:
        assert np.mean(codes == 3) > 0.05  # uniform centres do land on the unannotated organ


def test_foreground_classes_drawn_uniformly_including_region_codes() -> None:
    label = np.zeros((24, 24, 24), dtype=np.uint8)
    label[2:20, 2:20, 2:12] = 1  # big organ leaf
    label[5:7, 5:7, 5:7] = 2  # tiny tumour leaf
    label[2:6, 2:6, 14:18] = N_LEAVES  # region code (organ or tumour, leaf unknown)
    case = SamplerCase(0, mask(1, 2), np.zeros(label.shape, np.float32), label, {}, "c")
    sampler = PatchSampler([case], 6, 8, N_LEAVES, fg_prob=1.0, augment=AugmentSpec.off())
    assert sorted(sampler.foreground_codes(0)) == [1, 2, N_LEAVES]
    codes = centre_codes(sampler, 60)
    for code in (1, 2, N_LEAVES):
        assert abs(np.mean(codes == code) - 1 / 3) < 0.08
    # an unannotated tumour leaf is never a target
    case_unannotated = SamplerCase(0, mask(1), np.zeros(label.shape, np.float32), label, {}, "c")
    assert sorted(PatchSampler([case_unannotated], 6, 2, N_LEAVES).foreground_codes(0)) == [1, N_LEAVES]


def test_location_cache_subsamples_and_stays_inside_the_class() -> None:
    case = organ_case()
    sampler = PatchSampler([case], 8, 2, N_LEAVES, max_locations=100)
    locations = sampler.class_locations(0)
    assert len(locations[1]) == 27 and len(locations[3]) == 100
    assert np.all(case.label.reshape(-1)[locations[3]] == 3)
    assert np.array_equal(locations[3], PatchSampler([case], 8, 2, N_LEAVES, max_locations=100)
                          .class_locations(0)[3])  # seeded: identical in every worker


# ---------------------------------------------------------------------- annotated masks and ids
def test_annotated_mask_and_dataset_id_follow_the_case() -> None:
    cases = [blob_case(0, dataset_index=0, case_id="a"), blob_case(1, dataset_index=1, case_id="b"),
             blob_case(2, dataset_index=1, case_id="c")]
    cases[0].annotated = mask(1, 2)
    cases[1].annotated = mask(3)
    cases[2].annotated = mask(3)
    by_id = {c.case_id: c for c in cases}
    sampler = PatchSampler(cases, 8, 4, N_LEAVES, augment=ALL_SPATIAL)
    seen = set()
    for step in range(6):
        batch = sampler[step]
        assert batch["annotated"].shape == (4, N_LEAVES) and batch["annotated"].dtype == torch.bool
        for b, cid in enumerate(batch["case_id"]):
            seen.add(cid)
            assert np.array_equal(batch["annotated"][b].numpy(), by_id[cid].annotated)
            assert int(batch["dataset_id"][b]) == by_id[cid].dataset_index
    assert seen == {"a", "b", "c"}


# ---------------------------------------------------------------------- aligned extras
def test_aligned_extras_follow_image_and_label_exactly() -> None:
    cases = []
    for seed in range(3):
        case = blob_case(seed)
        case.extras = {"pseudo": case.label.copy(), "onehot": one_hot(case.label, N_LEAVES),
                       "copy": case.image.copy()}
        cases.append(case)
    kinds = {"pseudo": "label", "onehot": "prob", "copy": "prob"}
    # image_pad_value=0 pads the image like the single-channel "copy" extra
    sampler = PatchSampler(cases, (10, 10, 8), 4, N_LEAVES, seed=5, augment=ALL_SPATIAL, extra_kinds=kinds,
                           image_pad_value=0.0)
    ambiguous = 0
    for step in range(10):
        batch = sampler[step]
        label, probs = batch["label"], batch["onehot"]
        assert batch["pseudo"].dtype == torch.int64 and probs.dtype == torch.float32
        assert probs.shape == (4, N_LEAVES, 10, 10, 8) and batch["copy"].shape == (4, 1, 10, 10, 8)
        assert torch.equal(batch["pseudo"], label)  # label extra: same nearest map
        assert torch.equal(batch["copy"], batch["image"])  # prob extra: same linear map
        assert torch.allclose(probs.sum(1), torch.ones_like(probs[:, 0]), atol=1e-5)
        certain = probs.amax(1) == 1.0  # all trilinear neighbours agree -> nearest must agree too
        assert torch.equal(probs.argmax(1)[certain], label[certain])
        ambiguous += int((~certain).sum())
    assert ambiguous > 0  # scaling really resampled (partial volumes at organ borders)

    # without scaling (flips and rot90 only) the probability extra is the one-hot of the label exactly
    exact = PatchSampler(cases, (10, 10, 8), 4, N_LEAVES, seed=5, extra_kinds=kinds,
                         augment=AugmentSpec(scale_prob=0.0, rot90_prob=0.75, intensity_scale_prob=0.0,
                                             intensity_shift_prob=0.0, noise_prob=0.0))
    for step in range(5):
        batch = exact[step]
        assert torch.equal(batch["onehot"], torch.nn.functional.one_hot(batch["label"], N_LEAVES)
                           .movedim(-1, 1).float())


def test_spatial_transforms_are_applied() -> None:
    """A linear ramp along X reveals flips, rot90 and the scale factor exactly."""
    shape = (40, 40, 40)
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], shape).copy()
    case = SamplerCase(0, mask(), ramp, np.zeros(shape, np.uint8), {}, "ramp")

    def slope(spec: AugmentSpec) -> tuple[float, float]:
        patch = PatchSampler([case], 8, 1, N_LEAVES, fg_prob=0.0, augment=spec, image_pad_value=-1.0)
        for step in range(50):  # a patch well inside the volume (no padding, no border clamping)
            img = patch[step]["image"][0, 0]
            if img.min() >= 4 and img.max() <= 35:
                return float(img[5, 4, 4] - img[4, 4, 4]), float(img[4, 5, 4] - img[4, 4, 4])
        raise AssertionError("no interior patch")

    quiet = dict(intensity_scale_prob=0.0, intensity_shift_prob=0.0, noise_prob=0.0)
    assert slope(AugmentSpec.off()) == (1.0, 0.0)
    assert slope(AugmentSpec(flip_prob=(1, 0, 0), rot90_prob=0, scale_prob=0, **quiet)) == (-1.0, 0.0)
    dx, dy = slope(AugmentSpec(flip_prob=(0, 0, 0), rot90_prob=1, scale_prob=0, **quiet))
    assert dx == 0.0 and abs(dy) == 1.0
    dx, _ = slope(AugmentSpec(flip_prob=(0, 0, 0), rot90_prob=0, scale_prob=1, scale_range=(1.25, 1.25), **quiet))
    assert dx == pytest.approx(1.25)


def test_intensity_augmentation_changes_only_the_image() -> None:
    """The intensity changes touch the image alone: the label and a probability extra (here a copy of the
    image) come out as without them, from the same seed (the check compared only image and copy, which differ
    as well when the extra is changed too, by other draws; helper-123)."""
    case = blob_case(0)
    case.extras = {"copy": case.image.copy()}

    def first(**probs: float) -> dict:
        spec = AugmentSpec(noise_std=0.5, **probs)
        return PatchSampler([case], 8, 2, N_LEAVES, seed=5, augment=spec, extra_kinds={"copy": "prob"})[0]

    batch = first(intensity_scale_prob=1.0, intensity_shift_prob=1.0, noise_prob=1.0)
    plain = first(intensity_scale_prob=0.0, intensity_shift_prob=0.0, noise_prob=0.0)
    inside = plain["copy"] != 0  # the image's padding takes its minimum, an extra's 0
    assert inside.any() and torch.equal(plain["image"][inside], plain["copy"][inside])  # the same patch
    assert not torch.allclose(batch["image"], plain["image"])
    assert torch.equal(batch["copy"], plain["copy"]) and torch.equal(batch["label"], plain["label"])


def test_histogram_shift_is_a_monotone_remap_that_changes_tissue_contrast() -> None:
    """The remap keeps the order of intensities and the patch's range but not the ratio of tissue contrasts
    (what a global scale/shift keeps); it is a pure function of the sampler's seed; with probability 0 the
    batches equal those of a spec without the option (the random stream is unchanged)."""
    quiet = dict(intensity_scale_prob=0.0, intensity_shift_prob=0.0, noise_prob=0.0, flip_prob=(0, 0, 0),
                 rot90_prob=0.0, scale_prob=0.0)
    case = blob_case(0)

    def first(spec: AugmentSpec, seed: int = 3) -> dict:
        return PatchSampler([case], 12, 1, N_LEAVES, seed=seed, augment=spec)[0]

    shifted = AugmentSpec(histogram_shift_prob=1.0, histogram_shift_points=4, **quiet)
    plain = first(AugmentSpec(**quiet))
    batch = first(shifted)
    x, y = plain["image"].flatten().numpy(), batch["image"].flatten().numpy()  # same patch, with and without
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(y[order]) >= -1e-5)  # monotone
    assert y.min() == pytest.approx(x.min(), abs=1e-5) and y.max() == pytest.approx(x.max(), abs=1e-5)
    quantiles_x = np.quantile(x, [0.1, 0.5, 0.9])
    quantiles_y = np.quantile(y, [0.1, 0.5, 0.9])
    ratio = lambda q: (q[1] - q[0]) / (q[2] - q[1])  # noqa: E731
    assert abs(ratio(quantiles_y) - ratio(quantiles_x)) > 0.01  # contrast between tissues changed
    assert torch.equal(first(shifted)["image"], batch["image"])
    assert not torch.equal(first(shifted, seed=4)["image"], first(AugmentSpec(**quiet), seed=4)["image"])
    off = AugmentSpec(histogram_shift_prob=0.0, **quiet)
    noisy, noisy_off = AugmentSpec(noise_prob=0.5), AugmentSpec(noise_prob=0.5, histogram_shift_prob=0.0)
    assert torch.equal(first(off)["image"], plain["image"])
    assert torch.equal(first(noisy_off)["image"], first(noisy)["image"])
    with pytest.raises(ValueError, match="histogram_shift_points"):
        AugmentSpec(histogram_shift_points=2)
    with pytest.raises(ValueError, match="histogram_shift_prob"):
        AugmentSpec(histogram_shift_prob=1.5)


def test_structure_shift_moves_each_labelled_structure_by_its_own_offset() -> None:
    """Inside each labelled structure (away from its border) the image moves by one constant per structure,
    different structures by different constants; unlabelled voxels far from any label stay as they were;
    without sigma the change is exactly offset x mask; off (probability 0) keeps the random stream."""
    quiet = dict(intensity_scale_prob=0.0, intensity_shift_prob=0.0, noise_prob=0.0, flip_prob=(0, 0, 0),
                 rot90_prob=0.0, scale_prob=0.0)
    case = blob_case(0)

    def first(spec: AugmentSpec) -> dict:
        return PatchSampler([case], 16, 1, N_LEAVES, seed=3, augment=spec)[0]

    plain = first(AugmentSpec(**quiet))
    label = plain["label"][0].numpy()
    codes = [c for c in np.unique(label) if c]
    assert len(codes) >= 2
    sharp = first(AugmentSpec(structure_shift_prob=1.0, structure_shift_sigma=0.0, **quiet))
    delta = (sharp["image"] - plain["image"])[0, 0].numpy()
    offsets = []
    for code in codes:
        inside = delta[label == code]
        assert np.allclose(inside, inside[0], atol=1e-6) and abs(inside[0]) > 1e-4
        offsets.append(inside[0])
    assert np.allclose(delta[label == 0], 0.0, atol=1e-6)
    assert len(set(np.round(offsets, 5))) == len(codes)
    assert all(-0.5 <= o <= 0.5 for o in offsets)
    soft = first(AugmentSpec(structure_shift_prob=1.0, structure_shift_sigma=1.0, **quiet))
    soft_delta = (soft["image"] - plain["image"])[0, 0].numpy()
    from scipy.ndimage import distance_transform_edt

    far = distance_transform_edt(label == 0) > 4
    assert far.any() and np.allclose(soft_delta[far], 0.0, atol=1e-4)
    assert np.count_nonzero(np.abs(soft_delta[label == 0]) > 1e-4) > 0  # blurred across the border
    assert torch.equal(first(AugmentSpec(structure_shift_prob=0.0, **quiet))["image"], plain["image"])
    noisy, noisy_off = AugmentSpec(noise_prob=0.5), AugmentSpec(noise_prob=0.5, structure_shift_prob=0.0)
    sampler = lambda spec: PatchSampler([case], 16, 2, N_LEAVES, seed=5, augment=spec)  # noqa: E731
    assert all(torch.equal(sampler(noisy)[k]["image"], sampler(noisy_off)[k]["image"]) for k in range(3))
    with pytest.raises(ValueError, match="structure_shift"):
        AugmentSpec(structure_shift_prob=-0.1)
    with pytest.raises(ValueError, match="structure_shift_sigma"):
        AugmentSpec(structure_shift_sigma=-1.0)


# ---------------------------------------------------------------------- resumability
@pytest.fixture()
def memmapped_cases(tmp_path: Path) -> list[SamplerCase]:
    cases = []
    for i in range(3):
        case = blob_case(i, dataset_index=i % 2)
        extras = {"pseudo": case.label, "teacher": one_hot(case.label, N_LEAVES)}
        arrays = {"image": case.image, "label": case.label, **extras}
        for name, arr in arrays.items():
            np.save(tmp_path / f"{i}_{name}.npy", arr)
        loaded = {name: np.load(tmp_path / f"{i}_{name}.npy", mmap_mode="r") for name in arrays}
        cases.append(SamplerCase(case.dataset_index, case.annotated, loaded["image"], loaded["label"],
                                 {"pseudo": loaded["pseudo"], "teacher": loaded["teacher"]}, case.case_id))
    return cases


def make_sampler(cases: list[SamplerCase], seed: int = 7) -> PatchSampler:
    return PatchSampler(cases, 8, 2, N_LEAVES, seed=seed, augment=AugmentSpec(scale_prob=0.5),
                        extra_kinds={"pseudo": "label", "teacher": "prob"})


def test_resumed_and_multiworker_batches_are_identical(memmapped_cases: list[SamplerCase]) -> None:
    assert isinstance(memmapped_cases[0].image, np.memmap)
    fresh = draw(make_sampler(memmapped_cases), range(0, 8))[4:8]
    resumed = list(make_loader(make_sampler(memmapped_cases), 4, 8, num_workers=0))
    workers = list(make_loader(make_sampler(memmapped_cases), 4, 8, num_workers=2))
    assert_batches_equal(fresh, resumed)
    assert_batches_equal(fresh, workers)
    assert not torch.equal(fresh[0]["image"], fresh[1]["image"])  # different steps differ
    other_seed = draw(make_sampler(memmapped_cases, seed=8), range(4, 8))
    assert not torch.equal(fresh[0]["image"], other_seed[0]["image"])


def test_pickled_sampler_reopens_memmaps(memmapped_cases: list[SamplerCase]) -> None:
    sampler = make_sampler(memmapped_cases)
    clone = pickle.loads(pickle.dumps(sampler))
    assert isinstance(clone.cases[0].image, np.memmap) and isinstance(clone.cases[0].extras["teacher"], np.memmap)
    assert_batches_equal(draw(sampler, range(3)), draw(clone, range(3)))
    in_memory = pickle.loads(pickle.dumps(blob_case(0)))  # plain arrays still pickle by value
    assert isinstance(in_memory.image, np.ndarray) and not isinstance(in_memory.image, np.memmap)


# ---------------------------------------------------------------------- dataset balance
def test_balanced_datasets_get_equal_shares() -> None:
    cases = [blob_case(0, (8, 8, 8), 0)] + [blob_case(i, (8, 8, 8), 1) for i in (1, 2)] + \
        [blob_case(i, (8, 8, 8), 2) for i in range(3, 9)]
    assert cases_per_dataset(cases) == {0: [0], 1: [1, 2], 2: [3, 4, 5, 6, 7, 8]}

    def shares(balance: bool) -> np.ndarray:
        sampler = PatchSampler(cases, 4, 3, N_LEAVES, augment=AugmentSpec.off(), balance_datasets=balance)
        ids = np.concatenate([sampler[s]["dataset_id"].numpy() for s in range(40)])
        return np.bincount(ids, minlength=3) / ids.size

    assert np.allclose(shares(True), 1 / 3)  # exact: every cycle of 3 slots visits each dataset once
    unbalanced = shares(False)
    assert abs(unbalanced[2] - 6 / 9) < 0.1 and unbalanced[0] < 0.2  # proportional to the case counts


def test_dataset_weights_set_exact_shares_per_cycle() -> None:
    """dataset_weights: dataset d appears w_d times in every cycle of sum(w) slots (exact shares, whatever the
    case counts); the default weights give the same draws as no weights; bad weights are refused by name."""
    cases = [blob_case(0, (8, 8, 8), 0)] + [blob_case(i, (8, 8, 8), 1) for i in (1, 2)] + \
        [blob_case(i, (8, 8, 8), 2) for i in range(3, 9)]

    def ids(**kwargs: Any) -> np.ndarray:
        sampler = PatchSampler(cases, 4, 2, N_LEAVES, augment=AugmentSpec.off(), **kwargs)
        return np.concatenate([sampler[s]["dataset_id"].numpy() for s in range(30)])  # 60 slots = 12 cycles of 5

    weighted = ids(dataset_weights={1: 3})
    assert np.array_equal(np.bincount(weighted, minlength=3), [12, 36, 12])
    for cycle in weighted.reshape(-1, 5):  # every cycle on its own, not only the total
        assert np.array_equal(np.bincount(cycle, minlength=3), [1, 3, 1])
    # the draws of the sampler before weights existed (pinned), kept by default, by weights of 1 and by any
    # equal weights (divided by their gcd)
    before = [0, 1, 2, 1, 0, 2, 0, 1, 2, 0, 1, 2]
    assert ids()[:12].tolist() == before
    for same in ({0: 1, 2: 1}, {0: 2, 1: 2, 2: 2}):
        assert np.array_equal(ids(dataset_weights=same), ids())
    assert np.array_equal(ids(dataset_weights={0: 2, 1: 6, 2: 2}), weighted)  # 1 : 3 : 1 after the gcd
    for bad, match in (({3: 2}, "dataset index 3"), ({1: 0}, "weight 0"), ({1: 1.5}, "weight 1.5")):
        with pytest.raises(ValueError, match=match):
            ids(dataset_weights=bad)
    with pytest.raises(ValueError, match="balance_datasets"):
        ids(dataset_weights={1: 2}, balance_datasets=False)


# ---------------------------------------------------------------------- padding
def test_padding_at_borders() -> None:
    shape = (5, 6, 4)
    code = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    label = np.ones(shape, dtype=np.uint8)
    case = SamplerCase(0, mask(1), 10.0 + code, label,
                       {"teacher": one_hot(label, 3), "single": np.full(shape, 0.5, np.float32),
                        "pseudo": label.copy()}, "small")
    kinds = {"teacher": "prob", "single": "prob", "pseudo": "label"}
    sampler = PatchSampler([case], 8, 4, N_LEAVES, fg_prob=0.0, augment=AugmentSpec.off(), extra_kinds=kinds)
    marked = PatchSampler([case], 8, 4, N_LEAVES, fg_prob=0.0, augment=AugmentSpec.off(), image_pad_value=-1.0)
    for step in range(3):
        batch = sampler[step]
        for b in range(4):
            image = batch["image"][b, 0].numpy()
            inside = marked[step]["image"][b, 0].numpy() >= 0  # same draws, pad marked as -1
            assert 0 < inside.sum() < image.size
            assert np.all(image[~inside] == 10.0)  # image padded with the case minimum
            assert np.all(batch["label"][b].numpy()[~inside] == 0)
            assert np.all(batch["label"][b].numpy()[inside] == 1)
            assert np.all(batch["pseudo"][b].numpy()[~inside] == 0)
            teacher = batch["teacher"][b].numpy()
            assert np.all(teacher[0][~inside] == 1) and np.all(teacher[1:][:, ~inside] == 0)
            assert np.all(teacher[1][inside] == 1)
            single = batch["single"][b, 0].numpy()
            assert np.all(single[~inside] == 0) and np.all(single[inside] == 0.5)
            # the inside is an exact, unshifted crop: source position = patch position + start
            pos = np.argwhere(inside)
            src = np.stack(np.unravel_index((image[inside] - 10).astype(int), shape), axis=1)
            offsets = src - pos
            assert np.all(offsets == offsets[0])
    image = marked[0]["image"].numpy()
    assert set(np.unique(image[image < 10])) == {-1.0}


# ---------------------------------------------------------------------- validation
def test_invalid_inputs_are_rejected() -> None:
    case = blob_case(0)
    PatchSampler([case], 8, 2, N_LEAVES)  # the valid twin
    bad_label = SamplerCase(0, mask(1), case.image, case.label[:-1], {}, "bad")
    with pytest.raises(DataError, match="label shape"):
        PatchSampler([bad_label], 8, 2, N_LEAVES)
    with pytest.raises(DataError, match="extra 'pseudo' is missing"):
        PatchSampler([case], 8, 2, N_LEAVES, extra_kinds={"pseudo": "label"})
    with pytest.raises(DataError, match="annotated mask"):
        PatchSampler([case], 8, 2, N_LEAVES + 1)
    with pytest.raises(ValueError, match="reserved"):
        PatchSampler([case], 8, 2, N_LEAVES, extra_kinds={"label": "label"})
    with pytest.raises(ValueError, match="kind"):
        PatchSampler([case], 8, 2, N_LEAVES, extra_kinds={"x": "nearest"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="fg_prob"):
        PatchSampler([case], 8, 2, N_LEAVES, fg_prob=1.5)
    with pytest.raises(ValueError, match="rot90_prob"):
        AugmentSpec(rot90_prob=2.0)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentSpec(scale_range=(1.2, 0.9))
    with pytest.raises(ValueError, match="start_step"):
        make_loader(PatchSampler([case], 8, 2, N_LEAVES), 5, 3)
