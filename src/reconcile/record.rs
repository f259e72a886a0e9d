//! Phase 7, record: one audit row per node and run in `reconcile_runs`.

use super::{ConnStats, NodeReport, PassError};
use crate::db::DbPool;

/// Inserts the audit row of `rep`.
pub(crate) async fn insert(
    pool: &DbPool,
    stats: &ConnStats,
    rep: &NodeReport,
    started_at: chrono::DateTime<chrono::Utc>,
) -> Result<(), PassError> {
    let mut conn = stats.acquire(pool, "reconcile_record").await?;
    // A dry run's row holds what it would have written; its `dry_run` flag says it did not.
    let (removed, readded) = if rep.dry_run {
        (rep.removals.len() as u64, rep.readds.len() as u64)
    } else {
        (rep.removed, rep.readded)
    };
    let phases = serde_json::to_value(&rep.phase_seconds).unwrap_or_default();
    let error = match (&rep.error, &rep.guard) {
        (Some(e), _) => Some(e.clone()),
        (None, Some(g)) => Some(format!("guard {}: {}", g.reason.as_str(), g.detail)),
        _ => None,
    };
    let res = sqlx::query(
        "INSERT INTO reconcile_runs (node, started_at, finished_at, outcome, dry_run, db_live, \
         node_users, orphans, missing, kept_by_recheck, removed, readded, phase_seconds, error) \
         VALUES ($1, $2, now(), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(&rep.node)
    .bind(started_at)
    .bind(rep.outcome.as_str())
    .bind(rep.dry_run)
    .bind(rep.db_live as i64)
    .bind(rep.node_users as i64)
    .bind(rep.orphans as i64)
    .bind(rep.missing as i64)
    .bind(rep.kept_by_recheck as i64)
    .bind(removed as i64)
    .bind(readded as i64)
    .bind(phases)
    .bind(error)
    .execute(&mut **conn)
    .await;
    stats.round_trip();
    conn.check(res)?;
    Ok(())
}
