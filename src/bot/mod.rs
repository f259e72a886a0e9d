//! The Telegram bot: long polling in a loop we control, bounded concurrent handling of
//! updates, and the handlers for users (trial, Telegram Stars purchases, status, key with QR
//! code, help, in English and Russian) and admins (`/stats`, `/diag`, `/reconcile`).
//!
//! In polling mode only the leader runs [`BotService::run`] (see `App::start`); in webhook
//! mode every instance serves [`webhook`] instead. Both hand each update to the same guarded
//! handler, once per `update_id` ([`dedup`]). teloxide is used as the Bot API
//! client only: the receive loop is ours so polling liveness, `429` and `409` handling are
//! exact and visible:
//! - each `getUpdates` carries an explicit long-poll `timeout`, its HTTP client's total timeout
//!   is that plus a margin, and a runtime timer bounds it once more (FAULTS.md T1);
//! - `429` waits the `retry_after` it names (T2), `409 Conflict` is an error log, a metric and
//!   a long pause, never a tight loop (T3); other errors back off (capped, jittered);
//! - every successful poll, empty or not, sets
//!   `vpnbot_bot_polling_last_success_timestamp_seconds`;
//! - updates are handled concurrently up to `bot.max_concurrent_updates`; while all slots are
//!   busy the loop keeps polling into a bounded queue (`bot.update_queue_capacity`) and waits
//!   only when it is full (back-pressure, bounded memory, visible in
//!   `vpnbot_bot_receive_backpressure_seconds_total`);
//! - time-critical updates (pre-checkout queries, successful payments) have a queue and
//!   slots of their own (`bot.priority_concurrent_updates`), so ordinary traffic can neither
//!   delay their fetching nor take their slots (`vpnbot_bot_precheckout_answer_seconds`).

pub mod api;
pub mod commands;
pub mod dedup;
mod handlers;
pub mod i18n;
pub mod keys;
pub mod metrics;
pub mod node_picker;
pub mod polling_op;
pub mod service_watch;
pub mod settings;
pub mod store;
mod typed_updates;
pub mod webhook;
pub mod webhook_cli;

pub use api::{BotApi, BotApiBuildError, BotApiError};
pub use metrics::{BotErrorKind, BotMetrics, PaymentOutcome};
pub use polling_op::{PollPhase, PollingOperation};
pub use settings::{BotSettings, Plan};

use std::collections::{BTreeMap, HashSet};
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use prometheus::Registry;
use teloxide::payloads::GetUpdatesSetters;
use teloxide::prelude::Requester;
use teloxide::types::{BotCommand, Update, UpdateKind};
use teloxide::{ApiError, RequestError};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::DbPool;
use crate::diagnostics::{Diagnostics, WorkerWatch};
use crate::fleet::Fleet;
use crate::obs::health::HealthState;
use crate::tasks::Tasks;

/// Runs one reconcile pass for `/reconcile`; implemented by the reconcile subsystem and
/// passed in [`BotDeps::reconcile`].
pub trait ReconcileTrigger: Send + Sync + std::fmt::Debug {
    /// Runs one pass over `node` (every node when `None`), removing nothing when `dry_run`,
    /// and returns a short human-readable summary.
    fn run_once(
        &self,
        node: Option<String>,
        dry_run: bool,
    ) -> BoxFuture<'static, Result<String, ReconcileTriggerError>>;

    /// The longest one pass may take; the `/reconcile` task is cut off after it
    /// (default [`DEFAULT_ADMIN_RECONCILE_BOUND`]).
    fn bound(&self) -> Duration {
        DEFAULT_ADMIN_RECONCILE_BOUND
    }
}

/// Bound of one `/reconcile` pass when its trigger names none.
pub const DEFAULT_ADMIN_RECONCILE_BOUND: Duration = Duration::from_secs(600);

/// Why a `/reconcile` pass could not run (its Display is what the admin is told).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ReconcileTriggerError(#[from] pub Box<dyn std::error::Error + Send + Sync>);

/// Public parameters of a node's VLESS inbound (for links).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePublic {
    /// Host clients connect to.
    pub host: String,
    /// Port clients connect to.
    pub port: u16,
}

