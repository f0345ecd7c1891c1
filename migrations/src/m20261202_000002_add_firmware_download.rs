//! `products.firmware_download`: how the product's LwM2M devices fetch firmware packages named in the
//! Firmware Update object's Package URI: `coap` (CoAP block-wise from Updraft, the default) or `https`.

use sea_orm_migration::prelude::*;

/// Adds `products.firmware_download`.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

// async_trait's expansion needs the elided lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("products")
                .add_column(
                    ColumnDef::new("firmware_download")
                        .string()
                        .not_null()
                        .default("coap"),
                )
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table("products")
                .drop_column("firmware_download")
                .take(),
        )
        .await
    }
}
