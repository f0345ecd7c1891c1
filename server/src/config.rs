//! Configuration: built-in defaults, then `updraft.toml` (or `--config FILE`), then `UPDRAFT_*`
//! environment variables with `__` for nesting (`UPDRAFT_HTTP__LISTEN=0.0.0.0:9443`).
//!
//! Unknown keys in the file are errors (a typo must not be silently ignored), and a bad value stops
//! start-up with a message that names the key and where it came from. Durations are written the human
//! way (`"12h"`, `"15m"`, `"5s"`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Every setting of `updraft serve`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where Updraft keeps its state: the SQLite file, packages, TLS material and the secret key.
    pub data_dir: PathBuf,
    /// The built console (server-rendered pages load `/pkg/*` from here).
    pub site_root: PathBuf,
    /// The HTTPS listener (console, REST API, downloads).
    pub http: HttpSettings,
    /// TLS certificates.
    pub tls: TlsSettings,
    /// The database.
    pub database: DatabaseSettings,
    /// The web console.
    pub console: ConsoleSettings,
    /// The first administrator, created on first start.
    pub admin: AdminSettings,
    /// Where package bytes are stored.
    pub packages: PackageSettings,
    /// Package downloads by devices.
    pub downloads: DownloadSettings,
    /// The device MQTT endpoint.
    pub mqtt: MqttSettings,
    /// Upgrade tasks: the MQTT flow's timeouts.
    pub tasks: TaskSettings,
    /// The device CoAP endpoint (LwM2M, PCP) and the LwM2M flow.
    pub lwm2m: Lwm2mSettings,
    /// The application REST API (`/v5`).
    pub api: ApiSettings,
    /// Push notifications to applications.
    pub notifications: NotificationSettings,
    /// The key that seals device secrets and SKs (64 hex digits). Default: `{data_dir}/secret.key`,
    /// created on first start. Keep it out of the database's backups, and never lose it.
    #[serde(skip_serializing)]
    pub secret_key: Option<SecretString>,
    /// Logging.
    pub log: LogSettings,
    /// Several instances on one PostgreSQL.
    pub cluster: ClusterSettings,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: MetricsSettings,
    /// The audit trail.
    pub audit: AuditSettings,
}

/// The audit trail (README, "Audit trail").
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Entries older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(180 * 86_400),
        }
    }
}

/// Prometheus metrics (README, "Metrics").
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Serve `GET /metrics` on the HTTPS listener.
    pub enabled: bool,
    /// A scraper must send `Authorization: Bearer <token>`; without one, `/metrics` is open to anyone
    /// who reaches the port.
    #[serde(skip_serializing)]
    pub token: Option<SecretString>,
    /// Also serve `/metrics` over plain HTTP on this address (for scrapers inside a private network;
    /// off by default). The token applies there too.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            token: None,
            listen: None,
        }
    }
}

/// Several instances on one PostgreSQL (README, "Running several instances"). Nothing here is needed:
/// an instance names itself, and the defaults suit a load balancer's health checks.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// This instance's id, unique among those sharing the database. Default: host name + process id.
    pub instance_id: Option<String>,
    /// How long an instance's subtask leases hold without renewal; an instance silent this long is
    /// taken for dead and the others take its subtasks over.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often an instance writes its heartbeat and renews its leases.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            instance_id: None,
            lease: backend::settings::DEFAULT_LEASE,
            heartbeat: backend::settings::DEFAULT_HEARTBEAT,
        }
    }
}

/// The HTTPS listener.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM before connections are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The most HTTPS connections at once; more are answered 503 with `Retry-After`. Default: derived
    /// from the descriptor budget (`crate::budget`).
    pub max_connections: Option<usize>,
    /// How long a client has to complete a request head: the first request after the handshake, and
    /// each next one on a kept-alive connection (idle time included). Slower connections are closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a client has to complete the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

/// TLS. Without `cert`/`key`, Updraft generates a local CA and a server certificate on first start
/// (under `{data_dir}/tls`) for `localhost`, `127.0.0.1`, `::1`, this host's name and `names`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// A PEM certificate chain provided by the operator.
    pub cert: Option<PathBuf>,
    /// The PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// Extra DNS names or IP addresses for the generated server certificate.
    pub names: Vec<String>,
}

/// The database.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://path?mode=rwc` or `postgres://user:pass@host/db`. Default: `{data_dir}/updraft.db`.
    #[serde(skip_serializing)]
    pub url: Option<SecretString>,
}

