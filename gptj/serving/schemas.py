"""Request bodies of the OpenAI API and their checks.

Fields are read strictly: `"max_tokens": "3"` or `true` is a 400, not a 3 or a 1, and a float
must be finite (JSON's NaN and Infinity are refused). OpenAI fields this server does not
implement (`UNSUPPORTED`) are a 400 naming the field unless they hold their neutral value;
fields OpenAI does not define are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from gptj.execution.inference.sampling import SamplingParams

from .errors import bad_request

MAX_LOGPROBS = 5


def unencodable_text(value) -> str | None:
    """Why `value` (or a string inside it) cannot be UTF-8 text, e.g. a lone surrogate; None when it can."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"holds {value[err.start]!r} at character {err.start}, which is not valid Unicode text"
        return None
    parts = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((reason for reason in map(unencodable_text, parts) if reason), None)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    # JSON may carry "\ud800" (a lone surrogate), which no tokenizer can encode: every text field
    # (prompt, messages, stop, ...) is refused with a 400 naming it.
    @field_validator("*", mode="after")
    @classmethod
    def _encodable_text(cls, value):
        reason = unencodable_text(value)
        if reason:
            raise ValueError(reason)
        return value


class StreamOptions(_Body):
    include_usage: bool = False


def _empty(value) -> bool:
    return not value


def _zero(value) -> bool:
    return value == 0


# OpenAI fields that would change the answer, and the values that do not (what "not set" means).
UNSUPPORTED = {
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "logit_bias": _empty,
    "tools": _empty,
    "functions": _empty,
    "tool_choice": lambda value: value in (None, "none", "auto"),
    "function_call": lambda value: value in (None, "none", "auto"),
    "response_format": lambda value: value in (None, {"type": "text"}),
    "suffix": _empty,
    "best_of": lambda value: value in (None, 1),
    # vLLM's other guided decodings: only guided_choice (and structured_outputs.choice) is served.
    "guided_json": _empty,
    "guided_regex": _empty,
    "guided_grammar": _empty,
}


class SamplingFields(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate exactly max_tokens tokens
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: Any = None
    suffix: Any = None
    best_of: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_grammar: Any = None
    # An extension (as in vLLM): the answer is exactly one of these texts (serving/guided.py).
    guided_choice: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None  # newer vLLM's spelling: {"choice": [...]}

    @field_validator(*UNSUPPORTED, mode="after")
    @classmethod
    def _unsupported(cls, value, info):
        if not UNSUPPORTED[info.field_name](value):
            raise ValueError(f"is not supported by this server (got {value!r}); leave it out")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def sampling(self, defaults) -> SamplingParams:
        """SamplingParams from the request, fields left out from `defaults` (a GenerationSection)."""
        temperature = defaults.temperature if self.temperature is None else self.temperature
        top_p = defaults.top_p if self.top_p is None else self.top_p
        top_k = defaults.top_k if self.top_k is None else self.top_k
        if temperature < 0:
            raise bad_request(f"temperature must be >= 0, got {temperature}", "temperature")
        if not 0.0 < top_p <= 1.0:
            raise bad_request(f"top_p must be in (0, 1], got {top_p}", "top_p")
        if top_k < -1:
            raise bad_request(f"top_k must be >= 0 (or -1 for no limit), got {top_k}", "top_k")
        return SamplingParams(temperature=temperature, top_k=max(top_k, 0), top_p=top_p)

    def choice_texts(self) -> tuple[list[str], str] | None:
        """(the texts the answer must be one of, the field that gave them), None when the request
        gives none. Empty or repeated choices, both spellings at once, or another kind of
        structured output are a 400 naming the field."""
        given = [("guided_choice", self.guided_choice)] if self.guided_choice is not None else []
        if self.structured_outputs is not None:
            # Keys left at a neutral value (null, false) do not change the answer.
            other = sorted(k for k, v in self.structured_outputs.items() if k != "choice" and v not in (None, False))
            if other:
                raise bad_request(f"structured_outputs.{other[0]} is not supported by this server; only "
                                  "structured_outputs.choice is", f"structured_outputs.{other[0]}")
            if self.structured_outputs.get("choice") is not None:
                given.append(("structured_outputs.choice", self.structured_outputs["choice"]))
        if not given:
            return None
        if len(given) == 2:
            raise bad_request("give guided_choice or structured_outputs.choice, not both", "structured_outputs.choice")
        param, choices = given[0]
        if not isinstance(choices, list) or not choices:
            raise bad_request(f"{param} must be a non-empty list of strings", param)
        first: dict[str, int] = {}
        for k, choice in enumerate(choices):
            if not isinstance(choice, str):
                raise bad_request(f"{param}[{k}] must be a string, got {type(choice).__name__}", param)
            if not choice:
                raise bad_request(f"{param}[{k}] is empty", param)
            if choice in first:
                raise bad_request(f"{param} holds {choice!r} twice ([{first[choice]}] and [{k}])", param)
            first[choice] = k
        return choices, param

    def check_n(self, limit: int) -> None:
        if not 1 <= self.n <= limit:
            raise bad_request(f"n must be in [1, {limit}], got {self.n}", "n")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class EntailmentPair(_Body):
    premise: str
    hypothesis: str


def check_logprobs(value: int | None, param: str) -> int | None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise bad_request(f"{param} must be in [0, {MAX_LOGPROBS}], got {value}", param)
    return value


def check_max_tokens(value: int | None, param: str) -> None:
    if value is not None and value < 1:
        raise bad_request(f"{param} must be >= 1, got {value}", param)


def prompt_token_ids(prompt, encode, vocab_size: int, check_length=None) -> list[list[int]]:
    """The prompt field (a string, strings, token ids, or lists of token ids) as token id lists;
    `check_length(text, where)` sees each text before it is tokenized (it raises for one too long)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_request("prompt is empty", "prompt")
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    if check_length is not None:
        for i in texts:
            check_length(prompts[i], "the prompt" if len(prompts) == 1 else f"prompt[{i}]")
    encoded = encode([prompts[i] for i in texts]) if texts else []
    ids = [list(p) if not isinstance(p, str) else None for p in prompts]
    for i, tokens in zip(texts, encoded):
        ids[i] = tokens
    for i, tokens in enumerate(ids):
        where = "prompt" if len(ids) == 1 else f"prompt[{i}]"
        if not tokens:
            raise bad_request(f"{where} is empty", "prompt")
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(f"{where} holds token id {bad[0]} outside the vocabulary of {vocab_size}", "prompt")
    return ids


def check_context(prompt_tokens: int, max_tokens: int, context: int, where: str = "prompt") -> None:
    total = prompt_tokens + max_tokens
    if total > context:
        raise bad_request(
            f"this model's context is {context} tokens, but {where} has {prompt_tokens} tokens and "
            f"max_tokens is {max_tokens} ({total} in total); shorten the prompt or lower max_tokens",
            "max_tokens", "context_length_exceeded",
        )


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's shape); the tokenizer adds no special tokens either way."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class LoadAdapterRequest(_Body):
    """POST /v1/load_lora_adapter (vLLM's shape): a PEFT adapter directory served as `lora_name`."""

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Body):
    lora_name: str


def check_completion_max_tokens(value: int | None, echo: bool) -> None:
    """max_tokens >= 1, or 0 with echo: score the prompt without generating."""
    if value == 0 and echo:
        return
    check_max_tokens(value, "max_tokens")
