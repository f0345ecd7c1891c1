//! The services' error type. Each variant says what the caller did wrong (or that we did); the HTTP and
//! server-function layers map them to status codes and IoTDA-style error codes.

use std::time::Duration;

use domain::ValidationError;

/// A service error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input broke a rule; the message names the field.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The thing does not exist (or belongs to another project, which callers must not learn).
    #[error("{what} {id} does not exist")]
    NotFound {
        /// The kind of thing (`device`, `product`...).
        what: &'static str,
        /// Its id as given.
        id: String,
    },
    /// The request conflicts with existing state (duplicate, still in use...).
    #[error("{0}")]
    Conflict(String),
    /// Credentials are missing or wrong, or the session expired.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Too many failed attempts; try again later.
    #[error("too many failed attempts; try again in {} s", .retry_after.as_secs().max(1))]
    RateLimited {
        /// When the caller may try again.
        retry_after: Duration,
    },
    /// An upload is larger than the configured maximum.
    #[error("the package is larger than the maximum of {limit} bytes")]
    TooLarge {
        /// The maximum in bytes.
        limit: u64,
    },
    /// The package store failed.
    #[error("package store error: {0}")]
    Storage(#[from] object_store::Error),
    /// The database failed. (The message carries the cause for the log; callers never show it.)
    #[error("database error: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// A stored secret could not be opened (wrong key file?).
    #[error("stored secret could not be opened")]
    Secrets(#[from] crate::secrets::SecretsError),
    /// The server is at one of its limits (descriptors, open package files, connections): the caller
    /// should try again after `retry_after`. Never a failure of the request itself.
    #[error("the server is busy ({what}); try again in {} s", .retry_after.as_secs().max(1))]
    Busy {
        /// Which limit was reached.
        what: &'static str,
        /// When to try again.
        retry_after: Duration,
    },
    /// Anything else that is our fault.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The services' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A not-found error.
    #[must_use]
    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound {
            what,
            id: id.into(),
        }
    }

    /// Whether this error is the service's fault (and should be logged with its cause), not the caller's.
    #[must_use]
    pub const fn is_internal(&self) -> bool {
        matches!(
            self,
            Self::Db(_) | Self::Secrets(_) | Self::Storage(_) | Self::Internal(_)
        )
    }
}
