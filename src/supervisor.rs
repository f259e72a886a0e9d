//! The service manager's notification protocol (`sd_notify(3)`, systemd `Type=notify`), through
//! the `sd-notify` crate.
//!
//! - `READY=1` once migrations are applied, leadership is set up and the observability server
//!   listens ([`crate::app::App::start_with`]);
//! - `STATUS=` lines saying what the instance does (leader or follower, last reconcile);
//! - `STOPPING=1` when the drain starts;
//! - `WATCHDOG=1` from the watchdog OS thread only, and only while the main runtime makes
//!   progress (no open `runtime_stalled` episode), at half of `WATCHDOG_USEC`. A total stall
//!   stops the pings at the same tick that opens the episode and asks for its dump, so systemd
//!   kills and restarts the process `WatchdogSec` later with the dump already written.
//!
//! Without `NOTIFY_SOCKET` in the environment every call is a no-op. `READY`, `STATUS` and
//! `STOPPING` are sent from a small OS thread (`vpnbot-notify`), so a runtime worker never
//! waits on the socket.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Environment variable naming the service manager's datagram socket.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

enum Message {
    Ready(String),
    Status(String),
    Stopping(String),
}

#[derive(Debug)]
struct Shared {
    tx: mpsc::Sender<Message>,
    watchdog_interval: Option<Duration>,
    last_ping: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Message::Ready(_) => "Ready",
            Message::Status(_) => "Status",
            Message::Stopping(_) => "Stopping",
        })
    }
}

/// A handle on the service manager, cheap to clone. Disabled (every call a no-op) when the
/// process was not started with `NOTIFY_SOCKET`.
#[derive(Debug, Clone, Default)]
pub struct Supervisor {
    shared: Option<Arc<Shared>>,
}

impl Supervisor {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honouring `WATCHDOG_PID`) once, and starts the
    /// `vpnbot-notify` thread when a socket is named.
    ///
    /// # Panics
    /// When the OS refuses to create the notify thread.
    pub fn from_env() -> Supervisor {
        if std::env::var_os(NOTIFY_SOCKET_ENV).is_none() {
            return Supervisor::default();
        }
        let watchdog_interval = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        let (tx, rx) = mpsc::channel::<Message>();
        std::thread::Builder::new()
            .name("vpnbot-notify".into())
            .spawn(move || {
                while let Ok(m) = rx.recv() {
                    let res = match &m {
                        Message::Ready(s) => {
                            sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(s)])
                        }
                        Message::Status(s) => sd_notify::notify(&[NotifyState::Status(s)]),
                        Message::Stopping(s) => {
                            sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(s)])
                        }
                    };
                    if let Err(e) = res {
                        tracing::warn!(error = %e, message = ?m, "service manager notification failed");
                    }
                }
            })
            .expect("spawning the notify thread");
        Supervisor {
            shared: Some(Arc::new(Shared {
                tx,
                watchdog_interval,
                last_ping: Mutex::new(None),
            })),
        }
    }

    /// Whether a service manager listens (`NOTIFY_SOCKET` was set).
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// The watchdog timeout the service manager enforces (`WATCHDOG_USEC`), if any.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.shared.as_ref().and_then(|s| s.watchdog_interval)
    }

    fn send(&self, m: Message) {
        if let Some(s) = &self.shared {
            let _ = s.tx.send(m);
        }
    }

    /// `READY=1` with a `STATUS=` line: start-up is complete.
    pub fn ready(&self, status: &str) {
        self.send(Message::Ready(one_line(status)));
    }

    /// A `STATUS=` line (shown by `systemctl status`).
    pub fn status(&self, status: &str) {
        self.send(Message::Status(one_line(status)));
    }

    /// `STOPPING=1` with a `STATUS=` line: the drain has started.
    pub fn stopping(&self, status: &str) {
        self.send(Message::Stopping(one_line(status)));
    }
}

/// A `STATUS=` value is one line of the datagram.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The `STATUS=` line for an instance: its role and the age of the last completed reconcile.
pub fn status_line(
    leader: bool,
    leadership_failing: bool,
    last_reconcile: Option<std::time::SystemTime>,
) -> String {
    let role = if leadership_failing {
        "leadership failing (see /readyz)"
    } else if leader {
        "leader"
    } else {
        "follower"
    };
    let reconcile = match last_reconcile.and_then(|t| t.elapsed().ok()) {
        Some(age) => format!("last reconcile {} s ago", age.as_secs()),
        None => "no reconcile completed here yet".to_string(),
    };
    format!("{role}; {reconcile}")
}

impl diagnostics::ProgressSink for Supervisor {
    /// Called by the watchdog OS thread on every tick with whether the main runtime makes
    /// progress. Sends `WATCHDOG=1` when it does and half the watchdog timeout has passed
    /// since the last ping; sends nothing while it does not. Blocking (one datagram): call it
    /// from that thread only, never from a runtime worker.
    fn watchdog_tick(&self, runtime_progressing: bool) {
        let Some(s) = &self.shared else { return };
        let Some(timeout) = s.watchdog_interval else {
            return;
        };
        if !runtime_progressing {
            return;
        }
        let mut last = s.last_ping.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < timeout / 2) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
            tracing::warn!(error = %e, "service manager watchdog ping failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_names_role_and_reconcile_age() {
        let t = std::time::SystemTime::now() - Duration::from_secs(12);
        assert_eq!(
            status_line(true, false, Some(t)),
            "leader; last reconcile 12 s ago"
        );
        assert_eq!(
            status_line(false, false, None),
            "follower; no reconcile completed here yet"
        );
        assert!(status_line(true, true, None).starts_with("leadership failing"));
    }

    #[test]
    fn disabled_without_socket_and_multiline_status_is_one_line() {
        assert!(!Supervisor::default().is_enabled());
        diagnostics::ProgressSink::watchdog_tick(&Supervisor::default(), true);
        assert_eq!(one_line("a\nb"), "a b");
    }
}
