"""benchmarks/gpu_bench.py on CPU: results on disk after every row, the budget's deadline, the
compiled decode path (same tokens as eager, bytes counted over the slots it attends) and the
checks that fail a compiled row that did not run as asked. No timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_bench
from gptj.model import GPTJ, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_rows_measured_before_a_kill_stay_on_disk(tmp_path):
    bench = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_bench", "--smoke", "--out", str(tmp_path)],
                             cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report_path, report = tmp_path / "gpu_bench.json", None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and bench.poll() is None:
            if report_path.exists():
                report = json.loads(report_path.read_text())  # written atomically: always whole
                if len(report["training"]["runs"]) + len(report["decode"]["runs"]) >= 2:
                    break
            time.sleep(0.02)
        assert bench.poll() is None, "the bench ended before it could be killed"
        bench.send_signal(signal.SIGKILL)
        bench.wait(30)
    finally:
        if bench.poll() is None:
            bench.kill()
    on_disk = json.loads(report_path.read_text())
    assert on_disk["complete"] is False  # killed mid-run...
    assert on_disk["machine"]["bandwidth"] > 0  # ...with every row measured before the kill
    rows = on_disk["training"]["runs"] + on_disk["decode"]["runs"]
    assert len(rows) >= 2
    for row in rows:
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["seconds"] > 0
    assert (tmp_path / "gpu_bench.md").read_text().startswith("# GPU benchmark")


def test_the_deadline_records_the_row_in_flight_and_exits(tmp_path):
    script = (
        "import time\n"
        "from benchmarks import gpu_bench as g\n"
        f"report = g.Report(g.Path({str(tmp_path)!r}), {{'smoke': True}})\n"
        "report.finish_row('decode', {'impl': 'ours', 'batch': 1, 'tokens_per_s': 5.0, 'bytes_per_token': 1.0,"
        " 'bandwidth_fraction': 0.1})\n"
        "g.start_watchdog(g.Budget(0.5, time.time()), report)\n"
        "report.start_row('decode', {'impl': 'ours', 'batch': 16})\n"
        "time.sleep(60)\n"
    )
    started = time.time()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == gpu_bench.EXIT_BUDGET, done.stderr
    assert time.time() - started < 30  # the watchdog, not the sleep, ended it
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["stopped_at_deadline"] and not report["complete"]
    first, in_flight = report["decode"]["runs"]
    assert first["tokens_per_s"] == 5.0
    assert in_flight["batch"] == 16 and in_flight["error"].startswith("stopped: the time budget ran out")
    assert "stopped at the time budget" in (tmp_path / "gpu_bench.md").read_text()


def test_the_budget_counts_from_the_process_start():
    script = ("import time; time.sleep(1.0)\n"
              "from benchmarks.gpu_bench import process_start_time\n"
              "print(time.time() - process_start_time())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=60)
    age = float(done.stdout.strip())
    assert 1.0 <= age < 30.0, age


def test_a_row_that_does_not_fit_the_budget_is_recorded_as_skipped(tmp_path):
    report = gpu_bench.Report(tmp_path, {})
    bench = gpu_bench.Bench(torch.device("cpu"), True, {"bandwidth": 1.0}, gpu_bench.Budget(10.0, time.time()))
    ran = []
    row = gpu_bench.Row("decode", {"impl": "ours", "weights": "bf16", "batch": 1}, 60.0,
                        lambda b, r: ran.append(r))
    gpu_bench.run_row(bench, report, row)
    assert ran == []
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())["decode"]["runs"]
    assert saved[0]["error"].startswith("skipped: time budget")


# ---- the compiled decode path ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_and_compiled():
    """One tiny fp32 model decoded eagerly and with the compiled step (one compilation)."""
    from gptj.execution.inference.generation import GenerationEngine

    torch.manual_seed(0)
    model = GPTJ(ModelConfig.preset("tiny")).init_weights(seed=3).eval()
    prompts = [[5, 17, 300, 42, 9, 1000, 77], [8, 600, 3]]  # different lengths
    runs = {}
    for compiled in (False, True):
        before = gpu_bench.prepare_compiled_row() if compiled else None
        engine = GenerationEngine(model, compile_decode=compiled)
        results = engine.run(prompts, 8, None)
        stats = gpu_bench.compile_report(before, graphs_asked=False) if compiled else None
        runs[compiled] = (engine, [r.token_ids for r in results], stats)
    return model, prompts, runs


@pytest.mark.slow
def test_compiled_cpu_decode_gives_the_eager_tokens(eager_and_compiled):
    _, _, runs = eager_and_compiled
    (_, eager_tokens, _), (_, compiled_tokens, (stats, failure)) = runs[False], runs[True]
    assert failure is None, failure
    assert stats["frames_compiled"] >= 1 and stats["graph_breaks"] == 0  # really compiled, in one graph
    assert stats["recompiles"] == 0
    assert all(len(t) == 8 for t in eager_tokens)
    assert compiled_tokens == eager_tokens


@pytest.mark.slow
def test_bytes_per_step_count_the_cache_slots_each_step_attends(eager_and_compiled):
    model, prompts, runs = eager_and_compiled
    config = model.config
    weight_bytes = (config.num_parameters() - config.vocab_size * config.hidden_size) * 4  # fp32, no embedding
    batch = len(prompts)
    for compiled, (engine, _, _) in runs.items():
        stats = engine.stats
        slots = stats.mean_attended_slots
        # compiled: every step attends the whole cache (prompt + new tokens, rounded up to 256);
        # eager: each step attends 1 + the furthest row's position, which grows by one a step
        # from the longest prompt (7) for 7 steps.
        expected_slots = 256 if compiled else sum(range(8, 15)) / 7
        assert engine.cache.max_length == (256 if compiled else 15)
        assert stats.decode_steps == 7 and slots == pytest.approx(expected_slots)
        step = gpu_bench.decode_step_bytes(model, batch, slots, engine.cache.layers[0].keys.element_size())
        assert step["weight_bytes"] == weight_bytes
        assert step["kv_bytes"] == pytest.approx(2 * config.num_layers * batch * expected_slots * config.hidden_size * 4)


def test_graphs_asked_for_and_skipped_fail_the_row():
    # On a CPU inductor skips CUDA graphs (and counts the skip), which is what a mutated
    # non-static input does on a GPU.
    buffer = torch.zeros(4)

    def accumulate(x):
        buffer.add_(x)
        return buffer * 2

    before = gpu_bench.prepare_compiled_row()
    step = torch.compile(accumulate, mode="reduce-overhead")
    step(torch.ones(4))
    step(torch.ones(4))
    stats, failure = gpu_bench.compile_report(before, graphs_asked=True)
    assert stats["cudagraph_skips"] >= 1
    assert failure is not None and "skipped" in failure
    assert gpu_bench.compile_report(before, graphs_asked=False)[1] is None
    nothing = gpu_bench.compile_counters()
    assert "nothing was compiled" in gpu_bench.compile_report(nothing, graphs_asked=False)[1]


@pytest.mark.slow
def test_smoke_run_goes_through_the_compiled_path_without_web_modules(tmp_path):
    script = (
        "import sys\n"
        "from benchmarks import gpu_bench\n"
        f"rc = gpu_bench.main(['--smoke', '--out', {str(tmp_path)!r}])\n"
        "web = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette'))\n"
        "print('web modules:', web)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "web modules: []" in done.stdout
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["complete"] and "MemTotal" in report["machine"]["host_meminfo"]
    compiled = [r for r in report["decode"]["runs"] if r["compiled"]]
    assert len(compiled) == 1 and "error" not in compiled[0], compiled
    row = compiled[0]
    assert row["compile"]["frames_compiled"] >= 1 and row["compile"]["recompiles"] == 0
    assert row["attended_slots"] == 256 and row["tokens_per_s"] > 0
    for r in report["training"]["runs"] + report["decode"]["runs"]:
        assert "error" not in r, r
    assert {r["offload"] for r in report["training"]["runs"]} == {False, True}
    assert {r["batch"] for r in report["decode"]["runs"] if r["impl"] == "ours"} == {1, 16, 64}
    assert "| decode |" in done.stdout and "MFU" in done.stdout
    int4 = next(r for r in report["decode"]["runs"] if r["weights"] == "int4")
    assert set(int4["kernels"].values()) == {"int4_cpu"} and int4["kernels_refused"] == {}


def test_the_compiled_step_writes_only_static_inputs():
    # inductor captures a CUDA graph over in-place writes only to static inputs (parameters,
    # tensors marked with mark_static_address): the KV cache written by the decode step must be.
    import torch._dynamo

    from gptj.execution.inference.generation import GenerationEngine

    written = []

    def inspect(graph, example_inputs):
        placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        by_node = dict(zip(placeholders, example_inputs))
        for node in graph.graph.nodes:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if name.endswith("_") and node.args and node.args[0] in by_node:
                written.append(by_node[node.args[0]])
        return graph.forward

    model = GPTJ(ModelConfig.preset("tiny")).init_weights(seed=0).eval()
    engine = GenerationEngine(model, compile_decode=True)
    torch._dynamo.reset()
    engine.runner._decode_fn = torch.compile(engine.runner._decode_forward, backend=inspect, dynamic=False)
    engine.run([[1, 2, 3]], 3, None)
    cache = engine.cache
    assert len(written) == 2 * model.config.num_layers  # keys and values of every layer
    stored = {t.data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)}
    assert {t.data_ptr() for t in written} == stored
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in written)
    torch._dynamo.reset()


def test_only_picks_rows_by_the_words_of_their_names():
    names = [row.name for row in gpu_bench.plan_rows(smoke=False, on_cuda=True)]
    assert names[:7] == ["training ours", "decode ours bf16 eager b1", "decode ours bf16 eager b16",
                         "decode ours bf16 graphs b1", "decode ours bf16 graphs b16",
                         "decode ours int4 eager b1", "decode ours int4 graphs b1"]  # headline rows first
    assert len(set(names)) == len(names)
    picked = [n for n in names if gpu_bench.row_selected(n, ["int4 graphs", "training ours"])]
    assert picked == ["training ours", "decode ours int4 graphs b1", "decode ours int4 graphs b16",
                      "decode ours int4 graphs b64", "training ours offload"]
    assert [n for n in names if gpu_bench.row_selected(n, ["ours bf16 eager b1"])] == ["decode ours bf16 eager b1"]


def test_the_prepared_run_writes_env_log_and_results(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--smoke", "--only", "ours bf16 eager b1"], cwd=ROOT,
                          env={**_env(), "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    env = (tmp_path / "env.txt").read_text()
    for heading in ("== nvidia-smi", "== versions", "== /proc/meminfo"):
        assert heading in env
    assert f"torch {torch.__version__}" in env and "MemTotal:" in env
    assert "decode ours bf16 eager b1" in (tmp_path / "log.txt").read_text()
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["complete"] and [r["row"] for r in report["decode"]["runs"]] == ["decode ours bf16 eager b1"]
    assert report["budget_left_at_start_s"] < report["budget_s"]  # counted from the script's start
