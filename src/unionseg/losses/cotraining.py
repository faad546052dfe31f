"""Region-masked soft cross-entropy and the sigmoid ramp-up of the co-training method.

Huang, Zheng, Hu, Zhang and Li, "Multi-organ segmentation via co-training weight-averaged models from
few-organ datasets", MICCAI 2020 (arXiv:2008.07149): each network is taught, inside a region R, by the softmax of its peer's
weight-averaged model; the weight of that term ramps up with ``exp(-5 (1 - t)^2)`` (Laine and Aila,
"Temporal ensembling for semi-supervised learning", ICLR 2017).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from unionseg.losses._common import check_channels_first, check_spatial, float32_island


def soft_ce(logits: Tensor, target_probs: Tensor, region: Tensor) -> Tensor:
    """Cross-entropy of ``softmax(logits)`` against soft targets, averaged over a region.

    ``loss = sum_{v in R} sum_c -q_c(v) log p_c(v) / |R|`` with ``|R|`` counted over the whole batch.
    The targets are detached inside (no gradient ever reaches the teacher). Voxels outside R contribute
    nothing and receive zero gradient; an empty region gives 0 (attached to the graph, zero gradient).

    Args:
        logits: (B, L, *S) the student's raw scores.
        target_probs: (B, L, *S) target probabilities (e.g. the peer average's softmax).
        region: (B, *S) bool, the voxels where the soft target applies.

    Returns:
        Scalar float32.

    Raises:
        ValueError: mismatched shapes.
    """
    check_channels_first("logits", logits)
    if target_probs.shape != logits.shape:
        raise ValueError(f"target_probs {tuple(target_probs.shape)} must match logits {tuple(logits.shape)}")
    check_spatial("region", region, logits)
    with float32_island(logits):
        log_p = F.log_softmax(logits.float(), dim=1)
        ce = -(target_probs.detach().float() * log_p).sum(1)  # (B, *S)
        inside = region.bool()
        ce = torch.where(inside, ce, torch.zeros_like(ce))
        return ce.sum() / inside.sum().clamp_min(1).to(ce.dtype)


def sigmoid_rampup(step: int | float, rampup_steps: int | float) -> float:
    """Sigmoid-shaped ramp-up ``exp(-5 (1 - t)^2)`` with ``t = clip(step / rampup_steps, 0, 1)``.

    Starts at ``exp(-5) ~ 0.0067`` and reaches exactly 1 at ``step >= rampup_steps``. ``rampup_steps = 0``
    means no ramp (always 1).

    Raises:
        ValueError: negative ``rampup_steps``.
    """
    if rampup_steps < 0:
        raise ValueError(f"rampup_steps must be >= 0, got {rampup_steps}")
    if rampup_steps == 0:
        return 1.0
    t = min(max(float(step) / float(rampup_steps), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)
