//! `cursors`: named positions in append-only tables that a background worker has processed, so it
//! resumes where it stopped after a restart. The first is `notifications`: the last outbox row fanned out
//! to webhook subscriptions.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, string};

/// Adds the `cursors` table.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

// async_trait's expansion needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("cursors")
                .col(string("name").primary_key())
                .col(big_integer("position"))
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("cursors").take()).await
    }
}
