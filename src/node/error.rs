//! The one error type of the node API boundary.

use std::time::Duration;

/// Every way a node API call can fail. Each variant maps to one bounded `error.type` label value
/// ([`NodeError::error_type`]). No variant carries the API key or a URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// Name resolution or TCP connect failed or timed out (incl. "connection refused" and a
    /// saturated resolver).
    #[error("connect to node failed: {detail}")]
    Connect {
        /// What failed, without the URL.
        detail: String,
    },
    /// The request was sent but no response head arrived within the headers deadline.
    #[error("no response headers within {after:?}")]
    HeadersTimeout {
        /// The headers deadline that elapsed.
        after: Duration,
    },
    /// Headers arrived, then no body byte for the body idle timeout.
    #[error("response body stalled: no byte for {idle:?} after {received} bytes")]
    BodyTimeout {
        /// The idle timeout that elapsed.
        idle: Duration,
        /// Body bytes received before the stall.
        received: u64,
    },
    /// The total deadline of the call (retries included) elapsed; `phase` is where it was.
    #[error("total deadline {after:?} exceeded in phase {phase}")]
    DeadlineExceeded {
        /// Phase the call was in: `resolve`, `connect`, `headers`, `body`, `decode`, `retry_wait`.
        phase: &'static str,
        /// The total deadline.
        after: Duration,
    },
    /// The body is larger than the cap: announced by `Content-Length`, or streamed past it.
    #[error("response body larger than the cap of {limit} bytes (declared: {declared:?})")]
    BodyTooLarge {
        /// The configured cap, bytes.
        limit: u64,
        /// The `Content-Length`, when the node sent one.
        declared: Option<u64>,
    },
    /// The connection ended before the whole body arrived (short body, reset mid-body).
    #[error("response body incomplete after {received} bytes (expected {expected:?}): {detail}")]
    BodyIncomplete {
        /// Bytes received.
        received: u64,
        /// `Content-Length`, when known.
        expected: Option<u64>,
        /// Transport error, without the URL.
        detail: String,
    },
    /// The connection closed or was reset after the request was sent on a fresh connection,
    /// before the response head arrived.
    #[error("connection lost before response headers: {detail}")]
    ConnectionLost {
        /// Transport error, without the URL.
        detail: String,
    },
    /// A pooled keep-alive connection turned out to be closed by the node (the idle keep-alive
    /// race). Retried once on a fresh connection; surfaces only if that retry also hit it.
    #[error("pooled connection was closed by the node: {detail}")]
    StaleConnection {
        /// Transport error, without the URL.
        detail: String,
    },
    /// A non-success status other than 401, 403 and 429.
    #[error("node answered HTTP {status}")]
    Status {
        /// The HTTP status code.
        status: u16,
    },
    /// A redirect (3xx). Redirects are never followed: the API key would go wherever
    /// `Location` points, and another host's answer would be taken as this node's. `location`
    /// is the target's origin only (`scheme://host:port`), so no path or query leaks.
    #[error(
        "node answered a redirect (HTTP {status}) to {location}; redirects are never followed"
    )]
    Redirect {
        /// The 3xx status code.
        status: u16,
        /// Origin of the `Location` header, or `(none)` / `(unparsable)`.
        location: String,
    },
    /// The body came with a `Content-Encoding` vpnbot did not ask for (it sends
    /// `Accept-Encoding: identity` and decodes no compression), e.g. a proxy that gzips anyway.
    #[error("node sent a body with Content-Encoding {encoding:?}, which was not requested (only identity is accepted)")]
    UnexpectedEncoding {
        /// The header value, sanitised (printable ASCII, at most 32 characters).
        encoding: String,
    },
    /// 429 Too Many Requests.
    #[error("node rate-limited the call (retry after {retry_after:?})")]
    RateLimited {
        /// The parsed `Retry-After`, when present (seconds form).
        retry_after: Option<Duration>,
    },
    /// 401 or 403: the API key was rejected. Never retried. The key is never shown.
    #[error("node rejected the API key (HTTP {status})")]
    AuthRejected {
        /// 401 or 403.
        status: u16,
    },
    /// A 2xx body that is not the contract's JSON: malformed, wrong schema, non-UUID entries.
    #[error("cannot decode the {operation} response: {detail}")]
    Decode {
        /// The operation whose response failed to decode (its label value).
        operation: &'static str,
        /// The decoder's message (position and reason).
        detail: String,
    },
    /// The node's circuit breaker is open: the call failed fast without touching the network.
    #[error("circuit breaker open for this node; next probe in {retry_in:?}")]
    CircuitOpen {
        /// Time until the breaker lets a half-open probe through (zero while a probe runs).
        retry_in: Duration,
    },
    /// The client could not be built (bad settings or base URL).
    #[error("invalid node client configuration: {0}")]
    Config(String),
}

