//! Burst benchmark of the bot: `DATABASE_URL=postgres://... cargo run --release --example
//! bench_bot [USERS]` (default 1000). Prints handler latency and scheduler lag percentiles.

fn main() {
    let url =
        std::env::var("DATABASE_URL").expect("DATABASE_URL (e.g. from scripts/ensure-postgres.sh)");
    let users: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vpnbot-worker")
        .build()
        .expect("runtime");
    match rt.block_on(vpnbot::bot::bench::bench_updates(&url, users)) {
        Ok(r) => {
            println!(
                "bot burst: {} updates from {} users in {:.2} s (concurrency {}), {} messages sent",
                r.updates, r.updates, r.wall_seconds, r.concurrency, r.sent
            );
            println!(
                "handler latency ms: p50 {:.2}  p99 {:.2}  max {:.2}",
                r.handler_ms[0], r.handler_ms[1], r.handler_ms[2]
            );
            println!(
                "scheduler lag ms:   p50 {:.3}  p99 {:.3}  max {:.3}",
                r.scheduler_lag_ms[0], r.scheduler_lag_ms[1], r.scheduler_lag_ms[2]
            );
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
