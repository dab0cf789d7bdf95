"""The training sampler: replica split, epoch coverage, exact resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import gptj.data as data


def steps(sampler, n):
    return [np.concatenate(sampler.next_step()) for _ in range(n)]


def test_shapes_and_replica_disjointness():
    replicas = [data.TrainSampler(100, 24, 4, num_replicas=3, replica_index=r, seed=1)
                for r in range(3)]
    assert replicas[0].grad_accum == 2
    for _ in range(5):
        parts = [s.next_step() for s in replicas]
        for p in parts:
            assert len(p) == 2 and all(len(m) == 4 for m in p)
        flat = [np.concatenate(p) for p in parts]
        whole = np.concatenate(flat)
        assert len(set(whole.tolist())) == 24  # disjoint within the global batch


@pytest.mark.parametrize("num_rows", [96, 100, 7])
def test_every_row_once_per_epoch(num_rows):
    """Global batches wrap across epochs, so each epoch's rows are exactly one permutation."""
    replicas = [data.TrainSampler(num_rows, 16, 2, num_replicas=2, replica_index=r, seed=3)
                for r in range(2)]
    stream = []
    n_steps = -(-3 * num_rows // 16)
    for _ in range(n_steps):
        per = [np.concatenate(s.next_step()) for s in replicas]
        stream.extend(np.concatenate(per).tolist())
    for epoch in range(3):
        chunk = stream[epoch * num_rows:(epoch + 1) * num_rows]
        assert sorted(chunk) == list(range(num_rows))
    assert stream[:num_rows] != stream[num_rows:2 * num_rows]  # reshuffled each epoch


def test_seed_changes_order():
    a = steps(data.TrainSampler(50, 10, 5, seed=0), 1)[0]
    b = steps(data.TrainSampler(50, 10, 5, seed=1), 1)[0]
    assert a.tolist() != b.tolist()


@pytest.mark.parametrize("stop", [3, 10, 11])  # mid-epoch, just before and across the boundary
def test_exact_resume(stop):
    straight = data.TrainSampler(100, 8, 2, num_replicas=2, replica_index=1, seed=5)
    expected = steps(straight, 20)
    first = data.TrainSampler(100, 8, 2, num_replicas=2, replica_index=1, seed=5)
    got = steps(first, stop)
    state = first.state_dict()
    resumed = data.TrainSampler(100, 8, 2, num_replicas=2, replica_index=1, seed=5)
    resumed.load_state_dict(dict(state))
    got += steps(resumed, 20 - stop)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert state["epoch"] == (stop * 8) // 100


def test_resume_with_other_replica_count_sees_each_row_once_per_epoch():
    rows = 60
    old = [data.TrainSampler(rows, 12, 3, num_replicas=2, replica_index=r, seed=9) for r in range(2)]
    seen = []
    for _ in range(3):  # 36 rows into epoch 0
        seen += np.concatenate([np.concatenate(s.next_step()) for s in old]).tolist()
    state = old[0].state_dict()
    new = [data.TrainSampler(rows, 12, 1, num_replicas=4, replica_index=r, seed=9) for r in range(4)]
    for s in new:
        s.load_state_dict(state)
    for _ in range(7):  # to 120 rows = two epochs
        seen += np.concatenate([np.concatenate(s.next_step()) for s in new]).tolist()
    assert Counter(seen[:rows]) == Counter(range(rows))
    assert Counter(seen[rows:]) == Counter(range(rows))


def test_state_mismatch_and_bad_sizes():
    s = data.TrainSampler(10, 4, 2)
    with pytest.raises(ValueError, match="data changed"):
        s.load_state_dict({**s.state_dict(), "num_rows": 11})
    with pytest.raises(ValueError, match="multiple"):
        data.TrainSampler(10, 6, 4)
    with pytest.raises(ValueError, match="replica_index"):
        data.TrainSampler(10, 4, 2, num_replicas=2, replica_index=2)


def test_batch_loader_resume():
    train = data.build_train_data("mnli", None, "bundled:tiny", sequence_length=64, use_cache=False,
                                  progress=False)
    def loader():
        return data.BatchLoader(train, data.TrainSampler(train.num_rows, 8, 2, seed=4))
    a = loader()
    for _ in range(3):
        a.next_step()
    b = loader()
    b.load_state_dict(a.state_dict())
    x, y = a.next_step(), b.next_step()
    assert len(x) == 4 and x[0]["input_ids"].shape == (2, 64)
    for bx, by in zip(x, y):
        for k in bx:
            np.testing.assert_array_equal(bx[k], by[k])
