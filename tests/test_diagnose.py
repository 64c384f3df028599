"""The diagnosis catalog: every entry matches its own example, fixes carry the plan's numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ktutorial.diagnose import catalog, catalog_markdown, diagnose

SGLANG_CMD = [
    "python", "-m", "sglang.launch_server", "--model-path", "/models/MiniMax-M2.1",
    "--kt-method", "FP8", "--kt-weight-path", "/models/MiniMax-M2.1", "--kt-num-gpu-experts", "40",
    "--chunked-prefill-size", "32768", "--mem-fraction-static", "0.90", "--max-total-tokens", "80000",
    "--port", "30000",
]  # fmt: skip


@pytest.mark.parametrize("pattern", [p for p in catalog() if p.regex], ids=lambda p: p.id)
def test_each_example_is_diagnosed_as_its_own_entry(pattern):
    found = diagnose(f"some line before\n{pattern.example}\nsome line after", command=SGLANG_CMD)
    assert pattern.id in [d.id for d in found]
    mine = next(d for d in found if d.id == pattern.id)
    assert mine.evidence.strip() == pattern.example.strip()
    assert mine.cause and mine.fix
    assert "<" not in mine.fix.replace("<think>", "")  # no unfilled template names


def test_catalog_ids_are_unique_and_cover_the_issue():
    ids = [p.id for p in catalog()]
    assert len(ids) == len(set(ids))
    for needed in ("cuda-oom", "kt-weight-path", "kt-not-applied", "fp8-triton-old-gpu", "kt-cpu-variant-avx2",
                   "port-in-use", "killed", "gguf-load", "unknown-arch"):
        assert needed in ids


def test_cuda_oom_fix_names_setting_and_lower_value_from_command_and_plan():
    plan = SimpleNamespace(
        settings={"kt-num-gpu-experts": SimpleNamespace(value=40, reason="fits 32 GiB")},
        memory={"gpu_needed_gib": 31.2, "gpu_capacity_gib": 32.0},
    )
    log = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB."
    [d] = diagnose(log, plan=plan, command=SGLANG_CMD)
    assert d.id == "cuda-oom"
    # one GPU expert is 14.16 MB x 62 layers = 0.82 GiB; freeing ~2 GiB means 3 fewer
    assert "lower --kt-num-gpu-experts from 40 to 37" in d.fix
    assert "0.82 GiB" in d.fix
    assert "--chunked-prefill-size from 32768 to 16384" in d.fix
    assert "--mem-fraction-static from 0.90 to 0.85" in d.fix
    assert "31.2 of 32.0 GiB" in d.fix
    # from the plan alone, no command
    [d2] = diagnose(log, plan=plan)
    assert "from 40 to 37" in d2.fix


def test_tensor_parallel_halves_the_cost_of_a_gpu_expert():
    cmd = SGLANG_CMD + ["--tensor-parallel-size", "2"]
    [d] = diagnose("RuntimeError: CUDA error: out of memory", command=cmd)
    assert "0.41 GiB" in d.fix and "from 40 to 35" in d.fix


def test_kt_not_applied_is_found_from_the_command_and_explains_the_oom():
    cmd = [a for a in SGLANG_CMD]
    i = cmd.index("--kt-num-gpu-experts")
    del cmd[i:i + 2]
    found = diagnose("torch.OutOfMemoryError: CUDA out of memory.", command=cmd)
    assert [d.id for d in found] == ["kt-not-applied"]
    assert "225 GB" in found[0].cause


def test_killed_by_exit_code_names_host_ram_with_plan_numbers():
    plan = SimpleNamespace(settings={}, memory={"ram_needed_gb": 241, "ram_available_gb": 128})
    found = diagnose("loading shard 12 of 48\n", plan=plan, returncode=-9)
    assert [d.id for d in found] == ["killed"]
    assert "241 GB" in found[0].fix and "128 GB" in found[0].fix
    assert found[0].evidence == "exit code -9"


def test_unknown_arch_shadows_the_generic_gguf_failure():
    log = (
        "llama_model_load: error loading model: unknown model architecture: 'nonsense-arch'\n"
        "srv    load_model: failed to load model, 'x.gguf'\n"
    )
    found = diagnose(log)
    assert [d.id for d in found] == ["unknown-arch"]
    assert "'nonsense-arch'" not in found[0].fix and "nonsense-arch" in found[0].cause


def test_warnings_come_after_errors_and_engine_filter_applies():
    log = "[kt-kernel] Selected CPU variant: avx2\nValueError: Method 'fp8' not supported for inference mode."
    found = diagnose(log)
    assert [d.id for d in found] == ["kt-method-unknown", "kt-cpu-variant-avx2"]
    assert found[1].severity == "warning"
    assert "fp8" in found[0].cause
    assert diagnose(log, engine="llamacpp") == []


def test_nothing_matched_gives_nothing():
    assert diagnose("all good\nserver is ready", returncode=0) == []
    assert diagnose("", returncode=None) == []


def test_catalog_markdown_lists_every_entry_with_generic_numbers():
    text = catalog_markdown()
    for p in catalog():
        assert f"### {p.title}" in text
    assert "{" not in text and "<gpu" not in text


def test_fixes_use_a_real_plan_numbers():
    from ktutorial.hardware import Hardware
    from ktutorial.plan import make_plan
    from ktutorial.spec import ModelSpec

    hw = Hardware.described(gpu="RTX 5090:32", gpus=1, ram_gb=192, cpu_cores=32,
                            cpu_flags=["avx2", "avx512f", "avx512bw", "avx512_vbmi", "avx512_bf16"])
    plan = make_plan(ModelSpec.known("minimax-m2.1"), hw)
    experts = plan.settings["kt-num-gpu-experts"].value
    [oom] = diagnose("torch.OutOfMemoryError: CUDA out of memory.", plan=plan)
    assert f"lower --kt-num-gpu-experts from {experts} to " in oom.fix
    assert f"of {plan.memory['gpu_capacity_gib']:.1f} GiB" in oom.fix
    assert f"--chunked-prefill-size from {plan.settings['chunked-prefill-size'].value}" in oom.fix
    [killed] = diagnose("Killed", plan=plan, returncode=-9)
    assert f"{plan.memory['ram_needed_gb']:.0f} GB of host RAM needed, 192 GB present" in killed.fix
