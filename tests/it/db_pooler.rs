//! Issue 11 item 6: PgBouncer in front of PostgreSQL (the distribution's `pgbouncer`, installed
//! by scripts/install-deps.sh; these tests fail, not skip, without it). Transaction pooling
//! without `db.direct_url` (or without prepared-statement support) is refused at start with a
//! message naming the pool mode, instead of a leadership loop that never leads; session pooling
//! works; `/readyz` is not ready while leadership cannot even be attempted.

use crate::helpers;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::app::{App, StartError};

/// A PgBouncer process in `pool_mode = <mode>` forwarding every database to the test server.
struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_binary() -> String {
    for p in ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    let which = Command::new("sh")
        .args(["-c", "command -v pgbouncer"])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&which.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "pgbouncer is missing: run scripts/install-deps.sh (apt-get install -y pgbouncer)"
    );
    path
}

impl PgBouncer {
    fn start(mode: &str) -> PgBouncer {
        let bin = pgbouncer_binary();
        let server = url::Url::parse(&std::env::var("DATABASE_URL").expect("DATABASE_URL"))
            .expect("DATABASE_URL is a URL");
        let (host, pg_port) = (
            server.host_str().unwrap_or("127.0.0.1").to_string(),
            server.port().unwrap_or(5432),
        );
        let user = if server.username().is_empty() {
            "postgres"
        } else {
            server.username()
        };
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let users = dir.path().join("users.txt");
        std::fs::write(&users, format!("\"{user}\" \"\"\n")).unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        // vpnbot sends `options` (statement_timeout & co) and sqlx `extra_float_digits`, which
        // PgBouncer 1.18 does not forward: ignore them (README: Connection poolers).
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host={host} port={pg_port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
                 pool_mode = {mode}\nmax_client_conn = 200\ndefault_pool_size = 20\n\
                 ignore_startup_parameters = extra_float_digits,options\n",
                users.display()
            ),
        )
        .unwrap();
        // PgBouncer refuses to run as root: switch to postgres then (files must be readable).
        let mut cmd = Command::new(&bin);
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            use std::os::unix::fs::PermissionsExt;
            for p in [dir.path(), &users, &ini] {
                let mode = if p.is_dir() { 0o755 } else { 0o644 };
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer starts");
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "pgbouncer did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        PgBouncer {
            child,
            port,
            _dir: dir,
        }
    }

    /// `url` with host and port replaced by this PgBouncer's.
    fn url(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(self.port)).unwrap();
        u.to_string()
    }
}

use helpers::http_get as get;

#[sqlx::test(migrations = false)]
async fn transaction_pooling_without_direct_url_fails_start_naming_the_mode(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let bouncer = PgBouncer::start("transaction");
    let mut cfg = helpers::test_config(&opts);
    cfg.db.url = SecretString::from(bouncer.url(&helpers::url_for(&opts)));
    let t = Instant::now();
    let err = App::start(cfg).await.unwrap_err();
    eprintln!("start refused after {:?}: {err}", t.elapsed());
    assert!(matches!(err, StartError::Pooler(_)), "{err:?}");
    assert!(err.to_string().contains("pool_mode = transaction"), "{err}");
    assert!(err.to_string().contains("db.direct_url"), "{err}");
    assert_eq!(err.exit_code(), 64);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // The binary as an operator runs it: exit 64 with the message, not a retry loop.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_vpnbot"))
            .arg("run")
            .env_remove("VPNBOT_CONFIG")
            .env("DATABASE_URL", bouncer.url(&helpers::url_for(&opts)))
            .env("VPNBOT_OBSERVABILITY__LISTEN", "127.0.0.1:0")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run exits instead of looping")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("pool_mode = transaction"), "{stderr}");
}

#[sqlx::test(migrations = false)]
async fn transaction_pooling_with_direct_url_needs_prepared_statement_support(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let bouncer = PgBouncer::start("transaction");
    let direct = helpers::url_for(&opts);
    let mut cfg = helpers::test_config(&opts);
    cfg.db.url = SecretString::from(bouncer.url(&direct));
    cfg.db.direct_url = SecretString::from(direct);
    match App::start(cfg).await {
        // PgBouncer < 1.21 (Debian 12 ships 1.18), or max_prepared_statements = 0: sqlx's named
        // statements collide on the shared server session. Refused at start, naming why.
        Err(err) => {
            eprintln!("start refused: {err}");
            assert!(matches!(err, StartError::Pooler(_)), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("pool_mode = transaction"), "{msg}");
            assert!(msg.contains("prepared statement"), "{msg}");
            assert!(msg.contains("max_prepared_statements"), "{msg}");
            assert_eq!(err.exit_code(), 64);
        }
        // A PgBouncer that keeps prepared statements: supported, leadership on the direct URL.
        Ok(app) => {
            let leader = app.leader.clone();
            assert!(
                helpers::eventually(Duration::from_secs(5), || leader.is_leader())
                    .await
                    .is_some(),
                "leads through db.direct_url"
            );
            let mut c = app.pool.acquire("test").await.unwrap();
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE owner_id = $1")
                    .bind(1_i64)
                    .fetch_one(&mut *c)
                    .await
                    .unwrap();
            assert_eq!(n, 0);
            drop(c);
            app.shutdown().await;
        }
    }
}

