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
    /// Whether nothing more will happen without an operator (retry).
    #[must_use]
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Success | Self::Fail | Self::Stopped | Self::Removed
        )
    }
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
    fn progress_counts_by_status() {
        let mut p = TaskProgress::default();
        p.add(SubtaskStatus::Waiting, 3);
        p.add(SubtaskStatus::Success, 2);
        assert_eq!((p.total, p.waitting, p.success), (5, 3, 2));
    }
}
