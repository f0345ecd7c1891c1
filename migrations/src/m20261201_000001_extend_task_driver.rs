//! What the task driver needed beyond the first schema:
//!
//! - `ix_subtasks_deadline_at`: the driver looks for passed deadlines across all subtasks
//!   (`deadline_at <= now`) and for the earliest one; the first schema only indexed them behind `status`.
//! - `device_messages`: messages for devices queued by a process that holds no device connections (the
//!   command line, another instance); the instance serving MQTT publishes and deletes them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, big_pk_auto, blob, string};

/// Adds the deadline index and the device message queue.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

// async_trait's expansion needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .name("ix_subtasks_deadline_at")
                .table("subtasks")
                .col("deadline_at")
                .take(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("device_messages")
                .col(big_pk_auto("id"))
                .col(string("device_id"))
                .col(blob("payload"))
                .col(big_integer("created_at"))
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("device_messages").take())
            .await?;
        m.drop_index(
            Index::drop()
                .name("ix_subtasks_deadline_at")
                .table("subtasks")
                .to_owned(),
        )
        .await
    }
}
