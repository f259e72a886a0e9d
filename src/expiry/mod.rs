//! The expiry and reminder worker (leader only).
//!
//! Each pass:
//! 1. marks active subscriptions past their expiry `expired` and, in the same transaction,
//!    queues a removal of each one's user in the outbox (idempotent: the outbox re-checks
//!    liveness before removing, and removing an absent user succeeds);
//! 2. claims reminders due (3 days and 1 day before expiry) by setting `reminded_3d` /
//!    `reminded_1d` in a committed transaction *before* sending, so each is sent at most once
//!    even across restarts and leader changes; then sends them with no connection held.
//!
//! Without a Bot API client (no token) the worker still expires subscriptions and sends nothing.

use std::time::Instant;

use chrono::{DateTime, Utc};
use prometheus::{HistogramVec, IntCounterVec, Registry};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bot::i18n::{self, Lang};
use crate::bot::{BotApi, BotSettings};
use crate::config::secs;
use crate::db::{DbError, DbPool};
use crate::diagnostics::run_every;
use crate::metrics::{self, DURATION_BUCKETS_SECONDS};
use crate::node::owned_email;
use crate::outbox::{enqueue, NodeOp};

/// Metric families of the expiry worker.
#[derive(Debug, Clone)]
pub struct ExpiryMetrics {
    expired: IntCounterVec,
    reminders: IntCounterVec,
    pass: HistogramVec,
}

impl ExpiryMetrics {
    /// Registers the families.
    pub fn register(registry: &Registry) -> Self {
        Self {
            expired: metrics::counter_vec(
                registry,
                "vpnbot_expiry_subscriptions_expired_total",
                "Subscriptions marked expired (their node removal queued in the outbox), by node.",
                &["node"],
            ),
            reminders: metrics::counter_vec(
                registry,
                "vpnbot_expiry_reminders_total",
                "Expiry reminders and notices by window (3d, 1d, expired) and outcome (sent, failed, skipped: no bot).",
                &["window", "outcome"],
            ),
            pass: metrics::histogram_vec(
                registry,
                "vpnbot_expiry_pass_duration_seconds",
                "Duration of one expiry pass, by outcome (ok, failed).",
                &["outcome"],
                DURATION_BUCKETS_SECONDS,
            ),
        }
    }
}

/// Counts of one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExpiryPass {
    /// Subscriptions marked expired.
    pub expired: usize,
    /// 3-day reminders claimed.
    pub reminded_3d: usize,
    /// 1-day reminders claimed.
    pub reminded_1d: usize,
    /// Messages that reached the Bot API.
    pub sent: usize,
    /// Messages that failed (not retried: at most once).
    pub failed: usize,
}

#[derive(Debug, sqlx::FromRow)]
struct Expired {
    owner_id: i64,
    node: String,
    vless_uuid: Uuid,
    language_code: Option<String>,
}

#[derive(Debug, sqlx::FromRow)]
struct Due {
    owner_id: i64,
    expires_at: DateTime<Utc>,
    language_code: Option<String>,
}

/// The worker (cheap clone).
#[derive(Debug, Clone)]
pub struct ExpiryWorker {
    pool: DbPool,
    api: Option<BotApi>,
    settings: BotSettings,
    metrics: ExpiryMetrics,
    diagnostics: Option<crate::diagnostics::Diagnostics>,
}

impl ExpiryWorker {
    /// A worker over `pool`, sending through `api` when given.
    pub fn new(
        pool: DbPool,
        api: Option<BotApi>,
        settings: BotSettings,
        metrics: ExpiryMetrics,
    ) -> Self {
        Self {
            pool,
            api,
            settings,
            metrics,
            diagnostics: None,
        }
    }

    /// Reports every completed pass to the watchdog's `worker_overdue` check.
    pub fn with_diagnostics(mut self, diagnostics: crate::diagnostics::Diagnostics) -> Self {
        self.diagnostics = Some(diagnostics);
        self
    }

    /// One pass: expire, claim reminders, send. See the module docs.
    ///
    /// # Errors
    /// A database error; send failures are counted, not returned.
    pub async fn run_once(&self) -> Result<ExpiryPass, DbError> {
        let started = Instant::now();
        let res = self.pass().await;
        self.metrics
            .pass
            .with_label_values(&[if res.is_ok() { "ok" } else { "failed" }])
            .observe(started.elapsed().as_secs_f64());
        res
    }

