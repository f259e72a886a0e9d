//! A lateness probe for benchmarks and tests: a ticker on the current runtime that records how
//! late each tick woke, i.e. how long a runtime worker was kept from it (scheduler lag as a
//! task sees it). The always-on probe of production is `vpnbot_runtime_scheduler_lag_seconds`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// A running probe; [`LatenessProbe::finish`] stops it and returns the samples.
#[derive(Debug)]
pub struct LatenessProbe {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Duration>>,
}

impl LatenessProbe {
    /// Starts a ticker with `period` on the current runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(period: Duration) -> LatenessProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move {
            let mut late = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                tokio::time::sleep(period).await;
                late.push(t.elapsed().saturating_sub(period));
            }
            late
        });
        LatenessProbe { stop, handle }
    }

    /// Stops the probe; returns how late each tick was, in order.
    pub async fn finish(self) -> Vec<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap_or_default()
    }
}
