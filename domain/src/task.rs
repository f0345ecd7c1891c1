//! Batch tasks and their per-device subtasks: types, statuses and progress counters.

use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::device::wire_enum;

wire_enum!(
    /// The kind of batch task (`task_type`). Updraft runs the two upgrade kinds.
    TaskType, "task_type" {
        /// Software upgrade (SOTA).
        SoftwareUpgrade = "softwareUpgrade",
        /// Firmware upgrade (FOTA).
        FirmwareUpgrade = "firmwareUpgrade",
    }
);

wire_enum!(
    /// A task's status, spelled as IoTDA spells it (`Waitting` included).
    TaskStatus, "status" {
        /// Being set up (targets resolved, subtasks written).
        Initializing = "Initializing",
        /// Waiting for its schedule time.
        Waiting = "Waitting",
        /// Running.
        Processing = "Processing",
        /// Every subtask succeeded.
        Success = "Success",
        /// Every subtask failed.
        Fail = "Fail",
        /// Some succeeded, some did not.
        PartialSuccess = "PartialSuccess",
        /// Stopped by an operator.
        Stopped = "Stopped",
        /// A stop is in progress.
        Stopping = "Stopping",
        /// A rollout threshold was passed (an Updraft extension): devices in flight finish, no new
        /// device starts until an operator resumes or stops it.
        Paused = "Paused",
    }
);

impl TaskStatus {
    /// `Success`, `Fail`, `PartialSuccess` and `Stopped`: the states in which a task may be deleted.
    #[must_use]
    pub const fn is_completed(self) -> bool {
        matches!(
            self,
            Self::Success | Self::Fail | Self::PartialSuccess | Self::Stopped
        )
    }

    /// The task's `status_desc` in this status, with its subtask counts.
    #[must_use]
    pub fn describe(self, p: &TaskProgress) -> String {
        match self {
            Self::Initializing => "resolving targets".to_owned(),
            Self::Waiting => "waiting to start".to_owned(),
            Self::Processing => format!(
                "{} of {} devices done ({} succeeded, {} failed)",
                p.success + p.fail + p.stopped,
                p.total,
                p.success,
                p.fail
            ),
            Self::Stopping => "stopping".to_owned(),
            Self::Paused => format!(
                "paused: {} of {} devices done ({} succeeded, {} failed)",
                p.success + p.fail + p.stopped,
                p.total,
                p.success,
                p.fail
            ),
            Self::Stopped => format!("stopped ({} of {} succeeded)", p.success, p.total),
            Self::Success => format!("all {} devices succeeded", p.success),
            Self::Fail => format!("all {} devices failed", p.fail),
            Self::PartialSuccess => format!(
                "{} of {} devices succeeded, {} failed",
                p.success, p.total, p.fail
            ),
        }
    }
}

wire_enum!(
    /// A subtask's status (IoTDA `TaskDetail.status`).
    SubtaskStatus, "task_detail_status" {
        /// Waiting to run (for the schedule, the device, or a confirmation).
        Waiting = "Waitting",
        /// Running.
        Processing = "Processing",
        /// The device is on the target version.
        Success = "Success",
        /// Failed for good.
        Fail = "Fail",
        /// Failed; an automatic retry is due.
        FailWaitRetry = "FailWaitRetry",
        /// Stopped by an operator.
        Stopped = "Stopped",
        /// Removed from the task.
        Removed = "Removed",
    }
);

impl SubtaskStatus {
    /// The statuses in which something can still happen without an operator.
    pub const OPEN: [Self; 3] = [Self::Waiting, Self::Processing, Self::FailWaitRetry];

    /// Whether nothing more will happen without an operator (retry).
    #[must_use]
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Success | Self::Fail | Self::Stopped | Self::Removed
        )
    }
}

/// Validates a task name: 1-128 characters of letters, digits, `_` and Chinese characters (IoTDA's rule: no
/// hyphen, no spaces).
///
/// # Errors
/// [`ValidationError`] for `task_name`.
pub fn parse_task_name(s: &str) -> Result<String, ValidationError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(ValidationError::new("task_name", "is required"));
    }
    if s.chars().count() > 128 {
        return Err(ValidationError::new(
            "task_name",
            "must be at most 128 characters",
        ));
    }
    let allowed = |c: char| {
        c.is_ascii_alphanumeric()
            || c == '_'
            || ('\u{4e00}'..='\u{9fff}').contains(&c)
            || ('\u{3400}'..='\u{4dbf}').contains(&c)
    };
    if let Some(bad) = s.chars().find(|c| !allowed(*c)) {
        return Err(ValidationError::new(
            "task_name",
            format!("may contain only letters, digits, '_' and Chinese characters, not {bad:?}"),
        ));
    }
    Ok(s.to_owned())
}

/// The furthest ahead a task may be scheduled.
pub const MAX_SCHEDULE_AHEAD: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Checks a task's `schedule_time` against `now`: at most 7 days ahead, and not in the past (a minute of
/// clock skew is forgiven; such a task starts at once).
///
/// # Errors
/// [`ValidationError`] for `task_policy.schedule_time`.
pub fn check_schedule(
    now: crate::Timestamp,
    at: crate::Timestamp,
) -> Result<crate::Timestamp, ValidationError> {
    let field = "task_policy.schedule_time";
    if at > now.plus(MAX_SCHEDULE_AHEAD) {
        return Err(ValidationError::new(
            field,
            "must be within the next 7 days",
        ));
    }
    if at.plus(std::time::Duration::from_secs(60)) < now {
        return Err(ValidationError::new(field, "is in the past"));
    }
    Ok(at)
}

