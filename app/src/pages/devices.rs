//! `/devices`: the device registry, and `/devices/:id`: one device. Filters live in the URL
//! (`?q=&product=&status=&protocol=&version=&offset=`), so they work without JavaScript and survive a
//! reload; registering, importing and adding to a group are server functions.

use std::collections::BTreeSet;

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::components::{A, Form};
use leptos_router::hooks::{use_params_map, use_query_map};

use crate::api::devices::{
    DeleteDevice, ImportDevices, RegisterDevice, device_detail, list_devices,
};
use crate::api::groups::{ChangeMembers, list_groups};
use crate::api::products::list_products;
use crate::components::{
    FieldError, FormError, Pager, SelectAll, SelectBox, StatusBadge, encode, or_dash,
    reset_after_success,
};

/// `/devices`
#[component]
pub fn DevicesPage() -> impl IntoView {
    let query = use_query_map();
    let param = move |k: &str| query.read().get(k).unwrap_or_default();
    let register = ServerAction::<RegisterDevice>::new();
    let import = ServerAction::<ImportDevices>::new();
    let add = ServerAction::<ChangeMembers>::new();
    let devices = Resource::new(
        move || {
            (
                [
                    param("q"),
                    param("product"),
                    param("status"),
                    param("protocol"),
                    param("version"),
                ],
                param("offset").parse::<u64>().unwrap_or(0),
                (register.version().get(), import.version().get()),
            )
        },
        |([q, product, status, protocol, version], offset, _)| {
            list_devices(q, product, status, protocol, version, offset)
        },
    );
    let products = Resource::new(|| (), |()| list_products());
    let groups = Resource::new(move || add.version().get(), |_| list_groups());
    let (open, set_open) = signal(None::<&'static str>);
    let toggle = move |which: &'static str| {
        set_open.update(|o| *o = if *o == Some(which) { None } else { Some(which) });
    };
    let selected = RwSignal::new(BTreeSet::<String>::new());
    let error = Signal::derive(move || register.value().get().and_then(Result::err));
    let form_ref = reset_after_success(move || matches!(register.value().get(), Some(Ok(_))));
    let registered = move || register.value().get().and_then(Result::ok);

    view! {
        <Title text="Devices" />
        <div class="page-head">
            <h1>"Devices"</h1>
            <div class="buttons">
                <button
                    id="import-toggle"
                    aria-expanded=move || (open.get() == Some("import")).to_string()
                    on:click=move |_| toggle("import")
                >
                    "Import CSV"
                </button>
                <button
                    id="register-toggle"
                    class="primary"
                    aria-expanded=move || (open.get() == Some("register")).to_string()
                    on:click=move |_| toggle("register")
                >
                    {move || if open.get() == Some("register") { "Close" } else { "Register device" }}
                </button>
            </div>
        </div>

        {move || registered().map(|r| view! {
            <div class="alert ok" id="registered" role="status">
                <strong>{format!("Device {} registered.", r.device_id)}</strong>
                " Its secret is shown only this once; give it to the device now: "
                <code id="device-secret">{r.secret}</code>
            </div>
        })}

        <section class="card" id="register-form" hidden=move || open.get() != Some("register")>
            <h2>"Register a device"</h2>
            <ActionForm action=register node_ref=form_ref attr:class="form-grid">
                <label>
                    "Product"
                    <ProductSelect products />
                    <FieldError error field="product_id" />
                </label>
                <label>
                    "Node ID (IMEI, MAC or serial)"
                    <input name="node_id" required maxlength="64" pattern="[A-Za-z0-9_\\-]+" />
                    <FieldError error field="node_id" />
                </label>
                <label>
                    "Name"
                    <input name="device_name" maxlength="256" />
                    <FieldError error field="device_name" />
                </label>
                <label>
                    "Device ID " <span class="muted">"(optional; default product_node)"</span>
                    <input name="device_id" maxlength="128" pattern="[A-Za-z0-9_\\-]*" />
                    <FieldError error field="device_id" />
                </label>
                <label>
                    "Secret " <span class="muted">"(optional; generated if empty)"</span>
                    <input name="secret" type="password" autocomplete="new-password" maxlength="32" />
                    <FieldError error field="secret" />
                </label>
                <FormError error />
                <div class="actions">
                    <button type="submit" class="primary" disabled=move || register.pending().get()>
                        {move || if register.pending().get() { "Registering…" } else { "Register" }}
                    </button>
                </div>
            </ActionForm>
        </section>

        <ImportCard import open=Signal::derive(move || open.get() == Some("import")) products />

        <Form method="GET" action="" attr:class="filters">
            <input type="search" name="q" placeholder="Search id, node id or name" value=move || param("q") />
            <select name="status" aria-label="Status">
                <option value="">"Any status"</option>
                {["ONLINE", "OFFLINE", "INACTIVE", "ABNORMAL", "FROZEN"].into_iter().map(|s| view! {
                    <option value=s selected=move || param("status") == s>{s}</option>
                }).collect_view()}
            </select>
            <select name="protocol" aria-label="Protocol">
                <option value="">"Any protocol"</option>
                {[("MQTT", "MQTT"), ("CoAP", "LwM2M/CoAP")].into_iter().map(|(v, l)| view! {
                    <option value=v selected=move || param("protocol") == v>{l}</option>
                }).collect_view()}
            </select>
            <input name="product" placeholder="Product ID" value=move || param("product") aria-label="Product ID" />
            <input name="version" placeholder="Version" value=move || param("version") aria-label="Version" size="10" />
            <button type="submit">"Filter"</button>
        </Form>

        <AddToGroup selected add groups />

        <Transition fallback=|| view! { <p class="muted">"Loading devices…"</p> }>
            {move || devices.get().map(|r| match r {
                Ok(page) => {
                    let base = format!(
                        "/devices?q={}&product={}&status={}&protocol={}&version={}",
                        encode(&param("q")), encode(&param("product")), encode(&param("status")),
                        encode(&param("protocol")), encode(&param("version"))
                    );
                    view! { <DeviceTable page base selected /> }.into_any()
                }
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
            })}
        </Transition>
    }
}

