//! Devices: registration (with a secret shown once and stored sealed) and listing with filters.

use domain::device::{DeviceStatus, NodeId, ProtocolType, check_secret};
use domain::{DeviceId, Timestamp, text};
use sea_orm::sea_query::{Expr, ExprTrait, Func};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, Set,
};
use secrecy::{ExposeSecret, SecretString};

use super::{Page, Paged};
use crate::storage::entity::{devices, products};
use crate::{AppState, Error, Result, ids};

/// What an operator gives to register a device.
#[derive(Debug, Default)]
pub struct NewDevice {
    /// The product it belongs to.
    pub product_id: String,
    /// IMEI, MAC or serial number.
    pub node_id: String,
    /// The id; `{product_id}_{node_id}` when `None`.
    pub device_id: Option<String>,
    /// Display name (up to 256 characters).
    pub device_name: String,
    /// Description (up to 2048 characters).
    pub description: String,
    /// The secret; generated when `None`.
    pub secret: Option<SecretString>,
    /// Free-form JSON object, at most 1 KiB serialised.
    pub extension_info: Option<serde_json::Value>,
    /// Whether the device must use a secure protocol (default true).
    pub secure_access: Option<bool>,
    /// The gateway a child device is reached through: a directly connected device of this project (one
    /// level of children; IoTDA allows two).
    pub gateway_id: Option<String>,
}

/// A registered device and its secret, which is shown to the operator this once.
#[derive(Debug)]
pub struct Registered {
    /// The stored row (its secret sealed).
    pub device: devices::Model,
    /// The secret in clear.
    pub secret: SecretString,
}

/// Registers a device in `project_id`.
///
/// # Errors
/// [`Error::Validation`] naming the field; [`Error::NotFound`] for an unknown product; [`Error::Conflict`]
/// for a taken device id or node id; [`Error::Db`].
pub async fn register(state: &AppState, project_id: &str, new: NewDevice) -> Result<Registered> {
    let product = super::products::get(state, project_id, new.product_id.trim()).await?;
    let protocol = ProtocolType::parse(&product.protocol_type)?;
    let node = NodeId::parse(new.node_id.trim())?;
    let product_id = domain::ProductId::parse(product.id.clone())?;
    let device_id = match new
        .device_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        Some(id) => DeviceId::parse(id)?,
        None => DeviceId::derived(&product_id, &node)?,
    };
    let secret = match new.secret {
        Some(s) => {
            check_secret(s.expose_secret(), protocol)?;
            s
        }
        // NB-IoT devices take hex secrets; 32 hex digits carry 128 bits, as do 22 alphanumerics.
        None if protocol == ProtocolType::CoAP => SecretString::from(ids::hex_secret(32)),
        None => SecretString::from(ids::alphanumeric(24)),
    };
    let gateway = match new
        .gateway_id
        .as_deref()
        .map(str::trim)
        .filter(|g| !g.is_empty())
    {
        None => None,
        Some(g) if g == device_id.as_str() => None,
        Some(g) => {
            let parent = devices::Entity::find_by_id(g.to_owned())
                .filter(devices::Column::ProjectId.eq(project_id))
                .one(&state.db)
                .await?
                .ok_or_else(|| Error::not_found("gateway", g))?;
            // A child is reached through its gateway's connection: the gateway must have one.
            if parent.gateway_id.is_some() {
                return Err(domain::ValidationError::new(
                    "gateway_id",
                    format!(
                        "{g} is itself a child device; Updraft reaches children through a directly \
                         connected gateway (one level)"
                    ),
                )
                .into());
            }
            Some(parent.id)
        }
    };
    let now = state.clock.now().as_millis();
    let device = devices::ActiveModel {
        id: Set(device_id.to_string()),
        project_id: Set(project_id.to_owned()),
        app_id: Set(product.app_id.clone()),
        product_id: Set(product.id.clone()),
        node_id: Set(node.to_string()),
        device_name: Set(text::bounded("device_name", &new.device_name, 256, false)?),
        description: Set(text::bounded("description", &new.description, 2048, false)?),
        node_type: Set(if gateway.is_some() {
            "ENDPOINT"
        } else {
            "GATEWAY"
        }
        .to_owned()),
        gateway_id: Set(gateway),
        auth_type: Set("SECRET".to_owned()),
        secret_enc: Set(Some(
            state
                .sealer
                .seal(device_id.as_str(), secret.expose_secret()),
        )),
        secondary_secret_enc: Set(None),
        fingerprint: Set(None),
        secure_access: Set(new.secure_access.unwrap_or(true)),
        status: Set(DeviceStatus::Inactive.as_str().to_owned()),
        sw_version: Set(None),
        fw_version: Set(None),
        device_sdk_version: Set(None),
        instance_id: Set(None),
        extension_info: Set(new
            .extension_info
            .as_ref()
            .map(extension_info)
            .transpose()?),
        last_radio: Set(None),
        connection_status_update_time: Set(None),
        active_time: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(&state.db)
    .await
    .map_err(|e| {
        crate::storage::conflict_on_unique(e, || {
            format!("device {device_id} or node id {node} is already registered")
        })
    })?;
    tracing::info!(device_id = %device.id, product_id = %device.product_id, "device registered");
    Ok(Registered { device, secret })
}

