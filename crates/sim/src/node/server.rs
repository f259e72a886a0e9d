//! Raw HTTP/1.1 over TCP: request parsing, routing, the contract, and the faults.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Fault, Shared};
use node_api::wire::{self, MutationResult, UserBody};
use node_api::Operation;

const MAX_HEAD: usize = 64 * 1024;
const MAX_REQUEST_BODY: usize = 1024 * 1024;

pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let cancel = shared.cancel.clone();
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = serve_conn(shared, stream) => {}
                    }
                });
            }
            Err(e) => {
                tracing::warn!("sim-node accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    api_key: Option<String>,
    body: Bytes,
    close: bool,
}

/// Reads one request; `None` on EOF, idle timeout or a malformed request.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    idle: Duration,
) -> Option<Request> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let mut content_length = 0usize;
                    let mut api_key = None;
                    let mut close = false;
                    for h in req.headers.iter() {
                        let v = String::from_utf8_lossy(h.value).trim().to_owned();
                        if h.name.eq_ignore_ascii_case("content-length") {
                            content_length = v.parse().ok()?;
                        } else if h.name.eq_ignore_ascii_case(wire::API_KEY_HEADER) {
                            api_key = Some(v);
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close = v.eq_ignore_ascii_case("close");
                        }
                    }
                    if content_length > MAX_REQUEST_BODY {
                        return None;
                    }
                    let method = req.method?.to_owned();
                    let path = req.path?.to_owned();
                    while buf.len() < head_len + content_length {
                        if read_more(stream, buf, idle).await? == 0 {
                            return None;
                        }
                    }
                    let mut all = buf.split_to(head_len + content_length);
                    let body = all.split_off(head_len).freeze();
                    return Some(Request {
                        method,
                        path,
                        api_key,
                        body,
                        close,
                    });
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                _ => return None,
            }
        }
        if read_more(stream, buf, idle).await? == 0 {
            return None;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut, idle: Duration) -> Option<usize> {
    buf.reserve(8 * 1024);
    match tokio::time::timeout(idle, stream.read_buf(buf)).await {
        Ok(Ok(n)) => Some(n),
        _ => None,
    }
}

