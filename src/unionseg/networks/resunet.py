"""The residual U-Net of DoDNet (Zhang et al., CVPR 2021; the ``unet3D`` of the official code).

Encoder: a 3x3x3 WS stem conv, then one stage per width; stage 0 keeps the resolution, every later stage
starts with a stride-2 pre-activation residual block (downsampling by strided conv). Bottleneck: DoDNet's
``fusionConv`` (GN-ReLU-[Dropout3d]-1x1x1 WS conv). Decoder: per stage, upsample x2 (trilinear, or a
transposed conv), ADD the encoder feature of that level (additive skips), then pre-activation residual
block(s) that narrow the width to the next finer level's width; the last stage keeps ``widths[0]``.

Channel plan for widths ``(w0, ..., wL)`` (L + 1 levels): decoder stage k (k = 0..L-1) works at level
``L-1-k`` and outputs ``w_{max(L-2-k, 0)}`` channels; e.g. paper widths 32-64-128-256-256 give decoder
widths 128, 64, 32, 32 (DoDNet's x8/x4/x2/x1 ``resb``). When the bottleneck width differs from the
level below (``wL != w_{L-1}``, e.g. the ``cpu`` preset) a 1x1x1 WS conv projects the bottleneck before
the first trilinear upsampling so the additive skip matches.

Inputs must have D, H, W divisible by ``2 ** (len(widths) - 1)``; they are not padded (see
:meth:`Backbone.check_input`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from unionseg.networks.blocks import (
    MAX_GROUPS,
    Backbone,
    BackboneOutput,
    PreActResBlock,
    WSConv3d,
    as_int_tuple,
    group_norm,
    norm_relu,
)

RESUNET_PRESETS: dict[str, dict[str, Any]] = {
    # tests: seconds on 2 CPU cores
    "tiny": {"widths": (4, 8, 16, 16), "blocks": (1, 1, 1, 1)},
    # CPU benchmarks
    "cpu": {"widths": (8, 16, 32, 64), "blocks": (1, 1, 1, 1)},
    # GPU: the widths and depths of DoDNet's encoder (the dropout is ours; the official network has none)
    "gpu": {"widths": (32, 64, 128, 256, 256), "blocks": (1, 2, 2, 2, 2), "dropout": 0.1},
}
"""Named width/depth presets; :func:`unionseg.networks.build_network` resolves ``"preset"`` with these."""

UPSAMPLE_MODES = ("trilinear", "transpose")


def _resblocks(in_channels: int, out_channels: int, count: int, stride: int, max_groups: int) -> nn.Sequential:
    """``count`` residual blocks; the first changes width/stride, the rest keep ``out_channels``."""
    layers = [PreActResBlock(in_channels, out_channels, stride=stride, max_groups=max_groups)]
    layers += [PreActResBlock(out_channels, out_channels, max_groups=max_groups) for _ in range(count - 1)]
    return nn.Sequential(*layers)


class ResUNet(Backbone):
    """DoDNet's residual U-Net with the common feature interface.

    Args:
        in_channels: image channels (1 for CT; 1 + T for the conditional head).
        widths: channels per resolution level, fine -> coarse (>= 2 levels).
        blocks: residual blocks per encoder level (same length as ``widths``).
        decoder_blocks: residual blocks per decoder stage (DoDNet: 1).
        upsample: ``"trilinear"`` (DoDNet) or ``"transpose"`` (2x2x2 transposed conv, stride 2).
        dropout: Dropout3d probability in the bottleneck fusion (DoDNet: 0.1; 0 disables).
        max_groups: GroupNorm group bound (see :func:`unionseg.networks.blocks.group_count`).
        bottleneck_norm_affine: whether the GN producing ``BackboneOutput.bottleneck`` has learnable
            affine parameters. Only the dynamic head reads the bottleneck; with other heads learnable
            parameters there would receive no gradient (a DDP ``find_unused_parameters`` error), so the
            builder turns them off for those heads.
        stem_ws: weight-standardise the stem conv as DoDNet's code does. Off by default (our deviation,
            measured): a standardised kernel has zero mean, so a WS stem on a one-channel image responds to
            edges only and the network must reconstruct every organ's intensity level from its borders.
            On the standard phantom a single-batch overfit with the WS stem still gave kidney Dice 0 after
            60 steps, 0.66 with a plain stem (docs/methods.md, "Backbone deviation").

    Raises:
        ValueError: on inconsistent or invalid sizes, an unknown upsample mode or dropout outside [0, 1).
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256, 256),
        blocks: Sequence[int] = (1, 2, 2, 2, 2),
        decoder_blocks: int = 1,
        upsample: str = "trilinear",
        dropout: float = 0.0,
        max_groups: int = MAX_GROUPS,
        bottleneck_norm_affine: bool = True,
        stem_ws: bool = False,
    ) -> None:
        super().__init__()
        widths_t = as_int_tuple(widths, "widths")
        blocks_t = as_int_tuple(blocks, "blocks")
        if len(widths_t) < 2:
            raise ValueError(f"widths needs at least 2 levels, got {widths_t}")
        if len(blocks_t) != len(widths_t):
            raise ValueError(f"blocks {blocks_t} must have one entry per width {widths_t}")
        if in_channels < 1 or decoder_blocks < 1:
            raise ValueError("in_channels and decoder_blocks must be positive")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")

        n_levels = len(widths_t)
        self.widths = widths_t
        self.in_channels = in_channels
        self.out_channels = widths_t[0]
        self.bottleneck_channels = widths_t[-1]
        self.decoder_channels = tuple(widths_t[max(level - 1, 0)] for level in range(n_levels - 2, -1, -1))
        self.divisor = (2 ** (n_levels - 1),) * 3
        self.output_activated = False

        # a plain (not weight-standardised) stem: standardising a kernel subtracts its mean, so on the raw
        # image a WS stem answers only to local contrast and never to the intensity level itself (the
        # Hounsfield value that tells a bright kidney from the liver); see ``stem_ws`` in the class docstring
        self.stem: nn.Module = (WSConv3d(in_channels, widths_t[0], 3, padding=1) if stem_ws
                                else nn.Conv3d(in_channels, widths_t[0], 3, padding=1))
        self.encoder = nn.ModuleList()
        for level in range(n_levels):
            previous = widths_t[max(level - 1, 0)]
            stride = 1 if level == 0 else 2
            self.encoder.append(_resblocks(previous, widths_t[level], blocks_t[level], stride, max_groups))

        bottom = widths_t[-1]
        self.fusion = nn.Sequential(
            group_norm(bottom, max_groups=max_groups),
            nn.ReLU(inplace=True),
            nn.Dropout3d(dropout) if dropout > 0 else nn.Identity(),
            WSConv3d(bottom, bottom, 1),
        )
        self.bottleneck_norm = norm_relu(bottom, affine=bottleneck_norm_affine, max_groups=max_groups)

        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        incoming = bottom
        for level in range(n_levels - 2, -1, -1):
            skip = widths_t[level]
            if upsample == "transpose":
                self.upsamplers.append(nn.ConvTranspose3d(incoming, skip, kernel_size=2, stride=2))
            else:
                resize = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
                if incoming != skip:
                    self.upsamplers.append(nn.Sequential(WSConv3d(incoming, skip, 1), resize))
                else:
                    self.upsamplers.append(resize)
            outgoing = widths_t[max(level - 1, 0)]
            self.decoder.append(_resblocks(skip, outgoing, decoder_blocks, 1, max_groups))
            incoming = outgoing

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder skips (levels 0..L-1, fine -> coarse) and the fused bottleneck (pre-normalisation)."""
        x = self.prepare_input(x)
        h = self.stem(x)
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        return skips[:-1], self.fusion(skips[-1])

    def _decode_stage(self, index: int, h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decoder stage ``index`` (0 = coarsest): upsample, add the skip of its level, residual block(s)."""
        skip = skips[len(skips) - 1 - index]
        return self.decoder[index](self.upsamplers[index](h) + skip)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """(B, in_channels, D, H, W) -> :class:`BackboneOutput` (decoder[-1]: (B, widths[0], D, H, W)).

        Raises:
            ValueError: if the input's shape is not accepted (see :meth:`Backbone.check_input`).
        """
        skips, h = self._encode(x)
        bottleneck = self.bottleneck_norm(h)
        decoder: list[torch.Tensor] = []
        for index in range(len(self.decoder)):
            h = self._decode_stage(index, h, skips)
            decoder.append(h)
        return BackboneOutput(decoder=decoder, bottleneck=bottleneck)

    def features_upto(self, x: torch.Tensor, decoder_stage: int) -> torch.Tensor:
        """Run the encoder and the decoder only up to ``decoder_stage`` (0 = coarsest, -1 = last).

        Returns:
            ``forward(x).decoder[decoder_stage]``, (B, decoder_channels[stage], ...), without computing
            the finer stages or the bottleneck normalisation.

        Raises:
            IndexError: if the stage does not exist.
            ValueError: if the input's shape is not accepted.
        """
        stage = self._stage_index(decoder_stage)
        skips, h = self._encode(x)
        for index in range(stage + 1):
            h = self._decode_stage(index, h, skips)
        return h