    async fn pass(&self) -> Result<ExpiryPass, DbError> {
        let batch = self.settings.expiry_batch as i64;
        let mut pass = ExpiryPass::default();

        // 1. Expire, queueing removals in the same transaction.
        let expired: Vec<Expired> = {
            let mut c = self.pool.acquire("expiry_expire").await?;
            let mut tx = c.begin().await?;
            let r = sqlx::query_as(
                "WITH due AS (SELECT id FROM subscriptions WHERE status = 'active' \
                   AND expires_at <= now() ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 UPDATE subscriptions s SET status = 'expired', updated_at = now() FROM due \
                 WHERE s.id = due.id RETURNING s.owner_id, s.node, s.vless_uuid, \
                   (SELECT language_code FROM bot_users u WHERE u.telegram_id = s.owner_id) \
                   AS language_code",
            )
            .bind(batch)
            .fetch_all(&mut *tx)
            .await;
            let rows: Vec<Expired> = tx.check(r)?;
            for e in &rows {
                let r = enqueue(
                    &mut tx,
                    &e.node,
                    NodeOp::Remove,
                    e.vless_uuid,
                    &owned_email(e.vless_uuid),
                )
                .await;
                tx.check(r)?;
            }
            tx.commit().await?;
            rows
        };
        pass.expired = expired.len();
        for e in &expired {
            self.metrics
                .expired
                .with_label_values(&[e.node.as_str()])
                .inc();
        }

        // 2. Claim reminders (committed before any send: at most once).
        let claim = |col: &'static str, window: &'static str| {
            let pool = self.pool.clone();
            async move {
                let mut c = pool.acquire("expiry_remind").await?;
                // The 1-day claim also marks the 3-day one, so a late pass never sends both.
                let set = if col == "reminded_1d" {
                    "reminded_1d = TRUE, reminded_3d = TRUE"
                } else {
                    "reminded_3d = TRUE"
                };
                let sql = format!(
                    "WITH due AS (SELECT id FROM subscriptions WHERE status = 'active' \
                       AND NOT {col} AND expires_at > now() \
                       AND expires_at <= now() + interval '{window}' \
                       ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
                     UPDATE subscriptions s SET {set}, updated_at = now() FROM due \
                     WHERE s.id = due.id RETURNING s.owner_id, s.expires_at, \
                       (SELECT language_code FROM bot_users u WHERE u.telegram_id = s.owner_id) \
                       AS language_code"
                );
                let r = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(batch)
                    .fetch_all(&mut *c)
                    .await;
                c.check(r)
            }
        };
        // 1 day first: a subscription inside both windows gets only the nearer reminder.
        let due_1d: Vec<Due> = claim("reminded_1d", "1 day").await?;
        let due_3d: Vec<Due> = claim("reminded_3d", "3 days").await?;
        pass.reminded_1d = due_1d.len();
        pass.reminded_3d = due_3d.len();

        // 3. Send, with no connection held.
        for d in &due_1d {
            let lang = Lang::from_code(d.language_code.as_deref());
            self.notify(
                d.owner_id,
                &i18n::reminder(lang, 1, d.expires_at),
                "1d",
                &mut pass,
            )
            .await;
        }
        for d in &due_3d {
            let lang = Lang::from_code(d.language_code.as_deref());
            self.notify(
                d.owner_id,
                &i18n::reminder(lang, 3, d.expires_at),
                "3d",
                &mut pass,
            )
            .await;
        }
        for e in &expired {
            let lang = Lang::from_code(e.language_code.as_deref());
            self.notify(e.owner_id, i18n::expired_notice(lang), "expired", &mut pass)
                .await;
        }
        Ok(pass)
    }

    async fn notify(&self, chat: i64, text: &str, window: &'static str, pass: &mut ExpiryPass) {
        let Some(api) = &self.api else {
            self.metrics
                .reminders
                .with_label_values(&[window, "skipped"])
                .inc();
            return;
        };
        match api.send_text(chat, text, None).await {
            Ok(_) => {
                pass.sent += 1;
                self.metrics
                    .reminders
                    .with_label_values(&[window, "sent"])
                    .inc();
            }
            Err(e) => {
                pass.failed += 1;
                self.metrics
                    .reminders
                    .with_label_values(&[window, "failed"])
                    .inc();
                tracing::warn!(window, error = %e, "expiry notice not delivered");
            }
        }
    }

    /// Runs a pass every `bot.expiry_interval_seconds` until `cancel` (leader only).
    pub async fn run(self, cancel: CancellationToken) {
        let interval = secs(self.settings.expiry_interval_seconds);
        run_every(
            "expiry",
            interval,
            self.diagnostics.as_ref(),
            &cancel,
            || self.run_logged(),
        )
        .await;
    }

    async fn run_logged(&self) {
        match self.run_once().await {
            Ok(p) if p.expired + p.reminded_1d + p.reminded_3d > 0 => {
                tracing::info!(?p, "expiry pass")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiry pass failed"),
        }
    }
}
