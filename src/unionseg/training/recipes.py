"""Built-in recipes: ``configs/<method>.yaml`` shipped inside the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def recipe_dir() -> Path:
    return Path(str(resources.files("unionseg") / "configs"))


def default_recipe(method: str) -> Path | None:
    """The recipe built into unionseg for ``method`` (its budget, optimiser and options), or None for a
    registered method that ships none (then :class:`~unionseg.training.config.TrainConfig`'s defaults apply).

    Raises:
        ConfigError: ``method`` is no method of unionseg (a misspelt name gave the bare defaults silently).
    """
    from unionseg.methods.base import available_methods

    path = recipe_dir() / f"{method}.yaml"
    if path.is_file():
        return path
    if method not in available_methods():
        from unionseg.errors import ConfigError

        raise ConfigError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
    return None
