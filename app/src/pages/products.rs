//! `/products`: device models. Devices and packages belong to a product.

use leptos::prelude::*;
use leptos_meta::Title;

use crate::api::products::{CreateProduct, DeleteProduct, RenameProduct, list_products};
use crate::components::{FieldError, FormError, reset_after_success};

/// `/products`
#[component]
pub fn ProductsPage() -> impl IntoView {
    let create = ServerAction::<CreateProduct>::new();
    let delete = ServerAction::<DeleteProduct>::new();
    let rename = ServerAction::<RenameProduct>::new();
    let products = Resource::new(
        move || {
            (
                create.version().get(),
                delete.version().get(),
                rename.version().get(),
            )
        },
        |_| list_products(),
    );
    let rename_error = Signal::derive(move || rename.value().get().and_then(Result::err));
    let error = Signal::derive(move || create.value().get().and_then(Result::err));
    let form_ref = reset_after_success(move || matches!(create.value().get(), Some(Ok(_))));
    view! {
        <Title text="Products" />
        <div class="page-head"><h1>"Products"</h1></div>
        <section class="card">
            <h2>"Create a product"</h2>
            <ActionForm action=create node_ref=form_ref attr:class="form-grid" attr:id="product-form">
                <label>"Name" <input name="name" required maxlength="64" /><FieldError error field="name" /></label>
                <label>"Device type" <input name="device_type" required maxlength="32" placeholder="WaterMeter" /><FieldError error field="device_type" /></label>
                <label>
                    "Protocol"
                    <select name="protocol_type">
                        <option value="MQTT">"MQTT"</option>
                        <option value="CoAP">"LwM2M over CoAP (NB-IoT)"</option>
                    </select>
                    <FieldError error field="protocol_type" />
                </label>
                <label>"Manufacturer" <input name="manufacturer_name" maxlength="32" /><FieldError error field="manufacturer_name" /></label>
                <label>
                    "Product ID " <span class="muted">"(optional; generated if empty)"</span>
                    <input name="product_id" maxlength="36" pattern="[A-Za-z0-9_\\-]*" />
                    <FieldError error field="product_id" />
                </label>
                <FormError error />
                <div class="actions"><button type="submit" class="primary">"Create product"</button></div>
            </ActionForm>
        </section>
        {move || delete.value().get().and_then(Result::err).map(|e| view! { <p class="alert error" role="alert" id="product-delete-error">{e.message}</p> })}
        {move || rename_error.get().map(|e| view! { <p class="alert error" role="alert" id="product-rename-error">{e.message}</p> })}
        <Transition fallback=|| view! { <p class="muted">"Loading products…"</p> }>
            {move || products.get().map(|r| match r {
                Ok(page) if page.items.is_empty() => view! { <p class="empty">"No products yet."</p> }.into_any(),
                Ok(page) => view! {
                    <table class="table" id="products">
                        <thead><tr><th>"Product ID"</th><th>"Name"</th><th>"Device type"</th><th>"Protocol"</th><th>"Format"</th><th>"Manufacturer"</th><th class="num">"Devices"</th><th>"Created"</th><th></th></tr></thead>
                        <tbody>
                            {page.items.into_iter().map(|p| {
                                let (rename_id, delete_id, name) = (p.product_id.clone(), p.product_id.clone(), p.name.clone());
                                view! {
                                <tr>
                                    <td class="mono">{p.product_id.clone()}</td><td>{p.name}</td><td>{p.device_type}</td>
                                    <td>{p.protocol_type}</td><td>{p.data_format}</td><td>{p.manufacturer_name}</td>
                                    <td class="num"><a href=format!("/devices?product={}", p.product_id)>{p.devices}</a></td><td class="muted">{p.created}</td>
                                    <td class="row-actions">
                                        <details class="inline-edit">
                                            <summary>"Rename"</summary>
                                            <ActionForm action=rename>
                                                <input type="hidden" name="product_id" value=rename_id.clone() />
                                                <input name="name" required maxlength="64" value=name.clone() aria-label="New name" />
                                                <button type="submit">"Save"</button>
                                            </ActionForm>
                                        </details>
                                        <ActionForm action=delete>
                                            <input type="hidden" name="product_id" value=delete_id.clone() />
                                            <button type="submit" class="link danger-text">"Delete"</button>
                                        </ActionForm>
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
    }
}
