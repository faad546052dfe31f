"""``conditional`` baseline (cCNN-like static conditioning): the one-hot task code enters the network as
extra input channels; one output head. The comparison DoDNet's dynamic head must win. All-task inference
runs the backbone once per task (the cost of input conditioning)."""

from __future__ import annotations

from unionseg.methods.base import register_method
from unionseg.methods.dodnet import TaskMethod


@register_method("conditional")
class ConditionalMethod(TaskMethod):
    summary = "baseline for DoDNet: the task code as extra input channels, one head"
    head_name = "conditional"
