"""Data parallelism under ``torchrun``: process-group setup and the few helpers the Trainer uses.

    torchrun --nproc_per_node 2 my_train.py      # my_train.py calls init_from_env() first

Every rank runs the same script; ``init_from_env`` reads torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and starts the process group: NCCL when CUDA is
available, gloo on the CPU. Without torchrun it does nothing and the run is single-process.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["barrier", "init_from_env", "rank_and_world", "shutdown", "wrap_ddp"]


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialises ``torch.distributed`` from torchrun's environment when WORLD_SIZE > 1;
    returns ``(rank, world_size)`` ((0, 1) without torchrun). On CUDA each rank uses the GPU
    of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _dist_ready():
        return rank_and_world()
    if not torch.distributed.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group, or ``(0, 1)``."""
    if _dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def wrap_ddp(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` (gradients averaged over ranks at backward)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = None
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda:
        device_ids = [p.device.index]
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def barrier() -> None:
    """Waits for every rank (no-op without a process group)."""
    if _dist_ready():
        torch.distributed.barrier()


def shutdown() -> None:
    """Destroys the process group if one is running."""
    if _dist_ready():
        torch.distributed.destroy_process_group()
