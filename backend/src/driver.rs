//! The task driver: runs every subtask's pure state machine (`domain::flow::mqtt` for MQTT products,
//! `domain::flow::lwm2m` for LwM2M/CoAP ones) against the database.
//!
//! Inputs come from three places: devices (connect, disconnect, `version_report`, `upgrade_progress_report`;
//! registration and PCP messages, through [`Driver::device_event`]), deadlines ([`Driver::run_due`], called by [`Driver::run`] whenever the
//! earliest `deadline_at` or `schedule_time` passes), and operators (start, stop, retry, through
//! `service::tasks`).
//!
//! Every transition follows the same order: the machine is loaded from its row and handed the input; the
//! new state (subtask row, task counters and status, step history, outbox) **commits in one transaction**
//! with what the effects write (download tokens issued or revoked, messages queued when this process has
//! no MQTT endpoint); only then are messages published. A crash between commit and publish loses at most a
//! message; the machine re-sends it when the device reconnects, and deadlines catch the rest. On start-up
//! nothing special is needed: the stored rows are the state. Many subtasks moving together (a task
//! starting, deadlines passing, a burst of device reports) share one transaction.
//!
//! Transitions are serialised by one in-process lock (`write`): SQLite has one writer anyway, and a
//! read-modify-write of a subtask must not interleave with another. The lock is never held across an
//! effect that leaves the process.

mod flow;
mod slots;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use domain::Timestamp;
use domain::device::{FirmwareDownload, ProtocolType};
use domain::flow::RetryPolicy;
use domain::flow::lwm2m;
use domain::flow::mqtt::{self, Effect, Plan, Timeouts};
use domain::package::PackageType;
use domain::task::{SubtaskStatus, TaskProgress, TaskStatus};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};
use serde::Serialize;
use tokio::sync::{Notify, broadcast};

pub(crate) use self::flow::Step;
use self::flow::{AnyEffect, FlowPlan, Machine};
use self::slots::Slots;
use crate::storage::entity::{
    device_messages, devices, outbox, packages, products, subtask_steps, subtasks, tasks,
};
use crate::{AppState, Error, Result};

/// Subtasks handled per transaction when many move at once (a task starts, deadlines pass together).
const BATCH: u64 = 500;

/// Queued device messages older than this are dropped instead of published.
const QUEUED_MAX_AGE_MS: i64 = 3 * 60 * 1000;

/// How long [`Driver::run`] waits at most between looks at the clock. Deadlines are found by query, so
/// this bounds how late a deadline is noticed (and how soon a manual clock's jump is seen without a kick).
const MAX_IDLE: Duration = Duration::from_secs(1);

/// Where the driver publishes device messages (the MQTT adapter). Publishing is fire-and-forget: a device
/// that is not connected simply misses the message, and the machine's deadlines and re-sends handle it.
pub trait Downlink: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes `payload` on `device_id`'s `$oc/devices/{device_id}/sys/events/down` topic.
    fn publish(&self, device_id: &str, payload: Vec<u8>);

    /// Ends `device_id`'s connection, if it has one (it was frozen or deleted).
    fn disconnect(&self, _device_id: &str) {}
}

/// Where the driver sends LwM2M devices their PCP messages and reads (the CoAP adapter). Like
/// [`Downlink`], fire-and-forget: answers come back as [`DeviceEvent`]s, and deadlines handle silence.
pub trait Lwm2mLink: Send + Sync + std::fmt::Debug + 'static {
    /// Writes a PCP frame to the device's `/19/1/0`.
    fn send_pcp(&self, device_id: &str, frame: Vec<u8>);

    /// Reads the device's radio coverage (`/4/0`); the answer comes back as [`DeviceEvent::Coverage`]
    /// or [`DeviceEvent::CoverageFailed`].
    fn read_coverage(&self, device_id: &str);

    /// Reads the device's cell id (`/4/0/8`); the answer comes back as [`DeviceEvent::CellId`] or
    /// [`DeviceEvent::CellIdFailed`].
    fn read_cell_id(&self, device_id: &str);

    /// Starts serving `package`'s segments to the device (PCP 0x15), or stops (`None`; this also ends
    /// its block-wise firmware download).
    fn serve(&self, device_id: &str, download: Option<Arc<SegmentSource>>);

    /// Reads the device's firmware version (`/3/0/3`); the answer comes back as
    /// [`DeviceEvent::FirmwareVersion`] (a failed read sends nothing: re-asks and the deadline handle it).
    fn read_firmware_version(&self, device_id: &str);

    /// Writes the Package URI (`/5/0/1`), then observes the State (`/5/0/3`) and the Update Result
    /// (`/5/0/5`), whose values come back as [`DeviceEvent::FirmwareState`] and
    /// [`DeviceEvent::UpdateResult`]; a refused write as [`DeviceEvent::UriRefused`]. `blocks` is the
    /// download the URI opens when it is Updraft's CoAP one.
    fn start_firmware(&self, device_id: &str, uri: String, blocks: Option<BlockGrant>);

    /// Executes Update (`/5/0/2`).
    fn execute_update(&self, device_id: &str);
}

/// A block-wise firmware download (`coap://.../fw/<token>`) the driver opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockGrant {
    /// The token's stored id (its SHA-256).
    pub token_hash: String,
    /// When the token expires (ms on the injected clock).
    pub expires_at: i64,
    /// The package, as for segments.
    pub source: Arc<SegmentSource>,
}

/// What a device downloads over PCP: the package and how it is cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSource {
    /// The package.
    pub package_id: String,
    /// Its object key in the store.
    pub object_key: domain::package::ObjectKey,
    /// Its version (what 0x15 requests name).
    pub version: String,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes per segment.
    pub segment_size: u16,
}

impl SegmentSource {
    /// Segments in the package.
    #[must_use]
    pub fn count(&self) -> u16 {
        u16::try_from(protocol::pcp::segment_count(self.size, self.segment_size))
            .unwrap_or(u16::MAX)
    }
}

