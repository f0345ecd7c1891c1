//! Devices: list with filters, register one or many (CSV), detail with upgrade history, delete.

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

/// The result of a CSV import: what was registered (with secrets, shown once) and what was not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imported {
    /// Registered devices.
    pub registered: Vec<RegisteredDevice>,
    /// `line n: reason` for each refused line.
    pub refused: Vec<String>,
}

/// One upgrade in a device's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceUpgradeRow {
    /// Task id.
    pub task_id: String,
    /// Task name.
    pub task_name: String,
    /// `softwareUpgrade` / `firmwareUpgrade`.
    pub task_type: String,
    /// The subtask's status.
    pub status: String,
    /// Its current step.
    pub step: String,
    /// Percent.
    pub progress: i32,
    /// Attempts started.
    pub attempts: i32,
    /// The version it upgraded from, if known.
    pub source_version: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Created.
    pub created: String,
    /// Finished, if it has.
    pub finished: Option<String>,
}

/// Everything the device page shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// The list's columns.
    pub row: DeviceRow,
    /// Description.
    pub description: String,
    /// The product's name.
    pub product_name: String,
    /// The product's protocol.
    pub protocol: String,
    /// When the online state last changed.
    pub status_since: Option<String>,
    /// The device SDK's version, if reported.
    pub sdk_version: Option<String>,
    /// The last radio report (LwM2M): RSRP, SINR, cell, time.
    pub radio: Option<Radio>,
    /// Groups it is in.
    pub groups: Vec<(String, String)>,
    /// Its upgrades, newest first.
    pub upgrades: Vec<DeviceUpgradeRow>,
}

/// A radio coverage report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Radio {
    /// dBm.
    pub rsrp: Option<i64>,
    /// dB.
    pub sinr: Option<i64>,
    /// The serving cell.
    pub cell_id: Option<i64>,
    /// When.
    pub at: String,
}

/// Rows per page on the Devices page.
pub const PAGE_SIZE: u64 = 50;

/// The most lines one CSV import takes.
pub const MAX_IMPORT: usize = 5_000;

#[cfg(feature = "ssr")]
pub(crate) fn row(d: backend::storage::entity::devices::Model) -> DeviceRow {
    DeviceRow {
        device_id: d.id,
        device_name: d.device_name,
        node_id: d.node_id,
        product_id: d.product_id,
        status: d.status,
        sw_version: d.sw_version,
        fw_version: d.fw_version,
        created: super::ssr::when(d.created_at),
    }
}

/// Lists devices matching the filters.
#[server(prefix = "/api", endpoint = "list_devices")]
pub async fn list_devices(
    search: String,
    product_id: String,
    status: String,
    protocol: String,
    version: String,
    offset: u64,
) -> Result<PageOf<DeviceRow>, ApiError> {
    use backend::service::{Page, devices};
    let (state, user) = super::ssr::context().await?;
    let filter = devices::DeviceFilter {
        search,
        product_id,
        status,
        protocol,
        version,
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
        items: page.items.into_iter().map(row).collect(),
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
        device_id: super::ssr::created(registered.device.id),
        secret: registered.secret.expose_secret().to_owned(),
    })
}

