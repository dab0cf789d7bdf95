"""Several LoRA adapters over one base in one batch (gptj/model/multi_lora.py) against each adapter
alone: merged into a plain fp32 base, or attached to an int4 base."""

from __future__ import annotations

import pytest
import torch

from gptj.execution.inference.generation import generate
from gptj.execution.inference.request_engine import Request, RequestEngine
from gptj.execution.runtime.distributed import init_distributed
from gptj.model import GPTJ
from gptj.model.adapter_io import AdapterError, load_peft_adapter, save_peft_adapter
from gptj.model.lora import LoraAdapters, LoraSettings
from gptj.model.model import random_reader
from gptj.model.multi_lora import load_adapters
from tests.fixtures.distributed import run_distributed
from tests.fixtures.lora import seeded_adapter_dirs
from tests.fixtures.reference import TINY

# Different ranks, scalings and targets, so padding and missing targets are exercised.
SETTINGS = {
    "alpha": LoraSettings(rank=2, alpha=3.0),
    "beta": LoraSettings(rank=4, alpha=4.0, targets=("q", "v", "fc_out")),
    "gamma": LoraSettings(rank=3, alpha=9.0, targets=("k", "out_proj", "fc_in")),
}
PROMPTS = {"alpha": [5, 17, 99, 3], "beta": [1, 2, 3, 4, 5, 6], "gamma": [42, 8], None: [7, 7, 30]}
NEW_TOKENS = 8


