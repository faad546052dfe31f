"""The label space: global leaves, organ regions, per-dataset maps, and the ONE merge function.

Contracts (DESIGN section 3):

* **Leaves** are the global, mutually exclusive classes; id 0 is ``background``. A leaf may be ``part_of``
  an organ leaf (a tumour inside its organ). An organ leaf and its parts form a **group**; the group's
  **region** (``region:liver``) is the union of its leaves, the object LiTS/KiTS/MSD score as "liver".
* **Codes** are what prepared label volumes store: ``0..L-1`` are leaf ids, ``L + g`` is the region code of
  group ``g`` (a voxel known to lie in the organ or one of its parts, without knowing which leaf). A 0
  means "background, or any leaf this dataset does not annotate": its meaning depends on the sample's
  annotated mask, which travels with every sample (B x L bool).
* **Dataset maps** send local label values to a leaf or a region (many-to-one allowed) and name the
  classes the dataset annotates.
* :func:`merge` turns per-group probabilities into one leaf label map; :func:`merge_softmax` is the
  softmax-model entry point. Every consumer (ensembles, pseudo labels, MS-KD regions, DoDNet inference,
  the predictor) calls these two.

Torch is imported lazily so that ``info``, ``prepare`` and ``evaluate`` never pay for it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from unionseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

BACKGROUND = "background"
REGION_PREFIX = "region:"
OTHER_LABELS = "other"
"""The key of a dataset's ``labels`` that stands for every value the map does not list (``other: background``)."""


def region_name(organ: str) -> str:
    """The class key of an organ's region (``region:liver``)."""
    return f"{REGION_PREFIX}{organ}"


def display_key(key: str) -> str:
    """A class key as tables and figures show it: ``region:`` left out, per member of a union
    (``liver+hepatic_vessel``)."""
    return "+".join(m[len(REGION_PREFIX):] if m.startswith(REGION_PREFIX) else m for m in key.split("+"))


@dataclass(frozen=True)
class Leaf:
    """One global class. ``part_of`` names the organ leaf this leaf lies inside (tumours)."""

    name: str
    part_of: str | None = None


@dataclass(frozen=True)
class Group:
    """An organ leaf with its parts; ``leaf_ids[0]`` is the organ leaf itself."""

    index: int
    name: str
    organ_id: int
    part_ids: tuple[int, ...]

    @property
    def leaf_ids(self) -> tuple[int, ...]:
        return (self.organ_id, *self.part_ids)


@dataclass(frozen=True)
class DatasetLabels:
    """How one dataset's local label values map into the global space.

    Args:
        name: dataset name (unique in a project).
        local_to_global: local value (> 0) -> leaf name, ``region:<organ>``, or ``background`` for a structure
            no class stands for (counted as 0); 0 is always background.
        annotated: leaves and/or regions whose ground truth this dataset can be trusted for.
        fully_labelled: a val or test set (every class it annotates is labelled wherever it occurs).
        other: ``background`` sends every local value > 0 that ``local_to_global`` does not list to background
            (a multi-class label file used for a few of its classes); ``None``: such a value is an error.
    """

    name: str
    local_to_global: Mapping[int, str]
    annotated: tuple[str, ...]
    fully_labelled: bool = field(default=False)
    other: str | None = None


