//! FAULTS.md rows N1 to N12 against the node simulator over real loopback sockets, with short
//! deadlines: each asserts the typed error, the time bound, the phase in the metrics and the
//! breaker's reaction.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::proto::MetricType;
use prometheus::Registry;
use secrecy::SecretString;
use vpnbot::node::{
    BlockingResolve, BreakerState, InflightCalls, NodeApiMetrics, NodeClient, NodeClientSettings,
    NodeError, NodeUser, Operation,
};
use vpnbot_sim::node::{Fault, SimNode, SimNodeHandle, SimNodeOptions};

const NODE: &str = "n1";

struct Env {
    sim: SimNodeHandle,
    client: NodeClient,
    registry: Registry,
    inflight: InflightCalls,
}

/// Short deadlines: total 1.5 s, headers 0.4 s, body idle 0.3 s; breaker opens after 2 failed
/// calls and probes after 0.5 s.
fn fast() -> NodeClientSettings {
    NodeClientSettings {
        connect_timeout_seconds: Duration::from_millis(500),
        headers_timeout_seconds: Duration::from_millis(400),
        body_idle_timeout_seconds: Duration::from_millis(300),
        total_deadline_seconds: Duration::from_millis(1500),
        retry_max_attempts: 3,
        retry_base_delay_seconds: Duration::from_millis(50),
        retry_max_delay_seconds: Duration::from_millis(200),
        breaker_failure_threshold: 2,
        breaker_cooldown_seconds: Duration::from_millis(500),
        pool_idle_timeout_seconds: Duration::from_secs(10),
        ..Default::default()
    }
}

async fn env(settings: NodeClientSettings, opts: SimNodeOptions) -> Env {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = SimNode::start(listener, opts);
    let registry = Registry::new();
    let metrics = NodeApiMetrics::register(&registry);
    let inflight = InflightCalls::new();
    let client = NodeClient::new(
        NODE,
        sim.base_url(),
        SecretString::from(sim.api_key().to_owned()),
        &settings,
        metrics,
        inflight.clone(),
    )
    .unwrap();
    Env {
        sim,
        client,
        registry,
        inflight,
    }
}

fn users(n: usize) -> SimNodeOptions {
    SimNodeOptions {
        users: n,
        ..Default::default()
    }
}

/// Value of a counter or gauge, or the sample count of a histogram, summed over the series
/// whose labels include `labels`.
fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for fam in registry.gather() {
        if fam.name() != name {
            continue;
        }
        let kind = fam.get_field_type();
        for m in fam.get_metric() {
            let ok = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if !ok {
                continue;
            }
            total += match kind {
                MetricType::HISTOGRAM => m.get_histogram().get_sample_count() as f64,
                MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            };
        }
    }
    total
}

fn phase_count(e: &Env, op: &str, phase: &str) -> f64 {
    metric(
        &e.registry,
        "vpnbot_node_api_phase_duration_seconds",
        &[("node", NODE), ("operation", op), ("phase", phase)],
    )
}

fn inflight_gauge(e: &Env, op: &str, phase: &str) -> f64 {
    metric(
        &e.registry,
        "vpnbot_node_api_inflight_requests",
        &[("node", NODE), ("operation", op), ("phase", phase)],
    )
}

fn outcome_count(e: &Env, op: &str, outcome: &str) -> f64 {
    metric(
        &e.registry,
        "vpnbot_node_api_request_duration_seconds",
        &[("node", NODE), ("operation", op), ("outcome", outcome)],
    )
}

fn retries(e: &Env, op: &str, reason: &str) -> f64 {
    metric(
        &e.registry,
        "vpnbot_node_api_retries_total",
        &[("node", NODE), ("operation", op), ("reason", reason)],
    )
}

fn circuit(e: &Env) -> f64 {
    metric(
        &e.registry,
        "vpnbot_node_api_circuit_state",
        &[("node", NODE)],
    )
}

