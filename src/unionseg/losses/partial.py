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
from typing import Any

import torch
from torch import Tensor, nn

from unionseg.labels import LabelSpace
from unionseg.losses._common import (
    check_channels_first,
    check_positive,
    check_spatial,
    float32_island,
    index_tensor,
    memory_format_of,
    refuse_double_backward,
    sum_dtype,
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


# At or below this merged probability the marginal CE of a voxel falls back to -log p of one admissible leaf.
_TINY = 1e-30


def _representatives(representative: Tensor, flat_codes: Tensor) -> Tensor:
    """(B, V, 1) long: each voxel's code's representative leaf (its index along the leaves of (B, V, L))."""
    return representative.index_select(0, flat_codes.reshape(-1)).reshape(flat_codes.shape[0], -1, 1)


def _code_rows(flat_codes: Tensor, n_codes: int) -> Tensor:
    """(B * V,) long: each voxel's (sample, code) row, ``b * n_codes + code``."""
    offsets = torch.arange(flat_codes.shape[0], device=flat_codes.device).mul_(n_codes).unsqueeze(1)
    return (flat_codes + offsets).reshape(-1)


class _SoftmaxCodeSums(torch.autograd.Function):
    """The softmax over the leaves, its sums per (sample, code) and, given the codes' admissible sets, the
    marginal CE, with the gradient written out.

    ``apply(logits (B, L, *S) float, flat_codes (B, V) long, n_codes, admissible (B, n_codes, L) bool or None,
    representative (n_codes,) long or None)`` returns ``(ce, sums (B, L, n_codes), counts (B, n_codes))``:
    ``sums[b, l, c]`` adds ``softmax(logits)[b, l]`` over the voxels of code c, ``counts`` counts them (no
    gradient), ``ce`` is the mean over all voxels of ``-log`` of the probability of the voxel's admissible
    set, or, where that probability is at or below ``_TINY``, ``-log p`` of the code's representative leaf
    from the log-softmax; 0 without ``admissible``.

    Every voxel-sized quantity is computed once, leaves last (a view of channels-last logits, as the networks
    return them on a CPU; one copy of channels-first ones), and the backward pass is the closed form (see
    :meth:`backward`), its gradient in the logits' own memory layout. Autograd through the same steps kept
    several voxel-sized intermediates and was slower (docs/benchmarks.md, "Training step"). Nothing in either
    pass waits for a value read back from a GPU. Not twice differentiable: a second backward pass (autograd's
    ``create_graph=True``) is refused.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, flat_codes: Tensor, n_codes: int, admissible: Tensor | None,
                representative: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        batch, n_leaves = logits.shape[:2]
        # leaves last: a view of the channels-last logits the networks return (one copy otherwise), so that the
        # softmax and the per-voxel sums over the leaves run over contiguous memory
        z = logits.movedim(1, -1).reshape(batch, -1, n_leaves)  # (B, V, L)
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        # voxel sums in float64 (float32 on MPS; sum_dtype says why)
        wide = sum_dtype(p.device)
        sums = p.new_zeros(batch, n_leaves, n_codes, dtype=wide).scatter_add_(
            2, flat_codes.unsqueeze(1).expand(-1, n_leaves, -1), p.transpose(1, 2).to(wide)).to(p.dtype)
        rows = _code_rows(flat_codes, n_codes)
        # scatter_add_, not bincount: bincount reads its input's range back from a GPU to size its output
        counts = torch.zeros(batch * n_codes, dtype=rows.dtype, device=rows.device).scatter_add_(
            0, rows, torch.ones_like(rows)).to(p.dtype).reshape(batch, n_codes)
        ce = p.new_zeros(())
        merged = None
        if admissible is not None:
            assert representative is not None
            table = admissible.reshape(-1, n_leaves).to(p.dtype)
            merged = (p * table.index_select(0, rows).reshape(p.shape)).sum(-1)  # (B, V): P(admissible set)
            # where that underflows, -log p of the code's representative leaf from the log-softmax: exact for a
            # one-leaf set, an upper bound that keeps a gradient otherwise
            nll = log_p.gather(-1, _representatives(representative, flat_codes)).squeeze(-1).neg_()
            ce = torch.where(merged > _TINY, merged.clamp_min(_TINY).log().neg_(), nll).mean()
        # the codes rather than their rows and representatives (two more (B, V) int64 tensors held until backward)
        ctx.save_for_backward(p, flat_codes, admissible, representative, merged)
        ctx.n_codes = n_codes
        ctx.spatial = logits.shape[2:]
        ctx.memory_format = memory_format_of(logits)
        ctx.mark_non_differentiable(counts)
        ctx.set_materialize_grads(False)
        return ce, sums, counts

    @staticmethod
    def backward(ctx: Any, grad_ce: Tensor | None, grad_sums: Tensor | None,
                 _grad_counts: Tensor | None) -> tuple[Tensor | None, None, None, None, None]:
        refuse_double_backward("the marginal and exclusion losses")
        p, flat_codes, admissible, representative, merged = ctx.saved_tensors
        batch, _, n_leaves = p.shape
        rows = _code_rows(flat_codes, ctx.n_codes)
        with_ce = grad_ce is not None and merged is not None
        if grad_sums is None and not with_ce:
            return None, None, None, None, None
        # d/dz of the sums' part: p * (g - <p, g>), g the incoming gradient of the voxel's (sample, code) row;
        # of the CE: c * (p - r), c = grad / N, r = p * adm / P(adm), or the representative's one-hot where
        # the CE fell back to it. Together: p * (g - <p, g> + c - k * adm) - c * [fallback] * onehot(rep), with
        # k = c / P(adm) (0 at a fallback voxel).
        u = None
        if grad_sums is not None:
            u = grad_sums.transpose(1, 2).reshape(-1, n_leaves).index_select(0, rows).reshape(p.shape)
            u.sub_((p * u).sum(-1, keepdim=True))
        if with_ce:
            c = grad_ce / merged.numel()
            fallback = merged <= _TINY
            k = torch.where(fallback, torch.zeros_like(merged), c / merged.clamp_min(_TINY))
            adm = admissible.reshape(-1, n_leaves).to(p.dtype).index_select(0, rows).reshape(p.shape)
            ce_part = adm.mul_(k.unsqueeze(-1).neg()).add_(c)
            u = ce_part if u is None else u.add_(ce_part)
        assert u is not None
        grad = u.mul_(p)
        # (on a GPU without asking whether any voxel fell back: that answer is a read-back)
        if with_ce and (p.is_cuda or bool(fallback.any())):
            # elementwise rather than a scatter: deterministic and fast on a GPU under deterministic algorithms
            rep = _representatives(representative, flat_codes)
            leaves = torch.arange(n_leaves, device=p.device)
            grad.sub_((leaves == rep).to(p.dtype).mul_(torch.where(fallback, c, torch.zeros_like(c)).unsqueeze(-1)))
        grad = grad.reshape(batch, *ctx.spatial, n_leaves).movedim(-1, 1)
        return grad.contiguous(memory_format=ctx.memory_format), None, None, None, None


def marginal_loss(
    logits: Tensor,
    codes: Tensor,
    annotated: Tensor,
    space: LabelSpace,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    smooth: float = 1e-5,
    batch_dice: bool = False,
    exclusion_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Marginal cross-entropy + marginal Dice (Shi et al., MedIA 2021), and optionally the exclusion loss.

    CE: for every voxel, ``-log sum_{c in adm} p_c`` (the probability of its merged class), mean over all
    voxels; ``adm`` is :func:`unionseg.labels.admissible` (code 0 -> background plus the sample's
    unannotated leaves; a leaf code -> that leaf; a region code -> the group's leaves). Where that
    probability underflows (< 1e-30, a loss above 69) the value is ``-log p`` of one admissible leaf from the
    log-softmax: exact for a single-leaf code, an upper bound otherwise, so the loss stays finite and keeps a
    gradient. Forward and backward go through one fused step with a hand-written gradient (tested against
    plain autograd).
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
        exclusion_weight: > 0 adds ``"exclusion"``, this weight times :func:`exclusion_loss` (same
            ``smooth``), from the same softmax and sums (calling both functions computes them twice).

    Returns:
        ``{"ce": ..., "dice": ...}`` (and ``"exclusion"``), float32 scalars already multiplied by their weights.

    Raises:
        ValueError: shapes that do not match each other or the label space; negative weights.
    """
    _check_partial_inputs(logits, codes, annotated, space)
    check_positive("ce_weight", ce_weight, allow_zero=True)
    check_positive("dice_weight", dice_weight, allow_zero=True)
    check_positive("exclusion_weight", exclusion_weight, allow_zero=True)
    check_positive("smooth", smooth)
    batch = logits.shape[0]
    with float32_island(logits):
        flat = codes.reshape(batch, -1).long()  # (B, V)
        sets, inside, counted = marginal_channels(codes, annotated, space)
        # CE, and the per-code sums of the probabilities that the Dice is made of (every voxel of a code shares
        # its targets); channel k's leaf set is code k's admissible set
        ce, sums, counts = _SoftmaxCodeSums.apply(logits.float(), flat, space.n_codes, sets,
                                                  _representative_leaf(space, codes.device))
        merged_sums = torch.bmm(sets.float(), sums)  # (B, K, n_codes)
        inside_f = inside.transpose(1, 2).float()  # (B, K, n_codes)
        intersection = (merged_sums * inside_f).sum(-1)
        denominator = merged_sums.sum(-1) + (inside_f * counts.unsqueeze(1)).sum(-1)
        dice = dice_from_sums(intersection, denominator, counted, smooth, batch_dice)
        terms = {"ce": ce_weight * ce, "dice": dice_weight * dice}
        if exclusion_weight > 0:
            terms["exclusion"] = exclusion_weight * _exclusion_from_sums(sums, counts, annotated, space, smooth)
    return terms


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
        _, sums, counts = _SoftmaxCodeSums.apply(logits.float(), codes.reshape(batch, -1).long(), space.n_codes,
                                                 None, None)
        return _exclusion_from_sums(sums, counts, annotated, space, smooth)


def _exclusion_from_sums(sums: Tensor, counts: Tensor, annotated: Tensor, space: LabelSpace, smooth: float) -> Tensor:
    """:func:`exclusion_loss` from the per-code probability sums (B, L, n_codes) and voxel counts (B, n_codes)."""
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
        return marginal_loss(logits, codes, annotated, self.space, dice_weight=self.dice_weight,
                             ce_weight=self.ce_weight, smooth=self.smooth, batch_dice=self.batch_dice,
                             exclusion_weight=self.exclusion_weight)


__all__ = ["MarginalLoss", "exclusion_loss", "marginal_channels", "marginal_loss", "merged_channels"]
