//! Metric families of the bot. Every label comes from a fixed set in the code: never a chat id,
//! user id, payload or token.

use prometheus::{
    Counter, Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

use crate::metrics::{self, DURATION_BUCKETS_SECONDS};

/// The bot's metric families (cheap clone).
#[derive(Debug, Clone)]
pub struct BotMetrics {
    pub(crate) updates: IntCounterVec,
    pub(crate) handler_duration: HistogramVec,
    pub(crate) errors: IntCounterVec,
    pub(crate) polling_last_success: Gauge,
    pub(crate) api_requests: IntCounterVec,
    pub(crate) payments: IntCounterVec,
    pub(crate) refunds: IntCounterVec,
    pub(crate) in_flight: IntGauge,
    pub(crate) precheckout_answer: Histogram,
    pub(crate) queue_depth: IntGaugeVec,
    pub(crate) backpressure: Counter,
    pub(crate) api_retries: IntCounterVec,
    pub(crate) webhook_requests: IntCounterVec,
    pub(crate) webhook_in_flight: IntGauge,
    pub(crate) webhook_handling: Histogram,
    pub(crate) dedup_deleted: IntCounter,
    pub(crate) dedup_duplicates: IntCounter,
    pub(crate) receive_mode: IntGaugeVec,
}

/// Buckets of `vpnbot_bot_precheckout_answer_seconds`: fine below Telegram's 10 s deadline.
const PRECHECKOUT_BUCKETS_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0,
];

/// Declares a closed set of label values: the enum, `ALL`, `as_str()` and a help-text list
/// generated from the per-variant descriptions, so the help text cannot drift from the code.
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal : $help:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order (zero-initialised series are exported from it).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }

            /// What the value means, for the metric's help text.
            pub const fn help(self) -> &'static str {
                match self {
                    $($name::$variant => $help),+
                }
            }

            /// `label (meaning), label (meaning), ...` over [`Self::ALL`].
            pub fn help_list() -> String {
                Self::ALL
                    .iter()
                    .map(|v| format!("{} ({})", v.as_str(), v.help()))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// The `kind` label of `vpnbot_bot_errors_total`: every error the bot counts.
    pub enum BotErrorKind {
        /// getUpdates answered 409: another process polls this token.
        Conflict => "conflict": "409 from getUpdates: another process polls this bot token",
        /// A Bot API call answered 429.
        RateLimited => "rate_limited": "429 from the Bot API",
        /// getUpdates answered 401.
        Unauthorized => "unauthorized": "401: the token is revoked or wrong",
        /// getUpdates did not answer within its bound.
        PollTimeout => "poll_timeout": "getUpdates gave no answer within its bound",
        /// getUpdates failed on the network.
        Network => "network": "getUpdates failed on the network",
        /// getUpdates answered another API error.
        Api => "api": "getUpdates answered another Bot API error",
        /// getUpdates answered something that is not the expected JSON.
        InvalidJson => "invalid_json": "getUpdates answered unparseable JSON",
        /// A handler ran past `bot.handler_timeout_seconds`.
        HandlerTimeout => "handler_timeout": "a handler was cut off by bot.handler_timeout_seconds",
        /// A handler panicked.
        Panic => "panic": "a handler panicked",
        /// A handler's database call failed.
        Db => "db": "a handler's database call failed",
        /// A handler's reply could not be sent.
        SendFailed => "send_failed": "a handler's Bot API call failed",
        /// No node could take a new key.
        NoNode => "no_node": "no node could take a new subscription",
        /// The node did not confirm a new key in time; the outbox retries it.
        NodePending => "node_pending": "a new key was not confirmed by its node in time and went to the outbox",
        /// A payment for a plan that is not configured (recorded for manual credit).
        PaymentUnknownPlan => "payment_unknown_plan": "a payment named an unknown plan; recorded for manual credit",
        /// A payment's database write failed once and is retried.
        PaymentRetry => "payment_retry": "a payment or refund database write failed and is retried",
        /// The QR code could not be rendered (the link is sent as text).
        Qr => "qr": "the QR code could not be rendered; the link went as text",
        /// A button press carried callback data the bot does not know.
        UnknownCallback => "unknown_callback": "a button press carried unknown or foreign callback data",
    }
}

