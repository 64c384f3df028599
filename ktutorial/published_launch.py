"""Published launch commands (data/published_launches.yaml) re-planned on the machine they name,
and the needs their tutorials state (RAM, storage) checked with the planner's arithmetic.

Pure, like plan.py: `check_launch(name)` reads shipped data and returns numbers; it starts nothing.
The published flags go to `make_plan` as overrides, so the verdict is the planner's own; what the
planner does not model but the published command leaves to sglang's defaults (the request table
sized for sglang's default request count) is added here, from sglang-kt's source.
"""

from __future__ import annotations

import shlex
from importlib import resources
from typing import Any

import yaml

from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError
from ktutorial.hardware import GB, GIB, Hardware
from ktutorial.plan import Goals, make_plan
from ktutorial.spec import ModelSpec

# Flags of a published command that are not settings of the machine or the model: its paths are
# the tutorial's placeholders, and ktutorial binds 127.0.0.1 on a port of its own.
NOT_PLANNED = ("model-path", "kt-weight-path", "host", "port")
# sglang sizes its request-to-token table (int32, requests x (context length + 4)) for
# max-running-requests; without the flag it takes min(max(pool / context x 512, 2048), 4096)
# requests (model_runner_kv_cache_mixin.init_memory_pool, ReqToTokenPool; sglang-kt 0.7.2).
REQ_TABLE_EXTRA_TOKENS = 4
REQ_TABLE_BYTES = 4


def load_launches() -> list[dict[str, Any]]:
    text = (resources.files("ktutorial") / "data" / "published_launches.yaml").read_text()
    return yaml.safe_load(text)["launches"]


def launch_names(model: str | None = None) -> list[str]:
    return [e["name"] for e in load_launches() if model is None or e["model"] == model]


def find_launch(name_or_model: str) -> dict[str, Any]:
    """A published launch by its name, or the first one of a model."""
    launches = load_launches()
    for e in launches:
        if name_or_model in (e["name"], e["model"]):
            return e
    known = ", ".join(f"{e['name']} ({e['model']})" for e in launches)
    raise UserError(f"no published launch {name_or_model!r}; published launches: {known}")


def launch_hardware(entry: dict[str, Any], ram_gb: float | None = None) -> Hardware:
    machine = dict(entry["machine"])
    if ram_gb is not None:
        machine["ram_gb"] = ram_gb
    return Hardware.described(**machine)


def planned_flags(entry: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the published flags the planner takes as overrides, the flags it does not model)."""
    flags = entry["flags"]
    overrides = {k: v for k, v in flags.items() if k in sglang_kt.FLAGS and k not in NOT_PLANNED}
    unmodelled = [k for k in flags if k not in sglang_kt.FLAGS]
    return overrides, unmodelled


def default_max_running_requests(pool_tokens: int, context_len: int) -> int:
    """sglang's request count when --max-running-requests is not given."""
    return min(max(int(pool_tokens / context_len * 512), 2048), 4096)


def request_table_bytes(requests: int, context_len: int) -> int:
    """sglang's req_to_token table on each GPU: one int32 slot per request per context position."""
    return requests * (context_len + REQ_TABLE_EXTRA_TOKENS) * REQ_TABLE_BYTES


