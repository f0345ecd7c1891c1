//! IoTDA compatibility: gateways and their child devices (a child's upgrade goes through its gateway's
//! connection), and IoTDA's routing rules (a rule's HTTP forwarding actions are notification
//! subscriptions).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, boolean, string, string_null, text_null};

/// Adds `subtasks.gateway_id` and `notification_subscriptions.rule_id`, indexes `devices.gateway_id`
/// (a gateway's children are looked up when it connects), and creates `routing_rules`.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

// async_trait's expansion needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters a table one column at a time.
        for (table, column) in [
            ("subtasks", "gateway_id"),
            ("notification_subscriptions", "rule_id"),
        ] {
            m.alter_table(
                Table::alter()
                    .table(table)
                    .add_column(ColumnDef::new(column).string().null())
                    .take(),
            )
            .await?;
        }
        m.create_index(
            Index::create()
                .name("ix_devices_gateway")
                .table("devices")
                .col("gateway_id")
                .take(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("routing_rules")
                .col(string("id").primary_key())
                .col(string("project_id"))
                .col(string_null("app_id"))
                .col(string("rule_name"))
                .col(string("description"))
                .col(string("resource"))
                .col(string("event"))
                .col(string("app_type"))
                .col(text_null("select_clause"))
                .col(boolean("active"))
                .col(big_integer("created_at"))
                .col(big_integer("updated_at"))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_routing_rules_project")
                .table("routing_rules")
                .col("project_id")
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("routing_rules").to_owned())
            .await?;
        m.drop_index(
            Index::drop()
                .name("ix_devices_gateway")
                .table("devices")
                .to_owned(),
        )
        .await?;
        for (table, column) in [
            ("subtasks", "gateway_id"),
            ("notification_subscriptions", "rule_id"),
        ] {
            m.alter_table(Table::alter().table(table).drop_column(column).take())
                .await?;
        }
        Ok(())
    }
}
