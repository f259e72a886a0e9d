//! The outbox of node operations (`pending_node_ops`): a state change that needs a node to
//! add, update or remove a user writes its intent here (in the same transaction when there is
//! one); the outbox worker applies due intents outside any transaction, without a pooled
//! connection held across the HTTP call, and retries failures with capped exponential backoff
//! until the node confirms. At most one open intent exists per node and UUID: a newer intent
//! replaces an older one.
//!
//! A removal is re-checked against the database just before it is applied: a UUID whose
//! subscription is live again (renewed, re-bought) is never removed.
//!
//! **Several instances.** Every instance runs the outbox. A pass claims its due intents with
//! `FOR UPDATE SKIP LOCKED` and a lease (`claimed_by` = the instance id, `claimed_until` = now +
//! `outbox.claim_seconds`), so instances never claim the same intent at once; an intent whose
//! claim expired (its instance died) is taken over by the next pass of any instance. A claimed
//! intent is started only while at least one node call's total deadline
//! (`node_client.total_deadline_seconds`) remains of the claim, and every call is cut off at
//! the claim's end, so no intent is applied twice at once; the rest are released unapplied for
//! the next pass. Outcomes are recorded only under this instance's claim, which they release.
//! An intent replaced while claimed (a newer state change) keeps the claim until it is
//! released, so the newer operation is never applied alongside the older one.

use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use prometheus::{IntCounterVec, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::seconds;
use crate::db::{DbConn, DbError, DbPool};
use crate::diagnostics::run_every;
use crate::fleet::Fleet;
use crate::metrics;
use crate::node::{NodeError, NodeUser};

/// Default interval between outbox passes, seconds.
pub const DEFAULT_INTERVAL_SECONDS: f64 = 1.0;
/// Default most intents applied per pass.
pub const DEFAULT_BATCH: u32 = 200;
/// Default node calls in flight at once per pass.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Default first retry delay, seconds.
pub const DEFAULT_BACKOFF_BASE_SECONDS: f64 = 1.0;
/// Default retry delay cap, seconds.
pub const DEFAULT_BACKOFF_MAX_SECONDS: f64 = 300.0;
/// Default claim lease of a pass's intents, seconds: how long other instances leave them
/// alone. Must exceed `node_client.total_deadline_seconds` (10 s by default).
pub const DEFAULT_CLAIM_SECONDS: f64 = 60.0;
/// The node call bound assumed when none is given ([`Outbox::with_call_bound`]): the node
/// client's default total deadline.
const DEFAULT_CALL_BOUND: Duration = crate::node::DEFAULT_TOTAL_DEADLINE_SECONDS;

/// `[outbox]`: the node-operation outbox worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxSettings {
    /// Interval between passes, written in seconds (default [`DEFAULT_INTERVAL_SECONDS`]).
    #[serde(with = "seconds")]
    pub interval_seconds: Duration,
    /// Most intents applied per pass (default [`DEFAULT_BATCH`]).
    pub batch: u32,
    /// Node calls in flight at once (default [`DEFAULT_CONCURRENCY`]).
    pub concurrency: usize,
    /// First retry delay, written in seconds, doubled per failed attempt (default
    /// [`DEFAULT_BACKOFF_BASE_SECONDS`]).
    #[serde(with = "seconds")]
    pub backoff_base_seconds: Duration,
    /// Retry delay cap, written in seconds (default [`DEFAULT_BACKOFF_MAX_SECONDS`]).
    #[serde(with = "seconds")]
    pub backoff_max_seconds: Duration,
    /// How long a pass's claim on its intents lasts, written in seconds (default
    /// [`DEFAULT_CLAIM_SECONDS`]); must exceed `node_client.total_deadline_seconds`. An
    /// instance that dies leaves its claimed intents to the others after this long.
    #[serde(with = "seconds")]
    pub claim_seconds: Duration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            interval_seconds: Duration::from_secs_f64(DEFAULT_INTERVAL_SECONDS),
            batch: DEFAULT_BATCH,
            concurrency: DEFAULT_CONCURRENCY,
            backoff_base_seconds: Duration::from_secs_f64(DEFAULT_BACKOFF_BASE_SECONDS),
            backoff_max_seconds: Duration::from_secs_f64(DEFAULT_BACKOFF_MAX_SECONDS),
            claim_seconds: Duration::from_secs_f64(DEFAULT_CLAIM_SECONDS),
        }
    }
}

