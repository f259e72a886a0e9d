//! Benchmarks of the always-on diagnostics, as plain functions the CLI (`vpnbot bench`) can
//! call. Each builds its own runtimes, prints its figures and returns them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Diagnostics, DiagnosticsSettings, StallKind};
use crate::tasks::Tasks;

/// Per-poll cost on a pure `yield_now` storm.
#[derive(Debug, Clone)]
pub struct PollCostReport {
    /// Polls measured per variant.
    pub polls: u64,
    /// ns per poll with no hooks.
    pub baseline_ns: f64,
    /// ns per poll with the diagnostics hooks (poll-time histogram off).
    pub hooks_ns: f64,
    /// ns per poll with hooks and tokio's poll-time histogram.
    pub hooks_histogram_ns: f64,
}

impl fmt::Display for PollCostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "poll cost over {} polls: baseline {:.1} ns/poll, hooks {:.1} ns (+{:.1}), \
             hooks+poll-time histogram {:.1} ns (+{:.1})",
            self.polls,
            self.baseline_ns,
            self.hooks_ns,
            self.hooks_ns - self.baseline_ns,
            self.hooks_histogram_ns,
            self.hooks_histogram_ns - self.baseline_ns
        )
    }
}

fn storm(rt: &tokio::runtime::Runtime, tasks: u64, yields: u64) -> Duration {
    rt.block_on(async {
        let t0 = Instant::now();
        let hs: Vec<_> = (0..tasks)
            .map(|_| {
                tokio::spawn(async move {
                    for _ in 0..yields {
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for h in hs {
            let _ = h.await;
        }
        t0.elapsed()
    })
}

/// Measures the extra cost per poll of the hooks on a `yield_now` storm of `tasks × yields`
/// polls on `workers` workers (best of 3 runs per variant). Prints and returns the figures.
pub fn bench_poll_hook_cost(workers: usize, tasks: u64, yields: u64) -> PollCostReport {
    let polls = tasks * yields;
    let best = |rt: &tokio::runtime::Runtime| {
        (0..3)
            .map(|_| storm(rt, tasks, yields))
            .min()
            .unwrap_or_default()
            .as_nanos() as f64
            / polls as f64
    };
    let base_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .disable_lifo_slot()
        .enable_all()
        .build()
        .expect("runtime");
    let baseline_ns = best(&base_rt);
    drop(base_rt);
    let run = |hist: bool| {
        let s = DiagnosticsSettings {
            poll_time_histogram: hist,
            ..Default::default()
        };
        let diag = Diagnostics::new(crate::Naming::new("bench"), s, &prometheus::Registry::new());
        let rt = crate::runtime::build_main_runtime(Some(workers), &diag).expect("runtime");
        best(&rt)
    };
    let hooks_ns = run(false);
    let hooks_histogram_ns = run(true);
    let r = PollCostReport {
        polls,
        baseline_ns,
        hooks_ns,
        hooks_histogram_ns,
    };
    println!("{r}");
    r
}

/// Detection latency (time from the stall starting to the watchdog opening the episode).
#[derive(Debug, Clone)]
pub struct LatencyReport {
    /// Scenario name.
    pub scenario: &'static str,
    /// Which setting (`default`: the shipped watchdog period and threshold; `fast`).
    pub setting: &'static str,
    /// Stall threshold, seconds.
    pub threshold_seconds: f64,
    /// Watchdog period, seconds.
    pub period_seconds: f64,
    /// Latencies, seconds, sorted.
    pub samples: Vec<f64>,
}

impl LatencyReport {
    /// The target: p99 <= threshold + 2 × watchdog period.
    pub fn target_seconds(&self) -> f64 {
        self.threshold_seconds + 2.0 * self.period_seconds
    }

    /// Whether p99 is within [`LatencyReport::target_seconds`].
    pub fn within_target(&self) -> bool {
        self.pct(0.99) <= self.target_seconds()
    }

    fn pct(&self, p: f64) -> f64 {
        if self.samples.is_empty() {
            return f64::NAN;
        }
        let i = ((self.samples.len() as f64 - 1.0) * p).round() as usize;
        self.samples[i]
    }
}

impl fmt::Display for LatencyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "detection latency {} ({} setting: threshold {:.2} s, watchdog period {:.2} s, \
             n={}): min {:.3} s, p50 {:.3} s, p99 {:.3} s, max {:.3} s (target p99 <= {:.2} s: \
             {})",
            self.scenario,
            self.setting,
            self.threshold_seconds,
            self.period_seconds,
            self.samples.len(),
            self.samples.first().copied().unwrap_or(f64::NAN),
            self.pct(0.5),
            self.pct(0.99),
            self.samples.last().copied().unwrap_or(f64::NAN),
            self.target_seconds(),
            if self.within_target() {
                "met"
            } else {
                "MISSED"
            }
        )
    }
}

/// Injects `n` stalls of each kind (one worker in `std::thread::sleep`, every worker blocked,
/// a non-yielding CPU loop) with stall threshold `threshold` and watchdog period `period` on
/// 2 workers and measures the detection latency. `setting` labels the run (`default`,
/// `fast`). Prints and returns one report per scenario; target p99 <= threshold + 2 × period.
pub fn bench_detection_latency(
    n: usize,
    threshold: Duration,
    period: Duration,
    setting: &'static str,
) -> Vec<LatencyReport> {
    let mut out = Vec::new();
    for scenario in ["one_worker_sleep", "all_workers_blocked", "cpu_loop"] {
        let s = DiagnosticsSettings {
            stall_threshold_seconds: threshold,
            watchdog_period_seconds: period,
            dump_max_files: 0,
            native_stacks: false,
            ..Default::default()
        };
        let kind = if scenario == "all_workers_blocked" {
            StallKind::RuntimeStalled
        } else {
            StallKind::BlockedWorker
        };
        let diag = Diagnostics::new(crate::Naming::new("bench"), s, &prometheus::Registry::new());
        let rt = crate::runtime::build_main_runtime(Some(2), &diag).expect("runtime");
        let tasks = Tasks::new();
        diag.start(rt.handle(), &tasks, None);
        let mut samples = Vec::new();
        let hold = threshold + 2 * period + Duration::from_millis(400);
        for _ in 0..n {
            // Wait for a quiet runtime (previous episode closed).
            let t0 = Instant::now();
            while !diag.open_kinds().is_empty() && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(150));
            let started = Arc::new(std::sync::Mutex::new(None::<Instant>));
            let copies = if scenario == "all_workers_blocked" {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let st = started.clone();
                rt.spawn(async move {
                    st.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(Instant::now);
                    if scenario == "cpu_loop" {
                        let t = Instant::now();
                        let mut x = 0u64;
                        while t.elapsed() < hold {
                            x = std::hint::black_box(x.wrapping_add(1));
                        }
                    } else {
                        std::thread::sleep(hold);
                    }
                });
            }
            let t0 = Instant::now();
            loop {
                if diag.open_kinds().contains(&kind) {
                    if let Some(s) = *started.lock().unwrap_or_else(|e| e.into_inner()) {
                        samples.push(s.elapsed().as_secs_f64());
                    }
                    break;
                }
                if t0.elapsed() > hold + Duration::from_secs(2) {
                    samples.push(f64::INFINITY);
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            // The sample is "now - start"; detection happened at most one 0.5 ms poll earlier.
            // The next injection waits for this episode to close.
            std::thread::sleep(hold.saturating_sub(Duration::from_millis(
                (samples.last().copied().unwrap_or(0.0).min(60.0) * 1e3) as u64,
            )));
        }
        tasks.root().cancel();
        diag.stop();
        rt.shutdown_timeout(Duration::from_secs(3));
        samples.sort_by(f64::total_cmp);
        let r = LatencyReport {
            scenario,
            setting,
            threshold_seconds: threshold.as_secs_f64(),
            period_seconds: period.as_secs_f64(),
            samples,
        };
        println!("{r}");
        out.push(r);
    }
    out
}

/// The watchdog thread's own CPU use while the runtime idles with light load for `duration`,
/// as a share of one core (target under 1 %). Prints and returns it.
pub fn bench_watchdog_cpu(duration: Duration) -> f64 {
    let diag = Diagnostics::new(
        crate::Naming::new("bench"),
        DiagnosticsSettings {
            dump_max_files: 0,
            ..Default::default()
        },
        &prometheus::Registry::new(),
    );
    let rt = crate::runtime::build_main_runtime(Some(2), &diag).expect("runtime");
    let tasks = Tasks::new();
    diag.start(rt.handle(), &tasks, None);
    rt.block_on(async {
        for _ in 0..50 {
            tasks.spawn_named("bench_load", async {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
    });
    let (t0, c0) = diag.watchdog_cost();
    std::thread::sleep(duration);
    let (t1, c1) = diag.watchdog_cost();
    let share = (c1 - c0) / duration.as_secs_f64();
    println!(
        "watchdog CPU: {:.3} % of one core ({} ticks, {:.1} us per tick)",
        share * 100.0,
        t1 - t0,
        (c1 - c0) / (t1 - t0).max(1) as f64 * 1e6
    );
    tasks.root().cancel();
    diag.stop();
    rt.shutdown_timeout(Duration::from_secs(3));
    share
}
