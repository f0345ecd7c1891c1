//! The `download_slots` table (schema: `migrations`): LwM2M download slots held or waited for, per cell
//! and coverage class.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "download_slots")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub subtask_id: i64,
    pub slot_key: String,
    pub cap: i32,
    pub held: bool,
    pub asked_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
