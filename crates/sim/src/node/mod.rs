//! Node simulator: serves the node API contract (`openapi/node-api.json`) on loopback from
//! memory, and misbehaves on request in every way of FAULTS.md rows N1 to N12.
//!
//! It speaks HTTP/1.1 over raw TCP rather than through axum or hyper: several faults (a lying
//! Content-Length, an unterminated chunked body, headers then silence, a reset mid-body, a
//! keep-alive connection closed under a request) need byte-level control of the socket.
//!
//! Faults are set per operation at start and switched at run time through the admin endpoint
//! (no API key; bind it to loopback):
//! - `GET /_sim/faults`: `{"list_users": "none", ...}`;
//! - `PUT /_sim/faults/{operation}` with the fault text as body (`trickle:300`, `status:503`);
//! - `GET /_sim/stats`: users, connections accepted, requests per operation, mutations
//!   applied and `overlapping_mutations`;
//! - `PUT /_sim/apply_delay` with milliseconds as body: every mutation (add, update, remove)
//!   waits this long while "being applied".
//!
//! **Overlapping applications.** A mutation for a UUID that arrives while another mutation for
//! the same UUID is still being applied (inside its apply delay) is counted in
//! `overlapping_mutations`: a client that applies one intent from two places at once shows
//! here. With no apply delay an overlap needs two requests inside the same few microseconds, so
//! tests that assert none set a delay (`--apply-delay-ms`, [`SimNodeOptions::apply_delay`]).

mod fault;
mod server;

pub use fault::{parse_fault_spec, Fault};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use node_api::{owned_email, NodeUser, Operation};

/// Options of a simulated node.
#[derive(Debug, Clone)]
pub struct SimNodeOptions {
    /// API key the node accepts in `x-api-key`. Default `sim-key`.
    pub api_key: String,
    /// Users seeded at start. Default 0.
    pub users: usize,
    /// Share of seeded users carrying vpnbot's ownership marker, 0..=1. Default 0.8.
    pub owned_share: f64,
    /// Faults active from the start.
    pub faults: Vec<(Operation, Fault)>,
    /// How long an idle keep-alive connection is kept before the node closes it. Default 60 s.
    pub keep_alive_idle: Duration,
    /// Seed of the user generator, so runs are reproducible. Default 1.
    pub seed: u64,
    /// How long each mutation (add, update, remove) takes to apply, during which another
    /// mutation for the same UUID counts as an overlap. Default 0.
    pub apply_delay: Duration,
}

impl Default for SimNodeOptions {
    fn default() -> Self {
        Self {
            api_key: "sim-key".into(),
            users: 0,
            owned_share: 0.8,
            faults: Vec::new(),
            keep_alive_idle: Duration::from_secs(60),
            seed: 1,
            apply_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct UserStore {
    pub(crate) map: HashMap<uuid::Uuid, std::sync::Arc<str>>,
    /// Serialized `list-users` body, rebuilt after a change.
    pub(crate) list_cache: Option<Bytes>,
    /// Bumped by every change, so a body serialized from an older snapshot is not cached.
    pub(crate) generation: u64,
}

impl UserStore {
    /// Adds or replaces a user and drops the cached body.
    pub(crate) fn put(&mut self, uuid: uuid::Uuid, email: String) {
        self.map.insert(uuid, email.into());
        self.changed();
    }

    /// Marks the store changed: the cached body is stale.
    pub(crate) fn changed(&mut self) {
        self.list_cache = None;
        self.generation += 1;
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) api_key: String,
    pub(crate) users: Mutex<UserStore>,
    pub(crate) faults: Mutex<[Fault; 5]>,
    pub(crate) requests: [AtomicU64; 5],
    pub(crate) connections: AtomicU64,
    pub(crate) keep_alive_idle: Duration,
    pub(crate) cancel: CancellationToken,
    /// Mutation apply delay, milliseconds.
    pub(crate) apply_delay_ms: AtomicU64,
    /// Mutations being applied now, per UUID.
    pub(crate) applying: Mutex<HashMap<uuid::Uuid, u32>>,
    /// Mutations that began while another one for the same UUID was being applied.
    pub(crate) overlaps: AtomicU64,
    /// Mutations applied (answered by the contract, any result).
    pub(crate) mutations: AtomicU64,
}

impl Shared {
    pub(crate) fn users(&self) -> std::sync::MutexGuard<'_, UserStore> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn faults(&self) -> std::sync::MutexGuard<'_, [Fault; 5]> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a mutation of `uuid` as being applied until the guard drops; counts an overlap
    /// when another one for the same UUID is in progress.
    pub(crate) fn begin_mutation(self: &Arc<Self>, uuid: uuid::Uuid) -> Applying {
        let mut m = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(uuid).or_insert(0);
        if *n > 0 {
            self.overlaps.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%uuid, "sim-node: overlapping mutation for the same uuid");
        }
        *n += 1;
        Applying {
            shared: self.clone(),
            uuid,
        }
    }

    /// The fault for this request of `op`; a `flaky:N` counts down and clears itself.
    pub(crate) fn take_fault(&self, op: Operation) -> Fault {
        let mut faults = self.faults();
        let slot = &mut faults[op.index()];
        match slot {
            Fault::Flaky(0) => {
                *slot = Fault::None;
                Fault::None
            }
            Fault::Flaky(n) => {
                *n -= 1;
                let f = Fault::Status(503);
                if *n == 0 {
                    *slot = Fault::None;
                }
                f
            }
            f => f.clone(),
        }
    }
}

/// A mutation in progress (see [`Shared::begin_mutation`]).
#[derive(Debug)]
pub(crate) struct Applying {
    shared: Arc<Shared>,
    uuid: uuid::Uuid,
}

impl Drop for Applying {
    fn drop(&mut self) {
        let mut m = self
            .shared
            .applying
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.uuid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uuid);
            }
        }
    }
}

