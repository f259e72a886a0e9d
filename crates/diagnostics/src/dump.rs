//! The diagnostic dump: a one-line verdict, then the evidence.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::inflight::InflightEntry;
use super::poll_tracking::with_spawn_name;
use super::stack::{self, ProcEvidence};
use super::{Inner, StallKind};
use crate::detect;

const MAX_TASK_TRACES: usize = 200;
/// A worker found in the same poll twice this far apart holds back a task dump (see
/// [`long_poll`]).
const LONG_POLL_GUARD: Duration = Duration::from_millis(5);
const MAX_TRACE_LEN: usize = 4096;

/// A diagnostic dump. Serialize with [`Dump::to_json`].
#[derive(Debug, Clone, Serialize)]
pub struct Dump {
    /// One line an operator can act on: kind, culprit, decisive evidence.
    pub verdict: String,
    /// `episode` (written by the watchdog), `on_demand` or `exit`.
    pub trigger: &'static str,
    /// Wall-clock time, RFC 3339.
    pub time: String,
    /// Wall-clock time, seconds since the Unix epoch.
    pub unix_seconds: f64,
    /// Most severe open kind, `None` when healthy.
    pub kind: Option<StallKind>,
    /// Every open kind.
    pub open_kinds: Vec<StallKind>,
    /// Age of the episode of `kind`, seconds.
    pub elapsed_seconds: Option<f64>,
    /// Time since the in-runtime heartbeat last ran, seconds.
    pub heartbeat_age_seconds: f64,
    /// While the watchdog's probe task waits to be polled: how long the runtime has polled no
    /// probe (from the last probe poll, at most one watchdog period before the waiting probe
    /// was spawned), seconds; `None` when no probe waits.
    pub probe_pending_seconds: Option<f64>,
    /// Per worker thread: the task being polled and for how long, evidence, stacks.
    pub workers: Vec<WorkerDump>,
    /// Operations past their deadline.
    pub overdue: Vec<InflightEntry>,
    /// Pools with waiters and no recent successful acquire.
    pub pool_starved: Vec<String>,
    /// Periodic workers that have not completed a run in time.
    pub worker_overdue: Vec<String>,
    /// Every in-flight entry, by source section.
    pub inflight: BTreeMap<String, Vec<InflightEntry>>,
    /// Recent history by source section: the last failures per node and operation, the last
    /// reconcile outcome per node (see [`super::RecentEvent`]).
    pub recent: BTreeMap<String, Vec<super::RecentEvent>>,
    /// Runtime metrics at dump time.
    pub runtime: RuntimeSnapshot,
    /// Live tasks counted by name (largest first).
    pub tasks: TaskCensus,
    /// tokio's async task dump, or why it is missing or incomplete.
    pub task_dump: TaskDumpSection,
    /// Time spent building this dump, seconds.
    pub build_seconds: f64,
}

/// One worker thread in a dump.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerDump {
    /// tokio's worker index (0-based, the `worker` label of the runtime metrics and the
    /// number in the thread name `vpnbot-wrk-N`), the "worker N" of the verdict; `None` for a
    /// thread that polls tasks but does not run a worker now (it left one through
    /// `block_in_place`).
    pub worker: Option<usize>,
    /// Thread name.
    pub thread_name: String,
    /// OS thread id.
    pub tid: u32,
    /// Polls started by this thread so far.
    pub polls: u64,
    /// The task being polled, if any.
    pub polling: Option<PollingTask>,
    /// True when the poll has lasted longer than the stall threshold.
    pub blocked: bool,
    /// `/proc/self/task/<tid>` evidence.
    pub proc: Option<ProcEvidence>,
    /// Native stack (innermost first), when captured.
    pub native_stack: Option<Vec<String>>,
    /// Why the native stack is missing (`stack unavailable: ...`), if it is.
    pub stack_unavailable: Option<String>,
    /// The blocking call read from the stack (e.g. `std::thread::sleep`).
    pub blocking_call: Option<String>,
    /// Open spans entered on this thread right now (outermost first).
    pub open_spans: Vec<InflightEntry>,
}

/// The task a worker is polling.
#[derive(Debug, Clone, Serialize)]
pub struct PollingTask {
    /// tokio task id.
    pub task_id: u64,
    /// Name given by `Tasks::spawn_named`, if any.
    pub name: Option<String>,
    /// Spawn location `file:line:col`.
    pub spawned_at: String,
    /// How long the current poll has lasted (watchdog resolution), seconds.
    pub for_seconds: f64,
    /// Time since the task was spawned, seconds.
    pub task_age_seconds: Option<f64>,
}

