"""Kernel microbenchmarks at MiniMax-M2.1 layer shape (256 experts, 3072 x 1536, top 8).

Three measurements, each written as self-describing records (`results.py`):

- `run_kt_kernel`: kt-kernel's FP8 MoE on the CPU with random FP8 weights in several layers
  (more than any cache holds), decode (1 and 4 tokens) and prefill chunks, beside the host's
  copy bandwidth measured in the same run at the same thread count. One child process per thread
  count: kt-kernel's CPU thread pool is one per process.
- `run_llamacpp`: the same layer shape in llama.cpp (xllamacpp), a random `minimax-m2` GGUF at
  Q8_0 with a few full-size MoE layers, CPU only, same thread counts.
- `run_hybrid`: one layer split as KT splits it: N experts on the GPU (torch), the rest on the
  CPU through kt-kernel, both running at once (kt submit, GPU work, kt sync).

Weights are random: speed does not depend on the values, and a float32 reference on a few experts
checks that each run computed the right thing (kt-kernel returns zeros silently when misused).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import gguf
import numpy as np

from ktutorial import results
from ktutorial.errors import MissingDependency, UserError
from ktutorial.fp8 import dequantize_block, reference_moe, rel_err
from ktutorial.server import stop_process_group
from ktutorial.spec import ModelSpec
from ktutorial.tiny import bytes_to_unicode

# Quantization blocks: FP8 checkpoints scale 128 x 128 blocks, Q8_0 scales 32 values.
FP8_BLOCK = 128
Q8_0_BLOCK = 32
Q8_0_BLOCK_BYTES = 34  # fp16 scale + 32 int8

KIND_KT = "kt_kernel_moe"
KIND_KT_SUMMARY = "kt_kernel_summary"
KIND_BANDWIDTH = "host_bandwidth"
KIND_LLAMACPP = "llamacpp_layer"
KIND_HYBRID = "hybrid_layer"
KIND_FAILURE = "kernel_bench_failure"
KIND_MASK_PROBE = "kt_mask_probe"

CHILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer's shape and the sizes a benchmark of it uses."""

    name: str
    experts: int
    hidden: int
    intermediate: int
    top_k: int
    model_layers: int  # layers of the real model, for the 62-layer ceilings
    layers: int  # layers held in RAM by the benchmark (rotated so caches do not help)
    decode_tokens: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    bandwidth_bytes: int
    llamacpp_layers: int
    llamacpp_prompt_tokens: tuple[int, ...]
    llamacpp_decode_tokens: int
    hybrid_prefill_tokens: int
    hybrid_layers: int

    @property
    def expert_weight_bytes(self) -> int:
        """FP8 bytes of one expert (w1, w3, w2) plus its float32 block scales."""
        h, i = self.hidden, self.intermediate
        scales = 3 * (h // FP8_BLOCK) * (i // FP8_BLOCK) * 4
        return 3 * h * i + scales

    @property
    def layer_weight_bytes(self) -> int:
        return self.experts * self.expert_weight_bytes

    def flops(self, tokens: int) -> float:
        """Multiply-adds x 2 of the routed experts for `tokens` tokens (three GEMMs each)."""
        return 2.0 * 3 * self.hidden * self.intermediate * tokens * self.top_k


def _m21_shape() -> LayerShape:
    spec = ModelSpec.known("minimax-m2.1")
    return LayerShape(
        name="m2.1",
        experts=spec.num_experts,
        hidden=spec.hidden_size,
        intermediate=spec.expert_intermediate_size,
        top_k=spec.experts_per_token,
        model_layers=spec.num_layers,
        layers=4,  # 4 x 3.6 GB: a token's 8 experts are never in a cache from the call before
        decode_tokens=(1, 4),
        prefill_tokens=(128, 512, 1024, 2048, 4096),
        bandwidth_bytes=2 * 1024**3,
        llamacpp_layers=4,
        llamacpp_prompt_tokens=(512, 2048),
        llamacpp_decode_tokens=32,
        hybrid_prefill_tokens=2048,
        hybrid_layers=3,
    )


TINY = LayerShape(
    name="tiny",
    experts=16,
    hidden=256,
    intermediate=128,
    top_k=2,
    model_layers=62,
    layers=2,
    decode_tokens=(1, 4),
    prefill_tokens=(16, 64),
    bandwidth_bytes=32 * 1024**2,
    llamacpp_layers=2,
    llamacpp_prompt_tokens=(32,),
    llamacpp_decode_tokens=8,
    hybrid_prefill_tokens=32,
    hybrid_layers=2,
)

SHAPE_NAMES = ("m2.1", "tiny")


def layer_shape(name: str, layers: Optional[int] = None, prefill_tokens: Optional[Sequence[int]] = None) -> LayerShape:
    """The named shape; `layers` overrides how many layers the benchmark holds in RAM, and
    `prefill_tokens` the prefill chunk sizes it times (fewer: a shorter run beside an engine sweep)."""
    if name == "m2.1":
        shape = _m21_shape()
    elif name == "tiny":
        shape = TINY
    else:
        raise UserError(f"unknown shape {name!r}: use one of {', '.join(SHAPE_NAMES)}")
    if layers is not None:
        if layers < 1:
            raise UserError(f"--layers must be at least 1, got {layers}")
        shape = LayerShape(**{**asdict(shape), "layers": layers, "llamacpp_layers": layers})
    if prefill_tokens is not None:
        if not prefill_tokens or min(prefill_tokens) < 1:
            raise UserError(f"--prefill-tokens takes positive chunk sizes, got {list(prefill_tokens)}")
        shape = LayerShape(**{**asdict(shape), "prefill_tokens": tuple(int(t) for t in prefill_tokens)})
    return shape


def parse_int_list(text: str, what: str) -> list[int]:
    """'4,8,12' -> [4, 8, 12]; a clear error for anything else."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers like 4,8,12, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"{what} must be non-negative integers like 4,8,12, got {text!r}")
    return values


def check_threads(threads: Sequence[int]) -> list[int]:
    threads = list(threads)
    if not threads or any(t < 1 for t in threads):
        raise UserError(f"--threads must be positive integers like 4,8,12,16, got {threads}")
    cores = os.cpu_count() or 1
    over = [t for t in threads if t > cores]
    if over:
        raise UserError(f"--threads {over} exceed the {cores} CPUs here: pick counts up to {cores}")
    return threads


# ---------------------------------------------------------------------------------------------
# statistics


def _summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    ms = sorted(s * 1e3 for s in seconds)
    n = len(ms)

    def q(p: float) -> float:
        return ms[min(n - 1, max(0, round(p * (n - 1))))]

    return {
        "latency_ms": statistics.median(ms),
        "latency_ms_mean": statistics.fmean(ms),
        "latency_ms_p10": q(0.1),
        "latency_ms_p90": q(0.9),
        "latency_ms_stdev": statistics.stdev(ms) if n > 1 else 0.0,
        "n": n,
    }


# ---------------------------------------------------------------------------------------------
# child processes


def _env_extra(extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Stamp additions: where the source tree travelled without its .git (a device machine), the
    commit it was copied from comes in KTUTORIAL_GIT_SHA (set by whoever sent it)."""
    out = dict(extra or {})
    sha = os.environ.get("KTUTORIAL_GIT_SHA")
    if sha:
        out.setdefault("source_git_sha", sha)
    return out


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # A spinning OpenMP pool (torch's) beside kt-kernel's threads slows decode ~10x (FACTS).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONUNBUFFERED"] = "1"
    # The child imports ktutorial from the same tree as this process.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_child(role: str, params: dict[str, Any], log_dir: Path, timeout_s: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """Run `python -m ktutorial.kernel_bench ROLE` with params; return its result or raise."""
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{role}-{params.get('threads', 'x')}-{os.getpid()}-{time.monotonic_ns()}"
    params_path = log_dir / f"{tag}.params.json"
    result_path = log_dir / f"{tag}.result.json"
    log_path = log_dir / f"{tag}.log"
    params_path.write_text(json.dumps(params))
    cmd = [sys.executable, "-m", "ktutorial.kernel_bench", role, str(params_path), str(result_path)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_group(proc.pid, grace_s=5.0, leader=proc)
            proc.wait()
            rc = None
    if rc != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        why = "timed out" if rc is None else f"exited with {rc}"
        raise RuntimeError(f"{role} child (threads={params.get('threads')}) {why}; log tail:\n{tail}")
    return json.loads(result_path.read_text())


# ---------------------------------------------------------------------------------------------
# random FP8 weights (the float32 reference the kt and hybrid children check them with is fp8.py's)


def random_fp8(shape: Sequence[int], generator=None):
    """Random float8_e4m3fn values of magnitude 0.5..1.875 and random sign.

    Made from random bytes with the exponent forced to 6 or 7 (bits 0x30 set, 0x48 clear): never
    NaN or a subnormal. Drawing gigabytes one byte at a time is slow (torch's generator is serial),
    so a random tile of an odd length is repeated: each expert starts at another offset of it, so
    no two experts hold the same values, and speed does not depend on the values anyway.
    """
    import torch

    total = math.prod(shape)
    tile_len = min(total, 16 * 1024 * 1024 + 4099)
    tile = torch.randint(0, 256, (tile_len,), dtype=torch.uint8, generator=generator)
    tile.bitwise_and_(0x87).bitwise_or_(0x30)
    flat = torch.empty(total, dtype=torch.uint8)
    whole = total // tile_len
    if whole:
        flat[: whole * tile_len].view(whole, tile_len).copy_(tile.expand(whole, tile_len))
    rest = total - whole * tile_len
    if rest:
        flat[whole * tile_len :].copy_(tile[:rest])
    return flat.view(tuple(shape)).view(torch.float8_e4m3fn)


def random_scales(rows: int, cols: int, experts: int, fan_in: int, generator=None):
    """float32 block scales [experts, rows/128, cols/128] that keep outputs near unit size."""
    import torch

    base = 1.0 / math.sqrt(fan_in)
    s = torch.rand(experts, rows // FP8_BLOCK, cols // FP8_BLOCK, generator=generator)
    return (0.5 + s) * base


@dataclass
class Fp8Experts:
    """One layer's experts in the checkpoint's layout: w1/w3 [E, I, H], w2 [E, H, I], FP8."""

    gate: Any
    up: Any
    down: Any
    gate_scale: Any
    up_scale: Any
    down_scale: Any

    @classmethod
    def random(cls, shape: LayerShape, seed: int = 0) -> "Fp8Experts":
        import torch

        g = torch.Generator().manual_seed(seed)
        e, h, i = shape.experts, shape.hidden, shape.intermediate
        return cls(
            gate=random_fp8((e, i, h), g),
            up=random_fp8((e, i, h), g),
            down=random_fp8((e, h, i), g),
            gate_scale=random_scales(i, h, e, h, g),
            up_scale=random_scales(i, h, e, h, g),
            down_scale=random_scales(h, i, e, i, g),
        )

    def dequantized(self, e: int, device=None):
        """Expert e as float32 (w1, w3, w2): fp8 value x the scale of its 128 x 128 block."""
        return (
            dequantize_block(self.gate[e], self.gate_scale[e], device),
            dequantize_block(self.up[e], self.up_scale[e], device),
            dequantize_block(self.down[e], self.down_scale[e], device),
        )


def random_routing(tokens: int, experts: int, top_k: int, generator=None, probs=None):
    """ids [T, k] (distinct experts per token) and weights [T, k] summing to 1 per token."""
    import torch

    if probs is None:
        ids = torch.rand(tokens, experts, generator=generator).argsort(dim=1)[:, :top_k]
    else:
        ids = torch.multinomial(probs.expand(tokens, -1), top_k, replacement=False, generator=generator)
    w = torch.rand(tokens, top_k, generator=generator) + 0.1
    return ids.to(torch.int64).contiguous(), (w / w.sum(dim=1, keepdim=True)).float().contiguous()


# ---------------------------------------------------------------------------------------------
# kt-kernel's low-level FP8 MoE (kt_kernel_ext), driven as kt_kernel/utils/amx.py drives it


def _import_kt():
    try:
        import kt_kernel  # noqa: F401  (loads the CPU variant and registers kt_kernel_ext)
        import kt_kernel_ext
    except ImportError as exc:
        raise MissingDependency(
            "kt-kernel", "pip install --no-deps kt-kernel==0.7.2 (wheels for CPython 3.10-3.12, x86-64)"
        ) from exc
    return kt_kernel, kt_kernel_ext


class KtLayers:
    """Several kt-kernel FP8 MoE layers loaded from in-memory tensors, one CPU thread pool.

    The lower-level extension takes per-expert pointers, so no safetensors folder and neither of
    KTMoEWrapper's CPU-only workarounds (pinned memory, KT_FORCE_SYNC_SUBMIT) are needed. kt-kernel
    copies the weights into its own buffers at load, so one random source feeds every layer while
    each layer still lives in its own memory.
    """

    def __init__(self, experts: Fp8Experts, shape: LayerShape, layers: int, threads: int, max_tokens: int):
        import torch

        kt_kernel, ext = _import_kt()
        self.variant = str(kt_kernel.__cpu_variant__)
        self.shape = shape
        cfg = ext.WorkerPoolConfig()
        cfg.subpool_count = 1
        cfg.subpool_numa_map = [0]
        cfg.subpool_thread_count = [threads]
        self.cpu = ext.CPUInfer(cfg)
        # The FP8 class KTMoEWrapper picks: AMX/AVX-512 where compiled in, else the AVX2 kernel.
        cls = getattr(ext.moe, "AMXFP8_MOE", None) or getattr(ext.moe, "AVX2FP8_MOE", None)
        if cls is None:
            raise RuntimeError(f"kt-kernel variant {self.variant} has no FP8 MoE kernel")
        self.kernel_class = cls.__name__
        self._cls, self._ext = cls, ext
        self.max_tokens = max_tokens
        # One mask for the benchmark's layers, all False. The hybrid leaves GPU experts out by
        # passing them as id -1 (KT's own way of leaving out deferred experts), never by the
        # mask: with the cp312 wheel on the device host, MOEConfig(E, k, H, I, mask_ptr) bound
        # the pointer to another overload (num_gpu_experts = its low 32 bits) and the FP8 kernels
        # computed "masked" experts anyway; the cp311 wheel here honours it (see mask_probe).
        self.mask = torch.zeros(shape.experts, dtype=torch.bool)
        self.moes = []
        self._keep = []  # configs, masks and maps the kernel holds pointers into
        for _ in range(layers):
            self.add_layer(experts, shape, self.mask)

        self._bsz = torch.zeros(1, dtype=torch.int32)

    def add_layer(self, experts: "Fp8Experts", shape: LayerShape, mask) -> int:
        """Load one more FP8 MoE layer on this pool (mask: bool [E], True = on the GPU); its index."""
        import torch

        e = shape.experts

        def ptrs(t):
            return [[t[i].data_ptr() for i in range(e)]]

        c = self._ext.moe.MOEConfig(e, shape.top_k, shape.hidden, shape.intermediate, mask.data_ptr())
        c.layer_idx = len(self.moes)
        c.pool = self.cpu.backend_
        c.max_len = self.max_tokens
        c.gate_projs, c.up_projs, c.down_projs = ptrs(experts.gate), ptrs(experts.up), ptrs(experts.down)
        c.gate_scales = ptrs(experts.gate_scale)
        c.up_scales = ptrs(experts.up_scale)
        c.down_scales = ptrs(experts.down_scale)
        c.quant_config.bits = 8
        c.quant_config.group_size = FP8_BLOCK
        c.quant_config.zero_point = False
        moe = self._cls(c)
        p2l = torch.arange(e, dtype=torch.int64)
        self.cpu.submit(moe.load_weights_task(p2l.data_ptr()))
        self.cpu.sync()
        self.moes.append(moe)
        self._keep.append((c, mask, p2l))
        return len(self.moes) - 1

    def submit(self, layer: int, x, ids, weights, out) -> None:
        """Queue one forward on the pool and return at once (x, out: bf16 [T, H] on the CPU)."""
        self._bsz[0] = x.shape[0]
        task = self.moes[layer].forward_task(
            self._bsz.data_ptr(), ids.shape[1], ids.data_ptr(), weights.data_ptr(), x.data_ptr(), out.data_ptr(), False
        )
        self.cpu.submit(task)

    def sync(self) -> None:
        self.cpu.sync()

    def forward(self, layer: int, x, ids, weights, out):
        self.submit(layer, x, ids, weights, out)
        self.sync()
        return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_copy_bandwidth(nbytes: int, threads: int, repeats: int = 10) -> dict[str, Any]:
    """Host memory bandwidth by a large torch copy, counting bytes read plus bytes written."""
    import torch

    torch.set_num_threads(threads)
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults stay out of the timing
    gbs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        gbs.append(2 * n * 4 / (time.perf_counter() - t0) / 1e9)
    del src, dst
    return {"copy_gb_s": statistics.median(gbs), "copy_gb_s_max": max(gbs), "samples_gb_s": gbs, "bytes": n * 4}


def _kt_child(p: dict[str, Any]) -> dict[str, Any]:
    """One thread count: bandwidth, load, correctness check, decode and prefill timings."""
    import torch

    shape = LayerShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["shape"].items()})
    threads = int(p["threads"])
    cores = os.cpu_count() or threads
    result: dict[str, Any] = {"threads": threads}
    result["bandwidth"] = measure_copy_bandwidth(shape.bandwidth_bytes, threads, p.get("bandwidth_repeats", 10))

    torch.set_num_threads(cores)  # making the random source is a fill: use every core
    t0 = time.perf_counter()
    src = Fp8Experts.random(shape, seed=p.get("seed", 0))
    result["generate_s"] = time.perf_counter() - t0
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    max_tokens = max(max(shape.prefill_tokens), max(shape.decode_tokens))
    kt = KtLayers(src, shape, shape.layers, threads, max_tokens)
    result["load_s"] = time.perf_counter() - t0
    result["resident_bytes_per_layer"] = (_rss_bytes() - rss0) / shape.layers
    result["variant"] = kt.variant
    result["kernel_class"] = kt.kernel_class

    # Correctness once per run: a decode batch over all experts, and a prefill chunk routed to
    # 16 experts (so the float32 reference stays cheap); outputs poisoned with NaN first.
    g = torch.Generator().manual_seed(1234)
    checks = {}
    for name, tokens, pool in (("decode", max(shape.decode_tokens), shape.experts), ("prefill", min(shape.prefill_tokens), min(16, shape.experts))):
        x = torch.randn(tokens, shape.hidden, generator=g).to(torch.bfloat16)
        ids, w = random_routing(tokens, pool, shape.top_k, g)
        out = torch.full((tokens, shape.hidden), float("nan"), dtype=torch.bfloat16)
        kt.forward(0, x, ids, w, out)
        ref = reference_moe(src, x, ids, w)
        checks[name] = {"rel_err": rel_err(out, ref), "tokens": tokens, "ref_rms": ref.pow(2).mean().sqrt().item()}
    result["checks"] = checks
    torch.set_num_threads(1)  # timing: kt's pool only, no torch pool competing for the cores

    def timed(tokens: int, calls: int, warmup: int) -> dict[str, Any]:
        x = torch.randn(tokens, shape.hidden, generator=g).to(torch.bfloat16)
        out = torch.empty(tokens, shape.hidden, dtype=torch.bfloat16)
        routes = [random_routing(tokens, shape.experts, shape.top_k, g) for _ in range(warmup + calls)]
        secs, uniq = [], []
        for n, (ids, w) in enumerate(routes):
            layer = n % shape.layers
            t0 = time.perf_counter()
            kt.forward(layer, x, ids, w, out)
            dt = time.perf_counter() - t0
            if n >= warmup:
                secs.append(dt)
                uniq.append(int(torch.unique(ids).numel()))
        return {"tokens": tokens, "seconds": secs, "unique_experts": uniq, "out_abs_mean": out.float().abs().mean().item()}

    result["decode"] = [timed(t, p["decode_calls"], shape.layers) for t in shape.decode_tokens]
    result["prefill"] = []
    for n, t in enumerate(shape.prefill_tokens):
        result["prefill"].append(timed(t, p["prefill_calls"], 1 if n == 0 else 0))
    return result


def _kt_records(shape: LayerShape, res: dict[str, Any], env: dict[str, Any], make_record) -> list[dict]:
    """Records of one thread count: the bandwidth, then one per (phase, tokens)."""
    threads = res["threads"]
    bw = res["bandwidth"]
    recs = [
        make_record(
            KIND_BANDWIDTH,
            {"threads": threads, "bytes": bw["bytes"], "method": "torch copy_ of float32, read + write counted"},
            {"copy_gb_s": bw["copy_gb_s"], "copy_gb_s_max": bw["copy_gb_s_max"], "n": len(bw["samples_gb_s"])},
            {"copy_gb_s": bw["samples_gb_s"]},
            env=env,
        )
    ]
    for phase in ("decode", "prefill"):
        for run in res[phase]:
            tokens = run["tokens"]
            m = _summary_ms(run["seconds"])
            t_s = m["latency_ms"] / 1e3
            uniq = statistics.median(run["unique_experts"])
            streamed = uniq * shape.expert_weight_bytes
            gb_s = streamed / t_s / 1e9
            m.update(
                {
                    "per_token_ms_per_layer": m["latency_ms"] / tokens,
                    "unique_experts": uniq,
                    "expert_bytes": streamed,
                    "expert_gb_s": gb_s,
                    "copy_gb_s": bw["copy_gb_s"],
                    "bandwidth_ratio": gb_s / bw["copy_gb_s"],
                    "tflop_s": shape.flops(tokens) / t_s / 1e12,
                    f"ceiling_tok_s_{shape.model_layers}_layers": tokens / (shape.model_layers * t_s),
                    "rel_err_decode_check": res["checks"]["decode"]["rel_err"],
                    "rel_err_prefill_check": res["checks"]["prefill"]["rel_err"],
                    "out_abs_mean": run["out_abs_mean"],
                }
            )
            params = {
                "phase": phase,
                "tokens": tokens,
                "threads": threads,
                "shape": shape.name,
                "experts": shape.experts,
                "hidden": shape.hidden,
                "intermediate": shape.intermediate,
                "top_k": shape.top_k,
                "layers_in_ram": shape.layers,
                "method": "FP8 (float8_e4m3fn, 128x128 block scales)",
                "routing": "uniform random, distinct experts per token, fresh each call",
                "kernel_class": res["kernel_class"],
                "cpu_variant": res["variant"],
                "resident_gb_per_layer": res["resident_bytes_per_layer"] / 1e9,
            }
            recs.append(
                make_record(
                    KIND_KT,
                    params,
                    m,
                    {"latency_ms": [s * 1e3 for s in run["seconds"]], "unique_experts": run["unique_experts"]},
                    env=env,
                )
            )
    return recs


def summarize_kt(records: Sequence[dict[str, Any]], model_layers: int = 62) -> dict[str, Any]:
    """Best thread counts and the CPU-only ceilings from kt_kernel_moe records."""
    kt = [r for r in records if r.get("kind") == KIND_KT]
    if not kt:
        raise UserError("no kt_kernel_moe records to summarize: run `ktutorial kernel-bench` first")
    ceiling_key = f"ceiling_tok_s_{model_layers}_layers"

    def best(phase: str, tokens: int) -> dict[str, Any]:
        rows = [r for r in kt if r["params"]["phase"] == phase and r["params"]["tokens"] == tokens]
        top = min(rows, key=lambda r: r["metrics"]["latency_ms"])
        return {
            "threads": top["params"]["threads"],
            "latency_ms": top["metrics"]["latency_ms"],
            "ceiling_tok_s": top["metrics"][ceiling_key],
            "expert_gb_s": top["metrics"]["expert_gb_s"],
            "bandwidth_ratio": top["metrics"]["bandwidth_ratio"],
            "tflop_s": top["metrics"]["tflop_s"],
            "by_threads": {str(r["params"]["threads"]): r["metrics"]["latency_ms"] for r in sorted(rows, key=lambda r: r["params"]["threads"])},
        }

    decode_tokens = min(r["params"]["tokens"] for r in kt if r["params"]["phase"] == "decode")
    prefill_rows = [r for r in kt if r["params"]["phase"] == "prefill"]
    out = {"decode": best("decode", decode_tokens), "decode_tokens": decode_tokens}
    if prefill_rows:
        # The prefill ceiling is the best chunk at the best thread count.
        top = max(prefill_rows, key=lambda r: r["metrics"][ceiling_key])
        out["prefill"] = best("prefill", top["params"]["tokens"])
        out["prefill_tokens"] = top["params"]["tokens"]
    bws = [r for r in records if r.get("kind") == KIND_BANDWIDTH]
    if bws:
        # Copy bandwidth swings with the thread count (61-94 GB/s on the device host): the best
        # copy is the fairer yardstick for how close the kernel comes to the memory's limit.
        out["copy_gb_s_max"] = max(r["metrics"]["copy_gb_s"] for r in bws)
        out["decode"]["bandwidth_ratio_to_max_copy"] = out["decode"]["expert_gb_s"] / out["copy_gb_s_max"]
    return out


def run_kt_kernel(
    threads: Sequence[int],
    out: str | os.PathLike,
    shape: str = "m2.1",
    layers: Optional[int] = None,
    decode_calls: int = 200,
    prefill_calls: int = 2,
    seed: int = 0,
    env_extra: Optional[dict[str, Any]] = None,
    progress: Optional[Callable[[str], None]] = None,
    prefill_tokens: Optional[Sequence[int]] = None,
) -> dict[str, Any]:
    """kt-kernel FP8 MoE at one layer shape, one child process per thread count.

    Appends records to `out` as each thread count finishes; returns the summary (best threads,
    ceilings), which is also written as a kt_kernel_summary record.
    """
    threads = check_threads(threads)
    sh = layer_shape(shape, layers, prefill_tokens)
    if decode_calls < 1 or prefill_calls < 1:
        raise UserError("--repeats must be at least 1")
    env = results.environment_stamp(engine="kt-kernel", extra=_env_extra(env_extra))
    log_dir = Path(tempfile.mkdtemp(prefix="ktutorial-kernel-bench-"))
    all_records: list[dict[str, Any]] = []
    variant = None
    for t in threads:
        if progress:
            progress(f"kt-kernel, {t} threads")
        params = {"shape": asdict(sh), "threads": t, "decode_calls": decode_calls, "prefill_calls": prefill_calls, "seed": seed}
        try:
            res = _kt_child(params) if os.environ.get("KTUTORIAL_KERNEL_BENCH_INPROC") else _run_child("kt", params, log_dir)
        except RuntimeError as exc:
            rec = results.make_record(KIND_FAILURE, {"part": "kt-kernel", "threads": t, "shape": sh.name}, {"error": str(exc)[-2000:]}, env=env)
            results.append_record(out, rec)
            all_records.append(rec)
            continue
        variant = res["variant"]
        env_t = dict(env, kt_kernel_variant=variant)
        for rec in _kt_records(sh, res, env_t, results.make_record):
            results.append_record(out, rec)
            all_records.append(rec)
    if not any(r["kind"] == KIND_KT for r in all_records):
        raise UserError(f"every kt-kernel run failed; see the {KIND_FAILURE} records in {out}")
    summary = summarize_kt(all_records, sh.model_layers)
    rec = results.make_record(
        KIND_KT_SUMMARY,
        {"threads": list(threads), "shape": sh.name, "layers_in_ram": sh.layers, "model_layers": sh.model_layers},
        {
            "best_decode_threads": summary["decode"]["threads"],
            "best_prefill_threads": summary.get("prefill", {}).get("threads"),
            "decode_ceiling_tok_s": summary["decode"]["ceiling_tok_s"],
            "prefill_ceiling_tok_s": summary.get("prefill", {}).get("ceiling_tok_s"),
            "prefill_ceiling_chunk_tokens": summary.get("prefill_tokens"),
            "decode_expert_gb_s": summary["decode"]["expert_gb_s"],
            "decode_bandwidth_ratio": summary["decode"]["bandwidth_ratio"],
            "decode_bandwidth_ratio_to_max_copy": summary["decode"].get("bandwidth_ratio_to_max_copy"),
            "prefill_tflop_s": summary.get("prefill", {}).get("tflop_s"),
            "copy_gb_s_max": summary.get("copy_gb_s_max"),
        },
        {"decode_latency_ms_by_threads": summary["decode"]["by_threads"], "prefill_latency_ms_by_threads": summary.get("prefill", {}).get("by_threads", {})},
        env=dict(env, kt_kernel_variant=variant),
    )
    results.append_record(out, rec)
    return summary


# ---------------------------------------------------------------------------------------------
# llama.cpp: a random minimax-m2 GGUF at Q8_0 with full-size MoE layers


@dataclass
class GgufInfo:
    path: str
    layers: int
    vocab: int
    attention_heads: int
    head_dim: int
    expert_bytes_per_layer: int
    other_bytes_per_layer: int
    file_bytes: int
    write_s: float


def write_random_q8_gguf(path: str | os.PathLike, shape: LayerShape, layers: int, seed: int = 0) -> GgufInfo:
    """A random `minimax-m2` GGUF: full-size Q8_0 MoE layers, a one-head attention, 258 tokens.

    Attention is shrunk to one 128-wide head so that the layer's time is the MoE's: what is not
    expert weight is reported as `other_bytes_per_layer`. One random Q8_0 block array feeds every
    expert tensor (gate, up and down hold the same number of values); each tensor still occupies
    its own bytes in the file, so no layer shares memory with another.
    """
    t_start = time.perf_counter()
    e, h, f, k = shape.experts, shape.hidden, shape.intermediate, shape.top_k
    head_dim, heads = 128, 1
    tokens = list(bytes_to_unicode().values()) + ["ĠĠ", "<eos>"]
    vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def q8(values: int, fan_in: int) -> np.ndarray:
        nblocks = values // Q8_0_BLOCK
        blocks = np.empty((nblocks, Q8_0_BLOCK_BYTES), dtype=np.uint8)
        blocks[:, 2:] = rng.integers(-127, 128, size=(nblocks, Q8_0_BLOCK), dtype=np.int8).view(np.uint8)
        # uniform int8 has std ~73: scale so weights have std 1/sqrt(fan_in)
        d = np.float16(1.0 / (73.0 * math.sqrt(fan_in)))
        blocks[:, :2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
        return blocks.reshape(-1)

    def f32(*numpy_shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(numpy_shape, dtype=np.float32) * scale).astype(np.float32)

    expert_values = e * f * h
    expert_blocks = q8(expert_values, h)  # shared by every expert tensor of every layer

    w = gguf.GGUFWriter(str(path), "minimax-m2")
    arch = "minimax-m2"
    w.add_uint32(f"{arch}.context_length", 8192)
    w.add_uint32(f"{arch}.embedding_length", h)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.feed_forward_length", f)
    w.add_uint32(f"{arch}.expert_feed_forward_length", f)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", heads)
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{arch}.expert_count", e)
    w.add_uint32(f"{arch}.expert_used_count", k)
    w.add_uint32(f"{arch}.expert_gating_func", 2)  # sigmoid, as MiniMax-M2
    w.add_uint32(f"{arch}.rope.dimension_count", 64)
    w.add_float32(f"{arch}.rope.freq_base", 5_000_000.0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "minimax-m2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [1] * (vocab - 1) + [3])
    w.add_array("tokenizer.ggml.merges", ["Ġ Ġ"])
    w.add_uint32("tokenizer.ggml.bos_token_id", vocab - 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab - 1)
    w.add_bool("tokenizer.ggml.add_bos_token", False)

    q8_t = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", f32(vocab, h, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    w.add_tensor("output.weight", f32(vocab, h, scale=1.0 / math.sqrt(h)))
    qd = heads * head_dim
    other = 0
    for layer in range(layers):
        b = f"blk.{layer}."
        small = {
            "attn_norm.weight": np.ones(h, dtype=np.float32),
            "ffn_norm.weight": np.ones(h, dtype=np.float32),
            "attn_q_norm.weight": np.ones(qd, dtype=np.float32),
            "attn_k_norm.weight": np.ones(qd, dtype=np.float32),
            "ffn_gate_inp.weight": f32(e, h, scale=1.0 / math.sqrt(h)),
            "exp_probs_b.bias": np.zeros(e, dtype=np.float32),
        }
        for name, arr in small.items():
            w.add_tensor(b + name, arr)
        for name, rows, cols in (("attn_q", qd, h), ("attn_k", qd, h), ("attn_v", qd, h), ("attn_output", h, qd)):
            arr = q8(rows * cols, cols)
            w.add_tensor(b + name + ".weight", arr.reshape(rows, cols // Q8_0_BLOCK * Q8_0_BLOCK_BYTES), raw_dtype=q8_t)
            other += arr.nbytes
        other += sum(a.nbytes for a in small.values())
        # numpy order is GGML's reversed: gate/up [X, F, E], down [X, E, F]
        w.add_tensor(b + "ffn_gate_exps.weight", expert_blocks.reshape(e, f, h // Q8_0_BLOCK * Q8_0_BLOCK_BYTES), raw_dtype=q8_t)
        w.add_tensor(b + "ffn_up_exps.weight", expert_blocks.reshape(e, f, h // Q8_0_BLOCK * Q8_0_BLOCK_BYTES), raw_dtype=q8_t)
        w.add_tensor(b + "ffn_down_exps.weight", expert_blocks.reshape(e, h, f // Q8_0_BLOCK * Q8_0_BLOCK_BYTES), raw_dtype=q8_t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GgufInfo(
        path=str(path),
        layers=layers,
        vocab=vocab,
        attention_heads=heads,
        head_dim=head_dim,
        expert_bytes_per_layer=3 * expert_blocks.nbytes,
        other_bytes_per_layer=other // layers,
        file_bytes=Path(path).stat().st_size,
        write_s=time.perf_counter() - t_start,
    )


def _llamacpp_child(p: dict[str, Any]) -> dict[str, Any]:
    """One thread count: start llama.cpp in this process, time prompts and decodes in-process."""
    try:
        import xllamacpp as xl
    except ImportError as exc:
        raise MissingDependency("xllamacpp", "pip install xllamacpp") from exc

    threads = int(p["threads"])
    params = xl.CommonParams()
    params.model.path = p["gguf"]
    params.n_ctx = int(p["n_ctx"])
    params.n_parallel = 1
    params.n_gpu_layers = 0
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.warmup = True
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    t0 = time.perf_counter()
    srv = xl.Server(params)
    load_s = time.perf_counter() - t0
    vocab = int(p["vocab"])
    rnd = random.Random(7)

    def complete(n_prompt: int, n_predict: int) -> dict[str, Any]:
        # Random token ids: no prefix is shared with an earlier request, and cache_prompt is off.
        prompt = [rnd.randrange(0, vocab - 1) for _ in range(n_prompt)]
        req = {"prompt": prompt, "n_predict": n_predict, "cache_prompt": False, "ignore_eos": True, "temperature": 0.0, "stream": False}
        reply = srv.handle_completions(req)
        if isinstance(reply, (str, bytes)):
            reply = json.loads(reply)
        if "timings" not in reply:
            raise RuntimeError(f"llama.cpp reply without timings: {str(reply)[:500]}")
        return reply["timings"]

    complete(16, 2)  # warm-up
    out: dict[str, Any] = {"threads": threads, "load_s": load_s, "system_info": xl.get_system_info(), "prefill": [], "decode": []}
    out["n_batch"], out["n_ubatch"] = params.n_batch, params.n_ubatch
    for n in p["prompt_tokens"]:
        runs = [complete(n, 1) for _ in range(p["repeats"])]
        out["prefill"].append({"tokens": n, "timings": runs})
    runs = [complete(p["decode_prompt"], p["decode_tokens"]) for _ in range(p["repeats"])]
    out["decode"].append({"tokens": p["decode_tokens"], "prompt": p["decode_prompt"], "timings": runs})
    return out


def _default_scratch(nbytes: int) -> str:
    """A folder with room for the GGUF: /dev/shm (RAM, where llama.cpp maps it anyway) if it fits."""
    for cand in ("/dev/shm", tempfile.gettempdir()):
        try:
            st = os.statvfs(cand)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize > nbytes * 1.2 + 2e9:
            return cand
    raise UserError(f"no folder with {nbytes / 1e9:.1f} GB free for the benchmark GGUF: free disk space or pass a smaller --layers")


def run_llamacpp(
    threads: Sequence[int],
    out: str | os.PathLike,
    shape: str = "m2.1",
    layers: Optional[int] = None,
    repeats: int = 2,
    scratch: Optional[str] = None,
    env_extra: Optional[dict[str, Any]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[dict[str, Any]]:
    """The MoE layer in llama.cpp (Q8_0, CPU only): prefill and decode per layer, per thread count."""
    threads = check_threads(threads)
    sh = layer_shape(shape, layers)
    if repeats < 1:
        raise UserError("--repeats must be at least 1")
    n_layers = sh.llamacpp_layers
    expected = n_layers * 3 * sh.experts * sh.hidden * sh.intermediate * Q8_0_BLOCK_BYTES // Q8_0_BLOCK
    folder = Path(tempfile.mkdtemp(prefix="ktutorial-q8-", dir=scratch or _default_scratch(expected)))
    gguf_path = folder / f"random-minimax-m2-{sh.name}-{n_layers}l-q8_0.gguf"
    env = results.environment_stamp(engine="llamacpp", model=f"random minimax-m2 Q8_0 ({sh.name} layer shape)", extra=_env_extra(env_extra))
    records: list[dict[str, Any]] = []
    try:
        if progress:
            progress(f"writing a {expected / 1e9:.1f} GB Q8_0 GGUF")
        info = write_random_q8_gguf(gguf_path, sh, n_layers)
        max_prompt = max(sh.llamacpp_prompt_tokens)
        for t in threads:
            if progress:
                progress(f"llama.cpp, {t} threads")
            params = {
                "gguf": str(gguf_path),
                "threads": t,
                "n_ctx": max_prompt + 256,
                "vocab": info.vocab,
                "prompt_tokens": list(sh.llamacpp_prompt_tokens),
                "decode_prompt": 16,
                "decode_tokens": sh.llamacpp_decode_tokens,
                "repeats": repeats,
            }
            try:
                res = _run_child("llamacpp", params, folder)
            except RuntimeError as exc:
                rec = results.make_record(KIND_FAILURE, {"part": "llamacpp", "threads": t, "shape": sh.name}, {"error": str(exc)[-2000:]}, env=env)
                results.append_record(out, rec)
                records.append(rec)
                continue
            for rec in _llamacpp_records(sh, info, res, env, results.make_record):
                results.append_record(out, rec)
                records.append(rec)
    finally:
        for f in folder.glob("*"):
            f.unlink()
        folder.rmdir()
    return records


def _llamacpp_records(sh: LayerShape, info: GgufInfo, res: dict[str, Any], env, make_record) -> list[dict]:
    recs = []
    share = info.other_bytes_per_layer / (info.other_bytes_per_layer + sh.top_k * info.expert_bytes_per_layer / sh.experts)
    base = {
        "shape": sh.name,
        "experts": sh.experts,
        "hidden": sh.hidden,
        "intermediate": sh.intermediate,
        "top_k": sh.top_k,
        "layers": info.layers,
        "threads": res["threads"],
        "weights": "Q8_0 random",
        "attention": f"{info.attention_heads} head x {info.head_dim} (shrunk so the layer is its MoE)",
        "n_batch": res["n_batch"],
        "n_ubatch": res["n_ubatch"],
        "gguf_gb": info.file_bytes / 1e9,
        "system_info": res["system_info"],
    }
    for phase in ("prefill", "decode"):
        for run in res[phase]:
            if phase == "prefill":
                ms = [t["prompt_ms"] for t in run["timings"]]
                n = [t["prompt_n"] for t in run["timings"]]
            else:
                ms = [t["predicted_ms"] for t in run["timings"]]
                n = [t["predicted_n"] for t in run["timings"]]
            per_tok_layer_ms = [m / max(1, k) / info.layers for m, k in zip(ms, n)]
            med = statistics.median(per_tok_layer_ms)
            tok_s_layer = 1e3 / med
            metrics = {
                "per_token_ms_per_layer": med,
                "tok_s_per_layer": tok_s_layer,
                f"tok_s_{sh.model_layers}_layers": tok_s_layer / sh.model_layers,
                "tokens_timed": statistics.median(n),
                "non_moe_byte_share_decode": share,
                "n": len(ms),
            }
            if phase == "decode":
                streamed = sh.top_k * info.expert_bytes_per_layer / sh.experts
                metrics["expert_gb_s"] = streamed / (med / 1e3) / 1e9
            else:
                metrics["tflop_s"] = sh.flops(1) / (med / 1e3) / 1e12
            params = dict(base, phase=phase, tokens=run["tokens"])
            if phase == "decode":
                params["prompt_tokens"] = run["prompt"]
            recs.append(
                make_record(
                    KIND_LLAMACPP,
                    params,
                    metrics,
                    {"per_token_ms_per_layer": per_tok_layer_ms, "server_timings": run["timings"]},
                    env=env,
                )
            )
    return recs


# ---------------------------------------------------------------------------------------------
# hybrid: N experts on the GPU, the rest on the CPU through kt-kernel, at once


def zipf_probs(experts: int, s: float = 1.0, seed: int = 0):
    """Skewed expert popularity: p ∝ 1/rank^s over a random permutation of the experts."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ranks = torch.empty(experts)
    ranks[torch.randperm(experts, generator=g)] = torch.arange(1, experts + 1, dtype=torch.float32)
    p = ranks.pow(-s)
    return p / p.sum()


class GpuExperts:
    """The GPU side: every expert dequantized to bf16 once; a forward runs the masked ones.

    One grouped loop over the active GPU experts (gather tokens, gate+up GEMM, SiLU, down GEMM,
    scatter-add). SGLang runs FP8 block GEMMs in fused kernels; bf16 moves twice the bytes, so the
    GPU side here is an upper bound on what the real split pays.
    """

    def __init__(self, experts: Fp8Experts, device: str):
        import torch

        self.device = device
        e = experts.gate.shape[0]
        w13, w2 = [], []
        for i in range(e):
            w1, w3, d = experts.dequantized(i, device)
            w13.append(torch.cat([w1, w3], 0).to(torch.bfloat16))
            w2.append(d.to(torch.bfloat16))
        self.w13 = torch.stack(w13)
        self.w2 = torch.stack(w2)
        self.inter = experts.gate.shape[1]

    def forward(self, x, ids_cpu, weights, on_gpu: set, out):
        """Add the GPU experts' part to `out` ([T, H] on the device). ids_cpu routes on the host.

        Tokens are grouped by expert on the host (the routing is there anyway for kt-kernel), so
        the loop launches GPU work without a device sync per expert.
        """
        import torch

        k = ids_cpu.shape[1]
        flat = ids_cpu.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.w13.shape[0]).tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        active = [e for e in range(len(counts)) if counts[e] and e in on_gpu]
        if not active:
            return out
        order_dev = order.to(self.device, non_blocking=True)
        rows_all, cols_all = order_dev // k, order_dev % k
        for e in active:
            rows = rows_all[starts[e] : starts[e + 1]]
            cols = cols_all[starts[e] : starts[e + 1]]
            xe = x[rows]
            gu = xe @ self.w13[e].T
            h = torch.nn.functional.silu(gu[:, : self.inter]) * gu[:, self.inter :]
            y = h @ self.w2[e].T
            out.index_add_(0, rows, (y.float() * weights[rows, cols].unsqueeze(1)).to(out.dtype))
        return out


def _hybrid_child(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    shape = LayerShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["shape"].items()})
    threads = int(p["threads"])
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"  # without a GPU, torch on the CPU stands in for it

    def dev_sync():
        if cuda:
            torch.cuda.synchronize()

    torch.set_num_threads(os.cpu_count() or 1)
    src = Fp8Experts.random(shape, seed=p.get("seed", 0))
    gpu = GpuExperts(src, device)
    kt = KtLayers(src, shape, shape.hybrid_layers, threads, max(shape.hybrid_prefill_tokens, 4))
    # The torch side on the host (only the stand-in case) shares the cores with kt: one thread.
    torch.set_num_threads(1 if not cuda else 2)
    g = torch.Generator().manual_seed(99)
    result: dict[str, Any] = {
        "threads": threads,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (stand-in, no GPU)",
        "variant": kt.variant,
        "kernel_class": kt.kernel_class,
        "mask_probe": mask_probe(kt, src, shape),
        "runs": [],
    }
    pin = cuda

    def step(layer, x_dev, ids_dev, w_dev, on_gpu, gpu_flag, mode, bufs):
        """One MoE layer forward as KT runs it; returns (total, cpu part, gpu part) seconds."""
        x_cpu, ids_cpu, w_cpu, out_cpu, kt_ids = bufs
        dev_sync()
        t0 = time.perf_counter()
        # hidden states and routing leave the GPU for the CPU experts (pinned buffers)
        x_cpu.copy_(x_dev, non_blocking=True)
        ids_cpu.copy_(ids_dev, non_blocking=True)
        w_cpu.copy_(w_dev, non_blocking=True)
        dev_sync()
        t_cpu0 = time.perf_counter()
        if mode != "gpu_only":
            # GPU-resident experts reach kt-kernel as id -1, which it skips
            torch.where(gpu_flag[ids_cpu], torch.full_like(ids_cpu, -1), ids_cpu, out=kt_ids)
            kt.submit(layer, x_cpu, kt_ids, w_cpu, out_cpu)
        out_dev = torch.zeros(x_dev.shape, dtype=torch.bfloat16, device=device)
        t_gpu0 = time.perf_counter()
        if mode != "cpu_only":
            gpu.forward(x_dev, ids_cpu, w_dev, on_gpu, out_dev)
            dev_sync()
        t_gpu = time.perf_counter() - t_gpu0
        if mode != "gpu_only":
            kt.sync()
        t_cpu = time.perf_counter() - t_cpu0
        if mode != "gpu_only":
            out_dev += out_cpu.to(device, non_blocking=True)
        dev_sync()
        return time.perf_counter() - t0, t_cpu, t_gpu, out_dev

    for routing in p["routings"]:
        probs = None if routing == "random" else zipf_probs(shape.experts, p.get("zipf_s", 1.0), seed=5)
        # Placement: the hottest experts go to the GPU (for uniform routing any N are as hot).
        order = torch.argsort(probs, descending=True).tolist() if probs is not None else list(range(shape.experts))
        for n_gpu in p["gpu_experts"]:
            on_gpu = set(order[:n_gpu])
            gpu_flag = torch.zeros(shape.experts, dtype=torch.bool)
            gpu_flag[order[:n_gpu]] = True
            # correctness: hybrid output of a few tokens against the float32 reference
            xc = torch.randn(4, shape.hidden, generator=g).to(torch.bfloat16)
            idc, wc = random_routing(4, shape.experts, shape.top_k, g, probs)
            bufs = _pinned_bufs(4, shape, pin)
            _, _, _, outc = step(0, xc.to(device), idc.to(device), wc.to(device), on_gpu, gpu_flag, "hybrid", bufs)
            ref = reference_moe(src, xc, idc, wc)
            check = rel_err(outc, ref)
            for tokens, calls in ((1, p["decode_calls"]), (shape.hybrid_prefill_tokens, p["prefill_calls"])):
                bufs = _pinned_bufs(tokens, shape, pin)
                x = torch.randn(tokens, shape.hidden, generator=g).to(torch.bfloat16).to(device)
                routes = [random_routing(tokens, shape.experts, shape.top_k, g, probs) for _ in range(calls + 1)]
                routes = [(i.to(device), w.to(device)) for i, w in routes]
                coverage = float(sum(torch.isin(i.cpu(), torch.tensor(sorted(on_gpu) or [-1])).float().mean() for i, _ in routes) / len(routes))
                samples: dict[str, list[float]] = {"latency_ms": [], "gpu_ms": [], "cpu_ms": [], "cpu_wait_ms": []}
                for mode, key in (("hybrid", "latency_ms"), ("gpu_only", "gpu_ms"), ("cpu_only", "cpu_ms")):
                    reps = calls if mode == "hybrid" else max(1, calls // 2 if tokens > 1 else calls)
                    if (mode == "gpu_only" and n_gpu == 0) or (mode == "cpu_only" and n_gpu == shape.experts):
                        samples[key] = [0.0]
                        continue
                    for n, (ids, w) in enumerate(routes[: reps + 1]):
                        total, t_cpu, t_gpu, _ = step(n % shape.hybrid_layers, x, ids, w, on_gpu, gpu_flag, mode, bufs)
                        if n == 0:
                            continue  # warm-up
                        samples[key].append(total * 1e3)
                        if mode == "hybrid":
                            samples["cpu_wait_ms"].append(t_cpu * 1e3)
                result["runs"].append(
                    {"routing": routing, "n_gpu_experts": n_gpu, "tokens": tokens, "coverage": coverage, "rel_err": check, "samples": samples}
                )
    return result


def mask_probe(kt: KtLayers, src: Fp8Experts, shape: LayerShape, tokens: int = 4) -> dict[str, Any]:
    """Three ways to keep experts 0-7 off the CPU, each against a float32 reference without them.

    mask set before load, mask changed in place after load, ids passed as -1. A rel_err near the
    unmasked one means the way works; near 1 or above means kt-kernel computed the experts anyway.
    """
    import torch

    g = torch.Generator().manual_seed(7)
    pool = min(16, shape.experts)
    skip = set(range(min(8, pool // 2)))
    x = torch.randn(tokens, shape.hidden, generator=g).to(torch.bfloat16)
    ids, w = random_routing(tokens, pool, shape.top_k, g)
    out = torch.empty(tokens, shape.hidden, dtype=torch.bfloat16)
    ref_all = reference_moe(src, x, ids, w)
    ref_skip = reference_moe(src, x, ids, w, skip=skip)
    res: dict[str, Any] = {"skipped_experts": sorted(skip), "tokens": tokens}
    res["unmasked_rel_err"] = rel_err(kt.forward(0, x, ids, w, out), ref_all)
    minus = torch.where(torch.isin(ids, torch.tensor(sorted(skip))), torch.full_like(ids, -1), ids)
    res["minus_one_ids_rel_err"] = rel_err(kt.forward(0, x, minus, w, out), ref_skip)
    kt.mask[sorted(skip)] = True
    try:
        res["mask_in_place_rel_err"] = rel_err(kt.forward(0, x, ids, w, out), ref_skip)
    finally:
        kt.mask.zero_()
    preset = torch.zeros(shape.experts, dtype=torch.bool)
    preset[sorted(skip)] = True
    layer = kt.add_layer(src, shape, preset)
    res["mask_before_load_rel_err"] = rel_err(kt.forward(layer, x, ids, w, out), ref_skip)
    kt.moes.pop()  # frees that layer's copy of the weights
    kt._keep.pop()
    return res


def _pinned_bufs(tokens: int, shape: LayerShape, pin: bool):
    import torch

    def z(shape_, dtype):
        return torch.zeros(shape_, dtype=dtype, pin_memory=pin)

    return (
        z((tokens, shape.hidden), torch.bfloat16),
        z((tokens, shape.top_k), torch.int64),
        z((tokens, shape.top_k), torch.float32),
        z((tokens, shape.hidden), torch.bfloat16),
        z((tokens, shape.top_k), torch.int64),
    )


def run_hybrid(
    out: str | os.PathLike,
    threads: int,
    shape: str = "m2.1",
    gpu_experts: Optional[Sequence[int]] = None,
    routings: Sequence[str] = ("random", "skewed"),
    decode_calls: int = 30,
    prefill_calls: int = 3,
    zipf_s: float = 1.0,
    env_extra: Optional[dict[str, Any]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[dict[str, Any]]:
    """One MoE layer split between GPU (torch) and CPU (kt-kernel), latency against N GPU experts."""
    sh = layer_shape(shape)
    (threads,) = check_threads([threads])
    if gpu_experts is None:  # CPU-only end, powers of two, GPU-only end: 0, 8, 16, ..., 256
        gpu_experts = [0] + [n for n in (8, 16, 32, 64, 128) if n < sh.experts] + [sh.experts]
    bad = [n for n in gpu_experts if n > sh.experts]
    if bad:
        raise UserError(f"--gpu-experts {bad} exceed the layer's {sh.experts} experts")
    for r in routings:
        if r not in ("random", "skewed"):
            raise UserError(f"--routing {r!r}: use random and/or skewed")
    env = results.environment_stamp(engine="kt-kernel", extra=_env_extra(env_extra))
    if progress:
        progress(f"hybrid layer, {threads} CPU threads")
    params = {
        "shape": asdict(sh),
        "threads": threads,
        "gpu_experts": list(gpu_experts),
        "routings": list(routings),
        "decode_calls": decode_calls,
        "prefill_calls": prefill_calls,
        "zipf_s": zipf_s,
    }
    log_dir = Path(tempfile.mkdtemp(prefix="ktutorial-hybrid-"))
    res = _run_child("hybrid", params, log_dir)
    env = dict(env, kt_kernel_variant=res["variant"])
    records = []
    probe = res["mask_probe"]
    rec = results.make_record(
        KIND_MASK_PROBE,
        {"shape": sh.name, "threads": threads, "kernel_class": res["kernel_class"], "skipped_experts": probe["skipped_experts"], "tokens": probe["tokens"]},
        {k: v for k, v in probe.items() if k.endswith("rel_err")},
        env=env,
    )
    results.append_record(out, rec)
    records.append(rec)
    for run in res["runs"]:
        s = run["samples"]
        m = _summary_ms([v / 1e3 for v in s["latency_ms"]])
        metrics = {
            **m,
            "gpu_ms": statistics.median(s["gpu_ms"]),
            "cpu_ms": statistics.median(s["cpu_ms"]),
            "cpu_wait_ms": statistics.median(s["cpu_wait_ms"]) if s["cpu_wait_ms"] else None,
            "gpu_coverage": run["coverage"],
            "rel_err": run["rel_err"],
        }
        rec = results.make_record(
            KIND_HYBRID,
            {
                "n_gpu_experts": run["n_gpu_experts"],
                "routing": run["routing"],
                "zipf_s": zipf_s if run["routing"] == "skewed" else None,
                "placement": "hottest experts on the GPU",
                "tokens": run["tokens"],
                "threads": threads,
                "shape": sh.name,
                "experts": sh.experts,
                "hidden": sh.hidden,
                "intermediate": sh.intermediate,
                "top_k": sh.top_k,
                "layers_in_ram": sh.hybrid_layers,
                "gpu": res["device"],
                "gpu_weights": "bf16, dequantized from the FP8 experts; one torch GEMM loop over active experts",
                "cpu_weights": "FP8 via kt-kernel " + res["kernel_class"],
                "cpu_exclusion": "GPU experts passed to kt-kernel as id -1",
                "timing": "latency_ms: D2H of inputs, kt submit, GPU experts, GPU sync, kt sync, H2D + add; gpu_ms and cpu_ms: each side alone, same path",
            },
            metrics,
            s,
            env=env,
        )
        results.append_record(out, rec)
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# entry point of the child processes


def _main(argv: Sequence[str]) -> int:
    role, params_path, result_path = argv
    p = json.loads(Path(params_path).read_text())
    fn = {"kt": _kt_child, "llamacpp": _llamacpp_child, "hybrid": _hybrid_child}[role]
    res = fn(p)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(result_path)
    sys.stdout.flush()
    # llama.cpp's and kt-kernel's threads can make interpreter shutdown slow or hang: the result
    # is on disk, leave at once.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
