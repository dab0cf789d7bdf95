"""The fine-tuning loop: data -> micro-batches -> loss -> sharded AdamW, with checkpoints,
evaluation, metrics and fault handling.

`train(config)` is the whole run; `run_finetuning.py` only parses arguments and calls it, and
tests call it directly (also inside spawned gloo processes).

Gradient convention (what the optimizer expects): on each replica the accumulated gradient is
d(sum over this replica's tokens of loss * mask) / dw divided by the number of trained tokens
of the whole global batch (times the loss scale in fp16). The optimizer sums over replicas,
which gives exactly the gradient of the global-batch mean loss, however the batch is split.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import data as datalib
from gptj import GPTJ, ModelConfig, ParallelContext
from gptj.parallel import all_reduce

from . import checkpoint as ckpt
from . import hardware
from .defaults import resolve_precision, resolve_threads, warn_slow_precision
from .distributed import all_reduce_max_int, barrier, init_distributed, world_size
from .evaluation import evaluate
from .interrupt import EXIT_CODE, NAMES, StopRequest
from .metrics import MetricsLogger, format_eval, peak_flops
from .resume import select_checkpoint
from .train_config import FinetuneConfig, TrainConfigError, check_layout


class TrainingDiverged(RuntimeError):
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
    adapters: Any = None  # LoRA: the trained gptj.lora.LoraAdapters
    elapsed_s: float = 0.0


# ---- learning-rate schedule ------------------------------------------------------------------------


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


# ---- building the pieces ------------------------------------------------------------------------------


def compute_dtype(precision: str, device: torch.device, mc: ModelConfig) -> tuple[str, torch.dtype]:
    """The precision name and dtype of the run ("auto" resolved for this device and model)."""
    from .precision import DTYPES

    precision = resolve_precision(precision, device, mc)
    return precision, DTYPES[precision]


def model_config_for(config: FinetuneConfig, tokenizer) -> ModelConfig:
    """The model shape: from the initial checkpoint, else the preset (+ shape overrides)."""
    m = config.model
    if m.name_or_path:
        from gptj.hf import read_model_config, resolve_checkpoint

        if m.shape:
            raise TrainConfigError("model.shape cannot change the shape of a pretrained model "
                                   f"({m.name_or_path})")
        return read_model_config(resolve_checkpoint(m.name_or_path))
    try:
        mc = ModelConfig.preset(m.preset)
        if m.match_tokenizer_vocab:
            mc = mc.replace(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                            bos_token_id=tokenizer.eos_id)
        return mc.replace(**m.shape) if m.shape else mc
    except (TypeError, ValueError) as err:
        raise TrainConfigError(f"model: {err}") from None


def base_quantization(config: FinetuneConfig):
    """The gptj.quant.QuantSpec of a quantized frozen base (LoRA), or None."""
    from gptj.quant import QuantSpec

    return QuantSpec.parse(config.model.quantize, config.model.group_size)


def load_model_for(config: FinetuneConfig, mc: ModelConfig, ctx: ParallelContext,
                   device: torch.device, dtype: torch.dtype):
    """The run's model (execution.model_loading.LoadedModel): the initial weights, quantized
    while loading for a quantized LoRA base, fresh LoRA adapters attached when enabled, block
    weights streamed from the host when asked."""
    from .model_loading import NewAdapters, load_model

    m = config.model
    lora = NewAdapters(config.lora.settings(), config.lora.init_seed) if config.lora.enabled else None
    return load_model(m.name_or_path or mc, ctx, device=device, precision=dtype,
                      quantize=base_quantization(config), adapters=lora,
                      offload=m.stream_block_weights, trainable=True, init_seed=m.init_seed,
                      recompute_blocks=m.recompute_blocks)


def eval_sources(config: FinetuneConfig, task) -> list[tuple[str, str, str | None]]:
    """(display name, source, split) of every evaluation split.

    Entries are "SOURCE" (a file: that file; otherwise the task's eval splits of it) or
    "SOURCE@SPLIT". Without entries: the task's eval splits of the training source. Names are
    plain split names when there is one entry, "SOURCE@SPLIT" when there are several.
    """
    default_source = config.data.dataset or task.sample
    entries = config.data.eval_datasets or [default_source or ""]
    out = []
    for entry in entries:
        source, at, split = entry.rpartition("@")
        if not at:
            source, split = entry, ""
        source = source or default_source or ""
        if split:
            splits = [split]
        elif Path(source).expanduser().is_file():
            out.append((Path(source).stem, source, None))
            continue
        else:
            splits = list(task.eval_splits)
        for name in splits:
            out.append((name if len(entries) == 1 else f"{source}@{name}", source, name))
    return out


def evaluated_on_training_rows(config: FinetuneConfig, task) -> list[str]:
    """Names of the evaluation splits that read the very file the model trains on."""
    if not _wants_eval(config):
        return []
    from data.pipeline import resolve_source
    from data.sources import Source

    def where(source, split):
        src = Source(resolve_source(task, source), split)
        return src.path.resolve() if src.path is not None else (src.spec, src.split)

    trained = where(config.data.dataset, task.train_split)
    return [name for name, source, split in eval_sources(config, task)
            if where(source, split or task.eval_splits[0]) == trained]


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True)
            for k, v in batch.items()}


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


def _check_resume(meta: dict, config: FinetuneConfig, mc: ModelConfig, ctx: ParallelContext,
                  path: Path, adapter_meta: dict | None) -> None:
    from .adapters import check_resume

    check_resume(meta, adapter_meta, path)
    saved_model = meta.get("model_config", {})
    if saved_model != mc.to_dict():
        diffs = [f"{k}: checkpoint {saved_model.get(k)!r}, this run {v!r}"
                 for k, v in mc.to_dict().items() if saved_model.get(k) != v]
        raise ckpt.CheckpointLoadError(f"checkpoint {path} holds a different model shape ({'; '.join(diffs)})")
    for key, want in (("tensor_parallel", ctx.tensor_parallel), ("replicas", ctx.replicas)):
        if meta.get(key) != want:
            raise ckpt.CheckpointLoadError(
                f"checkpoint {path} was written with {key}={meta.get(key)}, this run has {want}; "
                "resume with the same layout")
    saved_data = meta.get("config", {}).get("data", {})
    for key in ("sequence_length", "layout", "task", "dataset"):
        if saved_data.get(key) != getattr(config.data, key):
            raise ckpt.CheckpointLoadError(
                f"checkpoint {path} was trained with data.{key}={saved_data.get(key)!r}, "
                f"this run has {getattr(config.data, key)!r}")


# ---- the run ------------------------------------------------------------------------------------------


def train(config: FinetuneConfig, ctx: ParallelContext | None = None,
          device: torch.device | None = None) -> TrainResult:
    """Run (or resume) a fine-tuning run; collective over all ranks.

    `training.threads` applies for the run only: train() may be called inside a larger
    program (tests, notebooks) whose own thread setting must survive it.
    """
    threads = torch.get_num_threads()
    try:
        return _train(config, ctx, device)
    finally:
        torch.set_num_threads(threads)


def _train(config: FinetuneConfig, ctx: ParallelContext | None,
           device: torch.device | None) -> TrainResult:
    started = time.perf_counter()
    check_layout(config, ctx.world_size if ctx is not None else world_size())
    if ctx is None:
        ctx, default_device = init_distributed(config.parallel.tensor_parallel, config.parallel.timeout_s)
        device = device or default_device
    device = device or torch.device("cpu")
    main = ctx.is_main
    say = print if main else (lambda *a, **k: None)

    tokenizer = datalib.load_tokenizer(config.data.tokenizer or config.model.name_or_path)
    mc = model_config_for(config, tokenizer)
    check_layout(config, ctx.world_size, mc)
    from gptj.quant import QuantSpec
    from gptj.quantized import check_layout as check_quantized_layout

    quantized_eval = QuantSpec.parse(config.eval.quantize, config.eval.group_size)
    for spec in (base_quantization(config), quantized_eval):
        if spec is not None:
            check_quantized_layout(mc, ctx, spec)  # fails before training, not after it
    if ctx.tensor_parallel != config.parallel.tensor_parallel:
        raise TrainConfigError(f"the parallel context has tensor_parallel {ctx.tensor_parallel}, "
                               f"the config {config.parallel.tensor_parallel}")
    if tokenizer.vocab_size > mc.vocab_size:
        raise TrainConfigError(f"tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} tokens, "
                               f"the model only {mc.vocab_size}")
    precision, dtype = compute_dtype(config.training.precision, device, mc)
    chosen_threads = resolve_threads(config.training.threads, mc)
    if chosen_threads:
        torch.set_num_threads(chosen_threads)
    out = config.out_path
    root = ckpt.checkpoint_root(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        say("resolved config:\n" + yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
        say(f"machine: {hardware.detect().summary()}")
        say(f"layout: world {ctx.world_size} = tensor_parallel {ctx.tensor_parallel} x "
            f"replicas {ctx.replicas}; device {device.type}; precision {precision} "
            f"(configured {config.training.precision}); threads {torch.get_num_threads()} "
            f"(configured {config.training.threads})")
        warn_slow_precision(precision, device)
        say(f"model: {mc.num_parameters():,} parameters ({mc.num_layers} layers, d {mc.hidden_size})")

    torch.manual_seed(config.training.seed)
    np.random.seed(config.training.seed % 2**32)

    # Data: rank 0 tokenizes first so the others read its cache.
    task = datalib.load_task(config.data.task)

    def load_train(progress: bool):
        return datalib.build_train_data(
            task, config.data.dataset, tokenizer, config.data.sequence_length,
            layout=config.data.layout, loss_mask=config.data.loss_mask,
            keep_boundaries=config.data.keep_boundaries, split=task.train_split,
            strict=config.data.strict, cache_dir=config.data.cache_dir, progress=progress)

    def load_evals(progress: bool):
        return {name: datalib.build_eval_data(task, source, tokenizer, split,
                                              max_prompt_length=mc.max_positions - 8,
                                              strict=config.data.strict,
                                              cache_dir=config.data.cache_dir, progress=progress)
                for name, source, split in eval_sources(config, task)} if _wants_eval(config) else {}

    if main:
        train_data, eval_splits = load_train(True), load_evals(True)
        for name in evaluated_on_training_rows(config, task):
            print(f"warning: evaluation split {name} is the training data itself (no held-out data "
                  "given): its accuracy shows fit, not generalisation; name held-out data with "
                  "--eval-dataset", file=sys.stderr)
    barrier("rank 0 prepares the data")
    if not main:
        with contextlib.redirect_stderr(io.StringIO()):  # the data summary: printed by rank 0
            train_data, eval_splits = load_train(False), load_evals(False)

    t = config.training
    sampler = datalib.TrainSampler(train_data.num_rows, t.global_batch_size, t.micro_batch_size,
                                   ctx.replicas, ctx.replica_rank, t.seed)

    # Model, optimizer, loss scale.
    from .optimizer import ShardedAdamW
    from .precision import DynamicLossScaler

    loaded = load_model_for(config, mc, ctx, device, dtype)
    model, adapters, streamer = loaded.model, loaded.adapters, loaded.streamer
    # What the optimizer trains and checkpoints hold: the whole model, or only LoRA adapters.
    trained = model if adapters is None else adapters
    adapter_meta = None
    if adapters is not None:
        from gptj.lora import adapter_parameter_count

        from .adapters import adapter_meta as lora_meta

        adapter_meta = lora_meta(config, model, adapters)
        say(f"LoRA rank {adapters.settings.rank} on {', '.join(adapters.settings.targets)}: "
            f"{adapter_parameter_count(mc, adapters.settings):,} trainable parameters "
            f"({adapter_parameter_count(mc, adapters.settings) / mc.num_parameters():.3%} of the model); "
            f"base {adapter_meta['base_model']} frozen (fingerprint {adapter_meta['base_fingerprint']})")
    o = config.optimizer
    optimizer = ShardedAdamW(trained, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
                             offload=o.offload)
    ls = t.loss_scale
    scaler = DynamicLossScaler(init_scale=ls.init_scale, growth_factor=ls.growth_factor,
                               backoff_factor=ls.backoff_factor, growth_interval=ls.growth_interval,
                               min_scale=ls.min_scale, enabled=precision == "fp16")

    # Resume, or start over.
    step, bad_in_row, skipped_total = 0, 0, 0
    existing = ckpt.list_checkpoints(root)
    if existing and not config.resume and not config.checkpoint.overwrite:
        raise TrainConfigError(
            f"{root} already holds checkpoints (newest: step {existing[-1][0]}); pass --resume to "
            "continue that run, another --output-dir, or --set checkpoint.overwrite=true to start over")
    barrier("checkpoint directory check")  # every rank has looked before rank 0 removes anything
    if main:
        for path in ckpt.remove_partial(root):
            say(f"removed an incomplete checkpoint write: {path}")
        if existing and not config.resume:
            for _, path in existing:
                shutil.rmtree(path, ignore_errors=True)
            say(f"starting over: removed {len(existing)} checkpoint(s) of an earlier run in {root}")
    barrier("checkpoint directory cleanup")
    if config.resume:
        # The newest checkpoint whose files every rank verified (damaged ones are named and
        # skipped); `auto` and `true` differ only in the message when there is none.
        found = select_checkpoint(root, ctx.rank,
                                  check=lambda meta, path: _check_resume(meta, config, mc, ctx, path, adapter_meta))
        if found is None:
            say(f"resume: no checkpoint in {root}; starting from step 0" if config.resume != "auto"
                else f"resume auto: no checkpoint in {root} yet; starting from step 0")
        else:
            latest, meta = found
            if int(meta["step"]) >= t.steps:  # a finished run: no second eval, export or history line
                say(f"{latest} is already at step {meta['step']} of training.steps {t.steps}: nothing to do")
                if streamer is not None:
                    streamer.detach()
                return TrainResult(output_dir=out, final_step=int(meta["step"]), checkpoint=latest,
                                   nothing_to_do=True, elapsed_s=time.perf_counter() - started)
            meta = ckpt.load_checkpoint(latest, ctx.rank, trained, optimizer, verify=False)
            step = int(meta["step"])
            try:
                sampler.load_state_dict(meta["sampler"])
                scaler.load_state_dict(meta["loss_scaler"])
            except (KeyError, ValueError) as err:
                raise ckpt.CheckpointLoadError(f"checkpoint {latest} does not fit this run: {err}") from None
            bad_in_row, skipped_total = int(meta["bad_in_row"]), int(meta["skipped_steps"])
            say(f"resumed from {latest} at step {step}")

    report = optimizer.memory_report()
    if adapters is not None:
        report = {**report, "frozen_base_bytes": sum(p.numel() * p.element_size() for p in model.parameters()
                                                     if not p.requires_grad)}
    if streamer is not None:
        report = {**report, "streamed_resident_bytes": int(streamer.resident_bytes())}
    say("memory (this rank): " + ", ".join(
        f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in report.items()))

    logger = MetricsLogger(out, enabled=main, total_steps=t.steps, initial_step=step,
                           progress=config.logging.progress, tensorboard=config.logging.tensorboard,
                           append=config.resume and step > 0)
    peak = peak_flops(device, config.logging.peak_flops_per_device)
    flops_per_token = mc.flops_per_token(config.data.sequence_length)
    if adapters is not None:  # a frozen base skips the weight-gradient matmuls (see gptj/lora.py)
        from gptj.lora import lora_flops_per_token

        flops_per_token = lora_flops_per_token(mc, adapters.settings, config.data.sequence_length)
    tokens_per_step = t.global_batch_size * config.data.sequence_length

    def save(at_step: int) -> Path | None:
        """Write a checkpoint; on a failed write stop (raise) or, with on_error continue, go on."""
        meta = {"config": config.to_dict(), "model_config": mc.to_dict(),
                "tensor_parallel": ctx.tensor_parallel, "replicas": ctx.replicas,
                "world_size": ctx.world_size, "precision": precision,
                "sampler": sampler.state_dict(), "loss_scaler": scaler.state_dict(),
                "bad_in_row": bad_in_row, "skipped_steps": skipped_total, "adapters": adapter_meta}
        try:
            path = ckpt.save_checkpoint(root, at_step, ctx.rank, trained, optimizer, meta,
                                        config.checkpoint.keep)
        except ckpt.CheckpointWriteError as err:
            if config.checkpoint.on_error != "continue":
                logger.close()
                raise
            logger.write(f"warning: {err}; training continues (checkpoint.on_error: continue)")
            return None
        logger.write(f"checkpoint saved: {path}")
        return path

    def run_eval(at_step: int) -> dict:
        options = dict(batch_size=config.eval.batch_size, use_generate=config.eval.generate,
                       use_likelihood=config.eval.likelihood, max_new_tokens=config.eval.max_new_tokens,
                       max_examples=config.eval.max_examples)
        results = evaluate(model, eval_splits, tokenizer, device, **options)
        if quantized_eval is not None:
            from .model_loading import load_model

            # Shares every unquantized tensor and the LoRA adapters with the model; only the
            # quantized weights are new.
            quantized = load_model(model, quantize=quantized_eval).model
            for name, result in evaluate(quantized, eval_splits, tokenizer, device, **options).items():
                results[f"{name}@{quantized_eval.name}"] = result
            del quantized
        logger.log_eval(at_step, results)
        if main:
            with open(out / "eval_history.jsonl", "a") as f:
                f.write(json.dumps({"step": at_step, "splits": results}) + "\n")
        return results

    result = TrainResult(output_dir=out, final_step=step, model=model, adapters=adapters)
    last_saved = step if config.resume and step > 0 else None
    def announce(name: str) -> None:
        if main:
            print(f"\n{name}: finishing this step, then saving a checkpoint"
                  + (" (Ctrl-C again stops at once, unsaved)" if name.startswith("Ctrl-C") else ""),
                  file=sys.stderr, flush=True)

    with StopRequest(announce) as stop:
        while step < t.steps:
            signum = all_reduce_max_int(stop.signum, device)  # every rank stops at the same step
            if signum:
                result.stop_signal, result.exit_code = NAMES[signum], EXIT_CODE[signum]
                logger.write(f"stop requested ({result.stop_signal}) at step {step}: saving a checkpoint")
                result.checkpoint = save(step)
                result.stopped_by_signal = True
                break
            tick = time.perf_counter()
            lr = learning_rate(step, o.lr, t.steps, config.schedule.warmup_steps,
                               config.schedule.decay, config.schedule.min_lr_ratio)
            # Trained tokens of the whole global batch (every rank computes the same number).
            global_tokens = float(train_data.batch(sampler.global_batch())["loss_mask"].sum())
            denominator = max(global_tokens, 1.0)
            scale = scaler.scale
            loss_sum = accumulate_gradients(model, train_data, sampler.next_step(),
                                            scale / denominator, device)
            all_reduce(loss_sum, ctx.replica_group, name="training loss (replicas)")
            loss = float(loss_sum.item() / denominator)

            if math.isfinite(loss):
                res = optimizer.step(lr, loss_scale=scale)
                grad_norm, skipped, reason = res.grad_norm, res.skipped, res.reason
            else:
                optimizer.zero_grad()
                grad_norm, skipped, reason = float("nan"), True, "non-finite loss"
            overflow_backoff = skipped and scaler.enabled and scale > ls.min_scale and math.isfinite(loss)
            scaler.update(skipped)
            step += 1
            if skipped:
                skipped_total += 1
                bad_in_row = 0 if overflow_backoff else bad_in_row + 1
            else:
                bad_in_row = 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - tick
            tokens_per_s = tokens_per_step / elapsed
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                      "loss_scale": float(scale), "tokens_per_s": tokens_per_s,
                      "trained_tokens": int(global_tokens), "skipped": skipped,
                      "skip_reason": reason, "skipped_steps": skipped_total,
                      "step_time_s": elapsed, "epoch": sampler.position / sampler.num_rows}
            if peak:
                record["mfu"] = flops_per_token * tokens_per_s / (peak * ctx.world_size)
            logger.log_step(record)
            result.losses.append(loss)
            if skipped and not overflow_backoff:
                logger.write(f"step {step}: skipped ({reason}); {bad_in_row} bad step(s) in a row")
            if bad_in_row >= t.max_bad_steps:
                newest = ckpt.latest_checkpoint(root)
                logger.close()
                raise TrainingDiverged(
                    f"{bad_in_row} steps in a row had a non-finite loss or gradient (last: step {step}, "
                    f"{reason}); stopping. Newest good checkpoint: {newest or 'none'}")
            # No checkpoint while steps are failing: the newest one stays a known-good state.
            if (config.checkpoint.every and step % config.checkpoint.every == 0 and step < t.steps
                    and bad_in_row == 0):
                saved = save(step)
                if saved is not None:
                    result.checkpoint, last_saved = saved, step
            if config.eval.every and step % config.eval.every == 0 and step < t.steps:
                run_eval(step)

    logger.end_progress()
    result.final_step = step
    result.skipped_steps = skipped_total
    if not result.stopped_by_signal:
        if config.checkpoint.at_end and last_saved != step:
            result.checkpoint = save(step) or result.checkpoint
        if config.eval.at_end and eval_splits:
            result.eval = run_eval(step)
            if main:
                (out / "eval.json").write_text(json.dumps({"step": step, "splits": result.eval},
                                                          indent=2) + "\n")
        if config.checkpoint.export_hf and adapters is not None:
            from .adapters import base_source
            from .adapters import export as export_adapters
            from .precision import DTYPES

            export_dtype = config.checkpoint.export_dtype
            result.adapter_dir, result.hf_dir = export_adapters(
                adapters, model, out, tokenizer, config.model.name_or_path or base_source(config),
                None if export_dtype == "model" else DTYPES[export_dtype])
            if result.adapter_dir is not None:
                logger.write(f"exported PEFT adapter: {result.adapter_dir}; merged model: {result.hf_dir}")
        elif config.checkpoint.export_hf:
            result.hf_dir = export(model, out / "hf", tokenizer, config.checkpoint.export_dtype)
            if result.hf_dir is not None:
                logger.write(f"exported Hugging Face model: {result.hf_dir}")
    logger.close()
    if streamer is not None:
        streamer.detach()
    result.elapsed_s = time.perf_counter() - started
    if main and result.eval:
        say("final evaluation: " + format_eval(result.eval))
    return result


def _wants_eval(config: FinetuneConfig) -> bool:
    return config.eval.at_end or config.eval.every > 0


def export(model: GPTJ, out_dir: Path, tokenizer, export_dtype: str = "model") -> Path | None:
    """HF-format directory (config, safetensors, tokenizer); collective over the TP group."""
    from gptj.hf import export_hf

    from .precision import DTYPES

    dtype = None if export_dtype == "model" else DTYPES[export_dtype]
    return export_hf(model, out_dir, dtype=dtype, extra=lambda tmp: tokenizer.save(tmp))
