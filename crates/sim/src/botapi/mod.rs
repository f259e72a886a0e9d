//! Bot API stand-in: a local HTTP server that speaks the real Telegram Bot API JSON for the
//! methods the bot uses, so the bot can be tested over real loopback HTTP with its real
//! client (teloxide).
//!
//! - Requests go to `POST /bot{TOKEN}/{method}` with a JSON or `multipart/form-data` body, as
//!   Telegram accepts them. Answers are `{"ok":true,"result":...}` or
//!   `{"ok":false,"error_code":...,"description":...,"parameters":{...}}`.
//! - `getUpdates` follows Telegram's `offset` (confirms and drops every earlier update),
//!   `limit` and `timeout` (long poll) semantics. When a second `getUpdates` arrives while one
//!   is waiting, the older one is ended with `409 Conflict` as Telegram does.
//! - Tests and the demo inject updates as simulated users ([`SimUser`]) and read what the bot
//!   sent ([`SentMessage`]), in process through [`BotApiSimHandle`] or over HTTP:
//!   `POST /_sim/updates` (an update object without `update_id`), `GET /_sim/sent`,
//!   `PUT /_sim/faults/getUpdates` (`none`, `hang`, `rate_limited:SECS:TIMES`,
//!   `conflict:TIMES`).
//! - Telegram Stars: `successful_payment` messages register their charge; `refundStarPayment`
//!   refunds a registered charge once (`CHARGE_NOT_FOUND`, `CHARGE_ALREADY_REFUNDED` otherwise)
//!   and, like Telegram, posts the `refunded_payment` service message into the payer's chat
//!   ([`BotApiSimHandle::set_refund_echo`] turns that off); [`BotApiSimHandle::refunded_payment`]
//!   injects a refund made elsewhere (the user through Telegram support).
//! - A revoked token: [`BotApiSimHandle::revoke_token`] answers every request `401`.
//! - Faults of FAULTS.md: T1 `getUpdates` never returns ([`UpdatesFault::Hang`]), T2 `429`
//!   with `retry_after` on receive ([`UpdatesFault::RateLimited`]) and on send
//!   ([`BotApiSimHandle::set_send_rate_limit`]), T3 `409 Conflict` ([`UpdatesFault::Conflict`]).
//! - Webhooks ([`push`]): `setWebhook`, `deleteWebhook` and `getWebhookInfo` are recorded
//!   (`getUpdates` answers `409` while a webhook is set), and a push mode POSTs updates to
//!   webhook URLs round-robin with the secret header, retrying what is not acknowledged
//!   ([`BotApiSimHandle::start_push`], [`BotApiSimHandle::redeliver_acknowledged`]).
//! - Message faults (`sendMessage`, `sendPhoto`, `sendInvoice` only; answers to queries are
//!   not affected): slow sends ([`BotApiSimHandle::set_message_delay`]), `429 retry_after`
//!   ([`BotApiSimHandle::set_message_rate_limit`]), `403` from a user who blocked the bot
//!   ([`BotApiSimHandle::block_chat`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub mod push;
pub use push::{PushOptions, PushStats, WebhookSet};

/// Telegram's description of a `409` on `getUpdates` while a webhook is set.
pub const WEBHOOK_ACTIVE_DESCRIPTION: &str =
    "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first";

/// Telegram's description of a `409` on `getUpdates` (teloxide maps it to
/// `ApiError::TerminatedByOtherGetUpdates`).
pub const CONFLICT_DESCRIPTION: &str = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running";

/// How `getUpdates` misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpdatesFault {
    /// Serve faithfully.
    #[default]
    None,
    /// T1: accept the request and never answer (the socket stays open).
    Hang,
    /// T2: answer `429 Too Many Requests` with `retry_after` seconds, `times` times, then clear.
    RateLimited {
        /// Seconds in `parameters.retry_after`.
        retry_after: u32,
        /// How many requests get the 429.
        times: u32,
    },
    /// T3: answer `409 Conflict` (another instance polls the token), `times` times, then clear.
    Conflict {
        /// How many requests get the 409.
        times: u32,
    },
}

impl std::str::FromStr for UpdatesFault {
    type Err = String;
    /// `none`, `hang`, `rate_limited:SECS:TIMES`, `conflict:TIMES`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let num = |i: usize| -> Result<u32, String> {
            parts
                .get(i)
                .ok_or_else(|| format!("{s}: missing argument"))?
                .parse()
                .map_err(|e| format!("{s}: {e}"))
        };
        match parts[0] {
            "none" => Ok(UpdatesFault::None),
            "hang" => Ok(UpdatesFault::Hang),
            "rate_limited" => Ok(UpdatesFault::RateLimited {
                retry_after: num(1)?,
                times: num(2)?,
            }),
            "conflict" => Ok(UpdatesFault::Conflict { times: num(1)? }),
            _ => Err(format!(
                "unknown fault {s:?} (none, hang, rate_limited:SECS:TIMES, conflict:TIMES)"
            )),
        }
    }
}

