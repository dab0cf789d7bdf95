"""The training loop: schedule, replicas x TP equal to one process, fp16 loss scaling, faults."""

from __future__ import annotations

import math

import pytest
import torch

from gptj.execution.training import checkpoint as ckpt
from gptj.execution.training.loop import TrainingDiverged, learning_rate, train
from tests.fixtures.distributed import run_distributed
from tests.fixtures.training import read_metrics, small_config


def test_learning_rate_schedule_by_hand():
    assert learning_rate(0, 1.0, 10, warmup_steps=4) == pytest.approx(0.25)
    assert learning_rate(3, 1.0, 10, warmup_steps=4) == pytest.approx(1.0)
    assert learning_rate(7, 1.0, 10, warmup_steps=4, decay="constant") == 1.0
    # after warmup: progress = (step - 4) / 6
    assert learning_rate(7, 2.0, 10, warmup_steps=4, decay="linear") == pytest.approx(2.0 * (1 - 3 / 6))
    assert learning_rate(7, 2.0, 10, 4, "cosine") == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(10, 2.0, 10, 4, "cosine", min_lr_ratio=0.1) == pytest.approx(0.2)
    assert learning_rate(4, 2.0, 10, 4, "linear", min_lr_ratio=0.1) == pytest.approx(2.0)


def _train_on_ranks(rank, world_size, output_dir, tensor_parallel):
    import shutil

    import torch.distributed as dist

    from gptj.model.hf import gather_hf_tensors

    checkpoints = {"checkpoint.every": 2, "checkpoint.keep": 5, "checkpoint.at_end": True}
    config = small_config(output_dir, **{"parallel.tensor_parallel": tensor_parallel,
                                         "eval.at_end": True, **checkpoints})
    result = train(config)
    weights = gather_hf_tensors(result.model)
    # Interrupted after step 2: resume from the per-rank shards of that checkpoint.
    dist.barrier()
    if rank == 0:
        for step in (4, 5):
            shutil.rmtree(ckpt.step_dir(ckpt.checkpoint_root(output_dir), step))
    dist.barrier()
    resumed = train(small_config(output_dir, resume=True, **{
        "parallel.tensor_parallel": tensor_parallel, **checkpoints}))
    resumed_weights = gather_hf_tensors(resumed.model)
    return {"losses": result.losses, "eval": result.eval, "resumed_losses": resumed.losses,
            "resume_equal": all(torch.equal(resumed_weights[k], v) for k, v in weights.items()),
            "weights": {k: weights[k] for k in ("transformer.h.0.attn.q_proj.weight", "lm_head.bias",
                                                "transformer.h.1.mlp.fc_out.bias")}}


def test_two_replicas_times_two_tp_equal_one_process_and_resume(tmp_path):
    reference = train(small_config(tmp_path / "one", **{"eval.at_end": True}))
    results = run_distributed(_train_on_ranks, 4, str(tmp_path / "four"), 2)
    from gptj.model.hf import gather_hf_tensors

    ref_weights = gather_hf_tensors(reference.model)
    assert len(reference.losses) == 5
    for rank, res in enumerate(results):
        assert res["losses"] == pytest.approx(reference.losses, abs=1e-5), rank
        for name, value in res["weights"].items():
            torch.testing.assert_close(value, ref_weights[name], atol=2e-5, rtol=1e-4)
        # each replica scored half of the rows; the summed counts equal the single process's
        assert res["eval"] == reference.eval
        assert res["resumed_losses"] == res["losses"][2:] and res["resume_equal"], rank
    assert reference.losses[-1] < reference.losses[0]
    metrics = read_metrics(tmp_path / "four")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in metrics] == pytest.approx(reference.losses, abs=1e-5)


def test_fp16_overflow_skips_step_and_backs_off(tmp_path):
    # A huge initial scale overflows fp16 gradients: those steps must change nothing and
    # halve (here: divide by 16) the scale until the gradients fit.
    config = small_config(tmp_path, **{"training.precision": "fp16", "training.steps": 6,
                                       "training.loss_scale.init_scale": 2.0**24,
                                       "training.loss_scale.backoff_factor": 1 / 16,
                                       "training.max_bad_steps": 2})
    result = train(config)
    metrics = read_metrics(tmp_path)
    assert metrics[0]["skipped"] and metrics[0]["loss_scale"] == 2.0**24
    assert metrics[1]["loss_scale"] == 2.0**20  # backed off after the first overflow
    scales = [m["loss_scale"] for m in metrics]
    for before, after, m in zip(scales, scales[1:], metrics):
        assert after == (before / 16 if m["skipped"] else before)
    assert any(not m["skipped"] for m in metrics)
    assert result.skipped_steps == sum(m["skipped"] for m in metrics) >= 2
    assert all(math.isfinite(m["loss"]) for m in metrics)

    # A run made only of overflowing steps leaves the weights exactly as initialised.
    fresh = train(small_config(tmp_path / "fresh", **{"training.steps": 1, "optimizer.lr": 1e-12,
                                                      "training.precision": "fp16"}))
    frozen = train(small_config(tmp_path / "frozen", **{
        "training.precision": "fp16", "training.steps": 2, "training.loss_scale.init_scale": 2.0**60,
        "training.max_bad_steps": 3}))
    assert all(m["skipped"] for m in read_metrics(tmp_path / "frozen"))
    initial = type(fresh.model)(fresh.model.config, dtype=torch.float16).init_weights(0)
    for (name, a), b in zip(frozen.model.named_parameters(), initial.parameters()):
        assert torch.equal(a, b), name


