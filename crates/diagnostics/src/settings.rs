//! The `[diagnostics]` config section: intervals, thresholds, dump directory, exit policy and
//! tokio-console. Every field has a documented default constant.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default interval between runtime and task metric samples: 1 s.
pub const DEFAULT_RUNTIME_METRICS_INTERVAL_SECONDS: Duration = Duration::from_secs(1);
/// Default wake interval of the in-runtime scheduler-lag probe: 100 ms.
pub const DEFAULT_LAG_PROBE_INTERVAL_SECONDS: Duration = Duration::from_millis(100);
/// Default period of the watchdog OS thread: 100 ms.
pub const DEFAULT_WATCHDOG_PERIOD_SECONDS: Duration = Duration::from_millis(100);
/// Default stall threshold (one poll too long, heartbeat too old): 1 s.
pub const DEFAULT_STALL_THRESHOLD_SECONDS: Duration = Duration::from_secs(1);
/// Default grace past an operation's own deadline before it counts as overdue: 1 s.
pub const DEFAULT_OPERATION_GRACE_SECONDS: Duration = Duration::from_secs(1);
/// Default age after which a tracked operation *without* a deadline counts as overdue: 300 s.
pub const DEFAULT_OPERATION_MAX_AGE_SECONDS: Duration = Duration::from_secs(300);
/// Default time pool waiters may wait with no successful acquire before `pool_starved`: 5 s.
pub const DEFAULT_POOL_STARVED_SECONDS: Duration = Duration::from_secs(5);
/// Default factor: a periodic worker is overdue after this many of its intervals without a run.
pub const DEFAULT_WORKER_OVERDUE_FACTOR: f64 = 3.0;
/// Default directory for dump files.
pub const DEFAULT_DUMP_DIR: &str = "dumps";
/// Default number of dump files kept in the dump directory (oldest removed first).
pub const DEFAULT_DUMP_MAX_FILES: usize = 20;
/// Default minimum time between two episode dumps of the same or lower severity: 10 s.
pub const DEFAULT_DUMP_MIN_INTERVAL_SECONDS: Duration = Duration::from_secs(10);
/// Default deadline, enforced from an OS thread, for tokio's async task dump: 2 s.
pub const DEFAULT_TASK_DUMP_TIMEOUT_SECONDS: Duration = Duration::from_secs(2);
/// Default tokio-console listen address (loopback only).
pub const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:6669";
/// Default tokio-console retention of completed tasks: 60 s (keeps memory flat under churn).
pub const DEFAULT_CONSOLE_RETENTION_SECONDS: Duration = Duration::from_secs(60);
/// Process exit code used by the exit-after-stall policy, distinct from config (64) and
/// panic (101) exits so a supervisor can tell a restart for a stall apart.
pub const STALL_EXIT_CODE: i32 = 86;

