//! The node API over HTTP (axum): the contract's five operations behind the API key, plus
//! `/healthz` (process alive), `/readyz` (core reachable and ledger applied) and `/metrics`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use node_api::wire::{self, ErrorBody, HealthResponse, MutationResponse, UserBody};
use node_api::Operation;
use subtle::ConstantTimeEq;

use crate::agent::{Agent, AgentError};

/// Largest request body accepted, bytes (a user body is under 400).
pub const MAX_BODY: usize = 64 * 1024;

/// Bytes per chunk of a streamed `list-users` body.
const LIST_CHUNK: usize = 64 * 1024;

#[derive(Clone)]
struct AppState {
    agent: Arc<Agent>,
    api_key: Arc<[u8]>,
}

/// The router serving `agent` with `api_key`.
pub fn router(agent: Arc<Agent>, api_key: &str) -> Router {
    let state = AppState {
        agent,
        api_key: Arc::from(api_key.as_bytes()),
    };
    let api = Router::new()
        .route(wire::HEALTH_PATH, get(health))
        .route(wire::USERS_PATH, get(list_users).post(add_user))
        .route(
            "/v1/users/{uuid}",
            axum::routing::put(update_user).delete(remove_user),
        )
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(404, "not_found") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn json(status: u16, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).expect("valid status");
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: u16, code: &str) -> Response {
    json(
        status,
        serde_json::to_vec(&ErrorBody { error: code.into() }).expect("serializable"),
    )
}

fn agent_error(e: &AgentError) -> Response {
    if let AgentError::Ledger(le) = e {
        tracing::error!(error = %le, "ledger failure");
    }
    error(e.status(), e.code())
}

fn op_of(method: &Method, path: &str) -> Option<Operation> {
    Some(match (method.as_str(), path) {
        ("GET", wire::HEALTH_PATH) => Operation::Health,
        ("GET", wire::USERS_PATH) => Operation::ListUsers,
        ("POST", wire::USERS_PATH) => Operation::AddUser,
        ("PUT", p) if p.starts_with("/v1/users/") => Operation::UpdateUser,
        ("DELETE", p) if p.starts_with("/v1/users/") => Operation::RemoveUser,
        _ => return None,
    })
}

/// Requires the API key (compared in constant time) and counts every answer.
async fn auth(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let op = op_of(req.method(), req.uri().path()).map_or("other", Operation::as_str);
    let ok = req
        .headers()
        .get(wire::API_KEY_HEADER)
        .is_some_and(|v| bool::from(v.as_bytes().ct_eq(&s.api_key)));
    let resp = if ok {
        next.run(req).await
    } else {
        error(401, "unauthorized")
    };
    s.agent
        .metrics()
        .api_requests
        .with_label_values(&[op, resp.status().as_str()])
        .inc();
    resp
}

async fn health(State(s): State<AppState>) -> Response {
    if !s.agent.ready() {
        return error(503, "core_unavailable");
    }
    match s.agent.blocking(|l| l.len()).await {
        Ok(users) => json(
            200,
            serde_json::to_vec(&HealthResponse {
                status: "ok".into(),
                users,
            })
            .expect("serializable"),
        ),
        Err(e) => agent_error(&AgentError::Ledger(e)),
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.agent.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "core unreachable or ledger not applied\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut r = s.agent.metrics().render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// The request body, or the `400` error code.
fn parse_body(body: &[u8]) -> Result<UserBody, &'static str> {
    serde_json::from_slice::<UserBody>(body).map_err(|_| "bad_body")
}

/// The path's UUID, or the `400` error code.
fn parse_uuid(s: &str) -> Result<uuid::Uuid, &'static str> {
    uuid::Uuid::try_parse(s).map_err(|_| "bad_uuid")
}

fn mutation(r: Result<wire::MutationResult, AgentError>) -> Response {
    match r {
        Ok(result) => json(
            200,
            serde_json::to_vec(&MutationResponse { result }).expect("serializable"),
        ),
        Err(e) => agent_error(&e),
    }
}