/// Runtime metrics snapshot, read directly from the runtime handle.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RuntimeSnapshot {
    /// Worker threads.
    pub workers: usize,
    /// Alive tasks.
    pub alive_tasks: usize,
    /// Global queue depth.
    pub global_queue_depth: usize,
    /// Local queue depth per worker.
    pub local_queue_depth: Vec<usize>,
    /// Polls per worker (cumulative).
    pub worker_polls: Vec<u64>,
    /// Parks+unparks per worker (odd = parked).
    pub worker_park_unpark: Vec<u64>,
    /// Busy seconds per worker (cumulative).
    pub worker_busy_seconds: Vec<f64>,
    /// Mean poll time per worker, seconds.
    pub worker_mean_poll_seconds: Vec<f64>,
    /// Blocking pool threads.
    pub blocking_threads: usize,
    /// Blocking queue depth.
    pub blocking_queue_depth: usize,
}

/// Live task census.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TaskCensus {
    /// Live tasks known to the task table.
    pub live: usize,
    /// (name or `<unnamed> location`, count), largest first, at most 30.
    pub by_name: Vec<(String, usize)>,
}

/// tokio's `Handle::dump` section.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TaskDumpSection {
    /// `complete`, `skipped: ...`, `timed out ...`, `incomplete: ...`.
    pub status: String,
    /// Per task: id, name and where it awaits.
    pub tasks: Vec<TaskTrace>,
}

/// One task's async backtrace.
#[derive(Debug, Clone, Serialize)]
pub struct TaskTrace {
    /// tokio task id.
    pub id: u64,
    /// Name, if spawned through `Tasks::spawn_named`.
    pub name: Option<String>,
    /// Spawn location.
    pub spawned_at: Option<String>,
    /// The await tree (empty for tasks parked on non-tokio futures).
    pub trace: String,
}

