"""Losses: hand-computed values on 2-voxel examples, partial-label behaviour, masks and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unionseg.labels import LabelSpace, Leaf, admissible, merge
from unionseg.losses import (
    FocalLoss,
    MarginalLoss,
    MaskedSigmoidDiceBCE,
    ce_dice_loss,
    cotraining_terms,
    cross_task_negative_bce,
    cross_task_negative_table,
    downsample_mask,
    exclusion_loss,
    focal_loss,
    inverse_frequency_weights,
    kd_kl,
    kd_regions,
    map_to_teacher,
    marginal_channels,
    marginal_loss,
    masked_sigmoid_dice_bce,
    ms_kd_feature_loss,
    ms_kd_logit_loss,
    one_hot,
    product_of_experts_background,
    region_affinity_loss,
    sigmoid_leaf_logits,
    sigmoid_rampup,
    soft_ce,
    soft_dice_loss,
    task_channel_tables,
    task_targets,
)

SMOOTH = 1e-5


def two_leaf_space() -> LabelSpace:
    """Background, a, b: no parts."""
    return LabelSpace([Leaf("a"), Leaf("b")])


def organ_tumour_space() -> LabelSpace:
    """Background (0), organ (1), tumour (2, part of organ), other (3); region codes 4 (organ), 5 (other)."""
    return LabelSpace([Leaf("organ"), Leaf("tumour", "organ"), Leaf("other")])


def logits_from_probs(probs: list[list[float]]) -> torch.Tensor:
    """(V voxels x C) probabilities -> (1, C, V) logits whose softmax gives them back."""
    return torch.tensor(probs, dtype=torch.float64).log().T.unsqueeze(0).float()


def dice(intersection: float, denominator: float) -> float:
    return (2 * intersection + SMOOTH) / (denominator + SMOOTH)


# ---------------------------------------------------------------------------------------------- soft Dice
def test_soft_dice_two_voxels_by_hand() -> None:
    probs = torch.tensor([[[0.8, 0.4], [0.2, 0.6]]])  # (1, 2 classes, 2 voxels)
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    expected = 1 - (dice(0.8, 2.2) + dice(0.6, 1.8)) / 2
    assert soft_dice_loss(probs, target).item() == pytest.approx(expected, abs=1e-6)
    perfect = soft_dice_loss(target, target).item()
    assert perfect == pytest.approx(0.0, abs=1e-6)


def test_soft_dice_mask_selects_pairs() -> None:
    probs = torch.tensor([[[0.8, 0.4], [0.2, 0.6]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    only_first = soft_dice_loss(probs, target, mask=torch.tensor([[True, False]])).item()
    assert only_first == pytest.approx(1 - dice(0.8, 2.2), abs=1e-6)
    nothing = soft_dice_loss(probs, target, mask=torch.tensor([[False, False]]))
    assert nothing.item() == 0.0


def test_soft_dice_empty_target_convention() -> None:
    empty = torch.zeros(1, 1, 4)
    assert soft_dice_loss(empty, empty).item() == pytest.approx(0.0, abs=1e-7)
    some_mass = torch.full((1, 1, 4), 0.25)
    assert soft_dice_loss(some_mass, empty).item() == pytest.approx(1.0, abs=1e-4)


def test_soft_dice_batch_pools_samples() -> None:
    probs = torch.tensor([[[0.5, 0.5]], [[0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    per_sample = soft_dice_loss(probs, target).item()
    pooled = soft_dice_loss(probs, target, batch_dice=True).item()
    assert per_sample == pytest.approx((1 - dice(0.5, 2.0) + 0.0) / 2, abs=1e-6)
    assert pooled == pytest.approx(1 - dice(0.5, 2.0), abs=1e-6)


def test_soft_dice_rejects_bad_arguments() -> None:
    probs = torch.rand(1, 2, 3)
    with pytest.raises(ValueError, match="smooth"):
        soft_dice_loss(probs, probs, smooth=0.0)
    with pytest.raises(ValueError, match="shape"):
        soft_dice_loss(probs, torch.rand(1, 2, 4))
    with pytest.raises(ValueError, match="mask"):
        soft_dice_loss(probs, probs, mask=torch.ones(2, 2, dtype=torch.bool))
    assert soft_dice_loss(probs, probs, smooth=1.0).item() >= 0.0  # accepted twin


# ---------------------------------------------------------------------------------------------- CE + Dice
def test_ce_dice_two_voxels_by_hand() -> None:
    logits = logits_from_probs([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    labels = torch.tensor([[0, 1]])
    terms = ce_dice_loss(logits, labels)
    assert terms["ce"].item() == pytest.approx((-math.log(0.7) - math.log(0.6)) / 2, abs=1e-5)
    expected_dice = 1 - (dice(0.7, 1.8) + dice(0.6, 1.8) + dice(0.0, 0.4)) / 3
    assert terms["dice"].item() == pytest.approx(expected_dice, abs=1e-5)
    weighted = ce_dice_loss(logits, labels, ce_weight=2.0, dice_weight=0.0)
    assert weighted["ce"].item() == pytest.approx(2 * terms["ce"].item(), rel=1e-6)
    assert weighted["dice"].item() == 0.0


def test_ce_dice_matches_soft_dice_on_one_hot() -> None:
    torch.manual_seed(10)
    logits = torch.randn(2, 4, 3, 3, 3)
    labels = torch.randint(0, 4, (2, 3, 3, 3))
    for batch_dice in (False, True):
        reference = soft_dice_loss(torch.softmax(logits, 1), one_hot(labels, 4), batch_dice=batch_dice)
        fast = ce_dice_loss(logits, labels, batch_dice=batch_dice)["dice"]
        assert fast.item() == pytest.approx(reference.item(), rel=1e-5)


def test_one_hot_rejects_float_labels() -> None:
    assert one_hot(torch.tensor([[0, 2]]), 3).shape == (1, 3, 2)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        one_hot(torch.tensor([[0.0, 2.0]]), 3)


# ---------------------------------------------------------------------------------------------- marginal
def test_marginal_two_voxels_by_hand() -> None:
    space = two_leaf_space()
    # voxel 0: code 0 (background or the unannotated b), voxel 1: leaf a; the sample annotates a only.
    logits = logits_from_probs([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    codes = torch.tensor([[0, 1]])
    annotated = torch.tensor([[True, True, False]])
    terms = marginal_loss(logits, codes, annotated, space)
    assert terms["ce"].item() == pytest.approx((-math.log(0.8) - math.log(0.6)) / 2, abs=1e-5)
    # merged background (0 + b): probs (0.8, 0.4), target (1, 0); leaf a: probs (0.2, 0.6), target (0, 1)
    assert terms["dice"].item() == pytest.approx(1 - (dice(0.8, 2.2) + dice(0.6, 1.8)) / 2, abs=1e-5)
    # the naive loss trusts the 0 as background: a different, larger CE
    naive = ce_dice_loss(logits, codes)
    assert naive["ce"].item() == pytest.approx((-math.log(0.5) - math.log(0.6)) / 2, abs=1e-5)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_marginal_equals_plain_when_every_leaf_is_annotated(space: LabelSpace, batch_dice: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, space.n_leaves, 3, 4, 5, requires_grad=True)
    labels = torch.randint(0, space.n_leaves, (2, 3, 4, 5))
    annotated = torch.ones(2, space.n_leaves, dtype=torch.bool)
    marginal = marginal_loss(logits, labels, annotated, space, batch_dice=batch_dice)
    plain = ce_dice_loss(logits, labels, batch_dice=batch_dice)
    assert marginal["ce"].item() == pytest.approx(plain["ce"].item(), rel=1e-5)
    assert marginal["dice"].item() == pytest.approx(plain["dice"].item(), rel=1e-5)
    # twin: once a leaf is unannotated the two differ
    partial = annotated.clone()
    partial[:, 3] = False
    other = marginal_loss(logits, labels, partial, space, batch_dice=batch_dice)
    assert other["ce"].item() < plain["ce"].item()


def test_marginal_ignores_mass_moved_between_merged_leaves(space: LabelSpace) -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, space.n_leaves, 4, 4, 4)
    codes = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    codes[0, 1:3, 1:3, 1:3] = space.leaf_id("liver")
    liver_only = torch.as_tensor(space.annotated_leaf_mask("liver")).unsqueeze(0)
    swapped = logits.clone()
    kidney = space.leaf_id("kidney")
    swapped[:, [0, kidney]] = logits[:, [kidney, 0]]  # background <-> kidney everywhere
    before = marginal_loss(logits, codes, liver_only, space)
    after = marginal_loss(swapped, codes, liver_only, space)
    for key in ("ce", "dice"):
        assert after[key].item() == pytest.approx(before[key].item(), rel=1e-5)
    # twin: for a fully labelled sample the same swap matters
    full = torch.ones_like(liver_only)
    assert marginal_loss(swapped, codes, full, space)["ce"].item() != pytest.approx(
        marginal_loss(logits, codes, full, space)["ce"].item(), rel=1e-3)


def test_marginal_with_region_codes() -> None:
    space = organ_tumour_space()
    region_code = space.code("region:organ")
    assert region_code == 4
    # voxel 0: background; voxel 1: the organ region (organ or tumour, unknown); the sample annotates
    # organ and tumour (through the region) but not "other".
    logits = logits_from_probs([[0.6, 0.1, 0.1, 0.2], [0.1, 0.3, 0.4, 0.2]])
    codes = torch.tensor([[0, region_code]])
    annotated = torch.tensor([[True, True, True, False]])
    terms = marginal_loss(logits, codes, annotated, space)
    assert terms["ce"].item() == pytest.approx((-math.log(0.8) - math.log(0.7)) / 2, abs=1e-5)
    # channels: merged background {0, other}: probs (0.8, 0.3) target (1, 0); region {organ, tumour}:
    # probs (0.2, 0.7) target (0, 1); the single-leaf channels are ambiguous here and do not count.
    expected = 1 - (dice(0.8, 2.1) + dice(0.7, 1.9)) / 2
    assert terms["dice"].item() == pytest.approx(expected, abs=1e-5)
    # moving mass between organ and tumour inside the region changes nothing...
    swapped = logits[:, [0, 2, 1, 3]]
    again = marginal_loss(swapped, codes, annotated, space)
    assert again["ce"].item() == pytest.approx(terms["ce"].item(), abs=1e-6)
    assert again["dice"].item() == pytest.approx(terms["dice"].item(), abs=1e-6)
    # ...while a leaf code (tumour known) makes it matter
    leaf_codes = torch.tensor([[0, space.leaf_id("tumour")]])
    assert marginal_loss(swapped, leaf_codes, annotated, space)["ce"].item() != pytest.approx(
        marginal_loss(logits, leaf_codes, annotated, space)["ce"].item(), abs=1e-3)


def test_marginal_matches_admissible_reference(space: LabelSpace) -> None:
    torch.manual_seed(11)
    logits = torch.randn(3, space.n_leaves, 3, 4, 4)
    codes = torch.randint(0, space.n_leaves, (3, 3, 4, 4))
    codes[2, 0] = space.code("region:liver")
    annotated = torch.stack([torch.as_tensor(space.annotated_leaf_mask(n)) for n in ("liver", "kidney", "liver")])
    codes[0][codes[0] > 2] = 0  # each sample holds only codes its dataset can produce
    codes[1][(codes[1] > 0) & (codes[1] < 3) | (codes[1] > 4)] = 0
    codes[2][(codes[2] > 2) & (codes[2] < space.n_leaves)] = 0
    adm = admissible(codes, annotated, space)
    reference_ce = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~adm, -torch.inf), 1)).mean()
    # Dice reference with explicit volumes: merged probability per channel, target = admissible set inside it
    sets, _, counted = marginal_channels(codes, annotated, space)
    probs = torch.softmax(logits, 1)
    merged = torch.einsum("bkl,bl...->bk...", sets.float(), probs)
    inside = ~torch.einsum("bl...,bkl->bk...", adm.float(), (~sets).float()).bool()
    reference_dice = soft_dice_loss(merged, inside.float(), mask=counted)
    terms = marginal_loss(logits, codes, annotated, space)
    assert terms["ce"].item() == pytest.approx(reference_ce.item(), rel=1e-5)
    assert terms["dice"].item() == pytest.approx(reference_dice.item(), rel=1e-5)
    liver = space.leaf_id("liver")
    assert not counted[2, liver] and counted[2, space.code("region:liver")]  # region code: region channel
    assert counted[0, liver] and not counted[1, liver]


def test_marginal_stays_finite_when_the_merged_probability_underflows(space: LabelSpace) -> None:
    logits = torch.full((1, space.n_leaves, 2), -200.0)
    logits[0, space.leaf_id("liver")] = 200.0  # everything says liver, with overwhelming confidence
    logits.requires_grad_(True)
    codes = torch.zeros(1, 2, dtype=torch.long)  # ... but the voxels are background or unannotated
    annotated = torch.as_tensor(space.annotated_leaf_mask("liver")).unsqueeze(0)
    terms = marginal_loss(logits, codes, annotated, space)
    assert torch.isfinite(terms["ce"]) and terms["ce"].item() > 100
    terms["ce"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_marginal_gradient_and_shapes(space: LabelSpace) -> None:
    logits = torch.randn(2, space.n_leaves, 3, 3, 3, requires_grad=True)
    codes = torch.zeros(2, 3, 3, 3, dtype=torch.long)
    codes[0, 1, 1, 1] = space.leaf_id("liver")
    codes[1, 0, 0, 0] = space.code("region:kidney")
    annotated = torch.stack([torch.as_tensor(space.annotated_leaf_mask(n)) for n in ("liver", "kidney")])
    terms = marginal_loss(logits, codes, annotated, space)
    sum(terms.values()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="leaves"):
        marginal_loss(logits[:, :5], codes, annotated, space)
    with pytest.raises(ValueError, match="annotated"):
        marginal_loss(logits, codes, annotated[:, :5], space)


def _reference_marginal(logits: torch.Tensor, codes: torch.Tensor, annotated: torch.Tensor,
                         space: LabelSpace) -> torch.Tensor:
    """CE + Dice of the marginal loss and the exclusion loss through plain autograd, from explicit volumes."""
    adm = admissible(codes, annotated, space)
    ce = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~adm, -torch.inf), 1)).mean()
    sets, _, counted = marginal_channels(codes, annotated, space)
    probs = torch.softmax(logits, 1)
    merged = torch.einsum("bkl,bl...->bk...", sets.to(probs.dtype), probs)
    inside = ~torch.einsum("bl...,bkl->bk...", adm.to(probs.dtype), (~sets).to(probs.dtype)).bool()
    dice = soft_dice_loss(merged, inside.to(probs.dtype), mask=counted)
    # exclusion: the unannotated leaves' overlap with the annotated foreground
    foreground = (codes > 0).to(probs.dtype)  # every code but 0 is annotated foreground
    unannotated = ~annotated.bool()
    unannotated[:, 0] = False
    overlap = 2 * (probs * foreground.unsqueeze(1)).flatten(2).sum(-1) / (
        foreground.flatten(1).sum(-1, keepdim=True) + probs.flatten(2).sum(-1) + SMOOTH)
    pairs = unannotated & (foreground.flatten(1).sum(-1, keepdim=True) > 0)
    exclusion = (overlap * pairs).sum() / pairs.sum().clamp_min(1)
    return ce + dice + exclusion


@pytest.mark.parametrize("channels_last", [False, True])
def test_marginal_gradient_matches_plain_autograd(space: LabelSpace, channels_last: bool) -> None:
    # the marginal and exclusion losses share a hand-written backward pass; plain autograd over the same
    # formulas must give the same gradient, whatever the logits' memory layout
    torch.manual_seed(5)
    logits = torch.randn(3, space.n_leaves, 4, 5, 6) * 3
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last_3d)
    codes = torch.randint(0, space.n_leaves, (3, 4, 5, 6))
    codes[0][codes[0] > 2] = 0
    codes[1][(codes[1] > 0) & (codes[1] < 3) | (codes[1] > 4)] = 0
    codes[2][(codes[2] > 2) & (codes[2] < space.n_leaves)] = 0
    codes[2, 0] = space.code("region:liver")
    annotated = torch.stack([torch.as_tensor(space.annotated_leaf_mask(n)) for n in ("liver", "kidney", "liver")])
    fused = logits.clone().requires_grad_(True)
    terms = marginal_loss(fused, codes, annotated, space)
    (terms["ce"] + terms["dice"] + exclusion_loss(fused, codes, annotated, space)).backward()
    plain = logits.clone().requires_grad_(True)
    _reference_marginal(plain, codes, annotated, space).backward()
    assert fused.grad is not None and plain.grad is not None
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-4, atol=1e-7)
    assert fused.grad.abs().sum() > 0
    # the exclusion term from the marginal loss's own softmax: the same value and gradient
    shared = logits.clone().requires_grad_(True)
    both = marginal_loss(shared, codes, annotated, space, exclusion_weight=0.5)
    assert both["exclusion"].item() == pytest.approx(0.5 * exclusion_loss(logits, codes, annotated, space).item(),
                                                     rel=1e-6)
    (both["ce"] + both["dice"] + 2 * both["exclusion"]).backward()
    assert shared.grad is not None
    torch.testing.assert_close(shared.grad, plain.grad, rtol=1e-4, atol=1e-7)


def test_softmax_code_sums_passes_gradcheck(space: LabelSpace) -> None:
    from unionseg.losses.partial import _representative_leaf, _SoftmaxCodeSums

    torch.manual_seed(6)
    logits = torch.randn(2, space.n_leaves, 2, 3, 3, dtype=torch.float64)
    codes = torch.randint(0, space.n_leaves, (2, 2, 3, 3))
    codes[0, 0, 0, 0] = space.code("region:kidney")
    logits[1, :, 0, 0, 0] = -50.0
    logits[1, space.leaf_id("liver"), 0, 0, 0] = 50.0  # P(code 0's set) = e^-100: the CE falls back
    codes[1, 0, 0, 0] = 0
    annotated = torch.stack([torch.ones(space.n_leaves, dtype=torch.bool),
                             torch.as_tensor(space.annotated_leaf_mask("liver"))])
    sets, _, _ = marginal_channels(codes, annotated, space)
    flat = codes.reshape(2, -1)
    representative = _representative_leaf(space, codes.device)
    logits.requires_grad_(True)

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ce, sums, _ = _SoftmaxCodeSums.apply(x, flat, space.n_codes, sets, representative)
        return ce, sums

    assert torch.autograd.gradcheck(both, (logits,))
    assert torch.autograd.gradcheck(lambda x: _SoftmaxCodeSums.apply(x, flat, space.n_codes, None, None)[1], (logits,))
    # the fallback voxel's CE is -log p of the background leaf (code 0's representative), about 100
    ce, _ = both(logits)
    log_p = torch.log_softmax(logits.detach(), 1)
    adm = admissible(codes, annotated, space)
    reference = (torch.logsumexp(logits.detach(), 1) - torch.logsumexp(logits.detach().masked_fill(~adm, -torch.inf), 1))
    reference[1, 0, 0, 0] = -log_p[1, 0, 0, 0, 0]
    assert ce.item() == pytest.approx(reference.mean().item(), rel=1e-9)


def test_hand_written_gradients_refuse_a_second_derivative_and_keep_the_layout(space: LabelSpace) -> None:
    """The marginal loss and MS-KD's logit term compute their gradient in closed form: a second derivative
    through them (create_graph=True) would be silently wrong, so it is refused; the gradient comes back in
    the logits' memory layout; without grad mode the logit term computes none."""
    torch.manual_seed(13)
    codes = torch.randint(0, space.n_leaves, (1, 3, 4, 5))
    annotated = torch.ones(1, space.n_leaves, dtype=torch.bool)
    leaves = [[1, 2], [3]]
    teachers = [torch.softmax(torch.randn(1, 1 + len(k), 3, 4, 5), 1) for k in leaves]
    for channels_last in (False, True):
        x = torch.randn(1, space.n_leaves, 3, 4, 5)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x.requires_grad_(True)
        marginal = marginal_loss(x, codes, annotated, space)["ce"]
        kd = ms_kd_logit_loss(x[:, :4], teachers, leaves, tau=2.0)
        for loss in (marginal, kd):
            with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
                torch.autograd.grad(loss + (x ** 3).sum(), x, create_graph=True)
        (g,) = torch.autograd.grad(marginal, x)
        assert g.is_contiguous(memory_format=torch.channels_last_3d) is channels_last
        assert g.is_contiguous() is not channels_last
    with torch.no_grad():  # value only: the same number
        assert ms_kd_logit_loss(x[:, :4], teachers, leaves, tau=2.0).item() == pytest.approx(kd.item(), rel=1e-6)
    # a single voxel: fewer voxels than codes
    one = marginal_loss(torch.randn(2, space.n_leaves, 1, requires_grad=True), torch.tensor([[3], [0]]),
                        annotated.expand(2, -1), space)
    assert torch.isfinite(one["ce"]) and torch.isfinite(one["dice"])


