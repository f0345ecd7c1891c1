//! IoTDA's device, device group and product APIs (`iotda-api.md` §3.5-3.7) over the same services as the
//! console and the command line. Lists use IoTDA's paging: descending id, `marker` = the last id of the
//! previous page, `page.count` = every match.

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use backend::service::{ListOrder, Page, devices, groups, products, projects};
use backend::storage::entity::{applications, device_groups};
use domain::Timestamp;
use http::StatusCode;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::ServerState;
use super::iotda::{IotdaError, IotdaErrorBody};
use super::packages::{PageInfo, project};
use super::signed::Caller;

type Ext = Option<axum::Extension<Caller>>;

/// IoTDA's default `marker`: start from the newest record.
const DEFAULT_MARKER: &str = "ffffffffffffffffffffffff";

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, IotdaError> {
    b.map(|Json(v)| v)
        .map_err(|e| IotdaError::bad_request(e.body_text()))
}

/// IoTDA paging for ids that are not 24 hex digits: `limit` 1-50, `offset` 0-500, `marker` an id.
fn paging(
    limit: Option<&str>,
    offset: Option<&str>,
    marker: Option<&str>,
    max_marker: usize,
) -> Result<(Page, ListOrder), IotdaError> {
    let (page, _) = super::packages::paging(limit, offset, None)?;
    // IoTDA's documented default marker means "from the start".
    let marker = match marker
        .map(str::trim)
        .filter(|m| !m.is_empty() && !m.eq_ignore_ascii_case(DEFAULT_MARKER))
    {
        None => None,
        Some(m)
            if m.len() <= max_marker
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            Some(m.to_owned())
        }
        Some(_) => {
            return Err(IotdaError::bad_request(
                "marker: must be the id of the last record of the previous page",
            ));
        }
    };
    Ok((page, ListOrder::ById { marker }))
}

/// `{ "body": "..." }`, what IoTDA's freeze, unfreeze and membership operations answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ActionResult)]
struct Done {
    /// What happened: `frozen`, `unfrozen`, `added` or `removed`.
    body: &'static str,
}

/// Answers [`Done`].
fn done(message: &'static str) -> Response {
    Json(Done { body: message }).into_response()
}

/// Resource-space names by id (every project has a handful).
async fn app_names(
    state: &ServerState,
    project_id: &str,
) -> Result<HashMap<String, String>, IotdaError> {
    Ok(applications::Entity::find()
        .filter(applications::Column::ProjectId.eq(project_id))
        .all(&state.app.db)
        .await
        .map_err(backend::Error::from)?
        .into_iter()
        .map(|a| (a.id, a.name))
        .collect())
}

/// `app_id` must be one of the project's resource spaces when given.
async fn check_app(
    state: &ServerState,
    project_id: &str,
    app_id: Option<&str>,
) -> Result<(), IotdaError> {
    let Some(app_id) = app_id.map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok(());
    };
    if app_names(state, project_id).await?.contains_key(app_id) {
        Ok(())
    } else {
        Err(IotdaError::bad_request(format!(
            "app_id: unknown resource space {app_id}"
        )))
    }
}

// --- devices ----------------------------------------------------------------------------------------

/// IoTDA's `AuthInfo` in a request.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = AuthInfo)]
pub(super) struct AuthInfoBody {
    /// `SECRET` (the default); `CERTIFICATES` is not supported.
    auth_type: Option<String>,
    /// The device's secret; generated when absent (on registration).
    secret: Option<String>,
    /// Not supported (certificate devices): must be absent.
    fingerprint: Option<String>,
    /// Whether the device must connect over TLS (default `true`).
    secure_access: Option<bool>,
    /// Only `0` (an inactive device is never deleted).
    timeout: Option<i64>,
}

/// IoTDA's `AddDevice` body (directly connected devices that log in with a secret).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = AddDevice)]
pub(super) struct AddDeviceBody {
    /// The device id; default `{product_id}_{node_id}`.
    device_id: Option<String>,
    /// The device's own identifier (IMEI, MAC, serial number).
    #[serde(default)]
    #[schema(required = true)]
    node_id: String,
    /// A name.
    #[serde(default)]
    device_name: String,
    /// The device's product.
    #[serde(default)]
    #[schema(required = true)]
    product_id: String,
    /// How it authenticates.
    auth_info: Option<AuthInfoBody>,
    /// A description.
    #[serde(default)]
    description: String,
    /// Not supported (child devices): must be absent or empty.
    gateway_id: Option<String>,
    /// The resource space; when given, one of the project's.
    app_id: Option<String>,
    /// Free-form attributes (a JSON object).
    #[schema(value_type = Option<Object>)]
    extension_info: Option<Value>,
    /// Not supported (device shadows): must be absent.
    #[schema(value_type = Option<Vec<Object>>)]
    shadow: Option<Value>,
}

