//! Batch upgrade tasks (IoTDA "batch tasks" of type `softwareUpgrade` / `firmwareUpgrade`): creation with
//! targets resolved to subtasks, listing, details, stop, retry and delete. Running them is the
//! [`Driver`](crate::driver::Driver)'s job; this module validates and hands it commands.
//!
//! Targets are a device list or groups (`targets_filter.group_ids`); a list wins when both are given, as in
//! IoTDA. A group is resolved when the task starts (at once, or at its `schedule_time`; see `driver::start`),
//! to the members of the package's product. There is no cap on devices per task or on concurrent tasks.

use std::collections::{BTreeSet, HashMap};

use domain::flow::RetryPolicy;
use domain::package::PackageType;
use domain::task::{SubtaskStatus, TaskStatus, TaskType, check_schedule, parse_task_name};
use domain::{DeviceId, Timestamp, ValidationError};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};
use serde::{Deserialize, Serialize};

use super::{Page, Paged};
pub use crate::driver::TargetsFilter;
use crate::driver::{check_protocol, write_subtasks};
use crate::storage::entity::{
    device_group_members, device_groups, devices, packages, subtask_steps, subtasks, tasks,
};
use crate::{AppState, Error, Result, ids};

/// Rows inserted per statement when a task's subtasks are written.
const INSERT_BATCH: usize = 500;

/// What an operator or application gives to create an upgrade task.
#[derive(Clone, Debug, Default)]
pub struct NewTask {
    /// `task_name`.
    pub task_name: String,
    /// `task_type`: `softwareUpgrade` or `firmwareUpgrade`.
    pub task_type: String,
    /// The package (`document.package_ids[0]`).
    pub package_id: String,
    /// `targets`: device ids.
    pub targets: Vec<String>,
    /// `targets_filter.group_ids`, used when `targets` is empty.
    pub group_ids: Vec<String>,
    /// `task_policy.schedule_time`; `None` starts at once.
    pub schedule_time: Option<Timestamp>,
    /// `task_policy.retry_count`.
    pub retry_count: Option<i64>,
    /// `task_policy.retry_interval`, minutes.
    pub retry_interval: Option<i64>,
    /// `task_ext_info`, echoed to devices and the API.
    pub task_ext_info: Option<serde_json::Value>,
    /// The `X-Request-Id` of the call creating it: the driver's log lines for the task carry it.
    pub request_id: Option<String>,
    /// Waves, thresholds, pacing and windows (an Updraft extension); `None` starts every target at once.
    pub rollout: Option<domain::rollout::Rollout>,
    /// IoTDA's `need_confirm`: every device waits (`Waitting`, step `unconfirmed`) until
    /// [`confirm`] lets it start.
    pub need_confirm: bool,
    /// IoTDA's `task_mode`: `GATEWAY` tells child devices how many of their gateway's children the task
    /// upgrades (`sub_device_count`); `None` otherwise.
    pub gateway_mode: bool,
}

/// Checks a rollout policy (its groups must be the project's) and completes it with a seed.
async fn check_rollout(
    state: &AppState,
    project_id: &str,
    rollout: domain::rollout::Rollout,
) -> Result<domain::rollout::Rollout> {
    let rollout = rollout.check(rand::random())?;
    for (i, wave) in rollout.waves.iter().enumerate() {
        if let domain::rollout::WaveSize::Groups(groups) = &wave.size {
            for g in groups {
                device_groups::Entity::find_by_id(g.clone())
                    .filter(device_groups::Column::ProjectId.eq(project_id))
                    .one(&state.db)
                    .await?
                    .ok_or_else(|| {
                        ValidationError::new(
                            format!("rollout.waves[{i}].group_ids"),
                            format!("no group {g} in this project"),
                        )
                    })?;
            }
        }
    }
    Ok(rollout)
}

/// The stored `document`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// The package, as a one-element list (IoTDA's shape).
    pub package_ids: Vec<String>,
}

