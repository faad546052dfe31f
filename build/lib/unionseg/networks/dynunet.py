"""MONAI's DynUNet (the nnU-Net topology) wrapped to the common feature interface.

We build :class:`monai.networks.nets.DynUNet` and keep only its input block, downsampling blocks,
bottleneck and upsampling blocks (its 1x1x1 output block is dropped: the heads own the classifier), then
run them ourselves so that every decoder stage is visible. MONAI's blocks end with normalisation +
LeakyReLU, so ``decoder[-1]`` and the bottleneck are already activated (``output_activated = True``).

Inputs must have each spatial size divisible by the product of the strides along that axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from unionseg.networks.blocks import Backbone, BackboneOutput, as_int_tuple

DYNUNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"widths": (4, 8, 16, 16)},
    "small": {"widths": (8, 16, 32, 64)},
    "cpu": {"widths": (8, 16, 32, 64)},
    "gpu": {"widths": (32, 64, 128, 256, 320)},
}
"""Named presets (strides default to (1, 2, 2, ...)); ``small`` and ``cpu`` are the same network."""

StrideSpec = int | Sequence[int]


def _axis_strides(stride: StrideSpec) -> tuple[int, int, int]:
    """An int or a 3-sequence of strides as a (D, H, W) tuple."""
    if isinstance(stride, int):
        return (stride, stride, stride)
    values = tuple(int(s) for s in stride)
    if len(values) != 3:
        raise ValueError(f"a per-axis stride needs 3 values, got {stride!r}")
    return (values[0], values[1], values[2])


class DynUNetBackbone(Backbone):
    """DynUNet encoder/decoder with the :class:`Backbone` interface.

    Args:
        in_channels: image channels.
        widths: filters per level, fine -> coarse (>= 3 levels, MONAI's minimum).
        strides: per level, an int or a (D, H, W) triple; default ``(1, 2, 2, ...)``.
        kernel_size: conv kernel size for every level.
        norm_name: MONAI norm spec (``"instance"``, ``"batch"``, ``("group", {"num_groups": 4})``, ...).
        res_block: residual conv blocks (True) or plain double conv blocks.

    Raises:
        ValueError: on invalid sizes (fewer than 3 levels, strides of the wrong length).
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (8, 16, 32, 64),
        strides: Sequence[StrideSpec] | None = None,
        kernel_size: int = 3,
        norm_name: str | tuple[str, dict[str, Any]] = "instance",
        res_block: bool = True,
    ) -> None:
        super().__init__()
        from monai.networks.nets import DynUNet

        widths_t = as_int_tuple(widths, "widths")
        if len(widths_t) < 3:
            raise ValueError(f"DynUNet needs at least 3 levels, got widths {widths_t}")
        stride_list: list[StrideSpec] = list(strides) if strides is not None else [1, *([2] * (len(widths_t) - 1))]
        if len(stride_list) != len(widths_t):
            raise ValueError(f"strides {stride_list} must have one entry per width {widths_t}")
        axis_strides = [_axis_strides(s) for s in stride_list]
        if axis_strides[0] != (1, 1, 1):
            raise ValueError("the first stride must be 1 so that the last decoder stage is full resolution")
        if isinstance(norm_name, list):  # from YAML/JSON
            norm_name = (norm_name[0], dict(norm_name[1]))

        net = DynUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=1,  # the output block is discarded below
            kernel_size=[kernel_size] * len(widths_t),
            strides=[list(s) for s in axis_strides],
            upsample_kernel_size=[list(s) for s in axis_strides[1:]],
            filters=list(widths_t),
            norm_name=norm_name,
            res_block=res_block,
        )
        self.input_block = net.input_block
        self.downsamples = net.downsamples
        self.bottleneck = net.bottleneck
        self.upsamples = net.upsamples

        self.widths = widths_t
        self.in_channels = in_channels
        self.out_channels = widths_t[0]
        self.bottleneck_channels = widths_t[-1]
        self.decoder_channels = tuple(reversed(widths_t[:-1]))
        divisor = [1, 1, 1]
        for triple in axis_strides:
            divisor = [d * s for d, s in zip(divisor, triple, strict=True)]
        self.divisor = (divisor[0], divisor[1], divisor[2])
        self.output_activated = True

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder skips (fine -> coarse) and the bottleneck output."""
        x = self.prepare_input(x)
        skips = [self.input_block(x)]
        for block in self.downsamples:
            skips.append(block(skips[-1]))
        return skips, self.bottleneck(skips[-1])

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """(B, in_channels, D, H, W) -> :class:`BackboneOutput` (decoder[-1]: (B, widths[0], D, H, W)).

        Raises:
            ValueError: if the input's shape is not accepted.
        """
        skips, bottleneck = self._encode(x)
        h = bottleneck
        decoder: list[torch.Tensor] = []
        for index, block in enumerate(self.upsamples):
            h = block(h, skips[len(skips) - 1 - index])
            decoder.append(h)
        return BackboneOutput(decoder=decoder, bottleneck=bottleneck)

    def features_upto(self, x: torch.Tensor, decoder_stage: int) -> torch.Tensor:
        """``forward(x).decoder[decoder_stage]`` without computing the finer stages.

        Raises:
            IndexError: if the stage does not exist.
            ValueError: if the input's shape is not accepted.
        """
        stage = self._stage_index(decoder_stage)
        skips, h = self._encode(x)
        for index in range(stage + 1):
            h = self.upsamples[index](h, skips[len(skips) - 1 - index])
        return h

