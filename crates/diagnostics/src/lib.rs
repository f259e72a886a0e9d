//! Runtime diagnostics: tokio runtime and task metrics, a scheduler-lag probe, per-worker poll
//! tracking, and a watchdog OS thread that catches a stall while it happens and dumps what
//! every worker and operation was doing.
//!
//! Two classes of stall, two detectors:
//! - a worker thread blocked or never yielding: runtime poll hooks record, per worker, which
//!   task is being polled; the watchdog thread (not a task) sees a poll that lasts past the
//!   threshold (`blocked_worker`), or the heartbeat and a spawned probe both stuck
//!   (`runtime_stalled`);
//! - a task awaiting something that never completes while the runtime is fine: in-flight
//!   registries ([`InflightSource`]: node calls, pool holders/waiters, open spans) are read by
//!   the watchdog (`operation_overdue`, `pool_starved`), and periodic workers report their runs
//!   (`worker_overdue`).
//!
//! This crate knows nothing of the service that embeds it: it depends on tokio, tokio-metrics,
//! tracing, prometheus and the stack-capture crate only. What it watches beyond the runtime
//! comes in through [`InflightSource`] (the embedding service registers its own registries of
//! in-flight work), [`Diagnostics::record_worker_run`] (periodic workers) and [`ProgressSink`]
//! (a service manager's watchdog). The service names itself once ([`Naming`]): metric names
//! (`<service>_runtime_workers`), thread names (`<service>-watchdog`, `<service>-wrk-0`) and dump
//! files follow it.
//!
//! Wiring (in `main`): [`stack::maybe_run_child`] first; [`OpenSpansLayer`] (and
//! [`console_layer`]) into the subscriber; [`Diagnostics::new`] with the service's [`Naming`]
//! before the runtime;
//! [`runtime::build_main_runtime`]; then [`Diagnostics::start`] with the runtime handle, the
//! task registry and, optionally, a [`ProgressSink`] (e.g. systemd's watchdog).
//!
//! tokio-console: set `diagnostics.console_enabled = true`, add [`console_layer`] with a filter
//! that enables `tokio=trace,runtime=trace`, and attach with `tokio-console
//! http://127.0.0.1:6669`.

#[cfg(not(tokio_unstable))]
compile_error!(
    "the diagnostics crate needs `--cfg tokio_unstable` (poll hooks, task ids, Handle::dump): \
     set it in .cargo/config.toml's build.rustflags or in RUSTFLAGS."
);

pub mod bench;
mod detect;
mod dump;
mod inflight;
pub mod lateness;
pub mod metrics;
mod naming;
mod open_spans;
mod poll_tracking;
mod recent;
pub mod runtime;
mod runtime_metrics;
pub mod seconds;
mod settings;
pub mod stack;
pub mod tasks;
mod trace_barrier;
mod worker_watch;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{Gauge, Histogram, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use serde::Serialize;
use tokio::runtime::Handle;

pub use detect::Culprit;
pub use dump::{
    Dump, PollingTask, RuntimeSnapshot, TaskCensus, TaskDumpSection, TaskTrace, WorkerDump,
};
pub use inflight::{
    InflightEntry, InflightKind, InflightSource, SourceEpisode, MAX_DETAIL_LEN, MAX_FIELD_LEN,
};
pub use naming::Naming;
pub use open_spans::{
    OpenSpans, OpenSpansLayer, SpanTargets, MAX_OPEN_SPANS, SHARDS as OPEN_SPAN_SHARDS,
    TRACKED_LEVEL,
};
pub use recent::RecentEvent;
pub use runtime_metrics::POLL_TIME_HISTOGRAM;
pub use settings::*;
pub use worker_watch::{run_every, WorkerWatch};

use crate::metrics::DURATION_BUCKETS_SECONDS;
use crate::tasks::Tasks;
use dump::WorkerView;
use poll_tracking::{with_spawn_name, PollTracker};
use runtime_metrics::{PollTimeCollector, RuntimeMetricsExporter};

/// Kind of stall, most severe first (the order of [`Ord`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StallKind {
    /// The heartbeat has not advanced and a spawned probe has not been polled.
    RuntimeStalled,
    /// One poll has run longer than the threshold.
    BlockedWorker,
    /// vpnbot's own database backends wait on a lock held by another session (reported by
    /// the database monitor, the embedding service's database monitor).
    DbLockWait,
    /// The service makes no progress: updates wait for a handler slot, or busy handlers
    /// complete nothing, past `bot.starved_after_seconds`; the culprit is what the busy
    /// handlers wait on.
    ServiceStarved,
    /// A tracked operation outlived its deadline while the runtime is fine.
    OperationOverdue,
    /// Pool acquires are waiting and none succeeded for longer than the threshold.
    PoolStarved,
    /// A periodic worker has not completed a run for N times its interval.
    WorkerOverdue,
}

