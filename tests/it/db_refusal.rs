//! Issue 11 item 5: a server that refuses connections while vpnbot runs (here a role limited to
//! 4 connections under the default pool of 15) is counted by kind, visible in `/readyz`, and the
//! pool backs off instead of making users wait the full acquire timeout.

use crate::helpers;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::app::App;
use vpnbot_sim::botapi::SimUser;

use helpers::http_get as get;

/// A login role limited to `limit` connections that owns the test database; returns its URL.
async fn limited_role(opts: &PgConnectOptions, limit: u32) -> String {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await
        .unwrap();
    let role = format!("vpnbot_lim_{}", std::process::id());
    let db = opts.get_database().unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN CONNECTION LIMIT {limit}; \
         ALTER DATABASE \"{db}\" OWNER TO {role}"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    let mut u = url::Url::parse(&helpers::url_for(opts)).unwrap();
    u.set_username(&role).unwrap();
    u.to_string()
}

#[sqlx::test(migrations = false)]
async fn burst_against_a_role_connection_limit_is_served_counted_and_unready(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = limited_role(&opts, 4).await;
    let (sim, node) = helpers::bot::start_sims().await;
    let mut cfg = helpers::bot::bot_config(&opts, &sim, &node);
    cfg.db.url = secrecy::SecretString::from(url);
    // The defaults of the report: pool of 15, acquire timeout 10 s.
    let defaults = vpnbot::config::DbConfig::default();
    cfg.db.max_connections = defaults.max_connections;
    cfg.db.min_connections = defaults.min_connections;
    cfg.db.acquire_timeout_seconds = defaults.acquire_timeout_seconds;
    let app = App::start(cfg).await.unwrap();
    let leader = app.leader.clone();
    assert!(
        helpers::eventually(Duration::from_secs(5), || leader.is_leader())
            .await
            .is_some(),
        "instance leads (the bot polls only on the leader)"
    );

    // /readyz polled through the burst.
    let addr = app.obs_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut unready = None;
            while !stop.load(Ordering::SeqCst) {
                let (code, body) = get(addr, "/readyz").await;
                if code == 503 && body.contains("53300") && unready.is_none() {
                    unready = Some(body);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            unready
        })
    };

    let users: Vec<SimUser> = (0..12).map(|i| SimUser::new(7100 + i, "en")).collect();
    let t0 = Instant::now();
    for u in &users {
        sim.send_text(u, "/trial");
    }
    let sim = &sim;
    let waits = futures_util::future::join_all(users.iter().map(|u| async move {
        let got = sim
            .wait_for(u.id, 0, Duration::from_secs(12), |m| {
                m.method == "sendPhoto" || m.text.to_lowercase().contains("error")
            })
            .await;
        (got, t0.elapsed())
    }))
    .await;
    stop.store(true, Ordering::SeqCst);
    let unready = poller.await.unwrap();

    let mut ok = 0;
    let mut slowest = Duration::ZERO;
    for (got, took) in &waits {
        slowest = slowest.max(*took);
        if got.as_ref().is_some_and(|m| m.method == "sendPhoto") {
            ok += 1;
        }
    }
    eprintln!("burst of 12 /trial: {ok} keys issued, slowest answer after {slowest:?}");
    let text = vpnbot::metrics::render(&app.registry);
    let refused = helpers::metric(
        &text,
        "vpnbot_db_connect_errors_total",
        &[("kind", "too_many_connections")],
    )
    .unwrap_or(0.0);
    eprintln!("vpnbot_db_connect_errors_total{{kind=\"too_many_connections\"}} = {refused}");
    assert!(refused >= 1.0, "53300 counted by kind: {text}");
    assert_eq!(ok, 12, "every user gets a key: {waits:#?}");
    assert!(
        slowest < Duration::from_secs(3),
        "no user waits for the acquire timeout: slowest {slowest:?}"
    );
    let body = unready.expect("/readyz said unready with the SQLSTATE during the burst");
    assert!(body.contains("too_many_connections"), "{body}");
    assert!(
        app.pool.connect_health().last().is_some(),
        "last refusal kept for /readyz"
    );
    app.shutdown().await;
}

/// With no connection to wait for, an acquire against a refusing server fails at once with the
/// cause instead of after the acquire timeout; once the server accepts again, the pool recovers
/// by itself.
#[sqlx::test(migrations = false)]
async fn refusing_server_fails_acquire_fast_and_the_pool_recovers(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    // Nothing listens: sqlx alone would retry the refused connect for the whole 10 s.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = helpers::test_config(&opts).db;
    cfg.url = secrecy::SecretString::from(format!("postgres://bot:pw@127.0.0.1:{port}/x"));
    cfg.acquire_timeout_seconds = Duration::from_secs(10);
    let registry = vpnbot::metrics::new_registry();
    let pool = vpnbot::db::DbPool::connect(&cfg, &registry).unwrap();
    let t = Instant::now();
    let err = pool.acquire("test_closed_port").await.unwrap_err();
    let took = t.elapsed();
    eprintln!("closed port: acquire failed after {took:?}: {err}");
    assert!(
        matches!(err, vpnbot::db::DbError::Refused { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let text = vpnbot::metrics::render(&registry);
    assert!(
        helpers::metric(
            &text,
            "vpnbot_db_connect_errors_total",
            &[("kind", "refused")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );

    // A role that may not log in (28000), then may again.
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await
        .unwrap();
    let role = format!("vpnbot_nologin_pool_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} NOLOGIN"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let mut u = url::Url::parse(&helpers::url_for(&opts)).unwrap();
    u.set_username(&role).unwrap();
    let mut cfg = helpers::test_config(&opts).db;
    cfg.url = secrecy::SecretString::from(u.to_string());
    cfg.acquire_timeout_seconds = Duration::from_secs(10);
    let registry = vpnbot::metrics::new_registry();
    let pool = vpnbot::db::DbPool::connect(&cfg, &registry).unwrap();
    let t = Instant::now();
    let err = pool.acquire("test_nologin").await.unwrap_err();
    eprintln!("28000: acquire failed after {:?}: {err}", t.elapsed());
    assert!(err.to_string().contains("SQLSTATE 28000"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(pool
        .connect_health()
        .status(Duration::from_secs(5))
        .is_err());

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER ROLE {role} LOGIN")))
        .execute(&admin)
        .await
        .unwrap();
    let t = Instant::now();
    let mut recovered = None;
    while t.elapsed() < Duration::from_secs(10) {
        if pool.acquire("test_nologin").await.is_ok() {
            recovered = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("recovered after {recovered:?}");
    assert!(recovered.is_some(), "pool recovers once the server accepts");
    assert!(!pool.connect_health().refusing());
    pool.close().await;
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
        .execute(&admin)
        .await;
}
