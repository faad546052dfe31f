"""Temporally weighted parameter average (EMA), as the co-training paper and mean teachers use it."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def decay_from_half_life(half_life_steps: float) -> float:
    """decay = 0.5 ** (1 / half_life): after ``half_life`` steps an old weight counts half."""
    if half_life_steps <= 0:
        raise ValueError(f"half_life_steps must be positive, got {half_life_steps}")
    return 0.5 ** (1.0 / half_life_steps)


class WeightAverage(nn.Module):
    """A frozen copy of ``model`` updated as ``avg = d_t * avg + (1 - d_t) * model`` after each step.

    ``d_t = min(decay, (1 + t) / (10 + t))`` (warm-up) where ``t`` counts updates, so early averages follow the
    network closely and the random initialisation is forgotten quickly: after ``n`` updates the initial
    parameters carry weight ``prod_t d_t``, which :meth:`initial_weight` reports.

    Args:
        model: the network to average (its buffers, e.g. norm statistics, are copied, not averaged).
        decay: the asymptotic decay (see :func:`decay_from_half_life`).
        warmup: apply the ``(1 + t) / (10 + t)`` warm-up.
    """

    updates: torch.Tensor
    log_initial_weight: torch.Tensor

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("log_initial_weight", torch.zeros((), dtype=torch.float64))
        # the update count on the host: reading the buffer on a GPU waited for it at every update
        self._count: int | None = None

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._count = None  # the loaded buffer holds the count now
        super()._load_from_state_dict(*args, **kwargs)

    def current_decay(self) -> float:
        if self._count is None:
            self._count = int(self.updates)
        t = self._count
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = dict(model.named_parameters())
        mine: list[torch.Tensor] = [p for _, p in self.module.named_parameters()]
        theirs = [src[name].detach().to(p.dtype) for name, p in self.module.named_parameters()]
        # the same arithmetic as p.mul_(d).add_(q, alpha=1 - d) per tensor, in a few kernels for all of them
        torch._foreach_mul_(mine, d)
        torch._foreach_add_(mine, theirs, alpha=1.0 - d)
        src_buffers = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(src_buffers[name])
        self.updates += 1
        self._count = (self._count or 0) + 1
        self.log_initial_weight += math.log(d) if d > 0 else -math.inf

    def initial_weight(self) -> float:
        """Weight the initial parameters still carry in the average (product of the decays)."""
        return float(torch.exp(self.log_initial_weight))

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.module(*args, **kwargs)