/// What a device did, as the MQTT or CoAP adapter saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// It connected (logged in, or registered over LwM2M).
    Online,
    /// Its connection (or registration) ended.
    Offline,
    /// `version_report`.
    VersionReport {
        /// `sw_version`.
        sw_version: Option<String>,
        /// `fw_version`.
        fw_version: Option<String>,
    },
    /// `upgrade_progress_report`.
    Progress {
        /// `result_code`.
        result_code: i64,
        /// `progress`.
        progress: Option<i64>,
        /// `version`.
        version: Option<String>,
        /// `description`.
        description: Option<String>,
    },
    /// PCP 0x13 answer.
    PcpVersion {
        /// Its result byte.
        result: u8,
        /// The version the device runs.
        version: String,
    },
    /// PCP 0x14 answer.
    PcpNewVersionAnswer {
        /// Its result byte.
        result: u8,
    },
    /// PCP 0x15 requests served (reported now and then, for progress).
    PcpSegment {
        /// The segment requested.
        segment: u16,
        /// Segments in the package.
        count: u16,
    },
    /// PCP 0x16.
    PcpDownloadResult {
        /// Its result byte.
        result: u8,
    },
    /// PCP 0x17 answer (or an unsolicited 0x17).
    PcpExecuteAnswer {
        /// Its result byte.
        result: u8,
    },
    /// PCP 0x18.
    PcpUpgradeResult {
        /// Its result byte.
        result: u8,
        /// The version the device runs now.
        version: String,
    },
    /// The `/4/0` read answered.
    Coverage {
        /// RSRP, dBm.
        rsrp: Option<i32>,
        /// SINR, dB.
        sinr: Option<i32>,
        /// Cell id.
        cell: Option<u32>,
    },
    /// The `/4/0` read failed.
    CoverageFailed,
    /// The `/4/0/8` read answered.
    CellId(u32),
    /// The `/4/0/8` read failed.
    CellIdFailed,
    /// The `/3/0/3` read answered.
    FirmwareVersion(String),
    /// The Firmware Update object's State (`/5/0/3`).
    FirmwareState(u8),
    /// Its Update Result (`/5/0/5`).
    UpdateResult(u8),
    /// The `/5/0/1` write was refused.
    UriRefused,
    /// A block-wise download's progress, percent.
    FirmwareProgress(u8),
}

impl DeviceEvent {
    fn input(&self) -> Step<'_> {
        match self {
            Self::Online => Step::Online,
            Self::Offline => Step::Offline,
            Self::VersionReport {
                sw_version,
                fw_version,
            } => Step::Mqtt(mqtt::Input::VersionReport {
                sw: sw_version.as_deref(),
                fw: fw_version.as_deref(),
            }),
            Self::Progress {
                result_code,
                progress,
                version,
                description,
            } => Step::Mqtt(mqtt::Input::Progress {
                result_code: *result_code,
                progress: *progress,
                version: version.as_deref(),
                description: description.as_deref(),
            }),
            Self::PcpVersion { result, version } => Step::Lwm2m(lwm2m::Input::Version {
                result: *result,
                version,
            }),
            Self::PcpNewVersionAnswer { result } => {
                Step::Lwm2m(lwm2m::Input::NewVersionAnswer { result: *result })
            }
            Self::PcpSegment { segment, count } => Step::Lwm2m(lwm2m::Input::SegmentRequested {
                segment: *segment,
                count: *count,
            }),
            Self::PcpDownloadResult { result } => {
                Step::Lwm2m(lwm2m::Input::DownloadResult { result: *result })
            }
            Self::PcpExecuteAnswer { result } => {
                Step::Lwm2m(lwm2m::Input::ExecuteAnswer { result: *result })
            }
            Self::PcpUpgradeResult { result, version } => {
                Step::Lwm2m(lwm2m::Input::UpgradeResult {
                    result: *result,
                    version,
                })
            }
            Self::Coverage { rsrp, sinr, cell } => Step::Lwm2m(lwm2m::Input::Coverage {
                rsrp: *rsrp,
                sinr: *sinr,
                cell: *cell,
            }),
            Self::CoverageFailed => Step::Lwm2m(lwm2m::Input::CoverageFailed),
            Self::CellId(cell) => Step::Lwm2m(lwm2m::Input::CellId(*cell)),
            Self::CellIdFailed => Step::Lwm2m(lwm2m::Input::CellIdFailed),
            Self::FirmwareVersion(version) => {
                Step::Lwm2m(lwm2m::Input::Version { result: 0, version })
            }
            Self::FirmwareState(state) => Step::Lwm2m(lwm2m::Input::FirmwareState(*state)),
            Self::UpdateResult(result) => Step::Lwm2m(lwm2m::Input::UpdateResult(*result)),
            Self::UriRefused => Step::Lwm2m(lwm2m::Input::UriRefused),
            Self::FirmwareProgress(pct) => Step::Lwm2m(lwm2m::Input::SegmentRequested {
                segment: u16::from(*pct),
                count: 100,
            }),
        }
    }
}

/// An outbox record, also broadcast in-process after its transaction commits (for live views).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind")]
pub enum Event {
    /// A subtask changed status, step or progress.
    #[serde(rename = "subtask.changed")]
    Subtask {
        /// The project.
        project_id: String,
        /// The task.
        task_id: String,
        /// The device.
        device_id: String,
        /// IoTDA status.
        status: String,
        /// The step name.
        step: String,
        /// Percent.
        progress: i32,
        /// Attempts started.
        attempts: i32,
        /// Failure code, when failed or waiting to retry.
        error_code: Option<String>,
        /// Failure message.
        error_msg: Option<String>,
        /// When (ms since the epoch).
        at: i64,
    },
    /// A task changed status or counters.
    #[serde(rename = "task.changed")]
    Task {
        /// The project.
        project_id: String,
        /// The task.
        task_id: String,
        /// IoTDA status.
        status: String,
        /// IoTDA `task_progress`.
        task_progress: TaskProgress,
        /// When (ms since the epoch).
        at: i64,
    },
}

impl Event {
    fn kind(&self) -> &'static str {
        match self {
            Self::Subtask { .. } => "subtask.changed",
            Self::Task { .. } => "task.changed",
        }
    }

    fn project_id(&self) -> &str {
        match self {
            Self::Subtask { project_id, .. } | Self::Task { project_id, .. } => project_id,
        }
    }

    fn aggregate_id(&self) -> String {
        match self {
            Self::Subtask {
                task_id, device_id, ..
            } => format!("{task_id}/{device_id}"),
            Self::Task { task_id, .. } => task_id.clone(),
        }
    }
}

/// Driver settings (from the server's configuration).
#[derive(Clone, Debug)]
pub struct DriverSettings {
    /// The MQTT flow's timeouts.
    pub mqtt: Timeouts,
    /// The LwM2M flow's timeouts.
    pub lwm2m: lwm2m::Timeouts,
    /// How radio coverage sets per-cell concurrency.
    pub coverage: lwm2m::Coverage,
    /// The base of download URLs given to devices, e.g. `https://ota.example.com:8443` (no trailing `/`).
    pub download_base_url: String,
    /// The base of block-wise firmware URIs given to LwM2M devices, e.g. `coap://ota.example.com:5683`.
    pub coap_base_url: String,
}

impl Default for DriverSettings {
    fn default() -> Self {
        Self {
            mqtt: Timeouts::default(),
            lwm2m: lwm2m::Timeouts::default(),
            coverage: lwm2m::Coverage::default(),
            download_base_url: "https://localhost:8443".to_owned(),
            coap_base_url: "coap://localhost:5683".to_owned(),
        }
    }
}