async fn add_user(State(s): State<AppState>, body: Bytes) -> Response {
    match parse_body(&body) {
        Ok(b) => mutation(s.agent.add_user(b.uuid, b.email).await),
        Err(code) => error(400, code),
    }
}

async fn update_user(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Response {
    let (id, b) = match (parse_uuid(&id), parse_body(&body)) {
        (Ok(id), Ok(b)) => (id, b),
        (Err(code), _) | (_, Err(code)) => return error(400, code),
    };
    if id != b.uuid {
        return error(400, "uuid_mismatch");
    }
    mutation(s.agent.update_user(id, b.email).await)
}

async fn remove_user(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match parse_uuid(&id) {
        Ok(id) => mutation(s.agent.remove_user(id).await),
        Err(code) => error(400, code),
    }
}

/// `list-users`. V2Ray: streamed from one ledger snapshot on the blocking pool in 64 KiB
/// chunks (never the whole list in memory). Xray: the core's own list (drift against the
/// ledger is reported in `vpnbot_node_core_drift_users`).
async fn list_users(State(s): State<AppState>) -> Response {
    if let Some(listed) = s.agent.core().list_users().await {
        return match listed {
            Ok(users) => list_from_core(&s.agent, users).await,
            Err(e) => agent_error(&match e {
                crate::core::CoreError::Unavailable(_) => AgentError::CoreUnavailable,
                crate::core::CoreError::Timeout(_) => AgentError::CoreTimeout,
                crate::core::CoreError::Inbound(_) => AgentError::CoreInbound,
                _ => AgentError::Core,
            }),
        };
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let ledger = s.agent.ledger().clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(LIST_CHUNK + 512);
        buf.extend_from_slice(wire::LIST_USERS_OPEN);
        let mut first = true;
        let mut open = true;
        let r = ledger.for_each(|id, email| {
            wire::write_list_pair(&mut buf, first, &id, email);
            first = false;
            if buf.len() >= LIST_CHUNK {
                let chunk = Bytes::from(std::mem::replace(
                    &mut buf,
                    Vec::with_capacity(LIST_CHUNK + 512),
                ));
                open = tx.blocking_send(Ok(chunk)).is_ok();
            }
            open
        });
        match r {
            Ok(()) if open => {
                buf.extend_from_slice(wire::LIST_USERS_CLOSE);
                let _ = tx.blocking_send(Ok(Bytes::from(buf)));
            }
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "ledger failure while listing");
                // Cut the body: the client sees a truncated answer, never a partial list.
                let _ = tx.blocking_send(Err(std::io::Error::other("ledger failure")));
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn list_from_core(agent: &Arc<Agent>, users: Vec<crate::core::CoreUser>) -> Response {
    let ledger = agent.ledger().clone();
    let metrics = agent.metrics().clone();
    let body = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(16 + users.len() * 72);
        out.extend_from_slice(wire::LIST_USERS_OPEN);
        // One ledger snapshot (one read transaction), then one pass over the core's list.
        let mut ledger_users = std::collections::HashMap::with_capacity(users.len());
        let _ = ledger.for_each(|id, email| {
            ledger_users.insert(id, email.to_owned());
            true
        });
        let mut drift: i64 = 0;
        let mut first = true;
        for u in &users {
            if u.email == crate::agent::SENTINEL_EMAIL {
                continue;
            }
            let Ok(id) = uuid::Uuid::try_parse(&u.id) else {
                // Not a UUID (a user added by hand): not representable in the contract.
                drift += 1;
                continue;
            };
            match ledger_users.remove(&id) {
                Some(e) if e == u.email => {}
                _ => drift += 1,
            }
            wire::write_list_pair(&mut out, first, &id, &u.email);
            first = false;
        }
        // Ledger users the core does not have.
        drift += ledger_users.len() as i64;
        metrics.drift.set(drift);
        out.extend_from_slice(wire::LIST_USERS_CLOSE);
        out
    })
    .await
    .expect("list serialization does not panic");
    json(200, body)
}
