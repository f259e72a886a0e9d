//! FAULTS.md rows R1-R5 against the real watchdog, hooks, open-spans layer and ptrace stack
//! helper, plus a no-false-positive run and the exit-after-stall policy.
//!
//! Tests run one at a time (a process-wide lock): they measure detection latency on a 2-core
//! machine and block workers on purpose.

// `block_on(async { spawn_named(..) })` spawns from inside the runtime on purpose.
#![allow(clippy::async_yields_async, clippy::let_underscore_future)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use vpnbot::diagnostics::{
    Diagnostics, DiagnosticsSettings, Dump, InflightEntry, InflightKind, InflightSource, OpenSpans,
    OpenSpansLayer, StallKind, WorkerWatch,
};
use vpnbot::tasks::Tasks;

/// The ptrace stack helper re-executes this test binary; answer before libtest starts (it
/// would print to stdout, which carries the helper's protocol).
#[used]
#[link_section = ".init_array"]
static STACK_HELPER: extern "C" fn() = {
    extern "C" fn helper() {
        vpnbot::diagnostics::stack::maybe_run_child();
    }
    helper
};

const THRESHOLD: f64 = 0.3;
/// Generous bound for detection after the threshold on a loaded 2-core box.
const SLACK: Duration = Duration::from_millis(1300);
const FILE: &str = "tests/it/diagnostics_stalls.rs";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn spans() -> OpenSpans {
    static SPANS: OnceLock<OpenSpans> = OnceLock::new();
    SPANS
        .get_or_init(|| {
            let layer = OpenSpansLayer::new().track_target("diagnostics_stalls");
            let spans = layer.spans();
            let subscriber = tracing_subscriber::registry().with(layer.filtered());
            tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
            spans
        })
        .clone()
}

struct App {
    diag: Diagnostics,
    registry: prometheus::Registry,
    rt: Option<tokio::runtime::Runtime>,
    tasks: Tasks,
    dir: tempfile::TempDir,
}

impl App {
    fn new() -> App {
        Self::with(|_| {})
    }

    fn with(f: impl FnOnce(&mut DiagnosticsSettings)) -> App {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiagnosticsSettings {
            stall_threshold_seconds: Duration::from_secs_f64(THRESHOLD),
            watchdog_period_seconds: Duration::from_millis(50),
            lag_probe_interval_seconds: Duration::from_millis(50),
            runtime_metrics_interval_seconds: Duration::from_millis(200),
            operation_grace_seconds: Duration::from_millis(100),
            dump_min_interval_seconds: Duration::from_secs(0),
            pool_starved_seconds: Duration::from_millis(400),
            poll_time_histogram: true,
            // On here: these tests check the task dump and its safeguards.
            task_dumps: true,
            dump_dir: dir.path().to_owned(),
            ..Default::default()
        };
        f(&mut s);
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        let registry = vpnbot::metrics::new_registry();
        let diag = Diagnostics::new(vpnbot::metrics::NAMING, s, &registry);
        diag.add_source(Arc::new(spans()));
        let rt = vpnbot::runtime::build_main_runtime(Some(2), &diag).unwrap();
        let tasks = Tasks::new();
        diag.start(rt.handle(), &tasks, None);
        App {
            diag,
            registry,
            rt: Some(rt),
            tasks,
            dir,
        }
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().unwrap()
    }

