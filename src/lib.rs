//! vpnbot: a Telegram bot selling VLESS VPN subscriptions, with the workers that issue,
//! expire and reconcile keys on Xray nodes, built so that a stall is seen and explained.
//!
//! Planes:
//! - main runtime: bot, workers, node client, database ([`db`]);
//! - beside it: the observability server ([`obs`]) on its own OS thread and runtime;
//! - tests and demo only: simulators.
#![warn(missing_docs)]

#[cfg(not(tokio_unstable))]
compile_error!(
    "vpnbot needs `--cfg tokio_unstable` (set in .cargo/config.toml). A RUSTFLAGS environment \
     variable replaces build.rustflags: add `--cfg tokio_unstable` to it, or unset it."
);

pub mod app;
pub mod bot;
pub mod cli;
pub mod config;
pub mod db;
pub mod expiry;
pub mod fleet;
pub mod metrics;
pub mod node;
pub mod obs;
pub mod otel;
pub mod outbox;
pub mod reconcile;
pub mod signals;
pub mod sources;
pub mod supervisor;
pub mod telemetry;

// The stall diagnostics live in their own crate (`crates/diagnostics`, no dependency on
// vpnbot); re-exported under the paths the rest of the service uses.
pub use diagnostics;
pub use diagnostics::{runtime, tasks};
