//! Issue 19, work shared through PostgreSQL: three real `vpnbot run` processes against one
//! database and 12 simulated nodes (in this process, over loopback, each mutation taking 40 ms
//! to apply so that two applications of one UUID at once would overlap and be counted).
//!
//! - the 12 node leases split 4/4/4 and reconcile covers every node each interval (audit rows
//!   in `reconcile_runs`, written by all three instances);
//! - a burst of outbox intents (adds written as the bot writes them, removals queued by the
//!   expiry worker) is applied once each (`attempts = 1`) with zero overlapping applications;
//! - a second burst with one instance SIGKILLed at once: its leases move to the others within
//!   the bound (`lease_duration + lease_renew_interval`, plus scheduling slack), its claimed
//!   intents are taken over after their claim, still none applied twice at once;
//! - with one instance left (the other stopped by SIGTERM, releasing its leases), every node
//!   is still covered each interval.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;
use vpnbot_sim::node::{SimNode, SimNodeHandle, SimNodeOptions};

use crate::helpers;

const NODES: usize = 12;
/// Reconcile interval of the test config, seconds (jitter 10 %).
const INTERVAL: f64 = 2.0;
/// Lease duration and renew interval: the takeover bound is their sum, 2 s.
const LEASE: f64 = 1.5;
const RENEW: f64 = 0.5;
/// Longest allowed age of a node's last ok run at any moment: the longest jittered interval,
/// the worker's tick and a run, plus 1.5 s of slack for three debug processes on two shared
/// cores.
const COVER_WINDOW: f64 = INTERVAL * 1.1 + 0.2 + 1.5;
/// Slack over the takeover bound for scheduling and the lease statements themselves.
const TAKEOVER_SLACK: f64 = 1.0;

struct Instance {
    child: Child,
    obs: SocketAddr,
    log: std::path::PathBuf,
}

impl Instance {
    async fn metrics(&self) -> Option<String> {
        let r = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.obs))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await.unwrap_or_default();
        helpers::metric(&text, name, &[]).unwrap_or(0.0)
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn config(url: &str, sims: &[SimNodeHandle]) -> String {
    let mut s = format!(
        r#"
[db]
url = "{url}"
max_connections = 6
min_connections = 0
acquire_timeout_seconds = 5.0
[leader]
check_interval_seconds = 0.2
check_timeout_seconds = 0.5
retry_interval_seconds = 0.3
takeover_delay_seconds = 1.0
[runtime]
shutdown_drain_seconds = 3.0
[node_client]
connect_timeout_seconds = 1.0
headers_timeout_seconds = 2.0
body_idle_timeout_seconds = 1.0
total_deadline_seconds = 2.0
[outbox]
interval_seconds = 0.2
batch = 16
claim_seconds = 4.0
backoff_base_seconds = 0.5
[reconcile]
interval_seconds = {INTERVAL}
iteration_timeout_seconds = 1.5
lease_duration_seconds = {LEASE}
lease_renew_interval_seconds = {RENEW}
grace_seconds = 0.0
[bot]
expiry_interval_seconds = 0.3
"#
    );
    for (i, sim) in sims.iter().enumerate() {
        s.push_str(&format!(
            "[nodes.n{i:02}]\nurl = \"{}\"\napi_key = \"{}\"\npublic_host = \"n{i:02}.example.com\"\n",
            sim.base_url(),
            sim.api_key()
        ));
    }
    s
}

fn spawn(cfg: &std::path::Path, dir: &std::path::Path, n: usize) -> Instance {
    let obs = free_port();
    let log = dir.join(format!("vpnbot-{n}.log"));
    let f = File::create(&log).unwrap();
    let child = helpers::vpnbot()
        .arg("run")
        .arg("--config")
        .arg(cfg)
        .env("VPNBOT_OBSERVABILITY__LISTEN", obs.to_string())
        .env("RUST_LOG", "warn,vpnbot::reconcile::lease=info")
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .unwrap();
    Instance { child, obs, log }
}