/// What a task's subtasks need to run, read once per task and cached (a task's package and policy never
/// change after creation).
#[derive(Clone, Debug)]
struct TaskPlan {
    project_id: String,
    plan: FlowPlan,
    package: packages::Model,
    kind: PackageType,
    /// How the product's LwM2M devices fetch firmware.
    firmware_download: FirmwareDownload,
}

/// The task driver. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Driver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: DriverSettings,
    downlink: RwLock<Option<Arc<dyn Downlink>>>,
    lwm2m: RwLock<Option<Arc<dyn Lwm2mLink>>>,
    /// LwM2M download slots per cell and coverage class.
    slots: Mutex<Slots>,
    write: tokio::sync::Mutex<()>,
    plans: Mutex<HashMap<String, Arc<TaskPlan>>>,
    wake: Notify,
    events: broadcast::Sender<Event>,
    /// Whether this process runs the driver loop ([`Driver::run`]): only then does it start tasks.
    running: std::sync::atomic::AtomicBool,
}

/// Something to send once the transaction that decided it has committed.
enum Outgoing {
    /// An MQTT message.
    Mqtt { device_id: String, payload: Vec<u8> },
    /// A PCP frame to an LwM2M device.
    Pcp { device_id: String, frame: Vec<u8> },
    /// A `/4/0` read.
    ReadCoverage { device_id: String },
    /// A `/4/0/8` read.
    ReadCellId { device_id: String },
    /// Start (or stop) serving segments.
    Serve {
        device_id: String,
        download: Option<Arc<SegmentSource>>,
    },
    /// A `/3/0/3` read.
    ReadFirmwareVersion { device_id: String },
    /// The Package URI write and the `/5/0` observations.
    StartFirmware {
        device_id: String,
        uri: String,
        blocks: Option<BlockGrant>,
    },
    /// The `/5/0/2` execute.
    ExecuteUpdate { device_id: String },
    /// Ask for a download slot.
    AskSlot { subtask: i64, slot: lwm2m::Slot },
    /// Give a download slot back.
    ReleaseSlot { subtask: i64 },
}

impl Outgoing {
    /// Hands an LwM2M message to the CoAP adapter (the other kinds are not its business).
    fn send_to(self, link: &dyn Lwm2mLink) {
        match self {
            Self::Pcp { device_id, frame } => link.send_pcp(&device_id, frame),
            Self::ReadCoverage { device_id } => link.read_coverage(&device_id),
            Self::ReadCellId { device_id } => link.read_cell_id(&device_id),
            Self::Serve {
                device_id,
                download,
            } => link.serve(&device_id, download),
            Self::ReadFirmwareVersion { device_id } => link.read_firmware_version(&device_id),
            Self::StartFirmware {
                device_id,
                uri,
                blocks,
            } => link.start_firmware(&device_id, uri, blocks),
            Self::ExecuteUpdate { device_id } => link.execute_update(&device_id),
            Self::Mqtt { .. } | Self::AskSlot { .. } | Self::ReleaseSlot { .. } => {}
        }
    }
}

