//! Small pieces shared by the pages.

use leptos::prelude::*;

use crate::error::ApiError;

/// A coloured status label (`ONLINE`, `Success`, `Fail`...).
#[component]
pub fn StatusBadge(#[prop(into)] status: String) -> impl IntoView {
    let tone = match status.as_str() {
        "ONLINE" | "Success" => "ok",
        "OFFLINE" | "Fail" | "FROZEN" | "ABNORMAL" => "bad",
        "Processing" | "Waitting" | "Initializing" | "Stopping" | "FailWaitRetry" => "busy",
        _ => "idle",
    };
    view! { <span class=format!("badge {tone}")>{status}</span> }
}

/// The server's message for one form field, if the last submission had one.
#[component]
pub fn FieldError(error: Signal<Option<ApiError>>, #[prop(into)] field: String) -> impl IntoView {
    move || {
        error
            .get()
            .and_then(|e| e.field(&field))
            .map(|m| view! { <span class="field-error" role="alert">{m}</span> })
    }
}

/// A form-level error banner: the message of errors that are not about one field.
#[component]
pub fn FormError(error: Signal<Option<ApiError>>) -> impl IntoView {
    move || {
        error
            .get()
            .filter(|e| e.fields.is_empty())
            .map(|e| view! { <p class="alert error" role="alert">{e.message}</p> })
    }
}

/// "rows a-b of n" with previous/next links that keep the other query parameters.
#[component]
pub fn Pager(total: u64, offset: u64, limit: u64, #[prop(into)] base: String) -> impl IntoView {
    let first = if total == 0 { 0 } else { offset + 1 };
    let last = (offset + limit).min(total);
    let link = move |o: u64| {
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}offset={o}")
    };
    let prev = (offset > 0).then(|| link(offset.saturating_sub(limit)));
    let next = (offset + limit < total).then(|| link(offset + limit));
    view! {
        <div class="pager">
            <span class="muted">{format!("{first}–{last} of {total}")}</span>
            {prev.map(|href| view! { <a class="button" href=href>"Previous"</a> })}
            {next.map(|href| view! { <a class="button" href=href>"Next"</a> })}
        </div>
    }
}

/// A reference for an `<ActionForm>` that clears the form each time `succeeded()` turns true, ready for
/// the next entry.
pub fn reset_after_success(succeeded: impl Fn() -> bool + 'static) -> NodeRef<leptos::html::Form> {
    let form_ref = NodeRef::<leptos::html::Form>::new();
    Effect::new(move |_| {
        if succeeded()
            && let Some(form) = form_ref.get()
        {
            form.reset();
        }
    });
    form_ref
}
