//! The `vpnbot` command line (clap). `main` only calls [`main`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{App, Instruments};
use crate::config::{Config, EXIT_CONFIG};
use crate::signals::ShutdownSignal;

/// vpnbot: a Telegram bot selling VLESS VPN subscriptions, with workers that keep Xray nodes in
/// line with the database, built to see and survive runtime stalls.
#[derive(Debug, Parser)]
#[command(name = "vpnbot", version, about)]
pub struct Cli {
    /// TOML config file. `VPNBOT_<SECTION>__<KEY>` environment variables override its keys
    /// (e.g. `VPNBOT_DB__MAX_CONNECTIONS=20`); `VPNBOT_*` names without `__` are not config.
    #[arg(long, global = true, env = "VPNBOT_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (production).
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Validate the configuration, print it with secrets redacted, exit 0; when invalid, list
    /// every problem (unknown keys, wrong types, bad values, the variable when one comes from
    /// the environment) and exit 64.
    CheckConfig,
    /// Reconcile nodes against the database once and print what was found and done.
    ///
    /// Exit codes: 0 ok or dry run, 3 the guard tripped (nothing removed), 1 a node failed or
    /// timed out, an unknown node, or an unmigrated schema, 64 bad config, 69 database
    /// unreachable or refusing connections.
    Reconcile(crate::reconcile::cli::ReconcileArgs),
    /// Switch between polling and webhook mode at Telegram: `set` (setWebhook with
    /// `[telegram.webhook]`), `delete` (back to polling), `info` (getWebhookInfo). The secret
    /// token is never printed. Exit codes: 0 ok, 1 Telegram refused, 64 bad config.
    Webhook {
        /// `set`, `delete` or `info`.
        #[command(subcommand)]
        cmd: crate::bot::webhook_cli::WebhookCommand,
    },
}

/// Parses arguments, runs the command, returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig => match load(&cli) {
            Ok(cfg) => {
                print!("{}", cfg.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run => {
            let cfg = match load(&cli) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let instruments = Instruments::install(&cfg);
            let rt = build_main_runtime(&cfg, &instruments);
            let code = rt.block_on(async {
                // Registered before startup: a SIGTERM during migrations or connects is queued
                // and drains the app once it has started (startup is bounded by its timeouts).
                let signal = match ShutdownSignal::install() {
                    Ok(s) => s,
                    Err(e) => return fail(&e, 71), // EX_OSERR
                };
                tracing::info!("vpnbot starting; SIGTERM/SIGINT from now on drain and exit 0");
                match App::start_with(cfg, &instruments).await {
                    Ok(app) => match app.run_until(signal).await {
                        Ok(()) => ExitCode::SUCCESS,
                        // Logged at ERROR naming the task; stderr gets it even without logs.
                        Err(exit) => {
                            eprintln!("vpnbot: {exit}; exited");
                            ExitCode::from(crate::tasks::EXIT_CRITICAL_TASK)
                        }
                    },
                    Err(e) => fail(&e, e.exit_code()),
                }
            });
            // Bounded: a task that ignores cancellation cannot hold the exit hostage.
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
            instruments.shutdown();
            code
        }
        Command::Migrate => {
            let cfg = match load(&cli) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::telemetry::init(&cfg.observability, Vec::new());
            let rt = build_runtime(&cfg);
            rt.block_on(async move {
                let registry = crate::metrics::new_registry();
                let pool = match crate::db::DbPool::connect(&cfg.db, &registry) {
                    Ok(p) => p,
                    Err(e) => return fail(&e, 1),
                };
                if let Err(e) = crate::app::check_database(&cfg).await {
                    return fail(&e, e.exit_code());
                }
                let res = if secrecy::ExposeSecret::expose_secret(&cfg.db.direct_url).is_empty() {
                    crate::db::migrate(&pool).await
                } else {
                    crate::db::pooler::migrate_direct(&cfg.db).await
                };
                match res {
                    Ok(()) => {
                        println!("migrations applied");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e, e.exit_code()),
                }
            })
        }
        Command::Webhook { cmd } => match load(&cli) {
            Ok(cfg) => crate::bot::webhook_cli::main(cfg, cmd),
            Err(code) => code,
        },
        Command::Reconcile(ref args) => match load(&cli) {
            Ok(cfg) => crate::reconcile::cli::main(cfg, args.clone()),
            Err(code) => code,
        },
    }
}

/// Builds the main runtime with the diagnostics' poll hooks (see [`crate::runtime`]).
pub fn build_main_runtime(cfg: &Config, instruments: &Instruments) -> tokio::runtime::Runtime {
    let workers = (cfg.runtime.worker_threads > 0).then_some(cfg.runtime.worker_threads);
    crate::runtime::build_main_runtime(workers, &instruments.diagnostics)
        .expect("main runtime builds")
}

/// How long a short command (`migrate`, `reconcile --once`) waits, once its work is done, for
/// what is still running on its runtime (a DNS lookup stuck in the blocking pool, say) before the
/// process exits anyway. `run` uses its own bound after the drain.
pub const COMMAND_EXIT_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// A plain runtime for short commands (`migrate`, `reconcile --once`): multi-thread, named
/// workers, all drivers. Dropping it shuts it down within [`COMMAND_EXIT_BOUND`] instead of
/// waiting for every blocking task: a `getaddrinfo` against a resolver that never answers can
/// run for minutes (glibc's timeout × attempts × servers) and cannot be cancelled.
pub fn build_runtime(cfg: &Config) -> CommandRuntime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name("vpnbot-worker");
    if cfg.runtime.worker_threads > 0 {
        b.worker_threads(cfg.runtime.worker_threads);
    }
    CommandRuntime(Some(b.build().expect("main runtime builds")))
}

/// A runtime whose drop is bounded by [`COMMAND_EXIT_BOUND`] (see [`build_runtime`]);
/// dereferences to the [`tokio::runtime::Runtime`].
#[derive(Debug)]
pub struct CommandRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for CommandRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("runtime present until drop")
    }
}

impl Drop for CommandRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_timeout(COMMAND_EXIT_BOUND);
        }
    }
}

fn load(cli: &Cli) -> Result<Config, ExitCode> {
    Config::load(cli.config.as_deref()).map_err(|e| {
        eprint!("{e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

/// Prints `error: ...` with each cause once, logs it, and returns `code`.
pub fn fail(e: &dyn std::error::Error, code: i32) -> ExitCode {
    let mut msg = format!("error: {e}");
    let mut last = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        // Errors that already quote their source would repeat it: print each cause once.
        let text = s.to_string();
        if !last.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        last = text;
        src = s.source();
    }
    eprintln!("{msg}");
    tracing::error!(error = %e, "fatal");
    ExitCode::from(code as u8)
}
