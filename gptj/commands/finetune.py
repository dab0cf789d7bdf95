"""Fine-tune GPT-J on a text-to-text task (default: the `tiny` preset, offline, on CPU).

    python run_finetuning.py                                   # tiny model, bundled MNLI sample
    python run_finetuning.py --config gptj-6b-mnli-1gpu-offload
    torchrun --nproc-per-node 8 run_finetuning.py --config gptj-6b-mnli-8gpu
    python run_finetuning.py --resume --output-dir runs/tiny   # continue a run
    torchrun --nproc-per-node 8 --max-restarts 3 run_finetuning.py --config gptj-6b-mnli-8gpu  # resume: auto
    python run_finetuning.py --lora-rank 8                     # LoRA adapters on a frozen base

Presets live in gptj/config/finetuning.yml; any field can be set with --set section.field=value.
Writes OUTPUT_DIR/metrics.jsonl, eval.json, checkpoints/ and hf/ (a transformers model).
"""

from __future__ import annotations

import argparse
import signal
import sys

# Command-line option -> config field (typed by argparse; applied after --set overrides).
OPTION_FIELDS = {
    "model": "model.name_or_path",
    "tokenizer": "data.tokenizer",
    "dataset": "data.dataset",
    "task": "data.task",
    "eval_dataset": "data.eval_datasets",
    "output_dir": "output_dir",
    "steps": "training.steps",
    "global_batch_size": "training.global_batch_size",
    "micro_batch_size": "training.micro_batch_size",
    "sequence_length": "data.sequence_length",
    "lr": "optimizer.lr",
    "seed": "training.seed",
    "tensor_parallel": "parallel.tensor_parallel",
    "precision": "training.precision",
    "threads": "training.threads",
    "eval_every": "eval.every",
    "checkpoint_every": "checkpoint.every",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "quantize": "model.quantize",
    "group_size": "model.group_size",
}


DEFAULTS_NOTE = ("option defaults shown are those of --config tiny; another preset (gptj/config/finetuning.yml) "
                 "may set its own, and --set SECTION.FIELD=VALUE reaches any field. Multi-process: torchrun "
                 "--nproc-per-node N run_finetuning.py --tensor-parallel T ... (replicas = N / T).")


def preset_defaults():
    """The config an option left out falls back to (the default preset's), for --help."""
    from gptj.execution.training.config import DEFAULT_PRESET, load_config

    return load_config(DEFAULT_PRESET)


