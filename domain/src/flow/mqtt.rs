//! One device's upgrade over MQTT (`design.md`, the MQTT table; `protocols.md` §1.10):
//!
//! | phase | entered when | waits for | deadline (default) | then |
//! |---|---|---|---|---|
//! | `WaitOnline` | started while the device is offline | it connects | 25 h | fails |
//! | `WaitVersion` | started online, or it connects | `version_report` | 3 min | fails |
//! | (decision) | version == target | | | **succeeds, nothing sent** |
//! | (decision) | version not in `support_source_versions` | | | fails (no retry helps) |
//! | `Upgrading` | upgrade event sent with a fresh token | report with result 0 and version == target | 24 h | fails |
//! | `RetryWait` | a failure with attempts left | the retry interval | `retry_interval` | starts again |
//!
//! A device that reconnects while a query is unanswered, or before it reported any progress on the upgrade,
//! is sent the same event again (deadlines unchanged): the first one may have been lost with the connection.
//! An operator retry (`Start`) restarts a failed, retry-waiting or stopped subtask with fresh attempts.
//!
//! Progress reports with result 0 update the progress; a non-zero result fails with that code's meaning,
//! and so does a report of 100 % on a version that is not the package's (`VERSION_MISMATCH`, at once).
//! A `version_report` of the target version while upgrading also counts as success (a device that rebooted
//! into the new image and reported its versions, as the SDKs do on connect). Leaving `Upgrading` for any
//! reason revokes the subtask's download tokens. Stop ends any phase that is not final.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{RetryPolicy, result_meaning};
use crate::Timestamp;
use crate::package::PackageType;
use crate::task::SubtaskStatus;

/// The flow's timeouts (configurable; IoTDA's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// How long to wait for an offline device to connect.
    pub online: Duration,
    /// How long to wait for `version_report` after `version_query`.
    pub version: Duration,
    /// How long the download, install and final report may take after the upgrade event.
    pub upgrade: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            online: Duration::from_secs(25 * 3600),
            version: Duration::from_secs(3 * 60),
            upgrade: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a subtask is for: fixed when its task starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Software or firmware (which reported version counts).
    pub kind: PackageType,
    /// The package's version.
    pub target: String,
    /// Versions allowed to upgrade; empty means any.
    pub sources: Vec<String>,
    /// The task's retry policy.
    pub retry: RetryPolicy,
    /// The timeouts.
    pub timeouts: Timeouts,
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
    /// The device did not connect in time.
    NeverOnline,
    /// No `version_report` in time.
    NoVersionReport,
    /// The device's version may not upgrade to this package.
    UnsupportedSource {
        /// The version it reported.
        current: String,
    },
    /// No final report in time after the upgrade event.
    UpgradeTimeout,
    /// The device reported a non-zero `result_code`.
    Device {
        /// The code.
        code: i64,
        /// The device's own description, if any.
        description: Option<String>,
    },
    /// The device reported success on another version than the package's.
    WrongVersion {
        /// The version it reported.
        reported: String,
    },
}

impl Failure {
    /// A stable code for APIs and the console (`error_code` of the subtask).
    #[must_use]
    pub fn code(&self) -> String {
        match self {
            Self::NeverOnline => "DEVICE_OFFLINE_TIMEOUT".to_owned(),
            Self::NoVersionReport => "VERSION_REPORT_TIMEOUT".to_owned(),
            Self::UnsupportedSource { .. } => "SOURCE_VERSION_NOT_SUPPORTED".to_owned(),
            Self::UpgradeTimeout => "UPGRADE_RESULT_TIMEOUT".to_owned(),
            Self::Device { code, .. } => format!("DEVICE_RESULT_{code}"),
            Self::WrongVersion { .. } => "VERSION_MISMATCH".to_owned(),
        }
    }

