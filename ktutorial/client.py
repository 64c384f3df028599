"""Talking to a served model: chat and messages over the openai and anthropic SDKs, the reasoning
split, a tool-call round trip, and the timing of one streamed reply.

Both engines speak both APIs: `/v1/chat/completions` (OpenAI) and `/v1/messages` (Anthropic).
MiniMax-M2.1 thinks first: its reply opens with reasoning closed by `</think>`. Depending on the
server's reasoning parser that arrives split off (`reasoning_content`; Anthropic: a `thinking`
block) or inline in the text (`<think>...</think>answer`); `split_reasoning` handles both, so
callers always get `.reasoning` and `.content` apart.

The API key comes from KTUTORIAL_API_KEY (never printed): the local server's own key. OPENAI_API_KEY
is OpenAI's, and is never sent to a local server or any other --base-url. Clients connect with
a 3-second timeout and no retries: a dead server fails in seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import httpx

from ktutorial import server
from ktutorial.errors import UserError
from ktutorial.tables import Markdown, ShowsItself, join, table

CONNECT_TIMEOUT_S = 3.0
# A long prefill of a large model can take minutes before the first byte of a reply.
READ_TIMEOUT_S = 600.0
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
NO_KEY = "ktutorial-local"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed")  # local servers check no key unless started with one

Messages = Union[str, list[dict]]


# ---- plumbing ---------------------------------------------------------------------------------------


def api_key() -> str:
    """The key sent to the server: KTUTORIAL_API_KEY, else a placeholder. Not OPENAI_API_KEY: that
    key belongs to OpenAI's service, and these clients talk to whatever --base-url names."""
    return os.environ.get("KTUTORIAL_API_KEY") or NO_KEY


def api_key_status() -> str:
    """'set' or 'missing', for notebooks and status lines (the key itself is never shown)."""
    return "set" if api_key() != NO_KEY else "missing"


def resolve(base_url: Optional[str] = None, model: Optional[str] = None) -> tuple[str, str]:
    """Base URL and model, defaulting to the running server (`ktutorial serve ... --detach`)."""
    if base_url is None:
        current = server.current_server()
        return current.base_url, model or current.model
    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[: -len("/v1")]
    if model is None:
        model = served_models(base_url)[0]
    return base_url, model


def served_models(base_url: str) -> list[str]:
    try:
        with httpx.Client(timeout=httpx.Timeout(10.0, connect=CONNECT_TIMEOUT_S), trust_env=False) as http:
            reply = http.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {api_key()}"})
            reply.raise_for_status()
            ids = [m["id"] for m in reply.json().get("data", [])]
    except httpx.HTTPError as exc:
        raise _unreachable(base_url, exc) from exc
    if not ids:
        raise UserError(f"the server at {base_url} lists no model on /v1/models; pass --model")
    return ids


def openai_client(base_url: str, read_timeout_s: float = READ_TIMEOUT_S):
    import openai

    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=api_key(),
        timeout=openai.Timeout(read_timeout_s, connect=CONNECT_TIMEOUT_S),
        max_retries=0,
    )


def anthropic_client(base_url: str, read_timeout_s: float = READ_TIMEOUT_S, *, auth_token: Optional[str] = None,
                     default_headers: Optional[dict[str, str]] = None):
    """An anthropic SDK client for a local server: `auth_token` (default: the key ktutorial uses)
    as the bearer token, no retries, `default_headers` added to every request."""
    import anthropic

    # auth_token: sent as "Authorization: Bearer", the only form SGLang checks; passing it
    # explicitly also keeps the SDK from picking up a real ANTHROPIC_API_KEY from the environment.
    return anthropic.Anthropic(
        base_url=base_url,
        auth_token=auth_token or api_key(),
        timeout=anthropic.Timeout(read_timeout_s, connect=CONNECT_TIMEOUT_S),
        max_retries=0,
        default_headers=default_headers,
    )


class ServerError(UserError):
    """The server could not be reached, closed the connection mid-reply, or refused the request."""


