//! `vpnbot-node --config node.toml`: the node agent. Exit codes: 0 stopped by a signal,
//! 64 bad configuration (every problem listed), 70 failed to start.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// vpnbot's node agent: serves the node API in front of a V2Ray/Xray core.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Path of the TOML config; every key can be overridden with VBNODE_<KEY>.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VBNODE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cfg = match vpnbot_node::Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!(
                "vpnbot-node: invalid configuration ({} problems):",
                problems.len()
            );
            for p in problems {
                eprintln!("  - {p}");
            }
            return ExitCode::from(64);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let listener = match std::net::TcpListener::bind(cfg.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("vpnbot-node: cannot listen on {}: {e}", cfg.listen);
                return ExitCode::from(70);
            }
        };
        let running = match vpnbot_node::start(&cfg, listener).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("vpnbot-node: {e}");
                return ExitCode::from(70);
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("vpnbot-node stopping");
        running.stop().await;
        ExitCode::SUCCESS
    })
}
