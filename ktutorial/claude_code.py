"""Claude Code on a local backend: its settings, a smoke test that calls the way it calls, one real turn.

Claude Code speaks the Anthropic Messages API. SGLang-kt and llama.cpp's server both serve that
API themselves: point `ANTHROPIC_BASE_URL` at the server and name the served model in
`ANTHROPIC_MODEL` (`claude_env`). One difference: SGLang-kt 0.7.2 answers HTTP 400 to the
`role: system` entry Claude Code puts inside `messages`, so in front of it goes ktutorial's own
proxy (`ccproxy`: it folds that entry into `system`, everything else passes through); every
function here takes `via_proxy=True` for that. `check` replays, with the anthropic SDK, the parts
of a real Claude Code request that local servers get wrong (each item says works / fails and the
fix); `run` drives the installed CLI (`claude -p`) for one turn, in a scratch folder with its own
config folder so it never reads or writes the reader's own Claude Code settings.

`check` runs through the proxy only when asked (`via_proxy=True`, `--via-proxy`), never on its own
for an SGLang backend: it is the diagnosis of the server as it is, and the 400 it reports there is
the reason to use the proxy; the same check through the proxy then shows what Claude Code will see.

Tokens come from the environment (KTUTORIAL_API_KEY, then ANTHROPIC_AUTH_TOKEN); a local server
started without an API key checks none, so a placeholder is used. Nothing here prints a token
unless asked (`show_token=True`); the only file it writes one into is the settings file asked for.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx
import jinja2

from ktutorial import bench, ccproxy, client, results, server
from ktutorial.errors import MissingDependency, UserError
from ktutorial.shell import command_line
from ktutorial.tables import Markdown, ShowsItself, join, table

# Generated pages: their text in data/templates, every value from the code (a misspelt name fails).
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("ktutorial", "data/templates"), autoescape=False,
                                keep_trailing_newline=True, undefined=jinja2.StrictUndefined)

# The version `make tools` installs and the tests ran: what npm gives on Node 20 (FACTS).
CLAUDE_CODE_VERSION = "2.1.197"
CLAUDE_CODE_NPM = f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"
INSTALL_HINT = (
    f"run `make tools` (installs {CLAUDE_CODE_NPM} into ./.tools), or "
    f"`npm install --prefix .tools {CLAUDE_CODE_NPM}` (Node.js 18+)"
)
CONTEXT_HINT = (
    "Claude Code's full first request is about 77 KB (~20k tokens for MiniMax-M2's tokenizer, ~45k "
    "for the tiny model's): serve with a larger context (llama.cpp: --ctx-size 65536), or shrink the "
    "request with `--tools Bash --system-prompt \"Be terse.\"`"
)
START_HINT = "start one with `ktutorial serve --profile tiny --detach`, or pass --base-url"
FIX_MID_SYSTEM = (
    "the server refuses a `role: system` entry inside messages (SGLang-kt 0.7.2 does), and Claude Code "
    "sends one: put ktutorial's proxy in front, which folds it into `system`: `ktutorial claude-code "
    "settings --via-proxy --write` (starts it and points Claude Code at it), `ktutorial claude-code "
    "check --via-proxy` (these checks through it)"
)

TOKEN_ENV_VARS = ("KTUTORIAL_API_KEY", "ANTHROPIC_AUTH_TOKEN")
# Sent when no token is set: servers started without --api-key check none, but Claude Code
# insists on some credential before it sends a request.
PLACEHOLDER_TOKEN = "ktutorial-local-no-key"

# A 229 B model with experts on the CPU prefills Claude Code's first ~20k-token request in
# minutes, not seconds (FACTS: 129-400 prefill tok/s on one GPU): Claude Code's own default
# (10 min) is close, so give it 15.
DEFAULT_API_TIMEOUT_MS = 900_000
# A few retries ride out a busy server; more hide a dead one for minutes (FACTS).
DEFAULT_MAX_RETRIES = 2

# Most of what Claude Code 2.1.197 put in `anthropic-beta` when we captured one of its requests.
CLAUDE_CODE_BETAS = (
    "claude-code-20250219",
    "interleaved-thinking-2025-05-14",
    "context-management-2025-06-27",
    "mid-conversation-system-2026-04-07",
    "effort-2025-11-24",
)

# What a reader asks Claude Code to do in the tool checks, and what the tiny model does unasked.
TOOL_PROMPT = "Run the shell command `echo ktutorial` with the Bash tool, then tell me what it printed."
TOOL_OUTPUT = "ktutorial\n"


# ---- settings ---------------------------------------------------------------------------

def normalize_base_url(base_url: str) -> str:
    """The server root: Claude Code and the SDK append /v1/messages themselves, so a trailing
    /v1 (the OpenAI habit) would make /v1/v1/messages."""
    url = (base_url or "").strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise UserError(f"bad base URL {base_url!r}: expected something like http://127.0.0.1:8080")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def resolve_token(token: Optional[str] = None) -> tuple[str, str]:
    """(token, where it came from): the argument, an environment variable, or the placeholder."""
    if token:
        return token, "argument"
    for name in TOKEN_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value, name
    return PLACEHOLDER_TOKEN, "placeholder"


def claude_env(
    base_url: str,
    model: str,
    token: Optional[str] = None,
    *,
    api_timeout_ms: int = DEFAULT_API_TIMEOUT_MS,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> dict[str, str]:
    """The environment Claude Code reads to talk to `base_url` as `model` (every model slot)."""
    if not model:
        raise UserError("no model name: pass --model (the server's served model name)")
    value, _ = resolve_token(token)
    return {
        "ANTHROPIC_BASE_URL": normalize_base_url(base_url),
        "ANTHROPIC_AUTH_TOKEN": value,
        "ANTHROPIC_MODEL": model,
        # Claude Code picks other slots for sub-agents and background work (titles, summaries):
        # a local server has one model, so every slot names it.
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "API_TIMEOUT_MS": str(int(api_timeout_ms)),
        # No telemetry, error reports or update checks: they go to the internet, not the backend.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_MAX_RETRIES": str(int(max_retries)),
    }


def _token_source(env: dict[str, str], token_source: Optional[str]) -> str:
    if token_source:
        return token_source
    return "placeholder" if env.get("ANTHROPIC_AUTH_TOKEN") == PLACEHOLDER_TOKEN else "argument"


def masked_env(env: dict[str, str], token_source: Optional[str] = None) -> dict[str, str]:
    """The same env with the token replaced by a note saying where it comes from."""
    out = dict(env)
    source = _token_source(env, token_source)
    if source != "placeholder":
        out["ANTHROPIC_AUTH_TOKEN"] = f"<set: from {source}>" if source != "argument" else "<set>"
    return out


def shell_exports(env: dict[str, str], *, show_token: bool = False, token_source: Optional[str] = None) -> str:
    """`export NAME=value` lines to paste into a shell. The token is written as a reference to the
    variable it came from (still works when pasted, leaks nothing), or masked, unless show_token."""
    source = _token_source(env, token_source)
    lines = []
    for name, value in env.items():
        if name == "ANTHROPIC_AUTH_TOKEN" and not show_token and source != "placeholder":
            if source in TOKEN_ENV_VARS:
                lines.append(f'export {name}="${{{source}}}"')
            else:
                lines.append(f"export {name}='<your token>'  # hidden; --show-token prints it")
            continue
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines)


def settings_block(env: dict[str, str]) -> dict[str, Any]:
    """The settings.json fragment: Claude Code applies its `env` at start-up."""
    return {"env": dict(env)}


def project_settings_path(project_dir: str | os.PathLike = ".") -> Path:
    """Project-local settings, not meant for git (Claude Code's own convention)."""
    return Path(project_dir) / ".claude" / "settings.local.json"


def user_settings_path() -> Path:
    """The reader's global settings (CLAUDE_CONFIG_DIR moves them, as it does for Claude Code)."""
    root = os.environ.get("CLAUDE_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".claude")
    return Path(root) / "settings.json"


@dataclass
class SettingsWrite:
    path: Path
    backup: Optional[Path]
    keys: list[str]


def write_settings(
    env: dict[str, str],
    *,
    project_dir: str | os.PathLike = ".",
    user: bool = False,
    force: bool = False,
) -> SettingsWrite:
    """Merge `env` into the settings file's `env` block, keeping every other key.

    Default: `<project_dir>/.claude/settings.local.json`. `user=True` writes the global
    `~/.claude/settings.json`, only with `force=True`, and copies the old file aside first."""
    path = user_settings_path() if user else project_settings_path(project_dir)
    if user and not force:
        raise UserError(
            f"{path} holds your own Claude Code settings for every project: pass --force to merge "
            "these keys into it (the old file is backed up first), or leave out --global to write "
            "the project-local .claude/settings.local.json"
        )
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text() or "{}")
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}): fix or move it, then run this again") from exc
        if not isinstance(data, dict):
            raise UserError(f"{path} does not hold a JSON object: fix or move it, then run this again")
    backup = None
    if user and path.exists():
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        backup = path.with_name(f"{path.name}.ktutorial-backup-{stamp}")
        shutil.copy2(path, backup)
    merged_env = dict(data.get("env") or {})
    merged_env.update(env)
    data["env"] = merged_env
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # The file may hold a token: readable by its owner only, written whole or not at all.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    os.chmod(path, 0o600)
    return SettingsWrite(path=path, backup=backup, keys=sorted(env))