/// One request the bot sent that produces or changes a message, or answers a query.
#[derive(Debug, Clone)]
pub struct SentMessage {
    /// Bot API method, e.g. `sendMessage`.
    pub method: String,
    /// Target chat (0 for answers to queries).
    pub chat_id: i64,
    /// Message id the stand-in assigned (or the edited message's id).
    pub message_id: i64,
    /// `text`, or `caption` of a photo, or the invoice description.
    pub text: String,
    /// The `reply_markup` object, if any.
    pub reply_markup: Option<Value>,
    /// Bytes of an uploaded photo.
    pub photo: Option<Vec<u8>>,
    /// Every parameter as received (files left out).
    pub params: Value,
}

impl SentMessage {
    /// `callback_data` of every inline button.
    pub fn buttons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(rows) = self
            .reply_markup
            .as_ref()
            .and_then(|m| m.get("inline_keyboard"))
            .and_then(Value::as_array)
        {
            for row in rows {
                for b in row.as_array().into_iter().flatten() {
                    if let Some(d) = b.get("callback_data").and_then(Value::as_str) {
                        out.push(d.to_string());
                    }
                }
            }
        }
        out
    }
}

/// An answer the bot gave to a pre-checkout or callback query.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryAnswer {
    /// `answerPreCheckoutQuery` or `answerCallbackQuery`.
    pub method: String,
    /// The query id.
    pub query_id: String,
    /// `ok` of a pre-checkout answer (true for callback answers).
    pub ok: bool,
    /// `error_message` or `text`, if any.
    pub text: Option<String>,
}

/// A simulated Telegram user in a private chat with the bot.
#[derive(Debug, Clone)]
pub struct SimUser {
    /// User id (equal to the private chat id).
    pub id: i64,
    /// `language_code`, e.g. `en` or `ru`.
    pub language: String,
    /// First name.
    pub first_name: String,
}

impl SimUser {
    /// A user with `id` and `language`.
    pub fn new(id: i64, language: &str) -> Self {
        Self {
            id,
            language: language.to_string(),
            first_name: format!("User{id}"),
        }
    }

    /// The Bot API `User` object.
    pub fn user_json(&self) -> Value {
        json!({"id": self.id, "is_bot": false, "first_name": self.first_name,
               "language_code": self.language})
    }

    /// The Bot API `Chat` object of the private chat.
    pub fn chat_json(&self) -> Value {
        json!({"id": self.id, "type": "private", "first_name": self.first_name})
    }
}

#[derive(Debug, Default)]
struct SimState {
    next_update_id: i64,
    updates: VecDeque<(i64, Value)>,
    next_message_id: i64,
    sent: Vec<SentMessage>,
    answers: Vec<QueryAnswer>,
    commands: Option<Value>,
    updates_fault: UpdatesFault,
    send_rate_limit: Option<(u32, u32)>,
    message_delay: Option<Duration>,
    message_rate_limit: Option<(u32, u32)>,
    blocked_chats: std::collections::BTreeSet<i64>,
    message_attempts: BTreeMap<i64, u64>,
    messages_in_flight: u32,
    max_messages_in_flight: u32,
    requests: BTreeMap<String, u64>,
    last_offset: Option<i64>,
    poll_generation: u64,
    polls_in_flight: u32,
    max_polls_in_flight: u32,
    conflicts: u64,
    next_query_id: u64,
    charges: BTreeMap<String, StarCharge>,
    star_refunds: Vec<(i64, String)>,
    no_refund_echo: bool,
    token_revoked: bool,
    webhook: Option<WebhookSet>,
    webhook_calls: Vec<(String, Option<WebhookSet>)>,
    push_active: bool,
    push: push::PushState,
}

/// A Telegram Stars charge the stand-in reported as paid.
#[derive(Debug, Clone)]
struct StarCharge {
    user: SimUser,
    payload: String,
    currency: String,
    amount: u32,
    refunded: bool,
}

#[derive(Debug)]
struct Shared {
    token: String,
    state: Mutex<SimState>,
    updates_notify: Notify,
    started: Instant,
    callback_counter: AtomicU64,
}

impl Shared {
    fn inject(&self, mut update: Value) -> i64 {
        let id = {
            let mut st = self.state();
            let id = st.next_update_id;
            st.next_update_id += 1;
            update["update_id"] = json!(id);
            st.updates.push_back((id, update));
            id
        };
        self.updates_notify.notify_waiters();
        id
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Options of the stand-in.
#[derive(Debug, Clone)]
pub struct BotApiSimOptions {
    /// The token the stand-in accepts (others get `401 Unauthorized`). Default
    /// `123456:sim-token`.
    pub token: String,
    /// `getUpdates` fault active from the start.
    pub updates_fault: UpdatesFault,
}

impl Default for BotApiSimOptions {
    fn default() -> Self {
        Self {
            token: "123456:sim-token".into(),
            updates_fault: UpdatesFault::None,
        }
    }
}

/// The stand-in server.
#[derive(Debug)]
pub struct BotApiSim;

impl BotApiSim {
    /// Serves on `listener` (bind port 0 in tests) until the handle is dropped or
    /// [`BotApiSimHandle::shutdown`] runs.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(listener: TcpListener, opts: BotApiSimOptions) -> BotApiSimHandle {
        let addr = listener.local_addr().expect("bound listener");
        let shared = Arc::new(Shared {
            token: opts.token,
            state: Mutex::new(SimState {
                next_update_id: 1,
                next_message_id: 1,
                updates_fault: opts.updates_fault,
                ..Default::default()
            }),
            updates_notify: Notify::new(),
            started: Instant::now(),
            callback_counter: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let app = Router::new()
            .route("/_sim/updates", post(sim_inject))
            .route("/_sim/sent", get(sim_sent))
            .route("/_sim/faults/getUpdates", put(sim_fault))
            .route("/{bot}/{method}", post(api).get(api))
            .with_state(AppState {
                shared: shared.clone(),
                cancel: cancel.clone(),
            });
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(c.cancelled_owned())
                .await;
        });
        BotApiSimHandle {
            addr,
            shared,
            cancel,
        }
    }
}

#[derive(Debug, Clone)]
struct AppState {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

/// Controls a running stand-in; dropping it stops the server.
#[derive(Debug)]
pub struct BotApiSimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Drop for BotApiSimHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl BotApiSimHandle {
    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL to give the bot (`telegram.api_url`).
    pub fn api_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The token the stand-in accepts.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Stops the server (a hanging long poll is dropped).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Queues a raw update object (without `update_id`); returns its id.
    pub fn inject(&self, update: Value) -> i64 {
        self.shared.inject(update)
    }

