"""The one trainer every method plugs into.

Hooks follow nnU-Net's readable skeleton: ``on_train_start`` (stages, models, optimiser, resume),
``train_step`` (the method's loss terms, AMP, clipping), ``on_step_end`` (averages, logging, validation,
checkpoints) and ``on_train_end`` (the model file). Multi-GPU through DistributedDataParallel under
``torchrun``: every rank draws different patches and validates its share of the cases; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from unionseg.config import Project, config_hash, describe_changes, option_changes, resolve_device, to_dict
from unionseg.errors import ConfigError, OutputExistsError, UnionsegWarning
from unionseg.jsonfile import read_record, write_json, write_text
from unionseg.labels import LabelSpace
from unionseg.methods.base import Deployed, Method, RunContext, get_method
from unionseg.networks.layout import set_layout
from unionseg.stopping import Terminated
from unionseg.training import distributed as dist
from unionseg.training.checkpoint import atomic_torch_save, rng_state, safe_torch_load, set_rng_state
from unionseg.training.config import TrainConfig
from unionseg.training.validation import selection_score, validate_deployed, validation_cases

CKPT_FORMAT = "unionseg-checkpoint"


def _comparable_network(spec: dict[str, Any]) -> dict[str, Any]:
    """A deployed network spec with its defaults filled in, less the head keys that only choose the random
    starting draw (they mean nothing to a run that starts from a model file's weights)."""
    from unionseg.networks.build import resolve_spec

    spec = json.loads(json.dumps(spec))  # as a model file stores it: tuples as lists
    inner = spec.get("network") if spec.get("kind") == "select" else spec
    if not isinstance(inner, dict) or "backbone" not in inner:
        return spec
    resolved = resolve_spec(inner)
    for key in ("zero_bias_init", "fan_in_init"):
        resolved["head"].pop(key, None)
    return {**spec, "network": resolved} if inner is not spec else resolved


def _weighted(weights: dict[str, Any]) -> dict[str, Any]:
    """Dataset weights without those of 1, the default: what decides the sampling."""
    return {name: w for name, w in weights.items() if w != 1}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"data.patch_size": ..., "select_on": ...}``, for naming what changed (maps
    of names, ``options`` and ``data.dataset_weights``, stay whole: `{} -> {'liver': 2}`, not two changes)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("options", "dataset_weights"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def same_but_run_settings(cfg: TrainConfig, recorded: Any, recorded_hash: str) -> bool:
    """``cfg`` is the recorded configuration (``recorded_hash``), or differs from ``recorded`` (its
    ``to_dict``) only in the device, the logging or checkpoint interval (neither changes the weights: a resumed
    run ends as the run never stopped), the loader workers, in dataset weights of 1 given or left out (1 is the
    default weight: ``{liver: 1, kidney: 2}`` trains as ``{kidney: 2}``), or in an ``init_from`` recorded
    relative that names the same file from the working folder. What a resume and a benchmark's finished row
    accept."""
    if recorded_hash == config_hash(cfg):
        return True
    same = as_recorded(cfg, recorded)
    return same is not None and config_hash(same) == recorded_hash


def as_recorded(cfg: TrainConfig, recorded: Any) -> TrainConfig | None:
    """``cfg`` with the settings :func:`same_but_run_settings` lets differ taken from ``recorded``; None when
    ``recorded`` cannot say them (an older record)."""
    import dataclasses

    if not isinstance(recorded, dict):  # a checkpoint of a version that did not record it
        return None
    try:
        weights = dict(recorded["data"].get("dataset_weights") or {})
        if _weighted(weights) != _weighted(cfg.data.dataset_weights):
            weights = dict(cfg.data.dataset_weights)  # a change that matters: kept, so that it shows
        start = recorded.get("init_from")  # relative when a Python call before session 27 started the run
        if start is not None and cfg.init_from is not None and not Path(start).is_absolute() and \
                str(Path(start).expanduser().resolve()) == cfg.init_from:
            start_as = start
        else:
            start_as = cfg.init_from
        return dataclasses.replace(cfg, device=recorded["device"], log_every=recorded["log_every"],
                                   ckpt_every=recorded["ckpt_every"],
                                   init_from=start_as,
                                   data=dataclasses.replace(cfg.data, dataset_weights=weights,
                                                            num_workers=recorded["data"]["num_workers"]))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def config_changes(cfg: TrainConfig, recorded: dict[str, Any]) -> str:
    """What differs between ``recorded`` (a configuration's ``to_dict``) and ``cfg`` among the settings
    :func:`same_but_run_settings` does not let differ, as ``key: before -> after`` items."""
    return describe_changes(_flatten(recorded), _flatten(to_dict(as_recorded(cfg, recorded) or cfg)))


def _match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Lay each optimiser state tensor out like its parameter: ``load_state_dict`` moves the state to the
    parameter's device and dtype but keeps the checkpoint's memory layout, so a run resumed on another device
    (channels-last kernels on the CPU, contiguous on CUDA) kept the other layout, and AdamW's fused and
    multi-tensor paths want them alike (helper-111)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 1
                        and value.stride() != param.stride()):
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def check_sizes(cfg: TrainConfig) -> None:
    """Refuse a patch or sliding-window size the backbone cannot take (each axis a multiple of its
    downsampling factor) before any stage runs: otherwise the first step, or the first validation, fails
    after the shared experts are trained.

    Raises:
        ConfigError: naming the key, the size and the nearest sizes that fit.
    """
    from unionseg.errors import ConfigError
    from unionseg.networks.build import build_network

    with torch.device("meta"):  # the architecture only: no memory for weights
        net = build_network({"backbone": cfg.network.backbone_spec(), "head": {"name": "softmax", "out_channels": 2}})
    divisor = net.divisor
    for key, size in (("data.patch_size", cfg.data.patch_size), ("inference.roi_size", cfg.roi_size)):
        if any(n % d for n, d in zip(size, divisor, strict=True)):
            fit = [max(d, round(n / d) * d) for n, d in zip(size, divisor, strict=True)]
            raise ConfigError(f"{key}: {list(size)} does not fit the {cfg.network.backbone} backbone, whose inputs must "
                              f"be multiples of {list(divisor)} on each axis (e.g. {fit})")