# ---- which backend ----------------------------------------------------------------------

def probe(base_url: str, timeout_s: float = 5.0) -> list[str]:
    """The served model names at `base_url` (GET /v1/models), or UserError naming the URL and the fix."""
    url = normalize_base_url(base_url)
    try:
        response = httpx.get(f"{url}/v1/models", timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise UserError(f"no backend answers at {url} ({type(exc).__name__}: {exc}): {START_HINT}") from exc
    if response.status_code in (401, 403):
        raise UserError(
            f"the backend at {url} refused the probe (HTTP {response.status_code}): it wants an API key; "
            "export KTUTORIAL_API_KEY=<the server's key>"
        )
    if response.status_code != 200:
        return []  # a router or proxy may not list models; the Messages calls will tell
    try:
        return [m.get("id") for m in response.json().get("data", []) if m.get("id")]
    except (ValueError, AttributeError):
        return []


def resolve_backend(base_url: Optional[str] = None, model: Optional[str] = None) -> tuple[str, str]:
    """(base_url, model): given ones, else the server ktutorial started; the model, if not
    given, is the one the server lists."""
    if not base_url:
        base_url, model_from_server = _running_server()
        model = model or model_from_server
    base_url = normalize_base_url(base_url)
    if not model:
        names = probe(base_url)
        if len(names) != 1:
            raise UserError(
                f"the backend at {base_url} serves {names or 'no listed model'}: pass --model NAME"
            )
        model = names[0]
    return base_url, model


def _running_server() -> tuple[str, Optional[str]]:
    srv = server.current_server()
    return srv.base_url, srv.model


@contextlib.contextmanager
def through_proxy(base_url: str, model: Optional[str] = None, port: Optional[int] = None):
    """The URL Claude Code should call to reach `base_url` through ktutorial's proxy: `base_url`
    itself when it is a proxy ktutorial runs, else one already running for it, else one started
    for the length of the block (and stopped after)."""
    if ccproxy.find(base_url=base_url) is not None:
        yield base_url
        return
    with ccproxy.serve(base_url, port, model=model, reuse=True) as proxy:
        yield proxy.base_url


def start_proxy(base_url: str, model: Optional[str] = None, port: Optional[int] = None):
    """A proxy in front of `base_url` left running (`ktutorial stop --port N` ends it): the one
    already running for it, or a new one on `port` (default ccproxy.DEFAULT_PORT; 0: a free one)."""
    found = ccproxy.find(base_url=base_url) or ccproxy.find(base_url)
    if found is not None:
        return found
    return ccproxy.serve(base_url, ccproxy.DEFAULT_PORT if port is None else port, model=model, detach=True)


# ---- smoke test -------------------------------------------------------------------------

@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    elapsed_s: float = 0.0


@dataclass
class _Reply:
    blocks: list[dict]
    stop_reason: Optional[str]
    events: list[str]
    elapsed_s: float

    def text(self) -> str:
        return "".join(b.get("text", "") for b in self.blocks if b["type"] == "text")

    def of_type(self, kind: str) -> list[dict]:
        return [b for b in self.blocks if b["type"] == kind]


def _schema(properties: dict, required: list[str]) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _s(description: str, kind: str = "string", **extra) -> dict:
    return {"description": description, "type": kind, **extra}


def claude_code_tools() -> list[dict]:
    """A dozen tools shaped like Claude Code's own (names, JSON-schema style), short descriptions."""
    return [
        {"name": "Bash", "description": "Executes a bash command and returns its output.",
         "input_schema": _schema({"command": _s("The command to execute"),
                                  "timeout": _s("Optional timeout in milliseconds (max 600000)", "number"),
                                  "description": _s("What this command does, in 5-10 words")}, ["command"])},
        {"name": "Read", "description": "Reads a file from the local filesystem.",
         "input_schema": _schema({"file_path": _s("The absolute path to the file to read"),
                                  "offset": _s("The line number to start reading from", "integer", minimum=0),
                                  "limit": _s("The number of lines to read", "integer", exclusiveMinimum=0)},
                                 ["file_path"])},
        {"name": "Edit", "description": "Performs exact string replacements in a file.",
         "input_schema": _schema({"file_path": _s("The absolute path to the file to modify"),
                                  "old_string": _s("The text to replace"),
                                  "new_string": _s("The text to replace it with"),
                                  "replace_all": _s("Replace all occurrences", "boolean", default=False)},
                                 ["file_path", "old_string", "new_string"])},
        {"name": "Write", "description": "Writes a file to the local filesystem.",
         "input_schema": _schema({"file_path": _s("The absolute path to the file to write"),
                                  "content": _s("The content to write to the file")}, ["file_path", "content"])},
        {"name": "Glob", "description": "Finds files by name pattern, newest first.",
         "input_schema": _schema({"pattern": _s("The glob pattern to match files against"),
                                  "path": _s("The directory to search in")}, ["pattern"])},
        {"name": "Grep", "description": "Searches file contents with a regular expression.",
         "input_schema": _schema({"pattern": _s("The regular expression to search for"),
                                  "path": _s("File or directory to search in"),
                                  "output_mode": _s("What to show", enum=["content", "files_with_matches", "count"]),
                                  "-i": _s("Case insensitive search", "boolean")}, ["pattern"])},
        {"name": "NotebookEdit", "description": "Replaces the contents of a cell in a Jupyter notebook.",
         "input_schema": _schema({"notebook_path": _s("The absolute path to the notebook"),
                                  "cell_id": _s("The ID of the cell to edit"),
                                  "new_source": _s("The new source for the cell"),
                                  "edit_mode": _s("The kind of edit", enum=["replace", "insert", "delete"])},
                                 ["notebook_path", "new_source"])},
        {"name": "WebFetch", "description": "Fetches a URL and answers a prompt about its content.",
         "input_schema": _schema({"url": _s("The URL to fetch content from", format="uri"),
                                  "prompt": _s("The prompt to run on the fetched content")}, ["url", "prompt"])},
        {"name": "WebSearch", "description": "Searches the web.",
         "input_schema": _schema({"query": _s("The search query to use", minLength=2),
                                  "allowed_domains": _s("Only these domains", "array", items={"type": "string"})},
                                 ["query"])},
        {"name": "Agent", "description": "Launches a sub-agent for a multi-step task.",
         "input_schema": _schema({"description": _s("A short (3-5 word) description of the task"),
                                  "prompt": _s("The task for the agent to perform"),
                                  "subagent_type": _s("The type of agent to use")}, ["description", "prompt"])},
        {"name": "TaskCreate", "description": "Adds a task to the session's task list.",
         "input_schema": _schema({"subject": _s("A brief title for the task"),
                                  "description": _s("What needs to be done")}, ["subject", "description"])},
        {"name": "TaskUpdate", "description": "Updates a task in the session's task list.",
         "input_schema": _schema({"taskId": _s("The ID of the task to update"),
                                  "status": _s("New status", enum=["pending", "in_progress", "completed"])},
                                 ["taskId"])},
    ]


def _system_blocks() -> list[dict]:
    # Claude Code sends its system prompt as several text blocks, the long ones marked for caching.
    return [
        {"type": "text", "text": "You are an agent for software engineering tasks, run from a terminal."},
        {"type": "text", "text": "Answer briefly. Use the tools when a task needs them.",
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Working directory: a scratch folder. Platform: linux.",
         "cache_control": {"type": "ephemeral"}},
    ]


def _mid_system(text: str = "Tools available to sub-agents: Bash, Read, Edit, Write.") -> dict:
    # Claude Code (beta mid-conversation-system) puts a `role: system` entry inside `messages`.
    return {"role": "system", "content": text}


def _user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


class _Caller:
    """One anthropic client set up the way Claude Code sets up its own."""

    def __init__(self, base_url: str, model: str, token: str, timeout_s: float):
        self.model = model
        self.client = client.anthropic_client(
            base_url,
            float(timeout_s),
            auth_token=token,  # sent as `Authorization: Bearer`, like Claude Code
            # llama.cpp closes the connection right after a streamed reply while announcing
            # keep-alive: a pooled connection reused at that moment fails with "Server disconnected
            # without sending a response". One connection a request avoids the race.
            default_headers={"anthropic-beta": ",".join(CLAUDE_CODE_BETAS), "Connection": "close"},
        )
        # Never forward a real ANTHROPIC_API_KEY from the environment to a local server.
        self.client.api_key = None

    def stream(self, *, max_tokens: int, extra_body: Optional[dict] = None, **kw) -> _Reply:
        """POST /v1/messages?beta=true with stream=true; the events folded back into blocks."""
        start = time.perf_counter()
        blocks: dict[int, dict] = {}
        events: list[str] = []
        stop_reason = None
        partial_json: dict[int, str] = {}
        with self.client.beta.messages.create(
            model=self.model, max_tokens=max_tokens, stream=True, extra_body=extra_body, **kw
        ) as stream:
            for event in stream:
                events.append(event.type)
                if event.type == "content_block_start":
                    blocks[event.index] = event.content_block.model_dump(exclude_none=True)
                elif event.type == "content_block_delta":
                    block = blocks.setdefault(event.index, {"type": "text", "text": ""})
                    delta = event.delta
                    if delta.type == "text_delta":
                        block["text"] = block.get("text", "") + delta.text
                    elif delta.type == "thinking_delta":
                        block["thinking"] = block.get("thinking", "") + delta.thinking
                    elif delta.type == "signature_delta":
                        block["signature"] = block.get("signature", "") + delta.signature
                    elif delta.type == "input_json_delta":
                        partial_json[event.index] = partial_json.get(event.index, "") + delta.partial_json
                elif event.type == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
        for index, text in partial_json.items():
            try:
                blocks[index]["input"] = json.loads(text) if text.strip() else {}
            except json.JSONDecodeError:
                blocks[index]["input_error"] = text
        ordered = [blocks[i] for i in sorted(blocks)]
        return _Reply(ordered, stop_reason, events, time.perf_counter() - start)


# Fixes by the kind of failure; `{url}` is filled in.
_RAW_TOOL_MARKERS = ("<minimax:tool_call", "<invoke name=", "<tool_call>")
_FIX_TOOL_PARSER = (
    "the reply carries the tool call as text: SGLang needs `--tool-call-parser minimax-m2`; "
    "llama.cpp needs `--jinja` and the model's own chat template (the GGUF's)"
)
_FIX_NO_TOOL_CALL = (
    "the model answered without calling the tool it was asked to call: a server without a tool-call "
    "parser (SGLang: `--tool-call-parser minimax-m2`; llama.cpp: `--jinja`) or a model that cannot "
    "use tools"
)
_FIX_REASONING = (
    "reasoning was dropped: SGLang's Messages stream drops reasoning_content, so launch it with "
    "`--reasoning-parser minimax-append-think` (the <think> text stays in the reply and in history, "
    "as MiniMax-M2 wants); llama.cpp returns thinking blocks with `--jinja`"
)
_FIX_ENDS = (
    "the model never ended its turn: check the chat template and its end-of-turn token "
    "(llama.cpp: `--jinja` with the GGUF's template; SGLang: the model's own tokenizer_config); "
    "Claude Code would wait for all 32000 tokens"
)


def _api_failure(exc: Exception, url: str, what_fix: str = "") -> tuple[str, str]:
    """(detail, fix) for an exception from the SDK."""
    import anthropic

    if isinstance(exc, anthropic.APITimeoutError):
        return "no reply before the timeout", "the server is stuck or very slow: read its log; raise --timeout-s"
    if isinstance(exc, anthropic.APIConnectionError):
        return f"no connection to {url}", START_HINT
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        message = _error_message(exc)
        detail = f"HTTP {status}: {message}"
        if status in (401, 403):
            return detail, "the server checks an API key: export KTUTORIAL_API_KEY=<the server's --api-key>"
        if status == 404:
            return detail, (
                f"no Anthropic Messages route at {url}/v1/messages: use SGLang-kt 0.7.2+ or llama.cpp's "
                "server, or put claude-code-router in front of an OpenAI-only server"
            )
        if "context" in message.lower() and ("exceed" in message.lower() or "size" in message.lower()):
            return detail, "the request does not fit the server's context: " + CONTEXT_HINT
        if status >= 500:
            return detail, "the server failed on this request: read its log (the error is there)"
        return detail, what_fix or "the server rejected this part of the request: see the message"
    return f"{type(exc).__name__}: {exc}", what_fix or "see the message"


def _error_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
    return str(getattr(exc, "message", exc))[:300]


def _raw_tool_text(reply: _Reply) -> bool:
    text = reply.text()
    return any(marker in text for marker in _RAW_TOOL_MARKERS)


def _has_reasoning(reply: _Reply) -> str:
    if reply.of_type("thinking"):
        return "thinking block"
    if "</think>" in reply.text():
        return "<think> text in the reply"
    return ""


# Enough for MiniMax-M2's reasoning before a one-sentence answer or a tool call.
FEATURE_MAX_TOKENS = 1024

CHECK_NAMES = (
    "backend reachable",
    "model name served",
    "POST /v1/messages?beta=true, Bearer auth",
    "streaming (SSE events)",
    "system prompt in blocks",
    "role: system message inside messages",
    "thinking",
    "a dozen tools offered",
    "tool_use: a tool call comes back as a block",
    "tool_result round trip",
    "count_tokens",
    "a whole Claude Code request, max_tokens 32000: ends by itself",
)


# Engines whose Messages route refuses part of what Claude Code sends (sglang-kt 0.7.2: a `role:
# system` entry inside `messages`, HTTP 400): Claude Code reaches them through ktutorial's proxy.
ENGINES_NEEDING_PROXY = ("sglang-kt",)


def needs_proxy(engine: Optional[str]) -> bool:
    """Whether Claude Code needs ktutorial's proxy in front of this engine (see ENGINES_NEEDING_PROXY)."""
    return engine in ENGINES_NEEDING_PROXY


def check_records(checks: list[CheckResult], base_url: str, model: Optional[str], via_proxy: bool,
                  params: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """One `claude_check` record per item of a check, stamped with the backend's engine and the
    settings it reports (SGLang's reasoning and tool-call parsers among them)."""
    server = bench.server_settings(normalize_base_url(base_url))
    env = results.environment_stamp(engine=server["engine"], model=model, extra=server)
    return [
        results.make_record(
            "claude_check",
            {"item": c.name, "via_proxy": via_proxy, "engine": server["engine"], "model": model, **(params or {})},
            {"ok": c.ok, "detail": c.detail[:1000], "fix": c.fix[:1000], "elapsed_s": c.elapsed_s},
            env=env,
        )
        for c in checks
    ]


class Checks(ShowsItself, list):
    """The results of `check`, in order; shows itself as a table with the count that works."""

    def markdown(self) -> Markdown:
        rows = [{"what Claude Code sends": c.name, "works": c.ok, "seen": c.detail, "fix": c.fix or "",
                 "s": c.elapsed_s} for c in self]
        return join(f"{sum(1 for c in self if c.ok)} of {len(self)} parts work.", table(rows))


def check(
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    *,
    token: Optional[str] = None,
    timeout_s: float = 300.0,
    via_proxy: bool = False,
) -> Checks:
    """Replay what Claude Code sends, one feature a request, then all of it at once.

    Returns one CheckResult per item in CHECK_NAMES; items after a dead backend are marked not run.
    `via_proxy=True`: the same requests through ktutorial's proxy in front of the backend (one
    started for the check, or the one running for it)."""
    if not base_url:
        base_url, model_from_server = _running_server()
        model = model or model_from_server
    base_url = normalize_base_url(base_url)
    if via_proxy:
        try:
            probe(base_url)
        except UserError:
            pass  # no proxy then: the plain check reports the backend's own URL, in seconds
        else:
            with through_proxy(base_url, model) as proxy_url:
                results = check(proxy_url, model, token=token, timeout_s=timeout_s)
            if proxy_url != base_url:
                results[0].detail += f" (ktutorial's proxy, in front of {base_url})"
            return results
    token_value, _ = resolve_token(token)
    results = Checks()

    def add(name, ok, detail, fix="", elapsed_s=0.0):
        results.append(CheckResult(name, bool(ok), detail, "" if ok else fix, round(elapsed_s, 3)))

    def not_run(reason: str, fix: str):
        for name in CHECK_NAMES[len(results):]:
            add(name, False, f"not run: {reason}", fix)
        return results

    # 1-2: the server is there and serves this name.
    start = time.perf_counter()
    try:
        names = probe(base_url)
    except UserError as exc:
        fix = str(exc).rsplit(": ", 1)[-1] if "API key" in str(exc) else START_HINT
        add(CHECK_NAMES[0], False, str(exc).split(": start one")[0], fix, time.perf_counter() - start)
        return not_run("the backend is not reachable", fix)
    add(CHECK_NAMES[0], True, f"GET {base_url}/v1/models answered", elapsed_s=time.perf_counter() - start)
    if not model:
        if len(names) != 1:
            raise UserError(f"the backend at {base_url} serves {names or 'no listed model'}: pass --model NAME")
        model = names[0]
    if not names:
        add(CHECK_NAMES[1], True, "the server lists no models (a router?); using the name as given")
    elif model in names:
        add(CHECK_NAMES[1], True, f"{model!r} is served")
    else:
        add(CHECK_NAMES[1], False, f"{model!r} is not among {names}",
            f"pass --model {names[0]} (or serve with --served-model-name {model})")

    caller = _Caller(base_url, model, token_value, timeout_s)
    plain = [_user("Reply with one short sentence.")]
    tools = claude_code_tools()

    def attempt(name: str, fix_on_error: str, fn):
        """Run one item; an SDK error becomes a failed result. Returns the reply or None."""
        start = time.perf_counter()
        try:
            reply = fn()
        except Exception as exc:  # the SDK's errors and our own: each becomes a failed item
            detail, fix = _api_failure(exc, base_url, fix_on_error)
            add(name, False, detail, fix, time.perf_counter() - start)
            return None
        return reply

    # 3: the route, the query string and Bearer auth, on the smallest request. It also tells
    # whether the model ends a one-sentence reply: if not, the other items ask for few tokens
    # (they test what the server accepts) and the 32000-token item is not run, which would
    # take minutes to say the same.
    reply = attempt(CHECK_NAMES[2], "", lambda: caller.stream(messages=plain, max_tokens=FEATURE_MAX_TOKENS))
    ends = reply is None or reply.stop_reason != "max_tokens"
    limit = FEATURE_MAX_TOKENS if ends else 16
    if reply is None:
        last = results[-1]
        if "no connection" in last.detail:
            return not_run("the backend went away", last.fix)
    elif not reply.blocks:
        add(CHECK_NAMES[2], False, "200 but no content blocks", "read the server log", reply.elapsed_s)
    else:
        add(CHECK_NAMES[2], True, f"200, Bearer token accepted, {len(reply.blocks)} block(s)"
            + ("" if ends else f"; the reply did not end within {FEATURE_MAX_TOKENS} tokens"),
            elapsed_s=reply.elapsed_s)

    # 4: the SSE event sequence Claude Code parses.
    reply = attempt(CHECK_NAMES[3], "", lambda: caller.stream(max_tokens=limit, messages=plain))
    if reply is not None:
        needed = ["message_start", "content_block_start", "content_block_delta", "message_delta", "message_stop"]
        missing = [e for e in needed if e not in reply.events]
        add(CHECK_NAMES[3], not missing and reply.stop_reason is not None,
            f"{len(reply.events)} events, message_start to message_stop, stop_reason {reply.stop_reason}"
            if not missing else f"missing events {missing}",
            "the server's SSE stream is incomplete: upgrade the engine", reply.elapsed_s)

    # 5: system prompt as blocks with cache_control.
    reply = attempt(CHECK_NAMES[4], "the server rejects `system` as a list of blocks: upgrade the engine",
                    lambda: caller.stream(max_tokens=limit, system=_system_blocks(), messages=plain))
    if reply is not None:
        add(CHECK_NAMES[4], bool(reply.blocks), f"3 blocks with cache_control accepted, stop_reason {reply.stop_reason}",
            "no content came back", reply.elapsed_s)

    # 6: a `role: system` entry inside messages, where Claude Code puts it.
    reply = attempt(
        CHECK_NAMES[5],
        FIX_MID_SYSTEM,
        lambda: caller.stream(max_tokens=limit, system=_system_blocks(), messages=[plain[0], _mid_system()]),
    )
    if reply is not None:
        add(CHECK_NAMES[5], bool(reply.blocks), f"accepted, stop_reason {reply.stop_reason}",
            "no content came back", reply.elapsed_s)

    # 7: thinking as Claude Code asks for it; the reasoning must survive (MiniMax-M2 wants it in history).
    reply = attempt(
        CHECK_NAMES[6], "the server rejects `thinking`: upgrade the engine",
        lambda: caller.stream(max_tokens=limit, messages=plain, thinking={"type": "adaptive"},
                              extra_body={"output_config": {"effort": "high"}}),
    )
    if reply is not None:
        where = _has_reasoning(reply)
        add(CHECK_NAMES[6], bool(where), f"reasoning returned as {where}" if where else
            f"no reasoning in the reply ({[b['type'] for b in reply.blocks]})", _FIX_REASONING, reply.elapsed_s)

    # 8: the tool list is accepted.
    reply = attempt(CHECK_NAMES[7], "the server rejects Claude Code's tool schemas: upgrade the engine",
                    lambda: caller.stream(max_tokens=limit, system=_system_blocks(), messages=plain, tools=tools))
    if reply is not None:
        add(CHECK_NAMES[7], bool(reply.blocks), f"{len(tools)} tools accepted, stop_reason {reply.stop_reason}",
            "no content came back", reply.elapsed_s)

    # 9-10: a tool call comes back as a tool_use block, and its result goes back in.
    ask = [_user(TOOL_PROMPT)]
    first = attempt(CHECK_NAMES[8], _FIX_TOOL_PARSER,
                    lambda: caller.stream(max_tokens=limit, system=_system_blocks(), messages=ask, tools=tools))
    tool_use = None
    if first is not None:
        calls = first.of_type("tool_use")
        offered = {t["name"] for t in tools}
        good = [c for c in calls if c.get("name") in offered and isinstance(c.get("input"), dict)
                and "input_error" not in c]
        if good and first.stop_reason == "tool_use":
            tool_use = good[0]
            add(CHECK_NAMES[8], True, f"{tool_use['name']}({json.dumps(tool_use['input'])[:80]}), "
                "stop_reason tool_use", elapsed_s=first.elapsed_s)
        elif _raw_tool_text(first):
            add(CHECK_NAMES[8], False, "a tool call came back as text, not a tool_use block",
                _FIX_TOOL_PARSER, first.elapsed_s)
        else:
            add(CHECK_NAMES[8], False,
                f"no usable tool_use block (blocks {[b['type'] for b in first.blocks]}, stop_reason "
                f"{first.stop_reason})", _FIX_NO_TOOL_CALL, first.elapsed_s)
    if tool_use is None:
        add(CHECK_NAMES[9], False, "not run: no tool call to answer", results[-1].fix)
    else:
        history = ask + [
            {"role": "assistant", "content": _replayable(first.blocks)},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"],
                                          "content": TOOL_OUTPUT}]},
        ]
        reply = attempt(CHECK_NAMES[9], "the server rejects tool_result blocks: upgrade the engine",
                        lambda: caller.stream(max_tokens=limit, system=_system_blocks(), messages=history, tools=tools))
        if reply is not None:
            ok = bool(reply.text().strip()) and reply.stop_reason == "end_turn"
            add(CHECK_NAMES[9], ok, f"answered {reply.text().strip()[:60]!r}, stop_reason {reply.stop_reason}",
                "after a tool result the model should answer in text and end its turn; " + _FIX_ENDS,
                reply.elapsed_s)

    # 11: token counting (Claude Code uses it to size its context).
    start = time.perf_counter()
    try:
        counted = caller.client.beta.messages.count_tokens(
            model=model, system=_system_blocks(), messages=plain, tools=tools)
        ok = counted.input_tokens > 0
        add(CHECK_NAMES[10], ok, f"{counted.input_tokens} input tokens", "count_tokens returned 0",
            time.perf_counter() - start)
    except Exception as exc:
        detail, fix = _api_failure(exc, base_url, "the server has no /v1/messages/count_tokens")
        add(CHECK_NAMES[10], False, detail, fix, time.perf_counter() - start)

    # 12: all of it in one request, with Claude Code's own max_tokens.
    if not ends:
        add(CHECK_NAMES[11], False, f"not run: the model did not end a one-sentence reply within "
            f"{FEATURE_MAX_TOKENS} tokens", _FIX_ENDS)
        return results
    reply = attempt(
        CHECK_NAMES[11], "" if results[5].ok else FIX_MID_SYSTEM,
        lambda: caller.stream(
            max_tokens=32000, system=_system_blocks(), tools=tools, thinking={"type": "adaptive"},
            messages=[_user("Hello."), _mid_system(), _user(TOOL_PROMPT)],
            metadata={"user_id": "ktutorial-check"},
            extra_body={"context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
                        "output_config": {"effort": "high"}},
        ),
    )
    if reply is not None:
        ok = reply.stop_reason in ("end_turn", "tool_use", "stop_sequence")
        add(CHECK_NAMES[11], ok, f"stop_reason {reply.stop_reason}", _FIX_ENDS,
            reply.elapsed_s)
    return results


