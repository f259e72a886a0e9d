//! `[node_client]`: one section of settings shared by every node's client.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default connect deadline (TCP connect plus name resolution), seconds.
pub const DEFAULT_CONNECT_TIMEOUT_SECONDS: Duration = Duration::from_secs(3);
/// Default headers deadline: request sent until the response head arrives, seconds.
pub const DEFAULT_HEADERS_TIMEOUT_SECONDS: Duration = Duration::from_secs(5);
/// Default body idle timeout: longest gap without a body byte, seconds.
pub const DEFAULT_BODY_IDLE_TIMEOUT_SECONDS: Duration = Duration::from_secs(2);
/// Default total deadline of one call, retries included: resolution, connect, headers, the
/// whole body and decoding, seconds.
pub const DEFAULT_TOTAL_DEADLINE_SECONDS: Duration = Duration::from_secs(10);
/// Default body cap: 64 MiB. A larger `Content-Length` is rejected before reading; a streamed
/// body is cut at the cap.
pub const DEFAULT_BODY_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default lifetime of an idle pooled connection, seconds. Below the 5 s keep-alive of common
/// Python servers (uvicorn) so that the client drops a connection before the node does.
pub const DEFAULT_POOL_IDLE_TIMEOUT_SECONDS: Duration = Duration::from_secs(4);
/// Default number of idle pooled connections kept per node.
pub const DEFAULT_POOL_MAX_IDLE_PER_NODE: usize = 4;
/// Default attempts per call, the first included (so 3 means up to 2 retries).
pub const DEFAULT_RETRY_MAX_ATTEMPTS: u32 = 3;
/// Default first backoff delay, seconds; doubles per retry, plus up to 100 % jitter.
pub const DEFAULT_RETRY_BASE_DELAY_SECONDS: Duration = Duration::from_millis(200);
/// Default cap of the backoff delay before jitter, seconds.
pub const DEFAULT_RETRY_MAX_DELAY_SECONDS: Duration = Duration::from_secs(2);
/// Default run of failed calls that opens a node's circuit breaker.
pub const DEFAULT_BREAKER_FAILURE_THRESHOLD: u32 = 5;
/// Default time an open breaker fails fast before letting one half-open probe through, seconds.
pub const DEFAULT_BREAKER_COOLDOWN_SECONDS: Duration = Duration::from_secs(30);
/// Default body size above which decoding moves to the blocking pool, so that a large
/// `list-users` never holds a runtime worker (256 KiB decodes in well under a millisecond).
pub const DEFAULT_DECODE_INLINE_MAX_BYTES: u64 = 256 * 1024;
/// Default bound on concurrent name resolutions per node. A hung resolver holds a blocking
/// thread until it returns; past this bound new calls fail fast instead of piling up threads.
pub const DEFAULT_RESOLVER_MAX_CONCURRENT: usize = 4;

/// Settings of the node API client, one `[node_client]` section shared by all nodes.
/// Durations are written as seconds (see [`diagnostics::seconds`]); every field has a named
/// default constant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeClientSettings {
    /// Connect deadline incl. name resolution, seconds. Default [`DEFAULT_CONNECT_TIMEOUT_SECONDS`].
    #[serde(with = "diagnostics::seconds")]
    pub connect_timeout_seconds: Duration,
    /// Headers deadline, seconds. Default [`DEFAULT_HEADERS_TIMEOUT_SECONDS`].
    #[serde(with = "diagnostics::seconds")]
    pub headers_timeout_seconds: Duration,
    /// Body idle timeout, seconds. Default [`DEFAULT_BODY_IDLE_TIMEOUT_SECONDS`].
    #[serde(with = "diagnostics::seconds")]
    pub body_idle_timeout_seconds: Duration,
    /// Total deadline of a call incl. retries, seconds. Default [`DEFAULT_TOTAL_DEADLINE_SECONDS`].
    #[serde(with = "diagnostics::seconds")]
    pub total_deadline_seconds: Duration,
    /// Body cap, bytes. Default [`DEFAULT_BODY_MAX_BYTES`].
    pub body_max_bytes: u64,
    /// Idle pooled connection lifetime, seconds; keep it below the node's keep-alive.
    /// Default [`DEFAULT_POOL_IDLE_TIMEOUT_SECONDS`].
    #[serde(with = "diagnostics::seconds")]
    pub pool_idle_timeout_seconds: Duration,
    /// Idle pooled connections per node. Default [`DEFAULT_POOL_MAX_IDLE_PER_NODE`].
    pub pool_max_idle_per_node: usize,
    /// Attempts per call incl. the first. Default [`DEFAULT_RETRY_MAX_ATTEMPTS`].
    pub retry_max_attempts: u32,
    /// First backoff delay, seconds. Default [`DEFAULT_RETRY_BASE_DELAY_SECONDS`].
    #[serde(with = "diagnostics::seconds")]
    pub retry_base_delay_seconds: Duration,
    /// Backoff cap before jitter, seconds. Default [`DEFAULT_RETRY_MAX_DELAY_SECONDS`].
    #[serde(with = "diagnostics::seconds")]
    pub retry_max_delay_seconds: Duration,
    /// Failed calls in a row that open the breaker. Default [`DEFAULT_BREAKER_FAILURE_THRESHOLD`].
    pub breaker_failure_threshold: u32,
    /// Open-breaker cooldown before a half-open probe, seconds.
    /// Default [`DEFAULT_BREAKER_COOLDOWN_SECONDS`].
    #[serde(with = "diagnostics::seconds")]
    pub breaker_cooldown_seconds: Duration,
    /// Bodies larger than this are decoded on the blocking pool, bytes.
    /// Default [`DEFAULT_DECODE_INLINE_MAX_BYTES`].
    pub decode_inline_max_bytes: u64,
    /// Concurrent name resolutions per node. Default [`DEFAULT_RESOLVER_MAX_CONCURRENT`].
    pub resolver_max_concurrent: usize,
}

