//! The per-node client: one pooled `reqwest::Client`, phase deadlines, retries, breaker.

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use reqwest::header::{
    HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, LOCATION, RETRY_AFTER,
};
use reqwest::{Method, Response, Url};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use tracing::field::Empty;
use tracing::Instrument;

use super::breaker::{Breaker, BreakerState};
use super::error::{transport_detail, DecodeError, NodeError};
use super::inflight::{CallState, InflightCalls, Phase};
use super::metrics::{NodeApiMetrics, OpMetrics};
use super::settings::NodeClientSettings;
use super::wire::{self, HealthResponse, ListUsersResponse, MutationResponse, MutationResult};
use super::{NodeUser, Operation};

tokio::task_local! {
    /// The call whose future is being polled: lets the resolver and the connector layer,
    /// which reqwest calls from inside `execute`, report their phases to it.
    static CURRENT_CALL: Arc<CallState>;
}

/// A blocking name resolver, run on tokio's blocking pool under a per-node concurrency bound.
/// The default uses the system resolver (`getaddrinfo`); tests plug in one that hangs.
pub trait BlockingResolve: Send + Sync + std::fmt::Debug + 'static {
    /// Resolves `host` (no port) to addresses; the port is taken from the URL.
    fn resolve(&self, host: &str) -> std::io::Result<Vec<SocketAddr>>;
}

#[derive(Debug)]
struct SystemResolve;

impl BlockingResolve for SystemResolve {
    fn resolve(&self, host: &str) -> std::io::Result<Vec<SocketAddr>> {
        Ok((host, 0).to_socket_addrs()?.collect())
    }
}

/// reqwest resolver adapter: bounded concurrency, phase `resolve` reported to the call. A
/// look-up abandoned by its call keeps its permit until the blocking resolver returns, so hung
/// look-ups cannot pile up past `resolver_max_concurrent`: further calls fail fast instead.
#[derive(Debug)]
struct BoundedResolver {
    inner: Arc<dyn BlockingResolve>,
    permits: Arc<Semaphore>,
    max: usize,
}

impl reqwest::dns::Resolve for BoundedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let call = CURRENT_CALL.try_with(|c| c.clone()).ok();
        let permits = self.permits.clone();
        let inner = self.inner.clone();
        let max = self.max;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let span = match &call {
                Some(c) => {
                    c.set_phase(Phase::Resolve);
                    tracing::debug_span!(parent: &c.span, "resolve")
                }
                None => tracing::Span::none(),
            };
            let permit = permits.try_acquire_owned().map_err(|_| {
                format!("resolver saturated: {max} look-ups of this node still pending")
            })?;
            let res = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                inner.resolve(&host)
            })
            .instrument(span)
            .await;
            if let Some(c) = &call {
                c.set_phase(Phase::Connect);
            }
            let addrs = res??;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Connector layer: marks the attempt as using a new connection and times the `connect` phase.
#[derive(Debug, Clone)]
struct PhaseLayer;

impl<S> tower_layer::Layer<S> for PhaseLayer {
    type Service = PhaseService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PhaseService { inner }
    }
}

#[derive(Debug, Clone)]
struct PhaseService<S> {
    inner: S,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, R> tower_service::Service<R> for PhaseService<S>
where
    S: tower_service::Service<R>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFut<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let call = CURRENT_CALL.try_with(|c| c.clone()).ok();
        let span = match &call {
            Some(c) => {
                c.mark_connected();
                c.set_phase(Phase::Connect);
                tracing::debug_span!(parent: &c.span, "connect")
            }
            None => tracing::Span::none(),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.instrument(span).await;
            if let Some(c) = &call {
                c.set_phase(Phase::Headers);
            }
            r
        })
    }
}

#[derive(Debug)]
struct Limits {
    connect: Duration,
    headers: Duration,
    body_idle: Duration,
    total: Duration,
    body_max: u64,
    decode_inline_max: u64,
    retry_attempts: u32,
    retry_base: Duration,
    retry_cap: Duration,
}

struct Inner {
    name: Arc<str>,
    base: Url,
    host: String,
    port: u16,
    api_key: HeaderValue,
    http: reqwest::Client,
    limits: Limits,
    metrics: NodeApiMetrics,
    ops: [Arc<OpMetrics>; 5],
    inflight: InflightCalls,
    breaker: Breaker,
}

