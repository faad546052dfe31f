"""Inference: the :class:`Predictor` (sliding window in slabs, TTA, resample back, merge, write).

Imported lazily so that ``import unionseg.inference`` does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unionseg.inference.predictor import Predictor, resolve_device, write_probabilities

__all__ = ["Predictor", "resolve_device", "write_probabilities"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from unionseg.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'unionseg.inference' has no attribute {name!r}")