    /// A sentence for an operator.
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            Self::NeverOnline => "the device did not come online in time".to_owned(),
            Self::NoVersionReport => "the device did not report its version in time".to_owned(),
            Self::UnsupportedSource { current } => {
                format!("version {current} is not in the package's supported source versions")
            }
            Self::UpgradeTimeout => {
                "the device did not report an upgrade result in time".to_owned()
            }
            Self::Device { code, description } => {
                let meaning = result_meaning(*code);
                match description.as_deref().filter(|d| !d.is_empty()) {
                    Some(d) => format!("{meaning} (result code {code}: {d})"),
                    None => format!("{meaning} (result code {code})"),
                }
            }
            Self::WrongVersion { reported } => {
                format!("the device reported success on version {reported}, not the package's")
            }
        }
    }

    /// Whether trying again could help (a refused source version will be refused again).
    #[must_use]
    pub const fn retryable(&self) -> bool {
        !matches!(self, Self::UnsupportedSource { .. })
    }
}

/// Where the subtask is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Not started (its task waits for its schedule time).
    Pending,
    /// Waiting for the device to connect.
    WaitOnline {
        /// When waiting fails.
        deadline: Timestamp,
    },
    /// `version_query` sent.
    WaitVersion {
        /// When waiting fails.
        deadline: Timestamp,
    },
    /// Upgrade event sent; the device downloads and installs.
    Upgrading {
        /// When waiting fails.
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input<'a> {
    /// The task begins: starts a subtask that has not started, and nothing else (a subtask stopped
    /// meanwhile stays stopped).
    Begin,
    /// Start: the task begins, or an operator retries a failed device.
    Start,
    /// The device connected.
    Online,
    /// The device disconnected.
    Offline,
    /// `version_report`.
    VersionReport {
        /// `sw_version`.
        sw: Option<&'a str>,
        /// `fw_version`.
        fw: Option<&'a str>,
    },
    /// `upgrade_progress_report`.
    Progress {
        /// `result_code`.
        result_code: i64,
        /// `progress` (0-100).
        progress: Option<i64>,
        /// `version`: the device's current version.
        version: Option<&'a str>,
        /// `description`.
        description: Option<&'a str>,
    },
    /// `poll_timeout()` has passed.
    Timer,
    /// An operator stopped the device's upgrade (or the whole task).
    Stop,
}

/// What the driver must do, after committing the new state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Publish `version_query` to the device.
    SendVersionQuery,
    /// Issue a download token and publish the upgrade event.
    SendUpgrade,
    /// Revoke the subtask's download tokens.
    RevokeTokens,
}

