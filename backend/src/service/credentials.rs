//! Application credentials (AK/SK) per project: what applications sign `/v5` requests with
//! (`iotda-api.md` §1). The secret key is shown once, at creation, and stored sealed (the server needs it
//! in clear to recompute HMACs, so it cannot be hashed).

use std::time::Duration;

use domain::{Timestamp, text};
use protocol::apisign::{self, Authorization, SignError};
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};
use secrecy::{ExposeSecret, SecretString};

use crate::storage::entity::api_credentials;
use crate::{AppState, Error, Result, ids};

/// How many letters an access key has (IoTDA's are 20, upper case and digits).
const AK_LEN: usize = 20;
/// How many characters a secret key has.
const SK_LEN: usize = 40;

/// A new credential: the secret key in clear, this once.
#[derive(Debug)]
pub struct Created {
    /// The stored row (secret sealed).
    pub credential: api_credentials::Model,
    /// The secret key.
    pub secret_key: SecretString,
}

/// Creates a credential for `project_id`.
///
/// # Errors
/// [`Error::Validation`] for a description over 255 characters; [`Error::Db`].
pub async fn create(state: &AppState, project_id: &str, description: &str) -> Result<Created> {
    let description = text::bounded("description", description, 255, false)?;
    let access_key = ids::alphanumeric(AK_LEN).to_ascii_uppercase();
    let secret_key = SecretString::from(ids::alphanumeric(SK_LEN));
    let credential = api_credentials::ActiveModel {
        access_key: Set(access_key.clone()),
        project_id: Set(project_id.to_owned()),
        secret_key_enc: Set(state.sealer.seal(&access_key, secret_key.expose_secret())),
        description: Set(description),
        created_at: Set(state.clock.now().as_millis()),
        last_used_at: Set(None),
        revoked_at: Set(None),
    }
    .insert(&state.db)
    .await?;
    tracing::info!(access_key = %credential.access_key, project_id, "API credential created");
    Ok(Created {
        credential,
        secret_key,
    })
}

/// `project_id`'s credentials, newest first (revoked ones included, marked).
///
/// # Errors
/// [`Error::Db`].
pub async fn list(state: &AppState, project_id: &str) -> Result<Vec<api_credentials::Model>> {
    Ok(api_credentials::Entity::find()
        .filter(api_credentials::Column::ProjectId.eq(project_id))
        .order_by_desc(api_credentials::Column::CreatedAt)
        .all(&state.db)
        .await?)
}

/// Revokes a credential: requests signed with it are refused from now on.
///
/// # Errors
/// [`Error::NotFound`] for an unknown key or another project's; [`Error::Db`].
pub async fn revoke(state: &AppState, project_id: &str, access_key: &str) -> Result<()> {
    let result = api_credentials::Entity::update_many()
        .col_expr(
            api_credentials::Column::RevokedAt,
            Expr::value(state.clock.now().as_millis()),
        )
        .filter(api_credentials::Column::AccessKey.eq(access_key))
        .filter(api_credentials::Column::ProjectId.eq(project_id))
        .filter(api_credentials::Column::RevokedAt.is_null())
        .exec(&state.db)
        .await?;
    if result.rows_affected == 0 {
        return Err(Error::NotFound {
            what: "credential",
            id: access_key.to_owned(),
        });
    }
    tracing::info!(access_key, project_id, "API credential revoked");
    Ok(())
}

/// Why a signed request was refused: said to the caller as a 401.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The signature itself (layout, missing header, mismatch).
    #[error(transparent)]
    Signature(#[from] SignError),
    /// No such access key, or revoked.
    #[error("unknown or revoked access key")]
    UnknownKey,
    /// `X-Sdk-Date` too far from the server's clock.
    #[error("X-Sdk-Date {date} is more than {} s from the server's time", .skew.as_secs())]
    Skew {
        /// The date sent.
        date: String,
        /// The allowed skew.
        skew: Duration,
    },
    /// `X-Project-Id` or the path's project is not the credential's.
    #[error("the credential does not belong to project {0}")]
    Project(String),
}

