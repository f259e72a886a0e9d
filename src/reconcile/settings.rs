//! `[reconcile]`: schedule, batch sizes, grace window and guard thresholds of the reconcile
//! worker. Every default is a named constant.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::seconds;

/// Default: the worker runs on the leader.
pub const DEFAULT_ENABLED: bool = true;
/// Default interval between runs, seconds (the predecessor's 600 s).
pub const DEFAULT_INTERVAL_SECONDS: f64 = 600.0;
/// Default jitter: each interval is stretched or shrunk by up to this share (±10 %).
pub const DEFAULT_JITTER_SHARE: f64 = 0.1;
/// Default bound on one whole run (every node), seconds. A node still running then is
/// cancelled and recorded as `timeout`.
pub const DEFAULT_ITERATION_TIMEOUT_SECONDS: f64 = 120.0;
/// Default rows per keyset batch of the snapshot; a pooled connection is held per batch only.
pub const DEFAULT_BATCH_SIZE: u32 = 10_000;
/// Default UUIDs per batched re-check and per outbox insert.
pub const DEFAULT_RECHECK_BATCH_SIZE: u32 = 10_000;
/// Default nodes reconciled at once.
pub const DEFAULT_NODE_CONCURRENCY: usize = 4;
/// Default grace window, seconds: a subscription created or updated this long before the
/// snapshot (or any time after it) is never removed by this run.
pub const DEFAULT_GRACE_SECONDS: f64 = 300.0;
/// Default guard: a run that would remove more than this share of a node's owned users removes
/// nothing.
pub const DEFAULT_GUARD_MAX_REMOVE_SHARE: f64 = 0.2;
/// Default guard: a run that would remove more than this many users of one node removes nothing.
pub const DEFAULT_GUARD_MAX_REMOVE_COUNT: u64 = 25_000;
/// Default: the share guard applies only when more than this many removals are planned, so a
/// node with a handful of users can still lose its one stale user.
pub const DEFAULT_GUARD_SHARE_MIN_REMOVALS: u64 = 10;
/// Default: live subscriptions missing on their node are re-added through the outbox.
pub const DEFAULT_READD_MISSING: bool = true;
pub use super::lease::{DEFAULT_LEASE_DURATION_SECONDS, DEFAULT_LEASE_RENEW_INTERVAL_SECONDS};

/// `[reconcile]`: the reconcile worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileSettings {
    /// Run the periodic worker (every instance, nodes split by lease; default
    /// [`DEFAULT_ENABLED`]). `vpnbot reconcile --once` works either way.
    pub enabled: bool,
    /// Interval between run starts, written in seconds (default [`DEFAULT_INTERVAL_SECONDS`]).
    #[serde(with = "seconds")]
    pub interval_seconds: Duration,
    /// Share of the interval added or removed at random, 0 to 0.5 (default
    /// [`DEFAULT_JITTER_SHARE`]).
    pub jitter_share: f64,
    /// Bound on one run, written in seconds; at most `interval_seconds` (default
    /// [`DEFAULT_ITERATION_TIMEOUT_SECONDS`]).
    #[serde(with = "seconds")]
    pub iteration_timeout_seconds: Duration,
    /// Rows per snapshot batch (default [`DEFAULT_BATCH_SIZE`]).
    pub batch_size: u32,
    /// UUIDs per re-check query and per outbox insert (default [`DEFAULT_RECHECK_BATCH_SIZE`]).
    pub recheck_batch_size: u32,
    /// Nodes reconciled at once (default [`DEFAULT_NODE_CONCURRENCY`]).
    pub node_concurrency: usize,
    /// Grace window, written in seconds (default [`DEFAULT_GRACE_SECONDS`]).
    #[serde(with = "seconds")]
    pub grace_seconds: Duration,
    /// Largest share of a node's owned users one run may remove, 0 to 1 (default
    /// [`DEFAULT_GUARD_MAX_REMOVE_SHARE`]).
    pub guard_max_remove_share: f64,
    /// Largest number of users one run may remove from one node (default
    /// [`DEFAULT_GUARD_MAX_REMOVE_COUNT`]).
    pub guard_max_remove_count: u64,
    /// Planned removals at or below this count never trip the share guard (default
    /// [`DEFAULT_GUARD_SHARE_MIN_REMOVALS`]).
    pub guard_share_min_removals: u64,
    /// Re-add live subscriptions missing on their node (default [`DEFAULT_READD_MISSING`]).
    pub readd_missing: bool,
    /// How long a node's reconcile lease lasts without renewal, written in seconds (default
    /// [`DEFAULT_LEASE_DURATION_SECONDS`]); at least twice `lease_renew_interval_seconds`.
    #[serde(with = "seconds")]
    pub lease_duration_seconds: Duration,
    /// Interval between lease renewals and takeover attempts (and instance heartbeats),
    /// written in seconds (default [`DEFAULT_LEASE_RENEW_INTERVAL_SECONDS`]). A dead instance's
    /// nodes get a new holder within `lease_duration_seconds + lease_renew_interval_seconds`.
    #[serde(with = "seconds")]
    pub lease_renew_interval_seconds: Duration,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            enabled: DEFAULT_ENABLED,
            interval_seconds: Duration::from_secs_f64(DEFAULT_INTERVAL_SECONDS),
            jitter_share: DEFAULT_JITTER_SHARE,
            iteration_timeout_seconds: Duration::from_secs_f64(DEFAULT_ITERATION_TIMEOUT_SECONDS),
            batch_size: DEFAULT_BATCH_SIZE,
            recheck_batch_size: DEFAULT_RECHECK_BATCH_SIZE,
            node_concurrency: DEFAULT_NODE_CONCURRENCY,
            grace_seconds: Duration::from_secs_f64(DEFAULT_GRACE_SECONDS),
            guard_max_remove_share: DEFAULT_GUARD_MAX_REMOVE_SHARE,
            guard_max_remove_count: DEFAULT_GUARD_MAX_REMOVE_COUNT,
            guard_share_min_removals: DEFAULT_GUARD_SHARE_MIN_REMOVALS,
            readd_missing: DEFAULT_READD_MISSING,
            lease_duration_seconds: Duration::from_secs_f64(DEFAULT_LEASE_DURATION_SECONDS),
            lease_renew_interval_seconds: Duration::from_secs_f64(
                DEFAULT_LEASE_RENEW_INTERVAL_SECONDS,
            ),
        }
    }
}

