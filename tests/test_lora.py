"""LoRA: fresh adapters change nothing, gradients equal PEFT's, tensor parallel x replicas equal
one process, resume is bit-identical, the frozen base stays bit-identical, exports load in PEFT
and transformers with the same logits, and a LoRA run learns a small task."""

from __future__ import annotations

import json
import random
import shutil

import peft
import pytest
import torch
import transformers

from gptj.execution.training import checkpoint as ckpt
from gptj.execution.training.loop import train
from gptj.model import GPTJ
from gptj.model.adapter_io import PEFT_TARGET, AdapterError, load_peft_adapter
from gptj.model.hf import export_hf, gather_hf_tensors
from gptj.model.lora import LoraAdapters, LoraSettings
from tests.fixtures.distributed import run_distributed
from tests.fixtures.reference import TINY, hf_model, state_reader
from tests.fixtures.training import small_config

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 0, 100], [1, 2, 3, 4, 5, 6, 7, 8]])
LABELS = torch.roll(IDS, -1, dims=1)
LORA = {"lora.rank": 4, "optimizer.lr": 2e-2}


def _ours_and_hf(settings: LoraSettings):
    hf = hf_model(TINY)
    model = GPTJ(TINY)
    model.load_shards(state_reader(hf.state_dict()))
    adapters = LoraAdapters(TINY, settings).init_weights(seed=1).attach(model)
    return model, adapters, hf


def test_fresh_adapters_give_exactly_the_base_logits():
    model, adapters, hf = _ours_and_hf(LoraSettings(rank=4))
    with torch.no_grad():
        base = hf(IDS).logits
        ours = model.logits(IDS)
    torch.testing.assert_close(ours, base, rtol=0, atol=1e-5)
    adapters.detach_from(model)
    with torch.no_grad():
        assert torch.equal(model.logits(IDS), ours)  # B = 0: the adapters add exact zeros


def test_adapter_gradients_equal_peft_on_the_hf_model():
    settings = LoraSettings(rank=4, alpha=6.0, targets=("q", "v", "out_proj", "fc_in", "fc_out"))
    model, adapters, hf = _ours_and_hf(settings)
    with torch.no_grad():  # non-zero B so that every factor gets a gradient
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    lora_config = peft.LoraConfig(r=4, lora_alpha=6.0, lora_dropout=0.0,
                                  target_modules=[PEFT_TARGET[t] for t in settings.targets])
    reference = peft.get_peft_model(hf, lora_config)
    ours_full = adapters.gather_peft()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(ours_full[_bare(name)])
    model.loss(IDS, LABELS).backward()
    logits = reference(input_ids=IDS).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), LABELS.flatten()).backward()
    grads = adapters.gather_peft(grads=True)
    checked = 0
    for name, p in reference.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(grads[_bare(name)], p.grad, rtol=0, atol=1e-5)
            checked += 1
    assert checked == 2 * 5 * TINY.num_layers
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _bare(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".default", "")


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if ".lora." not in k}


def test_resume_is_bit_identical_and_the_base_stays_frozen(tmp_path):
    updates = {**LORA, "lora.dropout": 0.1, "model.recompute_blocks": True, "training.steps": 4,
               "checkpoint.every": 2, "checkpoint.keep": 5, "checkpoint.at_end": True}
    full = train(small_config(tmp_path, **updates))
    fresh = GPTJ(full.model.config).init_weights(seed=0)
    for name, value in _base_weights(fresh).items():
        assert torch.equal(dict(full.model.named_parameters())[name], value), name
    assert not any(p.requires_grad for n, p in full.model.named_parameters() if ".lora." not in n)
    trained = {k: v.detach().clone() for k, v in full.adapters.named_parameters()}
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith("lora_B"))

    # A checkpoint holds the adapters and their optimizer state only.
    from safetensors import safe_open
    newest = ckpt.latest_checkpoint(ckpt.checkpoint_root(tmp_path))
    with safe_open(str(ckpt.rank_file(newest, 0)), "pt") as f:
        models = [k for k in f.keys() if k.startswith("model.")]  # noqa: SIM118
    assert models and all(".lora_" in k for k in models)

    shutil.rmtree(ckpt.step_dir(ckpt.checkpoint_root(tmp_path), 4))
    resumed = train(small_config(tmp_path, resume=True, **updates))
    assert resumed.losses == full.losses[2:]
    for name, p in resumed.adapters.named_parameters():
        assert torch.equal(p, trained[name]), name

    with pytest.raises(ckpt.CheckpointLoadError, match="holds adapters for base model 'random:tiny:init_seed=0'"):
        train(small_config(tmp_path, resume=True, **{**updates, "model.init_seed": 1}))
    with pytest.raises(ckpt.CheckpointLoadError, match="from a LoRA run, this run is full fine-tuning"):
        train(small_config(tmp_path, resume=True, **{**updates, "lora.rank": 0}))


