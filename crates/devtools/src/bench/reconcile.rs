//! Benchmark of one full reconcile pass at production scale: N live subscriptions in
//! PostgreSQL (default one million), N users on a simulated node, 1 % of them orphans and 1 %
//! of the subscriptions missing on the node. Prints wall time per phase, peak RSS, database
//! round trips, the most pooled connections held at once and the worst scheduler lag seen.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use serde::Serialize;
use sqlx::{Connection, Executor};
use uuid::Uuid;

use vpnbot::config::{Config, NodeConfig};
use vpnbot::db::inflight::PoolUse;
use vpnbot::db::DbPool;
use vpnbot::fleet::Fleet;
use vpnbot::node::NodeUser;
use vpnbot::reconcile::{ReconcileSettings, Reconciler, RunOptions};
use vpnbot_sim::node::{SimNode, SimNodeOptions};

/// Figures of one benchmark pass.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Live subscriptions in the database.
    pub subscriptions: usize,
    /// Users on the simulated node.
    pub node_users: usize,
    /// Orphans planted / found by the diff.
    pub orphans: (usize, u64),
    /// Missing users planted / found by the diff.
    pub missing: (usize, u64),
    /// Removal and re-add intents written.
    pub intents: (u64, u64),
    /// Outcome of the pass.
    pub outcome: &'static str,
    /// Setup time (inserts, index, simulator), seconds.
    pub setup_seconds: f64,
    /// Wall time of the pass, seconds.
    pub pass_seconds: f64,
    /// Seconds per phase.
    pub phase_seconds: std::collections::BTreeMap<&'static str, f64>,
    /// Database round trips of the pass.
    pub db_round_trips: u64,
    /// Most pooled connections the pass held at once (its own count).
    pub max_connections_held: u64,
    /// Most pool holders of any label seen by a 10 ms sampler during the pass.
    pub max_holders_sampled: usize,
    /// Resident set before the pass (simulator and test data included), bytes.
    pub rss_before_bytes: u64,
    /// Peak resident set during the pass (VmHWM after resetting it), bytes.
    pub peak_rss_bytes: u64,
    /// Worst lateness of a 10 ms timer on the runtime during the pass, seconds.
    pub max_timer_lag_seconds: f64,
}

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Production-scale reconcile load, ready to run: a scratch database with `n` live
/// subscriptions on node `a`, the node simulated in a child process (this binary re-executed,
/// see [`maybe_run_sim_child`]) holding the same users minus 1 % (missing) plus 1 % orphans,
/// and a pool (production defaults, statement timeout 120 s) and fleet over them. Shared by
/// the reconcile benchmark and the bot benchmark that measures the bot during a pass.
#[derive(Debug)]
pub struct ReconcileFixture {
    /// Config pointing at the scratch database and the simulated node `a`.
    pub config: Config,
    /// Registry holding the pool's, fleet's and reconciler's metrics.
    pub registry: prometheus::Registry,
    /// The pool (`db.max_connections` from the default config).
    pub pool: DbPool,
    /// Node client fleet (one node, `a`).
    pub fleet: Fleet,
    /// Reconciler with default settings.
    pub reconciler: Reconciler,
    /// Subscriptions planted.
    pub subscriptions: usize,
    /// Orphans (on the node only) and missing users (in the database only) planted.
    pub planted: usize,
    /// Setup wall time, seconds.
    pub setup_seconds: f64,
    admin: sqlx::PgConnection,
    db_name: String,
    child: std::process::Child,
    _users_file: tempfile::NamedTempFile,
}

