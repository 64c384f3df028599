"""Records: shape, the environment stamp, append/load, compare."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from ktutorial import results
from ktutorial.results import RecordError


def _bench(input_len, prefill, decode, **params):
    return results.make_record(
        "bench",
        {"input_len": input_len, "output_len": 8, **params},
        {"ttft_s": input_len / prefill, "e2e_s": 1.0, "output_tokens": 8, "prefill_tok_s": prefill, "decode_tok_s": decode},
        samples={"itl_s": [0.1, 0.1]},
    )


def test_stamp_describes_the_machine_without_naming_it():
    stamp = results.environment_stamp(engine="llamacpp", model="ktutorial-tiny")
    for key in ("ktutorial_version", "git_sha", "python", "torch_version", "kt_kernel_version",
                "kt_kernel_variant", "xllamacpp_version", "gpus", "gpu_driver", "cpu_model",
                "cpu_physical_cores", "numa_nodes", "ram_gb", "os", "kernel"):
        assert key in stamp
    assert stamp["engine_version"] == stamp["xllamacpp_version"]  # looked up from the engine name
    assert stamp["ram_gb"] > 0 and stamp["cpu_logical"] >= 1
    text = json.dumps(stamp)
    assert socket.gethostname() not in text or len(socket.gethostname()) < 4
    assert os.path.expanduser("~") not in text


def test_append_load_validate_roundtrip(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    recs = [_bench(128, 1000.0, 50.0), _bench(128, 1100.0, 52.0), _bench(512, 2000.0, 48.0)]
    for r in recs:
        results.append_record(path, r)
    lines = path.read_text().splitlines()
    assert len(lines) == 3  # one line per record
    loaded = results.load_records(path)
    assert loaded == recs
    assert results.load_records(tmp_path) == recs  # a folder of *.jsonl


def test_truncated_tail_is_skipped_but_bad_middle_line_raises(tmp_path):
    path = tmp_path / "r.jsonl"
    results.append_record(path, _bench(128, 1000.0, 50.0))
    with open(path, "a") as f:
        f.write('{"schema": "ktutorial.rec')  # a writer killed mid-line
    assert len(results.load_records(path)) == 1
    with open(path, "a") as f:
        f.write("\n" + json.dumps(_bench(128, 1.0, 1.0)) + "\n")
    with pytest.raises(RecordError, match=r"r.jsonl:2"):
        results.load_records(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("env"), "lacks env"),
        (lambda r: r.update(schema="other/1"), "schema"),
        (lambda r: r.update(time_utc="yesterday"), "ISO"),
        (lambda r: r["metrics"].pop("decode_tok_s"), "decode_tok_s"),
        (lambda r: r["metrics"].update(decode_tok_s=float("nan")), "null"),
        (lambda r: r["env"].pop("python"), "environment_stamp"),
    ],
)
def test_validate_names_the_problem(mutate, message):
    rec = _bench(128, 1000.0, 50.0)
    mutate(rec)
    with pytest.raises(RecordError, match=message):
        results.validate_record(rec)


def test_make_record_scrubs_paths_and_converts_numpy():
    np = pytest.importorskip("numpy")
    home = os.path.expanduser("~")
    rec = results.make_record("x", {"model_path": os.path.join(home, "m.gguf")}, {"v": np.float32(2.5)})
    assert rec["params"]["model_path"] == "~/m.gguf"
    assert rec["metrics"]["v"] == 2.5 and type(rec["metrics"]["v"]) is float


def test_compare_groups_by_declared_keys():
    recs = [
        _bench(512, 2000.0, 48.0, threads=2),
        _bench(128, 1000.0, 50.0, threads=2),
        _bench(128, 1100.0, 52.0, threads=2),
        _bench(128, 900.0, 40.0, threads=1),
    ]
    groups = results.compare(recs, ["threads", "input_len"], metrics=["prefill_tok_s", "decode_tok_s"])
    assert [tuple(g["key"].values()) for g in groups] == [(1, 128), (2, 128), (2, 512)]
    two = groups[1]["metrics"]["prefill_tok_s"]
    assert two["n"] == 2 and two["mean"] == pytest.approx(1050.0) and two["min"] == 1000.0 and two["max"] == 1100.0
    assert two["stdev"] == pytest.approx(70.7107, rel=1e-4)
    assert groups[0]["metrics"]["decode_tok_s"]["stdev"] == 0.0  # one sample: no spread, n says so
    assert results.filter_records(recs, kind="bench", threads=1) == [recs[3]]
    assert results.stable_key({"a": 1, "b": [2]}) == results.stable_key({"b": [2], "a": 1})


def test_scrub_drops_the_folders_of_traceback_paths_a_server_sent():
    body = 'Input should be \'user\'\n\n  File "/opt/site/sglang/srt/entrypoints/http_server.py", line 9'
    assert results.scrub(body).endswith('File ".../http_server.py", line 9')
    assert results.scrub('File \\"/tmp/sg') == 'File \\".../sg'  # cut short, as a detail field keeps it


def test_a_commit_passed_by_the_sender_wins_over_the_local_git(monkeypatch):
    """A GPU host's copy of .git can lag the tree beside it: the commit named in
    KTUTORIAL_GIT_SHA is the one records carry; without it, the checkout's own HEAD."""
    import subprocess

    from ktutorial import results as res

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=str(Path(res.__file__).parent)).stdout.strip()
    monkeypatch.delenv("KTUTORIAL_GIT_SHA", raising=False)
    assert res._git()["git_sha"] == head
    monkeypatch.setenv("KTUTORIAL_GIT_SHA", "0" * 40)
    assert res._git() == {"git_sha": "0" * 40, "git_dirty": False}
