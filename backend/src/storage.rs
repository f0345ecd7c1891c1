//! Persistence: sea-orm entities (one per table) and small query helpers shared by the services.

pub mod entity;

use sea_orm::{DbErr, SqlErr};

/// Whether `e` is a unique-constraint violation (the sea-orm analogue of realworld's `on_constraint`).
#[must_use]
pub fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// Turns a unique-constraint violation into [`Error::Conflict`] with `message`; other errors pass through.
///
/// [`Error::Conflict`]: crate::Error::Conflict
pub fn conflict_on_unique(e: DbErr, message: impl FnOnce() -> String) -> crate::Error {
    if is_unique_violation(&e) {
        crate::Error::Conflict(message())
    } else {
        e.into()
    }
}
