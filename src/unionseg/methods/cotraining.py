"""Co-training of weight-averaged models (Huang et al., "Multi-organ segmentation via co-training
weight-averaged models from few-organ datasets", MICCAI 2020).

Stage 1 (shared artefacts): the experts pseudo-label every training case for the classes its dataset does
not annotate (merge over the OTHER datasets' experts; ground truth wins on annotated classes).
Stage 2: networks A and B (same architecture, different random initialisation) each keep a temporally
weighted average A', B'. For A (symmetric for B), on the same batch::

    L_A = w_f * Focal(p_A, yhat) + w_d * Dice(p_A, yhat) + w_s * r(t) * SoftCE(q_B', p_A; R)

with yhat the pseudo labels (aligned with the patch by the sampler), q_B' the partner average's softmax
(no gradient), R the region mask and r(t) a sigmoid ramp-up.
Stage 3: the better-validating average is deployed (one network, one forward pass).

Our interpretation where the paper is silent (also in docs/methods.md):
* R, by default, is every voxel without ground truth for the sample: outside the annotated classes'
  ground-truth foreground (code 0: unannotated organs and uncertain background). ``region:
  dilated_pseudo`` restricts it to a dilation (in mm) of the pseudo-labelled unannotated organs.
* The average's half-life is ``half_life_fraction`` of the run with the warm-up
  ``d_t = min(d, (1+t)/(10+t))``; the soft term ramps up as exp(-5 (1 - t/T)^2) over ``rampup_fraction``.
* Focal class weights: none by default (``focal_weights: none``, the focal term alone handles the
  imbalance); ``inverse_frequency`` weighs each class by the inverse of its pseudo-label frequency in the
  batch. That was our first reading; on validation it made the networks over-segment (kidney 2.9 x,
  pancreas 3.5 x the true volume), see docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from unionseg.methods.base import Deployed, ExtraSpec, register_method
from unionseg.methods.baselines import SoftmaxMethod
from unionseg.training.ema import WeightAverage, decay_from_half_life


@dataclass(frozen=True)
class CotrainingOptions:
    w_f: float = 1.0
    w_d: float = 1.0
    w_s: float = 1.0
    focal_gamma: float = 2.0
    focal_weights: str = "none"  # or "inverse_frequency" (per batch, normalised)
    half_life_fraction: float = 0.05
    rampup_fraction: float = 0.2
    use_average: bool = True  # ablation: the partner's raw network instead of its average
    use_region_mask: bool = True  # ablation: soft loss on every voxel
    cotrain: bool = True  # ablation: a single mean teacher (own average) instead of the partner's
    region: str = "no_ground_truth"  # or "dilated_pseudo"
    dilation_mm: float = 10.0

    def validate(self) -> None:
        if self.region not in ("no_ground_truth", "dilated_pseudo"):
            raise ValueError(f"region: {self.region!r} is not one of ['no_ground_truth', 'dilated_pseudo']")
        if self.focal_weights not in ("none", "inverse_frequency"):
            raise ValueError(f"focal_weights: {self.focal_weights!r} is not one of ['none', 'inverse_frequency']")
        if not 0 < self.half_life_fraction <= 1:
            raise ValueError("half_life_fraction must be in (0, 1]")
        if min(self.w_f, self.w_d, self.w_s) < 0:
            raise ValueError("loss weights must be >= 0")


def region_mask(codes: torch.Tensor, pseudo: torch.Tensor, annotated: torch.Tensor, n_leaves: int, mode: str,
                dilation_voxels: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """(B, *S) bool: where the soft (partner) loss applies.

    ``no_ground_truth``: voxels outside the annotated ground-truth foreground (code 0) of a sample whose
    dataset leaves some class unannotated: in a fully labelled dataset's sample code 0 is known background,
    which the partner's soft target must not override (helper-100). ``dilated_pseudo``: a dilation of the
    pseudo-labelled UNannotated organs, still outside the annotated ground truth.
    """
    outside_gt = codes == 0
    if mode == "no_ground_truth":
        partial = (~annotated[:, 1:].bool()).any(1)  # (B,): some class this sample's dataset does not label
        return outside_gt & partial.view(-1, *([1] * (codes.dim() - 1)))
    unannotated = ~annotated.bool()  # (B, L)
    unannotated[:, 0] = False
    pseudo_organ = torch.gather(unannotated, 1, pseudo.long().flatten(1).clamp_max(n_leaves - 1)).view_as(pseudo)
    kernel = tuple(2 * r + 1 for r in dilation_voxels)
    dilated = F.max_pool3d(pseudo_organ[:, None].float(), kernel_size=kernel, stride=1,
                           padding=tuple(dilation_voxels))[:, 0] > 0
    return dilated & outside_gt


@register_method("cotraining")
class CotrainingMethod(SoftmaxMethod):
    """Two networks with weight averages, co-trained on pseudo labels and each other's averages."""
    summary = ("Huang et al., MICCAI 2020: pseudo labels from the experts, two co-trained networks and their "
               "weight averages")

    Options = CotrainingOptions
    stages = ("experts", "pseudo_labels", "train")
    cannot_start_from_a_model = "its two networks start from different draws, and it deploys a weight average"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self._averages: dict[str, WeightAverage] = {}
        self.selected = "avg_A"
        spacing = ctx.project.preprocessing.spacing
        self.dilation = tuple(max(0, round(self.options.dilation_mm / s)) for s in spacing)

    # stage 1 (experts, pseudo labels) is the shared-artefact stage of Method.run_stage ---------------------
    def extras(self) -> dict[str, ExtraSpec]:
        assert self.ctx.artifacts is not None
        return {"pseudo": ExtraSpec("label", self.ctx.artifacts.load_pseudo)}

    # stage 2 -------------------------------------------------------------------------------------------
    def build(self) -> dict[str, torch.nn.Module]:
        from unionseg.networks import build_network

        spec = self.network_spec()
        net_a = build_network(spec)  # A and B: the same recipe, different draws of the initialisation
        net_b = build_network(spec)
        half_life = max(1.0, self.options.half_life_fraction * self.ctx.cfg.steps)
        decay = decay_from_half_life(half_life)
        device = self.ctx.device
        self._averages = {"avg_A": WeightAverage(net_a, decay).to(device), "avg_B": WeightAverage(net_b, decay).to(device)}
        return {"A": net_a, "B": net_b}

    def averages(self) -> dict[str, WeightAverage]:
        return self._averages

    def _teacher(self, own: str, partner: str, x: torch.Tensor) -> torch.Tensor:
        """The soft target for network ``own``: the partner's average (default) or an ablation's choice."""
        source = partner if self.options.cotrain else own
        with torch.no_grad():
            if self.options.use_average:
                logits = self._averages[f"avg_{source}"](x)
            else:  # the raw network as a teacher (an ablation): in eval mode, as the averages are (no dropout)
                net = self.raw_models[source]
                net.eval()
                try:
                    logits = net(x)
                finally:
                    net.train()
            return torch.softmax(logits.float(), dim=1)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        from unionseg.losses import cotraining_terms, inverse_frequency_weights, sigmoid_rampup

        o = self.options
        x, pseudo = batch["image"], batch["pseudo"].long()
        n = self.space.n_leaves
        weights = inverse_frequency_weights(pseudo, n) if o.focal_weights == "inverse_frequency" else None
        if o.use_region_mask:
            region = region_mask(batch["label"], pseudo, batch["annotated"], n, o.region, self.dilation)
        else:
            region = torch.ones_like(pseudo, dtype=torch.bool)
        ramp = sigmoid_rampup(step, max(1, int(o.rampup_fraction * self.ctx.cfg.steps)))
        need_soft = o.w_s > 0
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=x.device)
        for own, partner in (("A", "B"), ("B", "A")):
            logits = self.models[own](x)
            # focal + Dice on the pseudo labels and the soft CE on the partner's average, from one softmax
            # (losses.cotraining_terms: the same values and gradients as focal_loss, soft_dice_loss and soft_ce)
            parts = cotraining_terms(logits, pseudo, self._teacher(own, partner, x) if need_soft else None,
                                     region if need_soft else None, gamma=o.focal_gamma, class_weights=weights)
            loss = o.w_f * parts["focal"] + o.w_d * parts["dice"]
            terms[f"{own}/focal"] = parts["focal"].detach()
            terms[f"{own}/dice"] = parts["dice"].detach()
            if need_soft:
                loss = loss + o.w_s * ramp * parts["soft"]
                terms[f"{own}/soft"] = parts["soft"].detach()
            total = total + loss
        terms["rampup"] = torch.full((), float(ramp), device=total.device)  # filled there: no host copy
        terms["region_fraction"] = region.float().mean().detach()
        return {"loss": total, **terms}

    def after_step(self, step: int) -> None:
        self._averages["avg_A"].update(self.raw_models["A"])
        self._averages["avg_B"].update(self.raw_models["B"])

    # stage 3 -------------------------------------------------------------------------------------------
    def candidates(self) -> dict[str, Deployed]:
        spec = self.network_spec()
        return {name: Deployed(avg.module, spec, "softmax", list(self.space.names))
                for name, avg in self._averages.items()}

    def select(self, name: str) -> None:
        self.selected = name

    def deploy(self) -> Deployed:
        return self.candidates()[self.selected]

    def state_dict(self) -> dict[str, Any]:
        return {"selected": self.selected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selected = str(state.get("selected", "avg_A"))
