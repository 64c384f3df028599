"""SGLang + KT-Kernel (sglang-kt 0.7.2): the launch command from a Plan, and the checks that
sglang-kt's own parser does not make.

`render_command(plan, overrides)` gives `python -m sglang.launch_server --model-path ... --kt-*`;
`render_env(plan)` the environment it needs; `validate(...)` refuses, before launch, what the
parser accepts but what fails minutes later (a lowercase `--kt-method`, no GPU-expert count, a
served name with ':'); `settings_schema()` lists every flag ktutorial can emit, with its reason.
FLAGS is the one flag registry: `coerce_overrides(...)` / `coerce_value(name, value)` name, type
and bound `--set` values for the planner too, and `memory=True` marks the flags that re-plan.
`check_with_real_parser(...)` runs sglang-kt's own `ServerArgs.add_cli_args` parser (installed by
`make sglang-parser-env` in a venv of its own) over rendered commands.

Readiness and log diagnosis live in server.py and diagnose.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import httpx
from tokenizers import Tokenizer

from ktutorial.engines.http import EngineAPI, RequestTiming
from ktutorial.errors import MissingDependency, UserError
from ktutorial.shell import command_line  # noqa: F401  (sglang_kt.command_line: docs.py renders through it)

ENTRY = ["-m", "sglang.launch_server"]

# kt-kernel 0.7.2's inference methods (kt_kernel/experts.py INFERENCE_METHODS): exact, upper case.
# sglang-kt's --kt-method has no choices check; anything else fails when the model loads.
KT_METHODS = ("AMXINT4", "AMXINT8", "RAWINT4", "FP8", "BF16", "FP8_PERCHANNEL", "GPTQ_INT4",
              "SYCL_GPTQ_INT4", "MXFP4", "NVFP4", "MXFP8", "LLAMAFILE", "MOE_INT4", "MOE_INT8")


class SettingsError(UserError):
    """Launch settings sglang-kt would refuse, or accept and then fail on."""


@dataclass(frozen=True)
class Flag:
    kind: str  # "str", "int", "float", "bool", "int_list"
    why: str
    choices: Optional[tuple[str, ...]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_min: bool = False
    exclusive_max: bool = False
    memory: bool = False  # the value enters the planner's memory arithmetic: an override re-plans


# Every flag ktutorial can emit. Choices are the subset of sglang-kt's that make sense for
# MiniMax-M2.1 (the real-parser test checks each is a subset of the parser's own).
FLAGS: dict[str, Flag] = {
    "model-path": Flag("str", "the checkpoint folder: config.json, safetensors shards, tokenizer"),
    "served-model-name": Flag("str", "the `model` clients send; no ':' (read as name:revision)"),
    "trust-remote-code": Flag("bool", "the hub repo ships MiniMax's own configuration code"),
    "tensor-parallel-size": Flag("int", "GPUs that split attention, KV cache and GPU experts", minimum=1,
                                 memory=True),
    "kt-method": Flag("str", "kt-kernel's expert format: FP8 reads M2.1's block-FP8 checkpoint as is",
                      choices=KT_METHODS),
    "kt-weight-path": Flag("str", "where kt-kernel reads CPU experts: for FP8, the checkpoint folder"),
    "kt-cpuinfer": Flag("int", "CPU threads for experts: physical cores, headroom on SMT-less machines",
                        minimum=1),
    "kt-threadpool-count": Flag("int", "thread pools, one per NUMA node (sglang-kt's default is 2)", minimum=1),
    "kt-numa-nodes": Flag("int_list", "the NUMA node of each pool, when nodes are not numbered 0..N-1"),
    "kt-num-gpu-experts": Flag("int", "experts per layer kept on the GPU; without it or a ratio KT is off",
                               minimum=0, memory=True),
    "kt-gpu-experts-ratio": Flag("float", "share of all experts kept on the GPU (instead of a count)",
                                 minimum=0, maximum=1),
    "kt-max-deferred-experts-per-token": Flag("int", "experts whose CPU result may arrive one layer late",
                                              minimum=0),
    "kt-gpu-prefill-token-threshold": Flag("int", "prefill chunks this long run the MoE on the GPU layer "
                                                  "by layer", minimum=0, memory=True),
    "kt-enable-dynamic-expert-update": Flag("bool", "the GPU expert set follows the experts routed to"),
    "chunked-prefill-size": Flag("int", "tokens per prefill forward pass; kt-kernel sizes its buffers by it",
                                 minimum=1, memory=True),
    "max-prefill-tokens": Flag("int", "tokens one prefill batch may hold", minimum=1),
    "max-total-tokens": Flag("int", "cap on the KV pool, in tokens", minimum=1, memory=True),
    "context-length": Flag("int", "longest request accepted, in tokens", minimum=1),
    "kv-cache-dtype": Flag("str", "KV cache precision: bf16, or FP8 for half the bytes",
                           choices=("auto", "bf16", "bfloat16", "fp8_e4m3", "fp8_e5m2"), memory=True),
    "mem-fraction-static": Flag("float", "share of GPU memory for weights and the KV pool", minimum=0,
                                maximum=1, exclusive_min=True, exclusive_max=True, memory=True),
    "max-running-requests": Flag("int", "requests decoded together", minimum=1, memory=True),
    "attention-backend": Flag("str", "attention kernels; FlashInfer covers sm80 to sm120",
                              choices=("flashinfer", "triton", "fa3", "fa4", "torch_native", "flex_attention",
                                       "trtllm_mha")),
    "fp8-gemm-backend": Flag("str", "FP8 GEMM kernels; Triton's run on consumer cards",
                             choices=("auto", "triton", "cutlass", "deep_gemm", "flashinfer_trtllm",
                                      "flashinfer_deepgemm")),
    "disable-shared-experts-fusion": Flag("bool", "M2.1 has no shared expert; sglang-kt sets it with KT anyway"),
    "watchdog-timeout": Flag("float", "seconds a forward pass may take before sglang kills the server",
                             minimum=0, exclusive_min=True),
    "tool-call-parser": Flag("str", "M2.1 writes <minimax:tool_call> blocks: minimax-m2 parses them",
                             choices=("minimax-m2",)),
    "reasoning-parser": Flag("str", "minimax-append-think keeps <think> in the content; minimax splits it "
                                    "into reasoning_content", choices=("minimax-append-think", "minimax")),
    "host": Flag("str", "the address to listen on; ktutorial binds 127.0.0.1"),
    "port": Flag("int", "the port to listen on", minimum=1, maximum=65535),
    "enable-metrics": Flag("bool", "Prometheus /metrics"),
    "log-level": Flag("str", "sglang's log level", choices=("debug", "info", "warning", "error", "critical")),
    "disable-radix-cache": Flag("bool", "no prefix cache: every request prefills in full (benchmarks)"),
    "cuda-graph-max-bs": Flag("int", "largest decode batch captured as a CUDA graph", minimum=1),
    "disable-cuda-graph": Flag("bool", "no CUDA graphs: less memory, slower decode"),
    "sampling-backend": Flag("str", "token sampling kernels: pytorch where FlashInfer's are not built",
                             choices=("flashinfer", "pytorch")),
    "grammar-backend": Flag("str", "constrained decoding (JSON schema, regex); none skips loading one",
                            choices=("xgrammar", "outlines", "llguidance", "none")),
    "moe-runner-backend": Flag("str", "kernels for the GPU experts; triton runs on every NVIDIA card",
                               choices=("auto", "triton", "triton_kernel", "flashinfer_trtllm",
                                        "flashinfer_cutlass", "flashinfer_mxfp4", "cutlass")),
    "disable-custom-all-reduce": Flag("bool", "NCCL's all-reduce instead of SGLang's custom kernel"),
    "kt-expert-placement-strategy": Flag("str", "which experts start on the GPU",
                                         choices=("uniform", "frequency", "front-loading", "random")),
    "enable-mixed-chunk": Flag("bool", "decode and prefill in the same batch"),
    # The expert-distribution recorder (POST /start_, /stop_, /dump_expert_distribution_record)
    # and the frequency placement that reads its counts back (ktutorial.placement).
    "expert-distribution-recorder-mode": Flag("str", "stat: count each expert's activations per forward pass, "
                                                     "dumped as logical_count [passes, layers, experts]",
                                              choices=("stat", "per_pass", "per_token")),
    "expert-distribution-recorder-buffer-size": Flag("int", "forward passes the recorder keeps: -1 keeps every "
                                                            "one (unset, a ring of 1000 drops the oldest)", minimum=-1),
    "record-kt-gpu-expert-distribution": Flag("bool", "the recorder also dumps each forward pass's GPU-expert masks"),
    "init-expert-location": Flag("str", "with --kt-expert-placement-strategy frequency: the .pt of recorded counts "
                                        "(logical_count) whose busiest experts go on the GPU"),
}
_ALIASES = {"model": "model-path", "tp-size": "tensor-parallel-size", "tp": "tensor-parallel-size"}
# Flags whose override re-plans (render_command, plan.make_plan): derived, so it cannot drift from FLAGS.
MEMORY_FLAGS = tuple(name for name, f in FLAGS.items() if f.memory)

# The environment sglang-kt runs with, and why.
ENV: dict[str, tuple[str, str]] = {
    "OMP_WAIT_POLICY": ("PASSIVE", "torch's OpenMP threads otherwise spin between ops on the cores kt-kernel's "
                                   "expert threads use; FACTS: kt plus torch threads over the core count slowed "
                                   "decode ~10x, PASSIVE helped"),
}


def settings_schema() -> list[dict[str, Any]]:
    """Every flag ktutorial can emit: name, value type, allowed values, why (the docs render it)."""
    return [
        {"flag": f"--{name}", "type": f.kind, "choices": list(f.choices) if f.choices else None, "why": f.why}
        for name, f in FLAGS.items()
    ]


def env_schema() -> list[dict[str, str]]:
    return [{"name": k, "value": v, "why": why} for k, (v, why) in ENV.items()]


# ---- validation ---------------------------------------------------------------------------------


def _flag_name(raw: str) -> str:
    name = str(raw).strip().lstrip("-").replace("_", "-")
    return _ALIASES.get(name, name)


def _coerce(name: str, flag: Flag, value: Any, problems: list[str]) -> Any:
    shown = f"--{name} {value!r}"
    if flag.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on", ""):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        problems.append(f"{shown}: a switch, takes true or false")
        return None
    if flag.kind == "int_list":
        items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
        try:
            out = [int(x) for x in items]
        except (TypeError, ValueError):
            problems.append(f"{shown}: takes whole numbers (NUMA node ids)")
            return None
        if not out or any(x < 0 for x in out):
            problems.append(f"{shown}: takes one or more node ids, each 0 or more")
        return out
    if flag.kind in ("int", "float"):
        if isinstance(value, bool):
            problems.append(f"{shown}: takes a number, not a switch")
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            problems.append(f"{shown}: takes a {'whole number' if flag.kind == 'int' else 'number'}")
            return None
        if number != number or number in (float("inf"), float("-inf")):
            problems.append(f"{shown}: takes a finite number")
            return None
        if flag.kind == "int":
            if number != int(number):
                problems.append(f"{shown}: takes a whole number")
                return None
            number = int(number)
        lo, hi = flag.minimum, flag.maximum
        if lo is not None and (number < lo or (flag.exclusive_min and number == lo)):
            problems.append(f"{shown}: must be {'more than' if flag.exclusive_min else 'at least'} {lo:g}")
        if hi is not None and (number > hi or (flag.exclusive_max and number == hi)):
            problems.append(f"{shown}: must be {'less than' if flag.exclusive_max else 'at most'} {hi:g}")
        return number
    text = str(value)
    if flag.choices and text not in flag.choices:
        if name == "kt-method" and text.upper() in flag.choices:
            problems.append(f"{shown}: kt-kernel's method names are upper case: --kt-method {text.upper()} "
                            "(sglang-kt's parser accepts any string; the wrong case fails at model load)")
        elif name == "kt-method":
            problems.append(f"{shown}: kt-kernel 0.7.2 does not know it (it would fail at model load); "
                            f"use one of {', '.join(flag.choices)} (FP8 for MiniMax-M2.1)")
        else:
            problems.append(f"{shown}: use one of {', '.join(flag.choices)}")
    return text


def _unknown(name: str) -> str:
    return f"--{name}: not a flag ktutorial emits or checks; known flags: {', '.join(FLAGS)}"


def _refuse(problems: list[str]) -> None:
    if problems:
        raise SettingsError("sglang-kt launch settings refused:\n  - " + "\n  - ".join(problems))


def _coerce_overrides(overrides: Optional[dict[str, Any]], problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw, value in (overrides or {}).items():
        name = _flag_name(raw)
        flag = FLAGS.get(name)
        if not name:
            problems.append(f"empty flag name in {raw!r}={value!r}: write FLAG=VALUE, e.g. kt-num-gpu-experts=40")
        elif flag is None:
            problems.append(_unknown(name))
        elif value is None:
            problems.append(f"--{name}: no value; give one (FLAG=VALUE, e.g. {name}=...)")
        else:
            coerced = _coerce(name, flag, value, problems)
            if coerced is not None:
                out[name] = coerced
    return out


def coerce_overrides(overrides: Optional[dict[str, Any]]) -> dict[str, Any]:
    """`--set` flag -> value (strings or typed; "--tp" or "tp_size" spellings) to canonical flag
    names and typed values checked against FLAGS (type, choices, bounds); SettingsError names
    every bad one and its fix."""
    problems: list[str] = []
    out = _coerce_overrides(overrides, problems)
    _refuse(problems)
    return out


def coerce_value(name: str, value: Any) -> Any:
    """One flag's value, typed and checked against FLAGS, or SettingsError with the flag and the fix."""
    return coerce_overrides({name: value})[_flag_name(name)]


