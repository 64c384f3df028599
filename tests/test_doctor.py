"""doctor.py's GPU-environment checks: pure functions of the installed distributions and kt-kernel's
payload manifest, driven here without installing anything; and `doctor()` wiring them up."""

from __future__ import annotations

import importlib.util

import pytest

from ktutorial import doctor as doctor_mod
from ktutorial.diagnose import GPU_INSTALL
from ktutorial.doctor import (
    PAYLOAD_MODULES,
    STACK_REQUIRES,
    SglKernelImport,
    gpu_stack_checks,
    installed_distributions,
    kt_variant_check,
    parse_payload_manifest,
    payload_checks,
    read_payload_manifest,
    sgl_kernel_check,
    stack_version_checks,
    torch_check,
)

# What `pip install "ktransformers[sglang]==0.7.2"` installs, as importlib.metadata names it.
RELEASE = {"ktransformers": "0.7.2", "sglang-kt": "0.7.2", "kt-kernel": "0.7.2", "transformers-kt": "5.6.0.post6",
           "accelerate-kt": "1.14.0.post4", "torch": "2.9.1"}
# What `pip install sglang-kt kt-kernel` installs: sglang-kt's own pins bring transformers-kt and
# accelerate-kt, nothing brings ktransformers (FACTS: `import sgl_kernel` then fails on every GPU).
WITHOUT_KTRANSFORMERS = {k: v for k, v in RELEASE.items() if k != "ktransformers"}

# kt-kernel 0.7.2's sgl_kernel/_payload_manifest.py, its first lines verbatim (FILES shortened to one entry).
MANIFEST_SOURCE = """\
VERSION = '0.3.21.post2'
ARCHIVE_SHA256 = '8f0b5d761342374e2ea3be127ad0329fd2f4105b94f18311c37aaec743d815d8'
PAYLOAD_MODULES = ('sgl_kernel_kt_payload_core', 'transformers_kt_sgl_kernel_payload', 'sglang_kt_sgl_kernel_payload', \
'ktransformers_sgl_kernel_payload', 'accelerate_kt_sgl_kernel_payload')
FILES = {'sgl_kernel/flash_ops.abi3.so': '425a7e51be6291d4be747e92094f211b378e855514d911d83aa54027c3a5c8bc'}
"""


def by_item(checks):
    return {c.item: c for c in checks}


def test_manifest_is_parsed_without_importing_sgl_kernel():
    manifest = parse_payload_manifest(MANIFEST_SOURCE)
    assert manifest["VERSION"] == "0.3.21.post2"
    assert manifest["PAYLOAD_MODULES"] == PAYLOAD_MODULES
    assert parse_payload_manifest("not python (") is None
    assert parse_payload_manifest("X = 1") is None


def test_the_pinned_release_has_every_piece():
    [check] = payload_checks(RELEASE, parse_payload_manifest(MANIFEST_SOURCE))
    assert check.status == "ok" and "ktransformers 0.7.2" in check.found and "accelerate-kt" in check.need


def test_sglang_kt_plus_kt_kernel_lacks_ktransformers_and_says_the_fix():
    checks = payload_checks(WITHOUT_KTRANSFORMERS)  # no manifest readable: 0.7.2's list
    assert [(c.item, c.status) for c in checks] == [("sgl_kernel piece: ktransformers", "missing")]
    assert "ktransformers_sgl_kernel_payload" in checks[0].found
    assert GPU_INSTALL in checks[0].fix


def test_every_missing_carrier_is_named_and_a_new_manifest_module_maps_to_its_wheel():
    manifest = parse_payload_manifest(MANIFEST_SOURCE)
    manifest["PAYLOAD_MODULES"] += ("newthing_kt_sgl_kernel_payload",)
    checks = payload_checks({"sglang-kt": "0.7.2"}, manifest)
    assert [c.item for c in checks] == [f"sgl_kernel piece: {d}" for d in
                                        ("kt-kernel", "transformers-kt", "ktransformers", "accelerate-kt",
                                         "newthing-kt")]


def test_versions_that_agree_are_ok():
    [check] = stack_version_checks(RELEASE)
    assert check.status == "ok"


