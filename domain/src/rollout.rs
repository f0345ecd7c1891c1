//! Safe rollouts (README, "Safe rollouts"): a task's targets in ordered **waves**, an **automatic pause**
//! when failures pass a threshold, **pacing** (starts per minute, devices in flight) and **maintenance
//! windows**. All of it is decided here, purely: the driver counts what the database holds, passes `now`,
//! and asks [`Rollout::decide`] how many devices may start; it never decides itself.
//!
//! - [`waves`]: which target goes in which wave, fixed when the task starts, reproducible from the seed.
//! - [`window`]: recurring maintenance windows in a time zone.

pub mod waves;
pub mod window;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::window::Window;
use crate::{Timestamp, ValidationError};

/// The success threshold of a wave that names none: 95 % of its devices.
pub const DEFAULT_SUCCESS_THRESHOLD: u8 = 95;

/// The most waves a task may have.
pub const MAX_WAVES: usize = 20;

/// How a task rolls out: an Updraft extension of `CreateBatchTask` (`rollout`), stored with the task. A
/// task without one starts every target at once, as IoTDA does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// The waves, in order. Targets no wave takes form a last wave (added when checked).
    #[serde(default)]
    pub waves: Vec<Wave>,
    /// Pauses the task when the whole task's failures pass it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_threshold: Option<ErrorThreshold>,
    /// At most this many devices start in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_minute: Option<u32>,
    /// At most this many devices are started and not finished at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Devices start only inside one of these (any time when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maintenance_windows: Vec<Window>,
    /// Orders the targets for waves by size; chosen at random when absent, then stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// One wave: its size (one of `percent`, `count`, `group_ids`; none: every target left), when the next
/// wave may start, and when to pause.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WaveWire", into = "WaveWire")]
pub struct Wave {
    /// How many targets, or which.
    pub size: WaveSize,
    /// The share of the wave (percent) that must succeed before the next wave starts.
    pub success_threshold: u8,
    /// After the threshold is reached, how long to wait before the next wave starts.
    pub soak: Option<Duration>,
    /// Pauses the task when this wave's failures pass it.
    pub error_threshold: Option<ErrorThreshold>,
}

impl Wave {
    /// Whether enough of the wave succeeded for the next to start.
    fn reached(&self, c: &WaveCounts) -> bool {
        u64::from(c.succeeded) * 100 >= u64::from(self.success_threshold) * u64::from(c.total)
    }
}

/// How a wave is sized.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum WaveSize {
    /// A percentage (1-100) of all targets, rounded up.
    Percent(u8),
    /// A number of targets.
    Count(u32),
    /// The targets in these groups (not in an earlier wave).
    Groups(Vec<String>),
    /// Every target left.
    #[default]
    Rest,
}

/// [`Wave`] as JSON.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaveWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    count: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    group_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    success_threshold: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    soak_minutes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error_threshold: Option<ErrorThreshold>,
}

impl TryFrom<WaveWire> for Wave {
    type Error = String;

    fn try_from(w: WaveWire) -> Result<Self, String> {
        let size = match (w.percent, w.count, w.group_ids.is_empty()) {
            (None, None, true) => WaveSize::Rest,
            (Some(p), None, true) => WaveSize::Percent(p),
            (None, Some(c), true) => WaveSize::Count(c),
            (None, None, false) => WaveSize::Groups(w.group_ids),
            _ => return Err("a wave has one of percent, count or group_ids".to_owned()),
        };
        Ok(Self {
            size,
            success_threshold: w.success_threshold.unwrap_or(DEFAULT_SUCCESS_THRESHOLD),
            soak: w
                .soak_minutes
                .map(|m| Duration::from_secs(u64::from(m) * 60)),
            error_threshold: w.error_threshold,
        })
    }
}

impl From<Wave> for WaveWire {
    fn from(w: Wave) -> Self {
        let mut out = Self {
            success_threshold: Some(w.success_threshold),
            soak_minutes: w
                .soak
                .map(|s| u32::try_from(s.as_secs() / 60).unwrap_or(u32::MAX)),
            error_threshold: w.error_threshold,
            ..Self::default()
        };
        match w.size {
            WaveSize::Percent(p) => out.percent = Some(p),
            WaveSize::Count(c) => out.count = Some(c),
            WaveSize::Groups(g) => out.group_ids = g,
            WaveSize::Rest => {}
        }
        out
    }
}

