//! OpenTelemetry trace export over OTLP/HTTP (protobuf), off the request path.
//!
//! When `observability.otlp_endpoint` is set, [`otel_layer`] returns a `tracing` layer
//! (`tracing-opentelemetry`) and a guard. Spans that end are handed to an export processor
//! that never blocks the caller:
//!
//! - `on_end` is one `try_send` into a bounded queue ([`OtelSettings::max_queue_size`]); a full
//!   queue drops the span and counts it (`vpnbot_otel_spans_dropped_total{reason="queue_full"}`);
//! - a dedicated OS thread (`vpnbot-otel`, not a tokio task) batches spans and calls the OTLP
//!   exporter with the blocking reqwest client, each export bounded by
//!   [`OtelSettings::export_timeout`]; a failed batch is counted
//!   (`vpnbot_otel_export_failures_total`, and its spans as `reason="export_failed"`);
//! - shutdown ([`OtelGuard::shutdown`], or drop) flushes what is queued within
//!   [`OtelSettings::shutdown_timeout`] and then returns whatever the collector does; spans
//!   still queued are counted as `reason="shutdown"`.
//!
//! A collector that is down or that accepts connections and never answers therefore costs the
//! service nothing but the dropped-span counter (tests: `tests/it/ops_otel.rs`).
//!
//! Resource attributes: `service.name` = `vpnbot`, `service.version` = the crate version,
//! `service.instance.id` = `<hostname>:<observability port>` (matching Prometheus' `instance`
//! label when scraped by host name), `host.name`. `OTEL_RESOURCE_ATTRIBUTES` is honoured for
//! anything else.
//!
//! We use our own processor rather than the SDK's `BatchSpanProcessor` because the latter keeps
//! its dropped-span count private (it only logs it at shutdown).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::ObservabilityConfig;
use crate::telemetry::BoxedLayer;

/// Default span filter of the export layer: vpnbot's own spans at `info` and above (bot updates
/// and handlers, node calls, pool acquires, reconcile runs and phases), plus the node calls'
/// phase children, which are `debug` so that the log layer at its default filter never enables
/// them (see `NodeClient`): with an endpoint set they are created for this layer alone.
pub const DEFAULT_SPAN_FILTER: &str = "vpnbot=info,vpnbot::node::client=debug";

/// Tuning of the export pipeline. [`Default`] gives the production values.
#[derive(Debug, Clone)]
pub struct OtelSettings {
    /// Bound on one OTLP export request, retries included (default 5 s).
    pub export_timeout: Duration,
    /// Spans waiting for export; more are dropped and counted (default 4096).
    pub max_queue_size: usize,
    /// Spans per export request (default 512).
    pub max_export_batch_size: usize,
    /// Longest time a span waits in the queue before a partial batch is sent (default 2 s).
    pub scheduled_delay: Duration,
    /// Bound on [`OtelGuard::shutdown`] (default 3 s).
    pub shutdown_timeout: Duration,
    /// `service.instance.id`; `None` means `<hostname>:<observability port>`.
    pub instance: Option<String>,
    /// `tracing` filter of the spans exported (default [`DEFAULT_SPAN_FILTER`]).
    pub span_filter: String,
}

impl Default for OtelSettings {
    fn default() -> Self {
        Self {
            export_timeout: Duration::from_secs(5),
            max_queue_size: 4096,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(3),
            instance: None,
            span_filter: DEFAULT_SPAN_FILTER.to_string(),
        }
    }
}

/// Builds the OTLP export layer with [`OtelSettings::default`]; see [`otel_layer_with`].
pub fn otel_layer(
    cfg: &ObservabilityConfig,
    registry: &Registry,
) -> Option<(BoxedLayer, OtelGuard)> {
    otel_layer_with(cfg, registry, OtelSettings::default())
}

