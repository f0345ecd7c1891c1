//! `/devices`: the device registry. Filters live in the URL (`?q=&product=&status=&offset=`), so they work
//! without JavaScript and survive a reload; registering a device is a server function.

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::components::Form;
use leptos_router::hooks::use_query_map;

use crate::api::devices::{RegisterDevice, list_devices};
use crate::api::products::list_products;
use crate::components::{FieldError, FormError, Pager, StatusBadge, reset_after_success};

/// `/devices`
#[component]
pub fn DevicesPage() -> impl IntoView {
    let query = use_query_map();
    let param = move |k: &str| query.read().get(k).unwrap_or_default();
    let register = ServerAction::<RegisterDevice>::new();
    let devices = Resource::new(
        move || {
            (
                param("q"),
                param("product"),
                param("status"),
                param("offset").parse::<u64>().unwrap_or(0),
                register.version().get(),
            )
        },
        |(q, product, status, offset, _)| list_devices(q, product, status, offset),
    );
    let products = Resource::new(|| (), |()| list_products());
    let (form_open, set_form_open) = signal(false);
    let error = Signal::derive(move || register.value().get().and_then(Result::err));
    let form_ref = reset_after_success(move || matches!(register.value().get(), Some(Ok(_))));
    let registered = move || register.value().get().and_then(Result::ok);

    view! {
        <Title text="Devices" />
        <div class="page-head">
            <h1>"Devices"</h1>
            <button
                id="register-toggle"
                class="primary"
                aria-expanded=move || form_open.get().to_string()
                on:click=move |_| set_form_open.update(|open| *open = !*open)
            >
                {move || if form_open.get() { "Close" } else { "Register device" }}
            </button>
        </div>

        {move || registered().map(|r| view! {
            <div class="alert ok" id="registered" role="status">
                <strong>{format!("Device {} registered.", r.device_id)}</strong>
                " Its secret is shown only this once; give it to the device now: "
                <code id="device-secret">{r.secret}</code>
            </div>
        })}

        <section class="card" id="register-form" hidden=move || !form_open.get()>
            <h2>"Register a device"</h2>
            <ActionForm action=register node_ref=form_ref attr:class="form-grid">
                <label>
                    "Product"
                    <Transition fallback=|| view! { <select name="product_id" disabled=true></select> }>
                        {move || products.get().map(|r| match r {
                            Ok(page) if page.items.is_empty() => view! {
                                <p class="muted">"No products yet. " <a href="/products">"Create one first."</a></p>
                            }.into_any(),
                            Ok(page) => view! {
                                <select name="product_id" required>
                                    {page.items.into_iter().map(|p| view! {
                                        <option value=p.product_id.clone()>{format!("{} ({}, {})", p.name, p.product_id, p.protocol_type)}</option>
                                    }).collect_view()}
                                </select>
                            }.into_any(),
                            Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                        })}
                    </Transition>
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

        <Form method="GET" action="" attr:class="filters">
            <input type="search" name="q" placeholder="Search id, node id or name" value=move || param("q") />
            <select name="status">
                <option value="">"Any status"</option>
                {["ONLINE", "OFFLINE", "INACTIVE", "ABNORMAL", "FROZEN"].into_iter().map(|s| view! {
                    <option value=s selected=move || param("status") == s>{s}</option>
                }).collect_view()}
            </select>
            <input name="product" placeholder="Product ID" value=move || param("product") />
            <button type="submit">"Filter"</button>
        </Form>

        <Transition fallback=|| view! { <p class="muted">"Loading devices…"</p> }>
            {move || devices.get().map(|r| match r {
                Ok(page) => {
                    let base = format!("/devices?q={}&product={}&status={}", param("q"), param("product"), param("status"));
                    view! { <DeviceTable page base /> }.into_any()
                }
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
            })}
        </Transition>
    }
}

#[component]
fn DeviceTable(
    page: crate::api::PageOf<crate::api::devices::DeviceRow>,
    base: String,
) -> impl IntoView {
    if page.items.is_empty() {
        return view! { <p class="empty" id="devices-empty">"No devices match. Register one with the button above."</p> }.into_any();
    }
    let (total, offset, limit) = (page.total, page.offset, page.limit);
    view! {
        <table class="table" id="devices">
            <thead>
                <tr>
                    <th>"Device ID"</th><th>"Name"</th><th>"Node ID"</th><th>"Product"</th>
                    <th>"Status"</th><th>"Software"</th><th>"Firmware"</th><th>"Registered"</th>
                </tr>
            </thead>
            <tbody>
                {page.items.into_iter().map(|d| view! {
                    <tr>
                        <td class="mono">{d.device_id}</td>
                        <td>{d.device_name}</td>
                        <td class="mono">{d.node_id}</td>
                        <td class="mono">{d.product_id}</td>
                        <td><StatusBadge status=d.status /></td>
                        <td>{d.sw_version.unwrap_or_else(|| "–".into())}</td>
                        <td>{d.fw_version.unwrap_or_else(|| "–".into())}</td>
                        <td class="muted">{d.created}</td>
                    </tr>
                }).collect_view()}
            </tbody>
        </table>
        <Pager total offset limit base />
    }
    .into_any()
}