    fn now(&self) -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn next_msg_id(&self) -> i64 {
        let mut st = self.shared.state();
        let id = st.next_message_id;
        st.next_message_id += 1;
        id
    }

    /// A `Message` object from `user` in its private chat, with `extra` fields merged in.
    pub fn user_message(&self, user: &SimUser, extra: Value) -> Value {
        let mut m = json!({
            "message_id": self.next_msg_id(),
            "date": self.now(),
            "chat": user.chat_json(),
            "from": user.user_json(),
        });
        if let (Some(m), Value::Object(e)) = (m.as_object_mut(), extra) {
            m.extend(e);
        }
        m
    }

    /// `user` sends `text` (a leading `/command` gets its `bot_command` entity).
    pub fn send_text(&self, user: &SimUser, text: &str) -> i64 {
        let mut extra = json!({ "text": text });
        if text.starts_with('/') {
            let len = text
                .split_whitespace()
                .next()
                .map(|c| c.encode_utf16().count())
                .unwrap_or(1);
            extra["entities"] = json!([{"type": "bot_command", "offset": 0, "length": len}]);
        }
        let msg = self.user_message(user, extra);
        self.inject(json!({ "message": msg }))
    }

    /// `user` presses an inline button with `data` under the bot's message `message_id`.
    /// Returns the callback query id.
    pub fn press(&self, user: &SimUser, message_id: i64, data: &str) -> String {
        let qid = format!(
            "cb{}",
            self.shared.callback_counter.fetch_add(1, Ordering::Relaxed)
        );
        let msg = json!({
            "message_id": message_id, "date": self.now(), "chat": user.chat_json(),
            "from": bot_user(), "text": "menu",
        });
        self.inject(json!({"callback_query": {
            "id": qid, "from": user.user_json(), "message": msg,
            "chat_instance": format!("ci{}", user.id), "data": data,
        }}));
        qid
    }

    /// `user` confirms an invoice: a `pre_checkout_query`. Returns the query id.
    pub fn pre_checkout(
        &self,
        user: &SimUser,
        payload: &str,
        currency: &str,
        amount: u32,
    ) -> String {
        let qid = {
            let mut st = self.shared.state();
            st.next_query_id += 1;
            format!("pcq{}", st.next_query_id)
        };
        self.inject(json!({"pre_checkout_query": {
            "id": qid, "from": user.user_json(), "currency": currency,
            "total_amount": amount, "invoice_payload": payload,
        }}));
        qid
    }

    /// Telegram reports a completed payment: a message with `successful_payment` (Telegram
    /// Stars: the provider's charge id is empty).
    pub fn successful_payment(
        &self,
        user: &SimUser,
        payload: &str,
        currency: &str,
        amount: u32,
        charge_id: &str,
    ) -> i64 {
        self.successful_payment_ids(user, payload, currency, amount, charge_id, "")
    }

    /// [`Self::successful_payment`] with both charge ids: Telegram's (`charge_id`) and the
    /// provider's. The charge becomes refundable with `refundStarPayment`.
    pub fn successful_payment_ids(
        &self,
        user: &SimUser,
        payload: &str,
        currency: &str,
        amount: u32,
        charge_id: &str,
        provider_charge_id: &str,
    ) -> i64 {
        self.shared
            .state()
            .charges
            .entry(charge_id.to_string())
            .or_insert_with(|| StarCharge {
                user: user.clone(),
                payload: payload.to_string(),
                currency: currency.to_string(),
                amount,
                refunded: false,
            });
        let msg = self.user_message(
            user,
            json!({"successful_payment": {
                "currency": currency, "total_amount": amount, "invoice_payload": payload,
                "telegram_payment_charge_id": charge_id,
                "provider_payment_charge_id": provider_charge_id,
            }}),
        );
        self.inject(json!({ "message": msg }))
    }

