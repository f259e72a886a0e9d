//! Micro-benchmarks of the pure functions on hot paths (criterion; `cargo bench --bench micro`):
//! the QR image made for every `/trial` and purchase, and the ownership marker built and
//! matched for every user of a node in each reconcile pass (a million per pass at 1M users).
//!
//! These have no pass/fail target; the load benchmarks with targets, which exit non-zero when
//! they miss, are `vpnbot-bench` and the `bench_bot` example (README, "Benchmarks").
//! `cargo test --all-targets` runs each of these once, so they keep compiling and running.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use uuid::Uuid;

fn qr(c: &mut Criterion) {
    let link = vpnbot::bot::keys::vless_link(
        Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
        "nl-1.vpn.example.com",
        443,
        "encryption=none&security=reality&type=tcp&flow=xtls-rprx-vision",
        "vpnbot trial",
    );
    c.bench_function("qr_png (one /trial key)", |b| {
        b.iter(|| vpnbot::bot::keys::qr_png(black_box(&link)).unwrap())
    });
}

fn marker(c: &mut Criterion) {
    let uuid = Uuid::from_u128(0x0fed_cba9_8765_4321_0fed_cba9_8765_4321);
    let email = node_api::owned_email(uuid);
    c.bench_function("owned_email (per user added)", |b| {
        b.iter(|| node_api::owned_email(black_box(uuid)))
    });
    c.bench_function("marker_matches (per node user, each pass)", |b| {
        b.iter(|| node_api::marker_matches(black_box(&email), black_box(uuid)))
    });
}

criterion_group!(benches, qr, marker);
criterion_main!(benches);
