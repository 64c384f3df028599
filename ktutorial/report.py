"""Tables and charts from records: `write_report(["results.jsonl"], "build/report")`.

The main table has the published table's shape (prefill / decode tok/s at each input length, per
configuration) with what the published one lacked: mean ± sample stdev and the run count n. Every
number comes from records through `results.compare`; `summary.json` beside the markdown holds the
exact values the tables round.
"""

from __future__ import annotations

import json
import statistics
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from ktutorial import load, perfmodel, plots, results, server
from ktutorial.diagnose import diagnose
from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError
from ktutorial.plots import KT_KIND, LLAMACPP_KIND, best_threads, layer_tok_s
from ktutorial.profiles import load_profile
from ktutorial.results import field, scrub, summarize
from ktutorial.tables import Markdown, fmt, markdown_table, md_cell, shows_markdown, table  # noqa: F401 (md_cell: callers import it from here)

LAYERS_M21 = 62  # MiniMax-M2.1: every one of its 62 layers is a MoE layer


def load_published() -> dict[str, Any]:
    """The KTransformers tutorial's published figures (ktutorial/data/published.yaml)."""
    text = (resources.files("ktutorial") / "data" / "published.yaml").read_text()
    return yaml.safe_load(text)


def _pm(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    return f"{fmt(s['mean'])} ± {fmt(s['stdev'])}" if s["n"] > 1 else fmt(s["mean"])


_md = markdown_table


def _hardware(recs: Sequence[dict]) -> tuple[str, str]:
    """GPU and CPU of a group of records, in the published table's words."""
    env = recs[0]["env"]
    gpus = env.get("gpus") or []
    names = sorted({g.get("name", "?") for g in gpus})
    gpu = f"{len(gpus)} × {names[0]}" if len(names) == 1 else (", ".join(names) or "none")
    cores = env.get("cpu_physical_cores")
    numa = env.get("numa_nodes")
    cpu = f"{env.get('cpu_model') or '?'} ({cores} cores" + (f", {numa} NUMA" if numa and numa > 1 else "") + ")"
    return gpu, cpu


# ---- tables ------------------------------------------------------------------------------------


def bench_summary(records: Sequence[dict], config_key: str = "config") -> list[dict]:
    """compare() of bench records by configuration and input length."""
    bench = results.filter_records(records, kind="bench")
    return results.compare(
        bench,
        [config_key, "output_len", "input_len"],
        metrics=["prefill_tok_s", "decode_tok_s", "ttft_s", "server_prefill_tok_s", "server_decode_tok_s",
                 "decode_rel_diff", "prefill_rel_diff"],
    )


@shows_markdown
def bench_table(records: Sequence[dict], config_key: str = "config") -> str:
    """The published table's format: prefill / decode (mean ± stdev, n) per input length."""
    bench = results.filter_records(records, kind="bench")
    if not bench:
        return ""
    groups = bench_summary(bench, config_key)
    lens = sorted({g["key"]["input_len"] for g in groups})
    # One row per configuration and output length: a different output length is a different run.
    rows_keys = list(dict.fromkeys((g["key"][config_key], g["key"]["output_len"]) for g in groups))
    rows = []
    for config, out_len in rows_keys:
        recs = [r for r in bench if field(r, config_key) == config and field(r, "output_len") == out_len]
        gpu, cpu = _hardware(recs)
        env = recs[0]["env"]
        engine = f"{env.get('engine') or '?'} {env.get('engine_version') or ''}".strip()
        cells = []
        for length in lens:
            g = next((g for g in groups if (g["key"][config_key], g["key"]["output_len"]) == (config, out_len)
                      and g["key"]["input_len"] == length), None)
            if g is None:
                cells.append("")
                continue
            p, d = g["metrics"]["prefill_tok_s"], g["metrics"]["decode_tok_s"]
            cells.append(f"{_pm(p)} / {_pm(d)} (n={g['n']})")
        rows.append([config, engine, gpu, cpu, out_len, *cells])
    return _md(["configuration", "engine", "GPU", "CPU", "output", *map(str, lens)], rows)


@shows_markdown
def agreement_table(records: Sequence[dict], config_key: str = "config") -> str:
    """Client figures beside the server's own, and the two checks on every request."""
    bench = results.filter_records(records, kind="bench")
    if not any(field(r, "server_decode_tok_s") is not None or field(r, "server_prompt_tokens") is not None for r in bench):
        return ""
    rows = []
    for g in bench_summary(bench, config_key):
        recs = [r for r in bench if all(field(r, k) == v for k, v in g["key"].items())]
        m = g["metrics"]
        exact = sum(1 for r in recs if field(r, "prompt_len_ok") is True)
        hits = sum(1 for r in recs if field(r, "prefix_cache_hit") is True)
        known = sum(1 for r in recs if field(r, "prompt_len_ok") is not None)
        # The median: one request whose stream reached the client in a burst (a busy client
        # machine) should not hide that the others agree.
        rels = [v for v in (field(r, "decode_rel_diff") for r in recs) if isinstance(v, (int, float))]
        # SGLang reports no decode rate of its own, only its end-to-end latency: compare that
        what = "decode"
        if not rels:
            rels = [v for v in (field(r, "e2e_rel_diff") for r in recs) if isinstance(v, (int, float))]
            what = "e2e"
        rel = statistics.median(rels) if rels else None
        delays = [v for v in (field(r, "first_token_delay_ms") for r in recs) if isinstance(v, (int, float))]
        delay = fmt(statistics.median(delays)) if delays else "-"
        rows.append([
            g["key"][config_key], g["key"]["output_len"], g["key"]["input_len"],
            _pm(m["decode_tok_s"]), _pm(m["server_decode_tok_s"]),
            "-" if rel is None else f"{rel * 100:+.1f}% ({what})",
            _pm(m["prefill_tok_s"]), _pm(m["server_prefill_tok_s"]),
            f"{exact}/{known}" if known else "-", f"{hits}/{known}" if known else "-", delay,
        ])  # fmt: skip
    return _md(
        ["configuration", "output", "input", "decode (client)", "decode (server)", "client vs server (median)",
         "prefill (client)", "prefill (server)", "prompt exactly L", "prefix-cache hits",
         "first-token delay ms (median)"],
        rows,
    )


def published_table(published: dict) -> str:
    rows = []
    lens = sorted({int(k) for row in published["rows"] for k in row["results"]})
    for row in published["rows"]:
        cells = [f"{fmt(row['results'][n][0])} / {fmt(row['results'][n][1])}" if n in row["results"] else "" for n in lens]
        rows.append([f"published: {row['config']}", row["gpu"], row["cpu"], row["pcie"], *cells])
    return _md(["configuration", "GPU", "CPU", "PCIe", *map(str, lens)], rows)


@shows_markdown
def sweep_table(records: Sequence[dict]) -> str:
    swept = [r for r in records if r["kind"] in ("bench", "sweep_failure") and field(r, "params.sweep")]
    if not swept:
        return ""
    out = []
    for name in sorted({field(r, "params.sweep") for r in swept}):
        recs = [r for r in swept if field(r, "params.sweep") == name]
        knobs = sorted({k for r in recs for k in (field(r, "params.serve") or {})})
        lens = sorted({field(r, "input_len") for r in recs if r["kind"] == "bench"})
        rows = []
        for key in dict.fromkeys(field(r, "params.combination_key") for r in recs):
            crecs = [r for r in recs if field(r, "params.combination_key") == key]
            serve = field(crecs[0], "params.serve") or {}
            knob_cells = [serve.get(k, "") for k in knobs]
            fail = next((r for r in crecs if r["kind"] == "sweep_failure"), None)
            cells = []
            for length in lens:
                sel = [r for r in crecs if r["kind"] == "bench" and field(r, "input_len") == length]
                if not sel:
                    cells.append("")
                    continue
                p = results.summarize(field(r, "prefill_tok_s") for r in sel)
                d = results.summarize(field(r, "decode_tok_s") for r in sel)
                cells.append(f"{_pm(p)} / {_pm(d)} (n={len(sel)})")
            status = f"FAILED ({fail['metrics'].get('failure')}): {fail['metrics'].get('diagnosis')}" if fail else "ok"
            rows.append([*knob_cells, *cells, status])
        out.append(f"#### sweep `{name}`\n\n" + _md([*knobs, *map(str, lens), "status"], rows))
    return "\n\n".join(out)


def kernel_summary(records: Sequence[dict]) -> list[dict]:
    """kt-kernel runs by host, phase, token count and threads (medians of each run's calls)."""
    kt = [r for r in records if r["kind"] == KT_KIND]
    return results.compare(
        kt, ["env.cpu_model", "shape", "phase", "tokens", "threads"],
        metrics=["latency_ms", "latency_ms_p10", "latency_ms_p90", "expert_gb_s", "copy_gb_s",
                 "bandwidth_ratio", "tflop_s", "ceiling_tok_s_62_layers"],
    )  # fmt: skip


def kernel_table(records: Sequence[dict]) -> tuple[str, Optional[dict]]:
    """kt-kernel per thread count with its share of the host's measured bandwidth, the best
    thread count, and the CPU-only ceilings for 62 layers, per host."""
    kt = [r for r in records if r["kind"] == KT_KIND]
    if not kt:
        return "", None
    groups = kernel_summary(kt)
    runs = list(dict.fromkeys((g["key"]["env.cpu_model"], g["key"]["shape"]) for g in groups))
    parts, bests = [], {}
    for host, shape in runs:
        rows = []
        for g in groups:
            if (g["key"]["env.cpu_model"], g["key"]["shape"]) != (host, shape):
                continue
            m = g["metrics"]
            lat = m["latency_ms"]["mean"]
            spread = f" ({fmt(m['latency_ms_p10']['mean'])}–{fmt(m['latency_ms_p90']['mean'])})" if m["latency_ms_p10"]["mean"] else ""
            ratio = m["bandwidth_ratio"]["mean"]
            rows.append([
                g["key"]["phase"], g["key"]["tokens"], g["key"]["threads"], f"{fmt(lat)}{spread}",
                fmt(m["expert_gb_s"]["mean"]), fmt(m["copy_gb_s"]["mean"]),
                "-" if ratio is None else f"{ratio:.0%}", fmt(m["tflop_s"]["mean"]),
                fmt(m["ceiling_tok_s_62_layers"]["mean"]),
            ])  # fmt: skip
        table = _md(["phase", "tokens / layer", "threads", "latency ms median (p10–p90)", "expert GB/s",
                     "host copy GB/s", "of bandwidth", "TFLOP/s", f"{LAYERS_M21}-layer ceiling tok/s"], rows)
        lines = []
        best = best_threads(kt, "decode", host=host, shape=shape)
        if best:
            lines.append(
                f"**Best thread count for decode ({best['tokens']} token a layer): {best['threads']}** "
                f"({fmt(best['latency_ms'])} ms a layer, {fmt(best['expert_gb_s'])} GB/s of expert weights); "
                f"CPU-only decode ceiling for {LAYERS_M21} layers: {fmt(best['ceiling_tok_s_62_layers'])} tok/s."
            )
        prefill = [r for r in kt if _host_of(r) == host and field(r, "shape") == shape and field(r, "phase") == "prefill"]
        if prefill:
            top = max(prefill, key=lambda r: field(r, "ceiling_tok_s_62_layers") or 0)
            pbest = best_threads(kt, "prefill", tokens=field(top, "tokens"), host=host, shape=shape)
            if pbest:
                lines.append(
                    f"Best prefill: {pbest['tokens']}-token chunks at {pbest['threads']} "
                    f"thread{'s' if pbest['threads'] != 1 else ''}, "
                    f"{fmt(pbest['tflop_s'])} TFLOP/s; CPU-only prefill ceiling for {LAYERS_M21} layers: "
                    f"{fmt(pbest['ceiling_tok_s_62_layers'])} tok/s."
                )
                best = dict(best or {}, prefill=pbest)
        bests[f"{host} / {shape}"] = best
        parts.append(f"#### {host}, layer shape {shape}\n\n{table}\n\n" + "\n".join(lines))
    return "\n\n".join(parts), bests


def _host_of(rec: dict) -> str:
    return str(field(rec, "env.cpu_model") or "?")


@shows_markdown
def llamacpp_table(records: Sequence[dict]) -> str:
    """llama.cpp and kt-kernel through one layer at the same threads, and their ratio."""
    llama = [r for r in records if r["kind"] == LLAMACPP_KIND]
    if not llama:
        return ""
    kt = [r for r in records if r["kind"] == KT_KIND]
    rows = []
    def key(r):
        return (_host_of(r), str(field(r, "shape")), field(r, "phase"), field(r, "threads"))

    for host, shape, phase, threads in sorted({key(r) for r in llama}, key=lambda k: (k[0], k[1], k[2], k[3])):
        lsel = [r for r in llama if key(r) == (host, shape, phase, threads)]
        ktsel = [r for r in kt if key(r) == (host, shape, phase, threads)]
        l_tok = results.summarize(layer_tok_s(r) for r in lsel)
        if ktsel:
            # decode: the smallest token count (one token); prefill: kt's best chunk
            pick = (min if phase == "decode" else max)(
                ktsel, key=lambda r: field(r, "tokens") if phase == "decode" else (layer_tok_s(r) or 0))
            k_tok, k_tokens = layer_tok_s(pick), field(pick, "tokens")
        else:
            k_tok, k_tokens = None, None
        ratio = f"{fmt(k_tok / l_tok['mean'])}×" if k_tok and l_tok["mean"] else "-"
        rows.append([host, shape, phase, threads, ", ".join(str(t) for t in sorted({field(r, "tokens") for r in lsel})),
                     _pm(l_tok), k_tokens if k_tokens is not None else "-", fmt(k_tok), ratio])
    return _md(["host", "shape", "phase", "threads", "llama.cpp tokens", "llama.cpp tok/s / layer",
                "kt-kernel tokens", "kt-kernel tok/s / layer", "kt-kernel / llama.cpp"], rows)


@shows_markdown
def hybrid_table(records: Sequence[dict]) -> str:
    """Hybrid layer latency by GPU experts: both sides at once, and each side alone."""
    hyb = [r for r in records if r["kind"] == "hybrid_layer"]  # plots.HYBRID_KIND
    if not hyb:
        return ""
    # The GPU kernel is part of the key: the first records' torch loop and the fused kernel never merge.
    groups = results.compare(hyb, ["gpu_kernel", "routing", "tokens", "n_gpu_experts"],
                             metrics=["latency_ms", "gpu_ms", "cpu_ms", "gpu_coverage", "gpu_over_roofline", "overlap_ratio"])
    experts = max((field(r, "experts") or 0) for r in hyb)
    rows = []
    for g in groups:
        n = g["key"]["n_gpu_experts"]
        end = " (CPU only)" if n == 0 else " (GPU only)" if experts and n == experts else ""
        m = g["metrics"]
        cov = m["gpu_coverage"]["mean"]
        rows.append([g["key"]["gpu_kernel"] or "torch loop (bf16)", g["key"]["routing"], g["key"]["tokens"], f"{n}{end}",
                     _pm(m["latency_ms"]), _pm(m["gpu_ms"]), _pm(m["cpu_ms"]), "-" if cov is None else f"{cov:.0%}",
                     _pm(m["gpu_over_roofline"]), _pm(m["overlap_ratio"]), g["n"]])
    return _md(["GPU half", "routing", "tokens", "GPU experts", "latency ms", "GPU side ms", "CPU side ms",
                "routed to GPU", "GPU / roofline", "layer / slower side", "n"], rows)


def reply_check_table(records: Sequence[dict]) -> str:
    """The tiny model's exact replies per API and server (`reply_check` records)."""
    checks = [r for r in records if r["kind"] == "reply_check"]
    if not checks:
        return ""
    groups: dict[tuple, list[dict]] = {}
    for r in checks:
        where = r["params"].get("combination_key") and (r["params"].get("config") or r["params"]["combination_key"])
        label = (r["params"].get("profile") or r["env"].get("engine") or "-",
                 r["env"].get("model") or "-", r["params"].get("check", "openai"), bool(where))
        groups.setdefault(label, []).append(r)
    rows = [[profile, model, check, "each sweep combination" if swept else "one server",
             f"{sum(1 for r in recs if r['metrics']['exact'])}/{len(recs)}",
             next((r["metrics"].get("error") or r["metrics"].get("answer") for r in recs if not r["metrics"]["exact"]),
                  recs[0]["metrics"].get("answer"))]
            for (profile, model, check, swept), recs in groups.items()]
    return _md(["profile", "model", "API", "where", "exact", "reply (or the first that differs)"], rows)


def engine_log_table(records: Sequence[dict]) -> str:
    """What the real engine did with settings ktutorial refuses before a launch, and the diagnosis
    ktutorial made of the log it wrote (`engine_log` records)."""
    logs = [r for r in records if r["kind"] == "engine_log"]
    if not logs:
        return ""

    rows = []
    for r in logs:
        m = r["metrics"]
        # The catalog grows: diagnose the log's kept lines again with today's, beside what the run said.
        now = diagnose("\n".join(m["log_lines"]), returncode=m["returncode"], engine="sglang-kt")
        evidence = next((d.evidence for d in now if not d.evidence.startswith("exit code")), "-")
        rows.append([r["params"]["variant"], "served" if m["became_ready"] else f"died (exit {m['returncode']})",
                     fmt(m["seconds"]), ", ".join(d.id for d in now) or "none", ", ".join(m["diagnoses"]) or "none",
                     evidence.split("] ", 1)[-1][:160]])
    return _md(["launched with", "the engine", "after s", "ktutorial's diagnosis", "diagnosis at the run",
                "the line it rests on"], rows)


def published_prediction(records: Sequence[dict]) -> Markdown:
    """The performance model fitted on the GPU host's records against the published table, with
    its constants, what each miss comes from, the engine by --kt-cpuinfer and the model on another run."""
    md, _ = perfmodel.report_section(records)
    return Markdown(md or "No GPU-host records at MiniMax-M2.1's width to fit the model on: "
                          f"`{perfmodel.SYNTH_COMMAND}` makes them.")


def orphan_table(records: Sequence[dict]) -> str:
    rows = [[r["params"]["after"], r["params"]["profile"], r["metrics"]["processes_left"], r["time_utc"]]
            for r in records if r["kind"] == "orphan_check"]
    return _md(["after", "profile", "SGLang processes left", "when"], rows) if rows else ""


def _short_diagnosis(text: str) -> str:
    """A failed probe's error, without the URL before it: the engine's first sentence and
    ktutorial's explanation in brackets (the pool size), which is what a reader needs."""
    text = text.split(": ", 1)[1] if text.startswith("http") and ": " in text else text
    why = text[text.rfind(" ("):] if text.endswith(")") and " (" in text else ""
    return (text.split(". ")[0] + "." + why)[:300]


def tune_table(records: Sequence[dict]) -> str:
    """`ktutorial tune`'s searches: each boundary, the launch one step past it that failed, and why."""
    rows = []
    for r in records:
        if r["kind"] != "tune_result":
            continue
        p, m = r["params"], r["metrics"]
        gpu = ", ".join(g.get("name", "?") for g in r["env"].get("gpus") or []) or "?"
        probes = [q for q in records if q["kind"] == "tune_probe" and q["params"].get("tune") == p.get("tune")]
        rows.append([p["profile"], gpu, ", ".join(p.get("sets") or []) or "-", p["context_tokens"], len(probes),
                     m["boundary"], f"{m['first_failing']}: {m['first_failing_outcome']}",
                     md_cell(_short_diagnosis(str(m.get("first_failing_diagnosis") or ""))),
                     f"{m.get('chunked_prefill_size')} ({m.get('chunk_first_failing')} fails)"])
    return _md(["profile", "GPU", "--set", "context", "launches", "largest kt-num-gpu-experts", "one more",
                "why it failed", "chunked-prefill-size"], rows) if rows else ""


def placement_table(records: Sequence[dict]) -> str:
    """`ktutorial placement compare`: the share of held-out expert activations on GPU experts, for
    uniform against recorded (frequency) placement, through the engine."""
    rows = [[r["params"]["profile"], r["params"]["strategy"], r["params"]["gpu_experts_per_layer"],
             f"{100 * r['metrics']['gpu_activation_share']:.1f}%", f"{100 * r['metrics']['oracle_share']:.1f}%",
             r["metrics"]["activations"], "yes" if r["metrics"].get("masks_match_placement") else "no",
             "yes" if r["metrics"].get("masks_static") else "no",
             fmt(r["metrics"].get("decode_tok_s")) if r["metrics"].get("decode_tok_s") is not None else "-"]
            for r in records if r["kind"] == "placement_share"]
    return _md(["profile", "placement", "GPU experts a layer", "held-out activations on GPU experts",
                "best any placement could do", "activations", "engine's masks as placed", "masks static",
                "decode tok/s"], rows) if rows else ""


def engine_vs_kernel_table(records: Sequence[dict]) -> str:
    """Per layer at MiniMax-M2.1's shape: the engine's decode and CPU-path prefill against
    kt-kernel alone at the same threads, in one run (bench records of a synthetic checkpoint
    beside kt_kernel_moe records). The engine figure includes every per-step cost (scheduler,
    attention, sampling), spread over the layers."""
    bench = [r for r in results.filter_records(records, kind="bench") if r["env"].get("model_layers")
             and str(r["env"].get("model_revision") or "").startswith("synthetic minimax-m2.1")]
    kernel = [r for r in records if r["kind"] == KT_KIND and field(r, "shape") == "m2.1"]
    if not bench or not kernel:
        return ""

    def kernel_ms(phase: str, tokens: int) -> Optional[float]:
        vals = [r["metrics"]["latency_ms"] for r in kernel if field(r, "phase") == phase and field(r, "tokens") == tokens]
        return statistics.median(vals) if vals else None

    rows = []
    keys = ["env.server_kt_num_gpu_experts", "input_len", "env.model_layers", "env.server_kt_gpu_prefill_token_threshold"]
    for g in results.compare(bench, keys, metrics=["ttft_s", "decode_tok_s"]):
        n, length, layers, threshold = (g["key"][k] for k in keys)
        decode_ms = 1000 / g["metrics"]["decode_tok_s"]["mean"] / layers
        prefill_ms = 1000 * g["metrics"]["ttft_s"]["mean"] / layers
        gpu_prefill = threshold is not None and length >= threshold
        k_dec, k_pre = kernel_ms("decode", 1), kernel_ms("prefill", length)
        rows.append([n, length, "GPU, layer by layer" if gpu_prefill else "CPU experts",
                     fmt(decode_ms), fmt(k_dec), fmt(decode_ms / k_dec) + "×" if k_dec else "-",
                     fmt(prefill_ms), "-" if gpu_prefill or not k_pre else fmt(k_pre),
                     "-" if gpu_prefill or not k_pre else fmt(prefill_ms / k_pre) + "×", g["n"]])
    return _md(["GPU experts", "prompt", "prefill path", "engine decode ms / layer", "kt-kernel alone, all 8 experts",
                "engine / kernel", "engine TTFT ms / layer", "kt-kernel chunk ms", "engine / kernel", "n"], rows)


@shows_markdown
def claude_check_table(records: Sequence[dict]) -> str:
    """Claude Code's requests replayed against each engine, straight and through ktutorial's proxy:
    one row per item, one column per (engine, reasoning parser, route), from `claude_check` records."""
    checks = [r for r in records if r["kind"] == "claude_check"]
    if not checks:
        return ""

    def column(r: dict) -> str:
        parser = r["env"].get("server_reasoning_parser")
        return (f"{r['params']['engine']}{' ' + parser if parser else ''}, "
                f"{'via proxy' if r['params']['via_proxy'] else 'direct'}")

    columns = list(dict.fromkeys(column(r) for r in checks))
    items = list(dict.fromkeys(r["params"]["item"] for r in checks))
    cell: dict[tuple[str, str], str] = {}
    for r in checks:  # the newest record of an item and column wins
        m = r["metrics"]
        cell[(r["params"]["item"], column(r))] = "works" if m["ok"] else f"fails: {m['detail'][:90]}"
    rows = [[item, *(cell.get((item, c), "-") for c in columns)] for item in items]
    return _md(["item", *columns], rows)


def environments(records: Sequence[dict]) -> str:
    """One line per distinct environment: what produced the numbers above."""
    seen: dict[str, dict] = {}
    for r in records:
        env = r["env"]
        key = json.dumps({k: env.get(k) for k in ("git_sha", "engine", "engine_version", "cpu_model", "gpus",
                                                   "kt_kernel_version", "kt_kernel_variant")}, sort_keys=True)
        seen.setdefault(key, {**env, "_kinds": set()})["_kinds"].add(r["kind"])
    rows = []
    for env in seen.values():
        gpu, cpu = _hardware([{"env": env}])
        rows.append([
            ", ".join(sorted(env["_kinds"])), f"{env.get('ktutorial_version')} ({(env.get('git_sha') or '-')[:8]})",
            f"{env.get('engine') or '-'} {env.get('engine_version') or ''}".strip(),
            f"{env.get('kt_kernel_version') or '-'} ({env.get('kt_kernel_variant') or '-'})",
            gpu, env.get("gpu_driver") or "-", cpu, env.get("ram_gb"), env.get("os"),
        ])  # fmt: skip
    return _md(["records", "ktutorial", "engine", "kt-kernel (variant)", "GPU", "driver", "CPU", "RAM GB", "OS"], rows)


# ---- the report --------------------------------------------------------------------------------


def write_report(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    published: bool = True,
    memory: Any = None,
    memory_title: str = "planned memory",
    config_key: str = "config",
) -> list[Path]:
    """Write report.md, summary.json and the PNG charts for the records in `paths`; return the
    files written. `memory`: a planner memory breakdown to chart (ktutorial.plan's Plan.memory)."""
    records = results.load_records(*paths)
    if not records:
        raise UserError(f"no records in {', '.join(map(str, paths))}: run `ktutorial bench --out FILE` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pub = load_published() if published else None

    figures: list[Path] = []
    figures += plots.bench_vs_input_len(records, out, published=pub, config_key=config_key)
    figures += plots.load_throughput_latency(records, out)
    figures += plots.sweep_by_knob(records, out)
    figures += plots.kernel_vs_threads(records, out)
    figures += plots.llamacpp_vs_kt(records, out)
    figures += plots.hybrid_vs_gpu_experts(records, out)
    if memory is not None:
        figures += plots.memory_breakdown(memory, out, title=memory_title)

    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    sections = [
        "# ktutorial report",
        f"{len(records)} records ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}) from "
        + ", ".join(f"`{Path(p).name}`" for p in paths) + ".",
    ]
    table = bench_table(records, config_key)
    if table:
        sections += [
            "## Single request: prefill / decode tokens per second",
            "Each cell: prefill tok/s / decode tok/s, mean ± sample stdev over n requests. "
            "Prefill = input length / time to first token; decode = (output tokens − 1) / "
            "(end-to-end − time to first token); one request at a time, a prompt of exactly L tokens, "
            "the prefix cache defeated.",
            table,
        ]
        agree = agreement_table(records, config_key)
        if agree:
            sections += [
                "### Client against server timings",
                "Server figures: llama.cpp's own `timings` (its decode recomputed as (n − 1) / generation "
                "time, the client's definition: llama.cpp's `predicted_per_second` counts the first token "
                "too) or SGLang's `meta_info`. First-token delay: from the server finishing the prompt to "
                "the client seeing the first token; tens of ms mean a busy client machine, whose client "
                "figures for fast models are not to be trusted.",
                agree,
            ]
    ltable_load = load.load_table(records)
    if ltable_load:
        sections += [
            "## Under load: throughput and latency by concurrency",
            "Each row: one concurrency level, N requests of exactly the stated input and output tokens, at most that "
            "many in flight (arrivals all at once, or Poisson at the stated rate). Latencies are p50 / p90 / p99 in ms "
            "over the level's requests: TTFT to the first token, ITL between streamed chunks (a chunk of k tokens "
            "counts k gaps of its gap / k), TPOT = (E2E − TTFT) / (output tokens − 1), E2E to the last token; "
            "req/s and output tok/s over the level's duration, SGLang bench_serving's definitions. \"(queued)\": "
            "the level asks for more requests than the server runs at once, so the rest waited in its queue.",
            ltable_load,
        ]
    if pub:
        sections += [
            "## Published (KTransformers' MiniMax-M2.1 tutorial; not measured by ktutorial)",
            "Prefill / decode tok/s, single request, 512 output tokens; no method, versions or spread published.",
            published_table(pub),
        ]
    sweep = sweep_table(records)
    if sweep:
        sections += ["## Sweeps", "Prefill / decode tok/s per serve combination; failed combinations with their diagnosis.", sweep]
    ktable, best = kernel_table(records)
    if ktable:
        sections += ["## kt-kernel FP8 MoE layer on the CPU", ktable]
    ltable = llamacpp_table(records)
    if ltable:
        sections += ["## llama.cpp beside kt-kernel, one layer, CPU only", ltable]
    htable = hybrid_table(records)
    if htable:
        sections += ["## Hybrid layer: experts on the GPU against latency", htable]
    evk = engine_vs_kernel_table(records)
    if evk:
        sections += [
            "## The engine against its parts (MiniMax-M2.1's layer shape)",
            "SGLang + KT on a synthetic checkpoint with M2.1's layers at full width (`ktutorial synth`), beside "
            "kt-kernel alone at the same thread count, in one run. The engine's time per layer holds every "
            "per-step cost too (scheduler, attention, sampling, no CUDA graphs on the host's bundle), spread "
            "over few layers: with 62 layers the per-layer figure falls toward the kernel's.",
            evk,
        ]
    for title, table_md in (("Exact replies through each API", reply_check_table(records)),
                            ("Claude Code's requests, straight and through ktutorial's proxy",
                             claude_check_table(records)),
                            ("The real engine's logs and ktutorial's diagnosis", engine_log_table(records)),
                            ("Processes left after a stop", orphan_table(records)),
                            ("`ktutorial tune`: the largest GPU-expert count that launches and serves the context",
                             tune_table(records)),
                            ("Expert placement from recorded traffic, on held-out prompts", placement_table(records))):
        if table_md:
            sections += [f"## {title}", table_md]
    if figures:
        sections += ["## Charts", "\n".join(f"![{p.stem}]({p.name})" for p in figures)]
    model_md, model_rows = perfmodel.report_section(records)
    if model_md:
        chart = plots.perfmodel_vs_published(model_rows, out)
        figures += chart
        sections += ["## Performance model against the published table", model_md, *(f"![{p.stem}]({p.name})" for p in chart)]
    sections += ["## Environments", environments(records)]

    md_path = out / "report.md"
    md_path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    summary = {
        "records": len(records),
        "kinds": kinds,
        "bench": bench_summary(records, config_key),
        "load": [{"params": {k: v for k, v in r["params"].items()}, "metrics": r["metrics"]}
                 for r in records if r["kind"] == load.KIND],
        "kernel": kernel_summary(records),
        "best_threads": best,
        "figures": [p.name for p in figures],
    }
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return [md_path, json_path, *figures]


def planned_memory(profile_name: str) -> tuple[Any, str]:
    """The planner's memory breakdown for MiniMax-M2.1 on a profile's machine (its described
    hardware, else this machine): the tiny profile plans M2.1 for the GPU machine it describes."""
    prof = load_profile(profile_name)
    model = prof.model if prof.model != "tiny" else "minimax-m2.1"
    plan = server.plan_for_profile(prof, model=model)
    return plan.memory, f"planned memory: {model} ({prof.name} profile), verdict: {plan.verdict}"


# ---- what the notebooks say about their results: sentences and tables computed from records -----


def model_sizes(spec) -> Markdown:
    """Where a MoE checkpoint's bytes are, from its config (ModelSpec)."""
    s = spec.summary()
    rows = [
        {"quantity": "layers (all MoE)", "value": s["layers"]},
        {"quantity": "experts per layer / chosen per token", "value": f"{s['experts_per_layer']} / {s['experts_per_token']}"},
        {"quantity": "parameters, total / active per token (B)", "value": f"{s['total_params_b']:.1f} / {s['active_params_b']:.1f}"},
        {"quantity": "one expert, FP8 (MB)", "value": s["expert_mb"]},
        {"quantity": "one layer's experts (GB)", "value": s["layer_experts_gb"]},
        {"quantity": "all experts (GB)", "value": s["all_experts_gb"]},
        {"quantity": "attention, norms, embeddings, head (GB)", "value": s["dense_gb"]},
        {"quantity": "checkpoint on disk (GB)", "value": s["checkpoint_gb"]},
        {"quantity": "KV cache per token, bf16 / FP8 (bytes)", "value": f"{s['kv_bytes_per_token_bf16']:,} / {s['kv_bytes_per_token_fp8']:,}"},
        {"quantity": "expert weights read per decoded token (GB)", "value": s["decode_expert_gb_per_token"]},
    ]
    share = s["all_experts_gb"] / (s["all_experts_gb"] + s["dense_gb"])
    return Markdown(
        table(rows)
        + f"\n\nExperts are {share:.1%} of the weights; the attention and the rest are "
          f"{s['dense_gb']:.1f} GB. That split is why a {s['total_params_b']:.0f} B model fits beside one "
          f"consumer GPU: the GPU holds the small dense part (plus the KV cache), host RAM the experts."
    )


def ram_requirement(plan) -> Markdown:
    """The host-RAM requirement, derived: the planner's parts and the arithmetic behind the experts."""
    spec, host = plan.spec, plan.memory["host"]
    parts = host["parts_gb"]
    expert_mb = spec.expert_bytes / 1e6
    lines = [
        f"- **experts: {parts['experts']:.1f} GB** = {spec.num_layers} layers × {spec.num_experts} experts × "
        f"{expert_mb:.2f} MB (3 matrices of {spec.hidden_size} × {spec.expert_intermediate_size} FP8 bytes plus their "
        "block scales). kt-kernel loads every expert of every layer, whatever `--kt-num-gpu-experts` puts on the GPU: "
        "the GPU copy is extra, not instead.",
    ]
    other = {k: v for k, v in parts.items() if k != "experts"}
    names = {"kt_kernel_buffers": "kt-kernel's buffers (sized by the prefill chunk)",
             "sglang_processes": "SGLang's own processes (scheduler, tokenizer, detokenizer, CUDA context)",
             "os_reserve": "the operating system"}
    for k, v in other.items():
        lines.append(f"- {names.get(k, k.replace('_', ' '))}: {v:.1f} GB")
    lines.append(f"- **needed: {host['needed_gb']:.0f} GB** of the {host['available_gb']:.0f} GB this plan's machine has.")
    return Markdown("\n".join(lines) + "\n\nThat is the published tutorial's \"at least 256 GB\", derived: "
              "below it the experts do not fit and the server is killed while loading (see the troubleshooting page).")


def published_runs_table(rows: list[dict]) -> Markdown:
    """plan.published_runs_comparison(): the planner's settings beside the published ones."""
    out = []
    for r in rows:
        pub = r["published"]
        planned = r["planner"]
        out.append({
            "published run": r["run"],
            "kt-cpu variant": r["cpu_variant"],
            "planner: GPU experts / chunk / KV pool": f"{planned.get('kt-num-gpu-experts')} / "
                                                      f"{planned.get('chunked-prefill-size')} / "
                                                      f"{planned.get('max-total-tokens')}",
            "planner: VRAM GiB per GPU": f"{r['planner_gpu_gib']:.1f} of {r['capacity_gib']:g}",
            "planner: RAM GB": round(r["planner_ram_gb"]),
            "planner verdict": r["planner_verdict"],
            "published settings": ", ".join(f"{k}={v}" for k, v in pub.items()),
            "published, checked by the planner": r.get("published_verdict", "-"),
        })
    notes = []
    for r in rows:
        if "published_verdict" in r:
            fp8 = r["published_fp8_kv_full_pool"]
            notes.append(
                f"- {r['run']}: as published, the card holds a {r['published_kv_pool_tokens']:,}-token KV pool with a "
                f"bf16 cache ({r['published_gpu_gib']:.1f} GiB per GPU: {r['published_verdict']}); the full "
                f"`--max-total-tokens` pool needs an FP8 KV cache ({fp8['gpu_gib']:.1f} GiB: {fp8['verdict']})."
            )
    return Markdown(table(out) + ("\n\n" + "\n".join(notes) if notes else ""))


def knobs_table(spec) -> Markdown:
    """The knobs a sweep varies, the values it tries, and what each flag trades (settings_schema)."""
    why = {row["flag"]: row["why"] for row in sglang_kt.settings_schema()}
    values: dict[str, list] = {k: list(v) for k, v in spec.serve.items()}
    for combo in spec.combinations:
        for k, v in combo.items():
            values.setdefault(k, [])
            if v not in values[k]:
                values[k].append(v)
    rows = [{"knob": f"`{k}`", "values tried": v, "what it trades": why.get("--" + k.lstrip("-"), "a llama.cpp serve option")}
            for k, v in values.items()]
    return Markdown(f"Sweep `{spec.name}` for profile `{spec.profile}`: {len(spec.plan())} server starts.\n\n" + table(rows))


def sweep_plan_table(summary: dict) -> Markdown:
    rows = [{"serve parameters": item["serve"], "command": scrub(item.get("command", "")),
             "already recorded": item["skip"]} for item in summary["plan"]]
    return Markdown(table(rows))


def _mean(values: Iterable[Any]) -> Optional[float]:
    return summarize(values)["mean"]


def sweep_observations(records: Sequence[dict]) -> Markdown:
    """For each knob of a sweep: decode and prefill at each value, and the best value, from records."""
    bench = [r for r in records if r["kind"] == "bench" and field(r, "params.sweep")]
    failed = [r for r in records if r["kind"] == "sweep_failure"]
    if not bench:
        # A sweep that measured nothing has failed, whatever it wrote: the tutorial run stops here.
        reasons = "; ".join(str(field(r, "diagnosis")) for r in failed) or "no records were written"
        raise UserError(f"the sweep measured nothing: {len(failed)} combination(s) failed ({reasons})")
    knobs = sorted({k for r in bench for k in (field(r, "params.serve") or {})})
    lines = []
    for knob in knobs:
        values = sorted({(field(r, "params.serve") or {}).get(knob) for r in bench}, key=str)
        for metric, label in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
            by_value = {v: _mean(field(r, metric) for r in bench if (field(r, "params.serve") or {}).get(knob) == v)
                        for v in values}
            by_value = {v: m for v, m in by_value.items() if m is not None}
            if len(by_value) < 2:
                continue
            best = max(by_value, key=by_value.get)
            worst = min(by_value, key=by_value.get)
            lines.append(
                f"- **{knob}, {label}**: best at {knob}={best} ({by_value[best]:.1f} tok/s, mean over all input "
                f"lengths), {by_value[best] / by_value[worst]:.2f}× the {knob}={worst} figure ({by_value[worst]:.1f})."
            )
    n = len(bench)
    lines.append(f"- {n} measured requests; {len(failed)} failed combination(s)"
                 + (": " + "; ".join(str(field(r, 'diagnosis')) for r in failed) if failed else "."))
    return Markdown("\n".join(lines))


def threads_observations(records: Sequence[dict]) -> Markdown:
    """kt-kernel's decode by thread count on the device host: the best, the all-vCPU trap, and
    kt-cli's old default (0.8 × logical CPUs), from the committed records."""
    kt = [r for r in records if r["kind"] == KT_KIND and field(r, "phase") == "decode"]
    if not kt:
        return Markdown("No kt-kernel records.")
    best = best_threads(records, "decode")
    tokens = best["tokens"]
    sel = {field(r, "threads"): field(r, "latency_ms") for r in kt if field(r, "tokens") == tokens
           and plots._host(r) == best["host"]}
    logical = next((field(r, "env.cpu_logical") for r in kt if field(r, "env.cpu_logical")), None)
    most = max(sel)
    lines = [
        f"- On the device host ({best['host']}, {logical} logical CPUs), one decoded token through one layer is "
        f"fastest at **{best['threads']} threads: {best['latency_ms']:.2f} ms**, {best['expert_gb_s']:.0f} GB/s of "
        f"expert weights; {best['ceiling_tok_s_62_layers']:.1f} tok/s is the CPU-only ceiling for 62 layers.",
    ]
    if most != best["threads"]:
        lines.append(f"- With all {most} threads it takes {sel[most]:.2f} ms, {sel[most] / best['latency_ms']:.1f}× "
                     "slower: a kt-kernel thread on every vCPU leaves none for the thread that submits the work.")
    if logical:
        default = int(0.8 * logical)
        near = min(sel, key=lambda t: abs(t - default))
        lines.append(f"- kt-cli's older default, 0.8 × logical CPUs = {default}: the nearest measured count, {near}, "
                     f"takes {sel[near]:.2f} ms ({sel[near] / best['latency_ms'] - 1:+.0%} against the best). "
                     "The planner's `--kt-cpuinfer` leaves cores free for the same reason (see its reason in 00's settings table).")
    return Markdown("\n".join(lines))


def published_llamacpp_table() -> Markdown:
    """The published KT against llama.cpp figures (2 x RTX 5090 + EPYC 9355, 32768 in, 512 out), labelled."""
    pub = load_published()
    rows = [{"published (KTransformers tutorial)": r["config"], "input tokens": r["input_len"],
             "prefill tok/s": r["prefill_tok_s"], "decode tok/s": r["decode_tok_s"]}
            for r in pub["llamacpp_comparison"]]
    kt = next(r for r in pub["llamacpp_comparison"] if r["config"].startswith("KT"))
    others = [r for r in pub["llamacpp_comparison"] if r is not kt]
    best_prefill = max(others, key=lambda r: r["prefill_tok_s"])
    best_decode = max(others, key=lambda r: r["decode_tok_s"])
    return Markdown(
        table(rows)
        + f"\n\nFrom these figures: KT prefills {kt['prefill_tok_s'] / best_prefill['prefill_tok_s']:.1f}× faster than "
          f"llama.cpp's best prefill ({best_prefill['config']}) and decodes "
          f"{kt['decode_tok_s'] / best_decode['decode_tok_s'] - 1:.0%} faster than its best decode "
          f"({best_decode['config']}); no llama.cpp setting was best at both. Published, not measured by ktutorial: "
          "no method, versions or spread were given."
    )


def comparison_observations(records: Sequence[dict]) -> Markdown:
    """kt-kernel against llama.cpp through one M2.1-shape MoE layer, CPU only, from the device records."""
    kt = [r for r in records if r["kind"] == KT_KIND]
    ll = [r for r in records if r["kind"] == LLAMACPP_KIND]
    if not kt or not ll:
        return Markdown("The records hold no kt-kernel / llama.cpp pair to compare.")

    def best(recs, phase):
        sel = [(layer_tok_s(r), r) for r in recs if field(r, "phase") == phase and layer_tok_s(r)]
        return max(sel, key=lambda x: x[0]) if sel else (None, None)

    kd, kdr = best(kt, "decode")
    ld, ldr = best(ll, "decode")
    kp, kpr = best(kt, "prefill")
    lp, lpr = best(ll, "prefill")
    info = next((field(r, "system_info") for r in ll if field(r, "system_info")), "")
    lines = [
        f"- **Decode** (one token through one layer): kt-kernel FP8 at best {kd:.0f} tok/s "
        f"({field(kdr, 'threads')} threads) against llama.cpp Q8_0 at best {ld:.0f} tok/s ({field(ldr, 'threads')} "
        f"threads): **{kd / ld:.2f}×**. Over 62 layers that is {kd / 62:.1f} against {ld / 62:.1f} tok/s, "
        "the CPU side alone.",
        f"- **Prefill** (a chunk through one layer): kt-kernel at best {kp:.0f} tok/s ({field(kpr, 'tokens')}-token "
        f"chunks, {field(kpr, 'threads')} threads) against llama.cpp at best {lp:.0f} tok/s "
        f"({field(lpr, 'threads')} threads): **{kp / lp:.2f}×**. On the CPU alone kt-kernel does not win prefill; "
        "SGLang-KT's prefill advantage comes from sending long chunks to the GPU layer by layer "
        "(`--kt-gpu-prefill-token-threshold`), not from the CPU kernel.",
        f"- llama.cpp here is the PyPI build (xllamacpp); its CPU backend reported `{info.strip().rstrip('|').strip()}` "
        "on an AMX host: a build compiled for the host could do better.",
    ]
    return Markdown("\n".join(lines))


def bench_observations(records: Sequence[dict]) -> Markdown:
    """The tiny bench in two sentences: decode and prefill by input length, labelled."""
    groups = bench_summary(records)
    if not groups:
        return Markdown("No bench records.")
    parts = []
    for g in groups:
        m = g["metrics"]
        parts.append(f"{g['key']['input_len']} tokens in: prefill {m['prefill_tok_s']['mean']:.0f} ± "
                     f"{m['prefill_tok_s']['stdev']:.0f}, decode {m['decode_tok_s']['mean']:.1f} ± "
                     f"{m['decode_tok_s']['stdev']:.1f} tok/s (n={g['n']})")
    env = records[0]["env"]
    return Markdown(f"Measured here, {env.get('engine')} {env.get('engine_version')} on {env.get('cpu_model')} "
              f"({env.get('cpu_physical_cores')} cores), model `{env.get('model')}`: " + "; ".join(parts)
              + ". A tiny model on a small CPU: these numbers check the method, they say nothing about M2.1's speed.")


def hybrid_agreement_table(out: dict) -> Markdown:
    rows = []
    for r in out["comparisons"] + out.get("negative_controls", []):
        rows.append({
            "a": r["a"], "b": r["b"],
            "same greedy tokens": f"{r['token_matches']}/{r['positions']}",
            "same argmax (teacher forced)": f"{r['argmax_matches']}/{r['positions']}",
            "max |Δlogit|": r["max_abs_dlogit"], "MoE rel err": r["moe_rel_err"],
            "max |Δlogprob|": r["max_abs_dlogprob"], "router flips": r["router_flips"],
            "agrees": "yes" if r["ok"] else "NO: " + ", ".join(r["failed_on"]),
        })
    tol = "; ".join(f"{k}: " + ", ".join(f"{m} ≤ {v:g}" for m, v in t.items()) for k, t in out["tolerances"].items())
    controls = out.get("negative_controls", [])
    caught = sum(1 for r in controls if not r["ok"])
    reply = out["reference_text"].replace("\n", " ⏎ ").strip()
    text = (f"Prompt of {out['prompt_tokens']} tokens. The reference's {len(out['reference_tokens'])} greedy tokens "
            f"(end-of-turn ignored, so the positions run on past the reply): `{reply[:160]}`\n\n"
            + table(rows) + f"\n\nTolerances — {tol}.")
    if controls:
        text += (f"\n\nNegative controls (the last {len(controls)} rows are deliberate bugs): "
                 f"**{caught} of {len(controls)} caught** (each must say NO).")
    return Markdown(text)


def coverage_table(study: dict) -> Markdown:
    rows = []
    for i, n in enumerate(study["gpu_experts"]):
        row = {"GPU experts / layer": n}
        for s, values in study["coverage"].items():
            row[s] = f"{100 * values[i]:.0f}%"
        rows.append(row)
    return Markdown(table(rows))


def hybrid_observations(records: Sequence[dict]) -> Markdown:
    """The measured `--kt-num-gpu-experts` trade-off at M2.1 layer shape, in sentences."""
    hyb = [r for r in records if r["kind"] == plots.HYBRID_KIND]
    # Records that name their GPU kernel (SGLang's fused MoE since issue 13) supersede the first torch loop's.
    hyb = [r for r in hyb if field(r, "gpu_kernel")] or hyb
    if not hyb:
        return Markdown("No hybrid-layer records.")
    experts = max(field(r, "experts") or 0 for r in hyb)
    gpu = next((field(r, "gpu") for r in hyb if field(r, "gpu")), "the GPU")
    lines = []
    for tokens in sorted({field(r, "tokens") for r in hyb}):
        what = "decode, 1 token" if tokens == 1 else f"prefill chunk, {tokens} tokens"
        by = {}
        for routing in sorted({field(r, "routing") for r in hyb}):
            by[routing] = {field(r, "n_gpu_experts"): r for r in hyb
                           if field(r, "tokens") == tokens and field(r, "routing") == routing}
        for routing, sel in by.items():
            if 0 not in sel or experts not in sel:
                continue
            lines.append(f"- **{what}, {routing} routing**: CPU only {fmt(field(sel[0], 'latency_ms'))} ms; all "
                         f"{experts} experts on the {gpu} {fmt(field(sel[experts], 'latency_ms'))} ms.")
        common = sorted(set.intersection(*(set(v) for v in by.values())) - {0, experts}) if by else []
        n = next((n for n in common if n >= experts // 8), common[-1] if common else None)
        if n is not None and len(by) > 1:
            parts = []
            for routing, sel in by.items():
                r, base = sel[n], field(sel[0], "latency_ms")
                parts.append(f"{routing} routing puts {field(r, 'gpu_coverage'):.0%} of the routed experts there and "
                             f"the layer takes {fmt(field(r, 'latency_ms'))} ms ({field(r, 'latency_ms') / base - 1:+.0%} "
                             "against CPU only)")
            lines.append(f"- With {n} of {experts} experts on the GPU ({what}): " + "; ".join(parts) + ".")
    kernel = field(hyb[0], "gpu_kernel")
    for summ in (r for r in records if r["kind"] == "hybrid_summary" and field(r, "gpu_kernel") == kernel):
        what = "decode, 1 token" if field(summ, "tokens") == 1 else f"prefill chunk, {field(summ, 'tokens')} tokens"
        breaks = field(summ, "breaks") or []
        lines.append(
            f"- {what}, {field(summ, 'routing')} routing, GPU half by `{kernel}`: latency "
            + ("falls monotonically in N within its spread" if field(summ, "monotone_within_spread")
               else f"is not monotone in N ({len(breaks)} pair(s) break it)")
            + f"; the GPU half runs at {field(summ, 'gpu_over_roofline_min'):.1f}-{field(summ, 'gpu_over_roofline_max'):.1f}x its "
            f"roofline; layer time over max(GPU, CPU) is at most {field(summ, 'overlap_ratio_max'):.2f}.")
    lines.append("- What decides the gain is the share of routed experts that land on the GPU (its coverage), "
                 "compare the rows above: with skewed routing and the hottest experts placed on the GPU, the same "
                 "count covers far more of the traffic than with uniform random routing.")
    return Markdown("\n".join(lines))

