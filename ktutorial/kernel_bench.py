"""Kernel microbenchmarks at MiniMax-M2.1 layer shape (256 experts, 3072 x 1536, top 8).

Three measurements, each written as self-describing records (`results.py`):

- `run_kt_kernel`: kt-kernel's FP8 MoE on the CPU with random FP8 weights in several layers
  (more than any cache holds), decode (1 and 4 tokens) and prefill chunks, beside the host's
  copy bandwidth measured in the same run at the same thread count. One child process per thread
  count: kt-kernel's CPU thread pool is one per process.
- `run_llamacpp`: the same layer shape in llama.cpp (xllamacpp), a random `minimax-m2` GGUF at
  Q8_0 with a few full-size MoE layers, CPU only, same thread counts.
- `run_hybrid`: one layer split as KT splits it: N experts on the GPU (SGLang's fused FP8 MoE
  where sglang imports, else torch's grouped GEMM: `gpu_moe.py`), the rest on the CPU through
  kt-kernel, both running at once (kt submit, GPU half, kt sync); beside the GPU's own ceilings,
  so each point carries its GPU roofline and how well the two halves overlap.

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

from ktutorial import gpu_moe, results
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
KIND_HYBRID_SUMMARY = "hybrid_summary"
KIND_GPU_CEILINGS = "gpu_ceilings"
KIND_GPU_PROBE = "gpu_half_probe"
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


class _HybridStep:
    """One MoE layer forward as SGLang-KT runs it, on fixed buffers for one token count.

    The step: inputs leave the GPU for pinned host memory, kt-kernel is submitted with the GPU
    experts as -1, the GPU half runs (remapped ids, the chosen kernel; replayed from a CUDA graph
    when captured), kt-kernel is synced, its output goes back to the GPU and is added. A side with
    no experts (N = 0 or N = all) is left out, as the engine leaves it.
    """

    def __init__(self, kt: "KtLayers", halves: list, gpu_mask, tokens: int, shape: LayerShape, device: str, graph: bool):
        import torch

        self.kt, self.halves, self.device = kt, halves, device
        self.cuda = str(device).startswith("cuda")
        self.gpu_mask = gpu_mask
        self.run_gpu = bool(halves)
        self.run_cpu = int(gpu_mask.sum()) < shape.experts
        h, k = shape.hidden, shape.top_k
        self.x = torch.zeros(tokens, h, dtype=torch.bfloat16, device=device)
        self.ids = torch.zeros(tokens, k, dtype=torch.int64, device=device)
        self.w = torch.full((tokens, k), 1.0 / k, dtype=torch.float32, device=device)
        pin = self.cuda

        def host(shape_, dtype):
            return torch.zeros(shape_, dtype=dtype, pin_memory=pin)

        self.x_cpu, self.ids_cpu, self.w_cpu = host((tokens, h), torch.bfloat16), host((tokens, k), torch.int64), host((tokens, k), torch.float32)
        self.kt_ids, self.out_cpu = host((tokens, k), torch.int64), host((tokens, h), torch.bfloat16)
        self.out_dev = torch.zeros(tokens, h, dtype=torch.bfloat16, device=device)
        self.graphs: list = []
        self.graph_error: Optional[str] = None
        if graph and self.run_gpu and self.cuda:
            try:
                self.graphs = [gpu_moe.GraphedHalf(half, self.x, self.ids, self.w) for half in halves]
            except Exception as exc:  # noqa: BLE001  (recorded; the eager path is timed instead)
                self.graph_error = f"{type(exc).__name__}: {exc}"[:500]
                self.graphs = []
                torch.cuda.synchronize()

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def load(self, x, ids, w) -> None:
        """Place one call's inputs in the step's buffers (the layer before would have written them)."""
        self.x.copy_(x)
        self.ids.copy_(ids)
        self.w.copy_(w)

    def gpu(self, layer: int, eager: bool = False):
        if self.graphs and not eager:
            return self.graphs[layer]()
        return self.halves[layer](self.x, self.ids, self.w)

    def to_host(self) -> None:
        """Inputs to pinned host memory, and kt-kernel's ids with the GPU experts as -1."""
        self.x_cpu.copy_(self.x, non_blocking=True)
        self.ids_cpu.copy_(self.ids, non_blocking=True)
        self.w_cpu.copy_(self.w, non_blocking=True)
        self.sync()
        gpu_moe.split_for_cpu(self.ids_cpu, self.gpu_mask, out=self.kt_ids)

    def cpu(self, layer: int) -> None:
        self.kt.forward(layer, self.x_cpu, self.kt_ids, self.w_cpu, self.out_cpu)

    def layer(self, layer: int):
        """(total s, GPU half s inside the layer, CPU wait s after the GPU launch, output)."""
        import torch

        self.sync()
        t0 = time.perf_counter()
        if self.run_cpu:
            self.to_host()
            self.kt.submit(layer, self.x_cpu, self.kt_ids, self.w_cpu, self.out_cpu)
        out_gpu, gpu_s = None, 0.0
        if self.run_gpu:
            if self.cuda:
                ev_a, ev_b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev_a.record()
                out_gpu = self.gpu(layer)
                ev_b.record()
            else:
                t_g = time.perf_counter()
                out_gpu = self.gpu(layer)
                gpu_s = time.perf_counter() - t_g
        t_launched = time.perf_counter()
        wait_s = 0.0
        if self.run_cpu:
            self.kt.sync()
            wait_s = time.perf_counter() - t_launched
            self.out_dev.copy_(self.out_cpu, non_blocking=True)
            out = self.out_dev.add_(out_gpu) if out_gpu is not None else self.out_dev
        else:
            out = out_gpu
        self.sync()
        total = time.perf_counter() - t0
        if self.run_gpu and self.cuda:
            gpu_s = ev_a.elapsed_time(ev_b) / 1e3
        return total, gpu_s, wait_s, out


