//! A whole instance against real PostgreSQL: start-up, /healthz, /readyz, /metrics, leadership
//! hand-over (FAULTS.md D3), migrations, an unreachable database, and an observability server
//! that answers while every runtime worker is blocked.

use crate::helpers;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::app::{App, StartError};
use vpnbot::db::DbError;

use helpers::http_get as get;

#[sqlx::test(migrations = false)]
async fn instance_starts_migrates_and_reports_ready(_p: PgPoolOptions, opts: PgConnectOptions) {
    let app = App::start(helpers::test_config(&opts)).await.unwrap();
    let addr = app.obs_addr();
    assert!(addr.ip().is_loopback());
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    let mut last = (0, String::new());
    for _ in 0..50 {
        last = get(addr, "/readyz").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, 200, "{}", last.1);
    let v: serde_json::Value = serde_json::from_str(&last.1).unwrap();
    assert_eq!(v["db"], "writable");

    // Every table of the schema exists.
    let mut conn = app.pool.acquire("test").await.unwrap();
    for t in [
        "bot_users",
        "subscriptions",
        "payments",
        "pending_node_ops",
        "reconcile_runs",
    ] {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = $1",
        )
        .bind(t)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(n, 1, "table {t}");
    }
    drop(conn);

    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(text.contains("vpnbot_build_info{version="), "{text}");
    // Every family carries HELP text.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
    }
    app.shutdown().await;
}

/// `/readyz` checks writability, not just `SELECT 1`: a database that turned read-only makes
/// the instance unready with the reason.
#[sqlx::test(migrations = false)]
async fn read_only_database_makes_readyz_fail(_p: PgPoolOptions, opts: PgConnectOptions) {
    let app = App::start(helpers::test_config(&opts)).await.unwrap();
    let addr = app.obs_addr();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&helpers::url_for(&opts))
        .await
        .unwrap();
    let db = opts.get_database().unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{db}\" SET default_transaction_read_only = on"
    )))
    .execute(&admin)
    .await
    .unwrap();
    // Existing sessions keep their settings: end them so the pool reconnects read-only.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
         AND application_name = 'vpnbot'",
    )
    .execute(&admin)
    .await
    .unwrap();
    let mut last = (0, String::new());
    for _ in 0..60 {
        last = get(addr, "/readyz").await;
        if last.0 == 503 && last.1.contains("read-only") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, 503, "{}", last.1);
    assert!(last.1.contains("read-only"), "{}", last.1);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{db}\" SET default_transaction_read_only = off"
    )))
    .execute(&admin)
    .await
    .unwrap();
    app.shutdown().await;
}

/// FAULTS.md D3 and the leadership contract: two instances on one database; kill the leader's
/// lock connection; the leader stops its singleton worker, the other takes over, and the two
/// never run the worker at the same time.
#[sqlx::test(migrations = false)]
async fn leadership_moves_when_the_lock_connection_dies(_p: PgPoolOptions, opts: PgConnectOptions) {
    let running = Arc::new(AtomicUsize::new(0));
    let overlap = Arc::new(AtomicBool::new(false));
    let worker = |running: Arc<AtomicUsize>, overlap: Arc<AtomicBool>| {
        move |token: tokio_util::sync::CancellationToken| {
            let running = running.clone();
            let overlap = overlap.clone();
            async move {
                if running.fetch_add(1, Ordering::SeqCst) > 0 {
                    overlap.store(true, Ordering::SeqCst);
                }
                token.cancelled().await;
                running.fetch_sub(1, Ordering::SeqCst);
            }
        }
    };
    let a = App::start(helpers::test_config(&opts)).await.unwrap();
    a.leader.run_while_leader(
        &a.tasks,
        "test_singleton",
        Duration::from_secs(2),
        worker(running.clone(), overlap.clone()),
    );
    assert!(
        helpers::eventually(Duration::from_secs(10), || a.leader.is_leader())
            .await
            .is_some()
    );
    let b = App::start(helpers::test_config(&opts)).await.unwrap();
    b.leader.run_while_leader(
        &b.tasks,
        "test_singleton",
        Duration::from_secs(2),
        worker(running.clone(), overlap.clone()),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.leader.is_leader() && !b.leader.is_leader());
    assert_eq!(running.load(Ordering::SeqCst), 1);

    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&helpers::url_for(&opts))
        .await
        .unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND database = \
         (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    let t = Instant::now();
    let lost = helpers::eventually(Duration::from_secs(5), || !a.leader.is_leader()).await;
    assert!(lost.is_some(), "leader noticed the loss");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "loss detected within seconds: {:?}",
        t.elapsed()
    );
    let took = helpers::eventually(Duration::from_secs(15), || {
        b.leader.is_leader() || a.leader.is_leader()
    })
    .await;
    assert!(took.is_some(), "someone leads again");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        running.load(Ordering::SeqCst),
        1,
        "exactly one singleton worker runs"
    );
    assert!(
        !overlap.load(Ordering::SeqCst),
        "the two instances never overlapped"
    );

    let text = vpnbot::metrics::render(&a.registry);
    assert!(helpers::metric(&text, "vpnbot_leader_transitions_total", &[]).unwrap() >= 2.0);
    a.shutdown().await;
    b.shutdown().await;
}

