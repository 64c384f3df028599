"""Find the largest --kt-num-gpu-experts (then --chunked-prefill-size) that serves the planned context, by real launches.

The planner (plan.py) estimates where GPU memory runs out; `tune` measures it. Each probe is one
real launch through the one server lifecycle (server.prepare + Server.start, what `ktutorial serve`
runs),
one prompt of exactly the planned context (less the few output tokens) sent as token ids through
the engine's adapter, then a stop, whatever happened. A probe ends in one of:

    ok              it launched, took the whole prompt and streamed every output token
    launch_failed   it died or never became ready: diagnose.py's diagnoses and the log tail
    prompt_refused  it launched but refused the prompt or cut the reply short: the HTTP error
    prompt_failed   it launched but died or timed out on the prompt: the log's diagnoses

The search (`largest_passing`, pure, given a probe) starts where the planner predicts the boundary,
steps up or down with doubling steps until a pass and a fail straddle it (within [--min, --max]),
then bisects down to one expert. Where the engine's own numbers say where the boundary is (SGLang
reports the KV pool it allocated when it is below the --max-total-tokens cap, and logs the free
memory around the weights, which gives the room the pool had; the planner says how many bytes one
expert costs), the search tries that value and its neighbours before halving: hints choose which
probes to make, never the answer. At the expert count found it climbs a ladder of chunk sizes (powers of
two from the plan's up to the first that holds the whole context) until one fails.

Every probe is a `tune_probe` record, appended as it finishes; the end is a `tune_result` record
(the boundary, the first failing value one step past it with its diagnosis, the chunk size, the
probes and launches); `resume` reuses the probes a records file holds for the same setup, so an
interrupted tune loses nothing. `tuned_profile` turns the result into a profile to keep.

SGLang's own limits, read from sglang-kt 0.7.2: the KV pool is what `--mem-fraction-static` x the
GPU's free memory leaves after the weights (model_runner_kv_cache_mixin.profile_max_num_token),
capped by `--max-total-tokens`; no room at all fails the launch ("Not enough memory", or
tp_worker's "Memory pool size is too small"); a request longer than the pool or the context is
refused in the stream (scheduler.validate_input_length, HTTP 400) and its new tokens are capped at
pool - 1 - input - 1 (scheduler.init_req_max_new_tokens).

Record fields (kinds owned here):
  tune_probe   params: tune (setup key), profile, phase (experts | chunk), reason (start | bracket |
               hint | bisect | ladder), settings, serve.<flag>, context_tokens, prompt_tokens,
               output_tokens, probe_key. metrics: outcome, ok, wall_s, launch_s, prompt_s, diagnosis,
               error, log_tail, diagnoses, returncode, boundary_hint, server_* (what the server said).
  tune_result  params: tune, profile, min, max, start, context_tokens, chunk_rungs, sets.
               metrics: boundary, first_failing (+ _outcome, _diagnosis), chunked_prefill_size,
               chunk_first_failing (+ _outcome, _diagnosis), probes, launches, reused,
               planner_predicted_boundary, planner_error_experts, settings, wall_s.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import yaml
from rich.markup import escape

from ktutorial import bench, results, server
from ktutorial.doctor import parse_sets
from ktutorial.engines import sglang_kt
from ktutorial.engines.adapters import adapter_for
from ktutorial.errors import UserError
from ktutorial.plan import Plan, gpu_expert_bytes_per_gpu
from ktutorial.profiles import Profile, load_profile
from ktutorial.tables import Markdown, ShowsItself, join, table

EXPERTS = "kt-num-gpu-experts"
CHUNK = "chunked-prefill-size"
FRACTION = "mem-fraction-static"
OUTCOMES = ("ok", "launch_failed", "prompt_refused", "prompt_failed")
# A few output tokens: the probe is about memory, not speed; more than SGLang's 5 reserved tokens.
PROBE_OUTPUT_TOKENS = 8
# Tokens of the context a request cannot use. SGLang: its longest request is the pool less 1
# (tp_worker.max_req_len) and the new-token budget is that less the input less 1 more
# (scheduler.init_req_max_new_tokens). llama.cpp: prompt + output fill n_ctx exactly.
RESERVED_TOKENS = {"sglang-kt": 2, "llamacpp": 0}
REQUEST_TIMEOUT_S = 600.0


# ==== the search (pure) ==========================================================================


@dataclass
class ProbeResult:
    """What one probe found: its outcome and why, in one line and in detail (record metrics)."""

    outcome: str
    wall_s: float = 0.0
    diagnosis: str = ""
    # Where the engine's own numbers put the boundary (None: they do not say).
    boundary_hint: Optional[int] = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"probe outcome {self.outcome!r} is not one of {OUTCOMES}")

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class Step:
    """One value the search asked about, why, and the answer."""

    value: int
    reason: str  # start, bracket, hint, bisect, ladder
    result: ProbeResult


def largest_passing(probe: Callable[[int, str], ProbeResult], lo: int, hi: int,
                    start: int) -> tuple[Optional[int], Optional[int], list[Step]]:
    """(largest passing value, the failing value one past it, the steps) for a pass/fail that
    holds up to some boundary in [lo, hi] and fails beyond it.

    From `start` (clamped into range) it steps up after a pass, down after a fail, by 1, 2, 4, ...
    until a pass and a fail straddle the boundary, then halves the gap down to 1. A result's
    `boundary_hint` (and its neighbours) is tried first when it lies strictly inside the open
    bracket. (None, lo, steps) when even `lo` fails; (hi, None, steps) when `hi` passes.
    `probe(value, reason)` is asked once per value.
    """
    if lo > hi:
        raise UserError(f"the search range is empty: --min {lo} > --max {hi}")
    steps: list[Step] = []
    seen: dict[int, ProbeResult] = {}

    def check(value: int, reason: str) -> bool:
        if value not in seen:
            result = probe(value, reason)
            seen[value] = result
            steps.append(Step(value, reason, result))
        return seen[value].ok

    def hinted(below: int, above: int) -> Optional[int]:
        """The latest hint, or a neighbour (the hint is good to about one), if untried and strictly
        between the bounds: after the hint passes, the values above it; after it fails, the one below."""
        for step in reversed(steps):
            hint = step.result.boundary_hint
            if hint is None:
                continue
            for value in (hint, hint + 1, hint + 2, hint - 1):
                if below < value < above and value not in seen:
                    return value
            return None
        return None

    start = min(max(start, lo), hi)
    good: Optional[int] = start if check(start, "start") else None
    bad: Optional[int] = None if good is not None else start
    stride = 1
    while bad is None:  # climbing: every value so far passed
        if good == hi:
            return hi, None, steps
        value = hinted(good, hi + 1)
        reason = "hint"
        if value is None:
            value, reason = min(hi, good + stride), "bracket"
            stride *= 2
        if check(value, reason):
            good = value
        else:
            bad = value
    while good is None:  # descending: every value so far failed
        if bad == lo:
            return None, lo, steps
        value = hinted(lo - 1, bad)
        reason = "hint"
        if value is None:
            value, reason = max(lo, bad - stride), "bracket"
            stride *= 2
        if check(value, reason):
            good = value
        else:
            bad = value
    while bad - good > 1:
        value = hinted(good, bad)
        reason = "hint"
        if value is None:
            value, reason = (good + bad) // 2, "bisect"
        if check(value, reason):
            good = value
        else:
            bad = value
    return good, bad, steps


def largest_rung(probe: Callable[[int, str], ProbeResult],
                 rungs: list[int]) -> tuple[Optional[int], Optional[int], list[Step]]:
    """(largest passing rung, the first failing one, the steps): up the ladder until a rung fails."""
    best: Optional[int] = None
    steps: list[Step] = []
    for rung in rungs:
        result = probe(rung, "ladder")
        steps.append(Step(rung, "ladder", result))
        if not result.ok:
            return best, rung, steps
        best = rung
    return best, None, steps


def chunk_ladder(chunk: int, context_tokens: int) -> list[int]:
    """Powers of two from the plan's chunk up to the first that holds the whole context in one pass."""
    rungs = [int(chunk)]
    while rungs[-1] < context_tokens:
        rungs.append(rungs[-1] * 2)
    return rungs


