"""From a model spec, a machine and goals to launch settings, a memory breakdown and a verdict.

Pure: no files, no processes, no clock. `make_plan(spec, hardware, goals)` returns a `Plan` whose
`settings` are keyed by sglang-kt flag names, each with its value and a one-line reason; whose
`memory` says where every GiB of each GPU and every GB of host RAM goes; and whose `verdict` is
"fits" or "does-not-fit" with the reasons in numbers.

The memory model follows what sglang-kt 0.7.2 does (read from its source):

* `--mem-fraction-static` x GPU memory holds what is allocated before the KV pool is sized
  (CUDA context, dense weights, GPU experts) plus the KV pool itself; sglang gives the pool
  what is left of that fraction, capped by `--max-total-tokens`.
* The rest of the GPU holds what is allocated later: prefill activations for one chunk, decode
  CUDA graphs and, the first time a chunk of at least `--kt-gpu-prefill-token-threshold` tokens
  arrives, one whole MoE layer (all 256 experts, split over the TP GPUs) that layerwise prefill
  streams every layer through.
* Only TP rank 0 runs kt-kernel, and kt-kernel keeps every expert of every layer in host RAM
  whatever the GPU holds.

Activation and reserve sizes are estimates from tensor shapes (see the constants); the planner
keeps a margin for their error and says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, InstanceOf, computed_field

from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError
from ktutorial.hardware import GB, GIB, Hardware
from ktutorial.spec import BF16_BYTES, ModelSpec, known_model, known_models
from ktutorial.tables import Markdown, ShowsItself, bullets, cell, join, markdown_table

# ---- constants of the memory model (each an estimate; why in the comment) ------------------------

# CUDA context, cuBLAS/cuDNN workspaces and sglang's metadata buffers: allocated before sglang
# measures free memory for the KV pool (a CUDA context alone is ~0.5 GiB on a recent card).
FRAMEWORK_STATIC_GIB = 0.6
# NCCL communicators and sglang's custom all-reduce buffers, per GPU, when TP > 1.
TP_COMM_GIB = 0.25
# Decode CUDA graphs for one running request and caching-allocator fragmentation.
RUNTIME_RESERVE_GIB = 0.4
# Our error bar on all of the above; the planner never fills a GPU closer than this.
PLANNING_MARGIN_GIB = 0.5
# Chunk-sized bf16 hidden-state tensors alive at once in a layer (residual, normed input, attention
# output, o_proj output, MoE output, FP8-quantized copy).
ACTIVATION_HIDDEN_TENSORS = 6
# sglang's fused MoE kernel processes at most this many tokens at once (fused_moe.py CHUNK_SIZE).
FUSED_MOE_MAX_TOKENS = 64 * 1024
# Prefill buffers (layerwise layer + activations) may take at most this share of a GPU when the
# planner picks the chunk size; the rest goes to KV cache and GPU experts.
PREFILL_SHARE_MAX = 0.25
CHUNK_CANDIDATES = (32768, 16384, 8192, 4096, 2048)
# kt-cli's M2.1 default and the published 2 x RTX 5090 value.
DEFAULT_PREFILL_THRESHOLD = 4096
DEFAULT_CONTEXT_TOKENS = 65536
# sglang's watchdog kills a forward pass that takes longer; a 32k-token prefill on a slow CPU
# path can. kt-cli's M2.1 value.
WATCHDOG_TIMEOUT_S = 3000

# Host RAM beside the experts: sglang's HTTP server, tokenizer and detokenizer processes (python,
# torch, the tokenizer), and per TP rank a scheduler process with its CUDA host allocations.
HOST_PROCESSES_BASE_GB = 6.0
HOST_PER_TP_RANK_GB = 3.0
OS_RESERVE_GB = 4.0
# Disk: the checkpoint plus room for sglang's and FlashInfer's JIT caches and logs.
DISK_SLACK_GB = 5.0

KV_DTYPES = {  # goal or flag value -> (flag value, spec dtype)
    "bf16": ("bf16", "bf16"),
    "bfloat16": ("bf16", "bf16"),
    "auto": ("bf16", "bf16"),  # M2.1's torch_dtype is bfloat16
    "fp8": ("fp8_e4m3", "fp8_e4m3"),
    "fp8_e4m3": ("fp8_e4m3", "fp8_e4m3"),
    "fp8_e5m2": ("fp8_e5m2", "fp8_e5m2"),
}

# `--set` overrides are named, typed and bounded by the one flag registry, sglang_kt.FLAGS (its
# `memory=True` flags re-plan); the planner adds no second copy of it.


class PlanError(UserError):
    """Goals the planner cannot work with (a zero context, an unknown KV dtype); a bad override is
    refused earlier by sglang_kt.coerce_overrides, as a SettingsError."""


class Setting(BaseModel):
    """One launch setting: its value, why, and who chose it."""

    model_config = ConfigDict(frozen=True)

    value: Any
    reason: str
    source: Literal["planner", "you"] = "planner"  # "you": a --set override


@dataclass
class Goals:
    """What the reader wants. None means: let the planner choose."""

    context_tokens: Optional[int] = None  # the longest context one request must fit (KV pool)
    tp: Optional[int] = None
    kv_dtype: str = "bf16"
    max_running_requests: int = 1
    model_dir: Optional[str] = None
    served_model_name: Optional[str] = None
    checkpoint_present: bool = False  # the checkpoint is on disk already: no disk check
    overrides: dict[str, Any] = field(default_factory=dict)


# ---- the memory breakdown: typed, each number once ------------------------------------------------


class _Breakdown(BaseModel):
    """Frozen, refuses unknown fields, and reads like the dict it replaced (`memory["gpu"]["tp"]`
    gives the field; a nested part comes back as a plain dict), so code written against that dict
    keeps working while new code uses the attributes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __getitem__(self, key: str) -> Any:
        try:
            value = getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None
        return value.model_dump() if isinstance(value, BaseModel) else value

    def items(self):
        """(part, amount) pairs, in the order they stack."""
        return self.model_dump().items()


