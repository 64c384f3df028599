"""A local proxy between Claude Code and a server: folds `role: system` entries of /v1/messages into `system`.

SGLang-kt 0.7.2's Anthropic Messages route takes only `user` and `assistant` in `messages` and
answers HTTP 400 to anything else; Claude Code 2.1.197 sends a `role: system` entry there (beta
mid-conversation-system; in -p mode it is the last entry, with the Agent tool). This proxy listens
on 127.0.0.1 only and forwards every request to the upstream server unchanged, except the bodies
of POST /v1/messages and /v1/messages/count_tokens: each `role: system` entry is taken out of
`messages` and its text appended, in order, to the top-level `system` (a string stays a string,
blocks stay blocks). The entry's position in the conversation is lost; its text is not.

Headers (Authorization, x-api-key) go to the upstream and nowhere else; responses, error
statuses and bodies included, come back as the upstream sent them, SSE chunk by chunk as it
arrives. A dead upstream fails in seconds: at start (the process exits naming the URL), and
per request (HTTP 502 with the URL and the fix).

Run it by hand: `python -m ktutorial.ccproxy --upstream http://127.0.0.1:30000 --port 3457`;
through ktutorial's one server lifecycle (readiness, log, run state, `ktutorial stop`):
`serve(upstream)` here, or `ktutorial claude-code proxy`.
"""

# Why a proxy of our own, not claude-code-router (checked 2026-12-04, Node 20, offline):
# - npm: 3.1.1 is current and wants Node >= 22; 1.0.73 (with @musistudio/llms 1.0.53) installs on
#   Node 20 and starts offline.
# - It converts to the server's /v1/chat/completions; its Anthropic transformer (llms
#   anthropic.transformer.ts, transformRequestOut) keeps only `user`/`assistant` entries of
#   `messages`: a `role: system` entry is dropped, text and all. `thinking` of type "adaptive"
#   (Claude Code's) maps to reasoning not enabled; a dead upstream is an HTTP 500 ("fetch failed").
# - This proxy keeps the server's own Messages route (its tool and reasoning parsers,
#   count_tokens) and the system text, in one module of stdlib + httpx that the tests run.

from __future__ import annotations

import argparse
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import urlsplit

import httpx

from ktutorial import server
from ktutorial.errors import UserError

ENGINE = "ccproxy"
HOST = server.HOST  # 127.0.0.1: the proxy passes tokens through, so it is never on a network
# The two routes whose request bodies carry `messages` (Claude Code adds ?beta=true).
MESSAGE_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
CONNECT_TIMEOUT_S = 3.0
# A 229 B model prefilling Claude Code's ~20k-token request takes minutes before its first byte;
# the client (Claude Code's API_TIMEOUT_MS) is the one that decides when to give up.
READ_TIMEOUT_S = 1800.0
READY_TIMEOUT_S = 30.0
# What `ktutorial claude-code proxy` and `settings --via-proxy` listen on unless told: fixed, so a
# settings file written once keeps working; next to claude-code-router's 3456.
DEFAULT_PORT = 3457
# RFC 9110 7.6.1: per connection, never forwarded. Host and Content-Length are recomputed.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
})
START_HINT = "start the server first (`ktutorial serve ... --detach`), or pass the URL of one that runs"


# ---- the transform (pure) --------------------------------------------------------------------


