"""Evaluation measures what the model learned: a synthetic task learned to high accuracy, a
random model near chance, batched label scoring equal to one-at-a-time scoring, and the HF
export equal to the trained model in transformers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import gptj.data as datalib
from gptj.execution.training.evaluation import evaluate_split, likelihood_scores
from gptj.execution.training.loop import train
from gptj.model import GPTJ
from tests.fixtures.training import small_config

KEYS = {"cat": "apple", "sun": "river", "boat": "stone"}  # marker word -> label
FILLER = ["the", "a", "one", "two", "tall", "small", "old", "new", "big", "red", "dog", "tree"]


@pytest.fixture(scope="module")
def synthetic_task(tmp_path_factory):
    """A 3-class text-to-text task: the label names which marker word the text contains."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = random.Random(0)
    for split, count in (("train", 600), ("validation", 90)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(count):
                marker = list(KEYS)[i % 3]
                words = rng.choices(FILLER, k=rng.randint(3, 7))
                words.insert(rng.randint(0, len(words)), marker)
                f.write(json.dumps({"text": " ".join(words), "label": KEYS[marker]}) + "\n")
    task_file = root / "marker.yml"
    task_file.write_text(
        'prompt: "which: {text} target:"\ntarget: " {label}"\n'
        "fields: {text: text, label: label}\nlabel_field: label\n"
        "labels: [apple, river, stone]\neval_splits: [validation]\n")
    return str(task_file), str(root)


def _task_config(output_dir, task, source, **updates):
    values = {"data.task": task, "data.dataset": source, "data.sequence_length": 24,
              "training.steps": 40, "training.global_batch_size": 16, "training.micro_batch_size": 16,
              "optimizer.lr": 3e-3, "schedule.warmup_steps": 5, "eval.at_end": True,
              "eval.max_examples": None}
    values.update(updates)
    return small_config(output_dir, **values)


@pytest.fixture(scope="module")
def trained(synthetic_task, tmp_path_factory):
    task, source = synthetic_task
    out = tmp_path_factory.mktemp("trained")
    return train(_task_config(out, task, source, **{"checkpoint.export_hf": True, "eval.quantize": "int8"}))


def test_learns_the_synthetic_task(trained):
    assert set(trained.eval) == {"validation", "validation@int8"}
    result = trained.eval["validation"]
    assert result["num_examples"] == 90
    assert result["accuracy_likelihood"] > 0.9
    assert result["accuracy_generate"] > 0.9
    assert result["invalid_generations"] <= 90 * (1 - result["accuracy_generate"])
    per_class = result["per_class"]
    assert sum(c["count"] for c in per_class.values()) == 90
    assert sum(c["correct_likelihood"] for c in per_class.values()) == round(90 * result["accuracy_likelihood"])
    saved = json.loads((trained.output_dir / "eval.json").read_text())
    assert saved["splits"]["validation"]["accuracy_likelihood"] == result["accuracy_likelihood"]


def test_random_model_scores_near_chance(synthetic_task):
    task, source = synthetic_task
    tok = datalib.load_tokenizer("bundled:tiny")
    evals = datalib.build_eval_data(task, source, tok, "validation", progress=False)
    config = small_config("unused").model
    from gptj.model import ModelConfig

    mc = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                            bos_token_id=tok.eos_id, **config.shape)
    model = GPTJ(mc).init_weights(seed=3)
    result = evaluate_split(model, evals, tok, torch.device("cpu"), batch_size=32)
    assert 0.15 <= result["accuracy_likelihood"] <= 0.55  # 3 balanced classes: chance is 1/3
    assert result["accuracy_generate"] < 0.2
    assert result["invalid_generations"] > 45  # random text is mostly no label at all


def test_batched_label_scores_equal_one_at_a_time(trained, synthetic_task):
    task, source = synthetic_task
    tok = datalib.load_tokenizer("bundled:tiny")
    evals = datalib.build_eval_data(task, source, tok, "validation", progress=False)
    batch = evals.batch(np.arange(7))  # prompts of different lengths, right-padded
    model = trained.model.eval()
    with torch.no_grad():
        scores = likelihood_scores(model, batch, torch.device("cpu"))
        for b in range(7):
            prompt = batch["prompt_ids"][b, :batch["prompt_lengths"][b]]
            for k, cand in enumerate(batch["candidate_ids_eos"]):
                ids = torch.from_numpy(np.concatenate([prompt, cand]))[None]
                losses = model.token_losses(ids[:, :-1], ids[:, 1:])
                expected = losses[0, len(prompt) - 1:].sum()
                torch.testing.assert_close(scores[b, k], expected, atol=1e-4, rtol=1e-5)


def test_hf_export_loads_in_transformers_with_identical_logits(trained):
    from transformers import AutoTokenizer, GPTJForCausalLM

    hf_dir = trained.hf_dir
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    hf = GPTJForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([[5, 17, 300, 2, 999, 41, 8, 8, 120]])
    with torch.no_grad():
        ours = trained.model.eval().logits(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    text = "which: the cat sat target:"
    assert AutoTokenizer.from_pretrained(hf_dir).encode(text) == \
        datalib.load_tokenizer("bundled:tiny").encode([text])[0]


def test_training_starts_from_the_exported_model(trained, synthetic_task, tmp_path):
    task, source = synthetic_task
    again = train(_task_config(tmp_path, task, source, **{
        "model.name_or_path": str(trained.hf_dir), "model.shape": {}, "data.tokenizer": None,
        "training.steps": 2, "optimizer.lr": 1e-12, "eval.every": 1, "eval.generate": False}))
    assert again.eval["validation"]["accuracy_likelihood"] == \
        trained.eval["validation"]["accuracy_likelihood"]
    history = [json.loads(line) for line in (tmp_path / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]


def test_quantized_model_keeps_the_trained_answers(trained, synthetic_task):
    """int8 and int4 against the float model on the validation prompts, held to the targets for
    real models: int8 >= 99% agreement and perplexity within 0.5%, int4 within 2 accuracy points
    and perplexity within 2%. On this 90-example split one flipped answer moves accuracy and
    agreement by 1.1%, so each of those bounds allows one flip more."""
    from gptj.execution.inference.quant_quality import compare_models
    from gptj.model.quantized_linear import QuantSpec
    from gptj.model.quantized_model import quantized_copy

    task, source = synthetic_task
    tok = datalib.load_tokenizer("bundled:tiny")
    evals = datalib.build_eval_data(task, source, tok, "validation", progress=False)
    model = trained.model.eval()
    models = {"fp32": model, "int8": quantized_copy(model, QuantSpec(8)),
              "int4": quantized_copy(model, QuantSpec(4, 32))}
    report = compare_models(models, evals, tok)
    assert report["fp32"]["accuracy"] == trained.eval["validation"]["accuracy_generate"]
    one_flip = 1 / report["fp32"]["num_examples"]
    assert report["int8"]["agreement"] >= 0.99 - one_flip
    assert abs(report["int8"]["perplexity_change"]) < 0.005
    assert report["int4"]["accuracy"] >= report["fp32"]["accuracy"] - 0.02 - one_flip
    assert abs(report["int4"]["perplexity_change"]) < 0.02
    # eval.quantize in training evaluated the same int8 model.
    assert trained.eval["validation@int8"]["accuracy_generate"] == report["int8"]["accuracy"]
