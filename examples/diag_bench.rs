//! Runs the diagnostics benchmarks: `cargo run --release --example diag_bench`.
use std::time::Duration;

fn main() {
    vpnbot::diagnostics::stack::maybe_run_child();
    vpnbot::diagnostics::bench::bench_poll_hook_cost(2, 1000, 2000);
    vpnbot::diagnostics::bench::bench_detection_latency(20, Duration::from_millis(300));
    vpnbot::diagnostics::bench::bench_watchdog_cpu(Duration::from_secs(10));
}
