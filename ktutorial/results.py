"""Self-describing measurement records (JSONL), the environment stamp, load, filter, compare.

One record is one measurement (one request, one kernel run, one failed sweep combination):

    {"schema": "ktutorial.record/1", "kind": "bench", "time_utc": "2026-11-02T10:11:12.345Z",
     "env": environment_stamp(...), "params": {...}, "metrics": {...}, "samples": {...}}

`params` holds every input that produced the measurement, `metrics` the numbers measured (units in
the names: ttft_s, decode_tok_s), `samples` the raw series behind them. Records are appended one
line at a time and flushed, so a killed run keeps everything it finished. Tables and plots are
derived from records (`compare`), never typed by hand.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Optional, Sequence

import psutil
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

from ktutorial import __version__, hardware
from ktutorial.errors import UserError

SCHEMA = "ktutorial.record/1"

_TOP_KEYS = ("schema", "kind", "time_utc", "env", "params", "metrics", "samples")
_ENV_REQUIRED = ("ktutorial_version", "python", "os")


class RecordError(UserError):
    """A record, or a line of a records file, does not have the ktutorial.record/1 shape."""


# ---------------------------------------------------------------------------------------------
# the record schema: one pydantic model per kind


def _iso_utc(value: str) -> str:
    try:
        when = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if when.utcoffset() != _dt.timedelta(0):
        raise ValueError(f"{value!r} is not in UTC")
    return value


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {name} is {value}: store null for a missing number")
    return metrics


def _finite_model(metrics: BaseModel) -> BaseModel:
    _finite({**metrics.model_dump()})
    return metrics


class Env(BaseModel):
    """The environment stamp: these keys at least (environment_stamp() writes them all)."""

    model_config = ConfigDict(extra="allow")
    ktutorial_version: Any
    python: Any
    os: Any


class Record(BaseModel):
    """What every record has; a kind's model adds the params and metrics it needs."""

    model_config = ConfigDict(extra="forbid")
    schema_: Literal["ktutorial.record/1"] = Field(alias="schema")
    kind: str
    time_utc: Annotated[str, AfterValidator(_iso_utc)]
    env: Env
    params: dict[str, Any]
    metrics: Annotated[dict[str, Any], AfterValidator(_finite)]
    samples: dict[str, Any]


class Kind(BaseModel):
    """A record kind: the params and metrics every record of it carries (more are allowed)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    params: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    written_by: str = ""

    def needs(self) -> str:
        return f"params {', '.join(self.params) or '(any)'} and metrics {', '.join(self.metrics) or '(any)'}"

    @functools.cached_property
    def model(self) -> type[Record]:
        """The pydantic model of this kind's records."""
        def part(what: str, names: tuple[str, ...]) -> type[BaseModel]:
            fields: dict[str, Any] = {n: (Any, ...) for n in names}
            return create_model(f"{self.name}_{what}", __config__=ConfigDict(extra="allow"), **fields)

        return create_model(
            f"{self.name}_record", __base__=Record,
            kind=(Literal[self.name], ...),  # type: ignore[valid-type]
            params=(part("params", self.params), ...),
            metrics=(Annotated[part("metrics", self.metrics), AfterValidator(_finite_model)], ...),
        )


