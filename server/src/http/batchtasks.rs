//! `/v5/iot/{project_id}/batchtasks`: IoTDA's batch task API for `softwareUpgrade` and `firmwareUpgrade`
//! tasks (`iotda-api.md` §3.3): CreateBatchTask, ListBatchTasks, ShowBatchTask (with its task details),
//! StopBatchTask, RetryBatchTask and DeleteBatchTask.

use super::signed::Caller;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use backend::service::tasks::{self, DetailFilter, NewTask, TargetResult, TaskFilter};
use backend::storage::entity::{subtasks, tasks as task_rows};
use domain::Timestamp;
use domain::task::{SubtaskStatus, TaskStatus, TaskType};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::ServerState;
use super::iotda::{IotdaError, IotdaErrorBody};
use super::paging::{PageInfo, paging};
use super::signed::project;

/// IoTDA's `TaskPolicy`.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
pub(crate) struct TaskPolicy {
    /// When to start (`yyyyMMddTHHmmssZ`, UTC); absent: at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule_time: Option<String>,
    /// Extra attempts for a device that failed, 0-5 (with `retry_interval`; absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_count: Option<i64>,
    /// Minutes before each extra attempt, 1-1440 (with `retry_count`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_interval: Option<i64>,
}

/// IoTDA's `CreateBatchTask` body.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = CreateBatchTask)]
pub(crate) struct CreateBody {
    /// The resource space; when given, the project's default one.
    #[serde(default)]
    app_id: Option<String>,
    /// The task's name: at most 128 letters, digits, `_` or CJK characters.
    task_name: String,
    /// `softwareUpgrade` or `firmwareUpgrade`.
    task_type: String,
    /// `GATEWAY`: each child device upgraded through its gateway is told `task_id` and
    /// `sub_device_count` (how many of the gateway's children the task upgrades).
    #[serde(default)]
    task_mode: Option<String>,
    /// `true`: every device waits (`Waitting`) until ConfirmBatchTask lets it start.
    #[serde(default)]
    need_confirm: Option<bool>,
    /// Free-form data kept with the task (at most 512 characters as JSON).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    task_ext_info: Option<Value>,
    /// The devices to upgrade (or `targets_filter`).
    #[serde(default)]
    targets: Option<Vec<String>>,
    /// The groups whose devices to upgrade, resolved when the task starts (or `targets`).
    #[serde(default)]
    targets_filter: Option<TargetsFilterBody>,
    /// The package to upgrade to (required).
    #[serde(default)]
    document: Option<DocumentBody>,
    /// Schedule and retries.
    #[serde(default)]
    task_policy: Option<TaskPolicy>,
    /// Not supported (task files): must be absent.
    #[serde(default)]
    document_source: Option<String>,
    /// Updraft extension: waves, error thresholds, pacing and maintenance windows (README, "Safe
    /// rollouts"). Absent: every target starts at once, as IoTDA does.
    #[serde(default)]
    #[schema(value_type = Option<Object>, example = json!({
        "waves": [{"percent": 1}, {"percent": 10, "success_threshold": 95, "soak_minutes": 60}, {"percent": 50}],
        "error_threshold": {"max_failure_percent": 5, "min_finished": 20, "count": ["device_failure", "timeout"]},
        "max_per_minute": 100, "max_in_flight": 500,
        "maintenance_windows": [{"days": ["Mon", "Tue", "Wed", "Thu", "Fri"], "start": "22:00", "end": "04:00", "time_zone": "Europe/Berlin"}]
    }))]
    rollout: Option<Value>,
}

/// `targets_filter`: the groups whose devices a task upgrades.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = TargetsFilter)]
pub(crate) struct TargetsFilterBody {
    /// Device group ids.
    #[serde(default)]
    group_ids: Vec<String>,
}

/// `document`: the package an upgrade task installs.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = UpgradeDocument)]
pub(crate) struct DocumentBody {
    /// Exactly one package id.
    #[serde(default)]
    package_ids: Vec<String>,
    /// The older spelling of the response docstring; accepted too.
    #[serde(default)]
    package_id: Option<String>,
}

