//! Push-notification subscriptions: an application names an HTTPS URL and a resource; Updraft POSTs
//! every change of that resource to it, signed with the subscription's secret (see [`crate::notify`]).
//!
//! Resources:
//! - `batchtask`: IoTDA's batch-task notification (`event` `update`), on every task status or counter
//!   change.
//! - `updraft.batchtask.device`: Updraft's own per-device notification, on every subtask change (status,
//!   step, progress), modelled on IoTDA's `TaskDetail`.

use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use secrecy::{ExposeSecret, SecretString};

use crate::storage::entity::{notification_deliveries, notification_subscriptions};
use crate::{AppState, Error, Result, ids};

/// IoTDA's batch-task resource.
pub const BATCHTASK: &str = "batchtask";
/// Updraft's per-device resource.
pub const BATCHTASK_DEVICE: &str = "updraft.batchtask.device";

/// The outbox kind a resource is made from.
#[must_use]
pub fn outbox_kind(resource: &str) -> Option<&'static str> {
    match resource {
        BATCHTASK => Some("task.changed"),
        BATCHTASK_DEVICE => Some("subtask.changed"),
        _ => None,
    }
}

/// A new subscription and its signing secret, shown this once.
#[derive(Debug)]
pub struct Created {
    /// The stored row.
    pub subscription: notification_subscriptions::Model,
    /// The secret that signs its deliveries.
    pub secret: SecretString,
}

/// Subscribes `url` to `resource`'s `event` (only `update` exists).
///
/// # Errors
/// [`Error::Validation`] for a URL that is not `https://` (or `http://` when the settings allow it), an
/// unknown resource or event; [`Error::Db`].
pub async fn create(
    state: &AppState,
    project_id: &str,
    resource: &str,
    event: &str,
    url: &str,
) -> Result<Created> {
    insert(
        state,
        project_id,
        Subject { resource, event },
        url,
        Forwarding::default(),
    )
    .await
}

/// What is subscribed to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Subject<'a> {
    pub(crate) resource: &'a str,
    pub(crate) event: &'a str,
}

impl Subject<'_> {
    /// Checks the resource and the event.
    pub(crate) fn check(&self, field: &str) -> Result<()> {
        if outbox_kind(self.resource.trim()).is_none() {
            return Err(domain::ValidationError::new(
                format!("{field}resource"),
                format!("must be {BATCHTASK} or {BATCHTASK_DEVICE}"),
            )
            .into());
        }
        if self.event.trim() != "update" {
            return Err(
                domain::ValidationError::new(format!("{field}event"), "must be update").into(),
            );
        }
        Ok(())
    }
}

/// How a subscription came to be: `POST subscriptions` (the default), or a routing rule's HTTP
/// forwarding action.
#[derive(Debug)]
pub(crate) struct Forwarding {
    /// The rule, for an action.
    pub(crate) rule_id: Option<String>,
    /// The signing secret the caller chose (an action's `token`); `None`: a new random one.
    pub(crate) secret: Option<SecretString>,
    /// Whether it delivers now (an action delivers while its rule is active).
    pub(crate) enabled: bool,
    /// The field the URL came in, for errors.
    pub(crate) url_field: &'static str,
}

impl Default for Forwarding {
    fn default() -> Self {
        Self {
            rule_id: None,
            secret: None,
            enabled: true,
            url_field: "callbackurl",
        }
    }
}

/// Stores a subscription of `url` to `subject`.
pub(crate) async fn insert(
    state: &AppState,
    project_id: &str,
    subject: Subject<'_>,
    url: &str,
    how: Forwarding,
) -> Result<Created> {
    let allow_http = state.settings.notify.allow_http;
    let allow_private = state.settings.notify.allow_private;
    subject.check("")?;
    let resource = subject.resource.trim();
    let url = check_url(url, how.url_field, allow_http, allow_private)?;
    let id = ids::uuid_like();
    let secret = how
        .secret
        .unwrap_or_else(|| SecretString::from(ids::token()));
    let now = state.clock.now().as_millis();
    let app = super::projects::default_app(state, project_id).await?;
    let subscription = notification_subscriptions::ActiveModel {
        id: Set(id.clone()),
        project_id: Set(project_id.to_owned()),
        app_id: Set(Some(app.id)),
        url: Set(url),
        secret_enc: Set(state.sealer.seal(&id, secret.expose_secret())),
        kinds: Set(serde_json::json!([resource]).to_string()),
        enabled: Set(how.enabled),
        created_at: Set(now),
        updated_at: Set(now),
        rule_id: Set(how.rule_id),
    }
    .insert(&state.db)
    .await?;
    tracing::info!(subscription_id = %id, resource, url = %subscription.url, "subscription created");
    Ok(Created {
        subscription,
        secret,
    })
}

