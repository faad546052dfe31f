"""Configuration: frozen dataclasses, safe YAML, ``key=value`` overrides, and the project file.

A **project file** (YAML) declares the global classes, the datasets (root folders relative to the project
file, local label maps, annotated classes, train/val split), evaluation sets and preprocessing::

    name: phantom
    classes:
      - liver
      - {name: liver_tumour, part_of: liver}
      - kidney
      - {name: kidney_tumour, part_of: kidney}
    datasets:
      - name: liver
        root: datasets/liver            # relative to this file; MSD or nnU-Net v2 raw layout
        labels: {1: liver, 2: liver_tumour}
        annotated: [liver, liver_tumour]
        split: {val_fraction: 0.2, seed: 0}
      - name: test
        root: datasets/test
        role: test                      # fully labelled evaluation set (val | test)
        labels: {1: liver, 2: liver_tumour, 3: kidney, 4: kidney_tumour}
        annotated: [liver, liver_tumour, kidney, kidney_tumour]
    preprocessing: {spacing: [3.0, 3.0, 3.0], window: [-325, 325]}

Generic helpers (:func:`from_dict`, :func:`to_dict`, :func:`apply_overrides`) turn any frozen dataclass
tree into YAML and back, with validation that names the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from unionseg.errors import ConfigError, listing
from unionseg.labels import BACKGROUND, OTHER_LABELS, DatasetLabels, LabelSpace, Leaf

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


# ---------------------------------------------------------------------- YAML
#: how a device is named, in a training configuration (``device``) and for ``predict --device`` alike
DEVICE_NAMES = "auto, cpu, cuda, cuda:N"
#: a dataset's ``layout`` values besides ``auto`` and ``folders:IMAGES,LABELS`` (docs/datasets.md, Layouts)
LAYOUTS = ("msd", "nnunet", "kits", "folders")


def is_device_name(name: str) -> bool:
    """Whether ``name`` is one of :data:`DEVICE_NAMES` (N a GPU index)."""
    return name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name) is not None


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for training's ``device`` key and predict's ``--device``: ``auto`` is CUDA when
    available, else the CPU; a ``torch.device`` (``mps``, ``xpu``, ...) is taken as it is.

    Raises:
        ConfigError: a name that is not one of :data:`DEVICE_NAMES` (torch's own error lists a dozen device
            types), or CUDA asked for on a machine without it.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str) or not is_device_name(device):
        raise ConfigError(f"device: {device!r} is not one of {DEVICE_NAMES}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for, but this machine has no CUDA device (use the CPU: "
                          "--device cpu, or device=cpu)")
    return resolved


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number as YAML 1.2 does (YAML 1.1 needs ``1.0e-3`` and
    read ``1e-3`` as a string: a method option so written stayed a string in the run's config), and refusing
    a key written twice in one mapping, which PyYAML let the last one win (``labels: {1: liver, 1: spleen}``
    scored the liver as spleen; helper-103). A key a merge (``<<: *base``) brings in may be overridden."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # every mapping node is flattened (merged) before its entries are read, as itself or as a merge's
        # source, and PyYAML merges in place: its own keys are checked here, once, before that
        checked: set[int] = self.__dict__.setdefault("_checked_nodes", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=False)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: PyYAML says so
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found the key {key!r} twice (first on line {seen[key] + 1}, again on line "
                        f"{key_node.start_mark.line + 1}); the later one would replace the first without a word",
                        None)
                seen[key] = key_node.start_mark.line
        super().flatten_mapping(node)


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting a string such as ``"1e3"`` that :class:`_Loader` would read back as a
    number (a run's config.yaml must give back the configuration it records)."""


