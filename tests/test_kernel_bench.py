"""kernel_bench: the code paths write valid, sane records (tiny shape, seconds), and the committed
device records validate and cover what the issues ask for. Never this machine's speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ktutorial import kernel_bench as kb
from ktutorial import results
from ktutorial.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
# FP8 weights with bf16 activations against a float32 reference land near 4e-3 (FACTS); a kernel
# that skipped an expert, doubled one or returned zeros is at 0.1 or above.
REL_ERR_MAX = 2e-2


def _kinds(recs, kind):
    return [r for r in recs if r["kind"] == kind]


# ---------------------------------------------------------------------------------------------
# the code paths, tiny shape


@pytest.fixture(scope="module")
def kt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel-bench") / "kernel.jsonl"
    summary = kb.run_kt_kernel([1, 2], out, shape="tiny", decode_calls=5, prefill_calls=1)
    return summary, results.load_records(out)


def test_kt_kernel_writes_sane_records(kt_run):
    summary, recs = kt_run
    sh = kb.layer_shape("tiny")
    moe = _kinds(recs, kb.KIND_KT)
    assert len(moe) == 2 * (len(sh.decode_tokens) + len(sh.prefill_tokens))
    assert {r["params"]["threads"] for r in _kinds(recs, kb.KIND_BANDWIDTH)} == {1, 2}
    assert not _kinds(recs, kb.KIND_FAILURE)
    for r in moe:
        m, p = r["metrics"], r["params"]
        assert r["env"]["engine"] == "kt-kernel" and r["env"]["kt_kernel_variant"] == p["cpu_variant"]
        assert p["experts"] == sh.experts and p["hidden"] == sh.hidden and p["top_k"] == sh.top_k
        for key in ("latency_ms", "expert_gb_s", "copy_gb_s", "bandwidth_ratio", "tflop_s", "ceiling_tok_s_62_layers", "out_abs_mean"):
            assert m[key] > 0, key
        assert m["latency_ms_p10"] <= m["latency_ms"] <= m["latency_ms_p90"]
        assert len(r["samples"]["latency_ms"]) == m["n"] >= 1
        # kt-kernel returns zeros silently when misused: the float32 check would show it
        assert m["rel_err_decode_check"] < REL_ERR_MAX and m["rel_err_prefill_check"] < REL_ERR_MAX
        assert 1 <= m["unique_experts"] <= min(sh.experts, p["tokens"] * sh.top_k)
    (rec,) = _kinds(recs, kb.KIND_KT_SUMMARY)
    assert rec["metrics"]["best_decode_threads"] in (1, 2)
    assert rec["metrics"]["best_prefill_threads"] in (1, 2)
    assert rec["metrics"]["decode_ceiling_tok_s"] > 0 and rec["metrics"]["copy_gb_s_max"] > 0
    assert summary["decode"]["threads"] == rec["metrics"]["best_decode_threads"]


def test_llamacpp_layer_records(tmp_path):
    out = tmp_path / "llamacpp.jsonl"
    kb.run_llamacpp([1], out, shape="tiny", repeats=1, scratch=str(tmp_path))
    recs = results.load_records(out)
    assert not _kinds(recs, kb.KIND_FAILURE), recs
    layer = _kinds(recs, kb.KIND_LLAMACPP)
    assert {r["params"]["phase"] for r in layer} == {"prefill", "decode"}
    sh = kb.layer_shape("tiny")
    for r in layer:
        m, p = r["metrics"], r["params"]
        assert r["env"]["engine"] == "llamacpp" and r["env"]["engine_version"]
        assert p["layers"] == sh.llamacpp_layers and p["threads"] == 1
        assert m["tok_s_per_layer"] > 0 and m["per_token_ms_per_layer"] > 0
        assert 0 < m["non_moe_byte_share_decode"] < 1
        (t,) = r["samples"]["server_timings"]
        ms, n = (t["prompt_ms"], t["prompt_n"]) if p["phase"] == "prefill" else (t["predicted_ms"], t["predicted_n"])
        assert m["per_token_ms_per_layer"] == pytest.approx(ms / n / p["layers"])
        assert n >= (p["tokens"] if p["phase"] == "prefill" else p["tokens"] - 1)
    assert list(tmp_path.glob("ktutorial-q8-*")) == []  # the scratch GGUF is removed


def test_hybrid_layer_records(tmp_path):
    out = tmp_path / "hybrid.jsonl"
    kb.run_hybrid(out, 1, shape="tiny", gpu_experts=[0, 4, 16], decode_calls=3, prefill_calls=2)
    recs = results.load_records(out)
    (probe,) = _kinds(recs, kb.KIND_MASK_PROBE)
    assert probe["metrics"]["minus_one_ids_rel_err"] < REL_ERR_MAX
    (ceil,) = _kinds(recs, kb.KIND_GPU_CEILINGS)
    assert ceil["metrics"]["copy_gb_s"] > 0 and ceil["metrics"]["bf16_tflop_s"] > 0
    hyb = _kinds(recs, kb.KIND_HYBRID)
    assert len(hyb) == 3 * 2 * 2  # N x routing x (decode, prefill)
    sh = kb.layer_shape("tiny")
    by = {(r["params"]["routing"], r["params"]["n_gpu_experts"], r["params"]["tokens"]): r for r in hyb}
    for key, r in by.items():
        p, m = r["params"], r["metrics"]
        # No GPU here: the record must say the grouped GEMM ran on the CPU, never pass for the fused kernel.
        assert p["gpu_kernel"] == "torch_grouped_mm_bf16" and "no CUDA device" in p["gpu_kernel_reason"]
        assert p["gpu"].startswith("cpu (stand-in") and p["cuda_graph"] is False
        assert m["rel_err_limit"] == 2e-2 and m["rel_err"] < m["rel_err_limit"], key  # the split adds up to the layer
        assert m["checks_pass"] is True
        assert m["latency_ms"] > 0 and m["latency_ms_p10"] <= m["latency_ms"] <= m["latency_ms_p90"]
        assert len(r["samples"]["latency_ms"]) == m["n"] == (3 if p["tokens"] == 1 else 2)
        assert m["overlap_ratio"] == pytest.approx(m["latency_ms"] / max(m["gpu_ms"], m["cpu_ms"]))
        assert m["copy_gb_s"] == ceil["metrics"]["copy_gb_s"] and m["matmul_tflop_s"] == ceil["metrics"]["bf16_tflop_s"]
        if key[1] == 0:  # CPU only
            assert m["gpu_ms"] == 0 and m["gpu_coverage"] == 0 and m["gpu_over_roofline"] is None
            assert m["rel_err_gpu_half"] is None and m["gpu_roofline_ms"] == 0
        else:
            assert m["gpu_ms"] > 0 and m["rel_err_gpu_half"] < m["rel_err_limit"]
            assert m["gpu_ms_p10"] <= m["gpu_ms"] <= m["gpu_ms_p90"]
            # the roofline from this run's ceilings and the calls' routed work
            bpe = 2 * 3 * sh.hidden * sh.intermediate
            want = [max((u * bpe + 2 * p["tokens"] * sh.hidden * 2 * (rows > 0)) / (m["copy_gb_s"] * 1e9),
                        rows * 6 * sh.hidden * sh.intermediate / (m["matmul_tflop_s"] * 1e12)) * 1e3
                    for u, rows in zip(r["samples"]["gpu_unique_experts"], r["samples"]["gpu_routed_rows"])]
            assert m["gpu_roofline_ms"] == pytest.approx(sum(want) / len(want))
            assert r["samples"]["gpu_roofline_ms"] == pytest.approx(want)
            if m["gpu_roofline_ms"] > 0:
                assert m["gpu_over_roofline"] == pytest.approx(m["gpu_ms_mean"] / m["gpu_roofline_ms"])
        if key[1] == 16:  # GPU only
            assert m["cpu_ms"] == 0 and m["gpu_coverage"] == 1
        else:
            assert m["cpu_ms"] > 0
    # hottest-first placement: 4 GPU experts of 16 catch more activations under skewed routing
    # (the prefill chunk: 64 routed rows a point, where a decoded token has 2 a call)
    t = sh.hybrid_prefill_tokens
    assert by[("skewed", 4, t)]["metrics"]["gpu_coverage"] > by[("random", 4, t)]["metrics"]["gpu_coverage"]
    summaries = _kinds(recs, kb.KIND_HYBRID_SUMMARY)
    assert {(r["params"]["routing"], r["params"]["tokens"]) for r in summaries} == {
        (rt, t) for rt in ("random", "skewed") for t in (1, sh.hybrid_prefill_tokens)}
    for r in summaries:
        m = r["metrics"]
        assert r["params"]["gpu_kernel"] == "torch_grouped_mm_bf16" and r["params"]["cuda_graph"] is False
        assert m["n_gpu_experts"] == [0, 4, 16] and m["n_points"] == 3 and m["checks_pass"] is True
        assert isinstance(m["monotone_within_spread"], bool) and m["monotone_within_spread"] == (m["breaks"] == [])
        assert m["points_with_gpu_work"] <= 2


def test_monotone_within_spread_names_the_points_that_break_it():
    def pt(n, med, lo, hi):
        return {"n_gpu_experts": n, "latency_ms": med, "latency_ms_p10": lo, "latency_ms_p90": hi}

    falling = [pt(0, 2.0, 1.9, 2.1), pt(8, 1.8, 1.7, 1.9), pt(256, 0.1, 0.09, 0.11)]
    assert kb.monotone_within_spread(falling) == (True, [])
    # a rise inside the spreads is not a break
    assert kb.monotone_within_spread([pt(0, 2.0, 1.8, 2.2), pt(8, 2.1, 1.9, 2.3)])[0]
    ok, breaks = kb.monotone_within_spread([pt(64, 1.5, 1.4, 1.6), pt(0, 2.0, 1.9, 2.1), pt(128, 1.9, 1.7, 2.0)])
    assert not ok and [(b["from_n"], b["to_n"]) for b in breaks] == [(64, 128)]
    assert breaks[0]["from_p90_ms"] == 1.6 and breaks[0]["to_p10_ms"] == 1.7
    # a slow climb whose neighbours overlap still breaks between its ends
    climb = [pt(0, 1.0, 0.9, 1.1), pt(8, 1.15, 1.05, 1.25), pt(16, 1.3, 1.2, 1.4)]
    ok, breaks = kb.monotone_within_spread(climb)
    assert not ok and [(b["from_n"], b["to_n"]) for b in breaks] == [(0, 16)]


def test_random_q8_gguf_has_the_minimax_layout(tmp_path):
    import gguf

    sh = kb.layer_shape("tiny")
    info = kb.write_random_q8_gguf(tmp_path / "m.gguf", sh, 2)
    reader = gguf.GGUFReader(info.path)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "minimax-m2"
    assert int(fields["minimax-m2.expert_count"].parts[-1][0]) == sh.experts
    assert int(fields["minimax-m2.expert_used_count"].parts[-1][0]) == sh.top_k
    tensors = {t.name: t for t in reader.tensors}
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    down = tensors["blk.1.ffn_down_exps.weight"]
    assert gate.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert list(gate.shape) == [sh.hidden, sh.intermediate, sh.experts]  # GGML order
    assert list(down.shape) == [sh.intermediate, sh.hidden, sh.experts]
    assert info.expert_bytes_per_layer == 3 * sh.experts * sh.hidden * sh.intermediate * 34 // 32


def test_zero_output_is_caught_by_the_reference():
    import torch

    sh = kb.layer_shape("tiny")
    src = kb.Fp8Experts.random(sh, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, sh.hidden, generator=g)
    ids, w = kb.random_routing(3, sh.experts, sh.top_k, g)
    ref = kb.reference_moe(src, x, ids, w)
    assert kb.rel_err(torch.zeros_like(ref), ref) == pytest.approx(1.0)
    assert kb.rel_err(ref, ref) == 0.0
    skip = {int(ids[0, 0])}
    assert kb.rel_err(kb.reference_moe(src, x, ids, w, skip=skip), ref) > 0.05


def test_random_fp8_is_finite_and_varied():
    import torch

    w = kb.random_fp8((3, 1000, 7000))  # more than one tile: experts start at other offsets
    f = w.float()
    assert torch.isfinite(f).all()
    assert 0.5 <= f.abs().min().item() and f.abs().max().item() <= 1.875
    assert not torch.equal(w[0].view(torch.uint8), w[1].view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_fix():
    with pytest.raises(UserError, match="m2.1"):
        kb.layer_shape("huge")
    assert kb.layer_shape("m2.1", 2, [2048]).prefill_tokens == (2048,)
    with pytest.raises(UserError, match="positive chunk sizes"):
        kb.layer_shape("m2.1", 2, [0])
    with pytest.raises(UserError, match="positive"):
        kb.check_threads([0])
    with pytest.raises(UserError, match="exceed"):
        kb.check_threads([(os.cpu_count() or 1) + 1])
    with pytest.raises(UserError, match="comma-separated"):
        kb.parse_int_list("4;8", "--threads")
    with pytest.raises(UserError, match="exceed"):
        kb.run_hybrid("unused.jsonl", 1, shape="tiny", gpu_experts=[99])
    with pytest.raises(UserError, match="random"):
        kb.run_hybrid("unused.jsonl", 1, shape="tiny", routings=["hot"])


def test_cli_refuses_bad_combinations(tmp_path, capsys):
    from ktutorial.cli import main

    out = str(tmp_path / "x.jsonl")
    assert main(["kernel-bench", "--out", out, "--llamacpp", "--hybrid"]) == 2
    assert main(["kernel-bench", "--out", out, "--hybrid", "--threads", "1,2", "--shape", "tiny"]) == 2
    assert "one CPU thread count" in capsys.readouterr().err
    assert main(["kernel-bench", "--out", out, "--llamacpp", "--gpu-probe"]) == 2
    assert main(["kernel-bench", "--out", out, "--hybrid", "--threads", "1", "--gpu-kernel", "cutlass"]) == 2
    assert "auto, fused, grouped" in capsys.readouterr().err
    assert main(["kernel-bench", "--out", out, "--hybrid", "--threads", "1", "--shape", "tiny", "--gpu-kernel", "fused"]) == 2
    assert "env.sh" in capsys.readouterr().err  # no GPU here: refused before the child starts
    assert not Path(out).exists()


def test_gpu_probe_writes_its_records(tmp_path):
    out = tmp_path / "probe.jsonl"
    probe = kb.probe_gpu_half(out, shape="tiny", gpu_experts=[4, 16], calls=2)
    assert probe["gpu_kernel"] == "torch_grouped_mm_bf16" and probe["device"] == "cpu"
    recs = results.load_records(out)
    assert len(_kinds(recs, kb.KIND_GPU_CEILINGS)) == 1
    rows = _kinds(recs, kb.KIND_GPU_PROBE)
    assert {(r["params"]["n_gpu_experts"], r["params"]["tokens"]) for r in rows} == {(n, t) for n in (4, 16) for t in (1, 32)}
    for r in rows:
        assert r["params"]["gpu_kernel"] == "torch_grouped_mm_bf16"
        m = r["metrics"]
        assert m["rel_err"] < m["rel_err_limit"] and m["eager_ms"] > 0 and m["roofline_ms"] > 0
        assert "graph_ms" not in m  # no CUDA here, no graph
    with pytest.raises(UserError, match="1 to 16"):
        kb.probe_gpu_half(None, shape="tiny", gpu_experts=[0])


def test_child_failure_carries_the_log_tail(tmp_path):
    with pytest.raises(RuntimeError, match="KeyError"):
        kb._run_child("kt", {"threads": 1}, tmp_path)


# ---------------------------------------------------------------------------------------------
# the committed records from the device host


def _committed(part: str) -> list[dict]:
    # device-DATE-*: the first runs; gpu-host-DATE-*: runs through results/gpu-host.sh
    files = sorted(RESULTS.glob(f"device-*-{part}.jsonl")) + sorted(RESULTS.glob(f"gpu-host-*-{part}.jsonl"))
    assert files, f"results/device-<date>-{part}.jsonl is missing: run the device benchmark (results/README.md)"
    return results.load_records(*files)


def test_committed_kernel_records_cover_the_thread_sweep():
    recs = _committed("kernel")
    moe = _kinds(recs, kb.KIND_KT)
    threads = {r["params"]["threads"] for r in moe}
    assert {4, 8, 12, 16} <= threads
    for t in threads:
        rows = [r for r in moe if r["params"]["threads"] == t]
        assert {r["params"]["tokens"] for r in rows if r["params"]["phase"] == "decode"} >= {1, 4}
        assert {r["params"]["tokens"] for r in rows if r["params"]["phase"] == "prefill"} >= {128, 4096}
        assert any(r["params"]["threads"] == t for r in _kinds(recs, kb.KIND_BANDWIDTH))
    for r in moe:
        p, m = r["params"], r["metrics"]
        assert (p["experts"], p["hidden"], p["intermediate"], p["top_k"]) == (256, 3072, 1536, 8)
        assert p["layers_in_ram"] >= 2
        assert m["rel_err_decode_check"] < REL_ERR_MAX and m["rel_err_prefill_check"] < REL_ERR_MAX
        assert m["latency_ms"] > 0 and m["expert_gb_s"] > 0
        assert r["env"]["gpus"] and r["env"]["cpu_model"] and r["env"]["kt_kernel_variant"]
    (summary,) = _kinds(recs, kb.KIND_KT_SUMMARY)
    assert summary["metrics"]["best_decode_threads"] in threads
    assert summary["metrics"]["copy_gb_s_max"] > 0


def test_committed_llamacpp_records_match_the_threads():
    kt_threads = {r["params"]["threads"] for r in _kinds(_committed("kernel"), kb.KIND_KT)}
    layer = _kinds(_committed("llamacpp"), kb.KIND_LLAMACPP)
    assert {r["params"]["threads"] for r in layer} == kt_threads
    assert {r["params"]["phase"] for r in layer} == {"prefill", "decode"}
    for r in layer:
        assert (r["params"]["experts"], r["params"]["hidden"], r["params"]["intermediate"]) == (256, 3072, 1536)
        assert r["metrics"]["tok_s_per_layer"] > 0


def test_committed_hybrid_records_cover_n_and_routing():
    recs = _committed("hybrid")
    hyb = _kinds(recs, kb.KIND_HYBRID)
    seen = {(r["params"]["routing"], r["params"]["n_gpu_experts"], r["params"]["tokens"]) for r in hyb}
    for routing in ("random", "skewed"):
        for n in (0, 8, 16, 32, 64, 128, 256):
            for tokens in (1, 2048):
                assert (routing, n, tokens) in seen
    for r in hyb:
        m = r["metrics"]
        # records since the fused GPU half carry their kernel's limit (FP8 activations: 8e-2)
        assert m["rel_err"] < m.get("rel_err_limit", REL_ERR_MAX), r["params"]
        assert m["latency_ms"] > 0
        assert any(g in r["params"]["gpu"] for g in ("H100", "H200"))
        if "gpu_kernel" in r["params"]:
            assert r["params"]["gpu_kernel"] in ("sglang_fused_moe_fp8", "torch_grouped_mm_bf16")
            assert m["checks_pass"] and m["overlap_ratio"] and "cuda_graph" in r["params"]
            assert r["params"]["n_gpu_experts"] == 0 or m["gpu_roofline_ms"] is not None
    fused = [r for r in hyb if "gpu_kernel" in r["params"]]
    if fused:  # every curve of a run since the fused GPU half has its summary
        sums = {(r["params"]["routing"], r["params"]["tokens"]) for r in _kinds(recs, kb.KIND_HYBRID_SUMMARY)}
        assert {(r["params"]["routing"], r["params"]["tokens"]) for r in fused} <= sums
    (probe, *_) = _kinds(recs, kb.KIND_MASK_PROBE)
    assert probe["metrics"]["minus_one_ids_rel_err"] < REL_ERR_MAX


def test_committed_records_carry_no_local_paths():
    for f in RESULTS.glob("*.jsonl"):
        text = f.read_text()
        for marker in ("/work/", "/tmp/", "/root/", "/home/", "/dev/shm"):
            assert marker not in text, (f.name, marker)
        for line in text.splitlines():
            json.loads(line)
