"""The fine-tuning loop: data -> micro-batches -> loss -> sharded AdamW, with checkpoints,
evaluation, metrics and fault handling.

`train(config)` is the whole run; `run_finetuning.py` only parses arguments and calls it, and
tests call it directly (also inside spawned gloo processes).

Gradient convention (what the optimizer expects): on each replica the accumulated gradient is
d(sum over this replica's tokens of loss * mask) / dw divided by the number of trained tokens
of the whole global batch (times the loss scale in fp16). The optimizer sums over replicas,
which gives exactly the gradient of the global-batch mean loss, however the batch is split.

The run reads top-down in `Trainer`: `setup` (checks, data, model, optimizer), `resume`, then
`run` repeating `train_step`, with `save_checkpoint` and `evaluate` on their schedules, and
`finish` (the last checkpoint, evaluation and export). What is settled before the first step
lives in gptj/execution/training/run_setup.py and gptj/execution/training/data_loading.py; the export in gptj/execution/training/export.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gptj.data as datalib
from gptj.errors import GPTJError
from gptj.execution.runtime.defaults import resolve_threads
from gptj.execution.runtime.distributed import all_reduce_max_int, init_distributed, world_size
from gptj.execution.runtime.interrupt import EXIT_CODE, NAMES, StopRequest
from gptj.execution.training import checkpoint as ckpt
from gptj.execution.training.config import FinetuneConfig, check_layout
from gptj.execution.training.data_loading import (
    eval_sources,
    evaluated_on_training_rows,
    load_run_data,
    to_device,
)
from gptj.execution.training.evaluation import evaluate
from gptj.execution.training.export import export, export_run
from gptj.execution.training.metrics import MetricsLogger, format_eval, peak_flops
from gptj.execution.training.resume import select_checkpoint
from gptj.execution.training.run_config import save_run_config
from gptj.execution.training.run_setup import (
    base_quantization,
    check_resume,
    check_run,
    compute_dtype,
    describe_adapters,
    describe_run,
    eval_quantization,
    load_model_for,
    model_config_for,
    prepare_checkpoint_root,
    remove_if_empty,
)
from gptj.model import GPTJ, ParallelContext
from gptj.model.parallel import CollectiveError, all_reduce

# Kept importable from here: the names the run's callers and tests use.
__all__ = ["TrainResult", "TrainingDiverged", "accumulate_gradients", "base_quantization",
           "compute_dtype", "eval_sources", "evaluated_on_training_rows", "export", "learning_rate",
           "model_config_for", "to_device", "train"]


class TrainingDiverged(GPTJError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    output_dir: Path
    final_step: int
    losses: list[float] = field(default_factory=list)  # per step run by this call
    skipped_steps: int = 0
    stopped_by_signal: bool = False
    stop_signal: str = ""  # "SIGTERM" or "Ctrl-C (SIGINT)" when stopped_by_signal
    exit_code: int = 0  # what the command line exits with (130 after Ctrl-C)
    nothing_to_do: bool = False  # resumed at or past training.steps: nothing was run or written
    eval: dict | None = None
    checkpoint: Path | None = None
    hf_dir: Path | None = None
    adapter_dir: Path | None = None  # LoRA: the PEFT adapter export
    model: Any = None
    adapters: Any = None  # LoRA: the trained gptj.model.lora.LoraAdapters
    elapsed_s: float = 0.0


# ---- learning-rate schedule and the gradients of one step ---------------------------------------


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  decay: str = "constant", min_lr_ratio: float = 0.0) -> float:
    """lr for 0-based optimizer step `step`: linear warmup, then constant/linear/cosine decay."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        factor = 1.0 - progress
    elif decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr decay {decay!r}")
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)


def _model_kwargs(batch: dict[str, torch.Tensor], segments_all_one: bool) -> dict:
    # Rows without padding or boundaries need no explicit mask: plain causal attention is faster.
    kwargs = {"position_ids": batch["position_ids"]}
    if not segments_all_one:
        kwargs["segment_ids"] = batch["segment_ids"]
    return kwargs


