//! The metric contract against a running vpnbot (issue 7, FAULTS.md O2): after real work
//! (bot conversations and a payment through the Bot API stand-in, reconcile passes, a node
//! failing, an exhausted pool, a blocked worker), every family that dashboards/ and alerts/ use
//! (dashboards/metrics.txt) is exported, every family has HELP text, and no label value carries
//! a user id, UUID, URL or secret.

use crate::helpers;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::app::App;
use vpnbot::node::Operation;
use vpnbot::reconcile::RunOptions;
use vpnbot_sim::botapi::SimUser;
use vpnbot_sim::node::Fault;

#[sqlx::test(migrations = false)]
async fn running_instance_exports_every_family_dashboards_and_alerts_use(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let (telegram, node) = helpers::bot::start_sims().await;
    let mut cfg = helpers::bot::bot_config(&opts, &telegram, &node);
    cfg.diagnostics.stall_threshold_seconds = Duration::from_millis(300);
    cfg.diagnostics.pool_starved_seconds = Duration::from_millis(300);
    cfg.diagnostics.dump_dir =
        std::env::temp_dir().join(format!("vpnbot-contract-{}", std::process::id()));
    cfg.db.acquire_timeout_seconds = Duration::from_millis(500);
    cfg.node_client.retry_max_attempts = 2;
    cfg.leader.takeover_delay_seconds = Duration::from_millis(800);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.observability.otlp_endpoint = format!("http://127.0.0.1:{port}/v1/traces").into();
    let app = App::start(cfg.clone()).await.unwrap();
    // OTLP export families (collector down: drops and failures are counted).
    let (_layer, otel) = vpnbot::otel::otel_layer(&cfg.observability, &app.registry).unwrap();
    assert!(
        helpers::eventually(Duration::from_secs(10), || app.leader.is_leader())
            .await
            .is_some()
    );

    // Bot traffic: start, trial (a key), status, a Stars payment, an unknown command.
    let u = SimUser::new(4242_0001, "en");
    for text in ["/start", "/trial", "/status", "/nonsense"] {
        let from = telegram.sent_to(u.id).len();
        telegram.send_text(&u, text);
        telegram
            .wait_for(u.id, from, Duration::from_secs(10), |_| true)
            .await;
    }
    let q = telegram.pre_checkout(&u, "v1:month", "XTR", 100);
    telegram.wait_answer(&q, Duration::from_secs(10)).await;
    let from = telegram.sent_to(u.id).len();
    telegram.successful_payment(&u, "v1:month", "XTR", 100, "contract-charge");
    telegram
        .wait_for(u.id, from, Duration::from_secs(10), |m| {
            m.method == "sendPhoto"
        })
        .await;

    // Reconcile: one good pass, one with the node failing (retries, breaker, failed outcome).
    app.reconciler
        .reconcile_once(&RunOptions::default())
        .await
        .unwrap();
    node.set_fault(Operation::ListUsers, Fault::Status(503));
    app.reconciler
        .reconcile_once(&RunOptions::default())
        .await
        .unwrap();
    node.set_fault(Operation::ListUsers, Fault::None);

    // An exhausted pool: a waiter times out, the watchdog sees pool_starved.
    let mut held = Vec::new();
    for _ in 0..app.config.db.max_connections {
        held.push(app.pool.acquire("contract_hog").await.unwrap());
    }
    let _ = app.pool.acquire("contract_victim").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(held);

    // A blocked worker: an episode opens and closes (stall metrics, episode info, dump).
    // The watchdog thread reads the registry while the worker is blocked; so do we, from a
    // plain thread, as Prometheus would through the observability server.
    let registry = app.registry.clone();
    let during = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        vpnbot::metrics::render(&registry)
    });
    app.tasks.spawn_named("contract_block", async {
        std::thread::sleep(Duration::from_millis(1200));
    });
    let during = tokio::task::spawn_blocking(move || during.join().unwrap())
        .await
        .unwrap();
    // The test runtime has no poll hooks, so the kind is runtime_stalled (the heartbeat
    // stops); the hooked runtime's blocked_worker culprit labels are tested in
    // tests/diagnostics_stalls.rs.
    assert!(
        during.contains("vpnbot_watchdog_episode_info{")
            && during.contains("vpnbot_runtime_stalled 1"),
        "episode info is exported while the stall lasts:\n{}",
        during
            .lines()
            .filter(|l| l.contains("watchdog") || l.contains("stalled"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    otel.force_flush().ok();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let text = vpnbot::metrics::render(&app.registry);
    let known = helpers::ops::KnownMetrics::load();
    // Series of open episodes exist only while they are open (checked above, mid-stall).
    let missing: Vec<String> = helpers::ops::missing_families(&text, &known)
        .into_iter()
        // Likewise the outbox's series by error, only while failures or waiting operations
        // exist (tests/outbox.rs checks them), and families whose label values come from
        // events this short run does not cause (a cancelled statement, an applied outbox
        // operation, an expiry or reminder, a guard trip; their own tests check them).
        .filter(|f| {
            ![
                "vpnbot_watchdog_episode_info",
                "vpnbot_outbox_failures_total",
                "vpnbot_outbox_pending_age_seconds",
                "vpnbot_db_statements_cancelled_total",
                "vpnbot_outbox_ops_total",
                "vpnbot_expiry_subscriptions_expired_total",
                "vpnbot_expiry_reminders_total",
                "vpnbot_reconcile_guard_trips_total",
            ]
            .contains(&f.as_str())
        })
        .collect();
    let problems = helpers::ops::exposition_problems(&text);
    assert!(
        problems.is_empty(),
        "exposition problems:\n{}",
        problems.join("\n")
    );
    // Label values only: a sample value could contain the digits by chance.
    let leaked: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some(&l[l.find('{')?..=l.rfind('}')?]))
        .filter(|labels| labels.contains("42420001") || labels.contains("contract-charge"))
        .collect();
    assert!(
        leaked.is_empty(),
        "a user id or charge id reached a label: {leaked:?}"
    );
    assert!(
        missing.is_empty(),
        "families used by dashboards/alerts but not exported after work:\n{}",
        missing.join("\n")
    );
    // And every exported family is in the catalogue (nothing undocumented).
    let unlisted: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| !known.families.contains_key(*name))
        .collect();
    assert!(
        unlisted.is_empty(),
        "exported but not in dashboards/metrics.txt:\n{}",
        unlisted.join("\n")
    );
    drop(otel);
    app.shutdown().await;
}
