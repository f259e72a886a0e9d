//! One telemetry init: human or JSON logs with their own filter, the `log` crate bridged into
//! `tracing` (teloxide and sqlx log through it), and room for per-layer filtered extra layers
//! (tokio-console, OpenTelemetry, the diagnostics' open-span registry).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::ObservabilityConfig;

/// A boxed layer over the base registry, as passed to [`init`].
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync + 'static>;

/// Installs the global subscriber. The log layer uses `RUST_LOG` when set, else
/// `cfg.log_filter`; each of `extra` carries its own filter, so tokio's runtime spans can reach
/// tokio-console without flooding the logs.
///
/// Returns `false` when a global subscriber was already installed (tests call this repeatedly).
pub fn init(cfg: &ObservabilityConfig, extra: Vec<BoxedLayer>) -> bool {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::builder().parse(v).ok())
        .unwrap_or_else(|| {
            EnvFilter::builder()
                .parse(&cfg.log_filter)
                .unwrap_or_else(|_| EnvFilter::new("info"))
        });
    let fmt: BoxedLayer = if cfg.log_format == crate::config::LogFormat::Json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        // Colour only on a terminal: escape codes in files and journals are noise.
        use std::io::IsTerminal;
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed()
    };
    let mut layers = vec![fmt];
    layers.extend(extra);
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
}

/// Logs for tests: enabled when `TEST_LOG` is set, silent otherwise.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let cfg = ObservabilityConfig {
            log_filter: "debug,sqlx=info,hyper=info,h2=info".into(),
            ..Default::default()
        };
        init(&cfg, Vec::new());
    }
}

pub use diagnostics::non_empty;
