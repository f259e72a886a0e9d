//! Benchmarks of the node client, run in release by `vpnbot-bench`
//! (`vpnbot-bench node-call-overhead`, `node-list-users`). They print and return their figures; speed
//! targets live here, not in tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;

use vpnbot::node::{InflightCalls, NodeApiMetrics, NodeClient, NodeClientSettings};
use vpnbot_sim::node::{SimNode, SimNodeHandle, SimNodeOptions};

/// Figures of [`bench_list_users_1m`].
#[derive(Debug, Clone)]
pub struct ListUsersBenchReport {
    /// Users listed.
    pub users: usize,
    /// Response body size, bytes.
    pub body_bytes: u64,
    /// Transfer plus decode, wall time.
    pub elapsed: Duration,
    /// Peak resident memory growth during the call, bytes (sampled every 2 ms).
    pub peak_rss_growth_bytes: u64,
    /// Longest a runtime worker was held during the call (lateness of a 5 ms ticker).
    pub worst_worker_hold: Duration,
}

/// Figures of [`bench_call_overhead`].
#[derive(Debug, Clone)]
pub struct CallOverheadReport {
    /// Calls per side.
    pub calls: usize,
    /// Mean latency of a bare reqwest `GET /v1/health` plus JSON decode.
    pub bare_mean: Duration,
    /// Mean latency of [`NodeClient::health`] (breaker, deadlines, spans, metrics, registry).
    pub client_mean: Duration,
    /// Process CPU time per bare call (every thread, the simulated node's included).
    pub bare_cpu: Duration,
    /// Process CPU time per client call (likewise).
    pub client_cpu: Duration,
    /// TCP connections the node accepted during the bare calls (1 when every call reused one).
    pub bare_connections: u64,
    /// Likewise during the client calls.
    pub client_connections: u64,
}

impl CallOverheadReport {
    /// Added latency per call.
    pub fn overhead(&self) -> Duration {
        self.client_mean.saturating_sub(self.bare_mean)
    }

    /// Added latency relative to the bare call, percent.
    pub fn overhead_percent(&self) -> f64 {
        100.0 * self.overhead().as_secs_f64() / self.bare_mean.as_secs_f64()
    }

    /// The target: under 5 % or 20 µs, whichever is larger.
    pub fn within_target(&self) -> bool {
        let allowed = (self.bare_mean.as_secs_f64() * 0.05).max(20e-6);
        self.overhead().as_secs_f64() <= allowed
    }
}

async fn sim(users: usize) -> SimNodeHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let sim = SimNode::start(
        listener,
        SimNodeOptions {
            users,
            ..Default::default()
        },
    );
    sim.warm().await;
    sim
}

