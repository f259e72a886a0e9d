//! A TCP proxy whose network path can drop silently: [`SilentDropProxy::drop_existing`] makes
//! every connection open at that moment stop forwarding in both directions without closing it
//! (no FIN, no RST), as when a NAT or firewall forgets a flow. Connections opened afterwards are
//! forwarded normally. Used to put the Bot API stand-in behind a path that dies. [`DelayProxy`]
//! delays every server reply instead (a slow database).

use std::future::Future;
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
}

/// What every proxy here shares: its address, the stop token (cancelled when the handle is
/// dropped, which ends the accept loop and every forwarding task) and the accept count.
#[derive(Debug)]
struct Running {
    addr: SocketAddr,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accepts on `listener` until stopped; for each connection takes `at_accept()` at once, then
/// connects to `upstream` (both sockets with `TCP_NODELAY`) and runs `forward` on its own task.
///
/// # Panics
/// Outside a tokio runtime.
fn run<P, F, Fut>(
    listener: TcpListener,
    upstream: SocketAddr,
    mut at_accept: impl FnMut() -> P + Send + 'static,
    forward: F,
) -> Running
where
    P: Send + 'static,
    F: Fn(TcpStream, TcpStream, P, CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr().expect("bound listener");
    let stop = CancellationToken::new();
    let accepted = Arc::new(AtomicU64::new(0));
    let (st, count) = (stop.clone(), accepted.clone());
    let forward = Arc::new(forward);
    tokio::spawn(async move {
        loop {
            let (client, _) = tokio::select! {
                _ = st.cancelled() => break,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            count.fetch_add(1, Ordering::Relaxed);
            let taken = at_accept();
            let (forward, st) = (forward.clone(), st.clone());
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                forward(client, server, taken, st).await;
            });
        }
    });
    Running {
        addr,
        stop,
        accepted,
    }
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
        let shared = Arc::new(Shared::default());
        let (sh, graves) = (shared.clone(), shared.clone());
        // The path token is taken at accept time: a connection accepted before
        // `drop_existing` is dropped with the others even if its upstream connect is late.
        let at_accept = move || sh.path.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let running = run(
            listener,
            upstream,
            at_accept,
            move |mut client, mut server, path: CancellationToken, st| {
                let graves = graves.clone();
                async move {
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = path.cancelled() => {
                            // Silently dropped: keep both sockets open and never touch them.
                            graves
                                .graveyard
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((client, server));
                        }
                    }
                }
            },
        );
        SilentDropProxyHandle { running, shared }
    }
}

/// Controls a running proxy; dropping it stops the proxy and closes every socket.
#[derive(Debug)]
pub struct SilentDropProxyHandle {
    running: Running,
    shared: Arc<Shared>,
}

impl SilentDropProxyHandle {
    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    /// Every connection open now stops forwarding, silently; new ones work.
    pub fn drop_existing(&self) {
        let old = std::mem::take(&mut *self.shared.path.lock().unwrap_or_else(|e| e.into_inner()));
        old.cancel();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.running.accepted.load(Ordering::Relaxed)
    }
}

/// A TCP proxy that delays every byte the server sends by a configurable time (the network
/// latency of a slow or distant database, or a server slow to answer), while the client's
/// bytes pass at once. The delay is added to the time each chunk was read, so pipelined
/// replies keep their pipelining: latency rises, throughput is not capped. Used to put
/// PostgreSQL behind a slow path (issue 15: "a slow database").
#[derive(Debug)]
pub struct DelayProxy;

#[derive(Debug, Default)]
struct DelayShared {
    /// Current delay of server replies, microseconds.
    delay_us: AtomicU64,
}

impl DelayProxy {
    /// Forwards connections accepted on `listener` to `upstream`, delaying the upstream's
    /// replies by `delay` (changeable later), until the handle is dropped.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(
        listener: TcpListener,
        upstream: SocketAddr,
        delay: std::time::Duration,
    ) -> DelayProxyHandle {
        let shared = Arc::new(DelayShared::default());
        shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        let sh = shared.clone();
        let running = run(
            listener,
            upstream,
            || (),
            move |client, server, (), st| {
                let sh = sh.clone();
                async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut sw).await;
                    };
                    let down = delayed_copy(&mut sr, &mut cw, &sh);
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = async { tokio::join!(up, down) } => {}
                    }
                }
            },
        );
        DelayProxyHandle { running, shared }
    }
}

/// Copies `from` to `to`, writing each chunk `delay` after it was read.
async fn delayed_copy(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    shared: &DelayShared,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, bytes::Bytes)>();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let d =
                        std::time::Duration::from_micros(shared.delay_us.load(Ordering::Relaxed));
                    let due = tokio::time::Instant::now() + d;
                    if tx
                        .send((due, bytes::Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Controls a running [`DelayProxy`]; dropping it stops the proxy and closes every socket.
#[derive(Debug)]
pub struct DelayProxyHandle {
    running: Running,
    shared: Arc<DelayShared>,
}

impl DelayProxyHandle {
    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    /// Sets the delay of server replies read from now on (zero: forward at once).
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.running.accepted.load(Ordering::Relaxed)
    }
}
