#!/usr/bin/env bash
# ktutorial on its real engine: SGLang + KT-Kernel serving the tiny model (and MiniMax-M2.1's real
# layer shape) on a GPU host, every step through the `ktutorial` command, every result a record.
# results/README.md says how to call it.
#
#   bash results/gpu-host.sh OUT_DIR [STEP ...]
#
# STEP (default: all of them, in this order):
#   serve    doctor; `ktutorial serve --profile tiny-sglang` (left running); the exact replies over
#            OpenAI and Anthropic; `claude-code check` straight at SGLang and through the proxy; bench
#   tutorial the notebooks under --profile tiny-sglang (papermill), reusing that server; they stop it
#   stop     `ktutorial stop --all`, and no process of SGLang (scheduler, detokenizer) may be left
#   parser   the same Claude Code checks with --reasoning-parser minimax (what Claude Code then sees)
#   failures the real engine started with what ktutorial refuses before a launch (--kt-method fp8, no
#            --kt-num-gpu-experts): its log, and ktutorial's diagnosis of that log
#   sweep    `ktutorial sweep tiny-sglang`: GPU experts 0/4/16, prefill threshold below/above the prompt
#   synth    MiniMax-M2.1's layer shape: `ktutorial synth --layers 2`, kt-kernel alone (kernel-bench at
#            the profile's --kt-cpuinfer), then `ktutorial sweep minimax-m2.1-synth` (GPU experts 0-256)
#   perf     MiniMax-M2.1's layer shape at two depths (`synth --layers 2` and `4`): decode through the
#            engine over --kt-cpuinfer 14/16/12/8 with every expert on the CPU (sweep
#            minimax-m2.1-synth-depth), prompts of 8192 and 32768 tokens (minimax-m2.1-synth-long), and
#            kt-kernel alone at the same thread counts (kernel-bench, decode and a 2048-token chunk)
#   placement uniform against recorded expert placement on held-out prompts (`ktutorial placement
#            compare`), on the tiny and on a 2-layer M2.1-width checkpoint with skewed routing
#            (KTUTORIAL_PLACEMENT_SYNTH=0 skips the latter)
#   load     tiny-sglang with --max-running-requests 8: replies, the single-request bench, then
#            `bench --concurrency 1,2,4,8` and Poisson arrivals at 4 req/s; stop and count what is left
#   tune     `ktutorial tune` on the 2-layer M2.1-width checkpoint, --mem-fraction-static set so the
#            planner puts the --kt-num-gpu-experts boundary at 128 (KTUTORIAL_TUNE_ARGS adds options)
#   hybrid   one MiniMax-M2.1 layer split between the GPU (SGLang's fused FP8 MoE) and kt-kernel (14
#            threads): first `kernel-bench --gpu-probe` (the GPU half alone, a minute), then
#            `kernel-bench --hybrid` over N = 0..256 GPU experts (about 3 minutes)
#            (perf, placement, load, tune and hybrid are not in the default list: run them by name)
#
# The GPU host's python3 must hold torch with CUDA and sglang-kt. With no network there, the offline
# bundle of sglang-kt (../shared/sglang-gpu-host) is unpacked first when KTUTORIAL_GPU_BUNDLE names it,
# and KTUTORIAL_NB_WHEELS may name a folder of wheels for the notebooks (papermill, ipykernel, ...).
# KTUTORIAL_NOTEBOOKS limits the tutorial step to some notebooks (names, space-separated).
set -uo pipefail
out=${1:?usage: bash results/gpu-host.sh OUT_DIR [STEP ...]}; shift
steps=${*:-serve tutorial stop parser failures sweep synth}
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

if [ -n "${KTUTORIAL_GPU_BUNDLE:-}" ]; then
  site=${KTUTORIAL_GPU_SITE:-/tmp/sglang-site}
  [ -f "$site/env.sh" ] || bash "$KTUTORIAL_GPU_BUNDLE/setup.sh" "$site" >/dev/null
  # shellcheck disable=SC1091
  source "$site/env.sh"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export KTUTORIAL_HOME=${KTUTORIAL_HOME:-/tmp/ktutorial-home}
kt() { python3 -m ktutorial "$@"; }
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
records="$out/records.jsonl"
# KTUTORIAL_BUDGET_S: seconds this run may take (a lent host's call is limited); the tutorial step,
# the longest, gets what is left less the time to pack the results.
started=$(date +%s)
remaining() { echo $(( ${KTUTORIAL_BUDGET_S:-86400} - ($(date +%s) - started) - 30 )); }

