"""Load the model, start the engine thread, run uvicorn; tensor-parallel followers.

Before anything is loaded the model and adapter paths are checked and the port is bound, so a
typo or a busy port costs one line, not a model load. Rank 0 then answers HTTP at once:
/health says 503 while the model loads (in a background thread) and 200 when the engine runs. Other tensor-parallel ranks load their shards and follow rank
0's steps (`serving.engine_loop.follow`) until rank 0 stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import threading
import time
import traceback

import torch

from gptj.errors import GPTJError, UsageError
from gptj.execution.inference.kv_budget import CacheBudget, available_memory, server_budget
from gptj.execution.inference.pipelines import kv_cache_dtype_of
from gptj.execution.inference.request_engine import RequestEngine
from gptj.execution.inference.startup import InferencePlan, plan_inference
from gptj.execution.runtime.distributed import gather_ints
from gptj.execution.runtime.precision import dtype_name, pick_device
from gptj.execution.runtime.preflight import InputError, resolve_model_source
from gptj.execution.runtime.run_dirs import resolve_adapter_dir
from gptj.model.kv_cache import kv_bytes_per_token, model_cache_dtype

from .adapter_slots import AdapterSlots, adapter_limit
from .app import ServerState, create_app
from .drain import DrainOnExit
from .engine_loop import EngineLoop, StepSync, follow
from .scoring import ServingClassifier


def model_name(config) -> str:
    return config.server.served_model_name or config.model.name_or_path or f"random:{config.model.preset}"


def plan(config, device=None, main: bool = True) -> InferencePlan:
    """The server's start-up (gptj/execution/inference/startup.py): the model read, the auto
    choices settled and the weights with one full-length row of KV cache checked against the
    memory, before anything loads. A --max-model-len beyond the model's context is refused here."""
    m = config.model
    return plan_inference(m, device if device is not None else pick_device(m.device), rows=1,
                          tokens=config.server.max_model_len, rows_option="--max-batch-size",
                          max_length_option="--max-model-len", main=main)


def load(config, ctx=None, device=None, started: InferencePlan | None = None):
    """(RequestEngine, tokenizer, EntailmentPipeline, AdapterSlots) for this rank; `started`:
    the start-up already planned (None: planned now)."""
    m, server = config.model, config.server
    started = started or plan(config, device, ctx is None or ctx.is_main)
    model, tokenizer = started.load(ctx), started.tokenizer
    adapters = None
    if adapter_limit(config):  # adapters by name, now or loaded later: the unmerged base serves them
        from gptj.model.multi_lora import load_adapters

        adapters = load_adapters(m.adapters, model, ctx)
    cache_dtype = kv_cache_dtype_of(m.kv_cache_dtype)
    budget = cache_budget(model, server, cache_dtype, ctx)
    engine = RequestEngine(model, server.max_batch_size, tokenizer.eos_id, server.max_model_len,
                           decode=tokenizer.decode, compile_decode=m.compile,
                           prefill_multiple=server.prefill_multiple,
                           cache_dtype=cache_dtype, adapters=adapters, cache_budget=budget,
                           prefix_cache=server.prefix_cache, prefix_block_size=server.prefix_block_size)
    slots = AdapterSlots(engine, ctx, adapter_limit(config))
    # Entailment pairs and /v1/classify inputs (gptj/serving/scoring.py), batched per engine step.
    # The scorer runs the engine's adapters too: "model" of /v1/classify and of a guided choice.
    return engine, tokenizer, ServingClassifier(model, tokenizer, engine, batch_size=server.max_batch_size,
                                                adapters=adapters), slots


def ready_line(name: str, config, engine) -> str:
    """What is being served, as it runs: the precision, the quantization of the weights (if
    any), the threads and the KV cache's shape."""
    spec = engine.model.quantization
    weights = ""
    if spec is not None:
        weights = f", {spec.name} weights" + (f" (groups of {spec.group_size})" if spec.bits == 4 else "")
    return (f"ready: {name}, precision {config.model.precision}{weights}, {config.model.threads} threads, "
            f"{engine.max_batch_size} rows x {engine.max_length} tokens")


def cache_budget(model, server, cache_dtype, ctx=None) -> CacheBudget:
    """The KV cache budget: `server.memory_utilization` of the memory left now that the weights
    are loaded. Every tensor-parallel rank takes the same (the smallest rank's), so all ranks
    admit the same requests; CPU ranks share one machine's memory, so each takes its part."""
    device = model.device
    available = available_memory(device)
    ranks = ctx.world_size if ctx is not None else 1
    if ranks > 1:
        available = min(row[0] for row in gather_ints([available], "KV cache budget"))
        if device.type == "cpu":
            available //= ranks
    dtype = model_cache_dtype(model, cache_dtype)
    budget, line = server_budget(kv_bytes_per_token(model, dtype), server.max_batch_size,
                                 server.max_model_len or model.config.max_positions, available,
                                 server.memory_utilization, dtype_name=dtype_name(dtype))
    if ctx is None or ctx.is_main:
        print(line, flush=True)
    return budget


