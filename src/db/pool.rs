//! The instrumented pool: every acquire names its call site with a static label (the
//! predecessor's `acquire_connection(pool, "reconcile_fetch_db")`, done properly) and is timed
//! twice: the wait for a connection and the hold until it is returned.

use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use secrecy::ExposeSecret;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgConnection, PgPool, Postgres};

use super::error::DbError;
use super::inflight::PoolInflight;
use super::refusal::ConnectHealth;
use crate::config::DbConfig;
use crate::metrics::{self, DURATION_BUCKETS_SECONDS};

/// Metric families of the pool and the data layer.
#[derive(Debug, Clone)]
pub struct DbMetrics {
    acquire_wait: HistogramVec,
    hold: HistogramVec,
    acquire_timeouts: IntCounterVec,
    pending: IntGauge,
    errors: IntCounterVec,
    cancelled: IntCounterVec,
    statement: HistogramVec,
    slow_after: Duration,
    slow_warned: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl DbMetrics {
    /// Registers the data layer's families (except the pool-state gauges, which
    /// [`DbPool::connect`] registers with the pool they read).
    pub fn register(registry: &Registry) -> Self {
        Self {
            acquire_wait: metrics::histogram_vec(
                registry,
                "vpnbot_db_pool_acquire_wait_seconds",
                "Time from asking the pool for a connection until getting one (or giving up), by call-site label.",
                &["label"],
                DURATION_BUCKETS_SECONDS,
            ),
            hold: metrics::histogram_vec(
                registry,
                "vpnbot_db_pool_hold_seconds",
                "Time a pooled connection was held, from acquire to release, by call-site label.",
                &["label"],
                DURATION_BUCKETS_SECONDS,
            ),
            acquire_timeouts: metrics::counter_vec(
                registry,
                "vpnbot_db_pool_acquire_timeouts_total",
                "Acquires that gave up after the acquire timeout, by call-site label.",
                &["label"],
            ),
            pending: metrics::int_gauge(
                registry,
                "vpnbot_db_pool_pending_acquires",
                "Acquires currently waiting for a connection.",
            ),
            errors: metrics::counter_vec(
                registry,
                "vpnbot_db_errors_total",
                "Database errors by kind (acquire_timeout, unavailable, statement_timeout, read_only, server_shutdown, query, ...).",
                &["kind"],
            ),
            statement: metrics::histogram_vec(
                registry,
                "vpnbot_db_statement_duration_seconds",
                "Statement round trips on pooled connections (from taking the connection for a \
                 query to checking its result), by call-site label.",
                &["label"],
                DURATION_BUCKETS_SECONDS,
            ),
            slow_after: Duration::from_secs(1),
            slow_warned: Arc::default(),
            cancelled: metrics::counter_vec(
                registry,
                "vpnbot_db_statements_cancelled_total",
                "Statements the server cancelled, by call-site label and reason (statement_timeout, \
                 lock_timeout, cancel_request: vpnbot cancelled a statement whose caller gave up).",
                &["label", "reason"],
            ),
        }
    }

    /// Counts one error under its kind.
    pub fn count_error(&self, e: &DbError) {
        self.errors.with_label_values(&[e.kind()]).inc();
    }

    /// Observes one statement of `label` that took `took`; past the slow-statement threshold
    /// logs a WARN naming the label (at most one per 10 s for the whole pool).
    fn observe_statement(&self, label: &'static str, took: Duration) {
        self.statement
            .with_label_values(&[label])
            .observe(took.as_secs_f64());
        if took < self.slow_after {
            return;
        }
        let mut last = self.slow_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        tracing::warn!(
            label,
            seconds = took.as_secs_f64(),
            threshold_seconds = self.slow_after.as_secs_f64(),
            "slow database statement (at most one such line per 10 s; \
             see vpnbot_db_statement_duration_seconds by label)"
        );
    }

    /// Cumulative statement and acquire-wait totals now (see [`super::db_time`]).
    pub(crate) fn totals(&self, roundtrip: Option<f64>) -> super::db_time::DbTotals {
        super::db_time::DbTotals::read(&self.statement, &self.acquire_wait, roundtrip)
    }

    /// Counts a statement vpnbot cancelled on the server after its caller gave up.
    pub(crate) fn count_abandoned_cancel(&self, label: &str) {
        self.cancelled
            .with_label_values(&[label, "cancel_request"])
            .inc();
    }

    /// Counts one error seen on a connection held for `label`: under its kind, and when the
    /// server cancelled the statement (SQLSTATE 57014, 55P03) under the label and reason too.
    pub fn count_statement_error(&self, label: &str, e: &DbError) {
        self.count_error(e);
        if let Some(reason) = e.cancel_reason() {
            self.cancelled.with_label_values(&[label, reason]).inc();
        }
    }
}

/// Reads connection counts from the pool at scrape time, so `/metrics` shows them even while
/// the main runtime is stalled.
#[derive(Debug)]
struct PoolStateCollector {
    pool: PgPool,
    connections: IntGaugeVec,
    max: IntGauge,
    held: Arc<AtomicUsize>,
    abandoned: Arc<AtomicUsize>,
}

impl Collector for PoolStateCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.connections.desc();
        d.extend(self.max.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let size = self.pool.size() as i64;
        let idle = self.pool.num_idle() as i64;
        self.connections.with_label_values(&["idle"]).set(idle);
        let used = (size - idle).max(0);
        self.connections.with_label_values(&["used"]).set(used);
        // `used` broken down so that it adds up: held by a caller (labelled in
        // vpnbot_db_pool_hold_seconds and the dump), still running a statement its caller
        // abandoned (being cancelled), and the rest (being opened, checked or returned).
        let held = self.held.load(Ordering::Acquire) as i64;
        let abandoned = self.abandoned.load(Ordering::Acquire) as i64;
        self.connections.with_label_values(&["held"]).set(held);
        self.connections
            .with_label_values(&["abandoned"])
            .set(abandoned);
        self.connections
            .with_label_values(&["in_transit"])
            .set((used - held - abandoned).max(0));
        let mut out = self.connections.collect();
        out.extend(self.max.collect());
        out
    }
}

