#!/usr/bin/env bash
# Runs the demo's blocked_worker step N times (default 20) and fails unless every run reports it
# as blocked_worker within the step's bound with every check of the step held (no
# runtime_stalled episode, the sleep frame in the native stack, /healthz 503 during and 200
# after). Prints how many runs saw which kind and the detection latencies (min/median/max).
#
#   bash scripts/demo-repeat.sh [N]
#
# Each run is `vpnbot-demo --scenario blocked_worker` (the `normal` step runs first, as always),
# with its own throwaway PostgreSQL unless a database is configured. One build first, then the
# built binary: no cargo between runs. Reports and logs stay in a temporary directory (printed).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash scripts/demo-repeat.sh [N]   (N runs, default 20)" >&2
  exit 64
fi
# A RUSTFLAGS variable replaces build.rustflags from .cargo/config.toml: keep tokio_unstable.
if [ -n "${RUSTFLAGS:-}" ] && [[ "$RUSTFLAGS" != *tokio_unstable* ]]; then
  export RUSTFLAGS="$RUSTFLAGS --cfg tokio_unstable"
fi
bash scripts/install-deps.sh --demo
cargo build --locked --quiet --workspace --bins
bin="${CARGO_TARGET_DIR:-target}/debug/vpnbot-demo"
logs="$(mktemp -d /tmp/vpnbot-demo-repeat.XXXXXX)"
declare -A kinds=()
latencies=()
ok=0
bound=""
for i in $(seq 1 "$n"); do
  out="$logs/run$i.txt"
  rc=0
  "$bin" --scenario blocked_worker >"$out" 2>"$logs/run$i.log" || rc=$?
  # The step's block of the report: from its "[ok] blocked_worker:" line to the next step.
  step="$(awk '/^\[[A-Za-z]+\] blocked_worker:/{on=1; print; next} on && /^(\[|dumps:)/{on=0} on' "$out")"
  latency="$(grep -oE 'detected: yes after [0-9.]+' <<<"$step" | awk '{print $4}' || true)"
  b="$(grep -oE 'detected within [0-9.]+ s' <<<"$step" | awk '{print $3}' | head -1 || true)"
  [ -n "$b" ] && bound="$b"
  if grep -q 'runtime_stalled opened' <<<"$step"; then
    kind=runtime_stalled
  elif grep -qE '^\s+\[ok\] episode kind blocked_worker detected within' <<<"$step"; then
    kind=blocked_worker
  elif [ -n "$latency" ]; then
    kind=blocked_worker_late
  else
    kind=not_detected
  fi
  kinds[$kind]=$(( ${kinds[$kind]:-0} + 1 ))
  [ -n "$latency" ] && latencies+=("$latency")
  if [ "$rc" -eq 0 ] && grep -q '^\[ok\] blocked_worker:' <<<"$step"; then
    ok=$((ok + 1))
    verdict=ok
  else
    verdict="FAILED (exit $rc; report $out)"
  fi
  echo "run $i/$n: $kind, detected after ${latency:-?} s: $verdict"
done
summary=""
for k in "${!kinds[@]}"; do summary+="$k ${kinds[$k]}, "; done
echo "demo-repeat: $n runs: ${summary%, }; step passed in $ok/$n"
if [ "${#latencies[@]}" -gt 0 ]; then
  printf '%s\n' "${latencies[@]}" | sort -n | awk -v bound="${bound:-?}" '
    { v[NR] = $1 }
    END {
      med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "detection latency (watchdog, from the block start): min %.2f s, median %.2f s, max %.2f s (bound %s s)\n", v[1], med, v[NR], bound
    }'
fi
echo "reports and logs: $logs"
[ "$ok" -eq "$n" ]
