//! The subscriber `vpnbot run` installs (`Instruments::install`) costs dependencies nothing:
//! the open-span layer sits behind its own filter, so no `trace`/`debug` callsite of hyper, h2,
//! sqlx, rustls or the `log` bridge becomes enabled because of it, while vpnbot's own spans are
//! still tracked and reach the dumps.
//!
//! The subscriber test runs in its own process (rusty-fork): it installs the process-wide
//! subscriber. The log-filter test installs nothing.

use rusty_fork::rusty_fork_test;
use tracing::level_filters::LevelFilter;
use tracing::Level;
use vpnbot::config::Config;

// Its own process: it installs the process-wide subscriber `run` installs.
rusty_fork_test! {
    #[test]
    fn production_subscriber_enables_no_dependency_trace_and_still_tracks_vpnbot_spans() {
        // Arrange: exactly what `run` installs, at the default log filter.
        std::env::remove_var("RUST_LOG");
        let cfg = Config::default();
        let instruments = vpnbot::app::Instruments::install(&cfg);
        let spans = instruments
            .open_spans()
            .expect("install tracks open spans")
            .clone();

        // Act + assert: dependencies' verbose callsites are off, statically and per callsite.
        assert!(
            LevelFilter::current() <= LevelFilter::INFO,
            "the process-wide max level must stay at the log filter's (info), got {}",
            LevelFilter::current()
        );
        assert!(!tracing::enabled!(target: "hyper::proto::h1::conn", Level::TRACE));
        assert!(!tracing::enabled!(target: "h2::codec", Level::DEBUG));
        assert!(!tracing::enabled!(target: "sqlx::query", Level::DEBUG));
        assert!(!tracing::span_enabled!(target: "hyper::client::pool", Level::TRACE));
        // A dependency's info span is not tracked (only the log layer may see it).
        let dep = tracing::info_span!(target: "hyper::client", "dep_span");
        // vpnbot's own spans are tracked, with their fields, until they close.
        let ours = tracing::info_span!(target: "vpnbot::node::client", "node_call", node = "n1");
        let names: Vec<_> = vpnbot::diagnostics::InflightSource::entries(&spans)
            .into_iter()
            .filter_map(|e| e.operation.map(|op| (op, e.node)))
            .collect();
        assert!(
            names.contains(&("node_call".to_string(), Some("n1".to_string()))),
            "vpnbot span missing from the open-span registry: {names:?}"
        );
        assert!(
            !names.iter().any(|(op, _)| op == "dep_span"),
            "a dependency's span was tracked: {names:?}"
        );
        drop(ours);
        drop(dep);
        assert_eq!(spans.len(), 0, "closed spans leave the registry");

        // The read side reaches dumps: the diagnostics list the span under `spans`.
        let held = tracing::info_span!(target: "vpnbot::test", "held", label = "dump-me");
        instruments
            .diagnostics
            .add_source(std::sync::Arc::new(spans.clone()));
        let dump = instruments.diagnostics.dump_now();
        let json = dump.to_json();
        assert!(
            json.contains("dump-me"),
            "open span missing from the dump: {json}"
        );
        drop(held);
    }
}

/// The default log filter (only `target=level` directives) becomes the static per-callsite
/// `Targets` filter; span or field directives keep `EnvFilter`; garbage is refused.
#[test]
fn log_filter_is_static_unless_it_needs_span_or_field_directives() {
    use vpnbot::telemetry::{log_filter, LogFilter};
    let default = vpnbot::config::ObservabilityConfig::default().log_filter;
    assert!(
        matches!(log_filter(&default), Some(LogFilter::Static(_))),
        "{default}"
    );
    assert!(matches!(
        log_filter("warn,vpnbot::node=debug"),
        Some(LogFilter::Static(_))
    ));
    assert!(matches!(
        log_filter("info,[node.call{node=a}]=debug"),
        Some(LogFilter::Env(_))
    ));
    assert!(log_filter("info,=[{").is_none());
}
