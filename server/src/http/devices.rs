//! IoTDA's device API (`iotda-api.md` §3.5) over the same services as the console and the command line.
//! Lists use IoTDA's paging (see [`super::paging`]).

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use backend::service::{Page, devices, products};
use domain::Timestamp;
use http::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::ServerState;
use super::iotda::{Done, IotdaError, IotdaErrorBody, body, done};
use super::paging::{PageInfo, id_paging};
use super::signed::{Ext, project};
use super::spaces::{app_names, check_app};

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
    /// The parent's device id, which makes this a child device reached through that gateway (its
    /// upgrades go over the gateway's connection); absent: directly connected.
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
    /// The gateway a child device is reached through; the device itself when directly connected.
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
            gateway_id: b.gateway_id,
        },
    )
    .await?;
    let secret = registered.secret.expose_secret().to_owned();
    let id = registered.device.id.clone();
    let json = device_json(&state, &project_id, registered.device, Some(secret)).await?;
    Ok(super::iotda::created(&id, json))
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
    /// Only this gateway's child devices.
    gateway_id: Option<String>,
    /// With `gateway_id`: `true` for its children's children too (default `false`: one level).
    is_cascade_query: Option<String>,
    /// Only devices registered at or after this time (`yyyyMMddTHHmmssZ`, UTC).
    start_time: Option<String>,
    /// Only devices registered at or before this time (`yyyyMMddTHHmmssZ`, UTC).
    end_time: Option<String>,
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
    let (page, order) = id_paging(
        q.limit.as_deref(),
        q.offset.as_deref(),
        q.marker.as_deref(),
        128,
    )?;
    check_app(&state, &project_id, q.app_id.as_deref()).await?;
    let s = |v: &Option<String>| v.as_deref().unwrap_or_default().trim().to_owned();
    let cascade = match s(&q.is_cascade_query).to_ascii_lowercase().as_str() {
        "" | "false" => false,
        "true" => true,
        other => {
            return Err(IotdaError::bad_request(format!(
                "is_cascade_query: {other:?} is not true or false"
            )));
        }
    };
    let time = |name: &str, v: &Option<String>| {
        Some(s(v))
            .filter(|v| !v.is_empty())
            .map(|v| Timestamp::parse_compact(name, &v))
            .transpose()
            .map_err(|e| IotdaError::bad_time(e.to_string()))
    };
    let (from, until) = (
        time("start_time", &q.start_time)?,
        time("end_time", &q.end_time)?,
    );
    if let (Some(from), Some(until)) = (from, until)
        && from > until
    {
        return Err(IotdaError::start_after_end(
            "start_time must not be later than end_time",
        ));
    }
    let filter = devices::DeviceFilter {
        product_id: s(&q.product_id),
        node_id: s(&q.node_id),
        device_name: s(&q.device_name),
        gateway_id: Some(s(&q.gateway_id)).filter(|g| !g.is_empty()),
        cascade,
        registered_from: from,
        registered_until: until,
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
