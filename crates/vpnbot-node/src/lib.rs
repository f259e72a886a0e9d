//! `vpnbot-node`: the node agent. It serves vpnbot's node API contract (the `node-api` crate,
//! `openapi/node-api.json`) on a VPN node and drives the node's proxy core (V2Ray 4.x or
//! Xray-core ≥ 24.11) through the core's gRPC `HandlerService`, keeping its own durable ledger
//! of the users it manages (see [`agent`] for the semantics, [`ledger`] for the store).

pub mod agent;
pub mod config;
pub mod core;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod proto;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use agent::Agent;
pub use config::{Config, CoreKind};

/// A running agent: its address, the agent, and the tasks serving it (aborted on drop).
#[derive(Debug)]
pub struct Running {
    /// The address the node API listens on.
    pub addr: SocketAddr,
    /// The agent.
    pub agent: Arc<Agent>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops serving and probing, and waits until the tasks are gone (the ledger file is closed
    /// once the last handle to the agent is dropped).
    pub async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Why [`start`] could not start the agent.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The ledger file cannot be opened or read.
    #[error("state {path}: {source}")]
    Ledger {
        /// The ledger file (`state`).
        path: std::path::PathBuf,
        /// What failed.
        source: ledger::LedgerError,
    },
    /// `core_api` is not a valid address.
    #[error(transparent)]
    CoreAddress(#[from] core::InvalidCoreAddress),
    /// `tls_cert` / `tls_key` cannot be loaded.
    #[error("tls_cert/tls_key: {0}")]
    Tls(std::io::Error),
    /// The listener cannot be used (non-blocking mode, local address, runtime registration).
    #[error("listener: {0}")]
    Listener(std::io::Error),
    /// The blocking task opening the ledger panicked or was cancelled.
    #[error("opening the ledger: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Opens the ledger, builds the core client, and serves the node API on `listener` (TLS when
/// the config has a certificate), resyncing the ledger into the core and probing it every
/// `probe_interval`.
///
/// # Errors
/// The ledger cannot be opened, the core address is invalid, or the TLS files cannot be loaded.
pub async fn start(cfg: &Config, listener: std::net::TcpListener) -> Result<Running, StartError> {
    let metrics = metrics::Metrics::new();
    let path = cfg.state.clone();
    let ledger = tokio::task::spawn_blocking(move || ledger::Ledger::open(&path))
        .await?
        .map_err(|source| StartError::Ledger {
            path: cfg.state.clone(),
            source,
        })?;
    let core = core::Core::new(
        cfg.core,
        &cfg.core_api,
        &cfg.inbound_tag,
        cfg.user_level,
        cfg.core_timeout,
        metrics.clone(),
    )?;
    // A mutation waits at most this long for another mutation or a resync.
    let lock_wait = (cfg.core_timeout * 2).max(Duration::from_secs(1));
    let agent = Arc::new(Agent::new(ledger, core, metrics, lock_wait));
    let n = agent
        .blocking(|l| l.len())
        .await
        .map_err(|source| StartError::Ledger {
            path: cfg.state.clone(),
            source,
        })?;
    agent.metrics().ledger_users.set(n as i64);
    listener
        .set_nonblocking(true)
        .map_err(StartError::Listener)?;
    let addr = listener.local_addr().map_err(StartError::Listener)?;
    let app = http::router(agent.clone(), &cfg.api_key);
    let server = match &cfg.tls {
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(StartError::Tls)?;
            let srv = axum_server::from_tcp_rustls(listener, tls).map_err(StartError::Listener)?;
            tokio::spawn(async move {
                if let Err(e) = srv.serve(app.into_make_service()).await {
                    tracing::error!(error = %e, "node API server failed");
                }
            })
        }
        None => {
            let l = tokio::net::TcpListener::from_std(listener).map_err(StartError::Listener)?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    tracing::error!(error = %e, "node API server failed");
                }
            })
        }
    };
    let probe = tokio::spawn(agent.clone().run_probe_loop(cfg.probe_interval));
    tracing::info!(
        %addr,
        core = cfg.core.as_str(),
        core_api = %cfg.core_api,
        inbound_tag = %cfg.inbound_tag,
        ledger_users = n,
        tls = cfg.tls.is_some(),
        "vpnbot-node serving the node API"
    );
    Ok(Running {
        addr,
        agent,
        tasks: vec![server, probe],
    })
}