def simulated_launches(lo: int, hi: int, start: int, boundary: int) -> int:
    """How many probes the search makes when the boundary is `boundary` (lo - 1: nothing passes),
    with no hints: what --dry-run quotes."""
    def probe(value: int, reason: str) -> ProbeResult:
        return ProbeResult("ok" if value <= boundary else "launch_failed")

    return len(largest_passing(probe, lo, hi, start)[2])


# ==== the real probe ==============================================================================


def prompt_tokens_for(engine: str, context_tokens: int, output_tokens: int) -> int:
    """The prompt that, with `output_tokens` and what the engine reserves, fills the context."""
    if engine not in RESERVED_TOKENS:
        raise UserError(f"unknown engine {engine!r} (llamacpp or sglang-kt)")
    prompt = int(context_tokens) - int(output_tokens) - RESERVED_TOKENS[engine]
    if output_tokens < 1 or prompt < 1:
        raise UserError(f"a context of {context_tokens} tokens leaves no prompt beside {output_tokens} output tokens: "
                        "plan a longer context (--context-tokens)")
    return prompt


def _one_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).strip().splitlines()[0][:500]


class ServerProbe:
    """One real launch per call: serve the profile with `settings` on top (server.prepare and
    Server.start, what `server.serve` does), wait until ready, send one prompt of the planned
    context less `output_tokens` (exact token ids, the bench's PromptBuilder, prefix cache
    defeated), stop the server whatever happened, and classify the outcome.

    `settings` are knobs as a sweep names them (bench.serve_options): SGLang flags
    ({"kt-num-gpu-experts": 40}) or llama.cpp serve options ({"ctx_size": 4096}).
    For SGLang, `expert_bytes` (one GPU expert per layer, per GPU) and `kv_bytes_per_token` (the
    planner's) turn the KV room the server reports into a boundary hint.
    """

    def __init__(self, profile: Profile | str, context_tokens: int, *, plan_options: Optional[dict] = None,
                 output_tokens: int = PROBE_OUTPUT_TOKENS, ready_timeout_s: Optional[float] = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, expert_bytes: Optional[float] = None,
                 kv_bytes_per_token: Optional[float] = None):
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self.engine = self.profile.engine
        self.context_tokens = int(context_tokens)
        self.output_tokens = int(output_tokens)
        self.prompt_tokens = prompt_tokens_for(self.engine, self.context_tokens, self.output_tokens)
        self.plan_options = dict(plan_options or {})
        self.ready_timeout_s = ready_timeout_s
        self.request_timeout_s = request_timeout_s
        self.expert_bytes = expert_bytes
        self.kv_bytes_per_token = kv_bytes_per_token

    def serve_options(self, settings: dict[str, Any]) -> dict[str, Any]:
        options = bench.serve_options(self.profile, settings)
        if self.engine == "sglang-kt":
            # A probe's settings may lie past the planner's estimate: that is what it measures.
            options.update(plan_options=self.plan_options, beyond_plan=True)
        if self.ready_timeout_s is not None:
            options["ready_timeout_s"] = float(self.ready_timeout_s)
        return options

    def __call__(self, settings: dict[str, Any]) -> ProbeResult:
        t0 = time.monotonic()
        srv = server.Server(server.prepare(self.profile, **self.serve_options(settings)))
        try:
            try:
                srv.start()  # waits until ready; a server that dies or times out is stopped, then raises
            except server.ServerStartError as exc:
                details = {"launch_s": round(time.monotonic() - t0, 2), "error": _one_line(exc),
                           "diagnoses": [d.to_dict() for d in exc.diagnoses], "returncode": exc.returncode,
                           "log_tail": exc.log_tail[-2000:]}
                hint = self._hint(srv, settings, {}, details)
                return ProbeResult("launch_failed", time.monotonic() - t0,
                                   "; ".join(str(d) for d in exc.diagnoses) or _one_line(exc), hint, details)
            return self._prompt(srv, settings, t0)
        finally:
            srv.stop()

    def _prompt(self, srv: server.Server, settings: dict[str, Any], t0: float) -> ProbeResult:
        details: dict[str, Any] = {"launch_s": round(time.monotonic() - t0, 2)}
        t1 = time.monotonic()
        hint: Optional[int] = None
        tokenizer = str(Path(self.profile.model_dir).expanduser()) if self.profile.model_dir else None
        try:
            with httpx.Client() as http:
                api = adapter_for(srv.base_url, srv.engine, http, tokenizer_path=tokenizer)
                info = api.describe()
                details.update({k: v for k, v in info.items() if k.startswith("server_")})
                hint = self._hint(srv, settings, info, details)
                ids, _nonce = bench.PromptBuilder(api).build(self.prompt_tokens)
                api.before_request()
                t1 = time.monotonic()
                timing = api.stream(ids, self.output_tokens, self.request_timeout_s)
        except (UserError, TimeoutError) as exc:
            details["prompt_s"] = round(time.monotonic() - t1, 2)
            details["error"] = str(exc)[:2000]
            alive = srv.is_alive()
            if alive and not isinstance(exc, TimeoutError):
                return ProbeResult("prompt_refused", time.monotonic() - t0, self._why(_one_line(exc), details),
                                   hint, details)
            rc = None if alive else srv.returncode()
            found = srv.diagnoses(rc)
            details.update({"returncode": rc, "diagnoses": [d.to_dict() for d in found],
                            "log_tail": srv.log_tail()[-2000:]})
            why = "; ".join(str(d) for d in found) or (
                f"the server died on the prompt (code {rc})" if not alive else _one_line(exc))
            return ProbeResult("prompt_failed", time.monotonic() - t0, why, hint, details)
        details["prompt_s"] = round(time.monotonic() - t1, 2)
        details["server_prompt_tokens"] = timing.server.get("prompt_tokens")
        details["output_tokens"] = timing.output_tokens
        if timing.output_tokens < self.output_tokens:
            why = (f"the server stopped after {timing.output_tokens} of {self.output_tokens} output tokens: "
                   f"it holds less than the planned {self.context_tokens:,}-token context")
            return ProbeResult("prompt_refused", time.monotonic() - t0, self._why(why, details), hint, details)
        return ProbeResult("ok", time.monotonic() - t0, "", hint, details)

    def _hint(self, srv: server.Server, settings: dict[str, Any], info: dict[str, Any],
              details: dict[str, Any]) -> Optional[int]:
        """The expert count at which the KV room would just hold the context: from the pool SGLang
        allocated when it is below the --max-total-tokens cap (then it is all the room there was),
        else from the free memory its log reports around the weights. None for other engines."""
        experts = settings.get(EXPERTS)
        if self.engine != "sglang-kt" or experts is None or not self.expert_bytes or not self.kv_bytes_per_token:
            return None
        pool, cap = info.get("server_max_total_num_tokens"), info.get("server_max_total_tokens")
        room = pool if pool is not None and cap is not None and pool < cap else None
        if room is None:
            fraction = sglang_kt.parse_command(srv.launch.command).get(FRACTION)
            log = Path(srv.log_path).read_text(errors="replace") if srv.log_path and Path(srv.log_path).exists() else ""
            room = sglang_kt.kv_room_from_log(log, float(fraction), self.kv_bytes_per_token) if fraction else None
            details["kv_room_tokens_from_log"] = room
        if room is None:
            return None
        return int(experts) + math.floor((room - self.context_tokens) * self.kv_bytes_per_token / self.expert_bytes)

    def _why(self, error: str, details: dict[str, Any]) -> str:
        pool = details.get("server_max_total_num_tokens")
        if pool is not None and pool < self.context_tokens:
            return (f"{error} (the KV pool holds {pool:,} tokens < the {self.context_tokens:,}-token context: the "
                    "weights left that little of --mem-fraction-static)")
        return error


