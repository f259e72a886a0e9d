//! The database side of a stall against real PostgreSQL: lock waits bounded by `lock_timeout`
//! and counted by label, statements cancelled by the server counted by label and reason.

mod bot_common;
mod common;

use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};
use vpnbot::db::{DbError, DbPool};

async fn admin(opts: &PgConnectOptions) -> PgConnection {
    PgConnection::connect(&common::url_for(opts)).await.unwrap()
}

/// A session (application_name `psql`) that holds `LOCK TABLE subscriptions IN ACCESS
/// EXCLUSIVE MODE` in an open transaction until dropped.
async fn lock_holder(opts: &PgConnectOptions) -> (PgConnection, i32) {
    let mut c = PgConnection::connect_with(&opts.clone().application_name("psql"))
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await
        .unwrap();
    c.execute("BEGIN").await.unwrap();
    c.execute("LOCK TABLE subscriptions IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    (c, pid)
}

async fn create_table(opts: &PgConnectOptions) {
    let mut a = admin(opts).await;
    a.execute("CREATE TABLE IF NOT EXISTS subscriptions (id int)")
        .await
        .unwrap();
}

/// Issue 15: a lock wait ends at `lock_timeout` (well before the statement timeout) as a typed
/// lock error, counted under the call-site label; a statement timeout is counted by label too.
#[sqlx::test(migrations = false)]
async fn lock_wait_ends_at_lock_timeout_counted_by_label(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    create_table(&opts).await;
    let mut cfg = common::test_config(&opts).db;
    cfg.lock_timeout_seconds = 0.3;
    cfg.statement_timeout_seconds = 5.0;
    let registry = vpnbot::metrics::new_registry();
    let pool = DbPool::connect(&cfg, &registry).unwrap();
    let (holder, _pid) = lock_holder(&opts).await;

    let mut conn = pool.acquire("test_locked_read").await.unwrap();
    let t = Instant::now();
    let res = sqlx::query("SELECT count(*) FROM subscriptions")
        .execute(&mut *conn)
        .await;
    let err = conn.check(res).unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(err, DbError::LockTimeout(_)), "{err:?}");
    assert_eq!(err.kind(), "lock_timeout");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "ended at the lock timeout, not the statement timeout: {waited:?}"
    );

    drop(conn);
    let mut conn = pool.acquire("test_slow").await.unwrap();
    sqlx::query("SET statement_timeout = 100")
        .execute(&mut *conn)
        .await
        .unwrap();
    let res = sqlx::query("SELECT pg_sleep(2)").execute(&mut *conn).await;
    let err = conn.check(res).unwrap_err();
    assert_eq!(err.cancel_reason(), Some("statement_timeout"), "{err:?}");
    drop(conn);
    drop(holder);

    let text = vpnbot::metrics::render(&registry);
    let count = |label: &str, reason: &str| {
        common::metric(
            &text,
            "vpnbot_db_statements_cancelled_total",
            &[("label", label), ("reason", reason)],
        )
    };
    assert_eq!(
        count("test_locked_read", "lock_timeout"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(count("test_slow", "statement_timeout"), Some(1.0), "{text}");
    assert_eq!(
        common::metric(&text, "vpnbot_db_errors_total", &[("kind", "lock_timeout")]),
        Some(1.0)
    );
    // Per-label statement durations (not only pool holds).
    let stmt = |suffix: &str, label: &str| {
        common::metric(
            &text,
            &format!("vpnbot_db_statement_duration_seconds_{suffix}"),
            &[("label", label)],
        )
    };
    assert_eq!(stmt("count", "test_locked_read"), Some(1.0), "{text}");
    assert!(stmt("sum", "test_locked_read").is_some_and(|s| s >= 0.25));
    assert!(stmt("sum", "test_slow").is_some_and(|s| s >= 0.09));
}

/// Steady `/status` traffic through the Bot API stand-in until `stop`: `users` users, one
/// update every `every` in turn.
fn bot_load(
    sim: std::sync::Arc<vpnbot::sim::botapi::BotApiSimHandle>,
    users: i64,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0;
        while !stop.is_cancelled() {
            let u = vpnbot::sim::botapi::SimUser::new(15_000 + i % users, "en");
            sim.send_text(&u, "/status");
            i += 1;
            tokio::time::sleep(every).await;
        }
    })
}

use common::http_get as get;

