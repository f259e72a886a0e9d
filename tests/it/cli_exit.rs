//! Issue 11 item 3: every short command exits within its bound whatever is still stuck in the
//! blocking pool. The input is a resolver that never answers: a UDP socket on a loopback address
//! that reads and drops every query, made the process's resolver through its own
//! `/etc/resolv.conf` in a private mount namespace (`unshare -m` + a bind mount), never the
//! machine's. glibc then waits `timeout:30 attempts:5` (150 s) per look-up on a blocking thread;
//! before the fix `reconcile --once` printed its report and then waited for those threads.
//!
//! Needs root (or CAP_SYS_ADMIN) for the mount namespace. Without it the tests fail, unless
//! `ALLOW_SKIP_TESTS=1` is set, in which case they print why and pass.

use crate::helpers;
use std::net::UdpSocket;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Whether this process may create a mount namespace and bind-mount over `/etc/resolv.conf`.
fn namespaces_available() -> bool {
    std::process::Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount --bind /etc/hostname /etc/resolv.conf",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `true` when the test may go on; panics (fails) when it cannot and skipping is not allowed.
fn require_namespaces() -> bool {
    if namespaces_available() {
        return true;
    }
    helpers::missing("this test needs `unshare -m` and a bind mount (run as root)");
    false
}

/// A DNS server that never answers: binds UDP port 53 on a free loopback address
/// (127.0.0.2 and up) and drains queries on a thread. Returns the socket (kept open while the
/// test runs), its address and the path of a `resolv.conf` naming it.
fn black_hole_resolver(dir: &tempfile::TempDir) -> (UdpSocket, std::path::PathBuf) {
    let sock = (2..250)
        .find_map(|last| UdpSocket::bind(format!("127.0.0.{last}:53")).ok())
        .expect("a free loopback address for port 53");
    let addr = sock.local_addr().unwrap();
    let reader = sock.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while reader.recv(&mut buf).is_ok() {}
    });
    let path = dir.path().join("resolv.conf");
    std::fs::write(
        &path,
        format!("nameserver {}\noptions timeout:30 attempts:5\n", addr.ip()),
    )
    .unwrap();
    (sock, path)
}

/// `vpnbot ARGS` inside a mount namespace whose `/etc/resolv.conf` is `resolv`, with no
/// `VPNBOT_*` variables but `env`.
fn vpnbot_with_resolver(
    resolv: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("unshare");
    c.args([
        "-m",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
    ])
    .arg(resolv)
    .arg(env!("CARGO_BIN_EXE_vpnbot"))
    .args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("VPNBOT_") || k == "DATABASE_URL" {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs `cmd`, killing it after 60 s; returns (exit code, stdout, stderr, wall time).
async fn run_bounded(mut cmd: tokio::process::Command) -> (Option<i32>, String, String, Duration) {
    let t = Instant::now();
    let child = cmd.spawn().expect("unshare runs");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command did not exit within 60 s")
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

#[sqlx::test(migrations = false)]
async fn reconcile_once_exits_promptly_while_a_lookup_hangs(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    if !require_namespaces() {
        return;
    }
    let url = helpers::url_for(&opts);
    let cfg = helpers::test_config(&opts);
    let pool = vpnbot::db::DbPool::connect(&cfg.db, &vpnbot::metrics::new_registry()).unwrap();
    vpnbot::db::migrate(&pool).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_dns, resolv) = black_hole_resolver(&dir);
    let cmd = vpnbot_with_resolver(
        &resolv,
        &[
            ("DATABASE_URL", &url),
            ("VPNBOT_NODES__A__URL", "http://stuck-node.example:8080"),
            ("VPNBOT_NODES__A__API_KEY", "sim-key"),
            ("VPNBOT_NODE_CLIENT__TOTAL_DEADLINE_SECONDS", "2"),
            ("VPNBOT_NODE_CLIENT__CONNECT_TIMEOUT_SECONDS", "1"),
            ("VPNBOT_NODE_CLIENT__HEADERS_TIMEOUT_SECONDS", "1"),
        ],
        &["reconcile", "--once", "--json"],
    );
    let (code, stdout, stderr, took) = run_bounded(cmd).await;
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("JSON report on stdout ({e}): {stdout}\n{stderr}"));
    assert_eq!(v["nodes"][0]["outcome"], "failed", "{stdout}");
    assert_ne!(code, Some(0), "a failed node is not success: {stderr}");
    // Startup, a 2 s node deadline and the 2 s exit bound; the look-up itself runs 150 s.
    assert!(
        took < Duration::from_secs(12),
        "reconcile --once took {took:?} to exit: {stderr}"
    );
}

#[tokio::test]
async fn migrate_exits_promptly_while_the_database_name_does_not_resolve() {
    if !require_namespaces() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_dns, resolv) = black_hole_resolver(&dir);
    let cmd = vpnbot_with_resolver(
        &resolv,
        &[
            (
                "DATABASE_URL",
                "postgres://vpnbot@stuck-db.example:5432/vpnbot",
            ),
            ("VPNBOT_DB__CONNECT_TIMEOUT_SECONDS", "2"),
            ("VPNBOT_DB__ACQUIRE_TIMEOUT_SECONDS", "2"),
        ],
        &["migrate"],
    );
    let (code, _stdout, stderr, took) = run_bounded(cmd).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(code.is_some(), "ended by a signal: {stderr}");
    assert!(
        took < Duration::from_secs(15),
        "migrate took {took:?} to exit: {stderr}"
    );
}