def test_nonfinite_steps_in_a_row_stop_with_checkpoint_intact(tmp_path, monkeypatch):
    from gptj.model import GPTJ

    calls = {"n": 0}
    original = GPTJ.token_losses

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        losses = original(self, *args, **kwargs)
        return losses * float("nan") if calls["n"] > 6 else losses  # 2 micro-batches per step

    monkeypatch.setattr(GPTJ, "token_losses", poisoned)
    config = small_config(tmp_path, **{"training.steps": 10, "checkpoint.every": 2,
                                       "training.max_bad_steps": 3})
    with pytest.raises(TrainingDiverged, match="3 steps in a row") as err:
        train(config)
    root = ckpt.checkpoint_root(tmp_path)
    newest = ckpt.latest_checkpoint(root)
    assert newest is not None and str(newest) in str(err.value)
    assert ckpt.read_meta(newest)["step"] == 2  # step 4 was a bad one: no checkpoint after it
    metrics = read_metrics(tmp_path)
    assert [m["skipped"] for m in metrics] == [False, False, False, True, True, True]
    assert metrics[3]["skip_reason"] == "non-finite loss"


def test_offload_streaming_and_recompute_change_no_number(tmp_path):
    plain = train(small_config(tmp_path / "plain", **{"training.steps": 3}))
    offloaded = train(small_config(tmp_path / "offloaded", **{
        "training.steps": 3, "optimizer.offload": True, "model.stream_block_weights": True,
        "model.recompute_blocks": True, "checkpoint.at_end": True}))
    # The same operations in the same order on the same device: bit-identical (tests/test_offload.py).
    assert offloaded.losses == plain.losses
    for (name, a), b in zip(plain.model.named_parameters(), offloaded.model.parameters()):
        assert torch.equal(a, b), name
    assert ckpt.read_meta(ckpt.latest_checkpoint(ckpt.checkpoint_root(tmp_path / "offloaded")))["step"] == 3


def test_eval_sources_default_to_the_task_validation_splits(tmp_path):
    import gptj.data as datalib
    from gptj.execution.training.loop import eval_sources

    task = datalib.load_task("mnli")
    default = small_config(tmp_path)
    assert eval_sources(default, task) == [
        ("validation_matched", "bundled:mnli_sample", "validation_matched"),
        ("validation_mismatched", "bundled:mnli_sample", "validation_mismatched")]
    dev = tmp_path / "dev.jsonl"
    dev.write_text("")
    several = small_config(tmp_path, **{"data.eval_datasets": [
        str(dev), "bundled:mnli_sample@validation_mismatched", "hf:glue/mnli"]})
    assert eval_sources(several, task) == [
        ("dev", str(dev), None),
        ("bundled:mnli_sample@validation_mismatched", "bundled:mnli_sample", "validation_mismatched"),
        ("hf:glue/mnli@validation_matched", "hf:glue/mnli", "validation_matched"),
        ("hf:glue/mnli@validation_mismatched", "hf:glue/mnli", "validation_mismatched")]


@pytest.mark.parametrize("export_dtype, dtype", [("model", torch.float32), ("bf16", torch.bfloat16)])
def test_export_dtype_casts_the_exported_weights(tmp_path, export_dtype, dtype):
    from safetensors.torch import load_file

    from gptj.model.hf import gather_hf_tensors

    result = train(small_config(tmp_path, **{"training.steps": 1, "checkpoint.export_hf": True,
                                             "checkpoint.export_dtype": export_dtype}))
    exported = load_file(str(result.hf_dir / "model.safetensors"))
    trained = gather_hf_tensors(result.model)
    assert set(trained) <= set(exported)
    for name, value in trained.items():
        assert exported[name].dtype == dtype, name
        assert torch.equal(exported[name], value.to(dtype)), name


def test_tensorboard_scalars_are_the_logged_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(small_config(tmp_path, **{"training.steps": 2, "logging.tensorboard": True}))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    logged = read_metrics(tmp_path)
    assert [s for s, _ in losses] == [m["step"] for m in logged]
    assert [v for _, v in losses] == pytest.approx([m["loss"] for m in logged], rel=1e-6)
