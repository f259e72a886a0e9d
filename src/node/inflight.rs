//! Registry of in-flight node API calls, readable from any thread without the runtime (plain
//! `std::sync::Mutex`, held for a few instructions, never across an `.await`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::OpMetrics;
use super::Operation;

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
            deadline: self.deadline,
            headers_after: s.headers_after,
            attempt: s.attempt,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    next_id: AtomicU64,
    calls: Mutex<HashMap<u64, Arc<CallState>>>,
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
