//! Settings: API credentials (AK/SK) and push-notification subscriptions with their failed deliveries.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// An API credential (its secret key is never shown again after creation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRow {
    /// The access key (AK).
    pub access_key: String,
    /// What it is for.
    pub description: String,
    /// Created.
    pub created: String,
    /// Last signed request.
    pub last_used: Option<String>,
    /// Revoked, if it is.
    pub revoked: Option<String>,
}

/// A new credential: the secret key in clear, this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCredential {
    /// The project the credential works in.
    pub project_id: String,
    /// AK.
    pub access_key: String,
    /// SK.
    pub secret_key: String,
}

/// A push subscription.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRow {
    /// Id.
    pub subscription_id: String,
    /// `batchtask` or `updraft.batchtask.device`.
    pub resource: String,
    /// The callback URL.
    pub url: String,
    /// Created.
    pub created: String,
}

/// A new subscription: its signing secret in clear, this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSubscription {
    /// Id.
    pub subscription_id: String,
    /// The HMAC-SHA256 key of its `X-Updraft-Signature` header.
    pub secret: String,
}

/// A delivery that failed (at least once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedDelivery {
    /// The subscription's URL.
    pub url: String,
    /// `pending` (retrying) or `failed` (given up).
    pub status: String,
    /// Attempts so far.
    pub attempts: i32,
    /// The receiver's last HTTP status.
    pub http_status: Option<i32>,
    /// The last error.
    pub error: String,
    /// When it was queued.
    pub created: String,
    /// The next attempt, while retrying.
    pub next_attempt: Option<String>,
}

/// The project's credentials, newest first.
#[server(prefix = "/api", endpoint = "list_credentials")]
pub async fn list_credentials() -> Result<Vec<CredentialRow>, ApiError> {
    let (state, user) = super::ssr::context().await?;
    let rows = backend::service::credentials::list(&state, &user.project_id).await?;
    Ok(rows
        .into_iter()
        .map(|c| CredentialRow {
            access_key: c.access_key,
            description: c.description,
            created: super::ssr::when(c.created_at),
            last_used: c.last_used_at.map(super::ssr::when),
            revoked: c.revoked_at.map(super::ssr::when),
        })
        .collect())
}

/// Creates a credential; the secret key is returned this once.
#[server(prefix = "/api", endpoint = "create_credential")]
pub async fn create_credential(description: String) -> Result<NewCredential, ApiError> {
    use secrecy::ExposeSecret;
    let (state, user) = super::ssr::admin_context().await?;
    let created =
        backend::service::credentials::create(&state, &user.project_id, &description).await?;
    Ok(NewCredential {
        project_id: user.project_id,
        access_key: super::ssr::created(created.credential.access_key),
        secret_key: created.secret_key.expose_secret().to_owned(),
    })
}

/// Revokes a credential: its signatures are refused from now on.
#[server(prefix = "/api", endpoint = "revoke_credential")]
pub async fn revoke_credential(access_key: String) -> Result<(), ApiError> {
    let (state, user) = super::ssr::admin_context().await?;
    backend::service::credentials::revoke(&state, &user.project_id, &access_key).await?;
    Ok(())
}

/// The project's subscriptions.
#[server(prefix = "/api", endpoint = "list_subscriptions")]
pub async fn list_subscriptions() -> Result<Vec<SubscriptionRow>, ApiError> {
    use backend::service::subscriptions;
    let (state, user) = super::ssr::context().await?;
    let rows = subscriptions::list(&state, &user.project_id).await?;
    Ok(rows
        .into_iter()
        .map(|s| SubscriptionRow {
            resource: subscriptions::resource_of(&s),
            subscription_id: s.id,
            url: s.url,
            created: super::ssr::when(s.created_at),
        })
        .collect())
}

/// Subscribes `url` to `resource`; the signing secret is returned this once.
#[server(prefix = "/api", endpoint = "create_subscription")]
pub async fn create_subscription(
    resource: String,
    url: String,
) -> Result<NewSubscription, ApiError> {
    use secrecy::ExposeSecret;
    let (state, user) = super::ssr::admin_context().await?;
    let created = backend::service::subscriptions::create(
        &state,
        &user.project_id,
        &resource,
        "update",
        &url,
    )
    .await
    .map_err(|e| ApiError::from(e).rename_fields(&[("callbackurl", "url")]))?;
    Ok(NewSubscription {
        subscription_id: super::ssr::created(created.subscription.id),
        secret: created.secret.expose_secret().to_owned(),
    })
}

