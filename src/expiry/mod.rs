//! The expiry and reminder worker (every instance runs it).
//!
//! **Several instances.** Each batch is claimed with `FOR UPDATE SKIP LOCKED`: the expiry batch
//! inside the transaction that marks it expired and queues its removals (the row locks are the
//! claim's lease: they end with the transaction, committed or rolled back, so a dead
//! instance's batch is simply due again), the reminder batches by committing their
//! `reminded_*` flag before any send. Two instances therefore never take the same
//! subscription, and a reminder is sent at most once whichever instance claimed it. Claimed
//! rows are counted in `vpnbot_expiry_claimed_total{kind}`.
//!
//! Each pass:
//! 1. marks active subscriptions past their expiry `expired` and, in the same transaction,
//!    queues a removal of each one's user in the outbox (idempotent: the outbox re-checks
//!    liveness before removing, and removing an absent user succeeds);
//! 2. claims reminders due (3 days and 1 day before expiry) by setting `reminded_3d` /
//!    `reminded_1d` in a committed transaction *before* sending, so each is sent at most once
//!    even across restarts and leader changes;
//! 3. hands the reminders and expiry notices to the notifier, which sends them with no
//!    connection held.
//!
//! Enforcement (1, 2) never waits on Telegram: in [`ExpiryWorker::run`] the notifier is a task
//! of its own with a bounded queue (`2 × bot.expiry_batch`; a pass claims no more reminders
//! than there is room for, and an expiry notice that finds the queue full is dropped and
//! counted) and bounded concurrency (`bot.notify_concurrency`). A send answered `429` waits
//! its `retry_after` in the notifier only; a user who blocked the bot (`403`) is remembered
//! (`bot_users.blocked_at`, cleared when they use the bot again) and not sent to again.
//!
//! Without a Bot API client (no token) the worker still expires subscriptions and sends nothing.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use prometheus::{HistogramVec, IntCounterVec, IntGauge, Registry};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::bot::i18n::{self, Lang};
use crate::bot::{BotApi, BotSettings};
use crate::db::{DbError, DbPool};
use crate::diagnostics::run_every;
use crate::metrics::{self, DURATION_BUCKETS_SECONDS};
use crate::node::owned_email;
use crate::outbox::{enqueue, NodeOp};
use std::time::Duration;

/// Metric families of the expiry worker.
#[derive(Debug, Clone)]
pub struct ExpiryMetrics {
    expired: IntCounterVec,
    reminders: IntCounterVec,
    pass: HistogramVec,
    queue: IntGauge,
    claimed: IntCounterVec,
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
                "Expiry reminders and notices by window (3d, 1d, expired) and outcome (sent; failed; blocked: the user blocked the bot, not sent; dropped: the notifier queue was full; skipped: no bot).",
                &["window", "outcome"],
            ),
            pass: metrics::histogram_vec(
                registry,
                "vpnbot_expiry_pass_duration_seconds",
                "Duration of one expiry pass, by outcome (ok, failed).",
                &["outcome"],
                DURATION_BUCKETS_SECONDS,
            ),
            queue: metrics::int_gauge(
                registry,
                "vpnbot_expiry_notify_queue_depth",
                "Expiry reminders and notices claimed and waiting to be sent.",
            ),
            claimed: metrics::counter_vec(
                registry,
                "vpnbot_expiry_claimed_total",
                "Subscriptions this instance claimed (FOR UPDATE SKIP LOCKED) by kind: expired (marked expired, removal queued), reminder_1d, reminder_3d.",
                &["kind"],
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
    /// Messages not sent because the user blocked the bot.
    pub blocked: usize,
}

#[derive(Debug, sqlx::FromRow)]
struct Expired {
    owner_id: i64,
    node: String,
    vless_uuid: Uuid,
    language_code: Option<String>,
    blocked: bool,
}

#[derive(Debug, sqlx::FromRow)]
struct Due {
    owner_id: i64,
    expires_at: DateTime<Utc>,
    language_code: Option<String>,
    blocked: bool,
}

/// One message for the notifier.
#[derive(Debug)]
struct Notice {
    chat: i64,
    text: String,
    window: &'static str,
    blocked: bool,
}