/// Client of one node's API. Cheap to clone (one shared connection pool per node).
///
/// Every call: fails fast while the node's breaker is open; runs under the total deadline;
/// retries errors worth retrying with jittered exponential backoff (honouring `Retry-After`)
/// while the deadline allows; absorbs one stale pooled connection per attempt; shows up in
/// [`InflightCalls`], in a `debug` `node.call` span with `debug`
/// `resolve`/`connect`/`headers`/`body`/`decode` children, and in the `vpnbot_node_api_*`
/// metrics. The spans are `debug` so that at the default log filter no layer enables them and
/// they cost a callsite-interest check each (a call's node, operation and current phase are in
/// [`InflightCalls`] and the dumps anyway; its failure and retry log lines name node and
/// operation themselves); the OTLP export's default filter enables them
/// (`crate::otel::DEFAULT_SPAN_FILTER`), so an exported trace still shows the call and its
/// phases.
#[derive(Clone)]
pub struct NodeClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClient")
            .field("name", &self.inner.name)
            .field("host", &self.inner.host)
            .field("port", &self.inner.port)
            .field("breaker", &self.inner.breaker.state())
            .finish_non_exhaustive()
    }
}

impl NodeClient {
    /// Builds the client of node `name` (a config name: it becomes the `node` label).
    ///
    /// `base_url` is the API root (`http://10.0.0.5:8080/` or with a path prefix). Credentials
    /// in it are refused, so that they cannot leak into logs; authentication is `api_key`.
    ///
    /// # Errors
    /// [`NodeError::Config`] when `settings` are invalid, the URL has credentials or a scheme
    /// other than http/https, the key is not a valid header value, or reqwest cannot build.
    pub fn new(
        name: &str,
        base_url: Url,
        api_key: SecretString,
        settings: &NodeClientSettings,
        metrics: NodeApiMetrics,
        inflight: InflightCalls,
    ) -> Result<Self, NodeError> {
        Self::with_resolver(
            name,
            base_url,
            api_key,
            settings,
            metrics,
            inflight,
            Arc::new(SystemResolve),
        )
    }

    /// As [`NodeClient::new`], with a custom blocking resolver (tests, or a pinned host map).
    ///
    /// # Errors
    /// As [`NodeClient::new`].
    pub fn with_resolver(
        name: &str,
        mut base_url: Url,
        api_key: SecretString,
        settings: &NodeClientSettings,
        metrics: NodeApiMetrics,
        inflight: InflightCalls,
        resolver: Arc<dyn BlockingResolve>,
    ) -> Result<Self, NodeError> {
        let problems = settings.validate();
        if !problems.is_empty() {
            return Err(NodeError::Config(problems.join("; ")));
        }
        if !base_url.username().is_empty() || base_url.password().is_some() {
            return Err(NodeError::Config(format!(
                "node {name}: credentials in the base URL are not supported (use the API key)"
            )));
        }
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(NodeError::Config(format!(
                "node {name}: base URL scheme must be http or https"
            )));
        }
        if base_url.query().is_some() || base_url.fragment().is_some() {
            return Err(NodeError::Config(format!(
                "node {name}: base URL must not have a query or fragment"
            )));
        }
        let host = base_url.host_str().unwrap_or_default().to_owned();
        let port = base_url.port_or_known_default().unwrap_or(80);
        // Paths of the contract are appended to the base path.
        let trimmed = base_url.path().trim_end_matches('/').to_owned();
        base_url.set_path(&trimmed);
        let mut api_key = HeaderValue::from_str(api_key.expose_secret()).map_err(|_| {
            NodeError::Config(format!("node {name}: API key is not a valid header value"))
        })?;
        api_key.set_sensitive(true);