/// How long an acquire waits, while the pool is opening a connection, before a direct probe
/// connection asks the server whether it refuses (sqlx retries refused connects silently until
/// the acquire timeout).
pub const PROBE_AFTER: Duration = Duration::from_millis(250);
/// At most one probe per this period while the server is not known to refuse.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// While backing off, how often a waiter looks for a returned connection (returns reach the
/// idle queue through a task sqlx spawns, so a release notification may come slightly early).
const RETURN_POLL: Duration = Duration::from_millis(10);

/// A PostgreSQL pool whose every acquire is labelled, timed and visible to the watchdog.
///
/// When the server refuses new connections (too many connections, auth, starting up, refused
/// port), the pool stops opening connections: waiters take only connections that already
/// exist, one probe per back-off period asks the server again, and a waiter with nothing to
/// wait for fails at once with [`DbError::Refused`] (see [`super::refusal`]). A healthy server
/// never sees this path: an acquire that finds or opens a connection within [`PROBE_AFTER`]
/// does exactly what it did before.
#[derive(Debug, Clone)]
pub struct DbPool {
    pool: PgPool,
    metrics: DbMetrics,
    inflight: PoolInflight,
    acquire_timeout: Duration,
    health: Arc<ConnectHealth>,
    held: Arc<AtomicUsize>,
    abandoned: Arc<AtomicUsize>,
    in_statement: Arc<AtomicUsize>,
    cfg: Arc<DbConfig>,
    pids: super::monitor::BackendPids,
    canceller: Arc<std::sync::OnceLock<super::monitor::Canceller>>,
    /// The pool's own short tasks (connection probes, abandoned-statement cancels): named and
    /// tracked like every task, and waited for by [`DbPool::close`].
    tasks: crate::tasks::Tasks,
}

