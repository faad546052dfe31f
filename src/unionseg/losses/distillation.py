"""Multi-teacher single-student knowledge distillation (MS-KD): logit-wise and region-affinity losses.

Feng, Zhou, Zhang, Zhang and Wang, "MS-KD: Multi-organ segmentation with multiple binary-labeled
datasets", 2021 (arXiv:2108.02559). Each teacher j (an expert over background + its dataset's leaves)
supervises the student, mapped into j's label space, in j's organ region R_j and in the background region
R_bg where every teacher predicts background; a feature term matches region affinities (cosine similarity
of each voxel's feature to its region's mean feature) between student and teacher. Temperature scaling
follows Hinton, Vinyals and Dean, "Distilling the knowledge in a neural network", 2015 (the ``tau^2``
factor keeps gradient magnitudes comparable across temperatures).

Teachers never receive gradients: every teacher tensor is detached inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unionseg.losses._common import (
    check_channels_first,
    check_positive,
    check_spatial,
    float32_island,
    index_tensor,
    memory_format_of,
    refuse_double_backward,
)

DOWNSAMPLE_MODES = ("nearest", "max")


def _check_teacher_leaves(teacher_leaves: Sequence[int], n_leaves: int) -> list[int]:
    leaves = [int(c) for c in teacher_leaves]
    if not leaves:
        raise ValueError("teacher_leaves must name at least one leaf")
    if len(set(leaves)) != len(leaves):
        raise ValueError(f"teacher_leaves has duplicates: {leaves}")
    if any(c <= 0 or c >= n_leaves for c in leaves):
        raise ValueError(f"teacher_leaves must be foreground leaf ids in 1..{n_leaves - 1}, got {leaves}")
    return leaves


def _other_leaves(leaves: Sequence[int], n_leaves: int) -> list[int]:
    kept = set(leaves)
    return [c for c in range(n_leaves) if c not in kept]


def map_to_teacher(student_probs: Tensor, teacher_leaves: Sequence[int]) -> Tensor:
    """Map student leaf probabilities into one teacher's label space.

    Channel 0 is the sum of every leaf the teacher does not know (background included); channels
    ``1..K`` are the teacher's leaves, in ``teacher_leaves`` order.

    Args:
        student_probs: (B, L, *S) probabilities over all leaves.
        teacher_leaves: the K global leaf ids of the teacher's foreground channels.

    Returns:
        (B, 1 + K, *S), same dtype as the input.

    Raises:
        ValueError: an empty, duplicated or out-of-range leaf list.
    """
    check_channels_first("student_probs", student_probs)
    leaves = _check_teacher_leaves(teacher_leaves, student_probs.shape[1])
    others = _other_leaves(leaves, student_probs.shape[1])
    merged = student_probs[:, others].sum(1, keepdim=True)
    return torch.cat([merged, student_probs[:, leaves]], dim=1)


_TINY = 1e-30


def map_log_probs_to_teacher(student_log_probs: Tensor, teacher_leaves: Sequence[int]) -> Tensor:
    """:func:`map_to_teacher` in log space.

    The merged channel is ``log sum_{others} q`` computed from the probabilities (no cancellation; much
    faster than ``logsumexp`` on CPU). Where that sum underflows (< 1e-30) it is replaced by its lower
    bound ``log q_0`` (the background leaf), so the result stays finite and differentiable.

    Args:
        student_log_probs: (B, L, *S) log-probabilities.
        teacher_leaves: the teacher's K leaf ids.

    Returns:
        (B, 1 + K, *S) log-probabilities.
    """
    check_channels_first("student_log_probs", student_log_probs)
    leaves = _check_teacher_leaves(teacher_leaves, student_log_probs.shape[1])
    others = _other_leaves(leaves, student_log_probs.shape[1])
    others_mass = student_log_probs[:, others].exp().sum(1, keepdim=True)
    merged = torch.where(others_mass > _TINY, others_mass.clamp_min(_TINY).log(), student_log_probs[:, :1])
    return torch.cat([merged, student_log_probs[:, leaves]], dim=1)


def temper(probs: Tensor, tau: float, eps: float = 1e-8) -> Tensor:
    """Probabilities at temperature ``tau`` from (cached, e.g. float16) probabilities:
    ``softmax(log(max(p, eps)) / tau)`` over dim 1, in float32, detached."""
    check_positive("tau", tau)
    with torch.no_grad():
        return _teacher_target(probs, tau, eps)[0]


def _teacher_target(probs: Tensor, tau: float, eps: float) -> tuple[Tensor, Tensor]:
    """``(t, log t)`` with ``t = softmax(log(max(p, eps)) / tau)`` over dim 1, float32, no graph.

    At ``tau = 1`` that is the floored probabilities renormalised, ``log t = log p - log sum p``: the same
    value without the softmax's exp and second pass (this runs per teacher and step); at ``tau = 2``,
    ``sqrt(p)`` renormalised.
    """
    floored = probs.detach().float().clamp_min(eps)
    if tau == 2.0:
        # MS-KD's default: sqrt(p) >= p >= eps cannot underflow, and one square root and one sum replace the
        # softmax's passes (a general power is slower than they are on the CPU)
        powered = floored.sqrt_()
        target = powered.div_(powered.sum(1, keepdim=True))
        return target, target.log()
    if tau != 1.0:
        log_t = F.log_softmax(floored.log_() / tau, dim=1)
        return log_t.exp(), log_t
    total = floored.sum(1, keepdim=True)
    target = floored / total
    return target, floored.log_().sub_(total.log_())


def _check_kd_inputs(student_logits: Tensor, teacher_probs: Tensor, teacher_leaves: Sequence[int],
                     region: Tensor, tau: float) -> list[int]:
    check_channels_first("student_logits", student_logits)
    check_channels_first("teacher_probs", teacher_probs)
    check_positive("tau", tau)
    leaves = _check_teacher_leaves(teacher_leaves, student_logits.shape[1])
    expected = (student_logits.shape[0], 1 + len(leaves), *student_logits.shape[2:])
    if tuple(teacher_probs.shape) != expected:
        raise ValueError(f"teacher_probs must have shape {expected}, got {tuple(teacher_probs.shape)}")
    check_spatial("region", region, student_logits)
    return leaves


def _kd_kl_from_log_probs(student_log_probs: Tensor, student_probs: Tensor, teacher_probs: Tensor,
                          leaves: list[int], region: Tensor, tau: float, eps: float) -> Tensor:
    """Core of :func:`kd_kl`, given the student's float32 (log-)probabilities at temperature 1, (B, L, *S).

    The student is mapped into the teacher's label space first (its other leaves summed into the merged
    background), then tempered: ``log q^tau = log_softmax(log map(q) / tau)`` over the 1 + K channels."""
    with torch.no_grad():
        target, log_t = _teacher_target(teacher_probs, tau, eps)
        entropy_term = (target * log_t).sum(1)  # sum t log t, (B, *S)
    others = _other_leaves(leaves, student_log_probs.shape[1])
    others_mass = student_probs[:, others].sum(1)
    log_merged = torch.where(others_mass > _TINY, others_mass.clamp_min(_TINY).log(), student_log_probs[:, 0])
    mapped = torch.cat([log_merged.unsqueeze(1), student_log_probs[:, leaves]], dim=1)
    if tau != 1.0:
        mapped = F.log_softmax(mapped / tau, dim=1)
    cross = (target * mapped).sum(1)
    inside = region.to(cross.dtype)
    kl = (entropy_term - cross) * inside
    return (tau ** 2) * kl.sum() / inside.sum().clamp_min(1)


class _FusedKdKl(torch.autograd.Function):
    """``sum_j`` of :func:`_kd_kl_from_log_probs` over teachers, value and gradient in one pass.

    ``apply(student_logits (B, L, *S) float32, teachers, tau)``, ``teachers`` a tuple of ``(target,
    log_target, weight, leaves)`` per teacher: its tempered target and log-target (B, 1 + K, V), its voxel
    weights (B, V) (its region divided by the region's size) and its K leaf ids; all constants.

    The gradient is the closed form, computed with the value. With ``a_j`` teacher j's mapped student
    log-probabilities (the log of its merged "everything else" mass ``M_j``, then its leaves' log q) and
    ``r_j = softmax(a_j / tau)``, ``d loss / d a_{j,k} = tau w_j (r_{j,k} - t_{j,k})``. Through the student's
    softmax the ``-q_i`` terms cancel (``r_j`` and ``t_j`` both sum to 1), so the logit of leaf i gets its
    own channel's term where i is one of teacher j's leaves, and the merged channel's term times ``q_i /
    M_j`` where it is not (all of it on leaf 0 where ``M_j`` underflows and the loss reads ``log q_0``
    instead). Each channel is a (B, V) block, so a teacher of K leaves costs a few dozen small operations and
    no per-teacher (B, L, V) copies: 10 to 35 % faster than autograd through the same steps on the CPU, run to
    run (``benchmarks/bench_losses.py``), and the graph holds one saved tensor. Not twice differentiable (a
    second backward pass, ``create_graph=True``, is refused); without grad mode no gradient is computed.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, teachers: tuple[tuple[Tensor, Tensor, Tensor, list[int]], ...],
                tau: float, need_grad: bool) -> Tensor:
        batch, n_leaves = logits.shape[:2]
        # channel-major, so that every leaf below is one (B, V) block, read in place
        log_q = F.log_softmax(logits, dim=1).contiguous().reshape(batch, n_leaves, -1)
        q = log_q.exp()
        others = torch.ones(len(teachers), n_leaves, dtype=q.dtype, device=q.device)
        for j, (_, _, _, leaves) in enumerate(teachers):
            others[j].index_fill_(0, index_tensor(leaves, q.device), 0.0)
        masses = torch.matmul(others, q)  # (B, J, V): every teacher's merged mass M_j at once
        grad = torch.zeros_like(q) if need_grad else q
        merged_terms = []
        total = q.new_zeros(())
        for j, (target, log_target, weight, leaves) in enumerate(teachers):
            mass = masses[:, j]
            fallback = mass <= _TINY
            # a_j / tau, channel by channel: the merged mass, then the teacher's leaves
            scaled = [torch.where(fallback, log_q[:, 0], mass.clamp_min(_TINY).log()).div_(tau),
                      *(log_q[:, leaf] / tau for leaf in leaves)]
            shift = scaled[0]
            for channel in scaled[1:]:
                shift = torch.maximum(shift, channel)
            powers = [(channel - shift).exp_() for channel in scaled]  # each <= 1, the largest exactly 1
            norm = powers[0].clone()
            for power in powers[1:]:
                norm += power
            log_norm = norm.log().add_(shift)  # log sum_k exp(a_k / tau)
            kl = torch.zeros_like(mass)
            for k, channel in enumerate(scaled):
                t = target[:, k]
                kl += t * (log_target[:, k] - channel + log_norm)  # t (log t - log r)
            total += (kl * weight).sum()
            if not need_grad:
                continue
            for k, power in enumerate(powers):
                g = (power / norm).sub_(target[:, k]).mul_(weight).mul_(tau)  # d loss / d a_k: tau w (r_k - t_k)
                if k == 0:
                    zero = torch.zeros_like(g)
                    grad[:, 0] += torch.where(fallback, g, zero)
                    merged_terms.append(torch.where(fallback, zero, g / mass.clamp_min(_TINY)))
                else:
                    grad[:, leaves[k - 1]] += g
        if need_grad:
            # the merged channels' terms, each spread over its teacher's other leaves in proportion to q
            grad += q * torch.matmul(others.t(), torch.stack(merged_terms, dim=1))
            ctx.save_for_backward(grad.reshape(logits.shape).contiguous(memory_format=memory_format_of(logits)))
        return total * tau ** 2

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        refuse_double_backward("MS-KD's logit term")
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def _fused_kd_kl(student_logits: Tensor, targets: Sequence[Tensor], teacher_leaves: Sequence[list[int]],
                 regions: Sequence[Tensor], tau: float, eps: float) -> Tensor:
    """``sum_j`` of :func:`_kd_kl_from_log_probs` over teachers (see :class:`_FusedKdKl`), from float32 logits."""
    teachers = []
    with torch.no_grad():
        for probs, leaves, region in zip(targets, teacher_leaves, regions, strict=True):
            target, log_t = _teacher_target(probs, tau, eps)
            inside = region.to(target.dtype)
            weight = (inside / inside.sum().clamp_min(1)).reshape(inside.shape[0], -1)
            teachers.append((target.flatten(2), log_t.flatten(2), weight, list(leaves)))
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad  # else no gradient is computed
    return _FusedKdKl.apply(student_logits, tuple(teachers), tau, need_grad)


def kd_kl(
    student_logits: Tensor,
    teacher_probs: Tensor,
    teacher_leaves: Sequence[int],
    region: Tensor,
    tau: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """Temperature-scaled KL divergence from one teacher to the mapped student, mean over a region.

    ``loss = tau^2 * sum_{v in R} KL(t^tau(v) || q^tau(v)) / |R|`` with ``t^tau = softmax(log t / tau)``
    and ``q^tau = softmax(log map_to_teacher(softmax(student_logits)) / tau)``: the student is mapped into the
    teacher's label space, then tempered like the teacher, so the loss depends only on the mapped
    distribution (not on how the student splits its merged background); ``|R|`` counts the whole batch. 0 (with a
    graph) when the region is empty. No gradient reaches ``teacher_probs``.

    Args:
        student_logits: (B, L, *S) raw student scores.
        teacher_probs: (B, 1 + K, *S) teacher probabilities (channel 0 = its background).
        teacher_leaves: the teacher's K global leaf ids, in its channel order.
        region: (B, *S) bool, where this teacher supervises.
        tau: temperature (> 0).
        eps: floor for teacher probabilities before the log.

    Returns:
        Scalar float32 >= 0.

    Raises:
        ValueError: mismatched shapes, ``tau <= 0``, a bad leaf list.
    """
    leaves = _check_kd_inputs(student_logits, teacher_probs, teacher_leaves, region, tau)
    with float32_island(student_logits):
        log_q = F.log_softmax(student_logits.float(), dim=1)
        return _kd_kl_from_log_probs(log_q, log_q.exp(), teacher_probs, leaves, region, tau, eps)


def kd_regions(teacher_probs: Sequence[Tensor],
               teacher_groups: Sequence[Sequence[Sequence[int]]] | None = None) -> tuple[list[Tensor], Tensor]:
    """MS-KD regions: where each teacher supervises, and where all agree on background.

    ``R_j``: teacher j's merge (contract 3) gives foreground, i.e. one of its organ groups holds more than
    half the voxel's probability (organ and parts together, so a voxel split between an organ and its
    tumour is the teacher's), and among the teachers that claim the voxel, j is the most confident,
    confidence being its total foreground probability ``1 - p_j(bg)`` (exact ties go to the lower teacher
    index). ``R_bg``: no teacher claims the voxel. The regions partition the volume.

    Args:
        teacher_probs: per teacher, (B, 1 + K_j, *S) probabilities (same B and S for all).
        teacher_groups: per teacher, its organ groups as lists of its channels (1..K_j); default: all of
            a teacher's foreground channels form one group (a single-organ teacher, with its parts).

    Returns:
        ``([R_1, ..., R_J] each (B, *S) bool, R_bg (B, *S) bool)``.

    Raises:
        ValueError: no teacher, teachers of different batch/spatial shapes, groups of another count.
    """
    if len(teacher_probs) == 0:
        raise ValueError("kd_regions needs at least one teacher")
    if teacher_groups is not None and len(teacher_groups) != len(teacher_probs):
        raise ValueError(f"{len(teacher_groups)} group lists for {len(teacher_probs)} teachers")
    shape = (teacher_probs[0].shape[0], *teacher_probs[0].shape[2:])
    claims, confidences = [], []
    for j, probs in enumerate(teacher_probs):
        check_channels_first(f"teacher_probs[{j}]", probs)
        if (probs.shape[0], *probs.shape[2:]) != shape:
            raise ValueError(f"teacher_probs[{j}] has shape {tuple(probs.shape)}; expected (B, 1+K, *S) with "
                             f"(B, *S) = {shape}")
        p = probs.detach().float()
        groups = teacher_groups[j] if teacher_groups is not None else [range(1, p.shape[1])]
        # the merge function's foreground: the best group's probability above 0.5 (at 0.5, background)
        claim = torch.stack([p.index_select(1, index_tensor(g, p.device)).sum(1) for g in groups]).amax(0) > 0.5
        claims.append(claim)
        confidences.append(torch.where(claim, 1.0 - p[:, 0], torch.full_like(p[:, 0], -1.0)))
    winner = torch.zeros(shape, dtype=torch.long, device=teacher_probs[0].device)
    best = confidences[0]
    for j in range(1, len(confidences)):  # strict '>' keeps the first maximum on ties, as argmax does
        better = confidences[j] > best
        winner = torch.where(better, j, winner)
        best = torch.maximum(best, confidences[j])
    regions = [claim & (winner == j) for j, claim in enumerate(claims)]
    unclaimed = ~claims[0]
    for claim in claims[1:]:
        unclaimed &= ~claim
    return regions, unclaimed


def product_of_experts_background(
    teacher_probs: Sequence[Tensor],
    teacher_leaves: Sequence[Sequence[int]],
    n_leaves: int,
    eps: float = 1e-8,
) -> Tensor:
    """One merged soft target over all leaves from every teacher (product of experts; MS-KD option for R_bg).

    Each teacher j scores student leaf c by its own channel for c, or by its background channel when it
    does not know c: ``log q_c = sum_j log p_j(map_j(c))``, normalised with a softmax over the L leaves.
    A leaf that no teacher knows gets the same score as background (our interpretation; in MS-KD every
    foreground leaf has a teacher).

    Args:
        teacher_probs: per teacher, (B, 1 + K_j, *S) probabilities.
        teacher_leaves: per teacher, its K_j leaf ids.
        n_leaves: L, the student's number of leaves (background included).
        eps: floor for probabilities before the log.

    Returns:
        (B, L, *S) float32 probabilities, detached (a target); feed it to :func:`kd_kl` with
        ``teacher_leaves = range(1, L)``.

    Raises:
        ValueError: lists of different lengths or bad leaf lists.
    """
    if len(teacher_probs) != len(teacher_leaves) or len(teacher_probs) == 0:
        raise ValueError("teacher_probs and teacher_leaves must be non-empty lists of the same length")
    log_q: Tensor | None = None
    for probs, leaves in zip(teacher_probs, teacher_leaves, strict=True):
        ids = _check_teacher_leaves(leaves, n_leaves)
        if probs.shape[1] != 1 + len(ids):
            raise ValueError(f"a teacher with {len(ids)} leaves must have {1 + len(ids)} channels, "
                             f"got {probs.shape[1]}")
        log_p = probs.detach().float().clamp_min(eps).log()
        channel_of_leaf = torch.zeros(n_leaves, dtype=torch.long, device=probs.device)
        channel_of_leaf[ids] = torch.arange(1, 1 + len(ids), device=probs.device)
        term = log_p[:, channel_of_leaf]  # (B, L, *S)
        log_q = term if log_q is None else log_q + term
    assert log_q is not None
    return torch.softmax(log_q, dim=1)


def downsample_mask(mask: Tensor, size: Sequence[int], mode: str = "nearest") -> Tensor:
    """Resize a boolean region mask to a feature map's spatial size.

    Args:
        mask: (B, *S) bool, 1 to 3 spatial dimensions.
        size: the target spatial size S'.
        mode: ``"nearest"`` (keeps a partition a partition) or ``"max"`` (adaptive max pooling: a coarse
            voxel is in the region when any fine voxel under it is; keeps small structures).

    Returns:
        (B, *S') bool.

    Raises:
        ValueError: an unknown mode or a size of the wrong length.
    """
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}")
    size = tuple(int(s) for s in size)
    if mask.dim() - 1 != len(size) or not 1 <= len(size) <= 3:
        raise ValueError(f"mask (B, *S) {tuple(mask.shape)} and size {size} disagree on spatial dimensions")
    x = mask.float().unsqueeze(1)
    if tuple(mask.shape[1:]) == size:
        return mask.bool()
    if mode == "nearest":
        out = F.interpolate(x, size=size, mode="nearest")
    else:
        pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[len(size)]
        out = pool(x, size)
    return out.squeeze(1) > 0.5


def _affinity(features: Tensor, weights: Tensor, counts: Tensor, eps: float) -> Tensor:
    """(B, C, V) features, (B, R, V) region weights, (B, R) counts -> (B, R, V) cosine similarity of each
    voxel's feature to its region's mean feature."""
    mean = torch.einsum("bcv,brv->brc", features, weights) / counts.clamp_min(1).unsqueeze(-1)
    dot = torch.einsum("bcv,brc->brv", features, mean)
    squared_norms = (features * features).sum(1).unsqueeze(1) * (mean * mean).sum(-1).unsqueeze(-1)
    return dot / squared_norms.clamp_min(eps * eps).sqrt()


def region_affinity_loss(
    student_feat: Tensor,
    teacher_feat: Tensor,
    regions: Sequence[Tensor],
    eps: float = 1e-8,
) -> Tensor:
    """Region-affinity distillation (MS-KD feature term).

    For every sample and region, the affinity of a voxel is the cosine similarity of its feature to the
    region's mean feature, computed for student and teacher separately; the loss is the mean squared
    difference of the two affinity maps inside the region, averaged over the non-empty (sample, region)
    pairs (0 when all are empty). Affinities are scalars, so the widths may differ (Cs != Ct) and the loss
    is invariant to any permutation of either network's channels. The teacher is detached.

    Args:
        student_feat: (B, Cs, *S') student features.
        teacher_feat: (B, Ct, *S') teacher features (same B and S').
        regions: (B, *S') bool masks at the feature resolution (see :func:`downsample_mask`).
        eps: floor of the norm product in the cosine.

    Returns:
        Scalar float32 >= 0.

    Raises:
        ValueError: mismatched shapes or no region.
    """
    check_channels_first("student_feat", student_feat)
    check_channels_first("teacher_feat", teacher_feat)
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(f"student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} features "
                         "must agree on batch and spatial size")
    if len(regions) == 0:
        raise ValueError("region_affinity_loss needs at least one region")
    for k, region in enumerate(regions):
        check_spatial(f"regions[{k}]", region, student_feat)
    with float32_island(student_feat):
        weights = torch.stack([r.reshape(r.shape[0], -1) for r in regions], dim=1).float()  # (B, R, V)
        counts = weights.sum(-1)
        student = _affinity(student_feat.float().flatten(2), weights, counts, eps)
        teacher = _affinity(teacher_feat.detach().float().flatten(2), weights, counts, eps)
        per_pair = ((student - teacher) ** 2 * weights).sum(-1) / counts.clamp_min(1)
        used = counts > 0
        return per_pair.sum() / used.sum().clamp_min(1).to(per_pair.dtype)


def ms_kd_logit_loss(
    student_logits: Tensor,
    teacher_probs: Sequence[Tensor],
    teacher_leaves: Sequence[Sequence[int]],
    tau: float = 1.0,
    poe_background: bool = False,
    precomputed: tuple[list[Tensor], Tensor] | None = None,
) -> Tensor:
    """The MS-KD logit term ``sum_j mean over (R_j U R_bg) of tau^2 KL(t_j^tau || q^{j,tau})``.

    With ``poe_background`` each teacher is used in R_j only and R_bg is supervised once by the product
    of experts (:func:`product_of_experts_background`) over all leaves.

    Args:
        student_logits: (B, L, *S).
        teacher_probs: per teacher, (B, 1 + K_j, *S) probabilities (cached; detached inside).
        teacher_leaves: per teacher, its K_j leaf ids.
        tau: temperature (> 0).
        poe_background: use the merged product-of-experts target in R_bg.
        precomputed: ``kd_regions(teacher_probs)`` when the caller already has it (the feature term
            uses the same regions).

    Returns:
        Scalar float32.

    Raises:
        ValueError: lists of different lengths, or see :func:`kd_kl`.
    """
    if len(teacher_probs) != len(teacher_leaves) or len(teacher_probs) == 0:
        raise ValueError("teacher_probs and teacher_leaves must be non-empty lists of the same length")
    regions, background = kd_regions(teacher_probs) if precomputed is None else precomputed
    checked = [_check_kd_inputs(student_logits, probs, leaves, background, tau)
               for probs, leaves in zip(teacher_probs, teacher_leaves, strict=True)]
    targets: list[Tensor] = list(teacher_probs)
    where = [region if poe_background else region | background for region in regions]
    if poe_background:
        n_leaves = student_logits.shape[1]
        targets.append(product_of_experts_background(teacher_probs, teacher_leaves, n_leaves))
        checked.append(list(range(1, n_leaves)))
        where.append(background)
    with float32_island(student_logits):
        return _fused_kd_kl(student_logits.float(), targets, checked, where, tau, 1e-8)


def ms_kd_feature_loss(
    student_feat: Tensor,
    teacher_feats: Sequence[Tensor],
    regions: Sequence[Tensor],
    background: Tensor,
    mode: str = "nearest",
) -> Tensor:
    """The MS-KD feature term: ``sum_j region_affinity_loss(student, teacher_j, [R_j, R_bg])`` with the
    full-resolution regions of :func:`kd_regions` downsampled to the feature size.

    Args:
        student_feat: (B, Cs, *S') student features at the chosen decoder stage.
        teacher_feats: per teacher, (B, Ct_j, *S') features at the same stage.
        regions: per teacher, R_j (B, *S) bool at label resolution.
        background: R_bg (B, *S) bool.
        mode: see :func:`downsample_mask`.

    Returns:
        Scalar float32.
    """
    if len(teacher_feats) != len(regions):
        raise ValueError("teacher_feats and regions must have one entry per teacher")
    size = student_feat.shape[2:]
    background_small = downsample_mask(background, size, mode)
    small = [downsample_mask(region, size, mode) for region in regions]
    widths = {feat.shape[1] for feat in teacher_feats}
    if len(widths) != 1 or any(feat.shape[0] != student_feat.shape[0] or feat.shape[2:] != size
                               for feat in teacher_feats):  # teachers of other widths: one at a time
        total = torch.zeros((), device=student_feat.device)
        for feat, region in zip(teacher_feats, small, strict=True):
            total = total + region_affinity_loss(student_feat, feat, [region, background_small])
        return total
    return _fused_affinity_loss(student_feat, teacher_feats, small, background_small)


def _fused_affinity_loss(student_feat: Tensor, teacher_feats: Sequence[Tensor], regions: Sequence[Tensor],
                         background: Tensor, eps: float = 1e-8) -> Tensor:
    """``sum_j region_affinity_loss(student, teacher_j, [R_j, R_bg])`` for teachers of one width, in a few
    batched operations: the student's affinities to the J + 1 regions once (the loop made its R_bg affinity
    J times) and every teacher's in one stacked computation. Same value as the loop."""
    check_channels_first("student_feat", student_feat)
    for k, region in enumerate([*regions, background]):
        check_spatial(f"regions[{k}]", region, student_feat)
    n = len(teacher_feats)
    with float32_island(student_feat):
        weights = torch.stack([r.reshape(r.shape[0], -1) for r in [*regions, background]], dim=1).float()  # (B, J+1, V)
        counts = weights.sum(-1)  # (B, J+1)
        student = _affinity(student_feat.float().flatten(2), weights, counts, eps)  # (B, J+1, V)
        teachers = torch.stack([f.detach().float().flatten(2) for f in teacher_feats])  # (J, B, Ct, V)
        # teacher j's two regions, R_j and R_bg: (J, B, 2, V) weights and (J, B, 2) counts
        pair_weights = torch.stack([weights[:, :n].transpose(0, 1),
                                    weights[:, n].unsqueeze(0).expand(n, -1, -1)], dim=2)
        pair_counts = pair_weights.sum(-1)
        mean = torch.einsum("jbcv,jbrv->jbrc", teachers, pair_weights) / pair_counts.clamp_min(1).unsqueeze(-1)
        dot = torch.einsum("jbcv,jbrc->jbrv", teachers, mean)
        norms = (teachers * teachers).sum(2).unsqueeze(2) * (mean * mean).sum(-1).unsqueeze(-1)
        teacher = dot / norms.clamp_min(eps * eps).sqrt()  # (J, B, 2, V)
        student_pairs = torch.stack([student[:, :n].transpose(0, 1),
                                     student[:, n].unsqueeze(0).expand(n, -1, -1)], dim=2)
        per_pair = ((student_pairs - teacher) ** 2 * pair_weights).sum(-1) / pair_counts.clamp_min(1)  # (J, B, 2)
        used = (pair_counts > 0).flatten(1).sum(1).clamp_min(1).to(per_pair.dtype)  # per teacher
        return (per_pair.flatten(1).sum(1) / used).sum()
