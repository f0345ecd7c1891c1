//! One LwM2M device's software upgrade with Huawei's PCP (`design.md`, the LwM2M table; `protocols.md`
//! §2.7, §2.8 and §3):
//!
//! | phase | entered when | waits for | deadline (default) | then |
//! |---|---|---|---|---|
//! | `WaitOnline` | started while the device is not registered | it registers | 24 h | fails |
//! | `WaitVersion` | started registered, or it registers | PCP 0x13 answer (0x13 sent again every 30 s) | 3 min | fails |
//! | (decision) | version == target | | | **succeeds, nothing sent** |
//! | (decision) | version not in `support_source_versions` | | | fails (no retry helps) |
//! | `WaitCoverage` | the version may upgrade | the `/4/0` read (RSRP, SINR, cell id) | 3 min | `WaitCellId` |
//! | `WaitCellId` | that read failed or had no cell id | the `/4/0/8` read | 3 min | fails |
//! | `WaitSlot` | coverage known | a free download slot in the device's cell and coverage range | none | |
//! | `Downloading` | a slot is granted: PCP 0x14 sent, 0x15 requests served | 0x16 download result | 60 min | fails |
//! | `Executing` | 0x16 success: 0x17 sent | 0x18 result with version == target | 30 min | fails |
//! | `RetryWait` | a failure with attempts left | the retry interval | `retry_interval` | starts again |
//!
//! Coverage sets how many devices of one cell download at once ([`Coverage`]): RSRP and SINR both in range
//! 0 → 50, the worse of them in range 1 → 10, in range 2 or outside every range → 1; known by cell id only
//! → 10. Devices of one cell and range share a [`Slot`]; the driver counts them and grants slots in order.
//!
//! The same machine runs firmware upgrades with the standard Firmware Update object ([`Method::Object5`]):
//! the version is read from `/3/0/3`, "notify" writes the package URI to `/5/0/1` (the device downloads it,
//! CoAP block-wise or over HTTPS), the State `/5/0/3` reaching 2 (downloaded) ends the download, "execute"
//! executes `/5/0/2`, and the upgrade succeeds when, after Update Result 1 or a new registration, `/3/0/3`
//! reads the target version. Update Results 2-9 fail it with the OMA meaning ([`Failure::Firmware`]).
//!
//! Real devices are tolerated (`protocols.md` §2.8): a 0x15 request counts as acceptance when no 0x14
//! answer came; an unsolicited 0x17 (LiteOS reports a download timeout that way) is ignored unless an
//! execute was sent; a 0x16 or 0x18 sent again is acknowledged again (with a new 0x17 for a repeated
//! 0x16: the first may have been lost); a device that registers again mid-flow is sent the pending
//! request again, and mid-download the 0x14 notification, from which devices resume where they were.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{RetryPolicy, result_meaning};
use crate::Timestamp;
use crate::task::SubtaskStatus;

/// The flow's timeouts (configurable; IoTDA's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// How long to wait for the device to register.
    pub online: Duration,
    /// How long to wait for the 0x13 answer.
    pub version: Duration,
    /// How often 0x13 is sent again while no answer came: devices answer with a notification, which
    /// may be non-confirmable and lost.
    #[serde(default = "default_version_reask")]
    pub version_reask: Duration,
    /// How long to wait for the radio coverage read (and, after it failed, for the cell id read).
    pub coverage: Duration,
    /// How long the download may take, from the 0x14 notification to the 0x16 result.
    pub download: Duration,
    /// How long installing may take, from 0x17 to the 0x18 result.
    pub execute: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            online: Duration::from_secs(24 * 3600),
            version: Duration::from_secs(3 * 60),
            version_reask: default_version_reask(),
            coverage: Duration::from_secs(3 * 60),
            download: Duration::from_secs(60 * 60),
            execute: Duration::from_secs(30 * 60),
        }
    }
}

const fn default_version_reask() -> Duration {
    Duration::from_secs(30)
}

/// A coverage range's lower bounds: a device is in the range when both values reach them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    /// RSRP (`/4/0/2`), dBm.
    pub rsrp: i32,
    /// SINR (`/4/0/11`), dB.
    pub sinr: i32,
}

/// How radio coverage sets per-cell concurrency. IoTDA's thresholds exist only in an image, so these are
/// configuration; the defaults are the NB-IoT coverage classes commonly used in planning (range 0: good
/// coverage, RSRP ≥ -105 dBm and SINR ≥ 7 dB; range 1: RSRP ≥ -115 and SINR ≥ -3; range 2: RSRP ≥ -125
/// and SINR ≥ -10, the edge of NB-IoT's normal coverage).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// Ranges 0, 1 and 2, from the best.
    pub ranges: [Bounds; 3],
    /// Devices of one cell downloading at once in ranges 0, 1 and 2 (2 also covers outside every range).
    pub caps: [u32; 3],
    /// Devices of one cell downloading at once when only the cell id is known.
    pub cell_only_cap: u32,
}

impl Default for Coverage {
    fn default() -> Self {
        Self {
            ranges: [
                Bounds {
                    rsrp: -105,
                    sinr: 7,
                },
                Bounds {
                    rsrp: -115,
                    sinr: -3,
                },
                Bounds {
                    rsrp: -125,
                    sinr: -10,
                },
            ],
            caps: [50, 10, 1],
            cell_only_cap: 10,
        }
    }
}

impl Coverage {
    /// The slot of a device in `cell` with these radio values. Each value falls in the best range whose
    /// bound it reaches; the worse of the two counts; outside every range counts as range 2.
    #[must_use]
    pub fn slot(&self, cell: u32, rsrp: i32, sinr: i32) -> Slot {
        let range = |value: i32, bound: fn(&Bounds) -> i32| {
            self.ranges
                .iter()
                .position(|b| value >= bound(b))
                .unwrap_or(2)
        };
        let worst = range(rsrp, |b| b.rsrp).max(range(sinr, |b| b.sinr));
        let class = [Class::Range0, Class::Range1, Class::Range2][worst];
        Slot {
            cell,
            class,
            cap: self.caps[worst],
        }
    }

    /// The slot of a device known by its cell only.
    #[must_use]
    pub const fn cell_only(&self, cell: u32) -> Slot {
        Slot {
            cell,
            class: Class::CellOnly,
            cap: self.cell_only_cap,
        }
    }
}

/// A device's coverage class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Both values in range 0.
    Range0,
    /// The worse in range 1.
    Range1,
    /// The worse in range 2, or outside every range.
    Range2,
    /// Radio values unknown; the cell id is.
    CellOnly,
}

