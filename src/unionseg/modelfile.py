"""The model file: the contract between the trainer and the predictor.

A model file is ``torch.save`` of ONE dict of plain types and tensors (loadable with
``torch.load(weights_only=True)``, so opening a file never runs code)::

    format: "unionseg-model"      version: 1          method: "dodnet"
    network: {...}                # spec for unionseg.networks.build_network(spec)
    state_dict: {...}             # tensors
    output_form: "softmax" | "sigmoid"
    channels: [...]               # softmax: leaf names in leaf-id order (incl. background);
                                  # sigmoid: one class key per channel ("region:liver", "liver_tumour");
                                  # a key may repeat (e.g. one per task): the predictor takes the max
    label_space: LabelSpace.to_dict()
    preprocessing: config.to_dict(PreprocessSpec)
    inference: {"roi_size": [..], "overlap": 0.5, "sw_batch_size": 2, "blend": "gaussian", "threshold": 0.5}
    config: {...}                 # the resolved training config
    provenance: {...}             # code commit, data fingerprint, config hash, seed, ...

The network's ``forward(x: (B, 1, X, Y, Z))`` returns logits (B, len(channels), X, Y, Z) for ALL outputs.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unionseg.errors import CheckpointError
from unionseg.labels import BACKGROUND, REGION_PREFIX, LabelSpace

if TYPE_CHECKING:
    from torch import nn

MODEL_FORMAT = "unionseg-model"
MODEL_VERSION = 1
OUTPUT_FORMS = ("softmax", "sigmoid")
BLENDS = ("gaussian", "constant")
REQUIRED_KEYS = ("format", "version", "method", "network", "state_dict", "output_form", "channels",
                 "label_space", "preprocessing", "inference")
DEFAULT_INFERENCE: dict[str, Any] = {"roi_size": [96, 96, 96], "overlap": 0.5, "sw_batch_size": 2,
                                     "blend": "gaussian", "threshold": 0.5}


def _plain(value: Any, where: str) -> Any:
    """Check that a value is made of plain types (and tensors); tuples become lists."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    raise CheckpointError(f"model payload {where}: {type(value).__name__} is not a plain type or a tensor")


def check_inference(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults into sliding-window settings and validate them.

    Raises:
        CheckpointError: unknown keys or invalid values.
    """
    out = dict(DEFAULT_INFERENCE)
    unknown = set(settings) - set(out)
    if unknown:
        raise CheckpointError(f"inference: unknown keys {sorted(unknown)} (known: {sorted(out)})")
    out.update(settings)
    roi = out["roi_size"]
    if isinstance(roi, int):
        roi = [roi] * 3
    if not isinstance(roi, (list, tuple)) or len(roi) != 3 or not all(isinstance(r, int) and r > 0 for r in roi):
        raise CheckpointError(f"inference.roi_size: expected 3 positive integers, got {roi!r}")
    out["roi_size"] = [int(r) for r in roi]
    if not 0.0 <= float(out["overlap"]) < 1.0:
        raise CheckpointError(f"inference.overlap must be in [0, 1), got {out['overlap']!r}")
    out["overlap"] = float(out["overlap"])
    if not isinstance(out["sw_batch_size"], int) or out["sw_batch_size"] < 1:
        raise CheckpointError(f"inference.sw_batch_size must be a positive integer, got {out['sw_batch_size']!r}")
    if out["blend"] not in BLENDS:
        raise CheckpointError(f"inference.blend must be one of {BLENDS}, got {out['blend']!r}")
    if out["threshold"] is not None and not 0.0 <= float(out["threshold"]) <= 1.0:
        raise CheckpointError(f"inference.threshold must be in [0, 1] or null, got {out['threshold']!r}")
    return out


def check_channels(output_form: str, channels: Sequence[str], space: LabelSpace) -> list[str]:
    """Validate the channel names of a model's outputs against its label space.

    softmax: exactly the leaf names in leaf-id order. sigmoid: each a leaf name (not background) or a
    ``region:<organ>`` key; repeats allowed.

    Raises:
        CheckpointError: an unknown output form or a channel that does not fit the label space.
    """
    if output_form not in OUTPUT_FORMS:
        raise CheckpointError(f"output_form must be one of {OUTPUT_FORMS}, got {output_form!r}")
    channels = [str(c) for c in channels]
    if output_form == "softmax":
        if channels != list(space.names):
            raise CheckpointError(f"softmax channels must be the leaves in id order {list(space.names)}, "
                                  f"got {channels}")
        return channels
    if not channels:
        raise CheckpointError("a sigmoid model needs at least one channel")
    regions = set(space.region_keys())
    for key in channels:
        if key == BACKGROUND or (key.startswith(REGION_PREFIX) and key not in regions) or (
                not key.startswith(REGION_PREFIX) and key not in space.names):
            raise CheckpointError(f"sigmoid channel {key!r} is neither a leaf nor a region of the label space")
    return channels


def make_payload(
    *,
    method: str,
    network: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    output_form: str,
    channels: Sequence[str],
    label_space: LabelSpace,
    preprocessing: Any,
    inference: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble and validate a model payload (what :func:`save_model` writes).

    Args:
        method: registered method name.
        network: spec for ``unionseg.networks.build_network``.
        state_dict: the deployed weights (tensors are moved to CPU).
        output_form: ``softmax`` (channels = leaves) or ``sigmoid`` (channels = class keys).
        channels: meaning of each output channel (see module docstring).
        label_space: the project's label space.
        preprocessing: a ``PreprocessSpec`` or its dict.
        inference: sliding-window settings; defaults filled in.

    Raises:
        CheckpointError: an invalid field.
    """
    from unionseg.config import PreprocessSpec, from_dict, to_dict

    pre = preprocessing if isinstance(preprocessing, Mapping) else to_dict(preprocessing)
    from_dict(PreprocessSpec, pre, source="<model payload>", where="preprocessing")
    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "method": str(method),
        "network": _plain(dict(network), "network"),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "output_form": output_form,
        "channels": check_channels(output_form, channels, label_space),
        "label_space": _plain(label_space.to_dict(), "label_space"),
        "preprocessing": _plain(pre, "preprocessing"),
        "inference": check_inference(inference or {}),
        "config": _plain(dict(config or {}), "config"),
        "provenance": _plain(dict(provenance or {}), "provenance"),
    }
    return payload


