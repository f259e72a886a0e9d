//! The data layer's typed error and how PostgreSQL errors map onto it.

use std::time::Duration;

/// Why a database operation failed. [`DbError::kind`] gives the bounded `kind` label value.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No pooled connection became free within the acquire timeout.
    #[error("no database connection free after {waited:?} (acquire at `{label}`)")]
    AcquireTimeout {
        /// Call-site label given to `acquire`.
        label: &'static str,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The pool was closed (shutdown).
    #[error("database pool is closed (acquire at `{label}`)")]
    PoolClosed {
        /// Call-site label given to `acquire`.
        label: &'static str,
    },
    /// The server refuses new connections (see [`super::refusal`]) and no existing pooled
    /// connection became free in time.
    #[error("database refuses new connections and no pooled connection is free (acquire at `{label}`): {cause}")]
    Refused {
        /// Call-site label given to `acquire`.
        label: &'static str,
        /// The server's last refusal (message and SQLSTATE) or socket error.
        cause: String,
    },
    /// The server could not be reached or the connection broke.
    #[error("database unreachable: {}", super::connect::describe(.0))]
    Unavailable(#[source] sqlx::Error),
    /// The server cancelled the statement at `statement_timeout` (SQLSTATE 57014).
    #[error("statement cancelled by the server's statement_timeout")]
    StatementTimeout(#[source] sqlx::Error),
    /// The statement waited `lock_timeout` for a lock (SQLSTATE 55P03, `lock_not_available`).
    #[error("lock wait ended by the server's lock_timeout{}", lock_relation(.0).map(|r| format!(" (relation {r})")).unwrap_or_default())]
    LockTimeout(#[source] sqlx::Error),
    /// The server is read-only (SQLSTATE 25006, e.g. a standby after failover).
    #[error("database is read-only")]
    ReadOnly(#[source] sqlx::Error),
    /// The server is shutting down or restarting (SQLSTATE class 57P).
    #[error("database server is shutting down")]
    ServerShutdown(#[source] sqlx::Error),
    /// A migration is missing, modified or failed to apply.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Migrations embedded in this binary are not all applied (a command that does not migrate
    /// by itself, e.g. `reconcile`, found an older or empty schema).
    #[error(
        "database schema is not migrated ({pending} of {total} migrations pending): run `vpnbot migrate` first"
    )]
    SchemaNotMigrated {
        /// Migrations not applied yet.
        pending: usize,
        /// Migrations this binary knows.
        total: usize,
    },
    /// Any other query error (constraint, syntax, decode ...).
    #[error("database query failed: {0}")]
    Query(#[source] sqlx::Error),
}

impl DbError {
    /// Bounded label value for `vpnbot_db_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::AcquireTimeout { .. } => "acquire_timeout",
            DbError::PoolClosed { .. } => "pool_closed",
            DbError::Refused { .. } => "connect_refused",
            DbError::Unavailable(_) => "unavailable",
            DbError::StatementTimeout(_) => "statement_timeout",
            DbError::LockTimeout(_) => "lock_timeout",
            DbError::ReadOnly(_) => "read_only",
            DbError::ServerShutdown(_) => "server_shutdown",
            DbError::Migrate(_) => "migrate",
            DbError::SchemaNotMigrated { .. } => "schema_not_migrated",
            DbError::Query(_) => "query",
        }
    }

    /// Process exit code of a command that stops on this error: [`EXIT_DB_UNAVAILABLE`] (69)
    /// when the server cannot be reached, refuses connections or is shutting down, 1 otherwise.
    ///
    /// [`EXIT_DB_UNAVAILABLE`]: super::connect::EXIT_DB_UNAVAILABLE
    pub fn exit_code(&self) -> i32 {
        match self {
            DbError::Unavailable(_) | DbError::ServerShutdown(_) | DbError::Refused { .. } => {
                super::connect::EXIT_DB_UNAVAILABLE
            }
            _ => 1,
        }
    }

    /// Whether the connection that produced this error must be discarded rather than returned
    /// to the pool: the server is gone, restarting or read-only, or the socket broke.
    pub fn discards_connection(&self) -> bool {
        matches!(
            self,
            DbError::Unavailable(_) | DbError::ReadOnly(_) | DbError::ServerShutdown(_)
        )
    }

    /// When the server cancelled the statement, why, as a bounded label value:
    /// `statement_timeout`, `lock_timeout`, or `cancel_request` (a cancel request or
    /// `pg_cancel_backend`, e.g. vpnbot stopping a statement whose caller gave up).
    pub fn cancel_reason(&self) -> Option<&'static str> {
        match self {
            DbError::LockTimeout(_) => Some("lock_timeout"),
            DbError::StatementTimeout(e) => {
                let msg = e.as_database_error().map(|d| d.message()).unwrap_or("");
                Some(if msg.contains("user request") {
                    "cancel_request"
                } else {
                    "statement_timeout"
                })
            }
            _ => None,
        }
    }

    /// The relation a lock error names, when the server says (`... in relation "x"`).
    pub fn relation(&self) -> Option<String> {
        match self {
            DbError::LockTimeout(e) => lock_relation(e),
            _ => None,
        }
    }

    /// The SQLSTATE code of a server error, if any.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            DbError::StatementTimeout(e)
            | DbError::LockTimeout(e)
            | DbError::ReadOnly(e)
            | DbError::ServerShutdown(e)
            | DbError::Query(e)
            | DbError::Unavailable(e) => e
                .as_database_error()
                .and_then(|d| d.code())
                .map(|c| c.into_owned()),
            _ => None,
        }
    }
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        match code.as_deref() {
            Some("57014") => return DbError::StatementTimeout(e),
            Some("55P03") => return DbError::LockTimeout(e),
            Some("25006") => return DbError::ReadOnly(e),
            // admin_shutdown, crash_shutdown, cannot_connect_now, database_dropped
            Some(c) if c.starts_with("57P") => return DbError::ServerShutdown(e),
            // connection_exception class; refusals at connect: too_many_connections,
            // invalid_authorization_specification / invalid_password
            Some(c) if c.starts_with("08") || c.starts_with("28") || c == "53300" => {
                return DbError::Unavailable(e)
            }
            _ => {}
        }
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => DbError::Unavailable(e),
            sqlx::Error::PoolTimedOut => DbError::AcquireTimeout {
                label: "unknown",
                waited: Duration::ZERO,
            },
            sqlx::Error::PoolClosed => DbError::PoolClosed { label: "unknown" },
            other => DbError::Query(other),
        }
    }
}

/// The relation named in a lock error's message or context (`... in relation "subscriptions"`),
/// when the server gives one (row-lock waits do; a table-lock wait names it only in the dump's
/// `db_backends`).
fn lock_relation(e: &sqlx::Error) -> Option<String> {
    let d = e.as_database_error()?;
    let pg = d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
    let texts = [
        Some(d.message()),
        pg.and_then(|p| p.r#where()),
        pg.and_then(|p| p.detail()),
    ];
    texts.into_iter().flatten().find_map(|t| {
        let i = t.find("relation \"")? + "relation \"".len();
        let rest = &t[i..];
        Some(rest[..rest.find('"')?].to_string())
    })
}
