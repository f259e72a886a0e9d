//! Opening connections: the start-up check every command runs first (so an unreachable or
//! refusing server reads as such, quickly, with one exit code), the schema check, and the
//! bounded classification of connection failures (`vpnbot_db_connect_errors_total{kind}`).

use std::time::Duration;

use sqlx::{ConnectOptions, Connection, PgConnection};

use super::error::DbError;
use super::pool::connect_options;
use crate::config::DbConfig;

/// Exit code of every command when the database is unreachable or refuses connections
/// (`EX_UNAVAILABLE` from sysexits.h).
pub const EXIT_DB_UNAVAILABLE: i32 = 69;

/// Why the server could not be connected to, as a bounded label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectErrorKind {
    /// SQLSTATE 53300: the server's or the role's connection limit is reached.
    TooManyConnections,
    /// SQLSTATE 28P01 / 28000: wrong password, or the role may not log in.
    AuthFailed,
    /// SQLSTATE 57P03: the server is starting up, shutting down or in recovery.
    StartingUp,
    /// TCP connection refused (nothing listens on the port).
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// Anything else (TLS, protocol, an unknown database, ...).
    Other,
}

impl ConnectErrorKind {
    /// Every kind, for pre-registering label values.
    pub const ALL: [ConnectErrorKind; 6] = [
        Self::TooManyConnections,
        Self::AuthFailed,
        Self::StartingUp,
        Self::Refused,
        Self::Timeout,
        Self::Other,
    ];

    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooManyConnections => "too_many_connections",
            Self::AuthFailed => "auth_failed",
            Self::StartingUp => "starting_up",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }

    /// Classifies a failed connection attempt.
    pub fn of(e: &sqlx::Error) -> ConnectErrorKind {
        if let Some(code) = e.as_database_error().and_then(|d| d.code()) {
            return match &*code {
                "53300" => Self::TooManyConnections,
                "28P01" | "28000" => Self::AuthFailed,
                c if c.starts_with("57P") => Self::StartingUp,
                _ => Self::Other,
            };
        }
        match e {
            sqlx::Error::Io(io) => match io.kind() {
                std::io::ErrorKind::ConnectionRefused => Self::Refused,
                std::io::ErrorKind::TimedOut => Self::Timeout,
                _ => Self::Other,
            },
            sqlx::Error::PoolTimedOut => Self::Timeout,
            _ => Self::Other,
        }
    }

    /// Whether a pool should stop opening connections for a while after this failure: the
    /// server answered and refused, or nothing listens.
    pub fn is_refusal(self) -> bool {
        !matches!(self, Self::Other)
    }
}

/// The cause of a connection failure for humans: the server's message with its SQLSTATE, or
/// the socket error. Never contains the URL.
pub fn describe(e: &sqlx::Error) -> String {
    if let Some(d) = e.as_database_error() {
        return match d.code() {
            Some(code) => format!("{} (SQLSTATE {code})", d.message()),
            None => d.message().to_string(),
        };
    }
    match e {
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// An I/O "timed out" error standing for "no answer within `after`".
pub fn timeout_error(after: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {:.1} s", after.as_secs_f64()),
    ))
}

/// Opens one direct connection to `url`'s server with the pool's startup parameters, bounded
/// by the connect timeout.
///
/// # Errors
/// [`DbError::Unavailable`] with the cause (SQLSTATE included) or a timeout.
pub async fn connect_direct(cfg: &DbConfig, app_suffix: &str) -> Result<PgConnection, DbError> {
    let mut opts = connect_options(cfg)?.disable_statement_logging();
    if !app_suffix.is_empty() {
        opts = opts.application_name(&format!("{}-{app_suffix}", cfg.application_name));
    }
    let bound = cfg.connect_timeout_seconds;
    match tokio::time::timeout(bound, PgConnection::connect_with(&opts)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(DbError::Unavailable(e)),
        Err(_) => Err(DbError::Unavailable(timeout_error(bound))),
    }
}

/// One direct connection with the connect timeout, so "server down", "wrong password" and
/// "too many connections" are reported as themselves before a pool starts retrying. Every
/// command that needs the database runs it first and exits [`EXIT_DB_UNAVAILABLE`] on error.
///
/// # Errors
/// [`DbError::Unavailable`].
pub async fn preflight(cfg: &DbConfig) -> Result<(), DbError> {
    let conn = connect_direct(cfg, "").await?;
    let _ = tokio::time::timeout(cfg.connect_timeout_seconds, conn.close()).await;
    Ok(())
}

/// Checks that every embedded migration has been applied, so a command that only reads and
/// writes (`reconcile`) says "run `vpnbot migrate`" instead of failing on a missing table.
///
/// # Errors
/// [`DbError::SchemaNotMigrated`], or the query's error.
pub async fn check_schema(conn: &mut PgConnection) -> Result<(), DbError> {
    let known: Vec<i64> = super::MIGRATOR.iter().map(|m| m.version).collect();
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(&mut *conn)
        .await
        .map_err(DbError::from)?;
    let applied: Vec<i64> = if exists.is_some() {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *conn)
            .await
            .map_err(DbError::from)?
    } else {
        Vec::new()
    };
    let pending = known.iter().filter(|v| !applied.contains(v)).count();
    if pending > 0 {
        return Err(DbError::SchemaNotMigrated {
            pending,
            total: known.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_and_timeout_are_classified_from_io_errors() {
        let refused = sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(ConnectErrorKind::of(&refused), ConnectErrorKind::Refused);
        let t = timeout_error(Duration::from_secs(5));
        assert_eq!(ConnectErrorKind::of(&t), ConnectErrorKind::Timeout);
        assert_eq!(describe(&t), "no answer within 5.0 s");
        let other = sqlx::Error::Protocol("x".into());
        assert_eq!(ConnectErrorKind::of(&other), ConnectErrorKind::Other);
        assert!(!ConnectErrorKind::Other.is_refusal());
        assert!(ConnectErrorKind::TooManyConnections.is_refusal());
    }
}
