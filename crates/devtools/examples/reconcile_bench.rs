//! `cargo run --release --example reconcile_bench [N]`: one reconcile pass over N (default
//! 1,000,000) subscriptions; needs `DATABASE_URL` (any database on the server: a scratch one
//! is created and dropped).

fn main() {
    // Re-executed as the node simulator child: serve and exit.
    vpnbot_devtools::bench::reconcile::maybe_run_sim_child();
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let url = std::env::var("DATABASE_URL").expect("set DATABASE_URL");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(vpnbot_devtools::bench::reconcile::bench_reconcile(&url, n)) {
        Ok(r) => print!("{r}"),
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
