//! Runs the node client benchmarks: `cargo run --release --example node_bench`.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    vpnbot::node::bench::bench_call_overhead(20_000).await;
    vpnbot::node::bench::bench_list_users_1m().await;
}
