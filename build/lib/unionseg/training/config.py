"""Training recipes as frozen dataclasses: one :class:`TrainConfig` per run, saved beside every checkpoint.

The budget that a comparison holds fixed across methods (backbone, patch, batch, steps, optimiser) lives
in the same object; method-specific knobs go to ``options`` and are validated by the method's own
``Options`` dataclass. Recipes are YAML files under ``configs/``; ``key=value`` overrides apply on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unionseg.config import (
    DEVICE_NAMES,
    HASH_OMITS_DEFAULT,
    apply_overrides,
    from_dict,
    is_device_name,
    load_yaml,
)
from unionseg.data.sampling import AugmentSpec


@dataclass(frozen=True)
class NetworkConfig:
    """Backbone of every network in a run (contract 8: one backbone family per comparison)."""

    backbone: str = "resunet"
    preset: str | None = "cpu"
    widths: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None

    def backbone_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.backbone, "in_channels": 1}
        if self.preset is not None and self.widths is None:
            spec["preset"] = self.preset
        if self.widths is not None:
            spec["widths"] = list(self.widths)
        if self.blocks is not None:
            spec["blocks"] = list(self.blocks)
        return spec


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    schedule: str = "poly"
    poly_power: float = 0.9
    warmup_steps: int = 0
    grad_clip: float = 12.0

    def validate(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ValueError(f"name: {self.name!r} is not one of ['sgd', 'adamw']")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise ValueError(f"schedule: {self.schedule!r} is not one of ['poly', 'cosine', 'constant']")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr: must be a positive number, got {self.lr}")
        if not math.isfinite(self.poly_power) or self.poly_power <= 0:
            raise ValueError(f"poly_power: must be positive, got {self.poly_power}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not self.grad_clip >= 0:  # also NaN
            raise ValueError(f"grad_clip: must be >= 0 (0: no clipping), got {self.grad_clip}")


@dataclass(frozen=True)
class DataConfig:
    patch_size: tuple[int, int, int] = (48, 48, 48)
    batch_size: int = 2
    fg_prob: float = 0.67
    num_workers: int = 0
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    # training dataset name -> integer weight (default 1): its share of the patches is weight / sum of weights
    dataset_weights: dict[str, int] = field(default_factory=dict, metadata=HASH_OMITS_DEFAULT)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        if len(self.patch_size) != 3 or any(n < 1 for n in self.patch_size):
            raise ValueError(f"patch_size: expected 3 positive integers, got {list(self.patch_size)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0 (0: load in the training process), got {self.num_workers}")
        for name, weight in self.dataset_weights.items():
            if weight < 1:
                raise ValueError(f"dataset_weights.{name}: must be an integer >= 1, got {weight}")
        if not 0.0 <= self.fg_prob <= 1.0:
            raise ValueError("fg_prob: must be in [0, 1]")


@dataclass(frozen=True)
class InferenceConfig:
    roi_size: tuple[int, int, int] | None = None  # default: the training patch
    overlap: float = 0.5
    sw_batch_size: int = 2
    blend: str = "gaussian"
    threshold: float = 0.5

    def validate(self) -> None:
        # the blends the predictor knows (model files are checked against the same tuple)
        from unionseg.modelfile import BLENDS

        if self.roi_size is not None and (len(self.roi_size) != 3 or any(n < 1 for n in self.roi_size)):
            raise ValueError(f"roi_size: expected 3 positive integers or null, got {self.roi_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap: must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size: must be >= 1, got {self.sw_batch_size}")
        if self.blend not in BLENDS:
            raise ValueError(f"blend: {self.blend!r} is not one of {list(BLENDS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold: must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``steps`` is the budget; validation every ``val_every`` steps selects ``best``."""

    method: str = "naive"
    steps: int = 1000
    seed: int = 0
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    val_every: int = 250
    val_max_cases: int | None = None
    # what selects the model: the mean validation Dice over every class ("all") or over the organ regions
    # only ("regions"); see unionseg.training.validation.selection_score
    select_on: Literal["all", "regions"] = field(default="all", metadata=HASH_OMITS_DEFAULT)
    ckpt_every: int = 100
    log_every: int = 10
    amp: bool = True
    deterministic: bool = False
    device: str = "auto"
    expert_steps: int | None = None  # shared experts' budget; None = the same `steps` (contract 6)
    options: dict[str, Any] = field(default_factory=dict)
    # a model file (of this method, network and classes) whose weights start the run instead of a random
    # draw: fine-tuning on other data, or a longer schedule after a finished run; the optimiser starts anew
    init_from: str | None = field(default=None, metadata=HASH_OMITS_DEFAULT)

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError("steps: must be >= 1")
        for key in ("val_every", "ckpt_every", "log_every"):  # each named (the three were named together)
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: must be in [0, 2**32), got {self.seed}")
        if self.val_max_cases is not None and self.val_max_cases < 1:
            raise ValueError(f"val_max_cases: must be >= 1 or null (every validation case), got {self.val_max_cases}")
        if self.expert_steps is not None and self.expert_steps < 1:
            raise ValueError(f"expert_steps: must be >= 1 or null (the run's steps), got {self.expert_steps}")
        if not is_device_name(self.device):
            raise ValueError(f"device: {self.device!r} is not one of {DEVICE_NAMES}")

    @property
    def roi_size(self) -> tuple[int, int, int]:
        return self.inference.roi_size or self.data.patch_size


