//! `/upgrades/packages`: upload (streamed, with a progress bar) and list packages;
//! `/upgrades/packages/:id`: one package, the tasks that use it, delete.
//!
//! The upload form posts `multipart/form-data` to the packages API
//! (`POST /v5/iot/{project_id}/ota-upgrades/packages`, which accepts the console's session). Hydrated, it
//! is sent with `XMLHttpRequest` to show progress and can be cancelled; without JavaScript the browser
//! posts it as a plain form.

use std::collections::BTreeMap;

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::components::A;
use leptos_router::hooks::use_params_map;

use crate::api::products::list_products;
use crate::api::session::whoami;
use crate::api::upgrades::{DeletePackage, list_packages, package_detail};
use crate::browser::Upload;
use crate::components::{Pager, StatusBadge, human_size, or_dash};
use crate::error::{ApiError, ErrorCode};

/// `/upgrades/packages`
#[component]
pub fn PackagesPage() -> impl IntoView {
    let offset = crate::components::use_offset();
    let (upload, set_upload) = signal(Upload::Idle);
    let uploaded = move || {
        matches!(
            upload.get(),
            Upload::Done {
                status: 200..=299,
                ..
            }
        )
    };
    let packages = Resource::new(
        move || (offset(), uploaded()),
        |(offset, _)| list_packages(offset),
    );
    view! {
        <Title text="Packages" />
        <div class="page-head"><h1>"Packages"</h1></div>
        <UploadCard upload set_upload />
        <Transition fallback=|| view! { <p class="muted">"Loading packages…"</p> }>
            {move || packages.get().map(|r| match r {
                Ok(page) if page.items.is_empty() => view! { <p class="empty">"No packages yet. Upload one above."</p> }.into_any(),
                Ok(page) => {
                    let (total, offset, limit) = (page.total, page.offset, page.limit);
                    view! {
                        <table class="table" id="packages">
                            <thead><tr><th>"Version"</th><th>"Type"</th><th>"Product"</th><th>"File"</th><th class="num">"Size"</th><th>"Uploaded"</th></tr></thead>
                            <tbody>
                                {page.items.into_iter().map(|p| view! {
                                    <tr>
                                        <td><a href=format!("/upgrades/packages/{}", p.package_id)>{p.version}</a></td>
                                        <td>{kind(&p.package_type)}</td>
                                        <td>{p.product_name}" "<span class="muted mono">{p.product_id}</span></td>
                                        <td>{p.file_name}</td><td class="num">{human_size(p.size)}</td><td class="muted">{p.created}</td>
                                    </tr>
                                }).collect_view()}
                            </tbody>
                        </table>
                        <Pager total offset limit base="/upgrades/packages" />
                    }.into_any()
                }
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
            })}
        </Transition>
    }
}

/// "Software" / "Firmware".
pub(crate) fn kind(package_type: &str) -> &'static str {
    if package_type == "firmwarePackage" {
        "Firmware"
    } else {
        "Software"
    }
}

/// The server's answer to an upload, as the console's error shape: IoTDA errors say `field: message`.
fn upload_error(status: u16, body: &str) -> ApiError {
    let msg = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error_msg"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("the server answered {status}"));
    let code = match status {
        404 => ErrorCode::NotFound,
        409 => ErrorCode::Conflict,
        400 | 413 | 422 => ErrorCode::Validation,
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Forbidden,
        503 => ErrorCode::Busy,
        _ => ErrorCode::Internal,
    };
    let mut fields = BTreeMap::new();
    if let Some((field, text)) = msg.split_once(": ")
        && matches!(
            field,
            "package_type"
                | "product_id"
                | "version"
                | "support_source_versions"
                | "description"
                | "custom_info"
                | "file"
                | "file_name"
                | "segment_size"
        )
    {
        fields.insert(field.to_owned(), text.to_owned());
    }
    ApiError {
        code,
        message: msg,
        fields,
    }
}