def test_marginal_is_float32_under_autocast(space: LabelSpace) -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, space.n_leaves, 4, 4, 4)
    codes = torch.randint(0, space.n_leaves, (1, 4, 4, 4))
    annotated = torch.ones(1, space.n_leaves, dtype=torch.bool)
    reference = marginal_loss(logits, codes, annotated, space)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = marginal_loss(logits.bfloat16(), codes, annotated, space)
    assert low["dice"].dtype == torch.float32
    assert low["dice"].item() == pytest.approx(reference["dice"].item(), abs=2e-2)
    # float32 logits under autocast: the loss's sums stay in float32 (bf16 ones differ by ~1e-4 here; the
    # bf16 input above cannot tell, its own rounding dominates; helper-123)
    logits = torch.randn(1, space.n_leaves, 32, 32, 32)
    codes = torch.randint(0, space.n_leaves, (1, 32, 32, 32))
    reference = marginal_loss(logits, codes, annotated, space)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = marginal_loss(logits, codes, annotated, space)
    for term in ("ce", "dice"):
        assert under[term].item() == pytest.approx(reference[term].item(), rel=1e-6), term


# ---------------------------------------------------------------------------------------------- exclusion
def test_exclusion_two_voxels_by_hand() -> None:
    space = two_leaf_space()
    logits = logits_from_probs([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    codes = torch.tensor([[0, 1]])
    annotated = torch.tensor([[True, True, False]])
    # unannotated b: probability 0.3 on the annotated organ (voxel 1), total mass 0.6, |e_b| = 1
    assert exclusion_loss(logits, codes, annotated, space).item() == pytest.approx(
        2 * 0.3 / (1 + 0.6 + SMOOTH), abs=1e-5)


def test_exclusion_zero_only_when_unannotated_leaves_avoid_annotated_organs(space: LabelSpace) -> None:
    codes = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    codes[0, :2] = space.leaf_id("liver")
    annotated = torch.as_tensor(space.annotated_leaf_mask("liver")).unsqueeze(0)
    logits = torch.zeros(1, space.n_leaves, 4, 4, 4, requires_grad=True)
    with torch.no_grad():
        unannotated = (~annotated[0]).nonzero().flatten()
        logits[:, unannotated, :2] = -1e4  # zero probability on the liver voxels, free elsewhere
    zero = exclusion_loss(logits, codes, annotated, space)
    assert zero.item() == 0.0
    leaking = logits.detach().clone().requires_grad_(True)
    with torch.no_grad():
        leaking[:, space.leaf_id("kidney"), 0, 0, 0] = 5.0
    positive = exclusion_loss(leaking, codes, annotated, space)
    assert positive.item() > 0.0
    positive.backward()
    assert leaking.grad is not None and leaking.grad[0, space.leaf_id("kidney"), 0, 0, 0] > 0
    # a fully labelled sample has nothing to exclude
    assert exclusion_loss(leaking, codes, torch.ones_like(annotated), space).item() == 0.0


def test_marginal_module_validates_and_adds_exclusion(space: LabelSpace) -> None:
    with pytest.raises(ValueError, match="ce_weight must be >= 0"):
        MarginalLoss(space, ce_weight=-1.0)
    with pytest.raises(ValueError, match="at least one of ce_weight, dice_weight, exclusion_weight"):
        MarginalLoss(space, ce_weight=0.0, dice_weight=0.0, exclusion_weight=0.0)
    loss = MarginalLoss(space, exclusion_weight=0.5)
    codes = torch.zeros(1, 3, 3, 3, dtype=torch.long)
    codes[0, 1] = space.leaf_id("spleen")
    annotated = torch.as_tensor(space.annotated_leaf_mask("spleen")).unsqueeze(0)
    terms = loss(torch.randn(1, space.n_leaves, 3, 3, 3), codes, annotated)
    assert set(terms) == {"ce", "dice", "exclusion"} and terms["exclusion"].item() > 0
    assert set(MarginalLoss(space)(torch.randn(1, space.n_leaves, 3, 3, 3), codes, annotated)) == {"ce", "dice"}


# ---------------------------------------------------------------------------------------------- focal
def test_focal_two_voxels_by_hand() -> None:
    logits = logits_from_probs([[0.8, 0.2], [0.4, 0.6]])
    targets = torch.tensor([[0, 1]])
    terms = [0.2 ** 2 * -math.log(0.8), 0.4 ** 2 * -math.log(0.6)]
    assert focal_loss(logits, targets).item() == pytest.approx(sum(terms) / 2, abs=1e-6)
    weights = torch.tensor([1.0, 3.0])
    assert focal_loss(logits, targets, class_weights=weights).item() == pytest.approx(
        (terms[0] + 3 * terms[1]) / 2, abs=1e-6)
    ignore = torch.tensor([[False, True]])
    assert focal_loss(logits, targets, ignore_mask=ignore).item() == pytest.approx(terms[0], abs=1e-6)
    assert focal_loss(logits, targets, ignore_mask=torch.ones_like(ignore)).item() == 0.0
    ce = torch.nn.functional.cross_entropy(logits, targets).item()
    assert focal_loss(logits, targets, gamma=0.0).item() == pytest.approx(ce, abs=1e-6)


def test_inverse_frequency_weights() -> None:
    targets = torch.tensor([[0, 0, 0, 1]])
    weights = inverse_frequency_weights(targets, 3)
    assert weights.tolist() == pytest.approx([4 / 6, 4 / 2, 0.0])
    assert float((weights * torch.tensor([3.0, 1.0, 0.0])).sum()) == pytest.approx(4.0)
    ignore = torch.tensor([[True, True, False, False]])
    assert inverse_frequency_weights(targets, 3, ignore).tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_focal_module_rejects_invalid_options() -> None:
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="class_weights must be a 1-D tensor of non-negative"):
        FocalLoss(class_weights=torch.tensor([1.0, -1.0]))
    module = FocalLoss(class_weights=torch.tensor([1.0, 2.0]))
    assert module(torch.randn(1, 2, 4), torch.tensor([[0, 1, 1, 0]])).item() > 0
    with pytest.raises(ValueError, match="class_weights"):
        focal_loss(torch.randn(1, 2, 4), torch.tensor([[0, 1, 1, 0]]), class_weights=torch.ones(3))


# ---------------------------------------------------------------------------------------------- co-training
def test_soft_ce_value_region_and_gradients() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, 3, 4, requires_grad=True)
    target = torch.softmax(torch.randn(1, 3, 4), 1).requires_grad_(True)
    region = torch.tensor([[True, False, True, False]])
    loss = soft_ce(logits, target, region)
    log_p = torch.log_softmax(logits.detach(), 1)
    expected = -(target.detach() * log_p).sum(1)[region].mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert target.grad is None  # detached inside: no gradient into the teacher
    assert logits.grad is not None
    assert torch.all(logits.grad[..., ~region[0]] == 0)
    assert torch.all(logits.grad[..., region[0]].abs().sum(0) > 0)
    empty = soft_ce(logits, target, torch.zeros_like(region))
    assert empty.item() == 0.0