/// Creates a task in `project_id`, writes its subtasks, and starts it unless it is scheduled.
///
/// # Errors
/// [`Error::Validation`] naming the field (name, type, package, targets, policy); [`Error::NotFound`] for
/// an unknown package or group; [`Error::Db`].
pub async fn create(state: &AppState, project_id: &str, new: NewTask) -> Result<tasks::Model> {
    let now = state.clock.now();
    let task_name = parse_task_name(&new.task_name)?;
    let task_type = TaskType::parse(new.task_type.trim())?;
    let package = package_for(state, project_id, &new.package_id, task_type).await?;
    let retry = match (new.retry_count, new.retry_interval) {
        (None, None) => RetryPolicy::NONE,
        (Some(count), Some(minutes)) => RetryPolicy::parse(count, minutes)?,
        (Some(_), None) => {
            return Err(ValidationError::new(
                "task_policy.retry_interval",
                "is required with retry_count",
            )
            .into());
        }
        (None, Some(_)) => {
            return Err(ValidationError::new(
                "task_policy.retry_count",
                "is required with retry_interval",
            )
            .into());
        }
    };
    let schedule = new
        .schedule_time
        .map(|t| check_schedule(now, t))
        .transpose()?;
    if let Some(ext) = &new.task_ext_info
        && ext.to_string().chars().count() > 512
    {
        return Err(ValidationError::new("task_ext_info", "must be at most 512 characters").into());
    }
    let targets = dedupe(&new.targets, "targets")?;
    let group_ids = dedupe(&new.group_ids, "targets_filter.group_ids")?;
    let (devices, filter) = if !targets.is_empty() {
        (
            Some(listed_devices(state, project_id, &package, &targets).await?),
            None,
        )
    } else if !group_ids.is_empty() {
        for g in &group_ids {
            device_groups::Entity::find_by_id(g.clone())
                .filter(device_groups::Column::ProjectId.eq(project_id))
                .one(&state.db)
                .await?
                .ok_or_else(|| Error::not_found("group", g.clone()))?;
        }
        (None, Some(TargetsFilter { group_ids }))
    } else {
        return Err(ValidationError::new(
            "targets",
            "give device ids in targets, or group ids in targets_filter.group_ids",
        )
        .into());
    };
    let rollout = match new.rollout {
        Some(r) => Some(check_rollout(state, project_id, r).await?),
        None => None,
    };
    let document = Document {
        package_ids: vec![package.id.clone()],
    };
    let id = ids::object_id(now);
    let task = tasks::ActiveModel {
        id: Set(id.clone()),
        project_id: Set(project_id.to_owned()),
        app_id: Set(package.app_id.clone()),
        task_name: Set(task_name),
        task_type: Set(task_type.as_str().to_owned()),
        task_mode: Set(new.gateway_mode.then(|| "GATEWAY".to_owned())),
        need_confirm: Set(new.need_confirm),
        task_ext_info: Set(new.task_ext_info.as_ref().map(ToString::to_string)),
        targets_filter: Set(filter.as_ref().map(to_json)),
        document: Set(to_json(&document)),
        package_id: Set(Some(package.id.clone())),
        schedule_time: Set(schedule.map(Timestamp::as_millis)),
        retry_count: Set(i32::from(retry.retry_count)),
        retry_interval_min: Set(
            i32::try_from(retry.retry_interval.as_secs() / 60).unwrap_or(i32::MAX)
        ),
        status: Set(TaskStatus::Initializing.as_str().to_owned()),
        status_desc: Set("resolving targets".to_owned()),
        total: Set(0),
        processing: Set(0),
        success: Set(0),
        fail: Set(0),
        waitting: Set(0),
        fail_wait_retry: Set(0),
        stopped: Set(0),
        removed: Set(0),
        created_at: Set(now.as_millis()),
        started_at: Set(None),
        finished_at: Set(None),
        updated_at: Set(now.as_millis()),
        claimed_by: Set(Some(state.instance_id().to_owned())),
        request_id: Set(new.request_id.clone()),
        rollout: Set(rollout.as_ref().map(to_json)),
        rollout_state: Set(None),
        rollout_wake_at: Set(None),
    };
    // The task and its listed targets commit together: a crash leaves both or neither.
    let txn = crate::db::begin_write(&state.db).await?;
    let task = task.insert(&txn).await?;
    if let Some(devices) = devices {
        write_subtasks(&txn, now, &task.id, &devices, new.need_confirm).await?;
    }
    txn.commit().await?;
    let scheduled = schedule.is_some_and(|t| t > now);
    if scheduled || !state.driver.is_running() {
        // Scheduled, or created where no driver runs (the command line): the serving process's driver
        // starts it when it is due.
        set_status(state, &task.id, TaskStatus::Waiting).await?;
        state.driver.kick();
    } else {
        state.driver.start(state, &task.id, false).await?;
    }
    tracing::info!(task_id = %task.id, package_id = %package.id, scheduled, "task created");
    get(state, project_id, &task.id).await
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Plain structs of strings cannot fail to serialise.
    serde_json::to_string(v).unwrap_or_default()
}

