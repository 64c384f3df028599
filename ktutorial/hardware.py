"""What a machine has: GPUs, CPU model and vector flags, physical cores, NUMA nodes, RAM, free disk.

`detect()` reads this machine (nvidia-smi or torch for GPUs, /proc and /sys for the CPU);
`Hardware.described(...)` states a machine you don't have (the published runs, a box you plan
to buy). The planner takes either.

Units: GPU memory in GiB (2**30 bytes), as nvidia-smi, torch's OOM messages and GPU makers count
it (a "32 GB" RTX 5090 has 32 GiB); host RAM and disk in GB (10**9 bytes), as model cards and
`df -H` count them. A described `ram_gb=256` is therefore slightly conservative for a "256 GB"
server (256 GiB = 275 GB).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import psutil

from ktutorial.errors import UserError

GIB = 2**30
GB = 10**9
UNKNOWN_CPU = "unknown CPU"  # cpu_model when /proc/cpuinfo names none


class HardwareError(UserError):
    """A described machine that cannot exist (bad GPU spec, zero cores, negative RAM)."""


# ---- kt-kernel's CPU variants ----------------------------------------------------------------

# The same rules, in the same order, as kt_kernel/_cpu_detect.py (kt-kernel 0.7.2): the first
# variant whose flags are all present is the one its import loads.
KT_VARIANT_REQUIREMENTS: list[tuple[str, tuple[str, ...]]] = [
    ("amx", ("amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512bw", "avx512_vnni",
             "avx512_vbmi", "avx512_bf16")),
    ("avx512_bf16", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")),
    ("avx512_vbmi", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi")),
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512_vnni")),
    ("avx512_base", ("avx512f", "avx512bw")),
    ("avx2", ("avx2",)),
]

# What each variant means for M2.1's FP8 experts. Only what is known is said: kt-kernel's
# tutorial asks for AVX512; ktutorial measured the FP8 kernel on an AMX host and on this
# project's AVX2 machine, not the variants in between.
KT_VARIANT_COST: dict[str, str] = {
    "amx": "AMX tiles plus AVX512-BF16: kt-kernel's fastest build; the FP8 kernel table in "
           "FACTS.md was measured on one (Xeon, 16 vCPUs).",
    "avx512_bf16": "AVX512 with BF16 dot products: the tutorial's recommended class (EPYC 9004/9005 "
                   "get this build); FP8 experts are widened to BF16 in registers.",
    "avx512_vbmi": "AVX512 without BF16 instructions: FP8 runs, with extra conversion work per "
                   "weight; expect slower prefill than avx512_bf16 (not measured by ktutorial).",
    "avx512_vnni": "AVX512 without VBMI or BF16: FP8 runs with more shuffles and conversions; "
                   "slower prefill than avx512_bf16 (not measured by ktutorial).",
    "avx512_base": "AVX512F/BW only: the slowest AVX512 build; the tutorial's minimum.",
    "avx2": "no AVX512: kt-kernel falls back to its AVX2 build (it has an FP8 MoE, half the vector "
            "width); the published tutorial requires AVX512, so expect well below its numbers. "
            "Fine for the tiny model.",
    "unknown": "CPU flags not described: kt-kernel's build cannot be told; pass --cpu-flags.",
}

# Flags worth keeping from /proc/cpuinfo; the rest do not change any decision here.
RELEVANT_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vbmi",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)

# Compute capability by card name, for described GPUs (nvidia-smi reports it for real ones).
# Longest names first so "RTX 4090 D" is not read as "RTX 4090".
_COMPUTE_CAPABILITY = {
    "RTX PRO 6000": "12.0", "RTX 5090": "12.0", "RTX 5080": "12.0", "RTX 5070": "12.0",
    "B200": "10.0", "GB200": "10.0", "H200": "9.0", "H100": "9.0", "H20": "9.0", "H800": "9.0",
    "GH200": "9.0", "L40S": "8.9", "L40": "8.9", "L4": "8.9", "RTX 6000 Ada": "8.9",
    "RTX 4090": "8.9", "RTX 4080": "8.9", "RTX 4070": "8.9", "RTX A6000": "8.6",
    "RTX 3090": "8.6", "RTX 3080": "8.6", "A40": "8.6", "A10": "8.6", "A100": "8.0",
    "A800": "8.0", "V100": "7.0", "T4": "7.5",
}


def normalize_flag(flag: str) -> str:
    """cpuinfo spells some flags without the underscore (avx512vnni); kt-kernel accepts both."""
    f = flag.strip().lower()
    aliases = {"avx512vnni": "avx512_vnni", "avx512vbmi": "avx512_vbmi", "avx512bf16": "avx512_bf16",
               "avx512fp16": "avx512_fp16", "amxtile": "amx_tile", "amxint8": "amx_int8",
               "amxbf16": "amx_bf16"}
    return aliases.get(f, f)


def kt_cpu_variant(flags: Optional[Iterable[str]]) -> str:
    """The kt-kernel build these CPU flags load (kt_kernel/_cpu_detect.py's rules); 'unknown' if None."""
    if flags is None:
        return "unknown"
    have = {normalize_flag(f) for f in flags}
    for variant, required in KT_VARIANT_REQUIREMENTS:
        if all(r in have for r in required):
            return variant
    return "avx2"  # kt-kernel's own fallback, even without the flag


def compute_capability_for(name: str) -> Optional[str]:
    key = name.upper().replace("NVIDIA", "").replace("GEFORCE", "").strip()
    for card in sorted(_COMPUTE_CAPABILITY, key=len, reverse=True):
        if card.upper() in key:
            return _COMPUTE_CAPABILITY[card]
    return None


# ---- the objects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    compute_capability: Optional[str] = None  # "8.9"
    driver: Optional[str] = None

    @property
    def sm(self) -> Optional[int]:
        """Compute capability as an integer (8.9 -> 89); None when unknown."""
        if not self.compute_capability:
            return None
        major, _, minor = self.compute_capability.partition(".")
        try:
            return int(major) * 10 + int(minor or 0)
        except ValueError:
            return None


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GPU, ...]
    cpu_model: str
    cpu_flags: Optional[tuple[str, ...]]  # None: not described
    physical_cores: int
    logical_cpus: int
    numa_nodes: int
    ram_gb: float
    numa_node_ids: tuple[int, ...] = ()
    disk_free_gb: Optional[float] = None
    disk_path: Optional[str] = None
    source: str = "detected"  # or "described"
    notes: tuple[str, ...] = field(default_factory=tuple)

    # --- derived ------------------------------------------------------------------------

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def gpu_memory_gib(self) -> float:
        """The smallest card's memory: tensor parallelism splits evenly, so it sets the limit."""
        return min((g.memory_gib for g in self.gpus), default=0.0)

    @property
    def gpu_name(self) -> str:
        return self.gpus[0].name if self.gpus else "none"

    @property
    def smt(self) -> bool:
        """True when the OS sees more logical CPUs than cores (hyperthreads / SMT)."""
        return self.logical_cpus > self.physical_cores

    @property
    def cpu_variant(self) -> str:
        return kt_cpu_variant(self.cpu_flags)

    @property
    def cpu_variant_cost(self) -> str:
        return KT_VARIANT_COST[self.cpu_variant]

    @property
    def has_avx512(self) -> Optional[bool]:
        if self.cpu_flags is None:
            return None
        have = {normalize_flag(f) for f in self.cpu_flags}
        return "avx512f" in have and "avx512bw" in have

    @property
    def numa_ids(self) -> tuple[int, ...]:
        return self.numa_node_ids or tuple(range(self.numa_nodes))

    def label(self) -> str:
        """One line: '2 x RTX 5090 (32 GiB), 64 cores / 128 threads, 2 NUMA nodes, 1024 GB RAM'."""
        gpus = f"{self.gpu_count} x {self.gpu_name} ({self.gpu_memory_gib:g} GiB)" if self.gpus else "no GPU"
        threads = f" / {self.logical_cpus} threads" if self.smt else ""
        return (f"{gpus}, {self.cpu_model}, {self.physical_cores} cores{threads}, "
                f"{self.numa_nodes} NUMA node{'s' if self.numa_nodes != 1 else ''}, {self.ram_gb:.0f} GB RAM")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = [asdict(g) for g in self.gpus]
        d["cpu_flags"] = list(self.cpu_flags) if self.cpu_flags is not None else None
        d["numa_node_ids"] = list(self.numa_ids)
        d["notes"] = list(self.notes)
        d.update(gpu_count=self.gpu_count, smt=self.smt, cpu_variant=self.cpu_variant,
                 has_avx512=self.has_avx512)
        return d

    # --- a machine described by hand ------------------------------------------------------

    @classmethod
    def described(
        cls,
        gpu: Optional[str] = None,
        gpus: Any = None,
        *,
        gpu_count: Optional[int] = None,
        ram_gb: float = 256,
        cpu_cores: int = 32,
        logical_cpus: Optional[int] = None,
        numa_nodes: int = 1,
        cpu_flags: Optional[Iterable[str]] = None,
        cpu_model: str = "described CPU",
        disk_free_gb: Optional[float] = None,
        compute_capability: Optional[str] = None,
    ) -> "Hardware":
        """A machine stated by hand.

        `gpu="RTX 5090:32"` (name and memory in GiB, as the maker states it) with `gpus=2` for the
        count; or `gpus=[{"name": "RTX 5090", "memory_gb": 32}, ...]` (the profile form; a GPU
        maker's "GB" is GiB) with an optional `gpu_count` repeating the first entry. `cpu_cores`
        are physical cores; `logical_cpus` defaults to the same (no SMT). `gpu=None, gpus=0`
        describes a machine without a GPU.
        """
        cards: list[GPU] = []
        if isinstance(gpus, (list, tuple)):
            for entry in gpus:
                cards.append(_gpu_from_entry(entry, compute_capability))
            if gpu is not None:
                raise HardwareError("give either gpu='NAME:GB' with a count, or a list of gpus, not both")
            if gpu_count is not None:
                _positive_int(gpu_count, "gpu count", allow_zero=True)
                if not cards and gpu_count:
                    raise HardwareError("gpu_count given without a GPU to repeat: describe one in gpus")
                cards = (cards[:1] * gpu_count) if cards else []
        else:
            count = gpus if gpus is not None else gpu_count
            if gpu is None:
                if count:
                    raise HardwareError(f"{count} GPUs asked but none described: pass --gpu NAME:GB")
            else:
                name, memory_gib = parse_gpu(gpu)
                n = 1 if count is None else _positive_int(count, "--gpus", allow_zero=False)
                cc = compute_capability or compute_capability_for(name)
                cards = [GPU(name, memory_gib, cc)] * n
        cores = _positive_int(cpu_cores, "--cpu-cores")
        logical = cores if logical_cpus is None else _positive_int(logical_cpus, "logical CPUs")
        if logical < cores:
            raise HardwareError(f"logical CPUs ({logical}) cannot be fewer than physical cores ({cores})")
        numa = _positive_int(numa_nodes, "--numa-nodes")
        if numa > cores:
            raise HardwareError(f"--numa-nodes {numa} is more than --cpu-cores {cores}: each node has cores")
        ram = _positive_number(ram_gb, "--ram-gb")
        disk = None if disk_free_gb is None else _positive_number(disk_free_gb, "free disk (GB)", allow_zero=True)
        flags = None if cpu_flags is None else tuple(sorted({normalize_flag(f) for f in cpu_flags if f.strip()}))
        return cls(
            gpus=tuple(cards), cpu_model=cpu_model, cpu_flags=flags, physical_cores=cores,
            logical_cpus=logical, numa_nodes=numa, ram_gb=float(ram), disk_free_gb=disk,
            source="described",
        )


