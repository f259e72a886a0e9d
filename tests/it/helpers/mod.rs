//! Shared test helpers: configs pointing at the per-test database, app start-up on port 0.
#![allow(dead_code, unreachable_pub)]

pub mod bot;
pub mod ops;

use std::time::{Duration, Instant};

use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use vpnbot::config::Config;

/// The explicit opt-out for tests whose external tool or privilege is missing. Named outside
/// the configuration's `VPNBOT_` environment namespace on purpose.
pub const ALLOW_SKIP: &str = "ALLOW_SKIP_TESTS";

/// Reports a missing prerequisite: panics (the test fails) unless `ALLOW_SKIP_TESTS=1` is set,
/// in which case it prints `SKIPPED: {what}` and returns, and the caller returns early. A skipped
/// check must never look like a passing one without someone having asked for it.
pub fn missing(what: &str) {
    if std::env::var(ALLOW_SKIP).as_deref() == Ok("1") {
        eprintln!("SKIPPED: {what}; {ALLOW_SKIP}=1 is set");
        return;
    }
    panic!("{what}; set {ALLOW_SKIP}=1 to skip this test explicitly");
}

/// A `postgres://` URL for the database `#[sqlx::test]` created for this test.
pub fn url_for(opts: &PgConnectOptions) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by scripts/test.sh");
    let mut u = url::Url::parse(&base).expect("DATABASE_URL is a URL");
    u.set_path(opts.get_database().expect("sqlx::test sets a database"));
    u.to_string()
}

/// A config for one test instance: its own database, observability on port 0, quick
/// leadership timings.
pub fn test_config(opts: &PgConnectOptions) -> Config {
    vpnbot::telemetry::init_for_tests();
    let mut cfg = Config::default();
    cfg.db.url = SecretString::from(url_for(opts));
    cfg.db.max_connections = 5;
    cfg.db.min_connections = 0;
    cfg.db.acquire_timeout_seconds = Duration::from_secs(2);
    cfg.db.readiness_interval_seconds = Duration::from_millis(200);
    cfg.observability.listen = "127.0.0.1:0".parse().unwrap();
    cfg.leader.check_interval_seconds = Duration::from_millis(200);
    cfg.leader.check_timeout_seconds = Duration::from_millis(500);
    cfg.leader.retry_interval_seconds = Duration::from_millis(300);
    cfg.leader.takeover_delay_seconds = Duration::from_secs(1);
    cfg.runtime.shutdown_drain_seconds = std::time::Duration::from_secs(3);
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    cfg
}

/// Polls `f` every 20 ms until it holds or `limit` passes; returns the time it took.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f().then(|| start.elapsed())
}

/// Value of one sample in Prometheus text, e.g. `metric(&text, "vpnbot_leader", &[])`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    vpnbot::metrics::sample(text, name, labels)
}

/// A fresh database `vpnbot_<tag>_<pid>` on the server of `DATABASE_URL`, for tests that
/// build their own runtime (where `#[sqlx::test]` cannot help). Returns its URL.
pub async fn fresh_database(tag: &str) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by scripts/test.sh");
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
        .unwrap();
    let db = format!("vpnbot_{tag}_{}", std::process::id());
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let mut u = url::Url::parse(&base).unwrap();
    u.set_path(&db);
    u.to_string()
}

/// `GET http://{addr}{path}` with a 3 s bound: (status, body). Panics on a transport error.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.text().await.unwrap())
}

/// Another binary of the workspace (`vpnbot-demo`, `vpnbot-sim`, `vpnbot-node`), built next
/// to this test binary by `cargo test --workspace` (the README's test command), with the same
/// clean environment as [`vpnbot`]. Panics naming the build command when it is missing.
pub fn workspace_bin(name: &str) -> std::process::Command {
    let dir = std::env::current_exe()
        .expect("test binary path")
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace`, \
         which `scripts/test.sh` does through `cargo test --workspace`)",
        path.display()
    );
    clean_env(std::process::Command::new(path))
}

/// The built `vpnbot` binary with a clean configuration environment: every `VPNBOT_*`
/// variable and `DATABASE_URL` of the test runner removed, so a developer's shell cannot change
/// what a test sees.
pub fn vpnbot() -> std::process::Command {
    clean_env(std::process::Command::new(env!("CARGO_BIN_EXE_vpnbot")))
}

/// `c` without the test runner's `VPNBOT_*` variables and `DATABASE_URL`.
fn clean_env(mut c: std::process::Command) -> std::process::Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("VPNBOT_") || k == "DATABASE_URL" {
            c.env_remove(k);
        }
    }
    c
}
