//! The `subtasks` table (schema: `migrations`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "subtasks")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub task_id: String,
    pub device_id: String,
    pub status: String,
    pub step: String,
    pub progress: i32,
    pub attempts: i32,
    pub deadline_at: Option<i64>,
    pub source_version: Option<String>,
    pub error_code: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub error_msg: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub output: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub machine: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    /// The rollout wave (0 without waves).
    pub wave: i32,
    /// The gateway the device is reached through (a child device's), as when the subtask was written.
    pub gateway_id: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