/// The web console.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// A session ends after this long without use.
    #[serde(with = "humantime_serde")]
    pub session_idle: Duration,
    /// A session ends after this long in any case.
    #[serde(with = "humantime_serde")]
    pub session_max: Duration,
    /// Failed logins allowed per user name and client address within `login_window`.
    pub login_max_failures: usize,
    /// Failed logins allowed per client address, whatever the user names, within `login_window`.
    pub login_max_failures_per_address: usize,
    /// The failed-login window.
    #[serde(with = "humantime_serde")]
    pub login_window: Duration,
    /// Threads checking passwords (argon2id, ~19 MiB and a core each while working).
    pub password_hash_threads: usize,
    /// Sign-ins waiting for a password check at most; more are told the server is busy.
    pub password_hash_queue: usize,
}

/// The first administrator.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// User name.
    pub username: String,
    /// Password (10-128 characters). When absent, a random one is generated and printed once.
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
}

/// Where package bytes live: `local` (a directory, the default) or `s3` (any S3-compatible bucket).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// `packages.dir`.
    #[default]
    Local,
    /// `packages.s3`.
    S3,
}

/// The package store.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PackageSettings {
    /// `local` or `s3`.
    pub store: StoreKind,
    /// The bucket: the S3 bucket, or the name bucket registrations use for the local directory.
    pub bucket: String,
    /// The local directory. Default: `{data_dir}/packages`.
    pub dir: Option<PathBuf>,
    /// The largest package accepted, in bytes (default 4 GiB).
    pub max_size: u64,
    /// The most distinct local package files open at once for downloads (each shared by all of its
    /// downloads); a download of yet another package gets 503 with `Retry-After`.
    pub max_open_files: usize,
    /// The S3-compatible bucket (with `store = "s3"`).
    pub s3: S3Settings,
    /// Other bucket names CreateOtaPackage may give for this store (their `region_name` is kept as
    /// given): the OBS buckets an IoTDA application's code already names, so it needs no change.
    pub bucket_aliases: Vec<String>,
}

/// An S3-compatible bucket. Credentials may also come from the usual `AWS_*` environment variables.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    /// Endpoint URL (`https://s3.example.com`, `http://127.0.0.1:9000`); AWS when absent.
    pub endpoint: Option<String>,
    /// Region.
    pub region: String,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    #[serde(skip_serializing)]
    pub secret_access_key: Option<SecretString>,
    /// Path-style URLs (`host/bucket/key`, what MinIO and most S3-compatible servers want) when true;
    /// virtual-hosted style (`bucket.host/key`) when false.
    pub path_style: bool,
    /// Allow a plain `http://` endpoint.
    pub allow_http: bool,
    /// Send devices presigned bucket URLs (`*_upgrade_v2`) for uploaded packages too, so package bytes
    /// flow from the bucket (or its CDN), not through Updraft. Registered bucket objects always are.
    pub offload: bool,
}

/// Device downloads.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadSettings {
    /// How long a download token works (IoTDA: 24 h).
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// The base of the download URLs sent to devices (`https://ota.example.com:8443`). Default:
    /// `https://{host}:{port}` with the HTTPS port and, as host, `http.listen`'s address when it is a
    /// specific one, else the first of `tls.names`, else this machine's host name.
    pub public_url: Option<String>,
}

/// The application REST API.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// How far a signed request's `X-Sdk-Date` may be from the server's clock (either way).
    #[serde(with = "humantime_serde")]
    pub signature_skew: Duration,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            signature_skew: backend::settings::ServiceSettings::default().api_signature_skew,
        }
    }
}

/// Push notifications (webhooks) to subscribed applications.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationSettings {
    /// Deliver notifications at all (subscriptions are kept either way).
    pub enabled: bool,
    /// Attempts before a delivery is given up and shown as failed.
    pub max_attempts: u32,
    /// The longest wait between two attempts (waits double from 1 s).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long one POST may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A PEM file of extra CA certificates to trust for receivers (besides the system's).
    pub extra_ca: Option<PathBuf>,
    /// Accept `http://` callback URLs (only for receivers on a trusted network).
    pub allow_http: bool,
    /// How long delivered and failed notifications, and outbox records nobody waits for, are kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Deliver to loopback, private and link-local addresses (receivers inside Updraft's own network).
    pub allow_private: bool,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        let d = backend::settings::NotifySettings::default();
        Self {
            enabled: true,
            max_attempts: d.max_attempts,
            max_backoff: d.max_backoff,
            timeout: d.timeout,
            extra_ca: None,
            allow_http: false,
            retention: d.retention,
            allow_private: false,
        }
    }
}

