//! The Bot API client side: two teloxide [`Bot`]s over one base URL (one whose HTTP total
//! timeout fits a long poll, one for everything else), and [`BotApi::call`], which bounds,
//! counts and retries (on `429 retry_after` only, so nothing is sent twice) every request.

use std::future::{Future, IntoFuture};
use std::time::Duration;

use secrecy::ExposeSecret;
use teloxide::payloads::{SendMessageSetters, SendPhotoSetters};
use teloxide::prelude::Requester;
use teloxide::types::{ChatId, InlineKeyboardMarkup, InputFile, Message};
use teloxide::{ApiError, Bot, RequestError};

use super::metrics::{BotErrorKind, BotMetrics};
use super::settings::BotSettings;
use crate::config::TelegramConfig;

/// Why the Bot API clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BotApiBuildError {
    /// `telegram.api_url` is not a URL.
    #[error("telegram.api_url is not a URL: {0}")]
    Url(#[from] url::ParseError),
    /// An HTTP client could not be built (TLS backend, resolver).
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why a Bot API request failed, without the token or URL.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BotApiError {
    /// No answer within the total timeout.
    #[error("{method}: no answer within {after:?}")]
    Timeout {
        /// The Bot API method.
        method: &'static str,
        /// The bound that passed.
        after: Duration,
    },
    /// `429` whose `retry_after` exceeds the configured maximum, or still limited after retries.
    #[error("{method}: rate limited, retry after {retry_after:?}")]
    RateLimited {
        /// The Bot API method.
        method: &'static str,
        /// What Telegram asked for.
        retry_after: Duration,
    },
    /// `409 Conflict`: another instance is polling the same token.
    #[error("{method}: conflict, another instance is polling this bot token")]
    Conflict {
        /// The Bot API method.
        method: &'static str,
    },
    /// Any other failure, described without secrets.
    #[error("{method}: {kind}: {detail}")]
    Other {
        /// The Bot API method.
        method: &'static str,
        /// The outcome label (`network`, `api_error`, `forbidden`, `invalid_json`, `error`).
        kind: &'static str,
        /// A description without the token or URL.
        detail: String,
    },
}

impl BotApiError {
    /// The user blocked the bot, deleted their account or cannot be written to (`403`):
    /// sending again will not help.
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            BotApiError::Other {
                kind: "forbidden",
                ..
            }
        )
    }
}

/// `403` answers about the recipient: blocked, deactivated, kicked, never started the bot.
fn is_forbidden(e: &RequestError) -> bool {
    matches!(
        e,
        RequestError::Api(
            ApiError::BotBlocked
                | ApiError::UserDeactivated
                | ApiError::BotKicked
                | ApiError::BotKickedFromSupergroup
                | ApiError::BotKickedFromChannel
                | ApiError::CantInitiateConversation
                | ApiError::CantTalkWithBots
        )
    )
}

/// Whether `e` failed before any byte of the request was acknowledged by the peer: no
/// connection was made, or the kernel aborted the connection because sent bytes stayed
/// unacknowledged (`ETIMEDOUT` from `TCP_USER_TIMEOUT` or keep-alive). Sending again cannot
/// deliver twice. A timeout of our own (the request timer) is not this: the request may have
/// been read.
fn not_acknowledged(e: &RequestError) -> bool {
    let RequestError::Network(n) = e else {
        return false;
    };
    if n.is_connect() {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&**n);
    while let Some(err) = src {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error().is_some() && io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        src = err.source();
    }
    false
}

/// Outcome label and a secret-free description of a teloxide error.
pub(crate) fn classify(e: &RequestError) -> (&'static str, String) {
    match e {
        RequestError::RetryAfter(s) => ("retry_after", format!("retry after {} s", s.seconds())),
        RequestError::Api(ApiError::TerminatedByOtherGetUpdates) => {
            ("conflict", "terminated by other getUpdates request".into())
        }
        RequestError::Api(a) => ("api_error", a.to_string()),
        RequestError::MigrateToChatId(_) => ("api_error", "chat migrated".into()),
        RequestError::Network(n) => {
            let what = if n.is_timeout() {
                "timeout"
            } else if n.is_connect() {
                "connect"
            } else if n.is_body() || n.is_decode() {
                "body"
            } else {
                "request"
            };
            let kind = if n.is_timeout() { "timeout" } else { "network" };
            (kind, format!("network error ({what})"))
        }
        RequestError::InvalidJson { source, .. } => (
            "invalid_json",
            format!("invalid JSON from the Bot API: {source}"),
        ),
        RequestError::Io(io) => ("error", format!("I/O error: {}", io.kind())),
    }
}