async fn own_lock_waiters(a: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'vpnbot' AND wait_event_type = 'Lock'",
    )
    .fetch_one(a)
    .await
    .unwrap()
}

/// Issue 15 proof (1): under steady bot traffic, another session holds `LOCK TABLE
/// subscriptions IN ACCESS EXCLUSIVE MODE`. Within 10 s a `db_lock_wait` episode opens whose
/// verdict names the lock, the relation, the blocker's pid and application name; the dump lists
/// the waiting backends joined with their holders. After the release the episode ends, no own
/// backend is left waiting, and the bot answers again.
#[sqlx::test(migrations = false)]
async fn lock_on_subscriptions_is_named_within_seconds_and_recovers(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let (telegram, node) = bot_common::start_sims().await;
    let mut cfg = bot_common::bot_config(&opts, &telegram, &node);
    cfg.diagnostics.dump_dir =
        std::env::temp_dir().join(format!("vpnbot-dbstall-{}", std::process::id()));
    cfg.bot.starved_after_seconds = std::time::Duration::from_secs_f64(2.0);
    let app = vpnbot::app::App::start(cfg).await.unwrap();
    let telegram = std::sync::Arc::new(telegram);
    let stop = tokio_util::sync::CancellationToken::new();
    let load = bot_load(
        telegram.clone(),
        20,
        Duration::from_millis(30),
        stop.clone(),
    );
    let t2 = telegram.clone();
    let answering = common::eventually(Duration::from_secs(15), || t2.sent().len() > 20).await;
    assert!(answering.is_some(), "the bot answers before the fault");

    let (holder, blocker_pid) = lock_holder(&opts).await;
    let t = Instant::now();
    let opened = common::eventually(Duration::from_secs(10), || {
        app.diagnostics
            .open_kinds()
            .contains(&vpnbot::diagnostics::StallKind::DbLockWait)
    })
    .await;
    assert!(opened.is_some(), "no db_lock_wait episode within 10 s");
    let detected = t.elapsed();
    let d = app.diagnostics.clone();
    let dump = tokio::task::spawn_blocking(move || d.dump_now())
        .await
        .unwrap();
    eprintln!("detected after {detected:?}: {}", dump.verdict);
    let v = &dump.verdict;
    assert!(v.starts_with("db_lock_wait: "), "{v}");
    assert!(
        v.contains("waiting on Lock (relation subscriptions)"),
        "{v}"
    );
    assert!(
        v.contains(&format!("held by pid {blocker_pid} 'psql'")),
        "{v}"
    );
    assert!(v.contains("idle in transaction"), "{v}");
    assert!(v.contains("LOCK TABLE subscriptions"), "{v}");
    let backends = dump
        .inflight
        .get("db_backends")
        .cloned()
        .unwrap_or_default();
    assert!(
        backends
            .iter()
            .any(|e| e.label.is_some() && e.detail.contains("waiting on Lock/relation")),
        "{backends:#?}"
    );
    let metrics = vpnbot::metrics::render(&app.registry);
    assert!(
        common::metric(
            &metrics,
            "vpnbot_db_backends",
            &[("wait_event_type", "Lock")]
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert!(
        common::metric(&metrics, "vpnbot_db_lock_wait_longest_seconds", &[])
            .is_some_and(|s| s >= 1.0)
    );

    // Service level: updates wait for a slot; the episode and /readyz name the lock.
    let starved = common::eventually(Duration::from_secs(10), || {
        app.diagnostics
            .open_kinds()
            .contains(&vpnbot::diagnostics::StallKind::ServiceStarved)
    })
    .await;
    assert!(starved.is_some(), "no service_starved episode within 10 s");
    let (code, body) = get(app.obs_addr(), "/readyz").await;
    eprintln!("/readyz {code}: {body}");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("service_starved: "), "{body}");
    assert!(body.contains("relation subscriptions"), "{body}");
    // The readiness check runs on the monitoring connection: it never waits for the pool.
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["db"], "writable", "{body}");
    assert!(
        v["db_check_seconds"].as_f64().is_some_and(|s| s < 1.0),
        "{body}"
    );
    let (code, _) = get(app.obs_addr(), "/healthz").await;
    assert_eq!(code, 200, "/healthz stays about the runtime");
    let metrics = vpnbot::metrics::render(&app.registry);
    assert!(
        metrics.contains("vpnbot_watchdog_episode_info{kind=\"service_starved\",label=\"bot_subscription\",node=\"\",operation=\"Lock\",phase=\"subscriptions\",task=\"bot_handler\"} 1"),
        "{}",
        metrics.lines().filter(|l| l.contains("episode_info")).collect::<Vec<_>>().join("\n")
    );

    holder.close().await.unwrap();
    let mut a = admin(&opts).await;
    let closed = common::eventually(Duration::from_secs(10), || {
        !app.diagnostics
            .open_kinds()
            .contains(&vpnbot::diagnostics::StallKind::DbLockWait)
    })
    .await;
    assert!(closed.is_some(), "the episode ends after the release");
    let ready = common::eventually(Duration::from_secs(10), || {
        app.diagnostics.degraded().is_none()
    })
    .await;
    assert!(ready.is_some(), "service_starved ends after the release");
    assert_eq!(own_lock_waiters(&mut a).await, 0, "no backend left waiting");
    let answered = telegram.sent().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        telegram.sent().len() > answered + 5,
        "the bot answers again after the release"
    );
    stop.cancel();
    load.await.unwrap();
    app.shutdown().await;
}

