//! The two upgrade flows behind one face: a task's product decides whether its subtasks run
//! `domain::flow::mqtt` or `domain::flow::lwm2m`; the driver loads, runs and stores either through
//! [`Machine`], and feeds them [`Step`]s.

use domain::Timestamp;
use domain::flow::{lwm2m, mqtt};
use domain::task::SubtaskStatus;
use serde::Serialize;

/// Which flow a task's subtasks run, with its plan.
#[derive(Clone, Debug)]
pub(crate) enum FlowPlan {
    Mqtt(mqtt::Plan),
    Lwm2m(lwm2m::Plan),
}

impl FlowPlan {
    /// The package version the flow upgrades to.
    pub(crate) fn target(&self) -> &str {
        match self {
            Self::Mqtt(p) => &p.target,
            Self::Lwm2m(p) => &p.target,
        }
    }
}

/// One subtask's machine, of its task's flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub(crate) enum Machine {
    Mqtt(mqtt::Subtask),
    Lwm2m(lwm2m::Subtask),
}

/// An input for either flow. The common ones reach both; a flow ignores the other flow's inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step<'a> {
    /// The task begins (only never-started subtasks start), with whether the device is connected now:
    /// it may have connected after the subtask was written, before this process heard of the subtask.
    Begin { online: bool },
    /// An operator retry (restarts a failed, retry-waiting or stopped subtask), with whether the device
    /// is connected now (read under the device's lock like `Begin`'s).
    Start { online: bool },
    /// An operator stop.
    Stop,
    /// A deadline passed.
    Timer,
    /// The device connected or registered.
    Online,
    /// The device disconnected or its registration ended.
    Offline,
    /// An MQTT-only input.
    Mqtt(mqtt::Input<'a>),
    /// An LwM2M-only input.
    Lwm2m(lwm2m::Input<'a>),
}

impl Step<'_> {
    /// Whether this instance decided on the input itself (a deadline passed), so that it applies only
    /// under this instance's lease; devices and operators take the lease over instead, and so does a
    /// download slot granted under its cell's lock (see `transition::Lease`).
    pub(crate) fn respects_lease(&self) -> bool {
        matches!(self, Self::Timer)
    }

    /// Whether the step carries the device's connection state, read when it is applied.
    pub(crate) fn reads_online(&self) -> bool {
        matches!(self, Self::Begin { .. } | Self::Start { .. })
    }
}

/// An effect of either flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AnyEffect {
    Mqtt(mqtt::Effect),
    Lwm2m(lwm2m::Effect),
}

/// A failure of either flow, for the subtask's `error_code` and `error_msg`.
pub(crate) struct FailureText {
    pub code: String,
    pub message: String,
}

impl Machine {
    /// Loads a stored machine (a never-started subtask may have none).
    pub(crate) fn load(plan: &FlowPlan, json: Option<&str>) -> serde_json::Result<Self> {
        Ok(match (plan, json) {
            (FlowPlan::Mqtt(_), Some(j)) => Self::Mqtt(serde_json::from_str(j)?),
            (FlowPlan::Mqtt(_), None) => Self::Mqtt(mqtt::Subtask::new(false)),
            (FlowPlan::Lwm2m(_), Some(j)) => Self::Lwm2m(serde_json::from_str(j)?),
            (FlowPlan::Lwm2m(_), None) => Self::Lwm2m(lwm2m::Subtask::new(false)),
        })
    }

    /// Runs the machine. A plan of the other flow (impossible: both come from the task) changes nothing.
    pub(crate) fn handle(
        &mut self,
        now: Timestamp,
        plan: &FlowPlan,
        step: Step<'_>,
    ) -> Vec<AnyEffect> {
        match (self, plan) {
            (Self::Mqtt(m), FlowPlan::Mqtt(p)) => {
                let input = match step {
                    Step::Begin { online } => {
                        if m.phase == mqtt::Phase::Pending {
                            m.online = online;
                        }
                        mqtt::Input::Begin
                    }
                    Step::Start { online } => {
                        m.online = online;
                        mqtt::Input::Start
                    }
                    Step::Stop => mqtt::Input::Stop,
                    Step::Timer => mqtt::Input::Timer,
                    Step::Online => mqtt::Input::Online,
                    Step::Offline => mqtt::Input::Offline,
                    Step::Mqtt(i) => i,
                    Step::Lwm2m(_) => return Vec::new(),
                };
                m.handle(now, p, input)
                    .into_iter()
                    .map(AnyEffect::Mqtt)
                    .collect()
            }
            (Self::Lwm2m(m), FlowPlan::Lwm2m(p)) => {
                let input = match step {
                    Step::Begin { online } => {
                        if m.phase == lwm2m::Phase::Pending {
                            m.online = online;
                        }
                        lwm2m::Input::Begin
                    }
                    Step::Start { online } => {
                        m.online = online;
                        lwm2m::Input::Start
                    }
                    Step::Stop => lwm2m::Input::Stop,
                    Step::Timer => lwm2m::Input::Timer,
                    Step::Online => lwm2m::Input::Online,
                    Step::Offline => lwm2m::Input::Offline,
                    Step::Lwm2m(i) => i,
                    Step::Mqtt(_) => return Vec::new(),
                };
                m.handle(now, p, input)
                    .into_iter()
                    .map(AnyEffect::Lwm2m)
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    pub(crate) const fn status(&self) -> SubtaskStatus {
        match self {
            Self::Mqtt(m) => m.status(),
            Self::Lwm2m(m) => m.status(),
        }
    }

    pub(crate) const fn step(&self) -> &'static str {
        match self {
            Self::Mqtt(m) => m.step(),
            Self::Lwm2m(m) => m.step(),
        }
    }

    pub(crate) const fn progress(&self) -> u8 {
        match self {
            Self::Mqtt(m) => m.progress,
            Self::Lwm2m(m) => m.progress,
        }
    }

    pub(crate) const fn attempts(&self) -> u8 {
        match self {
            Self::Mqtt(m) => m.attempts,
            Self::Lwm2m(m) => m.attempts,
        }
    }

    pub(crate) fn source_version(&self) -> Option<&str> {
        match self {
            Self::Mqtt(m) => m.source_version.as_deref(),
            Self::Lwm2m(m) => m.source_version.as_deref(),
        }
    }

    pub(crate) const fn poll_timeout(&self) -> Option<Timestamp> {
        match self {
            Self::Mqtt(m) => m.poll_timeout(),
            Self::Lwm2m(m) => m.poll_timeout(),
        }
    }

    pub(crate) const fn is_final(&self) -> bool {
        match self {
            Self::Mqtt(m) => m.is_final(),
            Self::Lwm2m(m) => m.is_final(),
        }
    }

    /// Whether the subtask has not started.
    pub(crate) fn is_pending(&self) -> bool {
        match self {
            Self::Mqtt(m) => m.phase == mqtt::Phase::Pending,
            Self::Lwm2m(m) => m.phase == lwm2m::Phase::Pending,
        }
    }

    pub(crate) fn failure(&self) -> Option<FailureText> {
        match self {
            Self::Mqtt(m) => m.failure().map(|f| FailureText {
                code: f.code(),
                message: f.message(),
            }),
            Self::Lwm2m(m) => m.failure().map(|f| FailureText {
                code: f.code(),
                message: f.message(),
            }),
        }
    }
}