    /// Polls `diag.stall()`/`open_kinds()` from this (non-runtime) thread until `kind` opens.
    fn wait_kind(&self, kind: StallKind, limit: Duration) -> Option<Instant> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.diag.open_kinds().contains(&kind) {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn wait_dump(&self, kind: StallKind, limit: Duration) -> Arc<Dump> {
        let t0 = Instant::now();
        loop {
            if let Some(d) = self.diag.latest_dump() {
                if d.kind == Some(kind) {
                    return d;
                }
            }
            assert!(t0.elapsed() < limit, "no {kind} dump within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn metric(&self, line_prefix: &str) -> Option<f64> {
        vpnbot::metrics::render(&self.registry)
            .lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.tasks.root().cancel();
        self.diag.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn is_sleep_call(s: &str) -> bool {
    s.contains("std::thread::sleep") || s.contains("std::thread::functions::sleep")
}

/// Waits (at most 60 s) for the start-up symbol preload, so that a test measures dumps in the
/// steady state.
fn wait_for_symbols() {
    let t0 = Instant::now();
    while !vpnbot::diagnostics::stack::symbols_loaded() {
        assert!(t0.elapsed() < Duration::from_secs(60), "symbols not loaded");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dump_files(app: &App) -> Vec<String> {
    std::fs::read_dir(app.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn r1_blocking_sleep_on_a_worker_is_a_blocked_worker_with_task_span_and_stack() {
    let _g = serial();
    let app = App::new();
    let start = Arc::new(Mutex::new(None::<Instant>));
    let st = start.clone();
    let line = line!() + 2;
    let _h = app.rt().block_on(async {
        app.tasks.spawn_named("reconcile", async move {
            let _span =
                tracing::info_span!(target: "diagnostics_stalls", "reconcile.snapshot", node = "a")
                    .entered();
            *st.lock().unwrap() = Some(Instant::now());
            std::thread::sleep(Duration::from_secs(3));
        })
    });
    let detected = app
        .wait_kind(StallKind::BlockedWorker, Duration::from_secs(5))
        .expect("blocked_worker detected");
    let began = start.lock().unwrap().expect("task ran");
    let latency = detected - began;
    eprintln!("R1 detection latency {latency:?}");
    assert!(latency >= Duration::from_secs_f64(THRESHOLD), "{latency:?}");
    assert!(
        latency <= Duration::from_secs_f64(THRESHOLD) + SLACK,
        "{latency:?}"
    );
    assert_eq!(app.diag.stall(), Some(StallKind::BlockedWorker));
    // Read while the sleep is on: the dump below may come after it (native stacks).
    assert_eq!(app.metric("vpnbot_runtime_stalled"), Some(1.0));

    let d = app.wait_dump(StallKind::BlockedWorker, Duration::from_secs(5));
    eprintln!("{}", d.verdict);
    assert!(
        d.verdict.starts_with("blocked_worker: worker "),
        "{}",
        d.verdict
    );
    assert!(d.verdict.contains("task \"reconcile\""), "{}", d.verdict);
    assert!(
        d.verdict.contains(&format!("{FILE}:{line}")),
        "{}",
        d.verdict
    );
    // std 1.95 defines `std::thread::sleep` in `std::thread::functions`.
    assert!(is_sleep_call(&d.verdict), "{}", d.verdict);
    let w = d
        .workers
        .iter()
        .find(|w| w.blocked)
        .expect("a blocked worker");
    let p = w.polling.as_ref().unwrap();
    assert_eq!(p.name.as_deref(), Some("reconcile"));
    assert!(
        p.spawned_at.starts_with(&format!("{FILE}:{line}:")),
        "{}",
        p.spawned_at
    );
    assert!(
        w.open_spans
            .iter()
            .any(|s| s.operation.as_deref() == Some("reconcile.snapshot")
                && s.node.as_deref() == Some("a")
                && s.task.as_deref() == Some("reconcile")),
        "{:?}",
        w.open_spans
    );
    let stack = w
        .native_stack
        .as_ref()
        .expect("native stack (ptrace is allowed here)");
    assert!(stack.iter().any(|f| is_sleep_call(f)), "{stack:#?}");
    assert_eq!(w.proc.as_ref().unwrap().state, "S");
    assert!(
        d.task_dump.status.starts_with("skipped"),
        "{}",
        d.task_dump.status
    );
    assert!(dump_files(&app)
        .iter()
        .any(|f| f.ends_with("blocked_worker.json")));
    assert_eq!(
        app.metric("vpnbot_watchdog_stalls_total{kind=\"blocked_worker\"}"),
        Some(1.0)
    );
    assert!(app
        .metric("vpnbot_watchdog_episode_info{kind=\"blocked_worker\",label=\"\",node=\"\",operation=\"\",phase=\"\",task=\"reconcile\"}")
        .is_some());

    // The episode ends when the poll ends; its duration is recorded.
    let t0 = Instant::now();
    while app.diag.stall().is_some() {
        assert!(t0.elapsed() < Duration::from_secs(5), "episode never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ep = app.diag.episodes();
    let e = ep
        .iter()
        .find(|e| e.kind == StallKind::BlockedWorker)
        .unwrap();
    let dur = e.duration_seconds.unwrap();
    assert!((2.0..3.5).contains(&dur), "{dur}");
    assert_eq!(
        app.metric("vpnbot_watchdog_stall_duration_seconds_count{kind=\"blocked_worker\"}"),
        Some(1.0)
    );
    assert_eq!(app.metric("vpnbot_runtime_stalled"), Some(0.0));
}

/// Issue 17: one blocked worker of two must not stop the runtime's timers, nor read as
/// `runtime_stalled`. The block starts from a timer wake on an idle runtime (the shape in which
/// the worker holding the drivers ends up blocked) while another timer is due; repeated.
/// The runtime runs with eager driver hand-off, tokio's guard against exactly that shape; on
/// this machine the test also passes without it, so it guards the property, not that option.
#[test]
fn one_blocked_worker_leaves_the_timers_running_and_is_not_a_runtime_stall() {
    let _g = serial();
    let app = App::new();
    let mut worst = Duration::ZERO;
    for round in 0..6 {
        // Let the runtime go idle: one worker parks on the drivers, the other on its condvar.
        std::thread::sleep(Duration::from_millis(300));
        // The block starts from a timer wake at an offset no other timer shares, so the woken
        // worker has exactly one task and (without hand-off) tells nobody.
        let blocker = app.rt().spawn(async {
            tokio::time::sleep(Duration::from_millis(117)).await;
            std::thread::sleep(Duration::from_millis(1000));
        });
        // A timer due during the block: it fires on time only if the other worker drives it.
        let sleeper = app.rt().spawn(async {
            let t = Instant::now();
            tokio::time::sleep(Duration::from_millis(300)).await;
            t.elapsed()
        });
        let mut stalled = false;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(1400) {
            stalled |= app.diag.open_kinds().contains(&StallKind::RuntimeStalled);
            std::thread::sleep(Duration::from_millis(10));
        }
        let slept = app.rt().block_on(async {
            blocker.await.unwrap();
            sleeper.await.unwrap()
        });
        worst = worst.max(slept);
        assert!(
            !stalled,
            "round {round}: one blocked worker of two was seen as runtime_stalled (a 300 ms timer took {slept:?})"
        );
    }
    eprintln!("worst 300 ms timer with one worker blocked for 1 s: {worst:?}");
    assert!(
        worst < Duration::from_millis(600),
        "timers stopped while one worker was blocked: a 300 ms sleep took {worst:?}"
    );
}

#[test]
fn r2_every_worker_blocked_is_runtime_stalled_seen_from_another_thread() {
    let _g = serial();
    let app = App::new();
    // The steady state: run alone, this test would otherwise time the start-up symbol load
    // (seconds for this debug binary) inside its dumps.
    wait_for_symbols();
    let began = Instant::now();
    let line = line!() + 3;
    for _ in 0..2 {
        let _ = app.rt().block_on(async {
            app.tasks.spawn_named("outbox", async {
                std::thread::sleep(Duration::from_millis(2500));
            })
        });
    }
    // An observability-style check from its own OS thread, as /healthz and /metrics do.
    let diag = app.diag.clone();
    let registry = app.registry.clone();
    let observer = std::thread::spawn(move || {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(4) {
            if diag.stall() == Some(StallKind::RuntimeStalled) {
                let seen = Instant::now();
                let text = vpnbot::metrics::render(&registry);
                let t1 = Instant::now();
                let d = diag.dump_now();
                return Some((seen, text, d, t1.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    });
    let (detected, text, on_demand, dump_time) =
        observer.join().unwrap().expect("runtime_stalled seen");
    let latency = detected - began;
    eprintln!("R2 detection latency {latency:?}, on-demand dump {dump_time:?}");
    assert!(
        latency <= Duration::from_secs_f64(THRESHOLD) + SLACK,
        "{latency:?}"
    );
    assert!(text.contains("\nvpnbot_runtime_stalled 1\n"));
    let hb: f64 = text
        .lines()
        .find(|l| l.starts_with("vpnbot_runtime_heartbeat_age_seconds "))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(hb >= THRESHOLD * 0.8, "{hb}");
    assert!(dump_time < Duration::from_secs(3), "{dump_time:?}");
    assert!(
        on_demand.task_dump.status.starts_with("skipped"),
        "{}",
        on_demand.task_dump.status
    );

    let d = app.wait_dump(StallKind::RuntimeStalled, Duration::from_secs(5));
    eprintln!("{}", d.verdict);
    assert!(d.verdict.starts_with("runtime_stalled: "), "{}", d.verdict);
    assert!(
        d.verdict.contains("2 of 2 workers blocked"),
        "{}",
        d.verdict
    );
    assert!(d.verdict.contains("task \"outbox\""), "{}", d.verdict);
    assert!(
        d.verdict.contains(&format!("{FILE}:{line}")),
        "{}",
        d.verdict
    );
    let blocked: Vec<_> = d.workers.iter().filter(|w| w.blocked).collect();
    assert_eq!(blocked.len(), 2);
    for w in blocked {
        let stack = w
            .native_stack
            .as_ref()
            .unwrap_or_else(|| panic!("no native stack: {:?}", w.stack_unavailable));
        assert!(stack.iter().any(|f| is_sleep_call(f)), "{stack:#?}");
    }
    assert_eq!(
        app.metric("vpnbot_watchdog_stalls_total{kind=\"runtime_stalled\"}"),
        Some(1.0)
    );
}

/// Spins without yielding; `inline(never)` so the native stack names it.
#[inline(never)]
fn spin_for(d: Duration) -> u64 {
    let t0 = Instant::now();
    let mut x = 0u64;
    while t0.elapsed() < d {
        for i in 0..100_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
    x
}

#[test]
fn r3_non_yielding_cpu_loop_is_a_blocked_worker_running_on_cpu() {
    let _g = serial();
    let app = App::new();
    let start = Arc::new(Mutex::new(None::<Instant>));
    let st = start.clone();
    let line = line!() + 2;
    let _h = app.rt().block_on(async {
        app.tasks.spawn_named("expiry", async move {
            *st.lock().unwrap() = Some(Instant::now());
            spin_for(Duration::from_millis(2500));
        })
    });
    let detected = app
        .wait_kind(StallKind::BlockedWorker, Duration::from_secs(5))
        .expect("blocked_worker detected");
    let latency = detected - start.lock().unwrap().unwrap();
    eprintln!("R3 detection latency {latency:?}");
    assert!(
        latency <= Duration::from_secs_f64(THRESHOLD) + SLACK,
        "{latency:?}"
    );
    let d = app.wait_dump(StallKind::BlockedWorker, Duration::from_secs(5));
    eprintln!("{}", d.verdict);
    assert!(d.verdict.contains("task \"expiry\""), "{}", d.verdict);
    assert!(
        d.verdict.contains(&format!("{FILE}:{line}")),
        "{}",
        d.verdict
    );
    assert!(d.verdict.contains("running on CPU"), "{}", d.verdict);
    let w = d.workers.iter().find(|w| w.blocked).unwrap();
    assert_eq!(w.proc.as_ref().unwrap().state, "R");
    let stack = w
        .native_stack
        .as_ref()
        .unwrap_or_else(|| panic!("no native stack: {:?}", w.stack_unavailable));
    assert!(stack.iter().any(|f| f.contains("spin_for")), "{stack:#?}");
}

#[test]
fn r4_timed_out_iteration_releases_its_lock_and_the_next_iteration_runs() {
    let _g = serial();
    let app = App::new();
    let lock = Arc::new(tokio::sync::Mutex::new(0u32));
    let iterations = Arc::new(AtomicU64::new(0));
    let (l, it, diag) = (lock.clone(), iterations.clone(), app.diag.clone());
    // One iteration: 200 ms timeout + 100 ms pause.
    let interval = Duration::from_millis(300);
    let _h = app.rt().block_on(async {
        app.tasks.spawn_named("reconcile", async move {
            loop {
                let step = async {
                    let mut g = l.lock().await;
                    *g += 1;
                    // Awaits forever while holding the lock, like a body that never arrives.
                    std::future::pending::<()>().await;
                }
                .instrument(tracing::info_span!(
                    target: "diagnostics_stalls",
                    "reconcile.iteration",
                    deadline_seconds = 0.2
                ));
                let _ = tokio::time::timeout(Duration::from_millis(200), step).await;
                it.fetch_add(1, Ordering::Relaxed);
                diag.record_worker_run("reconcile", interval);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    std::thread::sleep(Duration::from_millis(1500));
    let n = iterations.load(Ordering::Relaxed);
    assert!(n >= 3, "only {n} iterations ran");
    // The lock is free between iterations and each iteration took it.
    let taken = app.rt().block_on(async {
        tokio::time::timeout(Duration::from_millis(500), lock.lock())
            .await
            .map(|g| *g)
    });
    assert!(taken.expect("lock released by cancelled iterations") >= 3);
    assert!(app.diag.episodes().is_empty(), "{:?}", app.diag.episodes());
    // No iteration span stays open after cancellation.
    assert!(!spans()
        .entries()
        .iter()
        .any(|e| e.operation.as_deref() == Some("reconcile.iteration")
            && e.age > Duration::from_millis(400)));
}

/// A node-call registry stand-in with the fields the node client's adapter fills.
#[derive(Default)]
struct Calls {
    entries: Mutex<Vec<(Instant, &'static str, &'static str, &'static str)>>,
    last_success: Mutex<Option<Instant>>,
    pool: bool,
}

impl InflightSource for Calls {
    fn section(&self) -> &'static str {
        if self.pool {
            "db_pool"
        } else {
            "node_calls"
        }
    }
    fn entries(&self) -> Vec<InflightEntry> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(|(t, node, op, phase)| {
                let mut e = InflightEntry::started_at(
                    if self.pool {
                        InflightKind::PoolWait
                    } else {
                        InflightKind::NodeCall
                    },
                    *t,
                );
                if self.pool {
                    e.label = Some(op.to_string());
                } else {
                    e.node = Some(node.to_string());
                    e.operation = Some(op.to_string());
                    e.phase = Some(phase.to_string());
                    e.deadline = Some(Duration::from_millis(300));
                    e.detail = format!("headers after 12 ms, 0 body bytes, phase {phase}");
                }
                e
            })
            .collect()
    }
    fn last_success(&self) -> Option<Instant> {
        *self.last_success.lock().unwrap()
    }
}

#[test]
fn r5_await_that_never_completes_is_operation_overdue_with_span_and_task_dump() {
    let _g = serial();
    let app = App::new();
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let holder = lock.clone().try_lock_owned().unwrap();
    let began = Instant::now();
    let l = lock.clone();
    let _h = app.rt().block_on(async {
        app.tasks.spawn_named(
            "bot_handler",
            async move {
                let _g = l.lock().await; // never granted
            }
            .instrument(tracing::info_span!(
                target: "diagnostics_stalls",
                "handler",
                deadline_seconds = 0.3,
                label = "buy"
            )),
        )
    });
    let detected = app
        .wait_kind(StallKind::OperationOverdue, Duration::from_secs(5))
        .expect("operation_overdue detected");
    let latency = detected - began;
    eprintln!("R5 detection latency {latency:?}");
    // deadline 0.3 s + grace 0.1 s, then watchdog resolution.
    assert!(latency >= Duration::from_millis(400), "{latency:?}");
    assert!(latency <= Duration::from_millis(400) + SLACK, "{latency:?}");
    assert_eq!(app.diag.stall(), None, "runtime itself is fine");
    let d = app.wait_dump(StallKind::OperationOverdue, Duration::from_secs(5));
    eprintln!("{}", d.verdict);
    assert!(
        d.verdict
            .starts_with("operation_overdue: task \"bot_handler\" handler label \"buy\""),
        "{}",
        d.verdict
    );
    assert!(d.verdict.contains("of a 0.3 s deadline"), "{}", d.verdict);
    assert!(
        d.task_dump.status.starts_with("complete"),
        "{}",
        d.task_dump.status
    );
    let t = d
        .task_dump
        .tasks
        .iter()
        .find(|t| t.name.as_deref() == Some("bot_handler"))
        .expect("bot_handler in the task dump");
    assert!(t.spawned_at.as_deref().unwrap().starts_with(FILE), "{t:?}");
    // With line tables only (dev profile) frames name the file, not always the type.
    assert!(
        t.trace.contains("Mutex") || t.trace.contains("sync/mutex.rs"),
        "{}",
        t.trace
    );
    assert!(app
        .metric("vpnbot_watchdog_episode_info{kind=\"operation_overdue\",label=\"buy\",node=\"\",operation=\"handler\",phase=\"\",task=\"bot_handler\"}")
        .is_some());
    drop(holder);
}

#[test]
fn r5_inflight_sources_feed_operation_overdue_pool_starved_and_worker_overdue() {
    let _g = serial();
    let app = App::new();
    let calls = Arc::new(Calls::default());
    let pool = Arc::new(Calls {
        pool: true,
        ..Default::default()
    });
    app.diag.add_source(calls.clone());
    app.diag.add_source(pool.clone());
    app.diag
        .record_worker_run("expiry", Duration::from_millis(100));
    calls
        .entries
        .lock()
        .unwrap()
        .push((Instant::now(), "a", "list-users", "body"));
    pool.entries
        .lock()
        .unwrap()
        .push((Instant::now(), "", "reconcile.snapshot", ""));
    for kind in [
        StallKind::OperationOverdue,
        StallKind::PoolStarved,
        StallKind::WorkerOverdue,
    ] {
        assert!(
            app.wait_kind(kind, Duration::from_secs(3)).is_some(),
            "{kind} not detected"
        );
    }
    let d = app.diag.dump_now();
    eprintln!("{}", d.verdict);
    assert!(
        d.verdict
            .starts_with("operation_overdue: node \"a\" list-users phase body has run"),
        "{}",
        d.verdict
    );
    assert!(d.verdict.contains("headers after 12 ms"), "{}", d.verdict);
    assert!(
        d.pool_starved[0].contains("reconcile.snapshot"),
        "{:?}",
        d.pool_starved
    );
    assert!(
        d.worker_overdue[0].contains("\"expiry\""),
        "{:?}",
        d.worker_overdue
    );
    assert!(app
        .metric("vpnbot_watchdog_episode_info{kind=\"operation_overdue\",label=\"\",node=\"a\",operation=\"list-users\",phase=\"body\",task=\"\"}")
        .is_some());
    // A successful acquire ends pool_starved; the removed call ends operation_overdue.
    *pool.last_success.lock().unwrap() = Some(Instant::now());
    calls.entries.lock().unwrap().clear();
    std::thread::sleep(Duration::from_millis(300));
    let open = app.diag.open_kinds();
    assert!(!open.contains(&StallKind::OperationOverdue), "{open:?}");
    assert!(!open.contains(&StallKind::PoolStarved), "{open:?}");
}

/// A worker that stops on purpose (shutdown, lost leadership) drops its `WorkerWatch`: its
/// silence afterwards is not `worker_overdue` (an ex-leader must not page for workers it no
/// longer runs), while a worker that is still registered and silent is.
#[test]
fn a_stopped_worker_is_not_overdue_a_silent_one_is() {
    let _g = serial();
    let app = App::new();
    let watch = WorkerWatch::start(Some(&app.diag), "outbox", Duration::from_millis(100));
    assert!(
        app.wait_kind(StallKind::WorkerOverdue, Duration::from_secs(3))
            .is_some(),
        "a silent registered worker is overdue"
    );
    assert!(app.diag.dump_now().worker_overdue[0].contains("\"outbox\""));
    drop(watch);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !app.diag.open_kinds().contains(&StallKind::WorkerOverdue),
        "{:?}",
        app.diag.open_kinds()
    );
    assert!(app.diag.dump_now().worker_overdue.is_empty());

    // A watch that keeps reporting runs is never overdue.
    let watch = WorkerWatch::start(Some(&app.diag), "expiry", Duration::from_millis(100));
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(60));
        watch.ran(Duration::from_millis(100));
    }
    assert!(!app.diag.open_kinds().contains(&StallKind::WorkerOverdue));
}

#[test]
fn no_false_positive_under_moderate_normal_load() {
    let _g = serial();
    let app = App::new();
    let stop = tokio_util::sync::CancellationToken::new();
    app.rt().block_on(async {
        for i in 0..40u64 {
            let stop = stop.clone();
            app.tasks.spawn_named("bot_handlers", async move {
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    let span = tracing::info_span!(
                        target: "diagnostics_stalls",
                        "handler",
                        deadline_seconds = 1.0
                    );
                    async {
                        tokio::time::sleep(Duration::from_millis(1 + i % 7)).await;
                        // A short CPU burst (~1 ms) and some yields.
                        spin_for(Duration::from_micros(300 + 20 * i));
                        for _ in 0..10 {
                            tokio::task::yield_now().await;
                        }
                    }
                    .instrument(span)
                    .await;
                    n += 1;
                }
                n
            });
        }
        let diag = app.diag.clone();
        let stop2 = stop.clone();
        app.tasks.spawn_named("expiry", async move {
            while !stop2.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                diag.record_worker_run("expiry", Duration::from_millis(100));
            }
        });
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(app.diag.episodes().is_empty(), "{:?}", app.diag.episodes());
    assert!(app.diag.latest_dump().is_none());
    assert!(
        app.metric("vpnbot_runtime_scheduler_lag_seconds_count")
            .unwrap()
            > 10.0
    );
    assert!(
        app.metric("vpnbot_runtime_probe_first_poll_delay_seconds_count")
            .unwrap()
            > 10.0
    );
    assert!(app.metric("vpnbot_runtime_polls_total").unwrap() > 1000.0);
    assert!(
        app.metric("vpnbot_task_polls_total{task=\"bot_handlers\"}")
            .unwrap()
            > 1000.0
    );
    assert!(
        app.metric("vpnbot_runtime_poll_duration_seconds_count")
            .unwrap()
            > 1000.0
    );
    assert_eq!(app.metric("vpnbot_runtime_workers"), Some(2.0));
    // Healthy on-demand dump: verdict says so and the task dump completes. A dump skips the
    // task dump while some poll has lasted 5 ms (tokio's barrier would hold the other worker
    // for it); under this load, and beside the other tests of this binary, one such poll can
    // coincide with a dump, so a healthy runtime gets a few tries.
    let mut d = app.diag.dump_now();
    for _ in 0..20 {
        if d.task_dump.status.starts_with("complete") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        d = app.diag.dump_now();
    }
    assert!(
        d.verdict.starts_with("no stall: runtime healthy"),
        "{}",
        d.verdict
    );
    assert!(
        d.task_dump.status.starts_with("complete"),
        "{}",
        d.task_dump.status
    );
    let (ticks, cpu) = app.diag.watchdog_cost();
    eprintln!("watchdog: {ticks} ticks, {cpu:.4} s CPU");
    assert!(ticks > 30);
    stop.cancel();
}

#[test]
fn exit_policy_child() {
    // Runs only as the child of `exit_after_stall_exits_with_a_distinct_code_after_the_dump`.
    let Some(dir) = std::env::var_os("DIAG_EXIT_CHILD_DIR") else {
        return;
    };
    let app = App::with(|s| {
        s.exit_after_stall_seconds = Some(Duration::from_millis(500));
        s.dump_dir = dir.into();
    });
    for _ in 0..2 {
        app.rt()
            .spawn(async { std::thread::sleep(Duration::from_secs(10)) });
    }
    std::thread::sleep(Duration::from_secs(8));
    panic!("the exit policy did not exit");
}

#[test]
fn exit_after_stall_exits_with_a_distinct_code_after_the_dump() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "diagnostics_stalls::exit_policy_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DIAG_EXIT_CHILD_DIR", dir.path())
        .output()
        .unwrap();
    eprintln!("child exited after {:?}", t0.elapsed());
    assert_eq!(
        out.status.code(),
        Some(vpnbot::diagnostics::STALL_EXIT_CODE),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let exit_dump = files
        .iter()
        .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap())
        .find(|t| t.contains("\"trigger\": \"exit\""))
        .unwrap_or_else(|| panic!("no exit dump among {files:?}"));
    assert!(exit_dump.contains("runtime_stalled"));
}

/// branch `break` (O3): a poll that blocks a worker past the poll-time histogram's last finite
/// bucket (~4 s) lands in `+Inf`, and `_sum` adds the bucket's *start* (~4 s), so an
/// 11-minute blocked poll reads as ~4 s. Shown here with 6 s.
#[test]
fn o3_long_blocked_poll_is_not_capped_in_the_poll_time_histogram() {
    let _s = serial();
    let app = App::new();
    let before = app
        .metric("vpnbot_runtime_poll_duration_seconds_sum")
        .unwrap_or(0.0);
    let h = app.rt().spawn(async {
        std::thread::sleep(Duration::from_secs(6));
    });
    app.rt().block_on(h).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let text = vpnbot::metrics::render(&app.registry);
    let sum = app
        .metric("vpnbot_runtime_poll_duration_seconds_sum")
        .unwrap();
    let top_finite = text
        .lines()
        .filter(|l| l.starts_with("vpnbot_runtime_poll_duration_seconds_bucket"))
        .filter_map(|l| {
            l.split("le=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    assert!(
        sum - before >= 5.5 && top_finite >= 1800.0,
        "a 6 s poll reads as {:.2} s; top finite bucket {top_finite} s",
        sum - before
    );
}

/// One raw HTTP/1.1 GET over loopback; the status line and body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: vpnbot\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn on_demand_dumps_under_a_blocked_worker_are_single_flight_and_leave_healthz_answering() {
    let _g = serial();
    let app = App::new();
    let health = Arc::new(vpnbot::obs::health::HealthState {
        diagnostics: Some(Arc::new(app.diag.clone())),
        ..Default::default()
    });
    let obs = vpnbot::obs::server::ObsServer::start(
        "127.0.0.1:0".parse().unwrap(),
        vpnbot::obs::server::ObsState {
            registry: app.registry.clone(),
            health: health.clone(),
        },
    )
    .unwrap();
    let addr = obs.addr();
    // A worker blocked for the whole test; the watchdog's own episode dump comes first.
    let _h = app.rt().block_on(async {
        app.tasks.spawn_named("reconcile", async {
            std::thread::sleep(Duration::from_secs(6));
        })
    });
    app.wait_dump(StallKind::BlockedWorker, Duration::from_secs(5));
    let captures_before = vpnbot::diagnostics::stack::captures_started();

    // 50 concurrent on-demand dumps.
    let requests: Vec<_> = (0..50)
        .map(|_| std::thread::spawn(move || http_get(addr, "/debug/dump?now=1")))
        .collect();
    // /healthz keeps answering while they are served.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let r = http_get(addr, "/healthz");
        slowest = slowest.max(t.elapsed());
        assert!(r.contains("stalled: blocked_worker"), "{r}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let bodies: Vec<String> = requests.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!("slowest /healthz during 50 dumps: {slowest:?}");
    assert!(slowest < Duration::from_millis(100), "{slowest:?}");
    for b in &bodies {
        assert!(b.starts_with("HTTP/1.1 200"), "{}", &b[..b.len().min(300)]);
        let json = b.split_once("\r\n\r\n").map(|(_, j)| j).unwrap_or_default();
        let d: serde_json::Value = serde_json::from_str(json).expect("dump is JSON");
        assert!(
            d["workers"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["blocked"] == true)),
            "dump shows the blocked worker: {json}"
        );
    }
    let captures = vpnbot::diagnostics::stack::captures_started() - captures_before;
    assert!(captures <= 1, "{captures} stack captures for one interval");
    assert_eq!(health.on_demand.builds(), 1, "one dump for 50 requests");
    obs.stop();
}

/// Issue 17, the root cause of the occasional `runtime_stalled` for one blocked worker of two:
/// tokio's task dump (`Handle::dump`) stops every worker in a barrier until all have joined,
/// and a worker joins only between polls. A dump started (on demand, or for another episode)
/// while one worker is early in a blocking poll, before the watchdog calls it blocked, held
/// the other worker in that barrier until the poll returned: no heartbeat, no probe, no
/// timers, every time (3 rounds of 3 before the fix). Now the dump sees the long poll and
/// skips the task dump; the block stays `blocked_worker` and the timers keep running.
#[test]
fn a_dump_during_a_young_blocking_poll_does_not_stall_the_other_worker() {
    let _g = serial();
    let app = App::new();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let h = app.rt().spawn(async {
            std::thread::sleep(Duration::from_millis(1500));
        });
        // A timer due during the block: it fires on time only if the other worker runs.
        let sleeper = app.rt().spawn(async {
            let t = Instant::now();
            tokio::time::sleep(Duration::from_millis(500)).await;
            t.elapsed()
        });
        // The block has begun and is far below the 0.3 s threshold: an on-demand dump now.
        std::thread::sleep(Duration::from_millis(20));
        let diag = app.diag.clone();
        let dumper = std::thread::spawn(move || diag.dump_now());
        let mut stalled = false;
        let mut blocked = false;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(1800) {
            let open = app.diag.open_kinds();
            stalled |= open.contains(&StallKind::RuntimeStalled);
            blocked |= open.contains(&StallKind::BlockedWorker);
            std::thread::sleep(Duration::from_millis(10));
        }
        let d = dumper.join().unwrap();
        let slept = app.rt().block_on(async {
            h.await.unwrap();
            sleeper.await.unwrap()
        });
        eprintln!(
            "round {round}: task dump: {}; 500 ms timer took {slept:?}",
            d.task_dump.status
        );
        assert!(
            !stalled,
            "round {round}: a task dump during a blocking poll stalled the runtime ({})",
            d.task_dump.status
        );
        assert!(blocked, "round {round}: blocked_worker not detected");
        assert!(
            d.task_dump.status.starts_with("skipped: vpnbot-wrk-")
                && d.task_dump.status.contains("in one poll"),
            "{}",
            d.task_dump.status
        );
        assert!(slept < Duration::from_millis(900), "{slept:?}");
    }
}

/// Issue 17: a dump's "worker N" is tokio's worker index (the index a task sees in
/// `tokio::runtime::worker_index()` and the `worker` label of the runtime metrics), and the
/// thread running it is named `vpnbot-wrk-N`, in the dump and at the OS level
/// (`/proc/self/task/<tid>/comm`, what `ps`, `top` and debuggers show).
#[test]
fn dump_worker_numbers_are_tokio_worker_indices_and_match_thread_names() {
    let _g = serial();
    let app = App::new();
    let seen = Arc::new(Mutex::new(None::<usize>));
    let s2 = seen.clone();
    let h = app.rt().spawn(async move {
        *s2.lock().unwrap() = tokio::runtime::worker_index();
        std::thread::sleep(Duration::from_millis(1200));
    });
    app.wait_kind(StallKind::BlockedWorker, Duration::from_secs(5))
        .expect("blocked_worker detected");
    let d = app.wait_dump(StallKind::BlockedWorker, Duration::from_secs(5));
    let index = seen.lock().unwrap().expect("the task ran on a worker");
    let w = d
        .workers
        .iter()
        .find(|w| w.blocked)
        .expect("a blocked worker");
    eprintln!("{}", d.verdict);
    assert_eq!(w.worker, Some(index), "{}", d.verdict);
    assert_eq!(w.thread_name, format!("vpnbot-wrk-{index}"));
    let comm = std::fs::read_to_string(format!("/proc/self/task/{}/comm", w.tid)).unwrap();
    assert_eq!(comm.trim(), w.thread_name);
    assert!(
        d.verdict.starts_with(&format!(
            "blocked_worker: worker {index} (vpnbot-wrk-{index}) "
        )),
        "{}",
        d.verdict
    );
    app.rt().block_on(h).unwrap();

    // Both workers, each under its own number, once both have polled something.
    let t0 = Instant::now();
    loop {
        app.rt().block_on(async {
            let hs: Vec<_> = (0..64)
                .map(|_| tokio::spawn(tokio::task::yield_now()))
                .collect();
            for h in hs {
                h.await.unwrap();
            }
        });
        let d = app.diag.dump_now();
        let mut named: Vec<(Option<usize>, String)> = d
            .workers
            .iter()
            .map(|w| (w.worker, w.thread_name.clone()))
            .collect();
        named.sort();
        if named.len() == 2 || t0.elapsed() > Duration::from_secs(5) {
            assert_eq!(
                named,
                vec![
                    (Some(0), "vpnbot-wrk-0".to_owned()),
                    (Some(1), "vpnbot-wrk-1".to_owned())
                ]
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 17, the root cause of the occasional `runtime_stalled` in the demo: tokio 1.54's
/// task dump leaves a worker waiting in its end barrier when another worker joined more than
/// 250 ms late (its start barrier keeps a timed-out arrival). The runtime then runs on one
/// worker of two, and one blocked poll stalls it all. Seen in the demo as the free worker's
/// native stack in `Barrier::wait` under `trace_core` with no dump in flight.
///
/// Here: a raw `Handle::dump` while one worker is inside a 700 ms poll (what any late join
/// does), then `release_task_dump_barrier` (what every vpnbot dump now runs after its task
/// dump) must find the worker left behind, and a following 1 s block of one worker must stay
/// `blocked_worker` with the timers running.
#[test]
fn a_worker_left_in_tokios_task_dump_barrier_is_found_and_released() {
    let _g = serial();
    let app = App::new();
    std::thread::sleep(Duration::from_millis(300));
    let h = app.rt().spawn(async {
        std::thread::sleep(Duration::from_millis(700));
    });
    std::thread::sleep(Duration::from_millis(20));
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = app.rt().handle().clone();
    app.rt().spawn(async move {
        let d = handle.dump().await;
        let _ = tx.send(d.tasks().iter().count());
    });
    let traced = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("raw task dump finished");
    app.rt().block_on(h).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let found = app.diag.release_task_dump_barrier();
    eprintln!("raw dump traced {traced} tasks; left behind: {found:?}");
    assert!(
        !found.is_empty(),
        "a late join must leave a worker in tokio's barrier (tokio fixed it? then task dumps \
         can be on by default)"
    );
    // A release can itself leave the other worker briefly waiting (the stale arrival); a
    // further check finds nobody left within a few rounds.
    let mut rounds = 0;
    while !app.diag.release_task_dump_barrier().is_empty() {
        rounds += 1;
        assert!(rounds < 3, "workers still left in tokio's barrier");
    }

    // Both workers serve again: one blocked worker is blocked_worker, timers keep running.
    let blocker = app.rt().spawn(async {
        std::thread::sleep(Duration::from_millis(1000));
    });
    let sleeper = app.rt().spawn(async {
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.elapsed()
    });
    let mut stalled = false;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1300) {
        stalled |= app.diag.open_kinds().contains(&StallKind::RuntimeStalled);
        std::thread::sleep(Duration::from_millis(10));
    }
    let slept = app.rt().block_on(async {
        blocker.await.unwrap();
        sleeper.await.unwrap()
    });
    assert!(!stalled, "runtime_stalled after the release");
    assert!(slept < Duration::from_millis(700), "{slept:?}");
}

/// Two dumps at the same moment (the watchdog's episode dump and an on-demand one, as in a CI
/// run of `r2` where the episode dump came out without stacks) each get the stacks: a capture
/// that finds another running waits for it instead of failing at once.
#[test]
fn concurrent_captures_all_get_the_stack() {
    let _g = serial();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let sleeper = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
        std::thread::sleep(Duration::from_secs(3));
    });
    let tid = tid_rx.recv().unwrap();
    let start = Arc::new(std::sync::Barrier::new(4));
    let captures: Vec<_> = (0..4)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                vpnbot::diagnostics::stack::capture_bounded(
                    &[tid],
                    vpnbot::diagnostics::stack::HELPER_TIMEOUT,
                    vpnbot::diagnostics::stack::CAPTURE_TIMEOUT,
                )
            })
        })
        .collect();
    for c in captures {
        let stacks = c
            .join()
            .unwrap()
            .expect("every concurrent capture succeeds");
        let frames = stacks.get(&tid).expect("the sleeping thread's stack");
        assert!(frames.iter().any(|f| is_sleep_call(f)), "{frames:#?}");
    }
    sleeper.join().unwrap();
}