def ram_statement(spec: ModelSpec, host_parts_gb: dict[str, float], stated_gb: float,
                  gpu_experts_per_layer: int) -> dict[str, Any]:
    """A tutorial's "at least N GB RAM" against what RAM must hold: every expert (kt-kernel keeps
    all of them whatever the GPU holds, FACTS.md), kt-kernel's buffers, SGLang's processes, the OS."""
    needed = sum(host_parts_gb.values())
    experts = host_parts_gb["experts"]
    cpu_share = experts * (spec.num_experts - gpu_experts_per_layer) / spec.num_experts
    if experts > stated_gb:
        verdict = "wrong"
        why = (f"the experts alone are {experts:.1f} GB ({spec.num_layers} layers x {spec.num_experts} x "
               f"{spec.expert_bytes / 1e6:.2f} MB) > {stated_gb:g} GB")
    elif needed > stated_gb:
        verdict = "too low"
        why = f"{needed:.1f} GB needed > {stated_gb:g} GB, though the experts alone ({experts:.1f} GB) fit"
    else:
        verdict = "holds"
        why = f"{needed:.1f} GB needed <= {stated_gb:g} GB"
    return {
        "stated_gb": stated_gb,
        "verdict": verdict,
        "why": why,
        "parts_gb": {k: round(v, 2) for k, v in host_parts_gb.items()},
        "needed_gb": round(needed, 1),
        "shortfall_gb": round(max(0.0, needed - stated_gb), 1),
        "experts_gb": round(experts, 1),
        "stated_gib_in_gb": round(stated_gb * GIB / GB, 1),
        # Even if kt-kernel dropped the GPU-resident experts from RAM (it does not):
        "cpu_experts_only_gb": round(cpu_share, 1),
    }


