//! A project's resource spaces (IoTDA's applications), as devices and products name them.

use std::collections::HashMap;

use backend::storage::entity::applications;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use super::ServerState;
use super::iotda::IotdaError;

/// Resource-space names by id (every project has a handful).
pub(super) async fn app_names(
    state: &ServerState,
    project_id: &str,
) -> Result<HashMap<String, String>, IotdaError> {
    Ok(applications::Entity::find()
        .filter(applications::Column::ProjectId.eq(project_id))
        .all(&state.app.db)
        .await
        .map_err(backend::Error::from)?
        .into_iter()
        .map(|a| (a.id, a.name))
        .collect())
}

/// `app_id` must be one of the project's resource spaces when given.
pub(super) async fn check_app(
    state: &ServerState,
    project_id: &str,
    app_id: Option<&str>,
) -> Result<(), IotdaError> {
    let Some(app_id) = app_id.map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok(());
    };
    if app_names(state, project_id).await?.contains_key(app_id) {
        Ok(())
    } else {
        Err(IotdaError::bad_request(format!(
            "app_id: unknown resource space {app_id}"
        )))
    }
}

/// IoTDA's `ApplicationDTO`: one resource space.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = ApplicationDTO)]
pub(crate) struct ApplicationJson {
    /// The resource space's id (the `app_id` other calls take).
    app_id: String,
    /// Its name.
    app_name: String,
    /// When it was created (`yyyyMMddTHHmmssZ`, UTC).
    create_time: String,
    /// Whether it is the project's default resource space.
    default_app: bool,
}

impl From<applications::Model> for ApplicationJson {
    fn from(a: applications::Model) -> Self {
        Self {
            create_time: domain::Timestamp::from_millis(a.created_at).to_compact(),
            app_id: a.id,
            app_name: a.name,
            default_app: a.is_default,
        }
    }
}

/// `ShowApplications`' answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = ShowApplicationsResponse)]
struct ApplicationList {
    /// The project's resource spaces.
    applications: Vec<ApplicationJson>,
}

/// `ShowApplications` query parameters.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ApplicationsQuery {
    /// `true`: only the default resource space; `false`: only the others.
    default_app: Option<String>,
}

/// `GET /v5/iot/{project_id}/apps`: how a client finds its `app_id`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/apps",
    operation_id = "ShowApplications",
    tag = "apps",
    summary = "List the project's resource spaces",
    params(("project_id" = String, Path, description = "The project."), ApplicationsQuery),
    responses(
        (status = 200, description = "The resource spaces, oldest first.", body = ApplicationList),
        (status = 400, description = "`default_app` is not `true` or `false`.", body = super::iotda::IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = super::iotda::IotdaErrorBody),
    ),
)]
pub(super) async fn list(
    axum::extract::State(state): axum::extract::State<ServerState>,
    axum::extract::Path(project_id): axum::extract::Path<String>,
    caller: Option<axum::Extension<super::signed::Caller>>,
    axum::extract::Query(q): axum::extract::Query<ApplicationsQuery>,
) -> Result<axum::response::Response, IotdaError> {
    use axum::response::IntoResponse;
    use sea_orm::QueryOrder;
    let project_id = super::signed::project(caller.as_deref(), &project_id)?;
    let default_app = match q.default_app.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) if v.eq_ignore_ascii_case("true") => Some(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Some(false),
        Some(v) => {
            return Err(IotdaError::bad_request(format!(
                "default_app: {v:?} is not true or false"
            )));
        }
    };
    let mut query = applications::Entity::find()
        .filter(applications::Column::ProjectId.eq(project_id.as_str()))
        .order_by_asc(applications::Column::CreatedAt);
    if let Some(d) = default_app {
        query = query.filter(applications::Column::IsDefault.eq(d));
    }
    let applications = query
        .all(&state.app.db)
        .await
        .map_err(backend::Error::from)?
        .into_iter()
        .map(ApplicationJson::from)
        .collect();
    Ok(axum::Json(ApplicationList { applications }).into_response())
}

/// `GET /v5/iot/{project_id}/apps/{app_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/apps/{app_id}",
    operation_id = "ShowApplication",
    tag = "apps",
    summary = "Show a resource space",
    params(
        ("project_id" = String, Path, description = "The project."),
        ("app_id" = String, Path, description = "The resource space."),
    ),
    responses(
        (status = 200, description = "The resource space.", body = ApplicationJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = super::iotda::IotdaErrorBody),
        (status = 404, description = "No such resource space in this project.", body = super::iotda::IotdaErrorBody),
    ),
)]
pub(super) async fn show(
    axum::extract::State(state): axum::extract::State<ServerState>,
    axum::extract::Path((project_id, app_id)): axum::extract::Path<(String, String)>,
    caller: Option<axum::Extension<super::signed::Caller>>,
) -> Result<axum::response::Response, IotdaError> {
    use axum::response::IntoResponse;
    let project_id = super::signed::project(caller.as_deref(), &project_id)?;
    let app = applications::Entity::find_by_id(app_id.clone())
        .filter(applications::Column::ProjectId.eq(project_id.as_str()))
        .one(&state.app.db)
        .await
        .map_err(backend::Error::from)?
        .ok_or_else(|| IotdaError::not_found(format!("resource space {app_id} not found")))?;
    Ok(axum::Json(ApplicationJson::from(app)).into_response())
}
