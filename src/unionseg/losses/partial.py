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

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unionseg.labels import LabelSpace
from unionseg.losses._common import (
    check_channels_first,
    check_positive,
    check_spatial,
    float32_island,
    index_tensor,
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


#: per label space and device, its code-leaf matrix (weak keys: a space that goes drops its matrices)
_CODE_LEAF: weakref.WeakKeyDictionary[LabelSpace, dict[str, Tensor]] = weakref.WeakKeyDictionary()


def _code_leaf(space: LabelSpace, device: torch.device) -> Tensor:
    """``space.code_leaf_matrix()`` on ``device``, made once per device: built from the host array at every
    call, it was a host-to-GPU copy that made the CPU wait for the GPU in the middle of a step (helper-111);
    the loss's index vectors come from :func:`~unionseg.losses._common.index_tensor` for the same reason."""
    per_device = _CODE_LEAF.setdefault(space, {})
    key = str(device)
    if key not in per_device:
        with torch.inference_mode(False):  # kept across calls: never an inference tensor, whoever makes it
            per_device[key] = torch.as_tensor(space.code_leaf_matrix(), device=device)
    return per_device[key]


def merged_channels(annotated: Tensor, space: LabelSpace) -> Tensor:
    """The leaf sets of the merged classes of every sample, one per code.

    Channel ``k`` is code ``k``'s admissible set (the per-code table behind
    :func:`unionseg.labels.admissible`): channel 0 is the merged background (background plus every
    unannotated leaf), channel ``c`` in ``1..L-1`` is leaf ``c`` alone, channel ``L + g`` is the region of
    group ``g`` (all its leaves).

    Args:
        annotated: (B, L) bool annotated-leaf mask.

    Returns:
        (B, n_codes, L) bool membership, ``n_codes = L + G``.
    """
    table = _code_leaf(space, annotated.device).unsqueeze(0).repeat(annotated.shape[0], 1, 1)
    table[:, 0, :] |= ~annotated.bool()
    return table


def _per_code_sums(probs: Tensor, codes: Tensor, n_codes: int) -> tuple[Tensor, Tensor]:
    """Sum probabilities and count voxels per code.

    Args:
        probs: (B, L, V) float32.
        codes: (B, V) long.

    Returns:
        ``(sums (B, L, n_codes), counts (B, n_codes))``.
    """
    batch, n_leaves, _ = probs.shape
    sums = probs.new_zeros(batch, n_leaves, n_codes).scatter_add(
        2, codes.unsqueeze(1).expand(-1, n_leaves, -1), probs)
    counts = probs.new_zeros(batch, n_codes).scatter_add_(1, codes, torch.ones_like(codes, dtype=probs.dtype))
    return sums, counts


def marginal_channels(codes: Tensor, annotated: Tensor, space: LabelSpace) -> tuple[Tensor, Tensor, Tensor]:
    """Channel sets, per-code targets and counted pairs of the marginal Dice.

    Channel ``k`` has the same index as code ``k`` and its leaf set is exactly that code's admissible set
    (see :func:`merged_channels`). A channel is **counted** for sample b when it is a candidate (the merged
    background always; leaf ``c`` when annotated; region ``g`` when the sample contains region code g and
    annotates the group's leaves) and its target is fully determined in the sample: no code present in the
    sample has an admissible set that straddles the channel's set (e.g. a region-coded voxel for a single
    leaf of that group: such leaf channels are dropped for that sample, the region channel supervises it,
    and CE still sees every voxel). A voxel is a positive of channel k when its admissible set lies inside
    the channel's set. With every leaf annotated and no region codes the channels reduce to the L leaves
    and the Dice to the plain per-leaf Dice.

    Args:
        codes: (B, *S) integer codes.
        annotated: (B, L) bool.

    Returns:
        ``(sets (B, K, L) bool, inside (B, n_codes, K) bool: code lies inside channel, counted (B, K) bool)``
        with ``K = n_codes = L + G``.
    """
    batch = codes.shape[0]
    n_leaves = space.n_leaves
    sets = merged_channels(annotated, space)  # (B, K, L); also each code's admissible set
    code_adm = sets
    inside = (code_adm.unsqueeze(2) & ~sets.unsqueeze(1)).any(-1).logical_not()  # (B, n_codes, K)
    touches = (code_adm.unsqueeze(2) & sets.unsqueeze(1)).any(-1)
    ambiguous = touches & ~inside
    present = torch.zeros(batch, space.n_codes, dtype=torch.bool, device=codes.device)
    present.scatter_(1, codes.reshape(batch, -1).long(), True)
    candidate = torch.zeros(batch, sets.shape[1], dtype=torch.bool, device=codes.device)
    candidate[:, 0] = True
    candidate[:, 1:n_leaves] = annotated[:, 1:].bool()
    for grp in space.groups:
        candidate[:, n_leaves + grp.index] = present[:, n_leaves + grp.index] & \
            annotated.index_select(1, index_tensor(grp.leaf_ids, annotated.device)).bool().all(-1)
    counted = candidate & ~(ambiguous & present.unsqueeze(-1)).any(1)
    return sets, inside, counted


def _representative_leaf(space: LabelSpace, device: torch.device) -> Tensor:
    """(n_codes,) long: a leaf inside each code's admissible set (0, the leaf itself, the organ leaf)."""
    return index_tensor([*range(space.n_leaves), *(grp.organ_id for grp in space.groups)], device)


# Below this merged probability the marginal CE of a voxel falls back to -log p of one admissible leaf.
_TINY = 1e-30


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

    CE: for every voxel, ``-log sum_{c in adm} p_c`` (the probability of its merged class), mean over all
    voxels; ``adm`` is :func:`unionseg.labels.admissible` (code 0 -> background plus the sample's
    unannotated leaves; a leaf code -> that leaf; a region code -> the group's leaves). Single-leaf codes
    use the fused cross-entropy kernel (exact); multi-leaf codes use the merged probability, and where it
    underflows (< 1e-30, a loss above 69) the exact value is replaced by its upper bound ``-log p`` of one
    admissible leaf, so the loss stays finite and keeps a gradient.
    Dice: soft Dice between merged probabilities (sum over a channel's leaves) and the channel's mask, over
    the merged background, each annotated leaf and each region present as a region code; see
    :func:`marginal_channels` for which channels count. With every leaf annotated this is exactly
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
    batch = logits.shape[0]
    with float32_island(logits):
        x = logits.float()
        flat = codes.reshape(batch, -1).long()  # (B, V)
        sets, inside, counted = marginal_channels(codes, annotated, space)
        probs = torch.softmax(x, dim=1).flatten(2)  # (B, L, V)
        # CE: exact fused kernel at a representative leaf; merged probability where the code has several leaves
        representative = _representative_leaf(space, codes.device)[flat]
        nll = F.cross_entropy(x, representative.reshape(codes.shape), reduction="none").reshape(batch, -1)
        several = (sets.sum(-1) > 1).gather(1, flat)  # channel k == code k
        # only code 0 and the region codes can have several leaves: merge just those (1 + G rows)
        multi_rows = [0, *range(space.n_leaves, space.n_codes)]
        rows = [0] * space.n_codes  # each of those codes' row in ``merged`` (the others are never read there)
        for row, code in enumerate(multi_rows):
            rows[code] = row
        merged = torch.bmm(sets.index_select(1, index_tensor(multi_rows, codes.device)).float(), probs)  # (B, 1+G, V)
        row_of_code = index_tensor(rows, codes.device)
        merged_at_code = merged.gather(1, row_of_code[flat].unsqueeze(1)).squeeze(1)  # (B, V)
        use_merged = several & (merged_at_code > _TINY)
        ce = torch.where(use_merged, -merged_at_code.clamp_min(_TINY).log(), nll).mean()
        # Dice from per-code sums: every voxel of a code shares its targets
        sums, counts = _per_code_sums(probs, flat, space.n_codes)  # (B, L, n_codes), (B, n_codes)
        merged_sums = torch.bmm(sets.float(), sums)  # (B, K, n_codes)
        inside_f = inside.transpose(1, 2).float()  # (B, K, n_codes)
        intersection = (merged_sums * inside_f).sum(-1)
        denominator = merged_sums.sum(-1) + (inside_f * counts.unsqueeze(1)).sum(-1)
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
    batch = logits.shape[0]
    with float32_island(logits):
        probs = torch.softmax(logits.float(), dim=1).flatten(2)  # (B, L, V)
        sums, counts = _per_code_sums(probs, codes.reshape(batch, -1).long(), space.n_codes)
        excluded = (~merged_channels(annotated, space)).transpose(1, 2).float()  # (B, L, n_codes)
        overlap_mass = (sums * excluded).sum(-1)  # (B, L)
        size = (excluded * counts.unsqueeze(1)).sum(-1)
        pairs = ~annotated.bool()
        pairs[:, 0] = False
        pairs = pairs & (size > 0)
        overlap = 2.0 * overlap_mass / (size + sums.sum(-1) + smooth)
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


__all__ = ["MarginalLoss", "exclusion_loss", "marginal_channels", "marginal_loss", "merged_channels"]
