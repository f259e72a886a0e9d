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

    #[test]
    fn bulk_read_hides_the_current_span_and_leaves_the_process_dispatcher_in_charge() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::Layer;
        use vpnbot::db::bulk_read::BulkRead;
        // Arrange: a process subscriber at `info` that counts events and events whose parent
        // is the span named `caller`.
        let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let layer = CountEvents(counts.clone()).with_filter(LevelFilter::INFO);
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .unwrap();
        fn warn_here() {
            tracing::warn!(target: "vpnbot::test", "bulk read test event");
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let caller = tracing::info_span!(target: "vpnbot::test", "caller");

        // Act: the callsite is first reached inside a BulkRead, then again outside.
        let inside_current_is_none = rt.block_on(tracing::Instrument::instrument(
            BulkRead::new(async {
                warn_here();
                tracing::Span::current().is_none()
            }),
            caller.clone(),
        ));
        let after_inside = counts[0].load(Ordering::SeqCst);
        warn_here();

        // Assert: what sqlx would capture is no span; the event inside reached the process
        // subscriber with the caller as parent; the callsite was not cached as "never".
        assert!(inside_current_is_none, "a span was current inside BulkRead");
        assert_eq!(after_inside, 1, "the event inside BulkRead was lost");
        assert_eq!(counts[1].load(Ordering::SeqCst), 1, "its parent was not the caller");
        assert_eq!(
            counts[0].load(Ordering::SeqCst),
            2,
            "a callsite first reached inside BulkRead stopped logging outside it"
        );
        assert_eq!(LevelFilter::current(), LevelFilter::INFO, "the max level moved");
        assert!(!tracing::enabled!(target: "sqlx::query", Level::DEBUG));
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

/// Counts events (`[0]`) and events whose parent span is named `caller` (`[1]`).
struct CountEvents(std::sync::Arc<[std::sync::atomic::AtomicUsize; 2]>);

impl<S> tracing_subscriber::Layer<S> for CountEvents
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        use std::sync::atomic::Ordering;
        self.0[0].fetch_add(1, Ordering::SeqCst);
        if ctx.event_span(event).is_some_and(|s| s.name() == "caller") {
            self.0[1].fetch_add(1, Ordering::SeqCst);
        }
    }
}
