//! The node-operation outbox against real PostgreSQL and the node simulator over loopback:
//! an offline node's removal waits and completes later (FAULTS.md N12 too), a removal of a live
//! subscription is never applied, a newer intent replaces an older one.

use crate::helpers;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;
use vpnbot::db::DbPool;
use vpnbot::fleet::Fleet;
use vpnbot::node::{NodeUser, Operation};
use vpnbot::outbox::{enqueue, NodeOp, Outbox, OutboxMetrics, OutboxSettings};
use vpnbot_sim::node::{Fault, SimNode, SimNodeHandle, SimNodeOptions};

struct Env {
    pool: DbPool,
    outbox: Outbox,
    sim: SimNodeHandle,
    registry: prometheus::Registry,
}

async fn env(opts: &PgConnectOptions) -> Env {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = SimNode::start(listener, SimNodeOptions::default());
    let mut cfg = helpers::test_config(opts);
    cfg.nodes.insert(
        "a".into(),
        vpnbot::config::NodeConfig::new(&sim.base_url(), sim.api_key(), "a.example"),
    );
    cfg.node_client.total_deadline_seconds = Duration::from_secs(2);
    cfg.node_client.connect_timeout_seconds = Duration::from_secs(1);
    cfg.node_client.headers_timeout_seconds = Duration::from_secs(1);
    cfg.node_client.body_idle_timeout_seconds = Duration::from_secs(1);
    cfg.node_client.retry_max_attempts = 1;
    let registry = vpnbot::metrics::new_registry();
    let pool = DbPool::connect(&cfg.db, &registry).unwrap();
    vpnbot::db::migrate(&pool).await.unwrap();
    let fleet = Fleet::from_config(&cfg, &registry).unwrap();
    let settings = OutboxSettings {
        backoff_base_seconds: std::time::Duration::from_millis(50),
        backoff_max_seconds: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    let outbox = Outbox::new(
        pool.clone(),
        fleet,
        OutboxMetrics::register(&registry),
        settings,
    );
    Env {
        pool,
        outbox,
        sim,
        registry,
    }
}

async fn intent(pool: &DbPool, op: NodeOp, uuid: Uuid) {
    let mut c = pool.acquire("test").await.unwrap();
    enqueue(&mut c, "a", op, uuid, &vpnbot::node::owned_email(uuid))
        .await
        .unwrap();
}

async fn open_intents(pool: &DbPool) -> i64 {
    let mut c = pool.acquire("test").await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM pending_node_ops WHERE done_at IS NULL")
        .fetch_one(&mut *c)
        .await
        .unwrap()
}

async fn live_subscription(pool: &DbPool, uuid: Uuid) {
    let mut c = pool.acquire("test").await.unwrap();
    sqlx::query("INSERT INTO bot_users (telegram_id) VALUES (1) ON CONFLICT DO NOTHING")
        .execute(&mut *c)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at) \
         VALUES (1, 'a', $1, 'month', now() + interval '30 days')",
    )
    .bind(uuid)
    .execute(&mut *c)
    .await
    .unwrap();
}

