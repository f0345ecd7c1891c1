//! Points in time as milliseconds since the Unix epoch, and the formats IoTDA puts on the wire.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

/// Milliseconds since 1970-01-01T00:00:00Z. The database stores exactly this number.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(i64);

/// IoTDA's compact UTC format, `yyyyMMdd'T'HHmmss'Z'` (`20151212T121212Z`).
const COMPACT: &str = "%Y%m%dT%H%M%SZ";

impl Timestamp {
    /// The epoch itself.
    pub const EPOCH: Self = Self(0);

    /// From milliseconds since the epoch.
    #[must_use]
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the epoch.
    #[must_use]
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// `self + d`, saturating at the ends of the range.
    #[must_use]
    pub fn plus(self, d: std::time::Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(ms))
    }

    /// The time from `earlier` to `self`, or zero when `earlier` is later.
    #[must_use]
    pub fn since(self, earlier: Self) -> std::time::Duration {
        let ms = self.0.saturating_sub(earlier.0).max(0);
        std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }

    fn to_chrono(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0).unwrap_or_default()
    }

    /// IoTDA's compact form, `20151212T121212Z` (seconds precision, UTC).
    #[must_use]
    pub fn to_compact(self) -> String {
        self.to_chrono().format(COMPACT).to_string()
    }

    /// IoTDA's millisecond form used by two device fields, `2015-12-12T12:12:12.000Z`.
    #[must_use]
    pub fn to_iso_millis(self) -> String {
        self.to_chrono()
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string()
    }

    /// Parses IoTDA's compact form (`20151212T121212Z`).
    ///
    /// # Errors
    /// A [`crate::ValidationError`] naming `field` when `s` is not in that form.
    pub fn parse_compact(field: &str, s: &str) -> Result<Self, crate::ValidationError> {
        NaiveDateTime::parse_from_str(s, COMPACT)
            .map(|t| Self(t.and_utc().timestamp_millis()))
            .map_err(|_| {
                crate::ValidationError::new(field, "expected a UTC time like 20151212T121212Z")
            })
    }

    /// Parses an HTML `datetime-local` value (`2026-12-02T10:30`, seconds optional), read in a time zone
    /// `offset_minutes` west of UTC (JavaScript's `getTimezoneOffset()`: UTC = local + offset).
    ///
    /// # Errors
    /// A [`crate::ValidationError`] naming `field` when `s` is not such a value or the offset is beyond
    /// ±18 hours.
    pub fn parse_local_input(
        field: &str,
        s: &str,
        offset_minutes: i64,
    ) -> Result<Self, crate::ValidationError> {
        if offset_minutes.abs() > 18 * 60 {
            return Err(crate::ValidationError::new(
                field,
                "the browser's time zone offset is out of range",
            ));
        }
        let s = s.trim();
        let local = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M")
            .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S"))
            .map_err(|_| crate::ValidationError::new(field, "expected a date and time"))?;
        Ok(Self(
            local.and_utc().timestamp_millis() + offset_minutes * 60_000,
        ))
    }
}

impl fmt::Display for Timestamp {
    /// Human form for logs and the console: `2015-12-12 12:12:12 UTC`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_chrono().format("%Y-%m-%d %H:%M:%S UTC"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_form_round_trips() {
        let t = Timestamp::parse_compact("schedule_time", "20151212T121212Z").unwrap();
        assert_eq!(t.as_millis(), 1_449_922_332_000);
        assert_eq!(t.to_compact(), "20151212T121212Z");
        assert_eq!(t.to_iso_millis(), "2015-12-12T12:12:12.000Z");
    }

    #[test]
    fn local_input_is_read_in_the_browser_time_zone() {
        let utc = Timestamp::parse_local_input("t", "2015-12-12T12:12", 0).unwrap();
        assert_eq!(utc.to_compact(), "20151212T121200Z");
        // UTC+1 (offset -60): 12:12 local is 11:12 UTC.
        let cet = Timestamp::parse_local_input("t", "2015-12-12T12:12:30", -60).unwrap();
        assert_eq!(cet.to_compact(), "20151212T111230Z");
        assert_eq!(
            Timestamp::parse_local_input("t", "tomorrow", 0)
                .unwrap_err()
                .field,
            "t"
        );
        assert!(Timestamp::parse_local_input("t", "2015-12-12T12:12", 20 * 60).is_err());
    }

    #[test]
    fn compact_form_rejects_other_shapes_and_names_the_field() {
        let e = Timestamp::parse_compact("schedule_time", "2015-12-12T12:12:12Z").unwrap_err();
        assert_eq!(e.field, "schedule_time");
    }

    #[test]
    fn arithmetic_saturates_and_never_goes_negative() {
        let t = Timestamp::from_millis(1_000);
        assert_eq!(t.plus(std::time::Duration::from_secs(1)).as_millis(), 2_000);
        assert_eq!(
            Timestamp::from_millis(i64::MAX)
                .plus(std::time::Duration::from_secs(1))
                .as_millis(),
            i64::MAX
        );
        assert_eq!(Timestamp::EPOCH.since(t), std::time::Duration::ZERO);
        assert_eq!(t.since(Timestamp::EPOCH), std::time::Duration::from_secs(1));
    }
}