# Every kind a record may have. A new kind is one line here: its name, the params and metrics a
# record of it cannot do without (tables and plots read them), and the module that writes it.
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind(name="bench", params=("input_len", "output_len"),
         metrics=("ttft_s", "e2e_s", "output_tokens", "prefill_tok_s", "decode_tok_s"), written_by="bench"),
    Kind(name="sweep_failure", params=("combination_key",), metrics=("error", "diagnosis"), written_by="bench"),
    Kind(name="reply_check", params=("check", "expected"), metrics=("exact",), written_by="bench"),
    Kind(name="claude_check", params=("item", "engine", "model", "via_proxy"), metrics=("ok", "detail", "fix", "elapsed_s"),
         written_by="claude_code"),
    Kind(name="kt_kernel_moe", params=("threads", "phase", "tokens"), metrics=("latency_ms",),
         written_by="kernel_bench"),
    Kind(name="kt_kernel_summary", params=("threads",), written_by="kernel_bench"),
    Kind(name="host_bandwidth", params=("threads",), metrics=("copy_gb_s",), written_by="kernel_bench"),
    Kind(name="llamacpp_layer", params=("threads", "phase", "tokens"),
         metrics=("per_token_ms_per_layer", "tok_s_per_layer"), written_by="kernel_bench"),
    Kind(name="hybrid_layer", params=("routing", "n_gpu_experts", "tokens"),
         metrics=("latency_ms",), written_by="kernel_bench"),
    Kind(name="kt_mask_probe", params=("threads",), written_by="kernel_bench"),
    Kind(name="kernel_bench_failure", params=("part",), metrics=("error",), written_by="kernel_bench"),
    Kind(name="agreement", params=("a", "b"), metrics=("ok", "token_matches", "argmax_matches"), written_by="hybrid"),
    Kind(name="routing", params=("strategy", "gpu_experts_per_layer"), metrics=("gpu_activation_share",),
         written_by="hybrid"),
    Kind(name="orphan_check", params=("after",), metrics=("processes_left",), written_by="results/gpu-host.sh"),
    Kind(name="engine_log", params=("variant",), metrics=("became_ready", "returncode"), written_by="results/gpu-host.sh"),
    Kind(name="hybrid_summary", params=("routing", "tokens", "gpu_kernel", "threads", "shape"),
         metrics=("monotone_within_spread", "breaks", "n_points", "n_gpu_experts", "latency_ms", "checks_pass"),
         written_by="kernel_bench"),
    Kind(name="gpu_ceilings", params=("gpu", "timer", "copy_bytes", "matmul_n"),
         metrics=("copy_gb_s", "bf16_tflop_s", "fp8_tflop_s"), written_by="kernel_bench"),
    Kind(name="gpu_half_probe", params=("shape", "n_gpu_experts", "tokens", "gpu", "gpu_kernel", "calls"),
         metrics=("rel_err", "rel_err_limit", "roofline_ms", "eager_ms", "over_roofline"), written_by="kernel_bench"),
    Kind(name="load", params=("input_len", "output_len", "concurrency", "num_requests", "request_rate_req_s", "engine",
                              "model", "config"),
         metrics=("completed", "failed", "errors", "duration_s", "request_throughput_req_s", "output_tok_s", "total_tok_s",
                  *(f"{m}_{s}" for m in ("ttft_s", "itl_s", "tpot_s", "e2e_s") for s in ("mean", "p50", "p90", "p99")),
                  "server_max_running_requests", "queued_in_server"),
         written_by="load"),
    Kind(name="tune_probe", params=("tune", "profile", "phase", "reason", "settings", "probe_key"),
         metrics=("outcome", "ok", "wall_s", "diagnosis", "boundary_hint"), written_by="tune"),
    Kind(name="tune_result", params=("tune", "profile", "min", "max", "context_tokens"),
         metrics=("boundary", "first_failing", "chunked_prefill_size", "probes", "launches", "settings"),
         written_by="tune"),
    Kind(name="placement_share", params=("profile", "model", "strategy", "gpu_experts_per_layer", "num_layers",
                                         "num_experts", "prompt_set", "scored_on"),
         metrics=("gpu_activation_share", "activations", "forward_passes", "decode_tok_s"), written_by="placement"),
)}


# ---------------------------------------------------------------------------------------------
# environment stamp


def _pkg_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _run(cmd: Sequence[str], cwd: Optional[str] = None, timeout: float = 10) -> Optional[str]:
    try:
        out = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git() -> dict[str, Any]:
    """The commit of the ktutorial source tree, if the package runs from a git checkout."""
    pkg_dir = Path(__file__).resolve().parent
    # Named by whoever sent the tree (results/gpu-host.sh's caller): it wins, because a GPU host's
    # copy of .git can be older than the tree beside it (seen 2026-12-06: git then named the
    # session's first commit, dirty, for a tree that was exactly a later commit).
    passed = os.environ.get("KTUTORIAL_GIT_SHA")
    if passed:
        return {"git_sha": passed, "git_dirty": False}
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=str(pkg_dir))
    # Only our own checkout counts: an installed copy inside some other repository would
    # otherwise report that repository's commit.
    if not top or Path(top).resolve() != pkg_dir.parent:
        # A tree unpacked from `git archive` (how results/gpu-host.sh travels to a GPU host) has
        # no .git: the commit it was archived from must be passed in KTUTORIAL_GIT_SHA instead.
        return {"git_sha": None, "git_dirty": None}
    sha = _run(["git", "rev-parse", "HEAD"], cwd=top)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=top)
    return {"git_sha": sha or None, "git_dirty": None if status is None else bool(status)}


