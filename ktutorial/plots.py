"""matplotlib figures drawn from records (never from typed numbers). Each function writes PNGs
into a folder and returns the paths it wrote as `Figures` (empty when the records hold nothing
to draw), which a notebook shows as the images.

Published figures, when drawn, are dashed and labelled "published".
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402

from ktutorial import perfmodel, results  # noqa: E402
from ktutorial.results import field  # noqa: E402

DPI = 120


class Figures(list):
    """The PNG files a figure function wrote: a notebook shows the images, a terminal the paths."""

    def _ipython_display_(self) -> None:
        from IPython.display import Image, display  # IPython: present in a notebook kernel only

        for path in self:
            display(Image(filename=str(path)))

    def __rich__(self) -> str:
        return "\n".join(str(p) for p in self)


def save_figure(fig, path: Path) -> Path:
    """Every chart ktutorial writes goes through here: one size, one layout, figure closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# ---- single-request benchmark ----------------------------------------------------------------


def bench_vs_input_len(
    records: Sequence[dict], out_dir: Path, published: Optional[dict] = None, config_key: str = "config"
) -> list[Path]:
    """prefill and decode tok/s against input length, one line per configuration (mean ± stdev)."""
    bench = results.filter_records(records, kind="bench")
    if not bench:
        return Figures()
    groups = results.compare(bench, [config_key, "output_len", "input_len"], metrics=["prefill_tok_s", "decode_tok_s"])
    configs = list(dict.fromkeys((g["key"][config_key], g["key"]["output_len"]) for g in groups))
    several_outputs = len({c[1] for c in configs}) > 1
    ours_lens = {g["key"]["input_len"] for g in groups}
    paths = []
    for metric, title, name in (
        ("prefill_tok_s", "Prefill (input length / time to first token)", "bench_prefill.png"),
        ("decode_tok_s", "Decode ((output tokens - 1) / (end-to-end - TTFT))", "bench_decode.png"),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for config, out_len in configs:
            rows = [g for g in groups if (g["key"][config_key], g["key"]["output_len"]) == (config, out_len)]
            line = f"{config}, {out_len} out" if several_outputs else str(config)
            xs = [g["key"]["input_len"] for g in rows]
            s = [g["metrics"][metric] for g in rows]
            ax.errorbar(
                xs, [v["mean"] for v in s], yerr=[v["stdev"] or 0 for v in s],
                marker="o", capsize=3, label=f"{line} (n={min(v['n'] for v in s)})",
            )  # fmt: skip
        if published:
            idx = 0 if metric == "prefill_tok_s" else 1
            for row in published.get("rows", []):
                pts = sorted((int(k), v[idx]) for k, v in row["results"].items())
                # Drawn only where our lengths reach theirs, so tiny runs are not dwarfed.
                if ours_lens & {p[0] for p in pts}:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", marker="x",
                            alpha=0.7, label=f"published: {row['config']}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ours_lens))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel("tokens / s")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out_dir / name))
    return Figures(paths)


# ---- under load (records of ktutorial.load) ---------------------------------------------------

LOAD_KIND = "load"


def load_throughput_latency(records: Sequence[dict], out_dir: Path) -> list[Path]:
    """Output tok/s against latency, one point per concurrency level labelled with it: TTFT on the
    left, inter-token latency on the right, p50 solid and p90 dashed; one colour per configuration
    (label, input and output length, request rate)."""
    loads = [r for r in records if r["kind"] == LOAD_KIND and _num(field(r, "output_tok_s")) is not None]
    if not loads:
        return Figures()

    def line_of(r: dict) -> str:
        rate = field(r, "request_rate_req_s")
        return (f"{field(r, 'config')}, {field(r, 'input_len')} in / {field(r, 'output_len')} out"
                + ("" if rate is None else f", {rate:g} req/s"))

    lines = list(dict.fromkeys(line_of(r) for r in loads))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, latency, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], "itl_s", "inter-token latency")):
        for i, line in enumerate(lines):
            sel = sorted((r for r in loads if line_of(r) == line), key=lambda r: field(r, "concurrency"))
            ys = [field(r, "output_tok_s") for r in sel]
            for pct, style in (("p50", "-"), ("p90", "--")):
                xs = [_num(field(r, f"{latency}_{pct}")) for r in sel]
                pts = [(x * 1000, y, r) for x, y, r in zip(xs, ys, sel) if x is not None]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=style, marker="o", color=f"C{i}",
                        label=f"{pct}: {line}" if len(lines) > 1 else pct)
                for x, y, r in pts:
                    queued = "*" if field(r, "queued_in_server") else ""
                    ax.annotate(f"c={field(r, 'concurrency')}{queued}", (x, y), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=f"C{i}")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("output tokens / s (all requests)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"throughput against {title}", fontsize=10)
    queued = any(field(r, "queued_in_server") for r in loads)
    fig.suptitle("under load: one point per concurrency level c" + (" (* more than the server runs at once: "
                 "the rest queue)" if queued else ""), fontsize=10)
    return Figures([save_figure(fig, out_dir / "load_throughput_latency.png")])


# ---- sweeps -----------------------------------------------------------------------------------


def sweep_by_knob(records: Sequence[dict], out_dir: Path) -> list[Path]:
    """For each sweep and each knob it varies: prefill and decode against the knob's value,
    one line per input length and setting of the other knobs; failed combinations marked."""
    swept = [r for r in records if r["kind"] in ("bench", "sweep_failure") and field(r, "params.sweep")]
    paths = []
    for sweep_name in sorted({field(r, "params.sweep") for r in swept}):
        recs = [r for r in swept if field(r, "params.sweep") == sweep_name]
        serves = [field(r, "params.serve") or {} for r in recs]
        knobs = sorted({k for s in serves for k in s})
        for knob in knobs:
            values = {repr(s.get(knob)) for s in serves}
            if len(values) < 2:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            ok = [r for r in recs if r["kind"] == "bench"]
            x_of = _axis(sorted({(field(r, "params.serve") or {}).get(knob) for r in recs}, key=_order))
            for ax, metric, label in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "decode tok/s")):
                lines: dict[str, dict] = {}
                for r in ok:
                    serve = field(r, "params.serve") or {}
                    others = ", ".join(f"{k}={v}" for k, v in sorted(serve.items()) if k != knob)
                    line = f"L={field(r, 'input_len')}" + (f"; {others}" if others else "")
                    lines.setdefault(line, {}).setdefault(serve.get(knob), []).append(field(r, "metrics." + metric))
                for line, by_value in sorted(lines.items()):
                    xs = sorted(by_value, key=_order)
                    stats = [results.summarize(by_value[v]) for v in xs]
                    ax.errorbar([x_of(v) for v in xs], [s["mean"] for s in stats],
                                yerr=[s["stdev"] or 0 for s in stats], marker="o", capsize=3, label=line)
                failed = [r for r in recs if r["kind"] == "sweep_failure"]
                for r in failed:
                    v = (field(r, "params.serve") or {}).get(knob)
                    ax.scatter([x_of(v)], [0], marker="x", color="red", s=60, zorder=5,
                               label="failed (see report)" if r is failed[0] else None)
                if all(isinstance(v, int) for v in (field(r, "params.serve") or {}).values() for r in recs):
                    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
                ax.set_xlabel(knob)
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=6)
            fig.suptitle(f"sweep {sweep_name}: by {knob}", fontsize=10)
            safe = "".join(c if c.isalnum() else "_" for c in f"{sweep_name}_{knob}").strip("_")
            paths.append(save_figure(fig, out_dir / f"sweep_{safe}.png"))
    return Figures(paths)