        let max_resolve = settings.resolver_max_concurrent;
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout_seconds)
            .pool_idle_timeout(settings.pool_idle_timeout_seconds)
            .pool_max_idle_per_host(settings.pool_max_idle_per_node)
            .tcp_nodelay(true)
            // Node traffic goes straight to the node; an ambient HTTP(S)_PROXY would add a hop
            // with its own timeouts that these deadlines cannot see.
            .no_proxy()
            // Never follow a redirect: the API key would go wherever `Location` points and the
            // other host's answer would be read as this node's (a 3xx is a typed error instead).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("vpnbot/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(BoundedResolver {
                inner: resolver,
                permits: Arc::new(Semaphore::new(max_resolve)),
                max: max_resolve,
            }))
            .connector_layer(PhaseLayer)
            .build()
            .map_err(|e| NodeError::Config(format!("node {name}: {}", transport_detail(e))))?;

        let name: Arc<str> = Arc::from(name);
        inflight.register_node(&name);
        let ops = Operation::ALL.map(|op| Arc::new(metrics.for_op(&name, op)));
        let transitions = [
            BreakerState::Closed,
            BreakerState::HalfOpen,
            BreakerState::Open,
        ]
        .map(|s| {
            metrics
                .circuit_transitions
                .with_label_values(&[&name, s.as_str()])
        });
        let breaker = Breaker::new(
            name.clone(),
            settings.breaker_failure_threshold,
            settings.breaker_cooldown_seconds,
            metrics.circuit_state.with_label_values(&[&name]),
            transitions,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                name,
                base: base_url,
                host,
                port,
                api_key,
                http,
                limits: Limits {
                    connect: settings.connect_timeout_seconds,
                    headers: settings.headers_timeout_seconds,
                    body_idle: settings.body_idle_timeout_seconds,
                    total: settings.total_deadline_seconds,
                    body_max: settings.body_max_bytes,
                    decode_inline_max: settings.decode_inline_max_bytes,
                    retry_attempts: settings.retry_max_attempts,
                    retry_base: settings.retry_base_delay_seconds,
                    retry_cap: settings.retry_max_delay_seconds,
                },
                metrics,
                ops,
                inflight,
                breaker,
            }),
        })
    }

    /// The node's config name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The breaker's state now (an open breaker past its cooldown reads as half-open).
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// `health`: succeeds when the node answers `{"status":"ok"}`.
    ///
    /// # Errors
    /// Any [`NodeError`] variant but `Config`.
    pub async fn health(&self) -> Result<(), NodeError> {
        self.call(Operation::Health, self.url(wire::HEALTH_PATH), None, |b| {
            let h: HealthResponse = serde_json::from_slice(b)?;
            if h.status == "ok" {
                Ok(())
            } else {
                Err(DecodeError::NotOk(h.status))
            }
        })
        .await
    }

    /// `list-users`: every user on the node's inbound, owned or not.
    ///
    /// # Errors
    /// Any [`NodeError`] variant but `Config`; [`NodeError::Decode`] when any entry is not a
    /// UUID (the whole list is refused, so a caller never acts on a partial view).
    pub async fn list_users(&self) -> Result<Vec<NodeUser>, NodeError> {
        self.call(
            Operation::ListUsers,
            self.url(wire::USERS_PATH),
            None,
            |b| {
                serde_json::from_slice::<ListUsersResponse>(b)
                    .map(|r| r.users)
                    .map_err(DecodeError::from)
            },
        )
        .await
    }

    /// `add-user`: `created`, or `unchanged` when an identical user is present.
    ///
    /// # Errors
    /// Any [`NodeError`] variant but `Config`; [`NodeError::Status`] 409 when the UUID is
    /// present with another email.
    pub async fn add_user(&self, user: &NodeUser) -> Result<MutationResult, NodeError> {
        let body = user_body(user);
        self.call(
            Operation::AddUser,
            self.url(wire::USERS_PATH),
            Some(body),
            decode_mutation,
        )
        .await
    }

    /// `update-user`: replaces the email of a present user (`updated` or `unchanged`).
    ///
    /// # Errors
    /// Any [`NodeError`] variant but `Config`; [`NodeError::Status`] 404 when absent.
    pub async fn update_user(&self, user: &NodeUser) -> Result<MutationResult, NodeError> {
        let body = user_body(user);
        let url = self.url(&format!("{}/{}", wire::USERS_PATH, user.uuid));
        self.call(Operation::UpdateUser, url, Some(body), decode_mutation)
            .await
    }

    /// `remove-user`: `removed`, or `absent` when the node does not have it (a success, so a
    /// removal whose first answer was lost can be repeated).
    ///
    /// # Errors
    /// Any [`NodeError`] variant but `Config`.
    pub async fn remove_user(&self, uuid: uuid::Uuid) -> Result<MutationResult, NodeError> {
        let url = self.url(&format!("{}/{}", wire::USERS_PATH, uuid));
        self.call(Operation::RemoveUser, url, None, decode_mutation)
            .await
    }

    fn url(&self, path: &str) -> Url {
        let mut u = self.inner.base.clone();
        let full = format!("{}{}", u.path().trim_end_matches('/'), path);
        u.set_path(&full);
        u
    }

    async fn call<T: Send + 'static>(
        &self,
        op: Operation,
        url: Url,
        body: Option<Bytes>,
        decode: fn(&[u8]) -> Result<T, DecodeError>,
    ) -> Result<T, NodeError> {
        let inner = &*self.inner;
        // `debug`: at the default log filter nothing creates it (it cost 15-20 µs a call, the
        // fmt and open-span layers formatting its fields and tracking each enter/exit, measured
        // with `vpnbot-bench node-call-overhead`); the OTLP export's default filter
        // (`vpnbot::node::client=debug`) still exports it with its phase children. What the
        // span would tell a dump is in the in-flight registry (node, operation, phase, bytes),
        // and its log lines carry node and operation as fields of their own.
        let span = tracing::debug_span!(
            "node.call",
            node = %inner.name,
            operation = op.as_str(),
            http.request.method = wire::method(op),
            server.address = %inner.host,
            server.port = inner.port,
            http.response.status_code = Empty,
            http.response.body.size = Empty,
            error.type = Empty,
            node.attempts = Empty,
        );
        let started = Instant::now();
        let result = async {
            let permit = inner
                .breaker
                .acquire()
                .map_err(|retry_in| NodeError::CircuitOpen { retry_in })?;
            let guard = inner.inflight.begin(
                inner.name.clone(),
                op,
                inner.limits.total,
                inner.ops[op.index()].clone(),
                span.clone(),
            );
            let call = guard.state.clone();
            let deadline = tokio::time::Instant::now() + inner.limits.total;
            let attempts = CURRENT_CALL.scope(
                call.clone(),
                self.with_retries(
                    &call,
                    deadline,
                    Request {
                        op,
                        url: &url,
                        body: body.as_ref(),
                        decode,
                    },
                ),
            );
            let res = match tokio::time::timeout_at(deadline, attempts).await {
                Ok(r) => r,
                Err(_) => Err(NodeError::DeadlineExceeded {
                    phase: call.phase().as_str(),
                    after: inner.limits.total,
                }),
            };
            if let Err(e) = &res {
                inner.inflight.record_failure(&call, e);
            }
            let failure = res.as_ref().err().is_some_and(NodeError::is_node_failure);
            inner.breaker.record(permit, failure);
            drop(guard);
            res
        }
        .instrument(span.clone())
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        match &result {
            Ok(_) => inner.ops[op.index()].ok.observe(elapsed),
            Err(e) => {
                inner
                    .metrics
                    .request_duration
                    .with_label_values(&[&inner.name, op.as_str(), e.error_type()])
                    .observe(elapsed);
                inner
                    .metrics
                    .request_failures
                    .with_label_values(&[
                        &inner.name,
                        op.as_str(),
                        e.error_type(),
                        e.phase().unwrap_or("none"),
                    ])
                    .inc();
                span.record("error.type", e.error_type());
                // Inside the call's span when it exists, else under the caller's (its task).
                span.in_scope(|| {
                    tracing::warn!(
                        node = %inner.name,
                        operation = op.as_str(),
                        error.type = e.error_type(),
                        elapsed_s = elapsed,
                        "node call failed: {e}"
                    )
                });
            }
        }
        result
    }

    async fn with_retries<T: Send + 'static>(
        &self,
        call: &CallState,
        deadline: tokio::time::Instant,
        req: Request<'_, T>,
    ) -> Result<T, NodeError> {
        let inner = &*self.inner;
        let op = req.op;
        let attempt = || self.attempt_absorbing_stale(call, req);
        if !op.idempotent() || inner.limits.retry_attempts <= 1 {
            return attempt().await;
        }
        let backoff = ExponentialBuilder::default()
            .with_min_delay(inner.limits.retry_base)
            .with_max_delay(inner.limits.retry_cap)
            .with_max_times((inner.limits.retry_attempts - 1) as usize)
            .with_jitter();
        let res = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(NodeError::is_retryable)
            .adjust(|e, backoff| {
                let delay = match e {
                    NodeError::RateLimited {
                        retry_after: Some(ra),
                    } => backoff.map(|_| *ra),
                    _ => backoff,
                }?;
                // A wait that outlasts the deadline only delays the same answer: give up now
                // with the real error instead of a deadline error.
                (tokio::time::Instant::now() + delay < deadline).then_some(delay)
            })
            .notify(|e, delay| {
                inner
                    .metrics
                    .retries
                    .with_label_values(&[&inner.name, op.as_str(), e.error_type()])
                    .inc();
                call.set_phase(Phase::RetryWait);
                tracing::info!(
                    node = %inner.name,
                    operation = op.as_str(),
                    error.type = e.error_type(),
                    delay_ms = delay.as_millis() as u64,
                    "retrying node call: {e}"
                );
            })
            .await;
        res
    }

    async fn attempt_absorbing_stale<T: Send + 'static>(
        &self,
        call: &CallState,
        req: Request<'_, T>,
    ) -> Result<T, NodeError> {
        let inner = &*self.inner;
        let op = req.op;
        let mut absorbed = false;
        loop {
            match self.attempt(call, req).await {
                Err(NodeError::StaleConnection { detail }) if !absorbed && op.idempotent() => {
                    absorbed = true;
                    inner
                        .metrics
                        .retries
                        .with_label_values(&[&inner.name, op.as_str(), "stale_connection"])
                        .inc();
                    tracing::info!(
                        node = %inner.name,
                        operation = op.as_str(),
                        "pooled connection was stale, retrying on a fresh one: {detail}"
                    );
                }
                r => return r,
            }
        }
    }

    async fn attempt<T: Send + 'static>(
        &self,
        call: &CallState,
        req: Request<'_, T>,
    ) -> Result<T, NodeError> {
        let Request {
            op,
            url,
            body,
            decode,
        } = req;
        let inner = &*self.inner;
        call.begin_attempt();
        let method = match wire::method(op) {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            _ => Method::DELETE,
        };
        let mut req = reqwest::Request::new(method, url.clone());
        req.headers_mut()
            .insert(wire::API_KEY_HEADER, inner.api_key.clone());
        // No compression is decoded; say so, and refuse a body encoded anyway (see below).
        req.headers_mut()
            .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        if let Some(b) = body {
            req.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            *req.body_mut() = Some(b.clone().into());
        }
        let resp = self
            .await_headers(call, inner.http.execute(req))
            .instrument(tracing::debug_span!(parent: &call.span, "headers"))
            .await?;
        let status = resp.status();
        call.span
            .record("http.response.status_code", status.as_u16());
        if status.is_redirection() {
            return Err(NodeError::Redirect {
                status: status.as_u16(),
                location: redirect_origin(url, resp.headers()),
            });
        }
        if !status.is_success() {
            return Err(status_error(status.as_u16(), resp.headers()));
        }
        if let Some(encoding) = unrequested_encoding(resp.headers()) {
            return Err(NodeError::UnexpectedEncoding { encoding });
        }
        let body = self
            .read_body(call, resp)
            .instrument(tracing::debug_span!(parent: &call.span, "body"))
            .await?;
        let ops = &inner.ops[op.index()];
        ops.body_bytes.observe(body.len() as f64);
        call.span.record("http.response.body.size", body.len());
        call.set_phase(Phase::Decode);
        let decode_span = tracing::debug_span!(parent: &call.span, "decode", bytes = body.len());
        let decoded = if body.len() as u64 > inner.limits.decode_inline_max {
            // Off the runtime workers: a 64 MiB parse would block one for far longer than the
            // watchdog's stall threshold.
            let span = decode_span.clone();
            tokio::task::spawn_blocking(move || span.in_scope(|| decode(&body)))
                .await
                .unwrap_or(Err(DecodeError::Panicked))
        } else {
            decode_span.in_scope(|| decode(&body))
        };
        decoded.map_err(|e| NodeError::Decode {
            operation: op.as_str(),
            detail: e.to_string(),
        })
    }

    /// Awaits the response head. The headers deadline runs from the moment the request is on a
    /// connection (pooled, or fresh once connect finished); while resolving or connecting the
    /// connect deadline applies instead (reqwest enforces it; this is a backstop).
    async fn await_headers(
        &self,
        call: &CallState,
        fut: impl Future<Output = reqwest::Result<Response>>,
    ) -> Result<Response, NodeError> {
        let limits = &self.inner.limits;
        tokio::pin!(fut);
        loop {
            let (phase, since) = call.phase_and_since();
            let limit = match phase {
                Phase::Resolve | Phase::Connect => limits.connect + Duration::from_millis(250),
                _ => limits.headers,
            };
            tokio::select! {
                biased;
                r = &mut fut => return r.map_err(|e| classify_send_error(call, e)),
                _ = tokio::time::sleep_until((since + limit).into()) => {
                    if call.phase_and_since() == (phase, since) {
                        return Err(match phase {
                            Phase::Resolve | Phase::Connect => NodeError::Connect {
                                detail: format!("{} timed out after {limit:?}", phase.as_str()),
                            },
                            _ => NodeError::HeadersTimeout { after: limit },
                        });
                    }
                }
            }
        }
    }

    /// Streams the body under the idle timeout and the cap.
    async fn read_body(&self, call: &CallState, mut resp: Response) -> Result<Vec<u8>, NodeError> {
        let limits = &self.inner.limits;
        let cap = limits.body_max;
        let declared = resp.content_length();
        if declared.is_some_and(|n| n > cap) {
            return Err(NodeError::BodyTooLarge {
                limit: cap,
                declared,
            });
        }
        call.set_phase(Phase::Body);
        let mut buf = Vec::with_capacity(declared.unwrap_or(8 * 1024).min(cap) as usize);
        loop {
            match tokio::time::timeout(limits.body_idle, resp.chunk()).await {
                Err(_) => {
                    return Err(NodeError::BodyTimeout {
                        idle: limits.body_idle,
                        received: buf.len() as u64,
                    })
                }
                Ok(Err(e)) => {
                    return Err(NodeError::BodyIncomplete {
                        received: buf.len() as u64,
                        expected: declared,
                        detail: transport_detail(e),
                    })
                }
                Ok(Ok(None)) => return Ok(buf),
                Ok(Ok(Some(chunk))) => {
                    if (buf.len() + chunk.len()) as u64 > cap {
                        return Err(NodeError::BodyTooLarge {
                            limit: cap,
                            declared,
                        });
                    }
                    buf.extend_from_slice(&chunk);
                    call.add_bytes(chunk.len() as u64);
                }
            }
        }
    }
}

