"""engines/sglang_kt.py: rendering, ktutorial's own checks, and sglang-kt 0.7.2's real parser.

The real-parser tests run `sglang.srt.server_args.ServerArgs.add_cli_args` from the sglang-kt
package, installed without its GPU dependencies in `.venv-sglang` (`make sglang-parser-env`;
`make test` builds it first), over every command ktutorial renders for the plans below.
"""

from __future__ import annotations

import json
import sys

import pytest

from ktutorial import plan as planning
from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError
from ktutorial.hardware import Hardware
from ktutorial.plan import Goals, make_plan
from ktutorial.spec import ModelSpec

SPEC = ModelSpec.known("minimax-m2.1")
AVX512_BF16 = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16"]


def _plans() -> dict[str, planning.Plan]:
    """Every kind of plan ktutorial renders: the published runs (planner and published settings),
    the tiny profile's described machine, and settings the planner only emits on some machines."""
    from ktutorial.profiles import load_profile

    plans = {}
    for run in planning.PUBLISHED_RUNS:
        hw = planning.published_hardware(run)
        plans[f"planner {run['run']}"] = make_plan(SPEC, hw, Goals(context_tokens=80000))
        plans[f"published {run['run']}"] = make_plan(
            SPEC, hw, Goals(context_tokens=planning.PUBLISHED_LONGEST_REQUEST_TOKENS, overrides=run["published"]))
    five = planning.published_hardware(planning.PUBLISHED_RUNS[3])
    plans["2x5090 fp8 KV 80k"] = make_plan(SPEC, five, Goals(context_tokens=80000, kv_dtype="fp8",
                                                             overrides=planning.PUBLISHED_RUNS[3]["published"]))
    tiny = Hardware.described(**load_profile("tiny").described_hardware)
    plans["tiny profile's described machine"] = make_plan(SPEC, tiny, Goals())
    plans["4 x H100, TP 4, fp8_e5m2"] = make_plan(
        SPEC, Hardware.described(gpu="H100:80", gpus=4, cpu_cores=96, numa_nodes=2, ram_gb=1024,
                                 cpu_flags=AVX512_BF16 + ["amx_tile", "amx_int8", "amx_bf16"]),
        Goals(context_tokens=150000, kv_dtype="fp8_e5m2"))
    # NUMA nodes numbered 0 and 2 (node 1 memory-only): kt-numa-nodes is emitted.
    numa = Hardware.described(gpu="RTX 5090:32", gpus=2, cpu_cores=64, logical_cpus=128, numa_nodes=2,
                              ram_gb=768, cpu_flags=AVX512_BF16)
    from dataclasses import replace

    plans["NUMA ids 0 and 2"] = make_plan(SPEC, replace(numa, numa_node_ids=(0, 2)), Goals(context_tokens=40000))
    plans["no GPU experts, AVX2 only"] = make_plan(
        SPEC, Hardware.described(gpu="RTX 4090:24", cpu_cores=16, ram_gb=512, cpu_flags=["avx2"]),
        Goals(context_tokens=20000, overrides={"kt-num-gpu-experts": 0}))
    return plans


PLANS = _plans()
SERVE_OVERRIDES = {"--host": "127.0.0.1", "--port": 31234}
EXTRA = {"enable-metrics": True, "log-level": "warning", "disable-radix-cache": True, "cuda-graph-max-bs": 2,
         "context-length": 65536, "max-prefill-tokens": 32768, "kt-expert-placement-strategy": "frequency",
         "kt-max-deferred-experts-per-token": 2, "reasoning-parser": "minimax", "enable-mixed-chunk": True,
         "init-expert-location": "traffic.pt", "expert-distribution-recorder-mode": "stat",
         "expert-distribution-recorder-buffer-size": -1, "record-kt-gpu-expert-distribution": True}


