//! Signed `/v5` requests: applications authenticate with an AK/SK credential and Huawei's
//! `SDK-HMAC-SHA256` (or `V11-HMAC-SHA256`) signature instead of a console session (`iotda-api.md` §1).
//!
//! A `/v5` request that carries `Authorization` is judged by its signature alone (never by a cookie as
//! well), so the console's same-origin rule does not apply to it: no browser attaches such a header to a
//! cross-site request. Every refusal is a 401 in IoTDA's error shape, saying what was wrong.

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use backend::service::credentials::{self, Refusal};
use http::header;
use protocol::apisign::{self, UNSIGNED_PAYLOAD};

use super::ServerState;
use super::iotda::IotdaError;

/// The largest signed body buffered to hash it (CreateBatchTask with tens of thousands of targets).
/// Multipart uploads are signed with `UNSIGNED-PAYLOAD` and stream instead.
const MAX_SIGNED_BODY: usize = 16 * 1024 * 1024;

/// How long a signed request's body may take to arrive (it is read before the handler's timeout).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Who is calling the `/v5` API, set by the session or signature check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The project the caller works in.
    pub project_id: String,
    /// The access key, for signed requests.
    pub access_key: Option<String>,
}

/// Whether the request is an application's signed API call.
pub(super) fn is_signed(req: &Request) -> bool {
    req.uri().path().starts_with("/v5/") && req.headers().contains_key(header::AUTHORIZATION)
}

/// The `{project_id}` of a `/v5/iot/{project_id}/...` path.
fn path_project(path: &str) -> Option<&str> {
    let mut segments = path.strip_prefix("/v5/iot/")?.split('/');
    segments.next().filter(|p| !p.is_empty())
}

/// Checks a signed request; on success the request (its body restored) carries a [`Caller`].
///
/// Work before the signature is known good is bounded: the key, date and project are checked before the
/// body is read; a declared `Content-Length` over [`MAX_SIGNED_BODY`] is refused before it is read; a
/// request that declares its body's hash (`X-Sdk-Content-Sha256`) has its signature checked before the
/// body is read; and other bodies are buffered only within a budget shared by all callers
/// ([`super::guards::UNAUTHENTICATED_BODY_BYTES`]; past it, 503 with `Retry-After`).
pub(super) async fn authenticate(state: &ServerState, req: Request) -> Result<Request, Response> {
    let (mut parts, body) = req.into_parts();
    let text = |name: &str| -> Option<String> {
        parts
            .headers
            .get(name)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .map(str::to_owned)
    };
    let Some(authorization) = text("authorization") else {
        return Err(unauthorized("Authorization is not valid UTF-8"));
    };
    let skew = state.app.settings.api_signature_skew;
    let sdk_date = text("x-sdk-date");
    let active =
        match credentials::admit(&state.app, &authorization, sdk_date.as_deref(), skew).await {
            Ok(Ok(active)) => active,
            Ok(Err(refusal)) => return Err(refused(&refusal, parts.uri.path())),
            Err(e) => return Err(IotdaError::from(e).into_response()),
        };
    for claimed in [
        text("x-project-id").as_deref(),
        path_project(parts.uri.path()),
    ]
    .into_iter()
    .flatten()
    {
        if claimed != active.project_id {
            return Err(refused(
                &Refusal::Project(claimed.to_owned()),
                parts.uri.path(),
            ));
        }
    }

    let declared = text("x-sdk-content-sha256");
    let multipart = text("content-type").is_some_and(|t| {
        t.trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/")
    });
    let length = text("content-length").and_then(|l| l.trim().parse::<u64>().ok());
    let empty = length == Some(0);
    if length.is_some_and(|n| n > MAX_SIGNED_BODY as u64) && !multipart {
        return Err(too_large());
    }
    // A declared hash is signed with: the signature is checked on it before the body is read.
    let declared_hash = declared
        .as_deref()
        .filter(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) && !empty)
        .map(str::to_ascii_lowercase);
    if let Some(hash) = &declared_hash {
        verify(state, &parts, &active, &authorization, hash).await?;
    }
    let (body, payload_hash) = if declared.as_deref() == Some(UNSIGNED_PAYLOAD) && !empty {
        if !multipart {
            return Err(unauthorized(
                "X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD is accepted for multipart uploads only",
            ));
        }
        (body, UNSIGNED_PAYLOAD.to_owned())
    } else {
        // Room for the body among all bodies being read before their signature is checked (a body
        // whose hash was signed and checked above is the caller's own).
        let _room = if declared_hash.is_some() {
            None
        } else {
            let want = length.map_or(MAX_SIGNED_BODY, |n| {
                usize::try_from(n).unwrap_or(MAX_SIGNED_BODY)
            });
            match state.guards.body(want) {
                Some(room) => Some(room),
                None => {
                    return Err(IotdaError::busy(
                        "too many signed request bodies are being received; try again shortly",
                        std::time::Duration::from_secs(1),
                    )
                    .into_response());
                }
            }
        };
        let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_SIGNED_BODY));
        let bytes = match read.await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(_)) => return Err(too_large()),
            Err(_) => return Err(unauthorized("the request body did not arrive in time")),
        };
        let actual = apisign::payload_hash(&bytes, None);
        if let Some(d) = declared.as_deref()
            && !bytes.is_empty()
            && !d.eq_ignore_ascii_case(&actual)
        {
            return Err(unauthorized(
                "X-Sdk-Content-Sha256 is not the body's SHA-256",
            ));
        }
        (Body::from(bytes), actual)
    };
    if declared_hash.is_none() {
        verify(state, &parts, &active, &authorization, &payload_hash).await?;
    }
    parts.extensions.insert(Caller {
        project_id: active.project_id.clone(),
        access_key: Some(active.access_key.clone()),
    });
    Ok(Request::from_parts(parts, body))
}

fn too_large() -> Response {
    IotdaError::too_large(format!(
        "a signed request body may be at most {MAX_SIGNED_BODY} bytes"
    ))
    .into_response()
}

/// Checks the signature of the request whose head is `parts` and whose body hashes to `payload_hash`.
async fn verify(
    state: &ServerState,
    parts: &http::request::Parts,
    active: &credentials::Active,
    authorization: &str,
    payload_hash: &str,
) -> Result<(), Response> {
    // HTTP/2 carries the host in the URI (`:authority`), not in a Host header.
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    let lookup = |name: &str| {
        let value = parts
            .headers
            .get(name)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok());
        if value.is_none() && name == "host" {
            return authority.as_deref();
        }
        value
    };
    let signed = apisign::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        header: &lookup,
        payload_hash,
    };
    match credentials::verify(&state.app, active, authorization, &signed).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(refusal)) => Err(refused(&refusal, parts.uri.path())),
        Err(e) => Err(IotdaError::from(e).into_response()),
    }
}

fn refused(refusal: &Refusal, path: &str) -> Response {
    tracing::info!(reason = %refusal, path, "signed request refused");
    unauthorized(&refusal.to_string())
}

fn unauthorized(message: &str) -> Response {
    IotdaError::unauthorized(message).into_response()
}

/// The signed caller, when the request was signed (what the `/v5` handlers take).
pub(super) type Ext = Option<axum::Extension<Caller>>;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_project_is_the_third_segment() {
        assert_eq!(path_project("/v5/iot/p1/batchtasks"), Some("p1"));
        assert_eq!(path_project("/v5/iot/p1"), Some("p1"));
        assert_eq!(path_project("/v5/iot//x"), None);
        assert_eq!(path_project("/v5/openapi.json"), None);
    }
}
