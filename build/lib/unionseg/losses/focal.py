"""Focal loss with optional class weights, on hard leaf targets.

Lin, Goyal, Girshick, He and Dollar, "Focal loss for dense object detection", ICCV 2017, in its softmax
(multi-class) form ``FL = -w_t (1 - p_t)^gamma log p_t``; used with inverse-class-frequency weights by the
co-training method (Huang et al., "Multi-organ segmentation via co-training weight-averaged models from
few-organ datasets", MICCAI 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unionseg.losses._common import check_channels_first, check_positive, check_spatial, float32_island


def inverse_frequency_weights(targets: Tensor, n_classes: int, ignore_mask: Tensor | None = None) -> Tensor:
    """Class weights proportional to the inverse class frequency ("balanced" weights).

    ``w_c = N / (K * n_c)`` with N the number of counted voxels, n_c the voxels of class c and K the number
    of classes present, so that ``sum_c w_c n_c = N``: the weighted mean over voxels keeps the scale of
    the unweighted one. Absent classes get weight 0 (they contribute no voxel anyway).

    Args:
        targets: (B, *S) (or any shape) integer class ids in ``0..n_classes-1``.
        n_classes: number of classes L.
        ignore_mask: bool, same shape as ``targets``; True voxels are not counted.

    Returns:
        (L,) float32 weights on the targets' device.

    Raises:
        ValueError: ``n_classes < 1`` or an ignore mask of another shape.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    flat = targets.reshape(-1).long()
    if ignore_mask is not None:
        if ignore_mask.shape != targets.shape:
            raise ValueError(f"ignore_mask {tuple(ignore_mask.shape)} differs from targets {tuple(targets.shape)}")
        flat = flat[~ignore_mask.reshape(-1).bool()]
    counts = torch.bincount(flat, minlength=n_classes)[:n_classes].float()
    present = counts > 0
    n_present = present.sum().clamp_min(1)
    weights = counts.sum() / (n_present * counts.clamp_min(1))
    return torch.where(present, weights, torch.zeros_like(weights))


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    gamma: float = 2.0,
    class_weights: Tensor | None = None,
    ignore_mask: Tensor | None = None,
) -> Tensor:
    """Softmax focal loss, mean over the non-ignored voxels.

    ``loss = sum_v w_{t_v} (1 - p_{t_v})^gamma (-log p_{t_v}) / N`` with N the number of non-ignored
    voxels (with balanced weights from :func:`inverse_frequency_weights` this equals the weight-normalised
    mean). ``gamma = 0`` without weights is plain cross-entropy. 0 when every voxel is ignored.

    Args:
        logits: (B, L, *S) raw scores.
        targets: (B, *S) integer leaf ids (values at ignored voxels are not read).
        gamma: focusing parameter (>= 0; the paper's default 2).
        class_weights: (L,) non-negative weights, or ``None``.
        ignore_mask: (B, *S) bool, True = ignore the voxel.

    Returns:
        Scalar float32.

    Raises:
        ValueError: mismatched shapes, ``gamma < 0``, weights of the wrong length.
    """
    check_channels_first("logits", logits)
    check_spatial("targets", targets, logits)
    check_positive("gamma", gamma, allow_zero=True)
    n_classes = logits.shape[1]
    if class_weights is not None and tuple(class_weights.shape) != (n_classes,):
        raise ValueError(f"class_weights must have shape ({n_classes},), got {tuple(class_weights.shape)}")
    if ignore_mask is not None:
        check_spatial("ignore_mask", ignore_mask, logits)
    with float32_island(logits):
        keep = torch.ones_like(targets, dtype=torch.bool) if ignore_mask is None else ~ignore_mask.bool()
        index = torch.where(keep, targets.long(), torch.zeros_like(targets, dtype=torch.long))
        nll = F.cross_entropy(logits.float(), index, reduction="none")  # -log p_t, (B, *S), fused kernel
        pt = (-nll).exp()
        loss = (1.0 - pt).clamp_min(1e-12) ** gamma * nll if gamma != 0 else nll
        if class_weights is not None:
            loss = loss * class_weights.to(device=loss.device, dtype=loss.dtype)[index]
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        return loss.sum() / keep.sum().clamp_min(1).to(loss.dtype)


class FocalLoss(nn.Module):
    """:func:`focal_loss` as a module (Lin et al., ICCV 2017).

    Args:
        gamma: focusing parameter (>= 0).
        class_weights: (L,) non-negative fixed weights, or ``None`` (pass per-call weights to ``forward``).

    Raises:
        ValueError: ``gamma < 0``; weights that are not 1-D or contain negative values.
    """

    def __init__(self, gamma: float = 2.0, class_weights: Tensor | None = None) -> None:
        super().__init__()
        check_positive("gamma", gamma, allow_zero=True)
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if class_weights.dim() != 1 or bool((class_weights < 0).any()):
                raise ValueError("class_weights must be a 1-D tensor of non-negative values")
        self.gamma = gamma
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: Tensor, targets: Tensor, ignore_mask: Tensor | None = None,
                class_weights: Tensor | None = None) -> Tensor:
        """(B, L, *S) logits, (B, *S) targets -> scalar; ``class_weights`` here overrides the fixed ones."""
        fixed: Tensor | None = self.class_weights  # type: ignore[assignment]
        weights = class_weights if class_weights is not None else fixed
        return focal_loss(logits, targets, self.gamma, weights, ignore_mask)
