//! Conversation tests of the bot through the Bot API stand-in (real HTTP, real teloxide
//! client), with real PostgreSQL and the node simulator: every command and button, trial,
//! Telegram Stars purchase (T4), key and QR, English and Russian, hostile input (T5), admin
//! commands and non-admin silence, a node failing during key issuing, reminders once.

use crate::helpers;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use helpers::bot::{env, ADMIN, WAIT};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;
use vpnbot::bot::ReconcileTrigger;
use vpnbot::node::Operation;
use vpnbot::tasks::Tasks;
use vpnbot_sim::botapi::SimUser;
use vpnbot_sim::node::Fault;

use crate::helpers::bot::has;

#[sqlx::test(migrations = false)]
async fn start_help_status_in_english_and_russian(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let en = SimUser::new(1001, "en");
    let ru = SimUser::new(1002, "ru-RU");

    // No reconcile runner in this instance.
    let admin = SimUser::new(ADMIN, "en");
    e.say(&admin, "/reconcile", has("not available")).await;

    let m = e.say(&en, "/start", has("Welcome")).await;
    assert_eq!(m.method, "sendMessage");
    assert_eq!(m.buttons(), ["trial", "buy", "status", "key", "help"]);
    let m = e.say(&ru, "/start", has("Добро пожаловать")).await;
    assert_eq!(m.buttons().len(), 5);
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM bot_users WHERE telegram_id IN (1001, 1002)")
            .await,
        2,
        "/start registers"
    );
    e.say(&en, "/help", has("/status")).await;
    e.say(&ru, "/help", has("Команды")).await;
    e.say(&en, "/status", has("no subscription")).await;
    e.say(&ru, "/status", has("нет подписки")).await;
    e.say(&en, "/key", has("no key")).await;
    // Buttons do what the commands do.
    let menu = e.say(&en, "/start", has("Welcome")).await;
    e.press(&en, menu.message_id, "help", has("/trial")).await;
    e.press(&en, menu.message_id, "status", has("no subscription"))
        .await;
    // The command menu was registered in both languages.
    assert!(e.sim.commands().is_some());
    assert!(e.sim.requests("setMyCommands") >= 2);
    assert!(e.metric("vpnbot_bot_updates_total", &[("kind", "message")]) >= 8.0);
    assert!(e.metric("vpnbot_bot_updates_total", &[("kind", "callback_query")]) >= 2.0);
    assert!(
        e.metric(
            "vpnbot_bot_api_requests_total",
            &[("method", "getUpdates"), ("outcome", "ok")]
        ) >= 1.0
    );
    assert!(e.metric("vpnbot_bot_polling_last_success_timestamp_seconds", &[]) > 1.7e9);
    let text = e.metrics();
    assert!(text.contains("vpnbot_bot_handler_duration_seconds_count{handler=\"start\"}"));
    // Label values only (a sample value or timestamp may contain the digits by chance).
    let labels_with_id: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some(&l[l.find('{')?..=l.rfind('}')?]))
        .filter(|labels| labels.contains("1001"))
        .collect();
    assert!(
        labels_with_id.is_empty(),
        "user id in labels: {labels_with_id:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn trial_issues_a_key_with_link_and_qr_once(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let u = SimUser::new(2001, "en");
    let menu = e.say(&u, "/start", has("Welcome")).await;
    let photo = e
        .press(&u, menu.message_id, "trial", |m| m.method == "sendPhoto")
        .await;
    let msgs = e.sim.sent_to(u.id);
    assert!(msgs.iter().any(|m| m.text.contains("free trial is active")));
    assert!(!msgs.iter().any(|m| m.text.contains("did not confirm")));
    let uuid: Uuid = {
        let mut c = e.pool.acquire("test").await.unwrap();
        sqlx::query_scalar("SELECT vless_uuid FROM subscriptions WHERE owner_id = 2001")
            .fetch_one(&mut *c)
            .await
            .unwrap()
    };
    assert!(photo
        .text
        .contains(&format!("vless://{uuid}@a.example:443?encryption=none")));
    let png = photo.photo.as_ref().unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        e.node
            .users()
            .iter()
            .any(|n| n.uuid == uuid && n.is_owned()),
        "the node has the key"
    );
    // Once only, by command or button.
    e.say(&u, "/trial", has("already been used")).await;
    // A fresh /start no longer offers the trial.
    let menu = e.say(&u, "/start", has("Welcome")).await;
    assert!(!menu.buttons().contains(&"trial".to_string()));
    e.say(&u, "/status", |m| {
        m.text.contains("active") && m.text.contains("Server: a")
    })
    .await;
    let again = e.say(&u, "/key", |m| m.method == "sendPhoto").await;
    assert!(again.text.contains(&uuid.to_string()));
    // Russian caption for a Russian user.
    let ru = SimUser::new(2002, "ru");
    e.say(&ru, "/trial", |m| {
        m.method == "sendPhoto" && m.text.contains("Ваш ключ")
    })
    .await;
}