/// IoTDA's `UpdateDevice` body: what is given changes.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = UpdateDevice)]
pub(super) struct UpdateDeviceBody {
    /// A new name.
    device_name: Option<String>,
    /// A new description.
    description: Option<String>,
    /// New free-form attributes (a JSON object).
    #[schema(value_type = Option<Object>)]
    extension_info: Option<Value>,
    /// Only `secure_access` (and a `timeout` of 0) can change.
    auth_info: Option<AuthInfoBody>,
}

/// A device's `auth_info` in an answer.
#[derive(Serialize, ToSchema)]
#[schema(as = DeviceAuthInfo)]
struct AuthInfoJson {
    /// `SECRET`.
    auth_type: String,
    /// The device's secret (on registration and show).
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    /// Never set (certificate devices are not supported).
    #[serde(skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
    /// Whether the device must connect over TLS.
    secure_access: bool,
    /// Always `0`.
    timeout: i64,
}

/// IoTDA's device object (`auth_info`, times and `extension_info` only in full views).
#[derive(Serialize, ToSchema)]
#[schema(as = Device)]
struct DeviceJson {
    /// The resource space.
    app_id: String,
    /// The resource space's name.
    app_name: String,
    /// The device id.
    device_id: String,
    /// The device's own identifier (IMEI, MAC, serial number).
    node_id: String,
    /// The device itself (every device is directly connected).
    gateway_id: String,
    /// Its name.
    device_name: String,
    /// `GATEWAY`: a directly connected device.
    node_type: String,
    /// A description.
    description: String,
    /// The firmware version it last reported.
    fw_version: Option<String>,
    /// The software version it last reported.
    sw_version: Option<String>,
    /// The SDK version it last reported.
    device_sdk_version: Option<String>,
    /// The product.
    product_id: String,
    /// The product's name.
    product_name: String,
    /// `ONLINE`, `OFFLINE`, `ABNORMAL`, `INACTIVE` or `FROZEN`.
    status: String,
    /// Always empty (tags are not supported).
    #[schema(value_type = Vec<Object>)]
    tags: Vec<Value>,
    /// How it authenticates (not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_info: Option<AuthInfoJson>,
    /// When it was registered (`yyyyMMddTHHmmssZ`, UTC; not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    create_time: Option<String>,
    /// When its status last changed (`yyyy-MM-ddTHH:mm:ss.SSSZ`; not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_status_update_time: Option<String>,
    /// When it first connected (`yyyy-MM-ddTHH:mm:ss.SSSZ`; not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    active_time: Option<String>,
    /// Free-form attributes (not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    extension_info: Option<Value>,
    /// Always empty (OTA modules are not supported; not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    modules: Option<Vec<Value>>,
}

impl DeviceJson {
    /// `full` adds what IoTDA's list leaves out; `secret` is the device's secret when it is shown.
    fn new(
        d: backend::storage::entity::devices::Model,
        app_name: String,
        product_name: String,
        full: bool,
        secret: Option<String>,
    ) -> Self {
        let iso = |t: Option<i64>| t.map(|ms| Timestamp::from_millis(ms).to_iso_millis());
        Self {
            auth_info: full.then(|| AuthInfoJson {
                auth_type: d.auth_type.clone(),
                secret,
                fingerprint: d.fingerprint.clone(),
                secure_access: d.secure_access,
                timeout: 0,
            }),
            create_time: full.then(|| Timestamp::from_millis(d.created_at).to_compact()),
            connection_status_update_time: if full {
                iso(d.connection_status_update_time)
            } else {
                None
            },
            active_time: if full { iso(d.active_time) } else { None },
            extension_info: if full {
                Some(
                    d.extension_info
                        .as_deref()
                        .and_then(|j| serde_json::from_str(j).ok())
                        .unwrap_or_else(|| Value::Object(serde_json::Map::new())),
                )
            } else {
                None
            },
            modules: full.then(Vec::new),
            gateway_id: d.gateway_id.clone().unwrap_or_else(|| d.id.clone()),
            app_id: d.app_id,
            app_name,
            device_id: d.id,
            node_id: d.node_id,
            device_name: d.device_name,
            node_type: d.node_type,
            description: d.description,
            fw_version: d.fw_version,
            sw_version: d.sw_version,
            device_sdk_version: d.device_sdk_version,
            product_id: d.product_id,
            product_name,
            status: d.status,
            tags: Vec::new(),
        }
    }
}

async fn device_json(
    state: &ServerState,
    project_id: &str,
    d: backend::storage::entity::devices::Model,
    secret: Option<String>,
) -> Result<DeviceJson, IotdaError> {
    let apps = app_names(state, project_id).await?;
    let product = products::get(&state.app, project_id, &d.product_id).await?;
    let app_name = apps.get(&d.app_id).cloned().unwrap_or_default();
    Ok(DeviceJson::new(d, app_name, product.name, true, secret))
}

