"""A performance model of SGLang + KT serving MiniMax-M2.1, fitted on our GPU host's records, that predicts the published table.

Pure: it reads no file but the records and tables its callers pass (by default the package's own
`data/perf_hardware.yaml`, `data/published.yaml` and `data/perfmodel_fit.json`), starts no process.

The model, per request of one prompt of `P` tokens and `O` output tokens (L = 62 layers,
E = one expert's bytes, 14.16 MB in FP8; S = one layer's 256 experts, 3.62 GB; k = 8 routed
experts a token; c = the share of routed experts that GPU experts cover, N / 256 under uniform
routing, a parameter):

Decode, seconds per token::

    t_decode = c_step + lm_head / (TP x B_gpu)
               + L x ( t_attn + max(t_cpu, t_gpu_experts) + c_layer )
    t_cpu          = k x E x (1 - c) / B_cpu              CPU experts (kt-kernel, TP rank 0 only)
    t_gpu_experts  = k x E x c / (TP x B_gpu)             GPU experts, overlapped with t_cpu
    t_attn         = (attention weights / TP + ctx x KV bytes a token a layer / min(TP, 8)) / B_gpu
    B_cpu          = min(threads x b_thread, eta x peak memory bandwidth)

`max`, not `+`: kt-kernel's CPU experts run while the GPU computes its own (the hybrid records,
and the engine's decode moving 0.9 ms where serial work would move 3.7 ms between 0 and 256 GPU
experts). Attention comes before the MoE in a layer and adds. Without CUDA graphs (our host's
bundle) the GPU side of a layer is launch-bound: at least the fitted `g` per layer.

Prefill, seconds to the first token: the prompt in chunks of `chunked_prefill_size`; a chunk of
`n` tokens after `p` earlier ones costs, per layer::

    GPU dense    2 n x attention params / (TP x FP8 peak) + 4 x heads x head_dim x n x (p + n/2) / (TP x BF16 peak)
    n >= threshold (layerwise):  S / (TP x rho x B_pcie) + 2 n k x 3 H I / (TP x FP8 peak)
    n <  threshold (CPU experts): max(2 n k x 3 H I x (1 - c) / F_cpu, GPU experts' share on the GPU)
    F_cpu = threads x f_thread (kt-kernel's prefill TFLOP/s per thread at that chunk size)

plus `c_prefill` once per request. GPU compute runs at the datasheet's dense peak (a lower bound
on its time: nothing on our host measures it, the H200 finishes it in milliseconds).

Fitted on the host (`fit`): b_thread and eta from kt_kernel_moe (decode, 1 token) and
host_bandwidth; f_thread from kt_kernel_moe (prefill chunks); c_step, g, c_prefill and rho from the
engine's bench records of the 2-layer M2.1-width checkpoint. With 2 layers the per-step and the
per-layer fixed costs cannot be told apart; the fit takes the engine's per-layer cost to be the
kernel's alone (c_layer = 0, the least that `per-layer cost >= kernel's` allows) and puts the rest
into c_step. Nothing is fitted to the published figures: `published_comparison` only compares, and
where a prediction misses by more than 20% names the term that carries the time and what the
published figure would need it to be.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Any, Optional, Sequence

import yaml

from ktutorial import plan as plan_mod
from ktutorial import results
from ktutorial.errors import UserError
from ktutorial.results import field as rfield
from ktutorial.spec import GB, ModelSpec
from ktutorial.tables import fmt, markdown_table

SYNTH_COMMAND = "bash results/gpu-host.sh OUT synth"
PROMPT_LENGTHS = (2048, 8192, 32768)
MISS_THRESHOLD = 0.20  # the goal: within 20% of every published figure
PUBLISHED_OUTPUT_LEN = 512


class FitError(UserError):
    """Records that lack what the fit needs (kernel, bandwidth or engine records at M2.1 width)."""


# ---- data ----------------------------------------------------------------------------------------


def hardware_table() -> dict[str, Any]:
    """CPUs, GPUs and PCIe links with their datasheet figures (data/perf_hardware.yaml)."""
    return yaml.safe_load((resources.files("ktutorial") / "data" / "perf_hardware.yaml").read_text())


def published_table() -> dict[str, Any]:
    """The published figures (data/published.yaml, as report.load_published reads them)."""
    return yaml.safe_load((resources.files("ktutorial") / "data" / "published.yaml").read_text())


def _lookup(table: dict[str, Any], name: str) -> tuple[Optional[str], Optional[dict]]:
    """The longest table key found in `name` ("2 x RTX 4090 (48 GB)" -> "RTX 4090")."""
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in name.lower():
            return key, table[key]
    return None, None


# ---- the machine and the settings ------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What the model needs of a machine, from datasheets (or, for the fit host, its records)."""

    name: str
    cpu: str
    cpu_cores: int  # physical cores, all sockets
    cpu_peak_gb_s: Optional[float]  # theoretical memory bandwidth, all sockets; None: not known
    gpu: str
    gpus: int
    gpu_mem_gb_s: float
    gpu_fp8_tflops: float
    gpu_bf16_tflops: float
    pcie: str
    pcie_gb_s: float  # effective x16 host-to-device rate of one link, before the host's efficiency
    cpu_sockets: int = 1
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    """The launch settings the model reads (sglang-kt flag names in the comments)."""

    num_gpu_experts: int  # --kt-num-gpu-experts
    tp: int = 1  # --tensor-parallel-size
    chunked_prefill_size: int = 32768  # --chunked-prefill-size
    gpu_prefill_threshold: int = 4096  # --kt-gpu-prefill-token-threshold
    cpu_threads: int = 14  # --kt-cpuinfer
    layers: int = 62
    output_len: int = PUBLISHED_OUTPUT_LEN
    cuda_graphs: bool = True  # False: --disable-cuda-graph (our host's bundle)
    coverage: Optional[float] = None  # share of routed experts on the GPU; None: N / experts

    def gpu_coverage(self, spec: ModelSpec) -> float:
        if self.coverage is not None:
            return min(1.0, max(0.0, self.coverage))
        return min(1.0, max(0, self.num_gpu_experts) / spec.num_experts)


def machine_from_names(gpu: str, cpu: str, pcie: Optional[str] = None, name: Optional[str] = None,
                       hardware: Optional[dict] = None) -> Machine:
    """A machine from the published table's words ("2 x RTX 5090 (32 GB)", "2 x EPYC 9355", "5.0")."""
    hw = hardware or hardware_table()
    gpus = _count(gpu)
    cpu_sockets = _count(cpu)
    gkey, g = _lookup(hw["gpus"], gpu)
    ckey, c = _lookup(hw["cpus"], cpu)
    if g is None:
        raise UserError(f"no datasheet figures for GPU {gpu!r}: add it to ktutorial/data/perf_hardware.yaml "
                        f"(known: {', '.join(hw['gpus'])})")
    if c is None:
        raise UserError(f"no datasheet figures for CPU {cpu!r}: add it to ktutorial/data/perf_hardware.yaml "
                        f"(known: {', '.join(hw['cpus'])})")
    pcie = pcie or g["pcie"]
    link = hw["pcie"][str(pcie)]
    peak = (cpu_sockets * c["channels_per_socket"] * c["mt_s"] * 8 / 1000
            if c.get("channels_per_socket") and c.get("mt_s") else None)
    return Machine(
        name=name or f"{gpu} + {cpu}", cpu=ckey, cpu_cores=cpu_sockets * c["cores_per_socket"], cpu_peak_gb_s=peak,
        gpu=gkey, gpus=gpus, gpu_mem_gb_s=g["memory_gb_s"], gpu_fp8_tflops=g["fp8_tflops"],
        gpu_bf16_tflops=g["bf16_tflops"], pcie=str(pcie), pcie_gb_s=link["gb_s"], cpu_sockets=cpu_sockets,
        sources=(c["source"], g["source"], link["source"]),
    )


