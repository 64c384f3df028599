"""report + plots on synthetic records: the table's numbers are the records' means, every chart
is a real PNG, the best thread count is named. No server, no kernel: records are made here in the
shapes bench.py and kernel_bench.py write."""

from __future__ import annotations

import json
import re
import statistics

import pytest

from ktutorial import report, results
from ktutorial.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


def _bench(config, input_len, prefill, decode, serve=None, sweep=None):
    params = {"config": config, "input_len": input_len, "output_len": 16, "engine": "llamacpp"}
    if sweep:
        params.update(sweep=sweep, serve=serve, combination_key=results.stable_key(serve))
    return results.make_record(
        "bench", params,
        {"ttft_s": input_len / prefill, "e2e_s": 1.0, "output_tokens": 16, "prefill_tok_s": prefill,
         "decode_tok_s": decode, "server_decode_tok_s": decode * 1.01, "decode_rel_diff": -0.01,
         "server_prompt_tokens": input_len, "server_cached_tokens": 0, "prompt_len_ok": True,
         "prefix_cache_hit": False},
    )  # fmt: skip


def _kt(threads, phase, tokens, latency_ms):
    gb = 8 * 14.16e6 * tokens ** 0.5 / (latency_ms / 1e3) / 1e9
    return results.make_record(
        "kt_kernel_moe",
        {"phase": phase, "tokens": tokens, "threads": threads, "shape": "m2.1", "experts": 256},
        {"latency_ms": latency_ms, "latency_ms_p10": latency_ms * 0.9, "latency_ms_p90": latency_ms * 1.2,
         "per_token_ms_per_layer": latency_ms / tokens, "expert_gb_s": gb, "copy_gb_s": 60.0,
         "bandwidth_ratio": gb / 60.0, "tflop_s": 0.1 * tokens / latency_ms,
         "ceiling_tok_s_62_layers": tokens / (62 * latency_ms / 1e3), "n": 50},
    )  # fmt: skip


@pytest.fixture()
def records_file(tmp_path):
    path = tmp_path / "records.jsonl"
    recs = []
    for prefill, decode in ((1000.0, 50.0), (1200.0, 54.0), (1100.0, 49.0)):
        recs.append(_bench("tiny llamacpp", 128, prefill, decode))
        recs.append(_bench("tiny llamacpp", 512, prefill * 2, decode * 0.9))
    for threads, decode in ((1, 30.0), (2, 45.0)):
        for _ in range(2):
            recs.append(_bench(f"tiny: threads={threads}", 128, 800.0 * threads, decode,
                               serve={"threads": threads}, sweep="tiny"))
    recs.append(results.make_record(
        "sweep_failure",
        {"sweep": "tiny", "serve": {"threads": 0}, "combination_key": "k0", "config": "tiny: threads=0"},
        {"stage": "launch", "failure": "launch_failure", "error": "UserError: --threads must be at least 1",
         "diagnosis": "--threads must be at least 1, got 0"},
    ))  # fmt: skip
    for threads, ms in ((4, 4.9), (8, 3.1), (14, 1.9), (16, 7.8)):
        recs.append(_kt(threads, "decode", 1, ms))
        recs.append(_kt(threads, "prefill", 2048, ms * 400))
        recs.append(results.make_record("host_bandwidth", {"threads": threads}, {"copy_gb_s": 40.0 + threads}))
        recs.append(results.make_record(
            "llamacpp_layer", {"phase": "decode", "tokens": 64, "threads": threads, "shape": "m2.1"},
            {"per_token_ms_per_layer": ms * 3, "tok_s_per_layer": 1000 / (ms * 3)}))
    for n in (0, 64, 256):
        recs.append(results.make_record(
            "hybrid_layer", {"n_gpu_experts": n, "routing": "random", "tokens": 1, "experts": 256},
            {"latency_ms": 5.0 - n / 64, "gpu_ms": n / 64, "cpu_ms": 5.0 - n / 64, "gpu_coverage": n / 256}))
    for r in recs:
        results.append_record(path, r)
    return path, recs


