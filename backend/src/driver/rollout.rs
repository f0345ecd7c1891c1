//! Safe rollouts in the driver (README, "Safe rollouts"). `domain::rollout` decides; this file counts
//! what the database holds, stores the decision and begins the devices it allows.
//!
//! - When a task with a rollout starts, its targets are assigned to waves once (`subtasks.wave`, from
//!   the stored seed) and nothing begins but what [`Driver::release`] allows.
//! - [`Driver::release`] runs when the task's subtasks finish (`apply` kicks the loop), when `tasks.rollout_wake_at` passes (a soak ends, the pace allows more, a window opens), and
//!   on every pass of the loop for the tasks this instance owns (so a restart, or a device finishing on
//!   another instance, is picked up within a second). It is serialised in this process by a lock, and
//!   only the instance that claimed the task runs it.
//! - A pause moves the task to `Paused` with the reason as its `status_desc` (a `task.changed` record
//!   in the outbox notifies subscribers and the console); devices in flight go on and finish.

use std::collections::HashMap;

use domain::Timestamp;
use domain::rollout::waves::{Target, assign};
use domain::rollout::{Rollout, RolloutState, Starts, WaveCounts, WaveSize};
use domain::task::{SubtaskStatus, TaskStatus};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::transition::write_outbox;
use super::{BATCH, Driver, Event, Step};
use crate::storage::entity::{device_group_members, subtasks, tasks};
use crate::{Context, Error, Result};

/// A task's stored policy.
fn policy(task: &tasks::Model) -> Result<Option<Rollout>> {
    task.rollout
        .as_deref()
        .map(|r| serde_json::from_str(r).map_err(|e| Error::Internal(format!("rollout: {e}"))))
        .transpose()
}

/// A task's stored rollout state (the default before it started).
fn stored_state(task: &tasks::Model) -> RolloutState {
    task.rollout_state
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A task's rollout as the API and the console show it: the policy, where it stands, and each wave's
/// devices.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RolloutView {
    /// The policy, completed (the last wave, the seed).
    pub policy: Rollout,
    /// The latest wave allowed to start (0-based), the pause and its reason, the last resume.
    pub state: RolloutState,
    /// Each wave's devices: `total`, `pending` (not started), `in_flight`, `succeeded`, `failed`.
    pub waves: Vec<WaveCounts>,
}

