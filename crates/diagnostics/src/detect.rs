//! Stall detection as a pure function: one [`Observation`] per watchdog tick in, the stall
//! kinds present with their culprits out ([`detect`]). The watchdog thread builds the
//! observation and keeps the episodes; dumps read the same observation through the predicates
//! here, so a dump's verdict cannot disagree with what the watchdog detected.
//!
//! Nothing here reads a clock, a lock or the runtime: every age is in the observation, so the
//! logic is unit-tested with synthetic samples (no real stall needed).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::dump::WorkerView;
use crate::inflight::{InflightEntry, InflightKind, SourceEpisode};
use crate::{DiagnosticsSettings, StallKind};

/// Who an episode blames, as bounded label values (empty when not applicable, and then left
/// out of JSON): the task family, the node, the operation, its phase, and the pool/statement
/// label.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Culprit {
    /// Task family (`Tasks::spawn_named` name) or a worker's name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub task: String,
    /// Node name from the embedding service's config.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Operation name (bounded set from code).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub operation: String,
    /// Phase of the operation (`connect`, `headers`, `body`, ...).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// Pool acquire or statement label.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub label: String,
}

impl Culprit {
    /// A culprit naming only a task (or worker).
    pub fn task(task: impl Into<String>) -> Culprit {
        Culprit {
            task: task.into(),
            ..Culprit::default()
        }
    }

    /// The culprit of an in-flight entry.
    pub fn of_entry(e: &InflightEntry) -> Culprit {
        Culprit {
            task: e.task.clone().unwrap_or_default(),
            node: e.node.clone().unwrap_or_default(),
            operation: e.operation.clone().unwrap_or_default(),
            phase: e.phase.clone().unwrap_or_default(),
            label: e.label.clone().unwrap_or_default(),
        }
    }
}

/// What one in-flight registry showed at the tick.
#[derive(Debug, Clone)]
pub(crate) struct SourceObservation {
    /// Its section name in dumps (`db_pool`, `node_calls`, `spans`, ...).
    pub(crate) section: String,
    /// Its entries, with ages as of the tick.
    pub(crate) entries: Vec<InflightEntry>,
    /// Time since its last successful acquire, when it tracks one (pools).
    pub(crate) since_last_success: Option<Duration>,
    /// The episode it reports itself (database lock waits, a starved service).
    pub(crate) episode: Option<SourceEpisode>,
}

/// A periodic worker's last completed run, as of the tick.
#[derive(Debug, Clone)]
pub(crate) struct WorkerRunObservation {
    pub(crate) name: &'static str,
    pub(crate) since_last: Duration,
    pub(crate) interval: Duration,
}

/// Everything detection needs, read once per watchdog tick.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observation {
    /// Per worker slot: what it polls and for how long.
    pub(crate) workers: Vec<WorkerView>,
    /// Name of the task each worker polls (same order as `workers`; "unnamed" when unknown).
    pub(crate) task_names: Vec<String>,
    /// Time since the heartbeat task last ran.
    pub(crate) heartbeat_age: Duration,
    /// While a probe waits to be polled: how long the runtime has polled no probe (see
    /// `Dump::probe_pending_seconds`); `None` when none waits.
    pub(crate) probe_pending: Option<Duration>,
    /// The in-flight registries.
    pub(crate) sources: Vec<SourceObservation>,
    /// Periodic workers' last runs.
    pub(crate) worker_runs: Vec<WorkerRunObservation>,
}

/// One stall kind present in an observation, with its culprit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Detected {
    pub(crate) kind: StallKind,
    pub(crate) culprit: Culprit,
}

/// A worker is blocked when it has been inside one poll for at least the stall threshold.
pub(crate) fn is_blocked(w: &WorkerView, s: &DiagnosticsSettings) -> bool {
    w.task != 0 && w.poll_age >= s.stall_threshold_seconds
}

/// The whole runtime is stalled when neither the heartbeat nor a probe has run for the stall
/// threshold while a probe waits to be polled.
pub(crate) fn runtime_stalled(obs: &Observation, s: &DiagnosticsSettings) -> bool {
    let threshold = s.stall_threshold_seconds;
    obs.heartbeat_age >= threshold && obs.probe_pending.is_some_and(|p| p >= threshold)
}