_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML text to plain data, safely (never constructs Python objects); ``1e-3`` is a number."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str | Path) -> Any:
    """Read YAML safely (never constructs Python objects). Errors name the file."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))
        hint = f" ({', '.join(inside[:3])} {'is' if len(inside) == 1 else 'are'} here)" if inside else ""
        raise ConfigError(f"is a folder; give the YAML file{hint}", path)
    if not path.is_file():
        raise ConfigError("file not found", path)
    try:
        with path.open("r", encoding="utf-8") as fh:
            return parse_yaml(fh.read())
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {yaml_problem(exc)}", path) from None
    except UnicodeDecodeError:
        raise ConfigError("not a text (UTF-8) YAML file", path) from None


def yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: ``line N, column M: <problem>`` and the offending line, without PyYAML's
    ``in "<unicode string>"`` and its caret on a line of its own (they read as noise once joined; helper-112)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context = getattr(exc, "context", None)
    text = getattr(mark, "buffer", None)
    shown = ""
    if isinstance(text, str):
        lines = text.rstrip("\0").splitlines()
        if 0 <= mark.line < len(lines) and lines[mark.line].strip():
            shown = f" (the line reads {lines[mark.line].strip()[:80]!r})"
    return f"{where}: {problem}{f' ({context})' if context else ''}{shown}"


def yaml_text(data: Any) -> str:
    """``data`` as YAML text that :func:`load_yaml` reads back the same (texts such as ``"1e3"`` quoted)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def dump_yaml(data: Any, path: str | Path) -> None:
    """Write YAML atomically (:func:`unionseg.jsonfile.write_text`: a ``.<name>.<pid>.tmp`` temporary, which
    the run folder's lock clears when its writer was killed, then a rename)."""
    from unionseg.jsonfile import write_text

    write_text(path, yaml_text(data))


# ---------------------------------------------------------------------- dataclass <-> dict
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, source)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}", source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}", source)
        return from_dict(tp, value, source=source, where=where)  # type: ignore[arg-type]
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}", source)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}", source)
            return tuple(_coerce(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}", source)
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, where, source): _coerce(v, vt, f"{where}.{k}", source) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}", source)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}", source)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}", source)
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}", source) from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}", source)
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}", source) from None
    if tp is str:
        if isinstance(value, float):  # YAML read `1e3` or `1.50` as a number: str() would not give it back
            raise ConfigError(f"{where}: expected a string, got the number {value!r} (quote it: \"...\")", source)
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}", source)
        return str(value)
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path, got {value!r}", source)
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}", source)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<config>", where: str = "") -> T:
    """Build a (nested) dataclass from a mapping; unknown keys and wrong types raise ConfigError.

    A ``validate()`` method on the dataclass is called after construction; the ``ValueError`` it raises
    should name the field relative to the dataclass (``"val_fraction: ..."``): the key path is prefixed here.
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}", source)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        known = f"known: {', '.join(sorted(names))}" if names else "it takes no keys"
        raise ConfigError(f"{prefix}{sorted(unknown)[0]}: unknown key ({known})", source)
    required = sorted(f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                      if f.init and f.name not in data and f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING)
    if required:
        raise ConfigError(f"{prefix}{required[0]}: missing (a required key)", source)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", source) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # ValueError: checks in a dataclass's __post_init__
        raise ConfigError(f"{where or cls.__name__}: {exc}", source) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{prefix}{exc}", source) from None
    return obj


def to_dict(obj: Any, *, hashed: bool = False) -> Any:
    """Dataclass tree -> plain YAML/JSON-able data.

    ``hashed``: the tree :func:`config_hash` reads, without the fields marked :data:`HASH_OMITS_DEFAULT` that
    hold their default.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name), hashed=hashed) for f in dataclasses.fields(obj)
                if not (hashed and _omitted_from_hash(f, getattr(obj, f.name)))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, hashed=hashed) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v, hashed=hashed) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(
    obj: T, overrides: Sequence[str] | Mapping[str, Any], source: str = "<overrides>",
    open_maps: Sequence[str] = (),
) -> T:
    """Return a copy of a dataclass tree with overrides applied: ``a.b=value`` strings (values parsed as
    YAML, as on the command line), or a mapping ``{"a.b": value}`` of Python values (from Python).

    A key must already exist, except directly under the dotted paths in ``open_maps``: free-form mappings
    whose keys are checked by their consumer (a method's ``options``, validated by its Options class).
    """
    data = to_dict(obj)
    pairs: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        pairs = [(str(key), value) for key, value in overrides.items()]
    else:
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value (or give a mapping "
                                  "{key: value})", source)
            key, raw = item.split("=", 1)
            try:
                value = parse_yaml(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            pairs.append((key, value))
    for key, value in pairs:
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise _unknown_override(key, part, node, source)
            node = node[part]
        if not isinstance(node, dict) or (parts[-1] not in node and ".".join(parts[:-1]) not in open_maps):
            raise _unknown_override(key, parts[-1], node, source)
        node[parts[-1]] = value
    return from_dict(type(obj), data, source=source)


def _unknown_override(key: str, part: str, node: Any, source: str) -> ConfigError:
    known = f" (known: {', '.join(sorted(node))})" if isinstance(node, dict) and node else ""
    return ConfigError(f"override {key!r}: unknown key {part!r}{known}", source)


def describe_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """``key: old -> new`` for every key whose value differs (sorted; a missing key reads as None)."""
    return ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                     if before.get(k) != after.get(k))


