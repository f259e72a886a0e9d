//! Update routing and the handlers. Every action works on the sender's own rows (the user id
//! comes from Telegram's `from`, never from callback data or payloads), so forged input can at
//! worst reach the sender's own data.

use std::future::IntoFuture;
use std::time::Instant;

use chrono::Utc;
use teloxide::payloads::{AnswerCallbackQuerySetters, AnswerPreCheckoutQuerySetters};
use teloxide::prelude::Requester;
use teloxide::types::{
    CallbackQuery, ChatId, InlineKeyboardButton, InlineKeyboardMarkup, LabeledPrice, Message,
    MessageKind, PreCheckoutQuery, RefundedPayment, SuccessfulPayment, TelegramTransactionId,
    Update, UpdateKind, User, UserId,
};
use tracing::Instrument;

use super::commands::{Callback, CallbackAction, Command};
use super::i18n::{self, Lang};
use super::keys;
use super::store::{
    self, CreditOutcome, PaymentIn, RefundIn, RefundOutcome, Subscription, TrialOutcome,
};
use super::{BotErrorKind, BotService, PaymentOutcome};
use crate::db::DbError;
use crate::node::{owned_email, NodeUser};
use crate::outbox::{complete, enqueue, NodeOp};

/// Currency of Telegram Stars.
const XTR: &str = "XTR";
/// Version prefix of invoice payloads: `v1:<plan id>`.
const PAYLOAD_PREFIX: &str = "v1:";

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandlerError {
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("Bot API: {0}")]
    Api(#[from] super::BotApiError),
}

type HResult = Result<(), HandlerError>;

/// Who an update comes from, in a private chat.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    pub(crate) user: i64,
    pub(crate) chat: i64,
    pub(crate) lang: Lang,
}

impl Ctx {
    fn of(user: &User) -> Ctx {
        let id = user.id.0 as i64;
        Ctx {
            user: id,
            chat: id,
            lang: Lang::from_code(user.language_code.as_deref()),
        }
    }
}

fn update_kind(u: &Update) -> &'static str {
    match &u.kind {
        UpdateKind::Message(m) if m.successful_payment().is_some() => "successful_payment",
        UpdateKind::Message(m) if refunded_payment(m).is_some() => "refunded_payment",
        UpdateKind::Message(m) if !m.chat.is_private() => "group_message",
        UpdateKind::Message(_) => "message",
        UpdateKind::EditedMessage(_) => "edited_message",
        UpdateKind::CallbackQuery(_) => "callback_query",
        UpdateKind::PreCheckoutQuery(_) => "pre_checkout_query",
        UpdateKind::ChannelPost(_) | UpdateKind::EditedChannelPost(_) => "channel_post",
        UpdateKind::MyChatMember(_) => "my_chat_member",
        UpdateKind::Error(_) => "unparsed",
        _ => "other",
    }
}

/// The `refunded_payment` of a service message, if it is one.
fn refunded_payment(m: &Message) -> Option<&RefundedPayment> {
    match &m.kind {
        MessageKind::RefundedPayment(r) => Some(&r.refunded_payment),
        _ => None,
    }
}

impl BotService {
    /// Handles one update: routes it, runs its handler inside a span, records its kind and the
    /// handler's duration. Never panics on odd input; errors are logged and counted, and the
    /// user gets an honest "try again" where one is owed.
    pub async fn handle_update(&self, u: Update) {
        let kind = update_kind(&u);
        self.metrics().updates.with_label_values(&[kind]).inc();
        let span = tracing::info_span!(
            "bot.update",
            update.kind = kind,
            handler = tracing::field::Empty
        );
        let started = Instant::now();
        let (handler, res) = self.route(u).instrument(span.clone()).await;
        span.record("handler", handler);
        self.metrics()
            .handler_duration
            .with_label_values(&[handler])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = res {
            let _g = span.enter();
            match &e {
                HandlerError::Db(d) => {
                    self.metrics().error(BotErrorKind::Db);
                    tracing::warn!(handler, error = %d, "bot handler: database error");
                }
                HandlerError::Api(a) => {
                    self.metrics().error(BotErrorKind::SendFailed);
                    tracing::warn!(handler, error = %a, "bot handler: Bot API error");
                }
            }
        }
    }

    async fn route(&self, u: Update) -> (&'static str, HResult) {
        match u.kind {
            UpdateKind::Message(m) => self.on_message(m).await,
            UpdateKind::CallbackQuery(q) => self.on_callback(q).await,
            UpdateKind::PreCheckoutQuery(q) => ("pre_checkout", self.on_pre_checkout(q).await),
            // Edited messages, channels, membership changes, unknown kinds: ignored on purpose.
            _ => ("ignored", Ok(())),
        }
    }