impl StallKind {
    /// Every kind, most severe first.
    pub const ALL: [StallKind; 7] = [
        StallKind::RuntimeStalled,
        StallKind::BlockedWorker,
        StallKind::DbLockWait,
        StallKind::ServiceStarved,
        StallKind::OperationOverdue,
        StallKind::PoolStarved,
        StallKind::WorkerOverdue,
    ];

    /// The label value (`runtime_stalled`, `blocked_worker`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            StallKind::RuntimeStalled => "runtime_stalled",
            StallKind::BlockedWorker => "blocked_worker",
            StallKind::DbLockWait => "db_lock_wait",
            StallKind::ServiceStarved => "service_starved",
            StallKind::OperationOverdue => "operation_overdue",
            StallKind::PoolStarved => "pool_starved",
            StallKind::WorkerOverdue => "worker_overdue",
        }
    }

    /// True for the kinds where the main runtime itself cannot make progress normally.
    pub fn is_runtime_level(self) -> bool {
        matches!(self, StallKind::RuntimeStalled | StallKind::BlockedWorker)
    }
}

impl std::fmt::Display for StallKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Told by the watchdog thread, once per tick, whether the main runtime made progress: a
/// service manager's keep-alive (systemd's `WATCHDOG=1`) must be sent only while it does, so a
/// total stall ends in a restart after the dump is written.
pub trait ProgressSink: Send + Sync + std::fmt::Debug {
    /// Called from the watchdog OS thread every watchdog period; must not block.
    fn watchdog_tick(&self, runtime_progressing: bool);
}

/// A past or open episode, as reported by [`Diagnostics::episodes`].
#[derive(Debug, Clone, Serialize)]
pub struct EpisodeRecord {
    /// Kind.
    pub kind: StallKind,
    /// Who it blames, as exported in `vpnbot_stall_episode_info`'s labels.
    pub culprit: Culprit,
    /// Unix seconds when the watchdog detected it.
    pub detected_unix_seconds: f64,
    /// Duration, seconds (`None` while open).
    pub duration_seconds: Option<f64>,
}

#[derive(Debug)]
struct Episode {
    started: Instant,
    culprit: Culprit,
}

#[derive(Debug, Clone, Copy)]
struct WorkerRun {
    last: Instant,
    interval: Duration,
}

struct WatchdogMetrics {
    stalled: IntGauge,
    episode_info: IntGaugeVec,
    heartbeat_age: Gauge,
    stalls_total: IntCounterVec,
    stall_duration: HistogramVec,
    last_dump: Gauge,
    scheduler_lag: Histogram,
    probe_delay: Histogram,
    dumps_total: IntCounterVec,
}

struct Inner {
    naming: Naming,
    settings: DiagnosticsSettings,
    epoch: Instant,
    tracker: Arc<PollTracker>,
    handle: Arc<OnceLock<Handle>>,
    tasks: OnceLock<Tasks>,
    sources: Mutex<Vec<Arc<dyn InflightSource>>>,
    workers: Mutex<HashMap<&'static str, WorkerRun>>,
    /// Nanoseconds since `epoch` of the last heartbeat (shared with the probe task).
    heartbeat_ns: Arc<AtomicU64>,
    /// Nanoseconds since `epoch` + 1 from which the pending probe counts as waiting; 0 = none
    /// pending. That is when the runtime last polled a probe, but at most one watchdog period
    /// before this probe was spawned: the runtime may have stopped right after that poll, and
    /// counting from the spawn alone made `runtime_stalled` take up to a period longer.
    probe_sent_ns: Arc<AtomicU64>,
    /// Nanoseconds since `epoch` + 1 when the runtime last polled a probe; 0 = never.
    probe_ran_ns: Arc<AtomicU64>,
    /// Set when the lag-probe task is dropped: the runtime shut down.
    runtime_gone: Arc<AtomicBool>,
    task_dump_in_flight: Arc<AtomicBool>,
    /// The watchdog's latest observation: what detection saw on its last tick, and what
    /// dumps read, so a dump's verdict matches what was detected.
    observation: Mutex<Arc<detect::Observation>>,
    episodes: Mutex<BTreeMap<StallKind, Episode>>,
    history: Mutex<Vec<EpisodeRecord>>,
    latest: Mutex<Option<Arc<Dump>>>,
    metrics: WatchdogMetrics,
    exporter: Mutex<RuntimeMetricsExporter>,
    started: AtomicBool,
    stop: AtomicBool,
    watchdog_ticks: AtomicU64,
    watchdog_cpu_ns: AtomicU64,
    /// The service manager, pinged from the watchdog thread while the runtime makes progress.
    supervisor: OnceLock<Arc<dyn ProgressSink>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Diagnostics")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The diagnostics of one app: cheap to clone, readable from any thread.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    inner: Arc<Inner>,
}