def _count(words: str) -> int:
    m = re.match(r"\s*(\d+)\s*[x×]\s*", words)
    return int(m.group(1)) if m else 1


# ---- the fit --------------------------------------------------------------------------------------


@dataclass
class HostFit:
    """Constants fitted on the GPU host, each named in `sources` with the record kinds it rests on."""

    host_cpu: str
    host_gpu: str
    threads: int
    engine_layers: int
    kernel_decode_ms_per_layer: float  # kt-kernel, 1 token, 8 experts, `threads` threads
    kernel_decode_gb_s: float
    copy_gb_s: float  # the run's best torch copy (read + write counted)
    eta: float  # kernel GB/s over copy GB/s: the share of the reference bandwidth kt-kernel reads
    per_thread_decode_gb_s: float  # b_thread
    prefill_tflop_s: dict[int, float]  # kt-kernel's prefill rate by chunk tokens, `threads` threads
    decode_step_ms: float  # c_step
    decode_layer_fixed_ms: float  # c_layer (0: the assumption, see the module docstring)
    host_gpu_side_ms_per_layer: float  # g: GPU side of a layer without CUDA graphs (overlapped)
    decode_overlapped: bool
    decode_rms_ms: dict[str, float]  # residual of the overlapped and the serial fits
    prefill_step_s: float  # c_prefill
    layerwise_gb_s: float  # host's measured streaming rate of layerwise prefill
    host_pcie_gb_s: float  # the host link's nominal effective rate (perf_hardware.yaml)
    rho: float  # layerwise_gb_s / host_pcie_gb_s
    engine_decode: dict[str, dict[str, float]]  # per "layers x GPU experts": measured ms a token
    engine_threads: dict[str, dict[str, float]] = field(default_factory=dict)  # per --kt-cpuinfer: engine vs kernel
    depth_fit: dict[str, Any] = field(default_factory=dict)  # the two-depth run behind c_layer, if any
    sources: dict[str, str] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    def per_thread_prefill_tflop_s(self, tokens: int) -> float:
        """f_thread at a chunk size: the measured chunk nearest below (the smallest above if none)."""
        sizes = sorted(self.prefill_tflop_s)
        below = [s for s in sizes if s <= tokens]
        size = below[-1] if below else sizes[0]
        return self.prefill_tflop_s[size] / self.threads

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefill_tflop_s"] = {str(k): v for k, v in self.prefill_tflop_s.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HostFit":
        d = dict(d)
        d["prefill_tflop_s"] = {int(k): v for k, v in d["prefill_tflop_s"].items()}
        return cls(**d)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _bench_runs(records: Sequence[dict]) -> dict[str, list[dict]]:
    """M2.1-width engine records (bench, synthetic checkpoint) by the commit that made them: a run."""
    runs: dict[str, list[dict]] = {}
    for r in results.filter_records(records, kind="bench"):
        # the synthetic checkpoint's revision names its base model: the tiny's records (4 layers, 4
        # GPU experts through the same engine) must not pass for M2.1-width ones
        width = str(rfield(r, "env.model_revision") or "").startswith("synthetic minimax-m2.1")
        if width and rfield(r, "env.model_layers") and rfield(r, "env.server_kt_num_gpu_experts") is not None:
            runs.setdefault(str(rfield(r, "env.git_sha")), []).append(r)
    return runs


def _key(r: dict) -> tuple[int, int, int]:
    return (int(rfield(r, "env.model_layers")), int(rfield(r, "env.server_kt_cpuinfer")),
            int(rfield(r, "env.server_kt_num_gpu_experts")))


def _spread(recs: Sequence[dict], by: tuple[int, ...], vary: int) -> dict[tuple[int, ...], set[int]]:
    """Over (layers, threads, GPU experts) of each record: for each value of the `by` positions, the
    values the `vary` position took."""
    out: dict[tuple[int, ...], set[int]] = {}
    for r in recs:
        key = _key(r)
        out.setdefault(tuple(key[i] for i in by), set()).add(key[vary])
    return out


def _depth_run(runs: dict[str, list[dict]]) -> Optional[tuple[str, int, int]]:
    """(run, threads, GPU experts) of the newest run that measured one setting at two depths or more:
    the pair that splits a decoded token into per-step and per-layer time."""
    found = [(max(rfield(r, "time_utc") or "" for r in recs), sha, threads, n)
             for sha, recs in runs.items()
             for (threads, n), depths in _spread(recs, (1, 2), 0).items() if len(depths) >= 2]
    return max(found)[1:] if found else None


def _sweep_run(runs: dict[str, list[dict]]) -> tuple[str, int, int]:
    """(run, layers, threads) with the most GPU-expert counts at one depth and thread count."""
    best = None
    for sha, recs in runs.items():
        for (layers, threads), ns in _spread(recs, (0, 1), 2).items():
            cand = (len(ns), sha, layers, threads)
            best = cand if best is None or cand[0] > best[0] else best
    assert best is not None
    return best[1], best[2], best[3]


def _kernel_and_copy(records: Sequence[dict], sha: str, threads: int) -> tuple[list, list, list]:
    """kt-kernel decode (1 token) and prefill records and copy bandwidth of run `sha` at `threads`
    (FACTS: never compare bandwidths across runs)."""
    kernel = [r for r in results.filter_records(records, kind="kt_kernel_moe")
              if rfield(r, "shape") == "m2.1" and rfield(r, "threads") == threads and rfield(r, "env.git_sha") == sha]
    dec = [r for r in kernel if rfield(r, "phase") == "decode" and rfield(r, "tokens") == 1]
    pre = [r for r in kernel if rfield(r, "phase") == "prefill"]
    bw = [r for r in results.filter_records(records, kind="host_bandwidth") if rfield(r, "env.git_sha") == sha]
    return dec, pre, bw


def _decode_ms(r: dict) -> float:
    return 1000.0 / rfield(r, "decode_tok_s")


def _gap_stats(recs: Sequence[dict]) -> dict[str, float]:
    per_rec = [_decode_ms(r) for r in recs]
    gaps = sorted(1000.0 * (b - a) for r in recs for a, b in zip(r["samples"].get("token_times_s", []),
                                                                 r["samples"].get("token_times_s", [])[1:]))
    return {"mean_ms": statistics.fmean(per_rec), "stdev_ms": statistics.stdev(per_rec) if len(per_rec) > 1 else 0.0,
            "p10_ms": _quantile(gaps, 0.10), "p90_ms": _quantile(gaps, 0.90), "n": len(per_rec),
            "input_len": statistics.fmean(rfield(r, "input_len") for r in recs)}