impl DbPool {
    /// Builds the pool (connections open lazily, `min_connections` in the background) and
    /// registers its metrics. Each connection sets `statement_timeout`, `lock_timeout`,
    /// `idle_in_transaction_session_timeout` and `application_name` at startup, at no extra
    /// round trip.
    ///
    /// # Errors
    /// [`DbError::Query`] when the URL cannot be parsed (the message never includes it).
    pub fn connect(cfg: &DbConfig, registry: &Registry) -> Result<DbPool, DbError> {
        let opts = connect_options(cfg)?;
        let pids = super::monitor::BackendPids::default();
        let pool = PgPoolOptions::new()
            .after_connect(pids.recorder())
            .min_connections(cfg.min_connections)
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.acquire_timeout_seconds)
            .connect_lazy_with(opts);
        let connections = metrics::int_gauge_vec(
            registry,
            "vpnbot_db_pool_connections",
            "Open pool connections by state: idle, used; used broken down into held (by a \
             caller), abandoned (a statement its caller gave up on, being cancelled) and \
             in_transit (being opened, checked or returned).",
            &["state"],
        );
        // Registered through the collector below, not directly.
        registry
            .unregister(Box::new(connections.clone()))
            .expect("just registered");
        let max = IntGauge::new(
            "vpnbot_db_pool_max_connections",
            "Configured maximum pool size (the leadership connection is not counted).",
        )
        .expect("valid gauge");
        max.set(cfg.max_connections as i64);
        let held = Arc::new(AtomicUsize::new(0));
        let abandoned = Arc::new(AtomicUsize::new(0));
        registry
            .register(Box::new(PoolStateCollector {
                pool: pool.clone(),
                connections,
                max,
                held: held.clone(),
                abandoned: abandoned.clone(),
            }))
            .expect("unique metric names");
        let mut metrics = DbMetrics::register(registry);
        metrics.slow_after = cfg.slow_statement_seconds;
        Ok(DbPool {
            pool,
            metrics,
            inflight: PoolInflight::default(),
            acquire_timeout: cfg.acquire_timeout_seconds,
            health: Arc::new(ConnectHealth::register(registry)),
            held,
            abandoned,
            in_statement: Arc::default(),
            cfg: Arc::new(cfg.clone()),
            pids,
            canceller: Arc::default(),
            tasks: crate::tasks::Tasks::new(),
        })
    }

    /// Takes a connection for the call site `label` (a static name from the code, e.g.
    /// `"reconcile_snapshot"`), waiting at most the configured acquire timeout.
    ///
    /// Cancel-safe: a caller dropped while waiting leaves no waiter behind.
    ///
    /// # Errors
    /// [`DbError::AcquireTimeout`] naming `label`, [`DbError::PoolClosed`], or
    /// [`DbError::Unavailable`] when a new connection could not be opened.
    pub async fn acquire(&self, label: &'static str) -> Result<DbConn, DbError> {
        let started = Instant::now();
        let slot = self.inflight.begin_wait(label);
        let mut waiter = WaitGuard {
            pool: self,
            slot: Some(slot),
        };
        self.metrics.waiting_started();
        let deadline = tokio::time::Instant::now() + self.acquire_timeout;
        let res = self.acquire_conn(label, deadline).await;
        let waited = started.elapsed();
        self.metrics.acquire_waited(label, waited);
        let err = match res {
            Ok(conn) => {
                let slot = waiter.slot.take().expect("slot set above");
                self.metrics.waiting_ended();
                let pid = self.pids.pid_of(&conn);
                self.inflight.acquired(slot, pid);
                self.held.fetch_add(1, Ordering::AcqRel);
                return Ok(DbConn {
                    conn: Some(conn),
                    pid,
                    label,
                    slot,
                    acquired_at: Instant::now(),
                    tx_open: false,
                    discard: false,
                    statement_started: None,
                    pool: self.clone(),
                });
            }
            Err(DbError::AcquireTimeout { .. }) if self.health.refusing() => {
                self.metrics.acquire_timed_out(label);
                self.refused(label)
            }
            Err(DbError::AcquireTimeout { .. }) => {
                self.metrics.acquire_timed_out(label);
                DbError::AcquireTimeout { label, waited }
            }
            Err(DbError::PoolClosed { .. }) => DbError::PoolClosed { label },
            Err(e) => e,
        };
        drop(waiter);
        self.metrics.count_error(&err);
        Err(err)
    }

    /// Gets a connection by `deadline`: the normal sqlx path while the server accepts
    /// connections, only existing connections while it refuses; switches when the state
    /// changes.
    async fn acquire_conn(
        &self,
        label: &'static str,
        deadline: tokio::time::Instant,
    ) -> Result<PoolConnection<Postgres>, DbError> {
        loop {
            let step = if self.health.refusing() {
                self.acquire_existing(label, deadline).await
            } else {
                self.acquire_watching(deadline).await
            };
            if let Some(res) = step {
                return res;
            }
        }
    }

    /// The sqlx acquire, watched by one timer (the same cost as a plain timeout): if it is
    /// still waiting after [`PROBE_AFTER`] while the pool is opening connections, a probe asks
    /// the server directly. `None` when the server turns out to refuse (the caller switches to
    /// existing connections).
    async fn acquire_watching(
        &self,
        deadline: tokio::time::Instant,
    ) -> Option<Result<PoolConnection<Postgres>, DbError>> {
        let timeout = || DbError::AcquireTimeout {
            label: "unknown",
            waited: Duration::ZERO,
        };
        let fut = self.pool.acquire();
        tokio::pin!(fut);
        let next = |now: tokio::time::Instant| (now + PROBE_AFTER).min(deadline);
        let sleep = tokio::time::sleep_until(next(tokio::time::Instant::now()));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => {
                    return match r {
                        Ok(c) => Some(Ok(c)),
                        Err(sqlx::Error::PoolTimedOut) => Some(Err(timeout())),
                        Err(sqlx::Error::PoolClosed) => {
                            Some(Err(DbError::PoolClosed { label: "unknown" }))
                        }
                        // Anything else comes from opening a connection (sqlx returns
                        // errors it does not retry, e.g. 28P01, at once).
                        Err(e) => {
                            if self.health.record("pool", &e).is_refusal() {
                                None
                            } else {
                                Some(Err(DbError::from(e)))
                            }
                        }
                    };
                }
                _ = &mut sleep => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Some(Err(timeout()));
                    }
                    if self.health.refusing() {
                        return None;
                    }
                    if self.opening() > 0 {
                        self.spawn_probe(PROBE_EVERY);
                    }
                    sleep.as_mut().reset(next(now));
                }
            }
        }
    }

    /// While the server refuses: take an idle connection as soon as one is returned, never
    /// open one; fail at once when the pool has no connection to wait for. One probe per
    /// back-off period (only while connections are wanted) ends the back-off when it succeeds.
    /// `None` when the back-off has ended.
    async fn acquire_existing(
        &self,
        label: &'static str,
        deadline: tokio::time::Instant,
    ) -> Option<Result<PoolConnection<Postgres>, DbError>> {
        loop {
            let changed = self.health.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.health.refusing() {
                return None;
            }
            if let Some(c) = self.pool.try_acquire() {
                return Some(Ok(c));
            }
            self.spawn_probe(Duration::ZERO);
            if self.pool.size() == 0 {
                return Some(Err(self.refused(label)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Some(Err(DbError::AcquireTimeout {
                    label,
                    waited: Duration::ZERO,
                }));
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep(RETURN_POLL.min(deadline - tokio::time::Instant::now())) => {}
            }
        }
    }

    /// Connections the pool is opening right now (its size counts them before they exist).
    fn opening(&self) -> usize {
        let size = self.pool.size() as usize;
        size.saturating_sub(self.pool.num_idle() + self.held.load(Ordering::Acquire))
    }

    /// Starts the one probe (a direct connection, bounded by the connect timeout) unless one
    /// runs, one ran within `min_interval`, or the back-off has not expired.
    fn spawn_probe(&self, min_interval: Duration) {
        if !self.health.claim_probe(min_interval) {
            return;
        }
        let health = self.health.clone();
        let cfg = self.cfg.clone();
        // Bounded by the connect timeout.
        self.tasks.spawn_named("db_connect_probe", async move {
            match super::connect::connect_direct(&cfg, "probe").await {
                Ok(conn) => {
                    health.record_ok();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), sqlx::Connection::close(conn))
                            .await;
                }
                Err(DbError::Unavailable(e)) => {
                    health.record("probe", &e);
                }
                Err(_) => {}
            }
            health.probe_done();
        });
    }

    fn refused(&self, label: &'static str) -> DbError {
        let cause = self
            .health
            .last()
            .map(|r| format!("{} ({})", r.cause, r.kind.as_str()))
            .unwrap_or_else(|| "the server refused a new connection".into());
        DbError::Refused { label, cause }
    }

    /// Connection failures seen while running and the back-off state (for `/readyz` and the
    /// leadership connection).
    pub fn connect_health(&self) -> &Arc<ConnectHealth> {
        &self.health
    }

    /// Current holders and waiters, for the watchdog and `/debug/dump`.
    pub fn inflight(&self) -> &PoolInflight {
        &self.inflight
    }

    /// The data layer's metrics, for counting errors seen outside `acquire`.
    pub fn metrics(&self) -> &DbMetrics {
        &self.metrics
    }

    /// The bare sqlx pool, for migrations and benchmarks. Acquires through it are not
    /// labelled: production code uses [`DbPool::acquire`].
    pub fn raw(&self) -> &PgPool {
        &self.pool
    }

    /// Backend pids of the pool's connections, recorded at connect.
    pub fn backend_pids(&self) -> &super::monitor::BackendPids {
        &self.pids
    }

    /// Installs who cancels statements abandoned by their caller (the database monitor does;
    /// once, later calls are ignored). Without one, such a connection goes back to the pool
    /// and sqlx waits for the statement before reusing it.
    pub fn set_canceller(&self, c: super::monitor::Canceller) {
        let _ = self.canceller.set(c);
    }

    /// The configuration the pool was built with.
    pub fn config(&self) -> &DbConfig {
        &self.cfg
    }

    /// Connections held by a caller now, and of those, running a statement now (taken for a
    /// query and its result not checked yet).
    pub fn held_and_in_statement(&self) -> (usize, usize) {
        (
            self.held.load(Ordering::Acquire),
            self.in_statement.load(Ordering::Acquire),
        )
    }

    /// Configured acquire timeout.
    pub fn acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }

    /// Closes the pool: waits for held connections to be returned, then closes them all.
    pub async fn close(&self) {
        // Probes end within the connect timeout, cancels within twice the monitor's bound.
        let bound = self.cfg.connect_timeout_seconds
            + self.cfg.monitor_statement_timeout_seconds * 2
            + Duration::from_secs(1);
        if !self.tasks.shutdown(bound).await {
            tracing::warn!(
                bound_seconds = bound.as_secs_f64(),
                "db pool: probe or cancel tasks still running at close"
            );
        }
        self.pool.close().await;
    }

    /// The pool's own task set (see the field).
    pub(crate) fn tasks(&self) -> &crate::tasks::Tasks {
        &self.tasks
    }
}

