//! What goes into the driver and what comes out of it: [`DeviceEvent`]s from the MQTT and CoAP adapters,
//! turned into machine inputs here, and [`Event`]s, the outbox records every committed change writes
//! (and broadcasts in-process, for live views).

use domain::flow::{lwm2m, mqtt};
use domain::task::TaskProgress;
use serde::{Deserialize, Serialize};

use super::Step;

/// What a device did, as the MQTT or CoAP adapter saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// It connected (logged in, or registered over LwM2M).
    Online,
    /// Its connection (or registration) ended.
    Offline,
    /// The instance holding its connection stopped (a survivor's heartbeat found it silent): offline,
    /// unless the device has connected elsewhere meanwhile.
    Lost {
        /// The instance that held it.
        instance: String,
    },
    /// `version_report`.
    VersionReport {
        /// `sw_version`.
        sw_version: Option<String>,
        /// `fw_version`.
        fw_version: Option<String>,
    },
    /// `$sdk_info` / `sdk_info_report`: recorded on the device, and a version report for its upgrade.
    SdkInfo {
        /// `device_sdk_version`.
        device_sdk_version: Option<String>,
        /// `sw_version`.
        sw_version: Option<String>,
        /// `fw_version`.
        fw_version: Option<String>,
    },
    /// An event a gateway sent about the device (`object_device_id`): applied only when the device is
    /// that gateway's child, dropped otherwise (see `Driver::device_events`).
    FromGateway {
        /// The gateway that sent it.
        gateway: String,
        /// What it said.
        event: Box<Self>,
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
    pub(super) fn input(&self) -> Step<'_> {
        match self {
            Self::Online => Step::Online,
            Self::Offline | Self::Lost { .. } => Step::Offline,
            Self::VersionReport {
                sw_version,
                fw_version,
            }
            | Self::SdkInfo {
                sw_version,
                fw_version,
                ..
            } => Step::Mqtt(mqtt::Input::VersionReport {
                sw: sw_version.as_deref(),
                fw: fw_version.as_deref(),
            }),
            // Unwrapped (or dropped) before it is applied.
            Self::FromGateway { event, .. } => event.input(),
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

/// An outbox record, also broadcast in-process after its transaction commits (for live views), by the
/// process that wrote it and, through their outbox tails, by every other (see `tail`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
        /// Why the task has its status (a pause's reason). Absent in records written before it existed.
        #[serde(default)]
        status_desc: String,
        /// The task's resource space (IoTDA's `app_id`). Absent in older records.
        #[serde(default)]
        app_id: String,
        /// `softwareUpgrade` or `firmwareUpgrade`. Absent in older records.
        #[serde(default)]
        task_type: String,
        /// When (ms since the epoch).
        at: i64,
    },
}

impl Event {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::Subtask { .. } => "subtask.changed",
            Self::Task { .. } => "task.changed",
        }
    }

    pub(super) fn project_id(&self) -> &str {
        match self {
            Self::Subtask { project_id, .. } | Self::Task { project_id, .. } => project_id,
        }
    }

    pub(super) fn aggregate_id(&self) -> String {
        match self {
            Self::Subtask {
                task_id, device_id, ..
            } => format!("{task_id}/{device_id}"),
            Self::Task { task_id, .. } => task_id.clone(),
        }
    }
}
