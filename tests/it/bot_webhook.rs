//! Issue 19, the Telegram half: webhook mode on every instance, deduplication on `update_id`
//! in PostgreSQL, the switching commands, and the proof with three `vpnbot run` processes
//! behind the Bot API stand-in's push mode (round-robin, retries, forced redeliveries, one
//! instance SIGKILLed mid-burst).

use crate::helpers;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use vpnbot::app::App;
use vpnbot::config::{Config, TelegramMode};
use vpnbot_sim::botapi::{BotApiSimHandle, PushOptions, SimUser};
use vpnbot_sim::node::SimNodeHandle;

const SECRET: &str = "s3cret_Token-for-tests";

/// An in-process instance in webhook mode (listener on port 0) with the stand-ins.
async fn webhook_app(
    opts: &PgConnectOptions,
    tweak: impl FnOnce(&mut Config),
) -> (App, BotApiSimHandle, SimNodeHandle) {
    let (sim, node) = helpers::bot::start_sims().await;
    let mut cfg = helpers::bot::bot_config(opts, &sim, &node);
    cfg.telegram.mode = TelegramMode::Webhook;
    cfg.telegram.webhook.listen = "127.0.0.1:0".parse().unwrap();
    cfg.telegram.webhook.public_url = "http://127.0.0.1:1/hook".into();
    cfg.telegram.webhook.secret_token = SECRET.to_string().into();
    cfg.reconcile.enabled = false;
    tweak(&mut cfg);
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    let app = App::start(cfg).await.unwrap();
    (app, sim, node)
}

/// POSTs `body` to the webhook at `addr` with `secret` (none: no header); the status.
async fn post(addr: SocketAddr, secret: Option<&str>, body: &Value) -> u16 {
    let mut r = reqwest::Client::new()
        .post(format!("http://{addr}/hook"))
        .timeout(Duration::from_secs(10))
        .json(body);
    if let Some(s) = secret {
        r = r.header("X-Telegram-Bot-Api-Secret-Token", s);
    }
    r.send().await.unwrap().status().as_u16()
}

fn outcome(app: &App, o: &str) -> f64 {
    helpers::metric(
        &vpnbot::metrics::render(&app.registry),
        "vpnbot_bot_webhook_requests_total",
        &[("outcome", o)],
    )
    .unwrap_or(0.0)
}

/// A `/help` message update from `user` with `update_id`.
fn help_update(sim: &BotApiSimHandle, user: &SimUser, update_id: i64) -> Value {
    let msg = sim.user_message(
        user,
        json!({"text": "/help", "entities": [{"type": "bot_command", "offset": 0, "length": 5}]}),
    );
    json!({"update_id": update_id, "message": msg})
}

