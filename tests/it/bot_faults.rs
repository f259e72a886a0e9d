//! FAULTS.md rows T1 to T3 against the Bot API stand-in, and two instances on one database
//! (only the leader polls).

use crate::helpers;
use std::time::{Duration, Instant};

use helpers::bot::{bot_config, env, start_sims, WAIT};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::app::App;
use vpnbot_sim::botapi::{SimUser, UpdatesFault};

use crate::helpers::bot::has;

/// Issue 11 item 1, Bot API side: an API URL whose every answer is a `307` to another server.
/// The client must not follow it (the token is in the path, the message in the body): the call
/// fails and the other server never sees a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_api_redirect_is_not_followed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = target.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let redirector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_url = format!("http://{}/", redirector.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = redirector.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{target_addr}/elsewhere\r\ncontent-length: 0\r\n\r\n"
                );
                let _ = s.write_all(head.as_bytes()).await;
            });
        }
    });
    let mut cfg = vpnbot::config::Config::default();
    cfg.telegram.api_url = api_url;
    cfg.telegram.token = secrecy::SecretString::from("123:redirect-test-token");
    let registry = vpnbot::metrics::new_registry();
    let api = vpnbot::bot::BotApi::new(
        &cfg.telegram,
        &cfg.bot,
        vpnbot::bot::metrics::BotMetrics::register(&registry),
    )
    .unwrap();
    let res = api.send_text(1, "hello", None).await;
    assert!(res.is_err(), "a redirect is not a delivered message");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing follows the redirect"
    );
}

/// T1: `getUpdates` never returns. Each poll is cut at poll timeout + margin (1.5 s here),
/// counted as a timeout; polling resumes and the liveness gauge moves again once the API
/// answers.
#[sqlx::test(migrations = false)]
async fn t1_hanging_get_updates_is_bounded_and_polling_resumes(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env(&opts).await;
    let u = SimUser::new(1, "en");
    e.say(&u, "/help", has("/status")).await;
    e.sim.set_updates_fault(UpdatesFault::Hang);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = e.sim.requests("getUpdates");
    let stale_since = e.metric("vpnbot_bot_polling_last_success_timestamp_seconds", &[]);
    // Two hung polls of 1.5 s each fit in 4 s: the bound fires, the loop polls again.
    let ok = helpers::eventually(Duration::from_secs(6), || {
        e.sim.requests("getUpdates") >= before + 2
    })
    .await;
    assert!(ok.is_some(), "polling resumed after a hung poll");
    let timeouts = e.metric(
        "vpnbot_bot_api_requests_total",
        &[("method", "getUpdates"), ("outcome", "timeout")],
    );
    assert!(timeouts >= 1.0, "timeouts counted: {timeouts}");
    assert!(e.metric("vpnbot_bot_errors_total", &[("kind", "poll_timeout")]) >= 1.0);
    assert!(
        e.metric("vpnbot_bot_polling_last_success_timestamp_seconds", &[]) <= stale_since + 1.0,
        "no success while hung"
    );
    e.sim.set_updates_fault(UpdatesFault::None);
    let t = Instant::now();
    e.say(&u, "/help", has("/status")).await;
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(e.metric("vpnbot_bot_polling_last_success_timestamp_seconds", &[]) > stale_since);
}

/// T2: 429 with `retry_after` on receive and on send is honoured and counted.
#[sqlx::test(migrations = false)]
async fn t2_rate_limits_are_honoured_on_receive_and_send(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env(&opts).await;
    let u = SimUser::new(2, "en");
    e.say(&u, "/help", has("/status")).await;

    let t = Instant::now();
    e.sim.set_updates_fault(UpdatesFault::RateLimited {
        retry_after: 1,
        times: 1,
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    e.say(&u, "/help", has("/status")).await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1000),
        "waited retry_after: {took:?}"
    );
    assert_eq!(
        e.metric(
            "vpnbot_bot_api_requests_total",
            &[("method", "getUpdates"), ("outcome", "retry_after")]
        ),
        1.0
    );

    e.sim.set_send_rate_limit(1, 1);
    let t = Instant::now();
    e.say(&u, "/help", has("/status")).await;
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        e.metric(
            "vpnbot_bot_api_requests_total",
            &[("method", "sendMessage"), ("outcome", "retry_after")]
        ),
        1.0
    );
    assert_eq!(
        e.metric("vpnbot_bot_errors_total", &[("kind", "rate_limited")]),
        2.0
    );
    // The message was sent once, not twice.
    assert_eq!(e.sim.sent_to(u.id).len(), 3);
}

