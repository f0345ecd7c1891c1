//! The `subtask_steps` table (schema: `migrations`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "subtask_steps")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub subtask_id: i64,
    pub at: i64,
    pub step: String,
    pub status: String,
    pub progress: i32,
    #[sea_orm(column_type = "Text")]
    pub detail: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
