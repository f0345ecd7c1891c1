//! `updraft product|device|group|task ...`: scripting on the same services as the console and the API,
//! working directly on the configured database (run with the server's configuration). Human output by
//! default, `--json` for scripts.

use std::sync::Arc;

use anyhow::{Context, Result};
use backend::AppState;
use backend::service::{self, Page, tasks};
use clap::Subcommand;
use domain::Timestamp;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::config::Settings;

/// `updraft product ...`.
#[derive(Debug, Subcommand)]
pub enum ProductCommand {
    /// Create a product.
    Add {
        /// Its id (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// Display name.
        #[arg(long)]
        name: String,
        /// `MQTT` or `CoAP`.
        #[arg(long, default_value = "MQTT")]
        protocol: String,
        /// Device type.
        #[arg(long, default_value = "default")]
        device_type: String,
    },
}

/// `updraft credentials ...`.
#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Create an AK/SK pair for applications (the SK is printed once).
    Create {
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List credentials (secret keys are never shown again).
    List,
    /// Revoke a credential: requests signed with it are refused from now on.
    Revoke {
        /// The access key.
        access_key: String,
    },
}

/// `updraft device ...`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device (its secret is printed once).
    Add {
        /// The product.
        #[arg(long)]
        product: String,
        /// Node id (IMEI, MAC, serial number).
        #[arg(long)]
        node_id: String,
        /// Device id (default: `{product}_{node_id}`).
        #[arg(long)]
        id: Option<String>,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
        /// The secret (default: generated).
        #[arg(long)]
        secret: Option<String>,
        /// Let the device connect without TLS/DTLS (`secure_access: false`): needed for LwM2M devices
        /// on plain CoAP, which are refused otherwise.
        #[arg(long)]
        plain: bool,
    },
    /// List devices.
    List {
        /// Only this product.
        #[arg(long, default_value = "")]
        product: String,
        /// Rows (at most 500).
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
}

/// `updraft group ...`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a static group.
    Add {
        /// Its name.
        #[arg(long)]
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Add devices to a group.
    AddDevices {
        /// The group id.
        group: String,
        /// Device ids.
        #[arg(required = true)]
        devices: Vec<String>,
    },
    /// List groups.
    List,
}

/// `updraft audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Lists the newest entries.
    List {
        /// Only this actor's (a user name, an access key, or the command line's user).
        #[arg(long)]
        actor: Option<String>,
        /// Entries at most.
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
}

/// `updraft task ...`.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Create a software or firmware upgrade task (it starts at once unless scheduled).
    Create {
        /// Task name (letters, digits, `_`).
        #[arg(long)]
        name: String,
        /// The package.
        #[arg(long)]
        package: String,
        /// Target devices (repeat, or comma-separated).
        #[arg(long = "device", value_delimiter = ',')]
        devices: Vec<String>,
        /// Target groups (used when no device is given).
        #[arg(long = "group", value_delimiter = ',')]
        groups: Vec<String>,
        /// Start time, `yyyyMMddTHHmmssZ` (within 7 days).
        #[arg(long)]
        schedule: Option<String>,
        /// Automatic retries of a failed device (0-5).
        #[arg(long)]
        retry_count: Option<i64>,
        /// Minutes between retries (1-1440).
        #[arg(long)]
        retry_interval: Option<i64>,
        /// Waves, thresholds, pacing and windows, as the API's `rollout` JSON (README, "Safe
        /// rollouts"), e.g. `{"waves": [{"percent": 1}, {"percent": 10}], "max_per_minute": 100}`.
        #[arg(long)]
        rollout: Option<String>,
        /// Every device waits until `updraft task confirm` (IoTDA's `need_confirm`).
        #[arg(long)]
        need_confirm: bool,
    },
    /// List tasks.
    List,
    /// Show a task and its devices.
    Show {
        /// The task id.
        task: String,
    },
    /// Stop a task, or some of its devices.
    Stop {
        /// The task id.
        task: String,
        /// Only these devices.
        #[arg(long = "device", value_delimiter = ',')]
        devices: Vec<String>,
    },
    /// Retry a task's failed and stopped devices (or the given ones).
    Retry {
        /// The task id.
        task: String,
        /// Only these devices.
        #[arg(long = "device", value_delimiter = ',')]
        devices: Vec<String>,
    },
    /// Let a `--need-confirm` task's waiting devices start (or the given ones).
    Confirm {
        /// The task id.
        task: String,
        /// Only these devices.
        #[arg(long = "device", value_delimiter = ',')]
        devices: Vec<String>,
    },
    /// Resume a task its rollout paused.
    Resume {
        /// The task id.
        task: String,
    },
    /// Delete a finished task.
    Delete {
        /// The task id.
        task: String,
    },
}

