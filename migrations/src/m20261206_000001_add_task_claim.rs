//! `tasks.claimed_by`: the instance that created or claimed a task while it is `Initializing` (its group
//! targets being resolved, its subtasks being written). When that instance dies, the task goes back to
//! `Waitting` for another to start; a live instance's is left to it.

use sea_orm_migration::prelude::*;

/// Adds `tasks.claimed_by`.
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
                .add_column(ColumnDef::new("claimed_by").string().null())
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("tasks")
                .drop_column("claimed_by")
                .take(),
        )
        .await
    }
}