def _time_gpu_half(step: _HybridStep, routes_dev, layers: int, eager: bool = False) -> list[float]:
    """Seconds of the GPU half alone per call (CUDA events; the host clock for the CPU stand-in),
    the GPU idle at the start of each call as in a layer that waited on its inputs."""
    import torch

    out = []
    for n, (ids, w) in enumerate(routes_dev):
        step.ids.copy_(ids)
        step.w.copy_(w)
        step.sync()
        if step.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step.gpu(n % layers, eager)
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step.gpu(n % layers, eager)
            out.append(time.perf_counter() - t0)
    return out


def _check_rows(ids, gpu_mask, rows: int):
    """Up to `rows` token rows, those with the most GPU-routed experts first (a check on rows with
    no GPU expert compares zeros with zeros)."""
    import torch

    per_row = gpu_mask[ids].sum(dim=1)
    return torch.argsort(per_row, descending=True, stable=True)[:rows]


def _gpu_route(tokens: int, shape: LayerShape, gpu_mask, g, probs=None):
    """A routing with at least one GPU expert (for checks of the GPU half; tries a few draws)."""
    ids, w = random_routing(tokens, shape.experts, shape.top_k, g, probs)
    for _ in range(200):
        if bool(gpu_mask[ids].any()):
            break
        ids, w = random_routing(tokens, shape.experts, shape.top_k, g, probs)
    return ids, w