def _rendered() -> dict[str, list[str]]:
    out = {}
    for name, plan in PLANS.items():
        assert plan.fits, (name, plan.reasons)
        out[name] = sglang_kt.render_command(plan, python="python")
    name = "planner 2 x RTX 5090 (32 GB) + 2 x EPYC 9355"
    out["served (host, port)"] = sglang_kt.render_command(PLANS[name], SERVE_OVERRIDES)
    out["every optional flag"] = sglang_kt.render_command(PLANS[name], EXTRA)
    out["a ratio instead of a count"] = [a for a in out[name]]
    i = out["a ratio instead of a count"].index("--kt-num-gpu-experts")
    out["a ratio instead of a count"][i:i + 2] = ["--kt-gpu-experts-ratio", "0.1"]
    return out


# ---- rendering and ktutorial's own checks (no parser venv needed) ---------------------------------


def test_render_round_trips_and_carries_the_essentials():
    for name, cmd in _rendered().items():
        assert cmd[1:3] == ["-m", "sglang.launch_server"], name
        parsed = sglang_kt.validate(cmd, SPEC)
        assert parsed["kt-method"] == "FP8" and parsed["tool-call-parser"] == "minimax-m2", name
        assert parsed["served-model-name"] == "MiniMax-M2.1"
        assert parsed["model-path"] == parsed["kt-weight-path"]
    plan = PLANS["planner 2 x RTX 5090 (32 GB) + 2 x EPYC 9355"]
    assert sglang_kt.validate(plan) == sglang_kt.validate(sglang_kt.render_command(plan))
    assert sglang_kt.render_command(plan)[0] == sys.executable


def test_served_command_and_env():
    plan = PLANS["planner 2 x RTX 5090 (32 GB) + 2 x EPYC 9355"]
    cmd = sglang_kt.render_command(plan, SERVE_OVERRIDES, expand_paths=True)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "31234"
    assert "~" not in cmd[cmd.index("--model-path") + 1]
    env = sglang_kt.render_env(plan)
    assert set(env) == {e["name"] for e in sglang_kt.env_schema()}
    line = sglang_kt.command_line(sglang_kt.render_command(plan), env)
    assert line.startswith("OMP_WAIT_POLICY=PASSIVE python -m sglang.launch_server --model-path ~/models/MiniMax-M2.1 ")


def test_memory_override_replans_and_refuses_what_does_not_fit():
    plan = PLANS["planner 2 x RTX 5090 (32 GB) + 2 x EPYC 9355"]
    cmd = sglang_kt.render_command(plan, {"kt-num-gpu-experts": 20})
    mem = float(cmd[cmd.index("--mem-fraction-static") + 1])
    assert cmd[cmd.index("--kt-num-gpu-experts") + 1] == "20"
    assert mem < plan.settings["mem-fraction-static"].value  # fewer experts: a smaller static share
    with pytest.raises(sglang_kt.SettingsError, match=r"GiB needed > 32 GiB"):
        sglang_kt.render_command(plan, {"--kt-num-gpu-experts": 90})


@pytest.mark.parametrize("change, words", [
    ({"kt-method": "fp8"}, "upper case: --kt-method FP8"),
    ({"kt-method": "AMXINT5"}, "kt-kernel 0.7.2 does not know it"),
    ({"kt-method": "AMXINT4"}, "use --kt-method FP8"),
    ({"kt-num-gpu-experts": None}, "neither --kt-num-gpu-experts nor --kt-gpu-experts-ratio"),
    ({"served-model-name": "minimax:m2.1"}, "contains ':'"),
    ({"served-model-name": " "}, "is empty"),
    ({"kt-numa-nodes": [0]}, "1 nodes for --kt-threadpool-count 2"),
    ({"kt-cpuinfer": 1}, "each pool needs a thread"),
    ({"kt-weight-path": None}, "without --kt-weight-path"),
    ({"model-path": None}, "--model-path missing"),
    ({"reasoning-parser": "deepseek-r1"}, "use one of minimax-append-think, minimax"),
    ({"tool-call-parser": "minimax"}, "use one of minimax-m2"),
    ({"kv-cache-dtype": "fp4_e2m1"}, "use one of"),
    ({"mem-fraction-static": 1.0}, "must be less than 1"),
    ({"chunked-prefill-size": -1}, "must be at least 1"),
    ({"kt-num-gpu-experts": 300}, "> the 256 experts"),
    ({"port": 70000}, "at most 65535"),
    ({"tensor-parallel-size": "two"}, "whole number"),
    ({"trust-remote-code": "maybe"}, "true or false"),
    ({"no-such-flag": 1}, "not a flag ktutorial emits"),
    ({"kt-expert-placement-strategy": "frequency"}, "without --init-expert-location FILE.pt"),
    ({"kt-expert-placement-strategy": "frequency", "init-expert-location": "traffic.json"}, "FILE.pt"),
    ({"record-kt-gpu-expert-distribution": True}, "add --expert-distribution-recorder-mode stat"),
    ({"expert-distribution-recorder-mode": "stat", "expert-distribution-recorder-buffer-size": 0}, "use -1"),
    ({"expert-distribution-recorder-buffer-size": -2}, "must be at least -1"),
])
def test_validate_refuses_what_fails_later(change, words):
    values = PLANS["planner 2 x RTX 5090 (32 GB) + 2 x EPYC 9355"].values()
    values.update(change)
    values = {k: v for k, v in values.items() if v is not None}
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        sglang_kt.validate_settings(values, SPEC)


