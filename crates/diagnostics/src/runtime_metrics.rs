//! tokio runtime metrics (tokio-metrics `RuntimeMonitor`) and per-family task metrics
//! (`TaskMonitor`) exported into Prometheus in base units.
//!
//! Sampling runs on the watchdog OS thread, not as a task, so `/metrics` keeps moving while the
//! runtime is stuck. The poll-time histogram is read from the runtime at scrape time by a
//! custom collector.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{CounterVec, Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::runtime::Handle;
use tokio_metrics::{RuntimeIntervals, RuntimeMonitor, TaskMetrics, TaskMonitor};

use crate::metrics;

/// Name of the poll-time histogram family, after the service's prefix ([`crate::Naming`]).
pub const POLL_TIME_HISTOGRAM: &str = "runtime_poll_duration_seconds";

#[derive(Debug)]
pub(crate) struct RuntimeMetricsExporter {
    workers: IntGauge,
    live_tasks: IntGauge,
    global_queue_depth: IntGauge,
    local_queue_depth: IntGauge,
    blocking_threads: IntGauge,
    idle_blocking_threads: IntGauge,
    blocking_queue_depth: IntGauge,
    mean_poll: Gauge,
    busy_ratio: Gauge,
    busy_seconds: CounterVec,
    polls: IntCounter,
    parks: IntCounter,
    noops: IntCounter,
    steals: IntCounter,
    remote_schedules: IntCounter,
    overflows: IntCounter,
    forced_yields: IntCounter,
    io_ready: IntCounter,
    task: TaskExporter,
    intervals: Option<RuntimeIntervals>,
    handle: Option<Handle>,
    last_busy: Vec<Duration>,
}

#[derive(Debug)]
struct TaskExporter {
    instrumented: IntCounterVec,
    dropped: IntCounterVec,
    first_polls: IntCounterVec,
    first_poll_delay: CounterVec,
    polls: IntCounterVec,
    poll_seconds: CounterVec,
    slow_polls: IntCounterVec,
    slow_poll_seconds: CounterVec,
    scheduled: IntCounterVec,
    scheduled_seconds: CounterVec,
    long_delays: IntCounterVec,
    idle_seconds: CounterVec,
    idled: IntCounterVec,
    last: HashMap<&'static str, TaskMetrics>,
}

