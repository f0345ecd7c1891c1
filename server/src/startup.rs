//! Building the application as a value (`Application::build`), so tests run the real thing on port 0, and
//! running it until a shutdown signal (`run_until_stopped`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum_server::tls_rustls::RustlsConfig;
use backend::clock::Clock;
use backend::mqtt::MqttEndpoint;
use backend::secrets::Sealer;
use backend::service::auth::AdminBootstrap;
use backend::{AppState, service};
use leptos::prelude::LeptosOptions;
use migrations::{Migrator, MigratorTrait};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::accept::{ConnectionGate, GatedTls};
use crate::budget::{self, Budget};
use crate::config::Settings;
use crate::http::{ServerState, router};
use crate::tls;

/// Opens what every command needs: the data directory, the secret key, the database (migrated), the
/// package store, and the default project.
///
/// # Errors
/// Any failure, with context saying which step failed.
pub async fn open_state(
    settings: &Settings,
    clock: Arc<dyn Clock>,
) -> Result<(AppState, backend::storage::entity::projects::Model)> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating data_dir {}", settings.data_dir.display()))?;
    let sealer = match &settings.secret_key {
        Some(key) => Sealer::from_hex(key).context("secret_key")?,
        None => Sealer::load_or_create(&settings.data_dir.join("secret.key"))
            .context("loading the secret key")?,
    };
    let db = backend::db::connect(settings.database_url().expose_secret())
        .await
        .context("connecting to the database")?;
    Migrator::up(&db, None)
        .await
        .context("migrating the database")?;
    let store = backend::objects::PackageStore::open(&settings.store_settings())
        .context("opening the package store (packages.*)")?;
    let state = AppState::new(
        db,
        clock,
        Arc::new(sealer),
        store,
        settings.service_settings()?,
    );
    let project = service::projects::ensure_default(&state)
        .await
        .context("creating the default project")?;
    Ok((state, project))
}

/// A built, bound, not yet serving Updraft.
pub struct Application {
    settings: Settings,
    state: AppState,
    server: ServerState,
    listener: std::net::TcpListener,
    https_addr: SocketAddr,
    tls: RustlsConfig,
    ca_path: Option<PathBuf>,
    admin: AdminBootstrap,
    mqtt: Option<MqttListeners>,
    coap: Option<backend::coap::CoapEndpoint>,
    /// `metrics.listen`: `/metrics` over plain HTTP for a private network.
    metrics_listener: Option<std::net::TcpListener>,
    gate: Arc<ConnectionGate>,
    /// Held while this server runs on a SQLite database (see [`lock_sqlite`]).
    _sqlite_lock: Option<std::fs::File>,
}