def accumulate_gradients(model: GPTJ, train_data, micro_batches: list, weight: float,
                         device: torch.device) -> torch.Tensor:
    """Forward + backward of this replica's micro-batches; returns the summed masked loss.

    Each micro-batch's summed token loss is multiplied by `weight` (loss scale / trained tokens
    of the global batch) before backward, so the gradients add up to the convention above.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for indices in micro_batches:
        rows = train_data.batch(indices)
        one = bool((rows["segment_ids"] == 1).all())
        batch = to_device(rows, device)
        losses = model.token_losses(batch["input_ids"], batch["labels"], **_model_kwargs(batch, one))
        contribution = (losses * batch["loss_mask"]).sum()
        (contribution * weight).backward()
        loss_sum += contribution.detach().double()
    return loss_sum


# ---- the run ------------------------------------------------------------------------------------------


def train(config: FinetuneConfig, ctx: ParallelContext | None = None,
          device: torch.device | None = None) -> TrainResult:
    """Run (or resume) a fine-tuning run; collective over all ranks.

    `training.threads` applies for the run only: train() may be called inside a larger
    program (tests, notebooks) whose own thread setting must survive it.
    """
    threads = torch.get_num_threads()
    created = not config.out_path.exists()
    try:
        return Trainer(config, ctx, device).run()
    except BaseException:
        if created and (ctx is None or ctx.is_main):
            remove_if_empty(config.out_path)
        raise
    finally:
        torch.set_num_threads(threads)


class Trainer:
    """One rank's part of a fine-tuning run: built by `setup`, driven by `run`."""

    def __init__(self, config: FinetuneConfig, ctx: ParallelContext | None, device: torch.device | None):
        self.started = time.perf_counter()
        check_layout(config, ctx.world_size if ctx is not None else world_size())
        if ctx is None:
            ctx, default_device = init_distributed(config.parallel.tensor_parallel, config.parallel.timeout_s)
            device = device or default_device
        self.config, self.ctx, self.device = config, ctx, device or torch.device("cpu")
        self.main = ctx.is_main
        self.step, self.bad_in_row, self.skipped_total = 0, 0, 0

    def say(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs)

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Checks, the run's description, data, model, optimizer and loss scale."""
        config, ctx, device = self.config, self.ctx, self.device
        self.tokenizer = datalib.load_tokenizer(config.data.tokenizer or config.model.name_or_path)
        self.mc = mc = model_config_for(config, self.tokenizer)
        check_layout(config, ctx.world_size, mc)
        check_run(config, mc, ctx, self.tokenizer)
        self.quantized_eval = eval_quantization(config)
        self.precision, self.dtype = compute_dtype(config.training.precision, device, mc)
        chosen_threads = resolve_threads(config.training.threads, mc)
        if chosen_threads:
            torch.set_num_threads(chosen_threads)
        self.out = config.out_path
        self.root = ckpt.checkpoint_root(self.out)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            describe_run(config, mc, ctx, device, self.precision)

        torch.manual_seed(config.training.seed)
        np.random.seed(config.training.seed % 2**32)
        task = datalib.load_task(config.data.task)
        self.train_data, self.eval_splits = load_run_data(config, task, self.tokenizer, mc.max_positions, self.main)
        t = config.training
        self.sampler = datalib.TrainSampler(self.train_data.num_rows, t.global_batch_size, t.micro_batch_size,
                                            ctx.replicas, ctx.replica_rank, t.seed)
        self._build_model()

    def _build_model(self) -> None:
        from gptj.execution.training.loss_scaling import DynamicLossScaler
        from gptj.execution.training.optimizer import ShardedAdamW

        config = self.config
        loaded = load_model_for(config, self.mc, self.ctx, self.device, self.dtype)
        self.model, self.adapters, self.streamer = loaded.model, loaded.adapters, loaded.streamer
        # What the optimizer trains and checkpoints hold: the whole model, or only LoRA adapters.
        self.trained = self.model if self.adapters is None else self.adapters
        self.adapter_meta = None
        if self.adapters is not None:
            from gptj.execution.training.lora_runs import adapter_meta

            self.adapter_meta = adapter_meta(config, self.model, self.adapters)
            self.say(describe_adapters(self.mc, self.adapters, self.adapter_meta))
        o, ls = config.optimizer, config.training.loss_scale
        self.optimizer = ShardedAdamW(self.trained, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
                                      offload=o.offload)
        self.scaler = DynamicLossScaler(init_scale=ls.init_scale, growth_factor=ls.growth_factor,
                                        backoff_factor=ls.backoff_factor, growth_interval=ls.growth_interval,
                                        min_scale=ls.min_scale, enabled=self.precision == "fp16")

    # ---- resume --------------------------------------------------------------------------------
    def resume(self) -> TrainResult | None:
        """Continue from the newest verified checkpoint (or start over); a TrainResult when the
        run is already finished and nothing is to be done."""
        config, root = self.config, self.root
        prepare_checkpoint_root(config, root, self.main, self.say)
        if not config.resume:
            return None
        # The newest checkpoint whose files every rank verified (damaged ones are named and
        # skipped); `auto` and `true` differ only in the message when there is none.
        found = select_checkpoint(root, self.ctx.rank, check=lambda meta, path: check_resume(
            meta, config, self.mc, self.ctx, path, self.adapter_meta))
        if found is None:
            self.say(f"resume: no checkpoint in {root}; starting from step 0" if config.resume != "auto"
                     else f"resume auto: no checkpoint in {root} yet; starting from step 0")
            return None
        latest, meta = found
        steps = config.training.steps
        if int(meta["step"]) >= steps:  # a finished run: no second eval, export or history line
            self.say(f"{latest} is already at step {meta['step']} of training.steps {steps}: nothing to do")
            if self.streamer is not None:
                self.streamer.detach()
            return TrainResult(output_dir=self.out, final_step=int(meta["step"]), checkpoint=latest,
                               nothing_to_do=True, elapsed_s=time.perf_counter() - self.started)
        meta = ckpt.load_checkpoint(latest, self.ctx.rank, self.trained, self.optimizer, verify=False)
        self.step = int(meta["step"])
        try:
            self.sampler.load_state_dict(meta["sampler"])
            self.scaler.load_state_dict(meta["loss_scaler"])
        except (KeyError, ValueError) as err:
            raise ckpt.CheckpointLoadError(f"checkpoint {latest} does not fit this run: {err}") from None
        self.bad_in_row, self.skipped_total = int(meta["bad_in_row"]), int(meta["skipped_steps"])
        self.say(f"resumed from {latest} at step {self.step}")
        return None

    def start_logging(self) -> None:
        """The memory report, the metrics logger and the throughput constants of a step."""
        config, mc = self.config, self.mc
        report = self.optimizer.memory_report()
        if self.adapters is not None:
            report = {**report, "frozen_base_bytes": sum(p.numel() * p.element_size()
                                                         for p in self.model.parameters() if not p.requires_grad)}
        if self.streamer is not None:
            report = {**report, "streamed_resident_bytes": int(self.streamer.resident_bytes())}
        self.say("memory (this rank): " + ", ".join(
            f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in report.items()))
        self.logger = MetricsLogger(self.out, enabled=self.main, total_steps=config.training.steps,
                                    initial_step=self.step, progress=config.logging.progress,
                                    tensorboard=config.logging.tensorboard,
                                    append=config.resume and self.step > 0)
        self.peak = peak_flops(self.device, config.logging.peak_flops_per_device)
        seq = config.data.sequence_length
        self.flops_per_token = mc.flops_per_token(seq)
        if self.adapters is not None:  # a frozen base skips the weight-gradient matmuls (see gptj/model/lora.py)
            from gptj.model.lora import lora_flops_per_token

            self.flops_per_token = lora_flops_per_token(mc, self.adapters.settings, seq)
        self.tokens_per_step = config.training.global_batch_size * seq

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.setup()
        finished = self.resume()
        if finished is not None:
            return finished
        self.start_logging()
        config, steps = self.config, self.config.training.steps
        if self.main:  # what --resume --output-dir continues (gptj/execution/training/run_config.py)
            save_run_config(config, self.out)
        result = TrainResult(output_dir=self.out, final_step=self.step, model=self.model, adapters=self.adapters)
        self.last_saved = self.step if config.resume and self.step > 0 else None
        with StopRequest(self._announce_stop) as stop, self._error_on_its_own_line():
            while self.step < steps:
                signum = all_reduce_max_int(stop.signum, self.device)  # every rank stops at the same step
                if signum:
                    result.stop_signal, result.exit_code = NAMES[signum], EXIT_CODE[signum]
                    self.logger.write(f"stop requested ({result.stop_signal}) at step {self.step}: "
                                      "saving a checkpoint")
                    result.checkpoint = self.save_checkpoint(self.step)
                    result.stopped_by_signal = True
                    break
                result.losses.append(self.train_step())
                # No checkpoint while steps are failing: the newest one stays a known-good state.
                if (config.checkpoint.every and self.step % config.checkpoint.every == 0
                        and self.step < steps and self.bad_in_row == 0):
                    saved = self.save_checkpoint(self.step)
                    if saved is not None:
                        result.checkpoint, self.last_saved = saved, self.step
                if config.eval.every and self.step % config.eval.every == 0 and self.step < steps:
                    self.evaluate(self.step)
        return self.finish(result)

    @contextlib.contextmanager
    def _error_on_its_own_line(self):
        """A rank that dies mid-step leaves the others a CollectiveError to print: end the progress
        bar first (and, on ranks without one, the line another rank's bar leaves on a shared
        terminal), so that the error is a line of its own."""
        try:
            yield
        except CollectiveError:
            if self.logger.bar is not None:
                self.logger.end_progress()
            elif self.config.logging.progress and sys.stderr.isatty():
                print(file=sys.stderr, flush=True)
            raise

    def _announce_stop(self, name: str) -> None:
        if self.main:
            print(f"\n{name}: finishing this step, then saving a checkpoint"
                  + (" (Ctrl-C again stops at once, unsaved)" if name.startswith("Ctrl-C") else ""),
                  file=sys.stderr, flush=True)

    def train_step(self) -> float:
        """One optimizer step over the global batch; logs it and returns its loss. Raises
        TrainingDiverged after training.max_bad_steps failed steps in a row."""
        config, t, sampler, scaler = self.config, self.config.training, self.sampler, self.scaler
        tick = time.perf_counter()
        lr = learning_rate(self.step, config.optimizer.lr, t.steps, config.schedule.warmup_steps,
                           config.schedule.decay, config.schedule.min_lr_ratio)
        # Trained tokens of the whole global batch (every rank computes the same number).
        global_tokens = float(self.train_data.batch(sampler.global_batch())["loss_mask"].sum())
        denominator = max(global_tokens, 1.0)
        scale = scaler.scale
        loss_sum = accumulate_gradients(self.model, self.train_data, sampler.next_step(),
                                        scale / denominator, self.device)
        all_reduce(loss_sum, self.ctx.replica_group, name="training loss (replicas)")
        loss = float(loss_sum.item() / denominator)

        if math.isfinite(loss):
            res = self.optimizer.step(lr, loss_scale=scale)
            grad_norm, skipped, reason = res.grad_norm, res.skipped, res.reason
        else:
            self.optimizer.zero_grad()
            grad_norm, skipped, reason = float("nan"), True, "non-finite loss"
        overflow_backoff = skipped and scaler.enabled and scale > t.loss_scale.min_scale and math.isfinite(loss)
        scaler.update(skipped)
        self.step += 1
        if skipped:
            self.skipped_total += 1
            self.bad_in_row = 0 if overflow_backoff else self.bad_in_row + 1
        else:
            self.bad_in_row = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - tick
        tokens_per_s = self.tokens_per_step / elapsed
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                  "loss_scale": float(scale), "tokens_per_s": tokens_per_s,
                  "trained_tokens": int(global_tokens), "skipped": skipped,
                  "skip_reason": reason, "skipped_steps": self.skipped_total,
                  "step_time_s": elapsed, "epoch": sampler.position / sampler.num_rows}
        if self.peak:
            record["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.ctx.world_size)
        self.logger.log_step(record)
        if skipped and not overflow_backoff:
            self.logger.write(f"step {self.step}: skipped ({reason}); {self.bad_in_row} bad step(s) in a row")
        if self.bad_in_row >= t.max_bad_steps:
            newest = ckpt.latest_checkpoint(self.root)
            self.logger.close()
            raise TrainingDiverged(
                f"{self.bad_in_row} steps in a row had a non-finite loss or gradient (last: step {self.step}, "
                f"{reason}); stopping. Newest good checkpoint: {newest or 'none'}")
        return loss

    # ---- checkpoint, evaluation, export --------------------------------------------------------
    def save_checkpoint(self, at_step: int) -> Path | None:
        """Write a checkpoint; on a failed write stop (raise) or, with on_error continue, go on."""
        config, ctx = self.config, self.ctx
        meta = {"config": config.to_dict(), "model_config": self.mc.to_dict(),
                "tensor_parallel": ctx.tensor_parallel, "replicas": ctx.replicas,
                "world_size": ctx.world_size, "precision": self.precision,
                "sampler": self.sampler.state_dict(), "loss_scaler": self.scaler.state_dict(),
                "bad_in_row": self.bad_in_row, "skipped_steps": self.skipped_total,
                "adapters": self.adapter_meta}
        try:
            path = ckpt.save_checkpoint(self.root, at_step, ctx.rank, self.trained, self.optimizer, meta,
                                        config.checkpoint.keep)
        except ckpt.CheckpointWriteError as err:
            if config.checkpoint.on_error != "continue":
                self.logger.close()
                raise
            self.logger.write(f"warning: {err}; training continues (checkpoint.on_error: continue)")
            return None
        self.logger.write(f"checkpoint saved: {path}")
        return path

    def evaluate(self, at_step: int, show: bool = True) -> dict:
        """Every evaluation split (and again on the quantized model when eval.quantize is set);
        logged and appended to eval_history.jsonl."""
        e = self.config.eval
        options = dict(batch_size=e.batch_size, use_generate=e.generate, use_likelihood=e.likelihood,
                       max_new_tokens=e.max_new_tokens, max_examples=e.max_examples)
        results = evaluate(self.model, self.eval_splits, self.tokenizer, self.device, **options)
        if self.quantized_eval is not None:
            from gptj.execution.runtime.model_loading import load_model

            # Shares every unquantized tensor and the LoRA adapters with the model; only the
            # quantized weights are new.
            quantized = load_model(self.model, quantize=self.quantized_eval).model
            for name, result in evaluate(quantized, self.eval_splits, self.tokenizer, self.device,
                                         **options).items():
                results[f"{name}@{self.quantized_eval.name}"] = result
            del quantized
        self.logger.log_eval(at_step, results, show)
        if self.main:
            with open(self.out / "eval_history.jsonl", "a") as f:
                f.write(json.dumps({"step": at_step, "splits": results}) + "\n")
        return results

    def finish(self, result: TrainResult) -> TrainResult:
        """After the loop: the last checkpoint, the final evaluation and the export (not after a
        stop signal), then the logs closed and the streamer detached."""
        config, step = self.config, self.step
        self.logger.end_progress()
        result.final_step = step
        result.skipped_steps = self.skipped_total
        if not result.stopped_by_signal:
            if config.checkpoint.at_end and self.last_saved != step:
                result.checkpoint = self.save_checkpoint(step) or result.checkpoint
            if config.eval.at_end and self.eval_splits:
                result.eval = self.evaluate(step, show=False)  # shown once, as the last line
                if self.main:
                    (self.out / "eval.json").write_text(json.dumps({"step": step, "splits": result.eval},
                                                                   indent=2) + "\n")
            if config.checkpoint.export_hf:
                result.adapter_dir, result.hf_dir = export_run(config, self.model, self.adapters, self.out,
                                                               self.tokenizer, self.logger.write)
        self.logger.close()
        if self.streamer is not None:
            self.streamer.detach()
        result.elapsed_s = time.perf_counter() - self.started
        if self.main and result.eval:
            self.say("final evaluation: " + format_eval(result.eval))
        return result
