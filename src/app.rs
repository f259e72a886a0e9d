//! Assembles one vpnbot instance: registry, observability server, pool, migrations, readiness
//! probe, leadership and workers. `run`, `demo` and the integration tests all start the same
//! [`App`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use secrecy::ExposeSecret;

use crate::bot::{BotApi, BotDeps, BotMetrics, BotService};
use crate::config::Config;
use crate::db::leader::{LeaderHandle, Leadership};
use crate::db::{self, DbError, DbPool};
use crate::diagnostics::Diagnostics;
use crate::expiry::{ExpiryMetrics, ExpiryWorker};
use crate::fleet::Fleet;
use crate::obs::health::DiagnosticsView;
use crate::obs::health::HealthState;
use crate::obs::server::{
    debug_router, scrape_router, DebugAccess, DebugPlacement, ObsServer, ObsState,
};
use crate::outbox::{Outbox, OutboxMetrics};
use crate::reconcile::{ReconcileStatus, Reconciler};
use crate::signals::ShutdownSignal;
use crate::sources::{NodeCallSource, PoolSource};
use crate::supervisor::Supervisor;
use crate::tasks::{CriticalExit, Tasks};

/// Task families whose end (a return before shutdown, or a panic) shuts the process down
/// (see [`crate::tasks`]): leadership, the database monitor (it runs `/readyz`'s writability
/// check) and the observability servers' watchers.
pub const CRITICAL_TASKS: [&str; 4] =
    ["leadership", "db_monitor", "obs_server", "obs_debug_server"];

