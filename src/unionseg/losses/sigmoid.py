"""Masked per-channel sigmoid Dice + BCE and the task targets of DoDNet.

Zhang, Xie, Xia and Shen, "DoDNet: Learning to segment multi-organ and tumors from multiple partially
labeled datasets", CVPR 2021: every task (dataset) has C sigmoid output channels; a task that has fewer
classes than C leaves the remaining channels unsupervised, and the loss is Dice + binary cross-entropy over
the supervised channels only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unionseg.labels import BACKGROUND, REGION_PREFIX, LabelSpace
from unionseg.losses._common import check_batch_mask, check_channels_first, check_positive, float32_island


def masked_sigmoid_dice_bce(
    logits: Tensor,
    targets: Tensor,
    channel_mask: Tensor,
    smooth: float = 1e-5,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Sigmoid Dice + BCE over the (sample, channel) pairs that ``channel_mask`` selects.

    Dice: ``1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth)`` per selected pair with
    ``p = sigmoid(logit)``, mean over the selected pairs (empty targets as in
    :func:`unionseg.losses.soft_dice_loss`). BCE: mean over every voxel of the selected pairs. Masked pairs
    contribute nothing and get exactly zero gradient (their logits are replaced before any arithmetic);
    with no selected pair both terms are 0.

    Args:
        logits: (B, C, *S) raw scores.
        targets: (B, C, *S) in {0, 1} (float or bool).
        channel_mask: (B, C) bool, True = supervised.
        smooth: Dice smoothing (> 0).
        dice_weight, bce_weight: multipliers (>= 0) applied to the returned terms.

    Returns:
        ``{"dice": ..., "bce": ...}``, float32 scalars already multiplied by their weights.

    Raises:
        ValueError: mismatched shapes, ``smooth <= 0``, negative weights.
    """
    check_channels_first("logits", logits)
    if targets.shape != logits.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match logits {tuple(logits.shape)}")
    check_batch_mask("channel_mask", channel_mask, logits)
    check_positive("smooth", smooth)
    check_positive("dice_weight", dice_weight, allow_zero=True)
    check_positive("bce_weight", bce_weight, allow_zero=True)
    with float32_island(logits):
        selected = channel_mask.bool().unsqueeze(-1)  # (B, C, 1)
        x = logits.float().flatten(2)
        y = targets.float().flatten(2)
        x = torch.where(selected, x, torch.zeros_like(x))
        y = torch.where(selected, y, torch.zeros_like(y))
        weight = selected.to(x.dtype)
        n_pairs = weight.sum().clamp_min(1)
        bce = (F.binary_cross_entropy_with_logits(x, y, reduction="none") * weight).sum() / (n_pairs * x.shape[-1])
        p = torch.sigmoid(x)
        intersection = (p * y).sum(-1)
        denominator = p.sum(-1) + y.sum(-1)
        dice = (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)) * weight.squeeze(-1)
        dice = dice.sum() / n_pairs
    return {"dice": dice_weight * dice, "bce": bce_weight * bce}


