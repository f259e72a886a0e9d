#!/usr/bin/env bash
# The main job: installs what the demo needs when missing, then runs `vpnbot-demo` (crates/devtools).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${RUSTFLAGS:-}" ] && [[ "$RUSTFLAGS" != *tokio_unstable* ]]; then
  export RUSTFLAGS="$RUSTFLAGS --cfg tokio_unstable"
fi
bash scripts/install-deps.sh --demo
# The whole workspace's binaries, as scripts/test.sh builds them: one feature resolution, so
# the demo and the tests never rebuild each other's dependencies (a `cargo run -p` of one
# package resolves features for that package alone and compiles vpnbot a second time).
cargo build --locked --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/debug/vpnbot-demo" "$@"