/// The device MQTT endpoint (IoTDA logins, `$oc` system topics), on an embedded rumqttd router.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// Serve MQTT at all.
    pub enabled: bool,
    /// Plain MQTT.
    pub listen: SocketAddr,
    /// MQTT over TLS, with the HTTPS certificate.
    pub tls_listen: SocketAddr,
    /// How far a signature-type-1 login timestamp may be from the clock.
    #[serde(with = "humantime_serde")]
    pub timestamp_skew: Duration,
    /// The most device connections at once (plain and TLS); more get CONNACK 3. Default: what the
    /// descriptor budget leaves (`crate::budget`).
    pub max_connections: Option<usize>,
    /// The largest MQTT packet accepted from a logged-in device, in bytes (CONNECT: at most 4 KiB).
    pub max_packet_size: usize,
    /// Subscription filters a device may create, in the life of the process (the router never frees
    /// one); more get SUBACK 0x80.
    pub max_subscriptions: usize,
    /// Refuse a device with `secure_access` on plain MQTT with CONNACK 5, as IoTDA does (default). Turn
    /// off only while a fleet registered before Updraft enforced it moves to TLS or has
    /// `secure_access: false` set.
    pub enforce_secure_access: bool,
}

/// The device CoAP endpoint (LwM2M registration, PCP software upgrades) and the LwM2M flow's timeouts
/// and per-cell concurrency (`design.md`, the LwM2M table).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lwm2mSettings {
    /// Serve CoAP at all.
    pub enabled: bool,
    /// The UDP address (CoAP, no DTLS).
    pub listen: SocketAddr,
    /// The registration lifetime when a device sends none.
    #[serde(with = "humantime_serde")]
    pub default_lifetime: Duration,
    /// CoAP `ACK_TIMEOUT`: the first wait before a confirmable message to a device is sent again.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// CoAP `MAX_RETRANSMIT`.
    pub max_retransmit: u32,
    /// Bytes of package data kept in memory for serving segments.
    pub cache_bytes: usize,
    /// The UDP receive buffer in bytes (the kernel caps it at `net.core.rmem_max`).
    pub receive_buffer: usize,
    /// The base of the firmware URIs written to devices' `/5/0/1`, e.g. `coap://ota.example.com:5683`
    /// (default: this host and the bound CoAP port).
    pub public_url: Option<String>,
    /// The Block2 size of firmware downloads when a device does not ask for one (16-1024, a power of
    /// two).
    pub block_size: usize,
    /// CoAP requests worked on at once (those that wait for the database or the package store); more
    /// are answered 5.03 with Max-Age 2 and devices ask again.
    pub max_in_flight: usize,
    /// Registration requests (and first requests of a download token) per second per source address;
    /// twice as many may come at once, more are dropped unanswered.
    pub requests_per_second: u32,
    /// How long a subtask waits for its device to register.
    #[serde(with = "humantime_serde")]
    pub online_timeout: Duration,
    /// How long it waits for the PCP 0x13 answer.
    #[serde(with = "humantime_serde")]
    pub version_timeout: Duration,
    /// How often it sends 0x13 again meanwhile (the answer is a notification that may be lost).
    #[serde(with = "humantime_serde")]
    pub version_reask: Duration,
    /// How long it waits for the radio coverage read, then for the cell id read.
    #[serde(with = "humantime_serde")]
    pub coverage_timeout: Duration,
    /// How long the download may take (0x14 to the 0x16 result).
    #[serde(with = "humantime_serde")]
    pub download_timeout: Duration,
    /// How long installing may take (0x17 to the 0x18 result).
    #[serde(with = "humantime_serde")]
    pub execute_timeout: Duration,
    /// Coverage ranges (lower bounds of RSRP in dBm and SINR in dB for ranges 0, 1, 2) and how many
    /// devices of one cell download at once in each (`caps`), or when only the cell id is known.
    pub coverage: domain::flow::lwm2m::Coverage,
    /// Serve CoAPS (LwM2M over DTLS 1.2 with pre-shared keys: the PSK identity is the device's node id,
    /// the key its secret, the bytes its hex spells).
    pub dtls_enabled: bool,
    /// The CoAPS UDP address (IoTDA's 5684).
    pub dtls_listen: SocketAddr,
    /// The base of the firmware URIs written to devices registered over DTLS, e.g.
    /// `coaps://ota.example.com:5684` (default: this host and the bound CoAPS port).
    pub dtls_public_url: Option<String>,
    /// Every LwM2M device must come over DTLS: plain CoAP registrations are refused (4.03), whatever the
    /// device's `secure_access`.
    pub require_dtls: bool,
    /// The products (ids) whose LwM2M devices must come over DTLS: plain CoAP registrations of their
    /// devices are refused (4.03), whatever the device's `secure_access`.
    pub require_dtls_products: Vec<String>,
    /// A DTLS session unused this long is dropped; the device handshakes again.
    #[serde(with = "humantime_serde")]
    pub dtls_idle_timeout: Duration,
    /// A DTLS handshake not finished in this time is dropped.
    #[serde(with = "humantime_serde")]
    pub dtls_handshake_timeout: Duration,
    /// DTLS sessions kept at most (the least recently used goes first).
    pub dtls_max_sessions: usize,
    /// DTLS handshakes in progress at most (the oldest goes first).
    pub dtls_max_handshakes: usize,
    /// ClientHellos per second per source address (twice as many at once); more are dropped.
    pub dtls_hellos_per_second: u32,
}

