//! The bot's reads and writes: users, subscriptions, payments. Each function holds one labelled
//! pooled connection for its queries only (never across a Bot API or node call).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::node_picker::NodePicker;
use crate::db::{DbError, DbPool};
use crate::node::owned_email;
use crate::outbox::{enqueue_after, NodeOp};

/// A user's subscription (the latest row; renewals extend it, so a user keeps one key).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Subscription {
    /// Row id.
    pub id: i64,
    /// Node name.
    pub node: String,
    /// VLESS client id.
    pub vless_uuid: Uuid,
    /// `active`, `expired` or `cancelled`.
    pub status: String,
    /// Plan id or `trial`.
    pub plan: String,
    /// End of validity.
    pub expires_at: DateTime<Utc>,
}

impl Subscription {
    /// Active and not past its expiry.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.status == "active" && self.expires_at > now
    }
}

const SUB_COLUMNS: &str = "id, node, vless_uuid, status, plan, expires_at";

/// Registers the user or refreshes their language.
///
/// # Errors
/// The database error.
pub async fn upsert_user(pool: &DbPool, id: i64, lang: &str) -> Result<(), DbError> {
    let mut c = pool.acquire("bot_upsert_user").await?;
    let r = upsert_user_on(&mut c, id, lang).await;
    c.check(r)
}

async fn upsert_user_on(c: &mut PgConnection, id: i64, lang: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bot_users (telegram_id, language_code) VALUES ($1, $2) \
         ON CONFLICT (telegram_id) DO UPDATE SET language_code = EXCLUDED.language_code, \
         blocked_at = NULL, updated_at = now() \
         WHERE bot_users.language_code IS DISTINCT FROM EXCLUDED.language_code \
         OR bot_users.blocked_at IS NOT NULL",
    )
    .bind(id)
    .bind(lang)
    .execute(c)
    .await?;
    Ok(())
}

/// The user's latest subscription.
///
/// # Errors
/// The database error.
pub async fn current_subscription(
    pool: &DbPool,
    owner: i64,
) -> Result<Option<Subscription>, DbError> {
    let mut c = pool.acquire("bot_subscription").await?;
    let r = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SUB_COLUMNS} FROM subscriptions WHERE owner_id = $1 ORDER BY id DESC LIMIT 1"
    )))
    .bind(owner)
    .fetch_optional(&mut *c)
    .await;
    c.check(r)
}

/// Whether the user may still take the trial (never used, no subscription ever).
///
/// # Errors
/// The database error.
pub async fn trial_available(pool: &DbPool, owner: i64) -> Result<bool, DbError> {
    let mut c = pool.acquire("bot_trial_check").await?;
    let r: Result<bool, _> = sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM bot_users WHERE telegram_id = $1 AND trial_used) \
         AND NOT EXISTS (SELECT 1 FROM subscriptions WHERE owner_id = $1)",
    )
    .bind(owner)
    .fetch_one(&mut *c)
    .await;
    c.check(r)
}

/// What starting a trial did.
#[derive(Debug, Clone, PartialEq)]
pub enum TrialOutcome {
    /// The trial subscription was written; its key must be issued on its node.
    Started(Subscription),
    /// Already used, or the user already has a subscription.
    Used,
    /// No node is configured.
    NoNode,
}