/// One device's upgrade. Serialised into the subtask row between inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subtask {
    /// Where it is.
    pub phase: Phase,
    /// Whether the device is connected, as last told.
    pub online: bool,
    /// Attempts started so far.
    pub attempts: u8,
    /// The version the device reported before upgrading.
    pub source_version: Option<String>,
    /// Progress in percent.
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
            Phase::WaitVersion { .. } | Phase::Upgrading { .. } => SubtaskStatus::Processing,
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
            Phase::Upgrading { .. } => "upgrading",
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

    /// The next deadline, if the machine is waiting for one.
    #[must_use]
    pub const fn poll_timeout(&self) -> Option<Timestamp> {
        match self.phase {
            Phase::WaitOnline { deadline }
            | Phase::WaitVersion { deadline }
            | Phase::Upgrading { deadline } => Some(deadline),
            Phase::RetryWait { at, .. } => Some(at),
            _ => None,
        }
    }

    /// Applies `input` at `now`; returns what to do.
    pub fn handle(&mut self, now: Timestamp, plan: &Plan, input: Input<'_>) -> Vec<Effect> {
        match input {
            Input::Online => self.online = true,
            Input::Offline => self.online = false,
            _ => {}
        }
        match (&self.phase, input) {
            (Phase::Pending, Input::Begin) => self.begin_attempt(now, plan),
            (_, Input::Begin) => Vec::new(),
            (
                Phase::Pending | Phase::Failed { .. } | Phase::RetryWait { .. } | Phase::Stopped,
                Input::Start,
            ) => {
                // An operator retry starts a fresh series of attempts.
                self.attempts = 0;
                self.begin_attempt(now, plan)
            }
            (_, Input::Stop) if !self.is_final() => {
                let upgrading = matches!(self.phase, Phase::Upgrading { .. });
                self.phase = Phase::Stopped;
                if upgrading {
                    vec![Effect::RevokeTokens]
                } else {
                    Vec::new()
                }
            }
            (Phase::WaitOnline { .. }, Input::Online) => self.query(now, plan),
            // Reconnects: the device may have missed what was sent while its connection (or Updraft) was
            // going down. Devices tolerate repeats (`protocols.md`), so send it again; deadlines stay.
            (Phase::WaitVersion { .. }, Input::Online) => vec![Effect::SendVersionQuery],
            // While upgrading, the device may have finished (and its final report was lost with the
            // connection or with Updraft), or lost its download: ask which, and let the answer decide
            // (on the target: success; otherwise the upgrade event again, with the same token).
            (Phase::Upgrading { .. }, Input::Online) => vec![Effect::SendVersionQuery],
            (Phase::WaitVersion { .. }, Input::Offline) => {
                self.phase = Phase::WaitOnline {
                    deadline: now.plus(plan.timeouts.online),
                };
                Vec::new()
            }
            // In WaitOnline: a report the device sent just before it went away (its disconnect overtook
            // the report on the way in). On the target that is success; another version is noted, and
            // the device is asked again when it is back.
            (
                Phase::WaitVersion { .. } | Phase::WaitOnline { .. },
                Input::VersionReport { sw, fw },
            ) => {
                let Some(current) = reported(plan.kind, sw, fw) else {
                    return Vec::new();
                };
                self.source_version = Some(current.to_owned());
                if current == plan.target {
                    self.progress = 100;
                    self.phase = Phase::Succeeded { already: true };
                    Vec::new()
                } else if matches!(self.phase, Phase::WaitOnline { .. }) {
                    Vec::new()
                } else if !plan.accepts(current) {
                    self.fail(
                        now,
                        plan,
                        Failure::UnsupportedSource {
                            current: current.to_owned(),
                        },
                    )
                } else {
                    self.progress = 0;
                    self.phase = Phase::Upgrading {
                        deadline: now.plus(plan.timeouts.upgrade),
                    };
                    vec![Effect::SendUpgrade]
                }
            }
            (Phase::Upgrading { .. }, Input::VersionReport { sw, fw }) => {
                match reported(plan.kind, sw, fw) {
                    Some(v) if v == plan.target => self.succeed(),
                    // Still on the old version after a reconnect: it needs the event (again). A device
                    // that is still downloading resumes with the same URL and token.
                    Some(_) => vec![Effect::SendUpgrade],
                    None => Vec::new(),
                }
            }
            (
                Phase::Upgrading { .. },
                Input::Progress {
                    result_code,
                    progress,
                    version,
                    description,
                },
            ) => {
                let on_target = version == Some(plan.target.as_str());
                match result_code {
                    0 | 3 if on_target => self.succeed(),
                    // A finished upgrade (100 %) on a version that is not the package's: the install
                    // did not take, and waiting for the deadline would only hide it.
                    0 if progress.is_some_and(|p| p >= 100) => match version {
                        Some(v) if !v.is_empty() => self.fail(
                            now,
                            plan,
                            Failure::WrongVersion {
                                reported: v.to_owned(),
                            },
                        ),
                        _ => {
                            self.progress = 99;
                            Vec::new()
                        }
                    },
                    0 => {
                        if let Some(p) = progress {
                            let p = u8::try_from(p.clamp(0, 100)).unwrap_or(0);
                            // A final report on the old version is not success; keep waiting.
                            self.progress = p.min(99);
                        }
                        Vec::new()
                    }
                    code => self.fail(
                        now,
                        plan,
                        Failure::Device {
                            code,
                            description: description.map(str::to_owned),
                        },
                    ),
                }
            }
            (Phase::WaitOnline { deadline }, Input::Timer) if now >= *deadline => {
                self.fail(now, plan, Failure::NeverOnline)
            }
            (Phase::WaitVersion { deadline }, Input::Timer) if now >= *deadline => {
                self.fail(now, plan, Failure::NoVersionReport)
            }
            (Phase::Upgrading { deadline }, Input::Timer) if now >= *deadline => {
                self.fail(now, plan, Failure::UpgradeTimeout)
            }
            (Phase::RetryWait { at, .. }, Input::Timer) if now >= *at => {
                self.begin_attempt(now, plan)
            }
            // Reconciled, not dropped: the attempt timed out (say, while Updraft was down), but the
            // device reports that it runs the target now. That is success; another attempt would only
            // upgrade it twice. (Final states are never reopened.)
            (
                Phase::RetryWait { .. },
                Input::Progress {
                    result_code: 0 | 3,
                    version: Some(v),
                    ..
                },
            ) if v == plan.target => self.succeed(),
            (Phase::RetryWait { .. }, Input::VersionReport { sw, fw })
                if reported(plan.kind, sw, fw) == Some(plan.target.as_str()) =>
            {
                self.succeed()
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
        };
        vec![Effect::SendVersionQuery]
    }

    fn succeed(&mut self) -> Vec<Effect> {
        self.progress = 100;
        self.phase = Phase::Succeeded { already: false };
        vec![Effect::RevokeTokens]
    }

    fn fail(&mut self, now: Timestamp, plan: &Plan, failure: Failure) -> Vec<Effect> {
        let revoke = matches!(self.phase, Phase::Upgrading { .. });
        self.phase = if failure.retryable() && self.attempts < plan.retry.max_attempts() {
            Phase::RetryWait {
                at: now.plus(plan.retry.retry_interval),
                failure,
            }
        } else {
            Phase::Failed { failure }
        };
        if revoke {
            vec![Effect::RevokeTokens]
        } else {
            Vec::new()
        }
    }
}

