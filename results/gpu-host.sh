#!/usr/bin/env bash
# ktutorial on its real engine: SGLang + KT-Kernel serving the tiny model on a GPU host, every
# step through the `ktutorial` command, every result a record. results/README.md says how to call it.
#
#   bash results/gpu-host.sh OUT_DIR [STEP ...]
#
# STEP (default: all of them, in this order):
#   serve    doctor; `ktutorial serve --profile tiny-sglang`; the exact replies over OpenAI and
#            Anthropic; claude-code check straight at SGLang; bench; stop; no process left
#   failures launches that must fail, and the diagnosis ktutorial gives for each
#   sweep    `ktutorial sweep tiny-sglang`: GPU experts 0/4/16, prefill threshold below/above the prompt
#   synth    MiniMax-M2.1's layer shape: `ktutorial synth --layers 2`, kt-kernel alone (kernel-bench at
#            the profile's --kt-cpuinfer), then `ktutorial sweep minimax-m2.1-synth` (GPU experts 0-256)
#
# The GPU host's python3 must hold torch with CUDA. With no network there, the offline bundle of
# sglang-kt (../shared/sglang-gpu-host) is unpacked first when KTUTORIAL_GPU_BUNDLE names it.
set -uo pipefail
out=${1:?usage: bash results/gpu-host.sh OUT_DIR [STEP ...]}; shift
steps=${*:-serve failures sweep}
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
  log "claude-code check, straight at SGLang"
  kt claude-code check --json > "$out/claude-check-direct.json" 2>&1 || log "claude-code check: not all green"
  log "bench"; kt bench --out "$records" --json > /dev/null || log "bench failed"
  log "stop"; kt stop --all --json > /dev/null
  sleep 2
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

step_failures() {
  # Each launch is refused before start (ktutorial's own checks) or dies and is diagnosed from its log.
  for bad in "kt-method=fp8" "kt-num-gpu-experts=17"; do
    log "serve with --set $bad (must fail)"
    kt serve --profile tiny-sglang --set "$bad" --detach --ready-timeout 240 > /dev/null 2> "$out/fail.err" && kt stop --all
    python3 - "$records" "$bad" "$out/fail.err" <<'PY'
import sys
from ktutorial import results
err = open(sys.argv[3]).read()
results.append_record(sys.argv[1], results.make_record(
    "launch_failure", {"profile": "tiny-sglang", "set": sys.argv[2]},
    {"refused_before_start": "refused" in err.split("Diagnosis")[0], "message": err[-3000:]}))
PY
    tail -3 "$out/fail.err"
  done
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

for step in $steps; do "step_$step"; done
# Server logs travel back as one archive (the log folder holds one file per launch).
tar -czf "$out/logs.tar.gz" -C "$KTUTORIAL_HOME" logs 2>/dev/null || true
log "records: $(wc -l < "$records" 2>/dev/null || echo 0) in $records"
