//! The driver's loop: deadlines and schedules. [`Driver::run`] wakes when the earliest subtask deadline or
//! task schedule passes (or at least every [`MAX_IDLE`], or when kicked), starts the tasks that are due,
//! fires the passed deadlines in batches, and publishes messages other processes queued for devices.

use std::time::Duration;

use domain::Timestamp;
use domain::task::TaskStatus;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Statement,
};

use super::{BATCH, Driver, Step};
use crate::storage::entity::{subtasks, tasks};
use crate::{Context, Result};

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
        if self.reconcile_due() {
            self.reconcile_slots(state).await?;
        }
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
            let due = if state.clustered() {
                claim_due(state, now).await?
            } else {
                subtasks::Entity::find()
                    .select_only()
                    .column(subtasks::Column::Id)
                    .filter(subtasks::Column::DeadlineAt.lte(now.as_millis()))
                    .order_by_asc(subtasks::Column::DeadlineAt)
                    .limit(BATCH)
                    .into_tuple::<i64>()
                    .all(&state.db)
                    .await?
            };
            let n = due.len() as u64;
            self.apply(state, due, Step::Timer).await?;
            if n < BATCH {
                break;
            }
        }
        let mut next_deadline = subtasks::Entity::find()
            .select_only()
            .column_as(subtasks::Column::DeadlineAt.min(), "m");
        if state.clustered() {
            // Deadlines under another instance's lease are its own; when it dies, the lease expires
            // and the loop's regular look (at least every `MAX_IDLE`) sees them.
            next_deadline = next_deadline.filter(claimable(state, now));
        }
        let next_deadline: Option<i64> = next_deadline
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
        let next_rollout = self.release_due(state).await?.map(Timestamp::as_millis);
        Ok(next_deadline
            .into_iter()
            .chain(next_schedule)
            .chain(next_rollout)
            .min()
            .map(Timestamp::from_millis))
    }
}

/// Subtasks this instance may take: under no lease, its own, or an expired one.
fn claimable(state: &Context, now: Timestamp) -> sea_orm::Condition {
    sea_orm::Condition::any()
        .add(subtasks::Column::LeaseOwner.is_null())
        .add(subtasks::Column::LeaseOwner.eq(state.instance_id()))
        .add(subtasks::Column::LeaseUntil.lt(now.as_millis()))
}

/// Takes the lease of (at most [`BATCH`]) subtasks whose deadline passed and that this instance may take,
/// oldest deadline first, skipping rows another instance is claiming or writing right now; returns them.
async fn claim_due(state: &Context, now: Timestamp) -> Result<Vec<i64>> {
    let lease = i64::try_from(state.settings.cluster.lease.as_millis()).unwrap_or(i64::MAX / 4);
    let rows = state
        .db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE subtasks SET lease_owner = $1, lease_until = $2 WHERE id IN (\
               SELECT id FROM subtasks WHERE deadline_at <= $3 \
                 AND (lease_owner IS NULL OR lease_owner = $1 OR lease_until < $3) \
               ORDER BY deadline_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING id",
            [
                state.instance_id().into(),
                (now.as_millis() + lease).into(),
                now.as_millis().into(),
                (BATCH as i64).into(),
            ],
        ))
        .await?;
    rows.iter()
        .map(|r| r.try_get::<i64>("", "id").map_err(Into::into))
        .collect()
}