    /// Telegram reports a refund (a `refunded_payment` service message in the payer's chat),
    /// e.g. one the user obtained through Telegram support.
    pub fn refunded_payment(
        &self,
        user: &SimUser,
        payload: &str,
        currency: &str,
        amount: u32,
        charge_id: &str,
    ) -> i64 {
        if let Some(c) = self.shared.state().charges.get_mut(charge_id) {
            c.refunded = true;
        }
        let msg = self.user_message(
            user,
            refunded_payment_json(payload, currency, amount, charge_id),
        );
        self.inject(json!({ "message": msg }))
    }

    /// Whether a `refundStarPayment` also posts the `refunded_payment` message (default on).
    pub fn set_refund_echo(&self, on: bool) {
        self.shared.state().no_refund_echo = !on;
    }

    /// `(user id, charge id)` of every `refundStarPayment` that succeeded, in order.
    pub fn star_refunds(&self) -> Vec<(i64, String)> {
        self.shared.state().star_refunds.clone()
    }

    /// Revokes the token: every request, `getUpdates` included, gets `401 Unauthorized`.
    pub fn revoke_token(&self) {
        self.shared.state().token_revoked = true;
        self.shared.updates_notify.notify_waiters();
    }

    /// Everything sent so far, in order.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.shared.state().sent.clone()
    }

    /// Messages sent to `chat_id`, in order.
    pub fn sent_to(&self, chat_id: i64) -> Vec<SentMessage> {
        self.shared
            .state()
            .sent
            .iter()
            .filter(|m| m.chat_id == chat_id)
            .cloned()
            .collect()
    }

