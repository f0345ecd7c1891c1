//! Maintenance windows: recurring days and hours in a time zone, outside which no device starts.

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::{Timestamp, ValidationError};

/// A recurring window: on `days` (every day when empty), from `start` to `end` local time in
/// `time_zone`; an `end` at or before `start` ends the next day (`22:00`-`04:00`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// `Mon`...`Sun` (or full names); empty: every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// `HH:MM`.
    pub start: String,
    /// `HH:MM`.
    pub end: String,
    /// An IANA time zone (`Europe/Berlin`), or `UTC`.
    pub time_zone: String,
}

/// A [`Window`] checked and ready to answer.
#[derive(Clone, Debug)]
pub struct OpenHours {
    days: [bool; 7],
    start: Time,
    end: Time,
    tz: TimeZone,
}

fn weekday(field: &str, s: &str) -> Result<Weekday, ValidationError> {
    let lower = s.trim().to_ascii_lowercase();
    let days = [
        ("mon", Weekday::Monday),
        ("tue", Weekday::Tuesday),
        ("wed", Weekday::Wednesday),
        ("thu", Weekday::Thursday),
        ("fri", Weekday::Friday),
        ("sat", Weekday::Saturday),
        ("sun", Weekday::Sunday),
    ];
    days.iter()
        .find(|(short, _)| {
            lower == *short
                || (lower.len() > 3 && lower.starts_with(short) && lower.ends_with("day"))
        })
        .map(|(_, d)| *d)
        .ok_or_else(|| ValidationError::new(field, format!("{s:?} is not a day (Mon...Sun)")))
}

fn time(field: &str, s: &str) -> Result<Time, ValidationError> {
    let bad = || ValidationError::new(field, format!("{s:?} is not a time of day (HH:MM)"));
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m) = (
        h.parse::<i8>().map_err(|_| bad())?,
        m.parse::<i8>().map_err(|_| bad())?,
    );
    if h == 24 && m == 0 {
        // 24:00, the end of the day.
        return Ok(Time::MAX);
    }
    Time::new(h, m, 0, 0).map_err(|_| bad())
}

impl Window {
    /// Checks the window; `field` names it in errors (`maintenance_windows[0]`).
    ///
    /// # Errors
    /// An unknown day or time zone, or a time that is not `HH:MM`.
    pub fn check(&self, field: &str) -> Result<OpenHours, ValidationError> {
        let mut days = [self.days.is_empty(); 7];
        for d in &self.days {
            days[weekday(&format!("{field}.days"), d)?.to_monday_zero_offset() as usize] = true;
        }
        let tz = TimeZone::get(self.time_zone.trim()).map_err(|_| {
            ValidationError::new(
                format!("{field}.time_zone"),
                format!("{:?} is not a known time zone", self.time_zone),
            )
        })?;
        Ok(OpenHours {
            days,
            start: time(&format!("{field}.start"), &self.start)?,
            end: time(&format!("{field}.end"), &self.end)?,
            tz,
        })
    }
}

impl OpenHours {
    fn on(&self, d: Weekday) -> bool {
        self.days[d.to_monday_zero_offset() as usize]
    }

    /// Whether the window is open at `now`.
    #[must_use]
    pub fn contains(&self, now: Timestamp) -> bool {
        let Ok(ts) = jiff::Timestamp::from_millisecond(now.as_millis()) else {
            return false;
        };
        let local = self.tz.to_datetime(ts);
        let (day, t) = (local.weekday(), local.time());
        if self.start < self.end {
            self.on(day) && self.start <= t && t < self.end
        } else {
            // Past midnight: open from `start` on a listed day to `end` the day after.
            (self.on(day) && t >= self.start) || (self.on(day.previous()) && t < self.end)
        }
    }

