//! The settings of the services, the task driver and push notifications (a subset of the server's
//! configuration, with the defaults the server's configuration falls back to). Plain data: the
//! modules that use them sit above this one.

use std::time::Duration;

use domain::flow::{lwm2m, mqtt};

/// Settings the services need (a subset of the server's configuration).
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    /// How long a console session lives without activity.
    pub session_idle: Duration,
    /// The longest a console session lives at all.
    pub session_max: Duration,
    /// Failed logins allowed per user name and client address within `login_window`.
    pub login_max_failures: usize,
    /// Failed logins allowed per client address (any user names) within `login_window`.
    pub login_max_failures_per_address: usize,
    /// The failed-login window.
    pub login_window: Duration,
    /// Threads hashing and checking console passwords (argon2id, ~19 MiB each while working).
    pub password_hash_threads: usize,
    /// Password checks waiting for a hashing thread at most; more are answered "busy".
    pub password_hash_queue: usize,
    /// How long a package download token works.
    pub download_token_ttl: Duration,
    /// How far a signed API request's `X-Sdk-Date` may be from the clock.
    pub api_signature_skew: Duration,
    /// The task driver's timeouts and download URL base.
    pub driver: DriverSettings,
    /// Push notifications.
    pub notify: NotifySettings,
    /// This instance among others on one PostgreSQL.
    pub cluster: ClusterSettings,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            session_idle: Duration::from_secs(12 * 3600),
            session_max: Duration::from_secs(7 * 24 * 3600),
            login_max_failures: 5,
            login_max_failures_per_address: 20,
            password_hash_threads: 1,
            password_hash_queue: 16,
            login_window: Duration::from_secs(15 * 60),
            download_token_ttl: Duration::from_secs(24 * 3600),
            api_signature_skew: Duration::from_secs(15 * 60),
            driver: DriverSettings::default(),
            notify: NotifySettings::default(),
            cluster: ClusterSettings::default(),
        }
    }
}

/// How an instance takes part in a deployment of several on one PostgreSQL (`crate::cluster`). With
/// SQLite there is one instance, and these only name it.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// This instance's id: its subtask leases, device connections and queued messages are recorded
    /// under it. Unique among the instances on one database.
    pub instance_id: String,
    /// How long a subtask lease (and an instance's heartbeat) holds without renewal: an instance silent
    /// this long is dead, and the others take its subtasks over.
    pub lease: Duration,
    /// How often the heartbeat is written and leases are renewed (a fraction of `lease`).
    pub heartbeat: Duration,
}

/// The default [`ClusterSettings::lease`].
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// The default [`ClusterSettings::heartbeat`].
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(3);

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            instance_id: default_instance_id(),
            lease: DEFAULT_LEASE,
            heartbeat: DEFAULT_HEARTBEAT,
        }
    }
}

/// `<host name>-<process id>`, with `-<n>` for the second and later instance in one process (tests).
#[must_use]
pub fn default_instance_id() -> String {
    static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "updraft".to_owned());
    let pid = std::process::id();
    match COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
        0 => format!("{host}-{pid}"),
        n => format!("{host}-{pid}-{}", n + 1),
    }
}

/// Driver settings (from the server's configuration).
#[derive(Clone, Debug)]
pub struct DriverSettings {
    /// The MQTT flow's timeouts.
    pub mqtt: mqtt::Timeouts,
    /// The LwM2M flow's timeouts.
    pub lwm2m: lwm2m::Timeouts,
    /// How radio coverage sets per-cell concurrency.
    pub coverage: lwm2m::Coverage,
    /// The base of download URLs given to devices, e.g. `https://ota.example.com:8443` (no trailing `/`).
    pub download_base_url: String,
    /// The base of block-wise firmware URIs given to LwM2M devices, e.g. `coap://ota.example.com:5683`.
    pub coap_base_url: String,
}

impl Default for DriverSettings {
    fn default() -> Self {
        Self {
            mqtt: mqtt::Timeouts::default(),
            lwm2m: lwm2m::Timeouts::default(),
            coverage: lwm2m::Coverage::default(),
            download_base_url: "https://localhost:8443".to_owned(),
            coap_base_url: "coap://localhost:5683".to_owned(),
        }
    }
}

/// Notification settings.
#[derive(Clone, Debug)]
pub struct NotifySettings {
    /// Attempts before a delivery is given up (`failed`).
    pub max_attempts: u32,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// How long one POST may take.
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Extra CA certificates (PEM) to trust for receivers, besides the system's.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Accept `http://` callback URLs (for a receiver on a trusted network).
    pub allow_http: bool,
    /// How long finished deliveries and outbox records are kept.
    pub retention: Duration,
    /// Contact callback URLs on loopback, private and link-local addresses (a receiver inside the
    /// network Updraft runs in).
    pub allow_private: bool,
}

impl Default for NotifySettings {
    fn default() -> Self {
        Self {
            max_attempts: 12,
            max_backoff: Duration::from_secs(3600),
            timeout: Duration::from_secs(10),
            concurrency: 16,
            extra_ca_pem: None,
            allow_http: false,
            retention: Duration::from_secs(7 * 24 * 3600),
            allow_private: false,
        }
    }
}