async fn open(settings: &Settings) -> Result<(AppState, String)> {
    let (state, project) =
        crate::startup::open_state(settings, Arc::new(backend::clock::SystemClock)).await?;
    Ok((state, project.id))
}

fn print(json_out: bool, value: &serde_json::Value, human: impl FnOnce()) {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        human();
    }
}

/// Runs `updraft package list`.
///
/// # Errors
/// The service's error.
pub async fn packages(settings: Settings, json_out: bool) -> Result<()> {
    let (state, project) = open(&settings).await?;
    let page = service::packages::list(
        &state,
        &project,
        service::packages::Filter::default(),
        Page::new(500, 0),
    )
    .await?;
    let rows: Vec<_> = page
        .items
        .iter()
        .map(|r| {
            let p = &r.package;
            json!({"package_id": p.id, "product_id": p.product_id, "package_type": p.package_type,
                   "version": p.version, "file_name": p.file_name, "file_size": p.size, "sha256": p.sha256})
        })
        .collect();
    print(json_out, &json!({"packages": rows}), || {
        for r in &page.items {
            let p = &r.package;
            println!(
                "{}  {:<16} {:<16} {:<10} {} ({} bytes)",
                p.id, p.product_id, p.package_type, p.version, p.file_name, p.size
            );
        }
    });
    state.db.clone().close().await.ok();
    Ok(())
}

/// Runs `updraft product ...`.
///
/// # Errors
/// The service's error.
pub async fn product(settings: Settings, cmd: ProductCommand, json_out: bool) -> Result<()> {
    let (state, project) = open(&settings).await?;
    let ProductCommand::Add {
        id,
        name,
        protocol,
        device_type,
    } = cmd;
    let p = service::products::create(
        &state,
        &project,
        service::products::NewProduct {
            product_id: id,
            name,
            device_type,
            protocol_type: protocol,
            ..Default::default()
        },
    )
    .await?;
    print(
        json_out,
        &json!({"product_id": p.id, "name": p.name, "protocol_type": p.protocol_type}),
        || println!("product {} ({}, {})", p.id, p.name, p.protocol_type),
    );
    state.db.clone().close().await.ok();
    Ok(())
}