@pytest.mark.parametrize("dist, version, clash", [
    ("kt-kernel", "0.7.0.post4", "sglang-kt 0.7.2 needs kt-kernel==0.7.2, kt-kernel 0.7.0.post4 is installed"),
    ("transformers-kt", "5.6.0.post5", "needs transformers-kt==5.6.0.post6"),
    ("sglang-kt", "0.7.0.post4", "ktransformers 0.7.2 needs sglang-kt==0.7.2"),
])  # fmt: skip
def test_versions_that_disagree_are_named_with_the_pinned_fix(dist, version, clash):
    dists = dict(RELEASE, **{dist: version})
    [check] = stack_version_checks(dists)
    assert check.status == "missing" and clash in check.found
    assert GPU_INSTALL in check.fix and "one checksum" in check.need


def test_another_release_that_agrees_with_itself_is_only_a_warning():
    dists = {"ktransformers": "0.7.3", "sglang-kt": "0.7.3", "kt-kernel": "0.7.3"}
    requires = {"ktransformers": ["kt-kernel==0.7.3", 'sglang-kt==0.7.3; extra == "sglang"'],
                "sglang-kt": ["kt-kernel==0.7.3", "torch==2.9.1"]}
    [check] = stack_version_checks(dists, requires)
    assert check.status == "warn" and "sglang-kt 0.7.3" in check.found


@pytest.mark.parametrize("torch, status, words", [
    ("2.9.1", "ok", ""),
    ("2.9.1+cu128", "ok", ""),
    ("2.11.0+cu130", "missing", "torch 2.11.0+cu130"),
    ("2.13.0+cpu", "missing", "a CPU build"),
    (None, "missing", "not installed"),
])  # fmt: skip
def test_torch_against_the_one_sgl_kernel_was_built_for(torch, status, words):
    dists = dict(RELEASE, torch=torch) if torch else WITHOUT_KTRANSFORMERS | {"torch": None}
    dists = {k: v for k, v in dists.items() if v is not None}
    check = torch_check(dists, STACK_REQUIRES, parse_payload_manifest(MANIFEST_SOURCE))
    assert check.status == status and words in check.found
    assert "torch 2.9.1" in check.need and "sgl_kernel 0.3.21.post2" in check.need
    if status == "missing":
        assert GPU_INSTALL in check.fix and "torch==2.9.1" in check.fix


def test_torch_pin_is_read_from_sglang_kt_requirements():
    check = torch_check({"torch": "2.10.0"}, {"sglang-kt": ["torch==2.10.0"]})
    assert check.status == "ok" and "torch 2.10.0" in check.need


# What `import sgl_kernel` printed (sgl_kernel/load_utils.py's message, trimmed; see test_diagnose.py).
CRITICAL = ("ImportError: \n[sgl_kernel] CRITICAL: Could not load any common_ops library!\n\n"
            "Error details from previous import attempts:\n")


def test_sgl_kernel_import_failures_take_their_fix_from_the_diagnosis():
    assert sgl_kernel_check(SglKernelImport()).status == "ok"
    pieces = sgl_kernel_check(SglKernelImport(error=CRITICAL + "- ModuleNotFoundError: No module named 'common_ops'"))
    assert pieces.status == "missing" and "CRITICAL" in pieces.found
    assert pieces.fix.startswith("sgl_kernel's pieces are missing:") and GPU_INSTALL in pieces.fix
    abi = sgl_kernel_check(SglKernelImport(
        error=CRITICAL + "- ImportError: libc10_cuda.so: cannot open shared object file: No such file or directory"))
    assert abi.fix.startswith("sgl_kernel built for another torch:") and "libc10_cuda.so" in abi.found
    odd = sgl_kernel_check(SglKernelImport(error="Traceback (most recent call last):\nSomethingElse: boom"))
    assert odd.status == "missing" and "SomethingElse: boom" in odd.found and GPU_INSTALL in odd.fix
    slow = sgl_kernel_check(SglKernelImport(error="import took over 300 s", timed_out=True))
    assert slow.status == "warn" and "import sgl_kernel" in slow.fix


@pytest.mark.parametrize("variant, status", [
    ("amx", "ok"), ("avx512_bf16", "ok"), ("avx512_vbmi", "warn"), ("avx512_vnni", "warn"),
    ("avx512_base", "warn"), ("avx2", "warn"),
])  # fmt: skip
def test_fp8_runs_on_every_variant_but_fast_only_on_amx_and_avx512_bf16(variant, status):
    check = kt_variant_check(variant)
    assert check.status == status
    if status == "warn":
        assert "FP8 runs" in check.found and "AMX" in check.fix
    assert kt_variant_check(None) is None


