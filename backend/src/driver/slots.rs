//! Per-cell download slots of LwM2M devices (`design.md`, LwM2M steps 7-9): devices of one cell and
//! coverage class download at most `cap` at a time; the rest wait in the order they asked.
//!
//! The slots are rows of `download_slots` (held, or waiting since `asked_at`), so they are counted the
//! same on every instance sharing the database: a cell's cap holds across all of them. Each change to a
//! cell's slots is a transaction of its own that first takes the cell's lock (a PostgreSQL advisory lock
//! on the cell's key; SQLite has one writer anyway), counts the holders and hands free places to the
//! oldest waiters. Asking and giving back happen right after the transition that decided them commits;
//! [`Driver::reconcile_slots`] repairs what a crash in between left (a waiting subtask with no row, a row
//! whose subtask ended, a grant its subtask never saw), at start-up and on every pass of the driver's loop.

use domain::flow::lwm2m::{self, Class, Slot};
use domain::task::SubtaskStatus;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, Statement,
};

use super::{BATCH, Driver, Step};
use crate::storage::entity::{download_slots, subtasks};
use crate::{Context, Result};

/// The key devices sharing a cap have in common.
fn key(slot: Slot) -> String {
    let class = match slot.class {
        Class::Range0 => "range0",
        Class::Range1 => "range1",
        Class::Range2 => "range2",
        Class::CellOnly => "cell_only",
    };
    format!("{}:{class}", slot.cell)
}

/// Takes `key`'s lock for the rest of `txn`.
async fn lock(txn: &DatabaseTransaction, key: &str) -> Result<()> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            [key.into()],
        ))
        .await?;
    }
    Ok(())
}

/// Hands `key`'s free places (of `cap`) to its oldest waiters; returns who got one.
async fn fill(txn: &DatabaseTransaction, key: &str, cap: i32) -> Result<Vec<i64>> {
    let held = download_slots::Entity::find()
        .filter(download_slots::Column::SlotKey.eq(key))
        .filter(download_slots::Column::Held.eq(true))
        .count(txn)
        .await?;
    let room = u64::try_from(cap).unwrap_or(0).saturating_sub(held);
    if room == 0 {
        return Ok(Vec::new());
    }
    let next: Vec<i64> = download_slots::Entity::find()
        .select_only()
        .column(download_slots::Column::SubtaskId)
        .filter(download_slots::Column::SlotKey.eq(key))
        .filter(download_slots::Column::Held.eq(false))
        .order_by_asc(download_slots::Column::AskedAt)
        .order_by_asc(download_slots::Column::SubtaskId)
        .limit(room)
        .into_tuple()
        .all(txn)
        .await?;
    if !next.is_empty() {
        download_slots::Entity::update_many()
            .col_expr(download_slots::Column::Held, Expr::value(true))
            .filter(download_slots::Column::SubtaskId.is_in(next.clone()))
            .exec(txn)
            .await?;
    }
    Ok(next)
}

impl Driver {
    /// `subtask` asks for `slot`: granted at once when there is room, queued otherwise. Returns who was
    /// granted one (the asker, if it got or already holds one, and waiters a changed cap let in).
    pub(super) async fn ask_slot(
        &self,
        state: &Context,
        subtask: i64,
        slot: Slot,
    ) -> Result<Vec<i64>> {
        let key = key(slot);
        let cap = i32::try_from(slot.cap).unwrap_or(i32::MAX);
        let mut granted = match download_slots::Entity::find_by_id(subtask)
            .one(&state.db)
            .await?
        {
            // Asked elsewhere before (its cell changed): that place is given up first.
            Some(row) if row.slot_key != key => self.release_slot(state, subtask).await?,
            _ => Vec::new(),
        };
        let txn = crate::db::begin_write(&state.db).await?;
        lock(&txn, &key).await?;
        match download_slots::Entity::find_by_id(subtask)
            .one(&txn)
            .await?
        {
            // Asked again while holding (a retry after a lost grant): it holds it already.
            Some(row) if row.held => granted.push(subtask),
            Some(_) => {}
            None => {
                download_slots::ActiveModel {
                    subtask_id: Set(subtask),
                    slot_key: Set(key.clone()),
                    cap: Set(cap),
                    held: Set(false),
                    asked_at: Set(state.clock.now().as_millis()),
                }
                .insert(&txn)
                .await?;
            }
        }
        // The cap is configuration: the newest ask says what it is now.
        granted.extend(fill(&txn, &key, cap).await?);
        txn.commit().await?;
        Ok(granted)
    }

