//! Phase 1, snapshot: one node's live subscriptions, streamed by keyset pagination over the
//! partial index `(node, vless_uuid) WHERE status = 'active'`, holding a pooled connection per
//! batch only.

use uuid::Uuid;

use super::{ConnStats, PassError};
use crate::db::DbPool;

/// One node's active subscriptions, sorted by UUID (PostgreSQL orders `uuid` bytewise, as
/// [`Uuid`]'s `Ord` does). `true` marks a subscription not yet past `expires_at`.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) rows: Vec<(Uuid, bool)>,
    pub(crate) batches: u64,
}

/// Loads the snapshot. Any database error aborts the phase: an error is never "no rows".
pub(crate) async fn load(
    pool: &DbPool,
    stats: &ConnStats,
    node: &str,
    batch: u32,
) -> Result<Snapshot, PassError> {
    let mut snap = Snapshot::default();
    let mut after: Option<Uuid> = None;
    loop {
        let rows: Vec<(Uuid, bool)> = {
            let mut conn = stats.acquire(pool, "reconcile_snapshot").await?;
            let q = match after {
                None => sqlx::query_as(
                    "SELECT vless_uuid, expires_at > now() FROM subscriptions \
                     WHERE node = $1 AND status = 'active' \
                     ORDER BY vless_uuid LIMIT $2",
                )
                .bind(node)
                .bind(batch as i64),
                Some(last) => sqlx::query_as(
                    "SELECT vless_uuid, expires_at > now() FROM subscriptions \
                     WHERE node = $1 AND status = 'active' AND vless_uuid > $3 \
                     ORDER BY vless_uuid LIMIT $2",
                )
                .bind(node)
                .bind(batch as i64)
                .bind(last),
            };
            let res = q.fetch_all(&mut **conn).await;
            stats.round_trip();
            conn.check(res)?
        };
        snap.batches += 1;
        let n = rows.len();
        after = rows.last().map(|r| r.0);
        if let (Some(prev), Some(first)) = (snap.rows.last(), rows.first()) {
            if first.0 <= prev.0 {
                return Err(PassError::Internal(
                    "snapshot keyset out of order (collation mismatch)".into(),
                ));
            }
        }
        snap.rows.extend(rows);
        if n < batch as usize {
            return Ok(snap);
        }
        // Give other tasks a turn between batches.
        tokio::task::yield_now().await;
    }
}
