//! Deduplication of Telegram updates on `update_id` in PostgreSQL (table `bot_updates`,
//! migration 0005), in both receive modes: an update delivered twice (a webhook retry, a
//! second instance, a new polling leader re-reading unconfirmed updates) is handled once.
//!
//! An update is *claimed* before its handler runs: the claim row carries a lease
//! ([`BotService::dedup_lease`]: longer than a handler can run, its cut-off answer included).
//! Once the handler returns, the row is marked handled and every later delivery is a
//! [`Claim::Handled`] duplicate. A claim whose instance died (SIGKILL mid-handler) expires with
//! its lease and the next delivery takes it over: across such a crash an update is handled at
//! least once (the dead instance may have answered before it died), otherwise exactly once.
//! Payments stay exactly-once across crashes too: they are credited once per Telegram charge
//! id ([`super::store::credit_payment`]).
//!
//! Rows older than `telegram.dedup_retention_seconds` are deleted by [`cleanup`] in batches of
//! `telegram.dedup_cleanup_batch` (`vpnbot_bot_update_dedup_deleted_total`).

use std::time::Duration;

use crate::db::{DbError, DbPool};

use super::BotService;

/// Longest the polling loop waits for the claim of a pre-checkout query before answering it
/// unclaimed (Telegram cancels the payment unless it is answered within 10 s; answering one
/// twice is harmless). Other updates wait for the claim within their handler bound.
pub const CLAIM_BOUND_PRE_CHECKOUT: Duration = Duration::from_secs(1);

/// What a claim on an update found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This instance holds the update now (first delivery, or an expired claim taken over):
    /// handle it, then [`mark_handled`].
    Mine,
    /// Handled before: a duplicate delivery, not handled again.
    Handled,
    /// Another instance is handling it and its lease has not expired.
    Elsewhere,
}

/// Claims `update_id` for a lease of `lease`.
///
/// # Errors
/// The database error (the update is then neither claimed nor known).
pub async fn claim(pool: &DbPool, update_id: i64, lease: Duration) -> Result<Claim, DbError> {
    let mut c = pool.acquire("bot_update_claim").await?;
    // One statement: insert the claim, or take over an expired, unhandled one; the row comes
    // back only when the claim is ours. Otherwise read what holds it.
    let r: Result<Option<(i64, Option<bool>)>, sqlx::Error> = sqlx::query_as(
        "WITH mine AS ( \
           INSERT INTO bot_updates (update_id, lease_until) \
           VALUES ($1, now() + make_interval(secs => $2)) \
           ON CONFLICT (update_id) DO UPDATE SET lease_until = EXCLUDED.lease_until, \
             attempts = bot_updates.attempts + 1 \
           WHERE bot_updates.handled_at IS NULL AND bot_updates.lease_until < now() \
           RETURNING update_id) \
         SELECT 1::bigint, NULL::boolean FROM mine \
         UNION ALL \
         SELECT 0::bigint, handled_at IS NOT NULL FROM bot_updates \
         WHERE update_id = $1 AND NOT EXISTS (SELECT 1 FROM mine)",
    )
    .bind(update_id)
    .bind(lease.as_secs_f64())
    .fetch_optional(&mut *c)
    .await;
    Ok(match c.check(r)? {
        Some((1, _)) => Claim::Mine,
        Some((_, Some(true))) => Claim::Handled,
        Some(_) => Claim::Elsewhere,
        // The row was deleted between the two reads (retention): cannot happen within a
        // lease; treat as held elsewhere so the delivery is retried.
        None => Claim::Elsewhere,
    })
}

/// Marks `update_id` handled: every later delivery is a duplicate.
///
/// # Errors
/// The database error (the claim then expires with its lease and a retry handles the update
/// again).
pub async fn mark_handled(pool: &DbPool, update_id: i64) -> Result<(), DbError> {
    let mut c = pool.acquire("bot_update_handled").await?;
    let r = sqlx::query(
        "UPDATE bot_updates SET handled_at = now(), lease_until = NULL WHERE update_id = $1",
    )
    .bind(update_id)
    .execute(&mut *c)
    .await;
    c.check(r).map(drop)
}

