"""Every client path against the real llama.cpp server on the tiny model: chat (plain and
streamed), the reasoning split (split off by the server, or inline <think>), a tool round trip,
Anthropic messages (streaming, tools, system), timed_stream; and a dead server failing fast."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktutorial import client, server, tiny
from ktutorial.client import ReasoningSplitter, split_reasoning

GREEDY = {"temperature": 0.0, "extra_body": {"cache_prompt": False}}
# The tiny model's fixed behaviour (tiny.py): a greeting; a Bash call when tools are offered; a
# closing line once the tool result is back.
BASH_TOOL = client.function_tool("Bash", "Run a shell command", {"command": {"type": "string"}})
BASH_TOOL_ANTHROPIC = {
    "name": "Bash",
    "description": "Run a shell command",
    "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
}


# ---- the reasoning split, without a server ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, reasoning, expected",
    [
        ("<think>\nplan it\n</think>\n\nThe answer.", None, ("plan it", "The answer.")),
        ("plan it\n</think>\n\nThe answer.", None, ("plan it", "The answer.")),  # prompt opened <think>
        ("The answer.", "plan it", ("plan it", "The answer.")),  # server split it off
        ("The answer.", None, ("", "The answer.")),
        ("<think>still thinking when max_tokens hit", None, ("still thinking when max_tokens hit", "")),
        ("", None, ("", "")),
    ],
)
def test_split_reasoning(text, reasoning, expected):
    assert split_reasoning(text, reasoning) == expected


@pytest.mark.parametrize("starts_inside", [False, True])
@pytest.mark.parametrize("step", [1, 2, 3, 7, 100])
def test_streaming_splitter_agrees_with_split_reasoning_at_any_chunking(starts_inside, step):
    text = ("" if starts_inside else "<think>") + "weigh <b> and </b>\n</think>\n\nanswer with </thi in it"
    splitter = ReasoningSplitter(starts_inside=starts_inside)
    pieces = []
    for i in range(0, len(text), step):
        pieces += splitter.feed(text[i:i + step])
    pieces += splitter.flush()
    reasoning = "".join(t for k, t in pieces if k == "reasoning")
    content = "".join(t for k, t in pieces if k == "content")
    assert (reasoning.strip(), content.strip()) == split_reasoning(text)
    assert reasoning.strip() == "weigh <b> and </b>" and content.strip() == "answer with </thi in it"


def test_streamed_reply_without_an_opening_think_tag_is_split_at_the_end():
    events = [client.Delta("content", piece) for piece in ("plan ", "it\n</th", "ink>\n\nThe ", "answer.")]
    result = client._collect(iter(events))
    assert (result.reasoning, result.content) == ("plan it", "The answer.")


# ---- a dead server fails fast -----------------------------------------------------------------------


def test_dead_server_fails_within_seconds_with_what_to_do():
    import anthropic  # noqa: F401  (imported first: the SDKs' import time is not what is measured)
    import openai  # noqa: F401

    url = f"http://127.0.0.1:{server.free_port()}"
    for call in (
        lambda: client.chat(url, "m", "hi"),
        lambda: client.chat(url, "m", "hi", stream=True),
        lambda: client.messages(url, "m", "hi"),
        lambda: client.messages(url, "m", "hi", stream=True),
        lambda: client.timed_stream(url, "m", "hi", 4),
        lambda: client.served_models(url),
    ):
        t0 = time.monotonic()
        with pytest.raises(client.ServerError, match="cannot reach the server at http://127.0.0.1:"):
            call()
        assert time.monotonic() - t0 < 5


# ---- against the real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tiny_model):
    with server.serve("tiny") as s:
        yield s


@pytest.fixture(scope="module")
def inline_srv(tiny_model):
    """The same model with llama.cpp's reasoning parser off: <think> stays in the content."""
    with server.serve("tiny", reasoning_format="none") as s:
        yield s


def test_chat_defaults_to_the_running_server_and_splits_reasoning(srv):
    reply = client.chat(messages="hello", max_tokens=64, **GREEDY)
    assert reply.model == "ktutorial-tiny"
    assert reply.reasoning == tiny.REASONING_TEXT["plain"]
    assert reply.content == tiny.ANSWER_TEXT["plain"]
    assert reply.finish_reason == "stop" and reply.tool_calls == []
    assert reply.usage["prompt_tokens"] > 0
    assert 0 < reply.usage["completion_tokens"] < 64
    assert reply.timings and reply.timings["predicted_n"] == reply.usage["completion_tokens"]


