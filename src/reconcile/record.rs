//! Phase 7, record: one audit row per node and run in `reconcile_runs`.
//!
//! A leased pass writes its row only while its lease still holds with its fencing token (the
//! same statement sets the lease's `last_reconciled_at` when the run ended ok); a pass whose
//! lease was lost records nothing ([`PassError::LeaseLost`]).

use super::lease::Fence;
use super::{ConnStats, NodeReport, Outcome, PassError};
use crate::db::DbPool;

/// Inserts the audit row of `rep`.
pub(crate) async fn insert(
    pool: &DbPool,
    stats: &ConnStats,
    rep: &NodeReport,
    started_at: chrono::DateTime<chrono::Utc>,
    fence: Option<&Fence>,
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
    const COLS: &str = "node, started_at, finished_at, outcome, dry_run, db_live, node_users, \
         orphans, missing, kept_by_recheck, removed, readded, phase_seconds, error, instance_id, \
         fencing_token";
    const VALUES: &str = "$1, $2, now(), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15";
    let sql = match fence {
        None => format!("INSERT INTO reconcile_runs ({COLS}) VALUES ({VALUES})"),
        Some(_) => format!(
            "WITH lease AS (UPDATE node_leases SET last_reconciled_at = CASE WHEN $16 \
               THEN now() ELSE last_reconciled_at END \
               WHERE node = $1 AND holder = $14 AND fencing_token = $15 AND expires_at > now() \
               RETURNING node) \
             INSERT INTO reconcile_runs ({COLS}) SELECT {VALUES} FROM lease"
        ),
    };
    let res = sqlx::query(sqlx::AssertSqlSafe(sql))
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
        .bind(fence.map(|f| f.instance_id().to_owned()))
        .bind(fence.map(|f| f.token));
    let res = match fence {
        Some(_) => res.bind(rep.outcome == Outcome::Ok),
        None => res,
    }
    .execute(&mut **conn)
    .await;
    stats.round_trip();
    if conn.check(res)?.rows_affected() == 0 {
        return Err(PassError::LeaseLost);
    }
    Ok(())
}
