//! Phase 4, re-check: just before acting, the candidates are checked against the database
//! again, in batched queries (`= ANY($1)`, one round trip per batch, never one per UUID).
//!
//! - An orphan is kept when its subscription is active on this node now (a purchase that
//!   committed after the snapshot, FAULTS.md S1), or was created or updated within the grace
//!   window before the snapshot or at any time since.
//! - A missing user is re-added only while its subscription is still active and unexpired.
//! - A candidate with an open outbox intent is left to the outbox: re-enqueueing it would reset
//!   its backoff, and an intent written by a state change must not be replaced.

use std::collections::HashSet;
use std::time::Duration;

use uuid::Uuid;

use super::{ConnStats, PassError};
use crate::db::bulk_read::BulkRead;
use crate::db::DbPool;

/// Outcome of the re-check.
#[derive(Debug, Default)]
pub(crate) struct Rechecked {
    /// Orphans still to remove.
    pub(crate) remove: Vec<Uuid>,
    /// Orphans kept by the live re-check or the grace window.
    pub(crate) kept: u64,
    /// Missing users still to re-add.
    pub(crate) readd: Vec<Uuid>,
    /// Missing users no longer live at re-check time.
    pub(crate) gone: u64,
    /// Candidates (either kind) that already have an open outbox intent.
    pub(crate) pending: u64,
    /// Queries run.
    pub(crate) queries: u64,
}

const TAG_KEEP: i32 = 1;
const TAG_PENDING: i32 = 2;

/// Re-checks `orphans` and `missing` of `node`. `window` is the grace window plus the time
/// since the snapshot began, so that "created or updated after snapshot − grace" is computed
/// with the database's clock.
pub(crate) async fn recheck(
    pool: &DbPool,
    stats: &ConnStats,
    node: &str,
    orphans: &[Uuid],
    missing: &[Uuid],
    window: Duration,
    batch: usize,
) -> Result<Rechecked, PassError> {
    let mut out = Rechecked::default();
    for chunk in orphans.chunks(batch) {
        let tags = tagged(
            pool,
            stats,
            "SELECT vless_uuid, 1 FROM subscriptions WHERE vless_uuid = ANY($1) \
               AND ((node = $2 AND status = 'active') \
                    OR created_at > now() - make_interval(secs => $3) \
                    OR updated_at > now() - make_interval(secs => $3)) \
             UNION ALL \
             SELECT vless_uuid, 2 FROM pending_node_ops \
             WHERE node = $2 AND done_at IS NULL AND vless_uuid = ANY($1)",
            chunk,
            node,
            Some(window.as_secs_f64()),
        )
        .await?;
        out.queries += 1;
        let (keep, pending) = split(tags);
        for id in chunk {
            if keep.contains(id) {
                out.kept += 1;
            } else if pending.contains(id) {
                out.pending += 1;
            } else {
                out.remove.push(*id);
            }
        }
    }
    for chunk in missing.chunks(batch) {
        let tags = tagged(
            pool,
            stats,
            "SELECT vless_uuid, 1 FROM subscriptions WHERE vless_uuid = ANY($1) \
               AND node = $2 AND status = 'active' AND expires_at > now() \
             UNION ALL \
             SELECT vless_uuid, 2 FROM pending_node_ops \
             WHERE node = $2 AND done_at IS NULL AND vless_uuid = ANY($1)",
            chunk,
            node,
            None,
        )
        .await?;
        out.queries += 1;
        let (live, pending) = split(tags);
        for id in chunk {
            if !live.contains(id) {
                out.gone += 1;
            } else if pending.contains(id) {
                out.pending += 1;
            } else {
                out.readd.push(*id);
            }
        }
    }
    Ok(out)
}

async fn tagged(
    pool: &DbPool,
    stats: &ConnStats,
    sql: &'static str,
    ids: &[Uuid],
    node: &str,
    secs: Option<f64>,
) -> Result<Vec<(Uuid, i32)>, PassError> {
    let mut conn = stats.acquire(pool, "reconcile_recheck").await?;
    let mut q = sqlx::query_as(sql).bind(ids).bind(node);
    if let Some(s) = secs {
        q = q.bind(s);
    }
    // As many rows as the diff found candidates: without per-row span enters (BulkRead).
    let res = BulkRead::new(q.fetch_all(&mut **conn)).await;
    stats.round_trip();
    Ok(conn.check(res)?)
}

fn split(tags: Vec<(Uuid, i32)>) -> (HashSet<Uuid>, HashSet<Uuid>) {
    let mut a = HashSet::new();
    let mut b = HashSet::new();
    for (id, t) in tags {
        match t {
            TAG_KEEP => {
                a.insert(id);
            }
            TAG_PENDING => {
                b.insert(id);
            }
            _ => {}
        }
    }
    (a, b)
}