def fit(records: Sequence[dict], spec: Optional[ModelSpec] = None, hardware: Optional[dict] = None) -> HostFit:
    """The model's host constants from kt_kernel_moe, host_bandwidth and bench records of the
    M2.1-width synthetic checkpoint (env.model_layers), each constant from one run of
    `results/gpu-host.sh` (its records share a commit) and named in `sources`.

    The base run is the newest that measured one setting at two depths (`perf` step): it gives the
    kernel, the copy bandwidth, the per-step and per-layer decode costs, the GPU side g, and the
    prefill constants. Whether CPU and GPU experts overlap needs several GPU-expert counts at one
    depth: the run with the most of them decides it (the `synth` step). Without a depth pair, the
    sweep run gives everything and c_layer = 0 is assumed (the least the records allow)."""
    spec = spec or ModelSpec.known("minimax-m2.1")
    hw = hardware or hardware_table()
    runs = _bench_runs(records)
    if not runs:
        raise FitError(
            "no bench records of the M2.1-width synthetic checkpoint (kind bench with env.model_layers and "
            f"env.server_kt_num_gpu_experts): make them on a GPU host with `{SYNTH_COMMAND}`")
    depth = _depth_run(runs)
    sweep_sha, sweep_layers, sweep_threads = _sweep_run(runs)
    base_sha, threads = sweep_sha, sweep_threads
    bench = [r for r in runs[base_sha] if _key(r)[0] == sweep_layers and _key(r)[1] == threads]
    dec, pre, bw = _kernel_and_copy(records, base_sha, threads)
    missing = [name for name, got in (("kt_kernel_moe decode (1 token)", dec), ("kt_kernel_moe prefill", pre),
                                      ("host_bandwidth", bw)) if not got]
    if missing:
        raise FitError(f"the records lack {', '.join(missing)} at the engine's {threads} threads and M2.1's shape "
                       f"in the engine's own run ({base_sha[:7]}): `{SYNTH_COMMAND}` writes them beside the engine's")
    n_exp, k = spec.num_experts, spec.experts_per_token
    t_k = _median([rfield(r, "latency_ms") for r in dec])  # ms per layer, one token
    kernel_gb_s = k * spec.expert_bytes / (t_k / 1e3) / GB
    copy = max(max(rfield(r, "copy_gb_s") or 0, 0) for r in bw)
    eta = kernel_gb_s / copy
    prefill_rate: dict[int, float] = {}
    for tokens in sorted({int(rfield(r, "tokens")) for r in pre}):
        prefill_rate[tokens] = _median([rfield(r, "tflop_s") for r in pre if rfield(r, "tokens") == tokens])
    prefill_ms = {t: _median([rfield(r, "latency_ms") for r in pre if rfield(r, "tokens") == t]) for t in prefill_rate}

    host_gpu_name = ((rfield(bench[0], "env.gpus") or [{}])[0]).get("name", "?")
    gkey, g = _lookup(hw["gpus"], host_gpu_name)
    if g is None:
        raise FitError(f"no datasheet figures for the host's GPU {host_gpu_name!r} in ktutorial/data/perf_hardware.yaml")
    host_pcie = hw["pcie"][g["pcie"]]["gb_s"]
    host = Machine(name="fit host", cpu=str(rfield(bench[0], "env.cpu_model")), cpu_cores=threads,
                   cpu_peak_gb_s=None, gpu=gkey, gpus=1, gpu_mem_gb_s=g["memory_gb_s"],
                   gpu_fp8_tflops=g["fp8_tflops"], gpu_bf16_tflops=g["bf16_tflops"], pcie=g["pcie"],
                   pcie_gb_s=host_pcie)

    def gpu_ms(r: dict) -> float:  # attention and lm_head of a decoded token, from the datasheet
        ctx = rfield(r, "input_len") + rfield(r, "output_len") / 2
        return 1e3 * (_lm_head_s(spec, host, 1) + int(rfield(r, "env.model_layers")) * _attn_decode_s(spec, host, 1, ctx))

    def t_cpu(n: int, t_kernel: float) -> float:
        return t_kernel * (1 - min(1.0, n / n_exp))

    def lsq_offset(points, model) -> tuple[float, float]:  # least squares in the offset alone
        resid = [ms - model(layers, n) for layers, n, ms in points]
        a = statistics.fmean(resid)
        return a, math.sqrt(statistics.fmean([(x - a) ** 2 for x in resid]))

    # --- overlap: D = a + L max(t_cpu, g) against D = a + L t_cpu, over the sweep run's GPU-expert counts
    s_bench = [r for r in runs[sweep_sha] if _key(r)[0] == sweep_layers and _key(r)[1] == sweep_threads]
    s_dec, _, _ = _kernel_and_copy(records, sweep_sha, sweep_threads)
    s_tk = _median([rfield(r, "latency_ms") for r in s_dec]) if s_dec else t_k
    s_points = [(sweep_layers, _key(r)[2], _decode_ms(r) - gpu_ms(r)) for r in s_bench]
    a_serial, rms_serial = lsq_offset(s_points, lambda L, n: L * t_cpu(n, s_tk))
    best = None
    for i in range(0, 201):
        g_ms = s_tk * i / 200
        a, rms = lsq_offset(s_points, lambda L, n, g_ms=g_ms: L * max(t_cpu(n, s_tk), g_ms))
        if best is None or rms < best[2] - 1e-12:
            best = (g_ms, a, rms)
    g_ms, a_over, rms_over = best
    overlapped = rms_over < rms_serial
    n_sweep = len({_key(r)[2] for r in s_bench})
    run_of = lambda sha: f"run {sha[:7]}"  # noqa: E731

    # --- decode: per-step and per-layer costs -----------------------------------------------------
    # The sweep run has one depth: its offset a is c_step + L x c_layer. A run with two depths
    # measures c_layer against that run's own kernel: the engine's per-layer cost less the kernel's.
    a = a_over if overlapped else a_serial
    c_layer, layer_source = 0.0, "assumed 0 (no run measured two depths)"
    layer_assumption = (f"c_layer = 0: with {sweep_layers} layers a per-step and a per-layer fixed cost cannot be "
                        "separated; the engine's per-layer decode cost is taken to be the kernel's (its least "
                        "possible value) and the rest is per-step cost.")
    depth_fit: dict[str, Any] = {}
    if depth:
        d_sha, d_threads, d_n = depth
        d_bench = [r for r in runs[d_sha] if _key(r)[1] == d_threads and _key(r)[2] == d_n]
        d_dec, _, _ = _kernel_and_copy(records, d_sha, d_threads)
        if d_dec:
            d_tk = _median([rfield(r, "latency_ms") for r in d_dec])
            xs = [_key(r)[0] for r in d_bench]
            ys = [_decode_ms(r) - gpu_ms(r) for r in d_bench]
            slope, intercept = statistics.linear_regression(xs, ys)
            measured = slope - t_cpu(d_n, d_tk)
            # Below 0 means the engine's kt-kernel ran a little faster than the kernel alone (a
            # different process, thread placement, layers in RAM): the fixed cost is then 0.
            c_layer = max(0.0, measured)
            depth_fit = {"run": d_sha, "threads": d_threads, "num_gpu_experts": d_n, "depths": sorted(set(xs)),
                         "engine_ms_per_layer": slope, "kernel_ms_per_layer": t_cpu(d_n, d_tk),
                         "c_layer_measured_ms": measured, "c_step_ms": intercept}
            layer_source = (f"{run_of(d_sha)}: decode ms a token at {', '.join(map(str, sorted(set(xs))))} layers "
                            f"({d_threads} threads, {d_n} GPU experts) less the datasheet's attention and lm_head, "
                            f"least squares in layers: slope {slope:.2f} ms a layer less kt-kernel's {t_cpu(d_n, d_tk):.2f} "
                            f"ms alone in the same run = {measured:+.2f} ms, taken as max(0, that)")
            layer_assumption = (f"c_layer measured, not assumed: two depths in {run_of(d_sha)} put the engine's "
                                f"per-layer decode at {slope:.2f} ms against the kernel's {t_cpu(d_n, d_tk):.2f} ms "
                                f"alone ({slope / t_cpu(d_n, d_tk):.2f}x); the per-step cost there was {intercept:.2f} ms "
                                f"against {a - sweep_layers * c_layer:.2f} ms in {run_of(sweep_sha)}: the per-step "
                                "cost differs from host to host, the per-layer cost does not.")
    c_step = a - sweep_layers * c_layer
    step_source = (f"{run_of(sweep_sha)}: decode ms a token less {sweep_layers} x (max(kernel share, g) + c_layer), "
                   "least squares over GPU experts")
    g_source = f"{run_of(sweep_sha)}: the g that fits best (grid, least squares)"
    engine_layers = sweep_layers
    engine_decode: dict[str, dict[str, float]] = {}
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in bench:
        groups.setdefault((_key(r)[0], _key(r)[2]), []).append(r)
    for (layers, n), recs in sorted(groups.items()):
        engine_decode[f"{layers}x{n}"] = {"layers": layers, "num_gpu_experts": n, **_gap_stats(recs)}

    # --- prefill: CPU-path prompts give c_prefill; GPU-path prompts give the streaming rate -------
    def cpu_path(r) -> bool:
        thr = rfield(r, "env.server_kt_gpu_prefill_token_threshold")
        chunk = rfield(r, "env.server_chunked_prefill_size") or 10**9
        return thr is None or min(rfield(r, "input_len"), chunk) < thr

    fixed = []
    for r in bench:
        if not cpu_path(r):
            continue
        layers, n = int(rfield(r, "env.model_layers")), int(rfield(r, "env.server_kt_num_gpu_experts"))
        tokens = int(rfield(r, "input_len"))
        size = min(prefill_ms, key=lambda s: abs(s - tokens))
        layer_s = prefill_ms[size] / 1e3 * tokens / size * (1 - min(1.0, n / n_exp))
        dense_s = _prefill_gpu_dense_s(spec, host, 1, tokens, 0) / spec.num_layers
        fixed.append(rfield(r, "ttft_s") - layers * (layer_s + dense_s))
    lw = [r for r in bench if not cpu_path(r)]
    if not fixed or not lw:
        raise FitError("the bench records need prompts on both prefill paths (below and above "
                       f"--kt-gpu-prefill-token-threshold, e.g. 2048 and 8192): `{SYNTH_COMMAND}` runs both")
    c_prefill = statistics.fmean(fixed)
    rates = []
    for r in lw:
        layers, tokens = int(rfield(r, "env.model_layers")), int(rfield(r, "input_len"))
        chunks = math.ceil(tokens / (rfield(r, "env.server_chunked_prefill_size") or tokens))
        compute = layers * (_prefill_gpu_dense_s(spec, host, 1, tokens, 0)
                            + _prefill_gpu_experts_s(spec, host, 1, tokens)) / spec.num_layers
        stream_s = max(1e-6, rfield(r, "ttft_s") - c_prefill - compute)
        rates.append(chunks * layers * spec.layer_expert_bytes / stream_s / GB)
    layerwise = statistics.fmean(rates)
    rho = layerwise / host_pcie

    base = f"{run_of(base_sha)}, bench (M2.1-width synth)"
    sources = {
        "kernel_decode_ms_per_layer": f"{run_of(base_sha)}: kt_kernel_moe decode, 1 token, {threads} threads: median latency_ms of {len(dec)} record(s)",
        "kernel_decode_gb_s": "kt_kernel_moe: 8 experts' bytes / kernel_decode_ms_per_layer",
        "copy_gb_s": f"{run_of(base_sha)}: host_bandwidth: the run's best copy_gb_s (torch copy_, read + write counted)",
        "eta": "kt_kernel_moe / host_bandwidth: kernel GB/s over the copy GB/s (the host's channels are not known: "
               "its copy stands in for its peak)",
        "per_thread_decode_gb_s": f"kt_kernel_moe: kernel_decode_gb_s / {threads} threads",
        "prefill_tflop_s": f"{run_of(base_sha)}: kt_kernel_moe prefill: median tflop_s per chunk size",
        "decode_step_ms": step_source,
        "decode_layer_fixed_ms": layer_source,
        "host_gpu_side_ms_per_layer": g_source,
        "decode_overlapped": (f"{run_of(sweep_sha)} ({n_sweep} GPU-expert counts at {sweep_layers} layers): rms of "
                              f"D = a + L max(t_cpu, g) ({rms_over:.2f} ms) against D = a + L t_cpu ({rms_serial:.2f} ms)"),
        "prefill_step_s": f"{base}, CPU-path prompts: TTFT less the layers x the kernel's chunk time x (1 - N/256)",
        "layerwise_gb_s": f"{base}, layerwise prompts: chunks x layers x {spec.layer_expert_bytes / GB:.2f} GB / (TTFT - prefill_step_s - GPU compute)",
        "rho": f"layerwise_gb_s over the {gkey}'s PCIe {g['pcie']} x16 effective {host_pcie} GB/s (perf_hardware.yaml)",
    }
    assumptions = [
        layer_assumption,
        "The host ran without CUDA graphs (its bundle): its per-step cost and its launch-bound GPU side g are upper "
        "bounds for a machine with them; g is applied only to predictions with cuda_graphs=False.",
        "Uniform routing: GPU experts take N/256 of the routed experts' work.",
        "kt-kernel's per-thread decode rate and prefill TFLOP/s carry over from the host's core to the published "
        "CPUs, capped by eta x the machine's peak memory bandwidth; threads beyond physical cores add nothing.",
        "GPU compute at the datasheet's dense peak; TP all-reduces and PCIe latency not modelled.",
        "Layerwise prefill uploads one layer at a time into one slot (plan.py's memory model): upload and compute add.",
    ]
    return HostFit(
        host_cpu=host.cpu, host_gpu=gkey, threads=threads, engine_layers=engine_layers,
        kernel_decode_ms_per_layer=t_k, kernel_decode_gb_s=kernel_gb_s, copy_gb_s=copy, eta=eta,
        per_thread_decode_gb_s=kernel_gb_s / threads, prefill_tflop_s=prefill_rate,
        decode_step_ms=c_step, decode_layer_fixed_ms=c_layer, host_gpu_side_ms_per_layer=g_ms,
        decode_overlapped=overlapped, decode_rms_ms={"overlapped": rms_over, "serial": rms_serial},
        prefill_step_s=c_prefill, layerwise_gb_s=layerwise, host_pcie_gb_s=host_pcie, rho=rho,
        engine_decode=engine_decode, engine_threads=engine_threads(records), depth_fit=depth_fit,
        sources=sources, assumptions=assumptions,
    )


