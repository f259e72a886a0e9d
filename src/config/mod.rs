//! Typed configuration: an optional TOML file overlaid by `VPNBOT_<SECTION>__<KEY>` environment
//! variables (nested keys joined by `__`, e.g. `VPNBOT_DB__MAX_CONNECTIONS=20`); other
//! `VPNBOT_*` names are not configuration (see [`load`]).
//!
//! Every default is a named constant in [`defaults`]; `vpnbot.example.toml` documents every key
//! and a test fails when it drifts from these types. Loading collects every error (unknown keys,
//! wrong types per section, invalid values) and returns them all at once; the CLI prints them and
//! exits with [`EXIT_CONFIG`].

pub mod defaults;
pub mod load;
/// Durations written as seconds; the module lives in the diagnostics crate, whose settings use
/// it too.
pub use diagnostics::seconds;
pub mod secret;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use self::defaults as d;

/// Exit code for a bad configuration (`EX_USAGE` from BSD `sysexits.h`).
pub const EXIT_CONFIG: i32 = 64;

/// Environment variable prefix; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "VPNBOT_";

pub use load::{NON_CONFIG_ENV, SECTIONS};

/// The whole configuration. Each field is one TOML table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    /// Telegram Bot API access.
    pub telegram: TelegramConfig,
    /// PostgreSQL and the connection pool.
    pub db: DbConfig,
    /// The advisory-lock leadership that gates singleton workers.
    pub leader: LeaderConfig,
    /// Logs, the observability HTTP server, tracing export.
    pub observability: ObservabilityConfig,
    /// The main tokio runtime and shutdown.
    pub runtime: RuntimeConfig,
    /// Deadlines, retries and breaker of the node API client, shared by all nodes.
    pub node_client: crate::node::NodeClientSettings,
    /// The node-operation outbox worker.
    pub outbox: crate::outbox::OutboxSettings,
    /// Runtime metrics, scheduler-lag probe, watchdog, dumps, tokio-console.
    pub diagnostics: crate::diagnostics::DiagnosticsSettings,
    /// The reconcile worker.
    pub reconcile: crate::reconcile::ReconcileSettings,
    /// The Telegram bot (polling, trial, plans, links) and the expiry worker.
    pub bot: crate::bot::BotSettings,
    /// VPN nodes by name. The name is used as the `node` metric label, so keep the set small.
    pub nodes: BTreeMap<String, NodeConfig>,
}

/// `[telegram]`: Bot API access.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelegramConfig {
    /// Bot token from @BotFather. Secret: never printed.
    #[serde(with = "secret::redacted")]
    pub token: SecretString,
    /// Bot API base URL (default [`d::TELEGRAM_API_URL`]); point it at the stand-in in tests.
    pub api_url: String,
    /// Telegram user ids allowed to use admin commands.
    pub admin_ids: Vec<i64>,
    /// How updates arrive: `polling` (the default: the leader alone calls `getUpdates`) or
    /// `webhook` (Telegram POSTs them to `[telegram.webhook]`; every instance serves them).
    pub mode: TelegramMode,
    /// How long a handled update's id is remembered for deduplication, written in seconds
    /// (default [`d::TELEGRAM_DEDUP_RETENTION_SECONDS`]: beyond Telegram's 24 hours of
    /// keeping an undelivered update, so a late retry is still recognised).
    #[serde(with = "seconds")]
    pub dedup_retention_seconds: Duration,
    /// How often every instance deletes expired deduplication rows, written in seconds
    /// (default [`d::TELEGRAM_DEDUP_CLEANUP_INTERVAL_SECONDS`]).
    #[serde(with = "seconds")]
    pub dedup_cleanup_interval_seconds: Duration,
    /// Most rows one cleanup statement deletes (default [`d::TELEGRAM_DEDUP_CLEANUP_BATCH`]);
    /// a pass repeats it until fewer are left, so no statement holds locks for long.
    pub dedup_cleanup_batch: u32,
    /// Webhook mode's endpoint and the `setWebhook` parameters.
    pub webhook: WebhookConfig,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        Self {
            token: SecretString::default(),
            api_url: d::TELEGRAM_API_URL.to_string(),
            admin_ids: Vec::new(),
            mode: TelegramMode::Polling,
            dedup_retention_seconds: Duration::from_secs_f64(d::TELEGRAM_DEDUP_RETENTION_SECONDS),
            dedup_cleanup_interval_seconds: Duration::from_secs_f64(
                d::TELEGRAM_DEDUP_CLEANUP_INTERVAL_SECONDS,
            ),
            dedup_cleanup_batch: d::TELEGRAM_DEDUP_CLEANUP_BATCH,
            webhook: WebhookConfig::default(),
        }
    }
}

