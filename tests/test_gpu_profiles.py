"""The profiles that run SGLang + KT on a GPU host (tiny-sglang, minimax-m2.1-synth): the plan, the
rendered command and what sglang-kt's own parser makes of it, without a GPU (described hardware)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ktutorial import bench, server, synth
from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError
from ktutorial.profiles import load_profile

H200 = dict(gpu="H200:141", ram_gb=135, cpu_cores=16, numa_nodes=1, cpu_flags="avx512f,avx512_bf16,amx_tile")
ROOT = Path(__file__).resolve().parents[1]


def _flags(command):
    return sglang_kt.parse_command(command)


def test_tiny_sglang_serves_the_tiny_with_the_profiles_host_flags(tiny_model):
    launch = server.prepare("tiny-sglang", dry_run=True, plan_options=H200)
    flags = _flags(launch.command)
    assert flags["model-path"] == str(tiny_model.hf_dir) == flags["kt-weight-path"]
    assert flags["served-model-name"] == "ktutorial-tiny" and launch.model == "ktutorial-tiny"
    assert flags["kt-method"] == "FP8" and flags["kt-num-gpu-experts"] == "4"
    # the bundle's backends come from the profile's data, not from code
    prof = load_profile("tiny-sglang")
    for flag, value in prof.sglang.items():
        assert flag in flags, flag
        if not isinstance(value, bool):
            assert str(flags[flag]) == str(value), flag
    assert flags["host"] == "127.0.0.1"


def test_tiny_sglang_command_is_accepted_by_sglang_kts_own_parser(tiny_model):
    exe = sglang_kt.default_parser_python()
    if not exe.exists():
        pytest.fail("run `make sglang-parser-env` (make test builds it first)")
    commands = [server.prepare("tiny-sglang", dry_run=True, plan_options=H200).command,
                server.prepare("tiny-sglang", dry_run=True, plan_options=H200,
                               overrides={"kt-num-gpu-experts": 0, "kt-gpu-prefill-token-threshold": 256}).command]
    out = sglang_kt.check_with_real_parser(commands, exe)
    for res in out["results"]:
        assert res["ok"], res.get("error")
        values = res["values"]
        assert values["sampling_backend"] == "pytorch" and values["grammar_backend"] == "none"
        assert values["moe_runner_backend"] == "triton" and values["disable_cuda_graph"] is True
        assert values["served_model_name"] == "ktutorial-tiny"
    assert out["results"][1]["values"]["kt_num_gpu_experts"] == 0
    assert out["results"][1]["values"]["kt_gpu_prefill_token_threshold"] == 256


def test_a_notebook_planning_m21_for_a_tiny_profile_plans_m21(tiny_model):
    """Seen on the GPU host: the plan for MiniMax-M2.1 took the tiny's folder and the planner's
    fraction for it. The tiny's folder belongs to the tiny's plan only."""
    prof = load_profile("tiny-sglang")
    m21 = server.plan_for_profile(prof, model="minimax-m2.1", **H200)
    assert m21.spec.num_layers == 62 and m21.settings["model-path"].value == "~/models/MiniMax-M2.1"
    tiny_plan = server.plan_for_profile(prof, **H200)
    assert tiny_plan.spec.num_layers == tiny_model.spec.num_layers
    assert tiny_plan.settings["model-path"].value == str(tiny_model.hf_dir)


def test_synth_profile_plans_from_the_checkpoints_own_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(synth.config_dict(2)))
    launch = server.prepare("minimax-m2.1-synth", dry_run=True, plan_options={**H200, "model_dir": str(tmp_path)})
    assert launch.plan.spec.num_layers == 2 and launch.plan.spec.num_experts == 256
    flags = _flags(launch.command)
    assert flags["model-path"] == str(tmp_path) and flags["mem-fraction-static"] == "0.5"


def test_a_typo_in_a_profiles_sglang_block_is_refused_with_the_flag(tmp_path, tiny_model):
    text = (ROOT / "ktutorial" / "data" / "profiles" / "tiny-sglang.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("sampling-backend: pytorch", "sampling-backnd: pytorch"))
    with pytest.raises(UserError, match="--sampling-backnd: not a flag ktutorial emits"):
        server.prepare(str(bad), dry_run=True, plan_options=H200)


@pytest.mark.parametrize("name, combos", [("tiny-sglang", 5), ("minimax-m2.1-synth", 5)])
def test_gpu_sweeps_plan_their_combinations(name, combos, tmp_path):
    summary = bench.sweep(name, tmp_path / "x.jsonl", dry_run=True, progress=False)
    assert len(summary["plan"]) == combos and summary["profile"] == name
    assert all("kt-num-gpu-experts" in item["serve"] for item in summary["plan"])


def test_gpu_host_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "results" / "gpu-host.sh")], check=True)


def test_a_typo_in_a_profile_or_sweep_file_names_the_key_and_the_valid_ones(tmp_path):
    text = (ROOT / "ktutorial" / "data" / "profiles" / "tiny.yaml").read_text()
    bad = tmp_path / "typo.yaml"
    bad.write_text(text.replace("served_model_name:", "served_model_nam:"))
    with pytest.raises(UserError, match=r"unknown key 'served_model_nam' \(known: .*served_model_name"):
        load_profile(str(bad))
    bad.write_text(text.replace("  output_len: 32", "  output_lenn: 32"))
    with pytest.raises(UserError, match=r"unknown key 'bench.output_lenn' \(known: input_lens, output_len"):
        load_profile(str(bad))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("profile: tiny\nserve: {threads: [1]}\nrepeat: 3\n")
    with pytest.raises(UserError, match=r"unknown keys \['repeat'\] \(known: name, description, profile"):
        bench.load_sweep(sweep)