impl WaveSize {
    /// Waves as an operator types them: sizes separated by commas, each a percentage (`10%`) or a count
    /// (`50`): `"1%, 10%, 50%"`. Empty: no waves.
    ///
    /// # Errors
    /// A size that is neither, naming `field`.
    pub fn parse_list(field: &str, text: &str) -> Result<Vec<Self>, ValidationError> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let bad = || {
                    ValidationError::new(
                        field,
                        format!("{s:?}: give each wave as a percentage (10%) or a number of devices (50)"),
                    )
                };
                match s.strip_suffix('%') {
                    Some(p) => p.trim().parse::<u8>().map(Self::Percent).map_err(|_| bad()),
                    None => s.parse::<u32>().map(Self::Count).map_err(|_| bad()),
                }
            })
            .collect()
    }
}

/// The kinds of failure a threshold counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The device reported a failed download, install or version.
    DeviceFailure,
    /// The device did not answer in time (offline, no report, no result).
    Timeout,
    /// The device refused the upgrade (its version is not a source, it declined the package or URI).
    Refusal,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [Self; 3] = [Self::DeviceFailure, Self::Timeout, Self::Refusal];

    /// The kind of a subtask's `error_code`.
    #[must_use]
    pub fn of(error_code: &str) -> Self {
        if error_code.ends_with("_TIMEOUT") {
            Self::Timeout
        } else if error_code == "SOURCE_VERSION_NOT_SUPPORTED"
            || error_code == "FIRMWARE_URI_REFUSED"
            || error_code.starts_with("PCP_NOTIFY_REFUSED")
            || error_code.starts_with("PCP_EXECUTE_FAILED")
        {
            Self::Refusal
        } else {
            Self::DeviceFailure
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::DeviceFailure => 0,
            Self::Timeout => 1,
            Self::Refusal => 2,
        }
    }
}

/// When failures pause the task: more than `max_failures` of the counted kinds, or more than
/// `max_failure_percent` of the finished devices once at least `min_finished` have finished. Counted since
/// the task started or was last resumed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorThreshold {
    /// Failures allowed; one more pauses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    /// Percentage of finished devices allowed to fail; more pauses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failure_percent: Option<u8>,
    /// The percentage applies once this many devices have finished (default 1).
    #[serde(default = "one")]
    pub min_finished: u32,
    /// The kinds counted (default all).
    #[serde(default = "all_kinds")]
    pub count: Vec<ErrorKind>,
}

const fn one() -> u32 {
    1
}

fn all_kinds() -> Vec<ErrorKind> {
    ErrorKind::ALL.to_vec()
}

impl ErrorThreshold {
    /// Why `counts` pass this threshold, if they do.
    fn passed(&self, counts: &Recent) -> Option<String> {
        let failed: u32 = self.count.iter().map(|k| counts.failures[k.index()]).sum();
        if let Some(max) = self.max_failures
            && failed > max
        {
            let devices = if failed == 1 { "device" } else { "devices" };
            return Some(format!(
                "{failed} {devices} failed, more than the {max} allowed"
            ));
        }
        if let Some(pct) = self.max_failure_percent
            && counts.finished >= self.min_finished.max(1)
            && u64::from(failed) * 100 > u64::from(pct) * u64::from(counts.finished)
        {
            return Some(format!(
                "{failed} of {} finished devices failed ({}%), more than the {pct}% allowed",
                counts.finished,
                u64::from(failed) * 100 / u64::from(counts.finished)
            ));
        }
        None
    }

    fn check(&self, field: &str) -> Result<(), ValidationError> {
        if self.max_failures.is_none() && self.max_failure_percent.is_none() {
            return Err(ValidationError::new(
                field,
                "give max_failures, max_failure_percent or both",
            ));
        }
        if self.max_failure_percent.is_some_and(|p| p > 100) {
            return Err(ValidationError::new(
                format!("{field}.max_failure_percent"),
                "must be 0-100",
            ));
        }
        if self.count.is_empty() {
            return Err(ValidationError::new(
                format!("{field}.count"),
                "count at least one kind: device_failure, timeout, refusal",
            ));
        }
        Ok(())
    }
}