def _replayable(blocks: list[dict]) -> list[dict]:
    """The assistant's blocks as Claude Code sends them back (thinking kept, with its signature)."""
    out = []
    for b in blocks:
        if b["type"] == "text" and b.get("text"):
            out.append({"type": "text", "text": b["text"]})
        elif b["type"] == "thinking":
            out.append({"type": "thinking", "thinking": b.get("thinking", ""), "signature": b.get("signature", "")})
        elif b["type"] == "tool_use":
            out.append({"type": "tool_use", "id": b["id"], "name": b["name"], "input": b.get("input", {})})
    return out


# ---- one real turn of the CLI -----------------------------------------------------------

def _local_candidates() -> list[Path]:
    # `make tools` installs into the checkout's .tools; a reader may also run from another folder.
    return [
        Path(__file__).resolve().parents[1] / ".tools" / "node_modules" / ".bin" / "claude",
        Path.cwd() / ".tools" / "node_modules" / ".bin" / "claude",
    ]


def claude_binary() -> Path:
    """The project-local CLI (`make tools`, the pinned version) if there, else `claude` on PATH."""
    for path in _local_candidates():
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which("claude")
    if found:
        return Path(found)
    raise MissingDependency("the Claude Code CLI (`claude`)", INSTALL_HINT)