#[component]
fn UploadCard(upload: ReadSignal<Upload>, set_upload: WriteSignal<Upload>) -> impl IntoView {
    let me = Resource::new(|| (), |()| whoami());
    let products = Resource::new(|| (), |()| list_products());
    let form_ref = NodeRef::<leptos::html::Form>::new();
    #[cfg(feature = "hydrate")]
    let running = StoredValue::new_local(None::<crate::browser::UploadHandle>);
    let error = Signal::derive(move || match upload.get() {
        Upload::Done { status, body } if !(200..300).contains(&status) => {
            Some(upload_error(status, &body))
        }
        Upload::Failed(m) => Some(ApiError::new(ErrorCode::Internal, m)),
        _ => None,
    });
    let sending = move || matches!(upload.get(), Upload::Sending { .. });
    let done = move || match upload.get() {
        Upload::Done {
            status: 200..=299,
            body,
        } => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .map(|v| {
                format!(
                    "Uploaded version {} ({}).",
                    v["version"].as_str().unwrap_or("?"),
                    v["package_id"].as_str().unwrap_or("?")
                )
            }),
        _ => None,
    };
    Effect::new(move |_| {
        if done().is_some()
            && let Some(form) = form_ref.get()
        {
            form.reset();
        }
    });
    let action = move || {
        me.get()
            .and_then(Result::ok)
            .map(|m| format!("/v5/iot/{}/ota-upgrades/packages", m.project_id))
            .unwrap_or_default()
    };
    let on_submit = move |ev: leptos::ev::SubmitEvent| {
        #[cfg(feature = "hydrate")]
        {
            ev.prevent_default();
            let Some(form) = form_ref.get() else { return };
            match crate::browser::upload(&form, &action(), set_upload) {
                Ok(handle) => running.set_value(Some(handle)),
                Err(e) => set_upload.set(Upload::Failed(e)),
            }
        }
        #[cfg(not(feature = "hydrate"))]
        let _ = (ev, set_upload);
    };
    let field_error = move |f: &'static str| {
        move || {
            error
                .get()
                .and_then(|e| e.field(f))
                .map(|m| view! { <span class="field-error" role="alert">{m}</span> })
        }
    };
    view! {
        <section class="card">
            <h2>"Upload a package"</h2>
            // The form's action names the project, so it waits for it (and renders whole on the server).
            <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || me.get().map(|_| view! {
            <form
                node_ref=form_ref
                method="post"
                enctype="multipart/form-data"
                action=action
                class="form-grid"
                id="upload-form"
                on:submit=on_submit
            >
                <label>
                    "Type"
                    <select name="package_type">
                        <option value="softwarePackage">"Software"</option>
                        <option value="firmwarePackage">"Firmware"</option>
                    </select>
                    {field_error("package_type")}
                </label>
                <label>
                    "Product"
                    <Transition fallback=|| view! { <select name="product_id" disabled=true></select> }>
                        {move || products.get().and_then(Result::ok).map(|page| view! {
                            <select name="product_id" required>
                                {page.items.into_iter().map(|p| view! {
                                    <option value=p.product_id.clone()>{format!("{} ({})", p.name, p.protocol_type)}</option>
                                }).collect_view()}
                            </select>
                        })}
                    </Transition>
                    {field_error("product_id")}
                </label>
                <label>"Version" <input name="version" required maxlength="256" placeholder="2.0.1" />{field_error("version")}</label>
                <label>
                    "Upgrades from " <span class="muted">"(versions, comma-separated; empty: any)"</span>
                    <input name="support_source_versions" placeholder="1.0, 1.1" />
                    {field_error("support_source_versions")}
                </label>
                <label>"Description" <input name="description" maxlength="1024" />{field_error("description")}</label>
                <label>"Custom info for devices" <input name="custom_info" maxlength="4096" />{field_error("custom_info")}</label>
                <label>
                    "PCP segment size " <span class="muted">"(LwM2M, 32-500 bytes)"</span>
                    <input name="segment_size" type="number" min="32" max="500" placeholder="500" />
                    {field_error("segment_size")}
                </label>
                <label>"File" <input name="file" type="file" required />{field_error("file")}</label>
                {move || error.get().filter(|e| e.fields.is_empty()).map(|e| view! { <p class="alert error" role="alert" id="upload-error">{e.message}</p> })}
                {move || done().map(|m| view! { <p class="alert ok" role="status" id="upload-done">{m}</p> })}
                <div class="actions">
                    <button type="submit" class="primary" disabled=sending>{move || if sending() { "Uploading…" } else { "Upload" }}</button>
                    {move || match upload.get() {
                        Upload::Sending { sent, total } => {
                            let pct = (sent * 100).checked_div(total).unwrap_or(0);
                            Some(view! {
                                <span class="progress" id="upload-progress">
                                    <progress max="100" value=pct></progress>
                                    <span class="num">{format!("{pct}% · {} of {}", human_size(i64::try_from(sent).unwrap_or(i64::MAX)), human_size(i64::try_from(total).unwrap_or(i64::MAX)))}</span>
                                </span>
                                <button type="button" on:click=move |_| {
                                    #[cfg(feature = "hydrate")]
                                    running.with_value(|h| if let Some(h) = h { h.cancel() });
                                }>"Cancel"</button>
                            })
                        }
                        _ => None,
                    }}
                </div>
            </form>
            })}
            </Transition>
        </section>
    }
}

