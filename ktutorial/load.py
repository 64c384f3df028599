"""Load benchmark: many requests at once at each concurrency level, one `load` record a level.

The method is SGLang's bench_serving (sglang/bench_serving.py), which vLLM's serving sweeps share:
N requests, each a prompt of exactly `input_len` token ids with a head no other prompt has
(bench.PromptBuilder) and a reply of exactly `output_len` tokens (ignore_eos), at most
`concurrency` of them in flight. With a request rate, requests arrive as a Poisson process
(exponential gaps drawn from a seeded generator); one that arrives while `concurrency` are in
flight waits on the client side and its clock starts when it is sent, as in bench_serving.
Per request:

    TTFT = time to the first streamed token           E2E  = time to the last
    ITL  = gaps between streamed chunks; a chunk of k tokens gives k gaps of gap / k
    TPOT = (E2E - TTFT) / (output tokens - 1)

and per level, over its duration (first request sent to last one finished):

    request throughput = completed / duration     output tok/s = output tokens / duration
    total tok/s = (input + output tokens) / duration

Each latency is summarized as mean, p50, p90 and p99 (numpy.percentile, linear), and the raw
per-request samples stay in the record. A failed request (an error, a timeout, a short reply)
is counted and its error kept: a server that dies mid-run gives failed requests, not a hang.
The record also carries how many requests the server runs at once (llama.cpp's slots, SGLang's
max running requests) and a warning when the level asks for more: the rest queue in the server,
and their wait is part of their TTFT.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import httpx
import numpy as np

from ktutorial import results
from ktutorial.bench import PromptBuilder, connect, parse_counts
from ktutorial.engines.adapters import adapter_for
from ktutorial.engines.http import EngineAPI
from ktutorial.errors import UserError
from ktutorial.tables import Markdown, ShowsItself, fmt, markdown_table

KIND = "load"
LATENCIES = ("ttft_s", "itl_s", "tpot_s", "e2e_s")
PERCENTILES = (50, 90, 99)
MIN_REQUESTS = 8

# How the prefix cache is kept out of the figures under load. Unique heads alone: each prompt
# starts with a token that differs from the previous 25 prompts' and a random nonce, so a prefix
# cache matches at most those first few tokens. SGLang's /flush_cache cannot help while requests
# run: its scheduler refuses it then (Scheduler.flush_cache: "Cache not flushed because there are
# pending requests", HTTP 400), so it is sent once before each level, when nothing is in flight.
CACHE_DEFEAT = {
    "llamacpp": "unique head + cache_prompt=false",
    "sglang-kt": "unique head; /flush_cache before each level (refused while requests run)",
}


# ---- input -------------------------------------------------------------------------------------


def parse_concurrency(text: str | int | Sequence[int]) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8]; each level a whole number of at least 1 request in flight."""
    return parse_counts(text, "concurrency level", "--concurrency 1,2,4,8")


def parse_request_rate(value: str | float | None) -> float:
    """Requests per second of the Poisson arrivals; "inf" (or None): all at once, the
    concurrency limit alone paces them."""
    if value is None:
        return math.inf
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise UserError(f"request rate {value!r} is not a number of requests per second (e.g. 2.5, or inf)") from None
    if math.isnan(rate) or rate <= 0:
        raise UserError(f"request rate must be more than 0 requests per second (or inf), got {value!r}")
    return rate


def requests_for(concurrency: int, num_requests: Optional[int] = None) -> int:
    """The level's request count: `num_requests`, else 4 × concurrency and at least 8 (enough
    for the server to reach the level and stay there a while)."""
    if num_requests is None:
        return max(MIN_REQUESTS, 4 * concurrency)
    if num_requests < concurrency:
        raise UserError(f"--num-requests {num_requests} is less than concurrency {concurrency}: the level would never "
                        f"have {concurrency} requests in flight; pass at least {concurrency} (default: 4 × concurrency)")
    return num_requests


def arrival_times(n: int, request_rate: float, seed: int) -> list[float]:
    """Send times (s from the level's start): the first at 0, then exponential gaps of mean
    1 / rate (bench_serving's Poisson process); all 0 when the rate is unlimited."""
    if math.isinf(request_rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=max(0, n - 1))
    return [0.0, *np.cumsum(gaps).tolist()][:n]


# ---- per request and per level ----------------------------------------------------------------


@dataclass
class RequestSample:
    """One request under load, as the client saw it; times in s (start_s from the level's start)."""

    start_s: float
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    output_tokens: int = 0
    token_times_s: list[float] = field(default_factory=list)
    server_prompt_tokens: Optional[int] = None
    server_cached_tokens: Optional[int] = None
    error: Optional[str] = None
    failed_after_s: Optional[float] = None  # a request that raised: when, after it was sent

    @property
    def ok(self) -> bool:
        return self.error is None


