//! `/v5/iot/{project_id}/subscriptions`: push-notification subscriptions, shaped like IoTDA's
//! (`resource`, `event`, `callbackurl`, `channel`), plus Updraft's signing `secret` (returned once, at
//! creation) and a view of each subscription's deliveries.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use backend::service::subscriptions;
use backend::storage::entity::{notification_deliveries, notification_subscriptions};
use domain::Timestamp;
use http::StatusCode;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::ServerState;
use super::iotda::IotdaError;
use super::packages::project;
use super::signed::Caller;

type Ext = Option<axum::Extension<Caller>>;

#[derive(Debug, Deserialize)]
pub(super) struct CreateBody {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    event: String,
    #[serde(default)]
    callbackurl: String,
    channel: Option<String>,
    app_id: Option<String>,
}

#[derive(Serialize)]
struct SubscriptionJson {
    subscription_id: String,
    resource: String,
    event: &'static str,
    callbackurl: String,
    channel: &'static str,
    app_id: Option<String>,
    enabled: bool,
    create_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl SubscriptionJson {
    fn new(s: notification_subscriptions::Model, secret: Option<String>) -> Self {
        Self {
            resource: subscriptions::resource_of(&s),
            subscription_id: s.id,
            event: "update",
            callbackurl: s.url,
            channel: "HTTP",
            app_id: s.app_id,
            enabled: s.enabled,
            create_time: Timestamp::from_millis(s.created_at).to_compact(),
            secret,
        }
    }
}

/// `POST .../subscriptions`: 201 with the signing secret (shown this once).
pub(super) async fn create(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let Json(b) = body.map_err(|e| IotdaError::bad_request(e.body_text()))?;
    if b.channel
        .as_deref()
        .is_some_and(|c| !c.trim().eq_ignore_ascii_case("HTTP"))
    {
        return Err(IotdaError::bad_request(
            "channel: only HTTP (an HTTPS callback URL) is supported",
        ));
    }
    if let Some(app) = b.app_id.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
        let default = backend::service::projects::default_app(&state.app, &project_id).await?;
        if default.id != app {
            return Err(IotdaError::bad_request(format!(
                "app_id: unknown resource space {app}"
            )));
        }
    }
    let created = subscriptions::create(
        &state.app,
        &project_id,
        &b.resource,
        &b.event,
        &b.callbackurl,
    )
    .await?;
    let secret = created.secret.expose_secret().to_owned();
    Ok((
        StatusCode::CREATED,
        Json(SubscriptionJson::new(created.subscription, Some(secret))),
    )
        .into_response())
}

/// `GET .../subscriptions`.
pub(super) async fn list(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let rows = subscriptions::list(&state.app, &project_id).await?;
    let count = rows.len();
    let items: Vec<SubscriptionJson> = rows
        .into_iter()
        .map(|s| SubscriptionJson::new(s, None))
        .collect();
    Ok(Json(serde_json::json!({"subscriptions": items, "page": {"count": count}})).into_response())
}

/// `GET .../subscriptions/{subscription_id}`.
pub(super) async fn show(
    State(state): State<ServerState>,
    Path((project_id, id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let s = subscriptions::get(&state.app, &project_id, &id).await?;
    Ok(Json(SubscriptionJson::new(s, None)).into_response())
}

/// `DELETE .../subscriptions/{subscription_id}`: 204.
pub(super) async fn delete(
    State(state): State<ServerState>,
    Path((project_id, id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    subscriptions::delete(&state.app, &project_id, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct DeliveriesQuery {
    failed: Option<bool>,
    limit: Option<u64>,
}

#[derive(Serialize)]
struct DeliveryJson {
    delivery_id: i64,
    status: String,
    attempts: i32,
    last_http_status: Option<i32>,
    last_error: Option<String>,
    next_attempt_time: Option<String>,
    delivered_time: Option<String>,
    create_time: String,
}

impl From<notification_deliveries::Model> for DeliveryJson {
    fn from(d: notification_deliveries::Model) -> Self {
        let t = |ms: i64| Timestamp::from_millis(ms).to_compact();
        Self {
            delivery_id: d.id,
            next_attempt_time: (d.status == "pending").then(|| t(d.next_attempt_at)),
            status: d.status,
            attempts: d.attempts,
            last_http_status: d.last_http_status,
            last_error: d.last_error,
            delivered_time: d.delivered_at.map(t),
            create_time: t(d.created_at),
        }
    }
}

/// `GET .../subscriptions/{subscription_id}/deliveries?failed=true&limit=50` (Updraft's): recent
/// deliveries, newest first, to see what a receiver missed.
pub(super) async fn deliveries(
    State(state): State<ServerState>,
    Path((project_id, id)): Path<(String, String)>,
    caller: Ext,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let rows = subscriptions::deliveries(
        &state.app,
        &project_id,
        &id,
        q.failed.unwrap_or(false),
        q.limit.unwrap_or(50),
    )
    .await?;
    let items: Vec<DeliveryJson> = rows.into_iter().map(DeliveryJson::from).collect();
    Ok(Json(serde_json::json!({"deliveries": items})).into_response())
}
