//! The instrumented pool against real PostgreSQL: labels, timeouts, holders and waiters,
//! cancellation inside transactions, discarding connections from a read-only server.

use crate::helpers;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::db::inflight::PoolUse;
use vpnbot::db::{DbError, DbPool};

fn pool(opts: &PgConnectOptions, max: u32, acquire_timeout: f64) -> (DbPool, prometheus::Registry) {
    let mut cfg = helpers::test_config(opts).db;
    cfg.max_connections = max;
    cfg.acquire_timeout_seconds = Duration::from_secs_f64(acquire_timeout);
    let registry = vpnbot::metrics::new_registry();
    (DbPool::connect(&cfg, &registry).unwrap(), registry)
}

#[sqlx::test(migrations = false)]
async fn acquire_is_timed_per_label_and_holders_are_visible(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let (pool, registry) = pool(&opts, 2, 2.0);
    let held = pool.acquire("test_holder").await.unwrap();
    let snap = pool.inflight().snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].label, "test_holder");
    assert_eq!(snap[0].state, PoolUse::Holding);
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    assert!(
        pool.inflight().snapshot().is_empty(),
        "released holder leaves the registry"
    );

    let text = vpnbot::metrics::render(&registry);
    let count = helpers::metric(
        &text,
        "vpnbot_db_pool_hold_seconds_count",
        &[("label", "test_holder")],
    );
    assert_eq!(count, Some(1.0), "{text}");
    let sum = helpers::metric(
        &text,
        "vpnbot_db_pool_hold_seconds_sum",
        &[("label", "test_holder")],
    )
    .unwrap();
    assert!(sum >= 0.05, "hold time recorded: {sum}");
    assert_eq!(
        helpers::metric(
            &text,
            "vpnbot_db_pool_acquire_wait_seconds_count",
            &[("label", "test_holder")]
        ),
        Some(1.0)
    );
    assert_eq!(
        helpers::metric(&text, "vpnbot_db_pool_max_connections", &[]),
        Some(2.0)
    );
    // The connection returns to the pool asynchronously (sqlx pings it on release).
    let idle = helpers::eventually(Duration::from_secs(3), || {
        let t = vpnbot::metrics::render(&registry);
        helpers::metric(&t, "vpnbot_db_pool_connections", &[("state", "idle")]) == Some(1.0)
    })
    .await;
    assert!(idle.is_some(), "{text}");
}