def param_groups(
    models: dict[str, nn.Module], lr: float, scales: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters of ``models`` as optimiser groups, one per learning-rate multiplier.

    Args:
        models: name -> module; a parameter's key is ``"<name>.<parameter path>"``.
        lr: the base learning rate.
        scales: multipliers by key prefix (the longest matching prefix wins; the rest keep 1).

    Raises:
        ConfigError: a prefix that matches no trainable parameter, or a multiplier that is not positive.
    """
    scales = dict(scales or {})
    for prefix, scale in scales.items():
        if not scale > 0:
            raise ConfigError(f"learning-rate multiplier for {prefix!r} must be positive, got {scale}")
    groups: dict[float, list[nn.Parameter]] = {}
    used: set[str] = set()
    for model_name, module in models.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            key = f"{model_name}.{name}"
            match = max((q for q in scales if key == q or key.startswith(q + ".")), key=len, default=None)
            if match is not None:
                used.add(match)
            groups.setdefault(scales[match] if match is not None else 1.0, []).append(p)
    unused = sorted(set(scales) - used)
    if unused:
        raise ConfigError(f"learning-rate multiplier for {unused[0]!r} matches no trainable parameter (a prefix "
                          f"is '<network>.<parameter path>', the networks here: {', '.join(sorted(models))}; "
                          f"e.g. '{next(iter(sorted(models)), 'net')}.head')")
    return [{"params": ps, "lr": lr * scale, "lr_scale": scale} for scale, ps in groups.items()]


def build_optimizer(params: list[nn.Parameter] | list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over ``params`` (tensors, or groups from :func:`param_groups` with their own lr)."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o, total = cfg.optim, cfg.steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        t = min(step, total) / max(1, total)
        if o.schedule == "poly":
            return (1.0 - t) ** o.poly_power
        if o.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


#: the key of ``stages.json`` that names the shared artefacts' folder (no stage is named so)
SHARED_KEY = "_shared_artifacts"


class Trainer:
    """Runs a method's stages and training loop into ``run_dir``.

    Files written (rank 0): ``config.yaml``, ``stages.json``, ``last.pt`` (complete resumable state),
    ``model.pt`` (the best-validating deployed model, a model file), ``log.csv``, ``tb/`` (TensorBoard),
    ``validation.json`` (every validation so far, per class), ``summary.json``.
    """

    def __init__(self, ctx: RunContext, resume: bool = False,
                 on_step: Callable[[int, int, dict[str, float]], Any] | None = None) -> None:
        self.ctx = ctx
        self.on_step = on_step  # train(on_step=): called on rank 0 after every step
        self.cfg = ctx.cfg
        self.run_dir = Path(ctx.run_dir)
        self.resume = resume
        self.method: Method = get_method(self.cfg.method)(ctx)
        self.step = 0
        self.saved_step = 0  # the step of the last checkpoint written or resumed from
        # the current step's validation is still to run (set while it runs, and in a checkpoint written then)
        self.validation_pending = False
        self.saved_pending = False  # whether the last checkpoint written holds its step's validation as to do
        self.stage_seconds_here = 0.0
        self.best_metric = -math.inf
        self.best_name = ""
        self.best_step = 0  # the step model.pt was taken at
        self.step_lr = 0.0  # the learning rate of the last step trained (group 0's)
        self.logger: _Logger | None = None  # fit's, while it runs
        self.bar: _Progress | None = None  # fit's progress bar, while it runs (validation reports its cases there)
        self.history: list[dict[str, Any]] = []
        # stages: shared artefacts built; run: the wall time after the stages (steps, validations, checkpoints),
        # over every process of a resumed run up to its last checkpoint
        self.timings = {"data": 0.0, "total": 0.0, "stages": 0.0, "run": 0.0}
        self.run_seconds_earlier = 0.0  # the processes' before this one (a resumed run)
        self._run_started: float | None = None
        # [step, number of processes] from each session on (a resume with another --nproc_per_node adds one)
        self.world_sizes: list[list[int]] = []

    # ------------------------------------------------------------------ setup
    def on_train_start(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        resume_state = None
        if self.resume and (self.run_dir / "last.pt").exists():
            # checked before config.yaml is written and before any stage runs: a refused resume must change
            # nothing in the run folder and cost no shared-expert training
            resume_state = safe_torch_load(self.run_dir / "last.pt", CKPT_FORMAT)
            self._check_resumable(resume_state, self.run_dir / "last.pt")
            log = self.run_dir / "log.csv"
            if ctx.is_main and log.is_file() and not os.access(log, os.W_OK):  # appended to, not replaced
                from unionseg.errors import UnionsegError

                raise UnionsegError("the run's log is not writable by this user (another user's run?), and "
                                        "--resume appends to it; resume a copy of the run folder of your own", log)
            self._check_same_data(resume_state, self.run_dir / "last.pt")
        elif self.resume:
            self._check_same_method()
            self._check_restart()
        from unionseg.training.data import check_training_data

        check_training_data(self.method, ctx)  # before config.yaml: a refused run leaves no folder to resume
        if ctx.is_main and not validation_cases(ctx, self.method.datasets()):
            warnings.warn(f"{ctx.project.path}: no validation case for this run (every validation split is empty: "
                          f"val_fraction 0, or one-case datasets): no checkpoint can be selected, so {self.run_dir}"
                          f"/model.pt holds the last step's weights, not validated; hold out cases (split: "
                          f"val_fraction or val_cases) or add a role: val dataset to select on",
                          UnionsegWarning, stacklevel=2)
        # a resume takes the checkpoint's weights; a model file that cannot start this run is refused here,
        # before any file is written or any shared expert trained
        start = (self._start_model(Path(cfg.init_from).expanduser())
                 if cfg.init_from is not None and resume_state is None else None)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from unionseg.config import dump_yaml

            if not self.resume:  # over a run that kept nothing (kept_nothing): its record of stages goes too
                (self.run_dir / "stages.json").unlink(missing_ok=True)
            dump_yaml(to_dict(cfg), self.run_dir / "config.yaml")
        torch.manual_seed(cfg.seed + 1000 * dist.rank())
        np.random.seed(cfg.seed)
        # both ways: an earlier deterministic run in this process must not leave this one deterministic
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        started = time.perf_counter()
        # a run whose steps are all done (and validated) reads no shared artefact again: files of it removed
        # since (a cache cleaned after training) are not made again for a resume that trains nothing
        trained = (resume_state is not None and "train" in self.method.stages
                   and int(resume_state.get("step", 0)) >= cfg.steps and not resume_state.get("validation_pending"))
        self._run_stages(check_files=not trained)
        self.timings["stages"] = time.perf_counter() - started
        self.stage_seconds_here = self.timings["stages"]  # this process's, even after a resume restores the run's
        torch.manual_seed(cfg.seed)  # identical initialisation on every rank, before DDP broadcasts anyway
        self.method.raw_models = {k: set_layout(m.to(ctx.device), ctx.device) for k, m in self.method.build().items()}
        for average in self.method.averages().values():
            set_layout(average.to(ctx.device), ctx.device)
        self._check_deployable()
        if start is not None:
            self.method.deploy().module.load_state_dict(start["state_dict"])
        self._seed_rank(0)  # each rank its own dropout masks from here (the initialisation above is shared)
        self.method.models = {k: dist.wrap(m, ctx.device, self.method.unused_parameters)
                              for k, m in self.method.raw_models.items()}
        groups = param_groups(self.method.raw_models, cfg.optim.lr, self.method.lr_scales())
        self.trainable = bool(groups)
        if not groups:  # e.g. `individual`: only shared experts, nothing of its own to train
            groups = [{"params": [nn.Parameter(torch.zeros(1))]}]
        self.optimizer = build_optimizer(groups, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.use_amp = cfg.amp and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        if resume_state is not None:
            self._load_state(resume_state)
            if "run" not in resume_state.get("timings", {}):  # before session 24: its steps' time, the closest
                self.timings["run"] = self.timings["total"]
            # the checkpoint holds the stages' time of the processes before; shared stages made again here
            # (their files gone since) add theirs
            self.timings["stages"] = (float(resume_state.get("timings", {}).get("stages", 0.0))
                                      + self.stage_seconds_here)  # (a checkpoint without it: this process's)
        self.run_seconds_earlier = self.timings["run"]
        self._note_world_size()
        self._run_started = time.perf_counter()

    def _check_deployable(self) -> None:
        """Every candidate for the model file, checked as the model file will be (without its weights) before
        the first step: a plugin whose deploy() names a channel the label space lacks, or whose network spec
        is not plain data, was refused when the model file was written, after the whole budget had trained
        (helper-83)."""
        from unionseg.errors import CheckpointError, ConfigError

        for name, deployed in self.method.candidates().items():
            try:
                self._payload(deployed, selected_at=0, name=name, weights=False)
            except CheckpointError as exc:
                raise ConfigError(f"method {self.cfg.method!r}: its model file could not hold what it deploys "
                                  f"({name}): {exc.message}") from None
            self._check_rebuildable(name, deployed)
            returned = self._output_channels(deployed.module)
            if returned != len(deployed.channels):  # predict refuses such a model file (helper-94)
                raise ConfigError(f"method {self.cfg.method!r}: the network it deploys ({name}) returns {returned} "
                                  f"channels on a window, and deploy() declares {len(deployed.channels)} "
                                  f"({deployed.output_form}: {', '.join(deployed.channels)})")

    def _check_rebuildable(self, name: str, deployed: Deployed) -> None:
        """Predict rebuilds the deployed network from its spec and loads its weights: a plugin deploying a
        network of its own (not :func:`unionseg.networks.build_network`'s) trained its whole budget into a model
        file that no one could load (helper-106). Refused before the first step, naming the weights that
        differ."""
        from unionseg.ensemble import build_deployed
        from unionseg.errors import ConfigError

        try:
            with torch.random.fork_rng(devices=[]):  # its random initial weights leave the run's stream alone
                rebuilt = build_deployed(dict(deployed.network_spec), deployed.label_space or self.ctx.space)
        except Exception as exc:  # a spec the builder cannot read: said with the method's name
            raise ConfigError(f"method {self.cfg.method!r}: the network spec it deploys ({name}) cannot be built "
                              f"again, as predict builds it ({exc})") from None
        mine = {k: tuple(v.shape) for k, v in deployed.module.state_dict().items()}
        spec = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        if mine != spec:
            from unionseg.errors import listing

            missing, extra = sorted(set(spec) - set(mine)), sorted(set(mine) - set(spec))
            shapes = sorted(k for k in set(mine) & set(spec) if mine[k] != spec[k])
            found = [f"{what} {listing(keys)}" for what, keys in (("its network lacks", missing),
                     ("has weights the spec does not", extra), ("has other shapes for", shapes)) if keys]
            raise ConfigError(f"method {self.cfg.method!r}: the network it deploys ({name}) is not the one its network "
                              f"spec builds, so predict could not load its model file: {'; '.join(found)} (build "
                              "deployed networks with unionseg.networks.build_network; docs/extending.md)")

    def _output_channels(self, module: nn.Module) -> int:
        """How many channels ``module`` returns on one empty window (as predict runs it: eval mode, no
        gradient). The window is the smaller of the training patch and the inference window on each axis:
        both fit the backbone (:func:`check_sizes`), so their minimum does, and the count does not depend on
        the size (the full inference window cost the `ci` suite a tenth of its time). Every submodule gets its
        own mode back, and the random streams are left as they were."""
        modes = [(m, m.training) for m in module.modules()]
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        window = [min(a, b) for a, b in zip(self.cfg.data.patch_size, self.cfg.roi_size, strict=True)]
        module.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                out = module(torch.zeros(1, 1, *window, device=self.ctx.device))
        finally:
            for m, mode in modes:
                m.training = mode
        if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution output first, as predict reads it
            out = out[0]
        return int(out.shape[1])

    def _note_world_size(self) -> None:
        """Start a new entry of ``world_sizes`` when this session runs another number of processes than the
        last (always for a new run); warn on a resume that changes it, since the effective batch changes."""
        size = dist.world_size()
        if self.step >= self.cfg.steps and self.world_sizes:  # a finished run resumed again: no step to come
            return
        if self.world_sizes and self.world_sizes[-1][1] != size and self.ctx.is_main:
            before = self.world_sizes[-1][1]
            warnings.warn(f"{self.run_dir}: resumed at step {self.step} with {size} process(es), where the run's "
                          f"steps so far had {before}: the effective batch changes from {before} x "
                          f"{self.cfg.data.batch_size} to {size} x {self.cfg.data.batch_size} patches per step "
                          f"(summary.json's processes record it)", UnionsegWarning, stacklevel=2)
        if not self.world_sizes or self.world_sizes[-1][1] != size:
            self.world_sizes.append([self.step, size])

    def _run_seconds(self) -> float:
        """The run's wall time after its stages, this process's included."""
        if self._run_started is None:
            return self.timings["run"]
        return self.run_seconds_earlier + time.perf_counter() - self._run_started

    def _start_model(self, path: Path) -> dict[str, Any]:
        """The model file ``init_from`` names, checked against the network this run builds (a probe built
        outside the run's random stream); refused, naming the difference, when it holds another method,
        another network or other output channels."""
        from unionseg.errors import listing
        from unionseg.modelfile import load_model

        cfg = self.cfg
        if self.method.cannot_start_from_a_model:
            raise ConfigError(f"init_from: {cfg.method!r} cannot start from a model file: "
                              f"{self.method.cannot_start_from_a_model}")
        payload = load_model(path)  # a missing or unreadable file: a CheckpointError naming it
        with torch.random.fork_rng(devices=[]):
            probe = get_method(cfg.method)(self.ctx)
            probe.raw_models = probe.build()
        if not probe.raw_models:
            raise ConfigError(f"init_from: {cfg.method!r} trains no network of its own to start from a model file")
        deployed = probe.deploy()
        if payload["method"] != cfg.method:
            raise ConfigError(f"init_from: {path} holds a {payload['method']!r} model, and this run trains "
                              f"{cfg.method!r}; start from a model of the same method")
        # compared with defaults filled in (a file of an earlier version lacks later keys at their defaults)
        theirs, ours = _comparable_network(payload["network"]), _comparable_network(deployed.network_spec)
        if theirs != ours:
            changed = describe_changes(_flatten(theirs), _flatten(ours))
            raise ConfigError(f"init_from: {path} holds another network ({changed}); give the same network.* "
                              "settings as the run that wrote it")
        if list(payload["channels"]) != list(deployed.channels):
            raise ConfigError(f"init_from: {path} predicts other classes ({listing(payload['channels'], 6)}; this "
                              f"project's: {listing(deployed.channels, 6)}); start from a model of the same label "
                              "space")
        try:
            deployed.module.load_state_dict(payload["state_dict"])  # the weights fit the network, checked now
        except RuntimeError as exc:
            from unionseg.errors import CheckpointError

            raise CheckpointError(f"init_from: its weights do not fit the network ({str(exc).splitlines()[0]})",
                                  path) from None
        return payload

    def _check_restart(self) -> None:
        """``--resume`` without a checkpoint for a method that trains a network: it trained again from step 0
        without a word and replaced the folder's model.pt. A finished run (its ``summary.json``) whose last.pt
        was removed to save space is refused; an unfinished one with a model file (killed before its first
        checkpoint) restarts with a warning. A run cut during its stages (no model file yet) goes on quietly."""
        from unionseg.errors import CheckpointError, UnionsegWarning

        if "train" not in self.method.stages:  # `individual`: nothing of its own to train, nothing to lose
            return
        if (self.run_dir / "summary.json").is_file():
            raise CheckpointError("this run finished, and its checkpoint (last.pt) is gone: --resume has nothing "
                                  "to continue and would train again from step 0 over its model.pt; to train "
                                  "again, give another --out", self.run_dir / "summary.json")
        if (self.run_dir / "model.pt").is_file() and self.ctx.is_main:  # one warning, not one per rank
            warnings.warn(f"{self.run_dir}: no checkpoint (last.pt) to resume from; training starts again from "
                          "step 0, and the run's model.pt will be replaced by this run's", UnionsegWarning,
                          stacklevel=2)

    def _check_same_method(self) -> None:
        """A resume without a checkpoint (cut during the stages, or a method with nothing of its own to train,
        such as ``individual``) continues only the same method's run, with the same configuration: else it
        would build other experts and replace the folder's model file with theirs."""
        from unionseg.errors import CheckpointError
        from unionseg.training.config import load_train_config

        recorded = self.run_dir / "config.yaml"
        if not recorded.is_file():
            return
        data, missing = read_run_record(recorded)
        if missing:  # a user's file (notes, a recipe kept there): the run would replace it (helper-93)
            raise CheckpointError(f"this folder's config.yaml is not the record of a unionseg run (it lacks "
                                  f"{', '.join(missing)}): --resume would replace it; move the file, or give "
                                  "another --out", recorded)
        method = data.get("method")
        if method is not None and method != self.cfg.method:
            raise CheckpointError(f"this run folder holds a {method!r} run; --resume continues it only as "
                                  f"{method!r} (asked: {self.cfg.method!r}); choose another --out", recorded)
        try:
            before = load_train_config(recorded)
        except Exception:  # a record this version cannot read back: nothing to compare
            return
        if not same_but_run_settings(self.cfg, to_dict(before), config_hash(before)):
            changed = self._changes(to_dict(before))
            anew = (" (or, to train this configuration here, `unionseg train` without --resume, resume=False in "
                    "Python: that run kept nothing, and a new one starts in its place)"
                    if kept_nothing(self.run_dir) else "")
            raise CheckpointError(f"this run folder's run was started with another configuration ({changed}); "
                                  "resume with the same recipe and overrides "
                                  f"(`-c {shlex.quote(str(recorded))}` gives the "
                                  f"configuration it was started with), or start a new run folder{anew}", recorded)

    def _run_stages(self, check_files: bool = True) -> None:
        """The method's stages before training that ``stages.json`` does not record as done, and (where
        ``check_files``) the shared ones it records whose files are gone."""
        path = self.run_dir / "stages.json"
        # a new run's stages start from none done (one started over a run that kept nothing, see kept_nothing)
        done: dict[str, Any] = read_record(path) if self.resume and path.exists() else {}

        def record() -> None:
            if self.ctx.is_main:
                write_json(path, done)

        art = self.ctx.artifacts
        # a shared stage recorded as done whose files are gone since (a cache removed, a project prepared anew)
        # is made again here, before training, and said: ensure_* makes only what is missing
        gone = [s for s in self.method.stages if check_files and s in done and art is not None and s in art.STAGES
                and art.incomplete(s)]
        if gone and art is not None and self.ctx.is_main:
            print(f"the shared artefacts of the stage{'s' if len(gone) > 1 else ''} {', '.join(gone)}, recorded as "
                  f"done, are no longer all in {art.root} (removed, or the project prepared anew?): they are made "
                  "again before training goes on", file=sys.stderr)
        todo = [s for s in self.method.stages if s != "train" and (s not in done or s in gone)]
        if todo and self.ctx.artifacts is not None and SHARED_KEY not in done:
            # where the shared artefacts are made, so that `unionseg info RUN` can tell how far a run cut
            # during its stages got (its experts' checkpoints are there, not in the run folder)
            done[SHARED_KEY] = str(self.ctx.artifacts.root)
            record()
        for stage in todo:
            try:
                summary = self.method.run_stage(stage)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM while the shared artefacts are made: say what is kept
                if self.ctx.is_main:
                    kept = "" if self.ctx.artifacts is None else f" ({self.ctx.artifacts.root})"
                    print(f"stopped in the stage {stage!r}: the shared artefacts finished so far are kept{kept}, and "
                          "an expert being trained keeps its last checkpoint there; `unionseg train` with the same "
                          "arguments and --resume, or the same `unionseg benchmark` command, goes on from there",
                          file=sys.stderr)
                raise
            dist.barrier()
            done[stage] = summary
            record()

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT, "step": self.step, "method": self.cfg.method,
            "config": to_dict(self.cfg), "config_hash": config_hash(self.cfg), "options": self.method_options(),
            "models": {k: m.state_dict() for k, m in self.method.raw_models.items()},
            "averages": {k: a.state_dict() for k, a in self.method.averages().items()},
            "method_state": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "best_metric": self.best_metric, "best_name": self.best_name, "best_step": self.best_step,
            "history": self.history, "data": self._data_identity,
            "timings": {**self.timings, "run": self._run_seconds()},  # a resumed run's summary times the whole run
            "world_sizes": self.world_sizes,
            "validation_pending": self.validation_pending,
        }

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            atomic_torch_save(self._state(), self.run_dir / "last.pt")
        self.saved_step = self.step
        self.saved_pending = self.validation_pending
        dist.barrier()

    def _check_resumable(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another configuration or of other method defaults. Where the run goes on
        (``device``), how often it logs and how many loader workers it uses may differ: they leave the
        trained weights alone, and a run stopped on one GPU (out of memory) may go on on another."""
        if not same_but_run_settings(self.cfg, state.get("config"), state["config_hash"]):
            from unionseg.errors import CheckpointError

            recorded = state.get("config")  # the full recipe the run was started with
            changed = "" if recorded is None else self._changes(recorded)
            raise CheckpointError("checkpoint was written with a different configuration"
                                  + (f" ({changed})" if changed else "")
                                  + "; resume with the same recipe and overrides "
                                  + f"(`-c {shlex.quote(str(self.run_dir / 'config.yaml'))}`, or train_config(recipe=...) of that file "
                                  "in Python, gives the configuration it was started with), or start a new run "
                                  "folder", path)
        saved = state.get("options")  # absent in checkpoints written before options were recorded
        changed = "" if saved is None else option_changes(saved, self.method_options(),
                                                          to_dict(type(self.method.options)()))
        if changed:
            from unionseg.errors import CheckpointError

            raise CheckpointError(f"the method's options changed since this checkpoint ({changed}): this unionseg's "
                                  "defaults differ from those of the version that wrote it; resume with that "
                                  "version, or start a new run folder", path)

    @functools.cached_property
    def _data_identity(self) -> dict[str, Any]:
        """What the run learns from: the project file, its label space, the cases of each split, and the
        fingerprint of the prepared sources (path, size and bytes' hash of every file). Only what training reads:
        a test set may be added or changed without touching a run. Fixed for the run: computed once."""
        index, space = self.ctx.index, self.ctx.space.to_dict()
        used = {c.dataset for c in index if c.split in ("train", "val")}  # a role: val set included
        space["datasets"] = [d for d in space["datasets"] if d["name"] in used]
        return {"project": str(self.ctx.project.path), "label_space": space,
                "cases": {split: [f"{c.dataset}/{c.case_id}" for c in index.cases(split=split)]
                          for split in ("train", "val")},
                "fingerprint": index.split_fingerprint(("train", "val"))}

    def _check_same_data(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another label space or other training/validation cases (another project,
        or one whose datasets changed); warn when the same cases' files changed since (edited or copied)."""
        recorded = state.get("data")
        if not isinstance(recorded, dict):  # a checkpoint of a version that did not record it
            return
        from unionseg.errors import CheckpointError, listing

        now = self._data_identity
        since = ("" if recorded.get("project") == now["project"] else
                 f"; the checkpoint was written for {recorded.get('project')}, and this run reads {now['project']}")
        if recorded.get("label_space") != now["label_space"]:
            before, after = recorded.get("label_space") or {}, now["label_space"]
            names = [[c["name"] for c in space.get("classes", [])] for space in (before, after)]
            what = (f"classes {names[0]} -> {names[1]}" if names[0] != names[1]
                    else "the datasets' label maps or annotated classes differ")
            raise CheckpointError(f"the project's label space changed since this checkpoint ({what}){since}. "
                                  "Resume with the project it was started with, or start a new run folder", path)
        for split, cases in now["cases"].items():
            old = set(recorded.get("cases", {}).get(split, []))
            if old != set(cases):
                gone, new = sorted(old - set(cases)), sorted(set(cases) - old)
                parts = ([f"{len(gone)} no longer there ({listing(gone, 3)})"] if gone else []) + (
                    [f"{len(new)} new ({listing(new, 3)})"] if new else [])
                raise CheckpointError(f"the {split} cases changed since this checkpoint: {'; '.join(parts)}{since}. "
                                      "Resume with the data it was started with, or start a new run folder", path)
        if recorded.get("fingerprint") != now["fingerprint"] and self.ctx.is_main:
            from unionseg.errors import UnionsegWarning

            warnings.warn(f"{path}: the same cases' prepared files changed since this checkpoint (edited, "
                          "re-prepared or copied without their times); training goes on with them as they are now",
                          UnionsegWarning, stacklevel=2)

    def _changes(self, recorded: dict[str, Any]) -> str:
        """What differs from ``recorded`` among the settings a resume may NOT change: the refusal listed the
        device, the logging interval and the workers too, which are allowed (helper-77). A longer run says
        how to get one (a new run from this one's weights)."""
        changed = config_changes(self.cfg, recorded)
        before, after = _flatten(recorded), _flatten(to_dict(as_recorded(self.cfg, recorded) or self.cfg))
        if {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == {"steps"}:
            model = shlex.quote(str((self.run_dir / "model.pt").absolute()))
            if (self.run_dir / "model.pt").is_file():
                changed += (f"; to train on, start a new run from this one's weights (init_from={model}): a run's "
                            "schedule is set by its steps")
            else:  # stopped before its first model file (helper-119 followed the advice into "not found")
                changed += (f"; a run's schedule is set by its steps: resume with steps={before.get('steps')} to "
                            f"finish it, then start a new run from its weights (init_from={model}) to train on")
        return changed

    def _load_state(self, state: dict[str, Any]) -> None:
        for k, m in self.method.raw_models.items():
            m.load_state_dict(state["models"][k])
        for k, a in self.method.averages().items():
            a.load_state_dict(state["averages"][k])
        self.method.load_state_dict(state["method_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        _match_state_layouts(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # a CPU run saves an empty one; a GPU resume starts anew
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])  # rank 0's, which rank 0 wrote
        self._seed_rank(int(state["step"]))
        self.step = int(state["step"])
        self.saved_step = self.step
        # a stop (or a kill) during a validation: --resume runs it first (absent before session 32: none)
        self.validation_pending = self.saved_pending = bool(state.get("validation_pending", False))
        # the time of the steps (and stages) before the checkpoint; absent in checkpoints of older versions
        self.timings.update({k: float(v) for k, v in state.get("timings", {}).items() if k in self.timings})
        self.best_metric = float(state["best_metric"])
        self.best_name = str(state["best_name"])
        self.best_step = int(state.get("best_step", 0)) or self._model_file_step()  # absent before session 24
        self.history = list(state["history"])
        # absent before session 30: the processes of the steps before are unknown
        self.world_sizes = [[int(a), int(b)] for a, b in state.get("world_sizes", [])]

    def _model_file_step(self) -> int:
        """The step the run folder's model file was taken at, from its provenance (0: unknown)."""
        try:
            from unionseg.modelfile import load_model

            return int(load_model(self.run_dir / "model.pt")["provenance"].get("selected_at_step") or 0)
        except Exception:  # no model file yet, or one this version cannot read: nothing better to say
            return 0

    def _seed_rank(self, step: int) -> None:
        """Under DDP, give every rank but 0 a torch random stream of its own (seed, rank, step): the same
        stream on every GPU drops the same channels everywhere. Called before every step, so that a resumed
        run's ranks draw what they drew in a run never stopped (the checkpoint holds rank 0's stream only).
        One process keeps its stream unchanged."""
        if dist.is_distributed() and dist.rank() > 0:
            torch.manual_seed(self.cfg.seed + 1000 * dist.rank() + 7919 * step)

    # ------------------------------------------------------------------ the loop
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        for m in self.method.models.values():
            m.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.ctx.device.type, dtype=torch.float16, enabled=self.use_amp):
            terms = self.method.training_step(batch, self.step)
        if "loss" not in terms:  # a plugin's training_step: a bare KeyError (helper-106)
            raise ConfigError(f"method {self.cfg.method!r}: training_step returned {', '.join(sorted(terms)) or 'nothing'}; "
                              "it must return the total loss under 'loss'")
        self.scaler.scale(terms["loss"]).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            for m in self.method.raw_models.values():
                torch.nn.utils.clip_grad_norm_(m.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_lr = float(self.scheduler.get_last_lr()[0])  # the rate this step used; log.csv reports it
        self.scheduler.step()
        self.method.after_step(self.step)
        return term_values(terms)

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Run every stage, train to ``cfg.steps`` (resuming if asked), validate, write the model file.

        Args:
            stop_after: stop cleanly after this step (checkpoint written) as if interrupted; ``--resume``
                continues to ``cfg.steps`` exactly as an uninterrupted run would.
        """
        from unionseg.training.data import build_loader

        self.on_train_start()
        cfg = self.cfg
        # a finished run resumed again (a batch script that always passes --resume): nothing to train, and its
        # summary stays as the run wrote it (rewritten, its times grew by this process's start-up)
        finished = (self.trainable and self.step >= cfg.steps and not self.validation_pending
                    and (self.run_dir / "summary.json").is_file())
        # (a finished run's resume logs nothing: it wrote an empty TensorBoard file each time; helper-96)
        logger = _Logger(self.run_dir, enabled=self.ctx.is_main and not finished, append=self.step > 0,
                         resumed_at=self.step)
        self.logger = logger
        try:  # any failure (a non-finite loss, a validation error) closes the bar and the log writer too
            if not self.trainable:
                self.step = cfg.steps
                self.validate()
            elif self.step >= cfg.steps and self.validation_pending:
                # stopped after the last step, before or during its validation
                if self.ctx.is_main and self.ctx.progress:
                    print(f"{self.run_dir}: the run had trained its {cfg.steps} steps; its last validation, which "
                          "the stop interrupted, runs now", file=sys.stderr)
                self._validate_pending()
                self.save_checkpoint()  # no longer to do: a later --resume has nothing to run again
            elif self.step >= cfg.steps and self.ctx.is_main and self.ctx.progress:
                kept = "its model file is kept" if finished else "its model file is written now"
                print(f"{self.run_dir}: {self._stage_of_run() or 'the run '}had finished (step {self.step} of "
                      f"{cfg.steps}); nothing to train, {kept}", file=sys.stderr)
            elif self.step < cfg.steps:
                if self.step > 0 and self.ctx.is_main and self.ctx.progress:
                    print(f"{self.run_dir}: {self._stage_of_run()}resuming at step {self.step} of {cfg.steps}"
                          + (" (first its validation, which the stop interrupted)" if self.validation_pending else ""),
                          file=sys.stderr)
                from unionseg.progress import suite_after

                # in a benchmark row the suite's ETA too (not in its shared experts' trainings, whose own ETA
                # leaves out the rest of the row)
                progress = _Progress(cfg.steps, self.step, self.method.label(),
                                     enabled=self.ctx.is_main and self.ctx.progress,
                                     suite_after=suite_after() if cfg.method != "expert" else None)
                self.bar = progress
                try:
                    # inside: a Ctrl-C while the loader starts (its workers, a resume's skipped draws) says how
                    # to go on, as one in the steps does (it printed only "interrupted"; helper-99)
                    loader = build_loader(self.method, self.ctx, start_step=self.step)
                    with _StopRequest() as stop:
                        self._loop(loader, logger, progress, stop_after, stop)
                except KeyboardInterrupt:
                    progress.close()  # before the message: the bar must not draw over it
                    if self.ctx.is_main:
                        print(self._interrupted_message(), file=sys.stderr)
                    raise
                finally:
                    progress.close()  # a second close does nothing
                    self.bar = None
        finally:
            logger.close()
            self.logger = None
        if stop_after is not None and self.step < cfg.steps:
            return {"stopped_at": self.step}
        if finished:
            from unionseg.errors import CheckpointError

            try:
                recorded = read_record(self.run_dir / "summary.json")
            except (OSError, CheckpointError):  # unreadable: written anew below
                recorded = None
            if isinstance(recorded, dict):
                return recorded
        return self.on_train_end()

    def _stage_of_run(self) -> str:
        """``"the shared expert of dataset 'liver' (stage experts of this run) "`` when this trainer trains an
        expert, else ``""``. An expert's messages read as the user's run's own: a Ctrl-C in co-training's
        expert stage said "stopped at step 20", its budget's 20 steps, as if the run were done (helper-131)."""
        if self.cfg.method != "expert":
            return ""
        return f"the shared expert of dataset {self.cfg.options.get('dataset')!r} (stage experts of this run) "

    def _interrupted_message(self) -> str:
        last = self.run_dir / "last.pt"
        size = dist.world_size()
        if size > 1:  # a plain `unionseg train --resume` would go on with one process, half the batch (helper-96)
            goes_on = (f"the same torchrun command ({size} processes) with --resume goes on from there; another "
                       "number of processes changes the effective batch")
        elif (self.run_dir.parent.parent.parent / "benchmark.json").is_file():  # runs/<row>/seed<N> of a suite
            goes_on = "the same `unionseg benchmark` command goes on from there"
        else:  # the benchmark was named to every run (helper-112)
            goes_on = ("`unionseg train` with the same arguments and --resume (train(..., resume=True) in Python) "
                       "goes on from there")
        subject = self._stage_of_run()
        if subject:  # the expert's own step count, and that the run goes on to its other stages
            subject = f"{subject}of {self.cfg.steps} steps: "
            if size == 1:  # its folder is in the shared cache, not a run's: the command is the one that started it
                goes_on = ("the command that started the run goes on from there when given again (`unionseg train` "
                           "with --resume, `unionseg benchmark` as it was)")
            goes_on += ", this expert first, then the run's later stages"
        if self.saved_step and self.saved_step == self.step:
            return f"{subject}stopped at step {self.step}; the checkpoint ({last}) holds it: {goes_on}"
        if self.saved_step:
            return (f"{subject}interrupted at step {self.step}; the last checkpoint ({last}) holds step "
                    f"{self.saved_step}: {goes_on}")
        return f"{subject}interrupted at step {self.step}, before the first checkpoint"

    def _loop(self, loader: Any, logger: _Logger, progress: Any, stop_after: int | None, stop: _StopRequest) -> None:
        """The training steps from ``self.step`` to the budget (or ``stop_after``).

        A stop request (``stop``: Ctrl-C or SIGTERM) ends the loop at the next step boundary, every rank at
        the same one, with a checkpoint of that step; it then raises KeyboardInterrupt.
        """
        cfg = self.cfg
        self._validate_pending()
        t_last = time.perf_counter()
        batches = iter(loader)
        seen, mark = 0, (0.0, 0.0)  # steps this process ran; the timings where the loader probe starts
        while True:
            t_ask = time.perf_counter()  # the wait for the batch alone: the step's bookkeeping since t_last
            try:                         # (logging, the stop's all-reduce, on_step) is not the loader's
                batch = next(batches)
            except StopIteration:
                break
            except Exception:
                if stop.requested is None:
                    raise
                # a loader worker ended by the same signal; the state is still that of a finished step
                self._checkpoint_and_stop(stop)
            t_data = time.perf_counter() - t_ask
            batch = _to_device(batch, self.ctx.device)
            self._seed_rank(self.step)
            terms = self.train_step(batch)
            self.step += 1
            t_now = time.perf_counter()
            self.timings["data"] += t_data
            self.timings["total"] += t_now - t_last
            t_last = t_now
            seen += 1
            if seen == LOADER_PROBE[0]:  # the loader's start-up (workers, first scans) is over
                mark = (self.timings["data"], self.timings["total"])
            elif seen == LOADER_PROBE[1] and self.ctx.is_main:
                share = (self.timings["data"] - mark[0]) / max(1e-9, self.timings["total"] - mark[1])
                hint = loader_hint(self.ctx.device.type, cfg.data.num_workers, share)
                if hint is not None:
                    warnings.warn(hint, UnionsegWarning, stacklevel=2)
            failed = None  # on_step's error, agreed with the non-finite check: under torchrun every rank stops
            if self.on_step is not None and self.ctx.is_main:
                try:
                    self.on_step(self.step, cfg.steps, dict(terms))
                except Exception as exc:  # noqa: BLE001 - raised below, on every rank
                    failed = exc
            check_finite(terms, self.step, self.ctx.device, failed)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                # under torchrun the mean over the ranks' batches (every rank logs at the same steps)
                row = {"step": self.step, "lr": self.step_lr,
                       "data_wait": self.timings["data"] / max(1e-9, self.timings["total"]),
                       **dist.mean_over_ranks(terms)}
                logger.log(row)
            progress.update(self.step, terms)
            if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                # first a checkpoint of the step, its validation marked as to do: a validation takes long, a stop
                # waits for it, and torchrun kills the ranks after its shutdown grace (30 s), which lost every
                # step since the last checkpoint (helper-79); --resume runs the validation first
                self.validation_pending = True
                self.save_checkpoint()
                if stop.agreed(self.ctx.device):  # asked to stop already: the checkpoint holds the validation to do
                    self._checkpoint_and_stop(stop)
                self._validate_pending()
                t_last = time.perf_counter()
            stopping = stop_after is not None and self.step >= stop_after
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stopping:
                self.save_checkpoint()
                t_last = time.perf_counter()
            _test_kill_hook(self.step)
            if stop.agreed(self.ctx.device):
                self._checkpoint_and_stop(stop)
            if self.step >= cfg.steps or stopping:
                break

    def _validate_pending(self) -> None:
        """Run the validation of the current step if it is still to do (see ``validation_pending``)."""
        if self.validation_pending:
            self.validate()
            self.validation_pending = False

    def _checkpoint_and_stop(self, stop: _StopRequest) -> NoReturn:
        if self.saved_step != self.step or self.saved_pending != self.validation_pending:
            self.save_checkpoint()
        raise Terminated if stop.requested == "SIGTERM" else KeyboardInterrupt

    # ------------------------------------------------------------------ validation and the model file
    def validate(self) -> None:
        """Every rank validates its share of the cases (validate_deployed gathers them) and takes the same
        decision; rank 0 writes the curve and the model file."""
        results = {}
        candidates = self.method.candidates()
        for name, deployed in candidates.items():
            shown = None if self.bar is None else self.bar.validating(name if len(candidates) > 1 else "")
            results[name] = validate_deployed(deployed, self.ctx, self.method.datasets(), on_case=shown)
        if all(r.get("n_cases") == 0 for r in results.values()):
            # nothing to select on (no validation case): the model file follows the weights, so it ends with
            # the last step's, and no score is claimed (a Dice of 0 kept the first validation's weights)
            self.history.append({"step": self.step, "cases": 0})
            if self.ctx.is_main:
                _write_json_atomic(self.run_dir / "validation.json", self.history)
            name = next(iter(candidates))
            # -inf: no score, also where an older release's checkpoint stored its "Dice 0" of no case
            self.best_metric, self.best_name, self.best_step = -math.inf, name, self.step
            self.method.select(name)
            if self.ctx.is_main:
                self.write_model(self.method.candidates()[name], self.run_dir / "model.pt", selected_at=self.step)
            dist.barrier()
            return
        score = {n: selection_score(r, self.cfg.select_on) for n, r in results.items()}
        name = max(results, key=lambda n: score[n])
        entry = {"step": self.step, **{f"{n}/{k}": v for n, r in results.items() for k, v in r["per_class"].items()},
                 **{f"{n}/mean_dice": r["mean_dice"] for n, r in results.items()},
                 **{f"{n}/region_mean": r["region_mean"] for n, r in results.items() if r["region_mean"] is not None}}
        self.history.append(entry)
        if self.logger is not None:
            self.logger.log_validation(entry)
        if self.ctx.is_main:
            _write_json_atomic(self.run_dir / "validation.json", self.history)  # the curve so far, readable mid-run
        if score[name] >= self.best_metric:  # a tie goes to the later, longer-trained weights (helper-93)
            self.best_metric = score[name]
            self.best_name = name
            self.best_step = self.step
            self.method.select(name)
            if self.ctx.is_main:
                self.write_model(self.method.candidates()[name], self.run_dir / "model.pt", selected_at=self.step)
        dist.barrier()

    def write_model(self, deployed: Deployed, path: Path, selected_at: int) -> None:
        from unionseg.modelfile import save_model

        save_model(path, self._payload(deployed, selected_at, self.best_name))

    def _payload(self, deployed: Deployed, selected_at: int, name: str, weights: bool = True) -> dict[str, Any]:
        """The model file's content for ``deployed`` (candidate ``name``), validated; ``weights=False`` leaves
        the weights out (the check before training)."""
        from unionseg.modelfile import make_payload

        return make_payload(
            method=self.cfg.method, network=deployed.network_spec,
            state_dict={k: v.detach().cpu() for k, v in deployed.module.state_dict().items()} if weights else {},
            output_form=deployed.output_form, channels=deployed.channels,
            label_space=deployed.label_space or self.ctx.space,
            preprocessing=self.ctx.project.preprocessing,
            inference={"roi_size": list(self.cfg.roi_size), "overlap": self.cfg.inference.overlap,
                       "sw_batch_size": self.cfg.inference.sw_batch_size, "blend": self.cfg.inference.blend,
                       "threshold": self.cfg.inference.threshold},
            config=to_dict(self.cfg),
            provenance={"config_hash": config_hash(self.cfg), "data_fingerprint": self.ctx.index.fingerprint,
                        "selected_at_step": selected_at, "seed": self.cfg.seed, "candidate": name,
                        "options": self.method_options(),
                        # the effective batch is data.batch_size times these (torchrun), which config does not show
                        "processes": [{"from_step": step, "world_size": size} for step, size in self.world_sizes]},
        )

    def method_options(self) -> dict[str, Any]:
        """The method's options as it ran them, defaults filled in (the recipe lists only what it sets)."""
        return to_dict(self.method.options)

    def on_train_end(self) -> dict[str, Any]:
        # best_val_mean_dice: the selection score of the chosen model (the mean named by selected_on)
        validated = math.isfinite(self.best_metric)  # no validation case: the last step's weights, no score
        summary = {"method": self.cfg.method, "steps": self.step,
                   "best_val_mean_dice": self.best_metric if validated else None,
                   # the rule that ran: "regions" falls back to "all" when no validation scored a region
                   "selected_on": "none" if not validated else self.cfg.select_on
                   if any(k.endswith("/region_mean") for h in self.history for k in h) else "all",
                   "best_candidate": self.best_name, "selected_at_step": self.best_step or None,
                   "project": str(self.ctx.project.path), "data_fingerprint": self.ctx.index.fingerprint,
                   "config_hash": config_hash(self.cfg), "history": self.history,
                   "options": self.method_options(),
                   "data_wait_share": self.timings["data"] / max(1e-9, self.timings["total"]),
                   "train_seconds": self.timings["total"], "stage_seconds": self.timings["stages"],
                   "stage_seconds_this_process": self.stage_seconds_here,
                   "run_seconds": self._run_seconds(), "run_seconds_earlier": self.run_seconds_earlier,
                   "model": str((self.run_dir / "model.pt").absolute())}  # absolute, as "project" is
        # the processes (world size) from each step on; a resume with another count adds an entry
        summary["processes"] = [{"from_step": step, "world_size": size} for step, size in self.world_sizes]
        from unionseg.artifacts import needs_experts

        if dist.is_distributed():
            summary["ddp"] = {"world_size": dist.world_size(), "in_sync": self._replicas_in_sync()}
        if self.ctx.artifacts is not None and needs_experts(self.method.stages):
            compute = self.ctx.artifacts.compute_seconds()
            summary["artifacts"] = self.ctx.artifacts.summary()
            summary["expert_seconds"] = float(sum(compute.values()))
        if self.ctx.is_main:  # atomic: an expert whose summary exists counts as finished
            _write_json_atomic(self.run_dir / "summary.json", summary)
        return summary


    def _replicas_in_sync(self) -> bool:
        """Every rank holds the same weights (DDP keeps them equal; this checks it)."""
        flat = torch.cat([p.detach().float().flatten() for m in self.method.raw_models.values()
                          for p in m.parameters()] or [torch.zeros(1)])
        probe = torch.stack([flat.sum(), (flat * flat).sum(), flat.abs().max()]).to(self.ctx.device)
        gathered = [torch.zeros_like(probe) for _ in range(dist.world_size())]
        torch.distributed.all_gather(gathered, probe)
        return all(torch.allclose(g, gathered[0], rtol=1e-6, atol=1e-6) for g in gathered)


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during the training steps asks for a stop at the next step boundary.

    The trainer then writes a checkpoint of that step and stops, so no finished step is lost (a batch
    scheduler's SIGTERM before its kill included). A second signal stops at once, as Python's default
    does: KeyboardInterrupt from wherever the step is, and ``--resume`` goes on from the last checkpoint.
    Handlers can only be set in the main thread; elsewhere the defaults stay.
    """

    # a repeat within this many seconds is the same request: torchrun forwards the terminal's Ctrl-C to
    # ranks that the terminal has already sent it to
    REPEAT_WINDOW = 1.0

    def __init__(self) -> None:
        self.requested: str | None = None
        self._at = 0.0
        # whether a signal reached this process itself: a request learnt from another rank (agreed) turns
        # this rank's own copy, however late torchrun forwards it, into the same request, not a second press
        self._own = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is signal.SIG_IGN:
                    # ignored by whoever started us (`cmd &` in a script, nohup): ignored here too, as in the
                    # stages, where a SIGINT that stopped the steps passed without effect (helper-99)
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            if not self._own:  # its own copy of a request another rank passed on: the window starts now
                self._own, self._at = True, time.monotonic()
                return
            if time.monotonic() - self._at < self.REPEAT_WINDOW:
                return
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self._own = True
        self.requested = signal.Signals(signum).name
        self._at = time.monotonic()
        if dist.is_main():  # under torchrun every rank gets the signal; one says so
            again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
            print(f"\n{self.requested}: stopping after this step to write a checkpoint ({again} to stop at once)",
                  file=sys.stderr)

    #: a request's rank among the ranks' (the ranks stop as the strongest asks: SIGTERM's exit status wins)
    _ORDER = (None, "SIGINT", "SIGTERM")

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (one all-reduce under DDP); every rank then holds the same
        request, and rank 0 says so when the signal reached only another rank (``kill`` of one worker)."""
        wanted = self._ORDER[dist.max_rank(self._ORDER.index(self.requested), device)]
        if wanted is None:
            return False
        if self.requested is None:  # this rank's own copy of the signal, if it comes, is the same request (_own)
            if dist.is_main():
                print(f"\n{wanted} (to another rank): stopping at this step to write a checkpoint", file=sys.stderr)
        self.requested = wanted
        return True


def _test_kill_hook(step: int) -> None:
    """Fault-injection hook: ``UNIONSEG_KILL_AT_STEP=k`` SIGKILLs the process right after step k."""
    kill_at = os.environ.get("UNIONSEG_KILL_AT_STEP")
    if kill_at is not None and int(kill_at) == step:
        os.kill(os.getpid(), 9)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


#: the steps of a process between which the trainer measures how long the GPU waits for patches
LOADER_PROBE = (10, 60)


def loader_hint(device_type: str, num_workers: int, data_share: float) -> str | None:
    """What to change when a GPU waits for its patches ``data_share`` of the time (measured over the steps
    :data:`LOADER_PROBE`), or None. A CPU run gets none: there the loader workers would take the cores the
    network uses (the built-in CPU recipes keep 0)."""
    if device_type != "cuda" or data_share < 0.25:
        return None
    if num_workers == 0:
        return (f"the GPU waited for its patches {data_share:.0%} of the time, drawn in the training process "
                "(data.num_workers=0): give the loader processes, e.g. data.num_workers=4 (a --resume may change "
                "it)")
    return (f"the GPU waited for its patches {data_share:.0%} of the time with data.num_workers={num_workers}: "
            "more loader processes may keep up (a --resume may change it)")


def check_finite(terms: dict[str, float], step: int, device: torch.device, failed: Exception | None = None) -> None:
    """Stop at a non-finite loss term, or at the error ``failed`` of ``train(on_step=)``, on EVERY rank when any
    rank has one: a rank that raised alone under torchrun left the others waiting in the step's next
    collective until torchrun killed them (helper-118). Costs one small all-reduce per step under DDP, nothing
    in one process.

    Raises:
        Exception: ``failed`` itself, in the process where on_step raised it.
        UnionsegError: with this rank's terms, or saying another process had them or an on_step error.
    """
    from unionseg.errors import UnionsegError

    own = not all(math.isfinite(v) for v in terms.values())
    code = dist.max_rank(2 if failed is not None else 1 if own else 0, device)
    if failed is not None:
        raise failed
    if code == 2:
        raise UnionsegError(f"stopped at step {step}: train()'s on_step raised an error in another process of "
                            "this torchrun run")
    if code == 1:
        where = f": {terms}" if own else " in another process of this torchrun run"
        raise UnionsegError(f"non-finite loss at step {step}{where}; lower optim.lr or check data")


def term_values(terms: dict[str, Any]) -> dict[str, float]:
    """A step's terms as floats, in one device-to-host copy (a float() each waited for the GPU once per
    term). A term may be a Python number or a one-element tensor on any device (co-training's ramp-up was
    made on the CPU beside GPU terms; a plugin's may be): each goes to the loss's device first, since a stack
    refuses tensors of two devices."""
    loss = terms.get("loss")
    device = loss.device if isinstance(loss, torch.Tensor) else torch.device("cpu")
    values = torch.stack([torch.as_tensor(v).detach().to(device, torch.float32).reshape(())
                          for v in terms.values()]).tolist()
    return dict(zip(terms, values, strict=True))


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON (NaN kept as such, as these files always held it) through a temporary file and a rename:
    readers never see a half-written file."""
    write_text(path, json.dumps(data, indent=2, default=float))


class _Logger:
    """CSV + TensorBoard, every loss term in its own column."""

    def __init__(self, run_dir: Path, enabled: bool, append: bool, resumed_at: int = 0) -> None:
        self.enabled = enabled
        self.path = run_dir / "log.csv"
        self.fields: list[str] | None = None
        self.tb: Any = None
        if not enabled:
            return
        if append and self.path.exists():
            self._truncate_after(resumed_at)
            with self.path.open() as fh:
                header = fh.readline().strip()
            self.fields = header.split(",") if header else None
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run trains the steps after its checkpoint again: TensorBoard drops their first points,
            # as _truncate_after drops their log.csv rows
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_at + 1)
        except Exception:  # tensorboard missing or broken: CSV still works
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        """Drop the rows logged after the checkpoint a resumed run goes on from: they are trained again, and
        would otherwise appear twice (an interruption between two checkpoints). A row cut short by a kill
        during its append (the file is appended in place) is dropped too: the next row would have run on
        from it."""
        with self.path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or "step" not in rows[0]:
            return
        column, width = rows[0].index("step"), len(rows[0])
        kept = [rows[0], *(r for r in rows[1:] if len(r) == width and r[column].isdigit() and int(r[column]) <= step)]
        if len(kept) == len(rows):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as fh:
            csv.writer(fh).writerows(kept)
        tmp.replace(self.path)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        new = self.fields is None
        if new:
            self.fields = list(row)
        assert self.fields is not None
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def log_validation(self, entry: dict[str, Any]) -> None:
        """One validation's Dice per candidate and class, under ``val/`` in TensorBoard (the CSV of every
        validation is ``validation.json``)."""
        if self.tb is None:
            return
        for k, v in entry.items():
            if k != "step" and v is not None and math.isfinite(float(v)):
                self.tb.add_scalar(f"val/{k}", float(v), entry["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _Progress:
    """A rich progress bar with ETA and the current loss terms (timed lines off a terminal)."""

    def __init__(self, total: int, start: int, label: str, enabled: bool, suite_after: float | None = None) -> None:
        """``suite_after``: in a benchmark, the suite's estimated seconds after this run, added to the run's
        own ETA as the suite's (shown once a step of this process is timed)."""
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

        from unionseg.progress import make_progress, time_columns

        self.total, self.suite_after = total, suite_after
        self.timed_from: tuple[float, int] | None = None  # (time, step) of the first step shown: the clock of
        # the suite's ETA starts there, after the loader's start and a resume's pending validation
        # off a terminal (nohup, SLURM): a timed line with the step, the ETA and the loss terms (on stderr, as
        # every progress of make_progress: stdout holds the results)
        suite = (TextColumn("{task.fields[suite]}"),) if suite_after is not None else ()
        self.progress = make_progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      *time_columns(), *suite, TextColumn("{task.fields[terms]}"), transient=False)
        self.progress.start()
        fields = {"suite": ""} if suite_after is not None else {}
        self.task = self.progress.add_task(label, total=total, completed=start, terms="", **fields)

    def update(self, step: int, terms: dict[str, float]) -> None:
        if self.enabled:
            text = " ".join(f"{k}={v:.3f}" for k, v in terms.items())
            fields = {}
            if self.suite_after is not None:
                now = time.monotonic()
                if self.timed_from is None:
                    self.timed_from = (now, step)
                elif step > self.timed_from[1]:
                    from unionseg.progress import clock

                    rate = (now - self.timed_from[0]) / (step - self.timed_from[1])
                    fields["suite"] = f"suite ETA {clock(rate * max(0, self.total - step) + self.suite_after)}"
            self.progress.update(self.task, completed=step, terms=text, **fields)

    def validating(self, candidate: str) -> Callable[[int, int], None]:
        """A ``validate_deployed`` ``on_case`` that shows validation's cases where the loss terms go (a long
        validation showed nothing and looked like a hang)."""
        what = f"validating {candidate}" if candidate else "validating"
        # under torchrun each process validates its share, and rank 0's bar counts its own: say so, or 1/1
        # of a 2-case validation looks as if a case were skipped (helper-79)
        share = f" (this process's share; {dist.world_size()} processes)" if dist.world_size() > 1 else ""

        def show(done: int, total: int) -> None:
            if self.enabled:
                self.progress.update(self.task, terms=f"{what}: case {done}/{total}{share}")

        return show

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


def make_context(project_path: str | Path | Project, cfg: TrainConfig, run_dir: str | Path,
                 roots: dict[str, str] | None = None, progress: bool = True) -> RunContext:
    """Load the project (or take the loaded one, its dataset roots as it holds them) and its prepared data,
    and build the run context (device, DDP rank, artefacts).

    Raises:
        ConfigError: ``roots`` given with a loaded project (give them to ``load_project``).
    """
    from unionseg.artifacts import ArtifactCache
    from unionseg.config import load_project
    from unionseg.data.preprocess import PreparedIndex

    check_sizes(cfg)
    if isinstance(project_path, Project):
        if roots:
            raise ConfigError("roots= with a loaded project: give them to load_project(path, roots=...)",
                              project_path.path)
        project = project_path
    else:
        project = load_project(project_path, roots=roots)
    index = PreparedIndex.load(project)
    if cfg.deterministic:  # cuBLAS's deterministic workspace, read when cuBLAS first starts in this process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = dist.setup(resolve_device(cfg.device))
    space: LabelSpace = project.label_space
    ctx = RunContext(project=project, index=index, space=space, cfg=cfg, device=device, run_dir=Path(run_dir),
                     train_datasets=[d.name for d in project.train_datasets], is_main=dist.is_main(),
                     progress=progress)
    ctx.artifacts = ArtifactCache(ctx)
    return ctx


#: the files whose presence says that a folder holds a run (``train`` without ``resume`` refuses it)
RUN_FILES = ("last.pt", "model.pt", "summary.json", "stages.json", "config.yaml")
#: the keys every run's config.yaml has held (the whole configuration is written there)
RUN_RECORD_KEYS = frozenset({"method", "steps", "seed", "network", "optim", "data", "inference", "options"})


def held_run_files(run_dir: Path) -> list[str]:
    """The :data:`RUN_FILES` in ``run_dir``, in that order (none: the folder holds no run)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def kept_nothing(run_dir: Path) -> bool:
    """Whether the run folder's run (its :func:`held_run_files`) stopped before it kept anything of its
    own: no checkpoint, model file, summary or validation, and no stage recorded done but the shared ones,
    whose files live in the project's artefact cache (not here) and are found there again by key.

    Such a folder (a run that failed at its first step, out of memory say, or was stopped while its experts
    trained) is what a corrected command is rerun into: ``train`` without ``resume`` starts a new run in its
    place, where it refused and ``--resume`` refused the changed configuration in turn (helper-122). Not
    where the run logged steps (its log.csv would be replaced), nor where run folders cannot be locked (a
    live run still in its stages would look the same; helper-127)."""
    from unionseg.artifacts import ArtifactCache
    from unionseg.locking import fcntl

    if fcntl is None:  # no run-folder lock on this platform: a live run in its stages would look the same
        return False
    held = held_run_files(run_dir)
    if "config.yaml" not in held or not set(held) <= {"config.yaml", "stages.json"}:
        return False
    if (run_dir / "validation.json").exists() or read_run_record(run_dir / "config.yaml")[1]:
        return False
    log = run_dir / "log.csv"  # steps logged (a run killed before its first checkpoint): its curves are kept
    try:
        if log.is_file() and len(log.read_text(encoding="utf-8", errors="replace").splitlines()) > 1:
            return False
    except OSError:
        return False
    if "stages.json" not in held:
        return True
    try:
        done = read_record(run_dir / "stages.json")
    except Exception:  # unreadable: not ours to replace
        return False
    return isinstance(done, dict) and all(k in ArtifactCache.STAGES or k == SHARED_KEY for k in done)


def read_run_record(path: Path) -> tuple[Any, list[str]]:
    """A ``config.yaml``'s content (None when unreadable) and the :data:`RUN_RECORD_KEYS` it lacks (all of
    them when it is not a mapping): none for a file a run wrote."""
    from unionseg.config import load_yaml

    try:
        data = load_yaml(path)
    except Exception:  # unreadable: not a record
        data = None
    return data, sorted(RUN_RECORD_KEYS - set(data)) if isinstance(data, dict) else sorted(RUN_RECORD_KEYS)


#: the advisory lock a training holds on its run folder (created once, never removed from a used folder)
RUN_LOCK = ".lock"
#: the files of a run folder written through ``.<name>.<pid>.tmp`` temporaries
_RUN_WRITES = ("last.pt", "model.pt", "summary.json", "validation.json", "config.yaml", "stages.json")


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, device: torch.device | None = None) -> Iterator[None]:
    """Hold the run folder's lock for a training (the main rank takes it; under torchrun every rank learns
    whether it got it, so a refusal stops them all rather than leaving the others in their first collective).

    A second ``train`` into the same folder, ``--resume`` while the first still runs (a batch scheduler's
    requeue, say), used to run beside it: both wrote ``last.pt``, ``model.pt`` and ``log.csv`` (whose steps
    came out interleaved). Now it stops at once, naming the process that trains there. Holding the lock, the
    training also removes the temporaries of writers killed in this folder (``.model.pt.<pid>.tmp``, as large
    as a model). A folder this call created and then wrote nothing into (a refused run) is removed again,
    by the holder only and before it lets go (a refused second process must not delete the holder's lock).
    Without ``fcntl`` (Windows) the lock is a no-op, as every lock of :mod:`unionseg.locking`.

    Raises:
        UnionsegError: another process holds the folder.
        OSError: the killed writers' temporaries could not be removed (on every rank, raised on rank 0).
    """
    from unionseg.errors import RankZeroRefusedError, UnionsegError
    from unionseg.locking import FileLock, remove_dead_temporaries

    main = dist.is_main()
    lock = FileLock(run_dir / RUN_LOCK, f"the run folder {run_dir}")
    made: list[Path] = []  # the folders taking the lock creates: run_dir and any missing parents, innermost first
    folder = Path(os.path.abspath(run_dir))
    while main and not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    acquired = False
    try:
        refusal: Exception | None = None
        if main:
            try:
                lock.acquire(timeout=0, hint="two trainings in one run folder would write over each other's "
                                             "checkpoints and logs: wait for it to end, or train into another --out")
                acquired = True
                for name in _RUN_WRITES:
                    remove_dead_temporaries(run_dir / name)
            except (UnionsegError, OSError) as exc:  # every rank stops, not rank 0 alone
                refusal = exc
        if dist.any_rank(refusal is not None, device or torch.device("cpu")):
            raise refusal or RankZeroRefusedError("rank 0 could not start the run in this folder; see its message",
                                                  run_dir)
        yield
    finally:
        if acquired:
            if made and run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == [RUN_LOCK]:
                try:  # a refused run leaves no folder behind (nor the parents it created)
                    (run_dir / RUN_LOCK).unlink()
                    for empty in made:
                        empty.rmdir()
                except OSError:  # an NFS placeholder, a file appearing meanwhile: the folder stays, harmless
                    pass
            lock.release()


def train(project_path: str | Path | Project, cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
          roots: dict[str, str] | None = None, progress: bool = True, stop_after: int | None = None,
          on_step: Callable[[int, int, dict[str, float]], Any] | None = None) -> dict[str, Any]:
    """Python entry point of ``unionseg train``: train ``cfg`` on the prepared project into ``run_dir``.

    Without ``resume`` a folder that already holds a run is refused (nothing is overwritten), unless that run
    stopped before it kept anything (:func:`kept_nothing`: a new run starts in its place, with a note); with
    it, an empty or new folder starts a new run (with a note). A relative ``cfg.init_from`` is taken from the
    working folder and recorded absolute, so the run's ``config.yaml`` replays it from anywhere.

    The process's random streams (Python, NumPy, torch's CPU stream, and the current GPU's where CUDA was
    already in use), torch's deterministic-algorithms flag and cuDNN's benchmark flag are set for the run
    and put back as they were when it returns or fails, so a notebook's own draws and later runs are not
    changed by it.

    Args:
        project_path: the project file (YAML), or its loaded :class:`~unionseg.config.Project` (with the
            dataset roots it was loaded with; ``roots`` is then refused).
        cfg: the run's configuration, from :func:`~unionseg.training.recipes.train_config` (what
            ``unionseg train`` trains with) or :func:`~unionseg.training.config.load_train_config`.
        run_dir: the run folder (``--out``).
        resume: go on from the run in ``run_dir`` (its checkpoint, or its finished shared stages).
        roots: dataset name -> root folder, for a project file that leaves roots out (``--root``).
        progress: progress bar and notes on stderr (False: silent but for warnings).
        stop_after: stop (with a checkpoint) after this many steps of this call, as Ctrl-C would, but
            returning ``{"stopped_at": step}`` instead of raising; ``resume=True`` goes on from there.
        on_step: called as ``on_step(step, steps, terms)`` after every training step (``terms``: this step's
            loss terms as floats, this process's batch; under torchrun on rank 0 only), e.g. to follow the
            loss live in a notebook with ``progress=False``. Its return value is ignored; an error it raises
            stops the run (every process under torchrun) at that step, before the step's checkpoint.

    Returns:
        The run's summary (what ``RUN/summary.json`` holds), or ``{"stopped_at": step}`` after ``stop_after``.

    Raises:
        ConfigError: ``cfg`` is not a TrainConfig (a dict, say).
        UnionsegError: ``run_dir`` holds a run and ``resume`` is False, or is a file; another process trains
            into it (see :func:`run_folder_lock`); the errors of the run itself.
        KeyboardInterrupt: Ctrl-C, after the step's checkpoint is written.
    """
    from unionseg.errors import ConfigError
    from unionseg.training.config import TrainConfig

    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}; build one with "
                          "unionseg.training.recipes.train_config(method, recipe, overrides)")
    run_dir = Path(run_dir)
    if cfg.init_from is not None:  # recorded absolute: the run's config.yaml replays from any folder
        import dataclasses

        cfg = dataclasses.replace(cfg, init_from=str(Path(cfg.init_from).expanduser().resolve()))
    # OutputExistsError: under torchrun every rank meets these alike, and rank 0 alone prints them (helper-96)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputExistsError("the run folder (--out) exists and is not a folder", run_dir)
    held = held_run_files(run_dir)
    anew = False  # a plain rerun over a run that stopped before it kept anything (said once the folder is locked)
    if held and not resume:
        if held == ["config.yaml"] and read_run_record(run_dir / "config.yaml")[1]:
            raise OutputExistsError("run folder holds a config.yaml no run wrote (notes, a recipe?): move it, or "
                                    "train into another folder (nothing was overwritten)", run_dir)
        anew = kept_nothing(run_dir)
        if not anew:
            raise OutputExistsError(f"run folder already holds a run ({', '.join(held)}); resume it (--resume, "
                                    "resume=True) or train into another folder (nothing was overwritten)", run_dir)
    if resume and not held and int(os.environ.get("RANK", "0")) == 0:  # before the process group: its env
        print(f"note: nothing to resume in {run_dir}; starting a new run", file=sys.stderr)
    from unionseg.training.checkpoint import rng_state, set_rng_state

    before = (rng_state(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    try:
        ctx = make_context(project_path, cfg, run_dir, roots, progress)
        try:
            with run_folder_lock(ctx.run_dir, ctx.device):
                if anew and not kept_nothing(run_dir):
                    # decided before the lock: a run that held it meanwhile may have kept something since
                    # (every rank reads the same files, and raises alike; helper-127)
                    raise OutputExistsError("run folder now holds a run (another process trained into it "
                                            "meanwhile); resume it (--resume, resume=True) or train into "
                                            "another folder (nothing was overwritten)", run_dir)
                if anew and ctx.is_main and progress:
                    print(f"note: {run_dir}: its run stopped before its first checkpoint (it left "
                          f"{', '.join(held)}; shared artefacts stay in the project's cache): a new run starts in "
                          "its place", file=sys.stderr)
                result = Trainer(ctx, resume=resume, on_step=on_step).fit(stop_after=stop_after)
            # every rank finished before any tears its process group down (suspected cause of a rank-0 abort at
            # teardown seen once under load: its partner had already left); not on errors, where it could hang
            dist.barrier()
            return result
        finally:
            dist.cleanup()
    finally:  # the caller's flags and random streams, as they were
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.benchmark = before[3]
        try:
            set_rng_state(before[0])
        except RuntimeError:  # a GPU left unusable by the run's own error: that error is the one to see
            pass