def _order(v):
    return (0, float(v)) if _num(v) is not None else (1, str(v))


def _axis(values: list):
    """Numbers stay numbers on the x axis; anything else gets a category position."""
    if all(_num(v) is not None for v in values):
        return lambda v: float(v)
    pos = {repr(v): i for i, v in enumerate(values)}
    return lambda v: pos.get(repr(v), -1)


# ---- kernel microbenchmark (records of ktutorial.kernel_bench) ---------------------------------

KT_KIND = "kt_kernel_moe"  # one (threads, phase, tokens) run of kt-kernel's FP8 MoE layer
BANDWIDTH_KIND = "host_bandwidth"  # the host's copy bandwidth at a thread count, same run
LLAMACPP_KIND = "llamacpp_layer"
HYBRID_KIND = "hybrid_layer"


def _host(rec: dict) -> str:
    return str(field(rec, "env.cpu_model") or "?")


def layer_tok_s(rec: dict) -> Optional[float]:
    """Tokens per second through one MoE layer (both engines report ms per token per layer)."""
    ms = _num(field(rec, "per_token_ms_per_layer"))
    if ms:
        return 1000.0 / ms
    tokens, lat = _num(field(rec, "tokens")), _num(field(rec, "latency_ms"))
    return tokens / (lat / 1000) if tokens and lat else None