const EPISODE_LABELS: [&str; 6] = ["kind", "task", "node", "operation", "phase", "label"];
const HISTORY_MAX: usize = 100;

impl Diagnostics {
    /// Registers every diagnostics metric into `registry`. Create it before the runtime and
    /// pass it to [`runtime::build_main_runtime`].
    ///
    /// # Panics
    /// If the metric names are already registered in `registry`.
    pub fn new(naming: Naming, settings: DiagnosticsSettings, registry: &Registry) -> Diagnostics {
        let r = registry;
        let metrics = WatchdogMetrics {
            stalled: metrics::int_gauge(
                r,
                &naming.metric("runtime_stalled"),
                "1 while the main runtime is stalled (runtime_stalled or blocked_worker), else 0.",
            ),
            episode_info: metrics::int_gauge_vec(
                r,
                &naming.metric("watchdog_episode_info"),
                "1 while a stall episode is open; labels name the culprit (empty where they do \
                 not apply).",
                &EPISODE_LABELS,
            ),
            heartbeat_age: metrics::gauge(
                r,
                &naming.metric("runtime_heartbeat_age_seconds"),
                "Seconds since the in-runtime heartbeat last ran (updated by the watchdog).",
            ),
            stalls_total: metrics::counter_vec(
                r,
                &naming.metric("watchdog_stalls_total"),
                "Stall episodes detected, by kind.",
                &["kind"],
            ),
            stall_duration: metrics::histogram_vec(
                r,
                &naming.metric("watchdog_stall_duration_seconds"),
                "Duration of ended stall episodes, seconds, by kind.",
                &["kind"],
                DURATION_BUCKETS_SECONDS,
            ),
            last_dump: metrics::gauge(
                r,
                &naming.metric("watchdog_last_dump_timestamp_seconds"),
                "Unix time of the last diagnostic dump written by the watchdog.",
            ),
            scheduler_lag: metrics::histogram(
                r,
                &naming.metric("runtime_scheduler_lag_seconds"),
                "How late the in-runtime probe woke after its sleep, seconds.",
                DURATION_BUCKETS_SECONDS,
            ),
            probe_delay: metrics::histogram(
                r,
                &naming.metric("runtime_probe_first_poll_delay_seconds"),
                "Delay between the watchdog spawning a no-op probe task and its first poll.",
                DURATION_BUCKETS_SECONDS,
            ),
            dumps_total: metrics::counter_vec(
                r,
                &naming.metric("watchdog_dumps_total"),
                "Diagnostic dumps built, by trigger (episode, on_demand, exit).",
                &["trigger"],
            ),
        };
        for k in StallKind::ALL {
            metrics.stalls_total.with_label_values(&[k.as_str()]);
        }
        let handle = Arc::new(OnceLock::new());
        PollTimeCollector::register(r, naming, handle.clone());
        let exporter = RuntimeMetricsExporter::new(r, naming);
        Diagnostics {
            inner: Arc::new(Inner {
                naming,
                settings,
                epoch: Instant::now(),
                tracker: PollTracker::new(),
                handle,
                tasks: OnceLock::new(),
                sources: Mutex::new(Vec::new()),
                workers: Mutex::new(HashMap::new()),
                heartbeat_ns: Arc::new(AtomicU64::new(0)),
                probe_sent_ns: Arc::new(AtomicU64::new(0)),
                probe_ran_ns: Arc::new(AtomicU64::new(0)),
                runtime_gone: Arc::new(AtomicBool::new(false)),
                task_dump_in_flight: Arc::new(AtomicBool::new(false)),
                observation: Mutex::new(Arc::new(detect::Observation::default())),
                episodes: Mutex::new(BTreeMap::new()),
                history: Mutex::new(Vec::new()),
                latest: Mutex::new(None),
                metrics,
                exporter: Mutex::new(exporter),
                started: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                watchdog_ticks: AtomicU64::new(0),
                watchdog_cpu_ns: AtomicU64::new(0),
                supervisor: OnceLock::new(),
            }),
        }
    }

    /// How this service names its metrics, threads and dump files.
    pub fn naming(&self) -> Naming {
        self.inner.naming
    }

    /// The settings in force.
    pub fn settings(&self) -> &DiagnosticsSettings {
        &self.inner.settings
    }

