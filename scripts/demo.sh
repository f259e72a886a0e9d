#!/usr/bin/env bash
# The main job: installs what the demo needs when missing, then runs `vpnbot-demo` (crates/devtools).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${RUSTFLAGS:-}" ] && [[ "$RUSTFLAGS" != *tokio_unstable* ]]; then
  export RUSTFLAGS="$RUSTFLAGS --cfg tokio_unstable"
fi
bash scripts/install-deps.sh --demo
exec cargo run --locked -p vpnbot-devtools --bin vpnbot-demo -- "$@"