/// Builds the OTLP export layer and its guard, or `None` when `cfg.otlp_endpoint` is empty or
/// the exporter cannot be built (logged as an error: the service runs without export rather
/// than not at all). Registers the `vpnbot_otel_*` metrics into `registry`; call once per
/// registry. Keep the guard alive for as long as spans should be exported and call
/// [`OtelGuard::shutdown`] at exit.
///
/// Must be called outside an async context or from any thread: it starts one OS thread and
/// builds a blocking HTTP client (which the exporter does on a thread of its own).
pub fn otel_layer_with(
    cfg: &ObservabilityConfig,
    registry: &Registry,
    settings: OtelSettings,
) -> Option<(BoxedLayer, OtelGuard)> {
    let endpoint = secrecy::ExposeSecret::expose_secret(&cfg.otlp_endpoint).trim();
    if endpoint.is_empty() {
        return None;
    }
    let mut exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(settings.export_timeout)
        .with_http_client(no_redirect_client(settings.export_timeout)?)
        .with_retry_policy(
            opentelemetry_otlp::RetryPolicy::recommended()
                .with_max_retries(2)
                .with_max_delay(Duration::from_millis(500)),
        )
        .build()
    {
        Ok(e) => e,
        Err(error) => {
            tracing::error!(%error, "OTLP span exporter could not be built; trace export disabled");
            return None;
        }
    };
    let instance = settings
        .instance
        .clone()
        .unwrap_or_else(|| default_instance(&cfg.listen));
    let resource = Resource::builder()
        .with_service_name("vpnbot")
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance),
            KeyValue::new("host.name", hostname()),
        ])
        .build();
    exporter.set_resource(&resource);

    let metrics = OtelMetrics::register(registry);
    let processor = ExportProcessor::start(exporter, &settings, metrics.clone());
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(processor)
        .build();
    let tracer = provider.tracer("vpnbot");
    let filter = EnvFilter::builder()
        .parse(&settings.span_filter)
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_SPAN_FILTER));
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter)
        .boxed();
    tracing::info!(
        endpoint = %redact_endpoint(endpoint),
        "OTLP trace export enabled"
    );
    Some((
        layer,
        OtelGuard {
            provider: Some(provider),
            shutdown_timeout: settings.shutdown_timeout,
            metrics,
        },
    ))
}

/// Keeps the export pipeline alive; shuts it down (bounded) on [`OtelGuard::shutdown`] or drop.
#[derive(Debug)]
pub struct OtelGuard {
    provider: Option<SdkTracerProvider>,
    shutdown_timeout: Duration,
    metrics: OtelMetrics,
}

impl OtelGuard {
    /// Exports what is queued, waiting at most the export timeout plus one second.
    ///
    /// # Errors
    /// When the export failed or did not finish in time.
    pub fn force_flush(&self) -> Result<(), OTelSdkError> {
        match &self.provider {
            Some(p) => p.force_flush(),
            None => Err(OTelSdkError::AlreadyShutdown),
        }
    }

    /// Flushes and stops the export thread within [`OtelSettings::shutdown_timeout`]. Returns
    /// `true` when everything queued was handed to the collector in time. Never blocks longer
    /// than the bound, whatever the collector does; call it from a plain thread or
    /// `spawn_blocking`, not from a runtime worker.
    pub fn shutdown(mut self) -> bool {
        self.shutdown_inner()
    }

    /// Spans handed to the collector successfully so far.
    pub fn spans_exported(&self) -> u64 {
        self.metrics.exported.get()
    }

    /// Spans dropped so far (queue full, failed export, shutdown).
    pub fn spans_dropped(&self) -> u64 {
        ["queue_full", "export_failed", "shutdown"]
            .iter()
            .map(|r| self.metrics.dropped.with_label_values(&[r]).get())
            .sum()
    }

