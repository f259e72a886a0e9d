//! A periodic worker's registration with the watchdog's `worker_overdue` check, removed when
//! the worker stops on purpose (shutdown, lost leadership) so that an ex-leader does not report
//! its stopped workers as overdue.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Diagnostics;

/// Held by a worker loop for as long as it runs. Creating it starts the clock (a first run that
/// never completes is overdue too); [`WorkerWatch::ran`] restarts it; dropping it unregisters
/// the worker.
#[derive(Debug)]
pub struct WorkerWatch {
    diagnostics: Option<Diagnostics>,
    worker: &'static str,
}

impl WorkerWatch {
    /// Registers `worker` (a fixed name) expecting a completed run within `interval`. With no
    /// diagnostics (tests, tools) it does nothing.
    pub fn start(
        diagnostics: Option<&Diagnostics>,
        worker: &'static str,
        interval: Duration,
    ) -> WorkerWatch {
        if let Some(d) = diagnostics {
            d.record_worker_run(worker, interval);
        }
        WorkerWatch {
            diagnostics: diagnostics.cloned(),
            worker,
        }
    }

    /// A run completed; the next is expected within `interval` (may differ per run, e.g. a
    /// deliberate pause).
    pub fn ran(&self, interval: Duration) {
        if let Some(d) = &self.diagnostics {
            d.record_worker_run(self.worker, interval);
        }
    }
}

impl Drop for WorkerWatch {
    fn drop(&mut self) {
        if let Some(d) = &self.diagnostics {
            d.forget_worker(self.worker);
        }
    }
}

/// Runs `pass` every `interval` (the first at once; a late tick delays the next rather than
/// bunching) until `cancel`, as the watched periodic worker `worker`. A pass in progress is
/// dropped on cancellation; the registration ends with the loop.
pub async fn run_every<F, Fut>(
    worker: &'static str,
    interval: Duration,
    diagnostics: Option<&Diagnostics>,
    cancel: &CancellationToken,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let watch = WorkerWatch::start(diagnostics, worker, interval);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = pass() => {}
        }
        watch.ran(interval);
    }
}
