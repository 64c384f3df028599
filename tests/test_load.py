"""load.measure_load against the real llama.cpp server on the tiny model (4 slots): one record a
concurrency level with exact token counts, ordered percentiles and overlapping requests; bad
input refused; a server that dies mid-run gives failed requests, not a hang. Speed itself is
never asserted."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from ktutorial import load, plots, report, results, server
from ktutorial.cli import main
from ktutorial.errors import UserError

LEVELS = [1, 2, 4]
INPUT_LEN = 64
OUTPUT_LEN = 16


@pytest.fixture(scope="module")
def loaded(tiny_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "load.jsonl"
    run = load.measure_load(tiny_server.base_url, concurrency=LEVELS, input_len=INPUT_LEN, output_len=OUTPUT_LEN,
                            out=out, config="tiny load test")
    return out, run.records


def by_level(records):
    return {r["params"]["concurrency"]: r for r in records}


def test_one_record_a_level_with_every_request_exact(loaded, tiny_server):
    out, recs = loaded
    assert results.load_records(out) == recs  # each validated, appended as its level ended
    assert [r["params"]["concurrency"] for r in recs] == LEVELS
    for rec in recs:
        p, m, env = rec["params"], rec["metrics"], rec["env"]
        assert rec["kind"] == "load" and p["config"] == "tiny load test"
        assert p["num_requests"] == max(8, 4 * p["concurrency"])  # the default count
        assert p["arrivals"] == "all at once" and p["request_rate_req_s"] is None
        assert m["completed"] == p["num_requests"] and m["failed"] == 0 and m["errors"] == []
        assert env["engine"] == "llamacpp" and env["server_slots"] == 4 and m["server_max_running_requests"] == 4
        assert m["warning"] is None and m["queued_in_server"] is False  # 4 slots hold every level here
        reqs = rec["samples"]["requests"]
        assert len(reqs) == p["num_requests"]
        for s in reqs:
            assert s["error"] is None and s["output_tokens"] == OUTPUT_LEN == len(s["token_times_s"])
            assert s["server_prompt_tokens"] == INPUT_LEN  # exactly L prompt tokens by the server's count
            assert s["server_cached_tokens"] == 0  # no prefix-cache hit under load either
            assert 0 < s["ttft_s"] <= s["e2e_s"]
        assert m["prompt_len_ok"] is True and m["server_cached_tokens_max"] == 0


def test_throughputs_follow_from_the_samples(loaded):
    _, recs = loaded
    for rec in recs:
        m, reqs = rec["metrics"], rec["samples"]["requests"]
        last_end = max(s["start_s"] + s["e2e_s"] for s in reqs)
        assert m["duration_s"] == pytest.approx(last_end)  # first send (at 0) to last finish
        assert min(s["start_s"] for s in reqs) < 0.1
        assert m["request_throughput_req_s"] == pytest.approx(m["completed"] / m["duration_s"])
        assert m["output_tok_s"] == pytest.approx(m["completed"] * OUTPUT_LEN / m["duration_s"]) and m["output_tok_s"] > 0
        assert m["total_tok_s"] == pytest.approx(m["completed"] * (INPUT_LEN + OUTPUT_LEN) / m["duration_s"])


def test_percentiles_are_ordered_and_match_the_samples(loaded):
    _, recs = loaded
    for rec in recs:
        m, reqs = rec["metrics"], rec["samples"]["requests"]
        for name in load.LATENCIES:
            assert 0 <= m[f"{name}_p50"] <= m[f"{name}_p90"] <= m[f"{name}_p99"], (name, m)
        ttfts = [s["ttft_s"] for s in reqs]
        assert m["ttft_s_p90"] == pytest.approx(float(np.percentile(ttfts, 90)))
        assert m["e2e_s_mean"] == pytest.approx(float(np.mean([s["e2e_s"] for s in reqs])))
        tpots = [(s["e2e_s"] - s["ttft_s"]) / (OUTPUT_LEN - 1) for s in reqs]
        assert m["tpot_s_p50"] == pytest.approx(float(np.median(tpots)))
        for s in reqs:  # the inter-token latencies of a request add up to its first-to-last token time
            itls = load.chunk_itls(s["token_times_s"])
            assert sum(itls) == pytest.approx(s["token_times_s"][-1] - s["token_times_s"][0], abs=1e-5)


def test_requests_overlap_up_to_the_level_and_no_further(loaded):
    _, recs = loaded
    levels = by_level(recs)

    def overlapping(reqs):
        return any(a is not b and a["start_s"] < b["start_s"] < a["start_s"] + a["e2e_s"] for a in reqs for b in reqs)

    assert not overlapping(levels[1]["samples"]["requests"]) and levels[1]["metrics"]["max_in_flight"] == 1
    assert overlapping(levels[2]["samples"]["requests"])  # some request starts before another ends
    assert levels[2]["metrics"]["max_in_flight"] == 2
    assert 2 <= levels[4]["metrics"]["max_in_flight"] <= 4
    assert levels[2]["metrics"]["mean_in_flight"] > levels[1]["metrics"]["mean_in_flight"]


def test_itl_splits_a_chunk_gap_over_its_tokens():
    # 2 tokens in the first chunk, 3 in a chunk 0.3 s later, 1 token 0.1 s after that
    assert load.chunk_itls([0.1, 0.1, 0.4, 0.4, 0.4, 0.5]) == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert load.chunk_itls([1.0]) == []
    stats = load.summary([1.0, 2.0, 3.0, 4.0], "x_s")
    assert stats == {"x_s_mean": 2.5, "x_s_p50": 2.5, "x_s_p90": pytest.approx(3.7), "x_s_p99": pytest.approx(3.97)}
    assert load.summary([], "x_s") == {"x_s_mean": None, "x_s_p50": None, "x_s_p90": None, "x_s_p99": None}


def test_poisson_arrivals_are_seeded_and_respected(tiny_server):
    a, b = load.arrival_times(8, 20.0, seed=3), load.arrival_times(8, 20.0, seed=3)
    assert a == b and a[0] == 0 and all(x < y for x, y in zip(a, a[1:]))
    assert a != load.arrival_times(8, 20.0, seed=4)
    assert load.arrival_times(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    run = load.measure_load(tiny_server.base_url, concurrency=[2], input_len=32, output_len=4, request_rate=20,
                            seed=3, warmup=0)
    (rec,) = run.records
    assert rec["params"]["arrivals"] == "poisson" and rec["params"]["request_rate_req_s"] == 20
    starts = [s["start_s"] for s in rec["samples"]["requests"]]
    # Sent no earlier than it arrived (the level's seed is seed + its index: 3 here).
    assert all(s >= t - 0.005 for s, t in zip(starts, a)), (starts, a)
    assert rec["metrics"]["completed"] == 8


def test_more_than_the_server_runs_at_once_is_said_in_record_and_cli(tiny_server, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    rc = main(["bench", "--concurrency", "8", "--num-requests", "8", "--input-lens", "32", "--output-len", "4",
               "--warmup", "0", "--out", str(out)])
    assert rc == 0
    shown = capsys.readouterr()
    table = " ".join(shown.out.split())
    assert "TTFT ms" in table and "4 (queued)" in table  # the table, the queued level marked
    assert "exceeds the 4 requests the server runs at once" in " ".join(shown.err.split())
    (rec,) = results.load_records(out)
    assert rec["metrics"]["queued_in_server"] is True and "wait in its queue" in rec["metrics"]["warning"]
    assert rec["metrics"]["completed"] == 8 and rec["env"]["model_revision"].startswith("tiny seed 0")


def test_report_and_chart_from_load_records(loaded, tmp_path):
    out, recs = loaded
    assert len(plots.load_throughput_latency(recs, tmp_path)) == 1
    written = report.write_report([out], tmp_path / "report", published=False)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Under load" in md and md.count("| tiny") == 0  # one configuration: no configuration column
    assert all(f"\n| {c} | inf | " in md for c in LEVELS)
    assert any(p.name == "load_throughput_latency.png" for p in written)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [x["params"]["concurrency"] for x in summary["load"]] == LEVELS
    shown = load.LoadRun(recs)._repr_markdown_()  # one column a level
    assert shown.startswith("| concurrency | " + " | ".join(map(str, LEVELS)) + " |") and "| rate req/s | inf |" in shown


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0"], "at least 1"),
    (["--concurrency", "1,x"], "not a whole number"),
    (["--concurrency", "1", "--request-rate", "0"], "more than 0"),
    (["--concurrency", "1", "--request-rate", "fast"], "not a number"),
    (["--concurrency", "4", "--num-requests", "2"], "less than concurrency 4"),
    (["--concurrency", "1", "--input-lens", "32,64"], "one input length"),
    (["--concurrency", "1", "--repeats", "3"], "--num-requests"),
    (["--request-rate", "2"], "add --concurrency"),
])  # fmt: skip
def test_bad_input_is_refused_with_the_fix(tiny_server, tmp_path, capsys, argv, message):
    out = tmp_path / "x.jsonl"
    assert main(["bench", "--base-url", tiny_server.base_url, "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_input_in_the_library():
    for bad in ("0", "1,x", "", "-2", "1.5"):
        with pytest.raises(UserError):
            load.parse_concurrency(bad)
    for bad in (0, -1, "nan", "x"):
        with pytest.raises(UserError):
            load.parse_request_rate(bad)
    assert load.parse_concurrency(" 1, 2,4 ") == [1, 2, 4] and load.parse_request_rate("inf") == float("inf")
    with pytest.raises(UserError, match="less than concurrency"):
        load.measure_load("http://127.0.0.1:9", concurrency=[8], num_requests=4)


def test_a_server_that_dies_mid_run_gives_failed_requests_not_a_hang(tiny_model, tmp_path):
    out = tmp_path / "died.jsonl"
    srv = server.serve("tiny", threads=1)
    killed = threading.Event()

    def kill_after_the_first(sample):
        if not killed.is_set():
            killed.set()
            srv.stop()

    got: dict = {}

    def run():
        try:
            got["run"] = load.measure_load(srv.base_url, concurrency=[2], num_requests=8, input_len=32, output_len=64,
                                           warmup=0, out=out, on_sample=kill_after_the_first, timeout_s=30)
        except BaseException as exc:  # shown by the assertion below
            got["error"] = exc

    try:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(120)
        assert not worker.is_alive(), "the load benchmark hung after its server died"
    finally:
        srv.stop()
    assert "error" not in got, got.get("error")
    (rec,) = got["run"].records
    m = rec["metrics"]
    assert killed.is_set() and not srv.is_alive()
    assert m["completed"] >= 1 and m["failed"] >= 1 and m["completed"] + m["failed"] == 8
    assert sum(e["requests"] for e in m["errors"]) == m["failed"] and all(e["error"] for e in m["errors"])
    failed = [s for s in rec["samples"]["requests"] if s["error"]]
    assert len(failed) == m["failed"] and all(s["failed_after_s"] is not None for s in failed)
    assert results.load_records(out) == [rec]  # recorded like any level
