"""Prometheus metrics for `GET /metrics`.

Each app has its own CollectorRegistry, so several servers (or tests) in one
process never share counters. Latencies are measured where a client feels
them: time to first token from the moment the request reached its model
(queueing included), and the gap between consecutive tokens as they are
handed to the HTTP response. Gauges read the engines' own statistics when
scraped.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localllm.core.requests import EngineStats
from localllm.server import offloop

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# Requests to these paths are counted in localllm_requests_total; scrapes and probes are not.
_COUNTED_PREFIXES = ("/v1/", "/api/")


class Metrics:
    def __init__(self, engine_stats: Callable[[], Iterable[EngineStats]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token = Histogram(
            "localllm_time_to_first_token_seconds",
            "Seconds from a request reaching its model to its first token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "localllm_inter_token_latency_seconds",
            "Seconds between consecutive tokens of one response.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("localllm_generated_tokens", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter("localllm_prompt_tokens", "Prompt tokens processed or reused.", registry=r)
        self.requests = Counter("localllm_requests", "API requests by HTTP status.", ["status"], registry=r)
        running = Gauge("localllm_requests_running", "Requests the engines are running.", registry=r)
        waiting = Gauge("localllm_requests_waiting", "Requests queued for an engine.", registry=r)
        kv = Gauge(
            "localllm_kv_cache_usage_ratio",
            "Share of the KV cache in use (the fullest loaded model).",
            registry=r,
        )
        preparing = Gauge(
            "localllm_requests_preparing",
            "Requests being parsed, templated or tokenized on worker threads (this process).",
            registry=r,
        )
        preparing.set_function(lambda: offloop.preparing())
        slots = Gauge("localllm_slots", "Requests the loaded engines can run at once (llama.cpp slots).", registry=r)
        running.set_function(lambda: sum(s.running for s in engine_stats()))
        waiting.set_function(lambda: sum(s.waiting for s in engine_stats()))
        kv.set_function(lambda: max((s.kv_used_ratio for s in engine_stats()), default=0.0))
        slots.set_function(lambda: sum(s.slots_total for s in engine_stats()))
        r.register(PrefixCacheCollector(engine_stats))
        r.register(SpeculationCollector(engine_stats))
        self.speculative_acceptance = Histogram(
            "localllm_speculative_acceptance_ratio",
            "Per request that speculated: the share of its guessed tokens the model kept.",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PrefixCacheCollector:
    """Prompt reuse, read from the loaded engines when scraped (a model that unloads takes its counts along)."""

    def __init__(self, engine_stats: Callable[[], Iterable[EngineStats]]) -> None:
        self.engine_stats = engine_stats

    def collect(self):
        stats = list(self.engine_stats())
        yield CounterMetricFamily(
            "localllm_prefix_cache_hits", "Requests that started from a cached prompt prefix.",
            value=sum(s.prefix_cache_hits for s in stats),
        )
        yield CounterMetricFamily(
            "localllm_prefix_cache_tokens", "Prompt tokens reused from the cache instead of computed.",
            value=sum(s.prefix_cache_tokens for s in stats),
        )


class SpeculationCollector:
    """Speculative decoding's guessed and kept tokens, read from the loaded engines when scraped."""

    def __init__(self, engine_stats: Callable[[], Iterable[EngineStats]]) -> None:
        self.engine_stats = engine_stats

    def collect(self):
        stats = list(self.engine_stats())
        yield CounterMetricFamily(
            "localllm_speculative_draft_tokens", "Tokens guessed by speculative decoding and verified by the model.",
            value=sum(s.spec_draft_tokens for s in stats),
        )
        yield CounterMetricFamily(
            "localllm_speculative_accepted_tokens", "Guessed tokens the model kept.",
            value=sum(s.spec_accepted_tokens for s in stats),
        )


class RequestCounter:
    """ASGI middleware: counts each API response by status once its headers go out."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_COUNTED_PREFIXES):
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
