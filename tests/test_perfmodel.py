"""The performance model: its fit on the committed records, physics it must respect, the host's own
decode reproduced, the published comparison's shape, and refusals that say which command to run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ktutorial import perfmodel as pm
from ktutorial import results

ROOT = Path(__file__).resolve().parent.parent
RECORDS = sorted((ROOT / "results").glob("*.jsonl"))


@pytest.fixture(scope="module")
def records():
    return results.load_records(*RECORDS)


@pytest.fixture(scope="module")
def hostfit(records):
    return pm.fit(records)


def test_fit_constants_in_sane_ranges(hostfit):
    assert 10 < hostfit.kernel_decode_gb_s < 200
    assert 0.5 < hostfit.kernel_decode_ms_per_layer < 10
    assert 0.5 < hostfit.eta < 1.5
    assert 1 < hostfit.per_thread_decode_gb_s < 20
    assert all(0.05 < v < 5 for v in hostfit.prefill_tflop_s.values())
    assert 0 < hostfit.decode_step_ms < 20
    # measured at two depths, not assumed: the engine's per-layer decode is the kernel's (within 15%)
    depth = hostfit.depth_fit
    assert depth["depths"] == [2, 4] and depth["threads"] == 14 and depth["num_gpu_experts"] == 0
    assert 0.85 < depth["engine_ms_per_layer"] / depth["kernel_ms_per_layer"] < 1.15
    assert hostfit.decode_layer_fixed_ms == max(0.0, depth["c_layer_measured_ms"])
    assert 0 < depth["c_step_ms"] < hostfit.decode_step_ms  # the per-step cost is the host's, not portable
    assert 0 < hostfit.prefill_step_s < 1
    assert 5 < hostfit.layerwise_gb_s < 64 and 0.1 < hostfit.rho <= 1.3
    assert hostfit.decode_overlapped  # the records favour max(cpu, gpu) over cpu + gpu
    assert hostfit.threads == 14 and hostfit.engine_layers == 2
    for name in ("eta", "decode_step_ms", "layerwise_gb_s", "prefill_step_s"):
        assert hostfit.sources[name]
    assert any("measured, not assumed" in a for a in hostfit.assumptions)
    assert "least squares in layers" in hostfit.sources["decode_layer_fixed_ms"]


def test_the_engine_decodes_best_at_the_planned_threads_and_collapses_with_every_cpu_busy(hostfit):
    """The --kt-cpuinfer sweep through SGLang + KT (4 layers, every expert on the CPU) beside
    kt-kernel alone at the same threads, in one run: the planner's pick is the engine's best."""
    t = hostfit.engine_threads
    assert sorted(t, key=int) == ["8", "12", "14", "16"]
    assert pm.best_engine_threads(hostfit) == 14
    assert t["16"]["engine_tok_s"] < 0.5 * t["14"]["engine_tok_s"]  # all 16 vCPUs busy: the collapse
    for threads in ("8", "12", "14"):
        assert 0.8 < t[threads]["engine_over_kernel"] < 1.2, t[threads]
    from ktutorial import plan as plan_mod
    from ktutorial.hardware import Hardware

    hw = Hardware.described(gpu="H200:141", cpu_cores=16, ram_gb=512)
    value, why = plan_mod._cpuinfer(hw, 1)
    assert value == 14 and "real engine's own sweep" in why and "16: 25 tok/s" in why


def test_the_fit_predicts_the_other_run_within_its_per_step_difference(hostfit, records):
    """The model fitted on one run, against the two-depth run it was not fitted on: every point is
    compared; TTFT of the CPU path and decode are overpredicted by that host's higher per-step and
    prefill costs, never underpredicted by more than the 16-thread collapse the model leaves to the planner."""
    rows = pm.cross_run_check(hostfit, records)
    assert len(rows) == 7 and {r["layers"] for r in rows} == {2, 4}
    for r in rows:
        assert r["measured_decode_ms"] > 0 and r["predicted_decode_ms"] > 0
        if r["threads"] != 16:
            assert -0.1 < r["decode_rel_err"] < 1.0, r


def test_committed_fit_matches_the_records(hostfit):
    committed = pm.committed_fit()
    assert json.loads(pm.fit_json(committed)) == json.loads(pm.fit_json(hostfit)), (
        "ktutorial/data/perfmodel_fit.json is stale: rewrite it with perfmodel.fit_json(perfmodel.fit(records))")


def _machine():
    return pm.machine_from_names("2 x RTX 5090 (32 GB)", "2 x EPYC 9355", "5.0")


def test_more_gpu_experts_never_slow_decode(hostfit):
    m = _machine()
    prev = None
    for n in (0, 8, 32, 64, 128, 256):
        d = pm.predict(hostfit, m, pm.Settings(num_gpu_experts=n, tp=2, cpu_threads=64), 8192).decode_tok_s
        assert prev is None or d >= prev - 1e-9
        prev = d


def test_more_bandwidth_is_faster(hostfit):
    base = replace(_machine(), cpu_peak_gb_s=100.0)
    s = pm.Settings(num_gpu_experts=16, tp=1, cpu_threads=64)
    slow, fast = (pm.predict(hostfit, replace(base, cpu_peak_gb_s=bw), s, 8192) for bw in (100.0, 1000.0))
    assert fast.decode_tok_s > slow.decode_tok_s
    pcie_slow, pcie_fast = (pm.predict(hostfit, replace(base, pcie_gb_s=bw), s, 8192) for bw in (25.0, 50.0))
    assert pcie_fast.prefill_tok_s > pcie_slow.prefill_tok_s
    gpu_slow, gpu_fast = (pm.predict(hostfit, replace(base, gpu_mem_gb_s=bw), s, 32768) for bw in (1000.0, 2000.0))
    assert gpu_fast.decode_tok_s > gpu_slow.decode_tok_s
    more_threads = pm.predict(hostfit, base, replace(s, cpu_threads=8), 2048)
    assert pm.predict(hostfit, base, s, 2048).prefill_tok_s > more_threads.prefill_tok_s


def test_the_host_at_two_layers_reproduces_its_measured_decode(hostfit):
    host = pm.host_machine(hostfit)
    for measured in hostfit.engine_decode.values():
        n = measured["num_gpu_experts"]
        s = pm.Settings(num_gpu_experts=n, layers=measured["layers"], cpu_threads=hostfit.threads,
                        output_len=64, cuda_graphs=False)
        ms = pm.predict(hostfit, host, s, 2048).decode_ms
        assert measured["p10_ms"] <= ms <= measured["p90_ms"], (n, ms, measured)
        assert abs(ms - measured["mean_ms"]) <= 2.5 * max(measured["stdev_ms"], 0.3), (n, ms, measured)
    # and its CPU-path prefill with no GPU experts: the kernel's chunk time x 2 layers + c_prefill
    p = pm.predict(hostfit, host, pm.Settings(num_gpu_experts=0, layers=2, cpu_threads=14, cuda_graphs=False), 2048)
    assert 2.5 < p.ttft_s < 3.5  # measured 2.84-3.05 s


def test_published_comparison_has_every_row_and_length(records):
    rows = pm.published_comparison(records)
    assert len(rows) == 12
    assert len({r["config"] for r in rows}) == 4
    assert {r["prompt_len"] for r in rows} == {2048, 8192, 32768}
    for r in rows:
        for kind in ("prefill", "decode"):
            pred, pub, err = r[f"predicted_{kind}_tok_s"], r[f"published_{kind}_tok_s"], r[f"{kind}_rel_err"]
            assert pred > 0 and err == pytest.approx((pred - pub) / pub)
        # every miss says why
        assert r["within_goal"] == (abs(r["prefill_rel_err"]) <= 0.2 and abs(r["decode_rel_err"]) <= 0.2)
        assert len(r["misses"]) == (abs(r["prefill_rel_err"]) > 0.2) + (abs(r["decode_rel_err"]) > 0.2)
        # 2048 is below every row's 4096-token threshold: the CPU path
        assert r["prefill_path"] == ("CPU experts" if r["prompt_len"] == 2048 else "GPU layerwise")
    published_row = [r for r in rows if r["config"].startswith("2 x RTX 5090")][0]
    assert published_row["settings"]["num_gpu_experts"] == 40
    assert published_row["settings_origin"]["kt-num-gpu-experts"] == "published"
    md = pm.table_markdown(rows)
    assert md.count("\n| ") == 12 and md.startswith("| configuration") and "%" in md
    for r in rows:
        for m in r["misses"]:
            assert m.split(":")[0] in ("prefill", "decode") and m in md


def test_cpu_path_misses_name_the_threshold(records):
    rows = pm.published_comparison(records)
    cpu_misses = [m for r in rows if r["prompt_len"] == 2048 for m in r["misses"] if m.startswith("prefill")]
    assert cpu_misses and all("below the 4096-token threshold" in m for m in cpu_misses)


@pytest.mark.parametrize("drop", ["bench", "kt_kernel_moe", "host_bandwidth"])
def test_refuses_records_without_the_needed_kinds(records, drop):
    kept = [r for r in records if r["kind"] != drop]
    with pytest.raises(pm.FitError, match="bash results/gpu-host.sh OUT synth"):
        pm.fit(kept)


def test_report_section_is_empty_without_the_records():
    md, rows = pm.report_section([])
    assert md == "" and rows == []


def test_predict_plan_for_a_described_machine():
    from ktutorial.plan import PUBLISHED_RUNS, Goals, make_plan, published_hardware
    from ktutorial.spec import ModelSpec

    spec = ModelSpec.known("minimax-m2.1")
    plan = make_plan(spec, published_hardware(PUBLISHED_RUNS[3]), Goals(context_tokens=80000))
    out = pm.predict_plan(plan)
    assert out["available"] and set(out["by_prompt_len"]) == {2048, 8192, 32768}
    assert all(v["decode_tok_s"] > 0 and v["prefill_tok_s"] > 0 for v in out["by_prompt_len"].values())
    assert out["cpu_peak_gb_s"] == pytest.approx(2 * 12 * 6400 * 8 / 1000)


def test_report_has_the_model_section(tmp_path):
    from ktutorial import report

    paths = report.write_report([str(p) for p in RECORDS if "m21-synth" in p.name], tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Performance model against the published table" in text
    assert text.index("## Performance model") < text.index("## Environments")
    assert (tmp_path / "perfmodel_vs_published.png").read_bytes().startswith(b"\x89PNG")
    assert any(p.name == "perfmodel_vs_published.png" for p in paths)
