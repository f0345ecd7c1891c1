//! `audit_logs`: who changed what, from where, when, and how it ended (README, "Audit trail"). Written
//! for every state-changing request of the console and the API, every sign-in, and the command line's
//! changes; kept for `audit.retention`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_pk_auto, integer_null, string, string_null, text_null,
};

/// Creates `audit_logs`.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

// async_trait's expansion needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("audit_logs")
                .col(big_pk_auto("id"))
                .col(big_integer("at"))
                .col(string_null("project_id"))
                .col(string("actor_type"))
                .col(string("actor"))
                .col(string_null("source"))
                .col(string("action"))
                .col(string_null("resource_type"))
                .col(string_null("resource_id"))
                .col(string("result"))
                .col(integer_null("status"))
                .col(text_null("detail"))
                .col(string_null("request_id"))
                .take(),
        )
        .await?;
        for (name, cols) in [
            ("ix_audit_logs_project_at", &["project_id", "at"][..]),
            ("ix_audit_logs_actor_at", &["actor", "at"][..]),
            (
                "ix_audit_logs_resource",
                &["resource_type", "resource_id", "at"][..],
            ),
            ("ix_audit_logs_at", &["at"][..]),
        ] {
            let mut index = Index::create();
            index.name(name).table("audit_logs");
            for c in cols {
                index.col(*c);
            }
            m.create_index(index.take()).await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("audit_logs").to_owned())
            .await
    }
}
