//! Safe rollouts on the task pages: the form's rollout section, and a task's waves with the pause reason
//! and Resume.

use leptos::prelude::*;

use crate::api::rollouts::{ResumeTask, RolloutCard};
use crate::components::{FieldError, Progress};
use crate::error::ApiError;

/// The task form's "Rollout" section (fields `rollout[...]`); left empty, every device starts at once.
#[component]
pub fn RolloutFields(error: Signal<Option<ApiError>>) -> impl IntoView {
    view! {
        <section class="card" id="rollout-fields">
            <h2>"Rollout " <span class="muted">"(optional)"</span></h2>
            <p class="muted">
                "Start in waves, pause on failures, keep a pace, or start only in a maintenance window. Left empty, every device starts at once."
            </p>
            <div class="form-grid">
                <label>
                    "Waves " <span class="muted">"(e.g. 1%, 10%, 50%; the rest follow)"</span>
                    <input name="rollout[waves]" placeholder="1%, 10%, 50%" />
                    <FieldError error field="waves" />
                </label>
                <label>
                    "Next wave after " <span class="muted">"(% of a wave succeeded)"</span>
                    <input name="rollout[success_threshold]" type="number" min="0" max="100" placeholder="95" />
                    <FieldError error field="success_threshold" />
                </label>
                <label>
                    "Then wait " <span class="muted">"(minutes)"</span>
                    <input name="rollout[soak_minutes]" type="number" min="0" placeholder="0" />
                    <FieldError error field="soak_minutes" />
                </label>
                <label>
                    "Pause when a wave has more failures than"
                    <input name="rollout[wave_max_failures]" type="number" min="0" />
                    <FieldError error field="wave_max_failures" />
                </label>
                <label>
                    "Pause when more than this % of finished devices failed"
                    <input name="rollout[max_failure_percent]" type="number" min="0" max="100" />
                    <FieldError error field="max_failure_percent" />
                </label>
                <label>
                    "Starts per minute, at most"
                    <input name="rollout[max_per_minute]" type="number" min="1" />
                    <FieldError error field="max_per_minute" />
                </label>
                <label>
                    "Devices at once, at most"
                    <input name="rollout[max_in_flight]" type="number" min="1" />
                    <FieldError error field="max_in_flight" />
                </label>
                <fieldset>
                    <legend>"Maintenance window"</legend>
                    <div class="row">
                        <label>"Days" <input name="rollout[window_days]" placeholder="Mon, Tue, Wed, Thu, Fri" /></label>
                        <label>"From" <input name="rollout[window_start]" type="time" /></label>
                        <label>"to" <input name="rollout[window_end]" type="time" /></label>
                        <label>"Time zone" <input name="rollout[window_tz]" placeholder="Europe/Berlin" /></label>
                    </div>
                    <FieldError error field="window_days" />
                    <FieldError error field="window_start" />
                    <FieldError error field="window_end" />
                    <FieldError error field="window_tz" />
                </fieldset>
            </div>
        </section>
    }
}

/// A task's rollout: each wave's progress, pacing and windows, and, while paused, why, with Resume.
#[component]
pub fn RolloutPanel(
    card: RolloutCard,
    task_id: String,
    resume: ServerAction<ResumeTask>,
) -> impl IntoView {
    let current = card.current;
    view! {
        <section class="card" id="rollout">
            <h2>"Rollout"</h2>
            {card.paused.map(|reason| view! {
                <div class="alert error" role="alert" id="pause-reason">
                    <strong>"Paused. "</strong>{reason}
                    <ActionForm action=resume attr:class="inline-form">
                        <input type="hidden" name="task_id" value=task_id.clone() />
                        <button type="submit" class="primary" id="resume-task">"Resume"</button>
                    </ActionForm>
                </div>
            })}
            {move || resume.value().get().and_then(Result::err).map(|e| view! { <p class="alert error" role="alert">{e.message}</p> })}
            <table class="table" id="waves">
                <thead>
                    <tr><th>"Wave"</th><th>"Size"</th><th>"Next wave after"</th><th>"Progress"</th><th>"Not started"</th><th>"Running"</th><th>"Succeeded"</th><th>"Failed"</th></tr>
                </thead>
                <tbody>
                    {card.waves.into_iter().enumerate().map(|(i, w)| {
                        let done = i64::from(w.succeeded + w.failed);
                        let label = if i + 1 < current {
                            "open"
                        } else if i + 1 == current {
                            "current"
                        } else {
                            "waiting"
                        };
                        view! {
                            <tr class=label>
                                <td>{format!("{} ", i + 1)}<span class="muted">{label}</span></td>
                                <td>{w.size}</td>
                                <td class="muted">{w.advance}</td>
                                <td><Progress done total=i64::from(w.total) /></td>
                                <td>{w.pending}</td>
                                <td>{w.in_flight}</td>
                                <td>{w.succeeded}</td>
                                <td>{w.failed}</td>
                            </tr>
                        }
                    }).collect_view()}
                </tbody>
            </table>
            {card.pacing.map(|p| view! { <p class="muted">"Pacing: " {p}</p> })}
            {(!card.windows.is_empty()).then(|| view! { <p class="muted">"Starts only in: " {card.windows.join("; ")}</p> })}
        </section>
    }
}
