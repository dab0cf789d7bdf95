"""`guided_choice` (and `structured_outputs.choice`) on completions and chat, through the real
`openai` client's extra_body, against a reference computed here from plain forwards: each
choice's probability when the model must answer with one of them is the product, token by
token, of the model's next-token probability renormalised over the tokens some choice allows
there (EOS where a choice ends)."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from gptj.execution.inference.pipelines import load_model_and_tokenizer
from gptj.execution.inference.scoring import score_rows
from tests.fixtures.server import tiny_server

PROMPT = "Question: is the sky blue on a clear day? Answer:"
CHOICES = [" yes", " no", " maybe not", " it depends"]


@pytest.fixture(scope="module")
def server():
    with tiny_server("--max-model-len", "96") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    return load_model_and_tokenizer("random:tiny", "bundled:tiny")


@torch.inference_mode()
def choice_probabilities(model, tok, prompt: str, choices: list[str]) -> list[float]:
    """Constrained decoding's probability of each choice, from one plain forward per prefix."""
    eos = tok.eos_id
    seqs = [ids + [eos] for ids in tok.encode(choices)]
    prompt_ids = tok.encode([prompt])[0]
    out = []
    for seq in seqs:
        p = 1.0
        for t in range(len(seq)):
            logits = model.logits(torch.tensor([prompt_ids + seq[:t]]), last_only=True)[0].double()
            allowed = {other[t] for other in seqs if len(other) > t and other[:t] == seq[:t]}
            probs = logits.softmax(-1)
            p *= float(probs[seq[t]] / sum(probs[a] for a in allowed))
        out.append(p)
    return out


def complete(client, **kwargs):
    return client.completions.create(model="random:tiny", prompt=PROMPT, **kwargs)


def test_greedy_answer_is_the_most_probable_choice_with_its_logprobs(client, reference):
    model, tok = reference
    probs = choice_probabilities(model, tok, PROMPT, CHOICES)
    assert sum(probs) == pytest.approx(1.0, abs=1e-6)
    got = complete(client, temperature=0, logprobs=3, extra_body={"guided_choice": CHOICES})
    best = max(range(len(CHOICES)), key=lambda k: probs[k])
    (choice,) = got.choices
    assert choice.text == CHOICES[best] and choice.finish_reason == "stop"
    # The answer's tokens with the model's own log-probabilities, as scoring the text alone gives.
    prompt_ids, answer_ids = tok.encode([PROMPT, CHOICES[best]])
    alone = score_rows(model, [prompt_ids + answer_ids], [len(prompt_ids)], top_k=3)[0]
    assert choice.logprobs.tokens == [tok.decode([t]) for t in answer_ids]
    assert choice.logprobs.token_logprobs == pytest.approx(alone.logprobs.tolist(), abs=1e-4)
    for tops, ids, values in zip(choice.logprobs.top_logprobs, alone.top_ids.tolist(), alone.top_logprobs.tolist()):
        assert list(tops.values()) == pytest.approx(values, abs=1e-4)
        assert list(tops) == [tok.decode([t]) for t in ids]
    assert got.usage.prompt_tokens == len(prompt_ids) and got.usage.completion_tokens == len(answer_ids)
    # A choice that is the only one allowed is the answer, however unlikely.
    for text in CHOICES:
        assert complete(client, temperature=0, extra_body={"guided_choice": [text]}).choices[0].text == text


def test_a_choice_that_starts_another_competes_as_constrained_decoding_would(client, reference):
    model, tok = reference
    # " no way" continues " no": after " no" the model may end (EOS) or go on with " way".
    choices = [" no way", " no"]
    ids = tok.encode(choices)
    assert ids[0][:len(ids[1])] == ids[1]
    prompts = [f"Question {i}: is {thing} ever {colour}? Answer:" for i, (thing, colour) in
               enumerate([("the sky", "green"), ("snow", "black"), ("grass", "blue"), ("a cat", "red"),
                          ("the sea", "white"), ("coal", "pink"), ("milk", "grey"), ("gold", "soft")])]
    got = client.completions.create(model="random:tiny", prompt=prompts, temperature=0,
                                    extra_body={"structured_outputs": {"choice": choices}})
    best = []
    for prompt, choice in zip(prompts, got.choices):
        probs = choice_probabilities(model, tok, prompt, choices)
        best.append(choices[max(range(2), key=lambda k: probs[k])])
        assert choice.text == best[-1]
    # Some prompt's answer is the shorter " no", listed after its extension: scored without the
    # end of text, both would tie and the first listed would win.
    assert " no" in best


def test_sampled_answers_follow_the_choice_probabilities_and_the_seed(client, reference):
    model, tok = reference
    # Four choices share their first token: together they get about what " yes" or " no" gets
    # alone, so the choices are far from equally likely.
    choices = [" yes", " no", " it is", " it was", " it could", " it depends"]
    assert len({ids[0] for ids in tok.encode(choices)}) == 3
    probs = choice_probabilities(model, tok, PROMPT, choices)
    assert max(probs) > 2 * min(probs)
    body = dict(temperature=1.0, n=8, extra_body={"guided_choice": choices})
    first = [c.text for c in complete(client, seed=11, **body).choices]
    assert [c.text for c in complete(client, seed=11, **body).choices] == first
    draws = first + [c.text for seed in range(12, 42) for c in complete(client, seed=seed, **body).choices]
    assert set(draws) <= set(choices)
    for text, p in zip(choices, probs):  # 248 draws: 3 standard deviations at most
        assert draws.count(text) / len(draws) == pytest.approx(p, abs=3 * math.sqrt(p * (1 - p) / len(draws)) + 0.01)


