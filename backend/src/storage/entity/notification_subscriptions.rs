//! The `notification_subscriptions` table (schema: `migrations`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "notification_subscriptions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub project_id: String,
    pub app_id: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub url: String,
    pub secret_enc: Vec<u8>,
    #[sea_orm(column_type = "Text")]
    pub kinds: String,
    pub enabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
    /// The routing rule whose HTTP forwarding action this is (IoTDA's routing API); `None` for a
    /// subscription made with `POST subscriptions`.
    pub rule_id: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
