//! Safe rollouts in the console (README, "Safe rollouts"): the task form's rollout fields, a task's waves
//! as its page shows them, and resuming a paused task.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// A task's rollout, for its page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutCard {
    /// Each wave, in order.
    pub waves: Vec<WaveRow>,
    /// The latest wave allowed to start (1-based).
    pub current: usize,
    /// Why the task paused, while it is paused.
    pub paused: Option<String>,
    /// Pacing, in words (`at most 100 per minute, 500 at once`), if any.
    pub pacing: Option<String>,
    /// Maintenance windows, in words, if any.
    pub windows: Vec<String>,
}

/// One wave's devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveRow {
    /// `1%`, `50 devices`, `groups g1, g2`, `the rest`.
    pub size: String,
    /// When the next wave may start (`95% succeeded, then 60 min`).
    pub advance: String,
    /// Devices.
    pub total: u32,
    /// Not started.
    pub pending: u32,
    /// Started, not finished.
    pub in_flight: u32,
    /// Succeeded.
    pub succeeded: u32,
    /// Failed.
    pub failed: u32,
}

#[cfg(feature = "ssr")]
impl RolloutCard {
    /// The card of a task's rollout.
    pub(crate) fn of(view: backend::driver::RolloutView) -> Self {
        use domain::rollout::WaveSize;
        let waves = view
            .policy
            .waves
            .iter()
            .zip(&view.waves)
            .map(|(w, c)| WaveRow {
                size: match &w.size {
                    WaveSize::Percent(p) => format!("{p}%"),
                    WaveSize::Count(1) => "1 device".to_owned(),
                    WaveSize::Count(n) => format!("{n} devices"),
                    WaveSize::Groups(g) => format!("groups {}", g.join(", ")),
                    WaveSize::Rest => "the rest".to_owned(),
                },
                advance: match w.soak {
                    Some(s) => format!(
                        "{}% succeeded, then {} min",
                        w.success_threshold,
                        s.as_secs() / 60
                    ),
                    None => format!("{}% succeeded", w.success_threshold),
                },
                total: c.total,
                pending: c.pending,
                in_flight: c.in_flight,
                succeeded: c.succeeded,
                failed: c.failed,
            })
            .collect();
        let pacing = [
            view.policy
                .max_per_minute
                .map(|n| format!("at most {n} starts per minute")),
            view.policy
                .max_in_flight
                .map(|n| format!("at most {n} devices at once")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
        Self {
            waves,
            current: view.state.wave + 1,
            paused: view.state.paused.map(|p| p.reason),
            pacing: (!pacing.is_empty()).then(|| pacing.join(", ")),
            windows: view
                .policy
                .maintenance_windows
                .iter()
                .map(|w| {
                    let days = if w.days.is_empty() {
                        "every day".to_owned()
                    } else {
                        w.days.join(", ")
                    };
                    format!("{days} {}-{} {}", w.start, w.end, w.time_zone)
                })
                .collect(),
        }
    }
}

/// The task form's rollout fields; all empty means no rollout (every device starts at once).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutForm {
    /// `1%, 10%, 50%`: wave sizes (the rest form a last wave).
    #[serde(default)]
    pub waves: String,
    /// Percent of a wave that must succeed before the next starts.
    #[serde(default)]
    pub success_threshold: String,
    /// Minutes to wait after that.
    #[serde(default)]
    pub soak_minutes: String,
    /// Failures allowed per wave before the task pauses.
    #[serde(default)]
    pub wave_max_failures: String,
    /// Percent of finished devices allowed to fail in the whole task.
    #[serde(default)]
    pub max_failure_percent: String,
    /// Starts per minute.
    #[serde(default)]
    pub max_per_minute: String,
    /// Devices at once.
    #[serde(default)]
    pub max_in_flight: String,
    /// Window days (`Mon, Tue`; empty: every day).
    #[serde(default)]
    pub window_days: String,
    /// Window start, `HH:MM`.
    #[serde(default)]
    pub window_start: String,
    /// Window end, `HH:MM`.
    #[serde(default)]
    pub window_end: String,
    /// Window time zone.
    #[serde(default)]
    pub window_tz: String,
}

#[cfg(feature = "ssr")]
impl RolloutForm {
    /// The rollout these fields describe, `None` when they are all empty.
    pub(crate) fn rollout(&self) -> Result<Option<domain::rollout::Rollout>, ApiError> {
        use domain::ValidationError;
        use domain::rollout::{ErrorKind, ErrorThreshold, Rollout, Wave, WaveSize, Window};
        let number = |field: &str, v: &str| -> Result<Option<u32>, ApiError> {
            let v = v.trim();
            if v.is_empty() {
                return Ok(None);
            }
            v.parse::<u32>()
                .map(Some)
                .map_err(|_| ValidationError::new(field, "must be a whole number").into())
        };
        let percent = |field: &str, v: &str| -> Result<Option<u8>, ApiError> {
            number(field, v)?
                .map(|n| {
                    u8::try_from(n)
                        .ok()
                        .filter(|p| *p <= 100)
                        .ok_or_else(|| ValidationError::new(field, "must be 0-100").into())
                })
                .transpose()
        };
        let sizes = WaveSize::parse_list("waves", &self.waves)?;
        let success = percent("success_threshold", &self.success_threshold)?;
        let soak = number("soak_minutes", &self.soak_minutes)?;
        let wave_failures = number("wave_max_failures", &self.wave_max_failures)?;
        let task_percent = percent("max_failure_percent", &self.max_failure_percent)?;
        let max_per_minute = number("max_per_minute", &self.max_per_minute)?;
        let max_in_flight = number("max_in_flight", &self.max_in_flight)?;
        let window = !(self.window_start.trim().is_empty() && self.window_end.trim().is_empty());
        if sizes.is_empty()
            && task_percent.is_none()
            && max_per_minute.is_none()
            && max_in_flight.is_none()
            && !window
        {
            return Ok(None);
        }
        let threshold = |max_failures: Option<u32>| {
            max_failures.map(|m| ErrorThreshold {
                max_failures: Some(m),
                max_failure_percent: None,
                min_finished: 1,
                count: ErrorKind::ALL.to_vec(),
            })
        };
        let wave = |size: WaveSize| Wave {
            size,
            success_threshold: success.unwrap_or(domain::rollout::DEFAULT_SUCCESS_THRESHOLD),
            soak: soak.map(|m| std::time::Duration::from_secs(u64::from(m) * 60)),
            error_threshold: threshold(wave_failures),
        };
        let mut waves: Vec<Wave> = sizes.into_iter().map(wave).collect();
        if !waves.is_empty() {
            waves.push(wave(WaveSize::Rest));
        }
        let rollout = Rollout {
            waves,
            error_threshold: task_percent.map(|p| ErrorThreshold {
                max_failures: None,
                max_failure_percent: Some(p),
                min_finished: 10,
                count: ErrorKind::ALL.to_vec(),
            }),
            max_per_minute,
            max_in_flight,
            maintenance_windows: if window {
                vec![Window {
                    days: self
                        .window_days
                        .split([',', ' '])
                        .filter(|d| !d.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    start: self.window_start.trim().to_owned(),
                    end: self.window_end.trim().to_owned(),
                    time_zone: Some(self.window_tz.trim())
                        .filter(|t| !t.is_empty())
                        .unwrap_or("UTC")
                        .to_owned(),
                }]
            } else {
                Vec::new()
            },
            seed: None,
        };
        // Checked here too, so a mistake names the form's field.
        rollout.clone().check(0).map_err(|e| {
            let field = match e.field.as_str() {
                f if f.starts_with("rollout.maintenance_windows") => {
                    if f.ends_with("days") {
                        "window_days"
                    } else if f.ends_with("start") {
                        "window_start"
                    } else if f.ends_with("end") {
                        "window_end"
                    } else {
                        "window_tz"
                    }
                }
                f if f.starts_with("rollout.waves") => "waves",
                _ => "waves",
            };
            ApiError::from(ValidationError::new(field, e.message))
        })?;
        Ok(Some(rollout))
    }
}

/// Resumes a task its rollout paused.
#[server(prefix = "/api", endpoint = "resume_task")]
pub async fn resume_task(task_id: String) -> Result<(), ApiError> {
    let (state, user) = super::ssr::context().await?;
    backend::service::tasks::resume(&state, &user.project_id, &task_id).await?;
    Ok(())
}