/// Issue 15 proof (3): a caller cut off mid-statement on a locked table (as a handler bound
/// does). The statement is cancelled on the server through the monitoring connection: its
/// backend no longer waits within 1 s, the cancel is counted under the label, and the pool
/// works on.
#[sqlx::test(migrations = false)]
async fn statement_of_a_cut_off_caller_stops_on_the_server_within_1s(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    create_table(&opts).await;
    let mut cfg = common::test_config(&opts).db;
    cfg.max_connections = 2;
    cfg.statement_timeout_seconds = 30.0;
    cfg.lock_timeout_seconds = 20.0;
    let registry = vpnbot::metrics::new_registry();
    let pool = DbPool::connect(&cfg, &registry).unwrap();
    let monitor = vpnbot::db::monitor::DbMonitor::new(&pool, &registry);
    let stop = tokio_util::sync::CancellationToken::new();
    let mon = tokio::spawn(monitor.clone().run(stop.clone()));
    let (holder, _blocker) = lock_holder(&opts).await;
    let mut a = admin(&opts).await;

    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let cut = tokio::time::timeout(Duration::from_millis(500), async {
        let mut conn = pool.acquire("test_cut_off").await.unwrap();
        let _ = pid_tx.send(conn.backend_pid());
        let res = sqlx::query("SELECT count(*) FROM subscriptions")
            .execute(&mut *conn)
            .await;
        conn.check(res).map(|_| ())
    })
    .await;
    assert!(cut.is_err(), "the caller was cut off mid-statement");
    let pid = pid_rx
        .await
        .unwrap()
        .expect("backend pid recorded at connect");
    let t = Instant::now();
    let mut last;
    loop {
        let state: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT state, wait_event_type FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_optional(&mut a)
                .await
                .unwrap();
        match state {
            None => break,
            Some((_, w)) if w.as_deref() != Some("Lock") => break,
            Some(s) => last = format!("{s:?}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "backend {pid} still waits 1 s after its caller was cut off: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = t.elapsed();
    eprintln!("backend {pid} stopped waiting {stopped:?} after the cut-off");
    let counted = common::eventually(Duration::from_secs(2), || {
        common::metric(
            &vpnbot::metrics::render(&registry),
            "vpnbot_db_statements_cancelled_total",
            &[("label", "test_cut_off"), ("reason", "cancel_request")],
        ) == Some(1.0)
    })
    .await;
    assert!(counted.is_some(), "the cancel is counted under the label");

    holder.close().await.unwrap();
    for _ in 0..3 {
        let mut c = pool.acquire("after").await.unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut *c)
            .await
            .unwrap();
        assert_eq!(one, 1);
        // Every used connection is accounted for.
        let text = vpnbot::metrics::render(&registry);
        let st = |state: &str| {
            common::metric(&text, "vpnbot_db_pool_connections", &[("state", state)]).unwrap()
        };
        assert_eq!(st("held"), 1.0, "{text}");
        assert_eq!(st("abandoned"), 0.0, "{text}");
        assert_eq!(
            st("used"),
            st("held") + st("abandoned") + st("in_transit"),
            "{text}"
        );
    }
    stop.cancel();
    mon.await.unwrap();
}
