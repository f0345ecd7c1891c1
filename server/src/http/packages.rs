//! `/v5/iot/{project_id}/ota-upgrades/packages`: IoTDA's OTA package API, plus a multipart upload on the
//! same `POST` (chosen by `Content-Type`).
//!
//! - `POST` with `application/json`: IoTDA `CreateOtaPackage`, registering an object already in the bucket
//!   (`file_location.obs_location`).
//! - `POST` with `multipart/form-data`: an upload. Text fields (`package_type`, `product_id`, `version`,
//!   `support_source_versions` (repeated or comma-separated), `description`, `custom_info`, `file_name`,
//!   `segment_size`) come first, then the `file` part, which is streamed to the store.
//! - `GET` (list, `ListOtaPackageInfo`), `GET /{package_id}` (`ShowOtaPackage`), `DELETE /{package_id}`.

use axum::Json;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use backend::service::packages::{self, BucketObject, Filter, PackageRow};

use super::signed::Caller;
use domain::Timestamp;
use domain::package::{PackageMetaInput, PackageType};
use http::{StatusCode, header};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ServerState;
use super::iotda::{IotdaError, IotdaErrorBody};
use super::paging::{PageInfo, paging};
use super::signed::project;

/// `obs_location`, as IoTDA spells it: an object in the package bucket.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
pub(crate) struct ObsLocation {
    /// The bucket's region (informational).
    #[serde(default)]
    region_name: String,
    /// The bucket; must be the one Updraft stores packages in.
    #[serde(default)]
    bucket_name: String,
    /// The object's key in the bucket.
    #[serde(default)]
    object_key: String,
    /// How `sign` was computed: only `SHA256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sign_method: Option<String>,
    /// The object's SHA-256 (hex); checked when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sign: Option<String>,
}

/// Where a package's file is (`file_location`).
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
pub(crate) struct FileLocation {
    /// The bucket object.
    #[serde(default)]
    obs_location: Option<ObsLocation>,
}

/// IoTDA's `CreateOtaPackage` body, plus Updraft's optional `file_name` and `segment_size`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = CreateOtaPackage)]
struct CreateBody {
    /// The resource space; when given, it must be the product's.
    #[serde(default)]
    app_id: Option<String>,
    /// `softwarePackage` or `firmwarePackage`.
    package_type: String,
    /// The product the package is for.
    product_id: String,
    /// Not supported (OTA modules): a request with it is refused.
    #[serde(default)]
    module_name: Option<String>,
    /// The version the package upgrades to.
    version: String,
    /// The versions it may upgrade from (empty: any).
    #[serde(default)]
    support_source_versions: Vec<String>,
    /// A description.
    #[serde(default)]
    description: String,
    /// Passed to devices with the upgrade.
    #[serde(default)]
    custom_info: String,
    /// The object in the bucket.
    file_location: FileLocation,
    /// The file name devices download it as (default: the object key's last segment).
    #[serde(default)]
    file_name: String,
    /// The PCP download segment size in bytes, 32-500 (default 500).
    #[serde(default)]
    segment_size: Option<u16>,
}

/// A multipart upload: the text fields first, then the `file` part, which is streamed to the store.
// Only the schema: `upload` reads the parts one by one, as they arrive.
#[derive(ToSchema)]
#[schema(as = UploadOtaPackage)]
#[expect(
    dead_code,
    reason = "the schema of a multipart body that is parsed part by part"
)]
struct UploadForm {
    /// `softwarePackage` or `firmwarePackage`.
    package_type: String,
    /// The product the package is for.
    product_id: String,
    /// The version the package upgrades to.
    version: String,
    /// The versions it may upgrade from (empty: any): the field repeated, or comma-separated.
    #[serde(default)]
    support_source_versions: Vec<String>,
    /// A description.
    #[serde(default)]
    description: String,
    /// Passed to devices with the upgrade.
    #[serde(default)]
    custom_info: String,
    /// The file name devices download it as (default: the `file` part's file name).
    #[serde(default)]
    file_name: String,
    /// The PCP download segment size in bytes, 32-500 (default 500).
    #[serde(default)]
    segment_size: Option<u16>,
    /// The package itself: the last part.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    file: String,
}

