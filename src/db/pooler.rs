//! Connection poolers in front of PostgreSQL (PgBouncer and the like), checked at start.
//!
//! What vpnbot supports:
//! - **no pooler**, or a pooler in **session** pooling mode: everything through `db.url`;
//! - **transaction** pooling only when it keeps protocol-level prepared statements (PgBouncer
//!   ≥ 1.21 with `max_prepared_statements` > 0: sqlx prepares every parameterised query as a
//!   named statement, `sqlx_s_N`, whether or not its statement cache is on), and with
//!   `db.direct_url` pointing at PostgreSQL itself for the leadership lock and migrations
//!   (session advisory locks do not survive transaction pooling);
//! - statement pooling: never (transactions would be split).
//!
//! The check needs no pooler-specific command: two client connections through `db.url` each
//! try the same session advisory lock. Behind session pooling (or none) they are two server
//! sessions and the second is refused; behind transaction pooling they share one server session
//! and both "get" it, which is exactly what would let two instances lead at once (or, with
//! prepared statements colliding, no instance ever lead).

use sqlx::{Connection, PgConnection, Row};

use super::connect::connect_direct;
use super::DbError;
use crate::config::DbConfig;

/// What the check found behind a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pooling {
    /// Each client connection has its own server session (no pooler, or session pooling).
    Session,
    /// Two client connections shared one server session: transaction (or statement) pooling.
    Transaction {
        /// Whether parameterised (named prepared) statements worked from both connections.
        prepared_statements_ok: bool,
        /// The prepared-statement failure, when they did not.
        prepared_error: Option<String>,
    },
}

/// Why the configuration cannot work with the pooler found; an operator error (exit 64).
#[derive(Debug, thiserror::Error)]
pub enum PoolerError {
    /// `db.url` is behind transaction pooling and no `db.direct_url` is set.
    #[error(
        "db.url is served by a connection pooler in pool_mode = transaction (or statement): two \
         client connections shared one server session, so the leadership advisory lock cannot \
         work through it (no instance would lead, or two would). Use pool_mode = session, or \
         set db.direct_url to PostgreSQL itself for leadership and migrations \
         (README: Connection poolers)"
    )]
    NoDirectUrl,
    /// Behind transaction pooling, prepared statements collide or vanish.
    #[error(
        "db.url is served by a connection pooler in pool_mode = transaction that does not keep \
         prepared statements ({0}): vpnbot's queries are named prepared statements. Use \
         pool_mode = session, or PgBouncer >= 1.21 with max_prepared_statements > 0 \
         (README: Connection poolers)"
    )]
    PreparedStatements(String),
    /// `db.direct_url` is itself behind transaction pooling.
    #[error(
        "db.direct_url is served by a connection pooler in pool_mode = transaction (or \
         statement): it must reach PostgreSQL itself (or a pool_mode = session pooler), since \
         it carries the leadership advisory lock"
    )]
    DirectUrlPooled,
}

/// The config to use for the leadership connection and migrations: `db.direct_url` when set,
/// else `db.url`.
pub fn direct_config(cfg: &DbConfig) -> DbConfig {
    use secrecy::ExposeSecret;
    let mut c = cfg.clone();
    if !cfg.direct_url.expose_secret().is_empty() {
        c.url = cfg.direct_url.clone();
    }
    c
}

/// Detects whether `cfg.url` shares server sessions between client connections (see the module
/// docs). Uses two connections for a few round trips; leaves no lock behind.
///
/// # Errors
/// [`DbError`] when a connection or query fails.
pub async fn detect(cfg: &DbConfig) -> Result<Pooling, DbError> {
    let mut a = connect_direct(cfg, "pooler-check").await?;
    let mut b = match connect_direct(cfg, "pooler-check").await {
        Ok(b) => b,
        Err(e) => {
            let _ = a.close().await;
            return Err(e);
        }
    };
    let res = detect_on(&mut a, &mut b).await;
    warn_if_session_settings_lost(cfg, &mut a).await;
    // Unlock from both sides: behind transaction pooling either may hold the shared session.
    for c in [&mut a, &mut b] {
        let _ = sqlx::raw_sql("SELECT pg_advisory_unlock_all()")
            .execute(&mut *c)
            .await;
    }
    let _ = a.close().await;
    let _ = b.close().await;
    res
}

