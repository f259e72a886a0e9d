//! `vpnbot-demo`: the system end to end in one command, with everything the machine lacks
//! started locally. It runs the same [`App`] as `run`.
//!
//! Current scope: PostgreSQL (from `DATABASE_URL` or a throwaway cluster), the instance with
//! its observability server, migrations, readiness probe and leadership; it checks what an
//! operator would check (`/healthz`, `/readyz`, `/metrics`) and prints a report. The fault
//! timeline of the demo issue grows here as the node simulator, bot stand-in and watchdog land.

pub mod postgres;
pub mod report;
pub mod scenario;

use std::sync::Arc;

use vpnbot_sim::botapi::SimUser;
use vpnbot_sim::node::{SimNode, SimNodeHandle, SimNodeOptions};

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use vpnbot::app::App;
use vpnbot::config::Config;

/// Options of `vpnbot-demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Leave everything running after the report (Ctrl-C stops it), with the observability
    /// server on the configured fixed address for Prometheus and tokio-console.
    #[arg(long)]
    pub keep_running: bool,
    /// Run a clean day: no injected faults (only the `normal` step).
    #[arg(long)]
    pub no_faults: bool,
    /// Steps to run, comma-separated (default: all): normal, old_freeze, blocked_worker,
    /// pool_pressure, recovery. They run in timeline order; `normal` always runs first.
    #[arg(long, value_delimiter = ',')]
    pub scenario: Vec<String>,
}

/// Every step, in timeline order.
pub const STEPS: [&str; 5] = [
    "normal",
    "old_freeze",
    "blocked_worker",
    "pool_pressure",
    "recovery",
];

impl DemoArgs {
    /// The steps to run, in timeline order.
    fn steps(&self) -> Vec<String> {
        if self.no_faults {
            return vec!["normal".into()];
        }
        if self.scenario.is_empty() {
            return STEPS.iter().map(|s| s.to_string()).collect();
        }
        // `normal` always runs first: it creates the users and subscriptions the other steps
        // reconcile against (without them the reconcile guard rightly refuses to act).
        STEPS
            .iter()
            .filter(|s| **s == "normal" || self.scenario.iter().any(|x| x == *s))
            .map(|s| s.to_string())
            .collect()
    }
}

/// One expectation of the demo and whether it held.
#[derive(Debug)]
struct Check {
    what: String,
    ok: bool,
    detail: String,
}

