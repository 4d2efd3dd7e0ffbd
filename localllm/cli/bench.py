"""`localllm bench`: a load generator for any OpenAI-compatible server.

It streams `/v1/completions` at each concurrency level and measures what a
user feels: time to first token, the gaps between tokens, each request's
tokens per second, and the server's aggregate output rate. The same code
measures our server, Ollama, llama.cpp's server or vLLM, so comparisons are fair.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

from localllm.core.env_vars import check_header_value, check_proxy_settings
from localllm.core.errors import BadRequest

PROMPT_WORD = " the"  # one token in most vocabularies; the server's usage reports the real count


@dataclass
class BenchConfig:
    url: str  # an OpenAI base URL, e.g. http://127.0.0.1:11435/v1
    model: str
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    prompt_tokens: int = 128
    max_tokens: int = 64
    requests: int | None = None  # per level; default: max(concurrency, 8)
    api_key: str | None = None
    timeout_s: float = 600.0

    def validate(self) -> BenchConfig:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise BadRequest("--concurrency needs positive integers, e.g. 1,4,8,16")
        if self.prompt_tokens < 1 or self.max_tokens < 1:
            raise BadRequest("--prompt-tokens and --max-tokens must be >= 1")
        if self.requests is not None and self.requests < 1:
            raise BadRequest("--requests must be >= 1")
        return self


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)  # between consecutive streamed chunks
    completion_tokens: int = 0
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        decode = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else 0.0


@dataclass
class LevelReport:
    concurrency: int
    requests: int
    errors: int
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_s: float
    itl_p95_s: float
    request_tok_s_p50: float
    aggregate_tok_s: float
    wall_s: float
    first_error: str | None = None
    predicted_request_tok_s: float | None = None  # the fit plan's prediction (in-process runs only)
    predicted_aggregate_tok_s: float | None = None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def one_request(client: httpx.AsyncClient, cfg: BenchConfig) -> RequestResult:
    body = {
        "model": cfg.model,
        "prompt": PROMPT_WORD * cfg.prompt_tokens,
        "max_tokens": cfg.max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    chunks = 0
    try:
        async with client.stream("POST", f"{cfg.url.rstrip('/')}/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                result.error = f"HTTP {response.status_code}: {text}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                usage = event.get("usage")
                if usage:
                    result.completion_tokens = usage.get("completion_tokens", chunks)
                if any(c.get("text") for c in event.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - started
                    else:
                        result.gaps_s.append(now - last)
                    last = now
                    chunks += 1
        result.completion_tokens = result.completion_tokens or chunks
        result.total_s = (last or time.perf_counter()) - started
        result.ok = chunks > 0
        if not result.ok:
            result.error = "the stream ended without any text"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_level(cfg: BenchConfig, concurrency: int) -> LevelReport:
    total = cfg.requests or max(concurrency, 8)
    if cfg.api_key:
        check_header_value(cfg.api_key, "the API key")
    check_proxy_settings()
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=cfg.timeout_s, headers=headers, limits=limits) as client:

        async def gated() -> RequestResult:
            async with gate:
                return await one_request(client, cfg)

        started = time.perf_counter()
        results = await asyncio.gather(*(gated() for _ in range(total)))
        wall = time.perf_counter() - started
    good = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    gaps = [g for r in good for g in r.gaps_s]
    return LevelReport(
        concurrency=concurrency,
        requests=total,
        errors=len(errors),
        ttft_p50_s=percentile([r.ttft_s for r in good], 0.5),
        ttft_p95_s=percentile([r.ttft_s for r in good], 0.95),
        itl_p50_s=percentile(gaps, 0.5),
        itl_p95_s=percentile(gaps, 0.95),
        request_tok_s_p50=statistics.median([r.tokens_per_s for r in good]) if good else 0.0,
        aggregate_tok_s=sum(r.completion_tokens for r in good) / wall if wall > 0 else 0.0,
        wall_s=wall,
        first_error=errors[0] if errors else None,
    )


async def run_bench(cfg: BenchConfig) -> list[LevelReport]:
    cfg.validate()
    return [await run_level(cfg, level) for level in cfg.concurrency]


def format_table(reports: list[LevelReport]) -> str:
    predicted = any(r.predicted_request_tok_s is not None for r in reports)
    head = f"{'conc':>4} {'reqs':>5} {'err':>4} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} {'req tok/s':>9} {'total tok/s':>11}"
    if predicted:
        head += f" {'predicted req':>13} {'predicted total':>15}"
    lines = [head]
    for r in reports:
        line = (
            f"{r.concurrency:>4} {r.requests:>5} {r.errors:>4} {r.ttft_p50_s * 1000:>7.0f}ms {r.ttft_p95_s * 1000:>7.0f}ms "
            f"{r.itl_p50_s * 1000:>6.1f}ms {r.itl_p95_s * 1000:>6.1f}ms {r.request_tok_s_p50:>9.1f} {r.aggregate_tok_s:>11.1f}"
        )
        if predicted:
            line += f" {r.predicted_request_tok_s or 0:>13.1f} {r.predicted_aggregate_tok_s or 0:>15.1f}"
        lines.append(line)
    errors = [r.first_error for r in reports if r.first_error]
    if errors:
        lines.append(f"first error: {errors[0]}")
    return "\n".join(lines)


def to_json(reports: list[LevelReport]) -> list[dict]:
    return [asdict(r) for r in reports]


def plot(reports: list[LevelReport], path: str, title: str) -> None:
    """Throughput and TTFT against concurrency, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadRequest("--plot needs matplotlib: pip install 'localllm[bench]'") from None
    levels = [r.concurrency for r in reports]
    fig, left = plt.subplots(figsize=(7, 4), dpi=120)
    left.plot(levels, [r.aggregate_tok_s for r in reports], marker="o", color="tab:blue", label="output tok/s")
    left.set_xlabel("concurrent requests")
    left.set_ylabel("aggregate output tok/s", color="tab:blue")
    left.set_xticks(levels)
    right = left.twinx()
    right.plot(levels, [r.ttft_p50_s * 1000 for r in reports], marker="s", color="tab:orange", label="TTFT p50")
    right.set_ylabel("TTFT p50 (ms)", color="tab:orange")
    left.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
