//! IoTDA's routing rules, the way IoTDA applications subscribe to notifications: a rule names a subject
//! (`batchtask` / `update`, or Updraft's `updraft.batchtask.device`), its HTTP forwarding actions name
//! the URLs, and deliveries flow while the rule is active. An action is a notification subscription
//! (`rule_id` set), so deliveries are signed, ordered, retried and inspectable exactly as
//! `POST subscriptions` ones (see [`crate::notify`]); the action's `token` is the signing secret.
//!
//! As on IoTDA, a rule is created inactive; `active: true` in an update starts its deliveries.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, Set,
};
use secrecy::SecretString;

use super::subscriptions::{self, Forwarding, Subject};
use super::{ListOrder, Page, Paged};
use crate::storage::entity::{notification_subscriptions, routing_rules};
use crate::{AppState, Error, Result, ids};

/// The one channel Updraft forwards over.
pub const HTTP_FORWARDING: &str = "HTTP_FORWARDING";

/// A rule as given to [`create_rule`].
#[derive(Clone, Debug, Default)]
pub struct NewRule {
    /// `rule_name`: 1-256 characters.
    pub rule_name: String,
    /// `description`.
    pub description: String,
    /// `subject.resource`.
    pub resource: String,
    /// `subject.event`.
    pub event: String,
    /// `app_type`: `GLOBAL` (default) or `APP`.
    pub app_type: Option<String>,
    /// `app_id`, with `APP`: one of the project's resource spaces.
    pub app_id: Option<String>,
    /// `select`: kept and shown; every notification carries its whole body.
    pub select: Option<String>,
    /// `where`: must be empty (Updraft does not filter notifications).
    pub where_clause: Option<String>,
}

/// Changes to a rule ([`update_rule`]); `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct RuleChanges {
    /// `rule_name`.
    pub rule_name: Option<String>,
    /// `description`.
    pub description: Option<String>,
    /// `select`.
    pub select: Option<String>,
    /// `where`: must be empty.
    pub where_clause: Option<String>,
    /// `active`: whether its actions deliver.
    pub active: Option<bool>,
}

fn check_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 256 {
        return Err(domain::ValidationError::new("rule_name", "must be 1-256 characters").into());
    }
    Ok(name.to_owned())
}

fn check_where(clause: Option<&str>) -> Result<()> {
    if clause.is_some_and(|w| !w.trim().is_empty()) {
        return Err(domain::ValidationError::new(
            "where",
            "Updraft forwards every notification of the rule's subject; conditions are not supported",
        )
        .into());
    }
    Ok(())
}

/// Creates an inactive rule.
///
/// # Errors
/// [`Error::Validation`] naming the field (name, subject, app type, `where`); [`Error::Db`].
pub async fn create_rule(
    state: &AppState,
    project_id: &str,
    new: NewRule,
) -> Result<routing_rules::Model> {
    let rule_name = check_name(&new.rule_name)?;
    Subject {
        resource: &new.resource,
        event: &new.event,
    }
    .check("subject.")?;
    check_where(new.where_clause.as_deref())?;
    let app_type = new
        .app_type
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .unwrap_or("GLOBAL")
        .to_owned();
    let app_id = match app_type.as_str() {
        "GLOBAL" => None,
        "APP" => {
            let default = super::projects::default_app(state, project_id).await?;
            match new
                .app_id
                .as_deref()
                .map(str::trim)
                .filter(|a| !a.is_empty())
            {
                None => Some(default.id),
                Some(a) if a == default.id => Some(default.id),
                Some(a) => {
                    return Err(domain::ValidationError::new(
                        "app_id",
                        format!("unknown resource space {a}"),
                    )
                    .into());
                }
            }
        }
        _ => {
            return Err(domain::ValidationError::new("app_type", "must be GLOBAL or APP").into());
        }
    };
    if new.description.chars().count() > 256 {
        return Err(
            domain::ValidationError::new("description", "must be at most 256 characters").into(),
        );
    }
    let now = state.clock.now().as_millis();
    let rule = routing_rules::ActiveModel {
        id: Set(ids::uuid_like()),
        project_id: Set(project_id.to_owned()),
        app_id: Set(app_id),
        rule_name: Set(rule_name),
        description: Set(new.description),
        resource: Set(new.resource.trim().to_owned()),
        event: Set(new.event.trim().to_owned()),
        app_type: Set(app_type),
        select_clause: Set(new.select.filter(|s| !s.trim().is_empty())),
        active: Set(false),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(&state.db)
    .await?;
    tracing::info!(rule_id = %rule.id, resource = %rule.resource, "routing rule created");
    Ok(rule)
}

/// Filters for [`list_rules`].
#[derive(Clone, Debug, Default)]
pub struct RuleFilter {
    /// Only this subject resource.
    pub resource: Option<String>,
    /// Only this subject event.
    pub event: Option<String>,
    /// Only this app type.
    pub app_type: Option<String>,
    /// Only this resource space.
    pub app_id: Option<String>,
    /// Only this name.
    pub rule_name: Option<String>,
    /// Only active (or inactive) rules.
    pub active: Option<bool>,
}

/// `project_id`'s rules, by descending id after the marker (IoTDA's paging).
///
/// # Errors
/// [`Error::Db`].
pub async fn list_rules(
    state: &AppState,
    project_id: &str,
    filter: &RuleFilter,
    page: Page,
    order: &ListOrder,
) -> Result<Paged<routing_rules::Model>> {
    let mut cond = Condition::all().add(routing_rules::Column::ProjectId.eq(project_id));
    fn text(v: &Option<String>) -> Option<&str> {
        v.as_deref().map(str::trim).filter(|v| !v.is_empty())
    }
    for (col, v) in [
        (routing_rules::Column::Resource, text(&filter.resource)),
        (routing_rules::Column::Event, text(&filter.event)),
        (routing_rules::Column::AppType, text(&filter.app_type)),
        (routing_rules::Column::AppId, text(&filter.app_id)),
        (routing_rules::Column::RuleName, text(&filter.rule_name)),
    ] {
        if let Some(v) = v {
            cond = cond.add(col.eq(v));
        }
    }
    if let Some(active) = filter.active {
        cond = cond.add(routing_rules::Column::Active.eq(active));
    }
    let query = order.apply(
        routing_rules::Entity::find().filter(cond),
        routing_rules::Column::Id,
        |q| q.order_by_desc(routing_rules::Column::Id),
    );
    super::fetch_ordered(&state.db, query, page).await
}

/// One rule of `project_id`.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn get_rule(
    state: &AppState,
    project_id: &str,
    rule_id: &str,
) -> Result<routing_rules::Model> {
    routing_rules::Entity::find_by_id(rule_id.to_owned())
        .filter(routing_rules::Column::ProjectId.eq(project_id))
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("routing rule", rule_id))
}