def best_threads(records: Iterable[dict], phase: str = "decode", tokens: Optional[int] = None,
                 host: Optional[str] = None, shape: Optional[str] = None) -> Optional[dict]:
    """The thread count with the lowest median latency for one phase and token count (decode:
    the smallest token count measured), on one host and layer shape (default: the first seen)."""
    kt = [r for r in records if r["kind"] == KT_KIND and field(r, "phase") == phase]
    if host is None and kt:
        host = _host(kt[0])
    if shape is None and kt:
        shape = field(kt[0], "shape")
    kt = [r for r in kt if _host(r) == host and field(r, "shape") == shape]
    if not kt:
        return None
    if tokens is None:
        tokens = min(field(r, "tokens") for r in kt)
    kt = [r for r in kt if field(r, "tokens") == tokens and _num(field(r, "latency_ms")) is not None]
    if not kt:
        return None
    top = min(kt, key=lambda r: field(r, "latency_ms"))
    layers = field(top, "metrics.ceiling_tok_s_62_layers")
    return {
        "host": host, "shape": shape, "phase": phase, "tokens": tokens, "threads": field(top, "threads"),
        "latency_ms": field(top, "latency_ms"), "expert_gb_s": field(top, "expert_gb_s"),
        "bandwidth_ratio": field(top, "bandwidth_ratio"), "tflop_s": field(top, "tflop_s"),
        "ceiling_tok_s_62_layers": layers,
    }  # fmt: skip


def _spread(rec: dict, value: Optional[float]) -> tuple[float, float]:
    """Error bar of a rate from the latency's p10/p90 (a rate is inversely proportional)."""
    lat, p10, p90 = (_num(field(rec, k)) for k in ("latency_ms", "latency_ms_p10", "latency_ms_p90"))
    if value is None or not lat or not p10 or not p90:
        return 0.0, 0.0
    return max(0.0, value - value * lat / p90), max(0.0, value * lat / p10 - value)


