//! `/settings/audit`: who did what, from where, on which resource, and how it ended. Filters live in
//! the URL (`?actor=&resource_type=&resource_id=&from=&to=&offset=`), so a filtered view can be
//! linked (a task page links to its own history) and works without JavaScript.

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::components::{A, Form};
use leptos_router::hooks::use_query_map;

use crate::api::PageOf;
use crate::api::settings::{AuditRow, list_audit};
use crate::components::{Pager, encode, or_dash};

/// The resource kinds an entry can name (the API's names; the console and the command line use them
/// too), with a label.
const KINDS: &[(&str, &str)] = &[
    ("batchtasks", "Upgrade tasks"),
    ("packages", "Packages"),
    ("devices", "Devices"),
    ("device-group", "Groups"),
    ("products", "Products"),
    ("credentials", "API credentials"),
    ("subscriptions", "Subscriptions"),
    ("session", "Sign-ins"),
    ("users", "Passwords"),
];

/// `/settings/audit`
#[component]
pub fn AuditPage() -> impl IntoView {
    let query = use_query_map();
    let param = move |k: &str| query.read().get(k).unwrap_or_default();
    let entries = Resource::new(
        move || {
            (
                [
                    param("actor"),
                    param("resource_type"),
                    param("resource_id"),
                    param("from"),
                    param("to"),
                ],
                param("offset").parse::<u64>().unwrap_or(0),
            )
        },
        |([actor, resource_type, resource_id, from, to], offset)| {
            list_audit(actor, resource_type, resource_id, from, to, offset)
        },
    );
    view! {
        <Title text="Audit log" />
        <div class="page-head">
            <h1>"Audit log"</h1>
            <div class="buttons"><A href="/settings">"Settings"</A></div>
        </div>
        <p class="muted">
            "Every change made in the console, through the API or on the command line, and every sign-in. Times are UTC."
        </p>
        <Form method="GET" action="" attr:class="filters" attr:id="audit-filters">
            <input name="actor" placeholder="User or access key" value=move || param("actor") aria-label="Actor" />
            <select name="resource_type" aria-label="Resource kind">
                <option value="">"Any resource"</option>
                {KINDS.iter().map(|(v, l)| view! {
                    <option value=*v selected=move || param("resource_type") == *v>{*l}</option>
                }).collect_view()}
            </select>
            <input name="resource_id" placeholder="Resource ID" value=move || param("resource_id") aria-label="Resource ID" />
            <label class="inline">"From " <input type="datetime-local" name="from" value=move || param("from") /></label>
            <label class="inline">"to " <input type="datetime-local" name="to" value=move || param("to") /></label>
            <button type="submit">"Filter"</button>
        </Form>
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || entries.get().map(|r| match r {
                Ok(page) => {
                    let base = format!(
                        "/settings/audit?actor={}&resource_type={}&resource_id={}&from={}&to={}",
                        encode(&param("actor")), encode(&param("resource_type")),
                        encode(&param("resource_id")), encode(&param("from")), encode(&param("to"))
                    );
                    view! { <AuditTable page base /> }.into_any()
                }
                Err(e) => view! { <p class="alert error" role="alert">{e.message}</p> }.into_any(),
            })}
        </Transition>
    }
}

/// One page of entries and the pager.
#[component]
fn AuditTable(page: PageOf<AuditRow>, base: String) -> impl IntoView {
    if page.items.is_empty() {
        return view! { <p class="empty">"No entries match."</p> }.into_any();
    }
    view! {
        <table class="table" id="audit-list">
            <thead>
                <tr><th>"When"</th><th>"Who"</th><th>"From"</th><th>"Action"</th><th>"Resource"</th><th>"Result"</th></tr>
            </thead>
            <tbody>
                {page.items.into_iter().map(|e| view! {
                    <tr>
                        <td class="muted">{e.at}</td>
                        <td><span class="muted">{e.actor_type}" "</span>{e.actor}</td>
                        <td class="mono">{or_dash(e.source)}</td>
                        <td class="mono" title=e.request_id.map(|r| format!("request {r}"))>{e.action}</td>
                        <td>{resource_link(e.resource_type, e.resource_id)}</td>
                        <td>
                            {if e.success {
                                view! { <span class="badge ok">"success"</span> }.into_any()
                            } else {
                                view! { <span class="badge bad">"failure"</span> }.into_any()
                            }}
                            {e.status.map(|s| view! { <span class="muted">{format!(" {s}")}</span> })}
                            {e.detail.map(|d| view! { <div class="muted detail">{d}</div> })}
                        </td>
                    </tr>
                }).collect_view()}
            </tbody>
        </table>
        <Pager total=page.total offset=page.offset limit=page.limit base />
    }
    .into_any()
}

/// The resource, linked to its page where the console has one.
fn resource_link(kind: Option<String>, id: Option<String>) -> AnyView {
    let Some(kind) = kind else {
        return "—".into_any();
    };
    let Some(id) = id else {
        return view! { <span class="muted">{kind}</span> }.into_any();
    };
    let page = match kind.as_str() {
        "batchtasks" => Some("/upgrades/tasks/"),
        "packages" => Some("/upgrades/packages/"),
        "devices" => Some("/devices/"),
        "device-group" => Some("/groups/"),
        _ => None,
    };
    match page {
        Some(p) => {
            let href = format!("{p}{}", encode(&id));
            view! { <span class="muted">{kind}" "</span><a class="mono" href=href>{id}</a> }
                .into_any()
        }
        None => {
            view! { <span class="muted">{kind}" "</span><span class="mono">{id}</span> }.into_any()
        }
    }
}