/// `/upgrades/packages/:id`
#[component]
pub fn PackagePage() -> impl IntoView {
    let params = use_params_map();
    let id = move || params.read().get("id").unwrap_or_default();
    let delete = ServerAction::<DeletePackage>::new();
    let package = Resource::new(id, package_detail);
    let deleted = move || matches!(delete.value().get(), Some(Ok(())));
    view! {
        <Title text="Package" />
        <A href="/upgrades/packages" attr:class="crumb">"Packages"</A>
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || package.get().map(|r| match r {
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                Ok(p) => {
                    let delete_id = p.row.package_id.clone();
                    view! {
                    <div class="page-head">
                        <h1>{format!("{} {}", kind(&p.row.package_type), p.row.version)}</h1>
                        <div class="buttons">
                            <a class="button primary" href=format!("/upgrades/new?package={}", p.row.package_id)>"Create task"</a>
                            <ActionForm action=delete>
                                <input type="hidden" name="package_id" value=delete_id.clone() />
                                <button type="submit" class="danger" disabled=deleted>"Delete package"</button>
                            </ActionForm>
                        </div>
                    </div>
                    {move || deleted().then(|| view! { <p class="alert ok" role="status">"Package deleted."</p> })}
                    {move || delete.value().get().and_then(Result::err).map(|e| view! { <p class="alert error" role="alert" id="package-delete-error">{e.message}</p> })}
                    <section class="card">
                        <dl class="facts" id="package-facts">
                            <dt>"Package ID"</dt><dd class="mono">{p.row.package_id.clone()}</dd>
                            <dt>"Product"</dt><dd>{format!("{} ({})", p.row.product_name, p.row.product_id)}</dd>
                            <dt>"File"</dt><dd>{p.row.file_name.clone()}</dd>
                            <dt>"Size"</dt><dd>{format!("{} ({} bytes)", human_size(p.row.size), p.row.size)}</dd>
                            <dt>"SHA-256"</dt><dd class="mono break" id="sha256">{p.sha256.clone()}</dd>
                            <dt>"Upgrades from"</dt><dd>{if p.support_source_versions.is_empty() { "any version".to_owned() } else { p.support_source_versions.join(", ") }}</dd>
                            <dt>"PCP segment size"</dt><dd>{format!("{} bytes", p.segment_size)}</dd>
                            <dt>"Description"</dt><dd>{or_dash(Some(p.description.clone()))}</dd>
                            <dt>"Custom info"</dt><dd>{or_dash(Some(p.custom_info.clone()))}</dd>
                            <dt>"Source"</dt><dd>{p.source.clone()}</dd>
                            <dt>"Uploaded"</dt><dd>{p.row.created.clone()}</dd>
                        </dl>
                    </section>
                    <section>
                        <h2>"Tasks using it"</h2>
                        {if p.tasks.is_empty() {
                            view! { <p class="empty">"No task uses this package."</p> }.into_any()
                        } else {
                            view! {
                                <table class="table" id="package-tasks">
                                    <thead><tr><th>"Task"</th><th>"Status"</th><th>"Devices"</th><th>"Created"</th></tr></thead>
                                    <tbody>
                                        {p.tasks.into_iter().map(|t| view! {
                                            <tr>
                                                <td><a href=format!("/upgrades/tasks/{}", t.task_id)>{t.task_name.clone()}</a></td>
                                                <td><StatusBadge status=t.status.clone() /></td>
                                                <td class="num">{t.total}</td>
                                                <td class="muted">{t.created.clone()}</td>
                                            </tr>
                                        }).collect_view()}
                                    </tbody>
                                </table>
                            }.into_any()
                        }}
                    </section>
                    }.into_any()
                }
            })}
        </Transition>
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn upload_errors_land_on_their_field() {
        let e = super::upload_error(
            400,
            r#"{"error_code":"IOTDA.000006","error_msg":"version: must not be empty"}"#,
        );
        assert_eq!(e.field("version").as_deref(), Some("must not be empty"));
        let e = super::upload_error(
            409,
            r#"{"error_code":"IOTDA.014003","error_msg":"package 2.0 exists"}"#,
        );
        assert!(e.fields.is_empty());
        assert_eq!(e.message, "package 2.0 exists");
        assert_eq!(
            super::upload_error(502, "<html>").message,
            "the server answered 502"
        );
    }
}