def _hybrid_child(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    shape = LayerShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["shape"].items()})
    threads = int(p["threads"])
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"  # without a GPU, the grouped GEMM on the CPU stands in for it
    kernel = gpu_moe.choose_kernel(device, p.get("gpu_kernel", "auto"))
    want_graph = cuda and bool(p.get("cuda_graph", True))
    L = shape.hybrid_layers

    torch.set_num_threads(os.cpu_count() or 1)
    src = Fp8Experts.random(shape, seed=p.get("seed", 0))
    kt = KtLayers(src, shape, L, threads, max(shape.hybrid_prefill_tokens, 4))
    # The torch side on the host (only the stand-in case) shares the cores with kt: one thread.
    torch.set_num_threads(1 if not cuda else 2)
    ceil = gpu_moe.measure_ceilings(
        device,
        copy_bytes=2 * 1024**3 if cuda else shape.bandwidth_bytes,
        matmul_n=8192 if cuda else 256,
        fp8=kernel.name == gpu_moe.KERNEL_FUSED,
    )
    rate, rate_kind = ceil.rate_for(kernel)
    bpe = kernel.bytes_per_expert(shape.hidden, shape.intermediate)
    full = gpu_moe.Fp8Layer.from_experts(src, device)  # every expert once on the device; each N packs its own
    g = torch.Generator().manual_seed(99)
    result: dict[str, Any] = {
        "threads": threads,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (stand-in, no GPU)",
        "variant": kt.variant,
        "kernel_class": kt.kernel_class,
        "gpu_kernel": kernel.name,
        "gpu_kernel_reason": kernel.reason,
        "gpu_weights": kernel.weight_format,
        "gpu_bytes_per_expert": bpe,
        "rate_kind": rate_kind,
        "ceilings": asdict(ceil),
        "mask_probe": mask_probe(kt, src, shape),
        "runs": [],
    }

    def reference(x, ids, w, skip=None):
        # float32 on the device (not tf32: torch's matmul default), from the FP8 source
        return reference_moe(src, x.to(device).float(), ids.to(device), w.to(device), skip=skip)

    for routing in p["routings"]:
        probs = None if routing == "random" else zipf_probs(shape.experts, p.get("zipf_s", 1.0), seed=5)
        # Placement: the hottest experts go to the GPU (for uniform routing any N are as hot).
        order = torch.argsort(probs, descending=True).tolist() if probs is not None else list(range(shape.experts))
        for n_gpu in p["gpu_experts"]:
            gpu_mask = torch.zeros(shape.experts, dtype=torch.bool)
            gpu_mask[order[:n_gpu]] = True
            halves = []
            if n_gpu:
                _, slot_to_logical = gpu_moe.gpu_slots(gpu_mask)
                # one packed copy per layer: a call never finds the previous call's experts in L2
                halves = [gpu_moe.GpuHalf(kernel, full.select(slot_to_logical), gpu_mask, device) for _ in range(L)]
            cpu_skip = ~gpu_mask

            # correctness of the whole layer: a few tokens, kt's output buffer poisoned first
            check = _HybridStep(kt, halves, gpu_mask, 4, shape, device, graph=False)
            xc = torch.randn(4, shape.hidden, generator=g).to(torch.bfloat16)
            idc, wc = random_routing(4, shape.experts, shape.top_k, g, probs)
            check.load(xc.to(device), idc.to(device), wc.to(device))
            check.out_cpu.fill_(float("nan"))
            check.out_dev.fill_(float("nan"))
            _, _, _, outc = check.layer(0)
            rel_layer = rel_err(outc, reference(xc, idc, wc))
            del check

            for tokens, calls in ((1, p["decode_calls"]), (shape.hybrid_prefill_tokens, p["prefill_calls"])):
                step = _HybridStep(kt, halves, gpu_mask, tokens, shape, device, graph=want_graph and tokens == 1)
                checks: dict[str, Optional[float]] = {}
                if step.run_gpu:
                    # the GPU half alone, on the path that is timed: its output poisoned first
                    # (a graph's output is its own buffer), rows with GPU experts compared
                    xg = torch.randn(tokens, shape.hidden, generator=g).to(torch.bfloat16)
                    idg, wg = _gpu_route(tokens, shape, gpu_mask, g, probs)
                    step.load(xg.to(device), idg.to(device), wg.to(device))
                    if step.graphs:
                        step.graphs[0].out.fill_(float("nan"))
                    outg = step.gpu(0).clone()
                    rows = _check_rows(idg, gpu_mask, 16)
                    checks["rel_err_gpu_half"] = rel_err(outg[rows.to(device)], reference(xg[rows], idg[rows], wg[rows], skip=cpu_skip))
                x = torch.randn(tokens, shape.hidden, generator=g).to(torch.bfloat16).to(device)
                routes = [random_routing(tokens, shape.experts, shape.top_k, g, probs) for _ in range(calls + 1)]
                routes_dev = [(i.to(device), w.to(device)) for i, w in routes]
                work = [gpu_moe.gpu_work(i, gpu_mask, shape.hidden, shape.intermediate, bpe) for i, _ in routes[1:]]
                coverage = statistics.fmean(float(gpu_mask[i].float().mean()) for i, _ in routes[1:])
                samples: dict[str, list[float]] = {k: [] for k in ("latency_ms", "gpu_in_layer_ms", "cpu_wait_ms", "gpu_ms", "gpu_ms_eager", "cpu_ms")}
                for n, (ids, w) in enumerate(routes_dev):  # the whole layer; call 0 warms up
                    step.load(x, ids, w)
                    total, gpu_s, wait_s, _ = step.layer(n % L)
                    if n:
                        samples["latency_ms"].append(total * 1e3)
                        samples["gpu_in_layer_ms"].append(gpu_s * 1e3)
                        samples["cpu_wait_ms"].append(wait_s * 1e3)
                if step.run_gpu:
                    samples["gpu_ms"] = [s * 1e3 for s in _time_gpu_half(step, routes_dev[1:], L)]
                    if step.graphs:  # what the same half costs without the graph
                        samples["gpu_ms_eager"] = [s * 1e3 for s in _time_gpu_half(step, routes_dev[1:], L, eager=True)]
                if step.run_cpu:
                    for n, (ids, w) in enumerate(routes_dev[1:]):
                        step.load(x, ids, w)
                        step.to_host()
                        t0 = time.perf_counter()
                        step.cpu(n % L)
                        samples["cpu_ms"].append((time.perf_counter() - t0) * 1e3)
                samples["gpu_roofline_ms"] = [
                    gpu_moe.roofline_ms(wk["weight_bytes"] + wk["activation_bytes"], wk["flops"], ceil.copy_gb_s, rate) for wk in work
                ]
                samples["gpu_unique_experts"] = [wk["unique_experts"] for wk in work]
                samples["gpu_routed_rows"] = [wk["routed_rows"] for wk in work]
                result["runs"].append(
                    {
                        "routing": routing,
                        "n_gpu_experts": n_gpu,
                        "tokens": tokens,
                        "coverage": coverage,
                        "rel_err": rel_layer,
                        **checks,
                        "cuda_graph": bool(step.graphs),
                        "cuda_graph_error": step.graph_error,
                        "gpu_weight_bytes_mean": statistics.fmean(wk["weight_bytes"] for wk in work),
                        "gpu_flops_mean": statistics.fmean(wk["flops"] for wk in work),
                        "samples": samples,
                    }
                )
                del step
            del halves
            if cuda:
                torch.cuda.empty_cache()
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


