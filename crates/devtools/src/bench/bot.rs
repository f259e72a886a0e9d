//! Benchmark: a burst of updates from distinct simulated users through the production receive
//! loop (`BotService::run`: long polling against the Bot API stand-in over loopback HTTP, the
//! two lanes and their concurrency bounds, the handlers with PostgreSQL and the node
//! simulator), optionally while reconcile passes over a million users run back to back on the
//! same runtime and pool (the scenario). Reports handler latency percentiles from the
//! handlers' own histogram (`vpnbot_bot_handler_duration_seconds`) and the runtime's scheduler
//! lag measured alongside (a 1 ms ticker's overshoot).
//!
//! `examples/bench_bot.rs` runs it on the runtime and subscriber `vpnbot run` installs.

use std::time::{Duration, Instant};

use secrecy::SecretString;
use sqlx::{Connection, Executor};

use vpnbot::bot::{BotApi, BotMetrics, BotService};
use vpnbot::config::Config;
use vpnbot::db::DbPool;
use vpnbot::fleet::Fleet;
use vpnbot_sim::botapi::{BotApiSim, BotApiSimOptions, SimUser};
use vpnbot_sim::node::{SimNode, SimNodeOptions};

/// The burst to send: `users` updates, one per simulated user, handled with at most
/// `concurrency` at once (`None`: the default `bot.max_concurrent_updates`).
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    /// Updates (and simulated users).
    pub users: usize,
    /// Handler concurrency bound.
    pub concurrency: Option<usize>,
}

/// Telegram id of the first simulated user of the burst.
const FIRST_USER_ID: i64 = 5_000_000_000;

/// The burst's mix, one command per user in turn; `/trial` issues a key on the node and
/// renders a QR code.
const COMMANDS: [&str; 4] = ["/start", "/status", "/help", "/trial"];

/// Figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BotBenchReport {
    /// Updates injected (one per user).
    pub updates: usize,
    /// Wall time from starting `BotService::run` (its start-up calls included) to the last
    /// handler's end, seconds.
    pub wall_seconds: f64,
    /// Handler latency, milliseconds, from `vpnbot_bot_handler_duration_seconds` (the
    /// handlers' own timing in `BotService::run`): p50, p99 (interpolated within a bucket)
    /// and the upper bound of the highest non-empty bucket.
    pub handler_ms: [f64; 3],
    /// The same per command of the mix.
    pub handler_ms_by_command: std::collections::BTreeMap<&'static str, [f64; 3]>,
    /// Scheduler lag percentiles (1 ms ticker overshoot), milliseconds: p50, p99, max.
    pub scheduler_lag_ms: [f64; 3],
    /// CPU time during the burst by who used it, from the kernel's per-thread `schedstat`:
    /// group → `(seconds on a CPU, seconds runnable but waiting for one)`. Groups: `workers`
    /// (the main runtime's), `blocking` (its blocking pool: QR codes, decoding, diffing),
    /// `bot_api_stand_in` (the peers' thread of this process), `node_simulator` (the child
    /// process serving the node API), `postgresql` (every `postgres` process of the machine),
    /// `other` (the rest of this process and any other child). A large wait for the workers means the lag is queueing for a core,
    /// not a long poll. Empty where `/proc` cannot be read.
    pub cpu_seconds: std::collections::BTreeMap<&'static str, (f64, f64)>,
    /// Messages the stand-in received from the bot.
    pub sent: usize,
    /// Concurrency bound used (`bot.max_concurrent_updates`).
    pub concurrency: usize,
    /// The reconcile load that ran during the burst, if any.
    pub reconcile: Option<ReconcileLoad>,
}

/// Reconcile passes that ran back to back on the same runtime and pool during the burst.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReconcileLoad {
    /// Live subscriptions (and node users) each pass compares.
    pub subscriptions: usize,
    /// Wall time of each pass that ended, seconds (the last one may end after the burst).
    pub pass_seconds: Vec<f64>,
    /// Outcome of each pass (`ok`, `guard_tripped`, ... or `error`).
    pub outcomes: Vec<String>,
    /// True when a pass was running from the first poll to the last handler's end.
    pub covered_burst: bool,
}

