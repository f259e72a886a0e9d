//! Support for the tests that run real V2Ray processes (this crate's and vpnbot's end-to-end
//! test): the `v2ray` binary, a server with a VLESS inbound and the API inbound, a client with a
//! SOCKS inbound and a VLESS outbound, a raw SOCKS5 fetch through it, and a tiny origin HTTP
//! server. Not used by the agent itself.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `v2ray` binary on `PATH`. `None` (skip) only when it is missing and `ALLOW_SKIP_TESTS=1`.
///
/// # Panics
/// `v2ray` is missing and skipping is not allowed: install it with `scripts/install-deps.sh`.
pub fn v2ray_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("v2ray"))
            .find(|f| f.is_file())
    });
    match found {
        Some(f) => Some(f),
        None if std::env::var("ALLOW_SKIP_TESTS").as_deref() == Ok("1") => {
            eprintln!("SKIPPED: v2ray is not installed (ALLOW_SKIP_TESTS=1)");
            None
        }
        None => panic!(
            "v2ray is not installed: run scripts/install-deps.sh (or set ALLOW_SKIP_TESTS=1 to skip)"
        ),
    }
}

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Waits until something accepts TCP connections on `port` (at most `within`).
pub fn wait_listening(port: u16, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The core config vpnbot-node expects: a VLESS inbound `vless-in` on `vless_port` with no
/// users, the API (`HandlerService`) on `api_port` through a dokodemo-door inbound and a routing
/// rule, a freedom outbound. Same shape as `deploy/node/v2ray-config.json`.
pub fn server_config(vless_port: u16, api_port: u16) -> serde_json::Value {
    serde_json::json!({
        "log": { "loglevel": "warning" },
        "api": { "tag": "api", "services": ["HandlerService"] },
        "inbounds": [
            { "tag": "vless-in", "listen": "127.0.0.1", "port": vless_port, "protocol": "vless",
              "settings": { "clients": [], "decryption": "none" },
              "streamSettings": { "network": "tcp", "security": "none" } },
            { "tag": "api", "listen": "127.0.0.1", "port": api_port, "protocol": "dokodemo-door",
              "settings": { "address": "127.0.0.1" } }
        ],
        "outbounds": [ { "tag": "direct", "protocol": "freedom", "settings": {} } ],
        "routing": { "rules": [ { "type": "field", "inboundTag": ["api"], "outboundTag": "api" } ] }
    })
}

/// A client config: SOCKS on `socks_port`, VLESS (no Mux, no TLS) to `server` with `id`.
pub fn client_config(socks_port: u16, server: SocketAddr, id: &str) -> serde_json::Value {
    serde_json::json!({
        "log": { "loglevel": "warning" },
        "inbounds": [ { "tag": "socks-in", "listen": "127.0.0.1", "port": socks_port,
                        "protocol": "socks", "settings": { "auth": "noauth", "udp": false } } ],
        "outbounds": [ { "tag": "vless-out", "protocol": "vless",
            "settings": { "vnext": [ { "address": server.ip().to_string(), "port": server.port(),
                "users": [ { "id": id, "encryption": "none", "level": 0 } ] } ] },
            "streamSettings": { "network": "tcp", "security": "none" } } ]
    })
}

/// A `v2ray` process, killed on drop.
#[derive(Debug)]
pub struct V2ray {
    child: Child,
    /// The config file it runs.
    pub config: PathBuf,
}

impl V2ray {
    /// Writes `config` to `dir/name.json` and starts `bin -config` on it; waits until `port`
    /// listens.
    ///
    /// # Panics
    /// The process cannot start or never listens within 10 s.
    pub fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        config: &serde_json::Value,
        port: u16,
    ) -> V2ray {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(config).expect("json")).expect("write");
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
        let child = Command::new(bin)
            .arg("-config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn v2ray");
        let mut v = V2ray {
            child,
            config: path,
        };
        if !wait_listening(port, Duration::from_secs(10)) {
            let _ = v.child.kill();
            panic!(
                "v2ray {name} did not listen on {port}: {}",
                std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
            );
        }
        v
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for V2ray {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fetches `GET /` from `target` through the SOCKS5 proxy on `socks_port` (raw handshake, no
/// auth, CONNECT by IPv4), on a new connection; the answer's body.
///
/// # Errors
/// The proxy refused, the connection closed without an answer (what a VLESS server does to an
/// unknown user), or `within` passed.
pub async fn socks_get(
    socks_port: u16,
    target: SocketAddr,
    within: Duration,
) -> Result<String, String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", socks_port))
            .await
            .map_err(|e| format!("connect to socks: {e}"))?;
        s.write_all(&[5, 1, 0]).await.map_err(|e| e.to_string())?;
        let mut hello = [0u8; 2];
        s.read_exact(&mut hello).await.map_err(|e| e.to_string())?;
        if hello != [5, 0] {
            return Err(format!("socks hello answer {hello:?}"));
        }
        let SocketAddr::V4(v4) = target else {
            return Err("IPv4 targets only".into());
        };
        let mut req = vec![5, 1, 0, 1];
        req.extend_from_slice(&v4.ip().octets());
        req.extend_from_slice(&v4.port().to_be_bytes());
        s.write_all(&req).await.map_err(|e| e.to_string())?;
        let mut rep = [0u8; 10];
        s.read_exact(&mut rep)
            .await
            .map_err(|e| format!("socks reply: {e}"))?;
        if rep[1] != 0 {
            return Err(format!("socks CONNECT refused: {}", rep[1]));
        }
        s.write_all(format!("GET / HTTP/1.0\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&out).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.") => Ok(body.to_owned()),
            _ => Err(format!("no HTTP answer (got {} bytes)", out.len())),
        }
    };
    tokio::time::timeout(within, fetch)
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
}

/// Body the [`origin`] server answers.
pub const ORIGIN_BODY: &str = "hello-from-origin\n";

/// A loopback HTTP server answering every request with [`ORIGIN_BODY`]; runs until aborted.
pub async fn origin() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.0 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{ORIGIN_BODY}",
                    ORIGIN_BODY.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}