# ==== probes as records, and resume ================================================================


class ProbeLog:
    """Every probe of one tune: each new one run and appended to `out` as it finishes, each one
    already in `out` for the same setup reused without a launch (resume)."""

    def __init__(self, probe: Callable[[dict[str, Any]], ProbeResult], setup: dict[str, Any], *,
                 out: Optional[str | Path] = None, resume: bool = False, env: Optional[dict] = None,
                 on_probe: Optional[Callable[[dict[str, Any], ProbeResult, bool], None]] = None):
        self.probe = probe
        self.setup = setup
        self.key = results.stable_key(setup)
        self.out = Path(out) if out else None
        self.env = env
        self.on_probe = on_probe
        self.known: dict[str, ProbeResult] = {}
        self.launches = 0
        self.reused = 0
        if resume and self.out is not None and self.out.exists():
            for rec in results.load_records(self.out):
                if rec["kind"] == "tune_probe" and rec["params"].get("tune") == self.key:
                    self.known[rec["params"]["probe_key"]] = _result_from_record(rec)

    def probe_key(self, settings: dict[str, Any]) -> str:
        return results.stable_key({"tune": self.key, "settings": settings})

    def __call__(self, settings: dict[str, Any], phase: str, reason: str) -> ProbeResult:
        key = self.probe_key(settings)
        if key in self.known:
            self.reused += 1
            result = self.known[key]
            if self.on_probe:
                self.on_probe(settings, result, True)
            return result
        result = self.probe(settings)
        self.launches += 1
        self.known[key] = result
        if self.out is not None:
            params = {"tune": self.key, "profile": self.setup.get("profile"), "phase": phase, "reason": reason,
                      "settings": settings, **{f"serve.{k}": v for k, v in settings.items()},
                      **{k: self.setup.get(k) for k in ("context_tokens", "prompt_tokens", "output_tokens")},
                      "probe_key": key}
            metrics = {"outcome": result.outcome, "ok": result.ok, "wall_s": round(result.wall_s, 2),
                       "diagnosis": result.diagnosis[:2000], "boundary_hint": result.boundary_hint, **result.details}
            results.append_record(self.out, results.make_record("tune_probe", params, metrics, env=self.env))
        if self.on_probe:
            self.on_probe(settings, result, False)
        return result