/// Runs `updraft credentials ...`.
///
/// # Errors
/// The service's error.
pub async fn credentials(settings: Settings, cmd: CredentialCommand, json_out: bool) -> Result<()> {
    let (state, project) = open(&settings).await?;
    let time = |ms: Option<i64>| ms.map(|t| Timestamp::from_millis(t).to_string());
    match cmd {
        CredentialCommand::Create { description } => {
            let c = service::credentials::create(&state, &project, &description).await?;
            let sk = c.secret_key.expose_secret();
            print(
                json_out,
                &json!({"project_id": project, "access_key": c.credential.access_key,
                        "secret_key": sk, "description": c.credential.description}),
                || {
                    println!("project id:  {project}");
                    println!("access key:  {}", c.credential.access_key);
                    println!("secret key:  {sk}");
                    println!("Keep the secret key now: it is not shown again.");
                },
            );
        }
        CredentialCommand::List => {
            let rows = service::credentials::list(&state, &project).await?;
            let json_rows: Vec<_> = rows
                .iter()
                .map(|c| {
                    json!({"access_key": c.access_key, "description": c.description,
                           "created_at": time(Some(c.created_at)), "last_used_at": time(c.last_used_at),
                           "revoked_at": time(c.revoked_at)})
                })
                .collect();
            print(json_out, &json!({"credentials": json_rows}), || {
                for c in &rows {
                    let state = match c.revoked_at {
                        Some(_) => "revoked",
                        None => "active",
                    };
                    println!(
                        "{}  {:<8} last used {:<24} {}",
                        c.access_key,
                        state,
                        time(c.last_used_at).unwrap_or_else(|| "never".into()),
                        c.description
                    );
                }
            });
        }
        CredentialCommand::Revoke { access_key } => {
            service::credentials::revoke(&state, &project, &access_key).await?;
            print(
                json_out,
                &json!({"access_key": access_key, "revoked": true}),
                || println!("revoked {access_key}"),
            );
        }
    }
    state.db.clone().close().await.ok();
    Ok(())
}

/// Runs `updraft device ...`.
///
/// # Errors
/// The service's error.
pub async fn device(settings: Settings, cmd: DeviceCommand, json_out: bool) -> Result<()> {
    let (state, project) = open(&settings).await?;
    match cmd {
        DeviceCommand::Add {
            product,
            node_id,
            id,
            name,
            secret,
            plain,
        } => {
            let r = service::devices::register(
                &state,
                &project,
                service::devices::NewDevice {
                    product_id: product,
                    node_id,
                    device_id: id,
                    device_name: name,
                    secret: secret.map(SecretString::from),
                    secure_access: Some(!plain),
                    ..Default::default()
                },
            )
            .await?;
            let secret = r.secret.expose_secret().to_owned();
            print(
                json_out,
                &json!({"device_id": r.device.id, "node_id": r.device.node_id, "secret": secret}),
                || {
                    println!("device {} registered", r.device.id);
                    println!("  secret: {secret}   (shown once)");
                },
            );
        }
        DeviceCommand::List { product, limit } => {
            let filter = service::devices::DeviceFilter {
                product_id: product,
                ..Default::default()
            };
            let page =
                service::devices::list(&state, &project, &filter, Page::new(limit, 0)).await?;
            let rows: Vec<_> = page
                .items
                .iter()
                .map(|d| {
                    json!({"device_id": d.id, "product_id": d.product_id, "status": d.status,
                           "sw_version": d.sw_version, "fw_version": d.fw_version})
                })
                .collect();
            print(
                json_out,
                &json!({"devices": rows, "count": page.total}),
                || {
                    println!(
                        "{:<40} {:<20} {:<9} {:<10} {:<10}",
                        "DEVICE", "PRODUCT", "STATUS", "SW", "FW"
                    );
                    for d in &page.items {
                        println!(
                            "{:<40} {:<20} {:<9} {:<10} {:<10}",
                            d.id,
                            d.product_id,
                            d.status,
                            d.sw_version.as_deref().unwrap_or("-"),
                            d.fw_version.as_deref().unwrap_or("-")
                        );
                    }
                    println!("({} of {})", page.items.len(), page.total);
                },
            );
        }
    }
    state.db.clone().close().await.ok();
    Ok(())
}

