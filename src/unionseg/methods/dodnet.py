"""DoDNet: dynamic on-demand network (Zhang et al., "DoDNet: Learning to segment multi-organ and tumors
from multiple partially labeled datasets", CVPR 2021), and the task-conditioned family it is compared with.

Tasks are the training datasets. Task t has at most C sigmoid channels whose meanings come from the label
space (:func:`task_channels`): a region channel per organ group the dataset annotates fully, then a
channel per annotated part (tumour). Channels a task lacks are masked in the loss (Dice + BCE).
At inference the backbone runs ONCE per window and the heads of ALL tasks run in one batched call; the
channels are decoded together by the merge function into one label map with every organ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from unionseg.errors import ConfigError
from unionseg.labels import LabelSpace, region_name
from unionseg.methods.base import Deployed, Method, register_method


def task_channels(space: LabelSpace, dataset: str) -> list[str]:
    """Channel keys of one task: fully annotated organ regions, then annotated parts (tumours)."""
    mask = space.annotated_leaf_mask(dataset)
    regions = [region_name(g.name) for g in space.groups if all(mask[i] for i in g.leaf_ids)]
    parts = [space.names[i] for i in space.part_ids if mask[i]]
    partial = [g.name for g in space.groups if mask[g.organ_id] and not all(mask[i] for i in g.leaf_ids)]
    if partial:
        raise ConfigError(f"dataset {dataset!r} annotates organ {partial[0]!r} but not all of its parts; a sigmoid "
                          "task needs the whole region (annotate the region or every part)")
    return regions + parts


class ChannelSelect(nn.Module):
    """Keep the meaningful channels of an all-tasks forward (drops the masked padding channels)."""

    def __init__(self, net: nn.Module, indices: list[int]) -> None:
        super().__init__()
        self.net = net
        # on the wrapped net's device: deploy() wraps a net already on the GPU, and nothing moves the wrapper
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x, None)
        return out.index_select(1, self.indices.to(out.device))


@dataclass(frozen=True)
class TaskOptions:
    """The options of every task-conditioned method (DoDNet, multihead, conditional): the loss and the
    learning rate. The dynamic head's own options are :class:`DoDNetOptions`'s; the static baselines refuse
    them (they have nothing they could change)."""

    # learning-rate multiplier of the whole network (1 = the budget's lr): the budget stays one object shared by
    # every method, and a task-conditioned run may still train slower (docs/dodnet_investigation.md, the learning-rate screen)
    lr_scale: float = 1.0
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    # our extension, 0 = the paper: weight of the cross-task negatives (losses.cross_task_negative_bce); > 0
    # trains through the all-tasks forward (conditional: one backbone pass per task, T times the step)
    cross_task_weight: float = 0.0
    # our extension, 0 = the paper: weight of the marginal loss (losses.marginal_loss, CE + Dice) on the leaf
    # distribution the merge reads off every task's channels (losses.sigmoid_leaf_logits); > 0 trains through
    # the all-tasks forward, as cross_task_weight does
    merged_weight: float = 0.0

    def validate(self) -> None:
        if not all(w >= 0 for w in (self.dice_weight, self.bce_weight, self.cross_task_weight,
                                    self.merged_weight)):  # NaN too
            raise ValueError("loss weights must be >= 0")
        if not self.lr_scale > 0:
            raise ValueError("lr_scale must be > 0")


@dataclass(frozen=True)
class DoDNetOptions(TaskOptions):
    feature_channels: int = 8
    head_widths: tuple[int, ...] = (8, 8)
    # off = DoDNet's controller; on = our Adam-motivated variant (see DynamicHead). On the standard suite it did
    # not rescue DoDNet at 1,000 steps (docs/dodnet_investigation.md has the figures), so the paper's form is the default.
    equalized_controller: bool = False
    # Adam step of the image-dependent part of the generated head as a multiple of the budget's lr per pooled
    # feature: the gain of the controller's pooled-feature columns (DynamicHead.image_gain; 1 = DoDNet)
    image_lr_scale: float = 1.0
    # generated head biases start at 0 (see DynamicHead); False = PyTorch's default init, as the official code
    zero_bias_init: bool = False
    # every task starts from its own fan-in-scaled head, image dependence and biases at zero (DynamicHead)
    fan_in_init: bool = False
    # Adam step of the task-specific part of the generated head as a multiple of the budget's lr: the gain of the
    # controller's task-code columns (DynamicHead.task_gain; 1 = DoDNet)
    task_lr_scale: float = 1.0
    # slope of the dynamic head's hidden activations for negative inputs: 0 = ReLU (the paper's head)
    negative_slope: float = 0.0
    # learning-rate multiplier of the controller (1 = the budget's lr): see DoDNetMethod.lr_scales
    controller_lr_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not 0 < self.image_lr_scale <= 1:
            raise ValueError("image_lr_scale must lie in (0, 1]")
        if not 0 < self.task_lr_scale <= 64:
            raise ValueError("task_lr_scale must lie in (0, 64]")
        if not self.controller_lr_scale > 0:
            raise ValueError("controller_lr_scale must be > 0")


class TaskMethod(Method):
    """One shared backbone with a task-conditioned head; sigmoid per channel, masked Dice + BCE."""

    head_name: ClassVar[str] = ""
    Options: ClassVar[type] = TaskOptions

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.task_keys = [task_channels(self.space, d) for d in self.datasets()]
        self.n_channels = max(len(k) for k in self.task_keys)
        # the meaningful channels of the all-tasks output (B, T * C, ...): their indices (task-major) and keys
        self.channel_indices = [t * self.n_channels + c for t, keys in enumerate(self.task_keys) for c in range(len(keys))]
        self.channel_keys = [key for keys in self.task_keys for key in keys]
        self._negatives: torch.Tensor | None = None  # cross_task_negative_table, built on first use
        self._tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # task_channel_tables, alike

    def lr_scales(self) -> dict[str, float]:
        """``lr_scale`` for every parameter of the network (empty at 1: the budget's lr)."""
        scale = float(self.options.lr_scale)
        return {} if scale == 1.0 else {"net": scale}

    def head_spec(self) -> dict[str, Any]:
        return {"name": self.head_name, "n_tasks": len(self.task_keys), "out_channels": self.n_channels}

    def network_spec(self) -> dict[str, Any]:
        return {"backbone": self.ctx.cfg.network.backbone_spec(), "head": self.head_spec()}

    def build(self) -> dict[str, nn.Module]:
        from unionseg.networks import build_network

        return {"net": build_network(self.network_spec())}

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        from unionseg.losses import (
            cross_task_negative_bce,
            cross_task_negative_table,
            marginal_loss,
            masked_sigmoid_dice_bce,
            sigmoid_leaf_logits,
            task_channel_tables,
            task_targets,
        )

        task_ids = batch["dataset_id"]
        o = self.options
        net = self.models["net"]
        cross = merged = None
        if o.cross_task_weight > 0 or o.merged_weight > 0:
            # every task's head on every sample: the sample's own task is supervised as usual, the others
            # learn what the sample's labels rule out (cross-task negatives) and all of them compete as the
            # merge makes them compete (the merged loss)
            every = net(batch["image"], None)
            every = every.reshape(every.shape[0], len(self.task_keys), self.n_channels, *every.shape[2:])
            logits = every[torch.arange(every.shape[0], device=every.device), task_ids.long().to(every.device)]
            if o.cross_task_weight > 0:
                if self._negatives is None or self._negatives.device != every.device:
                    self._negatives = cross_task_negative_table(self.task_keys, self.space).to(every.device)
                cross = cross_task_negative_bce(every, batch["label"], task_ids, self.task_keys, self.space,
                                                table=self._negatives)
            if o.merged_weight > 0:
                flat = every.flatten(1, 2)[:, self.channel_indices]
                merged = marginal_loss(sigmoid_leaf_logits(flat, self.channel_keys, self.space), batch["label"],
                                       batch["annotated"], self.space)
        else:
            logits = net(batch["image"], task_ids)
        codes = batch["label"]
        if self._tables is None or self._tables[0].device != codes.device:  # built and moved once, not per step
            positive, ambiguous, exists = task_channel_tables(self.task_keys, self.space)
            self._tables = (positive.to(codes.device), ambiguous.to(codes.device), exists.to(codes.device))
        targets, mask = task_targets(codes, task_ids, self.task_keys, self.space, tables=self._tables)
        terms = masked_sigmoid_dice_bce(logits, targets, mask)
        loss = o.dice_weight * terms["dice"] + o.bce_weight * terms["bce"]
        out = dict(terms)
        if cross is not None:
            loss = loss + o.cross_task_weight * cross
            out["cross_task"] = cross
        if merged is not None:
            loss = loss + o.merged_weight * (merged["ce"] + merged["dice"])
            out["merged_ce"], out["merged_dice"] = merged["ce"], merged["dice"]
        return {"loss": loss, **out}

    def deploy(self) -> Deployed:
        indices = list(self.channel_indices)
        module = ChannelSelect(self.raw_models["net"], indices)
        spec = {"kind": "select", "network": self.network_spec(), "indices": indices}
        return Deployed(module, spec, "sigmoid", list(self.channel_keys))


@register_method("dodnet")
class DoDNetMethod(TaskMethod):
    """Dynamic head: GAP(bottleneck) + task one-hot -> controller -> 1x1x1 conv weights (8-8-C)."""
    summary = ("Zhang et al., CVPR 2021: one network, a task code drives a dynamic head; sigmoid outputs per "
               "task")

    head_name = "dynamic"
    Options = DoDNetOptions

    def head_spec(self) -> dict[str, Any]:
        return {**super().head_spec(), "feature_channels": self.options.feature_channels,
                "head_widths": list(self.options.head_widths),
                "equalized_controller": self.options.equalized_controller,
                "zero_bias_init": self.options.zero_bias_init,
                "fan_in_init": self.options.fan_in_init,
                "negative_slope": float(self.options.negative_slope),
                "image_gain": float(self.options.image_lr_scale),
                "task_gain": float(self.options.task_lr_scale)}

    def lr_scales(self) -> dict[str, float]:
        """The controller's learning-rate multiplier (``controller_lr_scale``, on top of ``lr_scale``).

        An option for Adam-type optimisers (DoDNet trains with SGD): one generated head parameter is a sum
        over the controller's Cb + T + 1 inputs, and Adam moves each of those weights by about lr per step.
        Measured (docs/dodnet_investigation.md): 0.05 did not stop the head's hidden units from dying, so the recipe
        keeps 1.
        """
        scales = super().lr_scales()
        scale = float(self.options.controller_lr_scale)
        if scale != 1.0:
            scales["net.head.controller"] = scale * float(self.options.lr_scale)
        return scales
