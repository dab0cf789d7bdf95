"""The dynamic loss scale used with fp16 weights.

bf16 and fp32 have the exponent range of fp32, so their gradients need no scaling: the scaler is
then disabled (scale 1.0, `update` does nothing). fp16 gradients underflow without scaling, so
the loss is multiplied by `scale` before backward, the optimizer divides it back out, and the
scale adapts: halve it when a step overflows, double it after `growth_interval` clean steps.
"""

from __future__ import annotations

import torch


class DynamicLossScaler:
    """Loss scale for fp16 training; a constant 1.0 when disabled (fp32 / bf16)."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
        enabled: bool = True,
    ):
        if growth_factor <= 1.0 or not 0.0 < backoff_factor < 1.0 or growth_interval < 1:
            raise ValueError(
                f"need growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1; got "
                f"{growth_factor}, {backoff_factor}, {growth_interval}"
            )
        self.enabled = enabled
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.scale = float(init_scale) if enabled else 1.0
        self.clean_steps = 0  # consecutive steps without overflow since the last change

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, **kwargs) -> DynamicLossScaler:
        """Enabled for fp16 only."""
        return cls(enabled=dtype == torch.float16, **kwargs)

    def update(self, found_inf: bool) -> None:
        """Call once per optimizer step with whether its gradients overflowed."""
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "enabled": self.enabled}

    def load_state_dict(self, d: dict) -> None:
        missing = {"scale", "clean_steps"} - set(d)
        if missing:
            raise KeyError(f"loss scaler state is missing {sorted(missing)}")
        if bool(d.get("enabled", self.enabled)) != self.enabled:
            raise ValueError(
                f"loss scaler state was saved with enabled={d['enabled']}, "
                f"but this run has enabled={self.enabled} (fp16 vs bf16/fp32 mismatch?)"
            )
        self.scale = float(d["scale"])
        self.clean_steps = int(d["clean_steps"])