/// A critical task that ends when the observability server's thread ends: a server that dies
/// on its own (its runtime failed, a panic) takes the process down instead of leaving it
/// unobservable. At shutdown the root token is cancelled before the server is stopped.
fn watch_obs_server(tasks: &Tasks, family: &'static str, server: &ObsServer) {
    let exited = server.exited();
    let root = tasks.root().clone();
    tasks.spawn_critical(family, async move {
        tokio::select! {
            _ = root.cancelled() => {}
            _ = exited => {}
        }
    });
}

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The observability server could not bind its address.
    #[error("observability server cannot listen on {addr}: {source}")]
    ObsBind {
        /// The configured address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The database is unreachable, read-only, or its migrations failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A connection pooler in front of the database is in a mode this configuration cannot
    /// work with (see [`db::pooler`]).
    #[error(transparent)]
    Pooler(#[from] db::pooler::PoolerError),
    /// The Bot API client could not be built (bad `telegram.api_url`).
    #[error("telegram bot: {0}")]
    Bot(#[from] crate::bot::BotApiBuildError),
    /// The webhook listener (`telegram.webhook.listen`) could not be bound.
    #[error("webhook endpoint cannot listen on {addr}: {source}")]
    WebhookBind {
        /// The configured address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// A node's client could not be built from its configuration.
    #[error("node {node}: {source}")]
    Node {
        /// The node name.
        node: String,
        /// Why.
        #[source]
        source: crate::node::NodeError,
    },
}

impl StartError {
    /// Process exit code: `EX_UNAVAILABLE` (69) for an unreachable database, 64 for a pooler
    /// mode the configuration cannot work with, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Db(DbError::AcquireTimeout { .. }) => db::connect::EXIT_DB_UNAVAILABLE,
            StartError::Db(e) => e.exit_code(),
            StartError::Pooler(_) => crate::config::EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// Process-wide instruments, created before the main runtime: the one metrics registry, the
/// diagnostics (whose poll hooks the runtime builder installs), and for `run`/`demo` the
/// global subscriber with its layers (logs, open-span registry, tokio-console, OTLP).
#[derive(Debug)]
pub struct Instruments {
    /// The one metrics registry.
    pub registry: Registry,
    /// Runtime diagnostics and the watchdog.
    pub diagnostics: Diagnostics,
    /// The service manager (systemd `Type=notify`), pinged by the watchdog thread; disabled
    /// without `NOTIFY_SOCKET`.
    pub supervisor: Supervisor,
    open_spans: Option<crate::diagnostics::OpenSpans>,
    otel: Option<crate::otel::OtelGuard>,
}

impl Instruments {
    /// The service manager as the watchdog thread's progress sink (`WATCHDOG=1` while the
    /// runtime progresses); give it to [`Diagnostics::start`].
    pub fn progress_sink(&self) -> Option<Arc<dyn crate::diagnostics::ProgressSink>> {
        Some(Arc::new(self.supervisor.clone()))
    }

    /// Registry and diagnostics only; no global subscriber (tests, tools).
    pub fn bare(config: &Config) -> Instruments {
        let registry = crate::metrics::new_registry();
        let diagnostics = Diagnostics::new(
            crate::metrics::NAMING,
            config.diagnostics.clone(),
            &registry,
        );
        let supervisor = Supervisor::from_env();
        Instruments {
            registry,
            diagnostics,
            supervisor,
            open_spans: None,
            otel: None,
        }
    }

    /// As [`Instruments::bare`], and installs the global subscriber: the log layer, the
    /// diagnostics' open-span registry, tokio-console when enabled, OTLP export when an
    /// endpoint is configured. Call before building the main runtime.
    pub fn install(config: &Config) -> Instruments {
        let mut me = Self::bare(config);
        let spans_layer = crate::diagnostics::OpenSpansLayer::new().track_target("vpnbot");
        me.open_spans = Some(spans_layer.spans());
        // Behind its own filter: vpnbot's spans only, so it enables no dependency callsite.
        let mut layers: Vec<crate::telemetry::BoxedLayer> = vec![Box::new(
            spans_layer.filtered::<tracing_subscriber::Registry>(),
        )];
        if let Some(console) =
            crate::diagnostics::console_layer::<tracing_subscriber::Registry>(&config.diagnostics)
        {
            layers.push(Box::new(console));
        }
        if let Some((layer, guard)) = crate::otel::otel_layer(&config.observability, &me.registry) {
            layers.push(layer);
            me.otel = Some(guard);
        }
        crate::telemetry::init(&config.observability, layers);
        me
    }

    /// The open-span registry installed by [`Instruments::install`] (`None` for
    /// [`Instruments::bare`]).
    pub fn open_spans(&self) -> Option<&crate::diagnostics::OpenSpans> {
        self.open_spans.as_ref()
    }

    /// Flushes and stops trace export (bounded). Blocking: call it outside the main runtime.
    pub fn shutdown(self) {
        self.diagnostics.stop();
        if let Some(g) = self.otel {
            g.shutdown();
        }
    }
}

/// A running instance.
#[derive(Debug)]
pub struct App {
    /// The effective configuration.
    pub config: Config,
    /// The one metrics registry.
    pub registry: Registry,
    /// The instrumented pool.
    pub pool: DbPool,
    /// Long-lived tasks and the root cancellation token.
    pub tasks: Tasks,
    /// Leadership read side.
    pub leader: LeaderHandle,
    /// Health sources read by the observability server.
    pub health: Arc<HealthState>,
    /// The configured nodes' clients.
    pub fleet: Fleet,
    /// Runtime diagnostics and the watchdog.
    pub diagnostics: Diagnostics,
    /// When reconcile runs last completed (for the watchdog's `worker_overdue` check).
    pub reconcile: ReconcileStatus,
    /// The bot, when `telegram.token` is set (it polls only while this instance leads).
    pub bot: Option<BotService>,
    /// The reconcile worker's step, for the CLI, `/reconcile` and the demo.
    pub reconciler: Reconciler,
    /// Where the webhook endpoint listens (`telegram.mode = "webhook"` with a token set).
    pub webhook_addr: Option<SocketAddr>,
    supervisor: Supervisor,
    obs: Option<ObsServer>,
    obs_debug: Option<ObsServer>,
}

impl App {
    /// Starts an instance with [`Instruments::bare`] (tests).
    ///
    /// # Errors
    /// As [`App::start_with`].
    pub async fn start(config: Config) -> Result<App, StartError> {
        let instruments = Instruments::bare(&config);
        Self::start_with(config, &instruments).await
    }

    /// Starts an instance on the current (main) runtime. The observability server comes up
    /// first so an operator can see a database that is down; the watchdog starts next.
    ///
    /// # Errors
    /// [`StartError`]; the database is checked with one direct connection first so that an
    /// unreachable server reads as such, not as a pool timeout.
    pub async fn start_with(config: Config, instruments: &Instruments) -> Result<App, StartError> {
        let registry = instruments.registry.clone();
        let diagnostics = instruments.diagnostics.clone();
        let tasks = Tasks::new();
        // Their end means the process is broken: leadership (spawned by db::leader), the
        // database monitor behind /readyz, and the watchers of the observability servers.
        for family in CRITICAL_TASKS {
            tasks.mark_critical(family);
        }
        // Cheap and lazy (no connection yet), so the health state is whole before the server
        // answers.
        let fleet = Fleet::from_config(&config, &registry)
            .map_err(|(node, source)| StartError::Node { node, source })?;
        let pool = DbPool::connect(&config.db, &registry)?;
        let leadership = Leadership::new(&registry);
        let health = Arc::new(HealthState {
            leader: Some(leadership.handle()),
            db_max_age: config.db.readiness_interval_seconds * 3,
            db_connect: Some(pool.connect_health().clone()),
            diagnostics: Some(Arc::new(diagnostics.clone())),
            breakers: Some(Arc::new(fleet.clone())),
            ..HealthState::default()
        });
        let listen: SocketAddr = config.observability.listen;
        let state = ObsState {
            registry: registry.clone(),
            health: health.clone(),
        };
        let o = &config.observability;
        let placement = DebugPlacement::decide(
            listen,
            o.debug_listen,
            (!o.debug_token.expose_secret().is_empty()).then(|| o.debug_token.clone()),
        );
        if matches!(placement.on_scrape_listener, DebugAccess::Off)
            && placement.own_listener.is_none()
        {
            tracing::warn!(
                %listen,
                "debug endpoints (/debug/*) are off: observability.listen is not loopback; set \
                 observability.debug_listen (loopback) or observability.debug_token"
            );
        }
        let obs = ObsServer::serve(
            listen,
            "vpnbot-obs",
            scrape_router(state.clone())
                .merge(debug_router(state.clone(), placement.on_scrape_listener)),
        )
        .map_err(|source| StartError::ObsBind {
            addr: listen,
            source,
        })?;
        let obs_debug = match placement.own_listener {
            Some((addr, access)) => Some(
                ObsServer::serve(addr, "vpnbot-obs-debug", debug_router(state, access))
                    .map_err(|source| StartError::ObsBind { addr, source })?,
            ),
            None => None,
        };

        check_database(&config).await.inspect_err(|e| {
            if let StartError::Db(e) = e {
                pool.metrics().count_error(e)
            }
        })?;
        if config.db.direct_url.expose_secret().is_empty() {
            db::migrate(&pool).await?;
        } else {
            db::pooler::migrate_direct(&config.db).await?;
        }
        tracing::info!("database migrations applied");

        watch_obs_server(&tasks, "obs_server", &obs);
        if let Some(o) = &obs_debug {
            watch_obs_server(&tasks, "obs_debug_server", o);
        }
        diagnostics.add_source(Arc::new(PoolSource::new(
            pool.inflight().clone(),
            pool.acquire_timeout(),
            config.db.statement_timeout_seconds,
        )));
        diagnostics.add_source(Arc::new(NodeCallSource::new(fleet.inflight().clone())));
        // /readyz's writability check runs on the monitoring connection (never waits for the
        // pool); see db::monitor.
        let db_monitor = db::monitor::DbMonitor::new(&pool, &registry, health.db.clone());
        diagnostics.add_source(Arc::new(db_monitor.clone()));
        diagnostics.add_source(Arc::new(db_monitor.db_time_source()));
        tasks.spawn_named("db_monitor", db_monitor.clone().run(tasks.root().clone()));
        if let Some(spans) = &instruments.open_spans {
            diagnostics.add_source(Arc::new(spans.clone()));
        }
        diagnostics.start(
            &tokio::runtime::Handle::current(),
            &tasks,
            instruments.progress_sink(),
        );
        let leader = leadership.compete(
            &config.leader,
            &db::pooler::direct_config(&config.db),
            &tasks,
            pool.connect_health().clone(),
        );
        // Leadership connects before the shared workers grow the pool (bounded: an
        // unreachable database does not hold start-up longer than one attempt).
        leader
            .first_attempt(config.db.connect_timeout_seconds + config.leader.check_timeout_seconds)
            .await;
        let drain = config.runtime.shutdown_drain_seconds;
        // Reconcile, the outbox and expiry run on every instance, sharing the work through
        // PostgreSQL (node leases, claimed intents and batches); only the bot's getUpdates
        // consumer stays with the leader.
        let instance_id = crate::reconcile::lease::new_instance_id();
        tracing::info!(instance_id = %instance_id, "instance id for shared work");
        let outbox = Outbox::new(
            pool.clone(),
            fleet.clone(),
            OutboxMetrics::register(&registry),
            config.outbox.clone(),
        )
        .with_diagnostics(diagnostics.clone())
        .with_instance_id(&instance_id)
        .with_call_bound(config.node_client.total_deadline_seconds);
        tasks.spawn_named("outbox", outbox.run(tasks.root().child_token()));
        let reconciler = Reconciler::watched(
            pool.clone(),
            fleet.clone(),
            &registry,
            config.reconcile.clone(),
            Some(diagnostics.clone()),
        );
        let reconcile = reconciler.status();
        diagnostics.add_source(Arc::new(reconcile.clone()));
        if config.reconcile.enabled {
            let leases = crate::reconcile::lease::Leases::new(
                pool.clone(),
                instance_id.clone(),
                fleet.names().map(str::to_owned).collect(),
                &config.reconcile,
                crate::reconcile::lease::LeaseMetrics::register(&registry),
            );
            tasks.spawn_named(
                "reconcile_leases",
                leases.clone().run(tasks.root().child_token()),
            );
            tasks.spawn_named(
                "reconcile",
                reconciler
                    .clone()
                    .run_leased(leases, tasks.root().child_token()),
            );
        }
        // The bot polls only when a token is set, and only on the leader (one poller per
        // token); the expiry worker runs on every instance either way.
        let bot = if config.telegram.token.expose_secret().is_empty() {
            tracing::warn!("telegram.token is empty: the bot is off");
            None
        } else {
            let metrics = BotMetrics::register(&registry);
            let api = BotApi::new(&config.telegram, &config.bot, metrics)?;
            Some(BotService::new(
                api,
                pool.clone(),
                fleet.clone(),
                BotDeps {
                    nodes: crate::bot::public_nodes(&config.nodes),
                    admin_ids: config.telegram.admin_ids.clone(),
                    tasks: tasks.clone(),
                    health: Some(health.clone()),
                    registry: Some(registry.clone()),
                    reconcile: Some(Arc::new(reconciler.clone())),
                    diagnostics: Some(diagnostics.clone()),
                },
            ))
        };
        let expiry = ExpiryWorker::new(
            pool.clone(),
            bot.as_ref().map(|b| b.api().clone()),
            config.bot.clone(),
            ExpiryMetrics::register(&registry),
        )
        .with_diagnostics(diagnostics.clone());
        tasks.spawn_named("expiry", expiry.run(tasks.root().child_token()));
        let mut webhook_addr = None;
        if let Some(b) = bot.clone() {
            let t = &config.telegram;
            // Every instance forgets old update ids (bounded batches, SKIP LOCKED).
            tasks.spawn_named(
                "bot_dedup_cleanup",
                b.clone().run_dedup_cleanup(
                    t.dedup_retention_seconds,
                    t.dedup_cleanup_interval_seconds,
                    t.dedup_cleanup_batch,
                    tasks.root().clone(),
                ),
            );
            b.api()
                .metrics()
                .set_receive_mode(t.mode == crate::config::TelegramMode::Webhook);
            match t.mode {
                // One getUpdates consumer per token: the leader.
                crate::config::TelegramMode::Polling => {
                    leader.run_while_leader(&tasks, "bot_polling", drain, move |token| {
                        b.clone().run(token)
                    });
                }
                // Every instance serves the webhook; PostgreSQL deduplicates.
                crate::config::TelegramMode::Webhook => {
                    let addr = t.webhook.listen;
                    let bind = |source| StartError::WebhookBind { addr, source };
                    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
                    if let Err(e) = b.warm().await {
                        tracing::warn!(error = %e, "node load not counted at start; the first pick counts");
                    }
                    webhook_addr = Some(
                        b.serve_webhook(listener, &t.webhook, &tasks)
                            .map_err(bind)?,
                    );
                }
            }
        }

        let supervisor = instruments.supervisor.clone();
        if supervisor.is_enabled() {
            spawn_service_status(&tasks, &supervisor, &leader, &reconcile);
            check_watchdog_timeout(&supervisor, &config);
        }
        supervisor.ready(&format!(
            "started; observability on {}; {}",
            obs.addr(),
            crate::supervisor::status_line(
                leader.is_leader(),
                leader.failing().is_some(),
                reconcile.last_completed()
            )
        ));
        tracing::info!(observability = %obs.addr(), webhook = ?webhook_addr, "vpnbot started");
        Ok(App {
            config,
            registry,
            pool,
            tasks,
            leader,
            health,
            fleet,
            diagnostics,
            reconcile,
            bot,
            webhook_addr,
            reconciler,
            supervisor,
            obs: Some(obs),
            obs_debug,
        })
    }

    /// Address of the observability server.
    pub fn obs_addr(&self) -> SocketAddr {
        self.obs.as_ref().expect("running").addr()
    }

    /// Address of the debug endpoints' own listener, when `observability.debug_listen` is set.
    pub fn debug_addr(&self) -> Option<SocketAddr> {
        self.obs_debug.as_ref().map(|o| o.addr())
    }

    /// Waits for SIGINT/SIGTERM or for the root token to be cancelled, then shuts down.
    /// Registers the signal listeners now; use [`Self::run_until`] with listeners registered
    /// before startup so that a signal during startup is not lost. A critical task's end is
    /// logged (by [`crate::tasks`]) but not returned; use [`Self::run_until`] for it.
    pub async fn run_until_signal(self) {
        match ShutdownSignal::install() {
            Ok(signal) => {
                let _ = self.run_until(signal).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers; shutting down");
                self.shutdown().await;
            }
        }
    }

    /// Waits for a signal from `signal` (possibly one already delivered during startup) or for
    /// the root token to be cancelled, then shuts down.
    ///
    /// # Errors
    /// [`CriticalExit`] naming the critical task whose end cancelled the root token (or that
    /// ended during the shutdown itself): the process must exit non-zero
    /// ([`crate::tasks::EXIT_CRITICAL_TASK`]).
    pub async fn run_until(self, mut signal: ShutdownSignal) -> Result<(), CriticalExit> {
        let root = self.tasks.root().clone();
        tokio::select! {
            _ = root.cancelled() => tracing::warn!("root token cancelled; shutting down"),
            s = signal.recv() => tracing::info!(signal = s, "signal received; shutting down"),
        }
        let tasks = self.tasks.clone();
        self.shutdown().await;
        match tasks.critical_exit() {
            Some(exit) => {
                tracing::error!(task = exit.task, "exiting non-zero: {exit}");
                Err(exit)
            }
            None => Ok(()),
        }
    }

    /// Cancels every task, waits up to the drain bound, closes the pool (bounded) and stops the
    /// observability server.
    pub async fn shutdown(mut self) {
        let drain = self.config.runtime.shutdown_drain_seconds;
        self.supervisor
            .stopping(&format!("draining (at most {} s)", drain.as_secs_f64()));
        if !self.tasks.shutdown(drain).await {
            tracing::error!(?drain, "some tasks did not finish within the drain bound");
        }
        if tokio::time::timeout(Duration::from_secs(5), self.pool.close())
            .await
            .is_err()
        {
            tracing::error!("database pool did not close within 5 s");
        }
        self.diagnostics.stop();
        let quiet_by = tokio::time::Instant::now() + Duration::from_secs(3);
        while self.diagnostics.task_dump_in_flight() && tokio::time::Instant::now() < quiet_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let servers = (self.obs.take(), self.obs_debug.take());
        // Joining the server threads is blocking; keep it off the runtime workers.
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(o) = servers.0 {
                o.stop();
            }
            if let Some(o) = servers.1 {
                o.stop();
            }
        })
        .await;
        tracing::info!("shutdown complete");
    }
}

/// How often the `STATUS=` line is refreshed when it changed.
const SERVICE_STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the service manager's `STATUS=` line current: on every leadership change and every
/// [`SERVICE_STATUS_INTERVAL`], sent only when it changed.
fn spawn_service_status(
    tasks: &Tasks,
    supervisor: &Supervisor,
    leader: &LeaderHandle,
    reconcile: &ReconcileStatus,
) {
    let (supervisor, leader, reconcile) = (supervisor.clone(), leader.clone(), reconcile.clone());
    let root = tasks.root().clone();
    tasks.spawn_named("service_status", async move {
        let mut changes = leader.subscribe();
        let mut last = String::new();
        let mut watching = true;
        loop {
            let line = crate::supervisor::status_line(
                leader.is_leader(),
                leader.failing().is_some(),
                reconcile.last_completed(),
            );
            // The reconcile age changes every second; resend only when the role changed or
            // the last run did.
            let key = format!(
                "{} {:?}",
                line.split(';').next().unwrap_or(""),
                reconcile.last_completed()
            );
            if key != last {
                supervisor.status(&line);
                last = key;
            }
            tokio::select! {
                _ = root.cancelled() => return,
                // A closed channel (leadership task gone) falls back to the interval.
                r = changes.changed(), if watching => watching = r.is_ok(),
                _ = tokio::time::sleep(SERVICE_STATUS_INTERVAL) => {}
            }
        }
    });
}

/// Warns when the service manager's watchdog timeout is too short for a stall to be detected
/// and dumped before the kill: stall threshold + task dump deadline + 1 s of native stacks.
fn check_watchdog_timeout(supervisor: &Supervisor, config: &Config) {
    let Some(timeout) = supervisor.watchdog_timeout() else {
        return;
    };
    let needed = config.diagnostics.min_service_watchdog();
    if timeout < needed {
        tracing::warn!(
            watchdog_seconds = timeout.as_secs_f64(),
            needed_seconds = needed.as_secs_f64(),
            "WatchdogSec is shorter than stall detection plus the dump: a stalled process may \
             be killed before its dump is written"
        );
    }
}

/// One direct connection with the connect timeout, so "server down" and "wrong password" are
/// reported as themselves before the pool starts retrying (see [`db::connect::preflight`]).
///
/// # Errors
/// [`DbError::Unavailable`].
pub async fn preflight(config: &Config) -> Result<(), DbError> {
    db::connect::preflight(&config.db).await
}

/// What `run` (and `migrate`) check before touching the pool: one direct connection to
/// `db.url` and to `db.direct_url` when set (exit 69 with the cause), then what any connection
/// pooler in front of them allows (exit 64 naming the pool mode; see [`db::pooler`]).
///
/// # Errors
/// [`StartError::Db`] or [`StartError::Pooler`].
pub async fn check_database(config: &Config) -> Result<(), StartError> {
    preflight(config).await?;
    if !config.db.direct_url.expose_secret().is_empty() {
        db::connect::preflight(&db::pooler::direct_config(&config.db)).await?;
    }
    db::pooler::check(&config.db).await??;
    Ok(())
}

impl DiagnosticsView for Diagnostics {
    fn stall(&self) -> Option<String> {
        Diagnostics::stall(self).map(|k| k.as_str().to_string())
    }

    fn latest_dump_json(&self) -> Option<String> {
        self.latest_dump().map(|d| d.to_json())
    }

    fn dump_now_json(&self) -> String {
        self.dump_now().to_json()
    }

    fn degraded(&self) -> Option<String> {
        Diagnostics::degraded(self)
    }
}

impl crate::bot::ReconcileTrigger for Reconciler {
    /// The iteration timeout, plus the audit record's bound and 10 s for the report.
    fn bound(&self) -> Duration {
        self.settings().iteration_timeout_seconds
            + Duration::from_secs_f64(crate::reconcile::RECORD_TIMEOUT_SECONDS)
            + Duration::from_secs(10)
    }

    fn run_once(
        &self,
        node: Option<String>,
        dry_run: bool,
    ) -> futures_util::future::BoxFuture<'static, Result<String, crate::bot::ReconcileTriggerError>>
    {
        let me = self.clone();
        Box::pin(async move {
            let opts = crate::reconcile::RunOptions { node, dry_run };
            me.reconcile_once(&opts)
                .await
                .map(|rep| crate::reconcile::cli::render_table(&rep))
                .map_err(|e| crate::bot::ReconcileTriggerError(Box::new(e)))
        })
    }
}