impl Default for Lwm2mSettings {
    fn default() -> Self {
        let t = domain::flow::lwm2m::Timeouts::default();
        let c = backend::coap::CoapSettings::default();
        let dtls = backend::coap::DtlsSettings::default();
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 5683)),
            default_lifetime: c.default_lifetime,
            ack_timeout: c.ack_timeout,
            max_retransmit: c.max_retransmit,
            cache_bytes: c.cache_bytes,
            receive_buffer: 4 * 1024 * 1024,
            public_url: None,
            block_size: c.block_size,
            max_in_flight: c.max_in_flight,
            requests_per_second: c.requests_per_second,
            online_timeout: t.online,
            version_timeout: t.version,
            version_reask: t.version_reask,
            coverage_timeout: t.coverage,
            download_timeout: t.download,
            execute_timeout: t.execute,
            coverage: domain::flow::lwm2m::Coverage::default(),
            dtls_enabled: true,
            dtls_listen: SocketAddr::from(([0, 0, 0, 0], 5684)),
            dtls_public_url: None,
            require_dtls: false,
            require_dtls_products: Vec::new(),
            dtls_idle_timeout: dtls.idle_timeout,
            dtls_handshake_timeout: dtls.handshake_timeout,
            dtls_max_sessions: dtls.max_sessions,
            dtls_max_handshakes: dtls.max_handshakes,
            dtls_hellos_per_second: dtls.hellos_per_second,
        }
    }
}

/// Timeouts of the MQTT upgrade flow (`design.md`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskSettings {
    /// How long a subtask waits for an offline device to connect.
    #[serde(with = "humantime_serde")]
    pub online_timeout: Duration,
    /// How long it waits for `version_report` after `version_query`.
    #[serde(with = "humantime_serde")]
    pub version_timeout: Duration,
    /// How long download, install and the final report may take after the upgrade event.
    #[serde(with = "humantime_serde")]
    pub upgrade_timeout: Duration,
}

impl Default for MqttSettings {
    fn default() -> Self {
        let d = backend::mqtt::MqttSettings::default();
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            tls_listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            timestamp_skew: d.timestamp_skew,
            max_connections: None,
            max_packet_size: d.max_packet_size,
            max_subscriptions: d.max_subscriptions,
            enforce_secure_access: d.enforce_secure_access,
        }
    }
}

impl Default for TaskSettings {
    fn default() -> Self {
        let d = domain::flow::mqtt::Timeouts::default();
        Self {
            online_timeout: d.online,
            version_timeout: d.version,
            upgrade_timeout: d.upgrade,
        }
    }
}

impl Default for PackageSettings {
    fn default() -> Self {
        Self {
            store: StoreKind::Local,
            bucket: "updraft".to_owned(),
            dir: None,
            max_size: 4 * 1024 * 1024 * 1024,
            max_open_files: 64,
            s3: S3Settings::default(),
            bucket_aliases: Vec::new(),
        }
    }
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".to_owned(),
            access_key_id: None,
            secret_access_key: None,
            path_style: true,
            allow_http: false,
            offload: false,
        }
    }
}

impl Default for DownloadSettings {
    fn default() -> Self {
        Self {
            token_ttl: backend::settings::ServiceSettings::default().download_token_ttl,
            public_url: None,
        }
    }
}

