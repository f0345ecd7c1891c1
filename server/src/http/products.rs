//! IoTDA's product API (`iotda-api.md` §3.7). Lists use IoTDA's paging (see [`super::paging`]).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use backend::service::{Page, products, projects};
use domain::Timestamp;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::ServerState;
use super::iotda::{IotdaError, IotdaErrorBody, body};
use super::paging::{PageInfo, id_paging};
use super::signed::{Ext, project};
use super::spaces::{app_names, check_app};

/// IoTDA's `CreateProduct` and `UpdateProduct` body (an update changes what is given; not `product_id`).
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct ProductBody {
    /// The product id (on creation; generated when absent).
    product_id: Option<String>,
    /// Its name (required to create).
    name: Option<String>,
    /// The kind of device (required to create).
    device_type: Option<String>,
    /// IoTDA's protocol, e.g. `MQTT` or `CoAP` (required to create; an update cannot change it to
    /// `CoAP`).
    protocol_type: Option<String>,
    /// `json` (default) or `binary`.
    data_format: Option<String>,
    /// The product model's services (a JSON list, at most 500).
    #[schema(value_type = Option<Vec<Object>>)]
    service_capabilities: Option<Value>,
    /// The manufacturer.
    manufacturer_name: Option<String>,
    /// The industry.
    industry: Option<String>,
    /// A description.
    description: Option<String>,
    /// The resource space; when given, one of the project's.
    app_id: Option<String>,
    /// Updraft: how the product's LwM2M devices fetch firmware, `coap` (block-wise from Updraft's CoAP
    /// endpoint, the default) or `https`.
    firmware_download: Option<String>,
}

/// IoTDA's product.
#[derive(Serialize, ToSchema)]
#[schema(as = Product)]
struct ProductJson {
    /// The resource space.
    app_id: String,
    /// The resource space's name.
    app_name: String,
    /// The product id.
    product_id: String,
    /// Its name.
    name: String,
    /// The kind of device.
    device_type: String,
    /// IoTDA's protocol, e.g. `MQTT` or `CoAP`.
    protocol_type: String,
    /// `json` or `binary`.
    data_format: String,
    /// The manufacturer.
    manufacturer_name: String,
    /// The industry.
    industry: String,
    /// A description.
    description: String,
    /// The product model's services (not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    service_capabilities: Option<Value>,
    /// When it was created (`yyyyMMddTHHmmssZ`, UTC).
    create_time: String,
    /// Updraft: `coap` or `https`, how its LwM2M devices fetch firmware.
    firmware_download: String,
}

impl ProductJson {
    fn new(p: backend::storage::entity::products::Model, app_name: String, full: bool) -> Self {
        Self {
            service_capabilities: full.then(|| {
                serde_json::from_str(&p.service_capabilities).unwrap_or(Value::Array(Vec::new()))
            }),
            create_time: Timestamp::from_millis(p.created_at).to_compact(),
            firmware_download: p.firmware_download,
            app_id: p.app_id,
            app_name,
            product_id: p.id,
            name: p.name,
            device_type: p.device_type,
            protocol_type: p.protocol_type,
            data_format: p.data_format,
            manufacturer_name: p.manufacturer_name,
            industry: p.industry,
            description: p.description,
        }
    }
}

/// `POST /v5/iot/{project_id}/products`: 201.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/products",
    operation_id = "CreateProduct",
    tag = "products",
    summary = "Create a product",
    params(("project_id" = String, Path, description = "The project.")),
    request_body(content = ProductBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The product.", body = ProductJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
        (status = 409, description = "The product id is taken.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn add_product(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    b: Result<Json<ProductBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = body(b)?;
    check_app(&state, &project_id, b.app_id.as_deref()).await?;
    let p = products::create(
        &state.app,
        &project_id,
        products::NewProduct {
            product_id: b.product_id,
            name: b.name.unwrap_or_default(),
            device_type: b.device_type.unwrap_or_default(),
            protocol_type: b.protocol_type.unwrap_or_default(),
            data_format: b.data_format.unwrap_or_default(),
            manufacturer_name: b.manufacturer_name.unwrap_or_default(),
            industry: b.industry.unwrap_or_default(),
            description: b.description.unwrap_or_default(),
            service_capabilities: b.service_capabilities,
            firmware_download: b.firmware_download,
        },
    )
    .await?;
    let app = projects::default_app(&state.app, &project_id).await?;
    Ok(super::iotda::created(
        &p.id.clone(),
        ProductJson::new(p, app.name, true),
    ))
}

/// `ListProducts` query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ProductQuery {
    /// Page size, 1-50 (default 10).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// Records to skip after the marker, 0-500 (default 0).
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
    /// The `page.marker` of the previous page: products after it, by descending id.
    marker: Option<String>,
    /// Only this resource space's products (one of the project's).
    app_id: Option<String>,
    /// Only products with this name (paging does not apply).
    product_name: Option<String>,
}

