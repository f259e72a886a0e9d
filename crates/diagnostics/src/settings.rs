//! The `[diagnostics]` config section: intervals, thresholds, dump directory, exit policy and
//! tokio-console. Every field has a documented default constant.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default interval between runtime and task metric samples: 1 s.
pub const DEFAULT_RUNTIME_METRICS_INTERVAL_SECONDS: f64 = 1.0;
/// Default wake interval of the in-runtime scheduler-lag probe: 100 ms.
pub const DEFAULT_LAG_PROBE_INTERVAL_SECONDS: f64 = 0.1;
/// Default period of the watchdog OS thread: 100 ms.
pub const DEFAULT_WATCHDOG_PERIOD_SECONDS: f64 = 0.1;
/// Default stall threshold (one poll too long, heartbeat too old): 1 s.
pub const DEFAULT_STALL_THRESHOLD_SECONDS: f64 = 1.0;
/// Default grace past an operation's own deadline before it counts as overdue: 1 s.
pub const DEFAULT_OPERATION_GRACE_SECONDS: f64 = 1.0;
/// Default age after which a tracked operation *without* a deadline counts as overdue: 300 s.
pub const DEFAULT_OPERATION_MAX_AGE_SECONDS: f64 = 300.0;
/// Default time pool waiters may wait with no successful acquire before `pool_starved`: 5 s.
pub const DEFAULT_POOL_STARVED_SECONDS: f64 = 5.0;
/// Default factor: a periodic worker is overdue after this many of its intervals without a run.
pub const DEFAULT_WORKER_OVERDUE_FACTOR: f64 = 3.0;
/// Default directory for dump files.
pub const DEFAULT_DUMP_DIR: &str = "dumps";
/// Default number of dump files kept in the dump directory (oldest removed first).
pub const DEFAULT_DUMP_MAX_FILES: usize = 20;
/// Default minimum time between two episode dumps of the same or lower severity: 10 s.
pub const DEFAULT_DUMP_MIN_INTERVAL_SECONDS: f64 = 10.0;
/// Default deadline, enforced from an OS thread, for tokio's async task dump: 2 s.
pub const DEFAULT_TASK_DUMP_TIMEOUT_SECONDS: f64 = 2.0;
/// Default tokio-console listen address (loopback only).
pub const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:6669";
/// Default tokio-console retention of completed tasks: 60 s (keeps memory flat under churn).
pub const DEFAULT_CONSOLE_RETENTION_SECONDS: f64 = 60.0;
/// Process exit code used by the exit-after-stall policy, distinct from config (64) and
/// panic (101) exits so a supervisor can tell a restart for a stall apart.
pub const STALL_EXIT_CODE: i32 = 86;