def test_gpu_stack_checks_all_green_for_the_pinned_release():
    checks = gpu_stack_checks(RELEASE, parse_payload_manifest(MANIFEST_SOURCE), STACK_REQUIRES,
                              sgl_kernel_import=SglKernelImport(), kt_variant="amx")
    assert [(c.item, c.status) for c in checks] == [
        ("sgl_kernel pieces", "ok"), ("KT wheel versions", "ok"), ("torch for sgl_kernel", "ok"),
        ("import sgl_kernel", "ok"), ("kt-kernel FP8 speed", "ok")]


def test_gpu_stack_checks_for_the_broken_install():
    # `pip install sglang-kt kt-kernel` on an H200, torch pulled to 2.11 by something else, AVX2 CPU.
    dists = dict(WITHOUT_KTRANSFORMERS, torch="2.11.0+cu130")
    checks = by_item(gpu_stack_checks(
        dists, parse_payload_manifest(MANIFEST_SOURCE), STACK_REQUIRES, kt_variant="avx2",
        sgl_kernel_import=SglKernelImport(error=CRITICAL + "- ModuleNotFoundError: No module named 'common_ops'")))
    assert checks["sgl_kernel piece: ktransformers"].status == "missing"
    assert checks["KT wheel versions"].status == "ok"
    assert checks["torch for sgl_kernel"].status == "missing"
    assert checks["import sgl_kernel"].status == "missing"
    assert checks["kt-kernel FP8 speed"].status == "warn"


def test_another_sgl_kernel_build_skips_the_piece_and_torch_checks():
    # The GPU-host bundle: upstream sglang-kernel unpacked over sgl_kernel (no manifest, no dist-info).
    dists = {"sglang-kt": "0.7.2", "kt-kernel": "0.7.2", "transformers-kt": "5.6.0.post6", "torch": "2.11.0+cu130"}
    checks = by_item(gpu_stack_checks(dists, None, STACK_REQUIRES, sgl_kernel_present=True,
                                      sgl_kernel_import=SglKernelImport()))
    assert checks["sgl_kernel build"].status == "warn"
    assert not any(item.startswith("sgl_kernel piece") for item in checks)
    assert "torch for sgl_kernel" not in checks and checks["import sgl_kernel"].status == "ok"
    # Installed as a distribution, upstream's build is named too.
    checks = by_item(gpu_stack_checks(dict(RELEASE, **{"sgl-kernel": "0.3.21"}), parse_payload_manifest(MANIFEST_SOURCE)))
    assert checks["one sgl_kernel"].status == "warn" and "pip uninstall sgl-kernel" in checks["one sgl_kernel"].fix


def test_this_environment_is_read_through_importlib_metadata():
    dists = installed_distributions()
    assert "pytest" in dists and all(k == k.lower() and "_" not in k for k in dists)
    present, manifest = read_payload_manifest()
    if "kt-kernel" in dists and present:
        # kt-kernel's wheel ships sgl_kernel: its manifest is read as a file, never imported.
        assert manifest is not None and manifest["PAYLOAD_MODULES"] == PAYLOAD_MODULES


def test_doctor_without_sglang_kt_names_the_pinned_install(monkeypatch):
    monkeypatch.setattr(doctor_mod, "_version", lambda dist: None if dist == "sglang-kt" else "1.0")
    report = doctor_mod.doctor()
    checks = by_item(report.checks)
    assert checks["sglang-kt"].status == "missing" and GPU_INSTALL in checks["sglang-kt"].fix
    assert "import sgl_kernel" not in checks


def test_doctor_with_sglang_kt_runs_the_gpu_checks(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(doctor_mod, "_version", lambda dist: "0.7.2" if dist == "sglang-kt" else None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "sglang" else real_find_spec(name, *a))
    monkeypatch.setattr(doctor_mod, "installed_distributions", lambda: dict(WITHOUT_KTRANSFORMERS))
    monkeypatch.setattr(doctor_mod, "stack_requires", lambda dists: STACK_REQUIRES)
    monkeypatch.setattr(doctor_mod, "read_payload_manifest", lambda: (True, parse_payload_manifest(MANIFEST_SOURCE)))
    monkeypatch.setattr(doctor_mod, "_sgl_kernel_import", lambda: SglKernelImport(
        error=CRITICAL + "- ModuleNotFoundError: No module named 'common_ops'"))
    report = doctor_mod.doctor()
    checks = by_item(report.checks)
    assert checks["sglang-kt"].status == "ok"
    assert checks["sgl_kernel piece: ktransformers"].status == "missing"
    assert checks["import sgl_kernel"].status == "missing"
    assert "sgl_kernel piece: ktransformers" in report.summary[0]