#[sqlx::test(migrations = false)]
async fn session_pooling_is_supported_and_leads(_p: PgPoolOptions, opts: PgConnectOptions) {
    let bouncer = PgBouncer::start("session");
    let mut cfg = helpers::test_config(&opts);
    cfg.db.url = SecretString::from(bouncer.url(&helpers::url_for(&opts)));
    // PgBouncer drops the `options` startup parameter (statement_timeout): detected.
    {
        let mut c = vpnbot::db::connect::connect_direct(&cfg.db, "test")
            .await
            .unwrap();
        assert!(!vpnbot::db::pooler::warn_if_session_settings_lost(&cfg.db, &mut c).await);
        let mut direct_cfg = cfg.db.clone();
        direct_cfg.url = SecretString::from(helpers::url_for(&opts));
        let mut d = vpnbot::db::connect::connect_direct(&direct_cfg, "test")
            .await
            .unwrap();
        assert!(vpnbot::db::pooler::warn_if_session_settings_lost(&direct_cfg, &mut d).await);
    }
    let app = App::start(cfg).await.unwrap();
    let leader = app.leader.clone();
    assert!(
        helpers::eventually(Duration::from_secs(5), || leader.is_leader())
            .await
            .is_some(),
        "leads through PgBouncer in session mode"
    );
    let addr = app.obs_addr();
    let mut last = (0, String::new());
    for _ in 0..50 {
        last = get(addr, "/readyz").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, 200, "{}", last.1);
    // Parameterised queries through the pooler, many times over the pool's connections.
    for i in 0..50_i64 {
        let mut c = app.pool.acquire("test").await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE owner_id = $1")
            .bind(i)
            .fetch_one(&mut *c)
            .await
            .unwrap();
        assert_eq!(n, 0);
    }
    app.shutdown().await;
}

/// An instance whose leadership connection cannot even be opened is not ready, with the cause.
#[sqlx::test(migrations = false)]
async fn readyz_is_unready_while_leadership_cannot_be_attempted(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone())
        .await
        .unwrap();
    let role = format!("vpnbot_leadrole_{}", std::process::id());
    let db = opts.get_database().unwrap();
    // It owns the database: migrations run over db.direct_url too.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN; \
         ALTER DATABASE \"{db}\" OWNER TO {role}"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let mut direct = url::Url::parse(&helpers::url_for(&opts)).unwrap();
    direct.set_username(&role).unwrap();
    let mut cfg = helpers::test_config(&opts);
    cfg.db.direct_url = SecretString::from(direct.to_string());
    let app = App::start(cfg).await.unwrap();
    let leader = app.leader.clone();
    assert!(
        helpers::eventually(Duration::from_secs(5), || leader.is_leader())
            .await
            .is_some()
    );
    // The leadership role loses LOGIN and its session is ended.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {role} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE usename = '{role}'"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let addr = app.obs_addr();
    let mut last = (0, String::new());
    for _ in 0..50 {
        last = get(addr, "/readyz").await;
        if last.0 == 503 && last.1.contains("28000") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, 503, "{}", last.1);
    let v: serde_json::Value = serde_json::from_str(&last.1).unwrap();
    assert_eq!(v["leader"], false, "{v}");
    assert!(v["leadership"].as_str().unwrap().contains("28000"), "{v}");
    let text = vpnbot::metrics::render(&app.registry);
    assert!(
        helpers::metric(
            &text,
            "vpnbot_db_connect_errors_total",
            &[("kind", "auth_failed")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the leadership connection's refusal is counted"
    );
    // LOGIN back: ready again.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER ROLE {role} LOGIN")))
        .execute(&admin)
        .await
        .unwrap();
    for _ in 0..50 {
        last = get(addr, "/readyz").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, 200, "{}", last.1);
    app.shutdown().await;
}
