//! What can go wrong in the store.

use super::batch::BatchError;
use std::path::PathBuf;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open the store at {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: redb::DatabaseError,
    },
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    /// The batch that held the write failed to commit.
    #[error("database: {0}")]
    Batch(#[from] BatchError),
    /// A stored record does not decode: the file was damaged or written by an incompatible
    /// host.
    #[error("database: a stored record does not decode: {0}")]
    Decode(#[from] ciborium::de::Error<std::io::Error>),
    /// A file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The transfer was aborted earlier (a query answered "aborted").
    #[error("the transfer was aborted")]
    Aborted,
}

/// redb has an error type per operation; each becomes [`StoreError::Db`], so that `?` works
/// on all of them.
macro_rules! from_redb {
    ($($error:ident),*) => {$(
        impl From<redb::$error> for StoreError {
            fn from(e: redb::$error) -> StoreError {
                StoreError::Db(e.into())
            }
        }
    )*};
}

from_redb!(TransactionError, TableError, StorageError, CommitError);