def chunk_itls(token_times_s: Sequence[float]) -> list[float]:
    """Inter-token latencies from a request's token times: tokens that arrived in one chunk share
    its time, and a chunk of k tokens after a gap g gives k latencies of g / k (bench_serving)."""
    chunks = [(t, len(list(group))) for t, group in itertools.groupby(token_times_s)]
    out: list[float] = []
    for (prev, _), (t, k) in zip(chunks, chunks[1:]):
        out += [(t - prev) / k] * k
    return out


def summary(values: Sequence[float], name: str) -> dict[str, Optional[float]]:
    """{name_mean, name_p50, name_p90, name_p99}; None each when there is no value."""
    if not len(values):
        return {f"{name}_mean": None, **{f"{name}_p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float)
    pcts = np.percentile(arr, PERCENTILES)
    return {f"{name}_mean": float(arr.mean()), **{f"{name}_p{p}": float(v) for p, v in zip(PERCENTILES, pcts)}}


def max_in_flight(samples: Sequence[RequestSample]) -> int:
    """The most requests that were between send and last token at one moment."""
    events = []
    for s in samples:
        if s.e2e_s is not None:
            events += [(s.start_s, 1), (s.start_s + s.e2e_s, -1)]
    most = now = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same time
        now += step
        most = max(most, now)
    return most


def level_metrics(samples: Sequence[RequestSample], duration_s: float, input_len: int) -> dict[str, Any]:
    """The level's figures from its requests, by bench_serving's definitions."""
    ok = [s for s in samples if s.ok]
    output_tokens = sum(s.output_tokens for s in ok)
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error] = errors.get(s.error, 0) + 1
    m: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(samples) - len(ok),
        "errors": [{"error": e, "requests": n} for e, n in errors.items()],
        "duration_s": duration_s,
        "request_throughput_req_s": len(ok) / duration_s if duration_s > 0 else None,
        "output_tok_s": output_tokens / duration_s if duration_s > 0 else None,
        "total_tok_s": (output_tokens + input_len * len(ok)) / duration_s if duration_s > 0 else None,
    }
    m.update(summary([s.ttft_s for s in ok], "ttft_s"))
    m.update(summary([x for s in ok for x in chunk_itls(s.token_times_s)], "itl_s"))
    m.update(summary([(s.e2e_s - s.ttft_s) / (s.output_tokens - 1) for s in ok if s.output_tokens > 1], "tpot_s"))
    m.update(summary([s.e2e_s for s in ok], "e2e_s"))
    # bench_serving's "concurrency": the requests in flight on average over the duration
    m["mean_in_flight"] = sum(s.e2e_s for s in ok) / duration_s if duration_s > 0 else None
    m["max_in_flight"] = max_in_flight(samples)
    prompts = [s.server_prompt_tokens for s in ok if s.server_prompt_tokens is not None]
    m["prompt_len_ok"] = all(p == input_len for p in prompts) if prompts else None
    cached = [s.server_cached_tokens for s in ok if s.server_cached_tokens is not None]
    m["server_cached_tokens_max"] = max(cached) if cached else None
    return m


def queue_warning(concurrency: int, server_limit: Optional[int], engine: str) -> Optional[str]:
    """What a reader must know when a level asks for more than the server runs at once."""
    if server_limit is None or concurrency <= server_limit:
        return None
    what = {"llamacpp": "llama.cpp's slots (--parallel)",
            "sglang-kt": "SGLang's max running requests (--max-running-requests)"}.get(engine, "the server's limit")
    return (f"concurrency {concurrency} exceeds the {server_limit} request{'s' if server_limit != 1 else ''} the server "
            f"runs at once ({what}): the other {concurrency - server_limit} wait in its queue, and the wait counts in "
            "their TTFT and E2E")


class _Adapters:
    """One adapter and HTTP client per worker thread: each thread keeps its own connections."""

    def __init__(self, base_url: str, engine: str, tokenizer_path: Optional[str]):
        self.base_url, self.engine, self.tokenizer_path = base_url, engine, tokenizer_path
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()

    def get(self) -> EngineAPI:
        api = getattr(self._local, "api", None)
        if api is None:
            client = httpx.Client()
            with self._lock:
                self._clients.append(client)
            api = self._local.api = adapter_for(self.base_url, self.engine, client, self.tokenizer_path)
        return api

    def close(self) -> None:
        for client in self._clients:
            client.close()


