//! `[bot]`: long polling, trial, plans priced in Telegram Stars, node choice, key links, and
//! the expiry and reminder worker.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default long-poll timeout sent to `getUpdates`, seconds.
pub const DEFAULT_POLL_TIMEOUT_SECONDS: u32 = 25;
/// Default margin added to the poll timeout for the HTTP client's total timeout, seconds.
pub const DEFAULT_POLL_MARGIN_SECONDS: f64 = 10.0;
/// Default total timeout of every other Bot API request, seconds.
pub const DEFAULT_REQUEST_TIMEOUT_SECONDS: f64 = 15.0;
/// Default first receive-loop backoff after an error, seconds.
pub const DEFAULT_BACKOFF_BASE_SECONDS: f64 = 0.5;
/// Default receive-loop backoff cap, seconds.
pub const DEFAULT_BACKOFF_MAX_SECONDS: f64 = 30.0;
/// Default pause after a `409 Conflict` (another instance polls the same token), seconds.
pub const DEFAULT_CONFLICT_BACKOFF_SECONDS: f64 = 30.0;
/// Default longest `retry_after` a send waits for before giving up, seconds.
pub const DEFAULT_RETRY_AFTER_MAX_SECONDS: f64 = 60.0;
/// Default updates handled at once. Measured with `examples/bench_bot` (1,000 updates during a
/// 1M-user reconcile pass, 2 cores): 8 gives handler p99 36 ms and scheduler-lag p99 5 ms in
/// 0.99 s; 16 gives 51–59 ms and 11.7 ms; 64 gives 156 ms and 30 ms for a burst only 15 %
/// faster. Beyond the pool's connections, more handlers queue on the runtime and the pool
/// instead of finishing sooner. Each slot is held at most `handler_timeout_seconds`.
pub const DEFAULT_MAX_CONCURRENT_UPDATES: usize = 8;
/// Default wait for a node to confirm a new key before the bot answers and leaves the add to
/// the outbox, seconds: a hung node then holds a handler slot for this long, not for the node
/// client's whole deadline with retries (10 s).
pub const DEFAULT_KEY_ISSUE_TIMEOUT_SECONDS: f64 = 3.0;
/// Default ordinary updates fetched and waiting for a handler slot; when this queue is full the
/// receive loop stops fetching until there is room (back-pressure).
pub const DEFAULT_UPDATE_QUEUE_CAPACITY: usize = 100;
/// Default time-critical updates (pre-checkout queries, successful payments) handled at once, on
/// slots of their own that ordinary traffic never takes.
pub const DEFAULT_PRIORITY_CONCURRENT_UPDATES: usize = 4;
/// Default longest a pooled Bot API connection stays idle before it is closed, seconds: well
/// under the idle timeouts of NATs and firewalls that forget a flow without a FIN.
pub const DEFAULT_POOL_IDLE_TIMEOUT_SECONDS: f64 = 10.0;
/// Default `TCP_USER_TIMEOUT` of Bot API connections (Linux), seconds: a request whose bytes
/// stay unacknowledged this long aborts its connection (then it is retried once on a fresh
/// one) instead of waiting for the whole request timeout.
pub const DEFAULT_TCP_USER_TIMEOUT_SECONDS: f64 = 5.0;
/// Default bound on handling one update, seconds.
pub const DEFAULT_HANDLER_TIMEOUT_SECONDS: f64 = 30.0;
/// Default time an update may wait for a handler slot, or busy handlers may complete nothing,
/// before the watchdog reports `service_starved`, seconds.
pub const DEFAULT_STARVED_AFTER_SECONDS: f64 = 5.0;
/// Default trial length, days.
pub const DEFAULT_TRIAL_DAYS: u32 = 3;
/// Default node choice policy.
pub const DEFAULT_NODE_POLICY: &str = "least_loaded";
/// Default query string of `vless://` links.
pub const DEFAULT_LINK_PARAMS: &str = "encryption=none&security=tls&type=tcp";
/// Default fragment (display name) of `vless://` links.
pub const DEFAULT_LINK_LABEL: &str = "vpnbot";
/// Default interval of the expiry and reminder worker, seconds.
pub const DEFAULT_EXPIRY_INTERVAL_SECONDS: f64 = 60.0;
/// Default expiry reminders and notices sent at once (by the notifier, apart from enforcement).
pub const DEFAULT_NOTIFY_CONCURRENCY: usize = 4;
/// Default most subscriptions expired or reminded per pass.
pub const DEFAULT_EXPIRY_BATCH: u32 = 500;

