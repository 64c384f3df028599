"""`ktutorial tune`: the bisection driven by a fake probe (the search logic alone), its records and
--resume, the dry-run plan, bad input, the tuned profile; and the real probe on the tiny llama.cpp
profile (a real launch and a context-length prompt that passes, a prompt past the server's context
and a launch that fails), each recorded, no server left behind."""

from __future__ import annotations

import json
import math

import psutil
import pytest
import yaml

from ktutorial import diagnose, results, server, synth, tune
from ktutorial.cli import main as _main
from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError
from ktutorial.profiles import load_profile

H200 = {"gpus": [{"name": "NVIDIA H200", "memory_gb": 140.4}], "gpu_count": 1, "cpu_cores": 16, "numa_nodes": 1,
        "ram_gb": 125, "cpu_flags": ["avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_tile"]}


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture(scope="module")
def synth_profile(tmp_path_factory):
    """The minimax-m2.1-synth profile on a described H200, planned from a 2-layer config.json
    (no weights: nothing here launches it)."""
    folder = tmp_path_factory.mktemp("synth2l")
    (folder / "config.json").write_text(json.dumps(synth.config_dict(2)))
    data = yaml.safe_load(load_profile("minimax-m2.1-synth").model_dump_json())
    data.update(name="synth-h200", model_dir=str(folder), described_hardware=H200, sweep_spec=None)
    path = folder / "synth-h200.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def threshold(boundary: int, calls: list[int], hints: bool = False, hint_error: int = 0):
    """A fake probe for the search alone: passes up to `boundary`, fails past it like the engine
    does (a refused prompt a little past, a launch without room further on)."""
    def probe(value: int, reason: str) -> tune.ProbeResult:
        calls.append(value)
        hint = boundary + hint_error if hints else None
        if value <= boundary:
            return tune.ProbeResult("ok", 1.0, boundary_hint=hint)
        if value - boundary < 12:
            return tune.ProbeResult("prompt_refused", 1.0, f"KV pool short by {value - boundary} experts",
                                    boundary_hint=hint)
        return tune.ProbeResult("launch_failed", 1.0, "No GPU memory left for the KV cache: ...", boundary_hint=hint)

    return probe


# ---- the search --------------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", [-1, 0, 1, 37, 127, 128, 129, 200, 255, 256])
@pytest.mark.parametrize("start", [0, 128, 256])
def test_bisection_finds_the_boundary_and_the_failure_one_past_it(boundary, start):
    calls: list[int] = []
    found, first_failing, steps = tune.largest_passing(threshold(boundary, calls), 0, 256, start)
    assert found == (boundary if boundary >= 0 else None)
    assert first_failing == (boundary + 1 if boundary < 256 else None)
    by_value = {s.value: s.result for s in steps}
    if found is not None:
        assert by_value[found].ok
    if first_failing is not None:
        failed = by_value[first_failing]
        assert not failed.ok and failed.diagnosis  # the value one past was really launched, and why it failed is kept
    assert len(calls) == len(set(calls)) == len(steps)  # no value is probed twice
    # doubling to bracket, halving to close: about 2 log2(distance) probes, never a linear walk
    distance = abs(boundary - start) + 2
    assert len(calls) <= 2 * math.ceil(math.log2(distance)) + 2, calls
    assert steps[0].reason == "start" and steps[0].value == start


def test_a_start_that_fails_steps_down_with_doubling_steps():
    calls: list[int] = []
    found, failing, steps = tune.largest_passing(threshold(100, calls), 0, 256, 200)
    assert (found, failing) == (100, 101)
    assert calls[:6] == [200, 199, 197, 193, 185, 169]  # 1, 2, 4, 8, 16 below the last failure
    assert [s.reason for s in steps[:2]] == ["start", "bracket"] and steps[-1].reason == "bisect"


