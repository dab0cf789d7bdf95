"""Hugging Face checkpoints: per-rank slice loading, export round trip, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from gptj.model import ParallelContext
from gptj.model.hf import CheckpointError, export_hf, load_pretrained
from gptj.model.sharding import hf_shapes
from tests.fixtures.distributed import run_distributed
from tests.fixtures.reference import TINY, hf_model

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 0, 100], [1, 2, 3, 4, 5, 6, 7, 8]])


def _save_hf(tmp_path: Path, **kwargs) -> tuple[Path, transformers.GPTJForCausalLM]:
    model = hf_model(TINY)
    directory = tmp_path / "hf-source"
    model.save_pretrained(directory, **kwargs)
    return directory, model


def test_load_and_export_round_trip_single_process(tmp_path):
    source, hf = _save_hf(tmp_path)
    model, _ = load_pretrained(source)
    with torch.no_grad():
        ours = model.logits(IDS)
        ref = hf(IDS).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)

    exported = export_hf(model, tmp_path / "export")
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = transformers.GPTJForCausalLM.from_pretrained(exported).eval()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, ref)
    assert not (tmp_path / "export.tmp").exists()


def test_export_in_several_shards_writes_an_index(tmp_path):
    source, hf = _save_hf(tmp_path)
    model, _ = load_pretrained(source)
    exported = export_hf(model, tmp_path / "export", max_shard_bytes=20_000)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.GPTJForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, hf(IDS).logits)


def _load_tp_and_export(rank, world, source: str, export_dir: str):
    ctx = ParallelContext.from_process_group(world)
    model, reader = load_pretrained(source, ctx)
    with torch.no_grad():
        logits = model.logits(IDS)
    export_hf(model, export_dir)
    return {"requests": reader.requests, "logits": logits}


def test_tensor_parallel_ranks_read_only_their_slices_and_export_matches(tmp_path):
    source, hf = _save_hf(tmp_path)
    export_dir = tmp_path / "export"
    world = 2
    results = run_distributed(_load_tp_and_export, world, str(source), str(export_dir))
    shapes = hf_shapes(TINY)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    with torch.no_grad():
        ref = hf(IDS).logits
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["logits"], ref, rtol=0, atol=1e-5)
        read_elements = 0
        for name, dim, start, stop in result["requests"]:
            shape = shapes[name]
            if dim is None:  # replicated: LayerNorms and fc_out's bias only
                assert "ln_" in name or name.endswith("fc_out.bias"), name
                read_elements += torch.Size(shape).numel()
                continue
            part = -(-shape[dim] // world)
            assert start == min(rank * part, shape[dim]), (name, start)
            assert stop == min(start + part, shape[dim]), (name, stop)
            read_elements += torch.Size(shape).numel() // shape[dim] * (stop - start)
        # each rank reads about half of the sharded bytes, never the whole file
        assert read_elements < 0.55 * total, read_elements / total
    reloaded = transformers.GPTJForCausalLM.from_pretrained(export_dir).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, ref)


def test_legacy_bin_checkpoint_loads_without_unpickling_code(tmp_path):
    source = tmp_path / "bin-source"
    hf = hf_model(TINY)
    source.mkdir()
    (source / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    torch.save(hf.state_dict(), source / "pytorch_model.bin")
    model, _ = load_pretrained(source)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(IDS), hf(IDS).logits, rtol=0, atol=1e-5)


def _write_checkpoint(directory: Path, state: dict, config: dict):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    state = hf_model(TINY).state_dict()
    del state["transformer.h.1.mlp.fc_in.bias"]
    _write_checkpoint(tmp_path / "ckpt", state, TINY.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"missing tensor transformer\.h\.1\.mlp\.fc_in\.bias"):
        load_pretrained(tmp_path / "ckpt")


def test_shape_mismatch_names_tensor_expected_and_found(tmp_path):
    state = hf_model(TINY).state_dict()
    state["lm_head.bias"] = torch.zeros(100)
    _write_checkpoint(tmp_path / "ckpt", state, TINY.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"lm_head\.bias has shape \(100,\), expected \(101,\)"):
        load_pretrained(tmp_path / "ckpt")


def test_unrelated_architecture_is_rejected(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match=r"not a GPT-J checkpoint: config\.json has model_type 'gpt2'"):
        load_pretrained(tmp_path / "gpt2")


def test_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"holds no \*\.safetensors or \*\.bin weight files"):
        load_pretrained(tmp_path / "no-weights")