async fn set_status(state: &AppState, task_id: &str, status: TaskStatus) -> Result<()> {
    let progress = {
        let t = tasks::Entity::find_by_id(task_id.to_owned())
            .one(&state.db)
            .await?
            .ok_or_else(|| Error::not_found("task", task_id))?;
        t.progress()
    };
    tasks::Entity::update_many()
        .col_expr(tasks::Column::Status, Expr::value(status.as_str()))
        .col_expr(
            tasks::Column::StatusDesc,
            Expr::value(status.describe(&progress)),
        )
        .col_expr(
            tasks::Column::UpdatedAt,
            Expr::value(state.clock.now().as_millis()),
        )
        .filter(tasks::Column::Id.eq(task_id))
        .exec(&state.db)
        .await?;
    Ok(())
}

fn dedupe(ids: &[String], field: &str) -> Result<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let id = id.trim();
        if id.is_empty() {
            continue;
        }
        if id.len() > 256 || id.chars().any(char::is_control) {
            return Err(ValidationError::new(field, format!("invalid id {id:?}")).into());
        }
        if seen.insert(id.to_owned()) {
            out.push(id.to_owned());
        }
    }
    Ok(out)
}

/// The package a task of `task_type` may use.
async fn package_for(
    state: &AppState,
    project_id: &str,
    package_id: &str,
    task_type: TaskType,
) -> Result<packages::Model> {
    let package_id = package_id.trim();
    if package_id.is_empty() {
        return Err(ValidationError::new("document.package_ids", "is required").into());
    }
    let package = packages::Entity::find_by_id(package_id.to_owned())
        .filter(packages::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("package", package_id))?;
    let wanted = match task_type {
        TaskType::SoftwareUpgrade => PackageType::Software,
        TaskType::FirmwareUpgrade => PackageType::Firmware,
    };
    if package.package_type != wanted.as_str() {
        return Err(ValidationError::new(
            "document.package_ids",
            format!(
                "package {package_id} is a {}; a {} task needs a {}",
                package.package_type,
                task_type.as_str(),
                wanted.as_str()
            ),
        )
        .into());
    }
    Ok(package)
}

/// Checks a list of devices: all exist in the project, belong to the package's product, speak MQTT.
async fn listed_devices(
    state: &AppState,
    project_id: &str,
    package: &packages::Model,
    targets: &[String],
) -> Result<Vec<devices::Model>> {
    let mut found: HashMap<String, devices::Model> = HashMap::with_capacity(targets.len());
    for chunk in targets.chunks(INSERT_BATCH) {
        for d in devices::Entity::find()
            .filter(devices::Column::ProjectId.eq(project_id))
            .filter(devices::Column::Id.is_in(chunk.to_vec()))
            .all(&state.db)
            .await?
        {
            found.insert(d.id.clone(), d);
        }
    }
    let listing = |ids: Vec<&String>| {
        let n = ids.len();
        let mut s = ids
            .iter()
            .take(5)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if n > 5 {
            s.push_str(&format!(" and {} more", n - 5));
        }
        s
    };
    let unknown: Vec<&String> = targets.iter().filter(|t| !found.contains_key(*t)).collect();
    if !unknown.is_empty() {
        for t in &unknown {
            DeviceId::parse(t.as_str()).map_err(|e| ValidationError::new("targets", e.message))?;
        }
        return Err(ValidationError::new(
            "targets",
            format!("unknown devices: {}", listing(unknown)),
        )
        .into());
    }
    let foreign: Vec<&String> = targets
        .iter()
        .filter(|t| found[*t].product_id != package.product_id)
        .collect();
    if !foreign.is_empty() {
        return Err(ValidationError::new(
            "targets",
            format!(
                "devices of another product than the package's ({}): {}",
                package.product_id,
                listing(foreign)
            ),
        )
        .into());
    }
    check_protocol(state, package).await?;
    Ok(targets
        .iter()
        .filter_map(|t| found.remove(t.as_str()))
        .collect())
}

/// Filters for [`list`].
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    /// Only this `task_type`.
    pub task_type: Option<TaskType>,
    /// Only this status.
    pub status: Option<TaskStatus>,
    /// Only tasks older than this id (IoTDA's `marker`: the last id of the previous page).
    pub marker: Option<String>,
}

