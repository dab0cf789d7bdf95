"""What goes into the request engine and what comes out: a Request (prompt, limits, sampling,
stops, adapter) and the Events a step produces for it. Plain values, so a request can be sent
to the other tensor-parallel ranks as a dict."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptj.execution.inference.sampling import SamplingParams

MAX_LOGPROBS = 20


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stream_id: int = 0
    stop_token_sequences: list[list[int]] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no log-probabilities; N: the chosen token's and the top N
    ignore_eos: bool = False  # keep generating after EOS (fixed-length benchmarks)
    # None: no prompt scores; N: every prompt token's log-probability (after the first) and
    # the top N there, from the prefill. With max_new_tokens 0 the request only scores.
    prompt_logprobs: int | None = None
    adapter: str | None = None  # a LoRA adapter served over the base (MultiLoRA), None: the base alone

    def to_dict(self) -> dict:
        """Plain values only (sent to the other tensor-parallel ranks)."""
        s = self.sampling
        return {
            "request_id": self.request_id, "prompt": self.prompt, "max_new_tokens": self.max_new_tokens,
            "sampling": [s.temperature, s.top_k, s.top_p], "seed": self.seed, "stream_id": self.stream_id,
            "stop_token_sequences": self.stop_token_sequences, "stop_strings": self.stop_strings,
            "logprobs": self.logprobs, "ignore_eos": self.ignore_eos, "prompt_logprobs": self.prompt_logprobs,
            "adapter": self.adapter,
        }

    @classmethod
    def from_dict(cls, values: dict) -> Request:
        values = dict(values)
        values["sampling"] = SamplingParams(*values["sampling"])
        return cls(**values)


@dataclass
class Event:
    """One thing that happened to a request during a step.

    token: a new token (None when the step only finished the request, e.g. on EOS).
    finish_reason: set on the request's last event: "eos", "stop", "length", "cancelled" or
    "error" (then `error` says why). logprob / top_logprobs: when the request asked for them,
    the chosen token's log-probability and the top-N (token, log-probability) pairs, from the
    model's distribution before temperature and filtering.
    prompt_logprobs: on a request's first event when it asked for them: (log p(token),
    top-N [(token, log-probability)]) for prompt tokens 1..L-1, given the tokens before each.
    """

    request_id: str
    token: int | None = None
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None
    time: float = 0.0
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
