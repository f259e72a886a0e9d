//! What vpnbot's own backends are doing inside PostgreSQL, read from a monitoring connection
//! outside the pool (like leadership's, with its own short `statement_timeout`, so it answers
//! while the pool is exhausted).
//!
//! Every pooled connection's backend pid is recorded when it is opened ([`BackendPids`]), and
//! each holder in the pool registry carries it. The monitor reads `pg_stat_activity`,
//! `pg_locks` and `pg_blocking_pids()` for those pids whenever a connection has been held past
//! `db.monitor_threshold_seconds` (and at least every tenth interval, and on every dump), and
//! joins each backend with its holder (label, task, age). Its snapshot is a diagnostics source
//! (`db_backends` in every dump); while own backends wait on a lock past the threshold it opens
//! a `db_lock_wait` episode whose verdict names the lock, the relation and the blocker
//! ("3 connections (bot_subscription ×3) waiting on Lock (relation subscriptions) for up to
//! 2.1 s, held by pid 4711 'psql', idle in transaction for 41.0 s ...").

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use prometheus::{Gauge, Histogram, IntGaugeVec, Registry};
use sqlx::pool::PoolConnectionMetadata;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use super::db_time;
use super::inflight::{PoolEntry, PoolInflight, PoolUse};
use super::readiness::DbNotReady;
use super::DbPool;
use crate::config::DbConfig;
use crate::diagnostics::{InflightEntry, InflightKind, InflightSource, SourceEpisode, StallKind};
use crate::metrics::{self, DURATION_BUCKETS_SECONDS};

/// Why the monitoring connection gave no reading this interval.
#[derive(Debug, thiserror::Error)]
enum MonitorError {
    /// Opening the monitoring connection failed.
    #[error(transparent)]
    Connect(#[from] super::DbError),
    /// A monitoring statement failed (the server's words, URL-free).
    #[error("{}", super::connect::describe(.0))]
    Query(#[from] sqlx::Error),
    /// The reading took longer than its bound.
    #[error("monitoring query took longer than {0:?}")]
    TimedOut(Duration),
}

/// Longest query text kept for a blocker (string literals are replaced by `?` first).
pub const MAX_QUERY_LEN: usize = 120;

/// `wait_event_type` values PostgreSQL reports, plus `none` (on CPU or idle) and `other`.
const WAIT_TYPES: [&str; 11] = [
    "Activity",
    "BufferPin",
    "Client",
    "Extension",
    "IO",
    "IPC",
    "Lock",
    "LWLock",
    "Timeout",
    "none",
    "other",
];

/// Backend pid of each pooled connection, keyed by the connection's identity (the address of
/// its heap state, stable for the connection's life). Filled by the pool's `after_connect`.
#[derive(Debug, Clone, Default)]
pub struct BackendPids {
    map: Arc<Mutex<HashMap<usize, i32>>>,
}

/// A stable identity of a live connection: the address of the boxed state every
/// `PgConnection` consists of (never dereferenced). `None` if sqlx's layout ever changes.
fn conn_key(c: &PgConnection) -> Option<usize> {
    if std::mem::size_of::<PgConnection>() != std::mem::size_of::<*const u8>() {
        return None;
    }
    // SAFETY: `PgConnection` is a single `Box` field (its size equals a pointer's, so that field
    // is at offset 0 with no padding); its bytes are read as a raw pointer that is only
    // compared, never dereferenced.
    let p: *const u8 = unsafe { std::ptr::read(c as *const PgConnection as *const *const u8) };
    Some(p as usize)
}

type BoxFuture<'c, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'c>>;
type AfterConnect = dyn for<'c> Fn(
        &'c mut PgConnection,
        PoolConnectionMetadata,
    ) -> BoxFuture<'c, Result<(), sqlx::Error>>
    + Send
    + Sync;

impl BackendPids {
    /// The pool's `after_connect` hook: asks the new connection for its backend pid (one round
    /// trip per connection opened) and records it. A failure leaves the pid unknown.
    pub(crate) fn recorder(&self) -> Box<AfterConnect> {
        let map = self.map.clone();
        Box::new(move |conn, _meta| {
            let map = map.clone();
            Box::pin(async move {
                let pid: Result<i32, _> = sqlx::query_scalar("SELECT pg_backend_pid()")
                    .fetch_one(&mut *conn)
                    .await;
                if let (Ok(pid), Some(k)) = (pid, conn_key(conn)) {
                    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
                    m.insert(k, pid);
                }
                Ok(())
            })
        })
    }