def _gpu_from_entry(entry: Any, compute_capability: Optional[str]) -> GPU:
    if isinstance(entry, GPU):
        return entry
    if isinstance(entry, str):
        name, mem = parse_gpu(entry)
        return GPU(name, mem, compute_capability or compute_capability_for(name))
    if isinstance(entry, dict):
        name = str(entry.get("name") or "").strip()
        mem = entry.get("memory_gib", entry.get("memory_gb"))
        if not name or mem is None:
            raise HardwareError(f"a described GPU needs a name and memory_gb: got {entry!r}")
        mem = _positive_number(mem, f"memory of {name}")
        cc = entry.get("compute_capability") or compute_capability or compute_capability_for(name)
        return GPU(name, float(mem), cc, entry.get("driver"))
    raise HardwareError(f"cannot read a GPU from {entry!r}: use 'NAME:GB' or {{name, memory_gb}}")


def parse_gpu(text: str) -> tuple[str, float]:
    """'RTX 5090:32' -> ('RTX 5090', 32.0). The number is the card's memory in GiB (the maker's GB)."""
    if not isinstance(text, str) or ":" not in text:
        raise HardwareError(f"--gpu {text!r}: expected NAME:GB, e.g. --gpu 'RTX 5090:32'")
    name, _, mem = text.rpartition(":")
    name = name.strip()
    if not name:
        raise HardwareError(f"--gpu {text!r}: the GPU name is empty; expected NAME:GB, e.g. 'RTX 4090:24'")
    try:
        memory = float(mem)
    except ValueError:
        raise HardwareError(f"--gpu {text!r}: {mem!r} is not a number of GB; expected NAME:GB, e.g. 'RTX 4090:24'") from None
    if not memory > 0 or memory != memory or memory == float("inf"):
        raise HardwareError(f"--gpu {text!r}: GPU memory must be a positive number of GB")
    return name, memory