def test_start_at_the_boundary_costs_two_probes():
    calls: list[int] = []
    assert tune.largest_passing(threshold(128, calls), 0, 256, 128)[:2] == (128, 129) and calls == [128, 129]
    assert tune.simulated_launches(0, 256, 128, 128) == 2


@pytest.mark.parametrize("boundary", [3, 100, 128, 140, 250])
@pytest.mark.parametrize("error", [0, -1, 1])
def test_an_engines_hint_shortens_the_search_and_never_changes_its_answer(boundary, error):
    plain: list[int] = []
    hinted: list[int] = []
    assert tune.largest_passing(threshold(boundary, plain), 0, 256, 128)[:2] == (boundary, boundary + 1)
    assert tune.largest_passing(threshold(boundary, hinted, True, error), 0, 256, 128)[:2] == (boundary, boundary + 1)
    assert len(hinted) <= 4 and len(hinted) <= len(plain)


def test_a_wrong_hint_costs_probes_not_the_answer():
    calls: list[int] = []
    found = tune.largest_passing(threshold(90, calls, hints=True, hint_error=60), 0, 256, 128)
    assert found[:2] == (90, 91)


def test_the_chunk_ladder_climbs_until_a_rung_fails():
    assert tune.chunk_ladder(32768, 40000) == [32768, 65536]
    assert tune.chunk_ladder(2048, 8192) == [2048, 4096, 8192] and tune.chunk_ladder(65536, 40000) == [65536]

    def probe(chunk, reason):
        return tune.ProbeResult("ok" if chunk <= 4096 else "prompt_failed", 1.0, "" if chunk <= 4096 else "CUDA OOM")

    best, failing, steps = tune.largest_rung(probe, [2048, 4096, 8192, 16384])
    assert (best, failing) == (4096, 8192) and [s.value for s in steps] == [2048, 4096, 8192]


# ---- a whole tune with a fake probe: records, resume --------------------------------------------


def _fake_engine(boundary: int, chunk_limit: int, calls: list[dict]):
    def probe(settings: dict) -> tune.ProbeResult:
        calls.append(dict(settings))
        n, chunk = settings[tune.EXPERTS], settings[tune.CHUNK]
        if n > boundary:
            return tune.ProbeResult("launch_failed", 2.0, "CUDA out of memory: lower --kt-num-gpu-experts",
                                    details={"log_tail": "torch.OutOfMemoryError: CUDA out of memory."})
        if chunk > chunk_limit:
            return tune.ProbeResult("prompt_failed", 2.0, "CUDA out of memory in the prefill")
        return tune.ProbeResult("ok", 2.0)

    return probe


def test_tune_records_every_probe_and_the_result(synth_profile, tmp_path):
    tp = tune.make_tune_plan(str(synth_profile), boundary_for_fraction=128)
    out = tmp_path / "tune.jsonl"
    calls: list[dict] = []
    run = tune.run_tune(tp, _fake_engine(135, 32768, calls), out=out)
    assert (run.boundary, run.first_failing, run.chunk, run.chunk_first_failing) == (135, 136, 32768, 65536)
    recs = results.load_records(out)
    probes = [r for r in recs if r["kind"] == "tune_probe"]
    assert len(probes) == len(calls) == run.launches and run.reused == 0
    failed = [p for p in probes if not p["metrics"]["ok"]]
    assert failed and all(p["metrics"]["diagnosis"] for p in failed)
    assert any("OutOfMemoryError" in (p["metrics"].get("log_tail") or "") for p in failed)
    one_past = [p for p in probes if p["params"]["settings"] == {tune.EXPERTS: 136, tune.CHUNK: 32768}]
    assert one_past and one_past[0]["metrics"]["outcome"] == "launch_failed"
    assert [p["params"]["phase"] for p in probes][-1] == "chunk"
    (result,) = [r for r in recs if r["kind"] == "tune_result"]
    m = result["metrics"]
    assert m["boundary"] == 135 and m["first_failing"] == 136 and m["first_failing_outcome"] == "launch_failed"
    assert "CUDA out of memory" in m["first_failing_diagnosis"]
    assert m["chunked_prefill_size"] == 32768 and m["chunk_first_failing"] == 65536
    assert m["planner_predicted_boundary"] == 128 and m["planner_error_experts"] == 7
    assert m["settings"][tune.EXPERTS] == 135 and m["settings"][tune.FRACTION] == pytest.approx(0.0475, abs=5e-4)
    assert m["probes"] == len(run.steps)
    shown = run._repr_markdown_()  # one markdown text: a notebook renders it, the CLI prints it through rich
    assert f"| # | {tune.EXPERTS} | {tune.CHUNK} | why | outcome |" in shown
    assert "| 136 | 32768 |" in shown and "**launch_failed**" in shown
    assert f"boundary: {tune.EXPERTS} 135; 136 fails (launch_failed); the planner predicted 128 (+7)" in shown


