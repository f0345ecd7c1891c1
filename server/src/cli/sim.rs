//! `updraft sim mqtt` and `updraft sim lwm2m`: fleets of simulated devices in one process (see
//! [`crate::sim`] and [`crate::sim::lwm2m`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use backend::service;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::sim::{Behaviour, SimDevice, SimOptions, SimStats, run_fleet};

/// `updraft sim mqtt`.
#[derive(Debug, clap::Args)]
pub struct SimMqttArgs {
    /// How many devices.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Device ids are `{prefix}{n}`, n = 00000, 00001...
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// The devices' product (needed with `--register`).
    #[arg(long)]
    pub product: Option<String>,
    /// Register devices that do not exist yet (node id = device id).
    #[arg(long)]
    pub register: bool,
    /// MQTT host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// MQTT port (default: `mqtt.listen`'s, or `mqtt.tls_listen`'s with `--tls`).
    #[arg(long)]
    pub port: Option<u16>,
    /// MQTT over TLS.
    #[arg(long)]
    pub tls: bool,
    /// The CA to trust for TLS and downloads (default: `{data_dir}/tls/ca.pem`).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// What the devices do when asked to upgrade.
    #[arg(long, value_enum, default_value = "normal")]
    pub behaviour: Behaviour,
    /// The result code for `refuse` (default 1) and `fail` (default 10).
    #[arg(long)]
    pub fail_code: Option<i64>,
    /// The software version devices start on.
    #[arg(long, default_value = "1.0")]
    pub sw_version: String,
    /// The firmware version devices start on.
    #[arg(long, default_value = "1.0")]
    pub fw_version: String,
    /// Subscribe to the system topic (Huawei's C SDK does; the Python and Go SDKs do not).
    #[arg(long)]
    pub subscribe: bool,
    /// At most this many devices connecting (between TCP connect and CONNACK) at once.
    #[arg(long, default_value_t = 256)]
    pub max_connecting: usize,
    /// At most this many downloads at once in this process (one process, one descriptor limit).
    #[arg(long, default_value_t = 512)]
    pub max_downloading: usize,
    /// Exit once every device has reported a final result.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Exit after this long in any case (e.g. `10m`).
    #[arg(long)]
    pub duration: Option<humantime::Duration>,
}

/// Runs the fleet until Ctrl-C, `--duration`, or (`--exit-when-done`) every device finished.
///
/// # Errors
/// Registration, a missing secret or CA file, or the fleet's set-up.
pub async fn run(settings: Settings, args: SimMqttArgs) -> Result<()> {
    let (state, project) =
        crate::startup::open_state(&settings, Arc::new(backend::clock::SystemClock)).await?;
    let ids: Vec<String> = (0..args.devices)
        .map(|n| format!("{}{n:05}", args.prefix))
        .collect();
    let mut devices = Vec::with_capacity(ids.len());
    let mut registered = 0;
    for id in &ids {
        let secret = match service::devices::secret(&state, id).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                anyhow::bail!("device {id} has no secret (certificate devices cannot be simulated)")
            }
            Err(backend::Error::NotFound { .. }) if args.register => {
                let product = args.product.clone().context("--register needs --product")?;
                let secret = SecretString::from(backend::ids::alphanumeric(24));
                service::devices::register(
                    &state,
                    &project.id,
                    service::devices::NewDevice {
                        product_id: product,
                        node_id: id.clone(),
                        device_id: Some(id.clone()),
                        device_name: format!("simulated {id}"),
                        secret: Some(secret.clone()),
                        // IoTDA's `secure_access`: a device registered to connect over plain MQTT must
                        // not require TLS.
                        secure_access: Some(args.tls),
                        ..Default::default()
                    },
                )
                .await
                .with_context(|| format!("registering {id}"))?;
                registered += 1;
                secret
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("device {id} (use --register to create it)"));
            }
        };
        devices.push(SimDevice {
            device_id: id.clone(),
            secret: secret.expose_secret().to_owned(),
        });
    }
    state.db.clone().close().await.ok();
    let ca_path = args
        .ca
        .clone()
        .unwrap_or_else(|| settings.data_dir.join("tls").join("ca.pem"));
    let ca_pem =
        std::fs::read(&ca_path).with_context(|| format!("reading the CA {}", ca_path.display()))?;
    let port = args.port.unwrap_or(if args.tls {
        settings.mqtt.tls_listen.port()
    } else {
        settings.mqtt.listen.port()
    });
    let opts = SimOptions {
        host: args.host.clone(),
        port,
        tls: args.tls,
        ca_pem,
        sw_version: args.sw_version.clone(),
        fw_version: args.fw_version.clone(),
        behaviour: args.behaviour,
        fail_code: args.fail_code,
        subscribe: args.subscribe,
        sig_type: 1,
        max_connecting: args.max_connecting,
        max_downloading: args.max_downloading,
    };
    println!(
        "simulating {} devices ({} registered now) on {}:{port}{}, behaviour {:?}",
        devices.len(),
        registered,
        args.host,
        if args.tls { " (TLS)" } else { "" },
        args.behaviour
    );
    let stats = Arc::new(SimStats::default());
    let stop = CancellationToken::new();
    let now: Arc<dyn Fn() -> i64 + Send + Sync> =
        Arc::new(|| chrono::Utc::now().timestamp_millis());
    let total = devices.len() as u64;
    let fleet = tokio::spawn(run_fleet(opts, devices, now, stats.clone(), stop.clone()));
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from(d));
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let done = stats.succeeded.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
                println!(
                    "{:>6.1}s connected {} reports {} upgrades {} downloads {} ({} MiB) succeeded {} failed {} errors {} reconnects {} retries {} repeated {} duplicates {}",
                    started.elapsed().as_secs_f64(),
                    stats.connected.load(Ordering::Relaxed),
                    stats.version_reports.load(Ordering::Relaxed),
                    stats.upgrades.load(Ordering::Relaxed),
                    stats.downloads.load(Ordering::Relaxed),
                    stats.bytes.load(Ordering::Relaxed) >> 20,
                    stats.succeeded.load(Ordering::Relaxed),
                    stats.failed.load(Ordering::Relaxed),
                    stats.errors.load(Ordering::Relaxed),
                    stats.reconnects.load(Ordering::Relaxed),
                    stats.download_retries.load(Ordering::Relaxed),
                    stats.repeated.load(Ordering::Relaxed),
                    stats.duplicates.load(Ordering::Relaxed),
                );
                if args.exit_when_done && done >= total {
                    break;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
        }
    }
    stop.cancel();
    let _ = fleet.await;
    Ok(())
}