/// Refuses a second `updraft serve` on one SQLite database: two servers would drive the same subtasks
/// twice. The lock is the operating system's (`flock` on
/// `{database}.serve-lock`), held for as long as the returned file is open, so a server that crashed holds
/// none; the command line's other commands do not take it.
fn lock_sqlite(settings: &Settings) -> Result<Option<std::fs::File>> {
    let Some(database) = settings.sqlite_file() else {
        return Ok(None);
    };
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(".serve-lock");
    let path = database.with_file_name(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the database directory {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "another `updraft serve` is running on the SQLite database {} (it holds {}); two servers \
             on one database would drive the same upgrades twice. Stop the other one first",
            database.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// The bound MQTT listeners.
struct MqttListeners {
    plain: std::net::TcpListener,
    tls: std::net::TcpListener,
}

impl Application {
    /// Opens the database (migrating it), prepares secrets and TLS, creates the default project and first
    /// admin if needed, and binds the listeners.
    ///
    /// # Errors
    /// Any start-up failure, with context saying which step failed.
    pub async fn build(mut settings: Settings, clock: Arc<dyn Clock>) -> Result<Self> {
        let sqlite_lock = lock_sqlite(&settings)?;
        let budget = Budget::plan(&settings, budget::raise_descriptor_limit())
            .map_err(anyhow::Error::msg)
            .context("dividing the file descriptor budget")?;
        tracing::info!(%budget, "descriptor budget");
        settings.http.max_connections = Some(usize::try_from(budget.https).unwrap_or(usize::MAX));
        settings.mqtt.max_connections = Some(usize::try_from(budget.mqtt).unwrap_or(usize::MAX));
        let listener = std::net::TcpListener::bind(settings.http.listen)
            .with_context(|| format!("binding HTTPS on {} (http.listen)", settings.http.listen))?;
        listener.set_nonblocking(true)?;
        let https_addr = listener.local_addr()?;
        let metrics_listener = match settings.metrics.listen {
            Some(addr) if settings.metrics.enabled => {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding metrics on {addr} (metrics.listen)"))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            _ => None,
        };
        // Download URLs name the port really bound (it differs from the configured one with port 0).
        settings.downloads.public_url = Some(settings.public_url(https_addr.port()));
        let mqtt = if settings.mqtt.enabled {
            let bind = |addr: SocketAddr, key: &str| -> Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding MQTT on {addr} ({key})"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            };
            Some(MqttListeners {
                plain: bind(settings.mqtt.listen, "mqtt.listen")?,
                tls: bind(settings.mqtt.tls_listen, "mqtt.tls_listen")?,
            })
        } else {
            None
        };
        let coap_socket = if settings.lwm2m.enabled {
            let addr = settings.lwm2m.listen;
            let socket = bind_udp(addr, settings.lwm2m.receive_buffer)
                .with_context(|| format!("binding CoAP on {addr} (lwm2m.listen)"))?;
            // Firmware URIs name the port really bound.
            settings.lwm2m.public_url = Some(settings.coap_public_url(socket.local_addr()?.port()));
            let secure = if settings.lwm2m.dtls_enabled {
                let addr = settings.lwm2m.dtls_listen;
                let secure = bind_udp(addr, settings.lwm2m.receive_buffer)
                    .with_context(|| format!("binding CoAPS on {addr} (lwm2m.dtls_listen)"))?;
                settings.lwm2m.dtls_public_url =
                    Some(settings.coaps_public_url(secure.local_addr()?.port()));
                Some(secure)
            } else {
                None
            };
            Some((socket, secure))
        } else {
            None
        };
        let (state, project) = open_state(&settings, clock.clone()).await?;
        // Before recovery: grants of download slots made there reach devices through it.
        let coap = coap_socket
            .map(|(socket, secure)| {
                backend::coap::CoapEndpoint::new(
                    state.clone(),
                    socket,
                    secure,
                    settings.coap_settings(),
                )
            })
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("starting CoAP")?;
        let addresses = serde_json::json!({
            "https": https_addr.to_string(),
            "mqtt": mqtt.as_ref().and_then(|m| m.plain.local_addr().ok()).map(|a| a.to_string()),
            "coap": coap.as_ref().and_then(|c| c.local_addr().ok()).map(|a| a.to_string()),
            "coaps": coap.as_ref().and_then(backend::coap::CoapEndpoint::secure_addr).map(|a| a.to_string()),
        });
        backend::cluster::join(&state, &addresses.to_string())
            .await
            .context("joining the instances on the database")?;
        // Instances that died without leaving: their devices are offline, their subtasks are taken over.
        backend::cluster::beat(&state, &state.driver)
            .await
            .context("looking for instances that died")?;
        mark_devices_offline(&state)
            .await
            .context("resetting device online states")?;
        state
            .driver
            .recover(&state)
            .await
            .context("picking up tasks interrupted while starting")?;
        let admin = service::auth::bootstrap_admin(
            &state,
            &settings.admin.username,
            settings.admin.password.clone(),
        )
        .await
        .context("creating the first admin (admin.password)")?;

        let now_unix = clock.now().as_millis() / 1000;
        let material = tls::prepare(&settings, now_unix).context("preparing TLS")?;
        let tls = RustlsConfig::from_pem(material.cert_pem, material.key_pem)
            .await
            .context("loading the TLS certificate")?;

        let leptos = LeptosOptions::builder()
            .output_name("updraft")
            .site_root(settings.site_root.display().to_string())
            .site_pkg_dir("pkg")
            .site_addr(https_addr)
            .build();
        let server = ServerState {
            leptos,
            app: state.clone(),
            default_project: Arc::from(project.id.as_str()),
            transfers: Arc::default(),
            stopping: CancellationToken::new(),
            guards: Arc::default(),
            metrics: crate::http::metrics::Access::new(&settings.metrics),
        };
        Ok(Self {
            settings,
            state,
            server,
            listener,
            https_addr,
            tls,
            ca_path: material.ca_path,
            admin,
            mqtt,
            coap,
            metrics_listener,
            gate: Arc::new(ConnectionGate::new(
                usize::try_from(budget.https).unwrap_or(usize::MAX),
                usize::try_from(budget::REFUSING).unwrap_or(usize::MAX),
            )),
            _sqlite_lock: sqlite_lock,
        })
    }

    /// The bound CoAP address, when LwM2M is enabled.
    #[must_use]
    pub fn coap_addr(&self) -> Option<SocketAddr> {
        self.coap.as_ref()?.local_addr().ok()
    }

    /// The bound CoAPS address, when LwM2M over DTLS is enabled.
    #[must_use]
    pub fn coaps_addr(&self) -> Option<SocketAddr> {
        self.coap.as_ref()?.secure_addr()
    }

    /// The bound MQTT addresses (plain, TLS), when MQTT is enabled.
    #[must_use]
    pub fn mqtt_addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        let m = self.mqtt.as_ref()?;
        Some((m.plain.local_addr().ok()?, m.tls.local_addr().ok()?))
    }

    /// The bound HTTPS address (the real port when configured with port 0).
    #[must_use]
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The plain HTTP address of `/metrics`, when `metrics.listen` is set.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref()?.local_addr().ok()
    }

    /// The generated CA certificate, if Updraft made its own certificate.
    #[must_use]
    pub fn ca_path(&self) -> Option<&std::path::Path> {
        self.ca_path.as_deref()
    }

    /// What start-up did about the first admin (to print a generated password once).
    #[must_use]
    pub fn admin_bootstrap(&self) -> &AdminBootstrap {
        &self.admin
    }

    /// The services (for tests and embedded use).
    #[must_use]
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish within
    /// `http.shutdown_grace`, stops background jobs and closes the database.
    ///
    /// # Errors
    /// When a listener fails.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        // Cancelled on shutdown; long-lived responses (the console's event streams) end with it.
        let stop = self.server.stopping.clone();
        // If this future is dropped (aborted), background tasks must not outlive it.
        let _stop_on_drop = stop.clone().drop_guard();
        let handle = axum_server::Handle::new();
        let grace = self.settings.http.shutdown_grace;
        {
            let (handle, stop) = (handle.clone(), stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = shutdown => {},
                    () = stop.cancelled() => {},
                }
                tracing::info!("shutting down");
                stop.cancel();
                handle.graceful_shutdown(Some(grace));
            });
        }
        let janitor = tokio::spawn(janitor(
            self.state.clone(),
            self.settings.audit.retention,
            stop.clone(),
        ));
        let cluster = {
            let (driver, context, stop) = (
                self.state.driver.clone(),
                self.state.context().clone(),
                stop.clone(),
            );
            tokio::spawn(async move { backend::cluster::run(context, driver, stop).await })
        };
        let background = tokio_util::task::TaskTracker::new();
        {
            let (driver, context, stop) = (
                self.state.driver.clone(),
                self.state.context().clone(),
                stop.clone(),
            );
            background.spawn(async move { driver.run(context, stop).await });
        }
        {
            // Changes written by other processes reach this one's live views.
            let (driver, context, stop) = (
                self.state.driver.clone(),
                self.state.context().clone(),
                stop.clone(),
            );
            background.spawn(async move { driver.tail(context, stop).await });
        }
        if self.settings.notifications.enabled {
            let notifier = backend::notify::Notifier::new(self.state.settings.notify.clone())
                .context("setting up notifications")?;
            let (state, stop) = (self.state.clone(), stop.clone());
            background.spawn(async move { notifier.run(state, stop).await });
        }
        if let Some(listeners) = self.mqtt {
            let endpoint = MqttEndpoint::start(self.state.clone(), self.settings.mqtt_settings())
                .map_err(anyhow::Error::msg)
                .context("starting the MQTT router")?;
            let plain = tokio::net::TcpListener::from_std(listeners.plain)?;
            let tls = tokio::net::TcpListener::from_std(listeners.tls)?;
            tracing::info!(
                mqtt = %plain.local_addr()?, mqtts = %tls.local_addr()?,
                "MQTT listening"
            );
            background.spawn(endpoint.clone().serve_plain(plain, stop.clone()));
            background.spawn(endpoint.serve_tls(tls, self.tls.get_inner(), stop.clone()));
        }
        if let Some(coap) = self.coap {
            tracing::info!(coap = %coap.local_addr()?, "CoAP (LwM2M) listening");
            background.spawn(coap.run(stop.clone()));
        }
        if let Some(listener) = self.metrics_listener {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tracing::info!(metrics = %listener.local_addr()?, "metrics listening (plain HTTP)");
            let app = crate::http::metrics_router(self.server.clone());
            let stop = stop.clone();
            background.spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::error!(error.message = %e, "the metrics listener failed");
                }
            });
        }
        background.close();

        let transfers = self.server.transfers.clone();
        let (header_timeout, handshake_timeout) = (
            self.settings.http.header_timeout,
            self.settings.http.handshake_timeout,
        );
        let app = router(self.server).into_make_service_with_connect_info::<SocketAddr>();
        let mut server = axum_server::from_tcp_rustls(self.listener, self.tls)
            .context("HTTPS listener")?
            .map(|accept| GatedTls {
                accept: accept.handshake_timeout(handshake_timeout),
                first_byte_timeout: header_timeout,
                transfers: transfers.clone(),
                gate: self.gate.clone(),
            })
            .handle(handle);
        server
            .http_builder()
            .http1()
            // Huawei's C SDK looks for the literal "Content-Length: " in download responses.
            .title_case_headers(true)
            // Queue body chunks for vectored writes instead of copying them into one flat buffer, and
            // bound what is queued per connection ahead of a slow reader (default ~400 KiB): download
            // chunks then stay the ones the download budget counts (see `http::download`).
            .writev(true)
            .max_buf_size(8 * 1024)
            // A connection that sends no request head for this long (idle keep-alive included) is
            // closed, so idle clients cannot hold the places under http.max_connections.
            .header_read_timeout(header_timeout);
        let result = server.serve(app).await.context("HTTPS server");
        stop.cancel();
        let _ = janitor.await;
        let _ = cluster.await;
        // MQTT sessions record their devices going offline; give them a moment before the database closes.
        if tokio::time::timeout(grace, background.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the grace period");
        }
        if let Err(e) = backend::cluster::leave(&self.state).await {
            tracing::warn!(error.message = %e, "leaving the instances on the database");
        }
        if let Err(e) = self.state.db.clone().close().await {
            tracing::warn!(error.message = %e, "closing the database");
        }
        tracing::info!("stopped");
        result
    }
}