class GpuParts(_Breakdown):
    """Where each GPU's memory goes, GiB per GPU, in the order sglang allocates it."""

    framework_static: float
    dense_weights: float
    gpu_experts: float
    kv_cache: float
    layerwise_prefill_layer: float
    kt_staging_buffer: float
    activations: float
    runtime_reserve: float
    planning_margin: float


class GpuMemory(_Breakdown):
    per_gpu_gib: GpuParts
    capacity_gib: float
    gpus: int
    tp: int
    static_gib: float  # what --mem-fraction-static holds: weights, GPU experts and the KV pool
    outside_static_gib: float  # the rest of the card: prefill buffers, layerwise layer, CUDA graphs
    kv_pool_tokens: int
    kv_cache_dtype: str
    kv_bytes_per_token_per_gpu: int
    gib_per_gpu_expert: float
    max_gpu_experts_at_context: int
    context_tokens: int
    chunked_prefill_size: int

    @computed_field
    @property
    def needed_gib(self) -> float:
        return round(sum(self.per_gpu_gib.model_dump().values()), 2)


class HostParts(_Breakdown):
    """Host RAM, GB."""

    experts: float
    kt_kernel_buffers: float
    sglang_processes: float
    os_reserve: float


class HostMemory(_Breakdown):
    parts_gb: HostParts
    available_gb: float

    @computed_field
    @property
    def needed_gb(self) -> float:
        return round(sum(self.parts_gb.model_dump().values()), 1)


class DiskNeed(_Breakdown):
    needed_gb: float
    free_gb: Optional[float]  # None: a described machine (not checked)
    path: Optional[str]
    checkpoint_present: bool


class MemoryBreakdown(_Breakdown):
    """Where every GiB of each GPU and every GB of host RAM and disk goes."""

    gpu: GpuMemory
    host: HostMemory
    disk: DiskNeed

    # The old dict's flat summary keys, read from the parts (not stored twice).
    @property
    def gpu_needed_gib(self) -> float:
        return self.gpu.needed_gib

    @property
    def gpu_capacity_gib(self) -> float:
        return self.gpu.capacity_gib

    @property
    def ram_needed_gb(self) -> float:
        return self.host.needed_gb

    @property
    def ram_available_gb(self) -> float:
        return self.host.available_gb

    @property
    def disk_needed_gb(self) -> float:
        return self.disk.needed_gb

    @property
    def disk_free_gb(self) -> Optional[float]:
        return self.disk.free_gb


class Plan(ShowsItself, BaseModel):
    """Launch settings (flag -> value and reason), the memory breakdown, and the verdict with its
    reasons. Shows itself: a notebook renders it as markdown, the CLI with rich."""

    model_config = ConfigDict(frozen=True)

    spec: InstanceOf[ModelSpec]
    hardware: InstanceOf[Hardware]
    goals: InstanceOf[Goals]
    settings: dict[str, Setting]
    memory: MemoryBreakdown
    verdict: Literal["fits", "does-not-fit"]
    reasons: list[str]
    notes: list[str]
    cpu_variant: str
    cpu_variant_cost: str

    @property
    def fits(self) -> bool:
        return self.verdict == "fits"

    def summary(self) -> str:
        """The verdict and its reasons, one line each (what `serve --dry-run` prints above the command)."""
        lines = [f"plan for {self.spec.name} on {self.hardware.label()}: {self.verdict}"]
        lines += [f"  - {r}" for r in self.reasons]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def replan(self, overrides: dict[str, Any]) -> Plan:
        """This plan with more overrides (what render_command calls for a memory flag)."""
        return replan(self, overrides)

    def with_setting(self, flag: str, value: Any) -> Plan:
        """The same plan with one setting's value replaced, its reason kept (a model folder that is
        not on this machine yet, say)."""
        settings = dict(self.settings)
        settings[flag] = settings[flag].model_copy(update={"value": value})
        return self.model_copy(update={"settings": settings})

    def values(self) -> dict[str, Any]:
        """flag -> value, in launch order."""
        return {flag: s.value for flag, s in self.settings.items()}

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.spec.name,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "settings": self.values(),
            "setting_reasons": {flag: s.reason for flag, s in self.settings.items()},
            "overridden": [flag for flag, s in self.settings.items() if s.source == "you"],
            "memory": self.memory.model_dump(),
            "hardware": self.hardware.to_dict(),
            "cpu_variant": self.cpu_variant,
            "cpu_variant_cost": self.cpu_variant_cost,
        }

    def markdown(self) -> Markdown:
        """The plan as one markdown text: verdict and reasons, settings, where the memory goes."""
        gpu, host = self.memory.gpu, self.memory.host
        settings = markdown_table(["flag", "value", "why this value"], (
            [f"`--{flag}`", cell(s.value) + (" (yours)" if s.source == "you" else ""), s.reason]
            for flag, s in self.settings.items()))
        vram = markdown_table(["per GPU", "GiB"], [
            *([part.replace("_", " "), f"{gib:.2f}"] for part, gib in gpu.per_gpu_gib.items()),
            ["**needed**", f"**{gpu.needed_gib:.2f}** of {gpu.capacity_gib:g}"]])
        ram = markdown_table(["host", "GB"], [
            *([part.replace("_", " "), f"{gb:.1f}"] for part, gb in host.parts_gb.items()),
            ["**needed**", f"**{host.needed_gb:.1f}** of {host.available_gb:.0f}"]])
        return join(
            f"**{self.spec.name}** on {self.hardware.label()} ({self.hardware.source}); verdict: **{self.verdict}**",
            bullets(self.reasons),
            bullets(f"note: {n}" for n in self.notes),
            "**Launch settings**", settings,
            f"**VRAM per GPU** (TP {gpu.tp}, {gpu.kv_pool_tokens:,}-token KV pool)", vram,
            "**Host RAM**", ram,
        )



