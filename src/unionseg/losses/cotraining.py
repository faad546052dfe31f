"""Region-masked soft cross-entropy and the sigmoid ramp-up of the co-training method.

Huang, Zheng, Hu, Zhang and Li, "Multi-organ segmentation via co-training weight-averaged models from
few-organ datasets", MICCAI 2020 (arXiv:2008.07149): each network is taught, inside a region R, by the softmax of its peer's
weight-averaged model; the weight of that term ramps up with ``exp(-5 (1 - t)^2)`` (Laine and Aila,
"Temporal ensembling for semi-supervised learning", ICLR 2017).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unionseg.losses._common import (
    check_channels_first,
    check_positive,
    check_spatial,
    float32_island,
    memory_format_of,
    refuse_double_backward,
    sum_dtype,
)


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


class _CotrainingTerms(torch.autograd.Function):
    """One network's three co-training terms from one softmax, with the gradient written out.

    ``apply(logits (B, L, *S) float, targets (B, V) long, q (B, V, L) float or None, region (B, V) bool or
    None, gamma, class_weights (L,) or None, smooth)`` returns ``(focal, dice, soft)``: :func:`focal_loss` of
    the targets (every voxel counted), :func:`soft_dice_loss` of the softmax against their one-hot (mean over
    (sample, leaf) pairs) and :func:`soft_ce` against ``q`` inside the region (0 without ``q``). Composed from
    those three functions, autograd kept a dozen voxel-sized intermediates (the one-hot among them) and ran
    three softmaxes; here the softmax is taken once, leaves last (a view of channels-last logits), and the
    backward pass is the closed form:

    * focal: ``c_f g (p - y)``, ``g = w_t (gamma (1 - p_t)^(gamma - 1) p_t (-log p_t) + (1 - p_t)^gamma)``,
      ``c_f`` the incoming gradient over the voxel count;
    * Dice: ``p (G - <p, G>)`` with ``G = K + A y`` per (sample, leaf), ``A = -2 c_d / (n den)``,
      ``K = c_d (2 I + s) / (n den^2)``, n the number of pairs;
    * soft CE: ``c_s [v in R] (p sum(q) - q)``, ``c_s`` the incoming gradient over ``|R|``.

    Not twice differentiable (refused under ``create_graph=True``).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, q: Tensor | None, region: Tensor | None, gamma: float,
                class_weights: Tensor | None, smooth: float) -> tuple[Tensor, Tensor, Tensor]:
        batch, n_leaves = logits.shape[:2]
        z = logits.movedim(1, -1).reshape(batch, -1, n_leaves)  # (B, V, L), a view of channels-last logits
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        t = targets.unsqueeze(-1)  # (B, V, 1)
        log_pt = log_p.gather(-1, t).squeeze(-1)
        pt = log_pt.exp()
        nll = log_pt.neg()
        u = (1.0 - pt).clamp_min(1e-12)
        weight = None if class_weights is None else class_weights.to(device=p.device, dtype=p.dtype)[targets]
        focal_v = nll if gamma == 0 else u.pow(gamma) * nll
        if weight is not None:
            focal_v = focal_v * weight
        focal = focal_v.mean()
        # voxel sums in float64 (float32 on MPS; sum_dtype says why)
        wide = sum_dtype(p.device)
        intersection = pt.new_zeros(batch, n_leaves, dtype=wide).scatter_add_(1, targets, pt.to(wide)).to(p.dtype)
        counts = torch.zeros(batch, n_leaves, dtype=torch.long, device=p.device).scatter_add_(
            1, targets, torch.ones_like(targets)).to(p.dtype)
        den = p.sum(1) + counts + smooth  # (B, L)
        dice = (1.0 - (2.0 * intersection + smooth) / den).mean()
        soft = p.new_zeros(())
        inside = None
        if q is not None:
            assert region is not None
            inside = region.to(p.dtype)
            soft = ((q * log_p).sum(-1).neg() * inside).sum() / inside.sum().clamp_min(1)
        ctx.save_for_backward(p, targets, pt, nll, u, weight, intersection, den, q, inside)
        ctx.gamma, ctx.smooth = gamma, smooth
        ctx.spatial = logits.shape[2:]
        ctx.memory_format = memory_format_of(logits)
        ctx.set_materialize_grads(False)
        return focal, dice, soft

    @staticmethod
    def backward(ctx: Any, grad_focal: Tensor | None, grad_dice: Tensor | None,
                 grad_soft: Tensor | None) -> tuple[Tensor | None, None, None, None, None, None, None]:
        refuse_double_backward("the co-training loss")
        p, targets, pt, nll, u, weight, intersection, den, q, inside = ctx.saved_tensors
        batch, n_voxels, n_leaves = p.shape
        t = targets.unsqueeze(-1)
        scale = p.new_zeros(batch, n_voxels)  # c * g (focal) + c_s [v in R] sum(q) (soft): multiplies p
        at_target = p.new_zeros(batch, n_voxels)  # what is taken away at the target leaf
        grad = p.new_zeros(p.shape)
        if grad_focal is not None:
            g = u.pow(ctx.gamma) if ctx.gamma != 0 else torch.ones_like(u)
            if ctx.gamma != 0:
                g = g + ctx.gamma * u.pow(ctx.gamma - 1) * pt * nll
            if weight is not None:
                g = g * weight
            g = g * (grad_focal / (batch * n_voxels))
            scale += g
            at_target += g
        if grad_dice is not None:
            n_pairs = batch * n_leaves
            a = (-2.0 / (n_pairs * den)) * grad_dice  # (B, L)
            k = (2.0 * intersection + ctx.smooth) / (n_pairs * den * den) * grad_dice
            a_t = a.gather(1, targets)  # (B, V): A at each voxel's target leaf
            # G = K + A y; <p, G> = <p, K> + A_t p_t
            inner = (p * k.unsqueeze(1)).sum(-1) + a_t * pt
            grad += p * (k.unsqueeze(1) - inner.unsqueeze(-1))
            at_target -= a_t * pt  # at_target is subtracted below: this adds p_t A_t at the target leaf
        if grad_soft is not None and q is not None:
            c_s = grad_soft / inside.sum().clamp_min(1)
            w = inside * c_s  # (B, V)
            scale += w * q.sum(-1)
            grad -= q * w.unsqueeze(-1)
        grad += p * scale.unsqueeze(-1)
        grad.scatter_add_(-1, t, at_target.neg().unsqueeze(-1))
        grad = grad.reshape(batch, *ctx.spatial, n_leaves).movedim(-1, 1)
        return grad.contiguous(memory_format=ctx.memory_format), None, None, None, None, None, None


