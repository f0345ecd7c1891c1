//! [`AppState`]: what every HTTP handler, server function and background job receives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::throttle::Throttle;
use sea_orm::DatabaseConnection;

use crate::clock::Clock;
use crate::driver::{Driver, DriverSettings};
use crate::objects::PackageStore;
use crate::secrets::Sealer;

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
    pub notify: crate::notify::NotifySettings,
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
            notify: crate::notify::NotifySettings::default(),
        }
    }
}

/// Shared state. Cheap to clone (everything is behind `Arc`s or is a pool handle).
#[derive(Clone, Debug)]
pub struct AppState {
    /// The database pool.
    pub db: DatabaseConnection,
    /// The injected clock.
    pub clock: Arc<dyn Clock>,
    /// Seals and opens stored secrets.
    pub sealer: Arc<Sealer>,
    /// Package bytes.
    pub store: PackageStore,
    /// Service settings.
    pub settings: ServiceSettings,
    /// The task driver (runs subtasks' state machines; see [`crate::driver`]).
    pub driver: Driver,
    /// Failed-login throttle. A std mutex: the critical sections are a few map operations, never held
    /// across an await.
    pub(crate) login_throttle: Arc<Mutex<Throttle>>,
    /// Failed logins per client address, whatever the user name.
    pub(crate) address_throttle: Arc<Mutex<Throttle>>,
    /// The password hashing threads.
    pub(crate) hasher: Arc<crate::hashing::HashPool>,
}

impl AppState {
    /// Assembles the state.
    #[must_use]
    pub fn new(
        db: DatabaseConnection,
        clock: Arc<dyn Clock>,
        sealer: Arc<Sealer>,
        store: PackageStore,
        settings: ServiceSettings,
    ) -> Self {
        let throttle = Throttle::new(settings.login_max_failures, settings.login_window, 100_000);
        let address_throttle = Throttle::new(
            settings.login_max_failures_per_address,
            settings.login_window,
            100_000,
        );
        let hasher = crate::hashing::HashPool::new(
            settings.password_hash_threads,
            settings.password_hash_queue,
        );
        Self {
            db,
            clock,
            sealer,
            store,
            driver: Driver::new(settings.driver.clone()),
            settings,
            login_throttle: Arc::new(Mutex::new(throttle)),
            address_throttle: Arc::new(Mutex::new(address_throttle)),
            hasher: Arc::new(hasher),
        }
    }
}
