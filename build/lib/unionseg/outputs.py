"""Model output forms (contract 4) and their decoding into one label map through the merge function.

A deployed model declares ``output_form`` and one class key per output channel (``channels``):

* ``softmax``: channels are the global leaves in id order; probabilities = softmax over channels.
* ``sigmoid``: one independent probability per channel (sigmoid of the logit). A channel key is a region
  (``region:liver``: the organ with its parts) or a leaf (``liver_tumour``; an organ leaf counts towards
  its region). A key may repeat (several
  tasks predict the same class, as DoDNet's tasks may): the maximum is taken.

:func:`decode_probs` turns a model's probabilities into labels through the ONE merge function
(:mod:`unionseg.labels`); the trainer's validation uses it, and the predictor's streaming decider calls the
same merge on its grouped probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from unionseg.labels import LabelSpace, merge, merge_softmax, region_name

if TYPE_CHECKING:
    import torch

def activate(logits: torch.Tensor, output_form: str, dim: int = 0) -> torch.Tensor:
    """Logits -> probabilities in float32 (softmax over ``dim`` or elementwise sigmoid)."""
    import torch

    logits = logits.float()
    if output_form == "softmax":
        return torch.softmax(logits, dim=dim)
    return torch.sigmoid(logits)


def sigmoid_sources(channels: Sequence[str], space: LabelSpace) -> tuple[list[list[int]], list[list[int]]]:
    """For each group and each part, the output channels its probability is the maximum of.

    A region takes its region channels AND the channels of its leaves (organ leaf and parts: a part lies
    inside its organ, so a tumour channel is evidence for the organ region; a tumour-only task thereby
    yields a region); a part takes its own channels (a key may repeat, one per task).
    """
    region_src = []
    for grp in space.groups:
        keys = {region_name(grp.name), *(space.names[i] for i in grp.leaf_ids)}
        region_src.append([c for c, k in enumerate(channels) if k in keys])
    part_src = [[c for c, k in enumerate(channels) if k == space.names[p]] for p in space.part_ids]
    return region_src, part_src


def sigmoid_to_groups(probs: torch.Tensor, channels: Sequence[str], space: LabelSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, *S) sigmoid probabilities -> (region (G,*S), parts (P,*S)); classes no channel covers get 0."""
    import torch

    region_src, part_src = sigmoid_sources(channels, space)
    zero = torch.zeros_like(probs[0])
    rows = [probs[idx].amax(0) if idx else zero for idx in region_src + part_src]
    stacked = torch.stack(rows) if rows else probs[:0]
    return stacked[: space.n_groups], stacked[space.n_groups:]


def decode_probs(
    probs: torch.Tensor,
    output_form: str,
    channels: Sequence[str],
    space: LabelSpace,
    threshold: float | None = 0.5,
    decision: str = "merge",
) -> torch.Tensor:
    """(C, *S) probabilities -> (*S) uint8 leaf ids through the merge function.

    Args:
        decision: ``merge`` (contract 3) or ``argmax`` (softmax models only: plain argmax over leaves).
    """
    import torch

    if decision == "argmax":
        if output_form != "softmax":
            raise ValueError("decision='argmax' needs a softmax model")
        return probs.argmax(dim=0).to(torch.uint8)
    if decision != "merge":
        raise ValueError(f"unknown decision {decision!r}; known: merge, argmax")
    if output_form == "softmax":
        return merge_softmax(probs, space, threshold=threshold)
    regions, parts = sigmoid_to_groups(probs, channels, space)
    return merge(regions, parts, space, organ_leaf_probs=None, threshold=0.5 if threshold is None else threshold)