/// A node client named `bench` with default settings, its metrics in `registry`.
pub(crate) fn client(
    base_url: url::Url,
    api_key: &str,
    registry: &prometheus::Registry,
) -> NodeClient {
    NodeClient::new(
        "bench",
        base_url,
        SecretString::from(api_key.to_owned()),
        &NodeClientSettings::default(),
        NodeApiMetrics::register(registry),
        InflightCalls::new(),
    )
    .expect("default settings are valid")
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// `list-users` of 1,000,000 users (80 % owned) from the simulator on loopback, with default
/// settings (64 MiB cap, 10 s deadline): time, peak memory and worst worker hold.
/// Run inside a multi-thread runtime.
///
/// # Panics
/// When the call fails (it must not with default settings).
pub async fn bench_list_users_1m() -> ListUsersBenchReport {
    const USERS: usize = 1_000_000;
    let sim = sim(USERS).await;
    let registry = prometheus::Registry::new();
    let client = client(sim.base_url(), sim.api_key(), &registry);
    client.health().await.expect("node up");

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let base = rss_bytes();
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // A ticker on the same runtime: its worst lateness is how long a worker was held.
    let lateness = diagnostics::lateness::LatenessProbe::start(Duration::from_millis(5));
    let t = Instant::now();
    let users = client.list_users().await.expect("list-users of 1M users");
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let worst_worker_hold = lateness
        .finish()
        .await
        .into_iter()
        .max()
        .unwrap_or_default();
    let _ = sampler.join();
    let body_bytes = vpnbot::metrics::render(&registry)
        .lines()
        .find(|l| {
            l.starts_with("vpnbot_node_api_response_body_bytes_sum{") && l.contains("list_users")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
    let report = ListUsersBenchReport {
        users: users.len(),
        body_bytes,
        elapsed,
        peak_rss_growth_bytes: peak.load(Ordering::Relaxed).saturating_sub(base),
        worst_worker_hold,
    };
    println!(
        "list-users 1M: {} users, body {:.1} MiB, {:.0} ms transfer+decode, peak RSS +{:.0} MiB, worst worker hold {:.1} ms",
        report.users,
        report.body_bytes as f64 / 1048576.0,
        report.elapsed.as_secs_f64() * 1e3,
        report.peak_rss_growth_bytes as f64 / 1048576.0,
        report.worst_worker_hold.as_secs_f64() * 1e3,
    );
    report
}

/// Per-call overhead of the instrumented client against a bare reqwest call, `calls` sequential
/// `health` calls each on loopback (interleaved in rounds to share any drift).
///
/// As in production, the calls are made by a task spawned on the current runtime (so they run
/// on its workers, under its poll hooks), not by the thread that called `block_on`; the
/// simulated node runs on a thread and runtime of its own ([`SimThread`]) so that it costs both
/// sides the same. Besides wall time, the process CPU time per call (`getrusage`, every thread,
/// the simulator's included) is recorded for each side: it moves less with other load.
///
/// # Panics
/// When a call fails, or outside a multi-thread runtime.
pub async fn bench_call_overhead(calls: usize) -> CallOverheadReport {
    let sim = SimThread::start().await;
    let registry = prometheus::Registry::new();
    let client = client(sim.base_url.clone(), &sim.api_key, &registry);
    let bare = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .expect("bare client");
    let url = sim
        .base_url
        .join(vpnbot::node::wire::HEALTH_PATH)
        .expect("url");
    let key = sim.api_key.clone();
    let stats_url = sim.base_url.join("/_sim/stats").expect("stats url");
    let measured = tokio::spawn(async move {
        // Connections the node has accepted so far (its own stats endpoint).
        let accepted = || async {
            let v: serde_json::Value = bare
                .get(stats_url.clone())
                .send()
                .await
                .expect("sim stats")
                .json()
                .await
                .expect("sim stats JSON");
            v["connections"].as_u64().expect("connections")
        };
        let bare_call = || async {
            let r = bare
                .get(url.clone())
                .header(vpnbot::node::wire::API_KEY_HEADER, &key)
                .send()
                .await
                .expect("bare call");
            let b = r.bytes().await.expect("bare body");
            let h: vpnbot::node::wire::HealthResponse = serde_json::from_slice(&b).expect("decode");
            assert_eq!(h.status, "ok");
        };
        for _ in 0..200 {
            bare_call().await;
            client.health().await.expect("client call");
        }
        let rounds = 10;
        let per = calls.div_ceil(rounds).max(1);
        let mut bare_side = Side::default();
        let mut client_side = Side::default();
        for _ in 0..rounds {
            let c0 = accepted().await;
            let t = Side::start();
            for _ in 0..per {
                bare_call().await;
            }
            bare_side.add(t);
            let c1 = accepted().await;
            let t = Side::start();
            for _ in 0..per {
                client.health().await.expect("client call");
            }
            client_side.add(t);
            let c2 = accepted().await;
            bare_side.connections += c1 - c0;
            client_side.connections += c2 - c1;
        }
        let n = (per * rounds) as u32;
        CallOverheadReport {
            calls: n as usize,
            bare_mean: bare_side.wall / n,
            client_mean: client_side.wall / n,
            bare_cpu: bare_side.cpu / n,
            client_cpu: client_side.cpu / n,
            bare_connections: bare_side.connections,
            client_connections: client_side.connections,
        }
    });
    let report = measured.await.expect("measuring task");
    sim.stop();
    println!(
        "call overhead: bare {:.1} µs, client {:.1} µs, +{:.1} µs ({:.1} %), target {} ({} calls each); CPU per call bare {:.1} µs, client {:.1} µs; connections opened bare {}, client {}",
        report.bare_mean.as_secs_f64() * 1e6,
        report.client_mean.as_secs_f64() * 1e6,
        report.overhead().as_secs_f64() * 1e6,
        report.overhead_percent(),
        if report.within_target() { "met" } else { "MISSED" },
        report.calls,
        report.bare_cpu.as_secs_f64() * 1e6,
        report.client_cpu.as_secs_f64() * 1e6,
        report.bare_connections,
        report.client_connections,
    );
    report
}

/// Wall and process CPU time accumulated by one side of [`bench_call_overhead`].
#[derive(Default)]
struct Side {
    wall: Duration,
    cpu: Duration,
    connections: u64,
}

impl Side {
    fn start() -> (Instant, Duration) {
        (Instant::now(), super::cpu_time())
    }

    fn add(&mut self, (t, cpu): (Instant, Duration)) {
        self.wall += t.elapsed();
        self.cpu += super::cpu_time().saturating_sub(cpu);
    }
}

/// A simulated node on a thread and current-thread runtime of its own, so that serving it
/// costs every variant of a benchmark the same and none of the measured runtime's workers.
pub(crate) struct SimThread {
    /// The node's base URL.
    pub(crate) base_url: url::Url,
    /// Its API key.
    pub(crate) api_key: String,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl SimThread {
    /// Starts the node (10 users) and waits until it listens.
    ///
    /// # Panics
    /// When loopback cannot be bound or the thread dies.
    pub(crate) async fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let srt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sim runtime");
            srt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).expect("listener");
                let sim = SimNode::start(
                    l,
                    SimNodeOptions {
                        users: 10,
                        ..Default::default()
                    },
                );
                sim.warm().await;
                let _ = tx.send((sim.base_url(), sim.api_key().to_owned()));
                let _ = stop_rx.await;
            });
        });
        let (base_url, api_key) = rx.await.expect("sim address");
        Self {
            base_url,
            api_key,
            stop,
            thread,
        }
    }

    /// Stops the node and joins its thread.
    pub(crate) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
