//! `/settings`: the signed-in account and this installation.

use leptos::prelude::*;
use leptos_meta::Title;

use crate::api::session::{ChangePassword, whoami};
use crate::api::settings::{
    CreateCredential, CreateSubscription, DeleteSubscription, RevokeCredential, failed_deliveries,
    list_credentials, list_subscriptions,
};
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
        <Credentials />
        <Subscriptions />
    }
}

/// API credentials: create (the SK is shown once), list, revoke.
#[component]
fn Credentials() -> impl IntoView {
    let create = ServerAction::<CreateCredential>::new();
    let revoke = ServerAction::<RevokeCredential>::new();
    let rows = Resource::new(
        move || (create.version().get(), revoke.version().get()),
        |_| list_credentials(),
    );
    let error = Signal::derive(move || create.value().get().and_then(Result::err));
    let form_ref = reset_after_success(move || matches!(create.value().get(), Some(Ok(_))));
    view! {
        <section class="card" id="credentials">
            <h2>"API credentials"</h2>
            <p class="muted">
                "Applications sign requests to the IoTDA-compatible API with an access key (AK) and secret key (SK). "
                <a href="/api-reference">"API reference"</a>
            </p>
            {move || create.value().get().and_then(Result::ok).map(|c| view! {
                <div class="alert ok" role="status" id="new-credential">
                    <strong>"Credential created."</strong>
                    " The secret key is shown only this once."
                    <dl class="facts">
                        <dt>"Project ID"</dt><dd><code>{c.project_id}</code></dd>
                        <dt>"AK"</dt><dd><code id="new-ak">{c.access_key}</code></dd>
                        <dt>"SK"</dt><dd><code id="new-sk">{c.secret_key}</code></dd>
                    </dl>
                </div>
            })}
            <ActionForm action=create node_ref=form_ref attr:class="form-grid">
                <label>"Description" <input name="description" maxlength="255" placeholder="billing-service" /><FieldError error field="description" /></label>
                <FormError error />
                <div class="actions"><button type="submit" class="primary">"Create credential"</button></div>
            </ActionForm>
            {move || revoke.value().get().and_then(Result::err).map(|e| view! { <p class="alert error" role="alert">{e.message}</p> })}
            <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
                {move || rows.get().map(|r| match r {
                    Ok(rows) if rows.is_empty() => view! { <p class="empty">"No credentials yet."</p> }.into_any(),
                    Ok(rows) => view! {
                        <table class="table" id="credential-list">
                            <thead><tr><th>"AK"</th><th>"Description"</th><th>"Created"</th><th>"Last used"</th><th>"State"</th><th></th></tr></thead>
                            <tbody>
                                {rows.into_iter().map(|c| {
                                    let revoked = c.revoked.is_some();
                                    view! {
                                        <tr>
                                            <td class="mono">{c.access_key.clone()}</td>
                                            <td>{c.description}</td>
                                            <td class="muted">{c.created}</td>
                                            <td class="muted">{c.last_used.unwrap_or_else(|| "never".to_owned())}</td>
                                            <td>{c.revoked.map_or_else(|| view! { <span class="badge ok">"active"</span> }.into_any(), |at| view! { <span class="badge bad" title=at>"revoked"</span> }.into_any())}</td>
                                            <td>
                                                {(!revoked).then(|| view! {
                                                    <ActionForm action=revoke>
                                                        <input type="hidden" name="access_key" value=c.access_key.clone() />
                                                        <button type="submit" class="link danger-text">"Revoke"</button>
                                                    </ActionForm>
                                                })}
                                            </td>
                                        </tr>
                                    }
                                }).collect_view()}
                            </tbody>
                        </table>
                    }.into_any(),
                    Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                })}
            </Transition>
        </section>
    }
}

