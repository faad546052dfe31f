"""Built-in recipes: ``configs/<method>.yaml`` shipped inside the package."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unionseg.training.config import TrainConfig


def recipe_dir() -> Path:
    return Path(str(resources.files("unionseg") / "configs"))


#: the budget the built-in recipes share, under a method that ships no recipe (a plugin)
BUDGET_RECIPE = "budget.yaml"


def default_recipe(method: str) -> Path:
    """The recipe built into unionseg for ``method`` (its budget, optimiser and options); for a registered
    method without one (a plugin), the budget every built-in recipe shares (``configs/budget.yaml``): a
    plugin trained with TrainConfig's bare defaults (lr 0.003) where the built-in methods it is compared
    with train at 0.02 (helper-83).

    Raises:
        ConfigError: ``method`` is no method of unionseg (a misspelt name gave the bare defaults silently).
    """
    from unionseg.methods.base import get_method

    get_method(method)  # an unknown name: the error, with the plugin hint
    path = recipe_dir() / f"{method}.yaml"
    return path if path.is_file() else recipe_dir() / BUDGET_RECIPE


def resolve_method(method: str | None, recipe: str | Path | None, given_as: str = "the call") -> str:
    """The method to train: ``method`` (``--method``), else the recipe's own ``method:``, else ``naive``.

    ``given_as`` names where ``method`` came from in the message (``--method`` for the CLI).

    Raises:
        ConfigError: ``method`` and the recipe name different methods, or the recipe's is not a name.
    """
    from unionseg.config import load_yaml
    from unionseg.errors import ConfigError

    written = None
    if recipe is not None:
        raw = load_yaml(recipe)
        written = raw.get("method") if isinstance(raw, dict) else None
        if written is not None and not isinstance(written, str):
            raise ConfigError(f"method: expected a method name, got {written!r}", recipe)
    if method is not None and written is not None and written != method:
        raise ConfigError(f"method: the recipe says {written!r}, {given_as} says {method!r}; give one of them",
                          recipe)
    return method or written or "naive"


def train_config(method: str | None = None, recipe: str | Path | None = None,
                 overrides: Sequence[str] | Mapping[str, Any] | str | None = None,
                 given_as: str = "the call") -> TrainConfig:
    """The configuration ``unionseg train [--method METHOD] [-c RECIPE] [OVERRIDES]`` trains with.

    The method's recipe built into unionseg (its budget, optimiser and options), then ``recipe`` on top of
    it (what the file leaves out keeps the built-in value, mappings merged key by key), then the
    ``key=value`` overrides. :func:`~unionseg.training.config.load_train_config` alone starts from the bare
    defaults of :class:`~unionseg.training.config.TrainConfig` instead (a learning rate of 0.003, which
    trains the built-in budgets far more slowly): the same recipe file gave another run from Python than
    from the command line.

    Args:
        method: the method (``unionseg methods``); default: the recipe's ``method:``, else ``naive``.
        recipe: a recipe YAML on top of the method's; a run folder's ``config.yaml`` repeats that run.
        overrides: ``key=value`` strings (``"steps=1500"``, ``"options.cross_task_weight=0.25"``), or a
            mapping of Python values (``{"steps": 1500}``).
        given_as: where ``method`` came from, for the message when the recipe names another (``--method``).

    Raises:
        ConfigError: an unknown method, ``method`` differing from the recipe's, an unreadable recipe, an
            unknown key or a bad value (a method option, a network preset or backbone, a patch or window the
            backbone cannot take included).
    """
    from unionseg.config import from_dict
    from unionseg.methods.base import get_method
    from unionseg.training.config import load_train_config

    method = resolve_method(method, recipe, given_as)
    cfg = load_train_config(recipe, overrides or [], base=default_recipe(method), method=method)
    # the method's options too, as the run checks them: an unknown one was refused only by train() (helper-106)
    from_dict(get_method(cfg.method).Options, cfg.options, source=f"options of method {cfg.method!r}")
    # and the network: a preset or backbone it does not have, or a patch it cannot halve, was refused only by
    # train() (helper-119); the architecture is built on the meta device, without weights
    from unionseg.training.trainer import check_sizes

    check_sizes(cfg)
    return cfg
