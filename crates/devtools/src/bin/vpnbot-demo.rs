//! `vpnbot-demo`: the whole system end to end on this machine (see `vpnbot_devtools::demo`).

use clap::Parser;

/// Runs vpnbot end to end: a throwaway PostgreSQL cluster (or the configured database),
/// simulated nodes and Telegram, injected faults, and a report; exits 0 only when every
/// expectation held.
#[derive(Debug, Parser)]
#[command(name = "vpnbot-demo", version)]
struct Cli {
    /// TOML config file, as for `vpnbot` (`VPNBOT_<SECTION>__<KEY>` variables override it).
    #[arg(long, env = "VPNBOT_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    args: vpnbot_devtools::demo::DemoArgs,
}

fn main() -> std::process::ExitCode {
    // Re-executed as the watchdog's native-stack helper: do that and exit.
    diagnostics::stack::maybe_run_child();
    let cli = Cli::parse();
    vpnbot_devtools::demo::main(cli.config.as_deref(), cli.args)
}
