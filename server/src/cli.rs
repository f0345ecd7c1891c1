//! The command line.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use backend::service::auth::AdminBootstrap;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::config::{LogFormat, Settings};

pub mod manage;
pub mod sim;
use crate::startup::Application;

/// Updraft: over-the-air software and firmware upgrades for IoT fleets.
#[derive(Debug, Parser)]
#[command(name = "updraft", version, about)]
pub struct Cli {
    /// Configuration file (default: `updraft.toml` in the working directory, if present).
    #[arg(long, short, global = true, env = "UPDRAFT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format; overrides `log.format`.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Print results as JSON (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do (default: `serve`).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: console, REST API and downloads over HTTPS (the default).
    Serve,
    /// Print the effective configuration (secrets omitted) and exit; fails on a bad value.
    CheckConfig,
    /// Software and firmware packages.
    Package {
        /// What to do with packages.
        #[command(subcommand)]
        command: PackageCommand,
    },
    /// Products (device models).
    Product {
        /// What to do.
        #[command(subcommand)]
        command: manage::ProductCommand,
    },
    /// Devices.
    Device {
        /// What to do.
        #[command(subcommand)]
        command: manage::DeviceCommand,
    },
    /// Device groups.
    Group {
        /// What to do.
        #[command(subcommand)]
        command: manage::GroupCommand,
    },
    /// Upgrade tasks. Tasks created here are run by the server sharing the configuration.
    Task {
        /// What to do.
        #[command(subcommand)]
        command: manage::TaskCommand,
    },
    /// Application credentials (AK/SK) for the REST API.
    Credentials {
        /// What to do.
        #[command(subcommand)]
        command: manage::CredentialCommand,
    },
    /// The audit trail: who changed what, newest first.
    Audit {
        /// What to do.
        #[command(subcommand)]
        command: manage::AuditCommand,
    },
    /// Simulated devices.
    Sim {
        /// Which kind.
        #[command(subcommand)]
        command: SimCommand,
    },
}

/// `updraft sim ...`.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Simulated MQTT devices doing IoTDA's `$ota` upgrade flow.
    Mqtt(sim::SimMqttArgs),
    /// Simulated NB-IoT devices: LwM2M over CoAP, software upgrades with PCP.
    Lwm2m(sim::SimLwm2mArgs),
}

/// `updraft package ...`.
#[derive(Debug, Subcommand)]
pub enum PackageCommand {
    /// Upload a package file into the package store (with a progress bar), as the console and the API do.
    Upload(UploadArgs),
    /// List packages, newest first.
    List,
}

/// What a package is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PackageKind {
    /// `softwarePackage`.
    Software,
    /// `firmwarePackage`.
    Firmware,
}

/// `updraft package upload FILE --product P --version V`.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// The package file.
    pub file: PathBuf,
    /// The product it is for.
    #[arg(long)]
    pub product: String,
    /// Its version (what devices report once upgraded).
    #[arg(long)]
    pub version: String,
    /// Software or firmware.
    #[arg(long = "type", value_enum, default_value = "software")]
    pub kind: PackageKind,
    /// A version allowed to upgrade to this one (repeat for several; none means any).
    #[arg(long = "source-version")]
    pub source_versions: Vec<String>,
    /// Description.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Custom information sent to devices with the upgrade.
    #[arg(long, default_value = "")]
    pub custom_info: String,
    /// The file name devices see (default: the file's own name).
    #[arg(long)]
    pub file_name: Option<String>,
    /// PCP segment size for LwM2M devices, 32-500 bytes (default 500).
    #[arg(long)]
    pub segment_size: Option<u16>,
}

/// Runs the command line.
///
/// # Errors
/// Any failure, to be printed by `main`.
pub async fn run(cli: Cli) -> Result<()> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(format) = cli.log_format {
        settings.log.format = format;
    }
    let command = cli.command.unwrap_or(Command::Serve);
    let audited = audited(&command);
    let audit_settings = audited.as_ref().map(|_| settings.clone());
    let result = Box::pin(execute(command, settings, cli.json)).await;
    if let (Some((action, resource_type, resource_id)), Some(settings)) = (audited, audit_settings)
    {
        record(&settings, action, resource_type, resource_id, &result).await;
    }
    result
}