/// A package as IoTDA returns it (`OtaPackageInfo`, with `file_location` on create and show), plus
/// Updraft's `file_name`, `file_size`, `segment_size` and `source`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = OtaPackageInfo)]
pub(crate) struct PackageJson {
    /// The package's id.
    package_id: String,
    /// The resource space.
    app_id: String,
    /// `softwarePackage` or `firmwarePackage`.
    package_type: String,
    /// The product.
    product_id: String,
    /// The product's name.
    product_name: String,
    /// Never set (OTA modules are not supported).
    #[serde(skip_serializing_if = "Option::is_none")]
    module_name: Option<String>,
    /// The version it upgrades to.
    version: String,
    /// The versions it may upgrade from (empty: any).
    support_source_versions: Vec<String>,
    /// A description.
    description: String,
    /// Passed to devices with the upgrade.
    custom_info: String,
    /// When it was created (`yyyyMMddTHHmmssZ`, UTC).
    create_time: String,
    /// Where the file is (on create and show, not in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    file_location: Option<FileLocation>,
    /// The file name devices download it as.
    file_name: String,
    /// The file's size in bytes.
    file_size: i64,
    /// The PCP download segment size in bytes.
    segment_size: i32,
    /// `upload` or `bucket`: how the file arrived.
    source: String,
}

impl PackageJson {
    fn new(row: PackageRow, with_location: bool) -> Self {
        let p = row.package;
        let file_location = with_location.then(|| FileLocation {
            obs_location: Some(ObsLocation {
                region_name: p.region.clone().unwrap_or_default(),
                bucket_name: p.bucket.clone(),
                object_key: p.object_key.clone(),
                sign_method: Some("SHA256".to_owned()),
                sign: Some(p.sha256.clone()),
            }),
        });
        Self {
            support_source_versions: serde_json::from_str(&p.support_source_versions)
                .unwrap_or_default(),
            create_time: Timestamp::from_millis(p.created_at).to_compact(),
            package_id: p.id,
            app_id: p.app_id,
            package_type: p.package_type,
            product_id: p.product_id,
            product_name: row.product_name,
            module_name: p.module_name,
            version: p.version,
            description: p.description,
            custom_info: p.custom_info,
            file_location,
            file_name: p.file_name,
            file_size: p.size,
            segment_size: p.segment_size,
            source: p.source,
        }
    }
}

