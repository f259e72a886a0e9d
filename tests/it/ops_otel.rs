//! OTLP trace export (src/otel.rs) against real sockets: an in-process OTLP/HTTP receiver
//! (axum + opentelemetry-proto) sees a node call's span with its phase children and the
//! resource attributes; a collector that is down and one that accepts connections but never
//! answers (row O1) cost the traced code nothing, drops are counted, shutdown is bounded.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use tracing_subscriber::layer::SubscriberExt;
use vpnbot::config::ObservabilityConfig;
use vpnbot::otel::{otel_layer_with, OtelGuard, OtelSettings};

/// OTLP/HTTP receiver on loopback, on its own thread and runtime; keeps every request decoded.
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let reqs = requests.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let reqs = reqs.clone();
                        async move {
                            let req = ExportTraceServiceRequest::decode(body.as_ref())
                                .expect("valid OTLP protobuf");
                            reqs.lock().unwrap().push(req);
                            (
                                [("content-type", "application/x-protobuf")],
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )
                        }
                    }),
                );
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                axum::serve(l, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Self {
            addr: addr_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            requests,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts TCP connections and never reads or answers; holds them until dropped.
struct BlackHole {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlackHole {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cfg(endpoint: String) -> ObservabilityConfig {
    ObservabilityConfig {
        otlp_endpoint: endpoint.into(),
        ..Default::default()
    }
}

fn counter(registry: &prometheus::Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            })
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// One node call as the node client shapes it: a parent span with phase children.
fn node_call(node: &str) {
    let call = tracing::info_span!(
        target: "vpnbot::node::client",
        "node_call",
        node,
        operation = "list_users",
        http.request.method = "GET",
        http.response.status_code = 200,
    );
    call.in_scope(|| {
        for phase in ["connect", "headers", "body", "decode"] {
            tracing::info_span!(target: "vpnbot::node::client", "phase", otel.name = phase)
                .in_scope(|| std::thread::sleep(Duration::from_millis(1)));
        }
    });
}

fn until(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < bound {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

fn attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(AnyValue::StringValue(s)) => Some(s.clone()),
            Some(AnyValue::IntValue(i)) => Some(i.to_string()),
            _ => None,
        })
}

/// The OTLP layer exporting to `rx` every 100 ms.
fn exporting_to(
    rx: &Receiver,
    registry: &prometheus::Registry,
    instance: Option<&str>,
) -> (vpnbot::telemetry::BoxedLayer, OtelGuard) {
    let settings = OtelSettings {
        scheduled_delay: Duration::from_millis(100),
        instance: instance.map(str::to_string),
        ..Default::default()
    };
    otel_layer_with(
        &cfg(format!("http://{}/v1/traces", rx.addr)),
        registry,
        settings,
    )
    .expect("layer")
}

#[test]
fn disabled_without_endpoint() {
    let registry = prometheus::Registry::new();
    assert!(otel_layer_with(&cfg(String::new()), &registry, OtelSettings::default()).is_none());
    assert!(registry.gather().is_empty(), "no metrics when disabled");
}

#[test]
fn node_call_span_tree_and_resource_reach_an_otlp_receiver() {
    let rx = Receiver::start();
    let registry = prometheus::Registry::new();
    let (layer, guard) = exporting_to(&rx, &registry, Some("test-host:9187"));
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        node_call("a");
        // Not vpnbot's: the default filter keeps it out of the export.
        tracing::info_span!(target: "hyper::client", "foreign").in_scope(|| {});
    });
    assert!(
        until(Duration::from_secs(10), || guard.spans_exported() >= 5),
        "spans not exported: {}",
        guard.spans_exported()
    );
    let t = Instant::now();
    assert!(guard.shutdown(), "clean shutdown");
    assert!(t.elapsed() < Duration::from_secs(3));

    let reqs = rx.requests.lock().unwrap();
    let mut spans = Vec::new();
    for req in reqs.iter() {
        for rs in &req.resource_spans {
            let res = rs.resource.as_ref().expect("resource");
            assert_eq!(
                attr(&res.attributes, "service.name").as_deref(),
                Some("vpnbot")
            );
            assert_eq!(
                attr(&res.attributes, "service.version").as_deref(),
                Some(env!("CARGO_PKG_VERSION"))
            );
            assert_eq!(
                attr(&res.attributes, "service.instance.id").as_deref(),
                Some("test-host:9187")
            );
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().cloned());
            }
        }
    }
    assert!(
        spans.iter().all(|s| s.name != "foreign"),
        "filtered span exported"
    );
    let parent = spans
        .iter()
        .find(|s| s.name == "node_call")
        .expect("node_call span exported");
    assert_eq!(attr(&parent.attributes, "node").as_deref(), Some("a"));
    assert_eq!(
        attr(&parent.attributes, "operation").as_deref(),
        Some("list_users")
    );
    assert_eq!(
        attr(&parent.attributes, "http.request.method").as_deref(),
        Some("GET")
    );
    let mut children: Vec<&str> = spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .inspect(|s| assert_eq!(s.trace_id, parent.trace_id, "same trace"))
        .map(|s| s.name.as_str())
        .collect();
    children.sort();
    assert_eq!(children, ["body", "connect", "decode", "headers"]);
    assert_eq!(
        counter(&registry, "vpnbot_otel_export_failures_total", None),
        0.0
    );
}