    async fn on_message(&self, m: Message) -> (&'static str, HResult) {
        // Telegram reports a charge wherever the invoice was paid (a forwarded invoice can be
        // paid in a group): credit the payer whatever the chat, answering them privately.
        if let (Some(p), Some(from)) = (
            m.successful_payment(),
            m.from.as_ref().filter(|f| !f.is_bot),
        ) {
            return ("payment", self.on_payment(Ctx::of(from), p).await);
        }
        if let Some(r) = refunded_payment(&m) {
            // A service message from Telegram: the payer is the sender in their private chat.
            let ctx = match m.from.as_ref().filter(|f| !f.is_bot) {
                Some(from) => Ctx::of(from),
                None => Ctx {
                    user: m.chat.id.0,
                    chat: m.chat.id.0,
                    lang: Lang::En,
                },
            };
            return ("refund", self.on_refunded(ctx, r).await);
        }
        if !m.chat.is_private() {
            return ("ignored", Ok(()));
        }
        let Some(from) = m.from.as_ref().filter(|f| !f.is_bot) else {
            return ("ignored", Ok(()));
        };
        let ctx = Ctx::of(from);
        if ctx.chat != m.chat.id.0 {
            return ("ignored", Ok(()));
        }
        let Some((cmd, args)) = m.text().and_then(Command::parse_text) else {
            let r = self
                .reply(
                    ctx,
                    i18n::not_a_command(ctx.lang),
                    Some(self.menu(ctx, true)),
                )
                .await;
            return ("text", r);
        };
        let admin = self.inner.admins.contains(&ctx.user);
        // Admin commands from anyone else are unknown: no sign they exist.
        let Some(cmd) = cmd.ok().filter(|c| admin || !c.is_admin()) else {
            return (
                "unknown_command",
                self.reply(ctx, i18n::unknown_command(ctx.lang), None).await,
            );
        };
        let res = match cmd {
            Command::Start => self.on_start(ctx).await,
            Command::Help => self.reply(ctx, i18n::help(ctx.lang), None).await,
            Command::Trial => self.on_trial(ctx).await,
            Command::Buy => self.on_buy(ctx).await,
            Command::Status => self.on_status(ctx).await,
            Command::Key => self.on_key(ctx).await,
            Command::Stats => self.on_stats(ctx).await,
            Command::Diag => self.on_diag(ctx).await,
            Command::Reconcile => self.on_reconcile(ctx, &args).await,
            Command::Refund => self.on_refund_command(ctx, &args).await,
        };
        let handler = match cmd {
            Command::Refund => "refund_admin",
            c => c.as_str(),
        };
        (handler, res)
    }

    async fn on_callback(&self, q: CallbackQuery) -> (&'static str, HResult) {
        let ctx = Ctx::of(&q.from);
        // Buttons only work in the user's own private chat with the bot.
        let own_chat = q
            .message
            .as_ref()
            .is_none_or(|m| m.chat().is_private() && m.chat().id.0 == ctx.chat);
        let data = q.data.as_deref().unwrap_or("");
        let parsed = Callback::parse(data).and_then(|cb| {
            if !own_chat {
                Err(super::commands::CallbackError::ForeignChat)
            } else if cb.action == CallbackAction::Plan && self.settings().plan(&cb.plan).is_none()
            {
                Err(super::commands::CallbackError::UnknownPlan)
            } else {
                Ok(cb)
            }
        });
        let api = &self.inner.api;
        let answer = api
            .call("answerCallbackQuery", || {
                let req = api.bot.answer_callback_query(q.id.clone());
                if parsed.is_err() {
                    req.text(i18n::unknown_action(ctx.lang)).into_future()
                } else {
                    req.into_future()
                }
            })
            .await;
        if let Err(e) = answer {
            tracing::debug!(error = %e, "answerCallbackQuery failed");
        }
        let cb = match parsed {
            Ok(cb) => cb,
            Err(e) => {
                self.metrics().error(BotErrorKind::UnknownCallback);
                tracing::info!(error = %e, "callback query with unknown data");
                return ("callback_unknown", Ok(()));
            }
        };
        match cb.action {
            CallbackAction::Trial => ("trial", self.on_trial(ctx).await),
            CallbackAction::Buy => ("buy", self.on_buy(ctx).await),
            CallbackAction::Status => ("status", self.on_status(ctx).await),
            CallbackAction::Key => ("key", self.on_key(ctx).await),
            CallbackAction::Help => ("help", self.reply(ctx, i18n::help(ctx.lang), None).await),
            CallbackAction::Menu => ("start", self.on_start(ctx).await),
            CallbackAction::Plan => ("plan", self.on_plan(ctx, &cb.plan).await),
        }
    }

    pub(crate) async fn reply(
        &self,
        ctx: Ctx,
        text: &str,
        kb: Option<InlineKeyboardMarkup>,
    ) -> HResult {
        self.inner.api.send_text(ctx.chat, text, kb).await?;
        Ok(())
    }

    /// Tells the user about an internal error (best effort) and passes the error on.
    async fn sorry<T>(&self, ctx: Ctx, e: DbError) -> Result<T, HandlerError> {
        let _ = self.reply(ctx, i18n::unavailable(ctx.lang), None).await;
        Err(HandlerError::Db(e))
    }