impl Dump {
    /// The dump as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Per-slot view the watchdog keeps current.
#[derive(Debug, Clone)]
pub(crate) struct WorkerView {
    /// tokio's worker index of the thread, when it runs one.
    pub(crate) worker: Option<usize>,
    pub(crate) thread_name: String,
    pub(crate) tid: u32,
    pub(crate) polls: u64,
    pub(crate) task: u64,
    pub(crate) location: Option<&'static std::panic::Location<'static>>,
    pub(crate) poll_age: Duration,
}

fn fmt_secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

pub(crate) fn build(inner: &Inner, trigger: &'static str) -> Dump {
    let t0 = Instant::now();
    let s = &inner.settings;
    // The watchdog's latest observation (at most one period old): the verdict's predicates
    // (blocked, runtime stalled, overdue, starved) are read from it, so a dump cannot disagree
    // with what the watchdog detected. The sections below add fresh evidence.
    let obs = inner.latest_observation();
    let view = obs.workers.clone();
    // The polled tasks' table entries as of the view: native stacks below can take seconds
    // (debug build, busy machine), and a task that ends meanwhile leaves the table, which
    // made a blocked task read as "<unnamed>" with no age in the dump (issue 17).
    let view_at = Instant::now();
    let entries: Vec<Option<super::poll_tracking::TaskEntry>> = view
        .iter()
        .map(|w| (w.task != 0).then(|| inner.tracker.task(w.task)).flatten())
        .collect();
    let heartbeat_age = obs.heartbeat_age;
    let probe_pending = obs.probe_pending;
    // Taken with the worker view, before stacks and the task dump (which take up to seconds),
    // so the verdict's poll age and episode age describe the same moment.
    let open_kinds = inner.open_kinds();
    let kind = open_kinds.first().copied();
    // An earlier task dump still waiting in tokio's barrier (read before this dump starts one).
    let task_dump_pending = inner.task_dump_in_flight.load(Ordering::Acquire);
    let elapsed = kind.and_then(|k| inner.episode_age(k));

    // Sources.
    let sources = inner
        .sources
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for src in &sources {
        src.refresh(Duration::from_millis(500));
    }
    let fresh = inner.observe_sources();
    let source_verdicts: Vec<(StallKind, String)> = fresh
        .iter()
        .filter_map(|s| s.episode.as_ref().map(|e| (e.kind, e.verdict.clone())))
        .collect();
    let mut inflight: BTreeMap<String, Vec<InflightEntry>> = BTreeMap::new();
    for src in &fresh {
        inflight
            .entry(src.section.clone())
            .or_default()
            .extend(src.entries.iter().cloned());
    }
    let overdue = detect::overdue(&obs, s);
    let pool_starved = detect::pool_starved(&obs, s);
    let worker_overdue = detect::workers_overdue(&obs, s);

    // Workers.
    let blocked_tids: Vec<u32> = view
        .iter()
        .filter(|w| detect::is_blocked(w, s))
        .map(|w| w.tid)
        .collect();
    let runtime_stalled = detect::runtime_stalled(&obs, s);
    // Stacks of blocked workers; when the whole runtime is stalled, of every worker.
    let stack_tids: Vec<u32> = if runtime_stalled {
        view.iter().map(|w| w.tid).collect()
    } else {
        blocked_tids.clone()
    };
    // /proc first: a thread just released by ptrace briefly reads as running.
    let procs: BTreeMap<u32, ProcEvidence> = view
        .iter()
        .filter_map(|w| stack::proc_evidence(w.tid).map(|p| (w.tid, p)))
        .collect();
    let stacks = if stack_tids.is_empty() {
        Ok(Default::default())
    } else if !s.native_stacks {
        Err("stack unavailable: native_stacks disabled in config".to_owned())
    } else {
        stack::capture_bounded(&stack_tids, stack::HELPER_TIMEOUT, stack::CAPTURE_TIMEOUT)
            .map_err(|e| format!("stack unavailable: {e}"))
    };
    let mut spans_by_tid: BTreeMap<u32, Vec<InflightEntry>> = BTreeMap::new();
    if let Some(spans) = inflight.get("spans") {
        for e in spans {
            if let Some(t) = e.thread {
                spans_by_tid.entry(t).or_default().push(e.clone());
            }
        }
    }
    let workers: Vec<WorkerDump> = view
        .iter()
        .zip(entries)
        .map(|(w, entry)| {
            let (native_stack, stack_unavailable) = if stack_tids.contains(&w.tid) {
                match &stacks {
                    Ok(m) => match m.get(&w.tid) {
                        Some(f) => (Some(f.clone()), None),
                        None => (
                            None,
                            Some("stack unavailable: thread not found in trace".into()),
                        ),
                    },
                    Err(e) => (None, Some(e.clone())),
                }
            } else {
                (None, None)
            };
            let blocking_call = native_stack.as_deref().and_then(stack::blocking_call);
            let polling = (w.task != 0).then(|| PollingTask {
                task_id: w.task,
                name: entry.and_then(|e| e.name).map(str::to_owned),
                spawned_at: w
                    .location
                    .or(entry.map(|e| e.location))
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                for_seconds: w.poll_age.as_secs_f64(),
                task_age_seconds: entry.map(|e| e.age_at(view_at).as_secs_f64()),
            });
            let mut open_spans = spans_by_tid.remove(&w.tid).unwrap_or_default();
            open_spans.sort_by_key(|e| std::cmp::Reverse(e.age));
            WorkerDump {
                worker: w.worker,
                thread_name: w.thread_name.clone(),
                tid: w.tid,
                polls: w.polls,
                blocked: detect::is_blocked(w, s),
                polling,
                proc: procs.get(&w.tid).cloned(),
                native_stack,
                stack_unavailable,
                blocking_call,
                open_spans,
            }
        })
        .collect();

    let runtime = inner.runtime_snapshot();
    let (live, by_name) = inner.tracker.census(30);
    let task_dump = if runtime_stalled {
        TaskDumpSection {
            status: "skipped: runtime stalled (tokio's task dump cannot finish)".into(),
            tasks: vec![],
        }
    } else if !blocked_tids.is_empty() {
        TaskDumpSection {
            status: "skipped: a worker is blocked (tokio's task dump needs every worker and \
                     would list no tasks)"
                .into(),
            tasks: vec![],
        }
    } else if !s.task_dumps {
        TaskDumpSection {
            status: "skipped: off (diagnostics.task_dumps; tokio 1.54's task-dump barrier can \
                     leave a worker waiting inside tokio)"
                .into(),
            tasks: vec![],
        }
    } else {
        task_dump(inner, s.task_dump_timeout_seconds)
    };

    let recent = super::recent::collect(&sources);
    let workers_ref = &workers;
    let mut verdict = match kind.and_then(|k| source_verdicts.iter().find(|(sk, _)| *sk == k)) {
        Some((StallKind::ServiceStarved, v)) => {
            format!("service_starved: {v}; {}", detect::service_cause(&fresh).1)
        }
        Some((k, v)) => format!("{k}: {v}"),
        None => verdict(
            kind,
            elapsed,
            workers_ref,
            &overdue,
            &pool_starved,
            &worker_overdue,
            heartbeat_age,
            probe_pending,
            &runtime,
            task_dump_pending,
        ),
    };
    if kind.is_none() {
        verdict.push_str(&super::recent::verdict_suffix(&sources, &recent));
    }
    let now = SystemTime::now();
    Dump {
        verdict,
        trigger,
        time: chrono::DateTime::<chrono::Utc>::from(now).to_rfc3339(),
        unix_seconds: now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        kind,
        open_kinds,
        elapsed_seconds: elapsed.map(|d| d.as_secs_f64()),
        heartbeat_age_seconds: heartbeat_age.as_secs_f64(),
        probe_pending_seconds: probe_pending.map(|d| d.as_secs_f64()),
        workers,
        overdue,
        pool_starved,
        worker_overdue,
        inflight,
        recent,
        runtime,
        tasks: TaskCensus { live, by_name },
        task_dump,
        build_seconds: t0.elapsed().as_secs_f64(),
    }
}

/// `worker N (thread name)`, or `thread name (not a worker now)`.
fn worker_name(w: &WorkerDump) -> String {
    match w.worker {
        Some(i) => format!("worker {i} ({})", w.thread_name),
        None => format!("thread {} (not running a worker now)", w.thread_name),
    }
}

fn worker_phrase(w: &WorkerDump) -> String {
    let Some(p) = &w.polling else {
        return format!("{} is not polling a task", worker_name(w));
    };
    let name = p.name.as_deref().unwrap_or("<unnamed>");
    let mut s = format!(
        "{} has polled task \"{}\" ({}) for {:.1} s",
        worker_name(w),
        name,
        p.spawned_at,
        p.for_seconds
    );
    if let Some(span) = w
        .open_spans
        .iter()
        .find(|e| e.operation.as_deref() != Some("task"))
    {
        s.push_str(&format!(" inside span {}", span.describe()));
    }
    match (&w.proc, &w.blocking_call) {
        (Some(p), call) if p.state == "R" => {
            s.push_str(&format!(
                "; its thread is running on CPU (state R, {:.1} s CPU), a loop that never yields",
                p.cpu_seconds
            ));
            if let Some(c) = call {
                s.push_str(&format!(", in {c}"));
            }
        }
        (_, Some(call)) => s.push_str(&format!("; its thread is in {call}")),
        (Some(p), None) => s.push_str(&format!(
            "; its thread is in state {} waiting in {}",
            p.state, p.wchan
        )),
        (None, None) => {}
    }
    s
}

#[allow(clippy::too_many_arguments)]
fn verdict(
    kind: Option<StallKind>,
    elapsed: Option<Duration>,
    workers: &[WorkerDump],
    overdue: &[InflightEntry],
    pool_starved: &[String],
    worker_overdue: &[String],
    heartbeat_age: Duration,
    probe_pending: Option<Duration>,
    rt: &RuntimeSnapshot,
    task_dump_pending: bool,
) -> String {
    let blocked: Vec<&WorkerDump> = workers.iter().filter(|w| w.blocked).collect();
    match kind {
        Some(StallKind::RuntimeStalled) => {
            let mut s = format!(
                "runtime_stalled: the heartbeat has not run for {} and no probe task has been \
                 polled for {} (one is waiting); {} of {} workers blocked",
                fmt_secs(heartbeat_age),
                fmt_secs(probe_pending.unwrap_or_default()),
                blocked.len(),
                rt.workers
            );
            for w in &blocked {
                s.push_str(": ");
                s.push_str(&worker_phrase(w));
            }
            if task_dump_pending && !blocked.is_empty() {
                s.push_str(
                    "; a task dump is in flight: tokio holds the other workers in its trace \
                     barrier until the blocked poll returns",
                );
            }
            s
        }
        Some(StallKind::BlockedWorker) => match blocked.first() {
            Some(w) => {
                let mut s = format!("blocked_worker: {}", worker_phrase(w));
                if let Some(e) = elapsed {
                    s.push_str(&format!(" (episode open {})", fmt_secs(e)));
                }
                s
            }
            None => "blocked_worker: a poll exceeded the threshold and has just ended".into(),
        },
        Some(StallKind::OperationOverdue) => match overdue.first() {
            Some(e) => {
                let mut s = format!(
                    "operation_overdue: {} has run {}",
                    e.describe(),
                    fmt_secs(e.age)
                );
                if let Some(d) = e.deadline {
                    s.push_str(&format!(" of a {} deadline", fmt_secs(d)));
                }
                if !e.detail.is_empty() {
                    s.push_str(&format!("; {}", e.detail));
                }
                if overdue.len() > 1 {
                    s.push_str(&format!(" (+{} more overdue)", overdue.len() - 1));
                }
                s
            }
            None => {
                "operation_overdue: an operation outlived its deadline and has just ended".into()
            }
        },
        Some(StallKind::PoolStarved) => format!(
            "pool_starved: {}",
            pool_starved
                .first()
                .map(String::as_str)
                .unwrap_or("(cleared)")
        ),
        Some(StallKind::ServiceStarved) => {
            "service_starved: handlers have just started completing again".into()
        }
        Some(StallKind::DbLockWait) => {
            "db_lock_wait: own backends waited on a lock and have just stopped".into()
        }
        Some(StallKind::WorkerOverdue) => format!(
            "worker_overdue: {}",
            worker_overdue
                .first()
                .map(String::as_str)
                .unwrap_or("(cleared)")
        ),
        None => format!(
            "no stall: runtime healthy (heartbeat {:.2} s ago, {} workers, {} tasks alive)",
            heartbeat_age.as_secs_f64(),
            rt.workers,
            rt.alive_tasks
        ),
    }
}

/// Runs `Handle::dump` on the runtime under a deadline enforced from this OS thread.
fn task_dump(inner: &Inner, timeout: Duration) -> TaskDumpSection {
    let Some(handle) = inner.handle.get().cloned() else {
        return TaskDumpSection {
            status: "skipped: runtime not started".into(),
            tasks: vec![],
        };
    };
    // A task dump racing the runtime's shutdown can wait forever on a worker that is gone.
    if inner.stop.load(Ordering::Acquire) {
        return TaskDumpSection {
            status: "skipped: diagnostics are stopping".into(),
            tasks: vec![],
        };
    }
    if let Some((thread, at_least)) = long_poll(inner) {
        return TaskDumpSection {
            status: format!(
                "skipped: {thread} has been in one poll for at least {} ms (tokio's task dump \
                 holds every worker until all join, so the others would wait for that poll)",
                at_least.as_millis()
            ),
            tasks: vec![],
        };
    }
    if inner
        .task_dump_in_flight
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return TaskDumpSection {
            status: "skipped: a previous task dump has not finished (runtime slow or stuck)".into(),
            tasks: vec![],
        };
    }
    let (tx, rx) = mpsc::sync_channel(1);
    let flag = inner.task_dump_in_flight_arc();
    let h2 = handle.clone();
    with_spawn_name("diag-task-dump", || {
        handle.spawn(async move {
            let d = h2.dump().await;
            flag.store(false, Ordering::Release);
            let _ = tx.send(d);
        })
    });
    match recv_nudging(&rx, &handle, &inner.task_dump_in_flight_arc(), timeout) {
        Ok(d) => {
            let mut tasks = Vec::new();
            let total = d.tasks().iter().count();
            for t in d.tasks().iter().take(MAX_TASK_TRACES) {
                let id = super::poll_tracking::id_u64(t.id());
                let entry = inner.tracker.task(id);
                let mut trace = t.trace().to_string();
                if trace.len() > MAX_TRACE_LEN {
                    let mut cut = MAX_TRACE_LEN;
                    while !trace.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    trace.truncate(cut);
                }
                tasks.push(TaskTrace {
                    id,
                    name: entry.and_then(|e| e.name).map(str::to_owned),
                    spawned_at: entry.map(|e| e.location.to_string()),
                    trace,
                });
            }
            let mut status = if total == 0 {
                "incomplete: zero tasks listed (a worker may be blocked)".to_owned()
            } else if total > MAX_TASK_TRACES {
                format!("complete: {total} tasks, first {MAX_TASK_TRACES} shown")
            } else {
                format!("complete: {total} tasks")
            };
            // A worker that joined late can leave another in tokio's barrier (see
            // `trace_barrier`): find it and release it before the runtime needs it.
            let (left, clear) = super::trace_barrier::release(inner, &handle, timeout);
            if !left.is_empty() {
                let names: Vec<String> = left.iter().map(|i| format!("worker {i}")).collect();
                status.push_str(&format!(
                    "; {} left waiting in tokio's task-dump barrier, {}",
                    names.join(", "),
                    if clear {
                        "released by another dump"
                    } else {
                        "NOT released yet"
                    }
                ));
            }
            TaskDumpSection { status, tasks }
        }
        Err(_) => TaskDumpSection {
            status: format!(
                "timed out after {} (enforced from the dump thread); the runtime did not finish \
                 the dump",
                fmt_secs(timeout)
            ),
            tasks: vec![],
        },
    }
}