/// Why a 2xx body could not be decoded (its Display becomes [`NodeError::Decode`]'s `detail`).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not the contract's JSON (malformed, wrong schema, non-UUID entries).
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// `health` answered a status other than `ok`.
    #[error("status is {0:?}, not \"ok\"")]
    NotOk(String),
    /// The decoder panicked on its blocking thread.
    #[error("decoder panicked")]
    Panicked,
}

impl NodeError {
    /// The bounded `error.type` / `outcome` label value of this error.
    pub fn error_type(&self) -> &'static str {
        match self {
            NodeError::Connect { .. } => "connect",
            NodeError::HeadersTimeout { .. } => "headers_timeout",
            NodeError::BodyTimeout { .. } => "body_timeout",
            NodeError::DeadlineExceeded { .. } => "deadline_exceeded",
            NodeError::BodyTooLarge { .. } => "body_too_large",
            NodeError::BodyIncomplete { .. } => "body_incomplete",
            NodeError::ConnectionLost { .. } => "connection_lost",
            NodeError::StaleConnection { .. } => "stale_connection",
            NodeError::Status { status } if *status >= 500 => "http_5xx",
            NodeError::Status { .. } => "http_4xx",
            NodeError::RateLimited { .. } => "rate_limited",
            NodeError::Redirect { .. } => "redirect",
            NodeError::UnexpectedEncoding { .. } => "content_encoding",
            NodeError::AuthRejected { .. } => "auth_rejected",
            NodeError::Decode { .. } => "decode",
            NodeError::CircuitOpen { .. } => "circuit_open",
            NodeError::Config(_) => "config",
        }
    }

    /// The phase the failure belongs to, when it has one (`connect`, `headers`, `body`, ...).
    pub fn phase(&self) -> Option<&'static str> {
        match self {
            NodeError::Connect { .. } => Some("connect"),
            NodeError::HeadersTimeout { .. }
            | NodeError::ConnectionLost { .. }
            | NodeError::StaleConnection { .. }
            | NodeError::Status { .. }
            | NodeError::RateLimited { .. }
            | NodeError::Redirect { .. }
            | NodeError::UnexpectedEncoding { .. }
            | NodeError::AuthRejected { .. } => Some("headers"),
            NodeError::BodyTimeout { .. }
            | NodeError::BodyTooLarge { .. }
            | NodeError::BodyIncomplete { .. } => Some("body"),
            NodeError::DeadlineExceeded { phase, .. } => Some(phase),
            NodeError::Decode { .. } => Some("decode"),
            NodeError::CircuitOpen { .. } | NodeError::Config(_) => None,
        }
    }

    /// Whether repeating an idempotent call after this error may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            NodeError::Connect { .. }
            | NodeError::HeadersTimeout { .. }
            | NodeError::BodyTimeout { .. }
            | NodeError::BodyIncomplete { .. }
            | NodeError::ConnectionLost { .. }
            | NodeError::StaleConnection { .. }
            | NodeError::RateLimited { .. } => true,
            NodeError::Status { status } => matches!(status, 500 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// Whether this outcome counts as a node failure for the circuit breaker. An unknown outcome
    /// (timeout, lost connection) is a failure; a rejected key or a 4xx shows the node is up.
    pub(crate) fn is_node_failure(&self) -> bool {
        match self {
            NodeError::AuthRejected { .. }
            | NodeError::Redirect { .. }
            | NodeError::UnexpectedEncoding { .. }
            | NodeError::CircuitOpen { .. }
            | NodeError::Config(_) => false,
            NodeError::Status { status } => *status >= 500,
            _ => true,
        }
    }
}

/// Error text of a reqwest error with the URL removed and its cause chain joined.
pub(crate) fn transport_detail(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
