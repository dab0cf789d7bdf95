"""Generate text with GPT-J (default: the `tiny` preset, a random model, offline, on CPU).

    python run_inference.py                                        # tiny preset, prints tokens/s
    python run_inference.py --model runs/tiny --prompt "mnli hypothesis: ... target:"
    python run_inference.py --config gptj-6b --prompt "The capital of France is" --stream
    python run_inference.py --model runs/tiny --quantize int8           # weight-only int8
    torchrun --nproc-per-node 2 run_inference.py --config gptj-6b-tp2 --prompts-file prompts.jsonl

Presets live in gptj/config/inference.yml; options override them, --set section.field=value
reaches any field. Reports time to first token and prefill / decode tokens per second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import warnings
from pathlib import Path

from gptj.errors import UsageError

# Command-line option -> config field (the model's own: gptj/execution/inference/cli.py).
OPTION_FIELDS = {
    "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature",
    "top_k": "generation.top_k",
    "top_p": "generation.top_p",
    "seed": "generation.seed",
    "stop": "generation.stop",
    "batch_size": "generation.batch_size",
    "output": "output",
}


def parse_args(argv=None) -> argparse.Namespace:
    from gptj.execution.inference.cli import DEFAULTS_NOTE, add_model_arguments, default_text, preset_defaults

    defaults = preset_defaults()

    def d(field: str) -> str:
        return default_text(defaults, field)

    p = argparse.ArgumentParser(prog="gptj-generate", epilog=DEFAULTS_NOTE,
                                description="Generate text with GPT-J (static KV cache, continuous batching).")
    add_model_arguments(p, defaults=defaults)
    prompts = p.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="a prompt (repeatable; default: the preset's example prompt)")
    prompts.add_argument("--prompts-file", metavar="FILE",
                         help="one prompt per line, or JSON lines with a \"prompt\" field (UTF-8)")
    prompts.add_argument("--truncate-prompts", action="store_true", help="keep the last tokens of too-long prompts")
    prompts.add_argument("--batch-size", type=int, metavar="N",
                         help="prompts generated together" + d("generation.batch_size"))
    sampling = p.add_argument_group("generation")
    sampling.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens per prompt" + d("generation.max_new_tokens"))
    sampling.add_argument("--temperature", type=float, metavar="X", help="0: greedy" + d("generation.temperature"))
    sampling.add_argument("--top-k", type=int, metavar="N", help="0: all tokens" + d("generation.top_k"))
    sampling.add_argument("--top-p", type=float, metavar="X", help="nucleus mass" + d("generation.top_p"))
    sampling.add_argument("--seed", type=int, metavar="N", help="sampling seed" + d("generation.seed"))
    sampling.add_argument("--stop", action="append", metavar="TEXT",
                          help="stop string (repeatable); \\n, \\t, \\r and \\\\ are read as escapes")
    output = p.add_argument_group("output")
    output.add_argument("--output", metavar="FILE", help="write JSONL results")
    output.add_argument("--stream", action="store_true", help="print tokens as they come (batch size 1)")
    output.add_argument("--show-config", action="store_true",
                        help="print the full resolved config at the start (default: a one-line summary)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override any field")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    from gptj.config import apply_overrides, build, read_presets, resolve_preset
    from gptj.execution.inference.cli import apply_model_options
    from gptj.execution.inference.config import InferenceConfig

    settings = resolve_preset(read_presets(args.preset_file), args.config, args.preset_file)
    settings = apply_overrides(settings, args.set)
    if args.set:
        build(InferenceConfig, settings, "")  # a bad --set value fails even if an option replaces it
    if args.stop:
        args.stop = [unescape(s) for s in args.stop]
    apply_model_options(settings, args)
    for option, field in OPTION_FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            section, _, name = field.rpartition(".")
            (settings.setdefault(section, {}) if section else settings)[name] = value
    for flag in ("truncate_prompts", "stream"):
        if getattr(args, flag):
            settings.setdefault("generation", {})[flag] = True
    prompts = read_prompts(args)
    if prompts is not None:
        settings["prompts"] = prompts
    config = build(InferenceConfig, settings, "")
    if config.generation.stream:
        config.generation.batch_size = 1
    return config


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` as typed in a shell become the characters they name."""
    return re.sub(r"\\([ntr\\])", lambda m: ESCAPES[m.group(1)], text)


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line, or JSON lines with a "prompt" field (any file whose first line is a
    JSON object); UTF-8, with or without a byte-order mark."""
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"prompts file {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    as_json = path.suffix in (".jsonl", ".json") or (numbered and _is_json_object(numbered[0][1]))
    prompts = []
    for number, line in numbered:
        if not as_json:
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
            prompt = record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{path}:{number}: expected a JSON object with a \"prompt\" field") from None
        if not isinstance(prompt, str):
            raise UsageError(f"{path}:{number}: \"prompt\" must be a string")
        prompts.append(prompt)
    if not prompts:
        raise UsageError(f"prompts file {path} has no prompts")
    return prompts


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def read_prompts(args) -> list[str] | None:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts_file(Path(args.prompts_file))
    if args.prompt is None and not args.prompts_file:
        return None
    for i, p in enumerate(prompts):
        if not p.strip():
            raise UsageError(f"prompt {i} is empty")
    return prompts


def summary_line(config) -> str:
    """What is generated from what, in one line (--show-config: every field)."""
    m, gen, count = config.model, config.generation, len(config.prompts)
    model = m.name_or_path or f"random:{m.preset}"
    if m.quantize:
        model += f" ({m.quantize} weights)"
    if m.adapter:
        model += f" with adapter {m.adapter}"
    sampling = "greedy" if gen.temperature == 0 else (
        f"temperature {gen.temperature:g}, top-k {gen.top_k}, top-p {gen.top_p:g}, seed {gen.seed}")
    stop = f", stop at {', '.join(map(repr, gen.stop))}" if gen.stop else ""
    return (f"generate: {count} prompt{'s' if count != 1 else ''} with {model}, precision {m.precision}; up to "
            f"{gen.max_new_tokens} new tokens each, {sampling}{stop}, batches of {min(gen.batch_size, count)} "
            "(--show-config prints the full config)")


def run(config, show_config: bool = False) -> int:
    from gptj.execution.inference.pipelines import TextGenerationPipeline
    from gptj.execution.inference.startup import plan_inference, print_machine
    from gptj.execution.inference.text_output import StreamPrinter
    from gptj.execution.runtime.distributed import init_distributed, world_size
    from gptj.execution.runtime.precision import pick_device
    from gptj.execution.runtime.preflight import check_output_file
    from gptj.execution.runtime.run_dirs import resolve_adapter_dir

    if config.model.adapter:  # before anything loads; a run directory stands for its adapter/ export
        config.model.adapter = resolve_adapter_dir(config.model.adapter)
    if config.output:  # checked now, not after generating: the results must not be lost
        check_output_file(config.output)
    prompts = config.prompts
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    gen = config.generation
    tp = config.model.tensor_parallel
    if world_size() % tp:
        raise UsageError(f"--tensor-parallel {tp} needs a multiple of {tp} processes: "
                         f"torchrun --nproc-per-node {tp} run_inference.py ... (found {world_size()})")
    ctx, _ = init_distributed(tp)
    main = ctx.is_main
    # Settle the auto choices, tokenize and check the fit once, before any weight is read.
    plan = plan_inference(config.model, pick_device(config.model.device), prompts=prompts,
                          max_new_tokens=gen.max_new_tokens, truncate_prompts=gen.truncate_prompts,
                          rows=max(1, min(gen.batch_size or len(prompts), len(prompts))), main=main)
    if main:
        print_machine(plan)
        print(("config: " + json.dumps(dataclasses.asdict(config))) if show_config else summary_line(config),
              flush=True)
    model = plan.load(ctx)
    pipe = TextGenerationPipeline(model, plan.tokenizer, batch_size=gen.batch_size,
                                  compile_decode=config.model.compile, kv_cache_dtype=config.model.kv_cache_dtype)
    context = model.config.max_positions
    longest = max(len(i) for i in plan.prompt_ids)
    if longest + gen.max_new_tokens > context:
        if main:
            print(f"warning: max_new_tokens {gen.max_new_tokens} does not fit the context of {context} "
                  f"after a {longest}-token prompt; clamped to {context - longest}", file=sys.stderr)
        gen.max_new_tokens = context - longest

    # Stream mode runs one prompt at a time (batch size 1) and shows what the plain output would.
    printer = StreamPrinter(prompts, pipe.tokenizer.decode, gen.stop) if gen.stream and main else None
    progress = progress_bar(len(prompts), gen.batch_size) if main and printer is None else None
    finished = {}  # prompt index -> result, kept for a Ctrl-C that stops the run early

    def on_finish(index, result):
        finished[index] = result
        if printer is not None:
            printer.on_finish(index, result)
        if progress is not None:
            progress.update()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the clamp above already said it
            results = pipe.generate(
                prompts, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_k=gen.top_k,
                top_p=gen.top_p, seed=gen.seed, stop=gen.stop, batch_size=gen.batch_size,
                truncate_prompts=gen.truncate_prompts, on_token=printer and printer.on_token,
                on_finish=on_finish, prompt_ids=plan.prompt_ids,
            )
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()  # the bar's line ends before the message below
        if main:
            done = [finished[i] for i in sorted(finished)]
            where = f"; wrote them to {write_results(config.output, done, pipe.stats.as_dict())}" \
                if config.output else ""
            print(f"interrupted by Ctrl-C: {len(done)} of {len(prompts)} prompts finished{where}",
                  file=sys.stderr)
        return 130
    finally:
        if progress is not None:
            progress.close()
    stats = pipe.stats.as_dict()
    if not main:
        return 0
    print_results(config, results, stats)
    return 0


def progress_bar(prompts: int, batch_size: int):
    """A bar of finished prompts on stderr when they take more than one batch (None otherwise):
    a long prompts file shows how far it got instead of silence."""
    if prompts <= batch_size:
        return None
    from tqdm import tqdm

    return tqdm(total=prompts, desc="generate", unit="prompt", dynamic_ncols=True, file=sys.stderr)


def print_results(config, results: list, stats: dict) -> None:
    """The continuations (unless streamed), the speed line and where the results were written."""
    import dataclasses

    from gptj.execution.inference.text_output import format_result

    if not config.generation.stream:
        for r in results:
            if sys.stdout.isatty():  # the prompt, then its continuation in bold
                r = dataclasses.replace(r, text=f"{r.prompt}\033[1m{r.text}\033[0m")
            print(format_result(r), end="")
    # A first token comes from prefill: with one token per prompt nothing was decoded.
    decode = f"{stats['decode_tokens_per_s']:.1f} tokens/s" if stats["decode_tokens_per_s"] else "n/a"
    print(
        f"{stats['generated_tokens']} tokens in {stats['total_s']:.3f} s: {stats['tokens_per_s']:.1f} tokens/s | "
        f"time to first token {stats['time_to_first_token_s'] * 1000:.1f} ms | "
        f"prefill {stats['prefill_tokens_per_s']:.1f} tokens/s | decode {decode}"
    )
    if config.output:
        print(f"wrote {len(results)} results to {write_results(config.output, results, stats)}")


def write_results(output: str, results: list, stats: dict) -> Path:
    """JSON lines; timings: each prompt's own, run_timings: the whole run's."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in results:
            f.write(json.dumps({"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids,
                                "finish_reason": r.finish_reason, "timings": r.timings(),
                                "run_timings": stats}) + "\n")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from gptj.errors import GPTJError

    threads = torch.get_num_threads()
    try:
        return run(build_config(args), args.show_config)
    except GPTJError as err:  # bad input: one clear line, no stack trace
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger program (tests)
        from gptj.execution.runtime.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
