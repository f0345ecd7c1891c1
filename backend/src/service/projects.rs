//! Projects (tenants) and their default resource space.

use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};

use crate::storage::entity::{applications, projects};
use crate::{AppState, Error, Result, ids};

/// The name of the project created on first start.
pub const DEFAULT_PROJECT: &str = "default";

/// Returns the default project, creating it (with its default resource space) on first start.
///
/// # Errors
/// [`Error::Db`] when the database fails.
pub async fn ensure_default(state: &AppState) -> Result<projects::Model> {
    if let Some(p) = projects::Entity::find()
        .filter(projects::Column::Name.eq(DEFAULT_PROJECT))
        .one(&state.db)
        .await?
    {
        return Ok(p);
    }
    create(state, DEFAULT_PROJECT).await
}

/// Creates a project named `name`, with its default resource space (application).
///
/// # Errors
/// [`crate::Error::Db`] (a taken name is a unique-key error).
pub async fn create(state: &AppState, name: &str) -> Result<projects::Model> {
    let now = state.clock.now().as_millis();
    let txn = crate::db::begin_write(&state.db).await?;
    let project = projects::ActiveModel {
        id: Set(ids::hex32()),
        name: Set(name.to_owned()),
        created_at: Set(now),
    }
    .insert(&txn)
    .await?;
    applications::ActiveModel {
        id: Set(ids::object_id(state.clock.now())),
        project_id: Set(project.id.clone()),
        name: Set("DefaultApp".to_owned()),
        is_default: Set(true),
        created_at: Set(now),
    }
    .insert(&txn)
    .await?;
    txn.commit().await?;
    tracing::info!(project_id = %project.id, name, "created a project");
    Ok(project)
}

/// The default resource space of `project_id`.
///
/// # Errors
/// [`Error::NotFound`] when the project has none; [`Error::Db`].
pub async fn default_app(state: &AppState, project_id: &str) -> Result<applications::Model> {
    applications::Entity::find()
        .filter(applications::Column::ProjectId.eq(project_id))
        .order_by_desc(applications::Column::IsDefault)
        .order_by_asc(applications::Column::CreatedAt)
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("application", project_id))
}