/// An entry is overdue past its own deadline plus `operation_grace_seconds`, or, without a
/// deadline, past `operation_max_age_seconds` (spans and database backends are evidence only).
pub(crate) fn is_overdue(e: &InflightEntry, s: &DiagnosticsSettings) -> bool {
    let grace = s.operation_grace_seconds;
    match (e.kind, e.deadline) {
        (_, Some(_)) => e.past_deadline(grace),
        (InflightKind::Span | InflightKind::DbBackend, None) => false,
        (_, None) => e.age > s.operation_max_age_seconds,
    }
}

/// Every overdue entry, oldest first.
pub(crate) fn overdue(obs: &Observation, s: &DiagnosticsSettings) -> Vec<InflightEntry> {
    let mut out: Vec<InflightEntry> = obs
        .sources
        .iter()
        .flat_map(|src| src.entries.iter())
        .filter(|e| is_overdue(e, s))
        .cloned()
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.age));
    out
}

/// Pool waiters older than `threshold`.
pub(crate) fn old_waiters(entries: &[InflightEntry], threshold: Duration) -> Vec<&InflightEntry> {
    entries
        .iter()
        .filter(|e| e.kind == InflightKind::PoolWait && e.age >= threshold)
        .collect()
}

/// One line per starved pool: waiters older than `pool_starved_seconds` and no acquire
/// succeeded for as long.
pub(crate) fn pool_starved(obs: &Observation, s: &DiagnosticsSettings) -> Vec<String> {
    let threshold = s.pool_starved_seconds;
    let mut out = Vec::new();
    for src in &obs.sources {
        let waiters = old_waiters(&src.entries, threshold);
        if waiters.is_empty() || src.since_last_success.is_some_and(|t| t < threshold) {
            continue;
        }
        let oldest = waiters.iter().max_by_key(|e| e.age).expect("non-empty");
        let holders: Vec<String> = src
            .entries
            .iter()
            .filter(|e| e.kind == InflightKind::PoolHold)
            .take(8)
            .map(|e| {
                format!(
                    "{} {:.1} s",
                    e.label.as_deref().unwrap_or("?"),
                    e.age.as_secs_f64()
                )
            })
            .collect();
        out.push(format!(
            "{} waiters on {}, oldest {} for {:.1} s; no acquire succeeded for {}; \
             holders: [{}]",
            waiters.len(),
            src.section,
            oldest.describe(),
            oldest.age.as_secs_f64(),
            src.since_last_success
                .map(|t| format!("{:.1} s", t.as_secs_f64()))
                .unwrap_or_else(|| "ever (unknown)".into()),
            holders.join(", ")
        ));
    }
    out
}

/// A periodic worker is overdue after `worker_overdue_factor × interval`, plus the stall
/// threshold as slack for scheduling.
fn worker_is_overdue(r: &WorkerRunObservation, s: &DiagnosticsSettings) -> bool {
    r.since_last.as_secs_f64()
        > r.interval.as_secs_f64() * s.worker_overdue_factor
            + s.stall_threshold_seconds.as_secs_f64()
}

/// The overdue periodic workers, sorted by name.
fn overdue_runs<'a>(
    obs: &'a Observation,
    s: &DiagnosticsSettings,
) -> Vec<&'a WorkerRunObservation> {
    let mut out: Vec<&WorkerRunObservation> = obs
        .worker_runs
        .iter()
        .filter(|r| worker_is_overdue(r, s))
        .collect();
    out.sort_unstable_by_key(|r| r.name);
    out
}

/// One sentence per overdue periodic worker.
pub(crate) fn workers_overdue(obs: &Observation, s: &DiagnosticsSettings) -> Vec<String> {
    let factor = s.worker_overdue_factor;
    overdue_runs(obs, s)
        .into_iter()
        .map(|r| {
            format!(
                "worker \"{}\" last completed a run {:.1} s ago; interval {:.1} s \
                 (overdue after {factor}x)",
                r.name,
                r.since_last.as_secs_f64(),
                r.interval.as_secs_f64()
            )
        })
        .collect()
}

