#!/usr/bin/env bash
# The test command: installs and starts what the tests need (system packages, PostgreSQL),
# then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# A RUSTFLAGS variable replaces build.rustflags from .cargo/config.toml: keep tokio_unstable.
if [ -n "${RUSTFLAGS:-}" ] && [[ "$RUSTFLAGS" != *tokio_unstable* ]]; then
  export RUSTFLAGS="$RUSTFLAGS --cfg tokio_unstable"
fi
bash scripts/install-deps.sh
. scripts/ensure-postgres.sh
# The workspace's binaries (vpnbot-demo, vpnbot-sim, vpnbot-node) as users run them: tests that
# drive another package's binary find it next to the test binary (tests/it/helpers).
cargo build --workspace --bins --locked
cargo test --workspace --all-targets --locked "$@"
