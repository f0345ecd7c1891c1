//! Download tokens: bearer tokens bound to one subtask (one device, one package), valid for
//! `download_token_ttl` (24 h by default), revoked when the subtask ends or its task is stopped or deleted.
//! Only a token's SHA-256 is stored; the text is derived from the installation's key, the subtask, the
//! package and the issue time ([`crate::secrets::Sealer::derive_token`]), so the same token can be sent
//! again: a device that reconnects (or finds Updraft restarted) mid-download is re-sent the token it is
//! already using, and resumes with it.

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};

use crate::secrets::Sealer;
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
        &state.sealer,
        state.clock.now(),
        state.settings.download_token_ttl,
        &subtask,
        package_id,
    )
    .await
}

/// The text of the token issued for `subtask_id` and `package_id` at `issued_at` (ms).
fn token_text(sealer: &Sealer, subtask_id: i64, package_id: &str, issued_at: i64) -> String {
    sealer.derive_token(&format!("download:{subtask_id}:{package_id}:{issued_at}"))
}

/// Issues a token for `subtask` on `db` (a transaction, when the token must commit with other state).
///
/// # Errors
/// [`Error::Db`].
pub async fn issue_in<C: sea_orm::ConnectionTrait>(
    db: &C,
    sealer: &Sealer,
    now: Timestamp,
    ttl: std::time::Duration,
    subtask: &subtasks::Model,
    package_id: &str,
) -> Result<IssuedToken> {
    let expires_at = now.plus(ttl);
    // The issue time names the token; a second token for the same subtask in the same millisecond (a
    // manual clock, an immediate re-issue) takes the next one.
    let mut issued_at = now.as_millis();
    let (token, hash) = loop {
        let token = token_text(sealer, subtask.id, package_id, issued_at);
        let hash = ids::sha256_hex(&token);
        if download_tokens::Entity::find_by_id(hash.clone())
            .one(db)
            .await?
            .is_none()
        {
            break (token, hash);
        }
        issued_at += 1;
    };
    download_tokens::ActiveModel {
        token_hash: Set(hash),
        subtask_id: Set(subtask.id),
        device_id: Set(subtask.device_id.clone()),
        package_id: Set(package_id.to_owned()),
        issued_at: Set(issued_at),
        expires_at: Set(expires_at.as_millis()),
        revoked_at: Set(None),
        bytes_served: Set(0),
        last_used_at: Set(None),
    }
    .insert(db)
    .await?;
    Ok(IssuedToken { token, expires_at })
}

/// The token to send with an upgrade event: the subtask's live token for `package_id` again when at least
/// half of its lifetime is left (a device resuming its download keeps the token it uses), otherwise a new
/// one (the old one stays valid until it expires or the subtask ends).
///
/// # Errors
/// [`Error::Db`].
pub async fn reuse_or_issue_in<C: sea_orm::ConnectionTrait>(
    db: &C,
    sealer: &Sealer,
    now: Timestamp,
    ttl: std::time::Duration,
    subtask: &subtasks::Model,
    package_id: &str,
) -> Result<IssuedToken> {
    use sea_orm::QueryOrder;
    let half = i64::try_from(ttl.as_millis() / 2).unwrap_or(i64::MAX);
    let live = download_tokens::Entity::find()
        .filter(download_tokens::Column::SubtaskId.eq(subtask.id))
        .filter(download_tokens::Column::PackageId.eq(package_id))
        .filter(download_tokens::Column::RevokedAt.is_null())
        .filter(download_tokens::Column::ExpiresAt.gt(now.as_millis().saturating_add(half)))
        .order_by_desc(download_tokens::Column::IssuedAt)
        .all(db)
        .await?;
    for row in live {
        let token = token_text(sealer, row.subtask_id, &row.package_id, row.issued_at);
        // Tokens issued before tokens were derived cannot be named again.
        if ids::sha256_hex(&token) == row.token_hash {
            return Ok(IssuedToken {
                token,
                expires_at: Timestamp::from_millis(row.expires_at),
            });
        }
    }
    issue_in(db, sealer, now, ttl, subtask, package_id).await
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