/// `POST /v5/iot/{project_id}/ota-upgrades/packages`: JSON registers a bucket object, multipart uploads.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/ota-upgrades/packages",
    operation_id = "CreateOtaPackage",
    tag = "packages",
    summary = "Create a package",
    description = "`application/json` registers an object already in the bucket (IoTDA's \
                   CreateOtaPackage); `multipart/form-data` uploads the file: the text fields first, \
                   then the `file` part, which is streamed to the store (sign it with `UNSIGNED-PAYLOAD`).",
    params(("project_id" = String, Path, description = "The project.")),
    request_body(
        description = "A bucket location (JSON) or the file itself (multipart).",
        content(
            (CreateBody = "application/json"),
            (UploadForm = "multipart/form-data"),
        ),
    ),
    responses(
        (status = 201, description = "The package, with its file location.", body = PackageJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or product.", body = IotdaErrorBody),
        (status = 409, description = "The product already has a package of this type and version.", body = IotdaErrorBody),
        (status = 413, description = "The file is larger than allowed.", body = IotdaErrorBody),
        (status = 415, description = "Neither `application/json` nor `multipart/form-data`.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn create(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    req: Request,
) -> Result<Response, IotdaError> {
    let project_id = project(req.extensions().get::<Caller>(), &project_id)?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let row = if content_type.starts_with("multipart/form-data") {
        let multipart = axum::extract::Multipart::from_request(req, &state)
            .await
            .map_err(|e| IotdaError::malformed(e.body_text()))?;
        upload(&state, &project_id, multipart).await?
    } else if content_type.starts_with("application/json") {
        let body = axum::body::to_bytes(req.into_body(), 1024 * 1024)
            .await
            .map_err(|e| IotdaError::bad_request(format!("reading the body: {e}")))?;
        let body: CreateBody = serde_json::from_slice(&body).map_err(IotdaError::json)?;
        register(&state, &project_id, body).await?
    } else {
        return Err(IotdaError::unsupported_media_type(
            "send application/json (register a bucket object) or multipart/form-data (upload a file)",
        ));
    };
    let row = packages::get(&state.app, &project_id, &row.id).await?;
    Ok(super::iotda::created(
        &row.package.id.clone(),
        PackageJson::new(row, true),
    ))
}

async fn register(
    state: &ServerState,
    project_id: &str,
    body: CreateBody,
) -> Result<backend::storage::entity::packages::Model, IotdaError> {
    if body.module_name.is_some() {
        return Err(IotdaError::bad_request(
            "module_name: OTA modules (modulePackage) are not supported",
        ));
    }
    let Some(obs) = body.file_location.obs_location else {
        return Err(IotdaError::bad_request(
            "file_location.obs_location is required (bucket_name, object_key)",
        ));
    };
    if let Some(m) = obs.sign_method.as_deref()
        && !m.eq_ignore_ascii_case("SHA256")
    {
        return Err(IotdaError::bad_request(
            "sign_method: only SHA256 is supported",
        ));
    }
    let product =
        backend::service::products::get(&state.app, project_id, body.product_id.trim()).await?;
    if let Some(app) = body
        .app_id
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
        && app != product.app_id
    {
        return Err(IotdaError::bad_request(format!(
            "app_id: product {} belongs to resource space {}, not {app}",
            product.id, product.app_id
        )));
    }
    let meta = PackageMetaInput {
        package_type: body.package_type,
        product_id: body.product_id,
        version: body.version,
        support_source_versions: body.support_source_versions,
        description: body.description,
        custom_info: body.custom_info,
        file_name: body.file_name,
        segment_size: body.segment_size,
    };
    let object = BucketObject {
        region_name: obs.region_name,
        bucket_name: obs.bucket_name,
        object_key: obs.object_key,
        sign: obs.sign,
    };
    Ok(packages::register(&state.app, project_id, meta, object).await?)
}

/// The text parts of an upload form (the file comes last).
const TEXT_FIELDS: [&str; 9] = [
    "package_type",
    "product_id",
    "version",
    "support_source_versions",
    "description",
    "custom_info",
    "file_name",
    "segment_size",
    "app_id",
];

/// The most bytes of one text part (`custom_info` may have 4 096 characters of up to 4 bytes each).
const MAX_TEXT_FIELD: usize = 16 * 1024;

/// Reads a text part, refusing it as soon as it grows past [`MAX_TEXT_FIELD`].
async fn text_field(
    mut field: axum::extract::multipart::Field<'_>,
    name: &str,
) -> Result<String, IotdaError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| IotdaError::malformed(e.body_text()))?
    {
        if bytes.len() + chunk.len() > MAX_TEXT_FIELD {
            return Err(IotdaError::bad_request(format!(
                "{name}: at most {MAX_TEXT_FIELD} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes).map_err(|_| IotdaError::bad_request(format!("{name}: not UTF-8")))
}

async fn upload(
    state: &ServerState,
    project_id: &str,
    mut multipart: axum::extract::Multipart,
) -> Result<backend::storage::entity::packages::Model, IotdaError> {
    let mut meta = PackageMetaInput::default();
    let bad = |e: axum::extract::multipart::MultipartError| IotdaError::malformed(e.body_text());
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            if [&meta.package_type, &meta.product_id, &meta.version]
                .iter()
                .any(|v| v.trim().is_empty())
            {
                return Err(IotdaError::bad_request(
                    "package_type, product_id and version must come before the file part",
                ));
            }
            if meta.file_name.trim().is_empty() {
                meta.file_name = field.file_name().unwrap_or_default().to_owned();
            }
            return Ok(packages::upload(&state.app, project_id, meta, field).await?);
        }
        if !TEXT_FIELDS.contains(&name.as_str()) {
            // Refused by name, before a byte of its value is read.
            return Err(IotdaError::bad_request(format!(
                "unknown form field {name:?}"
            )));
        }
        let value = text_field(field, &name).await?;
        match name.as_str() {
            "package_type" => meta.package_type = value,
            "product_id" => meta.product_id = value,
            "version" => meta.version = value,
            "support_source_versions" => meta.support_source_versions.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned),
            ),
            "description" => meta.description = value,
            "custom_info" => meta.custom_info = value,
            "file_name" => meta.file_name = value,
            "segment_size" if !value.trim().is_empty() => {
                meta.segment_size = Some(value.trim().parse().map_err(|_| {
                    IotdaError::bad_request("segment_size: must be a number from 32 to 500")
                })?);
            }
            _ => {}
        }
    }
    Err(IotdaError::bad_request(
        "file: missing; send the package as the last part, named \"file\"",
    ))
}

/// `ListOtaPackageInfo` query parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only this type: `softwarePackage` or `firmwarePackage`.
    #[serde(default)]
    package_type: Option<String>,
    /// Only this product's packages.
    #[serde(default)]
    product_id: Option<String>,
    /// Only this version.
    #[serde(default)]
    version: Option<String>,
    /// Only this resource space.
    #[serde(default)]
    app_id: Option<String>,
    /// Page size, 1-50 (default 10).
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// The `page.marker` of the previous page (24 hex digits): records after it, by descending id.
    #[serde(default)]
    #[param(pattern = "^[0-9a-fA-F]{24}$")]
    marker: Option<String>,
    /// Records to skip after the marker, 0-500 (default 0).
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
}