def load_train_config(path: str | Path | None = None,
                      overrides: Sequence[str] | Mapping[str, Any] | str | None = None,
                      base: str | Path | None = None, **fixed: Any) -> TrainConfig:
    """A recipe (YAML) plus ``key=value`` overrides; ``fixed`` keys (e.g. method) override both.

    The values are checked for their type and range here; what depends on the project or the machine (a
    dataset name, the device, a patch size the network cannot halve) is checked when training starts,
    before anything is written.

    This is the low-level loader: it starts from the bare defaults of :class:`TrainConfig` (a learning rate
    of 0.003, which trains the built-in budgets far more slowly) unless ``base`` says otherwise.
    :func:`unionseg.training.recipes.train_config` builds what ``unionseg train`` trains with (the method's
    built-in recipe underneath).

    Args:
        path: the recipe; ``None``: the bare defaults of :class:`TrainConfig` (under ``base``, if given).
        overrides: ``key=value`` strings applied last (one string alone is one override), or a mapping
            ``{"steps": 1500, "optim.lr": 0.01}`` of Python values.
        base: a recipe underneath ``path`` (the method's built-in one, for ``train -c``): what ``path``
            leaves out keeps ``base``'s value, mappings merged key by key (``optim: {lr: 0.01}`` keeps
            ``base``'s optimiser and schedule).

    Raises:
        ConfigError: an unreadable recipe, an unknown key or a bad value; ``method`` given that differs from
            the one ``path`` or ``base`` names.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    for recipe in (base, path):
        if recipe is None:
            continue
        raw = load_yaml(recipe)
        if raw is not None and not isinstance(raw, dict):
            from unionseg.errors import ConfigError

            raise ConfigError("expected a mapping at the top level", recipe)
        written = (raw or {}).get("method")
        if "method" in fixed and written is not None and written != fixed["method"]:  # path's or base's
            from unionseg.errors import ConfigError

            raise ConfigError(f"method: the recipe says {written!r}, the call says {fixed['method']!r}; give one of "
                              "them", recipe)
        data = _merged(data, dict(raw or {}))
        source = str(recipe)
    data.update(fixed)
    cfg = from_dict(TrainConfig, data, source=source)
    if isinstance(overrides, str):  # "steps=3" was read one character at a time ("override 's' ...")
        overrides = [overrides]
    if overrides:
        # the method validates option names, build_loader the dataset names
        cfg = apply_overrides(cfg, overrides, open_maps=("options", "data.dataset_weights"))
    return cfg


def _merged(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``under``; where both hold a mapping under one key, merged key by key."""
    merged = dict(under)
    for key, value in over.items():
        below = merged.get(key)
        merged[key] = _merged(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged
