//! One telemetry init: human or JSON logs with their own filter, the `log` crate bridged into
//! `tracing` (teloxide and sqlx log through it), and room for per-layer filtered extra layers
//! (tokio-console, OpenTelemetry, the diagnostics' open-span registry).

use tracing_subscriber::filter::Targets;
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
/// The log filter is decided once per callsite when it has no span or field directives (see
/// [`log_filter`]), so entering and leaving spans costs it nothing.
///
/// Returns `false` when a global subscriber was already installed (tests call this repeatedly).
pub fn init(cfg: &ObservabilityConfig, extra: Vec<BoxedLayer>) -> bool {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| log_filter(&v))
        .or_else(|| log_filter(&cfg.log_filter))
        .unwrap_or_else(|| LogFilter::Env(Box::new(EnvFilter::new("info"))));
    match filter {
        LogFilter::Static(f) => init_with(cfg, *f, extra),
        LogFilter::Env(f) => init_with(cfg, *f, extra),
    }
}

/// A parsed log filter: see [`log_filter`].
#[derive(Debug)]
pub enum LogFilter {
    /// Only `target=level` directives: decided once per callsite.
    Static(Box<Targets>),
    /// Span or field directives (`target[span{field=value}]=level`): `EnvFilter`, which tracks
    /// every span it may care about on enter and exit (a process-wide lock each time).
    Env(Box<EnvFilter>),
}

/// Parses a log filter in `RUST_LOG` syntax. A filter made only of `target=level` and `level`
/// directives (the default `info,sqlx=warn`) becomes a [`Targets`] filter, which gives the
/// same answers as `EnvFilter` for it (most specific target wins) without `EnvFilter`'s
/// per-span bookkeeping; anything else stays an `EnvFilter`. `None` when it does not parse.
pub fn log_filter(directives: &str) -> Option<LogFilter> {
    let env = EnvFilter::builder().parse(directives).ok()?;
    if directives.contains(['[', '{']) {
        return Some(LogFilter::Env(Box::new(env)));
    }
    Some(match directives.parse::<Targets>() {
        Ok(t) => LogFilter::Static(Box::new(t)),
        Err(_) => LogFilter::Env(Box::new(env)),
    })
}

fn init_with<F>(cfg: &ObservabilityConfig, filter: F, extra: Vec<BoxedLayer>) -> bool
where
    F: tracing_subscriber::layer::Filter<Registry> + Send + Sync + 'static,
{
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

/// The diagnostics' open-span layer behind its own per-layer filter, boxed for [`init`]'s
/// `extra` (what `Instruments::install` adds; the benchmarks add it alone too).
pub fn open_spans_layer(layer: diagnostics::OpenSpansLayer) -> BoxedLayer {
    Box::new(layer.filtered::<Registry>())
}