fn pct(v: &mut [f64]) -> [f64; 3] {
    if v.is_empty() {
        return [0.0; 3];
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    [at(0.5), at(0.99), v[v.len() - 1]]
}

/// Runs the burst: `users` simulated users each send one update at once (a mix of `/start`,
/// `/status`, `/help` and `/trial`, the last issuing a key on the node and a QR code), against
/// a fresh database created on the server of `admin_url` (dropped afterwards).
///
/// # Errors
/// A message when the database cannot be prepared or the burst does not finish in 120 s.
pub async fn bench_updates(admin_url: &str, shape: Burst) -> Result<BotBenchReport, String> {
    let db_name = format!("vpnbot_bench_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db_name}"
        )))
        .await;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .await
        .map_err(|e| format!("create database: {e}"))?;
    let mut url = url::Url::parse(admin_url).map_err(|e| e.to_string())?;
    url.set_path(&db_name);
    let res = run(url.as_str(), shape).await;
    let _ = admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
        )))
        .await;
    res
}

async fn run(db_url: &str, shape: Burst) -> Result<BotBenchReport, String> {
    let peers = peer_runtime()?;
    let started_peers = peers
        .spawn(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let sim = BotApiSim::start(l, BotApiSimOptions::default());
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let node = SimNode::start(l, SimNodeOptions::default());
            Ok::<_, std::io::Error>((sim, node))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string());
    let res = match started_peers {
        Ok((sim, node)) => run_with(db_url, shape, &sim, &node).await,
        Err(e) => Err(e),
    };
    peers.shutdown_background();
    res
}

async fn run_with(
    db_url: &str,
    shape: Burst,
    sim: &vpnbot_sim::botapi::BotApiSimHandle,
    node: &vpnbot_sim::node::SimNodeHandle,
) -> Result<BotBenchReport, String> {
    let mut cfg = Config::default();
    cfg.db.url = SecretString::from(db_url.to_string());
    cfg.nodes.insert(
        "a".into(),
        vpnbot::config::NodeConfig::new(&node.base_url(), node.api_key(), "a.example"),
    );
    let registry = vpnbot::metrics::new_registry();
    let pool = DbPool::connect(&cfg.db, &registry).map_err(|e| e.to_string())?;
    vpnbot::db::migrate(&pool)
        .await
        .map_err(|e| e.to_string())?;
    let fleet = Fleet::from_config(&cfg, &registry).map_err(|(n, e)| format!("{n}: {e}"))?;
    let res = burst(&cfg, &registry, &pool, fleet, sim, shape).await;
    pool.close().await;
    res
}

/// Runs the burst `shape` while reconcile passes over `subscriptions` live
/// subscriptions and node users run back to back on this runtime and on the same pool, as on
/// a production leader. The node is simulated in a child process (the binary must call
/// [`crate::bench::reconcile::maybe_run_sim_child`] first), the Bot API stand-in on its own
/// thread; a scratch database on the server of `server_url` is created and dropped.
///
/// # Errors
/// Setup failures, or a burst that does not finish in 120 s, as text.
pub async fn bench_updates_during_reconcile(
    server_url: &str,
    shape: Burst,
    subscriptions: usize,
) -> Result<BotBenchReport, String> {
    let fx = crate::bench::reconcile::ReconcileFixture::prepare(server_url, subscriptions).await?;
    let peers = peer_runtime()?;
    let sim = peers
        .spawn(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            Ok::<_, std::io::Error>(BotApiSim::start(l, BotApiSimOptions::default()))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string());
    let res = match sim {
        Ok(sim) => {
            let stop = tokio_util::sync::CancellationToken::new();
            let passes = {
                let (rec, stop) = (fx.reconciler.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    while !stop.is_cancelled() {
                        let t = Instant::now();
                        let r = rec
                            .reconcile_once(&vpnbot::reconcile::RunOptions::default())
                            .await;
                        let outcome = match r {
                            Ok(rep) => rep
                                .nodes
                                .first()
                                .map(|n| n.outcome.as_str().to_string())
                                .unwrap_or_default(),
                            Err(_) => "error".to_string(),
                        };
                        done.push((t, Instant::now(), outcome));
                    }
                    done
                })
            };
            // Let the first pass get into its snapshot before the burst starts.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let burst_from = Instant::now();
            let res = burst(
                &fx.config,
                &fx.registry,
                &fx.pool,
                fx.fleet.clone(),
                &sim,
                shape,
            )
            .await;
            let burst_to = Instant::now();
            stop.cancel();
            let done = passes.await.map_err(|e| e.to_string())?;
            // Passes run back to back, so coverage means: the first started before the burst
            // and the last ended after it.
            let covered = done.first().is_some_and(|p| p.0 <= burst_from)
                && done.last().is_some_and(|p| p.1 >= burst_to);
            res.map(|mut r| {
                r.reconcile = Some(ReconcileLoad {
                    subscriptions,
                    pass_seconds: done
                        .iter()
                        .map(|p| p.1.duration_since(p.0).as_secs_f64())
                        .collect(),
                    outcomes: done.into_iter().map(|p| p.2).collect(),
                    covered_burst: covered,
                });
                r
            })
        }
        Err(e) => Err(e),
    };
    peers.shutdown_background();
    fx.teardown().await;
    res
}