async fn serve_conn(shared: Arc<Shared>, mut stream: TcpStream) {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut served = 0u64;
    loop {
        let idle = if served == 0 {
            Duration::from_secs(30)
        } else {
            shared.keep_alive_idle
        };
        let Some(req) = read_request(&mut stream, &mut buf, idle).await else {
            return;
        };
        let close = req.close;
        let keep = handle(&shared, &mut stream, req, served).await;
        served += 1;
        if !keep || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

enum Route {
    Op(Operation, Option<uuid::Uuid>),
    Admin,
    NotFound,
    BadUuid,
}

fn route(method: &str, path: &str) -> Route {
    let path = path.split('?').next().unwrap_or_default();
    if path.starts_with("/_sim/") {
        return Route::Admin;
    }
    match (method, path) {
        ("GET", wire::HEALTH_PATH) => Route::Op(Operation::Health, None),
        ("GET", wire::USERS_PATH) => Route::Op(Operation::ListUsers, None),
        ("POST", wire::USERS_PATH) => Route::Op(Operation::AddUser, None),
        (m @ ("PUT" | "DELETE"), p) => match p.strip_prefix("/v1/users/") {
            Some(id) => match uuid::Uuid::try_parse(id) {
                Ok(id) => {
                    let op = if m == "PUT" {
                        Operation::UpdateUser
                    } else {
                        Operation::RemoveUser
                    };
                    Route::Op(op, Some(id))
                }
                Err(_) => Route::BadUuid,
            },
            None => Route::NotFound,
        },
        _ => Route::NotFound,
    }
}

/// Serves one request; returns whether the connection stays open.
async fn handle(shared: &Arc<Shared>, stream: &mut TcpStream, req: Request, served: u64) -> bool {
    let (op, id) = match route(&req.method, &req.path) {
        Route::Op(op, id) => (op, id),
        Route::Admin => {
            let (status, body) = admin(shared, &req);
            return write_response(stream, status, &[], &body).await.is_ok();
        }
        Route::NotFound => return respond_error(stream, 404, "not_found").await,
        Route::BadUuid => return respond_error(stream, 400, "bad_uuid").await,
    };
    shared.requests[op.index()].fetch_add(1, Ordering::Relaxed);
    let fault = shared.take_fault(op);
    let key_ok = req.api_key.as_deref() == Some(shared.api_key.as_str());
    match fault {
        Fault::StaleKeepAlive if served > 0 => return false,
        Fault::Reset => {
            reset(stream);
            return false;
        }
        Fault::NoHeaders => {
            hold(shared, stream).await;
            return false;
        }
        Fault::AuthReject => return respond_error(stream, 401, "unauthorized").await,
        _ if !key_ok => return respond_error(stream, 401, "unauthorized").await,
        Fault::Delay(d) => tokio::time::sleep(d).await,
        Fault::Status(code) => return respond_error(stream, code, "simulated_failure").await,
        Fault::RateLimited(secs) => {
            let body = error_body("rate_limited");
            let extra = [("retry-after", secs.to_string())];
            return write_response(stream, 429, &extra, &body).await.is_ok();
        }
        Fault::Redirect(port) => {
            let extra = [("location", format!("http://127.0.0.1:{port}{}", req.path))];
            return write_response(stream, 307, &extra, b"").await.is_ok();
        }
        Fault::MalformedJson => {
            return write_response(stream, 200, &[], b"{\"users\":[[\"5b1e\", oops")
                .await
                .is_ok()
        }
        Fault::WrongSchema => {
            return write_response(stream, 200, &[], b"{\"items\":[{\"id\":1}]}")
                .await
                .is_ok()
        }
        Fault::NonUuid => {
            let body: &[u8] = match op {
                Operation::ListUsers => b"{\"users\":[[\"not-a-uuid\",\"alice@example.com\"]]}",
                Operation::Health => b"{\"status\":42,\"users\":\"many\"}",
                _ => b"{\"result\":\"maybe\"}",
            };
            return write_response(stream, 200, &[], body).await.is_ok();
        }
        Fault::EndlessChunked => {
            endless_chunked(shared, stream).await;
            return false;
        }
        _ => {}
    }
    let (status, body) = apply(shared, op, id, &req).await;
    match fault {
        Fault::ApplyThen500 => respond_error(stream, 500, "simulated_failure").await,
        Fault::ApplyThenDrop => false,
        Fault::FoldCase if op == Operation::ListUsers => {
            let folded = fold_case(&body);
            write_response(stream, status, &[], &folded).await.is_ok()
        }
        Fault::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = std::io::Write::write_all(&mut gz, &body);
            let zipped = gz.finish().unwrap_or_default();
            let extra = [("content-encoding", "gzip".to_owned())];
            write_response(stream, status, &extra, &zipped)
                .await
                .is_ok()
        }
        Fault::HeadersThenSilence => {
            let head = head(status, &[], body.len());
            if stream.write_all(head.as_bytes()).await.is_ok() {
                hold(shared, stream).await;
            }
            false
        }
        Fault::Trickle(every) => {
            let head = head(status, &[], body.len());
            if stream.write_all(head.as_bytes()).await.is_err() {
                return false;
            }
            for b in body.iter() {
                tokio::time::sleep(every).await;
                if stream.write_all(&[*b]).await.is_err() {
                    return false;
                }
            }
            true
        }
        Fault::ShortBody | Fault::ResetMidBody => {
            let head = head(status, &[], body.len());
            let half = &body[..body.len() / 2];
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(half).await;
            let _ = stream.flush().await;
            if fault == Fault::ResetMidBody {
                // Let the half body reach the peer before the reset discards queued data.
                tokio::time::sleep(Duration::from_millis(20)).await;
                reset(stream);
            }
            false
        }
        _ => write_response(stream, status, &[], &body).await.is_ok(),
    }
}

/// The contract's behaviour for `op`: status and body.
async fn apply(
    shared: &Arc<Shared>,
    op: Operation,
    id: Option<uuid::Uuid>,
    req: &Request,
) -> (u16, Bytes) {
    let mutation = |r: MutationResult| {
        let body = serde_json::to_vec(&wire::MutationResponse { result: r }).expect("serializable");
        (200, Bytes::from(body))
    };
    match op {
        Operation::Health => {
            let users = shared.users().map.len() as u64;
            let body = serde_json::to_vec(&wire::HealthResponse {
                status: "ok".into(),
                users,
            })
            .expect("serializable");
            (200, body.into())
        }
        Operation::ListUsers => (200, list_body(shared).await),
        Operation::AddUser | Operation::UpdateUser => {
            let Ok(body) = serde_json::from_slice::<UserBody>(&req.body) else {
                return (400, error_body("bad_body"));
            };
            if id.is_some_and(|id| id != body.uuid) {
                return (400, error_body("uuid_mismatch"));
            }
            let _applying = applying(shared, body.uuid).await;
            let mut users = shared.users();
            let present = users.map.get(&body.uuid).cloned();
            let result = match (op, present) {
                (_, Some(e)) if *e == *body.email => MutationResult::Unchanged,
                (Operation::AddUser, Some(_)) => return (409, error_body("conflict")),
                (Operation::AddUser, None) => MutationResult::Created,
                (_, None) => return (404, error_body("not_found")),
                (_, Some(_)) => MutationResult::Updated,
            };
            if result != MutationResult::Unchanged {
                users.put(body.uuid, body.email);
            }
            mutation(result)
        }
        Operation::RemoveUser => {
            let id = id.expect("routed with a uuid");
            let _applying = applying(shared, id).await;
            let mut users = shared.users();
            let r = if users.map.remove(&id).is_some() {
                users.changed();
                MutationResult::Removed
            } else {
                MutationResult::Absent
            };
            mutation(r)
        }
    }
}

/// Marks a mutation of `uuid` in progress (counting an overlap with another one) and waits
/// the apply delay; the change is made after it, while the guard is held.
async fn applying(shared: &Arc<Shared>, uuid: uuid::Uuid) -> super::Applying {
    let guard = shared.begin_mutation(uuid);
    shared.mutations.fetch_add(1, Ordering::Relaxed);
    let ms = shared.apply_delay_ms.load(Ordering::Relaxed);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    guard
}

/// The `list-users` body, serialized on the blocking pool when not cached. The lock is held
/// only to copy the entries (reference-counted emails), not while serializing: a node that
/// blocked writes for the whole serialization of a million users would stall every
/// `add-user` behind a reconcile pass's `list-users`, which real node APIs do not do.
pub(crate) async fn list_body(shared: &Arc<Shared>) -> Bytes {
    if let Some(b) = shared.users().list_cache.clone() {
        return b;
    }
    let s = shared.clone();
    tokio::task::spawn_blocking(move || {
        let (snapshot, generation) = {
            let users = s.users();
            if let Some(b) = users.list_cache.clone() {
                return b;
            }
            let snapshot: Vec<(uuid::Uuid, Arc<str>)> =
                users.map.iter().map(|(k, v)| (*k, v.clone())).collect();
            (snapshot, users.generation)
        };
        let mut out = Vec::new();
        wire::write_list_users(&mut out, snapshot.iter().map(|(k, v)| (k, &**v)));
        let b = Bytes::from(out);
        let mut users = s.users();
        if users.generation == generation {
            users.list_cache = Some(b.clone());
        }
        b
    })
    .await
    .expect("list serialization does not panic")
}

/// A `list-users` body with emails lower-cased and UUIDs upper-cased (the `fold_case` fault).
fn fold_case(body: &[u8]) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return body.to_vec();
    };
    if let Some(users) = v.get_mut("users").and_then(|u| u.as_array_mut()) {
        for pair in users.iter_mut().filter_map(|p| p.as_array_mut()) {
            if let [id, email] = pair.as_mut_slice() {
                *id = id.as_str().unwrap_or_default().to_uppercase().into();
                *email = email.as_str().unwrap_or_default().to_lowercase().into();
            }
        }
    }
    serde_json::to_vec(&v).unwrap_or_else(|_| body.to_vec())
}