/// Builds connect options with per-session settings as startup parameters.
///
/// # Errors
/// [`DbError::Query`] with a message that omits the URL (it may carry a password).
pub fn connect_options(cfg: &DbConfig) -> Result<PgConnectOptions, DbError> {
    let opts = PgConnectOptions::from_str(cfg.url.expose_secret()).map_err(|_| {
        DbError::Query(sqlx::Error::Configuration(
            "db.url is not a valid PostgreSQL URL".into(),
        ))
    })?;
    let ms = |d: std::time::Duration| d.as_millis().to_string();
    Ok(opts.application_name(&cfg.application_name).options([
        ("statement_timeout", ms(cfg.statement_timeout_seconds)),
        ("lock_timeout", ms(cfg.lock_timeout_seconds)),
        (
            "idle_in_transaction_session_timeout",
            ms(cfg.idle_in_transaction_timeout_seconds),
        ),
    ]))
}

/// Removes the waiter entry and the pending count if `acquire` is cancelled or fails.
struct WaitGuard<'a> {
    pool: &'a DbPool,
    slot: Option<usize>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.metrics.waiting_ended();
            self.pool.inflight.end(slot);
        }
    }
}

/// A pooled connection held for one call site. Dereferences to [`PgConnection`]; on drop it
/// records the hold time and goes back to the pool, unless it must be discarded (see
/// [`DbConn::begin`] and [`DbConn::check`]).
#[derive(Debug)]
pub struct DbConn {
    conn: Option<PoolConnection<Postgres>>,
    pid: Option<i32>,
    label: &'static str,
    slot: usize,
    acquired_at: Instant,
    tx_open: bool,
    discard: bool,
    statement_started: Option<Instant>,
    pool: DbPool,
}

