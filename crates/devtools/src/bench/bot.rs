//! Benchmark: a burst of updates from distinct simulated users through the real pieces (Bot API
//! stand-in over loopback HTTP, teloxide client, PostgreSQL, node simulator), handled with the
//! bot's concurrency bound, optionally while reconcile passes over a million users run back to
//! back on the same runtime and pool (the scenario). Reports handler latency
//! percentiles and the runtime's scheduler lag measured alongside (a 1 ms ticker's overshoot).
//!
//! `examples/bench_bot.rs` runs it.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use sqlx::{Connection, Executor};
use teloxide::payloads::GetUpdatesSetters;
use teloxide::prelude::Requester;
use tokio::sync::Semaphore;

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

fn command_of(u: &teloxide::types::Update) -> &'static str {
    let text = match &u.kind {
        teloxide::types::UpdateKind::Message(m) => m.text().unwrap_or(""),
        _ => "",
    };
    COMMANDS.into_iter().find(|c| *c == text).unwrap_or("other")
}

/// Figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BotBenchReport {
    /// Updates injected (one per user).
    pub updates: usize,
    /// Wall time from the first poll to the last handler's end, seconds.
    pub wall_seconds: f64,
    /// Handler latency percentiles, milliseconds: p50, p99, max.
    pub handler_ms: [f64; 3],
    /// The same per command of the mix.
    pub handler_ms_by_command: std::collections::BTreeMap<&'static str, [f64; 3]>,
    /// Scheduler lag percentiles (1 ms ticker overshoot), milliseconds: p50, p99, max.
    pub scheduler_lag_ms: [f64; 3],
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
            ..Default::default()
        },
    );
    // As `run` does before its first poll.
    bot.warm().await.map_err(|e| e.to_string())?;

    for i in 0..users {
        // Ids above any the reconcile fixture gives its subscription owners: new users.
        let u = SimUser::new(
            FIRST_USER_ID + i as i64,
            if i % 2 == 0 { "en" } else { "ru" },
        );
        let cmd = COMMANDS[i % 4];
        sim.send_text(&u, cmd);
    }

    // Scheduler lag probe: a 1 ms ticker on the same runtime.
    let lag_probe = diagnostics::lateness::LatenessProbe::start(Duration::from_millis(1));

    // The receive loop's dispatch, timed per handler.
    let concurrency = cfg.bot.max_concurrent_updates;
    let sem = Arc::new(Semaphore::new(concurrency));
    let latencies = Arc::new(Mutex::new(Vec::<(&'static str, f64)>::with_capacity(users)));
    let mut handlers = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut offset = 0i32;
    let mut seen = 0usize;
    while seen < users {
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("only {seen} of {users} updates received in 120 s"));
        }
        let updates = api
            .poll_bot
            .get_updates()
            .offset(offset)
            .timeout(1)
            .limit(100)
            .into_future()
            .await
            .map_err(|e| api::classify(&e).1)?;
        for u in updates {
            offset = offset.max(i32::try_from(u.id.0).unwrap_or(i32::MAX).saturating_add(1));
            seen += 1;
            let permit = sem.clone().acquire_owned().await.expect("open semaphore");
            let (bot, lat) = (bot.clone(), latencies.clone());
            let cmd = command_of(&u);
            handlers.spawn(async move {
                let t = Instant::now();
                bot.handle_update(u).await;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                lat.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((cmd, ms));
                drop(permit);
            });
        }
    }
    while handlers.join_next().await.is_some() {}
    let wall = started.elapsed().as_secs_f64();
    let mut lag: Vec<f64> = lag_probe
        .finish()
        .await
        .into_iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let all = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    let mut by_command = std::collections::BTreeMap::new();
    for cmd in COMMANDS {
        let mut v: Vec<f64> = all.iter().filter(|x| x.0 == cmd).map(|x| x.1).collect();
        by_command.insert(cmd, pct(&mut v));
    }
    let mut lat: Vec<f64> = all.into_iter().map(|x| x.1).collect();
    Ok(BotBenchReport {
        updates: users,
        wall_seconds: wall,
        handler_ms: pct(&mut lat),
        handler_ms_by_command: by_command,
        scheduler_lag_ms: pct(&mut lag),
        sent: sim.sent().len(),
        concurrency,
        reconcile: None,
    })
}

use vpnbot::bot::api;
