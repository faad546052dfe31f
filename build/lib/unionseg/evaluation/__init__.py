"""Evaluation: Dice, HD95 (mm) and NSD with explicit empty-mask rules; case/folder scoring; reports.

Names load lazily so that importing the package (the CLI does) costs nothing; no torch anywhere here.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "dice": "metrics", "hd95": "metrics", "nsd": "metrics", "score_masks": "metrics",
    "surface_distances": "metrics", "hd95_penalty": "metrics", "Score": "metrics", "MaskScores": "metrics",
    "METRICS": "metrics", "EMPTY_RULES": "metrics",
    "evaluate_case": "evaluate", "validation_dice": "evaluate", "evaluate_folder": "evaluate",
    "summarise": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'unionseg.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"unionseg.evaluation.{module}"), name)
