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
from typing import Any, Optional, Sequence

import yaml

from ktutorial import load, perfmodel, results
from ktutorial.errors import UserError
from ktutorial.results import field
from ktutorial.tables import fmt, markdown_table, md_cell  # noqa: F401 (md_cell: callers import it from here)

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
    from ktutorial.plots import KT_KIND

    kt = [r for r in records if r["kind"] == KT_KIND]
    return results.compare(
        kt, ["env.cpu_model", "shape", "phase", "tokens", "threads"],
        metrics=["latency_ms", "latency_ms_p10", "latency_ms_p90", "expert_gb_s", "copy_gb_s",
                 "bandwidth_ratio", "tflop_s", "ceiling_tok_s_62_layers"],
    )  # fmt: skip


def kernel_table(records: Sequence[dict]) -> tuple[str, Optional[dict]]:
    """kt-kernel per thread count with its share of the host's measured bandwidth, the best
    thread count, and the CPU-only ceilings for 62 layers, per host."""
    from ktutorial.plots import KT_KIND, best_threads

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


def llamacpp_table(records: Sequence[dict]) -> str:
    """llama.cpp and kt-kernel through one layer at the same threads, and their ratio."""
    from ktutorial.plots import KT_KIND, LLAMACPP_KIND, layer_tok_s

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
    from ktutorial.diagnose import diagnose

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


def orphan_table(records: Sequence[dict]) -> str:
    rows = [[r["params"]["after"], r["params"]["profile"], r["metrics"]["processes_left"], r["time_utc"]]
            for r in records if r["kind"] == "orphan_check"]
    return _md(["after", "profile", "SGLang processes left", "when"], rows) if rows else ""


def engine_vs_kernel_table(records: Sequence[dict]) -> str:
    """Per layer at MiniMax-M2.1's shape: the engine's decode and CPU-path prefill against
    kt-kernel alone at the same threads, in one run (bench records of a synthetic checkpoint
    beside kt_kernel_moe records). The engine figure includes every per-step cost (scheduler,
    attention, sampling), spread over the layers."""
    from ktutorial.plots import KT_KIND

    bench = [r for r in results.filter_records(records, kind="bench") if r["env"].get("model_layers")]
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
    from ktutorial import plots

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
                            ("Processes left after a stop", orphan_table(records))):
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
    from ktutorial import server
    from ktutorial.profiles import load_profile

    prof = load_profile(profile_name)
    model = prof.model if prof.model != "tiny" else "minimax-m2.1"
    plan = server.plan_for_profile(prof, model=model)
    return plan.memory, f"planned memory: {model} ({prof.name} profile), verdict: {plan.verdict}"