/// Runs `updraft group ...`.
///
/// # Errors
/// The service's error.
pub async fn group(settings: Settings, cmd: GroupCommand, json_out: bool) -> Result<()> {
    let (state, project) = open(&settings).await?;
    match cmd {
        GroupCommand::Add { name, description } => {
            let g = service::groups::create(&state, &project, &name, &description).await?;
            print(json_out, &json!({"group_id": g.id, "name": g.name}), || {
                println!("group {} ({})", g.id, g.name);
            });
        }
        GroupCommand::AddDevices { group, devices } => {
            for d in &devices {
                service::groups::add_device(&state, &project, &group, d).await?;
            }
            print(
                json_out,
                &json!({"group_id": group, "added": devices.len()}),
                || {
                    println!("{} devices added to {group}", devices.len());
                },
            );
        }
        GroupCommand::List => {
            let page = service::groups::list(&state, &project, Page::new(500, 0)).await?;
            let rows: Vec<_> = page
                .items
                .iter()
                .map(
                    |g| json!({"group_id": g.group.id, "name": g.group.name, "members": g.members}),
                )
                .collect();
            print(json_out, &json!({"groups": rows}), || {
                for g in &page.items {
                    println!("{}  {:<30} {} devices", g.group.id, g.group.name, g.members);
                }
            });
        }
    }
    state.db.clone().close().await.ok();
    Ok(())
}

/// A task as JSON (IoTDA's `Task` fields).
#[must_use]
pub fn task_json(t: &backend::storage::entity::tasks::Model) -> serde_json::Value {
    json!({
        "task_id": t.id,
        "task_name": t.task_name,
        "task_type": t.task_type,
        "status": t.status,
        "status_desc": t.status_desc,
        "need_confirm": t.need_confirm,
        "document": serde_json::from_str::<serde_json::Value>(&t.document).unwrap_or_default(),
        "task_policy": {
            "schedule_time": t.schedule_time.map(|s| Timestamp::from_millis(s).to_compact()),
            "retry_count": t.retry_count,
            "retry_interval": t.retry_interval_min,
        },
        "task_progress": t.progress(),
        "create_time": Timestamp::from_millis(t.created_at).to_compact(),
        "rollout": t.rollout.as_deref().and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok()),
        "rollout_state": t.rollout_state.as_deref().and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok()),
    })
}

/// Prints the per-device outcome of a stop or retry.
fn print_targets(json_out: bool, verb: &str, results: &[tasks::TargetResult]) {
    print(json_out, &json!({"targets": results}), || {
        println!("{verb} requested");
        for t in results {
            println!(
                "  {} {} {}",
                t.target,
                t.status,
                t.error_msg.as_deref().unwrap_or("")
            );
        }
    });
}

