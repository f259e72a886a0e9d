//! Stand-in cores, tonic servers generated from the same vendored protos the agent's client is
//! generated from (no Xray binary is installable here): an Xray `HandlerService` keeping users
//! in memory with Xray's answers (`AlterInbound`, `GetInboundUsers`, `GetInboundUsersCount`),
//! and a V2Ray `HandlerService` that refuses every user the way V2Ray refuses a bad UUID.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prost::Message;
use tonic::{Request, Response, Status};
use vpnbot_node::proto::{v2ray, xray};

use xray::app::proxyman::command as xc;

/// The Xray stand-in's users: lower-cased email → (email, VLESS id). Emails match ignoring
/// ASCII case, as in Xray.
#[derive(Debug, Default, Clone)]
pub struct XrayUsers(pub Arc<Mutex<BTreeMap<String, (String, String)>>>);

impl XrayUsers {
    pub fn insert(&self, email: &str, id: &str) {
        self.0.lock().unwrap().insert(
            email.to_ascii_lowercase(),
            (email.to_owned(), id.to_owned()),
        );
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub fn get(&self, email: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .get(&email.to_ascii_lowercase())
            .map(|(_, id)| id.clone())
    }
}

#[derive(Debug)]
struct XrayStandIn {
    users: XrayUsers,
}

fn vless_id(user: &xray::common::protocol::User) -> Result<String, Status> {
    let acc = user
        .account
        .as_ref()
        .ok_or_else(|| Status::unknown("failed to parse user > no account"))?;
    if acc.r#type != "xray.proxy.vless.Account" {
        return Err(Status::unknown(format!(
            "unknown account type {}",
            acc.r#type
        )));
    }
    let a = xray::proxy::vless::Account::decode(acc.value.as_slice())
        .map_err(|e| Status::unknown(format!("failed to parse user > {e}")))?;
    Ok(a.id)
}

#[tonic::async_trait]
impl xc::handler_service_server::HandlerService for XrayStandIn {
    async fn alter_inbound(
        &self,
        req: Request<xc::AlterInboundRequest>,
    ) -> Result<Response<xc::AlterInboundResponse>, Status> {
        let req = req.into_inner();
        if req.tag != "vless-in" {
            return Err(Status::unknown(format!(
                "failed to get handler: {} > handler not found",
                req.tag
            )));
        }
        let op = req.operation.unwrap_or_default();
        let mut users = self.users.0.lock().unwrap();
        match op.r#type.as_str() {
            "xray.app.proxyman.command.AddUserOperation" => {
                let add = xc::AddUserOperation::decode(op.value.as_slice())
                    .map_err(|e| Status::unknown(e.to_string()))?;
                let user = add.user.unwrap_or_default();
                let id = vless_id(&user)?;
                if user.email.is_empty() {
                    return Err(Status::unknown("Email must not be empty."));
                }
                let key = user.email.to_ascii_lowercase();
                if users.contains_key(&key) {
                    return Err(Status::unknown(format!(
                        "github.com/xtls/xray-core/proxy/vless: User {} already exists.",
                        user.email
                    )));
                }
                users.insert(key, (user.email, id));
            }
            "xray.app.proxyman.command.RemoveUserOperation" => {
                let rm = xc::RemoveUserOperation::decode(op.value.as_slice())
                    .map_err(|e| Status::unknown(e.to_string()))?;
                match users.remove(&rm.email.to_ascii_lowercase()) {
                    Some(_) => {}
                    None => return Err(Status::unknown(format!("User {} not found.", rm.email))),
                }
            }
            other => return Err(Status::unknown(format!("unknown operation {other}"))),
        }
        Ok(Response::new(xc::AlterInboundResponse {}))
    }

    async fn get_inbound_users(
        &self,
        req: Request<xc::GetInboundUserRequest>,
    ) -> Result<Response<xc::GetInboundUserResponse>, Status> {
        let req = req.into_inner();
        let users = self.users.0.lock().unwrap();
        let make = |email: &str, id: &str| xray::common::protocol::User {
            level: 0,
            email: email.to_owned(),
            account: Some(xray::common::serial::TypedMessage {
                r#type: "xray.proxy.vless.Account".into(),
                value: xray::proxy::vless::Account {
                    id: id.to_owned(),
                    flow: String::new(),
                    encryption: "none".into(),
                }
                .encode_to_vec(),
            }),
        };
        let list = if req.email.is_empty() {
            users.values().map(|(e, id)| make(e, id)).collect()
        } else {
            users
                .get(&req.email.to_ascii_lowercase())
                .map(|(e, id)| vec![make(e, id)])
                .unwrap_or_default()
        };
        Ok(Response::new(xc::GetInboundUserResponse { users: list }))
    }

    async fn get_inbound_users_count(
        &self,
        _req: Request<xc::GetInboundUserRequest>,
    ) -> Result<Response<xc::GetInboundUsersCountResponse>, Status> {
        Ok(Response::new(xc::GetInboundUsersCountResponse {
            count: self.users.len() as i64,
        }))
    }
}

