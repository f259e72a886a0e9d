//! Telegram's deadlines against a busy or failing Bot API (issue 12): pre-checkout answered in
//! time with every ordinary slot stuck, expiry enforcement that never waits for messages, a
//! reply that survives a silently dropped connection, and an honest answer from every cut-off
//! handler. Real PostgreSQL, the Bot API stand-in and the node simulator over loopback.

use crate::helpers;
use std::time::{Duration, Instant};

use helpers::bot::{env_with, Env};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::bot::PollPhase;
use vpnbot_sim::botapi::SimUser;
use vpnbot_sim::proxy::{SilentDropProxy, SilentDropProxyHandle};

use crate::helpers::bot::has;

/// Slow sends: each `sendMessage` takes 6 s (inside a 10 s request timeout).
fn slow_sends(c: &mut vpnbot::config::Config) {
    c.bot.request_timeout_seconds = std::time::Duration::from_secs(10);
    c.bot.handler_timeout_seconds = std::time::Duration::from_secs(12);
    c.bot.retry_after_max_seconds = std::time::Duration::from_secs(10);
}

/// Nine `/start` against eight slots, each stuck in its `sendMessage`; then `n` pre-checkout
/// queries one after another. Returns each one's time from being sent to being answered.
async fn pre_checkouts_with_every_slot_stuck(e: &Env, n: usize) -> Vec<Duration> {
    for i in 0..9 {
        e.sim.send_text(&SimUser::new(12_100 + i, "en"), "/start");
    }
    let stuck = helpers::eventually(Duration::from_secs(5), || {
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
/// sends (11 s with the issue's 12 s sends).
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
    // The bot's own measure agrees: every answer within 2 s. It observes an answer once the
    // Bot API has replied to it, a moment after the stand-in recorded it (a CI run read 19).
    helpers::eventually(Duration::from_secs(2), || {
        e.metric("vpnbot_bot_precheckout_answer_seconds_count", &[]) >= 20.0
    })
    .await;
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
    let paused = helpers::eventually(Duration::from_secs(3), || {
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

/// When the subscription of `owner` has the status `expired` and its removal is queued.
async fn enforced(e: &Env, owner: i64) -> bool {
    e.scalar_i64(&format!(
        "SELECT count(*) FROM subscriptions s JOIN pending_node_ops p \
         ON p.vless_uuid = s.vless_uuid AND p.op = 'remove' AND p.done_at IS NULL \
         WHERE s.owner_id = {owner} AND s.status = 'expired'"
    ))
    .await
        == 1
}

/// Item 4: ten reminders whose sends take 2 s each (request timeout 3 s) and, meanwhile, a
/// subscription that expires: the periodic worker (interval 0.3 s) enforces it within a
/// couple of intervals, while the reminders go out four at a time on their own. Before, the
/// pass sent them one after another and enforcement waited for all of them (the issue: 118 s
/// late with a 60 s interval and 12 s sends).
#[sqlx::test(migrations = false)]
async fn expiry_enforcement_never_waits_for_slow_sends(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env_with(&opts, |c| {
        c.bot.request_timeout_seconds = std::time::Duration::from_secs(3);
        c.bot.expiry_interval_seconds = std::time::Duration::from_millis(300);
    })
    .await;
    e.exec(
        "INSERT INTO bot_users (telegram_id, language_code) \
         SELECT 12400 + g, 'en' FROM generate_series(0, 10) g",
    )
    .await;
    e.exec(
        "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at) \
         SELECT 12400 + g, 'a', gen_random_uuid(), 'month', now() + interval '12 hours' \
         FROM generate_series(0, 9) g",
    )
    .await;
    e.exec(
        "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at, reminded_1d, reminded_3d) \
         VALUES (12410, 'a', gen_random_uuid(), 'month', now() + interval '1.5 seconds', TRUE, TRUE)",
    )
    .await;
    e.sim.set_message_delay(Some(Duration::from_secs(2)));
    let expires = Instant::now() + Duration::from_millis(1500);
    let worker = tokio::spawn(e.expiry.clone().run(e.cancel.clone()));
    // The first pass claimed the ten reminders; their sends are under way.
    let claimed = helpers::eventually(Duration::from_secs(2), || {
        e.sim.max_concurrent_messages() >= 1
    })
    .await;
    assert!(claimed.is_some(), "precondition: reminders being sent");
    let mut late = None;
    while Instant::now() < expires + Duration::from_secs(10) {
        if enforced(&e, 12410).await {
            late = Some(Instant::now().saturating_duration_since(expires));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let late = late.expect("the subscription was enforced");
    eprintln!("enforced {late:?} after expiry (interval 0.3 s, sends 2 s)");
    assert!(late < Duration::from_secs(1), "enforced {late:?} late");
    // The reminders still all go out, at most four at a time (bot.notify_concurrency).
    let sent = helpers::eventually(Duration::from_secs(10), || {
        e.metric(
            "vpnbot_expiry_reminders_total",
            &[("window", "1d"), ("outcome", "sent")],
        ) == 10.0
    })
    .await;
    assert!(sent.is_some(), "every reminder sent");
    assert_eq!(e.sim.max_concurrent_messages(), 4);
    e.cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
}

/// Item 4: a user who blocked the bot (`403`) is remembered and not sent to again; using the
/// bot again clears it. A `429 retry_after` is waited out by the send, and the reminder still
/// goes out.
#[sqlx::test(migrations = false)]
async fn blocked_users_are_remembered_and_rate_limits_honoured(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, |c| {
        c.bot.retry_after_max_seconds = std::time::Duration::from_secs(3)
    })
    .await;
    let blocked = 12500;
    e.exec(
        "INSERT INTO bot_users (telegram_id, language_code) VALUES (12500, 'en'), (12501, 'en')",
    )
    .await;
    e.exec(
        "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at) VALUES \
         (12500, 'a', gen_random_uuid(), 'month', now() - interval '1 minute')",
    )
    .await;
    e.sim.block_chat(blocked);
    let p = e.expiry.run_once().await.unwrap();
    assert_eq!((p.expired, p.blocked, p.sent), (1, 1, 0), "{p:?}");
    assert_eq!(
        e.scalar_i64(
            "SELECT count(*) FROM bot_users WHERE telegram_id = 12500 AND blocked_at IS NOT NULL"
        )
        .await,
        1,
        "the 403 is remembered"
    );
    // The user renews elsewhere (support): the 1-day reminder is not attempted.
    e.exec(
        "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at) VALUES \
         (12500, 'a', gen_random_uuid(), 'month', now() + interval '12 hours'), \
         (12501, 'a', gen_random_uuid(), 'month', now() + interval '12 hours')",
    )
    .await;
    // And the Bot API asks to slow down: 429 retry_after=1 on the next send.
    e.sim.set_message_rate_limit(1, 1);
    let t = Instant::now();
    let p = e.expiry.run_once().await.unwrap();
    assert_eq!((p.reminded_1d, p.blocked, p.sent), (2, 1, 1), "{p:?}");
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "retry_after honoured"
    );
    assert_eq!(e.sim.message_attempts(blocked), 1, "not sent to again");
    assert_eq!(
        e.metric(
            "vpnbot_expiry_reminders_total",
            &[("window", "1d"), ("outcome", "blocked")]
        ),
        1.0
    );
    // Back: /start clears the mark.
    e.sim.send_text(&SimUser::new(blocked, "en"), "/start");
    let cleared = helpers::eventually(Duration::from_secs(3), || {
        e.metric(
            "vpnbot_bot_handler_duration_seconds_count",
            &[("handler", "start")],
        ) >= 1.0
    })
    .await;
    assert!(cleared.is_some());
    assert_eq!(
        e.scalar_i64(
            "SELECT count(*) FROM bot_users WHERE telegram_id = 12500 AND blocked_at IS NULL"
        )
        .await,
        1,
        "using the bot again clears the mark"
    );
}

/// The bot's Bot API traffic through a [`SilentDropProxy`] in front of the stand-in.
async fn env_behind_proxy(
    opts: &PgConnectOptions,
    tweak: impl FnOnce(&mut vpnbot::config::Config),
) -> (Env, SilentDropProxyHandle) {
    let mut proxy = None;
    let e = env_with(opts, |c| {
        let sim: std::net::SocketAddr = c
            .telegram
            .api_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let p = SilentDropProxy::start(tokio::net::TcpListener::from_std(l).unwrap(), sim);
        c.telegram.api_url = format!("http://{}/", p.addr());
        tweak(c);
        proxy = Some(p);
    })
    .await;
    (e, proxy.unwrap())
}

/// Item 5: the path to the Bot API drops silently (no FIN) while the send connection is idle
/// in the pool. The idle connection was recycled (`bot.pool_idle_timeout_seconds`), so the
/// next reply goes out on a fresh connection and arrives; before, it went out on the dead
/// pooled connection (reqwest keeps idle ones 90 s), failed after the request timeout and was
/// lost.
#[sqlx::test(migrations = false)]
async fn reply_after_a_silently_dropped_path_goes_out_on_a_fresh_connection(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let (e, proxy) = env_behind_proxy(&opts, |c| {
        c.bot.pool_idle_timeout_seconds = std::time::Duration::from_millis(500)
    })
    .await;
    let u = SimUser::new(12600, "en");
    e.say(&u, "/help", has("/status")).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.drop_existing();
    let from = e.sim.sent_to(u.id).len();
    e.sim.send_text(&u, "/status");
    let answered = e
        .sim
        .wait_for(u.id, from, Duration::from_secs(6), |_| true)
        .await;
    assert!(answered.is_some(), "the reply arrived");
    assert_eq!(
        e.metric(
            "vpnbot_bot_api_requests_total",
            &[("method", "sendMessage"), ("outcome", "timeout")]
        ),
        0.0,
        "no send went out on the dead connection"
    );
}

/// Item 5, the other case: the path drops right after a send, the connection is still fresh in
/// the pool, the next request goes out on it and its bytes are acknowledged (by the proxy's
/// end), so it may have been read: not retried, a failure bounded by the request timeout and
/// counted. The dead connection is discarded; the next send works.
#[sqlx::test(migrations = false)]
async fn send_on_a_dead_connection_fails_bounded_and_counted(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let (e, proxy) = env_behind_proxy(&opts, |_| {}).await;
    let u = SimUser::new(12601, "en");
    e.say(&u, "/help", has("/status")).await;
    proxy.drop_existing();
    let t = Instant::now();
    let err = e
        .bot
        .api()
        .send_text(u.id, "lost on the dead path", None)
        .await
        .unwrap_err();
    let took = t.elapsed();
    // Request timeout 2 s in the test config (+1 s bound).
    assert!(took < Duration::from_millis(3500), "{took:?}: {err}");
    assert!(
        matches!(err, vpnbot::bot::BotApiError::Timeout { .. }),
        "{err:?}"
    );
    assert!(
        e.metric(
            "vpnbot_bot_api_requests_total",
            &[("method", "sendMessage"), ("outcome", "timeout")]
        ) >= 1.0
    );
    assert_eq!(
        e.metric(
            "vpnbot_bot_api_retries_total",
            &[("method", "sendMessage"), ("reason", "not_acknowledged")]
        ),
        0.0,
        "acknowledged bytes are never sent twice"
    );
    assert!(!e.sim.sent().iter().any(|m| m.text.contains("dead path")));
    e.bot.api().send_text(u.id, "after", None).await.unwrap();
}

/// Item 5: a request that never reached the peer (connection refused: not one byte sent) is
/// sent once more on a fresh connection, counted, and then fails bounded.
#[sqlx::test(migrations = false)]
async fn unacknowledged_request_is_retried_once_on_a_fresh_connection(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, |_| {}).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut telegram = e.config.telegram.clone();
    telegram.api_url = format!("http://127.0.0.1:{port}/");
    let registry = vpnbot::metrics::new_registry();
    let api = vpnbot::bot::BotApi::new(
        &telegram,
        &e.config.bot,
        vpnbot::bot::BotMetrics::register(&registry),
    )
    .unwrap();
    let t = Instant::now();
    let err = api.send_text(1, "x", None).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!err.is_forbidden());
    let text = vpnbot::metrics::render(&registry);
    let m =
        |name: &str, labels: &[(&str, &str)]| helpers::metric(&text, name, labels).unwrap_or(0.0);
    assert_eq!(
        m(
            "vpnbot_bot_api_retries_total",
            &[("method", "sendMessage"), ("reason", "not_acknowledged")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "vpnbot_bot_api_requests_total",
            &[("method", "sendMessage"), ("outcome", "network")]
        ),
        2.0,
        "sent twice, not more"
    );
}

/// Holds both pooled connections (the pool has 2 here) for `hold`, from now on.
async fn hog(pool: &vpnbot::db::DbPool, hold: Duration) -> tokio::task::JoinHandle<()> {
    let h1 = pool.acquire("test_hog").await.unwrap();
    let h2 = pool.acquire("test_hog").await.unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        drop((h1, h2));
    })
}

/// Handler bound 0.5 s, acquire timeout 3 s, a pool of two.
fn short_bound(c: &mut vpnbot::config::Config) {
    c.db.max_connections = 2;
    c.db.acquire_timeout_seconds = Duration::from_secs(3);
    c.bot.handler_timeout_seconds = std::time::Duration::from_millis(500);
}

/// Item 6: a `/trial` cut off by the handler bound while it waits for the database gets an
/// honest "try again in a minute" (nothing was committed); before, it got no answer at all.
#[sqlx::test(migrations = false)]
async fn cut_off_trial_is_told_to_try_again(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env_with(&opts, short_bound).await;
    let u = SimUser::new(12700, "en");
    e.say(&u, "/help", has("/status")).await;
    let released = hog(&e.pool, Duration::from_millis(1500)).await;
    let from = e.sim.sent_to(u.id).len();
    e.sim.send_text(&u, "/trial");
    let told = e
        .sim
        .wait_for(
            u.id,
            from,
            Duration::from_secs(3),
            has("try again in a minute"),
        )
        .await;
    released.await.unwrap();
    assert!(told.is_some(), "sent: {:?}", e.sim.sent_to(u.id));
    assert!(e.metric("vpnbot_bot_errors_total", &[("kind", "handler_timeout")]) >= 1.0);
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM subscriptions WHERE owner_id = 12700")
            .await,
        0,
        "nothing was committed"
    );
}

/// Item 6: a `successful_payment` cut off before the payment was recorded: the user is told
/// the payment was received and not to pay again (never "try again"), the charge is counted
/// failed (and logged for support).
#[sqlx::test(migrations = false)]
async fn cut_off_payment_is_told_not_to_pay_again(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env_with(&opts, short_bound).await;
    let u = SimUser::new(12701, "en");
    e.say(&u, "/help", has("/status")).await;
    let released = hog(&e.pool, Duration::from_secs(3)).await;
    let from = e.sim.sent_to(u.id).len();
    e.sim
        .successful_payment(&u, "v1:month", "XTR", 100, "charge-cut-1");
    let told = e
        .sim
        .wait_for(u.id, from, Duration::from_secs(5), |_| true)
        .await;
    released.await.unwrap();
    let text = told.map(|m| m.text).unwrap_or_default();
    assert!(text.contains("do not pay again"), "{text:?}");
    assert_eq!(
        e.metric("vpnbot_bot_payments_total", &[("outcome", "failed")]),
        1.0
    );
}

/// Item 6, where answering would be wrong: a repeated `successful_payment` (already credited
/// and answered) whose handler is cut off (its reply is slow) gets no second answer.
#[sqlx::test(migrations = false)]
async fn cut_off_duplicate_payment_is_not_answered_again(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, |c| {
        c.bot.handler_timeout_seconds = std::time::Duration::from_millis(800)
    })
    .await;
    let u = SimUser::new(12702, "en");
    e.sim
        .successful_payment(&u, "v1:month", "XTR", 100, "charge-dup-cut");
    e.sim
        .wait_for(u.id, 0, Duration::from_secs(5), |m| m.method == "sendPhoto")
        .await
        .expect("credited and the key sent");
    // Telegram repeats an update later (an unconfirmed offset, a restart): over a second on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts = e.sim.message_attempts(u.id);
    e.sim.set_message_delay(Some(Duration::from_millis(1500)));
    e.sim
        .successful_payment(&u, "v1:month", "XTR", 100, "charge-dup-cut");
    let cut = helpers::eventually(Duration::from_secs(3), || {
        e.metric("vpnbot_bot_errors_total", &[("kind", "handler_timeout")]) >= 1.0
    })
    .await;
    assert!(
        cut.is_some(),
        "precondition: the duplicate's handler was cut off"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        e.sim.message_attempts(u.id),
        attempts + 1,
        "only the duplicate's own (cut) reply was attempted"
    );
    assert_eq!(
        e.metric("vpnbot_bot_payments_total", &[("outcome", "duplicate")]),
        1.0
    );
}

/// Item 6: a payment handler cut off after the credit was committed (the node is slow to
/// confirm the key): the user is told the payment is credited and how to get the key.
#[sqlx::test(migrations = false)]
async fn cut_off_after_credit_says_credited(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env_with(&opts, |c| {
        c.bot.handler_timeout_seconds = std::time::Duration::from_millis(500);
        c.bot.key_issue_timeout_seconds = std::time::Duration::from_secs(3);
    })
    .await;
    e.node.set_fault(
        vpnbot::node::Operation::AddUser,
        vpnbot_sim::node::Fault::Delay(Duration::from_secs(2)),
    );
    let u = SimUser::new(12703, "en");
    e.sim
        .successful_payment(&u, "v1:month", "XTR", 100, "charge-cut-2");
    let told = e
        .sim
        .wait_for(u.id, 0, Duration::from_secs(4), |_| true)
        .await;
    let text = told.map(|m| m.text).unwrap_or_default();
    assert!(
        text.contains("payment is credited"),
        "{text:?} {}",
        e.metrics()
            .lines()
            .filter(|l| l.starts_with("vpnbot_bot_") && !l.contains("bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM payments WHERE telegram_charge_id = 'charge-cut-2'")
            .await,
        1
    );
}