/// `telegram.mode`: how updates reach the bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TelegramMode {
    /// Long polling with `getUpdates`, by the leader only (one consumer per token).
    #[default]
    Polling,
    /// Telegram POSTs each update to `telegram.webhook.public_url` (behind a load balancer);
    /// every instance serves the endpoint and handles what it receives.
    Webhook,
}

/// `[telegram.webhook]`: the endpoint every instance serves in webhook mode and what
/// `vpnbot webhook set` registers with Telegram.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Address of the webhook listener (default [`d::WEBHOOK_LISTEN`]). Plain HTTP: TLS ends at
    /// the load balancer in front of the instances (Telegram only posts to `https://`).
    pub listen: std::net::SocketAddr,
    /// The `https://` URL Telegram posts to (the load balancer), given to `setWebhook`;
    /// `http://` is accepted for a loopback host only (tests, the stand-in).
    pub public_url: String,
    /// Sent by Telegram in `X-Telegram-Bot-Api-Secret-Token` with every request and compared
    /// in constant time; 1-256 characters of `A-Za-z0-9_-` (Telegram's rule). Secret: never
    /// printed; give it through `VPNBOT_TELEGRAM__WEBHOOK__SECRET_TOKEN`.
    #[serde(
        serialize_with = "secret::serialize_redacted",
        deserialize_with = "secret::deserialize_lenient"
    )]
    pub secret_token: SecretString,
    /// Telegram's `max_connections`: simultaneous connections it opens to the URL, 1-100
    /// (default [`d::WEBHOOK_MAX_CONNECTIONS`], Telegram's own default).
    pub max_connections: u8,
    /// Update types Telegram sends (`setWebhook`'s `allowed_updates`); empty: the bot's own
    /// list (the kinds it handles, as `getUpdates` asks for).
    pub allowed_updates: Vec<String>,
    /// Most updates one instance handles at once (default [`d::WEBHOOK_MAX_IN_FLIGHT`]);
    /// a request beyond it is answered `503` at once (Telegram retries it, possibly on
    /// another instance) instead of waiting.
    pub max_in_flight: usize,
    /// Longest an instance works on one request before answering, written in seconds
    /// (default [`d::WEBHOOK_ACK_TIMEOUT_SECONDS`]): `200` only once the update is handled;
    /// a handler still running then gets `503` and Telegram's retry finds it handled (or
    /// its claim expired, then handled again).
    #[serde(with = "seconds")]
    pub ack_timeout_seconds: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            listen: d::WEBHOOK_LISTEN,
            public_url: String::new(),
            secret_token: SecretString::default(),
            max_connections: d::WEBHOOK_MAX_CONNECTIONS,
            allowed_updates: Vec::new(),
            max_in_flight: d::WEBHOOK_MAX_IN_FLIGHT,
            ack_timeout_seconds: Duration::from_secs_f64(d::WEBHOOK_ACK_TIMEOUT_SECONDS),
        }
    }
}

