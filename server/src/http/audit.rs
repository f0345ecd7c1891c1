//! The audit trail of the HTTP surface (README, "Audit trail"): every state-changing API call and
//! console action is recorded with who made it (the signed-in user, or the access key that signed
//! it), from where, on what, and how it ended; and `GET /v5/iot/{project_id}/audit-logs` lists them.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use backend::service::audit::{self, ActorType, Entry, Filter};
use backend::service::auth::CurrentUser;
use backend::storage::entity::audit_logs;
use domain::Timestamp;
use http::Method;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ServerState;
use super::iotda::{IotdaError, IotdaErrorBody};
use super::signed::{Caller, project};

/// Console server functions that change something (the others only read).
const CONSOLE_CHANGES: &[&str] = &[
    "create_",
    "delete_",
    "rename_",
    "register_",
    "import_",
    "change_",
    "retry_",
    "stop_",
    "revoke_",
    "upload_",
    "resume_",
];

/// Records the request when it changes something: an API call with a method other than GET, HEAD or
/// OPTIONS, or a console server function in [`CONSOLE_CHANGES`]. Sign-in is recorded by its handler.
pub(super) async fn record_changes(
    State(state): State<ServerState>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let console = path
        .strip_prefix("/api/")
        .filter(|f| CONSOLE_CHANGES.iter().any(|p| f.starts_with(p)))
        .map(str::to_owned);
    let changes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    let api = path.starts_with("/v5/") && changes;
    if console.is_none() && !api {
        return next.run(req).await;
    }
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let (actor_type, actor, project_id) = who(&req);
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let request_id = super::request_id(req.headers());
    let (action, resource_type, resource_id) = match &console {
        Some(function) => {
            // The answer is read for its error message: asked for uncompressed (it is a few bytes).
            req.headers_mut().remove(http::header::ACCEPT_ENCODING);
            let (kind, id_field) = console_resource(function);
            let id = match id_field {
                Some(field) => {
                    let (back, id) = form_field(req, field).await;
                    req = back;
                    id
                }
                None => None,
            };
            (format!("console {function}"), kind.map(str::to_owned), id)
        }
        None => {
            let template = template.clone().unwrap_or_else(|| path.clone());
            let (kind, id) = resource(&template, &path);
            (format!("{method} {template}"), kind, id)
        }
    };
    let response = next.run(req).await;
    let status = response.status();
    let resource_id = resource_id.or_else(|| created_id(&response));
    let (response, detail) = if status.is_success() || status.is_redirection() {
        (response, None)
    } else {
        error_detail(response).await
    };
    audit::record(
        &state.app,
        Entry {
            project_id,
            actor_type,
            actor,
            source,
            action,
            resource_type,
            resource_id,
            success: status.is_success() || status.is_redirection(),
            status: Some(status.as_u16()),
            detail,
            request_id,
        },
    )
    .await;
    response
}

/// The id of the resource the answer says was created.
fn created_id(response: &Response) -> Option<String> {
    response
        .headers()
        .get(audit::RESOURCE_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The kind of resource a console function acts on, named as the API names it (so one filter finds
/// the API's, the console's and the command line's entries), and the form field carrying its id:
/// `stop_task` acts on `batchtasks`, the one in `task_id`.
fn console_resource(function: &str) -> (Option<&'static str>, Option<&'static str>) {
    const KINDS: &[(&str, &str, Option<&str>)] = &[
        ("product", "products", Some("product_id")),
        ("device", "devices", Some("device_id")),
        ("devices", "devices", None),
        ("package", "packages", Some("package_id")),
        ("task", "batchtasks", Some("task_id")),
        ("group", "device-group", Some("group_id")),
        ("members", "device-group", Some("group_id")),
        ("credential", "credentials", Some("access_key")),
        ("subscription", "subscriptions", Some("subscription_id")),
        ("password", "users", None),
    ];
    let suffix = function.split_once('_').map_or(function, |(_, k)| k);
    KINDS
        .iter()
        .find(|(s, _, _)| *s == suffix)
        .map_or((None, None), |(_, kind, field)| (Some(*kind), *field))
}

/// Console forms larger than this are not searched for the resource's id (only a CSV import is).
const FORM_BODY_LIMIT: u64 = 64 * 1024;

/// The value of `field` in a URL-encoded form body, and the request with its body put back. Bodies
/// without a declared length within [`FORM_BODY_LIMIT`] are passed on unread.
async fn form_field(req: Request, field: &str) -> (Request, Option<String>) {
    let small = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n <= FORM_BODY_LIMIT);
    let form = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    if !small || !form {
        return (req, None);
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::try_from(FORM_BODY_LIMIT).unwrap_or(0)).await
    else {
        // The declared length was a lie; the function would have refused the body anyway.
        return (Request::from_parts(parts, axum::body::Body::empty()), None);
    };
    let id = url::form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == field)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty());
    (
        Request::from_parts(parts, axum::body::Body::from(bytes)),
        id,
    )
}

