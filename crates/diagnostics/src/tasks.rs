//! One way to spawn long-lived tasks: named (tokio-console and dumps show the name), wrapped in
//! a span, tracked (shutdown waits for them) and cancellable through one root token.
//!
//! Pattern from console-subscriber's `spawn_named` and tokio-util's `TaskTracker` docs.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

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
        let fut = self.tracker.track_future(TaskMonitor::instrument(
            &self.monitor(name),
            fut.instrument(span),
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