@pytest.mark.parametrize("gamma,weighted,soft,layout", [
    (2.0, False, True, "channels_last"), (2.0, True, True, "contiguous"), (0.0, False, True, "channels_last"),
    (2.0, False, False, "channels_last"), (1.5, True, "empty", "contiguous")])
def test_the_fused_cotraining_terms_equal_focal_dice_and_soft_ce(gamma: float, weighted: bool, soft: bool | str,
                                                                 layout: str) -> None:
    """cotraining_terms computes one network's co-training terms from one softmax with a written-out
    gradient: the same values and gradients as focal_loss + soft_dice_loss(softmax, one-hot) + soft_ce, with
    class weights or without, gamma 0 (plain CE), no soft target, an empty region; the gradient comes back in
    the logits' own layout."""
    torch.manual_seed(4)
    shape, n = (2, 6, 5, 4, 3), 6
    base = torch.randn(shape) * 2
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last_3d)
    targets = torch.randint(0, n, (2, 5, 4, 3))
    targets[1] = torch.where(targets[1] == 3, torch.zeros_like(targets[1]), targets[1])  # a leaf absent in one
    weights = torch.rand(n) + 0.1 if weighted else None
    q = torch.softmax(torch.randn(shape), 1)
    region = torch.rand(2, 5, 4, 3) > 0.5
    if soft == "empty":
        region = torch.zeros_like(region)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    fused = cotraining_terms(a, targets, q if soft else None, region if soft else None, gamma=gamma,
                             class_weights=weights)
    onehot = F.one_hot(targets, n).movedim(-1, 1).float()
    ref = {"focal": focal_loss(b, targets, gamma=gamma, class_weights=weights),
           "dice": soft_dice_loss(torch.softmax(b, 1), onehot),
           "soft": soft_ce(b, q, region) if soft else torch.zeros(())}
    for key in ("focal", "dice", "soft"):
        assert fused[key].item() == pytest.approx(ref[key].item(), rel=1e-5, abs=1e-7), key
    mix = (0.7, 1.3, 0.4)  # each term's own gradient, weighted as a step weighs them
    sum(w * fused[k] for w, k in zip(mix, ("focal", "dice", "soft"), strict=True)).backward()
    sum(w * ref[k] for w, k in zip(mix, ("focal", "dice", "soft"), strict=True)).backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    assert a.grad.is_contiguous(memory_format=torch.channels_last_3d) == (layout == "channels_last")
    if soft is True:  # the soft term alone reaches only the region's voxels
        c = base.clone().requires_grad_(True)
        cotraining_terms(c, targets, q, region, gamma=gamma)["soft"].backward()
        assert c.grad is not None and torch.all(c.grad.movedim(1, -1)[~region] == 0)
        assert c.grad.movedim(1, -1)[region].abs().sum() > 0
    with pytest.raises(ValueError, match="region is required with target_probs"):
        cotraining_terms(a, targets, q)


