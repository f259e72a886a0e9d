//! Building the main runtime: multi-thread, named threads, diagnostics hooks installed.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{HistogramConfiguration, LogHistogram, Runtime};

use crate::Diagnostics;

/// Role part of the main runtime's worker thread names: worker `N` (tokio's 0-based worker
/// index, the `worker` label of the runtime metrics and the "worker N" of dumps) runs on
/// thread `<service>-wrk-N` (see [`worker_thread_name`]). Short because Linux keeps 15 bytes of
/// a thread name (`ps`, `top`, `/proc/<pid>/task/<tid>/comm`): `vpnbot-worker-10` would read as
/// `vpnbot-worker-1` there.
pub const WORKER_THREAD_ROLE: &str = "wrk";

/// The name of the thread that runs worker `index`: `<base>-<index>`, where `base` is the name
/// the thread started with (`<service>-wrk`).
///
/// tokio starts its workers through the blocking pool's shared queue, so the `n`-th thread
/// started does not necessarily run worker `n` (seen here: worker 1 on the first thread). A
/// worker thread therefore starts as plain `<service>-wrk` and is renamed at the OS level
/// (`pthread_setname_np`: `ps`, `top`, `/proc`, debuggers, native stacks) by the diagnostics'
/// poll hook on its first poll, when tokio reports its index; dumps use this name. Rust's own
/// name of the thread (panic messages) stays `<service>-wrk`.
pub fn worker_thread_name(base: &str, index: usize) -> String {
    format!("{base}-{index}")
}

/// Sets the calling thread's OS-level name (at most 15 bytes are kept; longer names are cut).
pub(crate) fn set_os_thread_name(name: &str) {
    let mut bytes: Vec<u8> = name.bytes().filter(|b| *b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: a NUL-terminated buffer of at most 16 bytes naming the calling thread.
    unsafe {
        libc::pthread_setname_np(libc::pthread_self(), bytes.as_ptr().cast());
    }
}

/// Role part of the main runtime's blocking-pool thread names (`<service>-blk-0`, ...),
/// numbered in the order they start.
pub const BLOCKING_THREAD_ROLE: &str = "blk";

/// The fewest workers the main runtime starts when none is configured (`runtime.worker_threads
/// = 0` and no `TOKIO_WORKER_THREADS`), whatever the core count.
///
/// Why more workers than cores on a small host: vpnbot usually shares it with PostgreSQL, and
/// Linux shares CPU time between runnable *threads*. During the bot burst beside a
/// million-user reconcile (`bench_bot`, 2 cores), the 2 default workers were runnable but
/// waiting for a core about 70 % of their runnable time, behind a dozen PostgreSQL backends
/// and the blocking pool, and a preempted worker left its queue waiting: scheduler lag p99
/// 8.6-25 ms over six runs (target < 10 ms). With 4 workers another worker steals that queue:
/// 7.3-9.3 ms over five runs, handler p99 86-95 ms, same CPU used. It also means one
/// blocked worker takes a quarter of the runtime instead of half.
pub const MIN_DEFAULT_WORKER_THREADS: usize = 4;

/// The number of workers the main runtime starts when none is configured:
/// `TOKIO_WORKER_THREADS` when it holds a positive number, else one per CPU but at least
/// [`MIN_DEFAULT_WORKER_THREADS`] (resolved here, not by tokio, so thread names can tell
/// workers from blocking threads).
pub fn default_worker_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .max(MIN_DEFAULT_WORKER_THREADS)
        })
}

/// Builds the main multi-thread runtime with `worker_threads` workers (default:
/// [`default_worker_threads`]), all drivers enabled, worker threads named after tokio's worker
/// index ([`worker_thread_name`]; the first `worker_threads` threads started are the workers)
/// and [`BLOCKING_THREAD_ROLE`] for the rest, the poll-time histogram when
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
    let workers = worker_threads
        .map(|n| n.max(1))
        .unwrap_or_else(default_worker_threads);
    b.worker_threads(workers);
    // Called once per thread started, in start order: `build` starts the workers first (in
    // no fixed index order), the blocking pool's threads come later.
    let counter = AtomicUsize::new(0);
    let naming = diag.naming();
    b.thread_name_fn(move || {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        if n < workers {
            naming.thread(WORKER_THREAD_ROLE)
        } else {
            format!("{}-{}", naming.thread(BLOCKING_THREAD_ROLE), n - workers)
        }
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