_RESULT_FIELDS = {"outcome", "ok", "wall_s", "diagnosis", "boundary_hint"}


def _result_from_record(rec: dict[str, Any]) -> ProbeResult:
    m = rec["metrics"]
    return ProbeResult(m["outcome"], float(m.get("wall_s") or 0.0), m.get("diagnosis") or "", m.get("boundary_hint"),
                       {k: v for k, v in m.items() if k not in _RESULT_FIELDS})


# ==== the plan of a tune ===========================================================================


@dataclass
class TunePlan:
    """What a tune will do, before it starts anything (what --dry-run prints)."""

    profile: Profile
    plan: Plan  # the planner's plan for the profile and the --set values, at the start
    sets: list[str]  # --set FLAG=VALUE, as `serve` takes them (the fraction aid's included)
    plan_options: dict[str, Any]
    lo: int
    hi: int
    start: int
    start_why: str
    chunk: int  # the chunk size every expert probe runs with
    rungs: list[int]  # the chunk ladder climbed at the boundary ([] with --no-chunk)
    context_tokens: int
    output_tokens: int
    prompt_tokens: int
    predicted_boundary: Optional[int]
    predicted_why: str
    fraction_note: Optional[str]
    first_command: str
    launches_if_predicted: int
    launches_max: int
    expert_bytes: Optional[float]  # one more GPU expert per layer, per GPU (the planner's)
    kv_bytes_per_token: Optional[float]  # the KV pool per token, per GPU (the planner's)

    def settings(self, experts: int, chunk: Optional[int] = None) -> dict[str, int]:
        return {EXPERTS: int(experts), CHUNK: int(self.chunk if chunk is None else chunk)}

    def setup(self) -> dict[str, Any]:
        """What a probe's result depends on besides its own settings (the resume key)."""
        return {"profile": self.profile.name, "engine": self.profile.engine, "model_dir": self.profile.model_dir,
                "hardware": self.plan.hardware.label(), "profile_sglang": self.profile.sglang, "sets": self.sets,
                "plan_options": {k: v for k, v in self.plan_options.items() if k != "sets"},
                "context_tokens": self.context_tokens, "output_tokens": self.output_tokens,
                "prompt_tokens": self.prompt_tokens}

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "min": self.lo, "max": self.hi, "start": self.start,
                "start_why": self.start_why, "chunk": self.chunk, "chunk_rungs": self.rungs,
                "context_tokens": self.context_tokens, "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "sets": self.sets,
                "planner_predicted_boundary": self.predicted_boundary, "planner_prediction": self.predicted_why,
                "fraction_for_boundary": self.fraction_note, "first_command": self.first_command,
                "launches_if_predicted": self.launches_if_predicted, "launches_max": self.launches_max,
                "chunk_launches_max": max(0, len(self.rungs) - 1)}

    def lines(self) -> list[str]:
        out = [f"tune {EXPERTS} for profile {self.profile.name} ({self.plan.spec.name}, "
               f"{self.plan.spec.num_layers} layers, {self.plan.spec.num_experts} experts a layer) on "
               f"{self.plan.hardware.label()}",
               f"  bounds: {EXPERTS} in [{self.lo}, {self.hi}]; every probe with {CHUNK} {self.chunk}",
               f"  each probe: launch, one prompt of {self.prompt_tokens:,} tokens + {self.output_tokens} output "
               f"(the planned {self.context_tokens:,}-token context), stop",
               f"  planner: {self.predicted_why}",
               f"  start: {self.start} ({self.start_why})"]
        if self.fraction_note:
            out.append(f"  {self.fraction_note}")
        out.append(f"  launches: {self.launches_if_predicted} if the boundary is at the start, at most "
                   f"{self.launches_max} wherever it lies in [{self.lo}, {self.hi}] (bisection; a server's own "
                   "numbers can shorten it)")
        if len(self.rungs) > 1:
            out.append(f"  then {CHUNK} at the boundary: up the ladder {', '.join(map(str, self.rungs[1:]))} until "
                       f"one fails (at most {len(self.rungs) - 1} more launches)")
        elif self.rungs:
            out.append(f"  {CHUNK}: not searched: {self.chunk} already holds the whole context in one pass")
        else:
            out.append(f"  {CHUNK}: not searched (--no-chunk)")
        out.append("  first probe's command:")
        out.append(f"    {self.first_command}")
        return out

    def __rich__(self) -> str:
        return escape("\n".join(self.lines()))


