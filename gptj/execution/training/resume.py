"""Which checkpoint a run resumes from: the newest one that every rank can verify.

Candidates are the `step-NNNNNNNN` directories, newest first. For each, every rank reads
meta.json, lets the caller check that it fits this run, and checks its own shard's size and
checksum; the ranks then exchange their verdicts, so all of them take the same step or move on
together. A damaged checkpoint (unreadable meta.json, a missing, cut-short or altered shard) is
named with the file at fault and the previous one is tried; rank 0 then moves it aside as
`damaged-step-NNNNNNNN` so that it is neither counted as newest nor pruned in place of a good one.
A checkpoint that does not fit the run (another model shape or layout) stops the run instead:
falling back past it would silently continue some other run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptj.execution.runtime.distributed import gather_ints
from gptj.execution.training import checkpoint as ckpt

DAMAGED_PREFIX = "damaged-"
_OK, _DAMAGED, _MISFIT = 0, 1, 2


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _verdict(path: Path, rank: int, check: Callable[[dict, Path], None] | None
             ) -> tuple[int, str, dict | None]:
    """(verdict, message, meta) of one candidate as seen by this rank; damage is reported by the
    rank that finds it (meta.json, which every rank reads, by rank 0 only)."""
    try:
        meta = ckpt.read_meta(path)
    except ckpt.CheckpointDamagedError as err:
        if rank == 0:
            _warn(f"checkpoint {path.name} is damaged: {err}")
        return _DAMAGED, str(err), None
    except ckpt.CheckpointLoadError as err:
        return _MISFIT, str(err), None
    try:
        if check is not None:
            check(meta, path)
        if not ckpt.verify_shard(path, rank, meta) and rank == 0:
            _warn(f"{path} was written before checkpoints recorded checksums: loading it unverified")
    except ckpt.CheckpointDamagedError as err:
        _warn(f"checkpoint {path.name} is damaged (rank {rank}): {err}")
        return _DAMAGED, str(err), None
    except ckpt.CheckpointLoadError as err:
        return _MISFIT, str(err), None
    return _OK, "", meta


def select_checkpoint(root: str | os.PathLike, rank: int,
                      check: Callable[[dict, Path], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Collective: (directory, meta) of the newest checkpoint valid on every rank, or None when
    `root` holds none at all. Raises CheckpointLoadError when checkpoints exist but every one is
    damaged, or when the newest intact one does not fit (`check` raised CheckpointLoadError)."""
    root = Path(root)
    damaged: list[Path] = []
    below = None
    while True:
        local = [step for step, _ in ckpt.step_dirs(root) if below is None or step < below]
        proposals = gather_ints([local[-1] if local else -1], "checkpoint choice")
        step = max(p[0] for p in proposals)  # a directory one rank cannot see fails verification there
        if step < 0:
            break
        path = ckpt.step_dir(root, step)
        verdict, message, meta = _verdict(path, rank, check)
        verdicts = [v[0] for v in gather_ints([verdict], "checkpoint verification")]
        if _MISFIT in verdicts:
            ranks = [r for r, v in enumerate(verdicts) if v == _MISFIT]
            raise ckpt.CheckpointLoadError(message if verdict == _MISFIT else
                                           f"checkpoint {path} does not fit this run (see rank {ranks[0]})")
        if all(v == _OK for v in verdicts):
            if damaged and rank == 0:
                _set_aside(damaged, path)
            return path, meta
        damaged.append(path)
        below = step
    if damaged:
        names = ", ".join(p.name for p in damaged)
        raise ckpt.CheckpointLoadError(
            f"no valid checkpoint left in {root}: {names} {'is' if len(damaged) == 1 else 'are'} "
            "damaged (see the warnings above); repair or remove them to resume, or move the "
            "directory aside to start over")
    return None


def _aside_name(path: Path) -> Path:
    """damaged-step-N, or damaged-step-N.2, .3, ... when an earlier damage of that step is
    already there: each damaged copy is kept for whoever looks into it."""
    target, copy = path.with_name(DAMAGED_PREFIX + path.name), 1
    while target.exists():
        copy += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}.{copy}")
    return target


def _set_aside(damaged: list[Path], chosen: Path) -> None:
    for path in damaged:
        target = _aside_name(path)
        try:
            path.rename(target)
        except OSError as err:
            _warn(f"could not move damaged checkpoint {path} aside: {err}")
            continue
        _warn(f"resuming from {chosen.name}; moved the damaged {path.name} to {target.name}")
