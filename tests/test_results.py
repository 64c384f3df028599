"""Records: shape, the environment stamp, append/load, compare."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

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
    rec = results.make_record("host_bandwidth", {"threads": 1, "model_path": os.path.join(home, "m.gguf")},
                              {"copy_gb_s": np.float32(2.5)})
    assert rec["params"]["model_path"] == "~/m.gguf"
    assert rec["metrics"]["copy_gb_s"] == 2.5 and type(rec["metrics"]["copy_gb_s"]) is float


def test_an_unknown_kind_or_a_missing_field_is_refused_with_the_fix():
    with pytest.raises(RecordError, match=r"unknown record kind 'bnech'.*bench.*results.KINDS"):
        results.make_record("bnech", {"input_len": 1}, {})
    with pytest.raises(RecordError, match=r"bench record lacks params output_len: pass it to make_record"):
        results.make_record("bench", {"input_len": 128}, {"ttft_s": 1.0, "e2e_s": 2.0, "output_tokens": 2,
                                                         "prefill_tok_s": 128.0, "decode_tok_s": 1.0})
    # each kind is a pydantic model, discriminated by its kind; extra fields are kept
    model = results.KINDS["routing"].model
    rec = results.make_record("routing", {"strategy": "uniform", "gpu_experts_per_layer": 2, "seed": 0},
                              {"gpu_activation_share": 0.5})
    bad = {**rec, "metrics": {"gpu_activation_share": float("inf")}}
    with pytest.raises(RecordError, match=r"routing record: metrics: .*gpu_activation_share is inf: store null"):
        results.validate_record(bad)
    assert model.model_validate(rec).params.seed == 0
    with pytest.raises(ValidationError, match="routing"):
        model.model_validate({**rec, "kind": "bench"})


def test_the_kinds_other_modules_write_name_their_fields():
    # A load record without its throughput is refused (report and plots read it), naming the field.
    need = results.KINDS["load"]
    params = {name: 1 for name in need.params}
    metrics = {name: 1.0 for name in need.metrics}
    assert results.make_record("load", params, metrics)["kind"] == "load"
    with pytest.raises(RecordError, match=r"load record lacks metrics output_tok_s: pass it to make_record"):
        results.make_record("load", params, {k: v for k, v in metrics.items() if k != "output_tok_s"})
    # the kinds of load, tune, placement and the GPU half of kernel_bench name their fields too
    for kind in ("hybrid_summary", "gpu_ceilings", "gpu_half_probe", "load", "tune_probe", "tune_result",
                 "placement_share"):
        assert results.KINDS[kind].params and results.KINDS[kind].metrics, kind


def test_every_committed_record_has_a_known_kind_and_its_fields():
    from pathlib import Path

    recs = results.load_records(Path(__file__).resolve().parent.parent / "results")
    assert len({r["kind"] for r in recs}) >= 8 and {r["kind"] for r in recs} <= set(results.KINDS)


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