impl OutboxSettings {
    /// Every problem, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        // Negative, NaN and out-of-range values are refused while parsing (config::seconds).
        for (k, v) in [
            ("interval_seconds", self.interval_seconds),
            ("backoff_base_seconds", self.backoff_base_seconds),
            ("backoff_max_seconds", self.backoff_max_seconds),
            ("claim_seconds", self.claim_seconds),
        ] {
            if v.is_zero() {
                e.push(format!(
                    "outbox.{k} must be a positive number of seconds, got 0"
                ));
            }
        }
        if self.batch == 0 {
            e.push("outbox.batch must be at least 1".into());
        }
        if self.concurrency == 0 {
            e.push("outbox.concurrency must be at least 1".into());
        }
        e
    }

    /// Delay before attempt `attempts + 1`: base·2^attempts capped, with ±20 % jitter.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let exp = self
            .backoff_base_seconds
            .saturating_mul(1u32 << attempts.clamp(0, 30));
        exp.min(self.backoff_max_seconds)
            .mul_f64(rand::random_range(0.8..=1.2))
    }
}

/// What an intent asks the node to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeOp {
    /// `add-user`.
    Add,
    /// `remove-user`.
    Remove,
    /// `update-user`.
    Update,
}

impl NodeOp {
    /// Every operation.
    pub const ALL: &'static [NodeOp] = &[NodeOp::Add, NodeOp::Remove, NodeOp::Update];

    /// The value stored in `pending_node_ops.op` and used as the `op` label.
    pub const fn as_str(self) -> &'static str {
        match self {
            NodeOp::Add => "add",
            NodeOp::Remove => "remove",
            NodeOp::Update => "update",
        }
    }

    fn parse(s: &str) -> Option<NodeOp> {
        NodeOp::ALL.iter().copied().find(|op| op.as_str() == s)
    }
}

// `pending_node_ops.op` is a TEXT column constrained to these values (migrations/0001): the
// enum is encoded and decoded as its `as_str()` text, so no migration is needed.
impl sqlx::Type<sqlx::Postgres> for NodeOp {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::Type<sqlx::Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for NodeOp {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
    }
}

impl sqlx::Decode<'_, sqlx::Postgres> for NodeOp {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
        let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        NodeOp::parse(s).ok_or_else(|| format!("unknown node operation {s:?}").into())
    }
}

/// Records the intent `op` for `uuid` on `node`, replacing any open intent for the same pair;
/// due at once. Run it inside the transaction of the state change it belongs to.
///
/// # Errors
/// The database error.
pub async fn enqueue(
    conn: &mut PgConnection,
    node: &str,
    op: NodeOp,
    uuid: Uuid,
    email: &str,
) -> Result<(), sqlx::Error> {
    enqueue_after(conn, node, op, uuid, email, Duration::ZERO).await
}

