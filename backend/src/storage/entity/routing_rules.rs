//! The `routing_rules` table (schema: `migrations`): IoTDA's routing rules. A rule names a subject
//! (`resource`, `event`); its HTTP forwarding actions are `notification_subscriptions` rows with its
//! `rule_id`, delivering while the rule is active.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "routing_rules")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub project_id: String,
    pub app_id: Option<String>,
    pub rule_name: String,
    pub description: String,
    pub resource: String,
    pub event: String,
    /// `GLOBAL` or `APP`.
    pub app_type: String,
    /// IoTDA's `select`, kept and shown (every notification carries the whole body).
    #[sea_orm(column_type = "Text")]
    pub select_clause: Option<String>,
    pub active: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
