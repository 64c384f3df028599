"""Claude Code on the local backend: settings, the smoke test and one real `claude -p` turn, all
against llama.cpp serving the tiny model; plus the failure paths (dead backend, missing CLI) and a
scan that the token never leaks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktutorial import claude_code as cc
from ktutorial.errors import MissingDependency, UserError

REPO = Path(__file__).resolve().parents[1]
# Recognisable, so a scan can find it anywhere it leaks.
FAKE_TOKEN = "ktutorial-fake-token-7f3a9c1e5b"
# Claude Code's full first request is ~77 KB: ~45k tokens of the tiny model's byte-level vocabulary.
CTX_TOKENS = 65536
# Its full request takes minutes to prefill on two CPU cores; with two tools (Bash, and Agent, which
# brings the mid-conversation `role: system` message) and a short system prompt it is ~4k tokens,
# same shape (streamed, thinking, tools, system blocks), seconds.
SMALL = {"tools": ["Bash", "Agent"], "system_prompt": "You are a terse coding agent."}
SMALL_CLI = ["--tools", "Bash,Agent", "--system-prompt", "You are a terse coding agent."]


def _cli(*args: str, env: dict | None = None, cwd=None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ktutorial.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ), cwd=cwd,
    )


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- settings (no server) ---------------------------------------------------------------

def test_claude_env_has_every_key_and_defaults(monkeypatch):
    for name in cc.TOKEN_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    env = cc.claude_env("http://127.0.0.1:8080/v1/", "ktutorial-tiny")
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8080"  # /v1 would make /v1/v1/messages
    assert env["ANTHROPIC_AUTH_TOKEN"] == cc.PLACEHOLDER_TOKEN
    for slot in ("ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL",
                 "ANTHROPIC_DEFAULT_HAIKU_MODEL"):
        assert env[slot] == "ktutorial-tiny"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert env["DISABLE_AUTOUPDATER"] == "1"
    assert 0 < int(env["CLAUDE_CODE_MAX_RETRIES"]) <= 3
    assert int(env["API_TIMEOUT_MS"]) >= 600_000


def test_token_comes_from_the_environment_and_is_masked(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("KTUTORIAL_API_KEY", FAKE_TOKEN)
    token, source = cc.resolve_token()
    assert (token, source) == (FAKE_TOKEN, "KTUTORIAL_API_KEY")
    env = cc.claude_env("http://127.0.0.1:8080", "m")
    assert env["ANTHROPIC_AUTH_TOKEN"] == FAKE_TOKEN
    exports = cc.shell_exports(env, token_source=source)
    assert FAKE_TOKEN not in exports
    assert 'export ANTHROPIC_AUTH_TOKEN="${KTUTORIAL_API_KEY}"' in exports  # still works when pasted
    assert FAKE_TOKEN not in json.dumps(cc.masked_env(env, source))
    assert FAKE_TOKEN in cc.shell_exports(env, show_token=True, token_source=source)


@pytest.mark.parametrize("url", ["", "127.0.0.1:8080", "ftp://x", "http://"])
def test_bad_base_url_is_refused(url):
    with pytest.raises(UserError, match="base URL"):
        cc.claude_env(url, "m")


def test_project_settings_merge_and_keep_other_keys(tmp_path):
    path = tmp_path / ".claude" / "settings.local.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"permissions": {"allow": ["Bash(ls)"]}, "env": {"KEEP_ME": "1"}}))
    env = cc.claude_env("http://127.0.0.1:8080", "ktutorial-tiny", "tok")
    written = cc.write_settings(env, project_dir=tmp_path)
    assert written.path == path and written.backup is None
    data = json.loads(path.read_text())
    assert data["permissions"] == {"allow": ["Bash(ls)"]}
    assert data["env"]["KEEP_ME"] == "1"
    assert data["env"]["ANTHROPIC_MODEL"] == "ktutorial-tiny"
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # it may hold a token


def test_settings_refuse_to_clobber_bad_json(tmp_path):
    path = tmp_path / ".claude" / "settings.local.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        cc.write_settings({"A": "1"}, project_dir=tmp_path)
    assert path.read_text() == "{not json"


def test_global_settings_untouched_without_force_backed_up_with_it(tmp_path):
    home = tmp_path / "home"
    user_file = home / ".claude" / "settings.json"
    user_file.parent.mkdir(parents=True)
    original = json.dumps({"theme": "dark", "env": {"FOO": "1"}}, indent=1)
    user_file.write_text(original)
    env = {k: v for k, v in os.environ.items() if k not in ("CLAUDE_CONFIG_DIR", *cc.TOKEN_ENV_VARS)}
    env.update(HOME=str(home), KTUTORIAL_API_KEY=FAKE_TOKEN)
    args = ["claude-code", "settings", "--base-url", "http://127.0.0.1:8080", "--model", "m", "--global"]

    refused = _cli(*args, env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--force" in refused.stderr
    assert user_file.read_text() == original
    assert sorted(p.name for p in user_file.parent.iterdir()) == ["settings.json"]

    done = _cli(*args, "--force", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    backups = [p for p in user_file.parent.iterdir() if p.name != "settings.json"]
    assert len(backups) == 1 and backups[0].read_text() == original
    data = json.loads(user_file.read_text())
    assert data["theme"] == "dark" and data["env"]["FOO"] == "1"
    assert data["env"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8080"
    assert data["env"]["ANTHROPIC_AUTH_TOKEN"] == FAKE_TOKEN  # the file asked for
    assert FAKE_TOKEN not in done.stdout + done.stderr


def test_router_config_file_matches_the_code():
    on_disk = json.loads((REPO / "docs" / "claude-code-router.json").read_text())
    assert on_disk == cc.router_config()
    assert on_disk["Providers"][0]["api_base_url"].endswith("/v1/chat/completions")


def test_backend_docs_name_both_backends_and_their_flags():
    text = cc.backend_docs()
    for needle in ("--tool-call-parser minimax-m2", "--reasoning-parser minimax-append-think",
                   "ktutorial serve --profile tiny --detach", "llama-server", "--jinja",
                   "ANTHROPIC_BASE_URL", "ktutorial claude-code check", "claude-code-router",
                   '"api_base_url"', cc.CLAUDE_CODE_VERSION,
                   # SGLang-kt 0.7.2 refuses Claude Code's `role: system` entry: the docs send it through the proxy.
                   "ktutorial claude-code proxy --base-url http://127.0.0.1:30000 --detach",
                   "settings --via-proxy", "check --via-proxy", "python -m ktutorial.ccproxy --upstream",
                   "ANTHROPIC_BASE_URL=http://127.0.0.1:3457"):
        assert needle in text, needle


def test_backend_docs_print_a_rendered_sglang_command_pasteable():
    rendered = [sys.executable, "-m", "sglang.launch_server", "--model-path", "~/models/MiniMax-M2.1",
                "--kt-method", "FP8", "--tool-call-parser", "minimax-m2", "--port", "30000"]
    text = cc.backend_docs(sglang_command=rendered)
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.startswith("python -m sglang.launch_server \\\n")
    assert sys.executable not in text  # no path of this machine
    assert "--model-path ~/models/MiniMax-M2.1 \\\n" in block  # ~ left for the shell to expand
    assert block.count("--tool-call-parser") == 1  # not added twice
    assert "--reasoning-parser minimax-append-think" in block  # added where missing


def test_missing_cli_says_how_to_install(monkeypatch):
    monkeypatch.setattr(cc, "_local_candidates", lambda: [])
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingDependency) as info:
        cc.claude_binary()
    assert "make tools" in str(info.value) and "npm install" in str(info.value)


def test_cli_run_fails_fast_on_a_dead_port():
    url = f"http://127.0.0.1:{_dead_port()}"
    start = time.monotonic()
    out = _cli("claude-code", "run", "hello", "--base-url", url, "--model", "m", timeout=60)
    assert time.monotonic() - start < 15
    assert out.returncode == 2
    assert url in out.stderr and "ktutorial serve --profile tiny --detach" in out.stderr


def test_check_on_a_dead_port_reports_each_item_not_run():
    results = cc.check(f"http://127.0.0.1:{_dead_port()}", "m", timeout_s=5)
    assert [r.name for r in results] == list(cc.CHECK_NAMES)
    assert not any(r.ok for r in results)
    assert "ktutorial serve --profile tiny --detach" in results[0].fix
    assert results[0].detail.startswith("no backend answers at http://127.0.0.1:")


# ---- against llama.cpp on the tiny model ------------------------------------------------

@pytest.fixture(scope="module")
def token_env():
    """A fake token in the environment for the whole module, as a reader would export it."""
    saved = {k: os.environ.get(k) for k in cc.TOKEN_ENV_VARS}
    os.environ.pop("ANTHROPIC_AUTH_TOKEN", None)
    os.environ["KTUTORIAL_API_KEY"] = FAKE_TOKEN
    yield FAKE_TOKEN
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def backend(tiny_model, token_env):
    from ktutorial import server

    with server.serve("tiny", ctx_size=CTX_TOKENS) as srv:
        yield srv
    assert not srv.is_alive()


def test_smoke_test_passes_every_item_on_llamacpp(backend):
    results = cc.check(backend.base_url, backend.model, timeout_s=120)
    failed = [f"{r.name}: {r.detail} -> {r.fix}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert [r.name for r in results] == list(cc.CHECK_NAMES)
    by_name = {r.name: r for r in results}
    assert all(r.elapsed_s < 60 for r in results)
    assert "Bash" in by_name["tool_use: a tool call comes back as a block"].detail
    assert "thinking block" in by_name["thinking"].detail


def test_one_real_claude_turn(backend, tmp_path):
    cc.claude_binary()  # fails with the install hint if `make tools` was not run
    from ktutorial import tiny

    result = cc.run(
        "Run `echo ktutorial` and tell me what it printed.",
        backend.base_url,
        backend.model,
        timeout_s=90,
        allowed_tools=["Bash(echo ktutorial)"],
        state_dir=tmp_path / "state",
        **SMALL,
    )
    assert result.ok and result.exit_code == 0
    assert result.result.strip() == tiny.ANSWER_TEXT["result"]  # the answer after a tool result
    assert result.wall_s < 60
    assert result.claude_version == cc.CLAUDE_CODE_VERSION
    assert result.num_turns == 2  # the Bash call, then the answer
    # Nothing of that run is left: no process carries its config folder in its environment.
    import psutil

    for proc in psutil.process_iter():
        try:
            assert proc.environ().get("CLAUDE_CONFIG_DIR") != str(tmp_path / "state"), proc
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    # Claude Code really ran the command the model asked for and sent its output back.
    assert result.tool_calls == [
        {"name": "Bash", "input": {"command": "echo ktutorial"}, "output": "ktutorial", "is_error": False}
    ]


def test_cli_defaults_to_the_running_server_and_leaks_no_token(backend, tmp_path):
    """settings / check / run through the CLI, then a scan of every output, the server log, the
    files ktutorial and Claude Code wrote, and HOME: the token is only in the settings file asked for."""
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    user_settings = home / ".claude" / "settings.json"
    user_settings.write_text('{"theme": "light"}')
    project = tmp_path / "project"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CLAUDE_CONFIG_DIR"}
    env.update(HOME=str(home))
    outputs = []
    for args in (
        ["claude-code", "settings"],
        ["claude-code", "settings", "--json"],
        ["claude-code", "settings", "--write"],
        ["claude-code", "check", "--json", "--timeout-s", "120"],
        ["claude-code", "run", "Say hello.", "--json", "--timeout-s", "90", *SMALL_CLI],
    ):
        out = _cli(*args, env=env, cwd=project)
        outputs.append(out.stdout + out.stderr)
        assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
    # No --base-url: the running server was found.
    assert backend.base_url in outputs[0] and backend.model in outputs[0]
    run_result = json.loads(outputs[-1][outputs[-1].index("{"):])
    assert run_result["ok"] and run_result["result"].strip()

    # What Claude Code itself writes (its config folder, session transcripts), kept for the scan.
    direct = cc.run("Say hello.", timeout_s=90, state_dir=tmp_path / "claude-state", **SMALL)
    assert direct.ok and (tmp_path / "claude-state").is_dir()

    asked_for = project / ".claude" / "settings.local.json"
    assert FAKE_TOKEN in asked_for.read_text()
    assert json.loads(user_settings.read_text()) == {"theme": "light"}

    scanned = []
    for text in outputs:
        assert FAKE_TOKEN not in text
    roots = [Path(os.environ["KTUTORIAL_HOME"]), project, home, tmp_path]
    if backend.log_path:
        scanned.append(Path(backend.log_path))
    for root in roots:
        scanned += [p for p in root.rglob("*") if p.is_file()]
    assert Path(backend.log_path).stat().st_size > 0
    for path in set(scanned):
        if path == asked_for:
            continue
        assert FAKE_TOKEN.encode() not in path.read_bytes(), f"token leaked into {path}"


def test_cli_run_fails_fast_when_the_backend_is_stopped(tiny_model, token_env):
    from ktutorial import server

    with server.serve("tiny", ctx_size=4096) as srv:
        url = srv.base_url
        # While it runs: Claude Code's full request does not fit 4096 tokens, and the error says so.
        with pytest.raises(cc.ClaudeCodeError, match="exceeds the available context") as info:
            cc.run("Say hello.", url, srv.model, timeout_s=60)
        assert "--tools Bash" in str(info.value) and info.value.run_result.exit_code == 1
    start = time.monotonic()
    out = _cli("claude-code", "run", "hello", "--base-url", url, "--model", srv.model, timeout=60)
    elapsed_s = time.monotonic() - start
    assert elapsed_s < 15, elapsed_s
    assert out.returncode == 2
    assert url in out.stderr and "ktutorial serve --profile tiny --detach" in out.stderr
    assert FAKE_TOKEN not in out.stdout + out.stderr


def test_run_timeout_kills_the_cli_and_says_why(tiny_model, token_env, tmp_path):
    import psutil

    from ktutorial import server

    # Its own server: the abandoned request keeps llama.cpp busy until the server stops.
    with server.serve("tiny", ctx_size=CTX_TOKENS) as srv:
        start = time.monotonic()
        # The full Claude Code request (~45k tokens) takes the tiny model far longer than 3 s to prefill.
        with pytest.raises(cc.ClaudeCodeError, match="did not finish within 3 s") as info:
            cc.run("Say hello.", srv.base_url, srv.model, timeout_s=3, state_dir=tmp_path / "state")
        assert time.monotonic() - start < 15
    assert "ktutorial claude-code check" in str(info.value)
    for proc in psutil.process_iter():
        try:
            assert proc.environ().get("CLAUDE_CONFIG_DIR") != str(tmp_path / "state"), proc
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue


def test_check_out_writes_one_stamped_record_per_item_and_no_token(backend, tmp_path):
    from ktutorial import results
    from ktutorial.cli import main

    out = tmp_path / "cc.jsonl"
    assert main(["claude-code", "check", "--base-url", backend.base_url, "--out", str(out)]) == 0
    recs = results.load_records(out)
    assert [r["params"]["item"] for r in recs] == list(cc.CHECK_NAMES)
    assert all(r["metrics"]["ok"] and r["params"]["via_proxy"] is False for r in recs)
    assert {r["env"]["engine"] for r in recs} == {"llamacpp"}
    assert FAKE_TOKEN not in out.read_text()
    assert cc.needs_proxy("sglang-kt") and not cc.needs_proxy("llamacpp")
