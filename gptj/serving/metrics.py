"""Prometheus metrics of one server (its own registry, so several servers fit in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    """Counted per engine request (one per choice): a request with n=2 counts twice."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.running = Gauge("gptj_requests_running", "Requests holding a batch row", registry=registry)
        self.waiting = Gauge("gptj_requests_waiting", "Requests waiting for a batch row", registry=registry)
        self.time_to_first_token = Histogram(
            "gptj_time_to_first_token_seconds", "Arrival to first generated token", buckets=LATENCY_BUCKETS,
            registry=registry)
        self.time_per_output_token = Histogram(
            "gptj_time_per_output_token_seconds", "Mean time between a request's tokens after the first",
            buckets=TOKEN_BUCKETS, registry=registry)
        self.e2e_latency = Histogram(
            "gptj_e2e_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("gptj_prompt_tokens", "Prompt tokens prefilled", registry=registry)
        self.generation_tokens = Counter("gptj_generation_tokens", "Tokens generated", registry=registry)
        self.finished = Counter("gptj_requests_finished", "Requests finished, by reason", ["finish_reason"],
                                registry=registry)
        self.rejected = Counter("gptj_requests_rejected", "HTTP requests refused, by status", ["status"],
                                registry=registry)
        self.cancelled = Counter("gptj_requests_cancelled", "Requests cancelled (client gone, timeout)",
                                 registry=registry)
        # Requests naming a LoRA adapter (gptj/model/multi_lora.py), by adapter; the base is unlabelled.
        self.adapter_requests = Counter("gptj_adapter_requests", "Requests finished, by LoRA adapter", ["adapter"],
                                        registry=registry)
        self.adapter_generation_tokens = Counter("gptj_adapter_generation_tokens", "Tokens generated, by LoRA adapter",
                                                 ["adapter"], registry=registry)
        self.engine_steps = Counter("gptj_engine_steps", "Engine steps run", registry=registry)
        # Prefix caching (gptj/execution/inference/prefix_cache.py); the hit rate is tokens reused
        # over prompt tokens admitted since the server started.
        self.prefix_cache_prompt_tokens = Counter(
            "gptj_prefix_cache_prompt_tokens", "Prompt tokens admitted while prefix caching is on", registry=registry)
        self.prefix_cache_hit_tokens = Counter(
            "gptj_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache instead of a prefill",
            registry=registry)
        self._prefix_seen = (0, 0)  # the cache's counts at the last record
        self.prefix_cache_hit_rate = Gauge(
            "gptj_prefix_cache_hit_rate", "Prompt tokens reused / prompt tokens admitted, since start", registry=registry)
        self.prefix_cache_blocks = Gauge("gptj_prefix_cache_blocks", "Prompt blocks held by the prefix cache",
                                         registry=registry)
        self.prefix_cache_bytes = Gauge("gptj_prefix_cache_bytes", "Bytes of KV the prefix cache holds (this rank)",
                                        registry=registry)

    def record_prefix_cache(self, cache) -> None:
        """Bring the prefix-cache figures up to `cache`'s (a PrefixCache) counts."""
        seen_prompt, seen_hit = self._prefix_seen
        self.prefix_cache_prompt_tokens.inc(cache.prompt_tokens - seen_prompt)
        self.prefix_cache_hit_tokens.inc(cache.hit_tokens - seen_hit)
        self._prefix_seen = (cache.prompt_tokens, cache.hit_tokens)
        self.prefix_cache_hit_rate.set(cache.hit_rate)
        self.prefix_cache_blocks.set(len(cache))
        self.prefix_cache_bytes.set(cache.nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