/// The version that counts: `sw_version` for software, `fw_version` for firmware, the other one when only
/// it was sent (Java's SDK sends one string as both).
fn reported<'a>(kind: PackageType, sw: Option<&'a str>, fw: Option<&'a str>) -> Option<&'a str> {
    let (first, second) = match kind {
        PackageType::Software => (sw, fw),
        PackageType::Firmware => (fw, sw),
    };
    first
        .filter(|v| !v.is_empty())
        .or_else(|| second.filter(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);
    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn plan() -> Plan {
        Plan {
            kind: PackageType::Software,
            target: "2.0".into(),
            sources: vec!["1.0".into(), "1.1".into()],
            retry: RetryPolicy::NONE,
            timeouts: Timeouts::default(),
        }
    }

    fn with_retries(n: u8) -> Plan {
        Plan {
            retry: RetryPolicy {
                retry_count: n,
                retry_interval: 5 * MIN,
            },
            ..plan()
        }
    }

    fn report<'a>(sw: &'a str) -> Input<'a> {
        Input::VersionReport {
            sw: Some(sw),
            fw: None,
        }
    }

    fn progress(code: i64, pct: i64, version: &str) -> Input<'_> {
        Input::Progress {
            result_code: code,
            progress: Some(pct),
            version: Some(version),
            description: None,
        }
    }

    /// An online device that has been sent the upgrade event.
    fn upgrading(plan: &Plan) -> Subtask {
        let mut s = Subtask::new(true);
        assert_eq!(s.handle(T0, plan, Input::Start), [Effect::SendVersionQuery]);
        assert_eq!(s.handle(T0, plan, report("1.0")), [Effect::SendUpgrade]);
        s
    }

    #[test]
    fn begin_starts_only_a_subtask_that_has_not_started() {
        let p = plan();
        let mut s = Subtask::new(true);
        assert_eq!(s.handle(T0, &p, Input::Begin), [Effect::SendVersionQuery]);
        let mut stopped = Subtask::new(true);
        stopped.handle(T0, &p, Input::Stop);
        assert!(stopped.handle(T0, &p, Input::Begin).is_empty());
        assert_eq!(
            stopped.phase,
            Phase::Stopped,
            "a stop is not undone by a late begin"
        );
        assert!(s.handle(T0, &p, Input::Begin).is_empty(), "begun once");
    }

    #[test]
    fn an_online_device_upgrades_through_every_step() {
        let p = plan();
        let mut s = Subtask::new(true);
        assert_eq!(s.status(), SubtaskStatus::Waiting);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.handle(T0, &p, Input::Start), [Effect::SendVersionQuery]);
        assert_eq!(s.status(), SubtaskStatus::Processing);
        assert_eq!(s.step(), "version_query");
        assert_eq!(s.poll_timeout(), Some(T0.plus(3 * MIN)));
        assert_eq!(
            s.handle(T0.plus(MIN), &p, report("1.0")),
            [Effect::SendUpgrade]
        );
        assert_eq!(s.source_version.as_deref(), Some("1.0"));
        assert_eq!(s.poll_timeout(), Some(T0.plus(MIN).plus(24 * HOUR)));
        assert!(
            s.handle(T0.plus(2 * MIN), &p, progress(0, 40, "1.0"))
                .is_empty()
        );
        assert_eq!(s.progress, 40);
        assert!(
            s.handle(T0.plus(3 * MIN), &p, progress(0, 99, "1.0"))
                .is_empty()
        );
        assert_eq!(s.progress, 99);
        assert_eq!(
            s.handle(T0.plus(4 * MIN), &p, progress(0, 100, "2.0")),
            [Effect::RevokeTokens]
        );
        assert_eq!(s.phase, Phase::Succeeded { already: false });
        assert_eq!(
            (s.status(), s.progress, s.attempts),
            (SubtaskStatus::Success, 100, 1)
        );
        assert!(s.is_final());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_device_already_on_the_target_succeeds_with_nothing_sent() {
        let p = plan();
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        assert!(s.handle(T0, &p, report("2.0")).is_empty());
        assert_eq!(s.phase, Phase::Succeeded { already: true });
    }

    #[test]
    fn a_finished_upgrade_on_another_version_fails_at_once() {
        let p = plan();
        let mut s = upgrading(&p);
        assert!(
            s.handle(T0.plus(MIN), &p, progress(0, 60, "1.0"))
                .is_empty()
        );
        assert_eq!(
            s.handle(T0.plus(2 * MIN), &p, progress(0, 100, "1.0")),
            [Effect::RevokeTokens],
            "a success report on the old version ends the attempt, not the 24-hour deadline"
        );
        assert_eq!(
            s.failure(),
            Some(&Failure::WrongVersion {
                reported: "1.0".into()
            })
        );
        assert_eq!(s.status(), SubtaskStatus::Fail);
        assert_eq!(
            s.failure().map(Failure::code).as_deref(),
            Some("VERSION_MISMATCH")
        );
        // Without a version, 100 % says nothing about what runs: keep waiting.
        let mut s = upgrading(&p);
        let no_version = Input::Progress {
            result_code: 0,
            progress: Some(100),
            version: None,
            description: None,
        };
        assert!(s.handle(T0.plus(MIN), &p, no_version).is_empty());
        assert_eq!((s.step(), s.progress), ("upgrading", 99));
    }

    #[test]
    fn an_unsupported_source_version_fails_without_retrying() {
        let p = with_retries(3);
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        assert!(s.handle(T0, &p, report("0.9")).is_empty());
        assert_eq!(
            s.failure(),
            Some(&Failure::UnsupportedSource {
                current: "0.9".into()
            })
        );
        assert_eq!(s.status(), SubtaskStatus::Fail);
        let any = Plan {
            sources: vec![],
            ..plan()
        };
        let mut s = Subtask::new(true);
        s.handle(T0, &any, Input::Start);
        assert_eq!(
            s.handle(T0, &any, report("0.1")),
            [Effect::SendUpgrade],
            "empty list: any source"
        );
    }

    #[test]
    fn the_reported_version_follows_the_package_type() {
        let fw = Plan {
            kind: PackageType::Firmware,
            ..plan()
        };
        let mut s = Subtask::new(true);
        s.handle(T0, &fw, Input::Start);
        let both = Input::VersionReport {
            sw: Some("2.0"),
            fw: Some("1.1"),
        };
        assert_eq!(
            s.handle(T0, &fw, both),
            [Effect::SendUpgrade],
            "fw_version counts for firmware"
        );
        let mut s = Subtask::new(true);
        s.handle(T0, &fw, Input::Start);
        let sw_only = Input::VersionReport {
            sw: Some("2.0"),
            fw: None,
        };
        assert!(s.handle(T0, &fw, sw_only).is_empty());
        assert_eq!(
            s.phase,
            Phase::Succeeded { already: true },
            "the other field when only it is sent"
        );
        let mut s = Subtask::new(true);
        s.handle(T0, &fw, Input::Start);
        let empty = Input::VersionReport {
            sw: None,
            fw: Some(""),
        };
        assert!(s.handle(T0, &fw, empty).is_empty());
        assert_eq!(s.step(), "version_query", "an empty report is ignored");
    }

    #[test]
    fn a_report_overtaken_by_the_devices_disconnect_still_counts() {
        let p = plan();
        // On the target: success, though the device is offline by now.
        let mut s = Subtask::new(true);
        assert_eq!(s.handle(T0, &p, Input::Start), [Effect::SendVersionQuery]);
        assert!(s.handle(T0, &p, Input::Offline).is_empty());
        assert!(s.handle(T0, &p, report("2.0")).is_empty());
        assert_eq!(s.phase, Phase::Succeeded { already: true });
        assert_eq!(s.progress, 100);
        // On another version: noted; nothing is sent to an offline device, and it is asked again when
        // it is back.
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        s.handle(T0, &p, Input::Offline);
        assert!(s.handle(T0, &p, report("1.0")).is_empty());
        assert!(matches!(s.phase, Phase::WaitOnline { .. }));
        assert_eq!(s.source_version.as_deref(), Some("1.0"));
        assert_eq!(s.handle(T0, &p, Input::Online), [Effect::SendVersionQuery]);
    }

    #[test]
    fn an_offline_device_is_waited_for_25_hours() {
        let p = plan();
        let mut s = Subtask::new(false);
        assert!(s.handle(T0, &p, Input::Start).is_empty());
        assert_eq!(s.step(), "wait_online");
        assert_eq!(s.status(), SubtaskStatus::Waiting);
        assert_eq!(s.poll_timeout(), Some(T0.plus(25 * HOUR)));
        // Early timers do nothing.
        assert!(s.handle(T0.plus(HOUR), &p, Input::Timer).is_empty());
        assert_eq!(s.step(), "wait_online");
        assert_eq!(
            s.handle(T0.plus(20 * HOUR), &p, Input::Online),
            [Effect::SendVersionQuery]
        );
        assert_eq!(s.step(), "version_query");

        let mut late = Subtask::new(false);
        late.handle(T0, &p, Input::Start);
        late.handle(T0.plus(25 * HOUR), &p, Input::Timer);
        assert_eq!(late.failure(), Some(&Failure::NeverOnline));
    }

    #[test]
    fn every_wait_times_out() {
        let p = plan();
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        let just_before = Timestamp::from_millis(T0.plus(3 * MIN).as_millis() - 1);
        assert!(s.handle(just_before, &p, Input::Timer).is_empty());
        assert_eq!(s.step(), "version_query", "not before the deadline");
        s.handle(T0.plus(3 * MIN), &p, Input::Timer);
        assert_eq!(s.failure(), Some(&Failure::NoVersionReport));

        let mut s = upgrading(&p);
        assert_eq!(
            s.handle(T0.plus(24 * HOUR), &p, Input::Timer),
            [Effect::RevokeTokens]
        );
        assert_eq!(s.failure(), Some(&Failure::UpgradeTimeout));
        assert_eq!(s.failure().unwrap().code(), "UPGRADE_RESULT_TIMEOUT");
    }

    #[test]
    fn device_result_codes_fail_with_their_meaning() {
        let p = plan();
        let mut s = upgrading(&p);
        let input = Input::Progress {
            result_code: 5,
            progress: None,
            version: Some("1.0"),
            description: Some("flash full"),
        };
        assert_eq!(s.handle(T0, &p, input), [Effect::RevokeTokens]);
        let f = s.failure().unwrap();
        assert_eq!(f.code(), "DEVICE_RESULT_5");
        assert_eq!(
            f.message(),
            "insufficient storage space (result code 5: flash full)"
        );
        assert_eq!(result_meaning(42), "unknown result code");
        // "Already the latest version" with the target version is a success.
        let mut s = upgrading(&p);
        assert_eq!(
            s.handle(T0, &p, progress(3, 100, "2.0")),
            [Effect::RevokeTokens]
        );
        assert_eq!(s.status(), SubtaskStatus::Success);
    }

    #[test]
    fn a_version_report_of_the_target_while_upgrading_is_success() {
        let p = plan();
        let mut s = upgrading(&p);
        assert_eq!(
            s.handle(T0, &p, report("1.0")),
            [Effect::SendUpgrade],
            "still on the old version: the event again"
        );
        assert_eq!(s.step(), "upgrading");
        assert_eq!(s.handle(T0, &p, report("2.0")), [Effect::RevokeTokens]);
        assert_eq!(s.status(), SubtaskStatus::Success);
    }

    #[test]
    fn failures_retry_after_the_interval_until_attempts_run_out() {
        let p = with_retries(2);
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        s.handle(T0.plus(3 * MIN), &p, Input::Timer);
        assert_eq!(s.status(), SubtaskStatus::FailWaitRetry);
        assert_eq!(s.failure(), Some(&Failure::NoVersionReport));
        let retry_at = T0.plus(8 * MIN);
        assert_eq!(s.poll_timeout(), Some(retry_at));
        assert_eq!(
            s.handle(retry_at, &p, Input::Timer),
            [Effect::SendVersionQuery]
        );
        assert_eq!(s.attempts, 2);
        // Offline at the third attempt: waits for the device.
        s.handle(retry_at, &p, Input::Offline);
        assert_eq!(s.step(), "wait_online");
        s.handle(retry_at.plus(25 * HOUR), &p, Input::Timer);
        assert_eq!(s.status(), SubtaskStatus::FailWaitRetry);
        let third = retry_at.plus(25 * HOUR).plus(5 * MIN);
        assert!(s.handle(third, &p, Input::Timer).is_empty());
        assert_eq!((s.step(), s.attempts), ("wait_online", 3));
        s.handle(third.plus(25 * HOUR), &p, Input::Timer);
        assert_eq!(s.status(), SubtaskStatus::Fail, "three attempts in all");
        // An operator retry starts over.
        assert!(s.handle(third.plus(26 * HOUR), &p, Input::Start).is_empty());
        assert_eq!((s.step(), s.attempts), ("wait_online", 1));
    }

    #[test]
    fn stop_ends_any_open_phase_and_revokes_only_when_a_token_may_exist() {
        let p = with_retries(1);
        let mut pending = Subtask::new(true);
        assert!(pending.handle(T0, &p, Input::Stop).is_empty());
        assert_eq!(pending.status(), SubtaskStatus::Stopped);
        let mut s = upgrading(&p);
        assert_eq!(s.handle(T0, &p, Input::Stop), [Effect::RevokeTokens]);
        assert_eq!(s.status(), SubtaskStatus::Stopped);
        assert!(
            s.handle(T0, &p, progress(0, 100, "2.0")).is_empty(),
            "a stopped subtask ignores reports"
        );
        assert_eq!(s.status(), SubtaskStatus::Stopped);
        let mut retrying = Subtask::new(true);
        retrying.handle(T0, &p, Input::Start);
        retrying.handle(T0.plus(3 * MIN), &p, Input::Timer);
        assert!(
            retrying
                .handle(T0.plus(4 * MIN), &p, Input::Stop)
                .is_empty()
        );
        assert_eq!(retrying.poll_timeout(), None);
        let mut done = upgrading(&p);
        done.handle(T0, &p, progress(0, 100, "2.0"));
        assert!(done.handle(T0, &p, Input::Stop).is_empty());
        assert_eq!(
            done.status(),
            SubtaskStatus::Success,
            "stop leaves finished devices alone"
        );
    }

    #[test]
    fn a_reconnecting_device_is_sent_the_pending_event_again() {
        let p = plan();
        // A new login replacing a lost connection, without a disconnect seen in between.
        let mut s = Subtask::new(true);
        s.handle(T0, &p, Input::Start);
        assert_eq!(
            s.handle(T0.plus(2 * MIN), &p, Input::Online),
            [Effect::SendVersionQuery]
        );
        assert_eq!(
            s.poll_timeout(),
            Some(T0.plus(3 * MIN)),
            "the deadline is not extended"
        );
        // While upgrading, a reconnect asks for the version first: a device still on the old version
        // (with or without progress reported) gets the event again; one on the target has succeeded.
        let mut s = upgrading(&p);
        assert_eq!(s.handle(T0, &p, Input::Online), [Effect::SendVersionQuery]);
        assert_eq!(s.handle(T0, &p, report("1.0")), [Effect::SendUpgrade]);
        s.handle(T0, &p, progress(0, 10, "1.0"));
        assert_eq!(s.handle(T0, &p, Input::Online), [Effect::SendVersionQuery]);
        assert_eq!(s.handle(T0, &p, report("1.0")), [Effect::SendUpgrade]);
        assert_eq!(s.status(), SubtaskStatus::Processing, "deadlines stay");
        let mut s = upgrading(&p);
        s.handle(T0, &p, Input::Online);
        s.handle(T0, &p, report("2.0"));
        assert_eq!(
            s.status(),
            SubtaskStatus::Success,
            "the lost final report is not needed"
        );
    }

    #[test]
    fn an_operator_retry_restarts_stopped_and_retry_waiting_devices_with_fresh_attempts() {
        let p = with_retries(1);
        let mut s = upgrading(&p);
        s.handle(T0, &p, Input::Stop);
        assert_eq!(s.handle(T0, &p, Input::Start), [Effect::SendVersionQuery]);
        assert_eq!((s.step(), s.attempts), ("version_query", 1));
        s.handle(T0.plus(3 * MIN), &p, Input::Timer);
        assert_eq!(s.status(), SubtaskStatus::FailWaitRetry);
        assert_eq!(
            s.handle(T0.plus(4 * MIN), &p, Input::Start),
            [Effect::SendVersionQuery]
        );
        assert_eq!(s.attempts, 1);
        let mut done = upgrading(&p);
        done.handle(T0, &p, progress(0, 100, "2.0"));
        assert!(
            done.handle(T0, &p, Input::Start).is_empty(),
            "a success is not retried"
        );
    }

    #[test]
    fn a_late_success_after_a_timeout_is_reconciled_instead_of_retried() {
        let p = with_retries(2);
        let mut s = upgrading(&p);
        s.handle(T0.plus(25 * HOUR), &p, Input::Timer);
        assert_eq!(s.status(), SubtaskStatus::FailWaitRetry);
        assert_eq!(
            s.handle(T0.plus(25 * HOUR), &p, progress(0, 100, "2.0")),
            [Effect::RevokeTokens]
        );
        assert_eq!(s.status(), SubtaskStatus::Success);
        let mut s = upgrading(&p);
        s.handle(T0.plus(25 * HOUR), &p, Input::Timer);
        s.handle(T0.plus(25 * HOUR), &p, report("2.0"));
        assert_eq!(s.status(), SubtaskStatus::Success);
        let mut s = upgrading(&p);
        s.handle(T0.plus(25 * HOUR), &p, Input::Timer);
        assert!(
            s.handle(T0.plus(25 * HOUR), &p, progress(0, 100, "1.0"))
                .is_empty()
        );
        assert_eq!(
            s.status(),
            SubtaskStatus::FailWaitRetry,
            "only the target counts"
        );
    }

    #[test]
    fn reports_out_of_place_are_ignored() {
        let p = plan();
        let mut s = Subtask::new(true);
        assert!(s.handle(T0, &p, report("1.0")).is_empty());
        assert!(s.handle(T0, &p, progress(0, 100, "2.0")).is_empty());
        assert_eq!(s.phase, Phase::Pending);
        s.handle(T0, &p, Input::Start);
        assert!(s.handle(T0, &p, progress(0, 100, "2.0")).is_empty());
        assert_eq!(
            s.step(),
            "version_query",
            "a result before the upgrade event changes nothing"
        );
    }

    #[test]
    fn the_machine_round_trips_through_json() {
        let mut s = upgrading(&plan());
        s.handle(T0, &plan(), progress(0, 30, "1.0"));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"phase\":\"upgrading\""), "{json}");
        let back: Subtask = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let failed = Phase::Failed {
            failure: Failure::Device {
                code: 7,
                description: None,
            },
        };
        let back: Phase = serde_json::from_str(&serde_json::to_string(&failed).unwrap()).unwrap();
        assert_eq!(back, failed);
    }
}