/// One plan a user can buy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Short id used in callbacks and invoice payloads: 1-16 characters of `[a-z0-9_]`.
    pub id: String,
    /// Title in English.
    pub title_en: String,
    /// Title in Russian.
    pub title_ru: String,
    /// Days added to the subscription.
    pub days: u32,
    /// Price in Telegram Stars (`XTR`).
    pub stars: u32,
}

fn default_plans() -> Vec<Plan> {
    let p = |id: &str, en: &str, ru: &str, days, stars| Plan {
        id: id.into(),
        title_en: en.into(),
        title_ru: ru.into(),
        days,
        stars,
    };
    vec![
        p("month", "1 month", "1 месяц", 30, 100),
        p("quarter", "3 months", "3 месяца", 90, 250),
        p("year", "12 months", "12 месяцев", 365, 900),
    ]
}

/// `[bot]`: the Telegram bot and the expiry worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BotSettings {
    /// Long-poll timeout sent to `getUpdates`, seconds (default [`DEFAULT_POLL_TIMEOUT_SECONDS`]).
    pub poll_timeout_seconds: u32,
    /// Added to the poll timeout for the HTTP total timeout of `getUpdates`, written in seconds
    /// (default [`DEFAULT_POLL_MARGIN_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub poll_margin_seconds: Duration,
    /// Total timeout of every other Bot API request, written in seconds
    /// (default [`DEFAULT_REQUEST_TIMEOUT_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub request_timeout_seconds: Duration,
    /// First receive-loop backoff, doubled per failure, jittered
    /// (default [`DEFAULT_BACKOFF_BASE_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub backoff_base_seconds: Duration,
    /// Receive-loop backoff cap, written in seconds (default [`DEFAULT_BACKOFF_MAX_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub backoff_max_seconds: Duration,
    /// Pause after `409 Conflict`, written in seconds (default [`DEFAULT_CONFLICT_BACKOFF_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub conflict_backoff_seconds: Duration,
    /// Longest `retry_after` a send waits for; longer ones fail the send, written in seconds
    /// (default [`DEFAULT_RETRY_AFTER_MAX_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub retry_after_max_seconds: Duration,
    /// Updates handled at once; polling waits when all slots are busy
    /// (default [`DEFAULT_MAX_CONCURRENT_UPDATES`]).
    pub max_concurrent_updates: usize,
    /// Ordinary updates fetched and waiting for a slot; polling pauses while this queue is
    /// full (default [`DEFAULT_UPDATE_QUEUE_CAPACITY`]). Time-critical updates have a queue of
    /// the same size of their own.
    pub update_queue_capacity: usize,
    /// Time-critical updates (pre-checkout queries, successful payments) handled at once, on
    /// slots ordinary updates never take (default [`DEFAULT_PRIORITY_CONCURRENT_UPDATES`]).
    pub priority_concurrent_updates: usize,
    /// Longest a pooled Bot API connection stays idle before it is closed, written in seconds (default
    /// [`DEFAULT_POOL_IDLE_TIMEOUT_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub pool_idle_timeout_seconds: Duration,
    /// Unacknowledged request bytes abort a Bot API connection after this long (Linux
    /// `TCP_USER_TIMEOUT`), written in seconds (default [`DEFAULT_TCP_USER_TIMEOUT_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub tcp_user_timeout_seconds: Duration,
    /// Bound on handling one update, written in seconds (default [`DEFAULT_HANDLER_TIMEOUT_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub handler_timeout_seconds: Duration,
    /// An update waiting this long for a handler slot, or busy handlers completing nothing for
    /// this long, opens a `service_starved` episode, written in seconds
    /// (default [`DEFAULT_STARVED_AFTER_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub starved_after_seconds: Duration,
    /// Wait for the node to confirm a new key before answering "not confirmed yet" and
    /// leaving the add to the outbox, written in seconds (default [`DEFAULT_KEY_ISSUE_TIMEOUT_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub key_issue_timeout_seconds: Duration,
    /// Trial length, days; 0 disables the trial (default [`DEFAULT_TRIAL_DAYS`]).
    pub trial_days: u32,
    /// Node for a new subscription: `least_loaded` (fewest active subscriptions) or `first`
    /// (default [`DEFAULT_NODE_POLICY`]).
    pub node_policy: String,
    /// Query string of `vless://` links (default [`DEFAULT_LINK_PARAMS`]).
    pub link_params: String,
    /// Fragment (display name) of `vless://` links (default [`DEFAULT_LINK_LABEL`]).
    pub link_label: String,
    /// Interval of the expiry and reminder worker, written in seconds
    /// (default [`DEFAULT_EXPIRY_INTERVAL_SECONDS`]).
    #[serde(with = "crate::config::seconds")]
    pub expiry_interval_seconds: Duration,
    /// Most subscriptions expired or reminded per pass (default [`DEFAULT_EXPIRY_BATCH`]).
    pub expiry_batch: u32,
    /// Expiry reminders and notices sent at once; sending never holds up enforcement
    /// (default [`DEFAULT_NOTIFY_CONCURRENCY`]).
    pub notify_concurrency: usize,
    /// Plans for sale, priced in Telegram Stars.
    pub plans: Vec<Plan>,
}