/// The stand-in and simulators play remote peers: they run on their own runtime (one OS
/// thread) so the measured runtime holds only vpnbot's work, as in production.
fn peer_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-peers")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// The burst itself against a prepared database (`pool`) and `fleet`.
async fn burst(
    base: &Config,
    registry: &prometheus::Registry,
    pool: &DbPool,
    fleet: Fleet,
    sim: &vpnbot_sim::botapi::BotApiSimHandle,
    shape: Burst,
) -> Result<BotBenchReport, String> {
    let users = shape.users;
    let mut cfg = base.clone();
    if let Some(c) = shape.concurrency {
        cfg.bot.max_concurrent_updates = c;
    }
    cfg.telegram.token = SecretString::from(sim.token().to_string());
    cfg.telegram.api_url = sim.api_url();
    let api = BotApi::new(&cfg.telegram, &cfg.bot, BotMetrics::register(registry))
        .map_err(|e| e.to_string())?;
    let bot = BotService::new(
        api.clone(),
        pool.clone(),
        fleet,
        vpnbot::bot::BotDeps {
            nodes: vpnbot::bot::public_nodes(&cfg.nodes),
            admin_ids: cfg.telegram.admin_ids.clone(),
            registry: Some(registry.clone()),
            ..Default::default()
        },
    );

    for i in 0..users {
        // Ids above any the reconcile fixture gives its subscription owners: new users.
        let u = SimUser::new(
            FIRST_USER_ID + i as i64,
            if i % 2 == 0 { "en" } else { "ru" },
        );
        let cmd = COMMANDS[i % 4];
        sim.send_text(&u, cmd);
    }

    // Read before the lag probe starts: walking /proc takes a few milliseconds of a worker.
    let cpu_before = cpu_by_thread();
    // Scheduler lag probe: a 1 ms ticker on the same runtime.
    let lag_probe = diagnostics::lateness::LatenessProbe::start(Duration::from_millis(1));

    // The production receive loop: long polling, the two lanes, the handlers' own timing.
    let concurrency = cfg.bot.max_concurrent_updates;
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let receive = tokio::spawn(bot.run(cancel.clone()));
    loop {
        let handled: u64 = handler_histograms(registry)
            .iter()
            .map(|(_, h)| h.get_sample_count())
            .sum();
        if handled >= users as u64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            cancel.cancel();
            let _ = receive.await;
            return Err(format!(
                "only {handled} of {users} updates handled in 120 s"
            ));
        }
        // Gathering the registry costs about 0.2 ms here: every 2 ms it took a tenth of a
        // core from the process being measured (seen in schedstat), so the end of the burst
        // is read to within 20 ms instead.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed().as_secs_f64();

    cancel.cancel();
    let _ = receive.await;
    let mut lag: Vec<f64> = lag_probe
        .finish()
        .await
        .into_iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let cpu_seconds = cpu_since(&cpu_before, &cpu_by_thread());
    let hists = handler_histograms(registry);
    let mut by_command = std::collections::BTreeMap::new();
    for cmd in COMMANDS {
        let label = cmd.trim_start_matches('/');
        let own: Vec<_> = hists
            .iter()
            .filter(|(l, _)| l == label)
            .map(|(_, h)| h.clone())
            .collect();
        by_command.insert(cmd, hist_pct(&own));
    }
    let all: Vec<_> = hists.into_iter().map(|(_, h)| h).collect();
    Ok(BotBenchReport {
        updates: users,
        wall_seconds: wall,
        handler_ms: hist_pct(&all),
        handler_ms_by_command: by_command,
        scheduler_lag_ms: pct(&mut lag),
        cpu_seconds,
        sent: sim.sent().len(),
        concurrency,
        reconcile: None,
    })
}

