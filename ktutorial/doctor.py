"""This machine against what the tutorial needs: `ktutorial doctor` and `ktutorial plan`'s inputs.

`doctor()` checks the real run's needs (NVIDIA GPU and driver, AVX512, RAM, disk, kt-kernel,
sglang-kt, xllamacpp, Claude Code, Node) and whether the tiny profile runs here, each missing
thing with its fix. `plan_for(...)` turns the CLI's options into spec + hardware + goals and
calls the pure planner.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ktutorial import hardware as hw_mod
from ktutorial.diagnose import diagnose
from ktutorial.errors import UserError
from ktutorial.plan import Goals, Plan, PlanError, make_plan
from ktutorial.spec import ModelSpec, SpecError, known_model, known_models

SGLANG_KT_VERSION = "0.7.2"
KT_KERNEL_VERSION = "0.7.2"
NODE_MIN_MAJOR = 18  # Claude Code's npm package needs Node 18+ (2.1.332 asks for 22 but runs on 20)

# The GPU environment. sglang-kt 0.7.2 reassembles its `sgl_kernel` at first import from pieces
# inside five wheels, checked against one checksum: all five must come from one release. These are
# the exact pins of `ktransformers[sglang]==0.7.2` (its Requires-Dist: kt-kernel==0.7.2 and, for
# the extra, sglang-kt==0.7.2; sglang-kt's: transformers-kt==5.6.0.post6, accelerate-kt==1.14.0.post4,
# torch==2.9.1). `pip install sglang-kt kt-kernel` leaves out ktransformers, whose wheel holds a
# piece and the Hopper build: `import sgl_kernel` then fails on every GPU.
GPU_INSTALL = 'pip install "ktransformers[sglang]==0.7.2"'
GPU_STACK = {"ktransformers": "0.7.2", "sglang-kt": SGLANG_KT_VERSION, "kt-kernel": KT_KERNEL_VERSION,
             "transformers-kt": "5.6.0.post6", "accelerate-kt": "1.14.0.post4"}
TORCH_FOR_SGL_KERNEL = "2.9.1"  # sglang-kt 0.7.2's and kt-kernel 0.7.2's torch pin; sgl_kernel links it
# kt-kernel 0.7.2's sgl_kernel/_payload_manifest.py PAYLOAD_MODULES, in order (used when the
# installed manifest cannot be read), and the distribution that carries each piece.
PAYLOAD_MODULES = ("sgl_kernel_kt_payload_core", "transformers_kt_sgl_kernel_payload",
                   "sglang_kt_sgl_kernel_payload", "ktransformers_sgl_kernel_payload",
                   "accelerate_kt_sgl_kernel_payload")
PAYLOAD_DISTS = {"sgl_kernel_kt_payload_core": "kt-kernel"}
# Distributions that also install a package named sgl_kernel (upstream's builds).
OTHER_SGL_KERNELS = ("sgl-kernel", "sglang-kernel")
# kt-kernel's CPU builds that run FP8 fast; the others run it too, several times slower.
FAST_FP8_VARIANTS = ("amx", "avx512_bf16")
SGL_KERNEL_IMPORT_TIMEOUT_S = 300  # the first import reassembles about 1.3 GB of CUDA objects


@dataclass
class Check:
    item: str
    status: str  # "ok", "missing", "warn"
    found: str
    need: str
    fix: str = ""
    for_real_run: bool = True  # False: only the tiny profile's needs
    for_tiny: bool = False


@dataclass
class DoctorReport:
    checks: list[Check]
    hardware: dict[str, Any]
    real_run_ready: bool
    tiny_ready: bool
    summary: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"real_run_ready": self.real_run_ready, "tiny_ready": self.tiny_ready,
                "summary": self.summary, "checks": [asdict(c) for c in self.checks],
                "hardware": self.hardware}


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _kt_kernel_import(timeout_s: float = 180) -> tuple[Optional[str], Optional[str], str]:
    """(version, loaded CPU variant, error): a real import, in a child process (it loads torch and
    a compiled extension; a crash must not take the CLI with it)."""
    if importlib.util.find_spec("kt_kernel") is None:
        return None, None, "not installed"
    code = "import kt_kernel, json; print(json.dumps([kt_kernel.__version__, kt_kernel.__cpu_variant__]))"
    env = dict(os.environ, KT_FORCE_SYNC_SUBMIT="1")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return None, None, f"import took over {timeout_s:.0f} s"
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return None, None, lines[-1] if lines else f"exit {out.returncode}"
    import json

    version, variant = json.loads(out.stdout.strip().splitlines()[-1])
    return version, variant, ""


def claude_path(root: Optional[Path] = None) -> Optional[str]:
    """`claude` on PATH, else the project-local install (`make tools`)."""
    found = shutil.which("claude")
    if found:
        return found
    roots = [root] if root else [Path.cwd(), Path(__file__).resolve().parents[1]]
    for base in roots:
        local = base / ".tools" / "node_modules" / ".bin" / "claude"
        if local.exists():
            return str(local)
    return None


def _node_version() -> Optional[str]:
    node = shutil.which("node")
    if not node:
        return None
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def doctor(disk_path: str | os.PathLike = ".", model: str = "minimax-m2.1",
           context_tokens: Optional[int] = None, hardware: Optional[hw_mod.Hardware] = None) -> DoctorReport:
    """This machine against MiniMax-M2.1's tutorial needs, and the tiny profile's."""
    machine = hardware or hw_mod.detect(disk_path=disk_path)
    spec = ModelSpec.known(model)
    if context_tokens is None:
        from ktutorial.profiles import load_profile

        context_tokens = load_profile("minimax-m2.1").context_tokens
    plan = make_plan(spec, machine, Goals(context_tokens=context_tokens))
    mem = plan.memory
    checks: list[Check] = []

    # --- hardware ------------------------------------------------------------------------------
    if machine.gpus:
        g = machine.gpus[0]
        found = f"{machine.gpu_count} x {g.name} ({machine.gpu_memory_gib:g} GiB), driver {g.driver or 'unknown'}"
        vram_ok = not any(r.startswith("VRAM") for r in plan.reasons) or plan.fits
        checks.append(Check("NVIDIA GPU and driver", "ok" if vram_ok else "missing", found,
                            f"{mem['gpu_needed_gib']:.1f} GiB per GPU for a {context_tokens:,}-token context",
                            "" if vram_ok else "see `ktutorial plan` for the settings that fit; a 32 GB card "
                                               "(RTX 5090) or two"))
        if g.sm is not None and g.sm < 89:
            checks.append(Check("FP8-capable GPU (sm89+)", "warn", f"{g.name} is sm{g.sm}", "sm89 or newer",
                                "the published runs used RTX 4090 / 5090; older cards run FP8 through slower kernels"))
    else:
        checks.append(Check("NVIDIA GPU and driver", "missing", "none (nvidia-smi absent, torch sees no CUDA)",
                            "an NVIDIA GPU with 32 GB (RTX 5090) and its driver",
                            "a GPU machine with the NVIDIA driver installed (`nvidia-smi` must list the card); "
                            "this machine can still run the tiny profile"))
    variant = machine.cpu_variant
    if machine.has_avx512:
        checks.append(Check("AVX512 CPU", "ok", f"{machine.cpu_model}: kt-kernel build {variant}",
                            "AVX512 (BF16 + VBMI best)"))
    else:
        checks.append(Check("AVX512 CPU", "missing", f"{machine.cpu_model}: no AVX512, kt-kernel build {variant}",
                            "AVX512 (Intel Sapphire Rapids or newer, AMD Zen 4 or newer)",
                            "run the real model on an AVX512 server; here kt-kernel's AVX2 build serves the tiny model"))
    ram_need = mem["ram_needed_gb"]
    checks.append(Check("RAM", "ok" if machine.ram_gb >= ram_need else "missing", f"{machine.ram_gb:.0f} GB",
                        f"{ram_need:.0f} GB (all {spec.num_experts * spec.num_layers:,} experts stay in RAM)",
                        "" if machine.ram_gb >= ram_need else "a machine with 256 GB of RAM or more"))
    disk_need = mem["disk_needed_gb"]
    free = machine.disk_free_gb
    checks.append(Check("disk", "ok" if free is not None and free >= disk_need else "missing",
                        f"{free:.0f} GB free at {machine.disk_path}" if free is not None else "unknown",
                        f"{disk_need:.0f} GB for the checkpoint",
                        "" if free is not None and free >= disk_need else
                        "free space, or `ktutorial download --local-dir` on a larger disk"))
    cpu_ok = machine.physical_cores >= 2
    checks.append(Check("CPU cores (tiny profile)", "ok" if cpu_ok else "warn",
                        f"{machine.physical_cores} physical, {machine.logical_cpus} logical", "2 or more",
                        "" if cpu_ok else "the tiny profile runs, slowly", for_real_run=False, for_tiny=True))

    # --- software ------------------------------------------------------------------------------
    kt_version, kt_variant, kt_error = _kt_kernel_import()
    if kt_version:
        checks.append(Check("kt-kernel", "ok" if kt_version == KT_KERNEL_VERSION else "warn",
                            f"{kt_version}, imports, CPU build {kt_variant}", KT_KERNEL_VERSION,
                            "" if kt_version == KT_KERNEL_VERSION else f"pip install --no-deps kt-kernel=={KT_KERNEL_VERSION}",
                            for_tiny=True))
    else:
        checks.append(Check("kt-kernel", "missing", kt_error, f"kt-kernel {KT_KERNEL_VERSION} importable",
                            f"pip install --no-deps kt-kernel=={KT_KERNEL_VERSION} (`make setup` does it)", for_tiny=True))
    sglang = _version("sglang-kt")
    parser_env = Path(__file__).resolve().parents[1] / ".venv-sglang" / "bin" / "python"
    if sglang and importlib.util.find_spec("sglang") is not None:
        checks.append(Check("sglang-kt", "ok" if sglang == SGLANG_KT_VERSION else "warn", sglang,
                            SGLANG_KT_VERSION, "" if sglang == SGLANG_KT_VERSION else f"pip install sglang-kt=={SGLANG_KT_VERSION}"))
    else:
        where = " (only its argument parser, in .venv-sglang, checks commands here)" if parser_env.exists() else ""
        checks.append(Check("sglang-kt", "missing", "not installed in this environment" + where,
                            f"sglang-kt {SGLANG_KT_VERSION} on the GPU machine",
                            f"on the GPU machine: pip install sglang-kt=={SGLANG_KT_VERSION} (brings kt-kernel and a CUDA torch)"))
    xll = _version("xllamacpp")
    xll_ok = xll is not None and importlib.util.find_spec("xllamacpp") is not None
    checks.append(Check("xllamacpp (llama.cpp server)", "ok" if xll_ok else "missing", xll or "not installed",
                        "xllamacpp (the tiny model and the llama.cpp comparison)",
                        "" if xll_ok else "pip install xllamacpp (`make setup` does it)", for_tiny=True))
    node = _node_version()
    node_major = int(m.group(1)) if node and (m := re.match(r"v?(\d+)", node)) else None
    node_ok = node_major is not None and node_major >= NODE_MIN_MAJOR
    checks.append(Check("Node.js", "ok" if node_ok else "missing", node or "not found",
                        f"Node {NODE_MIN_MAJOR}+ (Claude Code runs on it)",
                        "" if node_ok else "apt-get install nodejs npm (or a Node 20+ from nodejs.org)",
                        for_real_run=False))
    claude = claude_path()
    checks.append(Check("Claude Code CLI", "ok" if claude else "missing",
                        ("on PATH" if claude and shutil.which("claude") else "./.tools (project-local)") if claude else "not found",
                        "`claude` on PATH or in ./.tools", "" if claude else "make tools (npm install into ./.tools)",
                        for_real_run=False))

    real_blockers = [c for c in checks if c.status == "missing" and c.for_real_run]
    tiny_blockers = [c for c in checks if c.status == "missing" and c.for_tiny]
    summary = []
    if real_blockers:
        summary.append("MiniMax-M2.1 (real run): not on this machine; missing: "
                       + ", ".join(c.item for c in real_blockers))
    else:
        summary.append(f"MiniMax-M2.1 (real run): this machine has what it needs ({plan.verdict})")
    if tiny_blockers:
        summary.append("tiny profile: cannot run here; missing: " + ", ".join(c.item for c in tiny_blockers))
    else:
        summary.append(f"tiny profile: works here (llama.cpp via xllamacpp {xll}, kt-kernel {kt_variant} build)")
    return DoctorReport(checks=checks, hardware=machine.to_dict(), real_run_ready=not real_blockers,
                        tiny_ready=not tiny_blockers, summary=summary)


# ---- plan from the CLI's options --------------------------------------------------------------


def parse_sets(items: Optional[list[str]]) -> dict[str, str]:
    """['kt-num-gpu-experts=40', ...] -> {'kt-num-gpu-experts': '40'}."""
    out: dict[str, str] = {}
    for item in items or []:
        flag, eq, value = str(item).partition("=")
        flag = flag.strip().lstrip("-")
        if not eq or not flag:
            raise UserError(f"--set {item!r}: expected FLAG=VALUE, e.g. --set kt-num-gpu-experts=40")
        out[flag] = value.strip()
    return out


def plan_for(
    model: str = "minimax-m2.1",
    model_dir: Optional[str] = None,
    gpu: Optional[str] = None,
    gpus: Optional[int] = None,
    tp: Optional[int] = None,
    ram_gb: Optional[float] = None,
    cpu_cores: Optional[int] = None,
    numa_nodes: Optional[int] = None,
    cpu_flags: Optional[str] = None,
    context_tokens: Optional[int] = None,
    kv_dtype: str = "bf16",
    sets: Optional[list[str]] = None,
    logical_cpus: Optional[int] = None,
) -> Plan:
    """The Plan `ktutorial plan` prints. Without hardware options: this machine (disk included).
    With any: a described machine; what is not given takes Hardware.described's defaults and
    disk is not checked."""
    if model == "tiny":
        # The embedded tiny model, served by SGLang + KT on a GPU host (profile tiny-sglang).
        from ktutorial import tiny

        info = {"served_model_name": tiny.SERVED_MODEL_NAME}
        model_dir = model_dir or str(tiny.ensure().hf_dir)
    elif model not in known_models():
        raise UserError(f"unknown model {model!r}; known models: {', '.join(known_models())}, tiny")
    else:
        info = known_model(model)
    checkpoint_present = False
    try:
        if model_dir is not None:
            folder = Path(os.path.expanduser(model_dir))
            if not folder.is_dir():
                raise UserError(f"--model-dir {model_dir}: no such folder (ktutorial download fetches the model)")
            spec = ModelSpec.from_dir(folder, name=model)
            checkpoint_present = (folder / "model.safetensors.index.json").is_file()
        else:
            spec = ModelSpec.known(model)
    except SpecError as exc:
        raise UserError(str(exc)) from exc
    for name, value in (("--gpus", gpus), ("--tp", tp), ("--cpu-cores", cpu_cores), ("--numa-nodes", numa_nodes),
                        ("--context-tokens", context_tokens)):
        if value is not None and value <= 0:
            raise UserError(f"{name} must be at least 1, got {value}")
    if ram_gb is not None and not ram_gb > 0:
        raise UserError(f"--ram-gb must be more than zero, got {ram_gb}")
    described = any(v is not None for v in (gpu, gpus, ram_gb, cpu_cores, numa_nodes, cpu_flags, logical_cpus))
    if described:
        if gpus and gpu is None:
            raise UserError("--gpus needs --gpu NAME:GB to say which card, e.g. --gpu 'RTX 5090:32' --gpus 2")
        kwargs: dict[str, Any] = {}
        for key, value in (("ram_gb", ram_gb), ("cpu_cores", cpu_cores), ("numa_nodes", numa_nodes),
                           ("logical_cpus", logical_cpus)):
            if value is not None:
                kwargs[key] = value
        if cpu_flags is not None:
            kwargs["cpu_flags"] = [f for f in re.split(r"[,\s]+", cpu_flags) if f]
        machine = hw_mod.Hardware.described(gpu=gpu, gpus=gpus, **kwargs)
    else:
        machine = hw_mod.detect(disk_path=model_dir or os.path.expanduser("~/models"))
    overrides = parse_sets(sets)
    from ktutorial.engines import sglang_kt

    sglang_kt.check_overrides(overrides)
    goals = Goals(
        context_tokens=context_tokens, tp=tp, kv_dtype=kv_dtype,
        model_dir=model_dir, served_model_name=info.get("served_model_name"),
        checkpoint_present=checkpoint_present, overrides=overrides,
    )
    try:
        return make_plan(spec, machine, goals)
    except PlanError:
        raise
    except (ValueError, TypeError) as exc:  # a spec or override the arithmetic cannot take
        raise UserError(str(exc)) from exc
