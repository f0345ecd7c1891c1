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