impl Default for BotSettings {
    fn default() -> Self {
        Self {
            poll_timeout_seconds: DEFAULT_POLL_TIMEOUT_SECONDS,
            poll_margin_seconds: Duration::from_secs_f64(DEFAULT_POLL_MARGIN_SECONDS),
            request_timeout_seconds: Duration::from_secs_f64(DEFAULT_REQUEST_TIMEOUT_SECONDS),
            backoff_base_seconds: Duration::from_secs_f64(DEFAULT_BACKOFF_BASE_SECONDS),
            backoff_max_seconds: Duration::from_secs_f64(DEFAULT_BACKOFF_MAX_SECONDS),
            conflict_backoff_seconds: Duration::from_secs_f64(DEFAULT_CONFLICT_BACKOFF_SECONDS),
            retry_after_max_seconds: Duration::from_secs_f64(DEFAULT_RETRY_AFTER_MAX_SECONDS),
            max_concurrent_updates: DEFAULT_MAX_CONCURRENT_UPDATES,
            update_queue_capacity: DEFAULT_UPDATE_QUEUE_CAPACITY,
            priority_concurrent_updates: DEFAULT_PRIORITY_CONCURRENT_UPDATES,
            handler_timeout_seconds: Duration::from_secs_f64(DEFAULT_HANDLER_TIMEOUT_SECONDS),
            starved_after_seconds: Duration::from_secs_f64(DEFAULT_STARVED_AFTER_SECONDS),
            pool_idle_timeout_seconds: Duration::from_secs_f64(DEFAULT_POOL_IDLE_TIMEOUT_SECONDS),
            tcp_user_timeout_seconds: Duration::from_secs_f64(DEFAULT_TCP_USER_TIMEOUT_SECONDS),
            key_issue_timeout_seconds: Duration::from_secs_f64(DEFAULT_KEY_ISSUE_TIMEOUT_SECONDS),
            trial_days: DEFAULT_TRIAL_DAYS,
            node_policy: DEFAULT_NODE_POLICY.into(),
            link_params: DEFAULT_LINK_PARAMS.into(),
            link_label: DEFAULT_LINK_LABEL.into(),
            expiry_interval_seconds: Duration::from_secs_f64(DEFAULT_EXPIRY_INTERVAL_SECONDS),
            expiry_batch: DEFAULT_EXPIRY_BATCH,
            notify_concurrency: DEFAULT_NOTIFY_CONCURRENCY,
            plans: default_plans(),
        }
    }
}

