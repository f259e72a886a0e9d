//! Phase 1, snapshot: one node's live subscriptions, streamed by keyset pagination over the
//! partial covering index `(node, vless_uuid) INCLUDE (expires_at) WHERE status = 'active'`
//! (an index-only scan; migration 0007), holding a pooled connection per batch only. Rows are
//! read without sqlx's per-row span enters ([`crate::db::bulk_read`]).

use uuid::Uuid;

use super::{ConnStats, PassError};
use crate::db::bulk_read::BulkRead;
use crate::db::DbPool;

/// The snapshot's first batch: `$1` node, `$2` batch size. Both statements read only columns
/// of the covering index, so a vacuumed table answers them with an index-only scan
/// (`tests/it/reconcile.rs` checks the plan).
pub const FIRST_BATCH_SQL: &str = "SELECT vless_uuid, expires_at > now() FROM subscriptions \
     WHERE node = $1 AND status = 'active' \
     ORDER BY vless_uuid LIMIT $2";

/// The snapshot's following batches: as [`FIRST_BATCH_SQL`], after UUID `$3`.
pub const NEXT_BATCH_SQL: &str = "SELECT vless_uuid, expires_at > now() FROM subscriptions \
     WHERE node = $1 AND status = 'active' AND vless_uuid > $3 \
     ORDER BY vless_uuid LIMIT $2";

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
                None => sqlx::query_as(FIRST_BATCH_SQL)
                    .bind(node)
                    .bind(batch as i64),
                Some(last) => sqlx::query_as(NEXT_BATCH_SQL)
                    .bind(node)
                    .bind(batch as i64)
                    .bind(last),
            };
            // A million rows per pass: without sqlx's per-row span enters (see BulkRead).
            let res = BulkRead::new(q.fetch_all(&mut **conn)).await;
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
