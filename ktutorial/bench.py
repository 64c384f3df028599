"""Single-request prefill/decode measurement and tuning sweeps, written as records.

The method (the published MiniMax-M2.1 table did not state one; this is the close equivalent):
one request at a time; a prompt of exactly L tokens by the server's own tokenizer, sent as
token ids so the count cannot drift; the prefix cache defeated (a unique head on every prompt,
plus llama.cpp's `cache_prompt: false` or SGLang's `/flush_cache`); a streamed reply of exactly
`output_len` tokens (`ignore_eos`); then

    prefill tok/s = L / time-to-first-token
    decode tok/s  = (output tokens - 1) / (end-to-end - time-to-first-token)

Where the server reports its own timings (llama.cpp `timings`, SGLang `meta_info`) they are
recorded beside the client's figures with their relative difference. Every request becomes one
`bench` record (ktutorial.results), appended and flushed as soon as it finishes.

Sweeps: a YAML spec names a profile, a grid of serve parameters and the bench parameters; each
serve combination gets its own server; a combination that fails to launch or times out becomes
a `sweep_failure` record with its diagnosis, and the sweep goes on; `resume` skips combinations
already recorded.
"""

from __future__ import annotations

import inspect
import itertools
import json
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlparse

import httpx
import yaml
from tqdm import tqdm

from ktutorial import client, results, server, tiny
from ktutorial.engines.adapters import adapter_for, detect_engine  # noqa: F401  (bench.detect_engine: notebooks)
from ktutorial.engines.http import EngineAPI, RequestTiming, served_model
from ktutorial.errors import UserError
from ktutorial.profiles import load_profile
from ktutorial.spec import known_model

# Filler for prompts: ordinary prose, so a real tokenizer splits it as it would a real prompt.
_FILLER = (
    "The tutorial measures how fast a mixture-of-experts model reads a long prompt and writes "
    "its answer when the hot experts live on the graphics card and the rest stay in main memory. "
    "Each layer routes every token to eight of its experts; the router's choice decides which "
    "weights must travel from memory to the arithmetic units, and memory bandwidth sets the pace. "
)

CACHE_DEFEAT = {
    "llamacpp": "unique head + cache_prompt=false",
    "sglang-kt": "unique head + /flush_cache",
}


def reply_check(base_url: str, model: Optional[str], params: dict[str, Any]) -> dict[str, Any]:
    """The tiny model's exact plain reply through this server (greedy), as a `reply_check` record;
    raises UserError when it differs: a combination that serves wrong text has not passed."""
    record = reply_checks(base_url, model, params, which=("openai",))[0]
    if not record["metrics"]["exact"]:
        raise UserError(f"the tiny model answered {record['metrics']['answer'][:120]!r} through {base_url}, not "
                        f"{record['params']['expected']!r}: the engine computes something else (check the "
                        "config's quantization and the server log)")
    return record


