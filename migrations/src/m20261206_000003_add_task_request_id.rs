//! `tasks.request_id`: the `X-Request-Id` of the API call that created a task, carried into the task
//! driver's log lines for what it does later on the task's behalf (README, "Tracing").

use sea_orm_migration::prelude::*;

/// Adds `tasks.request_id`.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

// async_trait's expansion needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("tasks")
                .add_column(ColumnDef::new("request_id").string().null())
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("tasks")
                .drop_column("request_id")
                .take(),
        )
        .await
    }
}