def _send(adapters: _Adapters, ids: list[int], output_len: int, timeout_s: float, t0: float) -> RequestSample:
    start = time.perf_counter()
    sample = RequestSample(start_s=start - t0)
    try:
        timing = adapters.get().stream(ids, output_len, timeout_s)
    except Exception as exc:  # a failed request is a result: counted, its error kept, the run goes on
        sample.failed_after_s = time.perf_counter() - start
        sample.error = f"{type(exc).__name__}: {exc}"[:500]
        return sample
    sample.ttft_s, sample.e2e_s = timing.ttft_s, timing.e2e_s
    sample.output_tokens, sample.token_times_s = timing.output_tokens, list(timing.token_times_s)
    sample.server_prompt_tokens = timing.server.get("prompt_tokens")
    sample.server_cached_tokens = timing.server.get("cached_tokens")
    if timing.output_tokens != output_len:
        sample.error = (f"asked for {output_len} tokens, the server streamed {timing.output_tokens}: "
                        "it ignored ignore_eos or hit its context limit")
    return sample


def run_level(
    adapters: _Adapters,
    prompts: Sequence[list[int]],
    concurrency: int,
    output_len: int,
    request_rate: float = math.inf,
    seed: int = 0,
    timeout_s: float = 1800,
    on_sample: Optional[Callable[[RequestSample], None]] = None,
) -> tuple[list[RequestSample], float]:
    """Send every prompt, at most `concurrency` in flight, at the arrival times; the samples in
    prompt order and the level's duration (first send to last finish)."""
    arrivals = arrival_times(len(prompts), request_rate, seed)

    def job(ids: list[int]) -> RequestSample:
        sample = _send(adapters, ids, output_len, timeout_s, t0)
        if on_sample is not None:
            on_sample(sample)
        return sample

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ktutorial-load") as pool:
        t0 = time.perf_counter()
        futures = []
        for ids, at in zip(prompts, arrivals):
            wait = t0 + at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            futures.append(pool.submit(job, ids))
        samples = [f.result() for f in futures]
    ends = [s.start_s + (s.e2e_s if s.e2e_s is not None else s.failed_after_s or 0.0) for s in samples]
    return samples, max(ends, default=0.0)


# ---- the benchmark ---------------------------------------------------------------------------


@dataclass
class LoadRun(ShowsItself):
    """The `load` records of one run; shows itself as the percentile table (notebook and CLI)."""

    records: list[dict[str, Any]]

    @property
    def warnings(self) -> list[str]:
        return [r["metrics"]["warning"] for r in self.records if r["metrics"].get("warning")]

    def markdown(self) -> Markdown:
        """The report's table turned on its side, one column a level: narrow enough for a terminal."""
        headers, rows = summary_rows(self.records)
        if not rows:
            return Markdown("(no load records)")
        by_level = markdown_table(["concurrency", *(row[headers.index("concurrency")] for row in rows)],
                                  ([h, *(row[i] for row in rows)] for i, h in enumerate(headers) if h != "concurrency"))
        notes = ["Latencies in ms: p50 / p90 / p99 over the level's requests."]
        if any(r["metrics"].get("queued_in_server") for r in self.records):
            notes.append("(queued): the level sends more requests at once than the server runs at once; the rest "
                         "waited in its queue, and the wait counts in their TTFT and E2E.")
        return Markdown(by_level + "\n\n" + "\n\n".join(notes))


