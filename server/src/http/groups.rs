//! IoTDA's device group API (`iotda-api.md` §3.6): groups and their members. Lists use IoTDA's paging
//! (see [`super::paging`]).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use backend::service::{Page, groups};
use backend::storage::entity::device_groups;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ServerState;
use super::iotda::{Done, IotdaError, IotdaErrorBody, body, done};
use super::paging::{PageInfo, id_paging};
use super::signed::{Ext, project};
use super::spaces::check_app;

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
    Ok(super::iotda::created(&g.id.clone(), GroupJson::from(g)))
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
    let (page, order) = id_paging(
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
    /// The `page.marker` of the previous page (a device id): devices after it, by descending id.
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
    /// Paging.
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
        (status = 400, description = "An invalid paging parameter.", body = IotdaErrorBody),
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
    let (page, order) = id_paging(
        q.limit.as_deref(),
        q.offset.as_deref(),
        q.marker.as_deref(),
        128,
    )?;
    let result = groups::members(&state.app, &project_id, &group_id, page, &order).await?;
    let marker = result.items.last().map(|d| d.id.clone());
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
            marker,
        },
    })
    .into_response())
}
