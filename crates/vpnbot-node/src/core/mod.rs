//! The proxy core behind the agent, driven through its gRPC `HandlerService`.
//!
//! Two flavours behind one type ([`Core`]): V2Ray 4.x (`AlterInbound` only, no way to read users
//! back) and Xray-core ≥ 24.11 (also `GetInboundUsers`). Every call has a deadline (the gRPC
//! `grpc-timeout` header plus a local timer, so a core that accepts TCP and never answers still
//! fails on time) and is observed in `vpnbot_node_core_request_duration_seconds`.
//!
//! Both cores answer every failure with gRPC `UNKNOWN` and a text; [`classify`] maps the texts
//! checked against V2Ray 4.34 (see the repository's notes) onto [`CoreError`].

use std::time::{Duration, Instant};

use prost::Message;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use crate::config::CoreKind;
use crate::metrics::Metrics;
use crate::proto::{v2ray, xray};

/// A failed core call, typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// Add: the email is already on the inbound (`User x already exists.`).
    #[error("the core already has this user")]
    AlreadyExists,
    /// Remove: no such email on the inbound (`User x not found.`).
    #[error("the core does not have this user")]
    NotFound,
    /// The core refused the user itself (`invalid UUID`, `Email must not be empty.`, ...).
    #[error("the core rejected the user: {0}")]
    Rejected(String),
    /// The inbound tag does not exist, or is not a VLESS inbound (`handler not found`,
    /// `proxy is not a UserManager`): a configuration error on the node.
    #[error("inbound misconfigured: {0}")]
    Inbound(String),
    /// The core's API is not reachable (connection refused or reset, core restarting).
    #[error("core unreachable: {0}")]
    Unavailable(String),
    /// No answer within the deadline (a hung core).
    #[error("core did not answer within {0:?}")]
    Timeout(Duration),
    /// Anything else the core said.
    #[error("core error: {0}")]
    Other(String),
}

impl CoreError {
    /// Bounded label value of the `outcome` label.
    pub fn outcome(&self) -> &'static str {
        match self {
            CoreError::AlreadyExists => "already_exists",
            CoreError::NotFound => "not_found",
            CoreError::Rejected(_) => "rejected",
            CoreError::Inbound(_) => "inbound_misconfigured",
            CoreError::Unavailable(_) => "unavailable",
            CoreError::Timeout(_) => "timeout",
            CoreError::Other(_) => "error",
        }
    }

    /// Whether the core is down or hung (as opposed to having answered).
    pub fn is_transient(&self) -> bool {
        matches!(self, CoreError::Unavailable(_) | CoreError::Timeout(_))
    }
}

/// Maps a gRPC status from the core onto a [`CoreError`]. The texts are V2Ray 4.34's (Xray's
/// are the same wording): every application error comes back as `UNKNOWN`.
pub fn classify(status: &tonic::Status) -> CoreError {
    use tonic::Code;
    let msg = status.message();
    let lower = msg.to_ascii_lowercase();
    // A connect that timed out: the core accepted TCP (or nothing answered) and hung.
    let timed_out = lower.contains("timed out") || lower.contains("timeout");
    match status.code() {
        Code::Unavailable | Code::Unknown if timed_out => {
            return CoreError::Timeout(Duration::ZERO)
        }
        Code::Unavailable | Code::Cancelled => return CoreError::Unavailable(msg.to_owned()),
        Code::DeadlineExceeded => return CoreError::Timeout(Duration::ZERO),
        _ => {}
    }
    if lower.contains("failed to get handler")
        || lower.contains("handler not found")
        || lower.contains("not a usermanager")
    {
        CoreError::Inbound(msg.to_owned())
    } else if lower.contains("already exists") {
        CoreError::AlreadyExists
    } else if lower.contains("not found") {
        CoreError::NotFound
    } else if lower.contains("invalid uuid")
        || lower.contains("failed to parse")
        || lower.contains("must not be empty")
    {
        CoreError::Rejected(msg.to_owned())
    } else {
        CoreError::Other(format!("{:?}: {msg}", status.code()))
    }
}

/// A user as the core lists it (Xray only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreUser {
    /// The VLESS id (a string in the core; not necessarily a UUID for users added by hand).
    pub id: String,
    /// The email/tag.
    pub email: String,
}

/// The core client of one flavour. Cloning is cheap (one multiplexed HTTP/2 channel).
#[derive(Debug, Clone)]
pub struct Core {
    kind: CoreKind,
    channel: Channel,
    tag: String,
    level: u32,
    timeout: Duration,
    metrics: Metrics,
}

/// Largest gRPC message the agent decodes from the core: `GetInboundUsers` answers every user
/// in one message (about 100 bytes per user: 100,000 users ≈ 10 MB), beyond gRPC's 4 MiB default.
pub const MAX_CORE_MESSAGE: usize = 256 * 1024 * 1024;

/// `HandlerService.AlterInbound` with one operation, for either flavour: V2Ray's and Xray's
/// generated modules differ only by package (`v2ray.core.` vs `xray.`), so one body serves both.
macro_rules! alter_inbound {
    ($self:ident, $operation:ident, $($m:ident)::+, $pkg:literal, $op_name:literal, $op:expr) => {{
        use $($m)::+::app::proxyman::command as c;
        let req = c::AlterInboundRequest {
            tag: $self.tag.clone(),
            operation: Some($($m)::+::common::serial::TypedMessage {
                r#type: concat!($pkg, "app.proxyman.command.", $op_name).into(),
                value: $op.encode_to_vec(),
            }),
        };
        let mut client = c::handler_service_client::HandlerServiceClient::new($self.channel.clone())
            .max_decoding_message_size(MAX_CORE_MESSAGE);
        $self
            .timed($operation, client.alter_inbound($self.request(req)))
            .await
            .map(|_| ())
    }};
}