/// Log output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `updraft=debug,info`...); `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            site_root: PathBuf::from("target/site"),
            http: HttpSettings::default(),
            tls: TlsSettings::default(),
            database: DatabaseSettings::default(),
            console: ConsoleSettings::default(),
            admin: AdminSettings::default(),
            packages: PackageSettings::default(),
            downloads: DownloadSettings::default(),
            mqtt: MqttSettings::default(),
            lwm2m: Lwm2mSettings::default(),
            tasks: TaskSettings::default(),
            api: ApiSettings::default(),
            notifications: NotificationSettings::default(),
            secret_key: None,
            log: LogSettings::default(),
            cluster: ClusterSettings::default(),
            metrics: MetricsSettings::default(),
            audit: AuditSettings::default(),
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            shutdown_grace: Duration::from_secs(3),
            max_connections: None,
            header_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        let d = backend::settings::ServiceSettings::default();
        Self {
            session_idle: d.session_idle,
            session_max: d.session_max,
            login_max_failures: d.login_max_failures,
            login_max_failures_per_address: d.login_max_failures_per_address,
            login_window: d.login_window,
            password_hash_threads: d.password_hash_threads,
            password_hash_queue: d.password_hash_queue,
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            username: backend::service::auth::DEFAULT_ADMIN.to_owned(),
            password: None,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            // rumqttd logs every connection and subscription at info: too much for a fleet.
            filter: "info,rumqttd=warn".to_owned(),
        }
    }
}

/// The top-level keys; environment variables naming anything else (`UPDRAFT_TEST_...`) are not ours.
const TOP_LEVEL_KEYS: &[&str] = &[
    "data_dir",
    "site_root",
    "http",
    "tls",
    "database",
    "console",
    "admin",
    "packages",
    "downloads",
    "mqtt",
    "tasks",
    "lwm2m",
    "api",
    "notifications",
    "secret_key",
    "log",
    "cluster",
    "metrics",
    "audit",
];

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.join("\n"))]
pub struct ConfigError(Vec<String>);

