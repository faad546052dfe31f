"""Building blocks shared by the backbones: weight-standardised convs, adapted GroupNorm, pre-activation
residual blocks, and the feature interface every backbone exposes (:class:`BackboneOutput`, :class:`Backbone`).

Tensor shapes follow (B, C, D, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAX_GROUPS = 16
"""GroupNorm never uses more groups than this (Wu & He's default of 32 is too many for narrow widths)."""


def group_count(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """GroupNorm groups for ``channels``, adapted to narrow widths.

    Rule: the largest divisor ``g`` of ``channels`` with ``g <= max_groups`` and at least 2 channels per
    group (a group of one channel is instance normalisation, which erases per-channel contrast); 1 channel
    gives 1 group. Examples: 4 -> 2, 8 -> 4, 16 -> 8, 32 -> 16 (DoDNet's GN(16, 32)), 256 -> 16, 6 -> 3.

    Args:
        channels: number of channels (> 0).
        max_groups: upper bound on the group count (> 0).

    Raises:
        ValueError: if ``channels`` or ``max_groups`` is not positive.
    """
    if channels < 1 or max_groups < 1:
        raise ValueError(f"channels and max_groups must be positive, got {channels} and {max_groups}")
    if channels == 1:
        return 1
    best = 1
    for groups in range(1, min(max_groups, channels // 2) + 1):
        if channels % groups == 0:
            best = groups
    return best


def group_norm(channels: int, affine: bool = True, max_groups: int = MAX_GROUPS) -> nn.GroupNorm:
    """A :class:`torch.nn.GroupNorm` over ``channels`` with :func:`group_count` groups."""
    return nn.GroupNorm(group_count(channels, max_groups), channels, affine=affine)


def norm_relu(channels: int, affine: bool = True, max_groups: int = MAX_GROUPS) -> nn.Sequential:
    """GroupNorm followed by an in-place ReLU (the pre-activation used throughout DoDNet's U-Net)."""
    return nn.Sequential(group_norm(channels, affine, max_groups), nn.ReLU(inplace=True))


class WSConv3d(nn.Conv3d):
    """3D convolution with weight standardisation (Qiao et al., 2019), as in DoDNet's ``Conv3d_wd``.

    Every output channel's kernel is standardised to mean 0 and (population) standard deviation 1 before
    the convolution: ``w_hat = (w - mean(w)) / sqrt(var(w) + eps)``, statistics over (C_in, kD, kH, kW).
    The standardisation runs in the parameter's dtype (fp32 under AMP; the conv itself is autocast).
    Kernels with a single element per output channel (1x1x1 on one input channel) cannot be standardised
    and are rejected.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as :class:`torch.nn.Conv3d`.
        eps: added to the variance.

    Raises:
        ValueError: if each output channel's kernel has a single element.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        bias: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        if self.weight[0].numel() < 2:
            raise ValueError("weight standardisation needs at least 2 weights per output channel")
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        """The standardised kernel (C_out, C_in, kD, kH, kW): mean 0, std 1 per output channel.

        Reduced over the four trailing dimensions in place of a reshape, so the result keeps the parameter's
        memory layout (a reshape of a channels-last kernel copies it into the contiguous layout; the
        convolutions then follow their input's layout alone, which measured within a few percent of this).
        """
        weight = self.weight
        var, mean = torch.var_mean(weight, dim=(1, 2, 3, 4), correction=0, keepdim=True)
        return (weight - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D', H', W')."""
        return F.conv3d(x, self.standardized_weight(), self.bias, self.stride, self.padding)


class PreActResBlock(nn.Module):
    """Pre-activation residual block of DoDNet's U-Net (``NoBottleneck``).

    ``out = Conv(ReLU(GN(Conv(ReLU(GN(x)))))) + shortcut(x)``; both convs are 3x3x3 weight-standardised,
    the first carries the stride. The shortcut is the identity, or GN-ReLU-1x1x1 WS conv (with the stride)
    when the stride or the width changes, as in DoDNet's ``downsample`` branch.

    Args:
        in_channels: input width.
        out_channels: output width.
        stride: stride of the first conv (2 downsamples).
        max_groups: GroupNorm group bound (see :func:`group_count`).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, max_groups: int = MAX_GROUPS) -> None:
        super().__init__()
        self.norm_act1 = norm_relu(in_channels, max_groups=max_groups)
        self.conv1 = WSConv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm_act2 = norm_relu(out_channels, max_groups=max_groups)
        self.conv2 = WSConv3d(out_channels, out_channels, 3, padding=1)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                norm_relu(in_channels, max_groups=max_groups),
                WSConv3d(in_channels, out_channels, 1, stride=stride),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D/stride, H/stride, W/stride)."""
        out = self.conv1(self.norm_act1(x))
        out = self.conv2(self.norm_act2(out))
        return out + self.shortcut(x)


@dataclass
class BackboneOutput:
    """What every backbone returns.

    Attributes:
        decoder: decoder stage outputs, coarse -> fine; ``decoder[-1]`` is full resolution with the
            backbone's ``out_channels`` channels, (B, out_channels, D, H, W).
        bottleneck: the deepest feature map after normalisation and activation (ResUNet: GN-ReLU of the
            fused bottleneck, what DoDNet's controller pools), (B, bottleneck_channels, d, h, w).
    """

    decoder: list[torch.Tensor]
    bottleneck: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        """The full-resolution decoder output, (B, out_channels, D, H, W)."""
        return self.decoder[-1]


class Backbone(nn.Module):
    """Base class of the feature interface shared by all backbones.

    Attributes (set by subclasses):
        in_channels: input channels expected by the first conv.
        out_channels: channels of the full-resolution decoder output (``decoder[-1]``).
        bottleneck_channels: channels of ``BackboneOutput.bottleneck``.
        decoder_channels: channels of each decoder stage, coarse -> fine.
        divisor: per spatial axis (D, H, W), the number every input size must be divisible by.
        output_activated: True when ``decoder[-1]`` is already normalised and activated (heads then skip
            their own GN-ReLU); False for pre-activation networks whose outputs are raw residual sums.
    """

    in_channels: int
    out_channels: int
    bottleneck_channels: int
    decoder_channels: tuple[int, ...]
    divisor: tuple[int, int, int]
    output_activated: bool

    @property
    def n_decoder_stages(self) -> int:
        """Number of decoder stages (``len(BackboneOutput.decoder)``)."""
        return len(self.decoder_channels)

    def forward(self, x: torch.Tensor) -> BackboneOutput:  # pragma: no cover - abstract
        """(B, in_channels, D, H, W) -> :class:`BackboneOutput`."""
        raise NotImplementedError

    def features_upto(self, x: torch.Tensor, decoder_stage: int) -> torch.Tensor:  # pragma: no cover
        """Run only up to decoder stage ``decoder_stage`` (negative indices count from the end) and return
        that stage's output, equal to ``forward(x).decoder[decoder_stage]``."""
        raise NotImplementedError

    def _stage_index(self, decoder_stage: int) -> int:
        """Normalise a (possibly negative) decoder stage index.

        Raises:
            IndexError: if the stage does not exist.
        """
        n = self.n_decoder_stages
        if not -n <= decoder_stage < n:
            raise IndexError(f"decoder_stage {decoder_stage} out of range for {n} decoder stages")
        return decoder_stage % n

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`check_input`, then ``x`` in the memory layout of the first 3-D kernel (see
        :mod:`unionseg.networks.layout`): a one-channel image is laid out channels-last explicitly, since
        PyTorch treats its ambiguous strides as contiguous and would run the stem in the slower layout."""
        from unionseg.networks.layout import like_kernel

        self.check_input(x)
        kernel = next((p for p in self.parameters() if p.dim() == 5), None)
        return x if kernel is None else like_kernel(x, kernel)

    def check_input(self, x: torch.Tensor) -> None:
        """Validate the input's rank, channels and spatial size.

        Inputs are never padded here: the caller chooses patch/ROI sizes divisible by ``divisor`` (the
        predictor's sliding window and the sampler do), so a wrong size is a bug that should surface.

        Raises:
            ValueError: if ``x`` is not (B, in_channels, D, H, W) with D, H, W divisible by ``divisor``.
        """
        if x.dim() != 5:
            raise ValueError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        sizes = tuple(x.shape[2:])
        if any(size % div for size, div in zip(sizes, self.divisor, strict=True)):
            raise ValueError(f"spatial size {sizes} is not divisible by {self.divisor}; pad or crop the input")


def as_int_tuple(values: Sequence[int], name: str) -> tuple[int, ...]:
    """Validate a non-empty sequence of positive ints.

    Raises:
        ValueError: if it is empty or holds a non-positive value.
    """
    result = tuple(int(v) for v in values)
    if not result or any(v < 1 for v in result):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return result