impl ReconcileSettings {
    /// Every problem, each naming its key; empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        // Negative, NaN and out-of-range values are refused while parsing (config::seconds).
        for (k, v) in [
            ("interval_seconds", self.interval_seconds),
            ("iteration_timeout_seconds", self.iteration_timeout_seconds),
            ("lease_duration_seconds", self.lease_duration_seconds),
            (
                "lease_renew_interval_seconds",
                self.lease_renew_interval_seconds,
            ),
        ] {
            if v.is_zero() {
                e.push(format!(
                    "reconcile.{k} must be a positive number of seconds, got 0"
                ));
            }
        }
        if self.iteration_timeout_seconds > self.interval_seconds {
            e.push(format!(
                "reconcile.iteration_timeout_seconds ({}) must not exceed interval_seconds ({}), \
                 or a slow run would delay the next one",
                self.iteration_timeout_seconds.as_secs_f64(),
                self.interval_seconds.as_secs_f64()
            ));
        }
        if !(0.0..=0.5).contains(&self.jitter_share) {
            e.push(format!(
                "reconcile.jitter_share must be between 0 and 0.5, got {}",
                self.jitter_share
            ));
        }
        if !(0.0..=1.0).contains(&self.guard_max_remove_share) {
            e.push(format!(
                "reconcile.guard_max_remove_share must be between 0 and 1, got {}",
                self.guard_max_remove_share
            ));
        }
        if !self.lease_renew_interval_seconds.is_zero()
            && self.lease_duration_seconds < self.lease_renew_interval_seconds * 2
        {
            e.push(format!(
                "reconcile.lease_duration_seconds ({}) must be at least twice \
                 lease_renew_interval_seconds ({}), or one late renewal would lose every lease",
                self.lease_duration_seconds.as_secs_f64(),
                self.lease_renew_interval_seconds.as_secs_f64()
            ));
        }
        if self.batch_size == 0 {
            e.push("reconcile.batch_size must be at least 1".into());
        }
        if self.recheck_batch_size == 0 {
            e.push("reconcile.recheck_batch_size must be at least 1".into());
        }
        if self.node_concurrency == 0 {
            e.push("reconcile.node_concurrency must be at least 1".into());
        }
        e
    }

    /// The interval to the next run start, with jitter applied.
    pub fn jittered_interval(&self) -> Duration {
        let j = self.jitter_share.clamp(0.0, 0.5);
        let f = if j > 0.0 {
            rand::random_range(1.0 - j..=1.0 + j)
        } else {
            1.0
        };
        self.interval_seconds.mul_f64(f)
    }

    /// The bound on a node having no live lease holder after its holder died:
    /// `lease_duration_seconds + lease_renew_interval_seconds` (see [`super::lease`]).
    pub fn lease_takeover_bound(&self) -> Duration {
        self.lease_duration_seconds + self.lease_renew_interval_seconds
    }

    /// Longest normal gap between two completed runs: the longest jittered interval plus one
    /// iteration timeout. A worker whose last completed run is older is overdue.
    pub fn overdue_after(&self) -> Duration {
        self.interval_seconds
            .mul_f64(1.0 + self.jitter_share.clamp(0.0, 0.5))
            + self.iteration_timeout_seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_timings_are_validated() {
        let ok = ReconcileSettings::default();
        assert!(ok.validate().is_empty(), "{:?}", ok.validate());
        assert_eq!(ok.lease_takeover_bound(), Duration::from_secs(40));

        let short = ReconcileSettings {
            lease_duration_seconds: Duration::from_secs(15),
            lease_renew_interval_seconds: Duration::from_secs(10),
            ..Default::default()
        };
        let e = short.validate();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("reconcile.lease_duration_seconds (15) must be at least twice"),
            "{e:?}"
        );

        let zero = ReconcileSettings {
            lease_renew_interval_seconds: Duration::ZERO,
            ..Default::default()
        };
        let e = zero.validate();
        assert_eq!(
            e,
            vec!["reconcile.lease_renew_interval_seconds must be a positive number of seconds, got 0"]
        );
    }

    #[test]
    fn outbox_claim_must_outlast_a_node_call() {
        let mut cfg = crate::config::Config::default();
        cfg.outbox.claim_seconds = Duration::from_secs(10);
        let e = cfg.validate();
        assert!(
            e.iter().any(|p| p.starts_with(
                "outbox.claim_seconds (10) must exceed node_client.total_deadline_seconds (10)"
            )),
            "{e:?}"
        );
        cfg.outbox.claim_seconds = Duration::from_secs(11);
        assert!(
            !cfg.validate().iter().any(|p| p.contains("claim_seconds")),
            "{:?}",
            cfg.validate()
        );
    }
}