def test_the_per_code_sums_stay_exact_over_a_large_confident_background(space: LabelSpace) -> None:
    """The fused losses sum each (sample, leaf) over the voxels one at a time (scatter_add_); in float32 a
    background sum past about 2^20 voxels rounded each p near 1 to the float's step, so the Dice of a large
    patch came out biased (helper-127: a background term of the wrong sign at 128^3). Against float64."""
    torch.manual_seed(5)
    n, size = space.n_leaves, (1, 112, 112, 96)  # 1.2 M voxels, most of them background at p ~ 0.999
    logits = torch.randn((size[0], n, *size[1:])) * 0.5
    logits[:, 0] += 9.0
    targets = torch.zeros(size, dtype=torch.long)
    targets[:, :10, :10] = space.leaf_id("liver")
    fused = cotraining_terms(logits, targets)["dice"]
    exact = soft_dice_loss(torch.softmax(logits.double(), 1), F.one_hot(targets, n).movedim(-1, 1).double())
    assert fused.item() == pytest.approx(exact.item(), rel=1e-6)
    annotated = torch.ones(1, n, dtype=torch.bool)
    marginal = marginal_loss(logits, targets, annotated, space)["dice"]
    assert marginal.item() == pytest.approx(marginal_loss(logits.double(), targets, annotated, space)["dice"].item(),
                                            rel=1e-6)
    from unionseg.losses._common import sum_dtype

    # float64 sums everywhere but on Apple's MPS, which has none (a training there would stop in the loss)
    assert sum_dtype(torch.device("cpu")) == torch.float64 and sum_dtype(torch.device("mps")) == torch.float32