/// Deletes a subscription (its pending deliveries are dropped).
#[server(prefix = "/api", endpoint = "delete_subscription")]
pub async fn delete_subscription(subscription_id: String) -> Result<(), ApiError> {
    let (state, user) = super::ssr::admin_context().await?;
    backend::service::subscriptions::delete(&state, &user.project_id, &subscription_id).await?;
    Ok(())
}

/// The latest failed deliveries of every subscription (up to 20 each), newest first.
#[server(prefix = "/api", endpoint = "failed_deliveries")]
pub async fn failed_deliveries() -> Result<Vec<FailedDelivery>, ApiError> {
    use backend::service::subscriptions;
    let (state, user) = super::ssr::context().await?;
    let mut out = Vec::new();
    for s in subscriptions::list(&state, &user.project_id).await? {
        let rows = subscriptions::deliveries(&state, &user.project_id, &s.id, true, 20).await?;
        out.extend(rows.into_iter().map(|d| {
            (
                d.created_at,
                FailedDelivery {
                    url: s.url.clone(),
                    next_attempt: (d.status == "pending")
                        .then(|| super::ssr::when(d.next_attempt_at)),
                    status: d.status,
                    attempts: d.attempts,
                    http_status: d.last_http_status,
                    error: d.last_error.unwrap_or_default(),
                    created: super::ssr::when(d.created_at),
                },
            )
        }));
    }
    out.sort_by_key(|d| std::cmp::Reverse(d.0));
    Ok(out.into_iter().map(|(_, d)| d).collect())
}

/// An audit trail entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    /// When.
    pub at: String,
    /// `user`, `application`, `cli` or `anonymous`.
    pub actor_type: String,
    /// The user name, access key or operating-system user.
    pub actor: String,
    /// The client address.
    pub source: Option<String>,
    /// What was asked (`console stop_task`, `POST /v5/iot/{project_id}/batchtasks`, `cli task stop`).
    pub action: String,
    /// The kind of resource.
    pub resource_type: Option<String>,
    /// Its id.
    pub resource_id: Option<String>,
    /// Whether it succeeded.
    pub success: bool,
    /// The HTTP status answered.
    pub status: Option<i32>,
    /// Why it failed.
    pub detail: Option<String>,
    /// The request id, to find the call's log lines.
    pub request_id: Option<String>,
}

/// Audit entries shown per page.
pub const AUDIT_PAGE_SIZE: u64 = 50;

/// The project's audit trail, newest first, filtered by actor, resource kind and id, and a time range
/// (`datetime-local` values read as UTC, as the console shows times); empty filters match everything.
#[server(prefix = "/api", endpoint = "list_audit")]
pub async fn list_audit(
    actor: String,
    resource_type: String,
    resource_id: String,
    from: String,
    to: String,
    offset: u64,
) -> Result<crate::api::PageOf<AuditRow>, ApiError> {
    use backend::service::audit;
    let (state, user) = super::ssr::context().await?;
    let some = |s: String| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    let time = |field: &str, s: String| -> Result<Option<i64>, ApiError> {
        some(s)
            .map(|s| domain::Timestamp::parse_local_input(field, &s, 0).map(|t| t.as_millis()))
            .transpose()
            .map_err(ApiError::from)
    };
    let filter = audit::Filter {
        actor: some(actor),
        resource_type: some(resource_type),
        resource_id: some(resource_id),
        from: time("from", from)?,
        to: time("to", to)?,
        offset,
        limit: AUDIT_PAGE_SIZE,
    };
    let (rows, total) = audit::list(&state, &user.project_id, &filter).await?;
    Ok(crate::api::PageOf {
        items: rows
            .into_iter()
            .map(|r| AuditRow {
                at: super::ssr::when(r.at),
                actor_type: r.actor_type,
                actor: r.actor,
                source: r.source,
                action: r.action,
                resource_type: r.resource_type,
                resource_id: r.resource_id,
                success: r.result == "success",
                status: r.status,
                detail: r.detail,
                request_id: r.request_id,
            })
            .collect(),
        total,
        offset,
        limit: AUDIT_PAGE_SIZE,
    })
}
