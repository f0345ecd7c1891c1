//! IoTDA-style errors (`{"error_code": "IOTDA.…", "error_msg": "…"}` with the matching HTTP status) for the
//! REST API and downloads. The request id travels in `X-Request-Id`, set for every response by the router.
//!
//! IoTDA's own codes keep IoTDA's meanings; what IoTDA has no public code for is `UPDRAFT.000<status>`.
//!
//! | status | error_code | when |
//! |---|---|---|
//! | 400 | `IOTDA.000006` | invalid input (the message names the field) |
//! | 400 | `IOTDA.000008` | a body that is not JSON, or JSON that does not parse (IoTDA: "bad request") |
//! | 400 | `IOTDA.000009` | a time that is not `yyyyMMddTHHmmssZ` |
//! | 400 | `IOTDA.000010` | a start time after the end time |
//! | 400 | `IOTDA.000017` | `limit` out of range |
//! | 401 | `IOTDA.000002` | missing, malformed, expired or revoked credentials or token |
//! | 403 | `IOTDA.000003` | authenticated, but not allowed (another project, another package's token) |
//! | 404 | `IOTDA.000005` | no such resource |
//! | 409 | `IOTDA.000007` | conflicts with existing state (duplicate version, package in use) |
//! | 413 | `UPDRAFT.000413` | larger than allowed |
//! | 415 | `IOTDA.000008` | unsupported `Content-Type` (IoTDA's "bad request": a wrong media type) |
//! | 416 | `UPDRAFT.000416` | a `Range` that cannot be served |
//! | 429 | `UPDRAFT.000429` | too many requests |
//! | 500 | `IOTDA.000001` | our fault; the cause is in the server log under the request id |
//! | 503 | `UPDRAFT.000503` | the server is at one of its limits; `Retry-After` says when to try again |

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

/// An error response in IoTDA's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IotdaError {
    /// HTTP status.
    pub status: StatusCode,
    /// `IOTDA.xxxxxx`.
    pub code: &'static str,
    /// A sentence for the caller.
    pub message: String,
    /// Seconds for a `Retry-After` header (503).
    pub retry_after: Option<u64>,
}

/// The body of every error response: what [`IotdaError`] answers, and its schema in the OpenAPI document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct IotdaErrorBody {
    /// `IOTDA.000006` invalid input, `IOTDA.000008` a malformed body or wrong media type, `IOTDA.000009`
    /// a bad time, `IOTDA.000010` start after end, `IOTDA.000017` `limit` out of range, `IOTDA.000002`
    /// credentials, `IOTDA.000003` not allowed, `IOTDA.000005` not found, `IOTDA.000007` conflict,
    /// `IOTDA.000001` internal error; Updraft's own: `UPDRAFT.000413` too large, `UPDRAFT.000416` bad
    /// `Range`, `UPDRAFT.000429` too many requests, `UPDRAFT.000503` busy (with `Retry-After`).
    #[schema(example = "IOTDA.000006")]
    pub error_code: String,
    /// What was wrong, in words (names the field for invalid input).
    #[schema(example = "task_type is required")]
    pub error_msg: String,
}

impl IotdaError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 503 with `Retry-After`: the server is at a limit, not failing.
    pub fn busy(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        Self {
            retry_after: Some(retry_after.as_secs().max(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, BUSY_CODE, message)
        }
    }

    /// 429: this caller holds too much of something.
    pub fn too_many(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "UPDRAFT.000429", message)
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "IOTDA.000006", message)
    }

    /// 400 `IOTDA.000008`: a body that is not JSON, or does not parse.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "IOTDA.000008", message)
    }

    /// A body `serde_json` could not read: `IOTDA.000008` when it is not JSON, `IOTDA.000006` when it is
    /// JSON that does not fit (a missing field, a wrong type).
    pub fn json(e: serde_json::Error) -> Self {
        if e.is_data() {
            Self::bad_request(format!("invalid body: {e}"))
        } else {
            Self::malformed(format!("invalid JSON body: {e}"))
        }
    }

    /// 400 `IOTDA.000009`: a time in the wrong format.
    pub fn bad_time(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "IOTDA.000009", message)
    }

    /// 400 `IOTDA.000010`: a start time after the end time.
    pub fn start_after_end(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "IOTDA.000010", message)
    }

    /// 400 `IOTDA.000017`: `limit` out of range.
    pub fn bad_limit(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "IOTDA.000017", message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "IOTDA.000002", message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "IOTDA.000003", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "IOTDA.000005", message)
    }

    /// 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "UPDRAFT.000413", message)
    }

    /// 415.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "IOTDA.000008", message)
    }

    /// 416.
    pub fn range_not_satisfiable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::RANGE_NOT_SATISFIABLE, "UPDRAFT.000416", message)
    }

    /// 500, after logging `cause`.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error.message = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "IOTDA.000001",
            "internal error; see the server log for this request id",
        )
    }
}

impl From<backend::Error> for IotdaError {
    fn from(e: backend::Error) -> Self {
        use backend::Error as E;
        match &e {
            E::Validation(v) => Self::bad_request(v.to_string()),
            E::NotFound { .. } => Self::not_found(e.to_string()),
            E::Conflict(m) => Self::new(StatusCode::CONFLICT, "IOTDA.000007", m.clone()),
            E::Unauthorized(m) => Self::unauthorized(*m),
            E::TooLarge { .. } => Self::too_large(e.to_string()),
            E::RateLimited { .. } => Self::too_many(e.to_string()),
            E::Busy { retry_after, .. } => Self::busy(e.to_string(), *retry_after),
            E::Db(_) | E::Secrets(_) | E::Storage(_) | E::Internal(_) => Self::internal(&e),
        }
    }
}

impl IntoResponse for IotdaError {
    fn into_response(self) -> Response {
        let body = IotdaErrorBody {
            error_code: self.code.to_owned(),
            error_msg: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        response
    }
}

/// `201 Created` with `body`, naming the new resource's `id` in `X-Resource-Id` (the audit trail records
/// it; README, "Audit trail").
pub(super) fn created(id: &str, body: impl Serialize) -> Response {
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(value) = http::HeaderValue::from_str(id) {
        response
            .headers_mut()
            .insert(backend::service::audit::RESOURCE_ID_HEADER, value);
    }
    response
}

/// The code of a 503 answer.
const BUSY_CODE: &str = "UPDRAFT.000503";

impl From<JsonRejection> for IotdaError {
    /// JSON that parses but does not fit (a missing field, a wrong type) is invalid input
    /// (`IOTDA.000006`); a body that is not JSON is IoTDA's "bad request" (`IOTDA.000008`), with 415 when
    /// the `Content-Type` says it is not JSON.
    fn from(e: JsonRejection) -> Self {
        match e {
            JsonRejection::JsonDataError(_) => Self::bad_request(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => Self::unsupported_media_type(e.body_text()),
            _ => Self::malformed(e.body_text()),
        }
    }
}

/// A JSON body, or IoTDA's 400 for one that does not parse or fit.
pub(super) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, IotdaError> {
    Ok(b?.0)
}

/// `{ "body": "..." }`, what IoTDA's freeze, unfreeze and membership operations answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ActionResult)]
pub(super) struct Done {
    /// What happened: `frozen`, `unfrozen`, `added` or `removed`.
    body: &'static str,
}

/// Answers [`Done`].
pub(super) fn done(message: &'static str) -> Response {
    Json(Done { body: message }).into_response()
}
