//! `/v5/iot/{project_id}/routing-rule/...`: IoTDA's routing rules and their HTTP forwarding actions,
//! the way IoTDA applications (and Huawei's SDK) subscribe to batch-task notifications. Underneath, an
//! action is a notification subscription (`backend::service::routing`): deliveries carry
//! `X-Updraft-Signature`, keyed with the action's `token`.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use backend::service::routing::{self, NewRule, RuleChanges, RuleFilter};
use backend::storage::entity::{notification_subscriptions, routing_rules};
use http::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ServerState;
use super::iotda::{IotdaError, IotdaErrorBody};
use super::paging::id_paging;
use super::signed::{Caller, project};
use super::subscriptions::{User, admin_only};

type Ext = Option<axum::Extension<Caller>>;

/// IoTDA's `RoutingRuleSubject`.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[schema(as = RoutingRuleSubject)]
pub(super) struct SubjectJson {
    /// `batchtask` (IoTDA's batch-task notification) or `updraft.batchtask.device` (Updraft's).
    #[serde(default)]
    resource: String,
    /// `update`.
    #[serde(default)]
    event: String,
}

/// IoTDA's `AddRuleReq`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = AddRuleReq)]
pub(super) struct CreateRuleBody {
    /// 1-256 characters.
    #[serde(default)]
    rule_name: String,
    /// Free text, at most 256 characters.
    #[serde(default)]
    description: Option<String>,
    /// What the rule forwards.
    #[serde(default)]
    subject: SubjectJson,
    /// `GLOBAL` (the default) or `APP`.
    #[serde(default)]
    app_type: Option<String>,
    /// With `APP`: the resource space.
    #[serde(default)]
    app_id: Option<String>,
    /// Kept and shown; every notification carries its whole body.
    #[serde(default)]
    select: Option<String>,
    /// Must be empty: Updraft forwards every notification of the subject.
    #[serde(default, rename = "where")]
    where_clause: Option<String>,
}

/// IoTDA's `UpdateRuleReq`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = UpdateRuleReq)]
pub(super) struct UpdateRuleBody {
    /// 1-256 characters.
    #[serde(default)]
    rule_name: Option<String>,
    /// Free text.
    #[serde(default)]
    description: Option<String>,
    /// Kept and shown.
    #[serde(default)]
    select: Option<String>,
    /// Must be empty.
    #[serde(default, rename = "where")]
    where_clause: Option<String>,
    /// `true` starts the rule's deliveries (of changes from then on), `false` stops them.
    #[serde(default)]
    active: Option<bool>,
}

/// IoTDA's `RoutingRule` (and `RuleResponse`).
#[derive(Serialize, ToSchema)]
#[schema(as = RoutingRule)]
pub(super) struct RuleJson {
    /// The rule's id.
    rule_id: String,
    /// Its name.
    rule_name: String,
    /// Its description.
    description: String,
    /// What it forwards.
    subject: SubjectJson,
    /// `GLOBAL` or `APP`.
    app_type: String,
    /// With `APP`: the resource space.
    #[serde(skip_serializing_if = "Option::is_none")]
    app_id: Option<String>,
    /// As given.
    #[serde(skip_serializing_if = "Option::is_none")]
    select: Option<String>,
    /// Always empty.
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    where_clause: Option<String>,
    /// Whether its actions deliver.
    active: bool,
}

impl From<routing_rules::Model> for RuleJson {
    fn from(r: routing_rules::Model) -> Self {
        Self {
            rule_id: r.id,
            rule_name: r.rule_name,
            description: r.description,
            subject: SubjectJson {
                resource: r.resource,
                event: r.event,
            },
            app_type: r.app_type,
            app_id: r.app_id,
            select: r.select_clause,
            where_clause: None,
            active: r.active,
        }
    }
}