impl WebhookConfig {
    /// Problems of this section; `webhook_mode`: whether `telegram.mode = "webhook"` (then
    /// `public_url` and `secret_token` are required).
    pub fn validate(&self, webhook_mode: bool) -> Vec<String> {
        let mut e = Vec::new();
        let secret = self.secret_token.expose_secret();
        if secret.is_empty() {
            if webhook_mode {
                e.push(
                    "telegram.webhook.secret_token is empty: webhook mode needs it (1-256 \
                     characters of A-Za-z0-9_-)"
                        .to_string(),
                );
            }
        } else if secret.len() > 256
            || !secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            e.push(
                "telegram.webhook.secret_token must be 1-256 characters of A-Za-z0-9_- \
                 (Telegram's rule)"
                    .to_string(),
            );
        }
        if self.public_url.is_empty() {
            if webhook_mode {
                e.push("telegram.webhook.public_url is empty: webhook mode needs it".to_string());
            }
        } else {
            match url::Url::parse(&self.public_url) {
                Ok(u) if u.scheme() == "https" => {}
                Ok(u) if u.scheme() == "http" && is_loopback_host(&u) => {}
                _ => e.push(
                    "telegram.webhook.public_url must be an https:// URL (http:// only to a \
                     loopback host)"
                        .to_string(),
                ),
            }
        }
        if !(1..=100).contains(&self.max_connections) {
            e.push(format!(
                "telegram.webhook.max_connections must be 1-100, got {}",
                self.max_connections
            ));
        }
        if self.max_in_flight == 0 {
            e.push("telegram.webhook.max_in_flight must be at least 1".to_string());
        }
        if self.ack_timeout_seconds.is_zero() {
            e.push("telegram.webhook.ack_timeout_seconds must be positive".to_string());
        }
        for u in &self.allowed_updates {
            if serde_json::from_value::<teloxide::types::AllowedUpdate>(serde_json::Value::String(
                u.clone(),
            ))
            .is_err()
            {
                e.push(format!(
                    "telegram.webhook.allowed_updates: `{u}` is not a Telegram update type"
                ));
            }
        }
        e
    }
}

fn is_loopback_host(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}

/// `[db]`: PostgreSQL connection and pool. Defaults follow the predecessor's pool
/// (min 2, max 15, acquire 10 s, statement 30 s).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbConfig {
    /// `postgres://` URL. Falls back to the `DATABASE_URL` environment variable. Its password is
    /// never printed.
    #[serde(with = "secret::redacted_url")]
    pub url: SecretString,
    /// `postgres://` URL of PostgreSQL itself, bypassing any connection pooler, for the
    /// leadership lock and migrations (session advisory locks do not survive transaction
    /// pooling). Empty (the default): `url` is used for everything. Required when `url` points
    /// at a pooler in transaction pooling mode (checked at start). Secret like `url`.
    #[serde(with = "secret::redacted_url")]
    pub direct_url: SecretString,
    /// Connections kept open when idle (default [`d::DB_MIN_CONNECTIONS`]).
    pub min_connections: u32,
    /// Pool size (default [`d::DB_MAX_CONNECTIONS`]); the leadership connection is extra.
    pub max_connections: u32,
    /// Longest wait for a pooled connection, seconds (default [`d::DB_ACQUIRE_TIMEOUT_SECONDS`]).
    #[serde(with = "seconds")]
    pub acquire_timeout_seconds: Duration,
    /// Server-side `statement_timeout`, seconds (default [`d::DB_STATEMENT_TIMEOUT_SECONDS`]).
    #[serde(with = "seconds")]
    pub statement_timeout_seconds: Duration,
    /// Server-side `lock_timeout`, seconds (default [`d::DB_LOCK_TIMEOUT_SECONDS`]): a statement
    /// waiting this long for a lock fails with SQLSTATE 55P03 ([`crate::db::DbError::LockTimeout`]).
    /// Must be below `statement_timeout_seconds`; 0 disables it.
    #[serde(with = "seconds")]
    pub lock_timeout_seconds: Duration,
    /// Server-side `idle_in_transaction_session_timeout`, seconds
    /// (default [`d::DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS`]).
    #[serde(with = "seconds")]
    pub idle_in_transaction_timeout_seconds: Duration,
    /// Timeout for opening one connection, seconds (default [`d::DB_CONNECT_TIMEOUT_SECONDS`]).
    #[serde(with = "seconds")]
    pub connect_timeout_seconds: Duration,
    /// `application_name` shown in `pg_stat_activity` (default [`d::DB_APPLICATION_NAME`]).
    pub application_name: String,
    /// How often the readiness check (on the database monitor's connection, outside the pool)
    /// checks that the database is writable, at most, seconds
    /// (default [`d::DB_READINESS_INTERVAL_SECONDS`]).
    #[serde(with = "seconds")]
    pub readiness_interval_seconds: Duration,
    /// How often the database monitor (a connection outside the pool) pings the server and,
    /// when needed, reads what vpnbot's backends are doing, seconds
    /// (default [`d::DB_MONITOR_INTERVAL_SECONDS`]).
    #[serde(with = "seconds")]
    pub monitor_interval_seconds: Duration,
    /// A connection held this long makes the monitor read `pg_stat_activity`; own backends
    /// waiting on a lock this long open a `db_lock_wait` episode, seconds
    /// (default [`d::DB_MONITOR_THRESHOLD_SECONDS`]).
    #[serde(with = "seconds")]
    pub monitor_threshold_seconds: Duration,
    /// `statement_timeout` of the monitoring connection and bound of each of its readings,
    /// seconds (default [`d::DB_MONITOR_STATEMENT_TIMEOUT_SECONDS`]).
    #[serde(with = "seconds")]
    pub monitor_statement_timeout_seconds: Duration,
    /// A statement slower than this logs a WARN naming its call-site label (at most one line
    /// per 10 s), seconds (default [`d::DB_SLOW_STATEMENT_SECONDS`]).
    #[serde(with = "seconds")]
    pub slow_statement_seconds: Duration,
}