def test_streamed_answer_is_one_chunk_per_choice(client):
    full = complete(client, temperature=0, logprobs=1, extra_body={"guided_choice": CHOICES})
    chunks = list(complete(client, temperature=0, logprobs=1, stream=True, stream_options={"include_usage": True},
                           extra_body={"guided_choice": CHOICES}))
    assert len(chunks) == 2 and chunks[-1].choices == [] and chunks[-1].usage == full.usage
    (choice,) = chunks[0].choices
    assert choice.text == full.choices[0].text and choice.finish_reason == "stop"
    assert choice.logprobs.token_logprobs == full.choices[0].logprobs.token_logprobs


def test_chat_answers_with_a_choice(server, client, reference):
    model, tok = reference
    messages = [{"role": "user", "content": "Is the sky blue?"}]
    prompt = "User: Is the sky blue?\nAssistant:"
    choices = ["yes", "no"]
    probs = choice_probabilities(model, tok, prompt, choices)
    chat = client.chat.completions.create(model="random:tiny", messages=messages, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"structured_outputs": {"choice": choices}})
    (choice,) = chat.choices
    assert choice.message.content == choices[max(range(2), key=lambda k: probs[k])]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert chat.usage.prompt_tokens == len(tok.encode([prompt])[0])
    stream = list(client.chat.completions.create(model="random:tiny", messages=messages, temperature=0, stream=True,
                                                 extra_body={"guided_choice": choices}))
    assert len(stream) == 1 and stream[0].choices[0].delta.content == choice.message.content
    assert stream[0].choices[0].finish_reason == "stop"


def test_several_prompts_get_their_own_answers(client, reference):
    model, tok = reference
    prompts = [PROMPT, "The opposite of up is", "Colour of grass:"]
    choices = [" down", " green", " yes"]
    got = client.completions.create(model="random:tiny", prompt=prompts, temperature=0, n=2,
                                    extra_body={"guided_choice": choices})
    assert [c.index for c in got.choices] == list(range(6))
    for i, prompt in enumerate(prompts):
        probs = choice_probabilities(model, tok, prompt, choices)
        want = choices[max(range(3), key=lambda k: probs[k])]
        assert [c.text for c in got.choices[2 * i:2 * i + 2]] == [want, want]


def post(server, route, body):
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


@pytest.mark.parametrize("extra, param, message", [
    ({"guided_choice": []}, "guided_choice", "must be a non-empty list"),
    ({"guided_choice": ["a", "b", "a"]}, "guided_choice", "holds 'a' twice ([0] and [2])"),
    ({"guided_choice": ["a", ""]}, "guided_choice", "guided_choice[1] is empty"),
    ({"structured_outputs": {"choice": ["a", 3]}}, "structured_outputs.choice", "[1] must be a string"),
    ({"structured_outputs": {"choice": ["a"]}, "guided_choice": ["a"]}, "structured_outputs.choice", "not both"),
    ({"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs.json", "not supported"),
    ({"guided_regex": "a|b"}, "guided_regex", "not supported"),
    ({"guided_choice": ["a", "b"], "stop": ["x"]}, "stop", "stop cannot be used with guided_choice"),
    ({"guided_choice": ["a", "b"], "echo": True}, "echo", "echo cannot be used"),
    ({"guided_choice": ["a", "b"], "ignore_eos": True}, "ignore_eos", "ignore_eos cannot be used"),
    ({"guided_choice": ["a", "b c d e f g h"], "max_tokens": 2}, "max_tokens", "guided_choice[1]"),
    ({"guided_choice": ["a", "b"], "n": 1000}, "n", "n must be in"),
    ({"guided_choice": ["a", "b"], "temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"guided_choice": ["a", "b"], "model": "nope"}, "model", "does not exist"),
    ({"guided_choice": ["a", "x" * 10**6]}, "guided_choice", "characters a token"),
    ({"guided_choice": ["a", "word " * 100]}, "prompt", "the longest of guided_choice takes"),
])
def test_bad_guided_requests_are_a_4xx_naming_the_field(server, extra, param, message):
    resp = post(server, "/v1/completions", {"prompt": PROMPT, **extra})
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_chat_token_limits_are_checked_against_the_longest_choice(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "guided_choice": ["a", "b c d e f g h"]}
    for field in ("max_tokens", "max_completion_tokens"):
        resp = post(server, "/v1/chat/completions", {**body, field: 1})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field
    assert post(server, "/v1/chat/completions", body).status_code == 200  # the default does not bound a choice
    streamed = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
    events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["finish_reason"] == "stop"