fn admin(shared: &Arc<Shared>, req: &Request) -> (u16, Vec<u8>) {
    let path = req.path.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("GET", "/_sim/faults") => {
            let faults = shared.faults();
            let map: serde_json::Map<String, serde_json::Value> = Operation::ALL
                .iter()
                .map(|op| {
                    (
                        op.as_str().to_owned(),
                        faults[op.index()].to_string().into(),
                    )
                })
                .collect();
            (200, serde_json::to_vec(&map).expect("serializable"))
        }
        ("GET", "/_sim/stats") => {
            let requests: serde_json::Map<String, serde_json::Value> = Operation::ALL
                .iter()
                .map(|op| {
                    let n = shared.requests[op.index()].load(Ordering::Relaxed);
                    (op.as_str().to_owned(), n.into())
                })
                .collect();
            let v = serde_json::json!({
                "users": shared.users().map.len(),
                "connections": shared.connections.load(Ordering::Relaxed),
                "requests": requests,
                "mutations": shared.mutations.load(Ordering::Relaxed),
                "overlapping_mutations": shared.overlaps.load(Ordering::Relaxed),
                "apply_delay_ms": shared.apply_delay_ms.load(Ordering::Relaxed),
            });
            (200, v.to_string().into_bytes())
        }
        ("PUT", "/_sim/apply_delay") => {
            match std::str::from_utf8(&req.body)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
            {
                Some(ms) => {
                    shared.apply_delay_ms.store(ms, Ordering::Relaxed);
                    let body = serde_json::json!({ "apply_delay_ms": ms });
                    (200, body.to_string().into_bytes())
                }
                None => (
                    400,
                    serde_json::json!({ "error": "body must be milliseconds" })
                        .to_string()
                        .into_bytes(),
                ),
            }
        }
        ("PUT", p) if p.starts_with("/_sim/faults/") => {
            let op = &p["/_sim/faults/".len()..];
            let parsed = op.parse::<Operation>().and_then(|op| {
                let text = std::str::from_utf8(&req.body).map_err(|e| e.to_string())?;
                Ok((op, text.parse::<Fault>()?))
            });
            match parsed {
                Ok((op, f)) => {
                    tracing::info!(operation = op.as_str(), fault = %f, "sim-node fault switched");
                    let body =
                        serde_json::json!({ "operation": op.as_str(), "fault": f.to_string() });
                    shared.faults()[op.index()] = f;
                    (200, body.to_string().into_bytes())
                }
                Err(e) => (
                    400,
                    serde_json::json!({ "error": e }).to_string().into_bytes(),
                ),
            }
        }
        _ => (404, error_body("not_found").to_vec()),
    }
}