/// Runs `updraft task ...`.
///
/// # Errors
/// The service's error.
pub async fn task(settings: Settings, cmd: TaskCommand, json_out: bool) -> Result<()> {
    let (state, project) = open(&settings).await?;
    match cmd {
        TaskCommand::Create {
            name,
            package,
            devices,
            groups,
            schedule,
            retry_count,
            retry_interval,
            rollout,
            need_confirm,
        } => {
            let rollout = rollout
                .map(|r| {
                    serde_json::from_str(&r).map_err(|e| {
                        backend::Error::from(domain::ValidationError::new("rollout", e.to_string()))
                    })
                })
                .transpose()?;
            let package_row = service::packages::get(&state, &project, &package).await?;
            let task_type = if package_row.package.package_type == "firmwarePackage" {
                "firmwareUpgrade"
            } else {
                "softwareUpgrade"
            };
            let schedule_time = schedule
                .map(|s| Timestamp::parse_compact("schedule", &s))
                .transpose()?;
            let t = tasks::create(
                &state,
                &project,
                tasks::NewTask {
                    task_name: name,
                    task_type: task_type.to_owned(),
                    package_id: package,
                    targets: devices,
                    group_ids: groups,
                    schedule_time,
                    retry_count,
                    retry_interval,
                    task_ext_info: None,
                    request_id: None,
                    rollout,
                    need_confirm,
                    gateway_mode: false,
                },
            )
            .await?;
            print(json_out, &task_json(&t), || {
                println!("task {} created: {} ({})", t.id, t.status, t.status_desc);
                if t.total > 0 {
                    println!("  devices: {}", t.total);
                }
                println!(
                    "  note: the running server (same configuration) starts and drives it; this command only records it"
                );
            });
        }
        TaskCommand::List => {
            let page = tasks::list(
                &state,
                &project,
                &tasks::TaskFilter::default(),
                Page::new(500, 0),
            )
            .await?;
            let rows: Vec<_> = page.items.iter().map(task_json).collect();
            print(json_out, &json!({"batchtasks": rows}), || {
                for t in &page.items {
                    println!(
                        "{}  {:<24} {:<16} {:<15} {}/{} ok",
                        t.id, t.task_name, t.task_type, t.status, t.success, t.total
                    );
                }
            });
        }
        TaskCommand::Show { task } => {
            let t = tasks::get(&state, &project, &task).await?;
            let details = tasks::details(
                &state,
                &project,
                &task,
                &tasks::DetailFilter::default(),
                Page::new(500, 0),
            )
            .await?;
            let rows: Vec<_> = details
                .items
                .iter()
                .map(|s| {
                    json!({"target": s.device_id, "status": s.status, "step": s.step,
                           "progress": s.progress, "attempts": s.attempts,
                           "error": {"error_code": s.error_code, "error_msg": s.error_msg}})
                })
                .collect();
            print(
                json_out,
                &json!({"batchtask": task_json(&t), "task_details": rows}),
                || {
                    println!("task {} {} ({})", t.id, t.task_name, t.task_type);
                    println!("  status: {} ({})", t.status, t.status_desc);
                    for s in &details.items {
                        println!(
                            "  {:<40} {:<14} {:<14} {:>3}%  {}",
                            s.device_id,
                            s.status,
                            s.step,
                            s.progress,
                            s.error_msg.as_deref().unwrap_or("")
                        );
                    }
                },
            );
        }
        TaskCommand::Stop { task, devices } => {
            let r = tasks::stop(&state, &project, &task, Some(&devices)).await?;
            print_targets(json_out, "stop", &r);
        }
        TaskCommand::Retry { task, devices } => {
            let r = tasks::retry(&state, &project, &task, Some(&devices)).await?;
            print_targets(json_out, "retry", &r);
        }
        TaskCommand::Confirm { task, devices } => {
            let r = tasks::confirm(&state, &project, &task, Some(&devices)).await?;
            print_targets(json_out, "confirm", &r);
        }
        TaskCommand::Resume { task } => {
            let t = tasks::resume(&state, &project, &task).await?;
            print(json_out, &task_json(&t), || {
                println!("task {} resumed: {} ({})", t.id, t.status, t.status_desc);
            });
        }
        TaskCommand::Delete { task } => {
            tasks::delete(&state, &project, &task)
                .await
                .with_context(|| format!("deleting task {task}"))?;
            print(json_out, &json!({"deleted": task}), || {
                println!("task {task} deleted");
            });
        }
    }
    state.db.clone().close().await.ok();
    Ok(())
}

/// Runs `updraft audit ...`.
///
/// # Errors
/// The service's error.
pub async fn audit(settings: Settings, cmd: AuditCommand, json_out: bool) -> Result<()> {
    let (state, project) = open(&settings).await?;
    let AuditCommand::List { actor, limit } = cmd;
    let filter = service::audit::Filter {
        actor,
        limit: limit.clamp(1, 10_000),
        ..Default::default()
    };
    let (rows, count) = service::audit::list(&state, &project, &filter).await?;
    print(
        json_out,
        &json!({"audit_logs": rows, "count": count}),
        || {
            for r in &rows {
                println!(
                    "{}  {:<11} {:<20} {:<8} {:<44} {}{}",
                    Timestamp::from_millis(r.at),
                    r.actor_type,
                    r.actor,
                    r.result,
                    r.action,
                    r.resource_id.as_deref().unwrap_or(""),
                    r.detail
                        .as_deref()
                        .map(|d| format!("  ({d})"))
                        .unwrap_or_default()
                );
            }
        },
    );
    Ok(())
}