def _typed_sets(sets: list[str]) -> dict[str, Any]:
    return sglang_kt.check_overrides(parse_sets(sets))


def _effective(plan: Plan, prof: Profile, settings: dict[str, Any]) -> Plan:
    """The plan a probe with `settings` launches with: the --set values, the profile's flags under
    them, the probe's settings over both (as server.prepare renders it)."""
    return plan.replan({**server.profile_flags(prof, plan), **settings})


def predicted_boundary(plan: Plan, prof: Profile, lo: int, hi: int, chunk: int) -> tuple[Optional[int], str]:
    """The largest expert count in [lo, hi] whose re-plan fits (the planner's arithmetic), and why."""
    def fits(n: int) -> Plan:
        return _effective(plan, prof, {EXPERTS: n, CHUNK: chunk})

    low = fits(lo)
    if not low.fits:
        why = "; ".join(low.reasons)[:400]
        return None, f"no prediction: even {lo} GPU experts do not fit by its arithmetic ({why})"
    if fits(hi).fits:
        return hi, f"every count up to {hi} fits by its arithmetic: the boundary is at or above --max"
    good, bad = lo, hi
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid).fits else (good, mid)
    gpu = fits(good).memory["gpu"]
    return good, (f"predicts the boundary at {good}: each GPU expert costs {gpu['gib_per_gpu_expert']:.4f} GiB, the "
                  f"KV pool {gpu['kv_bytes_per_token_per_gpu']:,} B a token; at {bad}: "
                  f"{'; '.join(fits(bad).reasons)[:300]}")


