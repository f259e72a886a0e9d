//! The binary as an operator runs it: `run` drains and exits 0 on SIGTERM, whether the signal
//! arrives once it has started or while it is still starting; `migrate` works.

use crate::helpers;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

fn vpnbot(url: &str) -> Command {
    let mut c = helpers::vpnbot();
    c.env("DATABASE_URL", url)
        .env("VPNBOT_OBSERVABILITY__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    c
}

fn migrate(url: &str) {
    let out = vpnbot(url).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `vpnbot run` with its stderr lines forwarded to a channel.
fn spawn_run(url: &str) -> (Child, Receiver<String>) {
    let mut child = vpnbot(url)
        .arg("run")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Collects lines until one contains `needle` (20 s at most).
fn wait_for_line(rx: &Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            let hit = l.contains(needle);
            seen.push(l);
            if hit {
                return;
            }
        }
    }
    panic!("no line with {needle:?} within 20 s: {seen:#?}");
}

/// Sends SIGTERM and asserts a drained exit with code 0 within 15 s.
fn terminate_and_expect_clean_exit(
    mut child: Child,
    rx: &Receiver<String>,
    seen: &mut Vec<String>,
) {
    let t = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.push(l);
    }
    // `None` means the signal killed the process: no drain happened.
    assert_eq!(status.code(), Some(0), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("shutdown complete")),
        "{seen:#?}"
    );
}

#[sqlx::test(migrations = false)]
async fn run_exits_0_after_sigterm_within_the_drain_bound(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = helpers::url_for(&opts);
    migrate(&url);
    let (child, rx) = spawn_run(&url);
    let mut seen = Vec::new();
    wait_for_line(&rx, "vpnbot started", &mut seen);
    terminate_and_expect_clean_exit(child, &rx, &mut seen);
}

/// CI caught this once: a SIGTERM that arrived while `run` was applying migrations killed it
/// (exit by signal), because the handlers were installed only after startup.
#[sqlx::test(migrations = false)]
async fn sigterm_during_startup_still_drains_and_exits_0(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = helpers::url_for(&opts);
    let (child, rx) = spawn_run(&url);
    let mut seen = Vec::new();
    wait_for_line(&rx, "vpnbot starting", &mut seen);
    terminate_and_expect_clean_exit(child, &rx, &mut seen);
    assert!(
        seen.iter().any(|l| l.contains("signal received")),
        "{seen:#?}"
    );
}

/// Issue 11 item 9: `VPNBOT_CONFIG` (the environment form of `--config`) and the test
/// scripts' and simulator's `VPNBOT_*` variables used to be read as config sections, and
/// every command that loads the configuration exited 64. Now `migrate`, `reconcile` and `run`
/// read the file `VPNBOT_CONFIG` names and ignore the others.
#[sqlx::test(migrations = false)]
async fn commands_read_vpnbot_config_and_ignore_non_config_variables(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = helpers::url_for(&opts);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vpnbot.toml");
    std::fs::write(&file, "[db]\napplication_name = \"vpnbot-from-file\"\n").unwrap();
    let with_env = |mut c: Command| {
        c.env("VPNBOT_CONFIG", &file)
            .env("VPNBOT_TEST_PGPORT", "1")
            .env("VPNBOT_TEST_PGDATA", "/nonexistent")
            .env("VPNBOT_SIM_API_KEY", "x");
        c
    };
    let out = with_env(vpnbot(&url)).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_env(vpnbot(&url))
        .args(["reconcile", "--once", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "reconcile: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = with_env(vpnbot(&url))
        .arg("run")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    wait_for_line(&rx, "vpnbot started", &mut seen);
    // The file was read: the service's connections carry its application_name.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vpnbot-from-file'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert!(n > 0, "no connection named by the config file");
    terminate_and_expect_clean_exit(child, &rx, &mut seen);
}