/// A UDP socket with a receive buffer of `receive_buffer` bytes (the kernel caps it at
/// `net.core.rmem_max`): a fleet's datagrams arrive in bursts, and the default (~208 KiB) drops them when
/// thousands of devices answer at once.
fn bind_udp(addr: SocketAddr, receive_buffer: usize) -> Result<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Err(e) = socket.set_recv_buffer_size(receive_buffer) {
        tracing::warn!(error.message = %e, "CoAP: the receive buffer size was not accepted");
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(tokio::net::UdpSocket::from_std(socket.into())?)
}

/// After a restart no device is connected here: devices recorded online (here, or nowhere in particular)
/// are marked offline, and their open subtasks are told so. Devices other instances hold stay online.
async fn mark_devices_offline(state: &AppState) -> Result<()> {
    use backend::storage::entity::devices;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
    let mut online = devices::Entity::find()
        .select_only()
        .column(devices::Column::Id)
        .filter(devices::Column::Status.eq("ONLINE"));
    if state.clustered() {
        online = online.filter(
            sea_orm::Condition::any()
                .add(devices::Column::InstanceId.is_null())
                .add(devices::Column::InstanceId.eq(state.instance_id())),
        );
    }
    let online: Vec<String> = online.into_tuple().all(&state.db).await?;
    let count = online.len();
    for chunk in online.chunks(500) {
        let events = chunk
            .iter()
            .map(|id| (id.clone(), backend::driver::DeviceEvent::Offline))
            .collect();
        state.driver.device_events(state, events).await?;
    }
    if count > 0 {
        tracing::info!(devices = count, "devices marked offline after start-up");
    }
    Ok(())
}

/// Periodic housekeeping: expired sessions.
async fn janitor(state: AppState, audit_retention: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                match service::auth::purge_expired_sessions(&state).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(sessions = n, "purged expired sessions"),
                    Err(e) => tracing::warn!(error.message = %e, "purging sessions failed"),
                }
                match service::audit::prune(&state, audit_retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(entries = n, "audit entries past audit.retention deleted"),
                    Err(e) => tracing::warn!(error.message = %e, "pruning the audit trail failed"),
                }
            }
        }
    }
}