/// The secret of `device_id`, opened from its sealed form (for the MQTT login check).
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Secrets`] when the key file does not match the database.
pub async fn secret(state: &AppState, device_id: &str) -> Result<Option<SecretString>> {
    let device = devices::Entity::find_by_id(device_id.to_owned())
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("device", device_id))?;
    device
        .secret_enc
        .map(|sealed| state.sealer.open(&device.id, &sealed).map_err(Error::from))
        .transpose()
}

/// Filters for [`list`]; empty fields do not filter.
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    /// Matches device id, node id or name (case-insensitive substring).
    pub search: String,
    /// Only this product.
    pub product_id: String,
    /// Only this status (`ONLINE`...).
    pub status: String,
    /// Only this node id (exact).
    pub node_id: String,
    /// Only this name (exact).
    pub device_name: String,
    /// Only devices of products speaking this protocol (`MQTT`, `CoAP`...).
    pub protocol: String,
    /// Only devices reporting this software or firmware version (exact).
    pub version: String,
    /// Only the children of this gateway (IoTDA's `gateway_id`): one level, or with `cascade` two.
    pub gateway_id: Option<String>,
    /// With `gateway_id`: the children's children too (IoTDA's `is_cascade_query`).
    pub cascade: bool,
    /// Only devices registered at or after this time (IoTDA's `start_time`).
    pub registered_from: Option<Timestamp>,
    /// Only devices registered at or before this time (IoTDA's `end_time`).
    pub registered_until: Option<Timestamp>,
    /// The order (and IoTDA's marker).
    pub order: super::ListOrder,
}

/// Lists `project_id`'s devices, newest first.
///
/// # Errors
/// [`Error::Validation`] for an unknown status; [`Error::Db`].
pub async fn list(
    state: &AppState,
    project_id: &str,
    filter: &DeviceFilter,
    page: Page,
) -> Result<Paged<devices::Model>> {
    let mut cond = Condition::all().add(devices::Column::ProjectId.eq(project_id));
    let search = filter.search.trim().to_lowercase();
    if !search.is_empty() {
        let pattern = format!(
            "%{}%",
            search
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let like = |col: devices::Column| {
            Expr::expr(Func::lower(Expr::col(col)))
                .like(sea_orm::sea_query::LikeExpr::new(pattern.clone()).escape('\\'))
        };
        cond = cond.add(
            Condition::any()
                .add(like(devices::Column::Id))
                .add(like(devices::Column::NodeId))
                .add(like(devices::Column::DeviceName)),
        );
    }
    if !filter.product_id.trim().is_empty() {
        cond = cond.add(devices::Column::ProductId.eq(filter.product_id.trim()));
    }
    if !filter.node_id.trim().is_empty() {
        cond = cond.add(devices::Column::NodeId.eq(filter.node_id.trim()));
    }
    if !filter.device_name.trim().is_empty() {
        cond = cond.add(devices::Column::DeviceName.eq(filter.device_name.trim()));
    }
    if !filter.protocol.trim().is_empty() {
        let protocol = ProtocolType::parse(filter.protocol.trim())?;
        cond = cond.add(
            devices::Column::ProductId.in_subquery(
                sea_orm::sea_query::Query::select()
                    .column(products::Column::Id)
                    .from(products::Entity)
                    .and_where(products::Column::ProjectId.eq(project_id))
                    .and_where(products::Column::ProtocolType.eq(protocol.as_str()))
                    .to_owned(),
            ),
        );
    }
    if let Some(g) = filter.gateway_id.as_deref() {
        let mut children = Condition::any().add(devices::Column::GatewayId.eq(g));
        if filter.cascade {
            children = children.add(
                devices::Column::GatewayId.in_subquery(
                    sea_orm::sea_query::Query::select()
                        .column(devices::Column::Id)
                        .from(devices::Entity)
                        .and_where(devices::Column::GatewayId.eq(g))
                        .to_owned(),
                ),
            );
        }
        cond = cond.add(children);
    }
    if let Some(t) = filter.registered_from {
        cond = cond.add(devices::Column::CreatedAt.gte(t.as_millis()));
    }
    if let Some(t) = filter.registered_until {
        cond = cond.add(devices::Column::CreatedAt.lte(t.as_millis()));
    }
    if !filter.version.trim().is_empty() {
        let v = filter.version.trim();
        cond = cond.add(
            Condition::any()
                .add(devices::Column::SwVersion.eq(v))
                .add(devices::Column::FwVersion.eq(v)),
        );
    }
    if !filter.status.trim().is_empty() {
        let status = DeviceStatus::parse(filter.status.trim())?;
        cond = cond.add(devices::Column::Status.eq(status.as_str()));
    }
    let query = filter.order.apply(
        devices::Entity::find().filter(cond),
        devices::Column::Id,
        |q| {
            q.order_by_desc(devices::Column::CreatedAt)
                .order_by_desc(devices::Column::Id)
        },
    );
    super::fetch_ordered(&state.db, query, page).await
}

/// One device of `project_id`.
///
/// # Errors
/// [`Error::NotFound`] when it does not exist in this project; [`Error::Db`].
pub async fn get(state: &AppState, project_id: &str, device_id: &str) -> Result<devices::Model> {
    devices::Entity::find_by_id(device_id.to_owned())
        .filter(devices::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("device", device_id))
}

/// What may change on a device; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct DeviceUpdate {
    /// Display name (up to 256 characters).
    pub device_name: Option<String>,
    /// Description (up to 2048 characters).
    pub description: Option<String>,
    /// Free-form JSON object, at most 1 KiB serialised.
    pub extension_info: Option<serde_json::Value>,
    /// Whether the device must use a secure protocol.
    pub secure_access: Option<bool>,
}

/// Updates a device.
///
/// # Errors
/// [`Error::Validation`] naming the field; [`Error::NotFound`]; [`Error::Db`].
pub async fn update(
    state: &AppState,
    project_id: &str,
    device_id: &str,
    change: DeviceUpdate,
) -> Result<devices::Model> {
    let device = get(state, project_id, device_id).await?;
    let mut row: devices::ActiveModel = device.into();
    if let Some(name) = &change.device_name {
        row.device_name = Set(text::bounded("device_name", name, 256, false)?);
    }
    if let Some(description) = &change.description {
        row.description = Set(text::bounded("description", description, 2048, false)?);
    }
    if let Some(info) = &change.extension_info {
        row.extension_info = Set(Some(extension_info(info)?));
    }
    if let Some(secure) = change.secure_access {
        row.secure_access = Set(secure);
    }
    row.updated_at = Set(state.clock.now().as_millis());
    Ok(row.update(&state.db).await?)
}

/// Deletes a device (its group memberships go with it; its upgrade history stays with its tasks).
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Conflict`] while a task is still upgrading it; [`Error::Db`].
pub async fn delete(state: &AppState, project_id: &str, device_id: &str) -> Result<()> {
    use crate::storage::entity::subtasks;
    get(state, project_id, device_id).await?;
    if let Some(open) = subtasks::Entity::find()
        .filter(subtasks::Column::DeviceId.eq(device_id))
        .filter(
            subtasks::Column::Status
                .is_in(domain::task::SubtaskStatus::OPEN.map(domain::task::SubtaskStatus::as_str)),
        )
        .one(&state.db)
        .await?
    {
        return Err(Error::Conflict(format!(
            "device {device_id} is being upgraded by task {}; stop the task (or the device in it) first",
            open.task_id
        )));
    }
    if let Some(child) = devices::Entity::find()
        .filter(devices::Column::GatewayId.eq(device_id))
        .one(&state.db)
        .await?
    {
        return Err(Error::Conflict(format!(
            "device {device_id} is the gateway of {} (and maybe others); delete its child devices first",
            child.id
        )));
    }
    devices::Entity::delete_by_id(device_id.to_owned())
        .exec(&state.db)
        .await?;
    state.driver.disconnect(device_id);
    tracing::info!(device_id, "device deleted");
    Ok(())
}

