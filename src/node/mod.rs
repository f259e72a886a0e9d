//! Client of the node API: the HTTP API each VPN node runs in front of its Xray core.
//!
//! Every call is bounded (connect, headers, body-idle and total deadlines, a body cap),
//! protected (jittered retries for calls safe to repeat, a per-node circuit breaker) and
//! visible (a span per call with child spans per phase, Prometheus metrics, and a registry of
//! in-flight calls readable from any thread). The contract is `openapi/node-api.json`.
//!
//! The predecessor froze for 11 minutes after `GET .../list-users 200 OK`: headers arrived,
//! the body never did, and a per-read timeout never fired. Here the body phase has its own idle
//! timeout and the total deadline covers resolution, connect, headers, body and decoding.

mod breaker;
mod client;
mod error;
mod inflight;
mod metrics;
mod settings;
pub mod wire;

pub use breaker::BreakerState;
pub use client::{BlockingResolve, NodeClient};
pub use error::{DecodeError, NodeError};
pub use inflight::{
    InflightCall, InflightCalls, Phase, RecentFailure, RECENT_FAILURES_PER_OPERATION,
};
pub use metrics::NodeApiMetrics;
pub use settings::*;

pub use node_api::{
    legacy_owned_email, looks_owned, marker_matches, owned_email, NodeUser, Operation,
    LEGACY_OWNED_EMAIL_PREFIX, OWNED_EMAIL_PREFIX,
};