fn user_body(user: &NodeUser) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&wire::UserBody {
            uuid: user.uuid,
            email: user.email.clone(),
        })
        .expect("serializing a user cannot fail"),
    )
}

fn decode_mutation(b: &[u8]) -> Result<MutationResult, DecodeError> {
    Ok(serde_json::from_slice::<MutationResponse>(b)?.result)
}

/// The origin (`scheme://host:port`) a redirect points to, resolved against the request URL;
/// never its path or query, which may carry anything.
/// What every attempt of one call sends, and how its body is decoded.
struct Request<'a, T> {
    op: Operation,
    url: &'a Url,
    body: Option<&'a Bytes>,
    decode: fn(&[u8]) -> Result<T, DecodeError>,
}

// By hand: a derive would require `T: Copy`, but only a function pointer to `T` is held.
impl<T> Clone for Request<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Request<'_, T> {}

fn redirect_origin(url: &Url, headers: &reqwest::header::HeaderMap) -> String {
    let Some(location) = headers.get(LOCATION) else {
        return "(no Location)".to_owned();
    };
    location
        .to_str()
        .ok()
        .and_then(|l| url.join(l).ok())
        .map(|u| u.origin().ascii_serialization())
        .filter(|o| o != "null")
        .unwrap_or_else(|| "(unparsable Location)".to_owned())
}

