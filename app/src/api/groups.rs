//! Device groups: list, create, rename, delete, members.

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use super::PageOf;
use super::devices::DeviceRow;
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

/// A group and one page of its members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// The group.
    pub group: GroupRow,
    /// Its devices.
    pub members: PageOf<DeviceRow>,
}

/// What adding or removing several devices did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    /// Devices added or removed.
    pub changed: u64,
    /// `device: reason` for the others.
    pub refused: Vec<String>,
}

/// The most devices one add or remove takes (one page of the device list is 50).
pub const MAX_CHANGE: usize = 500;

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
    Ok(super::ssr::created(
        backend::service::groups::create(&state, &user.project_id, &name, &description)
            .await?
            .id,
    ))
}

/// Renames a group and sets its description.
#[server(prefix = "/api", endpoint = "rename_group")]
pub async fn rename_group(
    group_id: String,
    name: String,
    description: String,
) -> Result<(), ApiError> {
    let (state, user) = super::ssr::context().await?;
    backend::service::groups::update(
        &state,
        &user.project_id,
        &group_id,
        Some(&name),
        Some(&description),
    )
    .await?;
    Ok(())
}

/// Deletes an empty group.
#[server(prefix = "/api", endpoint = "delete_group")]
pub async fn delete_group(group_id: String) -> Result<(), ApiError> {
    let (state, user) = super::ssr::context().await?;
    backend::service::groups::delete(&state, &user.project_id, &group_id).await?;
    Ok(())
}

/// A group with a page of its members.
#[server(prefix = "/api", endpoint = "group_detail")]
pub async fn group_detail(group_id: String, offset: u64) -> Result<GroupView, ApiError> {
    use backend::service::{ListOrder, Page, groups};
    let (state, user) = super::ssr::context().await?;
    let group = groups::get(&state, &user.project_id, &group_id).await?;
    let limit = super::devices::PAGE_SIZE;
    let members = groups::members(
        &state,
        &user.project_id,
        &group_id,
        Page::new(limit, offset),
        &ListOrder::Natural,
    )
    .await?;
    Ok(GroupView {
        group: GroupRow {
            group_id: group.id,
            name: group.name,
            description: group.description,
            members: members.total,
            created: super::ssr::when(group.created_at),
        },
        members: PageOf {
            items: members.items.into_iter().map(super::devices::row).collect(),
            total: members.total,
            offset,
            limit,
        },
    })
}

/// Adds (`add` true) or removes devices (comma-separated ids) to or from a group.
#[server(prefix = "/api", endpoint = "change_members")]
pub async fn change_members(
    group_id: String,
    device_ids: String,
    add: bool,
) -> Result<MembershipChange, ApiError> {
    use backend::service::groups;
    let (state, user) = super::ssr::context().await?;
    let ids = super::split_ids(&device_ids, "device_ids", MAX_CHANGE)?;
    groups::get(&state, &user.project_id, &group_id).await?;
    let mut out = MembershipChange {
        changed: 0,
        refused: Vec::new(),
    };
    for id in ids {
        let done = if add {
            groups::add_device(&state, &user.project_id, &group_id, &id).await
        } else {
            groups::remove_device(&state, &user.project_id, &group_id, &id).await
        };
        match done {
            Ok(()) => out.changed += 1,
            Err(
                e @ (backend::Error::NotFound { .. }
                | backend::Error::Conflict(_)
                | backend::Error::Validation(_)),
            ) => out.refused.push(format!("{id}: {e}")),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}
