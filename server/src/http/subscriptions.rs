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
use utoipa::{IntoParams, ToSchema};

use super::ServerState;
use super::iotda::{IotdaError, IotdaErrorBody};
use super::paging::PageInfo;
use super::signed::Caller;
use super::signed::project;

type Ext = Option<axum::Extension<Caller>>;

/// The console user of a session-authenticated call (absent for signed calls).
pub(super) type User = Option<axum::Extension<backend::service::auth::CurrentUser>>;

/// Subscriptions are managed by administrators: a console session of another user is refused (an
/// application's access key was itself created by an administrator).
pub(super) fn admin_only(user: &User) -> Result<(), IotdaError> {
    match user {
        Some(u) if !u.is_admin => Err(IotdaError::forbidden(
            "only an administrator may manage subscriptions and routing rules",
        )),
        _ => Ok(()),
    }
}

/// A new subscription.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = CreateSubscription)]
pub(super) struct CreateBody {
    /// `batchtask` (IoTDA's task notification, on every task status or counter change) or
    /// `updraft.batchtask.device` (Updraft's, on every change of a device in a task).
    #[serde(default)]
    #[schema(required = true)]
    resource: String,
    /// `update`.
    #[serde(default)]
    #[schema(required = true)]
    event: String,
    /// The receiver: an `https://` URL without credentials.
    #[serde(default)]
    #[schema(required = true)]
    callbackurl: String,
    /// Only `HTTP` (the default): POSTs to `callbackurl`.
    channel: Option<String>,
    /// The resource space; when given, the project's default one.
    app_id: Option<String>,
}

/// A push-notification subscription.
#[derive(Serialize, ToSchema)]
#[schema(as = Subscription)]
struct SubscriptionJson {
    /// The subscription's id.
    subscription_id: String,
    /// `batchtask` or `updraft.batchtask.device`.
    resource: String,
    /// `update`.
    event: &'static str,
    /// The receiver.
    callbackurl: String,
    /// `HTTP`.
    channel: &'static str,
    /// The resource space, when one was given.
    app_id: Option<String>,
    /// Whether notifications are sent.
    enabled: bool,
    /// When it was created (`yyyyMMddTHHmmssZ`, UTC).
    create_time: String,
    /// The key that signs `X-Updraft-Signature` (HMAC-SHA256): only in the answer to the creation.
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
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/subscriptions",
    operation_id = "CreateSubscription",
    tag = "subscriptions",
    summary = "Subscribe a receiver to notifications",
    description = "Each notification is a POST in IoTDA's envelope (`resource`, `event`, `event_time`, \
                   `notify_data.body`) signed with `X-Updraft-Signature: t=<unix ms>,v1=<hex \
                   HMAC-SHA256(secret, \"<t>.<raw body>\")>`; deliveries are retried and in order per task.",
    params(("project_id" = String, Path, description = "The project.")),
    request_body(content = CreateBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The subscription, with its signing `secret` (shown this once).", body = SubscriptionJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn create(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    user: User,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    admin_only(&user)?;
    let project_id = project(caller.as_deref(), &project_id)?;
    let Json(b) = body.map_err(IotdaError::from)?;
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
    Ok(super::iotda::created(
        &created.subscription.id.clone(),
        SubscriptionJson::new(created.subscription, Some(secret)),
    ))
}

/// `ListSubscriptions`' answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ListSubscriptionsResponse)]
struct SubscriptionList {
    /// Every subscription, newest first (without `secret`).
    subscriptions: Vec<SubscriptionJson>,
    /// `count` only (no paging).
    page: PageInfo,
}

/// `GET .../subscriptions`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/subscriptions",
    operation_id = "ListSubscriptions",
    tag = "subscriptions",
    summary = "List subscriptions",
    params(("project_id" = String, Path, description = "The project.")),
    responses(
        (status = 200, description = "Every subscription of the project.", body = SubscriptionList),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let rows = subscriptions::list(&state.app, &project_id).await?;
    let count = rows.len() as u64;
    let subscriptions = rows
        .into_iter()
        .map(|s| SubscriptionJson::new(s, None))
        .collect();
    Ok(Json(SubscriptionList {
        subscriptions,
        page: PageInfo {
            count,
            marker: None,
        },
    })
    .into_response())
}

/// `GET .../subscriptions/{subscription_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/subscriptions/{subscription_id}",
    operation_id = "ShowSubscription",
    tag = "subscriptions",
    summary = "Show a subscription",
    params(("project_id" = String, Path, description = "The project."), ("subscription_id" = String, Path, description = "The subscription.")),
    responses(
        (status = 200, description = "The subscription (without `secret`).", body = SubscriptionJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or subscription.", body = IotdaErrorBody),
    ),
)]
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
#[utoipa::path(
    delete,
    path = "/v5/iot/{project_id}/subscriptions/{subscription_id}",
    operation_id = "DeleteSubscription",
    tag = "subscriptions",
    summary = "Delete a subscription and its pending deliveries",
    params(("project_id" = String, Path, description = "The project."), ("subscription_id" = String, Path, description = "The subscription.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or subscription.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn delete(
    State(state): State<ServerState>,
    Path((project_id, id)): Path<(String, String)>,
    caller: Ext,
    user: User,
) -> Result<Response, IotdaError> {
    admin_only(&user)?;
    let project_id = project(caller.as_deref(), &project_id)?;
    subscriptions::delete(&state.app, &project_id, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Which deliveries to show.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeliveriesQuery {
    /// Only deliveries that failed or are being retried after a failure (default `false`).
    failed: Option<bool>,
    /// How many, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

/// One notification to one receiver.
#[derive(Serialize, ToSchema)]
#[schema(as = Delivery)]
struct DeliveryJson {
    /// The delivery's id.
    delivery_id: i64,
    /// `pending`, `delivered` or `failed`.
    status: String,
    /// Attempts so far.
    attempts: i32,
    /// The receiver's last HTTP status.
    last_http_status: Option<i32>,
    /// Why the last attempt failed.
    last_error: Option<String>,
    /// When the next attempt is due (pending deliveries; `yyyyMMddTHHmmssZ`, UTC).
    next_attempt_time: Option<String>,
    /// When it was delivered (`yyyyMMddTHHmmssZ`, UTC).
    delivered_time: Option<String>,
    /// When it was queued (`yyyyMMddTHHmmssZ`, UTC).
    create_time: String,
}

/// A subscription's recent deliveries.
#[derive(Serialize, ToSchema)]
#[schema(as = ListDeliveriesResponse)]
struct DeliveryList {
    /// Newest first.
    deliveries: Vec<DeliveryJson>,
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
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/subscriptions/{subscription_id}/deliveries",
    operation_id = "ListDeliveries",
    tag = "subscriptions",
    summary = "List a subscription's recent deliveries (Updraft's)",
    description = "Newest first: what a receiver got, missed, and why.",
    params(("project_id" = String, Path, description = "The project."), ("subscription_id" = String, Path, description = "The subscription."), DeliveriesQuery),
    responses(
        (status = 200, description = "The most recent deliveries.", body = DeliveryList),
        (status = 400, description = "`failed` is not a boolean or `limit` not a number (a plain-text answer)."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or subscription.", body = IotdaErrorBody),
    ),
)]
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
    let deliveries = rows.into_iter().map(DeliveryJson::from).collect();
    Ok(Json(DeliveryList { deliveries }).into_response())
}
