"""Sweeps on the tiny profile with real llama.cpp servers: a failing combination is recorded with
its diagnosis and the sweep goes on; --resume skips what is recorded; --dry-run starts nothing."""

from __future__ import annotations

import json

import psutil
import pytest
import yaml

from ktutorial import bench, results, server
from ktutorial.cli import main as _main
from ktutorial.errors import UserError

SPEC = {
    "name": "tiny-test",
    "profile": "tiny",
    "serve": {"threads": [1]},
    # A real launch failure: llama.cpp starts, then refuses a buffer type that does not exist.
    "combinations": [{"threads": 1, "override_tensor": ["exps=NOSUCHBUF"]}],
    "bench": {"input_lens": [32], "output_len": 8, "repeats": 2, "warmup": 0},
    "launch_timeout_s": 60,
    "timeout_s": 120,
}


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except SystemExit as exc:  # typer's standalone mode exits instead of returning
        return int(exc.code or 0)


@pytest.fixture()
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def _our_servers() -> list[int]:
    """pids of llama.cpp children still alive (none may outlive a sweep)."""
    me = psutil.Process()
    return [p.pid for p in me.children(recursive=True) if "ktutorial.engines.llamacpp" in " ".join(p.cmdline())]


def test_sweep_records_failure_goes_on_and_resume_skips(tiny_model, spec_file, tmp_path):
    out = tmp_path / "sweep.jsonl"
    summary = bench.sweep(spec_file, out, progress=False)
    assert len(summary["plan"]) == 2 and len(summary["ok"]) == 1 and len(summary["failed"]) == 1
    recs = results.load_records(out)
    good = [r for r in recs if r["kind"] == "bench"]
    fail = [r for r in recs if r["kind"] == "sweep_failure"]
    assert len(good) == 2 and len(fail) == 1
    assert all(r["params"]["serve"] == {"threads": 1} and r["params"]["sweep"] == "tiny-test" for r in good)
    assert all(r["params"]["serve.threads"] == 1 and r["metrics"]["prompt_len_ok"] for r in good)
    assert good[0]["env"]["model_revision"].startswith("tiny seed 0")
    f = fail[0]
    assert f["params"]["serve"] == SPEC["combinations"][0]
    assert f["metrics"]["stage"] == "launch" and f["metrics"]["failure"] == "launch_failure"
    assert "unknown buffer type" in f["metrics"]["diagnosis"]  # the server log's own error line
    assert "exited" in f["metrics"]["error"]
    assert not server.running() and not _our_servers()  # nothing left behind

    # --resume: both combinations are recorded (one ok, one failed), so nothing starts again.
    def must_not_start(*_a, **_k):
        raise AssertionError("resume started a server for a recorded combination")

    lines = out.read_text().count("\n")
    again = bench.sweep(spec_file, out, resume=True, progress=False, start_server=must_not_start)
    assert len(again["skipped"]) == 2 and not again["ok"] and not again["failed"]
    assert out.read_text().count("\n") == lines

    # --resume --retry-failed runs only the failed combination again (and it fails again).
    retried = bench.sweep(spec_file, out, resume=True, retry_failed=True, progress=False)
    assert len(retried["skipped"]) == 1 and len(retried["failed"]) == 1 and not retried["ok"]
    assert len(results.filter_records(results.load_records(out), kind="sweep_failure")) == 2


def test_resume_reruns_a_combination_cut_short(tiny_model, spec_file, tmp_path):
    out = tmp_path / "sweep.jsonl"
    spec = bench.load_sweep(spec_file)
    spec.combinations = []  # only the good combination
    key = bench.combination_key(spec, {"threads": 1})
    # One of its two requests recorded, then the run was killed:
    results.append_record(out, results.make_record(
        "bench", {"input_len": 32, "output_len": 8, "combination_key": key, "sweep": "tiny-test"},
        {"ttft_s": 0.1, "e2e_s": 0.2, "output_tokens": 8, "prefill_tok_s": 320.0, "decode_tok_s": 70.0}))
    started = []

    def start(profile, serve_params, timeout_s):
        started.append(serve_params)
        return bench._start_server(profile, serve_params, timeout_s)

    summary = bench.sweep(spec, out, resume=True, progress=False, start_server=start)
    assert started == [{"threads": 1}] and summary["ok"] == [key]


