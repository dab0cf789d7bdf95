"""Prompt scoring through the server (echo + logprobs, as lm-evaluation-harness's
`local-completions` asks for it) against transformers' GPTJForCausalLM on the same weights.

The server loads a saved tiny HF model (bundled tokenizer, a 64-token context). Every prompt
token's log-probability must be transformers' log_softmax(logits) at the previous position,
gathered at the token; the top-k must be the true top-k; the greedy flags that lm-eval
derives from the response must be transformers' argmax.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

import gptj.data as data
from gptj.execution.inference.pipelines import EntailmentPipeline
from gptj.execution.training.evaluation import likelihood_scores
from gptj.serving.scoring import echoed_logprobs, top_logprobs_dict
from tests.fixtures.generation import hf_greedy, reference_pair
from tests.fixtures.reference import TINY
from tests.fixtures.server import tiny_server

FP32_TOLERANCE = 1e-4
# bf16 weights and activations against the fp32 reference: measured max |d| 0.015 on these
# prompts (log-probabilities near -7); the bound leaves room for other CPUs' bf16 kernels.
BF16_TOLERANCE = 0.05
CONTEXT = TINY.max_positions  # 64


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = data.load_tokenizer("bundled:tiny")
    config = TINY.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    hf, _ = reference_pair(seed=11, config=config)
    directory = tmp_path_factory.mktemp("scoring") / "hf"
    hf.save_pretrained(directory)
    tok.save(directory)
    return directory, hf, tok


@pytest.fixture(scope="module")
def server(saved):
    with tiny_server("--model", str(saved[0]), "--precision", "fp32", "--served-model-name", "tiny-hf") as s:
        yield s


def lm_eval_body(prompt, max_tokens=1, logprobs=1) -> dict:
    """The body lm-eval 0.4's local-completions sends for every log-likelihood request."""
    return {"model": "tiny-hf", "prompt": prompt, "max_tokens": max_tokens, "logprobs": logprobs,
            "echo": True, "temperature": 0, "seed": 1234}


def reference_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[L-1, V] transformers' log-softmax at positions 0..L-2 (predicting tokens 1..L-1)."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval's LocalCompletionsAPI.parse_logprobs for one choice (max_tokens 1: the last
    entry is the generated token, dropped)."""
    logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    greedy = all(lp == max(top.values()) for lp, top in zip(logprobs, tops))
    return sum(logprobs), greedy


def post(server, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def check_prompt_scores(choice: dict, ids: list[int], reference: torch.Tensor, k: int, decode,
                        tolerance: float = FP32_TOLERANCE) -> float:
    """Assert the prompt part of one choice's logprobs; returns the largest |difference|.
    The top-k tokens must be the reference's own unless the tolerance is loose (bf16), where
    near-ties may swap: then their log-probabilities must still be the reference's top-k values."""
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][:len(ids)] == [decode([t]) for t in ids]
    got = torch.tensor(lp["token_logprobs"][1:len(ids)])
    want = reference.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    worst = (got - want).abs().max().item()
    assert worst < tolerance
    for t, top in enumerate(lp["top_logprobs"][1:len(ids)]):
        best = torch.topk(reference[t], k)
        expected = {}  # tokens that decode to the same text keep the best value
        for i, value in zip(best.indices.tolist(), best.values.tolist()):
            expected.setdefault(decode([i]), value)
        assert max(top.values()) == pytest.approx(best.values[0].item(), abs=tolerance)
        if tolerance <= FP32_TOLERANCE:
            assert top == pytest.approx(expected, abs=tolerance)
        else:
            assert len(top) <= k and all(v <= best.values[0].item() + tolerance for v in top.values())
    return worst


