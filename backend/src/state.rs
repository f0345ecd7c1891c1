//! [`AppState`]: what every HTTP handler, server function and background job receives: the [`Context`]
//! (database, clock, store, settings; reached through `Deref`) and the task driver.

use std::ops::Deref;
use std::sync::Arc;

use sea_orm::DatabaseConnection;

use crate::clock::Clock;
use crate::context::Context;
use crate::driver::Driver;
use crate::objects::PackageStore;
use crate::secrets::Sealer;
use crate::settings::ServiceSettings;

/// Shared state. Cheap to clone (everything is behind `Arc`s or is a pool handle).
#[derive(Clone, Debug)]
pub struct AppState {
    context: Context,
    /// The task driver (runs subtasks' state machines; see [`crate::driver`]).
    pub driver: Driver,
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
        let driver = Driver::new(settings.driver.clone());
        Self {
            context: Context::new(db, clock, sealer, store, settings),
            driver,
        }
    }

    /// The context alone (what the driver works on).
    #[must_use]
    pub fn context(&self) -> &Context {
        &self.context
    }
}

impl Deref for AppState {
    type Target = Context;

    fn deref(&self) -> &Context {
        &self.context
    }
}
