"""ccproxy.py: the transform (pure), sglang-kt 0.7.2's own request models over every request
`claude_code.check` and a real Claude Code turn send, and the proxy itself: in front of llama.cpp on
the tiny model (pass-through, streaming, errors, the lifecycle, check and a real turn through it)
and in front of a small stdlib upstream that records what reached it and paces its SSE events."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from ktutorial import ccproxy, server
from ktutorial import claude_code as cc
from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError

FAKE_TOKEN = "ktutorial-fake-token-ccproxy-42d1"
# Claude Code with only these tools and a short system prompt: the same request shape (the Agent
# tool brings the `role: system` entry), a few thousand tokens, seconds on the tiny model.
SMALL = {"tools": ["Bash", "Agent"], "system_prompt": "You are a terse coding agent."}


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktutorial.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def _sse_events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: {")]


# ---- the transform -----------------------------------------------------------------------------

MID = {"role": "system", "content": "Sub-agents may use Bash."}


def test_fold_appends_to_blocks_in_order_and_keeps_block_form():
    body = {
        "model": "m", "max_tokens": 8,
        "system": [{"type": "text", "text": "Base.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}, MID,
                     {"role": "assistant", "content": "ok"},
                     {"role": "system", "content": [{"type": "text", "text": "Second."}]}],
    }
    before = json.dumps(body)
    out = ccproxy.fold_system_messages(body)
    assert json.dumps(body) == before  # the argument is not changed
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]
    assert out["system"] == [
        {"type": "text", "text": "Base.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Sub-agents may use Bash."},
        {"type": "text", "text": "Second."},
    ]
    assert {k: v for k, v in out.items() if k not in ("system", "messages")} == {"model": "m", "max_tokens": 8}


def test_fold_into_a_string_or_no_system():
    as_string = ccproxy.fold_system_messages({"system": "Base.", "messages": [MID, {"role": "user", "content": "hi"}]})
    assert as_string == {"system": "Base.\n\nSub-agents may use Bash.", "messages": [{"role": "user", "content": "hi"}]}
    none = ccproxy.fold_system_messages({"messages": [{"role": "user", "content": "hi"}, MID]})
    assert none["system"] == "Sub-agents may use Bash."
    blocks = ccproxy.fold_system_messages(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": [{"type": "text", "text": "X"}]}]})
    assert blocks["system"] == [{"type": "text", "text": "X"}]


def test_bodies_without_a_system_entry_and_other_routes_pass_byte_for_byte():
    plain = {"system": "s", "messages": [{"role": "user", "content": "hi"}]}
    assert ccproxy.fold_system_messages(plain) is plain
    raw = json.dumps({"messages": [MID, {"role": "user", "content": "hi"}]}).encode()
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/messages"), ("POST", "/v1/models")):
        assert ccproxy.rewrite_request(method, path, raw) == (raw, 0)
    assert ccproxy.rewrite_request("POST", "/v1/messages", b"{not json") == (b"{not json", 0)
    spaced = b'{ "messages" : [ {"role": "user", "content": "hi"} ] }'
    assert ccproxy.rewrite_request("POST", "/v1/messages?beta=true", spaced) == (spaced, 0)
    for path in ("/v1/messages?beta=true", "/v1/messages/count_tokens?beta=true"):
        body, folded = ccproxy.rewrite_request("POST", path, raw)
        assert folded == 1 and json.loads(body) == {"messages": [{"role": "user", "content": "hi"}],
                                                     "system": "Sub-agents may use Bash."}


# ---- a stdlib upstream that records what reaches it and paces its SSE events -------------------

PACE_S = 0.3


class _Recorder(BaseHTTPRequestHandler):
    # HTTP/1.0: the streamed reply ends when the connection closes (the proxy re-frames it).
    def do_GET(self):
        self._record(b"")
        if self.path == "/v1/models":
            self._json(200, {"data": [{"id": "recorded"}]})
        elif self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(418, {"error": {"message": "a teapot, on purpose"}})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._record(body)
        if not self.path.startswith("/v1/messages"):
            self._json(418, {"error": {"message": "a teapot, on purpose"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(4):
            self.wfile.write(f"event: ping\ndata: {json.dumps({'type': 'ping', 'i': i})}\n\n".encode())
            self.wfile.flush()
            self.server.sent_at.append(time.monotonic())
            time.sleep(PACE_S)

    def _record(self, body: bytes):
        self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                                 "body": body})

    def _json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def recorder():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    httpd.seen, httpd.sent_at = [], []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def proxy_to_recorder(recorder):
    """The real proxy, a child process started through server.py's lifecycle."""
    with ccproxy.serve(recorder.url) as proxy:
        yield proxy
    assert not proxy.is_alive()


