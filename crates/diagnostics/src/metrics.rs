//! Helpers to register metric families into a Prometheus registry, and shared bucket layouts.
//!
//! No global statics: every subsystem receives the [`Registry`] explicitly so tests can build
//! many apps in one process (the pattern of linkerd2-proxy's `linkerd/app/src/lib.rs`).

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Histogram buckets in seconds for waits and durations that can last as long as a stall.
///
/// From 0.5 ms to 1800 s, so that an 11-minute freeze (the predecessor's) reads as ~660 s and
/// not as a capped top bucket (row O3 of FAULTS.md).
pub const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0,
];

/// Histogram buckets in bytes for response bodies: 256 B to 256 MiB, by powers of four.
pub const BODY_BUCKETS_BYTES: &[f64] = &[
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
];

/// Registers an [`IntCounter`]. Panics only on a programming error (duplicate or invalid name).
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(name, help)).expect("valid counter opts");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric name");
    c
}

/// Registers an [`IntCounterVec`] with the given label names.
pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter opts");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric name");
    c
}

/// Registers an [`IntGauge`].
pub fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(name, help)).expect("valid gauge opts");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric name");
    g
}

/// Registers an [`IntGaugeVec`] with the given label names.
pub fn int_gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge opts");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric name");
    g
}

/// Registers a float [`Gauge`].
pub fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::with_opts(Opts::new(name, help)).expect("valid gauge opts");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric name");
    g
}

/// Registers a float [`GaugeVec`] with the given label names.
pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid gauge opts");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric name");
    g
}

/// Registers a [`Histogram`] with the given buckets.
pub fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram opts");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric name");
    h
}

/// Registers a [`HistogramVec`] with the given label names and buckets.
pub fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram opts");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric name");
    h
}

/// Renders every family of `registry` in the Prometheus text exposition format (version 0.0.4).
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::with_capacity(16 * 1024);
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding into a Vec cannot fail");
    String::from_utf8(buf).expect("exposition text is UTF-8")
}

/// The value of the first sample of family `name` whose labels include every `(key, value)` of
/// `labels`, read from exposition `text` (what `/metrics` serves). For the demo's checks and the
/// tests; not a parser of the whole format.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let head = l.rsplit_once(' ').map(|(h, _)| h).unwrap_or(l);
            let (n, rest) = head.split_once('{').unwrap_or((head, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}