/// `POST /v5/iot/{project_id}/devices`: 201 with the device (and its secret, this once).
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/devices",
    operation_id = "AddDevice",
    tag = "devices",
    summary = "Register a device",
    params(("project_id" = String, Path, description = "The project.")),
    request_body(content = AddDeviceBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The device, with its secret (generated when none was given).", body = DeviceJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or product.", body = IotdaErrorBody),
        (status = 409, description = "The device id or the product's node id is taken.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn add_device(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    b: Result<Json<AddDeviceBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = body(b)?;
    if b.gateway_id
        .as_deref()
        .is_some_and(|g| !g.trim().is_empty())
    {
        return Err(IotdaError::bad_request(
            "gateway_id: child devices are not supported; register directly connected devices",
        ));
    }
    if b.shadow.is_some() {
        return Err(IotdaError::bad_request(
            "shadow: device shadows are not supported",
        ));
    }
    check_app(&state, &project_id, b.app_id.as_deref()).await?;
    let auth = b.auth_info.unwrap_or_default();
    match auth.auth_type.as_deref().map(str::trim) {
        None | Some("" | "SECRET") => {}
        Some("CERTIFICATES") => {
            return Err(IotdaError::bad_request(
                "auth_info.auth_type: certificate devices are not supported; use SECRET",
            ));
        }
        Some(other) => {
            return Err(IotdaError::bad_request(format!(
                "auth_info.auth_type: {other:?} is not SECRET or CERTIFICATES"
            )));
        }
    }
    if auth.fingerprint.is_some() {
        return Err(IotdaError::bad_request(
            "auth_info.fingerprint: certificate devices are not supported",
        ));
    }
    if auth.timeout.is_some_and(|t| t != 0) {
        return Err(IotdaError::bad_request(
            "auth_info.timeout: only 0 (never delete an inactive device) is supported",
        ));
    }
    let registered = devices::register(
        &state.app,
        &project_id,
        devices::NewDevice {
            product_id: b.product_id,
            node_id: b.node_id,
            device_id: b.device_id,
            device_name: b.device_name,
            description: b.description,
            secret: auth.secret.map(SecretString::from),
            extension_info: b.extension_info,
            secure_access: auth.secure_access,
        },
    )
    .await?;
    let secret = registered.secret.expose_secret().to_owned();
    let json = device_json(&state, &project_id, registered.device, Some(secret)).await?;
    Ok((StatusCode::CREATED, Json(json)).into_response())
}

/// `ListDevices` query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeviceQuery {
    /// Page size, 1-50 (default 10).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// Records to skip after the marker, 0-500 (default 0).
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
    /// The `page.marker` of the previous page: devices after it, by descending id.
    marker: Option<String>,
    /// Only this resource space's devices (one of the project's).
    app_id: Option<String>,
    /// Only this product's devices.
    product_id: Option<String>,
    /// Only the device with this node id.
    node_id: Option<String>,
    /// Only devices with this name.
    device_name: Option<String>,
    /// A gateway's child devices: always none (every device is directly connected).
    gateway_id: Option<String>,
}