def test_schema_covers_every_flag_the_planner_emits():
    flags = {row["flag"] for row in sglang_kt.settings_schema()}
    for name, plan in PLANS.items():
        for flag, setting in plan.settings.items():
            if setting.value is not None:
                assert f"--{flag}" in flags, (name, flag)
    assert all(row["why"] for row in sglang_kt.settings_schema())


def test_one_registry_types_every_override():
    assert sglang_kt.coerce_value("--tp", "2") == 2
    assert sglang_kt.coerce_value("mem_fraction_static", "0.8") == 0.8
    assert sglang_kt.coerce_value("disable-cuda-graph", "") is True
    assert sglang_kt.coerce_value("kt-numa-nodes", "0,1") == [0, 1]
    assert sglang_kt.coerce_overrides({"tp-size": "2", "--port": "30000"}) == {"tensor-parallel-size": 2,
                                                                                "port": 30000}
    assert set(sglang_kt.MEMORY_FLAGS) == {n for n, f in sglang_kt.FLAGS.items() if f.memory}
    assert "kt-num-gpu-experts" in sglang_kt.MEMORY_FLAGS and "port" not in sglang_kt.MEMORY_FLAGS
    for gone in ("_FLAG_TYPES", "_BOOL_FLAGS", "_FLAG_ALIASES", "_coerce", "_normalize_overrides", "MEMORY_FLAGS"):
        assert not hasattr(planning, gone), gone  # the planner keeps no second registry


@pytest.mark.parametrize("overrides, words", [
    ({"kt-num-gpu-experts": "forty"}, "--kt-num-gpu-experts 'forty': takes a whole number"),
    ({"kt-method": "fp8"}, "upper case: --kt-method FP8"),
    ({"kv-cache-dtype": "fp4"}, "--kv-cache-dtype 'fp4': use one of auto, bf16"),
    ({"kt-num-gpu-expert": 40}, "--kt-num-gpu-expert: not a flag ktutorial emits"),
    ({"port": None}, "--port: no value"),
    ({"--": 1}, "empty flag name"),
])
def test_make_plan_refuses_a_bad_override_with_the_flag_and_the_fix(overrides, words):
    with pytest.raises(sglang_kt.SettingsError, match=words.replace("(", r"\(").replace(")", r"\)")):
        make_plan(SPEC, Hardware.described(gpu="RTX 5090:32", gpus=2, cpu_cores=64, logical_cpus=128,
                                           numa_nodes=2, ram_gb=1024), Goals(overrides=overrides))
    with pytest.raises(sglang_kt.SettingsError, match=words.replace("(", r"\(").replace(")", r"\)")):
        sglang_kt.check_overrides(overrides)