/// What busy work waits on, most specific first: own database backends waiting on a lock (the
/// database monitor's episode), a slow database, pool waiters by label, own backends in another
/// wait, node calls by phase. Returns the culprit (task empty) and a phrase for verdicts.
pub(crate) fn service_cause(sources: &[SourceObservation]) -> (Culprit, String) {
    if let Some(ep) = sources
        .iter()
        .filter_map(|s| s.episode.as_ref())
        .find(|e| e.kind == StallKind::DbLockWait)
    {
        return (
            ep.culprit.clone(),
            format!("busy handlers wait on the database: {}", ep.verdict),
        );
    }
    let entries: Vec<&InflightEntry> = sources.iter().flat_map(|s| s.entries.iter()).collect();
    // A slow database fills the pool too: its waiters are a symptom, not the cause.
    if let Some(e) = entries
        .iter()
        .find(|e| e.operation.as_deref() == Some("slow_database"))
    {
        return (
            Culprit {
                operation: "slow_database".into(),
                label: e.label.clone().unwrap_or_default(),
                ..Culprit::default()
            },
            format!("busy handlers wait on a slow database: {}", e.detail),
        );
    }
    let of_kind = |k: InflightKind| entries.iter().filter(move |e| e.kind == k);
    if let Some(w) = of_kind(InflightKind::PoolWait).max_by_key(|e| e.age) {
        let n = of_kind(InflightKind::PoolWait).count();
        return (
            Culprit {
                operation: "db_pool.waiting".into(),
                label: w.label.clone().unwrap_or_default(),
                ..Culprit::default()
            },
            format!(
                "busy handlers wait for a pool connection: {n} waiting, oldest {} for {:.1} s",
                w.describe(),
                w.age.as_secs_f64()
            ),
        );
    }
    if let Some(b) = of_kind(InflightKind::DbBackend)
        .filter(|e| e.detail.contains("waiting on"))
        .max_by_key(|e| e.age)
    {
        return (
            Culprit {
                operation: "db_backend".into(),
                label: b.label.clone().unwrap_or_default(),
                ..Culprit::default()
            },
            format!("busy handlers wait on the database: {}", b.detail),
        );
    }
    if let Some(n) = of_kind(InflightKind::NodeCall).max_by_key(|e| e.age) {
        return (
            Culprit {
                node: n.node.clone().unwrap_or_default(),
                operation: n.operation.clone().unwrap_or_default(),
                phase: n.phase.clone().unwrap_or_default(),
                ..Culprit::default()
            },
            format!(
                "busy handlers wait on a node: {} for {:.1} s",
                n.describe(),
                n.age.as_secs_f64()
            ),
        );
    }
    (
        Culprit::default(),
        "no database or node wait seen (see the task dump)".into(),
    )
}