leftover() {  # SGLang's scheduler and detokenizer are children: none may outlive `ktutorial stop`
  sleep 3
  ps -eo pid,pgid,stat,etimes,args | grep -E 'sglang.launch_server|sglang::|ktutorial.ccproxy' | grep -v grep \
    | tee -a "$out/leftover.txt" | wc -l
}

step_serve() {
  log "doctor"; kt doctor --json > "$out/doctor.json" 2>&1 || true
  log "serve --profile tiny-sglang"
  if ! kt serve --profile tiny-sglang --detach --json > "$out/serve.json" 2> "$out/serve.err"; then
    log "serve failed:"; tail -40 "$out/serve.err"; return 1
  fi
  log "replies"; kt replies --out "$records" || log "some replies differ (records say which)"
  log "claude-code check, straight at SGLang, then through ktutorial's proxy"
  kt claude-code check --out "$records" --json > "$out/claude-check-direct.json" 2>&1 || log "direct: not all green"
  kt claude-code check --via-proxy --out "$records" --json > "$out/claude-check-proxy.json" 2>&1 \
    || log "via proxy: not all green"
  log "bench"; kt bench --out "$records" --json > /dev/null || log "bench failed"
}

step_tutorial() {
  if [ -n "${KTUTORIAL_NB_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nbsite "$KTUTORIAL_NB_WHEELS"/*.whl \
      2>&1 | tail -2
    # ahead of the bundle's site, whose IPython is a stub made for the server alone
    export PYTHONPATH="$here:/tmp/nbsite${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # The download notebook fetches from ktutorial's stand-in hub on 127.0.0.1; the hub client's
  # offline switches (the bundle sets TRANSFORMERS_OFFLINE, which implies HF_HUB_OFFLINE) block that too.
  unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
  log "tutorial --profile tiny-sglang (${KTUTORIAL_NOTEBOOKS:-every notebook})"
  only=(); for n in ${KTUTORIAL_NOTEBOOKS:-}; do only+=(--only "$n"); done
  left=$(remaining); [ "$left" -gt 60 ] || { log "tutorial skipped: ${left} s left"; return 1; }
  timeout "$left" python3 -m ktutorial tutorial --profile tiny-sglang --out "$out/tutorial" --no-site "${only[@]}" \
    > "$out/tutorial.log" 2>&1 || log "tutorial: a notebook failed, or its time ran out"
  tail -12 "$out/tutorial.log"
}

step_stop() {
  log "stop"; kt stop --all --json > /dev/null
  n=$(leftover); log "processes left after stop: $n"
  python3 - "$records" "$n" <<'PY'
import sys
from ktutorial import results
results.append_record(sys.argv[1], results.make_record(
    "orphan_check", {"after": "ktutorial stop --all", "profile": "tiny-sglang",
                     "pattern": "sglang.launch_server|sglang::|ktutorial.ccproxy"},
    {"processes_left": int(sys.argv[2])}))
PY
}

step_parser() {
  log "serve --set reasoning-parser=minimax; claude-code check direct and through the proxy"
  kt serve --profile tiny-sglang --set reasoning-parser=minimax --detach > /dev/null 2>&1 || { log "serve failed"; return 1; }
  kt claude-code check --out "$records" > /dev/null 2>&1 || true
  kt claude-code check --via-proxy --out "$records" > /dev/null 2>&1 || true
  kt replies --out "$records" > /dev/null 2>&1 || true
  step_stop
}

step_failures() {
  log "the engine with --kt-method fp8, and with no --kt-num-gpu-experts"
  python3 - "$records" <<'PY'
import sys, time
from ktutorial import diagnose, results, server
records = sys.argv[1]
base = server.prepare("tiny-sglang")
for variant in ("kt-method fp8", "no kt-num-gpu-experts"):
    cmd = list(base.command)
    if variant == "kt-method fp8":
        cmd[cmd.index("--kt-method") + 1] = "fp8"
    else:
        i = cmd.index("--kt-num-gpu-experts"); del cmd[i:i + 2]
    port = server.free_port(); cmd[cmd.index("--port") + 1] = str(port)
    launch = server.Launch(engine="sglang-kt", command=cmd, model=base.model, port=port, env=base.env,
                           profile="tiny-sglang-failures", ready_timeout_s=240)
    srv, t0, ready, rc, error = server.Server(launch), time.monotonic(), False, None, None
    try:
        srv.start(); ready = True
    except server.ServerStartError as exc:
        rc, error = exc.returncode, str(exc).splitlines()[0]
    seconds = time.monotonic() - t0
    text = open(srv.log_path, errors="replace").read()
    srv.stop()
    found = diagnose.diagnose(text, returncode=rc, command=cmd, engine="sglang-kt")
    keep = [l for l in text.splitlines() if any(k in l for k in (
        "Error", "KTransformers", "kt_num_gpu_experts", "not supported", "Traceback"))][-12:]
    results.append_record(records, results.make_record(
        "engine_log", {"variant": variant, "profile": "tiny-sglang"},
        {"became_ready": ready, "returncode": rc, "seconds": round(seconds, 1), "error": error,
         "diagnoses": [d.id for d in found], "log_lines": keep}))
    print(f"{variant}: ready={ready} rc={rc} after {seconds:.0f} s; diagnoses {[d.id for d in found]}")
PY
}

step_sweep() {
  log "sweep tiny-sglang"
  kt sweep tiny-sglang --out "$records" --json > "$out/sweep.json" 2>&1 || log "sweep: some combinations failed"
  log "processes left after the sweep: $(leftover)"
}

step_synth() {
  log "synth --layers 2"
  kt synth --layers 2 --out ~/models/MiniMax-M2.1-synth-2l --force --json > "$out/synth.json" || return 1
  threads=$(python3 -c "from ktutorial import server; from ktutorial.profiles import load_profile
print(server.plan_for_profile(load_profile('minimax-m2.1-synth')).settings['kt-cpuinfer'].value)")
  log "kernel-bench --threads $threads --layers 2 (kt-kernel alone, same threads)"
  kt kernel-bench --threads "$threads" --layers 2 --out "$records" --json > "$out/kernel-bench.json" 2>&1 \
    || log "kernel-bench failed"
  log "sweep minimax-m2.1-synth"
  kt sweep minimax-m2.1-synth --out "$records" --json > "$out/sweep-synth.json" 2>&1 || log "sweep: some combinations failed"
  log "processes left after the sweep: $(leftover)"
}

synth_dir() { echo "$HOME/models/MiniMax-M2.1-synth-${1}l"; }
ensure_synth() {  # a warm host keeps the folder from an earlier call: make it once
  [ -f "$(synth_dir "$1")/model.safetensors.index.json" ] && return 0
  log "synth --layers $1"
  kt synth --layers "$1" --out "$(synth_dir "$1")" --force --json > "$out/synth-$1l.json"
}

step_perf() {
  ensure_synth 2 && ensure_synth 4 || { log "synth failed"; return 1; }
  kernel() {  # kt-kernel alone: decode (1 and 4 tokens) and one 2048-token chunk, at these threads
    [ "$(remaining)" -gt 30 ] || { log "kernel-bench $1 skipped: out of time"; return 1; }
    timeout "$(remaining)" python3 -m ktutorial kernel-bench --threads "$1" --layers 2 --prefill-tokens 2048 \
      --repeats 100 --out "$records" --json > "$out/kernel-bench-$1.json" 2>&1 || log "kernel-bench $1 failed"
  }
  log "kernel-bench --threads 14"; kernel 14
  for spec in minimax-m2.1-synth-depth minimax-m2.1-synth-long; do
    [ "$(remaining)" -gt 60 ] || { log "sweep $spec skipped: out of time"; continue; }
    log "sweep $spec"
    timeout "$(remaining)" python3 -m ktutorial sweep "$spec" --out "$records" --resume --json > "$out/sweep-$spec.json" 2>&1 \
      || log "sweep $spec: some combinations failed, or its time ran out"
  done
  log "kernel-bench --threads 16,12,8"; kernel 16,12,8
  log "processes left after the sweeps: $(leftover)"
}

step_placement() {  # uniform against recorded placement on held-out prompts, through the engine
  log "placement compare --profile tiny-sglang --gpu-experts 4"
  kt placement compare --profile tiny-sglang --gpu-experts 4 --out "$records" --json \
    > "$out/placement-tiny.json" 2>&1 || { log "placement tiny failed:"; tail -5 "$out/placement-tiny.json"; }
  log "processes left: $(leftover)"
  cp -r "$KTUTORIAL_HOME/placement" "$out/placement-files" 2>/dev/null || true  # the dumps and the placement file
  [ "${KTUTORIAL_PLACEMENT_SYNTH:-1}" = 1 ] || return 0
  d="$HOME/models/MiniMax-M2.1-synth-skewed-2l"
  [ -f "$d/model.safetensors.index.json" ] || kt synth --layers 2 --routing skewed --out "$d" --force --json \
    > "$out/synth-skewed.json" || { log "synth skewed failed"; return 1; }
  [ "$(remaining)" -gt 200 ] || { log "placement synth skipped: out of time"; return 1; }
  log "placement compare --profile minimax-m2.1-synth (skewed routing) --gpu-experts 16"
  timeout "$(remaining)" python3 -m ktutorial placement compare --profile minimax-m2.1-synth --model-dir "$d" \
    --gpu-experts 16 --out "$records" --json > "$out/placement-synth.json" 2>&1 \
    || { log "placement synth failed:"; tail -5 "$out/placement-synth.json"; }
  log "processes left: $(leftover)"
}

step_load() {  # under load: 1-8 requests at once through SGLang + KT, SGLang running up to 8 together
  kt stop --all > /dev/null 2>&1  # `bench` without --base-url measures the server started last: this one
  log "serve --profile tiny-sglang --set max-running-requests=8"
  if ! kt serve --profile tiny-sglang --set max-running-requests=8 --detach --json > "$out/serve-load.json" \
      2> "$out/serve-load.err"; then
    log "serve failed:"; tail -40 "$out/serve-load.err"; return 1
  fi
  log "replies and the single-request bench (the SGLang adapter since engines own their HTTP)"
  kt replies --out "$records" > "$out/replies-load.txt" 2>&1 || log "some replies differ (records say which)"
  kt bench --input-lens 128,1024 --output-len 32 --repeats 2 --out "$records" > "$out/bench-load.txt" 2>&1 \
    || log "single-request bench failed"
  log "bench --concurrency 1,2,4,8 (512 tokens in, 64 out)"
  kt bench --concurrency 1,2,4,8 --input-lens 512 --output-len 64 --config "tiny-sglang, max-running-requests 8" \
    --out "$records" > "$out/load.txt" 2>&1 || log "load: some requests failed (the records say which)"
  log "bench --concurrency 8 --request-rate 4 (Poisson arrivals, seed 0)"
  kt bench --concurrency 8 --request-rate 4 --num-requests 32 --input-lens 512 --output-len 64 \
    --config "tiny-sglang, max-running-requests 8" --out "$records" >> "$out/load.txt" 2>&1 \
    || log "load at 4 req/s: some requests failed"
  step_stop
}

step_tune() {  # the --kt-num-gpu-experts boundary on this GPU, found by real launches
  ensure_synth 2 || { log "synth failed"; return 1; }
  kt tune --profile minimax-m2.1-synth --fraction-for-boundary 128 --dry-run > "$out/tune-plan.txt" 2>&1 \
    || { log "tune plan refused:"; tail -5 "$out/tune-plan.txt"; return 1; }
  [ "$(remaining)" -gt 150 ] || { log "tune skipped: out of time"; return 1; }
  log "tune minimax-m2.1-synth (about 40 s a launch; run the step again to resume)"
  timeout "$(remaining)" python3 -m ktutorial tune --profile minimax-m2.1-synth --fraction-for-boundary 128 \
    ${KTUTORIAL_TUNE_ARGS:-} --ready-timeout 300 --out "$records" --resume \
    --write-profile "$out/minimax-m2.1-synth-tuned.yaml" > "$out/tune.txt" 2> "$out/tune.err" \
    || log "tune: no boundary found, or out of time"
  tail -6 "$out/tune.err"; tail -8 "$out/tune.txt"
  log "processes left after the tune: $(leftover)"
}

step_hybrid() {
  log "kernel-bench --gpu-probe (the GPU half alone: which kernel, its error, time against the roofline)"
  timeout "$(remaining)" python3 -m ktutorial kernel-bench --gpu-probe --out "$records" > "$out/gpu-probe.txt" 2>&1 \
    || { log "gpu probe failed:"; tail -30 "$out/gpu-probe.txt"; return 1; }
  tail -12 "$out/gpu-probe.txt"
  log "kernel-bench --hybrid --threads 14"
  timeout "$(remaining)" python3 -m ktutorial kernel-bench --hybrid --threads 14 --out "$records" > "$out/hybrid.txt" 2>&1 \
    || { log "hybrid failed:"; tail -40 "$out/hybrid.txt"; return 1; }
  tail -25 "$out/hybrid.txt"
}

for step in $steps; do "step_$step"; done
kt stop --all > /dev/null 2>&1  # a step cut short leaves nothing running
# Few files travel back from a lent host: the records, and two archives (the server logs, one file
# per launch; everything else, the executed notebooks among them).
tar -czf "$out/logs.tar.gz" -C "$KTUTORIAL_HOME" logs 2>/dev/null || true
( cd "$out" && find . -mindepth 1 -maxdepth 1 ! -name records.jsonl ! -name logs.tar.gz ! -name run.log \
    ! -name extra.tar.gz -print0 | tar -czf extra.tar.gz --null -T - --remove-files ) 2>/dev/null || true
log "records: $(wc -l < "$records" 2>/dev/null || echo 0) in $records"
