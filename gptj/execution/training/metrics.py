"""Per-step metrics: JSON lines, optional TensorBoard, a progress bar. Rank 0 only.

Other ranks get a `MetricsLogger(enabled=False)` whose methods do nothing, so the loop never
asks "am I rank 0?" before logging.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

# Dense bf16/fp16 tensor-core peaks per device, for the MFU estimate (FLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "V100": 125e12}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The per-device peak used for MFU: configured, else looked up by CUDA device name."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep it readable
    return value


def tensorboard_missing(err: ImportError) -> str:
    missing = getattr(err, "name", None)
    return "its package is not installed" + (f" ({missing})" if missing and missing != "tensorboard" else "")


class MetricsLogger:
    def __init__(self, output_dir: str | os.PathLike | None, enabled: bool = True,
                 total_steps: int = 0, initial_step: int = 0, progress: bool = True,
                 tensorboard: bool = True, append: bool = False):
        self.enabled = enabled and output_dir is not None
        self.file = None
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        if append and self.path.exists():
            self._truncate_after(initial_step)
        self.file = open(self.path, "a" if append else "w")  # noqa: SIM115 (open for the run)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=initial_step + 1)
            except ImportError as err:  # tensorboard is optional, but asked for: say it is off
                self.writer = None
                print(f"tensorboard: off, {tensorboard_missing(err)}; every step is in {self.path} "
                      "(pip install tensorboard, or --set logging.tensorboard=false)", file=sys.stderr, flush=True)
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """Drop lines of steps after `step` (written after the checkpoint a run resumes from)."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        self.path.write_text("".join(line + "\n" for line in kept))

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        step = record["step"]
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def log_eval(self, step: int, results: dict[str, Any], show: bool = True) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for split, res in results.items():
                for key in ("accuracy_generate", "accuracy_likelihood"):
                    if res.get(key) is not None:
                        self.writer.add_scalar(f"eval/{split}/{key}", res[key], step)
        if show:
            self.write(f"eval at step {step}: " + format_eval(results))

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def end_progress(self) -> None:
        """Close the bar when the steps are done, so later lines print plainly."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_progress()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
        self.bar = self.writer = self.file = None


def format_eval(results: dict[str, Any]) -> str:
    parts = []
    for split, res in results.items():
        fields = [f"{key.removeprefix('accuracy_')} {res[key]:.4f}"
                  for key in ("accuracy_generate", "accuracy_likelihood") if res.get(key) is not None]
        if res.get("invalid_generations") is not None:
            fields.append(f"invalid {res['invalid_generations']}")
        parts.append(f"{split}: " + ", ".join(fields) + f" (n={res['num_examples']})")
    return "; ".join(parts)
