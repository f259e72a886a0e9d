//! The demo's timeline: normal traffic, the old freeze, a blocked worker, pool pressure,
//! recovery. Each step injects one fault through the simulators or a labelled task, then reads
//! what vpnbot shows an operator: the watchdog's episodes and verdicts, `/metrics`, dumps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diagnostics::{Dump, EpisodeRecord, StallKind};
use vpnbot::app::App;
use vpnbot::node::Operation;
use vpnbot::reconcile::{Outcome, RunOptions};
use vpnbot_sim::botapi::{BotApiSimHandle, SimUser};
use vpnbot_sim::node::{Fault, SimNodeHandle};

use super::report::StepReport;
use vpnbot::metrics::sample;

/// Everything a step needs.
#[derive(Debug)]
pub struct Stage<'a> {
    /// The running instance.
    pub app: &'a App,
    /// Simulated node `a` (the one that freezes).
    pub node_a: &'a SimNodeHandle,
    /// Simulated node `b`.
    pub node_b: &'a SimNodeHandle,
    /// Base URL of the observability server.
    pub obs: String,
    /// HTTP client for the observability server.
    pub http: reqwest::Client,
    /// Latencies the user probe saw.
    pub users: Arc<UserProbe>,
    /// The Bot API stand-in.
    pub telegram: Arc<BotApiSimHandle>,
}

/// Simulated users talking to the bot through the Bot API stand-in: every 250 ms one of them
/// sends `/status` and the probe records how long the bot took to answer (or that it did not
/// within 10 s).
#[derive(Debug, Default)]
pub struct UserProbe {
    /// (sent at, answered after) per `/status`; `None` while unanswered.
    samples: Mutex<Vec<(Instant, Option<Duration>)>>,
    stop: AtomicBool,
    count: AtomicU64,
}

