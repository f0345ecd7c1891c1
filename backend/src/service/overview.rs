//! Read-only listings for the Software/Firmware Upgrades page: tasks, newest first (packages are listed
//! by [`super::packages::list`]).

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};

use super::{Page, Paged};
use crate::storage::entity::tasks;
use crate::{AppState, Result};

/// `project_id`'s tasks.
///
/// # Errors
/// [`crate::Error::Db`].
pub async fn tasks(state: &AppState, project_id: &str, page: Page) -> Result<Paged<tasks::Model>> {
    let query = tasks::Entity::find()
        .filter(tasks::Column::ProjectId.eq(project_id))
        .order_by_desc(tasks::Column::Id);
    super::fetch_page(&state.db, query, page).await
}
