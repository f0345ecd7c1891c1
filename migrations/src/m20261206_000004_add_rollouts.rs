//! Safe rollouts (README, "Safe rollouts"): a task's rollout policy and where it stands, when the driver
//! must look at it again, and each subtask's wave.

use sea_orm_migration::prelude::*;

/// Adds `tasks.rollout`, `tasks.rollout_state`, `tasks.rollout_wake_at` and `subtasks.wave`.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

// async_trait's expansion needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters a table one column at a time.
        for column in [
            ColumnDef::new("rollout").text().null().take(),
            ColumnDef::new("rollout_state").text().null().take(),
            ColumnDef::new("rollout_wake_at")
                .big_integer()
                .null()
                .take(),
        ] {
            m.alter_table(Table::alter().table("tasks").add_column(column).take())
                .await?;
        }
        m.alter_table(
            Table::alter()
                .table("subtasks")
                .add_column(ColumnDef::new("wave").integer().not_null().default(0))
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for column in ["rollout", "rollout_state", "rollout_wake_at"] {
            m.alter_table(Table::alter().table("tasks").drop_column(column).take())
                .await?;
        }
        m.alter_table(Table::alter().table("subtasks").drop_column("wave").take())
            .await
    }
}