def save_model(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write a model file atomically (temp file in the same folder, fsync, rename).

    Raises:
        CheckpointError: the payload is not a unionseg model payload.
    """
    from unionseg.jsonfile import written_atomically
    from unionseg.training.checkpoint import torch_save

    path = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"not a unionseg model payload (missing {missing}); build it with make_payload", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(path) as fh:
        torch_save(dict(payload), fh, path)
    return path


def model_id(path: str | Path) -> str:
    """Eight hex digits naming a model file's content (its CRC-32), recorded in every label map ``predict``
    writes. Reads the file in 1 MiB blocks and imports no torch.

    Raises:
        CheckpointError: the file cannot be read.
    """
    import zlib

    crc = 0
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                crc = zlib.crc32(block, crc)
    except OSError as exc:
        raise CheckpointError(f"cannot read the model file ({exc.strerror or exc})", path) from None
    return f"{crc:08x}"


def load_model(path: str | Path) -> dict[str, Any]:
    """Read a model file safely (``torch.load(weights_only=True)``, tensors on the CPU).

    Raises:
        CheckpointError: missing, empty, truncated or corrupt, an unsafe pickle (objects other than plain
            types and tensors), not a unionseg model, or a newer format version.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        inside = path / "model.pt"
        hint = f" ({inside} is one)" if inside.is_file() else ""
        raise CheckpointError(f"is a folder; give the model file{hint}", path)
    if not path.is_file():
        raise CheckpointError("model file not found", path)
    if path.stat().st_size == 0:
        raise CheckpointError("empty model file (0 bytes)", path)
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive; the legacy format a pickle
        from unionseg.data.io import IMAGE_SUFFIXES, suffix_of

        swapped = (" (an image: the model file comes first, `unionseg predict MODEL INPUT... -o OUT`)"
                   if suffix_of(path) in IMAGE_SUFFIXES else "")
        raise CheckpointError(f"not a model file (neither a PyTorch zip archive nor a pickle){swapped}", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError("refused: the file holds Python objects other than plain types and tensors "
                                  "(unsafe pickle); only unionseg model files are loaded", path) from None
        raise CheckpointError(f"not a model file ({first})", path) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"truncated or corrupt model file ({first})", path) from None
    if isinstance(payload, dict) and payload.get("format") == "unionseg-checkpoint":  # training's last.pt
        beside = path.parent / "model.pt"
        where = (f"give the run's model file, {beside}" if beside.is_file() else
                 "a run writes its model file, model.pt, beside it when its training ends (`unionseg train ... "
                 "--resume` finishes a stopped run)")
        raise CheckpointError(f"a training checkpoint, not a model file: {where}", path)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError("not a unionseg model file (no 'format: unionseg-model')", path)
    version = payload.get("version")
    if not isinstance(version, int) or version > MODEL_VERSION:
        raise CheckpointError(f"model file version {version!r} is newer than this unionseg ({MODEL_VERSION}); "
                              "upgrade unionseg", path)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"model file lacks {missing}", path)
    return payload


def build_from_payload(payload: Mapping[str, Any]) -> nn.Module:
    """Build the network of a payload and load its weights (eval mode, on the CPU).

    Raises:
        CheckpointError: the weights do not fit the network spec.
    """
    from unionseg.ensemble import build_deployed

    net = build_deployed(dict(payload["network"]), LabelSpace.from_dict(payload["label_space"]))
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        # torch's first line says only "Error(s) in loading state_dict": the lines after it name the weights
        said = " ".join(line.strip() for line in str(exc).splitlines()[:4] if line.strip())
        raise CheckpointError(f"weights do not fit the network spec ({said[:600]})") from None
    return net.eval()
