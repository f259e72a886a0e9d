//! The reconcile worker: keeps every node's users equal to the live subscriptions.
//!
//! One run ([`Reconciler::reconcile_once`]) takes each node, several at once, through seven
//! phases, each a span (`reconcile.<phase>`, counts as fields) and a
//! `vpnbot_reconcile_phase_duration_seconds` observation:
//!
//! 1. **snapshot**: the node's active subscriptions, by keyset pagination, one pooled
//!    connection per batch ([`snapshot`]);
//! 2. **list**: one `list-users` call, with no pooled connection held;
//! 3. **diff**: owned users without a subscription are orphans, unexpired subscriptions absent
//!    from the node are missing (on the blocking pool);
//! 4. **recheck**: batched re-check of the candidates just before acting; a purchase after the
//!    snapshot or a change within the grace window keeps its key (FAULTS.md S1);
//! 5. **guard**: too many removals, or an empty database side, removes nothing (S2);
//! 6. **act**: removals and re-adds become outbox intents, in one transaction; the outbox
//!    worker applies them and retries until the node confirms;
//! 7. **record**: an audit row in `reconcile_runs`.
//!
//! A database error is never read as "no subscriptions" and a node error never as "no users":
//! either fails the node's run before anything is planned (D5). Users without vpnbot's
//! ownership marker are never touched. `--dry-run` runs phases 1 to 5 and reports exactly what
//! phase 6 would write (S3).
//!
//! The periodic loop ([`Reconciler::run`]) never overlaps itself, bounds each run by the
//! iteration timeout and schedules starts at a jittered fixed rate, so a slow or hung node
//! does not push the next run back. [`ReconcileStatus`] tells the watchdog when a run last
//! completed.
//!
//! `vpnbot run` uses [`Reconciler::run_leased`] on every instance: each node is reconciled by
//! the instance holding its lease ([`lease`]), each held node once per jittered interval, and
//! every write of a pass is fenced by the lease's token.

mod act;
pub mod cli;
mod diff;
mod guard;
pub mod lease;
mod metrics;
mod recheck;
mod record;
mod settings;
pub mod snapshot;

pub use guard::{GuardReason, GuardTrip};
pub use metrics::ReconcileMetrics;
pub use settings::*;

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{self, StreamExt};
use prometheus::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::Instrument;
use uuid::Uuid;

use crate::db::{DbConn, DbError, DbPool};
use crate::diagnostics::WorkerWatch;
use crate::fleet::Fleet;
use crate::node::{NodeClient, NodeError};

/// Bound on writing the audit row of a node's run (it runs after the iteration deadline when
/// the run timed out, so it has its own), seconds.
pub const RECORD_TIMEOUT_SECONDS: f64 = 5.0;

/// How one node's run ended; [`Outcome::as_str`] is the `outcome` label and the audit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every phase completed; intents written.
    Ok,
    /// A database or node error stopped the run; nothing was written.
    Failed,
    /// The iteration timeout cancelled the run; its intents were all written or none.
    Timeout,
    /// The guard stopped every removal (re-adds of live users still went to the outbox).
    Guarded,
    /// A dry run completed; nothing was written but the audit row.
    DryRun,
}

impl Outcome {
    /// Label and audit value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
            Outcome::Guarded => "guarded",
            Outcome::DryRun => "dry_run",
        }
    }
}

/// A phase of a node's run; [`Phase::as_str`] is the `phase` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Database snapshot.
    Snapshot,
    /// `list-users` call.
    List,
    /// Set difference.
    Diff,
    /// Batched re-check.
    Recheck,
    /// Safety guard.
    Guard,
    /// Outbox intents.
    Act,
    /// Audit row.
    Record,
}

impl Phase {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Snapshot => "snapshot",
            Phase::List => "list",
            Phase::Diff => "diff",
            Phase::Recheck => "recheck",
            Phase::Guard => "guard",
            Phase::Act => "act",
            Phase::Record => "record",
        }
    }
}

