//! Whether the database is reachable *and writable* (not a standby, not
//! `default_transaction_read_only`), as last checked by the database monitor (its ping is the
//! check, see [`super::monitor`]), published in cells the observability thread reads for
//! `/readyz` without doing I/O on that thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why `/readyz` does not count the database as usable right now. Its text is the `db` or
/// `db_connect` field of `/readyz`; none carries a URL or password.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DbNotReady {
    /// No check has finished since the process started.
    #[error("database not checked yet")]
    NotChecked,
    /// The last finished check is older than `/readyz` trusts.
    #[error("last database check is {:.1} s old", .0.as_secs_f64())]
    Stale(Duration),
    /// The server is a standby or its sessions are read-only.
    #[error("database is read-only (standby or transaction_read_only)")]
    ReadOnly,
    /// The check could not run or failed: the database error's description (URL-free).
    #[error("database check failed: {0}")]
    CheckFailed(String),
    /// The server refused a connection this instance needed (the pool backs off).
    #[error("database refuses new connections ({kind}, {:.1} s ago): {cause}", .ago.as_secs_f64())]
    Refusing {
        /// The refusal's kind (`too_many_connections`, `refused`, ...).
        kind: &'static str,
        /// How long ago the last refusal was seen.
        ago: Duration,
        /// The server's or the socket's own words.
        cause: String,
    },
}

/// Last outcome of the writability probe.
#[derive(Debug, Default)]
pub struct DbReadiness {
    writable: AtomicBool,
    checked_at_ms: AtomicU64,
    took_us: AtomicU64,
    last_error: Mutex<Option<DbNotReady>>,
}

impl DbReadiness {
    /// Whether the last probe, no older than `max_age`, found the database writable; otherwise
    /// the reason it is not ready.
    ///
    /// # Errors
    /// [`DbNotReady`]: not checked yet, a check older than `max_age`, or the last check's
    /// failure.
    pub fn status(&self, max_age: Duration) -> Result<(), DbNotReady> {
        let checked = self.checked_at_ms.load(Ordering::Acquire);
        if checked == 0 {
            return Err(DbNotReady::NotChecked);
        }
        let age = now_ms().saturating_sub(checked);
        if age > max_age.as_millis() as u64 {
            return Err(DbNotReady::Stale(Duration::from_millis(age)));
        }
        if self.writable.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or(DbNotReady::ReadOnly))
        }
    }

    /// How long the last check took, seconds (`None` before the first).
    pub fn last_check_seconds(&self) -> Option<f64> {
        (self.checked_at_ms.load(Ordering::Acquire) != 0)
            .then(|| self.took_us.load(Ordering::Acquire) as f64 / 1e6)
    }

    /// Records one check's outcome and how long it took.
    pub(crate) fn record_timed(&self, res: Result<(), DbNotReady>, took: Duration) {
        self.took_us
            .store(took.as_micros() as u64, Ordering::Release);
        self.record(res);
    }

    fn record(&self, res: Result<(), DbNotReady>) {
        let ok = res.is_ok();
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = res.err();
        self.writable.store(ok, Ordering::Release);
        self.checked_at_ms.store(now_ms(), Ordering::Release);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