def _unreachable(base_url: str, exc: BaseException) -> ServerError:
    return ServerError(
        f"cannot reach the server at {base_url} ({type(exc).__name__}): is it running? "
        "`ktutorial status` lists servers; `ktutorial serve --profile tiny --detach` starts one"
    )


def _is_transport_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.startswith(("httpx", "httpcore", "h11"))


def _translate(base_url: str, exc: BaseException, started: bool) -> BaseException:
    """SDK and transport errors as one ServerError with what to do next."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        body = getattr(exc, "body", None) or getattr(exc, "message", "")
        return ServerError(f"the server at {base_url} answered HTTP {status}: {str(body)[:300]}")
    # By class name: both SDKs have APIConnectionError (APITimeoutError derives from it), and
    # importing the other SDK only to test against its class costs seconds.
    if "APIConnectionError" in {c.__name__ for c in type(exc).__mro__} or _is_transport_error(exc):
        if started:
            return ServerError(
                f"the server at {base_url} closed the connection mid-reply ({type(exc).__name__}): did it "
                "crash? `ktutorial status` and the server log say more"
            )
        return _unreachable(base_url, exc)
    return exc


def as_messages(messages: Messages, system: Optional[str] = None) -> list[dict]:
    out = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    if system:
        out = [{"role": "system", "content": system}, *out]
    return out


# ---- the reasoning split ------------------------------------------------------------------------------


def split_reasoning(text: Optional[str], reasoning: Optional[str] = None) -> tuple[str, str]:
    """(reasoning, answer) from a reply. Handles `<think>r</think>a`, and `r</think>a` (the
    generation prompt opened the think block); `reasoning` given by the server comes first."""
    text = text or ""
    parts = [reasoning] if reasoning else []
    if THINK_CLOSE in text:
        head, _, tail = text.partition(THINK_CLOSE)
        start = head.find(THINK_OPEN)
        parts.append(head[start + len(THINK_OPEN):] if start >= 0 else head)
        text = (head[:start] if start > 0 else "") + tail
    elif text.lstrip().startswith(THINK_OPEN):  # unfinished thinking (cut by max_tokens)
        parts.append(text.lstrip()[len(THINK_OPEN):])
        text = ""
    return "".join(p.strip("\n") for p in parts).strip(), text.strip()


class ReasoningSplitter:
    """The streaming form of split_reasoning: feed content deltas, get (kind, text) pieces.

    `starts_inside=True` when the generation prompt already opened `<think>`, so the reply begins
    with reasoning (MiniMax with an inline-think parser)."""

    def __init__(self, starts_inside: bool = False):
        self.inside = starts_inside
        self.seen_close = False
        self._pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf = self._pending + text
        self._pending = ""
        while buf:
            tag = THINK_CLOSE if self.inside else (THINK_OPEN if not self.seen_close else None)
            if tag is None:
                out.append(("content", buf))
                break
            idx = buf.find(tag)
            if idx >= 0:
                if idx:
                    out.append(("reasoning" if self.inside else "content", buf[:idx]))
                buf = buf[idx + len(tag):]
                self.inside = not self.inside
                self.seen_close = self.seen_close or tag == THINK_CLOSE
                continue
            # keep a possible partial tag at the end for the next delta
            keep = next((k for k in range(len(tag) - 1, 0, -1) if buf.endswith(tag[:k])), 0)
            emit, self._pending = (buf[:-keep], buf[-keep:]) if keep else (buf, "")
            if emit:
                out.append(("reasoning" if self.inside else "content", emit))
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self._pending = self._pending, ""
        return [("reasoning" if self.inside else "content", rest)] if rest else []


# ---- OpenAI chat ---------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict  # parsed JSON; {"_raw": text} when the model wrote invalid JSON
    arguments_json: str = ""


def _reply_markdown(reasoning: str, answer: str, calls: list[str], reason: Optional[str], usage: dict) -> Markdown:
    return table({"reasoning": reasoning or "(none)", "answer": answer or "(none)", "tool calls": calls or "(none)",
                  "finish / stop reason": reason, "usage": usage})


@dataclass
class ChatResult(ShowsItself):
    content: str  # the answer, reasoning removed
    reasoning: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: Optional[str] = None
    usage: dict = field(default_factory=dict)
    timings: Optional[dict] = None  # llama.cpp's server-side timings, when sent
    model: Optional[str] = None

    def markdown(self) -> Markdown:
        calls = [f"{c.name}({json.dumps(c.arguments)})" for c in self.tool_calls]
        return _reply_markdown(self.reasoning, self.content, calls, self.finish_reason, self.usage)

    def assistant_message(self) -> dict:
        """This reply as a history entry. Reasoning is kept (MiniMax's card asks for it)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
                for c in self.tool_calls
            ]
        return msg