def test_sigmoid_rampup() -> None:
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    with pytest.raises(ValueError, match="rampup_steps must be >= 0"):
        sigmoid_rampup(3, -1)


# ---------------------------------------------------------------------------------------------- DoDNet sigmoid
def test_masked_sigmoid_zero_gradient_on_masked_channels() -> None:
    torch.manual_seed(4)
    logits = torch.randn(2, 2, 5, requires_grad=True)
    targets = (torch.rand(2, 2, 5) > 0.5).float()
    mask = torch.tensor([[True, False], [True, True]])
    terms = masked_sigmoid_dice_bce(logits, targets, mask)
    (terms["dice"] + terms["bce"]).backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[0, 1] == 0)
    assert torch.all(logits.grad[mask].abs() > 0)
    # the masked channel's values do not matter
    changed = logits.detach().clone()
    changed[0, 1] = 100.0
    again = masked_sigmoid_dice_bce(changed, targets, mask)
    assert again["bce"].item() == pytest.approx(terms["bce"].item(), abs=1e-6)
    assert again["dice"].item() == pytest.approx(terms["dice"].item(), abs=1e-6)
    none = masked_sigmoid_dice_bce(logits, targets, torch.zeros_like(mask))
    assert none["dice"].item() == 0.0 and none["bce"].item() == 0.0


def test_masked_sigmoid_value_by_hand() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # sigmoid 0.5, 0.75
    targets = torch.tensor([[[0.0, 1.0]]])
    terms = masked_sigmoid_dice_bce(logits, targets, torch.tensor([[True]]))
    assert terms["bce"].item() == pytest.approx((-math.log(0.5) - math.log(0.75)) / 2, abs=1e-6)
    assert terms["dice"].item() == pytest.approx(1 - dice(0.75, 2.25), abs=1e-6)
    with pytest.raises(ValueError, match="dice_weight and bce_weight cannot both be 0"):
        MaskedSigmoidDiceBCE(dice_weight=0.0, bce_weight=0.0)
    assert MaskedSigmoidDiceBCE(bce_weight=0.0)(logits, targets, torch.tensor([[True]]))["bce"].item() == 0.0


def test_task_targets(space: LabelSpace) -> None:
    keys = [["region:liver", "liver_tumour"], ["region:spleen"]]
    codes = torch.zeros(3, 2, 2, dtype=torch.long)
    codes[0, 0, 0] = space.leaf_id("liver")
    codes[0, 0, 1] = space.leaf_id("liver_tumour")
    codes[1, 1, 1] = space.leaf_id("spleen")
    codes[2, 0, 0] = space.code("region:liver")  # organ known, tumour unknown
    targets, mask = task_targets(codes, torch.tensor([0, 1, 0]), keys, space)
    assert targets.shape == (3, 2, 2, 2)
    assert targets[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]  # region covers organ and tumour
    assert targets[0, 1].tolist() == [[0.0, 1.0], [0.0, 0.0]]  # the leaf covers the tumour only
    assert targets[1, 0].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert targets[2, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]  # the region code lies in the region
    assert mask.tolist() == [[True, True], [True, False], [True, False]]  # missing and ambiguous channels
    with pytest.raises(ValueError, match="task_ids"):
        task_targets(codes, torch.tensor([0, 2, 0]), keys, space)
    kept = task_channel_tables(keys, space)  # tables a caller keeps (DoDNet, per device) give the same
    again = task_targets(codes, torch.tensor([0, 1, 0]), keys, space, tables=kept)
    assert torch.equal(again[0], targets) and torch.equal(again[1], mask)


def test_cross_task_negatives_by_hand(space: LabelSpace) -> None:
    """Other tasks' channels learn 0 where this sample's labels show a disjoint structure; the own task,
    background voxels and overlapping keys are never penalised."""
    keys = [["region:liver", "liver_tumour"], ["region:kidney", "kidney_tumour"], ["region:kidney"]]
    table = cross_task_negative_table(keys, space)
    kidney_code, liver = space.code("region:kidney"), space.leaf_id("liver")
    assert not table[:, :, 0].any()  # background may hide an unannotated organ
    assert table[0, 0, kidney_code] and table[0, 1, kidney_code]  # a kidney is not liver, nor liver tumour
    assert not table[1, 0, kidney_code] and not table[2, 0, kidney_code]  # a kidney may be a kidney
    assert not table[1, 1, kidney_code]  # the kidney region may hold the kidney tumour
    assert not table[2, 1].any()  # task 2 has no second channel
    assert table[1, 1, liver] and not table[0, 0, liver]

    codes = torch.zeros(1, 3, dtype=torch.long)
    codes[0, :2] = liver  # voxels 0 and 1: liver (from the liver task's sample), voxel 2: background
    logits = torch.zeros(1, 3, 2, 3, requires_grad=True)
    with torch.no_grad():
        logits[0, 1, 0, 0], logits[0, 1, 0, 1] = 2.0, -1.0  # task 1's kidney channel on the two liver voxels
    loss = cross_task_negative_bce(logits, codes, torch.tensor([0]), keys, space)
    # pairs with negatives: (task 1, both channels), (task 2, region:kidney); each pair's mean over its
    # two voxels, then the mean over the three pairs (not one mean over all six voxels)
    sp = F.softplus
    expected = ((sp(torch.tensor(2.0)) + sp(torch.tensor(-1.0))) / 2 + 2 * sp(torch.tensor(0.0))) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[0, 0].abs().sum() == 0  # the own task
    assert logits.grad[0, :, :, 2].abs().sum() == 0  # the background voxel
    assert logits.grad[0, 1, 0, 0] > 0 and logits.grad[0, 2, 0, 0] > 0  # twin: the negatives push down
    # confident negatives cost almost nothing; a sample with only background costs exactly 0
    low = torch.full((1, 3, 2, 3), -20.0)
    assert cross_task_negative_bce(low, codes, torch.tensor([0]), keys, space).item() < 1e-8
    assert cross_task_negative_bce(logits, torch.zeros_like(codes), torch.tensor([0]), keys, space).item() == 0.0
    with pytest.raises(ValueError, match="T=3"):
        cross_task_negative_bce(logits[:, :2], codes, torch.tensor([0]), keys, space)


