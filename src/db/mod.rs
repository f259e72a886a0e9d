//! The data layer: an instrumented PostgreSQL pool, embedded migrations, the leadership lock
//! and the writability probe behind `/readyz`.

pub mod bulk_read;
pub mod connect;
pub mod db_time;
pub mod error;
pub mod inflight;
pub mod leader;
pub mod monitor;
pub mod pool;
pub mod pooler;
pub mod readiness;
pub mod refusal;

pub use error::DbError;
pub use pool::{DbConn, DbPool, Tx};

/// Migrations embedded from `migrations/` at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies every pending migration, holding one labelled connection.
///
/// # Errors
/// [`DbError::Migrate`] when a migration fails, is missing or was modified after being applied.
pub async fn migrate(pool: &DbPool) -> Result<(), DbError> {
    let mut conn = pool.acquire("migrate").await?;
    MIGRATOR.run(&mut *conn).await?;
    Ok(())
}
