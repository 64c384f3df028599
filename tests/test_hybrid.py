"""The hybrid GPU/CPU expert split on the tiny model, checked three ways.

One model is loaded per module (transformers + kt-kernel's FP8 layers) and one llama.cpp server
started on the tiny GGUF; each test reuses them. Tolerances are the module constants in
ktutorial.hybrid, each with its reason; the negative controls show the comparisons are sharp
enough to catch a wrong mask or a wrongly loaded weight.
"""

from __future__ import annotations

import json

import psutil
import pytest
import torch

from ktutorial import hybrid as hy
from ktutorial.errors import UserError
from ktutorial.fp8 import dequantize_block

N_TOKENS = 32


# --- placement and coverage (pure) -------------------------------------------------------------


def test_uniform_puts_the_first_n_experts_of_every_layer_on_the_gpu():
    m = hy.placement_masks("uniform", 3, num_layers=4, num_experts=8)
    assert m.shape == (4, 8) and m.dtype == torch.bool
    assert m[:, :3].all() and not m[:, 3:].any()


def test_front_loading_fills_whole_layers_from_the_first():
    m = hy.placement_masks("front-loading", 3, num_layers=4, num_experts=8)  # budget 12
    assert m[0].all() and m[1, :4].all() and not m[1, 4:].any() and not m[2:].any()
    assert int(m.sum()) == 12


def test_frequency_takes_the_busiest_layer_expert_pairs_over_all_layers():
    counts = torch.zeros(2, 4, dtype=torch.int64)
    counts[0] = torch.tensor([5, 0, 9, 1])
    counts[1] = torch.tensor([7, 8, 0, 0])
    m = hy.placement_masks("frequency", 1, 2, 4, activation_counts=counts)  # budget 2, global
    assert m.nonzero().tolist() == [[0, 2], [1, 1]]
    m2 = hy.placement_masks("frequency", 2, 2, 4, activation_counts=counts)  # budget 4
    assert sorted(map(tuple, m2.nonzero().tolist())) == [(0, 0), (0, 2), (1, 0), (1, 1)]


def test_random_is_seeded_and_spends_the_whole_budget():
    a = hy.placement_masks("random", 2, 3, 8, seed=1)
    assert torch.equal(a, hy.placement_masks("random", 2, 3, 8, seed=1))
    assert int(a.sum()) == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy="hottest", num_gpu_experts=1), "unknown placement strategy"),
        (dict(strategy="uniform", num_gpu_experts=9), "between 0 and 8"),
        (dict(strategy="uniform", num_gpu_experts=-1), "between 0 and 8"),
        (dict(strategy="frequency", num_gpu_experts=2), "calibration"),
        (dict(strategy="frequency", num_gpu_experts=2, activation_counts=torch.ones(3, 3)), "shape"),
    ],
)
def test_bad_placement_requests_say_what_to_fix(kwargs, message):
    with pytest.raises(UserError, match=message):
        hy.placement_masks(num_layers=2, num_experts=8, **kwargs)


def test_coverage_counts_activations_on_gpu_experts():
    counts = torch.tensor([[6, 2, 2, 0], [1, 1, 1, 1]])
    masks = torch.tensor([[True, False, False, False], [True, True, False, False]])
    c = hy.coverage(masks, counts)
    assert c["share"] == pytest.approx((6 + 2) / 14)
    assert c["per_layer"] == pytest.approx([0.6, 0.5])
    with pytest.raises(UserError, match="no expert activations"):
        hy.coverage(masks, torch.zeros(2, 4))


def test_dequantize_uses_each_block_scale():
    w = torch.ones(256, 128).to(torch.float8_e4m3fn)
    s = torch.tensor([[2.0], [0.5]])
    d = dequantize_block(w, s)
    assert (d[:128] == 2.0).all() and (d[128:] == 0.5).all()


# --- the tiny model: one load per module ----------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model):
    h, tok = hy.open_hybrid(tiny_model.hf_dir)
    return h, tok


