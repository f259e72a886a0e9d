//! `vpnbot-sim`: the simulators as a command, for the demo, the compose stack's dry run and
//! operators rehearsing alerts. Never part of the production `vpnbot` binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Simulated peers of vpnbot: a VPN node API that misbehaves on demand, and a Telegram Bot API
/// stand-in.
#[derive(Debug, Parser)]
#[command(name = "vpnbot-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a simulated VPN node API (the contract in openapi/node-api.json) that can
    /// misbehave on demand.
    Node(vpnbot_sim::node::SimNodeArgs),
    /// Serve the Bot API stand-in: inject updates with `POST /_sim/updates`, read what the bot
    /// sent at `GET /_sim/sent`.
    Botapi(vpnbot_sim::botapi::SimBotapiArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vpnbot-sim")
        .build()
        .expect("runtime builds");
    let res = match cli.command {
        Command::Node(args) => rt.block_on(vpnbot_sim::node::run(args)),
        Command::Botapi(args) => rt.block_on(vpnbot_sim::botapi::run(args)),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
