//! The bot under failure: a database outage during a payment, shutdown while waiting for a
//! handler slot, handler timeouts during key issuing, huge `retry_after`, pre-checkout under
//! load, payments outside private chats, secrets in `Debug`. Real PostgreSQL, the Bot API
//! stand-in and the node simulator over loopback. (Found by a break session; each failed first.)

use crate::helpers;
use std::time::{Duration, Instant};

use helpers::bot::{env, env_with, WAIT};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use vpnbot::bot::PollPhase;
use vpnbot::node::Operation;
use vpnbot_sim::botapi::{SimUser, UpdatesFault};
use vpnbot_sim::node::Fault;

use crate::helpers::bot::has;

/// Holds both pooled connections (the tests' pool has 2) for `hold`, from now on.
async fn hog(pool: &vpnbot::db::DbPool, hold: Duration) -> tokio::task::JoinHandle<()> {
    // The bot may be finishing earlier work: keep trying past the 0.3 s acquire timeout.
    let grab = || async {
        for _ in 0..20 {
            if let Ok(c) = pool.acquire("test_hog").await {
                return c;
            }
        }
        panic!("the pool never had a free connection");
    };
    let h1 = grab().await;
    let h2 = grab().await;
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        drop((h1, h2));
    })
}

/// T4 / D1: a `successful_payment` that arrives while the pool is starved (or PostgreSQL is
/// briefly down) is retried until the database is back, then credited once; the user is
/// never told to "try again" (that invites a second payment). Telegram does not send the
/// update again, so giving up early would lose the money. An outage longer than the retry
/// budget (60 % of the handler bound) ends with "do not pay again" and the charge ids in the
/// error log for support.
#[sqlx::test(migrations = false)]
async fn payment_during_pool_starvation_is_eventually_credited(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, |c| {
        c.db.max_connections = 2;
        c.db.acquire_timeout_seconds = Duration::from_millis(300);
    })
    .await;
    let u = SimUser::new(7001, "en");
    e.say(&u, "/start", has("")).await;
    // Every pooled connection is held for 1.2 s (a slow query, a leak, PostgreSQL restarting).
    let released = hog(&e.pool, Duration::from_millis(1200)).await;
    let from = e.sim.sent_to(u.id).len();
    e.sim
        .successful_payment(&u, "v1:month", "XTR", 100, "charge-outage-1");
    let answer = e.sim.wait_for(u.id, from, WAIT, |_| true).await;
    released.await.unwrap();
    let text = answer.map(|m| m.text).unwrap_or_default();
    assert!(text.contains("Payment received"), "{text}");
    assert!(!text.contains("try again"), "{text}");
    let payments = e
        .scalar_i64("SELECT count(*) FROM payments WHERE telegram_charge_id = 'charge-outage-1'")
        .await;
    let subs = e
        .scalar_i64("SELECT count(*) FROM subscriptions WHERE owner_id = 7001")
        .await;
    assert_eq!(
        (payments, subs),
        (1, 1),
        "credited once the database is back"
    );
    assert_eq!(
        e.metric("vpnbot_bot_payments_total", &[("outcome", "credited")]),
        1.0
    );
    assert!(e.metric("vpnbot_bot_errors_total", &[("kind", "payment_retry")]) >= 1.0);

    // Longer than the budget (3 s of the 5 s handler bound): "do not pay again", counted.
    let released = hog(&e.pool, Duration::from_secs(5)).await;
    let from = e.sim.sent_to(u.id).len();
    e.sim
        .successful_payment(&u, "v1:month", "XTR", 100, "charge-outage-2");
    let answer = e
        .sim
        .wait_for(u.id, from, Duration::from_secs(8), |m| {
            m.method == "sendMessage" && !m.text.contains("vless://")
        })
        .await;
    released.await.unwrap();
    let text = answer.map(|m| m.text).unwrap_or_default();
    assert!(text.contains("do not pay again"), "{text}");
    assert_eq!(
        e.metric("vpnbot_bot_payments_total", &[("outcome", "failed")]),
        1.0
    );
}