/// A worker thread inside one poll for at least [`LONG_POLL_GUARD`] (the same poll in two
/// samples that far apart, or a poll the watchdog has already seen last that long): its name
/// and the age known.
///
/// `Handle::dump` stops every worker in a barrier until all have joined, and a worker joins
/// only between polls. A dump started while one worker is inside a blocking poll keeps the
/// other workers in the barrier until that poll returns: one blocked worker becomes a stalled
/// runtime (no heartbeat, no probe, no timers; `runtime_stalled` instead of `blocked_worker`,
/// reproduced in `tests/diagnostics_stalls.rs`). The watchdog's own check only skips the dump
/// once a poll has passed the stall threshold; this closes the window before it, leaving only
/// a poll that starts within these 5 ms or while the request is on its way to the workers.
fn long_poll(inner: &Inner) -> Option<(String, Duration)> {
    let obs = inner.latest_observation();
    if let Some(w) = obs
        .workers
        .iter()
        .filter(|w| w.task != 0 && w.poll_age >= LONG_POLL_GUARD)
        .max_by_key(|w| w.poll_age)
    {
        return Some((w.thread_name.clone(), w.poll_age));
    }
    let first = inner.tracker.sample();
    if first.iter().all(|s| s.task == 0) {
        return None;
    }
    std::thread::sleep(LONG_POLL_GUARD);
    let second = inner.tracker.sample();
    second.into_iter().find_map(|s| {
        let same = first
            .iter()
            .any(|f| f.index == s.index && f.task != 0 && f.task == s.task && f.polls == s.polls);
        same.then_some((s.thread_name, LONG_POLL_GUARD))
    })
}