/// The CSV import card: paste or choose a file; secrets of the new devices are shown once.
#[component]
fn ImportCard(
    import: ServerAction<ImportDevices>,
    open: Signal<bool>,
    products: ProductsResource,
) -> impl IntoView {
    let (text, set_text) = signal(String::new());
    let error = Signal::derive(move || import.value().get().and_then(Result::err));
    let result = move || import.value().get().and_then(Result::ok);
    view! {
        <section class="card" id="import-form" hidden=move || !open.get()>
            <h2>"Import devices from CSV"</h2>
            <p class="muted">
                "One device per line: " <code>"node_id,device_name,device_id,secret"</code>
                ". Only the node id is required; empty ids and secrets are generated. A header line is optional."
            </p>
            <ActionForm action=import attr:class="form-grid">
                <label>
                    "Product"
                    <ProductSelect products />
                    <FieldError error field="product_id" />
                </label>
                <label>
                    "CSV file"
                    <input
                        type="file"
                        accept=".csv,text/csv,text/plain"
                        on:change=move |_ev| {
                            #[cfg(feature = "hydrate")]
                            {
                                use wasm_bindgen::JsCast;
                                if let Some(input) = _ev.target().and_then(|t| t.dyn_into::<web_sys::HtmlInputElement>().ok()) {
                                    crate::browser::read_file(&input, set_text);
                                }
                            }
                        }
                    />
                </label>
                <label class="wide">
                    "Devices"
                    <textarea name="csv" rows="6" required prop:value=move || text.get()
                        on:input=move |ev| set_text.set(event_target_value(&ev))
                        placeholder="imei860000000000001,Pump house\nimei860000000000002,Tank north"></textarea>
                    <FieldError error field="csv" />
                </label>
                <FormError error />
                <div class="actions">
                    <button type="submit" class="primary" disabled=move || import.pending().get()>
                        {move || if import.pending().get() { "Importing…" } else { "Import" }}
                    </button>
                </div>
            </ActionForm>
            {move || result().map(|r| {
                let csv: String = std::iter::once("device_id,secret\n".to_owned())
                    .chain(r.registered.iter().map(|d| format!("{},{}\n", d.device_id, d.secret)))
                    .collect();
                let href = format!("data:text/csv;charset=utf-8,{}", encode(&csv));
                view! {
                    <div class="alert ok" id="imported" role="status">
                        <strong>{format!("{} devices registered.", r.registered.len())}</strong>
                        " Their secrets are shown only now: "
                        <a href=href download="updraft-device-secrets.csv">"download them as CSV"</a>
                    </div>
                    {(!r.refused.is_empty()).then(|| view! {
                        <div class="alert error" id="import-refused">
                            <strong>{format!("{} lines refused:", r.refused.len())}</strong>
                            <ul>{r.refused.into_iter().map(|m| view! { <li>{m}</li> }).collect_view()}</ul>
                        </div>
                    })}
                }
            })}
        </section>
    }
}

type ProductsResource =
    Resource<Result<crate::api::PageOf<crate::api::products::ProductRow>, crate::error::ApiError>>;

/// A `product_id` select of every product.
#[component]
fn ProductSelect(products: ProductsResource) -> impl IntoView {
    view! {
        <Transition fallback=|| view! { <select name="product_id" disabled=true></select> }>
            {move || products.get().map(|r| match r {
                Ok(page) if page.items.is_empty() => view! {
                    <p class="muted">"No products yet. " <a href="/products">"Create one first."</a></p>
                }
                .into_any(),
                Ok(page) => view! {
                    <select name="product_id" required>
                        {page.items.into_iter().map(|p| view! {
                            <option value=p.product_id.clone()>{format!("{} ({}, {})", p.name, p.product_id, p.protocol_type)}</option>
                        }).collect_view()}
                    </select>
                }
                .into_any(),
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
            })}
        </Transition>
    }
}

