"""Model output forms (contract 4) and their decoding into one label map through the merge function.

A deployed model declares ``output_form`` and one class key per output channel (``channels``):

* ``softmax``: channels are the global leaves in id order; probabilities = softmax over channels.
* ``sigmoid``: one independent probability per channel (sigmoid of the logit). A channel key is a region
  (``region:liver``: the organ with its parts) or a part leaf (``liver_tumour``). A key may repeat (several
  tasks predict the same class, as DoDNet's tasks may): the maximum is taken.

:func:`decode` is the one place where network outputs become labels; the trainer's validation, the
artefact cache (pseudo labels) and the predictor all call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from unionseg.labels import REGION_PREFIX, LabelSpace, merge, merge_softmax

if TYPE_CHECKING:
    import torch

OutputForm = Literal["softmax", "sigmoid"]
OUTPUT_FORMS = ("softmax", "sigmoid")


def check_channels(output_form: str, channels: Sequence[str], space: LabelSpace) -> None:
    """Raise ValueError when channel keys do not fit the output form and label space."""
    if output_form not in OUTPUT_FORMS:
        raise ValueError(f"unknown output form {output_form!r}; known: {OUTPUT_FORMS}")
    if output_form == "softmax":
        if list(channels) != list(space.names):
            raise ValueError(f"softmax channels must be the leaves in id order {list(space.names)}, got {list(channels)}")
        return
    valid = set(space.region_keys()) | set(space.part_keys())
    bad = [k for k in channels if k not in valid]
    if bad:
        raise ValueError(f"sigmoid channel keys must be regions or part leaves; invalid: {bad}")


def activate(logits: torch.Tensor, output_form: str, dim: int = 0) -> torch.Tensor:
    """Logits -> probabilities in float32 (softmax over ``dim`` or elementwise sigmoid)."""
    import torch

    logits = logits.float()
    if output_form == "softmax":
        return torch.softmax(logits, dim=dim)
    return torch.sigmoid(logits)


def sigmoid_to_groups(probs: torch.Tensor, channels: Sequence[str], space: LabelSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, *S) sigmoid probabilities -> (region (G,*S), parts (P,*S)); missing classes get probability 0.

    A group without a region channel but with part channels (a tumour-only task) takes the maximum of its
    parts as its region probability: those parts are all we know of the organ (our interpretation).
    """
    import torch

    spatial = probs.shape[1:]
    regions = torch.zeros((space.n_groups, *spatial), dtype=probs.dtype, device=probs.device)
    parts = torch.zeros((len(space.part_ids), *spatial), dtype=probs.dtype, device=probs.device)
    has_region = [False] * space.n_groups
    part_pos = {leaf: k for k, leaf in enumerate(space.part_ids)}
    for c, key in enumerate(channels):
        if key.startswith(REGION_PREFIX):
            g = space.group(key[len(REGION_PREFIX):]).index
            regions[g] = torch.maximum(regions[g], probs[c])
            has_region[g] = True
        else:
            k = part_pos[space.leaf_id(key)]
            parts[k] = torch.maximum(parts[k], probs[c])
    for grp in space.groups:
        if not has_region[grp.index] and grp.part_ids:
            regions[grp.index] = parts[[part_pos[p] for p in grp.part_ids]].max(dim=0).values
    return regions, parts


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


def decode(
    logits: torch.Tensor,
    output_form: str,
    channels: Sequence[str],
    space: LabelSpace,
    threshold: float | None = 0.5,
    decision: str = "merge",
) -> torch.Tensor:
    """(C, *S) logits -> (*S) uint8 leaf ids."""
    return decode_probs(activate(logits, output_form), output_form, channels, space, threshold, decision)
