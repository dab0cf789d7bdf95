"""The bench_6b `qlora-int4` row: LoRA rank 8 over the pre-quantized int4 checkpoint, trained a
few optimizer steps on CPU through run_finetuning.py's own configuration and training loop.

The run: sequence 256 (packed rows of the bundled MNLI sample in the checkpoint's tokenizer),
micro-batch 1 = global batch 1, bf16, no evaluation, checkpoint or export. Reported: the step
time (mean of the steps after the first, which also allocates the optimizer state), the
process's peak RSS and where it was reached (before training: interpreter + torch; before the
first step: + the loaded base and the data; during the steps), and the planner's predicted
device total for the same layout on `cpu-24gb` (gptj/execution/training/planner.py) with its terms.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

GiB = 2**30
MACHINE = "cpu-24gb"


def _rss() -> dict:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024
            for key in ("VmRSS", "VmHWM")}


def step_precision(model_dir: str) -> str:
    """What `--precision auto` picks for this model here (bf16 with native bf16 matmuls, else
    fp32): the row trains in it, and the planner predicts for it."""
    from gptj.execution.runtime.defaults import resolve_precision
    from gptj.execution.training.planner import load_model_config

    return resolve_precision("auto", "cpu", load_model_config(model_dir))


def finetune_argv(model_dir: str, shape: dict, threads: int, out: str) -> list[str]:
    """run_finetuning.py's command line for the row (its tokenizer: the checkpoint's own)."""
    q = shape["qlora"]
    return ["--config", "tiny", "--model", model_dir, "--lora-rank", str(q["rank"]), "--quantize", "int4",
            "--group-size", str(q["group_size"]), "--sequence-length", str(q["seq"]), "--micro-batch-size", "1",
            "--global-batch-size", "1", "--steps", str(q["steps"]), "--precision", step_precision(model_dir),
            "--threads", str(threads), "--output-dir", out, "--eval-every", "0",
            "--set", "data.layout=packed", "--set", "data.loss_mask=all", "--set", "eval.at_end=false",
            "--set", "checkpoint.at_end=false", "--set", "checkpoint.export_hf=false",
            "--set", "logging.progress=false", "--set", "logging.tensorboard=false",
            "--set", "schedule.warmup_steps=0"]


def predicted(model_dir: str, shape: dict, recompute: bool) -> dict:
    """The planner's device bytes for this run's layout (tp 1 x 1 replica) on the CPU machine."""
    from gptj.execution.training.planner import (
        MACHINES,
        Layout,
        LoraPlan,
        load_model_config,
        plan_lora_layout,
    )

    q = shape["qlora"]
    config = load_model_config(model_dir)
    row = plan_lora_layout(config, Layout(1, 1, False, False, recompute), MACHINES[MACHINE], q["seq"], 1, 1,
                           step_precision(model_dir), LoraPlan(q["rank"], base="int4", group_size=q["group_size"]))
    return {"predicted_peak": row["device_total"], "predicted_terms": row["device_bytes"]}


def measure_qlora(model_dir: str, shape: dict, threads: int) -> dict:
    import gptj.commands.finetune as run_finetuning
    from gptj.execution.training import loop

    marks = {"before_train": _rss()}
    step = loop.Trainer.train_step

    def measured_step(self):  # RSS around every step, to tell the loaded base from the step's own
        marks.setdefault("before_first_step", _rss())
        try:
            return step(self)
        finally:
            marks.setdefault("after_steps", []).append(_rss())

    loop.Trainer.train_step = measured_step
    with tempfile.TemporaryDirectory() as tmp:
        config = run_finetuning.build_config(run_finetuning.parse_args(finetune_argv(model_dir, shape, threads, tmp)))
        run_finetuning.check_inputs(config)
        loop.train(config)
        steps = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    times = [s["step_time_s"] for s in steps]
    out = {"steps": len(times), "step_times_s": times, "first_step_s": times[0],
           "step_s": sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0],
           "tokens_per_step": shape["qlora"]["seq"], "precision": step_precision(model_dir),
           "runtime_rss": marks["before_train"]["VmRSS"],
           "loaded_rss": marks["before_first_step"]["VmRSS"], "loaded_peak_rss": marks["before_first_step"]["VmHWM"],
           "steps_peak_rss": marks["after_steps"][-1]["VmHWM"],
           **predicted(model_dir, shape, config.model.recompute_blocks)}
    out["measured_over_predicted"] = out["steps_peak_rss"] / out["predicted_peak"]
    return out


def qlora_line(row: dict) -> str:
    if "step_s" not in row:
        return f"| {row['row']} | {row.get('error', 'no result')} |||||||"
    terms = row["predicted_terms"]
    base = terms["weights"] / GiB
    rest = (row["predicted_peak"] - terms["weights"] - terms["reserved"]) / GiB
    return (f"| {row['row']} ({row.get('precision', 'bf16')}) | {row['step_s']:.1f} | {row['first_step_s']:.1f} | {row['runtime_rss'] / GiB:.2f} "
            f"| {row['loaded_rss'] / GiB:.2f} | {row['steps_peak_rss'] / GiB:.2f} | {row['predicted_peak'] / GiB:.2f} "
            f"(weights {base:.2f} + step {rest:.2f} + reserved {terms['reserved'] / GiB:.2f}) "
            f"| {row['measured_over_predicted']:.2f} |")


QLORA_HEADER = ["| row | step s (after the first) | first step s | RSS before loading GiB | RSS loaded GiB "
                "| peak RSS GiB | planner's peak GiB | measured / predicted |", "|---|---|---|---|---|---|---|---|"]