/// The bar that adds the selected devices to a group.
#[component]
fn AddToGroup(
    selected: RwSignal<BTreeSet<String>>,
    add: ServerAction<ChangeMembers>,
    groups: Resource<
        Result<crate::api::PageOf<crate::api::groups::GroupRow>, crate::error::ApiError>,
    >,
) -> impl IntoView {
    let (group, set_group) = signal(String::new());
    let outcome = move || {
        add.value().get().map(|r| match r {
            Ok(c) if c.refused.is_empty() => view! {
                <span class="ok-text" id="added" role="status">{format!("Added {} devices.", c.changed)}</span>
            }
            .into_any(),
            Ok(c) => view! {
                <span class="field-error" role="alert">{format!("Added {}; refused: {}", c.changed, c.refused.join("; "))}</span>
            }
            .into_any(),
            Err(e) => view! { <span class="field-error" role="alert">{e.message}</span> }.into_any(),
        })
    };
    Effect::new(move |_| {
        if matches!(add.value().get(), Some(Ok(_))) {
            selected.set(BTreeSet::new());
        }
    });
    view! {
        <div class="selection-bar" hidden=move || selected.read().is_empty() id="selection-bar">
            <strong>{move || format!("{} selected", selected.read().len())}</strong>
            <select aria-label="Group" on:change=move |ev| set_group.set(event_target_value(&ev))>
                <option value="">"Choose a group…"</option>
                <Transition fallback=|| ()>
                    {move || groups.get().and_then(Result::ok).map(|page| page.items.into_iter().map(|g| view! {
                        <option value=g.group_id.clone()>{g.name}</option>
                    }).collect_view())}
                </Transition>
            </select>
            <button
                class="primary"
                disabled=move || group.get().is_empty() || add.pending().get()
                on:click=move |_| {
                    let ids: Vec<String> = selected.get().into_iter().collect();
                    add.dispatch(ChangeMembers { group_id: group.get(), device_ids: ids.join(","), add: true });
                }
            >
                "Add to group"
            </button>
            <button class="link" on:click=move |_| selected.set(BTreeSet::new())>"Clear selection"</button>
            {outcome}
        </div>
    }
}

#[component]
fn DeviceTable(
    page: crate::api::PageOf<crate::api::devices::DeviceRow>,
    base: String,
    selected: RwSignal<BTreeSet<String>>,
) -> impl IntoView {
    if page.items.is_empty() {
        return view! { <p class="empty" id="devices-empty">"No devices match. Register one with the button above."</p> }.into_any();
    }
    let (total, offset, limit) = (page.total, page.offset, page.limit);
    let ids: Vec<String> = page.items.iter().map(|d| d.device_id.clone()).collect();
    view! {
        <div class="table-wrap">
        <table class="table" id="devices">
            <thead>
                <tr>
                    <th class="check"><SelectAll selected ids /></th>
                    <th>"Device ID"</th><th>"Name"</th><th>"Node ID"</th><th>"Product"</th>
                    <th>"Status"</th><th>"Software"</th><th>"Firmware"</th><th>"Registered"</th>
                </tr>
            </thead>
            <tbody>
                {page.items.into_iter().map(|d| view! {
                    <tr>
                        <td class="check"><SelectBox selected id=d.device_id.clone() /></td>
                        <td class="mono"><a href=format!("/devices/{}", d.device_id)>{d.device_id.clone()}</a></td>
                        <td>{d.device_name}</td>
                        <td class="mono">{d.node_id}</td>
                        <td class="mono">{d.product_id}</td>
                        <td><StatusBadge status=d.status /></td>
                        <td>{or_dash(d.sw_version)}</td>
                        <td>{or_dash(d.fw_version)}</td>
                        <td class="muted">{d.created}</td>
                    </tr>
                }).collect_view()}
            </tbody>
        </table>
        </div>
        <Pager total offset limit base />
    }
    .into_any()
}

