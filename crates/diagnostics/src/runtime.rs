//! Building the main runtime: multi-thread, named threads, diagnostics hooks installed.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{HistogramConfiguration, LogHistogram, Runtime};

use crate::Diagnostics;

/// Prefix of the main runtime's thread names (`vpnbot-rt-0`, `vpnbot-rt-1`, ...). tokio
/// starts workers and blocking-pool threads alike from this name; dumps tell workers apart by
/// the tasks they poll.
pub const THREAD_NAME_PREFIX: &str = "vpnbot-rt";

/// Builds the main multi-thread runtime with `worker_threads` workers (default: one per CPU),
/// all drivers enabled, named threads, the poll-time histogram when
/// `diagnostics.poll_time_histogram` (log buckets 16 µs .. ~4 s), the
/// LIFO slot disabled (a task in a blocked worker's LIFO slot cannot be stolen, so one blocked
/// worker would strand it), eager driver hand-off (a blocked worker must not strand the I/O and
/// time drivers either), and `diag`'s poll/spawn/terminate hooks installed.
///
/// # Errors
/// When the OS refuses to create the runtime's threads or drivers.
pub fn build_main_runtime(
    worker_threads: Option<usize>,
    diag: &Diagnostics,
) -> std::io::Result<Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if let Some(n) = worker_threads {
        b.worker_threads(n.max(1));
    }
    let counter = AtomicUsize::new(0);
    b.thread_name_fn(move || {
        format!(
            "{THREAD_NAME_PREFIX}-{}",
            counter.fetch_add(1, Ordering::Relaxed)
        )
    });
    b.disable_lifo_slot();
    // A worker that was parked on the I/O and time drivers and wakes to run a task hands the
    // drivers to a parked worker first. Without it, a task woken by a timer that then blocks
    // its worker keeps the drivers unattended (the other worker sleeps on its condvar, nobody
    // tells it): every timer and socket of the runtime stops for the whole block, and one
    // blocked worker reads as `runtime_stalled` (issue 17; tests/it/diagnostics_stalls.rs).
    b.enable_eager_driver_handoff();
    if diag.settings().poll_time_histogram {
        b.enable_metrics_poll_time_histogram();
        b.metrics_poll_time_histogram_configuration(HistogramConfiguration::log(
            LogHistogram::builder()
                .min_value(std::time::Duration::from_micros(16))
                // Reach past 1800 s so an 11-minute poll reads as such (FAULTS.md O3).
                .max_value(std::time::Duration::from_secs(2048))
                .precision_exact(0),
        ));
    }
    diag.install_hooks(&mut b);
    b.build()
}
