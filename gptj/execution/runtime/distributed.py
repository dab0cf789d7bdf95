"""Process setup: one process per device, launched by torchrun (or alone).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Without them (or with WORLD_SIZE=1) there is
no process group and every collective of the project is the identity. NCCL joins CUDA
devices, gloo joins CPU processes. A process group that already exists (tests start their
own) is used as it is.

Every collective waits at most `timeout_s` for the other ranks, so a rank that hangs ends the
job instead of stalling it forever. On gloo the waiting ranks raise `CollectiveError` naming the
collective; on NCCL the process group's watchdog ends them (its log names the NCCL operation).

Restarts (`torchrun --max-restarts N`): torchrun's agent keeps one key-value store for all
attempts, so a restarted process could read the addresses the previous attempt's (dead)
processes published and fail to connect. Each attempt therefore uses its own key prefix, named
by the agent's restart count. That count is per agent, so on several nodes it can differ;
there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every attempt a fresh store instead (and this
prefix is not used).

On several nodes the ranks first check in with each other through that store (reachability.py),
with a short limit: an address the other nodes cannot reach, restart counts that differ or a
rank that never arrives end the job in one line instead of a hang.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from gptj.execution.runtime import reachability
from gptj.model import ParallelContext
from gptj.model.parallel import collective_error


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


# How long the ranks wait for each other before the first collective. They start within seconds
# of each other once torchrun's rendezvous is complete; this leaves room for slow imports.
CHECK_IN_LIMIT_S = 120.0


def _store_of_this_attempt(timeout: timedelta | None, backend: str):
    """The job's key-value store, seen through a prefix unique to this restart attempt, once every
    rank has checked in (None without MASTER_ADDR/MASTER_PORT: torch's own rendezvous applies).

    torchrun's agent hosts the store when TORCHELASTIC_USE_AGENT_STORE is True; otherwise rank 0
    hosts it, as torch's env:// rendezvous would."""
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank, size = int(os.environ["RANK"]), env_world_size()
    limit = min(CHECK_IN_LIMIT_S, timeout.total_seconds()) if timeout is not None else CHECK_IN_LIMIT_S
    store = reachability.connect_store(is_master=not shared and rank == 0, world_size=size, limit_s=limit)
    if reachability.several_nodes():
        reachability.check_in(store, rank, size, backend, shared_store=shared, limit_s=limit)
    store.set_timeout(timeout or timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if shared else "fresh"
    return dist.PrefixStore(f"gptj/attempt-{attempt}", store)


def init_distributed(tensor_parallel: int = 1,
                     timeout_s: float | None = None) -> tuple[ParallelContext, torch.device]:
    """Join the torchrun job (if any), pick this process's device, build the parallel groups.

    `timeout_s` bounds every collective of the process group created here (None: torch's default).
    """
    from gptj.execution.runtime.precision import pick_device

    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
    device = pick_device("auto")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized() and env_world_size() > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if backend == "nccl":
            # A timed-out NCCL collective ends this process (its watchdog), not a silent hang.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        store = _store_of_this_attempt(timeout, backend)
        if store is not None:
            kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=env_world_size())
        dist.init_process_group(backend, **kwargs)
    return ParallelContext.from_process_group(tensor_parallel, timeout), device


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier(name: str = "barrier") -> None:
    """Wait for every rank; `name` says what for in a timeout error."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError as err:
            raise collective_error(f"barrier ({name})", None, err) from err


def all_reduce_max_int(value: int, device: torch.device, name: str = "stop request") -> int:
    """The largest of every rank's small non-negative `value` (e.g. the number of a signal)."""
    if not _joined():
        return value
    t = torch.tensor([float(value)], device=device)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    except RuntimeError as err:
        raise collective_error(name, None, err) from err
    return int(t.item())


def gather_ints(values: list[int], name: str) -> list[list[int]]:
    """Every rank's list of int64 `values` (the same length on all ranks), indexed by rank."""
    if not _joined():
        return [list(values)]
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))  # NCCL moves device tensors only
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(parts, mine)
    except RuntimeError as err:
        raise collective_error(name, None, err) from err
    return [part.tolist() for part in parts]


def shutdown() -> None:
    """Leave the process group this module created (tests keep theirs)."""
    if dist.is_available() and dist.is_initialized() and env_world_size() > 1:
        dist.destroy_process_group()
