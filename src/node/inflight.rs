//! Registry of in-flight node API calls, readable from any thread without the runtime (plain
//! `std::sync::Mutex`, held for a few instructions, never across an `.await`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::OpMetrics;
use super::{NodeError, Operation};

/// Phase of a node API call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Name resolution of the node's host.
    Resolve,
    /// TCP (and TLS) connect.
    Connect,
    /// Request sent (or being sent), waiting for the response head.
    Headers,
    /// Response head received, reading the body.
    Body,
    /// Decoding the body.
    Decode,
    /// Sleeping in backoff before the next attempt.
    RetryWait,
}

impl Phase {
    /// Number of phases.
    pub const COUNT: usize = 6;
    /// Every phase.
    pub const ALL: [Phase; Phase::COUNT] = [
        Phase::Resolve,
        Phase::Connect,
        Phase::Headers,
        Phase::Body,
        Phase::Decode,
        Phase::RetryWait,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Resolve => "resolve",
            Phase::Connect => "connect",
            Phase::Headers => "headers",
            Phase::Body => "body",
            Phase::Decode => "decode",
            Phase::RetryWait => "retry_wait",
        }
    }
}

/// A snapshot of one in-flight call.
#[derive(Debug, Clone, PartialEq)]
pub struct InflightCall {
    /// Registry-unique id of the call.
    pub id: u64,
    /// Node name from config.
    pub node: String,
    /// Operation label value (`list_users`, ...).
    pub operation: &'static str,
    /// Current phase label value.
    pub phase: &'static str,
    /// Time since the call started.
    pub age: Duration,
    /// Time since the current phase started.
    pub phase_age: Duration,
    /// Body bytes received so far in the current attempt.
    pub bytes_received: u64,
    /// Time since the last body byte of the current attempt (`None` before the first byte):
    /// growing in phase `body` with `bytes_received` standing tells a stalled body from a
    /// trickling one.
    pub last_byte_age: Option<Duration>,
    /// The call's total deadline.
    pub deadline: Duration,
    /// When the response head arrived, counted from the call start (latest attempt).
    pub headers_after: Option<Duration>,
    /// Attempt number, 1-based.
    pub attempt: u32,
}

#[derive(Debug)]
struct PhaseState {
    phase: Phase,
    since: Instant,
    finished: bool,
    headers_after: Option<Duration>,
    attempt: u32,
    connected: bool,
}

/// Live state of one call, shared by the call, its connector layer and the registry.
#[derive(Debug)]
pub(crate) struct CallState {
    id: u64,
    node: Arc<str>,
    operation: Operation,
    started: Instant,
    deadline: Duration,
    bytes: AtomicU64,
    /// Nanoseconds from `started` to the last body byte, plus one; 0 before the first byte.
    last_byte_ns: AtomicU64,
    state: Mutex<PhaseState>,
    metrics: Arc<OpMetrics>,
    pub(crate) span: tracing::Span,
}

impl CallState {
    /// Moves the call into `phase`: observes the time spent in the previous phase and moves
    /// the in-flight gauge. A no-op after [`CallState::finish`].
    pub(crate) fn set_phase(&self, phase: Phase) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.finished || s.phase == phase {
            return;
        }
        let old = s.phase;
        // A fresh attempt starts in `headers`; when the pool has no connection the connector
        // moves it to resolve/connect at once. That sliver is not a headers wait: skip it.
        if !(old == Phase::Headers && matches!(phase, Phase::Resolve | Phase::Connect)) {
            self.metrics.phase[old as usize].observe((now - s.since).as_secs_f64());
        }
        self.metrics.inflight[old as usize].dec();
        self.metrics.inflight[phase as usize].inc();
        s.phase = phase;
        s.since = now;
        if phase == Phase::Body {
            s.headers_after = Some(now - self.started);
        }
    }

    /// Starts an attempt: phase `headers` (request in flight), byte count reset.
    pub(crate) fn begin_attempt(&self) {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.attempt += 1;
            s.connected = false;
        }
        self.bytes.store(0, Ordering::Relaxed);
        self.last_byte_ns.store(0, Ordering::Relaxed);
        self.set_phase(Phase::Headers);
    }

    /// Marks that this attempt opened a new connection (set by the connector layer).
    pub(crate) fn mark_connected(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connected = true;
    }

    /// Whether this attempt opened a new connection (false: it reused a pooled one).
    pub(crate) fn connected_this_attempt(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connected
    }

    pub(crate) fn phase_and_since(&self) -> (Phase, Instant) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.phase, s.since)
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase_and_since().0
    }

    pub(crate) fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        let ns = self.started.elapsed().as_nanos() as u64;
        self.last_byte_ns
            .store(ns.saturating_add(1), Ordering::Relaxed);
    }

    /// Time since the last body byte of this attempt, at `now`.
    fn last_byte_age(&self, now: Instant) -> Option<Duration> {
        let ns = self.last_byte_ns.load(Ordering::Relaxed);
        (ns > 0).then(|| now.saturating_duration_since(self.started + Duration::from_nanos(ns - 1)))
    }

    /// Ends the call: observes the last phase, clears the gauge; later phase changes (from a
    /// connect that outlived the call) are ignored.
    fn finish(&self) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.finished {
            return;
        }
        s.finished = true;
        self.metrics.phase[s.phase as usize].observe((now - s.since).as_secs_f64());
        self.metrics.inflight[s.phase as usize].dec();
    }

    fn snapshot(&self, now: Instant) -> InflightCall {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        InflightCall {
            id: self.id,
            node: self.node.to_string(),
            operation: self.operation.as_str(),
            phase: s.phase.as_str(),
            age: now.saturating_duration_since(self.started),
            phase_age: now.saturating_duration_since(s.since),
            bytes_received: self.bytes.load(Ordering::Relaxed),
            last_byte_age: self.last_byte_age(now),
            deadline: self.deadline,
            headers_after: s.headers_after,
            attempt: s.attempt,
        }
    }
}

