"""Guided choice: a completion or chat answer that is exactly one of the request's choices
(`guided_choice: [...]`, or `structured_outputs: {"choice": [...]}`, as in vLLM).

Nothing is generated token by token. The prompt is prefilled once and every choice scored
after it, by the engine thread's scorer (`ServingClassifier`, the one /v1/classify uses),
batched with every other scoring item of the step. Each choice is scored followed by EOS, so
a choice that starts another ("pos", "positive") competes with it as constrained decoding
would: stop after "pos", or go on.

A choice's probability is the model's when it must answer with one of them: token by token,
its next-token probability renormalised over the tokens that continue some choice there
(gptj.execution.inference.scoring.choice_logprobs). Temperature 0 answers the most probable
(ties: the first); any other temperature draws each of the `n` answers by these
probabilities, from `seed` when given. The logprobs returned are the model's own for the
answer's tokens (with the top-k tokens at each position), as for generated text.
"""

from __future__ import annotations

import json
import math
import random
import secrets
from dataclasses import dataclass

from .errors import bad_request
from .scoring import GUIDED, score_items
from .state import ServerState


@dataclass
class GuidedChoice:
    """The request's choices, their tokens and the field that named them (for errors)."""

    texts: list[str]
    ids: list[list[int]]
    param: str


@dataclass
class Answer:
    """One answer: the chosen text, its tokens and (token, logprob, top) per token."""

    index: int
    text: str
    tokens: list[int]
    entries: list[tuple[int, float, list]]


def guided_choice(state: ServerState, body, given: tuple[list[str], str], limits: dict[str, int | None],
                  echo: bool = False) -> GuidedChoice:
    """The body's choices (`given`: its `choice_texts()`), checked against its other fields and
    tokenized (call it off the event loop). `limits`: the token limits the client set, by field
    name (None: not set). A field that cannot go with a guided choice is a 400 naming it."""
    texts, param = given
    if body.stop_strings():
        raise bad_request(f"stop cannot be used with {param}: the answer is one whole choice", "stop")
    if echo:
        raise bad_request(f"echo cannot be used with {param}", "echo")
    if body.ignore_eos:
        raise bad_request(f"ignore_eos cannot be used with {param}: the answer ends with its choice", "ignore_eos")
    for k, text in enumerate(texts):
        state.check_text_length(text, f"{param}[{k}]", param)
    ids = state.tokenizer.encode(texts)
    longest = max(range(len(texts)), key=lambda k: len(ids[k]))
    for field, limit in limits.items():
        if limit is not None and limit < len(ids[longest]):
            raise bad_request(f"{field} is {limit} but {param}[{longest}] ({texts[longest]!r}) takes "
                              f"{len(ids[longest])} tokens; raise {field} or leave it out", field)
    return GuidedChoice(texts, ids, param)


def check_fits(state: ServerState, guided: GuidedChoice, prompts: list[list[int]], param: str) -> None:
    """400 for a prompt that leaves no room for its longest choice and the end of text."""
    longest = max(map(len, guided.ids)) + 1
    for i, prompt in enumerate(prompts):
        if len(prompt) + longest > state.max_model_len:
            where = "the prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise bad_request(f"this model's context is {state.max_model_len} tokens, but {where} has {len(prompt)} "
                              f"tokens and the longest of {guided.param} takes {longest} with the end of text",
                              param, "context_length_exceeded")


def pick(logprobs: list[float], temperature: float, rng: random.Random) -> int:
    """The most probable choice at temperature 0 (ties: the first), else one drawn by the choices'
    probabilities."""
    if temperature == 0:
        return max(range(len(logprobs)), key=lambda k: (logprobs[k], -k))
    return rng.choices(range(len(logprobs)), weights=[math.exp(v) for v in logprobs])[0]


async def answer(state: ServerState, loop, guided: GuidedChoice, prompts: list[list[int]], n: int,
                 temperature: float, seed: int | None, top_k: int, adapter: str | None) -> list[Answer]:
    """n answers per prompt (prompt i's are answers i*n .. i*n+n-1), every prompt's choices
    scored in one job of the engine thread."""
    items = [(GUIDED, json.dumps({"prompt": prompt, "choices": guided.ids, "top_k": top_k, "adapter": adapter}))
             for prompt in prompts]
    results = await score_items(state, loop, items)
    answers = []
    for i, result in enumerate(results):
        # Every prompt draws from the same seed, as generated choices do (completions.engine_requests).
        rng = random.Random(seed if seed is not None else secrets.randbits(62))
        for j in range(n):
            k = pick(result["logprobs"], temperature, rng)
            entries = [(t, value, top) for t, (value, top) in zip(guided.ids[k], result["tokens"][k])]
            answers.append(Answer(i * n + j, guided.texts[k], guided.ids[k], entries))
    return answers
