//! Software/Firmware Upgrades: packages (list, detail, delete; uploads go to the packages API with a
//! progress bar, see `crate::browser`) and tasks (create, list, detail with per-device rows and step
//! history, stop, retry, delete).

// `create_task` takes the create form's fields one by one (the browser posts them URL-encoded); the
// `#[server]` macro generates the client-side twin without an item-level allow, so it is allowed here.
#![allow(clippy::too_many_arguments)]

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use super::PageOf;
use crate::error::ApiError;

/// A package row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRow {
    /// Package id.
    pub package_id: String,
    /// `softwarePackage` or `firmwarePackage`.
    pub package_type: String,
    /// Product id.
    pub product_id: String,
    /// The product's name.
    pub product_name: String,
    /// Version.
    pub version: String,
    /// File name.
    pub file_name: String,
    /// Size in bytes.
    pub size: i64,
    /// Upload time.
    pub created: String,
}

/// Everything the package page shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageView {
    /// The list's columns.
    pub row: PackageRow,
    /// SHA-256, hex.
    pub sha256: String,
    /// Versions it upgrades from (empty: any).
    pub support_source_versions: Vec<String>,
    /// Description.
    pub description: String,
    /// Free text for devices.
    pub custom_info: String,
    /// PCP segment size (LwM2M).
    pub segment_size: i32,
    /// `upload` or `bucket`.
    pub source: String,
    /// Tasks using it, newest first.
    pub tasks: Vec<TaskRow>,
}

/// A task row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRow {
    /// Task id.
    pub task_id: String,
    /// Name.
    pub task_name: String,
    /// `softwareUpgrade` or `firmwareUpgrade`.
    pub task_type: String,
    /// IoTDA status (`Processing`, `Success`...).
    pub status: String,
    /// Why it is in that status, when there is something to say.
    pub status_desc: String,
    /// Subtasks in all.
    pub total: i64,
    /// Running.
    pub processing: i64,
    /// Succeeded.
    pub success: i64,
    /// Failed.
    pub fail: i64,
    /// Waiting to start.
    pub waiting: i64,
    /// Failed, retrying later.
    pub fail_wait_retry: i64,
    /// Stopped.
    pub stopped: i64,
    /// Creation time.
    pub created: String,
    /// Scheduled start, if scheduled.
    pub scheduled: Option<String>,
    /// Finish time, if finished.
    pub finished: Option<String>,
}

impl TaskRow {
    /// Subtasks that reached an end (succeeded, failed or stopped).
    #[must_use]
    pub const fn done(&self) -> i64 {
        self.success + self.fail + self.stopped
    }
}

/// The task page: its row, the package, retry policy and one page of per-device rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    /// The task.
    pub task: TaskRow,
    /// Its package id (gone when deleted).
    pub package_id: Option<String>,
    /// Retries per device.
    pub retry_count: i32,
    /// Minutes between retries.
    pub retry_interval: i32,
    /// Per-device rows.
    pub devices: PageOf<SubtaskRow>,
    /// Its rollout, when it has one.
    pub rollout: Option<super::rollouts::RolloutCard>,
    /// Devices waiting for confirmation (a `need_confirm` task).
    pub unconfirmed: u64,
}

/// One device in a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubtaskRow {
    /// Device id.
    pub device_id: String,
    /// IoTDA status.
    pub status: String,
    /// The current step.
    pub step: String,
    /// Percent.
    pub progress: i32,
    /// Attempts started.
    pub attempts: i32,
    /// Error code and message, when failed.
    pub error: Option<String>,
    /// Started.
    pub started: Option<String>,
    /// Last change.
    pub updated: String,
    /// Finished.
    pub finished: Option<String>,
}

/// One entry of a device's step history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRow {
    /// When.
    pub at: String,
    /// The step.
    pub step: String,
    /// The status then.
    pub status: String,
    /// Percent then.
    pub progress: i32,
    /// What happened.
    pub detail: String,
}

/// Per-target outcomes of a stop or retry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// Targets the command applied to (`None`: the whole task).
    pub applied: Option<u64>,
    /// `device: reason` for refused targets.
    pub refused: Vec<String>,
}

/// The most device ids the create form takes (larger fleets: a group, or the API).
pub const MAX_FORM_TARGETS: usize = 10_000;

/// Rows per page of the task list and the per-device table.
pub const PAGE_SIZE: u64 = 50;

