//! `vpnbot bench NAME`: benchmarks that print their figures (targets live here, not in tests).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use secrecy::SecretString;

use crate::config::DbConfig;
use crate::db::inflight::PoolInflight;
use crate::db::DbPool;

/// Options of `vpnbot bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum)]
    pub name: BenchName,
    /// Iterations per measured loop.
    #[arg(long, default_value_t = 20_000)]
    pub iterations: u32,
}

/// Available benchmarks.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchName {
    /// Instrumented `DbPool::acquire` against a bare `PgPool::acquire` (target: < 2 µs extra).
    Pool,
    /// Rendering `/metrics` for a registry with every family populated.
    MetricsRender,
    /// Node client per-call overhead against a bare reqwest call on loopback
    /// (target: < 5 % or 20 µs, whichever is larger).
    NodeCallOverhead,
    /// `list-users` of 1,000,000 users from the simulator: transfer + decode time, peak memory,
    /// longest worker hold (target: within the deadline and body cap, no worker held > 1 s).
    NodeListUsers,
    /// Extra cost per poll of the diagnostics' hooks on a `yield_now` storm (2 workers,
    /// 1,000 tasks × 2,000 yields), against the same runtime without them.
    PollHooks,
    /// Watchdog detection latency over 20 injected stalls each of one blocked worker, every
    /// worker blocked, and a CPU loop, threshold 300 ms (target: p99 ≤ threshold + 200 ms).
    Detection,
    /// The watchdog thread's own CPU over 10 s (target: < 1 % of a core).
    WatchdogCpu,
    /// Throughput cost of everything always on (hooks, watchdog, lag probe, monitors) on a
    /// node-call loop over loopback (target: < 5 %).
    AlwaysOnCost,
}

/// Runs one benchmark.
pub fn main(args: BenchArgs) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("vpnbot-bench")
        .build()
        .expect("runtime");
    let ok = match args.name {
        BenchName::Pool => rt.block_on(bench_pool(args.iterations)),
        BenchName::MetricsRender => {
            bench_metrics_render(args.iterations.min(2_000));
            true
        }
        BenchName::NodeCallOverhead => {
            rt.block_on(crate::node::bench::bench_call_overhead(
                args.iterations as usize,
            ));
            true
        }
        BenchName::PollHooks => {
            crate::diagnostics::bench::bench_poll_hook_cost(2, 1000, 2000);
            true
        }
        BenchName::Detection => {
            crate::diagnostics::bench::bench_detection_latency(20, Duration::from_millis(300));
            true
        }
        BenchName::AlwaysOnCost => {
            crate::diagnostics::bench::bench_always_on_cost(args.iterations as usize);
            true
        }
        BenchName::WatchdogCpu => {
            crate::diagnostics::bench::bench_watchdog_cpu(Duration::from_secs(10));
            true
        }
        BenchName::NodeListUsers => {
            rt.block_on(crate::node::bench::bench_list_users_1m());
            true
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Measures acquire+release through the instrumented pool and through the bare sqlx pool on the
/// same server, interleaved in rounds to cancel drift, plus the bookkeeping alone without I/O.
pub async fn bench_pool(iterations: u32) -> bool {
    let (_pg, url) = match std::env::var("DATABASE_URL") {
        Ok(u) if !u.is_empty() => (None, u),
        _ => match crate::demo::postgres::EmbeddedPostgres::start() {
            Ok(pg) => {
                let u = pg.url();
                (Some(pg), u)
            }
            Err(e) => {
                eprintln!("bench: {e}");
                return false;
            }
        },
    };
    let cfg = DbConfig {
        url: SecretString::from(url),
        ..DbConfig::default()
    };
    let registry = crate::metrics::new_registry();
    let pool = match DbPool::connect(&cfg, &registry) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench: {e}");
            return false;
        }
    };
    // Warm up: open the connections.
    for _ in 0..200 {
        if let Err(e) = pool.acquire("bench_warmup").await {
            eprintln!("bench: {e}");
            return false;
        }
    }
    let rounds = 10;
    let per_round = (iterations / rounds).max(1);
    // Per-round means; the fastest round of each is the least disturbed by other load.
    let (mut bare, mut instrumented) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per_round {
            drop(pool.raw().acquire().await.expect("acquire"));
        }
        bare = bare.min(t.elapsed().as_secs_f64() * 1e6 / per_round as f64);
        let t = Instant::now();
        for _ in 0..per_round {
            drop(pool.acquire("bench").await.expect("acquire"));
        }
        instrumented = instrumented.min(t.elapsed().as_secs_f64() * 1e6 / per_round as f64);
    }
    let n = (per_round * rounds) as f64;
    let (bare_us, inst_us) = (bare, instrumented);

    // The bookkeeping alone (registry + histograms + gauge), no pool I/O.
    let inflight = PoolInflight::default();
    let reg2 = crate::metrics::new_registry();
    let m = crate::db::pool::DbMetrics::register(&reg2);
    let k = 200_000u32;
    let t = Instant::now();
    for _ in 0..k {
        let slot = inflight.begin_wait("bench");
        m.bookkeeping_for_bench(Duration::from_micros(3));
        inflight.acquired(slot, None);
        inflight.end(slot);
    }
    let book_ns = t.elapsed().as_secs_f64() * 1e9 / k as f64;

    println!(
        "bench pool: {} acquire+release pairs each, {rounds} interleaved rounds",
        n as u64
    );
    println!("  bare PgPool::acquire        {bare_us:8.2} µs/op");
    println!("  instrumented DbPool::acquire {inst_us:8.2} µs/op");
    println!(
        "  difference                  {:8.2} µs/op (target < 2 µs; includes run-to-run noise)",
        inst_us - bare_us
    );
    println!("  bookkeeping alone (no I/O)  {book_ns:8.0} ns/op");
    pool.close().await;
    true
}

/// Times rendering `/metrics` with the data layer's families populated over 20 labels.
pub fn bench_metrics_render(iterations: u32) {
    let registry = crate::metrics::new_registry();
    let m = crate::db::pool::DbMetrics::register(&registry);
    m.populate_for_bench();
    let bytes = crate::metrics::render(&registry).len();
    let t = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(crate::metrics::render(&registry));
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / iterations as f64;
    println!("bench metrics-render: {iterations} renders of {bytes} bytes: {us:.1} µs per render");
}