/// Push subscriptions and failed deliveries.
#[component]
fn Subscriptions() -> impl IntoView {
    let create = ServerAction::<CreateSubscription>::new();
    let delete = ServerAction::<DeleteSubscription>::new();
    let rows = Resource::new(
        move || (create.version().get(), delete.version().get()),
        |_| list_subscriptions(),
    );
    let failed = Resource::new(move || delete.version().get(), |_| failed_deliveries());
    let error = Signal::derive(move || create.value().get().and_then(Result::err));
    let form_ref = reset_after_success(move || matches!(create.value().get(), Some(Ok(_))));
    view! {
        <section class="card" id="subscriptions">
            <h2>"Push notifications"</h2>
            <p class="muted">
                "Updraft POSTs task changes (" <code>"batchtask"</code> ", IoTDA's format) and per-device changes ("
                <code>"updraft.batchtask.device"</code> ") to your HTTPS endpoint, signed with "
                <code>"X-Updraft-Signature: t=<ms>,v1=<HMAC-SHA256(secret, t.body)>"</code>
                ", at least once, in order per task, retrying with backoff."
            </p>
            {move || create.value().get().and_then(Result::ok).map(|s| view! {
                <div class="alert ok" role="status" id="new-subscription">
                    <strong>{format!("Subscription {} created.", s.subscription_id)}</strong>
                    " Its signing secret is shown only this once: " <code>{s.secret}</code>
                </div>
            })}
            <ActionForm action=create node_ref=form_ref attr:class="form-grid">
                <label>
                    "Resource"
                    <select name="resource">
                        <option value="batchtask">"Tasks (batchtask)"</option>
                        <option value="updraft.batchtask.device">"Devices in tasks (updraft.batchtask.device)"</option>
                    </select>
                    <FieldError error field="resource" />
                </label>
                <label>"Callback URL" <input name="url" type="url" required placeholder="https://app.example.com/updraft" /><FieldError error field="url" /></label>
                <FormError error />
                <div class="actions"><button type="submit" class="primary">"Subscribe"</button></div>
            </ActionForm>
            <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
                {move || rows.get().map(|r| match r {
                    Ok(rows) if rows.is_empty() => view! { <p class="empty">"No subscriptions."</p> }.into_any(),
                    Ok(rows) => view! {
                        <table class="table" id="subscription-list">
                            <thead><tr><th>"Resource"</th><th>"URL"</th><th>"Created"</th><th></th></tr></thead>
                            <tbody>
                                {rows.into_iter().map(|s| view! {
                                    <tr>
                                        <td class="mono">{s.resource}</td><td class="mono break">{s.url}</td><td class="muted">{s.created}</td>
                                        <td>
                                            <ActionForm action=delete>
                                                <input type="hidden" name="subscription_id" value=s.subscription_id.clone() />
                                                <button type="submit" class="link danger-text">"Delete"</button>
                                            </ActionForm>
                                        </td>
                                    </tr>
                                }).collect_view()}
                            </tbody>
                        </table>
                    }.into_any(),
                    Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                })}
            </Transition>
            <h2 class="spaced">"Failed deliveries"</h2>
            <Transition fallback=|| ()>
                {move || failed.get().map(|r| match r {
                    Ok(rows) if rows.is_empty() => view! { <p class="empty" id="no-failures">"None: every notification was delivered on its first attempt."</p> }.into_any(),
                    Ok(rows) => view! {
                        <table class="table" id="failed-deliveries">
                            <thead><tr><th>"URL"</th><th>"State"</th><th class="num">"Attempts"</th><th>"Last answer"</th><th>"Queued"</th><th>"Next attempt"</th></tr></thead>
                            <tbody>
                                {rows.into_iter().map(|d| view! {
                                    <tr>
                                        <td class="mono break">{d.url}</td>
                                        <td><span class=if d.status == "failed" { "badge bad" } else { "badge busy" }>{if d.status == "failed" { "gave up".to_owned() } else { "retrying".to_owned() }}</span></td>
                                        <td class="num">{d.attempts}</td>
                                        <td class="error-text">{match d.http_status { Some(s) => format!("HTTP {s} {}", d.error), None => d.error }}</td>
                                        <td class="muted">{d.created}</td>
                                        <td class="muted">{d.next_attempt.unwrap_or_else(|| "–".to_owned())}</td>
                                    </tr>
                                }).collect_view()}
                            </tbody>
                        </table>
                    }.into_any(),
                    Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                })}
            </Transition>
        </section>
    }
}