def engine_threads(records: Sequence[dict], sha: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Decode through the engine against kt-kernel alone at each --kt-cpuinfer of one run: the engine's
    ms a token, its per-layer share (the run's per-step cost taken out where two depths measured it),
    the kernel's ms a layer at the same threads, their ratio, and the copy bandwidth at those threads.
    Keyed by thread count (as text: JSON keys); {} when the run has one thread count."""
    runs = _bench_runs(records)
    if sha is None:
        found = _depth_run(runs)
        if not found:
            return {}
        sha = found[0]
    recs = [r for r in runs.get(sha, []) if _key(r)[2] == 0]
    by_threads: dict[int, list[dict]] = {}
    for r in recs:
        by_threads.setdefault(_key(r)[1], []).append(r)
    if len(by_threads) < 2:
        return {}
    # the per-step cost at the thread count with two depths
    step = None
    for rs in by_threads.values():
        depths = sorted({_key(r)[0] for r in rs})
        if len(depths) >= 2:
            slope, step = statistics.linear_regression([_key(r)[0] for r in rs], [_decode_ms(r) for r in rs])
    out = {}
    for threads, rs in sorted(by_threads.items()):
        layers = max(_key(r)[0] for r in rs)
        deep = [r for r in rs if _key(r)[0] == layers]
        ms = statistics.fmean(_decode_ms(r) for r in deep)
        dec, _, bw = _kernel_and_copy(records, sha, threads)
        kernel = _median([rfield(r, "latency_ms") for r in dec]) if dec else None
        copy = [rfield(r, "copy_gb_s") for r in bw if rfield(r, "threads") == threads]
        per_layer = (ms - step) / layers if step is not None else None
        out[str(threads)] = {
            "layers": layers, "engine_ms_per_token": ms, "engine_tok_s": 1000.0 / ms, "n": len(deep),
            "engine_ms_per_layer": per_layer, "kernel_ms_per_layer": kernel,
            "engine_over_kernel": per_layer / kernel if per_layer is not None and kernel else None,
            "copy_gb_s": max(copy) if copy else None,
            "host_logical_cpus": rfield(deep[0], "env.cpu_logical"),
        }
    return out


def best_engine_threads(hostfit: "HostFit") -> Optional[int]:
    """The --kt-cpuinfer that decoded fastest through the engine in the fit's run, if it swept threads."""
    if not hostfit.engine_threads:
        return None
    return int(max(hostfit.engine_threads, key=lambda t: hostfit.engine_threads[t]["engine_tok_s"]))


def committed_fit() -> HostFit:
    """The fit of the committed records (data/perfmodel_fit.json, written by `write_committed_fit`
    and checked against the records by the tests)."""
    text = (resources.files("ktutorial") / "data" / "perfmodel_fit.json").read_text()
    return HostFit.from_dict(json.loads(text))


def fit_json(hostfit: HostFit) -> str:
    """The text of data/perfmodel_fit.json for a fit."""
    return json.dumps(results._jsonable(hostfit.as_dict()), indent=1, sort_keys=True) + "\n"


def host_machine(hostfit: HostFit, hardware: Optional[dict] = None) -> Machine:
    """The fit host as a Machine: its CPU bandwidth is its own kernel's, its GPU the datasheet's."""
    hw = hardware or hardware_table()
    g = hw["gpus"][hostfit.host_gpu]
    return Machine(name="fit host", cpu=hostfit.host_cpu, cpu_cores=hostfit.threads,
                   cpu_peak_gb_s=hostfit.copy_gb_s, gpu=hostfit.host_gpu, gpus=1, gpu_mem_gb_s=g["memory_gb_s"],
                   gpu_fp8_tflops=g["fp8_tflops"], gpu_bf16_tflops=g["bf16_tflops"], pcie=g["pcie"],
                   pcie_gb_s=hostfit.host_pcie_gb_s)


# ---- the terms --------------------------------------------------------------------------------------


def _quantile(sorted_values: list[float], f: float) -> float:
    """The f-quantile of an ascending list (nearest rank), NaN for an empty one."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(f * len(sorted_values)))]


def _lm_head_s(spec: ModelSpec, m: Machine, tp: int) -> float:
    lm_head = spec.vocab_size * spec.hidden_size * 2  # bf16, read once a decoded token
    return lm_head / tp / (m.gpu_mem_gb_s * GB)


def _attn_decode_s(spec: ModelSpec, m: Machine, tp: int, ctx: float) -> float:
    kv_layer_token = spec.kv_bytes_per_token("bf16") / spec.num_layers
    weights = spec.attention_bytes_per_layer / tp
    return (weights + ctx * kv_layer_token / min(tp, spec.num_kv_heads)) / (m.gpu_mem_gb_s * GB)


def _expert_flops(spec: ModelSpec, tokens: int) -> float:
    """Routed-expert FLOPs of `tokens` tokens in one layer (gate, up, down; 2 per multiply-add)."""
    return 2.0 * tokens * spec.experts_per_token * 3 * spec.hidden_size * spec.expert_intermediate_size


def _prefill_gpu_dense_s(spec: ModelSpec, m: Machine, tp: int, n: int, prefix: int) -> float:
    """All layers' attention projections (FP8) and attention itself (BF16) for one chunk."""
    proj = 2.0 * n * spec.attention_params_per_layer / tp / (m.gpu_fp8_tflops * 1e12)
    attn = (4.0 * spec.num_attention_heads * spec.head_dim * n * (prefix + n / 2)) / tp / (m.gpu_bf16_tflops * 1e12)
    return spec.num_layers * (proj + attn)


def _prefill_gpu_experts_s(spec: ModelSpec, m: Machine, tp: int, n: int, share: float = 1.0) -> float:
    """All layers' routed experts on the GPU (FP8) for one chunk: `share` of them."""
    return spec.num_layers * _expert_flops(spec, n) * share / tp / (m.gpu_fp8_tflops * 1e12)


@dataclass
class Prediction:
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    decode_ms: float
    prefill_path: str  # "CPU experts", "GPU layerwise" or "mixed"
    cpu_decode_gb_s: float
    cpu_decode_limit: str  # "threads" or "memory"
    cpu_prefill_tflop_s: float
    terms: dict[str, float]  # decode terms in ms a token, prefill terms in s a request
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_decode_bandwidth(hostfit: HostFit, machine: Machine, threads: int) -> tuple[float, str]:
    """B_cpu = min(threads x b_thread, eta x peak) and which of the two binds."""
    threads = max(1, min(threads, machine.cpu_cores))
    by_threads = threads * hostfit.per_thread_decode_gb_s
    if machine.cpu_peak_gb_s is None:
        return by_threads, "threads"
    by_memory = hostfit.eta * machine.cpu_peak_gb_s
    return (by_threads, "threads") if by_threads <= by_memory else (by_memory, "memory")


def predict(hostfit: HostFit, machine: Machine, settings: Settings, prompt_len: int,
            spec: Optional[ModelSpec] = None) -> Prediction:
    """Prefill and decode tok/s of one request of `prompt_len` tokens, with the terms behind them."""
    spec = spec or ModelSpec.known("minimax-m2.1")
    L, tp, k = settings.layers, max(1, settings.tp), spec.experts_per_token
    cov = settings.gpu_coverage(spec)
    threads = max(1, min(settings.cpu_threads, machine.cpu_cores))
    notes = []
    if settings.cpu_threads > machine.cpu_cores:
        notes.append(f"kt-cpuinfer {settings.cpu_threads} > {machine.cpu_cores} physical cores: counted as {threads}")

    # --- decode ---------------------------------------------------------------------------------
    b_cpu, limit = cpu_decode_bandwidth(hostfit, machine, threads)
    ctx = prompt_len + settings.output_len / 2
    t_cpu = k * spec.expert_bytes * (1 - cov) / (b_cpu * GB)
    t_gexp = k * spec.expert_bytes * cov / tp / (machine.gpu_mem_gb_s * GB)
    if not settings.cuda_graphs:
        t_gexp = max(t_gexp, hostfit.host_gpu_side_ms_per_layer / 1e3)
    t_attn = _attn_decode_s(spec, machine, tp, ctx)
    c_layer = hostfit.decode_layer_fixed_ms / 1e3
    moe = max(t_cpu, t_gexp) if hostfit.decode_overlapped else t_cpu + t_gexp
    step = hostfit.decode_step_ms / 1e3
    lm = _lm_head_s(spec, machine, tp)
    decode_s = step + lm + L * (t_attn + moe + c_layer)
    d_terms = {
        "decode_cpu_experts_ms": 1e3 * L * t_cpu, "decode_gpu_side_ms": 1e3 * L * t_gexp,
        "decode_moe_ms": 1e3 * L * moe, "decode_attention_ms": 1e3 * L * t_attn, "decode_lm_head_ms": 1e3 * lm,
        "decode_step_ms": 1e3 * step, "decode_layer_fixed_ms": 1e3 * L * c_layer,
    }

    # --- prefill ----------------------------------------------------------------------------------
    chunk = max(1, settings.chunked_prefill_size)
    pcie = machine.pcie_gb_s * hostfit.rho
    ttft = hostfit.prefill_step_s
    p_terms = {"prefill_step_s": hostfit.prefill_step_s, "prefill_pcie_s": 0.0, "prefill_gpu_compute_s": 0.0,
               "prefill_cpu_experts_s": 0.0, "prefill_tp_allreduce_s": 0.0}
    paths, f_cpu_used = set(), threads * hostfit.per_thread_prefill_tflop_s(min(prompt_len, chunk))
    done = 0
    while done < prompt_len:
        n = min(chunk, prompt_len - done)
        dense = _prefill_gpu_dense_s(spec, machine, tp, n, done) * L / spec.num_layers
        # TP > 1: two all-reduces of the chunk's hidden states a layer (after attention, after the
        # MoE); a 2-GPU ring sends the whole tensor over each card's link (no NVLink on these cards).
        allreduce = L * 2 * n * spec.hidden_size * 2 * 2 * (tp - 1) / tp / (pcie * GB) if tp > 1 else 0.0
        ttft += allreduce
        p_terms["prefill_tp_allreduce_s"] += allreduce
        if n >= settings.gpu_prefill_threshold:
            paths.add("GPU layerwise")
            upload = L * spec.layer_expert_bytes / tp / (pcie * GB)
            experts = _prefill_gpu_experts_s(spec, machine, tp, n) * L / spec.num_layers
            ttft += dense + upload + experts
            p_terms["prefill_pcie_s"] += upload
            p_terms["prefill_gpu_compute_s"] += dense + experts
        else:
            paths.add("CPU experts")
            f_cpu = threads * hostfit.per_thread_prefill_tflop_s(n) * 1e12
            f_cpu_used = f_cpu / 1e12
            cpu = L * _expert_flops(spec, n) * (1 - cov) / f_cpu
            gpu = _prefill_gpu_experts_s(spec, machine, tp, n, cov) * L / spec.num_layers
            ttft += dense + max(cpu, gpu)
            p_terms["prefill_cpu_experts_s"] += cpu
            p_terms["prefill_gpu_compute_s"] += dense + (gpu if gpu > cpu else 0.0)
        done += n
    path = paths.pop() if len(paths) == 1 else "mixed"
    return Prediction(
        prefill_tok_s=prompt_len / ttft, decode_tok_s=1.0 / decode_s, ttft_s=ttft, decode_ms=1e3 * decode_s,
        prefill_path=path, cpu_decode_gb_s=b_cpu, cpu_decode_limit=limit, cpu_prefill_tflop_s=f_cpu_used,
        terms={**d_terms, **p_terms}, notes=notes,
    )


# ---- the published table ---------------------------------------------------------------------------


def _settings_for_row(planned: dict[str, Any], published: dict[str, Any]) -> tuple[Settings, dict[str, str]]:
    """Settings of a published row: the published ones where given, else the planner's."""
    values, origin = {}, {}
    for flag in ("kt-num-gpu-experts", "tensor-parallel-size", "chunked-prefill-size",
                 "kt-gpu-prefill-token-threshold", "kt-cpuinfer"):
        if flag in published:
            values[flag], origin[flag] = published[flag], "published"
        else:
            values[flag], origin[flag] = planned[flag], "planner"
    return Settings(
        num_gpu_experts=int(values["kt-num-gpu-experts"]), tp=int(values["tensor-parallel-size"]),
        chunked_prefill_size=int(values["chunked-prefill-size"]),
        gpu_prefill_threshold=int(values["kt-gpu-prefill-token-threshold"]), cpu_threads=int(values["kt-cpuinfer"]),
    ), origin


def _diagnose(kind: str, pred: Prediction, published: float, machine: Machine, hostfit: HostFit,
              settings: Settings, prompt_len: int, spec: ModelSpec) -> str:
    """Which term carries the time of a missed prediction, and what the published figure needs it to be."""
    t = pred.terms
    if kind == "decode":
        total = pred.decode_ms
        want = 1e3 / published
        term = t["decode_moe_ms"]
        rest = total - term
        need = want - rest
        cov = settings.gpu_coverage(spec)
        bytes_gb = settings.layers * spec.experts_per_token * spec.expert_bytes * (1 - cov) / GB
        if need <= 0:
            return (f"decode: without the CPU experts the other terms ({rest:.1f} ms) already exceed the published "
                    f"{want:.1f} ms a token: the per-step cost fitted on the host ({t['decode_step_ms']:.1f} ms) is too high")
        implied = bytes_gb / (need / 1e3)
        peak = f", {implied / machine.cpu_peak_gb_s:.0%} of the {machine.cpu_peak_gb_s:.0f} GB/s peak" if machine.cpu_peak_gb_s else ""
        sockets = "two sockets" if machine.cpu_sockets == 2 else f"{machine.cpu_sockets} socket(s)"
        return (f"decode: the CPU-expert term ({term:.1f} of {total:.1f} ms) reads {bytes_gb:.2f} GB at "
                f"{pred.cpu_decode_gb_s:.0f} GB/s ({pred.cpu_decode_limit}-bound: {min(settings.cpu_threads, machine.cpu_cores)} "
                f"threads x {hostfit.per_thread_decode_gb_s:.2f} GB/s from the host); the published {published} tok/s "
                f"needs {implied:.0f} GB/s{peak}, with the other terms as modelled. The host's per-thread rate "
                f"({hostfit.host_cpu}, one NUMA node) does not carry over to {machine.cpu} ({sockets}): "
                "cross-socket reads and per-layer synchronisation of that many threads are not in the host's records")
    total = pred.ttft_s
    want = prompt_len / published
    if pred.prefill_path == "CPU experts":
        term = t["prefill_cpu_experts_s"]
        need = want - (total - term)
        implied = (settings.layers * _expert_flops(spec, prompt_len) * (1 - settings.gpu_coverage(spec)) / need / 1e12
                   if need > 0 else float("inf"))
        build = hardware_table()["cpus"].get(machine.cpu, {}).get("kt_build", "?")
        return (f"prefill: {prompt_len} tokens are below the {settings.gpu_prefill_threshold}-token threshold and run "
                f"the experts on the CPU ({term:.1f} of {total:.1f} s at {pred.cpu_prefill_tflop_s:.2f} TFLOP/s: "
                f"{min(settings.cpu_threads, machine.cpu_cores)} threads x the host's "
                f"{hostfit.per_thread_prefill_tflop_s(prompt_len) * 1e3:.1f} GFLOP/s); the published figure needs "
                f"{implied:.2f} TFLOP/s. The host's per-core rate is an Intel AMX vCPU's; {machine.cpu} runs kt-kernel's "
                f"{build} build on its own cores, whose FP8 prefill rate the host cannot measure")
    term = t["prefill_pcie_s"]
    need = want - (total - term)
    chunks = math.ceil(prompt_len / settings.chunked_prefill_size)
    if need <= 0:
        return (f"prefill: the GPU compute at datasheet peak and the fixed cost ({total - term:.1f} s) already exceed "
                f"the published {want:.1f} s")
    implied = chunks * settings.layers * spec.layer_expert_bytes / settings.tp / need / GB
    one_chunk = ""
    if chunks > 1:
        alt = predict(hostfit, machine, replace(settings, chunked_prefill_size=prompt_len), prompt_len, spec=spec)
        one_chunk = (f"; it is {chunks} chunks of {settings.chunked_prefill_size} (each uploads every layer): "
                     f"with chunked-prefill-size {prompt_len} (one upload, as the published 2 x RTX 5090 run) "
                     f"the model gives {alt.prefill_tok_s:.0f} tok/s")
    return (f"prefill: layerwise upload ({chunks} chunk(s) x {settings.layers} layers x "
            f"{spec.layer_expert_bytes / GB:.2f} GB / TP {settings.tp}) takes {term:.1f} of {total:.1f} s at "
            f"{machine.pcie_gb_s * hostfit.rho:.1f} GB/s a link (PCIe {machine.pcie} {machine.pcie_gb_s} GB/s x the host's "
            f"rho {hostfit.rho:.2f}); the published figure needs {implied:.1f} GB/s a link with the GPU compute at "
            "datasheet peak: the host's streaming efficiency (a VM's H200) or the compute term does not carry over"
            + one_chunk)


def published_comparison(records: Optional[Sequence[dict]] = None, hostfit: Optional[HostFit] = None,
                         published: Optional[dict] = None, hardware: Optional[dict] = None,
                         spec: Optional[ModelSpec] = None) -> list[dict[str, Any]]:
    """One row per published configuration and prompt length: prediction, published figure and
    relative error ((predicted - published) / published) of prefill and decode, the settings used
    and where each came from, and for a miss of more than 20% the term that carries it."""
    spec = spec or ModelSpec.known("minimax-m2.1")
    hw = hardware or hardware_table()
    if hostfit is None:
        if records is None:
            raise FitError(f"published_comparison needs records or a fit: `{SYNTH_COMMAND}` makes the records")
        hostfit = fit(records, spec=spec, hardware=hw)
    pub = published or published_table()
    planned = {row["run"]: row for row in plan_mod.published_runs_comparison(spec)}
    rows = []
    for prow in pub["rows"]:
        run = planned.get(prow["config"])
        if run is None:
            raise UserError(f"published row {prow['config']!r} has no matching run in ktutorial.plan.PUBLISHED_RUNS")
        machine = machine_from_names(prow["gpu"], prow["cpu"], prow.get("pcie"), name=prow["config"], hardware=hw)
        settings, origin = _settings_for_row(run["planner"], run["published"])
        settings = replace(settings, output_len=int(pub.get("output_len", PUBLISHED_OUTPUT_LEN)))
        for length in PROMPT_LENGTHS:
            if length not in prow["results"]:
                continue
            pub_prefill, pub_decode = prow["results"][length]
            pred = predict(hostfit, machine, settings, length, spec=spec)
            e_pre = results.relative_difference(pred.prefill_tok_s, pub_prefill)
            e_dec = results.relative_difference(pred.decode_tok_s, pub_decode)
            misses = []
            if abs(e_pre) > MISS_THRESHOLD:
                misses.append(_diagnose("prefill", pred, pub_prefill, machine, hostfit, settings, length, spec))
            if abs(e_dec) > MISS_THRESHOLD:
                misses.append(_diagnose("decode", pred, pub_decode, machine, hostfit, settings, length, spec))
            rows.append({
                "config": prow["config"], "prompt_len": length, "prefill_path": pred.prefill_path,
                "predicted_prefill_tok_s": pred.prefill_tok_s, "published_prefill_tok_s": pub_prefill,
                "prefill_rel_err": e_pre,
                "predicted_decode_tok_s": pred.decode_tok_s, "published_decode_tok_s": pub_decode,
                "decode_rel_err": e_dec,
                "settings": asdict(settings), "settings_origin": origin,
                "machine": asdict(machine), "terms": pred.terms, "cpu_decode_gb_s": pred.cpu_decode_gb_s,
                "cpu_decode_limit": pred.cpu_decode_limit, "cpu_prefill_tflop_s": pred.cpu_prefill_tflop_s,
                "within_goal": not misses, "misses": misses, "notes": pred.notes,
            })
    return rows


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as markdown: predicted / published (error) per row and prompt length, the
    settings it used, and below it what each miss comes from."""
    def err(x: float) -> str:
        return f"{x * 100:+.0f}%"

    table = markdown_table(
        ["configuration", "prompt", "prefill path", "prefill predicted / published (error)",
         "decode predicted / published (error)", "GPU experts", "CPU threads", "within 20%"],
        [[r["config"], r["prompt_len"], r["prefill_path"],
          f"{fmt(r['predicted_prefill_tok_s'])} / {fmt(r['published_prefill_tok_s'])} ({err(r['prefill_rel_err'])})",
          f"{fmt(r['predicted_decode_tok_s'])} / {fmt(r['published_decode_tok_s'])} ({err(r['decode_rel_err'])})",
          f"{r['settings']['num_gpu_experts']} ({r['settings_origin']['kt-num-gpu-experts']})",
          f"{r['settings']['cpu_threads']} ({r['settings_origin']['kt-cpuinfer']})",
          "yes" if r["within_goal"] else "no"] for r in rows])
    misses = [f"- {r['config']}, {r['prompt_len']} tokens: {m}" for r in rows for m in r["misses"]]
    return table + ("\n\nWhere it misses (more than 20%), and why:\n\n" + "\n".join(misses) if misses else "")


def fit_markdown(hostfit: HostFit) -> str:
    """The fitted constants with their sources, and the assumptions, as markdown."""
    rows = [
        ["b_thread (kt-kernel decode GB/s a thread)", fmt(hostfit.per_thread_decode_gb_s), hostfit.sources["per_thread_decode_gb_s"]],
        ["kt-kernel decode, 1 token, ms a layer", fmt(hostfit.kernel_decode_ms_per_layer), hostfit.sources["kernel_decode_ms_per_layer"]],
        ["kt-kernel decode GB/s", fmt(hostfit.kernel_decode_gb_s), hostfit.sources["kernel_decode_gb_s"]],
        ["eta (kernel / copy bandwidth)", f"{hostfit.eta:.2f}", hostfit.sources["eta"]],
        ["f_thread at 2048 tokens (GFLOP/s a thread)", fmt(hostfit.per_thread_prefill_tflop_s(2048) * 1e3), hostfit.sources["prefill_tflop_s"]],
        ["c_step (decode ms a step)", fmt(hostfit.decode_step_ms), hostfit.sources["decode_step_ms"]],
        ["g (host GPU side ms a layer, no CUDA graphs)", fmt(hostfit.host_gpu_side_ms_per_layer), hostfit.sources["host_gpu_side_ms_per_layer"]],
        ["CPU and GPU experts overlapped", str(hostfit.decode_overlapped), hostfit.sources["decode_overlapped"]],
        ["c_prefill (s a request)", fmt(hostfit.prefill_step_s), hostfit.sources["prefill_step_s"]],
        ["layerwise streaming GB/s (host)", fmt(hostfit.layerwise_gb_s), hostfit.sources["layerwise_gb_s"]],
        ["rho (streaming / PCIe effective)", f"{hostfit.rho:.2f}", hostfit.sources["rho"]],
    ]
    return (markdown_table(["constant", "value", "from"], rows) + "\n\nAssumptions:\n\n"
            + "\n".join(f"- {a}" for a in hostfit.assumptions))


def cross_run_check(hostfit: HostFit, records: Sequence[dict]) -> list[dict[str, Any]]:
    """The fitted model against the two-depth run's own measurements (a run it was not fitted on,
    except for c_layer): decode ms a token and TTFT per depth, GPU-expert count and prompt length,
    at that run's threads, without CUDA graphs as the host ran."""
    if not hostfit.depth_fit:
        return []
    sha = hostfit.depth_fit["run"]
    host = host_machine(hostfit)
    groups: dict[tuple[int, int, int, int], list[dict]] = {}
    for r in _bench_runs(records).get(sha, []):
        layers, threads, n = _key(r)
        groups.setdefault((layers, threads, n, int(rfield(r, "input_len"))), []).append(r)
    rows = []
    for (layers, threads, n, length), recs in sorted(groups.items()):
        s = Settings(num_gpu_experts=n, layers=layers, cpu_threads=threads, output_len=int(rfield(recs[0], "output_len")),
                     cuda_graphs=False, chunked_prefill_size=int(rfield(recs[0], "env.server_chunked_prefill_size") or 8192),
                     gpu_prefill_threshold=int(rfield(recs[0], "env.server_kt_gpu_prefill_token_threshold") or 4096))
        p = predict(hostfit, replace(host, cpu_cores=max(threads, host.cpu_cores)), s, length)
        ms = statistics.fmean(_decode_ms(r) for r in recs)
        ttft = statistics.fmean(rfield(r, "ttft_s") for r in recs)
        rows.append({"layers": layers, "threads": threads, "num_gpu_experts": n, "prompt_len": length, "n": len(recs),
                     "measured_decode_ms": ms, "predicted_decode_ms": p.decode_ms,
                     "decode_rel_err": results.relative_difference(p.decode_ms, ms),
                     "measured_ttft_s": ttft, "predicted_ttft_s": p.ttft_s,
                     "ttft_rel_err": results.relative_difference(p.ttft_s, ttft), "prefill_path": p.prefill_path})
    return rows


def threads_markdown(hostfit: HostFit) -> str:
    """Decode through the engine against kt-kernel alone at each --kt-cpuinfer of one run."""
    if not hostfit.engine_threads:
        return ""
    rows = [[t, v["layers"], fmt(v["engine_tok_s"]), fmt(v["engine_ms_per_token"]),
             fmt(v["engine_ms_per_layer"]) if v["engine_ms_per_layer"] is not None else "-",
             fmt(v["kernel_ms_per_layer"]) if v["kernel_ms_per_layer"] is not None else "-",
             f"{v['engine_over_kernel']:.2f}" if v["engine_over_kernel"] is not None else "-",
             fmt(v["copy_gb_s"]) if v["copy_gb_s"] is not None else "-"]
            for t, v in sorted(hostfit.engine_threads.items(), key=lambda kv: int(kv[0]))]
    best = best_engine_threads(hostfit)
    return (markdown_table(["--kt-cpuinfer", "layers", "engine decode tok/s", "ms a token", "engine ms a layer",
                            "kt-kernel alone ms a layer", "engine / kernel", "copy GB/s"], rows)
            + f"\n\nBest through the engine: {best} threads (every expert on the CPU; the engine's ms a layer is its "
              "ms a token less the per-step cost the two depths measured, over the layers).")


def cross_run_markdown(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    return markdown_table(
        ["layers", "threads", "GPU experts", "prompt", "decode ms: measured / predicted (error)",
         "TTFT s: measured / predicted (error)", "prefill path"],
        [[r["layers"], r["threads"], r["num_gpu_experts"], r["prompt_len"],
          f"{fmt(r['measured_decode_ms'])} / {fmt(r['predicted_decode_ms'])} ({r['decode_rel_err'] * 100:+.0f}%)",
          f"{fmt(r['measured_ttft_s'])} / {fmt(r['predicted_ttft_s'])} ({r['ttft_rel_err'] * 100:+.0f}%)",
          r["prefill_path"]] for r in rows])


def report_section(records: Sequence[dict]) -> tuple[str, list[dict[str, Any]]]:
    """The report's section (fitted constants, comparison, misses) and its rows; ("", []) when the
    records lack what the fit needs."""
    try:
        hostfit = fit(records)
    except FitError:
        return "", []
    rows = published_comparison(hostfit=hostfit)
    intro = (f"The model of `ktutorial/perfmodel.py`, fitted on the GPU host's records ({hostfit.engine_layers}-layer "
             f"M2.1-width engine runs beside kt-kernel alone at {hostfit.threads} threads), then scaled by datasheet "
             "figures (`ktutorial/data/perf_hardware.yaml`) to the published machines with the published settings, "
             "else the planner's. Nothing is fitted to the published figures. Error = (predicted - published) / published.")
    parts = [intro, fit_markdown(hostfit), table_markdown(rows)]
    threads = threads_markdown(hostfit)
    if threads:
        parts += ["### --kt-cpuinfer through the engine, beside kt-kernel alone", threads]
    cross = cross_run_markdown(cross_run_check(hostfit, records))
    if cross:
        parts += [f"### The model against a run it was not fitted on ({hostfit.depth_fit['run'][:7]})",
                  "Decode and TTFT of the two-depth run, predicted from the fit above at that run's settings "
                  "(no CUDA graphs, as the host ran). Its per-step cost was lower than the fit's host's: decode "
                  "errors there are that difference.", cross]
    return "\n\n".join(parts), rows


# ---- a plan's prediction -------------------------------------------------------------------------


def predict_plan(plan: Any, hostfit: Optional[HostFit] = None, prompt_lens: Sequence[int] = PROMPT_LENGTHS,
                 hardware: Optional[dict] = None) -> dict[str, Any]:
    """Predicted prefill and decode tok/s for a ktutorial.plan Plan's machine and settings, or the
    reason there is none (a GPU or CPU without datasheet figures in perf_hardware.yaml)."""
    hostfit = hostfit or committed_fit()
    hw = hardware or hardware_table()
    h = plan.hardware
    values = plan.values()
    gkey, g = _lookup(hw["gpus"], h.gpu_name)
    if g is None or not h.gpus:
        return {"available": False, "reason": f"no datasheet figures for GPU {h.gpu_name!r} in ktutorial/data/perf_hardware.yaml"}
    ckey, c = _lookup(hw["cpus"], h.cpu_model or "")
    sockets = max(1, h.numa_nodes)
    peak = (sockets * c["channels_per_socket"] * c["mt_s"] * 8 / 1000
            if c and c.get("channels_per_socket") and c.get("mt_s") else None)
    machine = Machine(
        name=h.label(), cpu=ckey or h.cpu_model, cpu_cores=h.physical_cores, cpu_peak_gb_s=peak, gpu=gkey,
        gpus=h.gpu_count, gpu_mem_gb_s=g["memory_gb_s"], gpu_fp8_tflops=g["fp8_tflops"],
        gpu_bf16_tflops=g["bf16_tflops"], pcie=g["pcie"], pcie_gb_s=hw["pcie"][g["pcie"]]["gb_s"], cpu_sockets=sockets,
    )
    settings = Settings(
        num_gpu_experts=int(values.get("kt-num-gpu-experts") or 0), tp=int(values.get("tensor-parallel-size") or 1),
        chunked_prefill_size=int(values.get("chunked-prefill-size") or 8192),
        gpu_prefill_threshold=int(values.get("kt-gpu-prefill-token-threshold") or 4096),
        cpu_threads=int(values.get("kt-cpuinfer") or h.physical_cores),
        layers=plan.spec.num_layers, cuda_graphs=not values.get("disable-cuda-graph", False),
    )
    out = {"available": True, "by_prompt_len": {}, "cpu_peak_gb_s": peak,
           "note": "from the committed fit (data/perfmodel_fit.json); "
                   + ("CPU peak bandwidth from perf_hardware.yaml" if peak else
                      "CPU not in perf_hardware.yaml: decode limited by threads x the host's per-thread rate only")}
    for length in prompt_lens:
        p = predict(hostfit, machine, settings, length, spec=plan.spec)
        out["by_prompt_len"][length] = {"prefill_tok_s": round(p.prefill_tok_s, 1), "decode_tok_s": round(p.decode_tok_s, 2),
                                        "prefill_path": p.prefill_path}
    return out


__all__ = [
    "FitError", "HostFit", "Machine", "Settings", "Prediction", "fit", "committed_fit", "fit_json", "predict",
    "predict_plan", "published_comparison", "table_markdown", "fit_markdown", "machine_from_names",
    "host_machine", "hardware_table", "cpu_decode_bandwidth", "report_section", "engine_threads",
    "best_engine_threads", "cross_run_check",
]