/// The simulator.
#[derive(Debug)]
pub struct SimNode;

impl SimNode {
    /// Seeds the users and serves on `listener` (bound by the caller, port 0 in tests) until
    /// the handle is dropped or [`SimNodeHandle::shutdown`] is called.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(listener: TcpListener, opts: SimNodeOptions) -> SimNodeHandle {
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let mut map = HashMap::with_capacity(opts.users);
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        for i in 0..opts.users {
            let uuid = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
            let email = if rng.random::<f64>() < opts.owned_share {
                owned_email(uuid)
            } else {
                format!("user{i}@operator")
            };
            map.insert(uuid, email.into());
        }
        let mut faults: [Fault; 5] = Default::default();
        for (op, f) in &opts.faults {
            faults[op.index()] = f.clone();
        }
        let shared = Arc::new(Shared {
            api_key: opts.api_key,
            users: Mutex::new(UserStore {
                generation: 0,
                map,
                list_cache: None,
            }),
            faults: Mutex::new(faults),
            requests: Default::default(),
            connections: AtomicU64::new(0),
            keep_alive_idle: opts.keep_alive_idle,
            cancel: CancellationToken::new(),
            apply_delay_ms: AtomicU64::new(opts.apply_delay.as_millis() as u64),
            applying: Mutex::new(HashMap::new()),
            overlaps: AtomicU64::new(0),
            mutations: AtomicU64::new(0),
        });
        let task = tokio::spawn(server::accept_loop(listener, shared.clone()));
        SimNodeHandle { addr, shared, task }
    }
}

/// Control of a running simulated node. Dropping it stops the node and every connection.
#[derive(Debug)]
pub struct SimNodeHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl SimNodeHandle {
    /// The address the node listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/`, the base URL to give a client.
    pub fn base_url(&self) -> url::Url {
        url::Url::parse(&format!("http://{}/", self.addr)).expect("valid URL")
    }

    /// The API key the node accepts.
    pub fn api_key(&self) -> &str {
        &self.shared.api_key
    }

    /// Switches the fault of `operation` (takes effect on the next request).
    pub fn set_fault(&self, operation: Operation, fault: Fault) {
        self.shared.faults()[operation.index()] = fault;
    }

    /// The fault of `operation` now.
    pub fn fault(&self, operation: Operation) -> Fault {
        self.shared.faults()[operation.index()].clone()
    }

    /// Every user on the node now.
    pub fn users(&self) -> Vec<NodeUser> {
        self.shared
            .users()
            .map
            .iter()
            .map(|(uuid, email)| NodeUser {
                uuid: *uuid,
                email: email.to_string(),
            })
            .collect()
    }

    /// Number of users on the node now.
    pub fn user_count(&self) -> usize {
        self.shared.users().map.len()
    }

    /// Adds or replaces a user directly, bypassing the API and its faults.
    pub fn insert_user(&self, user: NodeUser) {
        self.shared.users().put(user.uuid, user.email);
    }