def test_upstream_gets_the_token_and_no_role_system(recorder, proxy_to_recorder):
    body = {"model": "recorded", "max_tokens": 8, "stream": True, "system": [{"type": "text", "text": "Base."}],
            "messages": [{"role": "user", "content": "hi"}, MID]}
    headers = {"Authorization": f"Bearer {FAKE_TOKEN}", "x-api-key": FAKE_TOKEN, "anthropic-beta": "b1,b2"}
    reply = httpx.post(f"{proxy_to_recorder.base_url}/v1/messages?beta=true", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200
    got = [s for s in recorder.seen if s["method"] == "POST"][-1]
    assert got["path"] == "/v1/messages?beta=true"
    sent = {k.lower(): v for k, v in got["headers"].items()}
    assert sent["authorization"] == f"Bearer {FAKE_TOKEN}" and sent["x-api-key"] == FAKE_TOKEN
    assert sent["anthropic-beta"] == "b1,b2"
    received = json.loads(got["body"])
    assert all(m["role"] != "system" for m in received["messages"])
    assert received["system"] == [{"type": "text", "text": "Base."}, {"type": "text", "text": MID["content"]}]
    # The token went to the upstream and nowhere else: not into the proxy's log.
    log = Path(proxy_to_recorder.log_path).read_text()
    assert "folded 1 role:system" in log and FAKE_TOKEN not in log


def test_sse_arrives_as_sent_and_ends_with_the_upstream(recorder, proxy_to_recorder):
    arrived = []
    start = time.monotonic()
    with httpx.stream("POST", f"{proxy_to_recorder.base_url}/v1/messages", json={"messages": []}, timeout=30) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"] == "text/event-stream"
        for line in reply.iter_lines():
            if line.startswith("data: "):
                arrived.append((time.monotonic(), json.loads(line[6:])["i"]))
    ended_s = time.monotonic() - start
    assert [i for _, i in arrived] == [0, 1, 2, 3]
    # Each event reached the client before the upstream sent the next one: not buffered.
    for (at, i) in arrived[:-1]:
        assert at < recorder.sent_at[i + 1] + 0.05, (i, at, recorder.sent_at)
    assert ended_s < 4 * PACE_S + 2  # and the reply ended when the upstream's did


def test_error_status_and_body_pass_through(recorder, proxy_to_recorder):
    for method in ("GET", "POST"):
        reply = httpx.request(method, f"{proxy_to_recorder.base_url}/no/such/route?x=1", timeout=10)
        assert reply.status_code == 418
        assert reply.json() == {"error": {"message": "a teapot, on purpose"}}
    assert recorder.seen[-1]["path"] == "/no/such/route?x=1"


def test_upstream_gone_later_is_a_502_naming_it_in_seconds(recorder):
    with ccproxy.serve(recorder.url) as proxy:
        recorder.shutdown()
        recorder.server_close()
        start = time.monotonic()
        reply = httpx.post(f"{proxy.base_url}/v1/messages", json={"messages": []}, timeout=30)
        assert time.monotonic() - start < 10
        assert reply.status_code == 502
        message = reply.json()["error"]["message"]
        assert recorder.url in message and "ktutorial serve" in message


def test_dead_upstream_fails_in_seconds_naming_the_url():
    url = f"http://127.0.0.1:{_dead_port()}"
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        ccproxy.serve(url)
    assert time.monotonic() - start < 10
    assert url in str(info.value) and "ktutorial serve" in str(info.value)
    assert not server.running(engine=ccproxy.ENGINE)

    start = time.monotonic()
    by_hand = subprocess.run([sys.executable, "-m", "ktutorial.ccproxy", "--upstream", url, "--port", "0"],
                             capture_output=True, text=True, timeout=30)
    assert time.monotonic() - start < 10
    assert by_hand.returncode == 2 and url in by_hand.stderr


def test_check_and_run_via_proxy_on_a_dead_port_fail_fast():
    url = f"http://127.0.0.1:{_dead_port()}"
    start = time.monotonic()
    results = cc.check(url, "m", timeout_s=5, via_proxy=True)
    assert time.monotonic() - start < 15
    assert not any(r.ok for r in results) and results[0].detail.startswith(f"no backend answers at {url}")
    start = time.monotonic()
    out = _cli("claude-code", "run", "hello", "--via-proxy", "--base-url", url, "--model", "m", timeout=60)
    assert time.monotonic() - start < 15
    assert out.returncode == 2 and url in out.stderr
    assert not server.running(engine=ccproxy.ENGINE)


# ---- in front of llama.cpp on the tiny model -----------------------------------------------------

@pytest.fixture(scope="module")
def llama(tiny_model):
    # Room for a whole Claude Code request of the SMALL shape, and for check's items.
    with server.serve("tiny", ctx_size=16384) as srv:
        yield srv


@pytest.fixture()
def recorded_proxy(llama, monkeypatch):
    """The proxy in this process (so the test sees every body before and after the transform),
    in front of llama.cpp."""
    seen: list[dict] = []
    transform = ccproxy.rewrite_request

    def recording(method, path, body):
        out, folded = transform(method, path, body)
        if method == "POST" and path.split("?")[0] in ccproxy.MESSAGE_PATHS:
            seen.append({"path": path.split("?")[0], "raw": json.loads(body), "sent": json.loads(out),
                         "folded": folded})
        return out, folded

    monkeypatch.setattr(ccproxy, "rewrite_request", recording)
    httpd = ccproxy.make_server(llama.base_url)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.seen = seen
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_passes_llamacpp_through(llama):
    with ccproxy.serve(llama.base_url) as proxy:
        assert proxy.model == llama.model
        entry = [e for e in server.running(engine=ccproxy.ENGINE) if e["pid"] == proxy.pid][0]
        assert ccproxy.upstream_of(entry) == llama.base_url and entry["model"] == llama.model
        for path in ("/health", "/v1/models"):
            direct, via = httpx.get(llama.base_url + path), httpx.get(proxy.base_url + path)
            assert (via.status_code, via.json()) == (direct.status_code, direct.json()), path
        # An error, status and body as llama.cpp wrote them.
        bad = {"model": llama.model, "max_tokens": 8}  # no messages
        direct = httpx.post(llama.base_url + "/v1/messages", json=bad, timeout=30)
        via = httpx.post(proxy.base_url + "/v1/messages", json=bad, timeout=30)
        assert direct.status_code >= 400 and (via.status_code, via.content) == (direct.status_code, direct.content)
        # The same streamed reply, event for event, arriving in pieces.
        body = {"model": llama.model, "max_tokens": 64, "stream": True, "temperature": 0,
                "messages": [{"role": "user", "content": "Reply with one short sentence."}]}
        direct = httpx.post(llama.base_url + "/v1/messages", json=body, timeout=60)
        pieces = []
        with httpx.stream("POST", proxy.base_url + "/v1/messages", json=body, timeout=60) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            pieces = list(reply.iter_raw())
        events = _sse_events(b"".join(pieces).decode())
        assert [e["type"] for e in events] == [e["type"] for e in _sse_events(direct.text)]
        assert events[-1]["type"] == "message_stop" and len(pieces) > 3
    assert not proxy.is_alive() and not server.running(engine=ccproxy.ENGINE)


def test_check_passes_every_item_through_the_proxy(llama):
    results = cc.check(llama.base_url, llama.model, timeout_s=120, via_proxy=True)
    failed = [f"{r.name}: {r.detail} -> {r.fix}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert "ktutorial's proxy, in front of " + llama.base_url in results[0].detail
    assert not server.running(engine=ccproxy.ENGINE)  # the one it started is gone


def test_a_real_claude_turn_through_the_proxy(llama, tmp_path):
    cc.claude_binary()
    from ktutorial import tiny

    result = cc.run("Run `echo ktutorial` and tell me what it printed.", llama.base_url, llama.model,
                    timeout_s=90, allowed_tools=["Bash(echo ktutorial)"], state_dir=tmp_path / "state",
                    via_proxy=True, **SMALL)
    assert result.ok and result.via_proxy and result.via_proxy != llama.base_url
    assert result.result.strip() == tiny.ANSWER_TEXT["result"]
    assert [c["name"] for c in result.tool_calls] == ["Bash"]


def test_settings_via_proxy_start_one_reuse_it_and_stop_it(llama, tmp_path):
    args = ["claude-code", "settings", "--via-proxy", "--proxy-port", "0", "--base-url", llama.base_url,
            "--model", llama.model, "--write", "--project-dir", str(tmp_path), "--json"]
    first = _cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    url = json.loads((tmp_path / ".claude" / "settings.local.json").read_text())["env"]["ANTHROPIC_BASE_URL"]
    proxies = server.running(engine=ccproxy.ENGINE)
    assert [p["base_url"] for p in proxies] == [url] and ccproxy.upstream_of(proxies[0]) == llama.base_url
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == llama.model
    again = _cli(*args)
    assert again.returncode == 0 and len(server.running(engine=ccproxy.ENGINE)) == 1  # reused
    stopped = _cli("stop", "--port", str(proxies[0]["port"]))
    assert stopped.returncode == 0 and not server.running(engine=ccproxy.ENGINE)
    assert llama.is_alive()


# ---- sglang-kt 0.7.2's own request models ---------------------------------------------------------

_VALIDATE = r'''
import json, sys
from sglang.srt.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from pydantic import ValidationError

models = {"/v1/messages": AnthropicMessagesRequest, "/v1/messages/count_tokens": AnthropicCountTokensRequest}
out = []
for item in json.load(open(sys.argv[1])):
    try:
        models[item["path"]].model_validate(item["body"])
        out.append({"ok": True})
    except ValidationError as exc:
        out.append({"ok": False, "errors": [{"loc": [str(x) for x in e["loc"]], "type": e["type"],
                                            "msg": e["msg"]} for e in exc.errors()]})
print(json.dumps(out))
'''


def _sglang_validate(items: list[dict], tmp_path: Path) -> list[dict]:
    python = sglang_kt.default_parser_python()
    if not python.exists():
        pytest.fail("sglang-kt's parser venv (.venv-sglang) is missing: run `make sglang-parser-env`")
    path = tmp_path / "bodies.json"
    path.write_text(json.dumps(items))
    proc = subprocess.run([str(python), "-c", _VALIDATE, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sglang_refuses_claude_codes_requests_and_takes_the_proxys(recorded_proxy, tmp_path):
    """Every request `claude_code.check` sends and those of a real Claude Code turn, recorded at the
    proxy, go through sglang-kt 0.7.2's own pydantic models: as sent, those with a `role: system`
    entry are refused (the HTTP 400 seen on the GPU host); as the proxy forwards them, all pass."""
    results = cc.check(recorded_proxy.base_url, None, timeout_s=120)
    assert all(r.ok for r in results), [(r.name, r.detail) for r in results if not r.ok]
    from_check = len(recorded_proxy.seen)
    turn = cc.run("Run `echo ktutorial` and tell me what it printed.", recorded_proxy.base_url, None,
                  timeout_s=90, allowed_tools=["Bash(echo ktutorial)"], state_dir=tmp_path / "state", **SMALL)
    assert turn.ok
    seen = recorded_proxy.seen
    assert from_check >= len(cc.CHECK_NAMES) - 2 and len(seen) > from_check
    assert {s["path"] for s in seen[:from_check]} == set(ccproxy.MESSAGE_PATHS)
    with_entry = [s for s in seen if s["folded"]]
    # check's items 6 and 12 carry the entry, and so does the real turn (with the Agent tool, FACTS).
    assert sum(1 for s in seen[:from_check] if s["folded"]) == 2
    assert any(s["folded"] for s in seen[from_check:])

    items = [{"path": s["path"], "body": s["raw"]} for s in seen] + [{"path": s["path"], "body": s["sent"]}
                                                                      for s in seen]
    verdicts = _sglang_validate(items, tmp_path)
    raw, sent = verdicts[:len(seen)], verdicts[len(seen):]
    for s, verdict in zip(seen, raw):
        if s["folded"]:
            assert not verdict["ok"], s["raw"]["messages"]
            assert {(e["loc"][-1], e["type"]) for e in verdict["errors"]} == {("role", "literal_error")}, verdict
        else:
            assert verdict["ok"], verdict
    assert all(v["ok"] for v in sent), [v for v in sent if not v["ok"]]
    assert with_entry  # the refused ones were there to be refused