label_enum! {
    /// The `outcome` label of `vpnbot_bot_webhook_requests_total`.
    pub enum WebhookOutcome {
        /// Handled here, answered 200.
        Accepted => "accepted": "handled here, answered 200",
        /// Handled before (a retry or a second delivery), answered 200 without handling.
        Duplicate => "duplicate": "handled before, answered 200 without handling again",
        /// Another instance holds the update's claim, answered 503 so Telegram retries.
        InProgress => "in_progress": "claimed by another instance, answered 503 so Telegram retries",
        /// Its handler still ran after telegram.webhook.ack_timeout_seconds, answered 503.
        Slow => "slow": "still being handled after ack_timeout_seconds, answered 503",
        /// Missing or wrong secret token, answered 401.
        Unauthorized => "unauthorized": "missing or wrong X-Telegram-Bot-Api-Secret-Token, answered 401",
        /// telegram.webhook.max_in_flight updates already in flight, answered 503 at once.
        Overloaded => "overloaded": "max_in_flight updates already being handled, answered 503 at once",
        /// Not an update (bad JSON, no update_id), answered 400.
        BadRequest => "bad_request": "not a Telegram update, answered 400",
        /// The claim could not be recorded in PostgreSQL, answered 503.
        Error => "error": "the claim could not be recorded in PostgreSQL, answered 503",
    }
}

label_enum! {
    /// The `outcome` label of `vpnbot_bot_payments_total`.
    pub enum PaymentOutcome {
        /// The first `successful_payment` of a charge, credited.
        Credited => "credited": "first successful_payment of a charge",
        /// A repeated `successful_payment`, not credited again.
        Duplicate => "duplicate": "a repeated one, not credited again",
        /// Refused at pre-checkout.
        Rejected => "rejected": "pre-checkout refused",
        /// Not recorded; retried by Telegram's redelivery or support.
        Failed => "failed": "not recorded; retried by Telegram's redelivery or support",
        /// The charge's refund was recorded first: recorded, not credited.
        RefundedBeforeCredit => "refunded_before_credit": "the charge's refund was recorded first: recorded, not credited",
    }
}

/// Refund sources (`source` label of `vpnbot_bot_refunds_total`).
pub const REFUND_SOURCES: [&str; 2] = ["telegram", "admin"];
/// Refund outcomes (`outcome` label of `vpnbot_bot_refunds_total`).
pub const REFUND_OUTCOMES: [&str; 7] = [
    "shortened",
    "ended",
    "not_credited",
    "unknown_charge",
    "duplicate",
    "failed",
    "rejected",
];