    fn shutdown_inner(&mut self) -> bool {
        match self.provider.take() {
            Some(p) => match p.shutdown_with_timeout(self.shutdown_timeout) {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(%error, "OTLP export did not shut down cleanly");
                    false
                }
            },
            None => true,
        }
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

#[derive(Debug, Clone)]
struct OtelMetrics {
    exported: IntCounter,
    dropped: IntCounterVec,
    failures: IntCounter,
    queue: IntGauge,
    export_duration: Histogram,
}

impl OtelMetrics {
    fn register(r: &Registry) -> Self {
        let dropped = crate::metrics::counter_vec(
            r,
            "vpnbot_otel_spans_dropped_total",
            "Spans not delivered to the OTLP collector, by reason (queue_full, export_failed, \
             shutdown).",
            &["reason"],
        );
        for reason in ["queue_full", "export_failed", "shutdown"] {
            dropped.with_label_values(&[reason]);
        }
        Self {
            exported: crate::metrics::counter(
                r,
                "vpnbot_otel_spans_exported_total",
                "Spans accepted by the OTLP collector.",
            ),
            dropped,
            failures: crate::metrics::counter(
                r,
                "vpnbot_otel_export_failures_total",
                "OTLP export requests that failed or timed out (after the exporter's retries).",
            ),
            queue: crate::metrics::int_gauge(
                r,
                "vpnbot_otel_queue_spans",
                "Spans waiting in the export queue now.",
            ),
            export_duration: crate::metrics::histogram(
                r,
                "vpnbot_otel_export_duration_seconds",
                "Duration of one OTLP export request, retries included, seconds.",
                crate::metrics::DURATION_BUCKETS_SECONDS,
            ),
        }
    }
}

enum Control {
    Flush(SyncSender<OTelSdkResult>),
    Shutdown(SyncSender<OTelSdkResult>),
}

/// The exporter's blocking HTTP client, with redirects off: `OTEL_EXPORTER_OTLP_HEADERS` may
/// carry a collector's credentials, and a collector's 3xx must not send them (or the spans)
/// elsewhere. Built on a thread of its own because a blocking client may not be built or
/// dropped inside an async context (the exporter's own default does the same).
fn no_redirect_client(timeout: Duration) -> Option<otlp_reqwest::blocking::Client> {
    let built = thread::spawn(move || {
        otlp_reqwest::blocking::Client::builder()
            .timeout(timeout)
            .redirect(otlp_reqwest::redirect::Policy::none())
            .build()
    })
    .join();
    match built {
        Ok(Ok(c)) => Some(c),
        Ok(Err(error)) => {
            tracing::error!(error = %error.without_url(), "OTLP HTTP client could not be built; trace export disabled");
            None
        }
        Err(_) => {
            tracing::error!("OTLP HTTP client builder panicked; trace export disabled");
            None
        }
    }
}

/// The non-blocking span processor: bounded queue in, one export thread out.
#[derive(Debug)]
struct ExportProcessor {
    spans: SyncSender<SpanData>,
    control: SyncSender<Control>,
    wake: Thread,
    queued: Arc<AtomicUsize>,
    metrics: OtelMetrics,
    flush_timeout: Duration,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Flush(_) => "Flush",
            Control::Shutdown(_) => "Shutdown",
        })
    }
}

impl ExportProcessor {
    fn start<E: SpanExporter + 'static>(
        exporter: E,
        settings: &OtelSettings,
        metrics: OtelMetrics,
    ) -> Self {
        let (spans, span_rx) = sync_channel(settings.max_queue_size.max(1));
        let (control, control_rx) = sync_channel(4);
        let queued = Arc::new(AtomicUsize::new(0));
        let worker = ExportWorker {
            exporter,
            spans: span_rx,
            control: control_rx,
            queued: queued.clone(),
            metrics: metrics.clone(),
            batch_size: settings.max_export_batch_size.max(1),
            delay: settings.scheduled_delay,
            failing: false,
        };
        let handle = thread::Builder::new()
            .name("vpnbot-otel".into())
            .spawn(move || worker.run())
            .expect("spawn the OTLP export thread");
        Self {
            spans,
            control,
            wake: handle.thread().clone(),
            queued,
            metrics,
            flush_timeout: settings.export_timeout + Duration::from_secs(1),
            thread: Mutex::new(Some(handle)),
            stopped: AtomicBool::new(false),
        }
    }

    fn send_control(
        &self,
        make: fn(SyncSender<OTelSdkResult>) -> Control,
        bound: Duration,
    ) -> OTelSdkResult {
        let (tx, rx) = sync_channel(1);
        match self.control.try_send(make(tx)) {
            Ok(()) => {
                self.wake.unpark();
                match rx.recv_timeout(bound) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(bound)),
                    Err(RecvTimeoutError::Disconnected) => Err(OTelSdkError::AlreadyShutdown),
                }
            }
            Err(TrySendError::Full(_)) => Err(OTelSdkError::InternalFailure(
                "OTLP export control queue full".into(),
            )),
            Err(TrySendError::Disconnected(_)) => Err(OTelSdkError::AlreadyShutdown),
        }
    }
}

