//! Feeds the watchdog: adapters that turn the pool's holders/waiters registry and the node
//! client's in-flight calls (and its recent failures, see [`RecentEvent`]) into
//! [`InflightEntry`]s. Both read std-mutex registries, never the
//! runtime, so they work while the runtime is stuck.

use std::time::{Duration, Instant};

use crate::db::inflight::{PoolInflight, PoolUse};
use crate::diagnostics::{InflightEntry, InflightKind, InflightSource, RecentEvent};
use crate::node::InflightCalls;

/// Pool waiters and holders by label (section `db_pool`). Waits carry the acquire timeout as
/// their deadline; holds carry `max_hold` (the statement timeout: no single use should outlive
/// it).
#[derive(Debug)]
pub struct PoolSource {
    inflight: PoolInflight,
    acquire_timeout: Duration,
    max_hold: Duration,
}

impl PoolSource {
    /// An adapter over `inflight`.
    pub fn new(inflight: PoolInflight, acquire_timeout: Duration, max_hold: Duration) -> Self {
        Self {
            inflight,
            acquire_timeout,
            max_hold,
        }
    }
}

impl InflightSource for PoolSource {
    fn section(&self) -> &'static str {
        "db_pool"
    }

    fn entries(&self) -> Vec<InflightEntry> {
        self.inflight
            .snapshot()
            .into_iter()
            .map(|e| {
                let (kind, deadline, verb) = match e.state {
                    PoolUse::Waiting => (InflightKind::PoolWait, self.acquire_timeout, "waiting"),
                    PoolUse::Holding => (InflightKind::PoolHold, self.max_hold, "holding"),
                };
                let mut entry = InflightEntry::new(kind, e.age);
                entry.label = Some(e.label.to_string());
                entry.operation = Some(format!("db_pool.{verb}"));
                entry.deadline = Some(deadline);
                entry.detail = format!(
                    "{verb} a pool connection for {:.1} s at `{}`{}",
                    e.age.as_secs_f64(),
                    e.label,
                    e.task
                        .map(|t| format!(" (task id {t})"))
                        .unwrap_or_default()
                );
                entry.bounded()
            })
            .collect()
    }

    fn last_success(&self) -> Option<Instant> {
        self.inflight
            .since_last_acquire()
            .and_then(|d| Instant::now().checked_sub(d))
    }
}

/// In-flight node calls (section `node_calls`), each with its total deadline and the evidence
/// that matters for a stuck body: when the headers arrived and how many bytes came since.
#[derive(Debug)]
pub struct NodeCallSource {
    inflight: InflightCalls,
}

impl NodeCallSource {
    /// An adapter over `inflight`.
    pub fn new(inflight: InflightCalls) -> Self {
        Self { inflight }
    }
}

impl InflightSource for NodeCallSource {
    fn section(&self) -> &'static str {
        "node_calls"
    }

    fn entries(&self) -> Vec<InflightEntry> {
        self.inflight
            .snapshot()
            .into_iter()
            .map(|c| {
                let mut e = InflightEntry::new(InflightKind::NodeCall, c.age);
                e.node = Some(c.node.clone());
                e.operation = Some(c.operation.to_string());
                e.phase = Some(c.phase.to_string());
                e.deadline = Some(c.deadline);
                let headers = c
                    .headers_after
                    .map(|h| format!("headers after {} ms, ", h.as_millis()))
                    .unwrap_or_default();
                let last_byte = match c.last_byte_age {
                    Some(a) => format!(", last byte {:.1} s ago", a.as_secs_f64()),
                    None if c.phase == "body" => ", no body byte yet".to_owned(),
                    None => String::new(),
                };
                e.detail = format!(
                    "{headers}{} body bytes{last_byte}, in phase {} for {:.1} s of a {:.0} s deadline (attempt {})",
                    c.bytes_received,
                    c.phase,
                    c.phase_age.as_secs_f64(),
                    c.deadline.as_secs_f64(),
                    c.attempt
                );
                e.bounded()
            })
            .collect()
    }

    fn recent(&self) -> Vec<RecentEvent> {
        self.inflight
            .recent_failures()
            .into_iter()
            .map(|f| RecentEvent {
                what: "node_call_failed",
                node: Some(f.node),
                operation: Some(f.operation.to_owned()),
                phase: Some(f.phase.to_owned()),
                outcome: f.error_type.to_owned(),
                bytes_received: Some(f.bytes_received),
                since_last_byte_seconds: f.since_last_byte.map(|d| d.as_secs_f64()),
                attempts: Some(f.attempts),
                took_seconds: Some(f.took.as_secs_f64()),
                age_seconds: f.age.as_secs_f64(),
                count: f.count,
                detail: f.detail,
            })
            .collect()
    }
}
