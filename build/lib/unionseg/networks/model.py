"""The full network: a backbone (a distinct submodule, so hooks can count its calls) plus a head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unionseg.networks.blocks import Backbone, BackboneOutput
from unionseg.networks.heads import ConditionalHead, DynamicHead, Head


class SegmentationNet(nn.Module):
    """Backbone + head with one calling convention for every method.

    ``forward(x, task_ids=None)`` returns logits; ``forward(x, task_ids, return_features=True)`` returns
    ``(logits, BackboneOutput)``. Logit shapes: softmax head (B, L, D, H, W); task heads (B, C, ...) for
    ``task_ids`` (B,) or (B, T * C, ...) for ``task_ids=None`` (task-major).

    Backbone passes per forward: one, except the conditional head with ``task_ids=None``, which runs the
    backbone once per task (T passes; the cost of static input conditioning).

    Args:
        backbone: a :class:`Backbone`; for the conditional head its ``in_channels`` includes the T code
            channels.
        head: a :class:`Head` whose ``in_channels`` equals ``backbone.out_channels``.
        spec: the resolved build spec (saved with checkpoints; see :func:`unionseg.networks.build_network`).

    Raises:
        ValueError: if backbone and head do not fit together.
    """

    def __init__(self, backbone: Backbone, head: Head, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        if head.in_channels != backbone.out_channels:
            raise ValueError(f"head reads {head.in_channels} channels, backbone gives {backbone.out_channels}")
        if isinstance(head, DynamicHead) and head.bottleneck_channels != backbone.bottleneck_channels:
            raise ValueError(
                f"controller reads {head.bottleneck_channels} channels, bottleneck has {backbone.bottleneck_channels}"
            )
        if head.conditions_input and backbone.in_channels <= head.n_tasks:
            raise ValueError(
                f"conditional backbone needs image channels + {head.n_tasks} code channels, has {backbone.in_channels}"
            )
        self.backbone = backbone
        self.head = head
        self.spec: dict[str, Any] = dict(spec or {})

    @property
    def n_tasks(self) -> int:
        """Number of tasks T (0 for the softmax head)."""
        return self.head.n_tasks

    @property
    def out_channels(self) -> int:
        """Channels per task (all leaves for the softmax head)."""
        return self.head.out_channels

    @property
    def output_channels(self) -> int:
        """Channels of the all-tasks forward (``task_ids=None``)."""
        return self.head.output_channels

    @property
    def image_channels(self) -> int:
        """Channels of the image the caller passes (the backbone's input minus any task-code channels)."""
        return self.backbone.in_channels - (self.head.n_tasks if self.head.conditions_input else 0)

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Per-axis divisor of accepted input sizes."""
        return self.backbone.divisor

    def forward(
        self, x: torch.Tensor, task_ids: torch.Tensor | None = None, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, BackboneOutput]:
        """(B, image_channels, D, H, W) -> logits, optionally with the backbone features.

        Args:
            x: image batch.
            task_ids: (B,) integer task per sample, or None for all tasks (ignored by the softmax head).
            return_features: also return the :class:`BackboneOutput`.

        Raises:
            ValueError: on a bad ``task_ids`` shape, or for ``return_features`` with the conditional head
                and ``task_ids=None`` (there is one feature set per task).
        """
        if isinstance(self.head, ConditionalHead):
            if task_ids is None:
                if return_features:
                    raise ValueError("the conditional head has one feature set per task: pass task_ids")
                return torch.cat([self._conditioned(x, task) for task in range(self.head.n_tasks)], dim=1)
            features = self.backbone(self.head.condition(x, task_ids))
        else:
            features = self.backbone(x)
        logits = self.head(features, task_ids)
        return (logits, features) if return_features else logits

    def _conditioned(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Conditional head: logits (B, C, ...) of every sample for one task."""
        assert isinstance(self.head, ConditionalHead)
        task_ids = torch.full((x.shape[0],), task, dtype=torch.long, device=x.device)
        return self.head(self.backbone(self.head.condition(x, task_ids)), task_ids)

    def controller_params(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Dynamic head only: the generated head parameters for an image batch.

        Returns:
            (B, n_params) for ``task_ids`` (B,), (B, T, n_params) for None.

        Raises:
            TypeError: if the head is not a :class:`DynamicHead`.
        """
        if not isinstance(self.head, DynamicHead):
            raise TypeError(f"{type(self.head).__name__} has no controller")
        return self.head.controller_params(self.backbone(x).bottleneck, task_ids)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
