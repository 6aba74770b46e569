"""Prometheus metrics of the serving head. Each server owns its registry, so tests never share state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ENGINE_STATES = ("loading", "ok", "degraded")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(
            "llmfleet_requests",
            "HTTP API requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter("llmfleet_prompt_tokens", "Prompt tokens processed.", registry=registry)
        self.prompt_tokens_cached = Counter(
            "llmfleet_prompt_tokens_cached",
            "Prompt tokens reused from the KV cache of an earlier request instead of computed (part of "
            "llmfleet_prompt_tokens).",
            registry=registry,
        )
        self.completion_tokens = Counter(
            "llmfleet_completion_tokens", "Completion tokens generated.", registry=registry
        )
        self.time_to_first_token = Histogram(
            "llmfleet_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "llmfleet_time_per_output_token_seconds",
            "Between consecutive generated tokens of one request.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "llmfleet_queue_depth", "Requests waiting for a sequence slot.", registry=registry
        )
        self.active_sequences = Gauge(
            "llmfleet_active_sequences", "Sequences being decoded together.", registry=registry
        )
        self.kv_cache_tokens = Gauge(
            "llmfleet_kv_cache_tokens",
            "Tokens of running sequences in the KV cache (cells kept for prompt reuse are not counted).",
            registry=registry,
        )
        self.kv_cache_usage = Gauge(
            "llmfleet_kv_cache_usage_ratio", "Share of the KV cache in use (0-1).", registry=registry
        )
        self.worker_up = Gauge(
            "llmfleet_rpc_worker_up",
            "1 when the RPC worker answers, else 0.",
            ["endpoint"],
            registry=registry,
        )
        self.engine_state = Gauge(
            "llmfleet_engine_state", "1 for the engine's current state.", ["state"], registry=registry
        )
        self.degradation_level = Gauge(
            "llmfleet_degradation_level",
            "Automatic degradation level: 0 as configured, 1 max_tokens capped, 2 and up fewer experts.",
            registry=registry,
        )
        self.engine_restarts = Counter(
            "llmfleet_engine_restarts",
            "Engine restarts after a lost RPC worker or a crash.",
            registry=registry,
        )

    def set_state(self, state: str) -> None:
        for name in ENGINE_STATES:
            self.engine_state.labels(name).set(1 if name == state else 0)
