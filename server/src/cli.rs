//! The command line.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use backend::service::auth::AdminBootstrap;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::config::{LogFormat, Settings};
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
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings).await,
        Command::CheckConfig => {
            println!("{}", to_json(&settings)?);
            Ok(())
        }
    }
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
