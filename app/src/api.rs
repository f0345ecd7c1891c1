//! Server functions and the data they exchange with the browser (DTOs). DTOs are plain serde structs:
//! database rows never cross the wire; `ssr` code maps them explicitly.
//!
//! Every `#[server]` function is a public POST endpoint under `/api/`; the server's session middleware
//! rejects calls without a valid session and cross-site origins before they reach these bodies.

pub mod devices;
pub mod groups;
pub mod products;
pub mod reference;
pub mod rollouts;
pub mod session;
pub mod settings;
pub mod upgrades;

use serde::{Deserialize, Serialize};

/// One page of rows and the total count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// The ids in a comma-, space- or newline-separated list, each once, in order (the browser counts them
/// with this too).
#[must_use]
pub fn parse_ids(text: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    text.split([',', ' ', '\n', '\r', '\t'])
        .filter(|s| !s.is_empty() && seen.insert(*s))
        .map(str::to_owned)
        .collect()
}

/// [`parse_ids`] with the server's rules: at least one, at most `max`.
///
/// # Errors
/// A validation error naming `field`.
#[cfg(feature = "ssr")]
pub(crate) fn split_ids(
    text: &str,
    field: &str,
    max: usize,
) -> Result<Vec<String>, crate::error::ApiError> {
    // A cheap bound first: every id needs at least one character and one separator.
    if text.len() > max.saturating_mul(256) {
        return Err(domain::ValidationError::new(
            field,
            format!("at most {max} devices at a time"),
        )
        .into());
    }
    let ids = parse_ids(text);
    if ids.is_empty() {
        return Err(domain::ValidationError::new(field, "select at least one device").into());
    }
    if ids.len() > max {
        return Err(domain::ValidationError::new(
            field,
            format!("{} devices; at most {max} at a time", ids.len()),
        )
        .into());
    }
    Ok(ids)
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

    /// The request's `X-Request-Id` (set by the server's request-id layer), if any.
    pub(crate) async fn request_id() -> Option<String> {
        let headers = leptos_axum::extract::<axum::http::HeaderMap>().await.ok()?;
        headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Like [`context`], for what only administrators may do (credentials, webhook subscriptions).
    pub(crate) async fn admin_context() -> Result<(AppState, CurrentUser), ApiError> {
        let (state, user) = context().await?;
        if !user.is_admin {
            tracing::warn!(username = %user.username, "administrator action refused");
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "only an administrator may manage credentials and subscriptions",
            )
            .with_status());
        }
        Ok((state, user))
    }

    /// Names the resource this call created in the answer's `X-Resource-Id`, for the audit trail;
    /// returns `id`.
    pub(crate) fn created(id: String) -> String {
        if let Some(response) = use_context::<leptos_axum::ResponseOptions>()
            && let Ok(value) = axum::http::HeaderValue::from_str(&id)
        {
            response.insert_header(
                axum::http::HeaderName::from_static(backend::service::audit::RESOURCE_ID_HEADER),
                value,
            );
        }
        id
    }

    /// Formats a stored millisecond time for display.
    pub(crate) fn when(ms: i64) -> String {
        domain::Timestamp::from_millis(ms).to_string()
    }
}