def _kt_kernel() -> dict[str, Any]:
    """kt-kernel's version and the CPU variant it loads here.

    If kt_kernel is already imported, the variant it loaded. Otherwise its own detection
    (`kt_kernel/_cpu_detect.py`, honouring KT_KERNEL_CPU_VARIANT) run without importing the
    package: the import costs seconds (torch, a multi-MB extension) and needs environment set
    first (ktutorial.ktkernel.import_kt_kernel does that, for code that runs kernels).
    """
    version = _pkg_version("kt-kernel", "kt_kernel")
    if version is None:
        return {"kt_kernel_version": None, "kt_kernel_variant": None}
    loaded = sys.modules.get("kt_kernel")
    variant = getattr(loaded, "__cpu_variant__", None) if loaded is not None else None
    if variant is None:
        try:
            spec = importlib.util.find_spec("kt_kernel")
            locations = list(spec.submodule_search_locations or []) if spec else []
            if locations:
                path = Path(locations[0]) / "_cpu_detect.py"
                mod_spec = importlib.util.spec_from_file_location("_ktutorial_kt_cpu_detect", path)
                module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
                mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
                variant = module.detect_cpu_features()
        except Exception:
            variant = None
    return {"kt_kernel_version": version, "kt_kernel_variant": variant and str(variant)}


def _hardware_fields() -> dict[str, Any]:
    """The stamp's hardware fields, from hardware.detect() (this machine, as the planner sees it).

    cpu_physical_cores and cpu_logical are the host's; cpu_affinity the CPUs this process may use
    (containers and taskset narrow it); numa_nodes those holding CPUs.
    """
    hw = hardware.detect()
    return {
        "gpus": [{"name": g.name, "memory_gib": round(g.memory_gib, 1)} for g in hw.gpus],
        "gpu_count": hw.gpu_count,
        "gpu_driver": hw.gpus[0].driver if hw.gpus else None,
        "cpu_model": None if hw.cpu_model == hardware.UNKNOWN_CPU else hw.cpu_model,
        "cpu_physical_cores": hardware.physical_cores() or psutil.cpu_count(logical=False),
        "cpu_logical": psutil.cpu_count(logical=True),
        "cpu_affinity": hw.logical_cpus,
        "numa_nodes": hw.numa_nodes,
        "ram_gb": round(hw.ram_gb, 1),
    }


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform(terse=True)


@functools.lru_cache(maxsize=1)
def _static_stamp() -> dict[str, Any]:
    """What does not change during a process: computed once (nvidia-smi and git cost time)."""
    stamp: dict[str, Any] = {"ktutorial_version": __version__}
    stamp.update(_git())
    stamp.update(
        {
            "python": platform.python_version(),
            "torch_version": _pkg_version("torch"),
            "transformers_version": _pkg_version("transformers", "transformers-kt"),
            "xllamacpp_version": _pkg_version("xllamacpp"),
            "sglang_version": _pkg_version("sglang-kt", "sglang"),
        }
    )
    stamp.update(_kt_kernel())
    stamp.update(_hardware_fields())
    stamp.update(
        {
            "os": _os_name(),
            "kernel": platform.release(),
            "machine": platform.machine(),
        }
    )
    return stamp