@pytest.fixture(scope="module")
def prompt_ids(loaded):
    _, tok = loaded
    return hy.chat_prompt_ids(tok, hy.DEFAULT_AGREEMENT_PROMPT)


@pytest.fixture(scope="module")
def llamacpp_url(tiny_model):
    from ktutorial import server as srv

    server = srv.Server(srv.llamacpp_launch(tiny_model.gguf_path, tiny_model.served_model_name, threads=1))
    with server:
        pid = server.pid
        yield server.base_url
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.fixture(scope="module")
def report(loaded, prompt_ids, llamacpp_url):
    h, tok = loaded
    return hy.agreement(h, prompt_ids, N_TOKENS, llamacpp_base_url=llamacpp_url, tokenizer=tok)


@pytest.fixture(scope="module")
def controls(loaded, prompt_ids):
    h, _ = loaded
    # 8 positions are plenty here: each control moves every MoE output, prompt included
    return {c.b if c.b.startswith("wrong") else c.a: c for c in hy.negative_controls(h, prompt_ids, 8)}


def test_prompt_goes_through_the_models_chat_template(loaded, prompt_ids):
    _, tok = loaded
    text = tok.decode(prompt_ids)
    assert hy.DEFAULT_AGREEMENT_PROMPT in text and text != hy.DEFAULT_AGREEMENT_PROMPT


def test_model_loads_every_checkpoint_tensor_and_runs_plain(loaded, prompt_ids):
    h, _ = loaded
    logits = h.use("plain").logits(prompt_ids)
    assert logits.shape == (len(prompt_ids), h.config.vocab_size)
    assert torch.isfinite(logits).all() and logits.abs().max() > 0


def _by_split(report):
    return {c.gpu_experts_per_layer: c for c in report.comparisons if c.b.startswith("hybrid")}


def test_hybrid_agrees_with_transformers_for_0_some_and_all_gpu_experts(loaded, report):
    h, _ = loaded
    splits = _by_split(report)
    assert set(splits) == set(hy.agreement_splits(h.num_experts))
    assert len(splits) >= 3 and 0 in splits and h.num_experts in splits
    for c in splits.values():
        assert c.positions == N_TOKENS
        assert c.token_matches == N_TOKENS, c.row()
        assert c.argmax_matches == N_TOKENS, c.row()
        assert c.ok, c.row()
        assert c.router_flips == 0, c.row()
    # all experts in torch: the same float32 arithmetic as transformers' own loop
    assert splits[h.num_experts].tolerance == hy.TOL_TORCH
    assert all(splits[n].tolerance == hy.TOL_KT for n in splits if n < h.num_experts)
    # kt-kernel really computed the experts it owns: its bf16 activations leave a trace
    assert splits[0].moe_rel_err > 1e-4 and splits[0].max_abs_dlogit > 0


def test_each_side_got_the_experts_the_mask_gave_it(loaded, report):
    h, _ = loaded
    stats = report.split_stats
    assert stats[f"hybrid 0/{h.num_experts} GPU"]["gpu_share"] == 0.0
    assert stats[f"hybrid {h.num_experts}/{h.num_experts} GPU"]["gpu_share"] == 1.0
    some = [s for name, s in stats.items() if name not in (f"hybrid 0/{h.num_experts} GPU", f"hybrid {h.num_experts}/{h.num_experts} GPU")]
    assert some and all(0.0 < s["gpu_share"] < 1.0 for s in some)
    assert all(s["calls"] > 0 and s["tokens"] > 0 for s in stats.values())
    # all experts on the GPU: never a trip to the CPU side; none on the GPU: always one
    assert stats[f"hybrid {h.num_experts}/{h.num_experts} GPU"]["cpu_calls_skipped"] == stats[f"hybrid {h.num_experts}/{h.num_experts} GPU"]["calls"]
    assert stats[f"hybrid 0/{h.num_experts} GPU"]["cpu_calls_skipped"] == 0