/// FAULTS.md D1: every connection held; waiters show by label; the acquire fails with a typed
/// timeout naming the label, within the bound, and the counter moves.
#[sqlx::test(migrations = false)]
async fn exhausted_pool_times_out_naming_the_label(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (pool, registry) = pool(&opts, 2, 0.5);
    let _a = pool.acquire("leak_a").await.unwrap();
    let _b = pool.acquire("leak_b").await.unwrap();

    let p2 = pool.clone();
    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        (p2.acquire("starved_call").await.map(|_| ()), t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let snap = pool.inflight().snapshot();
    assert!(
        snap.iter()
            .any(|e| e.label == "starved_call" && e.state == PoolUse::Waiting),
        "{snap:?}"
    );
    let text = vpnbot::metrics::render(&registry);
    assert_eq!(
        helpers::metric(&text, "vpnbot_db_pool_pending_acquires", &[]),
        Some(1.0)
    );

    let (res, elapsed) = waiter.await.unwrap();
    match res {
        Err(DbError::AcquireTimeout { label, .. }) => assert_eq!(label, "starved_call"),
        other => panic!("expected AcquireTimeout, got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let text = vpnbot::metrics::render(&registry);
    assert_eq!(
        helpers::metric(
            &text,
            "vpnbot_db_pool_acquire_timeouts_total",
            &[("label", "starved_call")]
        ),
        Some(1.0)
    );
    assert_eq!(
        helpers::metric(&text, "vpnbot_db_pool_pending_acquires", &[]),
        Some(0.0)
    );
    assert!(
        !pool
            .inflight()
            .snapshot()
            .iter()
            .any(|e| e.label == "starved_call"),
        "timed-out waiter removed"
    );
    let e = DbError::AcquireTimeout {
        label: "starved_call",
        waited: elapsed,
    };
    assert!(e.to_string().contains("starved_call"));
}

/// A caller cancelled while waiting leaves no waiter and no pending count behind.
#[sqlx::test(migrations = false)]
async fn cancelled_waiter_leaves_nothing_behind(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (pool, registry) = pool(&opts, 1, 5.0);
    let _held = pool.acquire("holder").await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(100), pool.acquire("impatient")).await;
    assert!(r.is_err());
    assert_eq!(pool.inflight().snapshot().len(), 1);
    let text = vpnbot::metrics::render(&registry);
    assert_eq!(
        helpers::metric(&text, "vpnbot_db_pool_pending_acquires", &[]),
        Some(0.0)
    );
}

async fn idle_in_transaction(admin: &sqlx::PgPool, app: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
         AND state LIKE 'idle in transaction%'",
    )
    .bind(app)
    .fetch_one(admin)
    .await
    .unwrap()
}

/// FAULTS.md D6: a task cancelled inside a transaction or during BEGIN never returns its
/// connection to the pool inside the transaction; no backend stays `idle in transaction`.
#[sqlx::test(migrations = false)]
async fn cancelled_transaction_never_returns_to_the_pool(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let (pool, _r) = pool(&opts, 2, 2.0);
    let app_name = "vpnbot-d6";
    let mut cfg = helpers::test_config(&opts).db;
    cfg.application_name = app_name.into();
    cfg.max_connections = 2;
    let registry = vpnbot::metrics::new_registry();
    let pool2 = DbPool::connect(&cfg, &registry).unwrap();
    drop(pool);
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&helpers::url_for(&opts))
        .await
        .unwrap();

    // 1. Cancelled inside an open transaction, while a statement runs.
    let p = pool2.clone();
    let task = tokio::spawn(async move {
        let mut conn = p.acquire("d6_inside").await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        // The server finishes this statement on its own (bounded by statement_timeout);
        // what matters is that the connection never serves anyone again.
        sqlx::query("SELECT pg_sleep(1)")
            .execute(&mut *tx)
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    task.abort();
    let _ = task.await;

    // 2. Cancelled right after BEGIN was sent (the transaction is open, the task is gone).
    let p = pool2.clone();
    let task = tokio::spawn(async move {
        let mut conn = p.acquire("d6_begin").await.unwrap();
        let _tx = conn.begin().await.unwrap();
        std::future::pending::<()>().await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        idle_in_transaction(&admin, app_name).await,
        1,
        "precondition: tx open"
    );
    task.abort();
    let _ = task.await;

    // 3. Dropped during BEGIN itself.
    for _ in 0..20 {
        let mut conn = pool2.acquire("d6_during_begin").await.unwrap();
        let _ = tokio::time::timeout(Duration::from_micros(50), conn.begin()).await;
    }

    let mut n = 1;
    for _ in 0..50 {
        n = idle_in_transaction(&admin, app_name).await;
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(n, 0, "no backend left idle in transaction");

    // And every connection the pool hands out now is outside a transaction.
    for _ in 0..4 {
        let mut conn = pool2.acquire("d6_after").await.unwrap();
        // SAVEPOINT succeeds only inside a transaction block.
        let in_tx = sqlx::query("SAVEPOINT probe")
            .execute(&mut *conn)
            .await
            .is_ok();
        assert!(!in_tx, "pooled connection is inside a transaction");
    }
    pool2.close().await;
    for _ in 0..50 {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(app_name)
                .fetch_one(&admin)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A committed transaction's connection goes back to the pool and is reused.
#[sqlx::test(migrations = false)]
async fn committed_transaction_is_reused(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (pool, _r) = pool(&opts, 1, 2.0);
    let pid1: i32 = {
        let mut conn = pool.acquire("tx").await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        pid
    };
    let mut conn = pool.acquire("tx").await.unwrap();
    let pid2: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(pid1, pid2);
}

/// A connection whose server turned read-only (failover to a standby) is discarded, not
/// recycled, and the error is typed.
#[sqlx::test(migrations = false)]
async fn read_only_error_discards_the_connection(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (pool, registry) = pool(&opts, 1, 2.0);
    let pid1: i32 = {
        let mut conn = pool.acquire("ro").await.unwrap();
        sqlx::query("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            .execute(&mut *conn)
            .await
            .unwrap();
        let res = sqlx::query("CREATE TABLE t (x int)")
            .execute(&mut *conn)
            .await;
        let err = conn.check(res).unwrap_err();
        assert!(matches!(err, DbError::ReadOnly(_)), "{err:?}");
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
    };
    let mut conn = pool.acquire("ro").await.unwrap();
    let pid2: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_ne!(pid1, pid2, "the read-only connection was discarded");
    let text = vpnbot::metrics::render(&registry);
    assert_eq!(
        helpers::metric(&text, "vpnbot_db_errors_total", &[("kind", "read_only")]),
        Some(1.0)
    );
}

/// FAULTS.md D2: the server cancels a statement past statement_timeout; the error is typed.
#[sqlx::test(migrations = false)]
async fn statement_timeout_is_a_typed_error(_p: PgPoolOptions, opts: PgConnectOptions) {
    let mut cfg = helpers::test_config(&opts).db;
    cfg.statement_timeout_seconds = Duration::from_millis(200);
    let registry = vpnbot::metrics::new_registry();
    let pool = DbPool::connect(&cfg, &registry).unwrap();
    let mut conn = pool.acquire("slow_query").await.unwrap();
    let t = Instant::now();
    let res = sqlx::query("SELECT pg_sleep(5)").execute(&mut *conn).await;
    let err = conn.check(res).unwrap_err();
    assert!(matches!(err, DbError::StatementTimeout(_)), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// FAULTS.md D4: the server kills every backend (as in a restart); the pool recovers without a
/// process restart.
#[sqlx::test(migrations = false)]
async fn pool_recovers_after_backends_are_killed(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (pool, _r) = pool(&opts, 2, 3.0);
    for _ in 0..2 {
        let mut c = pool.acquire("warm").await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *c).await.unwrap();
    }
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&helpers::url_for(&opts))
        .await
        .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&admin)
    .await
    .unwrap();
    let mut c = pool.acquire("after_restart").await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    assert_eq!(one, 1);
}

/// Counts span enters on the thread it is the default subscriber of.
struct CountEnters(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountEnters {
    fn on_enter(&self, _: &tracing::span::Id, _: tracing_subscriber::layer::Context<'_, S>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// sqlx enters the caller's span once per row and stream layer; a `BulkRead` statement does
/// not, and returns the same rows (issue 16: a million-row snapshot spent a fifth of the
/// workers' CPU on it).
#[sqlx::test(migrations = false)]
async fn bulk_reads_do_not_enter_the_callers_span_per_row(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;
    let enters = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // sqlx::test runs on one thread, so a thread-default subscriber sees every poll.
    let _default = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(CountEnters(enters.clone())),
    );
    let (pool, _registry) = pool(&opts, 1, 5.0);
    let mut conn = pool.acquire("test_bulk").await.unwrap();
    let sql = "SELECT g FROM generate_series(1, 5000) g";
    let span = tracing::info_span!("caller");

    let plain: Vec<(i32,)> = sqlx::query_as(sql)
        .fetch_all(&mut *conn)
        .instrument(span.clone())
        .await
        .unwrap();
    let plain_enters = enters.swap(0, std::sync::atomic::Ordering::Relaxed);
    let bulk: Vec<(i32,)> =
        vpnbot::db::bulk_read::BulkRead::new(sqlx::query_as(sql).fetch_all(&mut *conn))
            .instrument(span.clone())
            .await
            .unwrap();
    let bulk_enters = enters.load(std::sync::atomic::Ordering::Relaxed);

    assert_eq!(plain.len(), 5000);
    assert_eq!(plain, bulk);
    // The cost being removed exists (else this test proves nothing)...
    assert!(
        plain_enters >= 5000,
        "plain fetch_all entered the span {plain_enters} times for 5000 rows"
    );
    // ...and is gone: only the caller's own `.instrument` enters, once per poll.
    assert!(
        bulk_enters < 50,
        "BulkRead entered the span {bulk_enters} times for 5000 rows"
    );
}