/// IoTDA's `task_progress`: subtask counts by status.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = TaskProgress)]
pub(crate) struct TaskProgressJson {
    /// All subtasks.
    total: u64,
    /// Running.
    processing: u64,
    /// Succeeded.
    success: u64,
    /// Failed.
    fail: u64,
    /// Waiting (IoTDA's spelling).
    waitting: u64,
    /// Failed, retry due.
    fail_wait_retry: u64,
    /// Stopped.
    stopped: u64,
    /// Removed.
    removed: u64,
}

impl From<domain::task::TaskProgress> for TaskProgressJson {
    fn from(p: domain::task::TaskProgress) -> Self {
        Self {
            total: p.total,
            processing: p.processing,
            success: p.success,
            fail: p.fail,
            waitting: p.waitting,
            fail_wait_retry: p.fail_wait_retry,
            stopped: p.stopped,
            removed: p.removed,
        }
    }
}

/// IoTDA's `Task` with its `TaskProgress`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Task)]
pub(crate) struct TaskJson {
    /// The task's id.
    task_id: String,
    /// Its name.
    task_name: String,
    /// `softwareUpgrade` or `firmwareUpgrade`.
    task_type: String,
    /// `GATEWAY`, when given at creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    task_mode: Option<String>,
    /// Whether its devices wait for ConfirmBatchTask.
    need_confirm: bool,
    /// The free-form data given at creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    task_ext_info: Option<Value>,
    /// The devices named at creation (empty for a group task).
    targets: Vec<String>,
    /// The groups given at creation (`{"group_ids": [...]}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    targets_filter: Option<Value>,
    /// The package (`{"package_ids": [...]}`).
    #[schema(value_type = Object)]
    document: Value,
    /// Schedule and retries.
    task_policy: TaskPolicy,
    /// `Initializing`, `Waitting`, `Processing`, `Success`, `Fail`, `PartialSuccess`, `Stopping` or
    /// `Stopped`.
    status: String,
    /// Why the task has its status.
    status_desc: String,
    /// Subtask counts by status.
    task_progress: TaskProgressJson,
    /// When it was created (`yyyyMMddTHHmmssZ`, UTC).
    create_time: String,
    /// Updraft extension, only for a task created with a `rollout`: the policy (completed with its last
    /// wave and seed), `state` (`wave`: the latest wave allowed to start, 0-based; `paused`: `reason` and
    /// `at` while paused; `resumed_at`) and `waves` (per wave: `total`, `pending`, `in_flight`,
    /// `succeeded`, `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    rollout: Option<backend::driver::RolloutView>,
}

impl TaskJson {
    fn new(t: task_rows::Model, targets: Vec<String>) -> Self {
        let json = |s: Option<&str>| s.and_then(|s| serde_json::from_str::<Value>(s).ok());
        Self {
            task_progress: t.progress().into(),
            task_ext_info: json(t.task_ext_info.as_deref()),
            targets_filter: json(t.targets_filter.as_deref()),
            document: json(Some(&t.document)).unwrap_or(Value::Null),
            task_policy: TaskPolicy {
                schedule_time: t
                    .schedule_time
                    .map(|s| Timestamp::from_millis(s).to_compact()),
                retry_count: (t.retry_count > 0).then_some(i64::from(t.retry_count)),
                retry_interval: (t.retry_count > 0).then_some(i64::from(t.retry_interval_min)),
            },
            create_time: Timestamp::from_millis(t.created_at).to_compact(),
            task_id: t.id,
            task_name: t.task_name,
            task_type: t.task_type,
            task_mode: t.task_mode,
            need_confirm: t.need_confirm,
            targets,
            status: t.status,
            status_desc: t.status_desc,
            rollout: None,
        }
    }