/// [`enqueue`], due only after `delay`: for a caller that tries the operation itself first
/// (the bot issuing a key) and calls [`complete`] when the node confirms. Should the caller
/// fail or be cancelled, the outbox applies the intent after the delay.
///
/// # Errors
/// The database error.
pub async fn enqueue_after(
    conn: &mut PgConnection,
    node: &str,
    op: NodeOp,
    uuid: Uuid,
    email: &str,
    delay: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO pending_node_ops (node, op, vless_uuid, email, next_attempt_at) \
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) \
         ON CONFLICT (node, vless_uuid) WHERE done_at IS NULL DO UPDATE \
         SET op = EXCLUDED.op, email = EXCLUDED.email, attempts = 0, \
             next_attempt_at = EXCLUDED.next_attempt_at, last_error = NULL, \
             last_error_type = NULL",
    )
    .bind(node)
    .bind(op)
    .bind(uuid)
    .bind(email)
    .bind(delay.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks the open intent `op` for `uuid` on `node` done (the caller applied it and the node
/// confirmed). Returns false when no such open intent exists (already applied by the outbox,
/// or replaced by a newer intent, which then stays open).
///
/// # Errors
/// The database error.
pub async fn complete(
    conn: &mut PgConnection,
    node: &str,
    op: NodeOp,
    uuid: Uuid,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE pending_node_ops SET done_at = now(), attempts = attempts + 1 \
         WHERE node = $1 AND vless_uuid = $2 AND op = $3 AND done_at IS NULL",
    )
    .bind(node)
    .bind(uuid)
    .bind(op)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// Metric families of the outbox.
#[derive(Debug, Clone)]
pub struct OutboxMetrics {
    ops: IntCounterVec,
    failures: IntCounterVec,
    pending: IntGauge,
    oldest_age: prometheus::Gauge,
    pending_age: prometheus::GaugeVec,
    claimed: prometheus::IntCounter,
    claim_takeovers: prometheus::IntCounter,
    released: prometheus::IntCounter,
}

impl OutboxMetrics {
    /// Registers the outbox families.
    pub fn register(registry: &Registry) -> Self {
        Self {
            ops: metrics::counter_vec(
                registry,
                "vpnbot_outbox_ops_total",
                "Node operations the outbox attempted, by node, op (add, remove, update) and outcome (applied, skipped_live, failed).",
                &["node", "op", "outcome"],
            ),
            failures: metrics::counter_vec(
                registry,
                "vpnbot_outbox_failures_total",
                "Failed outbox attempts by node, op and error: the node client's error type (connect, headers_timeout, http_5xx, auth_rejected, circuit_open, ...), a 4xx refined by what the node API contract says it means for the op (uuid_conflict: add-user answered 409, the UUID exists under another email; not_found: update-user answered 404; bad_request: 400; else http_4xx) or node_not_configured.",
                &["node", "op", "error"],
            ),
            pending: metrics::int_gauge(
                registry,
                "vpnbot_outbox_pending_ops",
                "Node operations waiting in the outbox (not yet confirmed by their node).",
            ),
            oldest_age: metrics::gauge(
                registry,
                "vpnbot_outbox_oldest_pending_age_seconds",
                "Age of the oldest unconfirmed node operation, 0 when none.",
            ),
            pending_age: metrics::gauge_vec(
                registry,
                "vpnbot_outbox_pending_age_seconds",
                "Age of the oldest unconfirmed node operation by node, op and the error type of its last attempt (`none`: not attempted yet); series only while such operations wait.",
                &["node", "op", "error"],
            ),
            claimed: metrics::counter(
                registry,
                "vpnbot_outbox_claimed_total",
                "Intents this instance claimed (FOR UPDATE SKIP LOCKED, with a claim lease) to apply.",
            ),
            claim_takeovers: metrics::counter(
                registry,
                "vpnbot_outbox_claim_takeovers_total",
                "Intents this instance claimed whose previous claim had expired unreleased (its instance died or stalled).",
            ),
            released: metrics::counter(
                registry,
                "vpnbot_outbox_claims_released_unapplied_total",
                "Claimed intents this instance released without attempting them: too little of the claim was left for a node call.",
            ),
        }
    }
}

/// Counts of one outbox pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutboxPass {
    /// Intents that were due.
    pub due: usize,
    /// Confirmed by the node.
    pub applied: usize,
    /// Removals skipped because the subscription is live again.
    pub skipped_live: usize,
    /// Failed; rescheduled with backoff.
    pub failed: usize,
    /// Claimed but released unattempted (too little of the claim left).
    pub released: usize,
}

/// A failed attempt: its bounded error label and a secret-free text.
type Failure = (&'static str, String);

/// What became of one claimed intent: `None` when it was released unstarted (too little of the
/// claim left), else the attempt's result.
type Attempt = Option<Result<(), Failure>>;

#[derive(Debug, sqlx::FromRow)]
struct Intent {
    id: i64,
    node: String,
    op: NodeOp,
    vless_uuid: Uuid,
    email: String,
    attempts: i32,
    takeover: bool,
}

/// The outbox worker's state.
#[derive(Debug, Clone)]
pub struct Outbox {
    pool: DbPool,
    fleet: Fleet,
    metrics: OutboxMetrics,
    settings: OutboxSettings,
    diagnostics: Option<crate::diagnostics::Diagnostics>,
    instance_id: std::sync::Arc<str>,
    call_bound: Duration,
}

impl Outbox {
    /// Claims intents as `instance_id` (default: a new id per worker,
    /// [`crate::reconcile::lease::new_instance_id`]).
    pub fn with_instance_id(mut self, instance_id: &str) -> Self {
        self.instance_id = instance_id.into();
        self
    }

    /// The longest a node call can take (`node_client.total_deadline_seconds`; default 10 s):
    /// an intent is started only while this much of its claim remains.
    pub fn with_call_bound(mut self, bound: Duration) -> Self {
        self.call_bound = bound;
        self
    }

    /// Reports every completed pass to the watchdog's `worker_overdue` check.
    pub fn with_diagnostics(mut self, diagnostics: crate::diagnostics::Diagnostics) -> Self {
        self.diagnostics = Some(diagnostics);
        self
    }

    /// A worker over `pool` and `fleet`.
    pub fn new(
        pool: DbPool,
        fleet: Fleet,
        metrics: OutboxMetrics,
        settings: OutboxSettings,
    ) -> Self {
        Self {
            pool,
            fleet,
            metrics,
            settings,
            diagnostics: None,
            instance_id: crate::reconcile::lease::new_instance_id().into(),
            call_bound: DEFAULT_CALL_BOUND,
        }
    }

    /// One pass: read due intents, drop removals whose subscription is live again, apply the
    /// rest with bounded concurrency (no connection held during HTTP), record the outcomes.
    ///
    /// # Errors
    /// A database error; node errors are recorded per intent, not returned.
    pub async fn process_once(&self) -> Result<OutboxPass, DbError> {
        let me: &str = &self.instance_id;
        let claim = self.settings.claim_seconds;
        // Measured before the claim statement: the local end of the claim is never later
        // than the database's.
        let claim_end = tokio::time::Instant::now() + claim;
        let due: Vec<Intent> = {
            let mut conn = self.pool.acquire("outbox_claim").await?;
            let res = sqlx::query_as(
                "WITH c AS (SELECT id, claimed_until FROM pending_node_ops \
                   WHERE done_at IS NULL AND next_attempt_at <= now() \
                     AND (claimed_until IS NULL OR claimed_until <= now()) \
                   ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 UPDATE pending_node_ops p SET claimed_by = $2, \
                   claimed_until = now() + make_interval(secs => $3) \
                 FROM c WHERE p.id = c.id \
                 RETURNING p.id, p.node, p.op, p.vless_uuid, p.email, p.attempts, \
                   c.claimed_until IS NOT NULL AS takeover",
            )
            .bind(self.settings.batch as i64)
            .bind(me)
            .bind(claim.as_secs_f64())
            .fetch_all(&mut *conn)
            .await;
            conn.check(res)?
        };
        self.metrics.claimed.inc_by(due.len() as u64);
        self.metrics
            .claim_takeovers
            .inc_by(due.iter().filter(|i| i.takeover).count() as u64);
        let mut pass = OutboxPass {
            due: due.len(),
            ..Default::default()
        };
        if due.is_empty() {
            self.refresh_gauges().await?;
            return Ok(pass);
        }

        // Batched live re-check of removals, just before acting.
        let removal_uuids: Vec<Uuid> = due
            .iter()
            .filter(|i| i.op == NodeOp::Remove)
            .map(|i| i.vless_uuid)
            .collect();
        let live: std::collections::HashSet<Uuid> = if removal_uuids.is_empty() {
            Default::default()
        } else {
            let mut conn = self.pool.acquire("outbox_live_check").await?;
            let res = sqlx::query_scalar(
                "SELECT vless_uuid FROM subscriptions WHERE vless_uuid = ANY($1) \
                 AND status = 'active' AND expires_at > now()",
            )
            .bind(&removal_uuids)
            .fetch_all(&mut *conn)
            .await;
            conn.check(res)?.into_iter().collect()
        };

        let outcomes: Vec<(Intent, Attempt, bool)> = stream::iter(due)
            .map(|intent| async {
                if intent.op == NodeOp::Remove && live.contains(&intent.vless_uuid) {
                    return (intent, Some(Ok(())), true);
                }
                // Too little of the claim left for a whole node call: leave it for the next
                // pass rather than risk the claim expiring while the call runs.
                if tokio::time::Instant::now() + self.call_bound >= claim_end {
                    return (intent, None, false);
                }
                let res = match tokio::time::timeout_at(claim_end, self.apply(&intent)).await {
                    Ok(r) => r,
                    Err(_) => Err((
                        "claim_expired",
                        "the outbox claim ran out during the node call".to_owned(),
                    )),
                };
                (intent, Some(res), false)
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;

        let mut conn = self.pool.acquire("outbox_record").await?;
        for (intent, res, skipped) in outcomes {
            let Some(res) = res else {
                release_claim(&mut conn, intent.id, me).await?;
                self.metrics.released.inc();
                pass.released += 1;
                continue;
            };
            let outcome = match (&res, skipped) {
                (_, true) => "skipped_live",
                (Ok(()), false) => "applied",
                (Err(_), _) => "failed",
            };
            self.metrics
                .ops
                .with_label_values(&[intent.node.as_str(), intent.op.as_str(), outcome])
                .inc();
            if let Err((error, reason)) = &res {
                self.metrics
                    .failures
                    .with_label_values(&[intent.node.as_str(), intent.op.as_str(), error])
                    .inc();
                tracing::warn!(
                    node = %intent.node,
                    op = intent.op.as_str(),
                    error = *error,
                    attempts = intent.attempts + 1,
                    reason = %reason,
                    "outbox: node operation failed; retrying with backoff"
                );
            }
            let q = match res {
                Ok(()) => sqlx::query(
                    "UPDATE pending_node_ops SET done_at = now(), attempts = attempts + 1, \
                     last_error = $3, claimed_by = NULL, claimed_until = NULL \
                     WHERE id = $1 AND op = $2 AND done_at IS NULL AND claimed_by = $4",
                )
                .bind(intent.id)
                .bind(intent.op)
                .bind(skipped.then_some("skipped: subscription is live"))
                .bind(me),
                Err((error, reason)) => {
                    let delay = self.settings.backoff(intent.attempts);
                    sqlx::query(
                        "UPDATE pending_node_ops SET attempts = attempts + 1, last_error = $3, \
                         next_attempt_at = now() + make_interval(secs => $4), \
                         last_error_type = $5, claimed_by = NULL, claimed_until = NULL \
                         WHERE id = $1 AND op = $2 AND done_at IS NULL AND claimed_by = $6",
                    )
                    .bind(intent.id)
                    .bind(intent.op)
                    .bind(reason)
                    .bind(delay.as_secs_f64())
                    .bind(error)
                    .bind(me)
                }
            };
            let r = q.execute(&mut *conn).await;
            if conn.check(r)?.rows_affected() == 0 {
                // Replaced by a newer intent while claimed: release the claim so the newer
                // operation is applied by the next pass.
                release_claim(&mut conn, intent.id, me).await?;
            }
            match outcome {
                "applied" => pass.applied += 1,
                "skipped_live" => pass.skipped_live += 1,
                _ => pass.failed += 1,
            }
        }
        drop(conn);
        self.refresh_gauges().await?;
        Ok(pass)
    }

    /// Applies one intent; on failure the bounded error label and a secret-free text.
    async fn apply(&self, intent: &Intent) -> Result<(), Failure> {
        let Some(client) = self.fleet.get(&intent.node) else {
            return Err((
                "node_not_configured",
                format!("node {:?} is not configured", intent.node),
            ));
        };
        let user = NodeUser {
            uuid: intent.vless_uuid,
            email: intent.email.clone(),
        };
        let op = intent.op;
        let res = match op {
            NodeOp::Add => client.add_user(&user).await,
            NodeOp::Update => client.update_user(&user).await,
            NodeOp::Remove => client.remove_user(user.uuid).await,
        };
        // The node error's Display holds no secret (the client guarantees it).
        res.map(|_| ()).map_err(|e| {
            let label = error_label(op, &e);
            let meaning = match label {
                "uuid_conflict" => " (the node has this UUID under another email)",
                "not_found" => " (the node does not have this user)",
                _ => "",
            };
            (label, format!("{label}: {e}{meaning}"))
        })
    }

    async fn refresh_gauges(&self) -> Result<(), DbError> {
        let mut conn = self.pool.acquire("outbox_gauges").await?;
        let res: Result<(i64, Option<f64>), _> = sqlx::query_as(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
             FROM pending_node_ops WHERE done_at IS NULL",
        )
        .fetch_one(&mut *conn)
        .await;
        let (n, age) = conn.check(res)?;
        self.metrics.pending.set(n);
        self.metrics.oldest_age.set(age.unwrap_or(0.0));
        let res: Result<Vec<(String, NodeOp, String, f64)>, _> = sqlx::query_as(
            "SELECT node, op, coalesce(last_error_type, 'none'), \
             EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
             FROM pending_node_ops WHERE done_at IS NULL GROUP BY 1, 2, 3",
        )
        .fetch_all(&mut *conn)
        .await;
        let groups = conn.check(res)?;
        // Series only while such operations wait; labels are bounded (configured node names,
        // three ops, the fixed error labels; anything else stored is shown as `other`).
        self.metrics.pending_age.reset();
        for (node, op, error, age) in groups {
            self.metrics
                .pending_age
                .with_label_values(&[node.as_str(), op.as_str(), stored_error_label(&error)])
                .set(age);
        }
        Ok(())
    }

    /// Runs a pass every `interval_seconds` until `cancel` (on every instance: intents are
    /// claimed, see the module docs).
    pub async fn run(self, cancel: CancellationToken) {
        let interval = self.settings.interval_seconds;
        run_every(
            "outbox",
            interval,
            self.diagnostics.as_ref(),
            &cancel,
            || self.process_logged(),
        )
        .await;
    }

    async fn process_logged(&self) {
        match self.process_once().await {
            Ok(p) if p.due > 0 => tracing::info!(?p, "outbox pass"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "outbox pass failed"),
        }
    }
}

/// The outbox's error label of a failed node call: the client's error type, with a 4xx
/// refined by what the node API contract says that status means for `op`
/// (`openapi/node-api.json`).
pub fn error_label(op: NodeOp, e: &NodeError) -> &'static str {
    match (op, e) {
        (NodeOp::Add, NodeError::Status { status: 409 }) => "uuid_conflict",
        (NodeOp::Update, NodeError::Status { status: 404 }) => "not_found",
        (_, NodeError::Status { status: 400 }) => "bad_request",
        _ => e.error_type(),
    }
}

/// Every label the outbox stores in `last_error_type`: its own, then the node client's error
/// types ([`NodeError::error_type`]); a stored value outside this list is shown as `other`.
const ERROR_LABELS: [&str; 22] = [
    "uuid_conflict",
    "not_found",
    "bad_request",
    "node_not_configured",
    "unknown_op",
    "claim_expired",
    "none",
    "connect",
    "headers_timeout",
    "body_timeout",
    "deadline_exceeded",
    "body_too_large",
    "body_incomplete",
    "connection_lost",
    "stale_connection",
    "http_5xx",
    "http_4xx",
    "rate_limited",
    "auth_rejected",
    "decode",
    "circuit_open",
    "config",
];

/// `last_error_type` as a bounded label: a known label, else `other`.
fn stored_error_label(s: &str) -> &'static str {
    ERROR_LABELS
        .iter()
        .find(|l| **l == s)
        .copied()
        .unwrap_or("other")
}

/// Gives up this instance's claim on intent `id` (a no-op when the claim is no longer ours), so
/// the next pass of any instance takes it.
///
/// # Errors
/// [`DbError`] from the statement.
async fn release_claim(conn: &mut DbConn, id: i64, me: &str) -> Result<(), DbError> {
    let r = sqlx::query(
        "UPDATE pending_node_ops SET claimed_by = NULL, claimed_until = NULL \
         WHERE id = $1 AND claimed_by = $2",
    )
    .bind(id)
    .bind(me)
    .execute(&mut **conn)
    .await;
    conn.check(r)?;
    Ok(())
}