/// The command line's changes, for the audit trail: the action, the kind of resource and its id when
/// the arguments name it. Reads (`list`, `show`), the server and the simulators are not recorded.
fn audited(command: &Command) -> Option<(String, &'static str, Option<String>)> {
    use manage::{CredentialCommand as C, TaskCommand as T};
    /// `AddDevices { .. }` → `add-devices`.
    fn name(sub: &impl std::fmt::Debug) -> String {
        let debug = format!("{sub:?}");
        let word: String = debug
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        let mut out = String::new();
        for (i, c) in word.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        }
        out
    }
    let (group, kind, sub, id) = match command {
        Command::Package {
            command: PackageCommand::Upload(_),
        } => ("package", "packages", "upload".to_owned(), None),
        Command::Product { command } => ("product", "products", name(command), None),
        Command::Device { command } => ("device", "devices", name(command), None),
        Command::Group { command } => ("group", "device-group", name(command), None),
        Command::Task { command } => {
            let id = match command {
                T::Stop { task, .. }
                | T::Retry { task, .. }
                | T::Confirm { task, .. }
                | T::Resume { task }
                | T::Delete { task } => Some(task.clone()),
                _ => None,
            };
            ("task", "batchtasks", name(command), id)
        }
        Command::Credentials { command } => {
            let id = match command {
                C::Revoke { access_key } => Some(access_key.clone()),
                _ => None,
            };
            ("credentials", "credentials", name(command), id)
        }
        _ => return None,
    };
    if sub == "list" || sub == "show" {
        return None;
    }
    Some((format!("cli {group} {sub}"), kind, id))
}

/// Records a command line change and how it ended (its error's text when it failed). A failure to
/// record is printed, and does not change the command's outcome.
async fn record(
    settings: &Settings,
    action: String,
    resource_type: &'static str,
    resource_id: Option<String>,
    result: &Result<()>,
) {
    use backend::service::audit;
    let opened = crate::startup::open_state(settings, Arc::new(backend::clock::SystemClock)).await;
    let Ok((state, project)) = opened else {
        eprintln!("note: the audit trail could not be opened to record this command");
        return;
    };
    let actor = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    audit::record(
        &state,
        audit::Entry {
            project_id: Some(project.id),
            actor_type: audit::ActorType::Cli,
            actor,
            source: None,
            action,
            resource_type: Some(resource_type.to_owned()),
            resource_id,
            success: result.is_ok(),
            status: None,
            detail: result.as_ref().err().map(|e| format!("{e:#}")),
            request_id: None,
        },
    )
    .await;
}

/// Runs one command (`json`: machine-readable output).
async fn execute(command: Command, settings: Settings, json: bool) -> Result<()> {
    match command {
        Command::Serve => Box::pin(serve(settings)).await,
        Command::CheckConfig => {
            println!("{}", to_json(&settings)?);
            Ok(())
        }
        Command::Package {
            command: PackageCommand::Upload(args),
        } => upload(settings, args).await,
        Command::Package {
            command: PackageCommand::List,
        } => manage::packages(settings, json).await,
        Command::Product { command } => manage::product(settings, command, json).await,
        Command::Device { command } => manage::device(settings, command, json).await,
        Command::Group { command } => manage::group(settings, command, json).await,
        Command::Task { command } => Box::pin(manage::task(settings, command, json)).await,
        Command::Credentials { command } => manage::credentials(settings, command, json).await,
        Command::Audit { command } => manage::audit(settings, command, json).await,
        Command::Sim {
            command: SimCommand::Mqtt(args),
        } => sim::run(settings, args).await,
        Command::Sim {
            command: SimCommand::Lwm2m(args),
        } => sim::run_lwm2m(settings, args).await,
    }
}

