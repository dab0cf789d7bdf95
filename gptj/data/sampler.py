"""Seeded, resumable, replica-aware sampling of training rows.

The sampler reads one endless stream: the concatenation of per-epoch permutations of all
rows, the permutation of epoch e depending only on (seed, e). Global batch k is stream
positions [k*G, (k+1)*G). A global batch that runs past the end of an epoch continues into
the next epoch's permutation ("wrap"), so no row is ever dropped and every row is seen
exactly once per epoch of the stream.

Each global batch is split into `num_replicas` contiguous, disjoint slices, and each slice into
`grad_accum` micro-batches. The only state is the stream position (plus the seed), so a
resumed run continues with exactly the batches of an uninterrupted one; resuming with
another replica count or batch size changes how the next batches are split, but not which
rows come next, so each row is still seen once per epoch.
"""

from __future__ import annotations

import numpy as np


class TrainSampler:
    def __init__(self, num_rows: int, global_batch_size: int, micro_batch_size: int,
                 num_replicas: int = 1, replica_index: int = 0, seed: int = 0):
        if num_rows < 1:
            raise ValueError("num_rows must be positive")
        if not 0 <= replica_index < num_replicas:
            raise ValueError(f"replica_index {replica_index} not in [0, {num_replicas})")
        per_step = micro_batch_size * num_replicas
        if micro_batch_size < 1 or global_batch_size < 1 or global_batch_size % per_step:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple "
                             f"of micro_batch_size x num_replicas = {per_step}")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.num_replicas = num_replicas
        self.replica_index = replica_index
        self.grad_accum = global_batch_size // per_step
        self.seed = seed
        self.position = 0  # stream position of the next global batch
        self._perm_epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        return self.position // self.num_rows

    @property
    def steps_per_epoch(self) -> float:
        return self.num_rows / self.global_batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm, self._perm_epoch = rng.permutation(self.num_rows), epoch
        return self._perm

    def stream(self, start: int, count: int) -> np.ndarray:
        """Row indices at stream positions [start, start + count)."""
        out, pos = [], start
        while pos < start + count:
            epoch, offset = divmod(pos, self.num_rows)
            take = min(self.num_rows - offset, start + count - pos)
            out.append(self.permutation(epoch)[offset:offset + take])
            pos += take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def global_batch(self) -> np.ndarray:
        """The next global batch for all replicas (does not advance)."""
        return self.stream(self.position, self.global_batch_size)

    def next_step(self) -> list[np.ndarray]:
        """This replica's micro-batches for one optimizer step: grad_accum arrays of
        micro_batch_size row indices."""
        batch = self.global_batch()
        per_replica = self.global_batch_size // self.num_replicas
        mine = batch[self.replica_index * per_replica:(self.replica_index + 1) * per_replica]
        self.position += self.global_batch_size
        return [mine[i * self.micro_batch_size:(i + 1) * self.micro_batch_size]
                for i in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_rows": self.num_rows,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(f"sampler state is for {state['num_rows']} rows, data has "
                             f"{self.num_rows}: the training data changed")
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, sampler has {self.seed}")
        self.position = int(state["position"])


class BatchLoader:
    """Maps sampler steps to batch dicts: `next_step()` gives grad_accum batches."""

    def __init__(self, data, sampler: TrainSampler):
        if sampler.num_rows != data.num_rows:
            raise ValueError(f"sampler has {sampler.num_rows} rows, data {data.num_rows}")
        self.data = data
        self.sampler = sampler

    def next_step(self) -> list[dict]:
        return [self.data.batch(idx) for idx in self.sampler.next_step()]

    def __iter__(self):
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