    /// Installs the poll, spawn, terminate and thread-stop hooks into a runtime builder.
    /// [`runtime::build_main_runtime`] calls this.
    pub fn install_hooks(&self, builder: &mut tokio::runtime::Builder) {
        let t = self.inner.tracker.clone();
        builder.on_before_task_poll(move |m| t.before_poll(m));
        let t = self.inner.tracker.clone();
        builder.on_after_task_poll(move |m| t.after_poll(m));
        let t = self.inner.tracker.clone();
        builder.on_task_spawn(move |m| t.on_spawn(m));
        let t = self.inner.tracker.clone();
        builder.on_task_terminate(move |m| t.on_terminate(m));
        let t = self.inner.tracker.clone();
        builder.on_thread_stop(move || t.on_thread_stop());
    }

    /// Starts the in-runtime scheduler-lag probe on `handle` and the watchdog OS thread
    /// (`vpnbot-watchdog`), which also samples runtime and task metrics (from `tasks`'
    /// per-family monitors), writes dumps, and tells `progress` (e.g. the systemd notify
    /// protocol's `WATCHDOG=1`) on every tick whether the runtime makes progress. Calling it
    /// twice does nothing.
    ///
    /// This is where the runtime's parts are attached: the diagnostics exist before the
    /// runtime (its builder installs their poll hooks), so its handle and tasks cannot be given
    /// at [`Diagnostics::new`].
    ///
    /// # Panics
    /// When the OS refuses to create the watchdog thread.
    pub fn start(&self, handle: &Handle, tasks: &Tasks, progress: Option<Arc<dyn ProgressSink>>) {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = &self.inner;
        let _ = inner.handle.set(handle.clone());
        let _ = inner.tasks.set(tasks.clone());
        if let Some(sink) = progress {
            let _ = inner.supervisor.set(sink);
        }
        inner.touch_heartbeat();
        inner
            .exporter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .attach(handle);

        // Scheduler-lag probe.
        let hb = inner.heartbeat_ns.clone();
        let gone = RuntimeGone(inner.runtime_gone.clone());
        let lag = inner.metrics.scheduler_lag.clone();
        let interval = inner.settings.lag_probe_interval_seconds;
        let epoch = inner.epoch;
        let root = tasks.root().clone();
        with_spawn_name("diag-lag-probe", || {
            handle.spawn(async move {
                let _gone = gone;
                loop {
                    let t0 = Instant::now();
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = root.cancelled() => break,
                    }
                    let now = Instant::now();
                    lag.observe((now - t0).saturating_sub(interval).as_secs_f64());
                    hb.store((now - epoch).as_nanos() as u64, Ordering::Release);
                }
            })
        });

        if inner.settings.native_stacks && inner.settings.preload_symbols {
            stack::warm_symbols();
        }

