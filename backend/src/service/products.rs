//! Products (device models).

use domain::device::{DataFormat, FirmwareDownload, ProtocolType};
use domain::{ProductId, text};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};

use super::{Page, Paged};
use crate::storage::entity::{devices, products};
use crate::{AppState, Error, Result, ids};

/// What an operator gives to create a product.
#[derive(Clone, Debug, Default)]
pub struct NewProduct {
    /// The id; generated when `None`.
    pub product_id: Option<String>,
    /// Display name (1-64 characters).
    pub name: String,
    /// Device type (1-32 characters).
    pub device_type: String,
    /// `MQTT`, `CoAP`...
    pub protocol_type: String,
    /// `json` or `binary`; `json` when empty.
    pub data_format: String,
    /// Manufacturer (up to 32 characters).
    pub manufacturer_name: String,
    /// Industry (up to 64 characters).
    pub industry: String,
    /// Description (up to 128 characters).
    pub description: String,
    /// The product model's services (a JSON list), kept as given.
    pub service_capabilities: Option<serde_json::Value>,
    /// `coap` (default) or `https`: how its LwM2M devices fetch firmware.
    pub firmware_download: Option<String>,
}

/// Creates a product in `project_id`'s default resource space.
///
/// # Errors
/// [`Error::Validation`] naming the field; [`Error::Conflict`] for a taken id; [`Error::Db`].
pub async fn create(
    state: &AppState,
    project_id: &str,
    new: NewProduct,
) -> Result<products::Model> {
    let now = state.clock.now();
    let id = match new
        .product_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        Some(id) => ProductId::parse(id)?,
        None => ProductId::parse(ids::object_id(now))?,
    };
    let protocol = ProtocolType::parse(new.protocol_type.trim())?;
    let format = if new.data_format.trim().is_empty() {
        DataFormat::Json
    } else {
        DataFormat::parse(new.data_format.trim())?
    };
    let app = super::projects::default_app(state, project_id).await?;
    products::ActiveModel {
        id: Set(id.to_string()),
        project_id: Set(project_id.to_owned()),
        app_id: Set(app.id),
        name: Set(text::bounded("name", &new.name, 64, true)?),
        device_type: Set(text::bounded("device_type", &new.device_type, 32, true)?),
        protocol_type: Set(protocol.as_str().to_owned()),
        data_format: Set(format.as_str().to_owned()),
        manufacturer_name: Set(text::bounded(
            "manufacturer_name",
            &new.manufacturer_name,
            32,
            false,
        )?),
        industry: Set(text::bounded("industry", &new.industry, 64, false)?),
        description: Set(text::bounded("description", &new.description, 128, false)?),
        service_capabilities: Set(capabilities(new.service_capabilities.as_ref())?),
        firmware_download: Set(firmware_download(new.firmware_download.as_deref())?),
        created_at: Set(now.as_millis()),
        updated_at: Set(now.as_millis()),
    }
    .insert(&state.db)
    .await
    .map_err(|e| crate::storage::conflict_on_unique(e, || format!("product {id} already exists")))
}

/// A product with how many devices use it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProductRow {
    /// The product.
    pub product: products::Model,
    /// Devices of this product.
    pub devices: u64,
}

/// Lists `project_id`'s products, newest first.
///
/// # Errors
/// [`Error::Db`].
pub async fn list(state: &AppState, project_id: &str, page: Page) -> Result<Paged<ProductRow>> {
    list_ordered(state, project_id, &super::ListOrder::Natural, page).await
}

/// [`list`] in the given order.
///
/// # Errors
/// [`Error::Db`].
pub async fn list_ordered(
    state: &AppState,
    project_id: &str,
    order: &super::ListOrder,
    page: Page,
) -> Result<Paged<ProductRow>> {
    let query = order.apply(
        products::Entity::find().filter(products::Column::ProjectId.eq(project_id)),
        products::Column::Id,
        |q| q.order_by_desc(products::Column::Id),
    );
    let page = super::fetch_ordered(&state.db, query, page).await?;
    let ids = page.items.iter().map(|p| p.id.clone()).collect();
    let counts =
        super::count_by::<devices::Entity, _>(&state.db, devices::Column::ProductId, ids).await?;
    let items = page
        .items
        .into_iter()
        .map(|product| ProductRow {
            devices: counts.get(&product.id).copied().unwrap_or(0),
            product,
        })
        .collect();
    Ok(Paged {
        items,
        total: page.total,
    })
}

/// One product of `project_id`.
///
/// # Errors
/// [`Error::NotFound`] when it does not exist in this project; [`Error::Db`].
pub async fn get(state: &AppState, project_id: &str, product_id: &str) -> Result<products::Model> {
    products::Entity::find_by_id(product_id.to_owned())
        .filter(products::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("product", product_id))
}