/// The stall kinds present in `obs`, most severe first, each with its culprit.
///
/// Runtime-level kinds (`runtime_stalled`, `blocked_worker`) come from the workers, the
/// heartbeat and the probe; while one is present nothing else is judged (every operation looks
/// late when the runtime does not run). Otherwise: the oldest overdue operation, the episodes
/// the sources report (a `service_starved` culprit is what the busy work waits on), starved
/// pools and overdue periodic workers.
pub(crate) fn detect(obs: &Observation, s: &DiagnosticsSettings) -> Vec<Detected> {
    let mut found: BTreeMap<StallKind, Culprit> = BTreeMap::new();
    let first_blocked = obs
        .workers
        .iter()
        .zip(&obs.task_names)
        .find(|(w, _)| is_blocked(w, s))
        .map(|(_, name)| name.clone());
    if runtime_stalled(obs, s) {
        found.insert(
            StallKind::RuntimeStalled,
            Culprit::task(first_blocked.clone().unwrap_or_default()),
        );
    }
    if let Some(name) = first_blocked {
        found.insert(StallKind::BlockedWorker, Culprit::task(name));
    }
    if found.is_empty() {
        if let Some(e) = overdue(obs, s).first() {
            found.insert(StallKind::OperationOverdue, Culprit::of_entry(e));
        }
        for ep in obs.sources.iter().filter_map(|src| src.episode.as_ref()) {
            found.entry(ep.kind).or_insert_with(|| ep.culprit.clone());
        }
        if let Some(c) = found.get_mut(&StallKind::ServiceStarved) {
            let task = std::mem::take(&mut c.task);
            *c = Culprit {
                task,
                ..service_cause(&obs.sources).0
            };
        }
        if !pool_starved(obs, s).is_empty() {
            found.insert(StallKind::PoolStarved, Culprit::default());
        }
        if let Some(r) = overdue_runs(obs, s).first() {
            found.insert(StallKind::WorkerOverdue, Culprit::task(r.name));
        }
    }
    found
        .into_iter()
        .map(|(kind, culprit)| Detected { kind, culprit })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DiagnosticsSettings {
        DiagnosticsSettings {
            stall_threshold_seconds: Duration::from_secs(1),
            pool_starved_seconds: Duration::from_secs(5),
            operation_grace_seconds: Duration::from_secs(2),
            operation_max_age_seconds: Duration::from_secs(60),
            worker_overdue_factor: 3.0,
            ..DiagnosticsSettings::default()
        }
    }

    fn worker(task: u64, poll_age_ms: u64) -> WorkerView {
        WorkerView {
            worker: Some(0),
            thread_name: "w-0".into(),
            tid: 1,
            polls: 7,
            task,
            location: None,
            poll_age: Duration::from_millis(poll_age_ms),
        }
    }

    fn healthy() -> Observation {
        Observation {
            workers: vec![worker(0, 0), worker(5, 3)],
            task_names: vec!["unnamed".into(), "bot".into()],
            heartbeat_age: Duration::from_millis(40),
            probe_pending: None,
            sources: vec![],
            worker_runs: vec![],
        }
    }

    fn entry(kind: InflightKind, age_s: f64) -> InflightEntry {
        InflightEntry::new(kind, Duration::from_secs_f64(age_s))
    }

    fn source(entries: Vec<InflightEntry>) -> SourceObservation {
        SourceObservation {
            section: "db_pool".into(),
            entries,
            since_last_success: None,
            episode: None,
        }
    }

    fn kinds(obs: &Observation) -> Vec<StallKind> {
        detect(obs, &settings())
            .into_iter()
            .map(|d| d.kind)
            .collect()
    }

    #[test]
    fn a_healthy_runtime_has_no_episode() {
        assert!(kinds(&healthy()).is_empty());
    }

    #[test]
    fn a_poll_past_the_threshold_is_a_blocked_worker_naming_its_task() {
        let mut obs = healthy();
        obs.workers[1].poll_age = Duration::from_millis(1000);
        let d = detect(&obs, &settings());
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].kind, StallKind::BlockedWorker);
        assert_eq!(d[0].culprit, Culprit::task("bot"));
    }

    #[test]
    fn a_poll_just_under_the_threshold_is_not_a_stall() {
        let mut obs = healthy();
        obs.workers[1].poll_age = Duration::from_millis(999);
        assert!(kinds(&obs).is_empty());
    }

    #[test]
    fn heartbeat_and_probe_both_stuck_is_runtime_stalled_as_well() {
        let mut obs = healthy();
        obs.workers[1].poll_age = Duration::from_secs(2);
        obs.heartbeat_age = Duration::from_secs(2);
        obs.probe_pending = Some(Duration::from_secs(1));
        assert_eq!(
            kinds(&obs),
            vec![StallKind::RuntimeStalled, StallKind::BlockedWorker]
        );
    }

    #[test]
    fn a_late_heartbeat_with_the_probe_run_is_not_a_runtime_stall() {
        // The heartbeat task may be late behind a burst; a probe that ran says the runtime
        // schedules work.
        let mut obs = healthy();
        obs.heartbeat_age = Duration::from_secs(3);
        obs.probe_pending = None;
        assert!(kinds(&obs).is_empty());
        obs.probe_pending = Some(Duration::from_millis(500));
        assert!(kinds(&obs).is_empty());
    }

    #[test]
    fn runtime_level_stalls_hide_operation_level_ones() {
        let mut obs = healthy();
        obs.workers[1].poll_age = Duration::from_secs(2);
        obs.sources = vec![source(vec![entry(InflightKind::PoolWait, 100.0)])];
        assert_eq!(kinds(&obs), vec![StallKind::BlockedWorker]);
    }

    #[test]
    fn an_operation_past_its_deadline_and_grace_is_overdue_naming_it() {
        let mut obs = healthy();
        let mut e = entry(InflightKind::NodeCall, 10.0);
        e.deadline = Some(Duration::from_secs(7));
        e.node = Some("a".into());
        e.operation = Some("list_users".into());
        e.phase = Some("body".into());
        obs.sources = vec![source(vec![e.clone()])];
        let d = detect(&obs, &settings());
        assert_eq!(d[0].kind, StallKind::OperationOverdue);
        assert_eq!(
            (
                d[0].culprit.node.as_str(),
                d[0].culprit.operation.as_str(),
                d[0].culprit.phase.as_str()
            ),
            ("a", "list_users", "body")
        );
        // Within the grace: not yet.
        e.deadline = Some(Duration::from_secs(9));
        obs.sources = vec![source(vec![e])];
        assert!(kinds(&obs).is_empty());
    }

    #[test]
    fn spans_and_backends_without_deadline_are_evidence_never_overdue() {
        let mut obs = healthy();
        obs.sources = vec![source(vec![
            entry(InflightKind::Span, 1e4),
            entry(InflightKind::DbBackend, 1e4),
        ])];
        assert!(kinds(&obs).is_empty());
        obs.sources = vec![source(vec![entry(InflightKind::PoolHold, 61.0)])];
        assert_eq!(kinds(&obs), vec![StallKind::OperationOverdue]);
    }

    #[test]
    fn old_waiters_starve_a_pool_only_when_no_acquire_succeeded_meanwhile() {
        let mut obs = healthy();
        let mut src = source(vec![
            entry(InflightKind::PoolWait, 6.0),
            entry(InflightKind::PoolHold, 6.5),
        ]);
        src.since_last_success = Some(Duration::from_secs(1));
        obs.sources = vec![src.clone()];
        assert!(kinds(&obs).is_empty(), "an acquire succeeded 1 s ago");
        src.since_last_success = Some(Duration::from_secs(6));
        obs.sources = vec![src];
        assert_eq!(kinds(&obs), vec![StallKind::PoolStarved]);
        assert!(pool_starved(&obs, &settings())[0].starts_with("1 waiters on db_pool"));
    }

    #[test]
    fn a_periodic_worker_is_overdue_after_factor_times_interval_plus_threshold() {
        let mut obs = healthy();
        let run = |since: f64| WorkerRunObservation {
            name: "expiry",
            since_last: Duration::from_secs_f64(since),
            interval: Duration::from_secs(10),
        };
        obs.worker_runs = vec![run(30.9)];
        assert!(kinds(&obs).is_empty());
        obs.worker_runs = vec![run(31.1)];
        let d = detect(&obs, &settings());
        assert_eq!(d[0].kind, StallKind::WorkerOverdue);
        assert_eq!(d[0].culprit, Culprit::task("expiry"));
    }

    #[test]
    fn a_starved_service_is_blamed_on_what_the_busy_work_waits_on() {
        let mut obs = healthy();
        let mut waiter = entry(InflightKind::PoolWait, 2.0);
        waiter.label = Some("bot_status".into());
        let mut src = source(vec![waiter]);
        src.episode = Some(SourceEpisode {
            kind: StallKind::ServiceStarved,
            culprit: Culprit::task("bot"),
            verdict: "8 updates wait for a handler slot".into(),
        });
        obs.sources = vec![src.clone()];
        let d = detect(&obs, &settings());
        assert_eq!(d[0].kind, StallKind::ServiceStarved);
        assert_eq!(
            d[0].culprit,
            Culprit {
                task: "bot".into(),
                operation: "db_pool.waiting".into(),
                label: "bot_status".into(),
                ..Culprit::default()
            }
        );
        // A database lock wait reported by a source is the more specific cause.
        let lock = SourceObservation {
            section: "db_backends".into(),
            entries: vec![],
            since_last_success: None,
            episode: Some(SourceEpisode {
                kind: StallKind::DbLockWait,
                culprit: Culprit {
                    operation: "Lock".into(),
                    phase: "subscriptions".into(),
                    label: "bot_status".into(),
                    ..Culprit::default()
                },
                verdict: "8 backends wait on Lock".into(),
            }),
        };
        obs.sources = vec![src, lock];
        let d = detect(&obs, &settings());
        let starved = d
            .iter()
            .find(|d| d.kind == StallKind::ServiceStarved)
            .unwrap();
        assert_eq!(starved.culprit.phase, "subscriptions");
        assert_eq!(starved.culprit.task, "bot");
        assert!(d.iter().any(|d| d.kind == StallKind::DbLockWait));
    }
}
