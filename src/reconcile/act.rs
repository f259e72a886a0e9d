//! Phase 6, act: hands removals and re-adds to the outbox of node operations
//! (`pending_node_ops`), which applies them with bounded concurrency and retries each until its
//! node confirms (a node offline during deletes just delays them).
//!
//! All intents of one node and run are written in one transaction, so a run cancelled by its
//! iteration timeout leaves either all of them or none. Each insert re-checks its rows once
//! more inside the statement (an active subscription blocks a removal; only a live one is
//! re-added), and never replaces an open intent: an intent written by a state change (a
//! purchase's `add`, an expiry's `remove`) wins over the reconcile's view.
//!
//! A leased pass (see [`super::lease`]) first locks its lease row `FOR SHARE` with its fencing
//! token (no takeover can commit until this transaction ends) and every insert requires the
//! token again in its `WHERE`: a pass whose lease was lost writes no intent.
//!
//! The rows are the ones [`crate::outbox::enqueue`] writes, inserted in batches through
//! `UNNEST` because one statement per UUID would be 20,000 round trips at a million users.

use uuid::Uuid;

use super::lease::Fence;
use super::{ConnStats, PassError};
use crate::db::DbPool;
use crate::node::owned_email;
use crate::outbox::NodeOp;

const REMOVE_SQL: &str = "INSERT INTO pending_node_ops (node, op, vless_uuid, email) \
     SELECT $1, $2, t.u, t.e FROM UNNEST($3::uuid[], $4::text[]) AS t(u, e) \
     WHERE NOT EXISTS (SELECT 1 FROM subscriptions s \
                       WHERE s.vless_uuid = t.u AND s.node = $1 AND s.status = 'active') \
       AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM node_leases l WHERE l.node = $1 \
            AND l.holder = $5 AND l.fencing_token = $6 AND l.expires_at > now())) \
     ON CONFLICT (node, vless_uuid) WHERE done_at IS NULL DO NOTHING";

const READD_SQL: &str = "INSERT INTO pending_node_ops (node, op, vless_uuid, email) \
     SELECT $1, $2, t.u, t.e FROM UNNEST($3::uuid[], $4::text[]) AS t(u, e) \
     WHERE EXISTS (SELECT 1 FROM subscriptions s \
                   WHERE s.vless_uuid = t.u AND s.node = $1 AND s.status = 'active' \
                     AND s.expires_at > now()) \
       AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM node_leases l WHERE l.node = $1 \
            AND l.holder = $5 AND l.fencing_token = $6 AND l.expires_at > now())) \
     ON CONFLICT (node, vless_uuid) WHERE done_at IS NULL DO NOTHING";

/// Intents written, per kind.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Acted {
    pub(crate) removed: u64,
    pub(crate) readded: u64,
}

/// Writes the intents in one transaction.
pub(crate) async fn enqueue_all(
    pool: &DbPool,
    stats: &ConnStats,
    node: &str,
    remove: &[Uuid],
    readd: &[Uuid],
    batch: usize,
    fence: Option<&Fence>,
) -> Result<Acted, PassError> {
    let mut acted = Acted::default();
    if remove.is_empty() && readd.is_empty() {
        return Ok(acted);
    }
    let mut conn = stats.acquire(pool, "reconcile_act").await?;
    let mut tx = conn.begin().await?;
    stats.round_trip();
    let (holder, token) = match fence {
        Some(f) => (Some(f.instance_id()), Some(f.token)),
        None => (None, None),
    };
    if let Some(f) = fence {
        let res = sqlx::query_scalar::<_, i32>(
            "SELECT 1 FROM node_leases WHERE node = $1 AND holder = $2 AND fencing_token = $3 \
             AND expires_at > now() FOR SHARE",
        )
        .bind(node)
        .bind(f.instance_id())
        .bind(f.token)
        .fetch_optional(&mut *tx)
        .await;
        stats.round_trip();
        if tx.check(res)?.is_none() {
            return Err(PassError::LeaseLost);
        }
    }
    for (ids, op, sql) in [
        (remove, NodeOp::Remove, REMOVE_SQL),
        (readd, NodeOp::Add, READD_SQL),
    ] {
        for chunk in ids.chunks(batch) {
            let emails: Vec<String> = chunk.iter().map(|u| owned_email(*u)).collect();
            let res = sqlx::query(sql)
                .bind(node)
                .bind(op.as_str())
                .bind(chunk)
                .bind(&emails)
                .bind(holder)
                .bind(token)
                .execute(&mut *tx)
                .await;
            stats.round_trip();
            let n = tx.check(res)?.rows_affected();
            match op {
                NodeOp::Remove => acted.removed += n,
                _ => acted.readded += n,
            }
        }
    }
    tx.commit().await?;
    stats.round_trip();
    Ok(acted)
}
