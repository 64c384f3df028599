"""The MiniMax-M2 family: MiniMax-M2.5 beside M2.1 (shipped config, profile, the published 4 x RTX 4090
launch re-planned, its "200 GB RAM" checked), any MiniMax-M2-architecture config.json read, other
architectures refused."""

from __future__ import annotations

import json

import pytest
from clirun import run_cli  # tests/clirun.py

from ktutorial import download, published_launch
from ktutorial.errors import UserError
from ktutorial.hardware import GIB
from ktutorial.plan import Goals, make_plan
from ktutorial.profiles import load_profile
from ktutorial.spec import ModelSpec, SpecError, known_model, known_models

M25 = ModelSpec.known("minimax-m2.5")


# ---- the spec ---------------------------------------------------------------------------------------


def test_minimax_m25_sizes_from_its_config():
    s = M25
    assert (s.num_layers, s.num_experts, s.experts_per_token) == (62, 256, 8)
    assert (s.hidden_size, s.expert_intermediate_size, s.num_kv_heads, s.head_dim) == (3072, 1536, 8, 128)
    assert s.fp8_block == (128, 128) and s.max_position_embeddings == 196608
    # One expert: w1, w3 [1536, 3072] and w2 [3072, 1536] in FP8, plus a float32 scale per 128x128 block.
    assert s.expert_bytes == 3 * 3072 * 1536 + 3 * (1536 // 128) * (3072 // 128) * 4 == 14_159_232
    assert round(s.layer_expert_bytes / 1e9, 3) == 3.625
    assert round(s.all_expert_bytes / 1e9, 1) == 224.7
    # KV: 62 layers x 8 KV heads x 128 x (K, V) x 2 bytes. MiniMax's own deploy guide says "240 GB per
    # 1M context tokens": 253,952 B x 1M = 236.5 GiB.
    assert s.kv_bytes_per_token("bf16") == 62 * 8 * 128 * 2 * 2 == 253_952
    assert s.kv_bytes_per_token("fp8") == 126_976
    assert abs(s.kv_bytes_per_token("bf16") * 1_000_000 / GIB - 240) < 4
    assert round(s.decode_expert_bytes_per_token / 1e9, 2) == 7.02
    assert round(s.checkpoint_bytes / 1e9, 1) == 230.0
    assert 225 < s.total_params / 1e9 < 232 and 9.5 < s.active_params / 1e9 < 11.5


def test_m25_is_a_known_model_beside_m21_with_an_unpinned_revision():
    assert {"minimax-m2.1", "minimax-m2.5"} <= set(known_models())
    meta = known_model("minimax-m2.5")
    assert meta["repo_id"] == "MiniMaxAI/MiniMax-M2.5" and meta["served_model_name"] == "MiniMax-M2.5"
    assert meta["config_sources"] and meta["config_unverified"]  # where each number came from, and the gap
    assert download.repo_for_model("minimax-m2.5") == ("MiniMaxAI/MiniMax-M2.5", "main")
    assert not download.is_pinned("main")
    note = download.unpinned_note("minimax-m2.5", "main")
    assert "unpinned" in note and "--revision SHA" in note
    assert download.unpinned_note("minimax-m2.5", "a" * 40) is None


def test_download_of_a_known_model_says_its_revision_is_unpinned(tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise UserError("hub not reachable (test)")

    monkeypatch.setattr(download, "plan_download", offline)
    rc, out, err = run_cli(["download", "--model", "minimax-m2.5", "--local-dir", str(tmp_path), "--dry-run"], capsys, flat_err=True)
    assert rc != 0 and "minimax-m2.5's revision is unpinned ('main'" in err


# ---- the published launch -----------------------------------------------------------------------------


def test_published_m25_launch_fits_on_its_machine():
    check = published_launch.check_launch("minimax-m2.5")
    assert check["name"] == "minimax-m2.5-4x4090"
    assert check["source"].startswith("https://github.com/kvcache-ai/ktransformers/blob/")
    assert check["verdict"] == "fits", check["reasons"]
    flags = check["planned_flags"]
    assert (flags["tensor-parallel-size"], flags["kt-num-gpu-experts"], flags["chunked-prefill-size"],
            flags["max-total-tokens"], flags["mem-fraction-static"]) == (4, 30, 32658, 50000, 0.94)
    assert check["not_modelled_flags"] == ["enable-p2p-check"]
    g = check["gpu"]
    assert g["tp"] == 4 and g["capacity_gib"] == 24 and g["kv_pool_tokens"] == 50000
    parts = g["per_gpu_gib"]
    assert parts["gpu_experts"] == pytest.approx(30 * 62 * M25.expert_bytes / 4 / GIB, abs=1e-3)
    assert parts["kv_cache"] == pytest.approx(50000 * 253_952 / 4 / GIB, abs=1e-3)
    assert parts["layerwise_prefill_layer"] == pytest.approx(M25.layer_expert_bytes / 4 / GIB, abs=1e-3)
    assert 14 < g["needed_gib"] < 20
    # The command sets no --max-running-requests: sglang then sizes its request table for 2048 requests
    # x (196,608 + 4) int32 on each GPU, and it still fits.
    assert g["sglang_default_requests"] == 2048
    assert g["request_table_gib"] == pytest.approx(2048 * 196612 * 4 / GIB, abs=0.01)
    assert g["fits_with_sglang_defaults"] and g["needed_with_sglang_defaults_gib"] <= 24
    # The 0.94 fraction would allow a far bigger pool; --max-total-tokens caps it, leaving the rest free.
    assert g["free_outside_weights_and_pool_gib"] == pytest.approx(24 - g["static_gib"], abs=0.01)
    assert g["free_outside_weights_and_pool_gib"] > parts["activations"] + parts["layerwise_prefill_layer"]


def test_published_m25_ram_statement_checked_by_the_arithmetic():
    check = published_launch.check_launch("minimax-m2.5")
    s = check["ram_statement"]
    assert s["stated_gb"] == 200 and s["verdict"] == "wrong"
    assert s["experts_gb"] == 224.7 > 200  # the experts alone do not fit in 200 GB
    assert s["stated_gib_in_gb"] == pytest.approx(214.7, abs=0.1)
    assert s["stated_gib_in_gb"] < s["experts_gb"]  # nor in 200 GiB
    parts = s["parts_gb"]
    # kt-kernel's buffers for one 32,658-token chunk: fp32 gate/up/down outputs of every routed token + bf16 in/out.
    assert parts["kt_kernel_buffers"] == pytest.approx((32658 * 8 * (2 * 1536 + 3072) * 4 + 2 * 32658 * 3072 * 2) / 1e9,
                                                       abs=0.01)
    assert s["needed_gb"] == pytest.approx(sum(parts.values()), abs=0.1)
    assert s["shortfall_gb"] == pytest.approx(s["needed_gb"] - 200, abs=0.1) and s["shortfall_gb"] > 50
    # Even the CPU-side experts alone (226 of 256 a layer) leave under 2 GB of 200 for everything else.
    assert s["cpu_experts_only_gb"] == pytest.approx(224.7 * 226 / 256, abs=0.1)
    assert check["at_stated_ram"]["verdict"] == "does-not-fit"
    assert any(r.startswith("RAM 200 GB < 254 GB needed") for r in check["at_stated_ram"]["reasons"])
    assert check["storage_statement"] == {"stated_gb": 200, "checkpoint_gb": 230.0, "checkpoint_gib": 214.2,
                                          "verdict": "too low"}
    lines = "\n".join(published_launch.summary_lines(check))
    assert "stated RAM 200 GB: wrong: the experts alone are 224.7 GB" in lines and "short by 53.6 GB" in lines


@pytest.mark.parametrize("parts, stated, verdict", [
    ({"experts": 224.7, "os_reserve": 4.0}, 200, "wrong"),
    ({"experts": 150.0, "os_reserve": 60.0}, 200, "too low"),
    ({"experts": 150.0, "os_reserve": 4.0}, 200, "holds"),
])
def test_ram_statement_verdicts(parts, stated, verdict):
    s = published_launch.ram_statement(M25, parts, stated, gpu_experts_per_layer=0)
    assert s["verdict"] == verdict and s["needed_gb"] == pytest.approx(sum(parts.values()), abs=0.1)


def test_cli_plan_reproduces_the_published_machine(capsys):
    check = published_launch.check_launch("minimax-m2.5")
    rc, out, err = run_cli([*check["plan_command"], "--json"], capsys, flat_err=True)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["model"] == "minimax-m2.5" and doc["verdict"] == "fits"
    s = doc["settings"]
    assert (s["kt-num-gpu-experts"], s["tensor-parallel-size"], s["kt-cpuinfer"]) == (30, 4, 96)
    assert s["chunked-prefill-size"] == 32658
    assert set(doc["overridden"]) >= {"kt-num-gpu-experts", "mem-fraction-static", "max-total-tokens"}
    cmd = doc["command"]
    assert cmd[cmd.index("--served-model-name") + 1] == "MiniMax-M2.5"
    assert cmd[cmd.index("--kt-gpu-prefill-token-threshold") + 1] == "400"
    # The same machine with the tutorial's 200 GB is refused, with the numbers.
    args = list(check["plan_command"])
    args[args.index("--ram-gb") + 1] = "200"
    rc, out, err = run_cli(args, capsys, flat_err=True)
    flat = " ".join(out.split())  # rich wraps the plan's lines to the terminal
    assert rc == 1 and "RAM 200 GB < 254 GB needed" in flat and "224.7 GB" in flat


def test_cli_published_launch(capsys):
    rc, out, err = run_cli(["published-launch", "minimax-m2.5"], capsys, flat_err=True)
    assert rc == 0, err
    assert "4x RTX 4090" in out and "fits" in out and "stated RAM 200 GB: wrong" in out
    rc, out, err = run_cli(["published-launch", "minimax-m2.5-4x4090", "--json"], capsys, flat_err=True)
    assert rc == 0 and json.loads(out)["ram_statement"]["verdict"] == "wrong"
    rc, out, err = run_cli(["published-launch", "qwen3"], capsys, flat_err=True)
    assert rc == 2 and "published launches: minimax-m2.5-4x4090 (minimax-m2.5)" in err


def test_m25_profile_plans_on_the_published_machine():
    from ktutorial import server

    prof = load_profile("minimax-m2.5")
    assert prof.model == "minimax-m2.5" and prof.served_model_name == "MiniMax-M2.5"
    plan = server.plan_for_profile(prof, gpu="RTX 4090:24", gpus=4, ram_gb=256, cpu_cores=96, logical_cpus=192,
                                   numa_nodes=2, cpu_flags="avx512f,avx512bw,avx512_bf16")
    assert plan.fits, plan.reasons
    assert plan.spec.name == "minimax-m2.5" and plan.settings["model-path"].value == "~/models/MiniMax-M2.5"
    assert plan.memory["gpu"]["context_tokens"] == 50000


# ---- any MiniMax-M2-architecture config.json; other architectures refused -------------------------------

QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
             "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
             "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936}
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
               "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_attention_heads": 128,
               "num_key_value_heads": 128, "vocab_size": 129280}


def write_config(folder, config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("config, found", [
    (QWEN3_MOE, "model_type 'qwen3_moe', architectures ['Qwen3MoeForCausalLM']"),
    (DEEPSEEK_V3, "model_type 'deepseek_v3', architectures ['DeepseekV3ForCausalLM']"),
    ({**known_model("minimax-m2.5")["config"], "architectures": ["MiniMaxText01ForCausalLM"]},
     "model_type 'minimax_m2', architectures ['MiniMaxText01ForCausalLM']"),
])
def test_other_architectures_are_refused_naming_what_was_found(tmp_path, config, found):
    with pytest.raises(SpecError) as err:
        ModelSpec.from_dir(write_config(tmp_path / "m", config))
    msg = str(err.value)
    assert found in msg and "model_type 'minimax_m2'" in msg and "MiniMaxM2ForCausalLM" in msg


def test_cli_plan_refuses_another_architecture(tmp_path, capsys):
    folder = write_config(tmp_path / "DeepSeek-V3", DEEPSEEK_V3)
    rc, out, err = run_cli(["plan", "--model-dir", str(folder), "--gpu", "RTX 4090:24"], capsys, flat_err=True)
    assert rc == 2
    assert "config.json of 'DeepSeek-V3' is model_type 'deepseek_v3'" in err and "MiniMax-M2 architecture only" in err


def test_config_without_architecture_or_a_needed_field_is_refused_naming_the_field():
    cfg = dict(known_model("minimax-m2.5")["config"])
    for key in ("model_type", "architectures"):
        cfg.pop(key)
    with pytest.raises(SpecError, match="lacks field model_type"):
        ModelSpec.from_config(cfg, name="x")
    cfg = dict(known_model("minimax-m2.5")["config"])
    del cfg["num_key_value_heads"]
    with pytest.raises(SpecError, match="lacks field.*num_key_value_heads"):
        ModelSpec.from_config(cfg, name="x")
    # model_type alone (no architectures list) is enough.
    cfg = {k: v for k, v in known_model("minimax-m2.5")["config"].items() if k != "architectures"}
    assert ModelSpec.from_config(cfg).num_layers == 62


def test_cli_plan_reads_any_m2_architecture_folder(tmp_path, capsys):
    """A checkpoint folder of the family (here a 20-layer variant) is planned from its own config,
    named after its folder; --model names it as a known model instead."""
    cfg = {**known_model("minimax-m2.5")["config"], "num_hidden_layers": 20, "attn_type_list": [1] * 20}
    folder = write_config(tmp_path / "MiniMax-M2.5-20L", cfg)
    rc, out, err = run_cli(["plan", "--model-dir", str(folder), "--gpu", "RTX 4090:24", "--ram-gb", "128", "--json"],
                           capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["model"] == "MiniMax-M2.5-20L" and doc["settings"]["served-model-name"] == "MiniMax-M2.5-20L"
    assert doc["settings"]["model-path"] == str(folder)
    assert doc["memory"]["host"]["parts_gb"]["experts"] == pytest.approx(20 * 256 * M25.expert_bytes / 1e9, abs=0.01)
    rc, out, err = run_cli(["plan", "--model", "minimax-m2.5", "--model-dir", str(folder), "--gpu", "RTX 4090:24",
                            "--ram-gb", "128", "--json"], capsys, flat_err=True)
    assert rc == 0 and json.loads(out)["settings"]["served-model-name"] == "MiniMax-M2.5"


# ---- a typo'd model name --------------------------------------------------------------------------------


def test_typod_model_name_lists_the_known_ones(capsys):
    with pytest.raises(SpecError, match=r"unknown model 'minimax-m2\.6' \(did you mean minimax-m2\.5"):
        ModelSpec.known("minimax-m2.6")
    rc, out, err = run_cli(["plan", "--model", "MiniMax-M25"], capsys, flat_err=True)
    assert rc == 2
    assert "unknown model 'MiniMax-M25' (did you mean minimax-m2.5" in err
    assert "known models: minimax-m2.1, minimax-m2.5, tiny" in err
    with pytest.raises(UserError, match="known models: minimax-m2.1, minimax-m2.5 .or pass --repo"):
        download.repo_for_model("minimax-2.5")


def test_m25_plans_like_m21_on_the_same_machine():
    """Same architecture, same sizes: the planner's numbers match (names and paths differ)."""
    from ktutorial.hardware import Hardware

    hw = Hardware.described(gpu="RTX 5090:32", gpus=2, ram_gb=512, cpu_cores=64, logical_cpus=128, numa_nodes=2,
                            cpu_flags=["avx512f", "avx512bw", "avx512_bf16"])
    a = make_plan(ModelSpec.known("minimax-m2.1"), hw, Goals(context_tokens=65536))
    b = make_plan(M25, hw, Goals(context_tokens=65536))
    assert a.memory["gpu"] == b.memory["gpu"] and a.memory["host"] == b.memory["host"]
    assert b.settings["model-path"].value == "~/models/MiniMax-M2.5"
