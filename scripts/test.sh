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
cargo test --workspace --all-targets --locked "$@"