def cotraining_terms(logits: Tensor, targets: Tensor, target_probs: Tensor | None = None,
                     region: Tensor | None = None, gamma: float = 2.0, class_weights: Tensor | None = None,
                     smooth: float = 1e-5) -> dict[str, Tensor]:
    """One network's co-training loss terms: focal and soft Dice against its hard (pseudo) labels, and the
    region-masked soft CE against its peer's probabilities, from one softmax.

    Equal in value and gradient to ``focal_loss(logits, targets, gamma, class_weights)``,
    ``soft_dice_loss(softmax(logits), one_hot(targets))`` and ``soft_ce(logits, target_probs, region)``
    (tested), and faster: one softmax instead of three, no one-hot, a closed-form gradient.

    Args:
        logits: (B, L, *S) raw scores.
        targets: (B, *S) integer leaf ids (every voxel counts).
        target_probs: (B, L, *S) the soft targets (detached inside), or ``None``: ``soft`` is 0.
        region: (B, *S) bool, where the soft target applies (required with ``target_probs``).
        gamma: the focal loss's focusing parameter (>= 0).
        class_weights: (L,) non-negative focal weights, or ``None``.
        smooth: the Dice smoothing term (> 0).

    Returns:
        ``{"focal", "dice", "soft"}``, float32 scalars.

    Raises:
        ValueError: mismatched shapes, ``gamma < 0``, ``smooth <= 0``, weights of the wrong length.
    """
    check_channels_first("logits", logits)
    check_spatial("targets", targets, logits)
    check_positive("gamma", gamma, allow_zero=True)
    check_positive("smooth", smooth)
    batch, n_leaves = logits.shape[:2]
    if class_weights is not None and tuple(class_weights.shape) != (n_leaves,):
        raise ValueError(f"class_weights must have shape ({n_leaves},), got {tuple(class_weights.shape)}")
    q = None
    if target_probs is not None:
        if target_probs.shape != logits.shape:
            raise ValueError(f"target_probs {tuple(target_probs.shape)} must match logits {tuple(logits.shape)}")
        if region is None:
            raise ValueError("region is required with target_probs")
        check_spatial("region", region, logits)
        q = target_probs.detach().float().movedim(1, -1).reshape(batch, -1, n_leaves)
        region = region.reshape(batch, -1).bool()
    with float32_island(logits):
        focal, dice, soft = _CotrainingTerms.apply(logits.float(), targets.reshape(batch, -1).long(), q, region,
                                                   float(gamma), class_weights, float(smooth))
    return {"focal": focal, "dice": dice, "soft": soft}


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