def kernel_vs_threads(records: Sequence[dict], out_dir: Path) -> list[Path]:
    """kt-kernel GB/s of expert weights against threads (decode) beside the host's copy bandwidth
    measured in the same run, the best thread count named; TFLOP/s against threads (prefill)."""
    kt = [r for r in records if r["kind"] == KT_KIND]
    if not kt:
        return Figures()
    bws = [r for r in records if r["kind"] == BANDWIDTH_KIND]
    runs = list(dict.fromkeys((_host(r), field(r, "shape")) for r in kt))
    paths = []
    for h_i, (host, shape) in enumerate(runs):
        hk = [r for r in kt if _host(r) == host and field(r, "shape") == shape]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, phase, metric, ylabel in ((axes[0], "decode", "expert_gb_s", "GB/s of expert weights"),
                                          (axes[1], "prefill", "tflop_s", "TFLOP/s")):
            sel = [r for r in hk if field(r, "phase") == phase]
            for t in sorted({field(r, "tokens") for r in sel}):
                rows = sorted((r for r in sel if field(r, "tokens") == t), key=lambda r: field(r, "threads"))
                ys = [_num(field(r, metric)) for r in rows]
                err = list(zip(*[_spread(r, y) for r, y in zip(rows, ys)])) if rows else [[], []]
                ax.errorbar([field(r, "threads") for r in rows], ys, yerr=err, marker="o", capsize=3,
                            label=f"{t} token{'s' if t != 1 else ''} / layer" if phase == "decode" else f"{t}-token chunk")
            if phase == "decode":
                hb = sorted((r for r in bws if _host(r) == host), key=lambda r: field(r, "threads"))
                if hb:
                    ax.plot([field(r, "threads") for r in hb], [field(r, "copy_gb_s") for r in hb], color="gray",
                            linestyle="--", marker=".", label="host copy bandwidth (same run)")
                best = best_threads(hk, "decode", host=host, shape=shape)
                if best:
                    ax.axvline(best["threads"], color="green", alpha=0.4)
                    ax.set_title(f"decode: best at {best['threads']} thread{'s' if best['threads'] != 1 else ''} "
                                 f"({best['latency_ms']:.2f} ms / layer)", fontsize=10)
            else:
                ax.set_title("prefill chunks", fontsize=10)
            ax.set_xlabel("threads")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if sel:
                ax.legend(fontsize=7)
        fig.suptitle(f"kt-kernel FP8 MoE layer, shape {shape}, on {host}", fontsize=10)
        name = "kernel_threads.png" if len(runs) == 1 else f"kernel_threads_{h_i + 1}.png"
        paths.append(save_figure(fig, out_dir / name))
    return Figures(paths)


