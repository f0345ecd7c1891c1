//! Device groups (static).

use domain::text;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};

use super::{ListOrder, Page, Paged};
use crate::storage::entity::{device_group_members, device_groups};
use crate::{AppState, Error, Result, ids};

/// A group with its member count.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRow {
    /// The group.
    pub group: device_groups::Model,
    /// How many devices it holds.
    pub members: u64,
}

/// Creates a static group in `project_id`'s default resource space.
///
/// # Errors
/// [`Error::Validation`]; [`Error::Conflict`] for a taken name; [`Error::Db`].
pub async fn create(
    state: &AppState,
    project_id: &str,
    name: &str,
    description: &str,
) -> Result<device_groups::Model> {
    let name = text::bounded("name", name, 64, true)?;
    let description = text::bounded("description", description, 64, false)?;
    let app = super::projects::default_app(state, project_id).await?;
    let now = state.clock.now().as_millis();
    device_groups::ActiveModel {
        id: Set(ids::uuid_like()),
        project_id: Set(project_id.to_owned()),
        app_id: Set(app.id),
        name: Set(name.clone()),
        description: Set(description),
        super_group_id: Set(None),
        group_type: Set("STATIC".to_owned()),
        dynamic_group_rule: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(&state.db)
    .await
    .map_err(|e| {
        crate::storage::conflict_on_unique(e, || format!("a group named {name} already exists"))
    })
}

/// Lists `project_id`'s groups by name.
///
/// # Errors
/// [`Error::Db`].
pub async fn list(state: &AppState, project_id: &str, page: Page) -> Result<Paged<GroupRow>> {
    list_ordered(state, project_id, &super::ListOrder::Natural, page).await
}

/// [`list`] in the given order.
///
/// # Errors
/// [`Error::Db`].
pub async fn list_ordered(
    state: &AppState,
    project_id: &str,
    order: &super::ListOrder,
    page: Page,
) -> Result<Paged<GroupRow>> {
    let query = order.apply(
        device_groups::Entity::find().filter(device_groups::Column::ProjectId.eq(project_id)),
        device_groups::Column::Id,
        |q| q.order_by_asc(device_groups::Column::Name),
    );
    let page = super::fetch_ordered(&state.db, query, page).await?;
    let ids = page.items.iter().map(|g| g.id.clone()).collect();
    let counts = super::count_by::<device_group_members::Entity, _>(
        &state.db,
        device_group_members::Column::GroupId,
        ids,
    )
    .await?;
    let items = page
        .items
        .into_iter()
        .map(|group| GroupRow {
            members: counts.get(&group.id).copied().unwrap_or(0),
            group,
        })
        .collect();
    Ok(Paged {
        items,
        total: page.total,
    })
}

/// Adds `device_id` to `group_id` (idempotent).
///
/// # Errors
/// [`Error::NotFound`] when the group or device is not in this project; [`Error::Db`].
pub async fn add_device(
    state: &AppState,
    project_id: &str,
    group_id: &str,
    device_id: &str,
) -> Result<()> {
    device_groups::Entity::find_by_id(group_id.to_owned())
        .filter(device_groups::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("group", group_id))?;
    crate::storage::entity::devices::Entity::find_by_id(device_id.to_owned())
        .filter(crate::storage::entity::devices::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("device", device_id))?;
    let res = device_group_members::ActiveModel {
        group_id: Set(group_id.to_owned()),
        device_id: Set(device_id.to_owned()),
        added_at: Set(state.clock.now().as_millis()),
    }
    .insert(&state.db)
    .await;
    match res {
        Ok(_) => Ok(()),
        Err(e) if crate::storage::is_unique_violation(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// One group of `project_id`.
///
/// # Errors
/// [`Error::NotFound`] when it does not exist in this project; [`Error::Db`].
pub async fn get(
    state: &AppState,
    project_id: &str,
    group_id: &str,
) -> Result<device_groups::Model> {
    device_groups::Entity::find_by_id(group_id.to_owned())
        .filter(device_groups::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("group", group_id))
}

/// Renames a group or changes its description; `None` leaves a field as it is.
///
/// # Errors
/// [`Error::Validation`]; [`Error::NotFound`]; [`Error::Conflict`] for a taken name; [`Error::Db`].
pub async fn update(
    state: &AppState,
    project_id: &str,
    group_id: &str,
    name: Option<&str>,
    description: Option<&str>,
) -> Result<device_groups::Model> {
    let group = get(state, project_id, group_id).await?;
    let mut row: device_groups::ActiveModel = group.into();
    if let Some(name) = name {
        row.name = Set(text::bounded("name", name, 64, true)?);
    }
    if let Some(description) = description {
        row.description = Set(text::bounded("description", description, 64, false)?);
    }
    row.updated_at = Set(state.clock.now().as_millis());
    row.update(&state.db).await.map_err(|e| {
        crate::storage::conflict_on_unique(e, || {
            format!(
                "a group named {:?} already exists",
                name.unwrap_or_default()
            )
        })
    })
}

/// Deletes a group; refused while it still holds devices (IoTDA's rule), so none is dropped by mistake.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Conflict`] while it has members; [`Error::Db`].
pub async fn delete(state: &AppState, project_id: &str, group_id: &str) -> Result<()> {
    use sea_orm::PaginatorTrait;
    get(state, project_id, group_id).await?;
    let members = device_group_members::Entity::find()
        .filter(device_group_members::Column::GroupId.eq(group_id))
        .count(&state.db)
        .await?;
    if members > 0 {
        return Err(Error::Conflict(format!(
            "group {group_id} still has {members} devices; remove them first"
        )));
    }
    device_groups::Entity::delete_by_id(group_id.to_owned())
        .exec(&state.db)
        .await?;
    Ok(())
}

/// Removes `device_id` from `group_id` (the device itself stays).
///
/// # Errors
/// [`Error::NotFound`] when the group is not in this project or the device is not in it; [`Error::Db`].
pub async fn remove_device(
    state: &AppState,
    project_id: &str,
    group_id: &str,
    device_id: &str,
) -> Result<()> {
    get(state, project_id, group_id).await?;
    let result = device_group_members::Entity::delete_many()
        .filter(device_group_members::Column::GroupId.eq(group_id))
        .filter(device_group_members::Column::DeviceId.eq(device_id))
        .exec(&state.db)
        .await?;
    if result.rows_affected == 0 {
        return Err(Error::not_found("device in this group", device_id));
    }
    Ok(())
}

/// The devices of a group: most recently added first, or in IoTDA's order ([`ListOrder::ById`]).
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn members(
    state: &AppState,
    project_id: &str,
    group_id: &str,
    page: Page,
    order: &ListOrder,
) -> Result<Paged<crate::storage::entity::devices::Model>> {
    use crate::storage::entity::devices;
    get(state, project_id, group_id).await?;
    let query = device_group_members::Entity::find()
        .filter(device_group_members::Column::GroupId.eq(group_id));
    // The console shows the latest additions first; IoTDA pages by descending device id after a marker.
    let query = order.apply(query, device_group_members::Column::DeviceId, |q| {
        q.order_by_desc(device_group_members::Column::AddedAt)
            .order_by_desc(device_group_members::Column::DeviceId)
    });
    let page = super::fetch_ordered(&state.db, query, page).await?;
    let mut rows: std::collections::HashMap<String, devices::Model> = devices::Entity::find()
        .filter(devices::Column::Id.is_in(page.items.iter().map(|m| m.device_id.clone())))
        .all(&state.db)
        .await?
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect();
    let items = page
        .items
        .iter()
        .filter_map(|m| rows.remove(&m.device_id))
        .collect();
    Ok(Paged {
        items,
        total: page.total,
    })
}

/// The groups of `project_id` that `device_id` is in, by name.
///
/// # Errors
/// [`Error::Db`].
pub async fn of_device(
    state: &AppState,
    project_id: &str,
    device_id: &str,
) -> Result<Vec<device_groups::Model>> {
    let member_of = sea_orm::sea_query::Query::select()
        .column(device_group_members::Column::GroupId)
        .from(device_group_members::Entity)
        .and_where(device_group_members::Column::DeviceId.eq(device_id))
        .to_owned();
    Ok(device_groups::Entity::find()
        .filter(device_groups::Column::ProjectId.eq(project_id))
        .filter(device_groups::Column::Id.in_subquery(member_of))
        .order_by_asc(device_groups::Column::Name)
        .all(&state.db)
        .await?)
}