#[sqlx::test(migrations = false)]
async fn wrong_or_missing_secret_is_401_and_counted(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (app, sim, _node) = webhook_app(&opts, |_| {}).await;
    let addr = app.webhook_addr.expect("webhook listener");
    let u = SimUser::new(4101, "en");
    let upd = help_update(&sim, &u, 1);
    assert_eq!(post(addr, Some("wrong"), &upd).await, 401);
    assert_eq!(post(addr, None, &upd).await, 401);
    // Same length, one character off: still refused.
    let mut near = SECRET.to_string();
    near.replace_range(0..1, "X");
    assert_eq!(post(addr, Some(&near), &upd).await, 401);
    assert_eq!(outcome(&app, "unauthorized"), 3.0);
    assert!(sim.sent_to(u.id).is_empty(), "nothing handled");
    // The right secret is handled and answered.
    assert_eq!(post(addr, Some(SECRET), &upd).await, 200);
    assert_eq!(sim.sent_to(u.id).len(), 1);
    assert_eq!(outcome(&app, "accepted"), 1.0);
    app.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn a_full_instance_answers_503_at_once(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (app, sim, _node) = webhook_app(&opts, |c| c.telegram.webhook.max_in_flight = 1).await;
    let addr = app.webhook_addr.unwrap();
    // Every reply takes 2 s: the first update holds the only slot.
    sim.set_message_delay(Some(Duration::from_secs(2)));
    let (a, b) = (SimUser::new(4201, "en"), SimUser::new(4202, "en"));
    let upd = help_update(&sim, &a, 10);
    let first = tokio::spawn(async move { post(addr, Some(SECRET), &upd).await });
    helpers::eventually(Duration::from_secs(5), || sim.message_attempts(a.id) == 1)
        .await
        .expect("the first update is being handled");
    let t = Instant::now();
    assert_eq!(
        post(addr, Some(SECRET), &help_update(&sim, &b, 11)).await,
        503
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "refused at once, not after waiting: {:?}",
        t.elapsed()
    );
    assert_eq!(outcome(&app, "overloaded"), 1.0);
    assert_eq!(first.await.unwrap(), 200);
    // Telegram's retry, once there is room, is handled.
    sim.set_message_delay(None);
    assert_eq!(
        post(addr, Some(SECRET), &help_update(&sim, &b, 11)).await,
        200
    );
    assert_eq!(sim.sent_to(b.id).len(), 1);
    app.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn a_duplicate_update_id_is_handled_once(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (app, sim, _node) = webhook_app(&opts, |_| {}).await;
    let addr = app.webhook_addr.unwrap();
    let u = SimUser::new(4301, "en");
    let upd = help_update(&sim, &u, 77);
    assert_eq!(post(addr, Some(SECRET), &upd).await, 200);
    assert_eq!(post(addr, Some(SECRET), &upd).await, 200);
    // Two deliveries at once: one handles it, the other is told to retry or sees it handled.
    let upd2 = help_update(&sim, &u, 78);
    let (x, y) = tokio::join!(
        post(addr, Some(SECRET), &upd2),
        post(addr, Some(SECRET), &upd2)
    );
    assert!(
        (x == 200 || x == 503) && (y == 200 || y == 503) && (x == 200 || y == 200),
        "{x} {y}"
    );
    assert_eq!(sim.sent_to(u.id).len(), 2, "{:#?}", sim.sent_to(u.id));
    assert_eq!(outcome(&app, "accepted"), 2.0);
    assert!(outcome(&app, "duplicate") >= 1.0);
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM bot_updates WHERE handled_at IS NOT NULL AND update_id IN (77, 78)",
    )
    .fetch_one(app.pool.raw())
    .await
    .unwrap();
    assert_eq!(rows, 2);
    app.shutdown().await;
}

#[sqlx::test(migrations = false)]
async fn a_payment_through_the_webhook_is_credited_once(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (app, sim, _node) = webhook_app(&opts, |_| {}).await;
    let addr = app.webhook_addr.unwrap();
    let u = SimUser::new(4401, "en");
    let payment = |update_id: i64| {
        let msg = sim.user_message(
            &u,
            json!({"successful_payment": {
                "currency": "XTR", "total_amount": 100, "invoice_payload": "v1:month",
                "telegram_payment_charge_id": "wh-charge-1", "provider_payment_charge_id": "",
            }}),
        );
        json!({"update_id": update_id, "message": msg})
    };
    // The same update twice (a Telegram retry), then the same charge in a new update.
    let first = payment(500);
    assert_eq!(post(addr, Some(SECRET), &first).await, 200);
    assert_eq!(post(addr, Some(SECRET), &first).await, 200);
    assert_eq!(post(addr, Some(SECRET), &payment(501)).await, 200);
    let credited = sim
        .sent_to(u.id)
        .iter()
        .filter(|m| m.text.contains("Payment received"))
        .count();
    assert_eq!(credited, 1, "{:#?}", sim.sent_to(u.id));
    let (payments, days): (i64, f64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM payments WHERE telegram_charge_id = 'wh-charge-1'), \
         (SELECT EXTRACT(EPOCH FROM expires_at - now())::float8 / 86400 FROM subscriptions \
          WHERE owner_id = 4401)",
    )
    .fetch_one(app.pool.raw())
    .await
    .unwrap();
    assert_eq!(payments, 1);
    assert!((29.0..=30.1).contains(&days), "credited once: {days} days");
    assert_eq!(outcome(&app, "duplicate"), 1.0);
    app.shutdown().await;
}

/// Expired rows go, in bounded batches; recent ones stay.
#[sqlx::test(migrations = false)]
async fn dedup_cleanup_deletes_expired_rows_in_batches(_p: PgPoolOptions, opts: PgConnectOptions) {
    let cfg = helpers::test_config(&opts);
    let registry = vpnbot::metrics::new_registry();
    let pool = vpnbot::db::DbPool::connect(&cfg.db, &registry).unwrap();
    vpnbot::db::migrate(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO bot_updates (update_id, received_at, handled_at) \
         SELECT g, now() - interval '2 days', now() - interval '2 days' \
         FROM generate_series(1, 2500) g",
    )
    .execute(pool.raw())
    .await
    .unwrap();
    sqlx::query("INSERT INTO bot_updates (update_id) SELECT g FROM generate_series(3000, 3009) g")
        .execute(pool.raw())
        .await
        .unwrap();
    let n = vpnbot::bot::dedup::cleanup(&pool, Duration::from_secs(86_400), 1000)
        .await
        .unwrap();
    assert_eq!(n, 2500);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM bot_updates")
        .fetch_one(pool.raw())
        .await
        .unwrap();
    assert_eq!(left, 10);
}