def test_report_writes_table_and_charts(records_file, tmp_path):
    path, recs = records_file
    out = tmp_path / "report"
    memory = {  # the shape of ktutorial.plan's Plan.memory
        "gpu": {"per_gpu_gib": {"kv_cache": 15.5, "dense_weights": 4.9, "gpu_experts": 2.5}, "capacity_gib": 32, "gpus": 1},
        "host": {"parts_gb": {"experts": 224.7, "os_reserve": 4.0}, "available_gb": 512},
    }
    files = report.write_report([path], out, memory=memory)
    names = {f.name for f in files}
    for expected in ("report.md", "summary.json", "bench_prefill.png", "bench_decode.png", "sweep_tiny_threads.png",
                     "kernel_threads.png", "llamacpp_vs_kt.png", "hybrid_gpu_experts.png", "plan_memory.png"):
        assert expected in names, expected
    for f in files:
        assert f.is_file() and f.stat().st_size > 0
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == PNG and f.stat().st_size > 5000  # a drawn chart, not a blank stub

    md = (out / "report.md").read_text()
    # The published table's format: one row per configuration, "prefill ± sd / decode ± sd (n=3)".
    row = next(line for line in md.splitlines() if line.startswith("| tiny llamacpp |"))
    cell = row.split("|")[6].strip()
    m = re.fullmatch(r"(\S+) ± (\S+) / (\S+) ± (\S+) \(n=(\d+)\)", cell)
    assert m, cell
    prefill = [r["metrics"]["prefill_tok_s"] for r in recs if r["params"].get("config") == "tiny llamacpp" and r["params"]["input_len"] == 128]
    decode = [r["metrics"]["decode_tok_s"] for r in recs if r["params"].get("config") == "tiny llamacpp" and r["params"]["input_len"] == 128]
    assert m.group(1) == report.fmt(statistics.fmean(prefill)) == "1100"
    assert m.group(2) == report.fmt(statistics.stdev(prefill))
    assert m.group(3) == report.fmt(statistics.fmean(decode))
    assert m.group(5) == "3"
    # summary.json holds the exact means behind the rounded cells
    summary = json.loads((out / "summary.json").read_text())
    g = next(g for g in summary["bench"] if g["key"] == {"config": "tiny llamacpp", "output_len": 16, "input_len": 128})
    assert g["metrics"]["prefill_tok_s"]["mean"] == pytest.approx(statistics.fmean(prefill))
    assert g["metrics"]["decode_tok_s"]["n"] == 3
    # the failed sweep combination is shown with its diagnosis
    assert "FAILED (launch_failure): --threads must be at least 1, got 0" in md
    # the kernel section names the best decode thread count (lowest latency: 14 of 4/8/14/16)
    assert "Best thread count for decode (1 token a layer): 14**" in md
    best = next(iter(summary["best_threads"].values()))
    assert best["threads"] == 14 and best["prefill"]["threads"] == 14
    # published figures appear, labelled as such
    assert "published: 2 x RTX 5090 (32 GB) + 2 x EPYC 9355" in md and "4007 / 33.1" in md
    assert "(CPU only)" in md and "(GPU only)" in md
    assert "| AMD EPYC | m2.1 | decode | 4 | 64 | 68.0 | 1 | 204 | 3.00× |" in md  # llama.cpp beside kt-kernel


def test_report_refuses_empty_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no records"):
        report.write_report([empty], tmp_path / "out")


# ---- the GPU host's records (results/gpu-host-*.jsonl, cpu-*-tiny-llamacpp.jsonl) -------------------

def _committed(*patterns):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "results"
    return results.load_records(*[p for pattern in patterns for p in sorted(root.glob(pattern))])


def test_claude_code_table_shows_the_failure_and_the_fix_on_the_real_engine():
    from ktutorial import report

    table = report.claude_check_table(_committed("gpu-host-*.jsonl", "cpu-*-tiny-llamacpp.jsonl"))
    header, _, *rows = table.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[0] == "item" and {"llamacpp, direct", "llamacpp, via proxy", "sglang-kt minimax-append-think, direct",
                                     "sglang-kt minimax-append-think, via proxy"} <= set(columns)
    cells = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in rows}
    direct, proxied = columns.index("sglang-kt minimax-append-think, direct") - 1, \
        columns.index("sglang-kt minimax-append-think, via proxy") - 1
    system = cells["role: system message inside messages"]
    llamacpp = columns.index("llamacpp, direct") - 1
    assert system[llamacpp] == "works" and system[direct].startswith("fails: HTTP 400") and system[proxied] == "works"
    assert all(row[proxied] == "works" for row in cells.values())  # all green through the fix
    think = cells["thinking"][columns.index("sglang-kt minimax, via proxy") - 1]
    assert think.startswith("fails: no reasoning")  # why the planner keeps minimax-append-think


def test_engine_records_at_m21_width_sit_beside_kernel_records_of_the_same_run():
    from ktutorial import report

    recs = _committed("gpu-host-*-m21-synth.jsonl")
    bench = [r for r in recs if r["kind"] == "bench"]
    assert {r["env"]["server_kt_num_gpu_experts"] for r in bench} == {0, 16, 64, 128, 256}
    assert {r["params"]["input_len"] for r in bench} == {2048, 8192}
    assert {r["env"]["git_sha"] for r in recs} == {bench[0]["env"]["git_sha"]} and bench[0]["env"]["git_sha"]
    table = report.engine_vs_kernel_table(recs)
    assert len(table.splitlines()) == 2 + 10
    # CPU-path prefill through the engine costs what kt-kernel alone costs, within 10%
    row = next(r for r in table.splitlines() if r.startswith("| 0 | 2048 |"))
    assert 0.9 <= float(row.split("|")[-3].strip().rstrip("×")) <= 1.1


def test_engine_logs_get_todays_diagnosis_and_no_server_outlived_a_stop():
    from ktutorial import report

    recs = _committed("gpu-host-*-tiny-sglang.jsonl")
    table = report.engine_log_table(recs)
    assert "| kt-method fp8 | died (exit -9) |" in table and "| kt-method-unknown |" in table
    assert "| no kt-num-gpu-experts | served |" in table and "| kt-not-applied |" in table
    orphans = [r for r in recs if r["kind"] == "orphan_check"]
    assert orphans and all(r["metrics"]["processes_left"] == 0 for r in orphans)
    replies = [r for r in recs if r["kind"] == "reply_check"]
    assert len(replies) >= 12 and all(r["metrics"]["exact"] for r in replies)
    swept = {r["params"].get("combination_key") for r in replies} - {None}
    assert len(swept) == 5  # every sweep combination answered the exact reply
