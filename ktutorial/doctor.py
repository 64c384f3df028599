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
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ktutorial import hardware as hw_mod
from ktutorial import tiny
from ktutorial.diagnose import GPU_INSTALL, diagnose
from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError
from ktutorial.plan import Goals, Plan, PlanError, make_plan
from ktutorial.profiles import load_profile
from ktutorial.spec import ModelSpec, SpecError, known_model, known_models, unknown_model_message
from ktutorial.tables import Markdown, ShowsItself, bullets, join, table

SGLANG_KT_VERSION = "0.7.2"
KT_KERNEL_VERSION = "0.7.2"
NODE_MIN_MAJOR = 18  # Claude Code's npm package needs Node 18+ (2.1.332 asks for 22 but runs on 20)

# The GPU environment. sglang-kt 0.7.2 reassembles its `sgl_kernel` at first import from pieces
# inside five wheels, checked against one checksum: all five must come from one release. These are
# the exact pins of `ktransformers[sglang]==0.7.2` (its Requires-Dist: kt-kernel==0.7.2 and, for
# the extra, sglang-kt==0.7.2; sglang-kt's: transformers-kt==5.6.0.post6, accelerate-kt==1.14.0.post4,
# torch==2.9.1). `pip install sglang-kt kt-kernel` leaves out ktransformers, whose wheel holds a
# piece and the Hopper build: `import sgl_kernel` then fails on every GPU. The install line,
# GPU_INSTALL, lives in diagnose.py (its fixes name it too).
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
class DoctorReport(ShowsItself):
    checks: list[Check]
    hardware: dict[str, Any]
    real_run_ready: bool
    tiny_ready: bool
    summary: list[str] = field(default_factory=list)

    def markdown(self) -> Markdown:
        rows = [{"check": c.item, "status": c.status, "found": c.found, "needed": c.need, "fix": c.fix}
                for c in self.checks]
        return join(table(rows), bullets(self.summary))

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


# ---- the GPU environment: sglang-kt's sgl_kernel and the wheels it is reassembled from -------------
# Pure functions of the installed distributions (normalized name -> version), their Requires-Dist
# lines and kt-kernel's payload manifest, so tests drive them without installing anything;
# `doctor()` feeds them this environment.


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, str]:
    """Every installed distribution: normalized name -> version (the first on sys.path wins, as
    for imports)."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_norm(name), dist.version)
    return out


def parse_payload_manifest(source: str) -> Optional[dict[str, Any]]:
    """The constants of a `sgl_kernel/_payload_manifest.py` (VERSION, PAYLOAD_MODULES, FILES, ...)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return values if values.get("PAYLOAD_MODULES") else None


def read_payload_manifest() -> tuple[bool, Optional[dict[str, Any]]]:
    """(a `sgl_kernel` package is installed, its payload manifest or None). Read as a file:
    importing sgl_kernel loads torch and its CUDA objects, and may reassemble them first."""
    try:
        spec = importlib.util.find_spec("sgl_kernel")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return False, None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "_payload_manifest.py"
        if path.is_file():
            return True, parse_payload_manifest(path.read_text(encoding="utf-8", errors="replace"))
    return True, None


def payload_dist(module: str) -> str:
    """The distribution that carries a payload module: `transformers_kt_sgl_kernel_payload` ->
    transformers-kt."""
    if module in PAYLOAD_DISTS:
        return PAYLOAD_DISTS[module]
    return _norm(module.removesuffix("_sgl_kernel_payload"))


def payload_checks(dists: dict[str, str], manifest: Optional[dict[str, Any]] = None) -> list[Check]:
    """Each wheel that carries a piece of `sgl_kernel` and is not installed, with its fix; one ok
    line when all are. `manifest`: kt-kernel's `_payload_manifest.py` values (None: 0.7.2's list)."""
    modules = tuple((manifest or {}).get("PAYLOAD_MODULES") or PAYLOAD_MODULES)
    carriers = [(module, payload_dist(module)) for module in modules]
    missing = [(module, dist) for module, dist in carriers if _norm(dist) not in dists]
    need = f"all {len(modules)} wheels of the manifest: " + ", ".join(dist for _, dist in carriers)
    if not missing:
        found = ", ".join(f"{dist} {dists[_norm(dist)]}" for _, dist in carriers)
        return [Check("sgl_kernel pieces", "ok", found, need)]
    return [Check(f"sgl_kernel piece: {dist}", "missing",
                  f"{dist} not installed (it carries {module}; without it `import sgl_kernel` fails)", need,
                  f"{GPU_INSTALL} (installs every piece, pinned)") for module, dist in missing]


