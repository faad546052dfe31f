"""Small helpers shared by the loss modules: argument checks and a float32 island for AMP."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
from torch import Tensor


def float32_island(tensor: Tensor) -> AbstractContextManager:
    """A context in which autocast is off, so matmuls/einsums inside a loss run in float32.

    Elementwise ops and reductions are never down-cast by autocast; ``bmm``/``einsum`` are, and a Dice sum
    over 10^6 voxels in float16 loses digits. Every loss converts its inputs with ``.float()`` as well.
    """
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def check_channels_first(name: str, tensor: Tensor, min_dim: int = 3) -> None:
    """Raise ValueError unless ``tensor`` is (B, C, *S) with at least one spatial dimension."""
    if tensor.dim() < min_dim:
        raise ValueError(f"{name} must be (B, C, *S) with at least one spatial dimension, got shape "
                         f"{tuple(tensor.shape)}")


def check_spatial(name: str, tensor: Tensor, reference: Tensor) -> None:
    """Raise ValueError unless ``tensor`` is (B, *S) matching the batch and spatial shape of ``reference``
    (B, C, *S)."""
    expected = (reference.shape[0], *reference.shape[2:])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape (B, *S) = {expected}, got {tuple(tensor.shape)}")


def check_batch_mask(name: str, mask: Tensor, reference: Tensor) -> None:
    """Raise ValueError unless ``mask`` is (B, C) matching ``reference`` (B, C, *S)."""
    expected = tuple(reference.shape[:2])
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape (B, C) = {expected}, got {tuple(mask.shape)}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def memory_format_of(tensor: Tensor) -> torch.memory_format:
    """``channels_last_3d`` for a 5-D tensor stored channels-last (and not also contiguous), else
    ``contiguous_format``: the layout a hand-written gradient is returned in, as its input's."""
    if tensor.dim() == 5 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of voxel sums built one voxel at a time (``scatter_add_``): float64, whose step stays far
    below a probability's at any patch size (float32's passes 0.1 beyond 2^20 voxels, a background at 128^3:
    each p near 1 rounded to the float's step biased the Dice; helper-127), but float32 on Apple's MPS, which
    has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def refuse_double_backward(what: str) -> None:
    """Raise in a hand-written backward that runs with grad mode on, i.e. under ``create_graph=True``: its
    gradient is computed in closed form without a graph of its own, so a second derivative through it would be
    silently wrong (``once_differentiable`` catches that only when the incoming gradient needs grad)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what}: the gradient is computed in closed form and cannot be differentiated twice "
                           "(create_graph=True)")


def zero_with_graph(tensor: Tensor) -> Tensor:
    """A float32 scalar 0 attached to ``tensor``'s graph (so ``backward()`` works and every gradient is 0)."""
    return tensor.float().sum() * 0.0


@functools.lru_cache(maxsize=256)
def _index_on(values: tuple[int, ...], device: str) -> Tensor:
    with torch.inference_mode(False):  # reused across calls: never an inference tensor
        return torch.tensor(values, dtype=torch.long, device=device)


def index_tensor(values: Iterable[int], device: torch.device) -> Tensor:
    """A constant (N,) long index tensor on ``device``, made once per values and device: indexing a GPU tensor
    with a Python list copies the list to the GPU at each call, which makes the CPU wait for the GPU in the
    middle of a step (helper-111). Read only."""
    return _index_on(tuple(int(v) for v in values), str(device))