impl Default for DbConfig {
    fn default() -> Self {
        Self {
            url: SecretString::default(),
            direct_url: SecretString::default(),
            min_connections: d::DB_MIN_CONNECTIONS,
            max_connections: d::DB_MAX_CONNECTIONS,
            acquire_timeout_seconds: d::DB_ACQUIRE_TIMEOUT_SECONDS,
            statement_timeout_seconds: d::DB_STATEMENT_TIMEOUT_SECONDS,
            lock_timeout_seconds: d::DB_LOCK_TIMEOUT_SECONDS,
            idle_in_transaction_timeout_seconds: d::DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
            connect_timeout_seconds: d::DB_CONNECT_TIMEOUT_SECONDS,
            application_name: d::DB_APPLICATION_NAME.to_string(),
            readiness_interval_seconds: d::DB_READINESS_INTERVAL_SECONDS,
            monitor_interval_seconds: d::DB_MONITOR_INTERVAL_SECONDS,
            monitor_threshold_seconds: d::DB_MONITOR_THRESHOLD_SECONDS,
            monitor_statement_timeout_seconds: d::DB_MONITOR_STATEMENT_TIMEOUT_SECONDS,
            slow_statement_seconds: d::DB_SLOW_STATEMENT_SECONDS,
        }
    }
}

/// `[leader]`: session advisory lock held on a dedicated connection outside the pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaderConfig {
    /// Advisory lock key shared by every instance of one deployment (default [`d::LEADER_LOCK_KEY`]).
    pub lock_key: i64,
    /// How often the leader checks its lock connection, seconds (default [`d::LEADER_CHECK_INTERVAL_SECONDS`]).
    #[serde(with = "seconds")]
    pub check_interval_seconds: Duration,
    /// How long one check may take before leadership counts as lost, seconds
    /// (default [`d::LEADER_CHECK_TIMEOUT_SECONDS`]).
    #[serde(with = "seconds")]
    pub check_timeout_seconds: Duration,
    /// How often a follower retries the lock, seconds (default [`d::LEADER_RETRY_INTERVAL_SECONDS`]).
    #[serde(with = "seconds")]
    pub retry_interval_seconds: Duration,
    /// Wait after winning the lock before starting singleton workers, seconds
    /// (default [`d::LEADER_TAKEOVER_DELAY_SECONDS`]); longer than a previous leader needs to
    /// notice its loss (check interval + check timeout), so the two never overlap.
    #[serde(with = "seconds")]
    pub takeover_delay_seconds: Duration,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self {
            lock_key: d::LEADER_LOCK_KEY,
            check_interval_seconds: d::LEADER_CHECK_INTERVAL_SECONDS,
            check_timeout_seconds: d::LEADER_CHECK_TIMEOUT_SECONDS,
            retry_interval_seconds: d::LEADER_RETRY_INTERVAL_SECONDS,
            takeover_delay_seconds: d::LEADER_TAKEOVER_DELAY_SECONDS,
        }
    }
}

