"""What a generation run measured: token counts and the wall-clock split of prefill and decode."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Wall-clock split of one `generate` call (seconds, synchronised with the device)."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    # Tokens are counted as the results hold them: a final EOS is not counted, a stop
    # sequence is. decode_tokens: those produced by decode steps (first tokens come from prefill).
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    # Cache slots each row's decode steps attended, summed over steps: the whole cache when the
    # step is compiled (static shapes), the filled part otherwise.
    attended_slots: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def mean_attended_slots(self) -> float:
        return self.attended_slots / self.decode_steps if self.decode_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_seconds if self.total_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "time_to_first_token_s": round(self.time_to_first_token, 6),
            "prefill_s": round(self.prefill_seconds, 6),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_second, 2),
            "decode_s": round(self.decode_seconds, 6),
            "decode_tokens_per_s": round(self.decode_tokens_per_second, 2),
            "total_s": round(self.total_seconds, 6),
            "tokens_per_s": round(self.tokens_per_second, 2),
        }