def test_lm_eval_bodies_give_transformers_log_probabilities(server, saved):
    _, hf, tok = saved
    text = "The cat sat on the mat"
    ids = tok.encode([text])[0]
    reference = reference_logprobs(hf, ids)
    by_text = post(server, lm_eval_body(text)).json()
    by_ids = post(server, lm_eval_body(ids)).json()
    for response in (by_text, by_ids):
        (choice,) = response["choices"]
        check_prompt_scores(choice, ids, reference, 1, tok.decode)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the one generated token
        assert choice["text"] == text + lp["tokens"][-1]
        assert lp["text_offset"][:3] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]
        assert choice["finish_reason"] == "length" and response["usage"]["completion_tokens"] == 1
        # The generated token is transformers' next greedy token, with its log-probability.
        with torch.no_grad():
            last = hf(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        assert lp["tokens"][-1] == tok.decode([int(last.argmax())])
        assert lp["token_logprobs"][-1] == pytest.approx(last.max().item(), abs=FP32_TOLERANCE)
    assert by_ids["choices"][0]["logprobs"] == by_text["choices"][0]["logprobs"]


def test_lists_of_prompts_and_max_tokens_0_score_only(server, saved):
    _, hf, tok = saved
    texts = ["a b c d e", "mnli hypothesis: x premise: y target: neutral", "q"]
    encoded = tok.encode(texts)
    for prompt in (texts, encoded):
        response = post(server, lm_eval_body(prompt, max_tokens=0, logprobs=3)).json()
        assert [c["index"] for c in response["choices"]] == [0, 1, 2]
        for choice, ids in zip(response["choices"], encoded):
            assert choice["finish_reason"] == "length" and choice["text"] == tok.decode(ids)
            assert len(choice["logprobs"]["tokens"]) == len(ids)  # nothing generated
            if len(ids) > 1:
                check_prompt_scores(choice, ids, reference_logprobs(hf, ids), 3, tok.decode)
            else:  # a one-token prompt has no prediction to score
                assert choice["logprobs"]["token_logprobs"] == [None]
        assert response["usage"] == {"prompt_tokens": sum(map(len, encoded)), "completion_tokens": 0,
                                     "total_tokens": sum(map(len, encoded))}
    # A prompt that fills the whole context is scored when nothing is generated.
    full = [(7 * i) % tok.vocab_size for i in range(CONTEXT)]
    (choice,) = post(server, lm_eval_body(full, max_tokens=0)).json()["choices"]
    check_prompt_scores(choice, full, reference_logprobs(hf, full), 1, tok.decode)


def test_greedy_flags_as_lm_eval_computes_them(server, saved):
    _, hf, tok = saved
    context = tok.encode(["Once upon a time there"])[0]
    greedy_continuation = hf_greedy(hf, [context], max_new_tokens=4, pad_token_id=tok.eos_id)[0]
    other = [greedy_continuation[0], (greedy_continuation[1] + 5) % tok.vocab_size] + greedy_continuation[2:]
    for continuation, expected_greedy in ((greedy_continuation, True), (other, False)):
        ids = context + continuation
        (choice,) = post(server, lm_eval_body(ids)).json()["choices"]
        total, greedy = lm_eval_parse(choice, len(context))
        reference = reference_logprobs(hf, ids)[len(context) - 1:]
        target = torch.tensor(continuation)
        assert greedy is expected_greedy
        assert greedy == bool((reference.argmax(-1) == target).all())
        assert total == pytest.approx(reference.gather(-1, target[:, None]).sum().item(), abs=FP32_TOLERANCE)


def test_scores_equal_the_entailment_pipeline_and_evaluation(server, saved):
    """The server's echo scores, the entailment pipeline's label scores and evaluation's
    candidate losses are one computation (gptj.execution.inference.scoring)."""
    directory, _, tok = saved
    nli = EntailmentPipeline.from_pretrained(str(directory), precision="fp32")
    prompt = tok.encode([nli.prompt("the cat is asleep", "a cat sleeps")])[0]
    pipeline = nli.label_log_likelihoods([prompt])[0]
    batch = {"prompt_ids": torch.tensor([prompt]).numpy(), "prompt_lengths": [len(prompt)],
             "candidate_ids_eos": nli.label_ids}
    evaluation = -likelihood_scores(nli.model, batch, torch.device("cpu"))[0]
    bodies = lm_eval_body([prompt + label for label in nli.label_ids], max_tokens=0)
    served = [sum(c["logprobs"]["token_logprobs"][len(prompt):]) for c in post(server, bodies).json()["choices"]]
    assert served == pytest.approx(pipeline.tolist(), abs=1e-5)
    assert evaluation.tolist() == pytest.approx(pipeline.tolist(), abs=1e-5)


def test_scoring_is_batched_with_generation_and_gives_what_it_gives_alone(server, saved):
    _, _, tok = saved
    prompts = [tok.encode([f"prompt number {i} says" + " x" * i])[0] for i in range(6)]

    async def ask_all():
        async with httpx.AsyncClient(timeout=120) as http:
            async def ask(body):
                resp = await http.post(f"{server.url}/v1/completions", json=body)
                assert resp.status_code == 200, resp.text
                return resp.json()["choices"][0]
            generating = [{"prompt": p, "max_tokens": 20, "ignore_eos": True} for p in prompts]
            scoring = [lm_eval_body(p, max_tokens=i % 2) for i, p in enumerate(prompts)]
            together = await asyncio.gather(*(ask(b) for b in generating + scoring))
            alone = [await ask(b) for b in scoring]
            return together[len(prompts):], alone

    together, alone = asyncio.run(ask_all())
    for a, b in zip(together, alone):
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert a["logprobs"]["token_logprobs"][1:] == pytest.approx(b["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_streamed_echo_carries_the_same_scores(server, saved):
    _, _, tok = saved
    body = lm_eval_body("a streamed prompt", max_tokens=3, logprobs=2)
    full = post(server, body).json()["choices"][0]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        payloads = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    parts = [p["choices"][0] for p in payloads]
    assert "".join(p["text"] for p in parts) == full["text"]
    logprobs = [p["logprobs"] for p in parts if p["logprobs"]]
    assert [t for lp in logprobs for t in lp["tokens"]] == full["logprobs"]["tokens"]
    assert [x for lp in logprobs for x in lp["token_logprobs"]] == full["logprobs"]["token_logprobs"]
    # The echoed prompt comes whole in the first chunk, its scores with it.
    assert parts[0]["text"] == "a streamed prompt"
    assert logprobs[0]["text_offset"] == full["logprobs"]["text_offset"][:len(logprobs[0]["tokens"])]


def test_prompt_and_max_tokens_beyond_the_context_is_a_400_naming_both(server):
    resp = post(server, lm_eval_body(list(range(1, 61)), max_tokens=10))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert "context is 64 tokens" in error["message"]
    assert "60 tokens and max_tokens is 10 (70 in total)" in error["message"]
    assert error["code"] == "context_length_exceeded"
    too_long = post(server, lm_eval_body(list(range(1, 66)), max_tokens=0))
    assert too_long.status_code == 400 and "has 65 tokens and max_tokens is 0" in too_long.json()["error"]["message"]
    no_echo = post(server, {"prompt": "a", "max_tokens": 0})
    assert no_echo.status_code == 400 and "max_tokens must be >= 1" in no_echo.json()["error"]["message"]


def test_tokenize_detokenize_and_tokenizer_info(server, saved):
    _, _, tok = saved
    text = "Tokens, counted<|endoftext|>"
    tokens = post(server, {"prompt": text, "add_special_tokens": False}, "/tokenize").json()
    assert tokens == {"tokens": tok.encode([text])[0], "count": len(tok.encode([text])[0]),
                      "max_model_len": CONTEXT, "token_strs": None}
    assert tokens["tokens"][-1] == tok.eos_id
    assert post(server, {"tokens": tokens["tokens"]}, "/detokenize").json() == {"prompt": text}
    bad = post(server, {"tokens": [tok.vocab_size]}, "/detokenize")
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == CONTEXT


def test_bf16_scores_are_within_the_stated_tolerance(saved):
    directory, hf, tok = saved
    ids = tok.encode(["The cat sat on the mat and looked at the dog"])[0]
    reference = reference_logprobs(hf, ids)
    with tiny_server("--model", str(directory), "--precision", "bf16") as bf16:
        (choice,) = post(bf16, {**lm_eval_body(ids, logprobs=2), "model": None}).json()["choices"]
    worst = check_prompt_scores(choice, ids, reference, 2, tok.decode, tolerance=BF16_TOLERANCE)
    print(f"bf16 max |d| = {worst:.4f}")


def test_tokens_with_the_same_text_keep_the_best_value_in_top_logprobs():
    """Halves of one character both decode to U+FFFD: the dict must keep the top-1's value, or
    lm-eval's greedy check (logprob == max(top.values())) goes wrong."""
    halves = {3: "\ufffd", 4: "\ufffd"}

    def decode(ids):
        return halves.get(ids[0], f"t{ids[0]}")

    assert top_logprobs_dict(decode, [(3, -1.5), (4, -2.0), (5, -3.0)]) == {"\ufffd": -1.5, "t5": -3.0}
    echoed = echoed_logprobs(decode, [5, 3, 6], [(-1.5, [(3, -1.5), (4, -2.0)]), (-4.0, [(5, -0.5)])])
    assert echoed == {"tokens": ["t5", "\ufffd", "t6"], "token_logprobs": [None, -1.5, -4.0],
                      "top_logprobs": [None, {"\ufffd": -1.5}, {"t5": -0.5}], "text_offset": [0, 2, 3]}
