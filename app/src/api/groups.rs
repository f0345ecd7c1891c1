//! Device groups: list and create.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use super::PageOf;
use crate::error::ApiError;

/// A group as the Groups table shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRow {
    /// Group id.
    pub group_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Member count.
    pub members: u64,
    /// Creation time.
    pub created: String,
}

/// Lists groups by name.
#[server(prefix = "/api", endpoint = "list_groups")]
pub async fn list_groups() -> Result<PageOf<GroupRow>, ApiError> {
    use backend::service::{Page, groups};
    let (state, user) = super::ssr::context().await?;
    let page = groups::list(&state, &user.project_id, Page::new(500, 0)).await?;
    Ok(PageOf {
        items: page
            .items
            .into_iter()
            .map(|r| GroupRow {
                group_id: r.group.id,
                name: r.group.name,
                description: r.group.description,
                members: r.members,
                created: super::ssr::when(r.group.created_at),
            })
            .collect(),
        total: page.total,
        offset: 0,
        limit: 500,
    })
}

/// Creates a static group.
#[server(prefix = "/api", endpoint = "create_group")]
pub async fn create_group(name: String, description: String) -> Result<String, ApiError> {
    let (state, user) = super::ssr::context().await?;
    Ok(
        backend::service::groups::create(&state, &user.project_id, &name, &description)
            .await?
            .id,
    )
}