/// Nodes whose last ok run (any instance) is older than `window` seconds.
async fn uncovered(db: &PgPool, window: f64) -> Vec<String> {
    let names: Vec<String> = (0..NODES).map(|i| format!("n{i:02}")).collect();
    sqlx::query_scalar(
        "SELECT n FROM unnest($1::text[]) AS n WHERE NOT EXISTS (SELECT 1 FROM reconcile_runs r \
         WHERE r.node = n AND r.outcome = 'ok' \
           AND r.finished_at > now() - make_interval(secs => $2)) ORDER BY n",
    )
    .bind(&names)
    .bind(window)
    .fetch_all(db)
    .await
    .unwrap()
}

/// Checks every 0.25 s for `seconds` that every node had an ok run within [`COVER_WINDOW`].
async fn assert_covered(db: &PgPool, seconds: f64, what: &str, all: &[&Instance]) {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let gaps = uncovered(db, COVER_WINDOW).await;
        if !gaps.is_empty() {
            let logs: Vec<String> = all.iter().map(|i| i.log_tail()).collect();
            panic!(
                "{what}: nodes without an ok reconcile run in the last {COVER_WINDOW} s: {gaps:?}\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Inserts `per_node` users with an active subscription and an open `add` intent (as the bot
/// writes them) on every node, and `expired` subscriptions per node already past their expiry
/// whose users are on the node (the expiry worker queues their removal). Returns the UUIDs
/// added and those to be removed.
async fn burst(
    db: &PgPool,
    sims: &[SimNodeHandle],
    tag: i64,
    per_node: usize,
    expired: usize,
) -> (Vec<Uuid>, Vec<Uuid>) {
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut tx = db.begin().await.unwrap();
    for (i, sim) in sims.iter().enumerate() {
        let node = format!("n{i:02}");
        for k in 0..per_node + expired {
            let owner = tag * 1_000_000 + (i * 1000 + k) as i64;
            let uuid = Uuid::new_v4();
            sqlx::query("INSERT INTO bot_users (telegram_id) VALUES ($1)")
                .bind(owner)
                .execute(&mut *tx)
                .await
                .unwrap();
            let live = k < per_node;
            sqlx::query(
                "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at) \
                 VALUES ($1, $2, $3, 'month', now() + CASE WHEN $4 THEN interval '30 days' \
                 ELSE interval '-1 minute' END)",
            )
            .bind(owner)
            .bind(&node)
            .bind(uuid)
            .bind(live)
            .execute(&mut *tx)
            .await
            .unwrap();
            if live {
                vpnbot::outbox::enqueue(
                    &mut tx,
                    &node,
                    vpnbot::outbox::NodeOp::Add,
                    uuid,
                    &vpnbot::node::owned_email(uuid),
                )
                .await
                .unwrap();
                added.push(uuid);
            } else {
                sim.insert_user(vpnbot::node::NodeUser {
                    uuid,
                    email: vpnbot::node::owned_email(uuid),
                });
                removed.push(uuid);
            }
        }
    }
    tx.commit().await.unwrap();
    (added, removed)
}

/// Waits until no intent is open; panics after `limit`.
async fn drained(db: &PgPool, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pending_node_ops WHERE done_at IS NULL")
                .fetch_one(db)
                .await
                .unwrap();
        if open == 0 {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{open} intents still open after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_applied_once(db: &PgPool, sims: &[SimNodeHandle], what: &str) {
    let bad: Vec<(String, Uuid, String, i32)> = sqlx::query_as(
        "SELECT node, vless_uuid, op, attempts FROM pending_node_ops \
         WHERE done_at IS NULL OR attempts <> 1",
    )
    .fetch_all(db)
    .await
    .unwrap();
    assert!(
        bad.is_empty(),
        "{what}: intents not applied exactly once: {bad:?}"
    );
    let overlaps: u64 = sims.iter().map(|s| s.overlapping_mutations()).sum();
    assert_eq!(overlaps, 0, "{what}: overlapping applications of one UUID");
}

/// Lease holders per instance id (live leases only).
async fn holders(db: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT holder, count(*) FROM node_leases WHERE holder IS NOT NULL \
         AND expires_at > now() GROUP BY holder",
    )
    .fetch_all(db)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn pid_holder(map: &BTreeMap<String, i64>, pid: u32) -> i64 {
    let needle = format!("-{pid}-");
    map.iter()
        .filter(|(h, _)| h.contains(&needle))
        .map(|(_, n)| *n)
        .sum()
}

#[sqlx::test(migrations = false)]
async fn three_instances_share_reconcile_outbox_and_expiry(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let t_test = Instant::now();
    let url = helpers::url_for(&opts);
    let mut sims = Vec::new();
    for _ in 0..NODES {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        sims.push(SimNode::start(
            l,
            SimNodeOptions {
                apply_delay: Duration::from_millis(40),
                ..Default::default()
            },
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vpnbot.toml");
    std::fs::write(&cfg, config(&url, &sims)).unwrap();
    let out = helpers::vpnbot()
        .args(["migrate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = PgPoolOptions::new()
        .max_connections(3)
        .connect(&url)
        .await
        .unwrap();

    let mut inst: Vec<Instance> = (0..3).map(|n| spawn(&cfg, dir.path(), n)).collect();

    // 1. Fair split: 4 leases each (ceil(12 / 3)), seen in each instance's own gauge.
    let t = Instant::now();
    loop {
        let mut held = Vec::new();
        for i in &inst {
            held.push(i.metric("vpnbot_reconcile_leases_held").await);
        }
        if held.iter().all(|h| *h == 4.0) {
            eprintln!("leases split 4/4/4 after {:?}", t.elapsed());
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let logs: Vec<String> = inst.iter().map(|i| i.log_tail()).collect();
            panic!(
                "leases not split 4/4/4: {held:?}\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 2. Every node covered each interval, for two intervals; all three instances ran some.
    tokio::time::sleep(Duration::from_secs_f64(INTERVAL)).await;
    assert_covered(
        &db,
        2.0 * INTERVAL,
        "3 instances",
        &inst.iter().collect::<Vec<_>>(),
    )
    .await;
    let writers: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT instance_id) FROM reconcile_runs \
         WHERE finished_at > now() - interval '4 seconds'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        writers, 3,
        "audit rows of the last 4 s come from every instance"
    );

    // 3. A burst: 25 adds and 5 expiries per node (360 intents), applied once each.
    let t = Instant::now();
    let (added, removed) = burst(&db, &sims, 1, 25, 5).await;
    let took = drained(&db, Duration::from_secs(20)).await;
    eprintln!(
        "burst 1: {} adds + {} expiry removals drained in {took:?} (after {:?} of inserts)",
        added.len(),
        removed.len(),
        t.elapsed() - took
    );
    assert_applied_once(&db, &sims, "burst 1").await;
    let on_nodes: std::collections::HashSet<Uuid> = sims
        .iter()
        .flat_map(|s| s.users().into_iter().map(|u| u.uuid))
        .collect();
    assert!(
        added.iter().all(|u| on_nodes.contains(u)),
        "every add applied"
    );
    assert!(
        removed.iter().all(|u| !on_nodes.contains(u)),
        "every expired user removed"
    );
    let mut claimed = Vec::new();
    let mut expired_claims = 0.0;
    for i in &inst {
        claimed.push(i.metric("vpnbot_outbox_claimed_total").await);
        let text = i.metrics().await.unwrap_or_default();
        expired_claims +=
            helpers::metric(&text, "vpnbot_expiry_claimed_total", &[("kind", "expired")])
                .unwrap_or(0.0);
    }
    assert_eq!(
        expired_claims,
        removed.len() as f64,
        "each expired subscription claimed by exactly one instance"
    );
    eprintln!("outbox intents claimed per instance: {claimed:?}");
    assert!(
        claimed.iter().filter(|c| **c > 0.0).count() >= 2,
        "the burst was shared: {claimed:?}"
    );

    // 4. A second, slower burst (mutations take 200 ms: about 2 s of work for three
    // instances), and one instance SIGKILLed in the middle of it.
    for s in &sims {
        s.set_apply_delay(Duration::from_millis(200));
    }
    let (added2, _) = burst(&db, &sims, 2, 20, 0).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let victim = inst.remove(0);
    let pid = victim.child.id();
    let before = pid_holder(&holders(&db).await, pid);
    let killed_at = Instant::now();
    drop(victim); // SIGKILL
    assert!(before > 0, "the victim held leases");
    let bound = LEASE + RENEW;
    let moved = loop {
        let h = holders(&db).await;
        let total: i64 = h.values().sum();
        if pid_holder(&h, pid) == 0 && total == NODES as i64 {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed().as_secs_f64() < bound + TAKEOVER_SLACK + 3.0,
            "leases did not move: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    eprintln!("SIGKILL: {before} leases moved after {moved:?} (bound {bound} s)");
    assert!(
        moved.as_secs_f64() <= bound + TAKEOVER_SLACK,
        "leases moved after {moved:?}, bound {bound} s + {TAKEOVER_SLACK} s slack"
    );
    drained(&db, Duration::from_secs(20)).await;
    eprintln!(
        "burst 2 ({} adds) drained {:?} after the kill",
        added2.len(),
        killed_at.elapsed()
    );
    assert_applied_once(&db, &sims, "burst 2 with a SIGKILL").await;
    let (mut takeovers, mut claim_takeovers) = (0.0, 0.0);
    for i in &inst {
        takeovers += i.metric("vpnbot_reconcile_lease_takeovers_total").await;
        claim_takeovers += i.metric("vpnbot_outbox_claim_takeovers_total").await;
    }
    eprintln!("lease takeovers {takeovers}, outbox claims taken over {claim_takeovers}");
    assert!(takeovers >= before as f64, "takeovers counted: {takeovers}");
    assert!(
        claim_takeovers >= 1.0,
        "the victim's claimed intents were taken over: {claim_takeovers}"
    );
    for s in &sims {
        s.set_apply_delay(Duration::from_millis(40));
    }
    assert_covered(
        &db,
        2.0 * INTERVAL,
        "2 instances",
        &inst.iter().collect::<Vec<_>>(),
    )
    .await;

    // 5. SIGTERM one more: it releases its leases; the last instance takes all 12.
    let mut gone = inst.remove(0);
    let pid = gone.child.id();
    let stopped_at = Instant::now();
    // Through the kill command, as an operator would.
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = gone.child.wait().unwrap();
    assert!(status.success(), "SIGTERM: clean exit, got {status:?}");
    let last = &inst[0];
    let t = loop {
        if last.metric("vpnbot_reconcile_leases_held").await == NODES as f64 {
            break stopped_at.elapsed();
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(10),
            "the last instance did not take every lease\n{}",
            last.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("SIGTERM: the last instance holds all {NODES} leases {t:?} after the signal");
    assert_covered(&db, 2.0 * INTERVAL, "1 instance", &[last]).await;
    let text = last.metrics().await.unwrap();
    for i in 0..NODES {
        let node = format!("n{i:02}");
        let unheld = helpers::metric(
            &text,
            "vpnbot_reconcile_node_unheld_seconds",
            &[("node", &node)],
        );
        assert_eq!(unheld, Some(0.0), "{node} held");
    }
    drop(gone);
    eprintln!("scale_out took {:?}", t_test.elapsed());
}
