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

use super::ServerState;
use super::iotda::IotdaError;
use super::packages::project;
use super::signed::Caller;

type Ext = Option<axum::Extension<Caller>>;

/// IoTDA's default `marker`: start from the newest record.
const DEFAULT_MARKER: &str = "ffffffffffffffffffffffff";

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, IotdaError> {
    b.map(|Json(v)| v)
        .map_err(|e| IotdaError::bad_request(e.body_text()))
}

/// IoTDA paging for ids that are not 24 hex digits: `limit` 1-50, `offset` 0-500, `marker` an id.
fn paging(q: &ListParams, max_marker: usize) -> Result<(Page, ListOrder), IotdaError> {
    let (page, _) = super::packages::paging(q.limit.as_deref(), q.offset.as_deref(), None)?;
    // IoTDA's documented default marker means "from the start".
    let marker = match q
        .marker
        .as_deref()
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

/// The query parameters every list shares, plus each list's filters.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ListParams {
    limit: Option<String>,
    offset: Option<String>,
    marker: Option<String>,
    app_id: Option<String>,
    product_id: Option<String>,
    node_id: Option<String>,
    device_name: Option<String>,
    gateway_id: Option<String>,
    name: Option<String>,
    product_name: Option<String>,
}

/// IoTDA's `page`.
#[derive(Serialize)]
struct PageJson {
    count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    marker: Option<String>,
}