/// Error answers above this size are recorded by their status alone (they are never this large).
const ERROR_BODY_LIMIT: usize = 16 * 1024;

/// Why a call failed, as its answer said it: IoTDA's `error_code: error_msg`, or the console's message
/// and field messages; the status's reason when the body says nothing readable. The answer is passed
/// on unchanged.
async fn error_detail(response: Response) -> (Response, Option<String>) {
    let status = response.status();
    let fallback = status.canonical_reason().map(str::to_owned);
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, ERROR_BODY_LIMIT).await else {
        // Only a body larger than the limit ends here; it is consumed, so answer with the status.
        return (parts.status.into_response(), fallback);
    };
    let detail = error_message(&bytes).or(fallback);
    (
        Response::from_parts(parts, axum::body::Body::from(bytes)),
        detail,
    )
}

/// The message in an error body of the API (`error_code`, `error_msg`) or of the console (`message`,
/// `fields`).
fn error_message(body: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(msg) = json.get("error_msg").and_then(|m| m.as_str()) {
        let code = json
            .get("error_code")
            .and_then(|c| c.as_str())
            .unwrap_or("");
        return Some(format!("{code}: {msg}"));
    }
    let message = json.get("message")?.as_str()?;
    let fields: Vec<String> = json
        .get("fields")
        .and_then(|f| f.as_object())
        .map(|f| {
            f.iter()
                .filter_map(|(k, v)| Some(format!("{k}: {}", v.as_str()?)))
                .collect()
        })
        .unwrap_or_default();
    Some(if fields.is_empty() {
        message.to_owned()
    } else {
        format!("{message} ({})", fields.join("; "))
    })
}

/// Who is asking: the console user, the application (its access key), or nobody.
fn who(req: &Request) -> (ActorType, String, Option<String>) {
    if let Some(user) = req.extensions().get::<CurrentUser>() {
        return (
            ActorType::User,
            user.username.clone(),
            Some(user.project_id.clone()),
        );
    }
    if let Some(caller) = req.extensions().get::<Caller>() {
        return (
            ActorType::Application,
            caller
                .access_key
                .clone()
                .unwrap_or_else(|| "unknown".to_owned()),
            Some(caller.project_id.clone()),
        );
    }
    (ActorType::Anonymous, "-".to_owned(), None)
}

/// The resource a route acts on: the last `{param}` of its template (not the project) and the
/// segment naming its kind before it (`/batchtasks/{task_id}/stop` → `batchtasks`, the task's id);
/// a template without one acts on the collection its last segment names (a creation).
fn resource(template: &str, path: &str) -> (Option<String>, Option<String>) {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    let named = (1..t.len())
        .rev()
        .find(|&i| t[i].starts_with('{') && t[i] != "{project_id}" && !t[i].starts_with("{*"));
    match named {
        Some(i) => (Some(t[i - 1].to_owned()), p.get(i).map(|s| (*s).to_owned())),
        None => (
            t.iter()
                .rev()
                .find(|s| !s.is_empty() && !s.starts_with('{'))
                .map(|s| (*s).to_owned()),
            None,
        ),
    }
}

/// Which audit entries to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditQuery {
    /// Only this actor's: a console user name, an access key, or the command line's user.
    actor: Option<String>,
    /// Only on this kind of resource (`batchtasks`, `packages`, `devices`, `products`, `device-group`,
    /// `credentials`, `session`...).
    resource_type: Option<String>,
    /// Only on this resource (its id).
    resource_id: Option<String>,
    /// From this time (ms since the epoch, inclusive).
    start_time: Option<i64>,
    /// Before this time (ms since the epoch).
    end_time: Option<i64>,
    /// Entries skipped, newest first (default 0).
    offset: Option<u64>,
    /// How many, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