def claude_version(binary: Optional[Path] = None) -> str:
    """`claude --version`, e.g. "2.1.197"."""
    binary = binary or claude_binary()
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60,
                         env=_clean_env({}))
    match = re.search(r"\d+\.\d+\.\d+", out.stdout)
    return match.group(0) if match else out.stdout.strip()


@dataclass
class RunResult:
    ok: bool
    result: str
    exit_code: int
    wall_s: float
    base_url: str
    model: str
    claude_version: str
    num_turns: Optional[int] = None
    api_duration_s: Optional[float] = None
    stop_reason: Optional[str] = None
    # The tools Claude Code ran this turn: [{"name", "input", "output", "is_error"}], from its transcript.
    tool_calls: list = field(default_factory=list)
    via_proxy: Optional[str] = None  # the proxy Claude Code called, when it went through one
    raw: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class ClaudeCodeError(UserError):
    """The CLI ran but the turn failed; `.run_result` holds what it said."""

    def __init__(self, message: str, run_result: Optional[RunResult] = None):
        super().__init__(message)
        self.run_result = run_result


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment without Anthropic or Claude Code settings (a real
    ANTHROPIC_API_KEY must not reach a local server, a stray ANTHROPIC_BASE_URL must not win)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_CONFIG_DIR"))}
    env.update(extra)
    return env


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "<token>") if secret and secret != PLACEHOLDER_TOKEN else text