/// `project_id`'s tasks, newest first.
///
/// # Errors
/// [`Error::Db`].
pub async fn list(
    state: &AppState,
    project_id: &str,
    filter: &TaskFilter,
    page: Page,
) -> Result<Paged<tasks::Model>> {
    let mut cond = Condition::all().add(tasks::Column::ProjectId.eq(project_id));
    if let Some(t) = filter.task_type {
        cond = cond.add(tasks::Column::TaskType.eq(t.as_str()));
    }
    if let Some(s) = filter.status {
        cond = cond.add(tasks::Column::Status.eq(s.as_str()));
    }
    // Newest first either way; `page.count` counts every match, not only those after the marker.
    let order = super::ListOrder::ById {
        marker: filter.marker.clone(),
    };
    let query = order.apply(tasks::Entity::find().filter(cond), tasks::Column::Id, |q| q);
    super::fetch_ordered(&state.db, query, page).await
}

/// One task.
///
/// # Errors
/// [`Error::NotFound`] (also for another project's task); [`Error::Db`].
pub async fn get(state: &AppState, project_id: &str, task_id: &str) -> Result<tasks::Model> {
    tasks::Entity::find_by_id(task_id.to_owned())
        .filter(tasks::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("task", task_id))
}

/// Filters for [`details`].
#[derive(Clone, Debug, Default)]
pub struct DetailFilter {
    /// Only subtasks in this status.
    pub status: Option<SubtaskStatus>,
    /// Only this device.
    pub target: Option<String>,
    /// `None`: creation order (the console's). `Some(after)`: IoTDA's order, newest subtask first,
    /// starting after the subtask whose row id is `after` (the previous page's marker, `None` for the
    /// first page).
    pub descending_after: Option<Option<i64>>,
}

/// A task's subtasks (IoTDA `task_details`), in creation order or IoTDA's (see [`DetailFilter`]).
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn details(
    state: &AppState,
    project_id: &str,
    task_id: &str,
    filter: &DetailFilter,
    page: Page,
) -> Result<Paged<subtasks::Model>> {
    get(state, project_id, task_id).await?;
    let mut query = subtasks::Entity::find().filter(subtasks::Column::TaskId.eq(task_id));
    if let Some(s) = filter.status {
        query = query.filter(subtasks::Column::Status.eq(s.as_str()));
    }
    if let Some(t) = &filter.target {
        query = query.filter(subtasks::Column::DeviceId.eq(t.as_str()));
    }
    match filter.descending_after {
        None => super::fetch_page(&state.db, query.order_by_asc(subtasks::Column::Id), page).await,
        Some(after) => {
            let counted = query.clone();
            let mut query = query.order_by_desc(subtasks::Column::Id);
            if let Some(after) = after {
                query = query.filter(subtasks::Column::Id.lt(after));
            }
            super::fetch_ordered(&state.db, (query, Some(counted)), page).await
        }
    }
}