def test_streamed_chat_equals_the_plain_reply(srv):
    plain = client.chat(srv.base_url, srv.model, "hello", max_tokens=64, **GREEDY)
    seen = []
    streamed = client.chat(srv.base_url, srv.model, "hello", max_tokens=64, stream=True,
                           on_delta=lambda kind, text: seen.append((kind, text)), **GREEDY)
    assert (streamed.reasoning, streamed.content) == (tiny.REASONING_TEXT["plain"], tiny.ANSWER_TEXT["plain"])
    assert (streamed.reasoning, streamed.content) == (plain.reasoning, plain.content)
    assert streamed.usage["completion_tokens"] == plain.usage["completion_tokens"]
    assert streamed.finish_reason == plain.finish_reason == "stop"
    assert len(seen) > 1  # it did arrive in pieces
    assert "".join(t for k, t in seen if k == "reasoning").strip() == plain.reasoning
    assert "".join(t for k, t in seen if k == "content").strip() == plain.content


def test_reasoning_split_is_the_same_inline_or_split_by_the_server(srv, inline_srv):
    expected = (tiny.REASONING_TEXT["plain"], tiny.ANSWER_TEXT["plain"])
    split = client.chat(srv.base_url, srv.model, "hello", max_tokens=64, **GREEDY)
    raw = client.openai_client(inline_srv.base_url).chat.completions.create(
        model=inline_srv.model, messages=[{"role": "user", "content": "hello"}], max_tokens=64, **GREEDY)
    message = raw.choices[0].message
    assert not client._extra(message, "reasoning_content")  # this server left the reasoning inline
    assert "</think>" in message.content
    inline = client.chat(inline_srv.base_url, inline_srv.model, "hello", max_tokens=64, **GREEDY)
    assert (inline.reasoning, inline.content) == (split.reasoning, split.content) == expected
    streamed = client.chat(inline_srv.base_url, inline_srv.model, "hello", max_tokens=64, stream=True, **GREEDY)
    assert (streamed.reasoning, streamed.content) == expected


def test_tool_round_trip(srv):
    ran = []

    def bash(command: str) -> str:
        ran.append(command)
        return "ktutorial\n"

    trip = client.tool_round_trip(srv.base_url, srv.model, "Print the project's name.", tools=[BASH_TOOL],
                                  handlers={"Bash": bash}, max_tokens=96, **GREEDY)
    assert ran == [tiny.TOOL_ARGUMENTS["command"]]
    [call] = trip.calls
    assert call.name == tiny.TOOL_NAME and call.arguments == tiny.TOOL_ARGUMENTS and call.id
    assert trip.results == ["ktutorial\n"]
    assert trip.final.content == tiny.ANSWER_TEXT["result"]
    assert trip.final.reasoning == tiny.REASONING_TEXT["result"]
    assert trip.final.tool_calls == [] and trip.final.finish_reason == "stop"
    roles = [m["role"] for m in trip.transcript]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert trip.transcript[1]["reasoning_content"] == tiny.REASONING_TEXT["call"]  # kept in history
    assert trip.transcript[2]["tool_call_id"] == call.id
    # the same call, streamed: arguments arrive in pieces and are put back together
    streamed = client.chat(srv.base_url, srv.model, "Print the project's name.", tools=[BASH_TOOL],
                           stream=True, max_tokens=96, **GREEDY)
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [(tiny.TOOL_NAME, tiny.TOOL_ARGUMENTS)]
    assert streamed.finish_reason == "tool_calls"
    with pytest.raises(client.UserError, match="has no handler"):
        client.tool_round_trip(srv.base_url, srv.model, "Print it.", tools=[BASH_TOOL], handlers={}, max_tokens=96)