/// Checks a callback URL given in `field`.
pub(crate) fn check_url(
    url: &str,
    field: &str,
    allow_http: bool,
    allow_private: bool,
) -> Result<String> {
    let parsed = url::Url::parse(url.trim())
        .map_err(|e| domain::ValidationError::new(field, format!("not a URL ({e})")))?;
    let scheme_ok = parsed.scheme() == "https" || (allow_http && parsed.scheme() == "http");
    if !scheme_ok || parsed.host().is_none() {
        return Err(
            domain::ValidationError::new(field, "must be an https:// URL with a host").into(),
        );
    }
    let private = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => domain::net::is_private(ip.into()),
        Some(url::Host::Ipv6(ip)) => domain::net::is_private(ip.into()),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
        None => false,
    };
    if private && !allow_private {
        return Err(domain::ValidationError::new(
            field,
            "must not point at a loopback or private address (notifications.allow_private allows it)",
        )
        .into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(domain::ValidationError::new(
            field,
            "must not carry credentials; deliveries are signed instead",
        )
        .into());
    }
    Ok(parsed.to_string())
}

/// The resource a subscription is for.
#[must_use]
pub fn resource_of(s: &notification_subscriptions::Model) -> String {
    serde_json::from_str::<Vec<String>>(&s.kinds)
        .ok()
        .and_then(|k| k.into_iter().next())
        .unwrap_or_default()
}

/// `project_id`'s subscriptions, newest first.
///
/// # Errors
/// [`Error::Db`].
pub async fn list(
    state: &AppState,
    project_id: &str,
) -> Result<Vec<notification_subscriptions::Model>> {
    Ok(notification_subscriptions::Entity::find()
        .filter(notification_subscriptions::Column::ProjectId.eq(project_id))
        .order_by_desc(notification_subscriptions::Column::CreatedAt)
        .order_by_desc(notification_subscriptions::Column::Id)
        .all(&state.db)
        .await?)
}

/// One subscription of `project_id`.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn get(
    state: &AppState,
    project_id: &str,
    id: &str,
) -> Result<notification_subscriptions::Model> {
    notification_subscriptions::Entity::find_by_id(id.to_owned())
        .filter(notification_subscriptions::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("subscription", id))
}

/// Deletes a subscription and its pending deliveries.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn delete(state: &AppState, project_id: &str, id: &str) -> Result<()> {
    get(state, project_id, id).await?;
    notification_subscriptions::Entity::delete_by_id(id.to_owned())
        .exec(&state.db)
        .await?;
    tracing::info!(subscription_id = id, "subscription deleted");
    Ok(())
}

/// A subscription's most recent deliveries (newest first), `failed_only` for those that gave up or are
/// still retrying after a failure.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn deliveries(
    state: &AppState,
    project_id: &str,
    id: &str,
    failed_only: bool,
    limit: u64,
) -> Result<Vec<notification_deliveries::Model>> {
    get(state, project_id, id).await?;
    let mut q = notification_deliveries::Entity::find()
        .filter(notification_deliveries::Column::SubscriptionId.eq(id));
    if failed_only {
        q = q.filter(
            sea_orm::Condition::any()
                .add(notification_deliveries::Column::Status.eq("failed"))
                .add(notification_deliveries::Column::LastError.is_not_null()),
        );
    }
    Ok(q.order_by_desc(notification_deliveries::Column::Id)
        .limit(limit.clamp(1, 500))
        .all(&state.db)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_urls_are_https_without_credentials() {
        assert_eq!(
            check_url("https://app.example.com/hook", "callbackurl", false, false).unwrap(),
            "https://app.example.com/hook"
        );
        assert!(check_url("http://app.example.com/hook", "callbackurl", false, false).is_err());
        assert!(check_url("http://127.0.0.1:9000/hook", "callbackurl", true, true).is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook", "callbackurl", true, false).is_err());
        assert!(
            check_url(
                "https://user:pw@app.example.com/",
                "callbackurl",
                false,
                false
            )
            .is_err()
        );
        assert!(check_url("not a url", "callbackurl", false, false).is_err());
        assert!(check_url("ftp://x/", "callbackurl", true, true).is_err());
    }
}