/// An active credential, as a signed request needs it.
#[derive(Debug)]
pub struct Active {
    /// The access key.
    pub access_key: String,
    /// Its project.
    pub project_id: String,
    /// The secret key, opened.
    pub secret_key: SecretString,
    last_used_at: Option<i64>,
}

/// The first checks of a signed request, before its body is read: the `Authorization` layout, an
/// active access key, and `X-Sdk-Date` within `skew` of the clock.
///
/// The inner result is the caller's: `Err(Refusal)` for anything in the request that is wrong.
///
/// # Errors
/// The outer result is ours: [`Error::Db`], or [`Error::Secrets`] for a key that cannot be opened.
pub async fn admit(
    state: &AppState,
    authorization: &str,
    sdk_date: Option<&str>,
    skew: Duration,
) -> Result<std::result::Result<Active, Refusal>> {
    let auth = match Authorization::parse(authorization) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e.into())),
    };
    let date = sdk_date.unwrap_or_default().trim();
    let Some(signed_at) = parse_sdk_date(date) else {
        return Ok(Err(SignError::BadDate.into()));
    };
    let skew_ms = i64::try_from(skew.as_millis()).unwrap_or(i64::MAX);
    if (state.clock.now().as_millis() - signed_at.as_millis()).abs() > skew_ms {
        return Ok(Err(Refusal::Skew {
            date: date.to_owned(),
            skew,
        }));
    }
    let Some(credential) = api_credentials::Entity::find_by_id(auth.access_key.to_owned())
        .one(&state.db)
        .await?
        .filter(|c| c.revoked_at.is_none())
    else {
        return Ok(Err(Refusal::UnknownKey));
    };
    let secret_key = state
        .sealer
        .open(&credential.access_key, &credential.secret_key_enc)?;
    Ok(Ok(Active {
        access_key: credential.access_key,
        project_id: credential.project_id,
        secret_key,
        last_used_at: credential.last_used_at,
    }))
}

/// The last check, once the body's hash is known: the signature itself. Records the key's use.
///
/// # Errors
/// The outer result is ours ([`Error::Db`]); the inner one is the caller's.
pub async fn verify(
    state: &AppState,
    active: &Active,
    authorization: &str,
    request: &apisign::Request<'_, '_>,
) -> Result<std::result::Result<(), Refusal>> {
    let auth = match Authorization::parse(authorization) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e.into())),
    };
    if let Err(e) = apisign::verify(&auth, active.secret_key.expose_secret(), request) {
        return Ok(Err(e.into()));
    }
    let now = state.clock.now().as_millis();
    // At most one write a minute per key: a busy application must not turn every read into a write.
    if active.last_used_at.is_none_or(|t| now - t >= 60_000) {
        api_credentials::Entity::update_many()
            .col_expr(api_credentials::Column::LastUsedAt, Expr::value(now))
            .filter(api_credentials::Column::AccessKey.eq(&active.access_key))
            .exec(&state.db)
            .await?;
    }
    Ok(Ok(()))
}

/// `YYYYMMDDTHHMMSSZ` (UTC) as a timestamp.
fn parse_sdk_date(date: &str) -> Option<Timestamp> {
    if !apisign::is_sdk_date(date) {
        return None;
    }
    let t = chrono::NaiveDateTime::parse_from_str(date, "%Y%m%dT%H%M%SZ").ok()?;
    Some(Timestamp::from_millis(t.and_utc().timestamp_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_dates_parse_as_utc() {
        assert_eq!(
            parse_sdk_date("20240101T120000Z").map(Timestamp::as_millis),
            Some(1_704_110_400_000)
        );
        assert_eq!(parse_sdk_date("20241301T120000Z"), None);
        assert_eq!(parse_sdk_date("2024-01-01"), None);
    }
}