def task_channel_tables(
    channel_keys: Sequence[Sequence[str]], space: LabelSpace
) -> tuple[Tensor, Tensor, Tensor]:
    """Per task and channel: which codes are positive, which are ambiguous, which channels exist.

    A leaf key covers that leaf's code; a region key covers the group's leaf codes and its region code. A
    region code is **ambiguous** for a channel whose key covers only some of the group's leaves (a single
    leaf of the group: the voxel may or may not be that leaf).

    Args:
        channel_keys: per task, the class keys of its channels (leaf names or ``region:<organ>``).

    Returns:
        ``(positive (T, C, n_codes) bool, ambiguous (T, C, n_codes) bool, exists (T, C) bool)`` on the CPU,
        with C the largest number of keys of any task (at least 1).

    Raises:
        ValueError: no task, or a background key.
        ConfigError: a key the label space does not know.
    """
    if len(channel_keys) == 0:
        raise ValueError("channel_keys must list the channel keys of at least one task")
    n_channels = max(1, max(len(keys) for keys in channel_keys))
    code_leaves = torch.as_tensor(space.code_leaf_matrix())  # (n_codes, L)
    positive = torch.zeros(len(channel_keys), n_channels, space.n_codes, dtype=torch.bool)
    ambiguous = torch.zeros_like(positive)
    exists = torch.zeros(len(channel_keys), n_channels, dtype=torch.bool)
    for task, keys in enumerate(channel_keys):
        for channel, key in enumerate(keys):
            if key == BACKGROUND or key == f"{REGION_PREFIX}{BACKGROUND}":
                raise ValueError(f"task {task} channel {channel}: background is not a sigmoid channel")
            key_leaves = torch.zeros(space.n_leaves, dtype=torch.bool)
            key_leaves[list(space.leaves_of(key))] = True
            inside = ~(code_leaves & ~key_leaves).any(-1)
            touches = (code_leaves & key_leaves).any(-1)
            positive[task, channel] = inside
            ambiguous[task, channel] = touches & ~inside
            exists[task, channel] = True
    return positive, ambiguous, exists


