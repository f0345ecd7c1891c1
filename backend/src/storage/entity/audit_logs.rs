//! The `audit_logs` table (schema: `migrations`): who changed what, from where, when, and how it ended.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Serialize)]
#[sea_orm(table_name = "audit_logs")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// When (ms since the epoch, the injected clock).
    pub at: i64,
    pub project_id: Option<String>,
    /// `user` (console), `application` (an access key), `cli` (the command line) or `anonymous`.
    pub actor_type: String,
    /// The user name, access key, or the command line's operating-system user.
    pub actor: String,
    /// The client address.
    pub source: Option<String>,
    /// What was asked: `POST /v5/iot/{project_id}/batchtasks`, `console create_task`, `sign-in`, `cli task create`.
    pub action: String,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    /// `success` or `failure`.
    pub result: String,
    /// The HTTP status answered.
    pub status: Option<i32>,
    #[sea_orm(column_type = "Text")]
    pub detail: Option<String>,
    pub request_id: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