/// `[observability]`: logs, the observability server and trace export.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// Address of the observability server (default [`d::OBS_LISTEN`], loopback only).
    pub listen: std::net::SocketAddr,
    /// `human` or `json` (default [`d::LOG_FORMAT`]).
    pub log_format: LogFormat,
    /// `tracing` filter directives for logs (default [`d::LOG_FILTER`]); `RUST_LOG` overrides it.
    pub log_filter: String,
    /// Listener for the debug endpoints (`/debug/*`: task names, spawn locations, native
    /// frames, span fields). Empty (the default): they are served on `listen` only while that is
    /// a loopback address or `debug_token` is set, and not at all otherwise. An address: they
    /// are served there only, never on `listen`; a non-loopback one needs `debug_token`.
    /// Written as an `IP:port` string; `""` means none.
    #[serde(
        serialize_with = "addr::serialize_optional",
        deserialize_with = "addr::deserialize_optional"
    )]
    pub debug_listen: Option<std::net::SocketAddr>,
    /// Bearer token `/debug/*` requires (`Authorization: Bearer <token>`) wherever it is
    /// served; empty (the default) = none. Secret: never printed; give it through
    /// `VPNBOT_OBSERVABILITY__DEBUG_TOKEN` from a secret store.
    #[serde(with = "secret::redacted")]
    pub debug_token: SecretString,
    /// OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`; empty disables export.
    /// Secret: it may carry credentials (userinfo, a token in the query), printed redacted.
    #[serde(with = "secret::redacted_url")]
    pub otlp_endpoint: SecretString,
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            listen: d::OBS_LISTEN,
            log_format: d::LOG_FORMAT,
            log_filter: d::LOG_FILTER.to_string(),
            debug_listen: None,
            debug_token: SecretString::default(),
            otlp_endpoint: SecretString::default(),
        }
    }
}

/// `observability.log_format`: how log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event (colour only on a terminal).
    Human,
    /// One JSON object per event, with the current span.
    Json,
}

impl LogFormat {
    /// Every format.
    pub const ALL: &'static [LogFormat] = &[LogFormat::Human, LogFormat::Json];

    /// The configuration value.
    pub const fn as_str(self) -> &'static str {
        match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }
    }
}

/// `[runtime]`: the main tokio runtime and shutdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the main runtime; 0 means one per core but at least 4
    /// (`diagnostics::runtime::MIN_DEFAULT_WORKER_THREADS`, which says why) (default 0). Short
    /// commands (`migrate`, `reconcile --once`, `webhook`) use one per core.
    pub worker_threads: usize,
    /// Bound on draining tasks at shutdown, written in seconds (default
    /// [`d::SHUTDOWN_DRAIN_SECONDS`]).
    #[serde(with = "seconds")]
    pub shutdown_drain_seconds: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: 0,
            shutdown_drain_seconds: d::SHUTDOWN_DRAIN_SECONDS,
        }
    }
}

/// `[nodes.NAME]`: one VPN node's API and the public parameters of its VLESS inbound.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Base URL of the node API, e.g. `http://10.0.0.5:8080/`.
    pub url: String,
    /// API key sent in a header. Secret: never printed.
    #[serde(with = "secret::redacted")]
    pub api_key: SecretString,
    /// Host that clients connect to (goes into `vless://` links).
    pub public_host: String,
    /// Port that clients connect to (default 443).
    pub public_port: u16,
}

impl NodeConfig {
    /// A `[nodes.NAME]` entry for the node API at `url` with `api_key`, whose clients connect
    /// to `public_host` on the default public port.
    pub fn new(url: &url::Url, api_key: &str, public_host: &str) -> NodeConfig {
        NodeConfig {
            url: url.to_string(),
            api_key: SecretString::from(api_key.to_string()),
            public_host: public_host.to_string(),
            ..NodeConfig::default()
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            api_key: SecretString::default(),
            public_host: String::new(),
            public_port: d::NODE_PUBLIC_PORT,
        }
    }
}