def task_targets(
    codes: Tensor,
    task_ids: Tensor,
    channel_keys: Sequence[Sequence[str]],
    space: LabelSpace,
    tables: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Sigmoid targets and channel mask of every sample from its codes and its task.

    Channel j of task t means ``channel_keys[t][j]``. The target is 1 where the voxel's code lies in that
    class: a region key covers the group's leaves and its region code, a leaf key covers the leaf only.
    Channels a task lacks are masked. Ambiguity (our choice): a region-coded voxel (organ known, leaf
    unknown) cannot say whether a single leaf of that group is present, so a leaf channel is masked for
    every sample that contains the region code of the leaf's group (no per-voxel guess is made; the
    region channel still supervises those voxels).

    Args:
        codes: (B, *S) integer codes.
        task_ids: (B,) integer task index per sample, in ``0..len(channel_keys)-1``.
        channel_keys: per task, its channel keys (at most C; C = the longest list).
        space: the label space.
        tables: :func:`task_channel_tables` of ``channel_keys``, on the codes' device (a caller that keeps
            them saves their build and the host-to-device copy, which waits for the GPU, at every step).

    Returns:
        ``(targets (B, C, *S) float32 in {0, 1}, mask (B, C) bool)`` on the codes' device.

    Raises:
        ValueError: task ids out of range (where they are on the CPU) or not (B,); see :func:`task_channel_tables`.
    """
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if tuple(task_ids.shape) != (codes.shape[0],):
        raise ValueError(f"task_ids must have shape ({codes.shape[0]},), got {tuple(task_ids.shape)}")
    n_tasks = len(channel_keys)
    # checked where the ids are on the host: on a GPU the check would wait for the device every step (the
    # trainer's ids come from its own sampler there; an id out of range still fails, in the gather below)
    if task_ids.numel() and task_ids.device.type == "cpu" and \
            (int(task_ids.min()) < 0 or int(task_ids.max()) >= n_tasks):
        raise ValueError(f"task_ids must lie in 0..{n_tasks - 1}, got {task_ids.tolist()}")
    positive, ambiguous, exists = (t.to(codes.device) for t in tables or task_channel_tables(channel_keys, space))
    tasks = task_ids.long().to(codes.device)
    batch = codes.shape[0]
    flat = codes.reshape(batch, -1).long()
    lookup = positive[tasks]  # (B, C, n_codes)
    targets = torch.gather(lookup, 2, flat.unsqueeze(1).expand(-1, lookup.shape[1], -1))
    present = torch.zeros(batch, space.n_codes, dtype=torch.bool, device=codes.device).scatter_(1, flat, True)
    blocked = (ambiguous[tasks] & present.unsqueeze(1)).any(-1)
    mask = exists[tasks] & ~blocked
    return targets.float().reshape(batch, lookup.shape[1], *codes.shape[1:]), mask


def cross_task_negative_table(channel_keys: Sequence[Sequence[str]], space: LabelSpace) -> Tensor:
    """(T, C, n_codes) bool: which codes are a certain NEGATIVE of channel (t, c) in any sample.

    Organs do not overlap, so a voxel whose ground truth shows a structure (a foreground leaf or region
    code) that shares no leaf with the channel's key is certainly not that channel's class, whichever
    dataset the sample comes from. Background (code 0) is never a negative: in a partially labelled sample
    it may hide an unannotated organ. Missing channels have no negatives.
    """
    positive, ambiguous, exists = task_channel_tables(channel_keys, space)
    foreground = ~torch.as_tensor(space.code_leaf_matrix())[:, 0]
    return exists.unsqueeze(-1) & foreground & ~(positive | ambiguous)  # no leaf shared with the key


def cross_task_negative_bce(
    logits: Tensor,
    codes: Tensor,
    task_ids: Tensor,
    channel_keys: Sequence[Sequence[str]],
    space: LabelSpace,
    table: Tensor | None = None,
) -> Tensor:
    """BCE towards 0 for the OTHER tasks' channels on this sample's known negatives (our extension).

    A task-conditioned sigmoid head (DoDNet, multihead, conditional) is trained only on its own dataset, so
    nothing tells the liver head that a kidney, labelled in another dataset, is not liver; with a site
    or phase shift between datasets it fires there, and the merge of all tasks gives the kidney away.
    The labels that exist say more: where sample b's ground truth shows a structure (code) disjoint from
    channel (t, c) of another task t, the channel's target is certainly 0
    (:func:`cross_task_negative_table`). This is the sigmoid counterpart of the marginal baseline's
    exclusion loss (Shi et al., MedIA 2021); it needs the all-tasks forward in training.

    Per (sample, other task, channel) pair: the mean of ``softplus(logit)`` (BCE with target 0) over its
    negative voxels; averaged over the pairs with at least one; 0 when there is none.

    Args:
        logits: (B, T, C, *S) every task's logits for every sample.
        codes: (B, *S) integer codes.
        task_ids: (B,) the sample's own task (never penalised here; its own loss supervises it).
        channel_keys: per task, its channel keys.
        space: the label space.
        table: :func:`cross_task_negative_table` of ``channel_keys`` (computed when None; a training
            loop passes it once built, on the codes' device).

    Returns:
        Scalar float32 (>= 0).

    Raises:
        ValueError: shapes that do not match each other or the tasks.
    """
    if logits.dim() < 3 or logits.shape[1] != len(channel_keys):
        raise ValueError(f"logits must be (B, T={len(channel_keys)}, C, *S), got {tuple(logits.shape)}")
    if codes.shape != (logits.shape[0], *logits.shape[3:]):
        raise ValueError(f"codes {tuple(codes.shape)} must be (B, *S) of logits {tuple(logits.shape)}")
    if tuple(task_ids.shape) != (logits.shape[0],):
        raise ValueError(f"task_ids must have shape ({logits.shape[0]},), got {tuple(task_ids.shape)}")
    batch, n_tasks = logits.shape[:2]
    if table is None:
        table = cross_task_negative_table(channel_keys, space)
    table = table.to(codes.device)
    if table.shape[1] != logits.shape[2]:
        raise ValueError(f"logits have {logits.shape[2]} channels per task, the keys need {table.shape[1]}")
    flat = codes.reshape(batch, -1).long()
    negative = table[:, :, flat].permute(2, 0, 1, 3)  # (B, T, C, V)
    other = torch.arange(n_tasks, device=codes.device)[None, :] != task_ids.long().to(codes.device)[:, None]
    negative = negative & other[:, :, None, None]
    with float32_island(logits):
        x = logits.float().flatten(3)
        count = negative.sum(-1)
        per_pair = torch.where(negative, F.softplus(x), torch.zeros_like(x)).sum(-1) / count.clamp_min(1)
        pairs = count > 0
        return per_pair.sum() / pairs.sum().clamp_min(1).to(per_pair.dtype)


def sigmoid_leaf_logits(logits: Tensor, channels: Sequence[str], space: LabelSpace) -> Tensor:
    """Leaf logits whose softmax holds the decision the merge function reads off sigmoid channels.

    The merge (:func:`unionseg.labels.merge` through :func:`unionseg.outputs.sigmoid_to_groups`, at its
    default threshold 0.5) takes each group's region probability as the largest sigmoid of its channels
    (region channels and the group's tumour channels), the group with the highest one, and background where
    that stays at or below 0.5; inside the group, the part with the largest sigmoid where it exceeds 0.5.
    With ``z_g`` the largest logit of the group's channels and ``y_k`` the largest of part k's, the leaf
    logits are:

    * background: 0;
    * organ leaf of group g: ``z_g - logsumexp(0, y_j for the parts j of g)``;
    * part k of group g: ``z_g + y_k - logsumexp(0, y_j for the parts j of g)``.

    Summed per group, the softmax gives ``P(group g) = e^{z_g} / (1 + sum_h e^{z_h})``: the largest group
    mass is the merge's group, and a group beats background exactly where ``z_g > 0``. Inside a group the
    leaves share its mass as ``1 : e^{y_1} : ...``, so the largest leaf there is the merge's leaf. (A
    plain argmax over all leaves may differ: a group's mass can be split among its leaves.) A channel
    that is missing counts as a logit of -1e4 (probability 0 in float32, as the merge gives it).

    Args:
        logits: (B, K, *S) the sigmoid channels' logits.
        channels: the K channel keys (region keys, leaf names; a key may repeat, one per task).
        space: the label space.

    Returns:
        (B, L, *S) float32 leaf logits, in the label space's leaf order.

    Raises:
        ValueError: ``logits`` whose channel count is not ``len(channels)``.
    """
    from unionseg.outputs import sigmoid_sources

    check_channels_first("logits", logits)
    if logits.shape[1] != len(channels):
        raise ValueError(f"logits have {logits.shape[1]} channels, the keys name {len(channels)}")
    region_src, part_src = sigmoid_sources(channels, space)
    with float32_island(logits):
        x = logits.float()
        absent = x.new_full((x.shape[0], *x.shape[2:]), -1e4)

        def largest(sources: list[int]) -> Tensor:
            return x[:, sources].amax(1) if sources else absent

        part_row = {leaf: k for k, leaf in enumerate(space.part_ids)}
        parts = [largest(src) for src in part_src]
        leaves = [torch.zeros_like(absent)] * space.n_leaves  # background; every other leaf is set below
        for grp, src in zip(space.groups, region_src, strict=True):
            z = largest(src)
            own = [parts[part_row[p]] for p in grp.part_ids]
            norm = torch.logsumexp(torch.stack([torch.zeros_like(z), *own]), 0) if own else torch.zeros_like(z)
            leaves[grp.organ_id] = z - norm
            for p, y in zip(grp.part_ids, own, strict=True):
                leaves[p] = z + y - norm
        return torch.stack(leaves, 1)


class MaskedSigmoidDiceBCE(nn.Module):
    """:func:`masked_sigmoid_dice_bce` as a module (DoDNet, Zhang et al., CVPR 2021).

    Args:
        dice_weight, bce_weight: weights (>= 0, not both 0).
        smooth: Dice smoothing (> 0).

    Raises:
        ValueError: negative or all-zero weights, ``smooth <= 0``.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1e-5) -> None:
        super().__init__()
        check_positive("dice_weight", dice_weight, allow_zero=True)
        check_positive("bce_weight", bce_weight, allow_zero=True)
        check_positive("smooth", smooth)
        if dice_weight == bce_weight == 0:
            raise ValueError("MaskedSigmoidDiceBCE: dice_weight and bce_weight cannot both be 0")
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.smooth = smooth

    def forward(self, logits: Tensor, targets: Tensor, channel_mask: Tensor) -> dict[str, Tensor]:
        """(B, C, *S) logits and targets, (B, C) mask -> weighted ``dice`` and ``bce``."""
        return masked_sigmoid_dice_bce(logits, targets, channel_mask, self.smooth, self.dice_weight,
                                       self.bce_weight)