def fraction_for_boundary(plan: Plan, prof: Profile, boundary: int, chunk: int) -> float:
    """A demonstration aid: the --mem-fraction-static at which the planner's arithmetic puts the
    boundary at `boundary` experts (half an expert of room to spare) for the planned context.

    A GPU that holds every expert beside the context (an H200 and a 2-layer checkpoint) has no
    boundary to find; a smaller static fraction makes one. The real boundary then lies where the
    engine's real allocations put it, which is what the tune measures.
    """
    def fits(fraction: float, n: int) -> bool:
        return _effective(plan, prof, {FRACTION: fraction, EXPERTS: n, CHUNK: chunk}).fits

    def lowest(n: int) -> float:
        # From the fraction the launch would have (the profile's, else the planner's own) down.
        own = _effective(plan, prof, {EXPERTS: n, CHUNK: chunk})
        lo, hi = 1e-6, own.settings[FRACTION].value
        if hi is None or not own.fits:
            raise UserError(f"--fraction-for-boundary {boundary}: {n} GPU experts do not fit by the planner's "
                            f"arithmetic: {'; '.join(own.reasons)[:400]}")
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fits(mid, n) else (mid, hi)
        return hi

    at, above = lowest(boundary), lowest(boundary + 1)
    fraction = (at + above) / 2
    # As the command renders it (6 significant digits), still between the two.
    fraction = float(f"{fraction:.6g}")
    if not (at <= fraction < above):
        raise UserError(f"--fraction-for-boundary {boundary}: one expert is below the fraction's precision here")
    return fraction


