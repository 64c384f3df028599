"""The server lifecycle against the real llama.cpp server (xllamacpp) on the tiny model, and its
faults: each ends with a clear message and no process left (checked by pid with psutil)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from ktutorial import client, paths, server
from ktutorial.engines import llamacpp
from ktutorial.errors import UserError

KTUTORIAL = str(Path(sys.executable).parent / "ktutorial")


def gone(pid: int, wait_s: float = 5.0) -> bool:
    """True once `pid` no longer runs (exited or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([KTUTORIAL, *args], capture_output=True, text=True, timeout=timeout)


def write_broken_gguf(path: Path, *, arch: str = "minimax-m2", expert_count: bool = True) -> Path:
    """A small minimax-m2 GGUF that llama.cpp refuses: an unknown architecture, or no
    expert_count (which makes llama.cpp abort the whole process with GGML_ASSERT)."""
    import gguf

    rng = np.random.default_rng(0)
    E, L, H, KV, D, X, K, F = 64, 1, 4, 2, 16, 4, 2, 32
    tokens = [chr(0x100 + i) if i < 33 or 126 < i < 161 or i == 173 else chr(i) for i in range(256)]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(512)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_expert_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    if expert_count:
        w.add_expert_count(X)
    w.add_expert_used_count(K)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["a b"])
    V = len(tokens)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(V, E))
    w.add_tensor("output_norm.weight", np.ones(E, np.float32))
    w.add_tensor("output.weight", rand(V, E))
    for name, shape in [("attn_norm", (E,)), ("attn_q", (H * D, E)), ("attn_k", (KV * D, E)), ("attn_v", (KV * D, E)),
                        ("attn_output", (E, H * D)), ("attn_q_norm", (H * D,)), ("attn_k_norm", (KV * D,)),
                        ("ffn_norm", (E,)), ("ffn_gate_inp", (X, E)), ("ffn_gate_exps", (X, F, E)),
                        ("ffn_up_exps", (X, F, E)), ("ffn_down_exps", (X, E, F))]:
        w.add_tensor(f"blk.0.{name}.weight", rand(*shape))
    w.add_tensor("blk.0.exp_probs_b.bias", np.zeros(X, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf():
    from ktutorial import tiny

    return tiny.ensure(0).gguf_path


@pytest.fixture(scope="class")
def shared(tiny_gguf):
    """One llama.cpp server on the tiny model for the tests (of one class) that need one running."""
    with server.serve("tiny") as srv:
        yield srv
    assert gone(srv.pid)
    assert server.running() == []


# ---- one server shared by a class of tests ----------------------------------------------------------


class TestSharedServer:
    """Tests that only need a server running (one, started once for the class)."""

    def test_serve_records_run_state_and_answers(self, shared):
        assert shared.base_url.startswith("http://127.0.0.1:")
        assert shared.model == "ktutorial-tiny" and shared.engine == "llamacpp"
        state = json.loads((paths.run_dir() / f"server-{shared.pid}.json").read_text())
        for key in ("pid", "pgid", "engine", "base_url", "model", "profile", "log_path", "started_utc", "create_time"):
            assert state[key] not in (None, ""), key
        assert state["pgid"] == shared.pid  # its own process group
        assert os.getpgid(shared.pid) == shared.pid != os.getpgid(0)
        assert state["profile"] == "tiny"
        assert Path(state["log_path"]).read_text().startswith("# ktutorial: ")
        assert "--jinja" in state["command"] and "ktutorial-tiny" in state["command"]

        assert [e["pid"] for e in server.running()] == [shared.pid]
        assert server.current_base_url() == shared.base_url
        found = server.find_running("tiny")
        assert found is not None and found.pid == shared.pid and found.model == "ktutorial-tiny"
        assert server.find_running("minimax-m2.1") is None
        assert shared.ready()

    def test_status_cli_lists_the_server(self, shared):
        out = run_cli("status", "--json")
        assert out.returncode == 0, out.stderr
        [entry] = json.loads(out.stdout)
        assert entry["pid"] == shared.pid and entry["base_url"] == shared.base_url and entry["engine"] == "llamacpp"

    def test_reuse_returns_the_running_server(self, shared):
        before = children()
        again = server.serve("tiny", reuse=True)
        assert again.pid == shared.pid and again.base_url == shared.base_url
        assert children() == before  # nothing new started

    def test_busy_port_is_refused_naming_the_holder(self, shared):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            before = children()
            with pytest.raises(UserError) as err:
                server.serve("tiny", port)
            assert f"port {port} on 127.0.0.1 is in use" in str(err.value)
            assert f"pid {os.getpid()}" in str(err.value)  # psutil found who holds it: this test
            assert "--port" in str(err.value)
            assert children() == before
        with pytest.raises(UserError, match=r"in use by a ktutorial llamacpp server \(pid %d" % shared.pid):
            server.serve("tiny", shared.port)


# ---- commands and settings ----------------------------------------------------------------------


def test_dry_run_prints_the_validated_llamacpp_command(tiny_gguf):
    out = run_cli("serve", "--profile", "tiny", "--dry-run", "--port", "8765", "--json")
    assert out.returncode == 0, out.stderr
    launch = json.loads(out.stdout)
    cmd = launch["command"]
    assert cmd[1:3] == ["-m", "ktutorial.engines.llamacpp"]
    assert cmd[cmd.index("--model") + 1] == str(tiny_gguf)
    assert cmd[cmd.index("--alias") + 1] == "ktutorial-tiny"
    assert cmd[cmd.index("--port") + 1] == "8765" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--jinja" in cmd


def test_expert_offload_flags_render_and_start(tiny_gguf, tmp_path):
    cfg = llamacpp.LlamaCppConfig(model_path=tiny_gguf, port=1234, n_cpu_moe=2, override_tensor=["output=CPU"])
    assert cfg.tensor_overrides() == ["output=CPU", r"blk\.0\.ffn_(up|down|gate)_exps=CPU", r"blk\.1\.ffn_(up|down|gate)_exps=CPU"]
    assert cfg.flags()[-4:] == ["--n-cpu-moe", "2", "--override-tensor", "output=CPU"]
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    launch = server.llamacpp_launch(tiny_gguf, "x", 1234, llama_server=str(binary), cpu_moe=True, n_gpu_layers=99,
                                    op_offload=False, dry_run=True)
    assert launch.command[0] == str(binary)
    assert "--cpu-moe" in launch.command and "--no-op-offload" in launch.command
    assert launch.command[launch.command.index("--n-gpu-layers") + 1] == "99"
    with pytest.raises(UserError, match="not found or not executable"):
        server.llamacpp_launch(tiny_gguf, "x", llama_server=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not both"):
        server.llamacpp_launch(tiny_gguf, "x", cpu_moe=True, n_cpu_moe=1)
    # xllamacpp takes the expert override: the server starts and answers with experts pinned to the CPU
    with server.Server(server.llamacpp_launch(tiny_gguf, "pinned", cpu_moe=True, op_offload=False,
                                              ctx_size=512)) as srv:
        assert srv.ready()
        # llama.cpp saw the override (it warns about overrides with mmap)
        assert "tensor overrides to CPU are used" in srv.log_tail(400)
        reply = client.chat(srv.base_url, "pinned", "hi", max_tokens=4)
        assert reply.usage["completion_tokens"] == 4
    assert gone(srv.pid)


# ---- faults -----------------------------------------------------------------------------------------------




def test_missing_model_is_refused_before_launch(tmp_path):
    before = children()
    with pytest.raises(UserError, match="GGUF model not found"):
        server.llamacpp_launch(tmp_path / "missing.gguf", "x")
    assert children() == before


@pytest.mark.parametrize(
    "kind, diagnosis, evidence",
    [
        ("not-gguf", "gguf-load", "invalid magic characters"),
        ("no-expert-count", "gguf-load", "GGML_ASSERT"),
        ("unknown-arch", "unknown-arch", "unknown model architecture"),
    ],
)
def test_bad_model_fails_fast_with_diagnosis_and_no_process(tmp_path, kind, diagnosis, evidence):
    path = tmp_path / "model.gguf"
    if kind == "not-gguf":
        path.write_text("this is not a GGUF file\n" * 10)
    else:
        write_broken_gguf(path, arch="nonsense-arch" if kind == "unknown-arch" else "minimax-m2",
                          expert_count=kind != "no-expert-count")
    launch = server.llamacpp_launch(path, "broken")
    t0 = time.monotonic()
    with pytest.raises(server.ServerStartError) as err:
        server.Server(launch).start()
    assert time.monotonic() - t0 < 30  # fails fast, long before the readiness timeout
    exc = err.value
    assert [d.id for d in exc.diagnoses][:1] == [diagnosis]
    assert evidence in exc.diagnoses[0].evidence
    assert "before it was ready" in str(exc) and "Diagnosis:" in str(exc) and evidence in exc.log_tail
    if kind == "no-expert-count":
        assert exc.returncode == -signal.SIGABRT  # llama.cpp aborted the child, not us
        assert "gdb" not in exc.log_tail.lower()  # GGML_NO_BACKTRACE kept the backtrace out
    assert not list(paths.run_dir().glob("server-*.json")) or all(
        json.loads(p.read_text())["model"] != "broken" for p in paths.run_dir().glob("server-*.json")
    )
    assert not [p for p in psutil.Process().children(recursive=True) if "broken" in " ".join(p.cmdline())]


def test_readiness_timeout_stops_the_whole_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('still loading the model...', flush=True)\n"
        "time.sleep(120)\n"
    )
    launch = server.Launch(engine="llamacpp", command=[sys.executable, "-c", script], model="never",
                           port=server.free_port(), ready_timeout_s=2.0)
    srv = server.Server(launch)
    t0 = time.monotonic()
    with pytest.raises(server.ServerStartError, match="not ready within 2 s") as err:
        srv.start()
    assert time.monotonic() - t0 < 20
    assert "still loading the model..." in err.value.log_tail
    assert gone(srv.pid)
    assert gone(int(pid_file.read_text()))  # the grandchild went with its group
    assert not (paths.run_dir() / f"server-{srv.pid}.json").exists()


def test_server_killed_during_a_streamed_request_errors_within_seconds(tiny_gguf):
    srv = server.Server(server.llamacpp_launch(tiny_gguf, "victim", ctx_size=4096)).start()
    try:
        events = client.stream_chat(srv.base_url, "victim", "tell me everything", max_tokens=3000,
                                    extra_body={"ignore_eos": True})
        pieces = 0
        with pytest.raises(client.ServerError, match="closed the connection mid-reply") as err:
            for ev in events:
                if ev.kind in ("reasoning", "content"):
                    pieces += 1
                    if pieces == 3:
                        killed_at = time.monotonic()
                        os.killpg(srv.pgid, signal.SIGKILL)
        assert pieces >= 3
        assert time.monotonic() - killed_at < 10  # no hang
        assert "ktutorial status" in str(err.value)
        # a new request to the dead server fails in seconds too
        t0 = time.monotonic()
        with pytest.raises(client.ServerError, match="cannot reach the server"):
            client.chat(srv.base_url, "victim", "hello?", max_tokens=4)
        assert time.monotonic() - t0 < 10
    finally:
        srv.stop()
    assert gone(srv.pid)
    assert not (paths.run_dir() / f"server-{srv.pid}.json").exists()


def test_server_started_by_a_process_that_exits_is_stopped_at_exit(tiny_gguf):
    script = (
        "from ktutorial import server\n"
        f"s = server.Server(server.llamacpp_launch({str(tiny_gguf)!r}, 'atexit', ctx_size=512)).start()\n"
        "print(s.pid, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[-1])
    assert gone(pid)
    assert not (paths.run_dir() / f"server-{pid}.json").exists()


def test_stop_all_finds_a_server_whose_starting_process_was_killed(tiny_gguf):
    # A notebook kernel that dies hard (SIGKILL) runs no cleanup: its server lives on.
    script = (
        "import time\n"
        "from ktutorial import server\n"
        f"s = server.Server(server.llamacpp_launch({str(tiny_gguf)!r}, 'orphan', ctx_size=512)).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    kernel = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(kernel.stdout.readline())
    finally:
        kernel.kill()
        kernel.wait()
    assert not gone(pid, wait_s=0.5)  # orphaned, still serving
    assert pid in [e["pid"] for e in server.running()]
    out = run_cli("stop", "--all")
    assert out.returncode == 0, out.stderr
    assert f"stopped llamacpp pid {pid}" in out.stdout
    assert gone(pid)
    assert pid not in [e["pid"] for e in server.running()]


def test_stop_never_signals_a_process_that_reused_the_pid(tmp_path):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        entry = {"pid": victim.pid, "pgid": victim.pid, "create_time": psutil.Process(victim.pid).create_time() - 1000,
                 "engine": "llamacpp", "base_url": "http://127.0.0.1:9", "host": "127.0.0.1", "port": 9,
                 "model": "old", "profile": "tiny", "log_path": None, "started_utc": "2020-01-01T00:00:00Z"}
        state = paths.run_dir() / f"server-{victim.pid}.json"
        state.write_text(json.dumps(entry))
        server.Server.attach(entry).stop(grace_s=0.5)
        assert victim.poll() is None  # untouched
        assert victim.pid not in [e["pid"] for e in server.running()]
        assert not state.exists()  # the stale record is gone
    finally:
        victim.kill()
        victim.wait()


def test_stop_with_nothing_running_and_chat_without_a_server():
    for entry in server.running():  # other tests' servers are stopped by now
        pytest.fail(f"a server is still running: {entry}")
    out = run_cli("stop")
    assert out.returncode == 0 and "no running server" in out.stdout
    out = run_cli("chat", "hello")
    assert out.returncode == 2
    assert "no running server: start one with `ktutorial serve --profile tiny --detach`" in out.stderr


# ---- the Done-when flow ------------------------------------------------------------------------------


def test_cli_serve_detach_chat_anthropic_stop(tiny_gguf):
    out = run_cli("serve", "--profile", "tiny", "--detach", "--json")
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    pid = state["pid"]
    try:
        assert not gone(pid, wait_s=0.2)  # outlived the command that started it
        assert pid in [e["pid"] for e in server.running()]

        from ktutorial import tiny

        for api in ([], ["--anthropic"]):
            out = run_cli("chat", *api, "hello", "--max-tokens", "64")
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines() == [tiny.REASONING_TEXT["plain"], tiny.ANSWER_TEXT["plain"]]
    finally:
        out = run_cli("stop")
    assert out.returncode == 0, out.stderr
    assert f"stopped llamacpp pid {pid}" in out.stdout
    assert gone(pid)
    assert server.running() == []


# ---- SGLang + KT: rendered for a described machine, refused before launch here -----------------------

DESCRIBED = ["--gpu", "RTX 5090:32", "--gpus", "2", "--ram-gb", "1024", "--cpu-cores", "64", "--numa-nodes", "2",
             "--cpu-flags", "avx2,avx512f,avx512bw,avx512_vnni,avx512_vbmi,avx512_bf16"]


def test_minimax_dry_run_prints_a_command_sglang_kt_parser_accepts():
    out = run_cli("serve", "--profile", "minimax-m2.1", "--dry-run", "--json", *DESCRIBED)
    assert out.returncode == 0, out.stderr
    launch = json.loads(out.stdout)
    cmd = launch["command"]
    assert launch["engine"] == "sglang-kt" and launch["model"] == "MiniMax-M2.1"
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flag = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert flag("--kt-method") == "FP8"
    assert flag("--tool-call-parser") == "minimax-m2"
    assert flag("--reasoning-parser").startswith("minimax")
    assert flag("--host") == "127.0.0.1" and flag("--port") == "30000"
    assert flag("--max-total-tokens") == "80000"  # the profile's context goal
    assert int(flag("--kt-num-gpu-experts")) > 0
    assert launch["plan"]["verdict"] == "fits"
    assert launch["shell"].startswith("OMP_WAIT_POLICY=PASSIVE python -m sglang.launch_server --model-path ~/")
    from ktutorial.engines import sglang_kt
    from ktutorial.errors import MissingDependency

    try:
        parsed = sglang_kt.check_with_real_parser([cmd])
    except MissingDependency:
        pytest.skip("sglang-kt's parser venv is not built (make sglang-parser-env)")
    [result] = parsed["results"]
    assert result["ok"], result
    assert result["values"]["kt_method"] == "FP8" and result["values"]["port"] == 30000


def test_minimax_launch_is_refused_before_starting_anything_here():
    before = children()
    options = {"gpu": "RTX 5090:32", "gpus": 2, "ram_gb": 1024, "cpu_cores": 64}
    with pytest.raises(UserError, match=r"model folder .*MiniMax-M2.1 not found: fetch it with `ktutorial download"):
        server.serve("minimax-m2.1", plan_options=options)
    with pytest.raises(UserError, match="plan options .* apply to SGLang"):
        server.serve("tiny", plan_options={"gpu": "RTX 5090:32"})
    assert children() == before


# ---- the command line around a server -----------------------------------------------------------------


def test_foreground_serve_stops_its_server_on_ctrl_c(tiny_model):
    proc = subprocess.Popen([KTUTORIAL, "serve", "--profile", "tiny", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # the state JSON, then it serves until interrupted
            lines.append(line)
            if line.rstrip() == "}":
                break
        state = json.loads("".join(lines))
        assert server.Server.attach(state).ready()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert f"stopped llamacpp pid {state['pid']}" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert gone(state["pid"])
    assert server.running() == []


def test_cli_shows_the_diagnosis_of_a_bad_model_and_leaves_nothing(tmp_path):
    bad = write_broken_gguf(tmp_path / "bad.gguf", arch="nonsense-arch")
    profile = tmp_path / "bad.yaml"
    profile.write_text(
        "name: bad\nmodel: bad\nengine: llamacpp\nserved_model_name: bad\n"
        f"model_dir: {bad}\nbench: {{input_lens: [8], output_len: 4}}\n"
    )
    out = run_cli("serve", "--profile", str(profile), "--detach")
    assert out.returncode == 2
    assert "error: the llamacpp server exited (code 1) before it was ready" in out.stderr
    assert "Unknown model architecture: this llama.cpp build does not know the architecture nonsense-arch" in out.stderr
    assert "pip install -U xllamacpp" in out.stderr
    assert "Traceback" not in out.stderr
    assert server.running() == []
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(bad) in " ".join(p.info["cmdline"] or [])]


def test_stop_picks_one_of_several_servers(tiny_model):
    first = server.serve("tiny", ctx_size=512)
    second = server.serve("tiny", ctx_size=512)
    try:
        out = run_cli("stop")
        assert out.returncode == 2
        assert "2 servers are running" in out.stderr and "pass --all, --pid or --port" in out.stderr
        out = run_cli("stop", "--port", str(second.port))
        assert out.returncode == 0 and f"stopped llamacpp pid {second.pid}" in out.stdout
        assert gone(second.pid) and first.is_alive()
        [entry] = server.running()
        assert entry["pid"] == first.pid
        server.stop(entry)  # as notebooks.py ends the server notebook 02 left
        assert gone(first.pid) and server.running() == []
    finally:
        first.stop()
        second.stop()
    assert gone(first.pid)


def test_sigterm_to_the_starting_process_stops_its_server(tiny_model):
    """A notebook kernel or script ended by SIGTERM must not orphan the server it started."""
    import signal
    import subprocess
    import sys

    import psutil

    code = (
        "from ktutorial import server, tiny\n"
        "m = tiny.ensure()\n"
        "srv = server.Server(server.llamacpp_launch(m.gguf_path, 'sigterm-test')).start()\n"
        "print(srv.pid, flush=True)\n"
        "import time; time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert psutil.pid_exists(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline:
            if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"llama.cpp child {pid} outlived its parent's SIGTERM")
    finally:
        proc.kill()
