//! The database side of a stall against real PostgreSQL: lock waits bounded by `lock_timeout`
//! and counted by label, statements cancelled by the server counted by label and reason.

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
    c.execute("BEGIN").await.unwrap();
    c.execute("LOCK TABLE subscriptions IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
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
}
