"""Serve GPT-J over HTTP with the OpenAI API (default: the `tiny` random model, offline, seconds).

    python run_server.py                                   # tiny preset on 127.0.0.1:8000
    python run_server.py --model EleutherAI/gpt-j-6b --precision bf16 --port 8000 --api-key KEY
    torchrun --nproc-per-node 2 run_server.py --config gptj-6b-tp2 --tensor-parallel 2

Endpoints: POST /v1/completions, /v1/chat/completions, /v1/entailment, /tokenize,
/detokenize, /v1/load_lora_adapter, /v1/unload_lora_adapter; GET /v1/models, /tokenizer_info, /health, /metrics. Presets live in gptj/config/inference.yml (the `server:` and `generation:`
sections); options override them and --set section.field=value reaches any field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from gptj.errors import UsageError

# Command-line option -> config field (the model's own: gptj/execution/inference/cli.py).
OPTION_FIELDS = {
    "host": "server.host",
    "port": "server.port",
    "max_batch_size": "server.max_batch_size",
    "max_queue": "server.max_queue",
    "max_model_len": "server.max_model_len",
    "memory_utilization": "server.memory_utilization",
    "max_n": "server.max_n",
    "request_timeout": "server.request_timeout",
    "api_key": "server.api_key",
    "served_model_name": "server.served_model_name",
    "max_adapters": "server.max_adapters",
    "prefix_cache": "server.prefix_cache",
}


def parse_args(argv=None) -> argparse.Namespace:
    from gptj.execution.inference.cli import DEFAULTS_NOTE, add_model_arguments, default_text, preset_defaults
    from gptj.serving.body_limit import MAX_BODY_BYTES

    defaults = preset_defaults()

    def d(field: str) -> str:
        return default_text(defaults, field)

    p = argparse.ArgumentParser(prog="gptj-serve", epilog=DEFAULTS_NOTE,
                                description="Serve GPT-J with an OpenAI-compatible HTTP API (continuous batching).")
    add_model_arguments(p, named_adapters=True, defaults=defaults)
    server = p.add_argument_group("server")
    server.add_argument("--host", metavar="ADDR", help="address to listen on" + d("server.host"))
    server.add_argument("--port", type=int, metavar="N", help="port (0: a free one)" + d("server.port"))
    server.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (default: none)")
    server.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: --model)")
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's and the request log's level (default: info)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-batch-size", type=int, metavar="N",
                        help="requests decoded together (KV cache rows)" + d("server.max_batch_size"))
    limits.add_argument("--max-queue", type=int, metavar="N",
                        help="waiting requests beyond this get 429" + d("server.max_queue"))
    limits.add_argument("--max-model-len", type=int, metavar="N",
                        help="KV cache length per row, at most the model's context (default: the context)")
    limits.add_argument("--memory-utilization", type=float, metavar="F",
                        help="fraction of the memory left after the weights the KV cache may grow to"
                             + d("server.memory_utilization"))
    limits.add_argument("--max-n", type=int, metavar="N", help="most choices per request" + d("server.max_n"))
    limits.add_argument("--request-timeout", type=float, metavar="S",
                        help="seconds from arrival to the last token" + d("server.request_timeout"))
    limits.add_argument("--max-adapters", type=int, metavar="N",
                        help="LoRA adapters held at once, loaded at run time included (POST /v1/load_lora_adapter; "
                             "default: as many as --adapter NAME=DIR names)")
    limits.add_argument("--max-body-size", type=byte_size, metavar="BYTES",
                        help="larger request bodies get 413 before they are read; a number of bytes, or with "
                             f"K, M or G (KiB, MiB, GiB) (default: {size_text(MAX_BODY_BYTES)})")
    p.add_argument("--show-config", action="store_true",
                   help="print the full resolved config at the start (default: a one-line summary)")
    limits.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_const", const=False,
                        help="do not keep prompt blocks' KV for later prompts that start the same way "
                             "(default: kept, within the KV cache's memory; hit rate on /metrics)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override any field")
    return p.parse_args(argv)


UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def byte_size(text: str) -> int:
    """--max-body-size: "65536", "512K", "4M" or "1G" (powers of 1024), more than 0."""
    number, unit = text.strip().upper().removesuffix("B").removesuffix("I"), ""
    if number[-1:] in UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = int(float(number) * UNITS[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a size such as 65536, 512K or 4M, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return value


def size_text(size: int) -> str:
    """4194304 -> "4 MiB"; sizes that are no whole number of KiB stay in bytes."""
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def build_config(args: argparse.Namespace):
    from gptj.config import apply_overrides, build, read_presets, resolve_preset
    from gptj.execution.inference.cli import apply_model_options, split_adapter_options
    from gptj.execution.inference.config import InferenceConfig

    settings = resolve_preset(read_presets(args.preset_file), args.config, args.preset_file)
    settings = apply_overrides(settings, args.set)
    split_adapter_options(settings, args)
    apply_model_options(settings, args)
    for option, field in OPTION_FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            section, _, name = field.rpartition(".")
            settings.setdefault(section, {})[name] = value
    return build(InferenceConfig, settings, "")


def summary_line(config, max_body_bytes: int) -> str:
    """What is served and under which limits, in one line (--show-config: every field)."""
    m, server = config.model, config.server
    served = [(m.name_or_path or f"random:{m.preset}")
              + (f" as {server.served_model_name!r}" if server.served_model_name else "")]
    if m.quantize:
        served.append(f"{m.quantize} weights")
    if m.adapter:
        served.append(f"adapter {m.adapter} merged")
    if m.adapters:
        served.append(f"adapters {', '.join(m.adapters)}")
    if m.tensor_parallel > 1:
        served.append(f"tensor parallel {m.tensor_parallel}")
    return (f"serve: {', '.join(served)}; {server.max_batch_size} requests at once, {server.max_queue} waiting, "
            f"request timeout {server.request_timeout:g} s, bodies up to {size_text(max_body_bytes)}, "
            f"{'API key required' if server.api_key else 'no API key'} (--show-config prints the full config)")


def full_config_line(config) -> str:
    """`config: {...}`, the resolved config as JSON, the API key hidden."""
    shown = dataclasses.asdict(config)
    shown.pop("prompts", None)
    shown.pop("output", None)
    if shown["server"]["api_key"]:
        shown["server"]["api_key"] = "***"
    return "config: " + json.dumps(shown)


def run(config, log_level: str, show_config: bool = False, max_body_bytes: int | None = None) -> int:
    from gptj.execution.runtime.distributed import init_distributed, world_size
    from gptj.execution.runtime.precision import pick_device
    from gptj.serving.body_limit import MAX_BODY_BYTES
    from gptj.serving.server import check_model_paths, plan, serve

    tp = config.model.tensor_parallel
    if world_size() != tp:
        raise UsageError(f"--tensor-parallel {tp} needs exactly {tp} processes: "
                         f"torchrun --nproc-per-node {tp} run_server.py ... (found {world_size()})")
    check_model_paths(config)  # a missing model or adapter: one line; run directories stand for their exports
    ctx, _ = init_distributed(tp)
    device = pick_device(config.model.device)
    # Before the port is bound and anything loads: the model read, the auto choices settled, the
    # weights and one full-length row of KV cache checked against the memory.
    started = plan(config, device, ctx.is_main)
    if ctx.is_main:
        print(full_config_line(config) if show_config else summary_line(config, max_body_bytes or MAX_BODY_BYTES),
              flush=True)
    return serve(config, ctx, device, log_level, started=started, max_body_bytes=max_body_bytes)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gptj.errors import GPTJError

    try:
        return run(build_config(args), args.log_level, args.show_config, args.max_body_size)
    except GPTJError as err:  # bad input: one clear line, no stack trace
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        from gptj.execution.runtime.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