    /// The pid recorded for `conn`.
    pub fn pid_of(&self, conn: &PgConnection) -> Option<i32> {
        let k = conn_key(conn)?;
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&k)
            .copied()
    }

    /// Every recorded pid (some may belong to connections closed since).
    pub fn all(&self) -> Vec<i32> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .copied()
            .collect()
    }

    fn retain(&self, alive: &[i32]) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, pid| alive.contains(pid));
    }
}

/// A request to cancel the statement still running on backend `pid`.
#[derive(Debug)]
struct CancelRequest {
    pid: i32,
    done: tokio::sync::oneshot::Sender<bool>,
}

/// Cancels statements whose caller gave up, through the monitoring connection
/// (`pg_cancel_backend`), then waits for the connection to become idle before it goes back to
/// the pool (closed instead when that takes longer than the monitor's statement timeout, or
/// when it was inside a transaction). Installed into the pool by [`DbMonitor::new`].
#[derive(Debug, Clone)]
pub struct Canceller {
    tx: tokio::sync::mpsc::UnboundedSender<CancelRequest>,
    bound: Duration,
    tasks: crate::tasks::Tasks,
}

impl Canceller {
    pub(crate) fn cancel_abandoned(
        &self,
        mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
        pid: i32,
        label: &'static str,
        close: bool,
        metrics: super::pool::DbMetrics,
        counted: super::pool::AbandonedGuard,
    ) {
        let me = self.clone();
        // Bounded: two waits of `bound` each.
        self.tasks.spawn_named("db_cancel_abandoned", async move {
            let _counted = counted;
            let (done, answered) = tokio::sync::oneshot::channel();
            let sent = me.tx.send(CancelRequest { pid, done }).is_ok();
            let cancelled =
                sent && matches!(tokio::time::timeout(me.bound, answered).await, Ok(Ok(true)));
            let raw: &mut PgConnection = &mut conn;
            let idle = matches!(
                tokio::time::timeout(me.bound, sqlx::Connection::flush(raw)).await,
                Ok(Ok(()))
            );
            if cancelled {
                metrics.count_abandoned_cancel(label);
            }
            tracing::debug!(
                pid,
                label,
                cancelled,
                idle,
                "db: abandoned statement cancelled"
            );
            if close || !idle {
                conn.close_on_drop();
            }
            drop(conn);
        });
    }
}

/// A session that blocks one of vpnbot's backends.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Blocker {
    /// Backend pid.
    pub pid: i32,
    /// Its `application_name`.
    pub application_name: String,
    /// Its `state` (`idle in transaction`, `active`, ...).
    pub state: String,
    /// Seconds in that state.
    pub state_seconds: Option<f64>,
    /// Seconds since its transaction began.
    pub xact_seconds: Option<f64>,
    /// Its current or last query, string literals replaced by `?`, cut to [`MAX_QUERY_LEN`].
    pub query: String,
}

/// One of vpnbot's pooled backends, joined with its holder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Backend {
    /// Backend pid.
    pub pid: i32,
    /// Holder label, `None` when no task holds the connection (idle in the pool, being
    /// returned, or still running a statement its caller abandoned).
    pub label: Option<&'static str>,
    /// Holder's tokio task id.
    pub task: Option<String>,
    /// Seconds the holder has held it.
    pub held_seconds: Option<f64>,
    /// `pg_stat_activity.state`.
    pub state: String,
    /// `wait_event_type`, if waiting.
    pub wait_event_type: Option<String>,
    /// `wait_event`, if waiting.
    pub wait_event: Option<String>,
    /// Seconds since the current statement began.
    pub statement_seconds: Option<f64>,
    /// For a lock wait: seconds waiting (`pg_locks.waitstart`).
    pub lock_wait_seconds: Option<f64>,
    /// For a lock wait: `relation <name>` or the lock type (`transactionid`, ...).
    pub lock: Option<String>,
    /// For a lock wait: the sessions blocking it.
    pub blockers: Vec<Blocker>,
}

impl Backend {
    fn waits_on_lock(&self) -> bool {
        self.wait_event_type.as_deref() == Some("Lock")
    }

