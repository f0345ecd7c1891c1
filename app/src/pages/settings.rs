//! `/settings`: the signed-in account and this installation.

use leptos::prelude::*;
use leptos_meta::Title;

use crate::api::session::{ChangePassword, whoami};
use crate::components::{FieldError, FormError, reset_after_success};

/// `/settings`
#[component]
pub fn SettingsPage() -> impl IntoView {
    let me = Resource::new(|| (), |()| whoami());
    let change = ServerAction::<ChangePassword>::new();
    let error = Signal::derive(move || change.value().get().and_then(Result::err));
    let form_ref = reset_after_success(move || matches!(change.value().get(), Some(Ok(()))));
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
        <section class="card">
            <h2>"Change password"</h2>
            {move || matches!(change.value().get(), Some(Ok(()))).then(|| view! {
                <p class="alert ok" id="password-changed" role="status">"Password changed. Your other sessions were signed out."</p>
            })}
            <ActionForm action=change node_ref=form_ref attr:class="form-grid" attr:id="password-form">
                <label>
                    "Current password"
                    <input type="password" name="current_password" autocomplete="current-password" required />
                    <FieldError error field="current_password" />
                </label>
                <label>
                    "New password " <span class="muted">"(10 to 128 characters)"</span>
                    <input type="password" name="password" autocomplete="new-password" required minlength="10" maxlength="128" />
                    <FieldError error field="password" />
                </label>
                <label>
                    "Repeat the new password"
                    <input type="password" name="confirm" autocomplete="new-password" required />
                    <FieldError error field="confirm" />
                </label>
                <FormError error />
                <div class="actions"><button type="submit" class="primary">"Change password"</button></div>
            </ActionForm>
        </section>
    }
}
