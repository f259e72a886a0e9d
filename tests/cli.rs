//! The binary as an operator runs it: `run` drains and exits 0 on SIGTERM; `migrate` works.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

fn vpnbot(url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vpnbot"));
    for (k, _) in std::env::vars() {
        if k.starts_with("VPNBOT_") {
            c.env_remove(k);
        }
    }
    c.env("DATABASE_URL", url)
        .env("VPNBOT_OBSERVABILITY__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    c
}

#[sqlx::test(migrations = false)]
async fn run_exits_0_after_sigterm_within_the_drain_bound(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = common::url_for(&opts);
    let out = vpnbot(&url).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = vpnbot(&url)
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
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            let ready = l.contains("database migrations applied");
            seen.push(l);
            if ready {
                break;
            }
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("migrations applied")),
        "{seen:#?}"
    );
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
    assert_eq!(status.code(), Some(0));
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.push(l);
    }
    assert!(
        seen.iter().any(|l| l.contains("shutdown complete")),
        "{seen:#?}"
    );
}
