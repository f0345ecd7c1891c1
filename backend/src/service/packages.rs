//! Software and firmware packages: uploads (streamed into the package store), registrations of objects
//! already in the bucket, listing, and deletion with its rules.
//!
//! A package row exists only for a complete object: uploads write the object first and insert the row
//! after; if the insert fails (a concurrent duplicate), the object is deleted again.

use bytes::Bytes;
use domain::package::{ObjectKey, PackageMeta, PackageMetaInput, PackageType};
use domain::task::TaskStatus;
use domain::{PackageId, ValidationError};
use futures::Stream;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use super::{Page, Paged};
use crate::objects::Digest256;
pub use crate::storage::entity::packages::{SOURCE_BUCKET, SOURCE_UPLOAD, object_key};
use crate::storage::entity::{download_tokens, packages, products, tasks};
use crate::{AppState, Error, Result, ids};

/// A registration of an object already in the bucket (`file_location.obs_location`).
#[derive(Clone, Debug, Default)]
pub struct BucketObject {
    /// The region as the client named it (stored and echoed).
    pub region_name: String,
    /// Must be the store's bucket.
    pub bucket_name: String,
    /// The key below the bucket (or the package directory).
    pub object_key: String,
    /// The SHA-256 the client expects, if it gave one; must match the object.
    pub sign: Option<String>,
}

/// Checks what can be checked before any byte moves: valid metadata, an existing product, a free version.
async fn precheck(
    state: &AppState,
    project_id: &str,
    input: PackageMetaInput,
) -> Result<(PackageMeta, products::Model)> {
    let meta = PackageMeta::parse(input)?;
    let product = super::products::get(state, project_id, meta.product_id.as_str()).await?;
    let taken = packages::Entity::find()
        .filter(packages::Column::ProductId.eq(meta.product_id.as_str()))
        .filter(packages::Column::PackageType.eq(meta.package_type.as_str()))
        .filter(packages::Column::Version.eq(meta.version.as_str()))
        .one(&state.db)
        .await?;
    if let Some(p) = taken {
        return Err(Error::Conflict(format!(
            "{} (package {})",
            duplicate(&meta),
            p.id
        )));
    }
    Ok((meta, product))
}

fn duplicate(meta: &PackageMeta) -> String {
    format!(
        "product {} already has a {} with version {}",
        meta.product_id, meta.package_type, meta.version
    )
}

/// A complete object about to get its row.
struct NewRow<'a> {
    id: &'a PackageId,
    meta: &'a PackageMeta,
    product: &'a products::Model,
    digest: &'a Digest256,
    source: &'static str,
    key: &'a ObjectKey,
    region: Option<String>,
}

/// Inserts the row for a complete object; a unique violation (a concurrent upload of the same version won)
/// becomes [`Error::Conflict`].
async fn insert(state: &AppState, project_id: &str, new: NewRow<'_>) -> Result<packages::Model> {
    let NewRow {
        id,
        meta,
        product,
        digest,
        source,
        key,
        region,
    } = new;
    let row = packages::ActiveModel {
        id: Set(id.to_string()),
        project_id: Set(project_id.to_owned()),
        app_id: Set(product.app_id.clone()),
        product_id: Set(meta.product_id.to_string()),
        package_type: Set(meta.package_type.as_str().to_owned()),
        module_name: Set(None),
        version: Set(meta.version.to_string()),
        support_source_versions: Set(serde_json::to_string(&meta.support_source_versions)
            .map_err(|e| Error::Internal(e.to_string()))?),
        description: Set(meta.description.clone()),
        custom_info: Set(meta.custom_info.clone()),
        file_name: Set(meta.file_name.to_string()),
        size: Set(i64::try_from(digest.size).map_err(|_| Error::TooLarge {
            limit: i64::MAX as u64,
        })?),
        sha256: Set(digest.sha256.clone()),
        source: Set(source.to_owned()),
        bucket: Set(state.store.bucket().to_owned()),
        object_key: Set(key.to_string()),
        region: Set(region),
        segment_size: Set(i32::from(meta.segment_size)),
        created_at: Set(state.clock.now().as_millis()),
    };
    row.insert(&state.db)
        .await
        .map_err(|e| crate::storage::conflict_on_unique(e, || duplicate(meta)))
}