impl BotMetrics {
    /// Registers the bot's families.
    pub fn register(registry: &Registry) -> Self {
        let m = Self {
            updates: metrics::counter_vec(
                registry,
                "vpnbot_bot_updates_total",
                "Telegram updates received, by kind (message, edited_message, callback_query, pre_checkout_query, successful_payment, refunded_payment, channel_post, group_message, my_chat_member, unparsed (logged with its update id and type), other).",
                &["kind"],
            ),
            handler_duration: metrics::histogram_vec(
                registry,
                "vpnbot_bot_handler_duration_seconds",
                "Time to handle one update, by handler (start, help, trial, buy, plan, pre_checkout, payment, refund, status, key, stats, diag, reconcile, refund_admin, unknown, ignored, ...; `timeout` and `panic` for handlers cut by the bound or a panic).",
                &["handler"],
                DURATION_BUCKETS_SECONDS,
            ),
            errors: metrics::counter_vec(
                registry,
                "vpnbot_bot_errors_total",
                &format!("Bot errors by kind: {}.", BotErrorKind::help_list()),
                &["kind"],
            ),
            polling_last_success: metrics::gauge(
                registry,
                "vpnbot_bot_polling_last_success_timestamp_seconds",
                "Unix time of the last getUpdates that succeeded (an empty long poll is a success).",
            ),
            api_requests: metrics::counter_vec(
                registry,
                "vpnbot_bot_api_requests_total",
                "Bot API requests by method and outcome (ok, retry_after, conflict, timeout, network, api_error, invalid_json, error).",
                &["method", "outcome"],
            ),
            payments: metrics::counter_vec(
                registry,
                "vpnbot_bot_payments_total",
                &format!("Payments by outcome: {}.", PaymentOutcome::help_list()),
                &["outcome"],
            ),
            refunds: metrics::counter_vec(
                registry,
                "vpnbot_bot_refunds_total",
                "Refunds of Telegram Stars payments by source (telegram: a refunded_payment message; admin: /refund confirmed by refundStarPayment) and outcome: shortened (the charge's days taken back, subscription still live), ended (nothing left: expired, key removal queued), not_credited (the payment never extended a live subscription), unknown_charge (no such payment recorded), duplicate (refund already recorded), failed (database error, not recorded), rejected (refundStarPayment refused by Telegram).",
                &["source", "outcome"],
            ),
            in_flight: metrics::int_gauge(
                registry,
                "vpnbot_bot_updates_in_flight",
                "Updates being handled now.",
            ),
            precheckout_answer: metrics::histogram(
                registry,
                "vpnbot_bot_precheckout_answer_seconds",
                "Time from receiving a pre_checkout_query in getUpdates to the end of its answerPreCheckoutQuery (Telegram cancels the payment after 10 s).",
                PRECHECKOUT_BUCKETS_SECONDS,
            ),
            queue_depth: metrics::int_gauge_vec(
                registry,
                "vpnbot_bot_update_queue_depth",
                "Updates fetched and waiting for a handler slot, by lane (ordinary; priority: pre-checkout queries and successful payments).",
                &["lane"],
            ),
            api_retries: metrics::counter_vec(
                registry,
                "vpnbot_bot_api_retries_total",
                "Bot API requests sent once more, by method and reason (not_acknowledged: failed before any byte was acknowledged, retried on a fresh connection).",
                &["method", "reason"],
            ),
            webhook_requests: metrics::counter_vec(
                registry,
                "vpnbot_bot_webhook_requests_total",
                &format!(
                    "Webhook requests received by this instance, by outcome: {}.",
                    WebhookOutcome::help_list()
                ),
                &["outcome"],
            ),
            webhook_in_flight: metrics::int_gauge(
                registry,
                "vpnbot_bot_webhook_in_flight",
                "Webhook requests being worked on now (bounded by telegram.webhook.max_in_flight).",
            ),
            webhook_handling: metrics::histogram(
                registry,
                "vpnbot_bot_webhook_handling_seconds",
                "Time from receiving a webhook request to answering it (claim, handler, mark handled), whatever the outcome.",
                DURATION_BUCKETS_SECONDS,
            ),
            dedup_deleted: metrics::counter(
                registry,
                "vpnbot_bot_update_dedup_deleted_total",
                "Update ids deleted from the deduplication table after telegram.dedup_retention_seconds.",
            ),
            receive_mode: metrics::int_gauge_vec(
                registry,
                "vpnbot_bot_receive_mode",
                "1 for how this instance receives updates (telegram.mode: polling, webhook), 0 for the other.",
                &["mode"],
            ),
            dedup_duplicates: metrics::counter(
                registry,
                "vpnbot_bot_update_duplicates_total",
                "Updates delivered again after they were handled (any receive mode), not handled again.",
            ),
            backpressure: {
                let c = Counter::with_opts(Opts::new(
                    "vpnbot_bot_receive_backpressure_seconds_total",
                    "Seconds the receive loop did not fetch updates because a lane's queue (bot.update_queue_capacity) was full.",
                ))
                .expect("valid counter opts");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric name");
                c
            },
        };
        for method in ["sendMessage", "sendPhoto"] {
            m.api_retries
                .with_label_values(&[method, "not_acknowledged"]);
        }
        for lane in ["ordinary", "priority"] {
            m.queue_depth.with_label_values(&[lane]);
        }
        // Every error kind and payment outcome at 0 from the start, so `increase()` sees the
        // first one and the series exist before anything went wrong.
        for kind in BotErrorKind::ALL {
            m.errors.with_label_values(&[kind.as_str()]);
        }
        for outcome in PaymentOutcome::ALL {
            m.payments.with_label_values(&[outcome.as_str()]);
        }
        for outcome in WebhookOutcome::ALL {
            m.webhook_requests.with_label_values(&[outcome.as_str()]);
        }
        for source in REFUND_SOURCES {
            for outcome in REFUND_OUTCOMES {
                m.refunds.with_label_values(&[source, outcome]);
            }
        }
        m
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: BotErrorKind) {
        self.errors.with_label_values(&[kind.as_str()]).inc();
    }

    /// Exports how updates arrive (`telegram.mode`): 1 for `webhook` or `polling`, 0 for
    /// the other.
    pub fn set_receive_mode(&self, webhook: bool) {
        self.receive_mode
            .with_label_values(&["webhook"])
            .set(i64::from(webhook));
        self.receive_mode
            .with_label_values(&["polling"])
            .set(i64::from(!webhook));
    }

    /// Counts one webhook request with `outcome`.
    pub fn webhook(&self, outcome: WebhookOutcome) {
        self.webhook_requests
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// Counts one payment with `outcome`.
    pub fn payment(&self, outcome: PaymentOutcome) {
        self.payments.with_label_values(&[outcome.as_str()]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_and_payment_outcome_is_exported_at_zero_and_in_the_help() {
        let registry = Registry::new();
        let _m = BotMetrics::register(&registry);
        let families = registry.gather();
        for (family, label, values) in [
            (
                "vpnbot_bot_errors_total",
                "kind",
                BotErrorKind::ALL
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>(),
            ),
            (
                "vpnbot_bot_payments_total",
                "outcome",
                PaymentOutcome::ALL.iter().map(|k| k.as_str()).collect(),
            ),
        ] {
            let f = families.iter().find(|f| f.name() == family).unwrap();
            for v in &values {
                assert!(
                    f.help().contains(&format!("{v} (")),
                    "{family} help lacks {v}"
                );
                assert!(
                    f.get_metric().iter().any(|m| m
                        .get_label()
                        .iter()
                        .any(|l| l.name() == label && l.value() == *v)),
                    "{family}{{{label}=\"{v}\"}} not exported at 0"
                );
            }
            let mut sorted = values.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), values.len(), "{family}: duplicate label");
        }
    }
}
