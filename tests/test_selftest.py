"""`ktutorial selftest --json` end to end, as a reader runs it: real kt-kernel, real llama.cpp."""

import json
import os
import subprocess
import sys

import psutil


def test_selftest_passes_and_reports_its_checks(tmp_path):
    env = dict(os.environ, KTUTORIAL_HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [sys.executable, "-m", "ktutorial.cli", "selftest", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    kt, ll = report["kt_kernel"], report["llamacpp"]
    assert kt["variant"] in {"amx", "avx512_bf16", "avx512_vbmi", "avx512_vnni", "avx512_base", "avx2"}
    assert 0 < kt["rel_err"] < 1e-2 and kt["nonzero"] and kt["masked_experts_skipped"]
    assert ll["chat_ok"] and ll["messages_ok"] and ll["stopped"]
    assert ll["chat_answer"].strip() == ll["expected_answer"]
    assert report["seconds"] > 0 and report["ok"] is True
    # The slow AVX2 build is named on stderr, never silently used.
    if kt["variant"] == "avx2":
        assert "avx2" in proc.stderr and kt["warning"]
    # The llama.cpp child it started does not outlive the selftest.
    pid = ll["pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