def _lora_on_ranks(rank, world_size, output_dir):
    config = small_config(output_dir, **{**LORA, "parallel.tensor_parallel": 2, "training.steps": 3})
    result = train(config)
    return {"losses": result.losses, "adapters": result.adapters.gather_peft(),
            "base": gather_hf_tensors(result.model)}


def test_two_tp_times_two_replicas_equal_one_process(tmp_path):
    reference = train(small_config(tmp_path / "one", **{**LORA, "training.steps": 3}))
    ref_adapters = reference.adapters.gather_peft()
    ref_base = gather_hf_tensors(reference.model)
    results = run_distributed(_lora_on_ranks, 4, str(tmp_path / "four"))
    assert reference.losses[-1] < reference.losses[0]
    for rank, res in enumerate(results):
        assert res["losses"] == pytest.approx(reference.losses, abs=1e-5), rank
        for name, value in ref_adapters.items():
            torch.testing.assert_close(res["adapters"][name], value, atol=2e-5, rtol=1e-4, msg=name)
        for name, value in ref_base.items():
            assert torch.equal(res["base"][name], value), name


def test_exports_load_in_peft_and_transformers_with_equal_logits(tmp_path):
    from gptj.execution.inference.pipelines import load_model_and_tokenizer

    base_model = GPTJ(_vocab_matched()).init_weights(seed=3)
    base_dir = export_hf(base_model, tmp_path / "base")
    updates = {**LORA, "model.name_or_path": str(base_dir), "model.shape": {}, "training.steps": 3,
               "checkpoint.export_hf": True, "data.tokenizer": "bundled:tiny"}
    result = train(small_config(tmp_path / "run", **updates))
    adapter_dir, merged_dir = result.adapter_dir, result.hf_dir
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 0, 100, 7, 9]])
    ours, _ = load_model_and_tokenizer(str(base_dir), tokenizer="bundled:tiny")
    adapters = load_peft_adapter(adapter_dir, ours)
    hf_base = transformers.GPTJForCausalLM.from_pretrained(base_dir).eval()
    reference = peft.PeftModel.from_pretrained(hf_base, str(adapter_dir)).eval()
    merged = transformers.GPTJForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        with_adapter = ours.logits(ids)
        torch.testing.assert_close(reference(input_ids=ids).logits, with_adapter, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter, rtol=0, atol=1e-5)
        adapters.detach_from(ours)
        assert (ours.logits(ids) - with_adapter).abs().max() > 1e-3  # the adapter does change them
        served, _ = load_model_and_tokenizer(str(base_dir), tokenizer="bundled:tiny", adapter=str(adapter_dir))
        torch.testing.assert_close(served.logits(ids), with_adapter, rtol=0, atol=1e-5)

    # The command line serves base + adapter exactly as the merged export.
    import gptj.commands.generate as run_inference

    outputs = {}
    for name, args in (("adapter", ["--model", str(base_dir), "--adapter", str(adapter_dir)]),
                       ("merged", ["--model", str(merged_dir)])):
        out = tmp_path / f"{name}.jsonl"
        assert run_inference.main([*args, "--tokenizer", "bundled:tiny", "--prompt", "item: the red",
                                   "--max-new-tokens", "5", "--output", str(out)]) == 0
        outputs[name] = json.loads(out.read_text())
    assert outputs["adapter"]["token_ids"] == outputs["merged"]["token_ids"]

    # So does the HTTP server.
    import httpx

    from tests.fixtures.server import tiny_server

    with tiny_server("--model", str(base_dir), "--adapter", str(adapter_dir), "--tokenizer", "bundled:tiny") as server:
        body = {"prompt": "item: the red", "max_tokens": 5, "temperature": 0}
        served_text = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert served_text == outputs["adapter"]["text"]

    (adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(AdapterError, match="peft_type 'PREFIX_TUNING', expected 'LORA'"):
        load_model_and_tokenizer(str(base_dir), tokenizer="bundled:tiny", adapter=str(adapter_dir))
    assert run_inference.main(["--model", str(base_dir), "--adapter", str(adapter_dir), "--prompt", "x"]) == 2


def test_an_adapter_records_its_base_warns_on_another_and_refuses_another_shape(tmp_path, capsys):
    from safetensors import safe_open

    from gptj.execution.inference.pipelines import load_model_and_tokenizer
    from gptj.model.adapter_io import weights_fingerprint

    base_dir = export_hf(GPTJ(_vocab_matched()).init_weights(seed=3), tmp_path / "base")
    other_dir = export_hf(GPTJ(_vocab_matched()).init_weights(seed=4), tmp_path / "other")
    shallow_dir = export_hf(GPTJ(_vocab_matched().replace(num_layers=1)).init_weights(seed=3), tmp_path / "shallow")
    wide_dir = export_hf(GPTJ(_vocab_matched().replace(hidden_size=96, num_heads=6)).init_weights(seed=3),
                         tmp_path / "wide")
    updates = {**LORA, "model.name_or_path": str(base_dir), "model.shape": {}, "training.steps": 1,
               "checkpoint.export_hf": True, "data.tokenizer": "bundled:tiny"}
    adapter = train(small_config(tmp_path / "run", **updates)).adapter_dir
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        recorded = handle.metadata()["base_model_fingerprint"]
    base, _ = load_model_and_tokenizer(str(base_dir), tokenizer="bundled:tiny")
    assert recorded == weights_fingerprint(base)
    capsys.readouterr()

    for same in ({}, {"precision": "bf16"}, {"quantize": "int8"}):  # one base, however it is loaded
        load_model_and_tokenizer(str(base_dir), tokenizer="bundled:tiny", adapter=str(adapter), **same)
        # (a CPU without native bf16 warns about the precision: only the base's warning counts)
        assert "was trained on base model" not in capsys.readouterr().err, same
    load_model_and_tokenizer(str(other_dir), tokenizer="bundled:tiny", adapter=str(adapter))
    assert f"warning: adapter {adapter} was trained on base model '{base_dir}'" in capsys.readouterr().err
    with pytest.raises(AdapterError, match="has no place in this model"):
        load_model_and_tokenizer(str(shallow_dir), tokenizer="bundled:tiny", adapter=str(adapter))
    with pytest.raises(AdapterError, match="has shape"):
        load_model_and_tokenizer(str(wide_dir), tokenizer="bundled:tiny", adapter=str(adapter))


def _vocab_matched():
    import gptj.data as data
    from gptj.execution.training.loop import model_config_for
    from tests.fixtures.training import SMALL_SHAPE

    config = small_config("unused", **{"model.shape": dict(SMALL_SHAPE)})
    return model_config_for(config, data.load_tokenizer("bundled:tiny"))


def _keyword_task(directory):
    """Three classes, each named by one of three keywords hidden among filler words."""
    rng = random.Random(0)
    classes = {"fruit": ["apple", "pear", "plum"], "tool": ["hammer", "saw", "drill"],
               "animal": ["cat", "dog", "horse"]}
    filler = ["the", "a", "big", "small", "red", "old", "new", "green", "blue", "near", "far", "under", "over", "with"]
    for split, n in (("train", 800), ("validation", 120)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                kind = rng.choice(list(classes))
                words = [rng.choice(filler) for _ in range(4)]
                words.insert(rng.randrange(5), rng.choice(classes[kind]))
                f.write(json.dumps({"text": " ".join(words), "kind": kind}) + "\n")
    (directory / "task.yml").write_text('prompt: "item: {text} kind:"\ntarget: " {kind}"\n'
                                        "fields: {text: text, kind: kind}\nlabel_field: kind\n"
                                        "labels: [fruit, tool, animal]\neval_splits: [validation]\n")


@pytest.mark.slow
def test_lora_learns_a_synthetic_task_on_a_frozen_random_base(tmp_path):
    _keyword_task(tmp_path)
    result = train(small_config(tmp_path / "run", **{
        "lora.rank": 8, "optimizer.lr": 2e-2, "training.steps": 200, "training.global_batch_size": 32,
        "training.micro_batch_size": 32, "data.task": str(tmp_path / "task.yml"),
        "data.dataset": str(tmp_path), "eval.at_end": True, "eval.max_examples": None,
        "schedule.warmup_steps": 10}))
    accuracy = result.eval["validation"]["accuracy_generate"]
    assert accuracy >= 0.9, accuracy  # chance: 1/3


def test_bad_lora_settings_are_one_line_errors(tmp_path):
    from gptj.execution.training.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="lora.targets \\['q', 'attn'\\]: expected a non-empty subset"):
        small_config(tmp_path, **{"lora.rank": 4, "lora.targets": ["q", "attn"]})
    with pytest.raises(TrainConfigError, match="model.quantize int4 needs LoRA"):
        small_config(tmp_path, **{"model.quantize": "int4"})
    with pytest.raises(TrainConfigError, match="model.group_size must be 32, 64, 128 or 256, got 48"):
        small_config(tmp_path, **{"lora.rank": 4, "model.quantize": "int4", "model.group_size": 48})
    with pytest.raises(TrainConfigError, match="the quantized base is already what evaluation sees"):
        small_config(tmp_path, **{"lora.rank": 4, "model.quantize": "int8", "eval.quantize": "int8"})


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_adapters_on_a_quantized_base_get_the_gradients_of_its_dequantized_weights(bits):
    from gptj.model.model import random_reader
    from gptj.model.quantized_linear import QuantSpec
    from gptj.model.quantized_model import dequantize_model, quantize_from_reader

    spec = QuantSpec.parse(bits, 32)
    settings = LoraSettings(rank=4, alpha=6.0)
    quantized = quantize_from_reader(TINY, None, torch.float32, "cpu", spec, random_reader(TINY, 2))
    plain = dequantize_model(quantize_from_reader(TINY, None, torch.float32, "cpu", spec, random_reader(TINY, 2)))
    pairs = []
    for model in (quantized, plain):
        adapters = LoraAdapters(TINY, settings).init_weights(seed=1).attach(model)
        with torch.no_grad():  # non-zero B so that every factor gets a gradient
            for p in adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        loss = model.loss(IDS, LABELS)
        loss.backward()
        pairs.append((loss.detach(), {k: p.grad for k, p in adapters.named_parameters()}))
    (q_loss, q_grads), (p_loss, p_grads) = pairs
    assert quantized.quantization == spec and plain.quantization is None
    torch.testing.assert_close(q_loss, p_loss, rtol=0, atol=1e-5)
    for name, grad in p_grads.items():
        torch.testing.assert_close(q_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_run_keeps_its_int4_base_and_exports_what_it_trained(tmp_path):
    from gptj.execution.inference.pipelines import load_model_and_tokenizer

    base_dir = export_hf(GPTJ(_vocab_matched()).init_weights(seed=3), tmp_path / "base")
    updates = {**LORA, "model.name_or_path": str(base_dir), "model.shape": {}, "data.tokenizer": "bundled:tiny",
               "model.quantize": "int4", "model.group_size": 32, "training.steps": 4,
               "checkpoint.export_hf": True, "checkpoint.at_end": True, "checkpoint.keep": 2}
    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 0, 100, 7, 9]])
    fresh, _ = load_model_and_tokenizer(str(base_dir), tokenizer="bundled:tiny", quantize="int4", group_size=32)
    result = train(small_config(tmp_path / "run", **updates))
    assert result.losses[-1] < result.losses[0]

    # The adapters on a freshly quantized base are the trained model: the int4 base never moved.
    served, _ = load_model_and_tokenizer(str(base_dir), tokenizer="bundled:tiny", quantize="int4",
                                         group_size=32, adapter=str(result.adapter_dir))
    assert served.quantization is not None and served.blocks[0].lora is not None
    merged, _ = load_model_and_tokenizer(str(result.hf_dir))
    # With gradients enabled a quantized layer multiplies by its dequantized weight in fp32 (no
    # bf16 kernel), so hf/ (the dequantized base with the adapters merged) is the same function.
    with_adapter = served.logits(ids).detach()
    assert (with_adapter - fresh.logits(ids).detach()).abs().max() > 1e-3
    torch.testing.assert_close(merged.logits(ids).detach(), with_adapter, rtol=0, atol=1e-4)
    meta = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(base_dir)

    # Resuming on another quantization of the base is another base.
    with pytest.raises(ckpt.CheckpointLoadError, match=r"holds adapters for base model .*\(int4, group size 32\)"):
        train(small_config(tmp_path / "run", resume=True, **{**updates, "model.quantize": "int8"}))