def build_app(config, ctx=None, device=None, on_load_error=None, started: InferencePlan | None = None):
    """(FastAPI app, ServerState): the app loads the model in the background when it starts
    (`started`: its start-up, already planned)."""
    state = ServerState(config, model_name(config), adapters=list(config.model.adapters))
    app = create_app(state)

    def load_in_background(aloop):
        try:
            engine, tokenizer, entailment, slots = load(config, ctx, device, started)
            loop = EngineLoop(engine, state.metrics, config.server.max_queue, entailment, StepSync(ctx), slots,
                              state.model_name)
            state.tokenizer, state.entailment, state.loop = tokenizer, entailment, loop
            state.max_model_len, state.vocab_size = engine.max_length, engine.vocab_size
            loop.start(aloop)
            state.ready = True
            if ctx is None or ctx.is_main:
                print(ready_line(state.model_name, config, engine), flush=True)
        except Exception as err:  # noqa: BLE001 - reported by /health and every route
            state.load_error = str(err) if isinstance(err, GPTJError) else f"{type(err).__name__}: {err}"
            if not isinstance(err, GPTJError):
                traceback.print_exc()
            if on_load_error is not None:
                on_load_error()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=load_in_background, args=(asyncio.get_running_loop(),),
                                  name="model-loader", daemon=True)
        loader.start()
        yield
        loader.join()
        if state.loop is not None:
            state.loop.stop()

    app.router.lifespan_context = lifespan
    return app, state


def check_model_paths(config) -> None:
    """The model and adapter paths can be found (nothing is read): an InputError otherwise. A
    fine-tuning run directory given as an adapter stands for its adapter/ export, which is
    written back into the config, so the loaders see the adapter directory itself."""
    m = config.model
    if m.name_or_path:
        resolve_model_source(m.name_or_path, "--model")
    if m.adapter:
        m.adapter = resolve_adapter_dir(m.adapter, "--adapter")
    for name, path in m.adapters.items():
        m.adapters[name] = resolve_adapter_dir(path, f"--adapter {name}=")


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or an InputError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}"
                         + (" (another server there? pick another --port)" if err.errno == errno.EADDRINUSE else "")) from None
    return sock


def show_request_log(log_level: str) -> None:
    """The request log (serving.engine_loop.REQUEST_LOG) on stderr at uvicorn's --log-level."""
    import logging

    from .engine_loop import REQUEST_LOG

    if REQUEST_LOG.handlers:  # already shown (a second server in this process)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    REQUEST_LOG.addHandler(handler)
    REQUEST_LOG.setLevel(log_level.upper())
    REQUEST_LOG.propagate = False


def uvicorn_server(app, host: str, port: int, log_level: str = "warning", on_started=None, state=None):
    """A uvicorn server; `on_started()` runs once it accepts connections. `state` (the app's
    ServerState): a Ctrl-C says what it waits for and for how long at most (serving/drain.py)."""
    import uvicorn

    class Server(DrainOnExit, uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_started is not None:
                on_started()

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30))
    server.drain_state = state
    return server


def serve(config, ctx=None, device=None, log_level: str = "info", started: InferencePlan | None = None,
          max_body_bytes: int | None = None) -> int:
    """Run until stopped (Ctrl-C / SIGTERM on rank 0: the requests in flight finish, within the
    request timeout; a second Ctrl-C stops at once). `started`: the start-up, already planned
    (None: planned now, before the port is bound). `max_body_bytes`: larger request bodies are
    refused with 413 (None: serving/body_limit.py's default)."""
    check_model_paths(config)
    started = started or plan(config, device, ctx is None or ctx.is_main)
    if ctx is not None and not ctx.is_main:
        # A follower stops when rank 0 says so (after its last step), not on the launcher's
        # Ctrl-C / SIGTERM, which would cut rank 0's last broadcast.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        engine, _, entailment, slots = load(config, ctx, device, started)
        follow(engine, entailment, StepSync(ctx), slots)
        return 0
    sock = listen_socket(config.server.host, config.server.port)
    host, port = config.server.host, sock.getsockname()[1]
    server = None

    def give_up():
        server.should_exit = True

    def announce():
        print(f"serving on http://{host}:{port}/v1", flush=True)

    show_request_log(log_level)
    app, state = build_app(config, ctx, device, on_load_error=give_up, started=started)
    if max_body_bytes is not None:
        state.max_body_bytes = max_body_bytes
    server = uvicorn_server(app, host, port, log_level, on_started=announce, state=state)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.load_error:
        raise UsageError(state.load_error)  # bad input (a missing model...) -> one line, exit 2
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A server in a thread of this process (tests, benchmarks): `with ServerThread(config) as s: s.url`."""

    def __init__(self, config, ready_timeout: float = 120.0):
        if config.server.port == 0:
            config.server.port = free_port(config.server.host)
        self.config, self.ready_timeout = config, ready_timeout
        check_model_paths(config)  # as the command does: run directories stand for their exports
        self.app, self.state = build_app(config)
        self.server = uvicorn_server(self.app, config.server.host, config.server.port, state=self.state)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.threads = torch.get_num_threads()

    @property
    def url(self) -> str:
        return f"http://{self.config.server.host}:{self.config.server.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while not (self.state.ready and self.server.started):
            if self.state.load_error:
                raise RuntimeError(f"server failed to load: {self.state.load_error}")
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        torch.set_num_threads(self.threads)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