/// What one node's run found and did.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    /// Node name.
    pub node: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Why it failed or timed out (no secrets, no URLs).
    pub error: Option<String>,
    /// Bounded error kind (`acquire_timeout`, `statement_timeout`, `body_timeout`, ...).
    pub error_type: Option<&'static str>,
    /// Phase in which it failed or timed out.
    pub failed_phase: Option<Phase>,
    /// Active subscriptions of this node in the snapshot.
    pub db_live: u64,
    /// Users on the node (owned or not).
    pub node_users: u64,
    /// Users on the node carrying vpnbot's ownership marker.
    pub node_owned: u64,
    /// Users whose email looks like vpnbot's marker but is not the marker of their own UUID
    /// (copied by hand, or mangled by the node or a panel): never removed. Non-zero on a node
    /// where every user should be matched means expired users are silently never removed.
    pub unmatched_markers: u64,
    /// Orphans found by the diff (before the re-check).
    pub orphans: u64,
    /// Missing users found by the diff (before the re-check).
    pub missing: u64,
    /// Orphans kept by the re-check or the grace window.
    pub kept_by_recheck: u64,
    /// Missing users whose subscription was no longer live at re-check.
    pub gone_by_recheck: u64,
    /// Candidates left alone because the outbox already has an open intent for them.
    pub already_pending: u64,
    /// The guard that stopped removals, if any.
    pub guard: Option<GuardTrip>,
    /// Removals the guard blocked.
    pub blocked_removals: u64,
    /// UUIDs handed (or in a dry run, that would be handed) to the outbox for removal.
    pub removals: Vec<Uuid>,
    /// UUIDs handed (or that would be handed) to the outbox for re-adding.
    pub readds: Vec<Uuid>,
    /// Removal intents written (0 in a dry run).
    pub removed: u64,
    /// Re-add intents written (0 in a dry run).
    pub readded: u64,
    /// Seconds per phase.
    pub phase_seconds: BTreeMap<&'static str, f64>,
    /// Database round trips.
    pub db_round_trips: u64,
    /// Most pooled connections this node's run held at once.
    pub max_connections_held: u64,
    /// Why the audit row could not be written, if it could not.
    pub record_error: Option<String>,
    /// Wall time of the node's run, seconds.
    pub seconds: f64,
    #[serde(skip)]
    current: Option<(Phase, Instant)>,
}

impl NodeReport {
    fn new(node: &str, dry_run: bool) -> Self {
        Self {
            node: node.to_string(),
            outcome: Outcome::Failed,
            dry_run,
            error: None,
            error_type: None,
            failed_phase: None,
            db_live: 0,
            node_users: 0,
            node_owned: 0,
            unmatched_markers: 0,
            orphans: 0,
            missing: 0,
            kept_by_recheck: 0,
            gone_by_recheck: 0,
            already_pending: 0,
            guard: None,
            blocked_removals: 0,
            removals: Vec::new(),
            readds: Vec::new(),
            removed: 0,
            readded: 0,
            phase_seconds: BTreeMap::new(),
            db_round_trips: 0,
            max_connections_held: 0,
            record_error: None,
            seconds: 0.0,
            current: None,
        }
    }
}

/// What one run found and did, per node (sorted by name).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// When the run started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// One entry per node.
    pub nodes: Vec<NodeReport>,
}

impl RunReport {
    /// The INFO line of a completed run: its duration, node count and the nodes not ok.
    fn log_completed(&self) {
        let bad: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| !matches!(n.outcome, Outcome::Ok))
            .map(|n| n.node.as_str())
            .collect();
        tracing::info!(
            seconds = self.seconds,
            nodes = self.nodes.len(),
            not_ok = ?bad,
            "reconcile run completed"
        );
    }
}

impl RunReport {
    /// The report of node `name`.
    pub fn node(&self, name: &str) -> Option<&NodeReport> {
        self.nodes.iter().find(|n| n.node == name)
    }
}

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Only this node (default: every configured node).
    pub node: Option<String>,
    /// Plan and report, write no intent.
    pub dry_run: bool,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// `--node` named a node that is not configured.
    #[error("node {0:?} is not configured")]
    UnknownNode(String),
}

