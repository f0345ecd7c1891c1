//! The operations shared by the console, the REST API and the command line. Each takes the [`AppState`]
//! and the caller's project, validates its input with `domain`, and returns rows or an [`Error`].
//!
//! [`AppState`]: crate::AppState
//! [`Error`]: crate::Error

pub mod auth;
pub mod devices;
pub mod groups;
pub mod overview;
pub mod products;
pub mod projects;

/// A page request: at most `limit` rows after skipping `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// Rows to return (clamped to 1..=500).
    pub limit: u64,
    /// Rows to skip.
    pub offset: u64,
}

impl Page {
    /// A page, with `limit` clamped to 1..=500.
    #[must_use]
    pub fn new(limit: u64, offset: u64) -> Self {
        Self {
            limit: limit.clamp(1, 500),
            offset,
        }
    }
}

impl Default for Page {
    fn default() -> Self {
        Self::new(50, 0)
    }
}

/// One page of rows and the total number of matching rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Paged<T> {
    /// The rows.
    pub items: Vec<T>,
    /// All matching rows, across pages.
    pub total: u64,
}
