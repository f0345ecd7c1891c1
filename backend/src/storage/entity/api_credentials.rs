//! The `api_credentials` table (schema: `migrations`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_credentials")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub access_key: String,
    pub project_id: String,
    pub secret_key_enc: Vec<u8>,
    pub description: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
