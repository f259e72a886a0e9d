//! Per-node reconcile leases: every instance runs the reconcile worker, and each node is
//! reconciled by the one instance holding its lease row in `node_leases` (migrations/0006).
//!
//! **Why lease rows, not an advisory lock per node.** An advisory lock lives in one database
//! session: holding one per node means one dedicated connection per node per instance (hundreds
//! of nodes, hundreds of connections), it does not survive a transaction-mode pooler, and it
//! carries no number a write can be checked against. A row with a holder, an expiry and a
//! **fencing token** costs one statement per renewal for all held nodes, works through any
//! pooler, and lets every write of a pass require the token it started with.
//!
//! Every `lease_renew_interval_seconds` the [`Leases`] task, on one pooled connection:
//! 1. upserts this instance's heartbeat row (`worker_instances`, live until now + lease
//!    duration) and counts the live instances;
//! 2. renews the leases it holds (`expires_at = now() + lease_duration_seconds`);
//! 3. aims at `ceil(nodes / live instances)`: releases the surplus (another instance takes them
//!    at its next tick) or takes free or expired leases (`FOR UPDATE SKIP LOCKED`), bumping
//!    each one's fencing token; taking an expired lease of another holder is a takeover.
//!
//! **Bound.** A dead instance renews nothing: its leases expire at most `lease_duration` after
//! its last renewal, and every live instance below its target tries to take free leases every
//! `lease_renew_interval`, so each of its nodes has a new holder within
//! `lease_duration + lease_renew_interval` of the death (40 s with the defaults), and is
//! reconciled at once when its last run is older than the interval.
//!
//! **Fencing.** A lease counts as held locally only until `lease_duration` after the start of
//! the statement that last renewed it (the database's clock may differ, the local monotonic
//! clock only shortens that); a pass checks it before the node call and before acting, and its
//! writes (the outbox intents, in a transaction that locks the lease row `FOR SHARE`, and the
//! audit row) carry `holder = me AND fencing_token = token AND expires_at > now()` in their
//! `WHERE`, so a pass whose lease was lost or taken over writes nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{GaugeVec, IntCounter, IntGauge, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::{DbError, DbPool};
use crate::metrics;