#[test]
fn check_config_lists_the_webhook_errors() {
    let out = helpers::vpnbot()
        .arg("check-config")
        .env("VPNBOT_DB__URL", "postgres://u@localhost/db")
        .env("VPNBOT_TELEGRAM__MODE", "webhook")
        .env("VPNBOT_TELEGRAM__WEBHOOK__SECRET_TOKEN", "not allowed!")
        .env(
            "VPNBOT_TELEGRAM__WEBHOOK__PUBLIC_URL",
            "http://bot.example.com/hook",
        )
        .env("VPNBOT_TELEGRAM__WEBHOOK__MAX_CONNECTIONS", "0")
        .env(
            "VPNBOT_TELEGRAM__WEBHOOK__ALLOWED_UPDATES",
            "[\"message\",\"nope\"]",
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for needle in [
        "telegram.webhook.secret_token must be 1-256 characters",
        "telegram.webhook.public_url must be an https:// URL",
        "telegram.webhook.max_connections must be 1-100",
        "`nope` is not a Telegram update type",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(
        !err.contains("not allowed!"),
        "the secret is never printed:\n{err}"
    );
    // Webhook mode without its secret and URL.
    let out = helpers::vpnbot()
        .arg("check-config")
        .env("VPNBOT_DB__URL", "postgres://u@localhost/db")
        .env("VPNBOT_TELEGRAM__MODE", "webhook")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("secret_token is empty"), "{err}");
    assert!(err.contains("public_url is empty"), "{err}");
}

/// `vpnbot webhook set|info|delete` against the stand-in; the secret is sent, never printed.
#[tokio::test]
async fn webhook_commands_switch_modes() {
    let (sim, _node) = helpers::bot::start_sims().await;
    let run = |cmd: &'static str| {
        let api = sim.api_url();
        let token = sim.token().to_string();
        async move {
            tokio::task::spawn_blocking(move || {
                helpers::vpnbot()
                    .args(["webhook", cmd])
                    .env("VPNBOT_DB__URL", "postgres://u@localhost/db")
                    .env("VPNBOT_TELEGRAM__TOKEN", token)
                    .env("VPNBOT_TELEGRAM__API_URL", api)
                    .env("VPNBOT_TELEGRAM__WEBHOOK__SECRET_TOKEN", SECRET)
                    .env(
                        "VPNBOT_TELEGRAM__WEBHOOK__PUBLIC_URL",
                        "https://bot.example.com/hook",
                    )
                    .env("VPNBOT_TELEGRAM__WEBHOOK__MAX_CONNECTIONS", "60")
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = run("set").await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    let w = sim.webhook().expect("webhook set");
    assert_eq!(w.url, "https://bot.example.com/hook");
    assert_eq!(w.secret_token.as_deref(), Some(SECRET));
    assert_eq!(w.max_connections, Some(60));
    assert_eq!(w.drop_pending_updates, Some(false));
    assert!(w
        .allowed_updates
        .unwrap()
        .to_string()
        .contains("pre_checkout_query"));

    let out = run("info").await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("url: https://bot.example.com/hook"), "{text}");
    assert!(text.contains("max_connections: 60"), "{text}");
    assert!(!text.contains(SECRET), "{text}");

    let out = run("delete").await;
    assert!(out.status.success());
    assert_eq!(sim.webhook(), None);
    let calls: Vec<String> = sim.webhook_calls().into_iter().map(|(m, _)| m).collect();
    assert_eq!(calls, ["setWebhook", "deleteWebhook"]);
    let out = run("info").await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("url: (none: polling mode)"));
}

/// A free loopback port (bound and released: a small race, fine on a test machine).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Instance {
    child: Child,
    webhook: SocketAddr,
    obs: SocketAddr,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_instance(db: &str, sim: &BotApiSimHandle, node: &SimNodeHandle) -> Instance {
    let webhook: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let obs: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = helpers::vpnbot()
        .arg("run")
        .env("VPNBOT_DB__URL", db)
        .env("VPNBOT_DB__MAX_CONNECTIONS", "8")
        .env("VPNBOT_TELEGRAM__TOKEN", sim.token())
        .env("VPNBOT_TELEGRAM__API_URL", sim.api_url())
        .env("VPNBOT_TELEGRAM__MODE", "webhook")
        .env("VPNBOT_TELEGRAM__WEBHOOK__LISTEN", webhook.to_string())
        .env(
            "VPNBOT_TELEGRAM__WEBHOOK__PUBLIC_URL",
            "http://127.0.0.1:1/hook",
        )
        .env("VPNBOT_TELEGRAM__WEBHOOK__SECRET_TOKEN", SECRET)
        .env("VPNBOT_TELEGRAM__WEBHOOK__MAX_IN_FLIGHT", "16")
        .env("VPNBOT_OBSERVABILITY__LISTEN", obs.to_string())
        .env("VPNBOT_OBSERVABILITY__LOG_FILTER", "warn")
        .env("VPNBOT_RECONCILE__ENABLED", "false")
        .env("VPNBOT_BOT__HANDLER_TIMEOUT_SECONDS", "3")
        .env("VPNBOT_BOT__REQUEST_TIMEOUT_SECONDS", "2")
        .env("VPNBOT_NODES__A__URL", node.base_url().to_string())
        .env("VPNBOT_NODES__A__API_KEY", node.api_key())
        .env("VPNBOT_NODES__A__PUBLIC_HOST", "a.example")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Instance {
        child,
        webhook,
        obs,
    }
}

async fn wait_listening(addr: SocketAddr) {
    let t = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{addr} never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The proof (item 6): three `vpnbot run` processes against one PostgreSQL in webhook mode;
/// the stand-in pushes 3,000 updates round-robin (2,900 `/help` from distinct users, 100
/// payments), re-delivers 150 already acknowledged ones, and one instance is SIGKILLed
/// mid-burst. Every update is answered (the dead instance's in-flight ones by the others after
/// its claims expire), none twice except, at most, those the killed instance had answered but
/// not yet marked (bounded by its in-flight limit), and every payment is credited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_answer_a_burst_once_through_a_kill() {
    if std::env::var("DATABASE_URL").is_err() {
        helpers::missing("DATABASE_URL (PostgreSQL) is not set");
        return;
    }
    vpnbot::telemetry::init_for_tests();
    let db = helpers::fresh_database("webhook_burst").await;
    let (sim, node) = helpers::bot::start_sims().await;
    let first = spawn_instance(&db, &sim, &node);
    wait_listening(first.webhook).await;
    let mut instances = vec![
        first,
        spawn_instance(&db, &sim, &node),
        spawn_instance(&db, &sim, &node),
    ];
    for i in &instances[1..] {
        wait_listening(i.webhook).await;
    }
    const HELP: i64 = 2900;
    const PAYMENTS: i64 = 100;
    let started = Instant::now();
    // Injected first, pushed as fast as the instances take them.
    for i in 0..HELP {
        sim.send_text(&SimUser::new(1_000_000 + i, "en"), "/help");
    }
    for i in 0..PAYMENTS {
        sim.successful_payment(
            &SimUser::new(2_000_000 + i, "en"),
            "v1:month",
            "XTR",
            100,
            &format!("burst-charge-{i}"),
        );
    }
    let urls = instances
        .iter()
        .map(|i| url::Url::parse(&format!("http://{}/hook", i.webhook)).unwrap())
        .collect();
    let mut push = PushOptions::new(urls, SECRET);
    push.connections = 24;
    push.timeout = Duration::from_secs(10);
    sim.start_push(push);

    helpers::eventually(Duration::from_secs(60), || {
        sim.push_stats().acknowledged >= 1000
    })
    .await
    .expect("a third of the burst acknowledged");
    let redelivered = sim.redeliver_acknowledged(150);
    assert_eq!(redelivered.len(), 150);
    helpers::eventually(Duration::from_secs(60), || {
        sim.push_stats().acknowledged >= 1700
    })
    .await
    .expect("half of the burst acknowledged");
    // SIGKILL mid-burst, while it has updates in flight.
    let victim = instances.remove(1);
    let mut victim_child = victim;
    victim_child.child.kill().unwrap();
    let killed_at = sim.push_stats();

    let total = (HELP + PAYMENTS) as usize;
    let done = helpers::eventually(Duration::from_secs(60), || {
        sim.acknowledged().len() == total && sim.queued() == 0 && sim.push_stats().in_flight == 0
    })
    .await;
    let stats = sim.push_stats();
    let elapsed = started.elapsed();
    assert!(done.is_some(), "not every update acknowledged: {stats:#?}");

    // Every /help answered; count the chats answered more than once.
    let mut per_chat: BTreeMap<i64, usize> = BTreeMap::new();
    for m in sim.sent() {
        *per_chat.entry(m.chat_id).or_default() += 1;
    }
    let unanswered: Vec<i64> = (0..HELP)
        .map(|i| 1_000_000 + i)
        .filter(|c| !per_chat.contains_key(c))
        .collect();
    assert!(unanswered.is_empty(), "unanswered: {unanswered:?}");
    let twice: Vec<i64> = (0..HELP)
        .map(|i| 1_000_000 + i)
        .filter(|c| per_chat[c] > 1)
        .collect();
    assert!(
        twice.len() <= 16,
        "answered twice beyond the killed instance's in-flight bound: {twice:?}"
    );
    // Payments: each charge recorded and credited once, each payer told once.
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(&db).await.unwrap();
    let (rows, distinct_owners, max_days): (i64, i64, f64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM payments WHERE telegram_charge_id LIKE 'burst-charge-%'), \
         (SELECT count(DISTINCT owner_id) FROM subscriptions WHERE owner_id >= 2000000), \
         (SELECT max(EXTRACT(EPOCH FROM expires_at - now()))::float8 / 86400 FROM subscriptions \
          WHERE owner_id >= 2000000)",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(rows, PAYMENTS);
    assert_eq!(distinct_owners, PAYMENTS);
    assert!(
        max_days <= 30.1,
        "a payment credited twice: {max_days} days"
    );
    for i in 0..PAYMENTS {
        let told = sim
            .sent_to(2_000_000 + i)
            .iter()
            .filter(|m| m.text.contains("Payment received"))
            .count();
        assert!(told >= 1, "payer {i} never told");
    }
    // The forced redeliveries were acknowledged without handling again.
    let dup: f64 = instances
        .iter()
        .map(|i| {
            let text = reqwest_blocking_metrics(i.obs);
            helpers::metric(&text, "vpnbot_bot_update_duplicates_total", &[]).unwrap_or(0.0)
        })
        .sum();
    let acked_twice = sim.acknowledged().values().filter(|n| **n > 1).count();
    eprintln!(
        "burst: {total} updates + 150 redelivered in {elapsed:?}; at kill: {killed_at:?}; \
         final: {stats:#?}; duplicates seen by survivors {dup}; acknowledged twice {acked_twice}; \
         answered twice {}",
        twice.len()
    );
    assert!(acked_twice >= 150, "the redeliveries reached the webhooks");
    assert!(
        stats.connection_errors + stats.statuses.values().sum::<u64>() > 0,
        "the kill made the stand-in retry"
    );
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
}

fn reqwest_blocking_metrics(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Polling mode started while a webhook is set: the webhook is left alone (deleting it would
/// take the updates of every webhook instance away), the error is logged and counted as a
/// conflict, and getUpdates' 409 keeps it visible.
#[sqlx::test(migrations = false)]
async fn polling_with_a_webhook_set_warns_and_leaves_it(_p: PgPoolOptions, opts: PgConnectOptions) {
    let (sim, node) = helpers::bot::start_sims().await;
    let r = reqwest::Client::new()
        .post(format!("{}bot{}/setWebhook", sim.api_url(), sim.token()))
        .json(&json!({"url": "https://bot.example.com/hook", "secret_token": SECRET}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let mut cfg = helpers::bot::bot_config(&opts, &sim, &node);
    cfg.reconcile.enabled = false;
    let app = App::start(cfg).await.unwrap();
    let conflicts = helpers::eventually(Duration::from_secs(15), || {
        helpers::metric(
            &vpnbot::metrics::render(&app.registry),
            "vpnbot_bot_errors_total",
            &[("kind", "conflict")],
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert!(conflicts.is_some(), "the set webhook is reported");
    assert!(sim.requests("getWebhookInfo") >= 1);
    assert!(sim.webhook().is_some(), "the webhook is not deleted");
    assert!(
        sim.webhook_calls()
            .iter()
            .all(|(m, _)| m != "deleteWebhook"),
        "{:?}",
        sim.webhook_calls()
    );
    app.shutdown().await;
}
