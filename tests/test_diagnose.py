"""The diagnosis catalog: every entry matches its own example, fixes carry the plan's numbers."""

from __future__ import annotations

from pathlib import Path
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
                   "port-in-use", "killed", "gguf-load", "unknown-arch", "kt-method-unknown", "sgl-kernel-torch-abi",
                   "sgl-kernel-pieces", "sgl-kernel-cache", "messages-system-role"):
        assert needed in ids


def test_cuda_oom_fix_names_setting_and_lower_value_from_command_and_plan():
    plan = SimpleNamespace(
        settings={"kt-num-gpu-experts": SimpleNamespace(value=40, reason="fits 32 GiB")},
        memory={"gpu": {"needed_gib": 31.2, "capacity_gib": 32.0}},
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
    plan = SimpleNamespace(settings={}, memory={"host": {"needed_gb": 241, "available_gb": 128}})
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
    assert f"of {plan.memory.gpu.capacity_gib:.1f} GiB" in oom.fix
    assert f"--chunked-prefill-size from {plan.settings['chunked-prefill-size'].value}" in oom.fix
    [killed] = diagnose("Killed", plan=plan, returncode=-9)
    assert f"{plan.memory.host.needed_gb:.0f} GB of host RAM needed, 192 GB present" in killed.fix


# ---- real log lines -------------------------------------------------------------------------------
# (log excerpt, the diagnoses expected, in order). Each excerpt is a line an engine really prints:
# seen on the GPU host (../shared/sglang-gpu-host/README.md, FACTS), or the exact message text in
# the wheel sources of sglang-kt 0.7.2 / kt-kernel 0.7.2 / pydantic, with the log prefix their
# logger adds. Add lines from new GPU runs here, verbatim.

SERVER_ARGS_KT_NO_GPU_EXPERTS = (
    # A contiguous slice of `server_args=ServerArgs(...)`, which sglang-kt 0.7.2 logs at start-up
    # (entrypoints/engine.py: logger.info(f"{server_args=}")), rendered by its own ServerArgs repr
    # for `--model-path M --kt-weight-path M --kt-method FP8 --kt-cpuinfer 14 --kt-threadpool-count 1`.
    "enable_lmcache=False, kt_weight_path='/models/MiniMax-M2.1', kt_method='FP8', kt_cpuinfer=14, "
    "kt_threadpool_count=1, kt_numa_nodes=None, kt_num_gpu_experts=None, kt_gpu_experts_ratio=None, "
    "kt_max_deferred_experts_per_token=None, kt_gpu_prefill_token_threshold=None, "
    "record_kt_gpu_expert_distribution=False, kt_enable_dynamic_expert_update=False, "
    "kt_expert_placement_strategy='uniform', "
)

SGL_KERNEL_CRITICAL = (
    # sgl_kernel/load_utils.py (kt-kernel 0.7.2's wheel): the ImportError when no common_ops loads.
    "ImportError: \n"
    "[sgl_kernel] CRITICAL: Could not load any common_ops library!\n"
    "\n"
    "Attempted locations:\n"
    "Error details from previous import attempts:\n"
)

REAL_LOG_LINES = [
    # GPU host, --kt-method fp8 (kt_kernel/experts.py's ValueError), ~36 s into start-up.
    ("ValueError: Method 'fp8' not supported for inference mode. Supported methods: ['AMXINT4', 'AMXINT8', "
     "'BF16', 'FP8', 'FP8_PERCHANNEL', 'GPTQ_INT4', 'LLAMAFILE', 'MOE_INT4', 'MOE_INT8', 'MXFP4', 'MXFP8', "
     "'NVFP4', 'RAWINT4', 'SYCL_GPTQ_INT4']", "kt-method-unknown"),
    # A hand-launched server with --kt-weight-path and no GPU-expert count: its echoed settings...
    ("[2026-12-04 10:00:00] server_args=ServerArgs(" + SERVER_ARGS_KT_NO_GPU_EXPERTS, "kt-not-applied"),
    # ... and sglang/srt/layers/moe/kt_ep_wrapper.py's warning (log format "[%(asctime)s] %(message)s").
    ("[2026-12-04 10:00:05] Either kt_num_gpu_experts or kt_gpu_experts_ratio is required but not set.",
     "kt-not-applied"),
    # /v1/messages with a role: system entry: sglang-kt 0.7.2's 400 body (its RequestValidationError
    # handler over its AnthropicMessagesRequest, fastapi 0.165, pydantic 2.14), the start of the JSON ...
    ('{"object":"error","message":"1 validation error:\\n  {\'type\': \'literal_error\', \'loc\': (\'body\', '
     '\'messages\', 1, \'role\'), \'msg\': \\"Input should be \'user\' or \'assistant\'\\", \'input\': \'system\', '
     '\'ctx\': {\'expected\': \\"\'user\' or \'assistant\'\\"}}', "messages-system-role"),
    # ... and pydantic's own ValidationError text for the same request.
    ("1 validation error for AnthropicMessagesRequest\nmessages.1.role\n  Input should be 'user' or 'assistant' "
     "[type=literal_error, input_value='system', input_type=str]", "messages-system-role"),
    # GPU host: sglang-kt's sgl_kernel (built for torch 2.9) under torch 2.11 (torch's c10 message).
    ("RuntimeError: Cannot access data pointer of Tensor that doesn't have storage", "sgl-kernel-torch-abi"),
    # The ktransformers wheel's sgl_kernel/sm90/common_ops.abi3.so loaded beside a CPU torch (seen here),
    # as load_utils.py lists it under the CRITICAL message ("- {type}: {error}").
    (SGL_KERNEL_CRITICAL + "- ImportError: libc10_cuda.so: cannot open shared object file: No such file or directory",
     "sgl-kernel-torch-abi"),
    # dlopen's undefined-symbol error for the same object beside torch 2.13: that symbol is one the sm90
    # build needs (nm -D --undefined-only) and torch 2.13's libc10 no longer defines.
    (SGL_KERNEL_CRITICAL + "- ImportError: /venv/lib/python3.11/site-packages/sgl_kernel/sm90/common_ops.abi3.so: "
     "undefined symbol: _ZN3c1013MessageLoggerC1EPKcii", "sgl-kernel-torch-abi"),
    # sgl_kernel/payload_runtime.py: a wheel that carries a piece is not installed ...
    ("FileNotFoundError: Missing KT CUDA payload package: ktransformers_sgl_kernel_payload", "sgl-kernel-pieces"),
    # ... which load_utils.py swallows; then only the CRITICAL message says it (H200: no sm90 folder) ...
    (SGL_KERNEL_CRITICAL + "- ModuleNotFoundError: No module named 'common_ops'", "sgl-kernel-pieces"),
    # ... and sgl_kernel/flash_attn.py, for the FA3 object that lives only in the pieces.
    ("ImportError: Can not import FA3 in sgl_kernel. Please check your installation.", "sgl-kernel-pieces"),
    # payload_runtime.py: pieces from different releases.
    ("RuntimeError: sgl-kernel-kt CUDA payload archive checksum mismatch", "sgl-kernel-pieces"),
    # payload_runtime.py: no cache place with 4 GB free ("{root}: insufficient free space").
    ("OSError: No writable sgl-kernel-kt payload cache: /venv/lib/python3.11/site-packages/sgl_kernel/"
     "_payload_cache/sgl-kernel-kt/0.3.21.post2/8f0b5d761342374e: insufficient free space", "sgl-kernel-cache"),
    # load_utils.py beside no NVIDIA driver (the sm100 object needs libcuda.so.1).
    (SGL_KERNEL_CRITICAL + "- ImportError: libcuda.so.1: cannot open shared object file: No such file or directory",
     "no-gpu"),
]  # fmt: skip

NOT_A_FAILURE = [
    # sglang-kt prints this whenever --kt-weight-path is set, KT applied or not.
    "[2026-12-04 10:00:00] KTransformers EP is enabled. --disable-shared-experts-fusion is automatically set "
    "to prevent shared experts from being offloaded to CPU.",
    # The same echoed settings with a GPU-expert count: KT is applied.
    "[2026-12-04 10:00:00] server_args=ServerArgs("
    + SERVER_ARGS_KT_NO_GPU_EXPERTS.replace("kt_num_gpu_experts=None", "kt_num_gpu_experts=4"),
    # kt_ep_wrapper.py when the count is given.
    "[2026-12-04 10:00:05] Using kt_num_gpu_experts=4 per layer, total GPU experts: 248 (= 4 × 62 MoE layers)",
]


@pytest.mark.parametrize("excerpt, expected", REAL_LOG_LINES, ids=[f"{i}-{e}" for i, (_, e) in enumerate(REAL_LOG_LINES)])
def test_real_log_lines_get_their_diagnosis(excerpt, expected):
    expected = [expected] if isinstance(expected, str) else list(expected)
    found = diagnose(f"some line before\n{excerpt}\nsome line after", engine="sglang-kt")
    assert [d.id for d in found] == expected
    assert all(d.cause and d.fix and "<" not in d.fix for d in found)


@pytest.mark.parametrize("line", NOT_A_FAILURE)
def test_lines_of_a_working_server_get_none(line):
    assert diagnose(line, engine="sglang-kt") == []


def test_new_entries_fixes_name_the_pinned_install_and_the_proxy():
    from ktutorial.diagnose import GPU_INSTALL

    assert GPU_INSTALL == 'pip install "ktransformers[sglang]==0.7.2"'
    [pieces] = diagnose("FileNotFoundError: Missing KT CUDA payload package: ktransformers_sgl_kernel_payload")
    assert "ktransformers_sgl_kernel_payload is missing" in pieces.cause and GPU_INSTALL in pieces.fix
    [abi] = diagnose("RuntimeError: Cannot access data pointer of Tensor that doesn't have storage")
    assert GPU_INSTALL in abi.fix and "torch 2.9" in abi.cause
    [role] = diagnose("  Input should be 'user' or 'assistant' [type=literal_error, input_value='system', input_type=str]")
    assert "ccproxy" in role.fix and "ktutorial claude-code" in role.fix
    [method] = diagnose(REAL_LOG_LINES[0][0])
    assert "'fp8'" in method.cause and "--kt-method FP8" in method.fix
    [not_applied] = diagnose(REAL_LOG_LINES[1][0])
    assert "--kt-num-gpu-experts" in not_applied.fix and "KTransformers EP is enabled" in not_applied.cause
    [module] = diagnose("ModuleNotFoundError: No module named 'sglang'")
    assert GPU_INSTALL in module.fix


# Whole logs the real engine wrote on the GPU host (sglang-kt 0.7.2 + kt-kernel 0.7.2, H200,
# 2026-12-04, results/gpu-host.sh's serve and failures steps); paths replaced by placeholders.
REAL_LOGS = Path(__file__).parent / "data" / "sglang-kt-logs"


@pytest.mark.parametrize("name, returncode, expected", [
    ("served-tiny-4-gpu-experts.log", None, []),  # a good start: its FA3 import notices are not a fault
    ("kt-method-lowercase-fp8.log", -9, ["kt-method-unknown"]),  # SGLang SIGKILLs its tree after the error
    ("no-kt-num-gpu-experts.log", None, ["kt-not-applied"]),  # it serves, with every expert on the GPU
])
def test_whole_real_engine_logs(name, returncode, expected):
    text = (REAL_LOGS / name).read_text()
    found = diagnose(text, returncode=returncode, engine="sglang-kt")
    assert [d.id for d in found] == expected
    if expected == ["kt-method-unknown"]:
        assert "--kt-method FP8" in found[0].fix and "Method 'fp8' not supported" in found[0].evidence