/// Where a device downloads: devices with the same cell and class share `cap` concurrent downloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Slot {
    /// The serving cell id (`/4/0/8`).
    pub cell: u32,
    /// The coverage class.
    pub class: Class,
    /// How many of the cell's devices of this class download at once.
    pub cap: u32,
}

/// How the package reaches the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Huawei's PCP over `/19/0/0` and `/19/1/0` (software packages).
    #[default]
    Pcp,
    /// The LwM2M Firmware Update object, `/5/0` (firmware packages).
    Object5,
}

/// What a subtask is for: fixed when its task starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// PCP or the Firmware Update object.
    pub method: Method,
    /// The package's version.
    pub target: String,
    /// Versions allowed to upgrade; empty means any.
    pub sources: Vec<String>,
    /// The task's retry policy.
    pub retry: RetryPolicy,
    /// The timeouts.
    pub timeouts: Timeouts,
    /// Coverage ranges and caps.
    pub coverage: Coverage,
}

impl Plan {
    fn accepts(&self, current: &str) -> bool {
        self.sources.is_empty() || self.sources.iter().any(|s| s == current)
    }
}

/// Why a device's upgrade failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Failure {
    /// The device did not register in time.
    NeverOnline,
    /// No 0x13 answer in time.
    NoVersionReport,
    /// The device's version may not upgrade to this package.
    UnsupportedSource {
        /// The version it reported.
        current: String,
    },
    /// Neither the radio coverage nor the cell id could be read.
    NoCoverage,
    /// The device refused the new version (0x14 answer).
    Refused {
        /// Its result code.
        code: u8,
    },
    /// No 0x16 download result in time.
    DownloadTimeout,
    /// The device reported a failed download (0x16).
    DownloadFailed {
        /// Its result code.
        code: u8,
    },
    /// The device refused to install (0x17 answer).
    ExecuteFailed {
        /// Its result code.
        code: u8,
    },
    /// No 0x18 upgrade result in time.
    UpgradeTimeout,
    /// The device reported a failed upgrade (0x18).
    UpgradeFailed {
        /// Its result code.
        code: u8,
    },
    /// The device reported success on another version than the package's.
    WrongVersion {
        /// The version it reported.
        reported: String,
    },
    /// The device refused the package URI (`/5/0/1`): no Firmware Update object, or busy.
    UriRefused,
    /// The Firmware Update object's Update Result (`/5/0/5`) reported a failure (2-9).
    Firmware {
        /// The Update Result.
        result: u8,
    },
}

/// The meaning of a Firmware Update object's Update Result (`/5/0/5`), per the OMA object definition.
#[must_use]
pub const fn update_result_meaning(result: u8) -> &'static str {
    match result {
        0 => "initial value",
        1 => "firmware updated successfully",
        2 => "not enough flash memory for the new firmware package",
        3 => "out of RAM during the download",
        4 => "connection lost during the download",
        5 => "integrity check failure for the new firmware package",
        6 => "unsupported package type",
        7 => "invalid URI",
        8 => "firmware update failed",
        9 => "unsupported protocol",
        _ => "unknown update result",
    }
}

impl Failure {
    /// A stable code for APIs and the console (`error_code` of the subtask).
    #[must_use]
    pub fn code(&self) -> String {
        match self {
            Self::NeverOnline => "DEVICE_OFFLINE_TIMEOUT".to_owned(),
            Self::NoVersionReport => "VERSION_REPORT_TIMEOUT".to_owned(),
            Self::UnsupportedSource { .. } => "SOURCE_VERSION_NOT_SUPPORTED".to_owned(),
            Self::NoCoverage => "RADIO_COVERAGE_UNAVAILABLE".to_owned(),
            Self::Refused { code } => format!("PCP_NOTIFY_REFUSED_{code}"),
            Self::DownloadTimeout => "DOWNLOAD_RESULT_TIMEOUT".to_owned(),
            Self::DownloadFailed { code } => format!("PCP_DOWNLOAD_FAILED_{code}"),
            Self::ExecuteFailed { code } => format!("PCP_EXECUTE_FAILED_{code}"),
            Self::UpgradeTimeout => "UPGRADE_RESULT_TIMEOUT".to_owned(),
            Self::UpgradeFailed { code } => format!("PCP_UPGRADE_FAILED_{code}"),
            Self::WrongVersion { .. } => "VERSION_MISMATCH".to_owned(),
            Self::UriRefused => "FIRMWARE_URI_REFUSED".to_owned(),
            Self::Firmware { result } => format!("FIRMWARE_UPDATE_RESULT_{result}"),
        }
    }

    /// A sentence for an operator.
    #[must_use]
    pub fn message(&self) -> String {
        let coded = |what: &str, code: u8| {
            format!(
                "{what}: {} (PCP result 0x{code:02X})",
                result_meaning(i64::from(code))
            )
        };
        match self {
            Self::NeverOnline => "the device did not register in time".to_owned(),
            Self::NoVersionReport => {
                "the device did not answer the version query in time".to_owned()
            }
            Self::UnsupportedSource { current } => {
                format!("version {current} is not in the package's supported source versions")
            }
            Self::NoCoverage => {
                "neither the radio coverage (/4/0) nor the cell id (/4/0/8) could be read"
                    .to_owned()
            }
            Self::Refused { code } => coded("the device refused the new version", *code),
            Self::DownloadTimeout => {
                "the device did not report a download result in time".to_owned()
            }
            Self::DownloadFailed { code } => coded("the download failed", *code),
            Self::ExecuteFailed { code } => coded("the device refused to install", *code),
            Self::UpgradeTimeout => {
                "the device did not report an upgrade result in time".to_owned()
            }
            Self::UpgradeFailed { code } => coded("the upgrade failed", *code),
            Self::WrongVersion { reported } => {
                format!("the device reported success on version {reported}, not the package's")
            }
            Self::UriRefused => "the device refused the package URI (/5/0/1): it has no Firmware \
                                 Update object or is busy"
                .to_owned(),
            Self::Firmware { result } => format!(
                "the firmware update failed: {} (Update Result {result})",
                update_result_meaning(*result)
            ),
        }
    }

    /// Whether trying again could help (a refused source version will be refused again).
    #[must_use]
    pub const fn retryable(&self) -> bool {
        // The device cannot take this package type or protocol, however often it is asked.
        !matches!(
            self,
            Self::UnsupportedSource { .. }
                | Self::UriRefused
                | Self::Firmware { result: 6 | 7 | 9 }
        )
    }
}