/// `updraft sim lwm2m`.
#[derive(Debug, clap::Args)]
pub struct SimLwm2mArgs {
    /// How many devices.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Node ids (endpoint names) are this prefix and a number.
    #[arg(long, default_value = "86370300")]
    pub prefix: String,
    /// Spread devices over this many cells.
    #[arg(long, default_value_t = 1)]
    pub cells: u32,
    /// Register missing devices under this product (a CoAP product) first.
    #[arg(long)]
    pub register: bool,
    /// The product for `--register`.
    #[arg(long)]
    pub product: Option<String>,
    /// The platform's CoAP address (default: `lwm2m.listen`, on 127.0.0.1 when it is 0.0.0.0).
    #[arg(long)]
    pub server: Option<std::net::SocketAddr>,
    /// The software version devices run.
    #[arg(long, default_value = "V1.0")]
    pub version: String,
    /// What the coverage reads answer.
    #[arg(long, value_enum, default_value = "good")]
    pub radio: crate::sim::lwm2m::Radio,
    /// How devices answer the upgrade.
    #[arg(long, value_enum, default_value = "normal")]
    pub behaviour: crate::sim::lwm2m::Lwm2mBehaviour,
    /// The PCP result code for refuse/fail behaviours.
    #[arg(long)]
    pub fail_code: Option<u8>,
    /// Probability that a datagram is lost (0-1), both directions.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Restart each device once after this many segments.
    #[arg(long)]
    pub restart_after: Option<u16>,
    /// Do not answer 0x14 (LiteOS style).
    #[arg(long)]
    pub silent_accept: bool,
    /// Re-send an unanswered PCP request (or block request) after this long.
    #[arg(long, default_value = "2s")]
    pub retry: humantime::Duration,
    /// The firmware version devices run (`/3/0/3`, for Firmware Update object upgrades).
    #[arg(long, default_value = "V1.0")]
    pub firmware_version: String,
    /// The firmware version a downloaded image installs.
    #[arg(long, default_value = "V2.0")]
    pub firmware_next: String,
    /// The Block2 size devices ask for (16-1024; 0 takes the platform's).
    #[arg(long, default_value_t = 512)]
    pub block_size: usize,
    /// Exit once every device has reported a final result.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Exit after this long in any case.
    #[arg(long)]
    pub duration: Option<humantime::Duration>,
    /// Speak CoAPS (DTLS 1.2, each device's secret as its pre-shared key, read from the database) to
    /// `lwm2m.dtls_listen`; with `--register`, devices are registered for DTLS only (`secure_access`).
    #[arg(long)]
    pub dtls: bool,
    /// With `--dtls`: the cipher suites offered, in OpenSSL's names (e.g. `PSK-AES128-CBC-SHA256`); by
    /// default both IoTDA serves, `PSK-AES128-CCM8:PSK-AES128-CBC-SHA256`.
    #[arg(long, requires = "dtls")]
    pub dtls_ciphers: Option<String>,
}