/// `ListRoutingRules` query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct RuleQuery {
    /// Only rules of this subject resource.
    resource: Option<String>,
    /// Only rules of this subject event.
    event: Option<String>,
    /// Only `GLOBAL` or `APP` rules.
    app_type: Option<String>,
    /// Only this resource space's rules.
    app_id: Option<String>,
    /// Only rules with this name.
    rule_name: Option<String>,
    /// `true` or `false`: only active or inactive rules.
    active: Option<String>,
    /// Page size, 1-50 (default 10).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// The `marker` of the previous page: rules after it, by descending id.
    marker: Option<String>,
    /// Records to skip after the marker, 0-500 (default 0).
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
}

/// `ListRoutingRules`' answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ListRoutingRulesResponse)]
struct RuleList {
    /// This page's rules.
    rules: Vec<RuleJson>,
    /// Every matching rule, across pages.
    count: u64,
    /// The id of this page's last rule: the next page's `marker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    marker: Option<String>,
}

fn flag(name: &str, v: Option<&str>) -> Result<Option<bool>, IotdaError> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(v) => Err(IotdaError::bad_request(format!(
            "{name}: {v:?} is not true or false"
        ))),
    }
}

/// `POST /v5/iot/{project_id}/routing-rule/rules`.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/routing-rule/rules",
    operation_id = "CreateRoutingRule",
    tag = "routing-rule",
    summary = "Create a routing rule (inactive)",
    description = "A rule forwards the notifications of its subject (`batchtask`/`update`, or Updraft's \
                   `updraft.batchtask.device`/`update`) to its actions' URLs while it is active. As on \
                   IoTDA, it is created inactive: activate it with UpdateRoutingRule `{\"active\": true}`.",
    params(("project_id" = String, Path, description = "The project.")),
    request_body(content = CreateRuleBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The rule.", body = RuleJson),
        (status = 400, description = "Invalid input (an unsupported subject, a `where` condition); the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn create_rule(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    user: User,
    body: Result<Json<CreateRuleBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    admin_only(&user)?;
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = super::iotda::body(body)?;
    let rule = routing::create_rule(
        &state.app,
        &project_id,
        NewRule {
            rule_name: b.rule_name,
            description: b.description.unwrap_or_default(),
            resource: b.subject.resource,
            event: b.subject.event,
            app_type: b.app_type,
            app_id: b.app_id,
            select: b.select,
            where_clause: b.where_clause,
        },
    )
    .await?;
    let id = rule.id.clone();
    Ok(super::iotda::created(&id, RuleJson::from(rule)))
}

/// `GET /v5/iot/{project_id}/routing-rule/rules`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/routing-rule/rules",
    operation_id = "ListRoutingRules",
    tag = "routing-rule",
    summary = "List routing rules",
    params(("project_id" = String, Path, description = "The project."), RuleQuery),
    responses(
        (status = 200, description = "A page of rules.", body = RuleList),
        (status = 400, description = "An invalid filter or paging parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list_rules(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    Query(q): Query<RuleQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, order) = id_paging(
        q.limit.as_deref(),
        q.offset.as_deref(),
        q.marker.as_deref(),
        64,
    )?;
    let filter = RuleFilter {
        active: flag("active", q.active.as_deref())?,
        resource: q.resource,
        event: q.event,
        app_type: q.app_type,
        app_id: q.app_id,
        rule_name: q.rule_name,
    };
    let result = routing::list_rules(&state.app, &project_id, &filter, page, &order).await?;
    let marker = result.items.last().map(|r| r.id.clone());
    Ok(Json(RuleList {
        rules: result.items.into_iter().map(RuleJson::from).collect(),
        count: result.total,
        marker,
    })
    .into_response())
}

/// `GET /v5/iot/{project_id}/routing-rule/rules/{rule_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/routing-rule/rules/{rule_id}",
    operation_id = "ShowRoutingRule",
    tag = "routing-rule",
    summary = "Show a routing rule",
    params(("project_id" = String, Path, description = "The project."), ("rule_id" = String, Path, description = "The rule.")),
    responses(
        (status = 200, description = "The rule.", body = RuleJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such rule.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn show_rule(
    State(state): State<ServerState>,
    Path((project_id, rule_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let rule = routing::get_rule(&state.app, &project_id, &rule_id).await?;
    Ok(Json(RuleJson::from(rule)).into_response())
}

/// `PUT /v5/iot/{project_id}/routing-rule/rules/{rule_id}`.
#[utoipa::path(
    put,
    path = "/v5/iot/{project_id}/routing-rule/rules/{rule_id}",
    operation_id = "UpdateRoutingRule",
    tag = "routing-rule",
    summary = "Change or (de)activate a routing rule",
    params(("project_id" = String, Path, description = "The project."), ("rule_id" = String, Path, description = "The rule.")),
    request_body(content = UpdateRuleBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The rule.", body = RuleJson),
        (status = 400, description = "Invalid input; the message names the field.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such rule.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn update_rule(
    State(state): State<ServerState>,
    Path((project_id, rule_id)): Path<(String, String)>,
    caller: Ext,
    user: User,
    body: Result<Json<UpdateRuleBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    admin_only(&user)?;
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = super::iotda::body(body)?;
    let rule = routing::update_rule(
        &state.app,
        &project_id,
        &rule_id,
        RuleChanges {
            rule_name: b.rule_name,
            description: b.description,
            select: b.select,
            where_clause: b.where_clause,
            active: b.active,
        },
    )
    .await?;
    Ok(Json(RuleJson::from(rule)).into_response())
}

/// `DELETE /v5/iot/{project_id}/routing-rule/rules/{rule_id}`.
#[utoipa::path(
    delete,
    path = "/v5/iot/{project_id}/routing-rule/rules/{rule_id}",
    operation_id = "DeleteRoutingRule",
    tag = "routing-rule",
    summary = "Delete a routing rule and its actions",
    params(("project_id" = String, Path, description = "The project."), ("rule_id" = String, Path, description = "The rule.")),
    responses(
        (status = 204, description = "Deleted, with its actions and their pending deliveries."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such rule.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn delete_rule(
    State(state): State<ServerState>,
    Path((project_id, rule_id)): Path<(String, String)>,
    caller: Ext,
    user: User,
) -> Result<Response, IotdaError> {
    admin_only(&user)?;
    let project_id = project(caller.as_deref(), &project_id)?;
    routing::delete_rule(&state.app, &project_id, &rule_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// IoTDA's `HttpForwarding`.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[schema(as = HttpForwarding)]
pub(super) struct HttpForwardingJson {
    /// The receiver: an `https://` URL without credentials.
    #[serde(default)]
    url: String,
    /// The key of `X-Updraft-Signature` (HMAC-SHA256); absent at creation: a random one, returned in
    /// the creation's answer only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

/// IoTDA's `ChannelDetail` (only `http_forwarding`).
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[schema(as = ChannelDetail)]
pub(super) struct ChannelDetailJson {
    /// Where and how to POST.
    #[serde(default)]
    http_forwarding: Option<HttpForwardingJson>,
}

/// IoTDA's `AddActionReq`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = AddActionReq)]
pub(super) struct CreateActionBody {
    /// The rule.
    #[serde(default)]
    rule_id: String,
    /// `HTTP_FORWARDING`.
    #[serde(default)]
    channel: String,
    /// `http_forwarding.url` (and optionally `token`).
    #[serde(default)]
    channel_detail: ChannelDetailJson,
}

/// IoTDA's `RoutingRuleAction`.
#[derive(Serialize, ToSchema)]
#[schema(as = RoutingRuleAction)]
pub(super) struct ActionJson {
    /// The action's id (also its subscription id: `GET subscriptions/{id}/deliveries` shows what it sent).
    action_id: String,
    /// Its rule.
    rule_id: String,
    /// The resource space.
    #[serde(skip_serializing_if = "Option::is_none")]
    app_id: Option<String>,
    /// `HTTP_FORWARDING`.
    channel: &'static str,
    /// The URL (and, in the creation's answer, the `token`).
    channel_detail: ChannelDetailJson,
}

impl ActionJson {
    fn new(s: notification_subscriptions::Model, token: Option<String>) -> Self {
        Self {
            action_id: s.id,
            rule_id: s.rule_id.unwrap_or_default(),
            app_id: s.app_id,
            channel: routing::HTTP_FORWARDING,
            channel_detail: ChannelDetailJson {
                http_forwarding: Some(HttpForwardingJson { url: s.url, token }),
            },
        }
    }
}

/// `POST /v5/iot/{project_id}/routing-rule/actions`.
#[utoipa::path(
    post,
    path = "/v5/iot/{project_id}/routing-rule/actions",
    operation_id = "CreateRuleAction",
    tag = "routing-rule",
    summary = "Forward a rule's notifications to a URL",
    description = "Each notification is a POST in IoTDA's envelope, signed with `X-Updraft-Signature: \
                   t=<unix ms>,v1=<hex HMAC-SHA256(token, \"<t>.<raw body>\")>`, retried and in order \
                   per task, while the rule is active.",
    params(("project_id" = String, Path, description = "The project.")),
    request_body(content = CreateActionBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The action, with its signing `token`.", body = ActionJson),
        (status = 400, description = "Another channel than HTTP_FORWARDING, or a bad URL.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such rule.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn create_action(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    user: User,
    body: Result<Json<CreateActionBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    admin_only(&user)?;
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = super::iotda::body(body)?;
    let forwarding = b.channel_detail.http_forwarding.unwrap_or_default();
    let token = forwarding
        .token
        .filter(|t| !t.is_empty())
        .map(SecretString::from);
    let created = routing::create_action(
        &state.app,
        &project_id,
        &b.rule_id,
        &b.channel,
        &forwarding.url,
        token,
    )
    .await?;
    let id = created.subscription.id.clone();
    let token = created.secret.expose_secret().to_owned();
    Ok(super::iotda::created(
        &id,
        ActionJson::new(created.subscription, Some(token)),
    ))
}

/// `ListRuleActions` query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ActionQuery {
    /// Only this rule's actions.
    rule_id: Option<String>,
    /// Only `HTTP_FORWARDING` (every action is).
    channel: Option<String>,
    /// Accepted for compatibility.
    app_type: Option<String>,
    /// Accepted for compatibility.
    app_id: Option<String>,
    /// Page size, 1-50 (default 10).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 50)]
    limit: Option<String>,
    /// The `marker` of the previous page.
    marker: Option<String>,
    /// Records to skip after the marker, 0-500 (default 0).
    #[param(value_type = Option<u32>, minimum = 0, maximum = 500)]
    offset: Option<String>,
}

/// `ListRuleActions`' answer.
#[derive(Serialize, ToSchema)]
#[schema(as = ListRuleActionsResponse)]
struct ActionList {
    /// This page's actions.
    actions: Vec<ActionJson>,
    /// Every matching action, across pages.
    count: u64,
    /// The id of this page's last action: the next page's `marker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    marker: Option<String>,
}

/// `GET /v5/iot/{project_id}/routing-rule/actions`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/routing-rule/actions",
    operation_id = "ListRuleActions",
    tag = "routing-rule",
    summary = "List rule actions",
    params(("project_id" = String, Path, description = "The project."), ActionQuery),
    responses(
        (status = 200, description = "A page of actions (without tokens).", body = ActionList),
        (status = 400, description = "An invalid filter or paging parameter.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn list_actions(
    State(state): State<ServerState>,
    Path(project_id): Path<String>,
    caller: Ext,
    Query(q): Query<ActionQuery>,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let (page, order) = id_paging(
        q.limit.as_deref(),
        q.offset.as_deref(),
        q.marker.as_deref(),
        64,
    )?;
    let _ = (q.app_type, q.app_id);
    if q.channel
        .as_deref()
        .is_some_and(|c| !c.trim().is_empty() && c.trim() != routing::HTTP_FORWARDING)
    {
        return Ok(Json(ActionList {
            actions: Vec::new(),
            count: 0,
            marker: None,
        })
        .into_response());
    }
    let result =
        routing::list_actions(&state.app, &project_id, q.rule_id.as_deref(), page, &order).await?;
    let marker = result.items.last().map(|a| a.id.clone());
    Ok(Json(ActionList {
        actions: result
            .items
            .into_iter()
            .map(|a| ActionJson::new(a, None))
            .collect(),
        count: result.total,
        marker,
    })
    .into_response())
}

/// `GET /v5/iot/{project_id}/routing-rule/actions/{action_id}`.
#[utoipa::path(
    get,
    path = "/v5/iot/{project_id}/routing-rule/actions/{action_id}",
    operation_id = "ShowRuleAction",
    tag = "routing-rule",
    summary = "Show a rule action",
    params(("project_id" = String, Path, description = "The project."), ("action_id" = String, Path, description = "The action.")),
    responses(
        (status = 200, description = "The action (without its token).", body = ActionJson),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such action.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn show_action(
    State(state): State<ServerState>,
    Path((project_id, action_id)): Path<(String, String)>,
    caller: Ext,
) -> Result<Response, IotdaError> {
    let project_id = project(caller.as_deref(), &project_id)?;
    let action = routing::get_action(&state.app, &project_id, &action_id).await?;
    Ok(Json(ActionJson::new(action, None)).into_response())
}

/// IoTDA's `UpdateActionReq`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = UpdateActionReq)]
pub(super) struct UpdateActionBody {
    /// `HTTP_FORWARDING` (the only channel).
    #[serde(default)]
    channel: Option<String>,
    /// A new `http_forwarding.url` and/or `token`; absent fields are kept.
    #[serde(default)]
    channel_detail: Option<ChannelDetailJson>,
}

/// `PUT /v5/iot/{project_id}/routing-rule/actions/{action_id}`.
#[utoipa::path(
    put,
    path = "/v5/iot/{project_id}/routing-rule/actions/{action_id}",
    operation_id = "UpdateRuleAction",
    tag = "routing-rule",
    summary = "Change a rule action's URL or signing token",
    params(("project_id" = String, Path, description = "The project."), ("action_id" = String, Path, description = "The action.")),
    request_body(content = UpdateActionBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The action (without its token).", body = ActionJson),
        (status = 400, description = "Another channel, or a bad URL.", body = IotdaErrorBody),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such action.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn update_action(
    State(state): State<ServerState>,
    Path((project_id, action_id)): Path<(String, String)>,
    caller: Ext,
    user: User,
    body: Result<Json<UpdateActionBody>, JsonRejection>,
) -> Result<Response, IotdaError> {
    admin_only(&user)?;
    let project_id = project(caller.as_deref(), &project_id)?;
    let b = super::iotda::body(body)?;
    let forwarding = b.channel_detail.and_then(|c| c.http_forwarding);
    let (url, token) = match forwarding {
        Some(f) => (
            Some(f.url).filter(|u| !u.trim().is_empty()),
            f.token.filter(|t| !t.is_empty()).map(SecretString::from),
        ),
        None => (None, None),
    };
    let action = routing::update_action(
        &state.app,
        &project_id,
        &action_id,
        b.channel.as_deref(),
        url.as_deref(),
        token,
    )
    .await?;
    Ok(Json(ActionJson::new(action, None)).into_response())
}

/// `DELETE /v5/iot/{project_id}/routing-rule/actions/{action_id}`.
#[utoipa::path(
    delete,
    path = "/v5/iot/{project_id}/routing-rule/actions/{action_id}",
    operation_id = "DeleteRuleAction",
    tag = "routing-rule",
    summary = "Delete a rule action",
    params(("project_id" = String, Path, description = "The project."), ("action_id" = String, Path, description = "The action.")),
    responses(
        (status = 204, description = "Deleted, with its pending deliveries."),
        (status = 401, description = "Not signed in, or a bad signature.", body = IotdaErrorBody),
        (status = 404, description = "No such action.", body = IotdaErrorBody),
    ),
)]
pub(super) async fn delete_action(
    State(state): State<ServerState>,
    Path((project_id, action_id)): Path<(String, String)>,
    caller: Ext,
    user: User,
) -> Result<Response, IotdaError> {
    admin_only(&user)?;
    let project_id = project(caller.as_deref(), &project_id)?;
    routing::delete_action(&state.app, &project_id, &action_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
