//! What several instances on one PostgreSQL need to coordinate (SQLite uses the same tables, with one
//! instance):
//!
//! - `instances`: each running `updraft serve`, with a heartbeat; an instance whose heartbeat stopped is
//!   dead, and the others take over its subtasks and forget its device connections.
//! - `devices.instance_id`: the instance holding the device's MQTT connection or LwM2M registration.
//! - `device_messages.instance_id` and `kind`: a message for a device goes to the instance holding it
//!   (`NULL`: any instance that serves the protocol), as MQTT payload or as an LwM2M command (JSON).
//! - `download_slots`: the per-cell LwM2M download slots, held or waited for, counted across instances.
//! - `notification_deliveries.claimed_by` / `claimed_until`: the instance sending a delivery now.
//! - `ix_subtasks_lease_owner`: leases are renewed and taken over by owner.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, boolean, integer, string};

/// Adds the cluster tables and columns.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

// async_trait's expansion needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("instances")
                .col(string("id").primary_key())
                .col(big_integer("started_at"))
                .col(big_integer("heartbeat_at"))
                // What it serves, for operators (JSON: HTTPS, MQTT, CoAP addresses).
                .col(string("addresses").default(""))
                .take(),
        )
        .await?;
        // SQLite alters one column per statement.
        for (table, column) in [
            (
                "devices",
                ColumnDef::new("instance_id").string().null().take(),
            ),
            (
                "device_messages",
                ColumnDef::new("instance_id").string().null().take(),
            ),
            (
                "device_messages",
                ColumnDef::new("kind")
                    .string()
                    .not_null()
                    .default("mqtt")
                    .take(),
            ),
            (
                "notification_deliveries",
                ColumnDef::new("claimed_by").string().null().take(),
            ),
            (
                "notification_deliveries",
                ColumnDef::new("claimed_until").big_integer().null().take(),
            ),
        ] {
            m.alter_table(
                Table::alter()
                    .table(table)
                    .add_column(column.clone())
                    .take(),
            )
            .await?;
        }
        for (name, table, columns) in [
            ("ix_devices_instance_id", "devices", &["instance_id"][..]),
            (
                "ix_device_messages_instance_id",
                "device_messages",
                &["instance_id", "id"][..],
            ),
            ("ix_subtasks_lease_owner", "subtasks", &["lease_owner"][..]),
        ] {
            let mut index = Index::create().name(name).table(table).take();
            for c in columns {
                index.col(*c);
            }
            m.create_index(index).await?;
        }
        m.create_table(
            Table::create()
                .table("download_slots")
                .col(big_integer("subtask_id").primary_key())
                // "<cell>:<class>": devices of one cell and coverage class share a cap.
                .col(string("slot_key"))
                .col(integer("cap"))
                .col(boolean("held"))
                .col(big_integer("asked_at"))
                .foreign_key(
                    ForeignKey::create()
                        .from("download_slots", "subtask_id")
                        .to("subtasks", "id")
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_download_slots_key")
                .table("download_slots")
                .col("slot_key")
                .col("held")
                .col("asked_at")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("download_slots").take())
            .await?;
        for (name, table) in [
            ("ix_devices_instance_id", "devices"),
            ("ix_device_messages_instance_id", "device_messages"),
            ("ix_subtasks_lease_owner", "subtasks"),
        ] {
            m.drop_index(Index::drop().name(name).table(table).to_owned())
                .await?;
        }
        for (table, column) in [
            ("devices", "instance_id"),
            ("device_messages", "instance_id"),
            ("device_messages", "kind"),
            ("notification_deliveries", "claimed_by"),
            ("notification_deliveries", "claimed_until"),
        ] {
            m.alter_table(Table::alter().table(table).drop_column(column).take())
                .await?;
        }
        m.drop_table(Table::drop().table("instances").take()).await
    }
}