    /// `subtask` holds `slot` (rebuilt after a crash), whatever the count.
    async fn hold_slot(&self, state: &Context, subtask: i64, slot: Slot) -> Result<()> {
        let key = key(slot);
        let txn = crate::db::begin_write(&state.db).await?;
        lock(&txn, &key).await?;
        if download_slots::Entity::find_by_id(subtask)
            .one(&txn)
            .await?
            .is_none()
        {
            download_slots::ActiveModel {
                subtask_id: Set(subtask),
                slot_key: Set(key),
                cap: Set(i32::try_from(slot.cap).unwrap_or(i32::MAX)),
                held: Set(true),
                asked_at: Set(state.clock.now().as_millis()),
            }
            .insert(&txn)
            .await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// `subtask` gives its slot back (or stops waiting); the freed place goes to the next in line, who is
    /// returned.
    pub(super) async fn release_slot(&self, state: &Context, subtask: i64) -> Result<Vec<i64>> {
        let Some(row) = download_slots::Entity::find_by_id(subtask)
            .one(&state.db)
            .await?
        else {
            return Ok(Vec::new());
        };
        let txn = crate::db::begin_write(&state.db).await?;
        lock(&txn, &row.slot_key).await?;
        let gone = download_slots::Entity::delete_by_id(subtask)
            .exec(&txn)
            .await?
            .rows_affected;
        let granted = if gone == 0 {
            Vec::new()
        } else {
            let cap = download_slots::Entity::find()
                .select_only()
                .column(download_slots::Column::Cap)
                .filter(download_slots::Column::SlotKey.eq(&row.slot_key))
                .order_by_desc(download_slots::Column::AskedAt)
                .into_tuple::<i32>()
                .one(&txn)
                .await?
                .unwrap_or(row.cap);
            fill(&txn, &row.slot_key, cap).await?
        };
        txn.commit().await?;
        Ok(granted)
    }

    /// Hands granted slots to their subtasks (see [`Driver::apply_in`]).
    pub(super) async fn grant(&self, state: &Context, granted: Vec<i64>) -> Result<()> {
        let steps = granted
            .into_iter()
            .map(|id| (id, Step::Lwm2m(lwm2m::Input::SlotGranted)))
            .collect();
        self.apply_in(state, steps, &[]).await
    }

    /// Repairs the slots after a crash between a transition and its slot change: slots of subtasks that
    /// ended are given back, and subtasks downloading or waiting without a slot row hold or queue again
    /// (in the order they started waiting). Whatever place this frees is granted.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn reconcile_slots(&self, state: &Context) -> Result<()> {
        let processing = SubtaskStatus::Processing.as_str();
        let ended: Vec<i64> = download_slots::Entity::find()
            .select_only()
            .column(download_slots::Column::SubtaskId)
            .filter(
                download_slots::Column::SubtaskId.not_in_subquery(
                    Query::select()
                        .column(subtasks::Column::Id)
                        .from(subtasks::Entity)
                        .and_where(Expr::col(subtasks::Column::Status).eq(processing))
                        .to_owned(),
                ),
            )
            .limit(BATCH)
            .into_tuple()
            .all(&state.db)
            .await?;
        let mut granted = Vec::new();
        for id in ended {
            granted.extend(self.release_slot(state, id).await?);
        }
        let missing: Vec<(i64, Option<String>)> = subtasks::Entity::find()
            .select_only()
            .column(subtasks::Column::Id)
            .column(subtasks::Column::Machine)
            .filter(subtasks::Column::Status.eq(processing))
            .filter(subtasks::Column::Step.is_in(["downloading", "wait_slot"]))
            .filter(
                subtasks::Column::Id.not_in_subquery(
                    Query::select()
                        .column(download_slots::Column::SubtaskId)
                        .from(download_slots::Entity)
                        .to_owned(),
                ),
            )
            .order_by_asc(subtasks::Column::UpdatedAt)
            .order_by_asc(subtasks::Column::Id)
            .limit(BATCH)
            .into_tuple()
            .all(&state.db)
            .await?;
        // Granted, but the grant never reached the subtask (a crash or an error right after): granted
        // again (a grant made twice changes a subtask once).
        granted.extend(
            download_slots::Entity::find()
                .select_only()
                .column(download_slots::Column::SubtaskId)
                .filter(download_slots::Column::Held.eq(true))
                .filter(
                    download_slots::Column::SubtaskId.in_subquery(
                        Query::select()
                            .column(subtasks::Column::Id)
                            .from(subtasks::Entity)
                            .and_where(Expr::col(subtasks::Column::Status).eq(processing))
                            .and_where(Expr::col(subtasks::Column::Step).eq("wait_slot"))
                            .to_owned(),
                    ),
                )
                .limit(BATCH)
                .into_tuple::<i64>()
                .all(&state.db)
                .await?,
        );
        for (id, json) in missing {
            let Some(machine) = json
                .as_deref()
                .and_then(|j| serde_json::from_str::<lwm2m::Subtask>(j).ok())
            else {
                continue;
            };
            match machine.phase {
                lwm2m::Phase::Downloading { slot, .. } => self.hold_slot(state, id, slot).await?,
                lwm2m::Phase::WaitSlot { slot } => {
                    granted.extend(self.ask_slot(state, id, slot).await?);
                }
                _ => {}
            }
        }
        self.grant(state, granted).await
    }

    /// Devices downloading in `cell` with `class` now, across every instance.
    ///
    /// # Errors
    /// [`crate::Error::Db`].
    pub async fn slots_held(&self, state: &Context, cell: u32, class: Class) -> Result<u64> {
        let key = key(Slot {
            cell,
            class,
            cap: 0,
        });
        Ok(download_slots::Entity::find()
            .filter(download_slots::Column::SlotKey.eq(key))
            .filter(download_slots::Column::Held.eq(true))
            .count(&state.db)
            .await?)
    }
}