/// One recorded action.
#[derive(Serialize, ToSchema)]
#[schema(as = AuditLog)]
struct AuditLogJson {
    /// The entry's id.
    id: i64,
    /// When, UTC (`yyyyMMddTHHmmssZ`).
    time: String,
    /// When, ms since the epoch.
    time_ms: i64,
    /// `user` (console), `application` (an access key), `cli` (the command line) or `anonymous`.
    actor_type: String,
    /// The user name, access key or the command line's user.
    actor: String,
    /// The client address.
    source: Option<String>,
    /// What was asked: `POST /v5/iot/{project_id}/batchtasks`, `console create_task`, `sign-in`,
    /// `cli task create`...
    action: String,
    /// The kind of resource acted on.
    resource_type: Option<String>,
    /// The resource's id, when the request named it.
    resource_id: Option<String>,
    /// `success` or `failure`.
    result: String,
    /// The HTTP status answered.
    status: Option<i32>,
    /// Why it failed.
    detail: Option<String>,
    /// The request's `X-Request-Id`.
    request_id: Option<String>,
}

impl From<audit_logs::Model> for AuditLogJson {
    fn from(m: audit_logs::Model) -> Self {
        Self {
            id: m.id,
            time: Timestamp::from_millis(m.at).to_compact(),
            time_ms: m.at,
            actor_type: m.actor_type,
            actor: m.actor,
            source: m.source,
            action: m.action,
            resource_type: m.resource_type,
            resource_id: m.resource_id,
            result: m.result,
            status: m.status,
            detail: m.detail,
            request_id: m.request_id,
        }
    }
}

/// A page of the audit trail.
#[derive(Serialize, ToSchema)]
struct AuditList {
    /// Newest first.
    audit_logs: Vec<AuditLogJson>,
    /// Every match, and the page asked for.
    page: AuditPage,
}

/// Where a page of the audit trail is.
#[derive(Serialize, ToSchema)]
struct AuditPage {
    /// Entries matching in all.
    count: u64,
    offset: u64,
    limit: u64,
}

#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/audit-logs",
    operation_id = "ListAuditLogs",
    tag = "audit",
    summary = "List the audit trail (Updraft's)",
    description = "Every state-changing action of the console, the API and the command line, and every \
                   sign-in: who, from where, what, on which resource, when and how it ended. Newest \
                   first; kept for `audit.retention` (180 days by default).",
    params(("project_id" = String, Path, description = "The project."), AuditQuery),
    responses(
        (status = 200, description = "A page of entries.", body = AuditList),
        (status = 400, description = "A bad `limit` or an unknown parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such project.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(IotdaError::bad_request("limit must be 1-500"));
    }
    let filter = Filter {
        actor: q.actor,
        resource_type: q.resource_type,
        resource_id: q.resource_id,
        from: q.start_time,
        to: q.end_time,
        offset: q.offset.unwrap_or(0),
        limit,
    };
    let (rows, count) = audit::list(&state.app, &project_id, &filter).await?;
    Ok(Json(AuditList {
        audit_logs: rows.into_iter().map(AuditLogJson::from).collect(),
        page: AuditPage {
            count,
            offset: filter.offset,
            limit,
        },
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::resource;

    #[test]
    fn the_resource_is_the_last_named_segment_of_the_route() {
        let of = |t: &str, p: &str| resource(t, p);
        assert_eq!(
            of(
                "/v5/iot/{project_id}/batchtasks/{task_id}/stop",
                "/v5/iot/p1/batchtasks/t9/stop"
            ),
            (Some("batchtasks".into()), Some("t9".into()))
        );
        assert_eq!(
            of("/v5/iot/{project_id}/batchtasks", "/v5/iot/p1/batchtasks"),
            (Some("batchtasks".into()), None)
        );
        assert_eq!(
            of(
                "/v5/iot/{project_id}/ota-upgrades/packages/{package_id}",
                "/v5/iot/p1/ota-upgrades/packages/k2"
            ),
            (Some("packages".into()), Some("k2".into()))
        );
    }
}
