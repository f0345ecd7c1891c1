//! The per-device upgrade flows as pure state machines (`design.md`, "The two upgrade flows").
//!
//! A machine takes the current time and an input (a device event, its deadline passing, an operator
//! command) and returns the effects to perform; it exposes its next deadline with `poll_timeout()`. It never
//! reads a clock or touches I/O, so every step and timeout is tested on plain numbers.
//!
//! - [`mqtt`]: IoTDA's MQTT `$ota` flow.
//! - [`lwm2m`]: the LwM2M flow with Huawei's PCP (software upgrades of NB-IoT devices).

pub mod lwm2m;
pub mod mqtt;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// A task's retry policy: how many times a failed device is tried again, and after how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Extra attempts after the first (0-5).
    pub retry_count: u8,
    /// The wait before each extra attempt (1-1440 minutes).
    pub retry_interval: Duration,
}

impl RetryPolicy {
    /// No retries.
    pub const NONE: Self = Self {
        retry_count: 0,
        retry_interval: Duration::from_secs(60),
    };

    /// Validates IoTDA's `retry_count` (0-5) and `retry_interval` (1-1440 minutes).
    ///
    /// # Errors
    /// [`ValidationError`] naming the field.
    pub fn parse(retry_count: i64, retry_interval_minutes: i64) -> Result<Self, ValidationError> {
        let retry_count = u8::try_from(retry_count)
            .ok()
            .filter(|n| *n <= 5)
            .ok_or_else(|| ValidationError::new("retry_count", "must be 0 to 5"))?;
        let minutes = u64::try_from(retry_interval_minutes)
            .ok()
            .filter(|m| (1..=1440).contains(m))
            .ok_or_else(|| ValidationError::new("retry_interval", "must be 1 to 1440 minutes"))?;
        Ok(Self {
            retry_count,
            retry_interval: Duration::from_secs(minutes * 60),
        })
    }

    /// Attempts in all (the first plus the retries).
    #[must_use]
    pub const fn max_attempts(self) -> u8 {
        self.retry_count + 1
    }
}

/// The meaning of a device's result code: MQTT's `result_code` (`protocols.md` §1.8) and PCP's result
/// byte (§2.4) share one code space.
#[must_use]
pub const fn result_meaning(code: i64) -> &'static str {
    match code {
        0 => "success",
        1 => "device in use",
        2 => "poor signal",
        3 => "already the latest version",
        4 => "low battery",
        5 => "insufficient storage space",
        6 => "download timeout",
        7 => "upgrade package verification failure",
        8 => "unsupported upgrade package type",
        9 => "insufficient memory",
        10 => "upgrade package installation failure",
        0x7F => "internal error",
        0x80 => "upgrade task does not exist",
        0x81 => "segment does not exist",
        255 => "internal exception",
        _ => "unknown result code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policies_are_bounded_like_iotda() {
        let p = RetryPolicy::parse(2, 5).unwrap();
        assert_eq!(p.max_attempts(), 3);
        assert_eq!(p.retry_interval, Duration::from_secs(300));
        assert_eq!(RetryPolicy::parse(6, 5).unwrap_err().field, "retry_count");
        assert_eq!(RetryPolicy::parse(-1, 5).unwrap_err().field, "retry_count");
        assert_eq!(
            RetryPolicy::parse(1, 0).unwrap_err().field,
            "retry_interval"
        );
        assert_eq!(
            RetryPolicy::parse(1, 1441).unwrap_err().field,
            "retry_interval"
        );
        assert!(RetryPolicy::parse(0, 1440).is_ok());
    }
}