/// Every problem found in one configuration, in the order found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        let s = if n == 1 { "" } else { "s" };
        writeln!(f, "invalid configuration ({n} problem{s}):")?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Loads from an optional TOML file and the configuration variables of the process
    /// environment (`VPNBOT_<SECTION>__<KEY>`, see [`load`]), then validates.
    ///
    /// # Errors
    /// Every problem at once: unreadable file, unknown keys, wrong types, invalid values, and
    /// `VPNBOT_*` variables that look like configuration but are not (named in the message).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        load::load(
            path,
            std::env::vars_os(),
            std::env::var("DATABASE_URL").ok(),
        )
    }

    /// Like [`Config::load`], but an empty `db.url` (no file key, no `VPNBOT_DB__URL`, no
    /// `DATABASE_URL`) is filled with `fallback_db_url` instead of being an error: for `demo`,
    /// which brings its own database and must not drop the rest of the user's configuration.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_with_fallback_db_url(
        path: Option<&Path>,
        fallback_db_url: &str,
    ) -> Result<Config, ConfigErrors> {
        let url = std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| fallback_db_url.to_owned());
        load::load(path, std::env::vars_os(), Some(url))
    }

    /// Loads from TOML text only (no environment); for tests and tools.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
        load::from_toml_str(text)
    }

    /// Checks values that types alone cannot; returns every problem found.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        let db = &self.db;
        let url = db.url.expose_secret();
        if url.is_empty() {
            e.push("db.url is empty: set it, VPNBOT_DB__URL or DATABASE_URL".to_string());
        } else if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            e.push("db.url must start with postgres:// or postgresql://".to_string());
        }
        let direct = db.direct_url.expose_secret();
        let direct_ok = direct.is_empty()
            || direct.starts_with("postgres://")
            || direct.starts_with("postgresql://");
        if !direct_ok {
            e.push("db.direct_url must start with postgres:// or postgresql://".to_string());
        }
        if db.max_connections == 0 {
            e.push("db.max_connections must be at least 1".to_string());
        }
        if db.min_connections > db.max_connections {
            e.push(format!(
                "db.min_connections ({}) exceeds db.max_connections ({})",
                db.min_connections, db.max_connections
            ));
        }
        for (key, v) in [
            ("db.acquire_timeout_seconds", db.acquire_timeout_seconds),
            ("db.statement_timeout_seconds", db.statement_timeout_seconds),
            (
                "db.idle_in_transaction_timeout_seconds",
                db.idle_in_transaction_timeout_seconds,
            ),
            ("db.connect_timeout_seconds", db.connect_timeout_seconds),
            (
                "db.readiness_interval_seconds",
                db.readiness_interval_seconds,
            ),
            ("db.monitor_interval_seconds", db.monitor_interval_seconds),
            ("db.slow_statement_seconds", db.slow_statement_seconds),
            ("db.monitor_threshold_seconds", db.monitor_threshold_seconds),
            (
                "db.monitor_statement_timeout_seconds",
                db.monitor_statement_timeout_seconds,
            ),
            (
                "leader.check_interval_seconds",
                self.leader.check_interval_seconds,
            ),
            (
                "leader.check_timeout_seconds",
                self.leader.check_timeout_seconds,
            ),
            (
                "leader.retry_interval_seconds",
                self.leader.retry_interval_seconds,
            ),
        ] {
            positive(&mut e, key, v);
        }
        // 0 disables lock_timeout; otherwise a lock wait must end before the statement does.
        if db.lock_timeout_seconds >= db.statement_timeout_seconds {
            e.push(format!(
                "db.lock_timeout_seconds ({}) must be below db.statement_timeout_seconds ({})",
                db.lock_timeout_seconds.as_secs_f64(),
                db.statement_timeout_seconds.as_secs_f64()
            ));
        }
        let l = &self.leader;
        let detect = l.check_interval_seconds + l.check_timeout_seconds;
        if l.takeover_delay_seconds <= detect {
            e.push(format!(
                "leader.takeover_delay_seconds ({}) must exceed check_interval_seconds + \
                 check_timeout_seconds ({}), or two leaders could overlap",
                l.takeover_delay_seconds.as_secs_f64(),
                detect.as_secs_f64()
            ));
        }
        let o = &self.observability;
        if let Err(err) = tracing_subscriber::EnvFilter::builder().parse(&o.log_filter) {
            e.push(format!("observability.log_filter: {err}"));
        }
        if let Some(a) = o.debug_listen {
            if !a.ip().is_loopback() && o.debug_token.expose_secret().is_empty() {
                e.push(format!(
                    "observability.debug_listen `{a}` is not loopback: set \
                     observability.debug_token, or the debug endpoints would be open to \
                     anyone who reaches that address"
                ));
            }
        }
        let otlp = o.otlp_endpoint.expose_secret();
        if !otlp.is_empty() && url::Url::parse(otlp).is_err() {
            e.push("observability.otlp_endpoint is not a URL".to_string());
        }
        positive(
            &mut e,
            "runtime.shutdown_drain_seconds",
            self.runtime.shutdown_drain_seconds,
        );
        e.extend(self.node_client.validate());
        e.extend(self.outbox.validate());
        if self.outbox.claim_seconds <= self.node_client.total_deadline_seconds {
            e.push(format!(
                "outbox.claim_seconds ({}) must exceed node_client.total_deadline_seconds ({}), \
                 or no claimed intent could be applied",
                self.outbox.claim_seconds.as_secs_f64(),
                self.node_client.total_deadline_seconds.as_secs_f64()
            ));
        }
        e.extend(self.diagnostics.validate());
        e.extend(self.reconcile.validate());
        e.extend(self.bot.validate());
        let t = &self.telegram;
        e.extend(t.webhook.validate(t.mode == TelegramMode::Webhook));
        if t.dedup_retention_seconds < Duration::from_secs(60) {
            e.push("telegram.dedup_retention_seconds must be at least 60".to_string());
        }
        if t.dedup_cleanup_interval_seconds.is_zero() {
            e.push("telegram.dedup_cleanup_interval_seconds must be positive".to_string());
        }
        if t.dedup_cleanup_batch == 0 {
            e.push("telegram.dedup_cleanup_batch must be at least 1".to_string());
        }
        if !matches!(url::Url::parse(&self.telegram.api_url), Ok(u) if matches!(u.scheme(), "http" | "https"))
        {
            e.push("telegram.api_url must be an http(s) URL".to_string());
        }
        for (name, n) in &self.nodes {
            if name.is_empty()
                || name.len() > 32
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                e.push(format!(
                    "nodes.{name}: a node name must be 1-32 characters of [A-Za-z0-9_-]"
                ));
            }
            match url::Url::parse(&n.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {
                    if !u.username().is_empty() || u.password().is_some() {
                        e.push(format!(
                            "nodes.{name}.url must not carry credentials; use api_key"
                        ));
                    }
                    if u.query().is_some() || u.fragment().is_some() {
                        e.push(format!(
                            "nodes.{name}.url must not have a query or fragment (a token there \
                             would leak into logs); use api_key"
                        ));
                    }
                }
                _ => e.push(format!("nodes.{name}.url must be an http(s) URL")),
            }
            let key = n.api_key.expose_secret();
            if key.is_empty() {
                e.push(format!("nodes.{name}.api_key is empty"));
            } else if !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                e.push(format!(
                    "nodes.{name}.api_key must be visible ASCII without spaces (it is sent in a header)"
                ));
            }
        }
        e
    }

    /// The effective configuration as TOML with every secret redacted (what `check-config`
    /// prints).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes to TOML")
    }
}

fn positive(errors: &mut Vec<String>, key: &str, v: Duration) {
    if v.is_zero() {
        errors.push(format!("{key} must be a positive number of seconds, got 0"));
    }
}

/// `Option<SocketAddr>` keys written as an `IP:port` string, `""` for none (the form
/// operators' files already use).
mod addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize_optional<S: Serializer>(
        a: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub(super) fn deserialize_optional<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("`{text}` is not an IP:port address")))
    }
}
