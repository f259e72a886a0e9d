//! What the observability server reports about the process, gathered from parts that publish
//! their state in thread-safe cells, so reading it never needs the main runtime.

use std::sync::Arc;
use std::time::Duration;

use crate::db::leader::LeaderHandle;
use crate::db::readiness::DbReadiness;
use crate::db::refusal::ConnectHealth;

/// The diagnostics' view as the observability server needs it. Implemented by the
/// diagnostics subsystem; every method must be callable from any thread without the main
/// runtime.
pub trait DiagnosticsView: Send + Sync + std::fmt::Debug {
    /// The kind of the open stall episode (e.g. `blocked_worker`), or `None` when healthy.
    fn stall(&self) -> Option<String>;
    /// The latest episode's dump as JSON, if any was written.
    fn latest_dump_json(&self) -> Option<String>;
    /// A fresh dump taken now, as JSON.
    fn dump_now_json(&self) -> String;
    /// Why the service is degraded while the runtime is fine (e.g. `service_starved: ...`
    /// with what the busy handlers wait on); `None` when it makes progress.
    fn degraded(&self) -> Option<String> {
        None
    }
}

/// Node circuit-breaker states for `/readyz`, callable from any thread.
pub trait BreakerView: Send + Sync + std::fmt::Debug {
    /// `(node, state)` pairs, state one of `closed`, `half_open`, `open`.
    fn breaker_states(&self) -> Vec<(String, &'static str)>;
}

/// Shared health state, built with its parts before the observability server starts (`None`:
/// this process has no such part, e.g. a test server without a database).
#[derive(Debug)]
pub struct HealthState {
    /// Outcome of the database writability check (written by the database monitor).
    pub db: Arc<DbReadiness>,
    /// Bound on the age of the last database check for `/readyz` to trust it.
    pub db_max_age: Duration,
    /// Connection refusals seen while running (pool back-off).
    pub db_connect: Option<Arc<ConnectHealth>>,
    /// Leadership read side. Leadership is only competed for after migrations, while the
    /// server already answers; until its first attempt ends `/readyz` reports `"leader": null`
    /// and is not ready (`leadership`: [`super::server::FIRST_ATTEMPT_PENDING`]).
    pub leader: Option<LeaderHandle>,
    /// Diagnostics (stall state and dumps).
    pub diagnostics: Option<Arc<dyn DiagnosticsView>>,
    /// Node breakers.
    pub breakers: Option<Arc<dyn BreakerView>>,
    /// `/debug/dump?now=1`: single-flight, rate-limited, off the server's thread.
    pub on_demand: super::on_demand::OnDemandDumps,
}

impl Default for HealthState {
    /// No parts; a database check trusted for 10 s.
    fn default() -> Self {
        Self {
            db: Arc::default(),
            db_max_age: Duration::from_secs(10),
            db_connect: None,
            leader: None,
            diagnostics: None,
            breakers: None,
            on_demand: Default::default(),
        }
    }
}

impl HealthState {
    /// The open stall's kind, if diagnostics are attached and report one.
    pub fn stall(&self) -> Option<String> {
        self.diagnostics.as_ref().and_then(|d| d.stall())
    }

    /// The service-level degradation, if diagnostics are attached and report one.
    pub fn degraded(&self) -> Option<String> {
        self.diagnostics.as_ref().and_then(|d| d.degraded())
    }
}
