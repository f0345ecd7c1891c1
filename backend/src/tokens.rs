//! Download tokens: bearer tokens bound to one subtask (one device, one package), valid for
//! `download_token_ttl` (24 h by default), revoked when the subtask ends or its task is stopped or deleted.
//! Only a token's SHA-256 is stored; the text is derived from the installation's key, the subtask, the
//! package and the issue time ([`crate::secrets::Sealer::derive_token`]), so the same token can be sent
//! again: a device that reconnects (or finds Updraft restarted) mid-download is re-sent the token it is
//! already using, and resumes with it.

use domain::Timestamp;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};

use crate::secrets::Sealer;
use crate::storage::entity::{download_tokens, subtasks};
use crate::{Result, ids};

/// A freshly issued token: the only time its text exists.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The bearer token (64 hex digits).
    pub token: String,
    /// When it stops working.
    pub expires_at: Timestamp,
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
pub async fn revoke_task<C: sea_orm::ConnectionTrait>(
    db: &C,
    now: Timestamp,
    task_id: &str,
) -> Result<u64> {
    use sea_orm::{QuerySelect, QueryTrait};
    let subtask_ids = subtasks::Entity::find()
        .select_only()
        .column(subtasks::Column::Id)
        .filter(subtasks::Column::TaskId.eq(task_id))
        .into_query();
    let r = download_tokens::Entity::update_many()
        .col_expr(
            download_tokens::Column::RevokedAt,
            Expr::value(now.as_millis()),
        )
        .filter(download_tokens::Column::SubtaskId.in_subquery(subtask_ids))
        .filter(download_tokens::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(r.rows_affected)
}