def _pins(lines: Optional[list[str]]) -> dict[str, str]:
    """`name==version` requirements of Requires-Dist lines (extras included): name -> version."""
    out = {}
    for line in lines or []:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)", line)
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


# What `ktransformers[sglang]==0.7.2` pins among the KT wheels (their Requires-Dist): the tests' default.
STACK_REQUIRES = {
    "ktransformers": ["kt-kernel==0.7.2", 'sglang-kt==0.7.2; extra == "sglang"'],
    "sglang-kt": ["accelerate-kt==1.14.0.post4", "kt-kernel==0.7.2", "torch==2.9.1", "transformers-kt==5.6.0.post6"],
    "kt-kernel": ["torch==2.9.1", 'sglang-kt; extra == "sglang"'],
    "accelerate-kt": ["torch==2.9.1"],
}


def stack_requires(dists: dict[str, str]) -> dict[str, list[str]]:
    """The Requires-Dist lines of the installed KT wheels (this environment's input of the checks)."""
    out = {}
    for dist in GPU_STACK:
        if dist in dists:
            try:
                out[dist] = importlib.metadata.requires(dist) or []
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def stack_version_checks(dists: dict[str, str], requires: Optional[dict[str, list[str]]] = None) -> list[Check]:
    """kt-kernel / sglang-kt / ktransformers / transformers-kt / accelerate-kt versions that disagree
    (one's exact pin on another not met: the pieces of sgl_kernel share one checksum), else those
    that differ from the release ktutorial was tested with. `requires`: each one's Requires-Dist."""
    requires = STACK_REQUIRES if requires is None else requires
    installed = {d: dists[d] for d in GPU_STACK if d in dists}
    if not installed:
        return []
    clashes = []
    for dist, version in installed.items():
        for other, want in _pins(requires.get(dist)).items():
            if other in installed and installed[other] != want:
                clashes.append(f"{dist} {version} needs {other}=={want}, {other} {installed[other]} is installed")
    tested = ", ".join(f"{d} {v}" for d, v in GPU_STACK.items())
    if clashes:
        return [Check("KT wheel versions", "missing", "; ".join(clashes),
                      "one release (the pieces of sgl_kernel are checked against one checksum)",
                      f"{GPU_INSTALL} (pins all of them: {tested})")]
    off = [f"{d} {v}" for d, v in installed.items() if v != GPU_STACK[d]]
    if off:
        return [Check("KT wheel versions", "warn", "agree, but differ from ktutorial's: " + ", ".join(off),
                      tested, f"{GPU_INSTALL} for the versions ktutorial was tested with")]
    return [Check("KT wheel versions", "ok", ", ".join(f"{d} {v}" for d, v in installed.items()), tested)]


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])


def torch_check(dists: dict[str, str], requires: Optional[dict[str, list[str]]] = None,
                manifest: Optional[dict[str, Any]] = None) -> Check:
    """torch against the one sgl_kernel was built for (sglang-kt's exact torch pin): its CUDA objects
    link libtorch, and another torch makes them fail to import or fail at random."""
    requires = STACK_REQUIRES if requires is None else requires
    pin = _pins(requires.get("sglang-kt")).get("torch") or _pins(requires.get("kt-kernel")).get("torch") \
        or TORCH_FOR_SGL_KERNEL
    built = f"sgl_kernel {manifest['VERSION']}" if manifest and manifest.get("VERSION") else "sglang-kt's sgl_kernel"
    need = f"torch {pin} with CUDA ({built} was built for it)"
    fix = (f"{GPU_INSTALL} (it pins torch=={pin}); under another torch sgl_kernel fails to import (undefined "
           "symbol) or its ops fail at random (\"Cannot access data pointer of Tensor that doesn't have storage\")")
    torch = dists.get("torch")
    if torch is None:
        return Check("torch for sgl_kernel", "missing", "torch not installed", need, fix)
    if "+cpu" in torch:
        return Check("torch for sgl_kernel", "missing", f"torch {torch}: a CPU build", need, fix)
    if _major_minor(torch) != _major_minor(pin):
        return Check("torch for sgl_kernel", "missing", f"torch {torch}", need, fix)
    return Check("torch for sgl_kernel", "ok", f"torch {torch}", need)


@dataclass
class SglKernelImport:
    """What `import sgl_kernel` did in a child process: error None when it imported."""

    error: Optional[str] = None
    timed_out: bool = False