/// `/devices/:id`
#[component]
pub fn DevicePage() -> impl IntoView {
    let params = use_params_map();
    let id = move || params.read().get("id").unwrap_or_default();
    let delete = ServerAction::<DeleteDevice>::new();
    let device = Resource::new(id, device_detail);
    let deleted = move || matches!(delete.value().get(), Some(Ok(())));
    let delete_error = move || {
        delete
            .value()
            .get()
            .and_then(Result::err)
            .map(|e| e.message)
    };
    view! {
        <Title text=move || format!("Device {}", id()) />
        <div class="page-head">
            <div>
                <A href="/devices" attr:class="crumb">"Devices"</A>
                <h1 class="mono">{id}</h1>
            </div>
            <ActionForm action=delete>
                <input type="hidden" name="device_id" value=id />
                <button type="submit" class="danger" disabled=deleted>"Delete device"</button>
            </ActionForm>
        </div>
        {move || deleted().then(|| view! { <p class="alert ok" role="status">"Device deleted."</p> })}
        {move || delete_error().map(|m| view! { <p class="alert error" role="alert">{m}</p> })}
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || device.get().map(|r| match r {
                Ok(d) => view! { <DeviceFacts d /> }.into_any(),
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
            })}
        </Transition>
    }
}

#[component]
fn DeviceFacts(d: crate::api::devices::DeviceView) -> impl IntoView {
    let radio = d.radio.clone();
    view! {
        <div class="grid-2">
            <section class="card">
                <h2>"Device"</h2>
                <dl class="facts" id="device-facts">
                    <dt>"Name"</dt><dd>{or_dash(Some(d.row.device_name.clone()))}</dd>
                    <dt>"Node ID"</dt><dd class="mono">{d.row.node_id.clone()}</dd>
                    <dt>"Product"</dt><dd>{format!("{} ({}, {})", d.product_name, d.row.product_id, d.protocol)}</dd>
                    <dt>"Status"</dt><dd><StatusBadge status=d.row.status.clone() />{d.status_since.clone().map(|s| view! { <span class="muted">{format!(" since {s}")}</span> })}</dd>
                    <dt>"Software"</dt><dd id="sw-version">{or_dash(d.row.sw_version.clone())}</dd>
                    <dt>"Firmware"</dt><dd id="fw-version">{or_dash(d.row.fw_version.clone())}</dd>
                    <dt>"SDK"</dt><dd>{or_dash(d.sdk_version.clone())}</dd>
                    <dt>"Groups"</dt>
                    <dd>
                        {if d.groups.is_empty() { view! { <span class="muted">"none"</span> }.into_any() } else {
                            d.groups.iter().map(|(id, name)| view! { <a class="chip" href=format!("/groups/{id}")>{name.clone()}</a> }).collect_view().into_any()
                        }}
                    </dd>
                    <dt>"Registered"</dt><dd>{d.row.created.clone()}</dd>
                    <dt>"Description"</dt><dd>{or_dash(Some(d.description.clone()))}</dd>
                </dl>
            </section>
            <section class="card">
                <h2>"Last radio report"</h2>
                {match radio {
                    None => view! { <p class="muted">"None. LwM2M devices report their coverage (/4/0) when an upgrade checks it."</p> }.into_any(),
                    Some(r) => view! {
                        <dl class="facts" id="radio">
                            <dt>"RSRP"</dt><dd>{r.rsrp.map_or("–".to_owned(), |v| format!("{v} dBm"))}</dd>
                            <dt>"SINR"</dt><dd>{r.sinr.map_or("–".to_owned(), |v| format!("{v} dB"))}</dd>
                            <dt>"Cell"</dt><dd>{r.cell_id.map_or("–".to_owned(), |v| v.to_string())}</dd>
                            <dt>"Reported"</dt><dd>{r.at}</dd>
                        </dl>
                    }.into_any(),
                }}
            </section>
        </div>
        <section>
            <h2>"Upgrade history"</h2>
            {if d.upgrades.is_empty() {
                view! { <p class="empty">"This device has not been in an upgrade task."</p> }.into_any()
            } else {
                view! {
                    <div class="table-wrap">
                    <table class="table" id="device-upgrades">
                        <thead><tr><th>"Task"</th><th>"Type"</th><th>"Status"</th><th>"Step"</th><th>"Progress"</th><th>"Attempts"</th><th>"From"</th><th>"Error"</th><th>"Started"</th><th>"Finished"</th></tr></thead>
                        <tbody>
                            {d.upgrades.into_iter().map(|u| view! {
                                <tr>
                                    <td><a href=format!("/upgrades/tasks/{}?device={}", u.task_id, d.row.device_id)>{u.task_name}</a></td>
                                    <td>{super::tasks::task_kind(&u.task_type)}</td>
                                    <td><StatusBadge status=u.status /></td>
                                    <td>{u.step}</td>
                                    <td class="num">{format!("{}%", u.progress)}</td>
                                    <td class="num">{u.attempts}</td>
                                    <td>{or_dash(u.source_version)}</td>
                                    <td class="error-text">{or_dash(u.error)}</td>
                                    <td class="muted">{u.created}</td>
                                    <td class="muted">{or_dash(u.finished)}</td>
                                </tr>
                            }).collect_view()}
                        </tbody>
                    </table>
                    </div>
                }.into_any()
            }}
        </section>
    }
}
