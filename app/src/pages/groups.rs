//! `/groups`: named sets of devices that tasks can target.

use leptos::prelude::*;
use leptos_meta::Title;

use crate::api::groups::{CreateGroup, list_groups};
use crate::components::{FieldError, FormError, reset_after_success};

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
        </section>
        <Transition fallback=|| view! { <p class="muted">"Loading groups…"</p> }>
            {move || groups.get().map(|r| match r {
                Ok(page) if page.items.is_empty() => view! { <p class="empty">"No groups yet."</p> }.into_any(),
                Ok(page) => view! {
                    <table class="table" id="groups">
                        <thead><tr><th>"Name"</th><th>"Description"</th><th>"Devices"</th><th>"Group ID"</th><th>"Created"</th></tr></thead>
                        <tbody>
                            {page.items.into_iter().map(|g| view! {
                                <tr>
                                    <td>{g.name}</td><td>{g.description}</td><td class="num">{g.members}</td>
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
