//! Starting a task: a scheduled task is claimed, its group targets are resolved into subtasks (once), the
//! task moves to `Processing`, and every subtask that has not started begins. Operators start tasks
//! through `service::tasks`, the loop starts scheduled ones; both come here.

use domain::Timestamp;
use domain::ValidationError;
use domain::device::ProtocolType;
use domain::flow::mqtt;
use domain::package::PackageType;
use domain::task::{SubtaskStatus, TaskStatus};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set};
use serde::{Deserialize, Serialize};

use super::{BATCH, Driver, Step};
use crate::storage::entity::{device_group_members, devices, packages, products, subtasks, tasks};
use crate::{Context, Error, Result};

/// The stored `targets_filter`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetsFilter {
    /// Groups whose members (of the package's product) are the targets.
    #[serde(default)]
    pub group_ids: Vec<String>,
}

impl Driver {
    /// Starts a task now: claims it when `scheduled`, resolves its group targets if that is still to do,
    /// then starts it ([`Driver::start_task`]).
    pub(crate) async fn start(
        &self,
        state: &Context,
        task_id: &str,
        scheduled: bool,
    ) -> Result<()> {
        // A scheduled task is claimed first (`Waitting` → `Initializing`), so that when several callers
        // see it due at once (the driver's loop, a test's tick, another instance) exactly one starts it.
        if scheduled {
            let claimed = tasks::Entity::update_many()
                .col_expr(
                    tasks::Column::Status,
                    Expr::value(TaskStatus::Initializing.as_str()),
                )
                .col_expr(tasks::Column::ClaimedBy, Expr::value(state.instance_id()))
                .filter(tasks::Column::Id.eq(task_id))
                .filter(tasks::Column::Status.eq(TaskStatus::Waiting.as_str()))
                .exec(&state.db)
                .await?
                .rows_affected;
            if claimed == 0 {
                return Ok(());
            }
        }
        let task = tasks::Entity::find_by_id(task_id.to_owned())
            .one(&state.db)
            .await?
            .ok_or_else(|| Error::not_found("task", task_id))?;
        if let Some(filter) = task.targets_filter.as_deref() {
            let already = subtasks::Entity::find()
                .filter(subtasks::Column::TaskId.eq(task_id))
                .one(&state.db)
                .await?
                .is_some();
            if !already {
                let filter: TargetsFilter = serde_json::from_str(filter).unwrap_or_default();
                let package = match &task.package_id {
                    Some(p) => {
                        packages::Entity::find_by_id(p.clone())
                            .one(&state.db)
                            .await?
                    }
                    None => None,
                }
                .ok_or_else(|| {
                    Error::Conflict(format!("task {task_id}: its package was deleted"))
                })?;
                let members = group_devices(state, &task.project_id, &package, &filter).await?;
                let txn = crate::db::begin_write(&state.db).await?;
                let confirm = task.need_confirm;
                write_subtasks(&txn, state.clock.now(), task_id, &members, confirm).await?;
                txn.commit().await?;
            }
        }
        self.start_task(state, task_id).await
    }

    /// Starts a task: moves it to `Processing` and starts every subtask that has not started.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn start_task(&self, state: &Context, task_id: &str) -> Result<()> {
        {
            let _w = self.inner.write.lock().await;
            let now = state.clock.now().as_millis();
            tasks::Entity::update_many()
                .col_expr(
                    tasks::Column::Status,
                    Expr::value(TaskStatus::Processing.as_str()),
                )
                .col_expr(tasks::Column::StartedAt, Expr::value(now))
                .col_expr(tasks::Column::StatusDesc, Expr::value("running"))
                .col_expr(tasks::Column::UpdatedAt, Expr::value(now))
                .filter(tasks::Column::Id.eq(task_id))
                .filter(tasks::Column::Status.is_in([
                    TaskStatus::Waiting.as_str(),
                    TaskStatus::Initializing.as_str(),
                ]))
                .exec(&state.db)
                .await?;
        }
        let plan = self.plan(state, task_id).await?;
        let request_id = plan.as_ref().and_then(|p| p.request_id.clone());
        tracing::info!(task_id, request_id, "task started");
        let task = match plan {
            // Only a task with a rollout is read again, for its policy.
            Some(p) if p.rollout => {
                tasks::Entity::find_by_id(task_id.to_owned())
                    .one(&state.db)
                    .await?
            }
            _ => None,
        };
        if let Some(task) = task
            && let Some(rollout) = task.rollout.as_deref()
        {
            // Waves, pacing and windows decide who begins.
            let rollout: domain::rollout::Rollout = serde_json::from_str(rollout)
                .map_err(|e| Error::Internal(format!("task {task_id}: rollout: {e}")))?;
            self.start_rollout(state, &task, &rollout).await?;
            return self.refresh(state, task_id).await;
        }
        let mut after = 0_i64;
        loop {
            let ids = subtasks::Entity::find()
                .select_only()
                .column(subtasks::Column::Id)
                .filter(subtasks::Column::TaskId.eq(task_id))
                .filter(subtasks::Column::Step.eq("pending"))
                .filter(subtasks::Column::Id.gt(after))
                .order_by_asc(subtasks::Column::Id)
                .limit(BATCH)
                .into_tuple::<i64>()
                .all(&state.db)
                .await?;
            let n = ids.len() as u64;
            if let Some(last) = ids.last() {
                after = *last;
            }
            // Whether each device is connected is read when the step is applied.
            self.apply(state, ids, Step::Begin { online: false })
                .await?;
            if n < BATCH {
                break;
            }
        }
        // An empty task (or one whose subtasks all finished at once) gets its final status here.
        self.refresh(state, task_id).await
    }
}

