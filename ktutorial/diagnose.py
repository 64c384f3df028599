"""From a failed launch's log to a cause and a fix, with the plan's own numbers.

The catalog is data: each entry names the engine, the log pattern (a regex), an exit code or a
command-line check, the cause in one sentence, and a fix template filled from the plan and the
command ("lower --kt-num-gpu-experts from 40 to 37"). `server.py` shows the matches when a
server dies; the docs' troubleshooting page is rendered from the same catalog (`catalog()`,
`catalog_markdown()`), and every entry's example line is tested against its own regex.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ktutorial.spec import ModelSpec

GB = 10**9
GIB = 2**30
# The GPU environment's install line (README "Install profiles"): ktransformers[sglang]==0.7.2 pins
# sglang-kt, kt-kernel, transformers-kt, accelerate-kt and torch 2.9.1, the five wheels that carry
# the pieces of sglang-kt's sgl_kernel and the torch it was built for.
GPU_INSTALL = 'pip install "ktransformers[sglang]==0.7.2"'


@dataclass(frozen=True)
class Pattern:
    id: str
    engines: tuple[str, ...]  # "sglang-kt", "kt-kernel", "llamacpp"
    title: str
    cause: str
    fix: str  # a template: {names} come from `numbers()`; unknown ones read as generic words
    regex: Optional[str] = None  # searched in the log, case-insensitive, line by line
    example: str = ""  # a log line the regex matches (tested; shown in the docs)
    returncodes: tuple[int, ...] = ()  # also matches on these exit codes
    command_check: Optional[Callable[[list[str]], bool]] = None  # also matches on the command line
    severity: str = "error"  # "error" stops the server; "warning" only slows it
    shadowed_by: tuple[str, ...] = ()  # skip when one of these (more specific) ids also matched


@dataclass
class Diagnosis:
    id: str
    title: str
    cause: str
    fix: str
    evidence: str = ""  # the log line (or exit code) that matched
    severity: str = "error"

    def __str__(self) -> str:
        seen = f" [log: {self.evidence.strip()[:160]}]" if self.evidence else ""
        return f"{self.title}: {self.cause} Fix: {self.fix}{seen}"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("id", "title", "cause", "fix", "evidence", "severity")}


# ---- numbers for the fix templates ---------------------------------------------------------------


def _flag(command: list[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(command or []):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _get(obj: Any, *names: str) -> Any:
    """The first of `names` found on obj (attribute or key); None if none is."""
    if obj is None:
        return None
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _setting(plan: Any, flag: str) -> Any:
    settings = _get(plan, "settings")
    if not settings:
        return None
    for key in (flag, flag.lstrip("-"), flag.lstrip("-").replace("-", "_")):
        if key in settings:
            value = settings[key]
            return _get(value, "value") if not isinstance(value, (int, float, str, bool)) else value
    return None


def _num(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class _Numbers(dict):
    """Template values; a missing one reads as a generic phrase instead of failing."""

    GENERIC = {
        "gpu_experts": "its current value",
        "gpu_experts_lower": "a few fewer",
        "chunked_prefill": "its current value",
        "chunked_prefill_half": "half",
        "mem_fraction": "its current value",
        "mem_fraction_lower": "0.05 less",
        "mem_fraction_higher": "0.03 more (at most 0.95)",
        "max_total_tokens": "its current value",
        "max_total_tokens_half": "half",
        "model_path": "the model folder",
        "weight_path": "the path given",
        "port": "the port",
        "gpu_estimate": "",
        "ram_estimate": "",
        "arch": "the model's architecture",
        "module": "the missing module",
        "method": "the value given",
        "payload": "one of them",
    }

    def __missing__(self, key: str) -> str:
        return self.GENERIC.get(key, f"<{key}>")


def numbers(plan: Any = None, command: Optional[list[str]] = None, match: Optional[re.Match] = None) -> _Numbers:
    """Values for the fix templates, from the command line first, then the plan."""
    command = command or []
    out = _Numbers()
    spec = _get(plan, "spec")
    if spec is None:
        try:
            spec = ModelSpec.known("minimax-m2.1")
        except Exception:
            spec = None
    tp_value = _flag(command, "--tensor-parallel-size") or _flag(command, "--tp-size")
    tp = int(_num(tp_value or _setting(plan, "--tensor-parallel-size")) or 1)
    memory = _get(plan, "memory")
    slot_gib = _num(_get(_get(memory, "gpu"), "gib_per_gpu_expert"))
    if spec is not None:
        # One more GPU expert means one more expert in every layer, split over the TP GPUs.
        slot_gib = slot_gib or spec.expert_bytes * spec.num_layers / tp / GIB
        out["num_layers"] = spec.num_layers
        out["all_experts_gb"] = f"{spec.all_expert_bytes / GB:.0f}"
    if slot_gib:
        out["expert_slot_gib"] = f"{slot_gib:.2f}"

    experts = _num(_flag(command, "--kt-num-gpu-experts") or _setting(plan, "--kt-num-gpu-experts"))
    if experts is not None:
        out["gpu_experts"] = int(experts)
        # Free about 2 GiB: the usual overshoot of activations and CUDA-graph buffers.
        step = max(1, math.ceil(2 / slot_gib)) if slot_gib else max(1, int(experts) // 8)
        out["gpu_experts_lower"] = max(0, int(experts) - step)
    chunk = _num(_flag(command, "--chunked-prefill-size") or _setting(plan, "--chunked-prefill-size"))
    if chunk:
        out["chunked_prefill"] = int(chunk)
        out["chunked_prefill_half"] = max(512, int(chunk) // 2)
    frac = _num(_flag(command, "--mem-fraction-static") or _setting(plan, "--mem-fraction-static"))
    if frac:
        out["mem_fraction"] = f"{frac:.2f}"
        out["mem_fraction_lower"] = f"{max(0.5, frac - 0.05):.2f}"
        out["mem_fraction_higher"] = f"{min(0.95, frac + 0.03):.2f}"
    total = _num(_flag(command, "--max-total-tokens") or _setting(plan, "--max-total-tokens"))
    if total:
        out["max_total_tokens"] = int(total)
        out["max_total_tokens_half"] = int(total) // 2
    model_path = _flag(command, "--model-path") or _flag(command, "--model") or _setting(plan, "--model-path")
    if model_path:
        out["model_path"] = model_path
    weight_path = _flag(command, "--kt-weight-path") or _setting(plan, "--kt-weight-path")
    if weight_path:
        out["weight_path"] = weight_path
    port = _flag(command, "--port")
    if port:
        out["port"] = port

    # GPU memory in GiB (as cards are sold), host RAM in GB.
    gpu_need = _num(_get(_get(memory, "gpu"), "needed_gib"))
    gpu_have = _num(_get(_get(memory, "gpu"), "capacity_gib"))
    if gpu_need is not None and gpu_have:
        out["gpu_estimate"] = f" The plan estimated {gpu_need:.1f} of {gpu_have:.1f} GiB of GPU memory per GPU."
    ram_need = _num(_get(_get(memory, "host"), "needed_gb"))
    ram_have = _num(_get(_get(memory, "host"), "available_gb"))
    if ram_need is not None and ram_have:
        out["ram_estimate"] = f" The plan estimated {ram_need:.0f} GB of host RAM needed, {ram_have:.0f} GB present."
    elif ram_need is not None:
        out["ram_estimate"] = f" The plan estimated {ram_need:.0f} GB of host RAM needed."

    if match is not None:
        out.update({k: v for k, v in match.groupdict().items() if v})
    return out


# ---- command-line checks ------------------------------------------------------------------------


def _kt_not_applied(command: list[str]) -> bool:
    if not command or not any(a.startswith("--kt-") for a in command):
        return False
    return _flag(command, "--kt-num-gpu-experts") is None and _flag(command, "--kt-gpu-experts-ratio") is None


# ---- the catalog --------------------------------------------------------------------------------

_CATALOG: tuple[Pattern, ...] = (
    Pattern(
        id="kt-not-applied",
        engines=("sglang-kt",),
        title="KT not applied",
        cause=(
            "the server has --kt-* settings but neither --kt-num-gpu-experts nor --kt-gpu-experts-ratio; "
            "sglang-kt then silently skips KT (its log still says \"KTransformers EP is enabled\") and runs "
            "every expert on the GPU through SGLang's fused MoE: for MiniMax-M2.1 that is {all_experts_gb} GB."
        ),
        fix="add --kt-num-gpu-experts (the plan's value: `ktutorial plan` prints it), then start again.",
        # sglang-kt echoes its settings (`server_args=ServerArgs(...)`) at start-up, and its KT wrapper
        # warns when it finds no GPU-expert count.
        regex=(
            r"kt_weight_path='[^']+'.*\bkt_num_gpu_experts=None, kt_gpu_experts_ratio=None\b|"
            r"Either kt_num_gpu_experts or kt_gpu_experts_ratio is required but not set"
        ),
        example="[2026-12-04 10:00:00] Either kt_num_gpu_experts or kt_gpu_experts_ratio is required but not set.",
        command_check=_kt_not_applied,
    ),
    Pattern(
        id="cuda-oom",
        engines=("sglang-kt",),
        title="CUDA out of memory",
        cause=(
            "the GPU ran out of memory: the weights on it (attention, embeddings, GPU experts) plus KV cache "
            "and activations did not fit."
        ),
        fix=(
            "lower --kt-num-gpu-experts from {gpu_experts} to {gpu_experts_lower} (each GPU expert costs "
            "{expert_slot_gib} GiB over all {num_layers} layers); if it failed later, in CUDA-graph capture or a "
            "long prefill, lower --chunked-prefill-size from {chunked_prefill} to {chunked_prefill_half} or "
            "--mem-fraction-static from {mem_fraction} to {mem_fraction_lower}.{gpu_estimate}"
        ),
        regex=r"CUDA out of memory|torch\.OutOfMemoryError|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED",
        example="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity "
        "of 31.36 GiB",
        shadowed_by=("kt-not-applied",),
    ),
    Pattern(
        id="kv-cache-no-room",
        engines=("sglang-kt",),
        title="No GPU memory left for the KV cache",
        cause="after the weights and GPU experts were placed, SGLang's static pool had no room for a KV cache.",
        fix=(
            "lower --kt-num-gpu-experts from {gpu_experts} to {gpu_experts_lower} (frees {expert_slot_gib} GiB "
            "each), or raise --mem-fraction-static from {mem_fraction} to {mem_fraction_higher}, or lower "
            "--max-total-tokens from {max_total_tokens} to {max_total_tokens_half}.{gpu_estimate}"
        ),
        # tp_worker.py asserts the pool holds more than a request's few reserved tokens.
        regex=r"Not enough memory\. Please try to increase --mem-fraction-static|Memory pool size is too small",
        example="RuntimeError: Not enough memory. Please try to increase --mem-fraction-static.",
    ),
    Pattern(
        id="kt-weight-path",
        engines=("kt-kernel", "sglang-kt"),
        title="KT cannot read the expert weights",
        cause="--kt-weight-path ({weight_path}) is missing, empty, or not the FP8 safetensors folder with the experts.",
        fix=(
            "for FP8 MiniMax-M2.1 pass the model folder itself, the one with the *.safetensors shards and "
            "model.safetensors.index.json (--model-path: {model_path}); check it with `ktutorial verify`."
        ),
        regex=(
            r"Path not found: |No Safetensor files found in|No experts found for (layer|key)|"
            r"Key \S+ not found in Safetensor files|kt[-_]weight[-_]path.*(not exist|not found|required)"
        ),
        example="FileNotFoundError: No Safetensor files found in /models/MiniMax-M2.1-missing",
    ),
    Pattern(
        id="kt-method-unknown",
        engines=("kt-kernel", "sglang-kt"),
        title="Unknown --kt-method",
        cause=(
            "kt-kernel does not know the --kt-method given ('{method}'): its method names are upper case, and "
            "sglang-kt's parser accepts any string, so it fails only when the model loads."
        ),
        fix="use --kt-method FP8 (upper case) for MiniMax-M2.1's FP8 checkpoint.",
        regex=r"Method '(?P<method>[^']*)' not supported for inference mode",
        example="ValueError: Method 'fp8' not supported for inference mode. Supported methods: ['AMXINT4', 'AMXINT8', "
        "'BF16', 'FP8', 'FP8_PERCHANNEL', 'GPTQ_INT4', 'LLAMAFILE', 'MOE_INT4', 'MOE_INT8', 'MXFP4', 'MXFP8', 'NVFP4', "
        "'RAWINT4', 'SYCL_GPTQ_INT4']",
    ),
    Pattern(
        id="fp8-triton-old-gpu",
        engines=("sglang-kt",),
        title="FP8 kernels need a newer GPU",
        cause=(
            "Triton's FP8 (e4m3) type needs compute capability 8.9 or newer (RTX 40xx/50xx, L40S, H100); "
            "this card is older."
        ),
        fix=(
            "use a GPU with compute capability 8.9 or newer for the FP8 checkpoint, or drop "
            "--fp8-gemm-backend triton so SGLang can pick another FP8 path for this card."
        ),
        regex=r"fp8e4nv not supported|type fp8e4nv|fp8 .*(requires|needs) .*(sm_?89|8\.9)",
        example="AssertionError: type fp8e4nv not supported in this architecture. The supported fp8 dtypes are "
        "('fp8e4b15', 'fp8e5')",
    ),
    Pattern(
        id="kt-cpu-variant-avx2",
        engines=("kt-kernel",),
        title="kt-kernel runs its AVX2 build",
        cause=(
            "this CPU has no AVX512/AMX (or those builds failed to load): the CPU experts run several times "
            "slower than in the published results."
        ),
        fix=(
            "use a CPU with AVX512 (BF16 + VBMI best) or AMX; if it has them, look for '[kt-kernel] Failed to "
            "load' lines above and unset KT_KERNEL_CPU_VARIANT."
        ),
        regex=r"\[kt-kernel\] (Selected CPU variant: avx2\b|Successfully loaded AVX2 variant|.*using AVX2 fallback)",
        example="[kt-kernel] Selected CPU variant: avx2",
        severity="warning",
    ),
    Pattern(
        id="sgl-kernel-torch-abi",
        engines=("sglang-kt",),
        title="sgl_kernel built for another torch",
        cause=(
            "the CUDA objects of sgl_kernel link libtorch: sglang-kt 0.7.2's are built for torch 2.9 with CUDA, and "
            "this environment has another torch (or a CPU build). They then fail to import (undefined symbol, "
            "no libc10_cuda.so), or load and fail at random because their calls land on the wrong methods."
        ),
        fix=(
            "install the sgl_kernel build for your torch: in a fresh environment `" + GPU_INSTALL + "` gives "
            "torch 2.9.1 (CUDA) and the sgl_kernel built for it; `ktutorial doctor` checks the pair."
        ),
        regex=(
            r"Cannot access data pointer of Tensor that doesn't have storage|"
            r"(sgl_kernel/|common_ops)\S*: undefined symbol|lib(c10_cuda|torch_cuda)\.so: cannot open shared object"
        ),
        example="RuntimeError: Cannot access data pointer of Tensor that doesn't have storage",
    ),
    Pattern(
        id="sgl-kernel-pieces",
        engines=("sglang-kt",),
        title="sgl_kernel's pieces are missing",
        cause=(
            "the sgl_kernel of sglang-kt is reassembled at first import from pieces inside five wheels (kt-kernel, "
            "transformers-kt, sglang-kt, ktransformers, accelerate-kt; the Hopper build is in ktransformers), all "
            "from one release: {payload} is missing or from another release."
        ),
        fix=(
            "install all five, pinned: `" + GPU_INSTALL + "` (`pip install sglang-kt kt-kernel` leaves out "
            "ktransformers); `ktutorial doctor` names the missing ones. If they are all there, delete the "
            "payload cache (sgl_kernel/_payload_cache, ~/.cache/sgl-kernel-kt) and import again."
        ),
        regex=(
            r"Missing KT CUDA payload package: (?P<payload>\w+)|sgl-kernel-kt CUDA payload wheels are not installed|"
            r"sgl-kernel-kt CUDA payload archive checksum mismatch|in sgl-kernel-kt CUDA payload|"
            r"sgl-kernel-kt CUDA payload verification failed|"
            r"\[sgl_kernel\] CRITICAL: Could not load any common_ops library|"
            # A working server logs this once per vision model it skips ("Ignore import error when
            # loading sglang.srt.models.clip: Can not import FA3 ..."): only an unignored one counts.
            r"^(?!.*Ignore import error).*Can not import FA3 in sgl_kernel"
        ),
        example="FileNotFoundError: Missing KT CUDA payload package: ktransformers_sgl_kernel_payload",
        shadowed_by=("sgl-kernel-torch-abi", "no-gpu"),
    ),
    Pattern(
        id="sgl-kernel-cache",
        engines=("sglang-kt",),
        title="No room to reassemble sgl_kernel",
        cause=(
            "the first `import sgl_kernel` reassembles its CUDA objects into a cache that needs 4 GB free; "
            "none of its places (beside sgl_kernel, ~/.cache, the temp folder) was writable with that much room."
        ),
        fix="free 4 GB in one of them, or point SGL_KERNEL_KT_CACHE_DIR at a writable folder with 4 GB free.",
        regex=r"No writable sgl-kernel-kt payload cache",
        example="OSError: No writable sgl-kernel-kt payload cache: ~/.cache/sgl-kernel-kt/0.3.21.post2/"
        "8f0b5d761342374e: insufficient free space",
    ),
    Pattern(
        id="messages-system-role",
        engines=("sglang-kt",),
        title="/v1/messages refuses role: system",
        cause=(
            "sglang-kt's Anthropic Messages API accepts only 'user' and 'assistant' in messages[].role and answers "
            "HTTP 400; Claude Code puts a `role: system` entry inside messages, so it fails straight against it."
        ),
        fix=(
            "run Claude Code through ktutorial's Claude Code proxy (ktutorial/ccproxy.py), which `ktutorial "
            "claude-code` settings point it at for sglang-kt; other clients: send system text in the top-level "
            "`system` field."
        ),
        regex=r"Input should be 'user' or 'assistant'",
        example="  Input should be 'user' or 'assistant' [type=literal_error, input_value='system', input_type=str]",
    ),
    Pattern(
        id="port-in-use",
        engines=("sglang-kt", "llamacpp"),
        title="Port in use",
        cause="another process already listens on port {port}.",
        fix=(
            "see `ktutorial status` and stop a leftover server with `ktutorial stop`, or leave --port out "
            "to get a free one."
        ),
        regex=r"address already in use|couldn't bind HTTP server socket|\[Errno 98\]",
        example="srv  start: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8080",
    ),
    Pattern(
        id="killed",
        engines=("sglang-kt", "llamacpp"),
        title="Process killed (host memory)",
        cause=(
            "the server was killed (SIGKILL), most often by the kernel's OOM killer when host RAM runs out: "
            "all {all_experts_gb} GB of experts stay in RAM, whatever lives on the GPU."
        ),
        fix=(
            "check `dmesg | grep -i oom` (or journalctl -k); close other large processes, and use a machine "
            "with at least 256 GB of RAM for MiniMax-M2.1.{ram_estimate}"
        ),
        regex=r"^Killed\s*$|Out of memory: Killed process|oom-kill",
        example="Killed",
        returncodes=(-9, 137),
    ),
    Pattern(
        id="unknown-arch",
        engines=("llamacpp",),
        title="Unknown model architecture",
        cause="this llama.cpp build does not know the architecture {arch}.",
        fix=(
            "update it (`pip install -U xllamacpp`, or rebuild llama-server); MiniMax-M2 needs a build from "
            "late 2025 or newer."
        ),
        regex=r"unknown model architecture: '(?P<arch>[^']*)'",
        example="llama_model_load: error loading model: unknown model architecture: 'nonsense-arch'",
    ),
    Pattern(
        id="gguf-load",
        engines=("llamacpp",),
        title="GGUF failed to load",
        cause="llama.cpp could not load the GGUF at {model_path}: not a GGUF, truncated, or missing required keys.",
        fix=(
            "check the path and the file size; download or convert it again (for the tiny profile delete "
            "the folder under ktutorial's models directory and it is generated afresh)."
        ),
        regex=(
            r"invalid magic characters|failed to read magic|error loading model|failed to load model|"
            r"GGML_ASSERT|key not found in model"
        ),
        example="gguf_init_from_reader: invalid magic characters: 'impo', expected 'GGUF'",
        shadowed_by=("unknown-arch",),
    ),
    Pattern(
        id="missing-module",
        engines=("sglang-kt", "kt-kernel", "llamacpp"),
        title="Engine not installed",
        cause="Python could not import {module} in the environment the server runs in.",
        fix=(
            "install it there: sglang-kt on the GPU machine (`" + GPU_INSTALL + "`, which brings kt-kernel and "
            "the rest, pinned), kt-kernel alone (`pip install --no-deps kt-kernel==0.7.2`), xllamacpp "
            "(`pip install xllamacpp`)."
        ),
        regex=r"No module named '?(?P<module>sglang|kt_kernel|xllamacpp)(?![A-Za-z0-9_])",
        example="ModuleNotFoundError: No module named 'sglang'",
    ),
    Pattern(
        id="no-gpu",
        engines=("sglang-kt",),
        title="No usable NVIDIA GPU",
        cause="no NVIDIA GPU or driver was found (or torch is a CPU build).",
        fix=(
            "SGLang + KT needs an NVIDIA GPU with its driver and a CUDA torch; on a machine without one run "
            "the tiny profile (`ktutorial serve --profile tiny`), or `--dry-run` to print the command."
        ),
        regex=(
            r"Found no NVIDIA driver|no CUDA GPUs are available|Torch not compiled with CUDA enabled|"
            r"CUDA driver version is insufficient|libcuda\.so\.1: cannot open shared object file"
        ),
        example="RuntimeError: Found no NVIDIA driver on your system.",
    ),
)


def catalog() -> list[Pattern]:
    """Every known failure pattern, in the order they are tried."""
    return list(_CATALOG)


def diagnose(
    log_text: str,
    plan: Any = None,
    returncode: Optional[int] = None,
    command: Optional[list[str]] = None,
    engine: Optional[str] = None,
) -> list[Diagnosis]:
    """The catalog entries that match a log (and exit code, and command line), fixes filled in."""
    found: dict[str, Diagnosis] = {}
    lines = (log_text or "").splitlines()
    for pattern in _CATALOG:
        if engine and engine not in pattern.engines and not (engine == "sglang-kt" and "kt-kernel" in pattern.engines):
            continue
        evidence, match = None, None
        if pattern.regex:
            rx = re.compile(pattern.regex, re.IGNORECASE)
            for line in lines:
                match = rx.search(line)
                if match:
                    evidence = line
                    break
        if evidence is None and returncode is not None and returncode in pattern.returncodes:
            evidence = f"exit code {returncode}"
        if evidence is None and pattern.command_check and command and pattern.command_check(command):
            evidence = "command line"
        if evidence is None:
            continue
        values = numbers(plan, command, match)
        found[pattern.id] = Diagnosis(
            id=pattern.id,
            title=pattern.title,
            cause=pattern.cause.format_map(values),
            fix=pattern.fix.format_map(values),
            evidence=evidence,
            severity=pattern.severity,
        )
    for pattern in _CATALOG:
        if pattern.id in found and any(s in found for s in pattern.shadowed_by):
            del found[pattern.id]
    # A log line that explains the failure explains its exit code too: SGLang ends its own process
    # tree with SIGKILL after a fatal error, which alone would read as the OOM killer.
    if any(not d.evidence.startswith("exit code") for d in found.values() if d.severity == "error"):
        found = {k: d for k, d in found.items() if not d.evidence.startswith("exit code")}
    # Errors first: they explain the exit; warnings explain slowness.
    return sorted(found.values(), key=lambda d: d.severity != "error")


def catalog_markdown() -> str:
    """The troubleshooting page body: one section per catalog entry (generic numbers)."""
    out = []
    for p in _CATALOG:
        values = numbers()
        out.append(f"### {p.title}\n")
        warning = " (a warning: it slows the server, it does not stop it)" if p.severity == "warning" else ""
        out.append(f"*Engines:* {', '.join(p.engines)}. *Id:* `{p.id}`{warning}\n")
        if p.example:
            out.append(f"```text\n{p.example}\n```\n")
        elif p.returncodes:
            out.append("*Found from:* exit code " + " / ".join(map(str, p.returncodes)) + "\n")
        elif p.command_check:
            out.append("*Found from:* the command line\n")
        cause, fix = p.cause.format_map(values), p.fix.format_map(values).strip()
        out.append(f"**Cause.** {cause[:1].upper() + cause[1:]}\n")
        out.append(f"**Fix.** {fix[:1].upper() + fix[1:]}\n")
    return "\n".join(out)