/// One subtask's step history, oldest first.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn history(
    state: &AppState,
    project_id: &str,
    task_id: &str,
    device_id: &str,
) -> Result<Vec<subtask_steps::Model>> {
    get(state, project_id, task_id).await?;
    let subtask = subtasks::Entity::find()
        .filter(subtasks::Column::TaskId.eq(task_id))
        .filter(subtasks::Column::DeviceId.eq(device_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("device", device_id))?;
    Ok(subtask_steps::Entity::find()
        .filter(subtask_steps::Column::SubtaskId.eq(subtask.id))
        .order_by_asc(subtask_steps::Column::Id)
        .all(&state.db)
        .await?)
}

/// One upgrade of one device: the subtask and its task.
#[derive(Clone, Debug)]
pub struct DeviceUpgrade {
    /// The task.
    pub task: tasks::Model,
    /// The device's subtask in it.
    pub subtask: subtasks::Model,
}

/// A device's upgrades, newest first (at most `limit`).
///
/// # Errors
/// [`Error::NotFound`] for a device outside the project; [`Error::Db`].
pub async fn device_upgrades(
    state: &AppState,
    project_id: &str,
    device_id: &str,
    limit: u64,
) -> Result<Vec<DeviceUpgrade>> {
    super::devices::get(state, project_id, device_id).await?;
    let subtasks = subtasks::Entity::find()
        .filter(subtasks::Column::DeviceId.eq(device_id))
        .order_by_desc(subtasks::Column::Id)
        .limit(limit.clamp(1, 500))
        .all(&state.db)
        .await?;
    let task_ids: BTreeSet<String> = subtasks.iter().map(|s| s.task_id.clone()).collect();
    let tasks: HashMap<String, tasks::Model> = tasks::Entity::find()
        .filter(tasks::Column::ProjectId.eq(project_id))
        .filter(tasks::Column::Id.is_in(task_ids))
        .all(&state.db)
        .await?
        .into_iter()
        .map(|t| (t.id.clone(), t))
        .collect();
    Ok(subtasks
        .into_iter()
        .filter_map(|subtask| {
            let task = tasks.get(&subtask.task_id)?.clone();
            Some(DeviceUpgrade { task, subtask })
        })
        .collect())
}

/// The tasks that use `package_id`, newest first (at most `limit`).
///
/// # Errors
/// [`Error::Db`].
pub async fn using_package(
    state: &AppState,
    project_id: &str,
    package_id: &str,
    limit: u64,
) -> Result<Vec<tasks::Model>> {
    Ok(tasks::Entity::find()
        .filter(tasks::Column::ProjectId.eq(project_id))
        .filter(tasks::Column::PackageId.eq(package_id))
        .order_by_desc(tasks::Column::Id)
        .limit(limit.clamp(1, 500))
        .all(&state.db)
        .await?)
}

/// How many devices a task for `package_id` would target in `group_id` now: the group's members of the
/// package's product.
///
/// # Errors
/// [`Error::NotFound`] for an unknown package or group; [`Error::Db`].
pub async fn group_target_count(
    state: &AppState,
    project_id: &str,
    package_id: &str,
    group_id: &str,
) -> Result<u64> {
    let package = packages::Entity::find_by_id(package_id.to_owned())
        .filter(packages::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("package", package_id))?;
    device_groups::Entity::find_by_id(group_id.to_owned())
        .filter(device_groups::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("group", group_id))?;
    let members = sea_orm::sea_query::Query::select()
        .column(device_group_members::Column::DeviceId)
        .from(device_group_members::Entity)
        .and_where(device_group_members::Column::GroupId.eq(group_id))
        .to_owned();
    Ok(devices::Entity::find()
        .filter(devices::Column::ProjectId.eq(project_id))
        .filter(devices::Column::ProductId.eq(package.product_id.as_str()))
        .filter(devices::Column::Id.in_subquery(members))
        .count(&state.db)
        .await?)
}

/// The outcome of a stop or retry for one target (IoTDA `BatchTargetResult`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetResult {
    /// The device id.
    pub target: String,
    /// `success` or `failure`.
    pub status: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Why it failed, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_msg: Option<String>,
}

impl TargetResult {
    fn ok(target: String) -> Self {
        Self {
            target,
            status: "success",
            error_code: None,
            error_msg: None,
        }
    }

    fn failed(target: String, msg: String) -> Self {
        Self {
            target,
            status: "failure",
            error_code: Some("IOTDA.014100".to_owned()),
            error_msg: Some(msg),
        }
    }
}

/// The most targets one stop or retry call may name.
pub const MAX_COMMAND_TARGETS: usize = 100;

/// Picks the subtasks a command applies to: all in `statuses`, or the named devices (each checked).
async fn select(
    state: &AppState,
    task_id: &str,
    targets: Option<&[String]>,
    statuses: &[SubtaskStatus],
    verb: &str,
) -> Result<(Vec<i64>, Vec<TargetResult>)> {
    select_in_step(state, task_id, targets, statuses, None, verb).await
}

