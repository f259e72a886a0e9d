//! The demo's timeline: normal traffic, the old freeze, a blocked worker, pool pressure,
//! recovery. Each step injects one fault through the simulators or a labelled task, then reads
//! what vpnbot shows an operator: the watchdog's episodes and verdicts, `/metrics`, dumps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::app::App;
use crate::diagnostics::{EpisodeRecord, StallKind};
use crate::node::Operation;
use crate::sim::node::{Fault, SimNodeHandle};

use super::report::StepReport;

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
}

/// A stand-in for users: a task on the main runtime doing what a handler does (a labelled
/// acquire and a query) every 200 ms, recording latency and failures.
#[derive(Debug, Default)]
pub struct UserProbe {
    samples: Mutex<Vec<(Instant, Duration, bool)>>,
    stop: AtomicBool,
    count: AtomicU64,
}

impl UserProbe {
    /// Starts the probe task.
    pub fn start(app: &App) -> Arc<UserProbe> {
        let me = Arc::new(UserProbe::default());
        let pool = app.pool.clone();
        let probe = me.clone();
        app.tasks.spawn_named("demo_user_probe", async move {
            while !probe.stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = async {
                    let mut c = pool.acquire("demo_user_request").await.ok()?;
                    sqlx::query("SELECT 1").execute(&mut *c).await.ok()
                };
                let ok = tokio::time::timeout(Duration::from_secs(5), ok)
                    .await
                    .ok()
                    .flatten()
                    .is_some();
                probe
                    .samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((t, t.elapsed(), ok));
                probe.count.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        me
    }

    /// Summary of samples started in `[from, to)`: answered share and p99 latency.
    pub fn summary(&self, from: Instant, to: Instant) -> String {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut lat: Vec<Duration> = s
            .iter()
            .filter(|(t, _, _)| *t >= from && *t < to)
            .map(|(_, d, _)| *d)
            .collect();
        let ok = s
            .iter()
            .filter(|(t, _, ok)| *t >= from && *t < to && *ok)
            .count();
        if lat.is_empty() {
            return "no requests sampled".into();
        }
        lat.sort();
        let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
        format!(
            "{ok}/{} requests answered, p99 {:.0} ms, max {:.0} ms",
            lat.len(),
            p99.as_secs_f64() * 1e3,
            lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        )
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

    /// Waits for the watchdog's dump of an episode detected at `detected_unix`.
    async fn wait_dump_verdict(&self, detected_unix: f64) -> String {
        for _ in 0..200 {
            if let Some(d) = self.app.diagnostics.latest_dump() {
                if d.unix_seconds + 0.5 >= detected_unix {
                    return d.verdict.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        String::from("(no dump written)")
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Value of one sample in exposition text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let head = l.rsplit_once(' ').map(|(h, _)| h).unwrap_or(l);
            let (n, rest) = head.split_once('{').unwrap_or((head, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

/// Step 1: normal traffic; both nodes answer.
pub async fn normal(stage: &Stage<'_>) -> StepReport {
    let mut r = StepReport::new(
        "normal",
        "none (a clean pass over both nodes)",
        "no episode",
    );
    let t0 = Instant::now();
    let mut all_ok = true;
    for name in ["a", "b"] {
        let res = stage
            .app
            .fleet
            .get(name)
            .expect("configured")
            .list_users()
            .await;
        r.check(
            format!(
                "node {name} list-users answered ({})",
                match &res {
                    Ok(u) => format!("{} users", u.len()),
                    Err(e) => e.to_string(),
                }
            ),
            res.is_ok(),
        );
        all_ok &= res.is_ok();
    }
    r.detected = true;
    r.culprit_named = stage.app.diagnostics.stall().is_none();
    r.verdict = stage.app.diagnostics.dump_now().verdict;
    r.check("healthy: no stall open", r.culprit_named && all_ok);
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
    let fleet = stage.app.fleet.clone();
    let a = stage.app.tasks.spawn_named("reconcile", async move {
        let t = Instant::now();
        let res = fleet.get("a").expect("configured").list_users().await;
        (res.map(|u| u.len()), t.elapsed())
    });
    let fleet = stage.app.fleet.clone();
    let b = stage.app.tasks.spawn_named("reconcile", async move {
        fleet
            .get("b")
            .expect("configured")
            .list_users()
            .await
            .map(|u| u.len())
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
    let (res_a, took) = a.await.expect("task");
    let res_b = b.await.expect("task");
    let bound = crate::config::secs(stage.app.config.node_client.total_deadline_seconds);
    r.check(
        format!(
            "node a failed with a typed error in {:.1} s (bound {:.0} s): {}",
            took.as_secs_f64(),
            bound.as_secs_f64(),
            res_a
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        ),
        res_a.is_err() && took <= bound + Duration::from_millis(500),
    );
    r.check(
        format!(
            "node b completed meanwhile ({:?} users)",
            res_b.as_ref().ok()
        ),
        res_b.is_ok(),
    );
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

/// Step 3: a worker blocked by synchronous code for 3 s.
pub async fn blocked_worker(stage: &Stage<'_>) -> StepReport {
    let mut r = StepReport::new(
        "blocked_worker",
        "a task calls std::thread::sleep(3 s) on a runtime worker",
        "kind=blocked_worker task=expiry, its spawn location and a sleep in the stack",
    );
    let since = unix_now();
    let t0 = Instant::now();
    // The fault: sync code inside a named task, as a careless handler or worker would do.
    let h = stage.app.tasks.spawn_named("expiry", async {
        std::thread::sleep(Duration::from_secs(3));
    });
    let ep = stage
        .wait_episode(StallKind::BlockedWorker, since, Duration::from_secs(6))
        .await;
    r.detected = ep.is_some();
    r.detection_latency = ep.as_ref().map(|_| t0.elapsed());
    if let Some(ep) = &ep {
        r.verdict = stage.wait_dump_verdict(ep.detected_unix_seconds).await;
        r.culprit_named = ep.labels[0] == "expiry"
            && r.verdict.contains("\"expiry\"")
            && r.verdict.contains("src/demo/scenario.rs")
            && r.verdict.contains("sleep");
    }
    let _ = h.await;
    let health = stage
        .http
        .get(format!("{}/healthz", stage.obs))
        .send()
        .await
        .map(|r| r.status().as_u16());
    r.check(
        format!("/healthz answered during and after the stall ({health:?})"),
        health.is_ok(),
    );
    r.users = stage.users.summary(t0, Instant::now());
    r
}

/// Step 4: pool pressure: every connection held; a request waits and times out.
pub async fn pool_pressure(stage: &Stage<'_>) -> StepReport {
    let mut r = StepReport::new(
        "pool_pressure",
        "every pool connection held by `demo_pool_hog` for 6 s; requests wait",
        "kind=pool_starved and acquire timeouts labelled demo_user_request",
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
        r.verdict = stage.wait_dump_verdict(ep.detected_unix_seconds).await;
    }
    // Let the waiting requests run into their acquire timeout.
    let timeout = stage.app.pool.acquire_timeout();
    tokio::time::sleep(timeout.saturating_sub(t0.elapsed()) + Duration::from_millis(300)).await;
    let text = stage.metrics().await;
    let timeouts = sample(
        &text,
        "vpnbot_db_pool_acquire_timeouts_total",
        &[("label", "demo_user_request")],
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
    r.culprit_named = timeouts >= 1.0 && r.verdict.contains("pool_starved");
    r.check(
        format!("acquire timeouts counted for label demo_user_request: {timeouts}"),
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
    let mut r = StepReport::new(
        "recovery",
        "faults cleared",
        "breaker of node a closed, no stall open",
    );
    stage.node_a.set_fault(Operation::ListUsers, Fault::None);
    let t0 = Instant::now();
    let res = stage
        .app
        .fleet
        .get("a")
        .expect("configured")
        .list_users()
        .await;
    r.check(
        format!(
            "node a list-users succeeds again ({})",
            match &res {
                Ok(u) => format!("{} users", u.len()),
                Err(e) => e.to_string(),
            }
        ),
        res.is_ok(),
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