class LabelSpace:
    """Global leaves, their groups and regions, and every dataset's map onto them.

    Args:
        leaves: the non-background leaves, in id order (ids start at 1).
        datasets: per-dataset maps; validated against the leaves.
        source: file name used in error messages.

    Raises:
        ConfigError: duplicate names, a part whose organ is missing or is itself a part, a dataset map that
            names an unknown class, or a mapped class outside the dataset's annotated set.
    """

    def __init__(
        self, leaves: Sequence[Leaf], datasets: Sequence[DatasetLabels] = (), source: str = "<label space>"
    ) -> None:
        self.source = source
        names = [BACKGROUND] + [leaf.name for leaf in leaves]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"classes: duplicate class names {dup} (background is implicit, id 0)", source)
        for leaf in leaves:
            # "+" joins the classes of a union in an evaluation map (region:liver+hepatic_vessel)
            if (not leaf.name or leaf.name.startswith(REGION_PREFIX) or leaf.name != leaf.name.strip()
                    or "+" in leaf.name):
                raise ConfigError(f"classes: invalid class name {leaf.name!r} (not empty, no 'region:' prefix, "
                                  "no '+', no spaces around it)", source)
        self.leaves: tuple[Leaf, ...] = (Leaf(BACKGROUND), *leaves)
        self.names: tuple[str, ...] = tuple(names)
        self._id = {n: i for i, n in enumerate(names)}
        by_name = {leaf.name: leaf for leaf in leaves}
        organs = [leaf for leaf in leaves if leaf.part_of is None]
        for leaf in leaves:
            if leaf.part_of is None:
                continue
            parent = by_name.get(leaf.part_of)
            if parent is None:
                raise ConfigError(
                    f"classes: {leaf.name!r} is part_of {leaf.part_of!r}, which is not a class; "
                    f"add {leaf.part_of!r} to classes", source)
            if parent.part_of is not None:
                raise ConfigError(
                    f"classes: {leaf.name!r} is part_of {leaf.part_of!r}, which is itself a part "
                    "(one level of parts only)", source)
        self.groups: tuple[Group, ...] = tuple(
            Group(g, o.name, self._id[o.name],
                  tuple(self._id[p.name] for p in leaves if p.part_of == o.name))
            for g, o in enumerate(organs)
        )
        self._group_of_leaf = np.full(len(names), -1, dtype=np.int64)
        for grp in self.groups:
            self._group_of_leaf[list(grp.leaf_ids)] = grp.index
        self.part_ids: tuple[int, ...] = tuple(i for grp in self.groups for i in grp.part_ids)
        self.datasets: dict[str, DatasetLabels] = {}
        for ds in datasets:
            self.add_dataset(ds)

    # ------------------------------------------------------------------ sizes and names
    @property
    def n_leaves(self) -> int:
        """Number of leaves including background."""
        return len(self.names)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_codes(self) -> int:
        """Leaf ids plus one region code per group."""
        return self.n_leaves + self.n_groups

    def leaf_id(self, name: str) -> int:
        try:
            return self._id[name]
        except KeyError:
            raise ConfigError(f"unknown class {name!r}; known: {', '.join(self.names[1:])}",
                              self.source) from None

    def group(self, organ: str) -> Group:
        for grp in self.groups:
            if grp.name == organ:
                return grp
        raise ConfigError(f"unknown organ region {organ!r}", self.source)

    def group_of_leaf(self, leaf_id: int) -> int:
        """Group index of a leaf (-1 for background)."""
        return int(self._group_of_leaf[leaf_id])

    def code(self, key: str) -> int:
        """Label code of a leaf name or a ``region:<organ>`` key."""
        if key.startswith(REGION_PREFIX):
            return self.n_leaves + self.group(key[len(REGION_PREFIX):]).index
        return self.leaf_id(key)

    def leaves_of(self, key: str) -> tuple[int, ...]:
        """Leaf ids a class key covers: one for a leaf, the group's leaves for a region."""
        if key.startswith(REGION_PREFIX):
            return self.group(key[len(REGION_PREFIX):]).leaf_ids
        return (self.leaf_id(key),)

    def region_keys(self) -> list[str]:
        return [region_name(g.name) for g in self.groups]

    def part_keys(self) -> list[str]:
        return [self.names[i] for i in self.part_ids]

    def evaluation_keys(self) -> list[str]:
        """What evaluation scores: every organ region and every part (tumour) leaf."""
        return self.region_keys() + self.part_keys()

    # ------------------------------------------------------------------ datasets
    def add_dataset(self, ds: DatasetLabels) -> None:
        where = f"datasets.{ds.name}"
        if ds.name in self.datasets:
            raise ConfigError(f"{where}: duplicate dataset name", self.source)
        for key in ds.annotated:
            self._check_key(key, f"{where}.annotated")
        covered = {leaf for key in ds.annotated for leaf in self.leaves_of(key)}
        if ds.other not in (None, BACKGROUND):
            raise ConfigError(f"{where}.labels.{OTHER_LABELS}: only {BACKGROUND!r} can stand for the values the map "
                              f"does not list, got {ds.other!r}", self.source)
        for value, key in ds.local_to_global.items():
            if not isinstance(value, int) or value <= 0 or value > 255:
                raise ConfigError(f"{where}.labels: local value {value!r} must be an integer in 1..255",
                                  self.source)
            if key == BACKGROUND:  # a structure no class stands for (a gallbladder in a 4-organ project)
                continue
            self._check_key(key, f"{where}.labels.{value}")
            if not set(self.leaves_of(key)) <= covered:
                raise ConfigError(
                    f"{where}.labels.{value}: maps to {key!r}, which is not in the dataset's annotated "
                    f"classes {list(ds.annotated)}", self.source)
        self.datasets[ds.name] = ds

    def _check_key(self, key: str, where: str) -> None:
        if key == BACKGROUND:
            raise ConfigError(f"{where}: background is implicit (local 0); do not list it", self.source)
        if key.startswith(REGION_PREFIX):
            organ = key[len(REGION_PREFIX):]
            if organ not in {g.name for g in self.groups}:
                raise ConfigError(f"{where}: {key!r} names no organ group", self.source)
        elif key not in self._id:
            raise ConfigError(f"{where}: unknown class {key!r}; known: {', '.join(self.names[1:])}",
                              self.source)

    def dataset(self, name: str) -> DatasetLabels:
        try:
            return self.datasets[name]
        except KeyError:
            raise ConfigError(f"unknown dataset {name!r} (known: {', '.join(self.datasets)})", self.source) from None

    def annotated_leaf_mask(self, dataset: str) -> np.ndarray:
        """(L,) bool: leaves whose presence/absence this dataset's ground truth determines.

        Background is always True: a 0 in the dataset then means background or an unannotated leaf.
        """
        mask = np.zeros(self.n_leaves, dtype=bool)
        mask[0] = True
        for key in self.dataset(dataset).annotated:
            mask[list(self.leaves_of(key))] = True
        return mask

    def full_mask(self) -> np.ndarray:
        """(L,) bool, all True: a fully labelled sample."""
        return np.ones(self.n_leaves, dtype=bool)

    def scorable_keys(self, annotated_leaves: np.ndarray | Iterable[bool]) -> list[str]:
        """Evaluation keys the ground truth of a sample with this annotated-leaf mask can be scored on:
        a region when all its leaves are annotated, a part leaf when it is annotated."""
        mask = np.asarray(list(annotated_leaves) if not isinstance(annotated_leaves, np.ndarray)
                          else annotated_leaves, dtype=bool)
        keys = [region_name(g.name) for g in self.groups if mask[list(g.leaf_ids)].all()]
        keys += [self.names[i] for i in self.part_ids if mask[i]]
        return keys

    def warn_annotations(self, dataset: str, source: object) -> None:
        """Each message of :meth:`unscored_organs` and :meth:`unlabelled_annotations` as a warning naming
        ``source`` (the project file)."""
        import warnings

        from unionseg.errors import UnionsegWarning

        for message in [*self.unscored_organs(dataset), *self.unlabelled_annotations(dataset)]:
            warnings.warn(f"{source}: {message}", UnionsegWarning, stacklevel=3)

    def unlabelled_annotations(self, dataset: str) -> list[str]:
        """One message per class a training ``dataset`` annotates while none of its label values maps to it
        (helper-78: a spleen set given the test set's ``annotated: [liver, spleen, kidney]``, accepted silently). Its
        label maps then say "no liver" on every voxel, which teaches the model that the organ is absent from
        all the dataset's images and undoes partial-label training, unless they truly show none."""
        spec = self.dataset(dataset)
        # a val or test set annotates every class, whether its cases show it or not; but with 'other:
        # background' a class whose values were left unlisted would be scored against an empty truth
        if spec.fully_labelled and spec.other is None:
            return []
        mapped = {leaf for key in spec.local_to_global.values() if key != BACKGROUND for leaf in self.leaves_of(key)}
        found = []
        for key in spec.annotated:
            if set(self.leaves_of(key)) & mapped:
                continue
            if spec.fully_labelled:
                found.append(f"datasets.{dataset}.annotated lists {key!r}, but no label value of {dataset!r} maps to "
                             f"it, and 'other: background' sends every unlisted value to background: {key!r} is "
                             f"scored against an empty truth; map its value(s) to {key!r}")
                continue
            found.append(f"datasets.{dataset}.annotated lists {key!r}, but no label value of {dataset!r} maps to "
                         f"it: its label maps then say that {key!r} is absent from every image, and the model "
                         f"is trained so; remove {key!r} from annotated unless the images truly show none (a "
                         "partially labelled dataset annotates only what it labels)")
        return found

    def unscored_organs(self, dataset: str) -> list[str]:
        """One message per organ whose leaf ``dataset`` annotates without all its parts: no case of the
        dataset can then be scored on the organ's region (validation, ``evaluate``), which a user who wrote
        ``annotated: [liver]`` for a liver label rarely means. Empty when nothing is left unscored."""
        mask = self.annotated_leaf_mask(dataset)
        found = []
        for g in self.groups:
            missing = [self.names[i] for i in g.part_ids if not mask[i]]
            if mask[g.organ_id] and missing:
                region = region_name(g.name)
                found.append(
                    f"datasets.{dataset}.annotated lists {g.name!r} but not {' or '.join(map(repr, missing))} "
                    f"(part of {g.name!r}), so no case of {dataset!r} is scored on {region!r} in validation or "
                    f"evaluate; if this dataset's {g.name} label includes its {', '.join(missing)}, map that value "
                    f"to {region!r} and annotate {region!r} instead; if it labels them, map and annotate them too")
        return found

    def local_lookup(self, dataset: str, declared: Collection[int] | None = None) -> np.ndarray:
        """(256,) int table local value -> global code; unmapped values are -1 (0 -> 0).

        Under ``other: background`` the values the map does not list are 0 too, except those the label files
        should not hold: with ``declared`` (the values the dataset's dataset.json declares) every value outside
        it stays -1 (a stray value is still refused), and without it 255 stays -1 (a 0/255 mask is still
        caught), unless the map lists it."""
        spec = self.dataset(dataset)
        table = np.full(256, -1, dtype=np.int64)
        if spec.other == BACKGROUND:
            swept = [v for v in declared if 0 < v < 256] if declared is not None else list(range(1, 255))
            table[swept] = 0
        table[0] = 0
        for value, key in spec.local_to_global.items():
            table[value] = self.code(key)
        return table

    def code_leaf_matrix(self) -> np.ndarray:
        """(n_codes, L) bool: which leaves each code stands for (code 0 only for background; its
        widening to unannotated leaves is done per sample by :func:`admissible`)."""
        mat = np.zeros((self.n_codes, self.n_leaves), dtype=bool)
        mat[np.arange(self.n_leaves), np.arange(self.n_leaves)] = True
        for grp in self.groups:
            mat[self.n_leaves + grp.index, list(grp.leaf_ids)] = True
        return mat

    def codes_to_leaf_masks(self, codes: np.ndarray, key: str) -> np.ndarray:
        """Boolean mask of voxels whose code lies in the class ``key`` (leaf or region), for evaluation
        of label maps that contain leaf ids (and possibly region codes)."""
        ids = set(self.leaves_of(key))
        if key.startswith(REGION_PREFIX):
            ids.add(self.code(key))
        return np.isin(codes, sorted(ids))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": [{"name": lf.name, **({"part_of": lf.part_of} if lf.part_of else {})}
                        for lf in self.leaves[1:]],
            "datasets": [{"name": d.name, "labels": {int(k): v for k, v in d.local_to_global.items()},
                          "annotated": list(d.annotated), "fully_labelled": d.fully_labelled,
                          **({"other": d.other} if d.other else {})}
                         for d in self.datasets.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<label space>") -> LabelSpace:
        leaves = [Leaf(c["name"], c.get("part_of")) for c in data["classes"]]
        datasets = [DatasetLabels(d["name"], {int(k): v for k, v in d["labels"].items()},
                                  tuple(d["annotated"]), bool(d.get("fully_labelled", False)), d.get("other"))
                    for d in data.get("datasets", [])]
        return cls(leaves, datasets, source)

    def __repr__(self) -> str:
        return f"LabelSpace(leaves={list(self.names)}, datasets={list(self.datasets)})"


# ---------------------------------------------------------------------- partial-label targets
def admissible(codes: torch.Tensor, annotated: torch.Tensor, space: LabelSpace) -> torch.Tensor:
    """Which leaves each voxel may belong to, given its code and its sample's annotated-leaf mask.

    Args:
        codes: (B, *S) integer codes (leaf ids or region codes).
        annotated: (B, L) bool, the annotated-leaf mask of each sample.

    Returns:
        (B, L, *S) bool: for a leaf code, that leaf; for a region code, the group's leaves; for 0,
        background plus every leaf the sample does not annotate.
    """
    import torch

    mat = torch.as_tensor(space.code_leaf_matrix(), device=codes.device)
    out = mat[codes.long()]  # (B, *S, L)
    out = torch.movedim(out, -1, 1)
    unannotated = (~annotated.bool()).view(annotated.shape[0], annotated.shape[1], *([1] * (codes.dim() - 1)))
    zero = (codes == 0).unsqueeze(1)
    return out | (zero & unannotated)


# ---------------------------------------------------------------------- the merge function
def merge(
    region_probs: torch.Tensor,
    part_probs: torch.Tensor,
    space: LabelSpace,
    organ_leaf_probs: torch.Tensor | None = None,
    threshold: float | None = 0.5,
    background_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn per-group probabilities into one leaf label map (DESIGN contract 3).

    A voxel belongs to the group with the highest region probability ``r_g`` if ``r_g > threshold``
    (or, with ``threshold=None``, if ``r_g`` beats ``background_probs``), else to background. Inside its
    group, a part wins where its probability beats the organ leaf's (and every other part of the group);
    a part can never appear outside its organ's group. Ties are decided the same way on every device:
    between groups the one listed first wins, at the threshold (or against background) background wins,
    and between a part and its organ the organ wins.

    Args:
        region_probs: (G, *S) region probability per group, in ``space.groups`` order.
        part_probs: (P, *S) probability per part leaf, in ``space.part_ids`` order (P may be 0).
        organ_leaf_probs: (G, *S) probability of each organ leaf itself. ``None`` (sigmoid heads, which
            produce regions and parts directly): the organ leaf counts as ``1 - max(parts of the group)``,
            so a single part wins where its own probability exceeds 0.5 (our interpretation).
        threshold: region acceptance threshold, or ``None`` to compare with ``background_probs``.
        background_probs: (*S) background probability; required when ``threshold`` is None.

    Returns:
        (*S) uint8 leaf ids.

    Raises:
        ValueError: shapes that do not match the label space.
    """
    import torch

    if region_probs.shape[0] != space.n_groups:
        raise ValueError(f"region_probs has {region_probs.shape[0]} channels, the space has {space.n_groups} groups")
    if part_probs.shape[0] != len(space.part_ids):
        raise ValueError(f"part_probs has {part_probs.shape[0]} channels, the space has {len(space.part_ids)} parts")
    spatial = region_probs.shape[1:]
    if space.n_groups == 0:
        return torch.zeros(spatial, dtype=torch.uint8, device=region_probs.device)
    # elementwise passes only (no boolean-mask assignment): this runs on every voxel of every prediction
    best_r, best_g = _first_max(region_probs)
    if threshold is None:
        if background_probs is None:
            raise ValueError("threshold=None needs background_probs")
        accept = best_r > background_probs
    else:
        accept = best_r > threshold
    part_row = {leaf: k for k, leaf in enumerate(space.part_ids)}
    device = region_probs.device
    choices = []  # per group: its leaf where the group wins (the organ, or the part beating the organ)
    for grp in space.groups:
        organ = torch.tensor(grp.organ_id, dtype=torch.uint8, device=device)
        if not grp.part_ids:
            choices.append(organ.expand(spatial))
            continue
        best_p, best_k = _first_max(part_probs[[part_row[p] for p in grp.part_ids]])
        organ_p = organ_leaf_probs[grp.index] if organ_leaf_probs is not None else 1.0 - best_p
        ids = torch.as_tensor(grp.part_ids, dtype=torch.uint8, device=device)
        choices.append(torch.where(best_p > organ_p, ids[best_k.long()], organ))
    labels = torch.gather(torch.stack(choices), 0, best_g.long().unsqueeze(0)).squeeze(0)
    return labels.masked_fill_(~accept, 0)


def _first_max(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over the first axis and the FIRST index reaching it (ties: the earlier row), as a chain of
    elementwise passes: values (*S), uint8 indices (*S). Same result as ``argmax`` on non-NaN input."""
    import torch

    best = rows[0]
    index = torch.zeros(best.shape, dtype=torch.uint8, device=best.device)
    for k in range(1, rows.shape[0]):
        better = rows[k] > best
        best = torch.maximum(best, rows[k])
        index.masked_fill_(better, k)
    return best, index


def softmax_to_groups(leaf_probs: torch.Tensor, space: LabelSpace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, *S) leaf probabilities -> (region (G,*S), parts (P,*S), organ leaves (G,*S))."""
    import torch

    regions = torch.stack([leaf_probs[list(g.leaf_ids)].sum(0) for g in space.groups]) if space.groups else \
        leaf_probs[:0]
    parts = leaf_probs[list(space.part_ids)] if space.part_ids else leaf_probs[:0]
    organs = leaf_probs[[g.organ_id for g in space.groups]] if space.groups else leaf_probs[:0]
    return regions, parts, organs


def merge_softmax(leaf_probs: torch.Tensor, space: LabelSpace, threshold: float | None = 0.5) -> torch.Tensor:
    """The merge function for softmax models: (L, *S) leaf probabilities -> (*S) uint8 leaf ids.

    ``threshold=None`` accepts a group where its region probability beats background's.
    """
    regions, parts, organs = softmax_to_groups(leaf_probs, space)
    return merge(regions, parts, space, organ_leaf_probs=organs, threshold=threshold,
                 background_probs=leaf_probs[0] if threshold is None else None)
