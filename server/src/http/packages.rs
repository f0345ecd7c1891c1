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
use backend::service::Page;
use backend::service::packages::{self, BucketObject, Filter, PackageRow};

use super::signed::Caller;
use domain::Timestamp;
use domain::package::{PackageMetaInput, PackageType};
use http::{StatusCode, header};
use serde::{Deserialize, Serialize};

use super::ServerState;
use super::iotda::IotdaError;

/// Checks that the caller works in the project the path names.
/// The path's project, if it is the caller's. Another project is "not found", so ids do not leak.
pub(crate) fn project(caller: Option<&Caller>, project_id: &str) -> Result<String, IotdaError> {
    let caller = caller.ok_or_else(|| IotdaError::unauthorized("not signed in"))?;
    if caller.project_id == project_id {
        Ok(project_id.to_owned())
    } else {
        Err(IotdaError::not_found(format!(
            "project {project_id} does not exist"
        )))
    }
}

/// `obs_location`, as IoTDA spells it.
#[derive(Debug, Default, Deserialize, Serialize)]
pub(crate) struct ObsLocation {
    #[serde(default)]
    region_name: String,
    #[serde(default)]
    bucket_name: String,
    #[serde(default)]
    object_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sign_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sign: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
pub(crate) struct FileLocation {
    #[serde(default)]
    obs_location: Option<ObsLocation>,
}

/// IoTDA's `CreateOtaPackage` body, plus Updraft's optional `file_name` and `segment_size`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    app_id: Option<String>,
    package_type: String,
    product_id: String,
    #[serde(default)]
    module_name: Option<String>,
    version: String,
    #[serde(default)]
    support_source_versions: Vec<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    custom_info: String,
    file_location: FileLocation,
    #[serde(default)]
    file_name: String,
    #[serde(default)]
    segment_size: Option<u16>,
}

/// A package as IoTDA returns it (`OtaPackageInfo`, with `file_location` on create and show), plus
/// Updraft's `file_name`, `file_size`, `segment_size` and `source`.
#[derive(Debug, Serialize)]
pub(crate) struct PackageJson {
    package_id: String,
    app_id: String,
    package_type: String,
    product_id: String,
    product_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    module_name: Option<String>,
    version: String,
    support_source_versions: Vec<String>,
    description: String,
    custom_info: String,
    create_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_location: Option<FileLocation>,
    file_name: String,
    file_size: i64,
    segment_size: i32,
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
            .map_err(|e| IotdaError::bad_request(e.body_text()))?;
        upload(&state, &project_id, multipart).await?
    } else if content_type.starts_with("application/json") {
        let body = axum::body::to_bytes(req.into_body(), 1024 * 1024)
            .await
            .map_err(|e| IotdaError::bad_request(format!("reading the body: {e}")))?;
        let body: CreateBody = serde_json::from_slice(&body)
            .map_err(|e| IotdaError::bad_request(format!("invalid JSON body: {e}")))?;
        register(&state, &project_id, body).await?
    } else {
        return Err(IotdaError::unsupported_media_type(
            "send application/json (register a bucket object) or multipart/form-data (upload a file)",
        ));
    };
    let row = packages::get(&state.app, &project_id, &row.id).await?;
    Ok((StatusCode::CREATED, Json(PackageJson::new(row, true))).into_response())
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

async fn upload(
    state: &ServerState,
    project_id: &str,
    mut multipart: axum::extract::Multipart,
) -> Result<backend::storage::entity::packages::Model, IotdaError> {
    let mut meta = PackageMetaInput::default();
    let bad = |e: axum::extract::multipart::MultipartError| IotdaError::bad_request(e.body_text());
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
        let value = field.text().await.map_err(bad)?;
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
            "segment_size" | "app_id" => {}
            other => {
                return Err(IotdaError::bad_request(format!(
                    "unknown form field {other:?}"
                )));
            }
        }
    }
    Err(IotdaError::bad_request(
        "file: missing; send the package as the last part, named \"file\"",
    ))
}

/// `ListOtaPackageInfo` query parameters.
#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    #[serde(default)]
    package_type: Option<String>,
    #[serde(default)]
    product_id: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    app_id: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    marker: Option<String>,
    #[serde(default)]
    offset: Option<String>,
}

/// IoTDA's `page`.
#[derive(Serialize)]
pub(crate) struct PageInfo {
    pub(crate) count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) marker: Option<String>,
}

#[derive(Serialize)]
struct ListBody {
    packages: Vec<PackageJson>,
    page: PageInfo,
}

/// Parses IoTDA's `limit` (1-50, default 10), `offset` (0-500, default 0) and `marker` (24 hex digits).
pub(crate) fn paging(
    limit: Option<&str>,
    offset: Option<&str>,
    marker: Option<&str>,
) -> Result<(Page, Option<String>), IotdaError> {
    let number =
        |name: &str, v: Option<&str>, default: u64, range: std::ops::RangeInclusive<u64>| match v
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| {
                    IotdaError::bad_request(format!(
                        "{name}: must be an integer from {} to {}",
                        range.start(),
                        range.end()
                    ))
                }),
        };
    let limit = number("limit", limit, 10, 1..=50)?;
    let offset = number("offset", offset, 0, 0..=500)?;
    let marker = match marker.map(str::trim).filter(|m| !m.is_empty()) {
        None => None,
        Some(m) if m.len() == 24 && m.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(m.to_ascii_lowercase())
        }
        Some(_) => {
            return Err(IotdaError::bad_request(
                "marker: must be 24 hexadecimal digits (the id of the last record of the previous page)",
            ));
        }
    };
    Ok((Page::new(limit, offset), marker))
}

/// `GET /v5/iot/{project_id}/ota-upgrades/packages`.
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
pub(super) async fn delete(
    State(state): State<ServerState>,
    Path((project_id, package_id)): Path<(String, String)>,
    caller: Option<axum::Extension<Caller>>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    packages::delete(&state.app, &project_id, &package_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