impl DbConn {
    /// Maps a query result to [`DbError`], counts the error, and marks the connection for
    /// discarding when the error says the server is gone, restarting or read-only.
    ///
    /// # Errors
    /// The mapped error.
    pub fn check<T>(&mut self, res: Result<T, sqlx::Error>) -> Result<T, DbError> {
        if let Some(t) = self.statement_started.take() {
            self.pool.in_statement.fetch_sub(1, Ordering::AcqRel);
            self.pool.metrics.observe_statement(self.label, t.elapsed());
        }
        res.map_err(|e| {
            let e = DbError::from(e);
            if e.discards_connection() {
                self.discard = true;
            }
            self.pool.metrics.count_statement_error(self.label, &e);
            e
        })
    }

    /// Starts a transaction. If the returned [`Tx`] is dropped before `commit` or `rollback`
    /// completes (a cancelled task, a timeout, an error path), or the task is cancelled during
    /// `BEGIN` itself, the connection is closed instead of returned to the pool, so no backend
    /// is ever left `idle in transaction` and no later borrower inherits the transaction.
    ///
    /// # Errors
    /// As [`DbConn::check`].
    pub async fn begin(&mut self) -> Result<Tx<'_>, DbError> {
        self.tx_open = true;
        let res = self.conn_mut().execute("BEGIN").await;
        self.check(res)?;
        Ok(Tx { conn: self })
    }

    /// The call-site label this connection was acquired for.
    pub fn label(&self) -> &'static str {
        self.label
    }

    /// The server backend's pid, recorded when the connection was opened (`None` if that
    /// failed).
    pub fn backend_pid(&self) -> Option<i32> {
        self.pid
    }

    fn conn_mut(&mut self) -> &mut PgConnection {
        // Every query takes the connection mutably right before it runs; `check` reads this.
        if self.statement_started.replace(Instant::now()).is_none() {
            self.pool.in_statement.fetch_add(1, Ordering::AcqRel);
        }
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Deref for DbConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("connection present until drop")
    }
}