def test_dry_run_prints_the_plan_and_starts_nothing(spec_file, tmp_path, capsys):
    out = tmp_path / "never.jsonl"
    assert main(["sweep", str(spec_file), "--dry-run", "--out", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert [p["serve"] for p in plan] == [{"threads": 1}, SPEC["combinations"][0]]
    assert all("--threads 1" in p["command"] for p in plan)
    assert "--override-tensor exps=NOSUCHBUF" in plan[1]["command"]
    assert not out.exists() and not server.running()


def test_bad_specs_are_refused_before_anything_starts(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPEC, "serve": {"thredas": [1]}, "combinations": []}))
    with pytest.raises(UserError, match="thredas.*known: .*threads"):
        bench.sweep(bad, tmp_path / "x.jsonl", progress=False)
    bad.write_text(yaml.safe_dump({"serve": {"threads": [1]}}))
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "needs a `profile:`" in capsys.readouterr().err
    assert main(["sweep", "no-such-sweep", "--dry-run"]) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_shipped_specs_load_and_plan():
    tiny = bench.load_sweep("tiny")
    assert tiny.profile == "tiny" and len(tiny.plan()) == 2
    m21 = bench.load_sweep("minimax-m2.1")
    assert m21.profile == "minimax-m2.1" and len(m21.plan()) == 3 * 2 + 3
    assert bench.serve_options(__import__("ktutorial.profiles").profiles.load_profile("minimax-m2.1"),
                               m21.plan()[0]) == {"overrides": {"--kt-num-gpu-experts": 8, "--chunked-prefill-size": 8192}}
    # the combination key is stable: the same spec and combination give the same key
    assert bench.combination_key(tiny, {"threads": 1}) == bench.combination_key(bench.load_sweep("tiny"), {"threads": 1})


def test_model_dir_knob_serves_another_checkpoint_and_names_it(tmp_path):
    """A sweep over depths: the `model_dir` knob changes the folder served and the revision
    records carry; it never becomes an SGLang flag of its own."""
    from ktutorial.profiles import load_profile

    depth = bench.load_sweep("minimax-m2.1-synth-depth")
    profile = load_profile(depth.profile)
    two, four = depth.plan()[0], depth.plan()[1]
    assert two["model_dir"].endswith("-2l") and four["model_dir"].endswith("-4l")
    assert bench.serve_options(profile, four) == {"overrides": {"--kt-num-gpu-experts": 0, "--kt-cpuinfer": 14}}
    folder = tmp_path / "synth-4l"
    folder.mkdir()
    from ktutorial import synth

    (folder / "config.json").write_text(json.dumps(synth.config_dict(4)))
    combo = {**four, "model_dir": str(folder)}
    assert bench.combination_profile(profile, combo).model_dir == str(folder)
    assert "4 layers" in bench.model_revision_for(bench.combination_profile(profile, combo))


def test_a_sweep_that_measured_nothing_fails_the_notebook_naming_the_diagnoses():
    """04_tuning_sweeps ends with report.sweep_observations: a sweep whose every combination failed
    must stop the tutorial run, not render an empty observation."""
    from ktutorial import report

    failure = results.make_record("sweep_failure", {"combination_key": "k1", "sweep": "tiny"},
                                  {"error": "ServerStartError: died", "diagnosis": "port in use: pick another"})
    with pytest.raises(UserError, match=r"the sweep measured nothing: 1 combination\(s\) failed \(port in use"):
        report.sweep_observations([failure])
    with pytest.raises(UserError, match="no records were written"):
        report.sweep_observations([])