def option_changes(recorded: Mapping[str, Any], today: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """:func:`describe_changes` between the options a run recorded and today's ('' = none).

    An option the record lacks is no change while today's value is its default: it was added later, and a new
    option's default keeps the old behaviour. A changed default of a recorded option is a change.
    """
    added = {k: v for k, v in today.items() if k not in recorded and k in defaults and v == defaults[k]}
    return describe_changes({**added, **recorded}, today)


# field metadata: a field added after runs were recorded is left out of config_hash while at its default, so
# those runs (benchmark results, training checkpoints) keep their hash; a non-default value is hashed
HASH_OMITS_DEFAULT = {"hash_omits_default": True}


def _omitted_from_hash(f: dataclasses.Field[Any], value: Any) -> bool:
    if not f.metadata.get("hash_omits_default"):
        return False
    return bool(value == (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default))


def config_hash(obj: Any) -> str:
    """Stable short hash of a dataclass tree (or plain data); see :data:`HASH_OMITS_DEFAULT`."""
    blob = json.dumps(to_dict(obj, hashed=True), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ---------------------------------------------------------------------- the project file
@dataclass(frozen=True)
class SplitSpec:
    """Seeded train/val split of one training dataset; ``val_cases`` pins it explicitly."""

    val_fraction: float = 0.2
    seed: int = 0
    val_cases: tuple[str, ...] | None = None

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class PreprocessSpec:
    """How every image is brought onto the training grid (recorded in every model file)."""

    spacing: tuple[float, float, float] = (0.8, 0.8, 1.5)  # RAS axes (x, y, z): slices last
    window: tuple[float, float] = (-325.0, 325.0)
    crop_to_body: bool = True
    body_threshold: float = -500.0

    def validate(self) -> None:
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing: must be positive, got {list(self.spacing)}")
        if not all(0.01 <= s <= 100 for s in self.spacing):  # the range prepare accepts in an image
            raise ValueError(f"spacing: {list(self.spacing)} mm is outside 0.01-100 mm, no CT grid's (in mm?)")
        if self.window[1] <= self.window[0]:
            raise ValueError(f"window: must be [low, high] with low < high, got {list(self.window)}")

    @property
    def center(self) -> float:
        return (self.window[0] + self.window[1]) / 2.0

    @property
    def half_width(self) -> float:
        return (self.window[1] - self.window[0]) / 2.0


ROLES = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset in a project. ``root`` is absolute once loaded (resolved against the project file)."""

    name: str
    root: Path
    labels: dict[int, str]
    annotated: tuple[str, ...]
    layout: str = "auto"
    role: str = "train"
    split: SplitSpec = field(default_factory=SplitSpec)
    oracle_labels: Path | None = None  # folder of FULL label maps in global leaf ids (phantom only)
    other: str | None = None  # ``labels: {..., other: background}``: every value ``labels`` does not list

    @property
    def fully_labelled(self) -> bool:
        return self.role != "train"


@dataclass(frozen=True)
class Project:
    """A loaded, validated project file."""

    path: Path
    name: str
    label_space: LabelSpace
    datasets: tuple[DatasetSpec, ...]
    preprocessing: PreprocessSpec
    cache_dir: Path
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def train_datasets(self) -> tuple[DatasetSpec, ...]:
        """The partially labelled training datasets (``role: train``), in the project file's order."""
        return tuple(d for d in self.datasets if d.role == "train")

    def eval_dataset(self, role: str) -> DatasetSpec | None:
        """The fully labelled set of ``role`` (``val`` or ``test``), or None when the project has none."""
        return next((d for d in self.datasets if d.role == role), None)

    def dataset(self, name: str) -> DatasetSpec:
        """The dataset called ``name``.

        Raises:
            ConfigError: no dataset of that name (the project's names listed).
        """
        for d in self.datasets:
            if d.name == name:
                return d
        raise ConfigError(f"unknown dataset {name!r} (the project's: {', '.join(d.name for d in self.datasets)})",
                          self.path)


def _parse_classes(raw: Any, source: str) -> list[Leaf]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("classes: expected a non-empty list of class names or {name, part_of}", source)
    leaves = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            leaves.append(Leaf(item))
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            extra = set(item) - {"name", "part_of"}
            if extra:
                raise ConfigError(f"classes[{i}]: unknown key {sorted(extra)[0]!r} (known: name, part_of)", source)
            parent = item.get("part_of")
            if parent is not None and not isinstance(parent, str):
                raise ConfigError(f"classes[{i}].part_of: expected a class name, got {parent!r}", source)
            leaves.append(Leaf(item["name"], parent))
        else:
            raise ConfigError(f"classes[{i}]: expected a name or {{name, part_of}}, got {item!r}", source)
    return leaves


def _label_value(key: Any) -> int | None:
    """A label map key as an integer: ``1``, ``"1"`` or ``1.0``; None for anything else (``2.7``, ``true``,
    ``.inf``, ``"one"``), which ``int()`` would truncate, take for 1, or fail on with another exception."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, float):
        return int(key) if key.is_integer() else None
    if isinstance(key, str) and re.fullmatch(r"\s*[+-]?\d+\s*", key):
        return int(key)
    return None


_DATASET_KEYS = {"name", "root", "labels", "annotated", "layout", "role", "split", "oracle_labels"}


def _path_like(name: str) -> bool:
    """A dataset name that is no plain folder name: a path separator, ``.`` or ``..``."""
    return "/" in name or "\\" in name or name.strip() in (".", "..")


def _parse_dataset(raw: Any, i: int, base: Path, source: str, roots: Mapping[str, Path],
                   root_hint: str = "") -> DatasetSpec:
    where = f"datasets[{i}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping", source)
    if isinstance(raw.get("name"), str) and raw["name"] and not _path_like(raw["name"]):
        where = f"datasets.{raw['name']}"
    unknown = set(raw) - _DATASET_KEYS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(_DATASET_KEYS))})",
                          source)
    for key in ("name", "labels", "annotated"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}", source)
    name = raw["name"]
    if not isinstance(name, str) or not name or _path_like(name):
        # a folder of the cache is named after it: "..", "." or "a/b" would put cases outside it (helper-102)
        raise ConfigError(f"{where}.name: expected a plain name, got {name!r}", source)
    where = f"datasets.{name}"
    if name in roots:
        root = roots[name]
    else:
        if "root" not in raw or not isinstance(raw["root"], str):
            raise ConfigError(f"{where}.root: missing (give it in the project file or with --root {name}=DIR"
                              f"{root_hint})", source)
        root = Path(raw["root"])
        if root.is_absolute() or raw["root"].startswith("~"):
            raise ConfigError(f"{where}.root: absolute paths are not portable; give it relative to the "
                              "project file, or give this machine's folder in a roots file or with --root", source)
        root = Path(os.path.normpath(base / root))  # '..' resolved: the cache records paths inside the root
    labels = raw["labels"]
    if not isinstance(labels, Mapping) or not labels:
        raise ConfigError(f"{where}.labels: expected a mapping local value -> class", source)
    local: dict[int, str] = {}
    other = None
    for k, v in labels.items():
        if k == OTHER_LABELS:  # every value the map does not list, e.g. a multi-class file used for one organ
            if v != BACKGROUND:
                raise ConfigError(f"{where}.labels.{OTHER_LABELS}: only '{BACKGROUND}' can stand for every value the "
                                  f"map does not list (got {v!r}); map a class's values one by one", source)
            other = v
            continue
        value = _label_value(k)
        if value is None:
            # nnU-Net v2's dataset.json goes NAME: VALUE (liver: 1); the project's map the other way (helper-133)
            hint = ""
            if isinstance(v, int) and not isinstance(v, bool):
                hint = (f" (nnU-Net v2's order, NAME: VALUE; the map goes from the value the dataset's label files "
                        f"hold to a class of the project, VALUE: CLASS, as in '{v}: {k}'"
                        + (", and value 0 needs no entry: it is background" if v == 0 else "") + ")")
            elif isinstance(k, str) and k.strip().lower().rstrip("s") == OTHER_LABELS:
                hint = f" (every value the map does not list: '{OTHER_LABELS}: {BACKGROUND}')"
            elif isinstance(k, str) and isinstance(v, str):
                hint = (f" (the map goes from the value the dataset's label files hold to a class of the project, "
                        f"VALUE: CLASS, as in '1: {v}')")
            raise ConfigError(f"{where}.labels: local value {k!r} is not an integer{hint}", source)
        if not isinstance(v, str):
            raise ConfigError(f"{where}.labels.{k}: expected a class name, got {v!r}", source)
        if value in local:  # 1 and "1", or 2 and 2.0: YAML keeps both, the second would replace the first
            raise ConfigError(f"{where}.labels: local value {value} is given twice ({local[value]!r} and {v!r})",
                              source)
        local[value] = v
    if not local:
        raise ConfigError(f"{where}.labels: 'other: background' alone maps no value to a class; list the values of "
                          "the classes this dataset labels", source)
    annotated = raw["annotated"]
    if not isinstance(annotated, list) or not all(isinstance(a, str) for a in annotated) or not annotated:
        raise ConfigError(f"{where}.annotated: expected a non-empty list of class names", source)
    role = raw.get("role", "train")
    if role not in ROLES:
        raise ConfigError(f"{where}.role: {role!r} is not one of {list(ROLES)}", source)
    split = from_dict(SplitSpec, raw.get("split") or {}, source=source, where=f"{where}.split")
    layout = raw.get("layout", "auto")
    if not isinstance(layout, str):
        raise ConfigError(f"{where}.layout: expected a string", source)
    if layout != "auto" and layout not in LAYOUTS and not layout.startswith("folders:"):
        raise ConfigError(f"{where}.layout: unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}, "
                          "folders:IMAGES,LABELS", source)
    oracle = raw.get("oracle_labels")
    if oracle is not None:
        if not isinstance(oracle, str) or Path(oracle).is_absolute() or ".." in Path(oracle).parts:
            raise ConfigError(f"{where}.oracle_labels: expected a folder inside the dataset root", source)
        oracle = root / oracle
    return DatasetSpec(name=name, root=root, labels=local, annotated=tuple(annotated), layout=layout,
                       role=role, split=split, oracle_labels=oracle, other=other)


def _read_roots_file(value: Any, base: Path, source: str) -> tuple[dict[str, Path], Path | None, str]:
    """The optional user file named by a project's ``roots_file`` key (path relative to the project file)::

        roots:                              # dataset name -> folder (absolute, or relative to this file)
          liver: /data/msd/Task03_Liver
          kidney: /data/kits19/data
        cache_dir: /scratch/unionseg        # optional: prepared data go to <cache_dir>/<project name>

    It is the one machine-specific file, so absolute paths are allowed in it (never in a recipe). A missing
    file is not an error: datasets then need ``root`` or ``--root``, and the missing-root error names the
    file. Names of datasets the project does not have are ignored, so one file serves several recipes.

    Returns:
        ``(name -> absolute folder, cache base folder or None, hint for the missing-root message)``.

    Raises:
        ConfigError: an absolute ``roots_file`` value, or a roots file with unknown keys or wrong types.
    """
    if value is None:
        return {}, None, ""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        raise ConfigError("roots_file: expected a file path relative to the project file", source)
    path = (base / value).resolve()
    hint = f", or under 'roots:' in {path}"
    if not path.is_file():
        return {}, None, f"{hint} (named by roots_file; no such file)"
    data = load_yaml(path)
    if data is None:
        return {}, None, hint
    if not isinstance(data, Mapping):
        raise ConfigError("expected a mapping with 'roots' (dataset name -> folder) and optional 'cache_dir'", path)
    unknown = set(data) - {"roots", "cache_dir"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key (known: cache_dir, roots)", path)
    roots = data.get("roots") or {}
    if not isinstance(roots, Mapping):
        raise ConfigError("roots: expected a mapping dataset name -> folder", path)
    out: dict[str, Path] = {}
    for name, folder in roots.items():
        if not isinstance(name, str) or not isinstance(folder, str) or not folder:
            raise ConfigError(f"roots.{name}: expected a folder, got {folder!r}", path)
        out[name] = (path.parent / Path(folder).expanduser()).resolve()
    cache = data.get("cache_dir")
    if cache is not None and (not isinstance(cache, str) or not cache):
        raise ConfigError(f"cache_dir: expected a folder, got {cache!r}", path)
    return out, (path.parent / Path(cache).expanduser()).resolve() if cache else None, hint


def load_project(path: str | Path, roots: Mapping[str, str | Path] | None = None,
                 require_train: bool = True) -> Project:
    """Load and validate a project file.

    Args:
        path: the YAML project file; relative roots are resolved against its folder.
        roots: optional ``dataset name -> folder`` overrides (``--root NAME=DIR`` on the command line).
            They win over the project's optional ``roots_file`` (a user YAML file, see
            :func:`_read_roots_file`; it may also move ``cache_dir``), which wins over each dataset's ``root``.
        require_train: refuse a project without a training dataset; ``evaluate`` needs only the label
            space and an evaluation set, so an external test set can be scored from a project of its own.

    Raises:
        ConfigError: naming the file and the key at fault.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"the project must be the path of its YAML file, got {type(path).__name__} {path!r}")
    path = Path(path).resolve()
    source = str(path)
    raw = load_yaml(path)
    if not isinstance(raw, Mapping):
        raise ConfigError("expected a mapping at the top level", path)
    known = {"name", "classes", "datasets", "preprocessing", "cache_dir", "generator_version", "notes", "roots_file"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(known))})", path)
    base = path.parent
    leaves = _parse_classes(raw.get("classes"), source)
    ds_raw = raw.get("datasets")
    if not isinstance(ds_raw, list) or not ds_raw:
        raise ConfigError("datasets: expected a non-empty list", path)
    empty = sorted(k for k, v in (roots or {}).items() if not str(v).strip())
    if empty:  # `--root spleen=$DIR` with DIR unset: Path("") is the current folder, taken for the root
        raise ConfigError(f"--root {empty[0]}=: expected a folder after '=', got nothing (an unset shell "
                          "variable?)", path)
    root_over = {k: Path(v).expanduser().resolve() for k, v in (roots or {}).items()}  # zsh leaves ~ after =
    file_roots, cache_base, root_hint = _read_roots_file(raw.get("roots_file"), base, source)
    merged = {**file_roots, **root_over}  # --root wins over the roots file, which wins over a dataset's root
    datasets = tuple(_parse_dataset(d, i, base, source, merged, root_hint) for i, d in enumerate(ds_raw))
    if any(d.role == "val" for d in datasets):
        # validation uses the role: val dataset alone, so a training dataset whose split is left out holds
        # nothing back (a held-out part would be neither trained nor validated on); a written split still holds
        datasets = tuple(dataclasses.replace(d, split=SplitSpec(val_fraction=0.0))
                         if d.role == "train" and r.get("split") is None else d
                         for d, r in zip(datasets, ds_raw, strict=True))
    unknown_roots = set(root_over) - {d.name for d in datasets}
    if unknown_roots:
        raise ConfigError(f"--root names unknown dataset {sorted(unknown_roots)[0]!r} (the project's: "
                          f"{', '.join(d.name for d in datasets)})", path)
    space = LabelSpace(
        leaves,
        [DatasetLabels(d.name, d.labels, d.annotated, d.fully_labelled, d.other) for d in datasets],
        source=source,
    )
    if require_train and not any(d.role == "train" for d in datasets):
        raise ConfigError("datasets: at least one dataset needs role: train", path)
    pre = from_dict(PreprocessSpec, raw.get("preprocessing") or {}, source=source, where="preprocessing")
    cache = raw.get("cache_dir", "prepared")
    if not isinstance(cache, str) or Path(cache).is_absolute():
        raise ConfigError("cache_dir: expected a folder relative to the project file", path)
    name = raw.get("name", path.stem)
    cache_dir = cache_base / str(name) if cache_base is not None else base / cache
    return Project(path=path, name=str(name), label_space=space, datasets=datasets, preprocessing=pre,
                   cache_dir=cache_dir, raw=dict(raw))


