//! The observability HTTP server: axum on its own OS thread with its own current-thread tokio
//! runtime, never on the main runtime, so `/metrics`, `/healthz` and `/debug/dump` keep
//! answering while the main runtime is stalled (the pattern of console-subscriber's server
//! thread and linkerd2-proxy's admin server).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use serde::Deserialize;

use super::health::HealthState;

/// Everything the handlers read.
#[derive(Debug, Clone)]
pub struct ObsState {
    /// The one registry every subsystem registers into.
    pub registry: Registry,
    /// Health sources.
    pub health: Arc<HealthState>,
}

/// A running observability server.
#[derive(Debug)]
pub struct ObsServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ObsServer {
    /// Binds `listen` (port 0 picks a free port) and serves on a new thread named `vpnbot-obs`.
    ///
    /// # Errors
    /// The bind error (address in use, not permitted).
    pub fn start(listen: SocketAddr, state: ObsState) -> std::io::Result<ObsServer> {
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vpnbot-obs".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name("vpnbot-obs")
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
                    let app = router(state);
                    let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = rx.await;
                    });
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "observability server stopped");
                    }
                });
            })?;
        tracing::info!(%addr, "observability server listening");
        Ok(ObsServer {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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

/// The routes, exposed for in-process tests.
pub fn router(state: ObsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/debug/dump", get(dump))
        .with_state(state)
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

async fn readyz(State(s): State<ObsState>) -> Response {
    let max_age = s
        .health
        .db_max_age
        .get()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let db = s.health.db.status(max_age);
    let db_connect = s
        .health
        .db_connect
        .get()
        .map(|h| h.status(max_age))
        .unwrap_or(Ok(()));
    let stall = s.health.stall();
    let leader = s.health.leader.get().map(|l| l.is_leader());
    let leadership = s.health.leader.get().and_then(|l| l.failing());
    let breakers: serde_json::Map<String, serde_json::Value> = s
        .health
        .breakers
        .get()
        .map(|b| {
            b.breaker_states()
                .into_iter()
                .map(|(n, st)| (n, serde_json::Value::from(st)))
                .collect()
        })
        .unwrap_or_default();
    let ready = db.is_ok() && db_connect.is_ok() && leadership.is_none() && stall.is_none();
    let body = serde_json::json!({
        "ready": ready,
        "db": match &db { Ok(()) => "writable".to_string(), Err(e) => e.clone() },
        "db_connect": match &db_connect { Ok(()) => "ok".to_string(), Err(e) => e.clone() },
        "stall": stall,
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
    let Some(d) = s.health.diagnostics.get() else {
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
