"""Validation during training: sliding-window prediction on prepared volumes, Dice on annotated classes.

The fully labelled validation set is used when the project has one (role: val); otherwise the validation
split of the training datasets, each case scored only on its ANNOTATED classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from unionseg.methods.base import Deployed, RunContext
from unionseg.outputs import activate, decode_probs

#: above this many voxels a volume's windows are stitched on the CPU, not on the GPU that runs them: the whole
#: (C, X, Y, Z) float32 output and its activation stay off the device (a 512 x 512 x 600 CT prepared at about
#: 1 mm holds ~10^8 voxels, over 10 GB with a dozen classes, on top of training's model and optimiser state)
DEVICE_STITCH_VOXELS = 2**24


def stitch_device(device: torch.device, shape: tuple[int, ...]) -> torch.device:
    """Where :func:`predict_volume` stitches a volume of ``shape`` run on ``device``: the device itself up to
    :data:`DEVICE_STITCH_VOXELS` voxels, else the CPU."""
    voxels = int(np.prod(shape))
    return device if device.type == "cpu" or voxels <= DEVICE_STITCH_VOXELS else torch.device("cpu")


@torch.no_grad()
def predict_volume(
    module: torch.nn.Module, image: np.ndarray | torch.Tensor, roi_size: tuple[int, int, int], overlap: float,
    sw_batch_size: int, device: torch.device, output_form: str, blend: str = "gaussian", amp: bool = True,
    to_cpu: bool = True,
) -> torch.Tensor:
    """(X, Y, Z) prepared image -> (C, X, Y, Z) float32 probabilities on the CPU (``to_cpu=False``: where they
    were stitched, for a caller that decides there and copies only the labels).

    The windows run on ``device`` (in float16 autocast on a GPU when ``amp``, the run's ``amp``: a run that
    trains without it validates and makes its experts' maps without it too); a large volume is stitched on
    the CPU (:func:`stitch_device`).
    """
    from monai.inferers import sliding_window_inference

    was_training = module.training
    module.eval()
    stitch = stitch_device(device, tuple(image.shape))
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None].to(stitch)  # a copy: memmaps are read-only
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
        logits = sliding_window_inference(x, roi_size=roi_size, sw_batch_size=sw_batch_size, predictor=module,
                                          overlap=overlap, mode=blend, sw_device=device, device=stitch)
    module.train(was_training)
    assert isinstance(logits, torch.Tensor)
    probs = activate(logits[0].float(), output_form)
    return probs.cpu() if to_cpu else probs


def dice_scores(pred: np.ndarray, codes: np.ndarray, annotated: np.ndarray, space: Any) -> dict[str, float]:
    """Dice per scorable class (regions and part leaves the case annotates), leaving out a class that is
    absent from both truth and prediction.

    The evaluation scores such a case 1 (the empty-mask rule), which is right for a report but wrong for
    checkpoint selection: a network that never predicts a tumour would collect 1 on every tumour-free case.
    On the standard suite that rule made the oracle's selection pick step 750 over step 2,000 (validation
    region Dice 0.86 against 0.90). A missed class still scores 0, and a false positive scores 0.
    """
    from unionseg.evaluation.evaluate import validation_dice

    return validation_dice(pred, codes, annotated, space, both_empty=None)


def validation_cases(ctx: RunContext, datasets: list[str] | None = None) -> list[Any]:
    """The fully labelled validation set if the project has one, else the val split of ``datasets``."""
    cases = ctx.index.cases(split="val")
    full = [c for c in cases if c.role == "val"]
    names = ctx.train_datasets if datasets is None else datasets
    chosen = full if full else [c for c in cases if c.dataset in names]
    if ctx.cfg.val_max_cases is not None:
        chosen = _round_robin(chosen)[: ctx.cfg.val_max_cases]
    return chosen


def _round_robin(cases: list[Any]) -> list[Any]:
    """The cases taken one dataset at a time, in turn (each dataset's in their order): the first N of them
    validate every dataset once N reaches the number of datasets (the first N in dataset order left a
    seven-dataset recipe's later datasets unvalidated under ``val_max_cases=2``)."""
    from itertools import zip_longest

    by_dataset: dict[str, list[Any]] = {}
    for case in cases:
        by_dataset.setdefault(case.dataset, []).append(case)
    return [case for turn in zip_longest(*by_dataset.values()) for case in turn if case is not None]


def validate_deployed(deployed: Deployed, ctx: RunContext, datasets: list[str] | None = None,
                      on_case: Callable[[int, int], Any] | None = None) -> dict[str, Any]:
    """Mean Dice over cases and classes (every case scored on its annotated classes; a class absent from both
    truth and prediction is left out, see :func:`dice_scores`).

    Under DDP every rank scores every ``world_size``-th case and the scores are gathered, so each rank returns
    the same result, equal to the one-process result (the cases are put back in order before the means), in
    about ``1 / world_size`` of the time; no rank waits at a collective while another validates alone.
    ``on_case(done, total)`` follows this rank's share, before its first case and after each.
    """
    from unionseg.training import distributed as dist

    cfg = ctx.cfg
    cases = validation_cases(ctx, datasets)
    mine: list[tuple[int, dict[str, float]]] = []
    my_cases = range(dist.rank(), len(cases), dist.world_size())
    if on_case is not None:
        on_case(0, len(my_cases))
    for i in my_cases:
        case = cases[i]
        probs = predict_volume(deployed.module, case.image(), cfg.roi_size, cfg.inference.overlap,
                               cfg.inference.sw_batch_size, ctx.device, deployed.output_form, cfg.inference.blend,
                               amp=cfg.amp, to_cpu=False)
        # decided where the volume was stitched: on a GPU, the uint8 labels cross to the host, not the C
        # float32 probability maps (helper-111)
        pred = decode_probs(probs, deployed.output_form, deployed.channels, deployed.label_space or ctx.space,
                            threshold=cfg.inference.threshold).cpu().numpy()
        del probs  # not held while the next case is predicted: up to (C, X, Y, Z) float32 more at the peak
        if deployed.to_global is not None:
            pred = deployed.to_global[pred]
        annotated = case.annotated if deployed.predictable is None else case.annotated & deployed.predictable
        mine.append((i, dice_scores(pred, np.asarray(case.label()), annotated, ctx.space)))
        if on_case is not None:
            on_case(len(mine), len(my_cases))
    per_class: dict[str, list[float]] = {}
    for _, scores in sorted((item for share in dist.gather_objects(mine) for item in share), key=lambda t: t[0]):
        for key, value in scores.items():
            per_class.setdefault(key, []).append(value)
    means = {k: float(np.mean(v)) for k, v in per_class.items()}
    return {"per_class": means, "mean_dice": float(np.mean(list(means.values()))) if means else 0.0,
            "region_mean": region_mean(means), "n_cases": len(cases)}


def region_mean(per_class: dict[str, float]) -> float | None:
    """The mean Dice over the organ regions (``region:*`` keys) of a per-class result; None without any."""
    regions = [v for k, v in per_class.items() if k.startswith("region:")]
    return float(np.mean(regions)) if regions else None


def selection_score(result: dict[str, Any], select_on: str) -> float:
    """The number that selects the model from a :func:`validate_deployed` result.

    ``all``: the mean Dice over every scored class. ``regions``: the mean over the organ regions only, so
    classes that a coarse grid cannot resolve (small tumours, whose validation Dice jumps between 0 and a
    lucky overlap from one validation to the next) cannot pick a checkpoint whose organs are worse; the
    parts are still validated and reported. A run whose validation set scores no region (a tumour-only
    expert) falls back to ``all``.
    """
    if select_on == "regions" and result.get("region_mean") is not None:
        return float(result["region_mean"])
    if select_on not in ("all", "regions"):
        raise ValueError(f"select_on must be 'all' or 'regions', got {select_on!r}")
    return float(result["mean_dice"])