/// T3: 409 Conflict is an error and a metric, with a pause between polls: no tight loop.
#[sqlx::test(migrations = false)]
async fn t3_conflict_is_counted_and_paced(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let u = SimUser::new(3, "en");
    e.say(&u, "/help", has("/status")).await;
    e.sim
        .set_updates_fault(UpdatesFault::Conflict { times: 1000 });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = e.sim.requests("getUpdates");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let polls = e.sim.requests("getUpdates") - before;
    // conflict_backoff_seconds = 0.4 (±10 %): about 5 polls in 2 s, never hundreds.
    assert!((2..=8).contains(&polls), "{polls} polls in 2 s");
    let conflicts = e.metric("vpnbot_bot_errors_total", &[("kind", "conflict")]);
    assert!(conflicts >= 2.0, "{conflicts}");
    assert!(
        e.metric(
            "vpnbot_bot_api_requests_total",
            &[("method", "getUpdates"), ("outcome", "conflict")]
        ) >= 2.0
    );
    e.sim.set_updates_fault(UpdatesFault::None);
    e.say(&u, "/help", has("/status")).await;
}

/// Two instances against one database and one token: only the leader polls (never two
/// pollers at once, no 409 between them), and the bot answers.
#[sqlx::test(migrations = false)]
async fn two_instances_only_the_leader_polls(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (sim, node) = start_sims().await;
    let cfg = bot_config(&opts, &sim, &node);
    let a = App::start(cfg.clone()).await.unwrap();
    let b = App::start(cfg).await.unwrap();
    assert!(a.bot.is_some() && b.bot.is_some());
    let u = SimUser::new(10, "en");
    let from = sim.sent_to(u.id).len();
    sim.send_text(&u, "/start");
    // Leadership is taken after the takeover delay (1 s in tests).
    sim.wait_for(u.id, from, WAIT, has("Welcome"))
        .await
        .expect("the leader answers");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sim.max_concurrent_polls(), 1, "one poller at a time");
    assert_eq!(sim.conflicts(), 0);
    assert_eq!(
        a.leader.is_leader() as u8 + b.leader.is_leader() as u8,
        1,
        "exactly one leader"
    );
    // The follower never polled: its registry shows no getUpdates.
    let (leader, follower) = if a.leader.is_leader() { (a, b) } else { (b, a) };
    let text = vpnbot::metrics::render(&follower.registry);
    assert_eq!(
        helpers::metric(
            &text,
            "vpnbot_bot_api_requests_total",
            &[("method", "getUpdates"), ("outcome", "ok")]
        ),
        None
    );
    // Hand-over: the leader stops; the follower takes over and answers.
    leader.shutdown().await;
    let from = sim.sent_to(u.id).len();
    sim.send_text(&u, "/help");
    sim.wait_for(u.id, from, Duration::from_secs(10), has("/status"))
        .await
        .expect("the new leader answers");
    assert!(follower.leader.is_leader());
    assert_eq!(sim.max_concurrent_polls(), 1);
    follower.shutdown().await;
}

/// The receive loop is a tracked operation for the watchdog: a dump shows its phase (a hung
/// `getUpdates` as `long_poll`, with the phase's deadline: poll timeout + margin + 1 s), and a
/// stopped loop leaves no entry behind.
#[sqlx::test(migrations = false)]
async fn the_receive_loop_is_a_tracked_operation(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (sim, node) = start_sims().await;
    let cfg = bot_config(&opts, &sim, &node);
    let app = App::start(cfg).await.unwrap();
    let u = SimUser::new(20, "en");
    sim.send_text(&u, "/help");
    sim.wait_for(u.id, 0, WAIT, has("/status"))
        .await
        .expect("the leader answers");
    let bot = app.bot.clone().unwrap();
    assert_eq!(
        bot.polling_operation().phase(),
        Some(vpnbot::bot::PollPhase::LongPoll)
    );

    sim.set_updates_fault(UpdatesFault::Hang);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let d = app.diagnostics.dump_now();
    let entries = d
        .inflight
        .get("bot_polling")
        .expect("a bot_polling section");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0];
    assert_eq!(e.phase.as_deref(), Some("long_poll"));
    assert_eq!(e.task.as_deref(), Some("bot_polling"));
    assert_eq!(e.deadline, Some(Duration::from_millis(2500)));
    assert!(e.age < Duration::from_millis(2600), "{e:?}");
    // Bounded polls keep completing: the loop is neither overdue nor a stalled worker.
    assert!(
        !d.overdue
            .iter()
            .any(|e| e.task.as_deref() == Some("bot_polling")),
        "{:?}",
        d.overdue
    );
    assert!(
        !d.worker_overdue.iter().any(|w| w.contains("bot_polling")),
        "{:?}",
        d.worker_overdue
    );

    let diagnostics = app.diagnostics.clone();
    app.shutdown().await;
    assert_eq!(bot.polling_operation().phase(), None);
    let d = diagnostics.dump_now();
    assert!(
        d.inflight.get("bot_polling").is_none_or(|v| v.is_empty()),
        "{:?}",
        d.inflight
    );
}