impl BotSettings {
    /// Every problem, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        // Negative, NaN and out-of-range values are refused while parsing (config::seconds).
        for (k, v) in [
            ("poll_margin_seconds", self.poll_margin_seconds),
            ("request_timeout_seconds", self.request_timeout_seconds),
            ("backoff_base_seconds", self.backoff_base_seconds),
            ("backoff_max_seconds", self.backoff_max_seconds),
            ("conflict_backoff_seconds", self.conflict_backoff_seconds),
            ("retry_after_max_seconds", self.retry_after_max_seconds),
            ("handler_timeout_seconds", self.handler_timeout_seconds),
            ("starved_after_seconds", self.starved_after_seconds),
            ("pool_idle_timeout_seconds", self.pool_idle_timeout_seconds),
            ("tcp_user_timeout_seconds", self.tcp_user_timeout_seconds),
            ("key_issue_timeout_seconds", self.key_issue_timeout_seconds),
            ("expiry_interval_seconds", self.expiry_interval_seconds),
        ] {
            if v.is_zero() {
                e.push(format!(
                    "bot.{k} must be a positive number of seconds, got 0"
                ));
            }
        }
        if self.poll_timeout_seconds > 3600 {
            e.push("bot.poll_timeout_seconds must be at most 3600".into());
        }
        if self.max_concurrent_updates == 0 {
            e.push("bot.max_concurrent_updates must be at least 1".into());
        }
        if self.notify_concurrency == 0 {
            e.push("bot.notify_concurrency must be at least 1".into());
        }
        if self.update_queue_capacity == 0 {
            e.push("bot.update_queue_capacity must be at least 1".into());
        }
        if self.priority_concurrent_updates == 0 {
            e.push("bot.priority_concurrent_updates must be at least 1".into());
        }
        if self.expiry_batch == 0 {
            e.push("bot.expiry_batch must be at least 1".into());
        }
        if !matches!(self.node_policy.as_str(), "least_loaded" | "first") {
            e.push(format!(
                "bot.node_policy `{}` must be `least_loaded` or `first`",
                self.node_policy
            ));
        }
        if self.link_params.contains(['#', ' ', '\n']) {
            e.push("bot.link_params must be a URL query string without `#` or spaces".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.plans {
            if p.id.is_empty()
                || p.id.len() > 16
                || !p
                    .id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                e.push(format!(
                    "bot.plans: id `{}` must be 1-16 characters of [a-z0-9_]",
                    p.id
                ));
            }
            if p.id == "trial" {
                e.push("bot.plans: id `trial` is reserved".into());
            }
            if !seen.insert(p.id.clone()) {
                e.push(format!("bot.plans: id `{}` is repeated", p.id));
            }
            if p.days == 0 || p.days > 3660 {
                e.push(format!("bot.plans.{}: days must be 1..=3660", p.id));
            }
            if p.stars == 0 || p.stars > 100_000 {
                e.push(format!("bot.plans.{}: stars must be 1..=100000", p.id));
            }
            if p.title_en.is_empty() || p.title_ru.is_empty() {
                e.push(format!("bot.plans.{}: titles must not be empty", p.id));
            }
        }
        e
    }

    /// The plan with `id`.
    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }

    /// Total HTTP timeout of one `getUpdates`: poll timeout plus margin.
    pub fn poll_request_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.poll_timeout_seconds)) + self.poll_margin_seconds
    }

    /// Receive-loop delay after `failures` failures in a row: base·2^(n-1) capped, ±20 % jitter.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .backoff_base_seconds
            .saturating_mul(1u32 << failures.saturating_sub(1).min(30));
        exp.min(self.backoff_max_seconds)
            .mul_f64(rand::random_range(0.8..=1.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_backoff_is_capped() {
        let s = BotSettings::default();
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        assert!(s.backoff(100) <= s.backoff_max_seconds.mul_f64(1.2));
        assert!(s.backoff(1) >= s.backoff_base_seconds.mul_f64(0.8));
    }

    #[test]
    fn bad_plans_are_reported() {
        let mut s = BotSettings::default();
        s.plans.push(s.plans[0].clone());
        s.plans.push(Plan {
            id: "Bad Id".into(),
            title_en: "".into(),
            title_ru: "x".into(),
            days: 0,
            stars: 0,
        });
        s.node_policy = "random".into();
        let e = s.validate();
        assert_eq!(e.len(), 6, "{e:?}");
    }
}
