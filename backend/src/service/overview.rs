//! Read-only listings for the Software/Firmware Upgrades page: packages and tasks, newest first.

use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect};

use super::{Page, Paged};
use crate::storage::entity::{packages, tasks};
use crate::{AppState, Result};

/// `project_id`'s packages.
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn packages(
    state: &AppState,
    project_id: &str,
    page: Page,
) -> Result<Paged<packages::Model>> {
    let query = packages::Entity::find().filter(packages::Column::ProjectId.eq(project_id));
    let total = query.clone().count(&state.db).await?;
    let items = query
        .order_by_desc(packages::Column::Id)
        .limit(page.limit)
        .offset(page.offset)
        .all(&state.db)
        .await?;
    Ok(Paged { items, total })
}

/// `project_id`'s tasks.
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn tasks(state: &AppState, project_id: &str, page: Page) -> Result<Paged<tasks::Model>> {
    let query = tasks::Entity::find().filter(tasks::Column::ProjectId.eq(project_id));
    let total = query.clone().count(&state.db).await?;
    let items = query
        .order_by_desc(tasks::Column::Id)
        .limit(page.limit)
        .offset(page.offset)
        .all(&state.db)
        .await?;
    Ok(Paged { items, total })
}
