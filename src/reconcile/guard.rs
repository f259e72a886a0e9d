//! Phase 5, guard: refuses a run whose removals look like a broken input rather than real
//! churn (a partial node list, an empty or wrong database, FAULTS.md S2).

use serde::Serialize;

use super::ReconcileSettings;

/// Why the guard stopped removals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardReason {
    /// More than `guard_max_remove_share` of the node's owned users would go.
    RemoveShare,
    /// More than `guard_max_remove_count` users would go.
    RemoveCount,
    /// The database has no active subscription for the node while the node has owned users.
    DbEmpty,
}

impl GuardReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardReason::RemoveShare => "remove_share",
            GuardReason::RemoveCount => "remove_count",
            GuardReason::DbEmpty => "db_empty",
        }
    }
}

/// A tripped guard: the reason and the figures behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuardTrip {
    /// Why.
    pub reason: GuardReason,
    /// Human-readable figures, e.g. `would remove 8 of 10 owned users (80.0 %), limit 20.0 %`.
    pub detail: String,
}

/// Checks planned removals against the thresholds.
pub(crate) fn check(
    s: &ReconcileSettings,
    db_live: u64,
    node_owned: u64,
    to_remove: u64,
) -> Option<GuardTrip> {
    if db_live == 0 && node_owned > 0 && to_remove > 0 {
        return Some(GuardTrip {
            reason: GuardReason::DbEmpty,
            detail: format!(
                "the database lists no active subscription for this node, which has {node_owned} owned users"
            ),
        });
    }
    if to_remove > s.guard_max_remove_count {
        return Some(GuardTrip {
            reason: GuardReason::RemoveCount,
            detail: format!(
                "would remove {to_remove} users, limit {}",
                s.guard_max_remove_count
            ),
        });
    }
    let share = if node_owned == 0 {
        0.0
    } else {
        to_remove as f64 / node_owned as f64
    };
    if to_remove > s.guard_share_min_removals && share > s.guard_max_remove_share {
        return Some(GuardTrip {
            reason: GuardReason::RemoveShare,
            detail: format!(
                "would remove {to_remove} of {node_owned} owned users ({:.1} %), limit {:.1} %",
                share * 100.0,
                s.guard_max_remove_share * 100.0
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let s = ReconcileSettings::default();
        assert_eq!(check(&s, 100, 100, 5), None, "few removals pass");
        assert_eq!(check(&s, 100, 100, 20), None, "exactly 20 % passes");
        assert_eq!(
            check(&s, 100, 100, 21).map(|g| g.reason),
            Some(GuardReason::RemoveShare)
        );
        assert_eq!(check(&s, 1, 3, 2), None, "below the share floor");
        assert_eq!(
            check(&s, 0, 3, 1).map(|g| g.reason),
            Some(GuardReason::DbEmpty)
        );
        assert_eq!(
            check(&s, 10_000_000, 10_000_000, 25_001).map(|g| g.reason),
            Some(GuardReason::RemoveCount)
        );
    }
}