impl Driver {
    /// A driver with no downlink yet (see [`Driver::set_downlink`]).
    #[must_use]
    pub fn new(settings: DriverSettings) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(Inner {
                settings,
                downlink: RwLock::new(None),
                lwm2m: RwLock::new(None),
                slots: Mutex::new(Slots::default()),
                write: tokio::sync::Mutex::new(()),
                plans: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                events,
                running: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Whether this process runs the driver loop. A process that does not (the command line) leaves
    /// starting tasks to the one that does, so that a task's first thousands of transitions are not
    /// fought over by two processes writing one SQLite file.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.inner
            .running
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The settings.
    #[must_use]
    pub fn settings(&self) -> &DriverSettings {
        &self.inner.settings
    }

    /// Ends a device's connection in this process, if it has one (a frozen or deleted device).
    pub fn disconnect(&self, device_id: &str) {
        if let Some(d) = self.downlink() {
            d.disconnect(device_id);
        }
    }

    /// Connects the driver to the CoAP adapter.
    pub fn set_lwm2m_link(&self, link: Arc<dyn Lwm2mLink>) {
        *self
            .inner
            .lwm2m
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(link);
    }

    fn lwm2m_link(&self) -> Option<Arc<dyn Lwm2mLink>> {
        self.inner
            .lwm2m
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connects the driver to the device messaging adapter.
    pub fn set_downlink(&self, downlink: Arc<dyn Downlink>) {
        *self
            .inner
            .downlink
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(downlink);
    }

    /// Committed task and subtask changes, as they happen (a lagging receiver misses some; the outbox
    /// table has them all).
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Makes [`Driver::run`] look at deadlines now (after a manual clock moved, or new work).
    pub fn kick(&self) {
        self.inner.wake.notify_one();
    }

    /// Forgets a deleted task's cached plan.
    pub(crate) fn forget(&self, task_id: &str) {
        self.plans().remove(task_id);
    }

    fn plans(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TaskPlan>>> {
        self.inner
            .plans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn downlink(&self) -> Option<Arc<dyn Downlink>> {
        self.inner
            .downlink
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs deadlines as they pass until `stop` is cancelled.
    pub async fn run(&self, state: AppState, stop: tokio_util::sync::CancellationToken) {
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
    /// [`Error::Db`].
    pub async fn run_due(&self, state: &AppState) -> Result<Option<Timestamp>> {
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
            // Through the service: a group target is resolved now, at the task's start. One task that
            // cannot start must not hold up every other deadline.
            if let Err(e) = crate::service::tasks::start(state, &task_id, true).await {
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

    /// After a restart: running tasks' counters are counted again, and tasks a dead process was starting
    /// are started again. A task left `Initializing`
    /// goes back to `Waitting` (the loop starts it when due; its group is resolved if that never
    /// committed); a `Processing` task with subtasks that never started gets them started. Transitions
    /// are compare-and-set, so work another live instance did is not done twice.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn recover(&self, state: &AppState) -> Result<()> {
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
        let requeued = tasks::Entity::update_many()
            .col_expr(
                tasks::Column::Status,
                Expr::value(TaskStatus::Waiting.as_str()),
            )
            .filter(tasks::Column::Status.eq(TaskStatus::Initializing.as_str()))
            .exec(&state.db)
            .await?
            .rows_affected;
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
        if requeued > 0 || !half_started.is_empty() {
            tracing::info!(
                requeued,
                resumed = half_started.len(),
                "tasks interrupted while starting were picked up again"
            );
        }
        self.recover_slots(state).await
    }

    /// What `device_id` downloads over PCP now, if anything: its open subtask in the `downloading` step
    /// (the CoAP adapter asks after a restart, when a device goes on requesting segments).
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn serving(
        &self,
        state: &AppState,
        device_id: &str,
    ) -> Result<Option<SegmentSource>> {
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

    /// Rebuilds the LwM2M download slots from the subtasks (at start-up): downloading subtasks hold
    /// theirs, waiting ones queue in the order they started waiting, and free places are granted.
    async fn recover_slots(&self, state: &AppState) -> Result<()> {
        let rows: Vec<(i64, String, Option<String>)> = subtasks::Entity::find()
            .select_only()
            .column(subtasks::Column::Id)
            .column(subtasks::Column::Step)
            .column(subtasks::Column::Machine)
            .filter(subtasks::Column::Status.eq(SubtaskStatus::Processing.as_str()))
            .filter(subtasks::Column::Step.is_in(["downloading", "wait_slot"]))
            .order_by_asc(subtasks::Column::UpdatedAt)
            .order_by_asc(subtasks::Column::Id)
            .into_tuple()
            .all(&state.db)
            .await?;
        let mut granted = Vec::new();
        {
            let mut slots = self.slots();
            for (id, _, json) in &rows {
                let Some(machine) = json
                    .as_deref()
                    .and_then(|j| serde_json::from_str::<lwm2m::Subtask>(j).ok())
                else {
                    continue;
                };
                match machine.phase {
                    lwm2m::Phase::Downloading { slot, .. } => slots.hold(*id, slot),
                    lwm2m::Phase::WaitSlot { slot } => slots.ask(*id, slot, &mut granted),
                    _ => {}
                }
            }
        }
        self.grant(state, granted).await
    }

    /// Hands granted slots to their subtasks (see [`Driver::apply_in`]).
    async fn grant(&self, state: &AppState, granted: Vec<i64>) -> Result<()> {
        let steps = granted
            .into_iter()
            .map(|id| (id, Step::Lwm2m(lwm2m::Input::SlotGranted)))
            .collect();
        self.apply_in(state, steps, &[]).await
    }

    /// Frees slots whose holders ended without this process seeing it (stopped from the command line,
    /// or by another instance).
    async fn sweep_slots(&self, state: &AppState) -> Result<()> {
        let holders = self.slots().holders();
        if holders.is_empty() {
            return Ok(());
        }
        let mut still = std::collections::HashSet::new();
        for chunk in holders.chunks(BATCH as usize) {
            let ids: Vec<i64> = subtasks::Entity::find()
                .select_only()
                .column(subtasks::Column::Id)
                .filter(subtasks::Column::Id.is_in(chunk.to_vec()))
                // Not the step: a subtask granted a slot a moment ago still says `wait_slot`.
                .filter(subtasks::Column::Status.eq(SubtaskStatus::Processing.as_str()))
                .into_tuple()
                .all(&state.db)
                .await?;
            still.extend(ids);
        }
        let mut granted = Vec::new();
        {
            let mut slots = self.slots();
            for id in holders {
                if !still.contains(&id) {
                    slots.release(id, &mut granted);
                }
            }
        }
        self.grant(state, granted).await
    }

    /// Starts a task: moves it to `Processing` and starts every subtask that has not started.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn start_task(&self, state: &AppState, task_id: &str) -> Result<()> {
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
        tracing::info!(task_id, "task started");
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

    /// Re-derives a task's status from its counters (after a stop, or a start with nothing to do).
    ///
    /// # Errors
    /// [`Error::Db`].
    /// Carries a whole-task stop through, from a task already marked `Stopping`: every open subtask is
    /// stopped, the task's download tokens are revoked, and the task's status follows. Each step is
    /// idempotent, so a stop cut short by a crash is carried through again at start-up (and by a second
    /// stop request) with the same outcome.
    pub(crate) async fn finish_stop(&self, state: &AppState, task_id: &str) -> Result<()> {
        let open: Vec<&str> = OPEN.iter().map(|s| s.as_str()).collect();
        let ids: Vec<i64> = subtasks::Entity::find()
            .select_only()
            .column(subtasks::Column::Id)
            .filter(subtasks::Column::TaskId.eq(task_id))
            .filter(subtasks::Column::Status.is_in(open))
            .into_tuple()
            .all(&state.db)
            .await?;
        self.command(state, ids, Step::Stop).await?;
        crate::service::downloads::revoke_task(state, task_id).await?;
        self.refresh(state, task_id).await
    }

    pub(crate) async fn refresh(&self, state: &AppState, task_id: &str) -> Result<()> {
        let events = {
            let _w = self.inner.write.lock().await;
            let txn = crate::db::begin_write(&state.db).await?;
            let mut events = Vec::new();
            refresh_task(&txn, task_id, state.clock.now(), &mut events).await?;
            txn.commit().await?;
            events
        };
        self.publish_events(events);
        Ok(())
    }

    /// Applies an operator command (`Start` to retry, `Stop`) to the given subtasks.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub(crate) async fn command(
        &self,
        state: &AppState,
        subtask_ids: Vec<i64>,
        input: Step<'static>,
    ) -> Result<()> {
        for chunk in subtask_ids.chunks(BATCH as usize) {
            self.apply(state, chunk.to_vec(), input.clone()).await?;
        }
        Ok(())
    }

    /// Restarts subtasks (an operator retry): each is first told whether its device is connected now
    /// (finished subtasks stop following connects and disconnects), then started.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub(crate) async fn restart(&self, state: &AppState, subtask_ids: Vec<i64>) -> Result<()> {
        for chunk in subtask_ids.chunks(BATCH as usize) {
            let rows: Vec<(i64, String)> = subtasks::Entity::find()
                .select_only()
                .column(subtasks::Column::Id)
                .column(subtasks::Column::DeviceId)
                .filter(subtasks::Column::Id.is_in(chunk.to_vec()))
                .into_tuple()
                .all(&state.db)
                .await?;
            let online = online_devices(state, rows.iter().map(|(_, d)| d.clone())).await?;
            let mut steps = Vec::with_capacity(rows.len() * 2);
            for (id, device) in &rows {
                let now_online = if online.contains(device) {
                    Step::Online
                } else {
                    Step::Offline
                };
                steps.push((*id, now_online));
                steps.push((*id, Step::Start));
            }
            self.apply_in(state, steps, &[]).await?;
        }
        Ok(())
    }

    /// Feeds a device event to the device's open subtasks, and records its online state and versions.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn device_event(
        &self,
        state: &AppState,
        device_id: &str,
        event: DeviceEvent,
    ) -> Result<()> {
        self.device_events(state, vec![(device_id.to_owned(), event)])
            .await
    }

    /// [`Driver::device_event`] for many events at once (in order), in one transaction each for the
    /// device records and the subtasks: what the MQTT adapter hands over when messages arrive together.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn device_events(
        &self,
        state: &AppState,
        events: Vec<(String, DeviceEvent)>,
    ) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        // The device's open subtasks are looked up under the write lock (in `apply_once`): a task
        // starting meanwhile either sees the device's new state or is seen by the lookup.
        self.apply_in(state, Vec::new(), &events).await
    }

    async fn plan(&self, state: &AppState, task_id: &str) -> Result<Option<Arc<TaskPlan>>> {
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
            FlowPlan::Mqtt(Plan {
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
        });
        self.plans().insert(task_id.to_owned(), plan.clone());
        Ok(Some(plan))
    }

    /// The core: load plans, run the machines, commit everything in one transaction, then perform effects.
    ///
    /// Rows are read under the write lock but before the transaction, so the transaction's first statement
    /// is a write: on SQLite a transaction that reads first and writes later fails when another connection
    /// wrote in between.
    async fn apply(&self, state: &AppState, ids: Vec<i64>, input: Step<'_>) -> Result<()> {
        let steps = ids.into_iter().map(|id| (id, input.clone())).collect();
        self.apply_in(state, steps, &[]).await
    }

    /// Applies each `(subtask id, input)` in order, all in one transaction that also records what
    /// `devices` say about their devices (online state, versions), so a device's state and its subtasks'
    /// view of it commit together. A subtask named twice sees the state its first input left.
    ///
    /// LwM2M download slots freed or granted by these transitions are then handed out, each grant in a
    /// transition of its own; a grant to a subtask that no longer waits goes to the next in line.
    async fn apply_in(
        &self,
        state: &AppState,
        steps: Vec<(i64, Step<'_>)>,
        devices: &[(String, DeviceEvent)],
    ) -> Result<()> {
        let mut granted = self.apply_once(state, steps, devices).await?.granted;
        while !granted.is_empty() {
            let steps = granted
                .iter()
                .map(|id| (*id, Step::Lwm2m(lwm2m::Input::SlotGranted)))
                .collect();
            let applied = self.apply_once(state, steps, &[]).await?;
            let mut next = applied.granted;
            let mut slots = self.slots();
            for id in granted {
                if !applied.changed.contains(&id) {
                    slots.release(id, &mut next);
                }
            }
            drop(slots);
            granted = next;
        }
        Ok(())
    }

    async fn apply_once(
        &self,
        state: &AppState,
        steps: Vec<(i64, Step<'_>)>,
        devices: &[(String, DeviceEvent)],
    ) -> Result<Applied> {
        let mut applied = Applied::default();
        if steps.is_empty() && devices.is_empty() {
            return Ok(applied);
        }
        let mut outgoing = Vec::new();
        let mut events = Vec::new();
        {
            let _w = self.inner.write.lock().await;
            let now = state.clock.now();
            let mut steps = steps;
            steps.extend(open_steps(state, devices).await?);
            let mut ids: Vec<i64> = steps.iter().map(|(id, _)| *id).collect();
            ids.sort_unstable();
            ids.dedup();
            let mut rows: HashMap<i64, subtasks::Model> = HashMap::with_capacity(ids.len());
            for chunk in ids.chunks(BATCH as usize) {
                for row in subtasks::Entity::find()
                    .filter(subtasks::Column::Id.is_in(chunk.to_vec()))
                    .all(&state.db)
                    .await?
                {
                    rows.insert(row.id, row);
                }
            }
            // Whether a beginning subtask's device is connected, read under the lock (see `open_steps`).
            if steps.iter().any(|(_, s)| matches!(s, Step::Begin { .. })) {
                let online =
                    online_devices(state, rows.values().map(|r| r.device_id.clone())).await?;
                for (id, step) in &mut steps {
                    if let Step::Begin { online: o } = step {
                        *o = rows.get(id).is_some_and(|r| online.contains(&r.device_id));
                    }
                }
            }
            let mut plans: HashMap<i64, Arc<TaskPlan>> = HashMap::with_capacity(rows.len());
            for row in rows.values() {
                if let Some(plan) = self.plan(state, &row.task_id).await? {
                    plans.insert(row.id, plan);
                }
            }
            let downlink = self.downlink();
            let txn = crate::db::begin_write(&state.db).await?;
            for (device_id, event) in devices {
                record_device(&txn, device_id, event, now.as_millis()).await?;
            }
            let mut touched_tasks: Vec<String> = Vec::new();
            for (id, input) in steps {
                let (Some(mut row), Some(plan)) = (rows.remove(&id), plans.get(&id)) else {
                    continue;
                };
                let mut conflicts = 0;
                let changed = loop {
                    match transition(&txn, now, plan, &row, input.clone(), &mut events).await? {
                        Outcome::Changed(changed) => break Some(*changed),
                        Outcome::Unchanged => break None,
                        Outcome::Stale if conflicts < MAX_CONFLICTS => {
                            // Another writer (a second instance, or one shutting down) moved this
                            // subtask since it was read: decide again on what is stored now.
                            conflicts += 1;
                            match subtasks::Entity::find_by_id(id).one(&txn).await? {
                                Some(current) => row = current,
                                None => break None,
                            }
                        }
                        Outcome::Stale => {
                            return Err(Error::Internal(format!(
                                "subtask {id}: changed by another writer {MAX_CONFLICTS} times in a row"
                            )));
                        }
                    }
                };
                let Some(changed) = changed else {
                    rows.insert(id, row);
                    continue;
                };
                applied.changed.insert(id);
                if changed.status_changed && !touched_tasks.contains(&changed.row.task_id) {
                    touched_tasks.push(changed.row.task_id.clone());
                }
                for effect in &changed.effects {
                    match *effect {
                        AnyEffect::Mqtt(e) => {
                            self.effect_in(state, &txn, now, plan, &changed.row, e, &mut outgoing)
                                .await?;
                        }
                        AnyEffect::Lwm2m(e) => {
                            self.lwm2m_effect_in(
                                state,
                                &txn,
                                now,
                                plan,
                                &changed.row,
                                e,
                                &mut outgoing,
                            )
                            .await?;
                        }
                    }
                }
                rows.insert(id, changed.row);
            }
            // In a fixed order: two instances refreshing the same tasks lock their rows alike.
            touched_tasks.sort_unstable();
            for task_id in &touched_tasks {
                refresh_task(&txn, task_id, now, &mut events).await?;
            }
            if downlink.is_none() {
                // No MQTT endpoint in this process (the command line): the messages are queued, with
                // the state that decided them, for the process that has one.
                for m in &outgoing {
                    if let Outgoing::Mqtt { device_id, payload } = m {
                        device_messages::ActiveModel {
                            device_id: Set(device_id.clone()),
                            payload: Set(payload.clone()),
                            created_at: Set(now.as_millis()),
                            ..Default::default()
                        }
                        .insert(&txn)
                        .await?;
                    }
                }
            }
            txn.commit().await?;
            let link = self.lwm2m_link();
            for m in outgoing {
                match m {
                    Outgoing::Mqtt { device_id, payload } => {
                        if let Some(d) = &downlink {
                            d.publish(&device_id, payload);
                        }
                    }
                    Outgoing::AskSlot { subtask, slot } => {
                        self.slots().ask(subtask, slot, &mut applied.granted);
                    }
                    Outgoing::ReleaseSlot { subtask } => {
                        self.slots().release(subtask, &mut applied.granted);
                    }
                    lwm2m => {
                        if let Some(l) = &link {
                            lwm2m.send_to(l.as_ref());
                        }
                    }
                }
            }
        }
        self.publish_events(events);
        Ok(applied)
    }

    /// Carries out one effect of a transition inside its transaction: token rows are written or revoked
    /// with the new state; messages are collected into `outgoing`, published after the commit.
    #[allow(clippy::too_many_arguments)]
    async fn effect_in(
        &self,
        state: &AppState,
        txn: &DatabaseTransaction,
        now: Timestamp,
        plan: &TaskPlan,
        row: &subtasks::Model,
        effect: Effect,
        outgoing: &mut Vec<Outgoing>,
    ) -> Result<()> {
        use super::service::downloads;
        let event_time = now.to_compact();
        match effect {
            Effect::SendVersionQuery => outgoing.push(Outgoing::Mqtt {
                device_id: row.device_id.clone(),
                payload: protocol::ota::version_query(&row.device_id, &event_time),
            }),
            Effect::RevokeTokens => {
                downloads::revoke_subtask(txn, now, row.id).await?;
            }
            Effect::SendUpgrade => {
                let package = &plan.package;
                let kind = match plan.kind {
                    PackageType::Software => protocol::ota::UpgradeKind::Software,
                    PackageType::Firmware => protocol::ota::UpgradeKind::Firmware,
                };
                let ttl = state.settings.download_token_ttl;
                let custom_info = Some(package.custom_info.clone()).filter(|c| !c.is_empty());
                let key = super::service::packages::object_key(package)?;
                let registered = package.source == super::service::packages::SOURCE_BUCKET;
                let payload =
                    if let Some(url) = state.store.offload_url(&key, registered, ttl).await? {
                        // IoTDA's `*_upgrade_v2`: the device fetches from the bucket, without a token.
                        let notice = protocol::ota::UpgradeNoticeV2 {
                            version: package.version.clone(),
                            url,
                            file_size: u64::try_from(package.size).unwrap_or(0),
                            file_name: package.file_name.clone(),
                            expires: ttl.as_secs(),
                            sign: package.sha256.clone(),
                            custom_info,
                            task_id: Some(row.task_id.clone()),
                        };
                        protocol::ota::upgrade_event_v2(&row.device_id, &event_time, kind, &notice)
                    } else {
                        // A re-send (after a reconnect or a restart) carries the token the device may be
                        // downloading with already, so it resumes instead of starting over.
                        let token = downloads::reuse_or_issue_in(
                            txn,
                            &state.sealer,
                            now,
                            ttl,
                            row,
                            &package.id,
                        )
                        .await?;
                        let notice = protocol::ota::UpgradeNotice {
                            version: package.version.clone(),
                            url: download_url(
                                &self.inner.settings.download_base_url,
                                &package.id,
                                &package.file_name,
                            ),
                            file_size: u64::try_from(package.size).unwrap_or(0),
                            file_name: package.file_name.clone(),
                            access_token: token.token,
                            expires: ttl.as_secs(),
                            sign: package.sha256.clone(),
                            custom_info,
                            task_id: Some(row.task_id.clone()),
                        };
                        protocol::ota::upgrade_event(&row.device_id, &event_time, kind, &notice)
                    };
                outgoing.push(Outgoing::Mqtt {
                    device_id: row.device_id.clone(),
                    payload,
                });
            }
        }
        Ok(())
    }

    /// Carries out one LwM2M effect inside its transaction: Object 5 download tokens are issued or
    /// revoked with the new state; what is sent is collected into `outgoing`, sent after the commit.
    #[allow(clippy::too_many_arguments)]
    async fn lwm2m_effect_in(
        &self,
        state: &AppState,
        txn: &DatabaseTransaction,
        now: Timestamp,
        plan: &TaskPlan,
        row: &subtasks::Model,
        effect: lwm2m::Effect,
        outgoing: &mut Vec<Outgoing>,
    ) -> Result<()> {
        use super::service::downloads;
        use protocol::pcp::{Downlink as Pcp, ResultCode, Version};
        let device_id = row.device_id.clone();
        let frame = |m: Pcp<'_>| Outgoing::Pcp {
            device_id: row.device_id.clone(),
            frame: m.encode(),
        };
        let package = &plan.package;
        let object5 =
            matches!(&plan.plan, FlowPlan::Lwm2m(p) if p.method == lwm2m::Method::Object5);
        match effect {
            lwm2m::Effect::QueryVersion if object5 => {
                outgoing.push(Outgoing::ReadFirmwareVersion { device_id });
            }
            lwm2m::Effect::QueryVersion => outgoing.push(frame(Pcp::QueryVersion)),
            lwm2m::Effect::ReadCoverage => outgoing.push(Outgoing::ReadCoverage { device_id }),
            lwm2m::Effect::ReadCellId => outgoing.push(Outgoing::ReadCellId { device_id }),
            lwm2m::Effect::WaitSlot(slot) => outgoing.push(Outgoing::AskSlot {
                subtask: row.id,
                slot,
            }),
            lwm2m::Effect::Notify if object5 => {
                // A fresh URI each time (a device that registered again starts over with it).
                downloads::revoke_subtask(txn, now, row.id).await?;
                let ttl = state.settings.download_token_ttl;
                let token =
                    downloads::issue_in(txn, &state.sealer, now, ttl, row, &package.id).await?;
                let settings = &self.inner.settings;
                let (uri, blocks) = match plan.firmware_download {
                    FirmwareDownload::Coap => (
                        format!(
                            "{}/fw/{}",
                            settings.coap_base_url.trim_end_matches('/'),
                            token.token
                        ),
                        Some(BlockGrant {
                            token_hash: crate::ids::sha256_hex(&token.token),
                            expires_at: token.expires_at.as_millis(),
                            source: Arc::new(segment_source(package)?),
                        }),
                    ),
                    FirmwareDownload::Https => (
                        format!(
                            "{}/fw/{}",
                            settings.download_base_url.trim_end_matches('/'),
                            token.token
                        ),
                        None,
                    ),
                };
                outgoing.push(Outgoing::StartFirmware {
                    device_id,
                    uri,
                    blocks,
                });
            }
            lwm2m::Effect::Notify => {
                let source = segment_source(package)?;
                let version = Version::new(&source.version)
                    .map_err(|e| Error::Internal(format!("package {}: {e}", package.id)))?;
                outgoing.push(Outgoing::Serve {
                    device_id,
                    download: Some(Arc::new(source.clone())),
                });
                outgoing.push(frame(Pcp::NewVersion {
                    version,
                    segment_size: source.segment_size,
                    segment_count: source.count(),
                    check_code: 0,
                }));
            }
            lwm2m::Effect::ReleaseSlot(_) => {
                if object5 {
                    // The download is over (done, failed or stopped): its URI stops working.
                    downloads::revoke_subtask(txn, now, row.id).await?;
                }
                outgoing.push(Outgoing::Serve {
                    device_id,
                    download: None,
                });
                outgoing.push(Outgoing::ReleaseSlot { subtask: row.id });
            }
            lwm2m::Effect::Execute if object5 => {
                outgoing.push(Outgoing::ExecuteUpdate { device_id });
            }
            lwm2m::Effect::Execute => outgoing.push(frame(Pcp::Execute)),
            // PCP's acknowledgements; the Firmware Update object has none.
            lwm2m::Effect::AckDownload | lwm2m::Effect::AckUpgrade if object5 => {}
            lwm2m::Effect::AckDownload => outgoing.push(frame(Pcp::DownloadAck {
                result: ResultCode::OK,
            })),
            lwm2m::Effect::AckUpgrade => outgoing.push(frame(Pcp::UpgradeAck {
                result: ResultCode::OK,
            })),
        }
        Ok(())
    }

    fn publish_events(&self, events: Vec<Event>) {
        for e in events {
            // No receiver is fine: nobody is watching.
            let _ = self.inner.events.send(e);
        }
    }

    /// Publishes messages other processes queued for devices (oldest first), when this process serves
    /// MQTT. Returns how many were sent.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn drain_queued(&self, state: &AppState) -> Result<usize> {
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

/// The open subtasks each event applies to, in event order.
async fn open_steps<'a>(
    state: &AppState,
    events: &'a [(String, DeviceEvent)],
) -> Result<Vec<(i64, Step<'a>)>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut device_ids: Vec<&str> = events.iter().map(|(d, _)| d.as_str()).collect();
    device_ids.sort_unstable();
    device_ids.dedup();
    let mut open: HashMap<String, Vec<i64>> = HashMap::new();
    for chunk in device_ids.chunks(BATCH as usize) {
        let rows: Vec<(i64, String)> = subtasks::Entity::find()
            .select_only()
            .column(subtasks::Column::Id)
            .column(subtasks::Column::DeviceId)
            .filter(subtasks::Column::DeviceId.is_in(chunk.iter().copied()))
            .filter(subtasks::Column::Status.is_in(OPEN.map(SubtaskStatus::as_str)))
            .order_by_asc(subtasks::Column::Id)
            .into_tuple()
            .all(&state.db)
            .await?;
        for (id, device) in rows {
            open.entry(device).or_default().push(id);
        }
    }
    Ok(events
        .iter()
        .flat_map(|(device, event)| {
            open.get(device)
                .into_iter()
                .flatten()
                .map(move |id| (*id, event.input()))
        })
        .collect())
}

/// Which of `devices` are connected now.
async fn online_devices(
    state: &AppState,
    devices: impl Iterator<Item = String>,
) -> Result<std::collections::HashSet<String>> {
    let devices: Vec<String> = devices.collect();
    let mut online = std::collections::HashSet::new();
    for chunk in devices.chunks(BATCH as usize) {
        online.extend(
            devices::Entity::find()
                .select_only()
                .column(devices::Column::Id)
                .filter(devices::Column::Id.is_in(chunk.to_vec()))
                .filter(devices::Column::Status.eq("ONLINE"))
                .into_tuple::<String>()
                .all(&state.db)
                .await?,
        );
    }
    Ok(online)
}

/// Records what a device event says about the device itself: online state, reported versions.
async fn record_device(
    txn: &DatabaseTransaction,
    device_id: &str,
    event: &DeviceEvent,
    now: i64,
) -> Result<()> {
    match event {
        DeviceEvent::Online | DeviceEvent::Offline => {
            let online = *event == DeviceEvent::Online;
            let mut update = devices::Entity::update_many()
                .col_expr(
                    devices::Column::Status,
                    Expr::value(if online { "ONLINE" } else { "OFFLINE" }),
                )
                .col_expr(
                    devices::Column::ConnectionStatusUpdateTime,
                    Expr::value(now),
                )
                .filter(devices::Column::Id.eq(device_id))
                // A frozen device stays frozen whatever its connection did.
                .filter(devices::Column::Status.ne("FROZEN"));
            if online {
                update = update.col_expr(
                    devices::Column::ActiveTime,
                    Expr::col(devices::Column::ActiveTime).if_null(now),
                );
            }
            update.exec(txn).await?;
        }
        DeviceEvent::VersionReport {
            sw_version,
            fw_version,
        } => {
            let mut update =
                devices::Entity::update_many().filter(devices::Column::Id.eq(device_id));
            let mut any = false;
            for (col, v) in [
                (devices::Column::SwVersion, sw_version),
                (devices::Column::FwVersion, fw_version),
            ] {
                if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                    update = update.col_expr(col, Expr::value(v.to_owned()));
                    any = true;
                }
            }
            if any {
                update.exec(txn).await?;
            }
        }
        // PCP upgrades software: what the device says it runs is its software version.
        DeviceEvent::PcpVersion { result: 0, version }
        | DeviceEvent::PcpUpgradeResult { result: 0, version }
            if !version.is_empty() =>
        {
            devices::Entity::update_many()
                .col_expr(devices::Column::SwVersion, Expr::value(version.clone()))
                .filter(devices::Column::Id.eq(device_id))
                .exec(txn)
                .await?;
        }
        // Object 5 upgrades firmware: `/3/0/3` is the firmware version.
        DeviceEvent::FirmwareVersion(version) if !version.is_empty() => {
            devices::Entity::update_many()
                .col_expr(devices::Column::FwVersion, Expr::value(version.clone()))
                .filter(devices::Column::Id.eq(device_id))
                .exec(txn)
                .await?;
        }
        DeviceEvent::Coverage { .. } | DeviceEvent::CellId(_) => {
            let (rsrp, sinr, cell) = match event {
                DeviceEvent::Coverage { rsrp, sinr, cell } => (*rsrp, *sinr, *cell),
                DeviceEvent::CellId(cell) => (None, None, Some(*cell)),
                _ => (None, None, None),
            };
            let radio =
                serde_json::json!({ "rsrp": rsrp, "sinr": sinr, "cell_id": cell, "at": now });
            devices::Entity::update_many()
                .col_expr(devices::Column::LastRadio, Expr::value(radio.to_string()))
                .filter(devices::Column::Id.eq(device_id))
                .exec(txn)
                .await?;
        }
        _ => {}
    }
    Ok(())
}

/// The URL a device downloads `file_name` of `package_id` from.
#[must_use]
pub fn download_url(base: &str, package_id: &str, file_name: &str) -> String {
    let name = percent_encode_path(file_name);
    format!(
        "{}/download/{package_id}/{name}",
        base.trim_end_matches('/')
    )
}

fn percent_encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Subtask statuses in which something can still happen without an operator.
pub(crate) const OPEN: [SubtaskStatus; 3] = [
    SubtaskStatus::Waiting,
    SubtaskStatus::Processing,
    SubtaskStatus::FailWaitRetry,
];

/// How often one input is re-decided on a subtask another writer keeps changing.
const MAX_CONFLICTS: usize = 3;

enum Outcome {
    /// The machine had nothing to do.
    Unchanged,
    /// The row was not what the machine was run on (another writer changed it); nothing was written.
    Stale,
    Changed(Box<Changed>),
}

struct Changed {
    /// The row as written.
    row: subtasks::Model,
    status_changed: bool,
    effects: Vec<AnyEffect>,
}

/// What one [`Driver::apply_once`] did beyond its transaction.
#[derive(Default)]
struct Applied {
    /// Subtasks whose machine changed.
    changed: std::collections::HashSet<i64>,
    /// Subtasks granted a download slot by the slot changes it made.
    granted: Vec<i64>,
}

/// How a package is served over PCP.
pub(crate) fn segment_source(package: &packages::Model) -> Result<SegmentSource> {
    Ok(SegmentSource {
        package_id: package.id.clone(),
        object_key: crate::service::packages::object_key(package)?,
        version: package.version.clone(),
        size: u64::try_from(package.size).unwrap_or(0),
        segment_size: u16::try_from(package.segment_size)
            .ok()
            .filter(|s| protocol::pcp::SEGMENT_SIZES.contains(s))
            .unwrap_or(protocol::pcp::DEFAULT_SEGMENT_SIZE),
    })
}

/// Runs one machine and writes its new state (inside `txn`), only if the stored row is still the one
/// it was run on.
async fn transition(
    txn: &DatabaseTransaction,
    now: Timestamp,
    plan: &TaskPlan,
    row: &subtasks::Model,
    input: Step<'_>,
    events: &mut Vec<Event>,
) -> Result<Outcome> {
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
        ..row.clone()
    };
    // Compare-and-set: written only if the row is still the one the machine was run on.
    let same_machine = match &row.machine {
        Some(json) => subtasks::Column::Machine.eq(json.clone()),
        None => subtasks::Column::Machine.is_null(),
    };
    let result = subtasks::Entity::update_many()
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
        write_outbox(txn, &event, at).await?;
        events.push(event);
    }
    if status != old_status {
        // Failures are worth an operator's eye; the rest of a large fleet's progress is debug noise.
        let error = failure.as_ref().map(|f| f.message.as_str());
        if status == SubtaskStatus::Fail {
            tracing::info!(
                task_id = %row.task_id, device_id = %row.device_id, error,
                "subtask failed"
            );
        } else {
            tracing::debug!(
                task_id = %row.task_id, device_id = %row.device_id,
                from = old_status.as_str(), to = status.as_str(), step, error,
                "subtask status"
            );
        }
    }
    Ok(Outcome::Changed(Box::new(Changed {
        row: written,
        status_changed: status != old_status,
        effects,
    })))
}

/// The task counter column of a subtask status.
pub(crate) const fn counter(status: SubtaskStatus) -> tasks::Column {
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
async fn recount(txn: &DatabaseTransaction, task_id: &str) -> Result<TaskProgress> {
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

/// A task row's `task_progress`.
#[must_use]
pub fn progress_of(task: &tasks::Model) -> TaskProgress {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    TaskProgress {
        total: n(task.total),
        processing: n(task.processing),
        success: n(task.success),
        fail: n(task.fail),
        waitting: n(task.waitting),
        fail_wait_retry: n(task.fail_wait_retry),
        stopped: n(task.stopped),
        removed: n(task.removed),
    }
}

/// Re-derives a started task's status from its counters and records a change (inside `txn`).
pub(crate) async fn refresh_task(
    txn: &DatabaseTransaction,
    task_id: &str,
    now: Timestamp,
    events: &mut Vec<Event>,
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
    let progress = progress_of(&task);
    let mut update = tasks::ActiveModel {
        id: Set(task.id.clone()),
        updated_at: Set(at),
        ..Default::default()
    };
    let stop_requested = matches!(current, TaskStatus::Stopping | TaskStatus::Stopped);
    let status = progress.derived_status(stop_requested);
    update.status_desc = Set(describe(status, &progress));
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
        at,
    };
    write_outbox(txn, &event, at).await?;
    events.push(event);
    Ok(())
}

/// `status_desc` for a task status.
#[must_use]
pub fn describe(status: TaskStatus, p: &TaskProgress) -> String {
    match status {
        TaskStatus::Initializing => "resolving targets".to_owned(),
        TaskStatus::Waiting => "waiting to start".to_owned(),
        TaskStatus::Processing => format!(
            "{} of {} devices done ({} succeeded, {} failed)",
            p.success + p.fail + p.stopped,
            p.total,
            p.success,
            p.fail
        ),
        TaskStatus::Stopping => "stopping".to_owned(),
        TaskStatus::Stopped => format!("stopped ({} of {} succeeded)", p.success, p.total),
        TaskStatus::Success => format!("all {} devices succeeded", p.success),
        TaskStatus::Fail => format!("all {} devices failed", p.fail),
        TaskStatus::PartialSuccess => format!(
            "{} of {} devices succeeded, {} failed",
            p.success, p.total, p.fail
        ),
    }
}

pub(crate) async fn write_outbox<C: ConnectionTrait>(db: &C, event: &Event, at: i64) -> Result<()> {
    outbox::ActiveModel {
        project_id: Set(event.project_id().to_owned()),
        kind: Set(event.kind().to_owned()),
        aggregate_id: Set(event.aggregate_id()),
        payload: Set(serde_json::to_string(event).map_err(|e| Error::Internal(e.to_string()))?),
        created_at: Set(at),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_urls_escape_file_names() {
        assert_eq!(
            download_url("https://h:8443/", "abc", "fw 2.bin"),
            "https://h:8443/download/abc/fw%202.bin"
        );
        assert_eq!(
            download_url("https://h:8443", "abc", "fw-2.0_x.bin"),
            "https://h:8443/download/abc/fw-2.0_x.bin"
        );
    }
}
