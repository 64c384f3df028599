"""bench.measure against the real llama.cpp server on the tiny model: records pass the schema,
prompts are exactly L tokens, the prefix cache is defeated, client and server agree on decode.
Speed itself is never asserted."""

from __future__ import annotations

import json
import statistics

import httpx
import pytest

from ktutorial import bench, results
from ktutorial.cli import main as _main
from ktutorial.engines import llamacpp
from ktutorial.errors import UserError

LENS = [64, 256]
OUTPUT_LEN = 64
REPEATS = 4


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except SystemExit as exc:  # typer's standalone mode exits instead of returning
        return int(exc.code or 0)


@pytest.fixture(scope="module")
def measured(tiny_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    recs = bench.measure(tiny_server.base_url, input_lens=LENS, output_len=OUTPUT_LEN, repeats=REPEATS,
                         warmup=1, out=out, config="tiny test")
    return out, recs


def test_records_are_written_as_measured_and_pass_the_schema(measured):
    out, recs = measured
    lines = out.read_text().splitlines()
    assert len(lines) == len(LENS) * REPEATS == len(recs)  # one line per request; warm-ups not recorded
    loaded = results.load_records(out)  # validates every line
    assert loaded == recs
    for rec in loaded:
        p, m, env = rec["params"], rec["metrics"], rec["env"]
        assert rec["kind"] == "bench" and p["config"] == "tiny test" and p["output_len"] == OUTPUT_LEN
        assert env["engine"] == "llamacpp" and env["model"] == "ktutorial-tiny" and env["server_is_local"]
        assert m["output_tokens"] == m["server_output_tokens"] == OUTPUT_LEN  # exactly output_len (ignore_eos)
        assert m["ttft_s"] > 0 and m["e2e_s"] > m["ttft_s"]
        assert m["prefill_tok_s"] == pytest.approx(p["input_len"] / m["ttft_s"])
        assert m["decode_tok_s"] == pytest.approx((OUTPUT_LEN - 1) / (m["e2e_s"] - m["ttft_s"]))
        assert len(rec["samples"]["token_times_s"]) == OUTPUT_LEN
    assert sorted({r["params"]["input_len"] for r in recs}) == LENS


def test_prompts_are_exactly_L_tokens_by_the_servers_count(measured):
    _, recs = measured
    for rec in recs:
        assert rec["metrics"]["server_prompt_tokens"] == rec["params"]["input_len"]
        assert rec["metrics"]["prompt_len_ok"] is True
    assert len({r["params"]["prompt_head"] for r in recs}) == len(recs)  # a unique head each time


def test_client_and_server_decode_agree_within_5_percent(measured, tiny_server):
    _, recs = measured
    assert all(r["metrics"]["server_decode_tok_s"] > 0 for r in recs)
    # The tiny model decodes a token in about a millisecond, so one scheduling stall of the client
    # or of the server's HTTP thread (this machine's 2 cores are shared) shifts a request's
    # figures by tens of percent. Such requests show it: the first token reached the client long
    # after the server finished the prompt. Judge the method on requests without that stall,
    # measuring more (up to twice) when the machine was too busy to give enough of them.
    calm = [r for r in recs if r["metrics"]["first_token_delay_ms"] < 20]
    for _ in range(2):
        if len(calm) >= 4:
            break
        more = bench.measure(tiny_server.base_url, input_lens=LENS, output_len=OUTPUT_LEN, repeats=REPEATS, warmup=0)
        calm += [r for r in more if r["metrics"]["first_token_delay_ms"] < 20]
    assert len(calm) >= 4, "the machine was too busy for a fair comparison"
    rel = [r["metrics"]["decode_rel_diff"] for r in calm]
    assert abs(statistics.median(rel)) < 0.05, rel


def test_repeated_length_is_not_served_from_the_prefix_cache(measured, tiny_server):
    _, recs = measured
    for length in LENS:
        same = [r for r in recs if r["params"]["input_len"] == length]
        for rec in same:
            assert rec["metrics"]["server_cached_tokens"] == 0
            assert rec["metrics"]["server_evaluated_tokens"] == length  # the whole prompt evaluated
            assert rec["metrics"]["prefix_cache_hit"] is False
        # and the client sees it too: the second request is not a small fraction of the first
        assert same[1]["metrics"]["ttft_s"] > 0.2 * same[0]["metrics"]["ttft_s"]

    # The check can fail: the same prompt twice with the cache on is served from the cache.
    api = llamacpp.LlamaCppAPI(tiny_server.base_url, httpx.Client())
    ids, _ = bench.PromptBuilder(api).build(128)
    body = {"prompt": ids, "n_predict": 2, "cache_prompt": True, "ignore_eos": True}
    timings = [httpx.post(tiny_server.base_url + "/completion", json=body, timeout=60).json()["timings"] for _ in range(2)]
    assert timings[0]["cache_n"] <= 1 and timings[1]["cache_n"] >= 127


def test_cli_bench_defaults_to_the_running_server(tiny_server, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    rc = main(["bench", "--input-lens", "32", "--output-len", "8", "--repeats", "2", "--warmup", "0",
               "--out", str(out), "--json"])
    assert rc == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["records"] == 2 and shown["summary"][0]["key"] == {"input_len": 32}
    recs = results.load_records(out)
    assert len(recs) == 2 and all(r["env"]["model"] == "ktutorial-tiny" for r in recs)
    assert recs[0]["env"]["model_revision"].startswith("tiny seed 0")  # from the server's profile


def test_bad_input_is_refused_with_the_fix(tiny_server, tmp_path, capsys):
    # A prompt longer than the server's context is refused before a request is sent.
    with pytest.raises(UserError, match="context of 65536 tokens"):
        bench.measure(tiny_server.base_url, input_lens=[70000], output_len=8, repeats=1, warmup=0)
    assert main(["bench", "--base-url", tiny_server.base_url, "--input-lens", "2k,abc", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "not a whole number" in capsys.readouterr().err
    assert bench.parse_lens("2k, 8192 ,32k") == [2048, 8192, 32768]
    assert not (tmp_path / "x.jsonl").exists()


def test_no_server_says_how_to_start_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTUTORIAL_HOME", str(tmp_path / "empty-home"))
    assert main(["bench", "--out", str(tmp_path / "y.jsonl")]) == 2
    assert "ktutorial serve --profile tiny" in capsys.readouterr().err
    with pytest.raises(UserError, match="no server answers"):
        bench.measure("http://127.0.0.1:9", input_lens=[8], output_len=2, repeats=1, warmup=0)


def test_reply_checks_cover_every_api_and_are_exact_on_llamacpp(tiny_server, tmp_path):
    out = tmp_path / "replies.jsonl"
    assert _main(["replies", "--out", str(out)]) == 0
    recs = results.load_records(out)
    assert [r["params"]["check"] for r in recs] == list(bench.REPLY_CHECKS)
    assert all(r["metrics"]["exact"] for r in recs)
    assert {r["env"]["engine"] for r in recs} == {"llamacpp"}
    tools = [r for r in recs if r["params"]["check"].endswith("tools")]
    assert all(r["metrics"]["tool_calls"] == [{"name": "Bash", "arguments": {"command": "echo ktutorial"}}]
               for r in tools)


def test_a_reply_check_that_cannot_run_is_recorded_as_not_exact(tiny_server):
    [rec] = bench.reply_checks(tiny_server.base_url, tiny_server.model, which=("no-such-api",))
    assert rec["metrics"]["exact"] is False and "unknown reply check" in rec["metrics"]["error"]


def test_a_synthetic_checkpoint_is_never_named_as_the_real_model(tmp_path):
    from ktutorial import synth
    from ktutorial.profiles import load_profile

    (tmp_path / "config.json").write_text(json.dumps(synth.config_dict(2, seed=3, routing="skewed")))
    ident = bench.model_identity(tmp_path)
    assert ident["model_layers"] == 2
    assert "synthetic minimax-m2.1: 2 layers" in ident["model_revision"] and "seed 3" in ident["model_revision"]
    prof = load_profile("minimax-m2.1-synth").model_copy(update={"model_dir": str(tmp_path)})
    assert bench.model_revision_for(prof) == ident["model_revision"]
    real = load_profile("minimax-m2.1")
    assert bench.model_revision_for(real) == "MiniMaxAI/MiniMax-M2.1@main"