fn counter_vec_f64(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> CounterVec {
    let c = CounterVec::new(Opts::new(name, help), labels).expect("valid counter opts");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric name");
    c
}

impl RuntimeMetricsExporter {
    pub(crate) fn new(r: &Registry, naming: crate::Naming) -> Self {
        let g = |n: &str, h: &str| metrics::int_gauge(r, n, h);
        let c = |n: &str, h: &str| metrics::counter(r, n, h);
        let tl = &["task"];
        let task = TaskExporter {
            instrumented: metrics::counter_vec(
                r,
                &naming.metric("task_instrumented_total"),
                "Tasks of the family instrumented (spawned).",
                tl,
            ),
            dropped: metrics::counter_vec(
                r,
                &naming.metric("task_dropped_total"),
                "Tasks of the family that completed or were dropped.",
                tl,
            ),
            first_polls: metrics::counter_vec(
                r,
                &naming.metric("task_first_polls_total"),
                "Tasks of the family polled for the first time.",
                tl,
            ),
            first_poll_delay: counter_vec_f64(
                r,
                &naming.metric("task_first_poll_delay_seconds_total"),
                "Total delay between instrumenting and first poll, seconds.",
                tl,
            ),
            polls: metrics::counter_vec(
                r,
                &naming.metric("task_polls_total"),
                "Polls of the family.",
                tl,
            ),
            poll_seconds: counter_vec_f64(
                r,
                &naming.metric("task_poll_seconds_total"),
                "Total time spent polling tasks of the family, seconds.",
                tl,
            ),
            slow_polls: metrics::counter_vec(
                r,
                &naming.metric("task_slow_polls_total"),
                "Polls longer than the slow-poll threshold (50 us).",
                tl,
            ),
            slow_poll_seconds: counter_vec_f64(
                r,
                &naming.metric("task_slow_poll_seconds_total"),
                "Total time in slow polls, seconds.",
                tl,
            ),
            scheduled: metrics::counter_vec(
                r,
                &naming.metric("task_schedules_total"),
                "Times tasks of the family were woken and queued.",
                tl,
            ),
            scheduled_seconds: counter_vec_f64(
                r,
                &naming.metric("task_scheduled_seconds_total"),
                "Total time tasks of the family waited in run queues after waking, seconds.",
                tl,
            ),
            long_delays: metrics::counter_vec(
                r,
                &naming.metric("task_long_schedule_delays_total"),
                "Schedules whose queue wait exceeded the long-delay threshold (50 us).",
                tl,
            ),
            idle_seconds: counter_vec_f64(
                r,
                &naming.metric("task_idle_seconds_total"),
                "Total time tasks of the family were idle (waiting to be woken), seconds.",
                tl,
            ),
            idled: metrics::counter_vec(
                r,
                &naming.metric("task_idles_total"),
                "Times tasks of the family went idle.",
                tl,
            ),
            last: HashMap::new(),
        };
        Self {
            workers: g(
                &naming.metric("runtime_workers"),
                "Worker threads of the main runtime.",
            ),
            live_tasks: g(
                &naming.metric("runtime_live_tasks"),
                "Tasks alive in the main runtime.",
            ),
            global_queue_depth: g(
                &naming.metric("runtime_global_queue_depth"),
                "Tasks waiting in the runtime's global (injection) queue.",
            ),
            local_queue_depth: g(
                &naming.metric("runtime_local_queue_depth"),
                "Tasks waiting in all workers' local queues.",
            ),
            blocking_threads: g(
                &naming.metric("runtime_blocking_threads"),
                "Threads in the blocking pool (including idle ones).",
            ),
            idle_blocking_threads: g(
                &naming.metric("runtime_idle_blocking_threads"),
                "Idle threads in the blocking pool.",
            ),
            blocking_queue_depth: g(
                &naming.metric("runtime_blocking_queue_depth"),
                "Tasks waiting for a blocking-pool thread.",
            ),
            mean_poll: metrics::gauge(
                r,
                &naming.metric("runtime_mean_poll_duration_seconds"),
                "Mean task poll duration over the last sample interval, seconds.",
            ),
            busy_ratio: metrics::gauge(
                r,
                &naming.metric("runtime_busy_ratio"),
                "Share of worker time spent busy over the last sample interval (0..1).",
            ),
            busy_seconds: counter_vec_f64(
                r,
                &naming.metric("runtime_worker_busy_seconds_total"),
                "Time each worker spent busy (not parked), seconds.",
                &["worker"],
            ),
            polls: c(
                &naming.metric("runtime_polls_total"),
                "Task polls by all workers.",
            ),
            parks: c(
                &naming.metric("runtime_parks_total"),
                "Times workers parked.",
            ),
            noops: c(
                &naming.metric("runtime_noop_unparks_total"),
                "Times workers unparked and parked again with nothing to do.",
            ),
            steals: c(
                &naming.metric("runtime_steals_total"),
                "Tasks stolen between workers.",
            ),
            remote_schedules: c(
                &naming.metric("runtime_remote_schedules_total"),
                "Tasks scheduled from outside the runtime.",
            ),
            overflows: c(
                &naming.metric("runtime_local_queue_overflows_total"),
                "Times a local queue overflowed into the global queue.",
            ),
            forced_yields: c(
                &naming.metric("runtime_budget_forced_yields_total"),
                "Times a task was forced to yield after exhausting its coop budget.",
            ),
            io_ready: c(
                &naming.metric("runtime_io_driver_ready_events_total"),
                "Ready events processed by the I/O driver.",
            ),
            task,
            intervals: None,
            handle: None,
            last_busy: Vec::new(),
        }
    }

    pub(crate) fn attach(&mut self, handle: &Handle) {
        self.intervals = Some(RuntimeMonitor::new(handle).intervals());
        self.handle = Some(handle.clone());
        // The first interval covers the time since creation: take it now as a baseline.
        if let Some(i) = self.intervals.as_mut() {
            let _ = i.next();
        }
    }

    /// One sample: runtime interval plus every task family's delta.
    pub(crate) fn sample(&mut self, families: &[(&'static str, TaskMonitor)]) {
        if let Some(m) = self.intervals.as_mut().and_then(|i| i.next()) {
            self.workers.set(m.workers_count as i64);
            self.live_tasks.set(m.live_tasks_count as i64);
            self.global_queue_depth.set(m.global_queue_depth as i64);
            self.local_queue_depth.set(m.total_local_queue_depth as i64);
            self.blocking_threads.set(m.blocking_threads_count as i64);
            self.idle_blocking_threads
                .set(m.idle_blocking_threads_count as i64);
            self.blocking_queue_depth.set(m.blocking_queue_depth as i64);
            self.mean_poll.set(m.mean_poll_duration.as_secs_f64());
            self.busy_ratio.set(m.busy_ratio());
            self.polls.inc_by(m.total_polls_count);
            self.parks.inc_by(m.total_park_count);
            self.noops.inc_by(m.total_noop_count);
            self.steals.inc_by(m.total_steal_count);
            self.remote_schedules.inc_by(m.num_remote_schedules);
            self.overflows.inc_by(m.total_overflow_count);
            self.forced_yields.inc_by(m.budget_forced_yield_count);
            self.io_ready.inc_by(m.io_driver_ready_count);
        }
        if let Some(h) = &self.handle {
            let rm = h.metrics();
            let n = rm.num_workers();
            self.last_busy.resize(n, Duration::ZERO);
            for w in 0..n {
                let now = rm.worker_total_busy_duration(w);
                let d = now.saturating_sub(self.last_busy[w]);
                self.last_busy[w] = now;
                self.busy_seconds
                    .with_label_values(&[&w.to_string()])
                    .inc_by(d.as_secs_f64());
            }
        }
        for (name, monitor) in families {
            self.task.sample(name, monitor);
        }
    }
}

impl TaskExporter {
    fn sample(&mut self, name: &'static str, monitor: &TaskMonitor) {
        let now = monitor.cumulative();
        let prev = self.last.get(name).cloned().unwrap_or_default();
        let l = &[name];
        let du = |a: u64, b: u64| a.saturating_sub(b);
        let ds = |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64();
        self.instrumented
            .with_label_values(l)
            .inc_by(du(now.instrumented_count, prev.instrumented_count));
        self.dropped
            .with_label_values(l)
            .inc_by(du(now.dropped_count, prev.dropped_count));
        self.first_polls
            .with_label_values(l)
            .inc_by(du(now.first_poll_count, prev.first_poll_count));
        self.first_poll_delay
            .with_label_values(l)
            .inc_by(ds(now.total_first_poll_delay, prev.total_first_poll_delay));
        self.polls
            .with_label_values(l)
            .inc_by(du(now.total_poll_count, prev.total_poll_count));
        self.poll_seconds
            .with_label_values(l)
            .inc_by(ds(now.total_poll_duration, prev.total_poll_duration));
        self.slow_polls
            .with_label_values(l)
            .inc_by(du(now.total_slow_poll_count, prev.total_slow_poll_count));
        self.slow_poll_seconds.with_label_values(l).inc_by(ds(
            now.total_slow_poll_duration,
            prev.total_slow_poll_duration,
        ));
        self.scheduled
            .with_label_values(l)
            .inc_by(du(now.total_scheduled_count, prev.total_scheduled_count));
        self.scheduled_seconds.with_label_values(l).inc_by(ds(
            now.total_scheduled_duration,
            prev.total_scheduled_duration,
        ));
        self.long_delays
            .with_label_values(l)
            .inc_by(du(now.total_long_delay_count, prev.total_long_delay_count));
        self.idle_seconds
            .with_label_values(l)
            .inc_by(ds(now.total_idle_duration, prev.total_idle_duration));
        self.idled
            .with_label_values(l)
            .inc_by(du(now.total_idled_count, prev.total_idled_count));
        self.last.insert(name, now);
    }
}

/// Reads the runtime's poll-time histogram at scrape time (cumulative over all workers).
/// `_sum` is estimated from bucket midpoints (tokio keeps counts only).
#[derive(Debug)]
pub(crate) struct PollTimeCollector {
    desc: Desc,
    name: String,
    handle: Arc<OnceLock<Handle>>,
}

impl PollTimeCollector {
    pub(crate) fn register(
        registry: &Registry,
        naming: crate::Naming,
        handle: Arc<OnceLock<Handle>>,
    ) {
        let name = naming.metric(POLL_TIME_HISTOGRAM);
        let desc = Desc::new(
            name.clone(),
            "Task poll durations on the main runtime, seconds (sum estimated from bucket \
             midpoints)."
                .to_owned(),
            vec![],
            HashMap::new(),
        )
        .expect("valid desc");
        registry
            .register(Box::new(Self { desc, name, handle }))
            .expect("unique metric name");
    }
}

impl Collector for PollTimeCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut h = proto::Histogram::default();
        if let Some(handle) = self.handle.get() {
            let m = handle.metrics();
            if m.poll_time_histogram_enabled() {
                let mut buckets = Vec::new();
                let mut cumulative = 0u64;
                let mut sum = 0.0;
                for b in 0..m.poll_time_histogram_num_buckets() {
                    let range = m.poll_time_histogram_bucket_range(b);
                    let count: u64 = (0..m.num_workers())
                        .map(|w| m.poll_time_histogram_bucket_count(w, b))
                        .sum();
                    cumulative += count;
                    let end = range.end.as_secs_f64();
                    let mid = if end > 1e6 {
                        range.start.as_secs_f64()
                    } else {
                        (range.start.as_secs_f64() + end) / 2.0
                    };
                    sum += mid * count as f64;
                    if end <= 1e6 {
                        let mut bucket = proto::Bucket::default();
                        bucket.set_upper_bound(end);
                        bucket.set_cumulative_count(cumulative);
                        buckets.push(bucket);
                    }
                }
                h.set_bucket(buckets);
                h.set_sample_count(cumulative);
                h.set_sample_sum(sum);
            }
        }
        let mut metric = proto::Metric::default();
        metric.set_histogram(h);
        let mut mf = MetricFamily::default();
        mf.set_name(self.name.clone());
        mf.set_help(self.desc.help.clone());
        mf.set_field_type(MetricType::HISTOGRAM);
        mf.set_metric(vec![metric]);
        vec![mf]
    }
}
