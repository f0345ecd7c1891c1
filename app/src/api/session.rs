//! Who is logged in.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The logged-in user, for the header and Settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Me {
    /// User name.
    pub username: String,
    /// Whether the user is an administrator.
    pub is_admin: bool,
    /// The project the session works in.
    pub project_id: String,
    /// When the session ends unless used.
    pub session_expires: String,
    /// Updraft's version.
    pub version: String,
}

/// Returns the logged-in user.
#[server(prefix = "/api", endpoint = "whoami")]
pub async fn whoami() -> Result<Me, ApiError> {
    let (_, user) = super::ssr::context().await?;
    Ok(Me {
        username: user.username,
        is_admin: user.is_admin,
        project_id: user.project_id,
        session_expires: user.expires_at.to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// Changes the signed-in user's password; the user's other sessions end.
#[server(prefix = "/api", endpoint = "change_password")]
pub async fn change_password(
    current_password: String,
    password: String,
    confirm: String,
) -> Result<(), ApiError> {
    use secrecy::SecretString;
    let (state, user) = super::ssr::context().await?;
    if password != confirm {
        return Err(
            domain::ValidationError::new("confirm", "does not match the new password").into(),
        );
    }
    backend::service::auth::change_password(
        &state,
        &user.user_id,
        Some(&user.session_id),
        SecretString::from(current_password),
        SecretString::from(password),
    )
    .await?;
    Ok(())
}