def _parse_arguments(text: str) -> dict:
    try:
        value = json.loads(text or "{}")
        return value if isinstance(value, dict) else {"_value": value}
    except ValueError:
        return {"_raw": text}


def _extra(obj: Any, name: str) -> Any:
    value = getattr(obj, name, None)
    if value is None:
        value = (getattr(obj, "model_extra", None) or {}).get(name)
    return value


def _usage_dict(usage: Any) -> dict:
    if usage is None:
        return {}
    if hasattr(usage, "model_dump"):
        return usage.model_dump(exclude_none=True)
    return dict(usage)


def chat(
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    messages: Messages = "",
    stream: bool = False,
    *,
    system: Optional[str] = None,
    tools: Optional[list[dict]] = None,
    max_tokens: Optional[int] = 512,
    on_delta: Optional[Callable[[str, str], None]] = None,
    read_timeout_s: float = READ_TIMEOUT_S,
    **kw,
) -> ChatResult:
    """One chat completion; `stream=True` streams it (each piece to `on_delta(kind, text)`,
    kind "reasoning" or "content") and returns the same ChatResult at the end.

    Extra keywords go to the SDK (temperature, top_p, tool_choice, extra_body, ...)."""
    base_url, model = resolve(base_url, model)
    client = openai_client(base_url, read_timeout_s)
    request: dict[str, Any] = dict(model=model, messages=as_messages(messages, system), **kw)
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    if tools:
        request["tools"] = tools
    if not stream:
        try:
            reply = client.chat.completions.create(**request)
        except Exception as exc:
            raise _translate(base_url, exc, started=False) from exc
        choice = reply.choices[0]
        reasoning, content = split_reasoning(choice.message.content, _extra(choice.message, "reasoning_content"))
        calls = [
            ToolCall(c.id, c.function.name, _parse_arguments(c.function.arguments), c.function.arguments or "")
            for c in (choice.message.tool_calls or [])
        ]
        return ChatResult(
            content=content,
            reasoning=reasoning,
            tool_calls=calls,
            finish_reason=choice.finish_reason,
            usage=_usage_dict(reply.usage),
            timings=_extra(reply, "timings"),
            model=reply.model,
        )
    return _collect(stream_chat(base_url, model, messages, system=system, tools=tools, max_tokens=max_tokens,
                                read_timeout_s=read_timeout_s, **kw), on_delta)


@dataclass
class Delta:
    kind: str  # "reasoning", "content", "tool_call", "done"
    text: str = ""
    tool_call: Optional[dict] = None  # the accumulated call so far, on kind "tool_call"
    chunk: Any = None  # the SDK chunk (usage, timings, finish_reason on the last ones)


def stream_chat(
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    messages: Messages = "",
    *,
    system: Optional[str] = None,
    tools: Optional[list[dict]] = None,
    max_tokens: Optional[int] = 512,
    read_timeout_s: float = READ_TIMEOUT_S,
    **kw,
) -> Iterator[Delta]:
    """The streamed reply as Delta events; reasoning split from content as it arrives."""
    base_url, model = resolve(base_url, model)
    client = openai_client(base_url, read_timeout_s)
    request: dict[str, Any] = dict(model=model, messages=as_messages(messages, system), stream=True, **kw)
    request.setdefault("stream_options", {"include_usage": True})
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    if tools:
        request["tools"] = tools
    started = False
    splitter = ReasoningSplitter()
    try:
        stream = client.chat.completions.create(**request)
        started = True
        for chunk in stream:
            for choice in chunk.choices or []:
                delta = choice.delta
                reasoning = _extra(delta, "reasoning_content")
                if reasoning:
                    yield Delta("reasoning", reasoning, chunk=chunk)
                if delta.content:
                    for kind, text in splitter.feed(delta.content):
                        yield Delta(kind, text, chunk=chunk)
                for call in delta.tool_calls or []:
                    yield Delta(
                        "tool_call",
                        tool_call={
                            "index": call.index,
                            "id": call.id,
                            "name": call.function.name if call.function else None,
                            "arguments": call.function.arguments if call.function else None,
                        },
                        chunk=chunk,
                    )
            yield Delta("chunk", chunk=chunk)
        for kind, text in splitter.flush():
            yield Delta(kind, text)
    except Exception as exc:
        translated = _translate(base_url, exc, started)
        if translated is exc:
            raise
        raise translated from exc


