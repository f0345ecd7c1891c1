//! `/groups`: named sets of devices that tasks can target; `/groups/:id`: one group, its members,
//! rename, remove members, delete.

use std::collections::BTreeSet;

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::components::A;
use leptos_router::hooks::use_params_map;

use crate::api::groups::{
    ChangeMembers, CreateGroup, DeleteGroup, RenameGroup, group_detail, list_groups,
};
use crate::components::{
    FieldError, FormError, Pager, SelectAll, SelectBox, StatusBadge, or_dash, reset_after_success,
};

/// `/groups`
#[component]
pub fn GroupsPage() -> impl IntoView {
    let create = ServerAction::<CreateGroup>::new();
    let groups = Resource::new(move || create.version().get(), |_| list_groups());
    let error = Signal::derive(move || create.value().get().and_then(Result::err));
    let form_ref = reset_after_success(move || matches!(create.value().get(), Some(Ok(_))));
    view! {
        <Title text="Groups" />
        <div class="page-head"><h1>"Groups"</h1></div>
        <section class="card">
            <h2>"Create a group"</h2>
            <ActionForm action=create node_ref=form_ref attr:class="form-grid" attr:id="group-form">
                <label>"Name" <input name="name" required maxlength="64" /><FieldError error field="name" /></label>
                <label>"Description" <input name="description" maxlength="64" /><FieldError error field="description" /></label>
                <FormError error />
                <div class="actions"><button type="submit" class="primary">"Create group"</button></div>
            </ActionForm>
            <p class="muted">"Add devices from the " <a href="/devices">"device list"</a> ": select them, then “Add to group”."</p>
        </section>
        <Transition fallback=|| view! { <p class="muted">"Loading groups…"</p> }>
            {move || groups.get().map(|r| match r {
                Ok(page) if page.items.is_empty() => view! { <p class="empty">"No groups yet."</p> }.into_any(),
                Ok(page) => view! {
                    <table class="table" id="groups">
                        <thead><tr><th>"Name"</th><th>"Description"</th><th class="num">"Devices"</th><th>"Group ID"</th><th>"Created"</th></tr></thead>
                        <tbody>
                            {page.items.into_iter().map(|g| view! {
                                <tr>
                                    <td><a href=format!("/groups/{}", g.group_id)>{g.name}</a></td><td>{g.description}</td><td class="num">{g.members}</td>
                                    <td class="mono">{g.group_id}</td><td class="muted">{g.created}</td>
                                </tr>
                            }).collect_view()}
                        </tbody>
                    </table>
                }.into_any(),
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
            })}
        </Transition>
    }
}

/// `/groups/:id`
#[component]
pub fn GroupPage() -> impl IntoView {
    let params = use_params_map();
    let id = move || params.read().get("id").unwrap_or_default();
    let offset = crate::components::use_offset();
    let rename = ServerAction::<RenameGroup>::new();
    let remove = ServerAction::<ChangeMembers>::new();
    let delete = ServerAction::<DeleteGroup>::new();
    let group = Resource::new(
        move || {
            (
                id(),
                offset(),
                rename.version().get(),
                remove.version().get(),
            )
        },
        |(id, offset, _, _)| group_detail(id, offset),
    );
    let selected = RwSignal::new(BTreeSet::<String>::new());
    Effect::new(move |_| {
        if matches!(remove.value().get(), Some(Ok(_))) {
            selected.set(BTreeSet::new());
        }
    });
    let rename_error = Signal::derive(move || rename.value().get().and_then(Result::err));
    let deleted = move || matches!(delete.value().get(), Some(Ok(())));
    view! {
        <Title text="Group" />
        <A href="/groups" attr:class="crumb">"Groups"</A>
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || group.get().map(|r| match r {
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                Ok(g) => {
                    let ids: Vec<String> = g.members.items.iter().map(|d| d.device_id.clone()).collect();
                    let (total, offset, limit) = (g.members.total, g.members.offset, g.members.limit);
                    let base = format!("/groups/{}", g.group.group_id);
                    let group_id = g.group.group_id.clone();
                    let (delete_id, rename_id) = (group_id.clone(), group_id.clone());
                    let (name, description) = (g.group.name.clone(), g.group.description.clone());
                    view! {
                        <div class="page-head">
                            <h1 id="group-name">{g.group.name.clone()}</h1>
                            <ActionForm action=delete>
                                <input type="hidden" name="group_id" value=delete_id.clone() />
                                <button type="submit" class="danger" disabled=deleted>"Delete group"</button>
                            </ActionForm>
                        </div>
                        {move || deleted().then(|| view! { <p class="alert ok" role="status">"Group deleted. " <a href="/groups">"Back to groups"</a></p> })}
                        {move || delete.value().get().and_then(Result::err).map(|e| view! { <p class="alert error" role="alert" id="group-delete-error">{e.message}</p> })}
                        <section class="card">
                            <h2>"Name and description"</h2>
                            <ActionForm action=rename attr:class="form-grid" attr:id="rename-form">
                                <input type="hidden" name="group_id" value=rename_id.clone() />
                                <label>"Name" <input name="name" required maxlength="64" value=name.clone() /><FieldError error=rename_error field="name" /></label>
                                <label>"Description" <input name="description" maxlength="64" value=description.clone() /><FieldError error=rename_error field="description" /></label>
                                <FormError error=rename_error />
                                <div class="actions"><button type="submit">"Save"</button></div>
                            </ActionForm>
                        </section>
                        <div class="page-head">
                            <h2>{format!("Devices ({total})")}</h2>
                            <button
                                class="danger"
                                id="remove-selected"
                                disabled=move || selected.read().is_empty() || remove.pending().get()
                                on:click=move |_| {
                                    let ids: Vec<String> = selected.get().into_iter().collect();
                                    remove.dispatch(ChangeMembers { group_id: group_id.clone(), device_ids: ids.join(","), add: false });
                                }
                            >
                                {move || format!("Remove {} selected", selected.read().len())}
                            </button>
                        </div>
                        {if g.members.items.is_empty() {
                            view! { <p class="empty">"No devices. Add some from the " <a href="/devices">"device list"</a> "."</p> }.into_any()
                        } else {
                            view! {
                                <table class="table" id="members">
                                    <thead><tr><th class="check"><SelectAll selected ids /></th><th>"Device ID"</th><th>"Name"</th><th>"Status"</th><th>"Software"</th><th>"Firmware"</th></tr></thead>
                                    <tbody>
                                        {g.members.items.into_iter().map(|d| view! {
                                            <tr>
                                                <td class="check"><SelectBox selected id=d.device_id.clone() /></td>
                                                <td class="mono"><a href=format!("/devices/{}", d.device_id)>{d.device_id.clone()}</a></td>
                                                <td>{d.device_name}</td>
                                                <td><StatusBadge status=d.status /></td>
                                                <td>{or_dash(d.sw_version)}</td>
                                                <td>{or_dash(d.fw_version)}</td>
                                            </tr>
                                        }).collect_view()}
                                    </tbody>
                                </table>
                                <Pager total offset limit base />
                            }.into_any()
                        }}
                    }.into_any()
                }
            })}
        </Transition>
    }
}