/// Uploads a package: validates the metadata, streams `body` into the store (measuring size and SHA-256),
/// then records it. A failed or cancelled upload leaves neither an object nor a row.
///
/// # Errors
/// [`Error::Validation`] (bad metadata, empty or interrupted body); [`Error::NotFound`] (product);
/// [`Error::Conflict`] (same product + type + version); [`Error::TooLarge`]; [`Error::Storage`]; [`Error::Db`].
pub async fn upload<S, E>(
    state: &AppState,
    project_id: &str,
    input: PackageMetaInput,
    body: S,
) -> Result<packages::Model>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
    E: std::fmt::Display,
{
    let (meta, product) = precheck(state, project_id, input).await?;
    let id = PackageId::parse(ids::object_id(state.clock.now()))?;
    let key = ObjectKey::for_upload(&id);
    let digest = state.store.put_stream(&key, body).await?;
    let new = NewRow {
        id: &id,
        meta: &meta,
        product: &product,
        digest: &digest,
        source: SOURCE_UPLOAD,
        key: &key,
        region: None,
    };
    match insert(state, project_id, new).await {
        Ok(row) => {
            tracing::info!(package_id = %id, size = digest.size, sha256 = %digest.sha256, "package uploaded");
            Ok(row)
        }
        Err(e) => {
            if let Err(del) = state.store.delete(&key).await {
                tracing::error!(error.message = %del, key = %key, "removing the object of a refused upload failed");
            }
            Err(e)
        }
    }
}

/// Registers an object already in the bucket (IoTDA `file_location.obs_location`). Size and SHA-256 are
/// read from the object; a `sign` that differs is refused. Deleting the package later leaves the object.
///
/// # Errors
/// [`Error::Validation`] (metadata, another bucket, a key that escapes the store, a missing object, a
/// wrong `sign`); [`Error::NotFound`] (product); [`Error::Conflict`]; [`Error::TooLarge`];
/// [`Error::Storage`]; [`Error::Db`].
pub async fn register(
    state: &AppState,
    project_id: &str,
    mut input: PackageMetaInput,
    object: BucketObject,
) -> Result<packages::Model> {
    let bucket = domain::package::parse_bucket_name(object.bucket_name.trim())?;
    if !state.store.answers_to(bucket) {
        return Err(ValidationError::new(
            "bucket_name",
            format!(
                "bucket {bucket} is not this server's package store; use {}",
                state.store.bucket()
            ),
        )
        .into());
    }
    let key = ObjectKey::parse(&object.object_key)?;
    let sign = object
        .sign
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(domain::package::parse_sha256)
        .transpose()?;
    let region = domain::text::bounded("region_name", &object.region_name, 256, false)?;
    if input.file_name.trim().is_empty() {
        key.file_name().clone_into(&mut input.file_name);
    }
    let (meta, product) = precheck(state, project_id, input).await?;
    let Some(digest) = state.store.digest(&key).await? else {
        return Err(ValidationError::new(
            "object_key",
            format!("no object {key} in bucket {bucket}"),
        )
        .into());
    };
    if digest.size == 0 {
        return Err(ValidationError::new("object_key", format!("object {key} is empty")).into());
    }
    if let Some(sign) = sign
        && sign != digest.sha256
    {
        return Err(ValidationError::new(
            "sign",
            format!("the object's SHA-256 is {}, not {sign}", digest.sha256),
        )
        .into());
    }
    let id = PackageId::parse(ids::object_id(state.clock.now()))?;
    let region = (!region.is_empty()).then_some(region);
    let new = NewRow {
        id: &id,
        meta: &meta,
        product: &product,
        digest: &digest,
        source: SOURCE_BUCKET,
        key: &key,
        region,
    };
    let row = insert(state, project_id, new).await?;
    tracing::info!(package_id = %id, key = %key, size = digest.size, "bucket object registered as a package");
    Ok(row)
}

/// List filters (all optional).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `softwarePackage` or `firmwarePackage`.
    pub package_type: Option<PackageType>,
    /// Only this product's packages.
    pub product_id: Option<String>,
    /// Only this version.
    pub version: Option<String>,
    /// Only this resource space.
    pub app_id: Option<String>,
    /// IoTDA paging: only packages with an id below this one.
    pub marker: Option<String>,
}

/// A package with its product's name.
#[derive(Clone, Debug, PartialEq)]
pub struct PackageRow {
    /// The package.
    pub package: packages::Model,
    /// The product's name.
    pub product_name: String,
}