/// A `Content-Encoding` other than `identity`, sanitised for an error message: printable
/// ASCII only, at most 32 characters.
fn unrequested_encoding(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let v = headers.get(CONTENT_ENCODING)?;
    let raw = String::from_utf8_lossy(v.as_bytes());
    let t = raw.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("identity") {
        return None;
    }
    Some(
        t.chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(32)
            .collect(),
    )
}

fn status_error(status: u16, headers: &reqwest::header::HeaderMap) -> NodeError {
    match status {
        401 | 403 => NodeError::AuthRejected { status },
        429 => NodeError::RateLimited {
            retry_after: headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        },
        status => NodeError::Status { status },
    }
}

/// Maps an error of `execute` (before the response head). A closed or reset connection that
/// this attempt did not open itself came from the pool: the idle keep-alive race.
fn classify_send_error(call: &CallState, e: reqwest::Error) -> NodeError {
    if e.is_connect() {
        return NodeError::Connect {
            detail: transport_detail(e),
        };
    }
    let closed = is_closed_or_reset(&e);
    let detail = transport_detail(e);
    if closed && !call.connected_this_attempt() {
        NodeError::StaleConnection { detail }
    } else {
        NodeError::ConnectionLost { detail }
    }
}

fn is_closed_or_reset(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