/// Streams a file into the store through the same service the API uses, showing progress on a terminal.
async fn upload(settings: Settings, args: UploadArgs) -> Result<()> {
    use anyhow::Context;
    use futures::StreamExt;
    let file = tokio::fs::File::open(&args.file)
        .await
        .with_context(|| format!("opening {}", args.file.display()))?;
    let len = file.metadata().await?.len();
    let file_name = match args.file_name {
        Some(name) => name,
        None => args
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let (state, project) =
        crate::startup::open_state(&settings, Arc::new(backend::clock::SystemClock)).await?;
    let meta = domain::package::PackageMetaInput {
        package_type: match args.kind {
            PackageKind::Software => domain::package::PackageType::Software,
            PackageKind::Firmware => domain::package::PackageType::Firmware,
        }
        .as_str()
        .to_owned(),
        product_id: args.product,
        version: args.version,
        support_source_versions: args.source_versions,
        description: args.description,
        custom_info: args.custom_info,
        file_name,
        segment_size: args.segment_size,
    };
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    bar.set_message("uploading");
    let progress = bar.clone();
    let body =
        tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect(move |chunk| {
            if let Ok(c) = chunk {
                progress.inc(c.len() as u64);
            }
        });
    let result = backend::service::packages::upload(&state, &project.id, meta, body).await;
    bar.finish_and_clear();
    state.db.clone().close().await.ok();
    let package = result?;
    println!("uploaded package {}", package.id);
    println!("  product:  {}", package.product_id);
    println!("  type:     {}", package.package_type);
    println!("  version:  {}", package.version);
    println!("  file:     {} ({} bytes)", package.file_name, package.size);
    println!("  sha256:   {}", package.sha256);
    Ok(())
}

fn to_json(settings: &Settings) -> Result<String> {
    Ok(serde_json::to_string_pretty(settings)?)
}

async fn serve(settings: Settings) -> Result<()> {
    let shutdown = shutdown_signal()?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    crate::telemetry::init(
        settings.log.format,
        &settings.log.filter,
        std::io::stdout,
        ansi,
    );
    let clock = Arc::new(backend::clock::SystemClock);
    let application = Application::build(settings, clock).await?;
    let addr = application.https_addr();
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        addr.ip().to_string()
    };
    let console = format!("https://{host}:{}/", addr.port());
    // Printed plainly (not only logged) so a person starting Updraft sees it whatever the log format.
    println!();
    println!("  Updraft is running.");
    println!("  Console:        {console}");
    if let Some((plain, tls)) = application.mqtt_addrs() {
        println!(
            "  Devices:        mqtt://{host}:{}  mqtts://{host}:{}  (IoTDA device login)",
            plain.port(),
            tls.port()
        );
    }
    if let Some(coap) = application.coap_addr() {
        let coaps = application
            .coaps_addr()
            .map(|a| format!("  coaps://{host}:{}", a.port()))
            .unwrap_or_default();
        println!(
            "  LwM2M:          coap://{host}:{}{coaps}  (NB-IoT, PCP and Object 5)",
            coap.port()
        );
    }
    match application.admin_bootstrap() {
        AdminBootstrap::CreatedWithGeneratedPassword { username, password } => {
            println!(
                "  First admin:    {username} / {}   (shown once; change it in Settings)",
                password.expose_secret()
            );
        }
        AdminBootstrap::CreatedWithGivenPassword { username } => {
            println!("  First admin:    {username} (password from admin.password)");
        }
        AdminBootstrap::Existing => println!("  Sign in with an existing account."),
    }
    if let Some(ca) = application.ca_path() {
        let ca = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.to_path_buf());
        println!(
            "  CA certificate: {}   (trust it in browsers and devices)",
            ca.display()
        );
    }
    println!();
    tracing::info!(%console, "listening");
    application.run_until_stopped(shutdown).await
}

/// Registers SIGINT and SIGTERM handlers **now** and returns a future that completes on either. Registering
/// before anything is printed matters: a signal that arrives between "Updraft is running" and the first
/// poll of a lazily registered handler would otherwise kill the process without a clean shutdown.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