    fn detail(&self) -> String {
        let mut s = format!("pid {} {}", self.pid, self.state);
        if let Some(t) = self.statement_seconds.filter(|_| self.state == "active") {
            s.push_str(&format!(", statement running {t:.1} s"));
        }
        if let Some(w) = &self.wait_event_type {
            s.push_str(&format!(
                ", waiting on {w}/{}",
                self.wait_event.as_deref().unwrap_or("?")
            ));
        }
        if let Some(l) = &self.lock {
            s.push_str(&format!(" ({l}"));
            if let Some(w) = self.lock_wait_seconds {
                s.push_str(&format!(" for {w:.1} s"));
            }
            s.push(')');
        }
        for b in &self.blockers {
            s.push_str(&format!("; blocked by {}", b.describe()));
        }
        if self.label.is_none() && self.state == "active" {
            s.push_str("; no holder: a statement its caller abandoned");
        }
        s
    }
}

impl Blocker {
    fn describe(&self) -> String {
        let mut s = format!(
            "pid {} '{}', {}",
            self.pid, self.application_name, self.state
        );
        if let Some(t) = self.state_seconds {
            s.push_str(&format!(" for {t:.1} s"));
        }
        if let Some(x) = self.xact_seconds {
            s.push_str(&format!(" (transaction open {x:.1} s)"));
        }
        if !self.query.is_empty() {
            let what = if self.state.starts_with("idle") {
                "last query"
            } else {
                "query"
            };
            s.push_str(&format!("; {what}: {}", self.query));
        }
        s
    }
}

/// The last reading of the monitoring connection.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MonitorSnapshot {
    /// Own backends, holders joined.
    pub backends: Vec<Backend>,
    /// Why the last reading failed, if it did.
    pub error: Option<String>,
    /// Round trip of the last ping on the monitoring connection, seconds.
    pub roundtrip_seconds: Option<f64>,
    #[serde(skip)]
    taken: Option<Instant>,
}

#[derive(Debug)]
struct LockSeen {
    at: Instant,
    verdict: String,
    relation: String,
    label: String,
}

struct MonitorMetrics {
    backends: IntGaugeVec,
    longest_lock_wait: Gauge,
    roundtrip: Histogram,
}

struct Shared {
    cfg: DbConfig,
    inflight: PoolInflight,
    pids: BackendPids,
    snap: Mutex<(u64, MonitorSnapshot)>,
    fresh: Condvar,
    wake: tokio::sync::Notify,
    requested: AtomicBool,
    lock_seen: Mutex<Option<LockSeen>>,
    metrics: MonitorMetrics,
    cancels: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<CancelRequest>>,
    readiness: Arc<super::readiness::DbReadiness>,
    pool: DbPool,
    db_time: Mutex<DbTimeState>,
}

/// Totals of the last [`db_time::WINDOW`] and the latest judgement.
#[derive(Debug, Default)]
struct DbTimeState {
    ring: std::collections::VecDeque<db_time::DbTotals>,
    window: Option<db_time::DbTimeWindow>,
    finding: Option<db_time::DbTimeFinding>,
}

/// The monitoring connection and its latest reading. Cheap to clone; a diagnostics source.
#[derive(Clone)]
pub struct DbMonitor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DbMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbMonitor").finish_non_exhaustive()
    }
}