/// Shutdown while the receive loop waits for room in the full queue of ordinary updates: an
/// update it holds has not moved the offset and stays with Telegram for the next leader; the
/// queued ones were confirmed, so they are started during the bounded drain; a
/// `successful_payment` never waits behind them (own lane). With a `successful_payment` a lost
/// update is money taken and never credited.
#[sqlx::test(migrations = false)]
async fn shutdown_while_waiting_for_a_slot_loses_no_update(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let mut e = env_with(&opts, |c| {
        c.bot.max_concurrent_updates = 1;
        c.bot.update_queue_capacity = 1;
    })
    .await;
    let a = SimUser::new(7101, "en");
    let b = SimUser::new(7102, "en");
    let c = SimUser::new(7103, "en");
    let d = SimUser::new(7104, "en");
    e.say(&a, "/help", has("/status")).await;
    // A's trial is slow: the node answers add-user after 1.2 s (the only slot is busy).
    e.node.set_fault(
        Operation::AddUser,
        Fault::Delay(Duration::from_millis(1200)),
    );
    e.sim.send_text(&a, "/trial");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // C fills the queue, D waits for room, B's payment takes its own lane.
    e.sim.send_text(&c, "/help");
    e.sim.send_text(&d, "/help");
    e.sim
        .successful_payment(&b, "v1:month", "XTR", 100, "charge-shutdown-1");
    let slot = helpers::eventually(Duration::from_secs(3), || {
        e.bot.polling_operation().phase() == Some(PollPhase::HandlerSlot)
    })
    .await;
    assert!(slot.is_some(), "the loop waits for room (precondition)");
    // Leadership lost / SIGTERM now.
    e.stop().await;
    e.node.set_fault(Operation::AddUser, Fault::None);

    // The next leader (same database, same token) starts polling.
    let cancel = CancellationToken::new();
    let next = tokio::spawn(e.bot.clone().run(cancel.clone()));
    let mut credited = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        credited = e
            .scalar_i64(
                "SELECT count(*) FROM payments WHERE telegram_charge_id = 'charge-shutdown-1'",
            )
            .await;
        if credited == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c_answered = e.sim.wait_for(c.id, 0, WAIT, has("/status")).await;
    let d_answered = e.sim.wait_for(d.id, 0, WAIT, has("/status")).await;
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), next).await;
    assert_eq!(credited, 1, "B's successful_payment was credited");
    assert!(
        c_answered.is_some(),
        "the queued update was started at shutdown"
    );
    assert!(
        d_answered.is_some(),
        "the update held by the loop stayed with Telegram for the next leader"
    );
}

/// A handler cut by `bot.handler_timeout_seconds` while it issues a key: the subscription is
/// committed, but the node add is abandoned mid-call and no outbox intent is written (the
/// issue: "a failure leaves a pending operation in the outbox"); the user is told nothing.
/// Only a later reconcile pass (default every 600 s) can repair it.
#[sqlx::test(migrations = false)]
async fn handler_timeout_during_key_issue_leaves_an_outbox_intent(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, |c| {
        c.bot.handler_timeout_seconds = std::time::Duration::from_millis(300)
    })
    .await;
    // The node reads the add and never answers (0.5 s headers timeout > 0.3 s handler bound).
    e.node.set_fault(Operation::AddUser, Fault::NoHeaders);
    let u = SimUser::new(7201, "en");
    e.sim.send_text(&u, "/trial");
    let timed_out = helpers::eventually(Duration::from_secs(4), || {
        e.metric("vpnbot_bot_errors_total", &[("kind", "handler_timeout")]) >= 1.0
    })
    .await;
    assert!(timed_out.is_some(), "the handler timed out (precondition)");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let subs = e
        .scalar_i64(
            "SELECT count(*) FROM subscriptions WHERE owner_id = 7201 AND status = 'active'",
        )
        .await;
    let pending = e
        .scalar_i64("SELECT count(*) FROM pending_node_ops WHERE op = 'add' AND done_at IS NULL")
        .await;
    eprintln!(
        "subs {subs}, pending adds {pending}, node users {}, sent {:?}",
        e.node.users().len(),
        e.sim
            .sent_to(u.id)
            .iter()
            .map(|m| m.text.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(subs, 1, "the trial was committed (precondition)");
    assert_eq!(
        pending + e.node.users().len() as i64,
        1,
        "a committed subscription's key is either on the node or queued in the outbox"
    );
}

/// A handler that runs into `bot.handler_timeout_seconds` (or panics) is never observed in
/// `vpnbot_bot_handler_duration_seconds`: the slowest handlers are missing from the latency
/// histogram the dashboards and the p99 read (only `errors_total{kind="handler_timeout"}`
/// counts them, without a handler label).
#[sqlx::test(migrations = false)]
async fn timed_out_handlers_reach_the_duration_histogram(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, |c| {
        c.bot.handler_timeout_seconds = std::time::Duration::from_millis(300)
    })
    .await;
    e.node.set_fault(
        Operation::AddUser,
        Fault::Delay(Duration::from_millis(1200)),
    );
    let u = SimUser::new(7202, "en");
    e.sim.send_text(&u, "/trial");
    let timed_out = helpers::eventually(Duration::from_secs(4), || {
        e.metric("vpnbot_bot_errors_total", &[("kind", "handler_timeout")]) >= 1.0
    })
    .await;
    assert!(timed_out.is_some(), "the handler timed out (precondition)");
    let samples: f64 = ["trial", "timeout", "timed_out"]
        .iter()
        .map(|h| {
            e.metric(
                "vpnbot_bot_handler_duration_seconds_count",
                &[("handler", h)],
            )
        })
        .sum();
    assert!(
        samples >= 1.0,
        "a handler that ran into the timeout is observed in the duration histogram"
    );
}