def llamacpp_vs_kt(records: Sequence[dict], out_dir: Path) -> list[Path]:
    """Tokens/s through one MoE layer against threads: llama.cpp (Q8_0) beside kt-kernel (FP8), CPU only."""
    llama = [r for r in records if r["kind"] == LLAMACPP_KIND]
    kt = [r for r in records if r["kind"] == KT_KIND]
    if not llama:
        return Figures()
    runs = list(dict.fromkeys((_host(r), field(r, "shape")) for r in llama))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase in ((axes[0], "decode"), (axes[1], "prefill")):
        for host, shape in runs:
            where = f" [{shape}, {host}]" if len(runs) > 1 else ""
            for name, recs, style in (("kt-kernel FP8", kt, "-"), ("llama.cpp Q8_0", llama, "--")):
                sel = [r for r in recs if field(r, "phase") == phase and (_host(r), field(r, "shape")) == (host, shape)]
                for t in sorted({field(r, "tokens") for r in sel}):
                    by_threads: dict[Any, list] = {}
                    for r in sel:
                        if field(r, "tokens") == t:
                            by_threads.setdefault(field(r, "threads"), []).append(layer_tok_s(r))
                    xs = sorted(k for k in by_threads if _num(k) is not None)
                    stats = [results.summarize(by_threads[x]) for x in xs]
                    if xs and any(st["mean"] for st in stats):
                        ax.errorbar(xs, [st["mean"] for st in stats], yerr=[st["stdev"] or 0 for st in stats],
                                    linestyle=style, marker="o", capsize=3, label=f"{name}, {t} tok{where}")
        ax.set_yscale("log")
        ax.set_xlabel("threads")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("tokens / s through one layer")
        ax.set_title(phase, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    shapes = ", ".join(sorted({str(sh) for _, sh in runs}))
    fig.suptitle(f"one MoE layer (shape {shapes}), CPU only: llama.cpp beside kt-kernel", fontsize=10)
    return Figures([save_figure(fig, out_dir / "llamacpp_vs_kt.png")])


# ---- hybrid layer -----------------------------------------------------------------------------


def hybrid_vs_gpu_experts(records: Sequence[dict], out_dir: Path) -> list[Path]:
    """Layer latency against the number of experts on the GPU, CPU-only and GPU-only ends marked.

    One panel per token count: a decoded token takes milliseconds and a prefill chunk seconds,
    so on one axis the decode lines would lie flat on zero."""
    hyb = [r for r in records if r["kind"] == HYBRID_KIND]
    if not hyb:
        return Figures()
    groups = results.compare(hyb, ["routing", "gpu_kernel", "tokens", "n_gpu_experts"], metrics=["latency_ms"])
    token_counts = sorted({g["key"]["tokens"] for g in groups}, key=_order)
    fig, axes = plt.subplots(1, len(token_counts), figsize=(5.5 * len(token_counts), 4.5), squeeze=False)
    all_x = [g["key"]["n_gpu_experts"] for g in groups if _num(g["key"]["n_gpu_experts"]) is not None]
    n_experts = (max(_num(field(r, "experts")) or 0 for r in hyb) or max(all_x)) if all_x else None
    for ax, tokens in zip(axes[0], token_counts):
        lines: dict[tuple, list] = {}
        for g in groups:
            if g["key"]["tokens"] == tokens:
                lines.setdefault((g["key"]["routing"], g["key"]["gpu_kernel"]), []).append(g)
        for (routing, kernel), gs in sorted(lines.items(), key=lambda kv: str(kv[0])):
            gs = sorted(gs, key=lambda g: _order(g["key"]["n_gpu_experts"]))
            ax.errorbar([g["key"]["n_gpu_experts"] for g in gs], [g["metrics"]["latency_ms"]["mean"] for g in gs],
                        yerr=[g["metrics"]["latency_ms"]["stdev"] or 0 for g in gs], marker="o", capsize=3,
                        label=f"{routing} routing, GPU half: {kernel or 'torch loop (bf16)'}")
        if all_x:
            lo = min(all_x)
            ax.axvline(lo, color="gray", linestyle=":")
            ax.axvline(n_experts, color="gray", linestyle=":")
            ax.annotate("CPU only", (lo, 1), xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8)
            ax.annotate("GPU only", (n_experts, 1), xycoords=("data", "axes fraction"), ha="right", va="top",
                        fontsize=8)
        ax.set_xlabel("experts per layer on the GPU")
        ax.set_ylabel("layer latency (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{tokens} token{'s' if str(tokens) != '1' else ''} per layer call", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("hybrid MoE layer: GPU experts + kt-kernel CPU experts, run concurrently", fontsize=10)
    return Figures([save_figure(fig, out_dir / "hybrid_gpu_experts.png")])


# ---- planner memory ----------------------------------------------------------------------------


def _flatten_gb(obj: Any, prefix: str = "") -> dict[str, float]:
    """{"gpu.kv_cache": 4.1, ...} from a memory breakdown (dict, pydantic or dataclass)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    elif hasattr(obj, "__dataclass_fields__"):
        obj = dataclasses.asdict(obj)
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (dict,)) or hasattr(v, "model_dump") or hasattr(v, "__dataclass_fields__"):
                out.update(_flatten_gb(v, name))
            elif _num(v) is not None:
                out[name] = float(v)
    return out


def _plan_parts(memory: Any) -> Optional[list[tuple[str, str, dict[str, float], Optional[float]]]]:
    """(title, unit, parts, capacity) per device from ktutorial.plan's Plan.memory, if it is one."""
    if hasattr(memory, "memory"):
        memory = memory.memory
    if hasattr(memory, "model_dump"):  # ktutorial.plan's MemoryBreakdown
        memory = memory.model_dump()
    if not isinstance(memory, dict):
        return None
    gpu, host = memory.get("gpu") or {}, memory.get("host") or {}
    out = []
    if isinstance(gpu.get("per_gpu_gib"), dict):
        n = gpu.get("gpus") or 1
        out.append((f"GPU, each of {n}" if n > 1 else "GPU", "GiB",
                    {k: float(v) for k, v in gpu["per_gpu_gib"].items() if _num(v)}, _num(gpu.get("capacity_gib"))))
    if isinstance(host.get("parts_gb"), dict):
        out.append(("host RAM", "GB", {k: float(v) for k, v in host["parts_gb"].items() if _num(v)},
                    _num(host.get("available_gb"))))
    return out or None


def _stacked(ax, parts: dict[str, float], capacity: Optional[float], unit: str, title: str) -> None:
    bottom = 0.0
    total = sum(v for v in parts.values() if v > 0)
    for item, value in sorted(parts.items(), key=lambda kv: -kv[1]):
        if value <= 0:
            continue
        ax.bar(0, value, bottom=bottom, width=0.6, edgecolor="white", label=f"{item} {value:.2f}")
        if value >= 0.05 * max(total, capacity or 0):
            ax.text(0, bottom + value / 2, f"{item} {value:.1f}", ha="center", va="center", fontsize=7)
        bottom += value
    if capacity:
        ax.axhline(capacity, color="red", linestyle="--", label=f"capacity {capacity:g} {unit}")
    # every part in the legend, the small ones too (too thin to label on the bar)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=6, loc="upper left", bbox_to_anchor=(0.55, 1.0))
    ax.set_xticks([])
    ax.set_xlim(-0.4, 1.4)
    ax.set_ylabel(unit)
    ax.set_title(f"{title}: {total:.1f} {unit} planned", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)


def memory_breakdown(memory: Any, out_dir: Path, title: str = "planned memory") -> list[Path]:
    """Stacked bars of the planner's memory breakdown (ktutorial.plan's Plan.memory: each GPU's
    parts in GiB against its capacity, host RAM's parts in GB against what the machine has).
    Other shapes: numbers grouped by their first key, capacities ("total", "capacity",
    "available") drawn as lines."""
    devices = _plan_parts(memory)
    if devices is None:
        flat = _flatten_gb(memory)
        grouped: dict[str, dict[str, float]] = {}
        limits: dict[str, float] = {}
        for name, value in flat.items():
            device, _, item = name.partition(".")
            if not item:
                device, item = "memory", name
            if any(w in item for w in ("total", "capacity", "available")):
                limits[device] = max(limits.get(device, 0.0), value)
            else:
                grouped.setdefault(device, {})[item] = value
        devices = [(d, "GB", parts, limits.get(d)) for d, parts in sorted(grouped.items())]
    devices = [d for d in devices if d[2]]
    if not devices:
        return Figures()
    fig, axes = plt.subplots(1, len(devices), figsize=(4.2 * len(devices), 5))
    axes = [axes] if len(devices) == 1 else list(axes)
    for ax, (name, unit, parts, capacity) in zip(axes, devices):
        _stacked(ax, parts, capacity, unit, name)
    fig.suptitle(title, fontsize=10)
    return Figures([save_figure(fig, out_dir / "plan_memory.png")])


# ---- performance model -----------------------------------------------------------------------


def published_prediction(records: Sequence[dict], out_dir: Path) -> Figures:
    """perfmodel_vs_published for the model fitted on `records` (none without M2.1-width records)."""
    try:
        rows = perfmodel.published_comparison(records)
    except perfmodel.FitError:
        return Figures()
    return perfmodel_vs_published(rows, out_dir)


def perfmodel_vs_published(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """Predicted (ktutorial.perfmodel, fitted on our host) beside published prefill and decode tok/s
    against prompt length, one colour per published configuration; published dashed, as elsewhere."""
    if not rows:
        return Figures()
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, title in ((axes[0], "prefill_tok_s", "prefill (tok/s)"), (axes[1], "decode_tok_s", "decode (tok/s)")):
        for i, config in enumerate(configs):
            sel = sorted((r for r in rows if r["config"] == config), key=lambda r: r["prompt_len"])
            xs = [r["prompt_len"] for r in sel]
            color = f"C{i}"
            ax.plot(xs, [r[f"predicted_{metric}"] for r in sel], marker="o", color=color, label=f"predicted: {config}")
            ax.plot(xs, [r[f"published_{metric}"] for r in sel], marker="x", linestyle="--", alpha=0.7, color=color,
                    label=f"published: {config}")
            for r in sel:
                ax.annotate(f"{r[metric.split('_')[0] + '_rel_err'] * 100:+.0f}%", (r["prompt_len"], r[f"predicted_{metric}"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(title)
        ax.set_title(f"{title}: model against the published table", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("SGLang + KT on MiniMax-M2.1: predicted from our host's records (no fit to the published figures)",
                 fontsize=10)
    return Figures([save_figure(fig, out_dir / "perfmodel_vs_published.png")])



# ---- figures of the notebooks (download, launch, requests, comparison, Claude Code) ----------------


def download_files(plan, out_dir: Path) -> list[Path]:
    """Each file of a download by size (log scale), weights and the rest apart; free disk noted."""

    files = sorted(plan.files, key=lambda f: -f.size)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(files) + 1)))
    colors = ["#1f77b4" if f.path.endswith(".safetensors") else "#aaaaaa" for f in files]
    ax.barh([f.path for f in files], [f.size / 1e6 for f in files], color=colors)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("MB (log scale)")
    total = plan.bytes_total / 1e9
    free = (plan.free_bytes + plan.bytes_reclaimable) / 1e9
    ax.set_title(f"{plan.repo_id}: {len(files)} files, {total:.3g} GB (weights in blue); "
                 f"{free:.0f} GB free here", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.tick_params(axis="y", labelsize=7)

    return Figures([save_figure(fig, Path(out_dir) / "download_files.png")])


def gpu_experts_tradeoff(plan, out_dir: Path) -> list[Path]:
    """`--kt-num-gpu-experts` against the KV-cache tokens that still fit on the card, from the
    plan's own VRAM breakdown (bf16 and FP8 KV cache); the plan's choice marked."""

    gpu = plan.memory["gpu"]
    parts = gpu["per_gpu_gib"]
    capacity = gpu["capacity_gib"]
    per_expert = gpu["gib_per_gpu_expert"]
    fixed = sum(v for k, v in parts.items() if k not in ("gpu_experts", "kv_cache"))
    free = capacity - fixed
    kv_bf16 = plan.spec.kv_bytes_per_token("bf16") / gpu["tp"]
    kv_fp8 = plan.spec.kv_bytes_per_token("fp8") / gpu["tp"]
    n_max = max(1, int(free / per_expert))
    ns = list(range(0, n_max + 1))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, per_token in (("bf16 KV cache", kv_bf16), ("FP8 KV cache", kv_fp8)):
        ax.plot(ns, [max(0.0, (free - n * per_expert) * 2**30 / per_token) / 1000 for n in ns], marker=".", label=label)
    chosen = plan.settings.get("kt-num-gpu-experts")
    if chosen is not None:
        ax.axvline(chosen.value, color="green", alpha=0.5)
        ax.annotate(f"plan: {chosen.value} experts, {gpu['kv_pool_tokens'] / 1000:.0f}k tokens",
                    (chosen.value, gpu["kv_pool_tokens"] / 1000), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("--kt-num-gpu-experts (experts per layer on the GPU)")
    ax.set_ylabel("KV-cache tokens that fit (thousands)")
    ax.set_title(f"{plan.hardware.gpu_name}: {free:.1f} of {capacity:g} GiB left after the fixed parts; "
                 f"{per_expert:.2f} GiB per GPU expert", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)

    return Figures([save_figure(fig, Path(out_dir) / "gpu_experts_tradeoff.png")])


def token_times(record: dict, out_dir: Path) -> list[Path]:
    """One measured request: when each token arrived, with TTFT and the decode slope drawn."""

    times = record["samples"]["token_times_s"]
    m, p = record["metrics"], record["params"]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot([t * 1000 for t in times], range(1, len(times) + 1), marker=".", label="tokens received")
    ax.axvline(m["ttft_s"] * 1000, color="orange", linestyle="--",
               label=f"TTFT {m['ttft_s'] * 1000:.0f} ms -> prefill {m['prefill_tok_s']:.0f} tok/s")
    ax.plot([m["ttft_s"] * 1000, m["e2e_s"] * 1000], [1, len(times)], color="green", alpha=0.6,
            label=f"decode {m['decode_tok_s']:.1f} tok/s = (n - 1) / (e2e - TTFT)")
    ax.set_xlabel("ms since the request was sent")
    ax.set_ylabel("tokens received")
    ax.set_title(f"one request: {p['input_len']}-token prompt, {m['output_tokens']} tokens out ({p['engine']})",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")

    return Figures([save_figure(fig, Path(out_dir) / "token_times.png")])


def kt_vs_llamacpp_ratios(published: dict, records: Sequence[dict], out_dir: Path) -> list[Path]:
    """KT over llama.cpp, prefill and decode: the published end-to-end ratio (GPU machine) beside
    the ratio measured through one M2.1 layer on the device host's CPU. Best against best."""

    rows = published["llamacpp_comparison"]
    kt = next(r for r in rows if r["config"].startswith("KT"))
    others = [r for r in rows if r is not kt]
    pub = {m: kt[f"{m}_tok_s"] / max(r[f"{m}_tok_s"] for r in others) for m in ("prefill", "decode")}
    ours = {}
    for m in ("prefill", "decode"):
        k = _best_layer_tok_s(records, KT_KIND, m)
        ll = _best_layer_tok_s(records, LLAMACPP_KIND, m)
        ours[m] = k / ll if k and ll else None
    fig, ax = plt.subplots(figsize=(7.5, 4))
    xs = range(2)
    width = 0.38
    labels = ("prefill", "decode")
    bars_pub = ax.bar([x - width / 2 for x in xs], [pub[m] for m in labels], width,
                      label="published: SGLang + KT vs llama.cpp, end to end, 2 x RTX 5090 + EPYC 9355", color="#999999")
    bars_ours = ax.bar([x + width / 2 for x in xs], [ours[m] or 0 for m in labels], width,
                       label="measured: kt-kernel vs llama.cpp, one M2.1 layer, CPU only (device host)", color="#1f77b4")
    for bars in (bars_pub, bars_ours):
        for b in bars:
            ax.annotate(f"{b.get_height():.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("KT / llama.cpp (best against best)")
    ax.set_title("How much faster KT is: published beside measured", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)

    return Figures([save_figure(fig, Path(out_dir) / "kt_vs_llamacpp_ratios.png")])


def claude_code_checks(checks: Sequence, out_dir: Path) -> list[Path]:
    """Seconds each replayed part of a Claude Code request took (the big ones are prefill)."""

    rows = [c for c in checks if c.elapsed_s is not None]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    ax.barh([c.name[:60] for c in rows], [c.elapsed_s for c in rows],
            color=["#2ca02c" if c.ok else "#d62728" for c in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("each part of a Claude Code request, replayed (green: works)", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)

    return Figures([save_figure(fig, Path(out_dir) / "claude_code_checks.png")])


def _best_layer_tok_s(records: Sequence[dict], kind: str, phase: str) -> Optional[float]:
    values = [layer_tok_s(r) for r in records if r["kind"] == kind and field(r, "phase") == phase]
    values = [v for v in values if v]
    return max(values) if values else None

