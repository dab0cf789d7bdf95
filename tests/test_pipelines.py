"""Text generation and entailment pipelines on a saved tiny HF model (+ bundled tokenizer)."""

from __future__ import annotations

import math

import pytest
import torch

import gptj.data as data
from gptj.execution.inference.pipelines import EntailmentPipeline, TextGenerationPipeline
from tests.fixtures.generation import hf_greedy, reference_pair
from tests.fixtures.lora import seeded_adapter_dirs
from tests.fixtures.reference import TINY


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run_finetuning.py-like output dir: RUN/hf holds the model and its tokenizer."""
    tok = data.load_tokenizer("bundled:tiny")
    config = TINY.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    hf, _ = reference_pair(seed=4, config=config)
    run = tmp_path_factory.mktemp("run")
    hf.save_pretrained(run / "hf")
    tok.save(run / "hf")
    return run, hf, tok


def test_generation_pipeline_reproduces_transformers(saved):
    run, hf, tok = saved
    pipe = TextGenerationPipeline.from_pretrained(str(run))  # resolves RUN/hf
    prompts = ["the cat sat on", "a dog", "mnli hypothesis: x premise: y target:"]
    expected = hf_greedy(hf, tok.encode(prompts), max_new_tokens=10, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    texts = pipe(prompts, max_new_tokens=10)
    for text, ids in zip(texts, expected):
        ids = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
        assert text == tok.decode(ids)
    assert pipe(prompts[1], max_new_tokens=10) == texts[1]
    stop = texts[0][3:5]
    cut = pipe(prompts[0], max_new_tokens=10, stop=[stop])
    assert cut == texts[0][: texts[0].index(stop)]


def hand_label_scores(hf, tok, prompt_text: str, labels: list[str]) -> tuple[list[float], list[float]]:
    """transformers' summed log p(" label" + EOS | prompt) per label, and the choice
    probabilities: each label's tokens renormalised, step by step, over the next tokens of the
    labels that share its prefix."""
    prompt = tok.encode([prompt_text])[0]
    targets = [tok.encode([" " + label])[0] + [tok.eos_id] for label in labels]
    per_token = []
    for target in targets:
        with torch.no_grad():
            logp = hf(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
        per_token.append([logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(target)])
    choice = []
    for target, values in zip(targets, per_token):
        total = 0.0
        for t, value in enumerate(values):
            allowed = {other[t]: per_token[j][t] for j, other in enumerate(targets)
                       if len(other) > t and other[:t] == target[:t]}
            total += value - torch.logsumexp(torch.tensor(list(allowed.values())), 0).item()
        choice.append(math.exp(total))
    return [sum(v) for v in per_token], choice


def test_entailment_scores_are_label_likelihoods(saved):
    run, hf, tok = saved
    nli = EntailmentPipeline.from_pretrained(str(run / "hf"))
    premise, hypothesis = "the cat is asleep", "a cat sleeps"
    out = nli(premise, hypothesis)
    labels = ["entailment", "neutral", "contradiction"]
    sums, probs = hand_label_scores(hf, tok, f"mnli hypothesis: {hypothesis} premise: {premise} target:", labels)
    assert list(out["scores"]) == labels
    assert out["scores"] == pytest.approx(dict(zip(labels, probs)), abs=1e-5)
    assert out["log_likelihoods"] == pytest.approx(dict(zip(labels, sums)), abs=1e-4)
    assert out["label"] == max(out["scores"], key=out["scores"].get)
    batch = nli([(premise, hypothesis), ("a b", "c d")])
    assert batch[0]["scores"] == pytest.approx(out["scores"], abs=1e-5)


def test_entailment_inputs_two_lists_wrong_arity_and_empty_text(saved):
    run, _, _ = saved
    nli = EntailmentPipeline.from_pretrained(str(run))
    premises, hypotheses = ["the cat is asleep", "a b"], ["a cat sleeps", "c d"]
    as_lists = nli(premises, hypotheses)
    assert isinstance(as_lists, list) and len(as_lists) == 2
    for out, premise, hypothesis in zip(as_lists, premises, hypotheses):
        assert out["scores"] == pytest.approx(nli(premise, hypothesis)["scores"], abs=1e-5)
    assert nli(list(zip(premises, hypotheses)))[1]["scores"] == pytest.approx(as_lists[1]["scores"], abs=1e-5)
    with pytest.raises(TypeError, match="takes \\(premise, hypothesis\\)"):
        nli("only a premise")
    with pytest.raises(TypeError):
        nli("a premise", ["a hypothesis"])
    with pytest.raises(ValueError, match="2 premises but 1 hypotheses"):
        nli(premises, hypotheses[:1])
    with pytest.raises(ValueError, match="hypothesis 0 is empty"):
        nli("the cat is asleep", "  ")
    with pytest.raises(ValueError, match="premise 1 is empty"):
        nli(["x", ""], ["y", "z"])


def test_truncated_prompts_leave_room_for_the_new_tokens(saved):
    run, hf, tok = saved
    pipe = TextGenerationPipeline.from_pretrained(str(run))
    context = pipe.model.config.max_positions
    prompt = "word " * (2 * context)
    full = tok.encode([prompt])[0]
    kept = pipe.encode_prompts([prompt], truncate=True, max_new_tokens=10)[0]
    assert kept == full[-(context - 10):]
    out = pipe.generate([prompt], max_new_tokens=10, truncate_prompts=True)[0]
    assert out.prompt_tokens == context - 10
    # What transformers generates after the kept tokens alone.
    expected = hf_greedy(hf, [kept], max_new_tokens=10, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0]
    if tok.eos_id in expected:
        expected, reason = expected[: expected.index(tok.eos_id)], "eos"
    else:
        reason = "length"
    assert out.token_ids == expected and out.finish_reason == reason


@pytest.fixture(scope="module")
def adapter_dirs(saved, tmp_path_factory):
    """Two PEFT adapters for the saved model, of different ranks and targets."""
    from gptj.model.lora import LoraSettings

    run, hf, _ = saved
    config = TextGenerationPipeline.from_pretrained(str(run), precision="fp32", device="cpu").model.config
    return seeded_adapter_dirs(config, {"nli": LoraSettings(rank=2, alpha=4.0),
                                        "qa": LoraSettings(rank=4, alpha=4.0, targets=("q", "fc_out"))},
                               40, tmp_path_factory)


def test_pipelines_with_several_adapters_equal_each_adapter_merged_alone(saved, adapter_dirs):
    run = str(saved[0])
    prompts = ["the cat sat on", "mnli hypothesis: x premise: y target:"]
    many = TextGenerationPipeline.from_pretrained(run, precision="fp32", device="cpu", adapters=adapter_dirs)
    nli = EntailmentPipeline.from_pretrained(run, precision="fp32", device="cpu", adapters=adapter_dirs)
    outputs = set()
    for name in [None, *adapter_dirs]:
        merged = dict(precision="fp32", device="cpu", adapter=adapter_dirs.get(name))
        alone = TextGenerationPipeline.from_pretrained(run, **merged).generate(prompts, max_new_tokens=12)
        got = many.generate(prompts, max_new_tokens=12, adapter=name)
        assert [g.token_ids for g in got] == [a.token_ids for a in alone], name
        outputs.add(tuple(tuple(a.token_ids) for a in alone))
        expected = EntailmentPipeline.from_pretrained(run, **merged)("A man plays.", "A person plays.")
        scored = nli("A man plays.", "A person plays.", adapter=name)
        assert scored["label"] == expected["label"]
        assert scored["scores"] == pytest.approx(expected["scores"], abs=1e-5)
    assert len(outputs) == 3  # the adapters really change the output
    assert many("the cat sat on", max_new_tokens=12) == many.tokenizer.decode(
        TextGenerationPipeline.from_pretrained(run, precision="fp32", device="cpu")
        .generate(["the cat sat on"], max_new_tokens=12)[0].token_ids)  # afterwards: the base again
    with pytest.raises(ValueError, match="adapter 'sst2' is not loaded"):
        many("the cat", adapter="sst2")
    with pytest.raises(ValueError, match="holds no adapters"):
        TextGenerationPipeline.from_pretrained(run, precision="fp32", device="cpu")("the cat", adapter="nli")