/// Where the subtask is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Not started.
    Pending,
    /// Waiting for the device to register.
    WaitOnline {
        /// When waiting fails.
        deadline: Timestamp,
    },
    /// 0x13 sent.
    WaitVersion {
        /// When waiting fails.
        deadline: Timestamp,
        /// When 0x13 is sent again (absent in states stored before re-asking existed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reask: Option<Timestamp>,
    },
    /// `/4/0` read sent.
    WaitCoverage {
        /// When the cell id alone is tried.
        deadline: Timestamp,
    },
    /// `/4/0/8` read sent.
    WaitCellId {
        /// When waiting fails.
        deadline: Timestamp,
    },
    /// Waiting for a download slot.
    WaitSlot {
        /// The slot asked for.
        slot: Slot,
    },
    /// 0x14 sent; segments are served.
    Downloading {
        /// When waiting for the 0x16 result fails.
        deadline: Timestamp,
        /// The slot held.
        slot: Slot,
    },
    /// 0x17 sent.
    Executing {
        /// When waiting for the 0x18 result fails.
        deadline: Timestamp,
    },
    /// Failed with attempts left.
    RetryWait {
        /// When the next attempt starts.
        at: Timestamp,
        /// Why the last attempt failed.
        failure: Failure,
    },
    /// Done: the device runs the package's version.
    Succeeded {
        /// True when it already did and nothing was sent.
        already: bool,
    },
    /// Done: failed for good.
    Failed {
        /// Why.
        failure: Failure,
    },
    /// Stopped by an operator.
    Stopped,
}

/// What the driver tells the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input<'a> {
    /// The task begins: starts a subtask that has not started, and nothing else.
    Begin,
    /// Start: the task begins, or an operator retries a failed device.
    Start,
    /// The device registered (or registered again).
    Online,
    /// Its registration ended (de-registered, or its lifetime passed).
    Offline,
    /// The 0x13 answer.
    Version {
        /// Its result byte.
        result: u8,
        /// The version it runs.
        version: &'a str,
    },
    /// The `/4/0` read answered.
    Coverage {
        /// `/4/0/2`, dBm.
        rsrp: Option<i32>,
        /// `/4/0/11`, dB.
        sinr: Option<i32>,
        /// `/4/0/8`.
        cell: Option<u32>,
    },
    /// The `/4/0` read failed (an error code, or no answer).
    CoverageFailed,
    /// The `/4/0/8` read answered.
    CellId(u32),
    /// The `/4/0/8` read failed.
    CellIdFailed,
    /// The driver granted the slot asked for.
    SlotGranted,
    /// The 0x14 answer.
    NewVersionAnswer {
        /// Its result byte.
        result: u8,
    },
    /// A 0x15 request the adapter served (reported now and then, for progress).
    SegmentRequested {
        /// The segment, from 0.
        segment: u16,
        /// Segments in the package.
        count: u16,
    },
    /// 0x16.
    DownloadResult {
        /// Its result byte.
        result: u8,
    },
    /// The 0x17 answer (or an unsolicited 0x17).
    ExecuteAnswer {
        /// Its result byte.
        result: u8,
    },
    /// 0x18.
    UpgradeResult {
        /// Its result byte.
        result: u8,
        /// The version it runs now.
        version: &'a str,
    },
    /// The Firmware Update object's State (`/5/0/3`) as observed: 0 idle, 1 downloading, 2 downloaded,
    /// 3 updating.
    FirmwareState(u8),
    /// Its Update Result (`/5/0/5`) as observed.
    UpdateResult(u8),
    /// The device refused the `/5/0/1` write.
    UriRefused,
    /// `poll_timeout()` has passed.
    Timer,
    /// An operator stopped the device's upgrade (or the whole task).
    Stop,
}

/// What the driver must do, after committing the new state. With [`Method::Object5`], `QueryVersion`
/// reads `/3/0/3`, `Notify` writes the package URI to `/5/0/1` and observes `/5/0/3` and `/5/0/5`, and
/// `Execute` executes `/5/0/2`; the PCP acknowledgements have no counterpart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send PCP 0x13.
    QueryVersion,
    /// Read `/4/0` (radio coverage).
    ReadCoverage,
    /// Read `/4/0/8` (cell id).
    ReadCellId,
    /// Queue for a download slot; the driver answers [`Input::SlotGranted`] when one is free.
    WaitSlot(Slot),
    /// Send PCP 0x14 and serve the package's segments.
    Notify,
    /// Stop serving segments and give the slot back.
    ReleaseSlot(Slot),
    /// Acknowledge the 0x16 result (`00`).
    AckDownload,
    /// Send PCP 0x17.
    Execute,
    /// Acknowledge the 0x18 result (`00`).
    AckUpgrade,
}

/// One device's upgrade. Serialised into the subtask row between inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subtask {
    /// Where it is.
    pub phase: Phase,
    /// Whether the device is registered, as last told.
    pub online: bool,
    /// Attempts started so far.
    pub attempts: u8,
    /// The version the device reported before upgrading.
    pub source_version: Option<String>,
    /// Progress in percent (segments requested over segments).
    pub progress: u8,
}

impl Subtask {
    /// A subtask that has not started.
    #[must_use]
    pub const fn new(online: bool) -> Self {
        Self {
            phase: Phase::Pending,
            online,
            attempts: 0,
            source_version: None,
            progress: 0,
        }
    }

    /// The status IoTDA shows for it.
    #[must_use]
    pub const fn status(&self) -> SubtaskStatus {
        match self.phase {
            Phase::Pending | Phase::WaitOnline { .. } => SubtaskStatus::Waiting,
            Phase::WaitVersion { .. }
            | Phase::WaitCoverage { .. }
            | Phase::WaitCellId { .. }
            | Phase::WaitSlot { .. }
            | Phase::Downloading { .. }
            | Phase::Executing { .. } => SubtaskStatus::Processing,
            Phase::RetryWait { .. } => SubtaskStatus::FailWaitRetry,
            Phase::Succeeded { .. } => SubtaskStatus::Success,
            Phase::Failed { .. } => SubtaskStatus::Fail,
            Phase::Stopped => SubtaskStatus::Stopped,
        }
    }

