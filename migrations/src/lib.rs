//! Updraft's database schema as sea-orm migrations. They run at start-up (`Migrator::up`) on SQLite and
//! PostgreSQL alike, so only portable types are used: text ids, `BIGINT` times in milliseconds since the
//! Unix epoch, JSON documents as text, secrets as encrypted blobs.
//!
//! Migrations are named `mYYYYMMDD_HHMMSS_<verb>_<object>` and are never edited once released; a change is
//! a new migration.

pub use sea_orm_migration::prelude::*;

mod m20261127_000001_create_schema;
mod m20261201_000001_extend_task_driver;
mod m20261202_000001_track_notifications;
mod m20261202_000002_add_firmware_download;
mod m20261205_000001_add_cluster;
mod m20261206_000001_add_task_claim;
mod m20261206_000002_add_audit_logs;
mod m20261206_000003_add_task_request_id;
mod m20261206_000004_add_rollouts;
mod m20261206_000005_add_gateways_and_routing;

/// Every migration, in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_create_schema::Migration),
            Box::new(m20261201_000001_extend_task_driver::Migration),
            Box::new(m20261202_000001_track_notifications::Migration),
            Box::new(m20261202_000002_add_firmware_download::Migration),
            Box::new(m20261205_000001_add_cluster::Migration),
            Box::new(m20261206_000001_add_task_claim::Migration),
            Box::new(m20261206_000002_add_audit_logs::Migration),
            Box::new(m20261206_000003_add_task_request_id::Migration),
            Box::new(m20261206_000004_add_rollouts::Migration),
            Box::new(m20261206_000005_add_gateways_and_routing::Migration),
        ]
    }
}