    /// Waits up to `limit` for a message to `chat_id`, sent at or after index `from` of that
    /// chat's messages, that satisfies `pred`.
    pub async fn wait_for(
        &self,
        chat_id: i64,
        from: usize,
        limit: Duration,
        pred: impl Fn(&SentMessage) -> bool,
    ) -> Option<SentMessage> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(m) = self.sent_to(chat_id).into_iter().skip(from).find(&pred) {
                return Some(m);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Answers given to pre-checkout and callback queries.
    pub fn answers(&self) -> Vec<QueryAnswer> {
        self.shared.state().answers.clone()
    }

    /// Waits up to `limit` for the answer to query `query_id`.
    pub async fn wait_answer(&self, query_id: &str, limit: Duration) -> Option<QueryAnswer> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(a) = self.answers().into_iter().find(|a| a.query_id == query_id) {
                return Some(a);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The commands last set with `setMyCommands`.
    pub fn commands(&self) -> Option<Value> {
        self.shared.state().commands.clone()
    }

    /// Sets the `getUpdates` fault.
    pub fn set_updates_fault(&self, fault: UpdatesFault) {
        self.shared.state().updates_fault = fault;
        // Wake waiting polls so a new fault applies to the next request promptly.
        self.shared.updates_notify.notify_waiters();
    }

    /// T2 on send: the next `times` send/answer/edit requests get `429` with `retry_after`.
    pub fn set_send_rate_limit(&self, retry_after: u32, times: u32) {
        self.shared.state().send_rate_limit = Some((retry_after, times));
    }

    /// Every later `sendMessage`, `sendPhoto` and `sendInvoice` is answered only after
    /// `delay` (`None`: at once). Answers to queries are not delayed.
    pub fn set_message_delay(&self, delay: Option<Duration>) {
        self.shared.state().message_delay = delay;
    }

    /// The next `times` `sendMessage`, `sendPhoto` and `sendInvoice` requests get `429` with
    /// `retry_after` (answers to queries are not limited).
    pub fn set_message_rate_limit(&self, retry_after: u32, times: u32) {
        self.shared.state().message_rate_limit = Some((retry_after, times));
    }

    /// The user of private chat `chat_id` blocked the bot: messages to it get `403 Forbidden`.
    pub fn block_chat(&self, chat_id: i64) {
        self.shared.state().blocked_chats.insert(chat_id);
    }

    /// Message requests (`sendMessage`, `sendPhoto`, `sendInvoice`) received for `chat_id`,
    /// whatever their outcome (faults included).
    pub fn message_attempts(&self, chat_id: i64) -> u64 {
        self.shared
            .state()
            .message_attempts
            .get(&chat_id)
            .copied()
            .unwrap_or(0)
    }

    /// Most delayed message requests that were in flight at once (see
    /// [`Self::set_message_delay`]).
    pub fn max_concurrent_messages(&self) -> u32 {
        self.shared.state().max_messages_in_flight
    }

    /// Requests received for `method` (any outcome).
    pub fn requests(&self, method: &str) -> u64 {
        self.shared
            .state()
            .requests
            .get(method)
            .copied()
            .unwrap_or(0)
    }

    /// The `offset` of the latest `getUpdates`.
    pub fn last_offset(&self) -> Option<i64> {
        self.shared.state().last_offset
    }

    /// Updates queued and not yet confirmed by an `offset`.
    pub fn unconfirmed(&self) -> usize {
        self.shared.state().updates.len()
    }

    /// Most `getUpdates` requests that were open at once.
    pub fn max_concurrent_polls(&self) -> u32 {
        self.shared.state().max_polls_in_flight
    }

    /// `409` answers given because two pollers overlapped (faults not counted).
    pub fn conflicts(&self) -> u64 {
        self.shared.state().conflicts
    }

    /// The webhook set now (`None`: polling).
    pub fn webhook(&self) -> Option<WebhookSet> {
        self.shared.state().webhook.clone()
    }

    /// Every `setWebhook` (with what it set) and `deleteWebhook` (with `None`), in order.
    pub fn webhook_calls(&self) -> Vec<(String, Option<WebhookSet>)> {
        self.shared.state().webhook_calls.clone()
    }

    /// Starts pushing queued (and later injected) updates to `opts.urls` as Telegram does to a
    /// webhook (see [`push`]); runs until the stand-in stops.
    pub fn start_push(&self, opts: PushOptions) {
        push::start(self.shared.clone(), opts, self.cancel.clone());
        self.shared.updates_notify.notify_waiters();
    }

    /// Counters of the push mode.
    pub fn push_stats(&self) -> PushStats {
        self.shared.state().push.stats.clone()
    }

    /// How many times each update id was acknowledged (2xx) by a webhook.
    pub fn acknowledged(&self) -> BTreeMap<i64, u32> {
        self.shared.state().push.acked.clone()
    }

    /// Puts `n` already acknowledged updates (every k-th of those acknowledged so far, spread
    /// over them) back at the head of the queue, as a Telegram retry of a delivered update;
    /// returns their ids.
    pub fn redeliver_acknowledged(&self, n: usize) -> Vec<i64> {
        let mut st = self.shared.state();
        let acked = st.push.acked_updates.clone();
        if acked.is_empty() || n == 0 {
            return Vec::new();
        }
        let step = (acked.len() / n).max(1);
        let picked: Vec<(i64, Value)> = acked.into_iter().step_by(step).take(n).collect();
        for (id, u) in picked.iter().rev() {
            st.updates.push_front((*id, u.clone()));
        }
        st.push.stats.redelivered += picked.len() as u64;
        drop(st);
        self.shared.updates_notify.notify_waiters();
        picked.into_iter().map(|(id, _)| id).collect()
    }

    /// Updates queued and not yet delivered (push mode) or confirmed (polling).
    pub fn queued(&self) -> usize {
        self.shared.state().updates.len()
    }

    /// Seconds since the stand-in started.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }
}

fn refunded_payment_json(payload: &str, currency: &str, amount: u32, charge_id: &str) -> Value {
    json!({"refunded_payment": {
        "currency": currency, "total_amount": amount, "invoice_payload": payload,
        "telegram_payment_charge_id": charge_id,
    }})
}

fn bot_user() -> Value {
    json!({"id": 123456, "is_bot": true, "first_name": "VPN bot", "username": "vpnsim_bot"})
}

fn ok(result: Value) -> Response {
    Json(json!({"ok": true, "result": result})).into_response()
}

fn err(code: u16, description: &str, parameters: Option<Value>) -> Response {
    let mut body = json!({"ok": false, "error_code": code, "description": description});
    if let Some(p) = parameters {
        body["parameters"] = p;
    }
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        Json(body),
    )
        .into_response()
}

/// Parameters and uploaded files of one request.
#[derive(Debug, Default)]
struct Params {
    fields: Map<String, Value>,
    files: BTreeMap<String, Vec<u8>>,
}

impl Params {
    fn i64(&self, k: &str) -> Option<i64> {
        match self.fields.get(k)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
    fn str(&self, k: &str) -> Option<String> {
        match self.fields.get(k)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            v => Some(v.to_string()),
        }
    }
    fn bool(&self, k: &str) -> Option<bool> {
        match self.fields.get(k)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
    fn object(&self, k: &str) -> Option<Value> {
        match self.fields.get(k)? {
            Value::String(s) => serde_json::from_str(s).ok(),
            Value::Null => None,
            v => Some(v.clone()),
        }
    }
    fn file(&self, k: &str) -> Option<Vec<u8>> {
        if let Some(name) = self
            .str(k)
            .and_then(|v| v.strip_prefix("attach://").map(String::from))
        {
            return self.files.get(&name).cloned();
        }
        self.files.get(k).cloned()
    }
}

async fn parse_params(req: Request) -> Result<Params, String> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut p = Params::default();
    if ctype.starts_with("multipart/form-data") {
        let mut mp = axum::extract::Multipart::from_request(req, &())
            .await
            .map_err(|e| e.to_string())?;
        while let Some(field) = mp.next_field().await.map_err(|e| e.to_string())? {
            let name = field.name().unwrap_or("").to_string();
            let is_file = field.file_name().is_some();
            let data = field.bytes().await.map_err(|e| e.to_string())?;
            if is_file {
                p.files.insert(name, data.to_vec());
            } else {
                let s = String::from_utf8_lossy(&data).to_string();
                p.fields.insert(name, Value::String(s));
            }
        }
    } else {
        let body: Bytes = axum::body::to_bytes(req.into_body(), 16 << 20)
            .await
            .map_err(|e| e.to_string())?;
        if !body.is_empty() {
            match serde_json::from_slice::<Value>(&body).map_err(|e| e.to_string())? {
                Value::Object(m) => p.fields = m,
                _ => return Err("body is not a JSON object".into()),
            }
        }
    }
    Ok(p)
}

async fn api(
    State(app): State<AppState>,
    Path((bot, method)): Path<(String, String)>,
    req: Request,
) -> Response {
    let sh = &app.shared;
    if bot.strip_prefix("bot") != Some(sh.token.as_str()) || sh.state().token_revoked {
        return err(401, "Unauthorized", None);
    }
    // Telegram matches method names case-insensitively (teloxide sends `SendMessage`).
    let Some(method) = canonical_method(&method) else {
        return err(404, "Not Found: method not found", None);
    };
    let method = method.to_string();
    *sh.state().requests.entry(method.clone()).or_default() += 1;
    let params = match parse_params(req).await {
        Ok(p) => p,
        Err(e) => return err(400, &format!("Bad Request: {e}"), None),
    };
    match method.as_str() {
        "getMe" => {
            let mut me = bot_user();
            for k in [
                "can_join_groups",
                "can_read_all_group_messages",
                "supports_inline_queries",
                "has_main_web_app",
            ] {
                me[k] = json!(false);
            }
            ok(me)
        }
        "getUpdates" => {
            let active = {
                let st = sh.state();
                st.webhook.is_some() || st.push_active
            };
            if active {
                return err(409, WEBHOOK_ACTIVE_DESCRIPTION, None);
            }
            get_updates(&app, params).await
        }
        "setWebhook" => {
            let url = params.str("url").unwrap_or_default();
            let set = (!url.is_empty()).then(|| WebhookSet {
                url,
                secret_token: params.str("secret_token"),
                max_connections: params.i64("max_connections"),
                allowed_updates: params.object("allowed_updates"),
                drop_pending_updates: params.bool("drop_pending_updates"),
            });
            let mut st = sh.state();
            st.webhook_calls.push(("setWebhook".into(), set.clone()));
            st.webhook = set;
            ok(json!(true))
        }
        "getWebhookInfo" => {
            let st = sh.state();
            let mut info = json!({
                "url": st.webhook.as_ref().map_or("", |w| w.url.as_str()),
                "has_custom_certificate": false,
                "pending_update_count": st.updates.len(),
            });
            if let Some(w) = &st.webhook {
                if let Some(n) = w.max_connections {
                    info["max_connections"] = json!(n);
                }
                if let Some(a) = &w.allowed_updates {
                    info["allowed_updates"] = a.clone();
                }
            }
            ok(info)
        }
        "refundStarPayment" => {
            if let Some(r) = send_rate_limited(sh) {
                return r;
            }
            refund_star_payment(sh, &params)
        }
        "deleteWebhook" => {
            let mut st = sh.state();
            st.webhook_calls.push(("deleteWebhook".into(), None));
            st.webhook = None;
            ok(json!(true))
        }
        "setMyCommands"
        | "answerCallbackQuery"
        | "answerPreCheckoutQuery"
        | "sendMessage"
        | "sendPhoto"
        | "sendInvoice"
        | "editMessageText"
        | "deleteMessage"
        | "sendChatAction" => {
            if let Some(r) = send_rate_limited(sh) {
                return r;
            }
            if matches!(method.as_str(), "sendMessage" | "sendPhoto" | "sendInvoice") {
                if let Some(r) = message_fault(sh, &params).await {
                    return r;
                }
            }
            record(sh, &method, params)
        }
        _ => err(404, "Not Found: method not found", None),
    }
}

/// Methods the stand-in serves, in Telegram's spelling.
const METHODS: &[&str] = &[
    "getMe",
    "getUpdates",
    "setWebhook",
    "getWebhookInfo",
    "deleteWebhook",
    "setMyCommands",
    "answerCallbackQuery",
    "answerPreCheckoutQuery",
    "sendMessage",
    "sendPhoto",
    "sendInvoice",
    "editMessageText",
    "deleteMessage",
    "sendChatAction",
    "refundStarPayment",
];

fn canonical_method(m: &str) -> Option<&'static str> {
    METHODS.iter().copied().find(|c| c.eq_ignore_ascii_case(m))
}

fn send_rate_limited(sh: &Shared) -> Option<Response> {
    let mut st = sh.state();
    let (retry, times) = st.send_rate_limit?;
    st.send_rate_limit = if times > 1 {
        Some((retry, times - 1))
    } else {
        None
    };
    Some(err(
        429,
        &format!("Too Many Requests: retry after {retry}"),
        Some(json!({ "retry_after": retry })),
    ))
}

/// Message faults: the delay first (the request is in flight meanwhile), then `403` for a
/// blocked chat, then `429`.
async fn message_fault(sh: &Shared, p: &Params) -> Option<Response> {
    let chat = p.i64("chat_id").unwrap_or(0);
    let delay = {
        let mut st = sh.state();
        *st.message_attempts.entry(chat).or_default() += 1;
        st.message_delay
    };
    if let Some(d) = delay {
        {
            let mut st = sh.state();
            st.messages_in_flight += 1;
            st.max_messages_in_flight = st.max_messages_in_flight.max(st.messages_in_flight);
        }
        // Counted down however the request ends (the client may give up first).
        struct Done<'a>(&'a Shared);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                let mut st = self.0.state();
                st.messages_in_flight = st.messages_in_flight.saturating_sub(1);
            }
        }
        let _done = Done(sh);
        tokio::time::sleep(d).await;
    }
    let mut st = sh.state();
    if st.blocked_chats.contains(&chat) {
        return Some(err(403, "Forbidden: bot was blocked by the user", None));
    }
    let (retry, times) = st.message_rate_limit?;
    st.message_rate_limit = if times > 1 {
        Some((retry, times - 1))
    } else {
        None
    };
    Some(err(
        429,
        &format!("Too Many Requests: retry after {retry}"),
        Some(json!({ "retry_after": retry })),
    ))
}