def test_llamacpp_on_the_gguf_agrees_with_transformers_and_the_hybrid(report):
    ll = [c for c in report.comparisons if c.b == "llama.cpp"]
    assert ll[0].a == "transformers" and len(ll) == 1 + len(_by_split(report))
    for c in ll:
        assert c.positions == N_TOKENS
        assert c.token_matches == N_TOKENS, c.row()
        assert c.argmax_matches == N_TOKENS, c.row()
        assert c.ok, c.row()
    assert report.ok


def test_prefill_longer_than_a_kt_chunk_is_sliced(loaded, prompt_ids):
    h, _ = loaded
    ref = h.use("plain").logits(prompt_ids)
    h.use("hybrid").place(h.num_experts // 2)
    saved = [kt.chunk_tokens for kt in h.kt]
    try:
        for kt in h.kt:
            kt.chunk_tokens = 5  # below the prompt length: several submit/sync rounds per layer
        h.reset_stats()
        sliced = h.logits(prompt_ids)
        assert h.stats.calls >= h.num_layers * (len(prompt_ids) // 5)
    finally:
        for kt, c in zip(h.kt, saved):
            kt.chunk_tokens = c
        h.place(0)
        h.use("plain")
    assert (sliced - ref).abs().max() <= hy.TOL_KT["max_abs_dlogit"]


def test_cpu_experts_are_submitted_before_torch_computes_and_collected_after(loaded, prompt_ids, monkeypatch):
    """KT's overlap: submit to kt-kernel, run the torch experts, then wait for kt-kernel."""
    h, _ = loaded
    order: list[str] = []
    kt = h.kt[0]
    real_submit, real_sync, real_torch = kt.submit, kt.sync, hy._torch_experts
    monkeypatch.setattr(kt, "submit", lambda *a: (order.append("submit"), real_submit(*a))[1])
    monkeypatch.setattr(kt, "sync", lambda *a: (order.append("sync"), real_sync(*a))[1])

    def torch_side(module, *a):
        if module is h.experts_modules[0]:
            order.append("torch")
        return real_torch(module, *a)

    monkeypatch.setattr(hy, "_torch_experts", torch_side)
    h.use("hybrid").place(h.num_experts // 2)
    try:
        h.logits(prompt_ids)  # one chunk: layer 0 sees one submit, one torch pass, one sync
    finally:
        h.place(0)
        h.use("plain")
    assert order == ["submit", "torch", "sync"]


def test_a_staging_buffer_left_by_another_model_is_not_reused(loaded, prompt_ids):
    """kt-kernel caches staging buffers by token count alone; one sized for another hidden size
    would be reused (RuntimeError: size mismatch). The split drops it first; same result."""
    from kt_kernel.experts_base import BaseMoEWrapper, KExpertsCPUBuffer

    h, _ = loaded
    h.use("hybrid").place(0)
    try:
        clean = h.logits(prompt_ids)
        BaseMoEWrapper.clear_buffer_cache()
        KExpertsCPUBuffer.get_buffer(torch.zeros(len(prompt_ids), 64), h.config.num_experts_per_tok)
        assert KExpertsCPUBuffer.temp_buffer[0][0].shape[-1] == 64  # planted
        again = h.logits(prompt_ids)
    finally:
        h.use("plain")
    assert torch.equal(clean, again)


@pytest.mark.parametrize(
    "name",
    [
        "wrong mask: an expert computed by neither side",
        "wrong mask: experts computed by both sides",
        "transformers, w1/w3 (gate/up) swapped",
        "transformers, FP8 block scales skipped",
    ],
)
def test_negative_control_fails_the_agreement_check(controls, name):
    c = controls[name]
    assert not c.ok, c.row()
    # not a borderline failure: the expert outputs are far outside what the real runs hold
    assert c.moe_rel_err > 5 * hy.TOL_KT["moe_rel_err"], c.row()


def test_masks_of_the_wrong_shape_are_refused(loaded):
    h, _ = loaded
    with pytest.raises(UserError, match="shape"):
        h.set_masks(torch.zeros(h.num_layers + 1, h.num_experts, dtype=torch.bool))


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        hy.load_model(tmp_path)


# --- routing statistics ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def routing(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("routing")
    return out, hy.run_routing(out, reply_tokens=8)


def test_routing_counts_every_token_k_times_per_layer(routing, loaded):
    h, _ = loaded
    _, study = routing
    k = h.config.num_experts_per_tok
    for counts, tokens in ((study["calibration_counts"], study["tokens_calibration"]),
                           (study["evaluation_counts"], study["tokens_evaluation"])):
        assert len(counts) == h.num_layers and all(len(row) == h.num_experts for row in counts)
        assert all(sum(row) == k * tokens for row in counts)


def test_coverage_grows_from_none_to_all_and_the_oracle_bounds_it(routing):
    _, study = routing
    for strategy, values in study["coverage"].items():
        assert values[0] == 0.0 and values[-1] == pytest.approx(1.0), strategy
        if strategy in ("uniform", "oracle"):
            assert all(b >= a - 1e-12 for a, b in zip(values, values[1:])), strategy
        assert all(o >= v - 1e-12 for o, v in zip(study["coverage"]["oracle"], values)), strategy
    assert set(study["coverage"]) == {"uniform", "front-loading", "frequency", "random", "oracle"}


def test_routing_writes_chart_and_valid_records(routing):
    from ktutorial import results

    out, study = routing
    png = out / "routing.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    recs = results.load_records(out / "routing.jsonl")
    assert len(recs) == len(study["gpu_experts"]) * len(study["coverage"])
    assert {r["kind"] for r in recs} == {"routing"}
    r = recs[-1]
    assert {"strategy", "gpu_experts_per_layer", "num_experts"} <= set(r["params"])
    assert 0.0 <= r["metrics"]["gpu_activation_share"] <= 1.0
    assert json.loads((out / "routing.json").read_text())["gpu_experts"] == study["gpu_experts"]


# --- CLI ------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    """Exit code of `ktutorial ARGV` run in this process (typer exits even on success)."""
    from ktutorial import cli

    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code or 0


def test_cli_agree_json_without_llamacpp(loaded, capsys, tmp_path):
    from ktutorial import results

    recs = tmp_path / "agreement.jsonl"
    assert _cli(["hybrid", "agree", "--no-llamacpp", "--tokens", "4", "--records", str(recs), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and len(out["comparisons"]) >= 3
    assert all(c["positions"] == 4 for c in out["comparisons"])
    written = results.load_records(recs)
    assert [r["params"]["b"] for r in written] == [c["b"] for c in out["comparisons"]]
    assert all(r["kind"] == "agreement" and r["metrics"]["ok"] for r in written)


@pytest.mark.parametrize("args, message", [(["--tokens", "0"], "at least 1"), (["--strategy", "hot"], "strategy")])
def test_cli_agree_bad_input_exits_2_with_the_fix(args, message, capsys):
    assert _cli(["hybrid", "agree", "--no-llamacpp", *args]) == 2
    assert message in capsys.readouterr().err


def test_our_dequantization_matches_transformers_own_fp8_loading(loaded, tiny_model):
    """transformers converts the FP8 folder itself (block_sparse_moe.experts.N.w1/w3/w2 ->
    mlp.experts.gate_up_proj/down_proj, dequantized on a CPU): bit for bit what we load."""
    from transformers import MiniMaxM2ForCausalLM

    h, _ = loaded
    theirs = MiniMaxM2ForCausalLM.from_pretrained(str(tiny_model.hf_dir), dtype=torch.float32).state_dict()
    ours = h.model.state_dict()
    assert set(theirs) == set(ours)
    differ = [k for k in ours if not torch.equal(theirs[k].float().cpu(), ours[k].float().cpu())]
    assert differ == []
