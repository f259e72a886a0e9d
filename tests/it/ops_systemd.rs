//! The service manager notification protocol (systemd `Type=notify`, issue 18) against a real
//! unix datagram socket named by `NOTIFY_SOCKET`, the way systemd listens:
//! - the watchdog thread pings `WATCHDOG=1` while the runtime makes progress, stops within the
//!   stall threshold + one watchdog period once every worker is blocked, has the dump written
//!   before the service manager's timeout would fire, and resumes after;
//! - `vpnbot run` sends `READY=1` only once migrations are applied and the observability server
//!   answers, `STATUS=` lines, and `STOPPING=1` on SIGTERM before exiting 0.
//!
//! Tests run one at a time: the first sets `NOTIFY_SOCKET` in this process's environment.

use crate::helpers;
use rusty_fork::rusty_fork_test;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::diagnostics::{Diagnostics, DiagnosticsSettings, StallKind};
use vpnbot::supervisor::Supervisor;
use vpnbot::tasks::Tasks;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Received = Arc<Mutex<Vec<(Instant, String)>>>;

/// Binds a datagram socket at `path` and records every datagram with its arrival time.
fn listen(path: &Path) -> Received {
    let sock = UnixDatagram::bind(path).unwrap();
    let got: Received = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            g.lock().unwrap().push((Instant::now(), msg));
        }
    });
    got
}

fn pings(got: &Received) -> Vec<Instant> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1\n")
        .map(|(t, _)| *t)
        .collect()
}

const THRESHOLD: f64 = 0.3;
const PERIOD: f64 = 0.05;
/// `WATCHDOG_USEC` the "service manager" sets: 3 s, so vpnbot pings every 1.5 s.
const WATCHDOG_USEC: u64 = 3_000_000;
/// Scheduling slack on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(300);

