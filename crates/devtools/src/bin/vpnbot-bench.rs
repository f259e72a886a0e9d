//! `vpnbot-bench NAME`: one benchmark of the production path (see `vpnbot_devtools::bench`).

use clap::Parser;

/// Runs one benchmark and prints its figures with their spread; exits 1 when it misses its
/// target.
#[derive(Debug, Parser)]
#[command(name = "vpnbot-bench", version)]
struct Cli {
    #[command(flatten)]
    args: vpnbot_devtools::bench::BenchArgs,
}

fn main() -> std::process::ExitCode {
    diagnostics::stack::maybe_run_child();
    vpnbot_devtools::bench::reconcile::maybe_run_sim_child();
    vpnbot_devtools::bench::main(Cli::parse().args)
}
