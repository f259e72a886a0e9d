//! `vpnbot demo`: the system end to end in one command, with everything the machine lacks
//! started locally. It runs the same [`App`] as `run`.
//!
//! Current scope: PostgreSQL (from `DATABASE_URL` or a throwaway cluster), the instance with
//! its observability server, migrations, readiness probe and leadership; it checks what an
//! operator would check (`/healthz`, `/readyz`, `/metrics`) and prints a report. The fault
//! timeline of the demo issue grows here as the node simulator, bot stand-in and watchdog land.

pub mod postgres;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use secrecy::SecretString;

use crate::app::App;
use crate::config::Config;

/// Options of `vpnbot demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Leave everything running after the report (Ctrl-C stops it), with the observability
    /// server on the configured fixed address for Prometheus and tokio-console.
    #[arg(long)]
    pub keep_running: bool,
    /// Run a clean day: no injected faults.
    #[arg(long)]
    pub no_faults: bool,
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
    // The demo builds its own config: the file and VPNBOT_* still apply, missing values are
    // filled with demo settings.
    let mut cfg = Config::load(config_path).unwrap_or_else(|e| {
        if !e.0.iter().all(|m| m.starts_with("db.url")) {
            eprint!("demo: ignoring the configuration: {e}");
        }
        Config::default()
    });
    let _pg = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            println!("demo: using PostgreSQL from DATABASE_URL");
            cfg.db.url = SecretString::from(url);
            None
        }
        _ => match postgres::EmbeddedPostgres::start() {
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
        cfg.observability.listen = "127.0.0.1:0".into();
    }
    let instruments = crate::app::Instruments::install(&cfg);
    let rt = crate::cli::build_main_runtime(&cfg, &instruments);
    let ok = rt.block_on(scenario(cfg, args, &instruments));
    drop(rt);
    instruments.shutdown();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn scenario(cfg: Config, args: DemoArgs, instruments: &crate::app::Instruments) -> bool {
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
    println!("  dump:     {base}/debug/dump");

    let mut checks = Vec::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");

    let t = Instant::now();
    let became_leader = wait_for(Duration::from_secs(15), || app.leader.is_leader()).await;
    checks.push(Check {
        what: "instance takes leadership".into(),
        ok: became_leader,
        detail: format!("after {:.1} s", t.elapsed().as_secs_f64()),
    });
    let ready = wait_for_http(&http, &format!("{base}/readyz"), Duration::from_secs(15)).await;
    checks.push(Check {
        what: "/readyz reports a writable database".into(),
        ok: ready.is_ok(),
        detail: ready.unwrap_or_else(|e| e),
    });
    let health = get(&http, &format!("{base}/healthz")).await;
    checks.push(Check {
        what: "/healthz answers ok".into(),
        ok: matches!(&health, Ok((200, _))),
        detail: format!("{health:?}"),
    });
    match get(&http, &format!("{base}/metrics")).await {
        Ok((200, body)) => {
            for family in [
                "vpnbot_build_info",
                "vpnbot_leader",
                "vpnbot_db_pool_acquire_wait_seconds",
                "vpnbot_db_pool_hold_seconds",
                "vpnbot_db_pool_connections",
                "vpnbot_db_pool_max_connections",
                "vpnbot_db_pool_pending_acquires",
            ] {
                checks.push(Check {
                    what: format!("/metrics exports {family}"),
                    ok: body.contains(&format!("\n{family}")),
                    detail: String::new(),
                });
            }
        }
        other => checks.push(Check {
            what: "/metrics answers".into(),
            ok: false,
            detail: format!("{other:?}"),
        }),
    }
    if !args.no_faults {
        println!("demo: fault scenarios are not built yet (node simulator, bot stand-in and watchdog land with their issues)");
    }

    println!("\ndemo report");
    let mut all = true;
    for c in &checks {
        all &= c.ok;
        println!(
            "  [{}] {}{}",
            if c.ok { "ok" } else { "FAILED" },
            c.what,
            if c.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.detail)
            }
        );
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
        println!("demo: --keep-running: Ctrl-C to stop");
        app.run_until_signal().await;
    } else {
        app.shutdown().await;
    }
    all
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