impl SpanProcessor for ExportProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        // One non-blocking send; never waits for the export thread. Counted before the send so
        // that the export thread never takes a span it has not seen counted.
        let n = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
        match self.spans.try_send(span) {
            Ok(()) => self.metrics.queue.set(n as i64),
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                let reason = match e {
                    TrySendError::Full(_) => "queue_full",
                    TrySendError::Disconnected(_) => "shutdown",
                };
                self.metrics.dropped.with_label_values(&[reason]).inc();
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.send_control(Control::Flush, self.flush_timeout)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let result = self.send_control(Control::Shutdown, timeout);
        if result.is_ok() {
            if let Some(h) = self.thread.lock().ok().and_then(|mut g| g.take()) {
                let _ = h.join();
            }
        } else {
            // The thread is stuck in an export (a collector that never answers past the
            // bound): leave it detached and count what it will not deliver.
            let left = self.queued.swap(0, Ordering::Relaxed) as u64;
            self.metrics
                .dropped
                .with_label_values(&["shutdown"])
                .inc_by(left);
            self.metrics.queue.set(0);
        }
        result
    }
}

struct ExportWorker<E> {
    exporter: E,
    spans: Receiver<SpanData>,
    control: Receiver<Control>,
    queued: Arc<AtomicUsize>,
    metrics: OtelMetrics,
    batch_size: usize,
    delay: Duration,
    failing: bool,
}

impl<E: SpanExporter> ExportWorker<E> {
    fn run(mut self) {
        // The exporter's own HTTP work must not be traced (it would feed itself).
        let _suppress = opentelemetry::Context::enter_telemetry_suppressed_scope();
        let mut batch: Vec<SpanData> = Vec::with_capacity(self.batch_size);
        let mut next = Instant::now() + self.delay;
        loop {
            if let Ok(c) = self.control.try_recv() {
                let result = self.drain(&mut batch);
                match c {
                    Control::Flush(reply) => {
                        let _ = reply.send(result);
                    }
                    Control::Shutdown(reply) => {
                        let left = self.queued.swap(0, Ordering::AcqRel) as u64;
                        self.metrics
                            .dropped
                            .with_label_values(&["shutdown"])
                            .inc_by(left);
                        self.metrics.queue.set(0);
                        let _ = self.exporter.shutdown();
                        let _ = reply.send(result);
                        return;
                    }
                }
                next = Instant::now() + self.delay;
                continue;
            }
            // Wake at least every 100 ms to see control messages.
            let wait = next
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            match self.spans.recv_timeout(wait) {
                Ok(span) => {
                    self.took(1);
                    batch.push(span);
                    if batch.len() >= self.batch_size {
                        let _ = self.export(&mut batch);
                        next = Instant::now() + self.delay;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() >= next {
                        if !batch.is_empty() {
                            let _ = self.export(&mut batch);
                        }
                        next = Instant::now() + self.delay;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.export(&mut batch);
                    return;
                }
            }
        }
    }

    fn took(&self, n: usize) {
        let left = self.queued.fetch_sub(n, Ordering::AcqRel).saturating_sub(n);
        self.metrics.queue.set(left as i64);
    }

    /// Exports everything queued now, batch by batch.
    fn drain(&mut self, batch: &mut Vec<SpanData>) -> OTelSdkResult {
        loop {
            while batch.len() < self.batch_size {
                match self.spans.try_recv() {
                    Ok(s) => {
                        self.took(1);
                        batch.push(s);
                    }
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            // A failing collector is not retried batch after batch: what is left stays queued
            // (flush) or is counted as dropped (shutdown).
            self.export(batch)?;
        }
    }

    fn export(&mut self, batch: &mut Vec<SpanData>) -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len() as u64;
        let started = Instant::now();
        let result = block_on(self.exporter.export(std::mem::take(batch)));
        self.metrics
            .export_duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                self.metrics.exported.inc_by(n);
                if self.failing {
                    self.failing = false;
                    tracing::info!("OTLP export recovered");
                }
            }
            Err(error) => {
                self.metrics.failures.inc();
                self.metrics
                    .dropped
                    .with_label_values(&["export_failed"])
                    .inc_by(n);
                if !self.failing {
                    // Logged once per failing streak; the counters carry the rest.
                    self.failing = true;
                    tracing::warn!(%error, spans = n, "OTLP export failing; spans dropped");
                }
            }
        }
        result
    }
}

/// Runs a future to completion on the current (plain OS) thread. The OTLP HTTP exporter with
/// the blocking client completes synchronously, except for retry back-off sleeps which it does
/// with `std::thread::sleep` outside a tokio runtime.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct ThreadWaker(Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => thread::park(),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

fn default_instance(listen: &std::net::SocketAddr) -> String {
    format!("{}:{}", hostname(), listen.port())
}

/// The endpoint without credentials or query, for logs.
fn redact_endpoint(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "<unparsable>".to_string(),
    }
}
