//! The audit trail (README, "Audit trail"): every state-changing action of an operator (console), an
//! application (access key) or the command line, and every sign-in, with who, from where, what, on
//! which resource, when and how it ended. Recording never fails the action it records: a write that
//! fails is logged instead.

use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use crate::storage::entity::audit_logs;
use crate::{Context, Result};

/// The response header naming the resource a call created: set by the creating API handlers and
/// console functions, recorded as the entry's resource id, and left in the answer for clients.
pub const RESOURCE_ID_HEADER: &str = "x-resource-id";

/// Who acted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActorType {
    /// A console user.
    User,
    /// An application, by its access key.
    Application,
    /// The command line.
    Cli,
    /// Nobody signed in (a failed sign-in, an unsigned request).
    Anonymous,
}

impl ActorType {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Application => "application",
            Self::Cli => "cli",
            Self::Anonymous => "anonymous",
        }
    }
}

/// One action to record.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The project acted in, when known.
    pub project_id: Option<String>,
    /// Who acted.
    pub actor_type: ActorType,
    /// The user name, access key or operating-system user.
    pub actor: String,
    /// The client address.
    pub source: Option<String>,
    /// What was asked.
    pub action: String,
    /// The kind of resource acted on (`batchtasks`, `packages`, `devices`...).
    pub resource_type: Option<String>,
    /// Its id.
    pub resource_id: Option<String>,
    /// Whether it succeeded.
    pub success: bool,
    /// The HTTP status answered.
    pub status: Option<u16>,
    /// Why it failed, or what it did.
    pub detail: Option<String>,
    /// The request id (`x-request-id`).
    pub request_id: Option<String>,
}

/// Records `entry` at the clock's now; a failed write is logged, never returned.
pub async fn record(state: &Context, entry: Entry) {
    let row = audit_logs::ActiveModel {
        at: Set(state.clock.now().as_millis()),
        project_id: Set(entry.project_id),
        actor_type: Set(entry.actor_type.as_str().to_owned()),
        actor: Set(truncate(entry.actor, 256)),
        source: Set(entry.source),
        action: Set(truncate(entry.action, 256)),
        resource_type: Set(entry.resource_type),
        resource_id: Set(entry.resource_id.map(|r| truncate(r, 256))),
        result: Set(if entry.success { "success" } else { "failure" }.to_owned()),
        status: Set(entry.status.map(i32::from)),
        detail: Set(entry.detail.map(|d| truncate(d, 2000))),
        request_id: Set(entry.request_id),
        ..Default::default()
    };
    if let Err(e) = row.insert(&state.db).await {
        tracing::error!(error.message = %e, "audit: an entry could not be written");
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (client-chosen text is bounded).
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

/// Which entries to list.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this actor's.
    pub actor: Option<String>,
    /// Only on this kind of resource.
    pub resource_type: Option<String>,
    /// Only on this resource.
    pub resource_id: Option<String>,
    /// From this time on (ms, inclusive).
    pub from: Option<i64>,
    /// Before this time (ms, exclusive).
    pub to: Option<i64>,
    /// Entries skipped (newest first).
    pub offset: u64,
    /// Entries returned at most.
    pub limit: u64,
}

/// The project's entries matching `filter`, newest first, and how many match in all.
///
/// # Errors
/// Database errors.
pub async fn list(
    state: &Context,
    project_id: &str,
    filter: &Filter,
) -> Result<(Vec<audit_logs::Model>, u64)> {
    let mut query = audit_logs::Entity::find().filter(audit_logs::Column::ProjectId.eq(project_id));
    if let Some(actor) = &filter.actor {
        query = query.filter(audit_logs::Column::Actor.eq(actor.clone()));
    }
    if let Some(kind) = &filter.resource_type {
        query = query.filter(audit_logs::Column::ResourceType.eq(kind.clone()));
    }
    if let Some(id) = &filter.resource_id {
        query = query.filter(audit_logs::Column::ResourceId.eq(id.clone()));
    }
    if let Some(from) = filter.from {
        query = query.filter(audit_logs::Column::At.gte(from));
    }
    if let Some(to) = filter.to {
        query = query.filter(audit_logs::Column::At.lt(to));
    }
    let total = query.clone().count(&state.db).await?;
    let rows = query
        .order_by_desc(audit_logs::Column::At)
        .order_by_desc(audit_logs::Column::Id)
        .offset(filter.offset)
        .limit(filter.limit)
        .all(&state.db)
        .await?;
    Ok((rows, total))
}

/// Deletes the entries older than `retention`; how many.
///
/// # Errors
/// Database errors.
pub async fn prune(state: &Context, retention: std::time::Duration) -> Result<u64> {
    let cutoff = state.clock.now().as_millis()
        - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 2);
    let done = audit_logs::Entity::delete_many()
        .filter(audit_logs::Column::At.lt(cutoff))
        .exec(&state.db)
        .await?;
    Ok(done.rows_affected)
}