    /// A whole task as the API shows it after a change or on its own: its named targets, and its rollout
    /// when it has one.
    async fn read(state: &ServerState, task: task_rows::Model) -> Result<Self, IotdaError> {
        let targets = targets_of(state, &task).await?;
        let rollout = state.app.driver.rollout_view(&state.app, &task).await?;
        Ok(Self {
            rollout,
            ..Self::new(task, targets)
        })
    }
}

/// `POST /v5/iot/{project_id}/batchtasks`.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/batchtasks",
    operation_id = "CreateBatchTask",
    tag = "batchtasks",
    summary = "Create an upgrade task",
    description = "A `softwareUpgrade` or `firmwareUpgrade` task for `targets` (device ids) or \
                   `targets_filter.group_ids`, installing `document.package_ids[0]`; it starts at once \
                   unless `task_policy.schedule_time` is given.",
    params(("project_id" = String, Path, description = "The project.")),
    request_body(content = CreateBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The task.", body = TaskJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project, package or group.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn create(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    headers: http::HeaderMap,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let Json(body) = body.map_err(IotdaError::from)?;
    TaskType::parse(body.task_type.trim()).map_err(|_| {
        IotdaError::bad_request(format!(
            "task_type: {:?} is not supported; Updraft runs softwareUpgrade and firmwareUpgrade tasks",
            body.task_type
        ))
    })?;
    let gateway_mode = match body.task_mode.as_deref().map(str::trim) {
        None | Some("") => false,
        Some("GATEWAY") => true,
        Some(other) => {
            return Err(IotdaError::bad_request(format!(
                "task_mode: {other:?} is not supported; give GATEWAY or nothing"
            )));
        }
    };
    if body.document_source.is_some() {
        return Err(IotdaError::bad_request(
            "document_source: upgrade tasks take targets or targets_filter",
        ));
    }
    let document = body
        .document
        .ok_or_else(|| IotdaError::bad_request("document.package_ids is required"))?;
    let mut package_ids = document.package_ids;
    package_ids.extend(document.package_id);
    if package_ids.len() != 1 {
        return Err(IotdaError::bad_request(
            "document.package_ids must name exactly one package",
        ));
    }
    let policy = body.task_policy.unwrap_or_default();
    let schedule_time = policy
        .schedule_time
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| Timestamp::parse_compact("task_policy.schedule_time", s))
        .transpose()
        .map_err(|e| IotdaError::bad_request(e.to_string()))?;
    if let Some(app) = body.app_id.as_deref().filter(|a| !a.trim().is_empty()) {
        let default = backend::service::projects::default_app(&state.app, &project_id).await?;
        if app != default.id {
            return Err(IotdaError::bad_request(format!(
                "app_id: unknown resource space {app}"
            )));
        }
    }
    let new = NewTask {
        task_name: body.task_name,
        task_type: body.task_type,
        package_id: package_ids.remove(0),
        targets: body.targets.unwrap_or_default(),
        group_ids: body.targets_filter.map(|f| f.group_ids).unwrap_or_default(),
        schedule_time,
        retry_count: policy.retry_count,
        retry_interval: policy.retry_interval,
        task_ext_info: body.task_ext_info,
        request_id: super::request_id(&headers),
        rollout: body
            .rollout
            .map(|r| {
                serde_json::from_value(r)
                    .map_err(|e| IotdaError::bad_request(format!("rollout: {e}")))
            })
            .transpose()?,
        need_confirm: body.need_confirm.unwrap_or(false),
        gateway_mode,
    };
    let task = tasks::create(&state.app, &project_id, new).await?;
    let id = task.id.clone();
    Ok(super::iotda::created(
        &id,
        TaskJson::read(&state, task).await?,
    ))
}

