//! Burst benchmark of the bot (issue: "a burst of 1,000 updates from 1,000 simulated users
//! while a reconcile pass over a million users runs"):
//! `DATABASE_URL=postgres://... cargo run --release --example bench_bot -- [--users N]
//! [--subscriptions M] 2>/dev/null` (the process logs as `vpnbot run` does, on stderr). Prints handler latency and scheduler lag percentiles, and the reconcile
//! passes that ran during the burst. `--subscriptions 0` measures the burst alone.

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Updates in the burst, one per simulated user.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Live subscriptions (and node users) reconciled back to back during the burst; 0 = none.
    #[arg(long, default_value_t = 1_000_000)]
    subscriptions: usize,
    /// Handlers at once (default: `bot.max_concurrent_updates`).
    #[arg(long)]
    concurrency: Option<usize>,
}

fn main() {
    // Re-executed as the node simulator child of the reconcile load: serve and exit.
    vpnbot_devtools::bench::reconcile::maybe_run_sim_child();
    let args = Args::parse();
    let url =
        std::env::var("DATABASE_URL").expect("DATABASE_URL (e.g. from scripts/ensure-postgres.sh)");
    // Instrumented exactly as `vpnbot run` is: the subscriber (log layer at the default
    // filter, to stderr; the open-span layer), the hooked main runtime, watchdog and probes.
    let instruments = vpnbot::app::Instruments::install(&vpnbot::config::Config::default());
    let rt = vpnbot::runtime::build_main_runtime(None, &instruments.diagnostics).expect("runtime");
    let tasks = vpnbot::tasks::Tasks::new();
    instruments
        .diagnostics
        .start(rt.handle(), &tasks, instruments.progress_sink());
    println!(
        "bench bot: BotService::run on the main runtime from build_main_runtime (diagnostics' \
         hooks, watchdog, lag probe) with the subscriber of Instruments::install (default \
         config; logs on stderr)"
    );
    let shape = vpnbot_devtools::bench::bot::Burst {
        users: args.users,
        concurrency: args.concurrency,
    };
    let res = rt.block_on(async {
        if args.subscriptions == 0 {
            vpnbot_devtools::bench::bot::bench_updates(&url, shape).await
        } else {
            vpnbot_devtools::bench::bot::bench_updates_during_reconcile(
                &url,
                shape,
                args.subscriptions,
            )
            .await
        }
    });
    match res {
        Ok(r) => {
            println!(
                "bot burst: {} updates from {} users in {:.2} s (concurrency {}), {} messages sent",
                r.updates, r.updates, r.wall_seconds, r.concurrency, r.sent
            );
            println!(
                "handler latency ms: p50 {:.2}  p99 {:.2}  max {:.2}   (target p99 < 100)",
                r.handler_ms[0], r.handler_ms[1], r.handler_ms[2]
            );
            for (cmd, p) in &r.handler_ms_by_command {
                println!(
                    "  {cmd:<8} ms: p50 {:.2}  p99 {:.2}  max {:.2}",
                    p[0], p[1], p[2]
                );
            }
            println!(
                "scheduler lag ms:   p50 {:.3}  p99 {:.3}  max {:.3}   (target p99 < 10)",
                r.scheduler_lag_ms[0], r.scheduler_lag_ms[1], r.scheduler_lag_ms[2]
            );
            match &r.reconcile {
                Some(l) => println!(
                    "reconcile during the burst: {} subscriptions, passes {:?} s, outcomes {:?}, \
                     covered the whole burst: {}",
                    l.subscriptions,
                    l.pass_seconds
                        .iter()
                        .map(|s| (s * 100.0).round() / 100.0)
                        .collect::<Vec<_>>(),
                    l.outcomes,
                    l.covered_burst
                ),
                None => println!("reconcile during the burst: none"),
            }
            let ok = r.handler_ms[1] < 100.0 && r.scheduler_lag_ms[1] < 10.0;
            println!(
                "target handler p99 < 100 ms and scheduler lag p99 < 10 ms: {}",
                if ok { "met" } else { "MISSED" }
            );
            if !ok {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
