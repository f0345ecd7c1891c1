//! Devices: registration (with a secret shown once and stored sealed) and listing with filters.

use domain::device::{DeviceStatus, NodeId, ProtocolType, check_secret};
use domain::{DeviceId, text};
use sea_orm::sea_query::{Expr, ExprTrait, Func};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, Set,
};
use secrecy::{ExposeSecret, SecretString};

use super::{Page, Paged};
use crate::storage::entity::devices;
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
    let now = state.clock.now().as_millis();
    let device = devices::ActiveModel {
        id: Set(device_id.to_string()),
        project_id: Set(project_id.to_owned()),
        app_id: Set(product.app_id.clone()),
        product_id: Set(product.id.clone()),
        node_id: Set(node.to_string()),
        device_name: Set(text::bounded("device_name", &new.device_name, 256, false)?),
        description: Set(text::bounded("description", &new.description, 2048, false)?),
        gateway_id: Set(None),
        node_type: Set("GATEWAY".to_owned()),
        auth_type: Set("SECRET".to_owned()),
        secret_enc: Set(Some(
            state
                .sealer
                .seal(device_id.as_str(), secret.expose_secret()),
        )),
        secondary_secret_enc: Set(None),
        fingerprint: Set(None),
        secure_access: Set(true),
        status: Set(DeviceStatus::Inactive.as_str().to_owned()),
        sw_version: Set(None),
        fw_version: Set(None),
        device_sdk_version: Set(None),
        extension_info: Set(None),
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
    if !filter.status.trim().is_empty() {
        let status = DeviceStatus::parse(filter.status.trim())?;
        cond = cond.add(devices::Column::Status.eq(status.as_str()));
    }
    let query = devices::Entity::find()
        .filter(cond)
        .order_by_desc(devices::Column::CreatedAt)
        .order_by_desc(devices::Column::Id);
    super::fetch_page(&state.db, query, page).await
}
