//! Benchmark: a burst of updates from distinct simulated users through the real pieces (Bot API
//! stand-in over loopback HTTP, teloxide client, PostgreSQL, node simulator), handled with the
//! bot's concurrency bound. Reports handler latency percentiles and the main runtime's
//! scheduler lag measured alongside (a 1 ms ticker's overshoot).
//!
//! The owner wires it into `vpnbot bench`; `examples/bench_bot.rs` runs it directly.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use sqlx::{Connection, Executor};
use teloxide::payloads::GetUpdatesSetters;
use teloxide::prelude::Requester;
use tokio::sync::Semaphore;

use super::{BotApi, BotMetrics, BotService};
use crate::config::Config;
use crate::db::DbPool;
use crate::fleet::Fleet;
use crate::sim::botapi::{BotApiSim, BotApiSimOptions, SimUser};
use crate::sim::node::{SimNode, SimNodeOptions};

/// Figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BotBenchReport {
    /// Updates injected (one per user).
    pub updates: usize,
    /// Wall time from the first poll to the last handler's end, seconds.
    pub wall_seconds: f64,
    /// Handler latency percentiles, milliseconds: p50, p99, max.
    pub handler_ms: [f64; 3],
    /// Scheduler lag percentiles (1 ms ticker overshoot), milliseconds: p50, p99, max.
    pub scheduler_lag_ms: [f64; 3],
    /// Messages the stand-in received from the bot.
    pub sent: usize,
    /// Concurrency bound used (`bot.max_concurrent_updates`).
    pub concurrency: usize,
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
pub async fn bench_updates(admin_url: &str, users: usize) -> Result<BotBenchReport, String> {
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
    let res = run(url.as_str(), users).await;
    let _ = admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
        )))
        .await;
    res
}

async fn run(db_url: &str, users: usize) -> Result<BotBenchReport, String> {
    // The stand-in and the node simulator play remote peers: they run on their own runtime
    // (one OS thread) so the measured runtime holds only the bot, as in production.
    let peers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-peers")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
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
        Ok((sim, node)) => run_with(db_url, users, &sim, &node).await,
        Err(e) => Err(e),
    };
    peers.shutdown_background();
    res
}

async fn run_with(
    db_url: &str,
    users: usize,
    sim: &crate::sim::botapi::BotApiSimHandle,
    node: &crate::sim::node::SimNodeHandle,
) -> Result<BotBenchReport, String> {
    let mut cfg = Config::default();
    cfg.db.url = SecretString::from(db_url.to_string());
    cfg.db.max_connections = 15;
    cfg.telegram.token = SecretString::from(sim.token().to_string());
    cfg.telegram.api_url = sim.api_url();
    cfg.nodes.insert("a".into(), node.node_config("a.example"));
    let registry = crate::metrics::new_registry();
    let pool = DbPool::connect(&cfg.db, &registry).map_err(|e| e.to_string())?;
    crate::db::migrate(&pool).await.map_err(|e| e.to_string())?;
    let fleet = Fleet::from_config(&cfg, &registry).map_err(|(n, e)| format!("{n}: {e}"))?;
    let api = BotApi::new(&cfg.telegram, &cfg.bot, BotMetrics::register(&registry))?;
    let bot = BotService::new(api.clone(), pool.clone(), fleet, &cfg, None, None);

    for i in 0..users {
        let u = SimUser::new(100_000 + i as i64, if i % 2 == 0 { "en" } else { "ru" });
        let cmd = ["/start", "/status", "/help", "/trial"][i % 4];
        sim.send_text(&u, cmd);
    }

    // Scheduler lag probe: a 1 ms ticker on the same runtime.
    let lag_probe = crate::diagnostics::lateness::LatenessProbe::start(Duration::from_millis(1));

    // The receive loop's dispatch, timed per handler.
    let concurrency = cfg.bot.max_concurrent_updates;
    let sem = Arc::new(Semaphore::new(concurrency));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::with_capacity(users)));
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
            handlers.spawn(async move {
                let t = Instant::now();
                bot.handle_update(u).await;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                lat.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
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
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    pool.close().await;
    Ok(BotBenchReport {
        updates: users,
        wall_seconds: wall,
        handler_ms: pct(&mut lat),
        scheduler_lag_ms: pct(&mut lag),
        sent: sim.sent().len(),
        concurrency,
    })
}

use super::api;