/// Lists `project_id`'s packages, newest first.
///
/// # Errors
/// [`Error::Db`].
pub async fn list(
    state: &AppState,
    project_id: &str,
    filter: Filter,
    page: Page,
) -> Result<Paged<PackageRow>> {
    let mut query = packages::Entity::find()
        .filter(packages::Column::ProjectId.eq(project_id))
        .order_by_desc(packages::Column::Id);
    if let Some(t) = filter.package_type {
        query = query.filter(packages::Column::PackageType.eq(t.as_str()));
    }
    if let Some(p) = filter.product_id {
        query = query.filter(packages::Column::ProductId.eq(p));
    }
    if let Some(v) = filter.version {
        query = query.filter(packages::Column::Version.eq(v));
    }
    if let Some(a) = filter.app_id {
        query = query.filter(packages::Column::AppId.eq(a));
    }
    // `count` is every matching package; the marker only moves the page.
    let total = query.clone().count(&state.db).await?;
    if let Some(m) = filter.marker {
        query = query.filter(packages::Column::Id.lt(m));
    }
    let items = query
        .limit(page.limit)
        .offset(page.offset)
        .all(&state.db)
        .await?;
    let page = Paged { items, total };
    let names = product_names(
        state,
        page.items.iter().map(|p| p.product_id.clone()).collect(),
    )
    .await?;
    Ok(Paged {
        items: page
            .items
            .into_iter()
            .map(|package| PackageRow {
                product_name: names.get(&package.product_id).cloned().unwrap_or_default(),
                package,
            })
            .collect(),
        total: page.total,
    })
}

async fn product_names(
    state: &AppState,
    ids: Vec<String>,
) -> Result<std::collections::HashMap<String, String>> {
    if ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    Ok(products::Entity::find()
        .filter(products::Column::Id.is_in(ids))
        .all(&state.db)
        .await?
        .into_iter()
        .map(|p| (p.id, p.name))
        .collect())
}

/// One package of `project_id`, with its product's name.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn get(state: &AppState, project_id: &str, package_id: &str) -> Result<PackageRow> {
    let package = find(state, project_id, package_id).await?;
    let product_name = product_names(state, vec![package.product_id.clone()])
        .await?
        .remove(&package.product_id)
        .unwrap_or_default();
    Ok(PackageRow {
        package,
        product_name,
    })
}

async fn find(state: &AppState, project_id: &str, package_id: &str) -> Result<packages::Model> {
    packages::Entity::find_by_id(package_id.to_owned())
        .filter(packages::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("package", package_id))
}

/// Statuses in which a task still needs its package.
const ACTIVE_TASK_STATUSES: [TaskStatus; 4] = [
    TaskStatus::Initializing,
    TaskStatus::Waiting,
    TaskStatus::Processing,
    TaskStatus::Stopping,
];

/// Deletes a package: refused while a task that uses it is still executing. Its download tokens are
/// revoked; an uploaded package's object is deleted, a registered bucket object is left alone.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Conflict`] naming the task; [`Error::Db`].
pub async fn delete(state: &AppState, project_id: &str, package_id: &str) -> Result<()> {
    let package = find(state, project_id, package_id).await?;
    // In one transaction, so a task cannot start using the package between the check and the delete.
    let txn = crate::db::begin_write(&state.db).await?;
    let busy = tasks::Entity::find()
        .filter(tasks::Column::PackageId.eq(package_id))
        .filter(tasks::Column::Status.is_in(ACTIVE_TASK_STATUSES.map(TaskStatus::as_str)))
        .one(&txn)
        .await?;
    if let Some(task) = busy {
        return Err(Error::Conflict(format!(
            "package {package_id} is used by task {} ({}), which is still {}; stop the task or wait for \
             it to finish before deleting the package",
            task.id, task.task_name, task.status
        )));
    }
    let now = state.clock.now().as_millis();
    download_tokens::Entity::update_many()
        .col_expr(download_tokens::Column::RevokedAt, Expr::value(now))
        .filter(download_tokens::Column::PackageId.eq(package_id))
        .filter(download_tokens::Column::RevokedAt.is_null())
        .exec(&txn)
        .await?;
    packages::Entity::delete_by_id(package_id.to_owned())
        .exec(&txn)
        .await?;
    txn.commit().await?;
    if package.source == SOURCE_UPLOAD {
        let key = object_key(&package)?;
        if let Err(e) = state.store.delete(&key).await {
            tracing::error!(error.message = %e, key = %key, "deleting a package's object failed; it is orphaned");
        }
    }
    tracing::info!(package_id, "package deleted");
    Ok(())
}
