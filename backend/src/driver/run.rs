//! The driver's loop: deadlines and schedules. [`Driver::run`] wakes when the earliest subtask deadline or
//! task schedule passes (or at least every [`MAX_IDLE`], or when kicked), starts the tasks that are due,
//! fires the passed deadlines in batches, and publishes messages other processes queued for devices.

use std::time::Duration;

use domain::Timestamp;
use domain::task::TaskStatus;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::{BATCH, Driver, Step};
use crate::storage::entity::{device_messages, subtasks, tasks};
use crate::{Context, Result};

/// Queued device messages older than this are dropped instead of published.
const QUEUED_MAX_AGE_MS: i64 = 3 * 60 * 1000;

/// How long [`Driver::run`] waits at most between looks at the clock. Deadlines are found by query, so
/// this bounds how late a deadline is noticed (and how soon a manual clock's jump is seen without a kick).
const MAX_IDLE: Duration = Duration::from_secs(1);

impl Driver {
    /// Runs deadlines as they pass until `stop` is cancelled.
    pub async fn run(&self, state: Context, stop: tokio_util::sync::CancellationToken) {
        self.inner
            .running
            .store(true, std::sync::atomic::Ordering::Relaxed);
        loop {
            let wait = match self.run_due(&state).await {
                Ok(next) => next
                    .map(|t| t.since(state.clock.now()))
                    .map_or(MAX_IDLE, |d| d.min(MAX_IDLE)),
                Err(e) => {
                    tracing::warn!(error.message = %e, "task driver: running deadlines failed");
                    MAX_IDLE
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Starts scheduled tasks whose time has come and fires every passed subtask deadline. Returns the next
    /// deadline, if any.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn run_due(&self, state: &Context) -> Result<Option<Timestamp>> {
        while self.drain_queued(state).await? == BATCH as usize {}
        self.sweep_slots(state).await?;
        let now = state.clock.now();
        let scheduled: Vec<String> = tasks::Entity::find()
            .select_only()
            .column(tasks::Column::Id)
            .filter(tasks::Column::Status.eq(TaskStatus::Waiting.as_str()))
            .filter(
                sea_orm::Condition::any()
                    .add(tasks::Column::ScheduleTime.lte(now.as_millis()))
                    // Created by a process that does not run tasks: due at once.
                    .add(tasks::Column::ScheduleTime.is_null()),
            )
            .into_tuple()
            .all(&state.db)
            .await?;
        for task_id in scheduled {
            // A group target is resolved now, at the task's start. One task that cannot start must not
            // hold up every other deadline.
            if let Err(e) = self.start(state, &task_id, true).await {
                tracing::warn!(task_id, error.message = %e, "task driver: starting a scheduled task failed");
                if e.is_internal() {
                    return Err(e);
                }
            }
        }
        loop {
            let due = subtasks::Entity::find()
                .select_only()
                .column(subtasks::Column::Id)
                .filter(subtasks::Column::DeadlineAt.lte(now.as_millis()))
                .order_by_asc(subtasks::Column::DeadlineAt)
                .limit(BATCH)
                .into_tuple::<i64>()
                .all(&state.db)
                .await?;
            let n = due.len() as u64;
            self.apply(state, due, Step::Timer).await?;
            if n < BATCH {
                break;
            }
        }
        let next_deadline: Option<i64> = subtasks::Entity::find()
            .select_only()
            .column_as(subtasks::Column::DeadlineAt.min(), "m")
            .into_tuple::<Option<i64>>()
            .one(&state.db)
            .await?
            .flatten();
        let next_schedule: Option<i64> = tasks::Entity::find()
            .select_only()
            .column_as(tasks::Column::ScheduleTime.min(), "m")
            .filter(tasks::Column::Status.eq(TaskStatus::Waiting.as_str()))
            .into_tuple::<Option<i64>>()
            .one(&state.db)
            .await?
            .flatten();
        Ok(next_deadline
            .into_iter()
            .chain(next_schedule)
            .min()
            .map(Timestamp::from_millis))
    }

    /// Publishes messages other processes queued for devices (oldest first), when this process serves
    /// MQTT. Returns how many were sent.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn drain_queued(&self, state: &Context) -> Result<usize> {
        let Some(downlink) = self.downlink() else {
            return Ok(0);
        };
        let rows = device_messages::Entity::find()
            .order_by_asc(device_messages::Column::Id)
            .limit(BATCH)
            .all(&state.db)
            .await?;
        let Some(last) = rows.last().map(|r| r.id) else {
            return Ok(0);
        };
        device_messages::Entity::delete_many()
            .filter(device_messages::Column::Id.lte(last))
            .exec(&state.db)
            .await?;
        let n = rows.len();
        // A message that waited longer than a version query may (no MQTT process was running) is stale:
        // its subtask has moved on, and the device will be asked again.
        let oldest = state.clock.now().as_millis() - QUEUED_MAX_AGE_MS;
        for m in rows {
            if m.created_at >= oldest {
                downlink.publish(&m.device_id, m.payload);
            } else {
                tracing::debug!(device_id = %m.device_id, "dropping a stale queued message");
            }
        }
        Ok(n)
    }
}
