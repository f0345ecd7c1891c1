//! The `packages` table (schema: `migrations`).

use domain::PackageId;
use domain::package::ObjectKey;
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "packages")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub project_id: String,
    pub app_id: String,
    pub product_id: String,
    pub package_type: String,
    pub module_name: Option<String>,
    pub version: String,
    #[sea_orm(column_type = "Text")]
    pub support_source_versions: String,
    pub description: String,
    #[sea_orm(column_type = "Text")]
    pub custom_info: String,
    pub file_name: String,
    pub size: i64,
    pub sha256: String,
    pub source: String,
    pub bucket: String,
    #[sea_orm(column_type = "Text")]
    pub object_key: String,
    pub region: Option<String>,
    pub segment_size: i32,
    pub created_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// Where a package's bytes came from.
pub const SOURCE_UPLOAD: &str = "upload";
/// A registered bucket object (never deleted by Updraft).
pub const SOURCE_BUCKET: &str = "bucket";

/// A package's stored object key.
///
/// # Errors
/// [`crate::Error::Internal`] when the stored key is invalid (never for rows written by
/// `service::packages`).
pub fn object_key(package: &Model) -> crate::Result<ObjectKey> {
    if package.source == SOURCE_UPLOAD {
        Ok(ObjectKey::for_upload(&PackageId::parse(
            package.id.clone(),
        )?))
    } else {
        ObjectKey::parse(&package.object_key).map_err(|e| crate::Error::Internal(e.to_string()))
    }
}
