//! One subtask's transition inside the transaction [`super::apply`] opened: run its machine, write the
//! row back by compare-and-set, move the task's counters, record the step and the outbox event; and the
//! task-level bookkeeping that goes with it (status re-derived from counters, counters recounted).

use domain::Timestamp;
use domain::package::PackageType;
use domain::task::{SubtaskStatus, TaskProgress, TaskStatus};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter,
    QuerySelect, Set,
};

use super::Event;
use super::Step;
use super::flow::{AnyEffect, Machine};
use super::plan::TaskPlan;
use crate::storage::entity::{devices, outbox, subtask_steps, subtasks, tasks};
use crate::{Error, Result};

pub(super) enum Outcome {
    /// The machine had nothing to do.
    Unchanged,
    /// The row was not what the machine was run on (another writer changed it); nothing was written.
    Stale,
    Changed(Box<Changed>),
}

/// The lease a transition takes (on PostgreSQL, where other instances may drive the same subtasks): the
/// row is written with this owner and expiry. An input this instance decided on its own (a deadline, a
/// slot grant) is only applied under a lease held here, or free, or expired; one a device or operator
/// gave (the device is connected here, the operator asked here) takes the lease over.
pub(super) struct Lease<'a> {
    pub(super) owner: &'a str,
    pub(super) until: i64,
}

/// Whether `row`'s lease is held by another instance at `now`.
pub(super) fn leased_elsewhere(row: &subtasks::Model, owner: &str, now: i64) -> bool {
    row.lease_owner.as_deref().is_some_and(|o| o != owner)
        && row.lease_until.is_some_and(|until| until >= now)
}

pub(super) struct Changed {
    /// The row as written.
    pub(super) row: subtasks::Model,
    pub(super) status_changed: bool,
    /// The status and step it had before.
    pub(super) before: (SubtaskStatus, String),
    pub(super) effects: Vec<AnyEffect>,
}