def _collect(events: Iterator[Delta], on_delta: Optional[Callable[[str, str], None]] = None) -> ChatResult:
    reasoning, content = [], []
    calls: dict[int, dict] = {}
    finish, usage, timings, model = None, {}, None, None
    for ev in events:
        if ev.kind in ("reasoning", "content"):
            (reasoning if ev.kind == "reasoning" else content).append(ev.text)
            if on_delta:
                on_delta(ev.kind, ev.text)
        elif ev.kind == "tool_call":
            slot = calls.setdefault(ev.tool_call["index"] or 0, {"id": "", "name": "", "arguments": ""})
            slot["id"] = ev.tool_call["id"] or slot["id"]
            slot["name"] = ev.tool_call["name"] or slot["name"]
            slot["arguments"] += ev.tool_call["arguments"] or ""
        elif ev.kind == "chunk":
            chunk = ev.chunk
            model = chunk.model or model
            for choice in chunk.choices or []:
                finish = choice.finish_reason or finish
            if chunk.usage:
                usage = _usage_dict(chunk.usage)
            timings = _extra(chunk, "timings") or timings
    text_reasoning, text_content = "".join(reasoning).strip(), "".join(content).strip()
    if THINK_CLOSE in text_content:
        # A server that streams the reasoning without its opening tag: the splitter could not tell
        # it from the answer as it arrived, the whole reply can.
        more, text_content = split_reasoning(text_content)
        text_reasoning = "\n".join(p for p in (text_reasoning, more) if p)
    return ChatResult(
        content=text_content,
        reasoning=text_reasoning,
        tool_calls=[
            ToolCall(c["id"], c["name"], _parse_arguments(c["arguments"]), c["arguments"])
            for _, c in sorted(calls.items())
        ],
        finish_reason=finish,
        usage=usage,
        timings=timings,
        model=model,
    )


# ---- a tool round trip ------------------------------------------------------------------------------


