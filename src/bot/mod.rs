//! The Telegram bot: long polling in a loop we control, bounded concurrent handling of
//! updates, and the handlers for users (trial, Telegram Stars purchases, status, key with QR
//! code, help, in English and Russian) and admins (`/stats`, `/diag`, `/reconcile`).
//!
//! Only the leader runs [`BotService::run`] (see `App::start`). teloxide is used as the Bot API
//! client only: the receive loop is ours so polling liveness, `429` and `409` handling are
//! exact and visible:
//! - each `getUpdates` carries an explicit long-poll `timeout`, its HTTP client's total timeout
//!   is that plus a margin, and a runtime timer bounds it once more (FAULTS.md T1);
//! - `429` waits the `retry_after` it names (T2), `409 Conflict` is an error log, a metric and
//!   a long pause, never a tight loop (T3); other errors back off (capped, jittered);
//! - every successful poll, empty or not, sets
//!   `vpnbot_bot_polling_last_success_timestamp_seconds`;
//! - updates are handled concurrently up to `bot.max_concurrent_updates`; when all slots are
//!   busy the loop waits before polling again (back-pressure, bounded memory).

pub mod api;
pub mod bench;
mod handlers;
pub mod i18n;
pub mod keys;
pub mod metrics;
pub mod node_picker;
pub mod polling_op;
pub mod settings;
pub mod store;
mod typed_updates;

pub use api::{BotApi, BotApiError};
pub use metrics::BotMetrics;
pub use polling_op::{PollPhase, PollingOperation};
pub use settings::{BotSettings, Plan};

use std::collections::{BTreeMap, HashSet};
use std::future::IntoFuture;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use prometheus::Registry;
use teloxide::payloads::GetUpdatesSetters;
use teloxide::prelude::Requester;
use teloxide::types::{BotCommand, Update, UpdateKind};
use teloxide::{ApiError, RequestError};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{secs, Config};
use crate::db::DbPool;
use crate::diagnostics::{Diagnostics, WorkerWatch};
use crate::fleet::Fleet;
use crate::obs::health::HealthState;

/// Runs one reconcile pass for `/reconcile`; implemented by the reconcile subsystem and
/// attached with [`BotService::set_reconcile`].
pub trait ReconcileTrigger: Send + Sync + std::fmt::Debug {
    /// Runs one pass over `node` (every node when `None`), removing nothing when `dry_run`,
    /// and returns a short human-readable summary.
    fn run_once(
        &self,
        node: Option<String>,
        dry_run: bool,
    ) -> BoxFuture<'static, Result<String, String>>;
}

/// Public parameters of a node's VLESS inbound (for links).
#[derive(Debug, Clone)]
pub(crate) struct NodePublic {
    pub(crate) host: String,
    pub(crate) port: u16,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) api: BotApi,
    pub(crate) pool: DbPool,
    pub(crate) fleet: Fleet,
    pub(crate) nodes: BTreeMap<String, NodePublic>,
    pub(crate) node_names: Vec<String>,
    pub(crate) node_picker: node_picker::NodePicker,
    pub(crate) admins: HashSet<i64>,
    pub(crate) pool_max: u32,
    pub(crate) health: Option<Arc<HealthState>>,
    pub(crate) registry: Option<Registry>,
    pub(crate) reconcile: OnceLock<Arc<dyn ReconcileTrigger>>,
    pub(crate) diagnostics: OnceLock<Diagnostics>,
    pub(crate) polling: PollingOperation,
}

/// The bot (cheap clone).
#[derive(Debug, Clone)]
pub struct BotService {
    pub(crate) inner: Arc<Inner>,
}

