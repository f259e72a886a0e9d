//! Burst benchmark of the bot (issue: "a burst of 1,000 updates from 1,000 simulated users
//! while a reconcile pass over a million users runs"):
//! `DATABASE_URL=postgres://... cargo run --release --example bench_bot -- [--users N]
//! [--subscriptions M] [--rounds N]`. Each round runs in a fresh process of this binary (which
//! logs as `vpnbot run` does, on stderr: captured, shown when the round fails) and prints handler latency and scheduler
//! lag percentiles, where the CPU went, and the reconcile passes that ran during the burst; the
//! parent prints min / median / max of the rounds' p99s and exits 1 when a median misses its
//! target. `--subscriptions 0` measures the burst alone.

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
    /// Rounds, each in a fresh process (at least 3); the target is checked on the medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Internal: run one round in this process and print its figures as a `ROUND {json}` line.
    #[arg(long, hide = true)]
    one_round: bool,
}

/// Handler p99 must stay under this, milliseconds.
const HANDLER_P99_TARGET_MS: f64 = 100.0;
/// Scheduler lag p99 must stay under this, milliseconds.
const LAG_P99_TARGET_MS: f64 = 10.0;

fn main() {
    // Re-executed as the node simulator child of the reconcile load: serve and exit.
    vpnbot_devtools::bench::reconcile::maybe_run_sim_child();
    let args = Args::parse();
    if !args.one_round {
        std::process::exit(rounds(&args));
    }
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
            if !r.cpu_seconds.is_empty() {
                let line: Vec<String> = r
                    .cpu_seconds
                    .iter()
                    .map(|(g, (run, wait))| format!("{g} {run:.2}/{wait:.2}"))
                    .collect();
                println!(
                    "CPU during the burst, seconds on a CPU/runnable waiting for one (kernel \
                     schedstat; {} cores): {}",
                    std::thread::available_parallelism().map_or(0, |n| n.get()),
                    line.join(", ")
                );
            }
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
            println!(
                "ROUND {}",
                serde_json::to_string(&r).expect("report serializes")
            );
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs `args.rounds` (at least 3) rounds, each a fresh process of this binary (its stderr,
/// the process's log, is captured and shown only when the round fails), prints each
/// round's figures and the min / median / max of handler p99 and scheduler lag p99; returns
/// the exit code: 0 when both medians meet their targets, 1 otherwise.
fn rounds(args: &Args) -> i32 {
    if std::env::var_os("DATABASE_URL").is_none() {
        eprintln!("bench: DATABASE_URL is not set (e.g. `. scripts/ensure-postgres.sh`)");
        return 1;
    }
    let n = args.rounds.max(3);
    if n != args.rounds {
        println!(
            "bench bot: --rounds {} raised to {n}: the spread needs three",
            args.rounds
        );
    }
    let exe = std::env::current_exe().expect("current_exe");
    let (mut handler, mut lag) = (Vec::new(), Vec::new());
    for round in 1..=n {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--one-round")
            .arg("--users")
            .arg(args.users.to_string())
            .arg("--subscriptions")
            .arg(args.subscriptions.to_string())
            .stdin(std::process::Stdio::null());
        if let Some(c) = args.concurrency {
            cmd.arg("--concurrency").arg(c.to_string());
        }
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("bench: cannot start round {round}: {e}");
                return 1;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut report = None;
        for line in text.lines() {
            match line.strip_prefix("ROUND ") {
                Some(json) => report = serde_json::from_str::<serde_json::Value>(json).ok(),
                None if round == 1 || !line.starts_with("bench bot:") => {
                    println!("round {round}: {line}")
                }
                None => {}
            }
        }
        let p99 = |key: &str| report.as_ref().and_then(|r| r[key][1].as_f64());
        match (
            out.status.success(),
            p99("handler_ms"),
            p99("scheduler_lag_ms"),
        ) {
            (true, Some(h), Some(l)) => {
                handler.push(h);
                lag.push(l);
            }
            _ => {
                // The round logs as `run` does on stderr; its last lines say why it failed.
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = err.lines().rev().take(10).collect();
                eprintln!(
                    "bench: round {round} failed ({}); its last stderr lines:",
                    out.status
                );
                for line in tail.into_iter().rev() {
                    eprintln!("  {line}");
                }
                return 1;
            }
        }
    }
    use vpnbot_devtools::bench::{fmt_spread, spread};
    println!(
        "bench bot, {n} rounds, each a fresh process (median: the middle round, the upper one \
         of two for an even count): handler p99 {} (target < {HANDLER_P99_TARGET_MS}); \
         scheduler lag p99 {} (target < {LAG_P99_TARGET_MS})",
        fmt_spread(&handler, "ms"),
        fmt_spread(&lag, "ms")
    );
    let (h, l) = (spread(&handler), spread(&lag));
    let ok = h.1 < HANDLER_P99_TARGET_MS && l.1 < LAG_P99_TARGET_MS;
    println!(
        "target on the medians: {}",
        if ok { "met" } else { "MISSED" }
    );
    i32::from(!ok)
}