/// Runs one machine and writes its new state (inside `txn`), only if the stored row is still the one
/// it was run on.
pub(super) async fn transition(
    txn: &DatabaseTransaction,
    now: Timestamp,
    plan: &TaskPlan,
    row: &subtasks::Model,
    input: Step<'_>,
    lease: Option<&Lease<'_>>,
    events: &mut Vec<(i64, Event)>,
) -> Result<Outcome> {
    let respects_lease = input.respects_lease();
    if let Some(lease) = lease
        && respects_lease
        && leased_elsewhere(row, lease.owner, now.as_millis())
    {
        return Ok(Outcome::Unchanged);
    }
    let mut machine = Machine::load(&plan.plan, row.machine.as_deref())
        .map_err(|e| Error::Internal(format!("subtask {}: stored machine: {e}", row.id)))?;
    let before = machine.clone();
    let effects = machine.handle(now, &plan.plan, input);
    if machine == before && effects.is_empty() {
        return Ok(Outcome::Unchanged);
    }
    let status = machine.status();
    let old_status = SubtaskStatus::parse(&row.status)?;
    let step = machine.step();
    let progress = i32::from(machine.progress());
    let failure = machine.failure();
    let visible_change = status != old_status || step != row.step || progress != row.progress;
    let at = now.as_millis();
    let json = serde_json::to_string(&machine).map_err(|e| Error::Internal(e.to_string()))?;
    let written = subtasks::Model {
        status: status.as_str().to_owned(),
        step: step.to_owned(),
        progress,
        attempts: i32::from(machine.attempts()),
        deadline_at: machine.poll_timeout().map(Timestamp::as_millis),
        source_version: machine.source_version().map(str::to_owned),
        error_code: failure.as_ref().map(|f| f.code.clone()),
        error_msg: failure.as_ref().map(|f| f.message.clone()),
        machine: Some(json),
        updated_at: at,
        started_at: if row.started_at.is_none() && before.is_pending() {
            Some(at)
        } else {
            row.started_at
        },
        finished_at: machine.is_final().then_some(at),
        lease_owner: lease.map_or_else(|| row.lease_owner.clone(), |l| Some(l.owner.to_owned())),
        lease_until: lease.map_or(row.lease_until, |l| Some(l.until)),
        ..row.clone()
    };
    // Compare-and-set: written only if the row is still the one the machine was run on.
    let same_machine = match &row.machine {
        Some(json) => subtasks::Column::Machine.eq(json.clone()),
        None => subtasks::Column::Machine.is_null(),
    };
    let mut update = subtasks::Entity::update_many();
    if let Some(lease) = lease {
        update = update
            .col_expr(subtasks::Column::LeaseOwner, Expr::value(lease.owner))
            .col_expr(subtasks::Column::LeaseUntil, Expr::value(lease.until));
        if respects_lease {
            update = update.filter(
                sea_orm::Condition::any()
                    .add(subtasks::Column::LeaseOwner.is_null())
                    .add(subtasks::Column::LeaseOwner.eq(lease.owner))
                    .add(subtasks::Column::LeaseUntil.lt(at)),
            );
        }
    }
    let result = update
        .col_expr(
            subtasks::Column::Status,
            Expr::value(written.status.clone()),
        )
        .col_expr(subtasks::Column::Step, Expr::value(written.step.clone()))
        .col_expr(subtasks::Column::Progress, Expr::value(written.progress))
        .col_expr(subtasks::Column::Attempts, Expr::value(written.attempts))
        .col_expr(
            subtasks::Column::DeadlineAt,
            Expr::value(written.deadline_at),
        )
        .col_expr(
            subtasks::Column::SourceVersion,
            Expr::value(written.source_version.clone()),
        )
        .col_expr(
            subtasks::Column::ErrorCode,
            Expr::value(written.error_code.clone()),
        )
        .col_expr(
            subtasks::Column::ErrorMsg,
            Expr::value(written.error_msg.clone()),
        )
        .col_expr(
            subtasks::Column::Machine,
            Expr::value(written.machine.clone()),
        )
        .col_expr(subtasks::Column::UpdatedAt, Expr::value(at))
        .col_expr(subtasks::Column::StartedAt, Expr::value(written.started_at))
        .col_expr(
            subtasks::Column::FinishedAt,
            Expr::value(written.finished_at),
        )
        .filter(subtasks::Column::Id.eq(row.id))
        .filter(subtasks::Column::Status.eq(row.status.clone()))
        .filter(same_machine)
        .exec(txn)
        .await?;
    if result.rows_affected == 0 {
        return Ok(Outcome::Stale);
    }
    if status != old_status {
        // Exact: the compare-and-set above proves the row was in `old_status`.
        tasks::Entity::update_many()
            .col_expr(counter(old_status), Expr::col(counter(old_status)).sub(1))
            .col_expr(counter(status), Expr::col(counter(status)).add(1))
            .filter(tasks::Column::Id.eq(&row.task_id))
            .exec(txn)
            .await?;
    }
    if status == SubtaskStatus::Success && old_status != SubtaskStatus::Success {
        // The device now runs the package's version (it said so, or it already did).
        let column = match plan.kind {
            PackageType::Software => devices::Column::SwVersion,
            PackageType::Firmware => devices::Column::FwVersion,
        };
        devices::Entity::update_many()
            .col_expr(column, Expr::value(plan.plan.target().to_owned()))
            .filter(devices::Column::Id.eq(&row.device_id))
            .exec(txn)
            .await?;
    }
    if visible_change {
        let detail = failure
            .as_ref()
            .map(|f| f.message.clone())
            .unwrap_or_default();
        subtask_steps::ActiveModel {
            subtask_id: Set(row.id),
            at: Set(at),
            step: Set(step.to_owned()),
            status: Set(status.as_str().to_owned()),
            progress: Set(progress),
            detail: Set(detail),
            ..Default::default()
        }
        .insert(txn)
        .await?;
        let event = Event::Subtask {
            project_id: plan.project_id.clone(),
            task_id: row.task_id.clone(),
            device_id: row.device_id.clone(),
            status: status.as_str().to_owned(),
            step: step.to_owned(),
            progress,
            attempts: i32::from(machine.attempts()),
            error_code: failure.as_ref().map(|f| f.code.clone()),
            error_msg: failure.as_ref().map(|f| f.message.clone()),
            at,
        };
        let id = write_outbox(txn, &event, at).await?;
        events.push((id, event));
    }
    if status != old_status {
        // Failures are worth an operator's eye; the rest of a large fleet's progress is debug noise.
        let error = failure.as_ref().map(|f| f.message.as_str());
        // The request that created the task, so that its effects can be found from the API call.
        let request_id = plan.request_id.as_deref();
        if status == SubtaskStatus::Fail {
            tracing::info!(
                task_id = %row.task_id, device_id = %row.device_id, request_id, error,
                "subtask failed"
            );
        } else {
            tracing::debug!(
                task_id = %row.task_id, device_id = %row.device_id, request_id,
                from = old_status.as_str(), to = status.as_str(), step, error,
                "subtask status"
            );
        }
    }
    Ok(Outcome::Changed(Box::new(Changed {
        row: written,
        status_changed: status != old_status,
        before: (old_status, row.step.clone()),
        effects,
    })))
}

/// The task counter column of a subtask status.
const fn counter(status: SubtaskStatus) -> tasks::Column {
    match status {
        SubtaskStatus::Waiting => tasks::Column::Waitting,
        SubtaskStatus::Processing => tasks::Column::Processing,
        SubtaskStatus::Success => tasks::Column::Success,
        SubtaskStatus::Fail => tasks::Column::Fail,
        SubtaskStatus::FailWaitRetry => tasks::Column::FailWaitRetry,
        SubtaskStatus::Stopped => tasks::Column::Stopped,
        SubtaskStatus::Removed => tasks::Column::Removed,
    }
}