/// `{ "body": "..." }`, what IoTDA's delete and membership operations answer.
fn done(message: &str) -> Response {
    Json(serde_json::json!({ "body": message })).into_response()
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

#[derive(Debug, Default, Deserialize)]
pub(super) struct AuthInfoBody {
    auth_type: Option<String>,
    secret: Option<String>,
    fingerprint: Option<String>,
    secure_access: Option<bool>,
    timeout: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(super) struct AddDeviceBody {
    device_id: Option<String>,
    #[serde(default)]
    node_id: String,
    #[serde(default)]
    device_name: String,
    #[serde(default)]
    product_id: String,
    auth_info: Option<AuthInfoBody>,
    #[serde(default)]
    description: String,
    gateway_id: Option<String>,
    app_id: Option<String>,
    extension_info: Option<Value>,
    shadow: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct UpdateDeviceBody {
    device_name: Option<String>,
    description: Option<String>,
    extension_info: Option<Value>,
    auth_info: Option<AuthInfoBody>,
}

#[derive(Serialize)]
struct AuthInfoJson {
    auth_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
    secure_access: bool,
    timeout: i64,
}

/// IoTDA's device object (`auth_info`, times and `extension_info` only in full views).
#[derive(Serialize)]
struct DeviceJson {
    app_id: String,
    app_name: String,
    device_id: String,
    node_id: String,
    gateway_id: String,
    device_name: String,
    node_type: String,
    description: String,
    fw_version: Option<String>,
    sw_version: Option<String>,
    device_sdk_version: Option<String>,
    product_id: String,
    product_name: String,
    status: String,
    tags: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_info: Option<AuthInfoJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    create_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_status_update_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    active_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extension_info: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
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

/// `GET /v5/iot/{project_id}/devices`.
pub(super) async fn list_devices(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    Query(q): Query<ListParams>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, order) = paging(&q, 128)?;
    check_app(&state, &project_id, q.app_id.as_deref()).await?;
    let s = |v: &Option<String>| v.as_deref().unwrap_or_default().trim().to_owned();
    if !s(&q.gateway_id).is_empty() {
        // Every Updraft device is directly connected: no device has children.
        return Ok(Json(serde_json::json!({
            "devices": [],
            "page": PageJson { count: 0, marker: None },
        }))
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
    Ok(Json(serde_json::json!({
        "devices": devices,
        "page": PageJson { count: result.total, marker },
    }))
    .into_response())
}

/// `GET /v5/iot/{project_id}/devices/{device_id}`.
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

#[derive(Debug, Default, Deserialize)]
pub(super) struct GroupBody {
    name: Option<String>,
    description: Option<String>,
    super_group_id: Option<String>,
    app_id: Option<String>,
    group_type: Option<String>,
    dynamic_group_rule: Option<String>,
}

#[derive(Serialize)]
struct GroupJson {
    group_id: String,
    name: String,
    description: String,
    super_group_id: Option<String>,
    group_type: String,
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

/// `GET /v5/iot/{project_id}/device-group`.
pub(super) async fn list_groups(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    Query(q): Query<ListParams>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, order) = paging(&q, 36)?;
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
    let groups: Vec<GroupJson> = items.into_iter().map(GroupJson::from).collect();
    Ok(Json(serde_json::json!({
        "device_groups": groups,
        "page": PageJson { count: total, marker },
    }))
    .into_response())
}

/// `GET /v5/iot/{project_id}/device-group/{group_id}`.
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
pub(super) async fn delete_group(
    State(state): State<ServerState>,
    Path((project_id, group_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    groups::delete(&state.app, &project_id, &group_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct ActionQuery {
    action_id: Option<String>,
    device_id: Option<String>,
}

/// `POST /v5/iot/{project_id}/device-group/{group_id}/action?action_id=addDevice|removeDevice&device_id=`.
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

/// `GET /v5/iot/{project_id}/device-group/{group_id}/devices`.
pub(super) async fn group_devices(
    State(state): State<ServerState>,
    Path((project_id, group_id)): Path<(String, String)>,
    caller: Ext,
    Query(q): Query<ListParams>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    if q.marker.as_deref().is_some_and(|m| !m.trim().is_empty()) {
        return Err(IotdaError::bad_request(
            "marker: this list pages with offset only",
        ));
    }
    let (page, _) = super::packages::paging(q.limit.as_deref(), q.offset.as_deref(), None)?;
    let result = groups::members(&state.app, &project_id, &group_id, page).await?;
    let devices: Vec<Value> = result
        .items
        .into_iter()
        .map(|d| {
            serde_json::json!({"device_id": d.id, "node_id": d.node_id,
                               "device_name": d.device_name, "product_id": d.product_id})
        })
        .collect();
    Ok(Json(serde_json::json!({
        "devices": devices,
        "page": PageJson { count: result.total, marker: None },
    }))
    .into_response())
}

// --- products ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub(super) struct ProductBody {
    product_id: Option<String>,
    name: Option<String>,
    device_type: Option<String>,
    protocol_type: Option<String>,
    data_format: Option<String>,
    service_capabilities: Option<Value>,
    manufacturer_name: Option<String>,
    industry: Option<String>,
    description: Option<String>,
    app_id: Option<String>,
}

#[derive(Serialize)]
struct ProductJson {
    app_id: String,
    app_name: String,
    product_id: String,
    name: String,
    device_type: String,
    protocol_type: String,
    data_format: String,
    manufacturer_name: String,
    industry: String,
    description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_capabilities: Option<Value>,
    create_time: String,
}

impl ProductJson {
    fn new(p: backend::storage::entity::products::Model, app_name: String, full: bool) -> Self {
        Self {
            service_capabilities: full.then(|| {
                serde_json::from_str(&p.service_capabilities).unwrap_or(Value::Array(Vec::new()))
            }),
            create_time: Timestamp::from_millis(p.created_at).to_compact(),
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

/// `GET /v5/iot/{project_id}/products`.
pub(super) async fn list_products(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    Query(q): Query<ListParams>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, order) = paging(&q, 36)?;
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
    Ok(Json(serde_json::json!({
        "products": products,
        "page": PageJson { count: total, marker },
    }))
    .into_response())
}

/// `GET /v5/iot/{project_id}/products/{product_id}`.
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
        },
    )
    .await?;
    let apps = app_names(&state, &project_id).await?;
    let app = apps.get(&p.app_id).cloned().unwrap_or_default();
    Ok(Json(ProductJson::new(p, app, true)).into_response())
}

/// `DELETE /v5/iot/{project_id}/products/{product_id}`: 204.
pub(super) async fn delete_product(
    State(state): State<ServerState>,
    Path((project_id, product_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    products::delete(&state.app, &project_id, &product_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
