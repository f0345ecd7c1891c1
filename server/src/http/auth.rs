//! Console sign-in and the two guards every request passes.
//!
//! - **Sessions** live in a `__Host-` cookie (Secure, HttpOnly, SameSite=Lax, path `/`, no domain), so it
//!   is sent only over HTTPS to exactly this origin and is invisible to scripts.
//! - **CSRF**: every state-changing request (POST, PUT, PATCH, DELETE) to the console must come from this
//!   origin, proven by `Origin` (or, failing that, `Referer`), which browsers set and pages cannot forge.
//!   SameSite=Lax keeps the cookie off cross-site sub-requests as a second line.

use std::net::SocketAddr;

use axum::Form;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::{Cookie, SameSite};
use backend::service::auth;
use http::{HeaderMap, Method, StatusCode, header};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ServerState, signed};

/// The session cookie's name. The `__Host-` prefix makes browsers enforce Secure, path `/` and no domain.
pub(crate) const SESSION_COOKIE: &str = "__Host-updraft_session";

/// The sign-in form.
#[derive(Deserialize)]
pub(super) struct LoginForm {
    username: String,
    password: SecretString,
    #[serde(default)]
    next: String,
}

/// A local path to return to after sign-in; anything else (`//evil`, `https://...`) becomes `/devices`.
///
/// Browsers drop tabs and line breaks from a `Location` and read a backslash as `/`, so `/<TAB>/evil.example`
/// would become `//evil.example` (another host): a path with any control character, space or backslash
/// is refused whole rather than cleaned.
fn safe_next(next: &str) -> &str {
    let plain = !next
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '\\');
    if plain && next.starts_with('/') && !next.starts_with("//") && !next.starts_with("/auth/") {
        next
    } else {
        "/devices"
    }
}

fn login_redirect(error: &str, next: &str) -> Response {
    let mut url = format!("/login?error={error}");
    if !next.is_empty() {
        url.push_str("&next=");
        url.push_str(&urlencode(next));
    }
    Redirect::to(&url).into_response()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `POST /auth/login`: checks the credentials, sets the session cookie, redirects (303).
pub(super) async fn login(
    State(state): State<ServerState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<LoginForm>,
) -> Response {
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    let addr = peer.ip().to_string();
    let next = safe_next(&form.next).to_owned();
    let username = form.username.trim().to_owned();
    let request_id = super::request_id(&headers);
    let outcome = auth::login(
        &state.app,
        form.username.trim(),
        form.password,
        &state.default_project,
        Some(&addr),
        agent,
    )
    .await;
    let failure = match &outcome {
        Ok(_) => None,
        Err(backend::Error::Unauthorized(_)) => Some("wrong user name or password"),
        Err(backend::Error::RateLimited { .. }) => Some("too many failed sign-ins: throttled"),
        Err(backend::Error::Busy { .. }) => Some("busy"),
        Err(_) => Some("failed"),
    };
    backend::service::audit::record(
        &state.app,
        backend::service::audit::Entry {
            project_id: Some(state.default_project.to_string()),
            actor_type: backend::service::audit::ActorType::User,
            actor: username,
            source: Some(addr.clone()),
            action: "sign-in".to_owned(),
            resource_type: Some("session".to_owned()),
            resource_id: None,
            success: failure.is_none(),
            status: None,
            detail: failure.map(str::to_owned),
            request_id,
        },
    )
    .await;
    match outcome {
        Ok(session) => {
            let cookie = Cookie::build((SESSION_COOKIE, session.token.expose_secret().to_owned()))
                .path("/")
                .secure(true)
                .http_only(true)
                .same_site(SameSite::Lax)
                .build();
            (jar.add(cookie), Redirect::to(&next)).into_response()
        }
        Err(backend::Error::Unauthorized(_)) => login_redirect("invalid", &form.next),
        Err(backend::Error::RateLimited { .. }) => login_redirect("throttled", &form.next),
        Err(backend::Error::Busy { .. }) => login_redirect("busy", &form.next),
        Err(e) => {
            tracing::error!(error.message = %e, error.cause_chain = ?e, "login failed");
            login_redirect("failed", &form.next)
        }
    }
}

/// `POST /auth/logout`: ends the session and clears the cookie.
pub(super) async fn logout(State(state): State<ServerState>, jar: CookieJar) -> Response {
    if let Some(c) = jar.get(SESSION_COOKIE)
        && let Err(e) = auth::logout(&state.app, c.value()).await
    {
        tracing::error!(error.message = %e, "logout failed");
    }
    let removal = Cookie::build((SESSION_COOKIE, ""))
        .path("/")
        .secure(true)
        .http_only(true)
        .build();
    (jar.remove(removal), Redirect::to("/login")).into_response()
}

/// Paths anyone may reach without a session.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/healthz"
            | "/readyz"
            | "/login"
            | "/auth/login"
            | "/favicon.ico"
            | "/v5/openapi.json"
            | "/metrics"
    ) || path.starts_with("/pkg/")
        || path.starts_with("/download/")
        || path.starts_with("/fw/")
}