    fn menu(&self, ctx: Ctx, trial: bool) -> InlineKeyboardMarkup {
        let b = |t: &str, a: CallbackAction| {
            InlineKeyboardButton::callback(t.to_string(), Callback::action(a).data())
        };
        let l = ctx.lang;
        let mut rows = Vec::new();
        if trial && self.settings().trial_days > 0 {
            rows.push(vec![b(i18n::btn_trial(l), CallbackAction::Trial)]);
        }
        rows.push(vec![b(i18n::btn_buy(l), CallbackAction::Buy)]);
        rows.push(vec![
            b(i18n::btn_status(l), CallbackAction::Status),
            b(i18n::btn_key(l), CallbackAction::Key),
        ]);
        rows.push(vec![b(i18n::btn_help(l), CallbackAction::Help)]);
        InlineKeyboardMarkup::new(rows)
    }

    async fn on_start(&self, ctx: Ctx) -> HResult {
        if let Err(e) = store::upsert_user(&self.inner.pool, ctx.user, ctx.lang.code()).await {
            return self.sorry(ctx, e).await;
        }
        let trial = match store::trial_available(&self.inner.pool, ctx.user).await {
            Ok(t) => t,
            Err(e) => return self.sorry(ctx, e).await,
        };
        self.reply(ctx, i18n::welcome(ctx.lang), Some(self.menu(ctx, trial)))
            .await
    }

    async fn on_trial(&self, ctx: Ctx) -> HResult {
        let days = self.settings().trial_days;
        if days == 0 {
            return self.reply(ctx, i18n::trial_disabled(ctx.lang), None).await;
        }
        let out = store::start_trial(
            &self.inner.pool,
            ctx.user,
            ctx.lang.code(),
            days,
            &self.inner.node_picker,
            self.add_grace(),
        )
        .await;
        match out {
            Ok(TrialOutcome::Started(sub)) => {
                let ready = self.issue_key(&sub).await;
                self.reply(
                    ctx,
                    &i18n::trial_started(ctx.lang, days, sub.expires_at),
                    None,
                )
                .await?;
                self.deliver_key(ctx, &sub, ready).await
            }
            Ok(TrialOutcome::Used) => self.reply(ctx, i18n::trial_used(ctx.lang), None).await,
            Ok(TrialOutcome::NoNode) => {
                self.metrics().error(BotErrorKind::NoNode);
                self.reply(ctx, i18n::unavailable(ctx.lang), None).await
            }
            Err(e) => self.sorry(ctx, e).await,
        }
    }

    async fn on_buy(&self, ctx: Ctx) -> HResult {
        let rows = self
            .settings()
            .plans
            .iter()
            .map(|p| {
                vec![InlineKeyboardButton::callback(
                    i18n::plan_button(ctx.lang, p),
                    Callback::plan(&p.id).data(),
                )]
            })
            .collect::<Vec<_>>();
        self.reply(
            ctx,
            i18n::choose_plan(ctx.lang),
            Some(InlineKeyboardMarkup::new(rows)),
        )
        .await
    }

    async fn on_plan(&self, ctx: Ctx, plan_id: &str) -> HResult {
        let Some(plan) = self.settings().plan(plan_id).cloned() else {
            return self.reply(ctx, i18n::unknown_action(ctx.lang), None).await;
        };
        let (title, description) = i18n::invoice(ctx.lang, &plan);
        let api = &self.inner.api;
        let payload = format!("{PAYLOAD_PREFIX}{}", plan.id);
        api.call("sendInvoice", || {
            api.bot
                .send_invoice(
                    ChatId(ctx.chat),
                    title.clone(),
                    description.clone(),
                    payload.clone(),
                    XTR,
                    [LabeledPrice::new(title.clone(), plan.stars)],
                )
                .into_future()
        })
        .await?;
        Ok(())
    }