/// The task's device list as IoTDA echoes it (`targets`): the devices named at creation, empty for a
/// group task (its `targets_filter` says which groups).
async fn targets_of(
    state: &ServerState,
    task: &task_rows::Model,
) -> Result<Vec<String>, IotdaError> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
    if task.targets_filter.is_some() {
        return Ok(Vec::new());
    }
    Ok(subtasks::Entity::find()
        .select_only()
        .column(subtasks::Column::DeviceId)
        .filter(subtasks::Column::TaskId.eq(task.id.as_str()))
        .order_by_asc(subtasks::Column::Id)
        .limit(30_000)
        .into_tuple::<String>()
        .all(&state.app.db)
        .await
        .map_err(backend::Error::from)?)
}

/// `ListBatchTasks` query parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Required: `softwareUpgrade` or `firmwareUpgrade`.
    #[serde(default)]
    #[param(required = true)]
    task_type: Option<String>,
    /// Only tasks with this status (`Initializing`, `Waitting`, `Processing`, `Success`, `Fail`,
    /// `PartialSuccess`, `Stopping`, `Stopped`).
    #[serde(default)]
    status: Option<String>,
    /// Accepted for compatibility; ignored (a project has one resource space).
    #[serde(default)]
    app_id: Option<String>,
    /// Page size, 1-50 (default 10).
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// The `page.marker` of the previous page (24 hex digits): records after it, by descending id.
    #[serde(default)]
    #[param(pattern = "^[0-9a-fA-F]{24}$")]
    marker: Option<String>,
    /// Records to skip after the marker, 0-500 (default 0).
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
}