def function_tool(name: str, description: str, properties: dict, required: Optional[list[str]] = None) -> dict:
    """An OpenAI tool definition."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required or list(properties)},
        },
    }


@dataclass
class ToolRoundTrip(ShowsItself):
    final: ChatResult  # the reply after the tool results went back
    calls: list[ToolCall]  # every call the model made, in order
    results: list[Any]  # what the handlers returned, in the same order
    transcript: list[dict]  # the whole conversation, as sent

    def markdown(self) -> Markdown:
        rows = [{"tool": c.name, "arguments": c.arguments, "handler returned": str(r)[:200]}
                for c, r in zip(self.calls, self.results)]
        return join(table(rows) if rows else "The model called no tool.",
                    f"Then, with the results in its history ({len(self.transcript)} messages), it answered:",
                    self.final.markdown())


def tool_round_trip(
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    messages: Messages = "",
    tools: Optional[list[dict]] = None,
    handlers: Optional[dict[str, Callable[..., Any]]] = None,
    *,
    max_turns: int = 3,
    **kw,
) -> ToolRoundTrip:
    """Ask, run the tool calls the model makes with `handlers[name](**arguments)`, send the
    results back, repeat until a reply without tool calls (or `max_turns`)."""
    base_url, model = resolve(base_url, model)
    handlers = handlers or {}
    history = as_messages(messages, kw.pop("system", None))
    calls, results = [], []
    reply = None
    for _ in range(max_turns):
        reply = chat(base_url, model, history, tools=tools, **kw)
        history.append(reply.assistant_message())
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            if call.name not in handlers:
                raise UserError(
                    f"the model called tool {call.name!r}, which has no handler; pass handlers={{{call.name!r}: fn}}"
                )
            result = handlers[call.name](**{k: v for k, v in call.arguments.items() if not k.startswith("_")})
            calls.append(call)
            results.append(result)
            history.append({
                "role": "tool",
                "tool_call_id": call.id,
                "content": result if isinstance(result, str) else json.dumps(result),
            })
    return ToolRoundTrip(final=reply, calls=calls, results=results, transcript=history)


# ---- Anthropic messages ----------------------------------------------------------------------------


@dataclass
class MessagesResult(ShowsItself):
    text: str  # the answer (text blocks joined)
    thinking: str  # thinking blocks, or an inline <think> split off the text
    tool_uses: list[dict] = field(default_factory=list)  # {"id", "name", "input"}
    stop_reason: Optional[str] = None
    usage: dict = field(default_factory=dict)
    content: list[dict] = field(default_factory=list)  # the raw blocks, for the next turn's history

    def markdown(self) -> Markdown:
        calls = [f"{u.get('name')}({json.dumps(u.get('input'))})" for u in self.tool_uses]
        return _reply_markdown(self.thinking, self.text, calls, self.stop_reason, self.usage)


def messages(
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    messages: Messages = "",
    *,
    system: Optional[Union[str, list[dict]]] = None,
    tools: Optional[list[dict]] = None,
    max_tokens: int = 512,
    stream: bool = False,
    on_delta: Optional[Callable[[str, str], None]] = None,
    read_timeout_s: float = READ_TIMEOUT_S,
    **kw,
) -> MessagesResult:
    """One Anthropic Messages call (`/v1/messages`), streamed or not. Tools use Anthropic's
    shape: {"name", "description", "input_schema"}."""
    base_url, model = resolve(base_url, model)
    client = anthropic_client(base_url, read_timeout_s)
    # This SDK's messages.create takes no sampling arguments; both servers read them from the body.
    sampling = {k: kw.pop(k) for k in SAMPLING_KEYS if k in kw}
    if sampling:
        kw["extra_body"] = {**(kw.get("extra_body") or {}), **sampling}
    request: dict[str, Any] = dict(model=model, max_tokens=max_tokens, messages=as_messages(messages), **kw)
    if system:
        request["system"] = system
    if tools:
        request["tools"] = tools
    started = False
    try:
        if not stream:
            reply = client.messages.create(**request)
            blocks = [b.model_dump(exclude_none=True) for b in reply.content]
            return _messages_result(blocks, reply.stop_reason, reply.usage)
        blocks: list[dict] = []
        stop_reason, usage = None, None
        with client.messages.stream(**request) as events:
            started = True
            for event in events:
                kind = event.type
                if kind == "content_block_start":
                    blocks.append(event.content_block.model_dump(exclude_none=True))
                    if blocks[-1].get("type") == "tool_use":
                        blocks[-1]["_input_json"] = ""
                elif kind == "content_block_delta":
                    d = event.delta
                    block = blocks[-1]
                    if d.type == "text_delta":
                        block["text"] = block.get("text", "") + d.text
                        on_delta and on_delta("content", d.text)
                    elif d.type == "thinking_delta":
                        block["thinking"] = block.get("thinking", "") + d.thinking
                        on_delta and on_delta("reasoning", d.thinking)
                    elif d.type == "input_json_delta":
                        block["_input_json"] += d.partial_json
                elif kind == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
                    usage = event.usage
            final = events.get_final_message()
            usage = final.usage or usage
        for block in blocks:
            if "_input_json" in block:
                raw = block.pop("_input_json")
                block["input"] = _parse_arguments(raw) if raw else block.get("input", {})
        return _messages_result(blocks, stop_reason, usage)
    except Exception as exc:
        translated = _translate(base_url, exc, started)
        if translated is exc:
            raise
        raise translated from exc


def _messages_result(blocks: list[dict], stop_reason, usage) -> MessagesResult:
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    thinking = "".join(b.get("thinking", "") for b in blocks if b.get("type") == "thinking")
    inline_thinking, text = split_reasoning(text)
    return MessagesResult(
        text=text,
        thinking=(thinking + inline_thinking).strip(),
        tool_uses=[
            {"id": b["id"], "name": b["name"], "input": b.get("input", {})}
            for b in blocks
            if b.get("type") == "tool_use"
        ],
        stop_reason=stop_reason,
        usage=_usage_dict(usage),
        content=blocks,
    )


# ---- timing one streamed reply ----------------------------------------------------------------------


def _carries_output(delta: Any) -> bool:
    return bool(delta.content or _extra(delta, "reasoning_content") or delta.tool_calls)


@dataclass
class StreamTiming:
    ttft_s: float  # request sent -> first generated piece (reasoning, content or tool call)
    e2e_s: float  # request sent -> stream closed
    output_tokens: int  # from usage; counted pieces only if the server sent no usage
    prompt_tokens: Optional[int]
    decode_tok_s: Optional[float]  # (output_tokens - 1) / (e2e_s - ttft_s)
    server_timings: Optional[dict] = None  # llama.cpp's own prompt/predicted timings
    tokens_from: str = "usage"  # "usage" or "pieces"
    text: str = ""
    reasoning: str = ""
    finish_reason: Optional[str] = None

    @property
    def prefill_tok_s(self) -> Optional[float]:
        """prompt_tokens / ttft_s: the published tutorial's prefill figure."""
        return self.prompt_tokens / self.ttft_s if self.prompt_tokens and self.ttft_s > 0 else None

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "ttft_s", "e2e_s", "output_tokens", "prompt_tokens", "decode_tok_s", "server_timings", "tokens_from",
            "finish_reason",
        )}
        out["prefill_tok_s"] = self.prefill_tok_s
        return out


