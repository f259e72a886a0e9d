//! Metric families of the bot. Every label comes from a fixed set in the code: never a chat id,
//! user id, payload or token.

use prometheus::{
    Counter, Gauge, Histogram, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
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
}

/// Buckets of `vpnbot_bot_precheckout_answer_seconds`: fine below Telegram's 10 s deadline.
const PRECHECKOUT_BUCKETS_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0,
];

/// Error kinds exported at 0 from start-up (the ones alerts use).
const ERROR_KINDS_ALWAYS_EXPORTED: [&str; 3] = ["conflict", "rate_limited", "unauthorized"];

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
                "Bot errors by kind (conflict, rate_limited, unauthorized (401: the token is revoked or wrong), poll_timeout, network, api, invalid_json, handler_timeout, db, node_pending, send_failed, panic).",
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
                "Payments by outcome: credited (first successful_payment of a charge), duplicate (a repeated one, not credited again), rejected (pre-checkout refused), failed (not recorded; retried by Telegram's redelivery or support), refunded_before_credit (the charge's refund was recorded first: recorded, not credited).",
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
        // Export the error kinds alerts watch (409 conflict, 429) at 0 from the start, so
        // `increase()` sees the first one and the series exist before anything went wrong.
        for kind in ERROR_KINDS_ALWAYS_EXPORTED {
            m.errors.with_label_values(&[kind]);
        }
        for source in REFUND_SOURCES {
            for outcome in REFUND_OUTCOMES {
                m.refunds.with_label_values(&[source, outcome]);
            }
        }
        m
    }

    /// Counts one error of `kind` (a fixed name).
    pub fn error(&self, kind: &'static str) {
        self.errors.with_label_values(&[kind]).inc();
    }
}
