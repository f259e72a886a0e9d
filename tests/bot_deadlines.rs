//! Telegram's deadlines against a busy or failing Bot API (issue 12): pre-checkout answered in
//! time with every ordinary slot stuck, expiry enforcement that never waits for messages, a
//! reply that survives a silently dropped connection, and an honest answer from every cut-off
//! handler. Real PostgreSQL, the Bot API stand-in and the node simulator over loopback.

mod bot_common;
mod common;

use std::time::{Duration, Instant};

use bot_common::{env_with, Env};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::bot::PollPhase;
use vpnbot::sim::botapi::SimUser;

fn has(t: &str) -> impl Fn(&vpnbot::sim::botapi::SentMessage) -> bool + '_ {
    move |m| m.text.contains(t)
}

/// Slow sends: each `sendMessage` takes 6 s (inside a 10 s request timeout).
fn slow_sends(c: &mut vpnbot::config::Config) {
    c.bot.request_timeout_seconds = 10.0;
    c.bot.handler_timeout_seconds = 12.0;
    c.bot.retry_after_max_seconds = 10.0;
}

/// Nine `/start` against eight slots, each stuck in its `sendMessage`; then `n` pre-checkout
/// queries one after another. Returns each one's time from being sent to being answered.
async fn pre_checkouts_with_every_slot_stuck(e: &Env, n: usize) -> Vec<Duration> {
    for i in 0..9 {
        e.sim.send_text(&SimUser::new(12_100 + i, "en"), "/start");
    }
    let stuck = common::eventually(Duration::from_secs(5), || {
        e.metric("vpnbot_bot_updates_in_flight", &[]) >= 8.0
            && e.metric("vpnbot_bot_update_queue_depth", &[("lane", "ordinary")]) >= 1.0
    })
    .await;
    assert!(
        stuck.is_some(),
        "precondition: 8 slots busy, one /start queued"
    );
    let mut took = Vec::new();
    for i in 0..n {
        let payer = SimUser::new(12_200 + i as i64, "en");
        let t = Instant::now();
        let q = e.sim.pre_checkout(&payer, "v1:month", "XTR", 100);
        let a = e.sim.wait_answer(&q, Duration::from_secs(15)).await;
        took.push(t.elapsed());
        assert!(a.is_some_and(|a| a.ok), "pre-checkout {i} answered ok");
    }
    took
}

fn p99(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.99), *v.last().unwrap())
}

/// Item 1: every ordinary slot stuck in a 6 s `sendMessage` (and one `/start` queued behind
/// them): pre-checkout queries are still fetched and answered at once, on their own slots.
/// Before, the loop stopped fetching while it waited for a slot: answers came after the
/// sends (11 s with the 12 s sends).
#[sqlx::test(migrations = false)]
async fn pre_checkout_is_answered_in_time_with_every_slot_stuck(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, slow_sends).await;
    e.sim.set_message_delay(Some(Duration::from_secs(6)));
    let took = pre_checkouts_with_every_slot_stuck(&e, 20).await;
    let (p50, p99, max) = p99(took);
    eprintln!(
        "pre-checkout answer with 8/8 slots stuck, n=20: p50 {p50:?} p99 {p99:?} max {max:?}"
    );
    assert!(p99 < Duration::from_secs(2), "p99 {p99:?}");
    // The bot's own measure agrees: every answer within 2 s.
    let count = e.metric("vpnbot_bot_precheckout_answer_seconds_count", &[]);
    let within = e.metric(
        "vpnbot_bot_precheckout_answer_seconds_bucket",
        &[("le", "2")],
    );
    assert_eq!((count, within), (20.0, 20.0));
    // The slots were still stuck all along (the test measured what it meant to).
    assert_eq!(e.metric("vpnbot_bot_updates_in_flight", &[]), 8.0);
}

/// Item 1 with the sends answered `429 retry_after=6` (each handler sleeps as told, holding its
/// slot): pre-checkouts are not held up either (before: 19 s with `retry_after=20`).
#[sqlx::test(migrations = false)]
async fn pre_checkout_is_answered_in_time_while_sends_are_rate_limited(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, slow_sends).await;
    e.sim.set_message_rate_limit(6, 1000);
    let took = pre_checkouts_with_every_slot_stuck(&e, 5).await;
    let (_, _, max) = p99(took);
    assert!(max < Duration::from_secs(2), "max {max:?}");
    assert!(e.metric("vpnbot_bot_errors_total", &[("kind", "rate_limited")]) >= 8.0);
}

/// Item 1, back-pressure: with one slot and a queue of two, the loop keeps polling until the
/// queue is full, then waits (phase `handler_slot`, counted in
/// `vpnbot_bot_receive_backpressure_seconds_total`); nothing is lost, every user is answered.
#[sqlx::test(migrations = false)]
async fn full_queue_pauses_polling_visibly_and_loses_nothing(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, |c| {
        c.bot.max_concurrent_updates = 1;
        c.bot.update_queue_capacity = 2;
    })
    .await;
    e.sim.set_message_delay(Some(Duration::from_millis(400)));
    let users: Vec<SimUser> = (0..6).map(|i| SimUser::new(12_300 + i, "en")).collect();
    for u in &users {
        e.sim.send_text(u, "/help");
    }
    let paused = common::eventually(Duration::from_secs(3), || {
        e.bot.polling_operation().phase() == Some(PollPhase::HandlerSlot)
    })
    .await;
    assert!(paused.is_some(), "the loop waits for room in the queue");
    // Two queued and the one the loop holds, waiting for room.
    assert_eq!(
        e.metric("vpnbot_bot_update_queue_depth", &[("lane", "ordinary")]),
        3.0
    );
    for u in &users {
        let m = e
            .sim
            .wait_for(u.id, 0, Duration::from_secs(8), has("/status"))
            .await;
        assert!(m.is_some(), "user {} answered", u.id);
    }
    assert!(e.metric("vpnbot_bot_receive_backpressure_seconds_total", &[]) > 0.1);
}
