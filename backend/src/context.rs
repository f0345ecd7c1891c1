//! [`Context`]: what the services and the task driver work with: the database, the clock, the package
//! store, sealed secrets, settings, and the console's login guards. [`crate::AppState`] is a `Context`
//! with the task driver; the driver itself works on the `Context` alone, so nothing it needs holds it.

use std::sync::{Arc, Mutex};

use domain::throttle::Throttle;
use sea_orm::DatabaseConnection;

use crate::clock::Clock;
use crate::hashing::HashPool;
use crate::objects::PackageStore;
use crate::secrets::Sealer;
use crate::settings::ServiceSettings;

/// Shared resources. Cheap to clone (everything is behind `Arc`s or is a pool handle).
#[derive(Clone, Debug)]
pub struct Context {
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
    /// Failed-login throttle. A std mutex: the critical sections are a few map operations, never held
    /// across an await.
    pub(crate) login_throttle: Arc<Mutex<Throttle>>,
    /// Failed logins per client address, whatever the user name.
    pub(crate) address_throttle: Arc<Mutex<Throttle>>,
    /// The password hashing threads.
    pub(crate) hasher: Arc<HashPool>,
    /// This instance's Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Context {
    /// Assembles the context.
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
        let hasher = HashPool::new(settings.password_hash_threads, settings.password_hash_queue);
        Self {
            db,
            clock,
            sealer,
            store,
            settings,
            login_throttle: Arc::new(Mutex::new(throttle)),
            address_throttle: Arc::new(Mutex::new(address_throttle)),
            hasher: Arc::new(hasher),
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

    /// Whether other instances may share the database: on PostgreSQL, subtasks are driven under leases,
    /// messages are routed to the instance holding the device, and so on (`crate::cluster`). A SQLite
    /// file has one instance (start-up refuses a second).
    #[must_use]
    pub fn clustered(&self) -> bool {
        sea_orm::ConnectionTrait::get_database_backend(&self.db) == sea_orm::DbBackend::Postgres
    }

    /// This instance's id (`cluster.instance_id`).
    #[must_use]
    pub fn instance_id(&self) -> &str {
        &self.settings.cluster.instance_id
    }
}
