"""hardware.py: this machine's detection, described machines, kt-kernel's CPU variant rules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ktutorial import hardware as hw
from ktutorial.errors import UserError

AVX512_BF16 = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16"]


def _kt_cpu_detect_module():
    """kt-kernel's own _cpu_detect.py, loaded alone (its package import would load torch)."""
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("kt-kernel is not installed (make setup installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "_cpu_detect.py"
    mod_spec = importlib.util.spec_from_file_location("_kt_cpu_detect_probe", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


FLAG_SETS = {
    "amx": AVX512_BF16 + ["amx_tile", "amx_int8", "amx_bf16"],
    "avx512_bf16": AVX512_BF16,
    "avx512_vbmi": ["avx2", "avx512f", "avx512bw", "avx512vnni", "avx512vbmi"],  # cpuinfo spelling
    "avx512_vnni": ["avx2", "avx512f", "avx512bw", "avx512_vnni"],
    "avx512_base": ["avx2", "avx512f", "avx512bw"],
    "avx2": ["avx2", "fma", "f16c"],
    "avx2 (amx without avx512)": ["avx2", "amx_tile", "amx_int8", "amx_bf16"],
}


@pytest.mark.parametrize("label", sorted(FLAG_SETS))
def test_variant_rules_match_kt_kernel(label, monkeypatch):
    """Our rule table gives what kt-kernel's own detector gives for the same /proc/cpuinfo."""
    flags = FLAG_SETS[label]
    kt = _kt_cpu_detect_module()
    monkeypatch.delenv("KT_KERNEL_CPU_VARIANT", raising=False)
    cpuinfo = "processor\t: 0\nmodel name\t: test\nflags\t\t: " + " ".join(["fpu", "sse2", *flags]) + "\n"

    class _File:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return cpuinfo

    monkeypatch.setattr(kt, "open", _File, raising=False)
    expected = kt.detect_cpu_features()
    assert hw.kt_cpu_variant(flags) == expected == label.split(" ")[0]


def test_detect_this_machine():
    machine = hw.detect(disk_path=".")
    assert machine.source == "detected"
    assert machine.physical_cores >= 1 and machine.logical_cpus >= machine.physical_cores
    assert machine.numa_nodes >= 1 and machine.ram_gb > 0
    assert machine.disk_free_gb is not None and machine.disk_free_gb > 0
    assert machine.cpu_flags is not None and "avx2" in machine.cpu_flags
    # The variant is the one kt-kernel would load here (this project's CI machine: avx2).
    assert machine.cpu_variant == _kt_cpu_detect_module().detect_cpu_features()
    d = machine.to_dict()
    assert d["gpu_count"] == len(d["gpus"]) and d["cpu_variant"] == machine.cpu_variant


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_physical_cores_counts_cores_not_hyperthreads(tmp_path):
    """8 logical CPUs: 2 packages x 2 cores x 2 threads -> 4 physical cores; an offline CPU is skipped."""
    cpu = tmp_path / "devices/system/cpu"
    _write(cpu / "online", "0-7\n")
    for i in range(9):
        package, core = (i // 4) % 2, (i // 2) % 2  # threads 2k and 2k+1 share a core
        _write(cpu / f"cpu{i}/topology/physical_package_id", f"{package}\n")
        _write(cpu / f"cpu{i}/topology/core_id", f"{core if i < 8 else 7}\n")
    assert hw.physical_cores(str(tmp_path)) == 4
    # A container allowed CPUs 0-3 (package 0 only) has 2 cores.
    assert hw.physical_cores(str(tmp_path), cpus=[0, 1, 2, 3]) == 2


def test_numa_nodes_with_cpus_only(tmp_path):
    node = tmp_path / "devices/system/node"
    _write(node / "node0/cpulist", "0-3\n")
    _write(node / "node1/cpulist", "4-7\n")
    _write(node / "node2/cpulist", "\n")  # memory-only node (CXL): no thread pool can run there
    _write(node / "possible", "0-2\n")
    assert hw.numa_node_ids(str(tmp_path)) == [0, 1]


def test_parse_nvidia_smi():
    text = "NVIDIA GeForce RTX 5090, 32607, 12.0, 575.51.03\nNVIDIA GeForce RTX 5090, 32607, 12.0, 575.51.03\n"
    gpus = hw.parse_nvidia_smi(text)
    assert len(gpus) == 2
    assert gpus[0].name == "NVIDIA GeForce RTX 5090" and gpus[0].memory_gib == pytest.approx(31.84, abs=0.01)
    assert gpus[0].sm == 120 and gpus[0].driver == "575.51.03"
    old = hw.parse_nvidia_smi("NVIDIA GeForce RTX 3090, 24576, 535.1\n", with_compute_cap=False)
    assert old[0].compute_capability == "8.6" and old[0].memory_gib == 24.0


def test_described_machine():
    m = hw.Hardware.described(gpu="RTX 5090:32", gpus=2, ram_gb=1024, cpu_cores=64, logical_cpus=128,
                              numa_nodes=2, cpu_flags=AVX512_BF16)
    assert m.gpu_count == 2 and m.gpu_memory_gib == 32 and m.gpus[0].compute_capability == "12.0"
    assert m.smt and m.cpu_variant == "avx512_bf16" and m.has_avx512
    assert m.disk_free_gb is None and m.source == "described"
    assert m.label() == ("2 x RTX 5090 (32 GiB), described CPU, 64 cores / 128 threads, 2 NUMA nodes, "
                         "1024 GB RAM")
    unknown = hw.Hardware.described(gpu="RTX 4090:24")
    assert unknown.cpu_variant == "unknown" and unknown.has_avx512 is None
    none = hw.Hardware.described(gpus=0)
    assert none.gpu_count == 0 and none.gpu_memory_gib == 0


def test_described_from_profile_form():
    from ktutorial.profiles import load_profile

    desc = load_profile("tiny").described_hardware
    m = hw.Hardware.described(**desc)
    assert m.gpu_count == desc["gpu_count"] == 1
    assert m.gpus[0].name == "RTX 5090" and m.gpu_memory_gib == 32
    assert m.physical_cores == desc["cpu_cores"] and m.ram_gb == desc["ram_gb"]
    assert m.cpu_variant == "avx512_bf16"


@pytest.mark.parametrize("spec, words", [
    ("RTX5090", "NAME:GB"),
    (":32", "name is empty"),
    ("RTX 5090:lots", "not a number"),
    ("RTX 5090:0", "positive"),
    ("RTX 5090:-8", "positive"),
    ("RTX 5090:nan", "positive"),
])
def test_bad_gpu_spec(spec, words):
    with pytest.raises(UserError, match=words):
        hw.parse_gpu(spec)


@pytest.mark.parametrize("kwargs, words", [
    (dict(gpu="RTX 5090:32", gpus=0), "at least 1"),
    (dict(gpu="RTX 5090:32", gpus=-2), "at least 1"),
    (dict(gpu="RTX 5090:32", cpu_cores=0), "at least 1"),
    (dict(gpu="RTX 5090:32", cpu_cores=2.5), "whole number"),
    (dict(gpu="RTX 5090:32", ram_gb=0), "more than zero"),
    (dict(gpu="RTX 5090:32", ram_gb=-64), "more than zero"),
    (dict(gpu="RTX 5090:32", numa_nodes=0), "at least 1"),
    (dict(gpu="RTX 5090:32", cpu_cores=4, numa_nodes=8), "more than --cpu-cores"),
    (dict(gpu="RTX 5090:32", cpu_cores=8, logical_cpus=4), "fewer than physical"),
    (dict(gpus=2), "none described"),
    (dict(gpus=[{"name": "RTX 5090"}]), "memory_gb"),
])
def test_bad_described_machine(kwargs, words):
    with pytest.raises(UserError, match=words):
        hw.Hardware.described(**kwargs)
