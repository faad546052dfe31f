"""Build a :class:`SegmentationNet` from a plain spec dict (the only network file that reads configuration).

Spec::

    {"backbone": {"name": "resunet", "preset": "cpu"},            # or explicit kwargs; kwargs override the preset
     "head": {"name": "softmax", "out_channels": 8}}               # all leaves incl. background
    {"head": {"name": "multihead" | "conditional", "n_tasks": 4, "out_channels": 2}}
    {"head": {"name": "dynamic", "n_tasks": 4, "out_channels": 2, "feature_channels": 8, "head_widths": [8, 8]}}

Backbone kwargs are the constructor arguments of :class:`~unionseg.networks.resunet.ResUNet` or
:class:`~unionseg.networks.dynunet.DynUNetBackbone`; ``in_channels`` is the IMAGE channel count (default 1):
for the conditional head the builder adds the T task-code channels. The built module's ``.spec`` is the
resolved spec (preset expanded, defaults filled, tuples as lists), so ``build_network(net.spec)`` rebuilds
the same architecture.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from unionseg.errors import ConfigError
from unionseg.networks.blocks import Backbone
from unionseg.networks.heads import ConditionalHead, DynamicHead, Head, MultiHead, SoftmaxHead
from unionseg.networks.model import SegmentationNet
from unionseg.networks.resunet import RESUNET_PRESETS, ResUNet

BACKBONES = ("resunet", "dynunet")
HEAD_KEYS: dict[str, dict[str, Any]] = {
    # name -> {key: default (None = required)}
    "softmax": {"out_channels": None},
    "multihead": {"n_tasks": None, "out_channels": None},
    "conditional": {"n_tasks": None, "out_channels": None},
    "dynamic": {"n_tasks": None, "out_channels": None, "feature_channels": 8, "head_widths": [8, 8],
                "equalized_controller": False, "zero_bias_init": False, "negative_slope": 0.0,
                "image_gain": 1.0, "fan_in_init": False, "task_gain": 1.0},
}
# the interval of every float head key: (how an error names it, the test)
_FLOAT_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "negative_slope": ("[0, 1)", lambda v: 0 <= v < 1),
    "image_gain": ("(0, 1]", lambda v: 0 < v <= 1),
    "task_gain": ("(0, 64]", lambda v: 0 < v <= 64),
}


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (YAML/JSON friendly)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"network.{key} must be a positive integer, got {value!r}")
    return value


def _backbone_class(name: str) -> tuple[type[Backbone], Mapping[str, Mapping[str, Any]]]:
    if name == "resunet":
        return ResUNet, RESUNET_PRESETS
    if name == "dynunet":
        from unionseg.networks.dynunet import DYNUNET_PRESETS, DynUNetBackbone

        return DynUNetBackbone, DYNUNET_PRESETS
    raise ConfigError(f"network.backbone must be one of {BACKBONES}, got {name!r}")


def resolve_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a network spec and expand presets and defaults.

    Raises:
        ConfigError: on a missing or unknown key, an unknown name or preset, or an invalid value.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"network spec must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - {"backbone", "head"}
    if unknown:
        raise ConfigError(f"network: unknown keys {sorted(unknown)} (expected backbone, head)")
    for part in ("backbone", "head"):
        if not isinstance(spec.get(part), Mapping) or "name" not in spec[part]:
            raise ConfigError(f"network.{part} must be a mapping with a 'name'")

    backbone_spec = dict(spec["backbone"])
    name = backbone_spec.pop("name")
    cls, presets = _backbone_class(name)
    resolved_backbone: dict[str, Any] = {"name": name}
    kwargs: dict[str, Any] = {}
    preset = backbone_spec.pop("preset", None)
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"network.preset must be one of {sorted(presets)} for the {name} backbone, got {preset!r}")
        resolved_backbone["preset"] = preset
        kwargs.update(presets[preset])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(backbone_spec) - accepted
    if unknown:
        raise ConfigError(f"network.backbone: unknown keys {sorted(unknown)} for {name} (accepted: {sorted(accepted)})")
    kwargs.update(backbone_spec)
    kwargs.setdefault("in_channels", 1)
    _positive_int(kwargs["in_channels"], "backbone.in_channels")
    resolved_backbone.update(_plain(kwargs))

    head_spec = dict(spec["head"])
    head_name = head_spec.pop("name")
    if head_name not in HEAD_KEYS:
        raise ConfigError(f"network.head.name must be one of {sorted(HEAD_KEYS)}, got {head_name!r}")
    keys = HEAD_KEYS[head_name]
    unknown = set(head_spec) - set(keys)
    if unknown:
        raise ConfigError(f"network.head: unknown keys {sorted(unknown)} for {head_name} (accepted: {sorted(keys)})")
    resolved_head: dict[str, Any] = {"name": head_name}
    for key, default in keys.items():
        if key not in head_spec and default is None:
            raise ConfigError(f"network.head.{key} is required for the {head_name} head")
        value = copy.deepcopy(head_spec.get(key, default))
        if key == "head_widths":
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"network.head.head_widths must be a list of positive integers, got {value!r}")
            value = [_positive_int(v, "head.head_widths") for v in value]
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"network.head.{key} must be true or false, got {value!r}")
        elif isinstance(default, float):
            interval, inside = _FLOAT_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not inside(value):
                raise ConfigError(f"network.head.{key} must be a number in {interval}, got {value!r}")
            value = float(value)
        else:
            value = _positive_int(value, f"head.{key}")
        resolved_head[key] = value
    return {"backbone": resolved_backbone, "head": resolved_head}


def build_network(spec: Mapping[str, Any]) -> SegmentationNet:
    """Build backbone + head from a spec (see the module docstring).

    Returns:
        A :class:`SegmentationNet` with ``.spec`` (the resolved spec) and ``.output_channels``.

    Raises:
        ConfigError: if the spec is invalid or describes inconsistent sizes.
    """
    resolved = resolve_spec(spec)
    backbone_kwargs = {k: v for k, v in resolved["backbone"].items() if k not in ("name", "preset")}
    head_kwargs = {k: v for k, v in resolved["head"].items() if k != "name"}
    head_name = resolved["head"]["name"]
    cls, _ = _backbone_class(resolved["backbone"]["name"])
    if head_name == "conditional":
        backbone_kwargs["in_channels"] += head_kwargs["n_tasks"]
    if cls is ResUNet:
        # only the dynamic head reads the normalised bottleneck: elsewhere its affine parameters would be unused
        backbone_kwargs.setdefault("bottleneck_norm_affine", head_name == "dynamic")
    try:
        backbone = cls(**backbone_kwargs)
        normalize_input = not backbone.output_activated
        head: Head
        if head_name == "softmax":
            head = SoftmaxHead(backbone.out_channels, normalize_input=normalize_input, **head_kwargs)
        elif head_name == "multihead":
            head = MultiHead(backbone.out_channels, normalize_input=normalize_input, **head_kwargs)
        elif head_name == "conditional":
            head = ConditionalHead(backbone.out_channels, normalize_input=normalize_input, **head_kwargs)
        else:
            head = DynamicHead(
                backbone.out_channels, backbone.bottleneck_channels, normalize_input=normalize_input, **head_kwargs
            )
        return SegmentationNet(backbone, head, spec=resolved)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"network: {exc}") from None