def _sgl_kernel_import(timeout_s: float = SGL_KERNEL_IMPORT_TIMEOUT_S) -> SglKernelImport:
    """`import sgl_kernel` in a child process: the first import reassembles its CUDA objects, and
    a torch it was not built for can crash the process."""
    try:
        out = subprocess.run([sys.executable, "-c", "import sgl_kernel"], capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return SglKernelImport(error=f"import took over {timeout_s:.0f} s", timed_out=True)
    if out.returncode == 0:
        return SglKernelImport()
    text = (out.stderr or out.stdout).strip()
    if out.returncode < 0:
        text = f"{text}\ncrashed with signal {-out.returncode}".strip()
    return SglKernelImport(error=text or f"exit {out.returncode}")


def sgl_kernel_check(result: SglKernelImport) -> Check:
    """`import sgl_kernel`'s outcome; a failure's fix comes from the log diagnosis catalog."""
    need = "`import sgl_kernel` works (sglang-kt imports it at start-up)"
    if result.error is None:
        return Check("import sgl_kernel", "ok", "imports", need)
    if result.timed_out:
        return Check("import sgl_kernel", "warn", result.error, need,
                     "the first import reassembles about 1.3 GB: run `python -c 'import sgl_kernel'` once, "
                     "then `ktutorial doctor` again")
    found = diagnose(result.error, engine="sglang-kt")
    lines = [line.strip() for line in result.error.splitlines() if line.strip()]
    evidence = found[0].evidence.strip() if found else (lines[-1] if lines else result.error)
    fix = f"{found[0].title}: {found[0].fix}" if found else f"{GPU_INSTALL}, on a machine with an NVIDIA GPU and driver"
    return Check("import sgl_kernel", "missing", f"fails: {evidence[:200]}", need, fix)


def kt_variant_check(variant: Optional[str]) -> Optional[Check]:
    """kt-kernel's loaded CPU build: FP8 runs on every one, fast only on AMX and AVX512-BF16."""
    if not variant:
        return None
    need = "a fast FP8 build: " + " or ".join(FAST_FP8_VARIANTS)
    if variant in FAST_FP8_VARIANTS:
        return Check("kt-kernel FP8 speed", "ok", f"CPU build {variant}", need)
    return Check("kt-kernel FP8 speed", "warn",
                 f"CPU build {variant}: FP8 runs, several times slower than on AMX / AVX512-BF16", need,
                 "for the published speeds a CPU with AMX (Xeon Sapphire Rapids or newer) or AVX512-BF16 "
                 "(AMD Zen 4 or newer); if this one has them, unset KT_KERNEL_CPU_VARIANT")


def gpu_stack_checks(dists: dict[str, str], manifest: Optional[dict[str, Any]] = None,
                     requires: Optional[dict[str, list[str]]] = None,
                     sgl_kernel_import: Optional[SglKernelImport] = None, kt_variant: Optional[str] = None,
                     sgl_kernel_present: bool = True) -> list[Check]:
    """Everything an environment with sglang-kt needs beyond sglang-kt itself, each with its fix.
    An sgl_kernel without kt-kernel's manifest is another build (the GPU-host bundle puts upstream's
    sglang-kernel there): the piece and torch checks then do not apply."""
    checks: list[Check] = []
    for other in OTHER_SGL_KERNELS:
        if other in dists:
            checks.append(Check("one sgl_kernel", "warn",
                                f"{other} {dists[other]} is installed too: it writes the same `sgl_kernel` package "
                                "as kt-kernel (the last one installed wins)",
                                "kt-kernel's sgl_kernel only",
                                f"pip uninstall {other}, then pip install --force-reinstall --no-deps "
                                f"kt-kernel=={KT_KERNEL_VERSION} (puts kt-kernel's sgl_kernel back)"))
    foreign = sgl_kernel_present and manifest is None and "kt-kernel" in dists
    if foreign:
        checks.append(Check("sgl_kernel build", "warn",
                            "sgl_kernel has no _payload_manifest.py: it is not kt-kernel's build",
                            "kt-kernel's sgl_kernel (the tested one)",
                            f"{GPU_INSTALL} gives the tested build; with another one torch must be the one it "
                            "was built for"))
    else:
        checks += payload_checks(dists, manifest)
    checks += stack_version_checks(dists, requires)
    if not foreign:
        checks.append(torch_check(dists, requires, manifest))
    if sgl_kernel_import is not None:
        checks.append(sgl_kernel_check(sgl_kernel_import))
    variant = kt_variant_check(kt_variant)
    if variant:
        checks.append(variant)
    return checks


def doctor(disk_path: str | os.PathLike = ".", model: str = "minimax-m2.1",
           context_tokens: Optional[int] = None, hardware: Optional[hw_mod.Hardware] = None) -> DoctorReport:
    """This machine against MiniMax-M2.1's tutorial needs, and the tiny profile's."""
    machine = hardware or hw_mod.detect(disk_path=disk_path)
    spec = ModelSpec.known(model)
    if context_tokens is None:
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
                            f"{mem.gpu.needed_gib:.1f} GiB per GPU for a {context_tokens:,}-token context",
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
    ram_need = mem.host.needed_gb
    checks.append(Check("RAM", "ok" if machine.ram_gb >= ram_need else "missing", f"{machine.ram_gb:.0f} GB",
                        f"{ram_need:.0f} GB (all {spec.num_experts * spec.num_layers:,} experts stay in RAM)",
                        "" if machine.ram_gb >= ram_need else "a machine with 256 GB of RAM or more"))
    disk_need = mem.disk.needed_gb
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
    sglang = _version("sglang-kt")
    gpu_env = bool(sglang) and importlib.util.find_spec("sglang") is not None
    if kt_version:
        # In the GPU environment kt-kernel must match the other KT wheels: reinstall them together.
        kt_fix = GPU_INSTALL if gpu_env else f"pip install --no-deps kt-kernel=={KT_KERNEL_VERSION}"
        checks.append(Check("kt-kernel", "ok" if kt_version == KT_KERNEL_VERSION else "warn",
                            f"{kt_version}, imports, CPU build {kt_variant}", KT_KERNEL_VERSION,
                            "" if kt_version == KT_KERNEL_VERSION else kt_fix,
                            for_tiny=True))
    else:
        checks.append(Check("kt-kernel", "missing", kt_error, f"kt-kernel {KT_KERNEL_VERSION} importable",
                            f"pip install --no-deps kt-kernel=={KT_KERNEL_VERSION} (`make setup` does it)", for_tiny=True))
    parser_env = Path(__file__).resolve().parents[1] / ".venv-sglang" / "bin" / "python"
    if gpu_env:
        checks.append(Check("sglang-kt", "ok" if sglang == SGLANG_KT_VERSION else "warn", sglang,
                            SGLANG_KT_VERSION, "" if sglang == SGLANG_KT_VERSION else GPU_INSTALL))
        dists = installed_distributions()
        present, manifest = read_payload_manifest()
        requires = stack_requires(dists)
        checks += gpu_stack_checks(dists, manifest, requires, sgl_kernel_import=_sgl_kernel_import(),
                                   kt_variant=kt_variant, sgl_kernel_present=present)
    else:
        where = " (only its argument parser, in .venv-sglang, checks commands here)" if parser_env.exists() else ""
        checks.append(Check("sglang-kt", "missing", "not installed in this environment" + where,
                            f"sglang-kt {SGLANG_KT_VERSION} on the GPU machine",
                            f"on the GPU machine: {GPU_INSTALL} (sglang-kt, kt-kernel, the other wheels that "
                            f"carry sgl_kernel's pieces, and torch {TORCH_FOR_SGL_KERNEL} with CUDA, all pinned)"))
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
    model: Optional[str] = None,
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
    disk is not checked. `model` None: minimax-m2.1, or with `model_dir` whatever MiniMax-M2-architecture
    checkpoint the folder holds, named after the folder."""
    if model is None and model_dir is not None:
        info: dict[str, Any] = {}
        spec_name = Path(os.path.expanduser(model_dir)).resolve().name or "model"
    elif (spec_name := model or "minimax-m2.1") == "tiny":
        # The embedded tiny model, served by SGLang + KT on a GPU host (profile tiny-sglang).

        info = {"served_model_name": tiny.SERVED_MODEL_NAME}
        model_dir = model_dir or str(tiny.ensure().hf_dir)
    elif spec_name not in known_models():
        raise UserError(unknown_model_message(spec_name, [*known_models(), "tiny"]))
    else:
        info = known_model(spec_name)
    checkpoint_present = False
    try:
        if model_dir is not None:
            folder = Path(os.path.expanduser(model_dir))
            if not folder.is_dir():
                raise UserError(f"--model-dir {model_dir}: no such folder (ktutorial download fetches the model)")
            spec = ModelSpec.from_dir(folder, name=spec_name)
            checkpoint_present = (folder / "model.safetensors.index.json").is_file()
        else:
            spec = ModelSpec.known(spec_name)
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