fn record(sh: &Shared, method: &str, p: Params) -> Response {
    let now = chrono::Utc::now().timestamp();
    match method {
        "setMyCommands" => {
            sh.state().commands = p.object("commands");
            ok(json!(true))
        }
        "answerCallbackQuery" | "answerPreCheckoutQuery" => {
            let Some(query_id) = p
                .str("callback_query_id")
                .or_else(|| p.str("pre_checkout_query_id"))
            else {
                return err(400, "Bad Request: query id is empty", None);
            };
            let ok_flag = p.bool("ok").unwrap_or(true);
            let text = p.str("error_message").or_else(|| p.str("text"));
            if method == "answerPreCheckoutQuery" && !ok_flag && text.is_none() {
                return err(400, "Bad Request: error_message is required", None);
            }
            sh.state().answers.push(QueryAnswer {
                method: method.into(),
                query_id,
                ok: ok_flag,
                text,
            });
            ok(json!(true))
        }
        _ => {
            let Some(chat_id) = p.i64("chat_id") else {
                return err(400, "Bad Request: chat not found", None);
            };
            let reply_markup = p.object("reply_markup");
            let (text, photo) = match method {
                "sendPhoto" => {
                    let Some(photo) = p.file("photo") else {
                        return err(400, "Bad Request: there is no photo in the request", None);
                    };
                    (p.str("caption").unwrap_or_default(), Some(photo))
                }
                "sendInvoice" => (p.str("description").unwrap_or_default(), None),
                "sendChatAction" => return ok(json!(true)),
                _ => {
                    let t = p.str("text").unwrap_or_default();
                    if t.is_empty() && method != "deleteMessage" {
                        return err(400, "Bad Request: message text is empty", None);
                    }
                    if t.chars().count() > 4096 {
                        return err(400, "Bad Request: message is too long", None);
                    }
                    (t, None)
                }
            };
            let mut st = sh.state();
            let message_id = match method {
                "editMessageText" | "deleteMessage" => p.i64("message_id").unwrap_or(0),
                _ => {
                    let id = st.next_message_id;
                    st.next_message_id += 1;
                    id
                }
            };
            let mut msg = json!({
                "message_id": message_id, "date": now, "from": bot_user(),
                "chat": {"id": chat_id, "type": "private", "first_name": "User"},
            });
            match method {
                "sendPhoto" => {
                    let len = photo.as_ref().map_or(0, Vec::len);
                    msg["photo"] = json!([{"file_id": format!("photo{message_id}"),
                        "file_unique_id": format!("u{message_id}"), "width": 512,
                        "height": 512, "file_size": len}]);
                    msg["caption"] = json!(text);
                }
                "sendInvoice" => {
                    msg["invoice"] = json!({
                        "title": p.str("title").unwrap_or_default(),
                        "description": text,
                        "start_parameter": p.str("start_parameter").unwrap_or_default(),
                        "currency": p.str("currency").unwrap_or_default(),
                        "total_amount": p.object("prices")
                            .and_then(|v| v.as_array().map(|a| a.iter()
                                .filter_map(|x| x["amount"].as_i64()).sum::<i64>()))
                            .unwrap_or(0),
                    });
                }
                _ => msg["text"] = json!(text),
            }
            if let Some(m) = &reply_markup {
                msg["reply_markup"] = m.clone();
            }
            let mut fields = Value::Object(p.fields);
            if let Some(m) = &reply_markup {
                fields["reply_markup"] = m.clone();
            }
            st.sent.push(SentMessage {
                method: method.into(),
                chat_id,
                message_id,
                text,
                reply_markup,
                photo,
                params: fields,
            });
            if method == "deleteMessage" {
                return ok(json!(true));
            }
            ok(msg)
        }
    }
}

