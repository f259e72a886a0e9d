//! Metric families of the node API client.

use prometheus::{Histogram, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use super::inflight::Phase;
use super::Operation;
use crate::metrics::{
    counter_vec, histogram_vec, int_gauge_vec, BODY_BUCKETS_BYTES, DURATION_BUCKETS_SECONDS,
};

/// The node API client's metric families, registered once per registry and shared (cheap
/// clone) by every node's client. Label sets are bounded: `node` comes from config,
/// `operation`, `phase`, `outcome` and `reason` from fixed sets.
#[derive(Debug, Clone)]
pub struct NodeApiMetrics {
    /// `vpnbot_node_api_request_duration_seconds{node,operation,outcome}`: whole calls,
    /// retries included; `outcome` is `ok` or an `error.type` value.
    pub request_duration: HistogramVec,
    /// `vpnbot_node_api_request_failures_total{node,operation,outcome,phase}`: failed calls by
    /// `error.type` and the phase the call was in when it failed (for `deadline_exceeded`, the
    /// phase the deadline caught it in), so an alert can say "list_users timed out in body".
    /// `phase` is a [`Phase`] label value or `none` (breaker open, bad config).
    pub request_failures: IntCounterVec,
    /// `vpnbot_node_api_phase_duration_seconds{node,operation,phase}`.
    pub phase_duration: HistogramVec,
    /// `vpnbot_node_api_inflight_requests{node,operation,phase}`.
    pub inflight: IntGaugeVec,
    /// `vpnbot_node_api_response_body_bytes{node,operation}`.
    pub body_bytes: HistogramVec,
    /// `vpnbot_node_api_retries_total{node,operation,reason}`; `reason` is the `error.type` of
    /// the attempt that was retried (`stale_connection` for the keep-alive race).
    pub retries: IntCounterVec,
    /// `vpnbot_node_api_circuit_state{node}`: 0 closed, 1 half-open, 2 open.
    pub circuit_state: IntGaugeVec,
    /// `vpnbot_node_api_circuit_transitions_total{node,state}`: breaker state changes by the
    /// state entered.
    pub circuit_transitions: IntCounterVec,
}

impl NodeApiMetrics {
    /// Registers the families into `registry`.
    ///
    /// # Panics
    /// When called twice on the same registry (duplicate metric names).
    pub fn register(registry: &Registry) -> Self {
        Self {
            request_duration: histogram_vec(
                registry,
                "vpnbot_node_api_request_duration_seconds",
                "Duration of node API calls, retries included, by outcome (ok or error.type).",
                &["node", "operation", "outcome"],
                DURATION_BUCKETS_SECONDS,
            ),
            request_failures: counter_vec(
                registry,
                "vpnbot_node_api_request_failures_total",
                "Failed node API calls by outcome (error.type) and the phase the call was in when it failed.",
                &["node", "operation", "outcome", "phase"],
            ),
            phase_duration: histogram_vec(
                registry,
                "vpnbot_node_api_phase_duration_seconds",
                "Time node API calls spent per phase (resolve, connect, headers, body, decode, retry_wait).",
                &["node", "operation", "phase"],
                DURATION_BUCKETS_SECONDS,
            ),
            inflight: int_gauge_vec(
                registry,
                "vpnbot_node_api_inflight_requests",
                "Node API calls in flight, by the phase they are in now.",
                &["node", "operation", "phase"],
            ),
            body_bytes: histogram_vec(
                registry,
                "vpnbot_node_api_response_body_bytes",
                "Size of node API response bodies received in full.",
                &["node", "operation"],
                BODY_BUCKETS_BYTES,
            ),
            retries: counter_vec(
                registry,
                "vpnbot_node_api_retries_total",
                "Node API attempts retried, by the error.type of the failed attempt.",
                &["node", "operation", "reason"],
            ),
            circuit_state: int_gauge_vec(
                registry,
                "vpnbot_node_api_circuit_state",
                "Circuit breaker state per node: 0 closed, 1 half-open, 2 open.",
                &["node"],
            ),
            circuit_transitions: counter_vec(
                registry,
                "vpnbot_node_api_circuit_transitions_total",
                "Circuit breaker state changes per node, by the state entered.",
                &["node", "state"],
            ),
        }
    }

    /// Children resolved once per (node, operation) so the hot path does no label lookups.
    pub(crate) fn for_op(&self, node: &str, op: Operation) -> OpMetrics {
        let o = op.as_str();
        // Export the timeout outcomes at 0 from the start: a series born at 1 shows no
        // `increase()`, so the first stuck call would never page (alerts/vpnbot.rules.yml).
        for outcome in OUTCOMES_EXPORTED_AT_START {
            self.request_duration.with_label_values(&[node, o, outcome]);
        }
        for phase in Phase::ALL {
            self.request_failures.with_label_values(&[
                node,
                o,
                "deadline_exceeded",
                phase.as_str(),
            ]);
        }
        self.request_failures
            .with_label_values(&[node, o, "body_timeout", "body"]);
        self.request_failures
            .with_label_values(&[node, o, "headers_timeout", "headers"]);
        OpMetrics {
            inflight: Phase::ALL.map(|p| self.inflight.with_label_values(&[node, o, p.as_str()])),
            phase: Phase::ALL.map(|p| {
                self.phase_duration
                    .with_label_values(&[node, o, p.as_str()])
            }),
            ok: self.request_duration.with_label_values(&[node, o, "ok"]),
            body_bytes: self.body_bytes.with_label_values(&[node, o]),
        }
    }
}

/// `outcome` values alerts watch, exported at 0 for every (node, operation) from the start.
const OUTCOMES_EXPORTED_AT_START: [&str; 3] =
    ["deadline_exceeded", "body_timeout", "headers_timeout"];

/// Pre-resolved metric children of one (node, operation).
#[derive(Debug)]
pub(crate) struct OpMetrics {
    pub(crate) inflight: [IntGauge; Phase::COUNT],
    pub(crate) phase: [Histogram; Phase::COUNT],
    pub(crate) ok: Histogram,
    pub(crate) body_bytes: Histogram,
}