    /// Requests received for `operation` (answered or not).
    pub fn requests(&self, operation: Operation) -> u64 {
        self.shared.requests[operation.index()].load(Ordering::Relaxed)
    }

    /// Mutations (add, update, remove) that began while another mutation for the same UUID was
    /// still being applied. 0 means no UUID was ever mutated from two places at once.
    pub fn overlapping_mutations(&self) -> u64 {
        self.shared.overlaps.load(Ordering::Relaxed)
    }

    /// Mutations applied so far (any result, faults that answer before applying excluded).
    pub fn mutations(&self) -> u64 {
        self.shared.mutations.load(Ordering::Relaxed)
    }

    /// Sets how long each mutation takes to apply (see [`SimNodeOptions::apply_delay`]).
    pub fn set_apply_delay(&self, delay: Duration) {
        self.shared
            .apply_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Serializes the `list-users` body now (on the blocking pool), so that a later request
    /// does not pay for it; benchmarks use this to time the client alone.
    pub async fn warm(&self) {
        server::list_body(&self.shared).await;
    }

    /// Stops accepting and closes every connection, held ones included.
    pub fn shutdown(&self) {
        self.shared.cancel.cancel();
    }
}

impl Drop for SimNodeHandle {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        self.task.abort();
    }
}

/// `vpnbot sim-node` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SimNodeArgs {
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Users to seed (e.g. 1000000).
    #[arg(long, default_value_t = 0)]
    pub users: usize,
    /// Share of seeded users that carry vpnbot's ownership marker, 0 to 1.
    #[arg(long, default_value_t = 0.8)]
    pub owned_share: f64,
    /// Fault per operation, repeatable: `--fault list-users=headers_then_silence`.
    /// Modes: none, delay:MS, headers_then_silence, trickle:MS, endless_chunked, short_body,
    /// reset_mid_body, no_headers, reset, status:CODE, rate_limited:SECS, flaky:N,
    /// malformed_json, wrong_schema, non_uuid, auth_reject, apply_then_500, apply_then_drop,
    /// stale_keepalive.
    #[arg(long = "fault", value_name = "OP=MODE", value_parser = parse_fault_spec)]
    pub faults: Vec<(Operation, Fault)>,
    /// API key the node accepts.
    #[arg(
        long,
        env = "VPNBOT_SIM_API_KEY",
        default_value = "sim-key",
        hide_env_values = true
    )]
    pub api_key: String,
    /// Seconds an idle keep-alive connection is kept open by the node.
    #[arg(long, default_value_t = 60.0)]
    pub keep_alive_idle_seconds: f64,
    /// Milliseconds each mutation takes to apply (overlapping mutations of one UUID are
    /// counted in `/_sim/stats`).
    #[arg(long, default_value_t = 0)]
    pub apply_delay_ms: u64,
}

/// Runs `vpnbot-sim node` until Ctrl-C.
///
/// # Errors
/// When the address cannot be bound or the arguments are out of range.
pub async fn run(args: SimNodeArgs) -> anyhow::Result<()> {
    run_until(
        args,
        |addr| println!("sim-node listening on http://{addr}/ (admin: http://{addr}/_sim/faults)"),
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await
}

/// Runs the simulator until `shutdown` completes; `on_ready` gets the bound address.
///
/// # Errors
/// When the address cannot be bound or the arguments are out of range.
pub async fn run_until(
    args: SimNodeArgs,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.owned_share),
        "--owned-share must be between 0 and 1"
    );
    anyhow::ensure!(
        args.keep_alive_idle_seconds.is_finite() && args.keep_alive_idle_seconds > 0.0,
        "--keep-alive-idle-seconds must be positive"
    );
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding sim-node to {}", args.listen))?;
    let users = args.users;
    let opts = SimNodeOptions {
        api_key: args.api_key,
        users,
        owned_share: args.owned_share,
        faults: args.faults,
        keep_alive_idle: Duration::from_secs_f64(args.keep_alive_idle_seconds),
        apply_delay: Duration::from_millis(args.apply_delay_ms),
        ..Default::default()
    };
    // Seeding a million users takes a moment of CPU: keep it off the runtime workers.
    let multi = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    let handle = if multi {
        tokio::task::block_in_place(|| SimNode::start(listener, opts))
    } else {
        SimNode::start(listener, opts)
    };
    tracing::info!(addr = %handle.addr(), users, "sim-node started");
    on_ready(handle.addr());
    shutdown.await;
    handle.shutdown();
    Ok(())
}