    /// Checks an invoice before Telegram charges: known payload and plan, `XTR`, the plan's
    /// current price, and a node to put the key on.
    fn validate_checkout(
        &self,
        payload: &str,
        currency: &str,
        amount: u32,
    ) -> Result<(), &'static str> {
        let plan = payload
            .strip_prefix(PAYLOAD_PREFIX)
            .and_then(|id| self.settings().plan(id))
            .ok_or("invalid")?;
        if currency != XTR || amount != plan.stars {
            return Err("invalid");
        }
        if self.inner.node_names.is_empty() {
            return Err("unavailable");
        }
        Ok(())
    }

    async fn on_pre_checkout(&self, q: PreCheckoutQuery) -> HResult {
        let ctx = Ctx::of(&q.from);
        let verdict = self.validate_checkout(&q.invoice_payload, &q.currency, q.total_amount);
        if verdict.is_err() {
            self.metrics().payment(PaymentOutcome::Rejected);
            tracing::info!(reason = ?verdict, "pre-checkout rejected");
        }
        let api = &self.inner.api;
        api.call("answerPreCheckoutQuery", || {
            let req = api
                .bot
                .answer_pre_checkout_query(q.id.clone(), verdict.is_ok());
            match verdict {
                Ok(()) => req.into_future(),
                Err("unavailable") => req
                    .error_message(i18n::precheckout_unavailable(ctx.lang))
                    .into_future(),
                Err(_) => req
                    .error_message(i18n::precheckout_invalid(ctx.lang))
                    .into_future(),
            }
        })
        .await?;
        Ok(())
    }

    async fn on_payment(&self, ctx: Ctx, p: &SuccessfulPayment) -> HResult {
        let plan = p
            .invoice_payload
            .strip_prefix(PAYLOAD_PREFIX)
            .and_then(|id| self.settings().plan(id))
            .cloned();
        let mut input = PaymentIn {
            user_id: ctx.user,
            lang: ctx.lang.code().into(),
            telegram_charge_id: p.telegram_payment_charge_id.0.clone(),
            provider_charge_id: Some(p.provider_payment_charge_id.clone())
                .filter(|s| !s.is_empty()),
            plan: String::new(),
            days: 0,
            currency: p.currency.chars().take(8).collect(),
            amount: p.total_amount as i64,
        };
        let Some(plan) = plan else {
            // Telegram took the money: record it whatever the payload says, for support.
            input.plan = "unknown".into();
            self.metrics().error(BotErrorKind::PaymentUnknownPlan);
            tracing::error!(
                amount = p.total_amount,
                "payment for an unknown plan; recorded for manual credit"
            );
            return match store::record_orphan_payment(&self.inner.pool, &input).await {
                Ok(true) => {
                    self.reply(ctx, i18n::payment_unknown_plan(ctx.lang), None)
                        .await
                }
                Ok(false) => {
                    self.metrics().payment(PaymentOutcome::Duplicate);
                    self.reply(ctx, i18n::payment_duplicate(ctx.lang), None)
                        .await
                }
                Err(e) => {
                    self.metrics().payment(PaymentOutcome::Failed);
                    self.sorry(ctx, e).await
                }
            };
        };
        input.plan = plan.id.clone();
        input.days = plan.days;
        match self.credit_with_retry(&input).await {
            Ok(CreditOutcome::Credited { sub, issue }) => {
                self.metrics().payment(PaymentOutcome::Credited);
                tracing::info!(plan = %plan.id, stars = p.total_amount, "payment credited");
                let ready = if issue {
                    self.issue_key(&sub).await
                } else {
                    true
                };
                self.reply(
                    ctx,
                    &i18n::payment_credited(ctx.lang, &plan, sub.expires_at),
                    None,
                )
                .await?;
                if issue {
                    self.deliver_key(ctx, &sub, ready).await?;
                }
                Ok(())
            }
            Ok(CreditOutcome::Duplicate) => {
                self.metrics().payment(PaymentOutcome::Duplicate);
                tracing::info!("repeated successful_payment: not credited again");
                self.reply(ctx, i18n::payment_duplicate(ctx.lang), None)
                    .await
            }
            Ok(CreditOutcome::AlreadyRefunded) => {
                self.metrics().payment(PaymentOutcome::RefundedBeforeCredit);
                tracing::warn!(
                    telegram_charge_id = %input.telegram_charge_id,
                    "payment arrived after its refund: recorded, not credited"
                );
                self.reply(ctx, &i18n::refund_noted(ctx.lang, input.amount), None)
                    .await
            }
            Ok(CreditOutcome::NoNode) => {
                self.metrics().payment(PaymentOutcome::Failed);
                self.metrics().error(BotErrorKind::NoNode);
                tracing::error!("payment could not be credited: no node configured");
                self.reply(ctx, i18n::unavailable(ctx.lang), None).await
            }
            Err(e) => {
                // Telegram has the money and will not send this update again: the charge ids
                // (not secrets) go to the error log so support can credit it by hand.
                self.metrics().payment(PaymentOutcome::Failed);
                tracing::error!(
                    error = %e,
                    user_id = input.user_id,
                    plan = %input.plan,
                    amount = input.amount,
                    provider_charge_id = input.provider_charge_id.as_deref(),
                    telegram_charge_id = %input.telegram_charge_id,
                    "payment NOT credited after retries: credit it manually"
                );
                let _ = self.reply(ctx, i18n::payment_delayed(ctx.lang), None).await;
                Err(HandlerError::Db(e))
            }
        }
    }

    /// Credits a payment with [`Self::db_retry`]. Safe to repeat: the payment row is unique
    /// per Telegram charge id.
    async fn credit_with_retry(&self, input: &PaymentIn) -> Result<CreditOutcome, DbError> {
        let grace = self.add_grace();
        self.db_retry(|| {
            store::credit_payment(&self.inner.pool, input, &self.inner.node_picker, grace)
        })
        .await
    }

    /// Runs `op`, retrying database errors that can pass (pool exhausted, server restarting,
    /// failover) with capped exponential backoff while the handler bound leaves room for one
    /// more attempt and the reply (an acquire timeout plus 2 s). `op` must be safe to repeat.
    async fn db_retry<T, F, Fut>(&self, op: F) -> Result<T, DbError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, DbError>>,
    {
        use backon::{ExponentialBuilder, Retryable};
        let bound = self.settings().handler_timeout_seconds;
        let reserve = self.inner.pool.acquire_timeout() + std::time::Duration::from_secs(2);
        let budget = bound.saturating_sub(reserve);
        let started = Instant::now();
        let backoff = ExponentialBuilder::new()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_delay(std::time::Duration::from_secs(3))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(budget));
        op.retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &DbError| {
                !matches!(e, DbError::Query(_) | DbError::Migrate(_)) && started.elapsed() < budget
            })
            .notify(|e, wait| {
                self.metrics().error(BotErrorKind::PaymentRetry);
                tracing::warn!(error = %e, wait_s = wait.as_secs_f64(), "payment database write failed; retrying");
            })
            .await
    }

    /// A `refunded_payment` message: Telegram returned the Stars of a charge.
    async fn on_refunded(&self, ctx: Ctx, r: &RefundedPayment) -> HResult {
        let input = RefundIn {
            telegram_charge_id: r.telegram_payment_charge_id.0.clone(),
            user_id: ctx.user,
            currency: r.currency.chars().take(8).collect(),
            amount: i64::from(r.total_amount),
            source: "telegram",
        };
        self.apply_refund(&input, ctx.lang).await.map(|_| ())
    }

    /// Records a refund (once per charge id) and takes back what the charge gave, with the same
    /// database retries as a credit; counts the outcome, logs it with the charge id (not a
    /// secret) and tells the payer once. Returns the outcome for `/refund`.
    async fn apply_refund(
        &self,
        input: &RefundIn,
        lang: Lang,
    ) -> Result<RefundOutcome, HandlerError> {
        let plans = self.settings().plans.clone();
        let plan_days = move |id: &str| plans.iter().find(|p| p.id == id).map(|p| p.days);
        let out = self
            .db_retry(|| store::refund_payment(&self.inner.pool, input, &plan_days))
            .await;
        let count = |outcome: &str| {
            self.metrics()
                .refunds
                .with_label_values(&[input.source, outcome])
                .inc();
        };
        let charge = input.telegram_charge_id.as_str();
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                count("failed");
                tracing::error!(
                    error = %e,
                    telegram_charge_id = charge,
                    user_id = input.user_id,
                    amount = input.amount,
                    "refund NOT recorded after retries: take the days back by hand"
                );
                let ctx = Ctx {
                    user: input.user_id,
                    chat: input.user_id,
                    lang,
                };
                let _ = self.reply(ctx, i18n::unavailable(lang), None).await;
                return Err(HandlerError::Db(e));
            }
        };
        let (payer, text) = match &out {
            RefundOutcome::Shortened { user_id, sub } => {
                count("shortened");
                tracing::info!(telegram_charge_id = charge, source = input.source, expires_at = %sub.expires_at, "refund recorded; the charge's days taken back");
                (
                    *user_id,
                    i18n::refund_recorded(lang, input.amount, Some(sub.expires_at)),
                )
            }
            RefundOutcome::Ended { user_id, sub } => {
                count("ended");
                tracing::info!(telegram_charge_id = charge, source = input.source, node = %sub.node, "refund recorded; subscription ended, key removal queued");
                (*user_id, i18n::refund_recorded(lang, input.amount, None))
            }
            RefundOutcome::NotCredited { user_id } => {
                count("not_credited");
                tracing::info!(
                    telegram_charge_id = charge,
                    source = input.source,
                    "refund recorded; the payment had added no running time"
                );
                (*user_id, i18n::refund_noted(lang, input.amount))
            }
            RefundOutcome::UnknownCharge => {
                count("unknown_charge");
                tracing::warn!(
                    telegram_charge_id = charge,
                    source = input.source,
                    user_id = input.user_id,
                    "refund of a charge never recorded here: recorded; nothing to take back"
                );
                (input.user_id, i18n::refund_noted(lang, input.amount))
            }
            RefundOutcome::Duplicate => {
                count("duplicate");
                tracing::info!(
                    telegram_charge_id = charge,
                    source = input.source,
                    "refund already recorded: nothing changed"
                );
                return Ok(RefundOutcome::Duplicate);
            }
        };
        let ctx = Ctx {
            user: payer,
            chat: payer,
            lang,
        };
        self.reply(ctx, &text, None).await?;
        Ok(out)
    }

    /// `/refund <telegram charge id> [user id]` (admins): refunds the charge through
    /// `refundStarPayment` and, once Telegram confirms (or says it was already refunded), does
    /// the same bookkeeping as a `refunded_payment` message. The user id is needed only for a
    /// charge not recorded here.
    async fn on_refund_command(&self, ctx: Ctx, args: &[&str]) -> HResult {
        let Some(charge) = args.first().map(|c| c.to_string()) else {
            return self
                .reply(ctx, "Usage: /refund <telegram charge id> [user id]", None)
                .await;
        };
        let count = |outcome: &str| {
            self.metrics()
                .refunds
                .with_label_values(&["admin", outcome])
                .inc();
        };
        let payment = match store::find_payment(&self.inner.pool, &charge).await {
            Ok(p) => p,
            Err(e) => return self.sorry(ctx, e).await,
        };
        let (user_id, currency, amount, lang) = match (&payment, args.get(1)) {
            (Some(p), _) if p.refunded => {
                count("duplicate");
                return self
                    .reply(ctx, "This charge is already refunded.", None)
                    .await;
            }
            (Some(p), _) => (
                p.user_id,
                p.currency.clone(),
                p.amount,
                Lang::from_code(Some(&p.language_code)),
            ),
            (None, Some(u)) => match u.parse::<i64>() {
                Ok(u) if u > 0 => (u, "XTR".to_string(), 0, Lang::En),
                _ => return self.reply(ctx, "The user id must be a number.", None).await,
            },
            (None, None) => {
                count("unknown_charge");
                return self
                    .reply(
                        ctx,
                        "No payment with this charge id is recorded. To refund it anyway: /refund <charge id> <user id>",
                        None,
                    )
                    .await;
            }
        };
        let api = &self.inner.api;
        let res = api
            .call("refundStarPayment", || {
                api.bot
                    .refund_star_payment(
                        UserId(user_id as u64),
                        TelegramTransactionId(charge.clone()),
                    )
                    .into_future()
            })
            .await;
        if let Err(e) = res {
            if !e.to_string().contains("CHARGE_ALREADY_REFUNDED") {
                count("rejected");
                tracing::warn!(error = %e, telegram_charge_id = %charge, "refundStarPayment refused");
                return self
                    .reply(ctx, &format!("Telegram refused the refund: {e}"), None)
                    .await;
            }
            tracing::info!(telegram_charge_id = %charge, "refundStarPayment: already refunded at Telegram; recording it");
        }
        let input = RefundIn {
            telegram_charge_id: charge,
            user_id,
            currency,
            amount,
            source: "admin",
        };
        let summary = match self.apply_refund(&input, lang).await? {
            RefundOutcome::Shortened { sub, .. } => format!(
                "Refunded. The subscription now ends {}.",
                sub.expires_at.format("%Y-%m-%d %H:%M UTC")
            ),
            RefundOutcome::Ended { .. } => {
                "Refunded. Nothing is left of the subscription: it ended, its key's removal is queued."
                    .to_string()
            }
            RefundOutcome::NotCredited { .. } => {
                "Refunded. The payment had added no running time.".to_string()
            }
            RefundOutcome::UnknownCharge => {
                "Refunded at Telegram; no payment was recorded here (refund recorded).".to_string()
            }
            // Telegram's refunded_payment message for this refund was handled first.
            RefundOutcome::Duplicate => {
                match store::current_subscription(&self.inner.pool, user_id).await {
                    Ok(Some(sub)) if sub.is_live(Utc::now()) => format!(
                        "Refunded (recorded from Telegram's refund message). The subscription now ends {}.",
                        sub.expires_at.format("%Y-%m-%d %H:%M UTC")
                    ),
                    Ok(Some(_)) => "Refunded (recorded from Telegram's refund message). The subscription has ended.".to_string(),
                    _ => "Refunded (recorded from Telegram's refund message).".to_string(),
                }
            }
        };
        self.reply(ctx, &summary, None).await
    }

    /// How long the outbox leaves a new key's add to the handler: the node bound plus a margin.
    fn add_grace(&self) -> std::time::Duration {
        self.settings().key_issue_timeout_seconds + std::time::Duration::from_secs(2)
    }

    /// Adds the subscription's user on its node: outside any transaction and with no pooled
    /// connection held during the HTTP call. On failure the intent goes to the outbox, which
    /// retries until the node confirms. Returns whether the node confirmed now.
    pub(crate) async fn issue_key(&self, sub: &Subscription) -> bool {
        let user = NodeUser::owned(sub.vless_uuid);
        let bound = self.settings().key_issue_timeout_seconds;
        let err = match self.inner.fleet.get(&sub.node) {
            // Cut short, the call may still have reached the node: the outbox's add is
            // idempotent ("already present" counts as done).
            Some(client) => match tokio::time::timeout(bound, client.add_user(&user)).await {
                Ok(Ok(_)) => {
                    self.add_confirmed(sub).await;
                    return true;
                }
                Ok(Err(e)) => format!("{}: {e}", e.error_type()),
                Err(_) => format!("no confirmation within {:.1} s", bound.as_secs_f64()),
            },
            None => "node not configured".to_string(),
        };
        self.metrics().error(BotErrorKind::NodePending);
        tracing::warn!(node = %sub.node, error = %err, "key not confirmed by the node; queued in the outbox");
        let queued = async {
            let mut c = self.inner.pool.acquire("bot_enqueue_add").await?;
            let r = enqueue(
                &mut c,
                &sub.node,
                NodeOp::Add,
                sub.vless_uuid,
                &owned_email(sub.vless_uuid),
            )
            .await;
            c.check(r)
        }
        .await;
        if let Err(e) = queued {
            // Reconcile re-adds a live subscription missing from its node.
            self.metrics().error(BotErrorKind::Db);
            tracing::error!(error = %e, "could not queue the node add; reconcile will repair it");
        }
        false
    }

    /// Closes the add intent queued with the subscription. If this fails the outbox applies
    /// the add again later, which the node answers "unchanged": harmless.
    async fn add_confirmed(&self, sub: &Subscription) {
        let done = async {
            let mut c = self.inner.pool.acquire("bot_key_confirmed").await?;
            let r = complete(&mut c, &sub.node, NodeOp::Add, sub.vless_uuid).await;
            c.check(r)
        }
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not close the add intent; the outbox repeats it");
        }
    }

    fn link(&self, sub: &Subscription) -> String {
        let s = self.settings();
        let (host, port) = self
            .inner
            .nodes
            .get(&sub.node)
            .map(|n| (n.host.as_str(), n.port))
            .unwrap_or(("unknown", 443));
        keys::vless_link(sub.vless_uuid, host, port, &s.link_params, &s.link_label)
    }

    /// Sends the key: the QR code with the link as caption (and the honest note first when
    /// the node has not confirmed it yet).
    async fn deliver_key(&self, ctx: Ctx, sub: &Subscription, ready: bool) -> HResult {
        if !ready {
            self.reply(ctx, i18n::key_pending(ctx.lang), None).await?;
        }
        let link = self.link(sub);
        let caption = i18n::key_caption(ctx.lang, &link, sub.expires_at);
        let qr = {
            let link = link.clone();
            tokio::task::spawn_blocking(move || keys::qr_png(&link)).await
        };
        match qr {
            Ok(Ok(png)) => {
                self.inner
                    .api
                    .send_png(ctx.chat, png, &caption, None)
                    .await?;
            }
            _ => {
                self.metrics().error(BotErrorKind::Qr);
                self.reply(ctx, &caption, None).await?;
            }
        }
        Ok(())
    }

    async fn on_status(&self, ctx: Ctx) -> HResult {
        let sub = match store::current_subscription(&self.inner.pool, ctx.user).await {
            Ok(s) => s,
            Err(e) => return self.sorry(ctx, e).await,
        };
        let Some(sub) = sub else {
            return self.reply(ctx, i18n::status_none(ctx.lang), None).await;
        };
        let now = Utc::now();
        let plan = if sub.plan == "trial" {
            if ctx.lang == Lang::Ru {
                "пробный".to_string()
            } else {
                "trial".to_string()
            }
        } else {
            self.settings()
                .plan(&sub.plan)
                .map(|p| i18n::plan_title(ctx.lang, p).to_string())
                .unwrap_or_else(|| sub.plan.clone())
        };
        let text = i18n::status(
            ctx.lang,
            &plan,
            sub.expires_at,
            &sub.node,
            sub.is_live(now),
            now,
        );
        self.reply(ctx, &text, None).await
    }

    async fn on_key(&self, ctx: Ctx) -> HResult {
        let sub = match store::current_subscription(&self.inner.pool, ctx.user).await {
            Ok(s) => s,
            Err(e) => return self.sorry(ctx, e).await,
        };
        match sub {
            None => self.reply(ctx, i18n::key_none(ctx.lang), None).await,
            Some(s) if !s.is_live(Utc::now()) => {
                self.reply(ctx, i18n::key_expired(ctx.lang), None).await
            }
            Some(s) => self.deliver_key(ctx, &s, true).await,
        }
    }

    async fn on_stats(&self, ctx: Ctx) -> HResult {
        let st = match store::stats(&self.inner.pool).await {
            Ok(s) => s,
            Err(e) => return self.sorry(ctx, e).await,
        };
        let text = format!(
            "Stats\nusers: {}\nactive subscriptions: {} (trials: {})\npayments: {}\nrefunds: {}\nrevenue: {} ⭐ (last 30 days: {} ⭐)",
            st.users, st.active, st.active_trials, st.payments, st.refunds, st.revenue_stars, st.revenue_stars_30d
        );
        self.reply(ctx, &text, None).await
    }

    async fn on_diag(&self, ctx: Ctx) -> HResult {
        let text = self.diag_text().await;
        self.reply(ctx, &text, None).await
    }

    /// The `/diag` message: stall state, leadership, polling age, scheduler lag p99, breakers,
    /// pool saturation, last reconcile per node, latest dump summary.
    pub async fn diag_text(&self) -> String {
        use std::fmt::Write as _;
        let mut t = String::from("Diagnostics\n");
        let health = self.inner.health.as_deref();
        let stall = health.and_then(|h| h.stall());
        let _ = writeln!(t, "stall: {}", stall.as_deref().unwrap_or("none"));
        if let Some(l) = health.and_then(|h| h.leader.as_ref()?.known_leader()) {
            let _ = writeln!(t, "leader: {}", if l { "yes" } else { "no" });
        }
        let last = self.metrics().polling_last_success.get();
        if last > 0.0 {
            let _ = writeln!(
                t,
                "last poll: {:.1} s ago",
                (super::unix_now() - last).max(0.0)
            );
        }
        let lag = self
            .inner
            .registry
            .as_ref()
            .and_then(|r| histogram_quantile(r, "scheduler_lag", 0.99));
        match lag {
            Some((name, v)) => {
                let _ = writeln!(t, "scheduler lag p99: {:.2} ms ({name})", v * 1000.0);
            }
            None => {
                let _ = writeln!(t, "scheduler lag p99: n/a");
            }
        }
        let breakers: Vec<String> = self
            .inner
            .fleet
            .clients()
            .map(|c| format!("{}={}", c.name(), c.breaker_state().as_str()))
            .collect();
        let _ = writeln!(
            t,
            "breakers: {}",
            if breakers.is_empty() {
                "none".into()
            } else {
                breakers.join(", ")
            }
        );
        let raw = self.inner.pool.raw();
        let used = raw.size().saturating_sub(raw.num_idle() as u32);
        let waiting = self
            .inner
            .pool
            .inflight()
            .snapshot()
            .iter()
            .filter(|e| e.state == crate::db::inflight::PoolUse::Waiting)
            .count();
        let _ = writeln!(
            t,
            "pool: {used}/{} in use, {waiting} waiting",
            self.inner.pool_max
        );
        match store::last_reconciles(&self.inner.pool).await {
            Ok(runs) if runs.is_empty() => {
                let _ = writeln!(t, "last reconcile: none");
            }
            Ok(runs) => {
                for (node, at, outcome, removed, readded) in runs {
                    let ago = (Utc::now() - at).num_seconds();
                    let _ = writeln!(
                        t,
                        "last reconcile {node}: {outcome} {ago} s ago (removed {removed}, re-added {readded})"
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(t, "last reconcile: unknown ({})", e.kind());
            }
        }
        let dump = health
            .and_then(|h| h.diagnostics.as_ref())
            .and_then(|d| d.latest_dump_json());
        match dump {
            Some(j) => {
                // Verdict, kind and time: the whole dump is at /debug/dump.
                let v: serde_json::Value = serde_json::from_str(&j).unwrap_or_default();
                let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
                let verdict: String = field("verdict").chars().take(300).collect();
                let _ = writeln!(
                    t,
                    "latest dump: {} at {}: {verdict}",
                    field("kind"),
                    field("time")
                );
            }
            None => {
                let _ = writeln!(t, "latest dump: none");
            }
        }
        t
    }

    async fn on_reconcile(&self, ctx: Ctx, args: &[&str]) -> HResult {
        let dry = args.iter().any(|a| a.eq_ignore_ascii_case("dry"));
        let node = args
            .iter()
            .find(|a| !a.eq_ignore_ascii_case("dry"))
            .map(|s| s.to_string());
        if let Some(n) = &node {
            if !self.inner.nodes.contains_key(n) {
                let known = self.inner.node_names.join(", ");
                return self
                    .reply(ctx, &format!("Unknown node. Known nodes: {known}"), None)
                    .await;
            }
        }
        let Some(trigger) = self.inner.reconcile.clone() else {
            return self
                .reply(ctx, "Reconcile is not available in this instance.", None)
                .await;
        };
        // One pass at a time: a second /reconcile while one runs is told so.
        let Ok(permit) = self.inner.admin_reconcile.clone().try_acquire_owned() else {
            return self
                .reply(
                    ctx,
                    "A reconcile pass is already running; its summary follows.",
                    None,
                )
                .await;
        };
        // A pass over a big node can outlast the handler bound: it runs as its own tracked
        // task (shutdown waits for it, within the drain bound), cut off at the trigger's bound
        // or when the process shuts down, and reports when done, freeing the handler slot.
        self.reply(
            ctx,
            "Starting a pass; the summary follows when it ends.",
            None,
        )
        .await?;
        let bot = self.clone();
        let root = self.inner.tasks.root().clone();
        let bound = trigger.bound();
        self.inner.tasks.spawn_named("admin_reconcile", async move {
            let text = tokio::select! {
                _ = root.cancelled() => "Reconcile interrupted: the bot is shutting down.".to_string(),
                r = tokio::time::timeout(bound, trigger.run_once(node, dry)) => match r {
                    Ok(Ok(s)) => format!("Reconcile{}:\n{s}", if dry { " (dry run)" } else { "" }),
                    Ok(Err(e)) => format!("Reconcile failed: {e}"),
                    Err(_) => format!(
                        "Reconcile did not finish within {} s; it was stopped.",
                        bound.as_secs()
                    ),
                },
            };
            drop(permit);
            // The reply is bounded by the Bot API request timeout.
            if let Err(e) = bot.reply(ctx, &text, None).await {
                tracing::warn!(error = %e, "could not send the /reconcile summary");
            }
        });
        Ok(())
    }
}

/// The `q` quantile (linear within a bucket) of the first histogram family whose name
/// contains `needle`, summed over its label sets; `None` when absent or empty.
fn histogram_quantile(
    registry: &prometheus::Registry,
    needle: &str,
    q: f64,
) -> Option<(String, f64)> {
    let fam = registry.gather().into_iter().find(|f| {
        f.name().contains(needle) && f.get_field_type() == prometheus::proto::MetricType::HISTOGRAM
    })?;
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let mut total = 0u64;
    for m in fam.get_metric() {
        let h = m.get_histogram();
        total += h.get_sample_count();
        for (i, b) in h.get_bucket().iter().enumerate() {
            if buckets.len() <= i {
                buckets.push((b.upper_bound(), 0));
            }
            buckets[i].1 += b.cumulative_count();
        }
    }
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut prev = (0.0, 0u64);
    for (ub, c) in &buckets {
        if *c as f64 >= rank {
            let span = (*c - prev.1).max(1) as f64;
            let v = prev.0 + (ub - prev.0) * ((rank - prev.1 as f64) / span);
            return Some((fam.name().to_string(), v));
        }
        prev = (*ub, *c);
    }
    Some((fam.name().to_string(), prev.0))
}
