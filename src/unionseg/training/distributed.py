"""DistributedDataParallel under ``torchrun`` (multi-node capable): thin helpers, no-ops in one process."""

from __future__ import annotations

import datetime
import os
import warnings
from typing import Any

import torch
from torch import nn


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


#: how long a rank waits in a collective for the others (rank 0 alone writes checkpoints and model files)
DDP_TIMEOUT = datetime.timedelta(minutes=30)


def setup(device: torch.device) -> torch.device:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); pick this rank's device.

    Backend: NCCL on CUDA, gloo on CPU. ``LOCAL_RANK`` selects the GPU on multi-GPU nodes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        if device.type == "cuda" and device.index is not None and not is_distributed():
            # cuda:N in one process: N becomes the current device, so what follows the current device (the
            # checkpoint's CUDA random state, pinned-memory threads, kernels without a device) is on N, not on 0
            torch.cuda.set_device(device)
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    # one timeout for both backends: NCCL's watchdog aborted after 10 minutes where gloo waits 30, while
    # the other ranks wait in a collective for rank 0 writing a checkpoint or a model file (helper-111)
    torch.distributed.init_process_group(backend=backend, timeout=DDP_TIMEOUT,
                                         device_id=device if device.type == "cuda" else None)
    return device


def wrap(model: nn.Module, device: torch.device, unused_parameters: bool = False) -> nn.Module:
    """DDP-wrap a trainable model when distributed (parameters broadcast from rank 0).

    Args:
        unused_parameters: some parameter may get no gradient in a step; DDP then searches the autograd
            graph for such parameters every step (its ``find_unused_parameters``), which costs time.
    """
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    from unionseg.networks.layout import channels_last_for

    if channels_last_for(device):
        # a 1x1x1 kernel is stored with channels-last strides (networks/layout.py, so that its convolution
        # keeps the layout), but its gradient comes back with the contiguous ones, which hold the same bytes:
        # DDP copies those few hundred numbers into its bucket and warned on every rank ("Grad strides do not
        # match bucket view strides ... may impair performance"); bench_layout measures the layout's gain
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides",
                                category=UserWarning)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused_parameters)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (one small all-reduce; the flag itself in one process)."""
    return bool(max_rank(1 if flag else 0, device))


def max_rank(value: int, device: torch.device) -> int:
    """The largest of every rank's ``value``, on every rank (``value`` itself in one process)."""
    if not is_distributed():
        return value
    found = torch.tensor([value], device=device)
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    return int(found.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    found: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(found, obj)
    return found


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that report it, on every rank (``values`` itself in one process).

    Logged losses are each process's own batch; their mean is the loss of the whole step's batch. Through
    ``all_gather_object``, so ranks whose keys differ (a term one rank's batch lacks) still agree.
    """
    if not is_distributed():
        return values
    keys = list(values)
    found = gather_objects(values)
    for other in found:
        keys += [k for k in other if k not in keys]
    return {k: sum(v[k] for v in found if k in v) / sum(1 for v in found if k in v) for k in keys}


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def cleanup() -> None:
    if is_distributed():
        torch.distributed.destroy_process_group()