impl BotService {
    /// A bot over `api`, using `pool` and `fleet`, with nodes, admins and settings from
    /// `config`. `health` and `registry` feed `/diag` (optional in tests).
    pub fn new(
        api: BotApi,
        pool: DbPool,
        fleet: Fleet,
        config: &Config,
        health: Option<Arc<HealthState>>,
        registry: Option<Registry>,
    ) -> BotService {
        let nodes: BTreeMap<String, NodePublic> = config
            .nodes
            .iter()
            .filter(|(name, _)| fleet.get(name).is_some())
            .map(|(n, c)| {
                (
                    n.clone(),
                    NodePublic {
                        host: c.public_host.clone(),
                        port: c.public_port,
                    },
                )
            })
            .collect();
        BotService {
            inner: Arc::new(Inner {
                api,
                node_names: nodes.keys().cloned().collect(),
                node_picker: node_picker::NodePicker::new(
                    nodes.keys().cloned().collect(),
                    &config.bot.node_policy,
                    pool.clone(),
                ),
                nodes,
                pool,
                fleet,
                admins: config.telegram.admin_ids.iter().copied().collect(),
                pool_max: config.db.max_connections,
                health,
                registry,
                reconcile: OnceLock::new(),
                diagnostics: OnceLock::new(),
                polling: PollingOperation::default(),
            }),
        }
    }

    /// Attaches the reconcile runner behind `/reconcile` (once; later calls are ignored).
    pub fn set_reconcile(&self, trigger: Arc<dyn ReconcileTrigger>) {
        let _ = self.inner.reconcile.set(trigger);
    }

    /// Makes the receive loop visible to the watchdog (once; later calls are ignored): its
    /// phase as an in-flight operation (dump section `bot_polling`, `operation_overdue` past a
    /// phase's deadline) and its polls as the periodic worker `bot_polling`
    /// (`worker_overdue` when polls stop completing).
    pub fn set_diagnostics(&self, diagnostics: &Diagnostics) {
        if self.inner.diagnostics.set(diagnostics.clone()).is_ok() {
            diagnostics.add_source(Arc::new(self.inner.polling.clone()));
        }
    }

    /// The receive loop's current phase, as the watchdog sees it.
    pub fn polling_operation(&self) -> &PollingOperation {
        &self.inner.polling
    }

    /// Loads what handlers need before the first update (the per-node load for
    /// `least_loaded`); [`Self::run`] does this at start.
    ///
    /// # Errors
    /// The database error.
    pub async fn warm(&self) -> Result<(), crate::db::DbError> {
        self.inner.node_picker.warm().await
    }

    /// The Bot API client.
    pub fn api(&self) -> &BotApi {
        &self.inner.api
    }

    fn settings(&self) -> &BotSettings {
        &self.inner.api.settings
    }

    fn metrics(&self) -> &BotMetrics {
        &self.inner.api.metrics
    }

