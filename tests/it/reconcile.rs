//! The reconcile worker against real PostgreSQL and the node simulator over loopback:
//! FAULTS.md S1-S3 and D5, a delete applied but answered 500, a node offline during deletes,
//! unowned users, the iteration timeout, a `list-users` that hangs after its headers, and no
//! pooled connection held across HTTP.

use crate::helpers;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::Connection;
use uuid::Uuid;
use vpnbot::db::inflight::PoolUse;
use vpnbot::db::DbPool;
use vpnbot::fleet::Fleet;
use vpnbot::node::{owned_email, NodeUser, Operation};
use vpnbot::outbox::{Outbox, OutboxMetrics, OutboxSettings};
use vpnbot::reconcile::{
    GuardReason, Outcome, ReconcileSettings, Reconciler, RunOptions, RunReport,
};
use vpnbot_sim::node::{Fault, SimNode, SimNodeHandle, SimNodeOptions};

struct Env {
    pool: DbPool,
    rec: Reconciler,
    outbox: Outbox,
    sims: Vec<SimNodeHandle>,
    registry: prometheus::Registry,
    url: String,
}

fn quick_settings() -> ReconcileSettings {
    ReconcileSettings {
        interval_seconds: std::time::Duration::from_secs(60),
        jitter_share: 0.0,
        iteration_timeout_seconds: std::time::Duration::from_secs(10),
        batch_size: 3,
        recheck_batch_size: 2,
        grace_seconds: std::time::Duration::from_secs(0),
        ..Default::default()
    }
}

/// Nodes named `a`, `b`, ... one simulator each; short node-client deadlines.
async fn env(opts: &PgConnectOptions, nodes: usize, settings: ReconcileSettings) -> Env {
    let mut cfg = helpers::test_config(opts);
    let mut sims = Vec::new();
    for i in 0..nodes {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = SimNode::start(listener, SimNodeOptions::default());
        cfg.nodes.insert(
            ((b'a' + i as u8) as char).to_string(),
            vpnbot::config::NodeConfig::new(&sim.base_url(), sim.api_key(), "x.example"),
        );
        sims.push(sim);
    }
    cfg.node_client.total_deadline_seconds = Duration::from_millis(1500);
    cfg.node_client.connect_timeout_seconds = Duration::from_millis(500);
    cfg.node_client.headers_timeout_seconds = Duration::from_secs(1);
    cfg.node_client.body_idle_timeout_seconds = Duration::from_millis(500);
    cfg.node_client.retry_max_attempts = 1;
    cfg.db.statement_timeout_seconds = Duration::from_secs(1);
    let registry = vpnbot::metrics::new_registry();
    let pool = DbPool::connect(&cfg.db, &registry).unwrap();
    vpnbot::db::migrate(&pool).await.unwrap();
    let fleet = Fleet::from_config(&cfg, &registry).unwrap();
    let outbox = Outbox::new(
        pool.clone(),
        fleet.clone(),
        OutboxMetrics::register(&registry),
        OutboxSettings {
            backoff_base_seconds: std::time::Duration::from_millis(50),
            backoff_max_seconds: std::time::Duration::from_millis(100),
            ..Default::default()
        },
    );
    let rec = Reconciler::new(pool.clone(), fleet, &registry, settings);
    {
        let mut c = pool.acquire("test").await.unwrap();
        sqlx::query("INSERT INTO bot_users (telegram_id) VALUES (1)")
            .execute(&mut *c)
            .await
            .unwrap();
    }
    Env {
        pool,
        rec,
        outbox,
        sims,
        registry,
        url: helpers::url_for(opts),
    }
}

impl Env {
    fn sim(&self, node: &str) -> &SimNodeHandle {
        &self.sims[(node.as_bytes()[0] - b'a') as usize]
    }

    async fn sub(&self, node: &str, uuid: Uuid, status: &str, expires_in: &str, updated_ago: &str) {
        let mut c = self.pool.acquire("test").await.unwrap();
        sqlx::query(
            "INSERT INTO subscriptions (owner_id, node, vless_uuid, status, plan, expires_at, \
             created_at, updated_at) VALUES (1, $1, $2, $3, 'month', now() + $4::interval, \
             now() - $5::interval, now() - $5::interval)",
        )
        .bind(node)
        .bind(uuid)
        .bind(status)
        .bind(expires_in)
        .bind(updated_ago)
        .execute(&mut *c)
        .await
        .unwrap();
    }

    /// A live subscription created an hour ago, present on the node.
    async fn live_on_both(&self, node: &str) -> Uuid {
        let u = Uuid::new_v4();
        self.sub(node, u, "active", "30 days", "1 hour").await;
        self.sim(node).insert_user(NodeUser::owned(u));
        u
    }

    /// An owned user on the node whose subscription expired an hour ago.
    async fn orphan(&self, node: &str) -> Uuid {
        let u = Uuid::new_v4();
        self.sub(node, u, "expired", "-1 hour", "1 hour").await;
        self.sim(node).insert_user(NodeUser::owned(u));
        u
    }