/// Freezes a device (it can no longer log in) or unfreezes it (back to offline).
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn set_frozen(
    state: &AppState,
    project_id: &str,
    device_id: &str,
    frozen: bool,
) -> Result<devices::Model> {
    let device = get(state, project_id, device_id).await?;
    let was_frozen = device.status == DeviceStatus::Frozen.as_str();
    if was_frozen == frozen {
        return Ok(device);
    }
    let status = if frozen {
        DeviceStatus::Frozen
    } else if device.active_time.is_some() {
        DeviceStatus::Offline
    } else {
        DeviceStatus::Inactive
    };
    let mut row: devices::ActiveModel = device.into();
    row.status = Set(status.as_str().to_owned());
    row.updated_at = Set(state.clock.now().as_millis());
    let device = row.update(&state.db).await?;
    if frozen {
        // A frozen device must not stay connected (its login is refused from now on).
        state.driver.disconnect(device_id);
    }
    tracing::info!(device_id, frozen, "device frozen state changed");
    Ok(device)
}

/// A device's `extension_info`: a JSON object of at most 1 KiB, stored serialised.
fn extension_info(info: &serde_json::Value) -> Result<String> {
    if !info.is_object() {
        return Err(domain::ValidationError::new("extension_info", "must be a JSON object").into());
    }
    let json = info.to_string();
    if json.len() > 1024 {
        return Err(domain::ValidationError::new(
            "extension_info",
            "must be at most 1 KiB of JSON",
        )
        .into());
    }
    Ok(json)
}

/// The LwM2M device whose node id is `endpoint` (a registration's endpoint name): of a CoAP product, and
/// not frozen.
///
/// # Errors
/// [`Error::Db`].
pub async fn find_lwm2m(state: &AppState, endpoint: &str) -> Result<Option<devices::Model>> {
    use crate::storage::entity::products;
    let candidates = devices::Entity::find()
        .filter(devices::Column::NodeId.eq(endpoint))
        .filter(devices::Column::Status.ne("FROZEN"))
        .all(&state.db)
        .await?;
    for device in candidates {
        let coap = products::Entity::find_by_id(device.product_id.clone())
            .one(&state.db)
            .await?
            .is_some_and(|p| p.protocol_type == domain::device::ProtocolType::CoAP.as_str());
        if coap {
            return Ok(Some(device));
        }
    }
    Ok(None)
}