def test_resume_reuses_recorded_probes_and_an_interrupted_tune_loses_nothing(synth_profile, tmp_path):
    tp = tune.make_tune_plan(str(synth_profile), boundary_for_fraction=128, no_chunk=True)
    out = tmp_path / "tune.jsonl"
    calls: list[dict] = []
    engine = _fake_engine(135, 65536, calls)

    def interrupted(settings):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the host's time ran out mid-search
        return engine(settings)

    with pytest.raises(KeyboardInterrupt):
        tune.run_tune(tp, interrupted, out=out)
    assert len(results.load_records(out)) == 3  # every finished probe is on disk

    again: list[dict] = []
    run = tune.run_tune(tp, _fake_engine(135, 65536, again), out=out, resume=True)
    assert (run.boundary, run.first_failing) == (135, 136)
    assert run.reused == 3 and run.launches == len(again) and calls[:3] == [s for _p, s, _st in run.steps[:3]]
    assert not any(c in calls[:3] for c in again)  # nothing recorded was launched again

    def must_not_launch(settings):
        raise AssertionError(f"resume launched a recorded probe: {settings}")

    third = tune.run_tune(tp, must_not_launch, out=out, resume=True)
    assert (third.boundary, third.launches, third.reused) == (135, 0, len(third.steps))
    # another setup (another fraction) shares nothing with these records
    other = tune.make_tune_plan(str(synth_profile), boundary_for_fraction=100, no_chunk=True)
    with pytest.raises(AssertionError, match="resume launched"):
        tune.run_tune(other, must_not_launch, out=out, resume=True)


def test_nothing_passing_is_a_result_and_writes_no_profile(synth_profile, tmp_path):
    tp = tune.make_tune_plan(str(synth_profile), boundary_for_fraction=8, hi=16)
    run = tune.run_tune(tp, _fake_engine(-1, 65536, []), out=tmp_path / "t.jsonl")
    assert run.boundary is None and run.first_failing == 0 and run.metrics()["first_failing_outcome"] == "launch_failed"
    with pytest.raises(UserError, match="nothing to write"):
        tune.write_profile(run, tmp_path / "p.yaml")


