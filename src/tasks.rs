//! One way to spawn long-lived tasks: named (tokio-console and dumps show the name), wrapped in
//! a span, tracked (shutdown waits for them) and cancellable through one root token.
//!
//! Pattern from console-subscriber's `spawn_named` and tokio-util's `TaskTracker` docs.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Tracks every long-lived task of one app and owns the root cancellation token.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    root: CancellationToken,
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

    /// Spawns `fut` on the current runtime as a named, tracked task inside a span `task` with
    /// field `task.name = name`. `name` must come from a fixed set (it becomes a label).
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn spawn_named<F>(&self, name: &'static str, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let span = tracing::info_span!("task", task.name = name);
        let fut = self.tracker.track_future(fut.instrument(span));
        tokio::task::Builder::new()
            .name(name)
            .spawn(fut)
            .expect("spawning a task on a running runtime")
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
