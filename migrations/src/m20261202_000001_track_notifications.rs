//! What push notifications need:
//!
//! - `outbox.fanned_at`: when a record was turned into deliveries for the subscriptions that want it.
//!   A marker per record, not a high-water mark: on PostgreSQL ids are handed out before commit, so a
//!   record with a lower id can appear after a higher one and must not be skipped. Records written before
//!   this migration count as fanned out (no subscription existed to want them).
//! - `ix_notification_deliveries_subscription`: each subscription's pending deliveries in order.

use sea_orm_migration::prelude::*;

/// Adds `outbox.fanned_at` and the deliveries index.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

// async_trait's expansion needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("outbox")
                .add_column(ColumnDef::new("fanned_at").big_integer().null())
                .take(),
        )
        .await?;
        m.exec_stmt(
            Query::update()
                .table("outbox")
                .value("fanned_at", Expr::col("created_at"))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_outbox_fanned_at")
                .table("outbox")
                .col("fanned_at")
                .col("id")
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_notification_deliveries_subscription")
                .table("notification_deliveries")
                .col("subscription_id")
                .col("status")
                .col("id")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("ix_notification_deliveries_subscription")
                .table("notification_deliveries")
                .to_owned(),
        )
        .await?;
        m.drop_index(
            Index::drop()
                .name("ix_outbox_fanned_at")
                .table("outbox")
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table("outbox")
                .drop_column("fanned_at")
                .take(),
        )
        .await
    }
}