def run(
    prompt: str,
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    *,
    timeout_s: float = 120.0,
    token: Optional[str] = None,
    cwd: Optional[str | os.PathLike] = None,
    state_dir: Optional[str | os.PathLike] = None,
    allowed_tools: tuple[str, ...] | list[str] = (),
    tools: Optional[tuple[str, ...] | list[str]] = None,
    system_prompt: Optional[str] = None,
    max_turns: Optional[int] = None,
    via_proxy: bool = False,
) -> RunResult:
    """`claude -p PROMPT --output-format json` against the backend, retries off, bounded by timeout_s.

    Runs in `cwd` (default: a scratch folder) with Claude Code's config folder in `state_dir`
    (default: a scratch folder, removed after), so the reader's ~/.claude and project settings are
    neither read nor written. Raises ClaudeCodeError when the turn fails, UserError when the
    backend is down (within seconds), MissingDependency when the CLI is not installed.

    `tools` (Claude Code's `--tools`, e.g. ["Bash"]) and `system_prompt` (`--system-prompt`) shrink
    its first request from ~77 KB (about twenty tools, a long system prompt) to a few KB: the
    request keeps its shape (streamed, thinking, tools, system blocks) but a small CPU model
    prefills it in seconds instead of minutes.

    `via_proxy=True`: Claude Code calls ktutorial's proxy in front of the backend (needed for
    SGLang-kt 0.7.2, which refuses the `role: system` entry Claude Code sends)."""
    if not prompt or not prompt.strip():
        raise UserError("empty prompt: pass the text Claude Code should answer")
    binary = claude_binary()
    base_url, model = resolve_backend(base_url, model)
    probe(base_url)  # a stopped backend fails here, in seconds, with the URL and the fix
    token_value, _ = resolve_token(token)
    proxy = contextlib.ExitStack()
    claude_url = proxy.enter_context(through_proxy(base_url, model)) if via_proxy else base_url
    env = claude_env(claude_url, model, token_value, api_timeout_ms=int(timeout_s * 1000), max_retries=0)

    scratch = tempfile.TemporaryDirectory(prefix="ktutorial-claude-")
    try:
        state = Path(state_dir) if state_dir else Path(scratch.name) / "config"
        work = Path(cwd) if cwd else Path(scratch.name) / "work"
        state.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        env["CLAUDE_CONFIG_DIR"] = str(state)
        command = [str(binary), "-p", prompt, "--output-format", "json"]
        if tools is not None:
            command += ["--tools", ",".join(tools)]
        if system_prompt is not None:
            command += ["--system-prompt", system_prompt]
        if allowed_tools:
            command += ["--allowedTools", *allowed_tools]
        if max_turns:
            command += ["--max-turns", str(int(max_turns))]
        version = claude_version(binary)
        start = time.perf_counter()
        # Own process group: a timeout kills the CLI and anything its Bash tool started.
        proc = subprocess.Popen(command, cwd=work, env=_clean_env(env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ClaudeCodeError(
                f"Claude Code did not finish within {timeout_s:.0f} s against {base_url} ({model}): "
                "a model that never ends its turn keeps it waiting for 32000 tokens; run "
                "`ktutorial claude-code check` to see which part fails, or raise --timeout-s"
            ) from None
        wall_s = time.perf_counter() - start
        _kill_group(proc)  # anything its tools left running in the background
        tool_calls = _transcript_tool_calls(state)
    finally:
        scratch.cleanup()
        proxy.close()

    stdout, stderr = _scrub(stdout, token_value), _scrub(stderr, token_value)
    raw: dict = {}
    for line in reversed(stdout.strip().splitlines()):
        try:
            raw = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    result = RunResult(
        ok=proc.returncode == 0 and bool(raw) and not raw.get("is_error"),
        result=str(raw.get("result", "")),
        exit_code=proc.returncode,
        wall_s=round(wall_s, 3),
        base_url=base_url,
        model=model,
        claude_version=version,
        num_turns=raw.get("num_turns"),
        api_duration_s=(raw["duration_api_ms"] / 1000.0) if raw.get("duration_api_ms") is not None else None,
        stop_reason=raw.get("stop_reason"),
        tool_calls=tool_calls,
        via_proxy=claude_url if claude_url != base_url else None,
        raw={k: raw[k] for k in ("type", "subtype", "is_error", "duration_ms", "duration_api_ms", "num_turns",
                                 "result", "stop_reason", "usage", "modelUsage", "api_error_status") if k in raw},
    )
    if not result.ok:
        said = result.result or stderr.strip()[-500:] or stdout.strip()[-500:] or "no output"
        fix = "run `ktutorial claude-code check` to see which part of the request the backend gets wrong"
        if "role" in said and "system" in said and not via_proxy:
            fix = FIX_MID_SYSTEM.replace("check --via-proxy", "run --via-proxy")
        elif "context" in said.lower():
            fix = CONTEXT_HINT
        elif "ECONNREFUSED" in said or "Unable to connect" in said or "Connection error" in said:
            fix = START_HINT
        raise ClaudeCodeError(
            f"Claude Code failed against {base_url} ({model}), exit {proc.returncode}: {said}; {fix}", result)
    return result


def _transcript_tool_calls(state: Path) -> list[dict]:
    """Tool uses and their results from the session transcripts Claude Code wrote under `state`
    (projects/*/<session>.jsonl). Not a stable format: anything unreadable is skipped."""
    uses: dict[str, dict] = {}
    order: list[str] = []
    for path in sorted(state.glob("projects/*/*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                content = (json.loads(line).get("message") or {}).get("content")
            except (ValueError, AttributeError):
                continue
            for block in content if isinstance(content, list) else []:
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "tool_use" and block.get("id") not in uses:
                    uses[block["id"]] = {"name": block.get("name"), "input": block.get("input"),
                                         "output": None, "is_error": None}
                    order.append(block["id"])
                elif block.get("type") == "tool_result" and block.get("tool_use_id") in uses:
                    out = block.get("content")
                    if isinstance(out, list):
                        out = "".join(b.get("text", "") for b in out if isinstance(b, dict))
                    uses[block["tool_use_id"]].update(output=out, is_error=bool(block.get("is_error")))
    return [uses[i] for i in order]


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the CLI's process group (it runs in its own session): SIGTERM, SIGKILL after 5 s."""
    server.stop_process_group(proc.pid, grace_s=5.0, leader=proc)
    proc.wait(timeout=5)


# ---- the two backends, documented -------------------------------------------------------

# Checked with Claude Code 2.1.197 against llama.cpp on Node 20 (3.x wants Node 22).
ROUTER_VERSION = "1.0.73"

# The SGLang flags Claude Code depends on, with why; the KT flags come from `ktutorial plan`.
SGLANG_CLAUDE_CODE_FLAGS: dict[str, tuple[str, str]] = {
    "--tool-call-parser": ("minimax-m2", "tool calls come back as tool_use blocks, not <minimax:tool_call> text"),
    "--reasoning-parser": (
        "minimax-append-think",
        "keeps <think> in the reply: SGLang's Messages stream drops split-off reasoning, and "
        "MiniMax-M2 wants its thinking kept in history",
    ),
}


def router_config(base_url: str = "http://127.0.0.1:30000", model: str = "MiniMax-M2.1") -> dict:
    """A claude-code-router (`ccr code`) config for readers who prefer a proxy: it talks to the
    server's OpenAI-compatible route. Not needed with SGLang-kt or llama.cpp, which serve the
    Messages API themselves."""
    url = normalize_base_url(base_url)
    return {
        "LOG": False,
        "HOST": "127.0.0.1",
        "PORT": 3456,
        "APIKEY": "",
        "API_TIMEOUT_MS": DEFAULT_API_TIMEOUT_MS,
        "Providers": [
            {
                "name": "local",
                "api_base_url": f"{url}/v1/chat/completions",
                "api_key": PLACEHOLDER_TOKEN,
                "models": [model],
            }
        ],
        "Router": {
            "default": f"local,{model}",
            "background": f"local,{model}",
            "think": f"local,{model}",
            "longContext": f"local,{model}",
        },
    }


def sglang_command_for_claude_code(command: list[str]) -> list[str]:
    """An SGLang launch command with the flags Claude Code needs added where missing (the notebook
    passes the one `engines.sglang_kt.render_command(plan)` rendered)."""
    out = list(command)
    for flag, (value, _) in SGLANG_CLAUDE_CODE_FLAGS.items():
        if flag not in out and not any(a.startswith(flag + "=") for a in out):
            out += [flag, value]
    return out


def backend_docs(
    sglang_url: str = "http://127.0.0.1:30000",
    sglang_model: str = "MiniMax-M2.1",
    llamacpp_url: str = "http://127.0.0.1:8080",
    llamacpp_model: str = "ktutorial-tiny",
    sglang_command: Optional[list[str]] = None,
) -> str:
    """Markdown: how to serve for Claude Code with each engine, and how to point Claude Code at it.

    `sglang_command`: a rendered SGLang + KT command (from the plan); without it the KT flags are
    left as a placeholder naming `ktutorial plan`."""
    sg_port = sglang_url.rsplit(":", 1)[-1]
    if sglang_command:
        cmd = sglang_command_for_claude_code(sglang_command)
        sg_cmd = command_line(cmd, one_flag_a_line=True)
        kt_note = "The command the plan rendered, with the two flags Claude Code needs:"
    else:
        cmd = ["python", "-m", "sglang.launch_server", "--model", "~/models/MiniMax-M2.1", "--trust-remote-code",
               "--served-model-name", sglang_model, "--host", "127.0.0.1", "--port", sg_port]
        cmd = sglang_command_for_claude_code(cmd)
        sg_cmd = (" ".join(cmd[:6]) + " \\\n  " + " ".join(cmd[6:12]) + " \\\n  "
                  + "<the --kt-* flags from `ktutorial plan --profile minimax-m2.1`> \\\n  " + " ".join(cmd[12:]))
        kt_note = "The KT flags come from `ktutorial plan --profile minimax-m2.1`; the last two are what Claude Code needs:"
    why = "\n".join(f"- `{flag} {value}`: {reason}." for flag, (value, reason) in SGLANG_CLAUDE_CODE_FLAGS.items())
    proxy_url = f"http://{ccproxy.HOST}:{ccproxy.DEFAULT_PORT}"
    sg_env = shell_exports(claude_env(proxy_url, sglang_model, PLACEHOLDER_TOKEN))
    return _TEMPLATES.get_template("claude_code_backends.md.j2").render(
        claude_code_version=CLAUDE_CODE_VERSION, router_version=ROUTER_VERSION, proxy_port=ccproxy.DEFAULT_PORT,
        kt_note=kt_note, sg_cmd=sg_cmd, why=why, sg_env=sg_env, sglang_url=sglang_url, sglang_model=sglang_model,
        llamacpp_url=llamacpp_url, llamacpp_model=llamacpp_model,
        router_json=json.dumps(router_config(sglang_url, sglang_model), indent=2),
    )