def _merge_and_leaf_softmax_agree(logits: torch.Tensor, keys: list[str], space: LabelSpace) -> torch.Tensor:
    """Assert that the leaf softmax's group mass, then its largest leaf inside that group, is the merge's
    label at every voxel; return the softmax."""
    from unionseg.outputs import sigmoid_to_groups

    leaf = sigmoid_leaf_logits(logits, keys, space)
    assert leaf.shape == (logits.shape[0], space.n_leaves, *logits.shape[2:]) and leaf.dtype == torch.float32
    probs = torch.softmax(leaf, 1)
    group_of = torch.zeros(space.n_leaves, dtype=torch.long)  # 0 = background, 1 + g = group g
    for grp in space.groups:
        group_of[list(grp.leaf_ids)] = grp.index + 1
    for b in range(logits.shape[0]):
        regions, parts = sigmoid_to_groups(torch.sigmoid(logits[b]), keys, space)
        merged = merge(regions, parts, space, organ_leaf_probs=None, threshold=0.5).long()
        mass = torch.zeros(1 + space.n_groups, *logits.shape[2:]).index_add_(0, group_of, probs[b])
        assert torch.equal(mass.argmax(0), group_of[merged])
        inside = torch.where(group_of.view(-1, 1, 1) == group_of[merged][None], probs[b], -1.0)
        assert torch.equal(inside.argmax(0), merged)
    return probs


def test_sigmoid_leaf_logits_decide_as_the_merge(space: LabelSpace) -> None:
    """The softmax over the leaf logits puts the most mass on the group (or background) the merge picks, and
    inside that group on the leaf the merge picks; a group's mass is e^z / (1 + sum e^z) of its largest
    channel logit, tumour channels included; a group no channel covers gets nothing."""
    keys = ["region:liver", "liver_tumour", "region:kidney", "kidney_tumour", "region:kidney", "region:spleen"]
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, len(keys), 7, 6)
    probs = _merge_and_leaf_softmax_agree(logits, keys, space)
    z = torch.maximum(logits[:, 2], logits[:, 4]).maximum(logits[:, 3])  # kidney: its region channels and its tumour
    liver = logits[:, :2].amax(1)
    spleen = logits[:, 5]
    expected = z.exp() / (1 + z.exp() + liver.exp() + spleen.exp())
    kidney = space.groups[[g.name for g in space.groups].index("kidney")]
    assert torch.allclose(probs[:, list(kidney.leaf_ids)].sum(1), expected, atol=1e-5)
    # inside the kidney: organ : tumour = 1 : e^y
    share = probs[:, kidney.part_ids[0]] / probs[:, list(kidney.leaf_ids)].sum(1)
    assert torch.allclose(share, torch.sigmoid(logits[:, 3]), atol=1e-5)
    pancreas = space.groups[[g.name for g in space.groups].index("pancreas")]
    assert probs[:, list(pancreas.leaf_ids)].max() < 1e-30  # no channel: the merge gives it nothing
    with pytest.raises(ValueError, match="keys name"):
        sigmoid_leaf_logits(logits[:, :3], keys, space)


def test_sigmoid_leaf_logits_with_two_parts_and_a_tumour_only_task() -> None:
    """Several parts in one group (a key repeated by two tasks), and a task that has only a tumour channel:
    the decision is still the merge's, and the leaf softmax has a gradient on every channel."""
    space = LabelSpace([Leaf("organ"), Leaf("cyst", "organ"), Leaf("tumour", "organ"), Leaf("other")])
    torch.manual_seed(1)
    for keys in (["region:organ", "cyst", "tumour", "tumour", "region:other"], ["tumour"]):
        logits = (3 * torch.randn(2, len(keys), 6, 5)).requires_grad_()
        probs = _merge_and_leaf_softmax_agree(logits, keys, space)
        (probs * torch.rand_like(probs)).sum().backward()
        assert logits.grad is not None and (logits.grad.abs().flatten(2).sum(-1) > 0).all()
    organ = space.groups[0]
    assert probs[:, space.leaf_id("cyst")].max() < 1e-30  # the tumour-only task: no cyst channel
    assert torch.allclose(probs[:, list(organ.leaf_ids)].sum(1), torch.sigmoid(logits[:, 0]), atol=1e-5)


# ---------------------------------------------------------------------------------------------- distillation
def test_map_to_teacher_sums_the_rest() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(1, 4, 1)
    mapped = map_to_teacher(probs, [3, 1])
    assert mapped[0, :, 0].tolist() == pytest.approx([0.1 + 0.3, 0.4, 0.2])
    with pytest.raises(ValueError, match="must be foreground leaf ids"):
        map_to_teacher(probs, [0, 1])
    with pytest.raises(ValueError, match="has duplicates"):
        map_to_teacher(probs, [1, 1])


def test_kd_kl_zero_when_student_matches_and_positive_otherwise() -> None:
    torch.manual_seed(5)
    logits = torch.randn(1, 3, 6, requires_grad=True)
    teacher = torch.softmax(logits.detach(), 1).clone().requires_grad_(True)  # teacher over leaves 1, 2
    region = torch.ones(1, 6, dtype=torch.bool)
    for tau in (1.0, 2.0):
        assert kd_kl(logits, teacher, [1, 2], region, tau).item() == pytest.approx(0.0, abs=1e-5)
    other = torch.softmax(torch.randn(1, 3, 6), 1)
    loss = kd_kl(logits, other.requires_grad_(True), [1, 2], region, tau=2.0)
    assert loss.item() > 0.01
    loss.backward()
    assert other.grad is None and logits.grad is not None and logits.grad.abs().sum() > 0
    assert kd_kl(logits, other, [1, 2], torch.zeros_like(region), 2.0).item() == 0.0


def test_kd_kl_finite_when_student_mass_underflows() -> None:
    logits = torch.tensor([[[0.0], [0.0], [300.0]]], requires_grad=True)  # leaf 2 takes everything
    teacher = torch.tensor([[[0.9], [0.1]]])  # teacher over leaf 2 says background
    loss = kd_kl(logits, teacher, [2], torch.ones(1, 1, dtype=torch.bool), tau=1.0)
    assert torch.isfinite(loss) and loss.item() > 100
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_kd_kl_matches_kl_after_mapping() -> None:
    torch.manual_seed(6)
    logits = torch.randn(1, 4, 5)
    teacher = torch.softmax(torch.randn(1, 2, 5), 1)
    region = torch.tensor([[True, True, False, True, False]])
    # a float16 cache whose channels no longer sum to 1: tau = 1 takes a shortcut (renormalise) and tau = 2
    # another (the square roots renormalised) that must agree
    cached = (teacher * 0.97).half()
    cached[0, 1, 3] = 0.0  # inside the region; float16 caches underflow to 0: the eps floor (1e-8) applies
    for probs, tau in ((teacher, 2.0), (teacher, 1.0), (cached, 1.0), (cached, 0.5), (cached, 2.0), (cached, 3.0)):
        target = torch.softmax(probs.float().clamp_min(1e-8).log() / tau, 1)
        student = torch.softmax(map_to_teacher(torch.softmax(logits, 1), [2]).log() / tau, 1)  # map, then temper
        kl = (target * (target.log() - student.log())).sum(1)
        expected = tau ** 2 * kl[region].mean()
        assert kd_kl(logits, probs, [2], region, tau).item() == pytest.approx(expected.item(), rel=1e-4)