/// `ListOtaPackageInfo`'s answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ListOtaPackageInfoResponse)]
struct ListBody {
    /// This page's packages, newest first (without `file_location`).
    packages: Vec<PackageJson>,
    /// Paging.
    page: PageInfo,
}

/// `GET /v5/iot/{project_id}/ota-upgrades/packages`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/ota-upgrades/packages",
    operation_id = "ListOtaPackageInfo",
    tag = "packages",
    summary = "List packages",
    params(("project_id" = String, Path, description = "The project."), ListQuery),
    responses(
        (status = 200, description = "A page of packages.", body = ListBody),
        (status = 400, description = "An invalid filter or paging parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, marker) = paging(q.limit.as_deref(), q.offset.as_deref(), q.marker.as_deref())?;
    let package_type = q
        .package_type
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(PackageType::parse)
        .transpose()
        .map_err(|e| IotdaError::bad_request(e.to_string()))?;
    let nonempty = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let filter = Filter {
        package_type,
        product_id: nonempty(q.product_id),
        version: nonempty(q.version),
        app_id: nonempty(q.app_id),
        marker,
    };
    let result = packages::list(&state.app, &project_id, filter, page).await?;
    let marker = result.items.last().map(|r| r.package.id.clone());
    let body = ListBody {
        packages: result
            .items
            .into_iter()
            .map(|r| PackageJson::new(r, false))
            .collect(),
        page: PageInfo {
            count: result.total,
            marker,
        },
    };
    Ok(Json(body).into_response())
}

/// `GET /v5/iot/{project_id}/ota-upgrades/packages/{package_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/ota-upgrades/packages/{package_id}",
    operation_id = "ShowOtaPackage",
    tag = "packages",
    summary = "Show a package",
    params(
        ("project_id" = String, Path, description = "The project."),
        ("package_id" = String, Path, description = "The package."),
    ),
    responses(
        (status = 200, description = "The package, with its file location.", body = PackageJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or package.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn show(
    State(state): State<ServerState>,
    Path((project_id, package_id)): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let row = packages::get(&state.app, &project_id, &package_id).await?;
    Ok(Json(PackageJson::new(row, true)).into_response())
}

/// `DELETE /v5/iot/{project_id}/ota-upgrades/packages/{package_id}`: 204.
#[utoipa::path(
    delete,
    path = "/v5/iot/{project_id}/ota-upgrades/packages/{package_id}",
    operation_id = "DeleteOtaPackage",
    tag = "packages",
    summary = "Delete a package",
    params(
        ("project_id" = String, Path, description = "The project."),
        ("package_id" = String, Path, description = "The package."),
    ),
    responses(
        (status = 204, description = "Deleted: an uploaded file is removed from the store, a registered bucket object is left alone."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project or package.", body = IotdaErrorBody),
        (status = 409, description = "A task that is still executing uses the package.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn delete(
    State(state): State<ServerState>,
    Path((project_id, package_id)): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    packages::delete(&state.app, &project_id, &package_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