/// The public side of every configured node (`nodes.NAME.public_host`/`public_port`).
pub fn public_nodes(
    nodes: &BTreeMap<String, crate::config::NodeConfig>,
) -> BTreeMap<String, NodePublic> {
    nodes
        .iter()
        .map(|(n, c)| {
            (
                n.clone(),
                NodePublic {
                    host: c.public_host.clone(),
                    port: c.public_port,
                },
            )
        })
        .collect()
}

/// What the bot needs besides its API client, pool and fleet; all given at construction.
#[derive(Debug, Default)]
pub struct BotDeps {
    /// Public host and port per node, for links ([`public_nodes`]); nodes missing from the
    /// fleet are left out.
    pub nodes: BTreeMap<String, NodePublic>,
    /// Telegram user ids allowed to use admin commands (`telegram.admin_ids`).
    pub admin_ids: Vec<i64>,
    /// Where the bot's background work runs (`/reconcile` passes, node-load reloads, the
    /// receive loop's dispatchers): tracked, so shutdown waits for it.
    pub tasks: Tasks,
    /// Health sources for `/diag`.
    pub health: Option<Arc<HealthState>>,
    /// The metrics registry, for `/diag`'s scheduler-lag quantile.
    pub registry: Option<Registry>,
    /// The runner behind `/reconcile` (`None`: "not available in this instance").
    pub reconcile: Option<Arc<dyn ReconcileTrigger>>,
    /// Makes the receive loop visible to the watchdog: its phase as an in-flight operation
    /// (dump section `bot_polling`, `operation_overdue` past a phase's deadline) and its polls
    /// as the periodic worker `bot_polling` (`worker_overdue` when polls stop completing).
    pub diagnostics: Option<Diagnostics>,
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
    pub(crate) reconcile: Option<Arc<dyn ReconcileTrigger>>,
    pub(crate) diagnostics: Option<Diagnostics>,
    pub(crate) tasks: Tasks,
    /// One `/reconcile` pass at a time.
    pub(crate) admin_reconcile: Arc<Semaphore>,
    pub(crate) polling: PollingOperation,
    pub(crate) progress: service_watch::ServiceProgress,
}

/// The bot (cheap clone).
#[derive(Debug, Clone)]
pub struct BotService {
    pub(crate) inner: Arc<Inner>,
}