impl DbMonitor {
    /// Registers the monitor's metrics for `pool` (its holders and recorded pids) and installs
    /// its [`Canceller`] into the pool. Its ping is the writability check behind `/readyz`,
    /// published into `readiness`, so readiness never waits for the pool.
    ///
    /// # Panics
    /// If the metric names are already registered.
    pub fn new(
        pool: &DbPool,
        registry: &Registry,
        readiness: Arc<super::readiness::DbReadiness>,
    ) -> DbMonitor {
        let backends = metrics::int_gauge_vec(
            registry,
            "vpnbot_db_backends",
            "vpnbot's own pooled backends by wait_event_type (none: on CPU or idle), as last read \
             from pg_stat_activity by the monitoring connection.",
            &["wait_event_type"],
        );
        for t in WAIT_TYPES {
            backends.with_label_values(&[t]);
        }
        let metrics = MonitorMetrics {
            backends,
            longest_lock_wait: metrics::gauge(
                registry,
                "vpnbot_db_lock_wait_longest_seconds",
                "Longest current lock wait among vpnbot's own backends, seconds (0 when none).",
            ),
            roundtrip: metrics::histogram(
                registry,
                "vpnbot_db_roundtrip_seconds",
                "Round trip of a ping on the monitoring connection (outside the pool), seconds.",
                DURATION_BUCKETS_SECONDS,
            ),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        pool.set_canceller(Canceller {
            tx,
            bound: pool.config().monitor_statement_timeout_seconds,
            tasks: pool.tasks().clone(),
        });
        DbMonitor {
            shared: Arc::new(Shared {
                cancels: tokio::sync::Mutex::new(rx),
                readiness,
                cfg: pool.config().clone(),
                inflight: pool.inflight().clone(),
                pids: pool.backend_pids().clone(),
                snap: Mutex::new((0, MonitorSnapshot::default())),
                fresh: Condvar::new(),
                wake: tokio::sync::Notify::new(),
                requested: AtomicBool::new(false),
                lock_seen: Mutex::new(None),
                metrics,
                pool: pool.clone(),
                db_time: Mutex::default(),
            }),
        }
    }

    /// The latest reading and its age.
    pub fn snapshot(&self) -> (MonitorSnapshot, Option<Duration>) {
        let g = self.shared.snap.lock().unwrap_or_else(|p| p.into_inner());
        let age = g.1.taken.map(|t| t.elapsed());
        (g.1.clone(), age)
    }

    /// Asks for a reading now and waits (blocking this OS thread, never a runtime worker) up to
    /// `wait` for it. Returns at once when the last reading is younger than 200 ms.
    pub fn refresh_blocking(&self, wait: Duration) {
        let s = &self.shared;
        let g = s.snap.lock().unwrap_or_else(|p| p.into_inner());
        if g.1
            .taken
            .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        let gen = g.0;
        s.requested.store(true, Ordering::Release);
        s.wake.notify_one();
        let _ = s
            .fresh
            .wait_timeout_while(g, wait, |g| g.0 == gen)
            .unwrap_or_else(|p| p.into_inner());
    }

    /// Runs the monitoring loop until `cancel`: a ping every `db.monitor_interval_seconds`
    /// (the round-trip metric), and a reading of the own backends when a connection has been
    /// held past the threshold, when asked, and every tenth interval.
    pub async fn run(self, cancel: CancellationToken) {
        let s = &self.shared;
        // Also the readiness check's period: at least every db.readiness_interval_seconds.
        let interval = s
            .cfg
            .monitor_interval_seconds
            .min(s.cfg.readiness_interval_seconds);
        let threshold = s.cfg.monitor_threshold_seconds;
        let bound = s.cfg.monitor_statement_timeout_seconds;
        let mut conn: Option<PgConnection> = None;
        let mut tick: u64 = 0;
        let mut last_error_log: Option<Instant> = None;
        let mut cancels = s.cancels.lock().await;
        loop {
            if conn.is_none() {
                match self.connect(bound).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => self.failed(e, &mut last_error_log),
                }
            }
            if let Some(c) = conn.as_mut() {
                let requested = s.requested.swap(false, Ordering::AcqRel);
                let held_long = s
                    .inflight
                    .snapshot()
                    .iter()
                    .any(|e| e.state == PoolUse::Holding && e.age >= threshold);
                let read = requested || held_long || tick % 10 == 0;
                match tokio::time::timeout(bound, self.read(c, read)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        conn = None;
                        self.failed(e, &mut last_error_log);
                    }
                    Err(_) => {
                        conn = None;
                        self.failed(MonitorError::TimedOut(bound), &mut last_error_log);
                    }
                }
            }
            tick += 1;
            let until = tokio::time::Instant::now() + interval;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    _ = s.wake.notified() => break,
                    Some(req) = cancels.recv() => {
                        let ok = match conn.as_mut() {
                            Some(c) => matches!(
                                tokio::time::timeout(
                                    bound,
                                    sqlx::query_scalar::<_, bool>("SELECT pg_cancel_backend($1)")
                                        .bind(req.pid)
                                        .fetch_one(&mut *c),
                                )
                                .await,
                                Ok(Ok(true))
                            ),
                            None => false,
                        };
                        let _ = req.done.send(ok);
                    }
                }
            }
        }
    }

    async fn connect(&self, bound: Duration) -> Result<PgConnection, MonitorError> {
        let mut c = super::connect::connect_direct(&self.shared.cfg, "monitor").await?;
        let ms = bound.as_millis().max(1).to_string();
        sqlx::query(
            "SELECT set_config('statement_timeout', $1, false), \
                    set_config('lock_timeout', $1, false)",
        )
        .bind(ms)
        .execute(&mut c)
        .await?;
        Ok(c)
    }

    fn failed(&self, e: MonitorError, last_log: &mut Option<Instant>) {
        let e = e.to_string();
        self.shared
            .readiness
            .record_timed(Err(DbNotReady::CheckFailed(e.clone())), Duration::ZERO);
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last_log = Some(Instant::now());
            tracing::warn!(error = %e, "database monitor: no reading from the monitoring connection");
        }
        self.publish(MonitorSnapshot {
            error: Some(e),
            taken: Some(Instant::now()),
            ..Default::default()
        });
    }

    async fn read(&self, c: &mut PgConnection, full: bool) -> Result<(), MonitorError> {
        let s = &self.shared;
        let t0 = Instant::now();
        // The ping is the readiness check: reachable and writable (not a standby, and neither
        // this session nor a new pool session would be read-only: this long-lived session
        // does not see `ALTER DATABASE/ROLE ... SET default_transaction_read_only = on`).
        let writable = sqlx::query_scalar::<_, bool>(
            "SELECT NOT pg_is_in_recovery() \
               AND current_setting('transaction_read_only') = 'off' \
               AND NOT EXISTS (SELECT 1 FROM pg_db_role_setting s \
                 WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database \
                                             WHERE datname = current_database())) \
                   AND s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = current_user)) \
                   AND s.setconfig @> ARRAY['default_transaction_read_only=on'])",
        )
        .fetch_one(&mut *c)
        .await;
        let rtt = t0.elapsed();
        let res = match &writable {
            Ok(true) => Ok(()),
            Ok(false) => Err(DbNotReady::ReadOnly),
            Err(e) => Err(DbNotReady::CheckFailed(super::connect::describe(e))),
        };
        s.readiness.record_timed(res, rtt);
        writable?;
        s.metrics.roundtrip.observe(rtt.as_secs_f64());
        self.track_db_time(rtt.as_secs_f64());
        if !full {
            let mut g = s.snap.lock().unwrap_or_else(|p| p.into_inner());
            g.1.roundtrip_seconds = Some(rtt.as_secs_f64());
            return Ok(());
        }
        let pids = s.pids.all();
        let mut backends = read_backends(c, &pids).await?;
        s.pids
            .retain(&backends.iter().map(|b| b.0.pid).collect::<Vec<_>>());
        let blocker_pids: Vec<i32> = {
            let mut v: Vec<i32> = backends.iter().flat_map(|b| b.1.iter().copied()).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let blockers = if blocker_pids.is_empty() {
            Vec::new()
        } else {
            read_blockers(c, &blocker_pids).await?
        };
        let holders = s.inflight.snapshot();
        let out: Vec<Backend> = backends
            .drain(..)
            .map(|(mut b, bl)| {
                join_holder(&mut b, &holders);
                b.blockers = bl
                    .iter()
                    .filter_map(|p| blockers.iter().find(|x| x.pid == *p).cloned())
                    .collect();
                b
            })
            .collect();
        self.update_metrics(&out);
        self.track_lock(&out);
        self.publish(MonitorSnapshot {
            backends: out,
            error: None,
            roundtrip_seconds: Some(rtt.as_secs_f64()),
            taken: Some(Instant::now()),
        });
        Ok(())
    }

    /// Adds this tick's totals to the window and judges it (see [`db_time::assess`]).
    fn track_db_time(&self, rtt: f64) {
        let s = &self.shared;
        let new = s.pool.metrics().totals(Some(rtt));
        let (held, in_statement) = s.pool.held_and_in_statement();
        let mut g = s.db_time.lock().unwrap_or_else(|p| p.into_inner());
        while g.ring.len() >= 2 && new.at.saturating_duration_since(g.ring[1].at) >= db_time::WINDOW
        {
            g.ring.pop_front();
        }
        let judged = g
            .ring
            .front()
            .filter(|old| new.at.saturating_duration_since(old.at) >= db_time::WINDOW / 4);
        let (window, finding) = match judged {
            Some(old) => {
                let rtts: Vec<f64> = g
                    .ring
                    .iter()
                    .skip(1)
                    .chain(std::iter::once(&new))
                    .filter_map(|t| t.roundtrip_seconds)
                    .collect();
                let mut w = db_time::DbTimeWindow::between(old, &new, &rtts);
                w.held = held;
                w.in_statement = in_statement;
                w.max_connections = s.cfg.max_connections;
                let f = db_time::assess(&w);
                (Some(w), f)
            }
            None => (None, None),
        };
        g.window = window;
        g.finding = finding;
        g.ring.push_back(new);
    }

    /// The database-time source of this monitor (dump section `db_time`): the last
    /// [`db_time::WINDOW`]'s statements, pool waits and round trips, and the finding
    /// ([`db_time::assess`]): `slow_database` or `pool_waits`.
    pub fn db_time_source(&self) -> DbTimeSource {
        DbTimeSource {
            monitor: self.clone(),
        }
    }

    /// The latest finding on where database time goes, if any.
    pub fn db_time_finding(&self) -> Option<db_time::DbTimeFinding> {
        self.shared
            .db_time
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finding
            .clone()
    }

    fn publish(&self, snap: MonitorSnapshot) {
        let s = &self.shared;
        let mut g = s.snap.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        g.1 = snap;
        s.fresh.notify_all();
    }

    fn update_metrics(&self, backends: &[Backend]) {
        let m = &self.shared.metrics;
        let mut counts: HashMap<&str, i64> = WAIT_TYPES.iter().map(|t| (*t, 0)).collect();
        for b in backends {
            let t = match b.wait_event_type.as_deref() {
                None => "none",
                Some(t) => WAIT_TYPES
                    .iter()
                    .copied()
                    .find(|w| *w == t)
                    .unwrap_or("other"),
            };
            *counts.entry(t).or_default() += 1;
        }
        for (t, n) in counts {
            m.backends.with_label_values(&[t]).set(n);
        }
        let longest = backends
            .iter()
            .filter(|b| b.waits_on_lock())
            .filter_map(|b| b.lock_wait_seconds.or(b.statement_seconds))
            .fold(0.0_f64, f64::max);
        m.longest_lock_wait.set(longest);
    }

    fn track_lock(&self, backends: &[Backend]) {
        let threshold = self.shared.cfg.monitor_threshold_seconds.as_secs_f64();
        let waiting: Vec<&Backend> = backends
            .iter()
            .filter(|b| {
                b.waits_on_lock()
                    && b.lock_wait_seconds
                        .or(b.statement_seconds)
                        .is_some_and(|w| w >= threshold)
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        let (verdict, relation, label) = lock_verdict(&waiting);
        *self
            .shared
            .lock_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(LockSeen {
            at: Instant::now(),
            verdict,
            relation,
            label,
        });
    }
}

/// One line: who waits on which lock, for how long, and who holds it.
fn lock_verdict(waiting: &[&Backend]) -> (String, String, String) {
    let mut by_label: Vec<(&str, usize)> = Vec::new();
    for b in waiting {
        let l = b.label.unwrap_or("no holder");
        match by_label.iter_mut().find(|(x, _)| *x == l) {
            Some(e) => e.1 += 1,
            None => by_label.push((l, 1)),
        }
    }
    by_label.sort_by_key(|(l, n)| (std::cmp::Reverse(*n), *l));
    let labels = by_label
        .iter()
        .map(|(l, n)| format!("{l} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let oldest = waiting
        .iter()
        .max_by(|a, b| {
            let w = |x: &Backend| x.lock_wait_seconds.or(x.statement_seconds).unwrap_or(0.0);
            w(a).total_cmp(&w(b))
        })
        .expect("non-empty");
    let lock = oldest.lock.clone().unwrap_or_else(|| "lock".into());
    // The root blocker: one that is not itself one of the waiting own backends.
    let waiting_pids: Vec<i32> = waiting.iter().map(|b| b.pid).collect();
    let mut blockers: Vec<&Blocker> = waiting.iter().flat_map(|b| b.blockers.iter()).collect();
    blockers.sort_by_key(|b| waiting_pids.contains(&b.pid));
    let mut s = format!(
        "{} connection{} ({labels}) waiting on Lock ({lock}) for up to {:.1} s",
        waiting.len(),
        if waiting.len() == 1 { "" } else { "s" },
        oldest
            .lock_wait_seconds
            .or(oldest.statement_seconds)
            .unwrap_or(0.0)
    );
    match blockers.first() {
        Some(b) => s.push_str(&format!(", held by {}", b.describe())),
        None => s.push_str(", blocker unknown (it may have just released)"),
    }
    let relation = oldest
        .lock
        .as_deref()
        .and_then(|l| l.strip_prefix("relation "))
        .unwrap_or("")
        .to_string();
    (s, relation, by_label[0].0.to_string())
}

fn join_holder(b: &mut Backend, holders: &[PoolEntry]) {
    if let Some(h) = holders
        .iter()
        .find(|h| h.state == PoolUse::Holding && h.pid == Some(b.pid))
    {
        b.label = Some(h.label);
        b.task = h.task.clone();
        b.held_seconds = Some(h.age.as_secs_f64());
    }
}

type BackendRow = (
    i32,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
    Option<f64>,
    Option<String>,
    Vec<i32>,
);

async fn read_backends(
    c: &mut PgConnection,
    pids: &[i32],
) -> Result<Vec<(Backend, Vec<i32>)>, sqlx::Error> {
    let rows: Vec<BackendRow> = sqlx::query_as(
        "SELECT a.pid, a.state, a.wait_event_type, a.wait_event, \
           EXTRACT(EPOCH FROM clock_timestamp() - a.query_start)::float8, \
           (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(l.waitstart))::float8 \
              FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted), \
           (SELECT CASE WHEN l.relation IS NOT NULL THEN 'relation ' || l.relation::regclass::text \
                        ELSE l.locktype END \
              FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted LIMIT 1), \
           CASE WHEN a.wait_event_type = 'Lock' THEN pg_blocking_pids(a.pid) ELSE '{}'::int[] END \
         FROM pg_stat_activity a WHERE a.pid = ANY($1) ORDER BY a.pid",
    )
    .bind(pids)
    .fetch_all(&mut *c)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                Backend {
                    pid: r.0,
                    label: None,
                    task: None,
                    held_seconds: None,
                    state: r.1.unwrap_or_default(),
                    wait_event_type: r.2,
                    wait_event: r.3,
                    statement_seconds: r.4,
                    lock_wait_seconds: r.5,
                    lock: r.6,
                    blockers: Vec::new(),
                },
                r.7,
            )
        })
        .collect())
}

