//! Connecting to the database: a SQLite file by default (WAL, foreign keys on), PostgreSQL when the URL
//! says `postgres://`. Migrations are run by the caller (`migrations::Migrator::up`).

use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbErr,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};

/// Connections in the pool on a SQLite file (each holds the file, its WAL and its shared memory open).
pub const SQLITE_POOL: u32 = 8;
/// Connections in the pool on PostgreSQL.
pub const POSTGRES_POOL: u32 = 32;

/// Opens a pool on `url`. For a SQLite file, its directory is created and WAL is switched on.
///
/// # Errors
/// [`DbErr`] when the database cannot be reached or opened.
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    let sqlite = url.starts_with("sqlite:");
    let sqlite_dir = sqlite_path(url).and_then(|p| {
        std::path::Path::new(&p)
            .parent()
            .map(std::path::Path::to_path_buf)
    });
    if let Some(dir) = sqlite_dir.filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(&dir)
            .map_err(|e| DbErr::Custom(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.sqlx_logging(false)
        .acquire_timeout(Duration::from_secs(10));
    if sqlite {
        // SQLite serialises writers anyway; a small pool avoids "database is locked" storms, and the busy
        // timeout lets a writer wait for another instead of failing.
        opts.max_connections(SQLITE_POOL)
            .min_connections(1)
            .map_sqlx_sqlite_opts(|o| {
                o.create_if_missing(true)
                    .foreign_keys(true)
                    .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
            });
    } else {
        opts.max_connections(POSTGRES_POOL).min_connections(1);
    }
    let db = Database::connect(opts).await?;
    if sqlite {
        // Belt and braces: confirm the journal mode really is WAL (it is persistent in the file).
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
    }
    Ok(db)
}

/// Begins a transaction that writes. On SQLite it is `BEGIN IMMEDIATE`: the write lock is taken at once
/// (waiting for it within the busy timeout), so a transaction that reads first and writes later cannot fail
/// with `SQLITE_BUSY_SNAPSHOT` (517, "database is locked") because another connection committed in
/// between; a deferred `BEGIN` fails that way at once, without waiting. PostgreSQL ignores the mode.
///
/// # Errors
/// [`DbErr`] when the transaction cannot begin.
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    })
    .await
}

/// The file path of a `sqlite:` URL, if it names a file.
fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths_are_found_in_urls() {
        assert_eq!(
            sqlite_path("sqlite://./data/updraft.db?mode=rwc").as_deref(),
            Some("./data/updraft.db")
        );
        assert_eq!(
            sqlite_path("sqlite:/tmp/x.db").as_deref(),
            Some("/tmp/x.db")
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://x"), None);
    }
}
