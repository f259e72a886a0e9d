//! Shared set-up of the bot tests: real PostgreSQL, the Bot API stand-in and the node
//! simulator over loopback, the bot's real receive loop.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use vpnbot::bot::{BotApi, BotDeps, BotMetrics, BotService, ReconcileTrigger};
use vpnbot::config::Config;
use vpnbot::db::DbPool;
use vpnbot::expiry::{ExpiryMetrics, ExpiryWorker};
use vpnbot::fleet::Fleet;
use vpnbot::outbox::{Outbox, OutboxMetrics, OutboxSettings};
use vpnbot_sim::botapi::{BotApiSim, BotApiSimHandle, BotApiSimOptions, SentMessage, SimUser};
use vpnbot_sim::node::{SimNode, SimNodeHandle, SimNodeOptions};

pub const ADMIN: i64 = 999;
pub const WAIT: Duration = Duration::from_secs(5);

pub struct Env {
    pub sim: BotApiSimHandle,
    pub node: SimNodeHandle,
    pub pool: DbPool,
    pub registry: prometheus::Registry,
    pub bot: BotService,
    pub outbox: Outbox,
    pub expiry: ExpiryWorker,
    pub cancel: CancellationToken,
    pub config: Config,
    pub join: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A config with the stand-in and node simulator filled in and short timings.
pub fn bot_config(opts: &PgConnectOptions, sim: &BotApiSimHandle, node: &SimNodeHandle) -> Config {
    let mut cfg = super::test_config(opts);
    cfg.telegram.token = secrecy::SecretString::from(sim.token().to_string());
    cfg.telegram.api_url = sim.api_url();
    cfg.telegram.admin_ids = vec![ADMIN];
    cfg.nodes.insert(
        "a".into(),
        vpnbot::config::NodeConfig::new(&node.base_url(), node.api_key(), "a.example"),
    );
    cfg.node_client.total_deadline_seconds = Duration::from_millis(1500);
    cfg.node_client.connect_timeout_seconds = Duration::from_millis(500);
    cfg.node_client.headers_timeout_seconds = Duration::from_millis(500);
    cfg.node_client.body_idle_timeout_seconds = Duration::from_millis(500);
    cfg.node_client.retry_max_attempts = 1;
    let b = &mut cfg.bot;
    b.poll_timeout_seconds = 1;
    b.poll_margin_seconds = std::time::Duration::from_millis(500);
    b.request_timeout_seconds = std::time::Duration::from_secs(2);
    b.backoff_base_seconds = std::time::Duration::from_millis(50);
    b.backoff_max_seconds = std::time::Duration::from_millis(200);
    b.conflict_backoff_seconds = std::time::Duration::from_millis(400);
    b.retry_after_max_seconds = std::time::Duration::from_secs(3);
    b.handler_timeout_seconds = std::time::Duration::from_secs(5);
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    cfg
}

pub async fn start_sims() -> (BotApiSimHandle, SimNodeHandle) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = BotApiSim::start(l, BotApiSimOptions::default());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = SimNode::start(l, SimNodeOptions::default());
    (sim, node)
}

/// Everything up, the receive loop running.
pub async fn env(opts: &PgConnectOptions) -> Env {
    env_with(opts, |_| {}).await
}

pub async fn env_with(opts: &PgConnectOptions, tweak: impl FnOnce(&mut Config)) -> Env {
    env_with_reconcile(opts, tweak, None).await
}

/// As [`env_with`], with `reconcile` behind `/reconcile`.
pub async fn env_with_reconcile(
    opts: &PgConnectOptions,
    tweak: impl FnOnce(&mut Config),
    reconcile: Option<std::sync::Arc<dyn ReconcileTrigger>>,
) -> Env {
    let (sim, node) = start_sims().await;
    let mut cfg = bot_config(opts, &sim, &node);
    tweak(&mut cfg);
    let registry = vpnbot::metrics::new_registry();
    let pool = DbPool::connect(&cfg.db, &registry).unwrap();
    vpnbot::db::migrate(&pool).await.unwrap();
    let fleet = Fleet::from_config(&cfg, &registry).unwrap();
    let api = BotApi::new(&cfg.telegram, &cfg.bot, BotMetrics::register(&registry)).unwrap();
    let bot = BotService::new(
        api.clone(),
        pool.clone(),
        fleet.clone(),
        BotDeps {
            nodes: vpnbot::bot::public_nodes(&cfg.nodes),
            admin_ids: cfg.telegram.admin_ids.clone(),
            registry: Some(registry.clone()),
            reconcile,
            ..Default::default()
        },
    );
    let outbox = Outbox::new(
        pool.clone(),
        fleet,
        OutboxMetrics::register(&registry),
        OutboxSettings {
            backoff_base_seconds: std::time::Duration::from_millis(50),
            backoff_max_seconds: std::time::Duration::from_millis(100),
            ..Default::default()
        },
    );
    let expiry = ExpiryWorker::new(
        pool.clone(),
        Some(api),
        cfg.bot.clone(),
        ExpiryMetrics::register(&registry),
    );
    let cancel = CancellationToken::new();
    let join = tokio::spawn(bot.clone().run(cancel.clone()));
    Env {
        sim,
        node,
        pool,
        registry,
        bot,
        outbox,
        expiry,
        cancel,
        config: cfg,
        join: Some(join),
    }
}

impl Env {
    pub fn metrics(&self) -> String {
        vpnbot::metrics::render(&self.registry)
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::metric(&self.metrics(), name, labels).unwrap_or(0.0)
    }

    /// `user` sends `text`; waits for the next message to them matching `pred`.
    pub async fn say(
        &self,
        user: &SimUser,
        text: &str,
        pred: impl Fn(&SentMessage) -> bool,
    ) -> SentMessage {
        let from = self.sim.sent_to(user.id).len();
        self.sim.send_text(user, text);
        self.sim
            .wait_for(user.id, from, WAIT, pred)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no matching answer to {text:?}; sent: {:#?}",
                    self.sim.sent_to(user.id)
                )
            })
    }

    /// `user` presses `data` under message `msg`; waits for a message matching `pred`.
    pub async fn press(
        &self,
        user: &SimUser,
        msg: i64,
        data: &str,
        pred: impl Fn(&SentMessage) -> bool,
    ) -> SentMessage {
        let from = self.sim.sent_to(user.id).len();
        self.sim.press(user, msg, data);
        self.sim
            .wait_for(user.id, from, WAIT, pred)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no matching answer to button {data:?}; sent: {:#?}",
                    self.sim.sent_to(user.id)
                )
            })
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        let mut c = self.pool.acquire("test").await.unwrap();
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut *c)
            .await
            .unwrap()
    }

    pub async fn exec(&self, sql: &str) {
        let mut c = self.pool.acquire("test").await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut *c)
            .await
            .unwrap();
    }

    /// Stops the receive loop and waits for it.
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(j) = self.join.take() {
            tokio::time::timeout(Duration::from_secs(10), j)
                .await
                .expect("receive loop stops")
                .unwrap();
        }
    }
}

/// A predicate for the Bot API stand-in's sent messages: the text contains `t`.
pub fn has(t: &str) -> impl Fn(&vpnbot_sim::botapi::SentMessage) -> bool + '_ {
    move |m| m.text.contains(t)
}