/// Starts the Xray stand-in on loopback; aborting the handle stops it.
pub async fn xray(users: XrayUsers) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let svc = xc::handler_service_server::HandlerServiceServer::new(XrayStandIn { users })
        .max_decoding_message_size(64 * 1024 * 1024);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    (addr, task)
}

use v2ray::core::app::proxyman::command as vc;

/// A V2Ray core that refuses every user added (the answer V2Ray 4.34 gives an id it cannot
/// parse) and knows no user to remove.
#[derive(Debug)]
struct RejectingV2ray;

#[tonic::async_trait]
impl vc::handler_service_server::HandlerService for RejectingV2ray {
    async fn add_inbound(
        &self,
        _r: Request<vc::AddInboundRequest>,
    ) -> Result<Response<vc::AddInboundResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn remove_inbound(
        &self,
        _r: Request<vc::RemoveInboundRequest>,
    ) -> Result<Response<vc::RemoveInboundResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn alter_inbound(
        &self,
        r: Request<vc::AlterInboundRequest>,
    ) -> Result<Response<vc::AlterInboundResponse>, Status> {
        let op = r.into_inner().operation.unwrap_or_default();
        let add = vc::AddUserOperation::decode(op.value.as_slice()).ok();
        match op.r#type.as_str() {
            "v2ray.core.app.proxyman.command.AddUserOperation" => {
                let email = add
                    .and_then(|a| a.user)
                    .map(|u| u.email)
                    .unwrap_or_default();
                if email == "vbnode.sentinel" {
                    // The probe's sentinel: accepted, so the core reads as up.
                    return Err(Status::unknown(format!(
                        "v2ray.com/core/proxy/vless: User {email} already exists."
                    )));
                }
                Err(Status::unknown(
                    "v2ray.com/core/app/proxyman/command: failed to parse user > \
                     v2ray.com/core/proxy/vless: failed to parse ID > invalid UUID: x",
                ))
            }
            _ => Err(Status::unknown("User x not found.")),
        }
    }
    async fn add_outbound(
        &self,
        _r: Request<vc::AddOutboundRequest>,
    ) -> Result<Response<vc::AddOutboundResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn remove_outbound(
        &self,
        _r: Request<vc::RemoveOutboundRequest>,
    ) -> Result<Response<vc::RemoveOutboundResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn alter_outbound(
        &self,
        _r: Request<vc::AlterOutboundRequest>,
    ) -> Result<Response<vc::AlterOutboundResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
}

/// Starts the rejecting V2Ray stand-in on loopback.
pub async fn rejecting_v2ray() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(vc::handler_service_server::HandlerServiceServer::new(
                RejectingV2ray,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    (addr, task)
}

/// A core that dies mid-request: it accepts, reads the start of the client's HTTP/2 request
/// (preface, settings, headers), then closes the connection without answering.
pub async fn dying_core() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                drop(s);
            });
        }
    });
    (addr, task)
}