/// Registers the devices of a CSV text (`node_id,device_name,device_id,secret`; only `node_id` is
/// required; a header line naming the columns is optional) in `product_id`. Each line stands alone: the
/// good ones are registered, the others reported with their line number.
#[server(prefix = "/api", endpoint = "import_devices")]
pub async fn import_devices(product_id: String, csv: String) -> Result<Imported, ApiError> {
    use backend::service::devices;
    use secrecy::ExposeSecret;
    let (state, user) = super::ssr::context().await?;
    let lines = parse_import(&csv)?;
    let mut out = Imported {
        registered: Vec::new(),
        refused: Vec::new(),
    };
    for (line, fields) in lines {
        let fields = match fields {
            Ok(f) => f,
            Err(reason) => {
                out.refused.push(format!("line {line}: {reason}"));
                continue;
            }
        };
        let get = |i: usize| {
            fields
                .get(i)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let secret = get(3);
        let new = devices::NewDevice {
            product_id: product_id.clone(),
            node_id: get(0),
            device_name: get(1),
            device_id: Some(get(2)),
            secret: (!secret.is_empty()).then(|| secrecy::SecretString::from(secret)),
            ..Default::default()
        };
        match devices::register(&state, &user.project_id, new).await {
            Ok(r) => out.registered.push(RegisteredDevice {
                device_id: r.device.id,
                secret: r.secret.expose_secret().to_owned(),
            }),
            Err(backend::Error::Validation(v)) => out.refused.push(format!("line {line}: {v}")),
            Err(e @ (backend::Error::Conflict(_) | backend::Error::NotFound { .. })) => {
                out.refused.push(format!("line {line}: {e}"));
            }
            Err(e) => {
                // The devices registered so far stay, and their secrets must reach the operator: report
                // the failure with them instead of failing the call.
                tracing::error!(error.message = %e, line, "device import stopped");
                out.refused.push(format!(
                    "line {line} and after: not imported (internal error; see the server log)"
                ));
                break;
            }
        }
    }
    Ok(out)
}

/// One CSV line: its fields, or why it cannot be read.
#[cfg(feature = "ssr")]
type ImportLine = (u64, Result<Vec<String>, String>);

/// The CSV's data lines with their 1-based line numbers (blank lines, `#` comments and a header naming
/// the columns skipped). One device per line: each line is read as one CSV record, so the numbers in the
/// report are the lines the operator sees, and a bad line is refused alone.
#[cfg(feature = "ssr")]
fn parse_import(text: &str) -> Result<Vec<ImportLine>, ApiError> {
    let invalid = |msg: String| ApiError::from(domain::ValidationError::new("csv", msg));
    let mut out = Vec::new();
    for (n, line) in (1_u64..).zip(text.lines()) {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .trim(csv::Trim::All)
            .from_reader(trimmed.as_bytes());
        let record = match reader.records().next().transpose() {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => {
                out.push((n, Err(format!("not valid CSV: {e}"))));
                continue;
            }
        };
        let header = record
            .get(0)
            .is_some_and(|f| f.eq_ignore_ascii_case("node_id"));
        if out.is_empty() && header {
            continue;
        }
        if record.len() > 4 {
            let msg = format!(
                "{} columns; expected node_id,device_name,device_id,secret",
                record.len()
            );
            out.push((n, Err(msg)));
            continue;
        }
        out.push((n, Ok(record.iter().map(str::to_owned).collect())));
    }
    if out.is_empty() {
        return Err(invalid("has no devices".to_owned()));
    }
    if out.len() > MAX_IMPORT {
        return Err(invalid(format!(
            "has {} devices; import at most {MAX_IMPORT} at a time",
            out.len()
        )));
    }
    Ok(out)
}

/// One device with its groups, radio report and upgrade history.
#[server(prefix = "/api", endpoint = "device_detail")]
pub async fn device_detail(device_id: String) -> Result<DeviceView, ApiError> {
    use backend::service::{devices, groups, products, tasks};
    let (state, user) = super::ssr::context().await?;
    let d = devices::get(&state, &user.project_id, &device_id).await?;
    let product = products::get(&state, &user.project_id, &d.product_id).await?;
    let upgrades = tasks::device_upgrades(&state, &user.project_id, &device_id, 100).await?;
    let groups = groups::of_device(&state, &user.project_id, &device_id).await?;
    let radio = d
        .last_radio
        .as_deref()
        .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
        .map(|v| Radio {
            rsrp: v["rsrp"].as_i64(),
            sinr: v["sinr"].as_i64(),
            cell_id: v["cell_id"].as_i64(),
            at: v["at"].as_i64().map(super::ssr::when).unwrap_or_default(),
        });
    Ok(DeviceView {
        description: d.description.clone(),
        product_name: product.name,
        protocol: product.protocol_type,
        status_since: d.connection_status_update_time.map(super::ssr::when),
        sdk_version: d.device_sdk_version.clone(),
        radio,
        groups: groups.into_iter().map(|g| (g.id, g.name)).collect(),
        upgrades: upgrades
            .into_iter()
            .map(|u| DeviceUpgradeRow {
                task_id: u.task.id,
                task_name: u.task.task_name,
                task_type: u.task.task_type,
                status: u.subtask.status,
                step: u.subtask.step,
                progress: u.subtask.progress,
                attempts: u.subtask.attempts,
                source_version: u.subtask.source_version,
                error: u.subtask.error_msg.or(u.subtask.error_code),
                created: super::ssr::when(u.subtask.created_at),
                finished: u.subtask.finished_at.map(super::ssr::when),
            })
            .collect(),
        row: row(d),
    })
}

/// Deletes a device (refused while it is in an executing task).
#[server(prefix = "/api", endpoint = "delete_device")]
pub async fn delete_device(device_id: String) -> Result<(), ApiError> {
    let (state, user) = super::ssr::context().await?;
    backend::service::devices::delete(&state, &user.project_id, &device_id).await?;
    Ok(())
}

#[cfg(all(test, feature = "ssr"))]
mod tests {
    use super::parse_import;

    #[test]
    fn csv_import_lines_keep_their_numbers_and_skip_the_header() {
        let text = "node_id,device_name\n\nimei1,Pump\n# a comment\n\"imei2\",\"Tank, north\",dev2,secret123\n";
        let lines = parse_import(text).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            (3, Ok(vec!["imei1".to_owned(), "Pump".to_owned()]))
        );
        assert_eq!(lines[1].0, 5);
        assert_eq!(lines[1].1.as_ref().unwrap()[1], "Tank, north");
    }

    #[test]
    fn csv_import_refuses_empty_input_and_bad_lines_alone() {
        assert_eq!(
            parse_import("node_id\n").unwrap_err().field("csv").unwrap(),
            "has no devices"
        );
        let lines = parse_import("a,b,c,d,e\nimei2\n").unwrap();
        assert!(
            lines[0].1.as_ref().unwrap_err().contains("5 columns"),
            "{lines:?}"
        );
        assert_eq!(lines[1], (2, Ok(vec!["imei2".to_owned()])));
    }
}