def plan_command(entry: dict[str, Any], ram_gb: float) -> list[str]:
    """`ktutorial plan ...` arguments that describe the launch's machine and fix its published flags."""
    m = entry["machine"]
    overrides, _ = planned_flags(entry)
    args = ["plan", "--model", entry["model"], "--gpu", m["gpu"], "--gpus", str(m["gpus"]),
            "--cpu-cores", str(m["cpu_cores"]), "--logical-cpus", str(m["logical_cpus"]),
            "--numa-nodes", str(m["numa_nodes"]), "--cpu-flags", ",".join(m["cpu_flags"]),
            "--ram-gb", f"{ram_gb:g}", "--context-tokens", str(entry["flags"]["max-total-tokens"])]
    for flag, value in overrides.items():
        args += ["--set", f"{flag}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


def check_launch(name_or_model: str = "minimax-m2.5") -> dict[str, Any]:
    """The published launch on its machine: the planner's verdict with the published flags fixed
    (its whole max-total-tokens pool as the context), at the machine's RAM and at the tutorial's
    stated minimum; what sglang's defaults add on the GPU; the stated RAM and storage checked."""
    entry = find_launch(name_or_model)
    spec = ModelSpec.known(entry["model"])
    overrides, unmodelled = planned_flags(entry)
    context = int(entry["flags"]["max-total-tokens"])
    goals = Goals(context_tokens=context, overrides=overrides)
    hw = launch_hardware(entry)
    plan = make_plan(spec, hw, goals)
    stated = entry.get("stated", {})
    at_stated_ram = make_plan(spec, launch_hardware(entry, stated["ram_gb"]), goals) if "ram_gb" in stated else None

    g = plan.memory["gpu"]
    tp = g["tp"]
    requests = overrides.get("max-running-requests") or default_max_running_requests(
        g["kv_pool_tokens"], spec.max_position_embeddings)
    table_gib = request_table_bytes(requests, spec.max_position_embeddings) / GIB
    with_defaults_gib = g["needed_gib"] + (0.0 if "max-running-requests" in overrides else table_gib)
    host = plan.memory["host"]["parts_gb"]
    out: dict[str, Any] = {
        "name": entry["name"],
        "model": entry["model"],
        "title": entry.get("title"),
        "source": entry["source"],
        "hardware": hw.label(),
        "published_flags": dict(entry["flags"]),
        "planned_flags": overrides,
        "not_modelled_flags": unmodelled,
        "verdict": plan.verdict,
        "reasons": plan.reasons,
        "gpu": {
            "per_gpu_gib": g["per_gpu_gib"],
            "needed_gib": g["needed_gib"],
            "capacity_gib": g["capacity_gib"],
            "tp": tp,
            "kv_pool_tokens": g["kv_pool_tokens"],
            "static_gib": g["static_gib"],
            "free_outside_weights_and_pool_gib": g["outside_static_gib"],
            "sglang_default_requests": None if "max-running-requests" in overrides else requests,
            "request_table_gib": round(table_gib, 2),
            "needed_with_sglang_defaults_gib": round(with_defaults_gib, 2),
            "fits_with_sglang_defaults": with_defaults_gib <= g["capacity_gib"],
        },
        "ram": plan.memory["host"],
        "plan_command": plan_command(entry, hw.ram_gb),
    }
    if at_stated_ram is not None:
        out["at_stated_ram"] = {"ram_gb": stated["ram_gb"], "verdict": at_stated_ram.verdict,
                                "reasons": at_stated_ram.reasons}
        out["ram_statement"] = ram_statement(spec, host, float(stated["ram_gb"]),
                                             int(overrides.get("kt-num-gpu-experts", 0)))
    if "storage_gb" in stated:
        ckpt = spec.checkpoint_bytes / GB
        out["storage_statement"] = {
            "stated_gb": stated["storage_gb"], "checkpoint_gb": round(ckpt, 1),
            "checkpoint_gib": round(spec.checkpoint_bytes / GIB, 1),
            "verdict": "holds" if ckpt <= stated["storage_gb"] else "too low",
        }
    own = make_plan(spec, hw, Goals(context_tokens=context))
    out["planner_own"] = {"verdict": own.verdict, "settings": {
        f: own.settings[f].value for f in ("tensor-parallel-size", "kt-num-gpu-experts", "chunked-prefill-size",
                                           "kt-gpu-prefill-token-threshold", "max-total-tokens",
                                           "mem-fraction-static", "kt-cpuinfer", "kt-threadpool-count")},
        "gpu_needed_gib": own.memory["gpu_needed_gib"]}
    return out


def summary_lines(check: dict[str, Any]) -> list[str]:
    """The check in words, numbers included (what `ktutorial published-launch` prints)."""
    g = check["gpu"]
    lines = [
        f"{check['title']}",
        f"  source: {check['source']}",
        f"  machine: {check['hardware']}",
        f"  planner, published flags fixed, {g['kv_pool_tokens']:,}-token pool: {check['verdict']}",
        *[f"    - {x}" for x in check["reasons"]],
    ]
    gpu_line = f"  GPU per card: {g['needed_gib']:.1f} of {g['capacity_gib']:g} GiB"
    if g["sglang_default_requests"] is not None:
        gpu_line += (f"; the command sets no --max-running-requests, so sglang sizes a request table for "
                     f"{g['sglang_default_requests']} requests ({g['request_table_gib']:.2f} GiB): "
                     f"{g['needed_with_sglang_defaults_gib']:.1f} GiB, "
                     + ("fits" if g["fits_with_sglang_defaults"] else "does not fit"))
    lines.append(gpu_line)
    if "ram_statement" in check:
        s = check["ram_statement"]
        parts = " + ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in s["parts_gb"].items())
        lines += [
            f"  stated RAM {s['stated_gb']:g} GB: {s['verdict']}: {s['why']}",
            f"    RAM needed {s['needed_gb']:.1f} GB = {parts}; short by {s['shortfall_gb']:.1f} GB "
            f"({s['stated_gb']:g} GiB would be {s['stated_gib_in_gb']:.1f} GB: still short)"
            if s["shortfall_gb"] else f"    RAM needed {s['needed_gb']:.1f} GB = {parts}",
            f"    even without the GPU-resident experts (kt-kernel keeps them) the CPU experts are "
            f"{s['cpu_experts_only_gb']:.1f} GB",
            f"  at {check['at_stated_ram']['ram_gb']:g} GB the planner says: {check['at_stated_ram']['verdict']}",
        ]
    if "storage_statement" in check:
        s = check["storage_statement"]
        lines.append(f"  stated storage ~{s['stated_gb']:g} GB: the checkpoint is {s['checkpoint_gb']:.1f} GB "
                     f"({s['checkpoint_gib']:.1f} GiB) by the config's arithmetic: {s['verdict']}")
    own = check["planner_own"]
    lines.append(f"  the planner's own settings for this machine: {own['verdict']}, {own['settings']}")
    if check["not_modelled_flags"]:
        lines.append(f"  flags passed through, no memory effect modelled: {', '.join(check['not_modelled_flags'])}")
    lines.append("  the same with `ktutorial plan`: ktutorial " + shlex.join(check["plan_command"]))
    return lines