    async fn intents(&self, op: &str) -> Vec<Uuid> {
        let mut c = self.pool.acquire("test").await.unwrap();
        let mut v: Vec<Uuid> = sqlx::query_scalar(
            "SELECT vless_uuid FROM pending_node_ops WHERE op = $1 AND done_at IS NULL",
        )
        .bind(op)
        .fetch_all(&mut *c)
        .await
        .unwrap();
        v.sort();
        v
    }

    async fn audit(&self) -> Vec<(String, String, bool, i64, i64)> {
        let mut c = self.pool.acquire("test").await.unwrap();
        sqlx::query_as(
            "SELECT node, outcome, dry_run, removed, readded FROM reconcile_runs ORDER BY id",
        )
        .fetch_all(&mut *c)
        .await
        .unwrap()
    }

    async fn once(&self, dry_run: bool) -> RunReport {
        self.rec
            .reconcile_once(&RunOptions {
                node: None,
                dry_run,
            })
            .await
            .unwrap()
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        helpers::metric(&vpnbot::metrics::render(&self.registry), name, labels)
    }

    fn has(&self, node: &str, u: Uuid) -> bool {
        self.sim(node).users().iter().any(|x| x.uuid == u)
    }
}

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

/// The whole loop: orphans removed and missing users re-added through the outbox, live and
/// expired-but-unswept users left alone, metrics and the audit row written.
#[sqlx::test(migrations = false)]
async fn orphans_removed_and_missing_readded_through_the_outbox(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env(&opts, 1, quick_settings()).await;
    let mut live = Vec::new();
    for _ in 0..20 {
        live.push(e.live_on_both("a").await);
    }
    let o1 = e.orphan("a").await;
    let o2 = e.orphan("a").await;
    let missing = Uuid::new_v4();
    e.sub("a", missing, "active", "30 days", "1 hour").await;
    // Active but past expires_at (the expiry worker has not swept it yet): neither removed
    // nor re-added.
    let unswept = Uuid::new_v4();
    e.sub("a", unswept, "active", "-1 minute", "1 hour").await;
    e.sim("a").insert_user(NodeUser::owned(unswept));
    let unswept_missing = Uuid::new_v4();
    e.sub("a", unswept_missing, "active", "-1 minute", "1 hour")
        .await;

    let rep = e.once(false).await;
    let n = rep.node("a").unwrap();
    assert_eq!(n.outcome, Outcome::Ok, "{n:?}");
    assert_eq!((n.db_live, n.node_users, n.node_owned), (23, 23, 23));
    assert_eq!((n.orphans, n.missing, n.removed, n.readded), (2, 1, 2, 1));
    assert_eq!(sorted(n.removals.clone()), sorted(vec![o1, o2]));
    assert_eq!(n.readds, vec![missing]);
    assert!(n.db_round_trips >= 9, "snapshot batches of 3: {n:?}");
    assert_eq!(n.max_connections_held, 1, "one connection at a time");
    for p in [
        "snapshot", "list", "diff", "recheck", "guard", "act", "record",
    ] {
        assert!(n.phase_seconds.contains_key(p), "{p} timed: {n:?}");
    }
    assert_eq!(e.intents("remove").await, sorted(vec![o1, o2]));
    assert_eq!(e.intents("add").await, vec![missing]);

    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.applied, 3, "{pass:?}");
    assert!(!e.has("a", o1) && !e.has("a", o2));
    assert!(e.has("a", missing) && e.has("a", unswept));
    assert!(live.iter().all(|u| e.has("a", *u)));

    // Converged: the next run finds nothing to do.
    let rep = e.once(false).await;
    let n = rep.node("a").unwrap();
    assert_eq!((n.outcome, n.orphans, n.missing), (Outcome::Ok, 0, 0));

    assert_eq!(
        e.metric(
            "vpnbot_reconcile_runs_total",
            &[("node", "a"), ("outcome", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(
        e.metric("vpnbot_reconcile_orphans_total", &[("node", "a")]),
        Some(2.0)
    );
    assert_eq!(
        e.metric("vpnbot_reconcile_removed_total", &[("node", "a")]),
        Some(2.0)
    );
    assert_eq!(
        e.metric("vpnbot_reconcile_readded_total", &[("node", "a")]),
        Some(1.0)
    );
    let ts = e
        .metric(
            "vpnbot_reconcile_last_success_timestamp_seconds",
            &[("node", "a")],
        )
        .unwrap();
    assert!(ts > 1.7e9, "{ts}");
    assert!(e
        .metric(
            "vpnbot_reconcile_phase_duration_seconds_count",
            &[("node", "a"), ("phase", "list")]
        )
        .is_some());
    let audit = e.audit().await;
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0], ("a".into(), "ok".into(), false, 2, 1));
    let st = e.rec.status();
    assert!(st.last_completed().is_some());
    assert_eq!(st.runs_completed(), 2);
    assert_eq!(st.nodes()["a"].last_outcome, Outcome::Ok);
}

/// FAULTS.md S1: a purchase commits after the snapshot (while `list-users` is in flight); the
/// live re-check keeps its key. A subscription changed within the grace window is kept too.
#[sqlx::test(migrations = false)]
async fn s1_purchase_after_snapshot_is_kept(_p: PgPoolOptions, opts: PgConnectOptions) {
    let settings = ReconcileSettings {
        grace_seconds: std::time::Duration::from_secs(600),
        ..quick_settings()
    };
    let e = env(&opts, 1, settings).await;
    for _ in 0..20 {
        e.live_on_both("a").await;
    }
    let old_orphan = e.orphan("a").await;
    // Cancelled two minutes ago: inside the 10-minute grace window.
    let recent = Uuid::new_v4();
    e.sub("a", recent, "cancelled", "-1 hour", "2 minutes")
        .await;
    e.sim("a").insert_user(NodeUser::owned(recent));
    // Bought while the run is between snapshot and re-check: the outbox added it to the node
    // before `list-users` read the list, but the snapshot predates it.
    let bought = Uuid::new_v4();
    e.sim("a").insert_user(NodeUser::owned(bought));
    e.sim("a").set_fault(
        Operation::ListUsers,
        Fault::Delay(Duration::from_millis(600)),
    );

    let run = e.once(false);
    let purchase = async {
        helpers::eventually(Duration::from_secs(5), || {
            e.sim("a").requests(Operation::ListUsers) >= 1
        })
        .await
        .expect("list-users requested");
        // A fresh subscription, created "now" but by a backdated clock, so that only the
        // live re-check (not the grace window) can keep it.
        e.sub("a", bought, "active", "30 days", "1 day").await;
    };
    let (rep, ()) = tokio::join!(run, purchase);
    let n = rep.node("a").unwrap();
    assert_eq!(n.outcome, Outcome::Ok, "{n:?}");
    assert_eq!(n.orphans, 3, "the diff saw three orphans: {n:?}");
    assert_eq!(n.kept_by_recheck, 2, "{n:?}");
    assert_eq!(n.removals, vec![old_orphan]);
    assert_eq!(e.intents("remove").await, vec![old_orphan]);
}

/// FAULTS.md S2: a run that would remove more than the share guard allows removes nothing, is
/// marked guarded and counted; so is an empty database side.
#[sqlx::test(migrations = false)]
async fn s2_guard_removes_nothing(_p: PgPoolOptions, opts: PgConnectOptions) {
    let settings = ReconcileSettings {
        guard_share_min_removals: 2,
        ..quick_settings()
    };
    let e = env(&opts, 2, settings).await;
    for _ in 0..7 {
        e.live_on_both("a").await;
    }
    for _ in 0..3 {
        e.orphan("a").await; // 3 of 10 owned = 30 % > 20 %
    }
    let missing = Uuid::new_v4();
    e.sub("a", missing, "active", "30 days", "1 hour").await;
    // Node b: its users are all vpnbot's, the database has none for it.
    for _ in 0..5 {
        e.sim("b").insert_user(NodeUser::owned(Uuid::new_v4()));
    }
    let rep = e.once(false).await;
    let a = rep.node("a").unwrap();
    assert_eq!(a.outcome, Outcome::Guarded, "{a:?}");
    assert_eq!(a.guard.as_ref().unwrap().reason, GuardReason::RemoveShare);
    assert_eq!((a.blocked_removals, a.removed), (3, 0));
    assert_eq!(a.readded, 1, "re-adds of live users still go out");
    let b = rep.node("b").unwrap();
    assert_eq!(b.outcome, Outcome::Guarded, "{b:?}");
    assert_eq!(b.guard.as_ref().unwrap().reason, GuardReason::DbEmpty);
    assert!(e.intents("remove").await.is_empty());
    assert_eq!(e.sim("a").user_count() + e.sim("b").user_count(), 15);
    for (node, reason) in [("a", "remove_share"), ("b", "db_empty")] {
        assert_eq!(
            e.metric(
                "vpnbot_reconcile_guard_trips_total",
                &[("node", node), ("reason", reason)]
            ),
            Some(1.0)
        );
        assert_eq!(
            e.metric(
                "vpnbot_reconcile_runs_total",
                &[("node", node), ("outcome", "guarded")]
            ),
            Some(1.0)
        );
    }
    let audit = e.audit().await;
    assert!(audit.iter().all(|r| r.1 == "guarded"), "{audit:?}");
}

/// FAULTS.md S3: a dry run reports exactly what the real run then removes and re-adds, and
/// writes nothing but its audit row.
#[sqlx::test(migrations = false)]
async fn s3_dry_run_reports_exactly_and_removes_nothing(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts, 1, quick_settings()).await;
    for _ in 0..20 {
        e.live_on_both("a").await;
    }
    let orphans = sorted(vec![e.orphan("a").await, e.orphan("a").await]);
    let missing = Uuid::new_v4();
    e.sub("a", missing, "active", "30 days", "1 hour").await;
    let before = e.sim("a").user_count();

    let dry = e.once(true).await;
    let d = dry.node("a").unwrap();
    assert_eq!(d.outcome, Outcome::DryRun, "{d:?}");
    assert_eq!(sorted(d.removals.clone()), orphans);
    assert_eq!(d.readds, vec![missing]);
    assert_eq!((d.removed, d.readded), (0, 0));
    assert!(e.intents("remove").await.is_empty() && e.intents("add").await.is_empty());
    assert_eq!(e.outbox.process_once().await.unwrap().due, 0);
    assert_eq!(e.sim("a").user_count(), before);
    let table = vpnbot::reconcile::cli::render_table(&dry);
    for u in &orphans {
        assert!(table.contains(&format!("would remove {u}")), "{table}");
    }

    let real = e.once(false).await;
    let r = real.node("a").unwrap();
    assert_eq!(sorted(r.removals.clone()), orphans);
    assert_eq!(r.readds, d.readds);
    assert_eq!(e.intents("remove").await, orphans);
    let audit = e.audit().await;
    assert_eq!(audit[0], ("a".into(), "dry_run".into(), true, 2, 1));
    assert_eq!(
        e.metric(
            "vpnbot_reconcile_runs_total",
            &[("node", "a"), ("outcome", "dry_run")]
        ),
        Some(1.0)
    );
}