/// Sends requests to the Bot API (cheap clone). Shared by the bot and the expiry worker.
/// `Debug` leaves the teloxide clients out: their own `Debug` prints the bot token.
#[derive(Clone)]
pub struct BotApi {
    pub(crate) bot: Bot,
    fresh_bot: Bot,
    /// The client of the `getUpdates` long poll (its own timeout).
    pub(crate) poll_bot: Bot,
    pub(crate) metrics: BotMetrics,
    pub(crate) settings: BotSettings,
}

impl std::fmt::Debug for BotApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotApi")
            .field("bot", &"<teloxide client, token redacted>")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl BotApi {
    /// Builds the clients for `telegram` (token and base URL) with the timeouts of `settings`.
    ///
    /// # Errors
    /// [`BotApiBuildError`] when `telegram.api_url` is not a URL or an HTTP client cannot be
    /// built.
    pub fn new(
        telegram: &TelegramConfig,
        settings: &BotSettings,
        metrics: BotMetrics,
    ) -> Result<BotApi, BotApiBuildError> {
        let url = reqwest::Url::parse(&telegram.api_url)?;
        let client = |total: Duration, max_idle: usize| {
            reqwest::Client::builder()
                .timeout(total)
                .connect_timeout(Duration::from_secs(5).min(total))
                .tcp_nodelay(true)
                // Never follow a redirect: the token is in the URL path and a message's text
                // in the body; a 3xx from the Bot API is an error, not an instruction.
                .redirect(reqwest::redirect::Policy::none())
                // A path that drops silently (NAT or firewall state gone, no FIN) leaves a
                // pooled connection dead: recycle idle ones before that, find dead idle ones
                // with keep-alive probes, and abort one whose request bytes stay
                // unacknowledged instead of waiting for the whole request timeout.
                .pool_idle_timeout(settings.pool_idle_timeout_seconds)
                .pool_max_idle_per_host(max_idle)
                .tcp_keepalive(Duration::from_secs(15))
                .tcp_keepalive_interval(Duration::from_secs(5))
                .tcp_keepalive_retries(3)
                .tcp_user_timeout(settings.tcp_user_timeout_seconds)
                .build()
                .map_err(BotApiBuildError::Client)
        };
        let token = telegram.token.expose_secret().to_string();
        let request = settings.request_timeout_seconds;
        let bot =
            Bot::with_client(token.clone(), client(request, usize::MAX)?).set_api_url(url.clone());
        // Keeps no connection: a retry on it always opens a fresh one.
        let fresh_bot =
            Bot::with_client(token.clone(), client(request, 0)?).set_api_url(url.clone());
        let poll_bot =
            Bot::with_client(token, client(settings.poll_request_timeout(), usize::MAX)?)
                .set_api_url(url);
        Ok(BotApi {
            bot,
            fresh_bot,
            poll_bot,
            metrics,
            settings: settings.clone(),
        })
    }

    /// The metric families.
    pub fn metrics(&self) -> &BotMetrics {
        &self.metrics
    }

    /// Runs the request `make()` builds, bounded by the request timeout, counted under
    /// `method`; on `429` waits `retry_after` (up to the configured maximum) and sends again,
    /// at most twice. A request that failed before any byte of it was acknowledged (no
    /// connection, or the kernel aborted the connection with the bytes unacknowledged) is sent
    /// once more (`vpnbot_bot_api_retries_total`): the failed connection has left the pool, but
    /// only [`Self::send_text`] and [`Self::send_png`] are sure to get a fresh one (another idle
    /// pooled connection may serve `make()`). Other errors are not retried (a send might have
    /// been delivered).
    ///
    /// # Errors
    /// [`BotApiError`].
    pub async fn call<T, F, Fut>(&self, method: &'static str, make: F) -> Result<T, BotApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, RequestError>>,
    {
        self.call_on(method, |_| make()).await
    }

    /// As [`Self::call`], with the client passed in: the retry of an unacknowledged request
    /// gets a client that keeps no connection, so it goes out on a fresh one.
    async fn call_on<T, F, Fut>(&self, method: &'static str, make: F) -> Result<T, BotApiError>
    where
        F: Fn(&Bot) -> Fut,
        Fut: Future<Output = Result<T, RequestError>>,
    {
        // The client's own timeout bounds the HTTP exchange; this one also bounds teloxide's
        // fixed 10 s pause after a 5xx.
        let bound = self.settings.request_timeout_seconds + Duration::from_secs(1);
        let max_wait = self.settings.retry_after_max_seconds;
        let mut attempt = 0;
        let mut bot = &self.bot;
        loop {
            attempt += 1;
            let res = tokio::time::timeout(bound, make(bot)).await;
            let e = match res {
                Ok(Ok(v)) => {
                    self.count(method, "ok");
                    return Ok(v);
                }
                Err(_) => {
                    self.count(method, "timeout");
                    return Err(BotApiError::Timeout {
                        method,
                        after: bound,
                    });
                }
                Ok(Err(e)) => e,
            };
            let (outcome, detail) = classify(&e);
            self.count(method, outcome);
            if std::ptr::eq(bot, &self.bot) && not_acknowledged(&e) {
                self.metrics
                    .api_retries
                    .with_label_values(&[method, "not_acknowledged"])
                    .inc();
                tracing::warn!(
                    method,
                    error = %detail,
                    "Bot API request not acknowledged; sending it once more on a fresh connection"
                );
                bot = &self.fresh_bot;
                continue;
            }
            match e {
                RequestError::RetryAfter(s) => {
                    self.metrics.error(BotErrorKind::RateLimited);
                    let wait = s.duration();
                    if wait > max_wait || attempt >= 3 {
                        return Err(BotApiError::RateLimited {
                            method,
                            retry_after: wait,
                        });
                    }
                    tracing::warn!(
                        method,
                        retry_after_s = s.seconds(),
                        "Bot API rate limit: waiting as told"
                    );
                    tokio::time::sleep(wait).await;
                }
                RequestError::Api(ApiError::TerminatedByOtherGetUpdates) => {
                    return Err(BotApiError::Conflict { method })
                }
                _ => {
                    let kind = match outcome {
                        _ if is_forbidden(&e) => "forbidden",
                        "timeout" => {
                            return Err(BotApiError::Timeout {
                                method,
                                after: bound,
                            })
                        }
                        "network" => "network",
                        "api_error" => "api_error",
                        "invalid_json" => "invalid_json",
                        _ => "error",
                    };
                    return Err(BotApiError::Other {
                        method,
                        kind,
                        detail,
                    });
                }
            }
        }
    }

    pub(crate) fn count(&self, method: &'static str, outcome: &'static str) {
        self.metrics
            .api_requests
            .with_label_values(&[method, outcome])
            .inc();
    }

    /// Sends plain text (no parse mode, so user-supplied text needs no escaping), with an
    /// optional inline keyboard.
    ///
    /// # Errors
    /// [`BotApiError`].
    pub async fn send_text(
        &self,
        chat: i64,
        text: &str,
        keyboard: Option<InlineKeyboardMarkup>,
    ) -> Result<Message, BotApiError> {
        self.call_on("sendMessage", |bot| {
            let mut req = bot.send_message(ChatId(chat), text);
            if let Some(k) = &keyboard {
                req = req.reply_markup(k.clone());
            }
            req.into_future()
        })
        .await
    }

    /// Sends a PNG with a caption.
    ///
    /// # Errors
    /// [`BotApiError`].
    pub async fn send_png(
        &self,
        chat: i64,
        png: Vec<u8>,
        caption: &str,
        keyboard: Option<InlineKeyboardMarkup>,
    ) -> Result<Message, BotApiError> {
        self.call_on("sendPhoto", |bot| {
            let mut req = bot
                .send_photo(
                    ChatId(chat),
                    InputFile::memory(png.clone()).file_name("key.png"),
                )
                .caption(caption);
            if let Some(k) = &keyboard {
                req = req.reply_markup(k.clone());
            }
            req.into_future()
        })
        .await
    }
}