def parse_args(argv=None) -> argparse.Namespace:
    from gptj.config import threads_value
    from gptj.execution.inference.cli import default_text
    from gptj.execution.runtime.precision import PRECISION_CHOICES
    from gptj.model.quantized_linear import GROUP_SIZES, GROUP_SIZES_TEXT, QUANTIZE_MODES

    defaults = preset_defaults()

    def d(field: str) -> str:
        return default_text(defaults, field)

    p = argparse.ArgumentParser(
        prog="gptj-finetune", epilog=DEFAULTS_NOTE,
        description="Fine-tune GPT-J (tensor parallel x replicas, sharded AdamW, host offload).")
    model = p.add_argument_group("model")
    model.add_argument("--config", default="tiny", metavar="PRESET",
                       help="preset in gptj/config/finetuning.yml (default: tiny, the CPU demo)")
    model.add_argument("--preset-file", default=None, metavar="YAML",
                       help="another preset YAML file (default: gptj/config/finetuning.yml)")
    model.add_argument("--model", metavar="HF_ID_OR_DIR",
                       help="initial weights: HF directory or Hub id, or a gptj-finetune output dir (its hf/ "
                            f"export); default: random init of the preset's shape ({defaults.model.preset})")
    model.add_argument("--tokenizer", metavar="HF_ID_OR_DIR",
                       help="tokenizer (default: the one of --model when given, else the preset's: "
                            f"{defaults.data.tokenizer})")
    data = p.add_argument_group("data")
    data.add_argument("--task", metavar="NAME",
                      help="task name (gptj/config/tasks.yml) or task YAML file" + d("data.task"))
    data.add_argument("--dataset", metavar="SOURCE",
                      help="training data: bundled:NAME, a directory or file, or hf:NAME/CONFIG" + d("data.dataset"))
    data.add_argument("--eval-dataset", action="append", metavar="SOURCE[@SPLIT]",
                      help="evaluation data, repeatable (default: the task's validation splits)")
    data.add_argument("--sequence-length", type=int, metavar="N", help="tokens per row" + d("data.sequence_length"))
    training = p.add_argument_group("training")
    training.add_argument("--steps", type=int, metavar="N", help="optimizer steps" + d("training.steps"))
    training.add_argument("--global-batch-size", type=int, metavar="N",
                          help="rows per optimizer step, all replicas" + d("training.global_batch_size"))
    training.add_argument("--micro-batch-size", type=int, metavar="N",
                          help="rows per forward/backward per replica" + d("training.micro_batch_size"))
    training.add_argument("--lr", type=float, metavar="X", help="peak learning rate" + d("optimizer.lr"))
    training.add_argument("--seed", type=int, metavar="N", help="data order seed" + d("training.seed"))
    training.add_argument("--eval-every", type=int, metavar="N",
                          help="evaluate every N steps (0: at the end)" + d("eval.every"))
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-rank", type=int, metavar="R",
                      help="train LoRA adapters of rank R on the frozen base (0: full fine-tuning)" + d("lora.rank"))
    lora.add_argument("--lora-alpha", type=float, metavar="X", help="LoRA alpha (default: 2 x rank)")
    lora.add_argument("--lora-dropout", type=float, metavar="P",
                      help="dropout on the adapters' input" + d("lora.dropout"))
    lora.add_argument("--lora-targets", metavar="LIST",
                      help="comma-separated subset of q,k,v,out_proj,fc_in,fc_out (default: all)")
    lora.add_argument("--quantize", choices=("none", *QUANTIZE_MODES),
                      help="quantize the frozen base weights while loading (LoRA only)" + d("model.quantize"))
    lora.add_argument("--group-size", type=int, choices=GROUP_SIZES, metavar="N",
                      help=f"int4 group size of the quantized base: {GROUP_SIZES_TEXT}" + d("model.group_size"))
    hardware = p.add_argument_group("hardware")
    hardware.add_argument("--tensor-parallel", type=int, metavar="T",
                          help="tensor-parallel ranks (launch with torchrun)" + d("parallel.tensor_parallel"))
    hardware.add_argument("--precision", choices=PRECISION_CHOICES,
                          help="compute precision (auto: bf16 where the GPU or CPU runs it natively and the "
                               "model is not tiny, else fp32)" + d("training.precision"))
    hardware.add_argument("--threads", type=threads_value, metavar="N|auto",
                          help="CPU threads per process (auto: 1 for tiny models, else the physical cores)"
                               + d("training.threads"))
    output = p.add_argument_group("output")
    output.add_argument("--output-dir", metavar="DIR", help="run directory (default: runs/<preset>)")
    output.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="checkpoint every N steps (0: at the end)" + d("checkpoint.every"))
    output.add_argument("--resume", nargs="?", const=True, choices=["auto"], default=None,
                        help="continue from the newest valid checkpoint in the output dir; `--resume auto`: "
                             "also start fresh when there is none, for torchrun --max-restarts (default: a "
                             "fresh run)")
    output.add_argument("--show-config", action="store_true",
                        help="print the full resolved config at the start (it is always written to "
                             "OUTPUT_DIR/config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set schedule.warmup_steps=10")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, changes: list[str] | None = None):
    """The run's config: the preset with this command line applied; for --resume of a run
    directory that keeps its config (OUTPUT_DIR/config.yaml), that config with this command
    line applied, the settings it changes appended to `changes`."""
    from gptj.execution.training.config import PRESET_FILE, load_config
    from gptj.execution.training.run_config import resumed_config

    updates = {field: getattr(args, option) for option, field in OPTION_FIELDS.items()
               if getattr(args, option) is not None}
    if args.model and not args.tokenizer:
        updates["data.tokenizer"] = None  # the model's own tokenizer, not the preset's
    if args.lora_targets:
        updates["lora.targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.resume:
        updates["resume"] = args.resume  # True or "auto"
    if args.show_config:
        updates["logging.show_config"] = True
    config = load_config(args.config, args.set, updates, args.preset_file or PRESET_FILE)
    if args.resume:
        config, changed = resumed_config(config, args.set, updates)
        if changes is not None:
            changes.extend(changed)
    return config


def check_inputs(config) -> None:
    """Output directory, model and data files, before any model is built or data is read."""
    from gptj.execution.runtime.preflight import check_output_dir, resolve_model_source
    from gptj.execution.training.data_loading import check_data_sources
    from gptj.execution.training.run_setup import check_run_dir

    check_output_dir(config.out_path)
    check_run_dir(config)  # a fresh run into a used directory: refused before any loading
    if config.model.name_or_path:
        config.model.name_or_path = resolve_model_source(config.model.name_or_path)
    check_data_sources(config)


def main(argv=None) -> int:
    args = parse_args(argv)
    import os

    from gptj.config import PresetError
    from gptj.data import DataError
    from gptj.errors import GPTJError
    from gptj.execution.runtime.distributed import shutdown
    from gptj.execution.runtime.model_files import model_file_errors
    from gptj.execution.training.checkpoint import CheckpointLoadError, CheckpointWriteError
    from gptj.execution.training.config import TrainConfigError
    from gptj.execution.training.loop import TrainingDiverged, train
    from gptj.model import ConfigError
    from gptj.model.hf import CheckpointError
    from gptj.model.parallel import CollectiveError

    rank = int(os.environ.get("RANK", "0"))
    try:
        changes: list[str] = []
        config = build_config(args, changes)
        if rank == 0 and changes:
            print("\n".join(changes), flush=True)
        check_inputs(config)
        with model_file_errors(config.model.name_or_path):  # a cut weight file: one line naming it
            result = train(config)
        if rank == 0:
            print(summary_line(result, config))
        return result.exit_code
    except (PresetError, TrainConfigError, ConfigError) as err:
        if rank == 0:
            print(f"error: invalid configuration: {err}", file=sys.stderr)
        return 2
    except DataError as err:  # bad or missing data: the user's input
        print(f"error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr)
        return 2
    except CheckpointWriteError as err:  # the same message on every rank
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, CheckpointLoadError, TrainingDiverged, CollectiveError) as err:
        print(f"error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr)
        return 1
    except GPTJError as err:  # any other bad input (a path, a model file): one line
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C before training started, or a second one
        if rank == 0:
            print(interrupted_message(err, args), file=sys.stderr)
        return 130
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late Ctrl-C: no traceback now
        try:
            shutdown()
        finally:
            signal.signal(signal.SIGINT, previous)


def summary_line(result, config) -> str:
    if result.nothing_to_do:
        return (f"already at step {result.final_step} of {config.training.steps}: nothing to do "
                f"(raise --steps to train on); outputs in {result.output_dir}")
    if result.stopped_by_signal:
        return (f"stopped by {result.stop_signal} at step {result.final_step}; checkpoint "
                f"{result.checkpoint}; continue with --resume --output-dir {result.output_dir}")
    return f"done: {result.final_step} steps in {result.elapsed_s:.1f} s; outputs in {result.output_dir}"


def interrupted_message(err: KeyboardInterrupt, args: argparse.Namespace) -> str:
    """One line for a run stopped at once by Ctrl-C: what was kept and how to go on."""
    from gptj.execution.runtime.interrupt import Aborted
    from gptj.execution.training.checkpoint import checkpoint_root, latest_checkpoint

    try:
        out = build_config(args).out_path
        newest = latest_checkpoint(checkpoint_root(out))
    except Exception:  # the configuration itself may be what was being read
        out = newest = None
    how = "aborted by a second Ctrl-C" if isinstance(err, Aborted) else "interrupted by Ctrl-C"
    if newest is None:
        return f"{how}: no checkpoint was saved"
    return (f"{how}: the steps after the newest checkpoint ({newest}) are not saved; "
            f"continue with --resume --output-dir {out}")


if __name__ == "__main__":
    sys.exit(main())