/// Starts the one-time trial of `days` days in one transaction: marks the trial used and
/// writes the subscription (reminders that already fall inside the trial are marked done so a
/// short trial does not get a "3 days left" message at once).
///
/// # Errors
/// The database error.
pub async fn start_trial(
    pool: &DbPool,
    owner: i64,
    lang: &str,
    days: u32,
    nodes: &NodePicker,
    add_grace: Duration,
) -> Result<TrialOutcome, DbError> {
    let mut c = pool.acquire("bot_trial").await?;
    let mut tx = c.begin().await?;
    let r = upsert_user_on(&mut tx, owner, lang).await;
    tx.check(r)?;
    let r: Result<Option<i64>, _> = sqlx::query_scalar(
        "UPDATE bot_users SET trial_used = TRUE, updated_at = now() \
         WHERE telegram_id = $1 AND NOT trial_used \
         AND NOT EXISTS (SELECT 1 FROM subscriptions WHERE owner_id = $1) RETURNING telegram_id",
    )
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await;
    if tx.check(r)?.is_none() {
        tx.rollback().await?;
        return Ok(TrialOutcome::Used);
    }
    let r = nodes.pick(&mut tx).await;
    let Some(node) = tx.check(r)? else {
        tx.rollback().await?;
        return Ok(TrialOutcome::NoNode);
    };
    let r = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at, reminded_3d, \
         reminded_1d) SELECT $1, $2, $3, 'trial', e, e <= now() + interval '3 days', \
         e <= now() + interval '1 day' FROM (SELECT now() + make_interval(days => $4) AS e) x \
         RETURNING {SUB_COLUMNS}"
    )))
    .bind(owner)
    .bind(&node)
    .bind(Uuid::new_v4())
    .bind(days as i32)
    .fetch_one(&mut *tx)
    .await;
    let sub = tx.check(r)?;
    let r = queue_add(&mut tx, &sub, add_grace).await;
    tx.check(r)?;
    tx.commit().await?;
    Ok(TrialOutcome::Started(sub))
}

/// Queues the node add of a new or re-issued key in the transaction that writes it, due after
/// `grace`: the handler tries the add itself first and completes the intent when the node
/// confirms; if the handler fails or is cut off, the outbox applies it. So a committed
/// subscription's key is always either on its node or in the outbox.
async fn queue_add(
    tx: &mut PgConnection,
    sub: &Subscription,
    grace: Duration,
) -> Result<(), sqlx::Error> {
    enqueue_after(
        tx,
        &sub.node,
        NodeOp::Add,
        sub.vless_uuid,
        &owned_email(sub.vless_uuid),
        grace,
    )
    .await
}

/// A completed payment as Telegram reported it.
#[derive(Debug, Clone)]
pub struct PaymentIn {
    /// Payer.
    pub user_id: i64,
    /// Payer's language code.
    pub lang: String,
    /// Telegram's charge id (`telegram_payment_charge_id`): the key of the exactly-once
    /// credit, unique per charge as Telegram guarantees.
    pub telegram_charge_id: String,
    /// The provider's charge id, kept as data (`None` when empty, as for Telegram Stars).
    pub provider_charge_id: Option<String>,
    /// Plan id from the payload.
    pub plan: String,
    /// Days the plan adds.
    pub days: u32,
    /// Currency (`XTR`).
    pub currency: String,
    /// Amount in the currency's smallest unit (Stars).
    pub amount: i64,
}

/// What crediting a payment did.
#[derive(Debug, Clone, PartialEq)]
pub enum CreditOutcome {
    /// First time this charge was seen: the subscription was created or extended.
    /// `issue` says the key must be (re-)added on the node (new or re-activated).
    Credited {
        /// The subscription after the credit.
        sub: Subscription,
        /// Whether the node must be told.
        issue: bool,
    },
    /// This charge was credited before; nothing changed.
    Duplicate,
    /// The charge was refunded before its payment arrived: recorded, not credited.
    AlreadyRefunded,
    /// No node is configured for a new subscription; nothing was written.
    NoNode,
}

