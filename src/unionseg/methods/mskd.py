"""MS-KD: multi-teacher single-student knowledge distillation (Feng et al., "MS-KD: Multi-organ segmentation
with multiple binary-labeled datasets", 2021, arXiv:2108.02559).

Teachers are the shared experts (frozen, eval mode, no gradient). The student is one softmax network over
all leaves. Per voxel, teacher j owns the region R_j where it predicts its foreground (ties: the most
confident teacher), and R_bg is where every teacher predicts background.

* Logit-wise: ``sum_j mean over (R_j U R_bg) of tau^2 KL(t_j^tau || map_j(q)^tau)``, where map_j keeps j's
  leaves and sums every other leaf of the student into j's background. Teacher probabilities come from the
  artefact cache, cropped and augmented with the patch (aligned extras), not from teacher forward passes.
* Feature-wise: at one decoder stage, inside R_j and R_bg (downsampled), the student's region affinity
  (cosine similarity of each voxel's feature to the region's mean feature) matches teacher j's; the
  teachers run only up to that stage.
* Total ``L_logit + w_feat L_feat + w_gt (marginal CE + Dice on the ground truth)``.

Our interpretation where the paper is silent (also in docs/methods.md): tau = 2; the feature stage is the
second-finest decoder stage; w_feat = 0.5; w_gt = 1; the logit term is averaged over teachers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from unionseg.methods.base import ExtraSpec, register_method
from unionseg.methods.baselines import SoftmaxMethod


@dataclass(frozen=True)
class MSKDOptions:
    tau: float = 2.0
    w_logit: float = 1.0
    w_feat: float = 0.5
    w_gt: float = 1.0
    feature_stage: int = -2
    poe_background: bool = False  # option: one merged product-of-experts target in R_bg
    # how R_j and R_bg shrink to the feature stage's size: "nearest" keeps every other voxel at half
    # resolution (a thin organ can fall between them), "max" keeps a feature voxel that any of its voxels is in
    feature_regions: str = "nearest"

    def validate(self) -> None:
        from unionseg.losses.distillation import DOWNSAMPLE_MODES

        if self.tau <= 0:
            raise ValueError("tau must be positive")
        if self.feature_regions not in DOWNSAMPLE_MODES:
            raise ValueError(f"feature_regions must be one of {list(DOWNSAMPLE_MODES)}, got {self.feature_regions!r}")
        if min(self.w_logit, self.w_feat, self.w_gt) < 0:
            raise ValueError("loss weights must be >= 0")


@register_method("mskd")
class MSKDMethod(SoftmaxMethod):
    """One student distilled from the per-dataset experts."""
    summary = "Feng et al. 2021: the experts distil into one student (logits and features)"

    Options = MSKDOptions
    stages = ("experts", "teacher_probabilities", "train")

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        from unionseg.methods.expert import expert_subspace

        self.teachers = list(ctx.train_datasets)
        subspaces = [expert_subspace(self.space, d) for d in self.teachers]
        self.teacher_leaves = [leaves for _, _, leaves in subspaces]
        # each teacher's organ groups as its channels (its own leaf ids), for the merge of kd_regions
        self.teacher_groups = [[list(g.leaf_ids) for g in sub.groups] for sub, _, _ in subspaces]

    def extras(self) -> dict[str, ExtraSpec]:
        art = self.ctx.artifacts
        assert art is not None
        return {f"teacher_{j}": ExtraSpec("prob", functools.partial(art.load_probs, name))
                for j, name in enumerate(self.teachers)}

    def _teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        assert self.ctx.artifacts is not None
        feats = []
        with torch.no_grad():
            for name in self.teachers:
                module, _, _ = self.ctx.artifacts.load_expert(name)
                backbone: Any = module.backbone
                feats.append(backbone.features_upto(x, self.options.feature_stage))
        return feats

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        from unionseg.losses import kd_regions, marginal_loss, ms_kd_feature_loss, ms_kd_logit_loss

        o = self.options
        x = batch["image"]
        need_feat = o.w_feat > 0
        out = self.models["net"](x, return_features=need_feat)
        logits, feats = out if need_feat else (out, None)
        teacher_probs = [batch[f"teacher_{j}"] for j in range(len(self.teachers))]
        n = len(self.teachers)
        regions, background = kd_regions(teacher_probs, self.teacher_groups)  # shared by logit and feature terms
        logit = ms_kd_logit_loss(logits, teacher_probs, self.teacher_leaves, o.tau, o.poe_background,
                                 precomputed=(regions, background)) / n
        loss = o.w_logit * logit
        terms: dict[str, torch.Tensor] = {"logit": logit.detach()}
        if need_feat:
            assert feats is not None
            feat = ms_kd_feature_loss(feats.decoder[o.feature_stage], self._teacher_features(x), regions, background,
                                      o.feature_regions) / n
            loss = loss + o.w_feat * feat
            terms["feature"] = feat.detach()
        if o.w_gt > 0:
            gt = marginal_loss(logits, batch["label"], batch["annotated"], self.space)
            loss = loss + o.w_gt * (gt["ce"] + gt["dice"])
            terms["gt_ce"] = gt["ce"].detach()
            terms["gt_dice"] = gt["dice"].detach()
        return {"loss": loss, **terms}
