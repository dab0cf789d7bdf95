"""ShardedAdamW against torch.optim.AdamW and against itself unsharded; loss scaling; state."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
import torch.distributed as dist

from gptj.execution.training.loss_scaling import DynamicLossScaler
from gptj.execution.training.optimizer import ShardedAdamW
from gptj.model import GPTJ, ParallelContext
from gptj.model.hf import gather_hf_tensors
from tests.fixtures.distributed import run_distributed
from tests.fixtures.reference import TINY

LR = 1e-3
STEPS = 3


def _batch(rows: int = 4, seq: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY.vocab_size, (rows, seq + 1), generator=gen)
    mask = (torch.rand(rows, seq, generator=gen) > 0.3).float()  # uneven token counts per row
    return ids[:, :-1], ids[:, 1:], mask


def _backward(model: GPTJ, ids, labels, mask, token_count: float) -> None:
    """The training-loop contract: this shard's summed token loss / the global token count."""
    losses = model.token_losses(ids, labels)
    ((losses * mask).sum() / token_count).backward()


def _torch_reference(model: GPTJ, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "ln_" not in n]
    plain = [p for n, p in model.named_parameters() if n.endswith("bias") or "ln_" in n]
    # The same torch implementation ShardedAdamW runs (the fused kernel), so equality is exact.
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}], lr=LR,
        fused=True,
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_equals_torch_adamw_without_replicas(weight_decay):
    model = GPTJ(TINY).init_weights(seed=1)
    ref = copy.deepcopy(model)
    opt = ShardedAdamW(model, lr=LR, weight_decay=weight_decay, max_grad_norm=None)
    ref_opt = _torch_reference(ref, weight_decay)
    ids, labels, mask = _batch()
    for step in range(STEPS):
        for m in (model, ref):
            _backward(m, ids, labels, mask, mask.sum())
        result = opt.step(LR)
        ref_opt.step()
        ref_opt.zero_grad()
        assert not result.skipped and result.reason is None
        assert all(p.grad is None or not p.grad.any() for p in model.parameters()), f"step {step}"
    # The fused kernel runs one flat buffer here and one tensor per parameter in the
    # reference, split over threads: an element in a vector tail on one side may round its
    # last bit differently, and three steps compound it to a few fp32 ulps. A real error (e.g.
    # decay applied to a bias: lr * wd = 1e-4 relative) is hundreds of times larger.
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=5e-7, atol=1e-12, msg=name)


def test_clipping_equals_clip_grad_norm():
    model = GPTJ(TINY).init_weights(seed=1)
    ref = copy.deepcopy(model)
    opt = ShardedAdamW(model, lr=LR, weight_decay=0.1, max_grad_norm=0.05)
    ref_opt = _torch_reference(ref, 0.1)
    ids, labels, mask = _batch()
    for _ in range(STEPS):
        for m in (model, ref):
            _backward(m, ids, labels, mask, mask.sum())
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05).item()
        assert ref_norm > 0.05  # clipping is active
        assert opt.step(LR).grad_norm == pytest.approx(ref_norm, rel=1e-6)
        ref_opt.step()
        ref_opt.zero_grad()
    # torch sums per-tensor fp32 norms, this sums in fp64: the clip factors differ in the last
    # bit, so weights agree to one fp32 ulp.
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-7, msg=name)


def test_biases_and_layernorms_are_not_decayed():
    ids, labels, mask = _batch()
    after = {}
    for wd in (0.0, 0.5):
        model = GPTJ(TINY).init_weights(seed=1)
        opt = ShardedAdamW(model, lr=0.1, weight_decay=wd, max_grad_norm=None)
        _backward(model, ids, labels, mask, mask.sum())
        opt.step(0.1)
        after[wd] = dict(model.named_parameters())
    for name, p in after[0.0].items():
        same = torch.equal(p, after[0.5][name])
        exempt = name.endswith("bias") or "ln_" in name
        assert same == exempt, f"{name}: decayed={not same}, expected decayed={not exempt}"


# ---- replicas and tensor parallel --------------------------------------------------------------


# Adam divides by sqrt(v): on elements with near-zero gradients, fp32 summation order (one
# batch vs. per-replica micro-batches) changes the update by a fraction of lr. A smaller lr keeps
# that noise under the 1e-6 tolerance while any wrong slice still moves weights by ~lr.
SHARD_LR = 1e-4