impl Rollout {
    /// Checks the policy and completes it: a last wave for the targets no wave takes, and `seed` when
    /// absent.
    ///
    /// # Errors
    /// The first rule broken, naming its field (`rollout.waves[1].percent`).
    pub fn check(mut self, seed: u64) -> Result<Self, ValidationError> {
        if self.waves.len() > MAX_WAVES {
            return Err(ValidationError::new(
                "rollout.waves",
                format!("at most {MAX_WAVES} waves"),
            ));
        }
        for (i, w) in self.waves.iter().enumerate() {
            let field = format!("rollout.waves[{i}]");
            match &w.size {
                WaveSize::Percent(p) if !(1..=100).contains(p) => {
                    return Err(ValidationError::new(
                        format!("{field}.percent"),
                        "must be 1-100",
                    ));
                }
                WaveSize::Count(0) => {
                    return Err(ValidationError::new(
                        format!("{field}.count"),
                        "must be at least 1",
                    ));
                }
                WaveSize::Rest if i + 1 < self.waves.len() => {
                    return Err(ValidationError::new(
                        field,
                        "only the last wave may take every target left (give percent, count or group_ids)",
                    ));
                }
                _ => {}
            }
            if w.success_threshold > 100 {
                return Err(ValidationError::new(
                    format!("{field}.success_threshold"),
                    "must be 0-100",
                ));
            }
            if let Some(t) = &w.error_threshold {
                t.check(&format!("{field}.error_threshold"))?;
            }
        }
        if let Some(t) = &self.error_threshold {
            t.check("rollout.error_threshold")?;
        }
        if self.max_per_minute == Some(0) {
            return Err(ValidationError::new(
                "rollout.max_per_minute",
                "must be at least 1",
            ));
        }
        if self.max_in_flight == Some(0) {
            return Err(ValidationError::new(
                "rollout.max_in_flight",
                "must be at least 1",
            ));
        }
        for (i, w) in self.maintenance_windows.iter().enumerate() {
            w.check(&format!("rollout.maintenance_windows[{i}]"))?;
        }
        if self.waves.last().is_none_or(|w| w.size != WaveSize::Rest) {
            self.waves.push(Wave {
                success_threshold: DEFAULT_SUCCESS_THRESHOLD,
                ..Wave::default()
            });
        }
        self.seed.get_or_insert(seed);
        Ok(self)
    }

    /// The stored seed (0 before [`Rollout::check`]).
    #[must_use]
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }
}

/// A wave's devices as the database has them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveCounts {
    /// Devices in the wave.
    pub total: u32,
    /// Not started yet.
    pub pending: u32,
    /// Started, not finished.
    pub in_flight: u32,
    /// Succeeded.
    pub succeeded: u32,
    /// Failed.
    pub failed: u32,
    /// What finished since the task started or was last resumed, for the error thresholds.
    #[serde(skip)]
    pub recent: Recent,
}

/// Devices finished since the task started or was last resumed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recent {
    /// Finished in any way (succeeded, failed, stopped).
    pub finished: u32,
    /// Failed, by [`ErrorKind`] (device failure, timeout, refusal).
    pub failures: [u32; 3],
}

impl Recent {
    /// Counts `n` finished devices; `error_code` when they failed.
    pub fn add(&mut self, error_code: Option<&str>, n: u32) {
        self.finished += n;
        if let Some(code) = error_code {
            self.failures[ErrorKind::of(code).index()] += n;
        }
    }

    fn plus(&self, other: &Self) -> Self {
        Self {
            finished: self.finished + other.finished,
            failures: [0, 1, 2].map(|i| self.failures[i] + other.failures[i]),
        }
    }
}

/// Devices started lately, for `max_per_minute`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Starts {
    /// Started in the last 60 seconds (after `now - 60 s`).
    pub last_minute: u32,
    /// The earliest of them.
    pub oldest: Option<Timestamp>,
}

/// Where a rollout stands, stored with the task.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The latest wave allowed to start (earlier waves' devices go first).
    pub wave: usize,
    /// When that wave reached its success threshold: the soak runs from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Timestamp>,
    /// Why and when the task paused, while it is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Pause>,
    /// When an operator last resumed it: failures before this do not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<Timestamp>,
}

/// A pause.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// For an operator: which threshold, by how much.
    pub reason: String,
    /// When.
    pub at: Timestamp,
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// The state to store.
    pub state: RolloutState,
    /// How many not-yet-started devices of waves `0..=state.wave` to start, earliest wave first.
    pub start: u32,
    /// Set when the task pauses now.
    pub paused: Option<Pause>,
    /// Ask again then (a soak ends, the pace allows more, a window opens), unless something happens
    /// sooner.
    pub wake_at: Option<Timestamp>,
}