/// Runs an LwM2M fleet until Ctrl-C, `--duration` or (`--exit-when-done`) every device finished, then
/// prints the most devices each cell had downloading at once.
///
/// # Errors
/// Registration or the fleet's set-up.
pub async fn run_lwm2m(settings: Settings, args: SimLwm2mArgs) -> Result<()> {
    use crate::sim::lwm2m::{Lwm2mOptions, Lwm2mStats, run_fleet};
    let endpoints: Vec<String> = (0..args.devices)
        .map(|n| format!("{}{n:07}", args.prefix))
        .collect();
    let mut psks = None;
    if args.register || args.dtls {
        let (state, project) =
            crate::startup::open_state(&settings, Arc::new(backend::clock::SystemClock)).await?;
        if args.register {
            let product = args.product.clone().context("--register needs --product")?;
            register_lwm2m(&state, &project.id, &product, &endpoints, args.dtls).await?;
        }
        if args.dtls {
            psks = Some(Arc::new(device_keys(&state, &endpoints).await?));
        }
        state.db.clone().close().await.ok();
    }
    let server = args.server.unwrap_or_else(|| {
        let mut addr = if args.dtls {
            settings.lwm2m.dtls_listen
        } else {
            settings.lwm2m.listen
        };
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        addr
    });
    let opts = Lwm2mOptions {
        server,
        version: args.version.clone(),
        cells: args.cells,
        radio: args.radio,
        behaviour: args.behaviour,
        fail_code: args.fail_code,
        loss: args.loss,
        restart_after: args.restart_after,
        silent_accept: args.silent_accept,
        retry: args.retry.into(),
        firmware_version: args.firmware_version.clone(),
        firmware_next: args.firmware_next.clone(),
        block_size: args.block_size,
        psks,
        dtls_ciphers: args.dtls_ciphers.clone(),
        ..Lwm2mOptions::default()
    };
    println!(
        "simulating {} LwM2M devices in {} cells against {server}, radio {:?}, behaviour {:?}",
        endpoints.len(),
        args.cells,
        args.radio,
        args.behaviour
    );
    let stats = Arc::new(Lwm2mStats::default());
    let stop = CancellationToken::new();
    let total = endpoints.len() as u64;
    let fleet = tokio::spawn(run_fleet(opts, endpoints, stats.clone(), stop.clone()));
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from(d));
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let done = stats.succeeded.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
                println!(
                    "{:>6.1}s registrations {} segments {} downloads {} succeeded {} failed {} restarts {} resends {}",
                    started.elapsed().as_secs_f64(),
                    stats.registered.load(Ordering::Relaxed),
                    stats.segments.load(Ordering::Relaxed),
                    stats.downloads.load(Ordering::Relaxed),
                    stats.succeeded.load(Ordering::Relaxed),
                    stats.failed.load(Ordering::Relaxed),
                    stats.restarts.load(Ordering::Relaxed),
                    stats.resends.load(Ordering::Relaxed),
                );
                if (args.exit_when_done && done >= total)
                    || deadline.is_some_and(|d| Instant::now() >= d)
                {
                    break;
                }
            }
        }
    }
    stop.cancel();
    let _ = fleet.await;
    let mut peaks: Vec<(u32, usize)> = stats.peaks().into_iter().collect();
    peaks.sort_unstable();
    let busiest = peaks.iter().map(|(_, p)| *p).max().unwrap_or(0);
    println!(
        "most devices downloading at once in one cell: {busiest} (per cell: {})",
        peaks
            .iter()
            .map(|(c, p)| format!("{c}={p}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

/// Registers the endpoints not yet known under `product` (for DTLS only when `dtls`).
async fn register_lwm2m(
    state: &backend::AppState,
    project: &str,
    product: &str,
    endpoints: &[String],
    dtls: bool,
) -> Result<()> {
    let mut registered = 0;
    for node in endpoints {
        if service::devices::find_lwm2m(state, node).await?.is_some() {
            continue;
        }
        service::devices::register(
            state,
            project,
            service::devices::NewDevice {
                product_id: product.to_owned(),
                node_id: node.clone(),
                device_name: format!("simulated {node}"),
                secure_access: Some(dtls),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("registering {node}"))?;
        registered += 1;
    }
    println!("registered {registered} devices");
    Ok(())
}

/// Each endpoint's pre-shared key: its device's secret, as the bytes its hex spells (or its text).
async fn device_keys(
    state: &backend::AppState,
    endpoints: &[String],
) -> Result<std::collections::HashMap<String, Vec<u8>>> {
    use secrecy::ExposeSecret;
    let mut keys = std::collections::HashMap::new();
    for node in endpoints {
        let device = service::devices::find_lwm2m(state, node)
            .await?
            .with_context(|| format!("--dtls: no LwM2M device has node id {node}"))?;
        let secret = service::devices::secret(state, &device.id)
            .await?
            .with_context(|| format!("--dtls: device {} has no secret", device.id))?;
        keys.insert(node.clone(), backend::coap::psk_key(secret.expose_secret()));
    }
    Ok(keys)
}
