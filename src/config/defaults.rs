//! Every configuration default in one place. The example file `vpnbot.example.toml` repeats
//! them; a test keeps the two in step.

use std::time::Duration;

/// Telegram Bot API base URL.
pub const TELEGRAM_API_URL: &str = "https://api.telegram.org";
/// How long an update id is remembered for deduplication, seconds: 26 hours, beyond the 24
/// hours Telegram keeps an undelivered update (its retries end before the row does).
pub const TELEGRAM_DEDUP_RETENTION_SECONDS: f64 = 93_600.0;
/// How often expired deduplication rows are deleted, seconds.
pub const TELEGRAM_DEDUP_CLEANUP_INTERVAL_SECONDS: f64 = 60.0;
/// Most deduplication rows one cleanup statement deletes.
pub const TELEGRAM_DEDUP_CLEANUP_BATCH: u32 = 1_000;
/// Webhook listener (plain HTTP behind the TLS-terminating load balancer).
pub const WEBHOOK_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8443);
/// `setWebhook`'s `max_connections` (Telegram's default).
pub const WEBHOOK_MAX_CONNECTIONS: u8 = 40;
/// Updates one instance handles at once in webhook mode: Telegram's default
/// `max_connections`, so one instance alone never refuses what Telegram sends at once.
pub const WEBHOOK_MAX_IN_FLIGHT: usize = 40;
/// Longest one webhook request is worked on before it is answered, seconds. Telegram does not
/// publish its webhook timeout; answers within a few seconds are safe.
pub const WEBHOOK_ACK_TIMEOUT_SECONDS: f64 = 10.0;
/// Idle pool connections kept open (the predecessor's asyncpg `min_size`).
pub const DB_MIN_CONNECTIONS: u32 = 2;
/// Pool size (the predecessor's `max_size`).
pub const DB_MAX_CONNECTIONS: u32 = 15;
/// Longest wait for a pooled connection, seconds (the predecessor's acquire `timeout`).
pub const DB_ACQUIRE_TIMEOUT_SECONDS: Duration = Duration::from_secs(10);
/// Server-side statement timeout, seconds (the predecessor's `command_timeout`).
pub const DB_STATEMENT_TIMEOUT_SECONDS: Duration = Duration::from_secs(30);
/// Server-side lock timeout, seconds: a wait for a lock ends as a lock error (SQLSTATE 55P03)
/// long before the statement timeout.
pub const DB_LOCK_TIMEOUT_SECONDS: Duration = Duration::from_secs(5);
/// Server-side idle-in-transaction timeout, seconds: a backstop for a leaked transaction.
pub const DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS: Duration = Duration::from_secs(60);
/// Timeout for opening one connection, seconds.
pub const DB_CONNECT_TIMEOUT_SECONDS: Duration = Duration::from_secs(5);
/// `application_name` reported to PostgreSQL.
pub const DB_APPLICATION_NAME: &str = "vpnbot";
/// Interval of the database writability probe behind `/readyz`, seconds.
pub const DB_READINESS_INTERVAL_SECONDS: Duration = Duration::from_secs(2);
/// Interval of the database monitor's ping (and readings when needed), seconds.
pub const DB_MONITOR_INTERVAL_SECONDS: Duration = Duration::from_secs(1);
/// Hold age that makes the database monitor read `pg_stat_activity`, and lock-wait age that
/// opens a `db_lock_wait` episode, seconds.
pub const DB_MONITOR_THRESHOLD_SECONDS: Duration = Duration::from_secs(1);
/// `statement_timeout` of the monitoring connection, seconds.
pub const DB_MONITOR_STATEMENT_TIMEOUT_SECONDS: Duration = Duration::from_secs(2);
/// Statement duration above which a (rate-limited) WARN names the call-site label, seconds.
pub const DB_SLOW_STATEMENT_SECONDS: Duration = Duration::from_secs(1);
/// Advisory lock key for leadership (ASCII "vpnbot" packed into an i64).
pub const LEADER_LOCK_KEY: i64 = 0x0000_7670_6e62_6f74;
/// Leader's lock-connection check interval, seconds.
pub const LEADER_CHECK_INTERVAL_SECONDS: Duration = Duration::from_secs(1);
/// Leader's lock-connection check timeout, seconds.
pub const LEADER_CHECK_TIMEOUT_SECONDS: Duration = Duration::from_secs(1);
/// Follower's lock retry interval, seconds.
pub const LEADER_RETRY_INTERVAL_SECONDS: Duration = Duration::from_secs(2);
/// Delay between winning the lock and starting singleton workers, seconds.
pub const LEADER_TAKEOVER_DELAY_SECONDS: Duration = Duration::from_secs(3);
/// Observability server address: loopback only unless configured.
pub const OBS_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9187,
));
/// Log format.
pub const LOG_FORMAT: super::LogFormat = super::LogFormat::Human;
/// Log filter directives.
pub const LOG_FILTER: &str = "info,sqlx=warn";
/// Bound on draining tasks at shutdown, seconds.
pub const SHUTDOWN_DRAIN_SECONDS: Duration = Duration::from_secs(10);
/// Public VLESS port of a node.
pub const NODE_PUBLIC_PORT: u16 = 443;
