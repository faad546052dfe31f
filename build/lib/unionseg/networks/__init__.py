"""Networks: pure ``nn.Module`` backbones with feature taps, heads, and the builder.

Public API (imported lazily so that ``import unionseg.networks`` does not pull in torch):

* :func:`build_network` (spec dict -> :class:`SegmentationNet`), :func:`count_parameters`
* :func:`set_layout`: 3-D kernels channels-last where that is faster (the CPU)
* backbones :class:`ResUNet` (DoDNet's residual U-Net) and :class:`DynUNetBackbone` (MONAI DynUNet),
  both returning :class:`BackboneOutput` and offering ``features_upto(x, decoder_stage)``
* heads :class:`SoftmaxHead`, :class:`MultiHead`, :class:`ConditionalHead`, :class:`DynamicHead`
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from unionseg.networks.blocks import Backbone, BackboneOutput, WSConv3d, group_count
    from unionseg.networks.build import resolve_spec
    from unionseg.networks.dynunet import DYNUNET_PRESETS, DynUNetBackbone
    from unionseg.networks.heads import (
        ConditionalHead,
        DynamicHead,
        Head,
        MultiHead,
        SoftmaxHead,
        head_parameter_count,
    )
    from unionseg.networks.layout import channels_last_for, set_layout
    from unionseg.networks.model import SegmentationNet
    from unionseg.networks.resunet import RESUNET_PRESETS, ResUNet

_LAZY = {
    "Backbone": "blocks",
    "BackboneOutput": "blocks",
    "WSConv3d": "blocks",
    "group_count": "blocks",
    "ResUNet": "resunet",
    "RESUNET_PRESETS": "resunet",
    "DynUNetBackbone": "dynunet",
    "DYNUNET_PRESETS": "dynunet",
    "Head": "heads",
    "SoftmaxHead": "heads",
    "MultiHead": "heads",
    "ConditionalHead": "heads",
    "DynamicHead": "heads",
    "head_parameter_count": "heads",
    "SegmentationNet": "model",
    "resolve_spec": "build",
    "set_layout": "layout",
    "channels_last_for": "layout",
}

__all__ = [
    "DYNUNET_PRESETS",
    "RESUNET_PRESETS",
    "Backbone",
    "BackboneOutput",
    "ConditionalHead",
    "DynUNetBackbone",
    "DynamicHead",
    "Head",
    "MultiHead",
    "ResUNet",
    "SegmentationNet",
    "SoftmaxHead",
    "WSConv3d",
    "build_network",
    "channels_last_for",
    "count_parameters",
    "group_count",
    "head_parameter_count",
    "resolve_spec",
    "set_layout",
]


def build_network(spec: Mapping[str, Any]) -> SegmentationNet:
    """Build a :class:`SegmentationNet` from a spec dict (see :mod:`unionseg.networks.build`).

    Raises:
        unionseg.errors.ConfigError: if the spec is invalid.
    """
    from unionseg.networks.build import build_network as _build

    return _build(spec)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements of ``module``."""
    from unionseg.networks.model import count_parameters as _count

    return _count(module, trainable_only)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"unionseg.networks.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'unionseg.networks' has no attribute {name!r}")