def test_kd_kl_sees_only_the_mapped_student() -> None:
    """DESIGN: q^j = map_j(q), then tempered. Students that differ only in how they split the teacher's
    merged background get the same loss at any temperature, and a student whose mapped distribution equals
    the teacher's untempered one gets 0 (tempering before mapping would give neither)."""
    teacher = torch.tensor([[[0.5], [0.5]]])  # teacher over leaf 1: background 0.5, organ 0.5
    region = torch.ones(1, 1, dtype=torch.bool)
    splits = [(0.25, 0.05), (0.15, 0.15), (0.05, 0.25)]  # leaf 0 and leaf 2 share the merged 0.3
    for tau in (1.0, 2.0, 0.5):
        losses = [kd_kl(torch.tensor([[[a], [0.7], [b]]]).log(), teacher, [1], region, tau).item() for a, b in splits]
        assert losses == pytest.approx([losses[0]] * 3, abs=1e-6)
        assert losses[0] > 0.01
        matched = [kd_kl(torch.tensor([[[a], [0.5], [0.5 - a]]]).log(), teacher, [1], region, tau).item()
                   for a in (0.1, 0.25, 0.4)]
        assert matched == pytest.approx([0.0] * 3, abs=1e-6)


def test_kd_regions_most_confident_teacher_wins() -> None:
    # 4 voxels; teacher A (1 leaf), teacher B (2 leaves)
    teacher_a = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1], [0.3, 0.7]]).T.unsqueeze(0)
    teacher_b = torch.tensor([[0.1, 0.5, 0.4], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.3, 0.4, 0.3]]).T.unsqueeze(0)
    (region_a, region_b), background = kd_regions([teacher_a, teacher_b])
    # voxel 0: both claim, B more confident (0.9 vs 0.8); voxel 1: only A; voxel 2: nobody;
    # voxel 3: both claim with equal confidence 0.7 -> the first teacher keeps it
    assert region_a[0].tolist() == [False, True, False, True]
    assert region_b[0].tolist() == [True, False, False, False]
    assert background[0].tolist() == [False, False, True, False]


def test_kd_regions_use_the_merge_function_of_each_teacher() -> None:
    """Contract 3: a teacher claims a voxel where its merge gives foreground, an organ group's probability
    (organ and tumour together) above 0.5; the per-leaf argmax gave an organ-and-tumour voxel at
    (bg .40, liver .35, tumour .25) to nobody. Two organs of one teacher are two groups."""
    liver = torch.tensor([[0.40, 0.35, 0.25], [0.55, 0.30, 0.15], [0.30, 0.45, 0.25]]).T.unsqueeze(0)
    (region,), background = kd_regions([liver], [[[1, 2]]])
    assert region[0].tolist() == [True, False, True] and background[0].tolist() == [False, True, False]
    (same,), _ = kd_regions([liver])  # default: one group of all foreground channels
    assert torch.equal(same, region)
    two_organs = liver.clone()  # channels 1 and 2 as two organs: 0.45 is no majority
    (region,), background = kd_regions([two_organs], [[[1], [2]]])
    assert region[0].tolist() == [False, False, False] and background[0].all()
    with pytest.raises(ValueError, match="2 group lists for 1 teachers"):
        kd_regions([liver], [[[1, 2]], [[1]]])


def test_product_of_experts_and_logit_loss() -> None:
    torch.manual_seed(7)
    teacher_a = torch.softmax(torch.randn(2, 2, 3, 3), 1)
    teacher_b = torch.softmax(torch.randn(2, 3, 3, 3), 1)
    merged = product_of_experts_background([teacher_a, teacher_b], [[1], [2, 3]], 4)
    assert merged.shape == (2, 4, 3, 3)
    assert torch.allclose(merged.sum(1), torch.ones(2, 3, 3), atol=1e-6)
    expected = teacher_a[:, 1] * teacher_b[:, 0]
    ratio = merged[:, 1] / merged[:, 0]
    assert torch.allclose(ratio, expected / (teacher_a[:, 0] * teacher_b[:, 0]), rtol=1e-4)
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    for poe in (False, True):
        loss = ms_kd_logit_loss(logits, [teacher_a, teacher_b], [[1], [2, 3]], tau=2.0, poe_background=poe)
        assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_logit_loss_is_the_sum_of_per_teacher_kl_terms() -> None:
    """The fused multi-teacher loss equals the definition: sum_j kd_kl over R_j U R_bg (plus the PoE term
    over R_bg with the option), value and gradient; and a teacher tied between background and an organ
    does not claim the voxel (argmax convention)."""
    torch.manual_seed(11)
    leaves = [[1, 2], [3, 4], [5]]
    teachers = [torch.softmax(3 * torch.randn(2, 1 + len(k), 5, 4, 3), 1) for k in leaves]
    logits = torch.randn(2, 6, 5, 4, 3, requires_grad=True)
    regions, background = kd_regions(teachers)
    for poe, tau in ((False, 2.0), (True, 2.0), (False, 1.0), (True, 1.0)):  # 2: MS-KD's default
        expected = sum(kd_kl(logits, t, k, r if poe else r | background, tau=tau)
                       for t, k, r in zip(teachers, leaves, regions, strict=True))
        if poe:
            merged = product_of_experts_background(teachers, leaves, 6)
            expected = expected + kd_kl(logits, merged, [1, 2, 3, 4, 5], background, tau=tau)
        fused = ms_kd_logit_loss(logits, teachers, leaves, tau=tau, poe_background=poe)
        assert fused.item() == pytest.approx(float(expected.detach()), rel=1e-5)
        (g_expected,) = torch.autograd.grad(expected, logits)
        (g_fused,) = torch.autograd.grad(fused, logits)
        assert torch.allclose(g_fused, g_expected, atol=1e-7)
        assert g_fused.abs().sum() > 0
    tied = torch.tensor([[0.5, 0.5], [0.4, 0.6]]).T.reshape(1, 2, 2)
    (region,), bg = kd_regions([tied])
    assert region[0].tolist() == [False, True] and bg[0].tolist() == [True, False]


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_logit_loss_gradient_where_the_merged_mass_underflows(channels_last: bool) -> None:
    """The fused term's hand-written gradient equals autograd through the per-teacher definition, also where
    a teacher's merged "everything else" mass underflows (there the loss reads log q_0 instead)."""
    torch.manual_seed(12)
    leaves = [[1, 2], [3], [4, 5]]
    teachers = [torch.softmax(2 * torch.randn(2, 1 + len(k), 4, 3, 3), 1) for k in leaves]
    for teacher in teachers:  # every teacher says background at the first voxel: all of them supervise it
        teacher[0, :, 0, 0, 0] = 0.0
        teacher[0, 0, 0, 0, 0] = 1.0
    logits = torch.randn(2, 6, 4, 3, 3)
    logits[0, :, 0, 0, 0] = -60.0
    logits[0, 3, 0, 0, 0] = 60.0  # teacher 1's leaf holds everything: its merged mass is e^-120
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last_3d)
    logits.requires_grad_(True)
    regions, background = kd_regions(teachers)
    for tau in (1.0, 2.0, 0.5):
        expected = sum(kd_kl(logits, t, k, r | background, tau=tau)
                       for t, k, r in zip(teachers, leaves, regions, strict=True))
        fused = ms_kd_logit_loss(logits, teachers, leaves, tau=tau)
        assert fused.item() == pytest.approx(float(expected.detach()), rel=1e-5)
        (g_expected,) = torch.autograd.grad(expected, logits)
        (g_fused,) = torch.autograd.grad(fused, logits)
        torch.testing.assert_close(g_fused, g_expected, rtol=1e-4, atol=1e-8)
        assert g_fused[0, 0, 0, 0, 0] != 0  # the underflowing teacher's merged term lands on leaf 0