/// Changes a rule; activating it starts its actions' deliveries (of changes from then on), deactivating
/// it stops them.
///
/// # Errors
/// [`Error::Validation`]; [`Error::NotFound`]; [`Error::Db`].
pub async fn update_rule(
    state: &AppState,
    project_id: &str,
    rule_id: &str,
    changes: RuleChanges,
) -> Result<routing_rules::Model> {
    let rule = get_rule(state, project_id, rule_id).await?;
    check_where(changes.where_clause.as_deref())?;
    let now = state.clock.now().as_millis();
    let mut update = routing_rules::ActiveModel {
        id: Set(rule.id.clone()),
        updated_at: Set(now),
        ..Default::default()
    };
    if let Some(name) = &changes.rule_name {
        update.rule_name = Set(check_name(name)?);
    }
    if let Some(d) = changes.description {
        update.description = Set(d);
    }
    if let Some(s) = changes.select {
        update.select_clause = Set(Some(s).filter(|s| !s.trim().is_empty()));
    }
    let txn = crate::db::begin_write(&state.db).await?;
    if let Some(active) = changes.active {
        update.active = Set(active);
        // A subscription only receives what happened after it was (re)enabled: its `created_at` is
        // the cut-off `notify` applies, so an activation moves it.
        let mut subs = notification_subscriptions::Entity::update_many()
            .col_expr(
                notification_subscriptions::Column::Enabled,
                Expr::value(active),
            )
            .col_expr(
                notification_subscriptions::Column::UpdatedAt,
                Expr::value(now),
            )
            .filter(notification_subscriptions::Column::RuleId.eq(rule.id.as_str()));
        if active && !rule.active {
            subs = subs.col_expr(
                notification_subscriptions::Column::CreatedAt,
                Expr::value(now),
            );
        }
        subs.exec(&txn).await?;
    }
    let rule = update.update(&txn).await?;
    txn.commit().await?;
    tracing::info!(rule_id, active = rule.active, "routing rule updated");
    Ok(rule)
}

/// Deletes a rule and its actions (with their pending deliveries).
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn delete_rule(state: &AppState, project_id: &str, rule_id: &str) -> Result<()> {
    get_rule(state, project_id, rule_id).await?;
    let txn = crate::db::begin_write(&state.db).await?;
    notification_subscriptions::Entity::delete_many()
        .filter(notification_subscriptions::Column::RuleId.eq(rule_id))
        .exec(&txn)
        .await?;
    routing_rules::Entity::delete_by_id(rule_id.to_owned())
        .exec(&txn)
        .await?;
    txn.commit().await?;
    tracing::info!(rule_id, "routing rule deleted");
    Ok(())
}

