//! A TCP proxy whose network path can drop silently: [`SilentDropProxy::drop_existing`] makes
//! every connection open at that moment stop forwarding in both directions without closing it
//! (no FIN, no RST), as when a NAT or firewall forgets a flow. Connections opened afterwards are
//! forwarded normally. Used to put the Bot API stand-in behind a path that dies.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct Shared {
    /// Cancelled by `drop_existing`; replaced by a fresh token for later connections.
    path: Mutex<CancellationToken>,
    /// Sockets of dropped connections, held open (unread, unwritten) until the proxy stops.
    graveyard: Mutex<Vec<(TcpStream, TcpStream)>>,
    accepted: AtomicU64,
}

/// Starts proxies.
#[derive(Debug)]
pub struct SilentDropProxy;

impl SilentDropProxy {
    /// Forwards connections accepted on `listener` to `upstream` until the handle is dropped.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(listener: TcpListener, upstream: SocketAddr) -> SilentDropProxyHandle {
        let addr = listener.local_addr().expect("bound listener");
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let (sh, st) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = st.cancelled() => break,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                sh.accepted.fetch_add(1, Ordering::Relaxed);
                let path = sh.path.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let (sh, st) = (sh.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut client = client;
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = path.cancelled() => {
                            // Silently dropped: keep both sockets open and never touch them.
                            sh.graveyard
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((client, server));
                        }
                    }
                });
            }
        });
        SilentDropProxyHandle { addr, shared, stop }
    }
}

/// Controls a running proxy; dropping it stops the proxy and closes every socket.
#[derive(Debug)]
pub struct SilentDropProxyHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for SilentDropProxyHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl SilentDropProxyHandle {
    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every connection open now stops forwarding, silently; new ones work.
    pub fn drop_existing(&self) {
        let old = std::mem::take(&mut *self.shared.path.lock().unwrap_or_else(|e| e.into_inner()));
        old.cancel();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}