type BlockerRow = (
    i32,
    Option<String>,
    Option<String>,
    Option<f64>,
    Option<f64>,
    Option<String>,
);

async fn read_blockers(c: &mut PgConnection, pids: &[i32]) -> Result<Vec<Blocker>, sqlx::Error> {
    let rows: Vec<BlockerRow> = sqlx::query_as(
        "SELECT pid, application_name, state, \
           EXTRACT(EPOCH FROM clock_timestamp() - state_change)::float8, \
           EXTRACT(EPOCH FROM clock_timestamp() - xact_start)::float8, \
           left(query, 1000) \
         FROM pg_stat_activity WHERE pid = ANY($1)",
    )
    .bind(pids)
    .fetch_all(&mut *c)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Blocker {
            pid: r.0,
            application_name: r.1.unwrap_or_default(),
            state: r.2.unwrap_or_default(),
            state_seconds: r.3,
            xact_seconds: r.4,
            query: redact_query(r.5.as_deref().unwrap_or("")),
        })
        .collect())
}

/// A query text safe to show: string literals become `?`, whitespace is collapsed, and the
/// result is cut to [`MAX_QUERY_LEN`] characters. (Statements vpnbot sends carry parameters as
/// `$n`, never their values; another session's literal values are removed here.)
pub fn redact_query(q: &str) -> String {
    let mut out = String::with_capacity(q.len().min(MAX_QUERY_LEN + 8));
    let mut in_str = false;
    let mut last_space = false;
    for ch in q.chars() {
        if in_str {
            if ch == '\'' {
                in_str = false;
            }
            continue;
        }
        if ch == '\'' {
            in_str = true;
            out.push('?');
            last_space = false;
            continue;
        }
        if ch.is_whitespace() {
            if !last_space && !out.is_empty() {
                out.push(' ');
            }
            last_space = true;
            continue;
        }
        last_space = false;
        out.push(ch);
    }
    let out = out.trim_end();
    match out.char_indices().nth(MAX_QUERY_LEN) {
        Some((i, _)) => format!("{}...", &out[..i]),
        None => out.to_string(),
    }
}

