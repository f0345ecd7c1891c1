//! The `device_messages` table (schema: `migrations`): queued messages for devices.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "device_messages")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub device_id: String,
    pub payload: Vec<u8>,
    pub created_at: i64,
    /// The instance to send it (the one holding the device); `None`: any that serves the protocol.
    pub instance_id: Option<String>,
    /// `mqtt` (the payload is published) or `lwm2m` (the payload is an LwM2M command, JSON).
    pub kind: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
