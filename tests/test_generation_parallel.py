"""Tensor-parallel generation (2 gloo ranks) gives the tokens of a single process."""

from __future__ import annotations

from gptj.execution.inference.generation import generate
from gptj.execution.runtime.distributed import init_distributed
from tests.fixtures.distributed import run_distributed
from tests.fixtures.generation import PROMPTS, reference_pair

RUNS = [
    dict(max_new_tokens=10, eos_token_id=None),
    dict(max_new_tokens=10, eos_token_id=None, temperature=0.8, top_k=30, top_p=0.95, seed=4),
    dict(max_new_tokens=10, eos_token_id=17, batch_size=2, temperature=1.0, seed=2),
]


def _generate_all(ctx=None):
    _, model = reference_pair(seed=2, ctx=ctx)
    return [[(r.token_ids, r.finish_reason) for r in generate(model, PROMPTS, **kw)] for kw in RUNS]


def _tp_worker(rank, world_size):
    ctx, _ = init_distributed(tensor_parallel=world_size)
    return _generate_all(ctx)


def test_tensor_parallel_generation_equals_single_process():
    single = _generate_all()
    ranks = run_distributed(_tp_worker, 2)
    assert ranks[0] == ranks[1] == single