    /// The step name shown per device.
    #[must_use]
    pub const fn step(&self) -> &'static str {
        match self.phase {
            Phase::Pending => "pending",
            Phase::WaitOnline { .. } => "wait_online",
            Phase::WaitVersion { .. } => "version_query",
            Phase::WaitCoverage { .. } => "coverage_query",
            Phase::WaitCellId { .. } => "cell_id_query",
            Phase::WaitSlot { .. } => "wait_slot",
            Phase::Downloading { .. } => "downloading",
            Phase::Executing { .. } => "installing",
            Phase::RetryWait { .. } => "retry_wait",
            Phase::Succeeded { .. } | Phase::Failed { .. } | Phase::Stopped => "done",
        }
    }

    /// The failure of a failed (or waiting-to-retry) subtask.
    #[must_use]
    pub const fn failure(&self) -> Option<&Failure> {
        match &self.phase {
            Phase::Failed { failure } | Phase::RetryWait { failure, .. } => Some(failure),
            _ => None,
        }
    }

    /// Whether nothing more happens without an operator.
    #[must_use]
    pub const fn is_final(&self) -> bool {
        matches!(
            self.phase,
            Phase::Succeeded { .. } | Phase::Failed { .. } | Phase::Stopped
        )
    }

    /// The slot held while downloading.
    #[must_use]
    pub const fn held_slot(&self) -> Option<Slot> {
        match self.phase {
            Phase::Downloading { slot, .. } => Some(slot),
            _ => None,
        }
    }

    /// The next deadline, if the machine is waiting for one.
    #[must_use]
    pub const fn poll_timeout(&self) -> Option<Timestamp> {
        match self.phase {
            Phase::WaitVersion {
                deadline,
                reask: Some(reask),
            } if reask.as_millis() < deadline.as_millis() => Some(reask),
            Phase::WaitOnline { deadline }
            | Phase::WaitVersion { deadline, .. }
            | Phase::WaitCoverage { deadline }
            | Phase::WaitCellId { deadline }
            | Phase::Downloading { deadline, .. }
            | Phase::Executing { deadline } => Some(deadline),
            Phase::RetryWait { at, .. } => Some(at),
            _ => None,
        }
    }

    /// Applies `input` at `now`; returns what to do.
    #[allow(clippy::too_many_lines)] // one flat table of (phase, input) pairs reads best in one place
    pub fn handle(&mut self, now: Timestamp, plan: &Plan, input: Input<'_>) -> Vec<Effect> {
        match input {
            Input::Online => self.online = true,
            Input::Offline => self.online = false,
            _ => {}
        }
        let t = &plan.timeouts;
        match (&self.phase, input) {
            (Phase::Pending, Input::Begin) => self.begin_attempt(now, plan),
            (_, Input::Begin) => Vec::new(),
            (
                Phase::Pending | Phase::Failed { .. } | Phase::RetryWait { .. } | Phase::Stopped,
                Input::Start,
            ) => {
                self.attempts = 0;
                self.begin_attempt(now, plan)
            }
            (_, Input::Stop) if !self.is_final() => {
                let release = self.release();
                self.phase = Phase::Stopped;
                release
            }

            // Registration. The device is sent the pending request again: the first may have been lost.
            (Phase::WaitOnline { .. }, Input::Online) => self.query(now, plan),
            (Phase::WaitVersion { .. }, Input::Online) => vec![Effect::QueryVersion],
            (Phase::WaitCoverage { .. }, Input::Online) => vec![Effect::ReadCoverage],
            (Phase::WaitCellId { .. }, Input::Online) => vec![Effect::ReadCellId],
            (Phase::Downloading { .. }, Input::Online) => vec![Effect::Notify],
            (
                Phase::WaitVersion { .. } | Phase::WaitCoverage { .. } | Phase::WaitCellId { .. },
                Input::Offline,
            ) => {
                self.phase = Phase::WaitOnline {
                    deadline: now.plus(t.online),
                };
                Vec::new()
            }

            (Phase::WaitVersion { .. }, Input::Version { result, version }) => {
                if result != 0 || version.is_empty() {
                    // Not an answer this flow can use; the deadline decides.
                    return Vec::new();
                }
                self.source_version = Some(version.to_owned());
                if version == plan.target {
                    self.progress = 100;
                    self.phase = Phase::Succeeded { already: true };
                    Vec::new()
                } else if !plan.accepts(version) {
                    let current = version.to_owned();
                    self.fail(now, plan, Failure::UnsupportedSource { current })
                } else {
                    self.phase = Phase::WaitCoverage {
                        deadline: now.plus(t.coverage),
                    };
                    vec![Effect::ReadCoverage]
                }
            }

            (Phase::WaitCoverage { .. }, Input::Coverage { rsrp, sinr, cell }) => {
                match (cell, rsrp, sinr) {
                    (Some(cell), Some(rsrp), Some(sinr)) => {
                        self.wait_slot(plan.coverage.slot(cell, rsrp, sinr))
                    }
                    // Radio values missing: the cell-id-only rule.
                    (Some(cell), _, _) => self.wait_slot(plan.coverage.cell_only(cell)),
                    (None, _, _) => self.read_cell_id(now, plan),
                }
            }
            (Phase::WaitCoverage { .. }, Input::CoverageFailed) => self.read_cell_id(now, plan),
            (Phase::WaitCoverage { deadline }, Input::Timer) if now >= *deadline => {
                self.read_cell_id(now, plan)
            }
            (Phase::WaitCellId { .. }, Input::CellId(cell)) => {
                self.wait_slot(plan.coverage.cell_only(cell))
            }
            (Phase::WaitCellId { .. }, Input::CellIdFailed) => {
                self.fail(now, plan, Failure::NoCoverage)
            }
            (Phase::WaitCellId { deadline }, Input::Timer) if now >= *deadline => {
                self.fail(now, plan, Failure::NoCoverage)
            }

            (Phase::WaitSlot { slot }, Input::SlotGranted) => {
                self.progress = 0;
                self.phase = Phase::Downloading {
                    deadline: now.plus(t.download),
                    slot: *slot,
                };
                vec![Effect::Notify]
            }

            (Phase::Downloading { .. }, Input::NewVersionAnswer { result }) => {
                if result == 0 {
                    Vec::new()
                } else {
                    self.fail(now, plan, Failure::Refused { code: result })
                }
            }
            (Phase::Downloading { .. }, Input::SegmentRequested { segment, count }) => {
                if count > 0 {
                    let pct = u32::from(segment) * 100 / u32::from(count);
                    let pct = u8::try_from(pct.min(99)).unwrap_or(99);
                    self.progress = self.progress.max(pct);
                }
                Vec::new()
            }
            (Phase::Downloading { slot, .. }, Input::DownloadResult { result }) => {
                let slot = *slot;
                if result == 0 {
                    self.progress = 99;
                    self.phase = Phase::Executing {
                        deadline: now.plus(t.execute),
                    };
                    vec![
                        Effect::ReleaseSlot(slot),
                        Effect::AckDownload,
                        Effect::Execute,
                    ]
                } else {
                    let mut effects = vec![Effect::AckDownload];
                    effects.extend(self.fail(now, plan, Failure::DownloadFailed { code: result }));
                    effects
                }
            }
            // A repeated 0x16: our ack or the 0x17 was lost.
            (Phase::Executing { .. }, Input::DownloadResult { result: 0 }) => {
                vec![Effect::AckDownload, Effect::Execute]
            }
            (_, Input::DownloadResult { .. }) => vec![Effect::AckDownload],
            (Phase::Executing { .. }, Input::ExecuteAnswer { result }) if result != 0 => {
                self.fail(now, plan, Failure::ExecuteFailed { code: result })
            }
            (Phase::Executing { .. }, Input::UpgradeResult { result, version }) => {
                let mut effects = vec![Effect::AckUpgrade];
                if result != 0 {
                    effects.extend(self.fail(now, plan, Failure::UpgradeFailed { code: result }));
                } else if version == plan.target {
                    self.progress = 100;
                    self.phase = Phase::Succeeded { already: false };
                } else {
                    let reported = version.to_owned();
                    effects.extend(self.fail(now, plan, Failure::WrongVersion { reported }));
                }
                effects
            }
            // The Firmware Update object.
            (Phase::Downloading { slot, .. }, Input::FirmwareState(2)) => {
                let slot = *slot;
                self.progress = 99;
                self.phase = Phase::Executing {
                    deadline: now.plus(t.execute),
                };
                vec![Effect::ReleaseSlot(slot), Effect::Execute]
            }
            (Phase::Downloading { .. }, Input::UriRefused) => {
                self.fail(now, plan, Failure::UriRefused)
            }
            (Phase::Downloading { .. } | Phase::Executing { .. }, Input::UpdateResult(result))
                if result >= 2 =>
            {
                self.fail(now, plan, Failure::Firmware { result })
            }
            // Updated, or back after the reboot: is it running the target now?
            (Phase::Executing { .. }, Input::UpdateResult(1)) if plan.method == Method::Object5 => {
                vec![Effect::QueryVersion]
            }
            (Phase::Executing { .. }, Input::Online) if plan.method == Method::Object5 => {
                vec![Effect::QueryVersion]
            }
            (Phase::Executing { .. }, Input::Version { result: 0, version })
                if plan.method == Method::Object5 =>
            {
                if version == plan.target {
                    self.progress = 100;
                    self.phase = Phase::Succeeded { already: false };
                    Vec::new()
                } else if self.source_version.as_deref() == Some(version) {
                    // Not installed yet: the State, the Update Result or the deadline decides.
                    Vec::new()
                } else {
                    let reported = version.to_owned();
                    self.fail(now, plan, Failure::WrongVersion { reported })
                }
            }

            // A repeated or late 0x18 is acknowledged, so the device stops sending it.
            (_, Input::UpgradeResult { .. }) => vec![Effect::AckUpgrade],

            (Phase::WaitOnline { deadline }, Input::Timer) if now >= *deadline => {
                self.fail(now, plan, Failure::NeverOnline)
            }
            (Phase::WaitVersion { deadline, .. }, Input::Timer) if now >= *deadline => {
                self.fail(now, plan, Failure::NoVersionReport)
            }
            (
                Phase::WaitVersion {
                    deadline,
                    reask: Some(reask),
                },
                Input::Timer,
            ) if now >= *reask => {
                self.phase = Phase::WaitVersion {
                    deadline: *deadline,
                    reask: Some(now.plus(t.version_reask)),
                };
                vec![Effect::QueryVersion]
            }
            (Phase::Downloading { deadline, .. }, Input::Timer) if now >= *deadline => {
                self.fail(now, plan, Failure::DownloadTimeout)
            }
            (Phase::Executing { deadline }, Input::Timer) if now >= *deadline => {
                self.fail(now, plan, Failure::UpgradeTimeout)
            }
            (Phase::RetryWait { at, .. }, Input::Timer) if now >= *at => {
                self.begin_attempt(now, plan)
            }
            _ => Vec::new(),
        }
    }

    fn begin_attempt(&mut self, now: Timestamp, plan: &Plan) -> Vec<Effect> {
        self.attempts = self.attempts.saturating_add(1);
        self.progress = 0;
        if self.online {
            self.query(now, plan)
        } else {
            self.phase = Phase::WaitOnline {
                deadline: now.plus(plan.timeouts.online),
            };
            Vec::new()
        }
    }

    fn query(&mut self, now: Timestamp, plan: &Plan) -> Vec<Effect> {
        self.phase = Phase::WaitVersion {
            deadline: now.plus(plan.timeouts.version),
            reask: Some(now.plus(plan.timeouts.version_reask)),
        };
        vec![Effect::QueryVersion]
    }

    fn read_cell_id(&mut self, now: Timestamp, plan: &Plan) -> Vec<Effect> {
        self.phase = Phase::WaitCellId {
            deadline: now.plus(plan.timeouts.coverage),
        };
        vec![Effect::ReadCellId]
    }

    fn wait_slot(&mut self, slot: Slot) -> Vec<Effect> {
        self.phase = Phase::WaitSlot { slot };
        vec![Effect::WaitSlot(slot)]
    }

    /// Leaving the current phase: a held slot goes back.
    fn release(&self) -> Vec<Effect> {
        self.held_slot()
            .map(Effect::ReleaseSlot)
            .into_iter()
            .collect()
    }

    fn fail(&mut self, now: Timestamp, plan: &Plan, failure: Failure) -> Vec<Effect> {
        let release = self.release();
        self.phase = if failure.retryable() && self.attempts < plan.retry.max_attempts() {
            Phase::RetryWait {
                at: now.plus(plan.retry.retry_interval),
                failure,
            }
        } else {
            Phase::Failed { failure }
        };
        release
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);
    const SEC: Duration = Duration::from_secs(1);
    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn plan() -> Plan {
        Plan {
            method: Method::Pcp,
            target: "V2.0".into(),
            sources: vec!["V1.0".into()],
            retry: RetryPolicy::NONE,
            timeouts: Timeouts::default(),
            coverage: Coverage::default(),
        }
    }

    fn good(cell: u32) -> Input<'static> {
        Input::Coverage {
            rsrp: Some(-90),
            sinr: Some(12),
            cell: Some(cell),
        }
    }

    /// A registered device that answered the version query and the coverage read.
    fn waiting_for_slot(p: &Plan) -> Subtask {
        let mut s = Subtask::new(true);
        assert_eq!(s.handle(T0, p, Input::Start), [Effect::QueryVersion]);
        let v = Input::Version {
            result: 0,
            version: "V1.0",
        };
        assert_eq!(s.handle(T0, p, v), [Effect::ReadCoverage]);
        let slot = p.coverage.slot(7, -90, 12);
        assert_eq!(s.handle(T0, p, good(7)), [Effect::WaitSlot(slot)]);
        s
    }

    fn downloading(p: &Plan) -> Subtask {
        let mut s = waiting_for_slot(p);
        assert_eq!(s.handle(T0, p, Input::SlotGranted), [Effect::Notify]);
        s
    }

    fn object5() -> Plan {
        Plan {
            method: Method::Object5,
            ..plan()
        }
    }

    #[test]
    fn a_firmware_upgrade_runs_through_the_firmware_update_object() {
        let p = object5();
        let mut s = downloading(&p);
        let slot = s.held_slot().unwrap();
        s.handle(
            T0,
            &p,
            Input::SegmentRequested {
                segment: 50,
                count: 100,
            },
        );
        assert_eq!(s.progress, 50);
        // State 1 (downloading) changes nothing; 2 (downloaded) executes and frees the cell's slot.
        assert!(s.handle(T0, &p, Input::FirmwareState(1)).is_empty());
        assert_eq!(
            s.handle(T0.plus(MIN), &p, Input::FirmwareState(2)),
            [Effect::ReleaseSlot(slot), Effect::Execute]
        );
        assert_eq!((s.step(), s.held_slot()), ("installing", None));
        // Rebooting: the device registers again, and its version is read.
        assert_eq!(
            s.handle(T0.plus(2 * MIN), &p, Input::Online),
            [Effect::QueryVersion]
        );
        let old = Input::Version {
            result: 0,
            version: "V1.0",
        };
        assert!(
            s.handle(T0.plus(2 * MIN), &p, old).is_empty(),
            "not installed yet"
        );
        assert_eq!(s.status(), SubtaskStatus::Processing);
        assert_eq!(
            s.handle(T0.plus(3 * MIN), &p, Input::UpdateResult(1)),
            [Effect::QueryVersion]
        );
        let new = Input::Version {
            result: 0,
            version: "V2.0",
        };
        assert!(s.handle(T0.plus(3 * MIN), &p, new).is_empty());
        assert_eq!((s.status(), s.progress), (SubtaskStatus::Success, 100));

        // A version that is neither the old nor the target one fails.
        let mut s = downloading(&p);
        s.handle(T0, &p, Input::FirmwareState(2));
        let odd = Input::Version {
            result: 0,
            version: "V9.9",
        };
        s.handle(T0, &p, odd);
        assert_eq!(
            s.failure().map(Failure::code).as_deref(),
            Some("VERSION_MISMATCH")
        );
    }

    #[test]
    fn every_update_result_failure_has_its_meaning_and_retry_rule() {
        let p = Plan {
            retry: RetryPolicy {
                retry_count: 2,
                retry_interval: MIN,
            },
            ..object5()
        };
        for result in 2..=9u8 {
            // While downloading, and while installing.
            for installing in [false, true] {
                let mut s = downloading(&p);
                let slot = s.held_slot().unwrap();
                if installing {
                    s.handle(T0, &p, Input::FirmwareState(2));
                }
                let effects = s.handle(T0, &p, Input::UpdateResult(result));
                assert_eq!(
                    effects,
                    if installing {
                        vec![]
                    } else {
                        vec![Effect::ReleaseSlot(slot)]
                    }
                );
                let failure = Failure::Firmware { result };
                assert_eq!(failure.code(), format!("FIRMWARE_UPDATE_RESULT_{result}"));
                assert!(failure.message().contains(update_result_meaning(result)));
                let for_good = matches!(result, 6 | 7 | 9);
                match &s.phase {
                    Phase::RetryWait { failure: f, .. } => {
                        assert!(!for_good, "result {result} is retried");
                        assert_eq!(f, &failure);
                    }
                    Phase::Failed { failure: f } => {
                        assert!(for_good, "result {result} fails for good");
                        assert_eq!(f, &failure);
                    }
                    other => panic!("result {result}: {other:?}"),
                }
            }
        }
        assert_eq!(
            update_result_meaning(5),
            "integrity check failure for the new firmware package"
        );
        // A refused URI write fails for good; 0 and 1 while downloading are not failures.
        let mut s = downloading(&p);
        assert!(s.handle(T0, &p, Input::UpdateResult(0)).is_empty());
        assert!(s.handle(T0, &p, Input::UpdateResult(1)).is_empty());
        assert_eq!(s.step(), "downloading");
        s.handle(T0, &p, Input::UriRefused);
        assert_eq!(s.failure(), Some(&Failure::UriRefused));
        assert!(matches!(s.phase, Phase::Failed { .. }));
    }

    #[test]
    fn firmware_timeouts_fail_on_the_manual_clock() {
        let p = object5();
        // 60 min to reach "downloaded".
        let mut s = downloading(&p);
        assert!(s.handle(T0.plus(59 * MIN), &p, Input::Timer).is_empty());
        s.handle(T0.plus(HOUR), &p, Input::Timer);
        assert_eq!(s.failure(), Some(&Failure::DownloadTimeout));
        // 30 min to run the target version.
        let mut s = downloading(&p);
        s.handle(T0, &p, Input::FirmwareState(2));
        s.handle(T0.plus(29 * MIN), &p, Input::Timer);
        assert_eq!(s.step(), "installing");
        s.handle(T0.plus(30 * MIN), &p, Input::Timer);
        assert_eq!(s.failure(), Some(&Failure::UpgradeTimeout));
    }

    #[test]
    fn a_registered_device_upgrades_through_every_step() {
        let p = plan();
        let mut s = Subtask::new(true);
        assert_eq!(s.handle(T0, &p, Input::Begin), [Effect::QueryVersion]);
        assert_eq!(
            (s.status(), s.step(), s.poll_timeout()),
            (
                SubtaskStatus::Processing,
                "version_query",
                Some(T0.plus(30 * SEC))
            )
        );
        let v = Input::Version {
            result: 0,
            version: "V1.0",
        };
        assert_eq!(s.handle(T0.plus(MIN), &p, v), [Effect::ReadCoverage]);
        assert_eq!(s.source_version.as_deref(), Some("V1.0"));
        assert_eq!(
            (s.step(), s.poll_timeout()),
            ("coverage_query", Some(T0.plus(4 * MIN)))
        );
        let slot = Slot {
            cell: 7,
            class: Class::Range0,
            cap: 50,
        };
        assert_eq!(
            s.handle(T0.plus(MIN), &p, good(7)),
            [Effect::WaitSlot(slot)]
        );
        assert_eq!((s.step(), s.poll_timeout()), ("wait_slot", None));
        assert_eq!(
            s.handle(T0.plus(2 * MIN), &p, Input::SlotGranted),
            [Effect::Notify]
        );
        assert_eq!(s.held_slot(), Some(slot));
        assert_eq!(s.poll_timeout(), Some(T0.plus(2 * MIN).plus(HOUR)));
        assert!(
            s.handle(T0, &p, Input::NewVersionAnswer { result: 0 })
                .is_empty()
        );
        for segment in [0, 10, 5] {
            let input = Input::SegmentRequested { segment, count: 20 };
            assert!(s.handle(T0, &p, input).is_empty());
        }
        assert_eq!(s.progress, 50, "progress never goes back");
        assert_eq!(
            s.handle(T0.plus(10 * MIN), &p, Input::DownloadResult { result: 0 }),
            [
                Effect::ReleaseSlot(slot),
                Effect::AckDownload,
                Effect::Execute
            ]
        );
        assert_eq!(
            (s.step(), s.poll_timeout()),
            ("installing", Some(T0.plus(40 * MIN)))
        );
        assert!(
            s.handle(T0, &p, Input::ExecuteAnswer { result: 0 })
                .is_empty()
        );
        let done = Input::UpgradeResult {
            result: 0,
            version: "V2.0",
        };
        assert_eq!(s.handle(T0.plus(12 * MIN), &p, done), [Effect::AckUpgrade]);
        assert_eq!(s.phase, Phase::Succeeded { already: false });
        assert_eq!((s.status(), s.progress), (SubtaskStatus::Success, 100));
        assert_eq!(
            s.handle(T0.plus(13 * MIN), &p, done),
            [Effect::AckUpgrade],
            "a repeated 0x18 after a reboot is acknowledged again"
        );
        assert_eq!(s.status(), SubtaskStatus::Success);
    }

    #[test]
    fn a_device_on_the_target_succeeds_and_an_unsupported_source_fails_for_good() {
        let p = Plan {
            retry: RetryPolicy {
                retry_count: 3,
                retry_interval: MIN,
            },
            ..plan()
        };
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        let same = Input::Version {
            result: 0,
            version: "V2.0",
        };
        assert!(s.handle(T0, &p, same).is_empty());
        assert_eq!(s.phase, Phase::Succeeded { already: true });
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        let old = Input::Version {
            result: 0,
            version: "V0.9",
        };
        assert!(s.handle(T0, &p, old).is_empty());
        assert_eq!(s.status(), SubtaskStatus::Fail, "no retry helps");
        assert_eq!(s.failure().unwrap().code(), "SOURCE_VERSION_NOT_SUPPORTED");
    }

    #[test]
    fn every_timeout_fails_or_falls_back_on_the_manual_clock() {
        let p = plan();
        // 24 h for the device to register.
        let mut s = Subtask::new(false);
        assert!(s.handle(T0, &p, Input::Start).is_empty());
        assert!(
            s.handle(T0.plus(24 * HOUR - MIN), &p, Input::Timer)
                .is_empty()
        );
        assert_eq!(s.step(), "wait_online");
        s.handle(T0.plus(24 * HOUR), &p, Input::Timer);
        assert_eq!(s.failure(), Some(&Failure::NeverOnline));
        // 3 min for the version, asking again every 30 s meanwhile (a lost notification is not final).
        let mut s = Subtask::new(true);
        assert_eq!(s.handle(T0, &p, Input::Start), [Effect::QueryVersion]);
        assert_eq!(s.poll_timeout(), Some(T0.plus(30 * SEC)));
        assert!(s.handle(T0.plus(29 * SEC), &p, Input::Timer).is_empty());
        let mut asked = 1;
        while let Some(at) = s.poll_timeout()
            && at < T0.plus(3 * MIN)
        {
            assert_eq!(s.handle(at, &p, Input::Timer), [Effect::QueryVersion]);
            asked += 1;
        }
        assert_eq!(asked, 6, "at 0, 30 s, ... 150 s");
        assert_eq!(s.poll_timeout(), Some(T0.plus(3 * MIN)));
        assert!(s.handle(T0.plus(3 * MIN), &p, Input::Timer).is_empty());
        assert_eq!(s.failure(), Some(&Failure::NoVersionReport));
        // 3 min for coverage, then 3 min for the cell id.
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        let v = Input::Version {
            result: 0,
            version: "V1.0",
        };
        s.handle(T0, &p, v);
        assert_eq!(
            s.handle(T0.plus(3 * MIN), &p, Input::Timer),
            [Effect::ReadCellId]
        );
        assert_eq!(s.poll_timeout(), Some(T0.plus(6 * MIN)));
        assert!(s.handle(T0.plus(6 * MIN), &p, Input::Timer).is_empty());
        assert_eq!(s.failure(), Some(&Failure::NoCoverage));
        // 60 min for the download; the slot goes back.
        let mut s = downloading(&p);
        let slot = s.held_slot().unwrap();
        assert!(s.handle(T0.plus(59 * MIN), &p, Input::Timer).is_empty());
        assert_eq!(
            s.handle(T0.plus(HOUR), &p, Input::Timer),
            [Effect::ReleaseSlot(slot)]
        );
        assert_eq!(s.failure(), Some(&Failure::DownloadTimeout));
        // 30 min to install.
        let mut s = downloading(&p);
        s.handle(T0, &p, Input::DownloadResult { result: 0 });
        assert!(s.handle(T0.plus(30 * MIN), &p, Input::Timer).is_empty());
        assert_eq!(s.failure(), Some(&Failure::UpgradeTimeout));
        assert_eq!(s.failure().unwrap().code(), "UPGRADE_RESULT_TIMEOUT");
    }

    #[test]
    fn coverage_sets_the_slot_and_falls_back_to_the_cell_id() {
        let c = Coverage::default();
        let class = |rsrp, sinr| c.slot(1, rsrp, sinr);
        assert_eq!(
            (class(-90, 10).class, class(-90, 10).cap),
            (Class::Range0, 50)
        );
        assert_eq!(class(-105, 7).cap, 50, "bounds are inclusive");
        assert_eq!(
            (class(-110, 10).class, class(-110, 10).cap),
            (Class::Range1, 10)
        );
        assert_eq!(class(-90, 0).cap, 10, "the worse value counts");
        assert_eq!(
            (class(-120, 0).class, class(-120, 0).cap),
            (Class::Range2, 1)
        );
        assert_eq!(
            class(-140, -20).cap,
            1,
            "outside every range counts as range 2"
        );

        let p = plan();
        let start = |s: &mut Subtask| {
            s.handle(T0, &p, Input::Start);
            s.handle(
                T0,
                &p,
                Input::Version {
                    result: 0,
                    version: "V1.0",
                },
            );
        };
        // Radio values missing but the cell known: 10 per cell.
        let mut s = Subtask::new(true);
        start(&mut s);
        let no_radio = Input::Coverage {
            rsrp: None,
            sinr: Some(3),
            cell: Some(9),
        };
        assert_eq!(
            s.handle(T0, &p, no_radio),
            [Effect::WaitSlot(c.cell_only(9))]
        );
        // The read failed: the cell id alone, then 10 per cell.
        let mut s = Subtask::new(true);
        start(&mut s);
        assert_eq!(
            s.handle(T0, &p, Input::CoverageFailed),
            [Effect::ReadCellId]
        );
        assert_eq!(s.step(), "cell_id_query");
        assert_eq!(
            s.handle(T0, &p, Input::CellId(9)),
            [Effect::WaitSlot(Slot {
                cell: 9,
                class: Class::CellOnly,
                cap: 10
            })]
        );
        // No cell id in the answer: read it alone.
        let mut s = Subtask::new(true);
        start(&mut s);
        let no_cell = Input::Coverage {
            rsrp: Some(-90),
            sinr: Some(10),
            cell: None,
        };
        assert_eq!(s.handle(T0, &p, no_cell), [Effect::ReadCellId]);
        // That failed too: the upgrade fails.
        assert!(s.handle(T0, &p, Input::CellIdFailed).is_empty());
        assert_eq!(s.failure(), Some(&Failure::NoCoverage));
    }

    #[test]
    fn device_quirks_are_tolerated() {
        let p = plan();
        let mut s = downloading(&p);
        // No 0x14 answer: the first 0x15 is acceptance enough.
        let seg = Input::SegmentRequested {
            segment: 0,
            count: 4,
        };
        assert!(s.handle(T0, &p, seg).is_empty());
        // LiteOS's unsolicited 0x17/06 mid-download is not an answer to an execute.
        assert!(
            s.handle(T0, &p, Input::ExecuteAnswer { result: 6 })
                .is_empty()
        );
        assert_eq!(s.step(), "downloading");
        // A device that registers again mid-download is notified again (it resumes from the 0x14).
        assert_eq!(s.handle(T0, &p, Input::Online), [Effect::Notify]);
        assert!(s.handle(T0, &p, Input::Offline).is_empty());
        assert_eq!(
            s.step(),
            "downloading",
            "a download survives a lost registration"
        );
        s.handle(T0, &p, Input::DownloadResult { result: 0 });
        // A repeated 0x16: ack and execute again.
        assert_eq!(
            s.handle(T0, &p, Input::DownloadResult { result: 0 }),
            [Effect::AckDownload, Effect::Execute]
        );
        // A device that lost its registration while being queried is asked again when it is back.
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        assert!(s.handle(T0.plus(MIN), &p, Input::Offline).is_empty());
        assert_eq!(s.poll_timeout(), Some(T0.plus(MIN).plus(24 * HOUR)));
        assert_eq!(
            s.handle(T0.plus(MIN), &p, Input::Online),
            [Effect::QueryVersion]
        );
        assert_eq!(
            s.handle(T0.plus(MIN), &p, Input::Online),
            [Effect::QueryVersion]
        );
    }

    #[test]
    fn device_refusals_fail_with_their_result_code() {
        let p = plan();
        let mut s = downloading(&p);
        let slot = s.held_slot().unwrap();
        assert_eq!(
            s.handle(T0, &p, Input::NewVersionAnswer { result: 4 }),
            [Effect::ReleaseSlot(slot)]
        );
        let f = s.failure().unwrap();
        assert_eq!(f.code(), "PCP_NOTIFY_REFUSED_4");
        assert_eq!(
            f.message(),
            "the device refused the new version: low battery (PCP result 0x04)"
        );
        let mut s = downloading(&p);
        assert_eq!(
            s.handle(T0, &p, Input::DownloadResult { result: 7 }),
            [Effect::AckDownload, Effect::ReleaseSlot(slot)]
        );
        assert_eq!(s.failure(), Some(&Failure::DownloadFailed { code: 7 }));
        let mut s = downloading(&p);
        s.handle(T0, &p, Input::DownloadResult { result: 0 });
        assert!(
            s.handle(T0, &p, Input::ExecuteAnswer { result: 0x7F })
                .is_empty()
        );
        assert_eq!(s.failure(), Some(&Failure::ExecuteFailed { code: 0x7F }));
        let mut s = downloading(&p);
        s.handle(T0, &p, Input::DownloadResult { result: 0 });
        let failed = Input::UpgradeResult {
            result: 0x0A,
            version: "V1.0",
        };
        assert_eq!(s.handle(T0, &p, failed), [Effect::AckUpgrade]);
        assert_eq!(
            s.failure().unwrap().message(),
            "the upgrade failed: upgrade package installation failure (PCP result 0x0A)"
        );
        let mut s = downloading(&p);
        s.handle(T0, &p, Input::DownloadResult { result: 0 });
        let wrong = Input::UpgradeResult {
            result: 0,
            version: "V1.0",
        };
        assert_eq!(s.handle(T0, &p, wrong), [Effect::AckUpgrade]);
        assert_eq!(
            s.failure(),
            Some(&Failure::WrongVersion {
                reported: "V1.0".into()
            })
        );
    }

    #[test]
    fn stop_releases_the_slot_and_retries_start_over() {
        let p = Plan {
            retry: RetryPolicy {
                retry_count: 1,
                retry_interval: 5 * MIN,
            },
            ..plan()
        };
        let mut s = downloading(&p);
        let slot = s.held_slot().unwrap();
        assert_eq!(s.handle(T0, &p, Input::Stop), [Effect::ReleaseSlot(slot)]);
        assert_eq!(s.status(), SubtaskStatus::Stopped);
        assert!(s.handle(T0, &p, Input::Stop).is_empty());
        let mut q = waiting_for_slot(&p);
        assert!(q.handle(T0, &p, Input::Stop).is_empty(), "no slot held yet");
        assert!(
            q.handle(T0, &p, Input::SlotGranted).is_empty(),
            "a late grant is refused (the driver gives the slot to the next)"
        );
        // A failure with attempts left waits, then starts again from the version query.
        let mut s = downloading(&p);
        s.handle(T0.plus(HOUR), &p, Input::Timer);
        assert_eq!(s.status(), SubtaskStatus::FailWaitRetry);
        assert_eq!(s.poll_timeout(), Some(T0.plus(HOUR + 5 * MIN)));
        assert_eq!(
            s.handle(T0.plus(HOUR + 5 * MIN), &p, Input::Timer),
            [Effect::QueryVersion]
        );
        assert_eq!(s.attempts, 2);
        s.handle(T0.plus(2 * HOUR), &p, Input::Timer);
        assert_eq!(s.status(), SubtaskStatus::Fail, "attempts used up");
        // An operator retry starts afresh.
        assert_eq!(
            s.handle(T0.plus(3 * HOUR), &p, Input::Start),
            [Effect::QueryVersion]
        );
        assert_eq!(s.attempts, 1);
    }

    #[test]
    fn the_machine_round_trips_through_json() {
        let s = downloading(&plan());
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""phase":"downloading""#), "{json}");
        assert_eq!(serde_json::from_str::<Subtask>(&json).unwrap(), s);
    }
}