/// Credits `p` exactly once per Telegram charge id: the payment row (`ON CONFLICT DO NOTHING`
/// on the unique charge id) and the subscription change commit together, so a repeated update
/// finds the row and changes nothing. A charge already refunded is recorded and not credited.
///
/// # Errors
/// The database error (nothing committed).
pub async fn credit_payment(
    pool: &DbPool,
    p: &PaymentIn,
    picker: &NodePicker,
    add_grace: Duration,
) -> Result<CreditOutcome, DbError> {
    let mut c = pool.acquire("bot_credit_payment").await?;
    let mut tx = c.begin().await?;
    let r = upsert_user_on(&mut tx, p.user_id, &p.lang).await;
    tx.check(r)?;
    let r = lock_charge(&mut tx, &p.telegram_charge_id).await;
    tx.check(r)?;
    let r = insert_payment(&mut tx, p).await;
    let Some(payment_id) = tx.check(r)? else {
        tx.rollback().await?;
        return Ok(CreditOutcome::Duplicate);
    };
    let r = sqlx::query(
        "UPDATE payment_refunds SET payment_id = $2 WHERE telegram_charge_id = $1 \
         AND payment_id IS NULL",
    )
    .bind(&p.telegram_charge_id)
    .bind(payment_id)
    .execute(&mut *tx)
    .await;
    if tx.check(r)?.rows_affected() > 0 {
        tx.commit().await?;
        return Ok(CreditOutcome::AlreadyRefunded);
    }
    let r: Result<Option<Subscription>, _> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SUB_COLUMNS} FROM subscriptions WHERE owner_id = $1 ORDER BY id DESC LIMIT 1 \
         FOR UPDATE"
    )))
    .bind(p.user_id)
    .fetch_optional(&mut *tx)
    .await;
    let existing = tx.check(r)?;
    // The extension in SQL: from the current expiry while live, else from now.
    const NEW_EXPIRY: &str = "(CASE WHEN status = 'active' AND expires_at > now() THEN expires_at \
                              ELSE now() END + make_interval(days => $2))";
    let (sub, issue) = match existing {
        Some(old) => {
            let issue = !old.is_live(Utc::now());
            let node = if picker.has(&old.node) {
                old.node.clone()
            } else {
                let r = picker.pick(&mut tx).await;
                match tx.check(r)? {
                    Some(n) => n,
                    None => {
                        tx.rollback().await?;
                        return Ok(CreditOutcome::NoNode);
                    }
                }
            };
            let r: Result<Subscription, _> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE subscriptions SET expires_at = {NEW_EXPIRY}, \
                 reminded_3d = {NEW_EXPIRY} <= now() + interval '3 days', \
                 reminded_1d = {NEW_EXPIRY} <= now() + interval '1 day', \
                 status = 'active', plan = $3, node = $4, updated_at = now() \
                 WHERE id = $1 RETURNING {SUB_COLUMNS}"
            )))
            .bind(old.id)
            .bind(p.days as i32)
            .bind(&p.plan)
            .bind(&node)
            .fetch_one(&mut *tx)
            .await;
            (tx.check(r)?, issue || node != old.node)
        }
        None => {
            let r = picker.pick(&mut tx).await;
            let Some(node) = tx.check(r)? else {
                tx.rollback().await?;
                return Ok(CreditOutcome::NoNode);
            };
            let r: Result<Subscription, _> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at, \
                 reminded_3d, reminded_1d) SELECT $1, $2, $3, $4, e, \
                 e <= now() + interval '3 days', e <= now() + interval '1 day' \
                 FROM (SELECT now() + make_interval(days => $5) AS e) x RETURNING {SUB_COLUMNS}"
            )))
            .bind(p.user_id)
            .bind(&node)
            .bind(Uuid::new_v4())
            .bind(&p.plan)
            .bind(p.days as i32)
            .fetch_one(&mut *tx)
            .await;
            (tx.check(r)?, true)
        }
    };
    let r = sqlx::query("UPDATE payments SET subscription_id = $2 WHERE id = $1")
        .bind(payment_id)
        .bind(sub.id)
        .execute(&mut *tx)
        .await;
    tx.check(r)?;
    if issue {
        let r = queue_add(&mut tx, &sub, add_grace).await;
        tx.check(r)?;
    }
    tx.commit().await?;
    Ok(CreditOutcome::Credited { sub, issue })
}

/// Records a payment whose plan no longer exists, so it is never lost (support credits it by
/// hand). Returns `false` when the charge was already recorded.
///
/// # Errors
/// The database error.
pub async fn record_orphan_payment(pool: &DbPool, p: &PaymentIn) -> Result<bool, DbError> {
    let mut c = pool.acquire("bot_record_payment").await?;
    let r = upsert_user_on(&mut c, p.user_id, &p.lang).await;
    c.check(r)?;
    let r = insert_payment(&mut c, p).await;
    Ok(c.check(r)?.is_some())
}