_BASH_OPENAI = {"type": "function", "function": {
    "name": "Bash", "description": "Run a shell command.",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}
_BASH_ANTHROPIC = {"name": "Bash", "description": "Run a shell command.",
                   "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                                    "required": ["command"]}}
REPLY_CHECKS = ("openai", "openai-stream", "openai-tools", "anthropic", "anthropic-stream", "anthropic-tools")


def reply_checks(base_url: str, model: Optional[str], params: Optional[dict[str, Any]] = None,
                 which: Sequence[str] = REPLY_CHECKS) -> list[dict[str, Any]]:
    """The tiny model's exact replies over each API (OpenAI and Anthropic, plain, streamed, a Bash
    tool round trip), greedy, one `reply_check` record each. A request that fails is a record
    with `exact` false and the error, so one broken route does not hide the others."""
    params = dict(params or {})
    server = server_settings(base_url, params.get("engine"))
    env = results.environment_stamp(engine=server["engine"], model=model, extra=server)
    greedy = {"temperature": 0}
    out = []
    for check in which:
        expected = tiny.ANSWER_TEXT["result" if check.endswith("tools") else "plain"]
        metrics: dict[str, Any] = {}
        try:
            if check in ("openai", "openai-stream"):
                got = client.chat(base_url, model, "Say hello.", stream=check.endswith("stream"), max_tokens=64,
                                  **greedy)
                metrics = {"answer": got.content.strip(), "reasoning": got.reasoning.strip(),
                           "finish_reason": got.finish_reason}
            elif check == "openai-tools":
                trip = client.tool_round_trip(base_url, model, "List the files.", tools=[_BASH_OPENAI],
                                              handlers={"Bash": lambda command: f"ran: {command}"}, max_tokens=128,
                                              **greedy)
                metrics = {"answer": trip.final.content.strip(), "reasoning": trip.final.reasoning.strip(),
                           "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in trip.calls],
                           "finish_reason": trip.final.finish_reason}
            elif check in ("anthropic", "anthropic-stream"):
                got = client.messages(base_url, model, "Say hello.", stream=check.endswith("stream"), max_tokens=64,
                                      **greedy)
                metrics = {"answer": got.text.strip(), "reasoning": got.thinking.strip(),
                           "finish_reason": got.stop_reason}
            elif check == "anthropic-tools":
                first = client.messages(base_url, model, "List the files.", tools=[_BASH_ANTHROPIC], max_tokens=128,
                                        **greedy)
                uses = first.tool_uses
                history = [{"role": "user", "content": "List the files."},
                           {"role": "assistant", "content": first.content},
                           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u["id"],
                                                         "content": f"ran: {u['input'].get('command')}"}
                                                        for u in uses]}]
                final = client.messages(base_url, model, history, tools=[_BASH_ANTHROPIC], max_tokens=128, **greedy)
                metrics = {"answer": final.text.strip(), "reasoning": final.thinking.strip(),
                           "tool_calls": [{"name": u["name"], "arguments": u["input"]} for u in uses],
                           "finish_reason": final.stop_reason}
            else:
                raise UserError(f"unknown reply check {check!r}; known: {', '.join(REPLY_CHECKS)}")
        except UserError as exc:
            metrics = {"answer": "", "error": str(exc)[:1000]}
        if check.endswith("tools"):
            exact = (metrics.get("answer") == expected
                     and metrics.get("tool_calls") == [{"name": tiny.TOOL_NAME, "arguments": tiny.TOOL_ARGUMENTS}])
        else:
            exact = metrics.get("answer") == expected
        out.append(results.make_record("reply_check", {**params, "check": check, "expected": expected},
                                       {**metrics, "exact": exact}, env=env))
    return out


# ---------------------------------------------------------------------------------------------
# prompts