/// Resolves the session cookie; signed-in requests carry [`auth::CurrentUser`] as an extension. Pages
/// without a session redirect to `/login`; server functions get a 401 in the `ApiError` shape.
pub(super) async fn require_session(
    State(state): State<ServerState>,
    jar: CookieJar,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    if is_public(&path) {
        return next.run(req).await;
    }
    if signed::is_signed(&req) {
        return match signed::authenticate(&state, req).await {
            Ok(req) => next.run(req).await,
            Err(refused) => refused,
        };
    }
    let cookie = jar.get(SESSION_COOKIE).map(|c| c.value().to_owned());
    let failure = match &cookie {
        Some(token) => match auth::authenticate(&state.app, token).await {
            Ok(user) => {
                req.extensions_mut().insert(signed::Caller {
                    project_id: user.project_id.clone(),
                    access_key: None,
                });
                req.extensions_mut().insert(user);
                return next.run(req).await;
            }
            Err(backend::Error::Unauthorized(_)) => "expired",
            Err(e) => {
                tracing::error!(error.message = %e, error.cause_chain = ?e, "session check failed");
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
        },
        None => "",
    };
    if path.starts_with("/v5/") || path == "/events" {
        return super::iotda::IotdaError::unauthorized("not signed in, or the session expired")
            .into_response();
    }
    if path.starts_with("/api/") {
        let body = app::error::ApiError::new(
            app::error::ErrorCode::Unauthorized,
            "not logged in or the session expired",
        );
        return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let next_param = if target == "/" {
        String::new()
    } else {
        format!("next={}", urlencode(target))
    };
    let url = match (failure.is_empty(), next_param.is_empty()) {
        (true, true) => "/login".to_owned(),
        (true, false) => format!("/login?{next_param}"),
        (false, true) => format!("/login?error={failure}"),
        (false, false) => format!("/login?error={failure}&{next_param}"),
    };
    Redirect::to(&url).into_response()
}

/// Refuses state-changing requests that do not come from this origin.
pub(super) async fn same_origin(req: Request, next: Next) -> Response {
    // Signed API calls carry their own proof (see `signed`); no browser adds it cross-site.
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || signed::is_signed(&req)
    {
        return next.run(req).await;
    }
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get(header::REFERER)
                .and_then(|v| v.to_str().ok())
                .and_then(origin_of)
        });
    let same = matches!((host, origin.as_deref()), (Some(h), Some(o)) if o.strip_prefix("https://") == Some(h));
    if same {
        return next.run(req).await;
    }
    tracing::warn!(host = ?host, origin = ?origin, path = %req.uri().path(), "cross-origin request refused");
    if req.uri().path() == "/auth/login" {
        return Redirect::to("/login?error=csrf").into_response();
    }
    let body = app::error::ApiError::new(
        app::error::ErrorCode::Unauthorized,
        "cross-origin request refused",
    );
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

/// `https://host:port/path?x` → `https://host:port`.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    Some(format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed_after_login() {
        assert_eq!(safe_next("/groups?x=1"), "/groups?x=1");
        assert_eq!(safe_next("//evil.example"), "/devices");
        assert_eq!(safe_next("/\\evil.example"), "/devices");
        assert_eq!(safe_next("/\t/evil.example"), "/devices");
        assert_eq!(safe_next("/\n/evil.example"), "/devices");
        assert_eq!(safe_next("/ /evil.example"), "/devices");
        assert_eq!(safe_next("/groups/\\x"), "/devices");
        assert_eq!(safe_next("https://evil.example"), "/devices");
        assert_eq!(safe_next(""), "/devices");
    }

    #[test]
    fn the_api_document_is_public_and_the_api_is_not() {
        assert!(is_public("/v5/openapi.json"));
        assert!(!is_public("/v5/iot/p1/batchtasks"));
        assert!(!is_public("/v5/openapi.json/x"));
    }

    #[test]
    fn referer_origins_are_extracted() {
        assert_eq!(
            origin_of("https://127.0.0.1:8443/login?x").as_deref(),
            Some("https://127.0.0.1:8443")
        );
        assert_eq!(origin_of("nonsense"), None);
    }
}