def _sharded_runs(rank, world):
    """Four layouts of the same 4 processes, each trained 3 steps on one global batch."""
    pair = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    layouts = {
        "t1r2": ParallelContext(1, 2, rank % 2, None, pair[rank // 2]),
        "t1r4": ParallelContext.from_process_group(1),
        "t2r2": ParallelContext.from_process_group(2),
        "t4r1": ParallelContext.from_process_group(4),
    }
    ids, labels, mask = _batch()
    out = {}
    for key, ctx in layouts.items():
        model = GPTJ(TINY, ctx).init_weights(seed=1)
        opt = ShardedAdamW(model, lr=SHARD_LR, weight_decay=0.1, max_grad_norm=0.05)
        rows = ids.shape[0] // ctx.replicas
        mine = slice(ctx.replica_rank * rows, (ctx.replica_rank + 1) * rows)
        norms = []
        for _ in range(STEPS):
            for row in range(mine.start, mine.stop):  # one micro-batch per row: accumulation
                one = slice(row, row + 1)
                _backward(model, ids[one], labels[one], mask[one], mask.sum())
            norms.append(opt.step(SHARD_LR).grad_norm)
        out[key] = {"norms": norms, "weights": gather_hf_tensors(model)}
    return out


def test_sharded_equals_single_process():
    model = GPTJ(TINY).init_weights(seed=1)
    opt = ShardedAdamW(model, lr=SHARD_LR, weight_decay=0.1, max_grad_norm=0.05)
    ids, labels, mask = _batch()
    norms = []
    for _ in range(STEPS):
        _backward(model, ids, labels, mask, mask.sum())
        norms.append(opt.step(SHARD_LR).grad_norm)
    assert min(norms) > 0.05  # clipping is active in every step
    expected = gather_hf_tensors(model)
    initial = gather_hf_tensors(GPTJ(TINY).init_weights(seed=1))
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    assert moved > 100 * 1e-6  # the tolerance below is far smaller than the updates

    results = run_distributed(_sharded_runs, 4)
    for rank, per_layout in enumerate(results):
        for key, got in per_layout.items():
            assert got["norms"] == pytest.approx(norms, rel=1e-6), f"{key} rank {rank}"
            for name, ref in expected.items():
                diff = (got["weights"][name] - ref).abs().max().item()
                assert diff <= 1e-6, f"{key} rank {rank} {name}: max diff {diff}"


# ---- offload -----------------------------------------------------------------------------------


def test_offload_is_identical_and_reports_host():
    ids, labels, mask = _batch()
    models = []
    for offload in (False, True):
        model = GPTJ(TINY).init_weights(seed=1)
        opt = ShardedAdamW(model, lr=LR, weight_decay=0.1, max_grad_norm=0.05, offload=offload)
        for _ in range(STEPS):
            _backward(model, ids, labels, mask, mask.sum())
            opt.step(LR)
        report = opt.memory_report()
        location = "host" if offload else "device"
        assert report["master_location"] == report["optimizer_state_location"] == location
        n = sum(p.numel() for p in model.parameters())
        assert report["optimizer_state_bytes"] >= 8 * n
        # fp32 weights on the optimizer's device are their own master; offloaded, a host copy.
        assert report["master_bytes"] == (4 * n if offload else 0)
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name


# ---- loss scaling and non-finite gradients ---------------------------------------------------


def _fill_grads(model: GPTJ, scale: float = 1.0, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3 * scale).to(p.dtype)


def test_fp16_overflow_skips_and_backs_off():
    model = GPTJ(TINY, dtype=torch.float16).init_weights(seed=1)
    opt = ShardedAdamW(model, lr=LR)
    scaler = DynamicLossScaler(init_scale=1024.0, growth_interval=2)
    before = [p.detach().clone() for p in model.parameters()]
    _fill_grads(model, scaler.scale)
    model.blocks[0].in_proj_weight.grad[3, 5] = float("inf")
    result = opt.step(LR, loss_scale=scaler.scale)
    scaler.update(result.skipped)
    assert result.skipped and result.reason == "overflow"
    assert scaler.scale == 512.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(not p.grad.any() for p in model.parameters())
    for step in range(2):  # growth_interval clean steps double the scale
        _fill_grads(model, scaler.scale, seed=step + 1)
        result = opt.step(LR, loss_scale=scaler.scale)
        scaler.update(result.skipped)
        assert not result.skipped
    assert scaler.scale == 1024.0
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_scaler_limits_and_state():
    scaler = DynamicLossScaler(init_scale=4.0, growth_interval=3, min_scale=1.0)
    for _ in range(5):
        scaler.update(True)
    assert scaler.scale == 1.0
    scaler.update(False)
    scaler.update(False)
    copy_ = DynamicLossScaler(growth_interval=3)
    copy_.load_state_dict(scaler.state_dict())
    copy_.update(False)  # the third clean step since the last change
    assert copy_.scale == 2.0
    off = DynamicLossScaler.for_dtype(torch.bfloat16)
    off.update(True)
    assert off.scale == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_gradient_skips(dtype):
    model = GPTJ(TINY, dtype=dtype).init_weights(seed=1)
    opt = ShardedAdamW(model, lr=LR)
    before = [p.detach().clone() for p in model.parameters()]
    _fill_grads(model)
    model.ln_f.bias.grad[0] = float("nan")
    result = opt.step(LR)
    assert result.skipped and result.reason == "nan"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_loss_scale_is_divided_out():
    models = [GPTJ(TINY).init_weights(seed=1) for _ in range(2)]
    opts = [ShardedAdamW(m, lr=LR, max_grad_norm=0.05) for m in models]
    _fill_grads(models[0], 1.0)
    _fill_grads(models[1], 256.0)
    norms = [opts[0].step(LR).grad_norm, opts[1].step(LR, loss_scale=256.0).grad_norm]
    assert norms[0] == norms[1]
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


# ---- state -------------------------------------------------------------------------------------


def test_state_dict_round_trip(tmp_path):
    ids, labels, mask = _batch()

    def train(model, opt, steps):
        for _ in range(steps):
            _backward(model, ids, labels, mask, mask.sum())
            opt.step(LR)

    model = GPTJ(TINY).init_weights(seed=1)
    opt = ShardedAdamW(model, lr=LR, weight_decay=0.1)
    train(model, opt, 3)
    safetensors.torch.save_file(opt.state_dict(), tmp_path / "opt.safetensors")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, 2)

    resumed = GPTJ(TINY).init_weights(seed=7)  # different weights: the load must restore them
    resumed.load_state_dict(weights)
    resumed_opt = ShardedAdamW(resumed, lr=LR, weight_decay=0.1)
    resumed_opt.load_state_dict(safetensors.torch.load_file(tmp_path / "opt.safetensors"))
    train(resumed, resumed_opt, 2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name

    other = ShardedAdamW(GPTJ(TINY.replace(hidden_size=32)).init_weights(), lr=LR)
    with pytest.raises(ValueError, match=r"decay\.master.*expected shape"):
        other.load_state_dict(opt.state_dict())
    state = opt.state_dict()
    del state["no_decay.exp_avg"]
    with pytest.raises(ValueError, match="no_decay.exp_avg"):
        opt.load_state_dict(state)


# ---- memory --------------------------------------------------------------------------------------

# Wide enough that the optimizer's buffers dwarf the allocator's noise (~17 M parameters).
MEMORY_CONFIG = TINY.replace(vocab_size=4096, hidden_size=512, num_heads=8, rotary_dim=32, num_layers=4)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _optimizer_bytes(rank, world, dtype_name):
    """Resident bytes a ShardedAdamW adds to its model once a step has run, on this rank."""
    from gptj.execution.training import optimizer as optim

    dtype = getattr(torch, dtype_name)
    ctx = ParallelContext.from_process_group(1) if world > 1 else ParallelContext()
    model = GPTJ(MEMORY_CONFIG, ctx, dtype=dtype).init_weights(seed=1)
    ids = torch.randint(0, MEMORY_CONFIG.vocab_size, (1, 9), generator=torch.Generator().manual_seed(rank))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()  # a step's own workspace, before the baseline
    for p in model.parameters():
        p.grad = None
    before = _rss()
    opt = optim.ShardedAdamW(model, lr=LR, max_grad_norm=1.0)
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    opt.step(LR)
    scratch = 0 if opt.scratch is None else opt.scratch.numel() * 4
    return {"measured": _rss() - before, "params": sum(p.numel() for p in model.parameters()),
            "scratch": scratch}


@pytest.mark.parametrize("dtype, replicas", [("float32", 1), ("bfloat16", 1), ("float32", 2), ("bfloat16", 2)])
def test_bytes_per_parameter_are_the_documented_formula(dtype, replicas, monkeypatch):
    """Gradients in the model dtype + fp32 state / r (moments, and a master copy unless the
    weights are fp32), + the one fp32 conversion chunk of low-precision gradients."""
    # A fixed threshold: every block over 1 MiB is mapped on its own and returned when freed, so
    # the resident size counts what is held, not a step's temporaries the heap kept.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    results = run_distributed(_optimizer_bytes, replicas, dtype)
    weight_bytes = 4 if dtype == "float32" else 2
    state = 8 + (0 if dtype == "float32" else 4)
    for got in results:
        expected = got["params"] * (weight_bytes + state / replicas) + got["scratch"]
        assert abs(got["measured"] - expected) < 0.05 * expected, (got, expected)


def test_low_precision_gradients_convert_chunk_by_chunk(monkeypatch):
    """bf16 gradients reach AdamW through a small reused fp32 buffer: the same update as one
    conversion of the whole slice (every chunk at the same step count, the count moved once)."""
    from gptj.execution.training import optimizer as optim

    results = []
    for chunk in (optim.CHUNK, 3 * optim.NORM_ROW):  # one chunk, and several
        monkeypatch.setattr(optim, "CHUNK", chunk)
        model = GPTJ(TINY, dtype=torch.bfloat16).init_weights(seed=1)
        opt = optim.ShardedAdamW(model, lr=LR, weight_decay=0.1, max_grad_norm=0.05)
        assert opt.scratch.numel() == min(chunk, max(g.shard for g in opt.groups))
        for step in range(STEPS):
            _fill_grads(model, seed=step)
            assert not opt.step(LR).skipped
        results.append((opt.state_dict(), [p.detach().clone() for p in model.parameters()]))
    (state, weights), (chunked_state, chunked_weights) = results
    assert all(torch.equal(a, b) for a, b in zip(weights, chunked_weights))
    for key, value in state.items():
        assert torch.equal(value, chunked_state[key]), key
    assert state["decay.step"].item() == STEPS