/// [`select`], and only subtasks in `step` when one is given.
async fn select_in_step(
    state: &AppState,
    task_id: &str,
    targets: Option<&[String]>,
    statuses: &[SubtaskStatus],
    step: Option<&str>,
    verb: &str,
) -> Result<(Vec<i64>, Vec<TargetResult>)> {
    let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
    let Some(targets) = targets.filter(|t| !t.is_empty()) else {
        let mut query = subtasks::Entity::find()
            .select_only()
            .column(subtasks::Column::Id)
            .filter(subtasks::Column::TaskId.eq(task_id))
            .filter(subtasks::Column::Status.is_in(statuses));
        if let Some(step) = step {
            query = query.filter(subtasks::Column::Step.eq(step));
        }
        let ids = query.into_tuple::<i64>().all(&state.db).await?;
        return Ok((ids, Vec::new()));
    };
    if targets.len() > MAX_COMMAND_TARGETS {
        return Err(ValidationError::new(
            "targets",
            format!("at most {MAX_COMMAND_TARGETS} targets per call"),
        )
        .into());
    }
    let targets = dedupe(targets, "targets")?;
    let rows: HashMap<String, subtasks::Model> = subtasks::Entity::find()
        .filter(subtasks::Column::TaskId.eq(task_id))
        .filter(subtasks::Column::DeviceId.is_in(targets.clone()))
        .all(&state.db)
        .await?
        .into_iter()
        .map(|r| (r.device_id.clone(), r))
        .collect();
    let mut ids = Vec::new();
    let mut results = Vec::new();
    for t in targets {
        match rows.get(&t) {
            None => results.push(TargetResult::failed(
                t.clone(),
                format!("device {t} is not a target of this task"),
            )),
            Some(r) if !statuses.contains(&r.status.as_str()) => {
                results.push(TargetResult::failed(
                    t.clone(),
                    format!("cannot {verb} device {t}: its subtask is {}", r.status),
                ));
            }
            Some(r) if step.is_some_and(|s| s != r.step) => {
                results.push(TargetResult::failed(
                    t.clone(),
                    format!(
                        "cannot {verb} device {t}: its subtask is at step {}",
                        r.step
                    ),
                ));
            }
            Some(r) => {
                ids.push(r.id);
                results.push(TargetResult::ok(t));
            }
        }
    }
    Ok((ids, results))
}

/// Stops a task (no targets: every waiting, running or retry-waiting subtask, and the task itself) or
/// some of its devices. Stopped subtasks' download tokens are revoked.
///
/// A whole-task stop is marked first (`Stopping`, committed) and then carried through; stopping a task
/// that is still `Stopping` (a stop cut short by a crash, if start-up has not carried it through yet)
/// carries it through again.
///
/// # Errors
/// [`Error::Conflict`] when the task has completed, or devices are named while it is stopping;
/// [`Error::Validation`] for more than 100 targets; [`Error::NotFound`]; [`Error::Db`].
pub async fn stop(
    state: &AppState,
    project_id: &str,
    task_id: &str,
    targets: Option<&[String]>,
) -> Result<Vec<TargetResult>> {
    let task = get(state, project_id, task_id).await?;
    let status = TaskStatus::parse(&task.status)?;
    let whole = targets.is_none_or(<[String]>::is_empty);
    if status.is_completed() || (status == TaskStatus::Stopping && !whole) {
        return Err(Error::Conflict(format!(
            "task {task_id} is {}; only a running or waiting task can be stopped",
            status.as_str()
        )));
    }
    if whole {
        if status != TaskStatus::Stopping {
            set_status(state, task_id, TaskStatus::Stopping).await?;
        }
        state.driver.finish_stop(state, task_id).await?;
        tracing::info!(task_id, "task stopped");
        return Ok(Vec::new());
    }
    let (ids, results) = select(state, task_id, targets, &SubtaskStatus::OPEN, "stop").await?;
    state
        .driver
        .command(state, ids, crate::driver::Step::Stop)
        .await?;
    tracing::info!(task_id, "devices of the task stopped");
    Ok(results)
}

/// Resumes a task its rollout paused (README, "Safe rollouts"): failures before now stop counting
/// towards its thresholds, a wave that finished below its success threshold is accepted, and devices
/// start again as the rollout allows.
///
/// # Errors
/// [`Error::Conflict`] when the task is not `Paused`; [`Error::NotFound`]; [`Error::Db`].
pub async fn resume(state: &AppState, project_id: &str, task_id: &str) -> Result<tasks::Model> {
    get(state, project_id, task_id).await?;
    state.driver.resume(state, task_id).await?;
    get(state, project_id, task_id).await
}

