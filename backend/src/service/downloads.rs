//! Download tokens: bearer tokens bound to one subtask (one device, one package), valid for
//! `download_token_ttl` (24 h by default), revoked when the subtask ends or its task is stopped or deleted.
//! Only a token's SHA-256 is stored.

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};

use crate::storage::entity::{download_tokens, packages, subtasks};
use crate::{AppState, Error, Result, ids};
use domain::Timestamp;

/// A freshly issued token: the only time its text exists.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The bearer token (64 hex digits).
    pub token: String,
    /// When it stops working.
    pub expires_at: Timestamp,
}

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
        state.clock.now(),
        state.settings.download_token_ttl,
        &subtask,
        package_id,
    )
    .await
}

/// Issues a token for `subtask` on `db` (a transaction, when the token must commit with other state).
///
/// # Errors
/// [`Error::Db`].
pub async fn issue_in<C: sea_orm::ConnectionTrait>(
    db: &C,
    now: Timestamp,
    ttl: std::time::Duration,
    subtask: &subtasks::Model,
    package_id: &str,
) -> Result<IssuedToken> {
    let token = ids::token();
    let expires_at = now.plus(ttl);
    download_tokens::ActiveModel {
        token_hash: Set(ids::sha256_hex(&token)),
        subtask_id: Set(subtask.id),
        device_id: Set(subtask.device_id.clone()),
        package_id: Set(package_id.to_owned()),
        issued_at: Set(now.as_millis()),
        expires_at: Set(expires_at.as_millis()),
        revoked_at: Set(None),
        bytes_served: Set(0),
        last_used_at: Set(None),
    }
    .insert(db)
    .await?;
    Ok(IssuedToken { token, expires_at })
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
/// `/fw/<token>`).
///
/// # Errors
/// `Ok(Err(Denied))` for a refused token (also when its package is gone); [`Error::Db`].
pub async fn authorize_token(state: &AppState, token: &str) -> Result<Result<Grant, Denied>> {
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

/// Whether a subtask has a live token that has served bytes (its device got the upgrade event).
///
/// # Errors
/// [`Error::Db`].
pub async fn live_and_used<C: sea_orm::ConnectionTrait>(
    db: &C,
    now: Timestamp,
    subtask_id: i64,
) -> Result<bool> {
    use sea_orm::PaginatorTrait;
    let n = download_tokens::Entity::find()
        .filter(download_tokens::Column::SubtaskId.eq(subtask_id))
        .filter(download_tokens::Column::RevokedAt.is_null())
        .filter(download_tokens::Column::LastUsedAt.is_not_null())
        .filter(download_tokens::Column::ExpiresAt.gt(now.as_millis()))
        .count(db)
        .await?;
    Ok(n > 0)
}

/// Revokes every live token of a subtask (it ended), on `db` (a transaction, when the revocation must
/// commit with the subtask's new state). Returns how many were revoked.
///
/// # Errors
/// [`Error::Db`].
pub async fn revoke_subtask<C: sea_orm::ConnectionTrait>(
    db: &C,
    now: Timestamp,
    subtask_id: i64,
) -> Result<u64> {
    let r = download_tokens::Entity::update_many()
        .col_expr(
            download_tokens::Column::RevokedAt,
            Expr::value(now.as_millis()),
        )
        .filter(download_tokens::Column::SubtaskId.eq(subtask_id))
        .filter(download_tokens::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(r.rows_affected)
}

/// Revokes every live token of a task's subtasks (it was stopped or is being deleted).
///
/// # Errors
/// [`Error::Db`].
pub async fn revoke_task(state: &AppState, task_id: &str) -> Result<u64> {
    use sea_orm::{QuerySelect, QueryTrait};
    let subtask_ids = subtasks::Entity::find()
        .select_only()
        .column(subtasks::Column::Id)
        .filter(subtasks::Column::TaskId.eq(task_id))
        .into_query();
    let r = download_tokens::Entity::update_many()
        .col_expr(
            download_tokens::Column::RevokedAt,
            Expr::value(state.clock.now().as_millis()),
        )
        .filter(download_tokens::Column::SubtaskId.in_subquery(subtask_ids))
        .filter(download_tokens::Column::RevokedAt.is_null())
        .exec(&state.db)
        .await?;
    Ok(r.rows_affected)
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