def environment_stamp(
    engine: Optional[str] = None,
    engine_version: Optional[str] = None,
    model: Optional[str] = None,
    model_revision: Optional[str] = None,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Versions and hardware that a measurement depends on: no hostname, no absolute paths.

    `engine` is "llamacpp", "sglang-kt" or "kt-kernel"; its version is looked up when not given.
    """
    stamp = dict(_static_stamp())
    if engine is not None and engine_version is None:
        engine_version = {
            "llamacpp": stamp.get("xllamacpp_version"),
            "sglang-kt": stamp.get("sglang_version"),
            "kt-kernel": stamp.get("kt_kernel_version"),
        }.get(engine)
    stamp.update(
        {"engine": engine, "engine_version": engine_version, "model": model, "model_revision": model_revision}
    )
    if extra:
        stamp.update(extra)
    return scrub(stamp)


# ---------------------------------------------------------------------------------------------
# records


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _private_strings() -> tuple[tuple[str, str], ...]:
    """Machine-specific strings that must not reach a committed record, longest first."""
    pairs = []
    for env_var, label in (("KTUTORIAL_HOME", "$KTUTORIAL_HOME"),):
        value = os.environ.get(env_var)
        if value and len(value) > 1:
            pairs.append((value.rstrip("/"), label))
    home = os.path.expanduser("~")
    if home and home != "/":
        pairs.append((home.rstrip("/"), "~"))
    host = socket.gethostname()
    if host and len(host) >= 4:
        pairs.append((host, "<host>"))
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


# The folder part of a path in a Python traceback line (`File "/some/where/module.py"`), which a
# server's error body can carry: the module name says what failed; the folder is the machine's.
_TRACEBACK_FOLDER = re.compile(r'(File \\?")/[^"\\\s]*/')


def scrub(obj: Any) -> Any:
    """Replace the home folder, KTUTORIAL_HOME and the hostname in every string of obj, and the
    folders of traceback paths."""
    if isinstance(obj, str):
        for value, label in _private_strings():
            if value in obj:
                obj = obj.replace(value, label)
        return _TRACEBACK_FOLDER.sub(r"\1.../", obj)
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and Paths become numbers and strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None  # NaN is not JSON
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _jsonable(obj.item())
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return str(obj)


def make_record(
    kind: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    samples: Optional[dict[str, Any]] = None,
    env: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """A validated record; `env` defaults to `environment_stamp()` (pass one stamp per run)."""
    record = {
        "schema": SCHEMA,
        "kind": kind,
        "time_utc": _now_utc(),
        "env": env if env is not None else environment_stamp(),
        "params": params,
        "metrics": metrics,
        "samples": samples or {},
    }
    record = scrub(_jsonable(record))
    validate_record(record)
    return record


def validate_record(rec: Any) -> dict[str, Any]:
    """Raise RecordError naming the first problem and its fix; return the record when it is well
    formed: the common shape, and the fields its kind needs (KINDS)."""
    if not isinstance(rec, dict):
        raise RecordError(f"a record must be a JSON object, got {type(rec).__name__}")
    missing = [k for k in _TOP_KEYS if k not in rec]
    if missing:
        raise RecordError(f"record lacks {', '.join(missing)} (schema {SCHEMA} needs {', '.join(_TOP_KEYS)})")
    kind = rec["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise RecordError(f"unknown record kind {kind!r}: the kinds are {', '.join(sorted(KINDS))}; a new kind is "
                          "added to ktutorial.results.KINDS (one line: its required params and metrics)")
    try:
        KINDS[kind].model.model_validate(rec)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise RecordError(_record_problem(kind, where, err)) from None
    try:
        json.dumps(rec, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"record is not plain JSON: {exc}") from None
    return rec


def _record_problem(kind: str, where: str, err: dict) -> str:
    if err["type"] == "missing":
        if where.startswith("env."):
            return f"record env lacks {where[4:]}: build it with environment_stamp()"
        part, _, name = where.partition(".")
        return (f"{kind} record lacks {part} {name}: pass it to make_record (a {kind} record needs "
                f"{KINDS[kind].needs()})")
    return f"{kind} record: {where}: {err['msg']}"


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as one JSONL line and push it to disk before returning."""
    validate_record(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(p.rglob("*.jsonl")))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no records file {p}: pass a .jsonl file written by `ktutorial bench`/`sweep`, or a folder of them")
    return files


def load_records(*paths: str | os.PathLike, validate: bool = True) -> list[dict[str, Any]]:
    """Records from JSONL files (or folders of *.jsonl), in file order.

    A last line cut short (a run killed while writing) is skipped; a bad line elsewhere raises.
    """
    records: list[dict[str, Any]] = []
    for file in _expand(paths):
        text = file.read_text(encoding="utf-8")
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == len(lines) and not text.endswith("\n"):
                    continue  # the unfinished tail of a killed writer
                raise RecordError(f"{file}:{number}: not a JSON line ({exc.msg}); remove or fix that line") from None
            if validate:
                try:
                    validate_record(rec)
                except RecordError as exc:
                    raise RecordError(f"{file}:{number}: {exc}") from None
            records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# filter, group, summarize


def field(rec: dict[str, Any], key: str, default: Any = None) -> Any:
    """A value by dotted path ("params.input_len", "env.gpus") or bare name, which is looked up
    in params, then metrics, then env, then the record's top level."""
    if "." in key:
        cur: Any = rec
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur
    for part in ("params", "metrics", "env"):
        section = rec.get(part)
        if isinstance(section, dict) and key in section:
            return section[key]
    return rec.get(key, default)


def filter_records(
    records: Iterable[dict[str, Any]],
    kind: Optional[str | Sequence[str]] = None,
    where: Optional[Callable[[dict[str, Any]], bool]] = None,
    **equals: Any,
) -> list[dict[str, Any]]:
    """Records of `kind` (one or several) whose fields equal `equals` (names as in `field`)."""
    kinds = {kind} if isinstance(kind, str) else (set(kind) if kind else None)
    out = []
    for rec in records:
        if kinds is not None and rec.get("kind") not in kinds:
            continue
        if any(field(rec, k) != v for k, v in equals.items()):
            continue
        if where is not None and not where(rec):
            continue
        out.append(rec)
    return out


def summarize(values: Iterable[Any]) -> dict[str, Any]:
    """mean, stdev (sample; 0 for one value), min, max, n of the numbers among values."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not nums:
        return {"mean": None, "stdev": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(nums),
        "stdev": statistics.stdev(nums) if len(nums) > 1 else 0.0,
        "min": min(nums),
        "max": max(nums),
        "n": len(nums),
    }


def _sort_token(value: Any) -> tuple:
    # Mixed types (None, numbers, strings) must still sort: numbers first, by value.
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value))
    return (1, json.dumps(value, sort_keys=True) if not isinstance(value, str) else value)


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def compare(
    records: Iterable[dict[str, Any]],
    keys: Sequence[str],
    metrics: Optional[Sequence[str]] = None,
) -> list[dict[str, Any]]:
    """Group records by the declared keys and summarize each metric per group.

    Returns [{"key": {k: value}, "n": records in group, "metrics": {m: summarize(...)}}],
    sorted by the key values. `metrics` defaults to every numeric metric seen.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        values = tuple(field(rec, k) for k in keys)
        ident = tuple(_hashable(v) for v in values)
        group = groups.setdefault(ident, {"key": dict(zip(keys, values)), "records": []})
        group["records"].append(rec)
    out = []
    for group in groups.values():
        recs = group["records"]
        names = list(metrics) if metrics is not None else sorted(
            {
                name
                for r in recs
                for name, v in r.get("metrics", {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        out.append(
            {
                "key": group["key"],
                "n": len(recs),
                "metrics": {m: summarize(field(r, "metrics." + m) for r in recs) for m in names},
            }
        )
    out.sort(key=lambda g: tuple(_sort_token(g["key"][k]) for k in keys))
    return out


def stable_key(obj: Any) -> str:
    """A short hash of a JSON-able object, the same across runs and machines (for --resume)."""
    text = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def relative_difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """(a - b) / b, or None when either is missing or b is 0."""
    if a is None or b is None or not b:
        return None
    return (a - b) / b


__all__ = [
    "SCHEMA",
    "KINDS", "Kind", "Record",
    "RecordError",
    "environment_stamp",
    "make_record",
    "validate_record",
    "append_record",
    "load_records",
    "field",
    "filter_records",
    "summarize",
    "compare",
    "stable_key",
    "relative_difference",
    "scrub",
]


if __name__ == "__main__":  # a quick look at this machine's stamp
    json.dump(environment_stamp(), sys.stdout, indent=2)
    print()