/// Waits up to `timeout` for the task dump, nudging the runtime every 50 ms meanwhile.
///
/// `Handle::dump` parks every worker in a barrier until all of them have joined it. A worker
/// asleep on the I/O driver with no timer due has been seen (tokio 1.54, one worker blocked
/// while the dump started) to miss the request and sleep on, leaving the others in the barrier
/// for good: a dump that turned one blocked worker into a frozen runtime. An empty task spawned
/// from this thread goes through the injection queue and unparks an idle worker, which then
/// sees the request and joins. When the wait times out, a short-lived thread keeps nudging
/// until the dump finishes (at most 30 s), so a late dump still releases the workers.
pub(crate) fn recv_nudging(
    rx: &mpsc::Receiver<tokio::runtime::Dump>,
    handle: &tokio::runtime::Handle,
    in_flight: &Arc<AtomicBool>,
    timeout: Duration,
) -> Result<tokio::runtime::Dump, mpsc::RecvTimeoutError> {
    const NUDGE: Duration = Duration::from_millis(50);
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(NUDGE)) {
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                with_spawn_name("diag-nudge", || drop(handle.spawn(async {})));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let (handle, in_flight) = (handle.clone(), in_flight.clone());
                let _ = std::thread::Builder::new()
                    .name("diag-dump-nudge".into())
                    .spawn(move || {
                        let until = Instant::now() + Duration::from_secs(30);
                        while in_flight.load(Ordering::Acquire) && Instant::now() < until {
                            with_spawn_name("diag-nudge", || drop(handle.spawn(async {})));
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    });
                return Err(mpsc::RecvTimeoutError::Timeout);
            }
            other => return other,
        }
    }
}

/// Writes `dump` into `dir` and removes the oldest files beyond `max_files`.
pub(crate) fn write_file(
    dir: &Path,
    max_files: usize,
    naming: crate::Naming,
    dump: &Dump,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let kind = dump.kind.map(|k| k.as_str()).unwrap_or("none");
    let prefix = format!("{}-dump-", naming.service());
    let path = dir.join(format!("{prefix}{stamp}-{kind}.json"));
    std::fs::write(&path, dump.to_json())?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    while files.len() > max_files {
        let _ = std::fs::remove_file(files.remove(0));
    }
    Ok(path)
}