        // Watchdog and dump threads.
        let (dump_tx, dump_rx) = mpsc::channel::<&'static str>();
        let weak = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name(self.inner.naming.thread("dump"))
            .spawn(move || dump_thread(weak, dump_rx))
            .expect("spawning the dump thread");
        let weak = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name(self.inner.naming.thread("watchdog"))
            .spawn(move || watchdog_thread(weak, dump_tx))
            .expect("spawning the watchdog thread");
    }

    /// Stops the watchdog thread (it also stops by itself when every clone is dropped or the
    /// runtime shuts down).
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::Release);
    }

    /// Whether a tokio task dump is running on the runtime now. Shutdown waits for it: a task
    /// dump still running when the runtime shuts down can block the shutdown forever.
    pub fn task_dump_in_flight(&self) -> bool {
        self.inner.task_dump_in_flight.load(Ordering::Acquire)
    }

    /// Adds an in-flight registry read by the watchdog and listed in dumps.
    pub fn add_source(&self, source: Arc<dyn InflightSource>) {
        self.inner
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(source);
    }

    /// Records that periodic worker `worker` (a fixed name) completed a run; it is
    /// `worker_overdue` once `worker_overdue_factor × interval` passes without another.
    pub fn record_worker_run(&self, worker: &'static str, interval: Duration) {
        self.inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                worker,
                WorkerRun {
                    last: Instant::now(),
                    interval,
                },
            );
    }

    /// Stops watching worker `worker`: it stopped on purpose (shutdown, lost leadership), so
    /// its silence is not `worker_overdue`. [`WorkerWatch`] calls this on drop.
    pub fn forget_worker(&self, worker: &'static str) {
        self.inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(worker);
    }

    /// The runtime-level stall now open, if any (`runtime_stalled` before `blocked_worker`):
    /// what `/healthz` answers 503 with. Readable from any thread.
    pub fn stall(&self) -> Option<StallKind> {
        self.inner
            .open_kinds()
            .into_iter()
            .find(|k| k.is_runtime_level())
    }

    /// Why the service is degraded though the runtime is fine (`service_starved` open): the
    /// starvation and what the busy handlers wait on. For `/readyz`; any thread.
    pub fn degraded(&self) -> Option<String> {
        if !self.inner.open_kinds().contains(&StallKind::ServiceStarved) {
            return None;
        }
        let sources = self.inner.observe_sources();
        let starved = sources
            .iter()
            .filter_map(|s| s.episode.as_ref())
            .find(|e| e.kind == StallKind::ServiceStarved)
            .map(|e| e.verdict.clone())
            .unwrap_or_else(|| "handlers made no progress (just recovering)".into());
        let (_, cause) = detect::service_cause(&sources);
        Some(format!("service_starved: {starved}; {cause}"))
    }

    /// Every open episode kind, most severe first.
    pub fn open_kinds(&self) -> Vec<StallKind> {
        self.inner.open_kinds()
    }

    /// Recent episodes (at most 100), oldest first.
    pub fn episodes(&self) -> Vec<EpisodeRecord> {
        self.inner
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The latest dump written by the watchdog for an episode, if any.
    pub fn latest_dump(&self) -> Option<Arc<Dump>> {
        self.inner
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Builds a dump now, on the calling thread (any thread; never needs the runtime to be
    /// responsive: the task dump runs under an OS-thread deadline). Not stored as latest.
    pub fn dump_now(&self) -> Dump {
        let d = dump::build(&self.inner, "on_demand");
        self.inner
            .metrics
            .dumps_total
            .with_label_values(&["on_demand"])
            .inc();
        d
    }

    /// Finds workers left waiting in tokio's task-dump barrier after a task dump (a tokio 1.54
    /// barrier that keeps a timed-out arrival; see the `trace_barrier` module) and releases
    /// them with one more dump, as every dump does after its task dump. Returns the workers
    /// found (tokio indices). Takes about 100 ms, more when one is found; call it from a
    /// thread outside the runtime.
    pub fn release_task_dump_barrier(&self) -> Vec<usize> {
        let Some(h) = self.inner.handle.get() else {
            return Vec::new();
        };
        let timeout = self.inner.settings.task_dump_timeout_seconds;
        trace_barrier::release(&self.inner, h, timeout).0
    }

    /// Watchdog ticks so far and CPU time the watchdog thread used, seconds.
    pub fn watchdog_cost(&self) -> (u64, f64) {
        (
            self.inner.watchdog_ticks.load(Ordering::Relaxed),
            self.inner.watchdog_cpu_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

struct RuntimeGone(Arc<AtomicBool>);
impl Drop for RuntimeGone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Inner {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn touch_heartbeat(&self) {
        self.heartbeat_ns.store(self.now_ns(), Ordering::Release);
    }

    fn heartbeat_age(&self) -> Duration {
        Duration::from_nanos(
            self.now_ns()
                .saturating_sub(self.heartbeat_ns.load(Ordering::Acquire)),
        )
    }

    fn probe_pending_age(&self) -> Option<Duration> {
        match self.probe_sent_ns.load(Ordering::Acquire) {
            0 => None,
            sent => Some(Duration::from_nanos(self.now_ns().saturating_sub(sent - 1))),
        }
    }

    fn task_dump_in_flight_arc(&self) -> Arc<AtomicBool> {
        self.task_dump_in_flight.clone()
    }

    fn open_kinds(&self) -> Vec<StallKind> {
        self.episodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    fn episode_age(&self, kind: StallKind) -> Option<Duration> {
        self.episodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kind)
            .map(|e| e.started.elapsed())
    }

    /// The in-flight registries as they are now.
    fn observe_sources(&self) -> Vec<detect::SourceObservation> {
        let sources = self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        sources
            .iter()
            .map(|src| detect::SourceObservation {
                section: src.section().to_owned(),
                entries: src.entries(),
                since_last_success: src.last_success().map(|t| t.elapsed()),
                episode: src.episode(),
            })
            .collect()
    }

    /// Everything detection needs, read now, around the workers' view of this tick.
    fn observe(&self, workers: Vec<WorkerView>) -> detect::Observation {
        let task_names = workers.iter().map(|w| task_label(self, w)).collect();
        let worker_runs = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, r)| detect::WorkerRunObservation {
                name,
                since_last: r.last.elapsed(),
                interval: r.interval,
            })
            .collect();
        detect::Observation {
            workers,
            task_names,
            heartbeat_age: self.heartbeat_age(),
            probe_pending: self.probe_pending_age(),
            sources: self.observe_sources(),
            worker_runs,
        }
    }

    /// The watchdog's latest observation.
    fn latest_observation(&self) -> Arc<detect::Observation> {
        self.observation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn runtime_snapshot(&self) -> RuntimeSnapshot {
        let Some(h) = self.handle.get() else {
            return RuntimeSnapshot::default();
        };
        let m = h.metrics();
        let n = m.num_workers();
        RuntimeSnapshot {
            workers: n,
            alive_tasks: m.num_alive_tasks(),
            global_queue_depth: m.global_queue_depth(),
            local_queue_depth: (0..n).map(|w| m.worker_local_queue_depth(w)).collect(),
            worker_polls: (0..n).map(|w| m.worker_poll_count(w)).collect(),
            worker_park_unpark: (0..n).map(|w| m.worker_park_unpark_count(w)).collect(),
            worker_busy_seconds: (0..n)
                .map(|w| m.worker_total_busy_duration(w).as_secs_f64())
                .collect(),
            worker_mean_poll_seconds: (0..n)
                .map(|w| m.worker_mean_poll_time(w).as_secs_f64())
                .collect(),
            blocking_threads: m.num_blocking_threads(),
            blocking_queue_depth: m.blocking_queue_depth(),
        }
    }

    fn store_dump(&self, d: Dump) -> Arc<Dump> {
        let d = Arc::new(d);
        let s = &self.settings;
        let json = d.to_json();
        let file = if s.dump_max_files > 0 {
            match dump::write_file(&s.dump_dir, s.dump_max_files, self.naming, &d) {
                Ok(p) => p.display().to_string(),
                Err(e) => format!("not written: {e}"),
            }
        } else {
            "disabled".into()
        };
        tracing::error!(
            target: "diagnostics::watchdog",
            kind = d.kind.map(|k| k.as_str()).unwrap_or("none"),
            verdict = %d.verdict,
            file = %file,
            dump = %json,
            "diagnostic dump"
        );
        self.metrics.last_dump.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        self.metrics
            .dumps_total
            .with_label_values(&[d.trigger])
            .inc();
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(d.clone());
        d
    }
}

fn dump_thread(weak: Weak<Inner>, rx: mpsc::Receiver<&'static str>) {
    while let Ok(trigger) = rx.recv() {
        let Some(inner) = weak.upgrade() else { return };
        let d = dump::build(&inner, trigger);
        inner.store_dump(d);
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn watchdog_thread(weak: Weak<Inner>, dump_tx: mpsc::Sender<&'static str>) {
    let (period, metrics_every) = match weak.upgrade() {
        Some(i) => (
            i.settings.watchdog_period_seconds,
            i.settings.runtime_metrics_interval_seconds,
        ),
        None => return,
    };
    let mut last_metrics = Instant::now();
    let mut last_dump: Option<(Instant, StallKind)> = None;
    let mut next = Instant::now() + period;
    loop {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += period;
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::Acquire) || inner.runtime_gone.load(Ordering::Acquire) {
            close_all(&inner);
            return;
        }
        let cpu0 = thread_cpu_ns();
        let now = Instant::now();

        // Per-worker poll tracking. Slots are numbered in the order threads first polled;
        // dumps name a worker by tokio's worker index (the `worker` label of the runtime
        // metrics and the number in its thread name, see `crate::runtime`).
        let samples = inner.tracker.sample();
        // After sampling, so that no sampled poll started later than this.
        let coarse_now = poll_tracking::coarse_now_ns();
        let worker_ids: Vec<Option<std::thread::ThreadId>> = match inner.handle.get() {
            Some(h) => {
                let m = h.metrics();
                (0..m.num_workers())
                    .map(|i| m.worker_thread_id(i))
                    .collect()
            }
            None => Vec::new(),
        };
        let mut view = Vec::with_capacity(samples.len());
        for s in samples {
            // From the poll's recorded start, less one clock tick (the start reading may lag
            // the real start by one), so the age is a lower bound.
            let poll_age = if s.task != 0 {
                Duration::from_nanos(
                    coarse_now
                        .saturating_sub(s.poll_started_ns)
                        .saturating_sub(poll_tracking::coarse_resolution_ns()),
                )
            } else {
                Duration::ZERO
            };
            view.push(WorkerView {
                worker: s
                    .thread_id
                    .and_then(|id| worker_ids.iter().position(|w| *w == Some(id))),
                thread_name: s.thread_name,
                tid: s.tid,
                polls: s.polls,
                task: s.task,
                location: s.location,
                poll_age,
            });
        }

        // Heartbeat and spawned probe.
        let hb_age = inner.heartbeat_age();
        inner.metrics.heartbeat_age.set(hb_age.as_secs_f64());
        if inner.probe_sent_ns.load(Ordering::Acquire) == 0 {
            if let Some(h) = inner.handle.get() {
                let spawned = inner.now_ns();
                let period = inner.settings.watchdog_period_seconds.as_nanos() as u64;
                let ran = inner.probe_ran_ns.load(Ordering::Acquire);
                let waiting_from = match ran {
                    0 => spawned,
                    r => (r - 1).clamp(spawned.saturating_sub(period), spawned),
                };
                inner
                    .probe_sent_ns
                    .store(waiting_from + 1, Ordering::Release);
                let (sent, ran) = (inner.probe_sent_ns.clone(), inner.probe_ran_ns.clone());
                let epoch = inner.epoch;
                let hist = inner.metrics.probe_delay.clone();
                with_spawn_name("diag-probe", || {
                    h.spawn(async move {
                        let now = epoch.elapsed().as_nanos() as u64;
                        ran.store(now + 1, Ordering::Release);
                        if sent.swap(0, Ordering::AcqRel) != 0 {
                            // The delay from the spawn itself, not from `waiting_from`.
                            hist.observe(now.saturating_sub(spawned) as f64 / 1e9);
                        }
                    })
                });
            }
        }
        // One observation, one detection: the dump reads the same observation.
        let obs = Arc::new(inner.observe(view));
        let found = detect::detect(&obs, &inner.settings);
        let runtime_stalled = found.iter().any(|d| d.kind == StallKind::RuntimeStalled);
        let any_blocked = found.iter().any(|d| d.kind == StallKind::BlockedWorker);
        inner
            .metrics
            .stalled
            .set(i64::from(runtime_stalled || any_blocked));
        *inner.observation.lock().unwrap_or_else(|e| e.into_inner()) = obs;

        // Episodes.
        let mut opened: Vec<StallKind> = Vec::new();
        {
            let mut eps = inner.episodes.lock().unwrap_or_else(|e| e.into_inner());
            let ended: Vec<StallKind> = eps
                .keys()
                .filter(|k| !found.iter().any(|d| d.kind == **k))
                .copied()
                .collect();
            for k in ended {
                let ep = eps.remove(&k).expect("present");
                end_episode(&inner, k, ep);
            }
            for d in found {
                if let std::collections::btree_map::Entry::Vacant(v) = eps.entry(d.kind) {
                    start_episode(&inner, d.kind, &d.culprit);
                    v.insert(Episode {
                        started: now,
                        culprit: d.culprit,
                    });
                    opened.push(d.kind);
                }
            }
        }
        if let Some(k) = opened.iter().min().copied() {
            let min_gap = inner.settings.dump_min_interval_seconds;
            let due = match last_dump {
                None => true,
                Some((at, prev)) => k < prev || at.elapsed() >= min_gap,
            };
            if due {
                last_dump = Some((Instant::now(), k));
                let _ = dump_tx.send("episode");
            }
        }

        // Service manager watchdog: no ping once the runtime is stalled, on the same tick that
        // asked for the episode's dump, so the supervisor's kill comes after the dump.
        if let Some(s) = inner.supervisor.get() {
            s.watchdog_tick(!runtime_stalled);
        }

        // Exit-after-stall policy.
        if let Some(limit) = inner.settings.exit_after_stall_seconds {
            if let Some(age) = inner.episode_age(StallKind::RuntimeStalled) {
                if age >= limit {
                    let d = dump::build(&inner, "exit");
                    let d = inner.store_dump(d);
                    tracing::error!(
                        target: "diagnostics::watchdog",
                        stalled_seconds = age.as_secs_f64(),
                        exit_code = STALL_EXIT_CODE,
                        verdict = %d.verdict,
                        "runtime stalled past exit_after_stall_seconds: exiting for a restart"
                    );
                    std::process::exit(STALL_EXIT_CODE);
                }
            }
        }

        // Metrics sampling from this thread, so /metrics moves during a stall.
        if last_metrics.elapsed() >= metrics_every {
            last_metrics = Instant::now();
            let families = inner.tasks.get().map(|t| t.monitors()).unwrap_or_default();
            inner
                .exporter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sample(&families);
        }
        inner.watchdog_ticks.fetch_add(1, Ordering::Relaxed);
        inner
            .watchdog_cpu_ns
            .fetch_add(thread_cpu_ns().saturating_sub(cpu0), Ordering::Relaxed);
    }
}

fn task_label(inner: &Inner, w: &WorkerView) -> String {
    inner
        .tracker
        .task(w.task)
        .and_then(|e| e.name)
        .unwrap_or("unnamed")
        .to_owned()
}

fn label_values(kind: StallKind, c: &Culprit) -> [&str; 6] {
    [
        kind.as_str(),
        &c.task,
        &c.node,
        &c.operation,
        &c.phase,
        &c.label,
    ]
}

fn start_episode(inner: &Inner, kind: StallKind, culprit: &Culprit) {
    inner
        .metrics
        .stalls_total
        .with_label_values(&[kind.as_str()])
        .inc();
    inner
        .metrics
        .episode_info
        .with_label_values(&label_values(kind, culprit))
        .set(1);
    tracing::warn!(
        target: "diagnostics::watchdog",
        kind = kind.as_str(),
        task = non_empty(&culprit.task),
        node = non_empty(&culprit.node),
        operation = non_empty(&culprit.operation),
        phase = non_empty(&culprit.phase),
        label = non_empty(&culprit.label),
        "stall episode started"
    );
    let mut h = inner.history.lock().unwrap_or_else(|e| e.into_inner());
    if h.len() >= HISTORY_MAX {
        h.remove(0);
    }
    h.push(EpisodeRecord {
        kind,
        culprit: culprit.clone(),
        detected_unix_seconds: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        duration_seconds: None,
    });
}

fn end_episode(inner: &Inner, kind: StallKind, ep: Episode) {
    let d = ep.started.elapsed();
    inner
        .metrics
        .stall_duration
        .with_label_values(&[kind.as_str()])
        .observe(d.as_secs_f64());
    let _ = inner
        .metrics
        .episode_info
        .remove_label_values(&label_values(kind, &ep.culprit));
    tracing::warn!(
        target: "diagnostics::watchdog",
        kind = kind.as_str(),
        duration_seconds = d.as_secs_f64(),
        task = non_empty(&ep.culprit.task),
        "stall episode ended"
    );
    let mut h = inner.history.lock().unwrap_or_else(|e| e.into_inner());
    // The index may have shifted when old records were dropped; match by kind from the end.
    if let Some(r) = h
        .iter_mut()
        .rev()
        .find(|r| r.kind == kind && r.duration_seconds.is_none())
    {
        r.duration_seconds = Some(d.as_secs_f64());
    }
}

fn close_all(inner: &Inner) {
    let mut eps = inner.episodes.lock().unwrap_or_else(|e| e.into_inner());
    let keys: Vec<StallKind> = eps.keys().copied().collect();
    for k in keys {
        let ep = eps.remove(&k).expect("present");
        end_episode(inner, k, ep);
    }
    inner.metrics.stalled.set(0);
}

/// Events console-subscriber buffers between its aggregator runs. Its default (102,400) let
/// RSS plateau near 2.5 GB under heavy task churn here, 8,192 near 0.6 GB (debug build,
/// tests/it/console_retention.rs), at the price of dropped events when churn outpaces the
/// aggregator (console-subscriber counts those itself).
pub const CONSOLE_EVENT_BUFFER_CAPACITY: usize = 8 * 1024;

/// The console-subscriber layer when `settings.console_enabled`, serving on
/// `settings.console_listen` from its own thread, with bounded retention and event buffer so
/// memory plateaus. Add it to the subscriber with a filter enabling `tokio=trace,runtime=trace`.
pub fn console_layer<S>(settings: &DiagnosticsSettings) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if !settings.console_enabled {
        return None;
    }
    Some(
        console_subscriber::ConsoleLayer::builder()
            .server_addr(settings.console_listen)
            .event_buffer_capacity(CONSOLE_EVENT_BUFFER_CAPACITY)
            .retention(
                settings
                    .console_retention_seconds
                    .max(Duration::from_secs(1)),
            )
            .spawn::<S>(),
    )
}

/// Runs `spawn` (which must spawn exactly one task on the main runtime, from this thread)
/// so that the task table and dumps know the task as `name`. Used by
/// [`crate::tasks::Tasks::spawn_named`].
pub fn spawn_with_name<R>(name: &'static str, spawn: impl FnOnce() -> R) -> R {
    with_spawn_name(name, spawn)
}

/// Offers `name` to the spawn hook for the next task spawned from this thread (`None`
/// withdraws it). Prefer [`spawn_with_name`]; this form keeps `#[track_caller]` intact.
pub fn offer_spawn_name(name: Option<&'static str>) {
    poll_tracking::offer_spawn_name(name);
}

/// `s` as a log field value that is left out when empty: `tracing` records an `Option` field
/// only when it is `Some`, so `field = non_empty(x)` never prints `field=""` (a label-style
/// "empty means not applicable" string reads as a missing value in a log line).
pub fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}