def validate_settings(settings: dict[str, Any], spec: Any = None) -> dict[str, Any]:
    """Check flag -> value settings; return them with typed values, or raise SettingsError
    naming every problem and its fix."""
    problems: list[str] = []
    out: dict[str, Any] = {}
    for raw, value in settings.items():
        name = _flag_name(raw)
        flag = FLAGS.get(name)
        if flag is None:
            problems.append(_unknown(name))
            continue
        if value is None:
            continue
        coerced = _coerce(name, flag, value, problems)
        if coerced is not None:
            out[name] = coerced

    if not out.get("model-path"):
        problems.append("--model-path missing: the checkpoint folder (ktutorial download fetches it)")
    served = out.get("served-model-name")
    if served is not None:
        if not served.strip():
            problems.append("--served-model-name is empty: clients could not name the model")
        elif ":" in served:
            problems.append(f"--served-model-name {served!r}: contains ':', which sglang reads as name:revision; "
                            f"use {served.replace(':', '-')!r}")
    uses_kt = any(k.startswith("kt-") for k in out)
    if uses_kt:
        if not out.get("kt-weight-path"):
            problems.append("--kt-* flags without --kt-weight-path: sglang-kt ignores KT without it "
                            "(for FP8, pass the checkpoint folder)")
        if out.get("kt-num-gpu-experts") is None and out.get("kt-gpu-experts-ratio") is None:
            problems.append("neither --kt-num-gpu-experts nor --kt-gpu-experts-ratio: sglang-kt then silently "
                            "runs without KT (every expert on the GPU); set --kt-num-gpu-experts")
        pools = out.get("kt-threadpool-count", 2)  # sglang-kt's default
        nodes = out.get("kt-numa-nodes")
        if nodes is not None and len(nodes) != pools:
            problems.append(f"--kt-numa-nodes {' '.join(map(str, nodes))}: {len(nodes)} nodes for "
                            f"--kt-threadpool-count {pools}; give one node per pool")
        threads = out.get("kt-cpuinfer")
        if threads is not None and threads < pools:
            problems.append(f"--kt-cpuinfer {threads} < --kt-threadpool-count {pools}: each pool needs a thread")
    if out.get("expert-distribution-recorder-buffer-size") == 0:
        problems.append("--expert-distribution-recorder-buffer-size 0: the recorder's ring would hold nothing "
                        "(sglang fails on the first forward pass); use -1 to keep every pass")
    if out.get("record-kt-gpu-expert-distribution") and not out.get("expert-distribution-recorder-mode"):
        problems.append("--record-kt-gpu-expert-distribution without --expert-distribution-recorder-mode: sglang "
                        "then records nothing; add --expert-distribution-recorder-mode stat")
    if out.get("kt-expert-placement-strategy") == "frequency":
        location = str(out.get("init-expert-location") or "")
        if not location.endswith(".pt"):
            # sglang-kt reads counts only from a path ending in .pt; otherwise it ranks all-equal
            # counts and the GPU experts fall wherever torch.topk breaks the ties.
            problems.append("--kt-expert-placement-strategy frequency without --init-expert-location FILE.pt: "
                            "sglang-kt then has no counts and places arbitrarily; record some traffic "
                            "(`ktutorial placement record`) and pass its .pt")
    if spec is not None:
        n = out.get("kt-num-gpu-experts")
        if n is not None and n > spec.num_experts:
            problems.append(f"--kt-num-gpu-experts {n} > the {spec.num_experts} experts a layer has")
        method = out.get("kt-method")
        if (method in KT_METHODS and getattr(spec, "is_fp8", False) and method != "FP8"
                and out.get("kt-weight-path") == out.get("model-path")):
            problems.append(f"--kt-method {method} with --kt-weight-path on the FP8 checkpoint itself: "
                            "kt-kernel would look for converted weights; use --kt-method FP8")
    _refuse(problems)
    return out