def test_timed_stream_measures_one_reply(srv):
    timing = client.timed_stream(srv.base_url, srv.model, "hello there", max_tokens=12, ignore_eos=True)
    assert timing.tokens_from == "usage"
    assert timing.output_tokens == 12
    assert timing.prompt_tokens and timing.prompt_tokens > 3
    assert 0 < timing.ttft_s < timing.e2e_s
    assert timing.decode_tok_s == pytest.approx(11 / (timing.e2e_s - timing.ttft_s))
    assert timing.prefill_tok_s == pytest.approx(timing.prompt_tokens / timing.ttft_s)
    assert timing.server_timings["predicted_n"] == 12  # llama.cpp's own count, from the last chunk
    assert timing.server_timings["predicted_per_second"] > 0
    assert timing.finish_reason == "length"
    assert set(timing.to_dict()) >= {"ttft_s", "e2e_s", "output_tokens", "prompt_tokens", "decode_tok_s",
                                     "prefill_tok_s", "server_timings"}


def test_anthropic_messages_plain_streamed_and_with_system(srv):
    plain = client.messages(srv.base_url, srv.model, "hello", max_tokens=64, system="Answer briefly.", **GREEDY)
    assert (plain.thinking, plain.text) == (tiny.REASONING_TEXT["plain"], tiny.ANSWER_TEXT["plain"])
    assert plain.stop_reason == "end_turn"
    assert plain.usage["output_tokens"] > 0
    assert [b["type"] for b in plain.content] == ["thinking", "text"]
    seen = []
    streamed = client.messages(srv.base_url, srv.model, "hello", max_tokens=64, system="Answer briefly.",
                               stream=True, on_delta=lambda kind, text: seen.append(kind), **GREEDY)
    assert (streamed.thinking, streamed.text) == (plain.thinking, plain.text)
    assert streamed.stop_reason == plain.stop_reason
    assert seen.count("reasoning") > 1 and seen.count("content") > 1
    # the system prompt reached the model (in place of the template's default one)
    long_system = "You are the tiny model of ktutorial; answer every question in one short line. " * 4
    without = client.messages(srv.base_url, srv.model, "hello", max_tokens=1, **GREEDY)
    with_system = client.messages(srv.base_url, srv.model, "hello", max_tokens=1, system=long_system, **GREEDY)
    total = lambda r: r.usage["input_tokens"] + r.usage.get("cache_read_input_tokens", 0)  # noqa: E731
    assert total(with_system) > total(without)


def test_api_key_comes_from_the_environment_and_is_never_printed(srv, monkeypatch):
    secret = "sk-ktutorial-test-0123456789"
    monkeypatch.setenv("KTUTORIAL_API_KEY", secret)
    assert client.api_key() == secret and client.api_key_status() == "set"
    ktutorial = str(Path(sys.executable).parent / "ktutorial")
    for args in (["chat", "--stream", "--json", "hello", "--max-tokens", "64"],
                 ["chat", "--anthropic", "--stream", "hello", "--max-tokens", "64"]):
        out = subprocess.run([ktutorial, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert secret not in out.stdout + out.stderr
        assert tiny.ANSWER_TEXT["plain"] in out.stdout
    assert secret not in srv.log_path.read_text()
    monkeypatch.delenv("KTUTORIAL_API_KEY")
    # OpenAI's own key is for OpenAI: never sent to a local server or another --base-url
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-" + secret)
    assert client.api_key() == client.NO_KEY and client.api_key_status() == "missing"
    assert "sk-openai-" not in str(client.openai_client(srv.base_url).api_key)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_use_round_trip(srv, stream):
    ask = [{"role": "user", "content": "Print the project's name."}]
    first = client.messages(srv.base_url, srv.model, ask, tools=[BASH_TOOL_ANTHROPIC], max_tokens=96,
                            stream=stream, **GREEDY)
    assert first.stop_reason == "tool_use"
    [use] = first.tool_uses
    assert use["name"] == tiny.TOOL_NAME and use["input"] == tiny.TOOL_ARGUMENTS and use["id"]
    assert first.thinking == tiny.REASONING_TEXT["call"]
    history = ask + [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "ktutorial"}]},
    ]
    final = client.messages(srv.base_url, srv.model, history, tools=[BASH_TOOL_ANTHROPIC], max_tokens=96,
                            stream=stream, **GREEDY)
    assert final.stop_reason == "end_turn" and final.tool_uses == []
    assert (final.thinking, final.text) == (tiny.REASONING_TEXT["result"], tiny.ANSWER_TEXT["result"])
