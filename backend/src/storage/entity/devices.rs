//! The `devices` table (schema: `migrations`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "devices")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub project_id: String,
    pub app_id: String,
    pub product_id: String,
    pub node_id: String,
    pub device_name: String,
    pub description: String,
    pub gateway_id: Option<String>,
    pub node_type: String,
    pub auth_type: String,
    pub secret_enc: Option<Vec<u8>>,
    pub secondary_secret_enc: Option<Vec<u8>>,
    pub fingerprint: Option<String>,
    pub secure_access: bool,
    pub status: String,
    pub sw_version: Option<String>,
    pub fw_version: Option<String>,
    pub device_sdk_version: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub extension_info: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub last_radio: Option<String>,
    pub connection_status_update_time: Option<i64>,
    pub active_time: Option<i64>,
    /// The instance holding the device's MQTT connection or LwM2M registration (`cluster`).
    pub instance_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