@pytest.mark.parametrize("tau", [0.01, 0.05])
def test_fused_logit_loss_stays_finite_and_equal_to_the_loop_at_small_tau(tau: float) -> None:
    """A small temperature makes ``q^(1/tau)`` underflow for every leaf; the fused normaliser must still give
    the per-teacher loop's value (it once returned NaN at tau = 0.01)."""
    torch.manual_seed(3)
    leaves = [[1, 2], [3], [4, 5]]
    background_bias = torch.tensor([2.0, 0.0, 0.0]).reshape(1, 3, 1, 1, 1)
    teachers = [torch.softmax(2 * torch.randn(1, 1 + len(k), 4, 3, 2) + background_bias[:, :1 + len(k)], 1)
                for k in leaves]
    regions, background = kd_regions(teachers)
    assert background.any() and not background.all() and all(r.any() for r in regions)
    for scale in (0.0, 1.0):
        logits = (scale * torch.randn(1, 6, 4, 3, 2)).requires_grad_(True)
        expected = sum(kd_kl(logits, t, k, r, tau=tau) for t, k, r in zip(teachers, leaves, regions, strict=True))
        expected = expected + kd_kl(logits, product_of_experts_background(teachers, leaves, 6), [1, 2, 3, 4, 5],
                                    background, tau=tau)
        fused = ms_kd_logit_loss(logits, teachers, leaves, tau=tau, poe_background=True)
        assert torch.isfinite(fused)
        assert fused.item() == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-6)
        (g_fused,) = torch.autograd.grad(fused, logits)
        assert torch.isfinite(g_fused).all()


def test_region_affinity_invariances_and_gradients() -> None:
    torch.manual_seed(8)
    student = torch.randn(2, 4, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 6, 3, 4, requires_grad=True)
    regions = [torch.rand(2, 3, 4) > 0.5, torch.rand(2, 3, 4) > 0.5]
    loss = region_affinity_loss(student, teacher, regions)  # widths 4 and 6
    assert loss.item() > 0
    permuted = region_affinity_loss(student[:, [2, 0, 3, 1]], teacher[:, [5, 4, 3, 2, 1, 0]], regions)
    assert permuted.item() == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0
    same = region_affinity_loss(student, student.detach() * 3.0, regions)
    assert same.item() == pytest.approx(0.0, abs=1e-10)
    empty = [torch.zeros(2, 3, 4, dtype=torch.bool)]
    assert region_affinity_loss(student, teacher, empty).item() == 0.0


def test_downsample_mask_modes_and_feature_loss() -> None:
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    assert downsample_mask(mask, (2, 2, 2), "max")[0, 0, 0, 0]
    assert downsample_mask(mask, (2, 2, 2), "max").sum() == 1
    assert downsample_mask(mask, (2, 2, 2), "nearest")[0, 0, 0, 0]  # voxel (0,0,0) is the one nearest samples
    # a voxel nearest sampling skips (source indices 0 and 2 along each axis): max keeps it, nearest drops it
    # (the corner voxel above cannot tell the two modes apart; helper-123)
    odd = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    odd[0, 1, 1, 1] = True
    assert downsample_mask(odd, (2, 2, 2), "nearest").sum() == 0
    assert downsample_mask(odd, (2, 2, 2), "max")[0, 0, 0, 0] and downsample_mask(odd, (2, 2, 2), "max").sum() == 1
    # a partition stays a partition under nearest: every coarse voxel in exactly one of two complementary masks
    half = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    half[0, :, :2] = True
    both = downsample_mask(half, (2, 2, 2), "nearest").int() + downsample_mask(~half, (2, 2, 2), "nearest").int()
    assert torch.equal(both, torch.ones(1, 2, 2, 2, dtype=torch.int))
    with pytest.raises(ValueError, match="mode"):
        downsample_mask(mask, (2, 2, 2), "mean")
    torch.manual_seed(9)
    teachers = [torch.softmax(torch.randn(1, 2, 4, 4, 4), 1), torch.softmax(torch.randn(1, 2, 4, 4, 4), 1)]
    regions, background = kd_regions(teachers)
    student_feat = torch.randn(1, 5, 2, 2, 2, requires_grad=True)
    feats = [torch.randn(1, 3, 2, 2, 2), torch.randn(1, 7, 2, 2, 2)]
    loss = ms_kd_feature_loss(student_feat, feats, regions, background, mode="max")
    assert torch.isfinite(loss) and loss.item() > 0


def test_the_batched_feature_term_equals_the_loop_over_teachers() -> None:
    """ms_kd_feature_loss stacks the teachers of one width (the student's affinities to every region once):
    the same value and gradient as the sum of region_affinity_loss over teachers, empty regions included;
    teachers of different widths take the loop."""
    torch.manual_seed(0)
    size = (4, 4, 4)
    for shift in (0.0, -30.0):  # -30: every teacher says background, so every R_j is empty
        teachers = [torch.softmax(torch.randn(2, k + 1, 8, 8, 8) * 3 + shift * (torch.arange(k + 1) > 0).view(1, -1, 1, 1, 1), 1)
                    for k in (2, 2, 1)]
        regions, background = kd_regions(teachers)
        assert any(bool(r.any()) for r in regions) is (shift == 0.0)
        student = torch.randn(2, 5, *size, requires_grad=True)
        feats = [torch.randn(2, 6, *size) for _ in teachers]
        fused = ms_kd_feature_loss(student, feats, regions, background)
        (fused_grad,) = torch.autograd.grad(fused, student)
        loop = sum(region_affinity_loss(student, f, [downsample_mask(r, size), downsample_mask(background, size)])
                   for f, r in zip(feats, regions, strict=True))
        (loop_grad,) = torch.autograd.grad(loop, student)
        assert fused.item() == pytest.approx(float(loop), rel=1e-5) and fused.item() > 0
        torch.testing.assert_close(fused_grad, loop_grad, rtol=1e-4, atol=1e-7)
    mixed = [torch.randn(2, 6, *size), torch.randn(2, 3, *size), torch.randn(2, 6, *size)]
    assert ms_kd_feature_loss(student, mixed, regions, background).item() == pytest.approx(
        sum(float(region_affinity_loss(student, f, [downsample_mask(r, size), downsample_mask(background, size)]))
            for f, r in zip(mixed, regions, strict=True)), rel=1e-5)


def test_the_marginal_losss_tables_are_made_once_per_device_and_outlive_inference_mode() -> None:
    """The label space's tables were built from host lists at every call: on a GPU, each was a copy that made
    the CPU wait for the GPU mid-step (helper-111). They are made once per space and device, and a first
    call under inference_mode does not leave inference tensors that a training step cannot use."""
    from conftest import make_space
    from unionseg.losses.partial import _code_leaf

    space = make_space()
    torch.manual_seed(0)
    codes = torch.randint(0, space.n_codes, (2, 4, 4, 4))
    annotated = torch.zeros(2, space.n_leaves, dtype=torch.bool)
    annotated[:, :3] = True
    with torch.inference_mode():
        marginal_loss(torch.randn(2, space.n_leaves, 4, 4, 4), codes, annotated, space)
    table = _code_leaf(space, torch.device("cpu"))
    assert table is _code_leaf(space, torch.device("cpu")) and not table.is_inference()
    logits = torch.randn(2, space.n_leaves, 4, 4, 4, requires_grad=True)
    terms = marginal_loss(logits, codes, annotated, space)
    (terms["ce"] + terms["dice"]).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_constant_index_tensors_are_made_once_per_device() -> None:
    """MS-KD's regions and logit term indexed with Python lists: a host-to-GPU copy per teacher and step
    (helper-111). The index tensors are made once, outside inference mode, and read only."""
    from unionseg.losses._common import index_tensor

    with torch.inference_mode():
        first = index_tensor([1, 2], torch.device("cpu"))
    assert first is index_tensor((1, 2), torch.device("cpu")) and not first.is_inference()
    assert first.tolist() == [1, 2] and first.dtype == torch.long