    /// Registers the command menus (English default, Russian for `ru` users). Best effort.
    async fn set_commands(&self) {
        let api = &self.inner.api;
        for lang in [i18n::Lang::En, i18n::Lang::Ru] {
            let cmds: Vec<BotCommand> = [
                ("start", "Main menu", "Главное меню"),
                ("trial", "Free trial", "Пробный период"),
                ("buy", "Plans and payment", "Тарифы и оплата"),
                ("status", "My subscription", "Моя подписка"),
                ("key", "My key and QR code", "Мой ключ и QR-код"),
                ("help", "Help", "Помощь"),
            ]
            .into_iter()
            .map(|(c, en, ru)| BotCommand::new(c, if lang == i18n::Lang::Ru { ru } else { en }))
            .collect();
            let res = api
                .call("setMyCommands", || {
                    let req = api.bot.set_my_commands(cmds.clone());
                    match lang {
                        i18n::Lang::Ru => {
                            use teloxide::payloads::SetMyCommandsSetters;
                            req.language_code("ru").into_future()
                        }
                        i18n::Lang::En => req.into_future(),
                    }
                })
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "setMyCommands failed");
            }
        }
    }

    /// The receive loop: polls until `cancel`, then waits (bounded) for handlers in flight
    /// and confirms the last offset so a successor does not see the same updates again.
    pub async fn run(self, cancel: CancellationToken) {
        let api = self.inner.api.clone();
        let s = self.settings().clone();
        let op = &self.inner.polling;
        let _clear = polling_op::ClearOnDrop(op.clone());
        // Startup makes three bounded calls, each possibly retried once after a 429.
        let call_bound = secs(s.request_timeout_seconds + s.retry_after_max_seconds);
        op.enter(PollPhase::Startup, call_bound * 3);
        tracing::info!(
            poll_timeout_s = s.poll_timeout_seconds,
            client_timeout_s = s.poll_request_timeout().as_secs_f64(),
            "bot: long polling starts"
        );
        // A webhook left set makes getUpdates fail with 409: remove it once.
        let _ = api
            .call("deleteWebhook", || api.bot.delete_webhook().into_future())
            .await;
        self.set_commands().await;

        if let Err(e) = self.warm().await {
            tracing::warn!(error = %e, "node load not counted at start; the first pick counts");
        }
        let sem = Arc::new(Semaphore::new(s.max_concurrent_updates));
        let handlers = TaskTracker::new();
        let mut offset: Option<i32> = None;
        let mut failures: u32 = 0;
        let bound = s.poll_request_timeout() + Duration::from_secs(1);
        let slot_bound = secs(s.handler_timeout_seconds) + Duration::from_secs(1);
        let watch = WorkerWatch::start(self.inner.diagnostics.get(), "bot_polling", bound);
        loop {
            op.enter(PollPhase::LongPoll, bound);
            let req =
                typed_updates::get_updates(&api.poll_bot, offset, 100, s.poll_timeout_seconds);
            let res = tokio::select! {
                _ = cancel.cancelled() => break,
                r = tokio::time::timeout(bound, req.into_future()) => r,
            };
            let pause = match res {
                Ok(Ok(updates)) => {
                    let updates = typed_updates::log_unparsed(updates);
                    api.count("getUpdates", "ok");
                    self.metrics().polling_last_success.set(unix_now());
                    failures = 0;
                    // Bot API offsets are i32 in teloxide; a hostile or odd endpoint could
                    // send an id at i32::MAX: saturate instead of overflowing.
                    let id_of = |u: &Update| i32::try_from(u.id.0).unwrap_or(i32::MAX);
                    let mut unstarted: std::collections::BTreeSet<i32> =
                        updates.iter().map(id_of).collect();
                    let batch_next = unstarted.last().map(|id| id.saturating_add(1));
                    // Telegram cancels a payment whose pre-checkout is not answered within
                    // 10 s; the answer is light: pre-checkouts go first and take no slot.
                    let mut updates = updates;
                    updates.sort_by_key(|u| !matches!(u.kind, UpdateKind::PreCheckoutQuery(_)));
                    for u in updates {
                        let id = id_of(&u);
                        let permit = if matches!(u.kind, UpdateKind::PreCheckoutQuery(_)) {
                            None
                        } else {
                            match sem.clone().try_acquire_owned() {
                                Ok(p) => Some(p),
                                Err(_) => {
                                    op.enter(PollPhase::HandlerSlot, slot_bound);
                                    tokio::select! {
                                        _ = cancel.cancelled() => break,
                                        p = sem.clone().acquire_owned() => {
                                            Some(p.expect("semaphore never closed"))
                                        }
                                    }
                                }
                            }
                        };
                        let bot = self.clone();
                        handlers.spawn(async move {
                            bot.handle_guarded(u).await;
                            drop(permit);
                        });
                        unstarted.remove(&id);
                    }
                    // Confirm only what was started: an update left unstarted by shutdown
                    // stays with Telegram for the next leader.
                    offset = match (unstarted.first(), batch_next) {
                        (Some(&first), _) => Some(first),
                        (None, Some(next)) => Some(offset.unwrap_or(0).max(next)),
                        (None, None) => offset,
                    };
                    None
                }
                Ok(Err(e)) => {
                    let (outcome, detail) = api::classify(&e);
                    api.count("getUpdates", outcome);
                    failures += 1;
                    match e {
                        RequestError::RetryAfter(sec) => {
                            self.metrics().error("rate_limited");
                            // Bounded like sends: a bogus hour-long retry_after must not stop
                            // the bot for an hour.
                            let cap = secs(s.retry_after_max_seconds);
                            tracing::warn!(
                                retry_after_s = sec.seconds(),
                                wait_s = sec.duration().min(cap).as_secs_f64(),
                                "getUpdates: 429, waiting as told (capped at retry_after_max_seconds)"
                            );
                            Some(sec.duration().min(cap))
                        }
                        RequestError::Api(ApiError::TerminatedByOtherGetUpdates) => {
                            self.metrics().error("conflict");
                            let wait =
                                secs(s.conflict_backoff_seconds * rand::random_range(0.9..=1.1));
                            tracing::error!(
                                pause_s = wait.as_secs_f64(),
                                "getUpdates: 409 Conflict: another process is polling this bot \
                                 token (a second deployment, or a webhook); pausing"
                            );
                            Some(wait)
                        }
                        RequestError::Api(ApiError::InvalidToken) => {
                            // 401 on every poll: the token was revoked (or replaced). The bot
                            // is dead until someone acts; polling goes on (capped backoff) so
                            // a restored token is picked up.
                            self.metrics().error("unauthorized");
                            let wait = s.backoff(failures);
                            tracing::error!(
                                failures,
                                pause_s = wait.as_secs_f64(),
                                "getUpdates: 401 Unauthorized: the bot token is revoked or wrong; \
                                 no update is received until telegram.token is replaced"
                            );
                            Some(wait)
                        }
                        _ => {
                            self.metrics().error(match outcome {
                                "timeout" => "poll_timeout",
                                "api_error" => "api",
                                "invalid_json" => "invalid_json",
                                _ => "network",
                            });
                            let wait = s.backoff(failures);
                            tracing::warn!(error = %detail, failures, pause_s = wait.as_secs_f64(), "getUpdates failed; backing off");
                            Some(wait)
                        }
                    }
                }
                Err(_) => {
                    api.count("getUpdates", "timeout");
                    self.metrics().error("poll_timeout");
                    failures += 1;
                    let wait = s.backoff(failures);
                    tracing::warn!(
                        bound_s = bound.as_secs_f64(),
                        "getUpdates: no answer within the bound; polling again"
                    );
                    Some(wait)
                }
            };
            watch.ran(bound + pause.unwrap_or_default());
            if let Some(wait) = pause {
                op.enter(PollPhase::Backoff, wait + Duration::from_secs(1));
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        drop(watch);
        handlers.close();
        let drain = secs(s.handler_timeout_seconds.min(5.0));
        op.enter(PollPhase::Drain, drain + Duration::from_secs(3));
        if tokio::time::timeout(drain, handlers.wait()).await.is_err() {
            tracing::warn!("bot: handlers still running at shutdown were abandoned");
        }
        if let Some(o) = offset {
            // Confirm what was handled so the next leader starts after it.
            let req = api.poll_bot.get_updates().offset(o).timeout(0).limit(1);
            let _ = tokio::time::timeout(Duration::from_secs(2), req.into_future()).await;
        }
        tracing::info!("bot: long polling stopped");
    }

    /// Handles one update with the per-update bound, counting a timeout or a panic.
    async fn handle_guarded(&self, u: Update) {
        let bound = secs(self.settings().handler_timeout_seconds);
        self.metrics().in_flight.inc();
        let started = std::time::Instant::now();
        let fut = std::panic::AssertUnwindSafe(self.handle_update(u)).catch_unwind();
        let cut = |handler: &str| {
            // The handler's own observation never ran: keep the slowest ones in the histogram.
            self.metrics()
                .handler_duration
                .with_label_values(&[handler])
                .observe(started.elapsed().as_secs_f64());
        };
        match tokio::time::timeout(bound, fut).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                cut("panic");
                self.metrics().error("panic");
                tracing::error!("bot: an update handler panicked");
            }
            Err(_) => {
                cut("timeout");
                self.metrics().error("handler_timeout");
                tracing::error!(
                    bound_s = bound.as_secs_f64(),
                    "bot: an update handler timed out"
                );
            }
        }
        self.metrics().in_flight.dec();
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