/// Inserts the payment row once per Telegram charge id; `None` when it already exists.
async fn insert_payment(c: &mut PgConnection, p: &PaymentIn) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO payments (telegram_charge_id, provider_charge_id, user_id, plan, currency, \
         amount, days) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (telegram_charge_id) DO NOTHING RETURNING id",
    )
    .bind(&p.telegram_charge_id)
    .bind(p.provider_charge_id.as_deref().filter(|s| !s.is_empty()))
    .bind(p.user_id)
    .bind(&p.plan)
    .bind(&p.currency)
    .bind(p.amount)
    .bind((p.days > 0).then_some(p.days as i32))
    .fetch_optional(c)
    .await
}

/// Serialises every credit and refund of one charge id for the rest of the transaction, so a
/// refund racing its own payment cannot have both miss each other.
async fn lock_charge(c: &mut PgConnection, charge: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('vpnbot-charge:' || $1, 0))")
        .bind(charge)
        .execute(c)
        .await?;
    Ok(())
}

/// A refund as Telegram reported it (`refunded_payment`) or confirmed it (`refundStarPayment`).
#[derive(Debug, Clone)]
pub struct RefundIn {
    /// Telegram's charge id of the refunded payment.
    pub telegram_charge_id: String,
    /// The user the refund message came from (or the payment's payer for `/refund`).
    pub user_id: i64,
    /// Currency (`XTR`).
    pub currency: String,
    /// Amount refunded, smallest units.
    pub amount: i64,
    /// `telegram` (a `refunded_payment` message) or `admin` (`/refund`).
    pub source: &'static str,
}

/// What recording a refund did.
#[derive(Debug, Clone, PartialEq)]
pub enum RefundOutcome {
    /// The charge's days were taken back from `sub`; still live afterwards.
    Shortened {
        /// The payer (whom to tell).
        user_id: i64,
        /// The subscription after the refund.
        sub: Subscription,
    },
    /// The charge's days were taken back and nothing is left: the subscription is `expired`
    /// and its key's removal is queued in the outbox.
    Ended {
        /// The payer.
        user_id: i64,
        /// The subscription after the refund.
        sub: Subscription,
    },
    /// The payment is recorded but never extended a subscription (unknown plan, or its
    /// subscription had already ended): the refund is recorded, nothing to take back.
    NotCredited {
        /// The payer.
        user_id: i64,
    },
    /// No payment with this charge id: the refund is recorded so a late payment update for it
    /// is not credited.
    UnknownCharge,
    /// This charge's refund was recorded before; nothing changed.
    Duplicate,
}

/// Another payment of a subscription: credit time, plan, stored days.
type OtherPayment = (DateTime<Utc>, String, Option<i32>);

#[derive(Debug, sqlx::FromRow)]
struct PaymentRow {
    id: i64,
    user_id: i64,
    subscription_id: Option<i64>,
    plan: String,
    days: Option<i32>,
}

/// A recorded payment, for `/refund`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PaymentInfo {
    /// Payer.
    pub user_id: i64,
    /// Currency.
    pub currency: String,
    /// Amount, smallest units.
    pub amount: i64,
    /// Whether a refund of it is recorded.
    pub refunded: bool,
    /// The payer's language code.
    pub language_code: String,
}

/// The payment with Telegram charge id `charge`, if recorded.
///
/// # Errors
/// The database error.
pub async fn find_payment(pool: &DbPool, charge: &str) -> Result<Option<PaymentInfo>, DbError> {
    let mut c = pool.acquire("bot_find_payment").await?;
    let r = sqlx::query_as(
        "SELECT p.user_id, p.currency, p.amount, EXISTS (SELECT 1 FROM payment_refunds r \
         WHERE r.telegram_charge_id = p.telegram_charge_id) AS refunded, \
         coalesce(u.language_code, 'en') AS language_code \
         FROM payments p LEFT JOIN bot_users u ON u.telegram_id = p.user_id \
         WHERE p.telegram_charge_id = $1",
    )
    .bind(charge)
    .fetch_optional(&mut *c)
    .await;
    c.check(r)
}