/// Purchase: /buy, plan button, invoice in XTR, pre-checkout validated, payment credited once
/// per charge id (T4), renewal extends.
#[sqlx::test(migrations = false)]
async fn purchase_with_stars_credits_once_per_charge(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let u = SimUser::new(3001, "en");
    let plans = e.say(&u, "/buy", has("Choose a plan")).await;
    assert_eq!(plans.buttons(), ["plan:month", "plan:quarter", "plan:year"]);
    let inv = e
        .press(&u, plans.message_id, "plan:month", |m| {
            m.method == "sendInvoice"
        })
        .await;
    assert_eq!(inv.params["currency"], "XTR");
    assert_eq!(inv.params["payload"], "v1:month");
    assert_eq!(inv.params["prices"][0]["amount"], 100);

    // Pre-checkout: the right invoice is accepted, a wrong price or payload refused.
    let q = e.sim.pre_checkout(&u, "v1:month", "XTR", 100);
    let a = e.sim.wait_answer(&q, WAIT).await.unwrap();
    assert!(a.ok, "{a:?}");
    for (payload, cur, amount) in [
        ("v1:month", "XTR", 1),
        ("v1:nope", "XTR", 100),
        ("v1:month", "USD", 100),
        ("garbage\u{0}", "XTR", 100),
    ] {
        let q = e.sim.pre_checkout(&u, payload, cur, amount);
        let a = e.sim.wait_answer(&q, WAIT).await.unwrap();
        assert!(!a.ok && a.text.is_some(), "{payload} {cur} {amount}: {a:?}");
    }
    assert_eq!(
        e.metric("vpnbot_bot_payments_total", &[("outcome", "rejected")]),
        4.0
    );

    // The same successful_payment twice: credited once.
    let from = e.sim.sent_to(u.id).len();
    e.sim
        .successful_payment(&u, "v1:month", "XTR", 100, "charge-1");
    e.sim
        .wait_for(u.id, from, WAIT, |m| m.method == "sendPhoto")
        .await
        .expect("key delivered after payment");
    let from = e.sim.sent_to(u.id).len();
    e.sim
        .successful_payment(&u, "v1:month", "XTR", 100, "charge-1");
    e.sim
        .wait_for(u.id, from, WAIT, has("already been credited"))
        .await
        .expect("duplicate acknowledged");
    assert_eq!(e.scalar_i64("SELECT count(*) FROM payments").await, 1);
    let days = e
        .scalar_i64("SELECT round(EXTRACT(EPOCH FROM expires_at - now()) / 86400)::bigint FROM subscriptions WHERE owner_id = 3001")
        .await;
    assert_eq!(days, 30);
    assert_eq!(
        e.metric("vpnbot_bot_payments_total", &[("outcome", "credited")]),
        1.0
    );
    assert_eq!(
        e.metric("vpnbot_bot_payments_total", &[("outcome", "duplicate")]),
        1.0
    );
    assert!(
        e.scalar_i64("SELECT count(*) FROM payments WHERE subscription_id IS NOT NULL")
            .await
            == 1
    );

    // A duplicate delivered concurrently with the first delivery of another charge.
    let from = e.sim.sent_to(u.id).len();
    for _ in 0..3 {
        e.sim
            .successful_payment(&u, "v1:quarter", "XTR", 250, "charge-2");
    }
    e.sim
        .wait_for(u.id, from, WAIT, has("Payment received: 3 months"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(e.scalar_i64("SELECT count(*) FROM payments").await, 2);
    let days = e
        .scalar_i64("SELECT round(EXTRACT(EPOCH FROM expires_at - now()) / 86400)::bigint FROM subscriptions WHERE owner_id = 3001")
        .await;
    assert_eq!(days, 120, "renewal extends from the current expiry");
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM subscriptions WHERE owner_id = 3001")
            .await,
        1,
        "one subscription, one key"
    );
    assert_eq!(
        e.scalar_i64("SELECT coalesce(sum(amount),0)::bigint FROM payments")
            .await,
        350
    );
}

/// T5: hostile and odd input gets a polite answer or is ignored; never a panic, never someone
/// else's data.
#[sqlx::test(migrations = false)]
async fn hostile_input_is_answered_politely_or_ignored(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let victim = SimUser::new(4001, "en");
    let attacker = SimUser::new(4002, "en");
    e.say(&victim, "/trial", |m| m.method == "sendPhoto").await;

    e.say(
        &attacker,
        "/definitely_not_a_command",
        has("don't know that command"),
    )
    .await;
    e.say(
        &attacker,
        &"A".repeat(4000),
        has("only understand commands"),
    )
    .await;
    e.say(
        &attacker,
        "\u{0}\u{1}\u{7f}\u{202e}бинарный текст 🔥",
        has("only understand commands"),
    )
    .await;
    e.say(
        &attacker,
        &format!("/{}", "x".repeat(2000)),
        has("only understand commands"),
    )
    .await;
    e.say(&attacker, "/status@other_bot 4001", has("no subscription"))
        .await;

    // Forged callbacks: unknown data, a plan that does not exist, a victim's chat.
    for data in [
        "plan:../../etc",
        "plan:",
        "admin:stats",
        "key:4001",
        &"z".repeat(200),
    ] {
        let q = e.sim.press(&attacker, 1, data);
        let a = e
            .sim
            .wait_answer(&q, WAIT)
            .await
            .expect("callback answered");
        assert_eq!(
            a.text.as_deref(),
            Some("This button is no longer valid."),
            "{data}"
        );
    }
    let forged = json!({"callback_query": {
        "id": "forged1", "from": attacker.user_json(), "chat_instance": "x", "data": "key",
        "message": {"message_id": 1, "date": 0, "chat": victim.chat_json(), "text": "x"}}});
    e.sim.inject(forged);
    let a = e.sim.wait_answer("forged1", WAIT).await.unwrap();
    assert!(a.text.is_some(), "a button under another chat is refused");

    // Ignored: edited messages, channel posts, groups, bots.
    let before = e.sim.sent().len();
    let msg = e
        .sim
        .user_message(&attacker, json!({"text": "/key", "edit_date": 1}));
    e.sim.inject(json!({"edited_message": msg}));
    e.sim
        .inject(json!({"channel_post": {"message_id": 5, "date": 0,
        "chat": {"id": -1001, "type": "channel", "title": "c"}, "text": "/start"}}));
    e.sim.inject(json!({"message": {"message_id": 6, "date": 0,
        "chat": {"id": -2002, "type": "group", "title": "g"}, "from": attacker.user_json(),
        "text": "/key"}}));
    e.sim.inject(json!({"message": {"message_id": 7, "date": 0,
        "chat": {"id": 4003, "type": "private", "first_name": "b"},
        "from": {"id": 4003, "is_bot": true, "first_name": "b"}, "text": "/start"}}));
    e.sim.inject(json!({"poll": {"id": "p", "question": "?", "options": [], "total_voter_count": 0,
        "is_closed": false, "is_anonymous": true, "type": "regular", "allows_multiple_answers": false}}));
    // A later command is still answered, so the ignored ones were processed.
    e.say(&attacker, "/help", has("/status")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after: Vec<_> = e.sim.sent().into_iter().skip(before).collect();
    assert_eq!(after.len(), 1, "only the /help answer: {after:#?}");
    assert!(e.metric("vpnbot_bot_updates_total", &[("kind", "edited_message")]) >= 1.0);
    assert!(e.metric("vpnbot_bot_updates_total", &[("kind", "channel_post")]) >= 1.0);
    assert!(e.metric("vpnbot_bot_updates_total", &[("kind", "group_message")]) >= 1.0);
    // Nothing the attacker received names the victim's key.
    let victim_uuid: Uuid = {
        let mut c = e.pool.acquire("test").await.unwrap();
        sqlx::query_scalar("SELECT vless_uuid FROM subscriptions WHERE owner_id = 4001")
            .fetch_one(&mut *c)
            .await
            .unwrap()
    };
    for m in e.sim.sent_to(attacker.id) {
        assert!(!m.text.contains(&victim_uuid.to_string()));
    }
    assert_eq!(
        e.metric("vpnbot_bot_errors_total", &[("kind", "panic")]),
        0.0
    );
}

#[derive(Debug)]
struct FakeReconcile;

impl ReconcileTrigger for FakeReconcile {
    fn run_once(
        &self,
        node: Option<String>,
        dry_run: bool,
    ) -> BoxFuture<'static, Result<String, vpnbot::bot::ReconcileTriggerError>> {
        Box::pin(async move { Ok(format!("node={node:?} dry={dry_run} orphans=0 removed=0")) })
    }
}

#[sqlx::test(migrations = false)]
async fn admin_commands_answer_admins_only(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = helpers::bot::env_with_reconcile(&opts, |_| {}, Some(Arc::new(FakeReconcile))).await;
    let admin = SimUser::new(ADMIN, "en");
    let user = SimUser::new(5001, "en");
    e.say(&user, "/trial", |m| m.method == "sendPhoto").await;

    let unknown = e.say(&user, "/nosuch", has("don't know")).await.text;
    for cmd in ["/stats", "/diag", "/reconcile", "/reconcile a dry"] {
        let m = e.say(&user, cmd, |_| true).await;
        assert_eq!(m.text, unknown, "{cmd}: a non-admin sees no sign it exists");
    }
    let stats = e.say(&admin, "/stats", has("Stats")).await;
    assert!(stats.text.contains("users: 1"), "{}", stats.text);
    assert!(
        stats.text.contains("active subscriptions: 1 (trials: 1)"),
        "{}",
        stats.text
    );
    let diag = e.say(&admin, "/diag", has("Diagnostics")).await;
    for part in [
        "stall: none",
        "breakers: a=closed",
        "pool: ",
        "last reconcile: none",
        "latest dump: none",
        "last poll:",
    ] {
        assert!(diag.text.contains(part), "{part} in {}", diag.text);
    }
    e.say(&admin, "/reconcile zz", has("Unknown node")).await;
    let r = e
        .say(&admin, "/reconcile a dry", has("Reconcile (dry run)"))
        .await;
    assert!(r.text.contains("node=Some(\"a\") dry=true"), "{}", r.text);
    // Admin commands are not advertised in the public command menu.
    let cmds = e.sim.commands().unwrap().to_string();
    assert!(!cmds.contains("stats") && !cmds.contains("diag"));
}

/// The node refuses the add while a key is issued: the subscription stays written, the user
/// is told honestly, the outbox completes the add later.
#[sqlx::test(migrations = false)]
async fn node_failure_during_key_issue_is_told_and_completed_later(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env(&opts).await;
    e.node.set_fault(Operation::AddUser, Fault::Reset);
    let u = SimUser::new(6001, "en");
    e.say(&u, "/trial", |m| m.method == "sendPhoto").await;
    let msgs = e.sim.sent_to(u.id);
    assert!(
        msgs.iter()
            .any(|m| m.text.contains("did not confirm your key yet")),
        "{msgs:#?}"
    );
    assert_eq!(
        e.scalar_i64(
            "SELECT count(*) FROM subscriptions WHERE owner_id = 6001 AND status = 'active'"
        )
        .await,
        1
    );
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM pending_node_ops WHERE op = 'add' AND done_at IS NULL")
            .await,
        1
    );
    assert!(e.node.users().is_empty());
    assert_eq!(
        e.metric("vpnbot_bot_errors_total", &[("kind", "node_pending")]),
        1.0
    );

    e.node.set_fault(Operation::AddUser, Fault::None);
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.applied, 1, "{pass:?}");
    assert_eq!(e.node.users().len(), 1);
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM pending_node_ops WHERE done_at IS NULL")
            .await,
        0
    );
}