#[cfg(feature = "ssr")]
fn package_row(p: backend::storage::entity::packages::Model, product_name: String) -> PackageRow {
    PackageRow {
        package_id: p.id,
        package_type: p.package_type,
        product_id: p.product_id,
        product_name,
        version: p.version,
        file_name: p.file_name,
        size: p.size,
        created: super::ssr::when(p.created_at),
    }
}

#[cfg(feature = "ssr")]
fn task_row(t: backend::storage::entity::tasks::Model) -> TaskRow {
    TaskRow {
        task_id: t.id,
        task_name: t.task_name,
        task_type: t.task_type,
        status: t.status,
        status_desc: t.status_desc,
        total: t.total,
        processing: t.processing,
        success: t.success,
        fail: t.fail,
        waiting: t.waitting,
        fail_wait_retry: t.fail_wait_retry,
        stopped: t.stopped,
        created: super::ssr::when(t.created_at),
        scheduled: t.schedule_time.map(super::ssr::when),
        finished: t.finished_at.map(super::ssr::when),
    }
}

/// Lists packages, newest first.
#[server(prefix = "/api", endpoint = "list_packages")]
pub async fn list_packages(offset: u64) -> Result<PageOf<PackageRow>, ApiError> {
    use backend::service::{Page, packages};
    let (state, user) = super::ssr::context().await?;
    let filter = packages::Filter::default();
    let page = packages::list(
        &state,
        &user.project_id,
        filter,
        Page::new(PAGE_SIZE, offset),
    )
    .await?;
    Ok(PageOf {
        items: page
            .items
            .into_iter()
            .map(|row| package_row(row.package, row.product_name))
            .collect(),
        total: page.total,
        offset,
        limit: PAGE_SIZE,
    })
}

/// One package and the tasks that use it.
#[server(prefix = "/api", endpoint = "package_detail")]
pub async fn package_detail(package_id: String) -> Result<PackageView, ApiError> {
    use backend::service::{packages, tasks};
    let (state, user) = super::ssr::context().await?;
    let row = packages::get(&state, &user.project_id, &package_id).await?;
    let using = tasks::using_package(&state, &user.project_id, &package_id, 100).await?;
    let p = row.package;
    Ok(PackageView {
        sha256: p.sha256.clone(),
        support_source_versions: serde_json::from_str(&p.support_source_versions)
            .unwrap_or_default(),
        description: p.description.clone(),
        custom_info: p.custom_info.clone(),
        segment_size: p.segment_size,
        source: p.source.clone(),
        tasks: using.into_iter().map(task_row).collect(),
        row: package_row(p, row.product_name),
    })
}

/// Deletes a package (refused while an executing task uses it).
#[server(prefix = "/api", endpoint = "delete_package")]
pub async fn delete_package(package_id: String) -> Result<(), ApiError> {
    let (state, user) = super::ssr::context().await?;
    backend::service::packages::delete(&state, &user.project_id, &package_id).await?;
    Ok(())
}

/// Lists tasks, newest first.
#[server(prefix = "/api", endpoint = "list_tasks")]
pub async fn list_tasks(offset: u64) -> Result<PageOf<TaskRow>, ApiError> {
    use backend::service::{Page, tasks};
    let (state, user) = super::ssr::context().await?;
    let page = tasks::list(
        &state,
        &user.project_id,
        &tasks::TaskFilter::default(),
        Page::new(PAGE_SIZE, offset),
    )
    .await?;
    Ok(PageOf {
        items: page.items.into_iter().map(task_row).collect(),
        total: page.total,
        offset,
        limit: PAGE_SIZE,
    })
}