/// Retries failed, retry-waiting and stopped subtasks (all, or the named devices).
///
/// # Errors
/// [`Error::Conflict`] when the task is `Success`, `Stopped`, `Stopping`, `Waitting` or `Initializing`, or
/// its package was deleted; [`Error::Validation`]; [`Error::NotFound`]; [`Error::Db`].
pub async fn retry(
    state: &AppState,
    project_id: &str,
    task_id: &str,
    targets: Option<&[String]>,
) -> Result<Vec<TargetResult>> {
    let task = get(state, project_id, task_id).await?;
    let status = TaskStatus::parse(&task.status)?;
    if matches!(
        status,
        TaskStatus::Success
            | TaskStatus::Stopped
            | TaskStatus::Stopping
            | TaskStatus::Waiting
            | TaskStatus::Initializing
    ) {
        return Err(Error::Conflict(format!(
            "task {task_id} is {}; retry needs a running, failed or partly successful task",
            status.as_str()
        )));
    }
    if task.package_id.is_none() {
        return Err(Error::Conflict(format!(
            "task {task_id}: its package was deleted"
        )));
    }
    let (ids, results) = select(
        state,
        task_id,
        targets,
        &[
            SubtaskStatus::Fail,
            SubtaskStatus::FailWaitRetry,
            SubtaskStatus::Stopped,
        ],
        "retry",
    )
    .await?;
    state.driver.restart(state, ids).await?;
    tracing::info!(task_id, "task retry requested");
    Ok(results)
}

/// Confirms a `need_confirm` task's devices (all that wait for confirmation, or the named ones): they
/// become `pending` and start as any task's devices do (its rollout, if it has one, still decides when).
///
/// # Errors
/// [`Error::Conflict`] when the task has completed, is stopping, or has not started yet (it is
/// scheduled); [`Error::Validation`] for more than 100 targets; [`Error::NotFound`]; [`Error::Db`].
pub async fn confirm(
    state: &AppState,
    project_id: &str,
    task_id: &str,
    targets: Option<&[String]>,
) -> Result<Vec<TargetResult>> {
    let task = get(state, project_id, task_id).await?;
    let status = TaskStatus::parse(&task.status)?;
    if status.is_completed() || status == TaskStatus::Stopping {
        return Err(Error::Conflict(format!(
            "task {task_id} is {}; only a running task's devices can be confirmed",
            status.as_str()
        )));
    }
    if matches!(status, TaskStatus::Waiting | TaskStatus::Initializing) {
        return Err(Error::Conflict(format!(
            "task {task_id} is {}: it has not started; confirm its devices once it is Processing",
            status.as_str()
        )));
    }
    let (ids, results) = select_in_step(
        state,
        task_id,
        targets,
        &[SubtaskStatus::Waiting],
        Some(crate::driver::UNCONFIRMED),
        "confirm",
    )
    .await?;
    for chunk in ids.chunks(INSERT_BATCH) {
        subtasks::Entity::update_many()
            .col_expr(subtasks::Column::Step, Expr::value("pending"))
            .filter(subtasks::Column::Id.is_in(chunk.to_vec()))
            .filter(subtasks::Column::Step.eq(crate::driver::UNCONFIRMED))
            .exec(&state.db)
            .await?;
    }
    // Always: a confirmation whose start failed half-way (the database busy) is carried through by the
    // next call, even one that finds nothing left to confirm (starting only begins `pending`
    // subtasks, so it is safe to repeat).
    state.driver.start_task(state, task_id).await?;
    tracing::info!(
        task_id,
        confirmed = ids.len(),
        "devices of the task confirmed"
    );
    Ok(results)
}

/// How many of a task's devices wait for confirmation.
///
/// # Errors
/// [`Error::Db`].
pub async fn unconfirmed(state: &AppState, task_id: &str) -> Result<u64> {
    use sea_orm::PaginatorTrait;
    Ok(subtasks::Entity::find()
        .filter(subtasks::Column::TaskId.eq(task_id))
        .filter(subtasks::Column::Step.eq(crate::driver::UNCONFIRMED))
        .count(&state.db)
        .await?)
}

/// Deletes a completed task with its subtasks, history and tokens.
///
/// # Errors
/// [`Error::Conflict`] while the task is executing; [`Error::NotFound`]; [`Error::Db`].
pub async fn delete(state: &AppState, project_id: &str, task_id: &str) -> Result<()> {
    let task = get(state, project_id, task_id).await?;
    let status = TaskStatus::parse(&task.status)?;
    if !status.is_completed() {
        return Err(Error::Conflict(format!(
            "task {task_id} is {}; stop it before deleting it",
            status.as_str()
        )));
    }
    super::downloads::revoke_task(state, task_id).await?;
    tasks::Entity::delete_by_id(task_id.to_owned())
        .exec(&state.db)
        .await?;
    state.driver.forget(task_id);
    tracing::info!(task_id, "task deleted");
    Ok(())
}
