//! What the server says when it will not open a connection while vpnbot runs (SQLSTATE 53300
//! too many connections, 28P01 auth, 57P03 starting up, connection refused, no answer), shared
//! by the pool, its connect probe and the leadership connection:
//!
//! - counted by kind in `vpnbot_db_connect_errors_total{kind}` (bounded, see
//!   [`ConnectErrorKind`]);
//! - logged with the SQLSTATE at `warn`, at most once per [`LOG_EVERY`] per kind (with the
//!   number of repeats left out);
//! - published for `/readyz` (readable from any thread, no I/O);
//! - for the pool, a back-off: while the server refuses, the pool opens no new connection
//!   except one probe per back-off period, and waiters take only connections that already
//!   exist (see [`super::DbPool::acquire`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Registry};
use tokio::sync::Notify;

use super::connect::{describe, ConnectErrorKind};
use super::readiness::DbNotReady;
use crate::metrics;

/// At most one warning per kind in this period; repeats are counted and reported with the next.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// First back-off after a refusal; doubles per refused probe up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest back-off between two probes while the server keeps refusing.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The last refusal, for `/readyz`.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Bounded kind.
    pub kind: ConnectErrorKind,
    /// The server's message with its SQLSTATE, or the socket error (never the URL).
    pub cause: String,
    /// Who saw it: `pool`, `probe` or `leader`.
    pub source: &'static str,
    /// When it was seen.
    pub at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    last: Option<Refusal>,
    backoff: Duration,
    backoff_until: Option<Instant>,
    probing: bool,
    last_probe: Option<Instant>,
    logged: HashMap<&'static str, (Option<Instant>, u64)>,
}

/// Connection failures seen while running, and the pool's back-off state.
#[derive(Debug)]
pub struct ConnectHealth {
    errors: IntCounterVec,
    refusing: AtomicBool,
    inner: Mutex<Inner>,
    /// Signalled when the refusing state changes (probe result, new refusal).
    pub(crate) changed: Notify,
}

impl ConnectHealth {
    /// Registers `vpnbot_db_connect_errors_total{kind}` with every kind at 0.
    pub fn register(registry: &Registry) -> ConnectHealth {
        let errors = metrics::counter_vec(
            registry,
            "vpnbot_db_connect_errors_total",
            "Connections the database server did not open, by kind (too_many_connections, auth_failed, starting_up, refused, timeout, other); pool, its probe and the leadership connection.",
            &["kind"],
        );
        for k in ConnectErrorKind::ALL {
            errors.with_label_values(&[k.as_str()]);
        }
        ConnectHealth {
            errors,
            refusing: AtomicBool::new(false),
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts and logs (rate-limited) one failed connection attempt; for `pool` and `probe`
    /// sources a refusal also starts or lengthens the pool's back-off. Returns its kind.
    pub fn record(&self, source: &'static str, e: &sqlx::Error) -> ConnectErrorKind {
        let kind = ConnectErrorKind::of(e);
        self.errors.with_label_values(&[kind.as_str()]).inc();
        let cause = describe(e);
        let sqlstate = e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        let now = Instant::now();
        let (log, repeats) = {
            let mut g = self.lock();
            g.last = Some(Refusal {
                kind,
                cause: cause.clone(),
                source,
                at: now,
            });
            if kind.is_refusal() && source != "leader" {
                g.backoff = (g.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                g.backoff_until = Some(now + g.backoff);
                self.refusing.store(true, Ordering::Release);
            }
            let entry = g.logged.entry(kind.as_str()).or_insert((None, 0));
            if entry.0.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
                let repeats = entry.1;
                *entry = (Some(now), 0);
                (true, repeats)
            } else {
                entry.1 += 1;
                (false, 0)
            }
        };
        if log {
            tracing::warn!(
                kind = kind.as_str(),
                sqlstate = sqlstate.as_deref(),
                source,
                repeats_not_logged = repeats,
                error = %cause,
                "database server did not open a connection"
            );
        }
        self.changed.notify_waiters();
        kind
    }

    /// A connection opened: the server accepts again, the back-off ends.
    pub fn record_ok(&self) {
        if self.refusing.swap(false, Ordering::AcqRel) {
            {
                let mut g = self.lock();
                g.backoff = Duration::ZERO;
                g.backoff_until = None;
            }
            tracing::info!("database server opens connections again; pool back-off ended");
            self.changed.notify_waiters();
        }
    }

    /// Whether the pool is backing off (the server refused the last attempt).
    pub fn refusing(&self) -> bool {
        self.refusing.load(Ordering::Acquire)
    }

    /// The last failure, if any.
    pub fn last(&self) -> Option<Refusal> {
        self.lock().last.clone()
    }

    /// When the current back-off ends (`None` when not backing off).
    pub fn backoff_until(&self) -> Option<Instant> {
        self.lock().backoff_until
    }

    /// Claims the one probe slot: `true` when no probe is running, none ran within
    /// `min_interval`, and (while backing off) the back-off has expired.
    pub(crate) fn claim_probe(&self, min_interval: Duration) -> bool {
        let now = Instant::now();
        let mut g = self.lock();
        if g.probing
            || g.last_probe
                .is_some_and(|t| now.duration_since(t) < min_interval)
            || g.backoff_until.is_some_and(|t| now < t)
        {
            return false;
        }
        g.probing = true;
        g.last_probe = Some(now);
        true
    }

    /// Releases the probe slot.
    pub(crate) fn probe_done(&self) {
        self.lock().probing = false;
        self.changed.notify_waiters();
    }

    /// For `/readyz`: whether the pool is free of a refusal seen within the last `window`.
    ///
    /// # Errors
    /// [`DbNotReady::Refusing`] while the pool backs off because the server refused a
    /// connection this instance needed within `window`.
    pub fn status(&self, window: Duration) -> Result<(), DbNotReady> {
        if !self.refusing() {
            return Ok(());
        }
        match self.last() {
            Some(r) if r.at.elapsed() > window => Ok(()),
            Some(r) => Err(DbNotReady::Refusing {
                kind: r.kind.as_str(),
                ago: r.at.elapsed(),
                cause: r.cause,
            }),
            None => Err(DbNotReady::Refusing {
                kind: "unknown",
                ago: Duration::ZERO,
                cause: "no refusal recorded".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_backs_off_probes_once_per_period_and_ends_on_success() {
        let h = ConnectHealth::register(&crate::metrics::new_registry());
        assert!(h.status(Duration::from_secs(5)).is_ok());
        let refused = sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(h.record("pool", &refused), ConnectErrorKind::Refused);
        assert!(h.refusing());
        let why = h.status(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(
                why,
                DbNotReady::Refusing {
                    kind: "refused",
                    ..
                }
            ),
            "{why}"
        );
        // Within the back-off no probe may start; a stale refusal no longer makes it unready.
        assert!(!h.claim_probe(Duration::ZERO));
        assert!(h.status(Duration::ZERO).is_ok());
        std::thread::sleep(BACKOFF_MIN + Duration::from_millis(20));
        assert!(h.claim_probe(Duration::ZERO));
        assert!(!h.claim_probe(Duration::ZERO), "one probe at a time");
        h.probe_done();
        // The leader's refusals are counted but do not make the pool back off.
        h.record_ok();
        assert!(!h.refusing());
        h.record("leader", &refused);
        assert!(!h.refusing());
    }
}
