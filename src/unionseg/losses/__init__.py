"""Losses: Dice, CE + Dice, focal, marginal and exclusion, masked sigmoid, co-training soft CE, distillation.

Every loss is a pure function of tensors (shapes (B, C, *S), computed in float32 even under AMP), most with
a thin ``nn.Module`` wrapper that validates its options in ``__init__``. Each module docstring cites its
paper; choices the papers leave open are marked "our interpretation".
"""

from unionseg.losses._common import float32_island
from unionseg.losses.cotraining import cotraining_terms, sigmoid_rampup, soft_ce
from unionseg.losses.dice import ce_dice_loss, dice_from_sums, one_hot, soft_dice_loss
from unionseg.losses.distillation import (
    downsample_mask,
    kd_kl,
    kd_regions,
    map_log_probs_to_teacher,
    map_to_teacher,
    ms_kd_feature_loss,
    ms_kd_logit_loss,
    product_of_experts_background,
    region_affinity_loss,
    temper,
)
from unionseg.losses.focal import FocalLoss, focal_loss, inverse_frequency_weights
from unionseg.losses.partial import (
    MarginalLoss,
    exclusion_loss,
    marginal_channels,
    marginal_loss,
    merged_channels,
)
from unionseg.losses.sigmoid import (
    MaskedSigmoidDiceBCE,
    cross_task_negative_bce,
    cross_task_negative_table,
    masked_sigmoid_dice_bce,
    sigmoid_leaf_logits,
    task_channel_tables,
    task_targets,
)

__all__ = [
    "FocalLoss",
    "MarginalLoss",
    "MaskedSigmoidDiceBCE",
    "ce_dice_loss",
    "cotraining_terms",
    "cross_task_negative_bce",
    "cross_task_negative_table",
    "dice_from_sums",
    "downsample_mask",
    "exclusion_loss",
    "float32_island",
    "focal_loss",
    "inverse_frequency_weights",
    "kd_kl",
    "kd_regions",
    "map_log_probs_to_teacher",
    "map_to_teacher",
    "marginal_channels",
    "marginal_loss",
    "masked_sigmoid_dice_bce",
    "merged_channels",
    "ms_kd_feature_loss",
    "ms_kd_logit_loss",
    "one_hot",
    "product_of_experts_background",
    "region_affinity_loss",
    "sigmoid_leaf_logits",
    "sigmoid_rampup",
    "soft_ce",
    "soft_dice_loss",
    "task_channel_tables",
    "task_targets",
    "temper",
]