/// Why one node's run failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PassError {
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("node: {0}")]
    Node(#[from] NodeError),
    #[error("{0}")]
    Internal(String),
    #[error("the node's reconcile lease was lost; nothing written")]
    LeaseLost,
}

impl PassError {
    fn error_type(&self) -> &'static str {
        match self {
            PassError::Db(e) => e.kind(),
            PassError::Node(e) => e.error_type(),
            PassError::Internal(_) => "internal",
            PassError::LeaseLost => "lease_lost",
        }
    }
}

/// Round trips and connections held by one node's run.
#[derive(Debug, Default)]
pub(crate) struct ConnStats {
    round_trips: AtomicU64,
    held: AtomicU64,
    max_held: AtomicU64,
}

impl ConnStats {
    pub(crate) async fn acquire<'a>(
        &'a self,
        pool: &DbPool,
        label: &'static str,
    ) -> Result<Held<'a>, DbError> {
        let conn = pool.acquire(label).await?;
        let now = self.held.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_held.fetch_max(now, Ordering::Relaxed);
        Ok(Held { conn, stats: self })
    }

    pub(crate) fn round_trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }
}

/// A pooled connection counted in [`ConnStats`].
#[derive(Debug)]
pub(crate) struct Held<'a> {
    conn: DbConn,
    stats: &'a ConnStats,
}

impl Deref for Held<'_> {
    type Target = DbConn;
    fn deref(&self) -> &DbConn {
        &self.conn
    }
}

impl DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut DbConn {
        &mut self.conn
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.stats.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Last run per node, as [`ReconcileStatus::nodes`] reports it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// When the node's last run ended, whatever its outcome.
    pub last_completed: SystemTime,
    /// When the node's last `ok` run ended.
    pub last_success: Option<SystemTime>,
    /// The last outcome.
    pub last_outcome: Outcome,
    /// Bounded error kind of the last run, when it failed or timed out.
    pub last_error_type: Option<&'static str>,
    /// Phase the last run failed or timed out in.
    pub last_failed_phase: Option<Phase>,
    /// Why the last run failed (no secrets, no URLs), cut to the dump's detail bound.
    pub last_error: Option<String>,
    /// Wall time of the last run, seconds.
    pub last_seconds: f64,
    #[serde(skip)]
    at: Instant,
}

#[derive(Debug)]
struct StatusInner {
    /// Unix ms of the last completed run; 0 before the first.
    last_completed_ms: AtomicU64,
    /// Unix ms when the worker loop last started; 0 when it never ran.
    worker_started_ms: AtomicU64,
    runs_completed: AtomicU64,
    overdue_after: Duration,
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
}

/// When runs last completed, readable from any thread without the runtime (atomics and a plain
/// mutex held for a map copy): the input of the watchdog's `worker_overdue` check. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct ReconcileStatus {
    inner: Arc<StatusInner>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_ms(ms: u64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms))
}