/// Settings of the runtime diagnostics (config section `[diagnostics]`).
///
/// `_seconds` fields are durations written as seconds ([`crate::seconds`]: parsed and range-checked
/// once, at load); see the `DEFAULT_*` constants for defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiagnosticsSettings {
    /// Interval between runtime/task metric samples (default 1 s).
    #[serde(with = "crate::seconds")]
    pub runtime_metrics_interval_seconds: Duration,
    /// Wake interval of the scheduler-lag probe (default 100 ms).
    #[serde(with = "crate::seconds")]
    pub lag_probe_interval_seconds: Duration,
    /// Period of the watchdog thread (default 100 ms).
    #[serde(with = "crate::seconds")]
    pub watchdog_period_seconds: Duration,
    /// A poll longer than this is `blocked_worker`; a heartbeat older than this with the
    /// spawned probe unanswered is `runtime_stalled` (default 1 s).
    #[serde(with = "crate::seconds")]
    pub stall_threshold_seconds: Duration,
    /// Grace past an entry's own deadline before `operation_overdue` (default 1 s).
    #[serde(with = "crate::seconds")]
    pub operation_grace_seconds: Duration,
    /// Age at which a tracked operation without a deadline is overdue (default 300 s).
    /// Open spans without a deadline never count.
    #[serde(with = "crate::seconds")]
    pub operation_max_age_seconds: Duration,
    /// `pool_starved` when waiters exist and no acquire succeeded for this long (default 5 s).
    #[serde(with = "crate::seconds")]
    pub pool_starved_seconds: Duration,
    /// `worker_overdue` after this many intervals without a completed run (default 3).
    pub worker_overdue_factor: f64,
    /// Directory for dump files (created on demand; default `dumps`).
    pub dump_dir: PathBuf,
    /// Maximum number of dump files kept (default 20; 0 disables dump files).
    pub dump_max_files: usize,
    /// Minimum time between two episode dumps unless the new episode is more severe
    /// (default 10 s).
    #[serde(with = "crate::seconds")]
    pub dump_min_interval_seconds: Duration,
    /// Deadline for tokio's async task dump, enforced from an OS thread (default 2 s).
    #[serde(with = "crate::seconds")]
    pub task_dump_timeout_seconds: Duration,
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
    /// With `native_stacks`, load the binary's symbol tables at start-up on a background
    /// thread (default true), so the first dump in a stall is not delayed by it (0.14-0.19 s
    /// for a release build, 1.0-1.6 s for a debug build, several times that under load). It
    /// costs the anonymous memory the first capture would take anyway (measured here with
    /// `crates/devtools/examples/stack_capture.rs`: 56 MB for a 24 MB release binary, 68 MB
    /// for a 90 MB debug one); `false` defers it to the first capture.
    pub preload_symbols: bool,
    /// Record tokio's per-poll time histogram (`vpnbot_runtime_poll_duration_seconds`).
    /// Default false: it reads the clock twice per poll and measured +160 ns per poll on a
    /// `yield_now` storm here, against +5..40 ns for the poll hooks. The mean poll time is
    /// exported either way.
    pub poll_time_histogram: bool,
    /// Exit the process with [`STALL_EXIT_CODE`] after the runtime has been totally stalled
    /// (`runtime_stalled`) for this long, after writing the dump. `None` (default) = never.
    #[serde(default, with = "crate::seconds::option")]
    pub exit_after_stall_seconds: Option<Duration>,
    /// Attach console-subscriber (default false).
    pub console_enabled: bool,
    /// Console gRPC listen address (default 127.0.0.1:6669).
    pub console_listen: SocketAddr,
    /// Console retention of completed tasks (default 60 s).
    #[serde(with = "crate::seconds")]
    pub console_retention_seconds: Duration,
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
            preload_symbols: true,
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
            ("task_dump_timeout_seconds", self.task_dump_timeout_seconds),
            ("console_retention_seconds", self.console_retention_seconds),
        ]
        .into_iter()
        .chain(
            self.exit_after_stall_seconds
                .map(|v| ("exit_after_stall_seconds", v)),
        );
        for (name, v) in positive {
            if v.is_zero() {
                errors.push(format!(
                    "diagnostics.{name}: must be a positive number of seconds, got 0"
                ));
            }
        }
        let factor = self.worker_overdue_factor;
        if !(factor.is_finite() && factor > 0.0 && factor <= 1e6) {
            errors.push(format!(
                "diagnostics.worker_overdue_factor: must be a positive number up to 1e6, got {factor}"
            ));
        }
        if self.watchdog_period_seconds * 2 > self.stall_threshold_seconds {
            errors.push(format!(
                "diagnostics.watchdog_period_seconds: {} must be at most half of \
                 stall_threshold_seconds ({})",
                self.watchdog_period_seconds.as_secs_f64(),
                self.stall_threshold_seconds.as_secs_f64()
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

    /// The shortest service-manager watchdog timeout (systemd's `WatchdogSec`) that still lets
    /// a total stall be detected and dumped before the kill: stall threshold + one watchdog
    /// period to see it + the task dump deadline + 1 s for native stacks.
    pub fn min_service_watchdog(&self) -> Duration {
        self.stall_threshold_seconds
            + self.watchdog_period_seconds
            + self.task_dump_timeout_seconds
            + Duration::from_secs(1)
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
            stall_threshold_seconds: Duration::ZERO,
            watchdog_period_seconds: Duration::from_millis(100),
            exit_after_stall_seconds: Some(Duration::ZERO),
            worker_overdue_factor: f64::NAN,
            ..Default::default()
        };
        // Zero threshold, a period above half of it, zero exit delay, a NaN factor.
        assert_eq!(s.validate().len(), 4, "{:?}", s.validate());
        assert!(toml::from_str::<DiagnosticsSettings>("stall_threshold_seconds = 1e30").is_err());
        let d: DiagnosticsSettings = toml::from_str("exit_after_stall_seconds = 2.5").unwrap();
        assert_eq!(
            d.exit_after_stall_seconds,
            Some(Duration::from_millis(2500))
        );
        assert!(toml::from_str::<DiagnosticsSettings>("bogus = 1").is_err());
    }
}