impl InflightSource for DbMonitor {
    fn section(&self) -> &'static str {
        "db_backends"
    }

    fn entries(&self) -> Vec<InflightEntry> {
        let (snap, age) = self.snapshot();
        let seen = age
            .map(|a| format!(" (read {:.1} s ago)", a.as_secs_f64()))
            .unwrap_or_default();
        let mut out: Vec<InflightEntry> = snap
            .backends
            .iter()
            .filter(|b| b.state != "idle" || b.label.is_some())
            .map(|b| {
                let mut e = InflightEntry::new(
                    InflightKind::DbBackend,
                    Duration::from_secs_f64(b.statement_seconds.unwrap_or(0.0).max(0.0)),
                );
                e.label = b.label.map(str::to_owned);
                e.task = b.task.clone();
                e.operation = Some("db_backend".into());
                e.phase = Some(b.state.clone());
                e.detail = format!("{}{seen}", b.detail());
                e.bounded()
            })
            .collect();
        if let Some(err) = snap.error {
            let mut e = InflightEntry::new(InflightKind::DbBackend, Duration::ZERO);
            e.operation = Some("db_monitor".into());
            e.detail = format!("monitoring connection: {err}{seen}");
            out.push(e.bounded());
        }
        out
    }

    fn episode(&self) -> Option<SourceEpisode> {
        let g = self
            .shared
            .lock_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let seen = g.as_ref()?;
        // Held over a few readings: waiters that hit lock_timeout are replaced by new ones.
        let hold = (self.shared.cfg.monitor_interval_seconds * 3)
            .max(self.shared.cfg.monitor_threshold_seconds * 2);
        if seen.at.elapsed() > hold {
            return None;
        }
        Some(SourceEpisode {
            kind: StallKind::DbLockWait,
            culprit: diagnostics::Culprit {
                operation: "Lock".into(),
                phase: seen.relation.clone(),
                label: seen.label.clone(),
                ..diagnostics::Culprit::default()
            },
            verdict: seen.verdict.clone(),
        })
    }

    fn refresh(&self, wait: Duration) {
        self.refresh_blocking(wait);
    }
}

