//! The observability HTTP server: axum on its own OS thread with its own current-thread tokio
//! runtime, never on the main runtime, so `/metrics`, `/healthz` and `/debug/dump` keep
//! answering while the main runtime is stalled (the pattern of console-subscriber's server
//! thread and linkerd2-proxy's admin server).
//!
//! The debug endpoints (`/debug/*`) can be split onto a listener of their own or put behind a
//! bearer token ([`DebugPlacement`]); `/metrics`, `/healthz` and `/readyz` stay on the scrape
//! listener.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::health::HealthState;

/// Everything the handlers read.
#[derive(Debug, Clone)]
pub struct ObsState {
    /// The one registry every subsystem registers into.
    pub registry: Registry,
    /// Health sources.
    pub health: Arc<HealthState>,
}

/// Who may read the debug endpoints (`/debug/*`) on one listener.
#[derive(Clone)]
pub enum DebugAccess {
    /// Not routed: `/debug/*` answers 404.
    Off,
    /// Anyone who reaches the listener (use on loopback only).
    Open,
    /// Requests carrying `Authorization: Bearer <token>`; others get 401.
    Bearer(Arc<SecretString>),
}

impl std::fmt::Debug for DebugAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DebugAccess::Off => "Off",
            DebugAccess::Open => "Open",
            DebugAccess::Bearer(_) => "Bearer([REDACTED])",
        })
    }
}

/// Where the debug endpoints are served: on the scrape listener, on a listener of their own, or
/// nowhere. `/metrics`, `/healthz` and `/readyz` are always on the scrape listener only.
#[derive(Debug, Clone)]
pub struct DebugPlacement {
    /// Access to `/debug/*` on the scrape listener (`observability.listen`).
    pub on_scrape_listener: DebugAccess,
    /// A listener of their own (`observability.debug_listen`) and its access.
    pub own_listener: Option<(SocketAddr, DebugAccess)>,
}

impl DebugPlacement {
    /// The policy of `observability.debug_listen` and `observability.debug_token`:
    /// - `debug_listen` set: `/debug/*` there only (with the token when one is set);
    /// - otherwise on the scrape listener, with the token when one is set, open when that
    ///   listener is loopback, and off when it is not (a remote Prometheus must not be able
    ///   to read task names, source paths and span fields without authentication).
    pub fn decide(
        listen: SocketAddr,
        debug_listen: Option<SocketAddr>,
        token: Option<SecretString>,
    ) -> DebugPlacement {
        let guarded = match token {
            Some(t) => DebugAccess::Bearer(Arc::new(t)),
            None => DebugAccess::Open,
        };
        match debug_listen {
            Some(addr) => DebugPlacement {
                on_scrape_listener: DebugAccess::Off,
                own_listener: Some((addr, guarded)),
            },
            None => DebugPlacement {
                on_scrape_listener: match guarded {
                    DebugAccess::Open if !listen.ip().is_loopback() => DebugAccess::Off,
                    a => a,
                },
                own_listener: None,
            },
        }
    }
}

/// A running observability server.
#[derive(Debug)]
pub struct ObsServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    exited: tokio::sync::watch::Receiver<bool>,
}

/// Sets the server's `exited` flag when its thread ends, whatever the way (return or panic).
struct ExitFlag(tokio::sync::watch::Sender<bool>);

impl Drop for ExitFlag {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl ObsServer {
    /// Binds `listen` (port 0 picks a free port) and serves every route ([`router`]) on a new
    /// thread named `vpnbot-obs`.
    ///
    /// # Errors
    /// The bind error (address in use, not permitted).
    pub fn start(listen: SocketAddr, state: ObsState) -> std::io::Result<ObsServer> {
        Self::serve(listen, "vpnbot-obs", router(state))
    }