def _base(quantize: str | None = None, ctx=None) -> GPTJ:
    if quantize is None:
        return GPTJ(TINY, ctx).init_weights(seed=3).eval()
    from gptj.model.quantized_linear import QuantSpec
    from gptj.model.quantized_model import quantize_from_reader

    return quantize_from_reader(TINY, None, torch.float32, "cpu", QuantSpec.parse(quantize, 32),
                                random_reader(TINY, 3)).eval()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Three PEFT directories with seeded non-zero factors (B = 0 would change nothing)."""
    return seeded_adapter_dirs(TINY, SETTINGS, 100, tmp_path_factory)


def _alone(directory: str | None, prompt: list[int], quantize: str | None) -> list[int]:
    """The single-adapter path: merged into plain weights, attached to quantized ones."""
    model = _base(quantize)
    if directory is not None:
        adapters = load_peft_adapter(directory, model)
        if quantize is None:
            adapters.merge_into(model)
    with torch.no_grad():
        return generate(model, [prompt], NEW_TOKENS, eos_token_id=-1)[0].token_ids


# The two ways of computing the deltas (gptj/model/multi_lora.py), forced by the cutoff: the dense
# path takes up to `dense_limit` adapters, the per-row gather more.
PATHS = {"dense": 8, "gather": 0}


def _mixed_batch(adapter_dirs, quantize: str | None, ctx=None, path: str = "dense") -> dict[str | None, list[int]]:
    model = _base(quantize, ctx)
    adapters = load_adapters(adapter_dirs, model, ctx)
    adapters.dense_limit = PATHS[path]
    engine = RequestEngine(model, max_batch_size=4, eos_token_id=None, adapters=adapters)
    # Prompts of different lengths, so rows are padded and each row's index must follow it.
    for name, prompt in PROMPTS.items():
        engine.add(Request(str(name), prompt, NEW_TOKENS, adapter=name))
    tokens: dict[str, list[int]] = {str(name): [] for name in PROMPTS}
    while engine.has_work:
        for event in engine.step():
            assert event.error is None, event.error
            if event.token is not None:
                tokens[event.request_id].append(event.token)
    return {name: tokens[str(name)] for name in PROMPTS}


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_mixed_batch_gives_each_adapter_its_own_output(adapter_dirs, quantize):
    mixed = _mixed_batch(adapter_dirs, quantize)
    alone = {name: _alone(adapter_dirs.get(name), prompt, quantize) for name, prompt in PROMPTS.items()}
    for name in PROMPTS:
        assert mixed[name] == alone[name], name
    # The adapters really change the output: each differs from the base on the same prompt.
    for name in SETTINGS:
        assert alone[name] != _alone(None, PROMPTS[name], quantize), name


def test_the_dense_and_the_gather_path_give_each_adapter_its_own_output(adapter_dirs):
    """Both paths against the same single-adapter reference (prefill and decode shapes, rows of
    the base, padded ranks, targets some adapters leave alone), and against each other."""
    alone = {name: _alone(adapter_dirs.get(name), prompt, None) for name, prompt in PROMPTS.items()}
    for path in PATHS:
        assert _mixed_batch(adapter_dirs, None, path=path) == alone, path
    model = _base()
    adapters = load_adapters(adapter_dirs, model)
    ids = torch.tensor([PROMPTS["alpha"], PROMPTS["beta"][:4], PROMPTS["gamma"] * 2, PROMPTS[None] + [1]])
    adapters.set_rows([adapters.index(name) for name in PROMPTS])
    logits = {}
    with torch.no_grad():
        for path, limit in PATHS.items():
            adapters.dense_limit = limit
            logits[path] = model.logits(ids)
    torch.testing.assert_close(logits["dense"], logits["gather"], rtol=1e-5, atol=1e-5)


def _tp_worker(rank, world_size, adapter_dirs):
    ctx, _ = init_distributed(tensor_parallel=world_size)
    return {path: _mixed_batch(adapter_dirs, None, ctx, path) for path in PATHS}


def test_at_tensor_parallel_2_a_mixed_batch_gives_the_single_process_tokens(adapter_dirs):
    """Both delta paths, the row-parallel targets' deltas joining each rank's partial sum."""
    ranks = run_distributed(_tp_worker, 2, adapter_dirs)
    single = _mixed_batch(adapter_dirs, None)
    assert ranks[0] == ranks[1] == {path: single for path in PATHS}


def test_after_a_step_other_forwards_of_the_model_see_the_base(adapter_dirs):
    model = _base()
    engine = RequestEngine(model, 2, None, adapters=load_adapters(adapter_dirs, model))
    engine.add(Request("a", PROMPTS["alpha"], 2, adapter="alpha"))
    engine.add(Request("b", PROMPTS["beta"], 2, adapter="beta"))
    engine.step()
    ids = torch.tensor([PROMPTS["alpha"], PROMPTS["beta"][:4]])
    with torch.no_grad():
        assert torch.equal(model.logits(ids), _base().logits(ids))


def test_an_unknown_adapter_and_one_that_does_not_fit_are_named(adapter_dirs, tmp_path):
    model = _base()
    engine = RequestEngine(model, 2, None, adapters=load_adapters(adapter_dirs, model))
    with pytest.raises(ValueError, match="adapter 'delta' is not loaded"):
        engine.add(Request("x", [1, 2], 2, adapter="delta"))
    wider = LoraAdapters(TINY.replace(hidden_size=128), LoraSettings(rank=2))
    bad = str(save_peft_adapter(wider, tmp_path / "wide", None))
    with pytest.raises(AdapterError, match="adapter 'wide' .* does not fit the base"):
        load_adapters({"alpha": adapter_dirs["alpha"], "wide": bad}, _base())


def _run(engine, requests) -> dict[str, list[int]]:
    for request in requests:
        engine.add(request)
    tokens = {r.request_id: [] for r in requests}
    while engine.has_work:
        for event in engine.step():
            assert event.error is None, event.error
            if event.token is not None:
                tokens[event.request_id].append(event.token)
    return tokens


@pytest.mark.parametrize("path", PATHS)
def test_adapters_added_and_removed_between_steps_keep_every_row_on_its_own(adapter_dirs, path):
    """Each change resizes the stacks (and the dense path's concatenated factors)."""
    from gptj.serving.adapter_slots import AdapterChangeError, AdapterSlots

    model = _base()
    engine = RequestEngine(model, 4, None, adapters=load_adapters({}, model))
    engine.adapters.dense_limit = PATHS[path]
    slots = AdapterSlots(engine, None, limit=3)
    for name in SETTINGS:  # alpha (rank 2), then larger ranks: the stacks grow as they come
        assert slots.load(name, adapter_dirs[name]) == {"loaded": name}
    refused = slots.load("delta", adapter_dirs["alpha"])
    assert isinstance(refused, AdapterChangeError) and refused.status == 400 and "--max-adapters 3" in str(refused)
    twice = slots.load("alpha", "/no/such/adapter")
    assert isinstance(twice, AdapterChangeError) and "already loaded" in str(twice)
    alone = {name: _alone(adapter_dirs.get(name), prompt, None) for name, prompt in PROMPTS.items()}
    mixed = _run(engine, [Request(str(n), p, NEW_TOKENS, adapter=n) for n, p in PROMPTS.items()])
    assert all(mixed[str(n)] == alone[n] for n in PROMPTS)

    # Unloading beta while it runs: it stays until its request finished, then goes.
    engine.add(Request("b", PROMPTS["beta"], NEW_TOKENS, adapter="beta"))
    tokens = [e.token for e in engine.step() if e.token is not None]
    assert slots.unload("beta", "job-1") is None and slots.settle() == {}
    assert engine.adapters.names == ["alpha", "beta", "gamma"]
    while engine.has_work:
        tokens += [e.token for e in engine.step() if e.token is not None]
        if engine.has_work:
            assert slots.settle() == {}
    assert tokens == alone["beta"] and slots.settle() == {"job-1": {"unloaded": "beta"}}
    assert engine.adapters.names == ["alpha", "gamma"]
    gone = slots.unload("beta", "job-2")
    assert isinstance(gone, AdapterChangeError) and gone.status == 404 and "'beta' is not loaded" in str(gone)
    bad = slots.load("beta", "/no/such/adapter")
    assert isinstance(bad, AdapterChangeError) and bad.status == 400 and "/no/such/adapter" in str(bad)

    # gamma moved down an index and beta's rank 4 is gone: the others still get their own deltas.
    assert engine.adapters.rank == 3
    kept = [n for n in PROMPTS if n != "beta"]
    mixed = _run(engine, [Request(str(n), PROMPTS[n], NEW_TOKENS, adapter=n) for n in kept])
    assert all(mixed[str(n)] == alone[n] for n in kept)
