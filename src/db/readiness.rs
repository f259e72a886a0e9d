//! A periodic probe that checks the database is reachable *and writable* (not a standby, not
//! `default_transaction_read_only`), and publishes the result in atomics the observability
//! thread reads for `/readyz`, without doing I/O on that thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::DbPool;

/// Last outcome of the writability probe.
#[derive(Debug, Default)]
pub struct DbReadiness {
    writable: AtomicBool,
    checked_at_ms: AtomicU64,
    took_us: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl DbReadiness {
    /// Whether the last probe, no older than `max_age`, found the database writable; otherwise
    /// the reason it is not ready.
    pub fn status(&self, max_age: Duration) -> Result<(), String> {
        let checked = self.checked_at_ms.load(Ordering::Acquire);
        if checked == 0 {
            return Err("database not checked yet".into());
        }
        let age = now_ms().saturating_sub(checked);
        if age > max_age.as_millis() as u64 {
            return Err(format!(
                "last database check is {:.1} s old",
                age as f64 / 1000.0
            ));
        }
        if self.writable.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "database not writable".into()))
        }
    }

    /// How long the last check took, seconds (`None` before the first).
    pub fn last_check_seconds(&self) -> Option<f64> {
        (self.checked_at_ms.load(Ordering::Acquire) != 0)
            .then(|| self.took_us.load(Ordering::Acquire) as f64 / 1e6)
    }

    /// Records one check's outcome and how long it took.
    pub(crate) fn record_timed(&self, res: Result<(), String>, took: Duration) {
        self.took_us
            .store(took.as_micros() as u64, Ordering::Release);
        self.record(res);
    }

    fn record(&self, res: Result<(), String>) {
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

/// One probe: acquire (labelled `readiness_probe`) and ask the server whether it accepts writes.
///
/// # Errors
/// A human-readable reason (never containing the URL).
pub async fn probe_once(pool: &DbPool) -> Result<(), String> {
    let mut conn = pool
        .acquire("readiness_probe")
        .await
        .map_err(|e| e.to_string())?;
    let res = sqlx::query_scalar::<_, bool>(
        "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'",
    )
    .fetch_one(&mut *conn)
    .await;
    match conn.check(res) {
        Ok(true) => Ok(()),
        Ok(false) => Err("database is read-only (standby or transaction_read_only)".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs [`probe_once`] every `interval` (bounded by `interval` too) until `cancel`.
pub async fn run_probe(
    pool: DbPool,
    state: Arc<DbReadiness>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let res = match tokio::time::timeout(interval, probe_once(&pool)).await {
            Ok(r) => r,
            Err(_) => Err(format!("database check took longer than {interval:?}")),
        };
        state.record(res);
    }
}