/// `ListDevices`' answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ListDevicesResponse)]
struct DeviceList {
    /// This page's devices (without `auth_info`, times and `extension_info`).
    devices: Vec<DeviceJson>,
    /// Paging.
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/devices`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/devices",
    operation_id = "ListDevices",
    tag = "devices",
    summary = "List devices",
    params(("project_id" = String, Path, description = "The project."), DeviceQuery),
    responses(
        (status = 200, description = "A page of devices.", body = DeviceList),
        (status = 400, description = "An invalid filter or paging parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list_devices(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    Query(q): Query<DeviceQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, order) = paging(
        q.limit.as_deref(),
        q.offset.as_deref(),
        q.marker.as_deref(),
        128,
    )?;
    check_app(&state, &project_id, q.app_id.as_deref()).await?;
    let s = |v: &Option<String>| v.as_deref().unwrap_or_default().trim().to_owned();
    if !s(&q.gateway_id).is_empty() {
        // Every Updraft device is directly connected: no device has children.
        return Ok(Json(DeviceList {
            devices: Vec::new(),
            page: PageInfo {
                count: 0,
                marker: None,
            },
        })
        .into_response());
    }
    let filter = devices::DeviceFilter {
        product_id: s(&q.product_id),
        node_id: s(&q.node_id),
        device_name: s(&q.device_name),
        order,
        ..Default::default()
    };
    let result = devices::list(&state.app, &project_id, &filter, page).await?;
    let apps = app_names(&state, &project_id).await?;
    let product_names: HashMap<String, String> =
        products::list(&state.app, &project_id, Page::new(500, 0))
            .await?
            .items
            .into_iter()
            .map(|p| (p.product.id, p.product.name))
            .collect();
    let marker = result.items.last().map(|d| d.id.clone());
    let devices: Vec<DeviceJson> = result
        .items
        .into_iter()
        .map(|d| {
            let app = apps.get(&d.app_id).cloned().unwrap_or_default();
            let product = product_names
                .get(&d.product_id)
                .cloned()
                .unwrap_or_default();
            DeviceJson::new(d, app, product, false, None)
        })
        .collect();
    Ok(Json(DeviceList {
        devices,
        page: PageInfo {
            count: result.total,
            marker,
        },
    })
    .into_response())
}

/// `GET /v5/iot/{project_id}/devices/{device_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/devices/{device_id}",
    operation_id = "ShowDevice",
    tag = "devices",
    summary = "Show a device",
    params(("project_id" = String, Path, description = "The project."), ("device_id" = String, Path, description = "The device.")),
    responses(
        (status = 200, description = "The device, with its secret.", body = DeviceJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or device.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn show_device(
    State(state): State<ServerState>,
    Path((project_id, device_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let d = devices::get(&state.app, &project_id, &device_id).await?;
    let secret = devices::secret(&state.app, &device_id)
        .await?
        .map(|s| s.expose_secret().to_owned());
    Ok(Json(device_json(&state, &project_id, d, secret).await?).into_response())
}

/// `PUT /v5/iot/{project_id}/devices/{device_id}`.
#[utoipa::path(
    put,
    path = "/v5/iot/{project_id}/devices/{device_id}",
    operation_id = "UpdateDevice",
    tag = "devices",
    summary = "Update a device",
    params(("project_id" = String, Path, description = "The project."), ("device_id" = String, Path, description = "The device.")),
    request_body(content = UpdateDeviceBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The device as it is now.", body = DeviceJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or device.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn update_device(
    State(state): State<ServerState>,
    Path((project_id, device_id)): Path<(String, String)>,
    caller: Ext,
    b: Result<Json<UpdateDeviceBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = body(b)?;
    let auth = b.auth_info.unwrap_or_default();
    if auth.timeout.is_some_and(|t| t != 0) {
        return Err(IotdaError::bad_request(
            "auth_info.timeout: only 0 (never delete an inactive device) is supported",
        ));
    }
    let d = devices::update(
        &state.app,
        &project_id,
        &device_id,
        devices::DeviceUpdate {
            device_name: b.device_name,
            description: b.description,
            extension_info: b.extension_info,
            secure_access: auth.secure_access,
        },
    )
    .await?;
    Ok(Json(device_json(&state, &project_id, d, None).await?).into_response())
}

/// `DELETE /v5/iot/{project_id}/devices/{device_id}`: 204.
#[utoipa::path(
    delete,
    path = "/v5/iot/{project_id}/devices/{device_id}",
    operation_id = "DeleteDevice",
    tag = "devices",
    summary = "Delete a device",
    params(("project_id" = String, Path, description = "The project."), ("device_id" = String, Path, description = "The device.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or device.", body = IotdaErrorBody),
        (status = 409, description = "A task is still upgrading the device.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn delete_device(
    State(state): State<ServerState>,
    Path((project_id, device_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    devices::delete(&state.app, &project_id, &device_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v5/iot/{project_id}/devices/{device_id}/freeze`.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/devices/{device_id}/freeze",
    operation_id = "FreezeDevice",
    tag = "devices",
    summary = "Freeze a device",
    description = "A frozen device cannot log in; a connected one is disconnected.",
    params(("project_id" = String, Path, description = "The project."), ("device_id" = String, Path, description = "The device.")),
    responses(
        (status = 200, description = "`{\"body\": \"frozen\"}`.", body = Done),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or device.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn freeze_device(
    State(state): State<ServerState>,
    Path((project_id, device_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    devices::set_frozen(&state.app, &project_id, &device_id, true).await?;
    Ok(done("frozen"))
}

/// `POST /v5/iot/{project_id}/devices/{device_id}/unfreeze`.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/devices/{device_id}/unfreeze",
    operation_id = "UnfreezeDevice",
    tag = "devices",
    summary = "Unfreeze a device",
    params(("project_id" = String, Path, description = "The project."), ("device_id" = String, Path, description = "The device.")),
    responses(
        (status = 200, description = "`{\"body\": \"unfrozen\"}`.", body = Done),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or device.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn unfreeze_device(
    State(state): State<ServerState>,
    Path((project_id, device_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    devices::set_frozen(&state.app, &project_id, &device_id, false).await?;
    Ok(done("unfrozen"))
}

// --- device groups ----------------------------------------------------------------------------------

/// IoTDA's `AddDeviceGroup` and `UpdateDeviceGroup` body (an update changes only `name` and `description`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = DeviceGroupBody)]
pub(super) struct GroupBody {
    /// The group's name, unique in the project (required to create).
    name: Option<String>,
    /// A description.
    description: Option<String>,
    /// Not supported (child groups): must be absent or empty.
    super_group_id: Option<String>,
    /// The resource space; when given, one of the project's.
    app_id: Option<String>,
    /// Only `STATIC`.
    group_type: Option<String>,
    /// Not supported (dynamic groups): must be absent.
    dynamic_group_rule: Option<String>,
}

/// IoTDA's device group.
#[derive(Serialize, ToSchema)]
#[schema(as = DeviceGroup)]
struct GroupJson {
    /// The group's id.
    group_id: String,
    /// Its name.
    name: String,
    /// A description.
    description: String,
    /// Always null (child groups are not supported).
    super_group_id: Option<String>,
    /// `STATIC`.
    group_type: String,
    /// Never set (dynamic groups are not supported).
    #[serde(skip_serializing_if = "Option::is_none")]
    dynamic_group_rule: Option<String>,
}

impl From<device_groups::Model> for GroupJson {
    fn from(g: device_groups::Model) -> Self {
        Self {
            group_id: g.id,
            name: g.name,
            description: g.description,
            super_group_id: g.super_group_id,
            group_type: g.group_type,
            dynamic_group_rule: g.dynamic_group_rule,
        }
    }
}

/// `POST /v5/iot/{project_id}/device-group`: 201.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/device-group",
    operation_id = "AddDeviceGroup",
    tag = "device-group",
    summary = "Create a static device group",
    params(("project_id" = String, Path, description = "The project.")),
    request_body(content = GroupBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The group.", body = GroupJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
        (status = 409, description = "A group with this name exists.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn add_group(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    b: Result<Json<GroupBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = body(b)?;
    if b.super_group_id
        .as_deref()
        .is_some_and(|g| !g.trim().is_empty())
    {
        return Err(IotdaError::bad_request(
            "super_group_id: child groups are not supported",
        ));
    }
    if b.group_type
        .as_deref()
        .is_some_and(|t| !t.trim().eq_ignore_ascii_case("STATIC"))
        || b.dynamic_group_rule.is_some()
    {
        return Err(IotdaError::bad_request(
            "group_type: only STATIC groups are supported",
        ));
    }
    check_app(&state, &project_id, b.app_id.as_deref()).await?;
    let name = b.name.unwrap_or_default();
    let g = groups::create(
        &state.app,
        &project_id,
        &name,
        b.description.as_deref().unwrap_or_default(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(GroupJson::from(g))).into_response())
}

/// `ListDeviceGroups` query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct GroupQuery {
    /// Page size, 1-50 (default 10).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// Records to skip after the marker, 0-500 (default 0).
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
    /// The `page.marker` of the previous page: groups after it, by descending id.
    marker: Option<String>,
    /// Only this resource space's groups (one of the project's).
    app_id: Option<String>,
    /// Only the group with this name (paging does not apply).
    name: Option<String>,
}

/// `ListDeviceGroups`' answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ListDeviceGroupsResponse)]
struct GroupList {
    /// This page's groups.
    device_groups: Vec<GroupJson>,
    /// Paging.
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/device-group`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/device-group",
    operation_id = "ListDeviceGroups",
    tag = "device-group",
    summary = "List device groups",
    params(("project_id" = String, Path, description = "The project."), GroupQuery),
    responses(
        (status = 200, description = "A page of groups.", body = GroupList),
        (status = 400, description = "An invalid filter or paging parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list_groups(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    Query(q): Query<GroupQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, order) = paging(
        q.limit.as_deref(),
        q.offset.as_deref(),
        q.marker.as_deref(),
        36,
    )?;
    check_app(&state, &project_id, q.app_id.as_deref()).await?;
    let name = q.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
    let (items, total) = if let Some(name) = name {
        // Names are unique in a project: at most one group matches.
        let found = groups::list(&state.app, &project_id, Page::new(500, 0))
            .await?
            .items
            .into_iter()
            .map(|g| g.group)
            .filter(|g| g.name == name)
            .collect::<Vec<_>>();
        let n = found.len() as u64;
        (found, n)
    } else {
        let result = groups::list_ordered(&state.app, &project_id, &order, page).await?;
        (
            result.items.into_iter().map(|g| g.group).collect(),
            result.total,
        )
    };
    let marker = items.last().map(|g| g.id.clone());
    let device_groups: Vec<GroupJson> = items.into_iter().map(GroupJson::from).collect();
    Ok(Json(GroupList {
        device_groups,
        page: PageInfo {
            count: total,
            marker,
        },
    })
    .into_response())
}

/// `GET /v5/iot/{project_id}/device-group/{group_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/device-group/{group_id}",
    operation_id = "ShowDeviceGroup",
    tag = "device-group",
    summary = "Show a device group",
    params(("project_id" = String, Path, description = "The project."), ("group_id" = String, Path, description = "The group.")),
    responses(
        (status = 200, description = "The group.", body = GroupJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or group.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn show_group(
    State(state): State<ServerState>,
    Path((project_id, group_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let g = groups::get(&state.app, &project_id, &group_id).await?;
    Ok(Json(GroupJson::from(g)).into_response())
}

/// `PUT /v5/iot/{project_id}/device-group/{group_id}`.
#[utoipa::path(
    put,
    path = "/v5/iot/{project_id}/device-group/{group_id}",
    operation_id = "UpdateDeviceGroup",
    tag = "device-group",
    summary = "Rename a device group or change its description",
    params(("project_id" = String, Path, description = "The project."), ("group_id" = String, Path, description = "The group.")),
    request_body(content = GroupBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The group as it is now.", body = GroupJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or group.", body = IotdaErrorBody),
        (status = 409, description = "A group with this name exists.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn update_group(
    State(state): State<ServerState>,
    Path((project_id, group_id)): Path<(String, String)>,
    caller: Ext,
    b: Result<Json<GroupBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = body(b)?;
    let g = groups::update(
        &state.app,
        &project_id,
        &group_id,
        b.name.as_deref(),
        b.description.as_deref(),
    )
    .await?;
    Ok(Json(GroupJson::from(g)).into_response())
}

/// `DELETE /v5/iot/{project_id}/device-group/{group_id}`: 204.
#[utoipa::path(
    delete,
    path = "/v5/iot/{project_id}/device-group/{group_id}",
    operation_id = "DeleteDeviceGroup",
    tag = "device-group",
    summary = "Delete an empty device group",
    params(("project_id" = String, Path, description = "The project."), ("group_id" = String, Path, description = "The group.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or group.", body = IotdaErrorBody),
        (status = 409, description = "The group still has devices; remove them first.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn delete_group(
    State(state): State<ServerState>,
    Path((project_id, group_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    groups::delete(&state.app, &project_id, &group_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `CreateOrDeleteDeviceInGroup` query parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ActionQuery {
    /// `addDevice` or `removeDevice`.
    #[param(required = true)]
    action_id: Option<String>,
    /// The device to add or remove.
    #[param(required = true)]
    device_id: Option<String>,
}

/// `POST /v5/iot/{project_id}/device-group/{group_id}/action?action_id=addDevice|removeDevice&device_id=`.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/device-group/{group_id}/action",
    operation_id = "CreateOrDeleteDeviceInGroup",
    tag = "device-group",
    summary = "Add a device to a group, or remove it",
    description = "Adding a device that is already a member changes nothing.",
    params(("project_id" = String, Path, description = "The project."), ("group_id" = String, Path, description = "The group."), ActionQuery),
    responses(
        (status = 200, description = "`{\"body\": \"added\"}` or `{\"body\": \"removed\"}`.", body = Done),
        (status = 400, description = "No `device_id`, or an unknown `action_id`.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or group, no such device, or (to remove) the device is not in the group.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn group_action(
    State(state): State<ServerState>,
    Path((project_id, group_id)): Path<(String, String)>,
    caller: Ext,
    Query(q): Query<ActionQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let device_id = q
        .device_id
        .as_deref()
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| IotdaError::bad_request("device_id: required"))?;
    match q.action_id.as_deref().map(str::trim) {
        Some("addDevice") => {
            groups::add_device(&state.app, &project_id, &group_id, device_id).await?;
            Ok(done("added"))
        }
        Some("removeDevice") => {
            groups::remove_device(&state.app, &project_id, &group_id, device_id).await?;
            Ok(done("removed"))
        }
        _ => Err(IotdaError::bad_request(
            "action_id: must be addDevice or removeDevice",
        )),
    }
}

/// `ShowDevicesInGroup` query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct MembersQuery {
    /// Page size, 1-50 (default 10).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// Devices to skip, 0-500 (default 0).
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
    /// Not supported: this list pages with `offset` only, so it must be absent or empty.
    marker: Option<String>,
}

/// A group member, as IoTDA lists them (`SimplifyDevice`).
#[derive(Serialize, ToSchema)]
#[schema(as = SimplifyDevice)]
struct MemberJson {
    /// The device id.
    device_id: String,
    /// The device's own identifier.
    node_id: String,
    /// Its name.
    device_name: String,
    /// Its product.
    product_id: String,
}

/// `ShowDevicesInGroup`'s answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ShowDevicesInGroupResponse)]
struct MemberList {
    /// This page of the group's devices.
    devices: Vec<MemberJson>,
    /// Paging (`count` only).
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/device-group/{group_id}/devices`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/device-group/{group_id}/devices",
    operation_id = "ShowDevicesInGroup",
    tag = "device-group",
    summary = "List a group's devices",
    params(("project_id" = String, Path, description = "The project."), ("group_id" = String, Path, description = "The group."), MembersQuery),
    responses(
        (status = 200, description = "A page of the group's devices.", body = MemberList),
        (status = 400, description = "An invalid paging parameter, or a `marker`.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or group.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn group_devices(
    State(state): State<ServerState>,
    Path((project_id, group_id)): Path<(String, String)>,
    caller: Ext,
    Query(q): Query<MembersQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    if q.marker.as_deref().is_some_and(|m| !m.trim().is_empty()) {
        return Err(IotdaError::bad_request(
            "marker: this list pages with offset only",
        ));
    }
    let (page, _) = super::packages::paging(q.limit.as_deref(), q.offset.as_deref(), None)?;
    let result = groups::members(&state.app, &project_id, &group_id, page).await?;
    let devices = result
        .items
        .into_iter()
        .map(|d| MemberJson {
            device_id: d.id,
            node_id: d.node_id,
            device_name: d.device_name,
            product_id: d.product_id,
        })
        .collect();
    Ok(Json(MemberList {
        devices,
        page: PageInfo {
            count: result.total,
            marker: None,
        },
    })
    .into_response())
}

// --- products ---------------------------------------------------------------------------------------

/// IoTDA's `CreateProduct` and `UpdateProduct` body (an update changes what is given; not `product_id`).
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct ProductBody {
    /// The product id (on creation; generated when absent).
    product_id: Option<String>,
    /// Its name (required to create).
    name: Option<String>,
    /// The kind of device (required to create).
    device_type: Option<String>,
    /// IoTDA's protocol, e.g. `MQTT` or `CoAP` (required to create; an update cannot change it to
    /// `CoAP`).
    protocol_type: Option<String>,
    /// `json` (default) or `binary`.
    data_format: Option<String>,
    /// The product model's services (a JSON list, at most 500).
    #[schema(value_type = Option<Vec<Object>>)]
    service_capabilities: Option<Value>,
    /// The manufacturer.
    manufacturer_name: Option<String>,
    /// The industry.
    industry: Option<String>,
    /// A description.
    description: Option<String>,
    /// The resource space; when given, one of the project's.
    app_id: Option<String>,
    /// Updraft: how the product's LwM2M devices fetch firmware, `coap` (block-wise from Updraft's CoAP
    /// endpoint, the default) or `https`.
    firmware_download: Option<String>,
}

/// IoTDA's product.
#[derive(Serialize, ToSchema)]
#[schema(as = Product)]
struct ProductJson {
    /// The resource space.
    app_id: String,
    /// The resource space's name.
    app_name: String,
    /// The product id.
    product_id: String,
    /// Its name.
    name: String,
    /// The kind of device.
    device_type: String,
    /// IoTDA's protocol, e.g. `MQTT` or `CoAP`.
    protocol_type: String,
    /// `json` or `binary`.
    data_format: String,
    /// The manufacturer.
    manufacturer_name: String,
    /// The industry.
    industry: String,
    /// A description.
    description: String,
    /// The product model's services (not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    service_capabilities: Option<Value>,
    /// When it was created (`yyyyMMddTHHmmssZ`, UTC).
    create_time: String,
    /// Updraft: `coap` or `https`, how its LwM2M devices fetch firmware.
    firmware_download: String,
}

impl ProductJson {
    fn new(p: backend::storage::entity::products::Model, app_name: String, full: bool) -> Self {
        Self {
            service_capabilities: full.then(|| {
                serde_json::from_str(&p.service_capabilities).unwrap_or(Value::Array(Vec::new()))
            }),
            create_time: Timestamp::from_millis(p.created_at).to_compact(),
            firmware_download: p.firmware_download,
            app_id: p.app_id,
            app_name,
            product_id: p.id,
            name: p.name,
            device_type: p.device_type,
            protocol_type: p.protocol_type,
            data_format: p.data_format,
            manufacturer_name: p.manufacturer_name,
            industry: p.industry,
            description: p.description,
        }
    }
}

/// `POST /v5/iot/{project_id}/products`: 201.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/products",
    operation_id = "CreateProduct",
    tag = "products",
    summary = "Create a product",
    params(("project_id" = String, Path, description = "The project.")),
    request_body(content = ProductBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The product.", body = ProductJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
        (status = 409, description = "The product id is taken.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn add_product(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    b: Result<Json<ProductBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = body(b)?;
    check_app(&state, &project_id, b.app_id.as_deref()).await?;
    let p = products::create(
        &state.app,
        &project_id,
        products::NewProduct {
            product_id: b.product_id,
            name: b.name.unwrap_or_default(),
            device_type: b.device_type.unwrap_or_default(),
            protocol_type: b.protocol_type.unwrap_or_default(),
            data_format: b.data_format.unwrap_or_default(),
            manufacturer_name: b.manufacturer_name.unwrap_or_default(),
            industry: b.industry.unwrap_or_default(),
            description: b.description.unwrap_or_default(),
            service_capabilities: b.service_capabilities,
            firmware_download: b.firmware_download,
        },
    )
    .await?;
    let app = projects::default_app(&state.app, &project_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(ProductJson::new(p, app.name, true)),
    )
        .into_response())
}

/// `ListProducts` query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ProductQuery {
    /// Page size, 1-50 (default 10).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// Records to skip after the marker, 0-500 (default 0).
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
    /// The `page.marker` of the previous page: products after it, by descending id.
    marker: Option<String>,
    /// Only this resource space's products (one of the project's).
    app_id: Option<String>,
    /// Only products with this name (paging does not apply).
    product_name: Option<String>,
}

/// `ListProducts`' answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ListProductsResponse)]
struct ProductList {
    /// This page's products (without `service_capabilities`).
    products: Vec<ProductJson>,
    /// Paging.
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/products`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/products",
    operation_id = "ListProducts",
    tag = "products",
    summary = "List products",
    params(("project_id" = String, Path, description = "The project."), ProductQuery),
    responses(
        (status = 200, description = "A page of products.", body = ProductList),
        (status = 400, description = "An invalid filter or paging parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list_products(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    Query(q): Query<ProductQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, order) = paging(
        q.limit.as_deref(),
        q.offset.as_deref(),
        q.marker.as_deref(),
        36,
    )?;
    check_app(&state, &project_id, q.app_id.as_deref()).await?;
    let name = q
        .product_name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let (rows, total) = if let Some(name) = name {
        let found = products::list(&state.app, &project_id, Page::new(500, 0))
            .await?
            .items
            .into_iter()
            .filter(|p| p.product.name == name)
            .collect::<Vec<_>>();
        let n = found.len() as u64;
        (found, n)
    } else {
        let result = products::list_ordered(&state.app, &project_id, &order, page).await?;
        (result.items, result.total)
    };
    let apps = app_names(&state, &project_id).await?;
    let marker = rows.last().map(|p| p.product.id.clone());
    let products: Vec<ProductJson> = rows
        .into_iter()
        .map(|p| {
            let app = apps.get(&p.product.app_id).cloned().unwrap_or_default();
            ProductJson::new(p.product, app, false)
        })
        .collect();
    Ok(Json(ProductList {
        products,
        page: PageInfo {
            count: total,
            marker,
        },
    })
    .into_response())
}

/// `GET /v5/iot/{project_id}/products/{product_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/products/{product_id}",
    operation_id = "ShowProduct",
    tag = "products",
    summary = "Show a product",
    params(("project_id" = String, Path, description = "The project."), ("product_id" = String, Path, description = "The product.")),
    responses(
        (status = 200, description = "The product, with its services.", body = ProductJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or product.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn show_product(
    State(state): State<ServerState>,
    Path((project_id, product_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let p = products::get(&state.app, &project_id, &product_id).await?;
    let apps = app_names(&state, &project_id).await?;
    let app = apps.get(&p.app_id).cloned().unwrap_or_default();
    Ok(Json(ProductJson::new(p, app, true)).into_response())
}

/// `PUT /v5/iot/{project_id}/products/{product_id}`.
#[utoipa::path(
    put,
    path = "/v5/iot/{project_id}/products/{product_id}",
    operation_id = "UpdateProduct",
    tag = "products",
    summary = "Update a product",
    params(("project_id" = String, Path, description = "The project."), ("product_id" = String, Path, description = "The product.")),
    request_body(content = ProductBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The product as it is now.", body = ProductJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or product.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn update_product(
    State(state): State<ServerState>,
    Path((project_id, product_id)): Path<(String, String)>,
    caller: Ext,
    b: Result<Json<ProductBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = body(b)?;
    check_app(&state, &project_id, b.app_id.as_deref()).await?;
    let p = products::update(
        &state.app,
        &project_id,
        &product_id,
        products::ProductUpdate {
            name: b.name,
            device_type: b.device_type,
            protocol_type: b.protocol_type,
            data_format: b.data_format,
            manufacturer_name: b.manufacturer_name,
            industry: b.industry,
            description: b.description,
            service_capabilities: b.service_capabilities,
            firmware_download: b.firmware_download,
        },
    )
    .await?;
    let apps = app_names(&state, &project_id).await?;
    let app = apps.get(&p.app_id).cloned().unwrap_or_default();
    Ok(Json(ProductJson::new(p, app, true)).into_response())
}

/// `DELETE /v5/iot/{project_id}/products/{product_id}`: 204.
#[utoipa::path(
    delete,
    path = "/v5/iot/{project_id}/products/{product_id}",
    operation_id = "DeleteProduct",
    tag = "products",
    summary = "Delete an unused product",
    params(("project_id" = String, Path, description = "The project."), ("product_id" = String, Path, description = "The product.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or product.", body = IotdaErrorBody),
        (status = 409, description = "Devices or packages still use the product.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn delete_product(
    State(state): State<ServerState>,
    Path((project_id, product_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    products::delete(&state.app, &project_id, &product_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