/// T2 on receive: `getUpdates` answering `429 retry_after=3600` stops polling for an hour;
/// the wait is not capped by `bot.retry_after_max_seconds` (which only caps sends) nor by any
/// other bound, and the watchdog is told that this pause is expected.
#[sqlx::test(migrations = false)]
async fn huge_retry_after_on_get_updates_is_bounded(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let u = SimUser::new(7301, "en");
    e.say(&u, "/help", has("/status")).await;
    e.sim.set_updates_fault(UpdatesFault::RateLimited {
        retry_after: 3600,
        times: 1,
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let from = e.sim.sent_to(u.id).len();
    e.sim.send_text(&u, "/help");
    // retry_after_max_seconds is 3 s in the test config.
    let answered = e
        .sim
        .wait_for(u.id, from, Duration::from_secs(8), has("/status"))
        .await;
    assert!(
        answered.is_some(),
        "polling resumed within retry_after_max_seconds + margin; phase {:?}",
        e.bot.polling_operation().phase()
    );
}

/// A `successful_payment` in a non-private chat (an invoice sent without `start_parameter`
/// can be forwarded and paid by anyone) is dropped as "ignored": not recorded, not credited.
/// (Suspicion: depends on where Telegram delivers the service message.)
#[sqlx::test(migrations = false)]
async fn payment_in_a_group_is_at_least_recorded(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let u = SimUser::new(7401, "en");
    e.sim.inject(json!({"message": {"message_id": 9, "date": 0,
        "chat": {"id": -7400, "type": "group", "title": "g"}, "from": u.user_json(),
        "successful_payment": {"currency": "XTR", "total_amount": 100,
            "invoice_payload": "v1:month", "telegram_payment_charge_id": "charge-group-1",
            "provider_payment_charge_id": ""}}}));
    e.say(&u, "/help", has("/status")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM payments WHERE telegram_charge_id = 'charge-group-1'")
            .await,
        1,
        "a charge Telegram reports is never silently dropped"
    );
}

/// `Debug` of the public `BotApi` / `BotService` prints the bot token (teloxide's `Bot`
/// derives `Debug` with the token field).
#[sqlx::test(migrations = false)]
async fn debug_output_does_not_contain_the_bot_token(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let token = e.sim.token().to_string();
    let secret = token.split(':').nth(1).unwrap().to_string();
    let api = format!("{:?}", e.bot.api());
    let svc = format!("{:?}", e.bot);
    assert!(!api.contains(&secret), "BotApi Debug shows the token");
    assert!(!svc.contains(&secret), "BotService Debug shows the token");
}

/// Held up: a brand-new user (no `bot_users` row) whose first updates are the same
/// `successful_payment` twice, another charge and a `/trial`, all handled concurrently:
/// one subscription, each charge credited once, 60 days (trial refused or extended).
#[sqlx::test(migrations = false)]
async fn concurrent_first_payments_of_a_new_user_credit_each_charge_once(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env(&opts).await;
    for i in 0..5i64 {
        let u = SimUser::new(7500 + i, "en");
        e.sim
            .successful_payment(&u, "v1:month", "XTR", 100, &format!("dup-{i}"));
        e.sim
            .successful_payment(&u, "v1:month", "XTR", 100, &format!("dup-{i}"));
        e.sim.send_text(&u, "/trial");
        e.sim
            .successful_payment(&u, "v1:month", "XTR", 100, &format!("other-{i}"));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..5i64 {
        let id = 7500 + i;
        assert_eq!(
            e.scalar_i64(&format!(
                "SELECT count(*) FROM subscriptions WHERE owner_id = {id}"
            ))
            .await,
            1
        );
        assert_eq!(
            e.scalar_i64(&format!(
                "SELECT count(*) FROM payments WHERE user_id = {id}"
            ))
            .await,
            2
        );
        let days = e
            .scalar_i64(&format!("SELECT round(EXTRACT(EPOCH FROM expires_at - now()) / 86400)::bigint FROM subscriptions WHERE owner_id = {id}"))
            .await;
        assert!(days == 60 || days == 63, "user {id}: {days} days");
    }
    assert_eq!(
        e.metric("vpnbot_bot_payments_total", &[("outcome", "credited")]),
        10.0
    );
    assert_eq!(
        e.metric("vpnbot_bot_payments_total", &[("outcome", "duplicate")]),
        5.0
    );
}

/// Held up: Bot API errors (connection refused, 401) name no token; bot label values stay
/// in a small fixed set after hostile input.
#[sqlx::test(migrations = false)]
async fn api_errors_and_labels_carry_no_token_or_user_input(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env(&opts).await;
    let secret = e.sim.token().split(':').nth(1).unwrap().to_string();
    let u = SimUser::new(7601, "en");
    for t in [
        "/x7601y",
        "/стоп",
        "/reconcile a dry",
        "/stats@x",
        "/diag 7601",
    ] {
        e.say(&u, t, has("")).await;
    }
    e.sim.press(&u, 1, "plan:7601");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for line in e.metrics().lines().filter(|l| l.starts_with("vpnbot_bot_")) {
        let labels = line
            .split('{')
            .nth(1)
            .unwrap_or("")
            .split('}')
            .next()
            .unwrap_or("");
        assert!(
            !labels.contains("7601") && !labels.contains("стоп"),
            "{line}"
        );
        assert!(!line.contains(&secret), "{line}");
    }
    e.sim.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = e.bot.api().send_text(u.id, "x", None).await.unwrap_err();
    assert!(!format!("{err} {err:?}").contains(&secret), "{err:?}");
}

/// Telegram cancels a payment whose `pre_checkout_query` is not answered within 10 s. A
/// pre-checkout never takes a handler slot and goes first in its batch; one that arrives while
/// every slot is busy waits for a slot to free, which `bot.key_issue_timeout_seconds` bounds
/// even against a node that never answers (before it, a slot was held for the node client's
/// whole deadline with retries, 10 s). Scaled down: 1 slot, 3 trials against a hung node,
/// key issue bound 0.3 s.
#[sqlx::test(migrations = false)]
async fn pre_checkout_does_not_queue_behind_slow_handlers(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env_with(&opts, |c| {
        c.bot.max_concurrent_updates = 1;
        c.bot.key_issue_timeout_seconds = std::time::Duration::from_millis(300);
        c.node_client.headers_timeout_seconds = Duration::from_secs(5);
        c.node_client.total_deadline_seconds = Duration::from_secs(5);
    })
    .await;
    e.node.set_fault(Operation::AddUser, Fault::NoHeaders);
    for i in 0..3 {
        e.sim.send_text(&SimUser::new(7700 + i, "en"), "/trial");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let payer = SimUser::new(7710, "en");
    let t = Instant::now();
    let q = e.sim.pre_checkout(&payer, "v1:month", "XTR", 100);
    let a = e.sim.wait_answer(&q, Duration::from_secs(10)).await;
    let took = t.elapsed();
    assert!(a.is_some_and(|a| a.ok));
    // Three slot holds of ~0.3 s plus the trials' own work; the node alone would take 15 s.
    assert!(
        took < Duration::from_secs(3),
        "pre-checkout answered after {took:?}, behind node calls of other users"
    );
}
