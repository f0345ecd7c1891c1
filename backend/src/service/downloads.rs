//! Downloads: checking the bearer tokens devices present (HTTPS and CoAP), and recording what was served.
//! The tokens themselves, issued and revoked with the subtask transitions that decide them, are
//! in [`crate::tokens`].

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::storage::entity::{download_tokens, packages, subtasks};
pub use crate::tokens::{IssuedToken, issue_in, reuse_or_issue_in, revoke_subtask};
use crate::{AppState, Error, Result, ids};

/// Issues a token for `subtask_id` to download `package_id`.
///
/// # Errors
/// [`Error::NotFound`] when the subtask or package does not exist; [`Error::Db`].
pub async fn issue(state: &AppState, subtask_id: i64, package_id: &str) -> Result<IssuedToken> {
    let subtask = subtasks::Entity::find_by_id(subtask_id)
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("subtask", subtask_id.to_string()))?;
    if packages::Entity::find_by_id(package_id.to_owned())
        .one(&state.db)
        .await?
        .is_none()
    {
        return Err(Error::not_found("package", package_id));
    }
    issue_in(
        &state.db,
        &state.sealer,
        state.clock.now(),
        state.settings.download_token_ttl,
        &subtask,
        package_id,
    )
    .await
}

/// Why a download was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No `Authorization: Bearer` header.
    #[error("missing Authorization: Bearer token")]
    Missing,
    /// Not a token Updraft could have issued.
    #[error("malformed download token")]
    Malformed,
    /// Well-formed but unknown (never issued, or its task was deleted).
    #[error("unknown download token")]
    Unknown,
    /// Past its expiry time.
    #[error("the download token has expired")]
    Expired,
    /// Revoked: its subtask ended or its task was stopped.
    #[error("the download token has been revoked")]
    Revoked,
    /// Valid, but for another package.
    #[error("the download token is not valid for this package")]
    Foreign,
}

/// A checked token: who may download what.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The token's stored id (its SHA-256), for [`record_served`].
    pub token_hash: String,
    /// The device it was issued to.
    pub device_id: String,
    /// The subtask it belongs to.
    pub subtask_id: i64,
    /// When the token expires (ms on the injected clock).
    pub expires_at: i64,
    /// The package it opens.
    pub package: packages::Model,
}

/// Checks `token` (as sent, `None` when absent) for downloading `package_id`.
///
/// # Errors
/// `Ok(Err(Denied))` for a refused token; [`Error::NotFound`] when the token is live but no package
/// `package_id` exists; [`Error::Db`].
pub async fn authorize(
    state: &AppState,
    token: Option<&str>,
    package_id: &str,
) -> Result<Result<Grant, Denied>> {
    let Some(token) = token else {
        return Ok(Err(Denied::Missing));
    };
    let (hash, row) = match live_token(state, token).await? {
        Ok(found) => found,
        Err(denied) => return Ok(Err(denied)),
    };
    let package = packages::Entity::find_by_id(package_id.to_owned())
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("package", package_id))?;
    if row.package_id != package_id {
        return Ok(Err(Denied::Foreign));
    }
    Ok(Ok(grant(hash, row, package)))
}

/// Checks a token that names its package itself (the URIs of Firmware Update object downloads,
/// `/fw/<token>`). Only tokens issued for such downloads open anything here: a firmware package for a
/// device of a CoAP (LwM2M) product. An MQTT device's token, valid for its own HTTPS download, is unknown
/// here.
///
/// # Errors
/// `Ok(Err(Denied))` for a refused token (also when its package is gone); [`Error::Db`].
pub async fn authorize_token(state: &AppState, token: &str) -> Result<Result<Grant, Denied>> {
    use crate::storage::entity::{devices, products};
    let (hash, row) = match live_token(state, token).await? {
        Ok(found) => found,
        Err(denied) => return Ok(Err(denied)),
    };
    let Some(package) = packages::Entity::find_by_id(row.package_id.clone())
        .one(&state.db)
        .await?
    else {
        return Ok(Err(Denied::Revoked));
    };
    let product = match devices::Entity::find_by_id(row.device_id.clone())
        .one(&state.db)
        .await?
    {
        Some(d) => {
            products::Entity::find_by_id(d.product_id)
                .one(&state.db)
                .await?
        }
        None => None,
    };
    let object5 = package.package_type == domain::package::PackageType::Firmware.as_str()
        && product.is_some_and(|p| p.protocol_type == domain::device::ProtocolType::CoAP.as_str());
    if !object5 {
        return Ok(Err(Denied::Unknown));
    }
    Ok(Ok(grant(hash, row, package)))
}

/// A well-formed, known, unrevoked and unexpired token's row, with its hash.
async fn live_token(
    state: &AppState,
    token: &str,
) -> Result<Result<(String, download_tokens::Model), Denied>> {
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Err(Denied::Malformed));
    }
    let hash = ids::sha256_hex(&token.to_ascii_lowercase());
    let Some(row) = download_tokens::Entity::find_by_id(hash.clone())
        .one(&state.db)
        .await?
    else {
        return Ok(Err(Denied::Unknown));
    };
    if row.revoked_at.is_some() {
        return Ok(Err(Denied::Revoked));
    }
    if state.clock.now().as_millis() >= row.expires_at {
        return Ok(Err(Denied::Expired));
    }
    Ok(Ok((hash, row)))
}

fn grant(token_hash: String, row: download_tokens::Model, package: packages::Model) -> Grant {
    Grant {
        token_hash,
        device_id: row.device_id,
        subtask_id: row.subtask_id,
        expires_at: row.expires_at,
        package,
    }
}

/// Adds `bytes` to a token's served count and stamps its last use.
///
/// # Errors
/// [`Error::Db`].
pub async fn record_served(state: &AppState, token_hash: &str, bytes: u64) -> Result<()> {
    let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    download_tokens::Entity::update_many()
        .col_expr(
            download_tokens::Column::BytesServed,
            Expr::col(download_tokens::Column::BytesServed).add(bytes),
        )
        .col_expr(
            download_tokens::Column::LastUsedAt,
            Expr::value(state.clock.now().as_millis()),
        )
        .filter(download_tokens::Column::TokenHash.eq(token_hash))
        .exec(&state.db)
        .await?;
    Ok(())
}

/// Revokes every live token of a task's subtasks (it was stopped or is being deleted).
///
/// # Errors
/// [`Error::Db`].
pub async fn revoke_task(state: &AppState, task_id: &str) -> Result<u64> {
    crate::tokens::revoke_task(&state.db, state.clock.now(), task_id).await
}

/// A token's row (for tests and the console's subtask view).
///
/// # Errors
/// [`Error::Db`].
pub async fn find(state: &AppState, token: &str) -> Result<Option<download_tokens::Model>> {
    Ok(download_tokens::Entity::find_by_id(ids::sha256_hex(token))
        .one(&state.db)
        .await?)
}