/// Settings of the runtime diagnostics (config section `[diagnostics]`).
///
/// All `_seconds` fields are seconds as `f64`; see the `DEFAULT_*` constants for defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiagnosticsSettings {
    /// Interval between runtime/task metric samples (default 1 s).
    pub runtime_metrics_interval_seconds: f64,
    /// Wake interval of the scheduler-lag probe (default 100 ms).
    pub lag_probe_interval_seconds: f64,
    /// Period of the watchdog thread (default 100 ms).
    pub watchdog_period_seconds: f64,
    /// A poll longer than this is `blocked_worker`; a heartbeat older than this with the
    /// spawned probe unanswered is `runtime_stalled` (default 1 s).
    pub stall_threshold_seconds: f64,
    /// Grace past an entry's own deadline before `operation_overdue` (default 1 s).
    pub operation_grace_seconds: f64,
    /// Age at which a tracked operation without a deadline is overdue (default 300 s).
    /// Open spans without a deadline never count.
    pub operation_max_age_seconds: f64,
    /// `pool_starved` when waiters exist and no acquire succeeded for this long (default 5 s).
    pub pool_starved_seconds: f64,
    /// `worker_overdue` after this many intervals without a completed run (default 3).
    pub worker_overdue_factor: f64,
    /// Directory for dump files (created on demand; default `dumps`).
    pub dump_dir: PathBuf,
    /// Maximum number of dump files kept (default 20; 0 disables dump files).
    pub dump_max_files: usize,
    /// Minimum time between two episode dumps unless the new episode is more severe
    /// (default 10 s).
    pub dump_min_interval_seconds: f64,
    /// Deadline for tokio's async task dump, enforced from an OS thread (default 2 s).
    pub task_dump_timeout_seconds: f64,
    /// Include tokio's async task dump (`Handle::dump`) in dumps (default false).
    ///
    /// Off by default because of a tokio 1.54 defect (its task-dump start barrier keeps the
    /// arrival of a worker whose 250 ms wait timed out; fix proposed upstream in tokio pull
    /// request 8370): after a dump in which one worker joins more than 250 ms late, another
    /// worker stays waiting inside tokio until the next task dump, and with two workers a
    /// single blocked poll then stalls the whole runtime (`runtime_stalled`, issue 17). When
    /// on, a dump skips the task dump while a worker is inside a long poll, and after each task
    /// dump releases a worker left waiting with one more dump; a timed-out arrival with nobody
    /// waiting can still be left for the next dump to trip on.
    pub task_dumps: bool,
    /// Capture native stacks of blocked workers with a ptrace helper (default true).
    pub native_stacks: bool,
    /// Record tokio's per-poll time histogram (`vpnbot_runtime_poll_duration_seconds`).
    /// Default false: it reads the clock twice per poll and measured +160 ns per poll on a
    /// `yield_now` storm here, against +5..40 ns for the poll hooks. The mean poll time is
    /// exported either way.
    pub poll_time_histogram: bool,
    /// Exit the process with [`STALL_EXIT_CODE`] after the runtime has been totally stalled
    /// (`runtime_stalled`) for this long, after writing the dump. `None` (default) = never.
    pub exit_after_stall_seconds: Option<f64>,
    /// Attach console-subscriber (default false).
    pub console_enabled: bool,
    /// Console gRPC listen address (default 127.0.0.1:6669).
    pub console_listen: SocketAddr,
    /// Console retention of completed tasks (default 60 s).
    pub console_retention_seconds: f64,
}

impl Default for DiagnosticsSettings {
    fn default() -> Self {
        Self {
            runtime_metrics_interval_seconds: DEFAULT_RUNTIME_METRICS_INTERVAL_SECONDS,
            lag_probe_interval_seconds: DEFAULT_LAG_PROBE_INTERVAL_SECONDS,
            watchdog_period_seconds: DEFAULT_WATCHDOG_PERIOD_SECONDS,
            stall_threshold_seconds: DEFAULT_STALL_THRESHOLD_SECONDS,
            operation_grace_seconds: DEFAULT_OPERATION_GRACE_SECONDS,
            operation_max_age_seconds: DEFAULT_OPERATION_MAX_AGE_SECONDS,
            pool_starved_seconds: DEFAULT_POOL_STARVED_SECONDS,
            worker_overdue_factor: DEFAULT_WORKER_OVERDUE_FACTOR,
            dump_dir: PathBuf::from(DEFAULT_DUMP_DIR),
            dump_max_files: DEFAULT_DUMP_MAX_FILES,
            dump_min_interval_seconds: DEFAULT_DUMP_MIN_INTERVAL_SECONDS,
            task_dump_timeout_seconds: DEFAULT_TASK_DUMP_TIMEOUT_SECONDS,
            task_dumps: false,
            native_stacks: true,
            poll_time_histogram: false,
            exit_after_stall_seconds: None,
            console_enabled: false,
            console_listen: DEFAULT_CONSOLE_LISTEN
                .parse()
                .expect("valid default address"),
            console_retention_seconds: DEFAULT_CONSOLE_RETENTION_SECONDS,
        }
    }
}

fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0))
}

impl DiagnosticsSettings {
    /// Every problem with these settings, as `diagnostics.<field>: <reason>` lines; empty when
    /// valid.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let positive = [
            (
                "runtime_metrics_interval_seconds",
                self.runtime_metrics_interval_seconds,
            ),
            (
                "lag_probe_interval_seconds",
                self.lag_probe_interval_seconds,
            ),
            ("watchdog_period_seconds", self.watchdog_period_seconds),
            ("stall_threshold_seconds", self.stall_threshold_seconds),
            ("operation_max_age_seconds", self.operation_max_age_seconds),
            ("pool_starved_seconds", self.pool_starved_seconds),
            ("worker_overdue_factor", self.worker_overdue_factor),
            ("task_dump_timeout_seconds", self.task_dump_timeout_seconds),
            ("console_retention_seconds", self.console_retention_seconds),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                errors.push(format!(
                    "diagnostics.{name}: must be a positive number, got {v}"
                ));
            }
        }
        for (name, v) in [
            ("operation_grace_seconds", self.operation_grace_seconds),
            ("dump_min_interval_seconds", self.dump_min_interval_seconds),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                errors.push(format!("diagnostics.{name}: must be >= 0, got {v}"));
            }
        }
        if let Some(v) = self.exit_after_stall_seconds {
            if !(v.is_finite() && v > 0.0) {
                errors.push(format!(
                    "diagnostics.exit_after_stall_seconds: must be a positive number, got {v}"
                ));
            }
        }
        if self.watchdog_period_seconds.is_finite()
            && self.stall_threshold_seconds.is_finite()
            && self.watchdog_period_seconds * 2.0 > self.stall_threshold_seconds
        {
            errors.push(format!(
                "diagnostics.watchdog_period_seconds: {} must be at most half of \
                 stall_threshold_seconds ({})",
                self.watchdog_period_seconds, self.stall_threshold_seconds
            ));
        }
        if self.console_enabled && !self.console_listen.ip().is_loopback() {
            errors.push(format!(
                "diagnostics.console_listen: must be a loopback address, got {}",
                self.console_listen
            ));
        }
        errors
    }

    /// [`Self::runtime_metrics_interval_seconds`] as a `Duration`.
    pub fn runtime_metrics_interval(&self) -> Duration {
        secs(self.runtime_metrics_interval_seconds)
    }
    /// [`Self::lag_probe_interval_seconds`] as a `Duration`.
    pub fn lag_probe_interval(&self) -> Duration {
        secs(self.lag_probe_interval_seconds)
    }
    /// [`Self::watchdog_period_seconds`] as a `Duration`.
    pub fn watchdog_period(&self) -> Duration {
        secs(self.watchdog_period_seconds)
    }
    /// [`Self::stall_threshold_seconds`] as a `Duration`.
    pub fn stall_threshold(&self) -> Duration {
        secs(self.stall_threshold_seconds)
    }
    /// [`Self::task_dump_timeout_seconds`] as a `Duration`.
    pub fn task_dump_timeout(&self) -> Duration {
        secs(self.task_dump_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let s = DiagnosticsSettings::default();
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        let text = toml::to_string(&s).unwrap();
        let back: DiagnosticsSettings = toml::from_str(&text).unwrap();
        assert_eq!(
            back.stall_threshold_seconds,
            DEFAULT_STALL_THRESHOLD_SECONDS
        );
    }

    #[test]
    fn every_error_is_reported_and_unknown_fields_rejected() {
        let s = DiagnosticsSettings {
            stall_threshold_seconds: -1.0,
            watchdog_period_seconds: f64::NAN,
            exit_after_stall_seconds: Some(0.0),
            ..Default::default()
        };
        assert_eq!(s.validate().len(), 3, "{:?}", s.validate());
        assert!(toml::from_str::<DiagnosticsSettings>("bogus = 1").is_err());
    }
}