/// `refundStarPayment`: refunds a paid charge of that user once; like Telegram, posts the
/// `refunded_payment` service message into the payer's chat (unless turned off).
fn refund_star_payment(sh: &Shared, p: &Params) -> Response {
    let (Some(user_id), Some(charge)) = (p.i64("user_id"), p.str("telegram_payment_charge_id"))
    else {
        return err(
            400,
            "Bad Request: user_id and telegram_payment_charge_id are required",
            None,
        );
    };
    let echo = {
        let mut st = sh.state();
        let echo = !st.no_refund_echo;
        let Some(c) = st.charges.get_mut(&charge).filter(|c| c.user.id == user_id) else {
            return err(400, "Bad Request: CHARGE_NOT_FOUND", None);
        };
        if c.refunded {
            return err(400, "Bad Request: CHARGE_ALREADY_REFUNDED", None);
        }
        c.refunded = true;
        let c = c.clone();
        st.star_refunds.push((user_id, charge.clone()));
        echo.then_some(c)
    };
    if let Some(c) = echo {
        let message_id = {
            let mut st = sh.state();
            let id = st.next_message_id;
            st.next_message_id += 1;
            id
        };
        let mut msg = json!({
            "message_id": message_id,
            "date": chrono::Utc::now().timestamp(),
            "chat": c.user.chat_json(),
            "from": c.user.user_json(),
        });
        if let (Some(m), Value::Object(e)) = (
            msg.as_object_mut(),
            refunded_payment_json(&c.payload, &c.currency, c.amount, &charge),
        ) {
            m.extend(e);
        }
        sh.inject(json!({ "message": msg }));
    }
    ok(json!(true))
}