impl BotService {
    /// A bot over `api` (which carries the bot's settings), using `pool` and `fleet`, with
    /// everything else in `deps`.
    pub fn new(api: BotApi, pool: DbPool, fleet: Fleet, deps: BotDeps) -> BotService {
        let nodes: BTreeMap<String, NodePublic> = deps
            .nodes
            .into_iter()
            .filter(|(name, _)| fleet.get(name).is_some())
            .collect();
        let settings = api.settings.clone();
        let polling = PollingOperation::default();
        let progress = service_watch::ServiceProgress::new(settings.starved_after_seconds);
        if let Some(d) = &deps.diagnostics {
            d.add_source(Arc::new(polling.clone()));
            d.add_source(Arc::new(progress.clone()));
        }
        BotService {
            inner: Arc::new(Inner {
                api,
                node_names: nodes.keys().cloned().collect(),
                node_picker: node_picker::NodePicker::new(
                    nodes.keys().cloned().collect(),
                    &settings.node_policy,
                    pool.clone(),
                    &deps.tasks,
                ),
                nodes,
                pool_max: pool.raw().options().get_max_connections(),
                pool,
                fleet,
                admins: deps.admin_ids.into_iter().collect(),
                health: deps.health,
                registry: deps.registry,
                reconcile: deps.reconcile,
                diagnostics: deps.diagnostics,
                tasks: deps.tasks,
                admin_reconcile: Arc::new(Semaphore::new(1)),
                polling,
                progress,
            }),
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
            let cmds: Vec<BotCommand> = commands::Command::menu(lang == i18n::Lang::Ru);
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
        let call_bound = s.request_timeout_seconds + s.retry_after_max_seconds;
        op.enter(PollPhase::Startup, call_bound * 3);
        tracing::info!(
            poll_timeout_s = s.poll_timeout_seconds,
            client_timeout_s = s.poll_request_timeout().as_secs_f64(),
            "bot: long polling starts"
        );
        // A webhook set makes getUpdates fail with 409. It is not deleted here: in a webhook
        // deployment that would take every instance's updates away. Switching back is an
        // operator's command (`vpnbot webhook delete`).
        if let Ok(info) = api
            .call("getWebhookInfo", || {
                api.bot.get_webhook_info().into_future()
            })
            .await
        {
            if info.url.is_some() {
                self.metrics().error(BotErrorKind::Conflict);
                tracing::error!(
                    pending_updates = info.pending_update_count,
                    "bot: telegram.mode = \"polling\" but a webhook is set for this bot: \
                     getUpdates will answer 409 and no update is received. Run `vpnbot webhook \
                     delete` to switch to polling, or set telegram.mode = \"webhook\""
                );
            }
        }
        self.set_commands().await;

        if let Err(e) = self.warm().await {
            tracing::warn!(error = %e, "node load not counted at start; the first pick counts");
        }
        let handlers = TaskTracker::new();
        // Two lanes, each a bounded queue drained onto its own slots: ordinary updates, and
        // time-critical ones (pre-checkout queries, successful payments) that ordinary traffic
        // can neither delay nor starve. The loop keeps polling while slots are busy; it pauses
        // only when a queue is full (back-pressure, bounded memory).
        let ordinary = Lane::start(
            &self,
            "ordinary",
            s.max_concurrent_updates,
            s.update_queue_capacity,
            &handlers,
            &cancel,
        );
        let priority = Lane::start(
            &self,
            "priority",
            s.priority_concurrent_updates,
            s.update_queue_capacity,
            &handlers,
            &cancel,
        );
        let mut offset: Option<i32> = None;
        let mut failures: u32 = 0;
        let bound = s.poll_request_timeout() + Duration::from_secs(1);
        let slot_bound = s.handler_timeout_seconds + Duration::from_secs(1);
        let watch = WorkerWatch::start(self.inner.diagnostics.as_ref(), "bot_polling", bound);
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
                    let received = Instant::now();
                    let updates = typed_updates::log_unparsed(updates);
                    api.count("getUpdates", "ok");
                    self.metrics().polling_last_success.set(unix_now());
                    failures = 0;
                    // Bot API offsets are i32 in teloxide; a hostile or odd endpoint could
                    // send an id at i32::MAX: saturate instead of overflowing.
                    let id_of = |u: &Update| i32::try_from(u.id.0).unwrap_or(i32::MAX);
                    let mut unqueued: std::collections::BTreeSet<i32> =
                        updates.iter().map(id_of).collect();
                    let batch_next = unqueued.last().map(|id| id.saturating_add(1));
                    // Time-critical updates go first in their batch, to their own lane.
                    let mut updates = updates;
                    updates.sort_by_key(|u| !is_time_critical(u));
                    for u in updates {
                        let id = id_of(&u);
                        let lane = if is_time_critical(&u) {
                            &priority
                        } else {
                            &ordinary
                        };
                        let queued = Queued {
                            update: u,
                            received,
                        };
                        if !lane
                            .push(
                                queued,
                                &cancel,
                                op,
                                slot_bound,
                                self.metrics(),
                                &self.inner.progress,
                            )
                            .await
                        {
                            break;
                        }
                        unqueued.remove(&id);
                    }
                    // Confirm only what was queued: an update left out by shutdown stays
                    // with Telegram for the next leader (queued ones are started at shutdown).
                    offset = match (unqueued.first(), batch_next) {
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
                            self.metrics().error(BotErrorKind::RateLimited);
                            // Bounded like sends: a bogus hour-long retry_after must not stop
                            // the bot for an hour.
                            let cap = s.retry_after_max_seconds;
                            tracing::warn!(
                                retry_after_s = sec.seconds(),
                                wait_s = sec.duration().min(cap).as_secs_f64(),
                                "getUpdates: 429, waiting as told (capped at retry_after_max_seconds)"
                            );
                            Some(sec.duration().min(cap))
                        }
                        RequestError::Api(ApiError::TerminatedByOtherGetUpdates) => {
                            self.metrics().error(BotErrorKind::Conflict);
                            let wait = s
                                .conflict_backoff_seconds
                                .mul_f64(rand::random_range(0.9..=1.1));
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
                            self.metrics().error(BotErrorKind::Unauthorized);
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
                                "timeout" => BotErrorKind::PollTimeout,
                                "api_error" => BotErrorKind::Api,
                                "invalid_json" => BotErrorKind::InvalidJson,
                                _ => BotErrorKind::Network,
                            });
                            let wait = s.backoff(failures);
                            tracing::warn!(error = %detail, failures, pause_s = wait.as_secs_f64(), "getUpdates failed; backing off");
                            Some(wait)
                        }
                    }
                }
                Err(_) => {
                    api.count("getUpdates", "timeout");
                    self.metrics().error(BotErrorKind::PollTimeout);
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
        // The lanes start what they hold (confirmed to Telegram) without waiting for a slot.
        ordinary.finish().await;
        priority.finish().await;
        handlers.close();
        let drain = s.handler_timeout_seconds.min(Duration::from_secs(5));
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

    /// Handles one update with the per-update bound, counting a timeout or a panic. A handler
    /// cut off or panicking still answers the user honestly (see [`Owed`]).
    async fn handle_guarded(&self, u: Update) {
        self.handle_guarded_claiming(u, None).await;
    }

    /// [`Self::handle_guarded`]; with `claim` (the polling loop), the update is first claimed
    /// inside the same bound ([`dedup`]): a duplicate is skipped, and whether the claim was
    /// taken is recorded in `claim` (to mark the update handled afterwards, cut off or not).
    async fn handle_guarded_claiming(
        &self,
        u: Update,
        claim: Option<&std::sync::atomic::AtomicBool>,
    ) {
        let bound = self.settings().handler_timeout_seconds;
        self.metrics().in_flight.inc();
        self.inner.progress.started();
        let started = std::time::Instant::now();
        let owed = Owed::of(&u);
        let work = async move {
            if let Some(claimed) = claim {
                match self.claim_for_polling(&u).await {
                    dedup::Proceed::Skip => return,
                    dedup::Proceed::Claimed => {
                        claimed.store(true, std::sync::atomic::Ordering::Relaxed)
                    }
                    dedup::Proceed::Unclaimed => {}
                }
            }
            self.handle_update(u).await
        };
        let fut = std::panic::AssertUnwindSafe(work).catch_unwind();
        let cut = |handler: &str| {
            // The handler's own observation never ran: keep the slowest ones in the histogram.
            self.metrics()
                .handler_duration
                .with_label_values(&[handler])
                .observe(started.elapsed().as_secs_f64());
        };
        let cut_off = match tokio::time::timeout(bound, fut).await {
            Ok(Ok(())) => false,
            Ok(Err(_)) => {
                cut("panic");
                self.metrics().error(BotErrorKind::Panic);
                tracing::error!("bot: an update handler panicked");
                true
            }
            Err(_) => {
                cut("timeout");
                self.metrics().error(BotErrorKind::HandlerTimeout);
                tracing::error!(
                    bound_s = bound.as_secs_f64(),
                    "bot: an update handler timed out"
                );
                true
            }
        };
        self.inner.progress.ended(!cut_off);
        if cut_off {
            self.answer_cut_off(owed, started).await;
        }
        self.metrics().in_flight.dec();
    }

    /// The honest answer after a handler was cut off or panicked (best effort, each call
    /// bounded by the request timeout). A payment is looked up first: recorded before this
    /// update was handled means a duplicate update (answered the first time: silence);
    /// recorded by this handler means credited (the key follows with `/key`); not recorded
    /// means Telegram has the money and we do not: logged with its charge id for support,
    /// counted failed, and the user told not to pay again.
    async fn answer_cut_off(&self, owed: Owed, started: Instant) {
        let api = &self.inner.api;
        let res = match owed {
            Owed::Nothing => return,
            Owed::Chat { chat, lang } => api
                .send_text(chat, i18n::unavailable(lang), None)
                .await
                .map(drop),
            Owed::PreCheckout { id, lang } => {
                use teloxide::payloads::AnswerPreCheckoutQuerySetters;
                api.call("answerPreCheckoutQuery", || {
                    api.bot
                        .answer_pre_checkout_query(id.clone(), false)
                        .error_message(i18n::precheckout_unavailable(lang))
                        .into_future()
                })
                .await
                .map(drop)
            }
            Owed::Payment {
                chat,
                lang,
                telegram_charge_id,
                amount,
            } => {
                let recorded = self.payment_recorded(&telegram_charge_id, started).await;
                let text = match recorded {
                    Some(PaymentSeen::Before) => {
                        tracing::info!(
                            "cut-off handler of a repeated successful_payment: not answered again"
                        );
                        return;
                    }
                    Some(PaymentSeen::ByThisHandler) => i18n::payment_credited_key_later(lang),
                    None => {
                        self.metrics().payment(PaymentOutcome::Failed);
                        tracing::error!(
                            user_id = chat,
                            amount,
                            telegram_charge_id = %telegram_charge_id,
                            "payment handler cut off before the payment was recorded: credit it manually"
                        );
                        i18n::payment_delayed(lang)
                    }
                };
                api.send_text(chat, text, None).await.map(drop)
            }
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not answer after a cut-off handler");
        }
    }

    /// Whether the charge is recorded, and whether before the handler `started` (compared on
    /// the database's clock, with a second of margin: a repeated update comes much later).
    /// `None`: not recorded, or unknown within 2 s.
    async fn payment_recorded(
        &self,
        telegram_charge_id: &str,
        started: Instant,
    ) -> Option<PaymentSeen> {
        let look = async {
            let mut c = self.inner.pool.acquire("bot_cut_off_payment").await?;
            let ran = started.elapsed() + Duration::from_secs(1);
            let r: Result<Option<bool>, sqlx::Error> = sqlx::query_scalar(
                "SELECT now() - created_at > make_interval(secs => $2) FROM payments \
                 WHERE telegram_charge_id = $1 ORDER BY created_at LIMIT 1",
            )
            .bind(telegram_charge_id)
            .bind(ran.as_secs_f64())
            .fetch_optional(&mut *c)
            .await;
            c.check(r)
        };
        match tokio::time::timeout(Duration::from_secs(2), look).await {
            Ok(Ok(Some(true))) => Some(PaymentSeen::Before),
            Ok(Ok(Some(false))) => Some(PaymentSeen::ByThisHandler),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not look up a cut-off payment");
                None
            }
            Err(_) => None,
        }
    }
}

