//! The stand-in's webhook side: `setWebhook` / `deleteWebhook` / `getWebhookInfo` are recorded
//! (and `getUpdates` answers `409` while a webhook is set, as Telegram does), and a push mode
//! delivers queued updates as Telegram does to a webhook: `POST` of the update's JSON with the
//! `X-Telegram-Bot-Api-Secret-Token` header, over `connections` parallel connections (Telegram's
//! `max_connections`), to a list of URLs round-robin (the stand-in plays the load balancer too).
//! A delivery answered non-2xx, failing to connect or cut mid-request, or not answered within
//! the timeout is retried on the next URL after a short backoff; only a `2xx` acknowledges it.
//! [`super::BotApiSimHandle::redeliver_acknowledged`] re-queues updates already acknowledged,
//! as Telegram sometimes does, so tests can prove deduplication.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Shared;

/// The webhook registered with `setWebhook`.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSet {
    /// `url`.
    pub url: String,
    /// `secret_token`, if given.
    pub secret_token: Option<String>,
    /// `max_connections`, if given.
    pub max_connections: Option<i64>,
    /// `allowed_updates`, if given.
    pub allowed_updates: Option<Value>,
    /// `drop_pending_updates`, if given.
    pub drop_pending_updates: Option<bool>,
}

/// How the push mode delivers.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Webhook URLs, tried round-robin (one per instance).
    pub urls: Vec<url::Url>,
    /// Sent in `X-Telegram-Bot-Api-Secret-Token`.
    pub secret_token: String,
    /// Deliveries in flight at once (Telegram's `max_connections`; default 40).
    pub connections: usize,
    /// Bound of one delivery (default 15 s).
    pub timeout: Duration,
    /// First pause before a retry, doubled per attempt of the same update up to 1 s
    /// (default 50 ms).
    pub retry_backoff: Duration,
}

impl PushOptions {
    /// Delivery to `urls` with `secret_token` and the defaults above.
    pub fn new(urls: Vec<url::Url>, secret_token: &str) -> PushOptions {
        PushOptions {
            urls,
            secret_token: secret_token.to_string(),
            connections: 40,
            timeout: Duration::from_secs(15),
            retry_backoff: Duration::from_millis(50),
        }
    }
}

/// Counters of the push mode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PushStats {
    /// Requests sent (every attempt).
    pub attempts: u64,
    /// Deliveries acknowledged with a 2xx (a redelivered update counts again).
    pub acknowledged: u64,
    /// Attempts answered non-2xx, by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Attempts that failed to connect or were cut mid-request.
    pub connection_errors: u64,
    /// Attempts not answered within the timeout.
    pub timeouts: u64,
    /// Attempts per URL (index in [`PushOptions::urls`]).
    pub attempts_per_url: Vec<u64>,
    /// Acknowledgements per URL.
    pub acknowledged_per_url: Vec<u64>,
    /// Updates put back after an acknowledgement ([`super::BotApiSimHandle::redeliver_acknowledged`]).
    pub redelivered: u64,
    /// Deliveries in flight now.
    pub in_flight: u64,
}

#[derive(Debug, Default)]
pub(super) struct PushState {
    pub(super) stats: PushStats,
    /// Acknowledgements per update id.
    pub(super) acked: BTreeMap<i64, u32>,
    /// Acknowledged updates, for redelivery.
    pub(super) acked_updates: Vec<(i64, Value)>,
}

/// Starts `opts.connections` delivery workers that run until `cancel`.
pub(super) fn start(
    shared: Arc<Shared>,
    opts: PushOptions,
    cancel: tokio_util::sync::CancellationToken,
) {
    assert!(!opts.urls.is_empty(), "push mode needs at least one URL");
    {
        let mut st = shared.state();
        st.push_active = true;
        st.push.stats.attempts_per_url = vec![0; opts.urls.len()];
        st.push.stats.acknowledged_per_url = vec![0; opts.urls.len()];
    }
    let client = reqwest::Client::builder()
        .timeout(opts.timeout)
        .pool_max_idle_per_host(opts.connections)
        .build()
        .expect("HTTP client builds");
    let next = Arc::new(AtomicUsize::new(0));
    let opts = Arc::new(opts);
    for _ in 0..opts.connections.max(1) {
        let (shared, client, next, opts, cancel) = (
            shared.clone(),
            client.clone(),
            next.clone(),
            opts.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            loop {
                let notified = shared.updates_notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let item = {
                    let mut st = shared.state();
                    st.updates.pop_front()
                };
                let Some((id, update)) = item else {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = notified => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                    continue;
                };
                if !deliver(&shared, &client, &next, &opts, &cancel, id, &update).await {
                    return;
                }
            }
        });
    }
}

/// Delivers one update until a URL acknowledges it; `false` when cancelled first.
async fn deliver(
    shared: &Shared,
    client: &reqwest::Client,
    next: &AtomicUsize,
    opts: &PushOptions,
    cancel: &tokio_util::sync::CancellationToken,
    id: i64,
    update: &Value,
) -> bool {
    let mut backoff = opts.retry_backoff;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed) % opts.urls.len();
        {
            let mut st = shared.state();
            st.push.stats.attempts += 1;
            st.push.stats.attempts_per_url[i] += 1;
            st.push.stats.in_flight += 1;
        }
        let req = client
            .post(opts.urls[i].clone())
            .header("X-Telegram-Bot-Api-Secret-Token", &opts.secret_token)
            .json(update)
            .send();
        let res = tokio::select! {
            _ = cancel.cancelled() => {
                shared.state().push.stats.in_flight -= 1;
                return false;
            }
            r = req => r,
        };
        let acked = {
            let mut st = shared.state();
            st.push.stats.in_flight -= 1;
            match res {
                Ok(r) if r.status().is_success() => {
                    st.push.stats.acknowledged += 1;
                    st.push.stats.acknowledged_per_url[i] += 1;
                    *st.push.acked.entry(id).or_default() += 1;
                    st.push.acked_updates.push((id, update.clone()));
                    true
                }
                Ok(r) => {
                    *st.push
                        .stats
                        .statuses
                        .entry(r.status().as_u16())
                        .or_default() += 1;
                    false
                }
                Err(e) if e.is_timeout() => {
                    st.push.stats.timeouts += 1;
                    false
                }
                Err(_) => {
                    st.push.stats.connection_errors += 1;
                    false
                }
            }
        };
        if acked {
            return true;
        }
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