/// Ends the poll's registration on every exit path, including a dropped connection.
struct PollGuard<'a>(&'a Shared);

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.polls_in_flight = st.polls_in_flight.saturating_sub(1);
    }
}

async fn get_updates(app: &AppState, p: Params) -> Response {
    let sh = &app.shared;
    let offset = p.i64("offset");
    let limit = p.i64("limit").unwrap_or(100).clamp(1, 100) as usize;
    let timeout = Duration::from_secs(p.i64("timeout").unwrap_or(0).clamp(0, 3600) as u64);
    let my_generation = {
        let mut st = sh.state();
        st.last_offset = offset;
        let hang = match st.updates_fault {
            UpdatesFault::None => false,
            UpdatesFault::Hang => true,
            UpdatesFault::RateLimited { retry_after, times } => {
                st.updates_fault = if times > 1 {
                    UpdatesFault::RateLimited {
                        retry_after,
                        times: times - 1,
                    }
                } else {
                    UpdatesFault::None
                };
                return err(
                    429,
                    &format!("Too Many Requests: retry after {retry_after}"),
                    Some(json!({ "retry_after": retry_after })),
                );
            }
            UpdatesFault::Conflict { times } => {
                st.updates_fault = if times > 1 {
                    UpdatesFault::Conflict { times: times - 1 }
                } else {
                    UpdatesFault::None
                };
                return err(409, CONFLICT_DESCRIPTION, None);
            }
        };
        if hang {
            None
        } else {
            if let Some(off) = offset {
                // Telegram: an offset confirms every update with a smaller id.
                st.updates.retain(|(id, _)| *id >= off);
            }
            st.poll_generation += 1;
            st.polls_in_flight += 1;
            st.max_polls_in_flight = st.max_polls_in_flight.max(st.polls_in_flight);
            Some(st.poll_generation)
        }
    };
    let Some(my_generation) = my_generation else {
        // T1: never answer; the socket stays open until the stand-in stops.
        app.cancel.cancelled().await;
        return err(500, "Internal Server Error: shutting down", None);
    };
    // Wake an older waiting poll: it ends with 409.
    sh.updates_notify.notify_waiters();
    let _guard = PollGuard(sh);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = sh.updates_notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut st = sh.state();
            if st.poll_generation != my_generation {
                st.conflicts += 1;
                return err(409, CONFLICT_DESCRIPTION, None);
            }
            let batch: Vec<Value> = st
                .updates
                .iter()
                .filter(|(id, _)| offset.is_none_or(|o| *id >= o))
                .take(limit)
                .map(|(_, u)| u.clone())
                .collect();
            if !batch.is_empty() || tokio::time::Instant::now() >= deadline {
                return ok(Value::Array(batch));
            }
            if st.updates_fault != UpdatesFault::None {
                // A fault set while waiting applies from the next request.
                return ok(json!([]));
            }
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = app.cancel.cancelled() => return ok(json!([])),
        }
    }
}

async fn sim_inject(State(app): State<AppState>, Json(update): Json<Value>) -> Response {
    ok(json!(app.shared.inject(update)))
}

async fn sim_sent(State(app): State<AppState>) -> Response {
    let sent: Vec<Value> = app
        .shared
        .state()
        .sent
        .iter()
        .map(|m| {
            json!({"method": m.method, "chat_id": m.chat_id, "message_id": m.message_id,
                   "text": m.text, "reply_markup": m.reply_markup,
                   "photo_bytes": m.photo.as_ref().map(Vec::len)})
        })
        .collect();
    ok(Value::Array(sent))
}

async fn sim_fault(State(app): State<AppState>, body: String) -> Response {
    match body.parse::<UpdatesFault>() {
        Ok(f) => {
            app.shared.state().updates_fault = f;
            app.shared.updates_notify.notify_waiters();
            ok(json!(format!("{f:?}")))
        }
        Err(e) => err(400, &e, None),
    }
}

/// Options of `vpnbot-sim botapi`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimBotapiArgs {
    /// Address to listen on (loopback unless you mean otherwise).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Token the stand-in accepts.
    #[arg(long, default_value = "123456:sim-token")]
    pub token: String,
    /// `getUpdates` fault from the start: none, hang, rate_limited:SECS:TIMES, conflict:TIMES.
    #[arg(long, default_value = "none")]
    pub updates_fault: UpdatesFault,
}

/// Runs `vpnbot-sim botapi` until Ctrl-C.
///
/// # Errors
/// When the address cannot be bound.
pub async fn run(args: SimBotapiArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let sim = BotApiSim::start(
        listener,
        BotApiSimOptions {
            token: args.token,
            updates_fault: args.updates_fault,
        },
    );
    println!(
        "Bot API stand-in on {} (set telegram.api_url to it)",
        sim.api_url()
    );
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}