/// An unreachable database is a typed, quick start-up error whose message holds no password.
#[tokio::test]
async fn unreachable_database_fails_start_with_a_typed_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = vpnbot::config::Config::default();
    cfg.db.url =
        secrecy::SecretString::from(format!("postgres://bot:pw-s3cret@127.0.0.1:{port}/x"));
    cfg.observability.listen = "127.0.0.1:0".parse().unwrap();
    let t = Instant::now();
    let err = App::start(cfg).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
    assert!(
        matches!(err, StartError::Db(DbError::Unavailable(_))),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), 69);
    assert!(!format!("{err} {err:?}").contains("s3cret"));
}

/// A migration that was modified after being applied is refused with a typed error.
#[sqlx::test(migrations = false)]
async fn modified_migration_is_refused(_p: PgPoolOptions, opts: PgConnectOptions) {
    let app = App::start(helpers::test_config(&opts)).await.unwrap();
    {
        let mut c = app.pool.acquire("test").await.unwrap();
        sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00'::bytea")
            .execute(&mut *c)
            .await
            .unwrap();
    }
    let err = vpnbot::db::migrate(&app.pool).await.unwrap_err();
    assert!(matches!(err, DbError::Migrate(_)), "{err:?}");
    app.shutdown().await;
}

/// FAULTS.md R2 (the observability half): every main-runtime worker blocked in sync code, and
/// `/metrics` and `/healthz` still answer from the observability thread.
#[test]
fn observability_server_answers_while_every_worker_is_blocked() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (app, addr) = rt.block_on(async {
        let url = helpers::fresh_database("r2").await;
        let opts: PgConnectOptions = url.parse().unwrap();
        let app = App::start(helpers::test_config(&opts)).await.unwrap();
        let addr = app.obs_addr();
        (app, addr)
    });
    // Block both workers for 2 s.
    for _ in 0..2 {
        rt.spawn(async { std::thread::sleep(Duration::from_secs(2)) });
    }
    std::thread::sleep(Duration::from_millis(200));
    let probe = std::thread::spawn(move || {
        let client = std::net::TcpStream::connect(addr).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        use std::io::{Read, Write};
        let mut s = client;
        let t = Instant::now();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        (t.elapsed(), buf)
    });
    let (elapsed, body) = probe.join().unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("vpnbot_db_pool_connections"));
    assert!(
        elapsed < Duration::from_millis(900),
        "answered in {elapsed:?} while workers were blocked"
    );
    rt.block_on(app.shutdown());
}

/// A critical task that ends while the instance should run (here one that panics, as a
/// leadership task losing an invariant would) shuts the instance down, and `run_until` names
/// it: `vpnbot run` turns that into exit code `EXIT_CRITICAL_TASK` with the task's name on
/// stderr (src/cli.rs).
#[sqlx::test(migrations = false)]
async fn a_critical_task_ending_shuts_the_instance_down_naming_it(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let app = App::start(helpers::test_config(&opts)).await.unwrap();
    for family in vpnbot::app::CRITICAL_TASKS {
        assert!(app.tasks.is_critical(family), "{family} is not critical");
    }
    let addr = app.obs_addr();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    app.tasks.spawn_critical("test_critical", async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        panic!("invariant lost");
    });
    let signal = vpnbot::signals::ShutdownSignal::install().unwrap();
    let t0 = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(30), app.run_until(signal))
        .await
        .expect("the instance shut down by itself")
        .unwrap_err();
    assert_eq!(exit.task, "test_critical");
    assert_eq!(exit.how, "panicked: invariant lost");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    // Shut down for real: the observability server is gone.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