/// `ListProducts`' answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ListProductsResponse)]
struct ProductList {
    /// This page's products (without `service_capabilities`).
    products: Vec<ProductJson>,
    /// Paging.
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/products`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/products",
    operation_id = "ListProducts",
    tag = "products",
    summary = "List products",
    params(("project_id" = String, Path, description = "The project."), ProductQuery),
    responses(
        (status = 200, description = "A page of products.", body = ProductList),
        (status = 400, description = "An invalid filter or paging parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list_products(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    Query(q): Query<ProductQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, order) = id_paging(
        q.limit.as_deref(),
        q.offset.as_deref(),
        q.marker.as_deref(),
        36,
    )?;
    check_app(&state, &project_id, q.app_id.as_deref()).await?;
    let name = q
        .product_name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let (rows, total) = if let Some(name) = name {
        let found = products::list(&state.app, &project_id, Page::new(500, 0))
            .await?
            .items
            .into_iter()
            .filter(|p| p.product.name == name)
            .collect::<Vec<_>>();
        let n = found.len() as u64;
        (found, n)
    } else {
        let result = products::list_ordered(&state.app, &project_id, &order, page).await?;
        (result.items, result.total)
    };
    let apps = app_names(&state, &project_id).await?;
    let marker = rows.last().map(|p| p.product.id.clone());
    let products: Vec<ProductJson> = rows
        .into_iter()
        .map(|p| {
            let app = apps.get(&p.product.app_id).cloned().unwrap_or_default();
            ProductJson::new(p.product, app, false)
        })
        .collect();
    Ok(Json(ProductList {
        products,
        page: PageInfo {
            count: total,
            marker,
        },
    })
    .into_response())
}

/// `GET /v5/iot/{project_id}/products/{product_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/products/{product_id}",
    operation_id = "ShowProduct",
    tag = "products",
    summary = "Show a product",
    params(("project_id" = String, Path, description = "The project."), ("product_id" = String, Path, description = "The product.")),
    responses(
        (status = 200, description = "The product, with its services.", body = ProductJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or product.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn show_product(
    State(state): State<ServerState>,
    Path((project_id, product_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let p = products::get(&state.app, &project_id, &product_id).await?;
    let apps = app_names(&state, &project_id).await?;
    let app = apps.get(&p.app_id).cloned().unwrap_or_default();
    Ok(Json(ProductJson::new(p, app, true)).into_response())
}

/// `PUT /v5/iot/{project_id}/products/{product_id}`.
#[utoipa::path(
    put,
    path = "/v5/iot/{project_id}/products/{product_id}",
    operation_id = "UpdateProduct",
    tag = "products",
    summary = "Update a product",
    params(("project_id" = String, Path, description = "The project."), ("product_id" = String, Path, description = "The product.")),
    request_body(content = ProductBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The product as it is now.", body = ProductJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or product.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn update_product(
    State(state): State<ServerState>,
    Path((project_id, product_id)): Path<(String, String)>,
    caller: Ext,
    b: Result<Json<ProductBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = body(b)?;
    check_app(&state, &project_id, b.app_id.as_deref()).await?;
    let p = products::update(
        &state.app,
        &project_id,
        &product_id,
        products::ProductUpdate {
            name: b.name,
            device_type: b.device_type,
            protocol_type: b.protocol_type,
            data_format: b.data_format,
            manufacturer_name: b.manufacturer_name,
            industry: b.industry,
            description: b.description,
            service_capabilities: b.service_capabilities,
            firmware_download: b.firmware_download,
        },
    )
    .await?;
    let apps = app_names(&state, &project_id).await?;
    let app = apps.get(&p.app_id).cloned().unwrap_or_default();
    Ok(Json(ProductJson::new(p, app, true)).into_response())
}

/// `DELETE /v5/iot/{project_id}/products/{product_id}`: 204.
#[utoipa::path(
    delete,
    path = "/v5/iot/{project_id}/products/{product_id}",
    operation_id = "DeleteProduct",
    tag = "products",
    summary = "Delete an unused product",
    params(("project_id" = String, Path, description = "The project."), ("product_id" = String, Path, description = "The product.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or product.", body = IotdaErrorBody),
        (status = 409, description = "Devices or packages still use the product.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn delete_product(
    State(state): State<ServerState>,
    Path((project_id, product_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    products::delete(&state.app, &project_id, &product_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