impl ReconcileFixture {
    /// Builds it against the PostgreSQL server of `server_url` (any database on it; the
    /// scratch one is created here and dropped by [`Self::teardown`]). The binary must call
    /// [`maybe_run_sim_child`] first thing in `main`.
    ///
    /// # Errors
    /// Setup failures, as text.
    pub async fn prepare(server_url: &str, n: usize) -> Result<ReconcileFixture, String> {
        let t_setup = Instant::now();
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let db_name = format!("vpnbot_bench_reconcile_{}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(server_url)
            .await
            .map_err(|x| e(&x))?;
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {db_name}"
            )))
            .await
            .map_err(|x| e(&x))?;
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .await
            .map_err(|x| e(&x))?;
        let mut url = url::Url::parse(server_url).map_err(|x| e(&x))?;
        url.set_path(&db_name);

        // Data: n live subscriptions; the node lacks the first 1 % and has 1 % extra orphans.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let live: Vec<Uuid> = (0..n)
            .map(|_| uuid::Builder::from_random_bytes(rng.random()).into_uuid())
            .collect();
        let k = n / 100;
        let orphans: Vec<Uuid> = (0..k)
            .map(|_| uuid::Builder::from_random_bytes(rng.random()).into_uuid())
            .collect();

        let mut cfg = Config::default();
        cfg.db.url = SecretString::from(url.to_string());
        cfg.db.statement_timeout_seconds = Duration::from_secs(120);
        // The node runs in a child process so that the peak RSS measured by the benchmark is
        // vpnbot's alone, and its CPU is not the measured runtime's.
        let users_file = tempfile::NamedTempFile::new().map_err(|x| e(&x))?;
        {
            let mut bytes = Vec::with_capacity(n * 16);
            for u in live[k..].iter().chain(orphans.iter()) {
                bytes.extend_from_slice(u.as_bytes());
            }
            std::fs::write(users_file.path(), bytes).map_err(|x| e(&x))?;
        }
        let exe = std::env::current_exe().map_err(|x| e(&x))?;
        let mut child = std::process::Command::new(exe)
            .env(SIM_CHILD_ENV, users_file.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|x| e(&x))?;
        let stdout = child.stdout.take().ok_or("child stdout")?;
        let base_url = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            line.trim().to_string()
        })
        .await
        .map_err(|x| e(&x))?;
        if base_url.is_empty() {
            let _ = child.kill();
            return Err("the simulator child did not start".into());
        }
        cfg.nodes.insert(
            "a".into(),
            NodeConfig {
                url: base_url,
                api_key: SecretString::from(SimNodeOptions::default().api_key),
                public_host: "a.example".into(),
                public_port: 443,
            },
        );
        // The default body cap (64 MiB) holds 1,000,000 owned users (~60 MiB with the
        // 19-character ownership marker); the benchmark runs with it.
        let registry = vpnbot::metrics::new_registry();
        let pool = DbPool::connect(&cfg.db, &registry).map_err(|x| e(&x))?;
        vpnbot::db::migrate(&pool).await.map_err(|x| e(&x))?;
        {
            let mut c = pool.acquire("bench_setup").await.map_err(|x| e(&x))?;
            // One user per subscription, as in production (owner ids 1..=n): skewed owners
            // would make the bot's per-user queries plan as scans.
            sqlx::query("INSERT INTO bot_users (telegram_id) SELECT generate_series(1, $1)")
                .bind(n as i64)
                .execute(&mut *c)
                .await
                .map_err(|x| e(&x))?;
            for (i, chunk) in live.chunks(100_000).enumerate() {
                sqlx::query(
                    "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at, \
                     created_at, updated_at) \
                     SELECT $2 + o, 'a', u, 'month', now() + interval '30 days', \
                            now() - interval '1 day', now() - interval '1 day' \
                     FROM UNNEST($1::uuid[]) WITH ORDINALITY AS t(u, o)",
                )
                .bind(chunk)
                .bind((i * 100_000) as i64)
                .execute(&mut *c)
                .await
                .map_err(|x| e(&x))?;
            }
            // The state autovacuum keeps a long-lived table in (PostgreSQL ≥ 13 also vacuums
            // after inserts): hint bits set and the visibility map current, so the snapshot's
            // index-only scan reads no heap page. A table never vacuumed since a bulk load
            // would measure the one-off first read instead.
            sqlx::query("VACUUM (ANALYZE) bot_users, subscriptions")
                .execute(&mut *c)
                .await
                .map_err(|x| e(&x))?;
        }
        let fleet = Fleet::from_config(&cfg, &registry).map_err(|(_, x)| e(&x))?;
        let reconciler = Reconciler::new(
            pool.clone(),
            fleet.clone(),
            &registry,
            ReconcileSettings::default(),
        );
        Ok(ReconcileFixture {
            config: cfg,
            registry,
            pool,
            fleet,
            reconciler,
            subscriptions: n,
            planted: k,
            setup_seconds: t_setup.elapsed().as_secs_f64(),
            admin,
            db_name,
            child,
            _users_file: users_file,
        })
    }

    /// Closes the pool, stops the simulator child and drops the scratch database.
    pub async fn teardown(mut self) {
        self.pool.close().await;
        drop(self.child.stdin.take());
        let _ = tokio::task::spawn_blocking(move || self.child.wait()).await;
        let _ = self
            .admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            )))
            .await;
    }
}