/// A task with one page of its devices, optionally only those in `status`.
#[server(prefix = "/api", endpoint = "task_detail")]
pub async fn task_detail(
    task_id: String,
    status: String,
    offset: u64,
) -> Result<TaskView, ApiError> {
    use backend::service::{Page, tasks};
    let (state, user) = super::ssr::context().await?;
    let task = tasks::get(&state, &user.project_id, &task_id).await?;
    let filter = tasks::DetailFilter {
        status: (!status.is_empty())
            .then(|| domain::task::SubtaskStatus::parse(&status))
            .transpose()?,
        target: None,
        descending_after: None,
    };
    let page = tasks::details(
        &state,
        &user.project_id,
        &task_id,
        &filter,
        Page::new(PAGE_SIZE, offset),
    )
    .await?;
    let rollout = state
        .driver
        .rollout_view(&state, &task)
        .await?
        .map(super::rollouts::RolloutCard::of);
    let unconfirmed = tasks::unconfirmed(&state, &task_id).await?;
    Ok(TaskView {
        unconfirmed,
        rollout,
        package_id: task.package_id.clone(),
        retry_count: task.retry_count,
        retry_interval: task.retry_interval_min,
        task: task_row(task),
        devices: PageOf {
            items: page
                .items
                .into_iter()
                .map(|s| SubtaskRow {
                    error: match (s.error_code, s.error_msg) {
                        (Some(c), Some(m)) => Some(format!("{c}: {m}")),
                        (c, m) => m.or(c),
                    },
                    device_id: s.device_id,
                    status: s.status,
                    step: s.step,
                    progress: s.progress,
                    attempts: s.attempts,
                    started: s.started_at.map(super::ssr::when),
                    updated: super::ssr::when(s.updated_at),
                    finished: s.finished_at.map(super::ssr::when),
                })
                .collect(),
            total: page.total,
            offset,
            limit: PAGE_SIZE,
        },
    })
}

/// One device's step history in a task, oldest first.
#[server(prefix = "/api", endpoint = "step_history")]
pub async fn step_history(task_id: String, device_id: String) -> Result<Vec<StepRow>, ApiError> {
    let (state, user) = super::ssr::context().await?;
    let steps =
        backend::service::tasks::history(&state, &user.project_id, &task_id, &device_id).await?;
    Ok(steps
        .into_iter()
        .map(|s| StepRow {
            at: super::ssr::when(s.at),
            step: s.step,
            status: s.status,
            progress: s.progress,
            detail: s.detail,
        })
        .collect())
}

/// How many devices a task for `package_id` would target in `group_id`.
#[server(prefix = "/api", endpoint = "target_count")]
pub async fn target_count(package_id: String, group_id: String) -> Result<u64, ApiError> {
    let (state, user) = super::ssr::context().await?;
    Ok(backend::service::tasks::group_target_count(
        &state,
        &user.project_id,
        &package_id,
        &group_id,
    )
    .await?)
}

/// Creates an upgrade task from the console's form. `targets` is `group` (then `group_id`) or `devices`
/// (then `device_ids`, separated by commas, spaces or lines); `start` is `now` or `later` (then
/// `schedule_time`, a `datetime-local` value in the browser's zone, `tz_offset` minutes west of UTC);
/// `retry` is `on` or empty.
#[server(prefix = "/api", endpoint = "create_task")]
pub async fn create_task(
    task_name: String,
    package_id: String,
    targets: String,
    // Fields the form disables or hides are not sent.
    #[server(default)] group_id: String,
    #[server(default)] device_ids: String,
    start: String,
    #[server(default)] schedule_time: String,
    #[server(default)] tz_offset: String,
    #[server(default)] retry: String,
    #[server(default)] retry_count: String,
    #[server(default)] retry_interval: String,
    #[server(default)] rollout: super::rollouts::RolloutForm,
    #[server(default)] need_confirm: String,
) -> Result<String, ApiError> {
    use backend::service::{packages, tasks};
    use domain::ValidationError;
    let (state, user) = super::ssr::context().await?;
    if package_id.trim().is_empty() {
        return Err(ValidationError::new("package_id", "choose a package").into());
    }
    let package = packages::get(&state, &user.project_id, package_id.trim()).await?;
    let task_type = if package.package.package_type == "firmwarePackage" {
        "firmwareUpgrade"
    } else {
        "softwareUpgrade"
    };
    let (targets, group_ids) = match targets.as_str() {
        "group" if group_id.trim().is_empty() => {
            return Err(ValidationError::new("group_id", "choose a group").into());
        }
        "group" => (Vec::new(), vec![group_id.trim().to_owned()]),
        "devices" => (
            super::split_ids(&device_ids, "device_ids", MAX_FORM_TARGETS)?,
            Vec::new(),
        ),
        _ => return Err(ValidationError::new("targets", "choose devices or a group").into()),
    };
    let schedule_time = match start.as_str() {
        "later" => {
            let offset = tz_offset.trim().parse::<i64>().unwrap_or(0);
            Some(domain::Timestamp::parse_local_input(
                "schedule_time",
                &schedule_time,
                offset,
            )?)
        }
        _ => None,
    };
    let number = |field: &str, v: &str| {
        v.trim()
            .parse::<i64>()
            .map_err(|_| ApiError::from(ValidationError::new(field, "must be a whole number")))
    };
    let (retry_count, retry_interval) = if retry == "on" {
        (
            Some(number("retry_count", &retry_count)?),
            Some(number("retry_interval", &retry_interval)?),
        )
    } else {
        (None, None)
    };
    let new = tasks::NewTask {
        task_name,
        task_type: task_type.to_owned(),
        package_id: package_id.trim().to_owned(),
        targets,
        group_ids,
        schedule_time,
        retry_count,
        retry_interval,
        task_ext_info: None,
        request_id: super::ssr::request_id().await,
        rollout: rollout.rollout()?,
        need_confirm: need_confirm == "on",
        gateway_mode: false,
    };
    let task = tasks::create(&state, &user.project_id, new)
        .await
        .map_err(rename_fields)?;
    Ok(super::ssr::created(task.id))
}

