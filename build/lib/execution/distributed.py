"""Process setup: one process per device, launched by torchrun (or alone).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Without them (or with WORLD_SIZE=1) there is
no process group and every collective of the project is the identity. NCCL joins CUDA
devices, gloo joins CPU processes. A process group that already exists (tests start their
own) is used as it is.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from gptj import ParallelContext


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def init_distributed(tensor_parallel: int = 1) -> tuple[ParallelContext, torch.device]:
    """Join the torchrun job (if any), pick this process's device, build the parallel groups."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized() and env_world_size() > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
    return ParallelContext.from_process_group(tensor_parallel), device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. a stop request)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shutdown() -> None:
    """Leave the process group this module created (tests keep theirs)."""
    if dist.is_available() and dist.is_initialized() and env_world_size() > 1:
        dist.destroy_process_group()
