"""Partial-label losses: the marginal loss and the exclusion loss.

Shi, Xiao, Chen and Zhou, "Marginal loss and exclusion loss for partially supervised multi-organ
segmentation", Medical Image Analysis 70 (2021) 101979 (arXiv:2007.03868).

For a sample of dataset m a label 0 means "background or any leaf outside A_m". The marginal loss sums the
probabilities of background and of every unannotated leaf into one merged background and applies CE + Dice
to the merged distribution. We implement it through :func:`unionseg.labels.admissible` (the set of leaves a
voxel may belong to), which also covers region codes (a voxel known to lie in an organ region whose leaf is
unknown): the voxel's CE is ``-log sum_{c in admissible} p_c``. The exclusion loss uses the complementary
fact: a leaf that is not admissible at a voxel must not be predicted there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unionseg.labels import LabelSpace, admissible
from unionseg.losses._common import (
    check_channels_first,
    check_positive,
    check_spatial,
    float32_island,
)
from unionseg.losses.dice import dice_from_sums


def _check_partial_inputs(logits: Tensor, codes: Tensor, annotated: Tensor, space: LabelSpace) -> None:
    check_channels_first("logits", logits)
    check_spatial("codes", codes, logits)
    if logits.shape[1] != space.n_leaves:
        raise ValueError(f"logits have {logits.shape[1]} channels, the label space has {space.n_leaves} leaves")
    if tuple(annotated.shape) != (logits.shape[0], space.n_leaves):
        raise ValueError(f"annotated must be (B, L) = {(logits.shape[0], space.n_leaves)}, "
                         f"got {tuple(annotated.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")


def merged_channels(annotated: Tensor, space: LabelSpace) -> Tensor:
    """The leaf sets of the marginal-Dice channels of every sample.

    Channel 0 is the merged background (background plus every unannotated leaf), channel ``c`` in
    ``1..L-1`` is leaf ``c`` alone, channel ``L + g`` is the region of group ``g`` (all its leaves).

    Args:
        annotated: (B, L) bool annotated-leaf mask.

    Returns:
        (B, L + G, L) bool membership.
    """
    batch, n_leaves = annotated.shape
    device = annotated.device
    leaf_sets = torch.eye(n_leaves, dtype=torch.bool, device=device).repeat(batch, 1, 1)
    leaf_sets[:, 0, :] = ~annotated.bool()
    leaf_sets[:, 0, 0] = True
    region_sets = torch.zeros(space.n_groups, n_leaves, dtype=torch.bool, device=device)
    for grp in space.groups:
        region_sets[grp.index, list(grp.leaf_ids)] = True
    return torch.cat([leaf_sets, region_sets.expand(batch, -1, -1)], dim=1)


def _code_admissible(annotated: Tensor, space: LabelSpace) -> Tensor:
    """(B, n_codes, L) bool: the admissible leaves of every code for every sample."""
    table = torch.as_tensor(space.code_leaf_matrix(), device=annotated.device)
    table = table.unsqueeze(0).repeat(annotated.shape[0], 1, 1)
    table[:, 0, :] |= ~annotated.bool()
    return table


def _codes_present(codes: Tensor, n_codes: int) -> Tensor:
    """(B, n_codes) bool: which codes occur in each sample."""
    flat = codes.reshape(codes.shape[0], -1).long()
    present = torch.zeros(codes.shape[0], n_codes, dtype=torch.bool, device=codes.device)
    return present.scatter_(1, flat, True)


def marginal_dice_targets(codes: Tensor, annotated: Tensor, space: LabelSpace) -> tuple[Tensor, Tensor, Tensor]:
    """Channel sets, targets and counted pairs of the marginal Dice.

    A channel k with leaf set S_k is **counted** for sample b when it is a candidate (the merged background
    always; leaf ``c`` when annotated; region ``g`` when the sample contains region code g and annotates the
    group's leaves) and its target is fully determined in the sample: no code present in the sample has an
    admissible set that straddles S_k (e.g. a region-coded voxel for a single leaf of that group: such leaf
    channels are dropped for that sample, the region channel supervises it, and CE still sees every voxel).
    The target is 1 where the voxel's admissible set lies inside S_k. With every leaf annotated and no region
    codes the channels reduce to the L leaves and the Dice to the plain per-leaf Dice.

    Args:
        codes: (B, *S) integer codes.
        annotated: (B, L) bool.

    Returns:
        ``(sets (B, K, L) bool, targets (B, K, V) float32 with V = prod(S), counted (B, K) bool)``.
    """
    batch = codes.shape[0]
    n_leaves = space.n_leaves
    sets = merged_channels(annotated, space)  # (B, K, L)
    code_adm = _code_admissible(annotated, space)  # (B, n_codes, L)
    inside = (code_adm.unsqueeze(2) & ~sets.unsqueeze(1)).any(-1).logical_not()  # (B, n_codes, K)
    touches = (code_adm.unsqueeze(2) & sets.unsqueeze(1)).any(-1)
    ambiguous = touches & ~inside
    present = _codes_present(codes, space.n_codes)  # (B, n_codes)
    candidate = torch.zeros(batch, sets.shape[1], dtype=torch.bool, device=codes.device)
    candidate[:, 0] = True
    candidate[:, 1:n_leaves] = annotated[:, 1:].bool()
    for grp in space.groups:
        candidate[:, n_leaves + grp.index] = present[:, n_leaves + grp.index] & \
            annotated[:, list(grp.leaf_ids)].bool().all(-1)
    counted = candidate & ~(ambiguous & present.unsqueeze(-1)).any(1)
    flat = codes.reshape(batch, -1).long()
    targets = inside[torch.arange(batch, device=codes.device).unsqueeze(1), flat]  # (B, V, K)
    return sets, targets.transpose(1, 2).float(), counted


def marginal_loss(
    logits: Tensor,
    codes: Tensor,
    annotated: Tensor,
    space: LabelSpace,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    smooth: float = 1e-5,
    batch_dice: bool = False,
) -> dict[str, Tensor]:
    """Marginal cross-entropy + marginal Dice (Shi et al., MedIA 2021).

    CE: for every voxel, ``-log sum_{c in adm} p_c = logsumexp(all logits) - logsumexp(admissible logits)``,
    mean over all voxels; ``adm`` comes from :func:`unionseg.labels.admissible` (code 0 -> background plus
    the sample's unannotated leaves; a leaf code -> that leaf; a region code -> the group's leaves).
    Dice: soft Dice between merged probabilities (sum over a channel's leaves) and the channel's mask, over
    the merged background, each annotated leaf and each region present as a region code; see
    :func:`marginal_dice_targets` for which channels count. With every leaf annotated this is exactly
    :func:`unionseg.losses.ce_dice_loss` (the naive / oracle loss).

    Args:
        logits: (B, L, *S) raw scores over all leaves.
        codes: (B, *S) integer codes (leaf ids ``0..L-1`` or region codes ``L + g``).
        annotated: (B, L) bool annotated-leaf mask per sample.
        space: the label space.
        dice_weight, ce_weight: multipliers (>= 0) applied to the returned terms.
        smooth: Dice smoothing (> 0); empty channels behave as in :func:`unionseg.losses.soft_dice_loss`.
        batch_dice: pool Dice sums over the batch per channel.

    Returns:
        ``{"ce": ..., "dice": ...}``, float32 scalars already multiplied by their weights.

    Raises:
        ValueError: shapes that do not match each other or the label space; negative weights.
    """
    _check_partial_inputs(logits, codes, annotated, space)
    check_positive("ce_weight", ce_weight, allow_zero=True)
    check_positive("dice_weight", dice_weight, allow_zero=True)
    check_positive("smooth", smooth)
    with float32_island(logits):
        x = logits.float()
        adm = admissible(codes, annotated, space)
        log_all = torch.logsumexp(x, dim=1)
        log_adm = torch.logsumexp(x.masked_fill(~adm, float("-inf")), dim=1)
        ce = (log_all - log_adm).mean()
        sets, targets, counted = marginal_dice_targets(codes, annotated, space)
        probs = torch.softmax(x, dim=1).flatten(2)  # (B, L, V)
        merged = torch.bmm(sets.float(), probs)  # (B, K, V)
        intersection = (merged * targets).sum(-1)
        denominator = merged.sum(-1) + targets.sum(-1)
        dice = dice_from_sums(intersection, denominator, counted, smooth, batch_dice)
    return {"ce": ce_weight * ce, "dice": dice_weight * dice}


def exclusion_loss(
    logits: Tensor,
    codes: Tensor,
    annotated: Tensor,
    space: LabelSpace,
    smooth: float = 1e-5,
) -> Tensor:
    """Exclusion Dice loss (Shi et al., MedIA 2021): unannotated leaves must not cover annotated organs.

    Organs do not overlap, so where the ground truth shows an annotated organ, every leaf this sample does
    not annotate is certainly absent. For each sample b and each unannotated leaf c >= 1 let
    ``e_c`` be the voxels where c is not admissible (the annotated foreground: leaf and region codes); the
    loss is the soft Dice overlap ``2 sum(e_c * p_c) / (sum e_c + sum p_c + smooth)``, to be minimised
    (the paper's exclusion Dice; no smoothing in the numerator, so the loss is exactly 0 when the
    unannotated leaves have zero probability on the annotated foreground). Averaged over the (b, c) pairs
    with a non-empty ``e_c``; 0 when there is none (e.g. fully labelled samples, or patches without
    annotated foreground).

    Args:
        logits: (B, L, *S) raw scores.
        codes: (B, *S) integer codes.
        annotated: (B, L) bool annotated-leaf mask.
        space: the label space.
        smooth: denominator smoothing (> 0).

    Returns:
        Scalar float32 in [0, 1).

    Raises:
        ValueError: shapes that do not match each other or the label space.
    """
    _check_partial_inputs(logits, codes, annotated, space)
    check_positive("smooth", smooth)
    with float32_island(logits):
        probs = torch.softmax(logits.float(), dim=1).flatten(2)  # (B, L, V)
        excluded = (~admissible(codes, annotated, space)).flatten(2).float()
        pairs = ~annotated.bool()
        pairs[:, 0] = False
        size = excluded.sum(-1)
        pairs = pairs & (size > 0)
        overlap = 2.0 * (probs * excluded).sum(-1) / (size + probs.sum(-1) + smooth)
        overlap = torch.where(pairs, overlap, torch.zeros_like(overlap))
        return overlap.sum() / pairs.sum().clamp_min(1).to(overlap.dtype)


class MarginalLoss(nn.Module):
    """Marginal CE + Dice plus an optional exclusion term (Shi et al., MedIA 2021), as a module.

    Args:
        space: the label space.
        ce_weight, dice_weight: weights of the marginal terms (>= 0).
        exclusion_weight: weight of :func:`exclusion_loss` (>= 0; 0 switches it off).
        smooth: Dice smoothing (> 0).
        batch_dice: pool Dice sums over the batch.

    Raises:
        ValueError: negative weights or ``smooth <= 0``; all weights zero.
    """

    def __init__(
        self,
        space: LabelSpace,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        exclusion_weight: float = 0.0,
        smooth: float = 1e-5,
        batch_dice: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("ce_weight", ce_weight), ("dice_weight", dice_weight),
                            ("exclusion_weight", exclusion_weight)):
            check_positive(name, value, allow_zero=True)
        check_positive("smooth", smooth)
        if ce_weight == dice_weight == exclusion_weight == 0:
            raise ValueError("MarginalLoss: at least one of ce_weight, dice_weight, exclusion_weight must be > 0")
        self.space = space
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.exclusion_weight = exclusion_weight
        self.smooth = smooth
        self.batch_dice = batch_dice

    def forward(self, logits: Tensor, codes: Tensor, annotated: Tensor) -> dict[str, Tensor]:
        """(B, L, *S) logits, (B, *S) codes, (B, L) annotated -> weighted terms ``ce``, ``dice`` and, when
        enabled, ``exclusion``; the loss is the sum of the values."""
        terms = marginal_loss(logits, codes, annotated, self.space, dice_weight=self.dice_weight,
                              ce_weight=self.ce_weight, smooth=self.smooth, batch_dice=self.batch_dice)
        if self.exclusion_weight > 0:
            terms["exclusion"] = self.exclusion_weight * exclusion_loss(logits, codes, annotated, self.space,
                                                                        smooth=self.smooth)
        return terms


__all__ = ["MarginalLoss", "exclusion_loss", "marginal_dice_targets", "marginal_loss", "merged_channels"]