impl Driver {
    /// The task's rollout, if it has one.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn rollout_view(
        &self,
        state: &Context,
        task: &tasks::Model,
    ) -> Result<Option<RolloutView>> {
        let Some(policy) = policy(task)? else {
            return Ok(None);
        };
        let rollout_state = stored_state(task);
        let waves = wave_counts(state, &task.id, policy.waves.len(), &rollout_state).await?;
        Ok(Some(RolloutView {
            policy,
            state: rollout_state,
            waves,
        }))
    }

    /// Starts a task with a rollout: assigns its targets to waves (once: a restart finds them
    /// assigned), then begins what the rollout allows.
    pub(super) async fn start_rollout(
        &self,
        state: &Context,
        task: &tasks::Model,
        rollout: &Rollout,
    ) -> Result<()> {
        if task.rollout_state.is_none() {
            let rows: Vec<(i64, String)> = subtasks::Entity::find()
                .select_only()
                .column(subtasks::Column::Id)
                .column(subtasks::Column::DeviceId)
                .filter(subtasks::Column::TaskId.eq(task.id.as_str()))
                .order_by_asc(subtasks::Column::Id)
                .into_tuple()
                .all(&state.db)
                .await?;
            let groups: Vec<String> = rollout
                .waves
                .iter()
                .filter_map(|w| match &w.size {
                    WaveSize::Groups(g) => Some(g.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            let mut member_of: HashMap<String, Vec<String>> = HashMap::new();
            if !groups.is_empty() {
                let members: Vec<(String, String)> = device_group_members::Entity::find()
                    .select_only()
                    .column(device_group_members::Column::DeviceId)
                    .column(device_group_members::Column::GroupId)
                    .filter(device_group_members::Column::GroupId.is_in(groups))
                    .into_tuple()
                    .all(&state.db)
                    .await?;
                for (device, group) in members {
                    member_of.entry(device).or_default().push(group);
                }
            }
            let targets: Vec<Target> = rows
                .iter()
                .map(|(_, device_id)| Target {
                    device_id: device_id.clone(),
                    group_ids: member_of.remove(device_id).unwrap_or_default(),
                })
                .collect();
            let waves = assign(&rollout.waves, rollout.seed(), &targets);
            let mut by_wave: HashMap<usize, Vec<i64>> = HashMap::new();
            for ((id, _), wave) in rows.iter().zip(waves) {
                if wave > 0 {
                    by_wave.entry(wave).or_default().push(*id);
                }
            }
            // The waves and the state that says they are assigned commit together.
            let txn = crate::db::begin_write(&state.db).await?;
            for (wave, ids) in by_wave {
                for chunk in ids.chunks(BATCH as usize) {
                    subtasks::Entity::update_many()
                        .col_expr(
                            subtasks::Column::Wave,
                            Expr::value(i32::try_from(wave).unwrap_or(i32::MAX)),
                        )
                        .filter(subtasks::Column::Id.is_in(chunk.to_vec()))
                        .exec(&txn)
                        .await?;
                }
            }
            tasks::Entity::update_many()
                .col_expr(
                    tasks::Column::RolloutState,
                    Expr::value(to_json(&RolloutState::default())),
                )
                .filter(tasks::Column::Id.eq(task.id.as_str()))
                .exec(&txn)
                .await?;
            txn.commit().await?;
        }
        self.release(state, &task.id).await
    }

    /// Decides for every running rollout this instance owns (the loop runs this on every pass: when a
    /// rollout task's subtasks moved it is kicked, and it wakes at the earliest wake time it returns).
    pub(super) async fn release_due(&self, state: &Context) -> Result<Option<Timestamp>> {
        let mut owned = tasks::Entity::find()
            .select_only()
            .column(tasks::Column::Id)
            .filter(tasks::Column::Rollout.is_not_null())
            .filter(tasks::Column::Status.eq(TaskStatus::Processing.as_str()));
        if state.clustered() {
            owned = owned.filter(tasks::Column::ClaimedBy.eq(state.instance_id()));
        }
        let ids: Vec<String> = owned.into_tuple().all(&state.db).await?;
        for task_id in ids {
            if let Err(e) = self.release(state, &task_id).await {
                tracing::warn!(task_id, error.message = %e, "rollout: deciding failed");
                if e.is_internal() {
                    return Err(e);
                }
            }
        }
        let next: Option<i64> = tasks::Entity::find()
            .select_only()
            .column_as(tasks::Column::RolloutWakeAt.min(), "m")
            .filter(tasks::Column::Status.eq(TaskStatus::Processing.as_str()))
            .into_tuple::<Option<i64>>()
            .one(&state.db)
            .await?
            .flatten();
        Ok(next.map(Timestamp::from_millis))
    }

    /// Asks the task's rollout what may happen now; stores its state, pauses the task when it says so,
    /// and begins the devices it allows (earliest wave first).
    ///
    /// # Errors
    /// [`Error::Db`].
    pub(crate) async fn release(&self, state: &Context, task_id: &str) -> Result<()> {
        let _one = self.inner.rollout_lock.lock().await;
        let Some(task) = tasks::Entity::find_by_id(task_id.to_owned())
            .one(&state.db)
            .await?
        else {
            return Ok(());
        };
        let Some(rollout) = policy(&task)? else {
            return Ok(());
        };
        if task.status != TaskStatus::Processing.as_str() || task.rollout_state.is_none() {
            return Ok(());
        }
        let before = stored_state(&task);
        let now = state.clock.now();
        let counts = wave_counts(state, task_id, rollout.waves.len(), &before).await?;
        let starts = recent_starts(state, task_id, now).await?;
        let decision = rollout.decide(&before, &counts, &starts, now);
        let wake_at = decision.wake_at.map(Timestamp::as_millis);
        if decision.state == before && wake_at == task.rollout_wake_at && decision.start == 0 {
            // Nothing to store, nothing to start (the common case on the loop's regular pass).
            return Ok(());
        }
        let pause_desc = decision
            .paused
            .as_ref()
            .map(|p| format!("paused: {}", p.reason))
            .unwrap_or_default();
        let mut update = tasks::Entity::update_many()
            .col_expr(
                tasks::Column::RolloutState,
                Expr::value(to_json(&decision.state)),
            )
            .col_expr(tasks::Column::RolloutWakeAt, Expr::value(wake_at))
            .filter(tasks::Column::Id.eq(task_id))
            .filter(tasks::Column::Status.eq(TaskStatus::Processing.as_str()));
        let mut events = Vec::new();
        let txn = crate::db::begin_write(&state.db).await?;
        if decision.paused.is_some() {
            update = update
                .col_expr(
                    tasks::Column::Status,
                    Expr::value(TaskStatus::Paused.as_str()),
                )
                .col_expr(tasks::Column::StatusDesc, Expr::value(pause_desc.clone()))
                .col_expr(tasks::Column::UpdatedAt, Expr::value(now.as_millis()));
        }
        let written = update.exec(&txn).await?.rows_affected;
        if written == 1 && decision.paused.is_some() {
            let event = task_event(&task, TaskStatus::Paused, pause_desc, now);
            events.push((write_outbox(&txn, &event, now.as_millis()).await?, event));
        }
        self.own_records(&events);
        txn.commit().await?;
        self.publish_events(events);
        if written == 0 {
            // Stopped or paused meanwhile.
            return Ok(());
        }
        if let Some(pause) = &decision.paused {
            tracing::warn!(
                task_id,
                request_id = task.request_id,
                reason = pause.reason,
                "task paused"
            );
        }
        if decision.state.wave != before.wave {
            tracing::info!(
                task_id,
                wave = decision.state.wave + 1,
                "rollout: next wave"
            );
        }
        let mut left = u64::from(decision.start);
        while left > 0 {
            let ids: Vec<i64> = subtasks::Entity::find()
                .select_only()
                .column(subtasks::Column::Id)
                .filter(subtasks::Column::TaskId.eq(task_id))
                .filter(subtasks::Column::Step.eq("pending"))
                .filter(
                    subtasks::Column::Wave
                        .lte(i32::try_from(decision.state.wave).unwrap_or(i32::MAX)),
                )
                .order_by_asc(subtasks::Column::Wave)
                .order_by_asc(subtasks::Column::Id)
                .limit(left.min(BATCH))
                .into_tuple()
                .all(&state.db)
                .await?;
            if ids.is_empty() {
                break;
            }
            left = left.saturating_sub(ids.len() as u64);
            self.apply(state, ids, Step::Begin { online: false })
                .await?;
        }
        Ok(())
    }

    /// Resumes a paused task: failures before now stop counting, a wave that finished below its
    /// threshold is accepted, and the rollout goes on.
    ///
    /// # Errors
    /// [`Error::Conflict`] when the task is not paused; [`Error::Db`].
    pub(crate) async fn resume(&self, state: &Context, task_id: &str) -> Result<()> {
        {
            let _one = self.inner.rollout_lock.lock().await;
            let task = tasks::Entity::find_by_id(task_id.to_owned())
                .one(&state.db)
                .await?
                .ok_or_else(|| Error::not_found("task", task_id))?;
            if task.status != TaskStatus::Paused.as_str() {
                return Err(Error::Conflict(format!(
                    "task {task_id} is {}, not Paused: only a paused task resumes",
                    task.status
                )));
            }
            let rollout = policy(&task)?.ok_or_else(|| {
                Error::Internal(format!("task {task_id} is paused without a rollout"))
            })?;
            let before = stored_state(&task);
            let now = state.clock.now();
            let counts = wave_counts(state, task_id, rollout.waves.len(), &before).await?;
            let after = rollout.resume(&before, &counts, now);
            let progress = task.progress();
            let txn = crate::db::begin_write(&state.db).await?;
            let written = tasks::Entity::update_many()
                .col_expr(
                    tasks::Column::Status,
                    Expr::value(TaskStatus::Processing.as_str()),
                )
                .col_expr(
                    tasks::Column::StatusDesc,
                    Expr::value(TaskStatus::Processing.describe(&progress)),
                )
                .col_expr(tasks::Column::RolloutState, Expr::value(to_json(&after)))
                .col_expr(tasks::Column::RolloutWakeAt, Expr::value(None::<i64>))
                .col_expr(tasks::Column::UpdatedAt, Expr::value(now.as_millis()))
                .filter(tasks::Column::Id.eq(task_id))
                .filter(tasks::Column::Status.eq(TaskStatus::Paused.as_str()))
                .exec(&txn)
                .await?
                .rows_affected;
            let mut events = Vec::new();
            if written == 1 {
                let desc = TaskStatus::Processing.describe(&progress);
                let event = task_event(&task, TaskStatus::Processing, desc, now);
                events.push((write_outbox(&txn, &event, now.as_millis()).await?, event));
            }
            self.own_records(&events);
            txn.commit().await?;
            self.publish_events(events);
            tracing::info!(task_id, wave = after.wave + 1, "task resumed");
        }
        self.release(state, task_id).await?;
        // Everything may have finished while it was paused.
        self.refresh(state, task_id).await
    }
}

/// The `task.changed` record of a pause or a resume.
fn task_event(
    task: &tasks::Model,
    status: TaskStatus,
    status_desc: String,
    now: Timestamp,
) -> Event {
    Event::Task {
        project_id: task.project_id.clone(),
        task_id: task.id.clone(),
        status: status.as_str().to_owned(),
        task_progress: task.progress(),
        status_desc,
        app_id: task.app_id.clone(),
        task_type: task.task_type.clone(),
        at: now.as_millis(),
    }
}

/// Each wave's devices: totals and states, and what finished since the rollout's last resume.
async fn wave_counts(
    state: &Context,
    task_id: &str,
    waves: usize,
    rollout: &RolloutState,
) -> Result<Vec<WaveCounts>> {
    let mut counts = vec![WaveCounts::default(); waves];
    let rows: Vec<(i32, String, String, i64)> = subtasks::Entity::find()
        .select_only()
        .column(subtasks::Column::Wave)
        .column(subtasks::Column::Status)
        .column(subtasks::Column::Step)
        .column_as(subtasks::Column::Id.count(), "n")
        .filter(subtasks::Column::TaskId.eq(task_id))
        .group_by(subtasks::Column::Wave)
        .group_by(subtasks::Column::Status)
        .group_by(subtasks::Column::Step)
        .into_tuple()
        .all(&state.db)
        .await?;
    let n32 = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
    for (wave, status, step, n) in rows {
        let Some(c) = usize::try_from(wave).ok().and_then(|w| counts.get_mut(w)) else {
            continue;
        };
        let n = n32(n);
        c.total += n;
        match SubtaskStatus::parse(&status) {
            _ if step == "pending" || step == super::UNCONFIRMED => c.pending += n,
            Ok(SubtaskStatus::Success) => c.succeeded += n,
            Ok(SubtaskStatus::Fail) => c.failed += n,
            Ok(
                SubtaskStatus::Waiting | SubtaskStatus::Processing | SubtaskStatus::FailWaitRetry,
            ) => {
                c.in_flight += n;
            }
            // Stopped or removed: finished, neither a success nor a failure.
            _ => {}
        }
    }
    // Finished after the resume (the resume's own instant belongs to before it).
    let since = rollout.resumed_at.map_or(-1, Timestamp::as_millis);
    let finished: Vec<(i32, String, Option<String>, i64)> = subtasks::Entity::find()
        .select_only()
        .column(subtasks::Column::Wave)
        .column(subtasks::Column::Status)
        .column(subtasks::Column::ErrorCode)
        .column_as(subtasks::Column::Id.count(), "n")
        .filter(subtasks::Column::TaskId.eq(task_id))
        .filter(subtasks::Column::FinishedAt.gt(since))
        .group_by(subtasks::Column::Wave)
        .group_by(subtasks::Column::Status)
        .group_by(subtasks::Column::ErrorCode)
        .into_tuple()
        .all(&state.db)
        .await?;
    for (wave, status, error_code, n) in finished {
        let Some(c) = usize::try_from(wave).ok().and_then(|w| counts.get_mut(w)) else {
            continue;
        };
        let failed = status == SubtaskStatus::Fail.as_str();
        c.recent.add(
            if failed {
                error_code.as_deref().or(Some(""))
            } else {
                None
            },
            n32(n),
        );
    }
    Ok(counts)
}

/// The task's devices begun in the last minute, for `max_per_minute`.
async fn recent_starts(state: &Context, task_id: &str, now: Timestamp) -> Result<Starts> {
    let (n, oldest): (i64, Option<i64>) = subtasks::Entity::find()
        .select_only()
        .column_as(subtasks::Column::Id.count(), "n")
        .column_as(subtasks::Column::StartedAt.min(), "oldest")
        .filter(subtasks::Column::TaskId.eq(task_id))
        .filter(subtasks::Column::StartedAt.gt(now.as_millis() - 60_000))
        .into_tuple()
        .one(&state.db)
        .await?
        .unwrap_or((0, None));
    Ok(Starts {
        last_minute: u32::try_from(n).unwrap_or(u32::MAX),
        oldest: oldest.map(Timestamp::from_millis),
    })
}
