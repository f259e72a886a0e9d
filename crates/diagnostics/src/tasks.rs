//! One way to spawn long-lived tasks: named (tokio-console and dumps show the name), wrapped in
//! a span, tracked (shutdown waits for them) and cancellable through one root token.
//!
//! Some task families are **critical**: their end means the process is broken (leadership,
//! the database monitor behind `/readyz`, the observability server's watcher). A critical task
//! that returns before the root token is cancelled, or panics, is logged at ERROR naming it,
//! recorded ([`Tasks::critical_exit`]) and cancels the root token, so the process shuts down and
//! the embedding service can exit non-zero ([`EXIT_CRITICAL_TASK`]) instead of looking healthy
//! without it.
//! Families are marked critical with [`Tasks::mark_critical`] before they are spawned (so code
//! that spawns them by name, like `db::leader`, needs no change) or spawned with
//! [`Tasks::spawn_critical`].
//!
//! Pattern from console-subscriber's `spawn_named` and tokio-util's `TaskTracker` docs.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::FutureExt;

use tokio::task::JoinHandle;
use tokio_metrics::TaskMonitor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Tracks every long-lived task of one app and owns the root cancellation token.
///
/// Each task family (the `name` given to [`Tasks::spawn_named`], or a family asked for with
/// [`Tasks::monitor`]) has one `tokio_metrics::TaskMonitor`; the diagnostics export them with a
/// `task` label.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    root: CancellationToken,
    /// Read-mostly: after a family's first spawn, spawns only take the read lock.
    monitors: Arc<RwLock<BTreeMap<&'static str, TaskMonitor>>>,
    critical: Arc<Mutex<Critical>>,
}

/// Suggested process exit code when a critical task ended, as vpnbot's `run` uses it
/// (`EX_SOFTWARE` from BSD `sysexits.h`: an internal error).
pub const EXIT_CRITICAL_TASK: u8 = 70;

#[derive(Debug, Default)]
struct Critical {
    families: BTreeSet<&'static str>,
    exit: Option<CriticalExit>,
}

/// A critical task that ended while the process was meant to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("critical task `{task}` {how}")]
pub struct CriticalExit {
    /// The task family (its spawn name).
    pub task: &'static str,
    /// `returned`, or `panicked: <message>`.
    pub how: String,
}

impl Tasks {
    /// A fresh set with its own root token.
    pub fn new() -> Self {
        Self::default()
    }

    /// The root token: cancelled once at shutdown (SIGINT/SIGTERM or a fatal task exit).
    pub fn root(&self) -> &CancellationToken {
        &self.root
    }

    /// The `TaskMonitor` of task family `family` (created on first use). Instrument futures
    /// that are not spawned through [`Tasks::spawn_named`] (e.g. node calls) with
    /// `tasks.monitor("node_call").instrument(fut)`. `family` must come from a fixed set.
    pub fn monitor(&self, family: &'static str) -> TaskMonitor {
        if let Some(m) = self
            .monitors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(family)
        {
            return m.clone();
        }
        self.monitors
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(family)
            .or_default()
            .clone()
    }

