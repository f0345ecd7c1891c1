//! `/settings`: the signed-in account and this installation.

use leptos::prelude::*;
use leptos_meta::Title;

use crate::api::session::whoami;

/// `/settings`
#[component]
pub fn SettingsPage() -> impl IntoView {
    let me = Resource::new(|| (), |()| whoami());
    view! {
        <Title text="Settings" />
        <div class="page-head"><h1>"Settings"</h1></div>
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || me.get().map(|r| match r {
                Ok(me) => view! {
                    <section class="card">
                        <h2>"Account"</h2>
                        <dl class="facts">
                            <dt>"User"</dt><dd>{me.username}</dd>
                            <dt>"Role"</dt><dd>{if me.is_admin { "Administrator" } else { "Operator" }}</dd>
                            <dt>"Project ID"</dt><dd class="mono" id="project-id">{me.project_id}</dd>
                            <dt>"Session ends"</dt><dd>{me.session_expires}</dd>
                            <dt>"Updraft"</dt><dd>{me.version}</dd>
                        </dl>
                    </section>
                }.into_any(),
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
            })}
        </Transition>
    }
}