/// `ListBatchTasks`' answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ListBatchTasksResponse)]
struct ListBody {
    /// This page's tasks, newest first.
    batchtasks: Vec<TaskJson>,
    /// Paging.
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/batchtasks?task_type=...`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/batchtasks",
    operation_id = "ListBatchTasks",
    tag = "batchtasks",
    summary = "List tasks of a type",
    params(("project_id" = String, Path, description = "The project."), ListQuery),
    responses(
        (status = 200, description = "A page of tasks.", body = ListBody),
        (status = 400, description = "No or an unknown `task_type`, or an invalid filter or paging parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, marker) = paging(q.limit.as_deref(), q.offset.as_deref(), q.marker.as_deref())?;
    let task_type = q
        .task_type
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| IotdaError::bad_request("task_type is required"))?;
    let task_type =
        TaskType::parse(task_type).map_err(|e| IotdaError::bad_request(e.to_string()))?;
    let status = q
        .status
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(TaskStatus::parse)
        .transpose()
        .map_err(|e| IotdaError::bad_request(e.to_string()))?;
    let _ = q.app_id;
    let filter = TaskFilter {
        task_type: Some(task_type),
        status,
        marker,
    };
    let result = tasks::list(&state.app, &project_id, &filter, page).await?;
    let marker = result.items.last().map(|t| t.id.clone());
    let mut batchtasks = Vec::with_capacity(result.items.len());
    for t in result.items {
        let targets = targets_of(&state, &t).await?;
        batchtasks.push(TaskJson::new(t, targets));
    }
    Ok(Json(ListBody {
        batchtasks,
        page: PageInfo {
            count: result.total,
            marker,
        },
    })
    .into_response())
}

/// `ShowBatchTask` query parameters: which of the task's devices to show.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ShowQuery {
    /// Only devices with this status (`Waitting`, `Processing`, `Success`, `Fail`, `FailWaitRetry`,
    /// `Stopped`, `Removed`).
    #[serde(default)]
    task_detail_status: Option<String>,
    /// Only this device.
    #[serde(default)]
    target: Option<String>,
    /// Page size, 1-50 (default 10).
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// The `page.marker` of the previous page (24 hex digits): devices after it, newest subtask first.
    #[serde(default)]
    #[param(pattern = "^[0-9a-fA-F]{24}$")]
    marker: Option<String>,
    /// Devices to skip, 0-500 (default 0).
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
}

/// Why a device's upgrade failed.
#[derive(Serialize, ToSchema)]
#[schema(as = TaskDetailError)]
struct ErrorInfo {
    /// A code for the failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<String>,
    /// The failure in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    error_msg: Option<String>,
}

/// IoTDA's `TaskDetail`, plus Updraft's `step`, `progress`, `attempts` and `source_version`.
#[derive(Serialize, ToSchema)]
#[schema(as = TaskDetail)]
struct DetailJson {
    /// The device id.
    target: String,
    /// `Waitting`, `Processing`, `Success`, `Fail`, `FailWaitRetry`, `Stopped` or `Removed`.
    status: String,
    /// What the device reported.
    output: String,
    /// Why it failed (empty unless it did).
    error: ErrorInfo,
    /// Where the upgrade is: `unconfirmed` (waiting for ConfirmBatchTask), `pending`, `wait_online`,
    /// `version_query`, `upgrading`, `retry_wait` or
    /// `done` (Updraft's).
    step: String,
    /// Upgrade progress in percent, as the device reports it (Updraft's).
    progress: i32,
    /// Attempts so far (Updraft's).
    attempts: i32,
    /// The version the device reported when asked, before upgrading (Updraft's).
    #[serde(skip_serializing_if = "Option::is_none")]
    source_version: Option<String>,
}

/// `ShowBatchTask`'s answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ShowBatchTaskResponse)]
struct ShowBody {
    /// The task.
    batchtask: TaskJson,
    /// This page of its devices.
    task_details: Vec<DetailJson>,
    /// Paging over the devices.
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/batchtasks/{task_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/batchtasks/{task_id}",
    operation_id = "ShowBatchTask",
    tag = "batchtasks",
    summary = "Show a task and a page of its devices",
    params(
        ("project_id" = String, Path, description = "The project."),
        ("task_id" = String, Path, description = "The task."),
        ShowQuery,
    ),
    responses(
        (status = 200, description = "The task and a page of its devices' details.", body = ShowBody),
        (status = 400, description = "An invalid filter or paging parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or task.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn show(
    State(state): State<ServerState>,
    Path((project_id, task_id)): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
    Query(q): Query<ShowQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, marker) = paging(q.limit.as_deref(), q.offset.as_deref(), q.marker.as_deref())?;
    let status = q
        .task_detail_status
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(SubtaskStatus::parse)
        .transpose()
        .map_err(|e| IotdaError::bad_request(e.to_string()))?;
    let task = tasks::get(&state.app, &project_id, &task_id).await?;
    let filter = DetailFilter {
        status,
        target: q.target.filter(|t| !t.trim().is_empty()),
        descending_after: Some(marker.as_deref().and_then(detail_marker)),
    };
    let details = tasks::details(&state.app, &project_id, &task_id, &filter, page).await?;
    let marker = details.items.last().map(|s| format!("{:024x}", s.id));
    let task_details = details
        .items
        .into_iter()
        .map(|s| DetailJson {
            output: s.output.unwrap_or_default(),
            error: ErrorInfo {
                error_code: s.error_code,
                error_msg: s.error_msg,
            },
            target: s.device_id,
            status: s.status,
            step: s.step,
            progress: s.progress,
            attempts: s.attempts,
            source_version: s.source_version,
        })
        .collect();
    let batchtask = TaskJson::read(&state, task).await?;
    Ok(Json(ShowBody {
        batchtask,
        task_details,
        page: PageInfo {
            count: details.total,
            marker,
        },
    })
    .into_response())
}

/// A task-detail marker (24 hex digits, as IoTDA's ids) as the subtask row id it names; IoTDA's
/// default marker (all `f`) and anything past the largest id mean "from the newest".
fn detail_marker(marker: &str) -> Option<i64> {
    u128::from_str_radix(marker, 16)
        .ok()
        .and_then(|m| i64::try_from(m).ok())
}

/// `BatchTargets`: an optional body for stop, retry and confirm.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = BatchTargets)]
pub(super) struct TargetsBody {
    /// Only these devices (at most 100); absent or empty: all of the task's devices.
    #[serde(default)]
    targets: Option<Vec<String>>,
}

/// IoTDA's `BatchTargetResult`: the outcome of a stop or retry for one device.
#[derive(Serialize, ToSchema)]
#[schema(as = BatchTargetResult)]
struct TargetResultJson {
    /// The device id.
    target: String,
    /// `success` or `failure`.
    status: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<String>,
    /// Why it failed, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    error_msg: Option<String>,
}

impl From<TargetResult> for TargetResultJson {
    fn from(r: TargetResult) -> Self {
        Self {
            target: r.target,
            status: r.status,
            error_code: r.error_code,
            error_msg: r.error_msg,
        }
    }
}

/// The answer of a stop or retry.
#[derive(Serialize, ToSchema)]
#[schema(as = BatchTargetsResponse)]
struct TargetsResult {
    /// One outcome per device.
    targets: Vec<TargetResultJson>,
}

/// An optional JSON body: absent or empty means `{}` (the SDK sends nothing when the caller gives none).
/// Fields besides `targets` are ignored, but a body with fields and no `targets` is refused: a
/// misspelt key (`target`, `device_ids`) would otherwise mean every device of the task.
fn targets_body(body: &axum::body::Bytes) -> Result<TargetsBody, IotdaError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(TargetsBody::default());
    }
    let value: Value = serde_json::from_slice(body).map_err(IotdaError::json)?;
    if let Some(fields) = value.as_object()
        && !fields.is_empty()
        && !fields.contains_key("targets")
    {
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        return Err(IotdaError::bad_request(format!(
            "targets: missing (the body has {}); send {{}} or no body for every device",
            names.join(", ")
        )));
    }
    serde_json::from_value(value).map_err(IotdaError::json)
}

/// Which command a `POST .../{task_id}/{stop|retry|confirm}` runs.
#[derive(Clone, Copy)]
enum Command {
    Stop,
    Retry,
    Confirm,
}

async fn command(
    state: ServerState,
    (project_id, task_id): (String, String),
    caller: Option<&Caller>,
    body: &axum::body::Bytes,
    command: Command,
) -> Result<Response, IotdaError> {
    let project_id = project(caller, &project_id)?;
    let targets = targets_body(body)?.targets;
    let (app, targets) = (&state.app, targets.as_deref());
    let targets = match command {
        Command::Stop => tasks::stop(app, &project_id, &task_id, targets).await?,
        Command::Retry => tasks::retry(app, &project_id, &task_id, targets).await?,
        Command::Confirm => tasks::confirm(app, &project_id, &task_id, targets).await?,
    };
    let targets = targets.into_iter().map(TargetResultJson::from).collect();
    Ok(Json(TargetsResult { targets }).into_response())
}

/// `POST /v5/iot/{project_id}/batchtasks/{task_id}/resume` (Updraft extension).
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/batchtasks/{task_id}/resume",
    operation_id = "ResumeBatchTask",
    tag = "batchtasks",
    summary = "Resume a task its rollout paused (Updraft extension)",
    description = "Failures before the resume stop counting towards the rollout's error thresholds; a wave \
                   that finished below its success threshold is accepted and the next one starts; devices \
                   start again as the rollout's waves, pacing and windows allow.",
    params(
        ("project_id" = String, Path, description = "The project."),
        ("task_id" = String, Path, description = "The task."),
    ),
    responses(
        (status = 200, description = "The task, `Processing` again, with its rollout.", body = TaskJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or task.", body = IotdaErrorBody),
        (status = 409, description = "The task is not `Paused`.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn resume(
    State(state): State<ServerState>,
    Path((project_id, task_id)): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let task = tasks::resume(&state.app, &project_id, &task_id).await?;
    Ok(Json(TaskJson::read(&state, task).await?).into_response())
}

/// `POST /v5/iot/{project_id}/batchtasks/{task_id}/stop`.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/batchtasks/{task_id}/stop",
    operation_id = "StopBatchTask",
    tag = "batchtasks",
    summary = "Stop a task, or some of its devices",
    params(
        ("project_id" = String, Path, description = "The project."),
        ("task_id" = String, Path, description = "The task."),
    ),
    request_body(
        content = Option<TargetsBody>,
        content_type = "application/json",
        description = "Optional: without a body (or `targets`) the whole task stops.",
    ),
    responses(
        (status = 200, description = "One outcome per device.", body = TargetsResult),
        (status = 400, description = "An invalid body (more than 100 targets).", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or task.", body = IotdaErrorBody),
        (status = 409, description = "The task has completed or is stopping.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn stop(
    State(state): State<ServerState>,
    Path(ids): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
    body: axum::body::Bytes,
) -> Result<Response, IotdaError> {
    command(state, ids, caller.as_deref(), &body, Command::Stop).await
}

/// `POST /v5/iot/{project_id}/batchtasks/{task_id}/retry`.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/batchtasks/{task_id}/retry",
    operation_id = "RetryBatchTask",
    tag = "batchtasks",
    summary = "Retry a task's failed or stopped devices, or some of them",
    params(
        ("project_id" = String, Path, description = "The project."),
        ("task_id" = String, Path, description = "The task."),
    ),
    request_body(
        content = Option<TargetsBody>,
        content_type = "application/json",
        description = "Optional: without a body (or `targets`) every failed, retry-waiting or stopped device is retried.",
    ),
    responses(
        (status = 200, description = "One outcome per device.", body = TargetsResult),
        (status = 400, description = "An invalid body (more than 100 targets).", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or task.", body = IotdaErrorBody),
        (status = 409, description = "The task is `Success`, `Stopped`, `Stopping`, `Waitting` or `Initializing`, or its package was deleted.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn retry(
    State(state): State<ServerState>,
    Path(ids): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
    body: axum::body::Bytes,
) -> Result<Response, IotdaError> {
    command(state, ids, caller.as_deref(), &body, Command::Retry).await
}

/// `POST /v5/iot/{project_id}/batchtasks/{task_id}/confirm`.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/batchtasks/{task_id}/confirm",
    operation_id = "ConfirmBatchTask",
    tag = "batchtasks",
    summary = "Let a need_confirm task's devices start, or some of them",
    description = "A task created with `need_confirm: true` keeps every device `Waitting` (step \
                   `unconfirmed`) until this call; confirmed devices start as any task's do.",
    params(
        ("project_id" = String, Path, description = "The project."),
        ("task_id" = String, Path, description = "The task."),
    ),
    request_body(
        content = Option<TargetsBody>,
        content_type = "application/json",
        description = "Optional: without a body (or `targets`) every device waiting for confirmation is confirmed.",
    ),
    responses(
        (status = 200, description = "One outcome per named device (none without `targets`).", body = TargetsResult),
        (status = 400, description = "An invalid body (more than 100 targets).", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or task.", body = IotdaErrorBody),
        (status = 409, description = "The task has completed, is stopping, or has not started (scheduled).", body = IotdaErrorBody),
    ),
)]
pub(super) async fn confirm(
    State(state): State<ServerState>,
    Path(ids): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
    body: axum::body::Bytes,
) -> Result<Response, IotdaError> {
    command(state, ids, caller.as_deref(), &body, Command::Confirm).await
}

/// `DELETE /v5/iot/{project_id}/batchtasks/{task_id}`.
#[utoipa::path(
    delete,
    path = "/v5/iot/{project_id}/batchtasks/{task_id}",
    operation_id = "DeleteBatchTask",
    tag = "batchtasks",
    summary = "Delete a completed task",
    params(
        ("project_id" = String, Path, description = "The project."),
        ("task_id" = String, Path, description = "The task."),
    ),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or task.", body = IotdaErrorBody),
        (status = 409, description = "The task is still executing.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn delete(
    State(state): State<ServerState>,
    Path((project_id, task_id)): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    tasks::delete(&state.app, &project_id, &task_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
