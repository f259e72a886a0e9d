//! `vpnbot reconcile --once [--node NAME] [--dry-run] [--json]`: one run from the command line,
//! printed as a table or JSON.
//!
//! It writes outbox intents like the worker does; the running service's outbox worker applies
//! them. Exit codes: 0 when every node ended `ok` or `dry_run`, 3 when a guard tripped, 1 when
//! a node failed or timed out (or the run could not start, e.g. an unmigrated schema), 64 for a
//! bad configuration, 69 when the database is unreachable or refuses connections.

use std::fmt::Write as _;
use std::process::ExitCode;

use super::{Outcome, Reconciler, RunOptions, RunReport};
use crate::config::Config;
use crate::db::DbPool;
use crate::fleet::Fleet;

/// Options of `vpnbot reconcile`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// Run one pass and exit (the periodic worker runs inside `vpnbot run`).
    #[arg(long, required = true)]
    pub once: bool,
    /// Only this node (a `[nodes.NAME]` name).
    #[arg(long)]
    pub node: Option<String>,
    /// Report what would be removed and re-added; write nothing but the audit row.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command with a loaded configuration; returns the exit code.
pub fn main(cfg: Config, args: ReconcileArgs) -> ExitCode {
    crate::telemetry::init(&cfg.observability, Vec::new());
    let rt = crate::cli::build_runtime(&cfg);
    rt.block_on(async move {
        let registry = crate::metrics::new_registry();
        let pool = match DbPool::connect(&cfg.db, &registry) {
            Ok(p) => p,
            Err(e) => return crate::cli::fail(&e, e.exit_code()),
        };
        // Like `run` and `migrate`: an unreachable or refusing server is exit 69 with its cause
        // within the connect timeout, not a pool acquire timeout; an old schema says what to do.
        if let Err(e) = check_database(&cfg).await {
            return crate::cli::fail(&e, e.exit_code());
        }
        let fleet = match Fleet::from_config(&cfg, &registry) {
            Ok(f) => f,
            Err((node, e)) => {
                eprintln!("error: node {node}: {e}");
                return ExitCode::from(1);
            }
        };
        let r = Reconciler::new(pool.clone(), fleet, &registry, cfg.reconcile.clone());
        let opts = RunOptions {
            node: args.node.clone(),
            dry_run: args.dry_run,
        };
        let rep = match r.reconcile_once(&opts).await {
            Ok(rep) => rep,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&rep).expect("report serializes")
            );
        } else {
            print!("{}", render_table(&rep));
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), pool.close()).await;
        exit_code(&rep)
    })
}

/// The direct-connection check every command runs, then the schema check.
async fn check_database(cfg: &Config) -> Result<(), crate::db::DbError> {
    let mut conn = crate::db::connect::connect_direct(&cfg.db, "").await?;
    let res = crate::db::connect::check_schema(&mut conn).await;
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        sqlx::Connection::close(conn),
    )
    .await;
    res
}

/// 0 when every node ended `ok`/`dry_run`, 3 when a guard tripped, 1 otherwise.
pub fn exit_code(rep: &RunReport) -> ExitCode {
    if rep
        .nodes
        .iter()
        .any(|n| matches!(n.outcome, Outcome::Failed | Outcome::Timeout))
    {
        ExitCode::from(1)
    } else if rep.nodes.iter().any(|n| n.outcome == Outcome::Guarded) {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

/// The report as a table: one line per node, then the planned UUIDs of a dry run, then errors
/// and guard trips.
pub fn render_table(rep: &RunReport) -> String {
    let mut out = String::new();
    let verb = if rep.dry_run { "would" } else { "queued" };
    let _ = writeln!(
        out,
        "reconcile{} started {} took {:.2} s",
        if rep.dry_run { " (dry run)" } else { "" },
        rep.started_at.to_rfc3339(),
        rep.seconds
    );
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "node",
        "outcome",
        "db_live",
        "node_usr",
        "owned",
        "orphans",
        "kept",
        "missing",
        "pending",
        "remove",
        "re-add",
        "seconds"
    );
    for n in &rep.nodes {
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8.2}",
            n.node,
            n.outcome.as_str(),
            n.db_live,
            n.node_users,
            n.node_owned,
            n.orphans,
            n.kept_by_recheck,
            n.missing,
            n.already_pending,
            n.removals.len(),
            n.readds.len(),
            n.seconds
        );
    }
    for n in &rep.nodes {
        if n.unmatched_markers > 0 {
            let _ = writeln!(
                out,
                "{}: {} users look vpnbot-made but match no UUID of theirs (never removed; marker copied by hand or emails rewritten by the node)",
                n.node, n.unmatched_markers
            );
        }
    }
    for n in &rep.nodes {
        if let Some(e) = &n.error {
            let _ = writeln!(out, "{}: error: {e}", n.node);
        }
        if let Some(g) = &n.guard {
            let _ = writeln!(
                out,
                "{}: guard {} tripped, nothing removed: {}",
                n.node,
                g.reason.as_str(),
                g.detail
            );
        }
        if let Some(e) = &n.record_error {
            let _ = writeln!(out, "{}: audit row not written: {e}", n.node);
        }
        for u in &n.removals {
            let _ = writeln!(out, "{}: {verb} remove {u}", n.node);
        }
        for u in &n.readds {
            let _ = writeln!(out, "{}: {verb} re-add {u}", n.node);
        }
    }
    out
}