/// One thread's reading: its group (see [`BotBenchReport::cpu_seconds`]), nanoseconds on a
/// CPU and runnable waiting for one (the first two fields of Linux's
/// `/proc/<pid>/task/<tid>/schedstat`).
type ThreadCpu = (&'static str, u64, u64);

/// Every relevant thread's reading, keyed by `(pid, tid)`: this process's, its children's (the
/// node simulator is this binary re-executed) and every `postgres` process's. Empty where
/// `/proc` cannot be read.
fn cpu_by_thread() -> std::collections::HashMap<(u32, u32), ThreadCpu> {
    let mut out = std::collections::HashMap::new();
    let me = std::process::id();
    let my_comm = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`: comm may hold spaces, so split after its last `)`.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let ppid = tail
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok());
        let process_group = if pid == me {
            None
        } else if ppid == Some(me) && comm == my_comm.trim_end() {
            Some("node_simulator")
        } else if ppid == Some(me) {
            Some("other")
        } else if comm.starts_with("postgres") {
            Some("postgresql")
        } else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(tid) = t.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let group = process_group.unwrap_or_else(|| {
                let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                if name.contains("-wrk") {
                    "workers"
                } else if name.contains("-blk") {
                    "blocking"
                } else if name.starts_with("bench-peers") {
                    "bot_api_stand_in"
                } else {
                    "other"
                }
            });
            let Ok(sched) = std::fs::read_to_string(t.path().join("schedstat")) else {
                continue;
            };
            let mut f = sched
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            let run = f.next().unwrap_or(0);
            let wait = f.next().unwrap_or(0);
            out.insert((pid, tid), (group, run, wait));
        }
    }
    out
}

/// Seconds on a CPU and waiting for one between two readings, summed by group, thread by
/// thread: a thread absent from `before` started in between and counts from zero; one absent
/// from `after` ended in between and its last interval is not seen (an undercount).
fn cpu_since(
    before: &std::collections::HashMap<(u32, u32), ThreadCpu>,
    after: &std::collections::HashMap<(u32, u32), ThreadCpu>,
) -> std::collections::BTreeMap<&'static str, (f64, f64)> {
    let mut out = std::collections::BTreeMap::new();
    for (key, (group, run, wait)) in after {
        let (_, run0, wait0) = before.get(key).copied().unwrap_or((group, 0, 0));
        let e: &mut (f64, f64) = out.entry(*group).or_default();
        e.0 += run.saturating_sub(run0) as f64 / 1e9;
        e.1 += wait.saturating_sub(wait0) as f64 / 1e9;
    }
    out
}

/// `vpnbot_bot_handler_duration_seconds` by its `handler` label.
fn handler_histograms(
    registry: &prometheus::Registry,
) -> Vec<(String, prometheus::proto::Histogram)> {
    registry
        .gather()
        .into_iter()
        .filter(|f| f.name() == "vpnbot_bot_handler_duration_seconds")
        .flat_map(|f| f.get_metric().to_vec())
        .map(|m| {
            let label = m
                .get_label()
                .iter()
                .find(|l| l.name() == "handler")
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            (label, m.get_histogram().clone())
        })
        .collect()
}

/// p50, p99 and the upper bound of the highest non-empty bucket, milliseconds, of the merged
/// histograms `hs`: linear within a bucket, as Prometheus' `histogram_quantile` (so p99 is
/// accurate to the bucket: 50–100 ms, 100–250 ms, ...).
fn hist_pct(hs: &[prometheus::proto::Histogram]) -> [f64; 3] {
    let mut bounds: Vec<(f64, u64)> = Vec::new();
    let mut total = 0u64;
    for h in hs {
        total += h.get_sample_count();
        for (i, b) in h.get_bucket().iter().enumerate() {
            if bounds.len() <= i {
                bounds.push((b.upper_bound(), 0));
            }
            bounds[i].1 += b.cumulative_count();
        }
    }
    if total == 0 {
        return [0.0; 3];
    }
    let q = |q: f64| {
        let rank = q * total as f64;
        let mut prev = (0.0, 0u64);
        for &(ub, c) in &bounds {
            if c as f64 >= rank {
                let in_bucket = (c - prev.1).max(1) as f64;
                return (prev.0 + (ub - prev.0) * (rank - prev.1 as f64) / in_bucket) * 1e3;
            }
            prev = (ub, c);
        }
        prev.0 * 1e3
    };
    let max = bounds
        .iter()
        .find(|(_, c)| *c >= total)
        .map(|(ub, _)| ub * 1e3)
        .unwrap_or(f64::INFINITY);
    [q(0.5), q(0.99), max]
}
