//! The `products` table (schema: `migrations`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "products")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub project_id: String,
    pub app_id: String,
    pub name: String,
    pub device_type: String,
    pub protocol_type: String,
    pub data_format: String,
    pub manufacturer_name: String,
    pub industry: String,
    pub description: String,
    #[sea_orm(column_type = "Text")]
    pub service_capabilities: String,
    /// `coap` or `https`: how its LwM2M devices fetch firmware (Package URI of `/5/0/1`).
    pub firmware_download: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
