//! The HTTPS surface: health checks, console sign-in, the server-rendered console with its server
//! functions, the static bundle under `/pkg`, the application API under `/v5/iot` with its OpenAPI
//! document (`/v5/openapi.json`), and package downloads.
//!
//! Request flow: request id → trace span → security headers → same-origin check (unsafe methods) →
//! session check → handler.

mod audit;
mod auth;
mod batchtasks;
mod devices;
mod download;
mod events;
mod groups;
pub mod guards;
mod health;
pub mod iotda;
pub mod metrics;
mod openapi;
mod packages;
mod paging;
mod products;
mod routing;
mod signed;
mod spaces;
mod subscriptions;

pub use download::Transfers;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::{get, post};
use backend::AppState;
use http::HeaderValue;
use http::header;
use leptos::prelude::{LeptosOptions, provide_context};
use leptos_axum::{LeptosRoutes, generate_route_list};
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// The router's state.
#[derive(Clone, Debug)]
pub struct ServerState {
    /// Leptos' rendering options (site root, bundle name).
    pub leptos: LeptosOptions,
    /// The services.
    pub app: AppState,
    /// The project console sessions work in.
    pub default_project: Arc<str>,
    /// Running downloads (they share a read budget).
    pub transfers: Arc<Transfers>,
    /// Cancelled when the server shuts down: long-lived responses (event streams) end with it.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Per-client limits (event streams, unauthenticated bodies).
    pub guards: Arc<guards::Guards>,
    /// `GET /metrics`: served at all, and the bearer token a scraper must send.
    pub metrics: metrics::Access,
}

impl FromRef<ServerState> for LeptosOptions {
    fn from_ref(s: &ServerState) -> Self {
        s.leptos.clone()
    }
}

/// The header carrying the request id (also returned on every response).
pub const REQUEST_ID: &str = "x-request-id";

/// The request id of a request (set by the request-id layer before any handler runs).
fn request_id(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `/metrics` alone, for `metrics.listen` (plain HTTP inside a private network; the token still applies
/// when set).
pub fn metrics_router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::scrape))
        .with_state(state)
}

/// Builds the router.
pub fn router(state: ServerState) -> Router {
    let routes = generate_route_list(app::App);
    let app_state = state.app.clone();
    let leptos_options = state.leptos.clone();
    let x_request_id = header::HeaderName::from_static(REQUEST_ID);

    let console = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/auth/login", post(auth::login))
        .route("/auth/logout", post(auth::logout))
        .leptos_routes_with_context(
            &state,
            routes,
            move || {
                provide_context(app_state.clone());
                provide_context(openapi::console_document());
            },
            move || app::shell(leptos_options.clone()),
        )
        .fallback(leptos_axum::file_and_error_handler::<ServerState, _>(
            app::shell,
        ))
        // gzip for pages, JSON and the wasm bundle (7 MB → about 2 MB on the wire).
        .layer(CompressionLayer::new())
        .layer(TimeoutLayer::with_status_code(
            http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(60),
        ));

    // The API and downloads have no global timeout: an upload or a download over a slow link may take
    // hours. Downloads are never compressed (devices need the exact Content-Length).
    let timeout =
        TimeoutLayer::with_status_code(http::StatusCode::REQUEST_TIMEOUT, Duration::from_secs(60));
    let packages_path = "/v5/iot/{project_id}/ota-upgrades/packages";
    let api = Router::new()
        .route(
            packages_path,
            get(packages::list)
                .layer(timeout)
                .post(packages::create)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            &format!("{packages_path}/{{package_id}}"),
            get(packages::show).delete(packages::delete).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/batchtasks",
            get(batchtasks::list)
                .post(batchtasks::create)
                // Tens of thousands of `targets`.
                .layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(16 * 1024 * 1024))
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/batchtasks/{task_id}",
            get(batchtasks::show)
                .delete(batchtasks::delete)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/batchtasks/{task_id}/stop",
            post(batchtasks::stop).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/batchtasks/{task_id}/retry",
            post(batchtasks::retry).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/batchtasks/{task_id}/confirm",
            post(batchtasks::confirm).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/batchtasks/{task_id}/resume",
            post(batchtasks::resume).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/devices",
            get(devices::list_devices)
                .post(devices::add_device)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/devices/{device_id}",
            get(devices::show_device)
                .put(devices::update_device)
                .delete(devices::delete_device)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/devices/{device_id}/freeze",
            post(devices::freeze_device).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/devices/{device_id}/unfreeze",
            post(devices::unfreeze_device).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/device-group",
            get(groups::list_groups)
                .post(groups::add_group)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/device-group/{group_id}",
            get(groups::show_group)
                .put(groups::update_group)
                .delete(groups::delete_group)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/device-group/{group_id}/action",
            post(groups::group_action).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/device-group/{group_id}/devices",
            get(groups::group_devices).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/products",
            get(products::list_products)
                .post(products::add_product)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/products/{product_id}",
            get(products::show_product)
                .put(products::update_product)
                .delete(products::delete_product)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/apps",
            get(spaces::list).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/apps/{app_id}",
            get(spaces::show).layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/routing-rule/rules",
            get(routing::list_rules)
                .post(routing::create_rule)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/routing-rule/rules/{rule_id}",
            get(routing::show_rule)
                .put(routing::update_rule)
                .delete(routing::delete_rule)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/routing-rule/actions",
            get(routing::list_actions)
                .post(routing::create_action)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/routing-rule/actions/{action_id}",
            get(routing::show_action)
                .put(routing::update_action)
                .delete(routing::delete_action)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/subscriptions",
            get(subscriptions::list)
                .post(subscriptions::create)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/subscriptions/{subscription_id}",
            get(subscriptions::show)
                .delete(subscriptions::delete)
                .layer(timeout),
        )
        .route(
            "/v5/iot/{project_id}/subscriptions/{subscription_id}/deliveries",
            get(subscriptions::deliveries).layer(timeout),
        )
        // Live console updates; outside the console router's timeout and compression.
        .route("/events", get(events::stream))
        .route("/download/{*path}", get(download::download))
        .route("/fw/{token}", get(download::download))
        .route("/v5/openapi.json", get(openapi::document).layer(timeout))
        .route("/metrics", get(metrics::scrape).layer(timeout))
        .route(
            "/v5/iot/{project_id}/audit-logs",
            get(audit::list).layer(timeout),
        );

    let mut app = api
        .merge(console)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record_changes,
        ));
    if state.metrics.enabled() {
        // Routed requests only, where the route template is known.
        app = app.route_layer(axum::middleware::from_fn_with_state(
            state.app.metrics.clone(),
            metrics::track,
        ));
    }
    app.layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_session))
        .layer(axum::middleware::from_fn(auth::same_origin))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .layer(SetResponseHeaderLayer::if_not_present(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .layer(SetResponseHeaderLayer::if_not_present(header::REFERRER_POLICY, HeaderValue::from_static("same-origin")))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &http::Request<_>| {
                let matched = req.extensions().get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_owned());
                let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), matched_path = matched, request_id = %id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .layer(axum::middleware::from_fn_with_state(state.transfers.clone(), download::admit))
        .with_state(state)
}
