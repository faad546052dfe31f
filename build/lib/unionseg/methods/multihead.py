"""``multihead`` baseline: a shared backbone with one static head per task (DoDNet's comparison), trained
with the same masked sigmoid Dice + BCE as DoDNet."""

from __future__ import annotations

from unionseg.methods.base import register_method
from unionseg.methods.dodnet import TaskMethod


@register_method("multihead")
class MultiHeadMethod(TaskMethod):
    summary = "baseline for DoDNet: one shared network, a static head per task"
    head_name = "multihead"
