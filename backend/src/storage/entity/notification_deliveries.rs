//! The `notification_deliveries` table (schema: `migrations`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "notification_deliveries")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub outbox_id: i64,
    pub subscription_id: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub last_http_status: Option<i32>,
    #[sea_orm(column_type = "Text")]
    pub last_error: Option<String>,
    pub delivered_at: Option<i64>,
    pub created_at: i64,
    /// The instance sending it now, until `claimed_until` (ms).
    pub claimed_by: Option<String>,
    pub claimed_until: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