impl DerefMut for DbConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn_mut()
    }
}

impl Drop for DbConn {
    fn drop(&mut self) {
        self.pool
            .metrics
            .released(self.label, self.acquired_at.elapsed());
        if self.statement_started.take().is_some() {
            self.pool.in_statement.fetch_sub(1, Ordering::AcqRel);
        }
        self.pool.inflight.end(self.slot);
        if let Some(mut conn) = self.conn.take() {
            let close = self.tx_open || self.discard;
            match (self.pool.canceller.get(), self.pid) {
                (Some(c), Some(pid)) if statement_running(&mut conn) => {
                    // The caller gave up mid-statement (cancelled, timed out): stop the
                    // statement on the server and keep the connection out of the pool until
                    // it is idle again.
                    c.cancel_abandoned(
                        conn,
                        pid,
                        self.label,
                        close,
                        self.pool.metrics.clone(),
                        AbandonedGuard::new(self.pool.abandoned.clone()),
                    );
                }
                _ => {
                    if close {
                        conn.close_on_drop();
                    }
                }
            }
        }
        self.pool.held.fetch_sub(1, Ordering::AcqRel);
        // Waiters that may only take existing connections (while the server refuses) look now.
        if self.pool.health.refusing() {
            self.pool.health.changed.notify_waiters();
        }
    }
}