class PromptBuilder:
    """Prompts of exactly L token ids by the server's tokenizer, each with a head no other prompt has.

    Prefix caches match from the first token on, so the head starts with a token that differs
    from the previous 25 prompts' (a rotating capital letter), then a random nonce.
    """

    def __init__(self, engine: EngineAPI):
        self.engine = engine
        self._body: list[int] = []
        self._firsts: list[int] = []
        self._count = secrets.randbelow(1 << 16)

    def _body_ids(self, n: int) -> list[int]:
        if not self._body:
            self._body = self.engine.tokenize(_FILLER * 8)
            if not self._body:
                raise UserError("the server's tokenizer returned no tokens for plain text")
        reps = n // len(self._body) + 1
        return (self._body * reps)[:n]

    def _first_ids(self) -> list[int]:
        if not self._firsts:
            ids = [self.engine.tokenize(c)[:1] for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
            self._firsts = list(dict.fromkeys(i[0] for i in ids if i))
        return self._firsts

    def build(self, length: int) -> tuple[list[int], str]:
        if length < 1:
            raise UserError(f"input length must be at least 1 token, got {length}")
        firsts = self._first_ids()
        first = firsts[self._count % len(firsts)]
        self._count += 1
        nonce = secrets.token_hex(6)
        head = [first] + self.engine.tokenize(f" request {nonce}. ")
        ids = (head + self._body_ids(length))[:length]
        assert len(ids) == length
        return ids, nonce


# ---------------------------------------------------------------------------------------------
# measure


def server_settings(base_url: str, engine: Optional[str] = None) -> dict[str, Any]:
    """The engine, and the settings the server reports it runs with (SGLang: its kt_* and parser
    fields from /server_info), for a record's environment."""
    with httpx.Client() as client:
        api = adapter_for(base_url, engine, client)
        return {"engine": api.name, **api.describe()}


def parse_counts(text: str | int | Sequence[int], what: str, example: str, k_suffix: bool = False) -> list[int]:
    """"2,4,8" (or a list) -> [2, 4, 8]: whole numbers of at least 1, each named `what` in the error,
    which shows `example`; with `k_suffix`, "8k" is 8192."""
    parts = [str(p) for p in text] if isinstance(text, (list, tuple)) else str(text).split(",")
    out = []
    for part in parts:
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if k_suffix and part.endswith("k") else 1
        try:
            value = int(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            raise UserError(f"{what} {part!r} is not a whole number (e.g. {example})") from None
        if value < 1:
            raise UserError(f"{what} must be at least 1, got {part!r} (e.g. {example})")
        out.append(value)
    if not out:
        raise UserError(f"give at least one {what}, e.g. {example}")
    return out


def parse_lens(text: str) -> list[int]:
    """"2048,8192,32768" (or "2k,8k,32k") -> [2048, 8192, 32768]."""
    return parse_counts(text, "input length", "--input-lens 2048,8192,32768", k_suffix=True)


def connect(client: httpx.Client, base_url: str, input_len: int, output_len: int, *, engine: Optional[str] = None,
            model: Optional[str] = None, model_revision: Optional[str] = None,
            tokenizer_path: Optional[str] = None) -> tuple[EngineAPI, Optional[str], dict[str, Any]]:
    """The engine adapter for the server at `base_url`, the model it serves, and the environment
    stamp its records carry (with what the server says of itself); refuses a request of
    `input_len` + `output_len` tokens that the server's context cannot hold."""
    api = adapter_for(base_url, engine, client, tokenizer_path)
    model = model or served_model(base_url, client)
    ctx = api.context_tokens()
    if ctx and input_len + output_len > ctx:
        raise UserError(f"{input_len} input + {output_len} output tokens exceed the server's context of {ctx} tokens: "
                        "start the server with a larger context or lower --input-lens/--output-len")
    host = urlparse(base_url).hostname or ""
    env = results.environment_stamp(
        engine=api.name, model=model, model_revision=model_revision,
        # The stamp describes this machine; it describes the server only if it runs here.
        extra={"server_is_local": host in ("127.0.0.1", "localhost", "::1"), **api.describe()},
    )  # fmt: skip
    return api, model, env


def request_metrics(length: int, timing: RequestTiming) -> dict[str, Any]:
    """Client figures by the stated method, the server's beside them, and their differences."""
    decode_s = timing.e2e_s - timing.ttft_s
    prefill = length / timing.ttft_s if timing.ttft_s > 0 else None
    decode = (timing.output_tokens - 1) / decode_s if timing.output_tokens > 1 and decode_s > 0 else None
    s = timing.server
    m: dict[str, Any] = {
        "ttft_s": timing.ttft_s,
        "e2e_s": timing.e2e_s,
        "output_tokens": timing.output_tokens,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "server_prompt_tokens": s.get("prompt_tokens"),
        "server_cached_tokens": s.get("cached_tokens"),
        "server_output_tokens": s.get("output_tokens"),
    }
    for key in ("evaluated_tokens", "prompt_ms", "predicted_ms", "prompt_per_second", "predicted_per_second", "e2e_s"):
        if s.get(key) is not None:
            m[f"server_{key}"] = s[key]
    if s.get("prompt_ms") is not None:
        # From the server finishing the prompt to the client seeing the first token: HTTP and
        # scheduling. Tens of ms mean a busy client machine, and client figures to distrust.
        m["first_token_delay_ms"] = timing.ttft_s * 1000 - s["prompt_ms"]
    if s.get("prefill_tok_s") is not None:
        m["server_prefill_tok_s"] = s["prefill_tok_s"]
        m["prefill_rel_diff"] = results.relative_difference(prefill, s["prefill_tok_s"])
    if s.get("decode_tok_s") is not None:
        m["server_decode_tok_s"] = s["decode_tok_s"]
        m["decode_rel_diff"] = results.relative_difference(decode, s["decode_tok_s"])
    if s.get("e2e_s") is not None:
        m["e2e_rel_diff"] = results.relative_difference(timing.e2e_s, s["e2e_s"])
    # The two checks a reader should not have to do by hand:
    m["prompt_len_ok"] = None if s.get("prompt_tokens") is None else int(s["prompt_tokens"]) == length
    m["prefix_cache_hit"] = None if s.get("cached_tokens") is None else int(s["cached_tokens"]) > 0
    return m


def measure(
    base_url: str,
    model: Optional[str] = None,
    input_lens: Sequence[int] = (2048, 8192, 32768),
    output_len: int = 512,
    repeats: int = 3,
    warmup: int = 1,
    out: Optional[str | Path] = None,
    *,
    engine: Optional[str] = None,
    config: Optional[str] = None,
    params: Optional[dict[str, Any]] = None,
    model_revision: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    timeout_s: float = 1800,
    deadline: Optional[float] = None,
    on_record: Optional[Callable[[dict], None]] = None,
) -> list[dict[str, Any]]:
    """Measure each input length `repeats` times after `warmup` unrecorded requests.

    Returns the `bench` records, each appended to `out` (JSONL) as soon as it is measured.
    `config` labels the configuration in tables; `params` (e.g. a sweep's serve settings) are
    stored in every record. `deadline` (time.monotonic()) raises TimeoutError when passed.
    """
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0 or output_len < 1:
        raise UserError("--warmup must be 0 or more and --output-len at least 1")
    lens = [int(x) for x in input_lens]
    if not lens or min(lens) < 1:
        raise UserError(f"input lengths must be positive token counts, got {list(input_lens)}")
    with httpx.Client() as client:
        api, model, env = connect(client, base_url, max(lens), output_len, engine=engine, model=model,
                                  model_revision=model_revision, tokenizer_path=tokenizer_path)
        prompts = PromptBuilder(api)
        base_params = {
            "output_len": output_len,
            "repeats": repeats,
            "warmup": warmup,
            "engine": api.name,
            "model": model,
            "route": api.route,
            "cache_defeat": CACHE_DEFEAT[api.name],
            "config": config or f"{api.name} {model}",
            **(params or {}),
        }
        records = []
        for length in lens:
            for i in range(warmup + repeats):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the bench ran past its time limit at input length {length}")
                ids, nonce = prompts.build(length)
                api.before_request()
                timing = api.stream(ids, output_len, timeout_s)
                if i < warmup:
                    continue
                if timing.output_tokens != output_len:
                    raise UserError(
                        f"asked for {output_len} tokens, the server streamed {timing.output_tokens}: "
                        "it ignored ignore_eos or hit its context limit"
                    )
                rec = results.make_record(
                    "bench",
                    {**base_params, "input_len": length, "repeat": i - warmup, "prompt_head": nonce},
                    request_metrics(length, timing),
                    samples={"token_times_s": [round(t, 6) for t in timing.token_times_s]},
                    env=env,
                )
                if out is not None:
                    results.append_record(out, rec)
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
    return records


def model_identity(model_dir: str | Path) -> dict[str, Any]:
    """What a checkpoint folder's config.json says it is: its layer count, and for a synthetic
    one (`ktutorial synth`) the generator's seed and routing, so records never pass it off as
    the real model."""
    try:
        cfg = json.loads((Path(model_dir).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {"model_layers": cfg.get("num_hidden_layers")}
    synth = cfg.get("ktutorial_synth")
    if isinstance(synth, dict):
        out["model_revision"] = (f"synthetic {synth.get('base_model')}: {synth.get('layers')} layers, random FP8, "
                                 f"{synth.get('routing')} routing, seed {synth.get('seed')} "
                                 f"(ktutorial synth v{synth.get('format_version')})")
    return out


def model_revision_for(profile) -> Optional[str]:
    """What names the weights a profile serves: the tiny model's seed and format, a synthetic
    checkpoint's generator settings, or the hub repo and revision of a known model."""
    try:
        if profile.model == "tiny":
            return f"tiny seed {profile.seed}, format v{tiny.FORMAT_VERSION}"
        if profile.model_dir and model_identity(profile.model_dir).get("model_revision"):
            return model_identity(profile.model_dir)["model_revision"]
        info = known_model(profile.model)
        return f"{info.get('repo_id')}@{info.get('revision')}"
    except Exception:  # a profile of an unknown model still benchmarks
        return None


def default_base_url() -> str:
    """The base URL of the server ktutorial started (ktutorial.server), or a UserError saying how."""
    return server.current_base_url()


# ---------------------------------------------------------------------------------------------
# sweeps


@dataclass
class SweepSpec:
    name: str
    profile: str
    serve: dict[str, list[Any]]
    bench: dict[str, Any]
    combinations: list[dict[str, Any]]
    timeout_s: float = 1800
    launch_timeout_s: Optional[float] = None
    description: str = ""

    def plan(self) -> list[dict[str, Any]]:
        """Every serve combination: the grid's product, then the listed extra combinations."""
        keys = list(self.serve)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(self.serve[k] for k in keys))]
        if not keys and self.combinations:  # no grid: the listed combinations alone, not also the defaults
            combos = []
        combos.extend(dict(c) for c in self.combinations)
        unique, seen = [], set()
        for c in combos:
            key = combination_key(self, c)
            if key not in seen:
                seen.add(key)
                unique.append(c)
        return unique


_BENCH_KEYS = {"input_lens", "output_len", "repeats", "warmup"}


def load_sweep(path_or_name: str | Path) -> SweepSpec:
    """A sweep spec from a YAML file, or a shipped one by name ("tiny", "minimax-m2.1")."""
    path = Path(path_or_name)
    if path.is_file():
        text = path.read_text()
    else:
        data = resources.files("ktutorial") / "data"
        name = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
        # a shipped name ("minimax-m2.1"), or a profile's sweep_spec ("sweeps/tiny.yaml")
        for shipped in (data / "sweeps" / f"{name}.yaml", data / str(path_or_name)):
            if shipped.is_file():
                text = shipped.read_text()
                break
        else:
            names = sorted(p.name[:-5] for p in (data / "sweeps").iterdir() if p.name.endswith(".yaml"))
            raise UserError(f"no sweep spec {str(path_or_name)!r}: pass a YAML file or a shipped one ({', '.join(names)})")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"sweep spec {path_or_name} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or "profile" not in raw:
        raise UserError(f"sweep spec {path_or_name} needs a `profile:` (tiny, minimax-m2.1 or a profile file)")
    known = ("name", "description", "profile", "serve", "combinations", "bench", "timeout_s", "launch_timeout_s")
    unknown = set(raw) - set(known)
    if unknown:
        raise UserError(f"sweep spec {path_or_name}: unknown keys {sorted(unknown)} (known: {', '.join(known)})")
    serve = raw.get("serve") or {}
    if not isinstance(serve, dict):
        raise UserError("sweep spec: `serve:` maps each knob to a list of values")
    serve = {k: (v if isinstance(v, list) else [v]) for k, v in serve.items()}
    bench = dict(raw.get("bench") or {})
    bad = set(bench) - _BENCH_KEYS
    if bad:
        raise UserError(f"sweep spec: unknown bench keys {sorted(bad)} (known: {sorted(_BENCH_KEYS)})")
    if "input_lens" in bench and isinstance(bench["input_lens"], str):
        bench["input_lens"] = parse_lens(bench["input_lens"])
    combos = raw.get("combinations") or []
    if not isinstance(combos, list) or not all(isinstance(c, dict) for c in combos):
        raise UserError("sweep spec: `combinations:` is a list of {knob: value} maps")
    return SweepSpec(
        name=str(raw.get("name") or Path(str(path_or_name)).stem),
        profile=str(raw["profile"]),
        serve=serve,
        bench=bench,
        combinations=combos,
        timeout_s=float(raw.get("timeout_s", 1800)),
        launch_timeout_s=raw.get("launch_timeout_s"),
        description=str(raw.get("description") or ""),
    )


def combination_key(spec: SweepSpec, serve_params: dict[str, Any]) -> str:
    """Stable across runs: the profile, the serve combination and the bench parameters."""
    return results.stable_key({"profile": spec.profile, "serve": serve_params, "bench": spec.bench})


def _done_keys(out: Path, expected: int, retry_failed: bool = False) -> set[str]:
    """Combinations with all their `expected` bench records, or with a recorded failure."""
    if not out.exists():
        return set()
    counts: dict[str, int] = {}
    failed: set[str] = set()
    for rec in results.load_records(out):
        key = rec["params"].get("combination_key")
        if not key:
            continue
        if rec["kind"] == "bench":
            counts[key] = counts.get(key, 0) + 1
        elif rec["kind"] == "sweep_failure":
            failed.add(key)
    done = {k for k, n in counts.items() if n >= expected}
    return done if retry_failed else done | failed


def _diagnosis(exc: BaseException) -> str:
    """Why a combination failed, in one line: the server's diagnoses (ktutorial.diagnose), else
    the last error line of the server's log, else the error's first line."""
    found = getattr(exc, "diagnoses", None) or getattr(exc, "diagnosis", None)
    if found:
        items = found if isinstance(found, (list, tuple)) else [found]
        return "; ".join(str(getattr(d, "message", d)) for d in items)
    tail = str(getattr(exc, "log_tail", "") or "")
    errors = [line.strip() for line in tail.splitlines() if "error" in line.lower()]
    if errors:
        return errors[-1]
    return (str(exc) or type(exc).__name__).splitlines()[0]


def _failure_kind(exc: BaseException, stage: str) -> str:
    if isinstance(exc, TimeoutError) or "not ready within" in str(exc):
        return "timeout"
    return f"{stage}_failure"


# serve() options that are not knobs: the sweep sets them itself.
_NOT_KNOBS = {"profile_or_plan", "port", "dry_run", "plan", "overrides", "ready_timeout_s", "detach", "reuse", "wait",
              "beyond_plan"}


# A knob of every engine: the checkpoint folder a combination serves (a sweep over depths).
MODEL_DIR_KNOB = "model_dir"


def combination_profile(profile, serve_params: dict[str, Any]):
    """The profile one combination runs: the sweep's, with its `model_dir` knob applied."""
    model_dir = serve_params.get(MODEL_DIR_KNOB)
    return profile if model_dir is None else profile.model_copy(update={"model_dir": str(model_dir)})


def serve_options(profile, serve_params: dict[str, Any]) -> dict[str, Any]:
    """serve() keyword arguments for one combination.

    llama.cpp knobs are serve()'s own options (threads, ctx_size, cpu_moe, n_cpu_moe, ...);
    SGLang-KT knobs are launch flags (kt-num-gpu-experts, chunked-prefill-size, ...) passed as
    overrides to the planned command. `model_dir` is neither: combination_profile applies it.
    """
    serve_params = {k: v for k, v in serve_params.items() if k != MODEL_DIR_KNOB}
    if profile.engine == "sglang-kt":
        flags = {}
        for knob, value in serve_params.items():
            flag = knob if knob.startswith("--") else "--" + knob.replace("_", "-")
            flags[flag] = value
        return {"overrides": flags}

    accepted = set(inspect.signature(server.prepare).parameters) - _NOT_KNOBS
    options = {}
    for knob, value in serve_params.items():
        name = knob.lstrip("-").replace("-", "_")
        if name not in accepted:
            raise UserError(
                f"sweep knob {knob!r} is not a llama.cpp serve option here; known: {', '.join(sorted(accepted))}"
            )
        options[name] = value
    return options


def _start_server(profile, serve_params: dict[str, Any], timeout_s: Optional[float]):
    options = serve_options(profile, serve_params)
    if timeout_s is not None:
        options["ready_timeout_s"] = float(timeout_s)
    return server.serve(combination_profile(profile, serve_params), **options)


def _render(profile, serve_params: dict[str, Any]) -> str:
    """The command a combination would run (for --dry-run), or why it would not start."""
    try:
        return server.prepare(combination_profile(profile, serve_params), dry_run=True,
                              **serve_options(profile, serve_params)).shell()
    except Exception as exc:  # the plan is still worth printing
        why = str(exc).splitlines()[0]
        return f"(not startable here: {why[:160]}{'…' if len(why) > 160 else ''})"


def sweep(
    spec: SweepSpec | str | Path,
    out: str | Path,
    resume: bool = False,
    dry_run: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    start_server: Callable[..., Any] = _start_server,
) -> dict[str, Any]:
    """Run (or with dry_run, list) every combination of a sweep; return a summary.

    Records go to `out` as they are measured: `bench` records carrying the serve parameters and
    the combination key, and one `sweep_failure` record for a combination that failed.
    """
    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)

    profile = load_profile(spec.profile)
    bench_args = {**profile.bench.model_dump(), **spec.bench}
    out = Path(out)
    combos = spec.plan()
    requests_per = len(bench_args["input_lens"]) * int(bench_args["repeats"])
    done = _done_keys(out, requests_per, retry_failed) if resume else set()
    plan = [
        {"combination_key": combination_key(spec, c), "serve": c, "skip": combination_key(spec, c) in done}
        for c in combos
    ]
    for item in plan:  # a misspelt knob fails here, before any server starts
        serve_options(profile, item["serve"])
    if dry_run:
        for item in plan:
            item["command"] = _render(profile, item["serve"])
    summary: dict[str, Any] = {
        "sweep": spec.name,
        "profile": profile.name,
        "out": str(out),
        "bench": bench_args,
        "plan": plan,
        "ok": [],
        "failed": [],
        "skipped": [p["combination_key"] for p in plan if p["skip"]],
    }
    if dry_run:
        return summary
    todo = [p for p in plan if not p["skip"]]
    bar = None
    if progress and todo:
        bar = tqdm(total=len(todo) * requests_per, desc=f"sweep {spec.name}", unit="req")
    try:
        for item in todo:
            key, serve_params = item["combination_key"], item["serve"]
            params = {
                "sweep": spec.name,
                "profile": profile.name,
                "combination_key": key,
                "serve": serve_params,
                **{f"serve.{k}": v for k, v in serve_params.items()},
            }
            label = ", ".join(f"{k}={v}" for k, v in serve_params.items()) or "defaults"
            if bar is not None:
                bar.set_postfix_str(label)
            measured: list[dict] = []
            stage = "launch"
            deadline = time.monotonic() + spec.timeout_s
            try:
                with start_server(profile, serve_params, spec.launch_timeout_s) as srv:
                    stage = "bench"
                    measure(
                        srv.base_url,
                        model=getattr(srv, "model", None),
                        model_revision=model_revision_for(combination_profile(profile, serve_params)),
                        timeout_s=spec.timeout_s,
                        input_lens=bench_args["input_lens"],
                        output_len=int(bench_args["output_len"]),
                        repeats=int(bench_args["repeats"]),
                        warmup=int(bench_args["warmup"]),
                        out=out,
                        engine=getattr(srv, "engine", None),
                        config=f"{spec.name}: {label}",
                        params=params,
                        deadline=deadline,
                        on_record=lambda rec: (measured.append(rec), bar and bar.update(1)),  # noqa: B023 (called in this pass)
                    )
                    if profile.model == "tiny":
                        stage = "reply"
                        results.append_record(out, reply_check(srv.base_url, srv.model, params))
                summary["ok"].append(key)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a failed combination is a result, not the end of the sweep
                kind = _failure_kind(exc, stage)
                failure = results.make_record(
                    "sweep_failure",
                    {**params, "config": f"{spec.name}: {label}"},
                    {
                        "stage": stage,
                        "failure": kind,
                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                        "diagnosis": _diagnosis(exc)[:2000],
                        "log_tail": str(getattr(exc, "log_tail", "") or "")[-2000:] or None,
                        "measured_before_failure": len(measured),
                    },
                    env=results.environment_stamp(engine=profile.engine, model=profile.served_model_name),
                )
                results.append_record(out, failure)
                summary["failed"].append({"combination_key": key, "serve": serve_params, "diagnosis": failure["metrics"]["diagnosis"]})
                if bar is not None:
                    bar.update(requests_per - len(measured))
    finally:
        if bar is not None:
            bar.close()
    return summary


__all__ = [
    "RequestTiming",
    "PromptBuilder",
    "detect_engine",
    "measure",
    "request_metrics",
    "parse_lens",
    "default_base_url",
    "SweepSpec",
    "load_sweep",
    "combination_key",
    "sweep",
]