def check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Names, types and allowed values of `--set` flags on their own (a typo is refused before
    planning, whatever the verdict); returns them coerced, as coerce_overrides does."""
    problems: list[str] = []
    out = _coerce_overrides(overrides, problems)
    served = out.get("served-model-name")
    if isinstance(served, str) and ":" in served:
        problems.append(f"--served-model-name {served!r}: contains ':', which sglang reads as name:revision; "
                        f"use {served.replace(':', '-')!r}")
    _refuse(problems)
    return out


def parse_command(command: Sequence[str]) -> dict[str, Any]:
    """flag -> value from a rendered command (the inverse of render_command, for checking one)."""
    args = list(command)
    if "sglang.launch_server" in args:
        args = args[args.index("sglang.launch_server") + 1:]
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise SettingsError(f"unexpected {token!r} in the sglang command: every argument is a --flag")
        name, eq, inline = token[2:].partition("=")
        name = _flag_name(name)
        flag = FLAGS.get(name)
        i += 1
        if eq:
            out[name] = inline
            continue
        values = []
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        if flag is not None and flag.kind == "bool":
            out[name] = True if not values else values[0]
        elif flag is not None and flag.kind == "int_list":
            out[name] = values
        else:
            out[name] = values[0] if len(values) == 1 else (values or None)
            if len(values) > 1:
                raise SettingsError(f"--{name} got {len(values)} values ({' '.join(values)}); it takes one")
    return out


def validate(obj: Any, spec: Any = None) -> dict[str, Any]:
    """Check a Plan, a flag -> value dict, or a rendered command (list of strings)."""
    if hasattr(obj, "settings") and hasattr(obj, "spec"):
        return validate_settings({k: s.value for k, s in obj.settings.items()}, spec or obj.spec)
    if isinstance(obj, dict):
        return validate_settings(obj, spec)
    return validate_settings(parse_command(obj), spec)


# ---- rendering ------------------------------------------------------------------------------------


def _args(name: str, value: Any) -> list[str]:
    flag = FLAGS[name]
    if flag.kind == "bool":
        return [f"--{name}"] if value else []
    if flag.kind == "int_list":
        return [f"--{name}", *(str(v) for v in value)]
    if flag.kind == "float":
        return [f"--{name}", f"{value:g}" if isinstance(value, float) else str(value)]
    return [f"--{name}", str(value)]


def render_command(plan: Any, overrides: Optional[dict[str, Any]] = None, *, python: Optional[str] = None,
                   expand_paths: bool = False, beyond_plan: bool = False) -> list[str]:
    """`python -m sglang.launch_server ...` for a Plan, validated.

    `overrides` (flag -> value; "--port" or "port") go on top; one that changes the memory
    arithmetic (experts, tokens, chunk, TP, ...) re-plans, and a re-plan that does not fit is
    refused with its numbers, unless `beyond_plan` (settings measured by `ktutorial tune`, or its
    probes looking for where the real boundary lies). `python` defaults to this interpreter;
    `expand_paths` turns a leading "~" into the home folder (for launching; leave it off for display).
    """
    overrides = {_flag_name(k): v for k, v in (overrides or {}).items()}
    memory = {k: v for k, v in overrides.items() if k in MEMORY_FLAGS}
    if memory:
        plan = plan.replan(memory)  # Plan's own method: this module does not import the planner
        if not plan.fits and not beyond_plan:
            raise SettingsError("the overrides do not fit: " + "; ".join(plan.reasons))
    values = {k: s.value for k, s in plan.settings.items()}
    values.update({k: v for k, v in overrides.items() if k not in memory})
    checked = validate_settings(values, plan.spec)
    if expand_paths:
        for name in ("model-path", "kt-weight-path"):
            if isinstance(checked.get(name), str):
                checked[name] = os.path.expanduser(checked[name])
    command = [python or sys.executable, *ENTRY]
    for name, value in checked.items():
        command += _args(name, value)
    return command


def render_env(plan: Any = None) -> dict[str, str]:
    """Environment variables for the launch (each justified in ENV)."""
    return {k: v for k, (v, _why) in ENV.items()}


# ---- sglang-kt's own parser -----------------------------------------------------------------------

# Runs inside the parser venv (no ktutorial there). Prints one JSON object on its last line.
_PROBE = r'''
import argparse, contextlib, io, json, sys, warnings
warnings.simplefilter("ignore")

def _torchvision():
    # torchvision's registry wheel links CUDA torch; beside CPU torch its ops library does not load,
    # and importing it then registers fake kernels for two ops nobody defined. Define their schemas.
    try:
        import torchvision  # noqa: F401
        return None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
    return lib

_keep = _torchvision()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    from sglang.srt.server_args import ServerArgs

def parser():
    p = argparse.ArgumentParser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(p)
    return p

commands = json.load(open(sys.argv[1]))
results = []
for argv in commands:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser().parse_args(argv)
        results.append({"ok": True, "values": {k: v for k, v in vars(ns).items()}})
    except SystemExit as exc:
        results.append({"ok": False, "exit": exc.code, "error": err.getvalue().strip().splitlines()[-1:]})
flags = {}
for a in parser()._actions:
    for opt in a.option_strings:
        flags[opt] = {"choices": list(a.choices) if a.choices else None, "nargs": a.nargs,
                      "type": getattr(a.type, "__name__", None), "dest": a.dest,
                      "takes_value": a.nargs != 0}
print(json.dumps({"results": results, "flags": flags}, default=str))
'''


def default_parser_python() -> Path:
    """This interpreter where sglang-kt itself is installed (a GPU machine); else the parser venv
    `make sglang-parser-env` builds in the repository root."""
    if importlib.util.find_spec("sglang") is not None:
        return Path(sys.executable)
    return Path(__file__).resolve().parents[2] / ".venv-sglang" / "bin" / "python"


def check_with_real_parser(commands: Sequence[Sequence[str]], python: Optional[str | Path] = None,
                           timeout_s: float = 300) -> dict[str, Any]:
    """Parse each command (from `--model-path` on) with sglang-kt's own argument parser.

    Returns {"results": [{"ok", "values" | "error"}...], "flags": {option: {choices, dest, ...}}}.
    Raises MissingDependency when the parser venv is not built.
    """
    exe = Path(python) if python else default_parser_python()
    if not exe.exists():
        raise MissingDependency("sglang-kt's argument parser (.venv-sglang)", "run `make sglang-parser-env`")
    argvs = []
    for cmd in commands:
        cmd = list(cmd)
        if "sglang.launch_server" in cmd:
            cmd = cmd[cmd.index("sglang.launch_server") + 1:]
        argvs.append(cmd)
    with tempfile.TemporaryDirectory(prefix="ktutorial-parser-") as tmp:
        path = Path(tmp, "commands.json")
        path.write_text(json.dumps(argvs))
        env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run([str(exe), "-c", _PROBE, str(path)], capture_output=True, text=True,
                              timeout=timeout_s, env=env, cwd=tmp)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RuntimeError("sglang-kt's parser could not run:\n" + "\n".join(tail))
    return json.loads(lines[-1])


# ---- what the log says about memory -----------------------------------------------------------

_WEIGHTS_BEGIN = re.compile(r"Load weight begin\. avail mem=(?P<gib>[0-9.]+) GB")
_WEIGHTS_END = re.compile(r"Load weight end\..*?avail mem=(?P<gib>[0-9.]+) GB")


def kv_room_from_log(log_text: str, mem_fraction_static: float, kv_bytes_per_token: float) -> Optional[int]:
    """Tokens of KV pool the static fraction had room for, before any --max-total-tokens cap
    (negative: that many short), from the free memory the log reports around the weights.

    sglang-kt 0.7.2 sizes the pool as free-after-weights - free-at-start x (1 - fraction)
    (model_runner_kv_cache_mixin.profile_max_num_token), and logs both free figures in GiB with
    two decimals ("Load weight begin/end. ... avail mem=X GB"), so this is good to about 10 MiB.
    None when the log lacks either line (the load did not get that far).
    """
    begin, end = _WEIGHTS_BEGIN.search(log_text or ""), _WEIGHTS_END.search(log_text or "")
    if not begin or not end or not kv_bytes_per_token:
        return None
    room_gib = float(end["gib"]) - float(begin["gib"]) * (1 - float(mem_fraction_static))
    return math.floor(room_gib * 2**30 / kv_bytes_per_token)


# ---- the wire: SGLang's native routes, for the bench ------------------------------------------




class SGLangAPI(EngineAPI):
    """SGLang's native routes: /tokenize, /server_info, /flush_cache, the streamed /generate and
    the expert-distribution recorder (start, stop, dump)."""

    name = "sglang-kt"
    route = "/generate"

    def __init__(self, base_url, client, tokenizer_path: Optional[str] = None):
        super().__init__(base_url, client)
        self.tokenizer_path = tokenizer_path
        self._local_tokenizer = None
        self._info: Optional[dict] = None

    @staticmethod
    def serves(base_url: str, http) -> bool:
        """Whether `base_url` is an SGLang server: it answers /get_model_info."""
        return http.get(base_url.rstrip("/") + "/get_model_info", timeout=10).status_code == 200

    def tokenize(self, text):
        r = self.http.post(self.base_url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60)
        if r.status_code == 200 and isinstance(r.json().get("tokens"), list):
            return list(r.json()["tokens"])
        # Older SGLang builds lack /tokenize: the model folder's own tokenizer is the same one.
        if self._local_tokenizer is None:
            if not self.tokenizer_path:
                raise UserError(
                    f"{self.base_url} has no /tokenize route: pass tokenizer_path (the model folder) "
                    "so prompts can be built with the model's own tokenizer"
                )

            self._local_tokenizer = Tokenizer.from_file(str(Path(self.tokenizer_path) / "tokenizer.json"))
        return self._local_tokenizer.encode(text, add_special_tokens=False).ids

    def context_tokens(self):
        try:
            r = self.http.get(self.base_url + "/v1/models", timeout=30)
            return (r.json().get("data") or [{}])[0].get("max_model_len")
        except (httpx.HTTPError, ValueError):
            return None

    def server_info(self) -> dict:
        """/server_info: every server argument the engine runs with, and its scheduler's state;
        read once (neither changes while the server runs), as llama.cpp's /props is."""
        if self._info is not None:
            return self._info
        problem = ""
        for route in ("/server_info", "/get_server_info"):  # the second is older SGLang's name
            try:
                r = self.http.get(self.base_url + route, timeout=30)
                if r.status_code == 200:
                    self._info = r.json()
                    return self._info
                problem = f"answered HTTP {r.status_code}: {r.text[:200]}"
            except (httpx.HTTPError, ValueError) as exc:
                problem = f"failed: {exc}"
        raise UserError(f"/server_info on {self.base_url} {problem}")

    def describe(self):
        try:
            info = self.server_info()
        except UserError:  # a record's environment goes without the server's settings
            info = {}
        # max_total_tokens is the flag (a cap); max_total_num_tokens and max_req_input_len are what the
        # scheduler allocated and accepts (its scheduler_info, merged into /server_info).
        keep = ("version", "chunked_prefill_size", "tp_size", "max_total_tokens", "attention_backend",
                "mem_fraction_static", "disable_radix_cache", "max_running_requests", "context_length",
                "reasoning_parser", "tool_call_parser", "max_total_num_tokens", "max_req_input_len")
        # every kt_* setting the engine actually runs with (the launch flags are what we asked for)
        kt = sorted(k for k in info if k.startswith("kt_") and k != "kt_weight_path")
        out = {f"server_{k}": info.get(k) for k in (*keep, *kt) if k in info}
        # max_running_requests is the launch flag (null when left to SGLang); the scheduler's own
        # figure, sized from the KV pool when the flag is unset, is in its internal state.
        states = info.get("internal_states")
        first = states[0] if isinstance(states, list) and states and isinstance(states[0], dict) else {}
        effective = first.get("effective_max_running_requests_per_dp")  # per data-parallel rank: ktutorial runs one
        if effective is not None:
            out["server_effective_max_running_requests"] = effective
        if info.get("model_path"):  # the layer count (the server runs here: its folder is readable)
            try:
                cfg = json.loads((Path(info["model_path"]).expanduser() / "config.json").read_text())
                out["model_layers"] = cfg.get("num_hidden_layers")
            except (OSError, ValueError):
                pass
        return out

    # -- the expert-distribution recorder (a server launched with --expert-distribution-recorder-mode)

    def recorder_settings(self) -> dict:
        """The recorder and placement settings the server runs with; refuses a server whose
        recorder is off (sglang's scheduler raises on /start_expert_distribution_record then)."""
        info = self.server_info()
        keys = ("expert_distribution_recorder_mode", "expert_distribution_recorder_buffer_size",
                "record_kt_gpu_expert_distribution", "kt_expert_placement_strategy", "kt_num_gpu_experts",
                "kt_enable_dynamic_expert_update", "kt_gpu_prefill_token_threshold", "init_expert_location")
        settings = {k: info.get(k) for k in keys}
        mode = settings["expert_distribution_recorder_mode"]
        if mode != "stat":
            raise UserError(
                f"the server at {self.base_url} runs with --expert-distribution-recorder-mode {mode}: relaunch it with "
                "--expert-distribution-recorder-mode stat --expert-distribution-recorder-buffer-size -1 "
                "(`ktutorial serve --set expert-distribution-recorder-mode=stat --set "
                "expert-distribution-recorder-buffer-size=-1`) to count expert activations")
        return settings

    def _recorder(self, action: str) -> None:
        route = f"/{action}_expert_distribution_record"
        try:
            # dump answers once the scheduler has written the file
            r = self.http.post(self.base_url + route, timeout=300)
        except httpx.HTTPError as exc:
            raise UserError(f"{route} on {self.base_url} failed: {exc}") from exc
        if r.status_code != 200:
            raise UserError(f"{route} on {self.base_url} answered HTTP {r.status_code}: {r.text[:300]}")

    def start_expert_record(self) -> None:
        """Clear the recorder and start counting expert activations."""
        self._recorder("start")

    def stop_expert_record(self) -> None:
        self._recorder("stop")

    def dump_expert_record(self) -> None:
        """Write what was counted into the server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR
        (expert_distribution_recorder_<time>.pt, and gpu_expert_distribution_<time>.pt with
        --record-kt-gpu-expert-distribution), then clear the recorder."""
        self._recorder("dump")

    def max_running_requests(self):
        got = self.describe()
        return got.get("server_effective_max_running_requests") or got.get("server_max_running_requests")

    def before_request(self):
        # The flush is refused while requests run; one request at a time means it succeeds,
        # but a health check may be in flight, so try a few times.
        for _ in range(10):
            r = self.http.post(self.base_url + "/flush_cache", timeout=60)
            if r.status_code == 200:
                return
            time.sleep(0.5)
        raise UserError(f"{self.base_url}/flush_cache kept failing: {r.text[:200]}")

    def stream(self, ids, output_len, timeout_s):
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0},
            "stream": True,
        }
        def tokens_after(chunk: dict, so_far: int) -> int:
            meta = chunk.get("meta_info") or {}
            finish = meta.get("finish_reason")
            if isinstance(finish, dict) and finish.get("type") == "abort":
                # The scheduler refuses a prompt longer than its KV pool or context this way, in a
                # 200 stream (scheduler.py validate_input_length -> set_finish_with_abort).
                raise UserError(f"{self.base_url}/generate: the server aborted the request "
                                f"(HTTP {finish.get('status_code')}): {finish.get('message')}")
            done = meta.get("completion_tokens")
            # count output ids if meta_info is missing
            return so_far + max(1, len(chunk.get("output_ids") or [])) if done is None else int(done)

        times, last, final = self._token_times("/generate", body, timeout_s, tokens_after)
        meta = final.get("meta_info") or {}
        server = {
            "prompt_tokens": meta.get("prompt_tokens"),
            "cached_tokens": meta.get("cached_tokens"),
            "output_tokens": meta.get("completion_tokens"),
            "e2e_s": meta.get("e2e_latency"),
        }
        return RequestTiming(times[0], last, len(times), times, server)
