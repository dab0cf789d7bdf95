"""Compile accounting for benchmarks/gpu_bench.py's compiled rows: what dynamo and inductor
really ran (frames, recompiles, graph breaks, cudagraph skips) and the reason to fail a row
that did not run as asked."""

from __future__ import annotations


def compile_counters() -> dict:
    """dynamo's and inductor's running counters that tell what a compiled row really ran."""
    from torch._dynamo.utils import counters

    return {
        "frames_compiled": counters["frames"]["ok"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        # inputs a recorded graph copies in on every replay (the cache must not be among them)
        "cudagraph_copied_inputs": counters["inductor"]["cudagraph_recorded_non_static_inputs"],
    }


def decode_step_compilations() -> int | None:
    """How many compiled versions dynamo holds of the decode step (None: not knowable)."""
    from gptj.execution.inference.model_runner import ModelRunner

    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(ModelRunner._decode_forward.__code__))
    except Exception:  # a private API: absent or changed in another torch
        return None


def compile_report(before: dict, graphs_asked: bool) -> tuple[dict, str | None]:
    """Counter deltas since `before`, recompiles of the decode step, and the reason to fail the
    row (None: it ran as asked)."""
    after = compile_counters()
    stats = {k: after[k] - before[k] for k in after}
    versions = decode_step_compilations()
    stats["recompiles"] = None if versions is None else max(0, versions - 1)
    if stats["frames_compiled"] == 0:
        return stats, "compiled step asked for but nothing was compiled"
    if graphs_asked and stats["cudagraph_skips"]:
        return stats, (f"CUDA graphs asked for but inductor skipped them ({stats['cudagraph_skips']} "
                       "skip(s); TORCH_LOGS=cudagraphs gives the reason)")
    return stats, None


def prepare_compiled_row() -> dict:
    """A fresh dynamo before each compiled configuration; the counters to diff against."""
    import torch._dynamo

    torch._dynamo.reset()
    return compile_counters()


def configure_compiler() -> None:
    """Fail loudly instead of running eager: a recompile limit hit raises, and (where this
    torch has the switch) so does a skipped CUDA graph, with inductor's reason."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    if hasattr(inductor_config.triton, "cudagraph_or_error"):
        inductor_config.triton.cudagraph_or_error = True
