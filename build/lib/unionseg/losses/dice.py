"""Soft Dice and the plain softmax cross-entropy + Dice loss (oracle / naive supervision).

Soft Dice: Milletari et al., "V-Net: Fully convolutional neural networks for volumetric medical image
segmentation", 3DV 2016, in the nnU-Net form (Isensee et al., Nature Methods 2021): the smoothing term sits
in numerator and denominator, and ``batch_dice`` pools the sums over the batch before the ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unionseg.losses._common import (
    check_batch_mask,
    check_channels_first,
    check_positive,
    check_spatial,
    float32_island,
)


def one_hot(labels: Tensor, n_classes: int) -> Tensor:
    """Hard labels to a float one-hot volume.

    Args:
        labels: (B, *S) integer class ids in ``0..n_classes-1``.
        n_classes: number of channels C.

    Returns:
        (B, C, *S) float32.

    Raises:
        TypeError: floating-point labels.
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    return torch.movedim(F.one_hot(labels.long(), n_classes), -1, 1).float()


def dice_from_sums(
    intersection: Tensor,
    denominator: Tensor,
    mask: Tensor | None = None,
    smooth: float = 1e-5,
    batch_dice: bool = False,
) -> Tensor:
    """Mean soft-Dice loss from per-(sample, channel) sums.

    Args:
        intersection: (B, C) sum over voxels of ``p * t``.
        denominator: (B, C) sum of ``p`` plus sum of ``t``.
        mask: (B, C) bool; only True pairs count. ``None``: all pairs.
        smooth: added to numerator and denominator (> 0).
        batch_dice: pool the sums of the counted samples per channel before the ratio.

    Returns:
        Scalar float32: mean of ``1 - (2 I + smooth) / (D + smooth)`` over the counted pairs (or, with
        ``batch_dice``, over channels counted in at least one sample); 0 (with a graph) when nothing counts.
    """
    if mask is None:
        mask = torch.ones(intersection.shape, dtype=torch.bool, device=intersection.device)
    mask = mask.bool()
    if batch_dice:
        weight = mask.to(intersection.dtype)
        intersection = (intersection * weight).sum(0)
        denominator = (denominator * weight).sum(0)
        counted = mask.any(0)
    else:
        counted = mask
    loss = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    return loss.sum() / counted.sum().clamp_min(1).to(loss.dtype)


def soft_dice_loss(
    probs: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    smooth: float = 1e-5,
    batch_dice: bool = False,
) -> Tensor:
    """Soft Dice loss, mean over the (sample, channel) pairs that ``mask`` selects.

    Empty targets: with the smoothing term in numerator and denominator, a channel whose target is empty
    scores loss 0 when the prediction is empty too, and ``P / (P + smooth)`` (close to 1, with a vanishing
    gradient once ``P >> smooth``) when the prediction puts total mass ``P`` there. This is the MONAI /
    nnU-Net convention; ``batch_dice`` avoids most such channels by pooling the batch.

    Args:
        probs: (B, C, *S) probabilities (any float dtype; computed in float32).
        target: (B, C, *S) target probabilities or one-hot, same shape.
        mask: (B, C) bool selecting the pairs that count; ``None``: all.
        smooth: smoothing term (> 0; it defines the empty case).
        batch_dice: pool the sums over the batch per channel before the ratio.

    Returns:
        Scalar float32 loss in [0, 1].

    Raises:
        ValueError: shapes that differ, a mask that is not (B, C), ``smooth <= 0``.
    """
    check_channels_first("probs", probs)
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} differ in shape")
    if mask is not None:
        check_batch_mask("mask", mask, probs)
    check_positive("smooth", smooth)
    with float32_island(probs):
        p = probs.float().flatten(2)
        t = target.float().flatten(2)
        intersection = (p * t).sum(-1)
        denominator = p.sum(-1) + t.sum(-1)
        return dice_from_sums(intersection, denominator, mask, smooth, batch_dice)


def ce_dice_loss(
    logits: Tensor,
    labels: Tensor,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    smooth: float = 1e-5,
    batch_dice: bool = False,
) -> dict[str, Tensor]:
    """Softmax cross-entropy + soft Dice over all leaves (background included) with hard leaf targets.

    The loss of the ``oracle`` (fully labelled data) and ``naive`` (code 0 trusted as background)
    baselines. :func:`unionseg.losses.marginal_loss` with every leaf annotated reduces to exactly this.

    Args:
        logits: (B, L, *S) raw scores.
        labels: (B, *S) integer leaf ids.
        ce_weight, dice_weight: multipliers (>= 0) applied to the returned terms.
        smooth, batch_dice: see :func:`soft_dice_loss`.

    Returns:
        ``{"ce": ..., "dice": ...}``, float32 scalars already multiplied by their weights; the training
        loss is the sum of the values.

    Raises:
        ValueError: mismatched shapes or negative weights.
    """
    check_channels_first("logits", logits)
    check_spatial("labels", labels, logits)
    check_positive("ce_weight", ce_weight, allow_zero=True)
    check_positive("dice_weight", dice_weight, allow_zero=True)
    check_positive("smooth", smooth)
    batch, n_classes = logits.shape[:2]
    with float32_island(logits):
        x = logits.float()
        targets = labels.long()
        ce = F.cross_entropy(x, targets)
        # Dice without a one-hot volume: sum p_y per label with a scatter (same value as soft_dice_loss)
        probs = torch.softmax(x, 1).flatten(2)  # (B, L, V)
        flat = targets.reshape(batch, -1)
        p_true = probs.gather(1, flat.unsqueeze(1)).squeeze(1)  # (B, V)
        intersection = probs.new_zeros(batch, n_classes).scatter_add_(1, flat, p_true)
        counts = probs.new_zeros(batch, n_classes).scatter_add_(1, flat, torch.ones_like(p_true))
        dice = dice_from_sums(intersection, probs.sum(-1) + counts, None, smooth, batch_dice)
    return {"ce": ce_weight * ce, "dice": dice_weight * dice}