impl Settings {
    /// Loads defaults, then `file` (`updraft.toml` in the working directory if none is given; an explicitly
    /// given file must exist), then the `UPDRAFT_*` environment.
    ///
    /// # Errors
    /// [`ConfigError`] listing every bad key with its source.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, must_exist) = match file {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from("updraft.toml"), false),
        };
        if must_exist && !path.exists() {
            return Err(ConfigError(vec![format!(
                "  - config file {} does not exist",
                path.display()
            )]));
        }
        let env = Env::prefixed("UPDRAFT_").split("__").filter(|key| {
            let first = key.as_str().split('.').next().unwrap_or_default();
            TOP_LEVEL_KEYS.iter().any(|k| first.eq_ignore_ascii_case(k))
        });
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if path.exists() {
            figment = figment.merge(Toml::file_exact(&path));
        }
        let settings: Self = figment.merge(env).extract()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            problems.push("  - tls.cert and tls.key must be given together".to_owned());
        }
        if self.admin.username.trim().is_empty() {
            problems.push("  - admin.username must not be empty".to_owned());
        }
        for alias in &self.packages.bucket_aliases {
            if let Err(e) = domain::package::parse_bucket_name(alias) {
                problems.push(format!(
                    "  - packages.bucket_aliases: {alias:?}: {}",
                    e.message
                ));
            }
        }
        if let Err(e) = domain::package::parse_bucket_name(&self.packages.bucket) {
            problems.push(format!("  - packages.bucket: {}", e.message));
        }
        if self.packages.max_size == 0 {
            problems.push("  - packages.max_size must be at least 1".to_owned());
        }
        if let Some(id) = &self.cluster.instance_id
            && (id.is_empty()
                || id.len() > 128
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)))
        {
            problems.push(
                "  - cluster.instance_id must be 1 to 128 letters, digits, '-', '_', '.' or ':'"
                    .to_owned(),
            );
        }
        if self.cluster.heartbeat.is_zero() || self.cluster.heartbeat * 2 > self.cluster.lease {
            problems.push(
                "  - cluster.heartbeat must be more than 0 and at most half of cluster.lease"
                    .to_owned(),
            );
        }
        if self.notifications.max_attempts == 0 {
            problems.push("  - notifications.max_attempts must be at least 1".to_owned());
        }
        if self.notifications.timeout < Duration::from_secs(1) {
            problems.push("  - notifications.timeout must be at least 1s".to_owned());
        }
        if let Some(ca) = &self.notifications.extra_ca
            && !ca.is_file()
        {
            problems.push(format!(
                "  - notifications.extra_ca: {} is not a readable file",
                ca.display()
            ));
        }
        if self.api.signature_skew < Duration::from_secs(1) {
            problems.push("  - api.signature_skew must be at least 1s".to_owned());
        }
        if self.downloads.token_ttl < Duration::from_secs(60) {
            problems.push("  - downloads.token_ttl must be at least 1m".to_owned());
        }
        if let Some(url) = &self.downloads.public_url {
            let ok = url.starts_with("https://") || url.starts_with("http://");
            if !ok || url.trim_end_matches('/').contains('?') {
                problems.push(format!(
                    "  - downloads.public_url: {url:?} must be an http(s) URL like https://ota.example.com:8443"
                ));
            }
        }
        for (key, d) in [
            ("tasks.online_timeout", self.tasks.online_timeout),
            ("tasks.version_timeout", self.tasks.version_timeout),
            ("tasks.upgrade_timeout", self.tasks.upgrade_timeout),
            ("lwm2m.online_timeout", self.lwm2m.online_timeout),
            ("lwm2m.version_timeout", self.lwm2m.version_timeout),
            ("lwm2m.version_reask", self.lwm2m.version_reask),
            ("lwm2m.coverage_timeout", self.lwm2m.coverage_timeout),
            ("lwm2m.download_timeout", self.lwm2m.download_timeout),
            ("lwm2m.execute_timeout", self.lwm2m.execute_timeout),
        ] {
            if d < Duration::from_secs(1) {
                problems.push(format!("  - {key} must be at least 1s"));
            }
        }
        if !(16..=1024).contains(&self.lwm2m.block_size) || !self.lwm2m.block_size.is_power_of_two()
        {
            problems.push("  - lwm2m.block_size must be a power of two from 16 to 1024".to_owned());
        }
        if let Some(url) = &self.lwm2m.public_url
            && !url.starts_with("coap://")
        {
            problems.push(format!(
                "  - lwm2m.public_url: {url:?} must be a coap:// URL like coap://ota.example.com:5683"
            ));
        }
        if let Some(url) = &self.lwm2m.dtls_public_url
            && !url.starts_with("coaps://")
        {
            problems.push(format!(
                "  - lwm2m.dtls_public_url: {url:?} must be a coaps:// URL like coaps://ota.example.com:5684"
            ));
        }
        if self.lwm2m.dtls_enabled
            && self.lwm2m.dtls_listen == self.lwm2m.listen
            && self.lwm2m.listen.port() != 0
        {
            problems.push(
                "  - lwm2m.dtls_listen must differ from lwm2m.listen (CoAPS and CoAP are separate ports)"
                    .to_owned(),
            );
        }
        if self.lwm2m.max_retransmit > 10 {
            problems.push("  - lwm2m.max_retransmit must be at most 10".to_owned());
        }
        let caps = &self.lwm2m.coverage;
        if caps.caps.contains(&0) || caps.cell_only_cap == 0 {
            problems.push("  - lwm2m.coverage caps must be at least 1".to_owned());
        }
        if self.mqtt.max_packet_size < 1024 {
            problems.push("  - mqtt.max_packet_size must be at least 1024".to_owned());
        }
        if self.console.login_max_failures == 0 || self.console.login_max_failures_per_address == 0
        {
            problems.push(
                "  - console.login_max_failures and login_max_failures_per_address must be at least 1"
                    .to_owned(),
            );
        }
        if !(1..=64).contains(&self.console.password_hash_threads) {
            problems.push("  - console.password_hash_threads must be 1 to 64".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }

    /// The database URL: the configured one, or the SQLite file under `data_dir`.
    #[must_use]
    pub fn database_url(&self) -> SecretString {
        use secrecy::ExposeSecret;
        match &self.database.url {
            Some(url) => SecretString::from(url.expose_secret().to_owned()),
            None => SecretString::from(format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("updraft.db").display()
            )),
        }
    }

    /// The database file, when the database is SQLite on a file (not in memory, not PostgreSQL).
    #[must_use]
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        use secrecy::ExposeSecret;
        let url = self.database_url();
        let rest = url.expose_secret().strip_prefix("sqlite:")?;
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let path = rest.split('?').next().unwrap_or_default();
        (!path.is_empty() && !path.starts_with(":memory:")).then(|| PathBuf::from(path))
    }

    /// The service settings derived from this configuration.
    ///
    /// # Errors
    /// `notifications.extra_ca` cannot be read.
    pub fn service_settings(&self) -> anyhow::Result<backend::settings::ServiceSettings> {
        let extra_ca_pem =
            match &self.notifications.extra_ca {
                Some(path) => Some(std::fs::read(path).with_context(|| {
                    format!("reading notifications.extra_ca {}", path.display())
                })?),
                None => None,
            };
        Ok(backend::settings::ServiceSettings {
            session_idle: self.console.session_idle,
            session_max: self.console.session_max,
            login_max_failures: self.console.login_max_failures,
            login_max_failures_per_address: self.console.login_max_failures_per_address,
            login_window: self.console.login_window,
            password_hash_threads: self.console.password_hash_threads,
            password_hash_queue: self.console.password_hash_queue,
            download_token_ttl: self.downloads.token_ttl,
            api_signature_skew: self.api.signature_skew,
            driver: backend::settings::DriverSettings {
                mqtt: domain::flow::mqtt::Timeouts {
                    online: self.tasks.online_timeout,
                    version: self.tasks.version_timeout,
                    upgrade: self.tasks.upgrade_timeout,
                },
                lwm2m: domain::flow::lwm2m::Timeouts {
                    online: self.lwm2m.online_timeout,
                    version: self.lwm2m.version_timeout,
                    version_reask: self.lwm2m.version_reask,
                    coverage: self.lwm2m.coverage_timeout,
                    download: self.lwm2m.download_timeout,
                    execute: self.lwm2m.execute_timeout,
                },
                coverage: self.lwm2m.coverage,
                download_base_url: self.public_url(self.http.listen.port()),
                coap_base_url: self.coap_public_url(self.lwm2m.listen.port()),
            },
            notify: backend::settings::NotifySettings {
                max_attempts: self.notifications.max_attempts,
                max_backoff: self.notifications.max_backoff,
                timeout: self.notifications.timeout,
                extra_ca_pem,
                allow_http: self.notifications.allow_http,
                retention: self.notifications.retention,
                allow_private: self.notifications.allow_private,
                ..backend::settings::NotifySettings::default()
            },
            cluster: backend::settings::ClusterSettings {
                instance_id: self
                    .cluster
                    .instance_id
                    .clone()
                    .unwrap_or_else(backend::settings::default_instance_id),
                lease: self.cluster.lease,
                heartbeat: self.cluster.heartbeat,
            },
        })
    }

    /// The CoAP endpoint's settings.
    #[must_use]
    pub fn coap_settings(&self) -> backend::coap::CoapSettings {
        backend::coap::CoapSettings {
            ack_timeout: self.lwm2m.ack_timeout,
            max_retransmit: self.lwm2m.max_retransmit,
            default_lifetime: self.lwm2m.default_lifetime,
            cache_bytes: self.lwm2m.cache_bytes,
            block_size: self.lwm2m.block_size,
            max_in_flight: self.lwm2m.max_in_flight,
            requests_per_second: self.lwm2m.requests_per_second,
            dtls: backend::coap::DtlsSettings {
                idle_timeout: self.lwm2m.dtls_idle_timeout,
                handshake_timeout: self.lwm2m.dtls_handshake_timeout,
                max_sessions: self.lwm2m.dtls_max_sessions,
                max_handshakes: self.lwm2m.dtls_max_handshakes,
                hellos_per_second: self.lwm2m.dtls_hellos_per_second,
            },
            require_dtls: self.lwm2m.require_dtls,
            require_dtls_products: self.lwm2m.require_dtls_products.clone(),
            secure_base_url: self
                .lwm2m
                .dtls_enabled
                .then(|| self.coaps_public_url(self.lwm2m.dtls_listen.port())),
        }
    }

    /// The MQTT endpoint's settings.
    #[must_use]
    pub fn mqtt_settings(&self) -> backend::mqtt::MqttSettings {
        backend::mqtt::MqttSettings {
            timestamp_skew: self.mqtt.timestamp_skew,
            max_packet_size: self.mqtt.max_packet_size,
            max_subscriptions: self.mqtt.max_subscriptions,
            enforce_secure_access: self.mqtt.enforce_secure_access,
            max_connections: self
                .mqtt
                .max_connections
                .unwrap_or(backend::mqtt::MqttSettings::default().max_connections),
            ..backend::mqtt::MqttSettings::default()
        }
    }

    /// `downloads.public_url`, or the default for HTTPS on `port`.
    #[must_use]
    pub fn public_url(&self, port: u16) -> String {
        if let Some(url) = &self.downloads.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        format!(
            "https://{}:{port}",
            self.advertised_host(self.http.listen.ip())
        )
    }

    /// The host name devices are told for a listener on `ip`: the first `tls.names` entry (or this
    /// machine's name) when it listens on every address, else the address itself.
    fn advertised_host(&self, ip: std::net::IpAddr) -> String {
        if ip.is_unspecified() {
            self.tls
                .names
                .first()
                .cloned()
                .or_else(hostname)
                .unwrap_or_else(|| "localhost".to_owned())
        } else if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    }

    /// The base of firmware URIs for LwM2M devices: `lwm2m.public_url`, or `coap://` this host and `port`.
    #[must_use]
    pub fn coap_public_url(&self, port: u16) -> String {
        if let Some(url) = &self.lwm2m.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        format!(
            "coap://{}:{port}",
            self.advertised_host(self.lwm2m.listen.ip())
        )
    }

    /// The base of the firmware URIs for devices registered over DTLS.
    #[must_use]
    pub fn coaps_public_url(&self, port: u16) -> String {
        if let Some(url) = &self.lwm2m.dtls_public_url {
            return url.trim_end_matches('/').to_owned();
        }
        format!(
            "coaps://{}:{port}",
            self.advertised_host(self.lwm2m.dtls_listen.ip())
        )
    }

    /// The package store's settings.
    #[must_use]
    pub fn store_settings(&self) -> backend::objects::StoreSettings {
        use backend::objects::StoreLocation;
        let location = match self.packages.store {
            StoreKind::Local => StoreLocation::Local {
                dir: self
                    .packages
                    .dir
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("packages")),
            },
            StoreKind::S3 => {
                let s3 = &self.packages.s3;
                StoreLocation::S3 {
                    endpoint: s3.endpoint.clone(),
                    region: s3.region.clone(),
                    access_key_id: s3.access_key_id.clone(),
                    secret_access_key: s3.secret_access_key.clone(),
                    virtual_hosted_style: !s3.path_style,
                    allow_http: s3.allow_http,
                }
            }
        };
        backend::objects::StoreSettings {
            bucket: self.packages.bucket.clone(),
            location,
            max_package_size: self.packages.max_size,
            offload: self.packages.s3.offload,
            max_open_files: self.packages.max_open_files,
            bucket_aliases: self.packages.bucket_aliases.clone(),
        }
    }
}