/// Failures kept per node and operation (the oldest is dropped first).
pub const RECENT_FAILURES_PER_OPERATION: usize = 4;

/// One failed call, remembered after it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentFailure {
    /// Node name from config.
    pub node: String,
    /// Operation label value.
    pub operation: &'static str,
    /// The phase it failed in ([`NodeError::phase`], else the phase the call was in).
    pub phase: &'static str,
    /// [`NodeError::error_type`].
    pub error_type: &'static str,
    /// Body bytes the last attempt received.
    pub bytes_received: u64,
    /// Time from the last body byte to the failure (`None`: no body byte came).
    pub since_last_byte: Option<Duration>,
    /// Attempts made.
    pub attempts: u32,
    /// Duration of the call.
    pub took: Duration,
    /// Time since the failure.
    pub age: Duration,
    /// Failures of this node and operation the ring holds now (at most
    /// [`RECENT_FAILURES_PER_OPERATION`]).
    pub count: u32,
    /// The error's text (no URL, no key: see [`NodeError`]).
    pub detail: String,
}

#[derive(Debug)]
struct FailureRecord {
    at: Instant,
    phase: &'static str,
    error_type: &'static str,
    bytes: u64,
    since_last_byte: Option<Duration>,
    attempts: u32,
    took: Duration,
    detail: String,
}

type FailureRings = HashMap<(Arc<str>, Operation), VecDeque<FailureRecord>>;

#[derive(Debug, Default)]
struct Inner {
    next_id: AtomicU64,
    calls: Mutex<HashMap<u64, Arc<CallState>>>,
    failures: Mutex<FailureRings>,
    nodes: Mutex<Vec<Arc<str>>>,
}

/// Registry of in-flight node API calls (cheap clone; one per app). The watchdog reads
/// [`InflightCalls::snapshot`] from its own OS thread.
#[derive(Debug, Clone, Default)]
pub struct InflightCalls {
    inner: Arc<Inner>,
}