/// FAULTS.md D5: a database error during the snapshot (a statement timeout behind a lock)
/// aborts the node's run: it is never read as "no subscriptions", nothing is removed.
#[sqlx::test(migrations = false)]
async fn d5_db_error_in_snapshot_aborts_the_run(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts, 1, quick_settings()).await;
    for _ in 0..5 {
        e.live_on_both("a").await;
    }
    let mut locker = sqlx::PgConnection::connect(&e.url).await.unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE subscriptions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let rep = e.once(false).await;
    let n = rep.node("a").unwrap();
    assert_eq!(n.outcome, Outcome::Failed, "{n:?}");
    assert_eq!(n.failed_phase, Some(vpnbot::reconcile::Phase::Snapshot));
    assert_eq!(n.error_type, Some("statement_timeout"), "{n:?}");
    assert_eq!(
        e.sim("a").requests(Operation::ListUsers),
        0,
        "stopped before list"
    );
    assert_eq!(n.removals.len(), 0);
    tx.rollback().await.unwrap();
    assert!(e.intents("remove").await.is_empty());
    assert_eq!(e.sim("a").user_count(), 5);
    assert_eq!(
        e.metric(
            "vpnbot_reconcile_runs_total",
            &[("node", "a"), ("outcome", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        e.metric(
            "vpnbot_reconcile_last_success_timestamp_seconds",
            &[("node", "a")]
        ),
        None
    );
    assert_eq!(e.audit().await[0].1, "failed");
}

/// A node error is never "no users": a failing `list-users` fails the run, the database side
/// stays untouched, no re-add storm.
#[sqlx::test(migrations = false)]
async fn node_error_is_never_an_empty_node(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts, 1, quick_settings()).await;
    for _ in 0..5 {
        e.live_on_both("a").await;
    }
    e.sim("a")
        .set_fault(Operation::ListUsers, Fault::Status(503));
    let rep = e.once(false).await;
    let n = rep.node("a").unwrap();
    assert_eq!(n.outcome, Outcome::Failed, "{n:?}");
    assert_eq!(n.failed_phase, Some(vpnbot::reconcile::Phase::List));
    assert!(e.intents("add").await.is_empty());
}

/// A node that answers 500 to a delete it applied (N12): the intent stays open, the retry
/// finds the user gone and completes; the next reconcile run finds nothing to do.
#[sqlx::test(migrations = false)]
async fn delete_applied_but_answered_500(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts, 1, quick_settings()).await;
    for _ in 0..20 {
        e.live_on_both("a").await;
    }
    let o = e.orphan("a").await;
    e.sim("a")
        .set_fault(Operation::RemoveUser, Fault::ApplyThen500);
    assert_eq!(e.once(false).await.node("a").unwrap().removed, 1);
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.failed, 1, "{pass:?}");
    assert!(!e.has("a", o), "applied on the node");
    assert_eq!(e.intents("remove").await, vec![o], "kept for retry");
    e.sim("a").set_fault(Operation::RemoveUser, Fault::None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(e.outbox.process_once().await.unwrap().applied, 1);
    assert!(e.intents("remove").await.is_empty());
    let n = e.once(false).await;
    assert_eq!(n.node("a").unwrap().orphans, 0);
}