def split_cases(
    case_ids: Sequence[str], spec: SplitSpec, where: str = "", source: str | Path | None = None
) -> dict[str, list[str]]:
    """Seeded, recorded train/val split of a training dataset's case ids.

    The split depends only on the set of ids and the seed (not on their order); ``val_cases`` pins it.
    At least one case stays in train; with two or more cases and ``val_fraction > 0`` at least one goes
    to val.

    Args:
        case_ids: the dataset's case ids.
        spec: fraction and seed, or the pinned ``val_cases``.
        where: key prefix for error messages (``"datasets.liver."``).
        source: the project file, named in error messages.

    Returns:
        ``{"train": [...], "val": [...]}``, each sorted.

    Raises:
        ConfigError: ``val_cases`` names an unknown case or leaves no case for training.
    """
    ids = sorted(set(case_ids))
    if spec.val_cases is not None:
        missing = sorted(set(spec.val_cases) - set(ids))
        if missing:
            from unionseg.data.catalog import image_key
            from unionseg.data.io import strip_suffix

            files = [m for m in missing if strip_suffix(m) != m]
            hint = ""
            if files:  # a file name given: its case id drops the suffix and nnU-Net's channel _0000
                case = next((c for c in (image_key(Path(files[0])), strip_suffix(files[0])) if c in ids), None)
                hint = (f"; a case id has no file suffix ({case!r}, not {files[0]!r})" if case is not None
                        else "; a case id is the file name without its suffix and without nnU-Net's _0000")
            known = f"; the dataset's cases: {listing(ids)}" if ids else ""
            raise ConfigError(f"{where}split.val_cases: unknown case{'s' if len(missing) > 1 else ''} "
                              f"{listing([repr(m) for m in missing], 5)}{hint}{known}", source)
        val = sorted(set(spec.val_cases))
        if ids and len(val) == len(ids):
            raise ConfigError(f"{where}split.val_cases: every case is in val; leave at least one for training",
                              source)
    else:
        n_val = int(round(spec.val_fraction * len(ids)))
        if spec.val_fraction > 0 and len(ids) >= 2:
            n_val = max(1, n_val)
        n_val = max(0, min(n_val, len(ids) - 1))
        rng = random.Random(spec.seed)
        shuffled = ids[:]
        rng.shuffle(shuffled)
        val = sorted(shuffled[:n_val])
    in_val = set(val)
    train = [c for c in ids if c not in in_val]
    return {"train": train, "val": val}
