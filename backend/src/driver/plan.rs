//! [`TaskPlan`]: what a task's subtasks need to run (its flow and plan, its package), read once per task
//! and cached for the life of the process.

use std::sync::Arc;

use domain::device::{FirmwareDownload, ProtocolType};
use domain::flow::RetryPolicy;
use domain::flow::{lwm2m, mqtt};
use domain::package::PackageType;
use sea_orm::EntityTrait;

use super::Driver;
use super::flow::FlowPlan;
use crate::storage::entity::{packages, products, tasks};
use crate::{Context, Result};

/// What a task's subtasks need to run, read once per task and cached (a task's package and policy never
/// change after creation).
#[derive(Debug)]
pub(super) struct TaskPlan {
    pub(super) project_id: String,
    pub(super) plan: FlowPlan,
    pub(super) package: packages::Model,
    pub(super) kind: PackageType,
    /// How the product's LwM2M devices fetch firmware.
    pub(super) firmware_download: FirmwareDownload,
    /// The `X-Request-Id` of the call that created the task: the driver's log lines for it carry it.
    pub(super) request_id: Option<String>,
    /// Whether the task has a rollout (its subtasks' moves make the driver decide again).
    pub(super) rollout: bool,
    /// The task's `task_ext_info`, sent to its devices in the version query and the upgrade event.
    pub(super) task_ext_info: Option<serde_json::Value>,
    /// `task_mode` `GATEWAY`: child devices are told `sub_device_count`.
    pub(super) gateway_mode: bool,
    /// `sub_device_count` per gateway, counted once when first needed (a task's devices do not change
    /// once it has started).
    pub(super) sub_devices: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Driver {
    /// The plan of `task_id`, from the cache or read now; `None` for a deleted task or package.
    pub(super) async fn plan(
        &self,
        state: &Context,
        task_id: &str,
    ) -> Result<Option<Arc<TaskPlan>>> {
        if let Some(p) = self.plans().get(task_id) {
            return Ok(Some(p.clone()));
        }
        let Some(task) = tasks::Entity::find_by_id(task_id.to_owned())
            .one(&state.db)
            .await?
        else {
            return Ok(None);
        };
        let package = match &task.package_id {
            Some(id) => {
                packages::Entity::find_by_id(id.clone())
                    .one(&state.db)
                    .await?
            }
            None => None,
        };
        let Some(package) = package else {
            return Ok(None);
        };
        let kind = PackageType::parse(&package.package_type)?;
        let sources: Vec<String> =
            serde_json::from_str(&package.support_source_versions).unwrap_or_default();
        let retry = if task.retry_count == 0 {
            RetryPolicy::NONE
        } else {
            RetryPolicy::parse(
                i64::from(task.retry_count),
                i64::from(task.retry_interval_min),
            )
            .unwrap_or(RetryPolicy::NONE)
        };
        let product = products::Entity::find_by_id(package.product_id.clone())
            .one(&state.db)
            .await?;
        let protocol = product.as_ref().map_or(Ok(ProtocolType::Mqtt), |p| {
            ProtocolType::parse(&p.protocol_type)
        })?;
        let firmware_download = product
            .as_ref()
            .and_then(|p| FirmwareDownload::parse(&p.firmware_download).ok())
            .unwrap_or(FirmwareDownload::Coap);
        let settings = &self.inner.settings;
        let flow = if protocol == ProtocolType::CoAP {
            FlowPlan::Lwm2m(lwm2m::Plan {
                method: match kind {
                    PackageType::Software => lwm2m::Method::Pcp,
                    PackageType::Firmware => lwm2m::Method::Object5,
                },
                target: package.version.clone(),
                sources,
                retry,
                timeouts: settings.lwm2m,
                coverage: settings.coverage,
            })
        } else {
            FlowPlan::Mqtt(mqtt::Plan {
                kind,
                target: package.version.clone(),
                sources,
                retry,
                timeouts: settings.mqtt,
            })
        };
        let plan = Arc::new(TaskPlan {
            project_id: task.project_id,
            plan: flow,
            package,
            kind,
            firmware_download,
            rollout: task.rollout.is_some(),
            gateway_mode: task.task_mode.as_deref() == Some("GATEWAY"),
            sub_devices: std::sync::Mutex::default(),
            task_ext_info: task
                .task_ext_info
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok()),
            request_id: task.request_id,
        });
        self.plans().insert(task_id.to_owned(), plan.clone());
        Ok(Some(plan))
    }
}
