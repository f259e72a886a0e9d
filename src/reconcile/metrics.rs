//! Metric families of the reconcile worker.

use prometheus::{GaugeVec, HistogramVec, IntCounterVec, Registry};

use crate::metrics::{self, DURATION_BUCKETS_SECONDS};

/// The reconcile families. Labels: `node` (config names), `outcome`, `phase`, `reason`: all
/// bounded sets.
#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    pub(crate) runs: IntCounterVec,
    pub(crate) phase_duration: HistogramVec,
    pub(crate) orphans: IntCounterVec,
    pub(crate) missing: IntCounterVec,
    pub(crate) removed: IntCounterVec,
    pub(crate) readded: IntCounterVec,
    pub(crate) last_success: GaugeVec,
    pub(crate) guard_trips: IntCounterVec,
    pub(crate) unmatched_markers: GaugeVec,
}

impl ReconcileMetrics {
    /// Registers the families into `registry`.
    pub fn register(registry: &Registry) -> Self {
        Self {
            runs: metrics::counter_vec(
                registry,
                "vpnbot_reconcile_runs_total",
                "Reconcile runs per node by outcome (ok, failed, timeout, guarded, dry_run).",
                &["node", "outcome"],
            ),
            phase_duration: metrics::histogram_vec(
                registry,
                "vpnbot_reconcile_phase_duration_seconds",
                "Duration of each reconcile phase (snapshot, list, diff, recheck, guard, act, record) per node.",
                &["node", "phase"],
                DURATION_BUCKETS_SECONDS,
            ),
            orphans: metrics::counter_vec(
                registry,
                "vpnbot_reconcile_orphans_total",
                "Owned users found on a node without a live subscription (before the re-check).",
                &["node"],
            ),
            missing: metrics::counter_vec(
                registry,
                "vpnbot_reconcile_missing_total",
                "Live subscriptions found missing on their node (before the re-check).",
                &["node"],
            ),
            removed: metrics::counter_vec(
                registry,
                "vpnbot_reconcile_removed_total",
                "Removals the reconcile handed to the outbox (applied by the outbox worker).",
                &["node"],
            ),
            readded: metrics::counter_vec(
                registry,
                "vpnbot_reconcile_readded_total",
                "Re-adds of missing live users the reconcile handed to the outbox.",
                &["node"],
            ),
            last_success: metrics::gauge_vec(
                registry,
                "vpnbot_reconcile_last_success_timestamp_seconds",
                "Unix time of the last reconcile run of a node that ended ok.",
                &["node"],
            ),
            guard_trips: metrics::counter_vec(
                registry,
                "vpnbot_reconcile_guard_trips_total",
                "Runs the safety guard stopped from removing anything, by reason (remove_share, remove_count, db_empty).",
                &["node", "reason"],
            ),
            unmatched_markers: metrics::gauge_vec(
                registry,
                "vpnbot_reconcile_unmatched_markers",
                "Users on a node whose email looks like vpnbot's ownership marker but is not the marker of their own UUID, at the last run that read the node (never removed; non-zero means expired users may stay).",
                &["node"],
            ),
        }
    }
}