/// An action's channel: HTTP forwarding is the only one.
fn check_channel(channel: &str) -> Result<()> {
    if channel.trim() == HTTP_FORWARDING {
        return Ok(());
    }
    Err(domain::ValidationError::new(
        "channel",
        format!("must be {HTTP_FORWARDING}: Updraft forwards over HTTPS only"),
    )
    .into())
}

/// Adds an HTTP forwarding action to a rule: a subscription of `url` to the rule's subject, signed with
/// `token` (or a new random secret), delivering while the rule is active.
///
/// # Errors
/// [`Error::Validation`] for another channel or a bad URL; [`Error::NotFound`] for an unknown rule;
/// [`Error::Db`].
pub async fn create_action(
    state: &AppState,
    project_id: &str,
    rule_id: &str,
    channel: &str,
    url: &str,
    token: Option<SecretString>,
) -> Result<subscriptions::Created> {
    let rule = get_rule(state, project_id, rule_id).await?;
    check_channel(channel)?;
    let mut created = subscriptions::insert(
        state,
        project_id,
        Subject {
            resource: &rule.resource,
            event: &rule.event,
        },
        url,
        Forwarding {
            rule_id: Some(rule.id.clone()),
            secret: token,
            enabled: rule.active,
            url_field: "channel_detail.http_forwarding.url",
        },
    )
    .await?;
    // The rule read again now that the action is stored: an activation that committed in between did
    // not see it (one after this read does).
    let now_active = get_rule(state, project_id, rule_id).await?.active;
    if now_active != created.subscription.enabled {
        notification_subscriptions::Entity::update_many()
            .col_expr(
                notification_subscriptions::Column::Enabled,
                Expr::value(now_active),
            )
            .filter(notification_subscriptions::Column::Id.eq(created.subscription.id.as_str()))
            .exec(&state.db)
            .await?;
        created.subscription.enabled = now_active;
    }
    Ok(created)
}

/// Changes an action's URL and/or signing token (`None` keeps it).
///
/// # Errors
/// [`Error::Validation`] for another channel or a bad URL; [`Error::NotFound`]; [`Error::Db`].
pub async fn update_action(
    state: &AppState,
    project_id: &str,
    action_id: &str,
    channel: Option<&str>,
    url: Option<&str>,
    token: Option<SecretString>,
) -> Result<notification_subscriptions::Model> {
    use secrecy::ExposeSecret;
    let action = get_action(state, project_id, action_id).await?;
    if let Some(c) = channel.filter(|c| !c.trim().is_empty()) {
        check_channel(c)?;
    }
    let mut update = notification_subscriptions::ActiveModel {
        id: Set(action.id.clone()),
        updated_at: Set(state.clock.now().as_millis()),
        ..Default::default()
    };
    if let Some(url) = url {
        let notify = &state.settings.notify;
        update.url = Set(subscriptions::check_url(
            url,
            "channel_detail.http_forwarding.url",
            notify.allow_http,
            notify.allow_private,
        )?);
    }
    if let Some(token) = token {
        update.secret_enc = Set(state.sealer.seal(&action.id, token.expose_secret()));
    }
    let action = update.update(&state.db).await?;
    tracing::info!(action_id, "rule action updated");
    Ok(action)
}

/// `project_id`'s actions (of one rule, when given), by descending id after the marker.
///
/// # Errors
/// [`Error::Db`].
pub async fn list_actions(
    state: &AppState,
    project_id: &str,
    rule_id: Option<&str>,
    page: Page,
    order: &ListOrder,
) -> Result<Paged<notification_subscriptions::Model>> {
    let mut query = notification_subscriptions::Entity::find()
        .filter(notification_subscriptions::Column::ProjectId.eq(project_id))
        .filter(notification_subscriptions::Column::RuleId.is_not_null());
    if let Some(rule) = rule_id.map(str::trim).filter(|r| !r.is_empty()) {
        query = query.filter(notification_subscriptions::Column::RuleId.eq(rule));
    }
    let query = order.apply(query, notification_subscriptions::Column::Id, |q| {
        q.order_by_desc(notification_subscriptions::Column::Id)
    });
    super::fetch_ordered(&state.db, query, page).await
}

/// One action of `project_id`.
///
/// # Errors
/// [`Error::NotFound`] (also for a subscription that is not an action); [`Error::Db`].
pub async fn get_action(
    state: &AppState,
    project_id: &str,
    action_id: &str,
) -> Result<notification_subscriptions::Model> {
    notification_subscriptions::Entity::find_by_id(action_id.to_owned())
        .filter(notification_subscriptions::Column::ProjectId.eq(project_id))
        .filter(notification_subscriptions::Column::RuleId.is_not_null())
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::not_found("rule action", action_id))
}

/// Deletes an action (and its pending deliveries).
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Db`].
pub async fn delete_action(state: &AppState, project_id: &str, action_id: &str) -> Result<()> {
    get_action(state, project_id, action_id).await?;
    subscriptions::delete(state, project_id, action_id).await
}
