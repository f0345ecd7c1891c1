//! `/healthz` (the process is up) and `/readyz` (it can serve: the database answers).

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use super::ServerState;

/// Liveness: always 200 while the process runs.
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 when the database answers a query, 503 otherwise.
pub(super) async fn readyz(State(state): State<ServerState>) -> (StatusCode, Json<Value>) {
    match state.app.db.execute_unprepared("SELECT 1").await {
        Ok(_) => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "database": "ok" })),
        ),
        Err(e) => {
            tracing::warn!(error.message = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "unavailable", "database": "unreachable" })),
            )
        }
    }
}
