"""From prepared cases to the patch loader: what a method trains on, with its aligned extras."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unionseg.methods.base import Method, RunContext
from unionseg.training import distributed as dist


def sampler_cases(method: Method, ctx: RunContext) -> list[Any]:
    """One SamplerCase per training case of the method's datasets (train split only)."""
    from unionseg.data.sampling import SamplerCase

    names = method.datasets()
    extras = method.extras()
    cases = []
    for case in ctx.index.cases(split="train"):
        if case.dataset not in names:
            continue
        if method.label_source == "oracle":
            label = case.oracle()
            if label is None:
                raise _no_full_truth(case)
        else:
            label = case.label()
        cases.append(SamplerCase(
            dataset_index=names.index(case.dataset),
            annotated=np.asarray(method.annotated(case), dtype=bool),
            image=case.image(),
            label=label,
            extras={name: spec.load(case) for name, spec in extras.items()},
            case_id=f"{case.dataset}/{case.case_id}",
        ))
    if not cases:
        from unionseg.errors import UnionsegError

        raise UnionsegError(f"no training cases for datasets {names}; run `unionseg prepare` first")
    return cases


def _no_full_truth(case: Any) -> Exception:
    from unionseg.errors import DataError

    return DataError(f"case {case.case_id} has no hidden full truth (oracle_labels); the oracle needs the "
                     "phantom's fullTr folder", case.dataset)


def _check_weight_names(ctx: RunContext) -> None:
    from unionseg.errors import ConfigError

    known = list(ctx.train_datasets)
    unknown = sorted(set(ctx.cfg.data.dataset_weights) - set(known))
    if unknown:
        raise ConfigError(f"data.dataset_weights: {unknown[0]!r} is not a training dataset of this project "
                          f"(training datasets: {', '.join(known)})")


def check_training_data(method: Method, ctx: RunContext) -> None:
    """What the loader would refuse about the project's data, checked before the run folder is written (a
    refused run must leave no config.yaml that a corrected command then takes for a run to resume).

    Raises:
        ConfigError: a ``data.dataset_weights`` name that is not a training dataset.
        DataError: a case without the hidden full truth the oracle trains on.
    """
    _check_weight_names(ctx)
    check_declarations(method)
    if ctx.artifacts is not None and set(method.stages) & set(SHARED_STAGES):
        _check_artifacts_writable(Path(ctx.artifacts.root))
    if method.label_source == "oracle":
        names = method.datasets()
        for case in ctx.index.cases(split="train"):
            if case.dataset in names and case.paths.oracle is None:
                raise _no_full_truth(case)


#: the stages :meth:`unionseg.methods.base.Method.run_stage` runs for every method that declares them
SHARED_STAGES = ("experts", "teacher_probabilities", "pseudo_labels")


def check_declarations(method: Method) -> None:
    """A method's declarations (a plugin's, in practice) checked before the run folder is written: a stage
    nothing runs, or an extra the batch cannot carry, was a bare Python exception (with a traceback) after
    the folder and its config were written, so the corrected command was refused as a second run
    (helper-106).

    Raises:
        ConfigError: a stage that is not ``train`` or a shared stage while the method does not override
            ``run_stage`` (with the nearest known stage), or an extra with a reserved name or another kind.
    """
    import difflib

    from unionseg.data.sampling import _EXTRA_KINDS, RESERVED_KEYS
    from unionseg.errors import ConfigError
    from unionseg.methods.base import Method

    known = (*SHARED_STAGES, "train")
    if type(method).run_stage is Method.run_stage:
        for stage in method.stages:
            if stage not in known:
                close = difflib.get_close_matches(stage, known, n=1)
                raise ConfigError(f"method {method.name!r} declares stage {stage!r}, which is neither 'train' nor a "
                                  f"shared stage ({', '.join(SHARED_STAGES)}), and does not override run_stage to run "
                                  "it" + (f": did you mean {close[0]!r}?" if close else ""))
    for name, spec in method.extras().items():
        if name in RESERVED_KEYS:
            raise ConfigError(f"method {method.name!r}: extra name {name!r} is reserved for the batch "
                              f"({', '.join(sorted(RESERVED_KEYS))}); name it otherwise")
        if spec.kind not in _EXTRA_KINDS:
            raise ConfigError(f"method {method.name!r}: extra {name!r} has kind {spec.kind!r}; it must be one of "
                              f"{', '.join(_EXTRA_KINDS)}")


def _check_artifacts_writable(root: Path) -> None:
    """The shared artefacts (experts, their maps, pseudo labels) live in the prepared cache and take a lock
    there, built or not: a cache this user cannot write failed at the first stage, after the run folder was
    written, so the corrected command was refused as a second run (helper-109).

    Raises:
        ConfigError: naming the folder, and the way out (a cache of one's own).
    """
    import os

    from unionseg.errors import ConfigError
    from unionseg.jsonfile import nearest_existing

    there = nearest_existing(root)
    if not os.access(there, os.W_OK | os.X_OK):
        raise ConfigError("this method's shared experts live in the prepared cache, and this user cannot write "
                          "there (they take a lock even when built); give the project a cache of its own "
                          "(cache_dir: in a roots file, docs/datasets.md) and prepare it", there)


def _dataset_weights(method: Method, ctx: RunContext, present: set[int]) -> dict[int, int]:
    """``data.dataset_weights`` by the method's dataset index (what ``SamplerCase.dataset_index`` counts);
    weights of datasets the method does not train on (an expert's other datasets) are left out.

    Raises:
        ConfigError: a name that is not a training dataset of the project, or a weighted dataset without
            training cases.
    """
    from unionseg.errors import ConfigError

    _check_weight_names(ctx)
    names = method.datasets()
    weights = {names.index(n): w for n, w in ctx.cfg.data.dataset_weights.items() if n in names}
    empty = sorted(names[i] for i in set(weights) - present)
    if empty:
        raise ConfigError(f"data.dataset_weights: dataset {empty[0]!r} has no training cases (train split) to weight")
    return weights


def build_loader(method: Method, ctx: RunContext, start_step: int) -> Iterator[dict[str, Any]]:
    """The step-indexed patch loader; each DDP rank draws its own patches (seed offset by rank)."""
    from unionseg.data.sampling import PatchSampler, make_loader

    cfg = ctx.cfg
    cases = sampler_cases(method, ctx)
    weights = _dataset_weights(method, ctx, {int(c.dataset_index) for c in cases})
    sampler = PatchSampler(
        cases, patch_size=cfg.data.patch_size, batch_size=cfg.data.batch_size,
        n_leaves=ctx.space.n_leaves, seed=cfg.seed + 7919 * dist.rank(), fg_prob=cfg.data.fg_prob, augment=cfg.data.augment,
        extra_kinds={name: s.kind for name, s in method.extras().items()}, dataset_weights=weights,
    )
    if cfg.data.num_workers > 0:
        sampler.precompute()  # one foreground scan shared by the workers
    # pinned batches only for a GPU run (a CPU run, or a gloo rank, on a GPU machine pinned every batch and
    # opened a CUDA context on GPU 0)
    return make_loader(sampler, start_step=start_step, total_steps=cfg.steps, num_workers=cfg.data.num_workers,
                       pin_memory=ctx.device.type == "cuda")