/// Counts a connection in `vpnbot_db_pool_connections{state="abandoned"}` while it lives.
#[derive(Debug)]
pub(crate) struct AbandonedGuard(Arc<AtomicUsize>);

impl AbandonedGuard {
    fn new(n: Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for AbandonedGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a statement is still running on `conn`: its caller's future was dropped before the
/// server's answer was read. One poll of sqlx's `flush` (which waits for pending answers)
/// with a no-op waker: ready at once, without I/O, when nothing is pending.
fn statement_running(conn: &mut PoolConnection<Postgres>) -> bool {
    use std::future::Future;
    if tokio::runtime::Handle::try_current().is_err() {
        return false;
    }
    let raw: &mut PgConnection = conn;
    let fut = sqlx::Connection::flush(raw);
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    fut.as_mut().poll(&mut cx).is_pending()
}

/// An open transaction on a [`DbConn`]. Dereferences to [`PgConnection`].
#[derive(Debug)]
pub struct Tx<'c> {
    conn: &'c mut DbConn,
}

impl Tx<'_> {
    /// Commits.
    ///
    /// # Errors
    /// As [`DbConn::check`]; on error the connection is discarded.
    pub async fn commit(self) -> Result<(), DbError> {
        self.finish("COMMIT").await
    }

    /// Rolls back.
    ///
    /// # Errors
    /// As [`DbConn::check`]; on error the connection is discarded.
    pub async fn rollback(self) -> Result<(), DbError> {
        self.finish("ROLLBACK").await
    }

    async fn finish(self, sql: &'static str) -> Result<(), DbError> {
        let res = self.conn.conn_mut().execute(sql).await;
        self.conn.check(res)?;
        self.conn.tx_open = false;
        Ok(())
    }

    /// Maps a query result inside the transaction; see [`DbConn::check`].
    ///
    /// # Errors
    /// The mapped error.
    pub fn check<T>(&mut self, res: Result<T, sqlx::Error>) -> Result<T, DbError> {
        self.conn.check(res)
    }
}

impl Deref for Tx<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn
    }
}

impl DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.conn_mut()
    }
}

impl DbMetrics {
    /// An acquire starts waiting (`vpnbot_db_pool_pending_acquires` up).
    pub fn waiting_started(&self) {
        self.pending.inc();
    }

    /// An acquire stopped waiting, with or without a connection.
    pub fn waiting_ended(&self) {
        self.pending.dec();
    }

    /// How long an acquire labelled `label` waited, connection or not.
    pub fn acquire_waited(&self, label: &str, waited: Duration) {
        self.acquire_wait
            .with_label_values(&[label])
            .observe(waited.as_secs_f64());
    }

    /// A connection acquired with `label` went back after being held for `held`.
    pub fn released(&self, label: &str, held: Duration) {
        self.hold
            .with_label_values(&[label])
            .observe(held.as_secs_f64());
    }

    /// An acquire labelled `label` gave up at its timeout.
    pub fn acquire_timed_out(&self, label: &str) {
        self.acquire_timeouts.with_label_values(&[label]).inc();
    }
}