/// A node offline during deletes: the removals wait in the outbox (a second reconcile run does
/// not re-queue them or reset their backoff) and complete once the node is back.
#[sqlx::test(migrations = false)]
async fn node_offline_during_deletes_completes_later(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts, 1, quick_settings()).await;
    for _ in 0..20 {
        e.live_on_both("a").await;
    }
    let orphans = sorted(vec![e.orphan("a").await, e.orphan("a").await]);
    assert_eq!(e.once(false).await.node("a").unwrap().removed, 2);
    e.sim("a").set_fault(Operation::RemoveUser, Fault::Reset);
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.failed, 2, "{pass:?}");
    let second = e.once(false).await;
    let n = second.node("a").unwrap();
    assert_eq!(
        (n.orphans, n.already_pending, n.removed),
        (2, 2, 0),
        "{n:?}"
    );
    let attempts: Vec<i32> = {
        let mut c = e.pool.acquire("test").await.unwrap();
        sqlx::query_scalar("SELECT attempts FROM pending_node_ops WHERE done_at IS NULL")
            .fetch_all(&mut *c)
            .await
            .unwrap()
    };
    assert_eq!(attempts, vec![1, 1], "backoff not reset");
    assert!(orphans.iter().all(|u| e.has("a", *u)));
    e.sim("a").set_fault(Operation::RemoveUser, Fault::None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(e.outbox.process_once().await.unwrap().applied, 2);
    assert!(orphans.iter().all(|u| !e.has("a", *u)));
}