def test_the_command_runs_the_tune_writes_the_profile_and_exits_by_its_result(synth_profile, tmp_path, monkeypatch,
                                                                               capsys):
    """The CLI glue around run_tune (progress lines, records, --write-profile, the exit code), with
    the launcher replaced: what a launch does is the real probe's test below."""
    boundary = {"n": 131}

    class FakeLauncher:
        def __init__(self, *args, **kwargs):
            self.engine = _fake_engine(boundary["n"], 32768, [])

        def __call__(self, settings):
            return self.engine(settings)

    monkeypatch.setattr(tune, "ServerProbe", FakeLauncher)
    out, written = tmp_path / "tune.jsonl", tmp_path / "mine.yaml"
    argv = ["tune", "--profile", str(synth_profile), "--fraction-for-boundary", "128", "--out", str(out),
            "--write-profile", str(written)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "boundary: kt-num-gpu-experts 131; 132 fails (launch_failed)" in " ".join(captured.out.split())
    assert "probe kt-num-gpu-experts 132, chunked-prefill-size 32768: launch_failed" in captured.err
    assert load_profile(str(written)).sglang[tune.EXPERTS] == 131
    assert [r["kind"] for r in results.load_records(out)][-1] == "tune_result"

    assert main([*argv, "--resume", "--json"]) == 0  # every probe recorded: nothing launches
    again = json.loads(capsys.readouterr().out)
    assert again["boundary"] == 131 and again["launches"] == 0 and again["reused"] == again["probes"]

    boundary["n"] = -1
    assert main(["tune", "--profile", str(synth_profile), "--fraction-for-boundary", "2", "--max", "4",
                 "--out", str(tmp_path / "none.jsonl"), "--write-profile", str(tmp_path / "none.yaml")]) == 1
    assert "no kt-num-gpu-experts in [0, 4] passed" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "none.yaml").exists()


# ---- the tuned profile -----------------------------------------------------------------------------


def test_the_tuned_profile_loads_and_serves_its_measured_values(synth_profile, tmp_path):
    tp = tune.make_tune_plan(str(synth_profile), boundary_for_fraction=128)
    run = tune.run_tune(tp, _fake_engine(140, 32768, []), out=tmp_path / "tune.jsonl")
    path = tune.write_profile(run, tmp_path / "synth-tuned.yaml")
    prof = load_profile(str(path))
    assert prof.name == "synth-tuned" and prof.context_tokens == 40000
    assert prof.sglang[tune.EXPERTS] == 140 and prof.sglang[tune.CHUNK] == 32768
    assert prof.sglang["attention-backend"] == "triton"  # the base profile's own flags stay
    assert prof.tuned["boundary"] == 140 and prof.tuned["first_failing"] == 141
    assert prof.tuned["records"] == "tune.jsonl" and "CUDA out of memory" in prof.tuned["first_failing_diagnosis"]
    # The planner puts the boundary at 128; the measured 140 still launches from the tuned profile ...
    flags = sglang_kt.parse_command(server.prepare(prof, dry_run=True).command)
    assert flags[tune.EXPERTS] == "140" and flags[tune.FRACTION] == f"{prof.sglang[tune.FRACTION]:g}"
    # ... while the same values asked of the untuned profile are refused by the planner's estimate.
    with pytest.raises(UserError, match="do not fit"):
        sets = [f"{tune.FRACTION}={prof.sglang[tune.FRACTION]}"]
        server.prepare(str(synth_profile), dry_run=True, plan_options={"sets": sets}, overrides={tune.EXPERTS: 140})


def test_set_wins_over_the_profiles_sglang_block(synth_profile):
    launch = server.prepare(str(synth_profile), dry_run=True, plan_options={"sets": ["mem-fraction-static=0.07"]})
    assert sglang_kt.parse_command(launch.command)["mem-fraction-static"] == "0.07"
    plain = server.prepare(str(synth_profile), dry_run=True)
    assert sglang_kt.parse_command(plain.command)["mem-fraction-static"] == "0.5"


# ---- dry run and bad input ------------------------------------------------------------------------


