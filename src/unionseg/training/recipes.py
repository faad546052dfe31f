"""Built-in recipes: ``configs/<method>.yaml`` shipped inside the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def recipe_dir() -> Path:
    return Path(str(resources.files("unionseg") / "configs"))


def default_recipe(method: str) -> Path | None:
    path = recipe_dir() / f"{method}.yaml"
    return path if path.is_file() else None