/// IoTDA's `task_progress`: subtask counts by status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskProgress {
    /// All subtasks.
    pub total: u64,
    /// Running.
    pub processing: u64,
    /// Succeeded.
    pub success: u64,
    /// Failed.
    pub fail: u64,
    /// Waiting (IoTDA's spelling).
    pub waitting: u64,
    /// Failed, retry due.
    pub fail_wait_retry: u64,
    /// Stopped.
    pub stopped: u64,
    /// Removed.
    pub removed: u64,
}

impl TaskProgress {
    /// Adds `n` subtasks in `status`.
    pub fn add(&mut self, status: SubtaskStatus, n: u64) {
        self.total += n;
        let slot = match status {
            SubtaskStatus::Waiting => &mut self.waitting,
            SubtaskStatus::Processing => &mut self.processing,
            SubtaskStatus::Success => &mut self.success,
            SubtaskStatus::Fail => &mut self.fail,
            SubtaskStatus::FailWaitRetry => &mut self.fail_wait_retry,
            SubtaskStatus::Stopped => &mut self.stopped,
            SubtaskStatus::Removed => &mut self.removed,
        };
        *slot += n;
    }
}

impl TaskProgress {
    /// Subtasks still in play: waiting, running, or waiting to retry.
    #[must_use]
    pub const fn open(&self) -> u64 {
        self.waitting + self.processing + self.fail_wait_retry
    }

    /// The task's status as IoTDA derives it from its subtasks, for a task that has started:
    /// `Processing` (or `Stopping` after a stop) while any subtask is open; then `Stopped` after a stop,
    /// `Success` when every counted subtask succeeded, `Fail` when none did, `PartialSuccess` otherwise.
    /// Removed subtasks do not count.
    #[must_use]
    pub const fn derived_status(&self, stop_requested: bool) -> TaskStatus {
        let counted = self.total.saturating_sub(self.removed);
        if self.open() > 0 {
            if stop_requested {
                TaskStatus::Stopping
            } else {
                TaskStatus::Processing
            }
        } else if stop_requested {
            TaskStatus::Stopped
        } else if self.success == counted {
            TaskStatus::Success
        } else if self.success == 0 {
            TaskStatus::Fail
        } else {
            TaskStatus::PartialSuccess
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_use_iotda_spelling() {
        assert_eq!(TaskStatus::Waiting.as_str(), "Waitting");
        assert_eq!(
            SubtaskStatus::parse("FailWaitRetry").unwrap(),
            SubtaskStatus::FailWaitRetry
        );
        assert!(TaskStatus::PartialSuccess.is_completed());
        assert!(!TaskStatus::Stopping.is_completed());
    }

    #[test]
    fn task_names_follow_iotda_rules() {
        assert_eq!(parse_task_name(" meter_fw_2 ").unwrap(), "meter_fw_2");
        assert_eq!(parse_task_name("升级任务_1").unwrap(), "升级任务_1");
        assert!(
            parse_task_name("with-hyphen")
                .unwrap_err()
                .message
                .contains("'-'")
        );
        assert!(parse_task_name("two words").is_err());
        assert!(parse_task_name("").is_err());
        assert!(parse_task_name(&"a".repeat(129)).is_err());
        assert!(parse_task_name(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn schedules_are_at_most_seven_days_ahead_and_not_in_the_past() {
        use crate::Timestamp;
        use std::time::Duration;
        let now = Timestamp::from_millis(1_800_000_000_000);
        assert!(check_schedule(now, now.plus(MAX_SCHEDULE_AHEAD)).is_ok());
        let late = now.plus(MAX_SCHEDULE_AHEAD).plus(Duration::from_millis(1));
        assert_eq!(
            check_schedule(now, late).unwrap_err().field,
            "task_policy.schedule_time"
        );
        assert!(check_schedule(now, Timestamp::from_millis(now.as_millis() - 30_000)).is_ok());
        assert!(check_schedule(now, Timestamp::from_millis(now.as_millis() - 61_000)).is_err());
    }

    #[test]
    fn progress_counts_by_status() {
        let mut p = TaskProgress::default();
        p.add(SubtaskStatus::Waiting, 3);
        p.add(SubtaskStatus::Success, 2);
        assert_eq!((p.total, p.waitting, p.success), (5, 3, 2));
    }

    #[test]
    fn task_status_is_derived_from_its_subtasks() {
        let progress = |pairs: &[(SubtaskStatus, u64)]| {
            let mut p = TaskProgress::default();
            for (s, n) in pairs {
                p.add(*s, *n);
            }
            p
        };
        use SubtaskStatus as S;
        let running = progress(&[(S::Success, 2), (S::Processing, 1), (S::FailWaitRetry, 1)]);
        assert_eq!(running.open(), 2);
        assert_eq!(running.derived_status(false), TaskStatus::Processing);
        assert_eq!(running.derived_status(true), TaskStatus::Stopping);
        assert_eq!(
            progress(&[(S::Success, 3), (S::Removed, 1)]).derived_status(false),
            TaskStatus::Success
        );
        assert_eq!(
            progress(&[(S::Fail, 3)]).derived_status(false),
            TaskStatus::Fail
        );
        assert_eq!(
            progress(&[(S::Success, 1), (S::Fail, 2)]).derived_status(false),
            TaskStatus::PartialSuccess
        );
        assert_eq!(
            progress(&[(S::Success, 1), (S::Stopped, 2)]).derived_status(true),
            TaskStatus::Stopped
        );
        assert_eq!(
            TaskProgress::default().derived_status(false),
            TaskStatus::Success,
            "an empty task is done"
        );
    }
}