/// The service names IoTDA's fields (`task_policy.retry_count`); the form's fields are flat.
#[cfg(feature = "ssr")]
fn rename_fields(e: backend::Error) -> ApiError {
    ApiError::from(e).rename_fields(&[
        ("task_policy.retry_count", "retry_count"),
        ("task_policy.retry_interval", "retry_interval"),
        ("task_policy.schedule_time", "schedule_time"),
        ("document.package_ids", "package_id"),
        ("targets", "device_ids"),
        ("targets_filter.group_ids", "group_id"),
    ])
}

/// Stops a task (empty `device_ids`) or some of its devices.
#[server(prefix = "/api", endpoint = "stop_task")]
pub async fn stop_task(task_id: String, device_ids: String) -> Result<CommandResult, ApiError> {
    let (state, user) = super::ssr::context().await?;
    command(&state, &user.project_id, &task_id, &device_ids, Verb::Stop).await
}

/// Retries a task's failed and stopped devices (empty `device_ids`: all of them).
#[server(prefix = "/api", endpoint = "retry_task")]
pub async fn retry_task(task_id: String, device_ids: String) -> Result<CommandResult, ApiError> {
    let (state, user) = super::ssr::context().await?;
    command(&state, &user.project_id, &task_id, &device_ids, Verb::Retry).await
}

/// Lets a `need_confirm` task's waiting devices start (empty `device_ids`: all of them).
#[server(prefix = "/api", endpoint = "confirm_task")]
pub async fn confirm_task(task_id: String, device_ids: String) -> Result<CommandResult, ApiError> {
    let (state, user) = super::ssr::context().await?;
    command(
        &state,
        &user.project_id,
        &task_id,
        &device_ids,
        Verb::Confirm,
    )
    .await
}

/// What a task command does.
#[cfg(feature = "ssr")]
#[derive(Clone, Copy)]
enum Verb {
    Stop,
    Retry,
    Confirm,
}

#[cfg(feature = "ssr")]
async fn command(
    state: &backend::AppState,
    project_id: &str,
    task_id: &str,
    device_ids: &str,
    verb: Verb,
) -> Result<CommandResult, ApiError> {
    use backend::service::tasks;
    let targets = if device_ids.trim().is_empty() {
        None
    } else {
        Some(super::split_ids(
            device_ids,
            "device_ids",
            tasks::MAX_COMMAND_TARGETS,
        )?)
    };
    let targets = targets.as_deref();
    let results = match verb {
        Verb::Stop => tasks::stop(state, project_id, task_id, targets).await?,
        Verb::Retry => tasks::retry(state, project_id, task_id, targets).await?,
        Verb::Confirm => tasks::confirm(state, project_id, task_id, targets).await?,
    };
    Ok(CommandResult {
        applied: targets
            .is_some()
            .then(|| results.iter().filter(|r| r.status == "success").count() as u64),
        refused: results.into_iter().filter_map(|r| r.error_msg).collect(),
    })
}

/// Deletes a task (refused while it executes).
#[server(prefix = "/api", endpoint = "delete_task")]
pub async fn delete_task(task_id: String) -> Result<(), ApiError> {
    let (state, user) = super::ssr::context().await?;
    backend::service::tasks::delete(&state, &user.project_id, &task_id).await?;
    Ok(())
}