impl Default for NodeClientSettings {
    fn default() -> Self {
        Self {
            connect_timeout_seconds: DEFAULT_CONNECT_TIMEOUT_SECONDS,
            headers_timeout_seconds: DEFAULT_HEADERS_TIMEOUT_SECONDS,
            body_idle_timeout_seconds: DEFAULT_BODY_IDLE_TIMEOUT_SECONDS,
            total_deadline_seconds: DEFAULT_TOTAL_DEADLINE_SECONDS,
            body_max_bytes: DEFAULT_BODY_MAX_BYTES,
            pool_idle_timeout_seconds: DEFAULT_POOL_IDLE_TIMEOUT_SECONDS,
            pool_max_idle_per_node: DEFAULT_POOL_MAX_IDLE_PER_NODE,
            retry_max_attempts: DEFAULT_RETRY_MAX_ATTEMPTS,
            retry_base_delay_seconds: DEFAULT_RETRY_BASE_DELAY_SECONDS,
            retry_max_delay_seconds: DEFAULT_RETRY_MAX_DELAY_SECONDS,
            breaker_failure_threshold: DEFAULT_BREAKER_FAILURE_THRESHOLD,
            breaker_cooldown_seconds: DEFAULT_BREAKER_COOLDOWN_SECONDS,
            decode_inline_max_bytes: DEFAULT_DECODE_INLINE_MAX_BYTES,
            resolver_max_concurrent: DEFAULT_RESOLVER_MAX_CONCURRENT,
        }
    }
}

fn positive(problems: &mut Vec<String>, name: &str, v: Duration) {
    if v.is_zero() {
        problems.push(format!(
            "node_client.{name} must be a positive number of seconds, got 0"
        ));
    }
}

impl NodeClientSettings {
    /// Every problem with these settings, each as one human-readable line naming the field;
    /// empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, v) in [
            ("connect_timeout_seconds", self.connect_timeout_seconds),
            ("headers_timeout_seconds", self.headers_timeout_seconds),
            ("body_idle_timeout_seconds", self.body_idle_timeout_seconds),
            ("total_deadline_seconds", self.total_deadline_seconds),
            ("pool_idle_timeout_seconds", self.pool_idle_timeout_seconds),
            ("retry_base_delay_seconds", self.retry_base_delay_seconds),
            ("retry_max_delay_seconds", self.retry_max_delay_seconds),
            ("breaker_cooldown_seconds", self.breaker_cooldown_seconds),
        ] {
            positive(&mut p, name, v);
        }
        let total = self.total_deadline_seconds;
        for (name, v) in [
            ("connect_timeout_seconds", self.connect_timeout_seconds),
            ("headers_timeout_seconds", self.headers_timeout_seconds),
            ("body_idle_timeout_seconds", self.body_idle_timeout_seconds),
        ] {
            if v > total {
                p.push(format!(
                    "node_client.{name} ({}) must not exceed total_deadline_seconds ({})",
                    v.as_secs_f64(),
                    total.as_secs_f64()
                ));
            }
        }
        if self.retry_base_delay_seconds > self.retry_max_delay_seconds {
            p.push(format!(
                "node_client.retry_base_delay_seconds ({}) must not exceed retry_max_delay_seconds ({})",
                self.retry_base_delay_seconds.as_secs_f64(),
                self.retry_max_delay_seconds.as_secs_f64()
            ));
        }
        if self.body_max_bytes == 0 {
            p.push("node_client.body_max_bytes must be positive".into());
        }
        if self.retry_max_attempts == 0 {
            p.push("node_client.retry_max_attempts must be at least 1".into());
        }
        if self.breaker_failure_threshold == 0 {
            p.push("node_client.breaker_failure_threshold must be at least 1".into());
        }
        if self.resolver_max_concurrent == 0 {
            p.push("node_client.resolver_max_concurrent must be at least 1".into());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_faults_md() {
        let s = NodeClientSettings::default();
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        assert_eq!(s.total_deadline_seconds, Duration::from_secs(10));
        assert_eq!(s.headers_timeout_seconds, Duration::from_secs(5));
        assert_eq!(s.body_idle_timeout_seconds, Duration::from_secs(2));
        assert_eq!(s.body_max_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let s = NodeClientSettings {
            connect_timeout_seconds: Duration::ZERO,
            headers_timeout_seconds: Duration::from_secs(20),
            body_idle_timeout_seconds: Duration::from_secs(30),
            retry_max_attempts: 0,
            body_max_bytes: 0,
            ..Default::default()
        };
        let p = s.validate();
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p.iter().any(|l| l.contains("headers_timeout_seconds (20)")));
    }

    #[test]
    fn unknown_fields_are_rejected_and_missing_fields_default() {
        let s: NodeClientSettings = toml::from_str("total_deadline_seconds = 3.5").unwrap();
        assert_eq!(s.total_deadline_seconds, Duration::from_millis(3500));
        assert!(toml::from_str::<NodeClientSettings>("total_deadline_seconds = 1e30").is_err());
        assert_eq!(s.headers_timeout_seconds, DEFAULT_HEADERS_TIMEOUT_SECONDS);
        assert!(toml::from_str::<NodeClientSettings>("total_deadline = 3").is_err());
    }
}