# ---- sizes ------------------------------------------------------------------------------------


def valid_tp_sizes(spec: ModelSpec, limit: int = 8) -> list[int]:
    """TP sizes that split heads, KV heads and FP8 expert blocks evenly."""
    out = [1]
    for tp in range(2, limit + 1):
        if spec.num_attention_heads % tp:
            continue
        if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
            continue
        if spec.expert_intermediate_size % tp:
            continue
        if spec.fp8_block and (spec.expert_intermediate_size // tp) % spec.fp8_block[0]:
            continue
        out.append(tp)
    return out


def _tp_refusal(spec: ModelSpec, tp: int) -> str:
    why = "it does not divide the attention or KV heads evenly"
    if spec.fp8_block and spec.expert_intermediate_size % tp == 0 and \
            (spec.expert_intermediate_size // tp) % spec.fp8_block[0]:
        why = (f"each expert's {spec.expert_intermediate_size}-wide FFN / {tp} = "
               f"{spec.expert_intermediate_size // tp} is not a multiple of the {spec.fp8_block[0]}-wide FP8 blocks")
    return (f"tensor-parallel-size {tp} does not split {spec.name}: {why}; "
            f"use one of {', '.join(map(str, valid_tp_sizes(spec)))}")


def dense_bytes_per_gpu(spec: ModelSpec, tp: int) -> float:
    """Attention, norms, router, embedding and lm_head on each GPU: projections and vocabulary
    are split over TP ranks; K/V projections stop splitting once each rank has one KV head;
    norms and the router are replicated."""
    h = spec.hidden_size
    attn = "model.layers.0.self_attn.q_proj"
    q_o = spec._linear_bytes(spec.q_width, h, attn) + spec._linear_bytes(h, spec.q_width, attn)
    kv = 2 * spec._linear_bytes(spec.kv_width, h, attn)
    replicated = spec.attention_bytes_per_layer - q_o - kv
    per_layer = q_o / tp + kv / min(tp, spec.num_kv_heads) + replicated
    return spec.num_layers * per_layer + spec.embedding_bytes / tp


def kv_bytes_per_token_per_gpu(spec: ModelSpec, kv_dtype: str, tp: int) -> float:
    return spec.kv_bytes_per_token(kv_dtype) / min(tp, spec.num_kv_heads)


def gpu_expert_bytes_per_gpu(spec: ModelSpec, tp: int) -> float:
    """One more GPU expert per layer: one expert in every layer, its FFN split over TP ranks."""
    return spec.num_layers * spec.expert_bytes / tp


def layerwise_layer_bytes_per_gpu(spec: ModelSpec, tp: int) -> float:
    """Layerwise prefill's full-layer slot: all experts of one layer, split over TP ranks."""
    return spec.layer_expert_bytes / tp


def activation_bytes_per_gpu(spec: ModelSpec, chunk: int, tp: int) -> float:
    """Peak prefill activations for one chunk (estimate from the shapes sglang allocates)."""
    h, k = spec.hidden_size, spec.experts_per_token
    w13 = 2 * spec.expert_intermediate_size // tp
    m = min(chunk, FUSED_MOE_MAX_TOKENS)
    # fused_moe: one cache of M*topk*max(N, H) (gate/up output and down output share it) and
    # the activated half, N/2 per routed token, all bf16.
    moe = m * k * (max(w13, h) + w13 // 2) * BF16_BYTES
    hidden = ACTIVATION_HIDDEN_TENSORS * chunk * h * BF16_BYTES
    qkv = chunk * (spec.q_width + 2 * spec.kv_width) / tp * BF16_BYTES
    return moe + hidden + qkv


def staging_bytes_per_gpu(spec: ModelSpec, chunk: int) -> float:
    """KT's shared staging buffer for CPU-expert input: chunk x hidden, bf16."""
    return chunk * spec.hidden_size * BF16_BYTES


def kt_host_buffer_bytes(spec: ModelSpec, chunk: int) -> float:
    """kt-kernel's work buffers, sized for a whole chunk (estimate: fp32 gate/up/down outputs for
    every routed token, plus bf16 input and output)."""
    k, i, h = spec.experts_per_token, spec.expert_intermediate_size, spec.hidden_size
    return chunk * k * (2 * i + h) * 4 + 2 * chunk * h * BF16_BYTES


# ---- the planner --------------------------------------------------------------------------------


def _default_paths(spec: ModelSpec) -> tuple[str, str]:
    """(model folder, served name) for a known model; the spec's name otherwise."""
    if spec.name in known_models():
        info = known_model(spec.name)
        repo_tail = str(info.get("repo_id", spec.name)).split("/")[-1]
        return f"~/models/{repo_tail}", str(info.get("served_model_name") or repo_tail)
    return f"~/models/{spec.name}", spec.name


def engine_threads_measured() -> dict[str, dict[str, Any]]:
    """Decode through the real engine by --kt-cpuinfer on the GPU host (data/perfmodel_fit.json,
    written by perfmodel from the committed records): the evidence behind the thread rule."""
    text = (resources.files("ktutorial") / "data" / "perfmodel_fit.json").read_text()
    return json.loads(text).get("engine_threads") or {}


def _engine_evidence(measured: dict[str, dict[str, Any]]) -> str:
    if not measured:
        return ""
    ranked = sorted(measured.items(), key=lambda kv: -kv[1]["engine_tok_s"])
    cpus = ranked[0][1].get("host_logical_cpus")
    listing = ", ".join(f"{t}: {v['engine_tok_s']:.0f} tok/s" for t, v in ranked)
    return (f"; through SGLang + KT itself on a {cpus}-vCPU host, every expert on the CPU, decode by --kt-cpuinfer "
            f"was {listing} (results/gpu-host-2026-12-06-m21-perf.jsonl)")


def _cpuinfer(hw: Hardware, tp: int) -> tuple[int, str]:
    cores, logical, pools = hw.physical_cores, hw.logical_cpus, max(1, hw.numa_nodes)
    measured = engine_threads_measured()
    best = max(measured, key=lambda t: measured[t]["engine_tok_s"]) if measured else None
    if (best is not None and not hw.smt and pools == 1
            and logical == measured[best].get("host_logical_cpus")):
        return int(best), (f"{best} of {logical} CPUs: the best --kt-cpuinfer of the real engine's own sweep on a "
                           f"machine of this size{_engine_evidence(measured)}")
    if hw.smt:
        threads = cores
        why = (f"{cores} physical cores, not the {logical} hyperthreads: the FP8 kernel fills a core's "
               "vector units, and the sibling threads stay free for SGLang's scheduler and kt's "
               "submitting thread")
    else:
        reserve = max(2, tp + 1)
        threads = max(1, cores - reserve)
        why = (f"{cores} cores without hyperthreads: {min(reserve, cores - 1) if cores > 1 else 0} left for "
               f"SGLang's scheduler{'s' if tp > 1 else ''} and kt's submitting thread (FACTS: decode was "
               "best at 14 of 16 vCPUs and 4x slower with all 16 busy)" + _engine_evidence(measured))
    if threads >= pools and threads % pools:
        threads -= threads % pools
        why += f"; rounded down to a multiple of the {pools} thread pools"
    return threads, why


def make_plan(spec: ModelSpec, hardware: Hardware, goals: Optional[Goals] = None) -> Plan:
    """Launch settings, memory breakdown and verdict for `spec` on `hardware` (pure)."""
    goals = goals or Goals()
    if isinstance(goals, dict):
        goals = Goals(**goals)
    ov = sglang_kt.coerce_overrides(goals.overrides)  # names, types, choices and bounds
    hw = hardware
    failures: list[str] = []
    passes: list[str] = []
    notes: list[str] = []
    settings: dict[str, Setting] = {}

    def put(flag: str, value: Any, reason: str) -> None:
        if flag in ov:
            settings[flag] = Setting(value=ov[flag], reason=f"set by you (planner: {value!r}: {reason})", source="you")
        else:
            settings[flag] = Setting(value=value, reason=reason)

    default_dir, default_name = _default_paths(spec)
    model_dir = goals.model_dir or default_dir
    served = goals.served_model_name or default_name

    # --- goals --------------------------------------------------------------------------------
    for name in ("context_tokens", "tp", "max_running_requests"):
        v = getattr(goals, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise PlanError(f"{name.replace('_', '-')} must be a whole number above zero, got {v!r}")

    kv_key = str(ov.get("kv-cache-dtype", goals.kv_dtype)).lower()
    if kv_key not in KV_DTYPES:
        raise PlanError(f"KV cache dtype {kv_key!r}: ktutorial plans {', '.join(sorted(KV_DTYPES))}")
    kv_flag, kv_dtype = KV_DTYPES[kv_key]

    cap_tokens = ov.get("max-total-tokens")
    context = goals.context_tokens or cap_tokens or DEFAULT_CONTEXT_TOKENS
    if spec.max_position_embeddings and context > spec.max_position_embeddings:
        failures.append(f"context {context:,} tokens > the model's {spec.max_position_embeddings:,}-token "
                        "maximum (max_position_embeddings): ask for less with --context-tokens")
    if cap_tokens is not None and cap_tokens < context:
        failures.append(f"max-total-tokens {cap_tokens:,} < the {context:,}-token context asked: "
                        "raise it or lower --context-tokens")

    # --- GPUs and tensor parallelism ---------------------------------------------------------
    valid_tps = valid_tp_sizes(spec)
    if "tensor-parallel-size" in ov:
        tp = ov["tensor-parallel-size"]
    elif goals.tp:
        tp = goals.tp
    else:
        tp = max([t for t in valid_tps if t <= max(1, hw.gpu_count)] or [1])
    if not hw.gpus:
        failures.append("no NVIDIA GPU: SGLang + KT keeps attention, the KV cache and prefill on a GPU "
                        "(the tutorial's minimum is one 32 GB card such as an RTX 5090); plan for a GPU "
                        "machine with --gpu NAME:GB")
    elif tp > hw.gpu_count:
        failures.append(f"tensor-parallel-size {tp} needs {tp} GPUs; the machine has {hw.gpu_count}")
    if tp not in valid_tps:
        failures.append(_tp_refusal(spec, tp))
    elif hw.gpu_count > tp and hw.gpus and "tensor-parallel-size" not in ov and not goals.tp:
        notes.append(f"{hw.gpu_count} GPUs, TP {tp}: {spec.name} splits over {', '.join(map(str, valid_tps))} GPUs only")
    for g in {g.name: g for g in hw.gpus}.values():
        if g.sm is not None and g.sm < 89:
            notes.append(f"{g.name} (sm{g.sm}) has no FP8 tensor cores: SGLang falls back to slower "
                         "FP8 kernels there; the published runs used sm89+ cards (RTX 4090, RTX 5090)")

    capacity = hw.gpu_memory_gib * GIB
    threshold = int(ov.get("kt-gpu-prefill-token-threshold", DEFAULT_PREFILL_THRESHOLD))
    per_expert = gpu_expert_bytes_per_gpu(spec, tp)
    kv_tok = kv_bytes_per_token_per_gpu(spec, kv_dtype, tp)
    dense = dense_bytes_per_gpu(spec, tp)
    framework = (FRAMEWORK_STATIC_GIB + (TP_COMM_GIB if tp > 1 else 0)) * GIB
    reserve = RUNTIME_RESERVE_GIB * GIB
    margin = PLANNING_MARGIN_GIB * GIB
    static_fixed = dense + framework

    def dynamic(chunk: int) -> dict[str, float]:
        return {
            "layerwise_prefill_layer": layerwise_layer_bytes_per_gpu(spec, tp) if threshold <= chunk else 0.0,
            "kt_staging_buffer": staging_bytes_per_gpu(spec, chunk),
            "activations": activation_bytes_per_gpu(spec, chunk, tp),
            "runtime_reserve": reserve,
        }

    # --- chunk size, GPU experts, KV pool ------------------------------------------------------
    if "chunked-prefill-size" in ov:
        candidates = [ov["chunked-prefill-size"]]
    else:
        top = max(2048, 1 << max(0, (context - 1).bit_length()))
        candidates = [c for c in CHUNK_CANDIDATES if c <= top] or [CHUNK_CANDIDATES[-1]]
    fixed_experts = ov.get("kt-num-gpu-experts")
    if fixed_experts is not None and fixed_experts > spec.num_experts:
        failures.append(f"kt-num-gpu-experts {fixed_experts} > the {spec.num_experts} experts a layer has")

    # The largest chunk within the prefill share that leaves room for the context; when none
    # does, the largest within the share (the numbers then say what is missing).
    within_share = [c for c in candidates
                    if len(candidates) == 1 or not capacity or sum(dynamic(c).values()) <= PREFILL_SHARE_MAX * capacity]
    within_share = within_share or candidates[-1:]
    chunk = within_share[0]
    for c in within_share:
        room = capacity - margin - sum(dynamic(c).values()) - static_fixed
        if room - (fixed_experts or 0) * per_expert >= context * kv_tok:
            chunk = c
            break
    dyn_parts = dynamic(chunk)
    dyn = sum(dyn_parts.values())
    room = capacity - margin - dyn - static_fixed  # for GPU experts and the KV pool
    max_experts_at_context = max(0, min(spec.num_experts, math.floor((room - context * kv_tok) / per_expert))) \
        if room - context * kv_tok >= 0 else 0
    n_experts = fixed_experts if fixed_experts is not None else max_experts_at_context
    experts_bytes = n_experts * per_expert

    # The pool: what the static fraction leaves after weights, capped by max-total-tokens.
    if "mem-fraction-static" in ov:
        mem_frac = float(ov["mem-fraction-static"])
        pool_room = mem_frac * capacity - static_fixed - experts_bytes
    else:
        pool_room = room - experts_bytes
    max_pool = max(0, math.floor(pool_room / kv_tok)) if kv_tok else 0
    cap = cap_tokens if cap_tokens is not None else context
    pool_tokens = min(cap, max_pool)
    if "mem-fraction-static" in ov:
        # sglang allocates min(the fraction's pool, max-total-tokens) (model_runner_kv_cache_mixin.
        # init_memory_pool) and the command always passes max-total-tokens: what the weights and
        # the pool leave is free for prefill, the fraction's unused part included.
        outside = capacity - (static_fixed + experts_bytes + pool_tokens * kv_tok)
    else:
        static_needed = static_fixed + experts_bytes + pool_tokens * kv_tok
        mem_frac = math.ceil(static_needed / capacity * 1000) / 1000 if capacity else 0.0
        outside = capacity - mem_frac * capacity
    kv_bytes = pool_tokens * kv_tok

    gpu_parts = {
        "framework_static": framework,
        "dense_weights": dense,
        "gpu_experts": experts_bytes,
        "kv_cache": kv_bytes,
        **dyn_parts,
        "planning_margin": margin,
    }
    gpu_needed = sum(gpu_parts.values())
    # What the wanted context alone would need, for the reasons below.
    need_for_context = static_fixed + experts_bytes + context * kv_tok + dyn + margin

    # --- verdict: VRAM ----------------------------------------------------------------------------
    gib = lambda b: b / GIB  # noqa: E731

    def breakdown(tokens: int) -> str:
        return (f"dense {gib(dense):.1f} + {n_experts} GPU expert{'' if n_experts == 1 else 's'} "
                f"{gib(experts_bytes):.1f} + KV {gib(tokens * kv_tok):.1f} ({tokens:,} tokens, {kv_flag}) + "
                f"layerwise layer {gib(dyn_parts['layerwise_prefill_layer']):.1f} + activations "
                f"{gib(dyn_parts['activations'] + dyn_parts['kt_staging_buffer']):.1f} (chunk {chunk}) + "
                f"reserve {gib(framework + reserve):.1f} + margin {gib(margin):.1f}")

    card = f"{hw.gpu_memory_gib:g} GiB ({hw.gpu_name})"
    if hw.gpus:
        if pool_tokens < context:
            if "mem-fraction-static" in ov and need_for_context <= capacity:
                want = math.ceil((static_fixed + experts_bytes + context * kv_tok) / capacity * 1000) / 1000
                failures.append(
                    f"mem-fraction-static {mem_frac:g} holds the weights and a KV pool of only {pool_tokens:,} "
                    f"tokens < the {context:,} asked: raise it to {want:.3f}, or leave it to the planner")
            elif fixed_experts is not None and fixed_experts > 0:
                fit_n = math.floor((room - context * kv_tok) / per_expert) if room >= context * kv_tok else -1
                failures.append(
                    f"VRAM per GPU: {gib(need_for_context):.1f} GiB needed > {card}: {breakdown(context)}. "
                    + (f"At most {fit_n} GPU experts fit beside a {context:,}-token KV cache "
                       f"(--set kt-num-gpu-experts={fit_n})" if fit_n >= 0 else
                       f"Even with 0 GPU experts the KV pool holds at most "
                       f"{max(0, math.floor(room / kv_tok)):,} tokens")
                    + f"; with {n_experts} it holds {max(0, max_pool):,} tokens")
            else:
                failures.append(
                    f"VRAM per GPU: the KV cache for {context:,} tokens ({kv_flag}) needs "
                    f"{gib(context * kv_tok):.1f} GiB, but {card} leaves {gib(max(0, room)):.1f} GiB after "
                    f"dense weights {gib(dense):.1f}, prefill buffers {gib(dyn - reserve):.1f} (chunk {chunk}) and "
                    f"reserve {gib(framework + reserve + margin):.1f}: at most "
                    f"{max(0, math.floor(room / kv_tok)):,} tokens fit. Ask for fewer with --context-tokens, "
                    "use --kv-dtype fp8 (half the bytes), or more GPUs")
        else:
            passes.append(f"VRAM per GPU: {gib(gpu_needed):.1f} of {card}: {breakdown(pool_tokens)}")
        if "mem-fraction-static" in ov and outside is not None and outside < dyn + margin:
            failures.append(
                f"mem-fraction-static {mem_frac:g} grows the KV pool to {pool_tokens:,} tokens and leaves "
                f"{gib(outside):.1f} GiB per GPU outside the weights and the pool, "
                f"but prefill needs {gib(dyn + margin):.1f} GiB there (layerwise layer "
                f"{gib(dyn_parts['layerwise_prefill_layer']):.1f} + activations "
                f"{gib(dyn_parts['activations'] + dyn_parts['kt_staging_buffer']):.1f} for chunk {chunk} + reserve "
                f"{gib(reserve + margin):.1f}): lower it to "
                f"{math.floor((capacity - dyn - margin) / capacity * 100) / 100:.2f}, cap the pool with a lower "
                "max-total-tokens, or lower chunked-prefill-size")
        if cap_tokens is not None and context <= pool_tokens < cap_tokens:
            notes.append(f"max-total-tokens {cap_tokens:,} is a cap: sglang sizes the KV pool from "
                         f"mem-fraction-static, about {pool_tokens:,} tokens here (all {cap_tokens:,} in "
                         f"{kv_flag} would need {gib(kv_tok * cap_tokens):.1f} GiB per GPU)")

    # --- verdict: host RAM and disk ------------------------------------------------------------
    host_parts = {
        "experts": spec.all_expert_bytes / GB,
        "kt_kernel_buffers": kt_host_buffer_bytes(spec, chunk) / GB,
        "sglang_processes": HOST_PROCESSES_BASE_GB + HOST_PER_TP_RANK_GB * tp,
        "os_reserve": OS_RESERVE_GB,
    }
    ram_needed = sum(host_parts.values())
    ram_line = (f"all {spec.num_experts} experts x {spec.num_layers} layers stay in RAM "
                f"({host_parts['experts']:.1f} GB, whatever the GPU holds) + kt-kernel buffers "
                f"{host_parts['kt_kernel_buffers']:.1f} + SGLang processes {host_parts['sglang_processes']:.0f} + "
                f"OS {host_parts['os_reserve']:.0f}")
    if hw.ram_gb < ram_needed:
        failures.append(f"RAM {hw.ram_gb:.0f} GB < {ram_needed:.0f} GB needed: {ram_line}")
    else:
        passes.append(f"RAM: {ram_needed:.0f} of {hw.ram_gb:.0f} GB: {ram_line}")
    disk_needed = spec.checkpoint_bytes / GB + DISK_SLACK_GB
    if goals.checkpoint_present:
        passes.append(f"disk: the checkpoint is already in {model_dir}")
    elif hw.disk_free_gb is None:
        passes.append(f"disk: not checked (described machine); the checkpoint needs {disk_needed:.0f} GB")
    elif hw.disk_free_gb < disk_needed:
        where = f" at {hw.disk_path}" if hw.disk_path else ""
        failures.append(f"disk {hw.disk_free_gb:.0f} GB free{where} < {disk_needed:.0f} GB for the checkpoint "
                        f"({spec.checkpoint_bytes / GB:.0f} GB) and caches: download elsewhere with --local-dir")
    else:
        passes.append(f"disk: {disk_needed:.0f} of {hw.disk_free_gb:.0f} GB free")

    # --- CPU ---------------------------------------------------------------------------------------
    threads, threads_why = _cpuinfer(hw, tp)
    if "kt-cpuinfer" in ov and ov["kt-cpuinfer"] > hw.physical_cores:
        failures.append(
            f"kt-cpuinfer {ov['kt-cpuinfer']} > {hw.physical_cores} physical cores: hyperthreads share a core's "
            f"vector units and leave nothing for the GPU-side threads (FACTS: decode 4x slower with every "
            f"vCPU busy); use at most {threads}")
    variant = hw.cpu_variant

    # --- settings, in launch order ----------------------------------------------------------------
    put("model-path", model_dir, "the checkpoint folder (config.json, safetensors shards, tokenizer)")
    put("served-model-name", served, "the name clients send as `model`; no ':' (sglang reads it as name:revision)")
    put("trust-remote-code", True, "the published M2.1 launches (kt-cli, SGLang's docs) pass it: the hub "
        "repo ships MiniMax's own configuration code")
    put("tensor-parallel-size", tp, f"{tp} GPU{'s' if tp > 1 else ''}: attention heads, KV cache, vocabulary "
        f"and each GPU expert's FFN split over them" if tp > 1 else "one GPU holds attention, KV cache and GPU experts")
    method = "FP8" if spec.is_fp8 else "BF16"
    put("kt-method", method,
        (f"the checkpoint is block-FP8 ({spec.fp8_block[0]}x{spec.fp8_block[1]}); kt-kernel reads it as is "
         if spec.is_fp8 else "the checkpoint is bf16 ") + f"(kt-kernel build here: {variant})")
    put("kt-weight-path", model_dir, "FP8 experts load from the checkpoint itself: the same folder as --model-path")
    put("kt-cpuinfer", threads, threads_why)
    put("kt-threadpool-count", max(1, hw.numa_nodes),
        f"one pool per NUMA node ({hw.numa_nodes}): each pool's threads read experts from their own node's "
        "memory (sglang-kt's default is 2)")
    if hw.numa_ids != tuple(range(hw.numa_nodes)):
        put("kt-numa-nodes", list(hw.numa_ids), "the NUMA nodes that have CPUs are not numbered 0..N-1: name them")
    elif "kt-numa-nodes" in ov:
        settings["kt-numa-nodes"] = Setting(value=ov["kt-numa-nodes"], reason="set by you", source="you")
    put("kt-num-gpu-experts", n_experts,
        f"the most experts per layer that fit beside the KV cache: each costs {gib(per_expert):.2f} GiB per GPU "
        f"({spec.num_layers} layers x {spec.expert_bytes / 1e6:.1f} MB / TP {tp}) and takes 1/{spec.num_experts} "
        "of decode's routed-expert reads off the CPU")
    put("kt-gpu-prefill-token-threshold", threshold,
        f"prefill chunks of {threshold}+ tokens run the MoE on the GPU layer by layer (uploading each layer's "
        f"{spec.layer_expert_bytes / GB:.1f} GB of experts) instead of on the CPU: kt-cli's M2.1 default and the "
        "published 2 x RTX 5090 value")
    if n_experts > 0:
        put("kt-enable-dynamic-expert-update", True,
            "kt-cli passes it for M2.1: the GPU expert set follows the experts actually routed to")
    put("chunked-prefill-size", chunk,
        f"the largest of {', '.join(map(str, CHUNK_CANDIDATES))} whose prefill buffers "
        f"({gib(dyn - reserve):.1f} GiB per GPU) stay under a quarter of the card and leave room for the "
        f"context: each chunk above the threshold uploads all {spec.num_layers} layers' experts once, so "
        "bigger chunks spread that transfer over more tokens")
    if pool_tokens >= context:
        put("max-total-tokens", cap if cap_tokens is not None else pool_tokens,
            f"KV pool for {pool_tokens:,} tokens ({kv_flag}): {gib(kv_bytes):.1f} GiB per GPU, "
            f"{kv_tok / 1e3:.0f} KB a token per GPU")
    else:  # does not fit: show what was asked; the reasons say what is missing
        put("max-total-tokens", cap, f"the {cap:,} tokens asked ({gib(cap * kv_tok):.1f} GiB per GPU in "
            f"{kv_flag}); they do not fit, see the verdict")
    put("kv-cache-dtype", kv_flag,
        "full-precision KV cache" if kv_dtype == "bf16" else "FP8 KV cache: half the bytes of bf16, so twice the context")
    if not 0 < mem_frac < 1:  # no GPU, or more than the card: nothing sensible to set
        put("mem-fraction-static", None, "not set: the plan does not fit the GPU (see the verdict)")
    else:
        put("mem-fraction-static", mem_frac,
            f"weights + KV pool = {gib(static_fixed + experts_bytes + kv_bytes):.1f} of {hw.gpu_memory_gib:g} GiB; "
            f"the other {gib(max(0.0, outside or 0.0)):.1f} GiB per GPU hold prefill activations, the layerwise "
            "layer and CUDA graphs")
    put("max-running-requests", goals.max_running_requests,
        "one request at a time, as in the published runs: the whole KV pool serves one long context"
        if goals.max_running_requests == 1 else "requests decoded together share the KV pool")
    put("attention-backend", "flashinfer", "kt-cli's choice for M2.1; FlashInfer has kernels for sm80 to sm120 cards")
    put("fp8-gemm-backend", "triton", "kt-cli's choice for FP8 models: Triton's block-FP8 GEMM runs on consumer "
        "cards, where the DeepGEMM and CUTLASS paths target data-center GPUs")
    put("disable-shared-experts-fusion", True, "M2.1 has no shared expert; sglang-kt sets this itself when KT is "
        "on, and kt-cli passes it: written out so the command shows what runs")
    put("watchdog-timeout", WATCHDOG_TIMEOUT_S,
        f"sglang kills a forward pass slower than its 300 s default; a {chunk}-token prefill on a slow CPU path "
        "can take longer (kt-cli's M2.1 value)")
    put("tool-call-parser", "minimax-m2", "turns <minimax:tool_call><invoke ...> blocks into OpenAI/Anthropic tool calls")
    put("reasoning-parser", "minimax-append-think",
        "keeps <think>...</think> in the reply content, which M2.1's model card asks to keep in history; with "
        "`minimax` sglang-kt 0.7.2's Messages route drops the reasoning, so Claude Code would see none (measured: "
        "results/gpu-host-2026-12-04-tiny-sglang.jsonl, claude_check 'thinking')")
    for flag, value in ov.items():  # overrides the planner does not compute pass through
        if flag not in settings:
            settings[flag] = Setting(value=value, reason="set by you", source="you")

    memory = MemoryBreakdown(
        gpu=GpuMemory(
            per_gpu_gib=GpuParts(**{k: round(gib(v), 3) for k, v in gpu_parts.items()}),
            capacity_gib=hw.gpu_memory_gib,
            gpus=hw.gpu_count,
            tp=tp,
            static_gib=round(gib(static_fixed + experts_bytes + kv_bytes), 2),
            outside_static_gib=round(gib(max(0.0, outside or 0.0)), 2),
            kv_pool_tokens=pool_tokens,
            kv_cache_dtype=kv_flag,
            kv_bytes_per_token_per_gpu=round(kv_tok),
            gib_per_gpu_expert=round(gib(per_expert), 4),
            max_gpu_experts_at_context=max_experts_at_context,
            context_tokens=context,
            chunked_prefill_size=chunk,
        ),
        host=HostMemory(parts_gb=HostParts(**{k: round(v, 2) for k, v in host_parts.items()}), available_gb=hw.ram_gb),
        disk=DiskNeed(needed_gb=round(disk_needed, 1), free_gb=hw.disk_free_gb, path=hw.disk_path,
                      checkpoint_present=goals.checkpoint_present),
    )
    notes.append(f"kt-kernel build for these CPU flags: {variant}: {hw.cpu_variant_cost}")
    return Plan(
        spec=spec, hardware=hw, goals=goals, settings=settings, memory=memory,
        verdict="does-not-fit" if failures else "fits",
        reasons=failures if failures else passes, notes=_dedupe(notes),
        cpu_variant=variant, cpu_variant_cost=hw.cpu_variant_cost,
    )


def _dedupe(items: list[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def replan(plan: Plan, overrides: dict[str, Any]) -> Plan:
    """The same machine and goals with more overrides (later ones win)."""
    merged = dict(plan.goals.overrides)
    merged.update(overrides)
    return make_plan(plan.spec, plan.hardware, replace(plan.goals, overrides=merged))


# ---- the published runs ------------------------------------------------------------------------

# KTransformers' MiniMax-M2.1 tutorial (FACTS.md "Published results to reproduce"). Cores and NUMA
# nodes are the CPUs' data sheets (2 sockets, one NUMA node each); RAM is the tutorial's tested
# 1 TB for the EPYC machine and assumed the same for the Xeon one (not published).
_EPYC_9355 = dict(cpu_cores=64, logical_cpus=128, numa_nodes=2, ram_gb=1024, cpu_model="2 x AMD EPYC 9355",
                  cpu_flags=["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16"])
_XEON_8488C = dict(cpu_cores=112, logical_cpus=224, numa_nodes=2, ram_gb=1024,
                   cpu_model="2 x Intel Xeon Platinum 8488C",
                   cpu_flags=["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16",
                              "amx_tile", "amx_int8", "amx_bf16"])
PUBLISHED_RUNS = [
    {"run": "1 x RTX 4090 (48 GB) + 2 x Xeon Platinum 8488C", "gpu": "RTX 4090 48GB:48", "gpus": 1,
     "cpu": _XEON_8488C, "published": {"tensor-parallel-size": 1}},
    {"run": "2 x RTX 4090 (48 GB) + 2 x Xeon Platinum 8488C", "gpu": "RTX 4090 48GB:48", "gpus": 2,
     "cpu": _XEON_8488C, "published": {"tensor-parallel-size": 2}},
    {"run": "1 x RTX 5090 (32 GB) + 2 x EPYC 9355", "gpu": "RTX 5090:32", "gpus": 1,
     "cpu": _EPYC_9355, "published": {"tensor-parallel-size": 1}},
    {"run": "2 x RTX 5090 (32 GB) + 2 x EPYC 9355", "gpu": "RTX 5090:32", "gpus": 2, "cpu": _EPYC_9355,
     "published": {"tensor-parallel-size": 2, "kt-num-gpu-experts": 40, "chunked-prefill-size": 32768,
                   "kt-gpu-prefill-token-threshold": 4096, "max-total-tokens": 80000,
                   "max-running-requests": 1}},
]
# The published benchmark's longest request: a 32768-token prompt and 512 output tokens.
PUBLISHED_LONGEST_REQUEST_TOKENS = 32768 + 512
PUBLISHED_CONTEXT_TOKENS = 80000  # the published max-total-tokens, used as the planner's goal
COMPARED_FLAGS = ("tensor-parallel-size", "kt-num-gpu-experts", "chunked-prefill-size",
                  "kt-gpu-prefill-token-threshold", "max-total-tokens", "mem-fraction-static", "kt-cpuinfer",
                  "kt-threadpool-count", "kv-cache-dtype")


def published_hardware(run: dict[str, Any]) -> Hardware:
    return Hardware.described(gpu=run["gpu"], gpus=run["gpus"], **run["cpu"])


def published_runs_comparison(spec: Optional[ModelSpec] = None) -> list[dict[str, Any]]:
    """Each published configuration: the planner's settings for the published 80,000-token pool,
    beside the published settings where known (only the 2 x RTX 5090 run's were published).

    The published settings are checked as sglang runs them: `max-total-tokens` is a cap and the
    pool is what `mem-fraction-static` leaves, so they must fit the benchmark's longest request
    (32768 + 512 tokens) with a bf16 KV cache, and the full 80,000-token pool with an FP8 one.
    """
    spec = spec or ModelSpec.known("minimax-m2.1")
    rows = []
    for run in PUBLISHED_RUNS:
        hw = published_hardware(run)
        planned = make_plan(spec, hw, Goals(context_tokens=PUBLISHED_CONTEXT_TOKENS))
        published = dict(run["published"])
        row: dict[str, Any] = {
            "run": run["run"],
            "hardware": hw.label(),
            "cpu_variant": hw.cpu_variant,
            "capacity_gib": hw.gpu_memory_gib,
            "planner": {f: planned.settings[f].value for f in COMPARED_FLAGS if f in planned.settings},
            "planner_verdict": planned.verdict,
            "planner_gpu_gib": planned.memory.gpu.needed_gib,
            "planner_ram_gb": planned.memory.host.needed_gb,
            "planner_reasons": planned.reasons,
            "published": published,
        }
        if set(published) - {"tensor-parallel-size"}:
            as_published = make_plan(spec, hw, Goals(context_tokens=PUBLISHED_LONGEST_REQUEST_TOKENS,
                                                     overrides=published))
            fp8_full = make_plan(spec, hw, Goals(context_tokens=published.get("max-total-tokens"),
                                                 overrides={**published, "kv-cache-dtype": "fp8_e4m3"}))
            bf16_full = make_plan(spec, hw, Goals(context_tokens=published.get("max-total-tokens"),
                                                  overrides=published))
            row.update({
                "published_verdict": as_published.verdict,
                "published_gpu_gib": as_published.memory.gpu.needed_gib,
                "published_kv_pool_tokens": as_published.memory.gpu.kv_pool_tokens,
                "published_reasons": as_published.reasons,
                "published_notes": [n for n in as_published.notes if n.startswith("max-total-tokens")],
                "published_fp8_kv_full_pool": {
                    "verdict": fp8_full.verdict, "gpu_gib": fp8_full.memory.gpu.needed_gib,
                    "kv_pool_tokens": fp8_full.memory.gpu.kv_pool_tokens,
                },
                "published_bf16_full_pool": {"verdict": bf16_full.verdict, "reasons": bf16_full.reasons},
            })
        rows.append(row)
    return rows
