"""An example unionseg plugin: a new method, ``marginal_batch_dice``, in one file outside the package.

It is the ``marginal`` baseline's loss (Shi et al., MedIA 2021) with its Dice term pooled over the batch
(nnU-Net's "batch Dice") and without the exclusion term: the kind of ablation a study adds. Load it with

    UNIONSEG_PLUGINS=marginal_batch_dice PYTHONPATH=examples/plugins unionseg methods
    UNIONSEG_PLUGINS=marginal_batch_dice PYTHONPATH=examples/plugins unionseg train PROJECT \\
        --method marginal_batch_dice -o runs/mbd options.dice_weight=0.5

or, from Python, import this module before ``train_config`` / ``train``. docs/extending.md walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from unionseg.methods.base import register_method
from unionseg.methods.baselines import SoftmaxMethod


@dataclass(frozen=True)
class MarginalBatchDiceOptions:
    """What ``options.KEY=VALUE`` may set (a frozen dataclass: an unknown key or a wrong type is refused)."""

    dice_weight: float = 1.0


@register_method("marginal_batch_dice")
class MarginalBatchDiceMethod(SoftmaxMethod):
    """One softmax network over every leaf (``SoftmaxMethod`` builds and deploys it), trained on the
    marginal loss with the batch's Dice."""

    summary = "example plugin: the marginal loss with its Dice pooled over the batch, no exclusion term"
    Options = MarginalBatchDiceOptions

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        from unionseg.losses import marginal_loss

        logits = self.models["net"](batch["image"])
        terms = marginal_loss(logits, batch["label"], batch["annotated"], self.space,
                              dice_weight=self.options.dice_weight, batch_dice=True)
        # "loss" is what the trainer back-propagates; the other terms are logged beside it
        return {"loss": terms["ce"] + terms["dice"], **terms}
