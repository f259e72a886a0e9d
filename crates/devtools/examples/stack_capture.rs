//! What a native-stack capture costs (`diagnostics::stack`): the first capture (the symbol
//! tables loaded then), later captures, and the anonymous memory the symbol cache keeps.
//!
//! `cargo run --release -p vpnbot-devtools --example stack_capture` (or without `--release`
//! for the debug build the demo and the tests run). It traces one sleeping thread of its own
//! process with the same `stack::capture` the dumps use. Target: a warm capture within 50 ms
//! (exit 1 otherwise). The binary is this example's, not `vpnbot`'s: the cold figures grow
//! with the size of the binary's debug info.

use std::time::{Duration, Instant};

fn rss_anon_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> std::process::ExitCode {
    diagnostics::stack::maybe_run_child();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() } as u32).unwrap();
        std::thread::sleep(Duration::from_secs(3600));
    });
    let tid = rx.recv().unwrap();
    let exe_mb = std::env::current_exe()
        .and_then(std::fs::metadata)
        .map(|m| m.len() as f64 / 1e6)
        .unwrap_or(0.0);

    let rss0 = rss_anon_kb();
    let t = Instant::now();
    let cold = diagnostics::stack::capture(&[tid]).expect("capture (needs ptrace permission)");
    let cold_s = t.elapsed();
    let rss1 = rss_anon_kb();
    let frames = cold.get(&tid).map_or(0, Vec::len);

    let mut warm: Vec<Duration> = (0..20)
        .map(|_| {
            let t = Instant::now();
            diagnostics::stack::capture(&[tid]).expect("capture");
            t.elapsed()
        })
        .collect();
    warm.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "binary {exe_mb:.0} MB; first capture {:.0} ms ({frames} frames), symbol cache +{:.0} MB anonymous RSS",
        ms(cold_s),
        (rss1.saturating_sub(rss0)) as f64 / 1024.0
    );
    println!(
        "warm capture over 20: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        ms(warm[0]),
        ms(warm[10]),
        ms(warm[19])
    );
    if warm[19] > Duration::from_millis(50) {
        println!("MISSED: a warm capture took more than 50 ms");
        return std::process::ExitCode::FAILURE;
    }
    println!("met: every warm capture within 50 ms");
    std::process::ExitCode::SUCCESS
}