/// What may change on a product; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct ProductUpdate {
    /// Display name (up to 64 characters).
    pub name: Option<String>,
    /// Device type (up to 32 characters).
    pub device_type: Option<String>,
    /// `MQTT`, `CoAP`...; changing to CoAP is refused (IoTDA's rule).
    pub protocol_type: Option<String>,
    /// `json` or `binary`.
    pub data_format: Option<String>,
    /// Up to 32 characters.
    pub manufacturer_name: Option<String>,
    /// Up to 64 characters.
    pub industry: Option<String>,
    /// Up to 128 characters.
    pub description: Option<String>,
    /// The product model's services (a JSON list), kept as given.
    pub service_capabilities: Option<serde_json::Value>,
    /// `coap` or `https`.
    pub firmware_download: Option<String>,
}

/// Updates a product.
///
/// # Errors
/// [`Error::Validation`] naming the field (also for a change to CoAP); [`Error::NotFound`]; [`Error::Db`].
pub async fn update(
    state: &AppState,
    project_id: &str,
    product_id: &str,
    change: ProductUpdate,
) -> Result<products::Model> {
    let product = get(state, project_id, product_id).await?;
    let was = ProtocolType::parse(&product.protocol_type)?;
    let mut row: products::ActiveModel = product.into();
    if let Some(v) = &change.name {
        row.name = Set(text::bounded("name", v, 64, true)?);
    }
    if let Some(v) = &change.device_type {
        row.device_type = Set(text::bounded("device_type", v, 32, true)?);
    }
    if let Some(v) = &change.protocol_type {
        let protocol = ProtocolType::parse(v.trim())?;
        if protocol == ProtocolType::CoAP && was != ProtocolType::CoAP {
            return Err(domain::ValidationError::new(
                "protocol_type",
                "a product cannot be changed to CoAP; create a CoAP product instead",
            )
            .into());
        }
        row.protocol_type = Set(protocol.as_str().to_owned());
    }
    if let Some(v) = &change.data_format {
        row.data_format = Set(DataFormat::parse(v.trim())?.as_str().to_owned());
    }
    if let Some(v) = &change.manufacturer_name {
        row.manufacturer_name = Set(text::bounded("manufacturer_name", v, 32, false)?);
    }
    if let Some(v) = &change.industry {
        row.industry = Set(text::bounded("industry", v, 64, false)?);
    }
    if let Some(v) = &change.description {
        row.description = Set(text::bounded("description", v, 128, false)?);
    }
    if change.service_capabilities.is_some() {
        row.service_capabilities = Set(capabilities(change.service_capabilities.as_ref())?);
    }
    if let Some(v) = &change.firmware_download {
        row.firmware_download = Set(firmware_download(Some(v))?);
    }
    row.updated_at = Set(state.clock.now().as_millis());
    Ok(row.update(&state.db).await?)
}

/// Deletes a product; refused while devices or packages use it.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Conflict`] while in use; [`Error::Db`].
pub async fn delete(state: &AppState, project_id: &str, product_id: &str) -> Result<()> {
    use crate::storage::entity::packages;
    use sea_orm::PaginatorTrait;
    get(state, project_id, product_id).await?;
    let devices = devices::Entity::find()
        .filter(devices::Column::ProductId.eq(product_id))
        .count(&state.db)
        .await?;
    if devices > 0 {
        return Err(Error::Conflict(format!(
            "product {product_id} is used by {devices} devices; delete them first"
        )));
    }
    let packages = packages::Entity::find()
        .filter(packages::Column::ProductId.eq(product_id))
        .count(&state.db)
        .await?;
    if packages > 0 {
        return Err(Error::Conflict(format!(
            "product {product_id} has {packages} packages; delete them first"
        )));
    }
    products::Entity::delete_by_id(product_id.to_owned())
        .exec(&state.db)
        .await?;
    tracing::info!(product_id, "product deleted");
    Ok(())
}

/// `service_capabilities` as stored: a JSON list of at most 500 services and 500 KB.
fn capabilities(v: Option<&serde_json::Value>) -> Result<String> {
    match v {
        None => Ok("[]".to_owned()),
        Some(serde_json::Value::Array(items)) if items.len() <= 500 => {
            let json = serde_json::Value::Array(items.clone()).to_string();
            if json.len() > 500 * 1024 {
                return Err(domain::ValidationError::new(
                    "service_capabilities",
                    "must be at most 500 KB of JSON",
                )
                .into());
            }
            Ok(json)
        }
        Some(_) => Err(domain::ValidationError::new(
            "service_capabilities",
            "must be a list of at most 500 services",
        )
        .into()),
    }
}

/// A `firmware_download` value, `coap` when absent or empty.
fn firmware_download(v: Option<&str>) -> Result<String> {
    match v.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(FirmwareDownload::Coap.as_str().to_owned()),
        Some(v) => Ok(FirmwareDownload::parse(v)?.as_str().to_owned()),
    }
}