/// Spans ended while the export thread cannot deliver: timing of the traced code, drops.
fn hammer(guard: &OtelGuard, layer: vpnbot::telemetry::BoxedLayer, n: usize) -> Duration {
    let subscriber = tracing_subscriber::registry().with(layer);
    let mut worst = Duration::ZERO;
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..n {
            let t = Instant::now();
            tracing::info_span!(target: "vpnbot::node::client", "node_call", i).in_scope(|| {});
            worst = worst.max(t.elapsed());
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let _ = guard;
    worst
}

#[test]
fn collector_down_costs_nothing_and_is_counted() {
    // A port that was just free: connection refused.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let registry = prometheus::Registry::new();
    let settings = OtelSettings {
        export_timeout: Duration::from_millis(500),
        scheduled_delay: Duration::from_millis(50),
        max_queue_size: 128,
        max_export_batch_size: 64,
        shutdown_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (layer, guard) = otel_layer_with(
        &cfg(format!("http://{addr}/v1/traces")),
        &registry,
        settings,
    )
    .unwrap();
    let start = Instant::now();
    let worst = hammer(&guard, layer, 2000);
    let elapsed = start.elapsed();
    assert!(
        worst < Duration::from_millis(100),
        "one span took {worst:?} with the collector down"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "2000 spans took {elapsed:?}"
    );
    assert!(
        until(Duration::from_secs(10), || counter(
            &registry,
            "vpnbot_otel_export_failures_total",
            None
        ) > 0.0),
        "export failures not counted"
    );
    assert!(
        until(Duration::from_secs(5), || guard.spans_dropped() > 0),
        "drops not counted"
    );
    assert_eq!(guard.spans_exported(), 0);
    let t = Instant::now();
    guard.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
}

#[test]
fn collector_that_never_answers_costs_nothing_and_shutdown_is_bounded() {
    let hole = BlackHole::start();
    let registry = prometheus::Registry::new();
    let settings = OtelSettings {
        export_timeout: Duration::from_secs(2),
        scheduled_delay: Duration::from_millis(50),
        max_queue_size: 64,
        max_export_batch_size: 16,
        shutdown_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let (layer, guard) = otel_layer_with(
        &cfg(format!("http://{}/v1/traces", hole.addr)),
        &registry,
        settings,
    )
    .unwrap();
    let start = Instant::now();
    let worst = hammer(&guard, layer, 1000);
    assert!(
        worst < Duration::from_millis(100),
        "one span took {worst:?} while the export thread is stuck"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    // The queue (64) fills while the first export hangs: the rest is dropped and counted.
    let queue_full = counter(
        &registry,
        "vpnbot_otel_spans_dropped_total",
        Some(("reason", "queue_full")),
    );
    assert!(queue_full > 500.0, "queue_full drops: {queue_full}");
    assert_eq!(guard.spans_exported(), 0);
    // Shutdown returns within its bound although the thread is still inside an export.
    let t = Instant::now();
    let clean = guard.shutdown();
    let took = t.elapsed();
    assert!(!clean, "a hung collector cannot be a clean shutdown");
    assert!(
        took < Duration::from_millis(1500),
        "shutdown took {took:?} (bound 500 ms)"
    );
    // The export that hung is ended by the export timeout and counted.
    assert!(
        until(Duration::from_secs(10), || counter(
            &registry,
            "vpnbot_otel_export_failures_total",
            None
        ) > 0.0),
        "a timed-out export is counted"
    );
}

/// The real node client against the node simulator, traced through the real OTLP layer: the
/// exported `node.call` span has `connect`, `headers`, `body` and `decode` children in its trace.
#[test]
fn real_node_call_exports_its_phase_children() {
    use vpnbot::node::{InflightCalls, NodeApiMetrics, NodeClient, NodeClientSettings};
    use vpnbot_sim::node::{SimNode, SimNodeOptions};

    let rx = Receiver::start();
    let registry = prometheus::Registry::new();
    let (layer, guard) = exporting_to(&rx, &registry, None);
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let sim = SimNode::start(
                l,
                SimNodeOptions {
                    users: 50,
                    ..Default::default()
                },
            );
            let client = NodeClient::new(
                "a",
                sim.base_url(),
                secrecy::SecretString::from(sim.api_key().to_string()),
                &NodeClientSettings::default(),
                NodeApiMetrics::register(&prometheus::Registry::new()),
                InflightCalls::new(),
            )
            .unwrap();
            let users = client.list_users().await.unwrap();
            assert_eq!(users.len(), 50);
        });
    });
    assert!(
        until(Duration::from_secs(10), || guard.spans_exported() >= 5),
        "spans not exported: {}",
        guard.spans_exported()
    );
    assert!(guard.shutdown());
    let reqs = rx.requests.lock().unwrap();
    let spans: Vec<_> = reqs
        .iter()
        .flat_map(|r| r.resource_spans.iter())
        .flat_map(|rs| rs.scope_spans.iter())
        .flat_map(|ss| ss.spans.iter().cloned())
        .collect();
    let call = spans
        .iter()
        .find(|s| s.name == "node.call")
        .unwrap_or_else(|| {
            panic!(
                "no node.call span in {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(attr(&call.attributes, "node").as_deref(), Some("a"));
    assert_eq!(
        attr(&call.attributes, "operation").as_deref(),
        Some("list_users")
    );
    assert_eq!(
        attr(&call.attributes, "http.response.status_code").as_deref(),
        Some("200")
    );
    let children: std::collections::BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.trace_id == call.trace_id && s.span_id != call.span_id)
        .map(|s| s.name.as_str())
        .collect();
    for phase in ["connect", "headers", "body", "decode"] {
        assert!(
            children.contains(phase),
            "no {phase} span under node.call: {children:?}"
        );
    }
}

/// Issue 11 item 1, OTLP side: a collector endpoint that answers every export with `307` to
/// another (working) receiver. The exporter must not follow it (collector headers may carry
/// credentials): the receiver sees nothing and the failed exports are counted.
#[test]
fn collector_redirect_is_not_followed() {
    use std::io::{Read, Write};
    let rx = Receiver::start();
    let redirector = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = redirector.local_addr().unwrap();
    let location = format!("http://{}/v1/traces", rx.addr);
    std::thread::spawn(move || {
        for conn in redirector.incoming() {
            let Ok(mut c) = conn else { break };
            let mut buf = [0u8; 64 * 1024];
            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    let registry = prometheus::Registry::new();
    let settings = OtelSettings {
        export_timeout: Duration::from_millis(500),
        scheduled_delay: Duration::from_millis(50),
        shutdown_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (layer, guard) = otel_layer_with(
        &cfg(format!("http://{addr}/v1/traces")),
        &registry,
        settings,
    )
    .unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || node_call("a"));
    assert!(
        until(Duration::from_secs(10), || counter(
            &registry,
            "vpnbot_otel_export_failures_total",
            None
        ) > 0.0),
        "a redirected export must count as failed"
    );
    assert_eq!(guard.spans_exported(), 0);
    guard.shutdown();
    assert!(
        rx.requests.lock().unwrap().is_empty(),
        "the redirect target must receive nothing"
    );
}