def _positive_int(value: Any, what: str, allow_zero: bool = False) -> int:
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise HardwareError(f"{what} must be a whole number, got {value!r}") from None
    if as_float != int(as_float) or isinstance(value, bool):
        raise HardwareError(f"{what} must be a whole number, got {value!r}")
    n = int(as_float)
    if n < 0 or (n == 0 and not allow_zero):
        raise HardwareError(f"{what} must be {'zero or more' if allow_zero else 'at least 1'}, got {value!r}")
    return n


def _positive_number(value: Any, what: str, allow_zero: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise HardwareError(f"{what} must be a number, got {value!r}") from None
    if x != x or x == float("inf") or x < 0 or (x == 0 and not allow_zero):
        raise HardwareError(f"{what} must be {'zero or more' if allow_zero else 'more than zero'}, got {value!r}")
    return x


# ---- this machine -----------------------------------------------------------------------------


def detect(disk_path: str | os.PathLike = ".", *, proc_root: str = "/proc", sys_root: str = "/sys",
           use_torch: bool = True) -> Hardware:
    """This machine. GPUs from nvidia-smi, else torch.cuda when it sees one, else none."""
    notes: list[str] = []
    gpus = _gpus_from_nvidia_smi()
    if gpus is None:
        # torch.cuda needs the NVIDIA kernel driver; without it, skip the 3-second torch import.
        driver_present = Path(proc_root, "driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()
        gpus = _gpus_from_torch() if (use_torch and driver_present) else []
        if not gpus:
            notes.append("no NVIDIA GPU found (nvidia-smi absent or failing, torch sees no CUDA device)")
    model, flags = _cpuinfo(proc_root)
    # The CPUs this process may run on (a container or taskset may allow fewer than the host has).
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    logical = len(allowed) if allowed else (os.cpu_count() or 1)
    physical = physical_cores(sys_root, cpus=allowed) or _psutil_physical() or logical
    node_ids = numa_node_ids(sys_root)
    ram_gb = _ram_bytes(proc_root) / GB
    free_gb, where = free_disk_gb(disk_path)
    return Hardware(
        gpus=tuple(gpus), cpu_model=model, cpu_flags=flags, physical_cores=physical,
        logical_cpus=max(logical, physical), numa_nodes=max(1, len(node_ids)),
        numa_node_ids=tuple(node_ids) or (0,), ram_gb=round(ram_gb, 2), disk_free_gb=free_gb,
        disk_path=where, source="detected", notes=tuple(notes),
    )


def _gpus_from_nvidia_smi() -> Optional[list[GPU]]:
    """GPUs as nvidia-smi reports them; None when nvidia-smi is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    queries = ("name,memory.total,compute_cap,driver_version", "name,memory.total,driver_version")
    for query in queries:  # compute_cap needs a driver from 2021 or later
        try:
            out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0:
            return parse_nvidia_smi(out.stdout, with_compute_cap="compute_cap" in query)
    return None


def parse_nvidia_smi(text: str, with_compute_cap: bool = True) -> list[GPU]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total[,compute_cap],driver_version` (MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < (4 if with_compute_cap else 3):
            continue
        name, mem_mib = parts[0], parts[1]
        cc = parts[2] if with_compute_cap else compute_capability_for(name)
        driver = parts[-1]
        try:
            memory_gib = round(float(mem_mib) / 1024, 2)
        except ValueError:
            continue
        gpus.append(GPU(name, memory_gib, cc or None, driver or None))
    return gpus


def _gpus_from_torch() -> list[GPU]:
    if importlib.util.find_spec("torch") is None:
        return []
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(GPU(p.name, round(p.total_memory / GIB, 2), f"{p.major}.{p.minor}", None))
        return out
    except Exception:  # a broken CUDA install is "no GPU" here; doctor says why
        return []


def _cpuinfo(proc_root: str) -> tuple[str, tuple[str, ...]]:
    model, flags = UNKNOWN_CPU, ()
    try:
        text = Path(proc_root, "cpuinfo").read_text(errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model == UNKNOWN_CPU:
            model = value.strip()
        elif key == "flags" and not flags:
            have = {normalize_flag(f) for f in value.split()}
            flags = tuple(sorted(f for f in RELEVANT_FLAGS if f in have))
    return model, flags


def _parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def physical_cores(sys_root: str = "/sys", cpus: Optional[Iterable[int]] = None) -> int:
    """Cores, not hyperthreads: distinct (package, core id) pairs over the online CPUs (those in
    `cpus` only, when given); 0 if unknown."""
    base = Path(sys_root, "devices/system/cpu")
    try:
        online = _parse_cpulist(Path(base, "online").read_text())
    except (OSError, ValueError):
        online = [int(m.group(1)) for p in base.glob("cpu[0-9]*") if (m := re.fullmatch(r"cpu(\d+)", p.name))]
    if cpus is not None:
        allowed = set(cpus)
        online = [c for c in online if c in allowed]
    cores = set()
    for cpu in online:
        topo = base / f"cpu{cpu}" / "topology"
        try:
            package = Path(topo, "physical_package_id").read_text().strip()
            core = Path(topo, "core_id").read_text().strip()
        except OSError:
            continue
        cores.add((package, core))
    return len(cores)


def _psutil_physical() -> int:
    try:
        return int(psutil.cpu_count(logical=False) or 0)
    except Exception:
        return 0


def numa_node_ids(sys_root: str = "/sys") -> list[int]:
    """NUMA nodes that hold CPUs (memory-only nodes, e.g. CXL, cannot run a thread pool)."""
    ids = []
    for p in Path(sys_root, "devices/system/node").glob("node[0-9]*"):
        m = re.fullmatch(r"node(\d+)", p.name)
        if not m:
            continue
        try:
            if Path(p, "cpulist").read_text().strip():
                ids.append(int(m.group(1)))
        except OSError:
            continue
    return sorted(ids)


def _ram_bytes(proc_root: str) -> int:
    try:
        return int(psutil.virtual_memory().total)
    except Exception:
        pass
    try:
        for line in Path(proc_root, "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def free_disk_gb(path: str | os.PathLike) -> tuple[Optional[float], Optional[str]]:
    """Free space where `path` is or would be created (its nearest existing parent)."""
    p = Path(os.path.expanduser(str(path))).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return round(shutil.disk_usage(p).free / GB, 2), str(p)
    except OSError:
        return None, None
