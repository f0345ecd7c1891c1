//! Server functions and the data they exchange with the browser (DTOs). DTOs are plain serde structs:
//! database rows never cross the wire; `ssr` code maps them explicitly.
//!
//! Every `#[server]` function is a public POST endpoint under `/api/`; the server's session middleware
//! rejects calls without a valid session and cross-site origins before they reach these bodies.

pub mod devices;
pub mod groups;
pub mod products;
pub mod session;
pub mod upgrades;

use serde::{Deserialize, Serialize};

/// One page of rows and the total count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PageOf<T> {
    /// The rows.
    pub items: Vec<T>,
    /// All matching rows.
    pub total: u64,
    /// Rows skipped before `items`.
    pub offset: u64,
    /// The page size asked for.
    pub limit: u64,
}

/// Server-side helpers shared by the server functions.
#[cfg(feature = "ssr")]
pub(crate) mod ssr {
    use backend::AppState;
    use backend::service::auth::CurrentUser;
    use leptos::prelude::*;

    use crate::error::{ApiError, ErrorCode};

    /// The state and the calling user, or an error if the session middleware did not vouch for one.
    pub(crate) async fn context() -> Result<(AppState, CurrentUser), ApiError> {
        let state = use_context::<AppState>()
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "application state missing"))?;
        let axum::Extension(user) = leptos_axum::extract::<axum::Extension<CurrentUser>>()
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::Unauthorized,
                    "not logged in or the session expired",
                )
            })?;
        Ok((state, user))
    }

    /// Formats a stored millisecond time for display.
    pub(crate) fn when(ms: i64) -> String {
        domain::Timestamp::from_millis(ms).to_string()
    }
}