fn error_body(reason: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&wire::ErrorBody {
            error: reason.into(),
        })
        .expect("serializable"),
    )
}

async fn respond_error(stream: &mut TcpStream, status: u16, reason: &str) -> bool {
    write_response(stream, status, &[], &error_body(reason))
        .await
        .is_ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        307 => "Temporary Redirect",
        404 => "Not Found",
        409 => "Conflict",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn head(status: u16, extra: &[(&str, String)], len: usize) -> String {
    let mut h = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n",
        reason(status)
    );
    for (k, v) in extra {
        h.push_str(k);
        h.push_str(": ");
        h.push_str(v);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    extra: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let head = head(status, extra, body.len());
    if body.len() < 16 * 1024 {
        let mut all = Vec::with_capacity(head.len() + body.len());
        all.extend_from_slice(head.as_bytes());
        all.extend_from_slice(body);
        stream.write_all(&all).await
    } else {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await
    }
}

/// Keeps the socket open without sending, until the peer closes it or the node stops.
async fn hold(shared: &Arc<Shared>, stream: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            r = stream.read(&mut sink) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

/// Aborts the connection with a TCP reset (SO_LINGER 0, then close).
fn reset(stream: &mut TcpStream) {
    let _ = socket_linger_zero(stream);
}

fn socket_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    let sock = socket2_ref(stream);
    sock.set_linger(Some(Duration::ZERO))
}

fn socket2_ref(stream: &TcpStream) -> socket2::SockRef<'_> {
    socket2::SockRef::from(stream)
}

/// A chunked `list-users` body of valid entries that never ends.
async fn endless_chunked(shared: &Arc<Shared>, stream: &mut TcpStream) {
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let first = b"{\"users\":[";
    let mut chunk = Vec::with_capacity(80 * 1024);
    chunk.extend_from_slice(format!("{:x}\r\n", first.len()).as_bytes());
    chunk.extend_from_slice(first);
    chunk.extend_from_slice(b"\r\n");
    let mut n: u64 = 0;
    loop {
        let mut data = Vec::with_capacity(72 * 1024);
        for _ in 0..1000 {
            let id = uuid::Uuid::from_u64_pair(0x5eed, n);
            if n > 0 {
                data.push(b',');
            }
            n += 1;
            data.extend_from_slice(
                format!("[\"{id}\",\"{}\"]", node_api::owned_email(id)).as_bytes(),
            );
        }
        chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        chunk.extend_from_slice(&data);
        chunk.extend_from_slice(b"\r\n");
        let write = stream.write_all(&chunk);
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            r = write => if r.is_err() { return },
        }
        chunk.clear();
    }
}
