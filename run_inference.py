"""Generate text with GPT-J (default: the `tiny` preset, a random model, offline, on CPU).

    python run_inference.py                                        # tiny preset, prints tokens/s
    python run_inference.py --model runs/tiny --prompt "mnli hypothesis: ... target:"
    python run_inference.py --config gptj-6b --prompt "The capital of France is" --stream
    torchrun --nproc-per-node 2 run_inference.py --config gptj-6b-tp2 --prompts-file prompts.jsonl

Presets live in config/inference.yml; options override them, --set section.field=value
reaches any field. Reports time to first token and prefill / decode tokens per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

PRESET_FILE = Path(__file__).resolve().parent / "config" / "inference.yml"

# Command-line option -> config field.
OPTION_FIELDS = {
    "model": "model.name_or_path",
    "tokenizer": "model.tokenizer",
    "precision": "model.precision",
    "device": "model.device",
    "tensor_parallel": "model.tensor_parallel",
    "threads": "model.threads",
    "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature",
    "top_k": "generation.top_k",
    "top_p": "generation.top_p",
    "seed": "generation.seed",
    "stop": "generation.stop",
    "batch_size": "generation.batch_size",
    "output": "output",
}


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    from config import threads_value

    p = argparse.ArgumentParser(description="Generate text with GPT-J (static KV cache, continuous batching).")
    p.add_argument("--config", default="tiny", metavar="PRESET", help="preset in config/inference.yml (default: tiny)")
    p.add_argument("--preset-file", default=str(PRESET_FILE), help="another preset YAML file")
    p.add_argument("--model", metavar="HF_ID_OR_DIR",
                   help="HF directory or Hub id, or a run_finetuning.py output dir (uses its hf/ export)")
    p.add_argument("--tokenizer", metavar="HF_ID_OR_DIR", help="tokenizer (default: the model's own)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line, or JSONL with a \"prompt\" field")
    p.add_argument("--max-new-tokens", type=int, metavar="N")
    p.add_argument("--temperature", type=float, metavar="X", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, metavar="N")
    p.add_argument("--top-p", type=float, metavar="X")
    p.add_argument("--seed", type=int, metavar="N", help="sampling seed")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, metavar="N")
    p.add_argument("--tensor-parallel", type=int, metavar="T", help="tensor-parallel ranks (launch with torchrun)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 where the hardware runs it natively and the model is "
                        "not tiny, else fp32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=threads_value, metavar="N|auto",
                   help="CPU threads for torch (auto, the default: 1 for tiny models, else the "
                        "physical cores; 0: torch's default)")
    p.add_argument("--offload-weights", action="store_true", help="stream block weights from host memory")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--truncate-prompts", action="store_true", help="keep the last tokens of too-long prompts")
    p.add_argument("--output", metavar="FILE", help="write JSONL results")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (batch size 1)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override any field")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    from config import apply_overrides, build, read_presets, resolve_preset
    from execution.inference_config import InferenceConfig

    settings = resolve_preset(read_presets(args.preset_file), args.config, args.preset_file)
    settings = apply_overrides(settings, args.set)
    for option, field in OPTION_FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            section, _, name = field.rpartition(".")
            (settings.setdefault(section, {}) if section else settings)[name] = value
    if args.model is not None and args.tokenizer is None:
        settings.setdefault("model", {})["tokenizer"] = None  # a model brings its own tokenizer
    for flag, field in (("offload_weights", "model"), ("compile", "model"),
                        ("truncate_prompts", "generation"), ("stream", "generation")):
        if getattr(args, flag):
            settings.setdefault(field, {})[flag] = True
    prompts = read_prompts(args)
    if prompts is not None:
        settings["prompts"] = prompts
    config = build(InferenceConfig, settings, "")
    if config.generation.stream:
        config.generation.batch_size = 1
    return config


def read_prompts(args) -> list[str] | None:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file {path} does not exist")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                    prompts.append(record["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"{path}:{number}: expected a JSON object with a \"prompt\" field") from None
            else:
                prompts.append(line)
    if args.prompt is None and not args.prompts_file:
        return None
    for i, p in enumerate(prompts):
        if not p.strip():
            raise UsageError(f"prompt {i} is empty")
    return prompts


def run(config) -> int:
    import dataclasses

    import torch

    from execution.defaults import resolve_threads
    from execution.distributed import init_distributed, world_size
    from execution.hardware import detect
    from execution.pipelines import TextGenerationPipeline
    from execution.precision import DTYPES

    tp = config.model.tensor_parallel
    if world_size() % tp:
        raise UsageError(f"--tensor-parallel {tp} needs a multiple of {tp} processes: "
                         f"torchrun --nproc-per-node {tp} run_inference.py ... (found {world_size()})")
    ctx, device = init_distributed(tp)
    main = ctx.is_main
    if config.model.device != "auto":
        if config.model.device == "cuda" and device.type != "cuda":
            raise UsageError("device cuda was asked for but no CUDA GPU is available")
        device = torch.device(config.model.device) if device.type != config.model.device else device
    model = config.model
    name = model.name_or_path or f"random:{model.preset}"
    pipe = TextGenerationPipeline.from_pretrained(
        name, tokenizer=model.tokenizer, precision=model.precision, device=device, ctx=ctx,
        offload_weights=model.offload_weights, compile_decode=model.compile,
        batch_size=config.generation.batch_size, init_seed=model.init_seed,
    )
    # "auto" values become what was chosen for this machine and model, as printed below.
    model.precision = next(k for k, v in DTYPES.items() if v == pipe.model.embed.weight.dtype)
    chosen_threads = resolve_threads(model.threads, pipe.model.config)
    if chosen_threads:
        torch.set_num_threads(chosen_threads)
    model.threads = torch.get_num_threads()
    if main:
        print(f"machine: {detect().summary()}", flush=True)
        print("config: " + json.dumps(dataclasses.asdict(config)), flush=True)
    gen = config.generation
    context = pipe.model.config.max_positions
    prompts = config.prompts
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    ids = pipe.encode_prompts(prompts, gen.truncate_prompts)
    longest = max(len(i) for i in ids)
    if longest + gen.max_new_tokens > context:
        if main:
            print(f"warning: max_new_tokens {gen.max_new_tokens} does not fit the context of {context} "
                  f"after a {longest}-token prompt; clamped to {context - longest}", file=sys.stderr)
        gen.max_new_tokens = context - longest

    stream_state = {"prompt": -1, "tokens": [], "shown": 0}

    def on_token(prompt_index, token):
        # Stream mode runs one prompt at a time (batch size 1).
        if prompt_index != stream_state["prompt"]:
            prefix = "\n" if stream_state["prompt"] >= 0 else ""
            print(f"{prefix}--- prompt: {prompts[prompt_index]!r}", flush=True)
            stream_state.update(prompt=prompt_index, tokens=[], shown=0)
        stream_state["tokens"].append(token)
        text = pipe.tokenizer.decode(stream_state["tokens"])
        print(text[stream_state["shown"]:], end="", flush=True)
        stream_state["shown"] = len(text)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the clamp above already said it
        results = pipe.generate(
            prompts, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_k=gen.top_k,
            top_p=gen.top_p, seed=gen.seed, stop=gen.stop, batch_size=gen.batch_size,
            truncate_prompts=gen.truncate_prompts, on_token=on_token if gen.stream and main else None,
        )
    stats = pipe.stats.as_dict()
    if not main:
        return 0
    if gen.stream:
        print()
    else:
        for r in results:
            print(f"--- prompt: {r.prompt!r}\n{r.prompt}\033[1m{r.text}\033[0m" if sys.stdout.isatty()
                  else f"--- prompt: {r.prompt!r}\n{r.text}")
            print(f"--- ({len(r.token_ids)} tokens, finish: {r.finish_reason})")
    print(
        f"{stats['generated_tokens']} tokens in {stats['total_s']:.3f} s: {stats['tokens_per_s']:.1f} tokens/s | "
        f"time to first token {stats['time_to_first_token_s'] * 1000:.1f} ms | "
        f"prefill {stats['prefill_tokens_per_s']:.1f} tokens/s | decode {stats['decode_tokens_per_s']:.1f} tokens/s"
    )
    if config.output:
        path = Path(config.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for r in results:
                f.write(json.dumps({"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids,
                                    "finish_reason": r.finish_reason, "timings": stats}) + "\n")
        print(f"wrote {len(results)} results to {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from config import PresetError
    from data import DataError
    from gptj import ConfigError

    known = (UsageError, PresetError, ConfigError, DataError, ValueError, FileNotFoundError)
    import torch

    threads = torch.get_num_threads()
    try:
        return run(build_config(args))
    except known as err:  # bad input: one clear line, no stack trace
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger program (tests)
        from execution.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