#[sqlx::test(migrations = false)]
async fn removal_waits_while_the_node_is_offline_then_completes(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env(&opts).await;
    let uuid = Uuid::new_v4();
    e.sim.insert_user(NodeUser::owned(uuid));
    e.sim.set_fault(Operation::RemoveUser, Fault::Reset);
    intent(&e.pool, NodeOp::Remove, uuid).await;

    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!((pass.due, pass.failed), (1, 1));
    assert_eq!(open_intents(&e.pool).await, 1, "kept for retry");
    assert!(e.sim.users().iter().any(|u| u.uuid == uuid));

    e.sim.set_fault(Operation::RemoveUser, Fault::None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.applied, 1, "{pass:?}");
    assert_eq!(open_intents(&e.pool).await, 0);
    assert!(!e.sim.users().iter().any(|u| u.uuid == uuid));
    let text = vpnbot::metrics::render(&e.registry);
    assert_eq!(
        helpers::metric(
            &text,
            "vpnbot_outbox_ops_total",
            &[("op", "remove"), ("outcome", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        helpers::metric(&text, "vpnbot_outbox_pending_ops", &[]),
        Some(0.0)
    );
}

/// FAULTS.md N12: the node applies the delete but answers 500; the intent stays, and the retry
/// finds the user absent, which counts as success.
#[sqlx::test(migrations = false)]
async fn delete_applied_but_answered_500_completes_on_retry(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env(&opts).await;
    let uuid = Uuid::new_v4();
    e.sim.insert_user(NodeUser::owned(uuid));
    e.sim.set_fault(Operation::RemoveUser, Fault::ApplyThen500);
    intent(&e.pool, NodeOp::Remove, uuid).await;
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.failed, 1, "{pass:?}");
    assert!(
        !e.sim.users().iter().any(|u| u.uuid == uuid),
        "applied on the node"
    );
    assert_eq!(open_intents(&e.pool).await, 1);
    e.sim.set_fault(Operation::RemoveUser, Fault::None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.applied, 1, "absent counts as done: {pass:?}");
    assert_eq!(open_intents(&e.pool).await, 0);
}

/// A removal whose subscription is live again is never applied.
#[sqlx::test(migrations = false)]
async fn removal_of_a_live_subscription_is_skipped(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let uuid = Uuid::new_v4();
    e.sim.insert_user(NodeUser::owned(uuid));
    intent(&e.pool, NodeOp::Remove, uuid).await;
    live_subscription(&e.pool, uuid).await;
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.skipped_live, 1, "{pass:?}");
    assert!(
        e.sim.users().iter().any(|u| u.uuid == uuid),
        "live key kept on the node"
    );
    assert_eq!(open_intents(&e.pool).await, 0);
}

/// A newer intent for the same UUID replaces the older one: remove then add leaves one add.
#[sqlx::test(migrations = false)]
async fn newer_intent_replaces_older(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let uuid = Uuid::new_v4();
    intent(&e.pool, NodeOp::Remove, uuid).await;
    intent(&e.pool, NodeOp::Add, uuid).await;
    assert_eq!(open_intents(&e.pool).await, 1);
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.applied, 1);
    assert!(e.sim.users().iter().any(|u| u.uuid == uuid && u.is_owned()));
}

/// Issue 12 item 7: an add that keeps failing because the node has the UUID under another
/// email is labelled with what the node said (`uuid_conflict`, not just `http_4xx`), in the
/// failure counter, in the stored intent and in the age gauge the stuck-intent alert reads.
#[sqlx::test(migrations = false)]
async fn failing_intent_carries_the_node_error_type(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let uuid = Uuid::new_v4();
    e.sim.insert_user(NodeUser {
        uuid,
        email: "someone-else@example".into(),
    });
    intent(&e.pool, NodeOp::Add, uuid).await;
    for _ in 0..2 {
        let pass = e.outbox.process_once().await.unwrap();
        assert_eq!(pass.failed, 1, "{pass:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = vpnbot::metrics::render(&e.registry);
    assert_eq!(
        helpers::metric(
            &text,
            "vpnbot_outbox_failures_total",
            &[("node", "a"), ("op", "add"), ("error", "uuid_conflict")]
        ),
        Some(2.0),
        "{text}"
    );
    let age = helpers::metric(
        &text,
        "vpnbot_outbox_pending_age_seconds",
        &[("node", "a"), ("op", "add"), ("error", "uuid_conflict")],
    )
    .expect("age series of the failing intent");
    assert!(age > 0.1, "{age}");
    let (ty, err): (String, String) = {
        let mut c = e.pool.acquire("test").await.unwrap();
        sqlx::query_as(
            "SELECT last_error_type, last_error FROM pending_node_ops WHERE done_at IS NULL",
        )
        .fetch_one(&mut *c)
        .await
        .unwrap()
    };
    assert_eq!(ty, "uuid_conflict");
    assert!(
        err.contains("409") && err.contains("another email"),
        "{err}"
    );

    // Once replaced by an intent that succeeds, the series is gone.
    intent(&e.pool, NodeOp::Remove, uuid).await;
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.applied, 1, "{pass:?}");
    let text = vpnbot::metrics::render(&e.registry);
    assert_eq!(
        helpers::metric(
            &text,
            "vpnbot_outbox_pending_age_seconds",
            &[("error", "uuid_conflict")]
        ),
        None
    );
}

/// Issue 19: two outbox workers (two instance ids) passing at once over the same 40 intents
/// claim disjoint sets (`FOR UPDATE SKIP LOCKED`): every intent applied by exactly one of them,
/// once, and the simulator (each mutation takes 30 ms) records no overlapping application.
#[sqlx::test(migrations = false)]
async fn two_workers_claim_disjoint_intents(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    e.sim.set_apply_delay(Duration::from_millis(30));
    for _ in 0..40 {
        intent(&e.pool, NodeOp::Add, Uuid::new_v4()).await;
    }
    let a = e.outbox.clone().with_instance_id("instance-a");
    let b = e.outbox.clone().with_instance_id("instance-b");
    let (pa, pb) = tokio::join!(a.process_once(), b.process_once());
    let (pa, pb) = (pa.unwrap(), pb.unwrap());
    assert_eq!(pa.applied + pb.applied, 40, "{pa:?} {pb:?}");
    assert_eq!(
        pa.due + pb.due,
        40,
        "no intent claimed twice: {pa:?} {pb:?}"
    );
    assert_eq!(open_intents(&e.pool).await, 0);
    assert_eq!(e.sim.user_count(), 40);
    assert_eq!(e.sim.mutations(), 40, "each intent applied once");
    assert_eq!(e.sim.overlapping_mutations(), 0);
    let mut c = e.pool.acquire("test").await.unwrap();
    let (attempts, claimed): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE attempts <> 1), count(*) FILTER (WHERE claimed_by IS NOT NULL) \
         FROM pending_node_ops",
    )
    .fetch_one(&mut *c)
    .await
    .unwrap();
    assert_eq!(
        (attempts, claimed),
        (0, 0),
        "applied once each; claims released"
    );
}

