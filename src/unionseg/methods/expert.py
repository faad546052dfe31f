"""The single-dataset expert: a softmax network over background + one dataset's annotated leaves.

Experts are shared artefacts (contract 6): trained once per (prepared data, config, seed) by the artefact
cache, with the same backbone and step budget as any single network, and reused by ``individual``,
co-training (pseudo labels) and MS-KD (teachers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unionseg.labels import LabelSpace, Leaf
from unionseg.methods.base import Deployed, Method, register_method


def expert_subspace(space: LabelSpace, dataset: str) -> tuple[LabelSpace, np.ndarray, list[int]]:
    """The expert's own label space, the global-code -> expert-code lookup, and its global leaf ids.

    A part whose organ the dataset does not annotate (a tumour-only set) becomes an organ of its own in the
    expert's space.
    """
    mask = space.annotated_leaf_mask(dataset)
    leaf_ids = [i for i in range(1, space.n_leaves) if mask[i]]
    names = {space.names[i] for i in leaf_ids}
    leaves = [Leaf(space.names[i], space.leaves[i].part_of if space.leaves[i].part_of in names else None)
              for i in leaf_ids]
    sub = LabelSpace(leaves, source=f"expert:{dataset}")
    lut = np.zeros(space.n_codes, dtype=np.int64)
    for k, gid in enumerate(leaf_ids, start=1):
        lut[gid] = k
    for grp in space.groups:
        if all(mask[i] for i in grp.leaf_ids):
            lut[space.n_leaves + grp.index] = sub.code(f"region:{grp.name}")
    return sub, lut, leaf_ids


@dataclass(frozen=True)
class ExpertOptions:
    dataset: str = ""


@register_method("expert")
class ExpertMethod(Method):
    """Trains on one dataset with CE + Dice over its own classes (region codes through the marginal form)."""
    summary = ("one dataset's classes alone (options.dataset=NAME); the shared experts of individual, "
               "cotraining and mskd")

    Options = ExpertOptions

    def label(self) -> str:
        return f"expert {self.options.dataset}"  # the shared experts' progress lines say whose they are

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        if self.options.dataset not in ctx.train_datasets:
            from unionseg.errors import ConfigError

            known = ", ".join(ctx.train_datasets)
            if not self.options.dataset:
                raise ConfigError(f"expert: give the dataset it learns, options.dataset=NAME (one of: {known})")
            raise ConfigError(f"expert: unknown training dataset {self.options.dataset!r} (one of: {known})")
        self.sub, lut, self.leaf_ids = expert_subspace(self.space, self.options.dataset)
        self.lut = torch.as_tensor(lut)
        self.full = torch.ones(1, self.sub.n_leaves, dtype=torch.bool)

    def datasets(self) -> list[str]:
        return [self.options.dataset]

    def network_spec(self) -> dict[str, Any]:
        return {"backbone": self.ctx.cfg.network.backbone_spec(),
                "head": {"name": "softmax", "out_channels": self.sub.n_leaves}}

    def build(self) -> dict[str, torch.nn.Module]:
        from unionseg.networks import build_network

        return {"net": build_network(self.network_spec())}

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        from unionseg.losses import marginal_loss

        if self.lut.device != batch["label"].device:  # once: a copy each step made the CPU wait for the GPU
            self.lut, self.full = self.lut.to(batch["label"].device), self.full.to(batch["label"].device)
        codes = self.lut[batch["label"]]
        logits = self.models["net"](batch["image"])
        annotated = self.full.expand(codes.shape[0], -1)
        terms = marginal_loss(logits, codes, annotated, self.sub)
        return {"loss": terms["ce"] + terms["dice"], **terms}

    def deploy(self) -> Deployed:
        mask = np.zeros(self.space.n_leaves, dtype=bool)
        mask[[0, *self.leaf_ids]] = True
        return Deployed(self.raw_models["net"], self.network_spec(), "softmax", list(self.sub.names),
                        label_space=self.sub, to_global=np.asarray([0, *self.leaf_ids], dtype=np.uint8),
                        predictable=mask)