def make_tune_plan(profile: Profile | str, sets: Optional[list[str]] = None, *, lo: Optional[int] = None,
                   hi: Optional[int] = None, context_tokens: Optional[int] = None, no_chunk: bool = False,
                   boundary_for_fraction: Optional[int] = None, output_tokens: int = PROBE_OUTPUT_TOKENS,
                   plan_options: Optional[dict[str, Any]] = None) -> TunePlan:
    """The search a tune will make for an sglang-kt profile (`--set` as `serve` takes them), with
    the planner's prediction and the first probe's command rendered and validated. Starts nothing."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    if prof.engine != "sglang-kt":
        raise UserError(
            f"profile {prof.name!r} runs {prof.engine}: `ktutorial tune` searches SGLang + KT's --{EXPERTS} (GPU "
            f"experts per layer) and --{CHUNK} by launching the server and sending it a prompt of the planned "
            "context, which llama.cpp does not have; tune an sglang-kt profile (minimax-m2.1, minimax-m2.1-synth, "
            "tiny-sglang) on a machine with an NVIDIA GPU")
    sets = [str(s) for s in (sets or [])]
    typed = _typed_sets(sets)
    if EXPERTS in typed:
        raise UserError(f"--set {EXPERTS}: tune searches it; bound the search with --min/--max instead")
    options = {k: v for k, v in (plan_options or {}).items() if v is not None and k != "sets"}
    if context_tokens is not None:
        options["context_tokens"] = int(context_tokens)

    def planned(current_sets: list[str]) -> Plan:
        return server.plan_for_profile(prof, **options, sets=current_sets)

    plan = planned(sets)
    base = _effective(plan, prof, {})
    context = int(base.memory["gpu"]["context_tokens"])
    chunk = int(base.settings[CHUNK].value)
    experts_per_layer = plan.spec.num_experts
    lo = 0 if lo is None else int(lo)
    hi = experts_per_layer if hi is None else int(hi)
    if lo < 0:
        raise UserError(f"--min {lo}: the count of GPU experts per layer is 0 or more")
    if hi > experts_per_layer:
        raise UserError(f"--max {hi} > the {experts_per_layer} experts a layer of {plan.spec.name} has")
    if lo > hi:
        raise UserError(f"--min {lo} > --max {hi}: give a range with --min at most --max")

    fraction_note = None
    if boundary_for_fraction is not None:
        if FRACTION in typed:
            raise UserError(f"--fraction-for-boundary computes --{FRACTION}; drop --set {FRACTION} (or the option)")
        if not lo <= boundary_for_fraction <= hi:
            raise UserError(f"--fraction-for-boundary {boundary_for_fraction} is outside [--min {lo}, --max {hi}]")
        fraction = fraction_for_boundary(plan, prof, boundary_for_fraction, chunk)
        sets = [*sets, f"{FRACTION}={fraction:g}"]
        plan = planned(sets)
        fraction_note = (f"--{FRACTION} {fraction:g}: from --fraction-for-boundary {boundary_for_fraction}, a "
                         "demonstration aid: the static fraction at which the planner's arithmetic puts the boundary "
                         f"at {boundary_for_fraction} experts for this context (with the profile's own fraction this "
                         "GPU may hold every expert, leaving no boundary to find)")

    predicted, predicted_why = predicted_boundary(plan, prof, lo, hi, chunk)
    if predicted is not None:
        start, start_why = predicted, "the planner's predicted boundary"
    else:
        start = min(max(int(_effective(plan, prof, {}).settings[EXPERTS].value), lo), hi)
        start_why = "the plan's --kt-num-gpu-experts (no prediction)"
    first = {EXPERTS: start, CHUNK: chunk}
    launch = server.prepare(prof, dry_run=True, plan=plan, overrides={f"--{k}": v for k, v in first.items()},
                            beyond_plan=True)
    gpu = plan.memory["gpu"]
    return TunePlan(
        profile=prof, plan=plan, sets=sets, plan_options={**options, "sets": sets}, lo=lo, hi=hi, start=start,
        start_why=start_why, chunk=chunk, rungs=[] if no_chunk else chunk_ladder(chunk, context),
        context_tokens=context, output_tokens=output_tokens,
        prompt_tokens=prompt_tokens_for(prof.engine, context, output_tokens),
        predicted_boundary=predicted, predicted_why=predicted_why, fraction_note=fraction_note,
        first_command=launch.shell(), launches_if_predicted=simulated_launches(lo, hi, start, start),
        launches_max=max(simulated_launches(lo, hi, start, b) for b in range(lo - 1, hi + 1)),
        expert_bytes=gpu_expert_bytes_per_gpu(plan.spec, gpu["tp"]),
        kv_bytes_per_token=gpu.get("kv_bytes_per_token_per_gpu"),
    )


# ==== the tune =====================================================================================


@dataclass
class TuneRun(ShowsItself):
    """A finished tune: the boundary, the value one past it and why it failed, every probe."""

    tune_plan: TunePlan
    boundary: Optional[int]
    first_failing: Optional[int]
    chunk: Optional[int]
    chunk_first_failing: Optional[int]
    steps: list[tuple[str, dict[str, int], Step]]  # (phase, settings, step)
    launches: int
    reused: int
    wall_s: float
    out: Optional[str]
    record: Optional[dict[str, Any]] = None

    def _result(self, phase: str, value: Optional[int]) -> Optional[ProbeResult]:
        for ph, _settings, step in self.steps:
            if ph == phase and step.value == value:
                return step.result
        return None

    def settings(self) -> dict[str, Any]:
        """The sglang flags the tuned profile launches with: --set values, then the found ones."""
        found = {} if self.boundary is None else {EXPERTS: self.boundary, CHUNK: self.chunk or self.tune_plan.chunk}
        return {**_typed_sets(self.tune_plan.sets), **found}

    def metrics(self) -> dict[str, Any]:
        fail = self._result("experts", self.first_failing)
        cfail = self._result("chunk", self.chunk_first_failing)
        predicted = self.tune_plan.predicted_boundary
        return {
            "boundary": self.boundary,
            "first_failing": self.first_failing,
            "first_failing_outcome": fail.outcome if fail else None,
            "first_failing_diagnosis": fail.diagnosis[:2000] if fail else None,
            "chunked_prefill_size": self.chunk,
            "chunk_first_failing": self.chunk_first_failing,
            "chunk_first_failing_outcome": cfail.outcome if cfail else None,
            "chunk_first_failing_diagnosis": cfail.diagnosis[:2000] if cfail else None,
            "probes": len(self.steps),
            "launches": self.launches,
            "reused": self.reused,
            "planner_predicted_boundary": predicted,
            "planner_error_experts": (self.boundary - predicted) if None not in (self.boundary, predicted) else None,
            "settings": self.settings(),
            "wall_s": round(self.wall_s, 1),
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.metrics(), "out": self.out, "search": self.tune_plan.as_dict(),
                "probe_list": [{"phase": ph, "settings": s, "reason": st.reason, "outcome": st.result.outcome,
                                "wall_s": round(st.result.wall_s, 1), "diagnosis": st.result.diagnosis,
                                "boundary_hint": st.result.boundary_hint} for ph, s, st in self.steps]}

    def markdown(self) -> Markdown:
        """Every probe in order (why it ran, what happened), then the boundary and what fails past it."""
        title = f"tune {self.tune_plan.profile.name}: {len(self.steps)} probes, {self.launches} launched now"
        rows = [{"#": i, EXPERTS: settings[EXPERTS], CHUNK: settings[CHUNK], "why": step.reason,
                 "outcome": step.result.outcome if step.result.ok else f"**{step.result.outcome}**",
                 "s": f"{step.result.wall_s:.0f}", "diagnosis": step.result.diagnosis[:200]}
                for i, (_ph, settings, step) in enumerate(self.steps, 1)]
        m = self.metrics()
        if self.boundary is None:
            summary = (f"no {EXPERTS} in [{self.tune_plan.lo}, {self.tune_plan.hi}] passed: {self.first_failing} "
                       f"failed ({m['first_failing_outcome']}): {m['first_failing_diagnosis']}")
        else:
            past = (f"; {self.first_failing} fails ({m['first_failing_outcome']})" if self.first_failing is not None
                    else " (the top of the range: every value up to --max passed)")
            summary = f"boundary: {EXPERTS} {self.boundary}{past}"
            predicted = self.tune_plan.predicted_boundary
            if predicted is not None:
                summary += f"; the planner predicted {predicted} ({m['planner_error_experts']:+d})"
            summary += f"\n\n{CHUNK}: {self.chunk}"
            if self.chunk_first_failing is not None:
                summary += f"; {self.chunk_first_failing} fails ({m['chunk_first_failing_outcome']})"
        return join(f"**{title}**", table(rows), summary)


def run_tune(tune_plan: TunePlan, probe: Optional[Callable[[dict[str, Any]], ProbeResult]] = None, *,
             out: Optional[str | Path] = None, resume: bool = False, ready_timeout_s: Optional[float] = None,
             on_probe: Optional[Callable[[dict[str, Any], ProbeResult, bool], None]] = None) -> TuneRun:
    """The search: experts first (the plan's chunk), then the chunk ladder at the boundary.

    `probe` defaults to real launches (ServerProbe); tests pass a fake to drive the search alone.
    Every new probe is a `tune_probe` record in `out`; the end a `tune_result` record.
    """
    t0 = time.monotonic()
    tp = tune_plan
    if probe is None:
        probe = ServerProbe(tp.profile, tp.context_tokens, plan_options=tp.plan_options, output_tokens=tp.output_tokens,
                            ready_timeout_s=ready_timeout_s, expert_bytes=tp.expert_bytes,
                            kv_bytes_per_token=tp.kv_bytes_per_token)
    env = results.environment_stamp(engine=tp.profile.engine, model=tp.profile.served_model_name,
                                    model_revision=bench.model_revision_for(tp.profile))
    log = ProbeLog(probe, tp.setup(), out=out, resume=resume, env=env, on_probe=on_probe)
    steps: list[tuple[str, dict[str, int], Step]] = []

    def experts_probe(n: int, reason: str) -> ProbeResult:
        settings = tp.settings(n)
        result = log(settings, "experts", reason)
        steps.append(("experts", settings, Step(n, reason, result)))
        return result

    boundary, first_failing, _ = largest_passing(experts_probe, tp.lo, tp.hi, tp.start)
    chunk, chunk_fail = (tp.chunk if boundary is not None else None), None
    if boundary is not None and len(tp.rungs) > 1:
        at_boundary = next(st.result for ph, _s, st in steps if ph == "experts" and st.value == boundary)

        def chunk_probe(c: int, reason: str) -> ProbeResult:
            if c == tp.chunk:  # the first rung is the expert search's own probe at the boundary
                return at_boundary
            settings = tp.settings(boundary, c)
            result = log(settings, "chunk", reason)
            steps.append(("chunk", settings, Step(c, reason, result)))
            return result

        chunk, chunk_fail, _ = largest_rung(chunk_probe, tp.rungs)
    run = TuneRun(tp, boundary, first_failing, chunk, chunk_fail, steps, log.launches, log.reused,
                  time.monotonic() - t0, str(out) if out else None)
    params = {"tune": log.key, "profile": tp.profile.name, "min": tp.lo, "max": tp.hi, "start": tp.start,
              "context_tokens": tp.context_tokens, "chunk_rungs": tp.rungs, "sets": tp.sets}
    run.record = results.make_record("tune_result", params, run.metrics(), env=env)
    if out is not None:
        results.append_record(out, run.record)
    return run


# ==== the result as a profile ======================================================================


def tuned_profile(run: TuneRun, name: Optional[str] = None) -> dict[str, Any]:
    """The tuned profile (the profile's own fields, the found values in `sglang:`, what was
    measured in `tuned:`), validated against the Profile schema."""
    if run.boundary is None:
        raise UserError(f"no {EXPERTS} in [{run.tune_plan.lo}, {run.tune_plan.hi}] passed: there is nothing to "
                        "write; the records say why each probe failed")
    tp = run.tune_plan
    base = tp.profile
    m = run.metrics()
    data = base.model_dump(exclude_none=True)
    data["name"] = name or f"{base.name}-tuned"
    data["description"] = (f"{base.description.strip()} Tuned by `ktutorial tune` on {tp.plan.hardware.label()}: "
                           f"{EXPERTS} {run.boundary} and {CHUNK} {m['chunked_prefill_size']} launched and served a "
                           f"{tp.context_tokens:,}-token context.").strip()
    data["sglang"] = {**server.profile_flags(base, tp.plan), **run.settings()}
    data["context_tokens"] = tp.context_tokens
    data["tuned"] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "from_profile": base.name,
        "hardware": tp.plan.hardware.label(),
        "boundary": run.boundary,
        "first_failing": run.first_failing,
        "first_failing_outcome": m["first_failing_outcome"],
        "first_failing_diagnosis": m["first_failing_diagnosis"],
        "chunked_prefill_size": m["chunked_prefill_size"],
        "chunk_first_failing": run.chunk_first_failing,
        "chunk_first_failing_outcome": m["chunk_first_failing_outcome"],
        "planner_predicted_boundary": m["planner_predicted_boundary"],
        "probes": m["probes"],
        "records": Path(run.out).name if run.out else None,
        "tune": run.record["params"]["tune"] if run.record else None,
    }
    Profile.model_validate(data)
    return data


def write_profile(run: TuneRun, path: str | Path) -> Path:
    """Write the tuned profile as YAML (loadable by profiles.load_profile); returns the path."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"--write-profile {path}: name a .yaml file (profiles are YAML)")
    data = tuned_profile(run, name=path.stem)
    header = (f"# Written by `ktutorial tune --profile {run.tune_plan.profile.name}`: the largest {EXPERTS} that "
              f"launched and served the planned context,\n# then the largest {CHUNK} at it. Serve it with "
              f"`ktutorial serve --profile {path.name}`.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=100))
    load_profile(str(path))  # what a reader will do with it
    return path