impl From<figment::Error> for ConfigError {
    /// One line per problem: the key as written in `updraft.toml`, what is wrong, and where the value came
    /// from (the file, or the exact environment variable to fix).
    fn from(e: figment::Error) -> Self {
        Self(
            e.into_iter()
                .map(|e| {
                    let key = e.path.join(".").to_lowercase();
                    let source = match &e.metadata {
                        Some(m) if m.name.contains("environment") => {
                            format!(
                                "environment variable UPDRAFT_{}",
                                key.to_uppercase().replace('.', "__")
                            )
                        }
                        Some(m) => m
                            .source
                            .as_ref()
                            .map_or_else(|| m.name.to_string(), ToString::to_string),
                        None => "built-in defaults".to_owned(),
                    };
                    let key = if key.is_empty() {
                        "(top level)".to_owned()
                    } else {
                        key
                    };
                    format!("  - {key}: {} (from {source})", e.kind)
                })
                .collect(),
        )
    }
}

/// This machine's host name, when it is a usable DNS name.
pub(crate) fn hostname() -> Option<String> {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sqlite_file_is_found_in_every_spelling_of_its_url() {
        let mut s = Settings {
            data_dir: PathBuf::from("/var/lib/updraft"),
            ..Default::default()
        };
        assert_eq!(
            s.sqlite_file(),
            Some(PathBuf::from("/var/lib/updraft/updraft.db"))
        );
        for (url, file) in [
            ("sqlite:///tmp/u.db?mode=rwc", Some("/tmp/u.db")),
            ("sqlite://data/u.db", Some("data/u.db")),
            ("sqlite:u.db", Some("u.db")),
            ("sqlite::memory:", None),
            ("postgres://u:p@localhost/updraft", None),
        ] {
            s.database.url = Some(SecretString::from(url.to_owned()));
            assert_eq!(s.sqlite_file(), file.map(PathBuf::from), "{url}");
        }
    }
}