def test_dry_run_prints_the_search_plan_and_starts_nothing(synth_profile, capsys):
    assert main(["tune", "--profile", str(synth_profile), "--fraction-for-boundary", "128", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "kt-num-gpu-experts in [0, 256]" in text and "start: 128" in text
    assert "predicts the boundary at 128" in text and "demonstration aid" in text
    assert "launches: 2 if the boundary is at the start" in text and "65536" in text
    assert "--kt-num-gpu-experts 128" in text and "--mem-fraction-static 0.0474" in text
    assert "sglang.launch_server" in text and not server.running()

    assert main(["tune", "--profile", str(synth_profile), "--fraction-for-boundary", "128", "--dry-run", "--json",
                 "--min", "100", "--max", "160", "--no-chunk", "--context-tokens", "20000"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["min"], plan["max"], plan["chunk_rungs"], plan["context_tokens"]) == (100, 160, [], 20000)
    assert plan["planner_predicted_boundary"] == plan["start"] == 128 and plan["prompt_tokens"] == 20000 - 8 - 2
    flags = sglang_kt.parse_command(plan["first_command"].split(" ", 1)[1].split())
    assert flags["max-total-tokens"] == "20000"


def test_the_fraction_aid_puts_the_planners_boundary_where_asked(synth_profile):
    tp = tune.make_tune_plan(str(synth_profile), boundary_for_fraction=40)
    assert tp.predicted_boundary == 40
    fraction = float(tp.sets[-1].split("=")[1])
    for n, fits in ((40, True), (41, False)):
        replanned = tp.plan.replan({**server.profile_flags(tp.profile, tp.plan), tune.EXPERTS: n, tune.CHUNK: tp.chunk})
        assert replanned.fits is fits and replanned.settings[tune.FRACTION].value == fraction


@pytest.mark.parametrize("argv, message", [
    (["--min", "200", "--max", "100"], "--min 200 > --max 100"),
    (["--max", "300"], "300 > the 256 experts"),
    (["--set", "kt-num-gpu-expert=4"], "not a flag ktutorial emits"),
    (["--set", "kt-num-gpu-experts=4"], "tune searches it"),
    (["--set", "mem-fraction-static=0.3", "--fraction-for-boundary", "10"], "drop --set mem-fraction-static"),
])
def test_bad_input_is_refused_before_anything_starts(synth_profile, argv, message, capsys):
    assert main(["tune", "--profile", str(synth_profile), *argv]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not server.running()


def test_a_llamacpp_profile_is_refused_with_what_tune_does(capsys):
    assert main(["tune", "--profile", "tiny", "--dry-run"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "runs llamacpp" in err and "--kt-num-gpu-experts" in err and "sglang-kt profile" in err


# ---- what the engine says about its memory -------------------------------------------------------


def test_the_kv_room_from_sglangs_log_and_the_diagnosis_of_a_pool_too_small():
    log = ("[2026-12-05 10:00:01 TP0] Load weight begin. avail mem=139.50 GB\n"
           "[2026-12-05 10:00:31 TP0] Load weight end. elapsed=30.1 s, type=MiniMaxM2ForCausalLM, "
           "dtype=torch.bfloat16, avail mem=133.60 GB, mem usage=5.90 GB.\n")
    room = sglang_kt.kv_room_from_log(log, 0.05, 8192)
    assert room == math.floor((133.60 - 139.50 * 0.95) * 2**30 / 8192)
    assert sglang_kt.kv_room_from_log(log, 0.04, 8192) < 0  # no room: the launch fails
    assert sglang_kt.kv_room_from_log("nothing loaded", 0.05, 8192) is None
    found = diagnose.diagnose("AssertionError: Memory pool size is too small", engine="sglang-kt")
    assert [d.id for d in found] == ["kv-cache-no-room"]


def test_a_probes_hint_is_where_the_room_sglang_logged_would_just_hold_the_context(synth_profile, tmp_path):
    """The arithmetic of the hint on a log shaped like sglang-kt's: 128 experts of 2 layers loaded
    at a 0.0474984 static fraction leave 0.665 GiB of KV room, 13 experts' worth beyond 40,000 tokens."""
    from types import SimpleNamespace

    tp = tune.make_tune_plan(str(synth_profile), boundary_for_fraction=128)
    probe = tune.ServerProbe(tp.profile, tp.context_tokens, expert_bytes=tp.expert_bytes,
                             kv_bytes_per_token=tp.kv_bytes_per_token)
    log = tmp_path / "sglang.log"
    log.write_text("Load weight begin. avail mem=139.85 GB\nLoad weight end. elapsed=31.0 s, type=X, dtype=torch.bfloat16, "
                   "avail mem=133.87 GB, mem usage=5.98 GB.\n")
    srv = SimpleNamespace(launch=SimpleNamespace(command=["python", "-m", "sglang.launch_server", "--mem-fraction-static", "0.0474984"]),
                          log_path=log)
    settings = tp.settings(128)
    details: dict = {}
    room = math.floor((133.87 - 139.85 * (1 - 0.0474984)) * 2**30 / 8192)
    assert probe._hint(srv, settings, {"server_max_total_num_tokens": 40000, "server_max_total_tokens": 40000},
                       details) == 128 + math.floor((room - 40000) * 8192 / tp.expert_bytes) == 141
    assert details["kv_room_tokens_from_log"] == room
    # A pool below the cap is all the room there was: it says so exactly, without the log.
    short = {"server_max_total_num_tokens": 40000 - 3 * 3456, "server_max_total_tokens": 40000}
    assert probe._hint(srv, settings, short, {}) == 128 - 3
    # FACTS: one FP8 expert is 14.16 MB (plus its block scales), in each of 2 layers; 8 KiB of KV a token
    assert tp.expert_bytes == pytest.approx(2 * 14.16e6, rel=1e-3) and tp.kv_bytes_per_token == 8192


def test_the_synth_profiles_own_folder_is_what_its_probes_launch(capsys):
    assert main(["tune", "--profile", "minimax-m2.1-synth", "--dry-run"]) == 0
    assert "--model-path ~/models/MiniMax-M2.1-synth-2l" in capsys.readouterr().out


# ---- the real probe: llama.cpp on the tiny ----------------------------------------------------------


def _our_servers() -> list[int]:
    me = psutil.Process()
    return [p.pid for p in me.children(recursive=True) if "ktutorial.engines.llamacpp" in " ".join(p.cmdline())]


def test_the_real_probe_launches_prompts_stops_and_classifies(tiny_model, tmp_path):
    out = tmp_path / "probes.jsonl"
    setup = {"profile": "tiny", "context_tokens": 256}
    fits = tune.ProbeLog(tune.ServerProbe("tiny", 256, ready_timeout_s=60), setup, out=out)
    ok = fits({"ctx_size": 512, "threads": 2}, "experts", "start")
    assert ok.outcome == "ok", ok
    assert ok.details["server_prompt_tokens"] == 256 - 8 and ok.details["output_tokens"] == 8
    assert ok.details["server_ctx_tokens"] == 512 and ok.wall_s >= ok.details["launch_s"] > 0

    too_long = tune.ProbeLog(tune.ServerProbe("tiny", 1024, ready_timeout_s=60), setup, out=out)
    refused = too_long({"ctx_size": 256, "threads": 2}, "experts", "bracket")
    assert refused.outcome == "prompt_refused" and "exceeds the available context size" in refused.diagnosis
    assert "HTTP 400" in refused.details["error"]

    # A real launch failure: llama.cpp starts, then refuses a buffer type that does not exist.
    broken = fits({"override_tensor": ["exps=NOSUCHBUF"], "threads": 2}, "experts", "bisect")
    assert broken.outcome == "launch_failed" and "exited" in broken.details["error"]
    assert "unknown buffer type" in broken.details["log_tail"]

    recs = results.load_records(out)
    assert [r["metrics"]["outcome"] for r in recs] == ["ok", "prompt_refused", "launch_failed"]
    assert all(r["kind"] == "tune_probe" and r["params"]["probe_key"] for r in recs)
    assert recs[1]["params"]["settings"] == {"ctx_size": 256, "threads": 2} and recs[1]["metrics"]["diagnosis"]
    assert not server.running() and not _our_servers()  # every probe stopped its server