/// When a cut-off handler's payment was recorded.
#[derive(Debug, Clone, Copy)]
enum PaymentSeen {
    /// Before this update was handled: a repeated update.
    Before,
    /// While this handler ran.
    ByThisHandler,
}

/// Who is owed an answer when an update's handler is cut off, taken before it runs.
#[derive(Debug)]
enum Owed {
    /// Nobody (groups, channels, bots, ignored kinds).
    Nothing,
    /// A private chat (a message or a button press): "try again in a minute".
    Chat { chat: i64, lang: i18n::Lang },
    /// A pre-checkout query: refused with "try again later" (nothing was charged).
    PreCheckout {
        id: teloxide::types::PreCheckoutQueryId,
        lang: i18n::Lang,
    },
    /// A successful payment: depends on what was recorded.
    Payment {
        chat: i64,
        lang: i18n::Lang,
        telegram_charge_id: String,
        amount: u32,
    },
}

impl Owed {
    fn of(u: &Update) -> Owed {
        let lang =
            |user: &teloxide::types::User| i18n::Lang::from_code(user.language_code.as_deref());
        match &u.kind {
            UpdateKind::Message(m) => {
                let Some(from) = m.from.as_ref().filter(|f| !f.is_bot) else {
                    return Owed::Nothing;
                };
                let id = from.id.0 as i64;
                if let Some(p) = m.successful_payment() {
                    return Owed::Payment {
                        chat: id,
                        lang: lang(from),
                        telegram_charge_id: p.telegram_payment_charge_id.0.clone(),
                        amount: p.total_amount,
                    };
                }
                if m.chat.is_private() && m.chat.id.0 == id {
                    Owed::Chat {
                        chat: id,
                        lang: lang(from),
                    }
                } else {
                    Owed::Nothing
                }
            }
            UpdateKind::CallbackQuery(q) if !q.from.is_bot => Owed::Chat {
                chat: q.from.id.0 as i64,
                lang: lang(&q.from),
            },
            UpdateKind::PreCheckoutQuery(q) => Owed::PreCheckout {
                id: q.id.clone(),
                lang: lang(&q.from),
            },
            _ => Owed::Nothing,
        }
    }
}