/// Where database time goes (dump section `db_time`), from [`DbMonitor::db_time_source`].
#[derive(Debug, Clone)]
pub struct DbTimeSource {
    monitor: DbMonitor,
}

impl InflightSource for DbTimeSource {
    fn section(&self) -> &'static str {
        "db_time"
    }

    fn entries(&self) -> Vec<InflightEntry> {
        let g = self
            .monitor
            .shared
            .db_time
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(w) = &g.window else {
            return Vec::new();
        };
        let mut e = InflightEntry::new(InflightKind::DbBackend, Duration::ZERO);
        e.label = w.top_label.as_ref().map(|l| l.0.clone());
        match &g.finding {
            Some(f) => {
                e.operation = Some(f.kind().into());
                e.detail = f.text().to_owned();
            }
            None => {
                e.operation = Some("db_time".into());
                e.detail = format!(
                    "last {:.0} s: {} statements, {:.1} s in statements (p50 {}), {} acquires \
                     waited {:.1} s, round trip {}; {} of {} connections held, {} in statements",
                    w.seconds,
                    w.statements,
                    w.statement_seconds,
                    w.statement_p50_seconds
                        .map(|p| format!("{:.1} ms", p * 1000.0))
                        .unwrap_or_else(|| "-".into()),
                    w.acquires,
                    w.acquire_seconds,
                    w.roundtrip_seconds
                        .map(|p| format!("{:.1} ms", p * 1000.0))
                        .unwrap_or_else(|| "unknown".into()),
                    w.held,
                    w.max_connections,
                    w.in_statement
                );
            }
        }
        vec![e.bounded()]
    }

    fn observation(&self) -> Option<String> {
        self.monitor
            .db_time_finding()
            .map(|f| format!("{}: {}", f.kind(), f.text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_queries_lose_literals_and_length() {
        assert_eq!(
            redact_query("UPDATE users SET token = 'secret'  WHERE id = 5"),
            "UPDATE users SET token = ? WHERE id = 5"
        );
        let long = "SELECT ".to_string() + &"x, ".repeat(100);
        let r = redact_query(&long);
        assert!(
            r.ends_with("...") && r.chars().count() == MAX_QUERY_LEN + 3,
            "{r}"
        );
    }
}