impl UserProbe {
    /// Starts the probe on the current runtime (it plays the users, not vpnbot).
    pub fn start(sim: Arc<BotApiSimHandle>, users: Vec<SimUser>) -> Arc<UserProbe> {
        let me = Arc::new(UserProbe::default());
        let probe = me.clone();
        tokio::spawn(async move {
            let mut i = 0usize;
            while !probe.stop.load(Ordering::Relaxed) {
                let u = users[i % users.len()].clone();
                i += 1;
                let sim = sim.clone();
                let probe2 = probe.clone();
                tokio::spawn(async move {
                    let from = sim.sent_to(u.id).len();
                    let t = Instant::now();
                    let idx = {
                        let mut s = probe2.samples.lock().unwrap_or_else(|p| p.into_inner());
                        s.push((t, None));
                        s.len() - 1
                    };
                    sim.send_text(&u, "/status");
                    let answered = sim
                        .wait_for(u.id, from, Duration::from_secs(10), |_| true)
                        .await
                        .map(|_| t.elapsed());
                    probe2.samples.lock().unwrap_or_else(|p| p.into_inner())[idx].1 = answered;
                    probe2.count.fetch_add(1, Ordering::Relaxed);
                });
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        me
    }

    /// Summary of requests sent in `[from, to)`: answered share and latency.
    pub fn summary(&self, from: Instant, to: Instant) -> String {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut lat: Vec<Duration> = s
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .filter_map(|(_, d)| *d)
            .collect();
        let sent = s.iter().filter(|(t, _)| *t >= from && *t < to).count();
        if sent == 0 {
            return "no /status sent in this step".into();
        }
        lat.sort();
        let p = |q: usize| {
            lat.get((lat.len() * q / 100).min(lat.len().saturating_sub(1)))
                .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "-".into())
        };
        format!(
            "bot answered {}/{sent} /status so far (p50 {}, p99 {})",
            lat.len(),
            p(50),
            p(99)
        )
    }

    /// Share of requests in `[from, to)` that were answered.
    pub fn answered_share(&self, from: Instant, to: Instant) -> f64 {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let all: Vec<_> = s.iter().filter(|(t, _)| *t >= from && *t < to).collect();
        if all.is_empty() {
            return 1.0;
        }
        all.iter().filter(|(_, d)| d.is_some()).count() as f64 / all.len() as f64
    }

    /// Stops the probe.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Stage<'_> {
    async fn metrics(&self) -> String {
        match self.http.get(format!("{}/metrics", self.obs)).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits up to `limit` for an episode of `kind` detected after `since_unix`.
    async fn wait_episode(
        &self,
        kind: StallKind,
        since_unix: f64,
        limit: Duration,
    ) -> Option<EpisodeRecord> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(e) = self
                .app
                .diagnostics
                .episodes()
                .into_iter()
                .find(|e| e.kind == kind && e.detected_unix_seconds >= since_unix)
            {
                return Some(e);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }

    /// Waits for the watchdog's dump of an episode of `kind` detected at `detected_unix`: a
    /// dump of another kind (one taken for a different episode meanwhile) does not count.
    async fn wait_dump(&self, kind: StallKind, detected_unix: f64) -> Option<Arc<Dump>> {
        for _ in 0..200 {
            if let Some(d) = self.app.diagnostics.latest_dump() {
                if d.kind == Some(kind) && d.unix_seconds + 0.5 >= detected_unix {
                    return Some(d);
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }

    /// The verdict of [`Stage::wait_dump`], or a sentence saying there was no such dump.
    async fn wait_dump_verdict(&self, kind: StallKind, detected_unix: f64) -> String {
        match self.wait_dump(kind, detected_unix).await {
            Some(d) => d.verdict.clone(),
            None => format!("(no {kind} dump written)"),
        }
    }

    /// Status of `GET /healthz` now, or the transport error in words.
    async fn healthz(&self) -> Result<u16, String> {
        self.http
            .get(format!("{}/healthz", self.obs))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Step 1: normal traffic: a few dozen users start, take trials, buy with Stars, ask for
/// status; then a reconcile pass over both nodes.
pub async fn normal(stage: &Stage<'_>, users: &[SimUser]) -> StepReport {
    let mut r = StepReport::without_fault(
        "normal",
        format!(
            "no fault: {} users start, take trials, buy with Stars; reconcile both nodes",
            users.len()
        ),
        "no stall episode open",
    );
    let t0 = Instant::now();
    let sim = &stage.telegram;
    let wait = Duration::from_secs(15);
    let mut answered = 0;
    let mut keys = 0;
    for (i, u) in users.iter().enumerate() {
        let from = sim.sent_to(u.id).len();
        sim.send_text(u, "/start");
        if sim.wait_for(u.id, from, wait, |_| true).await.is_some() {
            answered += 1;
        }
        let from = sim.sent_to(u.id).len();
        if i % 3 == 0 {
            // Buyers: invoice, pre-checkout, payment; the key arrives as a QR photo.
            let q = sim.pre_checkout(u, "v1:month", "XTR", 100);
            let ok = sim.wait_answer(&q, wait).await.is_some_and(|a| a.ok);
            sim.successful_payment(u, "v1:month", "XTR", 100, &format!("demo-charge-{}", u.id));
            if ok
                && sim
                    .wait_for(u.id, from, wait, |m| m.method == "sendPhoto")
                    .await
                    .is_some()
            {
                keys += 1;
            }
        } else {
            sim.send_text(u, "/trial");
            if sim
                .wait_for(u.id, from, wait, |m| m.method == "sendPhoto")
                .await
                .is_some()
            {
                keys += 1;
            }
        }
    }
    r.check(
        format!("{answered}/{} users got an answer to /start", users.len()),
        answered == users.len(),
    );
    r.check(
        format!(
            "{keys}/{} users received a key (vless:// link + QR)",
            users.len()
        ),
        keys == users.len(),
    );
    let rep = stage
        .app
        .reconciler
        .reconcile_once(&RunOptions::default())
        .await;
    match &rep {
        Ok(rep) => {
            for n in &rep.nodes {
                r.check(
                    format!(
                        "reconcile node {}: {} (live {}, on node {}, orphans {}, missing {})",
                        n.node,
                        n.outcome.as_str(),
                        n.db_live,
                        n.node_users,
                        n.orphans,
                        n.missing
                    ),
                    matches!(n.outcome, Outcome::Ok | Outcome::Guarded),
                );
            }
        }
        Err(e) => r.check(format!("reconcile pass: {e}"), false),
    }
    r.detected = true;
    r.culprit_named = stage.app.diagnostics.stall().is_none();
    r.verdict = stage.app.diagnostics.dump_now().verdict;
    r.users = stage.users.summary(t0, Instant::now());
    r
}

/// Step 2: the old freeze. Node `a` sends `list-users` headers, then silence.
pub async fn old_freeze(stage: &Stage<'_>) -> StepReport {
    let mut r = StepReport::new(
        "old_freeze",
        "node a: list-users sends 200 headers with a Content-Length, then no body byte (socket open)",
        "node=a operation=list_users phase=body",
    );
    stage
        .node_a
        .set_fault(Operation::ListUsers, Fault::HeadersThenSilence);
    let t0 = Instant::now();
    // The production step, as the periodic worker runs it.
    let reconciler = stage.app.reconciler.clone();
    let run = stage.app.tasks.spawn_named("reconcile", async move {
        let t = Instant::now();
        (
            reconciler.reconcile_once(&RunOptions::default()).await,
            t.elapsed(),
        )
    });
    // Evidence while the call is open: the in-flight gauge and the dump's node_calls entry.
    let mut seen_body = None;
    for _ in 0..200 {
        let text = stage.metrics().await;
        if sample(
            &text,
            "vpnbot_node_api_inflight_requests",
            &[
                ("node", "a"),
                ("operation", "list_users"),
                ("phase", "body"),
            ],
        ) == Some(1.0)
        {
            seen_body = Some(t0.elapsed());
            // Let the silence grow, as an operator opening the dump mid-incident would see it.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let dump = stage.app.diagnostics.dump_now();
            if let Some(e) = dump
                .inflight
                .get("node_calls")
                .and_then(|v| v.iter().find(|e| e.node.as_deref() == Some("a")))
            {
                r.verdict = format!("{} — {}", e.describe(), e.detail);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.detected = seen_body.is_some();
    r.detection_latency = seen_body;
    r.culprit_named = r.verdict.contains("node \"a\"") && r.verdict.contains("phase body");
    let (rep, took) = run.await.expect("task");
    let bound = stage.app.config.node_client.total_deadline_seconds;
    match rep {
        Ok(rep) => {
            let a = rep.node("a");
            let b = rep.node("b");
            r.check(
                format!(
                    "reconcile of node a failed within the node deadline ({:.1} s, bound {:.0} s): {}{}",
                    took.as_secs_f64(),
                    bound.as_secs_f64(),
                    a.map(|n| n.outcome.as_str()).unwrap_or("no report"),
                    a.and_then(|n| n.error.as_deref())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                a.is_some_and(|n| matches!(n.outcome, Outcome::Failed))
                    && took <= bound + Duration::from_secs(1),
            );
            r.check(
                format!(
                    "reconcile of node b completed meanwhile: {}",
                    b.map(|n| n.outcome.as_str()).unwrap_or("no report")
                ),
                b.is_some_and(|n| matches!(n.outcome, Outcome::Ok)),
            );
        }
        Err(e) => r.check(format!("reconcile pass: {e}"), false),
    }
    let text = stage.metrics().await;
    let body_obs = sample(
        &text,
        "vpnbot_node_api_phase_duration_seconds_count",
        &[
            ("node", "a"),
            ("operation", "list_users"),
            ("phase", "body"),
        ],
    )
    .unwrap_or(0.0);
    r.check(
        "phase histogram recorded the body phase of node a",
        body_obs >= 1.0,
    );
    r.users = stage.users.summary(t0, Instant::now());
    r
}

/// Step 3: a worker blocked by synchronous code for 3 s. Each expectation checks the evidence
/// it names: the episode's kind, the detection latency against the configured bound, the
/// blocked worker in the dump polling the named task with `std::thread::sleep` in its native
/// stack (not words in the verdict), and `/healthz` over HTTP during the stall (503) and after
/// it (200).
pub async fn blocked_worker(stage: &Stage<'_>) -> StepReport {
    let mut r = StepReport::new(
        "blocked_worker",
        "a task calls std::thread::sleep(3 s) on a runtime worker",
        "kind=blocked_worker task=expiry, its spawn location and std::thread::sleep in the native stack",
    );
    let d = &stage.app.config.diagnostics;
    // Detection: the threshold, then up to two watchdog periods to see it, plus scheduling slack.
    let bound =
        d.stall_threshold_seconds + 2 * d.watchdog_period_seconds + Duration::from_millis(500);
    let since = unix_now();
    let t0 = Instant::now();
    // The fault: sync code inside a named task, as a careless handler or worker would do.
    let h = stage.app.tasks.spawn_named("expiry", async {
        std::thread::sleep(Duration::from_secs(3));
    });
    let ep = stage
        .wait_episode(StallKind::BlockedWorker, since, Duration::from_secs(6))
        .await;
    // The watchdog's own detection time, not when this task got round to looking: a starved
    // runtime delays this task too, and would read as a late detection.
    let latency = ep
        .as_ref()
        .map(|e| Duration::from_secs_f64((e.detected_unix_seconds - since).max(0.0)));
    // Asked while the worker is still blocked (the block lasts 3 s, detection about 1 s).
    let during = stage.healthz().await;
    r.detected = latency.is_some_and(|l| l <= bound);
    r.detection_latency = latency;
    let dump = match &ep {
        Some(ep) => {
            stage
                .wait_dump(StallKind::BlockedWorker, ep.detected_unix_seconds)
                .await
        }
        None => None,
    };
    r.verdict = dump
        .as_ref()
        .map(|d| d.verdict.clone())
        .unwrap_or_else(|| "(no blocked_worker dump written)".into());
    let worker = dump.as_ref().and_then(|d| {
        d.workers
            .iter()
            .find(|w| {
                w.blocked
                    && w.polling
                        .as_ref()
                        .is_some_and(|p| p.name.as_deref() == Some("expiry"))
            })
            .cloned()
    });
    let spawned_here = worker
        .as_ref()
        .and_then(|w| w.polling.as_ref())
        .is_some_and(|p| p.spawned_at.starts_with(file!()));
    let sleep_frame = worker
        .as_ref()
        .and_then(|w| w.native_stack.as_ref())
        .and_then(|frames| {
            frames
                .iter()
                .find(|f| {
                    f.contains("std::thread::sleep") || f.contains("std::thread::functions::sleep")
                })
                .cloned()
        });
    r.culprit_named = ep.as_ref().is_some_and(|e| e.culprit.task == "expiry")
        && spawned_here
        && sleep_frame.is_some();
    r.check(
        format!(
            "episode kind blocked_worker detected within {:.2} s (threshold + 2 watchdog periods + 0.5 s): {}",
            bound.as_secs_f64(),
            match latency {
                Some(l) => format!("after {:.2} s", l.as_secs_f64()),
                None => "not detected".into(),
            }
        ),
        r.detected,
    );
    r.check(
        match (&worker, &sleep_frame) {
            (Some(w), Some(f)) => format!("native stack of {} shows {f}", w.thread_name),
            (Some(w), None) => format!(
                "native stack of {} has no std::thread::sleep frame ({})",
                w.thread_name,
                w.stack_unavailable.as_deref().unwrap_or("frames captured")
            ),
            (None, _) => "no blocked worker polling \"expiry\" in the dump".into(),
        },
        sleep_frame.is_some(),
    );
    r.check(
        format!("/healthz during the stall: {}", show_status(&during)),
        during == Ok(503),
    );
    let _ = h.await;
    let mut after = stage.healthz().await;
    let t = Instant::now();
    while after != Ok(200) && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = stage.healthz().await;
    }
    r.check(
        format!("/healthz after the stall: {}", show_status(&after)),
        after == Ok(200),
    );
    // One blocked worker must leave the runtime running: the other workers keep the lag
    // probe, timers and the bot going, so runtime_stalled must not open at all.
    let stalled: Vec<f64> = stage
        .app
        .diagnostics
        .episodes()
        .iter()
        .filter(|e| e.kind == StallKind::RuntimeStalled && e.detected_unix_seconds >= since)
        .map(|e| e.detected_unix_seconds - since)
        .collect();
    r.check(
        match stalled.first() {
            None => "no runtime_stalled episode: the other workers kept the runtime going".into(),
            Some(at) => format!(
                "runtime_stalled opened {:.2} s after the block began: one blocked worker \
                 starved the whole runtime",
                at
            ),
        },
        stalled.is_empty(),
    );
    r.users = stage.users.summary(t0, Instant::now());
    r
}

/// `503` or the error, for a report line.
fn show_status(s: &Result<u16, String>) -> String {
    match s {
        Ok(code) => code.to_string(),
        Err(e) => format!("no answer ({e})"),
    }
}

/// Step 4: pool pressure: every connection held; a request waits and times out.
pub async fn pool_pressure(stage: &Stage<'_>) -> StepReport {
    let mut r = StepReport::new(
        "pool_pressure",
        "every pool connection held by `demo_pool_hog` for 6 s; requests wait",
        "kind=pool_starved naming the waiting label, acquire timeouts counted by label",
    );
    let since = unix_now();
    let t0 = Instant::now();
    let max = stage.app.config.db.max_connections as usize;
    let release = Arc::new(tokio::sync::Notify::new());
    let mut hogs = Vec::new();
    for _ in 0..max {
        let pool = stage.app.pool.clone();
        let release = release.clone();
        hogs.push(stage.app.tasks.spawn_named("demo_pool_hog", async move {
            if let Ok(c) = pool.acquire("demo_pool_hog").await {
                let _ = tokio::time::timeout(Duration::from_secs(6), release.notified()).await;
                drop(c);
            }
        }));
    }
    let ep = stage
        .wait_episode(StallKind::PoolStarved, since, Duration::from_secs(8))
        .await;
    r.detected = ep.is_some();
    r.detection_latency = ep.as_ref().map(|_| t0.elapsed());
    if let Some(ep) = &ep {
        r.verdict = stage
            .wait_dump_verdict(StallKind::PoolStarved, ep.detected_unix_seconds)
            .await;
    }
    // Let the waiting requests run into their acquire timeout.
    let timeout = stage.app.pool.acquire_timeout();
    tokio::time::sleep(timeout.saturating_sub(t0.elapsed()) + Duration::from_millis(300)).await;
    let text = stage.metrics().await;
    // The label the watchdog named as waiting must be the one whose acquires timed out.
    let waiting = r
        .verdict
        .split("label \"")
        .nth(1)
        .and_then(|x| x.split('"').next())
        .unwrap_or("")
        .to_string();
    let timeouts = sample(
        &text,
        "vpnbot_db_pool_acquire_timeouts_total",
        &[("label", waiting.as_str())],
    )
    .unwrap_or(0.0);
    let holders = stage
        .app
        .pool
        .inflight()
        .snapshot()
        .iter()
        .filter(|e| e.label == "demo_pool_hog")
        .count();
    r.culprit_named = timeouts >= 1.0 && r.verdict.starts_with("pool_starved");
    r.check(
        format!("acquire timeouts counted for the waiting label {waiting:?}: {timeouts}"),
        timeouts >= 1.0,
    );
    r.check(
        format!("holders registry shows {holders} holders labelled demo_pool_hog"),
        holders == max,
    );
    release.notify_waiters();
    for h in hogs {
        let _ = h.await;
    }
    r.users = stage.users.summary(t0, Instant::now());
    r
}

/// Step 5: recovery: faults cleared, node a answers again, no stall open.
pub async fn recovery(stage: &Stage<'_>) -> StepReport {
    let mut r = StepReport::without_fault(
        "recovery",
        "faults cleared",
        "breaker of node a closed, no stall open",
    );
    stage.node_a.set_fault(Operation::ListUsers, Fault::None);
    let t0 = Instant::now();
    let rep = stage
        .app
        .reconciler
        .reconcile_once(&RunOptions::default())
        .await;
    let outcomes: Vec<String> = rep
        .as_ref()
        .map(|r| {
            r.nodes
                .iter()
                .map(|n| format!("{} {}", n.node, n.outcome.as_str()))
                .collect()
        })
        .unwrap_or_default();
    r.check(
        format!(
            "the next reconcile succeeds on both nodes ({})",
            outcomes.join(", ")
        ),
        rep.as_ref()
            .is_ok_and(|r| r.nodes.iter().all(|n| matches!(n.outcome, Outcome::Ok))),
    );
    let mut closed = false;
    for _ in 0..100 {
        let text = stage.metrics().await;
        if sample(&text, "vpnbot_node_api_circuit_state", &[("node", "a")]) == Some(0.0)
            && stage.app.diagnostics.stall().is_none()
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.detected = true;
    r.culprit_named = closed;
    r.detection_latency = Some(t0.elapsed());
    r.verdict = stage.app.diagnostics.dump_now().verdict;
    r.users = stage.users.summary(t0, Instant::now());
    r
}