/// A node that never answers holds a handler slot for `bot.key_issue_timeout_seconds`, not for
/// the node client's deadline with retries: the user is told at once that the key is not
/// confirmed yet, the add waits in the outbox, and the outbox completes it once the node
/// answers again.
#[sqlx::test(migrations = false)]
async fn hung_node_during_key_issue_answers_within_the_key_issue_bound(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = helpers::bot::env_with(&opts, |c| {
        c.node_client.total_deadline_seconds = Duration::from_secs(5);
        c.node_client.headers_timeout_seconds = Duration::from_secs(5);
        c.bot.key_issue_timeout_seconds = std::time::Duration::from_millis(400);
    })
    .await;
    e.node.set_fault(Operation::AddUser, Fault::NoHeaders);
    let u = SimUser::new(6101, "en");
    let t = std::time::Instant::now();
    e.say(&u, "/trial", |m| {
        m.text.contains("did not confirm your key yet")
    })
    .await;
    let took = t.elapsed();
    // 0.4 s bound plus the trial's own work; the node client alone would wait 5 s.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM pending_node_ops WHERE op = 'add' AND done_at IS NULL")
            .await,
        1
    );
    assert_eq!(
        e.metric("vpnbot_bot_errors_total", &[("kind", "node_pending")]),
        1.0
    );
    e.node.set_fault(Operation::AddUser, Fault::None);
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!(pass.applied, 1, "{pass:?}");
    assert_eq!(e.node.users().len(), 1);
}

