"""Memory layout of 3-D convolution weights: channels-last (NDHWC) where it is faster.

On the CPU, oneDNN's 3-D convolutions run faster, forward and backward, when the kernels are stored channels-
last (``benchmarks/bench_layout.py``, batch 2 x 48^3, one training step: ResUNet ``cpu`` preset 0.418 s ->
0.266 s, DynUNet ``cpu`` 0.403 s -> 0.280 s; ``docs/benchmarks.md``). A convolution whose weight is channels-
last returns a channels-last output, and GroupNorm, ReLU, upsampling and additive skips keep the layout, so
converting the weights once switches the whole ResUNet, logits included; backbones lay their input out like
their first kernel (:meth:`unionseg.networks.blocks.Backbone.prepare_input`). Layers that leave the layout
(checked on the ``cpu`` presets, batch 2, two threads): MONAI's ``InstanceNorm3d`` in DynUNet returns a
contiguous tensor, so each of its convolutions re-lays its input (still faster overall, figures above); the
multi-head and dynamic heads return contiguous logits (their per-task products are reshapes). With ONE thread,
PyTorch runs 1x1x1 convolutions of batches under 16 without oneDNN, and those return contiguous tensors too.
The values are the same up to float rounding (the kernels sum in another order).

On CUDA the layout is left contiguous until it is measured there (GroupNorm's CUDA kernel may copy
channels-last inputs). ``UNIONSEG_CHANNELS_LAST=1`` (or ``0``) forces the choice on every device.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ENV = "UNIONSEG_CHANNELS_LAST"


def channels_last_for(device: torch.device | str) -> bool:
    """Whether networks on ``device`` should store their 3-D kernels channels-last."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if forced:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected 1 or 0")
    return torch.device(device).type == "cpu"


def set_layout(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Store every 5-D parameter and buffer of ``module`` in the layout :func:`channels_last_for` picks.

    In place (``module`` is returned for chaining); call it before an optimiser is built over the parameters.
    Parameters of other ranks (linear layers, norms) are untouched.
    """
    fmt = torch.channels_last_3d if channels_last_for(device) else torch.contiguous_format
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dim() == 5:
                t.data = _relaid(t.data, fmt)
    return module


def like_kernel(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, D, H, W) in the layout of a 3-D ``kernel`` laid out by :func:`set_layout`."""
    if x.dim() != 5 or kernel.dim() != 5:
        return x
    channels_last = kernel.stride(1) == 1 and kernel[0, 0].numel() > 1
    return _relaid(x, torch.channels_last_3d if channels_last else torch.contiguous_format)


def _relaid(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` with exactly the strides of ``fmt``. ``Tensor.contiguous(memory_format=...)`` is not enough:
    with one channel both layouts hold the same bytes, PyTorch reports the tensor as already in either
    layout, and keeps the strides that make the convolution pick the contiguous kernels."""
    target = torch.empty_like(t, memory_format=fmt)
    return t if target.stride() == t.stride() else target.copy_(t)