/// Runs the benchmark against the PostgreSQL server of `server_url` (a scratch database is
/// created and dropped) with `n` subscriptions. Needs a multi-thread runtime.
///
/// # Errors
/// Setup failures, as text.
pub async fn bench_reconcile(server_url: &str, n: usize) -> Result<BenchReport, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let fx = ReconcileFixture::prepare(server_url, n).await?;
    let (pool, rec, k) = (fx.pool.clone(), fx.reconciler.clone(), fx.planted);
    let setup_seconds = fx.setup_seconds;

    // Reset the peak RSS so VmHWM reports the pass, not the setup.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = status_kb("VmRSS:") * 1024;
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let pool = pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut max_holders, mut max_lag) = (0usize, Duration::ZERO);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return (max_holders, max_lag),
                    _ = tick.tick() => {}
                }
                let now = Instant::now();
                max_lag = max_lag.max(
                    now.duration_since(last)
                        .saturating_sub(Duration::from_millis(10)),
                );
                last = now;
                let holders = pool
                    .inflight()
                    .snapshot()
                    .iter()
                    .filter(|h| h.state == PoolUse::Holding)
                    .count();
                max_holders = max_holders.max(holders);
            }
        })
    };
    let t = Instant::now();
    let rep = match rec.reconcile_once(&RunOptions::default()).await {
        Ok(r) => r,
        Err(x) => {
            fx.teardown().await;
            return Err(e(&x));
        }
    };
    let pass_seconds = t.elapsed().as_secs_f64();
    let peak = status_kb("VmHWM:") * 1024;
    stop.cancel();
    let (max_holders, max_lag) = sampler.await.map_err(|x| e(&x))?;
    let node = rep.nodes.into_iter().next().ok_or("no node report")?;
    fx.teardown().await;
    Ok(BenchReport {
        subscriptions: n,
        node_users: n,
        orphans: (k, node.orphans),
        missing: (k, node.missing),
        intents: (node.removed, node.readded),
        outcome: node.outcome.as_str(),
        setup_seconds,
        pass_seconds,
        phase_seconds: node.phase_seconds,
        db_round_trips: node.db_round_trips,
        max_connections_held: node.max_connections_held,
        max_holders_sampled: max_holders,
        rss_before_bytes: rss_before,
        peak_rss_bytes: peak,
        max_timer_lag_seconds: max_lag.as_secs_f64(),
    })
}

/// Environment variable that turns the re-executed benchmark binary into the node simulator.
pub const SIM_CHILD_ENV: &str = "VPNBOT_BENCH_SIM_USERS";

/// Call first in a binary that runs [`bench_reconcile`]: when re-executed as the simulator
/// child, serves the users listed in the file named by [`SIM_CHILD_ENV`] (16 bytes per UUID,
/// all owned), prints its base URL, and exits when its standard input closes.
pub fn maybe_run_sim_child() {
    let Some(path) = std::env::var_os(SIM_CHILD_ENV) else {
        return;
    };
    let bytes = std::fs::read(path).expect("users file");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let sim = SimNode::start(l, SimNodeOptions::default());
        for c in bytes.chunks_exact(16) {
            sim.insert_user(NodeUser::owned(Uuid::from_slice(c).expect("16 bytes")));
        }
        drop(bytes);
        sim.warm().await;
        println!("{}", sim.base_url());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await;
        drop(sim);
    });
    std::process::exit(0);
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "bench reconcile: {} live subscriptions, {} node users; outcome {}",
            self.subscriptions, self.node_users, self.outcome
        )?;
        writeln!(
            f,
            "  orphans planted/found {}/{}, missing planted/found {}/{}, intents remove/add {}/{}",
            self.orphans.0,
            self.orphans.1,
            self.missing.0,
            self.missing.1,
            self.intents.0,
            self.intents.1
        )?;
        writeln!(
            f,
            "  setup {:.1} s (the node simulator runs in a child process)",
            self.setup_seconds
        )?;
        writeln!(f, "  pass  {:.2} s (target < 10 s)", self.pass_seconds)?;
        for (p, s) in &self.phase_seconds {
            writeln!(f, "    {p:<9} {s:7.3} s")?;
        }
        writeln!(f, "  db round trips {}", self.db_round_trips)?;
        writeln!(
            f,
            "  pooled connections held at once: {} (own count), {} (10 ms sampler, any label)",
            self.max_connections_held, self.max_holders_sampled
        )?;
        writeln!(
            f,
            "  RSS before pass {:.0} MiB (vpnbot only: the simulator is a child process), peak during pass {:.0} MiB (target < 300 MB)",
            mib(self.rss_before_bytes),
            mib(self.peak_rss_bytes)
        )?;
        writeln!(
            f,
            "  worst 10 ms timer lag during the pass {:.1} ms (stall threshold 1000 ms)",
            self.max_timer_lag_seconds * 1e3
        )
    }
}
