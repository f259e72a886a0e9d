//! Webhook mode: Telegram POSTs each update to `telegram.webhook.public_url` (a load balancer
//! terminating TLS), which forwards to this listener on any number of instances. Every request
//! goes through the same handler path as polling ([`BotService::handle_guarded`]):
//!
//! 1. `X-Telegram-Bot-Api-Secret-Token` is compared with `telegram.webhook.secret_token` in
//!    constant time (`subtle`); missing or wrong: `401` (outcome `unauthorized`).
//! 2. The body is parsed as an `Update` (teloxide's type); not one: `400`.
//! 3. Back-pressure: at most `telegram.webhook.max_in_flight` updates are worked on at once
//!    (pre-checkout queries and payments have `bot.priority_concurrent_updates` slots of their
//!    own); beyond that the request is answered `503` with `Retry-After: 1` at once, so
//!    Telegram retries (maybe on another instance) instead of waiting.
//! 4. The update is claimed in PostgreSQL ([`super::dedup`]): handled before → `200`
//!    (`duplicate`); claimed by another live instance → `503` (`in_progress`), Telegram retries.
//! 5. The handler runs in a task of its own (a dropped connection cannot cut it) and the
//!    request waits for it up to `telegram.webhook.ack_timeout_seconds`. **`200` means
//!    handled**: the update is marked handled before the answer. A handler still running at
//!    the bound gets `503` (`slow`); Telegram's retry finds it handled, or, if this instance
//!    died meanwhile, takes over its expired claim. So an acknowledged update is never lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use teloxide::types::Update;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::dedup::{self, Claim};
use super::metrics::WebhookOutcome;
use super::BotService;
use crate::config::WebhookConfig;
use crate::tasks::Tasks;

/// The header Telegram puts the secret token in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

/// Largest accepted request body: Telegram's updates are far smaller (a message is at most
/// 4096 characters plus entities).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The webhook endpoint of one instance.
#[derive(Debug)]
struct Webhook {
    bot: BotService,
    secret: SecretString,
    ordinary: Arc<Semaphore>,
    priority: Arc<Semaphore>,
    ack_timeout: Duration,
}

impl BotService {
    /// Serves the webhook endpoint on `listener` until `tasks`' root token is cancelled (then
    /// it stops accepting, and handlers still running finish under the app's drain). Returns
    /// the address it serves. The server is a critical task (`bot_webhook`): ending before
    /// shutdown ends the process.
    ///
    /// # Errors
    /// The listener's address cannot be read.
    pub fn serve_webhook(
        &self,
        listener: TcpListener,
        cfg: &WebhookConfig,
        tasks: &Tasks,
    ) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let w = Arc::new(Webhook {
            bot: self.clone(),
            secret: cfg.secret_token.clone(),
            ordinary: Arc::new(Semaphore::new(cfg.max_in_flight)),
            priority: Arc::new(Semaphore::new(self.settings().priority_concurrent_updates)),
            ack_timeout: cfg.ack_timeout_seconds,
        });
        let app = Router::new()
            .fallback(receive)
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(w);
        let bot = self.clone();
        tasks.spawn_named("bot_set_commands", async move { bot.set_commands().await });
        let root = tasks.root().clone();
        // Critical: an endpoint that stopped serving before shutdown would leave the instance
        // running and deaf; its end shuts the process down (exit 70) instead.
        tasks.spawn_critical("bot_webhook", async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(root.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "bot: webhook server failed");
            }
        });
        tracing::info!(%addr, "bot: webhook endpoint serving");
        Ok(addr)
    }
}

async fn receive(
    State(w): State<Arc<Webhook>>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let (outcome, response) = w.receive(method, &headers, body).await;
    let m = w.bot.metrics();
    m.webhook(outcome);
    m.webhook_handling.observe(started.elapsed().as_secs_f64());
    response
}

fn retry_soon(status: StatusCode) -> Response {
    (status, [(header::RETRY_AFTER, "1")]).into_response()
}

