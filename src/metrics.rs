//! The one Prometheus registry; the helpers to register families into it and the bucket
//! layouts come from [`diagnostics::metrics`].
//!
//! No global statics: every subsystem receives the [`Registry`] explicitly so tests can build
//! many apps in one process (the pattern of linkerd2-proxy's `linkerd/app/src/lib.rs`).

use prometheus::Registry;

pub use diagnostics::metrics::*;

/// vpnbot's name in what the diagnostics create: `vpnbot_` metric names, `vpnbot-watchdog` and
/// `vpnbot-wrk-N` threads, `vpnbot-dump-*.json` files.
pub const NAMING: diagnostics::Naming = diagnostics::Naming::new("vpnbot");

/// Creates the registry every subsystem registers into, with `vpnbot_build_info` already in it.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    let build_info = gauge_vec(
        &registry,
        "vpnbot_build_info",
        "Always 1; labels carry the version of the running binary.",
        &["version"],
    );
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1.0);
    registry
}
