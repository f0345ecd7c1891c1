//! `GET /metrics` (Prometheus, README "Metrics") and the HTTP request metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use backend::metrics::{HttpLabels, Metrics, RouteLabels};
use http::{HeaderMap, StatusCode, header};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::ServerState;
use crate::config::MetricsSettings;

/// Who may scrape.
#[derive(Clone, Debug)]
pub struct Access {
    enabled: bool,
    /// The SHA-256 of the bearer token a scraper must send (compared as digests: no timing to learn
    /// the token from).
    token: Option<[u8; 32]>,
}

impl Access {
    /// From the `metrics` settings.
    #[must_use]
    pub fn new(settings: &MetricsSettings) -> Self {
        Self {
            enabled: settings.enabled,
            token: settings
                .token
                .as_ref()
                .map(|t| Sha256::digest(t.expose_secret().as_bytes()).into()),
        }
    }
}

impl Access {
    /// Whether metrics are served (and HTTP requests counted).
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

/// The metrics in the text format; 401 without the configured bearer token, 404 when disabled, 503
/// when the database does not answer (the stored counts could not be read).
pub(super) async fn scrape(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    if !state.metrics.enabled {
        return StatusCode::NOT_FOUND.into_response();
    }
    if let Some(expected) = &state.metrics.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
        if given.as_ref() != Some(expected) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"metrics\"")],
                "metrics need the bearer token configured as metrics.token\n",
            )
                .into_response();
        }
    }
    let metrics = &state.app.metrics;
    metrics
        .downloads_in_flight
        .set(i64::try_from(state.transfers.active()).unwrap_or(i64::MAX));
    match metrics.refresh(&state.app.db).await {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            metrics.encode(),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error.message = %e, "metrics: the stored counts could not be read");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database did not answer\n",
            )
                .into_response()
        }
    }
}

/// Counts a routed request and times it, by its route template (never the path: ids stay out of
/// the labels).
pub(super) async fn track(
    State(metrics): State<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(req).await;
    metrics
        .http_request_seconds
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            code: response.status().as_u16(),
        })
        .inc();
    response
}