    /// Every family's monitor, by name.
    pub fn monitors(&self) -> Vec<(&'static str, TaskMonitor)> {
        self.monitors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Marks task family `name` critical: from now on, a task spawned under that name that
    /// returns before the root token is cancelled, or panics, shuts the process down (see the
    /// module docs).
    pub fn mark_critical(&self, name: &'static str) {
        self.lock_critical().families.insert(name);
    }

    /// Whether task family `name` is critical.
    pub fn is_critical(&self, name: &'static str) -> bool {
        self.lock_critical().families.contains(name)
    }

    /// The first critical task that ended, if any.
    pub fn critical_exit(&self) -> Option<CriticalExit> {
        self.lock_critical().exit.clone()
    }

    fn lock_critical(&self) -> std::sync::MutexGuard<'_, Critical> {
        self.critical.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that critical task `task` ended, logs it, and cancels the root token.
    fn critical_ended(&self, task: &'static str, how: String) {
        tracing::error!(
            task,
            how = %how,
            "critical task `{task}` {how}: shutting the process down"
        );
        let mut c = self.lock_critical();
        if c.exit.is_none() {
            c.exit = Some(CriticalExit { task, how });
        }
        drop(c);
        self.root.cancel();
    }

    /// [`Tasks::mark_critical`] `name`, then [`Tasks::spawn_named`].
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    #[track_caller]
    pub fn spawn_critical<F>(&self, name: &'static str, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.mark_critical(name);
        self.spawn_named(name, fut)
    }

    /// Spawns `fut` on the current runtime as a named, tracked task inside a span `task` with
    /// field `task.name = name`, instrumented by the family's `TaskMonitor`. `name` must come
    /// from a fixed set (it becomes a label). The spawn location recorded by tokio (and shown
    /// in dumps) is the caller's.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    #[track_caller]
    pub fn spawn_named<F>(&self, name: &'static str, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let span = tracing::info_span!("task", task.name = name);
        let watched = {
            let tasks = self.clone();
            async move {
                // Whether it is critical is read when it ends: a family marked after a spawn
                // still counts.
                match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(out) => {
                        if !tasks.root.is_cancelled() && tasks.is_critical(name) {
                            tasks.critical_ended(name, "returned".to_string());
                        }
                        out
                    }
                    Err(panic) => {
                        if tasks.is_critical(name) {
                            let msg = panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "(no message)".to_string());
                            tasks.critical_ended(name, format!("panicked: {msg}"));
                        }
                        std::panic::resume_unwind(panic)
                    }
                }
            }
        };
        let fut = self.tracker.track_future(TaskMonitor::instrument(
            &self.monitor(name),
            watched.instrument(span),
        ));
        // No closure here: it would break `#[track_caller]` and record this file as the
        // spawn location.
        crate::offer_spawn_name(Some(name));
        let handle = tokio::task::Builder::new()
            .name(name)
            .spawn(fut)
            .expect("spawning a task on a running runtime");
        crate::offer_spawn_name(None);
        handle
    }

    /// Cancels the root token, then waits up to `drain` for every tracked task to finish.
    /// Returns `true` when all finished in time.
    pub async fn shutdown(&self, drain: Duration) -> bool {
        self.root.cancel();
        self.tracker.close();
        tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_critical_task_that_panics_or_returns_cancels_the_root_naming_itself() {
        let tasks = Tasks::new();
        let h = tasks.spawn_critical("doomed", async { panic!("lost the lock connection") });
        assert!(h.await.unwrap_err().is_panic());
        assert!(tasks.root().is_cancelled());
        let exit = tasks.critical_exit().unwrap();
        assert_eq!(exit.task, "doomed");
        assert_eq!(exit.how, "panicked: lost the lock connection");

        let tasks = Tasks::new();
        tasks.mark_critical("leadership");
        tasks.spawn_named("leadership", async {}).await.unwrap();
        assert!(tasks.root().is_cancelled());
        assert_eq!(
            tasks.critical_exit().unwrap().to_string(),
            "critical task `leadership` returned"
        );
    }

    #[tokio::test]
    async fn ordinary_tasks_and_critical_tasks_ending_at_shutdown_do_not() {
        let tasks = Tasks::new();
        assert!(tasks
            .spawn_named("worker", async { panic!("ordinary") })
            .await
            .unwrap_err()
            .is_panic());
        tasks.spawn_named("worker", async {}).await.unwrap();
        assert!(!tasks.root().is_cancelled());
        let root = tasks.root().clone();
        let h = tasks.spawn_critical("leadership", async move { root.cancelled().await });
        assert!(tasks.shutdown(Duration::from_secs(1)).await);
        h.await.unwrap();
        assert_eq!(tasks.critical_exit(), None);
    }
}
