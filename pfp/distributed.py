"""Thin helpers around torch.distributed for runs started by torchrun.

A plain `python` run (no WORLD_SIZE, or WORLD_SIZE=1) never touches torch.distributed,
so every helper below is safe to call unconditionally.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed() -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment.

    Reads RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE > 1 it initialises the
    default process group (nccl when CUDA is available, gloo otherwise) and, on CUDA,
    makes cuda:LOCAL_RANK the current device. Returns (rank, world_size, local_rank);
    (0, 1, 0) without torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # called twice, e.g. by a script and by a library
        return dist.get_rank(), dist.get_world_size(), local_rank
    if torch.cuda.is_available():
        # Set the device first: nccl binds each communicator to the current device, and
        # "cuda" without an index must mean this process's GPU from here on.
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend="gloo")
    return rank, world_size, local_rank


def is_main_process() -> bool:
    """True on rank 0, and always without torch.distributed."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op when not distributed."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Tear the process group down (call once at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
