"""Run a test function on N local processes joined by gloo, and collect what each returns.

The function must live at module level (it is imported by name in fresh processes). It gets
(rank, world_size, *args) after the default process group is initialised, and may return
tensors, numbers, strings, lists and dicts; these come back as a list indexed by rank.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N ranks share 2 cores; oversubscription only slows them
    result_file = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_file)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, result_file)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 240.0) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker, args=(world_size, _free_port(), out_dir, fn, args),
            nprocs=world_size, join=False, start_method="spawn",
        )
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception:
            errors = []
            for rank in range(world_size):
                file = Path(out_dir) / f"rank{rank}.pt"
                if file.exists():
                    saved = torch.load(file, weights_only=True)
                    if not saved["ok"]:
                        errors.append(f"rank {rank}:\n{saved['error']}")
            raise RuntimeError("distributed test failed\n" + "\n".join(errors)) from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True)["result"] for r in range(world_size)]
