//! Issue 11 item 4: every command reports an unreachable or refusing database the same way
//! (exit 69, "database unreachable" and the cause, within the connect timeout), and
//! `reconcile` on a database without the schema says to run `vpnbot migrate`.

use crate::helpers;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The binary with a clean `VPNBOT_*` environment, the given database and one node (never
/// contacted: the database is checked first).
fn vpnbot(url: &str) -> tokio::process::Command {
    with_env(helpers::vpnbot(), url)
}

/// `vpnbot-demo` (the dev tools' binary) with the same environment.
fn vpnbot_demo(url: &str) -> tokio::process::Command {
    with_env(helpers::workspace_bin("vpnbot-demo"), url)
}

fn with_env(c: std::process::Command, url: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::from(c);
    c.env("DATABASE_URL", url)
        .env("VPNBOT_OBSERVABILITY__LISTEN", "127.0.0.1:0")
        .env("VPNBOT_NODES__A__URL", "http://127.0.0.1:9/")
        .env("VPNBOT_NODES__A__API_KEY", "sim-key")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    c
}

/// `vpnbot` subcommands, then the demo binary (empty args).
const COMMANDS: [&[&str]; 4] = [
    &["migrate"],
    &["reconcile", "--once", "--json"],
    &["run"],
    &[],
];

/// Runs each command; returns (args, exit code, stderr, seconds).
async fn run_all(url: &str) -> Vec<(String, Option<i32>, String, f64)> {
    let mut out = Vec::new();
    for args in COMMANDS {
        let t = Instant::now();
        let mut cmd = if args.is_empty() {
            vpnbot_demo(url)
        } else {
            vpnbot(url)
        };
        let o = tokio::time::timeout(Duration::from_secs(30), cmd.args(args).output())
            .await
            .expect("command exits")
            .unwrap();
        out.push((
            if args.is_empty() {
                "vpnbot-demo".to_string()
            } else {
                args.join(" ")
            },
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            t.elapsed().as_secs_f64(),
        ));
    }
    out
}

#[tokio::test]
async fn closed_port_is_exit_69_with_the_cause_for_every_command() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://bot:pw-s3cret@127.0.0.1:{port}/x");
    for (cmd, code, stderr, secs) in run_all(&url).await {
        eprintln!("{cmd}: exit {code:?} after {secs:.2} s");
        assert_eq!(code, Some(69), "{cmd}: {stderr}");
        assert!(
            stderr.contains("database unreachable") && stderr.contains("refused"),
            "{cmd}: {stderr}"
        );
        assert!(!stderr.contains("s3cret"), "{cmd}: {stderr}");
        assert!(
            !stderr.contains("pool timed out") && !stderr.contains("no database connection free"),
            "{cmd} reads like a busy pool: {stderr}"
        );
        assert!(secs < 3.0, "{cmd} took {secs:.2} s");
    }
}

#[sqlx::test(migrations = false)]
async fn refusing_server_is_exit_69_with_the_sqlstate_for_every_command(
    admin: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let admin = admin.connect_with(opts.clone()).await.unwrap();
    let role = format!("vpnbot_nologin_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} NOLOGIN"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let mut u = url::Url::parse(&helpers::url_for(&opts)).unwrap();
    u.set_username(&role).unwrap();
    for (cmd, code, stderr, secs) in run_all(u.as_str()).await {
        eprintln!("{cmd}: exit {code:?} after {secs:.2} s");
        assert_eq!(code, Some(69), "{cmd}: {stderr}");
        assert!(
            stderr.contains("database unreachable") && stderr.contains("SQLSTATE 28000"),
            "{cmd}: {stderr}"
        );
        assert!(secs < 3.0, "{cmd} took {secs:.2} s");
    }
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(&admin)
        .await;
}

#[sqlx::test(migrations = false)]
async fn reconcile_on_an_unmigrated_database_says_run_migrate(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = helpers::url_for(&opts);
    let t = Instant::now();
    let o = vpnbot(&url)
        .args(["reconcile", "--once"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("run `vpnbot migrate`"), "{stderr}");
    assert!(stderr.contains("migrations pending"), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // After `vpnbot migrate` the same command gets past the check (the node is unreachable).
    let m = vpnbot(&url).arg("migrate").output().await.unwrap();
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let o = vpnbot(&url)
        .args(["reconcile", "--once", "--json"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("vpnbot migrate"), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
    assert_eq!(v["nodes"][0]["node"], "a", "{v}");
}