/// Reminders 3 days and 1 day before expiry, each at most once; expired subscriptions are
/// marked and their removal queued, the user notified once.
#[sqlx::test(migrations = false)]
async fn reminders_are_sent_once_and_expiry_queues_removal(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let e = env(&opts).await;
    e.exec("INSERT INTO bot_users (telegram_id, language_code) VALUES (7001, 'en'), (7002, 'ru'), (7003, 'en'), (7004, 'en')").await;
    e.exec(
        "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at) VALUES \
         (7001, 'a', gen_random_uuid(), 'month', now() + interval '2 days'), \
         (7002, 'a', gen_random_uuid(), 'month', now() + interval '12 hours'), \
         (7003, 'a', gen_random_uuid(), 'month', now() - interval '1 minute'), \
         (7004, 'a', gen_random_uuid(), 'month', now() + interval '20 days')",
    )
    .await;
    let p = e.expiry.run_once().await.unwrap();
    assert_eq!(
        (p.expired, p.reminded_3d, p.reminded_1d, p.sent),
        (1, 1, 1, 3),
        "{p:?}"
    );
    assert!(e
        .sim
        .sent_to(7001)
        .iter()
        .any(|m| m.text.contains("less than 3 day")));
    assert!(e
        .sim
        .sent_to(7002)
        .iter()
        .any(|m| m.text.contains("менее чем через 1 дн.")));
    assert!(e
        .sim
        .sent_to(7003)
        .iter()
        .any(|m| m.text.contains("has expired")));
    assert!(e.sim.sent_to(7004).is_empty());
    assert_eq!(
        e.scalar_i64(
            "SELECT count(*) FROM pending_node_ops WHERE op = 'remove' AND done_at IS NULL"
        )
        .await,
        1
    );
    // Later passes send nothing more.
    let p = e.expiry.run_once().await.unwrap();
    assert_eq!(p, Default::default());
    e.exec(
        "UPDATE subscriptions SET expires_at = now() + interval '20 hours' WHERE owner_id = 7001",
    )
    .await;
    let p = e.expiry.run_once().await.unwrap();
    assert_eq!(
        (p.reminded_1d, p.reminded_3d),
        (1, 0),
        "the 1-day reminder follows the 3-day one"
    );
    let p = e.expiry.run_once().await.unwrap();
    assert_eq!(p, Default::default());
    for id in [7001, 7002, 7003] {
        let n = e.sim.sent_to(id).len();
        assert!(n <= 2, "{id}: {n}");
    }
    assert_eq!(
        e.metric(
            "vpnbot_expiry_reminders_total",
            &[("window", "3d"), ("outcome", "sent")]
        ),
        1.0
    );
    // A renewal after expiry re-activates the same key on its node.
    let u = SimUser::new(7003, "en");
    let from = e.sim.sent_to(u.id).len();
    e.sim
        .successful_payment(&u, "v1:month", "XTR", 100, "charge-renew");
    e.sim
        .wait_for(u.id, from, WAIT, |m| m.method == "sendPhoto")
        .await
        .unwrap();
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM subscriptions WHERE owner_id = 7003 AND status = 'active' AND expires_at > now() + interval '29 days'").await,
        1
    );
    // The renewal's add replaced the queued removal (one open intent per key) and the node
    // confirmed it: nothing is left for the outbox, the key is on the node.
    assert_eq!(
        e.scalar_i64("SELECT count(*) FROM pending_node_ops WHERE done_at IS NULL")
            .await,
        0
    );
    let pass = e.outbox.process_once().await.unwrap();
    assert_eq!((pass.due, pass.skipped_live), (0, 0), "{pass:?}");
    let on_node = e
        .scalar_i64(&format!(
            "SELECT count(*) FROM subscriptions WHERE owner_id = 7003 AND vless_uuid IN ({})",
            e.node
                .users()
                .iter()
                .map(|u| format!("'{}'", u.uuid))
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await;
    assert_eq!(on_node, 1, "the renewed key is on the node");
}

/// branch `break` (T5): updates teloxide cannot parse as their kind, a callback with no
/// message (inline), a text of 1 MiB, a language code of 10 kB: the loop keeps polling, no
/// panic, the attacker gets nothing of the victim's.
#[sqlx::test(migrations = false)]
async fn malformed_updates_do_not_stop_polling(_p: PgPoolOptions, opts: PgConnectOptions) {
    let e = env(&opts).await;
    let victim = SimUser::new(4101, "en");
    let attacker = SimUser::new(4102, "en");
    e.say(&victim, "/trial", |m| m.method == "sendPhoto").await;
    e.sim
        .inject(json!({"message": {"message_id": "NaN", "date": "x", "chat": 5}}));
    e.sim.inject(json!({"message": 5}));
    e.sim
        .inject(json!({"callback_query": {"id": "bad1", "from": 7}}));
    e.sim.inject(json!({"unknown_kind": {"a": 1}}));
    e.sim.inject(json!({}));
    let q = json!({"callback_query": {
        "id": "inline1", "from": attacker.user_json(), "chat_instance": "x", "data": "key",
        "inline_message_id": "AAAA"}});
    e.sim.inject(q);
    let a = e.sim.wait_answer("inline1", WAIT).await;
    assert!(a.is_some(), "inline callback answered");
    let big = SimUser::new(4103, &"x".repeat(10_000));
    e.say(&big, &"B".repeat(1 << 20), has("only understand commands"))
        .await;
    e.say(&attacker, "/help", has("/status")).await;
    let victim_uuid: Uuid = {
        let mut c = e.pool.acquire("test").await.unwrap();
        sqlx::query_scalar("SELECT vless_uuid FROM subscriptions WHERE owner_id = 4101")
            .fetch_one(&mut *c)
            .await
            .unwrap()
    };
    for m in e.sim.sent_to(attacker.id) {
        assert!(!m.text.contains(&victim_uuid.to_string()), "{m:?}");
    }
    assert_eq!(
        e.metric("vpnbot_bot_errors_total", &[("kind", "panic")]),
        0.0
    );
}

/// `least_loaded` sends new subscriptions to the node with the fewest active ones. The counts
/// are loaded once and kept by counting its own picks; a reload runs in the background once
/// they are older than the refresh period, and no pick waits for it (counting is a scan of
/// every active subscription: per purchase it made a burst during a reconcile pass take 47 s).
#[sqlx::test(migrations = false)]
async fn least_loaded_picks_the_emptiest_node_and_reloads_counts_in_the_background(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use vpnbot::bot::node_picker::NodePicker;
    let cfg = helpers::test_config(&opts);
    let registry = vpnbot::metrics::new_registry();
    let pool = vpnbot::db::DbPool::connect(&cfg.db, &registry).unwrap();
    vpnbot::db::migrate(&pool).await.unwrap();
    let mut c = pool.acquire("test").await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO bot_users (telegram_id) VALUES (1); \
         INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at) \
         SELECT 1, n, gen_random_uuid(), 'month', now() + interval '9 days' \
         FROM unnest(ARRAY['a','a','a','b']) AS n; \
         INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at, status) \
         SELECT 1, 'b', gen_random_uuid(), 'month', now(), 'expired' FROM generate_series(1, 5)",
    )
    .execute(&mut *c)
    .await
    .unwrap();
    let abc = || vec!["a".to_string(), "b".to_string(), "c".to_string()];
    let refresh = Duration::from_millis(300);
    let picker =
        NodePicker::new(abc(), "least_loaded", pool.clone(), &Tasks::new()).with_refresh(refresh);
    let mut picks = Vec::new();
    for _ in 0..6 {
        picks.push(picker.pick(&mut c).await.unwrap().unwrap());
    }
    // Counts a=3, b=1 (expired ones do not count), c=0: c, then b and c alternate with ties
    // going to the first name, until all reach 3.
    assert_eq!(picks, ["c", "b", "c", "b", "c", "a"], "{picks:?}");

    // Rows written behind the picker's back (other instances, expiry) are not seen within
    // the refresh period: counts now a=4, b=3, c=3 in its view, so b.
    sqlx::query(
        "INSERT INTO subscriptions (owner_id, node, vless_uuid, plan, expires_at) \
         SELECT 1, 'c', gen_random_uuid(), 'month', now() + interval '9 days' \
         FROM generate_series(1, 50)",
    )
    .execute(&mut *c)
    .await
    .unwrap();
    assert_eq!(picker.pick(&mut c).await.unwrap().as_deref(), Some("b"));
    // Once stale, a pick starts the reload and still answers from the old counts (a=4, b=4,
    // c=3: c); after the reload the database's a=3, b=1, c=50 rule.
    tokio::time::sleep(refresh).await;
    assert_eq!(picker.pick(&mut c).await.unwrap().as_deref(), Some("c"));
    // The reload is one small query; a second is plenty even on a loaded machine (a later
    // pick may start another reload, but answers from this one's counts).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(picker.pick(&mut c).await.unwrap().as_deref(), Some("b"));
    assert_eq!(picker.pick(&mut c).await.unwrap().as_deref(), Some("b"));
    assert_eq!(picker.pick(&mut c).await.unwrap().as_deref(), Some("a"));

    let first = NodePicker::new(abc(), "first", pool.clone(), &Tasks::new());
    assert_eq!(first.pick(&mut c).await.unwrap().as_deref(), Some("a"));
    let none = NodePicker::new(vec![], "least_loaded", pool.clone(), &Tasks::new());
    assert_eq!(none.pick(&mut c).await.unwrap(), None);
}