impl InflightCalls {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every call in flight now, oldest first. Never blocks on the runtime.
    pub fn snapshot(&self) -> Vec<InflightCall> {
        let now = Instant::now();
        let calls: Vec<Arc<CallState>> = {
            let map = self.inner.calls.lock().unwrap_or_else(|e| e.into_inner());
            map.values().cloned().collect()
        };
        let mut out: Vec<InflightCall> = calls.iter().map(|c| c.snapshot(now)).collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.age));
        out
    }

    /// Remembers the failure of `call` (its phase, error type, body bytes of the last attempt
    /// and the time since its last byte) in the ring of its node and operation. Memory is
    /// bounded: [`RECENT_FAILURES_PER_OPERATION`] per configured node and operation.
    pub(crate) fn record_failure(&self, call: &CallState, err: &NodeError) {
        let now = Instant::now();
        let (phase, attempts) = {
            let st = call.state.lock().unwrap_or_else(|e| e.into_inner());
            (st.phase, st.attempt)
        };
        let mut detail = err.to_string();
        if detail.len() > crate::diagnostics::MAX_DETAIL_LEN {
            let mut cut = crate::diagnostics::MAX_DETAIL_LEN;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        let rec = FailureRecord {
            at: now,
            phase: err.phase().unwrap_or(phase.as_str()),
            error_type: err.error_type(),
            bytes: call.bytes.load(Ordering::Relaxed),
            since_last_byte: call.last_byte_age(now),
            attempts,
            took: now.saturating_duration_since(call.started),
            detail,
        };
        let mut g = self
            .inner
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let ring = g.entry((call.node.clone(), call.operation)).or_default();
        if ring.len() >= RECENT_FAILURES_PER_OPERATION {
            ring.pop_front();
        }
        ring.push_back(rec);
    }

    /// The latest failure of every node and operation that failed lately, newest first, each
    /// with how many failures its ring holds. Never blocks on the runtime.
    pub fn recent_failures(&self) -> Vec<RecentFailure> {
        let now = Instant::now();
        let g = self
            .inner
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<RecentFailure> = g
            .iter()
            .filter_map(|((node, op), ring)| {
                let r = ring.back()?;
                Some(RecentFailure {
                    node: node.to_string(),
                    operation: op.as_str(),
                    phase: r.phase,
                    error_type: r.error_type,
                    bytes_received: r.bytes,
                    since_last_byte: r.since_last_byte,
                    attempts: r.attempts,
                    took: r.took,
                    age: now.saturating_duration_since(r.at),
                    count: ring.len() as u32,
                    detail: r.detail.clone(),
                })
            })
            .collect();
        out.sort_by_key(|f| f.age);
        out
    }

    /// Makes node `name` known to the in-flight body gauges (exported at 0 while idle).
    pub(crate) fn register_node(&self, name: &Arc<str>) {
        let mut g = self.inner.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if !g.contains(name) {
            g.push(name.clone());
        }
    }

    /// Registers `vpnbot_node_api_inflight_body_bytes{node,operation}` and
    /// `vpnbot_node_api_inflight_body_idle_seconds{node,operation}`, read from this registry
    /// at scrape time (so they move while the runtime is stuck).
    ///
    /// # Panics
    /// When called twice on the same registry (duplicate metric names).
    pub fn register_gauges(&self, registry: &prometheus::Registry) {
        let bytes = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "vpnbot_node_api_inflight_body_bytes",
                "Body bytes received so far by the node call in phase body that has gone \
                 longest without a byte (0 when no call is in phase body).",
            ),
            &["node", "operation"],
        )
        .expect("valid gauge");
        let idle = prometheus::GaugeVec::new(
            prometheus::Opts::new(
                "vpnbot_node_api_inflight_body_idle_seconds",
                "Longest time since the last body byte (or since the headers, before the \
                 first byte) among node calls in phase body, seconds (0 when none): growing \
                 means a stalled body, staying low with bytes growing a trickling one.",
            ),
            &["node", "operation"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(BodyGauges {
                calls: self.clone(),
                bytes,
                idle,
            }))
            .expect("unique metric names");
    }

    /// Registers a call; it leaves the registry when the guard drops (also on cancellation).
    pub(crate) fn begin(
        &self,
        node: Arc<str>,
        operation: Operation,
        deadline: Duration,
        metrics: Arc<OpMetrics>,
        span: tracing::Span,
    ) -> CallGuard {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        metrics.inflight[Phase::Headers as usize].inc();
        let state = Arc::new(CallState {
            id,
            node,
            operation,
            started: Instant::now(),
            deadline,
            bytes: AtomicU64::new(0),
            last_byte_ns: AtomicU64::new(0),
            state: Mutex::new(PhaseState {
                phase: Phase::Headers,
                since: Instant::now(),
                finished: false,
                headers_after: None,
                attempt: 0,
                connected: false,
            }),
            metrics,
            span,
        });
        self.inner
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, state.clone());
        CallGuard {
            registry: self.clone(),
            state,
        }
    }
}

/// Keeps a call registered; dropping it finishes the call.
#[derive(Debug)]
pub(crate) struct CallGuard {
    registry: InflightCalls,
    pub(crate) state: Arc<CallState>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.state.finish();
        self.registry
            .inner
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.state.id);
    }
}

/// Scrape-time gauges of calls in phase `body` (see [`InflightCalls::register_gauges`]).
#[derive(Debug)]
struct BodyGauges {
    calls: InflightCalls,
    bytes: prometheus::IntGaugeVec,
    idle: prometheus::GaugeVec,
}

impl prometheus::core::Collector for BodyGauges {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.bytes.desc();
        d.extend(self.idle.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let nodes = self
            .calls
            .inner
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut now: HashMap<(String, &'static str), (u64, f64)> = HashMap::new();
        for c in self.calls.snapshot() {
            if c.phase != Phase::Body.as_str() {
                continue;
            }
            let idle = c.last_byte_age.unwrap_or(c.phase_age).as_secs_f64();
            let e = now
                .entry((c.node.clone(), c.operation))
                .or_insert((0, -1.0));
            if idle > e.1 {
                *e = (c.bytes_received, idle);
            }
        }
        for n in &nodes {
            for op in Operation::ALL {
                let (b, i) = now
                    .remove(&(n.to_string(), op.as_str()))
                    .unwrap_or((0, 0.0));
                self.bytes
                    .with_label_values(&[n, op.as_str()])
                    .set(b as i64);
                self.idle.with_label_values(&[n, op.as_str()]).set(i);
            }
        }
        let mut out = self.bytes.collect();
        out.extend(self.idle.collect());
        out
    }
}
