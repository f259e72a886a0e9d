//! In-flight work registries of other subsystems (node calls, pool holders and waiters, open
//! spans) as one trait the watchdog reads from its OS thread.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Longest string kept in an entry's label fields; longer values are cut.
pub const MAX_FIELD_LEN: usize = 64;
/// Longest free-text detail kept in an entry.
pub const MAX_DETAIL_LEN: usize = 512;

/// What an in-flight entry is. Decides which watchdog check looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InflightKind {
    /// A call to a node API (checked by `operation_overdue`).
    NodeCall,
    /// A task waiting to acquire a pool connection (checked by `pool_starved` and
    /// `operation_overdue`).
    PoolWait,
    /// A task holding a pool connection (checked by `operation_overdue`).
    PoolHold,
    /// Any other tracked operation: reconcile phase, bot handler... (`operation_overdue`).
    Operation,
    /// An open tracing span (from [`super::OpenSpansLayer`]); overdue only with a deadline.
    Span,
    /// One of vpnbot's database backends as the server sees it (evidence, never overdue).
    DbBackend,
}

/// An episode a source detects by itself (e.g. own database backends waiting on a lock),
/// opened and closed by the watchdog like its own kinds.
#[derive(Debug, Clone)]
pub struct SourceEpisode {
    /// Kind.
    pub kind: super::StallKind,
    /// Who it blames (bounded values only).
    pub culprit: super::Culprit,
    /// The verdict after `<kind>: `.
    pub verdict: String,
}

/// One piece of in-flight work. Label-like fields must come from bounded sets (node names
/// from config, operation names from code); never user ids, UUIDs, URLs or secrets.
#[derive(Debug, Clone, Serialize)]
pub struct InflightEntry {
    /// What it is.
    pub kind: InflightKind,
    /// Task family (e.g. `reconcile`), when known.
    pub task: Option<String>,
    /// Node name from config, when it concerns a node.
    pub node: Option<String>,
    /// Operation (e.g. `list-users`, span name).
    pub operation: Option<String>,
    /// Current phase (e.g. `connect`, `headers`, `body`).
    pub phase: Option<String>,
    /// Caller label (e.g. the pool acquire label).
    pub label: Option<String>,
    /// Time since it started.
    #[serde(serialize_with = "ser_secs")]
    pub age: Duration,
    /// Its own budget from start (e.g. the total deadline of a node call), if any.
    #[serde(serialize_with = "ser_opt_secs")]
    pub deadline: Option<Duration>,
    /// OS thread id where it is being polled right now, if known (spans record it on enter).
    pub thread: Option<u32>,
    /// Free text evidence, e.g. `headers after 12 ms, 0 body bytes, last read 9.8 s ago`;
    /// left out of the JSON when there is none (no empty fields in dumps).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}
fn ser_opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

fn bound(v: Option<String>, max: usize) -> Option<String> {
    v.map(|mut s| {
        if s.len() > max {
            let mut cut = max;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        s
    })
}

impl InflightEntry {
    /// An entry of `kind` that started `age` ago, every optional field empty.
    pub fn new(kind: InflightKind, age: Duration) -> Self {
        Self {
            kind,
            task: None,
            node: None,
            operation: None,
            phase: None,
            label: None,
            age,
            deadline: None,
            thread: None,
            detail: String::new(),
        }
    }

    /// Same as [`Self::new`] with the age measured from `started`.
    pub fn started_at(kind: InflightKind, started: Instant) -> Self {
        Self::new(kind, started.elapsed())
    }

    /// Cuts every field to its maximum length ([`MAX_FIELD_LEN`], [`MAX_DETAIL_LEN`]).
    pub fn bounded(mut self) -> Self {
        self.task = bound(self.task, MAX_FIELD_LEN);
        self.node = bound(self.node, MAX_FIELD_LEN);
        self.operation = bound(self.operation, MAX_FIELD_LEN);
        self.phase = bound(self.phase, MAX_FIELD_LEN);
        self.label = bound(self.label, MAX_FIELD_LEN);
        self.detail = bound(Some(self.detail), MAX_DETAIL_LEN).unwrap_or_default();
        self
    }

    /// True when it has a deadline and has outlived it by more than `grace`.
    pub fn past_deadline(&self, grace: Duration) -> bool {
        self.deadline.is_some_and(|d| self.age > d + grace)
    }

    /// A short human description: `node "a" list-users phase body`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.task {
            parts.push(format!("task \"{t}\""));
        }
        if let Some(n) = &self.node {
            parts.push(format!("node \"{n}\""));
        }
        if let Some(o) = &self.operation {
            parts.push(o.clone());
        }
        if let Some(l) = &self.label {
            parts.push(format!("label \"{l}\""));
        }
        if let Some(p) = &self.phase {
            parts.push(format!("phase {p}"));
        }
        if parts.is_empty() {
            parts.push(format!("{:?}", self.kind));
        }
        parts.join(" ")
    }
}

/// A registry of in-flight work that the watchdog reads from its own OS thread.
///
/// Implementations must not block and must not need the tokio runtime (use `std::sync::Mutex`
/// with tiny critical sections, or atomics): the watchdog calls them while the runtime may be
/// stuck.
pub trait InflightSource: Send + Sync {
    /// Section name in the dump, e.g. `node_calls`, `db_pool`, `spans`.
    fn section(&self) -> &'static str;
    /// Current entries.
    fn entries(&self) -> Vec<InflightEntry>;
    /// For pool-like sources: when the last acquire succeeded (`None` = unknown / not a pool).
    /// `pool_starved` fires when [`InflightKind::PoolWait`] entries older than the threshold
    /// exist and this is older than the threshold too (or `None`).
    fn last_success(&self) -> Option<Instant> {
        None
    }

    /// An episode this source detects by itself, if one is open now. Called by the watchdog
    /// every tick: must be as cheap as [`Self::entries`].
    fn episode(&self) -> Option<SourceEpisode> {
        None
    }

    /// A standing finding that is not an episode (e.g. "database time dominates: ..."), shown
    /// in a healthy dump's verdict. Called by dumps (and the `service_starved` cause), not by
    /// every watchdog tick.
    fn observation(&self) -> Option<String> {
        None
    }

    /// Recent history (bounded): e.g. the last failures per node and operation, so that a dump
    /// taken between two attempts still explains a repeating fault. Dump section `recent`.
    fn recent(&self) -> Vec<super::recent::RecentEvent> {
        Vec::new()
    }

    /// Called before a dump reads [`Self::entries`]: a source that reads its evidence
    /// asynchronously may refresh it, blocking the calling (dump) thread up to `wait`.
    fn refresh(&self, _wait: Duration) {}
}