/// Users without the ownership marker, or with a marker naming another UUID, are never
/// removed, even when they are most of the node.
#[sqlx::test(migrations = false)]
async fn unowned_users_are_never_removed(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts, 1, quick_settings()).await;
    e.live_on_both("a").await;
    let mut foreign = Vec::new();
    for i in 0..30 {
        let u = Uuid::new_v4();
        e.sim("a").insert_user(NodeUser {
            uuid: u,
            email: format!("friend{i}@operator"),
        });
        foreign.push(u);
    }
    let copied = Uuid::new_v4();
    e.sim("a").insert_user(NodeUser {
        uuid: copied,
        email: owned_email(Uuid::new_v4()),
    });
    foreign.push(copied);
    let rep = e.once(false).await;
    let n = rep.node("a").unwrap();
    assert_eq!(n.outcome, Outcome::Ok, "{n:?}");
    assert_eq!((n.node_users, n.node_owned, n.orphans), (32, 1, 0));
    assert!(e.intents("remove").await.is_empty());
    assert!(foreign.iter().all(|u| e.has("a", *u)));
}

/// An iteration that exceeds its timeout is cancelled with nothing half-done: the outbox
/// insert was blocked behind a lock, and after the lock goes no intent appears. The audit row
/// says `timeout`.
#[sqlx::test(migrations = false)]
async fn iteration_timeout_leaves_nothing_half_done(_p: PgPoolOptions, opts: PgConnectOptions) {
    let settings = ReconcileSettings {
        iteration_timeout_seconds: std::time::Duration::from_millis(800),
        ..quick_settings()
    };
    let e = env(&opts, 1, settings).await;
    for _ in 0..20 {
        e.live_on_both("a").await;
    }
    let _orphans = [e.orphan("a").await, e.orphan("a").await];
    let missing = Uuid::new_v4();
    e.sub("a", missing, "active", "30 days", "1 hour").await;
    let mut locker = sqlx::PgConnection::connect(&e.url).await.unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE pending_node_ops IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let t = Instant::now();
    let rep = e.once(false).await;
    let took = t.elapsed();
    let n = rep.node("a").unwrap();
    assert_eq!(n.outcome, Outcome::Timeout, "{n:?}");
    assert_eq!(n.failed_phase, Some(vpnbot::reconcile::Phase::Act), "{n:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    tx.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(e.intents("remove").await.is_empty(), "all or nothing");
    assert!(e.intents("add").await.is_empty(), "all or nothing");
    assert_eq!(e.audit().await[0].1, "timeout");
    assert_eq!(
        e.metric(
            "vpnbot_reconcile_runs_total",
            &[("node", "a"), ("outcome", "timeout")]
        ),
        Some(1.0)
    );
    // The next run is unaffected.
    let n2 = e.once(false).await;
    assert_eq!(n2.node("a").unwrap().removed, 2);
}

/// A node whose `list-users` sends headers then nothing (the predecessor's freeze) fails
/// within the node deadline; the other node finishes; the periodic worker keeps its schedule
/// even when the iteration timeout cuts a run short.
#[sqlx::test(migrations = false)]
async fn list_hang_after_headers_fails_that_node_only_and_runs_stay_on_time(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let settings = ReconcileSettings {
        interval_seconds: std::time::Duration::from_secs(1),
        iteration_timeout_seconds: std::time::Duration::from_secs(1),
        ..quick_settings()
    };
    let e = env(&opts, 3, settings).await;
    for node in ["a", "b", "c"] {
        for _ in 0..20 {
            e.live_on_both(node).await;
        }
    }
    let ob = e.orphan("b").await;
    e.sim("a")
        .set_fault(Operation::ListUsers, Fault::HeadersThenSilence);
    // Node c is slower than the iteration timeout: cut short each run.
    e.sim("c").set_fault(
        Operation::ListUsers,
        Fault::Delay(Duration::from_millis(3000)),
    );

    let t = Instant::now();
    let rep = e.once(false).await;
    let took = t.elapsed();
    let a = rep.node("a").unwrap();
    assert_eq!(a.outcome, Outcome::Failed, "{a:?}");
    assert_eq!(a.failed_phase, Some(vpnbot::reconcile::Phase::List));
    assert!(
        matches!(a.error_type, Some("body_timeout" | "deadline_exceeded")),
        "{a:?}"
    );
    assert!(
        a.phase_seconds["list"] < 1.2,
        "within the node deadline: {a:?}"
    );
    assert_eq!(rep.node("b").unwrap().outcome, Outcome::Ok);
    assert_eq!(rep.node("b").unwrap().removals, vec![ob]);
    assert_eq!(rep.node("c").unwrap().outcome, Outcome::Timeout);
    assert!(took < Duration::from_secs(3), "{took:?}");

    // The periodic worker: first run at once, then every second.
    let status = e.rec.status();
    let cancel = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(e.rec.clone().run(cancel.clone()));
    let t = Instant::now();
    let got = helpers::eventually(Duration::from_secs(6), || status.runs_completed() >= 4).await;
    cancel.cancel();
    worker.await.unwrap();
    let took = got.expect("runs keep coming");
    assert!(
        took < Duration::from_secs_f64(3.0 + 1.5),
        "3 runs after the first need ~3 s: {took:?} since {t:?}"
    );
    assert!(status.overdue_by(std::time::SystemTime::now()).is_none());
    assert_eq!(status.nodes()["a"].last_outcome, Outcome::Failed);
    assert!(status.nodes()["b"].last_success.is_some());
    assert!(status.nodes()["c"].last_success.is_none());
}

/// No pooled connection is held across an HTTP call: while `list-users` is in flight, the
/// pool's holders registry shows no reconcile label.
#[sqlx::test(migrations = false)]
async fn no_pooled_connection_held_during_list_users(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts, 1, quick_settings()).await;
    for _ in 0..20 {
        e.live_on_both("a").await;
    }
    e.orphan("a").await;
    e.sim("a").set_fault(
        Operation::ListUsers,
        Fault::Delay(Duration::from_millis(700)),
    );
    let run = e.once(false);
    let sample = async {
        helpers::eventually(Duration::from_secs(5), || {
            e.sim("a").requests(Operation::ListUsers) >= 1
        })
        .await
        .expect("list-users requested");
        let mut samples = 0;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(500) {
            let holders: Vec<&str> = e
                .pool
                .inflight()
                .snapshot()
                .into_iter()
                .filter(|h| h.state == PoolUse::Holding)
                .map(|h| h.label)
                .collect();
            assert!(
                !holders.iter().any(|l| l.starts_with("reconcile")),
                "held during list-users: {holders:?}"
            );
            samples += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples
    };
    let (rep, samples) = tokio::join!(run, sample);
    assert!(samples > 20, "{samples}");
    assert_eq!(rep.node("a").unwrap().outcome, Outcome::Ok);
    assert!(rep.node("a").unwrap().phase_seconds["list"] >= 0.6);
}

/// The metric contract: every family, its type and its labels.
#[sqlx::test(migrations = false)]
async fn metric_families(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts, 1, quick_settings()).await;
    e.orphan("a").await;
    e.live_on_both("a").await;
    e.once(false).await;
    let fams = e.registry.gather();
    let find = |n: &str| {
        fams.iter()
            .find(|f| f.name() == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    use prometheus::proto::MetricType::*;
    for (n, t) in [
        ("vpnbot_reconcile_runs_total", COUNTER),
        ("vpnbot_reconcile_phase_duration_seconds", HISTOGRAM),
        ("vpnbot_reconcile_orphans_total", COUNTER),
        ("vpnbot_reconcile_missing_total", COUNTER),
        ("vpnbot_reconcile_removed_total", COUNTER),
        ("vpnbot_reconcile_readded_total", COUNTER),
        ("vpnbot_reconcile_last_success_timestamp_seconds", GAUGE),
    ] {
        let f = find(n);
        assert_eq!(f.get_field_type(), t, "{n}");
        assert!(!f.help().is_empty(), "{n}");
    }
    let phases: std::collections::BTreeSet<String> =
        find("vpnbot_reconcile_phase_duration_seconds")
            .get_metric()
            .iter()
            .flat_map(|m| m.get_label().iter())
            .filter(|l| l.name() == "phase")
            .map(|l| l.value().to_string())
            .collect();
    assert_eq!(
        phases.into_iter().collect::<Vec<_>>(),
        ["act", "diff", "guard", "list", "recheck", "record", "snapshot"]
    );
}

/// Issue 11 item 1: a node whose every answer is a `307` to a second server returning
/// `{"users":[]}`. Reconcile must record the node as failed (never "empty"), queue nothing, and
/// no connection may reach the second server (the API key stays home).
#[sqlx::test(migrations = false)]
async fn redirecting_node_fails_and_its_target_sees_nothing(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let e = env(&opts, 1, quick_settings()).await;
    for _ in 0..3 {
        e.live_on_both("a").await;
    }
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = target.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = target.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    for op in Operation::ALL {
        e.sim("a").set_fault(op, Fault::Redirect(port));
    }
    let rep = e.once(false).await;
    let n = rep.node("a").unwrap();
    assert_eq!(n.outcome, Outcome::Failed, "{n:?}");
    assert_eq!(n.failed_phase, Some(vpnbot::reconcile::Phase::List));
    assert!(
        n.error.as_deref().unwrap_or_default().contains("redirect"),
        "{n:?}"
    );
    assert!(e.intents("add").await.is_empty());
    assert!(e.intents("remove").await.is_empty());
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

/// Issue 11 item 2: a node (or a panel in front of its core) that lower-cases emails and
/// upper-cases UUIDs. Markers of both forms must still be recognised, so an expired user is
/// removed and a live one kept; a marker that matches no UUID (copied by hand) is counted and
/// reported, never removed.
#[sqlx::test(migrations = false)]
async fn markers_survive_a_node_that_folds_case(_p: PgPoolOptions, opts: PgConnectOptions) {
    use vpnbot::node::legacy_owned_email;
    let e = env(&opts, 1, quick_settings()).await;
    let mut live = Vec::new();
    for _ in 0..4 {
        live.push(e.live_on_both("a").await);
    }
    // One live user still carrying the legacy marker, as vpnbot wrote it before.
    let legacy_live = Uuid::new_v4();
    e.sub("a", legacy_live, "active", "30 days", "1 hour").await;
    e.sim("a").insert_user(NodeUser {
        uuid: legacy_live,
        email: legacy_owned_email(legacy_live),
    });
    let new_orphan = e.orphan("a").await;
    let legacy_orphan = Uuid::new_v4();
    e.sub("a", legacy_orphan, "expired", "-1 hour", "1 hour")
        .await;
    e.sim("a").insert_user(NodeUser {
        uuid: legacy_orphan,
        email: legacy_owned_email(legacy_orphan),
    });
    let copied = Uuid::new_v4();
    e.sim("a").insert_user(NodeUser {
        uuid: copied,
        email: owned_email(Uuid::new_v4()),
    });
    e.sim("a").set_fault(Operation::ListUsers, Fault::FoldCase);
    let rep = e.once(false).await;
    let n = rep.node("a").unwrap();
    assert_eq!(n.outcome, Outcome::Ok, "{n:?}");
    assert_eq!((n.node_users, n.node_owned), (8, 7), "{n:?}");
    assert_eq!(n.unmatched_markers, 1, "{n:?}");
    assert_eq!(
        sorted(e.intents("remove").await),
        sorted(vec![new_orphan, legacy_orphan])
    );
    assert!(e.intents("add").await.is_empty(), "live users were seen");
    assert_eq!(
        e.metric("vpnbot_reconcile_unmatched_markers", &[("node", "a")]),
        Some(1.0)
    );
}

/// Issue 19, fencing: instance A holds node a's lease and its pass is inside `list-users` when
/// the lease expires and instance B takes it over (fencing token 1 → 2). A's pass still
/// believes its lease valid locally (its renewal task is not running) but its act phase checks
/// the token in the database: no intent is written, no audit row, outcome `lease_lost`.
#[sqlx::test(migrations = false)]
async fn pass_that_lost_its_lease_writes_nothing(_p: PgPoolOptions, opts: PgConnectOptions) {
    use vpnbot::reconcile::lease::{LeaseMetrics, Leases};
    let e = env(&opts, 1, quick_settings()).await;
    e.live_on_both("a").await;
    let orphan = e.orphan("a").await;
    let settings = quick_settings();
    let lease = |id: &str| {
        Leases::new(
            e.pool.clone(),
            id.to_owned(),
            vec!["a".to_owned()],
            &settings,
            LeaseMetrics::register(&prometheus::Registry::new()),
        )
    };
    let (a, b) = (lease("instance-a"), lease("instance-b"));
    let t = a.tick().await.unwrap();
    assert_eq!((t.acquired, t.held, t.takeovers), (1, 1, 0), "{t:?}");
    assert_eq!(a.token("a"), Some(1));
    e.sim("a").set_fault(
        Operation::ListUsers,
        Fault::Delay(Duration::from_millis(700)),
    );

    let cancel = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(e.rec.clone().run_leased(a.clone(), cancel.clone()));
    let sim = e.sim("a");
    assert!(
        helpers::eventually(Duration::from_secs(5), || sim
            .requests(Operation::ListUsers)
            >= 1)
        .await
        .is_some(),
        "A's pass reached list-users"
    );
    {
        let mut c = e.pool.acquire("test").await.unwrap();
        sqlx::query("UPDATE node_leases SET expires_at = now() - interval '1 second'")
            .execute(&mut *c)
            .await
            .unwrap();
    }
    let t = b.tick().await.unwrap();
    assert_eq!(
        (t.acquired, t.takeovers),
        (1, 1),
        "B took the lease over: {t:?}"
    );
    assert_eq!(b.token("a"), Some(2));
    assert!(
        a.holds("a", 1),
        "A still believes it holds the lease locally"
    );

    let status = e.rec.status();
    assert!(
        helpers::eventually(Duration::from_secs(5), || status.nodes().contains_key("a"))
            .await
            .is_some(),
        "A's pass ended"
    );
    cancel.cancel();
    worker.await.unwrap();
    let st = &status.nodes()["a"];
    assert_eq!(st.last_outcome, Outcome::Failed);
    assert_eq!(st.last_error_type, Some("lease_lost"));
    assert_eq!(st.last_failed_phase, Some(vpnbot::reconcile::Phase::Act));
    assert!(
        e.intents("remove").await.is_empty(),
        "no removal of {orphan} written"
    );
    assert!(e.audit().await.is_empty(), "no audit row written");

    // B, holding the lease with token 2, reconciles the node and records it.
    let cancel = tokio_util::sync::CancellationToken::new();
    e.sim("a").set_fault(Operation::ListUsers, Fault::None);
    let worker = tokio::spawn(e.rec.clone().run_leased(b.clone(), cancel.clone()));
    let url = e.url.clone();
    let mut rows = 0i64;
    for _ in 0..100 {
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        rows = sqlx::query_scalar(
            "SELECT count(*) FROM reconcile_runs WHERE instance_id = 'instance-b' \
             AND fencing_token = 2 AND outcome = 'ok'",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        if rows > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    worker.await.unwrap();
    assert_eq!(rows, 1, "B's run recorded under its token");
    assert_eq!(e.intents("remove").await, vec![orphan]);
}

/// Issue 19, balance: three lease clients over 12 nodes settle at 4 each within a few ticks,
/// each acquisition bumping the node's fencing token; one stops renewing (dies) and the other
/// two take its 4 leases over once they expire, 6 each.
#[sqlx::test(migrations = false)]
async fn leases_split_evenly_and_a_dead_holders_are_taken_over(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use vpnbot::reconcile::lease::{LeaseMetrics, Leases};
    let e = env(&opts, 0, quick_settings()).await;
    let settings = ReconcileSettings {
        lease_duration_seconds: Duration::from_millis(600),
        lease_renew_interval_seconds: Duration::from_millis(200),
        ..quick_settings()
    };
    let nodes: Vec<String> = (0..12).map(|i| format!("n{i:02}")).collect();
    let ls: Vec<Leases> = ["x", "y", "z"]
        .iter()
        .map(|id| {
            Leases::new(
                e.pool.clone(),
                (*id).to_owned(),
                nodes.clone(),
                &settings,
                LeaseMetrics::register(&prometheus::Registry::new()),
            )
        })
        .collect();
    for _ in 0..3 {
        for l in &ls {
            l.tick().await.unwrap();
        }
    }
    let held: Vec<usize> = ls.iter().map(|l| l.held_nodes().len()).collect();
    assert_eq!(held, vec![4, 4, 4]);
    let mut all: Vec<String> = ls.iter().flat_map(|l| l.held_nodes()).collect();
    all.sort();
    assert_eq!(all, nodes, "every node held once");

    // z dies: x and y keep ticking every 200 ms; z's leases and heartbeat expire after 600 ms.
    let gone = ls[2].held_nodes();
    let t = std::time::Instant::now();
    let mut takeovers = 0;
    while ls[0].held_nodes().len() + ls[1].held_nodes().len() < 12 {
        assert!(t.elapsed() < Duration::from_secs(3), "no takeover");
        tokio::time::sleep(Duration::from_millis(200)).await;
        for l in &ls[..2] {
            takeovers += l.tick().await.unwrap().takeovers;
        }
    }
    assert!(
        t.elapsed() <= settings.lease_takeover_bound() + Duration::from_millis(500),
        "taken over after {:?}",
        t.elapsed()
    );
    assert_eq!(takeovers, gone.len());
    for l in &ls[..2] {
        l.tick().await.unwrap();
    }
    assert_eq!(ls[0].held_nodes().len(), 6);
    assert_eq!(ls[1].held_nodes().len(), 6);
    for n in &gone {
        let x = ls[0].token(n).or(ls[1].token(n)).unwrap();
        assert!(x >= 2, "{n}: takeover bumped the fencing token to {x}");
    }
}

/// The snapshot reads only the covering index of migration 0007: on a vacuumed table both of
/// its statements are index-only scans with no heap fetch (before it, every row cost a heap
/// page: 27–37 ms of server time per 10,000-row batch at 1M subscriptions instead of 4–5 ms).
/// A column added to the statements, or the index changed, fails this.
#[sqlx::test(migrations = false)]
async fn snapshot_batches_are_index_only_scans(_p: PgPoolOptions, opts: PgConnectOptions) {
    use vpnbot::reconcile::snapshot::{FIRST_BATCH_SQL, NEXT_BATCH_SQL};
    let e = env(&opts, 1, quick_settings()).await;
    let mut conn = sqlx::PgConnection::connect_with(&opts).await.unwrap();
    sqlx::query("INSERT INTO bot_users (telegram_id) SELECT generate_series(1, 20000) ON CONFLICT DO NOTHING")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at) \
         SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, gen_random_uuid(), 'trial', \
                now() + interval '30 days' \
         FROM generate_series(1, 20000) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("VACUUM (ANALYZE) subscriptions")
        .execute(&mut conn)
        .await
        .unwrap();
    let half = Uuid::from_u128(u128::MAX / 2);
    for (name, sql) in [("first", FIRST_BATCH_SQL), ("next", NEXT_BATCH_SQL)] {
        let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}");
        let mut q = sqlx::query_scalar::<_, serde_json::Value>(sqlx::AssertSqlSafe(explain))
            .bind("a")
            .bind(1000_i64);
        if name == "next" {
            q = q.bind(half);
        }
        let plan = q.fetch_one(&mut conn).await.unwrap();
        let scan = find_scan(&plan[0]["Plan"]).unwrap_or_else(|| panic!("{name}: {plan}"));
        assert_eq!(scan["Node Type"], "Index Only Scan", "{name}: {plan}");
        assert_eq!(
            scan["Index Name"], "subscriptions_live_covering",
            "{name}: {plan}"
        );
        assert_eq!(scan["Heap Fetches"], 0, "{name}: {plan}");
        assert_eq!(scan["Actual Rows"], 1000, "{name}: {plan}");
    }
    drop(e);
}

/// The plan node that scans `subscriptions`, depth first.
fn find_scan(node: &serde_json::Value) -> Option<&serde_json::Value> {
    if node["Relation Name"] == "subscriptions" {
        return Some(node);
    }
    node["Plans"].as_array()?.iter().find_map(find_scan)
}
