//! Start-up recovery: the stored rows are the state, so little is needed. Running tasks' counters are
//! counted again, tasks a dead process was starting or stopping are carried through, and the LwM2M
//! download slots are rebuilt from the subtasks.

use domain::task::{SubtaskStatus, TaskStatus};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect};

use super::transition::recount;
use super::{Driver, SegmentSource, segment_source};
use crate::storage::entity::{instances, subtasks, tasks};
use crate::{Context, Result};

impl Driver {
    /// After a restart: running tasks' counters are counted again, and tasks a dead process was starting
    /// are started again. A task left `Initializing` by this process's earlier run (or by an instance
    /// no longer recorded) goes back to `Waitting` (the loop starts it when due; its group is resolved
    /// if that never committed); a `Processing` task with subtasks that never started gets them started. Transitions
    /// are compare-and-set, so work another live instance did is not done twice.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn recover(&self, state: &Context) -> Result<()> {
        // Counters are adjusted per transition; a running task's are counted afresh once at start-up.
        let running: Vec<String> = tasks::Entity::find()
            .select_only()
            .column(tasks::Column::Id)
            .filter(tasks::Column::Status.is_in([
                TaskStatus::Processing.as_str(),
                TaskStatus::Stopping.as_str(),
            ]))
            .into_tuple()
            .all(&state.db)
            .await?;
        for task_id in &running {
            let _w = self.inner.write.lock().await;
            let txn = crate::db::begin_write(&state.db).await?;
            recount(&txn, task_id).await?;
            txn.commit().await?;
        }
        // Tasks this process (an earlier run under the same id) or a vanished instance was starting; a
        // live instance's are left to it, a dead one's are requeued when it is reaped.
        let requeued = tasks::Entity::update_many()
            .col_expr(
                tasks::Column::Status,
                Expr::value(TaskStatus::Waiting.as_str()),
            )
            .filter(tasks::Column::Status.eq(TaskStatus::Initializing.as_str()))
            .filter(
                Condition::any()
                    .add(tasks::Column::ClaimedBy.is_null())
                    .add(tasks::Column::ClaimedBy.eq(state.instance_id()))
                    .add(
                        tasks::Column::ClaimedBy.not_in_subquery(
                            sea_orm::sea_query::Query::select()
                                .column(instances::Column::Id)
                                .from(instances::Entity)
                                .to_owned(),
                        ),
                    ),
            )
            .exec(&state.db)
            .await?
            .rows_affected;
        let half_started = self.resume_starts(state).await?;
        // Stops cut short by a crash (the task was marked `Stopping`, some subtasks were not yet stopped).
        let stopping: Vec<String> = tasks::Entity::find()
            .select_only()
            .column(tasks::Column::Id)
            .filter(tasks::Column::Status.eq(TaskStatus::Stopping.as_str()))
            .into_tuple()
            .all(&state.db)
            .await?;
        for task_id in &stopping {
            self.finish_stop(state, task_id).await?;
        }
        if !stopping.is_empty() {
            tracing::info!(
                tasks = stopping.len(),
                "stops interrupted by a restart were carried through"
            );
        }
        if requeued > 0 || half_started > 0 {
            tracing::info!(
                requeued,
                resumed = half_started,
                "tasks interrupted while starting were picked up again"
            );
        }
        self.reconcile_slots(state).await
    }

    /// Starts again the tasks whose start was cut short (some subtasks never began): by a crash of this
    /// process, or by the death of the instance that was starting them (a survivor calls this after it
    /// reaped it). Starting a subtask twice is harmless: only a never-started subtask begins. Returns how
    /// many tasks were resumed.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn resume_starts(&self, state: &Context) -> Result<usize> {
        let half_started: Vec<String> = subtasks::Entity::find()
            .select_only()
            .column(subtasks::Column::TaskId)
            .distinct()
            .filter(subtasks::Column::Step.eq("pending"))
            .filter(
                subtasks::Column::TaskId.in_subquery(
                    sea_orm::sea_query::Query::select()
                        .column(tasks::Column::Id)
                        .from(tasks::Entity)
                        .and_where(
                            Expr::col(tasks::Column::Status).eq(TaskStatus::Processing.as_str()),
                        )
                        .to_owned(),
                ),
            )
            .into_tuple()
            .all(&state.db)
            .await?;
        for task_id in &half_started {
            self.start_task(state, task_id).await?;
        }
        Ok(half_started.len())
    }

    /// What `device_id` downloads over PCP now, if anything: its open subtask in the `downloading` step
    /// (the CoAP adapter asks after a restart, when a device goes on requesting segments).
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn serving(&self, state: &Context, device_id: &str) -> Result<Option<SegmentSource>> {
        let Some(row) = subtasks::Entity::find()
            .filter(subtasks::Column::DeviceId.eq(device_id))
            .filter(subtasks::Column::Status.eq(SubtaskStatus::Processing.as_str()))
            .filter(subtasks::Column::Step.eq("downloading"))
            .one(&state.db)
            .await?
        else {
            return Ok(None);
        };
        let Some(plan) = self.plan(state, &row.task_id).await? else {
            return Ok(None);
        };
        Ok(Some(segment_source(&plan.package)?))
    }
}