/// Runs the demo; exit code 0 only when every expectation held.
pub fn main(config_path: Option<&Path>, args: DemoArgs) -> ExitCode {
    // Arguments first: a typo must not cost a PostgreSQL start.
    if let Some(bad) = args.scenario.iter().find(|s| !STEPS.contains(&s.as_str())) {
        eprintln!("demo: unknown step {bad:?}; steps: {}", STEPS.join(", "));
        return ExitCode::from(vpnbot::config::EXIT_CONFIG as u8);
    }
    // The user's configuration (file and VPNBOT_<SECTION>__<KEY>) applies; the demo only
    // brings the database when none is configured, and fills values left at their defaults
    // with demo settings (see `demo_settings`). A bad configuration stops it, as it would `run`.
    const NO_DB_YET: &str = "postgres://demo-brings-its-own-database/";
    let mut cfg = match Config::load_with_fallback_db_url(config_path, NO_DB_YET) {
        Ok(c) => c,
        Err(e) => {
            eprint!("demo: {e}");
            return ExitCode::from(vpnbot::config::EXIT_CONFIG as u8);
        }
    };
    let configured_db = cfg.db.url.expose_secret() != NO_DB_YET;
    let _pg = match configured_db {
        true => {
            println!("demo: using the configured PostgreSQL (db.url or DATABASE_URL)");
            None
        }
        false => match postgres::EmbeddedPostgres::start() {
            Ok(pg) => {
                println!(
                    "demo: started a throwaway PostgreSQL cluster at {}",
                    pg.url()
                );
                cfg.db.url = SecretString::from(pg.url());
                Some(pg)
            }
            Err(e) => {
                eprintln!("demo: {e}");
                return ExitCode::from(69);
            }
        },
    };
    if !args.keep_running {
        // A one-shot run must not collide with a running instance's port.
        cfg.observability.listen = "127.0.0.1:0".parse().unwrap();
    }
    let filled = demo_settings(&mut cfg);
    if !filled.is_empty() {
        println!(
            "demo: settings left at their defaults set for the demo's timings: {}",
            filled.join(", ")
        );
    }
    let instruments = vpnbot::app::Instruments::install(&cfg);
    let rt = vpnbot::cli::build_main_runtime(&cfg, &instruments);
    // Like every command: an unreachable or refusing database is exit 69 with its cause.
    if let Err(e) = rt.block_on(vpnbot::db::connect::preflight(&cfg.db)) {
        rt.shutdown_timeout(Duration::from_secs(1));
        instruments.shutdown();
        return vpnbot::cli::fail(&e, e.exit_code());
    }
    // Two simulated nodes, seeded with users (80 % carry vpnbot's ownership marker).
    let sims = rt.block_on(async {
        let start = |seed| async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            SimNode::start(
                l,
                SimNodeOptions {
                    // 300 users; about 2 % carry vpnbot's marker with no subscription behind
                    // them (orphans for reconcile to remove), the rest are an operator's.
                    users: 300,
                    owned_share: 0.02,
                    seed,
                    ..Default::default()
                },
            )
        };
        (start(1).await, start(2).await)
    });
    // The Bot API stand-in: vpnbot's bot talks to it exactly as it would to Telegram.
    let telegram = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        vpnbot_sim::botapi::BotApiSim::start(l, Default::default())
    });
    println!("demo: Bot API stand-in at {}", telegram.api_url());
    cfg.telegram.token = SecretString::from(telegram.token().to_string());
    cfg.telegram.api_url = telegram.api_url();
    cfg.telegram.admin_ids = vec![1];
    for (name, sim) in [("a", &sims.0), ("b", &sims.1)] {
        println!("demo: simulated node {name} at {}", sim.base_url());
        cfg.nodes.insert(
            name.into(),
            vpnbot::config::NodeConfig::new(
                &sim.base_url(),
                sim.api_key(),
                &format!("{name}.vpn.example"),
            ),
        );
    }
    let ok = rt.block_on(scenario(cfg, args, &instruments, sims, Arc::new(telegram)));
    rt.shutdown_timeout(Duration::from_secs(5));
    instruments.shutdown();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn scenario(
    cfg: Config,
    args: DemoArgs,
    instruments: &vpnbot::app::Instruments,
    sims: (SimNodeHandle, SimNodeHandle),
    telegram: Arc<vpnbot_sim::botapi::BotApiSimHandle>,
) -> bool {
    let started = Instant::now();
    let app = match App::start_with(cfg, instruments).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo: vpnbot failed to start: {e}");
            return false;
        }
    };
    let base = format!("http://{}", app.obs_addr());
    println!(
        "demo: vpnbot is up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("  metrics:  {base}/metrics");
    println!("  health:   {base}/healthz   readiness: {base}/readyz");
    println!("  dump:     {base}/debug/dump   (a fresh one: {base}/debug/dump?now=1)");
    if app.config.diagnostics.console_enabled {
        println!(
            "  console:  tokio-console http://{}",
            app.config.diagnostics.console_listen
        );
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");

    let mut setup = Vec::new();
    let t = Instant::now();
    let became_leader = wait_for(Duration::from_secs(15), || app.leader.is_leader()).await;
    setup.push(Check {
        what: "instance takes leadership".into(),
        ok: became_leader,
        detail: format!("after {:.1} s", t.elapsed().as_secs_f64()),
    });
    let ready = wait_for_http(&http, &format!("{base}/readyz"), Duration::from_secs(15)).await;
    setup.push(Check {
        what: "/readyz reports a writable database".into(),
        ok: ready.is_ok(),
        detail: ready.unwrap_or_else(|e| e),
    });

    // A few dozen simulated customers, English and Russian, and ten who keep asking /status.
    let customers: Vec<SimUser> = (0..30)
        .map(|i| SimUser::new(100 + i, if i % 2 == 0 { "en" } else { "ru" }))
        .collect();
    let askers: Vec<SimUser> = (0..10).map(|i| SimUser::new(1000 + i, "en")).collect();
    let users = scenario::UserProbe::start(telegram.clone(), askers);
    let stage = scenario::Stage {
        app: &app,
        node_a: &sims.0,
        node_b: &sims.1,
        obs: base.clone(),
        http: http.clone(),
        users: users.clone(),
        telegram: telegram.clone(),
    };
    let steps = args.steps();
    let mut reports = Vec::new();
    for step in &steps {
        println!("demo: step {step} ...");
        let r = match step.as_str() {
            "normal" => scenario::normal(&stage, &customers).await,
            "old_freeze" => scenario::old_freeze(&stage).await,
            "blocked_worker" => scenario::blocked_worker(&stage).await,
            "pool_pressure" => scenario::pool_pressure(&stage).await,
            "recovery" => scenario::recovery(&stage).await,
            _ => unreachable!("validated by DemoArgs::steps"),
        };
        reports.push(r);
    }
    users.stop();

    println!("\ndemo report");
    let mut all = true;
    for c in &setup {
        all &= c.ok;
        println!(
            "[{}] {} ({})",
            if c.ok { "ok" } else { "FAILED" },
            c.what,
            c.detail
        );
    }
    for r in &reports {
        all &= r.ok();
        r.print();
    }
    let dump_dir = std::fs::canonicalize(&app.config.diagnostics.dump_dir)
        .unwrap_or_else(|_| app.config.diagnostics.dump_dir.clone());
    if args.keep_running {
        println!(
            "dumps: {} (latest also at {base}/debug/dump)",
            dump_dir.display()
        );
    } else {
        // The observability server stops with the demo: point only at what stays.
        println!("dumps: {}", dump_dir.display());
    }
    println!(
        "demo: {} in {:.1} s",
        if all {
            "every expectation held"
        } else {
            "some expectations FAILED"
        },
        started.elapsed().as_secs_f64()
    );
    if args.keep_running {
        println!("demo: --keep-running: everything stays up; Ctrl-C to stop");
        app.run_until_signal().await;
    } else {
        app.shutdown().await;
    }
    drop(sims);
    all
}

/// Short timings so the whole timeline takes well under two minutes.
/// Sets the demo's timings on every value the user left at its default, and returns the keys
/// it set (`key=value`), so the report can say what it chose. Explicit settings are kept.
fn demo_settings(cfg: &mut Config) -> Vec<String> {
    let d = Config::default();
    let mut filled = Vec::new();
    macro_rules! fill {
        ($($path:ident).+ = $value:expr) => {
            if cfg.$($path).+ == d.$($path).+ {
                cfg.$($path).+ = $value;
                filled.push(format!("{}={:?}", stringify!($($path).+), cfg.$($path).+));
            }
        };
    }
    // The report is the demo's output: logs show warnings and errors only (RUST_LOG overrides),
    // without the full dump JSON (its verdict is in the report, the files in ./dumps).
    fill!(observability.log_filter = "warn,sqlx=error,diagnostics::watchdog=off".into());
    fill!(db.max_connections = 5);
    fill!(db.min_connections = 1);
    fill!(db.acquire_timeout_seconds = Duration::from_secs(2));
    fill!(node_client.connect_timeout_seconds = Duration::from_secs(1));
    fill!(node_client.headers_timeout_seconds = Duration::from_secs(2));
    fill!(node_client.body_idle_timeout_seconds = Duration::from_secs(2));
    fill!(node_client.total_deadline_seconds = Duration::from_secs(4));
    fill!(diagnostics.pool_starved_seconds = Duration::from_secs(1));
    fill!(diagnostics.dump_min_interval_seconds = Duration::from_secs(1));
    fill!(diagnostics.console_enabled = true);
    fill!(leader.takeover_delay_seconds = Duration::from_millis(2500));
    filled
}

async fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

async fn wait_for_http(
    http: &reqwest::Client,
    url: &str,
    limit: Duration,
) -> Result<String, String> {
    let end = Instant::now() + limit;
    loop {
        let r = get(http, url).await;
        match r {
            Ok((200, body)) => return Ok(body.trim().to_string()),
            _ if Instant::now() < end => tokio::time::sleep(Duration::from_millis(200)).await,
            other => return Err(format!("{other:?}")),
        }
    }
}

async fn get(http: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let resp = http.get(url).send().await.map_err(|e| e.to_string())?;
    let code = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    Ok((code, body))
}