/// Counts a task's subtasks by status and stores the counters (after a crash, they are checked once).
pub(super) async fn recount(txn: &DatabaseTransaction, task_id: &str) -> Result<TaskProgress> {
    // The task's row first: transitions of other instances move its counters under the same row lock,
    // so none commits between the count and the write (and none counted is counted twice).
    tasks::Entity::update_many()
        .col_expr(
            tasks::Column::UpdatedAt,
            Expr::col(tasks::Column::UpdatedAt),
        )
        .filter(tasks::Column::Id.eq(task_id))
        .exec(txn)
        .await?;
    let counts: Vec<(String, i64)> = subtasks::Entity::find()
        .select_only()
        .column(subtasks::Column::Status)
        .column_as(subtasks::Column::Id.count(), "n")
        .filter(subtasks::Column::TaskId.eq(task_id))
        .group_by(subtasks::Column::Status)
        .into_tuple()
        .all(txn)
        .await?;
    let mut progress = TaskProgress::default();
    for (status, n) in counts {
        progress.add(
            SubtaskStatus::parse(&status)?,
            u64::try_from(n).unwrap_or(0),
        );
    }
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    tasks::ActiveModel {
        id: Set(task_id.to_owned()),
        total: Set(n(progress.total)),
        waitting: Set(n(progress.waitting)),
        processing: Set(n(progress.processing)),
        success: Set(n(progress.success)),
        fail: Set(n(progress.fail)),
        fail_wait_retry: Set(n(progress.fail_wait_retry)),
        stopped: Set(n(progress.stopped)),
        removed: Set(n(progress.removed)),
        ..Default::default()
    }
    .update(txn)
    .await?;
    Ok(progress)
}

/// Re-derives a started task's status from its counters and records a change (inside `txn`).
pub(super) async fn refresh_task(
    txn: &DatabaseTransaction,
    task_id: &str,
    now: Timestamp,
    events: &mut Vec<(i64, Event)>,
) -> Result<()> {
    let at = now.as_millis();
    // Write first (see `Driver::apply`), then read the counters this transaction sees.
    tasks::Entity::update_many()
        .col_expr(tasks::Column::UpdatedAt, Expr::value(at))
        .filter(tasks::Column::Id.eq(task_id))
        .exec(txn)
        .await?;
    let Some(task) = tasks::Entity::find_by_id(task_id.to_owned())
        .one(txn)
        .await?
    else {
        return Ok(());
    };
    let current = TaskStatus::parse(&task.status)?;
    if matches!(current, TaskStatus::Initializing | TaskStatus::Waiting) {
        return Ok(());
    }
    let progress = task.progress();
    let mut update = tasks::ActiveModel {
        id: Set(task.id.clone()),
        updated_at: Set(at),
        ..Default::default()
    };
    let stop_requested = matches!(current, TaskStatus::Stopping | TaskStatus::Stopped);
    let status = match progress.derived_status(stop_requested) {
        // Paused by its rollout: it stays so (with its reason) while devices remain.
        TaskStatus::Processing if current == TaskStatus::Paused => TaskStatus::Paused,
        derived => derived,
    };
    let status_desc = if status == TaskStatus::Paused {
        task.status_desc.clone()
    } else {
        status.describe(&progress)
    };
    update.status_desc = Set(status_desc.clone());
    if status != current {
        update.status = Set(status.as_str().to_owned());
        update.finished_at = Set(status.is_completed().then_some(at));
        tracing::info!(
            task_id,
            from = current.as_str(),
            to = status.as_str(),
            "task status"
        );
    }
    update.update(txn).await?;
    let event = Event::Task {
        project_id: task.project_id,
        task_id: task.id,
        status: status.as_str().to_owned(),
        task_progress: progress,
        status_desc,
        app_id: task.app_id,
        task_type: task.task_type,
        at,
    };
    let id = write_outbox(txn, &event, at).await?;
    events.push((id, event));
    Ok(())
}

/// Writes `event`'s outbox record; returns its id.
pub(super) async fn write_outbox<C: ConnectionTrait>(
    db: &C,
    event: &Event,
    at: i64,
) -> Result<i64> {
    let row = outbox::ActiveModel {
        project_id: Set(event.project_id().to_owned()),
        kind: Set(event.kind().to_owned()),
        aggregate_id: Set(event.aggregate_id()),
        payload: Set(serde_json::to_string(event).map_err(|e| Error::Internal(e.to_string()))?),
        created_at: Set(at),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(row.id)
}
