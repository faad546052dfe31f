"""The method interface and its registry.

A method is one file under ``methods/``: a :class:`Method` subclass decorated with
``@register_method("name")``. It declares its stages, builds its trainable networks, computes the named
loss terms of one training step, and says which network to deploy and in what output form (contract 4).
Everything else (data, loop, AMP, averages' checkpointing, validation, DDP, logging) is the trainer's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from unionseg.config import from_dict
from unionseg.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from unionseg.artifacts import ArtifactCache
    from unionseg.config import Project
    from unionseg.data.preprocess import PreparedCase, PreparedIndex
    from unionseg.labels import LabelSpace
    from unionseg.training.config import TrainConfig
    from unionseg.training.ema import WeightAverage

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available as ``unionseg train --method NAME``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            taken = METHODS[name]
            raise ValueError(f"method {name!r} registered twice (also {taken.__module__}.{taken.__qualname__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


#: an environment variable naming modules to import for their methods (``UNIONSEG_PLUGINS=my_methods``):
#: it reaches every process a command starts (torchrun's ranks, a benchmark's rows, prepare's workers)
PLUGINS_ENV = "UNIONSEG_PLUGINS"
#: the entry-point group an installed package registers its methods under (its modules are imported)
PLUGINS_GROUP = "unionseg.methods"
_plugins_loaded: set[str] = set()
_plugins_loading: set[str] = set()


def _load_builtin_methods() -> None:
    import importlib

    for module in ("expert", "baselines", "cotraining", "dodnet", "multihead", "conditional", "mskd"):
        try:
            importlib.import_module(f"unionseg.methods.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"unionseg.methods.{module}":
                raise
    _load_plugins()


def plugin_modules() -> list[str]:
    """The modules :data:`PLUGINS_ENV` names (comma- or space-separated), in its order."""
    import os

    return [m for m in os.environ.get(PLUGINS_ENV, "").replace(",", " ").split() if m]


def is_plugin(cls: type) -> bool:
    """Whether a method class comes from outside unionseg (a plugin, docs/extending.md)."""
    return not cls.__module__.startswith("unionseg.")


def plugin_env(env: dict[str, str], method: str) -> dict[str, str]:
    """``env`` for a process of its own that must train ``method`` (a benchmark row with ``isolate: true``):
    a plugin registered by an import in the calling script, not by :data:`PLUGINS_ENV` nor by an installed
    package's entry point, was unknown there (helper-83). Its module joins :data:`PLUGINS_ENV`, and the folder
    it was imported from ``PYTHONPATH`` unless that folder is on the interpreter's own path already.

    Raises:
        ConfigError: the method is defined in the running script itself (``__main__``), which another
            process cannot import.
    """
    import importlib.util
    import os
    import site
    import sysconfig
    from pathlib import Path

    cls = get_method(method)
    module = cls.__module__
    if not is_plugin(cls) or module in _entry_point_modules():
        return env
    if module == "__main__":
        raise ConfigError(f"method {method!r} is defined in the script that runs the benchmark: a suite with "
                          "isolate: true trains each row in a process of its own, which cannot import that script; "
                          "put the method in a module of its own and import it (docs/extending.md)")
    out = dict(env)
    names = plugin_modules()
    if module not in names:
        out[PLUGINS_ENV] = ",".join([*names, module])
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is not None:
        locations = list(spec.submodule_search_locations or [])
        root = Path(locations[0]).parent if locations else Path(spec.origin or ".").parent
        # an installed package's folder (site-packages) is found anyway, and put first it would come before
        # the standard library
        standard = {Path(p).resolve() for p in [*site.getsitepackages(), *sysconfig.get_paths().values()]}
        paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root.resolve() not in standard and str(root) not in paths:
            out["PYTHONPATH"] = os.pathsep.join([str(root), *paths])
    return out


_entry_points: list[Any] | None = None


def _entry_point_modules() -> dict[str, str]:
    """Module -> entry-point name of the methods installed packages register (looked up once per process:
    a lookup reads every installed package's metadata)."""
    global _entry_points
    if _entry_points is None:
        from importlib.metadata import entry_points

        _entry_points = list(entry_points(group=PLUGINS_GROUP))
    return {ep.module: ep.name for ep in _entry_points}


def _load_plugins() -> None:
    """Import the plugin modules (:data:`PLUGINS_ENV`, then the packages registered under the entry-point
    group :data:`PLUGINS_GROUP`; an entry point's ``:attr`` is not used: its module registers the methods),
    whose ``@register_method`` classes then join the built-in methods: ``unionseg train --method NAME``,
    ``unionseg methods``, a suite's rows. Each module is imported once; one that fails fails again at the next
    lookup, with the same error.

    Raises:
        ConfigError: a module named in :data:`PLUGINS_ENV` that cannot be imported, or one registering a method
            name already taken, named with where it was asked for. An installed package's entry point that
            fails is a warning (it would stop every command, ``--method naive`` too), and its methods are
            unknown.
    """
    import importlib
    import warnings

    from unionseg.errors import UnionsegWarning

    wanted = [(m, PLUGINS_ENV) for m in plugin_modules()]
    wanted += [(module, f"entry point {name!r} of group {PLUGINS_GROUP!r}")
               for module, name in _entry_point_modules().items()]
    for module, source in wanted:
        if module in _plugins_loaded or module in _plugins_loading:
            continue  # loaded, or being loaded: a plugin whose import looks a method up comes back here
        before = set(METHODS)
        _plugins_loading.add(module)
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - ImportError, or the plugin's own (a name taken twice, a typo)
            for name in set(METHODS) - before:  # what it registered before it failed: the same error next time
                del METHODS[name]
            message = _plugin_failure(source, module, exc)
            if source == PLUGINS_ENV:
                raise ConfigError(message) from exc  # Python shows the plugin's own traceback under it
            warnings.warn(message + "; its methods are unknown", UnionsegWarning, stacklevel=2)
            _plugins_loaded.add(module)  # said once: an installed package does not change within a run
            continue
        finally:
            _plugins_loading.discard(module)
        _plugins_loaded.add(module)
        if set(METHODS) == before and not any(c.__module__ == module for c in METHODS.values()):
            warnings.warn(f"{source}: module {module!r} registers no method (@register_method(\"NAME\") on a "
                          "Method subclass)", UnionsegWarning, stacklevel=2)


def _plugin_failure(source: str, module: str, exc: Exception) -> str:
    """The one line for a plugin module that failed to import: a module that is not there (the hint: the
    path), one that imports a package that is not installed (named: the path hint sent users the wrong way;
    helper-122), or an error of its own, with the file and line where it was raised."""
    import traceback
    from pathlib import Path

    if isinstance(exc, ImportError):
        missing = getattr(exc, "name", None)
        if missing and missing != module and not module.startswith(f"{missing}."):
            return (f"{source}: module {module!r} imports {missing!r}, which cannot be imported ({exc}): install it "
                    "in this environment")
        return (f"{source}: cannot import module {module!r} ({exc}); is its folder on PYTHONPATH, or its package "
                "installed in this environment?")
    here = Path(__file__).resolve().parents[1]  # the unionseg package: a frame of the plugin's own is wanted
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    own = [f for f in frames if not Path(f.filename).resolve().is_relative_to(here)]
    where = f" (at {own[-1].filename}:{own[-1].lineno})" if own else ""
    return f"{source}: module {module!r} failed to import: {type(exc).__name__}: {exc}{where}"


def get_method(name: str) -> type[Method]:
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        loaded = plugin_modules()
        hint = (f" (plugins loaded from {PLUGINS_ENV}: {', '.join(loaded)})" if loaded else
                f"; a method of a plugin needs its module named in {PLUGINS_ENV} (docs/extending.md)")
        raise ConfigError(f"unknown method {name!r}{_did_you_mean(name, list(METHODS))}; known: "
                          f"{', '.join(sorted(METHODS))}{hint}") from None


def _did_you_mean(name: str, known: list[str]) -> str:
    """``" (did you mean 'dodnet'?)"`` for a name that differs from a known one in case or by a typo, else ``""``
    (method names are lower case; the papers spell them DoDNet and MS-KD)."""
    import difflib

    folded = {k.lower().replace("-", "").replace("_", ""): k for k in known}
    key = name.lower().replace("-", "").replace("_", "")
    close = [folded[key]] if key in folded else [folded[k] for k in difflib.get_close_matches(key, folded, n=1)]
    return f" (did you mean {close[0]!r}?)" if close else ""


def available_methods() -> list[str]:
    """The names ``train --method`` takes (``unionseg methods``): the built-in methods and the registered
    plugins, sorted."""
    _load_builtin_methods()
    return sorted(METHODS)


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclass
class Deployed:
    """What a finished method hands to the model file: one module, its output form and channel keys."""

    module: nn.Module
    network_spec: dict[str, Any]
    output_form: str
    channels: list[str]
    #: the label space the channels refer to (default: the project's)
    label_space: LabelSpace | None = None
    #: (L_sub,) uint8 map from ``label_space`` leaf ids to the project's leaf ids (default: identity)
    to_global: np.ndarray | None = None
    #: (L,) bool: project leaves this model can predict (validation scores only those)
    predictable: np.ndarray | None = None


@dataclass
class RunContext:
    """Everything a method may read: the project, prepared data, the label space, the config."""

    project: Project
    index: PreparedIndex
    space: LabelSpace
    cfg: TrainConfig
    device: torch.device
    run_dir: Any
    artifacts: ArtifactCache | None = None
    train_datasets: list[str] = field(default_factory=list)
    is_main: bool = True
    progress: bool = True


@dataclass
class ExtraSpec:
    """An aligned extra per training case (contract 7): its kind and how to load it for a case."""

    kind: Literal["label", "prob"]  # nearest or linear interpolation
    load: Callable[[PreparedCase], np.ndarray]


class Method:
    """Base class. Subclasses set ``stages``, ``Options`` and implement :meth:`build`,
    :meth:`training_step` and :meth:`deploy`.

    Attributes set by the trainer: ``models`` (possibly DDP-wrapped, for the forward/backward pass) and
    ``raw_models`` (the plain modules, for averages and deployment).
    """

    name: ClassVar[str] = ""
    #: one line for `unionseg methods`: what the method is, and its paper
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: stages run before training (e.g. "experts", "pseudo_labels"); "train" is the trainer's loop
    stages: ClassVar[tuple[str, ...]] = ("train",)
    #: "label" (partial ground truth) or "oracle" (the phantom's hidden full truth)
    label_source: ClassVar[str] = "label"
    #: True when some trainable parameter can miss a step's loss (a head of a task absent from the batch):
    #: DDP must then search the autograd graph for them every step. Every method here uses all of its
    #: parameters in every step (tests/test_training.py checks it), so DDP skips that search.
    unused_parameters: ClassVar[bool] = False
    #: why ``init_from`` (a model file's weights as the start) makes no sense for the method ("": it does; the
    #: deployed module is then the network it trains)
    cannot_start_from_a_model: ClassVar[str] = ""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.space = ctx.space
        self.options: Any = from_dict(self.Options, ctx.cfg.options, source=f"options of method {self.name!r}")
        self.models: dict[str, nn.Module] = {}
        self.raw_models: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ stages and data
    def run_stage(self, stage: str) -> dict[str, Any]:
        """Run a non-training stage; returns a JSON-able summary recorded in the run folder.

        The shared-artefact stages (contract 6) are handled here for every method that declares them:
        ``experts``, ``teacher_probabilities`` (the experts' cached probabilities) and ``pseudo_labels``.
        """
        art = self.ctx.artifacts
        if art is not None and stage == "experts":
            models = art.ensure_experts()
            return {"experts": {k: str(v) for k, v in models.items()}, **art.summary()}
        if art is not None and stage == "teacher_probabilities":
            art.ensure_probs()
            return art.summary()
        if art is not None and stage == "pseudo_labels":
            return art.ensure_pseudo_labels()
        raise NotImplementedError(f"method {self.name!r} declares stage {stage!r} but does not implement it")

    def label(self) -> str:
        """How progress lines name this training (default: the method's name)."""
        return str(self.ctx.cfg.method)

    def datasets(self) -> list[str]:
        """Training datasets this method samples from (default: all)."""
        return list(self.ctx.train_datasets)

    def extras(self) -> dict[str, ExtraSpec]:
        """Aligned extras the sampler must carry with every patch."""
        return {}

    def annotated(self, case: PreparedCase) -> np.ndarray:
        """The sample's annotated-leaf mask (the oracle's hidden truth annotates everything)."""
        return self.space.full_mask() if self.label_source == "oracle" else case.annotated

    # ------------------------------------------------------------------ training
    def build(self) -> dict[str, nn.Module]:
        """Create the trainable networks (name -> module)."""
        raise NotImplementedError

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name prefix (``"<model>.<parameter path>"``, e.g.
        ``"net.head.controller"``); the longest matching prefix wins, other parameters keep 1. The
        schedule scales every group alike."""
        return {}

    def averages(self) -> dict[str, WeightAverage]:
        """Weight averages to checkpoint and restore (name -> average)."""
        return {}

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Named loss terms for one batch; ``"loss"`` is the total that is back-propagated."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (update averages here)."""

    # ------------------------------------------------------------------ deployment
    def deploy(self) -> Deployed:
        """The network to validate and ship, with its output form and channel keys."""
        raise NotImplementedError

    def candidates(self) -> dict[str, Deployed]:
        """Networks validation should compare (default: the deployed one). Co-training offers both
        averages; the trainer keeps the better-validating one."""
        return {"model": self.deploy()}

    def select(self, name: str) -> None:
        """Validation picked candidate ``name`` (see :meth:`candidates`)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra method state to checkpoint (besides models, averages and optimiser)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