/// What the package's product can be upgraded with: MQTT devices take both package types; LwM2M/CoAP
/// devices take software packages over PCP, whose version field holds 1-16 ASCII characters, and firmware
/// packages through the Firmware Update object (any version string).
pub(crate) async fn check_protocol(state: &Context, package: &packages::Model) -> Result<()> {
    let product_id = &package.product_id;
    let product = products::Entity::find_by_id(product_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("product", product_id))?;
    if ProtocolType::parse(&product.protocol_type)? != ProtocolType::CoAP
        || package.package_type == PackageType::Firmware.as_str()
    {
        return Ok(());
    }
    if let Err(e) = protocol::pcp::Version::new(&package.version) {
        return Err(ValidationError::new("package_id", e.to_string()).into());
    }
    Ok(())
}

/// The members of the filter's groups that belong to the package's product (each once).
async fn group_devices(
    state: &Context,
    project_id: &str,
    package: &packages::Model,
    filter: &TargetsFilter,
) -> Result<Vec<devices::Model>> {
    check_protocol(state, package).await?;
    let member_ids = device_group_members::Entity::find()
        .select_only()
        .column(device_group_members::Column::DeviceId)
        .filter(device_group_members::Column::GroupId.is_in(filter.group_ids.clone()))
        .distinct()
        .into_tuple::<String>()
        .all(&state.db)
        .await?;
    let mut out = Vec::with_capacity(member_ids.len());
    for chunk in member_ids.chunks(BATCH as usize) {
        out.extend(
            devices::Entity::find()
                .filter(devices::Column::ProjectId.eq(project_id))
                .filter(devices::Column::ProductId.eq(package.product_id.as_str()))
                .filter(devices::Column::Id.is_in(chunk.to_vec()))
                .order_by_asc(devices::Column::Id)
                .all(&state.db)
                .await?,
        );
    }
    Ok(out)
}

/// The step of a subtask of a `need_confirm` task that has not been confirmed: it is `Waitting` and
/// nothing starts it (only `pending` subtasks begin) until ConfirmBatchTask makes it `pending`.
pub const UNCONFIRMED: &str = "unconfirmed";

/// Writes one `Waitting` subtask per device (`unconfirmed` when the task needs confirmation) and sets the
/// task's counters.
pub(crate) async fn write_subtasks(
    txn: &sea_orm::DatabaseTransaction,
    now: Timestamp,
    task_id: &str,
    devices: &[devices::Model],
    need_confirm: bool,
) -> Result<()> {
    let now = now.as_millis();
    for chunk in devices.chunks(BATCH as usize) {
        let rows = chunk.iter().map(|d| {
            let machine = mqtt::Subtask::new(d.status == "ONLINE");
            let step = if need_confirm {
                UNCONFIRMED
            } else {
                machine.step()
            };
            subtasks::ActiveModel {
                task_id: Set(task_id.to_owned()),
                device_id: Set(d.id.clone()),
                status: Set(SubtaskStatus::Waiting.as_str().to_owned()),
                step: Set(step.to_owned()),
                progress: Set(0),
                attempts: Set(0),
                deadline_at: Set(None),
                source_version: Set(None),
                error_code: Set(None),
                error_msg: Set(None),
                output: Set(None),
                machine: Set(serde_json::to_string(&machine).ok()),
                lease_owner: Set(None),
                lease_until: Set(None),
                created_at: Set(now),
                started_at: Set(None),
                updated_at: Set(now),
                finished_at: Set(None),
                gateway_id: Set(d.gateway_id.clone()),
                ..Default::default()
            }
        });
        subtasks::Entity::insert_many(rows).exec(txn).await?;
    }
    let n = i64::try_from(devices.len()).unwrap_or(i64::MAX);
    tasks::Entity::update_many()
        .col_expr(tasks::Column::Total, Expr::value(n))
        .col_expr(tasks::Column::Waitting, Expr::value(n))
        .col_expr(tasks::Column::UpdatedAt, Expr::value(now))
        .filter(tasks::Column::Id.eq(task_id))
        .exec(txn)
        .await?;
    Ok(())
}