/// The worker (cheap clone).
#[derive(Debug, Clone)]
pub struct ExpiryWorker {
    pool: DbPool,
    api: Option<BotApi>,
    settings: BotSettings,
    metrics: ExpiryMetrics,
    diagnostics: Option<crate::diagnostics::Diagnostics>,
    notices: Option<mpsc::Sender<Notice>>,
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
            notices: None,
        }
    }

    /// Reports every completed pass to the watchdog's `worker_overdue` check.
    pub fn with_diagnostics(mut self, diagnostics: crate::diagnostics::Diagnostics) -> Self {
        self.diagnostics = Some(diagnostics);
        self
    }

    /// One pass: expire, claim reminders, then send them (with `bot.notify_concurrency` sends
    /// at once) and wait for the sends. The periodic [`Self::run`] does not wait: its notifier
    /// sends on its own. See the module docs.
    ///
    /// # Errors
    /// A database error; send failures are counted, not returned.
    pub async fn run_once(&self) -> Result<ExpiryPass, DbError> {
        let (mut pass, notices) = self.enforce_once(usize::MAX).await?;
        let outcomes: Vec<Outcome> = futures_util::stream::iter(notices)
            .map(|n| self.notify(n))
            .buffer_unordered(self.settings.notify_concurrency.max(1))
            .collect()
            .await;
        for o in outcomes {
            match o {
                Outcome::Delivered => pass.sent += 1,
                Outcome::Failed => pass.failed += 1,
                Outcome::Blocked => pass.blocked += 1,
                Outcome::Skipped => {}
            }
        }
        Ok(pass)
    }

    /// Expires and claims (at most `room` reminders), timed as one pass; sends nothing.
    async fn enforce_once(&self, room: usize) -> Result<(ExpiryPass, Vec<Notice>), DbError> {
        let started = Instant::now();
        let res = self.pass(room).await;
        self.metrics
            .pass
            .with_label_values(&[if res.is_ok() { "ok" } else { "failed" }])
            .observe(started.elapsed().as_secs_f64());
        res
    }

    async fn pass(&self, room: usize) -> Result<(ExpiryPass, Vec<Notice>), DbError> {
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
                   AS language_code, COALESCE((SELECT blocked_at IS NOT NULL FROM bot_users u \
                   WHERE u.telegram_id = s.owner_id), FALSE) AS blocked",
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
        let claim = |col: &'static str, window: &'static str, limit: i64| {
            let pool = self.pool.clone();
            async move {
                if limit == 0 {
                    return Ok(Vec::new());
                }
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
                       AS language_code, COALESCE((SELECT blocked_at IS NOT NULL FROM bot_users u \
                       WHERE u.telegram_id = s.owner_id), FALSE) AS blocked"
                );
                let r = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(limit)
                    .fetch_all(&mut *c)
                    .await;
                c.check(r)
            }
        };
        // 1 day first: a subscription inside both windows gets only the nearer reminder. No
        // more are claimed than the notifier has room for: the rest stay due for a later pass.
        let room = room.saturating_sub(expired.len());
        let limit = |room: usize| batch.min(i64::try_from(room).unwrap_or(i64::MAX));
        let due_1d: Vec<Due> = claim("reminded_1d", "1 day", limit(room)).await?;
        let room = room.saturating_sub(due_1d.len());
        let due_3d: Vec<Due> = claim("reminded_3d", "3 days", limit(room)).await?;
        pass.reminded_1d = due_1d.len();
        pass.reminded_3d = due_3d.len();
        for (kind, n) in [
            ("expired", expired.len()),
            ("reminder_1d", due_1d.len()),
            ("reminder_3d", due_3d.len()),
        ] {
            self.metrics
                .claimed
                .with_label_values(&[kind])
                .inc_by(n as u64);
        }

        // 3. The messages, for the notifier.
        let mut notices = Vec::with_capacity(expired.len() + due_1d.len() + due_3d.len());
        for (due, days, window) in [(&due_1d, 1, "1d"), (&due_3d, 3, "3d")] {
            for d in due {
                let lang = Lang::from_code(d.language_code.as_deref());
                notices.push(Notice {
                    chat: d.owner_id,
                    text: i18n::reminder(lang, days, d.expires_at),
                    window,
                    blocked: d.blocked,
                });
            }
        }
        for e in &expired {
            let lang = Lang::from_code(e.language_code.as_deref());
            notices.push(Notice {
                chat: e.owner_id,
                text: i18n::expired_notice(lang).to_string(),
                window: "expired",
                blocked: e.blocked,
            });
        }
        Ok((pass, notices))
    }

    /// Sends one notice (not to a user who blocked the bot), counting its outcome; a `403`
    /// marks the user blocked.
    async fn notify(&self, n: Notice) -> Outcome {
        let count = |outcome: &str| {
            self.metrics
                .reminders
                .with_label_values(&[n.window, outcome])
                .inc()
        };
        let Some(api) = &self.api else {
            count("skipped");
            return Outcome::Skipped;
        };
        if n.blocked {
            count("blocked");
            return Outcome::Blocked;
        }
        match api.send_text(n.chat, &n.text, None).await {
            Ok(_) => {
                count("sent");
                Outcome::Delivered
            }
            Err(e) if e.is_forbidden() => {
                count("blocked");
                tracing::info!(
                    window = n.window,
                    "the user blocked the bot; not sending to them again"
                );
                if let Err(e) = self.mark_blocked(n.chat).await {
                    tracing::warn!(error = %e, "could not remember a blocked user");
                }
                Outcome::Blocked
            }
            Err(e) => {
                count("failed");
                tracing::warn!(window = n.window, error = %e, "expiry notice not delivered");
                Outcome::Failed
            }
        }
    }

    async fn mark_blocked(&self, chat: i64) -> Result<(), DbError> {
        let mut c = self.pool.acquire("expiry_blocked").await?;
        let r = sqlx::query(
            "UPDATE bot_users SET blocked_at = now(), updated_at = now() \
             WHERE telegram_id = $1 AND blocked_at IS NULL",
        )
        .bind(chat)
        .execute(&mut *c)
        .await;
        c.check(r)?;
        Ok(())
    }

    /// Runs a pass every `bot.expiry_interval_seconds` until `cancel` (on every instance:
    /// batches are claimed, see the module docs). Passes
    /// hand their messages to a notifier task and never wait for the sends.
    pub async fn run(mut self, cancel: CancellationToken) {
        let interval = self.settings.expiry_interval_seconds;
        let capacity = (self.settings.expiry_batch as usize)
            .saturating_mul(2)
            .max(1);
        let (tx, rx) = mpsc::channel::<Notice>(capacity);
        self.notices = Some(tx);
        // The notifier runs beside the passes in this task (no spawn of its own): both end
        // with `cancel`.
        let notifier = self.clone().notifier(rx, cancel.clone());
        let passes = run_every(
            "expiry",
            interval,
            self.diagnostics.as_ref(),
            &cancel,
            || self.run_logged(),
        );
        tokio::join!(passes, notifier);
        self.notices = None;
    }

    /// Sends what passes queue, `bot.notify_concurrency` at once, until `cancel` (sends in
    /// flight then get one request timeout to end).
    async fn notifier(self, mut rx: mpsc::Receiver<Notice>, cancel: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.settings.notify_concurrency.max(1)));
        let sends = TaskTracker::new();
        loop {
            let permit = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let n = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                n = rx.recv() => match n {
                    Some(n) => n,
                    None => break,
                },
            };
            this.metrics.queue.dec();
            let this = this.clone();
            sends.spawn(async move {
                this.notify(n).await;
                drop(permit);
            });
        }
        sends.close();
        let bound = this.settings.request_timeout_seconds + Duration::from_secs(1);
        let _ = tokio::time::timeout(bound, sends.wait()).await;
    }

    async fn run_logged(&self) {
        let Some(tx) = &self.notices else {
            return;
        };
        match self.enforce_once(tx.capacity()).await {
            Ok((p, notices)) => {
                let mut dropped = 0;
                for n in notices {
                    let window = n.window;
                    self.metrics.queue.inc();
                    if tx.try_send(n).is_err() {
                        self.metrics.queue.dec();
                        dropped += 1;
                        self.metrics
                            .reminders
                            .with_label_values(&[window, "dropped"])
                            .inc();
                    }
                }
                if dropped > 0 {
                    tracing::warn!(
                        dropped,
                        "expiry notices dropped: the notifier queue is full (sends are slow)"
                    );
                }
                if p.expired + p.reminded_1d + p.reminded_3d > 0 {
                    tracing::info!(?p, "expiry pass")
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiry pass failed"),
        }
    }
}

/// How one notice went.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Delivered,
    Failed,
    Blocked,
    Skipped,
}
