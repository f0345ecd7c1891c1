//! Devices: list with filters, register one.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use super::PageOf;
use crate::error::ApiError;

/// A device as the Devices table shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRow {
    /// Device id.
    pub device_id: String,
    /// Display name.
    pub device_name: String,
    /// IMEI / MAC / serial.
    pub node_id: String,
    /// Product id.
    pub product_id: String,
    /// `ONLINE`, `OFFLINE`, `INACTIVE`...
    pub status: String,
    /// Software version, if reported.
    pub sw_version: Option<String>,
    /// Firmware version, if reported.
    pub fw_version: Option<String>,
    /// Registration time.
    pub created: String,
}

/// The result of registering a device: the secret is shown once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredDevice {
    /// The new device's id.
    pub device_id: String,
    /// Its secret, in clear, this one time.
    pub secret: String,
}

/// Rows per page on the Devices page.
pub const PAGE_SIZE: u64 = 50;

/// Lists devices matching the filters.
#[server(prefix = "/api", endpoint = "list_devices")]
pub async fn list_devices(
    search: String,
    product_id: String,
    status: String,
    offset: u64,
) -> Result<PageOf<DeviceRow>, ApiError> {
    use backend::service::{Page, devices};
    let (state, user) = super::ssr::context().await?;
    let filter = devices::DeviceFilter {
        search,
        product_id,
        status,
        ..Default::default()
    };
    let page = devices::list(
        &state,
        &user.project_id,
        &filter,
        Page::new(PAGE_SIZE, offset),
    )
    .await?;
    Ok(PageOf {
        items: page
            .items
            .into_iter()
            .map(|d| DeviceRow {
                device_id: d.id,
                device_name: d.device_name,
                node_id: d.node_id,
                product_id: d.product_id,
                status: d.status,
                sw_version: d.sw_version,
                fw_version: d.fw_version,
                created: super::ssr::when(d.created_at),
            })
            .collect(),
        total: page.total,
        offset,
        limit: PAGE_SIZE,
    })
}

/// Registers a device. Empty `device_id` means `{product_id}_{node_id}`; empty `secret` means generate one.
#[server(prefix = "/api", endpoint = "register_device")]
pub async fn register_device(
    product_id: String,
    node_id: String,
    device_name: String,
    device_id: String,
    secret: String,
) -> Result<RegisteredDevice, ApiError> {
    use backend::service::devices;
    use secrecy::ExposeSecret;
    let (state, user) = super::ssr::context().await?;
    let secret =
        (!secret.trim().is_empty()).then(|| secrecy::SecretString::from(secret.trim().to_owned()));
    let new = devices::NewDevice {
        product_id,
        node_id,
        device_id: Some(device_id),
        device_name,
        description: String::new(),
        secret,
        ..Default::default()
    };
    let registered = devices::register(&state, &user.project_id, new).await?;
    Ok(RegisteredDevice {
        device_id: registered.device.id,
        secret: registered.secret.expose_secret().to_owned(),
    })
}
