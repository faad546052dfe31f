"""Shared type aliases. Tensor shapes follow (B, C, D, H, W); our arrays are stored (X, Y, Z) in RAS order."""

from __future__ import annotations

from os import PathLike
from typing import Union

PathLikeStr = Union[str, "PathLike[str]"]