/// Records the refund of `r` once per charge id and takes back what the charge gave: its days
/// come off the subscription it extended, never below what the other unrefunded payments of
/// that subscription paid for (each one's credit time plus its days). A result in the past
/// marks the subscription `expired` and queues its key's removal through the outbox in the
/// same transaction (the outbox re-checks liveness before removing). `plan_days` gives the
/// days of a plan for payments recorded before the days were stored.
///
/// # Errors
/// The database error (nothing committed).
pub async fn refund_payment(
    pool: &DbPool,
    r: &RefundIn,
    plan_days: &(dyn Fn(&str) -> Option<u32> + Sync),
) -> Result<RefundOutcome, DbError> {
    let mut c = pool.acquire("bot_refund").await?;
    let mut tx = c.begin().await?;
    let q = lock_charge(&mut tx, &r.telegram_charge_id).await;
    tx.check(q)?;
    let q: Result<Option<PaymentRow>, _> = sqlx::query_as(
        "SELECT id, user_id, subscription_id, plan, days FROM payments \
         WHERE telegram_charge_id = $1 FOR UPDATE",
    )
    .bind(&r.telegram_charge_id)
    .fetch_optional(&mut *tx)
    .await;
    let payment = tx.check(q)?;
    let q: Result<Option<i64>, _> = sqlx::query_scalar(
        "INSERT INTO payment_refunds (telegram_charge_id, payment_id, user_id, currency, amount, \
         source) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (telegram_charge_id) DO NOTHING RETURNING id",
    )
    .bind(&r.telegram_charge_id)
    .bind(payment.as_ref().map(|p| p.id))
    .bind(payment.as_ref().map_or(r.user_id, |p| p.user_id))
    .bind(&r.currency)
    .bind(r.amount)
    .bind(r.source)
    .fetch_optional(&mut *tx)
    .await;
    let Some(refund_id) = tx.check(q)? else {
        tx.rollback().await?;
        return Ok(RefundOutcome::Duplicate);
    };
    let Some(payment) = payment else {
        tx.commit().await?;
        return Ok(RefundOutcome::UnknownCharge);
    };
    let user_id = payment.user_id;
    let Some(sub_id) = payment.subscription_id else {
        tx.commit().await?;
        return Ok(RefundOutcome::NotCredited { user_id });
    };
    let q: Result<Subscription, _> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SUB_COLUMNS} FROM subscriptions WHERE id = $1 FOR UPDATE"
    )))
    .bind(sub_id)
    .fetch_one(&mut *tx)
    .await;
    let sub = tx.check(q)?;
    let now = Utc::now();
    if !sub.is_live(now) {
        // Already ended (expired, or cancelled): nothing left to take back.
        tx.commit().await?;
        return Ok(RefundOutcome::NotCredited { user_id });
    }
    let days = payment
        .days
        .map(|d| d.max(0) as u32)
        .or_else(|| plan_days(&payment.plan))
        .unwrap_or(0);
    // What the other unrefunded payments of this subscription paid for.
    let q: Result<Vec<OtherPayment>, _> = sqlx::query_as(
        "SELECT p.created_at, p.plan, p.days FROM payments p WHERE p.subscription_id = $1 \
         AND p.id <> $2 AND NOT EXISTS (SELECT 1 FROM payment_refunds r \
         WHERE r.telegram_charge_id = p.telegram_charge_id)",
    )
    .bind(sub_id)
    .bind(payment.id)
    .fetch_all(&mut *tx)
    .await;
    let floor = tx
        .check(q)?
        .into_iter()
        .map(|(at, plan, d)| {
            let d = d.map(|d| d.max(0) as u32).or_else(|| plan_days(&plan));
            at + chrono::Duration::days(i64::from(d.unwrap_or(0)))
        })
        .max();
    let taken = sub.expires_at - chrono::Duration::days(i64::from(days));
    let new_expiry = floor.map_or(taken, |f| taken.max(f)).min(sub.expires_at);
    let ended = new_expiry <= now;
    let q: Result<Subscription, _> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE subscriptions SET expires_at = $2, \
         status = CASE WHEN $3 THEN 'expired' ELSE status END, \
         reminded_3d = reminded_3d OR $2 <= now() + interval '3 days', \
         reminded_1d = reminded_1d OR $2 <= now() + interval '1 day', updated_at = now() \
         WHERE id = $1 RETURNING {SUB_COLUMNS}"
    )))
    .bind(sub_id)
    .bind(new_expiry)
    .bind(ended)
    .fetch_one(&mut *tx)
    .await;
    let after = tx.check(q)?;
    let q = sqlx::query(
        "UPDATE payment_refunds SET subscription_id = $2, expires_before = $3, \
         expires_after = $4 WHERE id = $1",
    )
    .bind(refund_id)
    .bind(sub_id)
    .bind(sub.expires_at)
    .bind(after.expires_at)
    .execute(&mut *tx)
    .await;
    tx.check(q)?;
    if ended {
        let q = crate::outbox::enqueue(
            &mut tx,
            &after.node,
            NodeOp::Remove,
            after.vless_uuid,
            &owned_email(after.vless_uuid),
        )
        .await;
        tx.check(q)?;
    }
    tx.commit().await?;
    Ok(if ended {
        RefundOutcome::Ended {
            user_id,
            sub: after,
        }
    } else {
        RefundOutcome::Shortened {
            user_id,
            sub: after,
        }
    })
}