/// Pre-checkout queries (Telegram cancels the payment unless answered within 10 s) and
/// successful payments: handled on slots of their own.
fn is_time_critical(u: &Update) -> bool {
    match &u.kind {
        UpdateKind::PreCheckoutQuery(_) => true,
        UpdateKind::Message(m) => m.successful_payment().is_some(),
        _ => false,
    }
}

/// An update fetched and waiting for a slot, with when it was fetched.
#[derive(Debug)]
struct Queued {
    update: Update,
    received: Instant,
}

/// One lane of the receive loop: a bounded queue drained by a dispatcher task onto the lane's
/// own handler slots.
struct Lane {
    name: &'static str,
    tx: mpsc::Sender<Queued>,
    depth: prometheus::IntGauge,
    dispatcher: tokio::task::JoinHandle<()>,
}

impl Lane {
    fn start(
        bot: &BotService,
        name: &'static str,
        slots: usize,
        capacity: usize,
        handlers: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Lane {
        let (tx, mut rx) = mpsc::channel::<Queued>(capacity);
        let depth = bot.metrics().queue_depth.with_label_values(&[name]);
        depth.set(0);
        let sem = Arc::new(Semaphore::new(slots));
        let spawner = bot.clone();
        let (bot, handlers, cancel, d) =
            (bot.clone(), handlers.clone(), cancel.clone(), depth.clone());
        let dispatcher = spawner
            .inner
            .tasks
            .spawn_named("bot_dispatcher", async move {
                loop {
                    let permit = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        p = sem.clone().acquire_owned() => p.expect("semaphore never closed"),
                    };
                    let q = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        q = rx.recv() => match q {
                            Some(q) => q,
                            None => break,
                        },
                    };
                    d.dec();
                    bot.inner.progress.dequeued(q.received);
                    bot.spawn_handler(&handlers, q, Some(permit));
                }
                // Shutdown: what is queued was confirmed to Telegram; start it now, slot or not,
                // under the loop's bounded drain.
                rx.close();
                while let Ok(q) = rx.try_recv() {
                    d.dec();
                    bot.inner.progress.dequeued(q.received);
                    bot.spawn_handler(&handlers, q, None);
                }
            });
        Lane {
            name,
            tx,
            depth,
            dispatcher,
        }
    }

    /// Queues `q`, waiting for room when the queue is full (the loop then does not poll: the
    /// wait is the `handler_slot` phase and counts in the back-pressure metric). `false` when
    /// cancelled first (`q` is dropped, not confirmed).
    async fn push(
        &self,
        q: Queued,
        cancel: &CancellationToken,
        op: &PollingOperation,
        bound: Duration,
        metrics: &BotMetrics,
        progress: &service_watch::ServiceProgress,
    ) -> bool {
        self.depth.inc();
        let received = q.received;
        progress.queued(received);
        let q = match self.tx.try_send(q) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.depth.dec();
                progress.dequeued(received);
                return false;
            }
            Err(mpsc::error::TrySendError::Full(q)) => q,
        };
        op.enter(PollPhase::HandlerSlot, bound);
        tracing::debug!(lane = self.name, "bot: update queue full; polling paused");
        let waited = Instant::now();
        let sent = tokio::select! {
            _ = cancel.cancelled() => false,
            r = self.tx.send(q) => r.is_ok(),
        };
        metrics.backpressure.inc_by(waited.elapsed().as_secs_f64());
        if !sent {
            self.depth.dec();
            progress.dequeued(received);
        }
        sent
    }

    /// Waits for the dispatcher, which starts what is still queued once cancelled.
    async fn finish(self) {
        drop(self.tx);
        let _ = self.dispatcher.await;
    }
}

impl BotService {
    fn spawn_handler(
        &self,
        handlers: &TaskTracker,
        q: Queued,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let bot = self.clone();
        // Tracked twice: by the loop's own tracker (its bounded drain) and by the app's tasks.
        let fut = handlers.track_future(async move {
            // Claimed, handled, pre-checkout answer time observed, marked handled.
            bot.handle_once(q.update, q.received).await;
            drop(permit);
        });
        self.inner.tasks.spawn_named("bot_handler", fut);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