// Its own process: it sets NOTIFY_SOCKET/WATCHDOG_USEC in the environment, which the other tests of this binary must not see or race with.
rusty_fork_test! {
    #[test]
    fn watchdog_pings_stop_during_a_total_stall_and_resume_after() {
        let _g = SERIAL.blocking_lock();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("notify.sock");
        let got = listen(&sock);
        // Set once, before any thread of ours reads the environment (this binary runs its tests
        // one at a time; the other one passes the variables to a child process explicitly).
        std::env::set_var("NOTIFY_SOCKET", &sock);
        std::env::set_var("WATCHDOG_USEC", WATCHDOG_USEC.to_string());
        std::env::remove_var("WATCHDOG_PID");
        let supervisor = Supervisor::from_env();
        assert_eq!(
            supervisor.watchdog_timeout(),
            Some(Duration::from_micros(WATCHDOG_USEC))
        );

        let dumps = dir.path().join("dumps");
        let settings = DiagnosticsSettings {
            stall_threshold_seconds: Duration::from_secs_f64(THRESHOLD),
            watchdog_period_seconds: Duration::from_secs_f64(PERIOD),
            lag_probe_interval_seconds: Duration::from_secs_f64(PERIOD),
            task_dump_timeout_seconds: Duration::from_millis(300),
            native_stacks: false,
            dump_min_interval_seconds: Duration::from_secs(0),
            dump_dir: dumps.clone(),
            ..Default::default()
        };
        let registry = vpnbot::metrics::new_registry();
        let diag = Diagnostics::new(vpnbot::metrics::NAMING, settings, &registry);
        let rt = vpnbot::runtime::build_main_runtime(Some(2), &diag).unwrap();
        let tasks = Tasks::new();
        diag.start(rt.handle(), &tasks, Some(std::sync::Arc::new(supervisor)));

        // Healthy: pings every WATCHDOG_USEC / 2.
        std::thread::sleep(Duration::from_millis(3400));
        let healthy = pings(&got);
        assert!(healthy.len() >= 2, "pings while healthy: {}", healthy.len());
        let half = Duration::from_micros(WATCHDOG_USEC / 2);
        for w in healthy.windows(2) {
            let gap = w[1] - w[0];
            assert!(gap >= half - Duration::from_millis(5), "{gap:?}");
            assert!(
                gap <= half + Duration::from_secs_f64(PERIOD) + SLACK,
                "{gap:?}"
            );
        }

        // Block every worker: each task waits for the other to be on a worker, then sleeps.
        let entered = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(AtomicBool::new(false));
        for _ in 0..2 {
            let (entered, release) = (entered.clone(), release.clone());
            rt.spawn(async move {
                entered.fetch_add(1, Ordering::AcqRel);
                while !release.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        let t0 = Instant::now();
        while entered.load(Ordering::Acquire) < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "workers never blocked"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let blocked_at = Instant::now();
        let mut dump_at = None;
        while blocked_at.elapsed() < Duration::from_secs(4) {
            if dump_at.is_none() && runtime_stalled_dump_written(&dumps) {
                dump_at = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(diag.stall(), Some(StallKind::RuntimeStalled));
        let released_at = Instant::now();
        release.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(2500));

        let all = pings(&got);
        let stop_bound = blocked_at + Duration::from_secs_f64(THRESHOLD + PERIOD) + SLACK;
        let late: Vec<Duration> = all
            .iter()
            .filter(|t| **t > stop_bound && **t < released_at)
            .map(|t| *t - blocked_at)
            .collect();
        assert!(
            late.is_empty(),
            "pings after every worker blocked (offsets): {late:?}"
        );
        let last_before = all
            .iter()
            .rfind(|t| **t < released_at)
            .copied()
            .expect("a ping before the stall");
        let dump_at = dump_at.expect("runtime_stalled dump written during the stall");
        let kill_at = last_before + Duration::from_micros(WATCHDOG_USEC);
        eprintln!(
            "last ping {:?} after block (or before: {}), dump {:?} after block, service manager \
             would kill {:?} after block",
            last_before.saturating_duration_since(blocked_at),
            last_before < blocked_at,
            dump_at - blocked_at,
            kill_at.saturating_duration_since(blocked_at),
        );
        assert!(
            dump_at < kill_at,
            "dump written after the watchdog timeout would have fired"
        );
        let resumed = all
            .iter()
            .find(|t| **t > released_at)
            .copied()
            .expect("pings resume after the stall");
        eprintln!("pings resumed {:?} after release", resumed - released_at);
        assert!(resumed - released_at <= Duration::from_secs(1));

        tasks.root().cancel();
        diag.stop();
        rt.shutdown_timeout(Duration::from_secs(5));
    }
}

fn runtime_stalled_dump_written(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("runtime_stalled"))
        })
        .unwrap_or(false)
}

/// Waits up to `limit` for a datagram containing `needle`; returns it and its arrival.
fn wait_message(got: &Received, needle: &str, limit: Duration) -> (Instant, String) {
    let t0 = Instant::now();
    loop {
        if let Some(m) = got
            .lock()
            .unwrap()
            .iter()
            .find(|(_, m)| m.contains(needle))
            .cloned()
        {
            return m;
        }
        assert!(
            t0.elapsed() < limit,
            "no {needle:?} within {limit:?}: {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[sqlx::test(migrations = false)]
async fn run_notifies_ready_after_startup_status_and_stopping_on_sigterm(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let _g = SERIAL.lock().await;
    let url = helpers::url_for(&opts);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("notify.sock");
    let got = listen(&sock);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vpnbot"));
    for (k, _) in std::env::vars() {
        if k.starts_with("VPNBOT_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .arg("run")
        .env("DATABASE_URL", &url)
        .env("VPNBOT_OBSERVABILITY__LISTEN", "127.0.0.1:0")
        .env("VPNBOT_DIAGNOSTICS__DUMP_DIR", dir.path().join("dumps"))
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let (_, ready) = wait_message(&got, "READY=1", Duration::from_secs(30));
    // At READY the migrations are applied and the observability server answers.
    let addr = ready
        .split("observability on ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("READY status names the observability address: {ready:?}"))
        .to_string();
    let health = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let pool = PgPoolOptions::new().connect_with(opts).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(applied > 0);
    assert!(ready.contains("STATUS=started; "), "{ready:?}");
    // The STATUS line turns to leader once the advisory lock is won.
    let (_, status) = wait_message(&got, "STATUS=leader;", Duration::from_secs(20));
    assert!(!status.contains("READY=1"), "{status:?}");
    // Watchdog pings every 0.5 s while healthy.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(pings(&got).len() >= 2, "{:?}", got.lock().unwrap());

    let sigterm_at = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let (stopping_at, stopping) = wait_message(&got, "STOPPING=1", Duration::from_secs(10));
    assert!(stopping.contains("STATUS=draining"), "{stopping:?}");
    eprintln!("STOPPING=1 {:?} after SIGTERM", stopping_at - sigterm_at);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}
