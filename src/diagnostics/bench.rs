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
        let diag = Diagnostics::new(s, &prometheus::Registry::new());
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
    /// Stall threshold, seconds.
    pub threshold_seconds: f64,
    /// Latencies, seconds, sorted.
    pub samples: Vec<f64>,
}

impl LatencyReport {
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
            "detection latency {} (threshold {:.2} s, n={}): p50 {:.3} s, p99 {:.3} s, max \
             {:.3} s (target p99 <= {:.2} s)",
            self.scenario,
            self.threshold_seconds,
            self.samples.len(),
            self.pct(0.5),
            self.pct(0.99),
            self.samples.last().copied().unwrap_or(f64::NAN),
            self.threshold_seconds + 0.2
        )
    }
}

/// Injects `n` stalls of each kind (one worker in `std::thread::sleep`, every worker blocked,
/// a non-yielding CPU loop) with stall threshold `threshold` on 2 workers and measures the
/// detection latency. Prints and returns one report per scenario.
pub fn bench_detection_latency(n: usize, threshold: Duration) -> Vec<LatencyReport> {
    let mut out = Vec::new();
    for scenario in ["one_worker_sleep", "all_workers_blocked", "cpu_loop"] {
        let s = DiagnosticsSettings {
            stall_threshold_seconds: threshold.as_secs_f64(),
            watchdog_period_seconds: (threshold.as_secs_f64() / 10.0).min(0.1),
            dump_max_files: 0,
            native_stacks: false,
            ..Default::default()
        };
        let kind = if scenario == "all_workers_blocked" {
            StallKind::RuntimeStalled
        } else {
            StallKind::BlockedWorker
        };
        let diag = Diagnostics::new(s, &prometheus::Registry::new());
        let rt = crate::runtime::build_main_runtime(Some(2), &diag).expect("runtime");
        let tasks = Tasks::new();
        diag.start(rt.handle(), &tasks);
        let mut samples = Vec::new();
        let hold = threshold + Duration::from_millis(600);
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
                std::thread::sleep(Duration::from_millis(2));
            }
            // The sample is "now - start"; detection happened at most one 2 ms poll earlier.
            std::thread::sleep(hold);
        }
        tasks.root().cancel();
        diag.stop();
        rt.shutdown_timeout(Duration::from_secs(3));
        samples.sort_by(f64::total_cmp);
        let r = LatencyReport {
            scenario,
            threshold_seconds: threshold.as_secs_f64(),
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
        DiagnosticsSettings {
            dump_max_files: 0,
            ..Default::default()
        },
        &prometheus::Registry::new(),
    );
    let rt = crate::runtime::build_main_runtime(Some(2), &diag).expect("runtime");
    let tasks = Tasks::new();
    diag.start(rt.handle(), &tasks);
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

/// Throughput of a realistic loop with and without everything that is always on.
#[derive(Debug, Clone)]
pub struct AlwaysOnCostReport {
    /// Node calls per round.
    pub calls: usize,
    /// Best calls/s without diagnostics (plain runtime, plain spawns).
    pub plain_per_second: f64,
    /// Best calls/s without diagnostics on a runtime with the LIFO slot disabled, as the
    /// hooked runtime has it: the cost of the diagnostics alone is measured against this.
    pub plain_no_lifo_per_second: f64,
    /// Best calls/s with the hooked runtime, watchdog, lag probe, runtime and task monitors.
    pub instrumented_per_second: f64,
}

impl AlwaysOnCostReport {
    /// Throughput lost to the always-on diagnostics, percent (negative: within noise).
    pub fn cost_percent(&self) -> f64 {
        (1.0 - self.instrumented_per_second / self.plain_no_lifo_per_second) * 100.0
    }
}

impl fmt::Display for AlwaysOnCostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node-call loop, {} `health` calls per round over loopback, 16 concurrent tasks: \
             plain {:.0} calls/s, plain without the LIFO slot {:.0} calls/s, with diagnostics \
             {:.0} calls/s: cost {:.1} % against the same runtime settings (target < 5 %)",
            self.calls,
            self.plain_per_second,
            self.plain_no_lifo_per_second,
            self.instrumented_per_second,
            self.cost_percent()
        )
    }
}

/// Runs `calls` node-API `health` calls (16 concurrent tasks) against a simulated node served
/// from its own thread, on a 2-worker runtime without diagnostics and on the same runtime with
/// the poll hooks, the watchdog, the lag probe and the runtime/task monitors, alternating 3
/// rounds each; the best round of each is compared. Prints and returns the figures.
pub fn bench_always_on_cost(calls: usize) -> AlwaysOnCostReport {
    use crate::node::{InflightCalls, NodeApiMetrics, NodeClient, NodeClientSettings};
    use crate::sim::node::{SimNode, SimNodeOptions};

    // The node lives on its own runtime so it costs both variants the same.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sim_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("sim runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let sim = SimNode::start(l, SimNodeOptions::default());
            addr_tx
                .send((sim.base_url(), sim.api_key().to_string()))
                .expect("send");
            let _ = stop_rx.await;
            drop(sim);
        });
    });
    let (url, key) = addr_rx.recv().expect("sim address");

    let round = |instrumented: bool, no_lifo: bool| -> f64 {
        let registry = prometheus::Registry::new();
        let diag = Diagnostics::new(DiagnosticsSettings::default(), &registry);
        let rt = if instrumented {
            crate::runtime::build_main_runtime(Some(2), &diag).expect("runtime")
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2).enable_all();
            if no_lifo {
                b.disable_lifo_slot();
            }
            b.build().expect("runtime")
        };
        let tasks = Tasks::new();
        let elapsed = rt.block_on(async {
            if instrumented {
                diag.start(&tokio::runtime::Handle::current(), &tasks);
            }
            let client = NodeClient::new(
                "bench",
                url.clone(),
                secrecy::SecretString::from(key.clone()),
                &NodeClientSettings::default(),
                NodeApiMetrics::register(&registry),
                InflightCalls::new(),
            )
            .expect("client");
            client.health().await.expect("warm-up");
            let per_task = calls / 16;
            let t0 = Instant::now();
            let mut handles = Vec::new();
            for _ in 0..16 {
                let c = client.clone();
                let work = async move {
                    for _ in 0..per_task {
                        let _ = c.health().await;
                    }
                };
                handles.push(if instrumented {
                    tasks.spawn_named("node_calls", work)
                } else {
                    tokio::spawn(work)
                });
            }
            for h in handles {
                let _ = h.await;
            }
            t0.elapsed()
        });
        if instrumented {
            diag.stop();
        }
        drop(rt);
        calls as f64 / elapsed.as_secs_f64()
    };
    let (mut plain, mut plain_no_lifo, mut inst) = (0f64, 0f64, 0f64);
    for _ in 0..3 {
        plain = plain.max(round(false, false));
        plain_no_lifo = plain_no_lifo.max(round(false, true));
        inst = inst.max(round(true, true));
    }
    let _ = stop_tx.send(());
    let _ = sim_thread.join();
    let report = AlwaysOnCostReport {
        calls,
        plain_per_second: plain,
        plain_no_lifo_per_second: plain_no_lifo,
        instrumented_per_second: inst,
    };
    println!("bench always-on-cost: {report}");
    report
}