impl Rollout {
    /// What may happen now, given the rollout's `state`, each wave's `counts` (one per wave) and the
    /// recent `starts`.
    #[must_use]
    pub fn decide(
        &self,
        state: &RolloutState,
        counts: &[WaveCounts],
        starts: &Starts,
        now: Timestamp,
    ) -> Decision {
        let mut state = state.clone();
        if state.paused.is_some() || counts.is_empty() {
            return Decision {
                state,
                ..Decision::default()
            };
        }
        let last = self.waves.len().min(counts.len()).saturating_sub(1);
        state.wave = state.wave.min(last);
        let pause = |mut state: RolloutState, reason: String| {
            let pause = Pause { reason, at: now };
            state.paused = Some(pause.clone());
            Decision {
                state,
                paused: Some(pause),
                ..Decision::default()
            }
        };
        // Thresholds first: a breach stops new starts at once.
        if let Some(reason) = self.breach(&state, counts) {
            return pause(state, reason);
        }
        let mut wake_at = None;
        // The next wave opens when this one has succeeded enough, and soaked.
        while state.wave < last {
            let (wave, c) = (&self.waves[state.wave], &counts[state.wave]);
            if !wave.reached(c) {
                if c.pending == 0 && c.in_flight == 0 {
                    let reason = format!(
                        "wave {} finished with {} of {} devices succeeded, below its {}% success threshold",
                        state.wave + 1,
                        c.succeeded,
                        c.total,
                        wave.success_threshold
                    );
                    return pause(state, reason);
                }
                break;
            }
            if let Some(soak) = wave.soak {
                let until = state.ready_at.get_or_insert(now).plus(soak);
                if now < until {
                    wake_at = Some(until);
                    break;
                }
            }
            state.wave += 1;
            state.ready_at = None;
        }
        let pending: u32 = counts[..=state.wave].iter().map(|c| c.pending).sum();
        if pending == 0 {
            return Decision {
                state,
                wake_at,
                ..Decision::default()
            };
        }
        // Only inside a maintenance window.
        if !self.maintenance_windows.is_empty() {
            let opens = self
                .maintenance_windows
                .iter()
                .filter_map(|w| w.check("").ok()?.next_open(now))
                .min();
            if opens != Some(now) {
                return Decision {
                    state,
                    wake_at: earliest(wake_at, opens),
                    ..Decision::default()
                };
            }
        }
        let mut allowed = pending;
        if let Some(max) = self.max_in_flight {
            let in_flight: u32 = counts.iter().map(|c| c.in_flight).sum();
            allowed = allowed.min(max.saturating_sub(in_flight));
        }
        if let Some(max) = self.max_per_minute {
            let room = max.saturating_sub(starts.last_minute);
            if room < allowed {
                allowed = room;
                // More may start when the oldest start of the minute leaves it.
                let next = starts
                    .oldest
                    .map_or(now, |o| o.plus(Duration::from_secs(60)));
                wake_at = earliest(wake_at, Some(next.max(now)));
            }
        }
        Decision {
            state,
            start: allowed,
            paused: None,
            wake_at,
        }
    }

    /// The state after an operator resumes a paused task at `now`: failures before now no longer count
    /// (the driver counts from `resumed_at`), and a wave that finished below its success threshold is
    /// accepted as it is, so the next one may start.
    #[must_use]
    pub fn resume(
        &self,
        state: &RolloutState,
        counts: &[WaveCounts],
        now: Timestamp,
    ) -> RolloutState {
        let mut state = state.clone();
        state.paused = None;
        state.resumed_at = Some(now);
        let last = self.waves.len().min(counts.len()).saturating_sub(1);
        if state.wave < last {
            let (wave, c) = (&self.waves[state.wave], &counts[state.wave]);
            if !wave.reached(c) && c.pending == 0 && c.in_flight == 0 {
                state.wave += 1;
                state.ready_at = None;
            }
        }
        state
    }

    /// The first error threshold the counts pass: the task's, then each started wave's.
    fn breach(&self, state: &RolloutState, counts: &[WaveCounts]) -> Option<String> {
        if let Some(t) = &self.error_threshold {
            let all = counts
                .iter()
                .fold(Recent::default(), |sum, c| sum.plus(&c.recent));
            if let Some(why) = t.passed(&all) {
                return Some(format!("task error threshold: {why}"));
            }
        }
        for (i, (wave, c)) in self
            .waves
            .iter()
            .zip(counts)
            .enumerate()
            .take(state.wave + 1)
        {
            if let Some(why) = wave
                .error_threshold
                .as_ref()
                .and_then(|t| t.passed(&c.recent))
            {
                return Some(format!("wave {} error threshold: {why}", i + 1));
            }
        }
        None
    }
}

fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests;