/// Decrements the in-flight gauge however the work ends.
struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Webhook {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers.get(SECRET_HEADER) else {
            return false;
        };
        let want = self.secret.expose_secret().as_bytes();
        // Constant time in the content; a length mismatch is refused at once (the length of a
        // token from a fixed alphabet reveals nothing useful).
        bool::from(given.as_bytes().ct_eq(want))
    }

    async fn receive(
        &self,
        method: axum::http::Method,
        headers: &HeaderMap,
        body: Bytes,
    ) -> (WebhookOutcome, Response) {
        if !self.authorized(headers) {
            return (
                WebhookOutcome::Unauthorized,
                StatusCode::UNAUTHORIZED.into_response(),
            );
        }
        if method != axum::http::Method::POST {
            return (
                WebhookOutcome::BadRequest,
                StatusCode::METHOD_NOT_ALLOWED.into_response(),
            );
        }
        let update: Update = match serde_json::from_slice(&body) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "bot: webhook body is not an update");
                return (
                    WebhookOutcome::BadRequest,
                    StatusCode::BAD_REQUEST.into_response(),
                );
            }
        };
        let critical = super::is_time_critical(&update);
        let slots = if critical {
            &self.priority
        } else {
            &self.ordinary
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            return (
                WebhookOutcome::Overloaded,
                retry_soon(StatusCode::SERVICE_UNAVAILABLE),
            );
        };
        let m = self.bot.metrics();
        m.webhook_in_flight.inc();
        let in_flight = InFlight(m.webhook_in_flight.clone());
        let id = i64::from(update.id.0);
        let pool = self.bot.inner.pool.clone();
        let claim = tokio::time::timeout(
            self.ack_timeout,
            dedup::claim(&pool, id, self.bot.dedup_lease()),
        )
        .await;
        match claim {
            Ok(Ok(Claim::Mine)) => {}
            Ok(Ok(Claim::Handled)) => {
                m.dedup_duplicates.inc();
                return (WebhookOutcome::Duplicate, StatusCode::OK.into_response());
            }
            Ok(Ok(Claim::Elsewhere)) => {
                return (
                    WebhookOutcome::InProgress,
                    retry_soon(StatusCode::SERVICE_UNAVAILABLE),
                )
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, update_id = id, "bot: webhook update not claimed; Telegram retries it");
                return (
                    WebhookOutcome::Error,
                    retry_soon(StatusCode::SERVICE_UNAVAILABLE),
                );
            }
            Err(_) => {
                tracing::warn!(
                    update_id = id,
                    "bot: webhook claim took longer than ack_timeout_seconds; Telegram retries it"
                );
                return (
                    WebhookOutcome::Error,
                    retry_soon(StatusCode::SERVICE_UNAVAILABLE),
                );
            }
        }
        // The handler runs on its own task: a connection dropped by the load balancer cannot
        // cut it between its answer and its mark. It keeps the slot until it ends.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<bool>();
        let bot = self.bot.clone();
        let received = Instant::now();
        self.bot.inner.tasks.spawn_named("bot_handler", async move {
            let pre_checkout = matches!(
                update.kind,
                teloxide::types::UpdateKind::PreCheckoutQuery(_)
            );
            bot.handle_guarded(update).await;
            if pre_checkout {
                bot.metrics()
                    .precheckout_answer
                    .observe(received.elapsed().as_secs_f64());
            }
            let marked = match dedup::mark_handled(&bot.inner.pool, id).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, update_id = id, "bot: update not marked handled; a retry may handle it again");
                    false
                }
            };
            let _ = done_tx.send(marked);
            drop((permit, in_flight));
        });
        let left = self.ack_timeout.saturating_sub(received.elapsed());
        match tokio::time::timeout(left, done_rx).await {
            // Handled (and marked, or at worst handled again on a retry): acknowledge.
            Ok(Ok(_)) => (WebhookOutcome::Accepted, StatusCode::OK.into_response()),
            // The handler task ended without a word (the runtime is shutting down): not
            // acknowledged, Telegram retries it once its claim expires.
            Ok(Err(_)) => (
                WebhookOutcome::Error,
                retry_soon(StatusCode::SERVICE_UNAVAILABLE),
            ),
            Err(_) => (
                WebhookOutcome::Slow,
                retry_soon(StatusCode::SERVICE_UNAVAILABLE),
            ),
        }
    }
}