/// Figures for `/stats`.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct Stats {
    /// Registered users.
    pub users: i64,
    /// Subscriptions active and not past expiry.
    pub active: i64,
    /// Of which trials.
    pub active_trials: i64,
    /// Payments recorded.
    pub payments: i64,
    /// Refunds recorded.
    pub refunds: i64,
    /// Stars received in all, refunded payments left out.
    pub revenue_stars: i64,
    /// Stars received in the last 30 days, refunded payments left out.
    pub revenue_stars_30d: i64,
}

/// Reads the `/stats` figures.
///
/// # Errors
/// The database error.
pub async fn stats(pool: &DbPool) -> Result<Stats, DbError> {
    let mut c = pool.acquire("bot_stats").await?;
    let r = sqlx::query_as(
        "SELECT (SELECT count(*) FROM bot_users) AS users, \
         (SELECT count(*) FROM subscriptions WHERE status = 'active' AND expires_at > now()) AS active, \
         (SELECT count(*) FROM subscriptions WHERE status = 'active' AND expires_at > now() \
            AND plan = 'trial') AS active_trials, \
         (SELECT count(*) FROM payments) AS payments, \
         (SELECT count(*) FROM payment_refunds) AS refunds, \
         (SELECT coalesce(sum(amount), 0)::bigint FROM payments p WHERE currency = 'XTR' \
            AND NOT EXISTS (SELECT 1 FROM payment_refunds r \
              WHERE r.telegram_charge_id = p.telegram_charge_id)) AS revenue_stars, \
         (SELECT coalesce(sum(amount), 0)::bigint FROM payments p WHERE currency = 'XTR' \
            AND created_at > now() - interval '30 days' AND NOT EXISTS (SELECT 1 \
              FROM payment_refunds r WHERE r.telegram_charge_id = p.telegram_charge_id)) \
            AS revenue_stars_30d",
    )
    .fetch_one(&mut *c)
    .await;
    c.check(r)
}

/// The latest reconcile run of each node: `(node, finished_at, outcome, removed, readded)`.
///
/// # Errors
/// The database error.
pub async fn last_reconciles(
    pool: &DbPool,
) -> Result<Vec<(String, DateTime<Utc>, String, i64, i64)>, DbError> {
    let mut c = pool.acquire("bot_diag").await?;
    let r = sqlx::query_as(
        "SELECT DISTINCT ON (node) node, finished_at, outcome, removed, readded \
         FROM reconcile_runs ORDER BY node, started_at DESC",
    )
    .fetch_all(&mut *c)
    .await;
    c.check(r)
}
