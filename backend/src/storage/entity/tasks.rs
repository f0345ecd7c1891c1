//! The `tasks` table (schema: `migrations`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "tasks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub project_id: String,
    pub app_id: String,
    pub task_name: String,
    pub task_type: String,
    pub task_mode: Option<String>,
    pub need_confirm: bool,
    #[sea_orm(column_type = "Text")]
    pub task_ext_info: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub targets_filter: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub document: String,
    pub package_id: Option<String>,
    pub schedule_time: Option<i64>,
    pub retry_count: i32,
    pub retry_interval_min: i32,
    pub status: String,
    #[sea_orm(column_type = "Text")]
    pub status_desc: String,
    pub total: i64,
    pub processing: i64,
    pub success: i64,
    pub fail: i64,
    pub waitting: i64,
    pub fail_wait_retry: i64,
    pub stopped: i64,
    pub removed: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
    /// The instance resolving and starting it while `Initializing`.
    pub claimed_by: Option<String>,
    /// The `X-Request-Id` of the call that created it (for the driver's log lines).
    pub request_id: Option<String>,
    /// The rollout policy (`domain::rollout::Rollout` as JSON), when the task has one.
    pub rollout: Option<String>,
    /// Where the rollout stands (`domain::rollout::RolloutState` as JSON).
    pub rollout_state: Option<String>,
    /// When the driver must decide again (a soak ends, the pace allows more, a window opens).
    pub rollout_wake_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

impl Model {
    /// The task's IoTDA `task_progress`, from its counters.
    #[must_use]
    pub fn progress(&self) -> domain::task::TaskProgress {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        domain::task::TaskProgress {
            total: n(self.total),
            processing: n(self.processing),
            success: n(self.success),
            fail: n(self.fail),
            waitting: n(self.waitting),
            fail_wait_retry: n(self.fail_wait_retry),
            stopped: n(self.stopped),
            removed: n(self.removed),
        }
    }
}