    /// The next time at or after `now` at which the window opens (`now` itself when open).
    #[must_use]
    pub fn next_open(&self, now: Timestamp) -> Option<Timestamp> {
        if self.contains(now) {
            return Some(now);
        }
        let today = self
            .tz
            .to_datetime(jiff::Timestamp::from_millisecond(now.as_millis()).ok()?)
            .date();
        (0..=8_i64).find_map(|offset| {
            let date = today.checked_add(jiff::Span::new().days(offset)).ok()?;
            if !self.on(date.weekday()) {
                return None;
            }
            // A start in a daylight-saving gap opens at the first instant after it.
            let opens = self
                .tz
                .to_ambiguous_timestamp(date.to_datetime(self.start))
                .later()
                .ok()?
                .as_millisecond();
            (opens > now.as_millis()).then(|| Timestamp::from_millis(opens))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        Timestamp::from_millis(s.parse::<jiff::Timestamp>().unwrap().as_millisecond())
    }

    fn window(days: &[&str], start: &str, end: &str, tz: &str) -> OpenHours {
        Window {
            days: days.iter().map(|d| (*d).to_owned()).collect(),
            start: start.to_owned(),
            end: end.to_owned(),
            time_zone: tz.to_owned(),
        }
        .check("w")
        .unwrap()
    }

    #[test]
    fn a_night_window_in_berlin_follows_the_local_clock() {
        // Weeknights 22:00-04:00 Berlin time (UTC+1 in winter, UTC+2 in summer).
        let w = window(
            &["Mon", "Tue", "Wed", "Thu", "Fri"],
            "22:00",
            "04:00",
            "Europe/Berlin",
        );
        // Monday 2026-12-07 21:30 UTC is 22:30 in Berlin: open.
        assert!(w.contains(at("2026-12-07T21:30:00Z")));
        assert!(!w.contains(at("2026-12-07T20:59:59Z")));
        // Saturday 02:00 Berlin belongs to Friday night: open; Sunday 02:00 does not.
        assert!(w.contains(at("2026-12-12T01:00:00Z")));
        assert!(!w.contains(at("2026-12-13T01:00:00Z")));
        assert!(
            !w.contains(at("2026-12-12T03:00:00Z")),
            "04:00 local closes it"
        );
        // In summer the same local hours are an hour earlier in UTC.
        assert!(w.contains(at("2026-07-06T20:30:00Z")));
        // Sunday noon: next open is Monday 22:00 local.
        assert_eq!(
            w.next_open(at("2026-12-13T12:00:00Z")),
            Some(at("2026-12-14T21:00:00Z"))
        );
        assert_eq!(
            w.next_open(at("2026-12-07T21:30:00Z")),
            Some(at("2026-12-07T21:30:00Z")),
            "open now"
        );
    }

    #[test]
    fn every_day_and_a_day_window_and_utc() {
        let w = window(&[], "01:00", "05:00", "UTC");
        assert!(w.contains(at("2026-12-06T01:00:00Z")));
        assert!(!w.contains(at("2026-12-06T05:00:00Z")));
        assert_eq!(
            w.next_open(at("2026-12-06T05:00:00Z")),
            Some(at("2026-12-07T01:00:00Z"))
        );
        let all_day = window(&["sunday"], "00:00", "24:00", "UTC");
        assert!(all_day.contains(at("2026-12-06T23:59:59Z")));
        assert!(!all_day.contains(at("2026-12-07T00:00:00Z")));
    }

    #[test]
    fn a_start_in_a_daylight_saving_gap_opens_after_it() {
        // 2027-03-28 02:30 does not exist in Berlin (clocks jump 02:00 → 03:00).
        let w = window(&["Sun"], "02:30", "05:00", "Europe/Berlin");
        assert_eq!(
            w.next_open(at("2027-03-27T12:00:00Z")),
            Some(at("2027-03-28T01:30:00Z")),
            "03:30 CEST, the instant the gap's 02:30 maps to"
        );
    }

    #[test]
    fn bad_windows_name_their_field() {
        let bad = |days: &[&str], start: &str, end: &str, tz: &str| {
            Window {
                days: days.iter().map(|d| (*d).to_owned()).collect(),
                start: start.to_owned(),
                end: end.to_owned(),
                time_zone: tz.to_owned(),
            }
            .check("maintenance_windows[1]")
            .unwrap_err()
            .field
        };
        assert_eq!(
            bad(&["Funday"], "01:00", "02:00", "UTC"),
            "maintenance_windows[1].days"
        );
        assert_eq!(
            bad(&[], "25:00", "02:00", "UTC"),
            "maintenance_windows[1].start"
        );
        assert_eq!(bad(&[], "01:00", "2", "UTC"), "maintenance_windows[1].end");
        assert_eq!(
            bad(&[], "01:00", "02:00", "Mars/Olympus"),
            "maintenance_windows[1].time_zone"
        );
    }
}