/// The simulator counts what the workers must avoid: the same UUID mutated while a mutation
/// of it is still being applied (so the assertion above can fail).
#[tokio::test]
async fn sim_counts_overlapping_mutations_of_one_uuid() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = SimNode::start(
        listener,
        SimNodeOptions {
            apply_delay: Duration::from_millis(100),
            ..Default::default()
        },
    );
    let registry = vpnbot::metrics::new_registry();
    let mut cfg = vpnbot::config::Config::default();
    cfg.nodes.insert(
        "a".into(),
        vpnbot::config::NodeConfig::new(&sim.base_url(), sim.api_key(), "a.example"),
    );
    let fleet = Fleet::from_config(&cfg, &registry).unwrap();
    let client = fleet.get("a").unwrap();
    let u = NodeUser::owned(Uuid::new_v4());
    let other = NodeUser::owned(Uuid::new_v4());
    let (r1, r2, r3) = tokio::join!(
        client.add_user(&u),
        client.remove_user(u.uuid),
        client.add_user(&other)
    );
    r1.unwrap();
    r2.unwrap();
    r3.unwrap();
    assert_eq!(sim.mutations(), 3);
    assert_eq!(
        sim.overlapping_mutations(),
        1,
        "same UUID at once; the other UUID is not"
    );
    let (code, body) = helpers::http_get(sim.addr(), "/_sim/stats").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["overlapping_mutations"], 1, "{body}");
}

/// An intent claimed by an instance that died (claim expired) is taken over and counted; one
/// claimed by a live instance (claim not expired) is left alone.
#[sqlx::test(migrations = false)]
async fn expired_claim_is_taken_over_live_claim_is_not(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let (dead, live) = (Uuid::new_v4(), Uuid::new_v4());
    intent(&e.pool, NodeOp::Add, dead).await;
    intent(&e.pool, NodeOp::Add, live).await;
    {
        let mut c = e.pool.acquire("test").await.unwrap();
        for (u, until) in [(dead, "-1 second"), (live, "1 minute")] {
            sqlx::query(
                "UPDATE pending_node_ops SET claimed_by = 'other', \
                 claimed_until = now() + $2::interval WHERE vless_uuid = $1",
            )
            .bind(u)
            .bind(until)
            .execute(&mut *c)
            .await
            .unwrap();
        }
    }
    let p = e.outbox.process_once().await.unwrap();
    assert_eq!((p.due, p.applied), (1, 1), "{p:?}");
    let users: Vec<Uuid> = e.sim.users().into_iter().map(|u| u.uuid).collect();
    assert_eq!(users, vec![dead]);
    let text = vpnbot::metrics::render(&e.registry);
    assert_eq!(
        helpers::metric(&text, "vpnbot_outbox_claim_takeovers_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        helpers::metric(&text, "vpnbot_outbox_claimed_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        open_intents(&e.pool).await,
        1,
        "the live claim's intent waits"
    );
}
