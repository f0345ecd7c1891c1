//! The operations shared by the console, the REST API and the command line. Each takes the [`AppState`]
//! and the caller's project, validates its input with `domain`, and returns rows or an [`Error`].
//!
//! [`AppState`]: crate::AppState
//! [`Error`]: crate::Error

pub mod audit;
pub mod auth;
pub mod credentials;
pub mod devices;
pub mod downloads;
pub mod groups;
pub mod overview;
pub mod packages;
pub mod products;
pub mod projects;
pub mod routing;
pub mod subscriptions;
pub mod tasks;

/// A page request: at most `limit` rows after skipping `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// Rows to return (clamped to 1..=500).
    pub limit: u64,
    /// Rows to skip.
    pub offset: u64,
}

impl Page {
    /// A page, with `limit` clamped to 1..=500.
    #[must_use]
    pub fn new(limit: u64, offset: u64) -> Self {
        Self {
            limit: limit.clamp(1, 500),
            offset,
        }
    }
}

impl Default for Page {
    fn default() -> Self {
        Self::new(50, 0)
    }
}

/// How a list is ordered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ListOrder {
    /// The console's order (newest first, or by name).
    #[default]
    Natural,
    /// IoTDA's: descending id, starting after `marker` (the last id of the previous page). The total
    /// still counts every matching row.
    ById {
        /// The last id of the previous page.
        marker: Option<String>,
    },
}

impl ListOrder {
    /// Orders `query` by descending `id`, after the marker; `natural` when [`ListOrder::Natural`].
    pub(crate) fn apply<E, C>(
        &self,
        query: sea_orm::Select<E>,
        id: C,
        natural: impl FnOnce(sea_orm::Select<E>) -> sea_orm::Select<E>,
    ) -> (sea_orm::Select<E>, Option<sea_orm::Select<E>>)
    where
        E: sea_orm::EntityTrait<Column = C>,
        C: sea_orm::ColumnTrait,
    {
        use sea_orm::{QueryFilter, QueryOrder};
        match self {
            Self::Natural => (natural(query), None),
            Self::ById { marker } => {
                let counted = query.clone();
                let mut page = query.order_by_desc(id);
                if let Some(m) = marker {
                    page = page.filter(id.lt(m.clone()));
                }
                (page, Some(counted))
            }
        }
    }
}

/// One page of rows and the total number of matching rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Paged<T> {
    /// The rows.
    pub items: Vec<T>,
    /// All matching rows, across pages.
    pub total: u64,
}

/// Runs `query` for one page as ordered by `order` (see [`ListOrder::apply`]), counting every row that
/// matches without the marker.
pub(crate) async fn fetch_ordered<E>(
    db: &sea_orm::DatabaseConnection,
    (query, count): (sea_orm::Select<E>, Option<sea_orm::Select<E>>),
    page: Page,
) -> crate::Result<Paged<E::Model>>
where
    E: sea_orm::EntityTrait,
    E::Model: Sync,
{
    use sea_orm::{PaginatorTrait, QuerySelect};
    let total = count.unwrap_or_else(|| query.clone()).count(db).await?;
    let items = query.limit(page.limit).offset(page.offset).all(db).await?;
    Ok(Paged { items, total })
}

/// Runs `query` (already filtered and ordered) for one page, and counts all its rows.
pub(crate) async fn fetch_page<E>(
    db: &sea_orm::DatabaseConnection,
    query: sea_orm::Select<E>,
    page: Page,
) -> crate::Result<Paged<E::Model>>
where
    E: sea_orm::EntityTrait,
    E::Model: Sync,
{
    fetch_ordered(db, (query, None), page).await
}

/// Counts rows of `E` per value of `key` among `keys`, in one grouped query (not one query per key).
pub(crate) async fn count_by<E, C>(
    db: &sea_orm::DatabaseConnection,
    key: C,
    keys: Vec<String>,
) -> crate::Result<std::collections::HashMap<String, u64>>
where
    E: sea_orm::EntityTrait<Column = C>,
    C: sea_orm::ColumnTrait,
{
    use sea_orm::sea_query::{Expr, ExprTrait};
    use sea_orm::{QueryFilter, QuerySelect};
    if keys.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let rows: Vec<(String, i64)> = E::find()
        .select_only()
        .column(key)
        .column_as(Expr::col(key).count(), "n")
        .filter(key.is_in(keys))
        .group_by(key)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(k, n)| (k, u64::try_from(n).unwrap_or(0)))
        .collect())
}