impl ReconcileStatus {
    fn new(overdue_after: Duration) -> Self {
        Self {
            inner: Arc::new(StatusInner {
                last_completed_ms: AtomicU64::new(0),
                worker_started_ms: AtomicU64::new(0),
                runs_completed: AtomicU64::new(0),
                overdue_after,
                nodes: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeStatus>> {
        self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the last run (of any outcome) completed; `None` before the first.
    pub fn last_completed(&self) -> Option<SystemTime> {
        from_ms(self.inner.last_completed_ms.load(Ordering::Relaxed))
    }

    /// When the periodic worker last started; `None` if it never ran in this process.
    pub fn worker_started(&self) -> Option<SystemTime> {
        from_ms(self.inner.worker_started_ms.load(Ordering::Relaxed))
    }

    /// Runs completed since start.
    pub fn runs_completed(&self) -> u64 {
        self.inner.runs_completed.load(Ordering::Relaxed)
    }

    /// Longest normal gap between completed runs: interval × (1 + jitter) + iteration
    /// timeout ([`ReconcileSettings::overdue_after`]).
    pub fn overdue_after(&self) -> Duration {
        self.inner.overdue_after
    }

    /// How far past [`ReconcileStatus::overdue_after`] the worker is, counting from its last
    /// completed run or, before the first, from its start. `None` when not overdue or when the
    /// worker is not running in this process (a follower).
    pub fn overdue_by(&self, now: SystemTime) -> Option<Duration> {
        let started = self.worker_started()?;
        let since = self.last_completed().map_or(started, |c| c.max(started));
        let age = now.duration_since(since).unwrap_or_default();
        age.checked_sub(self.inner.overdue_after)
            .filter(|d| !d.is_zero())
    }

    /// Last run of every node that has completed one.
    pub fn nodes(&self) -> BTreeMap<String, NodeStatus> {
        self.lock().clone()
    }

    /// The leased worker looked for due nodes and found none: counts as completed for the
    /// watchdog (an instance holding no lease is not overdue).
    fn idle(&self) {
        self.inner
            .last_completed_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    fn worker_started_now(&self) {
        self.inner
            .worker_started_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    fn completed(&self, reports: &[NodeReport]) {
        let now = SystemTime::now();
        {
            let mut g = self.lock();
            for r in reports {
                let prev = g.get(&r.node).and_then(|s| s.last_success);
                g.insert(
                    r.node.clone(),
                    NodeStatus {
                        last_completed: now,
                        last_success: if r.outcome == Outcome::Ok {
                            Some(now)
                        } else {
                            prev
                        },
                        last_outcome: r.outcome,
                        last_error_type: r.error_type,
                        last_failed_phase: r.failed_phase,
                        last_error: r.error.as_ref().map(|e| {
                            let mut e = e.clone();
                            let mut cut = crate::diagnostics::MAX_DETAIL_LEN.min(e.len());
                            while !e.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            e.truncate(cut);
                            e
                        }),
                        last_seconds: r.seconds,
                        at: Instant::now(),
                    },
                );
            }
        }
        self.inner
            .last_completed_ms
            .store(unix_ms(now), Ordering::Relaxed);
        self.inner.runs_completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The last reconcile outcome per node in every dump (section `reconcile`), so a dump taken
/// between two runs still says how the last one ended and why.
impl crate::diagnostics::InflightSource for ReconcileStatus {
    fn section(&self) -> &'static str {
        "reconcile"
    }

    fn entries(&self) -> Vec<crate::diagnostics::InflightEntry> {
        Vec::new()
    }

    fn recent(&self) -> Vec<crate::diagnostics::RecentEvent> {
        self.lock()
            .iter()
            .map(|(node, st)| crate::diagnostics::RecentEvent {
                what: "reconcile",
                node: Some(node.clone()),
                operation: None,
                phase: st.last_failed_phase.map(|p| p.as_str().to_owned()),
                outcome: match st.last_error_type {
                    Some(t) => format!("{} ({t})", st.last_outcome.as_str()),
                    None => st.last_outcome.as_str().to_owned(),
                },
                bytes_received: None,
                since_last_byte_seconds: None,
                attempts: None,
                took_seconds: Some(st.last_seconds),
                age_seconds: st.at.elapsed().as_secs_f64(),
                count: 1,
                detail: st.last_error.clone().unwrap_or_default(),
            })
            .collect()
    }
}

#[derive(Debug)]
struct Inner {
    pool: DbPool,
    fleet: Fleet,
    settings: ReconcileSettings,
    metrics: ReconcileMetrics,
    status: ReconcileStatus,
    diagnostics: Option<crate::diagnostics::Diagnostics>,
}

/// The reconcile worker. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

impl Reconciler {
    /// A worker over `pool` and `fleet`; registers the `vpnbot_reconcile_*` families into
    /// `registry`. Not watched by the watchdog (CLI, tests); see [`Reconciler::watched`].
    pub fn new(
        pool: DbPool,
        fleet: Fleet,
        registry: &Registry,
        settings: ReconcileSettings,
    ) -> Self {
        Self::watched(pool, fleet, registry, settings, None)
    }

    /// As [`Reconciler::new`], reporting every completed run (ok or not) to the watchdog's
    /// `worker_overdue` check of `diagnostics`.
    pub fn watched(
        pool: DbPool,
        fleet: Fleet,
        registry: &Registry,
        settings: ReconcileSettings,
        diagnostics: Option<crate::diagnostics::Diagnostics>,
    ) -> Self {
        let status = ReconcileStatus::new(settings.overdue_after());
        Self {
            inner: Arc::new(Inner {
                pool,
                fleet,
                metrics: ReconcileMetrics::register(registry),
                settings,
                status,
                diagnostics,
            }),
        }
    }

    /// The status handle for the watchdog.
    pub fn status(&self) -> ReconcileStatus {
        self.inner.status.clone()
    }

    /// The settings in use.
    pub fn settings(&self) -> &ReconcileSettings {
        &self.inner.settings
    }

    /// One run over every node (or `opts.node`), at most `node_concurrency` nodes at once,
    /// bounded by the iteration timeout (plus [`RECORD_TIMEOUT_SECONDS`] for the audit rows of
    /// nodes that timed out). Node failures are reported per node, not returned.
    ///
    /// # Errors
    /// [`ReconcileError::UnknownNode`] when `opts.node` is not configured.
    pub async fn reconcile_once(&self, opts: &RunOptions) -> Result<RunReport, ReconcileError> {
        let clients: Vec<(NodeClient, Option<lease::Fence>)> = match &opts.node {
            Some(n) => vec![(
                self.inner
                    .fleet
                    .get(n)
                    .ok_or_else(|| ReconcileError::UnknownNode(n.clone()))?
                    .clone(),
                None,
            )],
            None => self
                .inner
                .fleet
                .clients()
                .cloned()
                .map(|c| (c, None))
                .collect(),
        };
        Ok(self.run_clients(clients, opts).await)
    }

    async fn run_clients(
        &self,
        clients: Vec<(NodeClient, Option<lease::Fence>)>,
        opts: &RunOptions,
    ) -> RunReport {
        let span = tracing::info_span!(
            "reconcile.run",
            dry_run = opts.dry_run,
            nodes = clients.len(),
            ok = Empty,
            not_ok = Empty,
        );
        let started_at = chrono::Utc::now();
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + self.inner.settings.iteration_timeout_seconds;
        let mut nodes: Vec<NodeReport> = stream::iter(clients)
            .map(|(c, fence)| self.node_run(c, fence, opts, deadline))
            .buffer_unordered(self.inner.settings.node_concurrency)
            .collect()
            .instrument(span.clone())
            .await;
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let ok = nodes
            .iter()
            .filter(|n| matches!(n.outcome, Outcome::Ok | Outcome::DryRun))
            .count();
        span.record("ok", ok);
        span.record("not_ok", nodes.len() - ok);
        self.inner.status.completed(&nodes);
        RunReport {
            started_at,
            seconds: t0.elapsed().as_secs_f64(),
            dry_run: opts.dry_run,
            nodes,
        }
    }

    /// Budget per run for the watchdog: the interval plus its jitter, so the watchdog's
    /// factor counts whole runs.
    fn run_budget(&self) -> std::time::Duration {
        let s = &self.inner.settings;
        s.jittered_interval().max(s.interval_seconds)
    }

    /// Runs [`Reconciler::reconcile_once`] at a jittered fixed rate until `cancel` (only on the
    /// leader: wire it through `run_while_leader`). The first run starts at once. Runs never
    /// overlap: the next start waits for the current run, which the iteration timeout bounds
    /// (and which must not exceed the interval).
    pub async fn run(self, cancel: CancellationToken) {
        self.inner.status.worker_started_now();
        let watch = WorkerWatch::start(
            self.inner.diagnostics.as_ref(),
            "reconcile",
            self.run_budget(),
        );
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            next = tokio::time::Instant::now() + self.inner.settings.jittered_interval();
            let opts = RunOptions::default();
            let run = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.reconcile_once(&opts) => r,
            };
            watch.ran(self.run_budget());
            if let Ok(rep) = run {
                rep.log_completed();
            }
        }
    }

    /// Runs on every instance (see [`lease`]): every tick (a tenth of the interval, at most
    /// 1 s) or when `leases` acquired a node, reconciles the held nodes whose last ok run
    /// (by any instance) is older than the interval, or which this instance last ran a
    /// jittered interval ago; their passes are fenced by the lease tokens. Runs never overlap
    /// and are bounded by the iteration timeout.
    pub async fn run_leased(self, leases: lease::Leases, cancel: CancellationToken) {
        self.inner.status.worker_started_now();
        let watch = WorkerWatch::start(
            self.inner.diagnostics.as_ref(),
            "reconcile",
            self.run_budget(),
        );
        let s = &self.inner.settings;
        let tick =
            (s.interval_seconds / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        // This instance's own schedule per node: the next start after its last run here.
        let mut next: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
                _ = leases.acquired() => {}
            }
            let now = tokio::time::Instant::now();
            let held = leases.held();
            next.retain(|n, _| held.iter().any(|h| &h.0 == n));
            let due: Vec<(NodeClient, Option<lease::Fence>)> = held
                .into_iter()
                .filter(|(node, _, last)| match next.get(node) {
                    Some(at) => *at <= now,
                    None => last.is_none_or(|l| l + s.interval_seconds <= now),
                })
                .filter_map(|(node, token, _)| {
                    let c = self.inner.fleet.get(&node)?.clone();
                    Some((
                        c,
                        Some(lease::Fence {
                            leases: leases.clone(),
                            token,
                        }),
                    ))
                })
                .collect();
            if due.is_empty() {
                self.inner.status.idle();
                watch.ran(self.run_budget());
                continue;
            }
            let opts = RunOptions::default();
            let rep = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.run_clients(due, &opts) => r,
            };
            watch.ran(self.run_budget());
            for n in &rep.nodes {
                next.insert(
                    n.node.clone(),
                    tokio::time::Instant::now() + s.jittered_interval(),
                );
                if n.outcome == Outcome::Ok {
                    leases.reconciled(&n.node);
                }
            }
            rep.log_completed();
        }
    }

    async fn node_run(
        &self,
        client: NodeClient,
        fence: Option<lease::Fence>,
        opts: &RunOptions,
        deadline: tokio::time::Instant,
    ) -> NodeReport {
        let node = client.name().to_string();
        let span = tracing::info_span!(
            "reconcile.node",
            node = %node,
            dry_run = opts.dry_run,
            outcome = Empty,
            orphans = Empty,
            missing = Empty,
            removed = Empty,
            readded = Empty,
            error.type = Empty,
        );
        let this = self.clone();
        let inner_span = span.clone();
        async move {
            let started_at = chrono::Utc::now();
            let t0 = Instant::now();
            let stats = ConnStats::default();
            let mut rep = NodeReport::new(&node, opts.dry_run);
            let res = tokio::time::timeout_at(
                deadline,
                this.pass(&client, fence.as_ref(), opts, &stats, &mut rep, t0),
            )
            .await;
            let failed_phase = rep.current.map(|c| c.0);
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    rep.outcome = Outcome::Failed;
                    rep.error_type = Some(e.error_type());
                    rep.error = Some(e.to_string());
                    rep.failed_phase = failed_phase;
                }
                Err(_) => {
                    rep.outcome = Outcome::Timeout;
                    rep.error_type = Some("timeout");
                    rep.error = Some(format!(
                        "iteration timeout of {} s reached in phase {}",
                        this.inner.settings.iteration_timeout_seconds.as_secs_f64(),
                        failed_phase.map_or("-", Phase::as_str)
                    ));
                    rep.failed_phase = failed_phase;
                }
            }
            this.end(&mut rep);

            this.begin(&mut rep, Phase::Record);
            let rec = tokio::time::timeout(
                Duration::from_secs_f64(RECORD_TIMEOUT_SECONDS),
                record::insert(&this.inner.pool, &stats, &rep, started_at, fence.as_ref()),
            )
            .instrument(tracing::info_span!("reconcile.record", node = %node))
            .await;
            this.end(&mut rep);
            match rec {
                Ok(Ok(())) => {}
                Ok(Err(e)) => rep.record_error = Some(e.to_string()),
                Err(_) => {
                    rep.record_error = Some(format!(
                        "audit row not written within {RECORD_TIMEOUT_SECONDS} s"
                    ))
                }
            }
            if let Some(e) = &rep.record_error {
                tracing::warn!(error = %e, "reconcile: audit row not written");
            }
            rep.db_round_trips = stats.round_trips.load(Ordering::Relaxed);
            rep.max_connections_held = stats.max_held.load(Ordering::Relaxed);
            rep.seconds = t0.elapsed().as_secs_f64();
            this.observe(&rep);
            let s = &inner_span;
            s.record("outcome", rep.outcome.as_str());
            s.record("orphans", rep.orphans);
            s.record("missing", rep.missing);
            s.record("removed", rep.removed);
            s.record("readded", rep.readded);
            if let Some(t) = rep.error_type {
                s.record("error.type", t);
            }
            match rep.outcome {
                Outcome::Ok | Outcome::DryRun => tracing::info!(
                    db_live = rep.db_live,
                    node_users = rep.node_users,
                    kept = rep.kept_by_recheck,
                    removals = rep.removals.len(),
                    readds = rep.readds.len(),
                    seconds = rep.seconds,
                    "reconcile: node done"
                ),
                // Only the fields that apply: a guarded run has no error, a failed one no guard.
                _ => tracing::warn!(
                    outcome = rep.outcome.as_str(),
                    error = rep.error.as_deref(),
                    guard = rep.guard.as_ref().map(|g| g.detail.as_str()),
                    "reconcile: node not reconciled"
                ),
            }
            rep
        }
        .instrument(span)
        .await
    }

    fn begin(&self, rep: &mut NodeReport, phase: Phase) {
        rep.current = Some((phase, Instant::now()));
    }

    fn end(&self, rep: &mut NodeReport) {
        if let Some((phase, t)) = rep.current.take() {
            let d = t.elapsed().as_secs_f64();
            rep.phase_seconds.insert(phase.as_str(), d);
            self.inner
                .metrics
                .phase_duration
                .with_label_values(&[rep.node.as_str(), phase.as_str()])
                .observe(d);
        }
    }

    fn observe(&self, rep: &NodeReport) {
        let m = &self.inner.metrics;
        let n = rep.node.as_str();
        m.runs.with_label_values(&[n, rep.outcome.as_str()]).inc();
        m.orphans.with_label_values(&[n]).inc_by(rep.orphans);
        m.missing.with_label_values(&[n]).inc_by(rep.missing);
        m.removed.with_label_values(&[n]).inc_by(rep.removed);
        m.readded.with_label_values(&[n]).inc_by(rep.readded);
        // Only a run that read the node's list knows; a failed one leaves the last reading.
        if rep.phase_seconds.contains_key(Phase::Diff.as_str()) {
            m.unmatched_markers
                .with_label_values(&[n])
                .set(rep.unmatched_markers as f64);
        }
        if let Some(g) = &rep.guard {
            m.guard_trips
                .with_label_values(&[n, g.reason.as_str()])
                .inc();
        }
        if rep.outcome == Outcome::Ok {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            m.last_success.with_label_values(&[n]).set(now);
        }
    }

    /// Phases 1 to 6 of one node. Sets `rep.outcome` when it returns `Ok`.
    async fn pass(
        &self,
        client: &NodeClient,
        fence: Option<&lease::Fence>,
        opts: &RunOptions,
        stats: &ConnStats,
        rep: &mut NodeReport,
        t0: Instant,
    ) -> Result<(), PassError> {
        let s = &self.inner.settings;
        let pool = &self.inner.pool;
        let node = rep.node.clone();
        let batch = s.recheck_batch_size as usize;

        self.begin(rep, Phase::Snapshot);
        let span = tracing::info_span!("reconcile.snapshot", rows = Empty, batches = Empty);
        let snap = snapshot::load(pool, stats, &node, s.batch_size)
            .instrument(span.clone())
            .await?;
        span.record("rows", snap.rows.len());
        span.record("batches", snap.batches);
        rep.db_live = snap.rows.len() as u64;
        self.end(rep);

        // No pooled connection is held from here to the end of the call: `snap` owns no
        // connection, and every acquire above has been dropped.
        self.begin(rep, Phase::List);
        if fence.is_some_and(|f| !f.holds(&node)) {
            return Err(PassError::LeaseLost);
        }
        let span = tracing::info_span!("reconcile.list", users = Empty);
        let users = client.list_users().instrument(span.clone()).await?;
        span.record("users", users.len());
        self.end(rep);

        self.begin(rep, Phase::Diff);
        let span = tracing::info_span!(
            "reconcile.diff",
            node_users = Empty,
            owned = Empty,
            orphans = Empty,
            missing = Empty
        );
        let live = snap.rows;
        let d = tokio::task::spawn_blocking(move || diff::diff(&live, users))
            .instrument(span.clone())
            .await
            .map_err(|e| PassError::Internal(format!("diff task failed: {e}")))?;
        span.record("node_users", d.node_users);
        span.record("owned", d.node_owned);
        span.record("orphans", d.orphans.len());
        span.record("missing", d.missing.len());
        rep.node_users = d.node_users;
        rep.node_owned = d.node_owned;
        rep.unmatched_markers = d.unmatched_markers;
        if d.unmatched_markers > 0 {
            tracing::warn!(
                node = %node,
                unmatched_markers = d.unmatched_markers,
                owned = d.node_owned,
                "users on this node look vpnbot-made but match no UUID of theirs; they are never removed (marker copied by hand, or emails rewritten by the node or a panel)"
            );
        }
        rep.orphans = d.orphans.len() as u64;
        rep.missing = d.missing.len() as u64;
        self.end(rep);

        self.begin(rep, Phase::Recheck);
        let span = tracing::info_span!(
            "reconcile.recheck",
            kept = Empty,
            gone = Empty,
            pending = Empty,
            queries = Empty
        );
        let missing: &[Uuid] = if s.readd_missing { &d.missing } else { &[] };
        let window = s.grace_seconds + t0.elapsed();
        let rc = recheck::recheck(pool, stats, &node, &d.orphans, missing, window, batch)
            .instrument(span.clone())
            .await?;
        span.record("kept", rc.kept);
        span.record("gone", rc.gone);
        span.record("pending", rc.pending);
        span.record("queries", rc.queries);
        rep.kept_by_recheck = rc.kept;
        rep.gone_by_recheck = rc.gone;
        rep.already_pending = rc.pending;
        self.end(rep);

        self.begin(rep, Phase::Guard);
        let trip = guard::check(s, rep.db_live, rep.node_owned, rc.remove.len() as u64);
        tracing::info_span!(
            "reconcile.guard",
            planned_removals = rc.remove.len(),
            tripped = trip.as_ref().map(|t| t.reason.as_str()).unwrap_or("none")
        )
        .in_scope(|| {
            if let Some(t) = &trip {
                // The node on the event itself: at warn level the span fields are not shown.
                tracing::warn!(node = %node, reason = t.reason.as_str(), detail = %t.detail, "reconcile guard tripped: nothing removed");
            }
        });
        if trip.is_some() {
            rep.blocked_removals = rc.remove.len() as u64;
            rep.removals = Vec::new();
        } else {
            rep.removals = rc.remove;
        }
        rep.readds = rc.readd;
        rep.guard = trip;
        self.end(rep);

        if !opts.dry_run {
            self.begin(rep, Phase::Act);
            if fence.is_some_and(|f| !f.holds(&node)) {
                return Err(PassError::LeaseLost);
            }
            let span = tracing::info_span!("reconcile.act", removed = Empty, readded = Empty);
            let acted =
                act::enqueue_all(pool, stats, &node, &rep.removals, &rep.readds, batch, fence)
                    .instrument(span.clone())
                    .await?;
            span.record("removed", acted.removed);
            span.record("readded", acted.readded);
            rep.removed = acted.removed;
            rep.readded = acted.readded;
            self.end(rep);
        }
        rep.outcome = if rep.guard.is_some() {
            Outcome::Guarded
        } else if opts.dry_run {
            Outcome::DryRun
        } else {
            Outcome::Ok
        };
        Ok(())
    }
}