/// Keeps calling until the breaker opens (the threshold is 2 in [`fast`]), then checks that a
/// call fails fast without reaching the node.
async fn assert_breaker_opens(
    e: &Env,
    op: Operation,
    call: impl AsyncFn() -> Result<(), NodeError>,
) {
    for _ in 0..5 {
        if e.client.breaker_state() == BreakerState::Open {
            break;
        }
        let _ = call().await;
    }
    assert_eq!(e.client.breaker_state(), BreakerState::Open);
    assert_eq!(circuit(e), 2.0);
    let before = e.sim.requests(op);
    let t = Instant::now();
    let err = call().await.unwrap_err();
    assert!(matches!(err, NodeError::CircuitOpen { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    assert_eq!(
        e.sim.requests(op),
        before,
        "an open breaker must not touch the node"
    );
}

async fn list(e: &Env) -> Result<(), NodeError> {
    e.client.list_users().await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n1_headers_then_silent_body_fails_in_body_phase_within_deadline() {
    let e = env(fast(), users(10)).await;
    e.sim
        .set_fault(Operation::ListUsers, Fault::HeadersThenSilence);
    let t = Instant::now();
    let client = e.client.clone();
    let call = tokio::spawn(async move { client.list_users().await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Evidence while it hangs: the registry and the gauge say "headers arrived, body open".
    let snap = e.inflight.snapshot();
    assert_eq!(snap.len(), 1, "{snap:?}");
    assert_eq!((snap[0].operation, snap[0].phase), ("list_users", "body"));
    assert!(snap[0]
        .headers_after
        .is_some_and(|h| h < Duration::from_millis(150)));
    assert_eq!(inflight_gauge(&e, "list_users", "body"), 1.0);
    // The caller's worker carries on: another call on the same node completes meanwhile.
    e.client.health().await.expect("health is unaffected");

    let err = call.await.unwrap().unwrap_err();
    let elapsed = t.elapsed();
    assert!(
        matches!(
            err,
            NodeError::BodyTimeout { .. } | NodeError::DeadlineExceeded { phase: "body", .. }
        ),
        "{err:?}"
    );
    assert_eq!(err.phase(), Some("body"));
    assert!(elapsed < Duration::from_millis(2000), "{elapsed:?}");
    assert!(phase_count(&e, "list_users", "body") >= 1.0);
    assert_eq!(inflight_gauge(&e, "list_users", "body"), 0.0);
    assert!(e.inflight.snapshot().is_empty());
    assert_eq!(outcome_count(&e, "list_users", err.error_type()), 1.0);
    assert_breaker_opens(&e, Operation::ListUsers, || list(&e)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n2_trickling_body_is_ended_by_the_total_deadline() {
    // One byte every 150 ms never trips the 300 ms idle timeout: only the total deadline can.
    let e = env(fast(), users(5)).await;
    e.sim.set_fault(
        Operation::ListUsers,
        Fault::Trickle(Duration::from_millis(150)),
    );
    let t = Instant::now();
    let client = e.client.clone();
    let call = tokio::spawn(async move { client.list_users().await });
    tokio::time::sleep(Duration::from_millis(900)).await;
    let snap = e.inflight.snapshot();
    assert_eq!(snap[0].phase, "body");
    assert!(snap[0].bytes_received >= 3, "{snap:?}");
    let err = call.await.unwrap().unwrap_err();
    let elapsed = t.elapsed();
    assert!(
        matches!(err, NodeError::DeadlineExceeded { phase: "body", .. }),
        "{err:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(1450) && elapsed < Duration::from_millis(2200),
        "{elapsed:?}"
    );
    assert!(phase_count(&e, "list_users", "body") >= 1.0);
    // Issue 11 item 7: the failure carries the phase the deadline caught it in, in the
    // labels the alert uses.
    assert_eq!(
        metric(
            &e.registry,
            "vpnbot_node_api_request_failures_total",
            &[
                ("node", NODE),
                ("operation", "list_users"),
                ("outcome", "deadline_exceeded"),
                ("phase", "body")
            ]
        ),
        1.0
    );
    assert_eq!(
        e.sim.requests(Operation::ListUsers),
        1,
        "one attempt, cut by the deadline"
    );
    assert_breaker_opens(&e, Operation::ListUsers, || list(&e)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n3_endless_chunked_body_stops_at_the_cap() {
    let settings = NodeClientSettings {
        body_max_bytes: 2 * 1024 * 1024,
        total_deadline_seconds: Duration::from_secs(5),
        ..fast()
    };
    let e = env(settings, users(0)).await;
    e.sim.set_fault(Operation::ListUsers, Fault::EndlessChunked);
    let t = Instant::now();
    let err = e.client.list_users().await.unwrap_err();
    assert!(
        matches!(
            err,
            NodeError::BodyTooLarge {
                limit: 2097152,
                declared: None
            }
        ),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        e.sim.requests(Operation::ListUsers),
        1,
        "too large is not retried"
    );
    assert!(phase_count(&e, "list_users", "body") >= 1.0);
    assert_breaker_opens(&e, Operation::ListUsers, || list(&e)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n3_declared_length_over_the_cap_is_rejected_before_reading() {
    let settings = NodeClientSettings {
        body_max_bytes: 1024,
        ..fast()
    };
    let e = env(settings, users(100)).await;
    let err = e.client.list_users().await.unwrap_err();
    assert!(
        matches!(err, NodeError::BodyTooLarge { limit: 1024, declared: Some(n) } if n > 1024),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n4_no_headers_fails_in_headers_phase() {
    let e = env(fast(), users(1)).await;
    e.sim.set_fault(Operation::Health, Fault::NoHeaders);
    let t = Instant::now();
    let client = e.client.clone();
    let call = tokio::spawn(async move { client.health().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(e.inflight.snapshot()[0].phase, "headers");
    assert_eq!(inflight_gauge(&e, "health", "headers"), 1.0);
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            NodeError::HeadersTimeout { .. }
                | NodeError::DeadlineExceeded {
                    phase: "headers",
                    ..
                }
        ),
        "{err:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "{:?}",
        t.elapsed()
    );
    assert!(phase_count(&e, "health", "headers") >= 1.0);
    assert!(
        retries(&e, "health", "headers_timeout") >= 1.0,
        "headers timeouts are retried"
    );
    assert_eq!(phase_count(&e, "health", "body"), 0.0);
    assert_breaker_opens(&e, Operation::Health, || e.client.health()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n5_connection_refused_is_a_retried_connect_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let registry = Registry::new();
    let client = NodeClient::new(
        NODE,
        format!("http://127.0.0.1:{port}/").parse().unwrap(),
        SecretString::from("k"),
        &fast(),
        NodeApiMetrics::register(&registry),
        InflightCalls::new(),
    )
    .unwrap();
    let t = Instant::now();
    let err = client.health().await.unwrap_err();
    assert!(matches!(err, NodeError::Connect { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let retried = metric(
        &registry,
        "vpnbot_node_api_retries_total",
        &[("operation", "health"), ("reason", "connect")],
    );
    assert_eq!(retried, 2.0, "3 attempts = 2 retries");
    assert!(
        !err.to_string().contains(&port.to_string()),
        "no URL in errors: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n5_reset_or_short_body_is_a_retried_body_error() {
    for fault in [Fault::ResetMidBody, Fault::ShortBody] {
        let e = env(fast(), users(200)).await;
        e.sim.set_fault(Operation::ListUsers, fault.clone());
        let t = Instant::now();
        let err = e.client.list_users().await.unwrap_err();
        assert!(
            matches!(err, NodeError::BodyIncomplete { .. }),
            "{fault}: {err:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(e.sim.requests(Operation::ListUsers), 3, "{fault}: retried");
        assert!(phase_count(&e, "list_users", "body") >= 3.0);
        // The node recovers: the next call succeeds.
        e.sim.set_fault(Operation::ListUsers, Fault::None);
        assert_eq!(e.client.list_users().await.unwrap().len(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n5_reset_before_headers_is_connection_lost_and_retried() {
    let e = env(fast(), users(0)).await;
    e.sim.set_fault(Operation::Health, Fault::Reset);
    let err = e.client.health().await.unwrap_err();
    assert!(
        matches!(
            err,
            NodeError::ConnectionLost { .. } | NodeError::StaleConnection { .. }
        ),
        "{err:?}"
    );
    assert!(e.sim.requests(Operation::Health) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n6_5xx_opens_the_breaker_and_a_probe_closes_it() {
    let e = env(fast(), users(3)).await;
    e.sim.set_fault(Operation::Health, Fault::Status(503));
    let err = e.client.health().await.unwrap_err();
    assert!(matches!(err, NodeError::Status { status: 503 }), "{err:?}");
    assert_eq!(e.sim.requests(Operation::Health), 3);
    assert_eq!(retries(&e, "health", "http_5xx"), 2.0);
    assert_eq!(e.client.breaker_state(), BreakerState::Closed);
    assert_breaker_opens(&e, Operation::Health, || e.client.health()).await;
    // Other operations share the node's breaker: no exception.
    assert!(matches!(
        e.client.list_users().await,
        Err(NodeError::CircuitOpen { .. })
    ));

    e.sim.set_fault(Operation::Health, Fault::None);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(e.client.breaker_state(), BreakerState::HalfOpen);
    e.client.health().await.expect("half-open probe succeeds");
    assert_eq!(e.client.breaker_state(), BreakerState::Closed);
    assert_eq!(circuit(&e), 0.0);
    let entered = |s| {
        metric(
            &e.registry,
            "vpnbot_node_api_circuit_transitions_total",
            &[("state", s)],
        )
    };
    assert_eq!(
        (entered("open"), entered("half_open"), entered("closed")),
        (1.0, 1.0, 1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n6_flaky_node_is_absorbed_by_backoff() {
    let e = env(fast(), users(3)).await;
    e.sim.set_fault(Operation::ListUsers, Fault::Flaky(2));
    assert_eq!(e.client.list_users().await.unwrap().len(), 3);
    assert_eq!(retries(&e, "list_users", "http_5xx"), 2.0);
    assert_eq!(outcome_count(&e, "list_users", "ok"), 1.0);
    assert_eq!(e.client.breaker_state(), BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n6_429_honours_retry_after_within_the_deadline() {
    let settings = NodeClientSettings {
        total_deadline_seconds: Duration::from_secs(3),
        ..fast()
    };
    let e = env(settings, users(3)).await;
    e.sim.set_fault(Operation::Health, Fault::RateLimited(1));
    let t = Instant::now();
    let err = e.client.health().await.unwrap_err();
    let elapsed = t.elapsed();
    assert!(
        matches!(err, NodeError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(1)),
        "{err:?}"
    );
    // Backoff alone would retry after ~50-200 ms; Retry-After: 1 makes it wait 1 s each time.
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_millis(2900),
        "{elapsed:?}"
    );
    assert_eq!(e.sim.requests(Operation::Health), 3);
    assert_eq!(retries(&e, "health", "rate_limited"), 2.0);
    assert_eq!(phase_count(&e, "health", "retry_wait"), 2.0);

    // A Retry-After longer than the rest of the deadline is not slept into the deadline.
    e.sim.set_fault(Operation::Health, Fault::RateLimited(30));
    let t = Instant::now();
    let err = e.client.health().await.unwrap_err();
    assert!(matches!(err, NodeError::RateLimited { .. }), "{err:?}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n7_bad_json_is_a_decode_error_naming_the_operation() {
    for fault in [Fault::MalformedJson, Fault::WrongSchema, Fault::NonUuid] {
        let e = env(fast(), users(3)).await;
        e.sim.set_fault(Operation::ListUsers, fault.clone());
        let err = e.client.list_users().await.unwrap_err();
        assert!(
            matches!(
                err,
                NodeError::Decode {
                    operation: "list_users",
                    ..
                }
            ),
            "{fault}: {err:?}"
        );
        assert!(err.to_string().contains("list_users"), "{err}");
        assert_eq!(
            e.sim.requests(Operation::ListUsers),
            1,
            "{fault}: not retried"
        );
        assert_eq!(phase_count(&e, "list_users", "decode"), 1.0);
        assert_eq!(outcome_count(&e, "list_users", "decode"), 1.0);
        if fault == Fault::NonUuid {
            assert!(err.to_string().contains("entry 0 is not a UUID"), "{err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n8_large_list_parses_within_deadline_and_cap_without_blocking_workers() {
    const N: usize = 300_000;
    let e = env(NodeClientSettings::default(), users(N)).await;
    e.sim.warm().await;
    // A ticker on the same runtime: its worst lateness is how long a worker was held.
    let lateness = vpnbot::diagnostics::lateness::LatenessProbe::start(Duration::from_millis(5));
    let t = Instant::now();
    let list = e.client.list_users().await.unwrap();
    let elapsed = t.elapsed();
    let worst = lateness
        .finish()
        .await
        .into_iter()
        .max()
        .unwrap_or_default();
    assert_eq!(list.len(), N);
    let owned = list.iter().filter(|u| u.is_owned()).count();
    assert!(
        owned > N * 7 / 10 && owned < N * 9 / 10,
        "owned share ~0.8: {owned}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(
        worst < Duration::from_secs(1),
        "a worker was held for {worst:?}"
    );
    let bytes = metric(
        &e.registry,
        "vpnbot_node_api_response_body_bytes",
        &[("operation", "list_users")],
    );
    assert_eq!(bytes, 1.0);
    assert_eq!(phase_count(&e, "list_users", "decode"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n9_rejected_key_is_typed_not_retried_and_never_shown() {
    let key = "sup3r-s3cret-k3y-value";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = SimNode::start(listener, users(1));
    let registry = Registry::new();
    let client = NodeClient::new(
        NODE,
        sim.base_url(),
        SecretString::from(key),
        &fast(),
        NodeApiMetrics::register(&registry),
        InflightCalls::new(),
    )
    .unwrap();
    for _ in 0..4 {
        let err = client.list_users().await.unwrap_err();
        assert!(
            matches!(err, NodeError::AuthRejected { status: 401 }),
            "{err:?}"
        );
        assert!(!format!("{err} {err:?}").contains(key));
    }
    assert_eq!(sim.requests(Operation::ListUsers), 4, "never retried");
    assert_eq!(
        metric(
            &registry,
            "vpnbot_node_api_request_duration_seconds",
            &[("outcome", "auth_rejected")]
        ),
        4.0
    );
    assert_eq!(
        client.breaker_state(),
        BreakerState::Closed,
        "a rejected key is not a node outage"
    );
    assert!(!vpnbot::metrics::render(&registry).contains(key));
    assert!(!format!("{client:?}").contains(key));
    // The fault mode answers 401 even to the right key.
    let e = env(fast(), users(1)).await;
    e.sim.set_fault(Operation::Health, Fault::AuthReject);
    assert!(matches!(
        e.client.health().await,
        Err(NodeError::AuthRejected { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n10_stale_keepalive_is_retried_once_on_a_fresh_connection() {
    let e = env(fast(), users(2)).await;
    e.sim.set_fault(Operation::Health, Fault::StaleKeepAlive);
    e.client.health().await.unwrap();
    // hyper puts the connection back into its pool just after the response: a call that
    // starts before that opens a fresh connection and meets no stale one (seen once in CI).
    tokio::time::sleep(Duration::from_millis(50)).await;
    e.client
        .health()
        .await
        .expect("stale pooled connection absorbed");
    assert_eq!(retries(&e, "health", "stale_connection"), 1.0);
    assert_eq!(e.sim.connections(), 2);
    assert_eq!(outcome_count(&e, "health", "ok"), 2.0);
    for _ in 0..3 {
        e.client.health().await.unwrap();
    }
    // Usually each of these hits the stale connection too; one may instead get a fresh
    // connection if it starts before hyper has put the last one back in the pool.
    let stale = retries(&e, "health", "stale_connection");
    assert!(stale >= 2.0, "{stale}");
    assert!(e.sim.connections() as f64 >= 1.0 + stale);
    assert_eq!(outcome_count(&e, "health", "ok"), 5.0);
    assert_eq!(outcome_count(&e, "health", "stale_connection"), 0.0);
    assert_eq!(
        e.client.breaker_state(),
        BreakerState::Closed,
        "not a node failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n10_node_closing_idle_connections_early_causes_no_error() {
    let opts = SimNodeOptions {
        keep_alive_idle: Duration::from_millis(100),
        ..users(2)
    };
    let e = env(fast(), opts).await;
    e.client.health().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    e.client.health().await.unwrap();
    assert_eq!(e.sim.connections(), 2);
    assert_eq!(outcome_count(&e, "health", "ok"), 2.0);
}

#[derive(Debug, Default)]
struct HangingResolver {
    calls: AtomicUsize,
    release: AtomicBool,
}

impl BlockingResolve for HangingResolver {
    fn resolve(&self, _host: &str) -> std::io::Result<Vec<std::net::SocketAddr>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let t = Instant::now();
        while !self.release.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(std::io::Error::other("released"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n11_hung_resolution_is_bounded_by_deadline_and_concurrency() {
    let resolver = Arc::new(HangingResolver::default());
    let registry = Registry::new();
    let inflight = InflightCalls::new();
    let settings = NodeClientSettings {
        resolver_max_concurrent: 2,
        breaker_failure_threshold: 10,
        ..fast()
    };
    let client = NodeClient::with_resolver(
        NODE,
        "http://node.sim.invalid:8080/".parse().unwrap(),
        SecretString::from("k"),
        &settings,
        NodeApiMetrics::register(&registry),
        inflight.clone(),
        resolver.clone(),
    )
    .unwrap();
    let t = Instant::now();
    let c = client.clone();
    let call = tokio::spawn(async move { c.health().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(inflight.snapshot()[0].phase, "resolve");
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            NodeError::Connect { .. }
                | NodeError::DeadlineExceeded {
                    phase: "resolve" | "connect",
                    ..
                }
        ),
        "{err:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "{:?}",
        t.elapsed()
    );
    let resolve_phase = metric(
        &registry,
        "vpnbot_node_api_phase_duration_seconds",
        &[("operation", "health"), ("phase", "resolve")],
    );
    assert!(resolve_phase >= 1.0);
    // Abandoned look-ups stay bounded: never more than 2 blocking threads hang in the resolver,
    // and a call beyond the bound fails fast, naming the cause.
    let _ = client.health().await;
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 2);
    let t = Instant::now();
    let err = client.health().await.unwrap_err();
    assert!(err.to_string().contains("resolver saturated"), "{err}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    resolver.release.store(true, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n12_remove_that_applied_but_failed_succeeds_when_repeated() {
    for fault in [Fault::ApplyThen500, Fault::ApplyThenDrop] {
        let e = env(fast(), users(0)).await;
        let user = NodeUser::owned(uuid::Uuid::new_v4());
        e.sim.insert_user(user.clone());
        e.sim.set_fault(Operation::RemoveUser, fault.clone());
        let err = e.client.remove_user(user.uuid).await.unwrap_err();
        assert!(
            matches!(
                err,
                NodeError::Status { status: 500 }
                    | NodeError::ConnectionLost { .. }
                    | NodeError::StaleConnection { .. }
            ),
            "{fault}: {err:?}"
        );
        assert_eq!(e.sim.user_count(), 0, "{fault}: the removal took effect");
        e.sim.set_fault(Operation::RemoveUser, Fault::None);
        let r = e.client.remove_user(user.uuid).await.unwrap();
        assert_eq!(
            r,
            vpnbot::node::wire::MutationResult::Absent,
            "already absent is success"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_idempotent_and_foreign_users_are_listed_as_not_owned() {
    let e = env(fast(), users(0)).await;
    let foreign = NodeUser {
        uuid: uuid::Uuid::new_v4(),
        email: "ops@example.com".into(),
    };
    e.sim.insert_user(foreign.clone());
    let mine = NodeUser::owned(uuid::Uuid::new_v4());
    use vpnbot::node::wire::MutationResult as R;
    assert_eq!(e.client.add_user(&mine).await.unwrap(), R::Created);
    assert_eq!(e.client.add_user(&mine).await.unwrap(), R::Unchanged);
    let conflict = NodeUser {
        email: "other".into(),
        ..mine.clone()
    };
    assert!(matches!(
        e.client.add_user(&conflict).await,
        Err(NodeError::Status { status: 409 })
    ));
    assert_eq!(e.client.update_user(&conflict).await.unwrap(), R::Updated);
    let absent = NodeUser::owned(uuid::Uuid::new_v4());
    assert!(matches!(
        e.client.update_user(&absent).await,
        Err(NodeError::Status { status: 404 })
    ));
    let listed = e.client.list_users().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|u| u == &foreign && !u.is_owned()));
    assert_eq!(e.client.remove_user(mine.uuid).await.unwrap(), R::Removed);
    assert_eq!(e.client.remove_user(mine.uuid).await.unwrap(), R::Absent);
    assert_eq!(
        e.client.breaker_state(),
        BreakerState::Closed,
        "4xx answers are not outages"
    );
}

/// A second server that counts the connections it accepts and answers every request as an
/// empty node would (`{"users":[]}`): where a followed redirect would land.
async fn redirect_target() -> (u16, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = br#"{"users":[]}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body).await;
            });
        }
    });
    (port, accepted)
}

/// Issue 11 item 1: a node answering `307` to another server. The API key must not follow it
/// and the other server's answer must not be taken as this node's list: a typed error naming
/// the redirect (origin only), not retried, counted as `outcome="redirect"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_is_a_typed_error_and_nothing_reaches_the_target() {
    let (port, accepted) = redirect_target().await;
    let e = env(fast(), users(3)).await;
    for op in Operation::ALL {
        e.sim.set_fault(op, Fault::Redirect(port));
    }
    let err = e.client.list_users().await.unwrap_err();
    match &err {
        NodeError::Redirect { status, location } => {
            assert_eq!(*status, 307);
            assert_eq!(location, &format!("http://127.0.0.1:{port}"));
        }
        other => panic!("expected a redirect error, got {other:?}"),
    }
    assert!(err.to_string().contains("redirect"), "{err}");
    assert!(
        !err.to_string().contains("/v1/"),
        "no path in the message: {err}"
    );
    assert!(e.client.remove_user(uuid::Uuid::new_v4()).await.is_err());
    assert!(e.client.health().await.is_err());
    assert_eq!(e.sim.requests(Operation::ListUsers), 1, "not retried");
    assert_eq!(outcome_count(&e, "list_users", "redirect"), 1.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no request may reach the redirect target"
    );
}

/// Issue 11 item 8: a body compressed although vpnbot asked for `identity` only is refused
/// with an error naming the encoding, not parsed as garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrequested_content_encoding_is_named_not_decoded_as_garbage() {
    let e = env(fast(), users(3)).await;
    e.sim.set_fault(Operation::ListUsers, Fault::Gzip);
    let err = e.client.list_users().await.unwrap_err();
    assert!(
        matches!(&err, NodeError::UnexpectedEncoding { encoding } if encoding == "gzip"),
        "{err:?}"
    );
    assert!(err.to_string().contains("gzip"), "{err}");
    assert_eq!(outcome_count(&e, "list_users", "content_encoding"), 1.0);
    e.sim.set_fault(Operation::ListUsers, Fault::None);
    assert_eq!(e.client.list_users().await.unwrap().len(), 3);
}