/// Default lease duration, seconds: a lease not renewed for this long is free to take.
pub const DEFAULT_LEASE_DURATION_SECONDS: f64 = 30.0;
/// Default interval between lease renewals (and takeover attempts), seconds.
pub const DEFAULT_LEASE_RENEW_INTERVAL_SECONDS: f64 = 10.0;
/// Bound on one lease tick (heartbeat, renewal, balance), as a share of the renew interval.
const TICK_BOUND_SHARE: f64 = 0.9;
/// Bound on releasing the leases at shutdown.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// An identifier of this process among the instances sharing the database:
/// `<hostname>-<pid>-<4 random hex digits>`. Never a metric label (Prometheus' target labels
/// say which instance); it appears in `node_leases.holder`, `pending_node_ops.claimed_by`,
/// `reconcile_runs.instance_id` and the logs.
pub fn new_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Metric families of the reconcile leases (this instance's view; the `instance` dimension is
/// Prometheus' target label).
#[derive(Debug, Clone)]
pub struct LeaseMetrics {
    held: IntGauge,
    live_instances: IntGauge,
    acquisitions: IntCounter,
    takeovers: IntCounter,
    losses: IntCounter,
    releases: IntCounter,
    unheld: GaugeVec,
    reconciled_age: GaugeVec,
    bound: prometheus::Gauge,
}

impl LeaseMetrics {
    /// Registers the families.
    pub fn register(registry: &Registry) -> Self {
        Self {
            held: metrics::int_gauge(
                registry,
                "vpnbot_reconcile_leases_held",
                "Node reconcile leases this instance holds now.",
            ),
            live_instances: metrics::int_gauge(
                registry,
                "vpnbot_reconcile_live_instances",
                "Instances with a live heartbeat row, as this instance last counted them.",
            ),
            acquisitions: metrics::counter(
                registry,
                "vpnbot_reconcile_lease_acquisitions_total",
                "Node leases this instance acquired (free or expired ones; takeovers included).",
            ),
            takeovers: metrics::counter(
                registry,
                "vpnbot_reconcile_lease_takeovers_total",
                "Node leases this instance acquired after another holder's lease expired (that holder died or stalled).",
            ),
            losses: metrics::counter(
                registry,
                "vpnbot_reconcile_lease_losses_total",
                "Node leases this instance held and could not renew (expired or taken over); releases are not losses.",
            ),
            releases: metrics::counter(
                registry,
                "vpnbot_reconcile_lease_releases_total",
                "Node leases this instance gave up on purpose (above its fair share, or at shutdown).",
            ),
            unheld: metrics::gauge_vec(
                registry,
                "vpnbot_reconcile_node_unheld_seconds",
                "Seconds since the node last had a live lease holder (0 while held), read from the database by every instance.",
                &["node"],
            ),
            reconciled_age: metrics::gauge_vec(
                registry,
                "vpnbot_reconcile_node_last_reconciled_age_seconds",
                "Seconds since the node's last reconcile run that ended ok, by any instance (since the lease row was created when none yet), read from the database.",
                &["node"],
            ),
            bound: metrics::gauge(
                registry,
                "vpnbot_reconcile_lease_takeover_bound_seconds",
                "Configured bound on a node having no lease holder: lease_duration_seconds + lease_renew_interval_seconds.",
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct HeldLease {
    token: i64,
    /// Until when the lease is surely ours (local monotonic clock).
    valid_until: Instant,
    /// When the node's last ok run ended, by any instance (local clock), `None` when never.
    last_reconciled: Option<Instant>,
}

#[derive(Debug)]
struct Inner {
    pool: DbPool,
    instance_id: String,
    nodes: Vec<String>,
    duration: Duration,
    renew: Duration,
    held: Mutex<BTreeMap<String, HeldLease>>,
    acquired: tokio::sync::Notify,
    metrics: LeaseMetrics,
}

/// The lease table's client for one instance: the task that heartbeats, renews and balances
/// ([`Leases::run`]), and the read side the reconcile worker asks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Leases {
    inner: Arc<Inner>,
}

/// What one lease tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseTick {
    /// Live instances counted.
    pub live_instances: i64,
    /// The share aimed at: ceil(nodes / live instances).
    pub target: usize,
    /// Leases held after the tick.
    pub held: usize,
    /// Leases acquired.
    pub acquired: usize,
    /// Of them, taken over from an expired holder.
    pub takeovers: usize,
    /// Released above the target.
    pub released: usize,
    /// Held before and not renewed.
    pub lost: usize,
}

type Row = (String, i64, Option<f64>);

impl Leases {
    /// A lease client for `nodes` (the configured node names) as `instance_id`.
    pub fn new(
        pool: DbPool,
        instance_id: String,
        nodes: Vec<String>,
        settings: &super::ReconcileSettings,
        metrics: LeaseMetrics,
    ) -> Self {
        metrics
            .bound
            .set(settings.lease_takeover_bound().as_secs_f64());
        Self {
            inner: Arc::new(Inner {
                pool,
                instance_id,
                nodes,
                duration: settings.lease_duration_seconds,
                renew: settings.lease_renew_interval_seconds,
                held: Mutex::new(BTreeMap::new()),
                acquired: tokio::sync::Notify::new(),
                metrics,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, HeldLease>> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// The fencing token of `node` when this instance surely holds its lease now.
    pub fn token(&self, node: &str) -> Option<i64> {
        let now = Instant::now();
        self.lock()
            .get(node)
            .filter(|l| l.valid_until > now)
            .map(|l| l.token)
    }

    /// Whether this instance surely holds `node`'s lease with `token` now.
    pub fn holds(&self, node: &str, token: i64) -> bool {
        self.token(node) == Some(token)
    }

    /// Nodes held now (sorted), with their token and when their last ok run ended.
    pub(crate) fn held(&self) -> Vec<(String, i64, Option<Instant>)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, l)| l.valid_until > now)
            .map(|(n, l)| (n.clone(), l.token, l.last_reconciled))
            .collect()
    }

    /// Names of the nodes held now.
    pub fn held_nodes(&self) -> Vec<String> {
        self.held().into_iter().map(|(n, ..)| n).collect()
    }

    /// Resolves when a tick acquired a lease.
    pub(crate) async fn acquired(&self) {
        self.inner.acquired.notified().await
    }

    /// Heartbeats, renews and balances every `lease_renew_interval_seconds` until `cancel`,
    /// then releases every lease and removes the heartbeat row (bounded), so the others take
    /// the nodes at their next tick instead of after the lease duration.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let bound = self.inner.renew.mul_f64(TICK_BOUND_SHARE);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let res = tokio::select! {
                _ = cancel.cancelled() => break,
                r = tokio::time::timeout(bound, self.tick()) => r,
            };
            match res {
                Ok(Ok(t)) if t.acquired + t.released + t.lost > 0 => {
                    tracing::info!(?t, "reconcile leases changed")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "reconcile lease tick failed"),
                Err(_) => tracing::warn!(
                    bound_seconds = bound.as_secs_f64(),
                    "reconcile lease tick did not finish in time"
                ),
            }
        }
        match tokio::time::timeout(RELEASE_TIMEOUT, self.release_all()).await {
            Ok(Ok(n)) => tracing::info!(released = n, "reconcile leases released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "reconcile leases not released"),
            Err(_) => tracing::warn!("reconcile leases not released in time"),
        }
    }

    /// One heartbeat, renewal and balance (see the module docs).
    ///
    /// # Errors
    /// A database error; held leases then stay valid locally only until their deadline.
    pub async fn tick(&self) -> Result<LeaseTick, DbError> {
        let me = self.inner.instance_id.as_str();
        let nodes = &self.inner.nodes;
        let dur = self.inner.duration.as_secs_f64();
        let mut conn = self.inner.pool.acquire("reconcile_lease").await?;
        let t0 = Instant::now();
        let valid_until = t0 + self.inner.duration;

        let r = sqlx::query(
            "INSERT INTO worker_instances (instance_id, heartbeat_at, expires_at) \
             VALUES ($1, now(), now() + make_interval(secs => $2)) \
             ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now(), \
             expires_at = EXCLUDED.expires_at",
        )
        .bind(me)
        .bind(dur)
        .execute(&mut *conn)
        .await;
        conn.check(r)?;
        // Heartbeat rows of instances gone for an hour are of no use to anyone.
        let r = sqlx::query(
            "DELETE FROM worker_instances WHERE expires_at < now() - interval '1 hour'",
        )
        .execute(&mut *conn)
        .await;
        conn.check(r)?;
        let r = sqlx::query(
            "INSERT INTO node_leases (node) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(nodes)
        .execute(&mut *conn)
        .await;
        conn.check(r)?;
        let r = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM worker_instances WHERE expires_at > now()",
        )
        .fetch_one(&mut *conn)
        .await;
        let live = conn.check(r)?.max(1);

        let r = sqlx::query_as::<_, Row>(
            "UPDATE node_leases SET expires_at = now() + make_interval(secs => $2) \
             WHERE holder = $1 AND expires_at > now() AND node = ANY($3) \
             RETURNING node, fencing_token, \
               EXTRACT(EPOCH FROM now() - last_reconciled_at)::float8",
        )
        .bind(me)
        .bind(dur)
        .bind(nodes)
        .fetch_all(&mut *conn)
        .await;
        let mut renewed = conn.check(r)?;
        renewed.sort_by(|a, b| a.0.cmp(&b.0));

        let target = nodes.len().div_ceil(live as usize);
        let mut released: Vec<String> = Vec::new();
        let mut acquired: Vec<(String, i64, Option<f64>, bool)> = Vec::new();
        if renewed.len() > target {
            // Keep the first `target` (by name: stable across ticks), release the rest.
            released = renewed.split_off(target).into_iter().map(|r| r.0).collect();
            let r = sqlx::query(
                "UPDATE node_leases SET holder = NULL, expires_at = now() \
                 WHERE holder = $1 AND node = ANY($2)",
            )
            .bind(me)
            .bind(&released)
            .execute(&mut *conn)
            .await;
            conn.check(r)?;
        } else if renewed.len() < target {
            let want = (target - renewed.len()) as i64;
            let r = sqlx::query_as::<_, (String, i64, Option<f64>, bool)>(
                "WITH c AS (SELECT node, holder AS old_holder FROM node_leases \
                   WHERE node = ANY($3) AND (holder IS NULL OR expires_at <= now()) \
                   ORDER BY random() LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 UPDATE node_leases l SET holder = $1, \
                   expires_at = now() + make_interval(secs => $2), \
                   fencing_token = l.fencing_token + 1, acquired_at = now() \
                 FROM c WHERE l.node = c.node \
                 RETURNING l.node, l.fencing_token, \
                   EXTRACT(EPOCH FROM now() - l.last_reconciled_at)::float8, \
                   c.old_holder IS NOT NULL",
            )
            .bind(me)
            .bind(dur)
            .bind(nodes)
            .bind(want)
            .fetch_all(&mut *conn)
            .await;
            acquired = conn.check(r)?;
        }

        // Per-node view for the gauges, from the database (the same for every instance).
        let r = sqlx::query_as::<_, (String, bool, f64, f64)>(
            "SELECT node, holder IS NOT NULL AND expires_at > now(), \
               GREATEST(EXTRACT(EPOCH FROM now() - GREATEST(expires_at, created_at)), 0)::float8, \
               EXTRACT(EPOCH FROM now() - COALESCE(last_reconciled_at, created_at))::float8 \
             FROM node_leases WHERE node = ANY($1)",
        )
        .bind(nodes)
        .fetch_all(&mut *conn)
        .await;
        let view = conn.check(r)?;
        drop(conn);

        let ago = |age: Option<f64>| {
            age.and_then(|a| t0.checked_sub(Duration::from_secs_f64(a.max(0.0))))
                .or(age.map(|_| t0))
        };
        let takeovers = acquired.iter().filter(|a| a.3).count();
        let lost;
        let held_now;
        {
            let mut held = self.lock();
            let before: Vec<String> = held.keys().cloned().collect();
            let mut next = BTreeMap::new();
            for (node, token, age) in &renewed {
                next.insert(
                    node.clone(),
                    HeldLease {
                        token: *token,
                        valid_until,
                        last_reconciled: held
                            .get(node)
                            .and_then(|l| l.last_reconciled)
                            .max(ago(*age)),
                    },
                );
            }
            for (node, token, age, _) in &acquired {
                next.insert(
                    node.clone(),
                    HeldLease {
                        token: *token,
                        valid_until,
                        last_reconciled: ago(*age),
                    },
                );
            }
            lost = before
                .iter()
                .filter(|n| !next.contains_key(*n) && !released.contains(n))
                .count();
            *held = next;
            held_now = held.len();
        }
        let m = &self.inner.metrics;
        m.held.set(held_now as i64);
        m.live_instances.set(live);
        m.acquisitions.inc_by(acquired.len() as u64);
        m.takeovers.inc_by(takeovers as u64);
        m.losses.inc_by(lost as u64);
        m.releases.inc_by(released.len() as u64);
        for (node, is_held, unheld, age) in view {
            m.unheld
                .with_label_values(&[node.as_str()])
                .set(if is_held { 0.0 } else { unheld });
            m.reconciled_age
                .with_label_values(&[node.as_str()])
                .set(age.max(0.0));
        }
        if lost > 0 {
            tracing::warn!(lost, "reconcile leases lost (not renewed in time)");
        }
        if !acquired.is_empty() {
            self.inner.acquired.notify_waiters();
        }
        Ok(LeaseTick {
            live_instances: live,
            target,
            held: held_now,
            acquired: acquired.len(),
            takeovers,
            released: released.len(),
            lost,
        })
    }

    /// Records locally that `node`'s run ended ok now (the database was updated by the
    /// fenced audit write).
    pub(crate) fn reconciled(&self, node: &str) {
        if let Some(l) = self.lock().get_mut(node) {
            l.last_reconciled = Some(Instant::now());
        }
    }

    /// Releases every lease of this instance and removes its heartbeat row.
    ///
    /// # Errors
    /// A database error.
    pub async fn release_all(&self) -> Result<u64, DbError> {
        let me = self.inner.instance_id.as_str();
        let held: Vec<String> = std::mem::take(&mut *self.lock()).into_keys().collect();
        self.inner.metrics.held.set(0);
        let mut conn = self.inner.pool.acquire("reconcile_lease").await?;
        let r = sqlx::query(
            "UPDATE node_leases SET holder = NULL, expires_at = now() WHERE holder = $1",
        )
        .bind(me)
        .execute(&mut *conn)
        .await;
        let n = conn.check(r)?.rows_affected();
        let r = sqlx::query("DELETE FROM worker_instances WHERE instance_id = $1")
            .bind(me)
            .execute(&mut *conn)
            .await;
        conn.check(r)?;
        self.inner.metrics.releases.inc_by(n);
        if n < held.len() as u64 {
            tracing::info!(
                held = held.len(),
                released = n,
                "some leases had already been taken over"
            );
        }
        Ok(n)
    }
}

/// What a fenced pass carries: the lease client and the token the pass started with.
#[derive(Debug, Clone)]
pub(crate) struct Fence {
    pub(crate) leases: Leases,
    pub(crate) token: i64,
}

impl Fence {
    pub(crate) fn holds(&self, node: &str) -> bool {
        self.leases.holds(node, self.token)
    }

    pub(crate) fn instance_id(&self) -> &str {
        self.leases.instance_id()
    }
}
