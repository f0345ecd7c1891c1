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

use super::ServerState;
use super::iotda::IotdaError;
use super::packages::{PageInfo, paging, project};

/// IoTDA's `TaskPolicy`.
#[derive(Debug, Default, Deserialize, Serialize)]
pub(crate) struct TaskPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_interval: Option<i64>,
}

/// IoTDA's `CreateBatchTask` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    #[serde(default)]
    app_id: Option<String>,
    task_name: String,
    task_type: String,
    #[serde(default)]
    task_mode: Option<String>,
    #[serde(default)]
    need_confirm: Option<bool>,
    #[serde(default)]
    task_ext_info: Option<Value>,
    #[serde(default)]
    targets: Option<Vec<String>>,
    #[serde(default)]
    targets_filter: Option<TargetsFilterBody>,
    #[serde(default)]
    document: Option<DocumentBody>,
    #[serde(default)]
    task_policy: Option<TaskPolicy>,
    #[serde(default)]
    document_source: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct TargetsFilterBody {
    #[serde(default)]
    group_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct DocumentBody {
    #[serde(default)]
    package_ids: Vec<String>,
    /// The older spelling of the response docstring; accepted too.
    #[serde(default)]
    package_id: Option<String>,
}

/// IoTDA's `TaskProgress` + `Task`.
#[derive(Debug, Serialize)]
pub(crate) struct TaskJson {
    task_id: String,
    task_name: String,
    task_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_mode: Option<String>,
    need_confirm: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_ext_info: Option<Value>,
    targets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    targets_filter: Option<Value>,
    document: Value,
    task_policy: TaskPolicy,
    status: String,
    status_desc: String,
    task_progress: domain::task::TaskProgress,
    create_time: String,
}

impl TaskJson {
    fn new(t: task_rows::Model, targets: Vec<String>) -> Self {
        let json = |s: Option<&str>| s.and_then(|s| serde_json::from_str::<Value>(s).ok());
        Self {
            task_progress: backend::driver::progress_of(&t),
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
        }
    }
}

/// `POST /v5/iot/{project_id}/batchtasks`.
pub(super) async fn create(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let Json(body) = body.map_err(|e| IotdaError::bad_request(e.body_text()))?;
    TaskType::parse(body.task_type.trim()).map_err(|_| {
        IotdaError::bad_request(format!(
            "task_type: {:?} is not supported; Updraft runs softwareUpgrade and firmwareUpgrade tasks",
            body.task_type
        ))
    })?;
    if body.need_confirm == Some(true) {
        return Err(IotdaError::bad_request(
            "need_confirm: tasks that wait for confirmation are not supported",
        ));
    }
    if body.task_mode.as_deref().is_some_and(|m| !m.is_empty()) {
        return Err(IotdaError::bad_request(
            "task_mode: gateway mode is not supported",
        ));
    }
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
    };
    let task = tasks::create(&state.app, &project_id, new).await?;
    let targets = targets_of(&state, &task).await?;
    Ok((StatusCode::CREATED, Json(TaskJson::new(task, targets))).into_response())
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
#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    app_id: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    marker: Option<String>,
    #[serde(default)]
    offset: Option<String>,
}

#[derive(Serialize)]
struct ListBody {
    batchtasks: Vec<TaskJson>,
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/batchtasks?task_type=...`.
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

/// `ShowBatchTask` query parameters.
#[derive(Debug, Deserialize)]
pub(super) struct ShowQuery {
    #[serde(default)]
    task_detail_status: Option<String>,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    marker: Option<String>,
    #[serde(default)]
    offset: Option<String>,
}

#[derive(Serialize)]
struct ErrorInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_msg: Option<String>,
}

/// IoTDA's `TaskDetail`, plus Updraft's `step`, `progress`, `attempts` and `source_version`.
#[derive(Serialize)]
struct DetailJson {
    target: String,
    status: String,
    output: String,
    error: ErrorInfo,
    step: String,
    progress: i32,
    attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_version: Option<String>,
}

#[derive(Serialize)]
struct ShowBody {
    batchtask: TaskJson,
    task_details: Vec<DetailJson>,
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/batchtasks/{task_id}`.
pub(super) async fn show(
    State(state): State<ServerState>,
    Path((project_id, task_id)): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
    Query(q): Query<ShowQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, _) = paging(q.limit.as_deref(), q.offset.as_deref(), None)?;
    let _ = q.marker;
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
    };
    let details = tasks::details(&state.app, &project_id, &task_id, &filter, page).await?;
    let marker = details.items.last().map(|s| s.id.to_string());
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
    let targets = targets_of(&state, &task).await?;
    Ok(Json(ShowBody {
        batchtask: TaskJson::new(task, targets),
        task_details,
        page: PageInfo {
            count: details.total,
            marker,
        },
    })
    .into_response())
}

/// `BatchTargets`: an optional body for stop and retry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TargetsBody {
    #[serde(default)]
    targets: Option<Vec<String>>,
}

#[derive(Serialize)]
struct TargetsResult {
    targets: Vec<TargetResult>,
}

/// An optional JSON body: absent or empty means `{}` (the SDK sends nothing when the caller gives none).
fn targets_body(body: &axum::body::Bytes) -> Result<TargetsBody, IotdaError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(TargetsBody::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| IotdaError::bad_request(format!("invalid JSON body: {e}")))
}

/// Which command a `POST .../{task_id}/{stop|retry}` runs.
#[derive(Clone, Copy)]
enum Command {
    Stop,
    Retry,
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
    };
    Ok(Json(TargetsResult { targets }).into_response())
}

/// `POST /v5/iot/{project_id}/batchtasks/{task_id}/stop`.
pub(super) async fn stop(
    State(state): State<ServerState>,
    Path(ids): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
    body: axum::body::Bytes,
) -> Result<Response, IotdaError> {
    command(state, ids, caller.as_deref(), &body, Command::Stop).await
}

/// `POST /v5/iot/{project_id}/batchtasks/{task_id}/retry`.
pub(super) async fn retry(
    State(state): State<ServerState>,
    Path(ids): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
    body: axum::body::Bytes,
) -> Result<Response, IotdaError> {
    command(state, ids, caller.as_deref(), &body, Command::Retry).await
}

/// `DELETE /v5/iot/{project_id}/batchtasks/{task_id}`.
pub(super) async fn delete(
    State(state): State<ServerState>,
    Path((project_id, task_id)): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    tasks::delete(&state.app, &project_id, &task_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
