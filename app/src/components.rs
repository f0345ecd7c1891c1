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
    // IoTDA spells it "Waitting" on the wire; the console says it properly.
    let label = if status == "Waitting" {
        "Waiting".to_owned()
    } else {
        status
    };
    view! { <span class=format!("badge {tone}")>{label}</span> }
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

/// The page's `?offset=` (rows skipped by the [`Pager`]), 0 when absent or not a number.
pub fn use_offset() -> impl Fn() -> u64 + Copy + Send + Sync + 'static {
    let query = leptos_router::hooks::use_query_map();
    move || {
        query
            .read()
            .get("offset")
            .and_then(|o| o.parse().ok())
            .unwrap_or(0)
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

/// A progress bar with its numbers: `done` of `total` (and the percentage).
#[component]
pub fn Progress(done: i64, total: i64) -> impl IntoView {
    let pct = if total > 0 { done * 100 / total } else { 0 };
    view! {
        <span class="progress">
            <progress max="100" value=pct aria-label=format!("{pct} percent")></progress>
            <span class="num">{format!("{done}/{total} · {pct}%")}</span>
        </span>
    }
}

/// The live-connection indicator.
#[component]
pub fn LiveIndicator(state: ReadSignal<crate::browser::Live>) -> impl IntoView {
    use crate::browser::Live;
    view! {
        <span
            class=move || match state.get() {
                Live::Streaming => "live on",
                Live::Connecting => "live",
                Live::Polling => "live off",
            }
            id="live"
            role="status"
        >
            {move || state.get().label()}
        </span>
    }
}

/// A row checkbox bound to a set of selected ids.
#[component]
pub fn SelectBox(
    selected: RwSignal<std::collections::BTreeSet<String>>,
    #[prop(into)] id: String,
) -> impl IntoView {
    let key = id.clone();
    view! {
        <input
            type="checkbox"
            class="select"
            aria-label=format!("Select {id}")
            prop:checked=move || selected.read().contains(&key)
            on:change=move |ev| {
                let on = event_target_checked(&ev);
                selected.update(|s| {
                    if on { s.insert(id.clone()); } else { s.remove(&id); }
                });
            }
        />
    }
}

/// A header checkbox that selects or clears every id of the current page.
#[component]
pub fn SelectAll(
    selected: RwSignal<std::collections::BTreeSet<String>>,
    ids: Vec<String>,
) -> impl IntoView {
    let all = ids.clone();
    view! {
        <input
            type="checkbox"
            class="select"
            aria-label="Select all on this page"
            prop:checked=move || !all.is_empty() && all.iter().all(|i| selected.read().contains(i))
            on:change=move |ev| {
                let on = event_target_checked(&ev);
                selected.update(|s| {
                    for i in &ids {
                        if on { s.insert(i.clone()); } else { s.remove(i); }
                    }
                });
            }
        />
    }
}

/// `1536` → `1.5 KiB`.
#[must_use]
pub fn human_size(bytes: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = bytes.max(0) as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < units.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[unit])
    }
}

/// Percent-encodes a value for a URL query or a `data:` URL (RFC 3986 unreserved characters stay).
#[must_use]
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An optional value, or a dash.
#[must_use]
pub fn or_dash(v: Option<String>) -> String {
    v.filter(|s| !s.is_empty())
        .unwrap_or_else(|| "–".to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_encoded() {
        assert_eq!(super::encode("a&b #1+2/ü"), "a%26b%20%231%2B2%2F%C3%BC");
        assert_eq!(super::encode("meter_01-x.y~"), "meter_01-x.y~");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(super::human_size(512), "512 B");
        assert_eq!(super::human_size(1536), "1.5 KiB");
        assert_eq!(super::human_size(256 * 1024 * 1024), "256.0 MiB");
    }
}