/// PgBouncer (1.18) does not forward the `options` startup parameter that carries
/// `statement_timeout`: say so at start instead of running without the bound. Returns whether
/// the server session has the configured value.
pub async fn warn_if_session_settings_lost(cfg: &DbConfig, conn: &mut PgConnection) -> bool {
    let want_ms = cfg.statement_timeout_seconds.as_millis() as i64;
    let got: Option<String> =
        match sqlx::raw_sql("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
            .fetch_optional(&mut *conn)
            .await
        {
            Ok(Some(row)) => row.try_get(0).ok(),
            _ => None,
        };
    let got_ms = got.as_deref().and_then(|s| s.parse::<i64>().ok());
    if got_ms == Some(want_ms) {
        return true;
    }
    tracing::warn!(
        configured_ms = want_ms,
        server_ms = got_ms.unwrap_or(-1),
        "db.url: the server session does not have the configured statement_timeout; a pooler \
         in front is not forwarding the `options` startup parameter. Set statement_timeout and \
         idle_in_transaction_session_timeout on the role (ALTER ROLE ... SET) (README: Connection poolers)"
    );
    false
}

async fn detect_on(a: &mut PgConnection, b: &mut PgConnection) -> Result<Pooling, DbError> {
    // A random key, so that instances starting together do not see each other's probe.
    let key = i64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().expect("8"));
    // Simple-protocol queries: no prepared statement is involved in the detection itself.
    let sql = format!("SELECT pg_try_advisory_lock({key})");
    let got_a: bool = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
        .fetch_one(&mut *a)
        .await
        .map_err(DbError::from)?
        .try_get(0)
        .map_err(DbError::from)?;
    let got_b: bool = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut *b)
        .await
        .map_err(DbError::from)?
        .try_get(0)
        .map_err(DbError::from)?;
    if !(got_a && got_b) {
        return Ok(Pooling::Session);
    }
    // Shared sessions: do named prepared statements survive? Each connection prepares its
    // first statement under the same name (`sqlx_s_1`).
    let mut prepared_error = None;
    for c in [&mut *a, &mut *b] {
        if let Err(e) = sqlx::query_scalar::<_, i32>("SELECT $1::int4")
            .bind(1)
            .fetch_one(&mut *c)
            .await
        {
            prepared_error = Some(super::connect::describe(&e));
            break;
        }
    }
    Ok(Pooling::Transaction {
        prepared_statements_ok: prepared_error.is_none(),
        prepared_error,
    })
}

/// The start-up check: `db.url` and, when set, `db.direct_url` against what vpnbot supports.
/// Logs what it found.
///
/// # Errors
/// `Ok(Err(PoolerError))` for a configuration vpnbot cannot run with; `Err(DbError)` when the
/// check itself could not run.
pub async fn check(cfg: &DbConfig) -> Result<Result<(), PoolerError>, DbError> {
    use secrecy::ExposeSecret;
    let has_direct = !cfg.direct_url.expose_secret().is_empty();
    match detect(cfg).await? {
        Pooling::Session => {
            tracing::debug!(
                "db.url: one server session per connection (no pooler or session pooling)"
            );
        }
        Pooling::Transaction {
            prepared_statements_ok,
            prepared_error,
        } => {
            if !has_direct {
                return Ok(Err(PoolerError::NoDirectUrl));
            }
            if !prepared_statements_ok {
                return Ok(Err(PoolerError::PreparedStatements(
                    prepared_error.unwrap_or_default(),
                )));
            }
            tracing::info!(
                "db.url: transaction pooling with prepared statements; leadership and migrations use db.direct_url"
            );
        }
    }
    if has_direct {
        let direct = direct_config(cfg);
        if let Pooling::Transaction { .. } = detect(&direct).await? {
            return Ok(Err(PoolerError::DirectUrlPooled));
        }
    }
    Ok(Ok(()))
}

/// Applies pending migrations over one connection to `db.direct_url` (or `db.url`): sqlx's
/// migration lock is a session advisory lock, which must not go through transaction pooling.
///
/// # Errors
/// [`DbError::Unavailable`] or [`DbError::Migrate`].
pub async fn migrate_direct(cfg: &DbConfig) -> Result<(), DbError> {
    let mut conn = connect_direct(&direct_config(cfg), "migrate").await?;
    let res = super::MIGRATOR.run(&mut conn).await;
    let _ = conn.close().await;
    res.map_err(DbError::from)
}