# ---- sglang-kt's real parser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_parser():
    exe = sglang_kt.default_parser_python()
    if not exe.exists():
        pytest.fail(f"{exe.parent.parent.name} is missing: run `make sglang-parser-env` (make test builds it first)")
    rendered = _rendered()
    base = rendered["planner 2 x RTX 5090 (32 GB) + 2 x EPYC 9355"]
    negatives = {
        "bad reasoning parser": [*base, "--reasoning-parser", "not-a-parser"],
        "bad int": [a if a != "32" else "thirty-two" for a in base],
        "unknown flag": [*base, "--kt-no-such-flag", "1"],
        "bad placement choice": [*base, "--kt-expert-placement-strategy", "hottest"],
    }
    lowercase = [a if a != "FP8" else "fp8" for a in base]
    names = [*rendered, *negatives, "lowercase kt-method"]
    commands = [*rendered.values(), *negatives.values(), lowercase]
    out = sglang_kt.check_with_real_parser(commands, exe)
    results = dict(zip(names, out["results"]))
    return {"rendered": rendered, "results": results, "flags": out["flags"], "negatives": list(negatives),
            "lowercase": lowercase}


def test_real_parser_accepts_every_rendered_command(real_parser):
    for name, cmd in real_parser["rendered"].items():
        res = real_parser["results"][name]
        assert res["ok"], (name, res.get("error"), cmd)
        values = res["values"]
        ours = sglang_kt.validate(cmd, SPEC)
        # The parser read what ktutorial meant.
        assert values["kt_method"] == "FP8"
        assert values["model_path"] == ours["model-path"]
        assert values["tensor_parallel_size"] == ours["tensor-parallel-size"]
        assert values["kt_threadpool_count"] == ours["kt-threadpool-count"]
        assert values["kt_cpuinfer"] == ours["kt-cpuinfer"]
        assert values["chunked_prefill_size"] == ours["chunked-prefill-size"]
        assert values["max_total_tokens"] == ours["max-total-tokens"]
        assert values["tool_call_parser"] == "minimax-m2"
        assert values["served_model_name"] == "MiniMax-M2.1"
        assert values["trust_remote_code"] is True
        if "kt-num-gpu-experts" in ours:
            assert values["kt_num_gpu_experts"] == ours["kt-num-gpu-experts"]
        if "mem-fraction-static" in ours:
            assert values["mem_fraction_static"] == pytest.approx(ours["mem-fraction-static"])
        if "kt-numa-nodes" in ours:
            assert values["kt_numa_nodes"] == ours["kt-numa-nodes"]
    numa = real_parser["results"]["NUMA ids 0 and 2"]["values"]
    assert numa["kt_numa_nodes"] == [0, 2]
    served = real_parser["results"]["served (host, port)"]["values"]
    assert served["host"] == "127.0.0.1" and served["port"] == 31234


def test_real_parser_rejects_the_negative_controls(real_parser):
    for name in real_parser["negatives"]:
        res = real_parser["results"][name]
        assert not res["ok"] and res["exit"] == 2, (name, res)


def test_parser_takes_a_lowercase_method_that_ktutorial_refuses(real_parser):
    """Why validate() exists: the parser has no choices for --kt-method."""
    res = real_parser["results"]["lowercase kt-method"]
    assert res["ok"] and res["values"]["kt_method"] == "fp8"
    with pytest.raises(UserError, match="upper case"):
        sglang_kt.validate(real_parser["lowercase"], SPEC)


def test_schema_matches_the_real_parser(real_parser):
    flags = real_parser["flags"]
    for row in sglang_kt.settings_schema():
        flag = row["flag"]
        assert flag in flags, f"{flag} is not a sglang-kt 0.7.2 flag"
        parser = flags[flag]
        kind = row["type"]
        if kind == "bool":
            assert parser["nargs"] == 0, flag
        else:
            assert parser["takes_value"], flag
        if kind == "int_list":
            assert parser["nargs"] == "+", flag
        if kind in ("int", "float", "int_list"):
            assert parser["type"] == ("float" if kind == "float" else "int"), flag
        if row["choices"] and parser["choices"]:
            assert set(row["choices"]) <= set(parser["choices"]), (flag, row["choices"], parser["choices"])
    assert flags["--kt-method"]["choices"] is None  # hence ktutorial's own check
    print(json.dumps({k: flags[k]["choices"] for k in ("--reasoning-parser", "--tool-call-parser")}))