/// Deletes rows received more than `retention` ago, at most `batch` per statement, until fewer
/// than `batch` are left; returns how many were deleted. Safe on every instance at once
/// (`SKIP LOCKED`: concurrent passes split the rows instead of waiting on each other).
///
/// # Errors
/// The database error (what was deleted before it stays deleted).
pub async fn cleanup(pool: &DbPool, retention: Duration, batch: u32) -> Result<u64, DbError> {
    let mut total = 0;
    loop {
        let mut c = pool.acquire("bot_update_cleanup").await?;
        let r = sqlx::query(
            "DELETE FROM bot_updates WHERE update_id IN ( \
               SELECT update_id FROM bot_updates \
               WHERE received_at < now() - make_interval(secs => $1) \
               ORDER BY received_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(retention.as_secs_f64())
        .bind(i64::from(batch))
        .execute(&mut *c)
        .await;
        let n = c.check(r)?.rows_affected();
        total += n;
        if n < u64::from(batch) {
            return Ok(total);
        }
    }
}

impl BotService {
    /// How long a claim on an update lasts: longer than its handler can run
    /// (`bot.handler_timeout_seconds`), the cut-off answer (`bot.request_timeout_seconds`) and
    /// 2 s of margin. A dead instance's updates are handled again after at most this.
    pub fn dedup_lease(&self) -> Duration {
        let s = self.settings();
        s.handler_timeout_seconds + s.request_timeout_seconds + Duration::from_secs(2)
    }

    /// The cleanup loop of one instance: every `interval`, [`cleanup`] with `retention` and
    /// `batch`, counting deletions; until `cancel`.
    pub async fn run_dedup_cleanup(
        self,
        retention: Duration,
        interval: Duration,
        batch: u32,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            match cleanup(&self.inner.pool, retention, batch).await {
                Ok(n) => self.metrics().dedup_deleted.inc_by(n),
                Err(e) => tracing::warn!(error = %e, "bot: deduplication cleanup failed"),
            }
        }
    }

    /// Claims `u` for the polling loop (inside the handler's bound, see
    /// [`BotService::handle_once`]). A pre-checkout query waits at most
    /// [`CLAIM_BOUND_PRE_CHECKOUT`] for it; other updates as long as the pool's acquire timeout
    /// and the handler bound allow (an acquire that times out is counted under
    /// `bot_update_claim`). A claim that fails, or that another instance holds (a leader that
    /// died mid-handler: polling has one consumer), does not stop the bot: the update is
    /// handled unclaimed (at least once; payments stay idempotent by charge id).
    pub(crate) async fn claim_for_polling(&self, u: &teloxide::types::Update) -> Proceed {
        let id = i64::from(u.id.0);
        let pre_checkout = matches!(u.kind, teloxide::types::UpdateKind::PreCheckoutQuery(_));
        let bound = if pre_checkout {
            CLAIM_BOUND_PRE_CHECKOUT
        } else {
            // The pool's acquire timeout, the statement timeout and the handler bound.
            Duration::MAX
        };
        let r = tokio::time::timeout(bound, claim(&self.inner.pool, id, self.dedup_lease())).await;
        match r {
            Ok(Ok(Claim::Mine)) => Proceed::Claimed,
            Ok(Ok(Claim::Handled)) => {
                self.metrics().dedup_duplicates.inc();
                tracing::info!(update_id = id, "bot: update handled before; skipped");
                Proceed::Skip
            }
            Ok(Ok(Claim::Elsewhere)) => {
                tracing::warn!(
                    update_id = id,
                    "bot: update claimed by another instance (a previous leader?); handled anyway"
                );
                Proceed::Unclaimed
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, update_id = id, "bot: update not claimed; handled anyway");
                Proceed::Unclaimed
            }
            Err(_) => {
                tracing::warn!(
                    update_id = id,
                    "bot: pre-checkout claim took over 1 s; answered unclaimed"
                );
                Proceed::Unclaimed
            }
        }
    }

    /// Handles `u` once across deliveries, for the polling loop: claims it and handles it
    /// within the handler's bound ([`Self::claim_for_polling`]; a claim cut off by the bound
    /// gets the cut-off answer like a slow handler), and marks it handled when the claim was
    /// taken, cut off or not (the cut-off answer was its answer).
    ///
    /// A pre-checkout query's answer time (from `received`) is observed before the mark, so
    /// it is counted by the time the answer is out.
    pub(crate) async fn handle_once(
        &self,
        u: teloxide::types::Update,
        received: std::time::Instant,
    ) {
        let id = i64::from(u.id.0);
        let pre_checkout = matches!(u.kind, teloxide::types::UpdateKind::PreCheckoutQuery(_));
        let claimed = std::sync::atomic::AtomicBool::new(false);
        self.handle_guarded_claiming(u, Some(&claimed)).await;
        if pre_checkout {
            self.metrics()
                .precheckout_answer
                .observe(received.elapsed().as_secs_f64());
        }
        if claimed.load(std::sync::atomic::Ordering::Relaxed) {
            if let Err(e) = mark_handled(&self.inner.pool, id).await {
                tracing::warn!(error = %e, update_id = id, "bot: update not marked handled");
            }
        }
    }
}

/// What the polling loop does with an update after its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proceed {
    /// Claimed: handle it, then mark it handled.
    Claimed,
    /// Handled before: skip it.
    Skip,
    /// Not claimed (database trouble, or held by an instance that died): handle it anyway.
    Unclaimed,
}