def measure_load(
    base_url: str,
    model: Optional[str] = None,
    concurrency: Sequence[int] | str = (1, 2, 4, 8),
    input_len: int = 512,
    output_len: int = 64,
    num_requests: Optional[int] = None,
    request_rate: float | str | None = math.inf,
    seed: int = 0,
    warmup: int = 1,
    out=None,
    *,
    engine: Optional[str] = None,
    config: Optional[str] = None,
    params: Optional[dict[str, Any]] = None,
    model_revision: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    timeout_s: float = 1800,
    on_record: Optional[Callable[[dict], None]] = None,
    on_sample: Optional[Callable[[RequestSample], None]] = None,
) -> LoadRun:
    """Run each concurrency level in turn after `warmup` unrecorded single requests; each level's
    `load` record is appended to `out` (JSONL) as soon as the level ends. `num_requests`: per
    level (default 4 × concurrency, at least 8). `request_rate`: req/s of Poisson arrivals
    (seeded by `seed` and the level), inf for all at once."""
    levels = parse_concurrency(concurrency)
    rate = parse_request_rate(request_rate)
    counts = [requests_for(c, num_requests) for c in levels]  # refused here, before any request
    if input_len < 1 or output_len < 1:
        raise UserError(f"input and output lengths must be at least 1 token, got {input_len} and {output_len}")
    if output_len < 2:
        raise UserError("--output-len must be at least 2 for inter-token latencies (TPOT, ITL)")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    with httpx.Client() as client:
        api, model, env = connect(client, base_url, input_len, output_len, engine=engine, model=model,
                                  model_revision=model_revision, tokenizer_path=tokenizer_path)
        server_limit = api.max_running_requests()
        builder = PromptBuilder(api)
        for _ in range(warmup):
            ids, _nonce = builder.build(input_len)
            api.before_request()
            api.stream(ids, output_len, timeout_s)
        base_params = {
            "input_len": input_len, "output_len": output_len, "seed": seed, "warmup": warmup,
            "request_rate_req_s": None if math.isinf(rate) else rate,
            "arrivals": "all at once" if math.isinf(rate) else "poisson",
            "engine": api.name, "model": model, "route": api.route, "cache_defeat": CACHE_DEFEAT[api.name],
            "config": config or f"{api.name} {model}", **(params or {}),
        }  # fmt: skip
        adapters = _Adapters(base_url, api.name, tokenizer_path)
        records = []
        try:
            for level, (conc, n) in enumerate(zip(levels, counts)):
                prompts = [builder.build(input_len)[0] for _ in range(n)]  # tokenized before the clock starts
                api.before_request()  # nothing in flight between levels: SGLang's flush succeeds here
                samples, duration = run_level(adapters, prompts, conc, output_len, rate, seed + level, timeout_s,
                                              on_sample)
                metrics = level_metrics(samples, duration, input_len)
                warning = queue_warning(conc, server_limit, api.name)
                metrics.update({"server_max_running_requests": server_limit, "queued_in_server": warning is not None,
                                "warning": warning})
                rec = results.make_record(
                    KIND, {**base_params, "concurrency": conc, "num_requests": n}, metrics,
                    samples={"requests": [_sample_dict(s) for s in samples]}, env=env,
                )
                if out is not None:
                    results.append_record(out, rec)
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
        finally:
            adapters.close()
    return LoadRun(records)


def _sample_dict(s: RequestSample) -> dict[str, Any]:
    d = asdict(s)
    d["token_times_s"] = [round(t, 6) for t in s.token_times_s]
    return d


# ---- tables ------------------------------------------------------------------------------------


def _ms(rec: dict, name: str) -> str:
    vals = [rec["metrics"].get(f"{name}_p{p}") for p in PERCENTILES]
    return " / ".join(fmt(None if v is None else v * 1000) for v in vals)


def summary_rows(records: Sequence[dict]) -> tuple[list[str], list[list[Any]]]:
    """One row per `load` record: the level, the throughputs, the latency percentiles in ms."""
    loads = [r for r in records if r["kind"] == KIND]
    several = len({(r["params"].get("config"), r["params"]["input_len"], r["params"]["output_len"]) for r in loads}) > 1
    headers = [*(["configuration", "in / out"] if several else []), "concurrency", "rate req/s", "done / sent",
               "req/s", "output tok/s", "TTFT ms", "ITL ms", "TPOT ms", "E2E ms", "server runs at once"]
    rows = []
    for r in loads:
        p, m = r["params"], r["metrics"]
        rate = p.get("request_rate_req_s")
        limit = m.get("server_max_running_requests")
        rows.append([
            *([p.get("config"), f"{p['input_len']} / {p['output_len']}"] if several else []),
            p["concurrency"], "inf" if rate is None else fmt(rate), f"{m['completed']} / {p['num_requests']}",
            fmt(m["request_throughput_req_s"]), fmt(m["output_tok_s"]),
            _ms(r, "ttft_s"), _ms(r, "itl_s"), _ms(r, "tpot_s"), _ms(r, "e2e_s"),
            "-" if limit is None else f"{limit}{' (queued)' if m.get('queued_in_server') else ''}",
        ])  # fmt: skip
    return headers, rows


def load_table(records: Sequence[dict]) -> Markdown:
    """The markdown table of `load` records (latencies p50 / p90 / p99 in ms); "" without any."""
    headers, rows = summary_rows(records)
    return markdown_table(headers, rows) if rows else Markdown("")


__all__ = [
    "KIND", "CACHE_DEFEAT", "LoadRun", "RequestSample", "measure_load", "run_level", "level_metrics",
    "parse_concurrency", "parse_request_rate", "requests_for", "arrival_times", "chunk_itls", "summary",
    "max_in_flight", "queue_warning", "summary_rows", "load_table",
]  # fmt: skip