def timed_stream(
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    prompt: Messages = "",
    max_tokens: int = 128,
    *,
    ignore_eos: bool = False,
    **kw,
) -> StreamTiming:
    """Stream one reply and time it: TTFT, end to end, decode tokens/s, token counts from usage.

    `ignore_eos=True` asks the server to generate exactly `max_tokens` (both engines honour it),
    as the published measurements do."""
    if ignore_eos:
        extra = dict(kw.pop("extra_body", None) or {})
        extra["ignore_eos"] = True
        kw["extra_body"] = extra
    base_url, model = resolve(base_url, model)
    pieces = 0
    first_at = None
    reasoning, content = [], []
    usage, timings, finish = {}, None, None
    t0 = time.perf_counter()
    for ev in stream_chat(base_url, model, prompt, max_tokens=max_tokens, **kw):
        if ev.kind in ("reasoning", "content"):
            (reasoning if ev.kind == "reasoning" else content).append(ev.text)
        elif ev.kind == "chunk":
            chunk = ev.chunk
            # The first chunk carrying generated text, even a bare "<think>" the splitter swallows.
            if any(_carries_output(choice.delta) for choice in chunk.choices or []):
                first_at = first_at or time.perf_counter()
                pieces += 1
            if chunk.usage:
                usage = _usage_dict(chunk.usage)
            timings = _extra(chunk, "timings") or timings
            for choice in chunk.choices or []:
                finish = choice.finish_reason or finish
    end = time.perf_counter()
    if first_at is None:
        raise ServerError(f"the server at {base_url} streamed no tokens (finish_reason {finish!r})")
    tokens = usage.get("completion_tokens")
    ttft_s, e2e_s = first_at - t0, end - t0
    output_tokens = int(tokens) if tokens is not None else pieces
    decode_s = e2e_s - ttft_s
    return StreamTiming(
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        output_tokens=output_tokens,
        prompt_tokens=usage.get("prompt_tokens"),
        decode_tok_s=(output_tokens - 1) / decode_s if output_tokens > 1 and decode_s > 0 else None,
        server_timings=timings,
        tokens_from="usage" if tokens is not None else "pieces",
        text="".join(content).strip(),
        reasoning="".join(reasoning).strip(),
        finish_reason=finish,
    )
