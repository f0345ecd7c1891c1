//! Products: list and create.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use super::PageOf;
use crate::error::ApiError;

/// A product as the Products table shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductRow {
    /// Product id.
    pub product_id: String,
    /// Name.
    pub name: String,
    /// Device type.
    pub device_type: String,
    /// `MQTT`, `CoAP`...
    pub protocol_type: String,
    /// `json` or `binary`.
    pub data_format: String,
    /// Manufacturer.
    pub manufacturer_name: String,
    /// Devices of this product.
    pub devices: u64,
    /// Creation time.
    pub created: String,
}

/// Lists products (up to 500; products are few).
#[server(prefix = "/api", endpoint = "list_products")]
pub async fn list_products() -> Result<PageOf<ProductRow>, ApiError> {
    use backend::service::{Page, products};
    let (state, user) = super::ssr::context().await?;
    let page = products::list(&state, &user.project_id, Page::new(500, 0)).await?;
    Ok(PageOf {
        items: page
            .items
            .into_iter()
            .map(|r| ProductRow {
                product_id: r.product.id,
                name: r.product.name,
                device_type: r.product.device_type,
                protocol_type: r.product.protocol_type,
                data_format: r.product.data_format,
                manufacturer_name: r.product.manufacturer_name,
                devices: r.devices,
                created: super::ssr::when(r.product.created_at),
            })
            .collect(),
        total: page.total,
        offset: 0,
        limit: 500,
    })
}

/// Creates a product. Empty `product_id` means generate one.
#[server(prefix = "/api", endpoint = "create_product")]
pub async fn create_product(
    product_id: String,
    name: String,
    device_type: String,
    protocol_type: String,
    manufacturer_name: String,
) -> Result<String, ApiError> {
    use backend::service::products;
    let (state, user) = super::ssr::context().await?;
    let new = products::NewProduct {
        product_id: Some(product_id),
        name,
        device_type,
        protocol_type,
        data_format: String::new(),
        manufacturer_name,
        industry: String::new(),
        description: String::new(),
        service_capabilities: None,
        firmware_download: None,
    };
    Ok(super::ssr::created(
        products::create(&state, &user.project_id, new).await?.id,
    ))
}

/// Deletes a product (refused while it has devices or packages).
#[server(prefix = "/api", endpoint = "delete_product")]
pub async fn delete_product(product_id: String) -> Result<(), ApiError> {
    let (state, user) = super::ssr::context().await?;
    backend::service::products::delete(&state, &user.project_id, &product_id).await?;
    Ok(())
}

/// Renames a product.
#[server(prefix = "/api", endpoint = "rename_product")]
pub async fn rename_product(product_id: String, name: String) -> Result<(), ApiError> {
    use backend::service::products;
    let (state, user) = super::ssr::context().await?;
    let change = products::ProductUpdate {
        name: Some(name),
        ..Default::default()
    };
    products::update(&state, &user.project_id, &product_id, change).await?;
    Ok(())
}
