"""Combining single-dataset experts: per-group probabilities for the merge function, and the deployable
``individual`` ensemble (K forward passes, one label map).

Each expert is a softmax network over background + its dataset's annotated leaves (``leaf_ids`` maps its
channels to global leaf ids; channel 0 is background). Where several experts cover the same class their
probabilities are averaged (our interpretation; the papers have one expert per organ): an organ region over
the experts that hold the organ, a part over the experts that hold the part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from unionseg.labels import LabelSpace, region_name


def experts_to_groups(
    probs: Sequence[torch.Tensor], leaf_ids: Sequence[Sequence[int]], space: LabelSpace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert softmax outputs -> merge-function inputs.

    Args:
        probs: per expert (1 + K_j, *S) probabilities (channel 0 background).
        leaf_ids: per expert the K_j global leaf ids of channels 1..K_j.

    Returns:
        region (G, *S), parts (P, *S), organ leaves (G, *S); classes no expert covers get 0.
    """
    spatial = probs[0].shape[1:]
    dev, dt = probs[0].device, torch.float32
    region_sum = torch.zeros((space.n_groups, *spatial), device=dev, dtype=dt)
    organ_sum = torch.zeros_like(region_sum)
    part_sum = torch.zeros((len(space.part_ids), *spatial), device=dev, dtype=dt)
    region_n = [0] * space.n_groups
    part_n = [0] * len(space.part_ids)
    part_pos = {leaf: k for k, leaf in enumerate(space.part_ids)}
    # an expert speaks for a group's region only if it holds the organ: one that knows only a part (a
    # hepatic-vessel expert's liver tumour) would add its tumour probability as the whole liver region and
    # halve the liver expert's; where no expert holds the organ (tumour-only data), the parts' experts speak
    holds_organ = {grp.index for ids in leaf_ids for grp in space.groups if grp.organ_id in ids}
    for p, ids in zip(probs, leaf_ids, strict=False):
        p = p.float()
        channel = {leaf: c + 1 for c, leaf in enumerate(ids)}
        for grp in space.groups:
            present = [channel[leaf] for leaf in grp.leaf_ids if leaf in channel]
            if not present or (grp.index in holds_organ and grp.organ_id not in channel):
                continue
            region_sum[grp.index] += p[present].sum(0)
            if grp.organ_id in channel:
                organ_sum[grp.index] += p[channel[grp.organ_id]]
            region_n[grp.index] += 1
        for leaf, c in channel.items():
            if leaf in part_pos:
                part_sum[part_pos[leaf]] += p[c]
                part_n[part_pos[leaf]] += 1
    for g, n in enumerate(region_n):
        if n > 1:
            region_sum[g] /= n
            organ_sum[g] /= n
    for k, n in enumerate(part_n):
        if n > 1:
            part_sum[k] /= n
    return region_sum, part_sum, organ_sum


class ExpertEnsemble(nn.Module):
    """The deployed ``individual`` baseline: every expert on the same window, combined per group.

    ``forward`` returns sigmoid-form logits (contract 4) over ``channels``: one region channel per covered
    group, then one channel per covered part holding ``min(p_part / r_g, r_g)``: the part's probability
    GIVEN its region, capped by the region. With it the sigmoid decoding gives exactly the experts' own
    decision for single-part groups:

    * the merge function's sigmoid rule (a part wins above 0.5) becomes "the part beats its organ leaf"
      wherever the region is accepted (r_g > 0.5, so the cap changes no decision there);
    * the sigmoid decoding takes a region as the maximum of its region and part channels (a tumour channel
      is evidence for its organ), and the cap keeps that maximum equal to r_g. Without the cap, a ratio of
      two tiny probabilities far from the organ (say 1e-5 / 1.5e-5) claimed the region: the `individual`
      baseline labelled half of every test volume kidney tumour (kidney Dice 0.03) before this was fixed.
    """

    #: the part channels are probabilities given the region (the predictor says so in ``_probs.json``)
    conditional_parts = True


    def __init__(self, experts: Sequence[nn.Module], leaf_ids: Sequence[Sequence[int]], space: LabelSpace) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.leaf_ids = [list(map(int, ids)) for ids in leaf_ids]
        self.space = space
        covered = {leaf for ids in self.leaf_ids for leaf in ids}
        self.groups = [g for g in space.groups if covered & set(g.leaf_ids)]
        self.parts = [p for p in space.part_ids if p in covered]
        self.channels = [region_name(g.name) for g in self.groups] + [space.names[p] for p in self.parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [torch.softmax(e(x).float(), dim=1) for e in self.experts]
        batch = []
        for b in range(x.shape[0]):
            region, parts, _ = experts_to_groups([o[b] for o in outs], self.leaf_ids, self.space)
            part_pos = {leaf: k for k, leaf in enumerate(self.space.part_ids)}
            chans = [region[g.index] for g in self.groups]
            for p in self.parts:
                g = self.space.groups[self.space.group_of_leaf(p)]
                r = region[g.index]
                chans.append(torch.minimum(parts[part_pos[p]] / r.clamp_min(1e-6), r))
            batch.append(torch.stack(chans))
        probs = torch.stack(batch).clamp(1e-6, 1 - 1e-6)
        return torch.log(probs) - torch.log1p(-probs)


def ensemble_spec(expert_specs: Sequence[dict[str, Any]], leaf_ids: Sequence[Sequence[int]]) -> dict[str, Any]:
    return {"kind": "ensemble", "experts": list(expert_specs), "leaf_ids": [list(map(int, i)) for i in leaf_ids]}


def build_deployed(spec: dict[str, Any], space: LabelSpace) -> nn.Module:
    """Rebuild a deployed module from its model-file spec.

    Kinds: a plain network spec (``{"backbone", "head"}``, built by ``unionseg.networks.build_network``);
    ``{"kind": "ensemble", "experts", "leaf_ids"}`` (the ``individual`` baseline); ``{"kind": "select",
    "network", "indices"}`` (task-conditioned networks: all tasks in one call, meaningful channels kept).
    """
    from unionseg.networks import build_network

    kind = spec.get("kind")
    if kind == "ensemble":
        return ExpertEnsemble([build_network(s) for s in spec["experts"]], spec["leaf_ids"], space)
    if kind == "select":
        from unionseg.methods.dodnet import ChannelSelect

        return ChannelSelect(build_network(spec["network"]), list(spec["indices"]))
    return build_network(spec)