    /// Binds `listen` (port 0 picks a free port) and serves `app` from a new OS thread named
    /// `thread_name` with its own current-thread runtime.
    ///
    /// # Errors
    /// The bind error (address in use, not permitted).
    pub fn serve(listen: SocketAddr, thread_name: &str, app: Router) -> std::io::Result<ObsServer> {
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (exited_tx, exited) = tokio::sync::watch::channel(false);
        let name = thread_name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _flag = ExitFlag(exited_tx);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name(name)
                    .build()
                    .expect("observability runtime builds");
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "observability server cannot listen");
                            return;
                        }
                    };
                    let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = rx.await;
                    });
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "observability server stopped");
                    }
                });
            })?;
        tracing::info!(%addr, thread = thread_name, "observability server listening");
        Ok(ObsServer {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
            exited,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resolves once the server thread has ended, for whatever reason (stopped, its runtime
    /// failed, a panic). `App` watches it with a critical task: a server that dies on its own
    /// shuts the process down instead of leaving it unobservable.
    pub fn exited(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.exited.clone();
        async move {
            let _ = rx.wait_for(|done| *done).await;
        }
    }

    /// Stops serving and joins the thread (bounded by in-flight requests finishing).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ObsServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Every route with the debug endpoints open: for in-process tests and a loopback listener.
pub fn router(state: ObsState) -> Router {
    scrape_router(state.clone()).merge(debug_router(state, DebugAccess::Open))
}

/// `/metrics`, `/healthz`, `/readyz`: what a scraper and a probe need.
pub fn scrape_router(state: ObsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// `/debug/*` under `access` (an empty router for [`DebugAccess::Off`]).
pub fn debug_router(state: ObsState, access: DebugAccess) -> Router {
    let token = match access {
        DebugAccess::Off => return Router::new(),
        DebugAccess::Open => None,
        DebugAccess::Bearer(t) => Some(t),
    };
    Router::new()
        .route("/debug/dump", get(dump))
        .with_state(state)
        .layer(axum::middleware::from_fn(move |req, next| {
            require_bearer(token.clone(), req, next)
        }))
}

/// Lets a request through when no token is required or it carries `Bearer <token>` (compared
/// in constant time); 401 otherwise, without saying which part was wrong.
async fn require_bearer(
    token: Option<Arc<SecretString>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        let ok: bool = given.ct_eq(token.expose_secret().as_bytes()).into();
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "debug endpoints need Authorization: Bearer <observability.debug_token>\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

async fn metrics(State(s): State<ObsState>) -> Response {
    // Encoding a large registry is CPU work; on this dedicated runtime it blocks nobody else.
    let body = crate::metrics::render(&s.registry);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn healthz(State(s): State<ObsState>) -> Response {
    match s.health.stall() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(kind) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stalled: {kind}\n"),
        )
            .into_response(),
    }
}

/// `/readyz`'s `leadership` while the first attempt to take the leader lock has not ended
/// (start-up: migrations run first, then the attempt, bounded by the connect and check
/// timeouts).
pub const FIRST_ATTEMPT_PENDING: &str = "first attempt to take the leader lock has not ended";

async fn readyz(State(s): State<ObsState>) -> Response {
    let max_age = s.health.db_max_age;
    let db = s.health.db.status(max_age);
    let db_connect = s
        .health
        .db_connect
        .as_ref()
        .map(|h| h.status(max_age))
        .unwrap_or(Ok(()));
    let stall = s.health.stall();
    let leader = s.health.leader.as_ref().and_then(|l| l.known_leader());
    // Not ready until the first attempt to take the lock has ended: before it, nobody knows
    // whether this instance is to poll Telegram, and a failing attempt must not read as ready.
    let leadership = s.health.leader.as_ref().and_then(|l| {
        if l.attempted() {
            l.failing()
        } else {
            Some(FIRST_ATTEMPT_PENDING.to_string())
        }
    });
    let breakers: serde_json::Map<String, serde_json::Value> = s
        .health
        .breakers
        .as_ref()
        .map(|b| {
            b.breaker_states()
                .into_iter()
                .map(|(n, st)| (n, serde_json::Value::from(st)))
                .collect()
        })
        .unwrap_or_default();
    let degraded = s.health.degraded();
    let ready = db.is_ok()
        && db_connect.is_ok()
        && leadership.is_none()
        && stall.is_none()
        && degraded.is_none();
    let body = serde_json::json!({
        "ready": ready,
        "db": match &db { Ok(()) => "writable".to_string(), Err(e) => e.to_string() },
        "db_check_seconds": s.health.db.last_check_seconds(),
        "db_connect": match &db_connect { Ok(()) => "ok".to_string(), Err(e) => e.to_string() },
        "stall": stall,
        "degraded": degraded,
        "leader": leader,
        "leadership": match &leadership { None => "ok".to_string(), Some(e) => e.clone() },
        "node_breakers": breakers,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
struct DumpQuery {
    now: Option<u8>,
}

async fn dump(State(s): State<ObsState>, Query(q): Query<DumpQuery>) -> Response {
    let Some(d) = s.health.diagnostics.as_ref() else {
        return (StatusCode::NOT_FOUND, "diagnostics are not running\n").into_response();
    };
    let body = if q.now == Some(1) {
        // Built on its own thread, shared by concurrent requests, at most one per interval:
        // this runtime keeps serving /metrics and /healthz meanwhile.
        match s
            .health
            .on_demand
            .get(d.clone(), super::on_demand::MIN_INTERVAL)
            .await
        {
            Ok(b) => Some(b.to_string()),
            Err(e) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("dump failed: {e}\n"),
                )
                    .into_response()
            }
        }
    } else {
        d.latest_dump_json()
    };
    match body {
        Some(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no stall episode yet; /debug/dump?now=1 takes a dump now\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn readyz_of(health: HealthState) -> (StatusCode, serde_json::Value) {
        let state = ObsState {
            registry: crate::metrics::new_registry(),
            health: Arc::new(health),
        };
        let res = readyz(State(state)).await;
        let code = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        (code, serde_json::from_slice(&body).unwrap())
    }

    fn db_ok() -> Arc<crate::db::readiness::DbReadiness> {
        let db = Arc::new(crate::db::readiness::DbReadiness::default());
        db.record_timed(Ok(()), Duration::from_millis(1));
        db
    }

    #[tokio::test]
    async fn readyz_waits_for_the_first_leadership_attempt() {
        let registry = crate::metrics::new_registry();
        let leadership = crate::db::leader::Leadership::new(&registry);
        let (code, v) = readyz_of(HealthState {
            db: db_ok(),
            leader: Some(leadership.handle()),
            ..HealthState::default()
        })
        .await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(v["leader"], serde_json::Value::Null, "{v}");
        assert_eq!(v["leadership"], FIRST_ATTEMPT_PENDING, "{v}");
        // Once an attempt has ended (a handle that never leads has), the same state is ready.
        let (code, v) = readyz_of(HealthState {
            db: db_ok(),
            leader: Some(crate::db::leader::LeaderHandle::never()),
            ..HealthState::default()
        })
        .await;
        assert_eq!(code, StatusCode::OK, "{v}");
        assert_eq!(v["leader"], false, "{v}");
        assert_eq!(v["leadership"], "ok", "{v}");
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn debug_endpoints_leave_a_non_loopback_scrape_listener_without_a_token() {
        let p = DebugPlacement::decide(addr("0.0.0.0:9187"), None, None);
        assert!(matches!(p.on_scrape_listener, DebugAccess::Off));
        assert!(p.own_listener.is_none());
        let p = DebugPlacement::decide(addr("127.0.0.1:9187"), None, None);
        assert!(matches!(p.on_scrape_listener, DebugAccess::Open));
        let p = DebugPlacement::decide(addr("0.0.0.0:9187"), None, Some("t".into()));
        assert!(matches!(p.on_scrape_listener, DebugAccess::Bearer(_)));
        let p = DebugPlacement::decide(addr("0.0.0.0:9187"), Some(addr("127.0.0.1:9188")), None);
        assert!(matches!(p.on_scrape_listener, DebugAccess::Off));
        assert!(matches!(p.own_listener, Some((_, DebugAccess::Open))));
        assert_eq!(
            format!("{:?}", DebugAccess::Bearer(Arc::new("s3cret".into()))),
            "Bearer([REDACTED])"
        );
    }
}