def _is_system_entry(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") == "system"


def _text_blocks(content: Any) -> list[dict]:
    """A message's content as text blocks (cache_control kept); non-text blocks have no place in
    `system` and are left out."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
            blocks.append(dict(block))
        elif isinstance(block, str) and block:
            blocks.append({"type": "text", "text": block})
    return blocks


def fold_system_messages(body: dict) -> dict:
    """The request body with every `role: system` entry of `messages` moved into `system`.

    The entries' text is appended in order after what `system` already holds: a string `system`
    gets it as text, a list of blocks gets text blocks; with no `system`, it becomes blocks if an
    entry used blocks, else a string. A body without such an entry comes back as it is (the same
    object); otherwise a new dict (the argument is not changed)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(_is_system_entry(m) for m in messages):
        return body
    folded = [m for m in messages if _is_system_entry(m)]
    added = [block for m in folded for block in _text_blocks(m.get("content"))]
    out = dict(body)
    out["messages"] = [m for m in messages if not _is_system_entry(m)]
    if not added:
        return out  # entries without text: nothing to add
    system = body.get("system")
    if system is None or system == "" or system == []:
        as_blocks = any(isinstance(m.get("content"), list) for m in folded)
        out["system"] = added if as_blocks else "\n\n".join(b["text"] for b in added)
    elif isinstance(system, list):
        out["system"] = [*system, *added]
    else:
        out["system"] = "\n\n".join([str(system), *(b["text"] for b in added)])
    return out


def rewrite_request(method: str, path: str, body: bytes) -> tuple[bytes, int]:
    """(body to send upstream, how many `role: system` entries were folded). Only POST to
    MESSAGE_PATHS with a JSON object body is touched; anything else (and a body that is not JSON,
    which the upstream will refuse in its own words) goes through byte for byte."""
    if method != "POST" or urlsplit(path).path.rstrip("/") not in MESSAGE_PATHS or not body:
        return body, 0
    try:
        data = json.loads(body)
    except ValueError:
        return body, 0
    if not isinstance(data, dict):
        return body, 0
    folded = fold_system_messages(data)
    if folded is data:
        return body, 0
    count = sum(1 for m in data["messages"] if _is_system_entry(m))
    return json.dumps(folded, ensure_ascii=False).encode("utf-8"), count


# ---- the listening side ------------------------------------------------------------------------


def _root(url: str) -> str:
    """A server root (no trailing / or /v1): requests keep their own /v1/... paths."""
    root = (url or "").strip().rstrip("/")
    parts = urlsplit(root)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"bad upstream URL {url!r}: expected something like http://127.0.0.1:30000")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _error_body(kind: str, message: str) -> bytes:
    # Anthropic's error shape, so the SDK and Claude Code show the message itself.
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked replies to the client
    server: "_ProxyServer"

    def do_GET(self):
        self._forward()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_error_json(self, status: int, kind: str, message: str) -> None:
        body = _error_body(kind, message)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        upstream = self.server.upstream
        body, folded = rewrite_request(self.command, self.path, self._read_body())
        if folded:
            self.log_message("folded %d role:system entr%s into system", folded, "y" if folded == 1 else "ies")
        incoming = {k.lower() for k in self.headers.keys()}
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        http = self.server.http
        request = http.build_request(self.command, upstream + self.path, headers=headers,
                                     content=body if body or self.command in ("POST", "PUT", "PATCH") else None)
        # httpx adds its own defaults (Accept-Encoding, User-Agent, ...): send only what the client sent.
        for name in list(request.headers.keys()):
            if name.lower() not in incoming and name.lower() not in ("host", "content-length"):
                del request.headers[name]
        try:
            response = http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            self._send_error_json(504, "timeout_error", f"ktutorial ccproxy: {upstream} did not answer in time "
                                  f"({type(exc).__name__}): the server is stuck or very slow; read its log")
            return
        except httpx.HTTPError as exc:
            self._send_error_json(502, "api_error", f"ktutorial ccproxy: no server answers at {upstream} "
                                  f"({type(exc).__name__}: {exc}): {START_HINT}, then retry")
            return
        try:
            self._relay(response)
        finally:
            response.close()

    def _relay(self, response: httpx.Response) -> None:
        """Status, headers and body as the upstream sent them, each chunk written as it arrives."""
        self.send_response_only(response.status_code, response.reason_phrase or None)
        self.log_request(response.status_code)
        no_body = self.command == "HEAD" or response.status_code in (204, 304) or response.status_code < 200
        length = response.headers.get("content-length")
        framed = "transfer-encoding" not in response.headers and length is not None
        for name, value in response.headers.multi_items():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if no_body:
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            return
        if framed:
            self.send_header("Content-Length", length)
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            # iter_raw: the bytes as sent (a compressed body stays compressed, its headers say so).
            for chunk in response.iter_raw():
                if not chunk:
                    continue
                self.wfile.write(chunk if framed else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            if not framed:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; closing the response aborts upstream
        except httpx.HTTPError as exc:
            # Headers are out: the client sees a cut-off body, which it reports as an error.
            self.log_message("upstream broke off mid-body: %s: %s", type(exc).__name__, exc)
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        # The request line and status only: headers (tokens) are never logged.
        sys.stderr.write(f"ccproxy {self.log_date_time_string()} {format % args}\n")


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, port: int, read_timeout_s: float):
        self.upstream = _root(upstream)
        # One connection a request: llama.cpp closes a kept-alive connection right after a stream,
        # and a pooled one reused at that moment fails (FACTS, xllamacpp).
        self.http = httpx.Client(
            timeout=httpx.Timeout(read_timeout_s, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,  # a proxy of the environment must not sit between two local servers
            follow_redirects=False,
        )
        super().__init__((HOST, port), _Handler)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def server_close(self) -> None:
        super().server_close()
        self.http.close()


def make_server(upstream: str, port: int = 0, *, read_timeout_s: float = READ_TIMEOUT_S) -> _ProxyServer:
    """The proxy, bound to 127.0.0.1:`port` (0: a free one), not yet serving (`serve_forever()`)."""
    return _ProxyServer(upstream, port, read_timeout_s)


def upstream_models(upstream: str, timeout_s: float = 5.0) -> list[str]:
    """The upstream's served model names (GET /v1/models; [] if it lists none), or UserError,
    within seconds, naming the URL and the fix when nothing answers there."""
    url = _root(upstream)
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S), trust_env=False) as http:
            response = http.get(f"{url}/v1/models")
    except httpx.HTTPError as exc:
        raise UserError(f"no server answers at {url} ({type(exc).__name__}: {exc}): {START_HINT}") from exc
    try:
        return [m["id"] for m in response.json().get("data", []) if m.get("id")] if response.status_code == 200 else []
    except (ValueError, AttributeError, TypeError, KeyError):
        return []


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ktutorial.ccproxy",
        description="Forward to UPSTREAM on 127.0.0.1:PORT, folding role:system entries of "
                    "/v1/messages into the top-level system (for Claude Code on SGLang-kt).",
    )
    parser.add_argument("--upstream", required=True, help="the server's root, e.g. http://127.0.0.1:30000")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--read-timeout-s", type=float, default=READ_TIMEOUT_S,
                        help="longest wait for the upstream's next byte")
    args = parser.parse_args(argv)
    try:
        upstream = _root(args.upstream)
        upstream_models(upstream)  # nothing there: say so now, not at Claude Code's first request
        httpd = make_server(upstream, args.port, read_timeout_s=args.read_timeout_s)
    except UserError as exc:
        print(f"ccproxy: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        print(f"ccproxy: cannot listen on {HOST}:{args.port} ({exc}): pick another --port", file=sys.stderr, flush=True)
        return 2
    # SIGTERM (ktutorial stop) ends serve_forever through SystemExit, so the socket is closed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"ccproxy: listening on {httpd.base_url}, forwarding to {upstream}; role:system entries of "
          f"{' and '.join(MESSAGE_PATHS)} are folded into system", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


# ---- through ktutorial's server lifecycle ----------------------------------------------------------


def launch(upstream: str, port: Optional[int] = None, *, model: str = "") -> server.Launch:
    """The Launch of a proxy in front of `upstream` (`model`: the upstream's served name, recorded
    in the run state so `ktutorial claude-code settings` can default to it)."""
    url = _root(upstream)
    chosen = port or server.free_port()
    return server.Launch(
        engine=ENGINE,
        command=[sys.executable, "-m", "ktutorial.ccproxy", "--upstream", url, "--port", str(chosen)],
        model=model,
        port=chosen,
        ready_timeout_s=READY_TIMEOUT_S,
    )


def upstream_of(entry_or_server: Any) -> Optional[str]:
    """The upstream a running proxy (run-state entry or Server) forwards to."""
    command = entry_or_server.get("command") if isinstance(entry_or_server, dict) else entry_or_server.launch.command
    command = list(command or [])
    for i, arg in enumerate(command[:-1]):
        if arg == "--upstream":
            return command[i + 1]
    return None


def find(upstream: Optional[str] = None, *, base_url: Optional[str] = None) -> Optional[server.Server]:
    """A live proxy started by ktutorial that forwards to `upstream`, or that listens at `base_url`."""
    want_upstream = _root(upstream) if upstream else None
    want_url = _root(base_url) if base_url else None
    for entry in server.running(engine=ENGINE):
        if want_upstream and upstream_of(entry) == want_upstream:
            return server.Server.attach(entry)
        if want_url and entry.get("base_url") == want_url:
            return server.Server.attach(entry)
    return None


def serve(
    upstream: str,
    port: Optional[int] = None,
    *,
    model: Optional[str] = None,
    detach: bool = False,
    reuse: bool = False,
) -> server.Server:
    """Start the proxy in front of `upstream` as a child process and wait until it answers
    (server.Server: log, run state, stop; a `with` block stops it). Fails in seconds, naming the
    URL, when nothing answers at `upstream`. `reuse=True` returns a proxy already running for it."""
    url = _root(upstream)
    names = upstream_models(url)
    if reuse:
        found = find(url)
        if found is not None:
            return found
    proxy = server.Server(launch(url, port, model=model or (names[0] if names else "")))
    proxy.start()
    if detach:
        proxy.detach()
    return proxy


if __name__ == "__main__":
    sys.exit(main())