/// `AddUserOperation` of a VLESS user (see `alter_inbound!`).
macro_rules! add_user {
    ($self:ident, $operation:ident, $id:ident, $email:ident, $($m:ident)::+, $pkg:literal) => {{
        let account = $($m)::+::proxy::vless::Account {
            id: $id,
            flow: String::new(),
            encryption: "none".into(),
        };
        let op = $($m)::+::app::proxyman::command::AddUserOperation {
            user: Some($($m)::+::common::protocol::User {
                level: $self.level,
                email: $email.to_owned(),
                account: Some($($m)::+::common::serial::TypedMessage {
                    r#type: concat!($pkg, "proxy.vless.Account").into(),
                    value: account.encode_to_vec(),
                }),
            }),
        };
        alter_inbound!($self, $operation, $($m)::+, $pkg, "AddUserOperation", op)
    }};
}

/// `RemoveUserOperation` by email (see `alter_inbound!`).
macro_rules! remove_user {
    ($self:ident, $operation:ident, $email:ident, $($m:ident)::+, $pkg:literal) => {{
        let op = $($m)::+::app::proxyman::command::RemoveUserOperation {
            email: $email.to_owned(),
        };
        alter_inbound!($self, $operation, $($m)::+, $pkg, "RemoveUserOperation", op)
    }};
}

/// `core_api` is not a `host:port` the gRPC client can use.
#[derive(Debug, thiserror::Error)]
#[error("core_api {addr:?}: {source}")]
pub struct InvalidCoreAddress {
    /// The address as configured.
    pub addr: String,
    /// Why tonic refused it.
    source: tonic::transport::Error,
}

impl Core {
    /// A client of the core at `addr` (`host:port`, plaintext gRPC). Connects lazily: a core
    /// that is down at start makes calls fail with [`CoreError::Unavailable`], not the agent.
    ///
    /// # Errors
    /// `addr` is not a valid address.
    pub fn new(
        kind: CoreKind,
        addr: &str,
        tag: &str,
        level: u32,
        timeout: Duration,
        metrics: Metrics,
    ) -> Result<Core, InvalidCoreAddress> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| InvalidCoreAddress {
                addr: addr.to_owned(),
                source,
            })?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
        Ok(Core {
            kind,
            channel: endpoint.connect_lazy(),
            tag: tag.to_owned(),
            level,
            timeout,
            metrics,
        })
    }

    /// The flavour.
    pub fn kind(&self) -> CoreKind {
        self.kind
    }

    /// Whether the core can list its users (Xray).
    pub fn can_list(&self) -> bool {
        self.kind == CoreKind::Xray
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        fut: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, CoreError> {
        let start = Instant::now();
        let r = match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(CoreError::Timeout(self.timeout)),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(s)) => Err(match classify(&s) {
                CoreError::Unavailable(m) if start.elapsed() >= self.timeout => {
                    tracing::debug!(message = %m, "core call failed at its deadline");
                    CoreError::Timeout(self.timeout)
                }
                CoreError::Timeout(_) => CoreError::Timeout(self.timeout),
                // A transport failure surfaces as UNKNOWN with "transport error" in tonic.
                CoreError::Other(m) if m.contains("transport error") => CoreError::Unavailable(m),
                e => e,
            }),
        };
        let outcome = match &r {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.metrics
            .core_duration
            .with_label_values(&[operation, outcome])
            .observe(start.elapsed().as_secs_f64());
        r
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    /// Adds a VLESS user. `operation` is the metric label (`add_user`, `resync_add`, `probe`).
    ///
    /// # Errors
    /// [`CoreError::AlreadyExists`] when the email is on the inbound; any other variant.
    pub async fn add_user(
        &self,
        operation: &'static str,
        id: Uuid,
        email: &str,
    ) -> Result<(), CoreError> {
        let id = id.hyphenated().to_string();
        match self.kind {
            CoreKind::V2ray => add_user!(self, operation, id, email, v2ray::core, "v2ray.core."),
            CoreKind::Xray => add_user!(self, operation, id, email, xray, "xray."),
        }
    }

    /// Removes the user with `email`.
    ///
    /// # Errors
    /// [`CoreError::NotFound`] when absent; any other variant.
    pub async fn remove_user(&self, operation: &'static str, email: &str) -> Result<(), CoreError> {
        match self.kind {
            CoreKind::V2ray => remove_user!(self, operation, email, v2ray::core, "v2ray.core."),
            CoreKind::Xray => remove_user!(self, operation, email, xray, "xray."),
        }
    }

    /// Every user on the inbound (Xray `GetInboundUsers` with an empty email); `None` for V2Ray,
    /// which cannot list.
    ///
    /// # Errors
    /// Any [`CoreError`].
    pub async fn list_users(&self) -> Option<Result<Vec<CoreUser>, CoreError>> {
        if self.kind != CoreKind::Xray {
            return None;
        }
        use xray::app::proxyman::command as c;
        let mut client = c::handler_service_client::HandlerServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_CORE_MESSAGE);
        let req = c::GetInboundUserRequest {
            tag: self.tag.clone(),
            email: String::new(),
        };
        let r = self
            .timed("list_users", client.get_inbound_users(self.request(req)))
            .await;
        Some(r.map(|resp| {
            resp.into_inner()
                .users
                .into_iter()
                .map(|u| {
                    let id = u
                        .account
                        .and_then(|a| xray::proxy::vless::Account::decode(a.value.as_slice()).ok())
                        .map(|a| a.id)
                        .unwrap_or_default();
                    CoreUser { id, email: u.email }
                })
                .collect()
        }))
    }
}
