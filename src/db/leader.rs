//! Leadership: one dedicated connection, outside the pool, holds a session advisory lock. Only
//! the holder runs the singleton workers: polling mode's `getUpdates` consumer (`bot_polling`),
//! the one piece of work that cannot be split (one long poll per bot token). Reconcile, expiry
//! and the outbox run on every instance and share their work through PostgreSQL (see
//! [`crate::reconcile::lease`] and [`crate::outbox`]).
//!
//! Loss is detected by checking the lock connection every `check_interval` with a
//! `check_timeout` bound; the `false` is published before anything else happens so singleton
//! workers are cancelled at once. A new leader waits `takeover_delay` (longer than the old
//! leader's detection bound) before starting its workers, so two never overlap.
//!
//! The connection goes to `db.direct_url` when set (a pooler in transaction mode cannot carry a
//! session lock; see [`super::pooler`]). An attempt that fails with an error (not "held by
//! another instance") is published through [`LeaderHandle::failing`], which keeps `/readyz`
//! unready, and its connection refusal is counted like the pool's.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge, Registry};
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pool::connect_options;
use super::refusal::ConnectHealth;
use crate::config::{DbConfig, LeaderConfig};
use crate::metrics;
use crate::tasks::Tasks;

/// Why one attempt to take the leadership lock failed (not "held by another instance").
/// Its text is what `/readyz` and the log show; it never carries the database password.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    /// The connection settings are invalid.
    #[error("{0}")]
    Config(#[from] super::DbError),
    /// The server refused or dropped the connection (described with its SQLSTATE).
    #[error("{0}")]
    Connect(String),
    /// `pg_try_advisory_lock` failed.
    #[error("lock query failed: {0}")]
    LockQuery(String),
    /// No answer within connect timeout + check timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Read side of leadership: whether this instance currently leads.
#[derive(Debug, Clone)]
pub struct LeaderHandle {
    rx: watch::Receiver<bool>,
    failing: Arc<Mutex<Option<String>>>,
    attempted: watch::Receiver<bool>,
}

impl LeaderHandle {
    /// Why the last attempt to take or check the lock failed (an error, not "held by another
    /// instance"); `None` while leadership works. `/readyz` is not ready while this is set:
    /// an instance that cannot even compete for leadership cannot do its job.
    pub fn failing(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether this instance holds the lock and may run singleton workers right now.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until the first attempt to take the lock has ended (won, lost or failed), at most
    /// `bound`. Start-up waits for it before the workers that share the pool start, so that on
    /// a role with a tight `CONNECTION LIMIT` the leadership connection is not refused
    /// because pooled connections took every slot first (and then kept them while idle).
    pub async fn first_attempt(&self, bound: Duration) {
        let mut rx = self.attempted.clone();
        let _ = tokio::time::timeout(bound, rx.wait_for(|done| *done)).await;
    }

    /// Whether the first attempt to take the lock has ended (won, lost or failed); `/readyz`
    /// reports `"leader": null` before that.
    pub fn attempted(&self) -> bool {
        *self.attempted.borrow()
    }

    /// Whether this instance leads, once the first attempt has ended; `None` before that
    /// (what `/readyz` and `/diag` show).
    pub fn known_leader(&self) -> Option<bool> {
        self.attempted().then(|| self.is_leader())
    }

    /// A receiver that changes with leadership.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    /// A handle that never leads (for commands that only need the read side).
    pub fn never() -> Self {
        let (_tx, rx) = watch::channel(false);
        Self {
            rx,
            failing: Arc::default(),
            attempted: watch::channel(true).1,
        }
    }

    /// Runs `worker` only while this instance leads: started (as a named task) on gaining
    /// leadership, its token cancelled at once on losing it, restarted on regaining it. Waits up
    /// to `drain` for a cancelled worker to finish before it may be started again.
    pub fn run_while_leader<F, Fut>(
        &self,
        tasks: &Tasks,
        name: &'static str,
        drain: Duration,
        worker: F,
    ) where
        F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut rx = self.rx.clone();
        let root = tasks.root().clone();
        let tasks2 = tasks.clone();
        tasks.spawn_named("leader_supervisor", async move {
            loop {
                tokio::select! {
                    _ = root.cancelled() => return,
                    r = rx.wait_for(|l| *l) => if r.is_err() { return },
                }
                let token = root.child_token();
                let handle = tasks2.spawn_named(name, worker(token.clone()));
                tracing::info!(worker = name, "leader: singleton worker started");
                tokio::select! {
                    _ = root.cancelled() => {}
                    _ = rx.wait_for(|l| !*l) => {}
                }
                token.cancel();
                tracing::info!(worker = name, "leader: singleton worker cancelled");
                if tokio::time::timeout(drain, handle).await.is_err() {
                    tracing::error!(
                        worker = name,
                        "singleton worker did not stop within the drain bound"
                    );
                }
                if root.is_cancelled() {
                    return;
                }
            }
        });
    }
}

/// Leadership before it is competed for: the read side exists from start-up (the health
/// state holds it before the observability server answers), the task that takes the lock is
/// started later by [`Leadership::compete`], after migrations. Until its first attempt ends,
/// the handle reads "not leader, not failing, not yet attempted".
#[derive(Debug)]
pub struct Leadership {
    handle: LeaderHandle,
    tx: watch::Sender<bool>,
    attempted: watch::Sender<bool>,
    gauge: IntGauge,
    transitions: IntCounter,
}

impl Leadership {
    /// Registers `vpnbot_leader` and `vpnbot_leader_transitions_total` into `registry`.
    ///
    /// # Panics
    /// If those metric names are already registered in `registry`.
    pub fn new(registry: &Registry) -> Leadership {
        let (tx, rx) = watch::channel(false);
        let (attempted, attempted_rx) = watch::channel(false);
        let gauge = metrics::int_gauge(
            registry,
            "vpnbot_leader",
            "1 while this instance holds the leadership lock and runs singleton workers, else 0.",
        );
        let transitions = metrics::counter(
            registry,
            "vpnbot_leader_transitions_total",
            "Leadership changes of this instance (gained or lost).",
        );
        Leadership {
            handle: LeaderHandle {
                rx,
                failing: Arc::default(),
                attempted: attempted_rx,
            },
            tx,
            attempted,
            gauge,
            transitions,
        }
    }

    /// The read side; the same one before and after [`Leadership::compete`].
    pub fn handle(&self) -> LeaderHandle {
        self.handle.clone()
    }

    /// Starts the leadership task (`leadership`, a critical task in `run`); returns the read
    /// side.
    ///
    /// Failed connection attempts are counted and logged through `connect_health` (with their
    /// SQLSTATE), like the pool's.
    pub fn compete(
        self,
        leader: &LeaderConfig,
        db: &DbConfig,
        tasks: &Tasks,
        connect_health: Arc<ConnectHealth>,
    ) -> LeaderHandle {
        let state = LeaderLoop {
            cfg: leader.clone(),
            db: db.clone(),
            tx: self.tx,
            gauge: self.gauge,
            transitions: self.transitions,
            cancel: tasks.root().clone(),
            connect_health,
            failing: self.handle.failing.clone(),
            attempted: self.attempted,
        };
        tasks.spawn_named("leadership", state.run());
        self.handle
    }
}

struct LeaderLoop {
    cfg: LeaderConfig,
    db: DbConfig,
    tx: watch::Sender<bool>,
    gauge: IntGauge,
    transitions: IntCounter,
    cancel: CancellationToken,
    connect_health: Arc<ConnectHealth>,
    failing: Arc<Mutex<Option<String>>>,
    attempted: watch::Sender<bool>,
}

impl LeaderLoop {
    async fn run(self) {
        let retry = self.cfg.retry_interval_seconds;
        while !self.cancel.is_cancelled() {
            let attempt = self.try_acquire().await;
            // The outcome before "attempted": a reader that sees the first attempt ended (e.g.
            // `/readyz`) also sees whether it failed.
            self.set_failing(attempt.as_ref().err().map(|e| e.to_string()));
            self.attempted.send_replace(true);
            match attempt {
                Ok(Some(conn)) => self.lead(conn).await,
                Ok(None) => tracing::debug!("leadership lock held elsewhere; following"),
                Err(_) => {}
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(retry) => {}
            }
        }
        self.set(false);
    }

    async fn try_acquire(&self) -> Result<Option<PgConnection>, AttemptError> {
        let bound = self.db.connect_timeout_seconds + self.cfg.check_timeout_seconds;
        let attempt = async {
            let mut opts = connect_options(&self.db)?;
            opts = opts.application_name(&format!("{}-leader", self.db.application_name));
            let mut conn = match PgConnection::connect_with(&opts).await {
                Ok(c) => c,
                Err(e) => {
                    self.connect_health.record("leader", &e);
                    return Err(AttemptError::Connect(super::connect::describe(&e)));
                }
            };
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(self.cfg.lock_key)
                .fetch_one(&mut conn)
                .await
                .map_err(|e| AttemptError::LockQuery(super::connect::describe(&e)))?;
            Ok(got.then_some(conn))
        };
        tokio::time::timeout(bound, attempt)
            .await
            .map_err(|_| AttemptError::Timeout(bound))?
    }

    async fn lead(&self, mut conn: PgConnection) {
        let interval = self.cfg.check_interval_seconds;
        let timeout = self.cfg.check_timeout_seconds;
        let takeover_at = tokio::time::Instant::now() + self.cfg.takeover_delay_seconds;
        tracing::info!(
            "leadership lock acquired; starting singleton workers after the takeover delay"
        );
        loop {
            let check = tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&mut conn));
            let ok = tokio::select! {
                _ = self.cancel.cancelled() => {
                    self.set(false);
                    let _ = tokio::time::timeout(timeout, conn.close()).await;
                    return;
                }
                r = check => matches!(r, Ok(Ok(_))),
            };
            if !ok {
                // Publish the loss first: singleton workers are cancelled before anything else.
                self.set(false);
                tracing::error!("leadership lost: the lock connection failed its check");
                return;
            }
            if !*self.tx.borrow() && tokio::time::Instant::now() >= takeover_at {
                self.set(true);
                tracing::info!("leader: singleton workers may run");
            }
            tokio::select! {
                _ = self.cancel.cancelled() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Records the outcome of one attempt; logs a failure when it is new or changed (repeats
    /// every retry interval would drown the log), and the recovery.
    fn set_failing(&self, err: Option<String>) {
        let mut cur = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match (&*cur, &err) {
            (None, Some(e)) => tracing::warn!(error = %e, "leadership: cannot take the lock"),
            (Some(old), Some(e)) if old != e => {
                tracing::warn!(error = %e, "leadership: cannot take the lock")
            }
            (Some(_), None) => tracing::info!("leadership: lock attempts work again"),
            _ => {}
        }
        *cur = err;
    }

    fn set(&self, leader: bool) {
        let changed = self.tx.send_if_modified(|cur| {
            let changed = *cur != leader;
            *cur = leader;
            changed
        });
        if changed {
            self.transitions.inc();
        }
        self.gauge.set(leader as i64);
    }
}