def _finite(v: Any) -> Any:
    """A record holds null, not inf or NaN, for a number that is missing or broken."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _spread(values: Sequence[float], name: str) -> dict[str, Any]:
    """median, mean, p10, p90, stdev of `values` under `name`, `name_mean`, ..."""
    if not values:
        return {name: 0.0, f"{name}_mean": 0.0, f"{name}_p10": 0.0, f"{name}_p90": 0.0}
    s = _summary_ms([v / 1e3 for v in values])
    return {name: s["latency_ms"], f"{name}_mean": s["latency_ms_mean"], f"{name}_p10": s["latency_ms_p10"], f"{name}_p90": s["latency_ms_p90"]}


def monotone_within_spread(points: Sequence[dict[str, Any]]) -> tuple[bool, list[dict[str, Any]]]:
    """Does latency not grow with N, within the spread of the points? (ok, breaks).

    points: {n_gpu_experts, latency_ms, latency_ms_p10, latency_ms_p90}. More experts on the GPU
    take work off the slower CPU side, so the layer should not get slower. A break is a pair
    N_a < N_b whose later point lies wholly above the earlier one: p10(N_b) > p90(N_a). Every pair is
    compared, so a slow climb over several points that each overlap their neighbour still shows.
    """
    pts = sorted(points, key=lambda q: q["n_gpu_experts"])
    breaks = []
    for i, a in enumerate(pts):
        for b in pts[i + 1 :]:
            if b["latency_ms_p10"] > a["latency_ms_p90"]:
                breaks.append(
                    {
                        "from_n": a["n_gpu_experts"],
                        "to_n": b["n_gpu_experts"],
                        "from_latency_ms": a["latency_ms"],
                        "to_latency_ms": b["latency_ms"],
                        "from_p90_ms": a["latency_ms_p90"],
                        "to_p10_ms": b["latency_ms_p10"],
                    }
                )
    return not breaks, breaks


def hybrid_summaries(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (routing, tokens): the curve over N, whether it is monotone within its spread (and the
    points that break it), and how the points stand against the two targets (GPU half within 2x of
    its roofline, layer within 1.1x of its slower side)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["kind"] == KIND_HYBRID:
            groups.setdefault((r["params"]["routing"], r["params"]["tokens"]), []).append(r)
    out = []
    for (routing, tokens), recs in groups.items():
        recs = sorted(recs, key=lambda r: r["params"]["n_gpu_experts"])
        pts = [{"n_gpu_experts": r["params"]["n_gpu_experts"],
                **{k: r["metrics"][k] for k in ("latency_ms", "latency_ms_p10", "latency_ms_p90")}} for r in recs]
        ok, breaks = monotone_within_spread(pts)
        ratios = [r["metrics"]["gpu_over_roofline"] for r in recs if r["metrics"].get("gpu_over_roofline") is not None]
        overlaps = [r["metrics"]["overlap_ratio"] for r in recs if r["metrics"].get("overlap_ratio") is not None]
        first = recs[0]["params"]
        out.append(
            {
                "params": {
                    "routing": routing,
                    "tokens": tokens,
                    "gpu_kernel": first["gpu_kernel"],
                    "cuda_graph": any(r["params"]["cuda_graph"] for r in recs),
                    "threads": first["threads"],
                    "shape": first["shape"],
                    "expectation": "latency does not grow with N (each expert moved to the GPU leaves the slower CPU side)",
                    "test": "a break is N_a < N_b with p10(N_b) > p90(N_a), over every pair",
                },
                "metrics": {
                    "monotone_within_spread": ok,
                    "breaks": breaks,
                    "n_points": len(recs),
                    "n_gpu_experts": [q["n_gpu_experts"] for q in pts],
                    "latency_ms": [q["latency_ms"] for q in pts],
                    "gpu_over_roofline_max": max(ratios) if ratios else None,
                    "gpu_over_roofline_min": min(ratios) if ratios else None,
                    "points_gpu_within_2x_roofline": sum(1 for v in ratios if v <= 2.0),
                    "points_with_gpu_work": len(ratios),
                    "overlap_ratio_max": max(overlaps) if overlaps else None,
                    "points_overlap_within_1_1": sum(1 for v in overlaps if v <= 1.1),
                    "rel_err_max": max((r["metrics"]["rel_err"] for r in recs if r["metrics"]["rel_err"] is not None), default=None),
                    "checks_pass": all(r["metrics"]["checks_pass"] for r in recs),
                },
            }
        )
    return out


def _hybrid_record_parts(run: dict[str, Any], res: dict[str, Any], sh: LayerShape, zipf_s: float, threads: int):
    """(params, metrics, samples) of one hybrid_layer record from one run of the child."""
    s = run["samples"]
    n_gpu = run["n_gpu_experts"]
    metrics: dict[str, Any] = dict(_summary_ms([v / 1e3 for v in s["latency_ms"]]))
    metrics.update(_spread(s["gpu_ms"], "gpu_ms"))
    metrics.update(_spread(s["cpu_ms"], "cpu_ms"))
    metrics.update(_spread(s["gpu_in_layer_ms"], "gpu_in_layer_ms") if s["gpu_ms"] else {"gpu_in_layer_ms": 0.0})
    metrics["cpu_wait_ms"] = statistics.median(s["cpu_wait_ms"]) if s["cpu_ms"] else 0.0
    if s.get("gpu_ms_eager"):
        metrics.update(_spread(s["gpu_ms_eager"], "gpu_ms_eager"))
    roof = statistics.fmean(s["gpu_roofline_ms"]) if s["gpu_roofline_ms"] else 0.0
    # Mean over mean: at small N most decode calls route nothing to the GPU (a zero floor) while
    # the kernel still launches; the ratio of means charges that cost against the work there was.
    ratio = metrics["gpu_ms_mean"] / roof if s["gpu_ms"] and roof > 0 else None
    slower = max(metrics["gpu_ms"], metrics["cpu_ms"])
    limit = gpu_moe.REL_ERR_LIMIT[res["gpu_kernel"]]
    checked = [run["rel_err"]] + ([run["rel_err_gpu_half"]] if "rel_err_gpu_half" in run else [])
    metrics.update(
        {
            "gpu_roofline_ms": roof,
            "gpu_over_roofline": ratio,
            "overlap_ratio": metrics["latency_ms"] / slower if slower > 0 else None,
            "gpu_coverage": run["coverage"],
            "gpu_unique_experts": statistics.median(s["gpu_unique_experts"]) if n_gpu else 0,
            "gpu_weight_bytes": run["gpu_weight_bytes_mean"],
            "gpu_gflop": run["gpu_flops_mean"] / 1e9,
            "copy_gb_s": res["ceilings"]["copy_gb_s"],
            "matmul_tflop_s": res["ceilings"]["fp8_tflop_s" if res["rate_kind"] == "fp8" else "bf16_tflop_s"],
            "rel_err": run["rel_err"],
            "rel_err_gpu_half": run.get("rel_err_gpu_half"),
            "rel_err_limit": limit,
            "checks_pass": all(v is not None and math.isfinite(v) and v < limit for v in checked),
        }
    )
    metrics = {k: _finite(v) for k, v in metrics.items()}
    params = {
        "n_gpu_experts": n_gpu,
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
        "gpu_kernel": res["gpu_kernel"],
        "gpu_kernel_reason": res["gpu_kernel_reason"],
        "gpu_weights": res["gpu_weights"],
        "gpu_ids": "SGLang-KT's remap: CPU experts -1, GPU experts their slot among the N (increasing expert id)",
        "cuda_graph": run["cuda_graph"],
        "cuda_graph_error": run["cuda_graph_error"],
        "cpu_weights": "FP8 via kt-kernel " + res["kernel_class"],
        "cpu_exclusion": "GPU experts passed to kt-kernel as id -1",
        "timing": (
            "latency_ms: host clock over the layer (inputs to pinned memory, kt submit, GPU half, kt sync, "
            "result back and added, device synced); gpu_ms: the GPU half alone between CUDA events "
            "(graph replay where cuda_graph), GPU idle at the start; gpu_ms_eager: the same without the graph; "
            "cpu_ms: kt-kernel alone on host inputs; gpu_in_layer_ms: CUDA events around the GPU half inside the layer"
        ),
        "roofline": (
            f"per call max(weight bytes of the distinct GPU-routed experts ({res['gpu_bytes_per_expert']} B each) "
            f"+ x and output bytes, over copy_gb_s; GPU-routed rows x 6HI FLOPs over the {res['rate_kind']} matmul rate); "
            "gpu_roofline_ms is its mean over the calls, gpu_over_roofline = gpu_ms_mean / gpu_roofline_ms"
        ),
        "overlap": "overlap_ratio = latency_ms / max(gpu_ms, cpu_ms) (medians)",
    }
    return params, metrics, s


def run_hybrid(
    out: str | os.PathLike,
    threads: int,
    shape: str = "m2.1",
    gpu_experts: Optional[Sequence[int]] = None,
    routings: Sequence[str] = ("random", "skewed"),
    decode_calls: int = 50,
    prefill_calls: int = 3,
    zipf_s: float = 1.0,
    gpu_kernel: str = "auto",
    cuda_graph: bool = True,
    env_extra: Optional[dict[str, Any]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[dict[str, Any]]:
    """One MoE layer split between the GPU (SGLang's fused FP8 MoE, or torch's grouped GEMM) and
    the CPU (kt-kernel), latency against N GPU experts; records per point and per curve."""
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
    if gpu_kernel not in gpu_moe.KERNEL_CHOICES:
        raise UserError(f"--gpu-kernel {gpu_kernel!r}: use one of {', '.join(gpu_moe.KERNEL_CHOICES)}")
    if gpu_kernel == "fused":  # fail here, with the reason, rather than minutes later in the child
        import torch

        gpu_moe.choose_kernel("cuda" if torch.cuda.is_available() else "cpu", "fused")
    if decode_calls < 1 or prefill_calls < 1:
        raise UserError("--repeats and --prefill-repeats must be at least 1")
    env = results.environment_stamp(engine="kt-kernel", extra=_env_extra(env_extra))
    if progress:
        progress(f"hybrid layer, {threads} CPU threads, GPU kernel {gpu_kernel}")
    params = {
        "shape": asdict(sh),
        "threads": threads,
        "gpu_experts": list(gpu_experts),
        "routings": list(routings),
        "decode_calls": decode_calls,
        "prefill_calls": prefill_calls,
        "zipf_s": zipf_s,
        "gpu_kernel": gpu_kernel,
        "cuda_graph": cuda_graph,
    }
    log_dir = Path(tempfile.mkdtemp(prefix="ktutorial-hybrid-"))
    res = _run_child("hybrid", params, log_dir)
    env = dict(env, kt_kernel_variant=res["variant"])
    records = []

    def add(kind, p, m, s=None):
        rec = results.make_record(kind, p, m, s, env=env)
        results.append_record(out, rec)
        records.append(rec)

    probe = res["mask_probe"]
    add(
        KIND_MASK_PROBE,
        {"shape": sh.name, "threads": threads, "kernel_class": res["kernel_class"], "skipped_experts": probe["skipped_experts"], "tokens": probe["tokens"]},
        {k: _finite(v) for k, v in probe.items() if k.endswith("rel_err")},
    )
    c = res["ceilings"]
    add(
        KIND_GPU_CEILINGS,
        {"gpu": c["device"], "timer": c["timer"], "copy_bytes": c["copy_bytes"], "matmul_n": c["matmul_n"],
         "method": "device-to-device copy of random float32 (read + write counted); n x n x n matrix products on random data (bf16; FP8 by torch._scaled_mm)",
         "fp8_error": c["fp8_error"]},
        {"copy_gb_s": c["copy_gb_s"], "bf16_tflop_s": c["bf16_tflop_s"], "fp8_tflop_s": c["fp8_tflop_s"]},
        c["samples"],
    )  # fmt: skip
    for run in res["runs"]:
        add(KIND_HYBRID, *_hybrid_record_parts(run, res, sh, zipf_s, threads))
    for summary in hybrid_summaries(records):
        add(KIND_HYBRID_SUMMARY, summary["params"], summary["metrics"])
    return records


def probe_gpu_half(
    out: Optional[str | os.PathLike] = None,
    shape: str = "m2.1",
    gpu_kernel: str = "auto",
    gpu_experts: Optional[Sequence[int]] = None,
    calls: int = 20,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """A short look at the GPU half alone, before a full --hybrid run: which kernel imports and
    runs here, its error against the float32 reference, its time (eager and CUDA graph) against
    the roofline, for a few N at one decoded token and one prefill chunk. No kt-kernel. With
    `out`, appends a gpu_ceilings record and one gpu_half_probe record per row."""
    import torch

    sh = layer_shape(shape)
    gpu_experts = list(gpu_experts) if gpu_experts else [min(8, sh.experts), sh.experts]
    bad = [n for n in gpu_experts if not 0 < n <= sh.experts]
    if bad:
        raise UserError(f"--gpu-experts {bad}: the probe needs 1 to {sh.experts} GPU experts")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    kernel = gpu_moe.choose_kernel(device, gpu_kernel)
    if progress:
        progress(f"GPU half probe on {device}: {kernel.name} ({kernel.reason})")
    ceil = gpu_moe.measure_ceilings(device, 2 * 1024**3 if cuda else sh.bandwidth_bytes, 8192 if cuda else 256, kernel.name == gpu_moe.KERNEL_FUSED)
    rate, rate_kind = ceil.rate_for(kernel)
    bpe = kernel.bytes_per_expert(sh.hidden, sh.intermediate)
    src = Fp8Experts.random(sh, seed=0)
    full = gpu_moe.Fp8Layer.from_experts(src, device)
    timed = gpu_moe.timer(device)
    g = torch.Generator().manual_seed(5)
    rows_out = []
    for n_gpu in gpu_experts:
        mask = torch.zeros(sh.experts, dtype=torch.bool)
        mask[:n_gpu] = True
        _, s2l = gpu_moe.gpu_slots(mask)
        half = gpu_moe.GpuHalf(kernel, full.select(s2l), mask, device)
        for tokens in (1, sh.hybrid_prefill_tokens):
            if progress:
                progress(f"N={n_gpu}, {tokens} token(s)")
            x = torch.randn(tokens, sh.hidden, generator=g).to(torch.bfloat16)
            ids, w = _gpu_route(tokens, sh, mask, g)
            xd, idd, wd = x.to(device), ids.to(device), w.to(device)
            row: dict[str, Any] = {"n_gpu": n_gpu, "tokens": tokens}
            y = half(xd, idd, wd)
            rows = _check_rows(ids, mask, 16)
            row["rel_err"] = rel_err(y[rows.to(device)], reference_moe(src, x[rows].to(device).float(), ids[rows].to(device), w[rows].to(device), skip=~mask))
            wk = gpu_moe.gpu_work(ids, mask, sh.hidden, sh.intermediate, bpe)
            row["roofline_ms"] = gpu_moe.roofline_ms(wk["weight_bytes"] + wk["activation_bytes"], wk["flops"], ceil.copy_gb_s, rate)
            row["eager_ms"] = statistics.median(timed(lambda h=half, a=xd, b=idd, c=wd: h(a, b, c), calls)) * 1e3
            if cuda and tokens == 1:
                try:
                    graphed = gpu_moe.GraphedHalf(half, xd, idd, wd)
                    graphed.out.fill_(float("nan"))
                    row["graph_rel_err"] = rel_err(graphed()[rows.to(device)], reference_moe(
                        src, x[rows].to(device).float(), ids[rows].to(device), w[rows].to(device), skip=~mask))
                    row["graph_ms"] = statistics.median(timed(graphed, calls)) * 1e3
                except Exception as exc:  # noqa: BLE001  (what the full run would record)
                    row["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
            best = row.get("graph_ms", row["eager_ms"])
            row["over_roofline"] = best / row["roofline_ms"] if row["roofline_ms"] > 0 else None
            rows_out.append(row)
    probe = {
        "device": ceil.device,
        "gpu_kernel": kernel.name,
        "gpu_kernel_reason": kernel.reason,
        "rel_err_limit": gpu_moe.REL_ERR_LIMIT[kernel.name],
        "ceilings": {k: v for k, v in asdict(ceil).items() if k != "samples"},
        "rate_kind": rate_kind,
        "rows": rows_out,
    }
    if out is not None:
        env = results.environment_stamp(engine="sglang" if kernel.name == gpu_moe.KERNEL_FUSED else "torch", extra=_env_extra())
        c = probe["ceilings"]
        recs = [results.make_record(KIND_GPU_CEILINGS, {"gpu": c["device"], "timer": c["timer"], "copy_bytes": c["copy_bytes"],
                                                        "matmul_n": c["matmul_n"], "fp8_error": c["fp8_error"]},
                                    {k: c[k] for k in ("copy_gb_s", "bf16_tflop_s", "fp8_tflop_s")}, env=env)]
        for row in rows_out:
            params = {"shape": sh.name, "n_gpu_experts": row["n_gpu"], "tokens": row["tokens"], "gpu": ceil.device, "gpu_kernel": kernel.name,
                      "gpu_kernel_reason": kernel.reason, "rate_kind": rate_kind, "calls": calls}
            recs.append(results.make_record(KIND_GPU_PROBE, params, {k: _finite(v) for k, v in row.items() if k not in ("n_gpu", "tokens")}
                                            | {"rel_err_limit": probe["rel_err_limit"]}, env=env))
        for rec in recs:
            results.append_record(out, rec)
    return probe


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
